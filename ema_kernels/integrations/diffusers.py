"""diffusers' ``EMAModel`` as an ema_kernels schedule: the same decay at every step.

diffusers' training scripts keep the EMA in ``EMAModel(unet.parameters(), decay=...,
use_ema_warmup=..., inv_gamma=..., power=..., foreach=True)`` and call ``ema.step(params)``
after each optimizer step, with ``store``/``copy_to``/``restore`` around evaluation. With an
ema_kernels optimizer the EMA is updated inside the optimizer's step instead::

    from ema_kernels.integrations.diffusers import ema_schedule
    opt = ek.AdamW(unet.parameters(), lr=1e-4,
                   ema_schedule=ema_schedule(decay=0.9999, use_ema_warmup=True,
                                             inv_gamma=1.0, power=3 / 4))
    with opt.swap_ema():            # in place of ema.store(); ema.copy_to(); ...; ema.restore()
        pipeline(...)
    ema_unet = opt.ema_module(unet)  # in place of a second model holding ema.shadow_params

``ema_schedule`` takes ``EMAModel``'s arguments and returns the schedule whose decay at the n-th
optimizer step (``schedule.decay(n − 1, n)``, κ = 1) is ``EMAModel.get_decay(n)``, bit for bit:
diffusers counts ``optimization_step`` from 1 and its ``get_decay`` uses
``step = optimization_step − update_after_step − 1``, ema_kernels' n-th step covers the base
steps [n − 1, n) and uses ρ(n − 1); both start from a copy of the parameters (decay 0 at the
first step). This module does not import diffusers.
"""
from __future__ import annotations

import math

from .. import schedules
from ..scaling import check_rho

__all__ = ["ema_schedule", "from_ema_model", "DiffusersDefault"]


class DiffusersDefault(schedules._CellProduct):
    """``EMAModel(use_ema_warmup=False)``'s decay: with t = s − update_after_step, ρ(s) = 0 for
    t ≤ 0, else max(min((1 + t)/(10 + t), decay), min_decay)."""

    _fields = ("decay", "min_decay", "update_after_step")

    def __init__(self, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: float = 0):
        self.decay_value = check_rho(decay, "DiffusersDefault(decay)")
        self.min_decay = check_rho(min_decay, "DiffusersDefault(min_decay)")
        u = schedules._real("update_after_step", update_after_step, "it must be a number >= 0")
        if u < 0:
            raise ValueError(f"update_after_step={update_after_step!r} must be >= 0")
        self.update_after_step = u

    # `decay` is the schedule's method (the product over an interval): the argument is kept as
    # decay_value, shown as `decay` in repr and equality
    def _params(self):
        return (("decay", self.decay_value), ("min_decay", self.min_decay),
                ("update_after_step", self.update_after_step))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._params())
        return f"ema_kernels.integrations.diffusers.DiffusersDefault({args})"

    def __call__(self, s: float) -> float:
        t = float(s) - self.update_after_step
        if t <= 0:
            return 0.0
        return max(min((1 + t) / (10 + t), self.decay_value), self.min_decay)

    def _flat_from(self) -> float:
        d = self.decay_value
        if d >= 1.0:
            return math.inf
        # (1 + t)/(10 + t) >= d  <=>  t >= (10d − 1)/(1 − d); +1 guards the rounding
        return math.ceil(self.update_after_step + max(0.0, (10 * d - 1) / (1 - d))) + 1.0


def ema_schedule(decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3):
    """The ema_kernels schedule equal to ``EMAModel(..., same arguments).get_decay`` at every
    step (defaults are EMAModel's). ``use_ema_warmup=True``: ``schedules.warmup(decay,
    inv_gamma, power, delay=update_after_step, min_rho=min_decay)``; otherwise
    :class:`DiffusersDefault`."""
    if use_ema_warmup:
        return schedules.warmup(decay, gamma=inv_gamma, power=power, delay=update_after_step,
                                min_rho=min_decay)
    return DiffusersDefault(decay, min_decay=min_decay, update_after_step=update_after_step)


def from_ema_model(ema_model):
    """:func:`ema_schedule` with the settings of an existing ``diffusers.training_utils.
    EMAModel`` (its ``decay``, ``min_decay``, ``update_after_step``, ``use_ema_warmup``,
    ``inv_gamma``, ``power``)."""
    return ema_schedule(decay=ema_model.decay, min_decay=ema_model.min_decay,
                        update_after_step=ema_model.update_after_step,
                        use_ema_warmup=ema_model.use_ema_warmup, inv_gamma=ema_model.inv_gamma,
                        power=ema_model.power)
