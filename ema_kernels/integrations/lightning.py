"""Lightning: validate and test on the EMA, keep the EMAs in Lightning checkpoints.

Return an ema_kernels optimizer from ``configure_optimizers`` (automatic or manual
optimization; with or without an LR scheduler) and add the callback::

    def configure_optimizers(self):
        return ek.AdamW(self.parameters(), lr=1e-3, ema_decay=0.999)

    trainer = lightning.Trainer(callbacks=[EMACallback()], ...)

Unlike Lightning's ``WeightAveraging`` (an ``AveragedModel``: a second copy of the model, updated
by a second pass after each step) the EMA is the optimizer's own, updated inside its step; the
callback keeps no copy of the parameters (only, for a module with floating-point buffers such
as BatchNorm's statistics, a teacher owning their EMA: ``opt.ema_module``).

Checkpoints: the optimizer's state (``checkpoint["optimizer_states"]``) holds the parameters'
EMAs, so resuming a fit (``ckpt_path=...``) restores them bit for bit; the callback's state
holds the buffers' EMA; and ``checkpoint["ema_state_dict"]`` (``"ema_state_dict_<index>"`` for
``index > 0``) is the module's ``state_dict()`` with the EMA's values, for loading the EMA
without the optimizer: ``module.load_state_dict(torch.load(path)["ema_state_dict"])``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch

try:  # the unified package; the standalone pytorch_lightning has the same API
    import lightning.pytorch as pl
except ModuleNotFoundError as e:  # pragma: no cover - depends on what is installed
    if e.name not in ("lightning", "lightning.pytorch"):
        raise
    import pytorch_lightning as pl

from ._common import _is_ema_optimizer, ema_weights, find_ema_optimizer

__all__ = ["EMACallback"]


class EMACallback(pl.Callback):
    """Validation and test on EMA ``index`` of the module's ema_kernels optimizer.

    - ``evaluate=True``: every validation loop (during ``fit`` and ``trainer.validate``) and
      test loop runs with the module's parameters (and floating-point buffers) holding the
      EMA; the student's values are back, bit for bit, when the loop ends. During ``fit`` the
      EMA is the optimizer's live one; in a ``validate``/``test`` run with ``ckpt_path`` it is
      the checkpoint's ``ema_state_dict``.
    - Checkpoints: see the module docstring. The optimizer is the first of
      ``trainer.optimizers`` that is an ema_kernels optimizer.
    """

    def __init__(self, index: int = 0, evaluate: bool = True):
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index={index!r} must be an int >= 0 (the EMA to use; 0 is "
                             f"the first ema_decay)")
        self.index = index
        self.evaluate = bool(evaluate)
        self.optimizer = None
        self.teacher: Optional[torch.nn.Module] = None
        self._module: Optional[torch.nn.Module] = None
        self._pending_buffers: Optional[Dict[str, torch.Tensor]] = None
        self._loaded_ema: Optional[Dict[str, torch.Tensor]] = None  # validate/test ckpt_path
        self._swap: Optional[contextlib.ExitStack] = None

    @property
    def checkpoint_key(self) -> str:
        """Where the EMA's ``state_dict`` lies in a Lightning checkpoint."""
        return "ema_state_dict" if self.index == 0 else f"ema_state_dict_{self.index}"

    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[index={self.index}]"

    # ------------------------------------------------------------------ set-up --------------
    def on_fit_start(self, trainer, pl_module):
        opt = next((o for o in trainer.optimizers if _is_ema_optimizer(o)), None)
        if opt is None:
            opts = [type(o).__name__ for o in trainer.optimizers]
            find_ema_optimizer(trainer.optimizers[0] if opts else None)  # raises, saying why
        opt._check_index(self.index)  # an EMA this optimizer does not keep: IndexError now
        self.optimizer, self._module = opt, pl_module
        self._loaded_ema = None
        has_float_buffers = any(b.is_floating_point() for b in pl_module.buffers())
        self.teacher = opt.ema_module(pl_module, self.index) if has_float_buffers else None
        pending, self._pending_buffers = self._pending_buffers, None
        if pending and self.teacher is not None:
            with torch.no_grad():
                for n, b in self.teacher.named_buffers():
                    if n in pending and b.is_floating_point():
                        b.copy_(pending[n])

    # ------------------------------------------------------------------ evaluation ----------
    @contextlib.contextmanager
    def ema_weights(self, pl_module=None):
        """The module holds the EMA (parameters and buffers) inside the block."""
        module = pl_module if pl_module is not None else self._module
        if self._loaded_ema is not None and module is not None:
            with _loaded_weights(module, self._loaded_ema):
                yield module
        elif self.optimizer is not None:
            with ema_weights(self.optimizer, module, self.teacher, self.index):
                yield module
        else:
            raise RuntimeError("EMACallback has no EMA to evaluate: run trainer.fit() with an "
                               "ema_kernels optimizer first, or validate/test from a "
                               "checkpoint written with this callback (ckpt_path=...)")

    def _swap_in(self, trainer, pl_module) -> None:
        if not self.evaluate or self._swap is not None:
            return
        if self._loaded_ema is None and self.optimizer is None:
            return  # nothing to evaluate with (a plain validate/test): the module as it is
        stack = contextlib.ExitStack()
        stack.enter_context(self.ema_weights(pl_module))
        self._swap = stack

    def _swap_out(self) -> None:
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()

    def on_validation_epoch_start(self, trainer, pl_module):
        self._swap_in(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        self._swap_out()

    def on_test_epoch_start(self, trainer, pl_module):
        self._swap_in(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module):
        self._swap_out()

    def on_exception(self, trainer, pl_module, exception):
        self._swap_out()

    # ------------------------------------------------------------------ checkpoints ---------
    def ema_state_dict(self, pl_module) -> Dict[str, torch.Tensor]:
        """``pl_module.state_dict()`` with the EMA's values: ζ for each parameter the optimizer
        keeps an EMA of, the teacher's buffers for floating-point buffers (the tensors
        themselves, not copies)."""
        opt = self.optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        ema_of = {id(p): z for p, z in zip(params, opt.ema_parameters(self.index))
                  if z is not None}
        teacher_bufs = dict(self.teacher.named_buffers()) if self.teacher is not None else {}
        out = {}
        for k, v in pl_module.state_dict(keep_vars=True).items():
            if id(v) in ema_of:
                out[k] = ema_of[id(v)]
            elif k in teacher_bufs and v.is_floating_point():
                out[k] = teacher_bufs[k]
            else:
                out[k] = v.detach()
        return out

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        if self.optimizer is not None:
            checkpoint[self.checkpoint_key] = self.ema_state_dict(pl_module)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        fitting = trainer.state.fn == "fit"
        ema = checkpoint.get(self.checkpoint_key)
        # validate/test from a checkpoint: evaluate the checkpoint's EMA, not the live one
        self._loaded_ema = None if fitting or ema is None else ema

    def state_dict(self) -> Dict[str, Any]:
        if self.teacher is None:
            return {}
        return {"buffers": {n: b for n, b in self.teacher.named_buffers()
                            if b.is_floating_point()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # Lightning restores callbacks before the optimizers exist: applied in on_fit_start
        self._pending_buffers = state_dict.get("buffers")


@contextlib.contextmanager
def _loaded_weights(module: torch.nn.Module, state: Dict[str, torch.Tensor]):
    """``module`` holds the floating-point entries of ``state`` inside the block."""
    mine = module.state_dict(keep_vars=True)
    dst, src = [], []
    for k, v in state.items():
        t = mine.get(k)
        if t is not None and t.is_floating_point() and t.shape == v.shape:
            dst.append(t.detach())
            src.append(v.to(device=t.device, dtype=t.dtype))
    with torch.no_grad():
        saved = [t.clone() for t in dst]
        if dst:
            torch._foreach_copy_(dst, src)
    try:
        yield module
    finally:
        with torch.no_grad():
            if dst:
                torch._foreach_copy_(dst, saved)
