"""Triton backend: the fused optimizer step + EMA update as ``@triton.jit`` kernels.

Same interface and math as :mod:`ema_kernels.backends.reference` (read its docstring): every
element of θ, g, the optimizer state and ζ is read once and written once, in float32 registers
whatever the storage dtype, in the reference's order of operations.

Two entry points share the per-element math (``_adam_math`` / ``_sgd_math``):

- **flat** (the lists hold one tensor, e.g. a flat buffer): one launch, ``BLOCK`` elements per
  program, 64-bit offsets, full blocks unmasked (so accesses vectorise: 16 bytes for fp32,
  8 bytes for bf16/fp16, all streams in one register layout) and a masked tail block.
- **tensor list** (several tensors): a table of int64 addresses per role (θ, g, state..., ζ), the
  tensors' sizes and a chunk table (tensor index, chunk start) built on the host and copied to the
  device in one small transfer (cached by content, so a steady-state step copies nothing), so any
  number of tensors goes in one launch per parameter dtype.  A tensor with an address that is not
  16-byte aligned (an odd-offset view) gets its own flat launch instead.

Per-step values (lr, step size, bias corrections, betas, eps, weight decay, the ρ̂ weights,
momentum, Nesterov, first step, "divide by grad_scale") are runtime arguments; only the flags
that decide which bytes move (how many EMAs are updated this step, 0 to :data:`MAX_EMAS`, all
in the same pass; AMSGrad; momentum), where the lr-dependent values come from
(``DEVICE_SCALARS``) and the parameter dtype are ``tl.constexpr``: 164 kernels per 16-bit dtype
at most (84 for fp32, which has no SR variants), each compiled on first use.  ``grad_scale`` / ``found_inf`` are read inside the kernel (cached
device stand-ins 1.0 / 0.0 when absent): no host sync, and a step with a non-zero ``found_inf``
writes nothing.

``adam_ema_capturable`` / ``sgd_ema_capturable`` (capturable=True, and any step with a tensor
lr) read lr, the step count and the EMA weights on the device, never on the host: the
``DEVICE_SCALARS`` variants load the lr-dependent values from a small float32 device tensor
(Adam: formed from lr and t in double by a few torch ops, as the reference forms them; SGD:
the lr tensor itself) instead of taking them as launch arguments.

bf16 stores round to nearest even by bit manipulation (Triton's interpreter truncates in its
fp32→bf16 cast), so interpreted and compiled kernels round the same way as torch.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before this module is
imported), which is how the test-suite checks them without a GPU; ``aot_variants`` /
``aot_compile`` compile every kernel variant ahead of time for a GPU architecture without one.

Where things are: ``kernels.py`` the ``@triton.jit`` kernels (``_adam_flat_kernel`` /
``_adam_list_kernel`` for AdamW/Adam, ``_sgd_*`` for SGD, ``_ema_flat_kernel``),
``launch.py`` the launchers (this module's API), ``scalars.py`` their scalar arguments,
``tables.py`` the tensor-list pointer tables and their device caches, ``checks.py``
availability and argument checks, ``config.py`` ``BLOCK`` / ``NUM_WARPS`` (read there at launch
time), ``aot.py`` the ahead-of-time variant list.
"""
from __future__ import annotations

from .aot import aot_compile, aot_variants
from .checks import availability
from .launch import (adam_ema, adam_ema_capturable, adam_ema_table, ema_only, sgd_ema,
                     sgd_ema_capturable, sgd_ema_table, sr_round)
from .rule_launch import lamb_ema, lamb_moments, lars_ema, lion_ema

NAME = "triton"

__all__ = ["NAME", "availability", "adam_ema", "sgd_ema", "adam_ema_capturable",
           "sgd_ema_capturable", "adam_ema_table", "sgd_ema_table", "ema_only", "sr_round",
           "lion_ema", "lars_ema", "lamb_moments", "lamb_ema", "aot_variants", "aot_compile"]
