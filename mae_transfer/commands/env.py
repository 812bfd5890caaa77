"""``mae-transfer env``: versions of the stack and whether its compiled ops load."""
from __future__ import annotations

import argparse
import importlib
import json
import platform
from typing import Any


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # report, do not crash: env is what users run when things break
        return None if isinstance(exc, ModuleNotFoundError) else f"broken ({type(exc).__name__}: {exc})"


def _probe(statement: str) -> str:
    try:
        exec(statement, {})
        return "yes"
    except Exception as exc:
        return f"no ({type(exc).__name__}: {exc})"


def collect() -> dict[str, Any]:
    """The facts ``env`` prints, as a dict (also used by tests and reports)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for mod in ("torch", "torchvision", "timm", "detectron2", "mmcv", "mmengine", "mmseg"):
        info[mod] = _version(mod)
    info["detectron2 C++ ops"] = _probe("from detectron2 import _C") if info["detectron2"] else "n/a"
    info["mmcv ops"] = (
        _probe("from mmcv.ops import nms, roi_align, point_sample") if info["mmcv"] else "n/a"
    )
    try:
        import torch

        if torch.cuda.is_available():
            info["device"] = f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
        else:
            info["device"] = f"cpu ({torch.get_num_threads()} threads)"
        info["torch CUDA build"] = torch.version.cuda or "none"
    except Exception as exc:
        info["device"] = f"unknown ({exc})"
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value if value is not None else 'not installed'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print versions of the stack and whether compiled ops load")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run)
