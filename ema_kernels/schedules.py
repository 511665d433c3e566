"""EMA decay schedules: callables ``s -> ρ(s)``.

``s`` is the number of *base* steps taken before the current step (Σκ over earlier steps, a
float), so a schedule is indexed by samples seen and stays the same when the batch is scaled.
Pass one as ``ema_schedule=`` to an ema_kernels optimizer; it overrides ``ema_decay``.
"""
from __future__ import annotations

import math

from .scaling import check_rho

__all__ = ["constant", "warmup", "cosine", "polyak"]


class _Schedule:
    """A named, picklable-by-value schedule (repr shows its parameters)."""

    def __init__(self, name, fn, **params):
        self._name, self._fn, self.params = name, fn, params

    def __call__(self, s: float) -> float:
        return self._fn(float(s))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"schedules.{self._name}({args})"


def constant(rho: float) -> _Schedule:
    """ρ(s) = rho."""
    rho = check_rho(rho, "rho")
    return _Schedule("constant", lambda s: rho, rho=rho)


def warmup(rho: float, gamma: float = 1.0, power: float = 2.0 / 3.0) -> _Schedule:
    """ρ(s) = min(rho, 1 − (1 + s/gamma)^−power): timm's / ema-pytorch's EMA warm-up.

    Starts at 0 (the EMA copies the parameters) and rises towards ``rho``.
    """
    rho = check_rho(rho, "rho")
    if not gamma > 0 or not power > 0:
        raise ValueError(f"warmup(gamma={gamma!r}, power={power!r}): both must be > 0")
    return _Schedule("warmup", lambda s: min(rho, 1.0 - (1.0 + s / gamma) ** (-power)),
                     rho=rho, gamma=gamma, power=power)


def cosine(rho_start: float, rho_end: float = 1.0, total_steps: float = None) -> _Schedule:
    """BYOL's schedule: ρ(s) = rho_end − (rho_end − rho_start)·(cos(π s/total_steps) + 1)/2.

    ``total_steps`` is counted in base steps (samples / base batch); after it ρ stays at rho_end.
    """
    rho_start, rho_end = check_rho(rho_start, "rho_start"), check_rho(rho_end, "rho_end")
    if total_steps is None or not float(total_steps) > 0:
        raise ValueError(f"cosine(total_steps={total_steps!r}): give the length of the schedule "
                         f"in base steps, a number > 0")
    total = float(total_steps)

    def fn(s):
        frac = min(max(s / total, 0.0), 1.0)
        return rho_end - (rho_end - rho_start) * (math.cos(math.pi * frac) + 1.0) / 2.0

    return _Schedule("cosine", fn, rho_start=rho_start, rho_end=rho_end, total_steps=total)


def polyak() -> _Schedule:
    """ρ(s) = s/(s+1): the uniform (Polyak–Ruppert) average of all iterates θ_1..θ_t."""
    return _Schedule("polyak", lambda s: s / (s + 1.0))
