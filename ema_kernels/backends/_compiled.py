"""The backend interface (:mod:`ema_kernels.backends.reference`'s) over the compiled extension's
ops: one copy for the ``cpp`` and ``cuda`` backends, which differ only in where the ops run.

Each of those modules builds one :class:`CompiledBackend` from its name and its ``_ops_for``
(which checks the tensors and returns the ops namespace: ``torch.ops.ema_kernels_ext``, or the
emulation build's) and exports its methods as module functions, so ``hasattr(backend, op)`` and
the signatures are the reference's. Checking and packing the arguments for the ops is
:mod:`ema_kernels.backends._extension`'s job.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from . import _extension as _ext

Tensor = torch.Tensor
_Tensors = List[Tensor]
_MaybeTensors = Optional[List[Tensor]]
_MaybeTensor = Optional[Tensor]


class CompiledBackend:
    """The fused ops of one compiled backend (``name``: "cpp" or "cuda"), each a thin call of the
    extension's op on the namespace ``ops_for(params)`` returns. ``stochastic_rounding``,
    ``sr_seed``, ``sr_step`` and ``sr_offsets`` are the reference's (16-bit parameters only)."""

    def __init__(self, name: str, ops_for: Callable[[List[Tensor]], object]):
        self.name = name
        self._ops_for = ops_for

    def adam_ema(self, params: _Tensors, grads: _Tensors, exp_avgs: _Tensors,
                 exp_avg_sqs: _Tensors, max_exp_avg_sqs: _MaybeTensors, emas: _MaybeTensors, *,
                 lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 decoupled: bool, maximize: bool, step_size: float,
                 bias_correction2_sqrt: float, ema_weight: Optional[float],
                 grad_scale: _MaybeTensor = None, found_inf: _MaybeTensor = None,
                 stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
                 sr_offsets: Optional[List[int]] = None) -> None:
        """Adam / AdamW step followed by the EMA update, in one pass over memory."""
        ops = self._ops_for(params)
        if params:
            _ext.adam(ops, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas, lr,
                      beta1, beta2, eps, weight_decay, decoupled, maximize, step_size,
                      bias_correction2_sqrt, ema_weight, grad_scale, found_inf,
                      (stochastic_rounding, sr_seed, sr_step, sr_offsets))

    def sgd_ema(self, params: _Tensors, grads: _Tensors, momentum_buffers: _MaybeTensors,
                emas: _MaybeTensors, *, lr: float, momentum: float, dampening: float,
                weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
                ema_weight: Optional[float], grad_scale: _MaybeTensor = None,
                found_inf: _MaybeTensor = None, stochastic_rounding: bool = False,
                sr_seed: int = 0, sr_step: int = 0,
                sr_offsets: Optional[List[int]] = None) -> None:
        """SGD step followed by the EMA update, in one pass over memory."""
        ops = self._ops_for(params)
        if params:
            _ext.sgd(self.name, ops, params, grads, momentum_buffers, emas, lr, momentum,
                     dampening, weight_decay, nesterov, maximize, first_step, ema_weight,
                     grad_scale, found_inf, (stochastic_rounding, sr_seed, sr_step, sr_offsets))

    def ema_only(self, params: _Tensors, emas: _Tensors, ema_weight: float) -> None:
        """ζ += w (θ − ζ) for parameters that took no optimizer step but whose EMA clock
        ticked."""
        ops = self._ops_for(params)
        if params:
            _ext.ema_only(ops, params, emas, ema_weight)

    def adam_ema_capturable(self, params: _Tensors, grads: _Tensors, exp_avgs: _Tensors,
                            exp_avg_sqs: _Tensors, max_exp_avg_sqs: _MaybeTensors,
                            emas: _MaybeTensors, *, lr: Tensor, step: Tensor, beta1: float,
                            beta2: float, eps: float, weight_decay: float, decoupled: bool,
                            maximize: bool, ema_weight: _MaybeTensor,
                            grad_scale: _MaybeTensor = None, found_inf: _MaybeTensor = None,
                            stochastic_rounding: bool = False, sr_seed: int = 0,
                            sr_step: int = 0, sr_offsets: Optional[List[int]] = None) -> None:
        """Capturable Adam/AdamW + EMA: ``lr``, ``step`` (t, already incremented) and
        ``ema_weight`` (1 − ρ̂ per EMA, or None for no EMA update) are float32 tensors on the
        parameters' device, read by the kernel."""
        ops = self._ops_for(params)
        if params:
            _ext.adam_capturable(ops, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                 emas, lr, step, beta1, beta2, eps, weight_decay, decoupled,
                                 maximize, ema_weight, grad_scale, found_inf,
                                 (stochastic_rounding, sr_seed, sr_step, sr_offsets))

    def sgd_ema_capturable(self, params: _Tensors, grads: _Tensors,
                           momentum_buffers: _MaybeTensors, emas: _MaybeTensors, *, lr: Tensor,
                           momentum: float, dampening: float, weight_decay: float,
                           nesterov: bool, maximize: bool, first_step: bool,
                           ema_weight: _MaybeTensor, grad_scale: _MaybeTensor = None,
                           found_inf: _MaybeTensor = None, stochastic_rounding: bool = False,
                           sr_seed: int = 0, sr_step: int = 0,
                           sr_offsets: Optional[List[int]] = None) -> None:
        """Capturable SGD + EMA: ``lr`` and ``ema_weight`` are float32 tensors on the parameters'
        device, read by the kernel."""
        ops = self._ops_for(params)
        if params:
            _ext.sgd_capturable(self.name, ops, params, grads, momentum_buffers, emas, lr,
                                momentum, dampening, weight_decay, nesterov, maximize,
                                first_step, ema_weight, grad_scale, found_inf,
                                (stochastic_rounding, sr_seed, sr_step, sr_offsets))

    def lion_ema(self, params: _Tensors, grads: _Tensors, exp_avgs: _Tensors, emas, *, lr,
                 beta1: float, beta2: float, weight_decay: float, maximize: bool, ema_weight,
                 grad_scale: _MaybeTensor = None, found_inf: _MaybeTensor = None,
                 stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
                 sr_offsets: Optional[List[int]] = None) -> None:
        """Lion + EMA in one pass (issue 25). ``lr`` a number, or a one-element float32 tensor
        read by the kernel (then ``ema_weight`` is a float32 tensor with one element per EMA, or
        None)."""
        ops = self._ops_for(params)
        if params:
            _ext.lion(ops, params, grads, exp_avgs, emas, lr, beta1, beta2, weight_decay,
                      maximize, ema_weight, grad_scale, found_inf,
                      (stochastic_rounding, sr_seed, sr_step, sr_offsets))

    def lars_ema(self, params: _Tensors, grads: _Tensors, momentum_buffers: _MaybeTensors, emas,
                 *, coefs: Tensor, lr, momentum: float, dampening: float, nesterov: bool,
                 maximize: bool, first_step: bool, ema_weight, grad_scale: _MaybeTensor = None,
                 found_inf: _MaybeTensor = None, stochastic_rounding: bool = False,
                 sr_seed: int = 0, sr_step: int = 0,
                 sr_offsets: Optional[List[int]] = None) -> None:
        """LARS + EMA in one pass (issue 25): per tensor ``d = ratio·(g + λθ)`` from ``coefs``
        (n, 2), then SGD's momentum. ``lr`` a number, or a one-element float32 tensor read by the
        kernel (then ``ema_weight`` is a float32 tensor with one element per EMA, or None)."""
        ops = self._ops_for(params)
        if params:
            _ext.lars(ops, params, grads, momentum_buffers, emas, coefs, lr, momentum, dampening,
                      nesterov, maximize, first_step, ema_weight, grad_scale, found_inf,
                      (stochastic_rounding, sr_seed, sr_step, sr_offsets))

    def lamb_moments(self, params: _Tensors, grads: _Tensors, exp_avgs: _Tensors,
                     exp_avg_sqs: _Tensors, *, beta1: float, beta2: float, eps: float,
                     weight_decay: float, maximize: bool, bias_correction1,
                     bias_correction2_sqrt, grad_scale: _MaybeTensor = None,
                     found_inf: _MaybeTensor = None) -> Tensor:
        """LAMB's first pass (issue 25): m, v updated; returns the (n, 2) float32 per-tensor
        (Σθ², Σr²), accumulated in float64. A skipped step (found_inf) moves nothing and returns
        zeros (the second pass then moves nothing either)."""
        ops = self._ops_for(params)
        if not params:
            return torch.zeros(0, 2)
        return _ext.lamb_moments(ops, params, grads, exp_avgs, exp_avg_sqs, beta1, beta2, eps,
                                 weight_decay, maximize, bias_correction1, bias_correction2_sqrt,
                                 grad_scale, found_inf)

    def lamb_ema(self, params: _Tensors, exp_avgs: _Tensors, exp_avg_sqs: _Tensors, emas, *,
                 step_sizes: Tensor, eps: float, weight_decay: float, bias_correction1,
                 bias_correction2_sqrt, ema_weight, found_inf: _MaybeTensor = None,
                 stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
                 sr_offsets: Optional[List[int]] = None) -> None:
        """LAMB's second pass (issue 25): ``θ -= step_sizes[i]·r``, r recomputed bit for bit
        from the stored moments, then the EMAs. ``ema_weight`` numbers, or a float32 tensor."""
        ops = self._ops_for(params)
        if params:
            _ext.lamb_ema(ops, params, exp_avgs, exp_avg_sqs, emas, step_sizes, eps,
                          weight_decay, bias_correction1, bias_correction2_sqrt, ema_weight,
                          found_inf, (stochastic_rounding, sr_seed, sr_step, sr_offsets))
