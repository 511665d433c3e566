"""Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023) fused with
the EMA; the glue to the backends' ``lion_ema`` launch::

    c = β1 m + (1−β1) g      θ ← θ(1 − lr·λ) − lr·sign(c)      m ← β2 m + (1−β2) g

One pass: fp32 with one EMA reads θ g m ζ and writes θ m ζ, 28 B per parameter, against a
foreach implementation + ``_foreach_lerp_``'s 8 (decay) + 20 (c = β1·m + (1−β1)·g in a
temporary) + 8 (sign) + 12 (θ update) + 20 (m) + 12 (lerp) = 80 B (docs/optimizers.md).
State: ``exp_avg`` (lucidrains/lion-pytorch's key), plus ``step``.
"""
from __future__ import annotations

from .. import scaling
from . import checks
from .rule_base import RuleOptimizer

__all__ = ["Lion"]


class Lion(RuleOptimizer):
    """Lion (sign of an interpolated momentum, decoupled weight decay) fused with an EMA of the
    weights; math, defaults and state as lucidrains' ``lion_pytorch.Lion``.

    The EMA keywords are :class:`~ema_kernels.AdamW`'s. Lion has no established batch-size
    scaling rule: ``kappa != 1`` needs ``scale_optimizer=False`` (then κ scales the EMA alone,
    ρ → ρ^κ) and raises ``ValueError`` otherwise.
    """

    _BACKEND_OP = "lion_ema"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 ema_decay=0.9999, ema_every=1, ema_schedule=None, kappa=1.0,
                 scale_optimizer=True, stochastic_rounding=False, backend="auto", flatten=False,
                 foreach=None, fused=None, capturable=False, differentiable=False):
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                        maximize=bool(maximize), ema_decay=ema_decay, ema_every=ema_every,
                        ema_schedule=ema_schedule, kappa=kappa,
                        scale_optimizer=bool(scale_optimizer),
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, backend=backend, flatten=flatten, foreach=foreach,
                         fused=fused, capturable=capturable, differentiable=differentiable)

    def _check_update_hparams(self, group, where):
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas={betas!r} ({where}) must be a pair (beta1, beta2)")
        for i, b in enumerate(betas):
            checks.finite_number(f"betas[{i}] ({where})", b, low=0.0, high=1.0)

    def _scaled(self, group, kappa):
        if group["scale_optimizer"]:
            return scaling.lion(group["lr"], group["betas"], group["weight_decay"], kappa)
        return {"lr": float(group["lr"]), "betas": tuple(float(b) for b in group["betas"]),
                "weight_decay": float(group["weight_decay"])}

    def _roles(self, group):
        return ("exp_avg",)

    def _kernel_args(self, group, hp):
        """The one place a group's hyperparameters become the kernels' arguments."""
        args = hp.get("kernel_args")
        if args is None:
            beta1, beta2 = hp["betas"]
            args = hp["kernel_args"] = dict(beta1=beta1, beta2=beta2,
                                            weight_decay=hp["weight_decay"],
                                            maximize=bool(group["maximize"]))
        return args

    def _launch(self, backend, group, hp, params, grads, state, emas, ema_weight, grad_scale,
                found_inf, lr, step, *, first_step, sr):
        backend.lion_ema(params, grads, state["exp_avg"], emas, lr=lr,
                         **self._kernel_args(group, hp), ema_weight=ema_weight,
                         grad_scale=grad_scale, found_inf=found_inf, **checks.sr_kwargs(sr))
