"""``PerClassIoUMetric``: MMSeg's ``IoUMetric`` that also keeps the per-class numbers it logs."""
from __future__ import annotations

from typing import Any

from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS


@METRICS.register_module()
class PerClassIoUMetric(IoUMetric):
    """``IoUMetric`` (aAcc, mIoU, mAcc, ...) plus ``per_class``: ``{class: {"IoU": %, "Acc": %}}``.

    MMSeg prints the per-class table to the log only; this keeps it (on the main process, after
    ``evaluate()``) so that ``mae-transfer segment test`` can print and return it.
    """

    per_class: dict[str, dict[str, float]]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.per_class = {}

    def total_area_to_metrics(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Called by ``IoUMetric.compute_metrics`` on the summed areas; records the class rows."""
        ret = IoUMetric.total_area_to_metrics(*args, **kwargs)
        classes = self.dataset_meta["classes"]
        self.per_class = {
            name: {key: float(values[i]) * 100 for key, values in ret.items() if key != "aAcc"}
            for i, name in enumerate(classes)
        }
        return ret
