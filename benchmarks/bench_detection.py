"""Speed and peak memory of the ViT-B detection backbone, forward + backward (not a test).

The backbone is ``detection.SimpleFeaturePyramid`` on ViT-B/16 (ViTDet's: rel-pos, drop path 0.1,
square padding, ``p2..p6``), one image per step; the loss is the mean of every pyramid output.
Each case runs in its own process, so its peak memory (max RSS on the CPU,
``max_memory_allocated`` on a GPU) is its own.

    python benchmarks/bench_detection.py                          # 512 and 1024 px, both attentions
    python benchmarks/bench_detection.py --sizes 512 --threads 2
    python benchmarks/bench_detection.py --sizes 1024 --attention windowed --precision bf16

Cases: ``windowed`` = window attention 14 with global blocks 2, 5, 8, 11 (ViTDet); ``global`` =
global attention in all 12 blocks. Reference on the project's 2-core machine (STACK.md):
Detectron2's own ViTDet ViT-B pyramid, one image fwd+bwd, 512 px 6.2 s fp32 / 2.9 s bf16,
1024 px 37 s fp32 with 11.8 GB peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = {(512, "fp32"): "6.2 s", (512, "bf16"): "2.9 s", (1024, "fp32"): "37 s, 11.8 GB"}


def one_case(args: argparse.Namespace) -> dict[str, float]:
    """Time ``args.steps`` forward+backward steps after ``args.warmup`` untimed ones, in this process."""
    import torch
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    from detection.backbone import SimpleFeaturePyramid
    from mae_backbone import create_vit

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    windowed = args.attention == "windowed"
    net = create_vit("vit_base_patch16", img_size=args.size, window_size=14 if windowed else 0,
                     global_blocks=(2, 5, 8, 11) if windowed else (), rel_pos=True, drop_path_rate=0.1,
                     grad_checkpointing=args.checkpointing, pos_embed_learnable=True, dense_cls=False)
    model = SimpleFeaturePyramid(net, top_block=LastLevelMaxPool(), square_pad=args.size).to(device).train()
    image = torch.randn(1, 3, args.size, args.size, device=device)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(image)
            loss = sum(o.float().mean() for o in out.values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"seconds": sum(times) / len(times), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "rss_after_build_gib": rss_model}
    if device.type == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--attention", nargs="+", choices=["windowed", "global"], default=["windowed", "global"])
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=1, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the blocks")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # run one case in this process
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.attention = args.attention[0]
        print(json.dumps(one_case(args)))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    print(f"ViT-B/16 simple feature pyramid, 1 image fwd+bwd, {args.precision}, {args.device}, "
          f"threads={args.threads or 'default'}, {args.warmup} warmup + {args.steps} timed step(s)"
          + (", activation checkpointing" if args.checkpointing else ""))
    print(f"{'size':>5} {'attention':>9} {'s/step':>8} {'peak RSS GiB':>13} {'RSS after build':>16}"
          + (f" {'peak CUDA GiB':>14}" if args.device.startswith("cuda") else "") + "  Detectron2 ViTDet (STACK.md)")
    for size in args.sizes:
        for attention in args.attention:
            cmd = [sys.executable, __file__, "--one", "--size", str(size), "--attention", attention,
                   "--precision", args.precision, "--device", args.device, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)]
            if args.checkpointing:
                cmd.append("--checkpointing")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{size:>5} {attention:>9} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            ref = REFERENCE.get((size, args.precision), "") if attention == "windowed" else ""
            cuda = f" {r['peak_cuda_gib']:>14.2f}" if "peak_cuda_gib" in r else ""
            print(f"{size:>5} {attention:>9} {r['seconds']:>8.2f} {r['peak_rss_gib']:>13.2f} "
                  f"{r['rss_after_build_gib']:>16.2f}{cuda}  {ref}", flush=True)


if __name__ == "__main__":
    main()
