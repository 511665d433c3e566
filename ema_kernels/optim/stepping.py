"""``step()``: plan and validate everything, then launch one fused update per parameter set.

A step has two phases. *Planning* reads the groups, checks every hyperparameter, schedule and
parameter, collects the gradients and decides the launches — it raises before anything has
moved. *Execution* runs the launches and only then advances the counters. A parameter is
stepped iff its ``.grad`` is not None (torch.optim's rule); its EMA follows the group's EMA
clock either way (a parameter that took no step is still averaged, by ``ema_only``).
"""
from __future__ import annotations

import operator
from itertools import repeat
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import _ops, scaling
from ..schedules import interval_decay
from . import checks, layout, tables

_strided = torch.strided
_TABLE_PLAN = {"flat": False, "table": True, "stepped": None, "skipped": [], "missing": []}
_FLAT_PLAN = {"flat": True, "stepped": None, "skipped": [], "missing": []}
_SR_DTYPES = (torch.bfloat16, torch.float16)  # stochastic rounding: fp32 is stored exactly


class StepMixin:
    """The step of :class:`~.base.EMAOptimizer`."""

    def step(self, closure: Optional[Callable[[], Any]] = None, *, grad_scale=None,
             found_inf=None):
        """One optimizer step of every group, with the EMA update on EMA steps (under no_grad;
        a ``closure`` runs with grad enabled, as in torch.optim).

        ``grad_scale``/``found_inf`` follow torch.amp.GradScaler's contract (also read from the
        attributes GradScaler sets): gradients are divided by ``grad_scale``; a step with
        ``found_inf != 0`` changes nothing — parameters, state, EMA and counters.
        """
        if torch.compiler.is_compiling():  # dynamo tracing: a graph break, run eagerly
            return self._step_graph_break(closure, grad_scale, found_inf)
        with torch.no_grad():
            return self._step_eager(closure, grad_scale, found_inf)

    @torch.compiler.disable(reason="ema_kernels' step is one fused launch per parameter set "
                                   "planned in Python; it runs eagerly (a graph break)")
    @torch.no_grad()
    def _step_graph_break(self, closure, grad_scale, found_inf):
        return self._step_eager(closure, grad_scale, found_inf)

    def _step_eager(self, closure, grad_scale, found_inf):
        if self._swapped:
            raise RuntimeError("optimizer.step() inside `with opt.swap_ema():` — the parameters "
                               "hold the EMA there; step after the with-block")
        if _cuda_present is not False and not self.capturable and _capturing_on(self._sets):
            raise RuntimeError(
                "optimizer.step() inside a CUDA-graph capture with capturable=False: its "
                "kernels take lr, the bias corrections and the EMA weights as host values of "
                "this step, so every replay would repeat this step's values. Build the "
                "optimizer with capturable=True (its kernels read them from device tensors) "
                "to capture step(), or step outside the capture")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        self._settle()  # did the previous step apply? (found_inf, learnt one step late)
        # Hyperparameters first: a changed group key (e.g. momentum) may add a state role,
        # and nothing may be allocated for a group that is about to be refused.
        hps = [self._step_hparams(gi, g) for gi, g in enumerate(self.param_groups)]
        plans = None
        if grad_scale is None and found_inf is None and self._clip_pending is None and \
                not self.capturable:
            plans = self._plan_tables(hps)
        if plans is not None:  # the steady state: nothing to copy, fill or undo
            amp = lrs = {}
        else:
            while True:
                try:
                    plans = self._plan(self._ensure_sets(hps), hps)
                    break
                except _Replanned:  # parameters moved before their first step: state re-made
                    continue
            if self.capturable:
                for *_, launches in plans:
                    for ts, backend, plan in launches:
                        self._check_capturable(ts, backend, plan)
            amp = _amp_per_device(plans, grad_scale, found_inf)
            if self._clip_pending is not None:  # clip_grad_norm_'s coefficient joins grad_scale
                amp, found_inf = self._fold_clip(plans, amp, grad_scale, found_inf)
            lrs = self._device_lrs(plans)

        # 2. Execute. The counters move only after every launch was made.
        undo = _Undo(plans) if found_inf is not None and not self.capturable else None
        buffer_weights: Dict[int, float] = {}  # EMA index -> weight of its first group stepped
        for group, hp, (ema_weight, s_after, steps), launches in plans:
            if ema_weight is not None:
                if int(group["steps"]) == 0:
                    self._restart_emas(launches)
                for k, w in enumerate(ema_weight):
                    buffer_weights.setdefault(k, w)
            for ts, backend, plan in launches:
                gs, fi = amp.get(ts.device, (None, None)) if amp else (None, None)
                lr_dev = lrs.get((id(group), ts.device)) if lrs else None
                if self.capturable:
                    self._run_capturable(group, hp, ts, backend, plan, ema_weight, gs, fi,
                                         lr_dev)
                else:
                    self._run_set(group, hp, ts, backend, plan, ema_weight, gs, fi, lr_dev)
        self._clip_pending = None  # applied: a coefficient is used by one step
        for group, hp, (ema_weight, s_after, steps), launches in plans:
            if ema_weight is not None:
                group["ema_base_steps"] = s_after
            group["base_steps"] = s_after
            group["steps"] = steps
        if buffer_weights and self._teachers:
            self._update_teacher_buffers(buffer_weights, found_inf)
        if undo is not None:
            self._pending = undo.arm(found_inf, self.__dict__.setdefault("_found_host", {}))
        return loss

    def _step_hparams(self, gi: int, group) -> Dict[str, Any]:
        """The group's checked, κ-scaled hyperparameters: :meth:`_check_hparams`, re-run only
        when a value changed (by identity: a scheduler's new lr float, a new tuple, a list
        whose items changed, a key added). Besides the update's values the result holds what
        step() derives from the group each step: ``kappa``, ``ema_sources`` (each EMA's
        schedule or checked constant decay) and ``layout`` (:meth:`_layout_key`).

        A training loop that changes nothing pays a few C-speed passes over the group's values
        (``list(group.values())`` compared by identity): ~1 µs, where a Python loop over the
        ~20 keys costs ~5."""
        cur = list(group.values())
        cache = self.__dict__.setdefault("_hp_cache", {})
        hit = cache.get(gi)
        if hit is not None and hit[0] is group and len(cur) == len(hit[2]) and \
                list(group) == hit[1]:
            _, _, vals, skip, lists, hp = hit
            for i in skip:  # the parameters and the counters step() advances
                cur[i] = None
            for i in lists:  # a list may change in place: its items, by identity
                if type(cur[i]) is not list or not _same(tuple(cur[i]), vals[i]):
                    break
                cur[i] = vals[i]
            else:
                if all(map(operator.is_, cur, vals)):
                    return hp
        hp = self._check_hparams(group, where=f"param group {gi}")
        hp["kappa"] = float(group["kappa"])  # checked by _check_hparams
        hp["ema_sources"] = tuple(src if callable(src) else scaling.check_rho(src)
                                  for src in checks.ema_sources(group))
        hp["layout"] = self._layout_key(group)
        keys, cur = list(group), list(group.values())  # afresh: the check above edits cur
        skip = [i for i, k in enumerate(keys) if k in _NOT_HPARAMS]
        for i in skip:
            cur[i] = None
        lists = [i for i, v in enumerate(cur) if type(v) is list]
        for i in lists:
            cur[i] = tuple(cur[i])
        cache[gi] = (group, keys, cur, skip, lists, hp)
        return hp

    def _settle(self) -> None:
        """Apply what the device decided about the last step with a ``found_inf``.

        A step with ``found_inf`` runs its launches (which change nothing where found_inf is
        set) and advances the host counters optimistically; the flag travels to the host by a
        non-blocking copy, and the next step (or anything that reads the counters: state_dict,
        a rebuild, pickling) rolls the counters back if it was set. Waiting on the copy's event
        costs nothing by then in a training loop (the GPU finished that step long ago); it is
        never a read inside the step that produced the flag."""
        pending = getattr(self, "_pending", None)
        if pending is None:
            return
        self._pending = None
        pending.settle()

    def _device_lrs(self, plans):
        """Device learning rates, ``{(id(group), device): one-element float32 tensor}``.

        A tensor ``lr`` is read by the kernels (scaled on the device, no host read); with
        capturable=True a float ``lr`` is written into the set's device scalar here, outside
        any CUDA-graph capture (a fill recorded into a graph would replay the capture-time lr
        forever), so a replay reads whatever the last eager step or the user put there."""
        out = {}
        capturing = self.capturable and _capturing()  # a CUDA query: only where it matters
        for group, hp, _, launches in plans:
            lr_t = hp.get("lr_tensor")
            for ts, _, _ in launches:
                if lr_t is not None:
                    out[(id(group), ts.device)] = _scaled_lr(lr_t, hp["lr_scale"], ts.device)
                elif self.capturable and not capturing:
                    _fill_once(ts.cap, "lr", (hp["lr"],))
        return out

    # ---------------------------------------------------------------- planning ---------------
    def _plan_tables(self, hps):
        """:meth:`_plan`'s answer for the steady state, or None (nothing checked is changed):
        every set of every group has its StepTable, built for the backend it resolves to now,
        and every table prepared; no tensor lr, no EMA restart. step() calls it only without
        grad_scale, found_inf, a pending clip or capturable mode.

        Why a second planner: after a backward pass the core's caches hold none of step()'s
        code or data, so its Python costs ~50 ns per cache line it touches rather than per
        bytecode (measured on a 2-core CPU VM: 20 µs hot, 55-90 µs after 2000 parameters'
        metadata went through the cache). This path touches only what the steady state needs:
        no table building, no lookups of device tensors, no undo record."""
        sets = self._sets
        if sets is None or self._sets_sig != self._signature(hps):
            return None
        key = (self.backend, _ops.env_backend())
        plans = []
        for group, gsets, hp in zip(self.param_groups, sets, hps):
            if hp.get("lr_tensor") is not None:
                return None
            ema = self._ema_plan(group, hp)
            if ema[0] is not None and int(group["steps"]) == 0:
                return None  # the EMAs restart from the parameters: _restart_emas
            launches = []
            for ts in gsets:
                if ts.backend_key != key or ts.uniform_step is None:
                    return None
                table = tables.current(ts, ts.backend_module)
                if table is None:
                    return None
                # Triton's flat layout: its flat kernel over the buffers (as _plan)
                flat = ts.flat is not None and table.is_flat and table.kernels == "triton"
                launches.append((ts, ts.backend_module, _FLAT_PLAN if flat else _TABLE_PLAN))
            plans.append((group, hp, ema, launches))
        for *_, launches in plans:
            for ts, _, _ in launches:
                if ts.table.prepare() != 0:
                    return None  # _plan decides (and prepares again)
        return plans

    def _plan(self, sets, hps):
        """Check every group and set; the launches of this step. Mutates nothing."""
        plans = []
        env = _ops.env_backend()  # once per step, not per set
        for gi, (group, gsets, hp) in enumerate(zip(self.param_groups, sets, hps)):
            ema = self._ema_plan(group, hp)
            launches = []
            for ts in gsets:
                backend = self._backend_for(ts, env)
                # The common case in C++ (one call; Python then does nothing per parameter),
                # anything else in Python below. A tensor lr takes the device-lr kernels.
                table = tables.table_for(ts, backend, self.capturable) \
                    if hp.get("lr_tensor") is None else None
                if table is not None and tables.ready(table, ts):
                    # Triton's flat layout: its flat kernel over the buffers (checked here)
                    flat = table.is_flat and table.kernels == "triton"
                    launches.append((ts, backend, _FLAT_PLAN if flat else _TABLE_PLAN))
                    continue
                self._check_params(ts, gi)
                launches.append((ts, backend, self._plan_set(ts, gi, group)))
            plans.append((group, hp, ema, launches))
        return plans

    def _ema_plan(self, group, hp):
        """``(ema weights or None, s after this step, group step count after it)``: on an EMA
        step one weight 1 − d per EMA of the group (a tuple, EMA index order); every EMA of a
        group covers the same interval [ema_base_steps, s after).

        Pure: the schedules are evaluated (and checked) while planning, so a schedule that fails
        or returns a bad decay stops the step before anything has moved."""
        s_before = float(group["base_steps"])
        s_after = s_before + hp["kappa"]
        steps = int(group["steps"]) + 1
        ema_weight = None
        sources = hp["ema_sources"]
        if sources and steps % int(group["ema_every"]) == 0:
            s_from = float(group["ema_base_steps"])
            weights = []
            for src in sources:
                if callable(src):  # a schedule
                    decay = interval_decay(src, s_from, s_after)
                else:  # a constant decay, checked with the hyperparameters
                    decay = src ** (s_after - s_from)
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
        if not hasattr(backend, "adam_ema_capturable"):  # every shipped backend has them
            raise _ops.BackendUnavailableError(
                f"capturable=True needs a backend with device-scalar kernels "
                f"(adam_ema_capturable / sgd_ema_capturable: 'cuda', 'triton', 'cpp', "
                f"'reference'); backend {backend.NAME!r} has none. Use one of those backends, "
                f"or capturable=False")
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

    def _backend_for(self, ts: layout.TensorSet, env: Optional[str]):
        """The set's backend module, resolved once per (backend=, $EMA_KERNELS_BACKEND);
        ``env``: that variable's value (read once per step by the caller)."""
        key = (self.backend, env)
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

    def _run_set(self, group, hp, ts, backend, plan, ema_weight, grad_scale, found_inf,
                 lr_dev) -> None:
        if plan is _TABLE_PLAN:  # prepared in C++ while planning: one launch
            step = ts.uniform_step + 1
            self._update_table(backend, ts, group, hp, step, ema_weight, grad_scale,
                               found_inf, self._sr_seed(group, hp, ts))
            if backend.NAME == "triton":  # the C++ kernels' tables advanced ts.steps
                ts.steps += 1
            ts.uniform_step = step
            return
        # Several EMAs: the backends' list-of-EMA-lists form, one weight each (one pass).
        emas = [ts.views[k] for k in ts.ema_keys] if ema_weight is not None else None
        run = self._update if lr_dev is None else self._update_device_lr
        extra = (grad_scale, found_inf) if lr_dev is None else (grad_scale, found_inf, lr_dev)
        sr_seed = self._sr_seed(group, hp, ts)  # None: round to nearest
        if plan["flat"]:
            fb = ts.flat
            step = ts.uniform_step + 1
            run(backend, group, hp, [fb.param], [fb.grad], {r: [fb.roles[r]] for r in ts.roles},
                [[fb.roles[k]] for k in ts.ema_keys] if emas is not None else None, step,
                ema_weight, *extra, sr=None if sr_seed is None else (sr_seed, step, [0]))
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
            _ema_only(backend, ps, [[zs[i] for i in skipped] for zs in emas], ema_weight,
                      found_inf)
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
            sr = None if sr_seed is None else (sr_seed, t + 1, layout.sr_offsets(ts, ids))
            run(backend, group, hp, ps, [grads[i] for i in ids],
                {r: [views[r][i] for i in ids] for r in ts.roles},
                [[zs[i] for i in ids] for zs in emas] if emas is not None else None, t + 1,
                ema_weight, *extra, sr=sr)
            for p, tmp in back or ():
                p.copy_(tmp)
        if len(stepped) == len(ts.params):
            ts.steps += 1
            if ts.uniform_step is not None:
                ts.uniform_step += 1
        else:
            ts.steps[stepped] += 1
            ts.refresh_uniform_step()

    def _sr_seed(self, group, hp, ts) -> Optional[int]:
        """The group's stochastic-rounding seed where SR applies to this set (bf16/fp16
        parameters of a group with stochastic_rounding=True), else None. A group that switched
        SR on after construction draws its seed here, once (then it is saved with the group)."""
        if not hp.get("stochastic_rounding") or ts.dtype not in _SR_DTYPES:
            return None
        seed = group.get("sr_seed")
        if seed is None:
            seed = group["sr_seed"] = checks.draw_sr_seed()
        return int(seed)

    def _run_capturable(self, group, hp, ts, backend, plan, ema_weight, grad_scale,
                        found_inf, lr_dev) -> None:
        """One launch reading lr, t and 1 − ρ̂ from device tensors; no host synchronisation.

        The device step count is incremented before and decremented by ``found_inf`` after the
        kernel (which itself writes nothing on such a step), as torch's capturable Adam does."""
        cap = ts.cap
        back = None
        if plan is _TABLE_PLAN:  # prepared in C++: its launch takes the device scalars
            pass
        elif plan["flat"]:
            fb = ts.flat
            params, grads = [fb.param], [fb.grad]
            state = {r: [fb.roles[r]] for r in ts.roles}
            emas = [[fb.roles[k]] for k in ts.ema_keys] if ema_weight is not None else None
        else:
            for i in plan["missing"]:
                st = self.state.setdefault(ts.params[i], {})
                self._ensure_param_state(ts, i, ts.params[i], st, ts.roles)
                st["step"] = cap["step"].expand(len(ts.params))[i]
            # Frozen parameters without a gradient are left out (their EMA equals their
            # constant value).
            ids = plan["stepped"]
            params, back = self._kernel_params(ts, ids)
            grads = [plan["grads"][i] for i in ids]
            state = {r: [ts.views[r][i] for i in ids] for r in ts.roles}
            emas = [[ts.views[k][i] for i in ids] for k in ts.ema_keys] \
                if ema_weight is not None else None
        if ema_weight is not None and not _capturing():
            # constant under capturable=True (ema_every=1, no schedule): filled eagerly only,
            # never recorded into a graph; one device weight per EMA (the kernels read k)
            if cap["ema_weight"].numel() != len(ema_weight):
                cap["ema_weight"] = torch.zeros(len(ema_weight), device=ts.device,
                                                dtype=torch.float32)
            _fill_once(cap, "ema_weight", ema_weight)
        cap["step"].add_(1)
        w_dev = cap["ema_weight"] if ema_weight is not None else None
        lr = cap["lr"] if lr_dev is None else lr_dev
        if plan is _TABLE_PLAN:  # the table advances ts.steps (calls, as below)
            self._update_capturable_table(ts, group, hp, lr, cap["step"], w_dev, grad_scale,
                                          found_inf)
        else:
            self._update_capturable(backend, group, hp, ts, params, grads, state, emas, w_dev,
                                    grad_scale, found_inf, lr, cap["step"])
            for p, tmp in back or ():
                p.copy_(tmp)
            ts.steps += 1  # calls, not applied steps: the device count is the truth here
        if found_inf is not None:
            cap["step"].sub_(found_inf.to(cap["step"].dtype).reshape(1))
        if ts.uniform_step is not None:
            ts.uniform_step += 1  # every parameter stepped (a capturable set steps together)

    def _update(self, backend, group, hp, params, grads, state, emas, step, ema_weight,
                grad_scale, found_inf):  # pragma: no cover - overridden
        raise NotImplementedError

    def _update_table(self, backend, ts, group, hp, step, ema_weight, grad_scale, found_inf,
                      sr_seed):  # pragma: no cover - overridden
        raise NotImplementedError

    def _update_capturable(self, backend, group, hp, ts, params, grads, state, emas,
                           ema_weight, grad_scale, found_inf, lr, step
                           ):  # pragma: no cover - overridden
        raise NotImplementedError

    def _update_capturable_table(self, ts, group, hp, lr, step, ema_weight, grad_scale,
                                 found_inf):  # pragma: no cover - overridden
        raise NotImplementedError

    def _update_device_lr(self, backend, group, hp, params, grads, state, emas, step,
                          ema_weight, grad_scale, found_inf, lr_dev, sr=None) -> None:
        """A host-counted step whose lr is a device tensor: the device-scalar kernels (every
        backend has them), with the host's step count and EMA weight written into device
        scalars (fills, no copies from pageable memory, so nothing waits); the lr is never
        read on the host."""
        dev = params[0].device
        step_t = torch.full((1,), float(step), dtype=torch.float32, device=dev)
        w_t = None
        if ema_weight is not None:
            w_t = _fill_weights(torch.empty(len(ema_weight), dtype=torch.float32, device=dev),
                                ema_weight)
        self._update_capturable(backend, group, dict(hp, first_step=step == 1), None, params,
                                grads, state, emas, w_t, grad_scale, found_inf, lr_dev, step_t,
                                sr=sr)  # SR's step: the host count (sr[1])


# Group keys that are not hyperparameters: the parameters and the counters step() advances.
_NOT_HPARAMS = frozenset(("params", "param_names", "base_steps", "ema_base_steps", "steps"))


def _same(a, b) -> bool:
    """Unchanged hyperparameter: the same object, or (for a list's snapshot) equal items that
    are the same objects."""
    if a is b:
        return True
    return type(a) is tuple and type(b) is tuple and len(a) == len(b) and \
        all(map(operator.is_, a, b))


# Whether this process has CUDA at all: None until the first step asks (no device query at
# import), then a bool; False makes step()'s capture checks one global read.
_cuda_present: Optional[bool] = None


def _capturing() -> bool:
    """Is the current CUDA stream capturing a graph? (False without CUDA; only asked on
    capturable paths: the query costs tens of µs where no driver answers, and
    ``torch.cuda.is_available()`` reads the environment each call, hence the cached answer.)"""
    global _cuda_present
    if _cuda_present is None:
        _cuda_present = torch.cuda.is_available()
    return _cuda_present and torch.cuda.is_current_stream_capturing()


def _capturing_on(sets) -> bool:
    """Is a CUDA graph being captured while this optimizer holds CUDA parameters? (Sets not
    built yet: asked; built and all on CPU: no CUDA query, nothing to capture.)"""
    global _cuda_present
    if _cuda_present is None:
        _cuda_present = torch.cuda.is_available()
    if not _cuda_present:
        return False
    if sets is None:
        return _capturing()
    for gs in sets:  # a plain loop: step() pays this every step (~0.1 µs a set)
        for ts in gs:
            if ts.device.type == "cuda":
                return _capturing()
    return False


def _scaled_lr(lr: torch.Tensor, scale: float, device) -> torch.Tensor:
    """The group's tensor lr times its κ factor, as a one-element float32 tensor on ``device``:
    device ops only (the value is never read on the host)."""
    t = lr.detach().to(device=device, dtype=torch.float32, non_blocking=True).reshape(1)
    return t if scale == 1.0 else t * scale


def _amp_per_device(plans, grad_scale, found_inf):
    """``{device: (grad_scale, found_inf)}`` for every device that holds parameters.

    GradScaler keeps its scale on one device; the kernels read it on theirs, so it is copied
    (non-blocking, device to device) to each, as torch's fused optimizers do — during
    planning, so a bad value raises before anything moved."""
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(
                f"{name} must be a one-element floating-point tensor (torch.amp.GradScaler's "
                f"contract), got {type(t).__name__}"
                f"{f' of dtype {t.dtype}' if isinstance(t, torch.Tensor) else ''}. Pass the "
                f"GradScaler's tensors, or leave {name} unset")
        if t.numel() != 1:
            raise ValueError(
                f"{name} must have exactly one element (torch.amp.GradScaler's contract), got "
                f"shape {tuple(t.shape)}. Pass the GradScaler's tensors, or leave {name} unset")
    if grad_scale is None and found_inf is None:
        return {}
    out = {}
    for *_, launches in plans:
        for ts, _, _ in launches:
            if ts.device not in out:
                out[ts.device] = tuple(
                    None if t is None else
                    t.detach().to(device=ts.device, dtype=torch.float32,
                                  non_blocking=True).reshape(1)
                    for t in (grad_scale, found_inf))
    return out


def _fill_once(cap: dict, key: str, values: tuple) -> None:
    """Write host ``values`` into the capturable device scalar ``cap[key]`` unless it holds
    them already (what was written last is remembered beside it, and forgotten with it): an
    eager capturable step with an unchanged lr and EMA weights launches no fill kernel (each
    costs a launch's host time on a GPU). Only the optimizer writes these tensors."""
    t = cap[key]
    memo = cap.get(key + "_written")
    if memo is not None and memo[0] is t and memo[1] == values:
        return
    _fill_weights(t, values)
    cap[key + "_written"] = (t, tuple(values))


def _fill_weights(t: torch.Tensor, weights) -> torch.Tensor:
    """The EMA weights into a device tensor, one element each: fills (no copy from pageable
    host memory, so nothing waits)."""
    for j, w in enumerate(weights):
        t[j].fill_(w)
    return t


def _ema_only(backend, params, emas, ema_weight, found_inf):
    """EMAs of parameters without a gradient this step (``emas``: one list per EMA, one weight
    each); on a found_inf step they must not move either, so each weight becomes 0 on the device
    (lerp with weight 0 is exact)."""
    if found_inf is None:
        backend.ema_only(params, emas, ema_weight)
        return
    dev = found_inf.device
    keep = (found_inf.reshape(()) == 0).to(torch.float32)  # 1, or 0 on a skipped step
    ends = None
    for zs, weight in zip(emas, ema_weight):
        if ends is None:
            ends = [p if p.dtype == z.dtype else p.to(z.dtype) for p, z in zip(params, zs)]
        w = keep * torch.full((), weight, dtype=torch.float32, device=dev)
        # The weight as a tensor *list* (the List overload: lerp per tensor, on the device).
        # A bare 0-dim tensor would bind _foreach_lerp_'s Scalar overload, whose argument
        # parsing reads it on the host: a device synchronisation per EMA per step.
        torch._foreach_lerp_(list(zs), ends, [w] * len(zs))


class _Undo:
    """The host counters of a step with ``found_inf``, as they were before it (see _settle)."""
    __slots__ = ("groups", "sets", "host", "event")

    def __init__(self, plans):
        self.groups = [(g, {k: g[k] for k in ("base_steps", "ema_base_steps", "steps")})
                       for g, *_ in plans]
        self.sets = [(ts, ts.steps.copy(), ts.uniform_step)
                     for *_, launches in plans for ts, _, _ in launches]
        self.host = self.event = None

    def arm(self, found_inf: torch.Tensor, buffers: dict) -> "_Undo":
        """Start the flag's trip to the host: a non-blocking copy (into pinned memory from a
        GPU) and an event after it. The one code path for every device: on CPU the copy is
        synchronous and there is no event. ``buffers`` keeps the host buffer for the next
        step (one is enough: a step settles the previous one before it arms)."""
        on_gpu = found_inf.device.type == "cuda"
        host = buffers.get(on_gpu)
        if host is None:
            host = buffers[on_gpu] = torch.empty(1, dtype=torch.float32, pin_memory=on_gpu)
        host.copy_(found_inf.detach().reshape(1), non_blocking=True)
        self.host = host.numpy()  # read as numpy: never a torch host read of a device tensor
        if on_gpu:
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(found_inf.device))
        return self

    def settle(self) -> None:
        if self.event is not None and not self.event.query():
            self.event.synchronize()
        if self.host[0] == 0:
            return
        for g, counters in self.groups:  # the step was skipped: it never happened
            g.update(counters)
        for ts, steps, uniform in self.sets:
            ts.steps[:] = steps  # in place: state[p]["step"] tensors view this array
            ts.uniform_step = uniform


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
