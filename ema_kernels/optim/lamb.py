"""LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
ICLR 2020) fused with the EMA; the glue to the backends' ``lamb_moments`` / ``lamb_ema``.

Per parameter tensor, with Adam's bias-corrected moments::

    m ← β1 m + (1−β1) g      v ← β2 v + (1−β2) g²
    r = m̂ / (√v̂ + ε) + λθ    θ ← θ − lr·(‖θ‖/‖r‖)·r     (ratio 1 where either norm is 0)

The ratio applies to every tensor (the paper; apex's FusedLAMB and timm's Lamb apply it only
where weight_decay ≠ 0 unless ``use_nvlamb``/``always_adapt``). ‖r‖ needs the new moments, so the
step is two passes, as apex's two-kernel FusedLAMB: pass 1 reads θ g m v, writes m v and sums
θ² and r² per tensor (24 B per fp32 parameter); pass 2 reads θ m v ζ and writes θ ζ, r
recomputed bit for bit (24 B with one EMA): 48 B. A foreach implementation (r in temporaries,
foreach norms, then ``_foreach_lerp_``) moves 12 + 24 (moments) + 56 (r: m/bc, √v, /bc, +ε, ÷,
+λθ) + 8 (norms of θ and r) + 20 (θ −= lr·ratio·r) + 12 (lerp) = 132 B (docs/optimizers.md,
which has the measured times).

Kernels: ``cpp`` and ``cuda`` fuse each pass (csrc/fused_math.h ``lamb_moments_update`` and
``lamb_ema_element``, r from the one ``lamb_direction``); the per-tensor sums are accumulated in
float64 by every backend (CUDA: one atomicAdd per thread and sum) and returned as float32.
Measured (``bench``, 2-core CPU VM, fp32, 4M parameters in 16 tensors, one EMA): cpp 5.63 ms,
4.5× the foreach implementation + ``_foreach_lerp_``, 62 % of an in-place stream of the same
48 B.

State: ``exp_avg``, ``exp_avg_sq``, ``step`` (apex/timm/torch-optimizer's LAMB keys).
"""
from __future__ import annotations

import torch

from .. import scaling
from . import checks, norms
from .rule_base import RuleOptimizer

__all__ = ["LAMB"]


class LAMB(RuleOptimizer):
    """LAMB (You et al. 2020: Adam's bias-corrected direction plus decoupled weight decay,
    scaled per tensor by the trust ratio ‖θ‖/‖r‖) fused with an EMA of the weights.

    ``bias_correction=False`` uses m and v as they are. The EMA keywords are
    :class:`~ema_kernels.AdamW`'s. With ``scale_optimizer=True``, κ applies Adam's square-root
    rule with AdamW's weight decay (lr·√κ, β → 1 − κ(1 − β), ε/√κ, λ·√κ;
    :func:`ema_kernels.scaling.lamb`).
    """

    _BACKEND_OP = "lamb_ema"
    _PER_TENSOR = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 bias_correction=True, *, maximize=False, ema_decay=0.9999, ema_every=1,
                 ema_schedule=None, kappa=1.0, scale_optimizer=True, stochastic_rounding=False,
                 backend="auto", flatten=False, foreach=None, fused=None, capturable=False,
                 differentiable=False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bool(bias_correction), maximize=bool(maximize),
                        ema_decay=ema_decay, ema_every=ema_every, ema_schedule=ema_schedule,
                        kappa=kappa, scale_optimizer=bool(scale_optimizer),
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, backend=backend, flatten=flatten, foreach=foreach,
                         fused=fused, capturable=capturable, differentiable=differentiable)

    def _check_update_hparams(self, group, where):
        checks.finite_number(f"eps ({where})", group["eps"], low=0.0)
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas={betas!r} ({where}) must be a pair (beta1, beta2)")
        for i, b in enumerate(betas):
            checks.finite_number(f"betas[{i}] ({where})", b, low=0.0, high=1.0)

    def _scaled(self, group, kappa):
        if group["scale_optimizer"]:
            return scaling.lamb(group["lr"], group["betas"], group["eps"],
                                group["weight_decay"], kappa)
        return {"lr": float(group["lr"]), "betas": tuple(float(b) for b in group["betas"]),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}

    def _roles(self, group):
        return ("exp_avg", "exp_avg_sq")

    def _kernel_args(self, group, hp):
        """The one place a group's κ-scaled hyperparameters become the kernels' arguments."""
        args = hp.get("kernel_args")
        if args is None:
            beta1, beta2 = hp["betas"]
            args = hp["kernel_args"] = dict(
                beta1=beta1, beta2=beta2, eps=hp["eps"], weight_decay=hp["weight_decay"],
                maximize=bool(group["maximize"]), bias_correction=bool(group["bias_correction"]))
        return args

    @staticmethod
    def _bias_corrections(args, step):
        """``(1 − β1^t, √(1 − β2^t))`` in double: host numbers for a host count, device scalars
        for a device count (capturable), as Adam's kernels form them."""
        if not args["bias_correction"]:
            return 1.0, 1.0
        b1, b2 = args["beta1"], args["beta2"]
        if isinstance(step, torch.Tensor):
            t = step.double()
            return 1.0 - torch.pow(b1, t), torch.sqrt(1.0 - torch.pow(b2, t))
        return 1.0 - b1 ** step, (1.0 - b2 ** step) ** 0.5

    def _launch(self, backend, group, hp, params, grads, state, emas, ema_weight, grad_scale,
                found_inf, lr, step, *, first_step, sr):
        args = self._kernel_args(group, hp)
        bc1, bc2_sqrt = self._bias_corrections(args, step)
        ms, vs = state["exp_avg"], state["exp_avg_sq"]
        common = dict(eps=args["eps"], weight_decay=args["weight_decay"],
                      bias_correction1=bc1, bias_correction2_sqrt=bc2_sqrt)
        sums = backend.lamb_moments(params, grads, ms, vs, beta1=args["beta1"],
                                    beta2=args["beta2"], maximize=args["maximize"], **common,
                                    grad_scale=grad_scale, found_inf=found_inf)
        step_sizes = norms.lamb_step_sizes(sums, lr, self._domain)
        backend.lamb_ema(params, ms, vs, emas, step_sizes=step_sizes, **common,
                         ema_weight=ema_weight, found_inf=found_inf, **checks.sr_kwargs(sr))
