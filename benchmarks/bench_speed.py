"""One speed benchmark: ours against the libraries people would use instead, side by side.

Everything runs in this one process, on the same inputs and thread count; the two sides of each
comparison alternate repetition by repetition (ours, baseline, ours, baseline ...) and medians are
reported, so that a load that comes and goes on a shared machine hits both alike.

Parts (``--parts``):

- ``peak``: the machine's measured matmul peak (square fp32 and bf16 GEMMs, best of a few), the
  denominator of every "peak fraction";
- ``data``: decode (Pillow) + the pretraining augmentation (RandomResizedCrop, flip, normalize) of
  JPEG photos, img/s in this process (one loader worker's worth);
- ``pretrain``: one MAE pretraining step (mask noise, forward with the norm-pixel loss, backward,
  AdamW) of ours vs HF ``transformers``' ``ViTMAEForPreTraining`` configured identically (ViT-B/16
  or ViT-L/16, decoder 8 x 512, mask 0.75, norm-pix, AdamW(0.9, 0.95), the same ``noise`` so the
  same masks), fp32 and bf16 autocast.  Ours uses the fused AdamW and, in bf16, bf16 working
  copies of the matmul weights (``pretrain.optim.LowPrecisionWeights``); the ``ours-autocast``
  row is our plain bf16 path.  HF gets ``torch.optim.AdamW`` with its defaults, as its Trainer does;
- ``features``: encoder feature extraction (the feature-caching path, no grad) of ours vs timm's
  ``VisionTransformer`` of the same size;
- ``detection``: our Detectron2 backbone (``SimpleFeaturePyramid`` on a ViT-B with rel-pos, drop
  path 0.1), window attention 14 with global blocks 2, 5, 8, 11 vs global attention in all
  blocks, one image forward + backward at ``--det-size`` (1024 px by default): time and peak memory;
- ``segmentation``: our MMSeg ``MAEViT`` vs MMSeg's own ``MAE`` backbone, each with MMSeg's
  ``Feature2Pyramid`` neck, forward + backward at ``--seg-size`` (512 px), batch 2.

Peak memory: on a GPU ``max_memory_allocated`` per call; on the CPU the resident set size sampled
every 2 ms during the call, minus its level just before the call (so the model's own weights and
optimizer state are not counted; what is counted is what the call itself allocates).
FLOPs are counted with ``torch.utils.flop_counter`` on one call of each case.

    python benchmarks/bench_speed.py                              # everything, CPU, 2 steps each
    python benchmarks/bench_speed.py --parts peak pretrain --steps 3
    python benchmarks/bench_speed.py --parts pretrain --model large --device cuda --batch 64
    mae-transfer bench-speed --parts segmentation --seg-size 256  # the same, as a command

Needs ``transformers`` (the ``bench`` extra) for the pretraining part, timm for features,
detectron2 / mmseg for their parts.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

PARTS = ("peak", "data", "pretrain", "features", "detection", "segmentation")
SIZES = {  # name -> (embed_dim, depth, heads)
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


# ---------------------------------------------------------------------------- measurement
def _trim() -> None:
    """glibc's ``malloc_trim(0)``: return freed heap memory to the system (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block: ``max_memory_allocated`` on CUDA, else sampled RSS growth."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        _trim()  # hand freed heap pages back first, so the growth measured is this block's
        self._base = self._rss()
        self._max = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, self._rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._max = max(self._max, self._rss())
        self._stop.set()
        self._thread.join()
        self.peak_bytes = self._max - self._base


@dataclass
class Case:
    """One side of a comparison: ``run()`` does one step; ``images`` per step."""

    name: str
    run: Callable[[], Any]
    images: int
    dtype: str = "fp32"
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    flops: float = 0.0

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def img_s(self) -> float:
        return self.images / self.seconds

    @property
    def peak_mib(self) -> float:
        return statistics.median(self.peaks) / 2**20


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention), by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def interleave(cases: list[Case], steps: int, warmup: int, device: torch.device, flops: bool = True) -> None:
    """Warm up each case (counting its FLOPs on the first call), then time ``steps`` rounds of all
    cases in turn."""
    for case in cases:
        for i in range(warmup):
            if flops and i == 0:  # the first warm-up step is the counted one
                case.flops = count_flops(case.run)
            else:
                case.run()
        if flops and not warmup:
            case.flops = count_flops(case.run)
    for _ in range(steps):
        for case in cases:
            with PeakMemory(device) as mem:
                start = _clock()
                case.run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                case.times.append(_clock() - start)
            case.peaks.append(mem.peak_bytes)


def profile_step(case: Case, rows: int = 12) -> None:
    """Print where one step of ``case`` spends its time (``torch.profiler``, by operator)."""
    from torch.profiler import profile

    with profile() as prof:
        case.run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    print(f"  profile of one {case.dtype} step of {case.name} (self time, share of the step):")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]:
        print(f"    {e.key[:60]:60s} {e.self_cpu_time_total / 1e3:9.1f} ms {e.self_cpu_time_total / total:6.1%}  "
              f"x{e.count}")


@dataclass
class Row:
    part: str
    ours: Case
    base: Case | None
    note: str = ""


class Report:
    """Collects the rows and prints the table."""

    def __init__(self, peaks: dict[str, float]):
        self.rows: list[Row] = []
        self.peaks = peaks  # dtype -> FLOP/s

    def add(self, part: str, ours: Case, base: Case | None, note: str = "") -> None:
        self.rows.append(Row(part, ours, base, note))
        self.print_row(self.rows[-1])

    def fraction(self, case: Case) -> str:
        peak = self.peaks.get(case.dtype)
        if not peak or not case.flops:
            return "-"
        return f"{case.flops / case.seconds / peak:.0%}"

    def print_header(self) -> None:
        print(f"{'comparison':34s} {'ours':>12s} {'baseline':>22s} {'ratio':>6s} "
              f"{'peak MiB ours/base':>19s} {'peak frac ours/base':>20s}")

    def print_row(self, row: Row) -> None:
        o, b = row.ours, row.base
        base_s = f"{b.img_s:8.2f} {b.name[:12]:>12s}" if b else "-"
        ratio = f"{o.img_s / b.img_s:5.2f}x" if b else "-"
        mem = f"{o.peak_mib:8.0f} / {b.peak_mib:<8.0f}" if b else "-"
        frac = f"{self.fraction(o):>6s} / {self.fraction(b) if b else '-':<6s}"
        rounds = " ".join(f"{t:.2f}" for t in o.times) + (" | " + " ".join(f"{t:.2f}" for t in b.times) if b else "")
        note = f"[s/round: {rounds}]" + (f" {row.note}" if row.note else "")
        label = f"{row.part} {o.dtype} {o.name}"
        print(f"{label[:34]:34s} {o.img_s:8.2f}/s {base_s:>22s} {ratio:>6s} {mem:>19s} {frac:>20s}"
              + f"  {note}", flush=True)


# ---------------------------------------------------------------------------- parts
def measure_peak(device: torch.device, size: int, reps: int = 5) -> dict[str, float]:
    """Best-of-``reps`` FLOP/s of a [size, size] @ [size, size] matmul in fp32 and bf16."""
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = _clock()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, _clock() - start)
        peaks[name] = 2 * size**3 / best
        print(f"matmul peak {name}: {peaks[name] / 1e9:8.1f} GFLOP/s ({size}x{size}, best of {reps})", flush=True)
    return peaks


def part_data(args: argparse.Namespace, report: Report) -> None:
    """Decode + augment throughput of JPEG photos (skimage's sample photographs, ImageNet-sized)."""
    import numpy as np
    from PIL import Image

    from pretrain.data import build_transform, load_rgb

    try:
        from importlib import resources

        names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
        photos = []
        for name in names:
            with resources.as_file(resources.files("skimage.data") / name) as p:
                if p.exists():
                    photos.append(Image.open(p).convert("RGB"))
    except ImportError:
        photos = []
    if not photos:  # no scikit-image: smooth random images (JPEG decodes the same amount of data)
        rng = np.random.default_rng(0)
        photos = [Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)) for _ in range(4)]
    transform = build_transform("crop_rand", args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, img in enumerate(photos):
            img = img.resize((500, 375)) if img.width >= img.height else img.resize((375, 500))
            path = Path(tmp) / f"{i}.jpg"
            img.save(path, quality=90)
            files.append(path)
        n = args.data_images

        def load() -> None:
            for i in range(n):
                transform(load_rgb(files[i % len(files)]))

        case = Case("decode+aug", load, n)
        interleave([case], args.steps, 1, torch.device("cpu"), flops=False)
    report.add("data (500x375 JPEG)", case, None, note="one process; a DataLoader runs one per worker")


def _hf_mae(size: str, img_size: int, norm_eps: float) -> Any:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    dim, depth, heads = SIZES[size]
    cfg = ViTMAEConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                       intermediate_size=4 * dim, hidden_act="gelu", layer_norm_eps=norm_eps,
                       image_size=img_size, patch_size=16, num_channels=3, qkv_bias=True,
                       decoder_num_attention_heads=16, decoder_hidden_size=512, decoder_num_hidden_layers=8,
                       decoder_intermediate_size=2048, mask_ratio=0.75, norm_pix_loss=True,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return ViTMAEForPreTraining(cfg)


def _hf_adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """torch's AdamW with its default implementation; MAE's betas and no-decay rule."""
    skip = ("position_embeddings", "cls_token", "mask_token")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or any(s in name for s in skip) else decay).append(p)
    return torch.optim.AdamW([dict(params=decay, weight_decay=0.05), dict(params=no_decay, weight_decay=0.0)],
                             lr=lr, betas=(0.9, 0.95))


def part_pretrain(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    from pretrain.model import create_mae
    from pretrain.optim import LowPrecisionWeights, build_optimizer

    name = {"base": "mae_vit_base_patch16", "large": "mae_vit_large_patch16"}[args.model]
    lr = 1.5e-4 * args.batch / 256
    torch.manual_seed(0)
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    num = (args.img_size // 16) ** 2
    gen = torch.Generator().manual_seed(0)
    noises = [torch.rand(args.batch, num, generator=gen).to(device) for _ in range(4)]
    counter = [0]

    def noise() -> torch.Tensor:  # same sequence of masks for every case
        counter[0] += 1
        return noises[counter[0] % len(noises)]

    def ours_step(model: torch.nn.Module, opt: Any, amp: bool) -> Callable[[], float]:
        def run() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, _, _ = model(imgs, 0.75, noise=noise())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return run

    def hf_step(model: torch.nn.Module, opt: Any, amp: bool) -> Callable[[], float]:
        def run() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model(pixel_values=imgs, noise=noise()).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return run

    for precision in args.precisions:
        amp = precision == "bf16"
        torch.manual_seed(0)
        ours = create_mae(name, img_size=args.img_size, target="norm_pixel").to(device).train()
        hf = _hf_mae(args.model, args.img_size, 1e-6).to(device).train()
        cases = []
        if amp:
            plain = copy.deepcopy(ours)
            fast = LowPrecisionWeights(ours, lambda m: build_optimizer(m, lr, 0.05))
            cases.append(Case("ours", ours_step(ours, fast, True), args.batch, precision))
            cases.append(Case("ours-autocast", ours_step(plain, build_optimizer(plain, lr, 0.05), True),
                              args.batch, precision))
        else:
            cases.append(Case("ours", ours_step(ours, build_optimizer(ours, lr, 0.05), False), args.batch, precision))
        cases.append(Case("HF ViTMAE", hf_step(hf, _hf_adamw(hf, lr), amp), args.batch, precision))
        interleave(cases, args.steps, args.warmup, device)
        for case in cases[:-1]:
            report.add(f"pretrain {args.model}", case, cases[-1])
        if args.profile:
            for case in (cases[0], cases[-1]):
                profile_step(case)
        del ours, hf, cases


def part_features(args: argparse.Namespace, report: Report, device: torch.device) -> None:
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

        def run(model: torch.nn.Module, fn: str) -> Callable[[], Any]:
            def go() -> Any:
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    return getattr(model, fn)(x)
            return go

        cases = [Case("ours", run(net, "forward_features"), args.feat_batch, precision),
                 Case("timm ViT", run(theirs, "forward_features"), args.feat_batch, precision)]
        interleave(cases, args.steps, args.warmup, device)
        report.add(f"features {args.model}", cases[0], cases[1])


def part_detection(args: argparse.Namespace, report: Report, device: torch.device) -> None:
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
        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(image)
                loss = sum(o.float().mean() for o in out.values())
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    cases = [Case("windowed", step(build(True)), 1, args.det_precision),
             Case("all-global", step(build(False)), 1, args.det_precision)]
    interleave(cases, args.det_steps, args.det_warmup, device)
    ratio = cases[0].peak_mib / cases[1].peak_mib
    report.add(f"detection {size}px", cases[0], cases[1],
               note=f"memory windowed/global {ratio:.0%} (rel-pos {args.rel_pos_impl})")


def part_segmentation(args: argparse.Namespace, report: Report, device: torch.device) -> None:
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
            def run() -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = sum(f.float().mean() for f in model(x))
                loss.backward()
                model.zero_grad(set_to_none=True)
            return run

        cases = [Case("ours", step(ours), args.seg_batch, precision),
                 Case("MMSeg MAE", step(theirs), args.seg_batch, precision)]
        interleave(cases, args.steps, args.warmup, device)
        report.add(f"segmentation {size}px +neck", cases[0], cases[1])


# ---------------------------------------------------------------------------- entry point
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    p.add_argument("--clock", choices=tuple(CLOCK), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, steadier on a machine others load "
                        "(use with --threads 1, where no thread waits spinning; CPU only)")
    p.add_argument("--steps", type=int, default=2, help="timed rounds per comparison (median; default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per case first (default %(default)s)")
    p.add_argument("--peak-size", type=int, default=0, help="GEMM side for the peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--model", choices=tuple(SIZES), default="base", help="ViT size for pretrain/features")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--profile", action="store_true", help="print a per-operator profile of ours and HF's pretraining step")
    p.add_argument("--batch", type=int, default=8, help="pretraining batch (default %(default)s)")
    p.add_argument("--feat-batch", type=int, default=16, help="feature-extraction batch (default %(default)s)")
    p.add_argument("--data-images", type=int, default=32, help="images per data-loading round")
    p.add_argument("--det-size", type=int, default=1024)
    p.add_argument("--det-precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--det-steps", type=int, default=1, help="timed rounds for detection (default %(default)s)")
    p.add_argument("--det-warmup", type=int, default=1, help="untimed detection steps first (default %(default)s)")
    p.add_argument("--rel-pos-impl", choices=("fused", "mask"), default="fused",
                   help="relative-position attention in the detection backbone (default %(default)s)")
    p.add_argument("--det-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--seg-size", type=int, default=512)
    p.add_argument("--seg-batch", type=int, default=2)
    return p


def run(args: argparse.Namespace) -> int:
    global _clock
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("bench-speed: --clock cpu measures CPU work; on a GPU use the wall clock")
    _clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench-speed: torch {torch.__version__}, {where}, {args.clock} clock; median of {args.steps} interleaved rounds "
          f"after {args.warmup} warm-up step(s)", flush=True)
    peaks: dict[str, float] = {}
    if "peak" in args.parts:
        peaks = measure_peak(device, args.peak_size or (8192 if device.type == "cuda" else 2048))
    report = Report(peaks)
    report.print_header()
    parts = {"data": lambda: part_data(args, report),
             "pretrain": lambda: part_pretrain(args, report, device),
             "features": lambda: part_features(args, report, device),
             "detection": lambda: part_detection(args, report, device),
             "segmentation": lambda: part_segmentation(args, report, device)}
    for name in PARTS[1:]:
        if name in args.parts:
            parts[name]()
    print(f"img/s: images per {args.clock}-clock second (median step); ratio: ours / baseline; peak MiB: memory the step itself "
          "allocates; peak frac: counted FLOPs per second / measured matmul peak of that precision")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
