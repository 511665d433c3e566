"""Where the rows are built: each row name -> a builder ``(case) -> (fn, keepalive)``, ``fn()``
running ``case.ema_every`` optimizer steps and one EMA update (the peers' rows are in
:mod:`ema_kernels.bench.peers`, the LARS/LAMB/Lion baselines' math in
:mod:`ema_kernels.bench.foreach_rules`), and which rows a run has (:func:`row_names`)."""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, List

import torch

from . import foreach_rules, peers
from .cases import (BASELINE, CLIP_BASELINE, CLIP_MAX_NORM, COPY, COPY_D2D, OPTIMIZERS, RULES,
                    RULE_BASELINE, WITH_EMA, Case, _ek_optimizer, _every, _foreach_lerp_emas,
                    _make_params, _Model, _torch_hparams, _torch_optimizer)


def _row_ek(backend: str, flatten: bool = False, sr: bool = False):
    def build(case: Case):
        params = _make_params(case)
        opt = _ek_optimizer(case, params, backend, flatten, sr)
        # ema_every is the optimizer's own: k calls of step() cover one EMA period.
        k = case.ema_every
        step = opt.step
        if case.clip:
            def step():
                opt.clip_grad_norm_(CLIP_MAX_NORM)  # applied inside the next step's pass
                opt.step()
        return _every(k, step, lambda: None), (opt, params)
    return build


def _row_fused_lerp(case: Case):
    params = _make_params(case)
    opt = _torch_optimizer(case, params, fused=True)
    ema, emas = _foreach_lerp_emas(case, params)
    return _every(case.ema_every, opt.step, ema), (opt, params, emas)


def _row_with_ema(case: Case):
    """``ek.WithEMA`` around ``torch.optim.X(fused=True)``: torch's fused step, then one
    EMA-only launch over every parameter (fp32: θ read, ζ read and written, 12 B per parameter
    per EMA; the same bytes as ``_foreach_lerp_``, in one launch and one θ read for all EMAs)."""
    import ema_kernels as ek

    params = _make_params(case)
    decay = case.decays[0] if case.emas == 1 else case.decays
    opt = ek.WithEMA(_torch_optimizer(case, params, fused=True), ema_decay=decay,
                     ema_every=case.ema_every)
    return _every(case.ema_every, opt.step, lambda: None), (opt, params)


def _row_fused_clip_lerp(case: Case):
    """torch.nn.utils.clip_grad_norm_ + fused optimizer + _foreach_lerp_ (the ``--clip``
    baseline; the norm and the clip are two passes over the gradients, as torch runs them)."""
    params = _make_params(case)
    opt = _torch_optimizer(case, params, fused=True)
    ema, emas = _foreach_lerp_emas(case, params)

    def step():
        torch.nn.utils.clip_grad_norm_(params, CLIP_MAX_NORM)
        opt.step()

    return _every(case.ema_every, step, ema), (opt, params, emas)


def _row_foreach_rule(case: Case):
    """LARS/LAMB/Lion written in torch's foreach ops (:mod:`ema_kernels.bench.foreach_rules`) +
    ``_foreach_lerp_`` per EMA: the baseline of those optimizers (torch ships none of them)."""
    params = _make_params(case)
    grads = [p.grad for p in params]
    hp = _torch_hparams(case)
    zs_all = [[p.detach().float().clone() for p in params] for _ in case.decays]
    state = [[torch.zeros_like(p, dtype=torch.float32) for p in params]
             for _ in range(2 if case.optimizer == "lamb" else 1)]
    ps = [p.detach() for p in params]
    if case.torch_dtype != torch.float32:
        raise ValueError(f"row {RULE_BASELINE!r} runs fp32 parameters (its state is kept in "
                         f"the parameters' dtype by torch's foreach ops)")
    counter = [0]

    def step():
        counter[0] += 1
        if case.optimizer == "lars":
            foreach_rules.lars_step(ps, grads, state[0], lr=hp["lr"], momentum=hp["momentum"],
                                    weight_decay=hp["weight_decay"],
                                    trust_coefficient=hp["trust_coefficient"], eps=hp["eps"])
        elif case.optimizer == "lamb":
            foreach_rules.lamb_step(ps, grads, state[0], state[1], lr=hp["lr"], beta1=0.9,
                                    beta2=0.999, eps=1e-6, weight_decay=hp["weight_decay"],
                                    step=counter[0])
        else:
            foreach_rules.lion_step(ps, grads, state[0], lr=hp["lr"], beta1=0.9, beta2=0.99,
                                    weight_decay=hp["weight_decay"])

    def ema():
        for zs, d in zip(zs_all, case.decays):
            torch._foreach_lerp_(zs, ps, 1.0 - d)

    return _every(case.ema_every, step, ema), (params, zs_all, state)


def _row_averaged_model(case: Case):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    params = _make_params(case)
    model = _Model(params)
    avgs = [AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d ** case.ema_every))
            for d in case.decays]
    for avg in avgs:
        avg.update_parameters(model)  # the first call copies; every later one averages
    opt = _torch_optimizer(case, params, fused=True)

    def ema():
        for avg in avgs:
            avg.update_parameters(model)

    return _every(case.ema_every, opt.step, ema), (opt, model, avgs)


def _row_copy(case: Case):
    """In-place ``a += b``, fp32, moving as many bytes as the step must (read a, b; write a)."""
    n = max(1, math.ceil(case.bytes_per_param * case.numel / 12))
    a = torch.zeros(n, device=case.device)
    b = torch.randn(n, device=case.device)
    return (lambda: a.add_(b)), (a, b)


def _row_copy_d2d(case: Case):
    """``dst.copy_(src)``, fp32, moving as many bytes as the step must (read src, write dst: 8 B
    per element): the device-to-device copy bandwidth, the usual yardstick on a GPU (on a CPU
    the destination's write-allocate read makes it move 12 B for the 8 it is credited with)."""
    n = max(1, math.ceil(case.bytes_per_param * case.numel / 8))
    src = torch.randn(n, device=case.device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), (src, dst)


# Rows run by default on a GPU only (by name with --rows anywhere): the copy a GPU's numbers
# are usually quoted against.
GPU_ROWS: Dict[str, Callable] = {
    COPY_D2D: _row_copy_d2d,
}

# name -> builder(case) -> (callable doing ema_every steps, objects to keep alive).
# The ek rows are generated from ema_kernels.available_backends(); a baseline is one line here.
BASELINES: Dict[str, Callable] = {
    BASELINE: _row_fused_lerp,
    WITH_EMA: _row_with_ema,
    "torch fused + AveragedModel": _row_averaged_model,
    **peers.PEERS,
    peers.COMPILED: peers.compiled_foreach_lerp,
}
COMPILED = peers.COMPILED


def ek_backends(device: str) -> List[str]:
    """ema_kernels backends benchmarked on ``device``: every available one, except the Triton
    interpreter on CPU (``TRITON_INTERPRET=1`` makes it available there, as a test vehicle)."""
    import ema_kernels as ek

    names = ek.available_backends(device)
    if torch.device(device).type == "cpu":
        names = [n for n in names if n != "triton"]
    return names


def row_names(device: str, clip: bool = False, stochastic_rounding: bool = False,
              compile: bool = True, optimizer: str = "adamw") -> List[str]:
    """Every row of a run on ``device``, in table order (``clip``: the ``--clip`` rows;
    ``compile=False``: without the torch.compile row, whose first call compiles for seconds).
    ``stochastic_rounding``: each ek row also with ``stochastic_rounding=True`` (``ek[b,sr]``,
    ``ek[b,flat,sr]``) next to it; it changes nothing for fp32 parameters, so it is meant for
    ``--dtype bf16/fp16``. LARS/LAMB/Lion (``optimizer``): the ek rows of the backends that
    have their kernels, then :data:`RULE_BASELINE` and the stream."""
    names = []
    backends = ek_backends(device)
    if optimizer in RULES:
        if clip:
            raise ValueError(f"--clip has baselines for {OPTIMIZERS[:3]} only (torch's fused "
                             f"optimizers), not {optimizer!r}")
        from .. import _ops
        op = f"{optimizer}_ema"
        backends = [b for b in backends if hasattr(_ops.resolve(b, device), op)]
    for b in backends:
        for row in (f"ek[{b}]", f"ek[{b},flat]"):  # default layout, then flatten=True
            names.append(row)
            if stochastic_rounding:
                names.append(row[:-1] + ",sr]")
    if clip:
        return names + [CLIP_BASELINE, COPY]
    if optimizer in RULES:
        return names + [RULE_BASELINE, COPY]
    gpu = torch.device(device).type == "cuda"
    return names + [b for b in BASELINES if compile or b != COMPILED] + [COPY] + \
        [n for n in GPU_ROWS if gpu]


def known_row_names(device: str, clip: bool = False, optimizer: str = "adamw") -> List[str]:
    """What ``--rows`` accepts: :func:`row_names` plus the GPU rows on any device."""
    names = row_names(device, clip=clip, optimizer=optimizer)
    return names + [n for n in GPU_ROWS if n not in names and not clip]


def build_row(name: str, case: Case):
    """``(fn, keepalive)`` for row ``name``: ``fn()`` runs ``case.ema_every`` steps + one EMA."""
    m = re.fullmatch(r"ek\[(\w+)(,flat)?(,sr)?\]", name)
    if m:
        return _row_ek(m.group(1), flatten=m.group(2) is not None,
                       sr=m.group(3) is not None)(case)
    if name == COPY:
        fn, keep = _row_copy(case)
        return fn, keep
    if name == RULE_BASELINE:
        return _row_foreach_rule(case)
    if name == COPY_D2D:
        return _row_copy_d2d(case)
    if name == CLIP_BASELINE:
        if not case.clip:
            raise ValueError(f"row {CLIP_BASELINE!r} needs a Case with clip=True (--clip)")
        return _row_fused_clip_lerp(case)
    if case.clip:
        raise ValueError(f"row {name!r} has no clipping variant; with --clip the rows are "
                         f"{row_names(case.device, clip=True)}")
    if name in GPU_ROWS:
        return GPU_ROWS[name](case)
    return BASELINES[name](case)


def calls_per_fn(name: str, case: Case) -> int:
    """Optimizer steps one call of the row's ``fn`` covers (the stream op counts as one)."""
    return 1 if name in (COPY, COPY_D2D) else case.ema_every

