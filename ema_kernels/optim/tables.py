"""The C++ step tables: step()'s per-parameter host work, one call per parameter set.

A :class:`~.layout.TensorSet` run by the ``cpp``, ``cuda`` or ``triton`` backend gets a
``StepTable``
(csrc/step_table.cpp) holding its parameters, state and EMA tensors. Each step,
``table.prepare()`` reads and checks every ``.grad`` and gathers the kernel's pointer table in
C++ (a few ns per parameter, where the same work in Python costs ~15 µs), and ``table.adam(…)``
/ ``table.sgd(…)`` (with capturable=True ``adam_capturable`` / ``sgd_capturable``, which read
lr, t and the EMA weights on the device) launch the fused kernel (for Triton, ``table.triton_table()`` hands the
pointer table to the Triton launcher, which keeps device copies keyed by its content). Python per step is then O(sets), not O(parameters).

The table covers the common case only — every parameter has a gradient with the parameter's
layout, all parameters at one step count. ``prepare()`` answers with a status otherwise, and
step() plans that set in Python (:mod:`.stepping`): the same kernels and results, plus the
errors that name a parameter, state re-made for moved parameters, grad-None parameters left
out, odd gradient layouts copied. Both paths are tested against each other.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..backends import _extension as _ext
from . import layout

# TensorSet.table values besides a StepTable: not built yet / this set cannot use one.
UNBUILT, UNUSABLE = None, False


def _module_for(backend, device):
    """The compiled module whose tables launch ``backend``'s kernels on ``device``, or None."""
    name = getattr(backend, "NAME", None)
    if name == "cpp":
        lib, kernels = _ext.MAIN, "cpu"
    elif name == "cuda":  # CPU tensors reach the cuda backend only in the emulation build
        lib, kernels = (_ext.EMU if device.type == "cpu" else _ext.MAIN), "cuda"
    elif name == "triton":  # C++ prepares, Triton launches (needs the extension, any build)
        lib, kernels = _ext.MAIN, "triton"
        try:
            lib.load()
        except _ext.ExtensionUnavailable:
            return None, None  # no extension: Triton's own (Python) host path
    else:  # reference: its own host path
        return None, None
    if not lib.loaded:  # the backend resolved, so its library loaded; be safe anyway
        return None, None
    mod = importlib.import_module(lib.module)
    return getattr(mod, "StepTable", None), kernels


def current(ts: layout.TensorSet, backend):
    """The set's StepTable if one was built for ``backend`` and (flat layout) for the gradient
    views zero_grad bound last; else None (not built, unusable, or stale). Builds nothing."""
    table = ts.table
    if table is UNBUILT or table is UNUSABLE or ts.table_backend is not backend:
        return None
    if ts.flat is not None and ts.table_bound is not ts.flat.bound_grads:
        return None  # zero_grad(set_to_none=False) bound new gradient views: rebuild
    return table


def table_for(ts: layout.TensorSet, backend, capturable: bool):
    """The set's StepTable (built on first use), or None where this set takes the Python
    path: DTensor shards, non-dense parameters, missing state, float64, a backend without
    tables, or capturable mode on triton (its table launcher takes host scalars; the C++
    tables launch the capturable kernels: ``adam_capturable`` / ``sgd_capturable``)."""
    table = current(ts, backend)
    if table is not None:
        return table
    if ts.table is UNUSABLE and ts.table_backend is backend:
        return None
    ts.table, ts.table_backend, ts.table_bound = UNUSABLE, backend, None
    if ts.dtensor or any(k == layout.STRIDED for k in ts.kinds):
        return None
    cls, kernels = _module_for(backend, ts.device)
    if cls is None or (capturable and kernels == "triton"):
        return None
    roles = [ts.views[r] for r in ts.roles]
    emas = [ts.views[k] for k in ts.ema_keys]
    if any(v is None for vs in roles + emas for v in vs):
        return None  # a parameter frozen so far has no state yet: made at its first gradient
    # The C++ kernels' tables advance the set's host step counts after their launch (Triton's
    # launcher is Python: step() advances them there).
    steps = None if kernels == "triton" else ts.steps_t
    fb = ts.flat
    if fb is not None:
        if fb.bound_grads is None or fb.grad is None:
            return None  # until zero_grad(set_to_none=False) binds flat gradients
        ts.table = cls.flat(ts.params, fb.bound_grads, fb.param_ptrs, fb.param, fb.grad,
                            [fb.roles[r] for r in ts.roles], [fb.roles[k] for k in ts.ema_keys],
                            kernels, steps=steps)
        ts.table_bound = fb.bound_grads
    else:
        like = torch.empty(0, dtype=ts.dtype, device=ts.device)
        ts.table = cls(ts.params, like, ts.shapes, ts.strides, roles, emas,
                       layout.sr_offsets(ts, range(len(ts.params))), kernels, steps=steps)
    return ts.table


def ready(table, ts: layout.TensorSet) -> bool:
    """Can this step take the table? (Every parameter at one step count and prepare() OK.)"""
    return ts.uniform_step is not None and table.prepare() == 0
