"""The ``emas`` / ``ema_weight`` arguments of every backend: one EMA or several in one pass.

Two spellings are accepted by every update (``adam_ema``, ``sgd_ema``, ``ema_only`` and the
capturable variants):

- one EMA: ``emas`` a list of tensors aligned with ``params``, ``ema_weight`` a number (or, for
  the capturable kernels, a one-element float32 tensor);
- several: ``emas`` a sequence of such lists, one per EMA, and ``ema_weight`` a sequence of
  numbers of the same length (capturable: a float32 tensor with one element per EMA).

Every EMA i moves towards the parameter as stored with its own weight,
``ζ_i += w_i (θ − ζ_i)``, and all of them are updated in the same pass: θ is read once, each ζ_i
read and written once.  The number of EMAs per pass is a compile-time bound of the kernels
(:data:`MAX_EMAS`).
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

# Compile-time bound of the kernels (csrc/fused_math.h kMaxEmas, the Triton kernels' z0..z3).
MAX_EMAS = 4


def _too_many(what: str, k: int) -> ValueError:
    return ValueError(f"{what}: {k} EMAs in one call, but the fused kernels update at most "
                      f"{MAX_EMAS} EMAs per pass (a compile-time bound); track at most "
                      f"{MAX_EMAS} EMAs per param group (ema_decay / ema_schedule tuples), or "
                      f"put the others in a second optimizer")


def _weight(w):
    """A host weight as a float; a device scalar (the reference's capturable path) as it is:
    reading it would synchronise."""
    if isinstance(w, Tensor):
        return w.reshape(())
    return float(w)


def ema_lists(emas, ema_weight, n: int, what: str) -> Tuple[List[List[Tensor]], List]:
    """``(lists, weights)``: one list of n tensors and one weight per EMA updated (floats; 0-d
    device tensors where the caller gave tensors).

    ``ema_weight is None``: no EMA this step, ``([], [])`` (``emas`` is ignored)."""
    if ema_weight is None:
        return [], []
    if emas is None:
        raise ValueError(f"{what}: ema_weight is set but emas is None (give the EMA tensors, "
                         f"or ema_weight=None for a step without EMA)")
    one = isinstance(ema_weight, Tensor) and ema_weight.numel() == 1 and \
        (not emas or isinstance(list(emas)[0], Tensor))
    if one or (isinstance(ema_weight, numbers.Real) and not isinstance(ema_weight, bool)):
        emas = list(emas)
        if emas and not isinstance(emas[0], Tensor):
            raise TypeError(f"{what}: a single ema_weight goes with one EMA list (tensors); "
                            f"for several EMAs give one weight per EMA list")
        # One EMA: its list's length is checked with the other lists' by the backend.
        return [emas], [_weight(ema_weight)]
    else:
        if isinstance(ema_weight, (Tensor, str, bool)) or \
                not isinstance(ema_weight, Sequence):
            raise TypeError(f"{what}: ema_weight must be a number (one EMA) or a sequence of "
                            f"numbers (one per EMA), got {type(ema_weight).__name__}")
        weights = [_weight(w) for w in ema_weight]
        lists = [list(e) for e in emas]
        if len(lists) != len(weights):
            raise ValueError(f"{what}: {len(weights)} EMA weights but {len(lists)} EMA lists; "
                             f"give one weight per EMA")
    _check_shapes(lists, n, what)
    return lists, weights


def ema_lists_capturable(emas, ema_weight: Optional[Tensor], n: int,
                         what: str) -> Tuple[List[List[Tensor]], Optional[Tensor]]:
    """``(lists, weights tensor)`` for the capturable kernels: ``ema_weight`` is a float32
    tensor with one element per EMA (``None``: no EMA this step, ``([], None)``)."""
    if ema_weight is None:
        return [], None
    if emas is None:
        raise ValueError(f"{what}: ema_weight is set but emas is None")
    emas = list(emas)
    if not emas or isinstance(emas[0], Tensor):
        # One EMA: its list's length is checked with the other lists' by the backend.
        if ema_weight.numel() != 1:
            raise ValueError(f"{what}: ema_weight has {ema_weight.numel()} elements but emas "
                             f"is one EMA list; give several EMA lists, one per weight")
        return [emas], ema_weight
    lists = [list(e) for e in emas]
    if ema_weight.numel() != len(lists):
        raise ValueError(f"{what}: ema_weight has {ema_weight.numel()} elements but there are "
                         f"{len(lists)} EMA lists; give one weight per EMA")
    _check_shapes(lists, n, what)
    return lists, ema_weight


def _check_shapes(lists, n, what) -> None:
    if len(lists) > MAX_EMAS:
        raise _too_many(what, len(lists))
    for k, lst in enumerate(lists):
        if len(lst) != n:
            raise ValueError(f"{what}: EMA {k} has {len(lst)} tensors but params has {n}")


def flat(lists: Sequence[Sequence[Tensor]]) -> List[Tensor]:
    """The EMA lists concatenated, EMA-major (all tensors of EMA 0, then of EMA 1, ...): the
    ``emas`` argument of the compiled ops."""
    return [z for lst in lists for z in lst]
