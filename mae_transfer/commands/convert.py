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

    from training.errors import UserError, check_output_dir, check_output_file

    if args.to == "hf":
        check_output_dir(args.dst, "output folder (--to hf)")
    else:
        check_output_file(args.dst, "output file")
    sd, meta = read_checkpoint(args.src, args.src_format)
    unknown = unknown_keys(sd)
    if unknown and args.src_format == "auto":
        raise UserError(
            f"{args.src}: read as {meta['format']!r}, but {len(unknown)} of its {len(sd)} tensors are not ViT "
            f"encoder keys: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}; nothing was written. "
            f"If the format is right, name it with --from {meta['format']} to convert the file as it is")
    for key in unknown:
        print(f"note: {key} is not a ViT encoder key; written unchanged")
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


def unknown_keys(sd: dict[str, torch.Tensor]) -> list[str]:
    """The keys of ``sd`` (our layout) that no ``mae_backbone`` ViT has, sorted."""
    import re

    known = _vit_key_patterns()
    return sorted(k for k in sd if re.sub(r"^blocks\.\d+\.", "blocks.N.", k) not in known)


def _vit_key_patterns() -> set[str]:
    """Every state-dict key a ``VisionTransformer`` can have (block index as ``N``): the keys of tiny
    models with each option that adds tensors (relative positions, layer scale, pooling, head)."""
    import re

    from mae_backbone.vit import VisionTransformer

    keys: set[str] = set()
    for options in (dict(rel_pos="decomposed", window_size=2, global_blocks=[1]),
                    dict(rel_pos="beit", init_values=0.1), dict(global_pool=True, num_classes=2)):
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=8, depth=2, num_heads=2, **options)
        keys |= {re.sub(r"^blocks\.\d+\.", "blocks.N.", k) for k in model.state_dict()}
    return keys


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
