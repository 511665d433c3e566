"""The Triton backend's launchers: flat and tensor-list launches (:func:`adam_ema`,
:func:`sgd_ema`), the capturable ones reading lr / step / EMA weights on the device
(:func:`adam_ema_capturable`, :func:`sgd_ema_capturable`), StepTable launches
(:func:`adam_ema_table`, :func:`sgd_ema_table`), :func:`ema_only` and :func:`sr_round`."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import _sr
from .._emas import MAX_EMAS
from . import config, grid
from .checks import _check_lists, _device_scalar
from .config import tl, triton
from .kernels import (_adam_flat_kernel, _adam_list_kernel, _ema_flat_kernel,
                      _ema_list_kernel,
                      _sgd_flat_kernel, _sgd_list_kernel, _sr_round_kernel)
from .scalars import (_NO_WEIGHTS, _adam_device_scalars, _adam_scalars, _as_i32, _ema_roles,
                      _ema_roles_capturable, _sgd_scalars, _sr_scalars)
from .tables import _device_table, _refuse_capture, _table

Tensor = torch.Tensor


_const_cache: Dict[Tuple[torch.device, float], Tensor] = {}


def _const(device: torch.device, value: float) -> Tensor:
    """A cached one-element float32 tensor (stands in for a missing grad_scale / found_inf)."""
    key = (device, value)
    t = _const_cache.get(key)
    if t is None:
        _refuse_capture("its device constants")
        t = torch.full((1,), value, dtype=torch.float32, device=device)
        _const_cache[key] = t
    return t


def _amp_tensors(device, grad_scale, found_inf):
    """``(has_scale, grad_scale, found_inf)``: cached device stand-ins for absent tensors.

    The kernels always read both scalars (8 bytes per program) and divide only when
    ``has_scale``: one compiled variant serves steps with and without a GradScaler.
    """
    has_scale = grad_scale is not None
    if grad_scale is None:
        grad_scale = _const(device, 1.0)
    if found_inf is None:
        found_inf = _const(device, 0.0)
    return int(has_scale), grad_scale, found_inf


class _DeviceGuard:
    """Launch on the tensors' GPU (Triton launches on the current device)."""

    def __init__(self, device: torch.device):
        self.ctx = None
        if device.type == "cuda" and device.index is not None \
                and device.index != torch.cuda.current_device():
            self.ctx = torch.cuda.device(device.index)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                  torch.float16: tl.float16}


def _run_list(kernel, table, n_tensors: int, n_chunks: int, device, dtype, amp: tuple,
              scalars: dict, flags: dict) -> None:
    """One persistent list launch over ``table`` (``n_tensors`` tensors, ``n_chunks`` chunks):
    its grid from grid.py (a whole number of resident waves), learnt from the first launch of
    the variant on the device."""
    key = (device, kernel, dtype, config.NUM_WARPS, tuple(flags.items()))
    n_prog = grid.programs(key, device, n_chunks)
    compiled = kernel[(n_prog,)](table, n_tensors, n_chunks, *amp, **scalars,
                                 P_DTYPE=_TL_DTYPES[dtype], **flags, num_warps=config.NUM_WARPS)
    if n_prog == n_chunks:
        grid.record(key, device, compiled)


def _split(roles: List[Optional[Sequence[Tensor]]]):
    """``(flat, groups)`` of a call over ``roles`` = [params, ...]: the non-empty tensors
    launched flat (an address of any role not 16-byte aligned: the list kernels assume it, so
    their accesses vectorise) and the others by parameter dtype."""
    params = roles[0]
    addrs = [None if r is None else [t.data_ptr() for t in r] for r in roles]
    flat: List[int] = []
    groups: Dict[torch.dtype, List[int]] = {}
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        if all(a is None or a[i] % 16 == 0 for a in addrs):
            groups.setdefault(p.dtype, []).append(i)
        else:
            flat.append(i)
    return flat, groups, addrs


def _list_table(addrs, params, idx, device, sr_offsets, positions: bool):
    """The device table of the list launch over tensors ``idx`` (see tables._table)."""
    sub = [[0] * len(idx) if a is None else [a[i] for i in idx] for a in addrs]
    return _table(sub, [params[i].numel() for i in idx], device,
                  None if sr_offsets is None else [sr_offsets[i] for i in idx],
                  idx if positions else None)


def _launch(flat_kernel, list_kernel, roles: List[Optional[Sequence[Tensor]]], device,
            amp: tuple, scalars: dict, flags: dict,
            sr_offsets: Optional[List[int]] = None, per_tensor=None) -> None:
    """Run the update over ``roles`` = [params, grads, state..., emas] (``None``: role absent).

    ``amp``: the kernels' arguments after the roles (flat) or the table (list): ``(grad_scale,
    found_inf)``, or what the kernel takes there.  One tensor: the flat kernel.  Several: one
    tensor-list launch per parameter dtype, a flat launch for a tensor with a misaligned
    address (an odd-offset view) or alone in its dtype (:func:`_split`).

    ``sr_offsets`` (stochastic rounding on, ``flags["SR"]``): each tensor's element-index base,
    passed to a flat launch as ``sr_base`` and to a list launch in its table.

    ``per_tensor`` (the per-tensor kernels, LARS and LAMB): ``(flat_args, list_args)``:
    ``flat_args(i)`` the flat launch of tensor ``i``'s extra keyword arguments (its row of a
    per-tensor tensor), ``list_args`` a list launch's (the whole tensor), whose table then
    carries each tensor's position ``i`` in these lists.
    """
    params = roles[0]

    def flat(i):
        n = params[i].numel()
        extra = {} if per_tensor is None else per_tensor[0](i)
        if "SR" in flags:
            extra["sr_base"] = sr_offsets[i] if sr_offsets is not None else 0
        flat_kernel[(triton.cdiv(n, config.BLOCK),)](
            *[None if r is None else r[i] for r in roles], *amp, n, **scalars, **extra,
            **flags, num_warps=config.NUM_WARPS)

    with _DeviceGuard(device):
        if len(params) == 1:
            if params[0].numel() > 0:
                flat(0)
            return
        singles, groups, addrs = _split(roles)
        for i in singles:
            flat(i)
        for dtype, idx in groups.items():
            if len(idx) == 1:
                flat(idx[0])
                continue
            table, n_chunks = _list_table(addrs, params, idx, device, sr_offsets,
                                          per_tensor is not None)
            _run_list(list_kernel, table, len(idx), n_chunks, device, dtype, amp,
                      scalars if per_tensor is None else dict(scalars, **per_tensor[1]), flags)


def _launch_step(what, flat_kernel, list_kernel, roles, device, amp: tuple, scalars: dict,
                 sr_args: tuple, per_tensor=None, **flags) -> None:
    """The tail every optimizer launcher shares: the stochastic-rounding key into ``scalars``
    (``sr_args`` = stochastic_rounding, sr_seed, sr_step, sr_offsets), then :func:`_launch`
    with the structural ``flags`` plus ``SR`` and ``BLOCK``."""
    sr_flag, sr_offsets = _sr_scalars(what, roles[0], scalars, *sr_args)
    _launch(flat_kernel, list_kernel, roles, device, amp, scalars,
            dict(flags, SR=sr_flag, BLOCK=config.BLOCK), sr_offsets, per_tensor)


def _table_common(dtype, device, ema_weight, grad_scale, found_inf, sr_seed, sr_step):
    """``(weights, n_emas, has_scale, grad_scale, found_inf, SR flag)`` of a StepTable launch;
    the SR key (k0, k1) goes into the weights dict (the kernels' scalar arguments)."""
    weights = tuple(ema_weight or ())
    pad = MAX_EMAS - len(weights)
    ws = dict(zip(("w0", "w1", "w2", "w3"), list(weights) + [0.0] * pad))
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    sr = sr_seed is not None and dtype in (torch.bfloat16, torch.float16)
    k0, k1 = _sr.key(sr_seed, sr_step) if sr else (0, 0)
    ws["k0"], ws["k1"] = _as_i32(k0), _as_i32(k1)
    return ws, len(weights), has_scale, grad_scale, found_inf, sr


def _launch_table(kernel, table, state_rows, dtype, device, n_emas, sr, grad_scale, found_inf,
                  scalars, **flags):
    """One list-kernel launch over a StepTable's pointer table (``state_rows`` state rows:
    Adam 3, SGD 1); ``flags`` the kernel's own structural constexprs."""
    host, n_chunks, key = table.triton_table(state_rows, n_emas, config.BLOCK, sr)
    if n_chunks == 0:
        return
    with _DeviceGuard(device):
        _run_list(kernel, _device_table(host, key, device), len(table), n_chunks, device, dtype,
                  (grad_scale, found_inf), scalars,
                  dict(N_EMAS=n_emas, **flags, SR=sr, DEVICE_SCALARS=False, BLOCK=config.BLOCK))


def adam_ema_table(table, dtype: torch.dtype, device: torch.device, *, amsgrad: bool,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   decoupled: bool, maximize: bool, step_size: float,
                   bias_correction2_sqrt: float, ema_weight, grad_scale=None, found_inf=None,
                   sr_seed: Optional[int] = None, sr_step: int = 0) -> None:
    """:func:`adam_ema` over a prepared StepTable (csrc/step_table.cpp, kernels='triton'):
    its pointer table comes from C++ and is cached on the device by content, so the host does
    no per-tensor work. One list launch (every address was checked 16-byte aligned)."""
    ws, n_emas, has_scale, gs, fi, sr = _table_common(dtype, device, ema_weight, grad_scale,
                                                      found_inf, sr_seed, sr_step)
    scalars = _adam_scalars(lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                            step_size, bias_correction2_sqrt, ws, has_scale)
    _launch_table(_adam_list_kernel, table, 3, dtype, device, n_emas, sr, gs, fi, scalars,
                  AMSGRAD=bool(amsgrad))


def sgd_ema_table(table, dtype: torch.dtype, device: torch.device, *, lr: float,
                  momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                  maximize: bool, first_step: bool, ema_weight, grad_scale=None,
                  found_inf=None, sr_seed: Optional[int] = None, sr_step: int = 0) -> None:
    """:func:`sgd_ema` over a prepared StepTable (see :func:`adam_ema_table`)."""
    ws, n_emas, has_scale, gs, fi, sr = _table_common(dtype, device, ema_weight, grad_scale,
                                                      found_inf, sr_seed, sr_step)
    scalars = _sgd_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize,
                           first_step, ws, has_scale)
    _launch_table(_sgd_list_kernel, table, 1, dtype, device, n_emas, sr, gs, fi, scalars,
                  HAS_MOMENTUM=momentum != 0, TRUST=False)


def adam_ema(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
             exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
             emas: Optional[List[Tensor]], *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, decoupled: bool, maximize: bool, step_size: float,
             bias_correction2_sqrt: float, ema_weight: Optional[float],
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """Adam / AdamW step followed by the EMA update(s) (see the reference backend's docstring)."""
    if len(params) == 0:
        return
    z_roles, ws, n_emas = _ema_roles("adam_ema", emas, ema_weight, len(params))
    device = _check_lists("adam_ema", params, grads,
                          [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                           ("max_exp_avg_sqs", max_exp_avg_sqs)] +
                          [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in
                           enumerate(z_roles)],
                          grad_scale, found_inf)
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    scalars = _adam_scalars(lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                            step_size, bias_correction2_sqrt, ws, has_scale)
    _launch_step("adam_ema", _adam_flat_kernel, _adam_list_kernel,
                 [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs] + z_roles,
                 device, (grad_scale, found_inf), scalars,
                 (stochastic_rounding, sr_seed, sr_step, sr_offsets),
                 N_EMAS=n_emas, AMSGRAD=max_exp_avg_sqs is not None, DEVICE_SCALARS=False)


def sgd_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
            emas: Optional[List[Tensor]], *, lr: float, momentum: float, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
            ema_weight: Optional[float], grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
            sr_seed: int = 0, sr_step: int = 0, sr_offsets: Optional[List[int]] = None) -> None:
    """SGD step followed by the EMA update(s) (see the reference backend's docstring)."""
    if len(params) == 0:
        return
    z_roles, ws, n_emas = _ema_roles("sgd_ema", emas, ema_weight, len(params))
    has_momentum = momentum != 0
    if has_momentum and momentum_buffers is None:
        raise ValueError("sgd_ema: momentum is non-zero but momentum_buffers is None")
    momentum_buffers = momentum_buffers if has_momentum else None
    device = _check_lists("sgd_ema", params, grads,
                          [("momentum_buffers", momentum_buffers)] +
                          [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in
                           enumerate(z_roles)],
                          grad_scale, found_inf)
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    scalars = _sgd_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize,
                           first_step, ws, has_scale)
    _launch_step("sgd_ema", _sgd_flat_kernel, _sgd_list_kernel,
                 [params, grads, momentum_buffers] + z_roles,
                 device, (grad_scale, found_inf), scalars,
                 (stochastic_rounding, sr_seed, sr_step, sr_offsets),
                 N_EMAS=n_emas, HAS_MOMENTUM=has_momentum, TRUST=False, DEVICE_SCALARS=False)


def adam_ema_capturable(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                        exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
                        emas: Optional[List[Tensor]], *, lr: Tensor, step: Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled: bool, maximize: bool, ema_weight: Optional[Tensor],
                        grad_scale: Optional[Tensor] = None,
                        found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
                        sr_seed: int = 0, sr_step: int = 0,
                        sr_offsets: Optional[List[int]] = None) -> None:
    """Adam / AdamW + EMA reading ``lr``, ``step`` (t, already incremented) and ``ema_weight``
    (1 − ρ̂, one float32 element per EMA, or None) from one-element tensors on the parameters'
    device: nothing is read on the host, so the call can be captured in a CUDA graph and a
    replay uses the tensors' current values.

    The bias corrections and the decoupled decay 1 − lr·λ are formed on the device in double,
    with the reference's torch ops (:func:`_adam_device_scalars`), and the kernels load them
    (their ``DEVICE_SCALARS`` variants); the stochastic-rounding key comes from the host's
    ``sr_step`` (a device lr with a host step count; capturable=True refuses SR)."""
    if len(params) == 0:
        return
    what = "adam_ema_capturable"
    z_roles, ew, n_emas = _ema_roles_capturable(what, emas, ema_weight, len(params))
    device = _check_lists(what, params, grads,
                          [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                           ("max_exp_avg_sqs", max_exp_avg_sqs)] +
                          [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in
                           enumerate(z_roles)],
                          grad_scale, found_inf)
    lr, step, ew = (_device_scalar(what, name, t, device, numel) for name, t, numel in
                    (("lr", lr, 1), ("step", step, 1), ("ema_weight", ew, n_emas)))
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    # the host arguments these replace are placeholders (never read by DEVICE_SCALARS kernels)
    scalars = _adam_scalars(0.0, beta1, beta2, eps, weight_decay, decoupled, maximize, 0.0, 1.0,
                            _NO_WEIGHTS, has_scale)
    scalars.update(sc_ptr=_adam_device_scalars(lr, step, beta1, beta2, weight_decay,
                                               decoupled), ew_ptr=ew)
    _launch_step(what, _adam_flat_kernel, _adam_list_kernel,
                 [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs] + z_roles,
                 device, (grad_scale, found_inf), scalars,
                 (stochastic_rounding, sr_seed, sr_step, sr_offsets),
                 N_EMAS=n_emas, AMSGRAD=max_exp_avg_sqs is not None, DEVICE_SCALARS=True)


def sgd_ema_capturable(params: List[Tensor], grads: List[Tensor],
                       momentum_buffers: Optional[List[Tensor]], emas: Optional[List[Tensor]], *,
                       lr: Tensor, momentum: float, dampening: float, weight_decay: float,
                       nesterov: bool, maximize: bool, first_step: bool,
                       ema_weight: Optional[Tensor], grad_scale: Optional[Tensor] = None,
                       found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
                       sr_seed: int = 0, sr_step: int = 0,
                       sr_offsets: Optional[List[int]] = None) -> None:
    """SGD + EMA reading ``lr`` and ``ema_weight`` (1 − ρ̂, one float32 element per EMA, or
    None) from tensors on the parameters' device, never on the host: the kernels load the
    float32 lr itself (−lr is exact) and the weights, so no device op runs before the launch."""
    if len(params) == 0:
        return
    what = "sgd_ema_capturable"
    z_roles, ew, n_emas = _ema_roles_capturable(what, emas, ema_weight, len(params))
    has_momentum = momentum != 0
    if has_momentum and momentum_buffers is None:
        raise ValueError(f"{what}: momentum is non-zero but momentum_buffers is None")
    momentum_buffers = momentum_buffers if has_momentum else None
    device = _check_lists(what, params, grads,
                          [("momentum_buffers", momentum_buffers)] +
                          [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in
                           enumerate(z_roles)],
                          grad_scale, found_inf)
    lr, ew = (_device_scalar(what, name, t, device, numel) for name, t, numel in
              (("lr", lr, 1), ("ema_weight", ew, n_emas)))
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    scalars = _sgd_scalars(0.0, momentum, dampening, weight_decay, nesterov, maximize,
                           first_step, _NO_WEIGHTS, has_scale)
    scalars.update(sc_ptr=lr, ew_ptr=ew)
    _launch_step(what, _sgd_flat_kernel, _sgd_list_kernel,
                 [params, grads, momentum_buffers] + z_roles,
                 device, (grad_scale, found_inf), scalars,
                 (stochastic_rounding, sr_seed, sr_step, sr_offsets),
                 N_EMAS=n_emas, HAS_MOMENTUM=has_momentum, TRUST=False, DEVICE_SCALARS=True)


def ema_only(params: List[Tensor], emas: List[Tensor], ema_weight: float) -> None:
    """ζ_k += w_k (θ − ζ_k) for parameters that took no optimizer step but whose EMA clock
    ticked (and WithEMA's EMAs after any optimizer's step): θ read once for all its EMAs, one
    list launch per parameter dtype (misaligned tensors flat, as every op)."""
    if not params:
        return
    z_roles, ws, n_emas = _ema_roles("ema_only", emas, ema_weight, len(params))
    if n_emas == 0:
        raise ValueError("ema_only: ema_weight is None; give one weight per EMA list")
    device = _check_lists("ema_only", params, params,
                          [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in
                           enumerate(z_roles)], None, None)
    _launch(_ema_flat_kernel, _ema_list_kernel, [params] + z_roles, device, (), ws,
            dict(N_EMAS=n_emas, BLOCK=config.BLOCK))


def sr_round(x: Tensor, dtype: torch.dtype, seed: int, step: int, base: int = 0) -> Tensor:
    """float32 ``x`` rounded stochastically to ``dtype`` (bf16/fp16) by the kernels' code, with
    the bits of (seed, step, base + i): the tests compare it with the other backends."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    k0, k1 = _sr.key(seed, step)
    n = x.numel()
    if n:
        _sr_round_kernel[(triton.cdiv(n, config.BLOCK),)](x.contiguous(), out, n, base, _as_i32(k0),
                                                    _as_i32(k1), BLOCK=config.BLOCK)
    return out
