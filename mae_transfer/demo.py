"""The end-to-end demo: sample data -> MAE pretraining -> transfer, MAE vs random init -> report.

Every stage is a function ``stage(ctx) -> None`` that records results in ``ctx``; ``run_demo``
runs them in order with a progress line (stage, elapsed, ETA), keeps going when one fails (the
report shows its error), and writes the report also when interrupted with Ctrl-C.
"""
from __future__ import annotations

import contextlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

INITS = ("mae", "random")
METRICS = {"segment": "mIoU (%)", "detect_box": "AP box", "detect_mask": "AP mask"}


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo; ``quick`` is the ~3-minute smoke run, the default fits 15 minutes on 2 cores."""

    quick: bool = False
    seed: int = 0
    encoder: str = "vit_tiny_patch16"
    encoder_kwargs: dict = field(default_factory=lambda: {"depth": 6})
    img_size: int = 64
    pretrain_epochs: int = 30
    cls_epochs: int = 8
    seg_iters: int = 120
    det_iters: int = 100

    @classmethod
    def make(cls, quick: bool, seed: int = 0) -> "DemoPlan":
        if quick:
            return cls(quick=True, seed=seed, encoder_kwargs={"depth": 4}, pretrain_epochs=3, cls_epochs=1,
                       seg_iters=20, det_iters=20)
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


SEG_CONFIG_TEMPLATE = """
_base_ = [{base!r}]
crop_size = ({size}, {size})
model = dict(
    pretrained={pretrained!r},
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch=dict(_delete_=True, embed_dim={dim}, depth={depth}, num_heads={heads}, patch_size={patch}),
                  img_size={size}, out_indices={out_indices!r}, drop_path_rate=0.0),
    neck=dict(embed_dim={dim}),
    decode_head=dict(in_channels=[{dim}] * 4, channels=64, pool_scales=(1, 2, 3), num_classes={classes},
                     dropout_ratio=0.0),
    auxiliary_head=dict(in_channels={dim}, channels=32, num_classes={classes}, dropout_ratio=0.0),
    test_cfg=dict(mode='whole'))
pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
            dict(type='RandomFlip', prob=0.5), dict(type='PackSegInputs')]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
                 dict(type='PackSegInputs')]
dataset = dict(type='ADELayoutDataset', data_root={root!r}, metainfo=dict(classes={names!r}))
train_dataloader = dict(batch_size=8, num_workers=0, persistent_workers=False, dataset=dict(dataset, pipeline=pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(dataset, pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end={warmup}),
                   dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin={warmup}, end={iters})]
train_cfg = dict(max_iters={iters}, val_interval={iters})
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval={iters}))
randomness = dict(seed={seed})
"""


def stage_segment(ctx: DemoContext) -> None:
    from mae_transfer.sample_data import SEG_CLASSES
    from segmentation import CONFIG_DIR
    from segmentation.engine import load_config, prepare, train

    plan = ctx.plan
    dims = _encoder_dims(plan)
    row: dict[str, Any] = {}
    for init in INITS:
        text = SEG_CONFIG_TEMPLATE.format(
            base=str(CONFIG_DIR / "upernet-mae-vit-b_8xb2-160k_ade20k-512x512.py"), size=128,
            pretrained=str(_encoder(ctx)) if init == "mae" else None, patch=8,
            out_indices=[dims["depth"] // 4 - 1, dims["depth"] // 2 - 1, 3 * dims["depth"] // 4 - 1, dims["depth"] - 1],
            classes=len(SEG_CLASSES), names=tuple(SEG_CLASSES), root=str(ctx.data / "ade" / "ADEChallengeData2016"),
            warmup=max(1, plan.seg_iters // 10), iters=plan.seg_iters, seed=plan.seed,
            dim=dims["embed_dim"], depth=dims["depth"], heads=dims["num_heads"])
        cfg_path = ctx.out / "segment" / f"upernet_{init}.py"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(text)
        cfg = prepare(load_config(cfg_path), work_dir=str(ctx.out / "segment" / init), launcher="none",
                      config_path=str(cfg_path))
        cfg.experiment_name = f"demo_segment_{init}"
        runner = train(cfg)
        row[init] = float(runner.message_hub.get_scalar("val/mIoU").current())
    ctx.results["segment"] = row


DET_CONFIG_TEMPLATE = """
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.layers import ShapeSpec

from detection.config import get_config_file
from detection.transforms import FixedSizeCrop

_base = LazyConfig.load(str(get_config_file("mask_rcnn_vitdet_b_100ep")))
dataloader, lr_multiplier, model, optimizer, train = (
    _base.dataloader, _base.lr_multiplier, _base.model, _base.optimizer, _base.train)
_size, _width = {size}, 64
model.backbone.net.update(name={encoder!r}, img_size=_size, window_size=0, global_blocks=(), drop_path_rate=0.0,
                          **{encoder_kwargs!r})
model.backbone.scale_factors = {scales!r}
model.backbone.pretrained = {pretrained!r}
model.backbone.out_channels = _width
model.proposal_generator.head.in_channels = _width
model.proposal_generator.pre_nms_topk = (400, 200)
model.proposal_generator.post_nms_topk = (200, 100)
model.roi_heads.num_classes = {classes}
model.roi_heads.batch_size_per_image = 64
model.roi_heads.box_head.input_shape = ShapeSpec(channels=_width, height=7, width=7)
model.roi_heads.box_head.conv_dims = []
model.roi_heads.box_head.fc_dims = [256]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.box_predictor.test_score_thresh = 0.05
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=_width, height=14, width=14)
model.roi_heads.mask_head.conv_dims = [_width, _width]
dataloader.train.dataset.names = "demo_coco_train"
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 0
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.8, max_scale=1.25, target_height=_size, target_width=_size),
    L(FixedSizeCrop)(crop_size=(_size, _size)),
]
dataloader.test.dataset.names = "demo_coco_val"
dataloader.test.num_workers = 0
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=_size, max_size=_size)]
optimizer.lr = 4e-4
lr_multiplier.warmup_iters = {warmup}
lr_multiplier.decay_at = (0.85,)
train.update(max_iter={iters}, log_period=20, eval_period=0, device="cpu", seed={seed})
train.checkpointer.period = {iters}
"""


def stage_detect(ctx: DemoContext) -> None:
    from detectron2.data import DatasetCatalog

    from detection.data import register_coco_dataset
    from detection.engine import RunOptions, eval_main, train_main
    from mae_transfer.sample_data import CATEGORIES

    plan = ctx.plan
    coco = ctx.data / "coco"
    for split in ("train", "val"):
        name = f"demo_coco_{split}"
        if name not in DatasetCatalog.list():
            register_coco_dataset(name, coco / "annotations" / f"instances_{split}2017.json", coco / f"{split}2017")
    box: dict[str, Any] = {}
    mask: dict[str, Any] = {}
    for init in INITS:
        text = DET_CONFIG_TEMPLATE.format(
            size=128, encoder=plan.encoder, encoder_kwargs=dict(plan.encoder_kwargs, patch_size=8),
            scales=(2.0, 1.0, 0.5, 0.25), pretrained=str(_encoder(ctx)) if init == "mae" else "",
            classes=len(CATEGORIES), warmup=max(1, plan.det_iters // 10),
            iters=plan.det_iters, seed=plan.seed)
        cfg_path = ctx.out / "detect" / f"mask_rcnn_{init}.py"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(text)
        out = ctx.out / "detect" / init
        train_main(RunOptions(config=str(cfg_path), output=str(out)))
        results = eval_main(RunOptions(config=str(cfg_path), output=str(out), weights=str(out / "model_final.pth")))
        box[init], mask[init] = float(results["bbox"]["AP"]), float(results["segm"]["AP"])
    ctx.results["detect_box"], ctx.results["detect_mask"] = box, mask


def _encoder_dims(plan: DemoPlan) -> dict[str, int]:
    from mae_backbone import VIT_ARCHS

    dims = dict(VIT_ARCHS[plan.encoder])
    dims.update({k: v for k, v in plan.encoder_kwargs.items() if k in dims})
    return dims


STAGES: dict[str, tuple[str, Callable[[DemoContext], None], float]] = {
    # key: (title, function, planned seconds in the full demo on 2 cores -- used for the ETA only)
    "data": ("sample data", stage_data, 5),
    "pretrain": ("MAE pretraining", stage_pretrain, 120),
    "finetune": ("fine-tuning, MAE vs random init", stage_finetune, 80),
    "linprobe": ("linear probing, MAE vs random init", stage_linprobe, 40),
    "partial": ("partial fine-tuning, MAE vs random init", stage_partial, 60),
    "segment": ("UperNet segmentation, MAE vs random init", stage_segment, 270),
    "detect": ("Mask R-CNN (ViTDet pyramid), MAE vs random init", stage_detect, 300),
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
        if key in ctx.errors:
            lines.append(f"| {title} | failed | `{ctx.errors[key]}` | |")
            continue
        for rkey in (("detect_box", "detect_mask") if key == "detect" else (key,)):
            res = ctx.results.get(rkey)
            if res and "mae" in res:
                metric = METRICS.get(rkey, "top-1 (%)")
                lines.append(f"| {title} | {metric} | {res['mae']:.2f} | {res['random']:.2f} |")
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
            stage_log = ctx.out / "logs" / f"{key}.log"
            stage_log.parent.mkdir(parents=True, exist_ok=True)
            (ctx.out / f"error_{key}.txt").unlink(missing_ok=True)
            try:
                # the frameworks' own logging goes to the stage's log file, the progress lines stay here
                with open(stage_log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                    fn(ctx)
            except Exception as exc:  # a failed stage is reported; the others still run
                ctx.errors[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                (ctx.out / f"error_{key}.txt").write_text(traceback.format_exc())
                log(f"[{i}/{len(keys)}] {title}: FAILED ({ctx.errors[key]}); details in error_{key}.txt")
            ctx.timings[key] = time.perf_counter() - t
            log(f"[{i}/{len(keys)}] {title}: {ctx.timings[key]:.0f} s (log: {stage_log.relative_to(ctx.out)})")
        finished = True
    finally:
        report = write_report(ctx, finished)
        log(f"report: {report}")
    return ctx
