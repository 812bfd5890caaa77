"""The finetune / linprobe commands, the recipe defaults, config files, and --eval of foreign checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from classification import make_config, recipe_defaults
from classification.config import ClassifyConfig
from mae_transfer.cli import main


def test_both_commands_are_listed_and_linprobe_has_no_fine_tuning_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "finetune" in out and "linprobe" in out
    with pytest.raises(SystemExit) as exit_:
        main(["linprobe", "--data", "d", "--output", "o", "--mixup", "0.5"])
    assert exit_.value.code == 2 and "unrecognized arguments: --mixup" in capsys.readouterr().err


@pytest.mark.parametrize("arch, epochs, blr, layer_decay, drop_path", [
    ("vit_base_patch16", 100, 5e-4, 0.65, 0.1),
    ("vit_large_patch16", 50, 1e-3, 0.75, 0.2),
    ("vit_huge_patch14", 50, 1e-3, 0.75, 0.3),
    ("vit_small_patch16", 100, 5e-4, 0.65, 0.1),
])
def test_fine_tuning_recipe_follows_the_paper_per_architecture(arch, epochs, blr, layer_decay, drop_path):
    cfg = make_config("finetune", {"data": "d", "output": "o"}).resolve(arch)
    assert (cfg.epochs, cfg.blr, cfg.layer_decay, cfg.drop_path) == (epochs, blr, layer_decay, drop_path)
    assert (cfg.weight_decay, cfg.warmup_epochs, cfg.min_lr, cfg.pool, cfg.img_size, cfg.batch_size) == \
        (0.05, 5, 1e-6, "avg", 224, 64)
    assert make_config("finetune", {"data": "d", "output": "o", "drop_path": 0.0}).resolve(arch).drop_path == 0.0
    assert (cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.reprob, cfg.aa) == (0.8, 1.0, 0.1, 0.25, "rand-m9-mstd0.5-inc1")
    assert cfg.model == arch and cfg.global_pool


def test_linear_probe_recipe_follows_the_paper():
    cfg = make_config("linprobe", {"data": "d", "output": "o"}).resolve("vit_large_patch16")
    assert (cfg.epochs, cfg.warmup_epochs, cfg.blr, cfg.weight_decay, cfg.pool) == (90, 10, 0.1, 0.0, "cls")
    assert cfg.tune() == "head" and not cfg.global_pool
    assert recipe_defaults("linprobe", None)["layer_decay"] == 1.0


def test_config_files_round_trip_and_unknown_or_foreign_keys_are_errors(tmp_path):
    cfg = make_config("finetune", {"data": "d", "output": "o", "tune_blocks": "mlp", "blr": 1e-3}).resolve("vit_base_patch16")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert make_config("finetune", config_file=path) == cfg
    assert make_config("finetune", {"epochs": 3}, config_file=path).epochs == 3  # flags win over the file
    path.write_text(json.dumps({"data": "d", "output": "o", "layer_decy": 0.7}))
    with pytest.raises(ValueError, match="unknown option 'layer_decy'; did you mean 'layer_decay'"):
        make_config("finetune", config_file=path)
    path.write_text(json.dumps({"data": "d", "output": "o", "mixup": 0.5}))
    with pytest.raises(ValueError, match="'mixup' is a fine-tuning option; a linear probe does not use it"):
        make_config("linprobe", config_file=path)


@pytest.mark.parametrize("value, parsed", [("all", "all"), ("0", 0), ("4", 4), ("mlp", "mlp"), ("0.5", "mlp")])
def test_tune_blocks_values(value, parsed):
    assert ClassifyConfig(data="d", output="o", tune_blocks=value).validate().tune() == parsed


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="tune_blocks"):
        make_config("finetune", {"data": "d", "output": "o", "tune_blocks": "half"})
    with pytest.raises(ValueError, match="layer_decay must be in"):
        make_config("finetune", {"data": "d", "output": "o", "layer_decay": 1.5})
    with pytest.raises(ValueError, match="eval: give the model"):
        make_config("finetune", {"data": "d", "eval": True})


def test_cli_reports_an_architecture_mismatch_without_a_traceback(dataset, encoder_checkpoint, tmp_path, capsys):
    rc = main(["finetune", "--data", str(dataset), "--output", str(tmp_path / "o"), "--checkpoint",
               str(encoder_checkpoint), "--model", "vit_small_patch16", "--img-size", "32", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "mae-transfer finetune: error:" in err and "expected vit_small_patch16 (embed_dim 384" in err


def test_eval_of_an_official_mae_fine_tuned_checkpoint(dataset, tmp_path):
    """A foreign classifier ({"model": sd}, global pooling, 4-class head) evaluates without metadata;
    a head of the wrong size is an error naming both numbers."""
    from classification import evaluate_checkpoint
    from mae_backbone import create_vit
    from mae_backbone.checkpoint import write_checkpoint

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16", img_size=32, depth=2, global_pool=True, num_classes=4)
    path = tmp_path / "mae_finetuned_vit_tiny.pth"
    write_checkpoint(vit.state_dict(), path, format="mae")
    opts = dict(eval=True, data=str(dataset), checkpoint=str(path), img_size=32, num_workers=0, progress=False,
                model="vit_tiny_patch16", model_kwargs={"depth": 2}, output=str(tmp_path / "ev"))
    metrics = evaluate_checkpoint(make_config("finetune", opts))
    assert metrics["images"] == 24 and "avg pooling" in metrics["model"]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["top1"] == metrics["top1"]
    vit3 = create_vit("vit_tiny_patch16", img_size=32, depth=2, num_classes=3)
    write_checkpoint(vit3.state_dict(), path, format="mae")
    from training import DataError

    with pytest.raises(DataError, match="4 classes, but .* has a 3-class head"):
        evaluate_checkpoint(make_config("finetune", opts))
    write_checkpoint(create_vit("vit_tiny_patch16", img_size=32, depth=2).state_dict(), path, format="mae")
    from mae_backbone import CheckpointError

    with pytest.raises(CheckpointError, match="no classification head"):
        evaluate_checkpoint(make_config("finetune", opts))
