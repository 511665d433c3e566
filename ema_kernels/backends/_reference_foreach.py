"""The reference backend's updates on whole tensor lists, in torch's ``_foreach_*`` ops.

:mod:`ema_kernels.backends.reference` runs its updates through this module for tensors on a
non-CPU device (CUDA: the ``auto`` choice there when neither the extension nor Triton is
available). Its chunked loop launches ~9 kernels per 64K-element chunk (on a GPU every torch op
is a launch): ~17K launches per step at 125M parameters. Here each op of that loop is one
``_foreach_*`` op over the whole list (torch's multi_tensor_apply batches the tensors into a few
launches), so the number of ops per step does not depend on the number of elements.

Same bits as the chunked loop. Each function performs, per element, exactly the op sequence of
:func:`~ema_kernels.backends.reference.adam_ema` / ``sgd_ema`` / ``ema_only``, with the same
scalars; only the extent of each op changes (a whole tensor instead of a chunk). On CPU a
``_foreach_*`` op is torch's per-tensor loop over the same single-tensor op (``lerp_``,
``addcdiv_``, ...), and those element-wise kernels do not depend on where a range starts, so the
results are identical bit for bit (tests/test_reference_foreach.py checks every case). On CUDA
the foreach kernels are torch's own, within the project's tolerance of the chunked ops.

Ops that run per tensor (O(number of tensors) ops, still independent of numel), because torch
has no foreach op for them:

- ``torch.where`` (found_inf): zeroing a skipped step's gradient and update numerator (an inf
  or NaN gradient times 0 is NaN, so no multiplication can do it), and AMSGrad's maximum kept
  on a skip;
- stochastic rounding: the per-element hash of :mod:`ema_kernels.backends._sr`;
- on CUDA, ``lerp_`` / ``addcmul_`` whose weight is a device scalar (found_inf's device-chosen
  weights, the capturable variants' EMA weights and SGD lr): no ``_foreach_lerp_`` /
  ``_foreach_addcmul_`` overload takes a 0-d tensor, so they are passed as a list of that 0-d
  tensor, which torch runs on CUDA as its per-tensor loop (one launch per tensor, still no host
  read). ``_foreach_mul_`` / ``_foreach_div_`` / ``_foreach_add_`` do take a 0-d tensor and
  stay batched.

Transient memory, like torch.optim's foreach AdamW: temporaries the size of the parameter list,
allocated by the step and freed at its end (on CUDA the caching allocator keeps the blocks for
the next step). Counted in compute-dtype elements (float32; float64 for float64 parameters) per
parameter, live at the step's peak: the update's denominator (Adam) or the direction (SGD with
Nesterov, or with momentum on a found_inf step), 1; a gradient copy where the gradient is
modified (grad_scale, maximize, L2 weight decay, found_inf, or a storage dtype other than the
compute dtype), 1; θ in float32 for bf16/fp16 parameters, 1. At most 3, i.e. 12 bytes per
parameter (3x the fp32 model, 6x a bf16 one); tests/test_memory.py measures 1x for fp32 AdamW,
2x with grad_scale, L2 or SGD + Nesterov, 3x for bf16, and bounds the GPU step with it
(AMSGrad's maximum on a found_inf step is one tensor's temporary at a time). ``ema_only``: θ in float32 for bf16/fp16 parameters, 1.
Stochastic rounding adds its hash temporaries for one piece of at most :data:`SR_PIECE`
elements at a time.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from . import _sr

Tensor = torch.Tensor

# Stochastic rounding works on one piece of a tensor at a time: its hash and rounding
# temporaries (int64 tensors; measured on CPU: 41 bytes per element at the peak for bf16, 122
# for fp16) would otherwise be 10-30x the tensor's float32 size (a 38M-element fp16 embedding:
# 4.7 GB). 2^20 elements bound them to 43 / 128 MB, for numel / 2^20 more pieces of ops (~120 at
# 125M parameters) on top of the per-tensor ones the hash needs anyway (~35-60 ops a piece).
SR_PIECE = 1 << 20


def _temps(like: Sequence[Tensor], dtype: torch.dtype) -> List[Tensor]:
    """Uninitialised tensors shaped like ``like`` in ``dtype`` (allocations, no launches)."""
    return [torch.empty_like(t, dtype=dtype) for t in like]


def _lerp_(selfs: List[Tensor], ends: List[Tensor], weight) -> None:
    """``selfs[i].lerp_(ends[i], weight)`` for every i; ``weight`` a number or a 0-d tensor."""
    if isinstance(weight, Tensor):
        # No _foreach_lerp_ overload takes a 0-d tensor: the List overload with that tensor
        # once per entry runs lerp_(end, weight) per tensor (the chunked path's op exactly; on
        # CUDA one launch per tensor, no host read of the weight).
        torch._foreach_lerp_(selfs, ends, [weight] * len(selfs))
    else:
        torch._foreach_lerp_(selfs, ends, weight)


def _zero_skipped_(skip, ts: List[Tensor]) -> None:
    """``ts[i] = 0`` where found_inf is set, per tensor (see the module docstring)."""
    for t in ts:
        torch.where(skip.flag, skip.zero, t, out=t)


def _load_grads(grads, cdt, grad_scale, maximize, need_copy) -> List[Tensor]:
    """The gradients in the compute dtype, unscaled and sign-flipped: the user's tensors when
    nothing changes them (they are never written), else copies."""
    if not need_copy and grad_scale is None and not maximize and grads[0].dtype == cdt:
        return grads
    g = _temps(grads, cdt)
    torch._foreach_copy_(g, grads)
    if grad_scale is not None:
        torch._foreach_div_(g, grad_scale.reshape(()))  # the 0-d overload: no host read
    if maximize:
        torch._foreach_neg_(g)
    return g


def _compute_copies(params, cdt) -> List[Tensor]:
    """θ in the compute dtype: the parameters themselves, or float32 copies of 16-bit ones."""
    if params[0].dtype == cdt:
        return params
    theta = _temps(params, cdt)
    torch._foreach_copy_(theta, params)
    return theta


def _store_and_average(params, theta, z_lists, weights, sr) -> None:
    """Write θ back in its storage dtype, then move every ζ_i towards θ *as stored*."""
    if theta is not params:
        if sr is None:
            torch._foreach_copy_(params, theta)  # round to nearest even for bf16/fp16
        else:
            key, offsets = sr
            for p, t, base in zip(params, theta, offsets):
                p_flat, t_flat = p.view(-1), t.view(-1)
                for a in range(0, p_flat.numel(), SR_PIECE):
                    b = min(a + SR_PIECE, p_flat.numel())
                    idx = torch.arange(base + a, base + b, dtype=torch.int64, device=p.device)
                    p_flat[a:b].copy_(_sr.round_to(p.dtype, t_flat[a:b], _sr.bits(key, idx)))
        torch._foreach_copy_(theta, params)
    for zs, w in zip(z_lists, weights):
        _lerp_(zs, theta, w)


def adam_ema(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, z_lists, *, cdt, beta2,
             eps, weight_decay, decoupled, maximize, step_size, neg_step,
             bias_correction2_sqrt, w_m, w_v, w_decay, w_zs, grad_scale, skip, sr) -> None:
    """The Adam / AdamW + EMA update of :func:`reference.adam_ema` on whole lists (non-empty),
    from the scalars it prepared (``w_*``: found_inf's device-chosen weights or the plain
    numbers; ``neg_step``: ``-step_size`` in the compute dtype when it is a device tensor)."""
    l2 = weight_decay != 0 and not decoupled
    g = _load_grads(grads, cdt, grad_scale, maximize, need_copy=l2 or skip is not None)
    theta = _compute_copies(params, cdt)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(theta, w_decay)
        else:
            torch._foreach_add_(g, theta, alpha=weight_decay)
    if skip is not None:
        _zero_skipped_(skip, g)  # a skipped step's gradient: zeros (may be inf)
    _lerp_(exp_avgs, g, w_m)
    torch._foreach_mul_(exp_avg_sqs, w_v)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - beta2)
    if max_exp_avg_sqs is not None:
        if skip is None:
            torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        else:  # kept on a skip even if a loaded state had vmax < v somewhere
            for vmax, v in zip(max_exp_avg_sqs, exp_avg_sqs):
                torch.where(skip.flag, vmax, torch.maximum(vmax, v), out=vmax)
        denom = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    if skip is None:
        num = exp_avgs
    else:  # the update's numerator: zeros on a skip, written over g (no longer needed)
        for gi, m in zip(g, exp_avgs):
            torch.where(skip.flag, skip.zero, m, out=gi)
        num = g
    del g  # a gradient copy not reused as num is freed before the update allocates
    if isinstance(step_size, Tensor):  # device lr: the same three roundings as the chunked ops
        if num is exp_avgs:
            num = torch._foreach_mul(num, neg_step)
        else:
            torch._foreach_mul_(num, neg_step)
        torch._foreach_div_(num, denom)
        torch._foreach_add_(theta, num)
    else:
        torch._foreach_addcdiv_(theta, num, denom, value=-step_size)
    del num, denom
    _store_and_average(params, theta, z_lists, w_zs, sr)


def sgd_ema(params, grads, momentum_buffers, z_lists, *, cdt, lr, neg_lr, momentum, dampening,
            weight_decay, nesterov, maximize, first_step, w_mom, w_zs, grad_scale, skip,
            sr) -> None:
    """The SGD + EMA update of :func:`reference.sgd_ema` on whole lists (non-empty), from the
    scalars it prepared (``neg_lr``: ``-lr`` in the compute dtype when it is a device tensor)."""
    d = _load_grads(grads, cdt, grad_scale, maximize,
                    need_copy=weight_decay != 0 or skip is not None)
    theta = _compute_copies(params, cdt)
    if weight_decay != 0:
        torch._foreach_add_(d, theta, alpha=weight_decay)
    if skip is not None:
        _zero_skipped_(skip, d)  # a skipped step's gradient: zeros (may be inf)
    if momentum_buffers is not None:
        bufs = momentum_buffers
        if first_step:
            if skip is None:
                torch._foreach_copy_(bufs, d)
            else:
                for buf, di in zip(bufs, d):
                    torch.where(skip.flag, buf, di, out=buf)
        else:
            torch._foreach_mul_(bufs, w_mom)
            torch._foreach_add_(bufs, d, alpha=1 - dampening)
        if nesterov:
            d = torch._foreach_add(d, bufs, alpha=momentum)
            if skip is not None:
                _zero_skipped_(skip, d)
        else:
            # the direction is the buffer, which keeps its value: zeroed into new tensors
            d = [torch.where(skip.flag, skip.zero, b) for b in bufs] if skip is not None \
                else bufs
    # (without momentum d is still the gradient, already zeroed above: the chunked path's
    # second zeroing of it is the identity, not repeated here)
    if isinstance(lr, Tensor):  # device lr: addcmul_ per tensor (see _lerp_), as the chunked op
        torch._foreach_addcmul_(theta, d, [neg_lr] * len(theta))
    else:
        torch._foreach_add_(theta, d, alpha=-lr)
    del d
    _store_and_average(params, theta, z_lists, w_zs, sr)


def ema_only(params, z_lists, weights) -> None:
    """ζ_i += w_i (θ − ζ_i) on whole lists (non-empty): :func:`reference.ema_only`."""
    theta = _compute_copies(params, z_lists[0][0].dtype) if z_lists else params
    for zs, w in zip(z_lists, weights):
        _lerp_(zs, theta, w)
