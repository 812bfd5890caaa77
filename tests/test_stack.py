"""The installed stack works for real: Detectron2, MMCV ops, MMSeg, MMEngine resume under safe loading.

These are the facts of shared/STACK.md, checked on every run: if the set-up breaks one of them,
this file says which.
"""
from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from torch import nn

from unsafe_pickle import unsafe_mmengine_checkpoint


# --------------------------------------------------------------------------- Detectron2
def test_detectron2_mask_rcnn_trains_one_step_on_cpu():
    from detectron2 import model_zoo
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    masks = torch.zeros(1, 96, 128, dtype=torch.bool)
    masks[0, 20:60, 30:90] = True
    inst = Instances((96, 128), gt_boxes=Boxes(torch.tensor([[30.0, 20.0, 90.0, 60.0]])),
                     gt_classes=torch.tensor([1]), gt_masks=BitMasks(masks))
    batch = [{"image": torch.randint(0, 255, (3, 96, 128)).float(), "height": 96, "width": 128, "instances": inst}]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = copy.deepcopy(model.roi_heads.mask_head.predictor.weight.detach())
    with EventStorage(0):
        losses = model(batch)
        assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        opt.step()
    assert not torch.equal(before, model.roi_heads.mask_head.predictor.weight)


def test_detectron2_coco_evaluator_scores_ground_truth_as_perfect(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    boxes = {1: [[10, 10, 30, 20]], 2: [[5, 5, 20, 30], [40, 30, 20, 20]]}  # xywh per image
    images, anns = [], []
    for img_id, bxs in boxes.items():
        images.append({"id": img_id, "file_name": f"{img_id}.jpg", "height": 64, "width": 64})
        for x, y, w, h in bxs:
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 1, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0, "segmentation": [poly]})
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    name = f"stack_test_{os.getpid()}"
    register_coco_instances(name, {}, str(tmp_path / "gt.json"), str(tmp_path))
    try:
        assert len(DatasetCatalog.get(name)) == 2  # loading fills the category-id mapping, as a data loader does
        evaluator = COCOEvaluator(name, output_dir=str(tmp_path), use_fast_impl=False)
        evaluator.reset()
        for img_id, bxs in boxes.items():
            xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in bxs], dtype=torch.float32)
            masks = torch.zeros(len(bxs), 64, 64, dtype=torch.bool)
            for i, (x, y, w, h) in enumerate(bxs):
                masks[i, y:y + h, x:x + w] = True
            inst = Instances((64, 64), pred_boxes=Boxes(xyxy), scores=torch.ones(len(bxs)),
                             pred_classes=torch.zeros(len(bxs), dtype=torch.long), pred_masks=masks)
            evaluator.process([{"image_id": img_id}], [{"instances": inst}])
        results = evaluator.evaluate()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] > 99.0  # polygon rasterization vs box masks differ by border pixels


# --------------------------------------------------------------------------- MMCV ops
def test_mmcv_compiled_ops_load_and_compute():
    from mmcv.ops import nms, point_sample, roi_align

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7])
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    feat = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    out = roi_align(feat, torch.tensor([[0, 0, 0, 4, 4]], dtype=torch.float32), (2, 2), 1.0, 2, "avg", True)
    assert out.shape == (1, 1, 2, 2) and out[0, 0, 0, 0] < out[0, 0, 1, 1]
    pts = point_sample(feat, torch.tensor([[[0.5, 0.5]]]), align_corners=False)
    assert pts.shape == (1, 1, 1)


# --------------------------------------------------------------------------- MMSeg
def test_mmseg_encoder_decoder_with_uperhead_computes_a_loss():
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    norm = dict(type="BN", requires_grad=True)
    cfg = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[0, 0, 0], std=[1, 1, 1], size=(64, 64)),
        backbone=dict(type="VisionTransformer", img_size=(64, 64), patch_size=16, embed_dims=32, num_layers=4,
                      num_heads=2, out_indices=(0, 1, 2, 3)),
        neck=dict(type="Feature2Pyramid", embed_dim=32, rescales=[4, 2, 1, 0.5], norm_cfg=norm),
        decode_head=dict(type="UPerHead", in_channels=[32] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2),
                         channels=16, num_classes=3, norm_cfg=norm,
                         loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode="whole"),
    )
    model = MODELS.build(cfg)
    model.train()
    samples = []
    for _ in range(2):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=torch.randint(0, 3, (1, 64, 64)))
        s.set_metainfo(dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        samples.append(s)
    data = model.data_preprocessor(dict(inputs=[torch.rand(3, 64, 64) * 255 for _ in range(2)], data_samples=samples), True)
    losses = model(**data, mode="loss")
    assert "decode.loss_ce" in losses and torch.isfinite(losses["decode.loss_ce"])
    losses["decode.loss_ce"].backward()
    assert model.backbone.patch_embed.projection.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- MMEngine resume
def _runner(work_dir, max_iters, resume, hooks=()):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, inputs, labels=None, mode="tensor"):
            out = self.linear(inputs)
            return {"loss": ((out.squeeze(1) - labels) ** 2).mean()} if mode == "loss" else out

    torch.manual_seed(0)  # same initial weights in every runner
    x = torch.randn(16, 2)
    data = [(x[i], x[i].sum()) for i in range(16)]
    return Runner(
        model=Toy(),  # built after the seed above
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=data, sampler=dict(type="DefaultSampler", shuffle=True),
                              batch_size=4, collate_fn=dict(type="default_collate")),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=3, by_epoch=False),
                           logger=dict(type="LoggerHook", interval=1)),
        custom_hooks=list(hooks),
        randomness=dict(seed=0),
        resume=resume,
        default_scope="mmengine",
    )


def test_mmengine_resume_under_weights_only(tmp_path):
    """MMEngine's own checkpoints fail the weights_only load; with our hook they resume exactly."""
    plain = _runner(tmp_path / "plain", 3, False)
    plain.train()
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer|GLOBAL"):
        torch.load(tmp_path / "plain" / "iter_3.pth", weights_only=True)

    hook = dict(type="SafeCheckpointHook")
    import segmentation.safe_loading  # noqa: F401  (registers the hook)

    full = _runner(tmp_path / "full", 6, False, [hook])
    full.train()
    part = _runner(tmp_path / "part", 3, False, [hook])
    part.train()
    ckpt = torch.load(tmp_path / "part" / "iter_3.pth", weights_only=True)  # no allow-list needed
    assert ckpt["meta"]["iter"] == 3
    resumed = _runner(tmp_path / "part", 6, True, [hook])
    resumed.train()
    assert resumed.iter == 6
    assert resumed.message_hub.get_scalar("train/loss").data[0].shape[0] == 6  # history kept across resume
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b)


def test_mmengine_load_still_refuses_code(tmp_path):
    from mmengine.runner.checkpoint import _load_checkpoint

    unsafe_mmengine_checkpoint(tmp_path / "evil.pth", tmp_path / "pwned")
    with pytest.raises(pickle.UnpicklingError):
        _load_checkpoint(str(tmp_path / "evil.pth"), map_location="cpu")
    assert not (tmp_path / "pwned").exists()
