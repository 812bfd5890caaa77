"""The end-to-end demo: sample data -> MAE pretraining -> transfer, MAE vs random init -> report.

Two layers:

- the **task runners** (``run_task`` -> ``run_classification`` / ``run_segmentation`` /
  ``run_detection``): one backbone (a checkpoint, or random init) through one transfer recipe on
  one seed, returning the metrics, the training-loss curve and, if asked, rendered example
  predictions. ``mae-transfer bench`` calls the same functions, so the demo and the benchmark
  share one implementation of every recipe;
- the **demo stages** (``stage(ctx) -> None``): ``run_demo`` runs them in order with a progress
  line (stage, elapsed, ETA), keeps going when one fails (the report shows its error), and writes
  the report also when interrupted with Ctrl-C.
"""
from __future__ import annotations

import contextlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

INITS = ("mae", "random")
INIT_LABELS = {"mae": "MAE", "random": "random init"}
TASKS = ("finetune", "linprobe", "partial", "segment", "detect")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "finetune": ("top-1",), "linprobe": ("top-1",), "partial": ("top-1",), "segment": ("mIoU",),
    "detect": ("AP box", "AP mask"),
}


# --------------------------------------------------------------------------- what is compared
@dataclass(frozen=True)
class Arch:
    """A ViT: a registered name (``mae_backbone.VIT_ARCHS``) and its overrides (depth, patch size)."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, name: str, **kwargs: Any) -> "Arch":
        return cls(name, tuple(sorted(kwargs.items())))

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def dims(self) -> dict[str, int]:
        """``embed_dim``, ``depth``, ``num_heads``, ``patch_size`` after the overrides."""
        from mae_backbone import VIT_ARCHS

        dims = dict(VIT_ARCHS[self.name])
        dims.update({k: v for k, v in self.kwargs if k in dims})
        return dims

    @property
    def size(self) -> str | None:
        """``"B"`` / ``"L"`` / ``"H"`` when this is exactly a published model size, else None."""
        from mae_backbone import VIT_ARCHS

        letter = {"vit_base_patch16": "B", "vit_large_patch16": "L", "vit_huge_patch14": "H"}.get(self.name)
        return letter if letter and self.dims == VIT_ARCHS[self.name] else None

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{self.name}({extra})" if extra else self.name


def checkpoint_arch(path: str | Path) -> Arch:
    """The architecture of a checkpoint in any format ``mae_backbone`` reads."""
    from mae_backbone import VIT_ARCHS
    from mae_backbone.checkpoint import infer_arch, read_checkpoint

    sd, meta = read_checkpoint(path)
    facts = infer_arch(sd)
    if facts.get("arch") in VIT_ARCHS:
        return Arch.make(facts["arch"])
    if "embed_dim" not in facts or "depth" not in facts:
        raise ValueError(f"{path}: cannot tell the ViT architecture of this checkpoint (no patch embedding / blocks)")
    same_width = [n for n, a in VIT_ARCHS.items() if a["embed_dim"] == facts["embed_dim"]]
    if not same_width:
        raise ValueError(f"{path}: no registered ViT has width {facts['embed_dim']} (known: {', '.join(VIT_ARCHS)})")
    name = same_width[0]
    base = VIT_ARCHS[name]
    over = {k: facts[k] for k in ("depth", "patch_size") if facts[k] != base[k]}
    heads = meta.get("num_heads")
    if heads is not None and int(heads) != base["num_heads"]:
        over["num_heads"] = int(heads)
    return Arch.make(name, **over)


@dataclass(frozen=True)
class Backbone:
    """One encoder put through the transfer recipes: a checkpoint, or random init (``None``).

    ``layer_decay`` None takes the recipe's value for the architecture; ``method`` (``mae``,
    ``mocov3``, ``supervised``, ``scratch``) selects the published reference numbers.
    """

    name: str
    checkpoint: Path | None = None
    layer_decay: float | None = None
    method: str | None = None


@dataclass(frozen=True)
class DataPaths:
    """Where each task's data is; a task whose folder is None cannot run."""

    classification: Path | None = None  # train/ and val/ class folders
    coco: Path | None = None  # {train,val}2017/ and annotations/instances_{train,val}2017.json
    ade: Path | None = None  # ADEChallengeData2016 layout: images/ and annotations/ {training,validation}
    seg_classes: tuple[str, ...] | None = None  # None: ADE20K's 150 classes

    @classmethod
    def sample(cls, root: str | Path) -> "DataPaths":
        """The layout ``write_sample_data`` writes."""
        from mae_transfer.sample_data import SEG_CLASSES

        root = Path(root)
        return cls(root / "classification", root / "coco", root / "ade" / "ADEChallengeData2016", tuple(SEG_CLASSES))

    def require(self, task: str) -> Path:
        key = {"segment": "ade", "detect": "coco"}.get(task, "classification")
        path = getattr(self, key)
        if path is None:
            flag = {"classification": "--imagenet", "coco": "--coco", "ade": "--ade"}[key]
            raise ValueError(f"task {task!r} needs its data ({flag} DIR)")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such data folder for task {task!r}")
        return Path(path)


@dataclass(frozen=True)
class Recipe:
    """One transfer recipe, identical for every backbone of a comparison.

    ``demo``: sized for the sample data on 2 CPU cores (small ViT, patch 8, 64 px classification,
    128 px scenes). ``paper``: the published recipes of our configs for real data
    (classification defaults, ``segmentation/configs``, ``detection/configs``).
    """

    name: str = "demo"
    arch: Arch = Arch.make("vit_tiny_patch16", depth=6, patch_size=8)
    img_size: int = 64
    # classification; a tiny budget wants little regularisation (no mixup/cutmix/RandAug/smoothing)
    cls_epochs: int = 10
    cls_batch: int = 16
    cls_options: tuple[tuple[str, Any], ...] = (  # fine-tuning and partial fine-tuning
        ("mixup", 0.0), ("cutmix", 0.0), ("smoothing", 0.0), ("aa", "none"), ("reprob", 0.0),
        ("drop_path", 0.0), ("warmup_epochs", 2), ("layer_decay", 0.75), ("pool", "avg"))
    finetune_blr: float = 1.6e-2
    linprobe_options: tuple[tuple[str, Any], ...] = (("warmup_epochs", 3), ("pool", "avg"))
    linprobe_epochs: int = 15
    linprobe_batch: int = 32
    linprobe_blr: float = 50.0  # LARS: lr = 50 x 32 / 256 = 6.25, near the official 6.4 (0.1 x 16384 / 256)
    partial_blocks: int = 1
    # UperNet
    seg_size: int = 128
    seg_iters: int = 120
    seg_batch: int = 8
    seg_lr: float = 1e-3
    seg_layer_decay: float = 0.65
    # Mask R-CNN, ViTDet simple pyramid
    det_size: int = 128
    det_iters: int = 150
    det_batch: int = 4
    det_lr: float = 4e-4
    det_layer_decay: float = 0.7
    det_anchors: tuple[int, ...] = (16, 32, 64, 128, 256)

    @classmethod
    def demo(cls, quick: bool = False) -> "Recipe":
        if quick:
            return cls(arch=Arch.make("vit_tiny_patch16", depth=4, patch_size=8), cls_epochs=1, linprobe_epochs=1,
                       seg_iters=20, det_iters=20)
        return cls()

    @classmethod
    def paper(cls, arch: Arch) -> "Recipe":
        return cls(name="paper", arch=arch, img_size=224)

    def layer_decay(self, task: str, backbone: Backbone) -> float | None:
        """The layer decay of ``task`` for ``backbone`` (None: the paper recipe's value for the arch)."""
        if backbone.layer_decay is not None:
            return backbone.layer_decay
        if self.name == "paper":
            return None
        return {"segment": self.seg_layer_decay, "detect": self.det_layer_decay}.get(
            task, dict(self.cls_options).get("layer_decay"))


@dataclass
class TaskResult:
    """What one (backbone, task, seed) run gives back."""

    metrics: dict[str, float]
    curve: list[tuple[float, float]] = field(default_factory=list)  # (x, training loss)
    curve_unit: str = "iteration"
    examples: list[tuple[Path, Any]] = field(default_factory=list)  # (val image, prediction)
    note: str = ""


# --------------------------------------------------------------------------- task runners
def run_task(task: str, backbone: Backbone, recipe: Recipe, data: DataPaths, seed: int, out: Path,
             examples: int = 0) -> TaskResult:
    """One backbone through one transfer recipe on one seed; writes its run under ``out``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if task == "segment":
        return run_segmentation(backbone, recipe, data, seed, out, examples)
    if task == "detect":
        return run_detection(backbone, recipe, data, seed, out, examples)
    return run_classification(task, backbone, recipe, data, seed, out)


def run_classification(task: str, backbone: Backbone, recipe: Recipe, data: DataPaths, seed: int,
                       out: Path) -> TaskResult:
    """``finetune``, ``linprobe`` or ``partial`` (fine-tuning of the last ``recipe.partial_blocks``)."""
    from classification import make_config, train

    root = data.require(task)
    protocol = "linprobe" if task == "linprobe" else "finetune"
    values: dict[str, Any] = {
        "data": str(root), "output": str(out), "model": recipe.arch.name, "model_kwargs": recipe.arch.overrides,
        "seed": seed, "progress": False, "tensorboard": False, "num_workers": 0 if recipe.name == "demo" else 8,
    }
    if recipe.name == "demo":
        values.update(img_size=recipe.img_size, epochs=recipe.cls_epochs, batch_size=recipe.cls_batch,
                      blr=recipe.finetune_blr)
        if protocol == "linprobe":
            values.update(dict(recipe.linprobe_options), epochs=recipe.linprobe_epochs, blr=recipe.linprobe_blr,
                          batch_size=recipe.linprobe_batch)
        else:
            values.update(dict(recipe.cls_options))
    if task == "partial":
        values["tune_blocks"] = str(recipe.partial_blocks)
    ld = recipe.layer_decay(task, backbone)
    if ld is not None and protocol == "finetune":
        values["layer_decay"] = ld
    if backbone.checkpoint is not None:
        values["checkpoint"] = str(backbone.checkpoint)
    result = train(make_config(protocol, values))
    curve = [(float(h["epoch"]), float(h["train_loss"])) for h in result.history if "train_loss" in h]
    last = next(h for h in reversed(result.history) if "val" in h)
    return TaskResult({"top-1": float(last["val"]["top1"])}, curve, "epoch", note=str(result.freeze))


# The neck keeps MMSeg's rescales (4, 2, 1, 0.5): with patch 8 its maps have strides 2..16, finer than
# the paper's 4..32; on the demo's small objects this trained better than the stride-matched
# (2, 1, 0.5, 0.25) in our runs (which is ~2x cheaper), so the demo pays for it.
SEG_DEMO_TEMPLATE = """
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
train_dataloader = dict(batch_size={batch}, num_workers=0, persistent_workers=False,
                        dataset=dict(dataset, pipeline=pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(dataset, pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr={lr}), paramwise_cfg=dict(layer_decay={layer_decay}))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end={warmup}),
                   dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin={warmup}, end={iters})]
train_cfg = dict(max_iters={iters}, val_interval={iters})
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval={iters}))
randomness = dict(seed={seed})
"""

SEG_PAPER_TEMPLATE = """
_base_ = [{base!r}]
model = dict(pretrained={pretrained!r})
randomness = dict(seed={seed})
"""
SEG_PAPER_CONFIGS = {"vit_base_patch16": "upernet-mae-vit-b_8xb2-160k_ade20k-512x512.py",
                     "vit_large_patch16": "upernet-mae-vit-l_8xb2-160k_ade20k-512x512.py"}


def run_segmentation(backbone: Backbone, recipe: Recipe, data: DataPaths, seed: int, out: Path,
                     examples: int = 0) -> TaskResult:
    """UperNet (MMSeg) on the ADE20K-layout data; mIoU in %. Examples: (val image, label map [H, W])."""
    from segmentation import CONFIG_DIR
    from segmentation.engine import load_config, prepare, set_data_root, train

    root = data.require("segment")
    pretrained = str(backbone.checkpoint) if backbone.checkpoint is not None else None
    if recipe.name == "demo":
        if data.seg_classes is None:
            raise ValueError("the demo segmentation recipe needs the class names of the data (seg_classes)")
        dims = recipe.arch.dims
        depth = dims["depth"]
        iters = recipe.seg_iters
        text = SEG_DEMO_TEMPLATE.format(
            base=str(CONFIG_DIR / SEG_PAPER_CONFIGS["vit_base_patch16"]), size=recipe.seg_size, pretrained=pretrained,
            patch=dims["patch_size"], out_indices=[depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1],
            classes=len(data.seg_classes), names=tuple(data.seg_classes), root=str(root), batch=recipe.seg_batch,
            lr=recipe.seg_lr, layer_decay=recipe.layer_decay("segment", backbone), warmup=max(1, iters // 10),
            iters=iters, seed=seed, dim=dims["embed_dim"], depth=depth, heads=dims["num_heads"])
    else:
        if recipe.arch.name not in SEG_PAPER_CONFIGS or recipe.arch.size is None:
            raise ValueError(f"no UperNet recipe for {recipe.arch} (have: {', '.join(SEG_PAPER_CONFIGS)})")
        text = SEG_PAPER_TEMPLATE.format(base=str(CONFIG_DIR / SEG_PAPER_CONFIGS[recipe.arch.name]),
                                         pretrained=pretrained, seed=seed)
        if backbone.layer_decay is not None:
            text += f"optim_wrapper = dict(paramwise_cfg=dict(layer_decay={backbone.layer_decay}))\n"
    cfg_path = out / "upernet.py"
    cfg_path.write_text(text)
    cfg = prepare(load_config(cfg_path), work_dir=str(out), launcher="none", config_path=str(cfg_path))
    if recipe.name == "paper":
        set_data_root(cfg, root)
    cfg.experiment_name = f"segment_{out.name}_{seed}"
    runner = train(cfg)
    miou = float(runner.message_hub.get_scalar("val/mIoU").current())
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    result = TaskResult({"mIoU": miou}, [(i + 1.0, float(v)) for i, v in enumerate(losses)], "iteration")
    if examples:
        result.examples = _segment_examples(runner.model, cfg, root, examples)
    return result


def _segment_examples(model: Any, cfg: Any, root: Path, n: int) -> list[tuple[Path, np.ndarray]]:
    import mmcv
    from mmseg.apis import inference_model

    model.cfg = cfg  # what inference_model reads its test pipeline from
    model.eval()
    found = []
    for image in sorted((root / "images" / "validation").glob("*.jpg"))[:n]:
        result = inference_model(model, mmcv.imread(str(image)))
        found.append((image, result.pred_sem_seg.data[0].cpu().numpy().astype(np.int64)))
    return found


DET_DEMO_TEMPLATE = """
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
model.backbone.net.update(name={encoder!r}, img_size=_size, pretrain_img_size={pretrain_size},
                          window_size=0, global_blocks=(), drop_path_rate=0.0, **{encoder_kwargs!r})
model.backbone.scale_factors = {scales!r}
model.backbone.pretrained = {pretrained!r}
model.backbone.out_channels = _width
model.proposal_generator.head.in_channels = _width
model.proposal_generator.anchor_generator.sizes = {anchors!r}
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
dataloader.train.dataset.names = {train_name!r}
dataloader.train.total_batch_size = {batch}
dataloader.train.num_workers = 0
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.8, max_scale=1.25, target_height=_size, target_width=_size),
    L(FixedSizeCrop)(crop_size=(_size, _size), pad=False),
]
dataloader.test.dataset.names = {val_name!r}
dataloader.test.num_workers = 0
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=_size, max_size=_size)]
optimizer.lr = {lr}
optimizer.params.layer_decay = {layer_decay}
lr_multiplier.warmup_iters = {warmup}
lr_multiplier.decay_at = (0.85,)
train.update(max_iter={iters}, log_period={log_period}, eval_period=0, device="cpu", seed={seed})
train.checkpointer.period = {iters}
"""

DET_PAPER_TEMPLATE = """
from detectron2.config import LazyConfig

from detection.config import get_config_file

_base = LazyConfig.load(str(get_config_file({base!r})))
dataloader, lr_multiplier, model, optimizer, train = (
    _base.dataloader, _base.lr_multiplier, _base.model, _base.optimizer, _base.train)
model.backbone.pretrained = {pretrained!r}
model.roi_heads.num_classes = {classes}
dataloader.train.dataset.names = {train_name!r}
dataloader.test.dataset.names = {val_name!r}
train.seed = {seed}
"""
DET_PAPER_CONFIGS = {"vit_base_patch16": "mask_rcnn_vitdet_b_100ep", "vit_large_patch16": "mask_rcnn_vitdet_l_100ep",
                     "vit_huge_patch14": "mask_rcnn_vitdet_h_75ep"}


def register_coco(root: Path) -> tuple[str, str, int]:
    """Register ``root``'s train/val COCO splits in Detectron2 (once per folder); names and class count."""
    from detection.data import register_coco_dataset

    names = []
    classes = 0
    for split in ("train", "val"):
        name = f"mae_transfer_{split}:{Path(root).resolve()}"
        summary = register_coco_dataset(name, root / "annotations" / f"instances_{split}2017.json",
                                        root / f"{split}2017")
        classes = len(summary["thing_classes"])
        names.append(name)
    return names[0], names[1], classes


def run_detection(backbone: Backbone, recipe: Recipe, data: DataPaths, seed: int, out: Path,
                  examples: int = 0) -> TaskResult:
    """Mask R-CNN with the ViTDet pyramid (Detectron2); COCO AP box / mask. Examples: (val image, drawn RGB)."""
    from detection.engine import RunOptions, eval_main, train_main

    root = data.require("detect")
    train_name, val_name, classes = register_coco(root)
    pretrained = str(backbone.checkpoint) if backbone.checkpoint is not None else ""
    if recipe.name == "demo":
        iters = recipe.det_iters
        text = DET_DEMO_TEMPLATE.format(
            size=recipe.det_size, pretrain_size=recipe.img_size, encoder=recipe.arch.name,
            encoder_kwargs=recipe.arch.overrides,
            scales=_scale_factors(recipe.arch.dims["patch_size"]), pretrained=pretrained,
            anchors=[[a] for a in recipe.det_anchors], classes=classes, train_name=train_name, val_name=val_name,
            batch=recipe.det_batch, lr=recipe.det_lr, layer_decay=recipe.layer_decay("detect", backbone),
            warmup=max(1, iters // 10), iters=iters, log_period=max(1, iters // 30), seed=seed)
    else:
        if recipe.arch.name not in DET_PAPER_CONFIGS or recipe.arch.size is None:
            raise ValueError(f"no Mask R-CNN recipe for {recipe.arch} (have: {', '.join(DET_PAPER_CONFIGS)})")
        text = DET_PAPER_TEMPLATE.format(base=DET_PAPER_CONFIGS[recipe.arch.name], pretrained=pretrained,
                                         classes=classes, train_name=train_name, val_name=val_name, seed=seed)
        if backbone.layer_decay is not None:
            text += f"optimizer.params.layer_decay = {backbone.layer_decay}\n"
    cfg_path = out / "mask_rcnn.py"
    cfg_path.write_text(text)
    train_main(RunOptions(config=str(cfg_path), output=str(out)))
    weights = str(out / "model_final.pth")
    results = eval_main(RunOptions(config=str(cfg_path), output=str(out), weights=weights))
    result = TaskResult({"AP box": float(results["bbox"]["AP"]), "AP mask": float(results["segm"]["AP"])},
                        _detectron2_curve(out / "metrics.json"), "iteration")
    if examples:
        result.examples = _detect_examples(cfg_path, weights, val_name, examples)
    return result


def _scale_factors(patch: int) -> tuple[float, ...]:
    """Strides 4, 8, 16, 32 from a ViT of stride ``patch``."""
    return tuple(patch / s for s in (4, 8, 16, 32))


def _detectron2_curve(metrics_json: Path) -> list[tuple[float, float]]:
    curve = []
    for line in metrics_json.read_text().splitlines() if metrics_json.is_file() else []:
        rec = json.loads(line)
        if "total_loss" in rec:
            curve.append((float(rec["iteration"]) + 1, float(rec["total_loss"])))
    return curve


def _detect_examples(cfg_path: Path, weights: str, val_name: str, n: int,
                     top: int = 4) -> list[tuple[Path, np.ndarray]]:
    """The ``top`` highest-scoring detections on the first ``n`` val images, drawn (a weak detector's
    scores stay low, so a fixed score threshold would show empty images)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import detection_utils
    from detectron2.utils.visualizer import ColorMode, Visualizer

    from detection.engine import load_config, load_trained_model, predict, test_time_augmentations

    cfg = load_config(str(cfg_path), [])
    model = load_trained_model(cfg, weights)
    augs = test_time_augmentations(cfg)
    meta = MetadataCatalog.get(val_name)
    found = []
    for record in DatasetCatalog.get(val_name)[:n]:
        rgb = detection_utils.read_image(record["file_name"], format="RGB")
        inst = predict(model, rgb, augs)
        inst = inst[inst.scores.argsort(descending=True)[:top]]
        drawn = Visualizer(rgb, meta, scale=2.0, instance_mode=ColorMode.IMAGE).draw_instance_predictions(inst)
        found.append((Path(record["file_name"]), drawn.get_image()))
    return found


# --------------------------------------------------------------------------- demo stages
@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo; ``quick`` is the ~3-minute smoke run, the default fits 15 minutes on 2 cores."""

    quick: bool = False
    seed: int = 0
    recipe: Recipe = field(default_factory=Recipe.demo)
    pretrain_epochs: int = 40
    pretrain_blr: float = 8e-3
    mask_ratio: float = 0.75
    examples: int = 3

    @classmethod
    def make(cls, quick: bool, seed: int = 0) -> "DemoPlan":
        if quick:
            return cls(quick=True, seed=seed, recipe=Recipe.demo(quick=True), pretrain_epochs=3, examples=2)
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
    stages: dict[str, tuple[str, Callable[["DemoContext"], None], float]] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.out / "data"


def stage_data(ctx: DemoContext) -> None:
    from mae_transfer.sample_data import write_sample_data

    summary = write_sample_data(ctx.data, seed=ctx.plan.seed)
    ctx.results["data"] = {k: v for k, v in summary.items() if isinstance(v, int) and k != "seed"}


def pretrain_images(data: Path) -> list[Path]:
    """The demo's pretraining set: the classification images and the training scenes (no labels used)."""
    return (sorted((data / "classification" / "train").rglob("*.png"))
            + sorted((data / "coco" / "train2017").glob("*.jpg")))


def stage_pretrain(ctx: DemoContext) -> None:
    from pretrain import make_config, train

    plan = ctx.plan
    images = pretrain_images(ctx.data)
    if not images:
        raise FileNotFoundError(f"{ctx.data}: no sample images to pretrain on (run the data stage)")
    listing = ctx.out / "pretrain_images.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    arch = plan.recipe.arch
    cfg = make_config({
        "data": str(listing), "output": str(ctx.out / "pretrain"),
        "model": "mae_" + arch.name, "img_size": plan.recipe.img_size, "model_kwargs": arch.overrides,
        "decoder_depth": 2, "decoder_dim": 128, "decoder_heads": 4, "mask_ratio": plan.mask_ratio,
        "epochs": plan.pretrain_epochs, "warmup_epochs": max(1, plan.pretrain_epochs // 10),
        "batch_size": 32, "blr": plan.pretrain_blr, "num_workers": 0, "seed": plan.seed, "progress": False,
        "vis_every": plan.pretrain_epochs, "vis_images": 6, "save_every": plan.pretrain_epochs,
        "tensorboard": False,
    })
    result = train(cfg)
    # the run's whole log: a run resumed (or already finished) in this folder has only part of it in
    # ``result.history``
    by_epoch = {int(h["epoch"]): float(h["loss"]) for h in _log_records(ctx.out / "pretrain" / "log.jsonl")
                if h.get("type") == "epoch" and "loss" in h and "epoch" in h}
    losses = [by_epoch[e] for e in sorted(by_epoch)]
    if not losses:
        raise RuntimeError(f"{ctx.out / 'pretrain' / 'log.jsonl'}: no epoch was logged")
    ctx.artefacts["encoder"] = result.encoder
    ctx.results["pretrain"] = {"images": len(images), "epochs": result.epochs_done,
                               "first loss": round(losses[0], 4), "last loss": round(losses[-1], 4)}
    ctx.figures["MAE pretraining loss"] = plot_curves(
        {"MAE": [(i + 1.0, v) for i, v in enumerate(losses)]}, "MAE pretraining loss (masked patches, norm-pixel MSE)",
        "epoch", ctx.out / "figures" / "pretrain_loss.png")
    grids = sorted((ctx.out / "pretrain" / "vis").glob("*.png"))
    if grids:
        ctx.figures["reconstructions (original | masked | reconstruction | reconstruction + visible)"] = grids[-1]


def _log_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a run log; a line cut by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _encoder(ctx: DemoContext) -> Path:
    """The encoder of this run's pretrain stage, or of an earlier run in the same folder (--only)."""
    from pretrain import ENCODER_NAME

    enc = ctx.artefacts.get("encoder") or ctx.out / "pretrain" / ENCODER_NAME
    if not Path(enc).is_file():
        raise RuntimeError(f"no pretrained encoder at {enc} (the pretrain stage did not finish)")
    return Path(enc)


def _transfer(ctx: DemoContext, task: str) -> dict[str, TaskResult]:
    """``task`` from the MAE encoder and from random init, same recipe and seed."""
    backbones = {"mae": Backbone("MAE", _encoder(ctx), method="mae"),
                 "random": Backbone("random init", method="scratch")}
    found: dict[str, TaskResult] = {}
    for init, backbone in backbones.items():
        found[init] = run_task(task, backbone, ctx.plan.recipe, DataPaths.sample(ctx.data), ctx.plan.seed,
                               ctx.out / task / init, examples=ctx.plan.examples)
    for metric in TASK_METRICS[task]:
        ctx.results[f"{task}:{metric}"] = {init: r.metrics[metric] for init, r in found.items()}
    unit = found["mae"].curve_unit
    ctx.figures[f"{task}: training loss"] = plot_curves(
        {INIT_LABELS[i]: r.curve for i, r in found.items()}, f"{task}: training loss, MAE vs random init", unit,
        ctx.out / "figures" / f"{task}_loss.png")
    return found


def stage_finetune(ctx: DemoContext) -> None:
    _transfer(ctx, "finetune")


def stage_linprobe(ctx: DemoContext) -> None:
    _transfer(ctx, "linprobe")


def stage_partial(ctx: DemoContext) -> None:
    _transfer(ctx, "partial")


def stage_segment(ctx: DemoContext) -> None:
    found = _transfer(ctx, "segment")
    ctx.figures["example segmentations (image | ground truth | MAE | random init)"] = plot_segmentations(
        found, ctx.out / "figures" / "segment_examples.png")


def stage_detect(ctx: DemoContext) -> None:
    found = _transfer(ctx, "detect")
    ctx.figures["example detections, the 4 highest scores per image (MAE | random init)"] = plot_detections(
        found, ctx.out / "figures" / "detect_examples.png")


STAGES: dict[str, tuple[str, Callable[[DemoContext], None], float]] = {
    # key: (title, function, planned seconds in the full demo on 2 cores -- used for the ETA only)
    "data": ("sample data", stage_data, 5),
    "pretrain": ("MAE pretraining", stage_pretrain, 150),
    "finetune": ("fine-tuning, MAE vs random init", stage_finetune, 70),
    "linprobe": ("linear probing, MAE vs random init", stage_linprobe, 40),
    "partial": ("partial fine-tuning, MAE vs random init", stage_partial, 50),
    "segment": ("UperNet segmentation, MAE vs random init", stage_segment, 150),
    "detect": ("Mask R-CNN (ViTDet pyramid), MAE vs random init", stage_detect, 180),
}
RESULT_ROWS = (  # (stage, result key, metric title)
    ("finetune", "finetune:top-1", "top-1 (%)"), ("linprobe", "linprobe:top-1", "top-1 (%)"),
    ("partial", "partial:top-1", "top-1 (%)"), ("segment", "segment:mIoU", "mIoU (%)"),
    ("detect", "detect:AP box", "AP box"), ("detect", "detect:AP mask", "AP mask"),
)


# --------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[tuple[float, float]]], title: str, xlabel: str, path: Path) -> Path:
    """Training-loss curves on one set of axes, one line per label."""
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    for label, curve in curves.items():
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker="." if len(xs) < 60 else None, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _palette(n: int) -> np.ndarray:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return (np.array([cmap(i % 10)[:3] for i in range(n)]) * 255).astype(np.uint8)


def plot_segmentations(found: dict[str, TaskResult], path: Path) -> Path:
    """Rows of image | ground truth | MAE | random init (classes in fixed colours)."""
    from PIL import Image

    plt = _pyplot()
    rows = list(zip(*(found[i].examples for i in INITS)))
    palette = _palette(256)
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), dpi=100, squeeze=False)
    for r, pair in enumerate(rows):
        image = pair[0][0]
        gt_path = image.parent.parent.parent / "annotations" / image.parent.name / (image.stem + ".png")
        gt = np.asarray(Image.open(gt_path)).astype(np.int64) - 1  # reduce_zero_label: raw 0 -> ignore
        panels = [np.asarray(Image.open(image).convert("RGB")), np.where(gt[..., None] >= 0, palette[gt.clip(0)], 0)]
        panels += [palette[pred] for _, pred in pair]
        for c, (panel, title) in enumerate(zip(panels, ("image", "ground truth", "MAE", "random init"))):
            axes[r, c].imshow(panel)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_detections(found: dict[str, TaskResult], path: Path) -> Path:
    """Rows of MAE | random init detections (boxes, masks, classes, scores) on the same val images."""
    plt = _pyplot()
    rows = list(zip(*(found[i].examples for i in INITS)))
    fig, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows)), dpi=100, squeeze=False)
    for r, pair in enumerate(rows):
        for c, ((_, drawn), init) in enumerate(zip(pair, INITS)):
            axes[r, c].imshow(drawn)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(INIT_LABELS[init], fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_results(ctx: DemoContext, path: Path) -> Path | None:
    """The results table as grouped bars, MAE vs random init."""
    rows = [(f"{stage}\n{metric}", ctx.results[key]) for stage, key, metric in RESULT_ROWS
            if key in ctx.results and all(i in ctx.results[key] for i in INITS)]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    x = np.arange(len(rows))
    for k, init in enumerate(INITS):
        ax.bar(x + (k - 0.5) * 0.38, [r[init] for _, r in rows], 0.38, label=INIT_LABELS[init])
    ax.set_xticks(x, [label for label, _ in rows], fontsize=8)
    ax.set_title("results: MAE vs random init (same recipe, same seed)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report
def _verdict(mae: float, random: float) -> str:
    if mae > random:
        return "MAE higher"
    return "random init higher" if random > mae else "tie"


def write_report(ctx: DemoContext, finished: bool) -> Path:
    plan = ctx.plan
    lines = ["# mae-transfer demo report", ""]
    if not finished:
        lines += ["**Interrupted**: the report shows the stages that finished.", ""]
    lines += [f"Mode: {'quick' if plan.quick else 'full'}; seed {plan.seed}; encoder {plan.recipe.arch}, "
              f"{plan.recipe.img_size} px classification, {plan.recipe.seg_size} px scenes. One run per cell: "
              "the differences are a single seed's, not a measured spread.", ""]
    lines += ["## Results", "", "| task | metric | MAE | random init | |", "|---|---|---|---|---|"]
    stages = ctx.stages or STAGES
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


def run_stages(keys: Sequence[str], stages: dict[str, tuple[str, Callable[[Any], None], float]], state: Any,
               errors: dict[str, str], timings: dict[str, float], logs: Path, log: Callable[[str], None],
               pace_scale: float = 1.0) -> None:
    """Run ``stages[k]`` for ``k`` in ``keys`` with a progress line (stage, elapsed, ETA).

    A stage that raises is recorded in ``errors`` (first line; the traceback in
    ``logs/../error_KEY.txt``) and the next one runs; ``KeyboardInterrupt`` propagates.
    Each stage's own output (the frameworks' logging) goes to ``logs/KEY.log``.
    """
    planned = {k: stages[k][2] * pace_scale for k in keys}
    t0 = time.perf_counter()
    logs.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(keys, 1):
        title, fn, _ = stages[key]
        spent = sum(timings.get(k, 0.0) for k in keys[:i - 1])
        done_plan = sum(planned[k] for k in keys[:i - 1])
        # actual / planned so far; a short first stage (the data) says little about the pace yet
        pace = spent / done_plan if done_plan >= 0.1 * sum(planned.values()) else 1.0
        eta = pace * sum(planned[k] for k in keys[i - 1:])
        log(f"[{i}/{len(keys)}] {title} ... (elapsed {time.perf_counter() - t0:.0f} s, ETA {eta:.0f} s)")
        t = time.perf_counter()
        stage_log = logs / f"{key}.log"
        error_file = logs.parent / f"error_{key}.txt"
        error_file.unlink(missing_ok=True)
        errors.pop(key, None)
        try:
            with open(stage_log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                fn(state)
        except Exception as exc:  # a failed stage is reported; the others still run
            errors[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            error_file.write_text(traceback.format_exc())
            log(f"[{i}/{len(keys)}] {title}: FAILED ({errors[key]}); details in {error_file.name}")
        finally:
            timings[key] = time.perf_counter() - t
        log(f"[{i}/{len(keys)}] {title}: {timings[key]:.0f} s (log: {stage_log})")


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, only: list[str] | None = None,
             log: Callable[[str], None] = print, plan: DemoPlan | None = None,
             stages: dict[str, tuple[str, Callable[[DemoContext], None], float]] | None = None) -> DemoContext:
    """Run the stages (all, or ``only``) and write ``out/report.md``; returns the context.

    ``plan`` overrides the sizes of ``quick``/``seed``; ``stages`` replaces ``STAGES`` (tests).
    """
    stages = STAGES if stages is None else stages
    ctx = DemoContext(Path(out).absolute(), plan or DemoPlan.make(quick, seed), stages=stages)
    ctx.out.mkdir(parents=True, exist_ok=True)
    keys = [k for k in stages if only is None or k in only]
    finished = False
    try:
        run_stages(keys, stages, ctx, ctx.errors, ctx.timings, ctx.out / "logs", log,
                   0.2 if ctx.plan.quick else 1.0)
        finished = True
    finally:
        report = write_report(ctx, finished)
        log(f"report: {report}")
    return ctx


__all__ = [
    "Arch", "Backbone", "DataPaths", "DemoContext", "DemoPlan", "Recipe", "STAGES", "TASKS", "TASK_METRICS",
    "TaskResult", "checkpoint_arch", "plot_curves", "run_demo", "run_stages", "run_task", "write_report",
]
