"""How many programs a tensor-list launch runs: a whole number of resident waves (issue 24 §2).

The list kernels are persistent: program p runs chunks p, p + P, p + 2P, ... of the launch's
chunk table, so any grid P >= 1 computes the same bits.  :func:`programs` picks
P = min(n_chunks, SMs x programs resident per SM): one full wave of long-lived programs when
the set has the chunks for it, one program per chunk when it has fewer.

Programs resident per SM come from the compiled kernel (registers per thread, warps, shared
memory) and the device (registers, threads and shared memory per SM, SM count), cached per
(device, kernel variant).  A variant's compiled kernel is known once it has been launched on a
device: its first launch there runs one program per chunk (correct whatever the grid) and
:func:`record` reads the occupancy from the kernel it returns.  Nothing is queried at import,
and a device's properties only at the first launch on it.

Under TRITON_INTERPRET=1 there is no device: ``config.INTERPRETER_PROGRAMS``.
``config.PROGRAMS`` (None by default) overrides both.
"""
from __future__ import annotations

from typing import Dict, Hashable, Optional

import torch

from . import config

# sm_80 / sm_90: at most 32 resident blocks per SM (lower on consumer parts, where the thread
# limit binds first for the 8-warp programs of config.NUM_WARPS); registers are allocated per
# warp in units of 256
_MAX_BLOCKS_PER_SM = 32
_REG_UNIT = 256

_capacity: Dict[Hashable, int] = {}      # (device, variant) -> programs in one wave
_interpreted: Optional[bool] = None


def _is_interpreted() -> bool:
    global _interpreted
    if _interpreted is None:
        from .checks import _interpreted as interp
        _interpreted = interp()
    return _interpreted


def programs(key: Hashable, device: torch.device, n_chunks: int) -> int:
    """The grid of a list launch of ``n_chunks`` chunks of the variant ``key`` on ``device``."""
    if config.PROGRAMS is not None:
        return max(1, min(n_chunks, int(config.PROGRAMS)))
    if device.type != "cuda" or _is_interpreted():
        return max(1, min(n_chunks, config.INTERPRETER_PROGRAMS))
    cap = _capacity.get(key)
    return n_chunks if cap is None else min(n_chunks, cap)


def record(key: Hashable, device: torch.device, compiled) -> None:
    """After a launch of ``key`` on ``device``: remember its wave size, from the kernel the
    launch returned (the interpreter returns none: nothing to learn)."""
    if key in _capacity or compiled is None or device.type != "cuda":
        return
    n_regs = getattr(compiled, "n_regs", None)
    if n_regs is None:
        return
    props = torch.cuda.get_device_properties(device)
    per_sm = resident_programs(n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                               props.regs_per_multiprocessor,
                               props.max_threads_per_multi_processor,
                               props.shared_memory_per_multiprocessor, props.warp_size)
    _capacity[key] = props.multi_processor_count * per_sm


def resident_programs(n_regs: int, num_warps: int, shared: int, regs_per_sm: int,
                      threads_per_sm: int, shared_per_sm: int, warp_size: int = 32) -> int:
    """Programs of ``num_warps`` warps, ``n_regs`` registers per thread and ``shared`` bytes of
    shared memory that one SM holds at once (at least 1)."""
    warp_regs = -(-max(n_regs, 1) * warp_size // _REG_UNIT) * _REG_UNIT
    limits = [regs_per_sm // (warp_regs * num_warps),
              threads_per_sm // (warp_size * num_warps), _MAX_BLOCKS_PER_SM]
    if shared:
        limits.append(shared_per_sm // shared)
    return max(1, min(limits))
