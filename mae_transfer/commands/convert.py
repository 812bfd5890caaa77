"""``mae-transfer convert SRC DST [--from FMT] [--to FMT]``: move ViT weights between tools."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser builds without importing torch
    import torch


def run(args: argparse.Namespace) -> int:
    from mae_backbone.checkpoint import read_checkpoint, write_checkpoint
    from mae_backbone.vit import VIT_ARCHS

    sd, meta = read_checkpoint(args.src, args.src_format)
    for note in meta.get("notes", []):
        print(f"note: {note}")
    out_meta = {k: v for k, v in meta.items() if k not in ("notes", "format", "path", "source", "hf_config")}
    out_meta["source"] = f"{meta['format']}:{args.src}"
    if args.arch:
        out_meta.update(VIT_ARCHS[args.arch], arch=args.arch)
    if args.num_heads:
        out_meta["num_heads"] = args.num_heads
    if args.licence:
        out_meta["licence"] = args.licence
    dst = write_checkpoint(sd, args.dst, args.to, out_meta)
    dropped = check_written(sd, dst, args.to)
    print(f"wrote {len(sd) - len(dropped)} of {len(sd)} tensors as {args.to!r} to {dst}")
    if dropped:
        print(f"note: the {args.to!r} layout does not carry {len(dropped)} tensors (reading {dst} back leaves them "
              f"out): {', '.join(dropped)}")
    return 0


def check_written(sd: dict[str, torch.Tensor], dst: Path, fmt: str) -> list[str]:
    """Read ``dst`` back as ``fmt`` and compare with ``sd`` (our layout).

    Returns:
        the keys of ``sd`` the written file does not give back (what the layout cannot carry).
    Raises:
        CheckpointError: when a tensor reads back different, or the file holds keys ``sd`` has not.
    """
    import torch

    from mae_backbone.checkpoint import read_checkpoint
    from mae_backbone.io import CheckpointError

    back, _ = read_checkpoint(dst, fmt)
    changed = sorted(k for k in back if k in sd and (back[k].shape != sd[k].shape or not torch.equal(back[k], sd[k])))
    extra = sorted(set(back) - set(sd))
    if changed or extra:
        raise CheckpointError(f"{dst}: reading the written {fmt!r} file back does not give the input: "
                              f"changed {changed[:5]}, added {extra[:5]}")
    return sorted(set(sd) - set(back))


def register(sub: argparse._SubParsersAction) -> None:
    from mae_backbone.formats import READERS, WRITERS
    from mae_backbone.vit import VIT_ARCHS

    p = sub.add_parser(
        "convert",
        help=f"convert ViT checkpoints between formats (ours, {', '.join(READERS)})",
        description="Read SRC in any supported format (detected, or named with --from) and write DST.",
    )
    p.add_argument("src", help="checkpoint file, or a Hugging Face model folder")
    p.add_argument("dst", help="output file (a folder for --to hf)")
    p.add_argument("--from", dest="src_format", default="auto", choices=["auto", "ours", *READERS])
    p.add_argument("--to", default="ours", choices=["ours", *WRITERS])
    p.add_argument("--arch", choices=list(VIT_ARCHS), help="architecture, when the weights do not say")
    p.add_argument("--num-heads", type=int, help="attention heads, for a size not in the registry")
    p.add_argument("--licence", help="licence note stored in our format's metadata")
    p.set_defaults(func=run)
