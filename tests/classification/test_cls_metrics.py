"""Top-1 / top-5 on toy cases whose answers are worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from classification import AccuracyMeter, evaluate, topk_correct
from training.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

# 6 classes; target rank (1 = best) of each sample: 1, 2, 5, 6, 1, 3
LOGITS = torch.tensor([
    [9.0, 1, 2, 3, 4, 5],   # target 0: rank 1
    [1.0, 8, 9, 3, 4, 5],   # target 1: rank 2
    [6.0, 5, 1, 9, 8, 7],   # target 1: rank 5 (9 8 7 6 5 1)
    [6.0, 5, 4, 9, 8, 7],   # target 2: rank 6
    [0.0, 0, 0, 0, 0, 3],   # target 5: rank 1
    [1.0, 2, 3, 9, 8, 0],   # target 2: rank 3
])
TARGETS = torch.tensor([0, 1, 1, 2, 5, 2])


def test_topk_counts_by_hand():
    assert topk_correct(LOGITS, TARGETS, (1, 2, 3, 5, 6)) == [2, 3, 4, 5, 6]


def test_top5_is_clipped_to_the_number_of_classes():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    assert topk_correct(logits, torch.tensor([0, 0]), (1, 5)) == [1, 2]


def test_topk_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="expected logits"):
        topk_correct(LOGITS, TARGETS[:3])


def test_meter_sums_exactly_over_batches_and_round_trips_for_all_reduce():
    meter = AccuracyMeter(6)
    meter.update(LOGITS[:4], TARGETS[:4], loss=2.0)
    meter.update(LOGITS[4:], TARGETS[4:], loss=5.0)
    res = meter.result()
    assert res["images"] == 6
    assert res["top1"] == pytest.approx(100 * 2 / 6) and res["top5"] == pytest.approx(100 * 5 / 6)
    assert res["loss"] == pytest.approx((2.0 * 4 + 5.0 * 2) / 6)
    # per class: class 0 1/1, class 1 0/2, class 2 0/2, class 5 1/1 -> mean 50 %
    assert res["mean_class_acc"] == pytest.approx(50.0)
    assert AccuracyMeter.from_list(meter.as_list()).result() == res


def test_evaluate_over_a_loader():
    """``evaluate`` with a model that returns its input: the logits above, in two batches."""
    loader = [dict(images=LOGITS[:4], targets=TARGETS[:4], failures=[]),
              dict(images=LOGITS[4:], targets=TARGETS[4:], failures=["x.png: broken"])]
    res = evaluate(torch.nn.Identity(), loader, num_classes=6, info=CPU)
    assert res["top1"] == pytest.approx(100 * 2 / 6) and res["top5"] == pytest.approx(100 * 5 / 6)
    assert res["images"] == 6 and res["skipped_images"] == 1
    ce = -torch.log_softmax(LOGITS, 1)[torch.arange(6), TARGETS]
    assert res["loss"] == pytest.approx(float(ce.mean()), rel=1e-6)
    assert math.isfinite(res["loss"])
