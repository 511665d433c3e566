"""Counting host reads of tensor values (device synchronisations on a GPU) with a dispatch mode.

A host read of a tensor's value reaches the dispatcher as one of :data:`SYNC_OPS`
(``Tensor.item()``, ``float(t)``, ``bool(t)``, ``if t:``, a 0-dim tensor passed where an op
takes a Scalar -- Python's argument parser calls ``item()`` -- and ``torch.equal``). On a GPU
each is a device synchronisation; on CPU they are cheap but visible to a
``TorchDispatchMode``, so CI (no GPU) counts them on CPU tensors and the GPU check
(``torch.cuda.set_sync_debug_mode("error")``) confirms on a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, how CI runs the Triton kernels) is the
device's stand-in, not our step code: it reads the kernel's arguments on the host to run the
kernel body in numpy. Its launches (``triton.runtime.interpreter.GridExecutor.__call__``, the
whole interpreted launch, from the grid call to the copy-back of the results) are therefore
excluded: ops dispatched while one is running are not counted. Everything our code does before
and after a launch -- planning, tables, device scalars, foreach ops -- is counted.

Ops dispatched *inside* a compiled custom op (``torch.ops.ema_kernels_ext.*``) are not seen
by a Python dispatch mode (the mode is off while the op runs); the C++ sources read no tensor
values (no ``item``, ``_local_scalar_dense`` or ``equal`` in csrc/, which
tests/test_no_host_sync.py checks by reading them).
"""
from __future__ import annotations

import contextlib
import threading
import traceback
from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = frozenset((aten._local_scalar_dense.default, aten.item.default,
                      aten.is_nonzero.default, aten.equal.default))

_inside_interpreter = threading.local()


class SyncCounter(TorchDispatchMode):
    """Records every op of :data:`SYNC_OPS` dispatched while active (outside interpreted
    Triton launches), with the Python frames that made it (``hits``)."""

    def __init__(self):
        super().__init__()
        self.hits: List[Tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS and not getattr(_inside_interpreter, "depth", 0):
            where = "".join(traceback.format_list(
                [f for f in traceback.extract_stack()[:-1]
                 if "ema_kernels" in f.filename or "torch/amp" in f.filename][-4:]))
            self.hits.append((str(func), where))
        return func(*args, **(kwargs or {}))

    def report(self) -> str:
        return "\n".join(f"{op} from\n{where}" for op, where in self.hits[:5])


@contextlib.contextmanager
def interpreter_launches_excluded():
    """Mark the Triton interpreter's launches so that :class:`SyncCounter` skips them (a no-op
    where triton or its interpreter is absent)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    orig = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        _inside_interpreter.depth = getattr(_inside_interpreter, "depth", 0) + 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            _inside_interpreter.depth -= 1

    interpreter.GridExecutor.__call__ = call
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = orig
