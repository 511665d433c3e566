"""``step()``: plan and validate everything, then launch one fused update per parameter set.

A step has two phases. *Planning* reads the groups, checks every hyperparameter, schedule and
parameter, collects the gradients and decides the launches — it raises before anything has
moved. *Execution* runs the launches and only then advances the counters. A parameter is
stepped iff its ``.grad`` is not None (torch.optim's rule); its EMA follows the group's EMA
clock either way (a parameter that took no step is still averaged, by ``ema_only``).
"""
from __future__ import annotations

import operator
import os
from itertools import repeat
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import _ops, scaling
from ..schedules import interval_decay
from . import checks, layout

_strided = torch.strided


class _Launch:
    """One backend call over (a subset of) a TensorSet."""
    __slots__ = ("ts", "params", "grads", "state", "emas", "step", "ids", "writeback")

    def __init__(self, ts, params, grads, state, emas, step, ids, writeback=None):
        self.ts, self.params, self.grads, self.state, self.emas = ts, params, grads, state, emas
        self.step, self.ids, self.writeback = step, ids, writeback


class StepMixin:
    """The step of :class:`~.base.EMAOptimizer`."""

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, grad_scale=None,
             found_inf=None):
        """One optimizer step of every group, with the EMA update on EMA steps.

        ``grad_scale``/``found_inf`` follow torch.amp.GradScaler's contract (also read from the
        attributes GradScaler sets): gradients are divided by ``grad_scale``; a step with
        ``found_inf != 0`` changes nothing — parameters, state, EMA and counters.
        """
        return self._step_eager(closure, grad_scale, found_inf)

    @torch.compiler.disable(reason="ema_kernels' step is one fused launch per parameter set "
                                   "planned in Python; it runs eagerly (a graph break)")
    def _step_eager(self, closure, grad_scale, found_inf):
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
        # Hyperparameters first: a changed group key (e.g. momentum) may add a state role,
        # and nothing may be allocated for a group that is about to be refused.
        hps = [self._check_hparams(g, where=f"param group {gi}")
               for gi, g in enumerate(self.param_groups)]
        while True:
            try:
                plans = self._plan(self._ensure_sets(), hps)
                break
            except _Replanned:  # parameters moved before their first step: state re-made
                continue
        if self.capturable:
            for *_, launches in plans:
                for ts, backend, plan in launches:
                    self._check_capturable(ts, backend, plan)
        elif found_inf is not None and bool(found_inf.item()):
            return loss  # one host sync: the counters and schedules live on the host
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = grad_scale.to(torch.float32).reshape(1)

        # 2. Execute.
        buffer_weights: Dict[int, float] = {}  # EMA index -> weight of its first group stepped
        for group, hp, (ema_weight, s_after, steps), launches in plans:
            if ema_weight is not None:
                if int(group["steps"]) == 0:
                    self._restart_emas(launches)
                for k, w in enumerate(ema_weight):
                    buffer_weights.setdefault(k, w)
            for ts, backend, plan in launches:
                if self.capturable:
                    self._run_capturable(group, hp, ts, backend, plan, ema_weight, grad_scale,
                                         found_inf)
                else:
                    self._run_set(group, hp, ts, backend, plan, ema_weight, grad_scale)
            if ema_weight is not None:
                group["ema_base_steps"] = s_after
            group["base_steps"] = s_after
            group["steps"] = steps
        if buffer_weights:
            self._update_teacher_buffers(buffer_weights)
        return loss

    # ---------------------------------------------------------------- planning ---------------
    def _plan(self, sets, hps):
        """Check every group and set; the launches of this step. Mutates nothing."""
        plans = []
        for gi, (group, gsets, hp) in enumerate(zip(self.param_groups, sets, hps)):
            ema = self._ema_plan(group, float(group["kappa"]))
            launches = []
            for ts in gsets:
                self._check_params(ts, gi)
                backend = self._backend_for(ts)
                launches.append((ts, backend, self._plan_set(ts, gi, group)))
            plans.append((group, hp, ema, launches))
        return plans

    def _ema_plan(self, group, kappa: float):
        """``(ema weights or None, s after this step, group step count after it)``: on an EMA
        step one weight 1 − d per EMA of the group (a tuple, EMA index order); every EMA of a
        group covers the same interval [ema_base_steps, s after).

        Pure: the schedules are evaluated (and checked) while planning, so a schedule that fails
        or returns a bad decay stops the step before anything has moved."""
        s_before = float(group["base_steps"])
        s_after = s_before + kappa
        steps = int(group["steps"]) + 1
        ema_weight = None
        sources = checks.ema_sources(group)
        if sources and steps % int(group["ema_every"]) == 0:
            s_from = float(group["ema_base_steps"])
            weights = []
            for src in sources:
                if callable(src):  # a schedule
                    decay = interval_decay(src, s_from, s_after)
                else:
                    decay = scaling.check_rho(src) ** (s_after - s_from)
                weights.append(1.0 - decay)
            ema_weight = tuple(weights)
        return ema_weight, s_after, steps

    def _plan_checks(self) -> None:
        """The parameter checks of a step (used by swap_ema): raises, or re-makes the state of
        parameters moved before their first step."""
        while True:
            try:
                for gi, gsets in enumerate(self._ensure_sets()):
                    for ts in gsets:
                        self._check_params(ts, gi)
                return
            except _Replanned:
                continue

    def _param_name(self, gi: int, pos: int) -> str:
        names = self.param_groups[gi].get("param_names")
        if names:
            return f"parameter {names[pos]!r} (param group {gi}, index {pos})"
        return f"parameter {pos} of param group {gi}"

    def _check_params(self, ts: layout.TensorSet, gi: int) -> None:
        """Raise if a parameter's device, dtype or shape changed since its state was made.

        Before a parameter's first step a change is followed (its state is re-created, as
        torch.optim would create it at the first step); after it, it is an error that names
        the parameter, raised before anything moves."""
        dt, dev = ts.dtype, ts.device
        ps = ts.params if not ts.dtensor else [layout.local(p) for p in ts.params]
        bad = [i for i, (p, s) in enumerate(zip(ps, ts.shapes))
               if p.dtype is not dt or p.shape != s or p.device != dev]
        if not bad:
            return
        if all(ts.steps[i] == 0 for i in bad) and int(self.param_groups[gi]["steps"]) == 0:
            for i in bad:  # never stepped: drop the stale state, _build_sets makes it anew
                self.state.pop(ts.params[i], None)
            self._build_sets()
            raise _Replanned()
        i = bad[0]
        p = ps[i]
        raise RuntimeError(
            f"{self._param_name(gi, ts.positions[i])} changed from {ts.shapes[i]} {dt} on "
            f"{dev} to {tuple(p.shape)} {p.dtype} on {p.device} after the optimizer stepped it "
            f"(model.to()/.half()/p.data = ...): its optimizer state and EMA no longer match. "
            f"Move or cast the model before the first step, or build a new optimizer (load "
            f"the old one's state_dict to keep the state)")

    def _plan_set(self, ts: layout.TensorSet, gi: int, group) -> Dict[str, Any]:
        """The gradients of one set, validated, and the launches that will consume them."""
        params = ts.params
        grads = [p.grad for p in params]
        flat = ts.flat
        if flat is not None and ts.uniform_step is not None and _are_flat_views(params, grads,
                                                                                 flat):
            return {"flat": True, "stepped": None, "skipped": [], "missing": []}
        has = list(map(operator.is_not, grads, repeat(None)))
        if all(has):
            stepped, skipped = list(range(len(params))), []
        else:
            stepped = [i for i, h in enumerate(has) if h]
            skipped = [i for i, h in enumerate(has) if not h]
        kgrads = [None] * len(params)
        dt, dev, shapes = ts.dtype, ts.device, ts.shapes
        for i in stepped:
            g = grads[i]
            if ts.dtensor:
                g = layout.local(g)
            if g.layout is not _strided or g.dtype is not dt or g.shape != shapes[i] \
                    or g.device != dev:
                self._bad_grad(gi, ts, i, g)
            kgrads[i] = g
        for i in stepped:  # layout fix-ups: rare (channels_last, odd gradient strides)
            g = kgrads[i]
            kind = ts.kinds[i]
            if kind == layout.CONTIGUOUS:
                if not g.is_contiguous():
                    kgrads[i] = g.contiguous()
            elif kind == layout.DENSE:
                p = layout.local(params[i])
                if g.stride() != p.stride():
                    g = torch.empty_like(p).copy_(g)
                kgrads[i] = layout.linear_view(g)
            else:
                kgrads[i] = g.contiguous()
        missing = [i for i in stepped
                   if any(ts.views[r][i] is None for r in ts.roles)]
        return {"flat": False, "stepped": stepped, "skipped": skipped, "grads": kgrads,
                "missing": missing}

    def _bad_grad(self, gi, ts, i, g):
        name = self._param_name(gi, ts.positions[i])
        if g.layout is not _strided:
            raise RuntimeError(f"{name} has a sparse gradient: ema_kernels optimizers need "
                               f"dense gradients")
        if g.dtype is not ts.dtype:
            raise RuntimeError(f"{name} is {ts.dtype} but its .grad is {g.dtype}: gradients "
                               f"must have the parameter's dtype")
        if g.shape != ts.shapes[i]:
            raise RuntimeError(f"{name} has shape {ts.shapes[i]} but its .grad has shape "
                               f"{tuple(g.shape)}: set a gradient of the parameter's shape")
        raise RuntimeError(f"{name} is on {ts.device} but its .grad is on {g.device}")

    def _check_capturable(self, ts, backend, plan) -> None:
        if not hasattr(backend, "adam_ema_capturable"):
            raise _ops.BackendUnavailableError(
                f"capturable=True needs the device-tensor kernels of the 'cuda' (GPU) or 'cpp' "
                f"(CPU) backend; backend {backend.NAME!r} has none. Build the extension "
                f"(pip install --no-build-isolation -e .) or use capturable=False")
        if any(ts.params[i].requires_grad for i in plan["skipped"]):
            raise RuntimeError(
                "capturable=True steps every parameter of a set together (one device step "
                "count), but some parameters have no gradient (grad None). Give every "
                "parameter a gradient (e.g. opt.zero_grad(set_to_none=False) before backward) "
                "or use capturable=False")
        if plan["missing"] and ts.steps.max(initial=0.0) > 0:
            raise RuntimeError(
                "capturable=True keeps one device step count per parameter set, but a "
                "parameter got its first gradient after the set had stepped (it was frozen): "
                "its Adam bias correction would use the set's count. Unfreeze before the first "
                "step, give it its own param group, or use capturable=False")

    def _backend_for(self, ts: layout.TensorSet):
        """The set's backend module, resolved once per (backend=, $EMA_KERNELS_BACKEND)."""
        key = (self.backend, os.environ.get(_ops.ENV_VAR))
        if ts.backend_key != key:
            mod = _ops.resolve(self.backend, ts.device)
            if ts.dtype == torch.float64 and mod.NAME != "reference":
                # The kernels take fp32/bf16/fp16; "auto" means the best backend that can run
                # these tensors, a backend asked for by name must say it cannot.
                if self.backend == "auto" and not key[1]:
                    mod = _ops.resolve("reference", ts.device)
                else:
                    raise TypeError(
                        f"backend {mod.NAME!r} runs fp32, bf16 and fp16 parameters; this "
                        f"optimizer has float64 parameters ({len(ts.params)} in one set). "
                        f"Use backend='reference' (or 'auto') for float64")
            ts.backend_module, ts.backend_key = mod, key
        return ts.backend_module

    # ---------------------------------------------------------------- execution --------------
    def _restart_emas(self, launches) -> None:
        """A group's first step: every EMA starts as an exact copy of the parameters *now*
        (they may have been loaded or changed since the optimizer was built)."""
        for ts, _, _ in launches:
            for key in ts.ema_keys:
                zs = [layout.local(self.state[p][key]) for p in ts.params]
                torch._foreach_copy_(zs, [layout.local(p) for p in ts.params])

    def _kernel_params(self, ts, ids):
        """θ for the kernels and the write-backs of non-dense parameters."""
        if ts.plain:
            return [ts.params[i] for i in ids], None
        out, back = [], []
        for i in ids:
            p = layout.local(ts.params[i])
            kind = ts.kinds[i]
            if kind == layout.CONTIGUOUS:
                out.append(p)
            elif kind == layout.DENSE:
                out.append(layout.linear_view(p))
            else:
                tmp = p.contiguous()
                out.append(tmp)
                back.append((p, tmp))
        return out, back

    def _run_set(self, group, hp, ts, backend, plan, ema_weight, grad_scale) -> None:
        # Several EMAs: the backends' list-of-EMA-lists form, one weight each (one pass).
        emas = [ts.views[k] for k in ts.ema_keys] if ema_weight is not None else None
        if plan["flat"]:
            fb = ts.flat
            step = ts.uniform_step + 1
            self._update(backend, group, hp, [fb.param], [fb.grad],
                         {r: [fb.roles[r]] for r in ts.roles},
                         [[fb.roles[k]] for k in ts.ema_keys] if emas is not None else None,
                         step, ema_weight, grad_scale)
            ts.steps += 1
            ts.uniform_step = step
            return
        for i in plan["missing"]:  # first gradient of a parameter frozen until now
            st = self.state[ts.params[i]] if ts.params[i] in self.state else {}
            self._ensure_param_state(ts, i, ts.params[i], st, ts.roles)
            self.state[ts.params[i]] = st
            st["step"] = ts.steps_t[i]
        stepped, skipped, grads = plan["stepped"], plan["skipped"], plan["grads"]
        if skipped and emas is not None:
            ps, back = self._kernel_params(ts, skipped)
            backend.ema_only(ps, [[zs[i] for i in skipped] for zs in emas], ema_weight)
        if not stepped:
            return
        if ts.uniform_step is not None:
            by_step = {ts.uniform_step: stepped}
        else:
            by_step = {}
            for i in stepped:
                by_step.setdefault(int(ts.steps[i]), []).append(i)
        views = ts.views
        for t, ids in sorted(by_step.items()):
            ps, back = self._kernel_params(ts, ids)
            self._update(backend, group, hp, ps, [grads[i] for i in ids],
                         {r: [views[r][i] for i in ids] for r in ts.roles},
                         [[zs[i] for i in ids] for zs in emas] if emas is not None else None,
                         t + 1, ema_weight, grad_scale)
            for p, tmp in back or ():
                p.copy_(tmp)
        if len(stepped) == len(ts.params):
            ts.steps += 1
            if ts.uniform_step is not None:
                ts.uniform_step += 1
        else:
            ts.steps[stepped] += 1
            ts.refresh_uniform_step()

    def _run_capturable(self, group, hp, ts, backend, plan, ema_weight, grad_scale,
                        found_inf) -> None:
        """One launch reading lr, t and 1 − ρ̂ from device tensors; no host synchronisation.

        The device step count is incremented before and decremented by ``found_inf`` after the
        kernel (which itself writes nothing on such a step), as torch's capturable Adam does."""
        cap = ts.cap
        emas = [ts.views[k] for k in ts.ema_keys] if ema_weight is not None else None
        if plan["flat"]:
            fb = ts.flat
            params, grads = [fb.param], [fb.grad]
            state = {r: [fb.roles[r]] for r in ts.roles}
            emas = [[fb.roles[k]] for k in ts.ema_keys] if emas is not None else None
            back = None
        else:
            for i in plan["missing"]:
                st = self.state.setdefault(ts.params[i], {})
                self._ensure_param_state(ts, i, ts.params[i], st, ts.roles)
                st["step"] = cap["step"].expand(len(ts.params))[i]
            # Frozen parameters without a gradient are left out (their EMA equals their
            # constant value; an ema_only launch could not see found_inf on the device).
            ids = plan["stepped"]
            params, back = self._kernel_params(ts, ids)
            grads = [plan["grads"][i] for i in ids]
            state = {r: [ts.views[r][i] for i in ids] for r in ts.roles}
            emas = [[zs[i] for i in ids] for zs in emas] if emas is not None else None
        cap["lr"].fill_(hp["lr"])
        if ema_weight is not None:
            # One device weight per EMA (the kernels read k elements).
            if cap["ema_weight"].numel() != len(ema_weight):
                cap["ema_weight"] = torch.zeros(len(ema_weight), device=ts.device,
                                                dtype=torch.float32)
            if len(ema_weight) == 1:
                cap["ema_weight"].fill_(ema_weight[0])
            else:
                cap["ema_weight"].copy_(torch.tensor(ema_weight, dtype=torch.float32))
        cap["step"].add_(1)
        self._update_capturable(backend, group, hp, ts, params, grads, state, emas,
                                cap["ema_weight"] if ema_weight is not None else None,
                                grad_scale, found_inf)
        for p, tmp in back or ():
            p.copy_(tmp)
        if found_inf is not None:
            cap["step"].sub_(found_inf.to(cap["step"].dtype).reshape(1))
        ts.steps += 1  # calls, not applied steps: the device count is the truth here

    def _update(self, backend, group, hp, params, grads, state, emas, step, ema_weight,
                grad_scale):  # pragma: no cover - overridden
        raise NotImplementedError

    def _update_capturable(self, backend, group, hp, ts, params, grads, state, emas,
                           ema_weight, grad_scale, found_inf):  # pragma: no cover - overridden
        raise NotImplementedError


class _Replanned(Exception):
    """Internal: a set was rebuilt while planning (state re-created for moved parameters)."""


def _are_flat_views(params, grads, flat: layout.FlatBuffers) -> bool:
    """True when every parameter and gradient is still our view of the flat buffers (identity
    for gradients, and storage: ``p.data = t`` / ``p.grad.data = t`` keep the object but move
    its storage)."""
    views = flat.bound_grads
    if views is None or len(views) != len(grads):
        return False
    return all(map(operator.is_, grads, views)) and \
        [g.data_ptr() for g in grads] == flat.grad_ptrs and \
        [p.data_ptr() for p in params] == flat.param_ptrs
