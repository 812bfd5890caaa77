"""The transfer runners: their Detectron2 / MMSeg configs are the frameworks' own config objects,
saved by the frameworks, and ``demo`` and ``bench`` go through the same runner."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from mae_transfer.runners import Arch, Backbone, DataPaths, Recipe, TaskResult


@pytest.fixture()
def sample_paths(tmp_path) -> DataPaths:
    """The sample-data layout (folders only: building a config reads no data)."""
    from mae_transfer.sample_data import SEG_CLASSES

    paths = DataPaths.sample(tmp_path / "data")
    for folder in (paths.classification, paths.coco, paths.ade):
        folder.mkdir(parents=True)
    assert paths.seg_classes == tuple(SEG_CLASSES)
    return paths


def _target(node) -> str:
    t = node["_target_"]
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def test_demo_detection_config_is_a_lazyconfig_saved_by_detectron2(tmp_path):
    """Edited from the shipped ViTDet config, written by ``LazyConfig.save`` as plain YAML (shapes as
    ``L(ShapeSpec)`` calls, nothing pickled); it loads back through ``LazyConfig.load`` and the
    toolkit's own loader with the demo's values, and builds the same detector as the config in memory."""
    import torch
    from detectron2.config import LazyConfig, instantiate
    from detectron2.layers import ShapeSpec

    from detection.config import is_lazy, load_config
    from mae_transfer.runners.detection import detection_config, save_config

    recipe = Recipe.demo(quick=True)
    cfg = detection_config(Backbone("random init"), recipe, 4, "my_train", "my_val", seed=3)
    path = save_config(cfg, tmp_path / "mask_rcnn.yaml")
    text = path.read_text()
    assert not Path(f"{path}.pkl").exists()
    assert "!!python/object" not in text  # no object state: ShapeSpec is a call
    assert set(re.findall(r"!!python/\w+:\S+", text)) <= {"!!python/name:detection.layers.LayerNorm2d"}

    loaded = LazyConfig.load(str(path))
    net = loaded.model.backbone.net
    assert (net.name, net.depth, net.patch_size) == (recipe.arch.name, 4, 8)
    assert (net.img_size, net.pretrain_img_size, net.window_size, list(net.global_blocks)) == (128, 64, 0, [])
    assert list(loaded.model.backbone.scale_factors) == [2.0, 1.0, 0.5, 0.25]  # strides 4..32 from patch 8
    assert loaded.model.backbone.out_channels == 64 and loaded.model.backbone.pretrained == ""
    heads = loaded.model.roi_heads
    assert heads.num_classes == 4 and _target(heads.box_head.input_shape) == "detectron2.layers.ShapeSpec"
    assert instantiate(heads.box_head.input_shape) == ShapeSpec(channels=64, height=7, width=7)
    assert instantiate(heads.box_predictor.input_shape) == ShapeSpec(channels=256)
    assert [list(s) for s in loaded.model.proposal_generator.anchor_generator.sizes] == [[16], [32], [64], [128], [256]]
    augs = instantiate(loaded.dataloader.train.mapper.augmentations)
    assert [type(a).__name__ for a in augs] == ["RandomFlip", "ResizeScale", "FixedSizeCrop"]
    assert (augs[1].min_scale, augs[1].max_scale, augs[1].target_height) == (0.8, 1.25, 128)
    assert list(augs[2].crop_size) == [128, 128] and augs[2].pad is False
    assert loaded.dataloader.train.dataset.names == "my_train" and loaded.dataloader.test.dataset.names == "my_val"
    assert loaded.dataloader.train.total_batch_size == recipe.det_batch
    assert (loaded.optimizer.lr, loaded.optimizer.params.layer_decay) == (recipe.det_lr, recipe.det_layer_decay)
    assert (loaded.train.max_iter, loaded.train.seed, loaded.train.device, loaded.train.eval_period) == (20, 3, "cpu", 0)
    assert list(loaded.lr_multiplier.decay_at) == [0.85] and loaded.lr_multiplier.warmup_iters == 2

    checked = load_config(path)  # what detection.engine's train_main / eval_main load: a LazyConfig
    assert is_lazy(checked) and checked.train.max_iter == 20

    torch.manual_seed(0)
    built = instantiate(loaded.model)
    torch.manual_seed(0)
    reference = instantiate(cfg.model)
    a, b = built.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert repr(built) == repr(reference)


def test_paper_detection_config_keeps_the_shipped_recipe(tmp_path):
    from detectron2.config import LazyConfig
    from detectron2.utils.registry import locate

    from detection.config import get_config_file
    from mae_backbone import create_vit
    from mae_transfer.runners.detection import detection_config, save_config

    vit_b = Arch.make("vit_base_patch16")
    backbone = Backbone("mine", tmp_path / "enc.pth", layer_decay=0.6)
    path = save_config(detection_config(backbone, Recipe.paper(vit_b), 7, "tr", "va", seed=5), tmp_path / "m.yaml")
    assert "!!python/object" not in path.read_text()
    loaded = LazyConfig.load(str(path))
    shipped = LazyConfig.load(str(get_config_file("mask_rcnn_vitdet_b_100ep")))
    assert loaded.model.backbone.pretrained == str(tmp_path / "enc.pth") and loaded.model.roi_heads.num_classes == 7
    assert loaded.optimizer.params.layer_decay == 0.6 and loaded.train.seed == 5
    net, shipped_net = loaded.model.backbone.net, shipped.model.backbone.net
    assert locate(_target(net)) is locate(_target(shipped_net)) is create_vit
    assert {k: net[k] for k in net if k != "_target_"} == {k: shipped_net[k] for k in shipped_net if k != "_target_"}
    assert loaded.train.max_iter == shipped.train.max_iter
    with pytest.raises(ValueError, match="no Mask R-CNN recipe"):
        detection_config(backbone, Recipe.paper(Arch.make("vit_small_patch16")), 7, "tr", "va", seed=5)


def test_demo_segmentation_config_is_an_mmengine_config_dumped_by_mmengine(tmp_path, sample_paths):
    """Edited from the shipped UperNet config, written by ``Config.dump``; ``Config.fromfile`` and the
    toolkit's checked loader read it back with the demo's values, equal to the config in memory."""
    from mmengine.config import Config

    from mae_transfer.runners.segmentation import segmentation_config
    from segmentation.engine import load_config

    recipe = Recipe.demo(quick=True)
    cfg = segmentation_config(Backbone("MAE", tmp_path / "enc.safetensors"), recipe, sample_paths, seed=3)
    path = tmp_path / "upernet.py"
    cfg.dump(str(path))
    loaded = Config.fromfile(str(path))
    assert loaded.to_dict() == cfg.to_dict()
    m = loaded.model
    assert m.pretrained == str(tmp_path / "enc.safetensors")
    assert m.backbone.arch == dict(embed_dim=192, depth=4, num_heads=3, patch_size=8)
    assert (m.backbone.img_size, m.backbone.out_indices, m.backbone.drop_path_rate) == (128, [0, 1, 2, 3], 0.0)
    assert m.backbone.use_rel_pos == "beit"  # the shipped recipe's options stay
    assert m.neck.embed_dim == 192 and list(m.neck.rescales) == [4, 2, 1, 0.5]
    assert m.decode_head.num_classes == m.auxiliary_head.num_classes == 5
    assert (m.decode_head.channels, m.decode_head.in_channels) == (64, [192] * 4)
    assert m.test_cfg == dict(mode="whole") and tuple(m.data_preprocessor.size) == (128, 128)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        ds = loaded[loader].dataset
        assert ds.type == "ADELayoutDataset" and ds.data_root == str(sample_paths.ade)
        assert tuple(ds.metainfo.classes) == sample_paths.seg_classes
        assert ds.data_prefix.img_path.startswith("images/")  # kept from the shipped config
        assert loaded[loader].num_workers == 0
    assert [p.type for p in loaded.train_dataloader.dataset.pipeline] == [
        "LoadImageFromFile", "LoadAnnotations", "RandomFlip", "PackSegInputs"]
    assert loaded.train_dataloader.batch_size == recipe.seg_batch
    assert loaded.train_dataloader.sampler.type == "InfiniteSampler"
    assert loaded.optim_wrapper.optimizer.lr == recipe.seg_lr
    assert loaded.optim_wrapper.paramwise_cfg.layer_decay == recipe.seg_layer_decay
    assert [(s.type, s.begin, s.end) for s in loaded.param_scheduler] == [("LinearLR", 0, 2), ("PolyLR", 2, 20)]
    assert (loaded.train_cfg.max_iters, loaded.train_cfg.val_interval, loaded.randomness.seed) == (20, 20, 3)
    assert load_config(path).model.backbone.img_size == 128  # the checked loader accepts every key


def test_paper_segmentation_config_keeps_the_shipped_recipe(tmp_path, sample_paths):
    from mmengine.config import Config

    from mae_transfer.runners.segmentation import segmentation_config
    from segmentation import CONFIG_DIR

    vit_b = Arch.make("vit_base_patch16")
    cfg = segmentation_config(Backbone("mine", tmp_path / "enc.pth", layer_decay=0.7), Recipe.paper(vit_b),
                              sample_paths, seed=5)
    cfg.dump(str(tmp_path / "upernet.py"))
    loaded = Config.fromfile(str(tmp_path / "upernet.py"))
    shipped = Config.fromfile(str(CONFIG_DIR / "upernet-mae-vit-b_8xb2-160k_ade20k-512x512.py"))
    assert loaded.model.pretrained == str(tmp_path / "enc.pth") and loaded.randomness.seed == 5
    assert loaded.optim_wrapper.paramwise_cfg.layer_decay == 0.7
    assert loaded.train_dataloader.dataset.data_root == loaded.val_dataloader.dataset.data_root == str(sample_paths.ade)
    assert loaded.model.backbone == shipped.model.backbone and loaded.train_cfg == shipped.train_cfg


def test_demo_and_bench_run_the_same_task_runner(tmp_path, monkeypatch):
    """Both look the runner up in ``mae_transfer.runners``: replacing it there reaches both."""
    from mae_transfer import runners
    from mae_transfer.bench import BenchPlan, run_bench
    from mae_transfer.demo import DemoPlan, run_demo
    from pretrain import ENCODER_NAME

    calls = []

    def recorder(task, backbone, recipe, data, seed, out, examples=0):
        calls.append((task, backbone.checkpoint is None, recipe, seed))
        return TaskResult({"top-1": 50.0}, [(1.0, 1.0)], "epoch")

    monkeypatch.setattr(runners, "run_task", recorder)
    plan = DemoPlan.make(quick=True)
    (tmp_path / "demo" / "pretrain").mkdir(parents=True)
    (tmp_path / "demo" / "pretrain" / ENCODER_NAME).write_bytes(b"")  # the recorder never reads it
    ctx = run_demo(tmp_path / "demo", only=["linprobe"], plan=plan, log=lambda s: None)
    assert ctx.errors == {} and ctx.results["linprobe:top-1"] == {"mae": [50.0] * 3, "random": [50.0] * 3}
    assert calls == [("linprobe", False, plan.recipe, s) for s in (0, 1, 2)] + [
        ("linprobe", True, plan.recipe, s) for s in (0, 1, 2)]  # three seeds per init
    calls.clear()
    bench = BenchPlan([Backbone("random")], ["linprobe"], [0], Recipe.demo(quick=True), DataPaths())
    result = run_bench(bench, tmp_path / "bench", log=lambda s: None)
    assert [c.metrics for c in result.cells] == [{"top-1": 50.0}]
    assert calls == [("linprobe", True, plan.recipe, 0)]  # bench --quick: the demo's own recipe
