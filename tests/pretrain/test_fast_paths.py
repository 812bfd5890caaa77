"""The fast pretraining paths give the plain path's results: same losses, gradients and steps."""
from __future__ import annotations

import copy

import pytest
import torch

from pretrain import create_mae
from pretrain.optim import LowPrecisionWeights, build_optimizer
from training.schedule import set_lr

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def _setup(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = create_mae("mae_vit_tiny_patch16", **TINY).train()
    imgs = torch.randn(4, 3, 32, 32)
    noises = [torch.rand(4, 16) for _ in range(3)]
    return model, imgs, noises


def _train(model, opt, imgs, noises, amp: bool, lrs=(1e-3, 5e-4, 2e-3)) -> list[float]:
    losses = []
    for noise, lr in zip(noises, lrs):
        set_lr(opt, lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss, _, _ = model(imgs, 0.75, noise=noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_bf16_working_weights_train_exactly_like_autocast():
    plain, imgs, noises = _setup()
    fast = copy.deepcopy(plain)
    plain_losses = _train(plain, build_optimizer(plain, 1e-3), imgs, noises, amp=True)
    opt = LowPrecisionWeights(fast, lambda m: build_optimizer(m, 1e-3))
    fast_losses = _train(fast, opt, imgs, noises, amp=True)

    # the matmul weights really are held in bf16 (nothing to cast per forward); norms stay fp32
    assert fast.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert fast.patch_embed.proj.weight.dtype == torch.bfloat16
    assert fast.blocks[0].norm1.weight.dtype == torch.float32
    # same rounding of the same fp32 masters, same fp32 gradients: the same run
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-5, atol=0)
    masters = opt.master_state_dict()
    for name, value in plain.state_dict().items():
        assert masters[name].dtype == torch.float32, name
        torch.testing.assert_close(masters[name], value, rtol=1e-5, atol=1e-7, msg=name)
    # the working copies are the masters rounded to bf16
    torch.testing.assert_close(fast.blocks[1].mlp.fc2.weight, masters["blocks.1.mlp.fc2.weight"].bfloat16(),
                               rtol=0, atol=0)


def test_bf16_working_weights_resume_from_optimizer_state():
    model, imgs, noises = _setup(1)
    opt = LowPrecisionWeights(model, lambda m: build_optimizer(m, 1e-3))
    _train(model, opt, imgs, noises[:1], amp=True, lrs=(1e-3,))
    saved_model, saved_opt = copy.deepcopy(opt.master_state_dict()), copy.deepcopy(opt.state_dict())
    after = _train(model, opt, imgs, noises[1:], amp=True, lrs=(1e-3, 1e-3))

    fresh, _, _ = _setup(2)  # other weights: everything must come from the saved state
    fresh.load_state_dict(saved_model)
    opt2 = LowPrecisionWeights(fresh, lambda m: build_optimizer(m, 1e-3))
    opt2.load_state_dict(saved_opt)
    opt2.load_masters(saved_model)
    assert _train(fresh, opt2, imgs, noises[1:], amp=True, lrs=(1e-3, 1e-3)) == after


def test_bf16_working_weights_need_a_fresh_optimizer():
    model, imgs, noises = _setup()
    opt = build_optimizer(model, 1e-3)
    _train(model, opt, imgs, noises[:1], amp=False, lrs=(1e-3,))
    with pytest.raises(ValueError, match="fresh optimizer"):
        LowPrecisionWeights(model, lambda m: opt)


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
    LowPrecisionWeights(model, lambda m: build_optimizer(m, 1e-3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _, _ = model(imgs, 0.75, noise=noises[0])
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=2e-2, atol=0)
