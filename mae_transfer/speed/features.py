"""Part ``features``: encoder feature extraction (the feature-caching path, no grad) of ours vs
timm's ``VisionTransformer`` of the same size."""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

import torch

from mae_transfer.speed.harness import Case, Report, interleave


def run(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """Time ``forward_features`` of ``[args.feat_batch, 3, img, img]`` for each of ``args.precisions``."""
    import timm

    from mae_backbone import create_vit

    torch.manual_seed(0)
    ours = create_vit(f"vit_{args.model}_patch16", img_size=args.img_size).to(device).eval()
    theirs = timm.create_model(f"vit_{args.model}_patch16_224", pretrained=False, num_classes=0,
                               img_size=args.img_size).to(device).eval()
    x = torch.randn(args.feat_batch, 3, args.img_size, args.img_size, device=device)
    for precision in args.precisions:
        amp = precision == "bf16"
        net = ours
        if amp:  # the cached-feature path: bf16 matmul weights once, not a cast per forward
            net = copy.deepcopy(ours)
            for m in net.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    m.to(torch.bfloat16)

        def forward(model: torch.nn.Module, fn: str) -> Callable[[], Any]:
            def go() -> Any:
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    return getattr(model, fn)(x)
            return go

        cases = [Case("ours", forward(net, "forward_features"), args.feat_batch, precision),
                 Case("timm ViT", forward(theirs, "forward_features"), args.feat_batch, precision)]
        interleave(cases, args.steps, args.warmup, device)
        report.add(f"features {args.model}", cases[0], cases[1])
