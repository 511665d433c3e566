"""CPU backend: the compiled extension's CPU twin of the CUDA kernels (csrc/fused_cpu.cpp).

Same ``fused_math.h`` as the CUDA kernels, OpenMP over cache-sized chunks, a vectorised loop
(an AVX2 variant picked at run time where the CPU has it).  Interface: that of
:mod:`ema_kernels.backends.reference`, plus ``ema_only`` and the capturable variants (which read
``lr``/``step``/``ema_weight`` from one-element CPU tensors: the CPU path of the CUDA-graph-friendly
kernels, useful to test their math without a GPU).  Importing this module loads nothing; the
extension is loaded on first use or on ``availability()`` (by
:mod:`ema_kernels.backends._extension`, shared with the ``cuda`` backend).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from . import _extension as _ext

Tensor = torch.Tensor

NAME = "cpp"

_avail_cache: Dict[str, Tuple[bool, str]] = {}


def availability(device_type: str) -> Tuple[bool, str]:
    """``(ok, reason)`` for running the ``cpp`` backend on ``device_type`` tensors."""
    if device_type != "cpu":
        return False, (f"the 'cpp' backend runs on CPU tensors only, not {device_type} tensors "
                       f"(on CUDA use 'cuda' or 'triton')")
    res = _avail_cache.get(device_type)
    if res is None:
        try:
            _ext.load_extension()
        except _ext.ExtensionUnavailable as e:
            res = (False, str(e))
        else:
            info = _ext.MAIN.info
            res = (True, f"compiled CPU kernels ({info.get('cpu_isa', '?')}"
                         f"{', OpenMP' if info.get('openmp') == '1' else ''})")
        _avail_cache[device_type] = res
    return res


def _ops_for(params: List[Tensor]):
    """The ops namespace after checking that this backend can run on these tensors."""
    ok, why = availability("cpu")
    if not ok:
        raise _ext.ExtensionUnavailable(f"backend 'cpp' cannot run: {why}")
    if params and params[0].device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on cpu tensors, but params[0] is on "
                         f"{params[0].device}")
    _ext.check_params(NAME, params)
    return torch.ops.ema_kernels_ext


def adam_ema(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
             exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
             emas: Optional[List[Tensor]], *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, decoupled: bool, maximize: bool, step_size: float,
             bias_correction2_sqrt: float, ema_weight: Optional[float],
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """Adam / AdamW step followed by the EMA update, in one pass over memory."""
    ops = _ops_for(params)
    if params:
        _ext.adam(ops, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas, lr, beta1,
                  beta2, eps, weight_decay, decoupled, maximize, step_size,
                  bias_correction2_sqrt, ema_weight, grad_scale, found_inf,
                  (stochastic_rounding, sr_seed, sr_step, sr_offsets))


def sgd_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
            emas: Optional[List[Tensor]], *, lr: float, momentum: float, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
            ema_weight: Optional[float], grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
            sr_seed: int = 0, sr_step: int = 0, sr_offsets: Optional[List[int]] = None) -> None:
    """SGD step followed by the EMA update, in one pass over memory."""
    ops = _ops_for(params)
    if params:
        _ext.sgd(NAME, ops, params, grads, momentum_buffers, emas, lr, momentum, dampening,
                 weight_decay, nesterov, maximize, first_step, ema_weight, grad_scale, found_inf,
                 (stochastic_rounding, sr_seed, sr_step, sr_offsets))


def ema_only(params: List[Tensor], emas: List[Tensor], ema_weight: float) -> None:
    """ζ += w (θ − ζ) for parameters that took no optimizer step but whose EMA clock ticked."""
    ops = _ops_for(params)
    if params:
        _ext.ema_only(ops, params, emas, ema_weight)


def adam_ema_capturable(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                        exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
                        emas: Optional[List[Tensor]], *, lr: Tensor, step: Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled: bool, maximize: bool, ema_weight: Optional[Tensor],
                        grad_scale: Optional[Tensor] = None,
                        found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
                        sr_seed: int = 0, sr_step: int = 0,
                        sr_offsets: Optional[List[int]] = None) -> None:
    """Adam/AdamW + EMA reading ``lr``, ``step`` (t, already incremented) and ``ema_weight``
    (1 − ρ̂, or None) from one-element float32 tensors (see the cuda backend)."""
    ops = _ops_for(params)
    if params:
        _ext.adam_capturable(ops, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas,
                             lr, step, beta1, beta2, eps, weight_decay, decoupled, maximize,
                             ema_weight, grad_scale, found_inf,
                             (stochastic_rounding, sr_seed, sr_step, sr_offsets))


def sgd_ema_capturable(params: List[Tensor], grads: List[Tensor],
                       momentum_buffers: Optional[List[Tensor]], emas: Optional[List[Tensor]], *,
                       lr: Tensor, momentum: float, dampening: float, weight_decay: float,
                       nesterov: bool, maximize: bool, first_step: bool,
                       ema_weight: Optional[Tensor], grad_scale: Optional[Tensor] = None,
                       found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
                       sr_seed: int = 0, sr_step: int = 0,
                       sr_offsets: Optional[List[int]] = None) -> None:
    """SGD + EMA reading ``lr`` and ``ema_weight`` from one-element float32 tensors."""
    ops = _ops_for(params)
    if params:
        _ext.sgd_capturable(NAME, ops, params, grads, momentum_buffers, emas, lr, momentum,
                            dampening, weight_decay, nesterov, maximize, first_step, ema_weight,
                            grad_scale, found_inf, (stochastic_rounding, sr_seed, sr_step,
                                                    sr_offsets))


def lion_ema(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], emas, *, lr,
             beta1: float, beta2: float, weight_decay: float, maximize: bool, ema_weight,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """Lion + EMA in one pass (issue 25; the reference's ``lion_ema`` interface). ``lr`` a
    number, or a one-element float32 tensor read by the kernel (then ``ema_weight`` is a float32
    tensor with one element per EMA, or None)."""
    ops = _ops_for(params)
    if params:
        _ext.lion(ops, params, grads, exp_avgs, emas, lr, beta1, beta2, weight_decay, maximize,
                  ema_weight, grad_scale, found_inf,
                  (stochastic_rounding, sr_seed, sr_step, sr_offsets))


def lars_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
             emas, *, coefs: Tensor, lr, momentum: float, dampening: float, nesterov: bool,
             maximize: bool, first_step: bool, ema_weight, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
             sr_seed: int = 0, sr_step: int = 0, sr_offsets: Optional[List[int]] = None) -> None:
    """LARS + EMA in one pass (issue 25; the reference's ``lars_ema`` interface): per tensor
    ``d = ratio·(g + λθ)`` from ``coefs`` (n, 2), then SGD's momentum. ``lr`` a number, or a
    one-element float32 tensor read by the kernel (then ``ema_weight`` is a float32 tensor with
    one element per EMA, or None)."""
    ops = _ops_for(params)
    if params:
        _ext.lars(ops, params, grads, momentum_buffers, emas, coefs, lr, momentum, dampening,
                  nesterov, maximize, first_step, ema_weight, grad_scale, found_inf,
                  (stochastic_rounding, sr_seed, sr_step, sr_offsets))


def lamb_moments(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                 exp_avg_sqs: List[Tensor], *, beta1: float, beta2: float, eps: float,
                 weight_decay: float, maximize: bool, bias_correction1, bias_correction2_sqrt,
                 grad_scale: Optional[Tensor] = None,
                 found_inf: Optional[Tensor] = None) -> Tensor:
    """LAMB's first pass (issue 25; the reference's interface): m, v updated; returns the
    (n, 2) float32 per-tensor (Σθ², Σr²), accumulated in float64. A skipped step (found_inf)
    moves nothing and returns zeros (the second pass then moves nothing either)."""
    ops = _ops_for(params)
    if not params:
        return torch.zeros(0, 2)
    return _ext.lamb_moments(ops, params, grads, exp_avgs, exp_avg_sqs, beta1, beta2, eps,
                             weight_decay, maximize, bias_correction1, bias_correction2_sqrt,
                             grad_scale, found_inf)


def lamb_ema(params: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor], emas, *,
             step_sizes: Tensor, eps: float, weight_decay: float, bias_correction1,
             bias_correction2_sqrt, ema_weight, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """LAMB's second pass (issue 25): ``θ -= step_sizes[i]·r``, r recomputed bit for bit from
    the stored moments, then the EMAs. ``ema_weight`` numbers, or a float32 device tensor."""
    ops = _ops_for(params)
    if params:
        _ext.lamb_ema(ops, params, exp_avgs, exp_avg_sqs, emas, step_sizes, eps, weight_decay,
                      bias_correction1, bias_correction2_sqrt, ema_weight, found_inf,
                      (stochastic_rounding, sr_seed, sr_step, sr_offsets))
