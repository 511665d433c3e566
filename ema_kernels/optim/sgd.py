"""SGD: torch.optim.SGD's update (momentum, dampening, Nesterov, weight decay) fused with the
EMA; the glue to the backends' ``sgd_ema`` launches.
"""
from __future__ import annotations

from .. import scaling
from . import checks
from .base import EMAOptimizer

__all__ = ["SGD"]


class SGD(EMAOptimizer):
    """torch.optim.SGD (momentum, dampening, Nesterov, weight decay, maximize) fused with an EMA
    of the weights. With ``scale_optimizer=True`` the learning rate scales linearly, lr·κ; see
    :class:`AdamW` for the EMA and scaling keywords."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, ema_decay=0.9999, ema_every=1,
                 ema_schedule=None, kappa=1.0, scale_optimizer=True, stochastic_rounding=False,
                 backend="auto", flatten=False, foreach=None, fused=None, capturable=False,
                 differentiable=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=bool(nesterov),
                        maximize=bool(maximize), ema_decay=ema_decay, ema_every=ema_every,
                        ema_schedule=ema_schedule, kappa=kappa,
                        scale_optimizer=bool(scale_optimizer),
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, backend=backend, flatten=flatten, foreach=foreach,
                         fused=fused, capturable=capturable, differentiable=differentiable)

    def _check_update_hparams(self, group, where):
        momentum = checks.finite_number(f"momentum ({where})", group["momentum"], low=0.0,
                                        torch_text="Invalid momentum value")
        dampening = checks.finite_number(f"dampening ({where})", group["dampening"])
        if self.capturable and momentum != 0 and dampening != 0:
            raise ValueError(
                f"capturable=True SGD ({where}) needs dampening=0 (got {group['dampening']!r}): "
                f"torch initialises the momentum buffer undampened on the first applied step, "
                f"and under capturable=True which step that is (found_inf) is known only on "
                f"the device. Use dampening=0 or capturable=False")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Nesterov momentum requires a momentum and zero dampening — "
                             f"nesterov=True ({where}) requires momentum > 0 and dampening = 0 "
                             f"(got momentum={group['momentum']!r}, "
                             f"dampening={group['dampening']!r})")

    def _scaled(self, group, kappa):
        lr = scaling.sgd(group["lr"], kappa)["lr"] if group["scale_optimizer"] \
            else float(group["lr"])
        return {"lr": lr, "momentum": float(group["momentum"]),
                "dampening": float(group["dampening"]),
                "weight_decay": float(group["weight_decay"])}

    def _roles(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _unsaved_before_first_step(self, group):
        # torch.optim.SGD treats any saved momentum_buffer as initialised, and its first step
        # sets it to g. Our zero buffer of a parameter that never stepped gives the same g
        # after momentum·0 + (1 − dampening)·g only when dampening is 0; otherwise it is left
        # out of the state dict (as torch's holds none), so torch continues it exactly.
        if group["momentum"] != 0 and group["dampening"] != 0:
            return ("momentum_buffer",)
        return ()

    def _kernel_args(self, group, hp):
        """The one place a group's κ-scaled hyperparameters become the kernels' arguments (see
        :meth:`.adam._AdamBase._kernel_args`); lr and ``first_step`` are per launch."""
        args = hp.get("kernel_args")
        if args is None:
            args = hp["kernel_args"] = dict(
                momentum=hp["momentum"], dampening=hp["dampening"],
                weight_decay=hp["weight_decay"], nesterov=bool(group["nesterov"]),
                maximize=bool(group["maximize"]))
        return args

    def _update(self, backend, group, hp, params, grads, state, emas, step, ema_weight,
                grad_scale, found_inf, sr=None):
        backend.sgd_ema(
            params, grads, state.get("momentum_buffer"), emas if ema_weight is not None else None,
            lr=hp["lr"], **self._kernel_args(group, hp), first_step=(step == 1),
            ema_weight=ema_weight, grad_scale=grad_scale, found_inf=found_inf,
            **checks.sr_kwargs(sr))

    def _update_table(self, backend, ts, group, hp, step, ema_weight, grad_scale, found_inf,
                      sr_seed):
        args = self._kernel_args(group, hp)
        if backend.NAME == "triton":  # (a module attribute: no call into the table)
            backend.sgd_ema_table(
                ts.table, ts.dtype, ts.device, lr=hp["lr"], **args, first_step=step == 1,
                ema_weight=ema_weight, grad_scale=grad_scale, found_inf=found_inf,
                sr_seed=sr_seed, sr_step=step)
            return
        ts.table.sgd(hp["lr"], args["momentum"], args["dampening"], args["weight_decay"],
                     args["nesterov"], args["maximize"], step == 1, ema_weight or (),
                     grad_scale, found_inf, sr_seed, step)

    def _update_capturable_table(self, ts, group, hp, lr, step, ema_weight, grad_scale,
                                 found_inf):
        args = self._kernel_args(group, hp)  # never a first step: see _update_capturable
        ts.table.sgd_capturable(lr, ema_weight, args["momentum"], args["dampening"],
                                args["weight_decay"], args["nesterov"], args["maximize"],
                                grad_scale, found_inf)

    def _update_capturable(self, backend, group, hp, ts, params, grads, state, emas, ema_weight,
                           grad_scale, found_inf, lr, step, sr=None):
        backend.sgd_ema_capturable(
            params, grads, state.get("momentum_buffer"), emas, lr=lr,
            **self._kernel_args(group, hp),
            # capturable=True: never first_step: which step is the first *applied* one is
            # known only on the device (found_inf). With dampening 0 (enforced) a zero buffer
            # updated as momentum·0 + d is exactly torch's first-step buf = d. A host-counted
            # step with a tensor lr knows it (hp["first_step"]).
            first_step=hp.get("first_step", False),
            ema_weight=ema_weight, grad_scale=grad_scale, found_inf=found_inf,
            **checks.sr_kwargs(sr))
