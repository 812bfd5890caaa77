"""``mae-transfer convert SRC DST [--from FMT] [--to FMT]``: move ViT weights between tools."""
from __future__ import annotations

import argparse


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
    print(f"wrote {len(sd)} tensors as {args.to!r} to {dst}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mae_backbone.formats import READERS, WRITERS
    from mae_backbone.vit import VIT_ARCHS

    p = sub.add_parser(
        "convert",
        help="convert ViT checkpoints between formats (ours, timm, mae, mocov3, hf, detectron2, mmseg)",
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
