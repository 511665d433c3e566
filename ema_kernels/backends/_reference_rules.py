"""Reference math of LARS, LAMB and Lion fused with the EMA (the oracle of their kernels).

Part of the reference backend (:mod:`ema_kernels.backends.reference` re-exports these), written
the same way: per tensor, in 64K-element chunks through the reference's small scratch buffers,
the math in float32 (float64 for float64 parameters) whatever the storage dtype, each EMA moved
towards θ *as stored* (``_store_and_average``: round to nearest or stochastic rounding), and a
step with ``found_inf != 0`` changing nothing, decided on the device (``_Skip``; no host read).

The per-tensor norms (LARS' ‖θ‖ and ‖g‖, LAMB's ‖θ‖ and ‖r‖) and the trust ratios made from
them are not here: the optimizers form the ratios as device ops on one small vector per set
(:mod:`ema_kernels.optim.norms`, where sharded parameters' sums are all-reduced), and every
backend's update takes them as a per-tensor float32 tensor. LAMB's direction norm needs the new
moments, so LAMB is two passes as in apex's FusedLAMB: :func:`lamb_moments` (update m, v; return
the per-tensor sums of θ² and r²) and :func:`lamb_ema` (θ ← θ − lr·ratio·r, r recomputed from
the stored m, v, θ with the same ops, then the EMAs).

Interface (beyond the one of :mod:`ema_kernels.backends.reference`)::

    lars_ema(params, grads, momentum_buffers, emas, *, coefs, lr, momentum, dampening, nesterov,
             maximize, first_step, ema_weight, grad_scale, found_inf, <stochastic rounding>)
    lamb_moments(params, grads, exp_avgs, exp_avg_sqs, *, beta1, beta2, eps, weight_decay,
                 maximize, bias_correction1, bias_correction2_sqrt, grad_scale, found_inf)
        -> sums: (n, 2) float32 tensor, per tensor (Σθ², Σr²) (accumulated in float64)
    lamb_ema(params, exp_avgs, exp_avg_sqs, emas, *, step_sizes, eps, weight_decay,
             bias_correction1, bias_correction2_sqrt, ema_weight, found_inf, <sr>)
    lion_ema(params, grads, exp_avgs, emas, *, lr, beta1, beta2, weight_decay, maximize,
             ema_weight, grad_scale, found_inf, <stochastic rounding>)

- ``coefs``: (n, 2) float32 tensor on the parameters' device, per tensor (trust ratio, weight
  decay applied): LARS' direction is ``ratio·(g + λ_i θ)``.
- ``step_sizes``: (n,) float32 tensor, per tensor lr·trust ratio.
- ``lr``, ``bias_correction1`` (1 − β1^t) and ``bias_correction2_sqrt`` (√(1 − β2^t)) are host
  numbers or 0-dim device tensors (the capturable / tensor-lr steps): never read on the host.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ._emas import ema_lists
from .reference import (_chunks, _compute_dtype, _load_grad, _scratch_buffers, _skipper,
                        _sr_plan, _store_and_average)

Tensor = torch.Tensor


def _weights(skip, ema_weights):
    return ema_weights if skip is None else [skip.value(w, 0.0) for w in ema_weights]


def _scalar(x, cdt, device):
    """A host number as it is (torch rounds it per op); a device scalar in the compute dtype."""
    if isinstance(x, Tensor):
        return x.detach().to(device=device, dtype=cdt).reshape(())
    return x


def lars_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
             emas, *, coefs: Tensor, lr, momentum: float, dampening: float, nesterov: bool,
             maximize: bool, first_step: bool, ema_weight, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
             sr_seed: int = 0, sr_step: int = 0, sr_offsets: Optional[List[int]] = None) -> None:
    """LARS (Lightning Bolts' rule) + EMA: per tensor ``d = ratio·(g + λ_i θ)`` (``coefs``),
    then torch.optim.SGD's momentum, dampening and Nesterov on ``d``, ``θ -= lr·d``."""
    if not params:
        return
    z_lists, weights = ema_lists(emas, ema_weight, len(params), "lars_ema")
    sr = _sr_plan("lars_ema", params, stochastic_rounding, sr_seed, sr_step, sr_offsets)
    skip = _skipper(found_inf, params)
    cdt = _compute_dtype(params[0].dtype)
    dev = params[0].device
    w_mom = momentum if skip is None else skip.value(momentum, 1.0)
    w_zs = _weights(skip, weights)
    neg_lr = -lr.detach().to(device=dev, dtype=cdt).reshape(()) if isinstance(lr, Tensor) \
        else None
    c = coefs.to(dtype=cdt)
    for i, (p_all, g_all) in enumerate(zip(params, grads)):
        p_flat, g_flat = p_all.view(-1), g_all.view(-1)
        buf_flat = momentum_buffers[i].view(-1) if momentum != 0 else None
        z_flats = [zs[i].view(-1) for zs in z_lists]
        ratio, wd = c[i, 0], c[i, 1]
        for a, b in _chunks(p_flat.numel()):
            p = p_flat[a:b]
            t_g, t_p, t_d = _scratch_buffers(p.device, cdt, b - a)
            d = _load_grad(g_flat[a:b], t_g, grad_scale, maximize, need_copy=True)
            theta = p if p.dtype == cdt else t_p.copy_(p)
            d.addcmul_(theta, wd).mul_(ratio)
            if skip is not None:
                d = skip.zeroed(d, out=t_g)
            if buf_flat is not None:
                buf = buf_flat[a:b]
                if first_step:
                    if skip is None:
                        buf.copy_(d)
                    else:
                        torch.where(skip.flag, buf, d, out=buf)
                else:
                    buf.mul_(w_mom).add_(d, alpha=1 - dampening)
                d = torch.add(d, buf, alpha=momentum, out=t_d) if nesterov else buf
            if skip is not None:
                d = skip.zeroed(d, out=t_d)  # never buf itself: it keeps its value
            if neg_lr is not None:
                theta.addcmul_(d, neg_lr)
            else:
                theta.add_(d, alpha=-lr)
            _store_and_average(p, theta, z_flats, a, b, w_zs, sr and (sr[0], sr[1][i] + a))


def _lamb_direction(m, v, theta, out, den, c1, bc2_sqrt, eps, weight_decay):
    """r = m̂ / (√v̂ + ε) + λθ into ``out``, with m̂ = m / (1 − β1^t) and √v̂ = √v / √(1 − β2^t):
    the same ops in both passes, so the second recomputes the first's r bit for bit."""
    torch.sqrt(v, out=den).div_(bc2_sqrt).add_(eps)
    torch.div(m, c1, out=out).div_(den)
    if weight_decay != 0:
        out.add_(theta, alpha=weight_decay)
    return out


def lamb_moments(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                 exp_avg_sqs: List[Tensor], *, beta1: float, beta2: float, eps: float,
                 weight_decay: float, maximize: bool, bias_correction1, bias_correction2_sqrt,
                 grad_scale: Optional[Tensor] = None,
                 found_inf: Optional[Tensor] = None) -> Tensor:
    """LAMB's first pass: Adam's moments updated (m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g²;
    unchanged on a found_inf step) and, per tensor, the sums (Σθ², Σr²) of the parameter and of
    the update direction r (see :func:`_lamb_direction`), as an (n, 2) tensor."""
    n = len(params)
    if n == 0:
        return torch.zeros(0, 2)
    cdt = _compute_dtype(params[0].dtype)
    dev = params[0].device
    skip = _skipper(found_inf, params)
    w_m = 1 - beta1 if skip is None else skip.value(1 - beta1, 0.0)
    w_v = beta2 if skip is None else skip.value(beta2, 1.0)
    c1 = _scalar(bias_correction1, cdt, dev)
    c2 = _scalar(bias_correction2_sqrt, cdt, dev)
    # the sums in float64: the oracle's norms are exact to float32 rounding whatever the size
    # (a float32 running sum over 2^20 elements drifts by ~1e-5 relative)
    sums = torch.zeros(n, 2, dtype=torch.float64, device=dev)
    for i, (p_all, g_all) in enumerate(zip(params, grads)):
        p_flat, g_flat = p_all.view(-1), g_all.view(-1)
        m_flat, v_flat = exp_avgs[i].view(-1), exp_avg_sqs[i].view(-1)
        for a, b in _chunks(p_flat.numel()):
            p, m, v = p_flat[a:b], m_flat[a:b], v_flat[a:b]
            t_g, t_p, t_d = _scratch_buffers(dev, cdt, b - a)
            g = _load_grad(g_flat[a:b], t_g, grad_scale, maximize, need_copy=skip is not None)
            theta = p if p.dtype == cdt else t_p.copy_(p)
            if skip is not None:
                g = skip.zeroed(g, out=t_g)  # a skipped step's gradient: zeros (may be inf)
            m.lerp_(g, w_m)
            v.mul_(w_v).addcmul_(g, g, value=1 - beta2)
            t64 = theta.double()
            sums[i, 0].add_(torch.dot(t64, t64))
            r = _lamb_direction(m, v, theta, t_g, t_d, c1, c2, eps, weight_decay).double()
            sums[i, 1].add_(torch.dot(r, r))
    return sums.to(cdt)


def lamb_ema(params: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], emas, *,
             step_sizes: Tensor, eps: float, weight_decay: float, bias_correction1,
             bias_correction2_sqrt, ema_weight, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """LAMB's second pass: ``θ -= step_sizes[i]·r`` (lr times the trust ratio, per tensor), r
    recomputed from the moments :func:`lamb_moments` stored; then the EMAs."""
    if not params:
        return
    z_lists, weights = ema_lists(emas, ema_weight, len(params), "lamb_ema")
    sr = _sr_plan("lamb_ema", params, stochastic_rounding, sr_seed, sr_step, sr_offsets)
    skip = _skipper(found_inf, params)
    cdt = _compute_dtype(params[0].dtype)
    dev = params[0].device
    c1 = _scalar(bias_correction1, cdt, dev)
    c2 = _scalar(bias_correction2_sqrt, cdt, dev)
    neg = step_sizes.to(device=dev, dtype=cdt).neg()
    if skip is not None:
        neg = skip.zeroed(neg, out=torch.empty_like(neg))
    w_zs = _weights(skip, weights)
    for i, p_all in enumerate(params):
        p_flat = p_all.view(-1)
        m_flat, v_flat = exp_avgs[i].view(-1), exp_avg_sqs[i].view(-1)
        z_flats = [zs[i].view(-1) for zs in z_lists]
        for a, b in _chunks(p_flat.numel()):
            p = p_flat[a:b]
            t_g, t_p, t_d = _scratch_buffers(dev, cdt, b - a)
            theta = p if p.dtype == cdt else t_p.copy_(p)
            r = _lamb_direction(m_flat[a:b], v_flat[a:b], theta, t_g, t_d, c1, c2, eps,
                                weight_decay)
            if skip is not None:
                r = skip.zeroed(r, out=t_g)
            theta.addcmul_(r, neg[i])
            _store_and_average(p, theta, z_flats, a, b, w_zs, sr and (sr[0], sr[1][i] + a))


def lion_ema(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], emas, *, lr,
             beta1: float, beta2: float, weight_decay: float, maximize: bool, ema_weight,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """Lion (Chen et al. 2023) + EMA: ``c = β1 m + (1−β1) g``; ``θ ← θ(1 − lr·λ) − lr·sign(c)``;
    ``m ← β2 m + (1−β2) g`` (lucidrains/lion-pytorch's order of operations)."""
    if not params:
        return
    z_lists, weights = ema_lists(emas, ema_weight, len(params), "lion_ema")
    sr = _sr_plan("lion_ema", params, stochastic_rounding, sr_seed, sr_step, sr_offsets)
    skip = _skipper(found_inf, params)
    cdt = _compute_dtype(params[0].dtype)
    dev = params[0].device
    lr_t = isinstance(lr, Tensor)
    if lr_t:
        lr_c = lr.detach().to(device=dev, dtype=cdt).reshape(())
        decay = 1 - lr_c * weight_decay
        neg_lr = -lr_c
    else:
        decay, neg_lr = 1 - lr * weight_decay, -lr
    if skip is not None:
        decay = skip.value(decay, 1.0)
        neg_lr = skip.value(neg_lr, 0.0)
        w_m2 = skip.value(beta2, 1.0)
    else:
        w_m2 = beta2
    w_zs = _weights(skip, weights)
    for i, (p_all, g_all) in enumerate(zip(params, grads)):
        p_flat, g_flat = p_all.view(-1), g_all.view(-1)
        m_flat = exp_avgs[i].view(-1)
        z_flats = [zs[i].view(-1) for zs in z_lists]
        for a, b in _chunks(p_flat.numel()):
            p, m = p_flat[a:b], m_flat[a:b]
            t_g, t_p, t_d = _scratch_buffers(dev, cdt, b - a)
            g = _load_grad(g_flat[a:b], t_g, grad_scale, maximize, need_copy=skip is not None)
            theta = p if p.dtype == cdt else t_p.copy_(p)
            if skip is not None:
                g = skip.zeroed(g, out=t_g)
            if weight_decay != 0:
                theta.mul_(decay)
            c = torch.mul(m, beta1, out=t_d).add_(g, alpha=1 - beta1).sign_()
            if isinstance(neg_lr, Tensor):
                theta.addcmul_(c, neg_lr)
            else:
                theta.add_(c, alpha=neg_lr)
            m.mul_(w_m2).add_(g, alpha=1 - beta2)
            _store_and_average(p, theta, z_flats, a, b, w_zs, sr and (sr[0], sr[1][i] + a))
