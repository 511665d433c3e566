"""``opt.clip_grad_norm_``: gradient-norm clipping folded into the next step's pass.

``torch.nn.utils.clip_grad_norm_`` measures the total norm of the gradients and rewrites every
gradient, ``g *= min(max_norm / (norm + 1e-6), 1)``: a read and a write of every gradient on
top of the step. Here the norm is measured (one ``torch._foreach_norm`` per (device, dtype),
the read nobody can avoid) and the coefficient waits, as a device scalar, for the next
``step()``: the kernels already divide every gradient by ``grad_scale``, so the coefficient is
folded into that scalar (``grad_scale / coef``, or ``1 / coef`` without a GradScaler).
Gradients are never written.

The rule for a pending coefficient (docs/rounding_and_clipping.md says the same):

- the next ``step()`` applies it, once;
- ``zero_grad()`` discards it, and so does any change of the gradients before the step (a new
  backward: a different ``.grad`` object, or the same one written in place, which bumps its
  ``_version``); the step then uses the gradients as they are, with a warning, because torch
  would have clipped the old gradients in place before the change;
- a second ``clip_grad_norm_`` before the step composes with the first, as torch's second call
  measures (and clips) the already clipped gradients.

A non-finite total norm makes the step a skipped step (``~isfinite(norm)`` is folded into
``found_inf``): nothing moves and the counters are rolled back, as for a GradScaler skip, where
torch would write NaNs (or zeros) into the gradients and step with them.

Nothing here runs in ``step()`` unless a clip is pending (one attribute test), and nothing
reads a device value on the host (except ``error_if_nonfinite=True``, which must, as torch's).
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from . import layout

__all__ = ["ClipMixin"]

# torch.nn.utils.clip_grad_norm_'s epsilon: coef = max_norm / (total_norm + 1e-6)
_EPS = 1e-6


class _PendingClip:
    """A coefficient measured by ``clip_grad_norm_``, waiting for the next step."""
    __slots__ = ("coef", "raw", "nonfinite", "grads", "scaled")

    def __init__(self, coef, raw, nonfinite, grads, scaled):
        self.coef = coef            # float32 (1,) on the first device; 1 where non-finite
        self.raw = raw              # torch's clamped coefficient, the norm's dtype (0-dim)
        self.nonfinite = nonfinite  # float32 (1,): 1.0 if the total norm is not finite
        self.grads = grads          # ((param, grad or None, local grad _version), ...)
        self.scaled = scaled        # measured on gradients a GradScaler had scaled


class ClipMixin:
    """``clip_grad_norm_`` of :class:`~.base.EMAOptimizer` (and the step's side of it)."""

    _clip_pending: Optional[_PendingClip] = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite: bool = False,
                        foreach=None, *, grad_scaler=None) -> torch.Tensor:
        """Clip the gradients' total norm inside the next :meth:`step` (no gradient is written).

        The total norm is ``torch.nn.utils.clip_grad_norm_``'s over the optimizer's parameters
        that have a gradient (each parameter once), returned as a 0-dim tensor on the first
        gradient's device without a host synchronisation; the next ``step()`` scales every
        gradient by torch's ``clamp(max_norm / (norm + 1e-6), max=1)`` inside its fused pass.

        - ``max_norm``: a number >= 0; ``inf`` is allowed (the norm-only idiom: nothing is
          clipped). ``norm_type``: a number > 0 or ``inf`` (``'inf'`` too).
        - A non-finite norm skips the next step (nothing moves, as a GradScaler skip); torch
          would write NaNs into the gradients. ``error_if_nonfinite=True`` raises instead, as
          torch does (which reads the norm on the host, as torch's check does).
        - The coefficient is used by the next ``step()`` only: ``zero_grad()`` or a change of
          the gradients (a new backward) before it discards the coefficient (a changed gradient
          also warns). A second call before the step composes with the first, as in torch.
        - With a ``torch.amp.GradScaler``: either ``scaler.unscale_(opt)`` first (torch's
          pattern), or pass ``grad_scaler=scaler`` and skip the unscale pass: the norm is then
          measured on the scaled gradients and divided by the scaler's scale on the device.
          Step with ``scaler.step(opt)`` either way.
        - DDP: gradients are already averaged, the norm is local. FSDP2 (DTensor gradients):
          the local sums of ``|g|^p`` (the maxima for ``inf``) are all-reduced over the mesh
          dimensions the gradients are sharded on, so every rank gets the global norm (a plain
          tensor; torch returns a DTensor there, whose ``full_tensor()`` is this value).
        - ``foreach`` is accepted and changes nothing (the norm always uses
          ``torch._foreach_norm``).
        """
        max_norm = _check_max_norm(max_norm)
        p = _check_norm_type(norm_type)
        if foreach not in (None, True, False):
            raise TypeError(f"foreach={foreach!r} must be None, True or False (accepted for "
                            f"torch compatibility; it changes nothing here)")
        scale = _scaler_scale(grad_scaler, self)
        entries = _grad_entries(self.param_groups)
        prev = self._live_clip(entries, when="a second clip_grad_norm_")
        grads = [g for _, g, _ in entries if g is not None]
        if not grads:
            # torch returns torch.tensor(0.) and clips nothing; ours lives with the parameters
            self._clip_pending = None
            dev = layout.local(entries[0][0]).device if entries else torch.device("cpu")
            return torch.zeros((), dtype=torch.float32, device=dev)
        norm = _total_norm(grads, p, scale)
        if prev is not None:
            # torch's second call measures the gradients its first call clipped in place:
            # ‖c·g‖ = c·‖g‖ (a NaN coefficient, from a non-finite first norm, stays NaN)
            norm = norm * prev.raw.to(norm.device, norm.dtype)
        if error_if_nonfinite and bool(torch.logical_or(norm.isnan(), norm.isinf())):
            raise RuntimeError(
                f"The total norm of order {p} for gradients from `parameters` is non-finite, so "
                f"it cannot be clipped. To disable this error and skip the next step instead "
                f"(ema_kernels: a non-finite norm makes step() change nothing), set "
                f"`error_if_nonfinite=False`")
        # torch's formula, in the norm's dtype and torch's order of operations
        coef = torch.clamp(max_norm / (norm + _EPS), max=1.0)
        raw = coef if prev is None else prev.raw.to(coef.device, coef.dtype) * coef
        finite = torch.isfinite(norm)
        # The kernels see a finite coefficient whatever the norm was: a skipped step must not
        # depend on how a backend treats a NaN grad_scale next to found_inf.
        coef32 = torch.where(finite, raw.float(), torch.ones((), device=raw.device))
        nonfinite = (~finite).float().reshape(1)
        if prev is not None:
            nonfinite = torch.maximum(nonfinite, prev.nonfinite.to(nonfinite.device))
        self._clip_pending = _PendingClip(
            coef32.reshape(1), raw, nonfinite, entries,
            scale is not None or (prev is not None and prev.scaled))
        return norm

    # ------------------------------------------------------------ the step's side -----------
    def _live_clip(self, entries=None, when: str = "step()") -> Optional[_PendingClip]:
        """The pending clip if the gradients are still the ones it measured, else ``None``
        (discarded, with a warning: torch would have clipped the old gradients in place)."""
        pending = self._clip_pending
        if pending is None:
            return None
        if entries is None:
            entries = _grad_entries(self.param_groups)
        if _same_grads(pending.grads, entries):
            return pending
        self._clip_pending = None
        warnings.warn(
            f"the gradients changed after opt.clip_grad_norm_() and before {when} (a new "
            f"backward, or .grad replaced or written in place): its clip coefficient was "
            f"discarded, so these gradients are not clipped by it (torch would have clipped the "
            f"old gradients in place before the change). Call clip_grad_norm_ after the last "
            f"backward, right before step()", stacklevel=_user_stacklevel())
        return None

    def _fold_clip(self, plans, amp: Dict, grad_scale, found_inf):
        """``(amp, found_inf)`` with the pending clip folded in (called by ``step()`` only when
        one is pending): every device's ``grad_scale`` becomes ``grad_scale / coef`` (or
        ``1 / coef``) and its ``found_inf`` includes ``~isfinite(norm)``; the returned
        ``found_inf`` (on the norm's device) drives the counters' rollback. Device ops only;
        raises before anything moved when the clip and the step disagree about scaling."""
        pending = self._live_clip()
        if pending is None:
            return amp, found_inf
        if pending.scaled and grad_scale is None:
            raise RuntimeError(
                "opt.clip_grad_norm_(grad_scaler=scaler) measured gradients the GradScaler had "
                "scaled, but step() got no grad_scale to unscale them: step through "
                "scaler.step(opt), or call scaler.unscale_(opt) before clip_grad_norm_ and drop "
                "grad_scaler=")
        if not pending.scaled and grad_scale is not None:
            raise RuntimeError(
                "step() got a grad_scale (the gradients are still scaled by a GradScaler), but "
                "opt.clip_grad_norm_() measured them as if they were not: pass "
                "grad_scaler=scaler to clip_grad_norm_, or call scaler.unscale_(opt) before it")
        first = pending.coef.device
        fi = pending.nonfinite
        if found_inf is not None:
            fi = torch.maximum(fi, found_inf.detach().to(device=first, dtype=torch.float32,
                                                          non_blocking=True).reshape(1))
        out = {}
        for *_, launches in plans:
            for ts, _, _ in launches:
                dev = ts.device
                if dev in out:
                    continue
                gs = amp.get(dev, (None, None))[0]
                coef = pending.coef.to(dev, non_blocking=True)
                out[dev] = (torch.reciprocal(coef) if gs is None else gs / coef,
                            fi.to(dev, non_blocking=True))
        return out, fi


def _user_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the first frame outside ema_kernels and
    torch (step() runs under torch's hooks and decorators, so no fixed count is right)."""
    inside = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
              os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 1  # level 1: the caller, who calls warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


# -------------------------------------------------------------------- validation -----------
def _check_max_norm(max_norm) -> float:
    if isinstance(max_norm, torch.Tensor):
        if max_norm.numel() != 1:
            raise ValueError(f"max_norm must be a number, got a tensor of shape "
                             f"{tuple(max_norm.shape)}")
        max_norm = max_norm.item()  # torch's float(max_norm) reads it too
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real):
        raise TypeError(f"max_norm must be a real number, got {max_norm!r} "
                        f"({type(max_norm).__name__})")
    v = float(max_norm)
    if math.isnan(v) or v < 0:
        raise ValueError(f"max_norm={max_norm!r} is invalid: it must be a number >= 0 (inf "
                         f"measures the norm and clips nothing)")
    return v


def _check_norm_type(norm_type) -> float:
    if isinstance(norm_type, str):
        try:
            v = float(norm_type)  # torch's float(norm_type): 'inf' is infinity
        except ValueError:
            raise ValueError(f"norm_type={norm_type!r} is invalid: use a number > 0 or "
                             f"'inf'") from None
    elif isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise TypeError(f"norm_type must be a real number or 'inf', got {norm_type!r} "
                        f"({type(norm_type).__name__})")
    else:
        v = float(norm_type)
    if math.isnan(v) or v <= 0:
        raise ValueError(f"norm_type={norm_type!r} is invalid: a gradient norm for clipping "
                         f"needs p > 0 (2 for the Euclidean norm, inf for the largest |g|)")
    return v


def _scaler_scale(grad_scaler, opt) -> Optional[torch.Tensor]:
    """The scale the gradients still carry (a device tensor), or None: no scaler, a disabled
    one, or one whose ``unscale_(opt)`` already divided them."""
    if grad_scaler is None:
        return None
    from torch.amp.grad_scaler import GradScaler, OptState
    if not isinstance(grad_scaler, GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got "
                        f"{type(grad_scaler).__name__}")
    if not grad_scaler.is_enabled():
        return None
    st = grad_scaler._per_optimizer_states.get(id(opt))
    if st is not None and st["stage"] is OptState.UNSCALED:
        return None  # scaler.unscale_(opt) ran: the gradients are the true ones
    scale = grad_scaler._scale
    if scale is None:
        raise RuntimeError("grad_scaler has no scale yet: call scaler.scale(loss).backward() "
                           "before opt.clip_grad_norm_(grad_scaler=scaler)")
    return scale


# -------------------------------------------------------------------- gradients -----------
def _grad_entries(param_groups) -> Tuple[tuple, ...]:
    """``(param, grad or None, version of the grad's local tensor)`` for every parameter once,
    in ``param_groups`` order (the list torch's clip_grad_norm_ would be given)."""
    out = []
    seen = set()
    for group in param_groups:
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            g = p.grad
            # a DTensor's shard is written in place by FSDP2's accumulation: its counter counts
            out.append((p, g, None if g is None else layout.local(g)._version))
    return tuple(out)


def _same_grads(old, new) -> bool:
    if len(old) != len(new):
        return False
    for (p, g, v), (q, h, w) in zip(old, new):
        if p is not q or g is not h or v != w:
            return False
    return True


def _shard_dims(g) -> Optional[tuple]:
    """``(mesh, mesh dims the DTensor gradient is sharded on)``, or None for a plain tensor:
    the dimensions whose ranks hold disjoint pieces of the gradient, so the norm's partial
    sums must be all-reduced over them (replicated dimensions already hold the same values)."""
    if not layout.is_dtensor(g):
        return None
    dims = []
    for d, pl in enumerate(g.placements):
        if pl.is_shard():
            dims.append(d)
        elif pl.is_partial():
            raise NotImplementedError(
                "clip_grad_norm_ got a DTensor gradient with a Partial placement (not yet "
                "reduced): its norm is not defined shard by shard; reduce the gradients first "
                "(FSDP2 does so in backward)")
    return (g.device_mesh, tuple(dims)) if dims else None


def all_reduce_over(v: torch.Tensor, shard: Optional[tuple], maximum: bool = False
                    ) -> torch.Tensor:
    """``v`` (partial sums, or maxima with ``maximum=True``) all-reduced in place over the
    sharded mesh dimensions ``shard = (mesh, dims)`` of :func:`_shard_dims` (None: nothing to
    reduce). Also used by LARS/LAMB's per-tensor norms (:mod:`.norms`)."""
    if shard is None:
        return v
    import torch.distributed as dist
    mesh, dims = shard
    for d in dims:
        dist.all_reduce(v, op=dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM,
                        group=mesh.get_group(d))
    return v


def _total_norm(grads: List[torch.Tensor], p: float,
                scale: Optional[torch.Tensor]) -> torch.Tensor:
    """torch's total norm of ``grads``: one ``_foreach_norm`` per (device, dtype), the norms
    combined on the first gradient's device, the result in the dtype torch returns (the
    gradients' promoted dtype).

    Without sharding and GradScaler this is torch's ``_get_total_norm`` step for step (same
    grouping, same ops, bit-equal results). With ``scale`` the gradients are still scaled:
    the norms are taken in float32 (a scaled 16-bit norm can overflow its dtype) and divided by
    the scale on the device. With sharded DTensor gradients each rank's float32 sum of
    ``|g|^p`` (its maximum for inf) is all-reduced over the sharded mesh dimensions."""
    locals_ = [layout.local(g) for g in grads]
    first = locals_[0].device
    out_dtype = locals_[0].dtype
    for t in locals_[1:]:
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for g, lg in zip(grads, locals_):
        groups.setdefault((lg.device, lg.dtype, _shard_dims(g)), []).append(lg)
    sharded = any(k[2] is not None for k in groups)
    f32 = torch.float32
    # a scaled 16-bit norm can overflow its dtype: measure it in float32, then unscale
    kw = {} if scale is None else {"dtype": f32}
    if not sharded:
        norms = []
        for ts in groups.values():
            norms.extend(torch._foreach_norm(ts, p, **kw))
        total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), p)
        if scale is None:
            return total
    else:
        inf = math.isinf(p)
        parts: Dict[Optional[tuple], List[torch.Tensor]] = {}
        for (_, _, shard), ts in groups.items():
            norms = torch._foreach_norm(ts, p, dtype=f32)
            part = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), p)
            parts.setdefault(shard, []).append(part)
        pieces = []  # per reduction domain: a sum of |g|^p, or a max for inf
        for shard, ps in parts.items():
            v = torch.stack(ps)
            v = v.amax() if inf else v.pow(p).sum()
            if shard is not None:
                v = all_reduce_over(v.reshape(1), shard, maximum=inf).reshape(())
            pieces.append(v)
        v = torch.stack(pieces)
        total = v.amax() if inf else v.sum().pow(1.0 / p)
    if scale is not None:
        total = total / scale.detach().to(device=first, dtype=f32).reshape(())
    return total.to(out_dtype)
