"""The plain ViTDet formulation, the detection benchmark's reference (and the equivalence tests').

ViTDet (Li et al. 2022, after MViTv2) adds to each attention logit a decomposed relative position
bias computed from the *unscaled* query ``q_i`` of token ``i = (h_i, w_i)``:

    logits[i, j] = scale * q_i . k_j + q_i . R_h[h_i - h_j] + q_i . R_w[w_i - w_j]
    out_i = softmax_j(logits[i, :]) @ v

with the tables ``R_h``, ``R_w`` linearly resampled to ``2 * max(q_size, k_size) - 1`` rows when
the grid differs from the one they were made for. Window blocks zero-pad the normalized tokens to
multiples of the window and attend within each window (padding tokens included), global blocks
attend over the whole grid.

Written here the straightforward way (logits as one tensor, bias added by broadcasting, softmax,
times ``v``), over the *same parameters* as our ``VisionTransformer``: ``PlainViTDet(vit)`` holds
the ViT and only computes the blocks differently. ``plain_pyramid(pyramid)`` is a detection
``SimpleFeaturePyramid`` sharing every module with ``pyramid`` except that its ``net`` runs the
plain formulation.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def gathered_rel_table(table: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """The table entry of each (query, key) coordinate pair along one axis: ``[q_size, k_size, C]``.

    ``table`` is ``[2S-1, C]`` (offset ``d`` of a grid of side ``S`` at row ``d + S - 1``); it is first
    resampled linearly to ``2 * max(q_size, k_size) - 1`` rows, and coordinates of the shorter side
    are stretched to the longer one (ViTDet's ``get_rel_pos``).
    """
    rows = 2 * max(q_size, k_size) - 1
    if table.shape[0] != rows:
        table = F.interpolate(table.float().t()[None], size=rows, mode="linear")[0].t().to(table.dtype)
    q_stretch, k_stretch = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    q_pos = torch.arange(q_size, device=table.device).float()[:, None] * q_stretch
    k_pos = torch.arange(k_size, device=table.device).float()[None, :] * k_stretch
    return table[(q_pos - k_pos + (k_size - 1) * k_stretch).long()]


def plain_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ViTDet's attention with the parameters of our ``Attention`` module ``attn``.

    Args:
        x: [B, H, W, D] tokens of a grid (a window or the whole map).
    Returns:
        [B, H, W, D].
    """
    b, h, w, d = x.shape
    n, heads = h * w, attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * heads, n, -1).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # [B*heads, N, N]
    if attn.use_rel_pos:
        table_h = gathered_rel_table(attn.rel_pos_h, h, h)  # [H, H, C]
        table_w = gathered_rel_table(attn.rel_pos_w, w, w)  # [W, W, C]
        q_grid = q.reshape(b * heads, h, w, -1)
        bias_h = torch.einsum("bhwc,hkc->bhwk", q_grid, table_h)  # [B*heads, H, W, H]
        bias_w = torch.einsum("bhwc,wkc->bhwk", q_grid, table_w)  # [B*heads, H, W, W]
        logits = logits.view(b * heads, h, w, h, w) + bias_h[:, :, :, :, None] + bias_w[:, :, :, None, :]
        logits = logits.view(b * heads, n, n)
    out = logits.softmax(dim=-1) @ v  # [B*heads, N, C]
    out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, d)
    return attn.proj(out)


def plain_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One ViTDet block with the parameters of our ``Block`` ``blk``: [B, H, W, D] -> [B, H, W, D]."""
    shortcut = x
    x = blk.norm1(x)
    size = blk.window_size
    if size:
        b, h, w, d = x.shape
        pad_h, pad_w = -h % size, -w % size
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        x = x.view(b, hp // size, size, wp // size, size, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, size, size, d)
        x = plain_attention(blk.attn, x)
        x = x.view(b, hp // size, wp // size, size, size, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, d)
        x = x[:, :h, :w]
    else:
        x = plain_attention(blk.attn, x)
    x = shortcut + blk.drop_path(blk.ls1(x))
    return x + blk.drop_path(blk.ls2(blk.mlp(blk.norm2(x))))


class PlainViTDet(nn.Module):
    """Our ViT's weights run by the plain ViTDet formulation, as a dense backbone (no class token).

    ``forward_intermediates(x, [depth - 1])`` (what ``SimpleFeaturePyramid`` calls):
    ``[B, 3, H, W]`` -> ``[[B, D, H/16, W/16]]``, the map after the last block.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.depth, self.embed_dim, self.patch_size = vit.depth, vit.embed_dim, vit.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D, H/16, W/16]."""
        tokens, (h, w) = self.vit.prepare_tokens(x, keep_cls=False)
        tokens = tokens.view(x.shape[0], h, w, -1)
        for blk in self.vit.blocks:
            tokens = plain_block(blk, tokens)
        return tokens.permute(0, 3, 1, 2).contiguous()

    def forward_intermediates(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        if list(indices) != [self.depth - 1]:
            raise ValueError(f"the plain reference gives the last block's map only, not {indices}")
        return [self.forward(x)]


def plain_pyramid(pyramid: nn.Module) -> nn.Module:
    """A ``SimpleFeaturePyramid`` sharing all modules of ``pyramid``, its ViT run by ``PlainViTDet``."""
    ref = copy.copy(pyramid)
    ref._modules = dict(pyramid._modules)  # a new module table; the modules themselves are shared
    ref.net = PlainViTDet(pyramid.net)
    return ref


def hf_vitdet_backbone(vit: nn.Module, img_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    """``transformers.VitDetBackbone`` with our ViT's weights (``hf-vitdet`` writer), the last map out.

    ``vit`` is a detection ViT (``prepare_vit``: no class token); its global blocks are those whose
    ``window_size`` is 0.
    """
    import transformers

    from mae_backbone.formats import write_hf_vitdet

    blocks = list(vit.blocks)
    windows = [i for i, blk in enumerate(blocks) if blk.window_size]
    config = transformers.VitDetConfig(
        hidden_size=vit.embed_dim, num_hidden_layers=len(blocks), num_attention_heads=blocks[0].attn.num_heads,
        mlp_ratio=blocks[0].mlp.fc1.out_features // vit.embed_dim, patch_size=vit.patch_size, image_size=img_size,
        pretrain_image_size=vit.pos_grid_size[0] * vit.patch_size,
        window_size=blocks[windows[0]].window_size if windows else 0, window_block_indices=windows,
        residual_block_indices=[], use_relative_position_embeddings=blocks[0].attn.use_rel_pos,
        use_absolute_position_embeddings=True, qkv_bias=blocks[0].attn.qkv.bias is not None,
        layer_norm_eps=blocks[0].norm1.eps, hidden_act="gelu", drop_path_rate=drop_path_rate, dropout_prob=0.0,
        out_features=[f"stage{len(blocks)}"])
    hf = transformers.VitDetBackbone(config)
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith(("norm.", "fc_norm.", "head."))}
    hf.load_state_dict(write_hf_vitdet(state, {}), strict=True)
    return hf
