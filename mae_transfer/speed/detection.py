"""Part ``detection``: our Detectron2 backbone (``SimpleFeaturePyramid`` on a ViT-B with rel-pos,
drop path 0.1), window attention 14 with global blocks 2, 5, 8, 11 vs global attention in all
blocks, one image forward + backward at ``--det-size`` (1024 px by default): time and peak memory.
Needs detectron2."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from mae_transfer.speed.harness import Case, Report, interleave


def run(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """Time windowed vs all-global attention on one ``[1, 3, det_size, det_size]`` image."""
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    from detection.backbone import SimpleFeaturePyramid
    from mae_backbone import create_vit
    from mae_backbone.layers import set_rel_pos_impl

    size = args.det_size
    image = torch.randn(1, 3, size, size, device=device)
    amp = args.det_precision == "bf16"

    def build(windowed: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        net = create_vit("vit_base_patch16", img_size=size, window_size=14 if windowed else 0,
                         global_blocks=(2, 5, 8, 11) if windowed else (), rel_pos=True, drop_path_rate=0.1,
                         pos_embed_learnable=True, dense_cls=False, grad_checkpointing=args.det_checkpointing)
        set_rel_pos_impl(net, args.rel_pos_impl)
        return SimpleFeaturePyramid(net, top_block=LastLevelMaxPool(), square_pad=size).to(device).train()

    def step(model: torch.nn.Module) -> Callable[[], None]:
        def go() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(image)
                loss = sum(o.float().mean() for o in out.values())
            loss.backward()
            model.zero_grad(set_to_none=True)
        return go

    cases = [Case("windowed", step(build(True)), 1, args.det_precision),
             Case("all-global", step(build(False)), 1, args.det_precision)]
    interleave(cases, args.det_steps, args.det_warmup, device)
    ratio = cases[0].peak_mib / cases[1].peak_mib
    report.add(f"detection {size}px", cases[0], cases[1],
               note=f"memory windowed/global {ratio:.0%} (rel-pos {args.rel_pos_impl})")
