"""The ``mae-transfer`` command line: help, env, and the console script as installed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from mae_transfer.cli import COMMANDS, build_parser, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for module in COMMANDS:
        assert module.rsplit(".", 1)[1].replace("_", "-") in out  # bench_speed -> bench-speed


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrian"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_env_reports_the_whole_stack_with_ops():
    proc = subprocess.run([sys.executable, "-m", "mae_transfer", "env", "--json"], capture_output=True, text=True,
                          check=True)
    info = json.loads(proc.stdout)
    assert info["torch"].startswith("2.14.1")
    assert info["torchvision"].startswith("0.29.1")
    assert info["mmcv"] == "2.1.0" and info["mmcv ops"] == "yes"
    assert info["mmengine"] == "0.10.7" and info["mmseg"] == "1.2.2"
    assert info["detectron2"] is not None and not str(info["detectron2"]).startswith("broken")
    assert info["detectron2 C++ ops"].startswith(("yes", "no"))
    assert info["timm"].startswith("1.0.")
    assert info["device"].startswith(("cpu", "cuda"))


def test_console_script_is_installed():
    exe = shutil.which("mae-transfer") or str(__import__("pathlib").Path(sys.executable).parent / "mae-transfer")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().startswith("mae-transfer ")


def test_parser_builds_without_importing_frameworks():
    """``--help`` must stay light: no detectron2 / mmseg import from building the parser."""
    code = ("import sys; from mae_transfer.cli import build_parser; build_parser(); "
            "print(any(m.split('.')[0] in ('detectron2', 'mmseg', 'mmcv') for m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"
    assert build_parser().prog == "mae-transfer"
