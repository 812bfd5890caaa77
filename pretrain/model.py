"""The masked autoencoder: the ``mae_backbone`` ViT encoder plus MAE's light decoder.

The stages are named as in the paper and the official ``models_mae.py``: ``patchify`` /
``unpatchify``, ``random_masking``, ``forward_encoder``, ``forward_decoder``, ``forward_loss``.

``MaskedAutoencoderViT`` *is* a ``VisionTransformer`` (the encoder's parameters keep their plain
names) with the decoder added beside it, so the state dict has exactly the official key names:
``patch_embed.*``, ``cls_token``, ``pos_embed``, ``blocks.*``, ``norm.*`` (encoder) and
``decoder_embed.*``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.*``,
``decoder_norm.*``, ``decoder_pred.*`` (decoder).  An official pretrain checkpoint's ``"model"``
loads with ``strict=True``.

The paper's "w/ [M]" baseline (``encoder_mask_tokens=True``): the encoder sees all L patches,
masked ones replaced by a learned ``encoder_mask_token`` [1, 1, D] (then the position embedding is
added); the decoder gets all L tokens and has no ``mask_token`` of its own.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mae_backbone import VIT_ARCHS, Block, VisionTransformer, sincos_2d_pos_embed
from pretrain.masking import MASKINGS, check_masking, mask_noise, num_keep

TARGETS = ("pixel", "norm_pixel")
DECODER_DEFAULTS: dict[str, int] = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

# name -> encoder architecture (mae_backbone.VIT_ARCHS); every size gets the 8 x 512 decoder
MAE_ARCHS: dict[str, str] = {
    "mae_vit_tiny_patch16": "vit_tiny_patch16",
    "mae_vit_small_patch16": "vit_small_patch16",
    "mae_vit_base_patch16": "vit_base_patch16",
    "mae_vit_large_patch16": "vit_large_patch16",
    "mae_vit_huge_patch14": "vit_huge_patch14",
}

_TOKEN_KEYS = ("mask_token", "encoder_mask_token")

# encoder options that make no sense for pretraining (dense-task / fine-tuning options)
_REJECTED = ("num_classes", "global_pool", "window_size", "global_blocks", "rel_pos", "dense_cls",
             "pos_embed_learnable")


class MaskedAutoencoderViT(VisionTransformer):
    """MAE with a ViT encoder that sees only the visible patches and a light decoder.

    Args:
        encoder: ``mae_backbone.VIT_ARCHS`` name of the encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder width / blocks / heads.
        decoder_mlp_ratio: decoder MLP expansion.
        target: ``norm_pixel`` (each patch normalized by its own mean and std; the paper's
            recipe) or ``pixel``.
        masking: the kind used when ``forward`` gets no ``noise`` (see ``pretrain.masking``).
        encoder_mask_tokens: the "w/ [M]" baseline (see the module docstring).
        **encoder_overrides: ``VisionTransformer`` arguments (``img_size``, ``patch_size``,
            ``depth``, ``embed_dim``, ``num_heads``, ``grad_checkpointing`` ...).
    """

    def __init__(
        self,
        encoder: str = "vit_base_patch16",
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        target: str = "norm_pixel",
        masking: str = "random",
        encoder_mask_tokens: bool = False,
        **encoder_overrides: Any,
    ):
        if encoder not in VIT_ARCHS:
            raise KeyError(f"unknown encoder {encoder!r}; known: {', '.join(VIT_ARCHS)}")
        bad = sorted(set(encoder_overrides) & set(_REJECTED))
        if bad:
            raise ValueError(f"{', '.join(bad)}: not an option of the pretraining encoder")
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
        if masking not in MASKINGS:
            raise ValueError(f"unknown masking {masking!r}; choose one of {', '.join(MASKINGS)}")
        kwargs: dict[str, Any] = dict(VIT_ARCHS[encoder])
        kwargs.update(encoder_overrides)
        super().__init__(**kwargs)  # the encoder, initialized as in MAE
        self.encoder_name = encoder
        self.encoder_overrides = dict(encoder_overrides)
        self.target = target
        self.masking = masking
        self.encoder_mask_tokens = encoder_mask_tokens
        norm_eps = kwargs.get("norm_eps", 1e-6)
        num_patches = self.grid_size[0] * self.grid_size[1]

        if encoder_mask_tokens:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim)
        if not encoder_mask_tokens:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d_pos_embed(decoder_embed_dim, self.grid_size, cls_token=True).unsqueeze(0),
            requires_grad=False,
        )
        assert self.decoder_pos_embed.shape[1] == num_patches + 1
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_eps=norm_eps)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans)
        self.decoder_depth = decoder_depth
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_num_heads = decoder_num_heads
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's initialization of the added parameters: N(0, .02) tokens, xavier linears."""
        for name in ("mask_token", "encoder_mask_token"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ hooks
    def no_weight_decay(self) -> set[str]:
        """Names without weight decay besides norms and biases (all 1-D parameters): none.

        As the official ``main_pretrain.py`` (timm's ``param_groups_weight_decay`` without a skip
        list): the class and mask tokens ([1, 1, D]) are decayed; the position embeddings are fixed
        sin-cos tables, outside the optimizer.
        """
        return set()

    def decoder_keys(self) -> list[str]:
        """State-dict keys that are not part of the plain ViT encoder (decoder and mask tokens)."""
        return [k for k in self.state_dict() if k.startswith("decoder_") or k in _TOKEN_KEYS]

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights alone, loadable by ``create_vit(encoder_name, **overrides)``."""
        drop = set(self.decoder_keys())
        return {k: v for k, v in self.state_dict().items() if k not in drop}

    # ------------------------------------------------------------------ stages
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> [N, L, p*p*C], patches row-major, pixels ordered (p, q, c)."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        if h % p or w % p:
            raise ValueError(f"image {h}x{w} is not a multiple of the patch size {p}")
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x: [N, L, p*p*C] -> [N, C, H, W] (inverse of ``patchify``; ``grid`` defaults to the model's)."""
        p = self.patch_size
        gh, gw = grid or self.grid_size
        n, num, dim = x.shape
        c = dim // (p * p)
        if num != gh * gw or c * p * p != dim:
            raise ValueError(f"cannot unpatchify [{n}, {num}, {dim}] to a {gh}x{gw} grid of {p}-px patches")
        x = x.reshape(n, gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, gh * p, gw * p)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample shuffle by ``argsort(noise)``; keep the first ``int(L * (1 - mask_ratio))``.

        Args:
            x: [N, L, D] patch tokens.
            mask_ratio: fraction removed.
            noise: [N, L]; default: drawn for ``self.masking`` from torch's global generator.
        Returns:
            x_kept [N, len_keep, D], mask [N, L] (1 = removed), ids_restore [N, L],
            ids_keep [N, len_keep].
        """
        n, num, d = x.shape
        len_keep = num_keep(num, mask_ratio)
        if noise is None:
            noise = mask_noise(self.masking, self.grid_size, mask_ratio, batch=n, device=x.device)
        elif noise.shape != (n, num):
            raise ValueError(f"noise must be [{n}, {num}], got {list(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, num, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore, ids_keep

    def _check_size(self, imgs: torch.Tensor) -> None:
        if tuple(imgs.shape[-2:]) != tuple(self.img_size):
            raise ValueError(
                f"MAE pretraining works at its image size {self.img_size[0]}x{self.img_size[1]}, "
                f"got {imgs.shape[-2]}x{imgs.shape[-1]}"
            )

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, C, H, W] -> latent [N, 1+len_keep, D] (or [N, 1+L, D] w/ [M]), mask [N, L], ids_restore [N, L]."""
        self._check_size(imgs)
        x, hw = self.patch_embed(imgs)  # [N, L, D]
        pos = self.pos_embed
        if self.encoder_mask_tokens:
            _, mask, ids_restore, _ = self.random_masking(x, mask_ratio, noise)
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.encoder_mask_token.to(x.dtype) * w
            x = x + pos[:, 1:]
        else:
            x = x + pos[:, 1:]
            x, mask, ids_restore, _ = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for i in range(self.depth):
            x = self.run_block(i, x, hw, 1)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: [N, 1+len_keep, D] -> pred [N, L, p*p*C] for every patch (class token dropped)."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        if not self.encoder_mask_tokens:
            n, k1, dd = x.shape
            num = ids_restore.shape[1]
            mask_tokens = self.mask_token.to(x.dtype).expand(n, num + 1 - k1, dd)
            x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, Dd] in shuffled order
            x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dd))  # unshuffle
            x = torch.cat([x[:, :1], x_], dim=1)
        x = x + self.decoder_pos_embed
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.decoder_blocks:
            x = checkpoint(blk, x, self.grid_size, 1, use_reentrant=False) if use_ckpt else blk(x, self.grid_size, 1)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def patch_target(self, imgs: torch.Tensor) -> torch.Tensor:
        """The regression target [N, L, p*p*C]: pixels, or per-patch normalized pixels."""
        target = self.patchify(imgs.float())
        if self.target == "norm_pixel":
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over removed patches of the per-patch MSE.

        Args:
            imgs: [N, C, H, W]; pred: [N, L, p*p*C]; mask: [N, L], 1 = removed.
        """
        loss = (pred.float() - self.patch_target(imgs)) ** 2
        loss = loss.mean(dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(  # type: ignore[override]
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, C, H, W] -> (loss [], pred [N, L, p*p*C], mask [N, L] with 1 = removed).

        ``noise`` [N, L] fixes the masks (same noise, same result); without it the masks are drawn
        for ``self.masking`` from torch's global generator.
        """
        check_masking(self.masking if noise is None else "random", mask_ratio, self.grid_size)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this model: ``MaskedAutoencoderViT(**model.config())``."""
        return dict(
            encoder=self.encoder_name,
            decoder_embed_dim=self.decoder_embed_dim,
            decoder_depth=self.decoder_depth,
            decoder_num_heads=self.decoder_num_heads,
            target=self.target,
            masking=self.masking,
            encoder_mask_tokens=self.encoder_mask_tokens,
            **self.encoder_overrides,
        )


def list_mae_models() -> list[str]:
    """The registered MAE names."""
    return list(MAE_ARCHS)


def create_mae(name: str, **overrides: Any) -> MaskedAutoencoderViT:
    """Build a registered MAE, e.g. ``create_mae("mae_vit_base_patch16", target="pixel")``.

    Decoder defaults: 8 blocks x 512 wide, 16 heads.  ``overrides`` may change any argument of
    ``MaskedAutoencoderViT`` (decoder size, target, masking, encoder_mask_tokens) or of the
    encoder (``img_size``, ``depth``, ``patch_size`` ...).
    """
    if name not in MAE_ARCHS:
        import difflib

        close = difflib.get_close_matches(name, MAE_ARCHS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown MAE model {name!r}{hint} (known: {', '.join(MAE_ARCHS)})")
    kwargs: dict[str, Any] = dict(DECODER_DEFAULTS)
    kwargs.update(overrides)
    return MaskedAutoencoderViT(encoder=MAE_ARCHS[name], **kwargs)
