"""Reference backend: the fused optimizer + EMA update in plain torch.

This is the CPU fallback and the oracle every kernel is tested against, so it is written to be
read: one function per update, the math in float32 whatever the storage dtype, in the same order
as torch.optim's single-tensor implementations (so fp32 results match torch.optim closely).

Backend interface (every backend module implements the same two functions)::

    adam_ema(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas, *, lr, beta1, beta2,
             eps, weight_decay, decoupled, maximize, step_size, bias_correction2_sqrt,
             ema_weight, grad_scale, found_inf)
    sgd_ema(params, grads, momentum_buffers, emas, *, lr, momentum, dampening, weight_decay,
            nesterov, maximize, first_step, ema_weight, grad_scale, found_inf)

- Every argument named in the plural is a list of contiguous tensors of equal lengths, aligned
  element for element (a flat buffer is simply a list of one). ``params``/``grads`` share a
  storage dtype (fp32, bf16, fp16); state and EMA tensors are fp32 (fp64 for fp64 params).
- ``max_exp_avg_sqs`` is ``None`` unless AMSGrad; ``momentum_buffers`` is ``None`` when
  ``momentum == 0``; ``emas`` is ``None`` (or ignored) when ``ema_weight`` is ``None``: a step
  that does not update the EMA reads and writes no EMA bytes.
- One EMA: ``emas`` a list aligned with ``params`` and ``ema_weight`` a number.  Several (up to
  :data:`~ema_kernels.backends._emas.MAX_EMAS`, updated in the same pass): ``emas`` a sequence
  of such lists and ``ema_weight`` a sequence with one weight each (see
  :mod:`ema_kernels.backends._emas`).
- ``ema_weight`` is ``1 - ρ̂`` computed on the host in double precision (ρ̂ near 1 would lose
  digits if the kernel formed ``1 - ρ̂`` from a float32 ρ̂). Each EMA moves towards the
  parameter *as stored* (after rounding to bf16/fp16): ``ζ_i += w_i * (θ - ζ_i)``.
- ``step_size = lr / (1 - β1^t)`` and ``bias_correction2_sqrt = sqrt(1 - β2^t)`` are host
  doubles, as in torch.optim.Adam.
- ``grad_scale`` (divide gradients by it) and ``found_inf`` (non-zero: change nothing) are
  optional one-element float32 tensors on the parameters' device (torch.amp.GradScaler's
  contract). Gradients are never written.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ._emas import ema_lists

Tensor = torch.Tensor

NAME = "reference"

# Work in chunks through small reusable float32 scratch buffers: the update then allocates
# nothing proportional to the model, and a chunk's working set stays cache-sized.
_CHUNK = 1 << 16
_scratch: dict = {}


def availability(device_type: str):
    """The reference backend runs wherever torch runs."""
    return True, "pure torch, runs on every device"


def _scratch_buffers(device: torch.device, dtype: torch.dtype, n: int):
    key = (device, dtype)
    bufs = _scratch.get(key)
    if bufs is None:
        bufs = [torch.empty(_CHUNK, device=device, dtype=dtype) for _ in range(3)]
        _scratch[key] = bufs
    return [b[:n] for b in bufs]


def _skip(found_inf: Optional[Tensor]) -> bool:
    # The reference may synchronise: it is the oracle, not the fast path.
    return found_inf is not None and bool(found_inf.item())


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _load_grad(g, tmp, grad_scale, maximize, need_copy):
    """The gradient in the compute dtype: unscaled and sign-flipped, in ``tmp`` if modified."""
    if not need_copy and grad_scale is None and not maximize and g.dtype == tmp.dtype:
        return g
    tmp.copy_(g)
    if grad_scale is not None:
        tmp.div_(grad_scale)
    if maximize:
        tmp.neg_()
    return tmp


def _chunks(n: int):
    for start in range(0, n, _CHUNK):
        yield start, min(start + _CHUNK, n)


def adam_ema(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
             exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
             emas: Optional[List[Tensor]], *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, decoupled: bool, maximize: bool, step_size: float,
             bias_correction2_sqrt: float, ema_weight: Optional[float],
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """Adam / AdamW step followed by the EMA update (see the module docstring)."""
    z_lists, weights = ema_lists(emas, ema_weight, len(params), "adam_ema")
    if _skip(found_inf):
        return
    for i, (p_all, g_all) in enumerate(zip(params, grads)):
        p_flat, g_flat = p_all.view(-1), g_all.view(-1)
        m_flat, v_flat = exp_avgs[i].view(-1), exp_avg_sqs[i].view(-1)
        vmax_flat = max_exp_avg_sqs[i].view(-1) if max_exp_avg_sqs is not None else None
        z_flats = [zs[i].view(-1) for zs in z_lists]
        cdt = _compute_dtype(p_flat.dtype)
        for a, b in _chunks(p_flat.numel()):
            p, m, v = p_flat[a:b], m_flat[a:b], v_flat[a:b]
            t_g, t_p, t_d = _scratch_buffers(p.device, cdt, b - a)
            l2 = weight_decay != 0 and not decoupled
            g = _load_grad(g_flat[a:b], t_g, grad_scale, maximize, need_copy=l2)
            theta = p if p.dtype == cdt else t_p.copy_(p)
            if weight_decay != 0:
                if decoupled:
                    theta.mul_(1 - lr * weight_decay)
                else:
                    g.add_(theta, alpha=weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            if vmax_flat is not None:
                vmax = vmax_flat[a:b]
                torch.maximum(vmax, v, out=vmax)
                torch.sqrt(vmax, out=t_d)
            else:
                torch.sqrt(v, out=t_d)
            t_d.div_(bias_correction2_sqrt).add_(eps)
            theta.addcdiv_(m, t_d, value=-step_size)
            _store_and_average(p, theta, z_flats, a, b, weights)


def sgd_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
            emas: Optional[List[Tensor]], *, lr: float, momentum: float, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
            ema_weight: Optional[float], grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None) -> None:
    """SGD (momentum, dampening, Nesterov, weight decay) step followed by the EMA update.

    ``first_step``: the momentum buffers hold nothing yet and are initialised to the first
    gradient (no dampening), as torch.optim.SGD does.
    """
    z_lists, weights = ema_lists(emas, ema_weight, len(params), "sgd_ema")
    if _skip(found_inf):
        return
    for i, (p_all, g_all) in enumerate(zip(params, grads)):
        p_flat, g_flat = p_all.view(-1), g_all.view(-1)
        buf_flat = momentum_buffers[i].view(-1) if momentum != 0 else None
        z_flats = [zs[i].view(-1) for zs in z_lists]
        cdt = _compute_dtype(p_flat.dtype)
        for a, b in _chunks(p_flat.numel()):
            p = p_flat[a:b]
            t_g, t_p, t_d = _scratch_buffers(p.device, cdt, b - a)
            d = _load_grad(g_flat[a:b], t_g, grad_scale, maximize, need_copy=weight_decay != 0)
            theta = p if p.dtype == cdt else t_p.copy_(p)
            if weight_decay != 0:
                d.add_(theta, alpha=weight_decay)
            if buf_flat is not None:
                buf = buf_flat[a:b]
                if first_step:
                    buf.copy_(d)
                else:
                    buf.mul_(momentum).add_(d, alpha=1 - dampening)
                if nesterov:
                    d = torch.add(d, buf, alpha=momentum, out=t_d)
                else:
                    d = buf
            theta.add_(d, alpha=-lr)
            _store_and_average(p, theta, z_flats, a, b, weights)


def _store_and_average(p, theta, z_flats, a, b, weights):
    """Write θ back in its storage dtype, then move every ζ_i towards θ *as stored* (the
    chunk of θ is read once, from the scratch buffer, for all of them)."""
    if theta is not p:
        p.copy_(theta)  # round to nearest even for bf16/fp16
        theta.copy_(p)
    for z_flat, w in zip(z_flats, weights):
        z_flat[a:b].lerp_(theta, w)


def ema_only(params: List[Tensor], emas, ema_weight) -> None:
    """ζ_i += w_i (θ − ζ_i) for parameters that took no optimizer step but whose EMA clock
    ticked (one EMA list and weight, or several: see the module docstring)."""
    z_lists, weights = ema_lists(emas, ema_weight, len(params), "ema_only")
    for i, p in enumerate(params):
        for zs, w in zip(z_lists, weights):
            z = zs[i]
            z.lerp_(p.to(z.dtype), w)
