"""CUDA backend: the compiled extension's CUDA kernels (csrc/fused_cuda.cu) on CUDA tensors.

With ``EMA_KERNELS_CUDA_EMULATION=1`` set before ema_kernels is first imported, also on CPU
tensors: the same kernels compiled for the host (``ema_kernels._C_emu``, csrc/cuda_emu.h), every
launch run as a loop over its blocks and threads -- the same ops, schemas, checks and launch
code as on a GPU, only the device emulated.  A test vehicle (as Triton under
``TRITON_INTERPRET=1``): ``available_backends("cpu")`` then lists ``cuda`` last and ``auto``
never picks it.

The compiled libraries are loaded lazily by :mod:`ema_kernels.backends._extension` (shared with
the ``cpp`` backend): importing this module loads nothing and queries no device.  Ops: see there.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from . import _extension as _ext
from ._extension import (EMULATION, EMULATION_ENV, REBUILD_HINT, ExtensionUnavailable,
                         load_extension)
# Re-exported where they always were (the CLI and tests ask this module).
from ._extension import describe_extension, extension_info  # noqa: F401

Tensor = torch.Tensor

NAME = "cuda"

_avail_cache: Dict[str, Tuple[bool, str]] = {}


def _built_archs() -> List[Tuple[int, int, bool]]:
    """(major, minor, ptx) for each arch in the build's TORCH_CUDA_ARCH_LIST."""
    out = []
    for item in str(_ext.MAIN.info.get("cuda_archs", "")).replace(",", ";").split(";"):
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
    if _ext.MAIN.info.get("cuda") != "1":
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
            built = _ext.MAIN.info.get("cuda_archs")
            return False, (f"the CUDA kernels were built for {built} which "
                           f"cannot run on this sm_{cap[0]}{cap[1]} GPU; rebuild with "
                           f"TORCH_CUDA_ARCH_LIST='{cap[0]}.{cap[1]}': " + REBUILD_HINT)
    return True, f"compiled CUDA kernels for {_ext.MAIN.info.get('cuda_archs')}"


def _emulation_availability() -> Tuple[bool, str]:
    try:
        _ext.load_emulation()
    except ExtensionUnavailable as e:
        return False, f"{EMULATION_ENV}=1 is set but the emulation build cannot be used: {e}"
    return True, (f"the CUDA kernels emulated on the CPU ({EMULATION_ENV}=1; "
                  f"ema_kernels._C_emu): a test vehicle, never auto's choice")


def availability(device_type: str) -> Tuple[bool, str]:
    """``(ok, reason)`` for running the ``cuda`` backend on ``device_type`` tensors."""
    res = _avail_cache.get(device_type)
    if res is None:
        if device_type == "cuda":
            res = _cuda_availability()
        elif device_type == "cpu" and EMULATION:
            res = _emulation_availability()
        else:
            res = (False, f"the 'cuda' backend runs on CUDA tensors only, not {device_type} "
                          f"tensors (on CPU use 'cpp' or 'reference'; to run its kernels on CPU "
                          f"tensors as a test, set {EMULATION_ENV}=1 before importing "
                          f"ema_kernels)")
        _avail_cache[device_type] = res
    return res


def _ops_for(params: List[Tensor]):
    """The ops namespace for these tensors after checking that the backend can run on them:
    the emulation build's for CPU tensors under emulation, the extension's otherwise."""
    on_cpu = (params[0].device.type == "cpu") if params else EMULATION
    if on_cpu and EMULATION:
        ok, why = availability("cpu")
        if not ok:
            raise ExtensionUnavailable(f"backend 'cuda' cannot run: {why}")
        _ext.check_params(NAME, params)
        return torch.ops.ema_kernels_emu
    ok, why = availability("cuda")
    if not ok:
        raise ExtensionUnavailable(f"backend 'cuda' cannot run: {why}")
    if params and params[0].device.type != "cuda":
        raise ValueError(f"backend 'cuda' runs on cuda tensors, but params[0] is on "
                         f"{params[0].device}")
    _ext.check_params(NAME, params)
    return torch.ops.ema_kernels_ext


# ----------------------------------------------------------------------------------------------
# The backend interface (see ema_kernels.backends.reference)
# ----------------------------------------------------------------------------------------------
def adam_ema(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
             exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
             emas: Optional[List[Tensor]], *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, decoupled: bool, maximize: bool, step_size: float,
             bias_correction2_sqrt: float, ema_weight: Optional[float],
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """Adam / AdamW step followed by the EMA update, in one pass (CUDA kernels)."""
    ops = _ops_for(params)
    if params:
        _ext.adam(ops, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas, lr, beta1,
                  beta2, eps, weight_decay, decoupled, maximize, step_size,
                  bias_correction2_sqrt, ema_weight, grad_scale, found_inf,
                  (stochastic_rounding, sr_seed, sr_step, sr_offsets))


def sgd_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
            emas: Optional[List[Tensor]], *, lr: float, momentum: float, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
            ema_weight: Optional[float], grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
            sr_seed: int = 0, sr_step: int = 0, sr_offsets: Optional[List[int]] = None) -> None:
    """SGD step followed by the EMA update, in one pass (CUDA kernels)."""
    ops = _ops_for(params)
    if params:
        _ext.sgd(NAME, ops, params, grads, momentum_buffers, emas, lr, momentum, dampening,
                 weight_decay, nesterov, maximize, first_step, ema_weight, grad_scale, found_inf,
                 (stochastic_rounding, sr_seed, sr_step, sr_offsets))


def ema_only(params: List[Tensor], emas: List[Tensor], ema_weight: float) -> None:
    """ζ += w (θ − ζ) for parameters that took no optimizer step but whose EMA clock ticked."""
    ops = _ops_for(params)
    if params:
        _ext.ema_only(ops, params, emas, ema_weight)


def adam_ema_capturable(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                        exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
                        emas: Optional[List[Tensor]], *, lr: Tensor, step: Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled: bool, maximize: bool, ema_weight: Optional[Tensor],
                        grad_scale: Optional[Tensor] = None,
                        found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
                        sr_seed: int = 0, sr_step: int = 0,
                        sr_offsets: Optional[List[int]] = None) -> None:
    """Capturable Adam/AdamW + EMA: ``lr``, ``step`` (t, already incremented) and ``ema_weight``
    (1 − ρ̂, or None for no EMA update) are one-element float32 device tensors."""
    ops = _ops_for(params)
    if params:
        _ext.adam_capturable(ops, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas,
                             lr, step, beta1, beta2, eps, weight_decay, decoupled, maximize,
                             ema_weight, grad_scale, found_inf,
                             (stochastic_rounding, sr_seed, sr_step, sr_offsets))


def sgd_ema_capturable(params: List[Tensor], grads: List[Tensor],
                       momentum_buffers: Optional[List[Tensor]], emas: Optional[List[Tensor]], *,
                       lr: Tensor, momentum: float, dampening: float, weight_decay: float,
                       nesterov: bool, maximize: bool, first_step: bool,
                       ema_weight: Optional[Tensor], grad_scale: Optional[Tensor] = None,
                       found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
                       sr_seed: int = 0, sr_step: int = 0,
                       sr_offsets: Optional[List[int]] = None) -> None:
    """Capturable SGD + EMA: ``lr`` and ``ema_weight`` are one-element float32 device tensors."""
    ops = _ops_for(params)
    if params:
        _ext.sgd_capturable(NAME, ops, params, grads, momentum_buffers, emas, lr, momentum,
                            dampening, weight_decay, nesterov, maximize, first_step, ema_weight,
                            grad_scale, found_inf, (stochastic_rounding, sr_seed, sr_step,
                                                    sr_offsets))


def lion_ema(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], emas, *, lr,
             beta1: float, beta2: float, weight_decay: float, maximize: bool, ema_weight,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """Lion + EMA in one pass (issue 25; see :func:`ema_kernels.backends.cpp.lion_ema`)."""
    ops = _ops_for(params)
    if params:
        _ext.lion(ops, params, grads, exp_avgs, emas, lr, beta1, beta2, weight_decay, maximize,
                  ema_weight, grad_scale, found_inf,
                  (stochastic_rounding, sr_seed, sr_step, sr_offsets))


def lars_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
             emas, *, coefs: Tensor, lr, momentum: float, dampening: float, nesterov: bool,
             maximize: bool, first_step: bool, ema_weight, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
             sr_seed: int = 0, sr_step: int = 0, sr_offsets: Optional[List[int]] = None) -> None:
    """LARS + EMA in one pass (issue 25; see :func:`ema_kernels.backends.cpp.lars_ema`): per tensor
    ``d = ratio·(g + λθ)`` from ``coefs`` (n, 2), then SGD's momentum. ``lr`` a number, or a
    one-element float32 tensor read by the kernel (then ``ema_weight`` is a float32 tensor with
    one element per EMA, or None)."""
    ops = _ops_for(params)
    if params:
        _ext.lars(ops, params, grads, momentum_buffers, emas, coefs, lr, momentum, dampening,
                  nesterov, maximize, first_step, ema_weight, grad_scale, found_inf,
                  (stochastic_rounding, sr_seed, sr_step, sr_offsets))


def lamb_moments(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                 exp_avg_sqs: List[Tensor], *, beta1: float, beta2: float, eps: float,
                 weight_decay: float, maximize: bool, bias_correction1, bias_correction2_sqrt,
                 grad_scale: Optional[Tensor] = None,
                 found_inf: Optional[Tensor] = None) -> Tensor:
    """LAMB's first pass (issue 25; the reference's interface): m, v updated; returns the
    (n, 2) float32 per-tensor (Σθ², Σr²), accumulated in float64. A skipped step (found_inf)
    moves nothing and returns zeros (the second pass then moves nothing either)."""
    ops = _ops_for(params)
    if not params:
        return torch.zeros(0, 2)
    return _ext.lamb_moments(ops, params, grads, exp_avgs, exp_avg_sqs, beta1, beta2, eps,
                             weight_decay, maximize, bias_correction1, bias_correction2_sqrt,
                             grad_scale, found_inf)


def lamb_ema(params: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], emas, *,
             step_sizes: Tensor, eps: float, weight_decay: float, bias_correction1,
             bias_correction2_sqrt, ema_weight, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """LAMB's second pass (issue 25): ``θ -= step_sizes[i]·r``, r recomputed bit for bit from
    the stored moments, then the EMAs. ``ema_weight`` numbers, or a float32 device tensor."""
    ops = _ops_for(params)
    if params:
        _ext.lamb_ema(ops, params, exp_avgs, exp_avg_sqs, emas, step_sizes, eps, weight_decay,
                      bias_correction1, bias_correction2_sqrt, ema_weight, found_inf,
                      (stochastic_rounding, sr_seed, sr_step, sr_offsets))


# ----------------------------------------------------------------------------------------------
# Emulation build: the kernels' memory traffic (csrc/cuda_emu.h counts every global access)
# ----------------------------------------------------------------------------------------------
# the order of torch.ops.ema_kernels_emu.emu_stats()
_COUNTERS = ("launches", "blocks", "occupancy_queries", "bytes_read", "bytes_written",
             "bytes_vector", "arg_reads", "table_uploads", "atomics")
_counter_base: Optional[List[int]] = None


def _emu_stats() -> List[int]:
    try:
        ops = _ext.load_emulation()
    except ExtensionUnavailable as e:
        raise ExtensionUnavailable(f"the emulation counters need the emulation build "
                                   f"(ema_kernels._C_emu): {e}") from None
    stats = list(ops.emu_stats())
    if len(stats) < len(_COUNTERS):
        raise ExtensionUnavailable("this ema_kernels._C_emu predates the traffic counters: "
                                   + REBUILD_HINT)
    return stats


def emulation_counters() -> Dict[str, int]:
    """What the emulated CUDA kernels did since :func:`reset_emulation_counters` (or since the
    emulation build was loaded): ``launches``, ``bytes_read`` and ``bytes_written`` (global
    memory, every load and store of the kernels), ``bytes_vector`` (the part of both moved by
    16-byte accesses), plus ``blocks`` and ``arg_reads`` (per-thread reads of launch arguments
    kept in device memory: found_inf, grad_scale, the capturable lr/step/EMA weights, the list
    kernels' work table, LARS' and LAMB's per-tensor values -- the same few bytes for every
    thread, not part of the update's bytes), ``table_uploads`` (list launches that copied their
    work table to the device: only when a set's pointers changed, csrc/list_tables.cpp) and
    ``atomics`` (atomicAdd calls: LAMB's per-tensor sums, one per thread and sum).

    The emulation build only (``ema_kernels._C_emu``; ``EMA_KERNELS_CUDA_EMULATION=1`` runs the
    ``cuda`` backend on CPU tensors through it). Counts are process-wide."""
    stats = _emu_stats()
    base = _counter_base or [0] * len(_COUNTERS)
    return {k: int(v - b) for k, v, b in zip(_COUNTERS, stats, base)}


def reset_emulation_counters() -> None:
    """Start :func:`emulation_counters` from zero."""
    global _counter_base
    _counter_base = _emu_stats()[:len(_COUNTERS)]
