"""Datasets in the ADE20K (``ADEChallengeData2016``) layout, checked before any training step.

Layout::

    DATA_ROOT/images/training/*.jpg        DATA_ROOT/annotations/training/*.png
    DATA_ROOT/images/validation/*.jpg      DATA_ROOT/annotations/validation/*.png

- ``CheckedADE20KDataset``: MMSeg's ``ADE20KDataset`` (150 classes, raw 0 = "other" = ignored).
- ``ADELayoutDataset``: the same layout with your own classes,
  ``metainfo=dict(classes=(...), palette=[...])``.

Both check, when the dataset is built (so in training, testing, every process of a distributed
run, and any script of a user's own), that the image and annotation folders exist, that every
image has its label map, and that every label map's values lie in the class range: with
``reduce_zero_label`` (ADE20K) raw 0 = ignore, raw 1..K -> classes 0..K-1, raw 255 = ignore;
without it 0..K-1 and 255.  A violation raises ``DatasetError`` naming the files and values.
Every image's header is read too (``check_images``): an empty, unreadable or over-sized
(``PIL.Image.MAX_IMAGE_PIXELS``, a decompression bomb) image, or one whose size differs from its
label map's, raises ``DatasetError`` naming it.  Grayscale, CMYK and 16-bit images are fine: MMSeg
reads images with OpenCV as 8-bit BGR (16-bit values scaled down, CMYK converted).
Doing this in the dataset rather than in the CLI is deliberate: the dataset is the one place that
knows the final folders, suffixes and label semantics (``reduce_zero_label``, ``label_map``).
"""
from __future__ import annotations

import os
import os.path as osp
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mmengine.logging import print_log
from mmseg.datasets import ADE20KDataset, BaseSegDataset
from mmseg.registry import DATASETS
from PIL import Image

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the folder or file and why."""


def label_values(path: str) -> np.ndarray:
    """The distinct values of a label map (read as MMSeg does: palette indices, unchanged).

    Raises:
        DatasetError: naming the file, when it is empty or not a readable image.
    """
    try:
        with Image.open(path) as im:
            if im.mode in ("L", "P"):
                hist = im.histogram()[:256]
                return np.flatnonzero(np.asarray(hist))
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: not a readable label map ({exc})") from None
    if arr.ndim != 2:
        raise DatasetError(f"{path}: a label map must have one channel, this one has shape {arr.shape} "
                           f"(mode {im.mode}); save class indices as an 8-bit grayscale or palette PNG")
    return np.unique(arr)


def allowed_raw_values(num_classes: int, reduce_zero_label: bool) -> tuple[int, int]:
    """(lowest, highest) valid raw class value; 255 (ignore) is always valid besides."""
    return (0, num_classes) if reduce_zero_label else (0, num_classes - 1)


def check_label_maps(
    paths: Sequence[str], num_classes: int, reduce_zero_label: bool, workers: int | None = None
) -> None:
    """Raise ``DatasetError`` naming every file (up to 10) with values outside the class range.

    Args:
        paths: label-map files.
        num_classes: K, the number of raw classes the files are written in.
        reduce_zero_label: raw 0 = ignore and 1..K = the classes (ADE20K); else 0..K-1.
        workers: reader threads (PNG decoding releases the GIL); default min(8, CPUs).
    """
    lo, hi = allowed_raw_values(num_classes, reduce_zero_label)

    def bad_values(path: str) -> tuple[str, list[int]] | None:
        values = label_values(path)
        bad = values[((values < lo) | (values > hi)) & (values != IGNORE_INDEX)]
        return (path, bad.tolist()) if bad.size else None

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = [r for r in pool.map(bad_values, paths) if r is not None]
    if found:
        rule = (f"0 (ignore), 1..{num_classes} (classes 0..{num_classes - 1}, reduce_zero_label) or 255 (ignore)"
                if reduce_zero_label else f"0..{num_classes - 1} (classes) or 255 (ignore)")
        listed = "; ".join(f"{p}: {v[:10]}" for p, v in found[:10])
        more = f"; ... ({len(found)} files in all)" if len(found) > 10 else ""
        raise DatasetError(f"{len(found)} of {len(paths)} label maps have values outside the class range "
                           f"(allowed: {rule}): {listed}{more}")


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from an image file's header.

    Raises:
        DatasetError: naming the file: empty, not an image, or more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (raise that limit if the image is meant to be this big).
    """
    if osp.getsize(path) == 0:
        raise DatasetError(f"{path}: the file is empty (0 bytes)")
    try:
        with Image.open(path) as im:  # the header only
            size = im.size
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: refused, too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        raise DatasetError(f"{path}: refused, {size[0]}x{size[1]} pixels is more than PIL.Image.MAX_IMAGE_PIXELS "
                           f"({limit}); raise that limit if the image is meant to be this big")
    return size


def check_images(pairs: Sequence[tuple[str, str | None]], workers: int | None = None) -> None:
    """Raise ``DatasetError`` naming up to 10 unusable (image, label map) pairs (see ``image_size``),
    including images whose size differs from their label map's."""

    def problem(pair: tuple[str, str | None]) -> str | None:
        img, seg = pair
        try:
            size = image_size(img)
            if seg is not None:
                seg_size = image_size(seg)
                if seg_size != size:
                    return f"{img} is {size[0]}x{size[1]} but its label map {seg} is {seg_size[0]}x{seg_size[1]}"
        except DatasetError as exc:
            return str(exc)
        return None

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = [r for r in pool.map(problem, pairs) if r is not None]
    if found:
        more = f"; ... ({len(found)} in all)" if len(found) > 10 else ""
        raise DatasetError(f"{len(found)} of {len(pairs)} images are unusable: {'; '.join(found[:10])}{more}")


def check_no_symlink_cycle(folder: str) -> None:
    """Raise ``DatasetError`` naming a symlink under ``folder`` that leads back to a folder above it.

    MMEngine lists dataset folders recursively following links: a cycle lists every image many
    times over, until the path is too long (``OSError: Too many levels of symbolic links``).
    """
    def walk(path: str, ancestors: set[tuple[int, int]]) -> None:
        try:
            entries = list(os.scandir(path))
        except OSError as exc:
            raise DatasetError(f"{path}: cannot be listed ({exc.strerror or exc})") from None
        for entry in entries:
            try:
                if not entry.is_dir():  # follows links; a link to itself is neither file nor folder
                    continue
                st = os.stat(entry.path)
            except OSError as exc:
                raise DatasetError(f"{entry.path}: {exc.strerror or exc}") from None
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                parts = Path(osp.relpath(entry.path, folder)).parts
                link = next((osp.join(folder, *parts[:i + 1]) for i in range(len(parts))
                             if osp.islink(osp.join(folder, *parts[:i + 1]))), entry.path)
                raise DatasetError(f"{link}: a symlink loop ({entry.path} leads back to {osp.realpath(entry.path)}, "
                                   "a folder above it); remove the link")
            walk(entry.path, ancestors | {key})

    if osp.isdir(folder):
        st = os.stat(folder)
        walk(folder, {(st.st_dev, st.st_ino)})


class _CheckedLayout:
    """Mixin for ``BaseSegDataset`` subclasses: check folders and label maps in ``load_data_list``."""

    def __init__(self, *args: Any, check_labels: bool = True, **kwargs: Any):
        self.check_labels = check_labels
        super().__init__(*args, **kwargs)

    def load_data_list(self) -> list[dict]:
        img_dir = self.data_prefix.get("img_path")
        ann_dir = self.data_prefix.get("seg_map_path")
        name = type(self).__name__
        for what, folder in (("image", img_dir), ("annotation", ann_dir)):
            if folder and not osp.isdir(folder):
                raise DatasetError(
                    f"{name}: the {what} folder {folder} does not exist (data_root={self.data_root!r}); "
                    "expected the ADEChallengeData2016 layout: images/{training,validation}/*.jpg and "
                    "annotations/{training,validation}/*.png")
        for folder in (img_dir, ann_dir):
            if folder:
                check_no_symlink_cycle(folder)
        try:
            data_list = super().load_data_list()
        except OSError as exc:
            raise DatasetError(f"{name}: cannot list {exc.filename or img_dir}: {exc.strerror or exc}") from None
        if not data_list:
            raise DatasetError(f"{name}: no '*{self.img_suffix}' images in {img_dir}")
        if ann_dir:
            seg_maps = [d["seg_map_path"] for d in data_list]
            absent = [p for p in seg_maps if not osp.isfile(p)]
            if absent:
                raise DatasetError(f"{name}: {len(absent)} of {len(seg_maps)} images have no label map in "
                                   f"{ann_dir}: {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
            if self.check_labels:
                start = time.perf_counter()
                check_label_maps(seg_maps, self._raw_num_classes(), self.reduce_zero_label)
                check_images([(d["img_path"], d["seg_map_path"]) for d in data_list])
                print_log(f"{name}: {len(seg_maps)} images and label maps in {ann_dir} checked in "
                          f"{time.perf_counter() - start:.1f} s", logger="current")
        return data_list

    def prepare_data(self, idx: int) -> Any:
        """MMSeg's pipeline on one sample; a failure to read or transform it (MMCV's
        ``AssertionError: failed to load image``, a ``TypeError`` deep in a transform) is a
        ``DatasetError`` naming the files."""
        try:
            return super().prepare_data(idx)
        except DatasetError:
            raise
        except (AssertionError, TypeError, ValueError, OSError, IndexError, Image.DecompressionBombError) as exc:
            info = self.get_data_info(idx)
            files = " / ".join(str(info[k]) for k in ("img_path", "seg_map_path") if info.get(k))
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise DatasetError(f"{files}: cannot be loaded ({type(exc).__name__}: {first}); "
                               "replace or remove the file") from exc

    def _raw_num_classes(self) -> int:
        """Classes the files are written in: the original ones when a ``label_map`` remaps them."""
        if self.label_map is not None and self.METAINFO.get("classes"):
            return len(self.METAINFO["classes"])
        return len(self._metainfo["classes"])


@DATASETS.register_module()
class CheckedADE20KDataset(_CheckedLayout, ADE20KDataset):
    """MMSeg's ``ADE20KDataset`` (``reduce_zero_label=True``) with the checks of this module.

    Args:
        check_labels: read every label map once and every image's header when the dataset is
            built (about 20k PNGs for ADE20K training: seconds to a minute, in parallel threads);
            False skips these, not the folder checks.
        **kwargs: as ``ADE20KDataset`` (``data_root``, ``data_prefix``, ``pipeline``, ...).
    """


@DATASETS.register_module()
class ADELayoutDataset(_CheckedLayout, BaseSegDataset):
    """Any dataset in the ADE20K folder layout, with its own classes.

    Args:
        metainfo: ``dict(classes=(...), palette=[[r, g, b], ...])``; ``classes`` is required.
        img_suffix, seg_map_suffix: ``.jpg`` / ``.png`` as in ADE20K.
        reduce_zero_label: True when raw 0 means "unlabelled" (ADE20K's convention).
        check_labels: see ``CheckedADE20KDataset``.
    """

    def __init__(self, metainfo: dict | None = None, img_suffix: str = ".jpg", seg_map_suffix: str = ".png",
                 reduce_zero_label: bool = True, **kwargs: Any):
        if not metainfo or not metainfo.get("classes"):
            raise DatasetError("ADELayoutDataset: give the class names, metainfo=dict(classes=(...))")
        super().__init__(metainfo=metainfo, img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, **kwargs)

