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


# ``rel_pos_impl`` -> ``rel_pos_attention``'s ``recompute`` (None: by size), for the exact paths
EXACT_IMPLS: dict[str, bool | None] = {"auto": None, "explicit": False, "recompute": True}
REL_POS_IMPLS = (*EXACT_IMPLS, "fused", "mask")


# ---- exact decomposed rel-pos attention without padding queries or saved [N, N] maps ----------
# The plain formulation (ViTDet) materializes logits, adds the bias by broadcasting (two [N, N]
# temporaries), keeps the softmax for backward and, in window blocks, computes padding tokens'
# q/k/v/proj and padding queries' outputs only to crop them. The paths below compute the same
# function with less work: the bias is added with one temporary, not two; window blocks project
# only the real tokens (a padding token is a zero after ``norm1``, so its q/k/v is the qkv bias)
# and run queries of real tokens only; large (global) maps are recomputed in backward
# (``RecomputedRelPosAttention``, in cache-sized chunks of query rows) instead of kept.

# recompute the global attention map in backward from this many logits ([B, heads, N, N]) up;
# smaller maps (windows) are kept, they cost little memory and recomputing them costs time
RECOMPUTE_MIN_LOGITS = 1 << 22
# queries per chunk when recomputing (forward and backward go through the map in chunks of query
# rows, which stay in cache): measured fastest on the CPU, ViT-B at 512 and 1024 px
RECOMPUTE_CHUNK_QUERIES = {torch.float32: 64, torch.bfloat16: 256, torch.float16: 256}
RECOMPUTE_CHUNK_LOGITS = 1 << 26  # other devices


def _rel_pos_logits(q: torch.Tensor, k: torch.Tensor, r_h: torch.Tensor, r_w: torch.Tensor, scale: float,
                    q_hw: tuple[int, int], k_hw: tuple[int, int]) -> torch.Tensor:
    """``scale * q k^T`` plus the decomposed bias: [B, heads, Hq*Wq, Hk*Wk].

    Args:
        q: [B, heads, Hq*Wq, C] unscaled queries of a query grid ``q_hw`` (row-major).
        k: [B, heads, Hk*Wk, C] keys of the key grid ``k_hw``.
        r_h: [Hq, Hk, C] table entry per (query row, key row); r_w: [Wq, Wk, C] per column pair.
    """
    (hq, wq), (hk, wk) = q_hw, k_hw
    b, nh, n, c = q.shape
    grid = q.reshape(b, nh, hq, wq, c)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid, r_h)  # [B, heads, Hq, Wq, Hk]
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid, r_w)  # [B, heads, Hq, Wq, Wk]
    logits = torch.matmul(q * scale, k.transpose(-2, -1)).view(b, nh, hq, wq, hk, wk)
    logits = logits + bias_h[..., :, None]  # one new tensor, then in place: not two temporaries
    logits += bias_w[..., None, :]
    return logits.view(b, nh, n, hk * wk)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * a @ b`` for [B, heads, M, K] @ [B, heads, K, N] (in place when dtypes agree)."""
    if acc.dtype == a.dtype:
        acc.flatten(0, 1).baddbmm_(a.flatten(0, 1), b.flatten(0, 1), alpha=alpha)
    else:
        acc += torch.matmul(a, b).mul_(alpha) if alpha != 1.0 else torch.matmul(a, b)


def _chunk_rows(q: torch.Tensor, q_hw: tuple[int, int], k_tokens: int) -> int:
    """Query-grid rows per chunk, at least one: on the CPU about ``RECOMPUTE_CHUNK_QUERIES[dtype]``
    queries (cache-sized); elsewhere (not tuned: no accelerator was measured) up to
    ``RECOMPUTE_CHUNK_LOGITS`` logits, which only bounds the transient memory."""
    if q.device.type == "cpu":
        rows = RECOMPUTE_CHUNK_QUERIES.get(q.dtype, 64) // q_hw[1]
    else:
        rows = RECOMPUTE_CHUNK_LOGITS // (q.shape[0] * q.shape[1] * q_hw[1] * k_tokens)
    return max(1, min(q_hw[0], rows))


def _biased_logits(qs: torch.Tensor, k: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor) -> torch.Tensor:
    """``qs k^T`` plus the bias terms: qs [B, heads, rows*Wq, C] (scaled), bias_h [B, heads, rows, Wq, Hk],
    bias_w [B, heads, rows, Wq, Wk] -> [B, heads, rows*Wq, Hk*Wk]."""
    b, nh, rows, wq, hk = bias_h.shape
    wk = bias_w.shape[-1]
    logits = torch.matmul(qs, k.transpose(-2, -1)).view(b, nh, rows, wq, hk, wk)
    logits = logits + bias_h[..., :, None]
    logits += bias_w[..., None, :]
    return logits.view(b, nh, rows * wq, hk * wk)


class RecomputedRelPosAttention(torch.autograd.Function):
    """``softmax(logits) @ v`` (``_rel_pos_logits``) keeping no attention map for backward.

    The bias terms (``bias_h`` [B, heads, Hq, Wq, Hk], ``bias_w``: small) are computed once and
    kept; forward and backward go through the map in chunks of query rows (``_chunk_rows``), few
    operations per chunk. Backward recomputes each chunk and differentiates by hand: ``dP = dO v^T``,
    the softmax backward ``dS``, ``dv = P^T dO``, ``dk = dS^T (scale q)``, ``dq = scale dS k``; then,
    once, the bias terms' gradients ``dS_h``, ``dS_w`` (sums of ``dS`` over key columns / rows) go
    to ``q`` and the tables.
    """

    @staticmethod
    def forward(ctx, q, k, v, r_h, r_w, scale, q_hw, k_hw):  # type: ignore[override]
        hq, wq = q_hw
        b, nh, n, c = q.shape
        grid = q.reshape(b, nh, hq, wq, c)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid, r_h)  # [B, heads, Hq, Wq, Hk]
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid, r_w)  # [B, heads, Hq, Wq, Wk]
        qs = q * scale
        rows = _chunk_rows(q, q_hw, k.shape[2])
        out = q.new_empty(b, nh, n, v.shape[-1])
        for r0 in range(0, hq, rows):
            r1 = min(hq, r0 + rows)
            logits = _biased_logits(qs[:, :, r0 * wq: r1 * wq], k, bias_h[:, :, r0:r1], bias_w[:, :, r0:r1])
            out[:, :, r0 * wq: r1 * wq] = torch.matmul(logits.softmax(dim=-1), v)
        ctx.save_for_backward(q, k, v, r_h, r_w, bias_h, bias_w)
        ctx.geometry = scale, tuple(q_hw), tuple(k_hw)
        return out

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        q, k, v, r_h, r_w, bias_h, bias_w = ctx.saved_tensors
        scale, (hq, wq), (hk, wk) = ctx.geometry
        b, nh, n, c = q.shape
        rows = _chunk_rows(q, (hq, wq), k.shape[2])
        acc = torch.float32 if rows < hq else q.dtype  # partial sums over chunks kept in fp32
        qs = q * scale
        d_q = torch.empty_like(q)
        d_k = torch.zeros(k.shape, dtype=acc, device=k.device)
        d_v = torch.zeros(v.shape, dtype=acc, device=v.device)
        d_bias_h, d_bias_w = torch.empty_like(bias_h), torch.empty_like(bias_w)
        d_out = d_out.contiguous()
        vt = v.transpose(-2, -1)
        for r0 in range(0, hq, rows):
            r1 = min(hq, r0 + rows)
            sl = slice(r0 * wq, r1 * wq)
            probs = _biased_logits(qs[:, :, sl], k, bias_h[:, :, r0:r1], bias_w[:, :, r0:r1]).softmax(dim=-1)
            d_probs = torch.matmul(d_out[:, :, sl], vt)
            _accumulate(d_v, probs.transpose(-2, -1), d_out[:, :, sl])
            d_logits = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype)
            del probs, d_probs
            grid = d_logits.view(b, nh, r1 - r0, wq, hk, wk)
            d_bias_h[:, :, r0:r1] = grid.sum(dim=-1)
            d_bias_w[:, :, r0:r1] = grid.sum(dim=-2)
            d_q[:, :, sl] = torch.matmul(d_logits, k)
            _accumulate(d_k, d_logits.transpose(-2, -1), qs[:, :, sl])
        q_grid = q.reshape(b, nh, hq, wq, c)
        d_q = (d_q * scale + torch.einsum("bnhwk,hkc->bnhwc", d_bias_h, r_h).reshape(b, nh, n, c)
               + torch.einsum("bnhwk,wkc->bnhwc", d_bias_w, r_w).reshape(b, nh, n, c))
        d_rh = torch.einsum("bnhwk,bnhwc->hkc", d_bias_h, q_grid)
        d_rw = torch.einsum("bnhwk,bnhwc->wkc", d_bias_w, q_grid)
        return d_q, d_k.to(k.dtype), d_v.to(v.dtype), d_rh, d_rw, None, None, None


def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r_h: torch.Tensor, r_w: torch.Tensor,
                      scale: float, q_hw: tuple[int, int], k_hw: tuple[int, int],
                      recompute: bool | None = None) -> torch.Tensor:
    """Attention with the decomposed relative bias, exactly ViTDet's formula: [B, heads, Hq*Wq, C].

    The queries are a top-left ``q_hw`` part of the key grid ``k_hw`` (all of it in a global block,
    the real tokens of a padded window otherwise); ``r_h`` [Hq, Hk, C] and ``r_w`` [Wq, Wk, C] hold
    the table entry of each (query, key) coordinate pair (``_rel_pos_axis`` sliced to the queries).
    ``recompute``: keep no attention map for backward (``RecomputedRelPosAttention``); None decides
    by size (``RECOMPUTE_MIN_LOGITS``).
    """
    if recompute is None:
        recompute = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] >= RECOMPUTE_MIN_LOGITS
    r_h, r_w = r_h.to(q.dtype), r_w.to(q.dtype)
    if recompute and torch.is_grad_enabled():
        # contiguous once: each chunk's products would otherwise copy the strided keys / values
        return RecomputedRelPosAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), r_h, r_w, scale,
                                               q_hw, k_hw)
    return torch.matmul(_rel_pos_logits(q, k, r_h, r_w, scale, q_hw, k_hw).softmax(dim=-1), v)


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
      only (zero to and from prefix tokens). ``rel_pos_impl`` picks how it is applied
      (``set_rel_pos_impl``): ``"auto"`` (default) runs ``rel_pos_attention`` (windows: real
      queries only, see ``forward_windows``; large global maps recomputed in backward instead of
      kept); ``"fused"`` folds the bias into the queries and keys (``rel_pos_qkv``) of the fused
      kernel; ``"mask"`` builds the [B, heads, N, N] additive mask. All compute ViTDet's formula.
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
        self.rel_pos_impl = "auto"  # see ``set_rel_pos_impl``

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
        elif self.rel_pos_impl in EXACT_IMPLS and num_prefix == 0:
            r_h, r_w = _rel_pos_axis(self.rel_pos_h, hw[0], hw[0]), _rel_pos_axis(self.rel_pos_w, hw[1], hw[1])
            x = rel_pos_attention(q, k, v, r_h, r_w, self.scale, hw, hw, EXACT_IMPLS[self.rel_pos_impl])
        elif self.rel_pos_impl != "mask":  # "fused" (and "auto" with a class token)
            q, k, v = rel_pos_qkv(q, k, v, self.rel_pos_h, self.rel_pos_w, hw, num_prefix, self.scale)
            x = F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., : self.head_dim]
        else:  # "mask": the [B, heads, N, N] additive bias (reference path)
            # as ViTDet: the bias comes from the unscaled queries, only q . k is scaled
            bias = rel_pos_bias(q[:, :, num_prefix:], self.rel_pos_h, self.rel_pos_w, hw)
            if num_prefix:
                bias = F.pad(bias, (num_prefix, 0, num_prefix, 0))
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(b, n, d))

    def forward_windows(self, x: torch.Tensor, hw: tuple[int, int], window: int) -> torch.Tensor:
        """Window attention over a grid zero-padded to multiples of ``window`` (ViTDet), computed for
        the real tokens only: [B, H*W, D] -> [B, H*W, D].

        The same function as ``window_partition`` -> ``forward`` -> ``window_unpartition`` of the
        normalized tokens: padding tokens are zeros, so their keys and values are the qkv bias (they
        are attended to), while their queries, outputs and projections, which the crop drops, are
        never computed. The grid splits into full windows and the partial ones of the last window
        row / column; each kind attends with its real queries against its whole padded window.
        """
        b, n, d = x.shape
        h, w = hw
        heads, c = self.num_heads, self.head_dim
        bias = self.qkv.bias
        # split, not sliced: the backward of a split concatenates, a slice's fills a zero gradient
        q, kv = self.qkv(x).view(b, h, w, 3 * d).split([d, 2 * d], dim=-1)
        q = q.view(b, h, w, heads, c)
        pad_h, pad_w = -h % window, -w % window
        if pad_h or pad_w:  # padding tokens: the bias (zeros after norm1, then projected)
            fill = bias[d:].to(kv.dtype) if bias is not None else kv.new_zeros(2 * d)
            if pad_w:
                kv = torch.cat([kv, fill.expand(b, h, pad_w, 2 * d)], dim=2)
            if pad_h:
                kv = torch.cat([kv, fill.expand(b, pad_h, w + pad_w, 2 * d)], dim=1)
        nwh, nww = (h + pad_h) // window, (w + pad_w) // window
        kv = kv.view(b, nwh, window, nww, window, 2, heads, c).permute(5, 0, 1, 3, 6, 2, 4, 7)
        # [2, B, H/win, W/win, heads, win, win, C]
        r_h = _rel_pos_axis(self.rel_pos_h, window, window)
        r_w = _rel_pos_axis(self.rel_pos_w, window, window)
        recompute = bool(EXACT_IMPLS[self.rel_pos_impl])  # "auto": windows keep their (small) maps
        # full windows, then the partial last window row / column: (query rows, window rows)
        split_h = [(h // window * window, h // window), (h % window, 1)]
        split_w = [(w // window * window, w // window), (w % window, 1)]
        split_h, split_w = [s for s in split_h if s[0]], [s for s in split_w if s[0]]
        q_rows = q.split([s[0] for s in split_h], dim=1)
        kv_rows = kv.split([s[1] for s in split_h], dim=2)
        rows = []
        for q_row, kv_row, (tokens_h, win_h) in zip(q_rows, kv_rows, split_h):
            cols = []
            qh = tokens_h // win_h
            for q_part, kv_part, (tokens_w, win_w) in zip(q_row.split([s[0] for s in split_w], dim=2),
                                                          kv_row.split([s[1] for s in split_w], dim=3), split_w):
                qw = tokens_w // win_w
                # queries of these windows: [B*nWh*nWw, heads, qh*qw, C]; keys/values: whole windows
                qs = q_part.reshape(b, win_h, qh, win_w, qw, heads, c).permute(0, 1, 3, 5, 2, 4, 6)
                ks, vs = kv_part.reshape(2, -1, heads, window * window, c).unbind(0)
                out = rel_pos_attention(qs.reshape(-1, heads, qh * qw, c), ks, vs, r_h[:qh], r_w[:qw], self.scale,
                                        (qh, qw), (window, window), recompute)
                out = out.view(b, win_h, win_w, heads, qh, qw, c).permute(0, 1, 4, 2, 5, 3, 6)
                cols.append(out.reshape(b, tokens_h, tokens_w, d))
            rows.append(cols[0] if len(cols) == 1 else torch.cat(cols, dim=2))
        out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
        return self.proj(out.reshape(b, n, d))


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
    """Choose how every block of ``model`` computes decomposed relative-position attention.

    ``"auto"`` (default): ``rel_pos_attention`` (real queries only in windows), recomputing large
    attention maps in backward; ``"explicit"`` / ``"recompute"``: the same, never / always
    recomputing; ``"fused"``: the bias folded into queries and keys of the fused kernel
    (``rel_pos_qkv``); ``"mask"``: the bias as the fused kernel's additive mask. With a class token
    in the blocks ``"auto"`` runs ``"fused"``.
    """
    if impl not in REL_POS_IMPLS:
        raise ValueError(f"rel_pos_impl must be one of {', '.join(repr(i) for i in REL_POS_IMPLS)}, got {impl!r}")
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
            if self.attn.use_rel_pos and self.attn.rel_pos_impl in EXACT_IMPLS:
                y = self.attn.forward_windows(y, hw, self.window_size)
            else:
                y, padded = window_partition(y, hw, self.window_size)
                y = self.attn(y, (self.window_size, self.window_size))
                y = window_unpartition(y, padded, hw, self.window_size)
        else:
            y = self.attn(y, hw, num_prefix)
        x = x + self.drop_path(self.ls1(y))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
