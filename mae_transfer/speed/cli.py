"""One speed benchmark: ours against the libraries people would use instead, side by side.

Everything runs in this one process, on the same inputs and thread count; the two sides of each
comparison alternate repetition by repetition and medians are reported (``harness``).  One module
per part (``--parts``), run in this order: ``peak`` (the matmul peak, denominator of every "peak
fraction"), ``data``, ``pretrain``, ``finetune``, ``features``, ``detection``, ``segmentation``.

    mae-transfer bench-speed                                      # everything, CPU, 2 steps each
    mae-transfer bench-speed --parts peak pretrain --steps 3
    mae-transfer bench-speed --parts pretrain --model large --device cuda --batch 64
    python -m mae_transfer.speed --parts segmentation --seg-size 256   # the same, as a module

Needs ``transformers`` (the ``bench`` extra) for the pretraining part, timm for features,
detectron2 / mmseg for their parts.
"""
from __future__ import annotations

import argparse
import importlib

import torch

from mae_transfer.speed import harness
from mae_transfer.speed.pretrain import SIZES

PARTS = ("peak", "data", "pretrain", "finetune", "features", "detection", "segmentation")
# part -> module with ``run(args, report, device)``; imported only when the part runs (each
# needs its own framework); ``peak`` runs first, since every row's peak fraction divides by it
PART_MODULES = {name: f"mae_transfer.speed.{name}" for name in PARTS[1:]}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's options, added to ``parser`` (the ``bench-speed`` sub-command) or a new parser."""
    p = parser or argparse.ArgumentParser(prog="python -m mae_transfer.speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the comparisons as JSON: {part: {dtype: {ours, baseline, ratio, ours_peak_mib, "
                        "baseline_peak_mib, ...}}}")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    p.add_argument("--clock", choices=tuple(harness.CLOCK), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, steadier on a machine others load "
                        "(use with --threads 1, where no thread waits spinning; CPU only)")
    p.add_argument("--steps", type=int, default=2, help="timed rounds per comparison (median; default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per case first (default %(default)s)")
    p.add_argument("--peak-size", type=int, default=0, help="GEMM side for the peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--model", choices=tuple(SIZES), default="base", help="ViT size for pretrain/features")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--profile", action="store_true",
                   help="print a per-operator profile of both sides of the pretraining and fine-tuning steps")
    p.add_argument("--batch", type=int, default=8, help="pretraining and fine-tuning batch (default %(default)s)")
    p.add_argument("--feat-batch", type=int, default=16, help="feature-extraction batch (default %(default)s)")
    p.add_argument("--data-images", type=int, default=32, help="images per data-loading round")
    p.add_argument("--det-size", type=int, nargs="+", default=[512, 1024],
                   help="detection input sizes in px (default: %(default)s)")
    p.add_argument("--det-precision", nargs="+", choices=("fp32", "bf16"), default=None,
                   help="detection precisions (default: those of --precisions)")
    p.add_argument("--det-steps", type=int, default=1, help="timed rounds for detection (default %(default)s)")
    p.add_argument("--det-warmup", type=int, default=1, help="untimed detection steps first (default %(default)s)")
    p.add_argument("--rel-pos-impl", choices=("auto", "explicit", "recompute", "fused", "mask"), default="auto",
                   help="relative-position attention of our detection backbone (mae_backbone.layers."
                        "set_rel_pos_impl; default %(default)s)")
    p.add_argument("--det-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--seg-size", type=int, default=512)
    p.add_argument("--seg-batch", type=int, default=2)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the chosen parts and print one table row per comparison; returns the exit status."""
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("bench-speed: --clock cpu measures CPU work; on a GPU use the wall clock")
    if args.json:  # before measuring for minutes: a path that cannot be written is a user error now
        from training.errors import check_output_file

        check_output_file(args.json, "--json file")
    harness.set_clock(args.clock)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench-speed: torch {torch.__version__}, {where}, {args.clock} clock; median of {args.steps} interleaved rounds "
          f"after {args.warmup} warm-up step(s)", flush=True)
    peaks: dict[str, float] = {}
    if "peak" in args.parts:
        from mae_transfer.speed.peak import measure_peak

        peaks = measure_peak(device, args.peak_size or (8192 if device.type == "cuda" else 2048))
    report = harness.Report(peaks)
    report.print_header()
    for name, module in PART_MODULES.items():
        if name in args.parts:
            importlib.import_module(module).run(args, report, device)
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).write_text(json.dumps(report.summary(), indent=2) + "\n")
        print(f"wrote {args.json}")
    print(f"img/s: images per {args.clock}-clock second (median step); ratio: ours / baseline; peak MiB: memory the step itself "
          "allocates; peak frac: counted FLOPs per second / measured matmul peak of that precision")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mae_transfer.speed [options]``."""
    return run(build_parser().parse_args(argv))
