"""``mae-transfer bench``: named backbones through identical transfer recipes -> one table.

Every (backbone, task, seed) cell is one call of ``mae_transfer.runners.run_task``, the function the
demo uses, with the same data, schedule and seed for every backbone; only the checkpoint and its
layer decay differ. Cells that fail are shown with their error and the others still run; Ctrl-C
writes the table of what finished. Outputs in the output folder:

    bench.md    the table (mean, std over seeds, n, per-seed values, published reference)
    bench.csv   the same rows, one column per field
    bench.png   grouped bars with the std as error bars, one panel per task metric
    bench.json  every cell (metrics, error, seconds)
    runs/<backbone>/<task>/seed<k>/   each run's own folder (framework logs, configs, weights)
"""
from __future__ import annotations

import csv
import json
import math
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from mae_transfer import runners
from mae_transfer.runners import TASK_METRICS, TASKS, Arch, Backbone, DataPaths, Recipe, TaskResult, checkpoint_arch
from mae_transfer.runners.logfile import stage_output
from mae_transfer.reference import METHODS, lookup

BASELINES = ("mae", "mocov3", "supervised")  # what ``--pretrain`` can produce (mae_transfer.baselines)
# With the demo recipe (a tiny encoder, minutes of CPU) the published pretraining recipes are sized for
# another scale: MAE's 8 x 512 decoder outweighs the encoder many times, MoCo v3's 4096-wide heads too,
# and their base learning rates at batch 32 are ~1e-5.  These keep each method's recipe otherwise.
DEMO_PRETRAIN_OPTIONS: dict[str, dict[str, Any]] = {
    "mae": {"decoder_depth": 2, "decoder_dim": 128, "decoder_heads": 4, "blr": 8e-3},  # the demo's MAE
    "mocov3": {"moco_proj_hidden": 512, "moco_pred_hidden": 512, "moco_dim": 128, "blr": 1.5e-3},
    "supervised": {},
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def parse_backbone(spec: str) -> Backbone:
    """``random`` (random init) or ``NAME=PATH`` (a checkpoint in any format mae_backbone reads)."""
    if spec == "random":
        return Backbone("random", None, method="scratch")
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"backbone {spec!r}: expected NAME=PATH (a checkpoint) or 'random'")
    if not _NAME.match(name):
        raise ValueError(f"backbone name {name!r}: use letters, digits and _ . + - (it names a folder)")
    if not Path(path).exists():
        raise FileNotFoundError(f"backbone {name!r}: no such checkpoint {path}")
    return Backbone(name, Path(path))


def parse_assignments(items: Sequence[str], what: str, convert: Callable[[str], Any]) -> dict[str, Any]:
    """``NAME=VALUE`` options (``--layer-decay``, ``--method``)."""
    found = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"--{what} {item!r}: expected NAME=VALUE")
        try:
            found[name] = convert(value)
        except ValueError as exc:
            raise ValueError(f"--{what} {item!r}: {exc}") from None
    return found


def _method(value: str) -> str:
    if value not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}")
    return value


@dataclass
class Cell:
    backbone: str
    task: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)  # metric -> why it is 0 or NaN (e.g. no detections)


@dataclass
class Row:
    """One (backbone, task, metric) line of the table."""

    backbone: str
    task: str
    metric: str
    values: list[float]
    errors: list[str]
    reference: float | None = None
    reference_source: str = ""
    notes: list[str] = field(default_factory=list)  # "seed k: why the value is 0 or NaN"

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (ddof 1); None with fewer than 2 values."""
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))


@dataclass
class BenchResult:
    cells: list[Cell]
    rows: list[Row]
    finished: bool
    files: dict[str, Path]


def summarize(cells: Sequence[Cell], backbones: Sequence[Backbone], tasks: Sequence[str], arch: Arch,
              recipe: Recipe) -> list[Row]:
    """One row per (backbone, task, metric), in the order asked; published numbers where they apply."""
    rows = []
    for b in backbones:
        for task in tasks:
            mine = [c for c in cells if c.backbone == b.name and c.task == task]
            for metric in TASK_METRICS[task]:
                ref = lookup(task, metric, b.method, arch.size if recipe.name == "paper" else None)
                rows.append(Row(b.name, task, metric, [c.metrics[metric] for c in mine if metric in c.metrics],
                                [f"seed {c.seed}: {c.error}" for c in mine if c.error],
                                ref.value if ref else None, ref.source if ref else "",
                                [f"seed {c.seed}: {c.notes[metric]}" for c in mine if metric in c.notes]))
    return rows


def _fmt(v: float | None, digits: int = 2) -> str:
    """A number for the table: empty when there is none, ``n.a.`` when it is NaN (see the notes)."""
    if v is None:
        return ""
    return "n.a." if math.isnan(v) else f"{v:.{digits}f}"


def write_table(rows: Sequence[Row], out: Path, title: str, notes: Sequence[str] = ()) -> dict[str, Path]:
    """``bench.md``, ``bench.csv`` and ``bench.png`` (bars: mean, error bars: std) for ``rows``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"md": out / "bench.md", "csv": out / "bench.csv", "png": out / "bench.png"}
    header = ["backbone", "task", "metric", "mean", "std", "n", "per seed", "published", "errors and notes"]
    lines = [f"# {title}", "", *notes, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table = []
    for r in rows:
        rec = [r.backbone, r.task, r.metric, _fmt(r.mean), _fmt(r.std), str(r.n),
               " / ".join(_fmt(v) for v in r.values), _fmt(r.reference, 1) if r.reference is not None else "n/a",
               "; ".join(r.errors + r.notes)]
        table.append(rec)
        md = rec[:8] + [("`" + rec[8].replace("|", "/") + "`") if rec[8] else ""]
        lines.append("| " + " | ".join(md) + " |")
    sources = sorted({r.reference_source for r in rows if r.reference_source})
    if sources:
        lines += ["", "Published numbers: " + "; ".join(sources) + "."]
    lines += ["", "std: sample standard deviation over the seeds (n - 1 in the denominator); empty with one seed."]
    files["md"].write_text("\n".join(lines) + "\n")
    with open(files["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(table)
    _plot(rows, files["png"], title)
    return files


def _plot(rows: Sequence[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r.task, r.metric) for r in rows))
    names = list(dict.fromkeys(r.backbone for r in rows))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(2.2 + 2.0 * max(1, len(panels)), 3.4), dpi=100,
                             squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels):
        got = {r.backbone: r for r in rows if (r.task, r.metric) == (task, metric)}
        xs = range(len(names))
        means = [got[n].mean if n in got and got[n].mean is not None else 0.0 for n in names]
        stds = [got[n].std or 0.0 if n in got else 0.0 for n in names]
        ax.bar(xs, means, yerr=stds, capsize=4, color=[f"C{i}" for i in xs])
        for x, n in zip(xs, names):
            if n in got and got[n].mean is None:
                ax.text(x, 0, "failed", ha="center", va="bottom", rotation=90, fontsize=8)
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task}: {metric}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass
class BenchPlan:
    """What to run: every backbone x task x seed, through one recipe on one data set."""

    backbones: list[Backbone]
    tasks: list[str]
    seeds: list[int]
    recipe: Recipe
    data: DataPaths


def resolve_arch(backbones: Sequence[Backbone], default: Arch) -> Arch:
    """The one architecture of the comparison: the checkpoints' (all alike), else ``default``."""
    archs = {b.name: checkpoint_arch(b.checkpoint) for b in backbones if b.checkpoint is not None}
    distinct = set(archs.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{n}: {a}" for n, a in archs.items())
        raise ValueError(f"the backbones differ in architecture ({listing}); a comparison needs one architecture")
    return distinct.pop() if distinct else default


def run_bench(plan: BenchPlan, out: str | Path, log: Callable[[str], None] = print,
              runner: Callable[..., TaskResult] | None = None) -> BenchResult:
    """Run every cell of ``plan`` and write the table; ``runner`` defaults to ``runners.run_task``, the
    demo's task runner (replaceable in tests)."""
    runner = runner or runners.run_task
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    for task in plan.tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    names = [b.name for b in plan.backbones]
    if len(set(names)) != len(names):
        raise ValueError(f"backbone names must be unique, got {names}")
    todo = [(b, t, s) for b in plan.backbones for t in plan.tasks for s in plan.seeds]
    cells: list[Cell] = []
    finished = False
    t0 = time.perf_counter()
    try:
        for i, (backbone, task, seed) in enumerate(todo, 1):
            spent = time.perf_counter() - t0
            eta = f", ETA {spent / (i - 1) * (len(todo) - i + 1):.0f} s" if i > 1 else ""
            log(f"[{i}/{len(todo)}] {backbone.name} / {task} / seed {seed} ... (elapsed {spent:.0f} s{eta})")
            run_dir = out / "runs" / backbone.name / task / f"seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            cell = Cell(backbone.name, task, seed)
            t = time.perf_counter()
            try:
                with stage_output(run_dir / "run.log"):
                    result = runner(task, backbone, plan.recipe, plan.data, seed, run_dir)
                cell.metrics, cell.notes = dict(result.metrics), dict(result.notes)
            except Exception as exc:  # a failed cell is shown in the table; the others still run
                cell.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                (run_dir / "error.txt").write_text(traceback.format_exc())
                log(f"[{i}/{len(todo)}] FAILED: {cell.error} (details in {run_dir / 'error.txt'})")
            finally:
                cell.seconds = time.perf_counter() - t
            cells.append(cell)
            if cell.error is None:
                shown = [f"{k} {_fmt(v)}" + (f" ({cell.notes[k]})" if k in cell.notes else "")
                         for k, v in cell.metrics.items()]
                log(f"[{i}/{len(todo)}] " + ", ".join(shown) + f" ({cell.seconds:.0f} s)")
        finished = True
    finally:
        rows = summarize(cells, plan.backbones, plan.tasks, plan.recipe.arch, plan.recipe)
        notes = [f"Recipe: {plan.recipe.name}; architecture {plan.recipe.arch}; seeds "
                 f"{', '.join(map(str, plan.seeds))}; every backbone through the same data, schedule and seeds "
                 "(only the checkpoint and its layer decay differ).",
                 "Published numbers are shown only for the published recipe at a published model size (ViT-B/L/H); "
                 "'n/a' otherwise." + ("" if plan.recipe.name == "paper" else
                                        " This run used the small demo recipe, so none apply.")]
        if not finished:
            notes.insert(0, f"**Interrupted** after {len(cells)} of {len(todo)} runs: the table shows what finished.")
        files = write_table(rows, out, "mae-transfer bench", notes)
        files["json"] = out / "bench.json"
        files["json"].write_text(json.dumps({"finished": finished, "cells": [asdict(c) for c in cells],
                                             "backbones": [{**asdict(b), "checkpoint": str(b.checkpoint or "")}
                                                           for b in plan.backbones]}, indent=2))
        log(f"table: {files['md']}")
    return BenchResult(cells, rows, finished, files)


def pretrain_baselines(methods: Sequence[str], data: Path, out: Path, recipe: Recipe, epochs: int,
                       batch_size: int = 32, seed: int = 0, log: Callable[[str], None] = print) -> list[Backbone]:
    """Pretrain each of ``methods`` with the same budget on ``data``; the encoders as backbones."""
    from mae_transfer.baselines import pretrain_backbone

    found = []
    for method in methods:
        if method not in BASELINES:
            raise ValueError(f"--pretrain {method!r}: known methods are {', '.join(BASELINES)}")
        log(f"pretraining {method} on {data} ({epochs} epochs) ...")
        t = time.perf_counter()
        path = pretrain_backbone(method, data, out / "pretrain" / method, encoder=recipe.arch.name,
                                 encoder_kwargs=recipe.arch.overrides, img_size=recipe.img_size, epochs=epochs,
                                 batch_size=batch_size, seed=seed, log=log,
                                 options=DEMO_PRETRAIN_OPTIONS[method] if recipe.name == "demo" else None)
        log(f"pretrained {method}: {path} ({time.perf_counter() - t:.0f} s)")
        found.append(Backbone(method, Path(path), method=method))
    return found
