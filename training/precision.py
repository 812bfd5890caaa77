"""Mixed precision: which autocast dtype a ``--precision`` means on a device, and the autocast context.

``auto`` is bf16 on a GPU that supports it, else fp32; fp16 also needs a grad scaler.
"""
from __future__ import annotations

from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a GPU that supports it, else ``fp32``; the others as given."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def resolve_amp(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a grad scaler is needed)."""
    resolved = resolve_precision(precision, device)
    return AMP_DTYPES[resolved], resolved == "fp16"


def amp_autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype``; disabled (fp32) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
