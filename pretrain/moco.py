"""MoCo v3 for ViT (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"): a controlled contrastive baseline next to MAE, on the same ``mae_backbone`` ViT.

The stages, named as in the paper and the official ``moco/builder.py``:

- two crops of each image (``build_moco_transform``: the BYOL-style augmentations, blur and
  solarize asymmetric between the crops);
- the base encoder: the ViT (class token after the final norm) with the projection MLP as its
  ``head`` (3 layers, BN, hidden 4096, out 256), then the prediction MLP (2 layers): q [N, dim];
- the momentum encoder: a copy of backbone + projection, updated without gradients as
  ``k_param = m * k_param + (1 - m) * q_param`` (``update_momentum_encoder``), m rising from m0
  (0.99) to 1 by a half-cosine over training (``momentum_at``); it gives the keys k [N, dim];
- the loss: ``ctr(q1, k2) + ctr(q2, k1)``, ``ctr`` = InfoNCE with temperature tau (0.2) scaled
  by ``2 * tau`` (``contrastive_loss``);
- the "frozen random patch projection" trick: ``patch_embed`` keeps its random initialization
  (``requires_grad=False``, not in the optimizer); the position embedding is the fixed sin-cos
  table, as in MAE pretraining.

State-dict names follow the official code (``base_encoder.*`` with ``base_encoder.head.*`` the
projection MLP, ``momentum_encoder.*``, ``predictor.*``), so the backbone is what
``mae_backbone``'s ``mocov3`` reader takes from an official checkpoint.

Differences from the official code, on purpose: the ViT's initialization is MAE's (xavier-uniform
on the whole qkv matrix, class token N(0, .02)), the same for every method compared here; BN is
per-process (no SyncBN).  The momentum update runs after each optimizer step (``MocoStep``)
rather than at the start of the next forward: the same sequence of updates (the official first one
is a no-op), and it keeps the forward free of side effects.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mae_backbone import VIT_ARCHS, VisionTransformer
from pretrain.engine import PretrainSteps
from training.data import IMAGENET_MEAN, IMAGENET_STD
from training.loop import MicroBatch
from training.precision import amp_autocast

# the official recipe (ViT-S/B): projection 3 x 4096 -> 256, prediction 2 x 4096 -> 256, tau 0.2, m0 0.99
MOCO_DEFAULTS: dict[str, Any] = dict(proj_hidden=4096, dim=256, pred_hidden=4096, temperature=0.2)
_REJECTED = ("num_classes", "global_pool", "window_size", "global_blocks", "rel_pos", "dense_cls",
             "pos_embed_learnable")


def build_mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """``num_layers`` x (Linear without bias, BN, ReLU); the last layer has no ReLU and, with
    ``last_bn``, a BN without affine parameters (the official ``_build_mlp``).  [N, in] -> [N, out]."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = input_dim if i == 0 else hidden_dim
        d_out = output_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def momentum_at(step: int, total_steps: int, m0: float) -> float:
    """The momentum for the update that follows optimizer step ``step`` - 1 (i.e. before step
    ``step``): ``1 - (1 - m0) * (1 + cos(pi * step / total_steps)) / 2``; m0 at 0, 1 at the end."""
    progress = min(1.0, step / max(total_steps, 1))
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - m0)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries against keys, times ``2 * temperature`` (the official scaling).

    Args:
        q: [N, dim] queries of this process (gradients flow).
        k: [N, dim] keys (no gradient); under ``torch.distributed`` the keys of all processes are
            the negatives, and query i of rank r matches key ``r * N + i``.
    Returns:
        ``cross_entropy(normalize(q) @ normalize(k_all).T / tau, positives) * 2 * tau`` (a scalar).
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    offset = 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.empty_like(k) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, k.contiguous())
        offset = dist.get_rank() * q.shape[0]
        k = torch.cat(gathered)
    logits = q @ k.T / temperature  # [N, N * world]
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


class MoCoV3(nn.Module):
    """MoCo v3 with a ``mae_backbone`` ViT; ``forward(x1, x2)`` -> the symmetric loss.

    Args:
        encoder: ``mae_backbone.VIT_ARCHS`` name of the backbone.
        proj_hidden, dim: hidden and output width of the 3-layer projection MLP.
        pred_hidden: hidden width of the 2-layer prediction MLP (its output is ``dim``).
        temperature: tau of the InfoNCE loss.
        **encoder_overrides: ``VisionTransformer`` arguments (``img_size``, ``patch_size``,
            ``depth``, ``drop_path_rate``, ``grad_checkpointing`` ...).
    """

    def __init__(self, encoder: str = "vit_base_patch16", proj_hidden: int = 4096, dim: int = 256,
                 pred_hidden: int = 4096, temperature: float = 0.2, **encoder_overrides: Any):
        super().__init__()
        if encoder not in VIT_ARCHS:
            raise KeyError(f"unknown encoder {encoder!r}; known: {', '.join(VIT_ARCHS)}")
        bad = sorted(set(encoder_overrides) & set(_REJECTED))
        if bad:
            raise ValueError(f"{', '.join(bad)}: not an option of the pretraining encoder")
        self.encoder_name = encoder
        self.encoder_overrides = dict(encoder_overrides)
        self.proj_hidden, self.dim, self.pred_hidden = proj_hidden, dim, pred_hidden
        self.temperature = temperature
        vit = VisionTransformer(**{**VIT_ARCHS[encoder], **encoder_overrides})  # MAE's init; fixed sin-cos pos
        # frozen random patch projection (the official --stop-grad-conv1): xavier-uniform stays as drawn
        vit.patch_embed.proj.weight.requires_grad_(False)
        vit.patch_embed.proj.bias.requires_grad_(False)
        vit.head = build_mlp(3, vit.embed_dim, proj_hidden, dim)  # the projection MLP, on the class token
        self.base_encoder = vit
        self.predictor = build_mlp(2, dim, pred_hidden, dim, last_bn=False)
        self.momentum_encoder = copy.deepcopy(vit)
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)

    # the backbone's facts, under the names ``pretrain.state.export_encoder`` reads
    embed_dim = property(lambda self: self.base_encoder.embed_dim)
    depth = property(lambda self: self.base_encoder.depth)
    num_heads = property(lambda self: self.base_encoder.num_heads)
    patch_size = property(lambda self: self.base_encoder.patch_size)
    in_chans = property(lambda self: self.base_encoder.in_chans)
    img_size = property(lambda self: self.base_encoder.img_size)
    grid_size = property(lambda self: self.base_encoder.grid_size)

    # ------------------------------------------------------------------ hooks
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone alone (no projection head), loadable by ``create_vit(encoder_name, **overrides)``."""
        return {k: v for k, v in self.base_encoder.state_dict().items() if not k.startswith("head.")}

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this model: ``MoCoV3(**model.config())``."""
        return dict(encoder=self.encoder_name, proj_hidden=self.proj_hidden, dim=self.dim,
                    pred_hidden=self.pred_hidden, temperature=self.temperature, **self.encoder_overrides)

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        """``k = m * k + (1 - m) * q`` for every parameter of backbone + projection (no gradient)."""
        for q, k in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            k.mul_(m).add_(q.detach(), alpha=1.0 - m)

    # ------------------------------------------------------------------ stages
    def forward_query(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> q [N, dim]: backbone (class token) -> projection -> prediction."""
        return self.predictor(self.base_encoder(x))

    @torch.no_grad()
    def forward_key(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> k [N, dim]: momentum backbone -> momentum projection (no gradient)."""
        return self.momentum_encoder(x)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x1, x2: [N, C, H, W], two crops of the same images -> ``ctr(q1, k2) + ctr(q2, k1)``."""
        q1, q2 = self.forward_query(x1), self.forward_query(x2)
        k1, k2 = self.forward_key(x1), self.forward_key(x2)
        return contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)


def create_moco(encoder: str, **kwargs: Any) -> MoCoV3:
    """``MoCoV3(encoder, **kwargs)`` with the official head sizes unless given."""
    return MoCoV3(encoder, **{**MOCO_DEFAULTS, **kwargs})


# --------------------------------------------------------------------------- data
class TwoCrops:
    """Two views of one image: PIL image -> [2, C, H, W] (first from ``first``, second from ``second``)."""

    def __init__(self, first: Callable[[Image.Image], torch.Tensor], second: Callable[[Image.Image], torch.Tensor]):
        self.first, self.second = first, second

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.stack([self.first(img), self.second(img)])


def build_moco_transform(img_size: int) -> TwoCrops:
    """MoCo v3's asymmetric BYOL augmentations (torchvision; all randomness from torch's generator).

    Both crops: RandomResizedCrop(scale 0.08-1), ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8,
    grayscale p 0.2, flip, ToTensor + ImageNet Normalize; Gaussian blur (sigma 0.1-2) with p 1.0 on
    the first crop and 0.1 on the second; solarize (threshold 128) p 0 on the first, 0.2 on the second.
    """
    from torchvision import transforms as T

    kernel = 2 * math.ceil(3 * 2.0) + 1  # covers +-3 sigma of the largest blur, like PIL's GaussianBlur

    def view(blur_p: float, solarize_p: float) -> Callable[[Image.Image], torch.Tensor]:
        ops: list[Any] = [
            T.RandomResizedCrop(img_size, scale=(0.08, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        ]
        if solarize_p:
            ops.append(T.RandomSolarize(128, p=solarize_p))
        ops += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return T.Compose(ops)

    return TwoCrops(view(1.0, 0.0), view(0.1, 0.2))


# --------------------------------------------------------------------------- optimization
def build_moco_optimizer(model: MoCoV3, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW (default betas 0.9 / 0.999) with weight decay on every trained parameter, as the official
    ``main_moco.py``; the frozen patch projection and the momentum encoder are not in it."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass
class MocoStep(PretrainSteps):
    """MoCo v3's ``training.loop.StepRecipe``: the two crops' loss, the lr schedule ``lr_at``, and
    the momentum update after each optimizer step with m from ``momentum_at``."""

    momentum: float  # m0
    total_steps: int

    def micro_batch(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> MicroBatch:
        """``batch["images"]``: [N, 2, C, H, W] from ``TwoCrops``.  A micro-batch left with one
        readable image counts as empty (no negative for InfoNCE, no batch statistics for BN)."""

        def loss() -> torch.Tensor:
            views = batch["images"].to(device, non_blocking=True)
            with amp_autocast(device, self.amp_dtype):
                return model(views[:, 0], views[:, 1])

        n = len(batch["seeds"])
        return (n if n >= 2 else 0), loss

    def after_step(self, model: nn.Module, step: int) -> None:
        moco = model.module if hasattr(model, "module") else model
        moco.update_momentum_encoder(momentum_at(step + 1, self.total_steps, self.momentum))
