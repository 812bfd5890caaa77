"""The demo's Markdown report (``report.md``) and its machine-readable twin (``results.json``).

Each result cell holds one value per seed. A cell of several seeds shows mean ± std (sample
standard deviation, as ``mae-transfer bench``); one init is called *ahead* only when the two
mean ± std ranges do not overlap, i.e. the difference of the means exceeds the sum of the two
spreads. A one-seed cell says so, and its difference is not called ahead.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from mae_transfer.bench import Row
from mae_transfer.demo.context import INIT_LABELS, INITS, DemoContext
from mae_transfer.demo.figures import plot_bars

RESULT_ROWS = (  # (stage, result key, metric title)
    ("finetune", "finetune:top-1", "top-1 (%)"), ("linprobe", "linprobe:top-1", "top-1 (%)"),
    ("partial", "partial:top-1", "top-1 (%)"), ("segment", "segment:mIoU", "mIoU (%)"),
    ("detect", "detect:AP box", "AP box"), ("detect", "detect:AP mask", "AP mask"),
)


def _stats(values: Sequence[float]) -> Row:
    """mean / std over seeds, computed as ``mae-transfer bench`` does (NaN: the metric had no value)."""
    return Row("", "", "", [float(v) for v in values], [])


def cell_text(values: Sequence[float]) -> str:
    """``61.50 ± 1.20`` over several seeds, ``61.50`` for one, ``n.a.`` for a missing number."""
    s = _stats(values)
    if s.mean is None or math.isnan(s.mean):
        return "n.a."
    return f"{s.mean:.2f} ± {s.std:.2f}" if s.std is not None else f"{s.mean:.2f}"


def verdict(mae: Sequence[float], random: Sequence[float]) -> str:
    """Which init is ahead, and whether the seeds say so (see the module's docstring)."""
    a, b = _stats(mae), _stats(random)
    if a.mean is None or b.mean is None or math.isnan(a.mean) or math.isnan(b.mean):
        return "n.a."
    if a.n < 2 or b.n < 2:
        leader = "MAE higher" if a.mean > b.mean else "random init higher" if b.mean > a.mean else "tie"
        return f"{leader} (one seed: no spread measured)"
    gap, spread = a.mean - b.mean, a.std + b.std
    if abs(gap) > spread:
        who = "MAE" if gap > 0 else "random init"
        return f"**{who} ahead** by {abs(gap):.2f} (> spread {spread:.2f})"
    return f"within the seed spread ({abs(gap):.2f} <= {spread:.2f})"


def _seeds_text(values: Sequence[float]) -> str:
    return "one seed" if len(values) == 1 else f"{len(values)} seeds"


def plot_results(ctx: DemoContext, path: Path) -> Path | None:
    """The results table as grouped bars (mean, std as error bars), MAE vs random init (None: no
    stage has both numbers)."""
    groups, errors = [], []
    for stage, key, metric in RESULT_ROWS:
        res = ctx.results.get(key)
        if res and all(i in res for i in INITS):
            stats = {INIT_LABELS[i]: _stats(res[i]) for i in INITS}
            groups.append((f"{stage}\n{metric}", {n: s.mean if s.mean is not None and not math.isnan(s.mean) else 0.0
                                                   for n, s in stats.items()}))
            errors.append({n: s.std or 0.0 for n, s in stats.items()})
    return plot_bars(groups, "results: MAE vs random init (same recipe and seeds; bars: mean, whiskers: std)", path,
                     errors)


def write_report(ctx: DemoContext, finished: bool) -> Path:
    """``ctx.out/report.md`` (results table, failed stages, figures, timings) and ``results.json``."""
    plan = ctx.plan
    lines = ["# mae-transfer demo report", ""]
    if not finished:
        lines += ["**Interrupted**: the report shows the stages that finished.", ""]
    lines += [f"Mode: {'quick' if plan.quick else 'full'}; encoder {plan.recipe.arch}, {plan.recipe.img_size} px "
              f"classification, {plan.recipe.seg_size} px scenes. Classification protocols: seeds "
              f"{', '.join(map(str, plan.cls_seeds))}, mean ± std (sample std); segmentation and detection: seed "
              f"{plan.seed} only. An init is called ahead only when the mean ± std ranges do not overlap.", ""]
    lines += ["## Results", "", "| task | metric | MAE | random init | seeds | |", "|---|---|---|---|---|---|"]
    if ctx.stages:
        stages = ctx.stages
    else:
        from mae_transfer.demo.stages import STAGES as stages
    for key, (title, _, _) in stages.items():
        if key in ctx.errors:
            lines.append(f"| {title} | **failed** | `{ctx.errors[key]}` | | | see error_{key}.txt |")
            continue
        for stage, rkey, metric in RESULT_ROWS:
            res = ctx.results.get(rkey)
            if stage == key and res and all(i in res for i in INITS):
                why = "; ".join(f"{INIT_LABELS[i]}: {n}" for i, n in ctx.notes.get(rkey, {}).items())
                lines.append(f"| {title} | {metric} | {cell_text(res['mae'])} | {cell_text(res['random'])} | "
                             f"{_seeds_text(res['mae'])} | {verdict(res['mae'], res['random'])}"
                             f"{f' ({why})' if why else ''} |")
    if any(k.endswith(":top-1") for k in ctx.results):
        from mae_transfer.sample_data import CATEGORIES

        lines += ["", f"Chance level of the classification tasks: {100 / len(CATEGORIES):.0f}% "
                  f"({len(CATEGORIES)} balanced classes)."]
    for key in ("data", "pretrain"):
        if key in ctx.results and key in stages:
            lines += ["", f"{stages[key][0]}: " + ", ".join(f"{k} {v}" for k, v in ctx.results[key].items())]
    bars = plot_results(ctx, ctx.out / "figures" / "results.png")
    figures = ({"results": bars} if bars else {}) | ctx.figures
    lines += ["", "## Figures", ""]
    for name, path in figures.items():
        lines += [f"### {name}", "", f"![{name}]({Path(path).relative_to(ctx.out)})", ""]
    lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stages[k][0]} | {v:.1f} |" for k, v in ctx.timings.items()]
    lines += [f"| total | {sum(ctx.timings.values()):.1f} |"]
    report = ctx.out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (ctx.out / "results.json").write_text(json.dumps(
        {"finished": finished, "results": ctx.results, "notes": ctx.notes, "errors": ctx.errors,
         "timings": ctx.timings}, indent=2, default=str))
    return report
