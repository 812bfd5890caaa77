"""Large-scale jitter that runs without shapely.

Detectron2's ``FixedSizeCrop`` crops polygon masks with fvcore's ``CropTransform``, which imports
``shapely`` (an optional Detectron2 dependency our set-up does not install) for every image.
``FixedSizeCrop`` here is Detectron2's, with the crop's polygons clipped to the crop window in
numpy (Sutherland-Hodgman against the rectangle). A concave polygon that the window cuts in two
stays one polygon joined along the window edge by a zero-area seam, which rasterizes to the same
mask up to edge pixels; everything else (images, boxes, RLE masks, padding) is Detectron2's code,
including its ``pad`` argument (default ``True``; ViTDet's LSJ uses ``pad=False``: an image smaller
than the crop stays as it is, and the model pads the batch with zeros after normalization).
"""
from __future__ import annotations

import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import CropTransform, TransformList


def clip_polygon(poly: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Clip a polygon to the rectangle ``[x0, x1] x [y0, y1]``.

    Args:
        poly: [N, 2] vertices (x, y), in order.
    Returns:
        [M, 2] vertices of the clipped polygon (M = 0 when nothing is inside).
    """
    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    for axis, bound, keep_above in ((0, x0, True), (0, x1, False), (1, y0, True), (1, y1, False)):
        if len(pts) == 0:
            break
        inside = pts[:, axis] >= bound if keep_above else pts[:, axis] <= bound
        out = []
        for i in range(len(pts)):
            cur, prev = pts[i], pts[i - 1]
            if inside[i] != inside[i - 1]:  # the edge prev -> cur crosses the bound
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append(prev + t * (cur - prev))
            if inside[i]:
                out.append(cur)
        pts = np.asarray(out, dtype=np.float64).reshape(-1, 2)
    return pts


def _area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


class ClippingCropTransform(CropTransform):
    """fvcore's ``CropTransform`` with ``apply_polygons`` done by ``clip_polygon`` (no shapely)."""

    def apply_polygons(self, polygons: list[np.ndarray]) -> list[np.ndarray]:
        """[N, 2] polygons in image coordinates -> the non-empty parts in crop coordinates."""
        out = []
        for poly in polygons:
            clipped = clip_polygon(poly, self.x0, self.y0, self.x0 + self.w, self.y0 + self.h)
            if len(clipped) >= 3 and _area(clipped) > 0:
                out.append(self.apply_coords(clipped))
        return out


class FixedSizeCrop(T.FixedSizeCrop):
    """Detectron2's ``FixedSizeCrop`` (random crop to ``crop_size``, then pad to it unless
    ``pad=False``), shapely-free. Arguments as Detectron2's: ``crop_size``, ``pad``, ``pad_value``."""

    def get_transform(self, image: np.ndarray) -> TransformList:
        transforms = []
        for t in super().get_transform(image).transforms:
            if type(t) is CropTransform:
                t = ClippingCropTransform(t.x0, t.y0, t.w, t.h, t.orig_w, t.orig_h)
            transforms.append(t)
        return TransformList(transforms)
