"""Helpers of the detection tests: tiny ViT overrides and a tiny generated COCO-format dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE = 64
CLASSES = ("square", "triangle")


def tiny_overrides(image: int = IMAGE, depth: int = 2, net: str = "model.backbone.net") -> list[str]:
    """LazyConfig overrides that shrink a shipped recipe's ViT to a CPU-test size: ViT-tiny
    (192 wide) with ``depth`` blocks at ``image`` px, 2x2 windows, the last block global."""
    return [
        f"{net}.name=vit_tiny_patch16", f"{net}.depth={depth}", f"{net}.img_size={image}", f"{net}.window_size=2",
        f"{net}.global_blocks=[{depth - 1}]", f"{net}.patch_size=16",
    ]


def _shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, kind: str, size: int) -> tuple[list[float], list[float]]:
    """Draw one filled shape; return its polygon [x1, y1, ...] and box [x, y, w, h]."""
    w = int(rng.integers(size // 4, size // 2))
    x0, y0 = (int(v) for v in rng.integers(0, size - w, 2))
    if kind == "square":
        poly = [x0, y0, x0 + w, y0, x0 + w, y0 + w, x0, y0 + w]
    else:
        poly = [x0, y0 + w, x0 + w, y0 + w, x0 + w / 2, y0]
    color = tuple(int(c) for c in rng.integers(80, 256, 3))
    draw.polygon(poly, fill=color)
    xs, ys = poly[0::2], poly[1::2]
    return [float(v) for v in poly], [float(min(xs)), float(min(ys)), float(max(xs) - min(xs)), float(max(ys) - min(ys))]


def write_tiny_coco(root: Path, n_images: int = 8, size: int = IMAGE, seed: int = 0) -> tuple[Path, Path]:
    """Images of colored squares and triangles on dark noise, with a COCO instances json."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n_images):
        pixels = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
        draw = ImageDraw.Draw(img)
        for k in range(1 + i % 2):
            cat = (i + k) % 2
            poly, box = _shape(draw, rng, CLASSES[cat], size)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat + 1, "bbox": box,
                         "area": box[2] * box[3] / (2 if cat else 1), "iscrowd": 0, "segmentation": [poly]})
        name = f"{i:03d}.png"
        img.save(img_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
    cats = [{"id": c + 1, "name": n} for c, n in enumerate(CLASSES)]
    json_file = root / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return json_file, img_dir


def ground_truth_detector(dataset: str, classes: tuple[int, ...] | None = None):
    """A Detectron2 "detector" that predicts each image's ground truth of ``dataset`` (score 1, exact
    boxes and polygon masks), restricted to the contiguous class ids ``classes`` (None: all; ``()``:
    it detects nothing). What a perfect model would output, to check the evaluation path: COCO AP
    must be 100 for it. It has one parameter, so that a checkpoint of it can be saved and loaded."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
    from detectron2.structures.masks import polygons_to_bitmask

    class _Heads:
        mask_on = True  # what ``detection.engine.model_tasks`` reads: it predicts boxes and masks

    class Detector(torch.nn.Module):
        input_format = "RGB"

        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.roi_heads = _Heads()

        def forward(self, batched_inputs: list[dict]) -> list[dict]:
            records = {r["image_id"]: r for r in DatasetCatalog.get(dataset)}
            outputs = []
            for item in batched_inputs:
                h, w = item["height"], item["width"]
                anns = [a for a in records[item["image_id"]]["annotations"]
                        if classes is None or a["category_id"] in classes]
                inst = Instances((h, w))
                boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
                inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
                inst.scores = torch.ones(len(anns))
                inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
                masks = [polygons_to_bitmask(a["segmentation"], h, w) for a in anns]
                inst.pred_masks = (BitMasks(torch.from_numpy(np.stack(masks))) if masks
                                   else BitMasks(torch.zeros(0, h, w, dtype=torch.bool))).tensor
                outputs.append({"instances": inst})
            return outputs

    return Detector()
