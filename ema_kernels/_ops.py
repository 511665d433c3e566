"""Backend registry: which implementation of the fused updates runs for a given device.

Every backend is a module of ``ema_kernels.backends`` exposing ``NAME``,
``availability(device_type) -> (ok, reason)``, ``adam_ema(...)``, ``sgd_ema(...)``,
``ema_only(...)`` and the device-scalar variants ``adam_ema_capturable(...)`` /
``sgd_ema_capturable(...)`` (lr, the step count and the EMA weights read from device tensors,
never on the host: capturable=True and every step with a tensor lr take them) with the
interface documented in :mod:`ema_kernels.backends.reference`; LARS, LAMB and Lion's updates
(``lars_ema``, ``lamb_moments``/``lamb_ema``, ``lion_ema``: see
:mod:`ema_kernels.backends._reference_rules`) are optional, and those optimizers run on the
backends that have theirs (:mod:`ema_kernels.optim.rule_base`).  Modules are imported lazily, so
importing ema_kernels never touches triton, the compiled extension or a GPU.
"""
from __future__ import annotations

import importlib
import os
from typing import List, Optional, Tuple

import torch

from .backends._extension import EMULATION as _CUDA_EMULATION

BACKENDS = ("reference", "triton", "cuda", "cpp")
_MODULES = {
    "reference": "ema_kernels.backends.reference",
    "triton": "ema_kernels.backends.triton",
    "cuda": "ema_kernels.backends.cuda",
    "cpp": "ema_kernels.backends.cpp",
}
# Preference order of ``backend="auto"`` per device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}
ENV_VAR = "EMA_KERNELS_BACKEND"


def env_backend() -> Optional[str]:
    """The backend named by ``$EMA_KERNELS_BACKEND`` (None while unset). step() reads it every
    step, so a change takes effect at the next step."""
    return os.environ.get(ENV_VAR)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why and how to fix it."""


def _load(name: str):
    try:
        return importlib.import_module(_MODULES[name]), ""
    except ImportError as e:  # a backend whose module or dependency is missing
        return None, f"its module could not be imported ({e})"


_availability_cache: dict = {}


def availability(name: str, device_type: str) -> Tuple[bool, str]:
    """``(ok, reason)`` for running backend ``name`` on tensors of ``device_type``.

    Cached per process: step() resolves its backend every call, and a failed import or a CUDA
    probe would otherwise be retried each time (TRITON_INTERPRET is part of the key because
    it decides whether Triton can run on CPU tensors).
    """
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    key = (name, device_type, os.environ.get("TRITON_INTERPRET"))
    hit = _availability_cache.get(key)
    if hit is None:
        mod, why = _load(name)
        hit = (False, why) if mod is None else tuple(mod.availability(device_type))
        _availability_cache[key] = hit
    return hit


def available_backends(device="cpu") -> List[str]:
    """Backends usable for tensors on ``device``, in the order ``backend="auto"`` prefers them."""
    device_type = torch.device(device).type
    order = list(_AUTO_ORDER.get(device_type, ("reference",)))
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        order.append("triton")  # runs, but only as a test vehicle: never auto's choice on CPU
    if device_type == "cpu" and _CUDA_EMULATION:
        order.append("cuda")  # EMA_KERNELS_CUDA_EMULATION=1: the same, for the CUDA kernels
    return [b for b in order if availability(b, device_type)[0]]


def resolve(name: str, device) -> object:
    """The backend module that runs ``name`` (or ``"auto"``) on ``device``; raises if it can't."""
    device_type = torch.device(device).type
    if name == "auto":
        env = env_backend()
        if env:
            if env not in BACKENDS and env != "auto":
                raise ValueError(f"{ENV_VAR}={env!r} is not a backend; choose one of "
                                 f"{('auto',) + BACKENDS}")
            name = env
    if name == "auto":
        for cand in _AUTO_ORDER.get(device_type, ("reference",)):
            if availability(cand, device_type)[0]:
                return _load(cand)[0]
        return _load("reference")[0]
    ok, why = availability(name, device_type)
    if not ok:
        raise BackendUnavailableError(
            f"backend {name!r} cannot run on {device_type} tensors: {why}. "
            f"Use backend='auto' or one of {available_backends(device)}.")
    return _load(name)[0]
