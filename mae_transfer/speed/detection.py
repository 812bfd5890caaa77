"""Part ``detection``: our Detectron2 backbone against the plain ViTDet formulation, forward + backward.

The backbone as the detectors build it: ``SimpleFeaturePyramid`` (ViTDet's p2..p6) on a ViT-B/16
with window attention 14, global blocks 2, 5, 8, 11, decomposed relative positions and drop path
0.1, one image of ``--det-size`` px (each size given), in each precision of ``--det-precision``
(default: ``--precisions``). Ours runs the default attention path (``--rel-pos-impl``, "auto");
the baseline is the same pyramid with the same modules and weights whose ViT runs the plain ViTDet
formulation (``vitdet_reference``). Rows are keyed ``detection@<size>px`` and, for the largest
size, ``detection`` in the JSON summary. One more row per size and precision, not keyed: our ViT
alone against ``transformers.VitDetBackbone`` loaded with its weights. Needs detectron2 and
transformers.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from mae_transfer.speed.harness import Case, Report, Row, interleave


def build_pyramid(size: int, impl: str, checkpointing: bool = False) -> torch.nn.Module:
    """The detection backbone at ``size`` px (ViT-B/16, windows 14, global 2/5/8/11, rel-pos, drop path 0.1)."""
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    from detection.backbone import SimpleFeaturePyramid
    from mae_backbone import create_vit
    from mae_backbone.layers import set_rel_pos_impl

    torch.manual_seed(0)
    net = create_vit("vit_base_patch16", img_size=size, window_size=14, global_blocks=(2, 5, 8, 11), rel_pos=True,
                     drop_path_rate=0.1, pos_embed_learnable=True, dense_cls=False, grad_checkpointing=checkpointing)
    with torch.no_grad():  # non-zero tables (a fine-tuned model has them), so the bias is computed for real
        for name, p in net.named_parameters():
            if "rel_pos" in name:
                p.normal_(std=0.02)
    set_rel_pos_impl(net, impl)
    return SimpleFeaturePyramid(net, top_block=LastLevelMaxPool(), square_pad=size).train()


def _step(model: Callable[[torch.Tensor], object], params: torch.nn.Module, image: torch.Tensor,
          bf16: bool) -> Callable[[], None]:
    """One forward + backward of ``model`` on ``image``; the loss sums the means of every output map."""
    def go() -> None:
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(image)
            maps = out.values() if isinstance(out, dict) else out
            loss = sum(m.float().mean() for m in maps)
        loss.backward()
        params.zero_grad(set_to_none=True)
    return go


def run(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """Time ours vs the plain formulation (and our ViT vs HF's VitDetBackbone) per size and precision."""
    from mae_transfer.speed.vitdet_reference import hf_vitdet_backbone, plain_pyramid

    sizes = sorted(set(args.det_size))
    precisions = args.det_precision or args.precisions
    for size in sizes:
        ours = build_pyramid(size, args.rel_pos_impl, args.det_checkpointing).to(device)
        plain = plain_pyramid(ours)
        vit = ours.net
        hf = hf_vitdet_backbone(vit, size, drop_path_rate=0.1).to(device).train()
        image = torch.randn(1, 3, size, size, device=device)
        for precision in precisions:
            bf16 = precision == "bf16"
            cases = [Case(f"ours {args.rel_pos_impl}", _step(ours, ours, image, bf16), 1, precision),
                     Case("plain ViTDet", _step(plain, ours, image, bf16), 1, precision)]
            interleave(cases, args.det_steps, args.det_warmup, device)
            report.add(f"detection {size}px", cases[0], cases[1], key=f"detection@{size}px",
                       note=f"SimpleFeaturePyramid on ViT-B, rel-pos {args.rel_pos_impl}")
            if size == sizes[-1]:  # the key: the largest size
                report.rows.append(Row(f"detection {size}px", cases[0], cases[1], key="detection"))
            vit_cases = [Case("our ViT", _step(lambda x: vit.forward_intermediates(x, [vit.depth - 1]), vit, image,
                                               bf16), 1, precision),
                         Case("HF VitDetBackbone", _step(lambda x: hf(x).feature_maps, hf, image, bf16), 1, precision)]
            interleave(vit_cases, args.det_steps, args.det_warmup, device)
            report.add(f"detection ViT {size}px", vit_cases[0], vit_cases[1], note="vs transformers.VitDetBackbone")
