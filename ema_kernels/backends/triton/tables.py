"""Pointer tables of tensor-list launches and their device copies.

Two caches, both keyed by content so a steady-state step copies nothing to the device:
``_table_cache`` (tables built here from the tensors' addresses) and ``_dev_tables`` (device
copies of the tables a StepTable builds in C++).  ``_upload`` is their one host->device copy.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import config

Tensor = torch.Tensor

_TABLE_CACHE_SIZE = 16


def _refuse_capture(what: str) -> None:
    """Creating a device constant or table inside a CUDA-graph capture would only record it
    (filled on replay, garbage for the eager steps that share the cache) and its host->device
    copy is illegal there: refuse, before anything is launched. (A device query: only asked
    on a cache miss.)"""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the triton backend would create {what} inside a CUDA-graph capture: run one "
            f"eager step() with the same parameters before capturing (it creates them; the "
            f"captured step reuses them), and capture with capturable=True (its kernels read "
            f"lr, the step count and the EMA weights on the device, so a replay uses their "
            f"current values)")



_table_cache: Dict[tuple, Tuple[Tensor, int]] = {}


def _table(addrs: List[List[int]], numels: List[int], device: torch.device,
           bases: Optional[List[int]] = None, index: Optional[List[int]] = None):
    """The address / size / chunk table of a tensor-list launch, on ``device``.

    Layout (int64): ``roles × n`` addresses (0 for an absent role), ``n`` sizes, ``C`` chunk
    tensor indices, ``C`` chunk starts (multiples of config.BLOCK); with stochastic rounding
    ``n`` element-index bases (``bases``), where only the SR kernels look; and for the
    per-tensor kernels (LARS, LAMB) ``n`` positions (``index``: each tensor's place in the
    caller's lists, where its per-tensor values are) and ``n`` first chunks (the chunk rows'
    first entry of each tensor).  Built on the host with a few vectorised torch ops and sent in
    one host→device copy; the device table is cached by its content (addresses and sizes), so
    a steady-state step with the same tensors copies nothing.
    """
    flat_addrs = [a for row in addrs for a in row]
    key = (device, config.BLOCK, tuple(flat_addrs), tuple(numels),
           None if bases is None else tuple(bases), None if index is None else tuple(index))
    hit = _table_cache.get(key)
    if hit is not None:
        return hit
    n = len(numels)
    counts_l = [(k + config.BLOCK - 1) // config.BLOCK for k in numels]
    n_chunks = sum(counts_l)  # from the Python ints (int(tensor) is a value read)
    counts = torch.tensor(counts_l, dtype=torch.int64)
    chunk_t = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    chunk_start = (torch.arange(n_chunks, dtype=torch.int64) - first[chunk_t]) * config.BLOCK
    parts = [torch.tensor(flat_addrs + numels, dtype=torch.int64), chunk_t, chunk_start]
    if bases is not None:
        parts.append(torch.tensor(bases, dtype=torch.int64))
    if index is not None:
        parts += [torch.tensor(index, dtype=torch.int64), first]
    host = torch.cat(parts)
    if device.type != "cpu":
        _refuse_capture("its pointer tables")
    table = host if device.type == "cpu" else _upload(host, device)
    if len(_table_cache) >= _TABLE_CACHE_SIZE:
        _table_cache.pop(next(iter(_table_cache)))
    _table_cache[key] = hit = (table, n_chunks)
    return hit


# Device copies of StepTable pointer tables, by content hash: {(device, hash): (host, device)}.
_dev_tables: Dict[tuple, Tuple[Tensor, Tensor]] = {}


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """A host table's copy on ``device`` without a stream synchronisation: staged through
    pinned memory (a copy from pageable memory waits for the stream), copied non-blocking.
    The caching host allocator keeps the pinned block until the copy has run (it records the
    copy's stream), so dropping the staging tensor here is safe."""
    staged = host.pin_memory()
    return staged.to(device, non_blocking=True)


def _device_table(host: Tensor, key: int, device: torch.device) -> Tensor:
    """``host`` (a StepTable's Triton table) on ``device``: CPU tensors are used as they are;
    on a GPU the copy made the first time this content was seen (compared in full before a
    hit is trusted), marked as used on the current stream (``record_stream``) so that evicting
    it from the cache cannot free memory a kernel on another stream still reads."""
    if device.type == "cpu":
        return host
    hit = _dev_tables.get((device, key))
    # compared as numpy arrays: torch.equal is a value read the step must not make
    if hit is not None and hit[0].shape == host.shape and \
            np.array_equal(hit[0].numpy(), host.numpy()):
        dev = hit[1]
    else:
        _refuse_capture("its pointer tables")
        dev = _upload(host, device)
        if len(_dev_tables) >= _TABLE_CACHE_SIZE:
            _dev_tables.pop(next(iter(_dev_tables)))
        _dev_tables[(device, key)] = (host, dev)
    dev.record_stream(torch.cuda.current_stream(device))
    return dev
