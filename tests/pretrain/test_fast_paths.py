"""The fast pretraining paths give the plain path's results: same losses, gradients and steps.

bf16 working weights (``training.fastpath.WorkingWeights``) hold the same bf16 rounding of the same
fp32 masters that autocast computes on every forward, and hand back the same bf16 gradients cast
to fp32, so they are pinned to the plain bf16-autocast path *exactly* (tolerance 0), not just
within bf16 precision.
"""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from mae_backbone.io import safe_torch_load
from pretrain import create_mae, train
from pretrain.optim import build_optimizer
from training.fastpath import COMPILE_MIN_STEPS, WorkingWeights, fast_path, maybe_compile, resolve_compile
from training.schedule import set_lr

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def _setup(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = create_mae("mae_vit_tiny_patch16", **TINY).train()
    imgs = torch.randn(4, 3, 32, 32)
    noises = [torch.rand(4, 16) for _ in range(3)]
    return model, imgs, noises


def _train(model, opt, imgs, noises, amp: bool, lrs=(1e-3, 5e-4, 2e-3), working=None) -> list[float]:
    """Steps of ``model`` (the step model: the MAE, its working weights, or those compiled) with ``opt``."""
    losses = []
    for noise, lr in zip(noises, lrs):
        set_lr(opt, lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _, _ = model(imgs, 0.75, noise=noise)
        loss.backward()
        if working is not None:
            working.grads_to_masters()
        opt.step()
        if working is not None:
            working.refresh()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_bf16_working_weights_train_exactly_like_autocast():
    plain, imgs, noises = _setup()
    fast = copy.deepcopy(plain)
    working = WorkingWeights(fast)
    # outputs and fp32 master gradients of one forward / backward: identical
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_pred, _ = plain(imgs, 0.75, noise=noises[0])
        out, pred, _ = working(imgs, 0.75, noise=noises[0])
    assert torch.equal(pred, ref_pred) and torch.equal(out, ref)
    ref.backward()
    out.backward()
    working.grads_to_masters()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.requires_grad:
            assert q.grad.dtype == torch.float32 and torch.equal(q.grad, p.grad), name
    plain.zero_grad(set_to_none=True)
    fast.zero_grad(set_to_none=True)

    plain_losses = _train(plain, build_optimizer(plain, 1e-3), imgs, noises, amp=True)
    fast_losses = _train(working, build_optimizer(fast, 1e-3), imgs, noises, amp=True, working=working)
    assert fast_losses == plain_losses
    # the model keeps its fp32 parameters (the masters), equal to the plain run's after 3 steps
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert q.dtype == torch.float32 and torch.equal(p, q), name
    # the working copies are the masters rounded to bf16 (what autocast would cast them to)
    index = working.names.index("blocks.1.mlp.fc2.weight")
    assert working.working[index].dtype == torch.bfloat16
    assert torch.equal(working.working[index], fast.blocks[1].mlp.fc2.weight.bfloat16())
    assert "blocks.0.norm1.weight" not in working.names and "cls_token" not in working.names


def test_working_weights_with_gradient_checkpointing_are_the_autocast_path():
    torch.manual_seed(0)
    plain = create_mae("mae_vit_tiny_patch16", grad_checkpointing=True, **TINY).train()
    fast = copy.deepcopy(plain)
    working = WorkingWeights(fast)
    imgs, noises = torch.randn(4, 3, 32, 32), [torch.rand(4, 16) for _ in range(2)]
    plain_losses = _train(plain, build_optimizer(plain, 1e-3), imgs, noises, amp=True)
    fast_losses = _train(working, build_optimizer(fast, 1e-3), imgs, noises, amp=True, working=working)
    assert fast_losses == plain_losses
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.equal(p, q), name


def test_working_weights_accumulate_gradients_in_fp32_like_autocast():
    plain, imgs, noises = _setup(3)
    fast = copy.deepcopy(plain)
    working = WorkingWeights(fast)
    for model in (plain, working):
        for noise in noises[:2]:  # two micro-batches into one gradient
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _, _ = model(imgs, 0.75, noise=noise)
            (loss / 2).backward()
            if model is working:
                working.grads_to_masters()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name
    assert all(w.grad is None for w in working.working)


def test_fused_adamw_steps_like_the_reference_loop():
    fused_model, imgs, noises = _setup()
    loop_model = copy.deepcopy(fused_model)
    fused = build_optimizer(fused_model, 1e-3)
    assert fused.defaults["fused"]
    loop = build_optimizer(loop_model, 1e-3)
    for group in loop.param_groups:
        group["fused"], group["foreach"] = False, False
    # one step from the same gradients: the same update (later steps may differ where Adam
    # normalizes a near-zero gradient, whose sign rounding decides)
    _train(fused_model, fused, imgs, noises[:1], amp=False, lrs=(1e-3,))
    _train(loop_model, loop, imgs, noises[:1], amp=False, lrs=(1e-3,))
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    loss_f = _train(fused_model, fused, imgs, noises[1:], amp=False)
    loss_l = _train(loop_model, loop, imgs, noises[1:], amp=False)
    torch.testing.assert_close(torch.tensor(loss_f), torch.tensor(loss_l), rtol=1e-5, atol=0)


def test_bf16_fast_path_loss_is_the_fp32_loss_within_bf16_precision():
    model, imgs, noises = _setup()
    with torch.no_grad():
        ref, _, _ = model(imgs, 0.75, noise=noises[0])
    working = WorkingWeights(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _, _ = working(imgs, 0.75, noise=noises[0])
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=2e-2, atol=0)


def test_the_fast_path_is_chosen_by_precision_and_options():
    model, _, _ = _setup()
    cpu = torch.device("cpu")
    fast = fast_path(model, "bf16", cpu)
    assert isinstance(fast.step_model, WorkingWeights) and not fast.compiled
    assert fast.describe() == "precision: bf16 autocast + bf16 working weights (fp32 masters), compile: off"
    assert fast_path(model, "bf16", cpu, working_weights=False).describe() == "precision: bf16 autocast, compile: off"
    ddp = fast_path(model, "bf16", cpu, distributed=True)  # DDP would all-reduce bf16 gradients
    assert ddp.working is None and ddp.step_model is model
    assert ddp.describe() == "precision: bf16 autocast (working weights: single-process runs only), compile: off"
    plain = fast_path(model, "fp32", cpu)
    assert plain.step_model is model and plain.working is None and plain.describe() == "precision: fp32, compile: off"


def test_compile_is_chosen_where_it_pays():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cuda) and not resolve_compile("off", cuda) and resolve_compile("on", cpu)
    assert resolve_compile("auto", cpu, "bf16", COMPILE_MIN_STEPS, cpu_measured=True)  # a long bf16 MAE run
    assert not resolve_compile("auto", cpu, "bf16", COMPILE_MIN_STEPS - 1, cpu_measured=True)  # would not pay
    assert not resolve_compile("auto", cpu, "fp32", 10**6, cpu_measured=True)  # no faster in fp32 on the CPU
    assert not resolve_compile("auto", cpu, "bf16", 10**6)  # a step not measured compiled on the CPU


def test_the_compiled_working_weights_step_is_the_eager_one(monkeypatch):
    """The compiled path captures the working-weights step whole (dynamo + AOT autograd; the
    ``aot_eager`` backend runs the captured graphs with the eager kernels, so the results are
    exact; inductor's fused kernels round differently, and are measured by ``bench-speed``)."""
    from torch._dynamo.utils import counters

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real(module, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    plain, imgs, noises = _setup()
    fast = copy.deepcopy(plain)
    path = fast_path(fast, "bf16", torch.device("cpu"), compile="on")
    assert path.compiled and path.describe().endswith("compile: on")
    plain_losses = _train(plain, build_optimizer(plain, 1e-3), imgs, noises, amp=True)
    fast_losses = _train(path.step_model, build_optimizer(fast, 1e-3), imgs, noises, amp=True, working=path.working)
    assert not path.step_model.failed and counters["stats"]["unique_graphs"] >= 1  # it really ran compiled
    assert fast_losses == plain_losses
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.equal(p, q), name


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", lambda module: broken)
    model = torch.nn.Linear(3, 2)
    step = maybe_compile(model)
    x = torch.randn(4, 3)
    with caplog.at_level(logging.WARNING, logger="training.fastpath"):
        outs = [step(x) for _ in range(3)]
    assert all(torch.equal(o, model(x)) for o in outs)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()


# ---------------------------------------------------------------- the run, as the CLI runs it
def _losses(output) -> list[float]:
    lines = (output / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "step"]


def test_bf16_run_with_working_weights_is_the_autocast_run(tmp_path, image_folder, tiny_config, caplog):
    opts = dict(epochs=1, precision="bf16", accum_iter=2, batch_size=2, clip_grad=0.5)
    with caplog.at_level(logging.INFO, logger="training.run"):
        fast = train(tiny_config(image_folder, tmp_path / "fast", **opts))
    assert "precision: bf16 autocast + bf16 working weights (fp32 masters), compile: off" in caplog.text
    plain = train(tiny_config(image_folder, tmp_path / "plain", working_weights=False, **opts))
    assert _losses(tmp_path / "fast") == _losses(tmp_path / "plain")
    a, b = safe_torch_load(fast.checkpoint), safe_torch_load(plain.checkpoint)
    for name, value in a["model"].items():  # the checkpoint holds the fp32 masters
        assert value.dtype == torch.float32 and torch.equal(value, b["model"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert state["exp_avg"].dtype == torch.float32
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][key]["exp_avg_sq"])
    from safetensors.torch import load_file

    encoder = load_file(str(fast.encoder))
    assert encoder and all(v.dtype == torch.float32 for v in encoder.values())


@pytest.mark.parametrize("choice", ["maybe", ""])
def test_a_wrong_compile_choice_is_refused(tmp_path, image_folder, tiny_config, choice):
    with pytest.raises(ValueError, match="compile"):
        tiny_config(image_folder, tmp_path / "x", compile=choice).validate()
