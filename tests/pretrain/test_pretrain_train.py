"""The training loop: learning, run outputs, exact resume, accumulation, bad data, non-finite losses."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from mae_backbone import create_vit, safe_torch_load
from pretrain import CHECKPOINT_NAME, DataError, MaskedAutoencoderViT, NonFiniteModelError, TrainingDiverged
from pretrain import make_config, save_training_state
from pretrain.train import build_model, train


class ScriptedMAE(MaskedAutoencoderViT):
    """Our MAE whose n-th forward calls (1-based) return a NaN loss or raise KeyboardInterrupt."""

    def __init__(self, nan_calls=(), interrupt_call=None, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0
        self.nan_calls = set(nan_calls)
        self.interrupt_call = interrupt_call

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        self.calls += 1
        if self.calls == self.interrupt_call:
            raise KeyboardInterrupt("simulated Ctrl-C")
        loss, pred, mask = super().forward(imgs, mask_ratio, noise)
        if self.calls in self.nan_calls or "all" in self.nan_calls:
            loss = loss * float("nan")
        return loss, pred, mask


def scripted(cfg, **script):
    """The model ``train(cfg)`` would build (same initial weights), scripted."""
    with torch.device("meta"):
        kwargs = build_model(cfg).config()
    torch.manual_seed(cfg.seed)
    return ScriptedMAE(**script, **kwargs)


def records(output, kind):
    lines = (output / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_loss_falls_and_the_run_folder_is_complete(tmp_path, image_folder, tiny_config):
    out = tmp_path / "run"
    cfg = tiny_config(image_folder, out, epochs=12, warmup_epochs=1, lr=3e-3, target="pixel", save_every=5,
                      vis_every=12, tensorboard=True)
    result = train(cfg)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    # resolved configuration, reusable as --config
    assert make_config(config_file=out / "config.json") == cfg
    run = records(out, "run")[0]
    assert run["effective_batch"] == 4 and run["steps_per_epoch"] == 4 and run["lr"] == 3e-3
    assert len(records(out, "step")) == 48 and len(records(out, "epoch")) == 12
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "vis" / "epoch_0012.png").stat().st_size > 0
    # full checkpoint: official layout + training state
    state = safe_torch_load(out / CHECKPOINT_NAME)
    assert state["epoch"] == 12 and state["step"] == 48 and "decoder_pred.weight" in state["model"]
    # encoder export in the mae_backbone format loads strictly into the backbone
    from mae_backbone.checkpoint import load_checkpoint, read_checkpoint

    sd, meta = read_checkpoint(result.encoder)
    assert meta["arch"] == "vit_tiny_patch16" and meta["format"] == "ours"
    vit = create_vit(meta["arch"], img_size=32, **cfg.model_kwargs)
    load_checkpoint(vit, result.encoder)
    for k, v in vit.state_dict().items():
        assert torch.equal(v, state["model"][k]), k


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: the default fast path, bf16 working weights
def test_resume_after_an_interruption_equals_the_uninterrupted_run(tmp_path, image_folder, tiny_config, precision):
    opts = dict(epochs=3, batch_size=2, accum_iter=2, warmup_epochs=1, lr=2e-3, masking="block", mask_ratio=0.5,
                precision=precision, clip_grad=1.0)
    full = train(tiny_config(image_folder, tmp_path / "full", **opts))
    cfg = tiny_config(image_folder, tmp_path / "cut", **opts)
    with pytest.raises(KeyboardInterrupt):  # 8 micro-batches per epoch: stop in the middle of epoch 2
        train(cfg, model=scripted(cfg, interrupt_call=8 + 5))
    assert safe_torch_load(tmp_path / "cut" / CHECKPOINT_NAME)["epoch"] == 1
    resumed = train(cfg)  # auto-resume from the output folder
    assert resumed.resumed_from == tmp_path / "cut" / CHECKPOINT_NAME
    a = safe_torch_load(full.checkpoint)
    b = safe_torch_load(resumed.checkpoint)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    assert [r["loss"] for r in full.history[1:]] == [r["loss"] for r in resumed.history]


def test_gradient_accumulation_equals_the_large_batch(tmp_path, image_folder, tiny_config, assert_weights_close):
    big = train(tiny_config(image_folder, tmp_path / "big", epochs=1, batch_size=8, accum_iter=1))
    acc = train(tiny_config(image_folder, tmp_path / "acc", epochs=1, batch_size=4, accum_iter=2))
    la = [r["loss"] for r in records(tmp_path / "big", "step")]
    lb = [r["loss"] for r in records(tmp_path / "acc", "step")]
    assert len(la) == len(lb) == 2
    assert la == pytest.approx(lb, rel=1e-6)
    assert_weights_close(safe_torch_load(big.checkpoint)["model"], safe_torch_load(acc.checkpoint)["model"])


def test_corrupt_images_are_skipped_warned_and_counted(tmp_path, image_folder, tiny_config, caplog):
    bad = image_folder / "class0" / "zz_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # PNG signature, then garbage
    (image_folder / "class1" / "img015.png").unlink()  # 16 files: every epoch uses all of them
    with caplog.at_level(logging.WARNING):
        result = train(tiny_config(image_folder, tmp_path / "run", epochs=2))
    assert [r["skipped_images"] for r in result.history] == [1, 1]
    assert [r["images"] for r in result.history] == [15, 15]
    assert str(bad) in result.history[0]["skipped_files"][0]
    named = [m for m in caplog.messages if str(bad) in m and "unreadable" in m]
    assert len(named) == 1  # warned once, counted every epoch
    assert safe_torch_load(result.checkpoint)["counters"]["skipped_images"] == 2


def test_no_readable_image_stops_before_training(tmp_path, tiny_config):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="none of the 3 image files can be read"):
        train(tiny_config(data, tmp_path / "run"))
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_a_nonfinite_loss_skips_that_step_only(tmp_path, image_folder, tiny_config):
    cfg = tiny_config(image_folder, tmp_path / "run", epochs=1)
    result = train(cfg, model=scripted(cfg, nan_calls={3}))
    assert result.history[0]["nonfinite_steps"] == 1 and math.isfinite(result.history[0]["loss"])
    state = safe_torch_load(result.checkpoint)
    assert state["counters"]["nonfinite_steps"] == 1 and state["step"] == 4
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {3.0}  # 4 steps, one skipped
    assert [r["step"] for r in records(tmp_path / "run", "step")] == [1, 2, 4]
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nonfinite_losses_in_a_row_stop_the_run_and_keep_the_checkpoint(tmp_path, image_folder, tiny_config):
    out = tmp_path / "run"
    train(tiny_config(image_folder, out, epochs=1))
    before = (out / CHECKPOINT_NAME).read_bytes()
    cfg = tiny_config(image_folder, out, epochs=3, max_nonfinite=3)
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row had a non-finite loss"):
        train(cfg, model=scripted(cfg, nan_calls={"all"}))
    assert (out / CHECKPOINT_NAME).read_bytes() == before


def test_a_nonfinite_model_is_never_saved(tmp_path, tiny_mae):
    model = tiny_mae()
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / CHECKPOINT_NAME
    save_training_state(path, model, opt, None, 1, 4, {}, {})
    before = path.read_bytes()
    with torch.no_grad():
        model.decoder_pred.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteModelError, match="decoder_pred.weight"):
        save_training_state(path, model, opt, None, 2, 8, {}, {})
    assert path.read_bytes() == before


def test_bf16_and_fp16_training(tmp_path, image_folder, tiny_config):
    fp32 = train(tiny_config(image_folder, tmp_path / "fp32", epochs=1))
    bf16 = train(tiny_config(image_folder, tmp_path / "bf16", epochs=1, precision="bf16"))
    fp16 = train(tiny_config(image_folder, tmp_path / "fp16", epochs=1, precision="fp16"))
    first = {name: records(tmp_path / name, "step")[0]["loss"] for name in ("fp32", "bf16", "fp16")}
    assert first["bf16"] == pytest.approx(first["fp32"], rel=0.03)
    assert first["fp16"] == pytest.approx(first["fp32"], rel=0.01)
    assert first["bf16"] != first["fp32"]  # autocast really ran in low precision
    scaler = safe_torch_load(fp16.checkpoint)["scaler"]
    assert scaler["scale"] > 0 and safe_torch_load(bf16.checkpoint)["scaler"] == {}
    assert fp32.history[0]["nonfinite_steps"] == 0
