"""EMA decay schedules, indexed by base steps.

``s`` counts *base* steps (Σκ over the steps taken: samples seen / base batch, a float), so a
schedule is indexed by samples seen and stays the same when the batch is scaled. Pass one as
``ema_schedule=`` to an ema_kernels optimizer; it overrides ``ema_decay``.

Every schedule here is a picklable object with

- ``sched(s)``: ρ(s), the decay of one base step taken at s (the step covering [s, s + 1));
- ``sched.decay(s_from, s_to)``: the decay of one EMA update that covers the base steps
  [s_from, s_to): the product of the per-base-step decays over that interval. An optimizer step
  at batch scale κ covers κ base steps, and with ``ema_every=k`` one EMA update covers κ·k of
  them; the optimizers call :func:`interval_decay`, which asks the schedule for this product.

Closed forms, exact for any real endpoints: ``constant`` ρ^(s_to − s_from) (the EMA Scaling
Rule's ρ^κ), ``polyak`` s_from/s_to, ``power`` (s_from/s_to)^(γ+1). ``warmup`` and ``cosine``
have no closed-form product; they read ρ as constant over each unit cell [n, n + 1) at the value
ρ(n) and multiply over the cells the interval covers, the partial cells at either end to the
power of the fraction covered::

    decay(a, b) = Π_n ρ(n) ^ |[a, b) ∩ [n, n + 1)|

That is exactly the product of the per-base-step values when a and b are integers (integer κ·k),
and for fractional κ it still composes: ``decay(a, b) * decay(b, c) == decay(a, c)``, so the
EMA's weights do not depend on how the base steps are cut into optimizer steps.

A plain callable ``s -> ρ`` is accepted too; :func:`interval_decay` then uses
ρ(s_from)^(s_to − s_from), which is exact only while ρ is constant over the interval (first
order in the interval's length).
"""
from __future__ import annotations

import math
import numbers

from .scaling import check_rho

__all__ = ["Schedule", "constant", "warmup", "cosine", "polyak", "power", "interval_decay",
           "sigma_rel_to_gamma", "gamma_to_sigma_rel", "to_data", "from_data"]


def _real(name, value, what):
    """``value`` as a finite float, or a ValueError naming it and saying what it must be."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} is invalid: {what}, got a {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}={value!r} is invalid: {what}")
    return v


def _interval(s_from, s_to):
    a = _real("s_from", s_from, "base-step counts must be finite numbers >= 0")
    b = _real("s_to", s_to, "base-step counts must be finite numbers >= 0")
    if a < 0 or b < a:
        raise ValueError(f"decay(s_from={s_from!r}, s_to={s_to!r}): the interval of base steps "
                         f"must satisfy 0 <= s_from <= s_to")
    return a, b


class Schedule:
    """Base class of the built-in schedules: picklable (plain attributes), compared and shown
    by their parameters. Subclasses define ``__call__(s)`` and ``decay(s_from, s_to)``."""

    _fields: tuple = ()

    def _params(self):
        return tuple((k, getattr(self, k)) for k in self._fields)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._params())
        return f"schedules.{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self._params() == other._params()

    def __hash__(self):
        return hash((type(self).__name__, self._params()))

    def __call__(self, s: float) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def decay(self, s_from: float, s_to: float) -> float:  # pragma: no cover - overridden
        raise NotImplementedError


class _CellProduct(Schedule):
    """Schedules without a closed-form product: ρ(n) held over each unit cell [n, n + 1).

    ``_flat_from()`` is the first integer n from which ρ(n) no longer changes, so the cells from
    there on contribute one power and the loop runs only over the cells before it (at most the
    κ·k cells one EMA update covers).
    """

    def _flat_from(self) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def decay(self, s_from: float, s_to: float) -> float:
        """Π_n ρ(n)^|[s_from, s_to) ∩ [n, n+1)|: the product of the per-base-step decays."""
        a, b = _interval(s_from, s_to)
        if b == a:
            return 1.0
        flat = self._flat_from()
        out = 1.0
        n = math.floor(a)
        while n < b and n < flat:
            covered = min(b, n + 1.0) - max(a, float(n))
            if covered > 0:
                out *= self(float(n)) ** covered
            n += 1
        rest = b - max(a, float(n))
        if rest > 0:  # the cells from `flat` on all have the value ρ(flat)
            out *= self(float(n)) ** rest
        return out


class constant(Schedule):
    """ρ(s) = rho; decay over [a, b) = rho^(b − a) (the EMA Scaling Rule's ρ^κ)."""

    _fields = ("rho",)

    def __init__(self, rho: float):
        self.rho = check_rho(rho, "constant(rho)")

    def __call__(self, s: float) -> float:
        return self.rho

    def decay(self, s_from: float, s_to: float) -> float:
        a, b = _interval(s_from, s_to)
        return self.rho ** (b - a)


class warmup(_CellProduct):
    """ρ(s) = min(rho, 1 − (1 + s/gamma)^−power): timm's / ema-pytorch's EMA warm-up.

    Starts at 0 (the first EMA update copies the parameters) and rises towards ``rho``, reached
    at s = gamma·((1 − rho)^(−1/power) − 1). ``decay(a, b)`` is the product of the per-base-step
    values over [a, b) (see the module docstring for fractional a, b).

    ``delay`` and ``min_rho`` (defaults 0: the plain formula above) give diffusers' ``EMAModel``
    and ema-pytorch's ``EMA`` their ``update_after_step`` and ``min_decay``/``min_value``:
    with t = s − delay, ρ(s) = 0 for t ≤ 0 (the EMA copies the parameters), else
    max(min(rho, 1 − (1 + t/gamma)^−power), min_rho). ``warmup(decay, inv_gamma, power,
    delay=update_after_step, min_rho=min_decay)`` is ``EMAModel(use_ema_warmup=True, ...)``'s
    ``get_decay(n)`` at the n-th step, bit for bit (see ``ema_kernels.integrations.diffusers``).
    """

    _fields = ("rho", "gamma", "power", "delay", "min_rho")

    def __init__(self, rho: float, gamma: float = 1.0, power: float = 2.0 / 3.0,
                 delay: float = 0.0, min_rho: float = 0.0):
        self.rho = check_rho(rho, "warmup(rho)")
        self.gamma = _real("warmup(gamma)", gamma, "it must be a finite number > 0")
        self.power = _real("warmup(power)", power, "it must be a finite number > 0")
        if not (self.gamma > 0 and self.power > 0):
            raise ValueError(f"warmup(gamma={gamma!r}, power={power!r}): both must be > 0")
        self.delay = _real("warmup(delay)", delay, "it must be a finite number >= 0 (base "
                           "steps before the EMA starts averaging)")
        if self.delay < 0:
            raise ValueError(f"warmup(delay={delay!r}) must be >= 0: the base steps during "
                             f"which the EMA copies the parameters")
        self.min_rho = check_rho(min_rho, "warmup(min_rho)")

    def __call__(self, s: float) -> float:
        t = float(s) - self.delay
        if t <= 0:
            return 0.0  # (the formula's value at t = 0 too, unless min_rho > 0)
        # the order of min and max is diffusers' get_decay's (min_rho wins over rho)
        return max(min(self.rho, 1.0 - (1.0 + t / self.gamma) ** (-self.power)), self.min_rho)

    def _flat_from(self) -> float:
        if self.rho >= 1.0:
            return math.inf  # never reaches rho: every cell has its own value
        # First n with 1 − (1 + (n − delay)/gamma)^−power ≥ rho; +1 guards the rounding.
        return math.ceil(self.delay + self.gamma * ((1.0 - self.rho) ** (-1.0 / self.power)
                                                    - 1.0)) + 1.0


class cosine(_CellProduct):
    """BYOL's schedule: ρ(s) = rho_end − (rho_end − rho_start)·(cos(π s/total_steps) + 1)/2.

    ``total_steps`` is counted in base steps (samples / base batch); from it on ρ stays at
    rho_end. ``decay(a, b)`` is the product of the per-base-step values over [a, b).
    """

    _fields = ("rho_start", "rho_end", "total_steps")

    def __init__(self, rho_start: float, rho_end: float = 1.0, total_steps: float = None):
        self.rho_start = check_rho(rho_start, "cosine(rho_start)")
        self.rho_end = check_rho(rho_end, "cosine(rho_end)")
        if (total_steps is None or isinstance(total_steps, bool)
                or not isinstance(total_steps, numbers.Real)
                or not (math.isfinite(float(total_steps)) and float(total_steps) > 0)):
            raise ValueError(f"cosine(total_steps={total_steps!r}): give the length of the "
                             f"schedule in base steps, a finite number > 0")
        self.total_steps = float(total_steps)

    def __call__(self, s: float) -> float:
        frac = min(max(float(s) / self.total_steps, 0.0), 1.0)
        return self.rho_end - (self.rho_end - self.rho_start) * (math.cos(math.pi * frac) + 1) / 2

    def _flat_from(self) -> float:
        return math.ceil(self.total_steps)


class polyak(Schedule):
    """ρ(s) = s/(s + 1): the uniform (Polyak–Ruppert) average of the iterates.

    The product over [a, b) telescopes to a/b, which the EMA uses for any κ and ``ema_every``:
    ζ is then the mean of the iterates the EMA saw, each weighted by the base steps it covers
    (the plain mean at constant κ). a = 0 gives 0: the first update copies θ.
    """

    def __call__(self, s: float) -> float:
        s = float(s)
        return s / (s + 1.0)

    def decay(self, s_from: float, s_to: float) -> float:
        a, b = _interval(s_from, s_to)
        return 1.0 if b == a else a / b


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2's relative width of a power-function EMA profile: σ_rel = √((γ+1) / ((γ+2)²(γ+3))).

    σ_rel is the standard deviation of the profile τ^γ over [0, t] divided by t (Karras et al.
    2024, eq. 3): 16.97 ↔ 0.05, 6.94 ↔ 0.10, γ = 0 (the uniform average) ↔ 1/√12 ≈ 0.289.
    """
    g = _real("gamma", gamma, "the power-function exponent must be a finite number >= 0")
    if g < 0:
        raise ValueError(f"gamma={gamma!r} is invalid: the power-function exponent must be >= 0 "
                         f"(0 is the uniform average; larger is a shorter EMA)")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


_SIGMA_REL_MAX = gamma_to_sigma_rel(0.0)  # 1/√12: σ_rel falls monotonically as γ grows from 0


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ ≥ 0 of the power-function EMA of relative width ``sigma_rel``.

    Inverts :func:`gamma_to_sigma_rel`: γ is the largest real root of
    γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0 (EDM2's ``std_to_exp``). 0.05 ↔ 16.97, 0.10 ↔ 6.94.
    """
    s = _real("sigma_rel", sigma_rel, f"it must be a number in (0, {_SIGMA_REL_MAX:.6f}]")
    if not 0.0 < s <= _SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel={sigma_rel!r} is invalid: a power-function EMA's relative "
                         f"width lies in (0, 1/sqrt(12) = {_SIGMA_REL_MAX:.6f}] (the upper end "
                         f"is gamma=0, the uniform average)")
    t = s ** -2
    # For t ≥ 12 the cubic is ≤ 0 at γ = 0 and has exactly one root γ ≥ 0 (σ_rel is monotone
    # there): bracket it and bisect to full double precision.
    f = lambda g: ((g + 7.0) * g + 16.0 - t) * g + 12.0 - t  # noqa: E731
    lo, hi = 0.0, 1.0
    while f(hi) < 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


class power(Schedule):
    """EDM2's power-function EMA (Karras et al. 2024): ζ(t) averages θ with weight ∝ τ^γ, τ ≤ t.

    Give ``gamma`` (γ ≥ 0) or ``sigma_rel`` (its relative width, see
    :func:`sigma_rel_to_gamma`), not both. The decay over [a, b) is (a/b)^(γ+1), exact for any κ
    and ``ema_every``: after the n-th step at constant κ it is EDM2's β = (1 − 1/n)^(γ+1), and
    the EMA equals the integral of the profile (γ+1)τ^γ/t^(γ+1) over θ held between steps, which
    is what :mod:`ema_kernels.posthoc` relies on. a = 0 gives 0: the first update copies θ.
    ρ(s), one base step's decay, is (s/(s+1))^(γ+1).
    """

    _fields = ("gamma",)

    def __init__(self, gamma: float = None, *, sigma_rel: float = None):
        if (gamma is None) == (sigma_rel is None):
            raise ValueError(f"power(gamma={gamma!r}, sigma_rel={sigma_rel!r}): give exactly one "
                             f"of them, e.g. power(sigma_rel=0.05) or power(gamma=6.94)")
        if gamma is None:
            gamma = sigma_rel_to_gamma(sigma_rel)
        gamma_to_sigma_rel(gamma)  # validates γ ≥ 0 with a clear message
        self.gamma = float(gamma)

    @property
    def sigma_rel(self) -> float:
        """The relative width of this profile (EDM2's σ_rel)."""
        return gamma_to_sigma_rel(self.gamma)

    def __call__(self, s: float) -> float:
        s = float(s)
        return (s / (s + 1.0)) ** (self.gamma + 1.0)

    def decay(self, s_from: float, s_to: float) -> float:
        a, b = _interval(s_from, s_to)
        return 1.0 if b == a else (a / b) ** (self.gamma + 1.0)


# ---------------------------------------------------------------------- as plain data --------
# What a state dict holds for a schedule (checkpoints hold data only: torch.load(...,
# weights_only=True) loads them). The built-ins by name; anything else is "custom".
_BUILTINS = {cls.__name__: cls for cls in (constant, warmup, cosine, polyak, power)}
CUSTOM = "custom"


def to_data(schedule) -> dict:
    """A schedule as plain data: ``{"kind": "warmup", "rho": 0.9999, "gamma": 1.0, ...}`` for
    the built-ins (their kind and constructor arguments; :func:`from_data` rebuilds an equal
    schedule). Any other callable (a plain function, your own class) cannot be rebuilt from
    data: ``{"kind": "custom", "repr": repr(schedule)}``, and loading such a checkpoint keeps
    the schedule the optimizer was built with at that index (see the optimizers'
    ``load_state_dict``)."""
    cls = type(schedule)
    if _BUILTINS.get(cls.__name__) is cls:
        return {"kind": cls.__name__, **dict(schedule._params())}
    return {"kind": CUSTOM, "repr": repr(schedule)[:200]}


def from_data(data: dict):
    """The built-in schedule that :func:`to_data` described; ``None`` for a custom one (it has
    no data to rebuild it from). A ``ValueError`` names anything else."""
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise ValueError(f"{data!r} is not a saved schedule: expected a dict with a 'kind' "
                         f"(one of {sorted(_BUILTINS)} or {CUSTOM!r}) and its arguments")
    kind = data["kind"]
    if kind == CUSTOM:
        return None
    cls = _BUILTINS.get(kind)
    if cls is None:
        raise ValueError(f"saved schedule kind {kind!r} is unknown: the built-ins are "
                         f"{sorted(_BUILTINS)} (a checkpoint from a newer ema_kernels?)")
    args = {k: v for k, v in data.items() if k != "kind"}
    if set(args) != set(cls._fields):
        raise ValueError(f"saved schedule {data!r}: {kind} takes the arguments "
                         f"{list(cls._fields)}, got {sorted(args)}")
    return cls(**args)


def interval_decay(schedule, s_from: float, s_to: float) -> float:
    """The decay of one EMA update covering the base steps [s_from, s_to), checked in [0, 1].

    ``schedule.decay(s_from, s_to)`` when the schedule has one (every built-in; exact), else,
    for a plain callable ``s -> ρ``, ρ(s_from)^(s_to − s_from): first order, exact only while ρ
    does not change over the interval. Give a ``decay`` method for an exact custom schedule.
    """
    a, b = _interval(s_from, s_to)
    decay = getattr(schedule, "decay", None)
    if callable(decay):
        return check_rho(decay(a, b), f"{schedule!r}.decay({a!r}, {b!r})")
    if not callable(schedule):
        raise TypeError(f"ema_schedule={schedule!r} must be a callable s -> rho(s) or a schedule "
                        f"with decay(s_from, s_to), e.g. ema_kernels.schedules.warmup(0.9999)")
    rho = check_rho(schedule(a), f"ema_schedule({a!r})")
    return rho ** (b - a)
