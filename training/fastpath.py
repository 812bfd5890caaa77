"""The fast training step every trainer runs by default: bf16 working weights and ``torch.compile``.

- ``WorkingWeights``: under bf16 autocast every ``Linear`` / ``Conv`` weight is cast to bf16 on
  each forward and its gradient cast back in backward (on a 2-core CPU these casts were 18 % of a
  ViT-B MAE step).  ``WorkingWeights(model)`` keeps bf16 copies of those (trainable) weights and
  biases and runs the model's forward on them (``torch.func.functional_call``); the model itself
  keeps its fp32 parameters, which stay the master weights the optimizer updates.  So everything
  that reads the model (checkpoints, exports, the EMA, evaluation, the non-finite checks) sees the
  fp32 masters, and the optimizer state is the plain one.  The training loop moves each
  micro-batch's gradients onto the masters (``grads_to_masters``: fp32, accumulated in fp32, so
  clipping and the non-finite guard see the fp32 gradients) and writes the rounded masters back
  after each optimizer step (``refresh``).  The forward is the one autocast computes from the
  masters (the same rounding of the same weights) and the masters get the same gradients: a run
  is the plain bf16-autocast run, minus the casts.
- ``fused_adamw``: AdamW with the fused kernel (both recipes' optimizer).
- ``maybe_compile``: ``torch.compile`` of the model the step calls, with a clean fallback to eager
  (one warning) when compiling fails.
- ``FastPath`` / ``fast_path``: what a run uses, chosen from ``--precision``, ``--working-weights``
  and ``--compile`` on the device (working weights in single-process runs), and the start-up line
  that says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
COMPILE_CHOICES = ("auto", "on", "off")


class WorkingWeights(nn.Module):
    """Low-precision working copies of a model's matmul weights; the model keeps the fp32 masters.

    Calling it calls ``model`` with the working copies in place of the masters (use it under
    ``torch.autocast(dtype=dtype)``).  Its parameters are exactly the tensors the forward uses (the
    working copies and the model's other parameters) and its buffers the model's, so
    ``DistributedDataParallel`` could wrap it; it would all-reduce bf16 gradients, though, which is
    why ``fast_path`` keeps working weights to single-process runs.

    Args:
        model: the fp32 model; not changed (not even registered as a submodule).
        dtype: the working precision.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        object.__setattr__(self, "model", model)  # outside the module tree: not a DDP parameter
        self.dtype = dtype
        names, masters, seen = [], [], set()
        for prefix, module in model.named_modules():
            if not isinstance(module, MATMUL_MODULES):
                continue
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad and p.is_floating_point() and id(p) not in seen:
                    seen.add(id(p))
                    names.append(f"{prefix}.{pname}" if prefix else pname)
                    masters.append(p)
        self.names: list[str] = names
        self.masters: list[nn.Parameter] = masters
        self.working = nn.ParameterList([nn.Parameter(p.detach().to(dtype)) for p in masters])
        self.shared = nn.ParameterList([p for p in model.parameters() if id(p) not in seen])
        for i, buf in enumerate(model.buffers()):
            self.register_buffer(f"model_buffer_{i}", buf, persistent=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = dict(zip(self.names, self.working))
        return torch.func.functional_call(self.model, params, args, kwargs, tie_weights=False, strict=False)

    def train(self, mode: bool = True) -> "WorkingWeights":
        super().train(mode)
        self.model.train(mode)  # the model's own train() (a classifier keeps frozen parts in eval)
        return self

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """Add the working copies' gradients (cast to fp32) to the masters' and drop them."""
        for w, m in zip(self.working, self.masters):
            if w.grad is None:
                continue
            if m.grad is None:
                m.grad = w.grad.to(m.dtype)
            else:
                m.grad.add_(w.grad)
            w.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Write the masters, rounded to ``dtype``, into the working copies (after a step or a load)."""
        if self.masters:
            torch._foreach_copy_(list(self.working), self.masters)


def fused_adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``groups``, with the fused kernel where torch has one for all the
    parameters' devices (CPU, CUDA): the same update, fewer passes over memory."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and {p.device.type for p in params} <= {"cpu", "cuda"} and all(
        p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


class _CompileFallback(nn.Module):
    """Calls the compiled module; when compiling fails, warns once and calls the eager one from then on."""

    def __init__(self, module: nn.Module, compiled: Any):
        super().__init__()
        self.module = module
        object.__setattr__(self, "compiled", compiled)
        self.failed = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                self.failed = True
                logger.warning("compile: torch.compile failed (%s: %s); running eager from now on",
                               type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return self.module(*args, **kwargs)


def maybe_compile(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` behind a fallback to eager (compilation happens at the first call)."""
    try:
        compiled = torch.compile(module)
    except Exception as exc:  # noqa: BLE001
        logger.warning("compile: torch.compile is not available (%s); running eager", exc)
        return module
    return _CompileFallback(module, compiled)


COMPILE_MIN_STEPS = 1000  # CPU: a bf16 run this long repays the compilation (see ``resolve_compile``)


def resolve_compile(choice: str, device: torch.device, precision: str = "fp32", total_steps: int = 0,
                    cpu_measured: bool = False) -> bool:
    """Whether to compile: ``on`` / ``off`` as given; ``auto`` where it pays.

    ``auto`` is on with CUDA.  On the CPU it was measured (2-core machine, batch 8) for the ViT-B
    MAE step: bf16 ~10 % faster compiled, fp32 no faster, 1.5-3 minutes to compile, which only a
    long run repays; so ``auto`` compiles a bf16 run of at least ``COMPILE_MIN_STEPS`` optimizer
    steps there, for a step so measured (``cpu_measured``: the MAE's).  The ViT-B fine-tuning step
    ran out of memory compiling on that machine (23 GB), so it is not.
    """
    if choice != "auto":
        return choice == "on"
    if device.type == "cuda":
        return True
    return cpu_measured and precision == "bf16" and total_steps >= COMPILE_MIN_STEPS


@dataclass
class FastPath:
    """What a run's step uses: ``step_model`` (what the loop calls; not wrapped in DDP yet) and
    ``working`` (the bf16 working weights, or None)."""

    step_model: nn.Module
    working: WorkingWeights | None
    precision: str  # fp32 / bf16 / fp16, resolved
    compiled: bool
    note: str = ""  # why the working weights are off although asked for

    def describe(self) -> str:
        """The start-up line, e.g. ``precision: bf16 autocast + bf16 working weights (fp32 masters), compile: off``."""
        what = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + grad scaler"}[self.precision]
        if self.working is not None:
            what += " + bf16 working weights (fp32 masters)"
        elif self.note:
            what += f" ({self.note})"
        return f"precision: {what}, compile: {'on' if self.compiled else 'off'}"


def fast_path(model: nn.Module, precision: str, device: torch.device, working_weights: bool = True,
              compile: str = "auto", total_steps: int = 0, distributed: bool = False,
              cpu_measured: bool = False) -> FastPath:
    """The step model a run of ``total_steps`` optimizer steps uses for ``model``: bf16 working
    weights when ``precision`` is bf16 and ``working_weights`` is on (the model must be on its
    device, its weights loaded), compiled when ``resolve_compile``.

    Working weights are for single-process runs: under DDP the gradients would be all-reduced in
    bf16 (autocast reduces them in fp32), so a ``distributed`` run keeps plain autocast and says so.
    """
    note = ""
    if precision == "bf16" and working_weights and distributed:
        working_weights, note = False, "working weights: single-process runs only"
    working = WorkingWeights(model) if precision == "bf16" and working_weights else None
    step_model: nn.Module = working if working is not None else model
    compiled = resolve_compile(compile, device, precision, total_steps, cpu_measured)
    if compiled:
        step_model = maybe_compile(step_model)
    return FastPath(step_model, working, precision, compiled, note)
