"""The one Vision Transformer of the toolkit, with MAE's defaults and the dense-task options.

Architecture names spell out their dimensions (``vit_base_patch16``: 768 wide, 12 deep, 12 heads)
and live in one registry, ``VIT_ARCHS``; ``create_vit(name, **overrides)`` builds them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mae_backbone.layers import Block, rel_pos_kind
from mae_backbone.pos_embed import _to_hw, resample_abs_pos_embed, sincos_2d_pos_embed

# name -> (embed_dim, depth, num_heads, patch_size)
VIT_ARCHS: dict[str, dict[str, int]] = {
    "vit_tiny_patch16": dict(embed_dim=192, depth=12, num_heads=3, patch_size=16),
    "vit_small_patch16": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "vit_base_patch16": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    "vit_large_patch16": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
    "vit_huge_patch14": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}


@dataclass(frozen=True)
class FeatureSpec:
    """What one output map is: channels and stride in pixels (Detectron2's ``ShapeSpec`` idea)."""

    channels: int
    stride: int


class PatchEmbed(nn.Module):
    """Image to patch tokens: [B, C, H, W] -> [B, H/p * W/p, D] (row-major), and the grid."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = x.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"input {h}x{w} is not a multiple of the patch size {p}; pad or resize it "
                "(Detectron2 / MMSeg adapters pad to the backbone's size divisibility)"
            )
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (h // p, w // p)


class VisionTransformer(nn.Module):
    """ViT encoder in the official MAE / timm state-dict layout.

    Args:
        img_size: the input size the model is made for (int or (H, W)): it sizes the absolute
            position embedding (unless ``pretrain_img_size`` is given) and the relative position
            tables of global blocks; other input sizes resample them on the fly.
        pretrain_img_size: keep the absolute position embedding at this (pretraining) size and
            interpolate it to the input's grid on every forward (bicubic, ``align_corners=False``,
            no anti-aliasing), as ViTDet does (``pretrain_img_size=224`` with ``img_size=1024``:
            ``pos_embed`` stays [1, 1+14*14, D]). None: the table is made for ``img_size``.
        patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the architecture.
        norm_eps: LayerNorm epsilon (1e-6 as in MAE).
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        global_pool: average the patch tokens and apply ``fc_norm`` (MAE fine-tuning), instead of
            the final ``norm`` and the class token.
        num_classes: size of the linear ``head``; 0 for none.
        pos_embed_learnable: train the position embedding (fine-tuning), else it stays the fixed
            sin-cos table (MAE pretraining).
        window_size: 0 (default) for global attention everywhere; else window attention of this
            many patches in every block not in ``global_blocks`` (ViTDet).
        global_blocks: block indices that keep global attention when windows are used.
        rel_pos: relative position bias in every block, zero-initialized: ``False``; ``True`` or
            ``"decomposed"`` (ViTDet's ``rel_pos_h`` / ``rel_pos_w``, sized by the window or by
            ``img_size`` in global blocks); ``"beit"`` (BEiT's per-block table with class-token
            entries, as MMSeg's ``MAE`` backbone; global attention only).
        init_values: layer scale (``blocks.i.ls1.gamma`` / ``ls2.gamma``, BEiT's ``gamma_1/2``)
            initialized to this value; None for none (MAE).
        grad_checkpointing: recompute block activations in backward (saves memory).
        dense_cls: whether the class token travels through the blocks in
            ``forward_intermediates``; default: yes with global attention (as in pretraining),
            no with windows (ViTDet), which cannot carry it.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        global_pool: bool = False,
        num_classes: int = 0,
        pos_embed_learnable: bool = False,
        window_size: int = 0,
        global_blocks: Iterable[int] = (),
        rel_pos: bool | str = False,
        grad_checkpointing: bool = False,
        dense_cls: bool | None = None,
        pretrain_img_size: int | Sequence[int] | None = None,
        init_values: float | None = None,
    ):
        super().__init__()
        self.img_size = _to_hw(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.window_size = window_size
        self.global_blocks = tuple(sorted(set(int(i) for i in global_blocks)))
        bad = [i for i in self.global_blocks if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_blocks {bad} out of range for depth {depth}")
        self.rel_pos = rel_pos_kind(rel_pos)
        self.grad_checkpointing = grad_checkpointing
        if dense_cls and window_size:
            raise ValueError("dense_cls=True cannot be combined with window attention")
        self.dense_cls = (window_size == 0) if dense_cls is None else bool(dense_cls)
        if self.rel_pos == "beit" and (window_size or not self.dense_cls):
            raise ValueError("rel_pos='beit' needs global attention with the class token in the blocks "
                             "(window_size=0, dense_cls not False); ViTDet's windows use rel_pos='decomposed'")
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.pretrain_img_size = self.img_size if pretrain_img_size is None else _to_hw(pretrain_img_size)
        self.pos_grid_size = (self.pretrain_img_size[0] // patch_size, self.pretrain_img_size[1] // patch_size)
        self.init_values = init_values

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            sincos_2d_pos_embed(embed_dim, self.pos_grid_size, cls_token=True).unsqueeze(0),
            requires_grad=pos_embed_learnable,
        )
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, as in timm
        blocks = []
        for i in range(depth):
            windowed = window_size > 0 and i not in self.global_blocks
            rel_size = (window_size if windowed else max(self.grid_size)) if self.rel_pos == "decomposed" else 0
            blocks.append(
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[i],
                    norm_eps=norm_eps,
                    window_size=window_size if windowed else 0,
                    rel_pos_size=rel_size,
                    rel_pos=self.rel_pos,
                    rel_pos_grid=self.grid_size,
                    init_values=init_values,
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.Identity() if global_pool else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if global_pool else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """MAE's initialization: xavier-uniform linears and patch projection, N(0, .02) tokens."""
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):  # MAE fine-tuning: small head init
            nn.init.trunc_normal_(self.head.weight, std=2e-5)

    # ------------------------------------------------------------------ hooks
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides norms and biases (timm's hook)."""
        return {"pos_embed", "cls_token"}

    def layer_id(self, name: str) -> int:
        """Layer index of a parameter for layer-wise lr decay.

        ``patch_embed`` / ``cls_token`` / ``pos_embed`` -> 0, ``blocks.i`` -> i + 1, everything
        after the blocks (norms, head) -> depth + 1.  Names may carry a prefix (``backbone.``).
        """
        parts = name.split(".")
        for j, part in enumerate(parts):
            if part in ("patch_embed", "cls_token", "pos_embed", "mask_token"):
                return 0
            if part == "blocks" and j + 1 < len(parts) and parts[j + 1].isdigit():
                return int(parts[j + 1]) + 1
        return self.depth + 1

    @property
    def num_layers(self) -> int:
        """Number of layer ids (``depth + 2``)."""
        return self.depth + 2

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter-group hook: stem, then one group per block, then the final norm."""
        return dict(
            stem=r"^cls_token|^pos_embed|^patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def output_shape(self, indices: Sequence[int] | None = None) -> dict[str, FeatureSpec]:
        """What ``forward_intermediates(x, indices)`` returns, by name ``blocks.i``."""
        idx = self._resolve_indices(indices)
        return {f"blocks.{i}": FeatureSpec(self.embed_dim, self.patch_size) for i in idx}

    # ------------------------------------------------------------------ forward
    def _resolve_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        if indices is None:
            return [self.depth - 1]
        if isinstance(indices, int):  # the last n blocks, as in timm
            return list(range(self.depth - indices, self.depth))
        out = [i + self.depth if i < 0 else int(i) for i in indices]
        bad = [i for i in out if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for depth {self.depth}")
        return out

    def pos_embed_for(self, hw: tuple[int, int]) -> torch.Tensor:
        """The position embedding [1, 1+H*W, D] for a patch grid, resampled from the table's grid
        (``pos_grid_size``) when it differs: bicubic, ``align_corners=False``, no anti-aliasing."""
        return resample_abs_pos_embed(self.pos_embed, hw, old_size=self.pos_grid_size)

    def prepare_tokens(self, x: torch.Tensor, keep_cls: bool = True) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch-embed and add position embeddings: [B, C, H, W] -> [B, (1+)L, D], grid."""
        x, hw = self.patch_embed(x)
        pos = self.pos_embed_for(hw)
        x = x + pos[:, 1:]
        if keep_cls:
            cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return x, hw

    def run_block(self, i: int, x: torch.Tensor, hw: tuple[int, int], num_prefix: int) -> torch.Tensor:
        blk = self.blocks[i]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, hw, num_prefix, use_reentrant=False)
        return blk(x, hw, num_prefix)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1+L, D]: all tokens after the blocks and the final ``norm``."""
        if self.window_size:
            raise ValueError("forward_features needs global attention; use forward_intermediates with windows")
        x, hw = self.prepare_tokens(x)
        for i in range(self.depth):
            x = self.run_block(i, x, hw, 1)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[B, 1+L, D] -> [B, num_classes] (or [B, D] with ``pre_logits``)."""
        x = x[:, 1:].mean(dim=1) if self.global_pool else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False
    ) -> list[torch.Tensor]:
        """Feature maps after chosen blocks, for dense tasks.

        Args:
            x: [B, C, H, W] with H, W multiples of the patch size.
            indices: block indices (negative counts from the end), or an int n for the last n.
            norm: apply the final ``norm`` to each map.
        Returns:
            one [B, D, H/p, W/p] map per index, in the order given.
        """
        idx = self._resolve_indices(indices)
        keep = self.dense_cls
        x, hw = self.prepare_tokens(x, keep_cls=keep)
        prefix = 1 if keep else 0
        wanted = {i: n for n, i in enumerate(idx)}
        outs: list[torch.Tensor | None] = [None] * len(idx)
        for i in range(max(idx) + 1):
            x = self.run_block(i, x, hw, prefix)
            if i in wanted:
                y = self.norm(x) if norm else x
                # contiguous NCHW: the view would be channels-last, which slows the CPU convolutions
                # of the necks / pyramids after it in fp32 (MMSeg's Feature2Pyramid: 1.8x)
                y = y[:, prefix:].transpose(1, 2).reshape(x.shape[0], self.embed_dim, *hw).contiguous()
                for n, j in enumerate(idx):
                    if j == i:
                        outs[n] = y
        return outs  # type: ignore[return-value]


def list_models() -> list[str]:
    """The registered architecture names."""
    return list(VIT_ARCHS)


def create_vit(name: str, **overrides: Any) -> VisionTransformer:
    """Build a registered ViT, e.g. ``create_vit("vit_base_patch16", num_classes=1000)``.

    Any ``VisionTransformer`` argument can be overridden (image size, patch size, in_chans,
    drop_path_rate, global_pool, num_classes, window_size, global_blocks, rel_pos, ...).
    """
    if name not in VIT_ARCHS:
        import difflib

        close = difflib.get_close_matches(name, VIT_ARCHS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown ViT {name!r}{hint} (known: {', '.join(VIT_ARCHS)})")
    kwargs: dict[str, Any] = dict(VIT_ARCHS[name])
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)
