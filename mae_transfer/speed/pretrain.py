"""Part ``pretrain``: one MAE pretraining step as ``mae-transfer pretrain`` runs it vs the official-style step.

Ours is the CLI's step itself: the model ``pretrain.train.build_model`` makes, its optimizer
(``pretrain.optim.build_optimizer``: fused AdamW), the fast path the run chooses
(``training.fastpath.fast_path``: in bf16 the bf16 working weights; compiled where ``--compile auto``
compiles a long run: with CUDA, and on the CPU in bf16; the compilation is in the warm-up, not
timed) and one optimizer step of the shared loop (``training.loop.train_one_epoch``:
autocast, the non-finite guard, the schedule), on a micro-batch of ``pretrain.data.collate``'s form.

The baseline (key ``pretrain``) is the official MAE's ``models_mae`` step, rebuilt here from timm's
``PatchEmbed`` and ``Block``: fixed sin-cos position embeddings, per-sample masking by argsort of
noise, the 8 x 512 decoder, the norm-pixel loss, ``torch.optim.AdamW`` with its default
implementation over ``main_pretrain.py``'s parameter groups (no decay on 1-D parameters and
biases), betas (0.9, 0.95), ``torch.autocast`` for bf16.  Both get the same images and the same
noise (so the same masks).  HF ``transformers``' ``ViTMAEForPreTraining`` is an extra, unkeyed row
when ``transformers`` is installed.
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import Any, Callable, Iterable

import torch
from torch import nn

from mae_transfer.speed.harness import Case, Report, interleave, loop_step, profile_step

SIZES = {  # name -> (embed_dim, depth, heads)
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
MASK_RATIO = 0.75


class OfficialStyleMAE(nn.Module):
    """The official ``models_mae.MaskedAutoencoderViT`` structure, on timm's blocks (the baseline).

    Args:
        img_size, patch_size, embed_dim, depth, num_heads: the encoder.
        decoder_dim, decoder_depth, decoder_heads: the decoder (MAE: 512 / 8 / 16).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16):
        super().__init__()
        from functools import partial

        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        from mae_backbone import sincos_2d_pos_embed

        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d_pos_embed(embed_dim, grid, cls_token=True)[None], requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d_pos_embed(decoder_dim, grid, cls_token=True)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                            for _ in range(decoder_depth))
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * 3)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, L, p*p*3]."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep the ``L * (1 - ratio)`` patches of lowest noise: (x kept, mask [N, L], ids_restore)."""
        n, num, d = x.shape
        keep = int(num * (1 - MASK_RATIO))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(n, num, device=x.device)
        mask[:, :keep] = 0
        return x, torch.gather(mask, 1, ids_restore), ids_restore

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """imgs [N, 3, H, W], noise [N, L] -> the mean loss over the removed patches."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        n, k1, d = x.shape
        tokens = self.mask_token.expand(n, ids_restore.shape[1] + 1 - k1, d)
        rest = torch.cat([x[:, 1:], tokens.to(x.dtype)], dim=1)
        rest = torch.gather(rest, 1, ids_restore[..., None].expand(-1, -1, d))
        x = torch.cat([x[:, :1], rest], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        target = self.patchify(imgs)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


def official_adamw(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.Optimizer:
    """``main_pretrain.py``'s optimizer: torch's AdamW (default implementation), betas (0.9, 0.95),
    no weight decay on 1-D parameters and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW([dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)],
                             lr=lr, betas=(0.9, 0.95))


def _hf_mae(size: str, img_size: int) -> Any:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    dim, depth, heads = SIZES[size]
    cfg = ViTMAEConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                       intermediate_size=4 * dim, hidden_act="gelu", layer_norm_eps=1e-6,
                       image_size=img_size, patch_size=16, num_channels=3, qkv_bias=True,
                       decoder_num_attention_heads=16, decoder_hidden_size=512, decoder_num_hidden_layers=8,
                       decoder_intermediate_size=2048, mask_ratio=MASK_RATIO, norm_pix_loss=True,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return ViTMAEForPreTraining(cfg)


def cli_step(args: argparse.Namespace, precision: str, device: torch.device, batches: Iterable[dict[str, Any]],
             **options: Any) -> tuple[Callable[[], float], nn.Module, str]:
    """One optimizer step exactly as ``mae-transfer pretrain`` takes it (its model, optimizer, fast
    path and loop; ``options``: other ``mae-transfer pretrain`` options): (the step, the model, the fast
    path's start-up line)."""
    from pretrain.config import make_config
    from pretrain.engine import MaeStep
    from pretrain.optim import build_optimizer
    from pretrain.train import build_model
    from training.fastpath import COMPILE_MIN_STEPS as LONG_RUN  # the step of a real (long) run
    from training.fastpath import fast_path
    from training.precision import AMP_DTYPES

    name = {"base": "mae_vit_base_patch16", "large": "mae_vit_large_patch16"}[args.model]
    cfg = make_config({"data": ".", "output": ".", "model": name, "img_size": args.img_size,
                       "mask_ratio": MASK_RATIO, "precision": precision, "batch_size": args.batch, **options})
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    lr = 1.5e-4 * args.batch / 256
    optimizer = build_optimizer(model, lr, cfg.weight_decay)
    fast = fast_path(model, precision, device, cfg.working_weights, cfg.compile, LONG_RUN, cpu_measured=True)
    recipe = MaeStep(mask_ratio=cfg.mask_ratio, masking=cfg.masking, grid=model.grid_size, lr_at=lambda step: lr,
                     accum_iter=1, amp_dtype=AMP_DTYPES[precision], clip_grad=cfg.clip_grad,
                     max_nonfinite=cfg.max_nonfinite, log_every=10**9, epochs=1)
    return loop_step(fast, batches, optimizer, recipe, device), model, fast.describe()


def run(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """Time the CLI's step against the official-style step (and HF's) for each of ``args.precisions``."""
    from pretrain.masking import mask_noise
    from training.data import mix_seed

    lr = 1.5e-4 * args.batch / 256
    torch.manual_seed(0)
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size)
    grid = (args.img_size // 16, args.img_size // 16)
    batches = [{"images": imgs, "seeds": [1000 * r + i for i in range(args.batch)], "failures": []} for r in range(4)]
    # the noise ours derives from each micro-batch's seeds (``MaeStep``), for the other sides
    noises = [mask_noise("random", grid, MASK_RATIO, seeds=[mix_seed(s, 1) for s in b["seeds"]]).to(device)
              for b in batches]
    turn = {"ours": 0, "base": 0, "hf": 0}
    imgs_dev = imgs.to(device)

    def next_index(side: str) -> int:  # each side walks the same sequence of micro-batches
        turn[side] += 1
        return turn[side] % len(batches)

    def baseline_step(model: nn.Module, opt: torch.optim.Optimizer, amp: bool, side: str) -> Callable[[], float]:
        def step() -> float:
            noise = noises[next_index(side)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                if side == "hf":
                    loss = model(pixel_values=imgs_dev, noise=noise).loss
                else:
                    loss = model(imgs_dev, noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    with_hf = importlib.util.find_spec("transformers") is not None
    dim, depth, heads = SIZES[args.model]
    for precision in args.precisions:
        amp = precision == "bf16"
        ours_run, ours_model, how = cli_step(args, precision, device, _Cycle(batches))
        torch.manual_seed(0)
        official = OfficialStyleMAE(args.img_size, 16, dim, depth, heads).to(device).train()
        cases = [Case("ours (CLI)", ours_run, args.batch, precision),
                 Case("official-style", baseline_step(official, official_adamw(official, lr), amp, "base"),
                      args.batch, precision)]
        hf = None
        if with_hf:
            torch.manual_seed(0)
            hf = _hf_mae(args.model, args.img_size).to(device).train()
            cases.append(Case("HF ViTMAE", baseline_step(hf, official_adamw(hf, lr), amp, "hf"), args.batch, precision))
        interleave(cases, args.steps, args.warmup, device)
        report.add(f"pretrain {args.model}", cases[0], cases[1], note=how, key="pretrain")
        if hf is not None:
            report.add(f"pretrain {args.model}", cases[0], cases[2], note="vs HF transformers")
        if args.profile:
            for case in cases[:2]:
                profile_step(case)
        del ours_model, official, hf, cases


class _Cycle:
    """An endless iterable over the same micro-batches (what ``train_one_epoch`` draws from)."""

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = batches
        self.i = 0

    def __iter__(self) -> "_Cycle":
        return self

    def __next__(self) -> dict[str, Any]:
        self.i += 1
        return self.batches[self.i % len(self.batches)]
