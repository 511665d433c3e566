"""LARS: Lightning Bolts' LARS (the layer-wise trust ratio on SGD with momentum) fused with the
EMA; the glue between a group's hyperparameters and the backends' ``lars_ema`` launches.

Per parameter tensor, where ``weight_decay != 0`` and ‖θ‖ ≠ 0 and ‖g‖ ≠ 0 (You et al. 2017,
as ``pl_bolts.optimizers.LARS``, the optimizer of BYOL/SimCLR reproductions)::

    ratio = η·‖θ‖ / (‖g‖ + λ‖θ‖ + ε)      d = ratio·(g + λθ)

elsewhere ``d = g``; then torch.optim.SGD's momentum/dampening/Nesterov on ``d`` and
``θ -= lr·d``. Groups with ``weight_decay=0`` (biases and norm layers, excluded as BYOL does) are
plain SGD with momentum: their launch is ``sgd_ema``, without the norm pass.

Bytes per parameter (fp32, one EMA, weight decay ≠ 0): the norm pass reads θ and g (8, one
``torch._foreach_norm`` each), the fused pass reads θ g buf ζ and writes θ buf ζ (28): 36 B.
A foreach implementation + ``_foreach_lerp_`` moves 8 (norms) + 12 (g + λθ, in a temporary) +
8 (·ratio) + 8 + 12 (momentum: mul_, add_) + 12 (θ update) + 12 (lerp) = 72 B
(docs/optimizers.md, which has the measured times).

Kernels: ``cpp`` and ``cuda`` fuse the pass (csrc/fused_math.h ``lars_update``: SGD's momentum
step on ``d = ratio·(g + λθ)``, the tensor's (ratio, λ) read once per span from the (n, 2)
``coefs`` of :func:`.norms.lars_coefs`); the reference is the oracle. Measured (``bench``, 2-core
CPU VM, fp32, 4M parameters in 16 tensors, one EMA): cpp 3.91 ms, 3.6× the foreach
implementation + ``_foreach_lerp_``, 66 % of an in-place stream of the same 36 B.
"""
from __future__ import annotations

from .. import scaling
from . import checks, norms
from .rule_base import RuleOptimizer
from .sgd import SGD

__all__ = ["LARS"]


class LARS(RuleOptimizer):
    """Lightning Bolts' LARS (layer-wise adaptive rate scaling on SGD with momentum) fused with
    an EMA of the weights.

    Math, defaults and state (``momentum_buffer``, plus ``step``) as ``pl_bolts.optimizers.LARS``
    (see the module docstring); ``trust_coefficient`` is η. The EMA keywords (``ema_decay``,
    ``ema_every``, ``ema_schedule``, ``kappa``, ``stochastic_rounding``, ``backend``,
    ``flatten``, ``capturable``) are :class:`~ema_kernels.AdamW`'s. With
    ``scale_optimizer=True``, κ scales lr linearly (SGD's rule, :func:`ema_kernels.scaling.lars`).
    """

    _BACKEND_OP = "lars_ema"
    _PER_TENSOR = True

    def __init__(self, params, lr, momentum=0.9, dampening=0.0, weight_decay=0.0,
                 nesterov=False, trust_coefficient=0.001, eps=1e-8, *, maximize=False,
                 ema_decay=0.9999, ema_every=1, ema_schedule=None, kappa=1.0,
                 scale_optimizer=True, stochastic_rounding=False, backend="auto", flatten=False,
                 foreach=None, fused=None, capturable=False, differentiable=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=bool(nesterov),
                        trust_coefficient=trust_coefficient, eps=eps, maximize=bool(maximize),
                        ema_decay=ema_decay, ema_every=ema_every, ema_schedule=ema_schedule,
                        kappa=kappa, scale_optimizer=bool(scale_optimizer),
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, backend=backend, flatten=flatten, foreach=foreach,
                         fused=fused, capturable=capturable, differentiable=differentiable)

    def _check_update_hparams(self, group, where):
        SGD._check_update_hparams(self, group, where)  # momentum, dampening, Nesterov
        checks.finite_number(f"trust_coefficient ({where})", group["trust_coefficient"],
                             low=0.0)
        checks.finite_number(f"eps ({where})", group["eps"], low=0.0)

    def _scaled(self, group, kappa):
        lr = scaling.lars(group["lr"], kappa)["lr"] if group["scale_optimizer"] \
            else float(group["lr"])
        return {"lr": lr, "momentum": float(group["momentum"]),
                "dampening": float(group["dampening"]),
                "weight_decay": float(group["weight_decay"]),
                "trust_coefficient": float(group["trust_coefficient"]),
                "eps": float(group["eps"])}

    def _roles(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _kernel_args(self, group, hp):
        """The one place a group's κ-scaled hyperparameters become the kernels' arguments."""
        args = hp.get("kernel_args")
        if args is None:
            args = hp["kernel_args"] = dict(
                momentum=hp["momentum"], dampening=hp["dampening"],
                nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))
        return args

    def _launch(self, backend, group, hp, params, grads, state, emas, ema_weight, grad_scale,
                found_inf, lr, step, *, first_step, sr):
        args = self._kernel_args(group, hp)
        bufs = state.get("momentum_buffer")
        if hp["weight_decay"] == 0:  # Bolts: no trust ratio without weight decay
            backend.sgd_ema(params, grads, bufs, emas, lr=lr, **args, weight_decay=0.0,
                            first_step=first_step, ema_weight=ema_weight,
                            grad_scale=grad_scale, found_inf=found_inf, **checks.sr_kwargs(sr))
            return
        coefs = norms.lars_coefs(params, grads, weight_decay=hp["weight_decay"],
                                 trust_coefficient=hp["trust_coefficient"], eps=hp["eps"],
                                 grad_scale=grad_scale, domain=self._domain)
        backend.lars_ema(params, grads, bufs, emas, coefs=coefs, lr=lr, **args,
                         first_step=first_step, ema_weight=ema_weight, grad_scale=grad_scale,
                         found_inf=found_inf, **checks.sr_kwargs(sr))
