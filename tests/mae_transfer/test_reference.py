"""Published numbers appear only beside runs of the recipe that produced them (issue 14, item 8).

The bench puts every backbone, random init included, through the published transfer recipes
(MAE fine-tuning, ViTDet, ...). The from-scratch numbers were trained otherwise (MAE Table 11:
300 epochs, wd 0.3, EMA, no layer decay; ViTDet's random init with a longer schedule), so a
``random`` row gets none.
"""
from __future__ import annotations

import pytest

from mae_transfer.bench import Cell, parse_backbone, summarize
from mae_transfer.runners import Arch, Backbone, Recipe
from mae_transfer.reference import RECIPES, REFERENCE, TASK_RECIPES, lookup

VIT_B = Arch.make("vit_base_patch16")


def test_random_init_with_the_mae_recipe_gets_no_published_number():
    random = parse_backbone("random")
    assert random.method == "scratch"
    mae = Backbone("mae_b", None, method="mae")
    cells = [Cell(b.name, task, 0, {}) for b in (random, mae) for task in ("finetune", "detect")]
    rows = summarize(cells, [random, mae], ["finetune", "detect"], VIT_B, Recipe.paper(VIT_B))
    got = {(r.backbone, r.metric): r.reference for r in rows}
    assert got[("random", "top-1")] is None and got[("random", "AP box")] is None
    assert got[("mae_b", "top-1")] == 83.6 and got[("mae_b", "AP box")] == 51.6


@pytest.mark.parametrize("task,metric,method", [
    ("finetune", "top-1", "scratch"),     # MAE Table 11 recipe
    ("detect", "AP box", "scratch"),      # ViTDet random init, longer schedule
    ("finetune", "top-1", "supervised"),  # DeiT's own 300-epoch training
    ("finetune", "top-1", "mocov3"),      # MoCo v3's own fine-tuning
    ("detect", "AP box", "supervised"),   # ViTDet's pre-training ablation setting
])
def test_numbers_of_other_recipes_are_kept_but_not_shown_beside_the_transfer_recipe(task, metric, method):
    ref = REFERENCE[(task, metric, method, "B")]
    assert ref.recipe != TASK_RECIPES[task]
    assert lookup(task, metric, method, "B") is None
    assert lookup(task, metric, method, "B", recipe=ref.recipe) is ref  # a run of that recipe would see it


def test_every_number_names_a_known_recipe_and_source():
    assert set(TASK_RECIPES.values()) <= set(RECIPES)
    for key, ref in REFERENCE.items():
        assert ref.recipe in RECIPES and ref.source, key
    assert lookup("finetune", "top-1", "scratch", "B", recipe="mae-scratch").value == 82.3
    assert lookup("linprobe", "top-1", "mae", "L").value == 75.8
    assert lookup("segment", "mIoU", "mocov3", "B").value == 47.3  # MAE Table 5 ran every row with one recipe
