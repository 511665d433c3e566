"""Adam and AdamW: torch.optim's update rules (and defaults, group keys) fused with the EMA.

The glue between a group's hyperparameters and the backends' ``adam_ema`` launches; the math is
in ``ema_kernels.backends`` (the reference is the readable one).
"""
from __future__ import annotations

import torch

from .. import scaling
from . import checks
from .base import EMAOptimizer

__all__ = ["AdamW", "Adam"]


class _AdamBase(EMAOptimizer):
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False, ema_decay=0.9999, ema_every=1,
                 ema_schedule=None, kappa=1.0, scale_optimizer=True, stochastic_rounding=False,
                 backend="auto", flatten=False, foreach=None, fused=None, capturable=False,
                 differentiable=False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=bool(amsgrad), maximize=bool(maximize),
                        # saved with the groups so torch.optim.Adam loading our checkpoint
                        # keeps AdamW's decoupled decay (the class decides ours)
                        decoupled_weight_decay=self._decoupled, ema_decay=ema_decay,
                        ema_every=ema_every, ema_schedule=ema_schedule, kappa=kappa,
                        scale_optimizer=bool(scale_optimizer),
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, backend=backend, flatten=flatten, foreach=foreach,
                         fused=fused, capturable=capturable, differentiable=differentiable)

    def _check_update_hparams(self, group, where):
        foreach = group.get("foreach") and not self.capturable
        if foreach and isinstance(group["lr"], torch.Tensor):
            # torch.optim.Adam's refusal, kept so that code written against torch sees it; ours
            # would run it (foreach= changes nothing here)
            raise ValueError(f"lr as a Tensor is not supported for capturable=False and "
                             f"foreach=True — as in torch.optim.{type(self).__name__}; "
                             f"leave foreach unset ({where})")
        checks.finite_number(f"eps ({where})", group["eps"], low=0.0,
                             torch_text="Invalid epsilon value")
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas={betas!r} ({where}) must be a pair (beta1, beta2)")
        tensors = [isinstance(b, torch.Tensor) for b in betas]
        if any(tensors) and not all(tensors):
            raise ValueError(f"betas must be either both floats or both Tensors — got "
                             f"betas={betas!r} ({where}), as torch.optim refuses")
        for i, b in enumerate(betas):
            if foreach and tensors[i]:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for "
                                 f"capturable=False and foreach=True — as in torch.optim."
                                 f"{type(self).__name__}; leave foreach unset ({where})")
        for i, b in enumerate(betas):
            checks.finite_number(f"betas[{i}] ({where})", b, low=0.0, high=1.0,
                                 torch_text=f"Invalid beta parameter at index {i}")

    def _scaled(self, group, kappa):
        if group["scale_optimizer"]:
            return scaling.adam(group["lr"], group["betas"], group["eps"],
                                group["weight_decay"], kappa, decoupled=self._decoupled)
        return {"lr": float(group["lr"]), "betas": tuple(float(b) for b in group["betas"]),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}

    def _roles(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] \
            else ("exp_avg", "exp_avg_sq")

    def _kernel_args(self, group, hp):
        """The one place a group's κ-scaled hyperparameters become the kernels' arguments: the
        record every launch path (tensor lists, StepTable, device scalars) takes. Cached in
        ``hp``, which step() rebuilds whenever a group value changes."""
        args = hp.get("kernel_args")
        if args is None:
            beta1, beta2 = hp["betas"]
            args = hp["kernel_args"] = dict(
                beta1=beta1, beta2=beta2, eps=hp["eps"], weight_decay=hp["weight_decay"],
                decoupled=self._decoupled, maximize=bool(group["maximize"]))
        return args

    @staticmethod
    def _bias_corrections(args, lr, step):
        """``(step_size, bias_correction2_sqrt)`` of a host-counted step, as torch.optim.Adam
        forms them (host doubles)."""
        return lr / (1.0 - args["beta1"] ** step), (1.0 - args["beta2"] ** step) ** 0.5

    def _update(self, backend, group, hp, params, grads, state, emas, step, ema_weight,
                grad_scale, found_inf, sr=None):
        args = self._kernel_args(group, hp)
        step_size, bc2_sqrt = self._bias_corrections(args, hp["lr"], step)
        backend.adam_ema(
            params, grads, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
            emas if ema_weight is not None else None, lr=hp["lr"], **args,
            step_size=step_size, bias_correction2_sqrt=bc2_sqrt, ema_weight=ema_weight,
            grad_scale=grad_scale, found_inf=found_inf, **checks.sr_kwargs(sr))

    def _update_table(self, backend, ts, group, hp, step, ema_weight, grad_scale, found_inf,
                      sr_seed):
        args = self._kernel_args(group, hp)
        step_size, bc2_sqrt = self._bias_corrections(args, hp["lr"], step)
        amsgrad = bool(group["amsgrad"])
        if backend.NAME == "triton":  # (a module attribute: no call into the table)
            backend.adam_ema_table(
                ts.table, ts.dtype, ts.device, amsgrad=amsgrad, lr=hp["lr"], **args,
                step_size=step_size, bias_correction2_sqrt=bc2_sqrt, ema_weight=ema_weight,
                grad_scale=grad_scale, found_inf=found_inf, sr_seed=sr_seed, sr_step=step)
            return
        ts.table.adam(hp["lr"], args["beta1"], args["beta2"], args["eps"],
                      args["weight_decay"], args["decoupled"], args["maximize"], amsgrad,
                      step_size, bc2_sqrt, ema_weight or (), grad_scale, found_inf, sr_seed,
                      step)

    def _update_capturable_table(self, ts, group, hp, lr, step, ema_weight, grad_scale,
                                 found_inf):
        args = self._kernel_args(group, hp)
        ts.table.adam_capturable(lr, step, ema_weight, args["beta1"], args["beta2"],
                                 args["eps"], args["weight_decay"], args["decoupled"],
                                 args["maximize"], bool(group["amsgrad"]), grad_scale,
                                 found_inf)

    def _update_capturable(self, backend, group, hp, ts, params, grads, state, emas, ema_weight,
                           grad_scale, found_inf, lr, step, sr=None):
        backend.adam_ema_capturable(
            params, grads, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
            emas, lr=lr, step=step, **self._kernel_args(group, hp), ema_weight=ema_weight,
            grad_scale=grad_scale, found_inf=found_inf, **checks.sr_kwargs(sr))


class AdamW(_AdamBase):
    """torch.optim.AdamW (decoupled weight decay) fused with an EMA of the weights.

    Same math, defaults and group keys as ``torch.optim.AdamW``, plus:

    - ``ema_decay`` ρ at the base batch in [0, 1] (``None`` in a group: no EMA for it), or a
      tuple of them: up to four EMAs, all updated in the step's one pass (``ema_parameters``,
      ``swap_ema`` and ``ema_module`` take ``index=``),
    - ``ema_every`` k: update the EMA every k-th step with ρ raised to the base steps covered,
    - ``ema_schedule`` callable ``s -> ρ(s)`` (see :mod:`ema_kernels.schedules`), or a tuple
      of them (element by element, a schedule overrides ``ema_decay`` at its index),
    - ``kappa`` κ: batch-size scale; the EMA uses ρ^κ per step and, with
      ``scale_optimizer=True``, lr·√κ, β → 1 − κ(1 − β), ε/√κ, weight decay·√κ,
    - ``backend``: ``"auto" | "reference" | "triton" | "cuda" | "cpp"``,
    - ``flatten``: False (default) leaves parameters in their own storage; True packs them
      into one flat buffer per (device, dtype) (see docs/layout_and_checkpoints.md, "flatten=True"),
    - ``stochastic_rounding``: round bf16/fp16 parameters stochastically (unbiased) instead of
      to nearest, from random bits that are a pure function of (the group's ``sr_seed``, step,
      element index); fp32 parameters ignore it (see docs/rounding_and_clipping.md).
    """
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, **kwargs)


class Adam(_AdamBase):
    """torch.optim.Adam (L2 weight decay added to the gradient) fused with an EMA of the
    weights; see :class:`AdamW` for the EMA and scaling keywords. ``decoupled_weight_decay=True``
    makes it AdamW, as in torch."""
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, decoupled_weight_decay=False, **kwargs):
        self._decoupled = bool(decoupled_weight_decay)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, **kwargs)
