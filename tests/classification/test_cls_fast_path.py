"""The fine-tuning fast path (bf16 working weights, ``training.fastpath``) is the plain bf16 path.

Working weights hold the bf16 rounding autocast would compute from the same fp32 masters and give
the masters the same gradients, so outputs, gradients and optimizer steps are pinned exactly
(tolerance 0), with drop path and mixup on (same seeds on both sides).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from classification import build_classifier, build_optimizer, freeze
from classification.config import make_config
from classification.train import train
from cls_helpers import tiny_run
from mae_backbone import safe_torch_load
from training.fastpath import WorkingWeights


def _pair(tune: str = "all"):
    torch.manual_seed(0)
    plain = build_classifier("vit_tiny_patch16", 4, img_size=32, drop_path=0.1,
                             model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8})
    freeze(plain, tune)
    fast = copy.deepcopy(plain)
    return plain, fast, WorkingWeights(fast)


def _step(model, opt, x, y, working=None) -> torch.Tensor:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(1)  # the same mixup draw (numpy) and drop-path masks (torch) on both sides
    np.random.seed(1)
    x, y = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)(x.clone(), y)  # mixes in place
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (working or model)(x)
        loss = SoftTargetCrossEntropy()(logits, y)
    loss.backward()
    if working is not None:
        working.grads_to_masters()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    if working is not None:
        working.refresh()
    opt.zero_grad(set_to_none=True)
    return logits.detach(), grads


@pytest.mark.parametrize("tune", ["all", 1])  # full and partial fine-tuning (block 0 frozen)
def test_working_weights_fine_tune_step_is_the_autocast_step(tune):
    plain, fast, working = _pair(tune)
    if tune == 1:
        assert "blocks.0.attn.qkv.weight" not in working.names  # frozen weights stay out (fp32, as before)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt_p = build_optimizer(plain, "finetune", 1e-3, 0.05, 0.65)
    opt_f = build_optimizer(fast, "finetune", 1e-3, 0.05, 0.65)
    for _ in range(2):
        out_p, grads_p = _step(plain, opt_p, x, y)
        out_f, grads_f = _step(fast, opt_f, x, y, working)
        assert torch.equal(out_p, out_f)
        assert grads_p.keys() == grads_f.keys() and all(torch.equal(grads_p[k], grads_f[k]) for k in grads_p)
        assert all(g.dtype == torch.float32 for g in grads_f.values())
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert q.dtype == torch.float32 and torch.equal(p, q), name


def test_bf16_fine_tuning_run_keeps_fp32_masters_exports_and_ema(dataset, tmp_path, encoder_checkpoint):
    def run(name, **extra):
        opts = tiny_run(dataset, tmp_path / name, encoder_checkpoint, epochs=1, precision="bf16", ema_decay=0.9,
                        clip_grad=1.0, **extra)
        return train(make_config("finetune", opts))

    fast, plain = run("fast"), run("plain", working_weights=False)
    log = [json.loads(line) for line in (tmp_path / "fast" / "log.jsonl").read_text().splitlines()]
    assert log[0]["fast_path"] == "precision: bf16 autocast + bf16 working weights (fp32 masters), compile: off"
    a, b = safe_torch_load(fast.checkpoint), safe_torch_load(plain.checkpoint)
    for key in ("model", "ema"):
        for name, value in a[key].items():
            assert value.dtype == torch.float32 and torch.equal(value, b[key][name]), (key, name)
    assert fast.history[0]["train_loss"] == plain.history[0]["train_loss"]
    from safetensors.torch import load_file

    for path in (fast.model, fast.ema_model):
        assert all(v.dtype == torch.float32 for v in load_file(str(path)).values())
