"""Reference backend: the fused optimizer + EMA update in plain torch.

This is the CPU fallback and the oracle every kernel is tested against, so it is written to be
read: one function per update, the math in float32 whatever the storage dtype, in the same order
as torch.optim's single-tensor implementations (so fp32 results match torch.optim closely).

Two paths run the same ops, element for element, with the same bits on CPU:

- CPU tensors: a loop over tensors and 64K-element chunks through small reusable scratch
  buffers (the code below). A chunk's working set stays cache-sized, and a step allocates
  nothing proportional to the model (only a fixed scratch on the first step).
- Other devices (CUDA, the ``auto`` choice there without the extension and without Triton):
  each op on whole tensor lists, in torch's ``_foreach_*`` ops
  (:mod:`ema_kernels.backends._reference_foreach`), because there every op is a kernel launch
  and the chunked loop's count grows with numel (~17K launches per step at 125M parameters).
  The number of ops per step is independent of numel (O(1) per list; per-tensor ops only where
  torch has no foreach op: found_inf's ``torch.where``, stochastic rounding's hash, device-scalar
  lerp/addcmul weights). Transient memory is like torch.optim's foreach AdamW: temporaries the
  size of the parameter list (up to 3 compute-dtype elements per parameter), freed after the
  step; see that module's docstring.

:func:`_use_foreach` picks the path by device; :func:`_force_path` overrides it (tests).

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
- ``stochastic_rounding`` (with ``sr_seed``, ``sr_step`` and ``sr_offsets``): bf16/fp16
  parameters are rounded stochastically (unbiased) instead of to nearest, from random bits that
  are a pure function of (``sr_seed``, ``sr_step``, element index); element j of ``params[i]``
  has index ``sr_offsets[i] + j`` (default: the list's flat layout,
  :func:`ema_kernels.backends._sr.flat_offsets`). fp32 parameters ignore it. See
  :mod:`ema_kernels.backends._sr` and csrc/fused_math.h.
- ``grad_scale`` (divide gradients by it) and ``found_inf`` (non-zero: change nothing) are
  optional one-element float32 tensors on the parameters' device (torch.amp.GradScaler's
  contract). Gradients are never written. ``found_inf`` is never read on the host: it picks,
  on the device, weights that leave every tensor unchanged (:class:`_Skip`).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional

import torch

from . import _reference_foreach, _sr
from ._emas import ema_lists, ema_lists_capturable

Tensor = torch.Tensor

NAME = "reference"

# Work in chunks through small reusable float32 scratch buffers: the update then allocates
# nothing proportional to the model, and a chunk's working set stays cache-sized.
_CHUNK = 1 << 16
_scratch: dict = {}

# None: the path follows the device (_use_foreach); "foreach" / "chunked": forced, whatever
# the device (the tests run the foreach path on CPU tensors to compare it with the chunked one).
_forced: Optional[str] = None


def _use_foreach(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the ``_foreach_*`` path
    (:mod:`ema_kernels.backends._reference_foreach`) rather than the chunked loop.

    Off the CPU (CUDA) every torch op is a kernel launch, and the chunked loop's ~9 kernels per
    64K-element chunk would cost ~17K launches per step at 125M parameters; the foreach path
    issues a number of ops independent of numel, for temporaries the size of the parameter list.
    On CPU ops cost no launch: the chunked loop stays cache-sized and allocates nothing
    proportional to the model (tests/test_memory.py), and it is the oracle."""
    if _forced is not None:
        return _forced == "foreach"
    return device.type != "cpu"


@contextlib.contextmanager
def _force_path(path: Optional[str]):
    """Within the block every update takes ``path`` (``"foreach"`` or ``"chunked"``) whatever
    the device; ``None``: by device. Not thread-safe (a test switch)."""
    global _forced
    if path not in (None, "foreach", "chunked"):
        raise ValueError(f"path must be 'foreach', 'chunked' or None, not {path!r}")
    saved, _forced = _forced, path
    try:
        yield
    finally:
        _forced = saved


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


class _Skip:
    """found_inf consumed on the device: the step still runs, with neutral values.

    No host read (the reference runs on CUDA too, and ``step()`` never synchronises): where
    ``found_inf != 0`` the gradient is replaced by zeros and every weight that would move a
    tensor by one that leaves it bit for bit unchanged (lerp weight 0, multiplier 1), chosen on
    the device with ``torch.where``. Where ``found_inf == 0`` the values are exactly the
    scalars the plain path passes, so both paths round identically."""

    def __init__(self, found_inf: Tensor, device: torch.device, cdt: torch.dtype):
        self.flag = found_inf.to(device=device).reshape(()) != 0
        self.cdt = cdt
        self.zero = torch.zeros((), device=device, dtype=cdt)

    def value(self, when_applied, when_skipped: float) -> Tensor:
        # float32 rounding of the host double (or device scalar), as the plain path's ops
        # round it
        dev = self.flag.device
        applied = _device_scalar(when_applied, self.cdt, dev)
        return torch.where(self.flag, torch.full((), when_skipped, dtype=self.cdt, device=dev),
                           applied)

    def zeroed(self, t: Tensor, out: Tensor) -> Tensor:
        return torch.where(self.flag, self.zero, t, out=out)


def _device_scalar(x, dtype, device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=dtype).reshape(())
    return torch.full((), x, dtype=dtype, device=device)


def _skipper(found_inf: Optional[Tensor], params: List[Tensor]):
    if found_inf is None or not params:
        return None
    return _Skip(found_inf, params[0].device, _compute_dtype(params[0].dtype))


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
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """Adam / AdamW step followed by the EMA update(s) (see the module docstring)."""
    z_lists, weights = ema_lists(emas, ema_weight, len(params), "adam_ema")
    sr = _sr_plan("adam_ema", params, stochastic_rounding, sr_seed, sr_step, sr_offsets)
    skip = _skipper(found_inf, params)
    if skip is not None:  # device-chosen weights (see _Skip); the plain floats otherwise
        w_m = skip.value(1 - beta1, 0.0)
        w_v = skip.value(beta2, 1.0)
        w_decay = skip.value(1 - lr * weight_decay, 1.0) if weight_decay != 0 else 1.0
        w_zs = [skip.value(w, 0.0) for w in weights]
    else:
        w_m, w_v, w_decay, w_zs = 1 - beta1, beta2, 1 - lr * weight_decay, weights
    if isinstance(w_decay, Tensor) and params:
        w_decay = w_decay.to(dtype=_compute_dtype(params[0].dtype))
    neg_step = -step_size.to(_compute_dtype(params[0].dtype)) \
        if isinstance(step_size, Tensor) and params else None
    if params and _use_foreach(params[0].device):  # the same ops on whole lists
        _reference_foreach.adam_ema(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, z_lists,
            cdt=_compute_dtype(params[0].dtype), beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled=decoupled, maximize=maximize,
            step_size=step_size, neg_step=neg_step, bias_correction2_sqrt=bias_correction2_sqrt,
            w_m=w_m, w_v=w_v, w_decay=w_decay, w_zs=w_zs, grad_scale=grad_scale, skip=skip,
            sr=sr)
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
            g = _load_grad(g_flat[a:b], t_g, grad_scale, maximize,
                           need_copy=l2 or skip is not None)
            theta = p if p.dtype == cdt else t_p.copy_(p)
            if weight_decay != 0:
                if decoupled:
                    theta.mul_(w_decay)
                else:
                    g.add_(theta, alpha=weight_decay)
            if skip is not None:
                g = skip.zeroed(g, out=t_g)  # a skipped step's gradient: zeros (may be inf)
            m.lerp_(g, w_m)
            v.mul_(w_v).addcmul_(g, g, value=1 - beta2)
            if vmax_flat is not None:
                vmax = vmax_flat[a:b]
                if skip is None:
                    torch.maximum(vmax, v, out=vmax)
                else:  # kept on a skip even if a loaded state had vmax < v somewhere
                    torch.where(skip.flag, vmax, torch.maximum(vmax, v, out=t_d), out=vmax)
                torch.sqrt(vmax, out=t_d)
            else:
                torch.sqrt(v, out=t_d)
            t_d.div_(bias_correction2_sqrt).add_(eps)
            # the update's numerator: m, or zeros on a skip (g is no longer needed)
            num = m if skip is None else skip.zeroed(m, out=t_g)
            if isinstance(step_size, Tensor):  # device lr: the same three roundings
                theta.add_(torch.mul(num, neg_step, out=t_g).div_(t_d))
            else:
                theta.addcdiv_(num, t_d, value=-step_size)
            _store_and_average(p, theta, z_flats, a, b, w_zs, sr and (sr[0], sr[1][i] + a))


def sgd_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
            emas: Optional[List[Tensor]], *, lr: float, momentum: float, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
            ema_weight: Optional[float], grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
            sr_seed: int = 0, sr_step: int = 0, sr_offsets: Optional[List[int]] = None) -> None:
    """SGD (momentum, dampening, Nesterov, weight decay) step followed by the EMA update.

    ``first_step``: the momentum buffers hold nothing yet and are initialised to the first
    gradient (no dampening), as torch.optim.SGD does.
    """
    z_lists, weights = ema_lists(emas, ema_weight, len(params), "sgd_ema")
    sr = _sr_plan("sgd_ema", params, stochastic_rounding, sr_seed, sr_step, sr_offsets)
    skip = _skipper(found_inf, params)
    if skip is not None:
        w_mom = skip.value(momentum, 1.0)
        w_zs = [skip.value(w, 0.0) for w in weights]
    else:
        w_mom, w_zs = momentum, weights
    neg_lr = -lr.to(_compute_dtype(params[0].dtype)).reshape(()) \
        if isinstance(lr, Tensor) and params else None
    if params and _use_foreach(params[0].device):  # the same ops on whole lists
        _reference_foreach.sgd_ema(
            params, grads, momentum_buffers if momentum != 0 else None, z_lists,
            cdt=_compute_dtype(params[0].dtype), lr=lr, neg_lr=neg_lr, momentum=momentum,
            dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, first_step=first_step, w_mom=w_mom, w_zs=w_zs,
            grad_scale=grad_scale, skip=skip, sr=sr)
        return
    for i, (p_all, g_all) in enumerate(zip(params, grads)):
        p_flat, g_flat = p_all.view(-1), g_all.view(-1)
        buf_flat = momentum_buffers[i].view(-1) if momentum != 0 else None
        z_flats = [zs[i].view(-1) for zs in z_lists]
        cdt = _compute_dtype(p_flat.dtype)
        for a, b in _chunks(p_flat.numel()):
            p = p_flat[a:b]
            t_g, t_p, t_d = _scratch_buffers(p.device, cdt, b - a)
            d = _load_grad(g_flat[a:b], t_g, grad_scale, maximize,
                           need_copy=weight_decay != 0 or skip is not None)
            theta = p if p.dtype == cdt else t_p.copy_(p)
            if weight_decay != 0:
                d.add_(theta, alpha=weight_decay)
            if skip is not None:
                d = skip.zeroed(d, out=t_g)  # a skipped step's gradient: zeros (may be inf)
            if buf_flat is not None:
                buf = buf_flat[a:b]
                if first_step:
                    if skip is None:
                        buf.copy_(d)
                    else:
                        torch.where(skip.flag, buf, d, out=buf)
                else:
                    buf.mul_(w_mom).add_(d, alpha=1 - dampening)
                if nesterov:
                    d = torch.add(d, buf, alpha=momentum, out=t_d)
                else:
                    d = buf
            if skip is not None:
                d = skip.zeroed(d, out=t_d)  # never buf itself: it keeps its value
            if isinstance(lr, Tensor):  # device lr
                theta.addcmul_(d, neg_lr)
            else:
                theta.add_(d, alpha=-lr)
            _store_and_average(p, theta, z_flats, a, b, w_zs, sr and (sr[0], sr[1][i] + a))


def _sr_plan(what, params, on, seed, step, offsets):
    """``(key, per-tensor element-index bases)`` for stochastic rounding, or None (off, or
    fp32/fp64 parameters, which are stored exactly)."""
    if not on or not params:
        return None
    _sr.check_args(what, len(params), seed, step, offsets)
    if params[0].dtype not in (torch.bfloat16, torch.float16):
        return None
    if offsets is None:
        offsets = _sr.flat_offsets([p.numel() for p in params])
    return _sr.key(seed, step), list(offsets)


def _store_and_average(p, theta, z_flats, a, b, weights, sr=None):
    """Write θ back in its storage dtype, then move every ζ_i towards θ *as stored* (the
    chunk of θ is read once, from the scratch buffer, for all of them).

    ``sr``: ``(key, index of the chunk's first element)`` for stochastic rounding."""
    if theta is not p:
        if sr is None:
            p.copy_(theta)  # round to nearest even for bf16/fp16
        else:
            idx = torch.arange(sr[1], sr[1] + (b - a), dtype=torch.int64, device=p.device)
            p.copy_(_sr.round_to(p.dtype, theta, _sr.bits(sr[0], idx)))
        theta.copy_(p)
    for z_flat, w in zip(z_flats, weights):
        z_flat[a:b].lerp_(theta, w)


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
    from one-element tensors on the device: the bias corrections formed there in double, as
    the compiled kernels form them (fused_math.h, adam_step_values)."""
    if not params:
        return
    lr64 = lr.detach().reshape(()).double()
    t = step.detach().reshape(()).double()
    step_size = lr64 / (1.0 - beta1 ** t)
    bc2_sqrt = torch.sqrt(1.0 - beta2 ** t).to(_compute_dtype(params[0].dtype))
    lists, weights = _capturable_emas(emas, ema_weight, len(params), "adam_ema_capturable")
    adam_ema(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lists, lr=lr64,
             beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
             maximize=maximize, step_size=step_size, bias_correction2_sqrt=bc2_sqrt,
             ema_weight=weights, grad_scale=grad_scale, found_inf=found_inf,
             stochastic_rounding=stochastic_rounding, sr_seed=sr_seed, sr_step=sr_step,
             sr_offsets=sr_offsets)


def sgd_ema_capturable(params: List[Tensor], grads: List[Tensor],
                       momentum_buffers: Optional[List[Tensor]], emas: Optional[List[Tensor]], *,
                       lr: Tensor, momentum: float, dampening: float, weight_decay: float,
                       nesterov: bool, maximize: bool, first_step: bool,
                       ema_weight: Optional[Tensor], grad_scale: Optional[Tensor] = None,
                       found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
                       sr_seed: int = 0, sr_step: int = 0,
                       sr_offsets: Optional[List[int]] = None) -> None:
    """SGD + EMA reading ``lr`` and ``ema_weight`` from tensors on the device."""
    lists, weights = _capturable_emas(emas, ema_weight, len(params), "sgd_ema_capturable")
    sgd_ema(params, grads, momentum_buffers, lists, lr=lr.detach().reshape(()),
            momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, first_step=first_step, ema_weight=weights,
            grad_scale=grad_scale, found_inf=found_inf, stochastic_rounding=stochastic_rounding,
            sr_seed=sr_seed, sr_step=sr_step, sr_offsets=sr_offsets)


def _capturable_emas(emas, ema_weight, n, what):
    """``(EMA lists, weights)`` of a capturable call: the weight tensor holds one element per
    EMA; each is passed on as a 0-d device tensor (never read on the host)."""
    lists, w = ema_lists_capturable(emas, ema_weight, n, what)
    if w is None:
        return None, None
    return lists, [w.detach().reshape(-1)[k] for k in range(len(lists))]


def ema_only(params: List[Tensor], emas, ema_weight) -> None:
    """ζ_i += w_i (θ − ζ_i) for parameters that took no optimizer step but whose EMA clock
    ticked (one EMA list and weight, or several: see the module docstring)."""
    z_lists, weights = ema_lists(emas, ema_weight, len(params), "ema_only")
    if params and _use_foreach(params[0].device):
        _reference_foreach.ema_only(params, z_lists, weights)
        return
    for i, p in enumerate(params):
        for zs, w in zip(z_lists, weights):
            z = zs[i]
            z.lerp_(p.to(z.dtype), w)


# LARS, LAMB and Lion (issue 25): their reference math lives in its own file.
from ._reference_rules import lamb_ema, lamb_moments, lars_ema, lion_ema  # noqa: E402,F401
