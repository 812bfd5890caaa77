"""Deterministic sample data in every format the toolkit reads, made from photographs that ship
inside the ``scikit-image`` wheel (nothing is downloaded).

Each scene is a crop of a real photograph with a few textured objects pasted on it.  Objects
belong to ``CATEGORIES`` (their shape decides the category; texture and colour are random), never
overlap, and are drawn from their polygon, so boxes, masks and label maps are exact.  The
classification and unlabeled images hold one object each, flat-coloured on a flat background of
another colour: only its outline tells the category.

``write_sample_data(out, seed)`` writes::

    out/unlabeled/*.png                                    unlabeled images for pretraining (one object
                                                           each, of a random category; no labels kept)
    out/classification/{train,val}/<category>/*.png        ImageNet-style class folders
    out/coco/{train2017,val2017}/*.jpg                     COCO instances (polygon masks)
    out/coco/annotations/instances_{train,val}2017.json
    out/ade/ADEChallengeData2016/images/{training,validation}/*.jpg      ADE20K layout
    out/ade/ADEChallengeData2016/annotations/{training,validation}/*.png (0 = unlabelled,
                                                                          1 = background, 2.. = categories)
    out/sample_data.json                                   what was written, with the seed
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = ("disk", "square", "triangle", "star")
SEG_CLASSES = ("background", *CATEGORIES)  # ADE label value = index + 1 (0 = unlabelled)
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
TEXTURES = ("brick.png", "grass.png", "gravel.png")


@dataclass(frozen=True)
class SampleSizes:
    """How much of each kind is written. The defaults are the demo's regime, the one where
    pretraining should matter: many unlabeled images, few labels per class, and enough val images
    that a top-1 difference is not one image's."""

    unlabeled: int = 2000
    cls_train_per_class: int = 10
    cls_val_per_class: int = 50
    cls_size: int = 64
    scene_train: int = 120
    scene_val: int = 30
    scene_size: int = 128


def _load(name: str) -> np.ndarray:
    with resources.as_file(resources.files("skimage.data") / name) as p:
        img = Image.open(p)
        return np.asarray(img.convert("RGB" if name in PHOTOS else "L"))


def _shape_polygon(category: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if category == "disk":
        pts = [(math.cos(2 * math.pi * k / 32), math.sin(2 * math.pi * k / 32)) for k in range(32)]
    elif category == "square":
        pts = [(math.cos(angle + math.pi / 4 + k * math.pi / 2) * math.sqrt(2) * 0.8,
                math.sin(angle + math.pi / 4 + k * math.pi / 2) * math.sqrt(2) * 0.8) for k in range(4)]
    elif category == "triangle":
        pts = [(math.cos(angle + 2 * math.pi * k / 3), math.sin(angle + 2 * math.pi * k / 3)) for k in range(3)]
    elif category == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(angle + math.pi * k / 5),
                (1.0 if k % 2 == 0 else 0.45) * math.sin(angle + math.pi * k / 5)) for k in range(10)]
    else:
        raise ValueError(f"unknown category {category!r}")
    return [(round(cx + r * x, 2), round(cy + r * y, 2)) for x, y in pts]


class SceneMaker:
    """Renders scenes; all randomness comes from the ``numpy`` generator passed in."""

    def __init__(self) -> None:
        self.photos = [_load(n) for n in PHOTOS]
        self.textures = [_load(n) for n in TEXTURES]

    def _crop(self, rng: np.random.Generator, src: np.ndarray, size: int) -> np.ndarray:
        h, w = src.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        img = Image.fromarray(src[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        return np.asarray(img)

    def background(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return self._crop(rng, self.photos[int(rng.integers(len(self.photos)))], size).copy()

    def fill(self, rng: np.random.Generator, size: int) -> np.ndarray:
        tex = self._crop(rng, self.textures[int(rng.integers(len(self.textures)))], size).astype(np.float32) / 255
        colour = rng.uniform(0.2, 1.0, size=3).astype(np.float32)
        return (np.clip(0.35 + 0.65 * tex[..., None], 0, 1) * colour * 255).astype(np.uint8)

    def paste(self, rng: np.random.Generator, img: np.ndarray, polygon: list[tuple[float, float]]) -> np.ndarray:
        """Fill ``polygon`` with a random texture; returns the boolean mask drawn."""
        h, w = img.shape[:2]
        mask_img = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask_img).polygon(polygon, fill=1)
        mask = np.asarray(mask_img).astype(bool)
        img[mask] = self.fill(rng, max(h, w))[:h, :w][mask]
        return mask

    def scene(self, rng: np.random.Generator, size: int, max_objects: int = 4):
        """One scene: image [H, W, 3] uint8, label map [H, W] uint8, instances [(cat, polygon, mask)]."""
        img = self.background(rng, size)
        label = np.ones((size, size), np.uint8)  # 1 = background
        placed: list[tuple[float, float, float]] = []
        instances = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            for _attempt in range(30):
                r = float(rng.uniform(0.08, 0.2) * size)
                cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, size=2))
                if all(math.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
                    break
            else:
                continue
            cat = int(rng.integers(len(CATEGORIES)))
            poly = _shape_polygon(CATEGORIES[cat], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
            mask = self.paste(rng, img, poly)
            if mask.sum() < 16:
                continue
            label[mask] = cat + 2
            placed.append((cx, cy, r))
            instances.append((cat, poly, mask))
        return img, label, instances

    def single(self, rng: np.random.Generator, size: int, cat: int) -> np.ndarray:
        """One object of category ``cat`` in a random colour on a background of another random colour.

        Colour, size, position and rotation are random and independent of the category: only the
        outline tells the categories apart (the evidence is spatial structure, what a masked
        autoencoder must model to fill in a hidden part of the outline)."""
        background = rng.uniform(0, 255, size=3)
        img = np.broadcast_to(background.astype(np.uint8), (size, size, 3)).copy()
        r = float(rng.uniform(0.28, 0.42) * size)
        cx, cy = (float(v) for v in rng.uniform(r, size - r, size=2))
        polygon = _shape_polygon(CATEGORIES[cat], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        mask_img = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask_img).polygon(polygon, fill=1)
        img[np.asarray(mask_img).astype(bool)] = rng.uniform(0, 255, size=3).astype(np.uint8)
        return img


def _coco_split(maker: SceneMaker, rng: np.random.Generator, n: int, size: int, img_dir: Path,
                ade_img: Path, ade_ann: Path, prefix: str) -> dict:
    images, anns = [], []
    for i in range(n):
        img, label, instances = maker.scene(rng, size)
        name = f"{prefix}_{i:05d}"
        Image.fromarray(img).save(img_dir / f"{name}.jpg", quality=95)
        Image.fromarray(img).save(ade_img / f"{name}.jpg", quality=95)
        Image.fromarray(label).save(ade_ann / f"{name}.png")
        images.append({"id": i + 1, "file_name": f"{name}.jpg", "height": size, "width": size})
        for cat, poly, mask in instances:
            xs, ys = [p[0] for p in poly], [p[1] for p in poly]
            x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
            anns.append({
                "id": len(anns) + 1, "image_id": i + 1, "category_id": cat + 1, "iscrowd": 0,
                "segmentation": [[c for p in poly for c in p]],
                "bbox": [round(x0, 2), round(y0, 2), round(min(max(xs), size) - x0, 2), round(min(max(ys), size) - y0, 2)],
                "area": float(mask.sum()),
            })
    return {
        "info": {"description": "mae-transfer sample data", "version": "1"},
        "images": images,
        "annotations": anns,
        "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CATEGORIES)],
    }


def write_sample_data(out: str | Path, seed: int = 0, sizes: SampleSizes = SampleSizes()) -> dict:
    """Write the sample data under ``out`` (deterministic in ``seed``); returns the summary."""
    out = Path(out)
    maker = SceneMaker()
    rng = np.random.default_rng(seed)
    summary: dict = {"seed": seed, "categories": list(CATEGORIES), "seg_classes": list(SEG_CLASSES)}

    unlabeled = out / "unlabeled"
    unlabeled.mkdir(parents=True, exist_ok=True)
    for i in range(sizes.unlabeled):
        cat = int(rng.integers(len(CATEGORIES)))
        Image.fromarray(maker.single(rng, sizes.cls_size, cat)).save(unlabeled / f"unlabeled_{i:05d}.png")
    summary["unlabeled"] = sizes.unlabeled

    for split, per_class in (("train", sizes.cls_train_per_class), ("val", sizes.cls_val_per_class)):
        for cat, name in enumerate(CATEGORIES):
            d = out / "classification" / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(maker.single(rng, sizes.cls_size, cat)).save(d / f"{name}_{i:04d}.png")
        summary[f"classification_{split}"] = per_class * len(CATEGORIES)

    ade_root = out / "ade" / "ADEChallengeData2016"
    for split, ade_split, n in (("train", "training", sizes.scene_train), ("val", "validation", sizes.scene_val)):
        img_dir = out / "coco" / f"{split}2017"
        ade_img, ade_ann = ade_root / "images" / ade_split, ade_root / "annotations" / ade_split
        for d in (img_dir, ade_img, ade_ann, out / "coco" / "annotations"):
            d.mkdir(parents=True, exist_ok=True)
        coco = _coco_split(maker, rng, n, sizes.scene_size, img_dir, ade_img, ade_ann, split)
        (out / "coco" / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
        summary[f"coco_{split}_images"] = len(coco["images"])
        summary[f"coco_{split}_instances"] = len(coco["annotations"])
    (out / "sample_data.json").write_text(json.dumps(summary, indent=2))
    return summary
