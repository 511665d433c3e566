"""What every framework integration needs: the ema_kernels optimizer inside a framework's
wrapper, and the model holding its EMA (parameters and floating-point buffers) for a while."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch

__all__ = ["find_ema_optimizer", "ema_weights", "float_buffer_pairs"]


def _is_ema_optimizer(obj) -> bool:
    return callable(getattr(obj, "swap_ema", None)) and callable(getattr(obj, "ema_module", None))


def find_ema_optimizer(optimizer):
    """The ema_kernels optimizer ``optimizer`` is or wraps.

    Frameworks hand callbacks their own wrapper: accelerate's ``AcceleratedOptimizer`` and
    Lightning's ``LightningOptimizer`` both keep the user's optimizer as ``.optimizer``; this
    follows that chain to the first object with the EMA API (``swap_ema``, ``ema_module``), so
    ``find_ema_optimizer(prepared_opt).swap_ema()`` works on what ``accelerator.prepare``
    returns. Raises ``TypeError`` naming the types it saw when there is none."""
    seen: List[str] = []
    obj = optimizer
    while obj is not None and len(seen) < 8:
        inner = getattr(obj, "optimizer", None)
        # Lightning's wrapper copies its optimizer's attributes (it has the EMA API itself):
        # the optimizer is the innermost object with the API
        if _is_ema_optimizer(obj) and not _is_ema_optimizer(inner):
            return obj
        seen.append(type(obj).__name__)
        obj = inner
    raise TypeError(
        f"no ema_kernels optimizer found in {' -> '.join(seen) or repr(optimizer)}: the EMA "
        f"integrations need the training's optimizer to be an ema_kernels optimizer (e.g. "
        f"ema_kernels.AdamW(model.parameters(), ema_decay=0.9999)), passed to the framework "
        f"as its optimizer")


def float_buffer_pairs(model: torch.nn.Module, teacher: Optional[torch.nn.Module]
                       ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(model buffer, teacher buffer) for every floating-point buffer both have, by name: the
    buffers an EMA teacher keeps an EMA of (integer buffers are copied each EMA step, so the
    teacher's equal the model's)."""
    if teacher is None:
        return []
    theirs = dict(teacher.named_buffers())
    pairs = []
    for name, b in model.named_buffers():
        t = theirs.get(name)
        if t is not None and b.is_floating_point() and t is not b and t.shape == b.shape:
            pairs.append((b, t))
    return pairs


@contextlib.contextmanager
def ema_weights(optimizer, model: torch.nn.Module, teacher: Optional[torch.nn.Module] = None,
                index: int = 0) -> Iterator[torch.nn.Module]:
    """Inside the block ``model`` holds EMA ``index``: its parameters (``opt.swap_ema``) and,
    given ``teacher = opt.ema_module(model, index)``, its floating-point buffers (the teacher's
    EMA of them). After the block, bit for bit what it held before.

    ``optimizer`` may be a framework's wrapper (see :func:`find_ema_optimizer`)."""
    opt = find_ema_optimizer(optimizer)
    pairs = float_buffer_pairs(model, teacher)
    with opt.swap_ema(index):
        if not pairs:
            yield model
            return
        mine = [b for b, _ in pairs]
        with torch.no_grad():
            saved = [b.clone() for b in mine]
            torch._foreach_copy_(mine, [t for _, t in pairs])
        try:
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(mine, saved)
