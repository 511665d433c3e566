"""Packing a param group's parameters, gradients, optimizer state and EMA into flat buffers.

A :class:`Bucket` holds the parameters of one group that share a (device, dtype). In the flat
layout their storage moves into one contiguous buffer per role (θ, g, and the state the
optimizer asks for), each parameter starting at an offset that is a multiple of
:data:`ALIGN` elements, so 16-byte vector loads are legal for every dtype. ``Parameter.data``
and ``.grad`` are rebound to views: the Parameter objects stay the same, so the model and every
reference to them keep working.

In the tensor-list layout (``flat_params=False``) parameters and gradients stay where they are
(their storage belongs to someone else, e.g. FSDP); only the optimizer's own state and the EMA
live in flat buffers.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

try:  # DTensor (FSDP2 shards); absent from torch builds without distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel updates: a DTensor's local shard (read fresh: its owner, e.g. FSDP2,
    may re-point it), else the detached tensor itself."""
    if is_dtensor(t):
        lt = getattr(t, "_local_tensor", None)
        return (lt if lt is not None else t.to_local()).detach()
    return t.detach()


# Offsets are multiples of 16 elements: 16-byte aligned for every storage dtype (fp16 included)
# and 64-byte aligned for the fp32 state, i.e. a parameter never shares a cache line start.
ALIGN = 16


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """State and EMA dtype for a parameter dtype: fp32, except fp64 parameters keep fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Bucket:
    """Parameters of one param group sharing (device, dtype), and their flat buffers."""

    def __init__(self, params: Sequence[torch.nn.Parameter], flat_params: bool = True):
        self.params: List[torch.nn.Parameter] = list(params)
        # DTensor parameters (FSDP2) keep their storage: the state covers the local shards.
        self.is_dtensor = is_dtensor(self.params[0])
        locals_ = [local(p) for p in self.params]
        self.device = locals_[0].device
        self.dtype = self.params[0].dtype
        self.state_dtype = state_dtype_for(self.dtype)
        self.flat_params = flat_params and not self.is_dtensor
        self.shapes = [t.shape for t in locals_]
        self.numels = [t.numel() for t in locals_]
        self.offsets: List[int] = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += _align(n)
        self.total = total
        self.state: Dict[str, torch.Tensor] = {}      # role -> flat buffer
        self.state_views: Dict[str, List[torch.Tensor]] = {}
        if self.flat_params:
            self.param_flat = torch.zeros(total, device=self.device, dtype=self.dtype)
            self.grad_flat = torch.zeros(total, device=self.device, dtype=self.dtype)
            self.param_views = self.views(self.param_flat)
            self.grad_views = self.views(self.grad_flat)
            for p, pv, gv in zip(self.params, self.param_views, self.grad_views):
                pv.copy_(p.detach())
                if p.grad is not None:
                    gv.copy_(p.grad)
                p.data = pv
                p.grad = gv
            self._expected_ptrs = [v.data_ptr() for v in self.param_views]
            self._grad_ptrs = [v.data_ptr() for v in self.grad_views]
        else:
            self.param_flat = self.grad_flat = None
            self.param_views = self.grad_views = None
            self._expected_ptrs = None

    # -- views -------------------------------------------------------------------------------
    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Per-parameter views of a flat buffer laid out like this bucket."""
        return [flat[o:o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]

    def new_state(self, role: str, init: Optional[str] = "zeros") -> torch.Tensor:
        """Allocate (once) the flat buffer for ``role``; ``init="params"`` copies the parameters."""
        if role not in self.state:
            flat = torch.zeros(self.total, device=self.device, dtype=self.state_dtype)
            views = self.views(flat)
            if init == "params":
                for v, p in zip(views, self.params):
                    v.copy_(local(p))
            self.state[role] = flat
            self.state_views[role] = views
        return self.state[role]

    def refresh_uniform_step(self) -> None:
        """``uniform_step``: the common step count of all parameters, or None if they differ
        (some skipped steps with a None grad): the flat path needs one count per launch."""
        lo, hi = int(self.steps.min()), int(self.steps.max())
        self.uniform_step = lo if lo == hi else None

    # -- checks --------------------------------------------------------------------------------
    def grads_are_flat(self) -> bool:
        """True when every gradient is still our view of the flat gradient buffer."""
        if not self.flat_params:
            return False
        # Identity, then storage: `p.grad.data = t` keeps the object but moves its storage.
        return all(p.grad is gv for p, gv in zip(self.params, self.grad_views)) \
            and [gv.data_ptr() for gv in self.grad_views] == self._grad_ptrs

    def locals(self) -> List[torch.Tensor]:
        """The tensors the kernels update, one per parameter (local shards for DTensors)."""
        return [local(p) for p in self.params]

    def as_public(self, p: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """A state/EMA view as users see it: a DTensor laid out like ``p`` for DTensor
        parameters (same mesh and placements, never gathered), else the view itself."""
        if not is_dtensor(p):
            return view
        return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def check_storage(self) -> None:
        """Raise if a parameter no longer lives where the optimizer put it (stale buffer)."""
        if not self.flat_params:  # read where they lie: only the layout must still match
            for i, t in enumerate(self.locals()):
                if t.shape != self.shapes[i] or t.dtype != self.dtype or t.device != self.device:
                    raise RuntimeError(
                        f"parameter {i} of a param group changed from {tuple(self.shapes[i])} "
                        f"{self.dtype} on {self.device} to {tuple(t.shape)} {t.dtype} on "
                        f"{t.device} after the optimizer was built; build it after moving or "
                        f"casting the model")
            return
        for i, p in enumerate(self.params):
            if p.data_ptr() != self._expected_ptrs[i] or p.shape != self.shapes[i] \
                    or p.dtype != self.dtype:
                raise RuntimeError(
                    f"parameter {i} of a param group (shape {tuple(self.shapes[i])}, {self.dtype}) "
                    f"no longer lives in the storage the optimizer manages: its `.data` was "
                    f"replaced (model.to()/.half()/p.data = ...) after the optimizer was built. "
                    f"Move or cast the model first, then construct the optimizer.")

    def restore_grad_views(self, zero: bool = True) -> None:
        """Zero the flat gradient buffer in one op and point every ``.grad`` at its view."""
        if zero:
            self.grad_flat.zero_()
        if [gv.data_ptr() for gv in self.grad_views] != self._grad_ptrs:
            self.grad_views = self.views(self.grad_flat)
        for p, gv in zip(self.params, self.grad_views):
            if p.grad is not gv:
                p.grad = gv
