"""The classifier: layer-decay groups, freezing per protocol, eval mode of frozen parts, BN head."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from classification import build_classifier, build_optimizer, fold_bn_head, freeze
from training.schedule import cosine_schedule, set_lr
from cls_helpers import TINY_VIT

DEPTH = 4
KW = {**TINY_VIT, "depth": DEPTH}


def tiny(protocol: str = "finetune", **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("vit_tiny_patch16", 5, protocol, img_size=32, model_kwargs=KW, **kw)


def expected_layer(name: str) -> int:
    """Layer ids written out by hand: stem 0, block i -> i + 1, the rest depth + 1."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return DEPTH + 1


def test_layer_decay_groups_have_the_right_scale_per_block():
    model = tiny(drop_path=0.1)
    freeze(model, "all")
    opt = build_optimizer(model, "finetune", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.add(name)
            assert group["lr_scale"] == pytest.approx(0.65 ** (DEPTH + 1 - expected_layer(name))), name
            no_wd = p.ndim == 1 or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if no_wd else 0.05), name
    assert seen == {n for n, p in model.named_parameters()}  # pos_embed is learnable when fine-tuning
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == DEPTH + 2 and scales[-1] == 1.0
    # the schedule sets each group's lr to the schedule value times its scale
    lr_at = cosine_schedule(1e-3, min_lr=0.0, warmup_steps=10, total_steps=100)
    set_lr(opt, lr_at(5))
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * 0.5 * group["lr_scale"])
    set_lr(opt, lr_at(55))  # half way through the cosine part
    for group in opt.param_groups:
        assert group["lr"] == pytest.approx(1e-3 * 0.5 * group["lr_scale"])
    set_lr(opt, lr_at(100))
    assert all(g["lr"] == pytest.approx(0.0) for g in opt.param_groups)


def test_partial_fine_tuning_optimizes_only_the_chosen_blocks():
    model = tiny()
    report = freeze(model, 1)
    opt = build_optimizer(model, "finetune", lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    in_opt = {n for n, p in model.named_parameters() if any(p is q for g in opt.param_groups for q in g["params"])}
    assert in_opt == set(report.trainable)
    assert all(n.startswith((f"blocks.{DEPTH - 1}.", "fc_norm.", "head.")) for n in in_opt)
    assert {n.split(".")[0] for n in in_opt} == {"blocks", "fc_norm", "head"}
    assert report.trained == sum(p.numel() for n, p in model.named_parameters() if n in in_opt)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert str(report).startswith(f"trained {report.trained:,} of {report.total:,} parameters")


@pytest.mark.parametrize("tune, trainable_prefixes", [
    ("all", None),
    (0, ("fc_norm.", "head.")),
    (2, (f"blocks.{DEPTH - 2}.", f"blocks.{DEPTH - 1}.", "fc_norm.", "head.")),
    ("mlp", (f"blocks.{DEPTH - 1}.norm2.", f"blocks.{DEPTH - 1}.mlp.", "fc_norm.", "head.")),
    (DEPTH, tuple(f"blocks.{i}." for i in range(DEPTH)) + ("fc_norm.", "head.")),
])
def test_freeze_trains_exactly_the_chosen_parts(tune, trainable_prefixes):
    model = tiny()
    report = freeze(model, tune)
    for name, p in model.named_parameters():
        want = True if trainable_prefixes is None else name.startswith(trainable_prefixes)
        assert p.requires_grad == want, name
    # frozen parts stay in eval mode through train(): no drop path there, BN statistics kept
    model.train()
    for name in report.frozen_modules:
        assert not model.get_submodule(name).training, name
    assert model.head.training and model.training
    if tune == "mlp":
        last = model.blocks[DEPTH - 1]
        assert last.training and not last.attn.training and last.mlp.training
    # gradients reach exactly the trainable parameters
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == set(report.trainable)


def test_freeze_rejects_more_blocks_than_the_model_has():
    with pytest.raises(ValueError, match=f"out of range: the model has {DEPTH} blocks"):
        freeze(tiny(), DEPTH + 1)


def test_linear_probe_head_is_batchnorm_without_affine_then_linear():
    model = tiny("linprobe")
    report = freeze(model, "head")
    bn, linear = model.head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert bn.weight is None and bn.bias is None
    assert isinstance(linear, nn.Linear)
    assert report.trainable == ["head.1.weight", "head.1.bias"]
    assert 0.005 < float(linear.weight.detach().std()) < 0.015 and float(linear.bias.detach().abs().max()) == 0.0  # std 0.01 init
    assert not model.pos_embed.requires_grad  # fixed when probing
    model.train()
    assert bn.training and not model.blocks.training and not model.patch_embed.training
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(before, bn.running_mean)  # the head's BN learns its statistics
    opt = build_optimizer(model, "linprobe", lr=0.1, weight_decay=0.0)
    from timm.optim import Lars

    assert isinstance(opt, Lars) and opt.defaults["momentum"] == 0.9
    adapt = {tuple(g["param_names"]): g["always_adapt"] for g in opt.param_groups}
    assert adapt == {("head.1.weight",): True, ("head.1.bias",): False}


def test_folding_the_bn_head_gives_the_same_outputs():
    model = tiny("linprobe")
    bn = model.head[0]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        folded = fold_bn_head(model)
        got = folded(x)
    assert isinstance(folded.head, nn.Linear)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

