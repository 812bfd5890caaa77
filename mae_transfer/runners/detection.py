"""Detection transfer: Mask R-CNN with the ViTDet simple pyramid (Detectron2), COCO AP box / mask.

The config is Detectron2's own: a shipped LazyConfig recipe (``detection/configs``) loaded with
``LazyConfig.load``, edited attribute by attribute and saved with ``LazyConfig.save`` as YAML in
the run folder; ``detection.engine``'s ``train_main`` / ``eval_main`` then run that file, so it
is the exact record of what ran (``mae-transfer detect train RUN/mask_rcnn.yaml`` runs it
again). Shapes go in as ``L(ShapeSpec)(...)`` calls, so the YAML holds no object state, only names
(``_target_`` strings, and the heads' norm class as a ``!!python/name`` tag).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mae_transfer.runners.recipe import Backbone, DataPaths, Recipe, TaskResult

DET_PAPER_CONFIGS = {"vit_base_patch16": "mask_rcnn_vitdet_b_100ep", "vit_large_patch16": "mask_rcnn_vitdet_l_100ep",
                     "vit_huge_patch14": "mask_rcnn_vitdet_h_75ep"}
CONFIG_NAME = "mask_rcnn.yaml"  # the saved config, in the run folder
DEMO_WIDTH = 64  # channels of the demo's pyramid and heads


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


def scale_factors(patch: int) -> tuple[float, ...]:
    """Strides 4, 8, 16, 32 from a ViT of stride ``patch``."""
    return tuple(patch / s for s in (4, 8, 16, 32))


def lazy_shape_specs(node: Any) -> None:
    """Replace every ``ShapeSpec`` object under ``node`` by ``L(ShapeSpec)(...)``, in place.

    The shipped configs hold ``ShapeSpec`` tuples (as Detectron2's model zoo does); ``LazyConfig.save``
    writes those as ``!!python/object/new`` YAML tags. As a call they are plain YAML keys and
    ``instantiate`` builds the same ``ShapeSpec``.
    """
    from detectron2.config import LazyCall as L
    from detectron2.layers import ShapeSpec
    from omegaconf import DictConfig, ListConfig

    keys = node.keys() if isinstance(node, DictConfig) else range(len(node)) if isinstance(node, ListConfig) else ()
    for key in keys:
        value = node[key]
        if isinstance(value, ShapeSpec):
            node[key] = L(ShapeSpec)(**{k: v for k, v in value._asdict().items() if v is not None})
        else:
            lazy_shape_specs(value)


def detection_config(backbone: Backbone, recipe: Recipe, classes: int, train_name: str, val_name: str,
                     seed: int) -> Any:
    """The Mask R-CNN LazyConfig of ``recipe`` for ``backbone`` (an omegaconf ``DictConfig``).

    ``demo``: the ViT-B recipe with the demo's encoder (global attention, ViTDet's position table
    kept at the pretraining size ``recipe.img_size``), a 64-channel pyramid and light heads, LSJ
    at ``recipe.det_size`` without padding and a short schedule on the CPU. ``paper``: the
    shipped recipe of the architecture, unchanged but for the checkpoint, classes, data, seed and
    (when given) the backbone's layer decay.

    Raises:
        ValueError: no recipe for the architecture.
    """
    import detectron2.data.transforms as T
    from detectron2.config import LazyCall as L
    from detectron2.config import LazyConfig
    from detectron2.layers import ShapeSpec

    from detection.config import get_config_file

    pretrained = str(backbone.checkpoint) if backbone.checkpoint is not None else ""
    if recipe.name != "demo":
        if recipe.arch.name not in DET_PAPER_CONFIGS or recipe.arch.size is None:
            raise ValueError(f"no Mask R-CNN recipe for {recipe.arch} (have: {', '.join(DET_PAPER_CONFIGS)})")
        cfg = LazyConfig.load(str(get_config_file(DET_PAPER_CONFIGS[recipe.arch.name])))
        cfg.model.backbone.pretrained = pretrained
        cfg.model.roi_heads.num_classes = classes
        cfg.dataloader.train.dataset.names = train_name
        cfg.dataloader.test.dataset.names = val_name
        cfg.train.seed = seed
        if backbone.layer_decay is not None:
            cfg.optimizer.params.layer_decay = backbone.layer_decay
        lazy_shape_specs(cfg)
        return cfg

    cfg = LazyConfig.load(str(get_config_file("mask_rcnn_vitdet_b_100ep")))
    size, width, iters = recipe.det_size, DEMO_WIDTH, recipe.det_iters
    model = cfg.model
    model.backbone.net.update(name=recipe.arch.name, img_size=size, pretrain_img_size=recipe.img_size,
                              window_size=0, global_blocks=(), drop_path_rate=0.0, **recipe.arch.overrides)
    model.backbone.scale_factors = scale_factors(recipe.arch.dims["patch_size"])
    model.backbone.pretrained = pretrained
    model.backbone.out_channels = width
    rpn = model.proposal_generator
    rpn.head.in_channels = width
    rpn.anchor_generator.sizes = [[a] for a in recipe.det_anchors]
    rpn.pre_nms_topk = (400, 200)
    rpn.post_nms_topk = (200, 100)
    heads = model.roi_heads
    heads.num_classes = classes
    heads.batch_size_per_image = 64
    heads.box_head.input_shape = L(ShapeSpec)(channels=width, height=7, width=7)
    heads.box_head.conv_dims = []
    heads.box_head.fc_dims = [256]
    heads.box_predictor.input_shape = L(ShapeSpec)(channels=256)
    heads.box_predictor.test_score_thresh = 0.05
    heads.mask_head.input_shape = L(ShapeSpec)(channels=width, height=14, width=14)
    heads.mask_head.conv_dims = [width, width]

    train_loader = cfg.dataloader.train
    crop = train_loader.mapper.augmentations[-1]  # the recipe's LSJ crop, whichever class it is
    if "crop_size" not in crop:
        raise ValueError(f"{get_config_file('mask_rcnn_vitdet_b_100ep')}: the last training augmentation is not "
                         "the LSJ crop (no crop_size)")
    crop.update(crop_size=(size, size), pad=False)
    train_loader.dataset.names = train_name
    train_loader.total_batch_size = recipe.det_batch
    train_loader.num_workers = 0
    train_loader.mapper.augmentations = [
        L(T.RandomFlip)(horizontal=True),
        L(T.ResizeScale)(min_scale=0.8, max_scale=1.25, target_height=size, target_width=size),
        crop,
    ]
    test_loader = cfg.dataloader.test
    test_loader.dataset.names = val_name
    test_loader.num_workers = 0
    test_loader.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=size, max_size=size)]
    cfg.optimizer.lr = recipe.det_lr
    cfg.optimizer.params.layer_decay = recipe.layer_decay("detect", backbone)
    cfg.lr_multiplier.warmup_iters = max(1, iters // 10)
    cfg.lr_multiplier.decay_at = (0.85,)
    cfg.train.update(max_iter=iters, log_period=max(1, iters // 30), eval_period=0, device="cpu", seed=seed)
    cfg.train.checkpointer.period = iters
    lazy_shape_specs(cfg)
    return cfg


def save_config(cfg: Any, path: Path) -> Path:
    """``LazyConfig.save`` to ``path``; an error when Detectron2 could only pickle it (``path.pkl``)."""
    from detectron2.config import LazyConfig

    path.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{path}.pkl").unlink(missing_ok=True)
    LazyConfig.save(cfg, str(path))
    if Path(f"{path}.pkl").exists() or not path.is_file():
        raise RuntimeError(f"{path}: Detectron2 could not write this config as YAML (it pickled it to {path}.pkl)")
    return path


def run_detection(backbone: Backbone, recipe: Recipe, data: DataPaths, seed: int, out: Path,
                  examples: int = 0) -> TaskResult:
    """Mask R-CNN with the ViTDet pyramid (Detectron2); COCO AP box / mask. Examples: (val image, drawn RGB).

    Writes the config to ``out/mask_rcnn.yaml`` (``LazyConfig.save``), trains and evaluates from that file.
    """
    from detection.engine import RunOptions, eval_main, train_main

    out = Path(out)
    train_name, val_name, classes = register_coco(data.require("detect"))
    cfg_path = save_config(detection_config(backbone, recipe, classes, train_name, val_name, seed), out / CONFIG_NAME)
    train_main(RunOptions(config=str(cfg_path), output=str(out)))
    weights = str(out / "model_final.pth")
    results = eval_main(RunOptions(config=str(cfg_path), output=str(out), weights=weights))
    notes, tasks = results.get("notes", {}), {"AP box": "bbox", "AP mask": "segm"}
    metrics = {m: float(results.get(t, {}).get("AP", float("nan"))) for m, t in tasks.items()}
    result = TaskResult(metrics, detectron2_curve(out / "metrics.json"), "iteration",
                        notes={m: notes[t] for m, t in tasks.items() if t in notes})
    if examples:
        result.examples = detect_examples(cfg_path, weights, val_name, examples)
    return result


def detectron2_curve(metrics_json: Path) -> list[tuple[float, float]]:
    """(iteration, total loss) from Detectron2's ``metrics.json``."""
    curve = []
    for line in metrics_json.read_text().splitlines() if metrics_json.is_file() else []:
        rec = json.loads(line)
        if "total_loss" in rec:
            curve.append((float(rec["iteration"]) + 1, float(rec["total_loss"])))
    return curve


def detect_examples(cfg_path: Path, weights: str, val_name: str, n: int,
                    top: int = 4) -> list[tuple[Path, np.ndarray]]:
    """The ``top`` highest-scoring detections on the first ``n`` val images, drawn ([H, W, 3] uint8)
    (a weak detector's scores stay low, so a fixed score threshold would show empty images)."""
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
