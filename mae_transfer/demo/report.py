"""The demo's Markdown report (``report.md``) and its machine-readable twin (``results.json``)."""
from __future__ import annotations

import json
from pathlib import Path

from mae_transfer.demo.context import INIT_LABELS, INITS, DemoContext
from mae_transfer.demo.figures import plot_bars

RESULT_ROWS = (  # (stage, result key, metric title)
    ("finetune", "finetune:top-1", "top-1 (%)"), ("linprobe", "linprobe:top-1", "top-1 (%)"),
    ("partial", "partial:top-1", "top-1 (%)"), ("segment", "segment:mIoU", "mIoU (%)"),
    ("detect", "detect:AP box", "AP box"), ("detect", "detect:AP mask", "AP mask"),
)


def _verdict(mae: float, random: float) -> str:
    if mae > random:
        return "MAE higher"
    return "random init higher" if random > mae else "tie"


def plot_results(ctx: DemoContext, path: Path) -> Path | None:
    """The results table as grouped bars, MAE vs random init (None: no stage has both numbers)."""
    groups = [(f"{stage}\n{metric}", {INIT_LABELS[i]: ctx.results[key][i] for i in INITS})
              for stage, key, metric in RESULT_ROWS if key in ctx.results and all(i in ctx.results[key] for i in INITS)]
    return plot_bars(groups, "results: MAE vs random init (same recipe, same seed)", path)


def write_report(ctx: DemoContext, finished: bool) -> Path:
    """``ctx.out/report.md`` (results table, failed stages, figures, timings) and ``results.json``."""
    plan = ctx.plan
    lines = ["# mae-transfer demo report", ""]
    if not finished:
        lines += ["**Interrupted**: the report shows the stages that finished.", ""]
    lines += [f"Mode: {'quick' if plan.quick else 'full'}; seed {plan.seed}; encoder {plan.recipe.arch}, "
              f"{plan.recipe.img_size} px classification, {plan.recipe.seg_size} px scenes. One run per cell: "
              "the differences are a single seed's, not a measured spread.", ""]
    lines += ["## Results", "", "| task | metric | MAE | random init | |", "|---|---|---|---|---|"]
    if ctx.stages:
        stages = ctx.stages
    else:
        from mae_transfer.demo.stages import STAGES as stages
    for key, (title, _, _) in stages.items():
        if key in ctx.errors:
            lines.append(f"| {title} | **failed** | `{ctx.errors[key]}` | | see error_{key}.txt |")
            continue
        for stage, rkey, metric in RESULT_ROWS:
            res = ctx.results.get(rkey)
            if stage == key and res and all(i in res for i in INITS):
                lines.append(f"| {title} | {metric} | {res['mae']:.2f} | {res['random']:.2f} | "
                             f"{_verdict(res['mae'], res['random'])} |")
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
        {"finished": finished, "results": ctx.results, "errors": ctx.errors, "timings": ctx.timings},
        indent=2, default=str))
    return report
