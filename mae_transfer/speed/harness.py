"""The measuring harness every part shares: interleaved timing, medians, peak memory, FLOPs, the table.

The two sides of a comparison alternate repetition by repetition (ours, baseline, ours, baseline ...)
and medians are reported, so that a load that comes and goes on a shared machine hits both alike.

Peak memory: on a GPU ``max_memory_allocated`` per call; on the CPU the resident set size sampled
every 2 ms during the call, minus its level just before the call (so the model's own weights and
optimizer state are not counted; what is counted is what the call itself allocates).
FLOPs are counted with ``torch.utils.flop_counter`` on one call of each case.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock: Callable[[], float] = time.perf_counter


def set_clock(name: str) -> None:
    """Time every later measurement with ``CLOCK[name]`` (``wall`` or ``cpu``)."""
    global _clock
    _clock = CLOCK[name]


def now() -> float:
    """The current reading of the chosen clock, in seconds."""
    return _clock()


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
                start = now()
                case.run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                case.times.append(now() - start)
            case.peaks.append(mem.peak_bytes)


def loop_step(fast: Any, batches: Any, optimizer: Any, recipe: Any, device: torch.device) -> Callable[[], float]:
    """One pass over ``batches`` through the shared training loop (``training.loop.train_one_epoch``)
    with ``fast`` (``training.fastpath.fast_path``) and ``recipe`` (a trainer's step): the step as the
    CLI runs it. A compiled path is compiled here, outside the timing and the FLOP count."""
    from pathlib import Path

    from training.distributed import DistInfo
    from training.loop import Counters, train_one_epoch
    from training.monitor import Monitor

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    monitor, counters = Monitor(Path("."), enabled=False), Counters()

    def step() -> float:
        stats = train_one_epoch(fast.step_model, batches, 1, optimizer, scaler, recipe, counters, 0, info, monitor,
                                working=fast.working)
        return stats.mean_loss

    if fast.compiled:
        step()
    return step


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
    key: str | None = None  # the part's name in the JSON summary (``Report.summary``); None: not in it


class Report:
    """Collects the rows and prints the table."""

    def __init__(self, peaks: dict[str, float]):
        self.rows: list[Row] = []
        self.peaks = peaks  # dtype -> FLOP/s

    def add(self, part: str, ours: Case, base: Case | None, note: str = "", key: str | None = None) -> None:
        """Print a row; ``key`` (e.g. ``"pretrain"``) also puts it in ``summary()`` under ``key`` and
        the dtype of ``ours``."""
        self.rows.append(Row(part, ours, base, note, key))
        self.print_row(self.rows[-1])

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{key: {dtype: {"ours", "baseline" (img/s), "ratio", "ours_peak_mib", "baseline_peak_mib",
        "ours_name", "baseline_name", "ours_peak_fraction", "baseline_peak_fraction"}}}`` of the rows
        added with a ``key`` and a baseline (what ``--json`` writes)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for row in self.rows:
            o, b = row.ours, row.base
            if row.key is None or b is None:
                continue
            peak = self.peaks.get(o.dtype)
            out.setdefault(row.key, {})[o.dtype] = {
                "ours": o.img_s, "baseline": b.img_s, "ratio": o.img_s / b.img_s,
                "ours_peak_mib": o.peak_mib, "baseline_peak_mib": b.peak_mib,
                "ours_name": o.name, "baseline_name": b.name,
                "ours_peak_fraction": o.flops / o.seconds / peak if peak and o.flops else None,
                "baseline_peak_fraction": b.flops / b.seconds / peak if peak and b.flops else None,
                "note": row.note,
            }
        return out

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
