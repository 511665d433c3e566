"""AdamW, Adam and SGD that also keep an EMA of the weights, updated in the same pass.

This module is torch.optim glue, the EMA Scaling Rule and the EMA API; the math lives in the
backends (``ema_kernels.backends``), chosen per bucket by :func:`ema_kernels._ops.resolve`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from . import _ops, scaling, schedules
from .flat import Bucket, is_dtensor, local

__all__ = ["AdamW", "Adam", "SGD"]

_BACKEND_NAMES = ("auto",) + _ops.BACKENDS
# Per-group counters kept in param_groups (so state_dict carries them):
#   base_steps      s: Σκ over the steps taken (samples seen / base batch)
#   ema_base_steps  s at the last EMA update (the EMA covers base_steps - ema_base_steps)
#   steps           optimizer steps taken by the group (ema_every counts these)
_COUNTERS = ("base_steps", "ema_base_steps", "steps")
# Group keys a loaded checkpoint never overrides: the parameters themselves, the schedule (a
# callable, not saved) and torch's implementation switches (ours are always fused).
_KEEP_OURS = ("params", "param_names", "ema_schedule", "foreach", "fused", "capturable",
              "differentiable", "decoupled_weight_decay")


def _finite_number(name, value, *, low=None, low_inclusive=True, high=None, high_inclusive=False):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}={value!r} is invalid: it must be finite")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name}={value!r} is invalid: it must be {op} {low}")
    if high is not None and (v > high or (v == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"{name}={value!r} is invalid: it must be {op} {high}")
    return v


class _GroupData:
    """What the optimizer keeps per param group outside ``param_groups``: the buckets."""

    def __init__(self, buckets: List[Bucket], frozen: List[torch.nn.Parameter]):
        self.buckets = buckets
        self.frozen = frozen


class _EMAOptimizer(torch.optim.Optimizer):
    """Shared machinery of the ema_kernels optimizers (subclasses supply the update)."""

    _step_supports_amp_scaling = True  # GradScaler passes grad_scale/found_inf, no unscale pass
    _state_roles: tuple = ()           # flat state buffers of the update, e.g. ("exp_avg", ...)

    def __init__(self, params, defaults: Dict[str, Any], *, backend: str = "auto",
                 flatten: bool = True, foreach=None, fused=None, capturable: bool = False,
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
        self._group_data: List[_GroupData] = []
        self._swapped = False
        self._teachers: List[tuple] = []
        defaults = dict(defaults, foreach=foreach, fused=fused, capturable=self.capturable,
                        differentiable=False)
        self._check_hparams(defaults, where="defaults")
        # Validate every group before packing any: a failed construction must leave the
        # parameters where they were, not half-moved into buffers of an optimizer never built.
        groups = [params] if isinstance(params, torch.Tensor) else params
        if isinstance(groups, (set, frozenset)):
            groups = {"params": groups}  # rejected below with the message about sets
        groups = [groups] if isinstance(groups, dict) else list(groups)
        if not groups:
            raise ValueError("optimizer got an empty parameter list: pass at least one "
                             "parameter (e.g. model.parameters())")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        taken: set = set()
        checked = []
        for k, g in enumerate(groups):
            checked.append(self._validated_group(g, defaults, taken, k))
            taken.update(id(p) for p in checked[-1]["params"])
        super().__init__(checked, defaults)  # the checked groups: generators are consumed

    # ---------------------------------------------------------------- validation -------------
    def _check_hparams(self, group: Dict[str, Any], where: str) -> Dict[str, Any]:
        """Raise ValueError/TypeError naming the bad value; never mutates anything.

        Returns the hyperparameters the update uses (scaled for the group's κ)."""
        _finite_number(f"lr ({where})", group["lr"], low=0.0)
        _finite_number(f"weight_decay ({where})", group["weight_decay"], low=0.0)
        kappa = scaling.check_kappa(group["kappa"])
        if group["ema_decay"] is not None:
            scaling.check_rho(group["ema_decay"], f"ema_decay ({where})")
        every = group["ema_every"]
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"ema_every={every!r} ({where}) is invalid: it must be an integer "
                             f">= 1 (update the EMA every k-th step)")
        sched = group["ema_schedule"]
        if sched is not None and not callable(sched):
            raise TypeError(f"ema_schedule={sched!r} ({where}) must be a callable s -> rho(s), "
                            f"e.g. ema_kernels.schedules.warmup(0.9999)")
        if self.capturable and (sched is not None or every != 1):
            raise ValueError(
                f"capturable=True ({where}) needs ema_every=1 and no ema_schedule (got "
                f"ema_every={every!r}, ema_schedule={sched!r}): a replayed CUDA graph runs no "
                f"Python, so the EMA decay must be the same every step. Use ema_decay=rho, or "
                f"capturable=False")
        self._check_update_hparams(group, where)
        return self._scaled(group, kappa)  # raises if κ breaks the optimizer's own rule

    def _check_update_hparams(self, group, where):  # pragma: no cover - overridden
        raise NotImplementedError

    def _scaled(self, group, kappa):  # pragma: no cover - overridden
        raise NotImplementedError

    # ---------------------------------------------------------------- param groups -----------
    def _validated_group(self, param_group, defaults, taken: set, index: int) -> Dict[str, Any]:
        """The group as it will be stored, after every check; mutates nothing.

        ``taken`` holds the ids of parameters already in other groups."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError("optimizer parameters must be an ordered collection (a list or "
                            "model.parameters()), not a set: a set's order changes between runs "
                            "and the state dict is indexed by position")
        else:
            params = list(params)
        if params and all(isinstance(p, tuple) and len(p) == 2 for p in params):
            param_group = dict(param_group, param_names=[n for n, _ in params])
            params = [p for _, p in params]  # model.named_parameters(), as torch >= 2.6 takes
        if len(params) == 0:
            raise ValueError(f"param group {index} has an empty parameter list: pass at least "
                             f"one parameter (e.g. model.parameters())")
        seen = set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameter {i} of param group {index} is a "
                                f"{type(p).__name__}, not a Tensor")
            if not p.is_leaf:
                raise ValueError(f"parameter {i} of param group {index} is not a leaf tensor: "
                                 f"optimize the nn.Parameter itself, not a result computed "
                                 f"from it")
            if p.is_complex():
                raise TypeError(f"parameter {i} of param group {index} is complex ({p.dtype}): "
                                f"ema_kernels supports real floating-point parameters only; "
                                f"view complex parameters as real (torch.view_as_real)")
            if not p.is_floating_point():
                raise TypeError(f"parameter {i} of param group {index} has dtype {p.dtype}: "
                                f"parameters must be floating point (fp32, bf16, fp16 or fp64)")
            if p.is_sparse:
                raise TypeError(f"parameter {i} of param group {index} is sparse: not supported")
            if id(p) in seen:
                raise ValueError(f"parameter {i} appears twice in param group {index}: "
                                 f"pass each parameter once")
            if id(p) in taken:
                raise ValueError(f"parameter {i} of param group {index} appears in more than "
                                 f"one parameter group: each parameter may belong to one "
                                 f"group only")
            seen.add(id(p))
        group = dict(param_group, params=params)
        for k, v in defaults.items():
            group.setdefault(k, v)
        self._check_hparams(group, where=f"param group {index}")
        return group

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (torch.optim semantics); its parameters are packed into flat buffers."""
        taken = {id(p) for g in self.param_groups for p in g["params"]}
        group = self._validated_group(param_group, self.defaults, taken, len(self.param_groups))
        params = group["params"]
        # Validation passed: from here on we mutate.
        for c in _COUNTERS:
            group.setdefault(c, 0.0 if c != "steps" else 0)
        trainable = [p for p in params if p.requires_grad]
        frozen = [p for p in params if not p.requires_grad]
        by_key: Dict[tuple, List[torch.Tensor]] = {}
        for p in trainable:
            by_key.setdefault((p.device, p.dtype), []).append(p)
        buckets = [Bucket(ps, flat_params=self.flatten) for ps in by_key.values()]
        if group["ema_decay"] is not None or group["ema_schedule"] is not None:
            for b in buckets:
                b.new_state("ema", init="params")
        self._group_data.append(_GroupData(buckets, frozen))
        self.param_groups.append(group)
        for b in buckets:
            self._ensure_state(b, group)

    # ---------------------------------------------------------------- helpers ---------------
    def _has_ema(self, group) -> bool:
        return group["ema_decay"] is not None or group["ema_schedule"] is not None

    def _locate(self):
        """{param: (bucket, index)} over all groups."""
        out = {}
        for gd in self._group_data:
            for b in gd.buckets:
                for i, p in enumerate(b.params):
                    out[p] = (b, i)
        return out

    def _ensure_state(self, bucket: Bucket, group) -> None:
        """Allocate the bucket's optimizer state (zeros, step 0) and publish it in
        ``self.state[p]`` as views (no copies), like torch.optim after a first step.

        State exists from construction on (torch allocates it at the first step): then
        ``state_dict()`` always has the full structure, which torch.distributed.checkpoint
        needs as the template it loads into, and a step-0 entry behaves exactly like no entry.
        """
        fresh = getattr(bucket, "steps", None) is None
        if fresh:
            bucket.steps = np.zeros(len(bucket.params), dtype=np.float32)
            bucket.steps_t = torch.from_numpy(bucket.steps)  # shares memory with the numpy array
            bucket.uniform_step = 0
            if self.capturable:
                # The step count the kernels read lives on the device (one per bucket: the
                # capturable path steps every parameter together); the host array only counts
                # calls. Each parameter's public "step" is a view of it.
                dev = dict(device=bucket.device, dtype=torch.float32)
                bucket.cap_step, bucket.cap_lr = torch.zeros(1, **dev), torch.zeros(1, **dev)
                bucket.cap_ema_weight = torch.zeros(1, **dev)
                bucket.steps_t = bucket.cap_step.expand(len(bucket.params))
        missing = [r for r in self._roles(group) if r not in bucket.state]
        for role in missing:
            bucket.new_state(role)
        if fresh or missing:
            for i, p in enumerate(bucket.params):
                st = self.state[p]
                if "ema" in bucket.state_views:
                    st["ema"] = bucket.as_public(p, bucket.state_views["ema"][i])
                self._public_state(st, bucket, i, group)

    def _roles(self, group) -> tuple:  # pragma: no cover - overridden
        raise NotImplementedError

    def _public_state(self, st, bucket, i, group):  # pragma: no cover - overridden
        raise NotImplementedError

    # ---------------------------------------------------------------- the step ---------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, grad_scale=None,
             found_inf=None):
        """One optimizer step of every group, with the EMA update on EMA steps.

        ``grad_scale``/``found_inf`` follow torch.amp.GradScaler's contract (also read from the
        attributes GradScaler sets): gradients are divided by ``grad_scale``; a step with
        ``found_inf != 0`` changes nothing — parameters, state, EMA and counters.
        """
        if self._swapped:
            raise RuntimeError("optimizer.step() inside `with opt.swap_ema():` — the parameters "
                               "hold the EMA there; step after the with-block")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)

        # 1. Plan and validate everything before any mutation.
        plans = []
        for group, gd in zip(self.param_groups, self._group_data):
            hp = self._check_hparams(group, where="param group")
            kappa = float(group["kappa"])
            bucket_plans = []
            for b in gd.buckets:
                b.check_storage()
                backend = self._backend_for(b)
                if b.grads_are_flat():
                    bucket_plans.append((b, backend, None))
                else:
                    bucket_plans.append((b, backend, self._collect_grads(b)))
            plans.append((group, hp, self._ema_plan(group, kappa), bucket_plans))
        if self.capturable:
            for *_, bucket_plans in plans:
                for b, backend, grads in bucket_plans:
                    self._check_capturable(b, backend, grads)
        elif found_inf is not None and bool(found_inf.item()):
            return loss  # one host sync: the counters and schedules live on the host
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = grad_scale.to(torch.float32).reshape(1)

        # 2. Execute.
        buffer_weight = None
        for group, hp, (ema_weight, s_after, steps), bucket_plans in plans:
            if ema_weight is not None:
                group["ema_base_steps"] = s_after
                if buffer_weight is None:
                    buffer_weight = ema_weight
            for b, backend, grads in bucket_plans:
                self._ensure_state(b, group)  # no-op unless a group key added a state role
                if self.capturable:
                    self._step_bucket_capturable(group, hp, b, backend, grads, ema_weight,
                                                 grad_scale, found_inf)
                else:
                    self._step_bucket(group, hp, b, backend, grads, ema_weight, grad_scale)
            group["base_steps"] = s_after
            group["steps"] = steps
        if buffer_weight is not None:
            self._update_teacher_buffers(buffer_weight)
        return loss

    def _ema_plan(self, group, kappa: float):
        """``(ema_weight or None, s after this step, group step count after it)``.

        Pure: the schedule is called (and its value checked) while planning, so a schedule
        that fails or returns a bad ρ stops the step before anything has moved."""
        s_before = float(group["base_steps"])
        s_after = s_before + kappa
        steps = int(group["steps"]) + 1
        ema_weight = None
        if self._has_ema(group) and steps % int(group["ema_every"]) == 0:
            sched = group["ema_schedule"]
            s_from = float(group["ema_base_steps"])
            if sched is not None:  # the product of the per-base-step decays over the interval
                decay = schedules.interval_decay(sched, s_from, s_after)
            else:
                decay = scaling.check_rho(group["ema_decay"], "ema_decay") ** (s_after - s_from)
            ema_weight = 1.0 - decay
        return ema_weight, s_after, steps

    def _check_capturable(self, b: Bucket, backend, grads) -> None:
        if not hasattr(backend, "adam_ema_capturable"):
            raise _ops.BackendUnavailableError(
                f"capturable=True needs the device-tensor kernels of the 'cuda' (GPU) or 'cpp' "
                f"(CPU) backend; backend {backend.NAME!r} has none. Build the extension "
                f"(pip install --no-build-isolation -e .) or use capturable=False")
        if grads is not None and any(g is None for g in grads):
            raise RuntimeError(
                "capturable=True steps every parameter of a bucket together (one device step "
                "count), but some parameters have no gradient (grad None). Use "
                "opt.zero_grad() (set_to_none=False, the default) or capturable=False")

    def _step_bucket_capturable(self, group, hp, b: Bucket, backend, grads, ema_weight,
                                grad_scale, found_inf) -> None:
        """One launch reading lr, t and 1 − ρ̂ from device tensors; no host synchronisation.

        The device step count is incremented before and decremented by ``found_inf`` after the
        kernel (which itself writes nothing on such a step), as torch's capturable Adam does.
        """
        emas = b.state_views.get("ema") if ema_weight is not None else None
        if grads is None:
            params, grads = [b.param_flat], [b.grad_flat]
            state = {r: [b.state[r]] for r in self._roles(group)}
            emas = [b.state["ema"]] if emas is not None else None
        else:
            params = b.locals()
            state = {r: b.state_views[r] for r in self._roles(group)}
        b.cap_lr.fill_(hp["lr"])
        if ema_weight is not None:
            b.cap_ema_weight.fill_(ema_weight)
        b.cap_step.add_(1)
        self._update_capturable(backend, group, hp, b, params, grads, state, emas,
                                b.cap_ema_weight if ema_weight is not None else None,
                                grad_scale, found_inf)
        if found_inf is not None:
            b.cap_step.sub_(found_inf.to(b.cap_step.dtype).reshape(1))
        b.steps += 1  # calls, not applied steps: the device count is the truth here

    def _update_capturable(self, backend, group, hp, b, params, grads, state, emas, ema_weight,
                           grad_scale, found_inf):  # pragma: no cover - overridden
        raise NotImplementedError

    def _backend_for(self, b: Bucket):
        """The bucket's backend module, resolved once per (backend=, $EMA_KERNELS_BACKEND)."""
        key = (self.backend, os.environ.get(_ops.ENV_VAR))
        if getattr(b, "backend_key", None) != key:
            mod = _ops.resolve(self.backend, b.device)
            if b.dtype == torch.float64 and mod.NAME != "reference":
                # The kernels take fp32/bf16/fp16; "auto" means the best backend that can run
                # these tensors, a backend asked for by name must say it cannot.
                if self.backend == "auto" and not key[1]:
                    mod = _ops.resolve("reference", b.device)
                else:
                    raise TypeError(
                        f"backend {mod.NAME!r} runs fp32, bf16 and fp16 parameters; this "
                        f"optimizer has float64 parameters ({len(b.params)} in one bucket). "
                        f"Use backend='reference' (or 'auto') for float64")
            b.backend_module, b.backend_key = mod, key
        return b.backend_module

    def _collect_grads(self, b: Bucket) -> List[Optional[torch.Tensor]]:
        """The bucket's gradients where they lie (tensor-list path), validated."""
        grads = []
        for i, p in enumerate(b.params):
            g = p.grad
            if g is not None:
                g, p = local(g), local(p)
                if g.is_sparse:
                    raise RuntimeError(f"parameter {i} (shape {tuple(p.shape)}) has a sparse "
                                       f"gradient: ema_kernels optimizers need dense gradients")
                if g.shape != p.shape:
                    raise RuntimeError(f"parameter {i} has shape {tuple(p.shape)} but its .grad "
                                       f"has shape {tuple(g.shape)}: set a gradient of the "
                                       f"parameter's shape")
                if g.dtype != p.dtype:
                    raise RuntimeError(f"parameter {i} is {p.dtype} but its .grad is {g.dtype}: "
                                       f"gradients must have the parameter's dtype")
                if g.device != p.device:
                    raise RuntimeError(f"parameter {i} is on {p.device} but its .grad is on "
                                       f"{g.device}")
                if not g.is_contiguous():
                    g = g.contiguous()
            grads.append(g)
        return grads

    def _step_bucket(self, group, hp, b: Bucket, backend, grads, ema_weight, grad_scale):
        """Run the backend over one bucket: flat when possible, tensor lists otherwise."""
        emas = b.state_views.get("ema")
        if grads is None:
            # Flat layout, every gradient is our view: one call over the whole buffers, or one
            # per distinct step count if some parameters were skipped earlier (None grads).
            if b.uniform_step is not None:
                lo = b.uniform_step
                flat_emas = [b.state["ema"]] if emas is not None else None
                self._update(backend, group, hp, [b.param_flat], [b.grad_flat],
                             {r: [b.state[r]] for r in self._roles(group)}, flat_emas,
                             lo + 1, ema_weight, grad_scale)
                b.steps += 1
                b.uniform_step = lo + 1
                return
            grads = b.grad_views
            idx = list(range(len(b.params)))
        else:
            idx = [i for i, g in enumerate(grads) if g is not None]
            skipped = [i for i, g in enumerate(grads) if g is None]
            if skipped and ema_weight is not None and emas is not None:
                # The EMA clock is the group's: parameters that took no step still average.
                backend.ema_only([local(b.params[i]) for i in skipped],
                                 [emas[i] for i in skipped], ema_weight)
        by_step: Dict[int, List[int]] = {}
        for i in idx:
            by_step.setdefault(int(b.steps[i]), []).append(i)
        for t, ids in sorted(by_step.items()):
            self._update(backend, group, hp, [local(b.params[i]) for i in ids],
                         [grads[i] for i in ids],
                         {r: [b.state_views[r][i] for i in ids] for r in self._roles(group)},
                         [emas[i] for i in ids] if emas is not None else None,
                         t + 1, ema_weight, grad_scale)
            b.steps[ids] += 1
        b.refresh_uniform_step()

    def _update(self, backend, group, hp, params, grads, state, emas, step, ema_weight,
                grad_scale):  # pragma: no cover - overridden
        raise NotImplementedError

    # ---------------------------------------------------------------- gradients --------------
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradients. Default ``set_to_none=False``: one op over each flat gradient
        buffer, and every ``p.grad`` is (again) a view of it, so the next step is one fused
        pass. Every packed parameter is then stepped, one that got no gradient with a zero
        gradient (as torch does with ``set_to_none=False``). With ``set_to_none=True`` grads
        become ``None`` and the next step follows torch exactly: parameters without a gradient
        are skipped (their EMA still follows the group's EMA clock).
        """
        for gd in self._group_data:
            for b in gd.buckets:
                if set_to_none:
                    for p in b.params:
                        p.grad = None
                elif b.flat_params:
                    b.restore_grad_views(zero=True)
                else:
                    for p in b.params:
                        if p.grad is not None:
                            p.grad.detach_()
                            p.grad.zero_()

    # ---------------------------------------------------------------- EMA API ----------------
    def ema_parameters(self, index: int = 0) -> List[Optional[torch.Tensor]]:
        """ζ for every parameter, aligned with ``[p for g in param_groups for p in g["params"]]``.

        Each entry is a view of the EMA storage with the parameter's shape (fp32 for 16-bit
        parameters), or ``None`` when the parameter's group keeps no EMA (``ema_decay=None``)
        or the parameter does not require grad (it is never touched).
        """
        if index != 0:  # one EMA per optimizer until the multi-EMA kernels land (issue 14)
            raise ValueError(f"index={index!r} is invalid: this optimizer keeps one EMA (index 0)")
        where = self._locate()
        out = []
        for g in self.param_groups:
            for p in g["params"]:
                loc = where.get(p)
                if loc is None or "ema" not in loc[0].state_views:
                    out.append(None)
                else:
                    out.append(loc[0].as_public(p, loc[0].state_views["ema"][loc[1]]))
        return out

    @contextlib.contextmanager
    def swap_ema(self):
        """Inside the block the parameters hold their EMA; after it, bit for bit their own values.

        Parameters of groups without an EMA are left alone. ``step()`` inside raises.
        """
        if self._swapped:
            raise RuntimeError("swap_ema() is already active: the blocks cannot be nested")
        saved = []
        for gd in self._group_data:
            for b in gd.buckets:
                if "ema" not in b.state:
                    continue
                b.check_storage()
                if b.flat_params:
                    saved.append((b.param_flat, b.param_flat.clone()))
                    b.param_flat.copy_(b.state["ema"])
                else:
                    for t, z in zip(b.locals(), b.state_views["ema"]):
                        saved.append((t, t.clone()))
                        t.copy_(z)
        self._swapped = True
        try:
            yield self
        finally:
            for dst, src in saved:
                dst.copy_(src)
            self._swapped = False

    def ema_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """A module with ``model``'s structure whose parameters are live views of the EMA.

        No copy of the EMA storage is made: after the next ``step()`` the teacher already holds
        the new EMA. Parameters without an EMA (a group with ``ema_decay=None``, frozen or not
        in this optimizer) alias the student's parameter. Floating-point buffers of the teacher
        follow the same EMA (on EMA steps, with the decay of the first group that updated its
        EMA in that step, like timm's ModelEmaV3); integer buffers are copied. For 16-bit
        models the teacher's parameters are the fp32 EMA (run it under autocast).
        """
        if any(is_dtensor(p) for p in model.parameters()):
            raise NotImplementedError(
                "ema_module() of a sharded (FSDP2/DTensor) model is not supported: a deep copy "
                "would duplicate FSDP's internal state. Use `with opt.swap_ema(): "
                "teacher_out = model(x)` for teacher forward passes (the shards hold the EMA "
                "inside the block and FSDP gathers them as usual), or opt.ema_parameters(), "
                "which are DTensors laid out like the parameters")
        where = self._locate()
        memo = {}
        for p in model.parameters():
            loc = where.get(p)
            if loc is not None and "ema" in loc[0].state_views:
                src = loc[0].state_views["ema"][loc[1]]
            else:
                src = p.detach()
            memo[id(p)] = torch.nn.Parameter(src, requires_grad=False)
        teacher = copy.deepcopy(model, memo)
        teacher.requires_grad_(False)
        pairs = []
        t_bufs = dict(teacher.named_buffers())
        for name, buf in model.named_buffers():
            if name in t_bufs:
                pairs.append((t_bufs[name], buf))
        self._teachers.append(pairs)
        return teacher

    @torch.no_grad()
    def _update_teacher_buffers(self, weight: float) -> None:
        for pairs in self._teachers:
            for t, s in pairs:
                if t.is_floating_point():
                    t.lerp_(s.to(t.dtype), weight)
                else:
                    t.copy_(s)

    # ---------------------------------------------------------------- checkpoints ------------
    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's format (``state`` by parameter index, ``param_groups``) plus an
        ``ema`` entry per parameter. Tensors are copies, not views of the flat buffers (a view
        would make torch.save write the whole buffer once per parameter)."""
        where = self._locate()
        state, groups, index = {}, [], 0
        for g in self.param_groups:
            ids = []
            for p in g["params"]:
                loc = where.get(p)
                if loc is not None:
                    b, i = loc
                    st = {}
                    self._public_state(st, b, i, g)
                    st = {k: v.clone() for k, v in st.items()}
                    if "ema" in b.state_views:
                        st["ema"] = b.as_public(p, b.state_views["ema"][i]).clone()
                    if st:
                        state[index] = st
                ids.append(index)
                index += 1
            saved = {k: v for k, v in g.items() if k not in ("params", "ema_schedule")}
            saved["params"] = ids
            groups.append(saved)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load our own or a torch.optim (AdamW/Adam/SGD) state dict.

        Hyperparameters and counters saved in the groups replace ours; keys the checkpoint
        lacks (a torch checkpoint has no EMA settings) keep their current values, and
        ``ema_schedule`` (a callable, not saved) is kept. A parameter without an ``ema`` entry
        starts its EMA from its current value.
        """
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(groups)} parameter groups but the "
                             f"optimizer has {len(self.param_groups)}")
        for k, (ours, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(ours["params"]) != len(theirs["params"]):
                raise ValueError(f"param group {k}: the loaded state dict has "
                                 f"{len(theirs['params'])} parameters, the optimizer "
                                 f"{len(ours['params'])}")
        merged = []
        for ours, theirs in zip(self.param_groups, groups):
            g = dict(ours)
            for key, v in theirs.items():
                if key not in _KEEP_OURS:
                    g[key] = v
            merged.append(g)
        for k, g in enumerate(merged):
            self._check_hparams(g, where=f"loaded param group {k}")
        where = self._locate()
        saved_state = state_dict["state"]
        self._check_loaded_state(merged, groups, saved_state, where)
        touched = {}
        for g, theirs in zip(merged, groups):
            for p, idx in zip(g["params"], theirs["params"]):
                loc = where.get(p)
                if loc is None:
                    continue
                b, i = loc
                st = saved_state.get(idx, {})
                self._load_param_state(g, b, i, p, st)
                touched[id(b)] = b
                if "ema" in b.state_views:
                    z = b.state_views["ema"][i]
                    z.copy_(local(st["ema"]) if "ema" in st else local(p))
        for b in touched.values():
            b.refresh_uniform_step()
            if self.capturable:  # one device count per bucket (checked equal above)
                b.cap_step.fill_(float(b.steps.max()))
        for k, g in enumerate(merged):
            self.param_groups[k].update(g)

    def _check_loaded_state(self, merged, groups, saved_state, where) -> None:
        """Refuse a checkpoint that does not fit, before anything is loaded: every tensor must
        have its parameter's shape (copy_ would broadcast a smaller one silently)."""
        for g, theirs in zip(merged, groups):
            roles = set(self._roles(g)) | {"ema"}
            for p, idx in zip(g["params"], theirs["params"]):
                loc = where.get(p)
                st = saved_state.get(idx, {})
                if loc is None or not st:
                    continue
                b, i = loc
                for key, v in st.items():
                    if key == "step":
                        if isinstance(v, torch.Tensor) and v.numel() != 1:
                            raise ValueError(f"loaded state of parameter {idx}: 'step' has "
                                             f"shape {tuple(v.shape)}, expected a scalar")
                        continue
                    if key not in roles or v is None:
                        continue  # e.g. another optimizer's entry: ignored, as torch does
                    shape = tuple(local(v).shape)
                    if shape != tuple(b.shapes[i]):
                        raise ValueError(
                            f"loaded state of parameter {idx}: {key!r} has shape {shape}, but "
                            f"the parameter has shape {tuple(b.shapes[i])} — this checkpoint "
                            f"was written for another model or parameter order")
            if self.capturable:
                by_bucket: Dict[int, set] = {}
                for p, idx in zip(g["params"], theirs["params"]):
                    loc = where.get(p)
                    if loc is not None:
                        step = saved_state.get(idx, {}).get("step", 0.0)
                        by_bucket.setdefault(id(loc[0]), set()).add(float(step))
                if any(len(v) > 1 for v in by_bucket.values()):
                    raise ValueError(
                        "the checkpoint's parameters took different numbers of steps (some had "
                        "no gradient on some step), but capturable=True keeps one device step "
                        "count per bucket; load it with capturable=False")

    def _load_param_state(self, group, b, i, p, st):  # pragma: no cover - overridden
        raise NotImplementedError


class _AdamBase(_EMAOptimizer):
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False, ema_decay=0.9999, ema_every=1,
                 ema_schedule=None, kappa=1.0, scale_optimizer=True, backend="auto",
                 flatten=True, foreach=None, fused=None, capturable=False,
                 differentiable=False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=bool(amsgrad), maximize=bool(maximize),
                        # saved with the groups so torch.optim.Adam loading our checkpoint
                        # keeps AdamW's decoupled decay (the class decides ours)
                        decoupled_weight_decay=self._decoupled, ema_decay=ema_decay,
                        ema_every=ema_every, ema_schedule=ema_schedule, kappa=kappa,
                        scale_optimizer=bool(scale_optimizer))
        super().__init__(params, defaults, backend=backend, flatten=flatten, foreach=foreach,
                         fused=fused, capturable=capturable, differentiable=differentiable)

    def _check_update_hparams(self, group, where):
        _finite_number(f"eps ({where})", group["eps"], low=0.0)
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas={betas!r} ({where}) must be a pair (beta1, beta2)")
        for i, b in enumerate(betas):
            _finite_number(f"betas[{i}] ({where})", b, low=0.0, high=1.0)

    def _scaled(self, group, kappa):
        if group["scale_optimizer"]:
            return scaling.adam(group["lr"], group["betas"], group["eps"],
                                group["weight_decay"], kappa, decoupled=self._decoupled)
        return {"lr": float(group["lr"]), "betas": tuple(float(b) for b in group["betas"]),
                "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}

    def _roles(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] \
            else ("exp_avg", "exp_avg_sq")

    def _public_state(self, st, b, i, group):
        st["step"] = b.steps_t[i]
        for role in self._roles(group):
            st[role] = b.as_public(b.params[i], b.state_views[role][i])

    def _update(self, backend, group, hp, params, grads, state, emas, step, ema_weight,
                grad_scale):
        beta1, beta2 = hp["betas"]
        backend.adam_ema(
            params, grads, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
            emas if ema_weight is not None else None,
            lr=hp["lr"], beta1=beta1, beta2=beta2, eps=hp["eps"],
            weight_decay=hp["weight_decay"], decoupled=self._decoupled,
            maximize=bool(group["maximize"]), step_size=hp["lr"] / (1.0 - beta1 ** step),
            bias_correction2_sqrt=(1.0 - beta2 ** step) ** 0.5, ema_weight=ema_weight,
            grad_scale=grad_scale, found_inf=None)

    def _update_capturable(self, backend, group, hp, b, params, grads, state, emas, ema_weight,
                           grad_scale, found_inf):
        beta1, beta2 = hp["betas"]
        backend.adam_ema_capturable(
            params, grads, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
            emas, lr=b.cap_lr, step=b.cap_step, beta1=beta1, beta2=beta2, eps=hp["eps"],
            weight_decay=hp["weight_decay"], decoupled=self._decoupled,
            maximize=bool(group["maximize"]), ema_weight=ema_weight, grad_scale=grad_scale,
            found_inf=found_inf)

    def _load_param_state(self, group, b, i, p, st):
        self._ensure_state(b, group)
        b.steps[i] = float(st["step"]) if "step" in st else 0.0
        for role in self._roles(group):
            if role in st:
                b.state_views[role][i].copy_(local(st[role]))
            else:
                b.state_views[role][i].zero_()


class AdamW(_AdamBase):
    """torch.optim.AdamW (decoupled weight decay) fused with an EMA of the weights.

    Same math, defaults and group keys as ``torch.optim.AdamW``, plus:

    - ``ema_decay`` ρ at the base batch in [0, 1] (``None`` in a group: no EMA for it),
    - ``ema_every`` k: update the EMA every k-th step with ρ raised to the base steps covered,
    - ``ema_schedule`` callable ``s -> ρ(s)`` (see :mod:`ema_kernels.schedules`),
    - ``kappa`` κ: batch-size scale; the EMA uses ρ^κ per step and, with
      ``scale_optimizer=True``, lr·√κ, β → 1 − κ(1 − β), ε/√κ, weight decay·√κ,
    - ``backend``: ``"auto" | "reference" | "triton" | "cuda" | "cpp"``,
    - ``flatten``: pack parameters into flat buffers (default) or leave them in place.
    """
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, **kwargs)


class Adam(_AdamBase):
    """torch.optim.Adam (L2 weight decay added to the gradient) fused with an EMA of the
    weights; see :class:`AdamW` for the EMA and scaling keywords. ``decoupled_weight_decay=True``
    makes it AdamW, as in torch."""
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, decoupled_weight_decay=False, **kwargs):
        self._decoupled = bool(decoupled_weight_decay)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, **kwargs)


class SGD(_EMAOptimizer):
    """torch.optim.SGD (momentum, dampening, Nesterov, weight decay, maximize) fused with an EMA
    of the weights. With ``scale_optimizer=True`` the learning rate scales linearly, lr·κ; see
    :class:`AdamW` for the EMA and scaling keywords."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, ema_decay=0.9999, ema_every=1,
                 ema_schedule=None, kappa=1.0, scale_optimizer=True, backend="auto",
                 flatten=True, foreach=None, fused=None, capturable=False,
                 differentiable=False):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=bool(nesterov),
                        maximize=bool(maximize), ema_decay=ema_decay, ema_every=ema_every,
                        ema_schedule=ema_schedule, kappa=kappa,
                        scale_optimizer=bool(scale_optimizer))
        super().__init__(params, defaults, backend=backend, flatten=flatten, foreach=foreach,
                         fused=fused, capturable=capturable, differentiable=differentiable)

    def _check_update_hparams(self, group, where):
        momentum = _finite_number(f"momentum ({where})", group["momentum"], low=0.0)
        dampening = _finite_number(f"dampening ({where})", group["dampening"])
        if self.capturable and momentum != 0 and dampening != 0:
            raise ValueError(
                f"capturable=True SGD ({where}) needs dampening=0 (got {group['dampening']!r}): "
                f"torch initialises the momentum buffer undampened on the first applied step, "
                f"and under capturable=True which step that is (found_inf) is known only on "
                f"the device. Use dampening=0 or capturable=False")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(f"nesterov=True ({where}) requires momentum > 0 and dampening = 0 "
                             f"(got momentum={group['momentum']!r}, "
                             f"dampening={group['dampening']!r})")

    def _scaled(self, group, kappa):
        lr = scaling.sgd(group["lr"], kappa)["lr"] if group["scale_optimizer"] \
            else float(group["lr"])
        return {"lr": lr, "momentum": float(group["momentum"]),
                "dampening": float(group["dampening"]),
                "weight_decay": float(group["weight_decay"])}

    def _roles(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _public_state(self, st, b, i, group):
        # "step" (not in torch.optim.SGD's state; torch ignores it) records whether the
        # momentum buffer holds anything yet: the first step initialises it to the gradient.
        st["step"] = b.steps_t[i]
        if group["momentum"] != 0:
            st["momentum_buffer"] = b.as_public(b.params[i], b.state_views["momentum_buffer"][i])

    def _update(self, backend, group, hp, params, grads, state, emas, step, ema_weight,
                grad_scale):
        backend.sgd_ema(
            params, grads, state.get("momentum_buffer"), emas if ema_weight is not None else None,
            lr=hp["lr"], momentum=hp["momentum"], dampening=hp["dampening"],
            weight_decay=hp["weight_decay"], nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]), first_step=(step == 1), ema_weight=ema_weight,
            grad_scale=grad_scale, found_inf=None)

    def _update_capturable(self, backend, group, hp, b, params, grads, state, emas, ema_weight,
                           grad_scale, found_inf):
        backend.sgd_ema_capturable(
            params, grads, state.get("momentum_buffer"), emas, lr=b.cap_lr,
            momentum=hp["momentum"], dampening=hp["dampening"],
            weight_decay=hp["weight_decay"], nesterov=bool(group["nesterov"]),
            # Never first_step: which step is the first *applied* one is known only on the
            # device (found_inf). With dampening 0 (enforced) a zero buffer updated as
            # momentum·0 + d is exactly torch's first-step buf = d.
            maximize=bool(group["maximize"]), first_step=False,
            ema_weight=ema_weight, grad_scale=grad_scale, found_inf=found_inf)

    def _load_param_state(self, group, b, i, p, st):
        buf = st.get("momentum_buffer")
        self._ensure_state(b, group)
        # torch.optim.SGD saves no step: a saved buffer means it was initialised.
        b.steps[i] = float(st["step"]) if "step" in st else float(buf is not None)
        if group["momentum"] != 0:
            if buf is not None:
                b.state_views["momentum_buffer"][i].copy_(local(buf))
            else:
                b.state_views["momentum_buffer"][i].zero_()
