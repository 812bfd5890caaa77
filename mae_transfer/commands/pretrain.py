"""``mae-transfer pretrain``: MAE pretraining (``pretrain.train``) from flags and/or a config file;
``--method mocov3`` / ``supervised`` pretrain the controlled baselines with the same options
(``mae_transfer.baselines.train_baseline``).

Runs as one process, or under ``torchrun`` with one process per device on one or many nodes.
"""
from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from mae_transfer.baselines import train_baseline
    from pretrain import config_from_args
    from training.cli import run_command

    def body(cfg, main_process: bool) -> None:
        result = train_baseline(cfg)
        if main_process:
            print(f"pretrained ({cfg.method}) {result.epochs_done} epochs ({result.steps} steps) in {result.output}")
            print(f"  full checkpoint (resume, visualize): {result.checkpoint}")
            print(f"  encoder for downstream tasks:        {result.encoder}")

    return run_command("mae-transfer pretrain", lambda: config_from_args(args), body, debug=args.debug)


def register(sub: argparse._SubParsersAction) -> None:
    from pretrain import add_arguments

    p = sub.add_parser(
        "pretrain",
        help="MAE pretraining (or a MoCo v3 / supervised baseline) on a folder or list of images",
        description="MAE pretraining. Defaults are the paper's recipe; every option is also a key "
        "of --config (YAML/JSON). --method mocov3 / supervised trains a baseline encoder with the same "
        "budget (supervised: DATA holds train/ and val/ class folders). Resumes automatically from OUTPUT/checkpoint.pth. "
        "Multi-process: torchrun --nproc_per_node N -m mae_transfer pretrain ...",
    )
    add_arguments(p)
    p.set_defaults(func=run)
