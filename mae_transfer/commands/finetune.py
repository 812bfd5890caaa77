"""``mae-transfer finetune`` and ``mae-transfer linprobe``: the classification protocols
(``classification.train``), and ``--eval`` of a classifier checkpoint.

``finetune`` is end-to-end fine-tuning, or partial fine-tuning with ``--tune-blocks K|mlp``;
``linprobe`` is the same trainer with a frozen backbone and a BatchNorm + linear head.  Both run
as one process or under ``torchrun`` (one process per device).
"""
from __future__ import annotations

import argparse
import json

DESCRIPTIONS = {
    "finetune": "Fine-tune a ViT checkpoint (any format mae_backbone reads) on class folders DATA/train, "
                "DATA/val with the MAE recipe: AdamW, layer-wise lr decay, cosine + warmup, drop path, "
                "RandAug, mixup/cutmix, label smoothing, random erasing, global pooling. --tune-blocks K "
                "(or mlp) is the paper's partial fine-tuning. Options left at 'recipe' follow the paper for "
                "the architecture (ViT-B: 100 ep, blr 5e-4, layer decay 0.65; L/H: 50 ep, 1e-3, 0.75). "
                "Resumes from OUTPUT/checkpoint.pth. --eval evaluates --checkpoint only.",
    "linprobe": "Linear probing: frozen backbone, BatchNorm (no affine) + linear head on the class token, "
                "LARS, base lr 0.1, no weight decay, 90 epochs (the paper's protocol). "
                "Resumes from OUTPUT/checkpoint.pth. --eval evaluates --checkpoint only.",
}
HELP = {
    "finetune": "fine-tune (full or partial, --tune-blocks) a ViT checkpoint on class folders",
    "linprobe": "linear-probe a frozen ViT checkpoint on class folders",
}


def run(args: argparse.Namespace) -> int:
    from classification.config import config_from_args
    from classification.train import evaluate_checkpoint, train
    from training.cli import run_command

    protocol = args.command

    def body(cfg, main_process: bool) -> None:
        if cfg.eval:
            metrics = evaluate_checkpoint(cfg)
            if main_process:
                print(json.dumps(metrics, indent=2))
            return
        result = train(cfg)
        if main_process:
            best = result.best or {}
            print(f"{protocol}: {result.epochs_done} epochs ({result.steps} steps) in {result.output}; {result.freeze}")
            if best:
                print(f"  best val top-1 {best['top1']:.2f} top-5 {best['top5']:.2f} (epoch {best['epoch']})")
            print(f"  classifier: {result.model}")
            print(f"  resumable checkpoint: {result.checkpoint}")

    return run_command(f"mae-transfer {protocol}", lambda: config_from_args(args, protocol), body,
                       debug=args.debug)


def register(sub: argparse._SubParsersAction) -> None:
    from classification.config import add_arguments

    for protocol in ("finetune", "linprobe"):
        p = sub.add_parser(protocol, help=HELP[protocol], description=DESCRIPTIONS[protocol])
        add_arguments(p, protocol)
        p.set_defaults(func=run)
