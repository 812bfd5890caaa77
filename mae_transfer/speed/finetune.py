"""Part ``finetune``: one fine-tuning step as ``mae-transfer finetune`` runs it vs timm's ViT-B.

The recipe on both sides: ViT-B/16, global average pooling, drop path 0.1, timm ``Mixup`` (mixup
0.8, cutmix 1.0, label smoothing 0.1: the recipe's values, from ``classification.config``) with
``SoftTargetCrossEntropy``, AdamW with weight decay 0.05; 1000 classes.

Ours (key ``finetune``) is the CLI's step itself: ``classification.models.build_classifier``,
``classification.optim.build_optimizer`` (layer decay), the fast path the run chooses
(``training.fastpath.fast_path``, for a long run: see ``mae_transfer.speed.pretrain``) and one
optimizer step of the shared loop with ``classification.engine.ClassifierStep`` (mixup, autocast,
the non-finite guard).
The baseline is timm's ``vit_base_patch16_224(global_pool="avg", drop_path_rate=0.1)`` with the same
``Mixup`` and criterion, ``torch.optim.AdamW`` (default implementation; no decay on 1-D parameters),
``torch.autocast`` for bf16.  Both see the same images and labels.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Iterable

import torch
from torch import nn

from mae_transfer.speed.harness import Case, Report, interleave, loop_step, profile_step

NUM_CLASSES = 1000
ARCHS = {"base": ("vit_base_patch16", "vit_base_patch16_224"), "large": ("vit_large_patch16", "vit_large_patch16_224")}


def _config(args: argparse.Namespace, precision: str) -> Any:
    from classification.config import make_config

    arch = ARCHS[args.model][0]
    return make_config("finetune", {"data": ".", "output": ".", "model": arch, "img_size": args.img_size,
                                    "precision": precision, "batch_size": args.batch}).resolve(arch)


def cli_step(args: argparse.Namespace, precision: str, device: torch.device, batches: Iterable[dict[str, Any]],
             ) -> tuple[Callable[[], float], nn.Module, str]:
    """One optimizer step as ``mae-transfer finetune`` takes it: (the step, the model, the fast path's line)."""
    from classification.data import build_criterion, build_mixup
    from classification.engine import ClassifierStep
    from classification.models import build_classifier
    from classification.optim import build_optimizer
    from training.fastpath import COMPILE_MIN_STEPS as LONG_RUN  # the step of a real (long) run
    from training.fastpath import fast_path
    from training.precision import AMP_DTYPES

    cfg = _config(args, precision)
    torch.manual_seed(0)
    model = build_classifier(cfg.model, NUM_CLASSES, "finetune", global_pool=cfg.global_pool, img_size=cfg.img_size,
                             drop_path=cfg.drop_path).to(device)
    lr = cfg.blr * args.batch / 256
    optimizer = build_optimizer(model, "finetune", lr, cfg.weight_decay, cfg.layer_decay)
    fast = fast_path(model, precision, device, cfg.working_weights, cfg.compile, LONG_RUN, cpu_measured=False)
    mixup = build_mixup(cfg, NUM_CLASSES)
    recipe = ClassifierStep(criterion=build_criterion(cfg, mixup), lr_at=lambda step: lr, accum_iter=1, mixup=mixup,
                            amp_dtype=AMP_DTYPES[precision], clip_grad=cfg.clip_grad, ema=None,
                            max_nonfinite=cfg.max_nonfinite, log_every=10**9, epochs=1)
    return loop_step(fast, batches, optimizer, recipe, device), model, fast.describe()


def timm_step(args: argparse.Namespace, precision: str, device: torch.device, images: torch.Tensor,
              targets: torch.Tensor) -> tuple[Callable[[], float], nn.Module]:
    """timm's ViT under the same recipe, with torch's AdamW and autocast."""
    import timm
    from classification.data import build_criterion, build_mixup

    cfg = _config(args, precision)
    torch.manual_seed(0)
    model = timm.create_model(ARCHS[args.model][1], pretrained=False, num_classes=NUM_CLASSES, global_pool="avg",
                              drop_path_rate=cfg.drop_path, img_size=args.img_size).to(device).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    lr = cfg.blr * args.batch / 256
    groups = [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=cfg.weight_decay)]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    mixup = build_mixup(cfg, NUM_CLASSES)
    criterion = build_criterion(cfg, mixup)
    amp = precision == "bf16"

    def step() -> float:
        x, y = mixup(images.to(device), targets.to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, model


def run(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """Time the CLI's fine-tuning step against timm's for each of ``args.precisions``."""
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    targets = torch.randint(0, NUM_CLASSES, (args.batch,))
    batch = {"images": images, "targets": targets, "failures": []}
    for precision in args.precisions:
        ours_run, ours_model, how = cli_step(args, precision, device, _Repeat(batch))
        base_run, base_model = timm_step(args, precision, device, images, targets)
        cases = [Case("ours (CLI)", ours_run, args.batch, precision), Case("timm ViT", base_run, args.batch, precision)]
        interleave(cases, args.steps, args.warmup, device)
        report.add(f"finetune {args.model}", cases[0], cases[1], note=how, key="finetune")
        if args.profile:
            for case in cases:
                profile_step(case)
        del ours_model, base_model, cases


class _Repeat:
    """An endless iterable of the same micro-batch (what ``train_one_epoch`` draws from)."""

    def __init__(self, batch: dict[str, Any]):
        self.batch = batch

    def __iter__(self) -> "_Repeat":
        return self

    def __next__(self) -> dict[str, Any]:
        return self.batch
