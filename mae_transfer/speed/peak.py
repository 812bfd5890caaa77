"""Part ``peak``: the machine's measured matmul peak, the denominator of every "peak fraction"."""
from __future__ import annotations

import torch

from mae_transfer.speed.harness import now


def measure_peak(device: torch.device, size: int, reps: int = 5) -> dict[str, float]:
    """Best-of-``reps`` FLOP/s of a [size, size] @ [size, size] matmul in fp32 and bf16.

    Returns:
        ``{"fp32": FLOP/s, "bf16": FLOP/s}``.
    """
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = now()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, now() - start)
        peaks[name] = 2 * size**3 / best
        print(f"matmul peak {name}: {peaks[name] / 1e9:8.1f} GFLOP/s ({size}x{size}, best of {reps})", flush=True)
    return peaks
