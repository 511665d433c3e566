"""Validation of the optimizers' inputs: parameter lists, param groups and hyperparameters.

Parameter-list checks follow ``torch.optim.Optimizer.__init__``/``add_param_group`` case for
case (same exception types, same warnings), so code that catches torch's errors catches ours;
our messages add what to do. Hyperparameter checks raise ``ValueError``/``TypeError`` naming the
value. Nothing here mutates anything: a failed construction or step leaves everything as it was.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, List

import torch

from .. import scaling


def finite_number(name, value, *, low=None, low_inclusive=True, high=None,
                  high_inclusive=False, torch_text=None) -> float:
    """``float(value)`` after checking it is a finite real in the given range.

    ``torch_text``: torch.optim's message for this value (``"Invalid learning rate"``); a
    ``ValueError`` then starts with torch's exact text (``"Invalid learning rate: -1"``), so
    code and tests that match torch's messages match ours, and goes on with ours.

    A one-element tensor is accepted (a tensor ``lr``); reading it is a host read, so the step
    only calls this on host numbers (see ``host_lr``)."""
    raw = value

    def invalid(must):
        if torch_text is not None:
            return ValueError(f"{torch_text}: {raw} — {name} must be {must}")
        return ValueError(f"{name}={value!r} is invalid: it must be {must}")

    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise invalid("finite")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise invalid(f"{op} {low}")
    if high is not None and (v > high or (v == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise invalid(f"{op} {high}")
    return v


def check_ema_every(every, where: str) -> int:
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"ema_every={every!r} ({where}) is invalid: it must be an integer "
                         f">= 1 (update the EMA every k-th step)")
    return int(every)


from ..backends._emas import MAX_EMAS  # noqa: E402  (the kernels' compile-time bound)

# State keys of EMA index 0, 1, ... (index 0 keeps the one-EMA checkpoints' name).
EMA_KEYS = ("ema",) + tuple(f"ema_{i}" for i in range(1, MAX_EMAS))


def _as_tuple(v):
    """A group's ``ema_decay`` / ``ema_schedule`` as a tuple: one value per EMA index (a single
    value is EMA 0; None is no entry)."""
    if v is None:
        return ()
    if isinstance(v, (tuple, list)):
        return tuple(v)
    return (v,)


def ema_sources(group: Dict[str, Any]) -> tuple:
    """What drives each EMA of a group, by index: its schedule where ``ema_schedule`` gives one
    (element by element: the schedule overrides the decay), else its constant ``ema_decay``.

    ``()``: the group keeps no EMA (``ema_decay=None`` wins over any ``ema_schedule``: see
    :func:`num_emas`). Assumes :func:`check_ema_settings` passed."""
    if group["ema_decay"] is None:
        return ()
    decays, scheds = _as_tuple(group["ema_decay"]), _as_tuple(group["ema_schedule"])
    out = []
    for i in range(max(len(decays), len(scheds))):
        sched = scheds[i] if i < len(scheds) else None
        out.append(sched if sched is not None else decays[i])
    return tuple(out)


def num_emas(group: Dict[str, Any]) -> int:
    """How many EMAs the group keeps (0: none).

    A group whose ``ema_decay`` is None keeps none, whatever its ``ema_schedule``: the
    optimizer-wide schedule is copied into every group (torch's defaults), and a group's None
    (a BYOL predictor) must win over it. Giving both in one place is refused
    (:func:`check_no_ema_with_schedule`)."""
    if group["ema_decay"] is None:
        return 0
    return max(len(_as_tuple(group["ema_decay"])), len(_as_tuple(group["ema_schedule"])))


_UNSET = object()


def check_no_ema_with_schedule(given: Dict[str, Any], where: str) -> None:
    """Refuse ``ema_decay=None`` and an ``ema_schedule`` given together (in the constructor's
    keywords or in one param group's dict): None means no EMA, so the schedule would be
    ignored."""
    if given.get("ema_decay", _UNSET) is None and given.get("ema_schedule") is not None:
        raise ValueError(
            f"ema_decay=None and ema_schedule={given['ema_schedule']!r} ({where}): "
            f"ema_decay=None means this group keeps no EMA, so the schedule would be ignored. "
            f"For an EMA that follows the schedule leave ema_decay out (the schedule overrides "
            f"it); for no EMA leave ema_schedule out")


def check_ema_settings(group: Dict[str, Any], where: str) -> None:
    decay, sched = group["ema_decay"], group["ema_schedule"]
    for name, v in (("ema_decay", decay), ("ema_schedule", sched)):
        if isinstance(v, (tuple, list)) and len(v) == 0:
            raise ValueError(f"{name}={v!r} ({where}) is an empty sequence: give one value per "
                             f"EMA, or ema_decay=None (and ema_schedule=None) for no EMA")
    decays, scheds = _as_tuple(decay), _as_tuple(sched)
    multi = isinstance(decay, (tuple, list))
    for i, d in enumerate(decays):
        name = f"ema_decay[{i}] ({where})" if multi else f"ema_decay ({where})"
        if d is None:
            raise ValueError(f"{name} is None: every element of an ema_decay tuple is a decay "
                             f"in [0, 1] (a group without EMA has ema_decay=None)")
        if isinstance(d, bool) or not isinstance(d, numbers.Real):
            raise TypeError(f"{name}={d!r} must be a number in [0, 1] (or ema_decay a tuple of "
                            f"them, one per EMA)")
        scaling.check_rho(d, name)
    check_ema_every(group["ema_every"], where)
    multi = isinstance(sched, (tuple, list))
    for i, s in enumerate(scheds):
        name = f"ema_schedule[{i}]" if multi else "ema_schedule"
        if s is not None and not callable(s):
            raise TypeError(f"{name}={s!r} ({where}) must be a schedule (a callable "
                            f"s -> rho(s)), e.g. ema_kernels.schedules.warmup(0.9999)")
        if s is None and i >= len(decays) and decay is not None:
            raise ValueError(f"{name} is None ({where}) and ema_decay={decay!r} has no element "
                             f"{i}: EMA {i} needs a schedule or a decay (ema_decay=(..., rho))")
    n = max(len(decays), len(scheds))
    if n > MAX_EMAS:
        raise ValueError(f"{n} EMAs ({where}: ema_decay={decay!r}, ema_schedule={sched!r}) but "
                         f"the fused kernels update at most {MAX_EMAS} EMAs per pass (a "
                         f"compile-time bound); track at most {MAX_EMAS} per param group, or "
                         f"the others in a second optimizer")


# Stochastic rounding's seed: a 63-bit non-negative int (it travels through the ops as int64).
SR_SEED_BOUND = 1 << 63


def check_stochastic_rounding(group: Dict[str, Any], where: str, capturable: bool) -> bool:
    """``stochastic_rounding`` (a bool) and, where present, ``sr_seed``; returns the flag.

    A group without the key (an optimizer pickled before it existed) rounds to nearest."""
    on = group.get("stochastic_rounding", False)
    if not isinstance(on, bool):
        raise TypeError(f"stochastic_rounding={on!r} ({where}) must be True or False (a bool, "
                        f"got {type(on).__name__})")
    seed = group.get("sr_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < SR_SEED_BOUND):
        raise ValueError(f"sr_seed={seed!r} ({where}) is invalid: stochastic rounding's seed "
                         f"is an int in [0, 2**63); leave it out to draw one from torch's "
                         f"default generator")
    if on and capturable:
        raise ValueError(
            f"stochastic_rounding=True ({where}) is not supported with capturable=True: its "
            f"random bits depend on the step count, which lives on the device there. Use "
            f"capturable=False (a tensor lr still works), or stochastic_rounding=False")
    return on


def sr_kwargs(sr) -> Dict[str, Any]:
    """The backends' stochastic-rounding keywords of ``sr = (seed, step, offsets)``; none when
    ``sr`` is None (the call is then exactly the round-to-nearest one)."""
    if sr is None:
        return {}
    seed, step, offsets = sr
    return dict(stochastic_rounding=True, sr_seed=seed, sr_step=int(step), sr_offsets=offsets)


def draw_sr_seed() -> int:
    """A seed from torch's default CPU generator (so ``torch.manual_seed`` reproduces it)."""
    return int(torch.randint(0, SR_SEED_BOUND - 1, (), dtype=torch.int64))


def split_params(params) -> List[Dict[str, Any]]:
    """The groups of ``params`` as ``Optimizer.__init__`` sees them (torch's cases and types)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of "
                        "Tensors or dicts, but got " + torch.typename(params) +
                        " (pass [tensor] or model.parameters())")
    groups = list(params)
    if len(groups) == 0:
        raise ValueError("optimizer got an empty parameter list (pass model.parameters() or "
                         "a non-empty list of tensors)")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    return groups


def normalise_group(param_group, existing: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A new dict with ``params`` as a list of tensors (and ``param_names`` when named), after
    torch's ``add_param_group`` checks against the ``existing`` groups. Mutates nothing."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
    group = dict(param_group)
    params = group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but "
                        "the ordering of tensors in sets will change between runs. Please use a "
                        "list instead.")
    else:
        params = list(params)
    tensors, names = [], []
    for p in params:
        if isinstance(p, tuple):
            names.append(p[0])
            tensors.append(p[1])
        else:
            tensors.append(p)
    if names:
        if len(names) != len(tensors):
            raise ValueError("all optimizer params should be with/without names. Some param "
                             "names are missing")
        group["param_names"] = names
    group["params"] = tensors
    for p in tensors:
        if not isinstance(p, torch.Tensor):
            raise TypeError("optimizer can only optimize Tensors, but one of the params is " +
                            torch.typename(p))
        if not (p.is_leaf or p.retains_grad):
            raise ValueError("can't optimize a non-leaf Tensor (optimize the nn.Parameter "
                             "itself, not a result computed from it)")
    for i, p in enumerate(tensors):
        if p.is_complex():
            raise TypeError(f"parameter {i} is complex ({p.dtype}): ema_kernels supports real "
                            f"floating-point parameters only; view complex parameters as real "
                            f"(torch.view_as_real)")
        if not p.is_floating_point():
            raise TypeError(f"parameter {i} has dtype {p.dtype}: parameters must be floating "
                            f"point (fp32, bf16, fp16 or fp64)")
        if p.is_sparse:
            raise TypeError(f"parameter {i} is sparse: ema_kernels optimizers support dense "
                            f"parameters only")
    if len(tensors) != len(set(tensors)):
        warnings.warn("optimizer contains a parameter group with duplicate parameters; "
                      "in future, this will cause an error; "
                      "see github.com/pytorch/pytorch/issues/40967 for more information",
                      stacklevel=4)
    taken = set()
    for g in existing:
        taken.update(g["params"])
        if ("param_names" in group) != ("param_names" in g):
            txt = "with names" if "param_names" in group else "without names"
            raise ValueError("all optimizer param groups should be with/without names. "
                             f"cannot add param group {txt} to the optimizer")
    if not taken.isdisjoint(set(tensors)):
        raise ValueError("some parameters appear in more than one parameter group")
    return group
