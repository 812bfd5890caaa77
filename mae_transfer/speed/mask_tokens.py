"""Speed and peak memory of one MAE pretraining step, and what mask tokens in the encoder cost (not a test).

A step is what ``pretrain.engine`` does per optimizer step: per-sample mask noise, forward with
the norm-pixel loss, backward, fused AdamW.  Each configuration runs in its own process, so the
peak memory (max RSS on the CPU, ``max_memory_allocated`` on a GPU) is that configuration's own.

    python -m mae_transfer.speed.mask_tokens                 # ViT-B/16, 224 px, batch 8, mask 0.75
    python -m mae_transfer.speed.mask_tokens --steps 5 --threads 2

Prints img/s and peak memory for fp32 and bf16 with the asymmetric encoder (visible patches
only), then the step-time ratio of the "w/ [M]" baseline (mask tokens in the encoder) to it.
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

# the folder that holds the ``mae_transfer`` package (a checkout or site-packages): the child
# processes import from the same place as this one
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def one_config(args: argparse.Namespace) -> dict[str, float]:
    """Time ``args.steps`` steps after ``args.warmup`` untimed ones, in this process.

    Returns:
        ``step_s`` (median seconds per step), ``img_s``, ``peak_mib`` and the last ``loss``.
    """
    import torch

    from pretrain.masking import mask_noise
    from pretrain.model import create_mae
    from pretrain.optim import build_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_mae(args.model, img_size=args.img_size, target="norm_pixel",
                       encoder_mask_tokens=args.mask_tokens).to(device).train()
    opt = build_optimizer(model, lr=1.5e-4 * args.batch / 256, weight_decay=0.05)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        seeds = [step * args.batch + i for i in range(args.batch)]
        noise = mask_noise("random", model.grid_size, args.mask_ratio, seeds=seeds, device=device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, _, _ = model(imgs, args.mask_ratio, noise=noise)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]  # median
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"step_s": step_s, "img_s": args.batch / step_s, "peak_mib": peak_mib, "loss": float(loss)}


def run_child(args: argparse.Namespace, precision: str, mask_tokens: bool) -> dict[str, float]:
    """``one_config`` in a fresh process (its own peak memory); returns its JSON line."""
    cmd = [sys.executable, "-m", "mae_transfer.speed.mask_tokens", "--child",
           "--precision", precision, "--model", args.model,
           "--img-size", str(args.img_size), "--batch", str(args.batch), "--mask-ratio", str(args.mask_ratio),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--device", args.device] + (["--mask-tokens"] if mask_tokens else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mae_transfer.speed.mask_tokens", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mask-token-precision", default="bf16", choices=("fp32", "bf16"),
                   help="precision of the w/ [M] comparison")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--mask-tokens", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run fp32 and bf16 with the asymmetric encoder, then w/ [M], each in a child process."""
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(one_config(args)))
        return 0

    import torch

    print(f"{args.model}, {args.img_size} px, batch {args.batch}, mask {args.mask_ratio}, norm-pixel loss, "
          f"AdamW; {args.device}, torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    results = {}
    for precision in ("fp32", "bf16"):
        r = run_child(args, precision, mask_tokens=False)
        results[precision] = r
        print(f"  {precision:5s} asymmetric encoder: {r['img_s']:6.2f} img/s  ({r['step_s']:.2f} s/step)  "
              f"peak {r['peak_mib']:.0f} MiB")
    mp = args.mask_token_precision
    m = run_child(args, mp, mask_tokens=True)
    print(f"  {mp:5s} w/ [M] (mask tokens in the encoder): {m['img_s']:6.2f} img/s  ({m['step_s']:.2f} s/step)  "
          f"peak {m['peak_mib']:.0f} MiB")
    print(f"  step time w/ [M] / asymmetric ({mp}): {m['step_s'] / results[mp]['step_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
