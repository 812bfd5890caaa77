"""MoCo v3: the loss against a hand computation, the momentum update and its schedule, the frozen
patch projection, the two crops, and a tiny run whose encoder mae_backbone reads strictly."""
from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from PIL import Image

from mae_backbone import create_vit, sincos_2d_pos_embed
from mae_backbone.checkpoint import load_checkpoint, read_checkpoint
from pretrain import CHECKPOINT_NAME, make_config
from pretrain.moco import (
    MocoStep,
    build_moco_optimizer,
    build_moco_transform,
    contrastive_loss,
    create_moco,
    momentum_at,
)
from training.loop import train_one_epoch
from pretrain.train import build_model, train

TINY_MOCO = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, proj_hidden=64, dim=16, pred_hidden=64)
TINY_MOCO_RUN = dict(
    method="mocov3", model="mae_vit_tiny_patch16", img_size=32,
    model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
    moco_proj_hidden=64, moco_dim=16, moco_pred_hidden=64, batch_size=4, num_workers=0, tensorboard=False,
    progress=False, epochs=2, warmup_epochs=0, lr=1e-3, log_every=1, save_every=1,
)


def tiny_moco(**kw):
    return create_moco("vit_tiny_patch16", **{**TINY_MOCO, **kw})


# --------------------------------------------------------------------------- loss
@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_contrastive_loss_matches_a_hand_computation(tau):
    n = 3
    eye = torch.eye(4)[:n]  # orthonormal embeddings e_0, e_1, e_2
    # matching pairs: logits are I / tau, each row's cross-entropy is log(1 + (n - 1) e^(-1/tau))
    expected = math.log(1 + (n - 1) * math.exp(-1 / tau)) * 2 * tau
    assert float(contrastive_loss(eye, eye, tau)) == pytest.approx(expected, rel=1e-6)
    # the scale of q and k does not matter (both are L2-normalized)
    assert float(contrastive_loss(5 * eye, 0.1 * eye, tau)) == pytest.approx(expected, rel=1e-6)
    # keys shifted by one: the positive logit is 0, one negative is 1/tau -> log(e^(1/tau) + n - 1)
    shifted = eye.roll(1, dims=0)
    expected = math.log(math.exp(1 / tau) + n - 1) * 2 * tau
    assert float(contrastive_loss(eye, shifted, tau)) == pytest.approx(expected, rel=1e-6)


def test_the_loss_is_symmetric_over_the_two_crops():
    torch.manual_seed(0)
    model = tiny_moco()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    q1, q2 = model.forward_query(x1), model.forward_query(x2)
    k1, k2 = model.forward_key(x1), model.forward_key(x2)
    expected = contrastive_loss(q1, k2, 0.2) + contrastive_loss(q2, k1, 0.2)
    torch.testing.assert_close(model(x1, x2), expected)
    assert not k1.requires_grad and q1.requires_grad


# --------------------------------------------------------------------------- momentum encoder
def test_momentum_update_is_exact_for_every_parameter_and_gradient_free():
    torch.manual_seed(0)
    model = tiny_moco()
    base = dict(model.base_encoder.named_parameters())
    mom = dict(model.momentum_encoder.named_parameters())
    assert base.keys() == mom.keys() and len(base) > 10  # backbone + projection head
    for k in base:  # start both encoders apart
        with torch.no_grad():
            base[k].add_(torch.randn_like(base[k]))
    before = {k: v.detach().clone() for k, v in mom.items()}
    loss = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in mom.values())
    assert all((p.grad is not None) == p.requires_grad for p in base.values())  # patch_embed, pos_embed frozen

    setup = MocoStep(lr_at=lambda s: 0.0, momentum=0.9, total_steps=10, accum_iter=1, amp_dtype=None,
                          clip_grad=None, max_nonfinite=1, log_every=1, epochs=1)
    setup.after_step(model, step=4)  # the update before step 5: m = momentum_at(5, 10, 0.9)
    m = momentum_at(5, 10, 0.9)
    assert m == pytest.approx(0.95)
    for k in base:
        torch.testing.assert_close(mom[k], m * before[k] + (1 - m) * base[k].detach(), rtol=1e-6, atol=1e-7)
    assert mom["blocks.0.attn.qkv.weight"].grad is None


def test_momentum_schedule_rises_from_m0_to_one_by_a_half_cosine():
    assert momentum_at(0, 100, 0.99) == pytest.approx(0.99)
    assert momentum_at(50, 100, 0.99) == pytest.approx(0.995)
    assert momentum_at(100, 100, 0.99) == 1.0
    values = [momentum_at(s, 100, 0.99) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


# --------------------------------------------------------------------------- frozen patch projection
def test_patch_projection_is_random_frozen_and_not_in_the_optimizer():
    torch.manual_seed(0)
    model = tiny_moco()
    optimizer = build_moco_optimizer(model, lr=1e-2, weight_decay=0.1)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    patch = model.base_encoder.patch_embed.proj
    assert id(patch.weight) not in in_optimizer and id(patch.bias) not in in_optimizer
    assert not any(id(p) in in_optimizer for p in model.momentum_encoder.parameters())
    assert not model.base_encoder.pos_embed.requires_grad
    torch.testing.assert_close(model.base_encoder.pos_embed[0], sincos_2d_pos_embed(32, (4, 4), cls_token=True))
    before = {k: v.clone() for k, v in model.base_encoder.state_dict().items()}

    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)).backward()
    optimizer.step()
    after = model.base_encoder.state_dict()
    assert torch.equal(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"])
    assert torch.equal(after["pos_embed"], before["pos_embed"])
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    assert not torch.equal(after["head.0.weight"], before["head.0.weight"])  # the projection MLP trains


# --------------------------------------------------------------------------- two crops
def test_two_crops_differ_and_are_reproducible_by_seed(image_folder):
    img = Image.open(sorted(image_folder.rglob("*.png"))[0]).convert("RGB").resize((64, 64))
    transform = build_moco_transform(32)

    def views(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return transform(img)

    a = views(0)
    assert a.shape == (2, 3, 32, 32)
    assert (a[0] - a[1]).abs().mean() > 0.05  # two different crops
    torch.testing.assert_close(views(0), a, rtol=0, atol=0)
    assert not torch.equal(views(1), a)


# --------------------------------------------------------------------------- runs
def test_moco_run_writes_a_strict_encoder_that_trained_and_resumes_exactly(tmp_path, image_folder,
                                                                            assert_weights_close):
    cfg = make_config({**TINY_MOCO_RUN, "data": str(image_folder), "output": str(tmp_path / "full")})
    assert cfg.weight_decay == 0.1  # MoCo v3's recipe value when not given
    torch.manual_seed(cfg.seed)
    init = build_model(cfg).encoder_state_dict()
    result = train(cfg)
    assert [r["loss"] for r in result.history] and all(math.isfinite(r["loss"]) for r in result.history)
    run = json.loads((tmp_path / "full" / "log.jsonl").read_text().splitlines()[0])
    assert (run["type"], run["method"], run["steps_per_epoch"]) == ("run", "mocov3", 4)

    sd, meta = read_checkpoint(result.encoder)
    assert meta["method"] == "mocov3" and meta["arch"] == "vit_tiny_patch16" and meta["epochs"] == 2
    vit = create_vit(meta["arch"], **meta["arch_overrides"])
    report = load_checkpoint(vit, result.encoder)  # strict: nothing missing, nothing left over
    assert not report.missing and not report.unexpected
    assert sd.keys() == init.keys() and not any(k.startswith("head") for k in sd)
    assert torch.equal(sd["patch_embed.proj.weight"], init["patch_embed.proj.weight"])  # frozen random
    assert (sd["blocks.1.mlp.fc2.weight"] - init["blocks.1.mlp.fc2.weight"]).abs().max() > 1e-4

    # interrupted in epoch 2 (after epoch 1's checkpoint), then resumed: the same model, momentum encoder included
    run_module = importlib.import_module("training.run")  # the run skeleton calls the epoch loop

    epochs_run = []

    def interrupted(*args, **kwargs):
        if epochs_run:
            raise KeyboardInterrupt("simulated Ctrl-C")
        epochs_run.append(1)
        return train_one_epoch(*args, **kwargs)

    half = make_config({**TINY_MOCO_RUN, "data": str(image_folder), "output": str(tmp_path / "half")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "train_one_epoch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train(half)
    resumed = train(half)
    assert resumed.resumed_from is not None and resumed.history[0]["epoch"] == 2
    a = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=True)["model"]
    b = torch.load(tmp_path / "half" / CHECKPOINT_NAME, weights_only=True)["model"]
    assert any(k.startswith("momentum_encoder.") for k in a)
    assert_weights_close(a, b)

    # the official code's names: its checkpoint layout read by mae_backbone's mocov3 reader is our encoder
    torch.save({"state_dict": {"module." + k: v for k, v in a.items()}}, tmp_path / "official.pth.tar")
    official, _ = read_checkpoint(tmp_path / "official.pth.tar", "mocov3")
    assert official.keys() == sd.keys() and all(torch.equal(official[k], sd[k]) for k in sd)


def test_a_micro_batch_of_one_image_is_an_empty_step_and_batch_one_is_refused():
    setup = MocoStep(lr_at=lambda s: 0.0, momentum=0.99, total_steps=1, accum_iter=1, amp_dtype=None,
                          clip_grad=None, max_nonfinite=1, log_every=1, epochs=1)
    one = {"images": torch.randn(1, 2, 3, 32, 32), "seeds": torch.tensor([7]), "failures": []}
    two = {"images": torch.randn(2, 2, 3, 32, 32), "seeds": torch.tensor([7, 8]), "failures": []}
    assert setup.micro_batch(tiny_moco(), one, torch.device("cpu"))[0] == 0  # no negative, no BN statistics
    n, loss = setup.micro_batch(tiny_moco(), two, torch.device("cpu"))
    assert n == 2 and torch.isfinite(loss())
    with pytest.raises(ValueError, match="batch_size must be at least 2 with --method mocov3"):
        make_config({**TINY_MOCO_RUN, "data": "d", "output": "o", "batch_size": 1})


def _ddp_loss(rank: int, world: int, init_file: str, q: torch.Tensor, k: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)  # a forked child: no parallel region of the parent's thread pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = q.shape[0] // world
        loss = contrastive_loss(q[rank * n:(rank + 1) * n], k[rank * n:(rank + 1) * n], 0.2)
        torch.save(loss, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_every_process_contrasts_with_the_keys_of_all(tmp_path):
    torch.manual_seed(0)
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    k[:, 0] += 3 * q[:, 0]  # positives more alike than negatives
    torch.multiprocessing.start_processes(_ddp_loss, args=(2, str(tmp_path / "init"), q, k, str(tmp_path / "loss")),
                                          nprocs=2, start_method="fork")  # fork: no re-import
    per_rank = [torch.load(tmp_path / f"loss.{r}", weights_only=True) for r in range(2)]
    # the mean over processes (what DDP's gradient averaging optimizes) is the one-process loss
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, contrastive_loss(q, k, 0.2))
    # and not the loss of each process against its own keys only
    alone = (contrastive_loss(q[:3], k[:3], 0.2) + contrastive_loss(q[3:], k[3:], 0.2)) / 2
    assert not torch.allclose(alone, contrastive_loss(q, k, 0.2))
