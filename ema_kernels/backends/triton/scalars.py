"""The kernels' scalar launch arguments: host hyperparameters, the device-scalar tensors of the
capturable paths, the EMA roles and weights, and the stochastic-rounding key."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _sr
from .._emas import MAX_EMAS, ema_lists, ema_lists_capturable

Tensor = torch.Tensor


def _as_i32(k: int) -> int:
    """A uint32 key as the int32 with its bits (always an i32 launch argument: one kernel
    signature, no respecialisation on the value; the kernel bitcasts it back)."""
    return k - (1 << 32) if k >= (1 << 31) else k


def _sr_scalars(what, params, scalars, on, seed, step, offsets):
    """Add the key arguments k0, k1 to ``scalars``; returns ``(SR flag, offsets or None)``.
    SR is on only for bf16/fp16 parameters (fp32 is stored exactly: the flag costs nothing)."""
    sr = bool(on) and params[0].dtype in (torch.bfloat16, torch.float16)
    k0 = k1 = 0
    if sr:
        _sr.check_args(what, len(params), seed, step, offsets)
        k0, k1 = _sr.key(seed, step)
        if offsets is None:
            offsets = _sr.flat_offsets([p.numel() for p in params])
    scalars["k0"], scalars["k1"] = _as_i32(k0), _as_i32(k1)
    return sr, (list(offsets) if sr else None)


def _ema_roles(what, emas, ema_weight, n):
    """``(z roles, scalars, N_EMAS)``: the EMA lists padded to MAX_EMAS roles with None, the
    weights w0..w3 (0.0 where absent: never read) and the EMA count."""
    lists, weights = ema_lists(emas, ema_weight, n, what)
    pad = MAX_EMAS - len(lists)
    roles = list(lists) + [None] * pad
    ws = dict(zip(("w0", "w1", "w2", "w3"), list(weights) + [0.0] * pad))
    return roles, ws, len(lists)


_NO_WEIGHTS = dict(w0=0.0, w1=0.0, w2=0.0, w3=0.0)  # DEVICE_SCALARS launches: loaded instead


def _ema_roles_capturable(what, emas, ema_weight, n):
    """``(z roles, weights tensor or None, N_EMAS)`` of a capturable call: the EMA lists padded
    to MAX_EMAS roles with None, and the device tensor of weights (one element per EMA)."""
    lists, w = ema_lists_capturable(emas, ema_weight, n, what)
    return list(lists) + [None] * (MAX_EMAS - len(lists)), w, len(lists)



def _adam_device_scalars(lr: Tensor, step: Tensor, beta1: float, beta2: float,
                         weight_decay: float, decoupled: bool) -> Tensor:
    """float32 ``[−lr/(1 − β1^t), √(1 − β2^t), 1 − lr·λ (AdamW with λ ≠ 0; else 1)]`` from the
    device tensors ``lr`` and ``step`` (t, float32): the reference's capturable ops, in double
    on the device, so both round the same doubles to float32 (and so does fused_math.h's
    adam_step_values). A few tiny device ops, no host read, nothing created that outlives
    the step (legal inside a CUDA-graph capture: a replay recomputes them)."""
    lr64 = lr.reshape(()).double()
    t = step.reshape(()).double()
    step_size = lr64 / (1.0 - beta1 ** t)
    bc2_sqrt = torch.sqrt(1.0 - beta2 ** t)
    # −x rounds to −float32(x): negating in double first is the same float32 value
    parts = [-step_size, bc2_sqrt]
    parts.append(1.0 - lr64 * weight_decay if decoupled and weight_decay != 0 else
                 torch.ones_like(lr64))  # theta * 1.0 is exact: the kernels multiply anyway
    return torch.stack(parts).to(torch.float32)


def _adam_scalars(lr, beta1, beta2, eps, weight_decay, decoupled, maximize, step_size,
                  bias_correction2_sqrt, ws, has_scale) -> dict:
    # Host scalars as torch forms them (Python doubles); Triton passes them as float32, as
    # torch casts a Python scalar to the float32 compute type of the reference's ops.
    return dict(
        beta1_w=1.0 - beta1, beta2=beta2, beta2_w=1.0 - beta2, eps=eps,
        decay=(1.0 - lr * weight_decay) if (decoupled and weight_decay != 0) else 1.0,
        l2_wd=0.0 if decoupled else weight_decay, grad_sign=-1.0 if maximize else 1.0,
        neg_step_size=-step_size, bc2_sqrt=bias_correction2_sqrt, **ws, has_scale=has_scale,
        sc_ptr=None, ew_ptr=None)


def _sgd_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, ws,
                 has_scale) -> dict:
    return dict(grad_sign=-1.0 if maximize else 1.0, weight_decay=weight_decay,
                momentum=momentum, dampening_w=1.0 - dampening, neg_lr=-lr,
                nesterov=int(bool(nesterov)), first_step=int(bool(first_step)), **ws,
                has_scale=has_scale, sc_ptr=None, ew_ptr=None, coefs_ptr=None)

