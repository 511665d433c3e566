"""Teachers (``ema_module``) that survive ``copy.deepcopy``: the copy follows the copied EMA.

A teacher's parameters are live views of the optimizer's EMA tensors (or, where a parameter
keeps no EMA, of the student's parameter), and the optimizer keeps a weak record
``(teacher, model, index)`` so that the teacher's buffers follow the EMA at every EMA step. A
deep copy of ``(model, teacher, opt)`` must give the same arrangement between the copies:

- :class:`TeacherParameter` is the teacher's parameter class. ``nn.Parameter.__deepcopy__``
  clones the data, which would freeze the copy; ours copies the *storage* through the deepcopy
  memo (as ``Tensor.__deepcopy__`` does for the optimizer's EMA tensors), so the copied
  teacher's parameter is a view of the copied EMA, whichever of the two is copied first. A
  parameter aliasing the student's follows the copied student's.
- :class:`TeacherLink` sits on the teacher (``teacher._ema_kernels_link``) and the optimizer's
  ``__deepcopy__`` calls :func:`copy_records`: whichever of the teacher and the optimizer is
  copied second records the copied teacher with the copied optimizer (once).

Pickling (``torch.save``) is unaffected: a pickled teacher is a plain module whose parameters
are ``nn.Parameter`` (sharing storage with the EMA where both are saved together), without a
record in any optimizer.
"""
from __future__ import annotations

import copy
import weakref
from collections import OrderedDict
from typing import Optional

import torch

LINK_ATTR = "_ema_kernels_link"


class TeacherParameter(torch.nn.Parameter):
    """A teacher's parameter: a view of an EMA tensor (or of the student's parameter, given as
    ``student``), kept a view of the copies by ``copy.deepcopy``."""

    def __new__(cls, data, requires_grad: bool = False, student=None):
        self = super().__new__(cls, data, requires_grad)
        self._student = None if student is None else weakref.ref(student)
        return self

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        student = self._student() if self._student is not None else None
        if student is not None:  # a view of the student's parameter: of its copy
            new_student = copy.deepcopy(student, memo)
            out = type(self)(new_student.detach(), self.requires_grad, student=new_student)
        else:  # a view of an EMA tensor: of the same storage's copy (memoised per storage)
            storage = copy.deepcopy(self.untyped_storage(), memo)
            t = torch.empty((0,), dtype=self.dtype, device=self.device)
            t.set_(storage, self.storage_offset(), self.size(), self.stride())
            out = type(self)(t, self.requires_grad)
        memo[id(self)] = out
        return out

    def __reduce_ex__(self, proto):
        # pickled as a plain nn.Parameter (no weak reference to pickle)
        return (torch._utils._rebuild_parameter, (self.data, self.requires_grad, OrderedDict()))


class TeacherLink:
    """What a teacher follows: its optimizer, its student model, the EMA index (weakly)."""

    __slots__ = ("opt", "model", "teacher", "index", "__weakref__")

    def __init__(self, opt=None, model=None, teacher=None, index: int = 0):
        ref = (lambda o: None if o is None else weakref.ref(o))
        self.opt, self.model, self.teacher = ref(opt), ref(model), ref(teacher)
        self.index = index

    def _alive(self):
        objs = tuple(r() if r is not None else None for r in (self.opt, self.model, self.teacher))
        return None if any(o is None for o in objs) else objs

    def __deepcopy__(self, memo):
        alive = self._alive()
        if alive is None:
            return TeacherLink()
        opt, model, teacher = alive
        new_opt, new_teacher = memo.get(id(opt)), memo.get(id(teacher))
        if new_opt is None or new_teacher is None:
            # The optimizer is not copied (yet): if it is later in this deepcopy, copy_records
            # records the copies and attaches their link; if not, the copy follows nothing.
            return TeacherLink()
        new_model = _copied(model, memo)
        record(new_opt, new_teacher, new_model, self.index, attach=False)
        return TeacherLink(new_opt, new_model, new_teacher, self.index)

    def __reduce__(self):
        return (TeacherLink, ())  # pickled unlinked


def _copied(model, memo):
    """``model``'s copy in this deepcopy (made now if the model comes later or not at all:
    the copy the outer deepcopy then uses, or an orphan that is freed)."""
    new = memo.get(id(model))
    return new if new is not None else copy.deepcopy(model, memo)


def record(opt, teacher, model, index: int, attach: bool = True) -> None:
    """Make ``opt`` keep ``teacher`` (of ``model``, EMA ``index``), weakly."""
    opt._teachers.append((weakref.ref(teacher), weakref.ref(model), index))
    if attach:
        teacher.__dict__[LINK_ATTR] = TeacherLink(opt, model, teacher, index)


def copy_records(opt, new_opt, memo) -> None:
    """``opt`` was deep-copied into ``new_opt``: record the copies of its live teachers that
    this deepcopy already made (the others are recorded by their :class:`TeacherLink`)."""
    for t_ref, m_ref, index in opt._teachers:
        teacher, model = t_ref(), m_ref()
        if teacher is None or model is None:
            continue
        new_teacher = memo.get(id(teacher))
        if new_teacher is None:
            continue
        record(new_opt, new_teacher, _copied(model, memo), index)


def find(opt, model, index: int) -> Optional[torch.nn.Module]:
    """The live teacher ``opt`` keeps for ``model`` and EMA ``index``, or None."""
    for t_ref, m_ref, i in opt._teachers:
        if i == index and m_ref() is model:
            teacher = t_ref()
            if teacher is not None:
                return teacher
    return None
