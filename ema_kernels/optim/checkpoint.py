"""``state_dict()`` / ``load_state_dict()``: torch.optim's format, hooks and loading rules.

The format is torch.optim's (``state`` by parameter index, ``param_groups`` with ``params`` as
indices, ``param_names`` when the groups are named) plus ``ema`` per parameter (and ``ema_1``,
``ema_2``, … for a group with several EMAs), and data only: built-in EMA schedules are saved as
their kind and arguments (``torch.load(weights_only=True)`` loads every checkpoint). A torch.optim
AdamW/Adam/SGD checkpoint loads into the matching ema_kernels optimizer (the EMAs then start from
the current parameters) and ours into torch's. The four torch hook registries
(``register_state_dict_pre_hook`` …) are called exactly where torch calls them.
"""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch

from .. import schedules
from . import checks, layout
from .checks import EMA_KEYS as _EMA_KEYS

# Group keys a loaded checkpoint never overrides: the parameters themselves and torch's
# implementation switches (ours are always fused). The EMA settings are merged index by index
# (_merged_ema_settings): how many EMAs a group keeps is the constructor's.
_KEEP_OURS = ("params", "foreach", "fused", "capturable", "differentiable",
              "decoupled_weight_decay", "ema_decay", "ema_schedule")


def _schedules_as_data(sched):
    """A group's ``ema_schedule`` as it is saved: built-ins as plain data (kind and
    arguments), anything else as a "custom" marker; None and tuples kept as they are."""
    if sched is None:
        return None
    if isinstance(sched, (tuple, list)):
        return tuple(None if s is None else schedules.to_data(s) for s in sched)
    return schedules.to_data(sched)


def _merged_ema_settings(ours, theirs, where: str) -> Dict[str, Any]:
    """``ema_decay`` and ``ema_schedule`` of a group after loading ``theirs`` (a saved group).

    The number of EMAs is ours (the constructor's): EMA i that the checkpoint has takes the
    checkpoint's decay and schedule (a saved built-in schedule is rebuilt from its data), EMA
    i that it lacks keeps ours; saved EMAs beyond ours are dropped. A saved "custom" schedule
    (a callable that is not a built-in: not saved) keeps the schedule we have at that index;
    if we have none there, loading raises. A checkpoint written before schedules were saved
    keeps our schedules. A group without an EMA stays without one."""
    n = checks.num_emas(ours)
    if n == 0 or theirs.get("ema_decay") is None:
        return {}  # no EMA here, or none in the checkpoint's group (a torch.optim one): ours
    t_dec = checks._as_tuple(theirs["ema_decay"])
    saved_sched = "ema_schedule" in theirs
    t_sch = checks._as_tuple(theirs.get("ema_schedule"))
    n_t = max(len(t_dec), len(t_sch))
    o_dec = checks._as_tuple(ours["ema_decay"])
    o_sch = checks._as_tuple(ours["ema_schedule"])
    decays, scheds = [], []
    for i in range(n):
        od = o_dec[i] if i < len(o_dec) else None
        osch = o_sch[i] if i < len(o_sch) else None
        if i >= n_t:  # an EMA the checkpoint lacks: ours, started from the parameters
            decays.append(od)
            scheds.append(osch)
            continue
        td = t_dec[i] if i < len(t_dec) else None
        sched = osch
        data = t_sch[i] if i < len(t_sch) else None
        if saved_sched:
            sched = None if data is None else schedules.from_data(data)
            if data is not None and sched is None:  # a custom schedule: not in the checkpoint
                if osch is None:
                    raise ValueError(
                        f"loaded param group {where}: EMA {i} was driven by a custom schedule "
                        f"({data.get('repr')}), which checkpoints do not hold (only the "
                        f"built-ins of ema_kernels.schedules are saved, as data). Pass the same "
                        f"ema_schedule to the optimizer's constructor before load_state_dict")
                sched = osch
        decays.append(td if td is not None else od)
        scheds.append(sched)
    while decays and decays[-1] is None:  # schedule-only EMAs at the end
        decays.pop()
    while scheds and scheds[-1] is None:
        scheds.pop()
    scalar = n == 1 and not isinstance(ours["ema_decay"], (tuple, list)) and \
        not isinstance(ours["ema_schedule"], (tuple, list))
    if scalar:
        return {"ema_decay": decays[0], "ema_schedule": scheds[0] if scheds else None}
    return {"ema_decay": tuple(decays), "ema_schedule": tuple(scheds) if scheds else None}


class CheckpointMixin:
    """Checkpoints of :class:`~.base.EMAOptimizer`."""

    @torch._disable_dynamo
    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's format plus an ``ema`` entry per parameter of an EMA-keeping group.

        Tensors are the state itself, as torch returns them (copies only where ours are views
        of a shared buffer — ``flatten=True``, the step counts — so that saving one entry never
        writes a whole buffer)."""
        self._settle()  # a pending found_inf step's counters are final before they are saved
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        # state as it is: reading never allocates (a rebuild could make state for a group
        # whose new settings the next step refuses)
        mappings: Dict[int, int] = {}
        start = 0
        groups = []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            # data only (torch.load(weights_only=True)): built-in schedules as kind + arguments
            if "ema_schedule" in packed:
                packed["ema_schedule"] = _schedules_as_data(packed["ema_schedule"])
            mappings.update({id(p): i for i, p in enumerate(g["params"], start)
                             if id(p) not in mappings})
            packed["params"] = [mappings[id(p)] for p in g["params"]]
            start += len(packed["params"])
            groups.append(packed)
        state = {}
        for g in self.param_groups:
            # moments torch would read as initialised, where the parameter never stepped
            unsaved = self._unsaved_before_first_step(g)
            for p in g["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                out = {}
                skip = unsaved if unsaved and _never_stepped(st) else ()
                for k, v in st.items():
                    if k in skip:
                        continue
                    if isinstance(v, torch.Tensor) and (k == "step" or self.flatten):
                        v = v.clone()
                    out[k] = v
                state[mappings[id(p)]] = out
        for k, v in self.state.items():
            if not isinstance(k, torch.Tensor):
                state[k] = v  # not a parameter's: passed through unchanged, as torch does
        sd = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _unsaved_before_first_step(self, group) -> tuple:
        """State keys a parameter of ``group`` that never stepped leaves out of the state dict:
        the moments torch.optim reads as initialised when present (see :class:`~.sgd.SGD`).
        Ours are zeros that the update treats exactly as torch's fresh state, except where it
        says otherwise."""
        return ()

    @torch._disable_dynamo
    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load our own or a torch.optim (AdamW/Adam/SGD) state dict.

        Hyperparameters and counters saved in the groups replace ours; keys the checkpoint
        lacks (a torch checkpoint has no EMA settings) keep their current values;
        ``param_names`` are taken from the checkpoint when it has them, as torch does. The
        number of EMAs per group stays the constructor's: the checkpoint's EMAs (their decays,
        built-in schedules rebuilt from their saved data, and tensors) are restored by index,
        EMAs it lacks start from the current parameters, EMAs beyond ours are dropped. A custom
        schedule (not saved) keeps the one this optimizer has at that index (raises if it has
        none). A parameter without an ``ema`` entry starts its EMA from its current value. A
        checkpoint that does not fit is refused before anything is loaded."""
        self._settle()  # the pending step's roll-back must not land on the loaded state
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has a different number of parameter groups "
                             f"({len(groups)}) than the optimizer ({len(self.param_groups)})")
        for k, (ours, theirs) in enumerate(zip(self.param_groups, groups)):
            if len(ours["params"]) != len(theirs["params"]):
                raise ValueError(f"loaded state dict contains a parameter group that doesn't "
                                 f"match the size of optimizer's group: param group {k} has "
                                 f"{len(theirs['params'])} parameters in the checkpoint, "
                                 f"{len(ours['params'])} in the optimizer")
        merged = []
        for k, (ours, theirs) in enumerate(zip(self.param_groups, groups)):
            g = dict(ours)
            for key, v in theirs.items():
                if key not in _KEEP_OURS:
                    g[key] = copy.deepcopy(v)
            g.update(_merged_ema_settings(ours, theirs, str(k)))
            merged.append(g)
        for k, g in enumerate(merged):
            self._check_hparams(g, where=f"loaded param group {k}")
        saved_state = state_dict["state"]
        self._check_loaded_state(merged, groups, saved_state)
        # Everything fits: load. State tensors are written in place (teachers and
        # ema_parameters() stay live); missing ones are made by _build_sets.
        for k, g in enumerate(merged):
            self.param_groups[k].update(g)
        for g, theirs in zip(self.param_groups, groups):
            ema_keys = self._ema_keys(g)
            roles = set(self._roles(g))
            for p, idx in zip(g["params"], theirs["params"]):
                saved = saved_state.get(idx, {})
                st = self.state.get(p)
                if st is None:
                    st = {}
                new = {}
                for key, v in saved.items():
                    if key == "step":
                        new["step"] = torch.tensor(float(v), dtype=torch.float32) \
                            if not isinstance(v, torch.Tensor) else v.detach().to("cpu", torch.float32).reshape(())
                    elif key in roles or key in ema_keys:
                        cur = st.get(key)
                        v = layout.local(v)
                        if cur is not None:
                            layout.local(cur).copy_(v)
                            new[key] = cur
                        else:
                            t = layout.new_state_like(p)
                            layout.local(t).copy_(v)
                            new[key] = t
                    elif key in _EMA_KEYS:
                        continue  # an EMA index this group does not keep (any more)
                    else:
                        new[key] = v  # another optimizer's entry: kept, as torch does
                for key in ema_keys:
                    # Missing from the checkpoint (a torch.optim one, or one written with fewer
                    # EMAs): the EMA starts from the current parameters; a new one is made by
                    # _build_sets as a copy of them.
                    if key not in new:
                        cur = st.get(key)
                        if cur is not None:
                            layout.local(cur).copy_(layout.local(p))
                            new[key] = cur
                if saved and "step" not in new and any(r in new for r in roles):
                    # torch.optim.SGD saves no step: a saved buffer means it was initialised
                    new["step"] = torch.tensor(1.0)
                for r in roles:
                    if r not in new and r in st:
                        layout.local(st[r]).zero_()
                        new[r] = st[r]
                if new:
                    self.state[p] = new
                else:
                    self.state.pop(p, None)
        # Entries that are not a parameter's: the checkpoint's replace ours, as in torch
        # (whose load_state_dict builds a new state from the checkpoint).
        indices = {i for theirs in groups for i in theirs["params"]}
        for k in [k for k in self.state if not isinstance(k, torch.Tensor)]:
            del self.state[k]
        for k, v in saved_state.items():
            if k not in indices:
                self.state[k] = v
        self._sets = None
        self._build_sets()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_loaded_state(self, merged, groups, saved_state) -> None:
        """Refuse a checkpoint that does not fit, before anything is loaded: every tensor must
        have its parameter's shape (copy_ would broadcast a smaller one silently)."""
        for g, theirs in zip(merged, groups):
            roles = set(self._roles(g)) | set(_EMA_KEYS)
            steps = set()
            for p, idx in zip(g["params"], theirs["params"]):
                st = saved_state.get(idx, {})
                for key, v in st.items():
                    if key == "step":
                        if isinstance(v, torch.Tensor) and v.numel() != 1:
                            raise ValueError(f"loaded state of parameter {idx}: 'step' has "
                                             f"shape {tuple(v.shape)}, expected a scalar")
                        steps.add(float(v))
                        continue
                    if key not in roles or v is None:
                        continue
                    shape = tuple(layout.local(v).shape)
                    want = tuple(layout.local(p).shape)
                    if shape != want:
                        raise ValueError(
                            f"loaded state of parameter {idx}: {key!r} has shape {shape}, but "
                            f"the parameter has shape {want} — this checkpoint was written for "
                            f"another model or parameter order")
            if self.capturable and len(steps) > 1:
                raise ValueError(
                    "the checkpoint's parameters took different numbers of steps (some had "
                    "no gradient on some step), but capturable=True keeps one device step "
                    "count per parameter set; load it with capturable=False")


def _never_stepped(st) -> bool:
    """Has the parameter with state ``st`` taken no step? (Its host step count: a CPU tensor
    viewing the set's step array, so no device read.)"""
    step = st.get("step")
    return step is None or float(step) == 0.0
