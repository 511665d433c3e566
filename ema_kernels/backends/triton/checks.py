"""Whether the Triton kernels can run here, and the argument checks made before any launch."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch

from . import config, kernels
from .config import triton

Tensor = torch.Tensor


def _interpreted() -> bool:
    """Were the kernels decorated under TRITON_INTERPRET=1 (i.e. do they run on the CPU)?"""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernels._adam_flat_kernel, InterpretedFunction)


def availability(device_type: str) -> Tuple[bool, str]:
    """``(ok, reason)`` for running the Triton kernels on tensors of ``device_type``."""
    if triton is None:
        return False, (f"triton cannot be imported ({config.IMPORT_ERROR}); install it with "
                       f"`pip install triton` (Linux)")
    env = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, ("torch.cuda.is_available() is False (no GPU, or a CPU-only torch "
                           "build); use backend='cpp' or 'reference'")
        if _interpreted():
            return True, (f"triton {triton.__version__} under TRITON_INTERPRET=1: the kernels "
                          f"are interpreted on the host (slow, for tests)")
        return True, f"triton {triton.__version__}"
    if device_type == "cpu":
        if not env:
            return False, ("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (its "
                           "interpreter, a test vehicle); use backend='cpp' or 'reference' "
                           "for CPU tensors")
        if not _interpreted():
            return False, ("TRITON_INTERPRET=1 was set after ema_kernels.backends.triton "
                           "was imported; set it before importing triton or ema_kernels, or use "
                           "backend='cpp' or 'reference' for CPU tensors")
        return True, (f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): slow, "
                      f"for tests")
    return False, f"Triton does not run on {device_type} tensors; use backend='reference'"


def _check_lists(what: str, params: Sequence[Tensor], grads: Sequence[Tensor],
                 states: Sequence[Tuple[str, Optional[Sequence[Tensor]]]],
                 grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> torch.device:
    """Cheap structural checks with messages that name the problem; returns the device."""
    if triton is None:
        raise RuntimeError(availability("cuda")[1])
    n = len(params)
    device = params[0].device
    ok, why = availability(device.type)
    if not ok:
        raise RuntimeError(f"{what}: the triton backend cannot run on {device.type} tensors: "
                           f"{why}")
    if len(grads) != n:
        raise ValueError(f"{what}: {n} params but {len(grads)} grads")
    for name, lst in states:
        if lst is not None and len(lst) != n:
            raise ValueError(f"{what}: {n} params but {len(lst)} {name}")
    for i in range(n):
        p, g = params[i], grads[i]
        if p.dtype not in config.PARAM_DTYPES:
            if p.dtype == torch.float64:
                raise TypeError(f"{what}: params[{i}] is float64; the triton backend supports "
                                f"float32, bfloat16 and float16 parameters: use "
                                f"backend='reference' for float64")
            raise TypeError(f"{what}: params[{i}] has dtype {p.dtype}; the triton backend "
                            f"supports float32, bfloat16 and float16 parameters")
        if g.dtype != p.dtype:
            raise TypeError(f"{what}: grads[{i}] is {g.dtype} but params[{i}] is {p.dtype}; "
                            f"gradients must have their parameter's dtype")
        numel = p.numel()
        for name, t in (("params", p), ("grads", g)):
            _check_place(what, f"{name}[{i}]", t, device)
        if g.numel() != numel:
            raise ValueError(f"{what}: grads[{i}] has {g.numel()} elements, params[{i}] "
                             f"{numel}")
        for name, lst in states:
            if lst is None:
                continue
            s = lst[i]
            if s.dtype != torch.float32:
                raise TypeError(f"{what}: {name}[{i}] is {s.dtype}; optimizer state and EMA "
                                f"must be float32")
            _check_place(what, f"{name}[{i}]", s, device)
            if s.numel() != numel:
                raise ValueError(f"{what}: {name}[{i}] has {s.numel()} elements, params[{i}] "
                                 f"{numel}")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is None:
            continue
        if t.numel() != 1 or t.dtype != torch.float32:
            raise ValueError(f"{what}: {name} must be a one-element float32 tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
        if t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device}, params on {device}")
    return device


def _check_place(what: str, label: str, t: Tensor, device: torch.device) -> None:
    """``t`` (named ``label`` in the message) is on ``device`` and contiguous."""
    if t.device != device:
        raise ValueError(f"{what}: {label} is on {t.device}, params[0] on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{what}: {label} is not contiguous")


def _device_scalar(what: str, name: str, t: Optional[Tensor], device: torch.device,
                   numel: int) -> Optional[Tensor]:
    """``t`` as the contiguous float32 tensor the kernels load, checked without reading it:
    ``numel`` elements on ``device`` (a kernel cannot read a host tensor, and copying one
    there would be the host round trip capturable=True exists to avoid). ``numel == 0``: no
    EMA this step, ``None``. Converting another float dtype is a device op, never a read."""
    if numel == 0:
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{what}: {name} must be a floating-point tensor on the parameters' "
                        f"device (the kernels read it there), got {type(t).__name__}"
                        f"{f' of dtype {t.dtype}' if isinstance(t, Tensor) else ''}")
    if t.numel() != numel:
        raise ValueError(f"{what}: {name} must have {numel} element{'s' * (numel != 1)}, got "
                         f"shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{what}: {name} is on {t.device} but the parameters are on {device}; "
                         f"create it on {device} (the kernels read it there, never on the "
                         f"host)")
    return t.detach().reshape(numel).to(torch.float32).contiguous()
