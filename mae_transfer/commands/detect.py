"""``mae-transfer detect``: train, evaluate and run Detectron2 detectors on the MAE ViT.

    mae-transfer detect train CONFIG [key=value ...] [--resume] [--num-gpus N]
    mae-transfer detect eval  CONFIG --weights OUTPUT/model_final.pth [key=value ...]   (-> OUTPUT/eval_model_final/)
    mae-transfer detect infer CONFIG IMAGE --out result.png --weights OUTPUT/model_final.pth

CONFIG is a LazyConfig ``.py`` (keys like ``train.max_iter``), a yacs ``.yaml`` (keys like
``SOLVER.MAX_ITER``), or the name of a shipped config (``mask_rcnn_vitdet_b_100ep``). The work
is in ``detection.engine``; Detectron2 is imported only when a sub-command runs.
"""
from __future__ import annotations

import argparse
import logging
import sys


def _options(args: argparse.Namespace):
    from detection.engine import RunOptions

    return RunOptions(config=args.config, overrides=list(args.overrides), output=args.output,
                      resume=getattr(args, "resume", False), trust_pickle=args.trust_pickle,
                      register=[tuple(r) for r in args.register_coco or []], weights=getattr(args, "weights", None),
                      debug=getattr(args, "debug", False))


def _run(args: argparse.Namespace, work) -> int:
    from detection.config import ConfigError
    from detection.data import DatasetError

    try:
        work()
    except (ConfigError, DatasetError, FileNotFoundError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"mae-transfer detect {args.action}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # Detectron2's check, before the optimizer step of that iteration
        print(f"mae-transfer detect {args.action}: error: {str(exc).splitlines()[0]} Training stopped before "
              "the optimizer step and before any checkpoint of that iteration: the last checkpoint in the "
              "output folder is the last good one (resume from it with --resume, e.g. at a lower learning "
              "rate).", file=sys.stderr)
        return 2
    return 0


def run_train(args: argparse.Namespace) -> int:
    from detectron2.engine import launch

    from detection.engine import train_main

    opts = _options(args)
    return _run(args, lambda: launch(train_main, args.num_gpus, num_machines=args.num_machines,
                                     machine_rank=args.machine_rank, dist_url=args.dist_url, args=(opts,)))


def run_eval(args: argparse.Namespace) -> int:
    from detectron2.engine import launch

    from detection.engine import eval_main

    opts = _options(args)
    return _run(args, lambda: launch(eval_main, args.num_gpus, num_machines=args.num_machines,
                                     machine_rank=args.machine_rank, dist_url=args.dist_url, args=(opts,)))


def run_infer(args: argparse.Namespace) -> int:
    from detection.engine import infer_main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = _options(args)

    def work() -> None:
        found = infer_main(opts, args.image, args.out, threshold=args.threshold, dataset=args.dataset)
        print(f"{len(found)} detections with score >= {args.threshold} drawn to {args.out}")

    return _run(args, work)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="LazyConfig .py, yacs .yaml, or a shipped config name (e.g. mask_rcnn_vitdet_b_100ep)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, all together after CONFIG (LazyConfig: train.max_iter=100; "
                        "yacs: SOLVER.MAX_ITER=100); options go before or after them")
    p.add_argument("--output", help="output folder (overrides train.output_dir / OUTPUT_DIR; detect eval: default "
                                    "eval_<weights name>/ beside the weights file)")
    p.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"),
                   help="register a COCO-format dataset under NAME (repeatable); use NAME in the config "
                        "(dataloader.train.dataset.names=NAME / DATASETS.TRAIN='(\"NAME\",)')")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow .pkl weights (plain pickle can run code: only for files from a source you trust)")


def _distributed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) per machine")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto", help="e.g. tcp://host:port for several machines")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "detect",
        help="Detectron2 detection on the ViT: train / eval / infer",
        description="Mask R-CNN and Cascade Mask R-CNN on the MAE ViT through Detectron2 (ViTDet simple "
        "pyramid or the MAE paper's FPN). Configs: detection/configs/.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = actions.add_parser("train", help="train (AMP, DDP, periodic evaluation, checkpoints, TensorBoard)")
    _common(t)
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output folder")
    _distributed(t)
    t.set_defaults(func=run_train)

    e = actions.add_parser("eval", help="COCO box and mask AP of trained weights")
    _common(e)
    e.add_argument("--weights", help="detector checkpoint (default: the config's init_checkpoint / MODEL.WEIGHTS)")
    _distributed(e)
    e.set_defaults(func=run_eval)

    i = actions.add_parser("infer", help="detect on one image and draw boxes and masks to a PNG")
    i.add_argument("config", help="LazyConfig .py, yacs .yaml, or a shipped config name")
    i.add_argument("image", help="input image")
    i.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, all together after IMAGE")
    i.add_argument("--out", required=True, help="output image (.png)")
    i.add_argument("--weights", help="detector checkpoint (default: the config's)")
    i.add_argument("--threshold", type=float, default=0.5, help="minimum score to draw")
    i.add_argument("--dataset", help="dataset whose class names label the drawing (default: the config's test set)")
    i.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_DIR"))
    i.add_argument("--trust-pickle", action="store_true", help="allow .pkl weights (only from a trusted source)")
    i.add_argument("--output", help=argparse.SUPPRESS)
    i.set_defaults(func=run_infer)
