"""What LARS, LAMB and Lion add to :class:`~.base.EMAOptimizer`: which backends run them, and
(LARS, LAMB) per-tensor launches with the norms' reduction domain.

- A backend runs a rule iff its module has the rule's update (``_BACKEND_OP``, e.g.
  ``lars_ema``). ``backend="auto"`` takes the device's best backend as for every optimizer
  (cpp on CPU, cuda on GPUs: both have every rule); a backend without the rule's kernels raises,
  by name or under "auto", saying which have them — never a silent switch to a slower backend.
- LARS and LAMB scale each tensor by norms of the whole tensor, so ``flatten=True``'s one-launch
  flat path (where the kernels see one buffer, not the tensors) is not taken: the flat buffers'
  per-parameter views are stepped as a list, one launch per set all the same.
- No C++ StepTable: its launches are Adam's and SGD's, so these sets are planned in Python
  (one list launch per set all the same; a few µs more host time per set and step).
- Each set's reduction domain for those norms (:func:`.norms.shard_domain`: FSDP2's sharded
  mesh dimensions) is found while planning, so a set that cannot be reduced raises before
  anything moves.
"""
from __future__ import annotations

from typing import Optional

from .. import _ops
from . import norms, tables
from .base import EMAOptimizer


class RuleOptimizer(EMAOptimizer):
    """Base of the optimizers whose kernels some backends do not have yet."""

    _BACKEND_OP = ""        # the backend function the rule needs
    _PER_TENSOR = False     # True: the update needs whole-tensor norms (LARS, LAMB)
    _domain: Optional[tuple] = None

    def _backend_for(self, ts, env):
        key = (self.backend, env)
        if ts.backend_key == key:
            mod = ts.backend_module
            ts.table, ts.table_backend = tables.UNUSABLE, mod
            return mod
        mod = super()._backend_for(ts, env)
        if not hasattr(mod, self._BACKEND_OP):
            # No silent fallback to a slower backend, under "auto" either: the compiled backends
            # (cpp, cuda) have every rule; a backend without this one is named in the error.
            have = [b for b in _ops.available_backends(ts.device)
                    if hasattr(_ops._load(b)[0], self._BACKEND_OP)]
            raise _ops.BackendUnavailableError(
                f"backend {mod.NAME!r} has no {type(self).__name__} kernels yet "
                f"({self._BACKEND_OP}); backends that run {type(self).__name__} on "
                f"{ts.device.type} tensors here: {have}. Use one of those "
                f"(backend=..., or {_ops.ENV_VAR})")
        ts.backend_module, ts.backend_key = mod, key
        # No StepTable (its launches are Adam's and SGD's): step() plans these sets in Python,
        # one list launch per set. (_plan asks this right before tables.table_for.)
        ts.table, ts.table_backend = tables.UNUSABLE, mod
        return mod

    def _plan_set(self, ts, gi, group):
        if not self._PER_TENSOR:
            return super()._plan_set(ts, gi, group)
        ts.norm_domain = norms.shard_domain(ts.params)
        flat, ts.flat = ts.flat, None  # per-tensor norms: the list path over the flat views
        try:
            return super()._plan_set(ts, gi, group)
        finally:
            ts.flat = flat

    def _run_set(self, group, hp, ts, *args):
        self._domain = getattr(ts, "norm_domain", None)
        try:
            super()._run_set(group, hp, ts, *args)
        finally:
            self._domain = None

    def _run_capturable(self, group, hp, ts, *args):
        self._domain = getattr(ts, "norm_domain", None)
        try:
            super()._run_capturable(group, hp, ts, *args)
        finally:
            self._domain = None

    def _update_table(self, *args):  # pragma: no cover - no StepTable kernels for these yet
        raise AssertionError(f"{type(self).__name__} has no StepTable launch")

    def _update(self, backend, group, hp, params, grads, state, emas, step, ema_weight,
                grad_scale, found_inf, sr=None):
        """A host-counted step: the rule's launch with host numbers (lr, bias corrections)."""
        self._launch(backend, group, hp, params, grads, state,
                     emas if ema_weight is not None else None, ema_weight, grad_scale,
                     found_inf, hp["lr"], step, first_step=step == 1, sr=sr)

    def _update_capturable(self, backend, group, hp, ts, params, grads, state, emas, ema_weight,
                           grad_scale, found_inf, lr, step, sr=None):
        """lr, the step count and the EMA weights from device tensors (no host read). The
        compiled kernels take the EMA weights as one float32 tensor and read the (1,)-shaped
        ``lr`` themselves; the reference takes 0-dim device scalars."""
        if backend.NAME == "reference":
            from ..backends.reference import _capturable_emas
            emas, ema_weight = _capturable_emas(emas, ema_weight, len(params),
                                                f"{self._BACKEND_OP}_capturable")
            lr, step = lr.detach().reshape(()), step.detach().reshape(())
        self._launch(backend, group, hp, params, grads, state, emas, ema_weight, grad_scale,
                     found_inf, lr, step, first_step=hp.get("first_step", False), sr=sr)

    def _launch(self, backend, group, hp, params, grads, state, emas, ema_weight, grad_scale,
                found_inf, lr, step, *, first_step, sr):  # pragma: no cover - overridden
        raise NotImplementedError
