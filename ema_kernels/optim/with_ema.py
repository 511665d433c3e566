"""``ek.WithEMA(optimizer, ...)``: the EMA family for any ``torch.optim.Optimizer``.

The wrapped ("inner") optimizer updates θ as it always does; after its ``step()`` one EMA-only
launch per (device, dtype, EMA weights) set updates every EMA of every parameter — the
backends' ``ema_only`` (the same kernels that average the frozen parameters of the fused
optimizers). Bytes per parameter and EMA step: θ read once for all its EMAs, each ζ (fp32) read
and written once: 4 + 8·k for fp32 parameters, 2 + 8·k for bf16/fp16 ones (k EMAs; 12 B for
one EMA of an fp32 model) — on top of whatever the inner optimizer moves. A fused optimizer
(``ek.AdamW``) moves its EMA in the update's own pass instead: 8 B per EMA.

What is whose:

- ``param_groups`` *are* the inner optimizer's (the same list, also after its
  ``load_state_dict`` replaces it), so LR schedulers, GradScaler and code reading the groups
  see one truth. Each group also carries the EMA settings (``ema_decay``, ``ema_schedule``,
  ``ema_every``, ``kappa``) and the EMA clock (``base_steps``, ``ema_base_steps``, ``steps``),
  as the fused optimizers' groups do; the inner optimizer ignores them.
- ``state[p]`` holds the EMAs (``"ema"``, ``"ema_1"``, …), as in the fused optimizers; the inner
  optimizer's own state is ``opt.optimizer.state``.
- ``kappa`` scales the EMA only (ρ → ρ^κ through the schedules' base-step clock): the inner
  optimizer's hyperparameters are the user's to scale.

GradScaler: ``_step_supports_amp_scaling`` is the inner optimizer's. An inner optimizer that
unscales and skips on the device (torch's fused Adam/AdamW/SGD) receives GradScaler's
``grad_scale``/``found_inf`` and the EMA weight is zeroed on the device on a skipped step (no
host read; the clock is rolled back one step later, as the fused optimizers do). For any other
inner optimizer GradScaler unscales, reads ``found_inf`` itself and does not call ``step()`` on a
skip: nothing moves, and the only host read is GradScaler's own, as without the wrapper.
"""
from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import _ops, scaling
from ..backends import _reference_foreach
from ..schedules import interval_decay
from . import checks, layout
from .base import EMAOptimizer
from .ema_api import EMAMixin
from .stepping import _Undo

_BACKEND_NAMES = ("auto",) + _ops.BACKENDS
# The EMA settings and clock WithEMA keeps in each (inner) param group; the state dict keeps
# them apart from the inner optimizer's groups. ``ema_schedule`` is a schedule object: never
# saved (kept from the optimizer on load, as the fused optimizers do).
SETTINGS = ("ema_decay", "ema_schedule", "ema_every", "kappa")
COUNTERS = ("base_steps", "ema_base_steps", "steps")
_SAVED = ("ema_decay", "ema_every", "kappa") + COUNTERS
FORMAT = "ema_kernels.WithEMA/1"


class WithEMA(EMAMixin, torch.optim.Optimizer):
    """Any ``torch.optim.Optimizer`` plus the EMAs of its parameters.

    ``WithEMA(optimizer, ema_decay=0.9999, ema_every=1, ema_schedule=None, kappa=1.0,
    backend="auto")``: the settings are the fused optimizers' EMA keywords (a tuple
    ``ema_decay`` / ``ema_schedule`` keeps several EMAs; a param group given to the inner
    optimizer with its own ``ema_decay`` keeps it, ``None`` for no EMA). ``step(closure)`` runs
    the inner step (the closure is the inner optimizer's to call), then one EMA-only launch per
    (device, dtype) set on EMA steps. The EMA API is the fused optimizers':
    ``ema_parameters``, ``swap_ema``, ``ema_module``, ``num_emas``, ``ek.posthoc``.

    ``state_dict()`` is ``{"optimizer": the inner state dict, "ema": {"state", "param_groups"},
    "format"}``; ``load_state_dict`` takes it or a plain inner-optimizer state dict (the EMAs
    then start from the current parameters).

    Refused: ``torch.optim.LBFGS`` (closure-driven: one ``step()`` evaluates the model several
    times and moves θ through several iterates) and optimizers that already keep EMAs.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, ema_decay=0.9999, ema_every: int = 1,
                 ema_schedule=None, kappa: float = 1.0, backend: str = "auto"):
        _check_inner(optimizer)
        if backend not in _BACKEND_NAMES:
            raise ValueError(f"backend={backend!r} is not a backend; choose one of "
                             f"{_BACKEND_NAMES}")
        ema_defaults = dict(ema_decay=ema_decay, ema_every=ema_every,
                            ema_schedule=ema_schedule, kappa=kappa)
        # Every group checked before any is touched: a failed construction changes nothing.
        for k, g in enumerate(optimizer.param_groups):
            self._check_group(dict(ema_defaults, **g), f"param group {k}")
        self.backend = backend
        self._check_backends([dict(ema_defaults, **g) for g in optimizer.param_groups])
        torch._C._log_api_usage_once("python.optimizer")
        self.optimizer = optimizer
        self._ema_defaults = ema_defaults
        self._init_hooks()
        self._patch_step_function()
        self.state: Dict[torch.Tensor, Dict[str, Any]] = defaultdict(dict)
        self._init_derived()
        for g in optimizer.param_groups:
            self._adopt(g)
        self._ensure_sets()

    # ------------------------------------------------------------------ torch.optim glue ----
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The inner optimizer's param groups (the same list object)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups) -> None:
        self.optimizer.param_groups = groups

    @property
    def defaults(self) -> Dict[str, Any]:
        """The inner optimizer's defaults and the EMA ones (a new dict)."""
        return dict(self.optimizer.defaults, **self._ema_defaults)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler hands grad_scale/found_inf to step() iff the inner optimizer takes them.
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def _init_hooks(self) -> None:
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())

    def _init_derived(self) -> None:
        """Caches rebuilt from param_groups and state: never pickled."""
        self._sets: Dict[int, tuple] = {}  # group index -> (signature, [_EMASet])
        self._swapped = False
        self._teachers: List[tuple] = []
        self._pending = None  # a found_inf step whose outcome the host has not learnt yet

    def __repr__(self) -> str:
        return f"WithEMA({self.optimizer!r})"

    # ------------------------------------------------------------------ validation ----------
    @staticmethod
    def _check_group(group: Dict[str, Any], where: str) -> None:
        """Raise ValueError/TypeError naming a bad EMA setting or a parameter the EMA kernels
        cannot average; mutates nothing."""
        scaling.check_kappa(group["kappa"])
        checks.check_ema_settings(group, where)
        if checks.num_emas(group) == 0:
            return
        for i, p in enumerate(group["params"]):
            if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.is_complex():
                what = type(p).__name__ if not isinstance(p, torch.Tensor) else p.dtype
                raise TypeError(f"parameter {i} of {where} is {what}: an EMA averages real "
                                f"floating-point parameters; give this group ema_decay=None")
            if p.is_sparse:
                raise TypeError(f"parameter {i} of {where} is sparse: the EMA kernels average "
                                f"dense parameters; give this group ema_decay=None")

    def _adopt(self, group: Dict[str, Any]) -> None:
        """Give a (checked) group its EMA settings and clock, where it has none."""
        for k, v in self._ema_defaults.items():
            group.setdefault(k, v)
        for c in COUNTERS:
            group.setdefault(c, 0 if c == "steps" else 0.0)

    def _ema_keys(self, group) -> tuple:
        """The state keys of the group's EMAs: ``ema`` (index 0), ``ema_1``, …."""
        return checks.EMA_KEYS[:checks.num_emas(group)]

    # ------------------------------------------------------------------ the EMA sets --------
    def _group_signature(self, group) -> tuple:
        ps = group["params"]
        return (id(group), id(ps), len(ps), checks.num_emas(group), id(self.state),
                self._backend_key())

    def _backend_key(self) -> tuple:
        return (self.backend, _ops.env_backend())

    def _ensure_sets(self, rebuilt: Optional[List[int]] = None) -> List[List["_EMASet"]]:
        """Per group, its EMA sets (one per device and dtype), rebuilt when the group, its
        parameter list, its EMA count or the backend changed (per group: no loop over
        parameters in the steady state). The indices of the groups rebuilt are appended to
        ``rebuilt``."""
        out = []
        sets = self._sets
        for gi, g in enumerate(self.param_groups):
            if "base_steps" not in g:  # the inner optimizer loaded a state dict on its own
                self._adopt(g)
            sig = self._group_signature(g)
            hit = sets.get(gi)
            if hit is None or hit[0] != sig:
                hit = sets[gi] = (sig, self._build_group(g))
                if rebuilt is not None:
                    rebuilt.append(gi)
            out.append(hit[1])
        for gi in [k for k in sets if k >= len(self.param_groups)]:
            del sets[gi]
        return out

    @torch.no_grad()
    def _build_group(self, group) -> List["_EMASet"]:
        """Create the group's missing EMAs (copies of the parameters) and drop those it no
        longer keeps; its sets for the kernels. A group whose EMA was switched on (or whose
        state was cleared) starts it from the parameters of this moment, so its first EMA
        interval starts now too."""
        keys = self._ema_keys(group)
        dropped = checks.EMA_KEYS[len(keys):]
        params = list(dict.fromkeys(group["params"]))  # a duplicate is averaged once
        if keys and not any("ema" in self.state.get(p, ()) for p in params):
            group["ema_base_steps"] = group["base_steps"]
        by_key: Dict[tuple, list] = {}
        for p in params:
            st = self.state.get(p)
            if st is not None:
                for k in dropped:
                    st.pop(k, None)
                if not st:
                    del self.state[p]
            if not keys:
                continue
            st = self.state[p]
            for k in keys:
                if k not in st:
                    st[k] = _new_ema(p)
            lp = layout.local(p)
            by_key.setdefault((lp.device, lp.dtype), []).append(p)
        backend = self._backend_key()
        return [_EMASet(ps, [[self.state[p][k] for p in ps] for k in keys],
                        self._resolve(dev, dt, len(ps), backend))
                for (dev, dt), ps in by_key.items()]

    def _resolve(self, device, dtype, n, key):
        """The backend module for a set (fp64: the reference under "auto", as the fused
        optimizers; a backend asked for by name that cannot run fp64 raises)."""
        mod = _ops.resolve(self.backend, device)
        if dtype == torch.float64 and mod.NAME != "reference":
            if self.backend == "auto" and not key[1]:
                return _ops.resolve("reference", device)
            raise TypeError(f"backend {mod.NAME!r} runs fp32, bf16 and fp16 parameters; this "
                            f"optimizer has float64 parameters ({n} in one set). Use "
                            f"backend='reference' (or 'auto') for float64")
        return mod

    def _check_backends(self, groups) -> None:
        """Resolve the backend of every (device, dtype) the EMAs will live on: a backend
        asked for by name that cannot run them raises here, before anything is changed."""
        key = self._backend_key()
        seen = set()
        for g in groups:
            if checks.num_emas(g) == 0:
                continue
            for p in g["params"]:
                lp = layout.local(p)
                if (lp.device, lp.dtype) not in seen:
                    seen.add((lp.device, lp.dtype))
                    self._resolve(lp.device, lp.dtype, 1, key)

    def _plan_checks(self) -> None:
        """swap_ema's check: every EMA still matches its parameter (shape, device)."""
        for gi, gsets in enumerate(self._ensure_sets()):
            for s in gsets:
                for p, z in zip(s.params, s.emas[0] if s.emas else ()):
                    lp, lz = layout.local(p), layout.local(z)
                    if lp.shape != lz.shape or lp.device != lz.device:
                        raise RuntimeError(
                            f"a parameter of param group {gi} changed from {tuple(lz.shape)} "
                            f"on {lz.device} to {tuple(lp.shape)} on {lp.device} after its "
                            f"EMA was made (model.to()/p.data = ...): move the model before "
                            f"building the optimizer, or build a new one")

    # ------------------------------------------------------------------ step ----------------
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """The inner optimizer's step (``closure`` passed to it), then the EMA update of every
        group on its EMA steps: one EMA-only launch per (device, dtype, weights) set. Returns
        what the inner step returns.

        GradScaler's ``grad_scale``/``found_inf`` (set as attributes by GradScaler when the
        inner optimizer supports them) are passed on to the inner optimizer; on a step with
        ``found_inf`` set no EMA moves (decided on the device)."""
        if torch.compiler.is_compiling():  # dynamo tracing: a graph break, run eagerly
            return self._step_graph_break(closure)
        return self._step(closure)

    @torch.compiler.disable(reason="WithEMA's step plans its EMA launches in Python; it runs "
                                   "eagerly (a graph break), the inner step included")
    def _step_graph_break(self, closure):
        return self._step(closure)

    def _step(self, closure):
        if self._swapped:
            raise RuntimeError("optimizer.step() inside `with opt.swap_ema():` — the parameters "
                               "hold the EMA there; step after the with-block")
        inner = self.optimizer
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        amp = grad_scale is not None or found_inf is not None
        if amp and not getattr(inner, "_step_supports_amp_scaling", False):
            raise RuntimeError(
                f"grad_scale/found_inf are set on WithEMA but the inner optimizer "
                f"({type(inner).__name__}) does not take them (_step_supports_amp_scaling is "
                f"False): let torch.amp.GradScaler.step(opt) unscale and skip for it")
        self._settle()
        # Plan first: a bad schedule, κ or decay raises before anything has moved (and before
        # an EMA switched on in a group is made).
        plans = [self._ema_plan(gi, g) for gi, g in enumerate(self.param_groups)]
        rebuilt: List[int] = []
        sets = self._ensure_sets(rebuilt)
        for gi in rebuilt:  # an EMA switched on starts its interval now: planned again
            plans[gi] = self._ema_plan(gi, self.param_groups[gi])
        with torch.no_grad():
            for g, gsets, (weights, _, _) in zip(self.param_groups, sets, plans):
                if int(g["steps"]) == 0 and gsets:
                    # A group's first step: its EMAs start as exact copies of the parameters
                    # now (they may have been loaded or changed since construction).
                    for s in gsets:
                        for zs in s.emas:
                            torch._foreach_copy_([layout.local(z) for z in zs],
                                                 [layout.local(p) for p in s.params])
        undo = _Undo([(g, None, None, ()) for g in self.param_groups]) \
            if found_inf is not None else None
        loss = self._inner_step(closure, grad_scale, found_inf, amp)
        with torch.no_grad():
            buffer_weights = self._update_emas(sets, plans, found_inf)
        for g, (weights, s_after, steps) in zip(self.param_groups, plans):
            if weights is not None:
                g["ema_base_steps"] = s_after
            g["base_steps"] = s_after
            g["steps"] = steps
        if buffer_weights and self._teachers:
            self._update_teacher_buffers(buffer_weights, found_inf)
        if undo is not None:
            self._pending = undo.arm(found_inf, self.__dict__.setdefault("_found_host", {}))
        return loss

    def _inner_step(self, closure, grad_scale, found_inf, amp):
        inner = self.optimizer
        if not amp:
            return inner.step() if closure is None else inner.step(closure)
        saved = {k: inner.__dict__[k] for k in ("grad_scale", "found_inf")
                 if k in inner.__dict__}
        inner.grad_scale, inner.found_inf = grad_scale, found_inf
        try:
            return inner.step() if closure is None else inner.step(closure)
        finally:
            for k in ("grad_scale", "found_inf"):
                if k in saved:
                    setattr(inner, k, saved[k])
                else:
                    inner.__dict__.pop(k, None)

    def _ema_plan(self, gi: int, group):
        """``(EMA weights or None, s after this step, step count after it)``: on an EMA step
        one weight 1 − d per EMA, d the schedule's decay over [ema_base_steps, s after).
        Pure: checks and evaluates, mutates nothing."""
        if "base_steps" not in group:  # the inner optimizer loaded a state dict on its own
            self._adopt(group)
        where = f"param group {gi}"
        kappa = scaling.check_kappa(group["kappa"])
        checks.check_ema_settings(group, where)
        sources = checks.ema_sources(group)
        s_after = float(group["base_steps"]) + kappa
        steps = int(group["steps"]) + 1
        if not sources or steps % int(group["ema_every"]) != 0:
            return None, s_after, steps
        s_from = float(group["ema_base_steps"])
        weights = []
        for src in sources:
            if callable(src):
                decay = interval_decay(src, s_from, s_after)
            else:
                decay = scaling.check_rho(src) ** (s_after - s_from)
            weights.append(1.0 - decay)
        return tuple(weights), s_after, steps

    def _update_emas(self, sets, plans, found_inf) -> Dict[int, float]:
        """One EMA-only launch per (device, dtype, backend, weights): groups with the same EMA
        weights share it. Returns ``{EMA index: weight of the first group updated}`` for the
        teachers' buffers."""
        buckets: Dict[tuple, tuple] = {}
        buffer_weights: Dict[int, float] = {}
        for gsets, (weights, _, _) in zip(sets, plans):
            if weights is None:
                continue
            for k, w in enumerate(weights):
                buffer_weights.setdefault(k, w)
            for s in gsets:
                key = (s.device, s.dtype, id(s.backend), weights)
                b = buckets.get(key)
                if b is None:
                    buckets[key] = (s.backend, s.kernel_params(), s.kernel_emas())
                else:
                    b[1].extend(s.kernel_params())
                    for zs, more in zip(b[2], s.kernel_emas()):
                        zs.extend(more)
        for (device, _, _, weights), (backend, ps, emas) in buckets.items():
            if not ps:
                continue
            if found_inf is None:
                backend.ema_only(ps, emas, list(weights))
            else:
                # The weight is chosen on the device (0 on a skipped step: lerp with weight 0
                # is exact) and read by torch's lerp: the reference's foreach EMA-only path,
                # which takes device weights on every device (no host read).
                skip = found_inf.detach().to(device, non_blocking=True).reshape(()) != 0
                zero = torch.zeros((), dtype=emas[0][0].dtype, device=device)
                ws = [torch.where(skip, zero, torch.full((), w, dtype=zero.dtype,
                                                         device=device)) for w in weights]
                _reference_foreach.ema_only(ps, emas, ws)
        return buffer_weights

    def _settle(self) -> None:
        """Roll the EMA clock back if the last step with ``found_inf`` was skipped (learnt one
        step late, without waiting inside the step that produced the flag)."""
        pending = getattr(self, "_pending", None)
        if pending is None:
            return
        self._pending = None
        pending.settle()

    # ------------------------------------------------------------------ delegation ----------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``."""
        if self._swapped:
            raise RuntimeError("zero_grad() inside `with opt.swap_ema():`; call it outside")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the inner optimizer (its checks and defaults), with the EMA settings
        given in it or WithEMA's; its EMAs start from the parameters' current values."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        probe = dict(self._ema_defaults, **param_group)
        probe["params"] = _tensors_of(probe["params"])
        self._check_group(probe, f"param group {len(self.param_groups)}")
        self._check_backends([probe])
        n = len(self.param_groups)
        self.optimizer.add_param_group(param_group)
        for g in self.param_groups[n:]:
            self._adopt(g)
        self._ensure_sets()

    # ------------------------------------------------------------------ checkpoints ---------
    @torch._disable_dynamo
    def state_dict(self) -> Dict[str, Any]:
        """``{"optimizer": inner state dict, "ema": {"state": {index: {"ema": ζ, ...}},
        "param_groups": [EMA settings and clock per group]}, "format": ...}``.

        The inner part is exactly what the inner optimizer would save alone (the EMA keys are
        moved out of its groups), so it loads into a plain inner optimizer; parameter indices
        are torch's. Everything is data: ``torch.load(weights_only=True)`` reads it."""
        self._settle()
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        inner = dict(self.optimizer.state_dict())
        inner["param_groups"] = [dict(g) for g in inner["param_groups"]]
        ema_groups = []
        for g in inner["param_groups"]:
            ema_groups.append({k: copy.deepcopy(g[k]) for k in _SAVED if k in g})
            for k in SETTINGS + COUNTERS:
                g.pop(k, None)
        state: Dict[int, Dict[str, torch.Tensor]] = {}
        for idx, p in _indexed_params(self.param_groups):
            st = self.state.get(p)
            if st:
                state[idx] = {k: v for k, v in st.items() if k in checks.EMA_KEYS}
        sd = {"optimizer": inner, "ema": {"state": state, "param_groups": ema_groups},
              "format": FORMAT}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    @torch._disable_dynamo
    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a WithEMA state dict, or a plain state dict of the inner optimizer (the EMAs
        then start from the current parameters, their clock from now).

        Saved EMA settings replace the current ones; ``ema_schedule`` (not saved) is kept. A
        checkpoint that does not fit is refused before anything is loaded (the inner
        optimizer's own checks run first among the loads)."""
        self._settle()
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        ours = state_dict.get("format") == FORMAT
        inner_sd = state_dict["optimizer"] if ours else state_dict
        ema_sd = state_dict["ema"] if ours else None
        groups = self.param_groups
        if len(inner_sd["param_groups"]) != len(groups):
            raise ValueError(f"loaded state dict has a different number of parameter groups "
                             f"({len(inner_sd['param_groups'])}) than the optimizer "
                             f"({len(groups)})")
        kept = [{k: g[k] for k in SETTINGS + COUNTERS if k in g} for g in groups]
        merged = [dict(k) for k in kept]
        if ema_sd is not None:
            self._check_loaded(ema_sd, merged)
        self.optimizer.load_state_dict(inner_sd)
        groups = self.param_groups  # torch's load_state_dict makes new group dicts
        for g, m in zip(groups, merged):
            for k in SETTINGS + COUNTERS:
                g.pop(k, None)  # a state dict of the bare inner optimizer of a WithEMA
            g.update(m)
            self._adopt(g)
        saved = ema_sd["state"] if ema_sd is not None else {}
        for idx, p in _indexed_params(groups):
            new = saved.get(idx, {})
            st = self.state.get(p, {})
            for k in checks.EMA_KEYS:
                if k in new:
                    cur = st.get(k)
                    if cur is None:
                        cur = st[k] = _new_ema(p)
                    layout.local(cur).copy_(layout.local(new[k]))
                elif k in st:  # not in the checkpoint: starts from the parameter now
                    layout.local(st[k]).copy_(layout.local(p))
            if st:
                self.state[p] = st
        if ema_sd is None:
            for g in groups:
                g["ema_base_steps"] = g["base_steps"]
        self._sets = {}
        self._ensure_sets()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_loaded(self, ema_sd, merged) -> None:
        """Refuse a WithEMA checkpoint that does not fit, before anything is loaded; fills
        ``merged`` (per group: the EMA settings and clock after loading)."""
        saved_groups = ema_sd["param_groups"]
        if len(saved_groups) != len(merged):
            raise ValueError(f"loaded state dict has EMA settings for {len(saved_groups)} "
                             f"param groups, the optimizer has {len(merged)}")
        for k, (m, sg, g) in enumerate(zip(merged, saved_groups, self.param_groups)):
            m.update({key: copy.deepcopy(v) for key, v in sg.items() if key in _SAVED})
            self._check_group(dict(m, params=g["params"]), f"loaded param group {k}")
        for idx, p in _indexed_params(self.param_groups):
            for key, v in ema_sd["state"].get(idx, {}).items():
                want, got = tuple(layout.local(p).shape), tuple(layout.local(v).shape)
                if want != got:
                    raise ValueError(
                        f"loaded state of parameter {idx}: {key!r} has shape {got}, but the "
                        f"parameter has shape {want} — this checkpoint was written for another "
                        f"model or parameter order")

    # ------------------------------------------------------------------ pickling ------------
    def __getstate__(self) -> Dict[str, Any]:
        self._settle()
        return {"optimizer": self.optimizer, "state": self.state, "backend": self.backend,
                "_ema_defaults": self._ema_defaults}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_hooks()
        self._patch_step_function()
        self._init_derived()


class _EMASet:
    """One group's EMA-keeping parameters of one (device, dtype): the tensors of one launch.

    Contiguous parameters go to the kernels as they are (a parameter re-pointed with
    ``p.data = ...`` is followed); other layouts are re-derived per step for those parameters
    only: dense ones (channels_last, transposed) as 1-D aliases of their memory — the EMA has
    the same strides —, others through a contiguous copy (read only: θ is not written)."""

    __slots__ = ("params", "emas", "backend", "device", "dtype", "dtensor", "zviews", "odd")

    def __init__(self, params, emas, backend):
        self.params, self.emas, self.backend = params, emas, backend
        lp = [layout.local(p) for p in params]
        self.device, self.dtype = lp[0].device, lp[0].dtype
        kinds = [layout.kind_of(t) for t in lp]
        self.dtensor = layout.is_dtensor(params[0])  # local shards: fetched fresh each step
        self.odd = [(i, k) for i, k in enumerate(kinds) if k != layout.CONTIGUOUS]
        self.zviews = [[layout.linear_view(layout.local(z)) if k == layout.DENSE
                        else layout.local(z) for z, k in zip(zs, kinds)] for zs in emas]

    def kernel_params(self) -> list:
        ps = [layout.local(p) for p in self.params] if self.dtensor else list(self.params)
        for i, kind in self.odd:
            ps[i] = layout.linear_view(ps[i]) if kind == layout.DENSE else ps[i].contiguous()
        return ps

    def kernel_emas(self) -> list:
        return [list(zs) for zs in self.zviews]


def _new_ema(p: torch.Tensor) -> torch.Tensor:
    """An EMA for ``p``: a copy in the state dtype with ``p``'s strides where ``p`` is dense,
    contiguous otherwise (the kernels then read θ through a contiguous copy)."""
    lp = layout.local(p)
    if layout.kind_of(lp) == layout.STRIDED:
        z = torch.empty(lp.shape, dtype=layout.state_dtype_for(lp.dtype), device=lp.device)
        z.copy_(lp.detach())
        return layout.as_public(p, z)
    return layout.new_state_like(p, copy=True)


def _indexed_params(groups):
    """``(index, p)`` in torch's state-dict numbering (each parameter once, first group)."""
    seen = set()
    idx = 0
    for g in groups:
        for p in g["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                yield idx, p
            idx += 1


def _tensors_of(params) -> list:
    """A param group's ``params`` as a list of tensors (named parameters unpacked); a set is
    left to the inner optimizer to refuse (its ordering is not stable)."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, set):
        return []
    return [p[1] if isinstance(p, tuple) else p for p in params]


def _check_inner(optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"WithEMA wraps a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}: build the optimizer first, e.g. "
                        f"WithEMA(torch.optim.AdamW(model.parameters()), ema_decay=0.999)")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            "WithEMA cannot wrap torch.optim.LBFGS: LBFGS is closure-driven — one step() "
            "evaluates the model several times (max_iter iterations and line-search "
            "evaluations) and moves the parameters through several iterates — so there is no "
            "single new θ per step for an EMA to average at a known rate. Average the iterates "
            "yourself if you need to, or use a first-order optimizer")
    if isinstance(optimizer, (EMAOptimizer, WithEMA)):
        raise ValueError(
            f"{type(optimizer).__name__} already keeps EMAs of its parameters (in its own "
            f"fused pass): set its ema_decay / ema_schedule instead of wrapping it in WithEMA")
