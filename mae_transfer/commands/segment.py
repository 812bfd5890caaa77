"""``mae-transfer segment train|test|infer``: MMSegmentation on our ViT (``segmentation.engine``).

Distributed: ``torchrun --nproc_per_node N -m mae_transfer segment train CONFIG`` (the launcher
is detected from torchrun's environment, or set with ``--launcher``).
"""
from __future__ import annotations

import argparse
import os
import pickle


def _load(args: argparse.Namespace):
    from training.errors import check_output_dir
    from segmentation.engine import ConfigError, load_config, prepare, set_data_root

    cfg = load_config(args.config, args.cfg_options)
    if getattr(args, "data_root", None):
        set_data_root(cfg, args.data_root)
    work_dir, what = args.work_dir, "--work-dir"
    if not work_dir and not cfg.get("work_dir"):
        if args.segment_command == "train":  # nothing is written to the current folder unasked
            raise ConfigError("give --work-dir (the folder for checkpoints and logs), e.g. --work-dir "
                              f"work_dirs/{os.path.splitext(os.path.basename(args.config))[0]}")
        # beside the checkpoint, in a folder of its own: MMEngine writes its config copy into the work
        # dir, which would replace the training run's own (same file name) in the checkpoint's folder
        ckpt = os.path.abspath(args.checkpoint)
        work_dir = os.path.join(os.path.dirname(ckpt), f"test_{os.path.splitext(os.path.basename(ckpt))[0]}")
        what = "the test folder beside the checkpoint (test logs go there unless --work-dir names another)"
    elif not work_dir:
        what = "the config's work_dir"
    cfg = prepare(cfg, work_dir=work_dir, launcher=getattr(args, "launcher", None), config_path=args.config)
    check_output_dir(cfg.work_dir, what)  # before any work
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run the action; errors go to ``mae_transfer.cli.main``'s boundary (one line, exit 2; ``--debug``:
    the traceback). Translated here: a refused pickle (into ``CheckpointError``), a non-finite loss
    (``training.TrainingDiverged``), and an error raised in a DataLoader worker (torch re-raises it
    with the worker's traceback inside the message: only its last line is kept)."""
    from mae_backbone.io import CheckpointError
    from segmentation.datasets import DatasetError
    from segmentation.engine import ConfigError
    from segmentation.safe_loading import NonFiniteLossError

    try:
        return _ACTIONS[args.segment_command](args)
    except (ConfigError, DatasetError, CheckpointError) as exc:
        message = str(exc)
        if message.startswith("Caught ") and "Original Traceback" in message:  # from a DataLoader worker
            raise type(exc)(message.strip().splitlines()[-1].split(": ", 1)[-1]) from exc
        raise
    except NonFiniteLossError as exc:
        from training.loop import TrainingDiverged

        raise TrainingDiverged(str(exc)) from exc
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"refused to load a checkpoint that asks to construct Python objects ({first}). Only tensors and "
            "plain data are loaded (torch weights_only); checkpoints written by our configs "
            "(SafeCheckpointHook) load as they are; re-save other files' state_dict.") from exc


def run_train(args: argparse.Namespace) -> int:
    from segmentation.engine import enable_amp, train

    cfg = _load(args)
    if args.amp:
        enable_amp(cfg, args.amp)
    runner = train(cfg, resume=args.resume or False)
    if os.environ.get("RANK", "0") == "0":
        print(f"trained to iteration {runner.iter}; checkpoints and logs in {cfg.work_dir}")
    return 0


def run_test(args: argparse.Namespace) -> int:
    from segmentation.engine import test

    cfg = _load(args)
    result = test(cfg, args.checkpoint)
    if os.environ.get("RANK", "0") == "0":
        print(result.table())
        print("  ".join(f"{k}: {result.metrics[k]:.2f}" for k in ("mIoU", "mAcc", "aAcc") if k in result.metrics))
    return 0


def run_infer(args: argparse.Namespace) -> int:
    from training.errors import check_output_file
    from segmentation.engine import infer, load_config

    check_output_file(args.out, "--out")
    cfg = load_config(args.config, args.cfg_options)
    result = infer(cfg, args.checkpoint, args.image, args.out, device=args.device, opacity=args.opacity)
    top = ", ".join(f"{name} {share:.1f}%" for name, share in list(result.shares.items())[:5])
    print(f"wrote {args.out} ({result.pred.shape[1]}x{result.pred.shape[0]}); classes: {top}")
    return 0


_ACTIONS = {"train": run_train, "test": run_test, "infer": run_infer}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="an MMSeg config file, or a shipped config's name "
                                  "(e.g. upernet-mae-vit-b_8xb2-160k_ade20k-512x512)")


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", default=None,
                   help="override config entries, e.g. train_dataloader.batch_size=4 "
                        "(an unknown top-level key is an error)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="semantic segmentation with MMSegmentation (UperNet on an MAE ViT)",
        description="Train, evaluate and run MMSegmentation models whose backbone is our ViT (MAEViT). "
        "Multi-GPU: torchrun --nproc_per_node N -m mae_transfer segment train CONFIG",
    )
    actions = p.add_subparsers(dest="segment_command", metavar="ACTION", required=True)

    t = actions.add_parser("train", help="train (MMEngine Runner: checkpoints, resume, TensorBoard logs)")
    _common(t)
    t.add_argument("--work-dir", help="checkpoints and logs (required unless the config sets work_dir)")
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="resume from the latest checkpoint in the work dir, or from CKPT")
    t.add_argument("--amp", nargs="?", const="float16", default=None, choices=("float16", "bfloat16"),
                   help="mixed precision on a GPU (default float16 with dynamic loss scaling)")
    t.add_argument("--data-root", help="a dataset folder in the ADEChallengeData2016 layout, for every split")
    t.add_argument("--launcher", choices=("none", "pytorch", "slurm", "mpi"), default=None,
                   help="distributed launcher (default: pytorch under torchrun, else none)")
    _options(t)

    e = actions.add_parser("test", help="evaluate a checkpoint: mIoU, mAcc, aAcc and the per-class IoU table")
    _common(e)
    e.add_argument("checkpoint", help="a model checkpoint written by `segment train`")
    e.add_argument("--work-dir", help="logs (default: the checkpoint's folder, as training's logs)")
    e.add_argument("--data-root", help="a dataset folder in the ADEChallengeData2016 layout")
    e.add_argument("--launcher", choices=("none", "pytorch", "slurm", "mpi"), default=None)
    _options(e)

    i = actions.add_parser("infer", help="segment one image and write a colour overlay PNG")
    _common(i)
    i.add_argument("checkpoint", help="a model checkpoint written by `segment train`")
    i.add_argument("image", help="the input image")
    i.add_argument("--out", required=True, help="the overlay PNG to write")
    i.add_argument("--opacity", type=float, default=0.5, help="weight of the class colours (0..1)")
    i.add_argument("--device", default=None, help="cuda:0 when available, else cpu")
    _options(i)

    p.set_defaults(func=run)
