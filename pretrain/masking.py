"""Which patches the encoder sees.

Every masking kind is expressed as a per-sample ``noise`` [N, L] whose ascending argsort lists
the kept patches first: MAE's ``random_masking`` (``ids_shuffle = argsort(noise)``, keep the first
``len_keep``) then serves all kinds, and passing the same ``noise`` reproduces a mask exactly.

- ``random``: ``noise ~ U[0, 1)`` per patch (the paper's default, any ratio).
- ``block``: BEiT's blockwise masking: random rectangles of at least ``min_block`` patches with
  aspect ratio in ``[min_aspect, 1 / min_aspect]``, each strictly smaller than the grid, added
  until exactly ``L - len_keep`` patches are masked; when no further rectangle fits within the
  remaining budget (10 tries), the remainder is masked at random patches.
- ``grid``: keep one patch of every 2x2 cell, the top-left one: patch ``(i, j)`` is kept iff
  ``i`` and ``j`` are both even.  Needs ``mask_ratio == 0.75`` and an even grid.

For ``block`` and ``grid`` the kept patches come first in raster order, then the masked ones.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

MASKINGS = ("random", "block", "grid")


def num_keep(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: ``int(L * (1 - mask_ratio))`` (the official rounding)."""
    return int(num_patches * (1 - mask_ratio))


def check_masking(kind: str, mask_ratio: float, grid: tuple[int, int]) -> None:
    """Raise ``ValueError`` with the reason when ``kind`` cannot mask ``grid`` at ``mask_ratio``."""
    if kind not in MASKINGS:
        raise ValueError(f"unknown masking {kind!r}; choose one of {', '.join(MASKINGS)}")
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
    h, w = grid
    if num_keep(h * w, mask_ratio) < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of a {h}x{w} grid")
    if kind == "grid":
        if abs(mask_ratio - 0.75) > 1e-9:
            raise ValueError(f"grid masking keeps one patch of every 2x2 (mask_ratio 0.75), got {mask_ratio}")
        if h % 2 or w % 2:
            raise ValueError(f"grid masking needs an even patch grid, got {h}x{w}")


def _uniform(a: float, b: float, generator: torch.Generator | None) -> float:
    return a + (b - a) * torch.rand((), generator=generator).item()


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An integer in ``[low, high]`` (both inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def block_mask(
    grid: tuple[int, int],
    num_masked: int,
    generator: torch.Generator | None = None,
    min_block: int = 4,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """BEiT blockwise mask with exactly ``num_masked`` patches masked.

    Args:
        grid: (H, W) patches.
        num_masked: patches to mask.
        generator: randomness (default: torch's global generator).
        min_block: smallest rectangle, in patches.
        min_aspect: rectangles have aspect ratio in ``[min_aspect, 1 / min_aspect]``.
    Returns:
        [H, W] bool, True = masked.
    """
    h, w = grid
    if not 0 <= num_masked <= h * w:
        raise ValueError(f"cannot mask {num_masked} of {h * w} patches")
    mask = torch.zeros(h, w, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masked:
        budget = num_masked - count
        added = 0
        for _ in range(10):  # BEiT: up to 10 tries to place one rectangle
            area = _uniform(min_block, budget, generator)
            aspect = math.exp(_uniform(*log_aspect, generator))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if not (0 < bh < h and 0 < bw < w):
                continue
            top, left = _randint(0, h - bh, generator), _randint(0, w - bw, generator)
            new = int((~mask[top : top + bh, left : left + bw]).sum())
            if 0 < new <= budget:
                mask[top : top + bh, left : left + bw] = True
                added = new
                break
        if added == 0:
            break
        count += added
    if count < num_masked:  # top up: no rectangle fits the remaining budget
        free = (~mask).flatten().nonzero().squeeze(1)
        pick = free[torch.randperm(free.numel(), generator=generator)[: num_masked - count]]
        mask.view(-1)[pick] = True
    return mask


def grid_mask(grid: tuple[int, int]) -> torch.Tensor:
    """[H, W] bool, True = masked: all but the top-left patch of every 2x2 cell."""
    h, w = grid
    rows = torch.arange(h)[:, None] % 2 == 0
    cols = torch.arange(w)[None, :] % 2 == 0
    return ~(rows & cols)


def noise_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Noise whose argsort puts kept patches first, each group in raster order.

    Args:
        mask: [..., L] bool, True = masked.
    Returns:
        [..., L] float32: kept patches in [0, 0.5), masked in [1, 1.5).
    """
    num = mask.shape[-1]
    return mask.float() + torch.arange(num, dtype=torch.float32) / (2 * num)


def mask_noise(
    kind: str,
    grid: tuple[int, int],
    mask_ratio: float,
    batch: int | None = None,
    seeds: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample noise [N, L] for ``kind`` (see the module docstring).

    Args:
        kind: one of ``MASKINGS``.
        grid: (H, W) patches, L = H * W.
        mask_ratio: fraction of patches removed.
        batch: N, when ``seeds`` is not given (then torch's global generator is used, as the
            official code does).
        seeds: one seed per sample: sample i's noise is a pure function of ``seeds[i]``.
        device: where the noise goes.
    Returns:
        [N, L] float32.
    """
    check_masking(kind, mask_ratio, grid)
    h, w = grid
    num = h * w
    if seeds is None:
        if batch is None:
            raise ValueError("give either batch or seeds")
        gens: list[torch.Generator | None] = [None] * batch
    else:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if kind == "random":
        if seeds is None:
            noise = torch.rand(len(gens), num)
        else:
            noise = torch.stack([torch.rand(num, generator=g) for g in gens]) if gens else torch.empty(0, num)
    elif kind == "block":
        num_masked = num - num_keep(num, mask_ratio)
        rows = [noise_from_mask(block_mask(grid, num_masked, g).reshape(-1)) for g in gens]
        noise = torch.stack(rows) if rows else torch.empty(0, num)
    else:
        noise = noise_from_mask(grid_mask(grid).reshape(-1)).expand(len(gens), num).clone()
    return noise.to(device) if device is not None else noise
