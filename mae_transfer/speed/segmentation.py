"""Part ``segmentation``: our MMSeg ``MAEViT`` vs MMSeg's own ``MAE`` backbone, each with MMSeg's
``Feature2Pyramid`` neck, forward + backward at ``--seg-size`` (512 px), batch ``--seg-batch`` (2).
Needs mmseg."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from mae_transfer.speed.harness import Case, Report, interleave


def run(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """Time ours against MMSeg's MAE (+ neck) on ``[args.seg_batch, 3, seg_size, seg_size]``."""
    from mmseg.models.backbones import MAE
    from mmseg.models.necks import Feature2Pyramid

    from segmentation import MAEViT

    size = args.seg_size

    def neck() -> torch.nn.Module:
        return Feature2Pyramid(768, rescales=[4, 2, 1, 0.5], norm_cfg=dict(type="BN", requires_grad=True))

    torch.manual_seed(0)
    ours = torch.nn.Sequential(MAEViT(arch="base", img_size=size, out_indices=[3, 5, 7, 11], drop_path_rate=0.1),
                               neck()).to(device).train()
    mm_backbone = MAE(img_size=(size, size), patch_size=16, embed_dims=768, num_layers=12, num_heads=12, mlp_ratio=4,
                      init_values=1.0, drop_path_rate=0.1, out_indices=[3, 5, 7, 11])
    mm_backbone.init_weights()
    theirs = torch.nn.Sequential(mm_backbone, neck()).to(device).train()
    x = torch.randn(args.seg_batch, 3, size, size, device=device)
    for precision in args.precisions:
        amp = precision == "bf16"

        def step(model: torch.nn.Module) -> Callable[[], None]:
            def go() -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = sum(f.float().mean() for f in model(x))
                loss.backward()
                model.zero_grad(set_to_none=True)
            return go

        cases = [Case("ours", step(ours), args.seg_batch, precision),
                 Case("MMSeg MAE", step(theirs), args.seg_batch, precision)]
        interleave(cases, args.steps, args.warmup, device)
        report.add(f"segmentation {size}px +neck", cases[0], cases[1])
