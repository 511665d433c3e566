"""Hugging Face ``Trainer``: evaluate on the EMA, save it beside each checkpoint.

Pass an ema_kernels optimizer to the Trainer as its optimizer and add the callback::

    opt = ek.AdamW(model.parameters(), lr=1e-4, ema_decay=0.999)
    sched = transformers.get_linear_schedule_with_warmup(opt, 100, 10_000)
    trainer = Trainer(model=model, args=args, train_dataset=..., eval_dataset=...,
                      optimizers=(opt, sched), callbacks=[EMACallback()])

The Trainer saves the optimizer's ``state_dict()`` in each checkpoint (``optimizer.pt``), which
holds the EMAs: ``trainer.train(resume_from_checkpoint=...)`` restores them bit for bit with no
help from the callback. Gradient accumulation, ``bf16``/``fp16`` and ``max_grad_norm`` work as
with torch's optimizers (the Trainer clips the gradients with ``torch.nn.utils.clip_grad_norm_``
through accelerate before ``step()``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from transformers import TrainerCallback

from ._common import ema_weights, find_ema_optimizer

__all__ = ["EMACallback"]

_CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
_BUFFERS_KEY = "ema_buffers"  # the teachers' buffer EMAs in the optimizer's state dict


class EMACallback(TrainerCallback):
    """A ``TrainerCallback`` for a Trainer whose optimizer is an ema_kernels optimizer.

    - ``evaluate=True``: every evaluation the Trainer runs during ``train()`` (``eval_strategy``)
      runs on EMA ``index`` — the parameters and the EMA of the floating-point buffers — and
      the student's weights are back, bit for bit, when it ends (metrics are logged under the
      Trainer's usual names). For an evaluation you start yourself:
      ``with callback.ema_weights(): trainer.evaluate()``.
    - ``save=True``: beside each checkpoint's files the EMA is written as a
      ``save_pretrained`` folder, ``checkpoint-N/ema`` (``ema_<index>`` for ``index > 0``;
      safetensors), loadable with ``AutoModel...from_pretrained(".../checkpoint-N/ema")``.
      Parameters of 16-bit models are saved as their fp32 EMA.
    - Resuming (``trainer.train(resume_from_checkpoint=...)``): the EMAs come back bit for
      bit with the optimizer's state, which the Trainer saves in every checkpoint: the
      parameters' EMAs are optimizer state, and the callback adds the EMA of the buffers to
      the optimizer's ``state_dict()`` (under ``"ema_buffers"``). Pass the callback to the
      Trainer's constructor (``callbacks=[...]``) so that it is in place before the Trainer
      loads the checkpoint.

    No second copy of the parameters is kept: the callback's teacher
    (``opt.ema_module(model)``) views the optimizer's EMA and owns only the buffers.
    """

    def __init__(self, index: int = 0, evaluate: bool = True, save: bool = True):
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index={index!r} must be an int >= 0 (the EMA to use; 0 is "
                             f"the first ema_decay)")
        self.index = index
        self.evaluate = bool(evaluate)
        self.save = bool(save)
        self.optimizer = None  # the ema_kernels optimizer (found in the Trainer's wrapper)
        self.model: Optional[torch.nn.Module] = None
        self.teacher: Optional[torch.nn.Module] = None
        self._swap: Optional[contextlib.ExitStack] = None
        self._hooked = None  # the optimizer whose state_dict hooks carry the buffers' EMA
        self._pending: Optional[dict] = None  # buffers' EMA loaded before the teacher exists

    @property
    def folder_name(self) -> str:
        """The EMA's folder inside each checkpoint: ``ema`` or ``ema_<index>``."""
        return "ema" if self.index == 0 else f"ema_{self.index}"

    # ------------------------------------------------------------------ set-up --------------
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        # The Trainer loads a resumed checkpoint's optimizer state before on_train_begin: the
        # hooks that carry the EMA of the buffers in it must be in place by then.
        if optimizer is not None:
            self._hook(find_ema_optimizer(optimizer))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._attach(model, optimizer)
        if getattr(args, "eval_on_start", False):
            self._swap_in()  # the Trainer evaluates right after on_train_begin

    def _hook(self, opt) -> None:
        if self._hooked is not opt:
            opt.register_state_dict_post_hook(self._save_buffers)
            opt.register_load_state_dict_pre_hook(self._stash_buffers)
            self._hooked = opt

    def _attach(self, model, optimizer) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("EMACallback needs the Trainer's model and optimizer (they are "
                               "passed to on_train_begin by transformers.Trainer)")
        opt = find_ema_optimizer(optimizer)
        opt._check_index(self.index)  # an EMA this optimizer does not keep: IndexError now
        self._hook(opt)
        if self.optimizer is not opt or self.model is not model:
            self.optimizer, self.model = opt, model
            self.teacher = opt.ema_module(model, self.index)
        pending, self._pending = self._pending, None
        if pending:
            with torch.no_grad():
                for n, b in self.teacher.named_buffers():
                    if n in pending and b.is_floating_point():
                        b.copy_(pending[n])

    # The EMA of the buffers travels in the optimizer's state dict (the Trainer's
    # optimizer.pt), under "ema_buffers" -> str(index) -> {buffer name: tensor}: a resumed run
    # gets it back from wherever the Trainer resumes, with the parameters' EMAs.
    def _save_buffers(self, opt, state_dict):
        if self.teacher is not None:
            bufs = {n: b for n, b in self.teacher.named_buffers() if b.is_floating_point()}
            if bufs:
                state_dict.setdefault(_BUFFERS_KEY, {})[str(self.index)] = bufs
        return state_dict

    def _stash_buffers(self, opt, state_dict):
        saved = state_dict.get(_BUFFERS_KEY, {}).get(str(self.index))
        if saved is None:
            return None
        if self.teacher is not None:  # loaded during training: straight into the teacher
            with torch.no_grad():
                for n, b in self.teacher.named_buffers():
                    if n in saved and b.is_floating_point():
                        b.copy_(saved[n])
        else:
            self._pending = {n: t.detach().clone() for n, t in saved.items()}
        return None

    # ------------------------------------------------------------------ evaluation ----------
    @contextlib.contextmanager
    def ema_weights(self):
        """The Trainer's model holds the EMA (parameters and buffers) inside the block."""
        if self.teacher is None:
            raise RuntimeError("EMACallback.ema_weights() is available once training has "
                               "started (the callback finds the optimizer in on_train_begin)")
        with ema_weights(self.optimizer, self.model, self.teacher, self.index) as m:
            yield m

    def _swap_in(self) -> None:
        if self.evaluate and self._swap is None and self.teacher is not None:
            stack = contextlib.ExitStack()
            stack.enter_context(self.ema_weights())
            self._swap = stack

    def _maybe_swap_in(self, control) -> None:
        # Trainer sets should_evaluate in on_step_end / on_epoch_end and evaluates right
        # after them; on_evaluate (called at the end of every evaluation) swaps back.
        if control.should_evaluate:
            self._swap_in()

    def _swap_out(self) -> None:
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()

    def on_step_end(self, args, state, control, **kwargs):
        self._maybe_swap_in(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._maybe_swap_in(control)

    def on_evaluate(self, args, state, control, **kwargs):
        self._swap_out()

    def on_step_begin(self, args, state, control, **kwargs):
        self._swap_out()  # an evaluation that ended without on_evaluate (it raised)

    def on_train_end(self, args, state, control, **kwargs):
        self._swap_out()

    # ------------------------------------------------------------------ saving --------------
    def save_pretrained(self, path: str, **kwargs) -> None:
        """Write the EMA as a ``save_pretrained`` folder (config + safetensors) at ``path``;
        a model without ``save_pretrained`` gets ``model.safetensors`` only."""
        if self.teacher is None:
            raise RuntimeError("EMACallback.save_pretrained() is available once training has "
                               "started")
        if callable(getattr(self.teacher, "save_pretrained", None)):
            # (flatten=True's EMAs share one storage: save_pretrained writes them apart)
            self.teacher.save_pretrained(path, **kwargs)
            return
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.teacher.state_dict().items()}
        if len({v.untyped_storage().data_ptr() for v in state.values()}) < len(state):
            # tied weights, or flatten=True's views of one buffer: safetensors writes no
            # shared storage
            state = {k: v.clone() for k, v in state.items()}
        save_file(state, os.path.join(path, "model.safetensors"))

    def on_save(self, args, state, control, **kwargs):
        if not self.save or self.teacher is None or not state.is_world_process_zero:
            return
        ckpt = os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}")
        self.save_pretrained(os.path.join(ckpt, self.folder_name))
