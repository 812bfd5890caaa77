"""Position embeddings and the resampling of grid-shaped weights, written once for every task.

- ``sincos_2d_pos_embed``: the fixed 2-D sin-cos embedding of MAE (first half of the channels
  encodes the column, second half the row; each half is ``[sin(p * w_k), cos(p * w_k)]`` with
  ``w_k = 10000 ** (-k / (D / 4))``).
- ``resample_abs_pos_embed``: absolute embedding to another grid (bicubic, prefix tokens kept aside;
  by default the official kernel of MAE's ``interpolate_pos_embed``, ViTDet's ``get_abs_pos`` and
  MMSeg: ``align_corners=False`` and no anti-aliasing).
- ``resample_patch_embed``: a patch-embedding kernel to another patch size (e.g. ViT-H 14 -> 16),
  by the pseudo-inverse of the resize operator (FlexiViT), so that a resized patch gives the
  same token as the original patch gave.
- ``resample_rel_pos``: a decomposed relative-position table to another length (linear).
- ``resample_beit_rel_pos``: a BEiT relative-position bias table to another grid (bicubic over the
  offset grid; the three class-token entries kept).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _to_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of 1-D positions.

    Args:
        embed_dim: output channels D (even).
        positions: [M] positions.
    Returns:
        [M, D] float64: ``[sin(p * w), cos(p * w)]`` for D/2 frequencies ``w``.
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    freqs = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    freqs = 1.0 / (10000.0**freqs)
    angles = positions.to(torch.float64).reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_pos_embed(
    embed_dim: int, grid_size: int | Sequence[int], cls_token: bool = False
) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding.

    Args:
        embed_dim: channels D (multiple of 4).
        grid_size: patch grid ``H`` or ``(H, W)``.
        cls_token: prepend an all-zero row for the class token.
    Returns:
        [(1+)H*W, D] float32, row-major over the grid.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a multiple of 4 channels, got {embed_dim}")
    h, w = _to_hw(grid_size)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_size: int | Sequence[int],
    old_size: int | Sequence[int] | None = None,
    num_prefix_tokens: int = 1,
    antialias: bool = False,
) -> torch.Tensor:
    """Resample an absolute position embedding to another patch grid.

    Args:
        pos_embed: [1, P+L, D] with P prefix (class) tokens first, which are kept as they are.
        new_size: target grid ``(H', W')``.
        old_size: the grid of ``pos_embed`` (square when omitted).
        num_prefix_tokens: P.
        antialias: anti-alias (PIL-style cubic, timm's default). Off by default: the published
            recipes (MAE ``interpolate_pos_embed``, ViTDet ``get_abs_pos``, MMSeg
            ``resize_pos_embed``) all use plain bicubic; upsampling 14x14 to 20x20 differs by ~8%
            of the table's scale between the two.
    Returns:
        [1, P+H'*W', D] in the input dtype (bicubic, computed in float32).
    """
    new_hw = _to_hw(new_size)
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"pos_embed has {n} grid positions, not a square; pass old_size")
        old_size = side
    old_hw = _to_hw(old_size)
    if old_hw[0] * old_hw[1] != n:
        raise ValueError(f"pos_embed has {n} grid positions, old_size {old_hw} does not match")
    if old_hw == new_hw:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_hw[0], old_hw[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_hw, mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def resample_patch_embed(weight: torch.Tensor, new_size: int | Sequence[int]) -> torch.Tensor:
    """Resample a patch-embedding kernel ``[D, C, p, p]`` to ``[D, C, p', p']``.

    With ``R`` the bicubic resize of a p x p patch to p' x p' (a linear map), the new kernel is
    ``pinv(R^T) w``: for any patch ``x``, ``<R x, w'> ~= <x, w>`` (exact when p' >= p), so an
    image resized by the same factor gives the same tokens.
    """
    old_hw = tuple(weight.shape[-2:])
    new_hw = _to_hw(new_size)
    if old_hw == new_hw:
        return weight
    n_old = old_hw[0] * old_hw[1]
    basis = torch.eye(n_old, dtype=torch.float32).reshape(n_old, 1, *old_hw)
    resize = F.interpolate(basis, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
    resize = resize.reshape(n_old, -1).double().T  # R: [n_new, n_old], column i = resize(e_i)
    inverse = torch.linalg.pinv(resize.T)  # [n_new, n_old]
    flat = weight.double().reshape(-1, n_old)  # [D*C, n_old]
    out = flat @ inverse.T
    return out.reshape(*weight.shape[:2], *new_hw).to(weight.dtype)


def resample_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resample a decomposed relative-position table ``[2S-1, C]`` to ``[length, C]`` (linear)."""
    if table.shape[0] == length:
        return table
    out = F.interpolate(table.float().T.unsqueeze(0), size=length, mode="linear", align_corners=False)
    return out.squeeze(0).T.to(table.dtype)


def resample_beit_rel_pos(table: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """Resample a BEiT relative position bias table to another token grid.

    Args:
        table: [(2*Gh-1)*(2*Gw-1)+3, heads]: one row per 2-D offset (row-major over
            ``(dh + Gh-1, dw + Gw-1)``), then cls->token, token->cls, cls->cls.
        old_grid: (Gh, Gw) the table is made for; new_grid: the target (Gh', Gw').
    Returns:
        [(2*Gh'-1)*(2*Gw'-1)+3, heads]: the offset grid resized bicubically (align_corners=False),
        the three class-token rows unchanged. MMSeg's ``BEiT.resize_rel_pos_embed`` interpolates
        on a geometric grid instead (scipy ``interp2d``); see docs/fidelity.md.
    """
    oh, ow = _to_hw(old_grid)
    nh, nw = _to_hw(new_grid)
    n_old = (2 * oh - 1) * (2 * ow - 1)
    if table.shape[0] != n_old + 3:
        raise ValueError(f"BEiT rel-pos table has {table.shape[0]} rows; a {oh}x{ow} grid needs {n_old + 3}")
    if (oh, ow) == (nh, nw):
        return table
    heads = table.shape[1]
    grid = table[:n_old].float().T.reshape(1, heads, 2 * oh - 1, 2 * ow - 1)
    grid = F.interpolate(grid, size=(2 * nh - 1, 2 * nw - 1), mode="bicubic", align_corners=False)
    grid = grid.reshape(heads, -1).T.to(table.dtype)
    return torch.cat([grid, table[n_old:]], dim=0)
