"""Runs: linear probe and partial fine-tuning change exactly what they should, a pretrained tiny
encoder fine-tunes well above chance, resume equals the uninterrupted run, bad input is explained."""
from __future__ import annotations

import json

import pytest
import torch

from classification import CHECKPOINT_NAME, MODEL_NAME, evaluate_checkpoint, make_config, train
from classification.state import load_training_state
from cls_helpers import TINY_VIT, tiny_run
from mae_backbone import CheckpointError
from mae_backbone.checkpoint import read_checkpoint
from training import DataError


def weights(path):
    return read_checkpoint(path)[0]


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if k in after and not torch.equal(before[k], after[k])}


def test_linear_probe_trains_the_head_alone(dataset, encoder_checkpoint, tmp_path):
    bad = dataset / "train" / "green_checks" / "corrupt.png"
    bad.write_bytes(b"\x89PNG truncated")
    cfg = make_config("linprobe", tiny_run(dataset, tmp_path / "lp", encoder_checkpoint, lr=0.5))
    assert (cfg.weight_decay, cfg.pool, cfg.blr) == (None, None, None)  # the recipe's, resolved by train
    result = train(cfg)
    assert result.config.weight_decay == 0.0 and result.config.pool == "cls" and result.config.blr == 0.1
    assert result.freeze.trainable == ["head.1.weight", "head.1.bias"]
    assert result.freeze.trained == 32 * 4 + 4
    pre = weights(encoder_checkpoint)
    state = load_training_state(tmp_path / "lp" / CHECKPOINT_NAME)
    post = state["model"]
    # every backbone tensor is bit-identical after two epochs of steps; the head learned
    backbone = [k for k in pre if not k.startswith("head.")]
    assert backbone and not changed({k: pre[k] for k in backbone}, post)
    assert set(post) - set(pre) == {"head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked",
                                    "head.1.weight", "head.1.bias"}
    assert int(post["head.0.num_batches_tracked"]) == 2 * 6  # BN statistics track every training step
    assert not any("head.0.weight" in k or "head.0.bias" in k for k in post)  # no affine
    # the unreadable image was skipped and counted, not fatal
    assert sum(r["skipped_images"] for r in result.history) == 2
    # the export is a plain ViT classifier (BN folded) that evaluates like the run's last epoch
    exported = weights(result.model)
    assert exported["head.weight"].shape == (4, 32)
    metrics = evaluate_checkpoint(make_config("linprobe", dict(eval=True, data=str(dataset),
                                                               checkpoint=str(result.model), num_workers=0,
                                                               progress=False)))
    assert metrics["top1"] == pytest.approx(result.history[-1]["val"]["top1"])
    assert metrics["images"] == 24


@pytest.mark.parametrize("tune, trained_prefixes", [
    ("1", ("blocks.1.", "fc_norm.", "head.")),
    ("mlp", ("blocks.1.norm2.", "blocks.1.mlp.", "fc_norm.", "head.")),
])
def test_partial_fine_tuning_trains_exactly_the_chosen_blocks(dataset, encoder_checkpoint, tmp_path, tune,
                                                              trained_prefixes):
    out = tmp_path / f"pft_{tune}"
    result = train(make_config("finetune", tiny_run(dataset, out, encoder_checkpoint, tune_blocks=tune, epochs=1,
                                                    lr=1e-3)))
    pre = weights(encoder_checkpoint)
    post = load_training_state(out / CHECKPOINT_NAME)["model"]
    shared = {k for k in pre if k in post}
    want = {k for k in shared if k.startswith(trained_prefixes)}
    assert changed(pre, post) == want
    assert want and {k for k in shared if k.startswith("blocks.0.")}.isdisjoint(want)
    trained = sum(v.numel() for k, v in post.items() if k.startswith(trained_prefixes))
    assert result.freeze.trained == trained
    run = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][0]
    assert run["trained_parameters"] == trained and run["total_parameters"] == sum(v.numel() for v in post.values())
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["tune_blocks"] == tune and doc["trained_parameters"] == trained


def test_a_pretrained_tiny_encoder_fine_tunes_well_above_chance(dataset, tmp_path):
    """MAE-pretrain a tiny encoder on the training images, then fine-tune it with the paper's recipe
    (RandAug, mixup/cutmix, label smoothing, erasing, drop path, layer decay) through the CLI."""
    from mae_transfer.cli import main
    from pretrain import make_config as pretrain_config
    from pretrain import train as pretrain

    pre = pretrain(pretrain_config(dict(
        data=str(dataset / "train"), output=str(tmp_path / "mae"), model="mae_vit_tiny_patch16", img_size=32,
        model_kwargs=TINY_VIT, decoder_depth=1, decoder_dim=32, decoder_heads=2, batch_size=8, epochs=4,
        warmup_epochs=1, lr=1e-3, num_workers=0, tensorboard=False, progress=False, vis_every=0)))
    out = tmp_path / "ft"
    args = ["finetune", "--data", str(dataset), "--output", str(out), "--checkpoint", str(pre.encoder),
            "--img-size", "32", "--batch-size", "8", "--epochs", "8", "--warmup-epochs", "1", "--lr", "2e-3",
            "--num-workers", "0", "--no-progress"]
    assert main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model"], cfg["layer_decay"], cfg["drop_path"], cfg["mixup"], cfg["cutmix"], cfg["smoothing"],
            cfg["reprob"], cfg["pool"]) == ("vit_tiny_patch16", 0.65, 0.1, 0.8, 1.0, 0.1, 0.25, "avg")
    doc = json.loads((out / "metrics.json").read_text())
    assert len(doc["epochs"]) == 8 and doc["last"]["images"] == 24
    chance = 100.0 / 4
    assert doc["last"]["top1"] >= 2 * chance, doc["last"]
    assert doc["best"]["top1"] >= doc["last"]["top1"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # --eval alone on the exported classifier reproduces the last epoch's numbers
    assert main(["finetune", "--eval", "--checkpoint", str(out / MODEL_NAME), "--data", str(dataset),
                 "--output", str(tmp_path / "ev"), "--num-workers", "0", "--no-progress"]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["top1"] == pytest.approx(doc["last"]["top1"]) and ev["images"] == 24


def test_resume_equals_the_uninterrupted_run(dataset, encoder_checkpoint, tmp_path):
    """Full recipe (RandAug, erasing, mixup/cutmix, drop path, layer decay, EMA, accumulation):
    2 epochs in one go == 1 epoch, interruption, resume, 1 more epoch; bit for bit."""
    opts = dict(epochs=2, warmup_epochs=1, lr=1e-3, batch_size=4, accum_iter=2, ema_decay=0.9)
    full = train(make_config("finetune", tiny_run(dataset, tmp_path / "full", encoder_checkpoint, **opts)))

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt("simulated preemption")

    cfg = make_config("finetune", tiny_run(dataset, tmp_path / "cut", encoder_checkpoint, **opts))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_epoch_end=stop_after_first)
    assert load_training_state(tmp_path / "cut" / CHECKPOINT_NAME)["epoch"] == 1
    resumed = train(cfg)
    assert resumed.resumed_from == tmp_path / "cut" / CHECKPOINT_NAME and resumed.epochs_done == 2

    a = load_training_state(tmp_path / "full" / CHECKPOINT_NAME)
    b = load_training_state(tmp_path / "cut" / CHECKPOINT_NAME)
    assert a["step"] == b["step"] == 2 * 6
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}: {k}"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ma, mb = weights(full.model), weights(resumed.model)
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")} for r in h]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)


def test_validation_classes_that_differ_are_an_error_listing_them(make_dataset, encoder_checkpoint, tmp_path):
    root = make_dataset(tmp_path / "d", per_class=(2, 1))
    (root / "val" / "blue_dots").rename(root / "val" / "cyan_dots")
    with pytest.raises(DataError, match=r"only in .*train: blue_dots; only in .*val: cyan_dots"):
        train(make_config("finetune", tiny_run(root, tmp_path / "o", encoder_checkpoint)))


def test_a_checkpoint_of_another_architecture_says_what_was_expected(dataset, tmp_path):
    from mae_backbone import create_vit
    from mae_backbone.checkpoint import write_checkpoint

    small = create_vit("vit_small_patch16", img_size=32, depth=2)
    path = tmp_path / "official_mae_small.pth"
    write_checkpoint(small.state_dict(), path, format="mae")
    cfg = make_config("finetune", tiny_run(dataset, tmp_path / "o", path, model="vit_tiny_patch16",
                                           model_kwargs={"depth": 2}))
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    msg = str(err.value)
    assert str(path) in msg and "shapes that do not fit" in msg
    assert "expected vit_tiny_patch16 (embed_dim 192, depth 2, heads 3, patch 16)" in msg
