"""Segmentation transfer: UperNet (MMSeg) on a ViT encoder, ADE20K-layout data, mIoU.

The config is MMSeg's own: a shipped recipe (``segmentation/configs``) loaded with MMEngine's
``Config.fromfile``, edited (``merge_from_dict`` and attribute edits) and saved with
``Config.dump`` into the run folder; the run then trains from that file through
``segmentation.engine``, so the saved file is the exact record of what ran.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mae_transfer.runners.recipe import Backbone, DataPaths, Recipe, TaskResult

SEG_PAPER_CONFIGS = {"vit_base_patch16": "upernet-mae-vit-b_8xb2-160k_ade20k-512x512.py",
                     "vit_large_patch16": "upernet-mae-vit-l_8xb2-160k_ade20k-512x512.py"}
CONFIG_NAME = "upernet.py"  # the saved config, in the run folder


def segmentation_config(backbone: Backbone, recipe: Recipe, data: DataPaths, seed: int) -> Any:
    """The UperNet config of ``recipe`` for ``backbone`` (an MMEngine ``Config``).

    ``demo``: the ViT-B recipe's config with the demo's encoder, crop, heads, schedule and the
    sample data's classes; ``paper``: the shipped recipe of the architecture, unchanged but for
    the checkpoint, the seed, the data root and (when given) the backbone's layer decay.

    Raises:
        ValueError: no recipe for the architecture, or the demo recipe without class names.
    """
    from mmengine.config import Config

    from segmentation import CONFIG_DIR
    from segmentation.engine import set_data_root

    root = data.require("segment")
    pretrained = str(backbone.checkpoint) if backbone.checkpoint is not None else None
    if recipe.name != "demo":
        if recipe.arch.name not in SEG_PAPER_CONFIGS or recipe.arch.size is None:
            raise ValueError(f"no UperNet recipe for {recipe.arch} (have: {', '.join(SEG_PAPER_CONFIGS)})")
        cfg = Config.fromfile(str(CONFIG_DIR / SEG_PAPER_CONFIGS[recipe.arch.name]))
        cfg.model.pretrained = pretrained
        cfg.randomness = dict(seed=seed)
        if backbone.layer_decay is not None:
            cfg.optim_wrapper.paramwise_cfg.layer_decay = backbone.layer_decay
        set_data_root(cfg, root)
        return cfg

    if data.seg_classes is None:
        raise ValueError("the demo segmentation recipe needs the class names of the data (seg_classes)")
    cfg = Config.fromfile(str(CONFIG_DIR / SEG_PAPER_CONFIGS["vit_base_patch16"]))
    dims = recipe.arch.dims
    dim, depth, size, iters = dims["embed_dim"], dims["depth"], recipe.seg_size, recipe.seg_iters
    warmup = max(1, iters // 10)
    classes = len(data.seg_classes)
    cfg.crop_size = (size, size)
    cfg.data_preprocessor.size = (size, size)
    model = cfg.model
    model.pretrained = pretrained
    model.data_preprocessor.size = (size, size)
    model.backbone.arch = dict(embed_dim=dim, depth=depth, num_heads=dims["num_heads"], patch_size=dims["patch_size"])
    model.backbone.update(img_size=size, out_indices=[depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1],
                          drop_path_rate=0.0)
    # The neck keeps MMSeg's rescales (4, 2, 1, 0.5): with patch 8 its maps have strides 2..16, finer
    # than the paper's 4..32; on the demo's small objects this trained better than the stride-matched
    # (2, 1, 0.5, 0.25) in our runs (which is ~2x cheaper), so the demo pays for it.
    model.neck.embed_dim = dim
    model.decode_head.update(in_channels=[dim] * 4, channels=64, pool_scales=(1, 2, 3), num_classes=classes,
                             dropout_ratio=0.0)
    model.auxiliary_head.update(in_channels=dim, channels=32, num_classes=classes, dropout_ratio=0.0)
    model.test_cfg = dict(mode="whole")
    # no resize or crop: the scenes are already recipe.seg_size
    cfg.train_pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True),
                          dict(type="RandomFlip", prob=0.5), dict(type="PackSegInputs")]
    cfg.test_pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True),
                         dict(type="PackSegInputs")]
    dataset = dict(type="ADELayoutDataset", data_root=str(root), metainfo=dict(classes=tuple(data.seg_classes)))
    loader = dict(num_workers=0, persistent_workers=False)
    cfg.merge_from_dict({
        "train_dataloader": dict(loader, batch_size=recipe.seg_batch,
                                 dataset=dict(dataset, pipeline=cfg.train_pipeline)),
        "val_dataloader": dict(loader, dataset=dict(dataset, pipeline=cfg.test_pipeline)),
        "test_dataloader": dict(loader, dataset=dict(dataset, pipeline=cfg.test_pipeline)),
        "optim_wrapper.optimizer.lr": recipe.seg_lr,
        "optim_wrapper.paramwise_cfg.layer_decay": recipe.layer_decay("segment", backbone),
        "train_cfg": dict(max_iters=iters, val_interval=iters),
        "default_hooks.logger.interval": 10,
        "default_hooks.checkpoint.interval": iters,
    })
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=warmup),
                           dict(type="PolyLR", eta_min=0.0, power=1.0, by_epoch=False, begin=warmup, end=iters)]
    cfg.randomness = dict(seed=seed)
    return cfg


def run_segmentation(backbone: Backbone, recipe: Recipe, data: DataPaths, seed: int, out: Path,
                     examples: int = 0) -> TaskResult:
    """UperNet (MMSeg) on the ADE20K-layout data; mIoU in %. Examples: (val image, label map [H, W]).

    Writes the config to ``out/upernet.py`` (``Config.dump``) and trains from that file.
    """
    from segmentation.engine import load_config, prepare, train

    out = Path(out)
    cfg_path = out / CONFIG_NAME
    segmentation_config(backbone, recipe, data, seed).dump(str(cfg_path))
    cfg = prepare(load_config(cfg_path), work_dir=str(out), launcher="none", config_path=str(cfg_path))
    cfg.experiment_name = f"segment_{out.name}_{seed}"
    runner = train(cfg)
    miou = float(runner.message_hub.get_scalar("val/mIoU").current())
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    result = TaskResult({"mIoU": miou}, [(i + 1.0, float(v)) for i, v in enumerate(losses)], "iteration")
    if examples:
        result.examples = segment_examples(runner.model, cfg, data.require("segment"), examples)
    return result


def segment_examples(model: Any, cfg: Any, root: Path, n: int) -> list[tuple[Path, np.ndarray]]:
    """The predicted label maps ([H, W] int64, class index) of the first ``n`` val images."""
    import mmcv
    from mmseg.apis import inference_model

    model.cfg = cfg  # what inference_model reads its test pipeline from
    model.eval()
    found = []
    for image in sorted((root / "images" / "validation").glob("*.jpg"))[:n]:
        result = inference_model(model, mmcv.imread(str(image)))
        found.append((image, result.pred_sem_seg.data[0].cpu().numpy().astype(np.int64)))
    return found
