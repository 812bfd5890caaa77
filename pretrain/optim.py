"""MAE's optimizer: AdamW (0.9, 0.95) (its lr: ``training.schedule``, base lr x batch / 256,
warmup + cosine), and bf16 working copies of the weights (``LowPrecisionWeights``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mae_backbone import layer_decay_param_groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW(betas=(0.9, 0.95)); no weight decay on norms, biases, tokens and position embeddings.

    The groups come from ``mae_backbone.layer_decay_param_groups`` (no layer decay) with the
    model's ``no_weight_decay()`` names.  The fused kernel is used where torch has one for all
    parameters' devices (CPU, CUDA): same results, fewer passes over memory.
    """
    groups = layer_decay_param_groups(model, weight_decay, layer_decay=1.0)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = devices <= {"cpu", "cuda"} and all(p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


class LowPrecisionWeights:
    """Low-precision working copies of the matmul weights, fp32 master weights in the optimizer.

    Under ``torch.autocast`` every ``Linear`` / ``Conv`` weight is cast to bf16 on every forward
    and its bf16 gradient cast back to fp32 in backward.  This wrapper keeps those weights (and
    biases) in ``dtype`` inside the model instead, so autocast finds them already cast; the
    fp32 masters live here and the optimizer updates them, then writes the rounded copies back
    (one fused pass per step).  Norms, tokens and position embeddings stay fp32 in the model.

    The forward is the one autocast computes from the fp32 weights (the same rounding of the same
    masters), and the optimizer sees the same fp32 gradients, so the training run is unchanged;
    only casts are saved.  Use it with ``torch.autocast(dtype=dtype)`` around the forward.

    It behaves as an optimizer for the training loop: ``step``, ``zero_grad``, ``param_groups``
    (``set_lr`` works), ``state_dict`` / ``load_state_dict`` (the inner optimizer's, over the
    masters).  ``master_state_dict()`` is the model's state dict with the fp32 masters in place
    of the working copies: save that, not ``model.state_dict()``.

    Args:
        model: the model, converted in place.
        build: ``build(model) -> optimizer`` (e.g. ``build_optimizer`` with its lr); it runs on
            the fp32 model before conversion, so groups, names and decay are as without this.
        dtype: the working precision (``torch.bfloat16``).
    """

    def __init__(self, model: nn.Module, build: Any, dtype: torch.dtype = torch.bfloat16):
        self.model = model
        self.dtype = dtype
        self.inner: torch.optim.Optimizer = build(model)
        if len(self.inner.state):
            raise ValueError("LowPrecisionWeights needs a fresh optimizer (this one has state already)")
        names = {id(p): n for n, p in model.named_parameters()}
        self.working: list[nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        self.master_names: dict[str, torch.Tensor] = {}
        swap: dict[int, torch.Tensor] = {}
        for module in model.modules():
            if not isinstance(module, _MATMUL_MODULES):
                continue
            for p in module.parameters(recurse=False):
                if not p.requires_grad or id(p) in swap or not p.is_floating_point():
                    continue
                master = p.detach().clone()
                p.data = p.data.to(dtype)
                swap[id(p)] = master
                self.working.append(p)
                self.masters.append(master)
                self.master_names[names[id(p)]] = master
        for group in self.inner.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Move the working gradients onto the masters (fp32), step, write the rounded copies back."""
        for w, m in zip(self.working, self.masters):
            m.grad = None if w.grad is None else w.grad.to(m.dtype)
        out = self.inner.step(closure)
        torch._foreach_copy_(self.working, self.masters)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for w in self.working:
            if set_to_none:
                w.grad = None
            elif w.grad is not None:
                w.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    @torch.no_grad()
    def load_masters(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Set masters and working copies from an fp32 state dict (after ``model.load_state_dict``)."""
        for name, master in self.master_names.items():
            master.copy_(state_dict[name])
        torch._foreach_copy_(self.working, self.masters)

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the fp32 masters in place of the low-precision copies.

        Like ``state_dict()``, the tensors are the live ones (save or copy them before stepping on).
        """
        sd = self.model.state_dict()
        for name, master in self.master_names.items():
            sd[name] = master.detach()
        return sd


_MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
