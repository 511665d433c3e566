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
from ._compiled import CompiledBackend
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
_compiled = CompiledBackend(NAME, _ops_for)
adam_ema = _compiled.adam_ema
sgd_ema = _compiled.sgd_ema
ema_only = _compiled.ema_only
adam_ema_capturable = _compiled.adam_ema_capturable
sgd_ema_capturable = _compiled.sgd_ema_capturable
lion_ema = _compiled.lion_ema
lars_ema = _compiled.lars_ema
lamb_moments = _compiled.lamb_moments
lamb_ema = _compiled.lamb_ema


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
