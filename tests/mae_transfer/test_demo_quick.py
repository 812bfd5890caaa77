"""``mae-transfer demo --quick`` for real, as a new user runs it: every stage runs (no stage is
replaced), the command exits 0, and the report has a number for every task and the figures it
links to."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mae_transfer.demo.report import RESULT_ROWS
from mae_transfer.demo.stages import STAGES


def test_quick_demo_runs_every_stage_and_reports_every_number(tmp_path):
    out = tmp_path / "demo_output"
    exe = shutil.which("mae-transfer") or str(Path(sys.executable).parent / "mae-transfer")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([exe, "demo", "--quick", "--output", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr

    saved = json.loads((out / "results.json").read_text())
    assert saved["finished"] is True and saved["errors"] == {}
    assert set(saved["timings"]) == set(STAGES)  # every stage ran
    for stage, key, _ in RESULT_ROWS:
        seeds = 3 if stage in ("finetune", "linprobe", "partial") else 1
        for init in ("mae", "random"):
            values = saved["results"][key][init]
            assert len(values) == seeds and all(math.isfinite(v) for v in values), (key, init, values)
    report = (out / "report.md").read_text()
    assert "**failed**" not in report and "n.a." not in report.split("## Figures")[0]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"figures/results.png", "figures/pretrain_loss.png", "figures/segment_examples.png",
            "figures/detect_examples.png"} <= set(images)
    for rel in images:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
    logs = out / "logs"
    for log in logs.glob("*.log"):  # one handler per logger: no line written twice in a row
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        doubled = [a for a, b in zip(lines, lines[1:]) if a == b and re.match(r"^\[?\d", a)]
        assert not doubled, (log.name, doubled[:3])
