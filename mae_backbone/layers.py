"""Transformer blocks of the ViT, owned here so that upstream refactors cannot break our keys.

Parameter names follow the official MAE / timm layout (``norm1``, ``attn.qkv``, ``attn.proj``,
``norm2``, ``mlp.fc1``, ``mlp.fc2``, layer scale ``ls1.gamma`` / ``ls2.gamma``), ViTDet's for the
decomposed relative position tables (``attn.rel_pos_h``, ``attn.rel_pos_w``) and BEiT's for its
relative position bias table (``attn.relative_position_bias_table``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from mae_backbone.pos_embed import _to_hw, resample_beit_rel_pos, resample_rel_pos

REL_POS_KINDS = ("", "decomposed", "beit")


def rel_pos_kind(rel_pos: bool | str | None) -> str:
    """Normalize a ``rel_pos`` option: False/None/"" -> "", True/"decomposed" -> "decomposed", "beit"."""
    if rel_pos is True:
        return "decomposed"
    if rel_pos in (False, None, ""):
        return ""
    if rel_pos in REL_POS_KINDS:
        return str(rel_pos)
    raise ValueError(f"rel_pos must be False, True, 'decomposed' or 'beit', got {rel_pos!r}")


class Mlp(nn.Module):
    """Two linear layers with GELU: ``[..., D] -> [..., hidden] -> [..., D]``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _rel_pos_axis(table: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """Gather a decomposed rel-pos table into ``[q_len, k_len, C]`` (ViTDet's scaling rule)."""
    length = 2 * max(q_len, k_len) - 1
    table = resample_rel_pos(table, length)
    q_idx = torch.arange(q_len, device=table.device)[:, None] * max(k_len / q_len, 1.0)
    k_idx = torch.arange(k_len, device=table.device)[None, :] * max(q_len / k_len, 1.0)
    rel = (q_idx - k_idx) + (k_len - 1) * max(q_len / k_len, 1.0)
    return table[rel.long()]


# bf16 on the CPU: up to this many tokens, attention as two matmuls and an fp32 softmax beats the
# fused kernel, whose backward is slow in bf16 there (MAE's encoder sees 50 tokens, its decoder 197)
EXPLICIT_ATTENTION_MAX_TOKENS = 256


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale * q k^T) v`` with the softmax in fp32: [B, heads, N, C] -> [B, heads, N, C]."""
    attn = (q * scale) @ k.transpose(-2, -1)
    return attn.float().softmax(dim=-1).to(v.dtype) @ v


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """Decomposed relative position bias (MViTv2 / ViTDet), as an additive attention mask.

    Args:
        q: [B, heads, H*W, C] queries of the spatial tokens (unscaled).
        rel_pos_h, rel_pos_w: [2S-1, C] tables for the row and column offsets.
        hw: (H, W) of the token grid.
    Returns:
        [B, heads, H*W, H*W] bias.
    """
    h, w = hw
    b, nh, _, c = q.shape
    r_h = _rel_pos_axis(rel_pos_h, h, h)  # [H, H, C]
    r_w = _rel_pos_axis(rel_pos_w, w, w)  # [W, W, C]
    q = q.reshape(b, nh, h, w, c)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", q, r_h.to(q.dtype))  # [B, nh, H, W, H]
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", q, r_w.to(q.dtype))  # [B, nh, H, W, W]
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # [B, nh, H, W, H, W]
    return bias.reshape(b, nh, h * w, h * w)


def beit_rel_pos_index(hw: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """BEiT's index into its bias table for a class token plus an H x W grid: [1+H*W, 1+H*W] long.

    Spatial pairs index the offset ``(dh + H-1) * (2W-1) + (dw + W-1)`` (``dh`` = query row minus
    key row); then row 0 (the class token as query) -> ``T-3``, column 0 (as key) -> ``T-2`` and
    the corner (cls -> cls) -> ``T-1``, with ``T = (2H-1)(2W-1)+3`` rows in the table.
    """
    h, w = hw
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    offset = (rows[:, None] - rows[None, :] + h - 1) * (2 * w - 1) + (cols[:, None] - cols[None, :] + w - 1)
    total = (2 * h - 1) * (2 * w - 1) + 3
    index = torch.empty(h * w + 1, h * w + 1, dtype=torch.long, device=device)
    index[1:, 1:] = offset
    index[0, :] = total - 3
    index[:, 0] = total - 2
    index[0, 0] = total - 1
    return index


class Attention(nn.Module):
    """Multi-head self-attention with an optional relative position bias.

    ``forward(x, hw, num_prefix)``: ``x`` is [B, P+H*W, D] with P prefix tokens (class token)
    first.

    Relative position kinds (``rel_pos``):
    - ``"decomposed"`` (ViTDet / MViTv2): tables ``rel_pos_h``, ``rel_pos_w`` of ``2S-1`` rows
      (``S = rel_pos_size``), the bias computed from the unscaled queries; it covers spatial tokens
      only (zero to and from prefix tokens). ``rel_pos_impl`` picks how it is applied:
      ``"fused"`` (default) folds it into the queries and keys (``rel_pos_qkv``) so the fused
      attention kernel runs without an [N, N] mask; ``"mask"`` builds the [B, heads, N, N]
      additive mask (reference, more memory).
    - ``"beit"`` (BEiT; MMSeg's ``MAE`` backbone): one learned bias per head and 2-D offset,
      ``relative_position_bias_table`` [(2Gh-1)(2Gw-1)+3, heads] for the grid ``rel_pos_grid``,
      including the class-token entries; it needs exactly one prefix token. Inputs on another
      grid use the table resampled bicubically.
    Both are zero-initialized: a checkpoint without them behaves exactly as a plain ViT.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, rel_pos_size: int = 0,
                 rel_pos: str = "decomposed", rel_pos_grid: int | tuple[int, int] = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        kind = rel_pos_kind(rel_pos)
        self.use_rel_pos = kind == "decomposed" and rel_pos_size > 0
        self.use_beit_rel_pos = kind == "beit"
        if self.use_rel_pos:
            # zero init: a plain MAE checkpoint behaves exactly as without the bias
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, self.head_dim))
        if self.use_beit_rel_pos:
            grid = _to_hw(rel_pos_grid)
            if min(grid) < 1:
                raise ValueError(f"BEiT relative position bias needs the token grid, got rel_pos_grid={rel_pos_grid!r}")
            self.rel_pos_grid = grid
            rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
            # derived from the grid, so not stored in checkpoints (MMSeg stores it: its reader drops it)
            self.register_buffer("relative_position_index", beit_rel_pos_index(grid), persistent=False)
        self.rel_pos_impl = "fused"  # or "mask"; see ``set_rel_pos_impl``

    def beit_bias(self, hw: tuple[int, int]) -> torch.Tensor:
        """The BEiT bias for a class token plus an ``hw`` grid: [heads, 1+H*W, 1+H*W]."""
        table, index = self.relative_position_bias_table, self.relative_position_index
        if tuple(hw) != self.rel_pos_grid:
            table = resample_beit_rel_pos(table, self.rel_pos_grid, hw)
            index = beit_rel_pos_index(hw, device=table.device)
        n = index.shape[0]
        return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, hd]
        if self.use_beit_rel_pos:
            if num_prefix != 1:
                raise ValueError("the BEiT relative position bias needs the class token (one prefix token) "
                                 f"in the blocks, got {num_prefix} prefix tokens")
            bias = self.beit_bias(hw).to(q.dtype)  # added to the scaled logits, as in BEiT
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        elif not self.use_rel_pos:
            if q.device.type == "cpu" and q.dtype == torch.bfloat16 and n <= EXPLICIT_ATTENTION_MAX_TOKENS:
                x = explicit_attention(q, k, v, self.scale)
            else:
                x = F.scaled_dot_product_attention(q, k, v)
        elif self.rel_pos_impl == "fused":
            q, k, v = rel_pos_qkv(q, k, v, self.rel_pos_h, self.rel_pos_w, hw, num_prefix, self.scale)
            x = F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., : self.head_dim]
        else:  # "mask": the [B, heads, N, N] additive bias (reference path)
            # as ViTDet: the bias comes from the unscaled queries, only q . k is scaled
            bias = rel_pos_bias(q[:, :, num_prefix:], self.rel_pos_h, self.rel_pos_w, hw)
            if num_prefix:
                bias = F.pad(bias, (num_prefix, 0, num_prefix, 0))
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


def rel_pos_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: tuple[int, int],
    num_prefix: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold the decomposed relative bias into queries and keys, so no [N, N] mask is built.

    The bias of query ``(i, j)`` to key ``(k, l)`` is ``bias_h[(i, j), k] + bias_w[(i, j), l]``
    (``rel_pos_bias``).  Appending ``bias_h``, ``bias_w`` to each query and the one-hot row /
    column of each key to each key makes ``q' . k' = scale * q . k + bias`` (the bias from the
    unscaled queries, as in ViTDet); prefix tokens get
    zeros (no bias to or from them).  Values are zero-padded to the same width (fused CPU kernels
    want equal widths) and widths are padded to a multiple of 8 (GPU kernels).

    Args:
        q, k, v: [B, heads, P+H*W, C].
        rel_pos_h, rel_pos_w: [2S-1, C] tables.
        hw: (H, W) of the token grid; num_prefix: P; scale: the attention scale.
    Returns:
        q', k', v' of width ``C + H + W`` rounded up to 8: use with ``scale=1`` and keep the first
        C channels of the output.
    """
    h, w = hw
    b, nh, n, c = q.shape
    qs = q * scale
    r_h = _rel_pos_axis(rel_pos_h, h, h).to(q.dtype)  # [H, H, C]
    r_w = _rel_pos_axis(rel_pos_w, w, w).to(q.dtype)  # [W, W, C]
    qp = q[:, :, num_prefix:].reshape(b, nh, h, w, c)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", qp, r_h).reshape(b, nh, h * w, h)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", qp, r_w).reshape(b, nh, h * w, w)
    width = c + h + w
    extra = -width % 8
    q_bias = F.pad(torch.cat([bias_h, bias_w], dim=-1), (0, extra, num_prefix, 0))
    rows = torch.arange(h * w, device=q.device)
    onehot = torch.zeros(n, h + w + extra, dtype=q.dtype, device=q.device)
    onehot[num_prefix + rows, rows // w] = 1
    onehot[num_prefix + rows, h + rows % w] = 1
    q2 = torch.cat([qs, q_bias], dim=-1)
    k2 = torch.cat([k, onehot.expand(b, nh, n, -1)], dim=-1)
    v2 = F.pad(v, (0, h + w + extra))
    return q2, k2, v2


def set_rel_pos_impl(model: nn.Module, impl: str) -> None:
    """Choose ``"fused"`` or ``"mask"`` relative-position attention in every block of ``model``."""
    if impl not in ("fused", "mask"):
        raise ValueError(f"rel_pos_impl must be 'fused' or 'mask', got {impl!r}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.rel_pos_impl = impl


def window_partition(x: torch.Tensor, hw: tuple[int, int], window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H*W, D] -> [B*nW, window*window, D], zero-padding H, W up to multiples of ``window``."""
    b, _, d = x.shape
    h, w = hw
    x = x.reshape(b, h, w, d)
    ph, pw = (window - h % window) % window, (window - w % window) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, d), (hp, wp)


def window_unpartition(x: torch.Tensor, padded_hw: tuple[int, int], hw: tuple[int, int], window: int) -> torch.Tensor:
    """Inverse of ``window_partition``: [B*nW, window*window, D] -> [B, H*W, D]."""
    hp, wp = padded_hw
    h, w = hw
    d = x.shape[-1]
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.reshape(b, hp // window, wp // window, window, window, d).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, d)[:, :h, :w]
    return x.reshape(b, h * w, d)


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (CaiT; BEiT's ``gamma_1`` / ``gamma_2``): [..., D] -> [..., D]."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

    Args:
        window_size: 0 for global attention, else non-overlapping windows of this many patches
            (then the input must carry no prefix tokens).
        rel_pos_size: for decomposed tables: 0 for none, else the grid side they are made for.
        rel_pos: ``"decomposed"`` or ``"beit"`` (see ``Attention``); rel_pos_grid: BEiT's grid.
        init_values: layer scale (``ls1.gamma``, ``ls2.gamma`` filled with it); None for none.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        window_size: int = 0,
        rel_pos_size: int = 0,
        rel_pos: str = "decomposed",
        rel_pos_grid: int | tuple[int, int] = 0,
        init_values: float | None = None,
    ):
        super().__init__()
        self.window_size = window_size
        if window_size and rel_pos_kind(rel_pos) == "beit":
            raise ValueError("the BEiT relative position bias needs global attention (window_size=0)")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, rel_pos_size=rel_pos_size, rel_pos=rel_pos,
                              rel_pos_grid=rel_pos_grid)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

    def forward(self, x: torch.Tensor, hw: tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
        """x: [B, P+H*W, D] -> [B, P+H*W, D]."""
        y = self.norm1(x)
        if self.window_size:
            if num_prefix:
                raise ValueError("window attention needs the spatial tokens alone (no class token)")
            y, padded = window_partition(y, hw, self.window_size)
            y = self.attn(y, (self.window_size, self.window_size))
            y = window_unpartition(y, padded, hw, self.window_size)
        else:
            y = self.attn(y, hw, num_prefix)
        x = x + self.drop_path(self.ls1(y))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
