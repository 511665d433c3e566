"""The compiled extensions: lazy loading and the call path into their ops.

Shared by the ``cpp`` and ``cuda`` backends (which therefore do not import each other).  Two
libraries, each registering its ops in its own namespace (schemas in csrc/bindings.cpp, every op
mutates lists in place):

- ``ema_kernels._C`` → ``torch.ops.ema_kernels_ext``: the CPU twin (csrc/fused_cpu.cpp) for CPU
  tensors and, in a CUDA build, the CUDA kernels (csrc/fused_cuda.cu) for CUDA tensors.
- ``ema_kernels._C_emu`` → ``torch.ops.ema_kernels_emu``: the emulation build, the same
  fused_cuda.cu compiled as host C++ (csrc/cuda_emu.h), registered for CPU tensors: the CUDA
  kernels' launch logic run on the CPU as loops over blocks and threads.  Used by the ``cuda``
  backend on CPU tensors when ``EMA_KERNELS_CUDA_EMULATION=1`` was set before ema_kernels was
  first imported (read once, here, at import: like ``TRITON_INTERPRET``, it is a property of the
  process, so that every cache of backend availability stays valid).

Ops: ``adam_ema_`` / ``sgd_ema_`` (the interface of :mod:`ema_kernels.backends.reference`;
the EMA lists concatenated EMA-major in ``emas``, one float per EMA in ``ema_weights``),
``adam_ema_capturable_`` / ``sgd_ema_capturable_`` (lr, step and the EMA weight read from
one-element float32 tensors on the parameters' device), ``ema_only_``, the issue-25 rules'
``lion_ema_`` / ``lion_ema_capturable_``, ``lars_ema_``, ``lamb_moments_`` and ``lamb_ema_``
(these three take their device scalars as optional tensor arguments: ``lr_tensor``,
``bias_corrections``, ``ema_weight``), ``build_info``; in
``_C_emu`` also the emulation-only ``emu_*`` probes used by tests/test_cuda_emulation.py.

Importing this module loads nothing and queries no device: a library is imported on first use
or on an availability query.  A missing or broken one becomes an :class:`ExtensionUnavailable`
error that says how to rebuild it, raised only when a backend that needs it is asked for.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import Dict, List, Optional

import torch

from . import _emas

Tensor = torch.Tensor

EMULATION_ENV = "EMA_KERNELS_CUDA_EMULATION"
EMULATION: bool = os.environ.get(EMULATION_ENV, "").strip().lower() in ("1", "true", "yes", "on")

REBUILD_HINT = ("build it from the source tree with `pip install --no-build-isolation -e .` "
                "(needs torch installed first; or `MAX_JOBS=2 python setup.py build_ext "
                "--inplace` for a development build)")

_OPS = ("adam_ema_", "adam_ema_capturable_", "sgd_ema_", "sgd_ema_capturable_", "ema_only_",
        "lion_ema_", "lion_ema_capturable_", "lars_ema_", "lamb_moments_", "lamb_ema_")


class ExtensionUnavailable(RuntimeError):
    """The compiled extension (or the part of it a backend needs) cannot be used here."""


class _Library:
    """One compiled library, imported once (thread-safe); its build_info parsed."""

    def __init__(self, module: str, namespace: str):
        self.module = module
        self.namespace = namespace
        self._lock = threading.Lock()
        self.loaded = False
        self.error: Optional[str] = None
        self.info: Dict[str, str] = {}

    def load(self):
        """``torch.ops.<namespace>``; raises :class:`ExtensionUnavailable` saying why and how
        to rebuild if the library cannot be loaded."""
        if self.loaded:
            return getattr(torch.ops, self.namespace)
        with self._lock:
            if not self.loaded and self.error is None:
                self._load_locked()
        if not self.loaded:
            raise ExtensionUnavailable(self.error)
        return getattr(torch.ops, self.namespace)

    def _load_locked(self) -> None:
        try:
            mod = importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            if os.environ.get("EMA_KERNELS_NO_EXT", "").strip().lower() in ("1", "true"):
                why = "it was not built (EMA_KERNELS_NO_EXT=1 was set)"
            else:
                why = f"it is not built ({e})"
            self.error = f"the compiled extension {self.module} cannot be used: {why}; " \
                         f"{REBUILD_HINT}"
            return
        except (ImportError, OSError) as e:  # undefined symbol, wrong ABI, unreadable file
            self.error = (f"the compiled extension {self.module} is present but failed to load "
                          f"({type(e).__name__}: {e}); it was probably built against another "
                          f"torch/CUDA version. Rebuild it: {REBUILD_HINT}")
            return
        ops = getattr(torch.ops, self.namespace)
        try:
            _register_fakes(self.namespace)
            raw = ops.build_info()
        except (RuntimeError, AttributeError) as e:  # ops missing or registered differently
            self.error = (f"the compiled extension {self.module} loaded but its ops could not "
                          f"be registered ({type(e).__name__}: {e}). Rebuild it: {REBUILD_HINT}")
            return
        self.info = dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)
        self.info["path"] = getattr(mod, "__file__", None) or ""
        self.loaded = True


def _register_fakes(namespace: str) -> None:
    """Fake (meta) implementations: every op mutates its inputs in place and returns nothing,
    so tracing (FakeTensor, torch.compile) needs only to know that no output is produced."""
    def _none(*args, **kwargs):
        return None

    for op in _OPS:
        torch.library.register_fake(f"{namespace}::{op}")(_none)


MAIN = _Library("ema_kernels._C", "ema_kernels_ext")
EMU = _Library("ema_kernels._C_emu", "ema_kernels_emu")


def load_extension():
    """Import ``ema_kernels._C`` once and return ``torch.ops.ema_kernels_ext``."""
    return MAIN.load()


def load_emulation():
    """Import ``ema_kernels._C_emu`` once and return ``torch.ops.ema_kernels_emu``."""
    return EMU.load()


def extension_info() -> Dict[str, object]:
    """What the extension was built with, for ``python -m ema_kernels info``.

    Keys: ``built`` (bool), ``error`` (why not, if not built/loadable), ``cuda`` (bool: CUDA
    kernels compiled in), ``cuda_archs`` (the TORCH_CUDA_ARCH_LIST used, e.g. '8.0;9.0+PTX'),
    ``cuda_arch_list`` (the device-code archs nvcc compiled, e.g. '800,900'), ``cuda_version``,
    ``cpu_isa`` (the CPU kernel variant that runs here: 'avx2' or 'baseline'), ``openmp``,
    ``path``, and ``emulation`` (whether ``ema_kernels._C_emu`` loads) with ``emulation_error``.
    """
    try:
        load_extension()
    except ExtensionUnavailable as e:
        info: Dict[str, object] = {"built": False, "error": str(e), "cuda": False}
    else:
        info = dict(MAIN.info)
        info["built"] = True
        info["cuda"] = info.get("cuda") == "1"
        info["openmp"] = info.get("openmp") == "1"
    try:
        load_emulation()
    except ExtensionUnavailable as e:
        info["emulation"] = False
        info["emulation_error"] = str(e)
    else:
        info["emulation"] = True
        info["emulation_path"] = EMU.info.get("path")
    return info


def describe_extension() -> str:
    """Two lines for ``python -m ema_kernels info``: what the extensions were built with."""
    info = extension_info()
    if not info["built"]:
        main = f"not available: {info['error']}"
    else:
        cpu = f"CPU kernels {info.get('cpu_isa', '?')}{' + OpenMP' if info.get('openmp') else ''}"
        if info["cuda"]:
            ver = int(info.get("cuda_version", 0) or 0)
            cuda = (f"CUDA {ver // 1000}.{(ver % 1000) // 10} kernels for archs "
                    f"{info.get('cuda_archs')} (device code {info.get('cuda_arch_list')})")
        else:
            cuda = "no CUDA kernels (CPU-only build)"
        main = f"ema_kernels._C built: {cuda}; {cpu}"
    if info["emulation"]:
        state = "on" if EMULATION else f"off: set {EMULATION_ENV}=1 before importing to use it"
        emu = (f"ema_kernels._C_emu built: the CUDA kernels compiled for the host, the 'cuda' "
               f"backend on CPU tensors ({state})")
    else:
        emu = f"emulation build not available: {info['emulation_error']}"
    return f"{main}\n             {emu}"


# ----------------------------------------------------------------------------------------------
# The call path of the 'cuda' and 'cpp' backends: `ops` is the namespace the backend resolved
# for these tensors (after its own availability and device checks).
# ----------------------------------------------------------------------------------------------
def check_params(backend: str, params: List[Tensor]) -> None:
    if params and params[0].dtype == torch.float64:
        raise TypeError(f"backend {backend!r} does not support float64 parameters (its "
                        f"kernels take float32, bfloat16 or float16); use "
                        f"backend='reference' for float64")


def _sr_kwargs(sr) -> dict:
    """The ops' stochastic-rounding arguments from ``(on, seed, step, offsets)`` (None: off;
    the defaults are the schemas', so a call without it is the op as it always was)."""
    if sr is None or not sr[0]:
        return {}
    on, seed, step, offsets = sr
    return dict(stochastic_rounding=True, sr_seed=int(seed), sr_step=int(step),
                sr_offsets=None if offsets is None else [int(o) for o in offsets])


def adam(ops, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas, lr, beta1, beta2,
         eps, weight_decay, decoupled, maximize, step_size, bias_correction2_sqrt, ema_weight,
         grad_scale, found_inf, sr=None):
    lists, weights = _emas.ema_lists(emas, ema_weight, len(params), "adam_ema")
    ops.adam_ema_(params, grads, exp_avgs, exp_avg_sqs,
                  list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else [],
                  _emas.flat(lists),
                  lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                  weight_decay=float(weight_decay), decoupled=bool(decoupled),
                  maximize=bool(maximize), step_size=float(step_size),
                  bias_correction2_sqrt=float(bias_correction2_sqrt), ema_weights=weights,
                  grad_scale=grad_scale, found_inf=found_inf, **_sr_kwargs(sr))


def adam_capturable(ops, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas, lr, step,
                    beta1, beta2, eps, weight_decay, decoupled, maximize, ema_weight, grad_scale,
                    found_inf, sr=None):
    lists, ema_weight = _emas.ema_lists_capturable(emas, ema_weight, len(params),
                                                   "adam_ema_capturable")
    ops.adam_ema_capturable_(
        params, grads, exp_avgs, exp_avg_sqs,
        list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else [],
        _emas.flat(lists),
        lr=lr, step=step, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
        weight_decay=float(weight_decay), decoupled=bool(decoupled), maximize=bool(maximize),
        ema_weight=ema_weight, grad_scale=grad_scale, found_inf=found_inf, **_sr_kwargs(sr))


def sgd(backend, ops, params, grads, momentum_buffers, emas, lr, momentum, dampening,
        weight_decay, nesterov, maximize, first_step, ema_weight, grad_scale, found_inf,
        sr=None):
    if momentum != 0 and momentum_buffers is None:
        raise ValueError(f"backend {backend!r}: momentum={momentum} needs momentum_buffers")
    lists, weights = _emas.ema_lists(emas, ema_weight, len(params), "sgd_ema")
    ops.sgd_ema_(params, grads,
                 list(momentum_buffers) if (momentum != 0 and momentum_buffers is not None) else [],
                 _emas.flat(lists),
                 lr=float(lr), momentum=float(momentum), dampening=float(dampening),
                 weight_decay=float(weight_decay), nesterov=bool(nesterov),
                 maximize=bool(maximize), first_step=bool(first_step), ema_weights=weights,
                 grad_scale=grad_scale, found_inf=found_inf, **_sr_kwargs(sr))


def sgd_capturable(backend, ops, params, grads, momentum_buffers, emas, lr, momentum, dampening,
                   weight_decay, nesterov, maximize, first_step, ema_weight, grad_scale,
                   found_inf, sr=None):
    if momentum != 0 and momentum_buffers is None:
        raise ValueError(f"backend {backend!r}: momentum={momentum} needs momentum_buffers")
    lists, ema_weight = _emas.ema_lists_capturable(emas, ema_weight, len(params),
                                                   "sgd_ema_capturable")
    ops.sgd_ema_capturable_(
        params, grads,
        list(momentum_buffers) if (momentum != 0 and momentum_buffers is not None) else [],
        _emas.flat(lists),
        lr=lr, momentum=float(momentum), dampening=float(dampening),
        weight_decay=float(weight_decay), nesterov=bool(nesterov), maximize=bool(maximize),
        first_step=bool(first_step), ema_weight=ema_weight, grad_scale=grad_scale,
        found_inf=found_inf, **_sr_kwargs(sr))


def ema_only(ops, params, emas, ema_weight):
    lists, weights = _emas.ema_lists(emas, ema_weight, len(params), "ema_only")
    ops.ema_only_(_emas.flat(lists), list(params), ema_weights=weights)


def lion(ops, params, grads, exp_avgs, emas, lr, beta1, beta2, weight_decay, maximize,
         ema_weight, grad_scale, found_inf, sr=None):
    """Lion + EMA (issue 25): ``lr`` a number, or a one-element float32 tensor (read by the
    kernels: the capturable op); ``ema_weight`` numbers, or (capturable) a float32 tensor."""
    if isinstance(lr, Tensor):
        lists, ema_weight = _emas.ema_lists_capturable(emas, ema_weight, len(params),
                                                       "lion_ema_capturable")
        ops.lion_ema_capturable_(params, grads, list(exp_avgs), _emas.flat(lists), lr=lr,
                                 beta1=float(beta1), beta2=float(beta2),
                                 weight_decay=float(weight_decay), maximize=bool(maximize),
                                 ema_weight=ema_weight, grad_scale=grad_scale,
                                 found_inf=found_inf, **_sr_kwargs(sr))
        return
    lists, weights = _emas.ema_lists(emas, ema_weight, len(params), "lion_ema")
    ops.lion_ema_(params, grads, list(exp_avgs), _emas.flat(lists), lr=float(lr),
                  beta1=float(beta1), beta2=float(beta2), weight_decay=float(weight_decay),
                  maximize=bool(maximize), ema_weights=weights, grad_scale=grad_scale,
                  found_inf=found_inf, **_sr_kwargs(sr))


def _device_emas(emas, ema_weight, n, what):
    """``(lists, host weights, device weights)``: a float32 tensor ``ema_weight`` (the
    capturable steps) is read by the kernels; numbers are passed as numbers."""
    if isinstance(ema_weight, Tensor):
        lists, dev = _emas.ema_lists_capturable(emas, ema_weight, n, what)
        return lists, [], dev
    lists, weights = _emas.ema_lists(emas, ema_weight, n, what)
    return lists, weights, None


def lars(ops, params, grads, momentum_buffers, emas, coefs, lr, momentum, dampening, nesterov,
         maximize, first_step, ema_weight, grad_scale, found_inf, sr=None):
    """LARS + EMA (issue 25): ``coefs`` the (n, 2) float32 per-tensor (trust ratio, weight decay
    applied); ``lr`` a number, or a one-element float32 tensor read by the kernels (then
    ``ema_weight`` is None or a float32 tensor with one element per EMA)."""
    if momentum != 0 and momentum_buffers is None:
        raise ValueError(f"lars_ema: momentum={momentum} needs momentum_buffers")
    bufs = list(momentum_buffers) if momentum != 0 else []
    if isinstance(lr, Tensor):
        lists, weights, dev_w = _device_emas(emas, ema_weight, len(params), "lars_ema")
        lr_host, lr_dev = 0.0, lr
    else:
        lists, weights = _emas.ema_lists(emas, ema_weight, len(params), "lars_ema")
        dev_w, lr_host, lr_dev = None, float(lr), None
    ops.lars_ema_(params, grads, bufs, _emas.flat(lists), coefs=coefs.contiguous(),
                  lr=lr_host, momentum=float(momentum), dampening=float(dampening),
                  nesterov=bool(nesterov), maximize=bool(maximize), first_step=bool(first_step),
                  ema_weights=weights, lr_tensor=lr_dev, ema_weight=dev_w,
                  grad_scale=grad_scale, found_inf=found_inf, **_sr_kwargs(sr))


def _bias_corrections(bc1, bc2_sqrt, device):
    """``(host bc1, host bc2, device tensor or None)``: device scalars (a device step count)
    become one float32 (2,) tensor the kernels read; numbers stay host numbers."""
    if not isinstance(bc1, Tensor) and not isinstance(bc2_sqrt, Tensor):
        return float(bc1), float(bc2_sqrt), None
    parts = [x.detach().reshape(()).to(device=device, dtype=torch.float64)
             if isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float64,
                                                        device=device)
             for x in (bc1, bc2_sqrt)]
    return 1.0, 1.0, torch.stack(parts).to(torch.float32)


def lamb_moments(ops, params, grads, exp_avgs, exp_avg_sqs, beta1, beta2, eps, weight_decay,
                 maximize, bias_correction1, bias_correction2_sqrt, grad_scale, found_inf):
    """LAMB pass 1: m, v updated; returns the (n, 2) float32 per-tensor (Σθ², Σr²), summed by
    the kernels in float64 into a zeroed accumulator (no host read)."""
    dev = params[0].device
    acc = torch.zeros(len(params), 2, dtype=torch.float64, device=dev)
    bc1, bc2, bc = _bias_corrections(bias_correction1, bias_correction2_sqrt, dev)
    ops.lamb_moments_(params, grads, list(exp_avgs), list(exp_avg_sqs), acc, beta1=float(beta1),
                      beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
                      maximize=bool(maximize), bias_correction1=bc1, bias_correction2_sqrt=bc2,
                      bias_corrections=bc, grad_scale=grad_scale, found_inf=found_inf)
    return acc.to(torch.float32)


def lamb_ema(ops, params, exp_avgs, exp_avg_sqs, emas, step_sizes, eps, weight_decay,
             bias_correction1, bias_correction2_sqrt, ema_weight, found_inf, sr=None):
    """LAMB pass 2: θ -= step_sizes[i]·r (r recomputed), then the EMAs."""
    lists, weights, dev_w = _device_emas(emas, ema_weight, len(params), "lamb_ema")
    bc1, bc2, bc = _bias_corrections(bias_correction1, bias_correction2_sqrt, params[0].device)
    ops.lamb_ema_(params, list(exp_avgs), list(exp_avg_sqs), _emas.flat(lists),
                  step_sizes=step_sizes.to(torch.float32).contiguous(), eps=float(eps),
                  weight_decay=float(weight_decay), bias_correction1=bc1,
                  bias_correction2_sqrt=bc2, ema_weights=weights, bias_corrections=bc,
                  ema_weight=dev_w, found_inf=found_inf, **_sr_kwargs(sr))
