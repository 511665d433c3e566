"""Where the optimizer's tensors live, and the views the kernels walk.

**Default: the user's tensors stay the user's.** Parameters and gradients keep their storage
and memory format; the optimizer state and the EMA are per-parameter tensors made with
``empty_like(p, memory_format=preserve_format)`` (fp32 for 16-bit parameters), so they have
the parameter's shape *and strides* (``channels_last`` kept). The kernels walk memory linearly,
which is exact for every tensor that is non-overlapping and dense when θ, g and the state share
its strides: such a tensor is handed over as a 1-D alias of its memory (:func:`linear_view`).
A parameter that is not dense (a strided view made a Parameter) is updated through a contiguous
copy that is written back — correct, and rare.

**``flatten=True``**: one contiguous buffer per role and (device, dtype) of a group
(:class:`FlatBuffers`); ``p.data`` is rebound to views of it, and
``zero_grad(set_to_none=False)`` binds ``p.grad`` to views of a flat gradient buffer, so a step
is one launch over whole buffers. Offsets are multiples of :data:`ALIGN` elements.

A :class:`TensorSet` is one group's parameters of one (device, dtype): what one kernel launch
updates. It is derived data — rebuilt from ``param_groups`` and ``optimizer.state`` whenever
those change (construction, ``load_state_dict``, ``state.clear()``, unpickling) — so every
piece of truth lives where torch.optim keeps it and pickling/deepcopy need nothing of ours.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

try:  # DTensor (FSDP2 shards); absent from torch builds without distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None

# Offsets in flat buffers are multiples of 16 elements: 16-byte aligned for every storage dtype
# (fp16 included), so the vectorised kernel paths apply to every parameter.
ALIGN = 16

CONTIGUOUS, DENSE, STRIDED = 0, 1, 2  # how a kernel reaches a tensor: as is, aliased, copied


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel updates: a DTensor's local shard (read fresh: its owner, e.g. FSDP2,
    may re-point it), else the tensor itself (no detach: the step runs under no_grad)."""
    if is_dtensor(t):
        lt = getattr(t, "_local_tensor", None)
        return (lt if lt is not None else t.to_local()).detach()
    return t


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """State and EMA dtype for a parameter dtype: fp32, except fp64 parameters keep fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements exactly fill ``numel`` consecutive memory slots (some
    permutation of a contiguous layout: channels_last, a transposed weight, ...)."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


def kind_of(t: torch.Tensor) -> int:
    if t.is_contiguous():
        return CONTIGUOUS
    return DENSE if is_dense(t) else STRIDED


def linear_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D alias of a non-overlapping, dense tensor's memory (all its elements, in memory
    order): how channels_last tensors reach kernels that walk contiguous memory."""
    return t.as_strided((t.numel(),), (1,))


def new_state_like(p: torch.Tensor, *, copy: bool = False) -> torch.Tensor:
    """A state/EMA tensor for parameter ``p``: its shape and strides, the state dtype, zeros or a
    copy of ``p``. A DTensor parameter gets a DTensor with its mesh and placements."""
    lp = local(p).detach()
    dt = state_dtype_for(lp.dtype)
    t = torch.empty_like(lp, dtype=dt, memory_format=torch.preserve_format)
    if copy:
        t.copy_(lp)
    else:
        t.zero_()
    return as_public(p, t)


def as_public(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """State as users see it: a DTensor laid out like ``p`` for DTensor parameters."""
    if not is_dtensor(p):
        return t
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=p.stride())


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class FlatBuffers:
    """``flatten=True``: one contiguous buffer per role for one group's (device, dtype) set.

    Kept on the optimizer (and pickled with it): the parameters are views of ``param``, and
    the views share storage with it after a deepcopy or a torch.load of (model, optimizer)."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.shapes = [tuple(p.shape) for p in params]
        self.strides = [p.stride() if is_dense(p) else None
                        for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets, total = [], 0
        for n in self.numels:
            self.offsets.append(total)
            total += _align(n)
        self.total = total
        self.device, self.dtype = params[0].device, params[0].dtype
        self.param = torch.zeros(total, device=self.device, dtype=self.dtype)
        self.grad: Optional[torch.Tensor] = None  # allocated by the first zero_grad(False)
        self.roles: Dict[str, torch.Tensor] = {}
        self.param_ptrs: List[int] = []
        self.bound_grads: Optional[List[torch.Tensor]] = None  # the views zero_grad bound
        self.grad_ptrs: List[int] = []

    def __setstate__(self, state):
        # After a deepcopy/unpickle the buffers live elsewhere: recompute the pointers the
        # step compares against (the views themselves came along, sharing the new storage).
        self.__dict__.update(state)
        self.param_ptrs = [v.data_ptr() for v in self.views(self.param)]
        if self.bound_grads is not None:
            self.grad_ptrs = [g.data_ptr() for g in self.bound_grads]

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Per-parameter views of a flat buffer, with each parameter's shape and strides."""
        out = []
        for o, n, shape, stride in zip(self.offsets, self.numels, self.shapes, self.strides):
            if stride is None:
                out.append(flat[o:o + n].view(shape))
            else:
                out.append(flat.as_strided(shape, stride, flat.storage_offset() + o))
        return out

    def _ptrs(self, flat: torch.Tensor) -> List[int]:
        """Where each parameter's view of ``flat`` starts (a bound view elsewhere, e.g. a copy
        unpickled without its buffer, is not ours)."""
        base, size = flat.data_ptr(), flat.element_size()
        return [base + o * size for o in self.offsets]

    def role(self, name: str, dtype: torch.dtype) -> List[torch.Tensor]:
        """Views of the buffer for state ``name`` (allocated, zeroed, on first use)."""
        if name not in self.roles:
            self.roles[name] = torch.zeros(self.total, device=self.device, dtype=dtype)
        return self.views(self.roles[name])

    def bind(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Move the parameters' values into the buffer and rebind ``.data`` to the views."""
        views = self.views(self.param)
        for p, v in zip(params, views):
            v.copy_(p.detach())
            p.data = v
        self.param_ptrs = [v.data_ptr() for v in views]

    def grad_views(self) -> List[torch.Tensor]:
        """Views of the flat gradient buffer (allocated on first use), remembered as the
        gradients a one-launch step expects to find."""
        if self.grad is None:
            self.grad = torch.zeros(self.total, device=self.device, dtype=self.dtype)
        elif self.bound_grads is not None and \
                [g.data_ptr() for g in self.bound_grads] == self._ptrs(self.grad):
            return self.bound_grads  # the same views again: a cached StepTable stays valid
        self.bound_grads = self.views(self.grad)
        self.grad_ptrs = [g.data_ptr() for g in self.bound_grads]
        return self.bound_grads


def sr_offsets(ts: "TensorSet", ids: Sequence[int]) -> List[int]:
    """Stochastic rounding's element-index bases of parameters ``ids`` of ``ts``: where each
    sits in the set's flat layout (the :class:`FlatBuffers` offsets: cumulative numels rounded
    up to ALIGN, in set order), whether or not the set is flattened, so both layouts draw the
    same random bits for an element. Cached per set (the full list is the common case)."""
    full = ts.sr_base
    if full is None:
        if ts.flat is not None:
            full = list(ts.flat.offsets)
        else:
            full, at = [], 0
            for shape in ts.shapes:
                full.append(at)
                at += _align(int(np.prod(shape, dtype=np.int64)))
        ts.sr_base = full
    if len(ids) == len(full):
        return full
    return [full[i] for i in ids]


class TensorSet:
    """One group's parameters of one (device, dtype): the unit of one kernel launch.

    ``steps`` is the host copy of each parameter's step count (a float32 array whose elements
    *are* the ``state[p]["step"]`` tensors, through ``steps_t``), so grouping parameters by step
    count costs no host read per parameter. ``views[role]`` are the kernel views of the state
    (``role`` in the optimizer's state roles and ``ema``)."""

    def __init__(self, params: List[torch.nn.Parameter], positions: List[int],
                 flat: Optional[FlatBuffers]):
        self.params = params
        self.positions = positions          # index of each parameter within its group
        self.flat = flat
        lp = [local(p) for p in params]
        self.device, self.dtype = lp[0].device, lp[0].dtype
        self.state_dtype = state_dtype_for(self.dtype)
        self.dtensor = is_dtensor(params[0])
        self.shapes = [tuple(t.shape) for t in lp]
        self.strides = [t.stride() for t in lp]  # those of the state made for them
        self.kinds = [kind_of(t) for t in lp]
        self.plain = all(k == CONTIGUOUS for k in self.kinds) and not self.dtensor
        self.views: Dict[str, List[Optional[torch.Tensor]]] = {}
        self.steps = np.zeros(len(params), dtype=np.float32)
        self.steps_t = torch.from_numpy(self.steps)  # shares memory with the array
        self.uniform_step: Optional[int] = 0
        self.cap: Optional[Dict[str, torch.Tensor]] = None  # capturable device scalars
        self.backend_module = None
        self.backend_key = None
        # The C++ StepTable (optim/tables.py): None until built, False where unusable.
        self.table = None
        self.table_backend = None
        self.table_bound = None
        self.sr_base: Optional[List[int]] = None  # stochastic rounding's bases (sr_offsets)

    def kernel_view(self, i: int, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``t`` (parameter i's state or EMA, in its own layout) as the kernels take it."""
        if t is None:
            return None
        t = local(t)
        return linear_view(t) if self.kinds[i] == DENSE else t

    def refresh_uniform_step(self) -> None:
        lo, hi = self.steps.min(initial=0.0), self.steps.max(initial=0.0)
        self.uniform_step = int(lo) if lo == hi else None
