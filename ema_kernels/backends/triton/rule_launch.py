"""The Triton backend's launchers of Lion, LARS and LAMB (issue 25): the reference's interface
(``backends/_reference_rules.py``), flat and persistent tensor-list launches as every op.

- ``lion_ema``: one pass (rule_kernels.py).
- ``lars_ema``: the SGD kernels with ``TRUST``: each tensor's (trust ratio, weight decay) row of
  ``coefs`` scales its direction before the momentum.
- ``lamb_moments`` / ``lamb_ema``: LAMB's two passes; the per-tensor sums of the first are a
  deterministic two-stage reduction (rule_kernels.py says why).

``lr`` (Lion, LARS), the bias corrections (LAMB) and ``ema_weight`` are host numbers or device
tensors (capturable steps, a tensor lr): any device tensor selects the ``DEVICE_SCALARS``
kernels, which load them on the device; nothing is read on the host.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import config
from .checks import _check_lists, _device_scalar
from .config import triton
from .launch import (_DeviceGuard, _amp_tensors, _const, _launch_step, _list_table, _run_list,
                     _split)
from .scalars import _NO_WEIGHTS, _ema_roles, _ema_roles_capturable, _sgd_scalars
from .kernels import _sgd_flat_kernel, _sgd_list_kernel
from .rule_kernels import (_chunk_sums_kernel, _lamb_ema_flat_kernel, _lamb_ema_list_kernel,
                           _lamb_moments_flat_kernel, _lamb_moments_list_kernel,
                           _lion_flat_kernel, _lion_list_kernel)

Tensor = torch.Tensor

_SUM_ROWS = 256  # chunk rows _chunk_sums_kernel adds per iteration


def _device_values(what: str, name: str, values: Sequence, device) -> Tensor:
    """Host numbers and one-element device tensors as one float32 device vector: tensors are
    converted on the device, numbers written by fills (no copy from pageable memory, so
    nothing waits)."""
    parts = []
    for v in values:
        if isinstance(v, Tensor):
            parts.append(_device_scalar(what, name, v, device, 1))
        else:
            parts.append(torch.full((1,), float(v), dtype=torch.float32, device=device))
    return torch.cat(parts)


def _emas(what, emas, ema_weight, n, on_device: bool):
    """``(z roles, host weights, device weights or None, N_EMAS)`` of a rule's call: the
    weights as launch arguments, or (``on_device``: a DEVICE_SCALARS launch) as a float32
    tensor with one element per EMA."""
    if not on_device:
        z_roles, ws, n_emas = _ema_roles(what, emas, ema_weight, n)
        return z_roles, ws, None, n_emas
    if isinstance(ema_weight, Tensor) or ema_weight is None:
        z_roles, ew, n_emas = _ema_roles_capturable(what, emas, ema_weight, n)
        return z_roles, _NO_WEIGHTS, ew, n_emas
    z_roles, ws, n_emas = _ema_roles(what, emas, ema_weight, n)  # host weights, device lr
    ew = [ws[f"w{k}"] for k in range(n_emas)]
    return z_roles, _NO_WEIGHTS, ew, n_emas


def _ema_names(n_emas, z_roles):
    return [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in enumerate(z_roles)]


def _device_weights(what, ew, n_emas, device) -> Optional[Tensor]:
    if n_emas == 0:
        return None
    if isinstance(ew, Tensor):
        return _device_scalar(what, "ema_weight", ew, device, n_emas)
    return _device_values(what, "ema_weight", ew, device)


def _per_tensor(what: str, name: str, t, device, shape) -> Tensor:
    """A per-tensor float32 device tensor (``coefs``, ``step_sizes``) checked without reading
    it: its shape and device; another float dtype converted on the device."""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{what}: {name} must be a floating-point tensor of shape {shape} on "
                        f"the parameters' device, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{what}: {name} must have shape {shape} (one row per parameter "
                         f"tensor), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{what}: {name} is on {t.device} but the parameters are on {device}")
    return t.detach().to(torch.float32).contiguous()


def lion_ema(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], emas, *, lr,
             beta1: float, beta2: float, weight_decay: float, maximize: bool, ema_weight,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """Lion (Chen et al. 2023) + EMA in one pass (the reference's ``lion_ema``): ``lr`` a
    number or a one-element device tensor; ``ema_weight`` numbers or a device tensor."""
    if not params:
        return
    what = "lion_ema"
    on_device = isinstance(lr, Tensor) or isinstance(ema_weight, Tensor)
    z_roles, ws, ew, n_emas = _emas(what, emas, ema_weight, len(params), on_device)
    device = _check_lists(what, params, grads, [("exp_avgs", exp_avgs)] +
                          _ema_names(n_emas, z_roles), grad_scale, found_inf)
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    host_lr = 0.0 if on_device else float(lr)  # (a DEVICE_SCALARS launch loads its own)
    scalars = dict(grad_sign=-1.0 if maximize else 1.0, beta1=beta1, beta1_w=1.0 - beta1,
                   beta2=beta2, beta2_w=1.0 - beta2, weight_decay=weight_decay,
                   decay=1.0 - host_lr * weight_decay, neg_lr=-host_lr, **ws,
                   has_scale=has_scale, sc_ptr=None, ew_ptr=None)
    if on_device:
        scalars.update(sc_ptr=_device_values(what, "lr", [lr], device),
                       ew_ptr=_device_weights(what, ew, n_emas, device))
    _launch_step(what, _lion_flat_kernel, _lion_list_kernel, [params, grads, exp_avgs] + z_roles,
                 device, (grad_scale, found_inf), scalars,
                 (stochastic_rounding, sr_seed, sr_step, sr_offsets), N_EMAS=n_emas,
                 DEVICE_SCALARS=on_device)


def lars_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
             emas, *, coefs: Tensor, lr, momentum: float, dampening: float, nesterov: bool,
             maximize: bool, first_step: bool, ema_weight, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
             sr_seed: int = 0, sr_step: int = 0, sr_offsets: Optional[List[int]] = None) -> None:
    """LARS (Lightning Bolts' rule) + EMA: per tensor ``d = ratio·(g + λ_i θ)`` from its row
    of ``coefs`` ((n, 2) float32: trust ratio, weight decay), then SGD's momentum on ``d``:
    the SGD kernels with ``TRUST``, one pass."""
    if not params:
        return
    what = "lars_ema"
    has_momentum = momentum != 0
    if has_momentum and momentum_buffers is None:
        raise ValueError(f"{what}: momentum is non-zero but momentum_buffers is None")
    momentum_buffers = momentum_buffers if has_momentum else None
    on_device = isinstance(lr, Tensor) or isinstance(ema_weight, Tensor)
    z_roles, ws, ew, n_emas = _emas(what, emas, ema_weight, len(params), on_device)
    device = _check_lists(what, params, grads, [("momentum_buffers", momentum_buffers)] +
                          _ema_names(n_emas, z_roles), grad_scale, found_inf)
    coefs = _per_tensor(what, "coefs", coefs, device, (len(params), 2))
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    scalars = _sgd_scalars(0.0 if on_device else float(lr), momentum, dampening, 0.0, nesterov,
                           maximize, first_step, ws, has_scale)
    del scalars["coefs_ptr"]  # per tensor: per_tensor below
    if on_device:
        scalars.update(sc_ptr=_device_values(what, "lr", [lr], device),
                       ew_ptr=_device_weights(what, ew, n_emas, device))
    _launch_step(what, _sgd_flat_kernel, _sgd_list_kernel,
                 [params, grads, momentum_buffers] + z_roles, device, (grad_scale, found_inf),
                 scalars, (stochastic_rounding, sr_seed, sr_step, sr_offsets),
                 per_tensor=(lambda i: {"coefs_ptr": coefs[i]}, {"coefs_ptr": coefs}),
                 N_EMAS=n_emas, HAS_MOMENTUM=has_momentum, TRUST=True, DEVICE_SCALARS=on_device)


def _lamb_bias(what, bias_correction1, bias_correction2_sqrt, device, on_device):
    """The bias corrections as launch arguments, or (on_device) their device tensor."""
    if not on_device:
        return dict(bc1=float(bias_correction1), bc2_sqrt=float(bias_correction2_sqrt),
                    sc_ptr=None)
    return dict(bc1=1.0, bc2_sqrt=1.0, sc_ptr=_device_values(
        what, "bias corrections", [bias_correction1, bias_correction2_sqrt], device))


def lamb_moments(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                 exp_avg_sqs: List[Tensor], *, beta1: float, beta2: float, eps: float,
                 weight_decay: float, maximize: bool, bias_correction1, bias_correction2_sqrt,
                 grad_scale: Optional[Tensor] = None,
                 found_inf: Optional[Tensor] = None) -> Tensor:
    """LAMB's first pass (the reference's ``lamb_moments``): m, v updated; returns the (n, 2)
    float32 per-tensor sums (Σθ², Σr²).  Each chunk's sums go to its own row of a partial
    buffer, which ``_chunk_sums_kernel`` (list) or a float64 ``sum`` (flat) reduces per tensor
    in a fixed order.  On a ``found_inf`` step nothing is read or written and the sums are 0
    (the second pass skips that step too)."""
    n = len(params)
    if n == 0:
        return torch.zeros(0, 2)
    what = "lamb_moments"
    device = _check_lists(what, params, grads, [("exp_avgs", exp_avgs),
                                                ("exp_avg_sqs", exp_avg_sqs)],
                          grad_scale, found_inf)
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    on_device = isinstance(bias_correction1, Tensor) or isinstance(bias_correction2_sqrt, Tensor)
    scalars = dict(grad_sign=-1.0 if maximize else 1.0, beta1_w=1.0 - beta1, beta2=beta2,
                   beta2_w=1.0 - beta2, eps=eps, weight_decay=weight_decay, has_scale=has_scale,
                   **_lamb_bias(what, bias_correction1, bias_correction2_sqrt, device,
                                on_device))
    flags = dict(DEVICE_SCALARS=on_device, BLOCK=config.BLOCK)
    roles = [params, grads, exp_avgs, exp_avg_sqs]
    out = torch.zeros(n, 2, dtype=torch.float32, device=device)
    amp = (grad_scale, found_inf)
    with _DeviceGuard(device):
        singles, groups, addrs = _split(roles)
        singles += [idx[0] for idx in groups.values() if len(idx) == 1]
        for i in singles:
            n_i = params[i].numel()
            part = torch.zeros(triton.cdiv(n_i, config.BLOCK), 2, dtype=torch.float32,
                               device=device)
            _lamb_moments_flat_kernel[(part.shape[0],)](
                *[r[i] for r in roles], *amp, n_i, part, **scalars, **flags,
                num_warps=config.NUM_WARPS)
            out[i].copy_(part.sum(0, dtype=torch.float64))
        for dtype, idx in groups.items():
            if len(idx) == 1:
                continue
            table, n_chunks = _list_table(addrs, params, idx, device, None, True)
            part = torch.zeros(n_chunks, 2, dtype=torch.float32, device=device)
            _run_list(_lamb_moments_list_kernel, table, len(idx), n_chunks, device, dtype, amp,
                      dict(scalars, part_ptr=part), flags)
            _chunk_sums_kernel[(len(idx),)](table, len(idx), n_chunks, part, out, ROLES=4,
                                            BLOCK=config.BLOCK, RB=_SUM_ROWS)
    return out


def lamb_ema(params: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], emas, *,
             step_sizes: Tensor, eps: float, weight_decay: float, bias_correction1,
             bias_correction2_sqrt, ema_weight, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """LAMB's second pass (the reference's ``lamb_ema``): ``θ -= step_sizes[i]·r``, r recomputed
    from the moments :func:`lamb_moments` stored; then the EMAs."""
    if not params:
        return
    what = "lamb_ema"
    on_device = isinstance(bias_correction1, Tensor) or \
        isinstance(bias_correction2_sqrt, Tensor) or isinstance(ema_weight, Tensor)
    z_roles, ws, ew, n_emas = _emas(what, emas, ema_weight, len(params), on_device)
    device = _check_lists(what, params, params, [("exp_avgs", exp_avgs),
                                                 ("exp_avg_sqs", exp_avg_sqs)] +
                          _ema_names(n_emas, z_roles), None, found_inf)
    steps = _per_tensor(what, "step_sizes", step_sizes, device, (len(params),))
    if found_inf is None:
        found_inf = _const(device, 0.0)
    scalars = dict(eps=eps, weight_decay=weight_decay, **ws,
                   **_lamb_bias(what, bias_correction1, bias_correction2_sqrt, device,
                                on_device), ew_ptr=None)
    if on_device:
        scalars["ew_ptr"] = _device_weights(what, ew, n_emas, device)
    _launch_step(what, _lamb_ema_flat_kernel, _lamb_ema_list_kernel,
                 [params, exp_avgs, exp_avg_sqs] + z_roles, device, (found_inf,), scalars,
                 (stochastic_rounding, sr_seed, sr_step, sr_offsets),
                 per_tensor=(lambda i: {"step_ptr": steps[i]}, {"step_ptr": steps}),
                 N_EMAS=n_emas, DEVICE_SCALARS=on_device)
