"""CUDA backend: the compiled extension's CUDA kernels (csrc/fused_cuda.cu) on CUDA tensors.

This module is also the lazy loader of the compiled extension ``ema_kernels._C`` shared with the
``cpp`` backend (its CPU twin, csrc/fused_cpu.cpp).  Importing this module loads nothing and
queries no device: the extension is imported on first use or on ``availability()``.  A missing
or broken extension becomes an :class:`ExtensionUnavailable` error that says how to rebuild it,
raised only when a backend that needs it is asked for.

Ops (``torch.ops.ema_kernels_ext``, schemas in csrc/bindings.cpp; each mutates lists in place):

- ``adam_ema_`` / ``sgd_ema_``: the interface of :mod:`ema_kernels.backends.reference`.
- ``adam_ema_capturable_`` / ``sgd_ema_capturable_``: the same update reading ``lr``, the step
  count ``step`` (Adam: t after this step's increment) and ``ema_weight`` from one-element float32
  tensors on the parameters' device, so that the launch is identical every step and can be
  captured in a CUDA graph (the bias corrections are formed in-kernel, in double, from ``step``).
- ``ema_only_``: ζ += w (θ − ζ).
- ``build_info``: what the extension was built with (CUDA archs, CPU ISA).
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import Dict, List, Optional, Tuple

import torch

Tensor = torch.Tensor

NAME = "cuda"

REBUILD_HINT = ("build it from the source tree with `pip install --no-build-isolation -e .` "
                "(needs torch installed first; or `MAX_JOBS=2 python setup.py build_ext "
                "--inplace` for a development build)")


class ExtensionUnavailable(RuntimeError):
    """The compiled extension (or the part of it a backend needs) cannot be used here."""


_lock = threading.Lock()
_loaded = False
_load_error: Optional[str] = None
_info: Optional[Dict[str, str]] = None
_avail_cache: Dict[str, Tuple[bool, str]] = {}


def _register_fakes() -> None:
    """Fake (meta) implementations: every op mutates its inputs in place and returns nothing,
    so tracing (FakeTensor, torch.compile) needs only to know that no output is produced."""
    def _none(*args, **kwargs):
        return None

    for op in ("adam_ema_", "adam_ema_capturable_", "sgd_ema_", "sgd_ema_capturable_",
               "ema_only_"):
        torch.library.register_fake(f"ema_kernels_ext::{op}")(_none)


def load_extension():
    """Import ``ema_kernels._C`` once and return ``torch.ops.ema_kernels_ext``.

    Raises :class:`ExtensionUnavailable` (saying why and how to rebuild) if it cannot be loaded.
    """
    global _loaded, _load_error, _info
    if _loaded:
        return torch.ops.ema_kernels_ext
    with _lock:
        if not _loaded and _load_error is None:
            try:
                importlib.import_module("ema_kernels._C")
            except ModuleNotFoundError as e:
                if os.environ.get("EMA_KERNELS_NO_EXT", "").strip().lower() in ("1", "true"):
                    why = "it was not built (EMA_KERNELS_NO_EXT=1 was set)"
                else:
                    why = f"it is not built ({e})"
                _load_error = f"the compiled extension ema_kernels._C cannot be used: {why}; " \
                              f"{REBUILD_HINT}"
            except Exception as e:  # ImportError (undefined symbol...), OSError
                _load_error = (f"the compiled extension ema_kernels._C is present but failed to "
                               f"load ({type(e).__name__}: {e}); it was probably built against "
                               f"another torch/CUDA version. Rebuild it: {REBUILD_HINT}")
            else:
                try:
                    _register_fakes()
                    raw = torch.ops.ema_kernels_ext.build_info()
                    _info = dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)
                    _loaded = True
                except Exception as e:
                    _load_error = (f"the compiled extension ema_kernels._C loaded but its ops "
                                   f"could not be registered ({type(e).__name__}: {e}). "
                                   f"Rebuild it: {REBUILD_HINT}")
    if not _loaded:
        raise ExtensionUnavailable(_load_error)
    return torch.ops.ema_kernels_ext


def extension_info() -> Dict[str, object]:
    """What the extension was built with, for ``python -m ema_kernels info``.

    Keys: ``built`` (bool), ``error`` (why not, if not built/loadable), ``cuda`` (bool: CUDA
    kernels compiled in), ``cuda_archs`` (the TORCH_CUDA_ARCH_LIST used, e.g. '8.0;9.0+PTX'),
    ``cuda_arch_list`` (the device-code archs nvcc compiled, e.g. '800,900'), ``cuda_version``,
    ``cpu_isa`` (the CPU kernel variant that runs here: 'avx2' or 'baseline'), ``openmp``, ``path``.
    """
    try:
        load_extension()
    except ExtensionUnavailable as e:
        return {"built": False, "error": str(e), "cuda": False}
    mod = importlib.import_module("ema_kernels._C")
    info: Dict[str, object] = dict(_info or {})
    info["built"] = True
    info["cuda"] = info.get("cuda") == "1"
    info["openmp"] = info.get("openmp") == "1"
    info["path"] = getattr(mod, "__file__", None)
    return info


def describe_extension() -> str:
    """One line for ``python -m ema_kernels info``: what the extension was built with."""
    info = extension_info()
    if not info["built"]:
        return f"not available: {info['error']}"
    cpu = f"CPU kernels {info.get('cpu_isa', '?')}{' + OpenMP' if info.get('openmp') else ''}"
    if info["cuda"]:
        ver = int(info.get("cuda_version", 0) or 0)
        cuda = (f"CUDA {ver // 1000}.{(ver % 1000) // 10} kernels for archs "
                f"{info.get('cuda_archs')} (device code {info.get('cuda_arch_list')})")
    else:
        cuda = "no CUDA kernels (CPU-only build)"
    return f"ema_kernels._C built: {cuda}; {cpu}"


def _built_archs() -> List[Tuple[int, int, bool]]:
    """(major, minor, ptx) for each arch in the build's TORCH_CUDA_ARCH_LIST."""
    out = []
    for item in str((_info or {}).get("cuda_archs", "")).replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = (item[:-4] if ptx else item).rstrip("a")
        major, _, minor = num.partition(".")
        try:
            out.append((int(major), int(minor or 0), ptx))
        except ValueError:
            continue
    return out


def _cuda_availability() -> Tuple[bool, str]:
    try:
        load_extension()
    except ExtensionUnavailable as e:
        return False, str(e)
    if (_info or {}).get("cuda") != "1":
        return False, ("the compiled extension was built without CUDA kernels (CPU-only: torch "
                       "was a CPU build or nvcc was not found at build time); rebuild it with "
                       "the CUDA toolkit available (or EMA_KERNELS_FORCE_CUDA=1): " + REBUILD_HINT)
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available here (torch.cuda.is_available() is False)"
    archs = _built_archs()
    if archs:
        cap = torch.cuda.get_device_capability()
        runs = any((maj == cap[0] and mnr <= cap[1]) or (ptx and (maj, mnr) <= cap)
                   for maj, mnr, ptx in archs)
        if not runs:
            return False, (f"the CUDA kernels were built for {_info.get('cuda_archs')} which "
                           f"cannot run on this sm_{cap[0]}{cap[1]} GPU; rebuild with "
                           f"TORCH_CUDA_ARCH_LIST='{cap[0]}.{cap[1]}': " + REBUILD_HINT)
    return True, f"compiled CUDA kernels for {(_info or {}).get('cuda_archs')}"


def availability(device_type: str) -> Tuple[bool, str]:
    """``(ok, reason)`` for running the ``cuda`` backend on ``device_type`` tensors."""
    if device_type != "cuda":
        return False, (f"the 'cuda' backend runs on CUDA tensors only, not {device_type} "
                       f"tensors (on CPU use 'cpp' or 'reference')")
    res = _avail_cache.get(device_type)
    if res is None:
        res = _avail_cache[device_type] = _cuda_availability()
    return res


# ----------------------------------------------------------------------------------------------
# Shared call path of the 'cuda' and 'cpp' backends
# ----------------------------------------------------------------------------------------------
def _ops_for(backend: str, device_type: str, params: List[Tensor]):
    """The ops namespace after checking that ``backend`` can run on these tensors."""
    if backend == "cuda":
        ok, why = availability("cuda")
    else:
        from . import cpp
        ok, why = cpp.availability("cpu")
    if not ok:
        raise ExtensionUnavailable(f"backend {backend!r} cannot run: {why}")
    if params:
        p0 = params[0]
        if p0.device.type != device_type:
            raise ValueError(f"backend {backend!r} runs on {device_type} tensors, but params[0] "
                             f"is on {p0.device}")
        if p0.dtype == torch.float64:
            raise TypeError(f"backend {backend!r} does not support float64 parameters (its "
                            f"kernels take float32, bfloat16 or float16); use "
                            f"backend='reference' for float64")
    return torch.ops.ema_kernels_ext


def _adam(backend, device_type, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas,
          lr, beta1, beta2, eps, weight_decay, decoupled, maximize, step_size,
          bias_correction2_sqrt, ema_weight, grad_scale, found_inf):
    ops = _ops_for(backend, device_type, params)
    if not params:
        return
    ops.adam_ema_(params, grads, exp_avgs, exp_avg_sqs,
                  list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else [],
                  list(emas) if (ema_weight is not None and emas is not None) else [],
                  lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                  weight_decay=float(weight_decay), decoupled=bool(decoupled),
                  maximize=bool(maximize), step_size=float(step_size),
                  bias_correction2_sqrt=float(bias_correction2_sqrt),
                  ema_weight=None if ema_weight is None else float(ema_weight),
                  grad_scale=grad_scale, found_inf=found_inf)


def _adam_capturable(backend, device_type, params, grads, exp_avgs, exp_avg_sqs,
                     max_exp_avg_sqs, emas, lr, step, beta1, beta2, eps, weight_decay,
                     decoupled, maximize, ema_weight, grad_scale, found_inf):
    ops = _ops_for(backend, device_type, params)
    if not params:
        return
    ops.adam_ema_capturable_(
        params, grads, exp_avgs, exp_avg_sqs,
        list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else [],
        list(emas) if (ema_weight is not None and emas is not None) else [],
        lr=lr, step=step, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
        weight_decay=float(weight_decay), decoupled=bool(decoupled), maximize=bool(maximize),
        ema_weight=ema_weight, grad_scale=grad_scale, found_inf=found_inf)


def _sgd(backend, device_type, params, grads, momentum_buffers, emas, lr, momentum, dampening,
         weight_decay, nesterov, maximize, first_step, ema_weight, grad_scale, found_inf):
    ops = _ops_for(backend, device_type, params)
    if not params:
        return
    if momentum != 0 and momentum_buffers is None:
        raise ValueError(f"backend {backend!r}: momentum={momentum} needs momentum_buffers")
    ops.sgd_ema_(params, grads,
                 list(momentum_buffers) if (momentum != 0 and momentum_buffers is not None) else [],
                 list(emas) if (ema_weight is not None and emas is not None) else [],
                 lr=float(lr), momentum=float(momentum), dampening=float(dampening),
                 weight_decay=float(weight_decay), nesterov=bool(nesterov),
                 maximize=bool(maximize), first_step=bool(first_step),
                 ema_weight=None if ema_weight is None else float(ema_weight),
                 grad_scale=grad_scale, found_inf=found_inf)


def _sgd_capturable(backend, device_type, params, grads, momentum_buffers, emas, lr, momentum,
                    dampening, weight_decay, nesterov, maximize, first_step, ema_weight,
                    grad_scale, found_inf):
    ops = _ops_for(backend, device_type, params)
    if not params:
        return
    if momentum != 0 and momentum_buffers is None:
        raise ValueError(f"backend {backend!r}: momentum={momentum} needs momentum_buffers")
    ops.sgd_ema_capturable_(
        params, grads,
        list(momentum_buffers) if (momentum != 0 and momentum_buffers is not None) else [],
        list(emas) if (ema_weight is not None and emas is not None) else [],
        lr=lr, momentum=float(momentum), dampening=float(dampening),
        weight_decay=float(weight_decay), nesterov=bool(nesterov), maximize=bool(maximize),
        first_step=bool(first_step), ema_weight=ema_weight, grad_scale=grad_scale,
        found_inf=found_inf)


def _ema_only(backend, device_type, params, emas, ema_weight):
    ops = _ops_for(backend, device_type, params)
    if not params:
        return
    ops.ema_only_(list(emas), list(params), ema_weight=float(ema_weight))


# ----------------------------------------------------------------------------------------------
# The backend interface (see ema_kernels.backends.reference)
# ----------------------------------------------------------------------------------------------
def adam_ema(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
             exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
             emas: Optional[List[Tensor]], *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, decoupled: bool, maximize: bool, step_size: float,
             bias_correction2_sqrt: float, ema_weight: Optional[float],
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """Adam / AdamW step followed by the EMA update, in one pass (CUDA kernels)."""
    _adam("cuda", "cuda", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas, lr,
          beta1, beta2, eps, weight_decay, decoupled, maximize, step_size,
          bias_correction2_sqrt, ema_weight, grad_scale, found_inf)


def sgd_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
            emas: Optional[List[Tensor]], *, lr: float, momentum: float, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
            ema_weight: Optional[float], grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None) -> None:
    """SGD step followed by the EMA update, in one pass (CUDA kernels)."""
    _sgd("cuda", "cuda", params, grads, momentum_buffers, emas, lr, momentum, dampening,
         weight_decay, nesterov, maximize, first_step, ema_weight, grad_scale, found_inf)


def ema_only(params: List[Tensor], emas: List[Tensor], ema_weight: float) -> None:
    """ζ += w (θ − ζ) for parameters that took no optimizer step but whose EMA clock ticked."""
    _ema_only("cuda", "cuda", params, emas, ema_weight)


def adam_ema_capturable(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                        exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
                        emas: Optional[List[Tensor]], *, lr: Tensor, step: Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled: bool, maximize: bool, ema_weight: Optional[Tensor],
                        grad_scale: Optional[Tensor] = None,
                        found_inf: Optional[Tensor] = None) -> None:
    """Capturable Adam/AdamW + EMA: ``lr``, ``step`` (t, already incremented) and ``ema_weight``
    (1 − ρ̂, or None for no EMA update) are one-element float32 device tensors."""
    _adam_capturable("cuda", "cuda", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas,
                     lr, step, beta1, beta2, eps, weight_decay, decoupled, maximize, ema_weight,
                     grad_scale, found_inf)


def sgd_ema_capturable(params: List[Tensor], grads: List[Tensor],
                       momentum_buffers: Optional[List[Tensor]], emas: Optional[List[Tensor]], *,
                       lr: Tensor, momentum: float, dampening: float, weight_decay: float,
                       nesterov: bool, maximize: bool, first_step: bool,
                       ema_weight: Optional[Tensor], grad_scale: Optional[Tensor] = None,
                       found_inf: Optional[Tensor] = None) -> None:
    """Capturable SGD + EMA: ``lr`` and ``ema_weight`` are one-element float32 device tensors."""
    _sgd_capturable("cuda", "cuda", params, grads, momentum_buffers, emas, lr, momentum,
                    dampening, weight_decay, nesterov, maximize, first_step, ema_weight,
                    grad_scale, found_inf)
