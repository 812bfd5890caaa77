"""Datasets by name, the Detectron2 way, with errors that say which path and what was expected.

- COCO 2017 (``coco_2017_train`` / ``coco_2017_val``): Detectron2 registers these names itself,
  under ``$DETECTRON2_DATASETS/coco/{annotations/instances_*2017.json, train2017/, val2017/}``
  (default ``./datasets``); ``check_dataset`` verifies the files are there before training.
- any COCO-format json + image folder: ``register_coco_dataset(name, json, image_root)``
  validates both, then registers them with Detectron2's ``register_coco_instances``.
- evaluation: ``build_coco_evaluator`` is ``COCOEvaluator`` with pycocotools' own evaluation when
  Detectron2's C++ ops (its fast COCOeval) are not installed, and with a complete result when the
  model detected nothing (``CompleteCOCOEvaluator``).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
import numpy as np
from PIL import Image

IMAGE_FIELDS = ("id", "file_name", "height", "width")
ANNOTATION_FIELDS = ("id", "image_id", "category_id", "bbox")
CATEGORY_FIELDS = ("id", "name")
# modes Detectron2's read_image cannot turn into 8-bit RGB without losing the content (it would
# clip 16-bit values at 255): refused, convert them to 8-bit first
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# coordinates may leave the image by this much (COCO's own annotations do, by a pixel or so)
OUT_OF_BOUNDS_TOLERANCE = 0.02  # of the image side, plus 1 px


class DatasetError(ValueError):
    """A dataset that is missing or malformed; the message names the path and what was expected."""


def _problems_text(path: Path, problems: list[str]) -> str:
    shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems in all)" if len(problems) > 5 else "")
    return f"{path}: not a usable COCO instances file: {shown}"


def validate_coco_json(json_file: str | os.PathLike, image_root: str | os.PathLike) -> dict[str, Any]:
    """Check a COCO instances json and its image folder; return a short summary.

    Checks: both paths exist; the json parses and has ``images``, ``annotations`` and
    ``categories`` lists; each image has ``id, file_name, height, width`` and its file exists
    under ``image_root``; each annotation has ``id, image_id, category_id, bbox`` with a known
    image and category, a 4-number bbox and, when present, a ``segmentation`` that is a list of
    polygons (>= 3 points each) or an RLE dict; boxes and polygons lie inside their image (up to
    ``OUT_OF_BOUNDS_TOLERANCE``: more means the coordinates are wrong, e.g. normalized or for
    another image size) and boxes have a non-negative size. Each image file's header is read
    (``check_image``): unreadable, empty, 16-bit and over-sized (decompression bomb) files are
    refused, and its size must match the json's ``width``/``height``. Grayscale, palette and CMYK
    images are fine: Detectron2's ``read_image`` converts them to RGB. An image's pixel data is
    only decoded in training: a file damaged after its header fails there, with PIL's error.

    Returns:
        ``{"images": n, "annotations": n, "thing_classes": [names in category-id order]}``.
    Raises:
        DatasetError: naming the path and the first problems found.
    """
    json_file, image_root = Path(json_file), Path(image_root)
    if not json_file.is_file():
        raise DatasetError(f"{json_file}: no such annotation file (expected a COCO instances .json)")
    if not image_root.is_dir():
        raise DatasetError(f"{image_root}: no such image folder (expected the folder the json's file_name entries are relative to)")
    try:
        data = json.loads(json_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{json_file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{json_file}: expected a JSON object with images, annotations and categories")
    absent = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if absent:
        raise DatasetError(f"{json_file}: expected lists 'images', 'annotations' and 'categories'; "
                           f"missing or not a list: {', '.join(absent)}")
    problems: list[str] = []
    if not data["annotations"]:
        problems.append("'annotations' is empty: there is nothing to train or evaluate on")
    cats = {}
    for i, c in enumerate(data["categories"]):
        lacking = [f for f in CATEGORY_FIELDS if f not in c]
        if lacking:
            problems.append(f"categories[{i}] lacks {', '.join(lacking)}")
        else:
            cats[c["id"]] = c["name"]
    if not data["categories"]:
        problems.append("'categories' is empty")
    images = {}
    missing_files = []
    for i, im in enumerate(data["images"]):
        lacking = [f for f in IMAGE_FIELDS if f not in im]
        if lacking:
            problems.append(f"images[{i}] lacks {', '.join(lacking)}")
            continue
        images[im["id"]] = im
        if not (image_root / im["file_name"]).is_file():
            missing_files.append(im["file_name"])
    if missing_files:
        problems.append(f"{len(missing_files)} image files not found under {image_root} "
                        f"(e.g. {', '.join(missing_files[:3])})")
    else:
        listed = list(images.values())
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            found = pool.map(lambda im: _image_problem(image_root / im["file_name"], im), listed)
            bad_images = [msg for msg in found if msg]
        if bad_images:
            problems.append(f"{len(bad_images)} unusable images: " + "; ".join(bad_images[:5]))
    for i, a in enumerate(data["annotations"]):
        lacking = [f for f in ANNOTATION_FIELDS if f not in a]
        if lacking:
            problems.append(f"annotations[{i}] lacks {', '.join(lacking)}")
            continue
        if a["image_id"] not in images:
            problems.append(f"annotations[{i}] refers to image_id {a['image_id']}, which is not in 'images'")
        if a["category_id"] not in cats:
            problems.append(f"annotations[{i}] has category_id {a['category_id']}, which is not in 'categories'")
        box = a["bbox"]
        box_ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not box_ok:
            problems.append(f"annotations[{i}].bbox must be [x, y, width, height], got {box!r}")
        elif box[2] < 0 or box[3] < 0:
            problems.append(f"annotations[{i}].bbox has a negative width or height: {box!r}")
        seg = a.get("segmentation")
        seg_ok = seg is None or _valid_segmentation(seg)
        if not seg_ok:
            problems.append(f"annotations[{i}].segmentation must be polygons [[x1, y1, x2, y2, x3, y3, ...], ...] "
                            "or an RLE dict with 'counts' and 'size'")
        im = images.get(a["image_id"])
        if im is not None and box_ok:
            xs = [box[0], box[0] + box[2]]
            ys = [box[1], box[1] + box[3]]
            if seg_ok and isinstance(seg, list):
                xs += [v for poly in seg for v in poly[0::2]]
                ys += [v for poly in seg for v in poly[1::2]]
            if _outside(xs, im["width"]) or _outside(ys, im["height"]):
                problems.append(
                    f"annotations[{i}] (id {a['id']}) has a box or polygon outside its image "
                    f"{im['file_name']} ({im['width']}x{im['height']}): x in [{min(xs):g}, {max(xs):g}], "
                    f"y in [{min(ys):g}, {max(ys):g}]; COCO coordinates are absolute pixels")
    if problems:
        raise DatasetError(_problems_text(json_file, problems))
    return {"images": len(images), "annotations": len(data["annotations"]),
            "thing_classes": [cats[k] for k in sorted(cats)]}


def _outside(values: list[float], side: float) -> bool:
    tol = 1 + OUT_OF_BOUNDS_TOLERANCE * side
    return min(values) < -tol or max(values) > side + tol


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """Read an image file's header; return (width, height) as Detectron2 will see it (after the
    EXIF orientation that ``detection_utils.read_image`` applies).

    Raises:
        DatasetError: naming the file: missing, empty (0 bytes), not an image PIL can read, 16 or
            32 bits per channel (``HIGH_DEPTH_MODES``), or more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb, or simply too big to train on;
            raise that limit if you mean it).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the image file is empty (0 bytes)")
    try:
        with Image.open(path) as im:  # the header only
            mode, size = im.mode, im.size
            # EXIF orientation 5-8: Detectron2 rotates the image upright. Only JPEG keeps EXIF in the
            # header; PNG may keep it after the pixel data, and reading it would decode the image.
            if im.format == "JPEG" and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                size = (size[1], size[0])
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: refused, too many pixels ({exc}); raise PIL.Image.MAX_IMAGE_PIXELS "
                           "if the image is meant to be this big") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from None
    if mode in HIGH_DEPTH_MODES:
        raise DatasetError(f"{path}: a {mode} image (16/32 bits per channel); Detectron2 reads images as 8-bit "
                           "RGB and would clip it: convert it to 8-bit")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise DatasetError(f"{path}: refused, {size[0]}x{size[1]} pixels is more than PIL.Image.MAX_IMAGE_PIXELS "
                           f"({limit}); raise that limit if the image is meant to be this big")
    return size


def _image_problem(path: Path, entry: dict[str, Any]) -> str | None:
    try:
        w, h = check_image(path)
    except DatasetError as exc:
        return str(exc)
    if (w, h) != (entry["width"], entry["height"]):
        return (f"{path}: is {w}x{h} but the json says {entry['width']}x{entry['height']} "
                "(width x height)")
    return None


def _valid_segmentation(seg: Any) -> bool:
    if isinstance(seg, dict):
        return "counts" in seg and "size" in seg
    return isinstance(seg, list) and all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(isinstance(v, (int, float)) for v in p)
        for p in seg)


def register_coco_dataset(name: str, json_file: str | os.PathLike, image_root: str | os.PathLike) -> dict[str, Any]:
    """Validate a COCO-format dataset and register it in Detectron2's catalogs under ``name``.

    After this, ``name`` works wherever Detectron2 takes a dataset name (config
    ``dataloader.train.dataset.names`` / ``DATASETS.TRAIN``, ``COCOEvaluator``), and its metadata
    carries ``thing_classes`` (for drawing). Registering the same name again with the same files
    is a no-op; with other files it is an error.

    Returns:
        the summary of ``validate_coco_json``.
    """
    summary = validate_coco_json(json_file, image_root)
    json_file, image_root = str(Path(json_file).resolve()), str(Path(image_root).resolve())
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
            return summary
        raise DatasetError(f"dataset name {name!r} is already registered with {meta.get('json_file')} and "
                           f"{meta.get('image_root')}; pick another name")
    register_coco_instances(name, {"thing_classes": summary["thing_classes"]}, json_file, image_root)
    return summary


class NamingMapper:
    """A dataset mapper whose errors name the image they happened on.

    Detectron2's ``DatasetMapper`` decodes each image in training; a file whose pixel data is cut
    (its header passed ``check_image``) fails there with Pillow's ``image file is truncated``, which
    names no file. ``detection.engine`` wraps the LazyConfig loaders' mappers in this.

    Args:
        mapper: the mapper to call (``DatasetMapper`` or any callable on a dataset dict).
    """

    def __init__(self, mapper: Any):
        self.mapper = mapper

    def __call__(self, dataset_dict: dict[str, Any]) -> Any:
        try:
            return self.mapper(dataset_dict)
        except (OSError, SyntaxError, ValueError) as exc:
            raise DatasetError(f"{dataset_dict.get('file_name', '?')}: {exc} (while loading this image and its "
                               "annotations)") from exc


def _names(names: str | Iterable[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def check_dataset(names: str | Iterable[str]) -> None:
    """Before training or evaluation: each name is registered and its files exist.

    Raises:
        DatasetError: an unknown name (with how to register one), or a registered name whose json
            or image folder is missing (with the path, and ``DETECTRON2_DATASETS`` for builtins).
    """
    for name in _names(names):
        if name not in DatasetCatalog.list():
            known = sorted(n for n in DatasetCatalog.list() if n.startswith("coco_2017"))
            raise DatasetError(
                f"dataset {name!r} is not registered: register a COCO-format json and image folder with "
                f"--register-coco {name} JSON IMAGE_DIR (or detection.register_coco_dataset), or use a "
                f"Detectron2 builtin name ({', '.join(known)}, ...)")
        meta = MetadataCatalog.get(name)
        json_file, image_root = meta.get("json_file"), meta.get("image_root")
        where = os.environ.get("DETECTRON2_DATASETS")
        hint = (f"; Detectron2 looks for its builtin datasets under $DETECTRON2_DATASETS "
                f"({'now ' + repr(where) if where else 'unset, so ./datasets'}), e.g. coco/annotations/"
                "instances_train2017.json and coco/train2017/")
        if json_file and not Path(json_file).is_file():
            raise DatasetError(f"dataset {name!r}: annotation file {json_file} not found "
                               f"(expected a COCO instances .json){hint}")
        if image_root and not Path(image_root).is_dir():
            raise DatasetError(f"dataset {name!r}: image folder {image_root} not found{hint}")


def dataset_num_classes(name: str) -> int | None:
    """Number of thing classes in a registered dataset's metadata (None when unknown)."""
    classes = MetadataCatalog.get(name).get("thing_classes")
    return len(classes) if classes is not None else None


def has_fast_coco_eval() -> bool:
    """Whether Detectron2's compiled ops (and so its fast COCOeval) are installed."""
    try:
        from detectron2 import _C  # noqa: F401
    except ImportError:
        return False
    try:
        from detectron2.evaluation.fast_eval_api import COCOeval_opt  # noqa: F401
    except ImportError:
        return False
    return True


# COCO's area ranges of APs / APm / APl (pixels^2 of the annotation's area)
AREA_RANGES = {"APs": (0.0, 32.0 ** 2), "APm": (32.0 ** 2, 96.0 ** 2), "APl": (96.0 ** 2, float("inf"))}
NO_DETECTIONS = "no detections above the model's test score threshold"
NO_OBJECTS = "the evaluation set has no annotated objects"


class CompleteCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` whose result has every task the model predicts, also when it detected nothing.

    Detectron2's evaluator returns only a ``bbox`` entry of NaNs when a model made no detection
    (no ``segm`` at all, although the model has a mask head). Here each task of
    ``expected_tasks`` (set by the caller from the model; default: those evaluated) is present:
    with no detection its AP is what COCO's definition gives, 0 for every category and area range
    that has ground truth (recall 0 at every threshold) and NaN where nothing is annotated.
    ``notes`` says, per task, why a number is 0 or NaN; it is logged as a warning.
    """

    expected_tasks: tuple[str, ...] | None = None

    def reset(self) -> None:
        super().reset()
        self.notes: dict[str, str] = {}

    def evaluate(self, img_ids: Any = None) -> dict[str, Any]:
        local = sum(len(p.get("instances", ())) for p in self._predictions)
        detections = sum(comm.gather(local, dst=0)) if self._distributed else local
        results = super().evaluate(img_ids)
        if self._distributed and not comm.is_main_process():
            return results
        results = dict(results or {})
        self.notes = {}
        expected = tuple(self.expected_tasks or ()) or tuple(results) or ("bbox",)
        for task in expected:
            if detections == 0:
                results[task] = self._no_detection_result(img_ids)
                self.notes[task] = NO_OBJECTS if not self._annotations(img_ids) else NO_DETECTIONS
            elif task not in results:
                results[task] = {"AP": float("nan")}
                self.notes[task] = "the predictions have no output for this task (e.g. no masks)"
            elif not np.isfinite(results[task].get("AP", float("nan"))):
                self.notes[task] = NO_OBJECTS if not self._annotations(img_ids) else "COCO evaluation gave no AP"
        for task, note in self.notes.items():
            self._logger.warning("%s: %s (AP %s)", task, note, results[task].get("AP"))
        return results

    def _annotations(self, img_ids: Any) -> list[dict[str, Any]]:
        """The ground-truth annotations evaluated (crowd regions are not objects to find)."""
        api = self._coco_api
        ids = api.getAnnIds(imgIds=list(img_ids) if img_ids is not None else [], iscrowd=False)
        return api.loadAnns(ids)

    def _no_detection_result(self, img_ids: Any) -> dict[str, float]:
        """COCO's metrics of an empty prediction set: 0 where there is ground truth, NaN elsewhere."""
        anns = self._annotations(img_ids)
        nan = float("nan")
        found = {m: 0.0 if anns else nan for m in ("AP", "AP50", "AP75")}
        for metric, (lo, hi) in AREA_RANGES.items():
            found[metric] = 0.0 if any(lo <= a.get("area", 0.0) < hi for a in anns) else nan
        names = self._metadata.get("thing_classes")
        id_map = self._metadata.get("thing_dataset_id_to_contiguous_id")
        if names and len(names) > 1 and id_map:
            present = {id_map.get(a["category_id"]) for a in anns}
            found.update({f"AP-{name}": 0.0 if k in present else nan for k, name in enumerate(names)})
        return found


def build_coco_evaluator(dataset_name: str | Iterable[str], output_dir: str | None = None,
                         use_fast_impl: bool | None = None, **kwargs: Any) -> CompleteCOCOEvaluator:
    """``CompleteCOCOEvaluator`` (box and mask AP through pycocotools), without Detectron2's C++ ops too.

    Args:
        dataset_name: a registered dataset (a one-element list is accepted, as configs often hold).
        output_dir: where predictions and results are written (None: not written).
        use_fast_impl: None picks Detectron2's fast COCOeval only when its ops are installed.
    """
    names = _names(dataset_name)
    if len(names) != 1:
        raise ValueError(f"COCO evaluation takes one dataset at a time, got {names}")
    fast = has_fast_coco_eval() if use_fast_impl is None else use_fast_impl
    return CompleteCOCOEvaluator(names[0], output_dir=output_dir, use_fast_impl=fast, **kwargs)
