"""Benchmark: our ``MAEViT`` against MMSeg's own ``MAE`` backbone, each with ``Feature2Pyramid``.

ViT-B/16 (768 wide, 12 blocks, 12 heads), outputs after blocks 4, 6, 8, 12, MMSeg's
``Feature2Pyramid`` (rescales 4, 2, 1, 0.5) on top, 512 px, batch 2, forward + backward of
``sum(mean(level))``, in fp32 and under bf16 autocast; both models in train mode with drop path
0.1, as in the ADE20K configs.  Each (model, precision) runs in its own subprocess, so that its peak
memory is its own: peak RSS growth over the built model on the CPU, ``max_memory_allocated`` on a
GPU.  Not a test: run it by hand, on a quiet machine.

    python benchmarks/bench_segmentation.py [--device cpu|cuda] [--iters 3] [--size 512] [--batch 2] [--threads N]

Reference (shared/STACK.md, this project's 2-core CPU machine): MMSeg's ``MAE`` + neck takes
14.7 s fp32 / 11.5 s bf16 per step.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

IMPLS = ("ours", "mmseg")
DTYPES = ("fp32", "bf16")


def build(impl: str, size: int) -> Any:
    """Backbone + Feature2Pyramid, as an ``nn.Sequential``-like callable module."""
    import torch
    from mmseg.models.necks import Feature2Pyramid

    if impl == "ours":
        from segmentation import MAEViT

        backbone = MAEViT(arch="base", img_size=size, out_indices=[3, 5, 7, 11], drop_path_rate=0.1)
    else:
        from mmseg.models.backbones import MAE

        backbone = MAE(img_size=(size, size), patch_size=16, embed_dims=768, num_layers=12, num_heads=12,
                       mlp_ratio=4, init_values=1.0, drop_path_rate=0.1, out_indices=[3, 5, 7, 11])
        backbone.init_weights()
    neck = Feature2Pyramid(768, rescales=[4, 2, 1, 0.5], norm_cfg=dict(type="BN", requires_grad=True))
    return torch.nn.Sequential(backbone, neck)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(impl: str, dtype: str, device: str, size: int, batch: int, iters: int) -> dict[str, Any]:
    """Median seconds per forward+backward step and peak memory growth, in this process."""
    import torch

    torch.manual_seed(0)
    model = build(impl, size).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)

    def step() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            feats = model(x)
            loss = sum(f.float().mean() for f in feats)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (kernel selection, allocator)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return dict(impl=impl, dtype=dtype, device=device, seconds=statistics.median(times), times=times,
                peak_mib=peak / 2**20, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up step (median reported)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default torch's); 1 is steadier on a busy shared CPU")
    p.add_argument("--one", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)  # child process
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(measure(*args.one, args.device, args.size, args.batch, args.iters)))
        return 0

    results: dict[tuple[str, str], dict[str, Any]] = {}
    for dtype in args.dtypes:
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--one", impl, dtype, "--device", args.device, "--size", str(args.size),
                   "--batch", str(args.batch), "--iters", str(args.iters)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[impl, dtype] = r
            print(f"{impl:>5} {dtype}: {r['seconds']:.2f} s/step (runs {', '.join(f'{t:.2f}' for t in r['times'])}), "
                  f"peak +{r['peak_mib']:.0f} MiB, {r['params_m']:.1f} M params, {r['threads']} threads", flush=True)
    print(f"\nViT-B + Feature2Pyramid, {args.size} px, batch {args.batch}, forward+backward, {args.device}")
    for dtype in args.dtypes:
        ours, theirs = results["ours", dtype], results["mmseg", dtype]
        print(f"{dtype}: ours {ours['seconds']:.2f} s vs MMSeg MAE {theirs['seconds']:.2f} s "
              f"-> {theirs['seconds'] / ours['seconds']:.2f}x faster; peak memory "
              f"{ours['peak_mib']:.0f} vs {theirs['peak_mib']:.0f} MiB -> {ours['peak_mib'] / theirs['peak_mib']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
