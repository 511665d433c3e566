"""The EMA API of the optimizers: ``ema_parameters``, ``swap_ema``, ``ema_module`` (teachers).

ζ lives in ``optimizer.state[p]["ema"]`` (per parameter, the parameter's shape and memory
format, fp32 for 16-bit parameters); a group with several EMAs (``ema_decay`` /
``ema_schedule`` tuples) keeps EMA i under ``"ema"`` (i = 0) or ``f"ema_{i}"``. Teachers are
held weakly: a teacher the user drops is freed, and costs nothing afterwards.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Dict, List, Optional

import torch

from . import checks, layout, teachers


def _ema_key(index: int) -> str:
    return "ema" if index == 0 else f"ema_{index}"


class EMAMixin:
    """EMA accessors of :class:`~.base.EMAOptimizer`."""

    @property
    def num_emas(self) -> int:
        """How many EMAs the optimizer tracks per parameter: the most any group keeps (0 if no
        group keeps one). A group with fewer has ``None`` at the higher indices of
        :meth:`ema_parameters`."""
        return max((checks.num_emas(g) for g in self.param_groups), default=0)

    def _check_index(self, index) -> str:
        if isinstance(index, bool) or not isinstance(index, int) or not \
                0 <= index < max(self.num_emas, 1):
            raise IndexError(f"EMA index {index!r} is out of range: this optimizer tracks "
                             f"{self.num_emas} EMA(s) per parameter (indices 0.."
                             f"{max(self.num_emas - 1, 0)})")
        return _ema_key(index)

    def ema_parameters(self, index: int = 0) -> List[Optional[torch.Tensor]]:
        """ζ for every parameter, aligned with ``[p for g in param_groups for p in g["params"]]``.

        Each entry is the EMA tensor itself (not a copy: it changes with every EMA step), with
        the parameter's shape and memory format (fp32 for 16-bit parameters; a DTensor laid out
        like the parameter under FSDP2), or ``None`` where the group keeps no EMA."""
        key = self._check_index(index)
        # state as it is: reading never allocates (the next step makes what a group needs)
        out = []
        for g in self.param_groups:
            has = key in self._ema_keys(g)
            for p in g["params"]:
                st = self.state.get(p)
                out.append(st[key] if has and st is not None and key in st else None)
        return out

    @contextlib.contextmanager
    def swap_ema(self, index: int = 0, model: Optional[torch.nn.Module] = None):
        """Inside the block the parameters hold their EMA ``index``; after it, bit for bit their
        own values.

        Parameters of groups without that EMA are left alone. ``step()`` inside raises.

        ``model``: also swap in the EMA of ``model``'s buffers (BatchNorm statistics), the ones
        the teacher ``ema_module(model, index)`` keeps (they follow the EMA on EMA steps, as in
        timm's ModelEmaV3), so that ``model`` computes inside the block what that teacher
        computes. Needs such a teacher alive (the optimizer holds teachers weakly): make it
        before training, ``teacher = opt.ema_module(model)``, and keep it. Without ``model``
        the buffers stay the model's own (its running statistics, not their EMA)."""
        key = self._check_index(index)
        if self._swapped:
            raise RuntimeError("swap_ema() is already active: the blocks cannot be nested")
        teacher = None
        if model is not None:
            teacher = teachers.find(self, model, index)
            if teacher is None:
                raise RuntimeError(
                    f"swap_ema(model=...) swaps in the EMA of the model's buffers, which the "
                    f"optimizer keeps only in a teacher of that model: none is alive for this "
                    f"model and index={index}. Make one before training and keep it, "
                    f"`teacher = opt.ema_module(model, index={index})` (its buffers follow the "
                    f"EMA from then on; the optimizer holds it weakly), or call swap_ema() "
                    f"without model= to swap the parameters only")
        self._plan_checks()  # a parameter moved or cast after stepping: raise, move nothing
        dst, src = [], []
        for g in self.param_groups:
            if key not in self._ema_keys(g):
                continue
            for p in dict.fromkeys(g["params"]):
                dst.append(layout.local(p))
                src.append(layout.local(self.state[p][key]))
        if teacher is not None:
            theirs = dict(teacher.named_buffers())
            for name, b in model.named_buffers():
                t = theirs.get(name)
                if t is not None and t.shape == b.shape:
                    dst.append(b)
                    src.append(t)
        with torch.no_grad():
            saved = [t.clone() for t in dst]
        if dst:
            with torch.no_grad():
                torch._foreach_copy_(dst, src)
        self._swapped = True
        try:
            yield self
        finally:
            if dst:
                with torch.no_grad():
                    torch._foreach_copy_(dst, saved)
            self._swapped = False

    def ema_module(self, model: torch.nn.Module, index: int = 0) -> torch.nn.Module:
        """A module with ``model``'s structure whose parameters are live views of EMA ``index``.

        No copy of the EMA is made: after the next ``step()`` the teacher holds the new EMA.
        Parameters without that EMA (a group with ``ema_decay=None`` or fewer EMAs, or not in
        this optimizer) alias the student's parameter. Floating-point buffers of the teacher
        follow the same EMA (on EMA steps, with the decay of EMA ``index`` of the first group
        that updated it in that step, like timm's ModelEmaV3); integer buffers are copied. For 16-bit models the teacher's
        parameters are the fp32 EMA (run it under autocast). The optimizer holds the teacher
        weakly: dropping it frees it. A deepcopy of ``(model, teacher, optimizer)`` gives a
        teacher that follows the copied optimizer (see :mod:`.teachers`); ``swap_ema(model=)``
        swaps this teacher's buffers into ``model``."""
        key = self._check_index(index)
        if any(layout.is_dtensor(p) for p in model.parameters()):
            raise NotImplementedError(
                "ema_module() of a sharded (FSDP2/DTensor) model is not supported: a deep copy "
                "would duplicate FSDP's internal state. Use `with opt.swap_ema(): "
                "teacher_out = model(x)` for teacher forward passes (the shards hold the EMA "
                "inside the block and FSDP gathers them as usual), or opt.ema_parameters(), "
                "which are DTensors laid out like the parameters")
        # (state as it is: see ema_parameters)
        has = {}
        for g in self.param_groups:
            kept = key in self._ema_keys(g)
            for p in g["params"]:
                has[p] = kept
        memo: Dict[int, torch.nn.Parameter] = {}
        for p in model.parameters():
            st = self.state.get(p)
            if has.get(p) and st is not None and key in st:
                src = st[key]
                memo[id(p)] = teachers.TeacherParameter(src, requires_grad=False)
            else:  # no EMA: a view of the student's parameter
                memo[id(p)] = teachers.TeacherParameter(p.detach(), requires_grad=False,
                                                        student=p)
        teacher = copy.deepcopy(model, memo)
        teacher.requires_grad_(False)
        # kept weakly; a deepcopy of (model, teacher, optimizer) records the copies alike
        teachers.record(self, teacher, model, index)
        return teacher

    @torch.no_grad()
    def _update_teacher_buffers(self, weights: Dict[int, float], found_inf=None) -> None:
        """Teachers' buffers follow their EMA (``weights[index]``, for the EMA indices updated
        this step): one foreach launch per (weight, device, dtype).

        On a step with ``found_inf`` the weight is chosen on the device (0 where found_inf is
        set: lerp with weight 0 leaves a buffer bit for bit) and integer buffers are copied
        only where it is not set: no host read."""
        alive = []
        lerp: Dict[tuple, tuple] = {}
        copy_: Dict[tuple, tuple] = {}
        for entry in self._teachers:
            t_ref, m_ref, index = entry
            teacher, model = t_ref(), m_ref()
            if teacher is None or model is None:
                continue  # dropped by the user: forget it
            alive.append(entry)
            if index not in weights:
                continue  # its EMA did not move this step
            weight = weights[index]
            src = dict(model.named_buffers())
            for name, t in teacher.named_buffers():
                s = src.get(name)
                if s is None:
                    continue
                if t.is_floating_point():
                    dst_l, src_l = lerp.setdefault((weight, t.device, t.dtype), ([], []))
                else:
                    dst_l, src_l = copy_.setdefault((t.device, t.dtype), ([], []))
                dst_l.append(t)
                src_l.append(s if s.dtype == t.dtype else s.to(t.dtype))
        self._teachers = alive
        skips: Dict[torch.device, torch.Tensor] = {}

        def skip_on(dev):
            if dev not in skips:
                skips[dev] = found_inf.detach().to(dev, non_blocking=True).reshape(()) != 0
            return skips[dev]
        for (weight, dev, dt), (dst, src) in lerp.items():
            if found_inf is None:
                torch._foreach_lerp_(dst, src, weight)
            else:
                w = torch.where(skip_on(dev), torch.zeros((), dtype=dt, device=dev),
                                torch.full((), weight, dtype=dt, device=dev))
                # a tensor list: a bare 0-dim tensor binds the Scalar overload (a host read)
                torch._foreach_lerp_(dst, src, [w] * len(dst))
        for (dev, _), (dst, src) in copy_.items():
            if found_inf is None:
                torch._foreach_copy_(dst, src)
            else:
                for d, s_ in zip(dst, src):
                    torch.where(skip_on(dev), d, s_, out=d)
