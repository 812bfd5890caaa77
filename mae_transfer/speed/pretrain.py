"""Part ``pretrain``: one MAE pretraining step of ours vs HF ``transformers``' ``ViTMAEForPreTraining``.

Both are configured identically (ViT-B/16 or ViT-L/16, decoder 8 x 512, mask 0.75, norm-pix,
AdamW(0.9, 0.95), the same ``noise`` so the same masks), fp32 and bf16 autocast.  A step is mask
noise, forward with the norm-pixel loss, backward, AdamW.  Ours uses the fused AdamW and, in bf16,
bf16 working copies of the matmul weights (``pretrain.optim.LowPrecisionWeights``); the
``ours-autocast`` row is our plain bf16 path.  HF gets ``torch.optim.AdamW`` with its defaults, as
its Trainer does.  Needs ``transformers`` (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

import torch

from mae_transfer.speed.harness import Case, Report, interleave, profile_step

SIZES = {  # name -> (embed_dim, depth, heads)
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def _hf_mae(size: str, img_size: int, norm_eps: float) -> Any:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    dim, depth, heads = SIZES[size]
    cfg = ViTMAEConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                       intermediate_size=4 * dim, hidden_act="gelu", layer_norm_eps=norm_eps,
                       image_size=img_size, patch_size=16, num_channels=3, qkv_bias=True,
                       decoder_num_attention_heads=16, decoder_hidden_size=512, decoder_num_hidden_layers=8,
                       decoder_intermediate_size=2048, mask_ratio=0.75, norm_pix_loss=True,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return ViTMAEForPreTraining(cfg)


def _hf_adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """torch's AdamW with its default implementation; MAE's betas and no-decay rule."""
    skip = ("position_embeddings", "cls_token", "mask_token")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or any(s in name for s in skip) else decay).append(p)
    return torch.optim.AdamW([dict(params=decay, weight_decay=0.05), dict(params=no_decay, weight_decay=0.0)],
                             lr=lr, betas=(0.9, 0.95))


def run(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """Time ours against HF ViTMAE for each of ``args.precisions`` on ``[args.batch, 3, img, img]``."""
    from pretrain.model import create_mae
    from pretrain.optim import LowPrecisionWeights, build_optimizer

    name = {"base": "mae_vit_base_patch16", "large": "mae_vit_large_patch16"}[args.model]
    lr = 1.5e-4 * args.batch / 256
    torch.manual_seed(0)
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    num = (args.img_size // 16) ** 2
    gen = torch.Generator().manual_seed(0)
    noises = [torch.rand(args.batch, num, generator=gen).to(device) for _ in range(4)]
    counter = [0]

    def noise() -> torch.Tensor:  # same sequence of masks for every case
        counter[0] += 1
        return noises[counter[0] % len(noises)]

    def ours_step(model: torch.nn.Module, opt: Any, amp: bool) -> Callable[[], float]:
        def step() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _, _ = model(imgs, 0.75, noise=noise())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    def hf_step(model: torch.nn.Module, opt: Any, amp: bool) -> Callable[[], float]:
        def step() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model(pixel_values=imgs, noise=noise()).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step

    for precision in args.precisions:
        amp = precision == "bf16"
        torch.manual_seed(0)
        ours = create_mae(name, img_size=args.img_size, target="norm_pixel").to(device).train()
        hf = _hf_mae(args.model, args.img_size, 1e-6).to(device).train()
        cases = []
        if amp:
            plain = copy.deepcopy(ours)
            fast = LowPrecisionWeights(ours, lambda m: build_optimizer(m, lr, 0.05))
            cases.append(Case("ours", ours_step(ours, fast, True), args.batch, precision))
            cases.append(Case("ours-autocast", ours_step(plain, build_optimizer(plain, lr, 0.05), True),
                              args.batch, precision))
        else:
            cases.append(Case("ours", ours_step(ours, build_optimizer(ours, lr, 0.05), False), args.batch, precision))
        cases.append(Case("HF ViTMAE", hf_step(hf, _hf_adamw(hf, lr), amp), args.batch, precision))
        interleave(cases, args.steps, args.warmup, device)
        for case in cases[:-1]:
            report.add(f"pretrain {args.model}", case, cases[-1])
        if args.profile:
            for case in (cases[0], cases[-1]):
                profile_step(case)
        del ours, hf, cases
