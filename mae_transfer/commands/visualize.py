"""``mae-transfer visualize CKPT IMAGE...``: original / masked / reconstruction / reconstruction with
the visible patches pasted, one row per image, as one PNG."""
from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    from mae_backbone import CheckpointError
    from pretrain.visualize import visualize

    try:
        out, rec = visualize(args.checkpoint, args.images, args.output, mask_ratio=args.mask_ratio,
                             seed=args.seed, target=args.target, masking=args.masking)
    except (CheckpointError, OSError, ValueError) as exc:
        if args.debug:
            raise
        from training.errors import os_error_message

        message = os_error_message(exc) if isinstance(exc, OSError) and exc.filename is not None else exc
        print(f"mae-transfer visualize: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(args.images)} images, masked-patch loss {rec.loss:.4f})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from pretrain.masking import MASKINGS
    from pretrain.model import TARGETS

    p = sub.add_parser("visualize", help="reconstruction figure of an MAE checkpoint (with decoder)")
    p.add_argument("checkpoint", help="full pretraining checkpoint: ours (checkpoint.pth) or official {'model': ...}")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("-o", "--output", default="mae_reconstruction.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches removed (default: %(default)s)")
    p.add_argument("--masking", choices=MASKINGS, default=None, help="masking kind (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks (default: %(default)s)")
    p.add_argument("--target", choices=TARGETS, default=None,
                   help="what the model predicts; default: the run's setting, else pixel (official visualization models)")
    p.set_defaults(func=run)
