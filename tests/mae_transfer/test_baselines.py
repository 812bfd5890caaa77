"""``pretrain_backbone`` (MAE / MoCo v3 / supervised with one budget) and ``mae-transfer pretrain --method``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from classification.models import build_classifier
from mae_backbone import create_vit
from mae_backbone.checkpoint import load_checkpoint, read_checkpoint
from mae_transfer.baselines import SUPERVISED_RECIPE, pretrain_backbone
from mae_transfer.cli import main
from pretrain import PretrainConfig, make_config, train

ENCODER_KWARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8}


def write_images(folder, count: int, seed: int = 0) -> None:
    """``count`` 36 x 40 PNGs over two class folders: dark ones in class0, bright ones in class1."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"class{i % 2}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.uniform(0, 0.5, (36, 40, 3)) + 0.5 * (i % 2)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)


@pytest.fixture
def dataset(tmp_path):
    """An ImageNet-style root: train/ (16 images) and val/ (8), two classes."""
    write_images(tmp_path / "data" / "train", 16)
    write_images(tmp_path / "data" / "val", 8, seed=1)
    return tmp_path / "data"


def strict_encoder(path):
    """The encoder file loaded into the ViT its metadata names, with nothing missing or left over."""
    sd, meta = read_checkpoint(path)
    vit = create_vit(meta["arch"], img_size=meta["img_size"], **{k: v for k, v in meta["arch_overrides"].items()
                                                                 if k != "img_size"})
    report = load_checkpoint(vit, path)
    assert not report.missing and not report.unexpected and not report.resampled
    return sd, meta


def test_supervised_baseline_exports_the_trained_backbone_without_its_head(dataset, tmp_path):
    logs = []
    path = pretrain_backbone("supervised", dataset, tmp_path / "sup", encoder_kwargs=ENCODER_KWARGS, img_size=32,
                             epochs=2, batch_size=4, seed=3, log=logs.append, options={"lr": 5e-3})
    sd, meta = strict_encoder(path)
    assert meta["method"] == "supervised" and meta["epochs"] == 2 and meta["img_size"] == [32, 32]
    assert "norm.weight" in sd and not any(k.startswith(("head", "fc_norm")) for k in sd)
    assert len(logs) == 2 and "supervised" in logs[0] and str(path) in logs[1]
    # the classifier it trained started from the classification trainer's random init (seed 3)
    torch.manual_seed(3)
    init = build_classifier("vit_tiny_patch16", 2, "finetune", global_pool=False, img_size=32,
                            drop_path=SUPERVISED_RECIPE["drop_path"], model_kwargs=ENCODER_KWARGS).state_dict()
    assert torch.allclose(sd["patch_embed.proj.bias"], init["patch_embed.proj.bias"], atol=0.05)  # same init
    assert (sd["blocks.1.mlp.fc2.weight"] - init["blocks.1.mlp.fc2.weight"]).abs().max() > 5e-3  # trained
    # it learned from the labels of train/ and was evaluated on val/ (8 images)
    metrics = (tmp_path / "sup" / "metrics.json").read_text()
    assert '"num_classes": 2' in metrics


def test_mae_through_the_same_call_records_the_method_and_budget(dataset, tmp_path):
    path = pretrain_backbone("mae", dataset, tmp_path / "mae", encoder_kwargs=ENCODER_KWARGS, img_size=32, epochs=1,
                             batch_size=4, log=lambda line: None,
                             options={"decoder_depth": 1, "decoder_dim": 32, "decoder_heads": 2})
    sd, meta = strict_encoder(path)
    assert (meta["method"], meta["epochs"], meta["mask_ratio"]) == ("mae", 1, 0.75)
    config = make_config(config_file=tmp_path / "mae" / "config.json")
    assert (config.data, config.batch_size, config.seed) == (str(dataset / "train"), 4, 0)  # train/ only


@pytest.mark.parametrize("method,kwargs,message", [
    ("byol", {}, "unknown method 'byol'"),
    ("mae", {"encoder": "vit_tiny"}, "unknown encoder 'vit_tiny'"),
    ("mocov3", {"options": {"epochs": 3}}, "epochs are pretrain_backbone's own arguments"),
    ("mocov3", {"options": {"moco_temprature": 0.1}}, "did you mean 'moco_temperature'"),
    ("mocov3", {"options": {"mask_ratio": 0.5}}, "mask_ratio: not an option of --method mocov3"),
])
def test_pretrain_backbone_refuses_what_it_cannot_do(tmp_path, method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pretrain_backbone(method, tmp_path, tmp_path / "out", epochs=1, batch_size=2, log=lambda line: None, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_method_mocov3_trains_and_options_of_another_method_are_errors(dataset, tmp_path, capsys):
    out = tmp_path / "moco"
    argv = ["pretrain", "--method", "mocov3", "--data", str(dataset / "train"), "--output", str(out),
            "--model", "mae_vit_tiny_patch16", "--model-kwargs", '{"depth": 2, "embed_dim": 32, "num_heads": 2, '
            '"patch_size": 8}', "--img-size", "32", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
            "--moco-proj-hidden", "32", "--moco-pred-hidden", "32", "--moco-dim", "8", "--moco-temperature", "0.5",
            "--num-workers", "0", "--no-progress", "--no-tensorboard"]
    assert main(argv) == 0
    assert "pretrained (mocov3) 1 epochs" in capsys.readouterr().out
    _, meta = strict_encoder(out / "encoder.safetensors")
    assert (meta["method"], meta["moco_temperature"], meta["moco_dim"]) == ("mocov3", 0.5, 8)
    saved = make_config(config_file=out / "config.json")
    assert (saved.method, saved.weight_decay, saved.moco_momentum) == ("mocov3", 0.1, 0.99)

    assert main(argv + ["--mask-ratio", "0.5"]) == 2
    assert "mask_ratio: not an option of --method mocov3" in capsys.readouterr().err
    assert main(["pretrain", "--data", "d", "--output", "o", "--moco-temperature", "0.1"]) == 2
    assert "moco_temperature: not an option of --method mae" in capsys.readouterr().err


def test_supervised_is_refused_by_the_pretraining_trainer_and_named_where_it_runs(dataset, tmp_path):
    cfg = make_config({"data": str(dataset), "output": str(tmp_path / "o"), "method": "supervised"})
    with pytest.raises(ValueError, match="mae_transfer.baselines.train_baseline"):
        train(cfg)
    assert not (tmp_path / "o").exists()


def test_default_method_is_mae_with_its_recipe():
    cfg = make_config({"data": "d", "output": "o"})
    assert (cfg.method, cfg.weight_decay, cfg.blr) == ("mae", 0.05, 1.5e-4)
    assert make_config({"data": "d", "output": "o", "method": "supervised"}).blr == 2.5e-4  # DeiT: 5e-4 per 512
    assert make_config({"data": "d", "output": "o", "method": "mocov3", "weight_decay": 0.2}).weight_decay == 0.2
    assert PretrainConfig().moco_temperature == 0.2
