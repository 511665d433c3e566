"""The base class of the ema_kernels optimizers: construction, param groups, the parameter
sets each launch updates, ``zero_grad`` and pickling.

The step lives in :mod:`.stepping`, the EMA API and teachers in :mod:`.ema_api`, checkpoints in
:mod:`.checkpoint`, the update rules' glue in :mod:`.adam` and :mod:`.sgd`; the math in
``ema_kernels.backends``.

Every piece of truth is where torch.optim keeps it — ``param_groups`` (hyperparameters and our
counters) and ``state[p]`` (per-parameter tensors) — plus, with ``flatten=True``, the flat
buffers in ``_flat``. Everything else (the :class:`~.layout.TensorSet` caches) is rebuilt from
those, so ``deepcopy``, pickling and ``torch.save(opt)`` give an optimizer that trains on.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch

from .. import _ops
from . import checks, layout, step_hooks, teachers
from .checkpoint import CheckpointMixin
from .clipping import ClipMixin
from .ema_api import EMAMixin
from .stepping import StepMixin

_BACKEND_NAMES = ("auto",) + _ops.BACKENDS
# Per-group counters kept in param_groups (so state_dict carries them):
#   base_steps      s: Σκ over the steps taken (samples seen / base batch)
#   ema_base_steps  s at the last EMA update (the EMA covers [ema_base_steps, base_steps))
#   steps           optimizer steps taken by the group (ema_every counts these)
COUNTERS = ("base_steps", "ema_base_steps", "steps")
EMA_KEYS = checks.EMA_KEYS  # state keys of EMA index 0, 1, ...: "ema", "ema_1", ...


class EMAOptimizer(StepMixin, ClipMixin, EMAMixin, CheckpointMixin, torch.optim.Optimizer):
    """Shared machinery of AdamW, Adam and SGD (subclasses supply the update's glue)."""

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale/found_inf, no unscale pass
    _CONFIG = ("backend", "flatten", "capturable")

    def __init__(self, params, defaults: Dict[str, Any], *, backend: str = "auto",
                 flatten: bool = False, foreach=None, fused=None, capturable: bool = False,
                 differentiable: bool = False):
        # fused=/foreach= are accepted for drop-in compatibility: these optimizers are always fused.
        if differentiable:
            raise RuntimeError("differentiable=True is not supported: the fused update writes "
                               "parameters, state and EMA in place outside autograd")
        if backend not in _BACKEND_NAMES:
            raise ValueError(f"backend={backend!r} is not a backend; choose one of {_BACKEND_NAMES}")
        self.backend = backend
        self.flatten = bool(flatten)
        # capturable: lr, the step count and 1 − ρ̂ live in device tensors the kernels read, and
        # found_inf is never read on the host, so a step can be captured in a CUDA graph.
        self.capturable = bool(capturable)
        self._init_derived()
        defaults = dict(defaults, foreach=foreach, fused=fused, capturable=self.capturable,
                        differentiable=False)
        checks.check_no_ema_with_schedule(defaults, where="defaults")
        self._check_hparams(defaults, where="defaults")
        # Validate every group before adopting any (flatten=True moves storage): a failed
        # construction leaves the parameters as they were.
        groups = checks.split_params(params)
        checked: List[Dict[str, Any]] = []
        for k, g in enumerate(groups):
            checked.append(self._checked_group(g, defaults, checked, k))
        self._flat: List[Dict[tuple, layout.FlatBuffers]] = []
        self._prechecked = {id(g) for g in checked}
        super().__init__(checked, defaults)  # calls add_param_group with each checked group
        del self._prechecked
        self._build_sets()

    def _patch_step_function(self) -> None:
        """torch.optim's hook: wrap the class's ``step`` once, with :mod:`.step_hooks`'s
        wrapper (torch's hooks and profiler range, the range only while profiling)."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        cls = type(self)
        if not getattr(cls.step, "hooked", None):
            cls.step = step_hooks.hook_step(cls.step)

    def _init_derived(self) -> None:
        """Caches rebuilt from param_groups/state: never pickled."""
        self._sets: Optional[List[List[layout.TensorSet]]] = None
        self._sets_sig = None
        self._swapped = False
        self._teachers: List[tuple] = []
        self._pending = None  # a found_inf step whose outcome the host has not learnt yet
        self._hp_cache = {}  # group index -> (group, its values, checked hparams): stepping
        self._clip_pending = None  # clip_grad_norm_'s coefficient for the next step

    # ---------------------------------------------------------------- validation -------------
    def _check_hparams(self, group: Dict[str, Any], where: str) -> Dict[str, Any]:
        """Raise ValueError/TypeError naming the bad value; never mutates anything.

        Returns the hyperparameters the update uses (scaled for the group's κ)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1:
                raise ValueError(f"Tensor lr must be 1-element — lr ({where}) must be a number "
                                 f"or a one-element tensor, got a tensor of shape "
                                 f"{tuple(lr.shape)}")
        else:
            checks.finite_number(f"lr ({where})", lr, low=0.0,
                                 torch_text="Invalid learning rate")
        checks.finite_number(f"weight_decay ({where})", group["weight_decay"], low=0.0,
                             torch_text="Invalid weight_decay value")
        from .. import scaling
        kappa = scaling.check_kappa(group["kappa"])
        checks.check_ema_settings(group, where)
        if self.capturable and checks.num_emas(group) and (
                group["ema_schedule"] is not None or group["ema_every"] != 1):
            raise ValueError(
                f"capturable=True ({where}) needs ema_every=1 and no ema_schedule (got "
                f"ema_every={group['ema_every']!r}, ema_schedule={group['ema_schedule']!r}): a "
                f"replayed CUDA graph runs no Python, so the EMA decay must be the same every "
                f"step. Use ema_decay=rho, or capturable=False")
        self._check_update_hparams(group, where)
        sr = checks.check_stochastic_rounding(group, where, self.capturable)
        if isinstance(lr, torch.Tensor):
            # A tensor lr is never read on the host: the rule's factor (√κ, κ) is applied on
            # the device and the kernels read the product (stepping._device_lrs).
            hp = self._scaled(dict(group, lr=1.0), kappa)
            hp["lr_scale"], hp["lr_tensor"], hp["lr"] = hp["lr"], lr, None
            hp["stochastic_rounding"] = sr
            return hp
        hp = self._scaled(group, kappa)  # raises if κ breaks the optimizer's own rule
        hp["stochastic_rounding"] = sr
        return hp

    def _check_update_hparams(self, group, where):  # pragma: no cover - overridden
        raise NotImplementedError

    def _scaled(self, group, kappa):  # pragma: no cover - overridden
        raise NotImplementedError

    def _roles(self, group) -> tuple:  # pragma: no cover - overridden
        raise NotImplementedError

    # ---------------------------------------------------------------- param groups -----------
    def _checked_group(self, param_group, defaults, existing, index) -> Dict[str, Any]:
        group = checks.normalise_group(param_group, existing)
        checks.check_no_ema_with_schedule(group, where=f"param group {index}")
        for k, v in defaults.items():
            group.setdefault(k, v)
        self._check_hparams(group, where=f"param group {index}")
        return group

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (torch.optim semantics: same checks, errors and warnings)."""
        if id(param_group) in getattr(self, "_prechecked", ()):
            self._adopt_group(param_group)  # from __init__: checked before anything moved
            return
        group = self._checked_group(param_group, self.defaults, self.param_groups,
                                    len(self.param_groups))
        self._adopt_group(group)
        self._build_sets()  # its state exists from now on, as the constructor's groups' does

    @torch.no_grad()
    def _adopt_group(self, group: Dict[str, Any]) -> None:
        """Validation passed: store the group (and, with flatten=True, move its storage)."""
        for c in COUNTERS:
            group.setdefault(c, 0 if c == "steps" else 0.0)
        if group.get("stochastic_rounding") and group.get("sr_seed") is None:
            # drawn only where SR is on: an optimizer without it consumes no random numbers
            # (as torch.optim's); saved with the group (state_dict), so a resumed run draws
            # the same bits
            group["sr_seed"] = checks.draw_sr_seed()
        flats: Dict[tuple, layout.FlatBuffers] = {}
        if self.flatten:
            by_key: Dict[tuple, list] = {}
            for p in dict.fromkeys(group["params"]):
                if layout.is_dtensor(p):
                    continue  # FSDP2 owns the shards' storage: they stay where they are
                by_key.setdefault((p.device, p.dtype), []).append(p)
            for key, ps in by_key.items():
                fb = layout.FlatBuffers(ps)
                fb.bind(ps)
                flats[key] = fb
        self._flat.append(flats)
        self.param_groups.append(group)

    # ---------------------------------------------------------------- the sets ---------------
    def _layout_key(self, group) -> tuple:
        """What of a group's hyperparameters shapes its sets: its EMA count and state roles."""
        return checks.num_emas(group), self._roles(group)

    def _signature(self, hps=None):
        """When this changes the sets are rebuilt. ``hps``: the step's checked hyperparameters,
        which hold each group's :meth:`_layout_key` (step() passes them: no re-derivation)."""
        groups = self.param_groups
        sig = [id(self.state), len(self.state), len(groups)]
        for i, g in enumerate(groups):  # one loop (no comprehensions): every step runs it
            ps = g["params"]
            sig += (id(ps), len(ps))
            sig += hps[i]["layout"] if hps is not None else self._layout_key(g)
        return tuple(sig)

    def _ensure_sets(self, hps=None) -> List[List[layout.TensorSet]]:
        if self._sets is None or self._sets_sig != self._signature(hps):
            self._build_sets()
        return self._sets

    @torch.no_grad()
    def _build_sets(self) -> None:
        """(Re)build the TensorSets from param_groups and state, creating missing state.

        State is created for every parameter that requires grad or has a gradient (zeros,
        step 0; torch creates it at the first step, we at construction so that a fresh
        optimizer's state_dict() is a complete template for torch.distributed.checkpoint), and
        EMAs (copies of the parameter) for every parameter of a group that keeps them. A group
        whose EMA was switched off drops it; one switched on starts it from the parameters (as
        does an EMA added to a group's tuple: ``ema_1`` … start from the parameters of that
        moment, sharing the group's EMA clock)."""
        self._settle()  # the counters the sets are rebuilt from must be final
        sets: List[List[layout.TensorSet]] = []
        for gi, group in enumerate(self.param_groups):
            roles = self._roles(group)
            ema_keys = self._ema_keys(group)
            if ema_keys and not any("ema" in self.state.get(p, ()) for p in group["params"]):
                # An EMA switched on (or restarted by state.clear()): it starts from the
                # parameters of this moment, so its first interval starts now too.
                group["ema_base_steps"] = group["base_steps"]
            by_key: Dict[tuple, tuple] = {}
            seen = set()
            for pos, p in enumerate(group["params"]):
                if id(p) in seen:
                    continue  # a duplicate (torch warns): one state, stepped once
                seen.add(id(p))
                lp = layout.local(p)
                ps, positions = by_key.setdefault((lp.device, lp.dtype), ([], []))
                ps.append(p)
                positions.append(pos)
            gsets = []
            flats = self._flat[gi] if gi < len(self._flat) else {}
            for key, (ps, positions) in by_key.items():
                ts = layout.TensorSet(ps, positions, flats.get(key))
                self._fill_set(ts, group, roles, ema_keys)
                gsets.append(ts)
            sets.append(gsets)
        self._sets = sets
        self._sets_sig = self._signature()

    def _fill_set(self, ts: layout.TensorSet, group, roles, ema_keys) -> None:
        flat = ts.flat
        flat_views = {}
        if flat is not None:
            for r in roles + ema_keys:
                flat_views[r] = flat.role(r, ts.state_dtype)
        for r in roles + ema_keys:
            ts.views[r] = [None] * len(ts.params)
        dropped = [k for k in EMA_KEYS if k not in ema_keys]
        for i, p in enumerate(ts.params):
            st = self.state.get(p)
            if st is None:
                st = {}
            for key in ema_keys:
                if key not in st:
                    st[key] = self._new_state(ts, i, p, flat_views.get(key), copy=True)
                ts.views[key][i] = ts.kernel_view(i, st[key])
            for key in dropped:  # EMAs the group no longer keeps
                st.pop(key, None)
            if "step" in st or p.requires_grad or p.grad is not None:
                self._ensure_param_state(ts, i, p, st, roles, flat_views)
            if st:
                self.state[p] = st
        self._publish_steps(ts)
        ts.roles, ts.ema_keys, ts.has_ema = roles, ema_keys, bool(ema_keys)

    def _new_state(self, ts, i, p, flat_views, copy: bool) -> torch.Tensor:
        if flat_views is not None:
            v = flat_views[i]
            if copy:
                v.copy_(layout.local(p))
            return v
        return layout.new_state_like(p, copy=copy)

    def _ensure_param_state(self, ts, i, p, st, roles, flat_views=None) -> None:
        """Give parameter i of ``ts`` its step and zeroed moments where missing."""
        if flat_views is None and ts.flat is not None:
            flat_views = {r: ts.flat.role(r, ts.state_dtype) for r in roles}
        ts.table = None  # views may change below: the set's StepTable is rebuilt
        step = st.get("step")
        ts.steps[i] = float(step) if step is not None else 0.0  # host read: rebuilds only
        st["step"] = step  # re-pointed at steps_t by _publish_steps
        for r in roles:
            if r not in st:
                st[r] = self._new_state(ts, i, p, (flat_views or {}).get(r), copy=False)
            ts.views[r][i] = ts.kernel_view(i, st[r])

    def _publish_steps(self, ts: layout.TensorSet) -> None:
        """Point each ``state[p]["step"]`` at the host step array (or the device count)."""
        if self.capturable:
            ts.cap = {n: torch.zeros(1, device=ts.device, dtype=torch.float32)
                      for n in ("lr", "step", "ema_weight")}
            first = next((self.state[p]["step"] for p in ts.params
                          if "step" in self.state.get(p, {})), None)
            if isinstance(first, torch.Tensor):
                ts.cap["step"].copy_(first.reshape(1))  # no host read: device to device
            elif first is not None:
                ts.cap["step"].fill_(float(first))
            steps = ts.cap["step"].expand(len(ts.params))
        else:
            steps = ts.steps_t
        for i, p in enumerate(ts.params):
            st = self.state.get(p)
            if st is not None and "step" in st:
                st["step"] = steps[i]
        ts.refresh_uniform_step()

    def _has_ema(self, group) -> bool:
        return checks.num_emas(group) > 0

    def _ema_keys(self, group) -> tuple:
        """The state keys of the group's EMAs: ``ema`` (index 0), ``ema_1``, ``ema_2``, …."""
        return EMA_KEYS[:checks.num_emas(group)]

    # ---------------------------------------------------------------- gradients --------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as torch.optim does (default ``set_to_none=True``).

        With ``set_to_none=False`` existing gradients are zeroed in place (one foreach op per
        device and dtype). With ``flatten=True`` and ``set_to_none=False`` the flat gradient
        buffer is zeroed in one op and every parameter that requires grad gets a view of it as
        ``.grad`` (so each is stepped, with a zero gradient if backward gives it none), which
        makes the next step one launch over whole buffers.

        Inside torch's profiler range ``Optimizer.zero_grad#<Class>.zero_grad``, as torch's, opened
        only while a profiler records (as the step's: see :mod:`.step_hooks`).
        """
        # (under dynamo: no range, as before; _profiler_enabled() is not traceable)
        if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
            if not hasattr(self, "_zero_grad_profile_name"):
                self._patch_step_function()  # as torch's zero_grad
            with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
                return self._zero_grad(set_to_none)
        return self._zero_grad(set_to_none)

    @torch.no_grad()
    def _zero_grad(self, set_to_none: bool) -> None:
        if self._swapped:
            raise RuntimeError("zero_grad() inside `with opt.swap_ema():`; call it outside")
        self._clip_pending = None  # the gradients it measured are gone (see clipping.py)
        to_zero: Dict[tuple, list] = {}
        for gi, group in enumerate(self.param_groups):
            flats = self._flat[gi]
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None and (not flats or layout.is_dtensor(p)):
                    g = p.grad
                    if g.grad_fn is not None:
                        g.detach_()
                    else:
                        g.requires_grad_(False)
                    lg = layout.local(g)
                    to_zero.setdefault((lg.device, lg.dtype), []).append(lg)
            if flats and not set_to_none:
                for fb in flats.values():
                    views = fb.grad_views()
                    fb.grad.zero_()
                    ps = [p for p in dict.fromkeys(group["params"]) if not layout.is_dtensor(p)
                          and (p.device, p.dtype) == (fb.device, fb.dtype)]
                    for p, v in zip(ps, views):
                        if p.requires_grad or p.grad is not None:
                            p.grad = v
        for ts in to_zero.values():
            torch._foreach_zero_(ts)

    # ---------------------------------------------------------------- pickling ---------------
    def __getstate__(self) -> Dict[str, Any]:
        self._settle()
        state = super().__getstate__()
        state.pop("_pending", None)
        state.pop("_found_host", None)
        state["_flat"] = self._flat
        for k in self._CONFIG:
            state[k] = getattr(self, k)
        return state

    def __deepcopy__(self, memo):
        """As the default deepcopy (``__getstate__``, copied with ``memo``, ``__setstate__``),
        and the copies of this optimizer's teachers made in the same deepcopy follow the copy
        (see :mod:`.teachers`)."""
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        teachers.copy_records(self, new, memo)
        return new

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_derived()
        if not hasattr(self, "_flat"):
            self._flat = [{} for _ in self.param_groups]
        self._build_sets()
