"""The end-to-end demo: sample data -> MAE pretraining -> transfer, MAE vs random init -> report.

Every stage is a function ``stage(ctx) -> None`` that records results in ``ctx``; ``run_demo``
runs them in order with a progress line (stage, elapsed, ETA), keeps going when one fails (the
report shows its error), and writes the report also when interrupted with Ctrl-C.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

INITS = ("mae", "random")


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo; ``quick`` is the ~3-minute smoke run, the default fits 15 minutes on 2 cores."""

    quick: bool = False
    seed: int = 0
    encoder: str = "vit_tiny_patch16"
    encoder_kwargs: dict = field(default_factory=lambda: {"depth": 6})
    img_size: int = 64
    pretrain_epochs: int = 40
    cls_epochs: int = 8

    @classmethod
    def make(cls, quick: bool, seed: int = 0) -> "DemoPlan":
        if quick:
            return cls(quick=True, seed=seed, encoder_kwargs={"depth": 2}, pretrain_epochs=3, cls_epochs=1)
        return cls(seed=seed)


@dataclass
class DemoContext:
    out: Path
    plan: DemoPlan
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> init -> metric
    errors: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    artefacts: dict[str, Path] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.out / "data"


# --------------------------------------------------------------------------- stages
def stage_data(ctx: DemoContext) -> None:
    from mae_transfer.sample_data import write_sample_data

    summary = write_sample_data(ctx.data, seed=ctx.plan.seed)
    ctx.results["data"] = {k: v for k, v in summary.items() if isinstance(v, int) and k != "seed"}


def stage_pretrain(ctx: DemoContext) -> None:
    from pretrain import make_config, train

    plan = ctx.plan
    cfg = make_config({
        "data": str(ctx.data / "classification" / "train"), "output": str(ctx.out / "pretrain"),
        "model": "mae_" + plan.encoder, "img_size": plan.img_size,
        "model_kwargs": dict(plan.encoder_kwargs, patch_size=8),
        "decoder_depth": 2, "decoder_dim": 128, "decoder_heads": 4,
        "epochs": plan.pretrain_epochs, "warmup_epochs": max(1, plan.pretrain_epochs // 10),
        "batch_size": 32, "blr": 1.5e-3, "num_workers": 0, "seed": plan.seed, "progress": False,
        "vis_every": plan.pretrain_epochs, "vis_images": 6, "save_every": plan.pretrain_epochs,
        "tensorboard": False,
    })
    result = train(cfg)
    losses = [h["loss"] for h in result.history if h.get("type", "epoch") == "epoch" and "loss" in h]
    ctx.artefacts["encoder"] = result.encoder
    ctx.results["pretrain"] = {"first loss": round(losses[0], 4), "last loss": round(losses[-1], 4),
                               "epochs": result.epochs_done}
    ctx.figures["pretrain loss"] = _plot_curve(losses, "MAE pretraining loss (per epoch)", "epoch",
                                               ctx.out / "pretrain_loss.png")
    grids = sorted((ctx.out / "pretrain" / "vis").glob("*.png"))
    if grids:
        ctx.figures["reconstructions"] = grids[-1]


def _classify(ctx: DemoContext, task: str, protocol: str, extra: dict[str, Any]) -> None:
    from classification import make_config, train

    plan = ctx.plan
    row: dict[str, Any] = {}
    for init in INITS:
        values = {
            "data": str(ctx.data / "classification"), "output": str(ctx.out / task / init),
            "model": plan.encoder, "model_kwargs": dict(plan.encoder_kwargs, patch_size=8),
            "img_size": plan.img_size, "epochs": plan.cls_epochs, "warmup_epochs": 1,
            "batch_size": 32, "num_workers": 0, "seed": plan.seed, "progress": False, "tensorboard": False,
            **extra,
        }
        if init == "mae":
            values["checkpoint"] = str(_encoder(ctx))
        result = train(make_config(protocol, values))
        row[init] = float(result.history[-1]["val"]["top1"])
        row[f"{init} trained"] = str(result.freeze)
    ctx.results[task] = row


def stage_finetune(ctx: DemoContext) -> None:
    _classify(ctx, "finetune", "finetune", {"blr": 1e-3})


def stage_linprobe(ctx: DemoContext) -> None:
    _classify(ctx, "linprobe", "linprobe", {"blr": 0.1})


def stage_partial(ctx: DemoContext) -> None:
    _classify(ctx, "partial", "finetune", {"blr": 1e-3, "tune_blocks": "1"})


def _encoder(ctx: DemoContext) -> Path:
    """The encoder of this run's pretrain stage, or of an earlier run in the same folder (--only)."""
    from pretrain import ENCODER_NAME

    enc = ctx.artefacts.get("encoder") or ctx.out / "pretrain" / ENCODER_NAME
    if not Path(enc).is_file():
        raise RuntimeError(f"no pretrained encoder at {enc} (the pretrain stage did not finish)")
    return Path(enc)


STAGES: dict[str, tuple[str, Callable[[DemoContext], None], float]] = {
    # key: (title, function, planned seconds in the full demo on 2 cores -- used for the ETA only)
    "data": ("sample data", stage_data, 5),
    "pretrain": ("MAE pretraining", stage_pretrain, 200),
    "finetune": ("fine-tuning, MAE vs random init", stage_finetune, 80),
    "linprobe": ("linear probing, MAE vs random init", stage_linprobe, 40),
    "partial": ("partial fine-tuning, MAE vs random init", stage_partial, 60),
}


# --------------------------------------------------------------------------- report
def _plot_curve(values: list[float], title: str, xlabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(range(1, len(values) + 1), values, marker=".")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(ctx: DemoContext, finished: bool) -> Path:
    lines = ["# mae-transfer demo report", ""]
    if not finished:
        lines += ["**Interrupted**: the report shows the stages that finished.", ""]
    lines += [f"Mode: {'quick' if ctx.plan.quick else 'full'}; seed {ctx.plan.seed}; encoder "
              f"{ctx.plan.encoder} {ctx.plan.encoder_kwargs} at {ctx.plan.img_size} px.", ""]
    lines += ["## Results", "", "| task | metric | MAE | random init |", "|---|---|---|---|"]
    for key, (title, _, _) in STAGES.items():
        res = ctx.results.get(key)
        if key in ctx.errors:
            lines.append(f"| {title} | failed | `{ctx.errors[key]}` | |")
        elif res and "mae" in res:
            lines.append(f"| {title} | top-1 (%) | {res['mae']:.2f} | {res['random']:.2f} |")
    for key in ("data", "pretrain"):
        if key in ctx.results:
            lines.append("")
            lines.append(f"{STAGES[key][0]}: " + ", ".join(f"{k} {v}" for k, v in ctx.results[key].items()))
    lines += ["", "## Figures", ""]
    for name, path in ctx.figures.items():
        lines += [f"### {name}", "", f"![{name}]({path.relative_to(ctx.out)})", ""]
    lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {STAGES[k][0]} | {v:.1f} |" for k, v in ctx.timings.items()]
    report = ctx.out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (ctx.out / "results.json").write_text(json.dumps({"results": ctx.results, "errors": ctx.errors,
                                                      "timings": ctx.timings}, indent=2, default=str))
    return report


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, only: list[str] | None = None,
             log: Callable[[str], None] = print) -> DemoContext:
    """Run the stages (all, or ``only``) and write ``out/report.md``; returns the context."""
    ctx = DemoContext(Path(out), DemoPlan.make(quick, seed))
    ctx.out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in STAGES if only is None or k in only]
    planned = {k: STAGES[k][2] * (0.2 if quick else 1.0) for k in keys}
    t0 = time.perf_counter()
    finished = False
    try:
        for i, key in enumerate(keys, 1):
            title, fn, _ = STAGES[key]
            spent = sum(ctx.timings.values())
            done_plan = sum(planned[k] for k in ctx.timings)
            pace = spent / done_plan if done_plan else 1.0
            eta = pace * sum(planned[k] for k in keys[i - 1:])
            log(f"[{i}/{len(keys)}] {title} ... (elapsed {time.perf_counter() - t0:.0f} s, ETA {eta:.0f} s)")
            t = time.perf_counter()
            try:
                fn(ctx)
            except Exception as exc:  # a failed stage is reported; the others still run
                ctx.errors[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                (ctx.out / f"error_{key}.txt").write_text(traceback.format_exc())
                log(f"[{i}/{len(keys)}] {title}: FAILED ({ctx.errors[key]}); details in error_{key}.txt")
            ctx.timings[key] = time.perf_counter() - t
            log(f"[{i}/{len(keys)}] {title}: {ctx.timings[key]:.0f} s")
        finished = True
    finally:
        report = write_report(ctx, finished)
        log(f"report: {report}")
    return ctx
