"""``python -m ema_kernels bench``: an optimizer step + an EMA update, ours against the peers.

Every row does the same job on the same parameters — one optimizer step and one EMA update
ζ ← ρζ + (1−ρ)θ (on every ``ema_every``-th step) over ``--tensors`` parameter tensors holding
``--numel`` elements in all — and is timed end to end (median of many steps after a warm-up):

- ``ek[<backend>]``: ``ema_kernels.AdamW/Adam/SGD(..., backend=<backend>)``, one row per backend
  in :func:`ema_kernels.available_backends` for the device (a backend that lands shows up by
  itself; the Triton *interpreter* on CPU is skipped, it is a test vehicle, not a fast path);
- ``torch fused + foreach_lerp``: ``torch.optim.X(fused=True)`` + ``torch._foreach_lerp_`` over
  prebuilt lists — the strongest unfused baseline; the ``speedup`` column is relative to it;

With ``--emas N`` every row keeps N EMAs (decays 0.9999, 0.999, ...): ``ek`` rows one optimizer
with an ``ema_decay`` tuple (all N updated in the step's one pass), the baselines N EMA updates
after the optimizer step (N ``_foreach_lerp_`` calls, N EMA objects of each package).
With ``--clip`` every step also clips the gradients' total norm (max_norm
:data:`CLIP_MAX_NORM`, active at every step): ``ek`` rows ``opt.clip_grad_norm_`` + ``step()``
(the norm reads g once, the coefficient is applied inside the step's pass: fp32 AdamW + EMA
40 B/param), against ``torch fused + clip_grad_norm_ + foreach_lerp``:
``torch.nn.utils.clip_grad_norm_`` (reads g, then reads and writes it) + fused AdamW +
``_foreach_lerp_`` (52 B/param, :func:`torch_clip_bytes_per_param`). In this mode every row's
GB/s is against its own byte count (the ``B/param`` column), and only those rows (and the
stream) run.
- the peers, the real packages imported and called as their users call them
  (:mod:`ema_kernels.bench_peers`; a row whose package is missing is reported, not timed):
  ``torch fused + AveragedModel`` (``torch.optim.swa_utils.AveragedModel`` with
  ``get_ema_multi_avg_fn``), ``torch foreach + timm ModelEmaV3``, ``torch fused + ema-pytorch
  EMA``, ``torch fused + diffusers EMAModel`` (``foreach=True``), and
  ``torch.compile(foreach step + foreach_lerp)`` (inductor's generated optimizer + the lerp;
  its first call compiles, in the untimed warm-up; ``--no-compile`` leaves it out);
- ``ek.WithEMA(torch fused)``: ``ek.WithEMA(torch.optim.X(fused=True))``: torch's fused step,
  then ema_kernels' EMA-only launch (what any torch optimizer gets from the wrapper);
- ``copy dst.copy_(src)`` (default on a GPU only; by name with ``--rows`` anywhere): a
  device-to-device copy of the same bytes (read src, write dst), the figure GPU bandwidth is
  usually quoted against;
- ``stream a+=b``: the copy bandwidth the rows are measured against: ``a.add_(b)`` over two
  contiguous fp32 buffers, in place, moving the *same number of bytes* as the step must (reads
  a and b, writes a: 12 B per element) — the device's streaming ceiling at that footprint,
  measured in the same run; ``pct_of_copy`` is a row's GB/s over this one's. Why not
  ``dst.copy_(src)``: on a CPU a copy's destination is read before it is written
  (write-allocate), so a copy moves 12 B for the 8 it is credited with, while in-place updates
  (the optimizer's θ m v ζ, and a += b) pay no such read; on a 2-core EPYC an in-place
  stream reached up to ~1.7x a copy's credited GB/s, so fused in-place steps would show
  "170 % of copy".

Bytes: ``bytes_per_param`` is what the fused step must move per parameter (see
:func:`bytes_per_param`: fp32 AdamW+EMA = 36 B); ``gbps = bytes_per_param · numel / time`` is
then the *effective* bandwidth of every row for the same job, whatever the row actually moves
(the unfused baselines move more; with 16-bit parameters torch keeps its optimizer state and
the baselines their EMA in the parameter dtype, i.e. fewer bytes and less precision than
ema_kernels' fp32 state and EMA).

``--host`` times something else: the host (CPU-side) µs of one ``step()`` call at
:data:`HOST_NUMEL`-element tensors over a sweep of tensor counts (``--tensors K [K ...]``,
default :data:`HOST_TENSORS`), fresh gradients every step; see :func:`run_host`.

Timing: CPU — ``time.perf_counter`` around batches of calls (each sample >= 2 ms), the rows
of a size sampled in turns (round-robin, so a busy machine slows them alike), median per row;
CUDA — ``triton.testing.do_bench`` (median; L2 flushed between calls), CUDA events if triton is
missing. ``ema_every=k``: a timed call is k steps (one with the EMA), reported per step.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import bench_peers

__all__ = ["bytes_per_param", "torch_clip_bytes_per_param", "main", "run", "Case",
           "row_names", "build_row", "KEYS", "run_host", "host_row_names", "HOST_KEYS"]

KEYS = ("name", "device", "optimizer", "dtype", "numel", "tensors", "ema_every", "emas", "ms",
        "bytes_per_param", "gbps", "pct_of_copy", "speedup", "clip")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
OPTIMIZERS = ("adamw", "adam", "sgd", "lars", "lamb", "lion")
RULES = ("lars", "lamb", "lion")  # torch has none: their baseline is a foreach implementation
BASELINE = "torch fused + foreach_lerp"
RULE_BASELINE = "foreach + foreach_lerp"  # bench_foreach.py's LARS/LAMB/Lion + _foreach_lerp_
COPY = "stream a+=b"
WITH_EMA = "ek.WithEMA(torch fused)"
COPY_D2D = "copy dst.copy_(src)"
CLIP_BASELINE = "torch fused + clip_grad_norm_ + foreach_lerp"
CLIP_MAX_NORM = 1.0  # the gradients (randn · 1e-2) have norm ≈ 1e-2·√numel: clipped from 10^4 on

# Hyperparameters of every row (the values do not change the bytes, only the numbers).
LR = 1e-4
EMA_DECAY = 0.9999
EMA_DECAYS = (EMA_DECAY, 0.999, 0.99, 0.9)  # --emas N: the first N
SGD_MOMENTUM = 0.9


# ------------------------------------------------------------------------------------------
# Bytes per parameter
# ------------------------------------------------------------------------------------------
def _itemsize(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    try:
        return _ITEMSIZE[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {tuple(_ITEMSIZE)}") from None


def bytes_per_param(optimizer: str, dtype="fp32", ema_every: int = 1, *, amsgrad: bool = False,
                    momentum: float = SGD_MOMENTUM, ema: bool = True, state_dtype="fp32",
                    ema_dtype="fp32", emas: int = 1, clip: bool = False) -> float:
    """Bytes per parameter one fused optimizer step + EMA update must move (read + written).

    Every step reads θ and g and writes θ (parameter dtype), and reads and writes each state
    buffer (``state_dtype``): Adam/AdamW have m and v (+ v_max with AMSGrad), SGD a momentum
    buffer when ``momentum != 0``. The EMA step reads and writes ζ (``ema_dtype``); θ is
    already in registers, so it costs no extra read. With ``ema_every=k`` the EMA's bytes are
    spread over the k steps (÷ k). ``emas=N`` EMAs updated in the same pass: each reads and
    writes its own ζ (θ is read once for all), so N·2·|ζ|. Hand counts, fp32: AdamW+EMA 36
    (read θ g m v ζ, write θ m v ζ), with N EMAs 36 + 8·(N − 1); SGD-momentum+EMA 28; bf16
    parameters, fp32 state and EMA, AdamW+EMA 30. ``clip=True``: the norm reads g once more
    (the coefficient is applied inside the pass): fp32 AdamW+EMA 40.

    LARS (weight decay ≠ 0): the norm pass reads θ and g, then SGD-momentum's pass: fp32 + EMA
    36. LAMB: pass 1 reads θ g m v and writes m v, pass 2 reads θ m v ζ and writes θ ζ: 48.
    Lion: one pass, read θ g m ζ, write θ m ζ: 28 (docs/optimizers.md).
    """
    opt = optimizer.lower()
    if opt not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
    if isinstance(ema_every, bool) or int(ema_every) != ema_every or ema_every < 1:
        raise ValueError(f"ema_every={ema_every!r} must be an integer >= 1")
    if isinstance(emas, bool) or int(emas) != emas or emas < 1:
        raise ValueError(f"emas={emas!r} must be an integer >= 1 (EMAs per parameter)")
    p, s, z = _itemsize(dtype), _itemsize(state_dtype), _itemsize(ema_dtype)
    ema_bytes = 2 * z * emas if ema else 0
    if opt == "lars":
        return 2 * p + 3 * p + 2 * s + ema_bytes / ema_every
    if opt == "lamb":
        return (2 * p + 4 * s) + (2 * p + 2 * s) + ema_bytes / ema_every
    if opt == "lion":
        return 3 * p + 2 * s + ema_bytes / ema_every
    if opt == "sgd":
        n_state = 1 if momentum else 0
    else:
        n_state = 3 if amsgrad else 2
    step = 3 * p + 2 * s * n_state          # read θ g (+state), write θ (+state)
    ema_bytes = 2 * z * emas if ema else 0   # read ζ_i, write ζ_i, for each EMA
    norm = p if clip else 0                  # clip_grad_norm_: read g
    return norm + step + ema_bytes / ema_every


def torch_clip_bytes_per_param(optimizer: str, dtype="fp32", ema_every: int = 1, *,
                               amsgrad: bool = False, momentum: float = SGD_MOMENTUM,
                               emas: int = 1) -> float:
    """Bytes per parameter of the ``--clip`` baseline: ``torch.nn.utils.clip_grad_norm_``
    (read g for the norm, then read and write g for ``g *= coef``) + torch's fused optimizer
    (state in the parameter dtype, as torch keeps it) + ``_foreach_lerp_`` per EMA (read θ and
    ζ, write ζ; ζ in the parameter dtype). fp32 AdamW + EMA: 4 + 8 + 28 + 12 = 52."""
    step = bytes_per_param(optimizer, dtype, ema_every, amsgrad=amsgrad, momentum=momentum,
                           ema=False, state_dtype=dtype)
    p = _itemsize(dtype)
    return 3 * p + step + 3 * p * emas / ema_every


# ------------------------------------------------------------------------------------------
# The cases and their rows
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    device: str = "cpu"
    optimizer: str = "adamw"
    dtype: str = "fp32"
    numel: int = 1 << 20
    tensors: int = 64
    ema_every: int = 1
    emas: int = 1
    clip: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bytes_per_param(self) -> float:
        return bytes_per_param(self.optimizer, self.dtype, self.ema_every, emas=self.emas,
                               clip=self.clip)

    def row_bytes_per_param(self, name: str) -> float:
        """The bytes row ``name``'s GB/s is credited with: the fused step's count, except the
        ``--clip`` baseline, which is credited with what it moves."""
        if name == CLIP_BASELINE:
            return torch_clip_bytes_per_param(self.optimizer, self.dtype, self.ema_every,
                                              emas=self.emas)
        return self.bytes_per_param

    @property
    def decays(self) -> tuple:
        """The EMAs' decays: EMA_DECAY alone, or the first ``emas`` of EMA_DECAYS."""
        if self.emas > len(EMA_DECAYS):
            raise ValueError(f"emas={self.emas}: the bench has decays for at most "
                             f"{len(EMA_DECAYS)} EMAs")
        return EMA_DECAYS[:self.emas]

    def sizes(self) -> List[int]:
        """``tensors`` sizes summing to ``numel`` (the first ``numel % tensors`` one larger)."""
        k = max(1, min(self.tensors, self.numel))
        base, extra = divmod(self.numel, k)
        return [base + (i < extra) for i in range(k)]


def _make_params(case: Case, seed: int = 0) -> List[torch.nn.Parameter]:
    """``case.tensors`` parameters (random, drawn on the device) with gradients set."""
    torch.manual_seed(seed)
    params = []
    for n in case.sizes():
        p = torch.nn.Parameter(torch.randn(n, device=case.device).to(case.torch_dtype))
        p.grad = (torch.randn(n, device=case.device) * 1e-2).to(case.torch_dtype)
        params.append(p)
    return params


class _Model(torch.nn.Module):
    """A module whose parameters are the benchmark's tensors (for the module-based EMAs)."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def _torch_hparams(case: Case) -> dict:
    if case.optimizer == "sgd":
        return dict(lr=LR, momentum=SGD_MOMENTUM)
    if case.optimizer == "lars":  # weight decay ≠ 0: the trust-ratio path (its norm pass)
        return dict(lr=LR, momentum=SGD_MOMENTUM, weight_decay=1e-4, trust_coefficient=1e-3,
                    eps=1e-8)
    if case.optimizer in ("lamb", "lion"):
        return dict(lr=LR, weight_decay=1e-2)
    return dict(lr=LR)


def _torch_optimizer(case: Case, params, **mode):
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    return cls[case.optimizer](params, **_torch_hparams(case), **mode)


def _ek_optimizer(case: Case, params, backend: str, flatten: bool = False, sr: bool = False):
    import ema_kernels as ek

    cls = {"adamw": ek.AdamW, "adam": ek.Adam, "sgd": ek.SGD, "lars": ek.LARS, "lamb": ek.LAMB,
           "lion": ek.Lion}[case.optimizer]
    grads = [p.grad for p in params]
    decay = case.decays[0] if case.emas == 1 else case.decays
    opt = cls(params, **_torch_hparams(case), ema_decay=decay, ema_every=case.ema_every,
              backend=backend, flatten=flatten, stochastic_rounding=sr)
    if flatten:
        # The flat layout's fast path: gradients are views of one buffer (bound by
        # zero_grad(set_to_none=False)), as a training loop using that mode has them.
        opt.zero_grad(set_to_none=False)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad.copy_(g)
    return opt


def _every(k: int, step: Callable[[], None], ema: Callable[[], None]) -> Callable[[], None]:
    """k optimizer steps and one EMA update: a call covers one EMA period."""
    @torch.no_grad()
    def run():
        for _ in range(k):
            step()
        ema()
    return run


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
    cur = [p.detach() for p in params]
    emas = [[c.clone() for c in cur] for _ in case.decays]
    ws = [1.0 - d ** case.ema_every for d in case.decays]

    def ema():
        for zs, w in zip(emas, ws):
            torch._foreach_lerp_(zs, cur, w)

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
    cur = [p.detach() for p in params]
    emas = [[c.clone() for c in cur] for _ in case.decays]
    ws = [1.0 - d ** case.ema_every for d in case.decays]

    def step():
        torch.nn.utils.clip_grad_norm_(params, CLIP_MAX_NORM)
        opt.step()

    def ema():
        for zs, w in zip(emas, ws):
            torch._foreach_lerp_(zs, cur, w)

    return _every(case.ema_every, step, ema), (opt, params, emas)


def _row_foreach_rule(case: Case):
    """LARS/LAMB/Lion written in torch's foreach ops (:mod:`ema_kernels.bench_foreach`) +
    ``_foreach_lerp_`` per EMA: the baseline of those optimizers (torch ships none of them)."""
    from . import bench_foreach as bf

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
            bf.lars_step(ps, grads, state[0], lr=hp["lr"], momentum=hp["momentum"],
                         weight_decay=hp["weight_decay"],
                         trust_coefficient=hp["trust_coefficient"], eps=hp["eps"])
        elif case.optimizer == "lamb":
            bf.lamb_step(ps, grads, state[0], state[1], lr=hp["lr"], beta1=0.9, beta2=0.999,
                         eps=1e-6, weight_decay=hp["weight_decay"], step=counter[0])
        else:
            bf.lion_step(ps, grads, state[0], lr=hp["lr"], beta1=0.9, beta2=0.99,
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
    **bench_peers.PEERS,
    bench_peers.COMPILED: bench_peers.compiled_foreach_lerp,
}
COMPILED = bench_peers.COMPILED


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
        from . import _ops
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


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
def _calibrate(fn) -> int:
    """Calls per timed sample so that a sample lasts >= 2 ms (perf_counter noise stays small)."""
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(2e-3 / est))


def _sample(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _enough(n: int, spent: float, budget: float, repeats: Optional[int]) -> bool:
    """Stop after ``repeats`` samples, else once ``budget`` has passed (5 to 50 samples; 3 when
    a sample is so slow that 5 would take over 3 x ``budget``): bounded wall time."""
    if repeats:
        return n >= repeats
    return n >= 50 or (n >= 5 and spent >= budget) or (n >= 3 and spent >= 3 * budget)


def _time_cpu_interleaved(fns: Dict[str, Callable], *, warmup: int, repeats: Optional[int],
                          target_s: float) -> Dict[str, float]:
    """Median seconds per call of every row, the rows' samples taken in turns.

    Round-robin sampling spreads whatever else the machine is doing over all rows alike, so
    their ratios survive a busy machine better than row-after-row timing. Each sample is
    preceded by one untimed call (the row's buffers back in cache, as in a training loop).
    """
    for fn in fns.values():
        for _ in range(max(1, warmup)):
            fn()
    inner = {name: _calibrate(fn) for name, fn in fns.items()}
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    n = 0
    while not _enough(n, time.perf_counter() - start, target_s * len(fns), repeats):
        for name, fn in fns.items():
            fn()
            samples[name].append(_sample(fn, inner[name]))
        n += 1
    return {name: statistics.median(v) for name, v in samples.items()}


def _time_cpu(fn, *, warmup: int, repeats: Optional[int], target_s: float) -> float:
    """Median seconds per call of one row (perf_counter around batches of >= 2 ms)."""
    return _time_cpu_interleaved({"row": fn}, warmup=warmup, repeats=repeats,
                                 target_s=target_s)["row"]


def _time_cuda(fn, *, warmup: int, repeats: Optional[int], target_s: float) -> float:
    """Median seconds per call on CUDA: triton.testing.do_bench, or CUDA events without it."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(fn, warmup=25, rep=max(20, int(target_s * 1000)),
                        return_mode="median") / 1e3
    for _ in range(max(3, warmup)):
        fn()
    torch.cuda.synchronize()
    n = repeats or 50
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------
# CPU rows of a case are timed interleaved (all alive at once) while they fit in this much
# memory (estimate: 48 B per parameter per row), one after another beyond it.
INTERLEAVE_MAX_BYTES = 3 << 30


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _fmt_numel(n: int) -> str:
    if n > 0 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _build(name: str, case: Case, progress, errors: Optional[Dict[str, str]] = None):
    torch.manual_seed(0)
    try:
        return build_row(name, case)
    except Exception as e:  # a baseline this torch does not support here: report, keep going
        why = str(e) if isinstance(e, bench_peers.PeerMissing) else f"{type(e).__name__}: {e}"
        if errors is not None:
            errors.setdefault(name, why)
        if progress:
            progress(f"    {name}: could not be built ({why})")
        return None, None


def _measure_case(case: Case, names: Sequence[str], *, warmup, repeats, target_s,
                  progress, errors: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """Seconds per call of each row's fn for one case (NaN for a row that failed)."""
    out = {name: float("nan") for name in names}
    cuda = torch.device(case.device).type == "cuda"
    interleave = not cuda and 48 * case.numel * len(names) <= INTERLEAVE_MAX_BYTES
    if interleave:
        built = {name: _build(name, case, progress, errors) for name in names}
        fns = {name: fk[0] for name, fk in built.items() if fk[0] is not None}
        try:
            out.update(_time_cpu_interleaved(fns, warmup=warmup, repeats=repeats,
                                             target_s=target_s))
        except Exception as e:
            if progress:
                progress(f"    failed ({type(e).__name__}: {e}); timing rows one by one")
            interleave = False
        built = fns = None  # noqa: F841
        _free(case.device)
        if interleave:
            return out
    timer = _time_cuda if cuda else _time_cpu
    for name in names:
        fn, keep = _build(name, case, progress, errors)
        if fn is not None:
            try:
                for _ in range(warmup):
                    fn()  # lazy state, the first EMA copy, kernel compilation: not timed
                if cuda:
                    torch.cuda.synchronize()
                out[name] = timer(fn, warmup=warmup, repeats=repeats, target_s=target_s)
            except Exception as e:
                if progress:
                    progress(f"    {name}: failed ({type(e).__name__}: {e})")
        fn = keep = None  # noqa: F841 - release the buffers before the next row
        _free(case.device)
    return out


def run(cases: Sequence[Case], *, names: Optional[Sequence[str]] = None, warmup: int = 2,
        repeats: Optional[int] = None, target_s: float = 0.25,
        progress: Optional[Callable[[str], None]] = None,
        stochastic_rounding: bool = False, compile: bool = True,
        errors: Optional[Dict[str, str]] = None) -> List[dict]:
    """Benchmark every row on every case; a list of dicts with :data:`KEYS`. ``errors``: a
    dict that receives, for each row that could not be built, why (a missing package)."""
    rows: List[dict] = []
    for i, case in enumerate(cases, 1):
        case_names = list(names or row_names(case.device, clip=case.clip,
                                             stochastic_rounding=stochastic_rounding,
                                             compile=compile,
                                             optimizer=case.optimizer))
        if progress:
            progress(f"[{i}/{len(cases)}] {case.device} {case.optimizer} {case.dtype} "
                     f"numel={_fmt_numel(case.numel)} in {min(case.tensors, case.numel)} tensors, "
                     f"ema_every={case.ema_every}, emas={case.emas}"
                     f"{', clip' if case.clip else ''}: {len(case_names)} rows ...")
        t0 = time.perf_counter()
        secs = _measure_case(case, case_names, warmup=warmup, repeats=repeats,
                             target_s=target_s, progress=progress, errors=errors)
        for name in case_names:
            bpp = case.row_bytes_per_param(name)
            ms = secs[name] * 1e3 / calls_per_fn(name, case)
            gbps = bpp * case.numel / (ms * 1e-3) / 1e9 if ms == ms and ms > 0 \
                else float("nan")
            rows.append(dict(name=name, device=case.device, optimizer=case.optimizer,
                             dtype=case.dtype, numel=case.numel,
                             tensors=max(1, min(case.tensors, case.numel)),
                             ema_every=case.ema_every, emas=case.emas, ms=ms,
                             bytes_per_param=bpp, gbps=gbps,
                             pct_of_copy=float("nan"), speedup=float("nan"), clip=case.clip))
            if progress:
                progress(f"    {name:<30} {ms:10.4f} ms  {gbps:8.2f} GB/s")
        if progress:
            progress(f"    ({time.perf_counter() - t0:.1f} s)")
    _relative_columns(rows)
    return rows


def _relative_columns(rows: List[dict]) -> None:
    """Fill ``pct_of_copy`` and ``speedup`` from the copy and baseline rows of the same case."""
    def key(r):
        return (r["device"], r["optimizer"], r["dtype"], r["numel"], r["tensors"],
                r["ema_every"], r["emas"], r.get("clip", False))
    ref: Dict[tuple, dict] = {}
    for r in rows:
        ref.setdefault(key(r), {})[r["name"]] = r
    for r in rows:
        same = ref[key(r)]
        cp = same.get(COPY)
        base = same.get(BASELINE, same.get(CLIP_BASELINE, same.get(RULE_BASELINE)))
        if cp is not None and cp["gbps"] == cp["gbps"] and cp["gbps"] > 0:
            r["pct_of_copy"] = 100.0 * r["gbps"] / cp["gbps"]
        if base is not None and base["ms"] == base["ms"] and r["ms"] == r["ms"] and r["ms"] > 0:
            r["speedup"] = base["ms"] / r["ms"]


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------
def device_description(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{threads} thread{'s' if threads != 1 else ''}")


def _busy_note(device: str) -> str:
    """A warning when other processes keep the CPUs busy (CPU timings then mislead)."""
    if torch.device(device).type != "cpu" or not hasattr(os, "getloadavg"):
        return ""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= 0.75 * cpus:
        return ""
    return (f"warning: this machine is busy (load average {load:.1f} on {cpus} CPUs): timings "
            f"will be noisy; with several torch threads, OpenMP regions stall whenever one "
            f"thread is descheduled (--threads 1 is steadier on a shared machine)")


def _num(x: float, fmt: str) -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table (readable in a terminal, pasteable into RESULTS.md)."""
    head = ["name", "numel", "tensors", "ms", "B/param", "GB/s", "% of stream", "speedup"]
    out = []
    configs = []
    for r in rows:
        c = (r["device"], r["optimizer"], r["dtype"], r["ema_every"], r.get("emas", 1),
             r.get("clip", False))
        if c not in configs:
            configs.append(c)
    for device, opt, dtype, every, n_emas, clip in configs:
        base = CLIP_BASELINE if clip else RULE_BASELINE if opt in RULES else BASELINE
        out.append(f"device={device}  optimizer={opt}  dtype={dtype}  ema_every={every}  "
                   f"emas={n_emas}{'  clip=True' if clip else ''}  (speedup vs '{base}')")
        out.append("")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in rows:
            if (r["device"], r["optimizer"], r["dtype"], r["ema_every"], r.get("emas", 1),
                    r.get("clip", False)) != (device, opt, dtype, every, n_emas, clip):
                continue
            ms, speedup = r["ms"], r["speedup"]
            out.append("| " + " | ".join([
                r["name"], _fmt_numel(r["numel"]), str(r["tensors"]),
                _num(ms, ".4f" if ms == ms and ms < 0.1 else ".3f"),
                _num(r["bytes_per_param"], "g"), _num(r["gbps"], ".2f"),
                _num(r["pct_of_copy"], ".1f"),
                _num(speedup, ".2f") + ("x" if speedup == speedup else ""),
            ]) + " |")
        out.append("")
    return "\n".join(out)


def _json_value(v):
    return None if isinstance(v, float) and v != v else v


def write_json(rows: Sequence[dict], path: str, keys: Sequence[str] = KEYS) -> None:
    """The rows' ``keys`` (the GB/s bench's by default; ``HOST_KEYS`` for ``--host``) as a
    JSON list, NaN as null."""
    with open(path, "w") as f:
        json.dump([{k: _json_value(r[k]) for k in keys} for r in rows], f, indent=1)
        f.write("\n")


def write_plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """GB/s vs numel, one line per row (log-log); the copy row dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = []
    for r in rows:
        c = (r["optimizer"], r["dtype"], r["ema_every"])
        if c not in configs:
            configs.append(c)
    fig, axes = plt.subplots(1, len(configs), figsize=(7.5 * len(configs), 5), squeeze=False)
    for ax, (opt, dtype, every) in zip(axes[0], configs):
        sel = [r for r in rows if (r["optimizer"], r["dtype"], r["ema_every"]) == (opt, dtype,
                                                                                  every)]
        names = list(dict.fromkeys(r["name"] for r in sel))
        for name in names:
            pts = sorted((r["numel"], r["gbps"]) for r in sel if r["name"] == name
                         and r["gbps"] == r["gbps"])
            if not pts:
                continue
            style = dict(linestyle="--", color="gray") if name == COPY else \
                dict(linewidth=2.2 if name.startswith("ek[") else 1.4)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("parameters (numel)")
        ax.set_ylabel(f"effective GB/s ({sel[0]['bytes_per_param']:g} B/param)")
        ax.set_title(f"{opt} + EMA, {dtype}, ema_every={every}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# --host: host (CPU-side) time of one step() call at many tiny tensors
# ------------------------------------------------------------------------------------------
# With HOST_NUMEL-element tensors the kernels are nearly free, so a step's time is what the
# optimizer does on the host per call: walk the parameters, read and check every .grad, build
# the launch. The sweep shows how that grows with the tensor count.
HOST_NUMEL = 8
HOST_TENSORS = (16, 100, 1000, 2000, 10000)
HOST_BASELINE = "torch fused AdamW + _foreach_lerp_"
HOST_KEYS = ("name", "device", "backend", "optimizer", "dtype", "tensors", "numel_per_tensor",
             "repeats", "us", "us_per_tensor", "speedup")
_OPT_TITLE = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}


def host_row_names(optimizer: str = "adamw") -> List[str]:
    """The ``--host`` rows, in table order; the third is the baseline of ``speedup``."""
    t = _OPT_TITLE[optimizer]
    return ["ek default", "ek flat", f"torch fused {t} + _foreach_lerp_",
            f"torch foreach {t} + _foreach_lerp_"]


def host_repeats(tensors: int) -> int:
    """Timed steps per row: 30 at >= 2000 tensors, more where a step is cheap (16 tensors:
    1000), so that small counts get a steady median and the sweep stays within ~a minute."""
    return max(30, min(1000, 60000 // tensors))


class _HostRow:
    """One ``--host`` row: an optimizer over ``tensors`` tiny parameters and two pre-made
    gradient sets. :meth:`feed` (untimed) hands the next step its gradients, :meth:`step`
    (timed) is the call whose host time is measured."""

    def __init__(self, name: str, case: Case, backend: str):
        self.name = name
        torch.manual_seed(0)
        dt, dev = case.torch_dtype, case.device
        self.params = [torch.nn.Parameter(torch.randn(HOST_NUMEL, device=dev).to(dt))
                       for _ in range(case.tensors)]
        self.grad_sets = [[(torch.randn(HOST_NUMEL, device=dev) * 1e-2).to(dt)
                           for _ in self.params] for _ in range(2)]
        self.turn = 0
        self.flat = name == "ek flat"
        for p, g in zip(self.params, self.grad_sets[0]):
            p.grad = g
        if name.startswith("ek "):
            # _ek_optimizer binds the flat layout's gradient views (zero_grad(set_to_none=
            # False)) and copies the current gradients into them.
            self.opt = _ek_optimizer(case, self.params, backend, flatten=self.flat)
            self.views = [p.grad for p in self.params] if self.flat else None
            self._ema = None
        else:
            self.fallback = False
            if name.startswith("torch fused"):
                try:
                    self.opt = _torch_optimizer(case, self.params, fused=True)
                except RuntimeError:  # torch has no fused kernel for this device or dtype
                    self.opt = _torch_optimizer(case, self.params, foreach=True)
                    self.fallback = True
            else:
                self.opt = _torch_optimizer(case, self.params, foreach=True)
            cur = [p.detach() for p in self.params]
            zs = [c.clone() for c in cur]
            w = 1.0 - EMA_DECAY

            def ema():
                torch._foreach_lerp_(zs, cur, w)
            self._ema = ema

    def feed(self) -> None:
        """The next step's gradients, as after a backward: new tensor objects for the default
        layouts; for ``ek flat`` new values copied into the bound views (that layout's fast
        path reads the flat buffer the views share, so new objects would leave it)."""
        self.turn ^= 1
        src = self.grad_sets[self.turn]
        if self.flat:
            torch._foreach_copy_(self.views, src)
        else:
            for p, g in zip(self.params, src):
                p.grad = g

    @torch.no_grad()
    def step(self) -> None:
        self.opt.step()
        if self._ema is not None:
            self._ema()


def _host_backend(device: str) -> str:
    """The backend the ek rows use: what ``backend="auto"`` picks on the device (cpp on a CPU
    with the extension built), named so that the table says which one was measured."""
    names = ek_backends(device)
    return names[0] if names else "reference"


def run_host(tensor_counts: Sequence[int] = HOST_TENSORS, *, device: str = "cpu",
             optimizer: str = "adamw", dtype: str = "fp32",
             names: Optional[Sequence[str]] = None, warmup: int = 3,
             repeats: Optional[int] = None,
             progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Host µs per ``step()`` of every ``--host`` row at each tensor count; dicts with
    :data:`HOST_KEYS` (``speedup`` = the torch fused row's µs over the row's).

    Each repetition visits the rows in turn (round-robin, so load from other processes lands
    on all rows alike): one untimed step (caches warm again after the other rows), fresh
    gradients (untimed), then one step timed with ``perf_counter``; the median over the
    repetitions is reported. On CUDA the timed region
    is only the host side of the call (kernels are launched, not waited for); the device is
    synchronized between repetitions, outside it, so queued work never throttles the host.
    """
    backend = _host_backend(device)
    all_names = host_row_names(optimizer)
    names = list(names or all_names)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out: List[dict] = []
    for i, k in enumerate(tensor_counts, 1):
        case = Case(device=device, optimizer=optimizer, dtype=dtype, numel=k * HOST_NUMEL,
                    tensors=k)
        reps = repeats or host_repeats(k)
        if progress:
            progress(f"[{i}/{len(tensor_counts)}] host time, {k} tensors x {HOST_NUMEL} "
                     f"elements, {reps} steps per row ...")
        rows = {name: _HostRow(name, case, backend) for name in names}
        for row in rows.values():
            for _ in range(warmup):  # lazy state, first-step paths, table caches: untimed
                row.feed()
                row.step()
        sync()
        samples: Dict[str, List[float]] = {name: [] for name in rows}
        for _ in range(reps):
            for name, row in rows.items():
                # One untimed step first, as the GB/s bench does before each sample: the
                # row's code and data back in cache after the other rows ran, so the sample
                # is the step's own host work, not the cache misses the round-robin causes.
                row.feed()
                row.step()
                row.feed()
                sync()
                t0 = time.perf_counter()
                row.step()
                samples[name].append(time.perf_counter() - t0)
        sync()
        base_name = all_names[2]
        us = {name: statistics.median(v) * 1e6 for name, v in samples.items()}
        for name in names:
            base = us.get(base_name)
            if name.startswith("ek "):
                impl = backend
            else:  # the fused row says so when it had to fall back to foreach
                impl = "torch foreach" if rows[name].fallback else "torch"
            out.append(dict(name=name, device=device, backend=impl, optimizer=optimizer,
                            dtype=dtype, tensors=k,
                            numel_per_tensor=HOST_NUMEL, repeats=reps, us=us[name],
                            us_per_tensor=us[name] / k,
                            speedup=base / us[name] if base is not None else float("nan")))
            if progress:
                progress(f"    {name:<38} {us[name]:12.1f} us/step")
        rows = None  # noqa: F841 - release before the next count
        _free(device)
    return out


def format_host_table(rows: Sequence[dict]) -> str:
    """Markdown: tensors, row, µs/step, µs per tensor, speedup vs torch fused."""
    head = ["tensors", "row", "µs/step", "µs/tensor", "vs torch fused"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", ":---"] + ["---:"] * 3) + "|"]
    for r in rows:
        s = r["speedup"]
        out.append("| " + " | ".join([
            str(r["tensors"]), r["name"], _num(r["us"], ".1f"), _num(r["us_per_tensor"], ".3f"),
            _num(s, ".1f" if s == s and s >= 10 else ".2f") + ("x" if s == s else ""),
        ]) + " |")
    return "\n".join(out) + "\n"


def write_host_plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """µs per step vs tensor count, one line per row (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name in dict.fromkeys(r["name"] for r in rows):
        pts = sorted((r["tensors"], r["us"]) for r in rows if r["name"] == name
                     and r["us"] == r["us"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linewidth=2.2 if name.startswith("ek ") else 1.4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"parameter tensors ({HOST_NUMEL} elements each)")
    ax.set_ylabel("host µs per step() (median)")
    r0 = rows[0] if rows else {}
    ax.set_title(f"host time per step, {r0.get('optimizer', '')} + EMA, ek backend "
                 f"{next((r['backend'] for r in rows if r['name'].startswith('ek ')), '?')}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------
_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``4096``, ``2^20``, ``2**20``, ``1e6``, ``16M``, ``4k`` -> an int > 0."""
    t = text.strip().lower().replace("_", "")
    try:
        m = re.fullmatch(r"(\d+)\s*(?:\^|\*\*)\s*(\d+)", t)
        if m:
            n = int(m.group(1)) ** int(m.group(2))
        elif t and t[-1] in _SUFFIX:
            n = int(float(t[:-1]) * _SUFFIX[t[-1]])
        else:
            n = int(float(t)) if ("e" in t or "." in t) else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (examples: 4096, 2^20, 1e6, 16M)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be >= 1")
    return n


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return n


def default_sizes(device: str) -> List[int]:
    if torch.device(device).type == "cuda":
        return [1 << e for e in (16, 18, 20, 22, 24, 26, 27)]
    return [1 << e for e in (12, 14, 16, 18, 20, 22)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ema_kernels bench",
        description="Time one optimizer step + EMA update: every available ema_kernels backend "
                    "against torch's optimizers with the EMAs people use, the packages "
                    "themselves (foreach lerp, AveragedModel, timm ModelEmaV3, ema-pytorch EMA, "
                    "diffusers EMAModel, torch.compile'd step + lerp) and an in-place stream "
                    "(a += b) of the same bytes. Table (Markdown) to stdout, progress to stderr.")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if a GPU is visible, else cpu")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="parameter (and gradient) dtype; ema_kernels keeps state and EMA in fp32")
    p.add_argument("--numel", type=parse_size, nargs="+", default=None, metavar="N",
                   help="total parameters (e.g. 2^20, 16M); several for a sweep; default a "
                        "sweep (cpu: 2^12..2^22, cuda: 2^16..2^27)")
    # One K for the GB/s bench; a list only with --host (its sweep of tensor counts).
    p.add_argument("--tensors", type=_positive_int, nargs="+", default=None, metavar="K",
                   help="split the parameters into K tensors (default 64); with --host: the "
                        f"tensor counts to sweep (default {' '.join(map(str, HOST_TENSORS))})")
    p.add_argument("--host", action="store_true",
                   help=f"host time per step() instead: µs per call at {HOST_NUMEL}-element "
                        f"tensors (the kernels nearly free), fresh gradients every step, rows "
                        f"'ek default', 'ek flat', torch fused and foreach + _foreach_lerp_; "
                        f"on CUDA the CPU side of the call (not synchronized inside)")
    p.add_argument("--ema-every", type=_positive_int, default=1, metavar="k",
                   help="update the EMA every k-th step (bytes and times are per step)")
    p.add_argument("--emas", type=int, choices=range(1, len(EMA_DECAYS) + 1), default=1,
                   metavar="N",
                   help=f"EMAs per parameter (1..{len(EMA_DECAYS)}, decays "
                        f"{', '.join(map(str, EMA_DECAYS))}): ek updates all N in the step's "
                        f"one pass, the baselines run N EMA updates")
    p.add_argument("--clip", action="store_true",
                   help=f"clip the gradients' norm every step (max_norm {CLIP_MAX_NORM}): ek "
                        f"rows clip_grad_norm_ + step (fp32 AdamW+EMA 40 B/param) against "
                        f"'{CLIP_BASELINE}' (52 B/param)")
    p.add_argument("--rows", nargs="+", default=None, metavar="NAME",
                   help="run only these rows (exact names as in the table; e.g. to keep a "
                        "large case within the interleaved-timing memory bound)")
    p.add_argument("--no-compile", action="store_true",
                   help=f"leave out the '{COMPILED}' row (its first call compiles: ~10-25 s "
                        f"per case on a CPU, in the untimed warm-up)")
    p.add_argument("--stochastic-rounding", action="store_true",
                   help="also time every ema_kernels row with stochastic_rounding=True (rows "
                        "ek[...,sr]; it rounds bf16/fp16 parameters, fp32 ones are unaffected)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed samples per row (CPU; default: as many as fit ~0.25 s, 3..50; "
                        "--host: timed steps per row, default 60000/K within 30..1000)")
    p.add_argument("--warmup", type=_positive_int, default=2, help="warm-up calls per row (CPU)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (torch.set_num_threads); default: torch's default")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s vs size (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m ema_kernels bench [flags]``; returns the exit status."""
    args = _parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible to torch "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
              file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed: "
                  "pip install 'ema-kernels[plot]' (or pip install matplotlib)", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.host:
        return _main_host(args, device)
    if args.tensors and len(args.tensors) > 1:
        print(f"error: --tensors takes one K here (got {args.tensors}); several tensor counts "
              f"are a sweep of --host", file=sys.stderr)
        return 2
    tensors = args.tensors[0] if args.tensors else 64
    sizes = args.numel or default_sizes(device)
    cases = [Case(device=device, optimizer=args.optimizer, dtype=args.dtype, numel=n,
                  tensors=tensors, ema_every=args.ema_every, emas=args.emas,
                  clip=args.clip)
             for n in sizes]
    if args.rows:
        known = known_row_names(device, clip=args.clip, optimizer=args.optimizer)
        bad = [r for r in args.rows if r not in known]
        if bad:
            print(f"error: --rows {bad} are not rows of this run; choose from {known}",
                  file=sys.stderr)
            return 2

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    skipped = [b for b in __import__("ema_kernels").available_backends(device)
               if b not in ek_backends(device)]
    for b in skipped:
        progress(f"note: backend {b!r} skipped on {device} (the Triton interpreter is a test "
                 f"vehicle, not a fast path)")
    desc = device_description(device)
    progress(f"bench on {desc}")
    busy = _busy_note(device)
    if busy:
        progress(busy)
    t0 = time.perf_counter()
    errors: Dict[str, str] = {}
    rows = run(cases, names=args.rows, warmup=args.warmup, repeats=args.repeats,
               progress=progress, stochastic_rounding=args.stochastic_rounding,
               compile=not args.no_compile, errors=errors)
    progress(f"done in {time.perf_counter() - t0:.1f} s")

    print(f"# {desc}")
    if hasattr(os, "getloadavg") and device == "cpu":
        print(f"# load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("# B/param = bytes the fused step must move per parameter; GB/s = B/param x numel / "
          "median time;\n# % of stream = GB/s over that of an in-place fp32 a += b moving the "
          "same bytes (the copy bandwidth)")
    if args.clip:
        print(f"# --clip: the '{CLIP_BASELINE}' row is credited with the bytes it moves "
              f"(norm pass + clip pass + step + lerp), the ek rows with the fused count")
    print()
    print(format_table(rows))
    for name, why in errors.items():
        print(f"# not run: {name}: {why}")
    if args.json:
        write_json(rows, args.json)
        progress(f"wrote {args.json}")
    if args.plot:
        write_plot(rows, args.plot, title=desc)
        progress(f"wrote {args.plot}")
    return 0


def _main_host(args, device: str) -> int:
    """``bench --host``: the host-time sweep (options that only shape the GB/s bench refused,
    so that a run never silently ignores what was asked)."""
    if args.optimizer in RULES:
        print(f"error: --host times {OPTIMIZERS[:3]} (against torch's own); "
              f"--optimizer {args.optimizer} has no torch twin there", file=sys.stderr)
        return 2
    ignored = [flag for flag, on in (("--numel", args.numel), ("--clip", args.clip),
                                     ("--emas", args.emas != 1),
                                     ("--ema-every", args.ema_every != 1)) if on]
    if ignored:
        print(f"error: {' '.join(ignored)}: not used by --host (it times {HOST_NUMEL}-element "
              f"tensors, one EMA updated every step)", file=sys.stderr)
        return 2
    names = host_row_names(args.optimizer)
    if args.rows:
        bad = [r for r in args.rows if r not in names]
        if bad:
            print(f"error: --rows {bad} are not rows of --host; choose from {names}",
                  file=sys.stderr)
            return 2

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    desc = device_description(device)
    progress(f"bench --host on {desc}")
    busy = _busy_note(device)
    if busy:
        progress(busy)
    counts = args.tensors or list(HOST_TENSORS)
    t0 = time.perf_counter()
    rows = run_host(counts, device=device, optimizer=args.optimizer, dtype=args.dtype,
                    names=args.rows, warmup=max(args.warmup, 3), repeats=args.repeats,
                    progress=progress)
    progress(f"done in {time.perf_counter() - t0:.1f} s")

    print(f"# {desc}")
    if hasattr(os, "getloadavg"):
        print(f"# load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    backend = next((r["backend"] for r in rows if r["name"].startswith("ek ")), None)
    print(f"# host time per step(): {args.optimizer} + EMA, {args.dtype}, {HOST_NUMEL} elements "
          f"per tensor, fresh gradients every step, median of the repeats"
          + (f"; ek backend {backend}" if backend else ""))
    if torch.device(device).type == "cuda":
        print("# cuda: the time is the CPU side of the call (launches queued, not waited "
              "for); the device is synchronized between repetitions only")
    print("# vs torch fused = torch fused + _foreach_lerp_ µs / the row's µs "
          "(higher = less host time)")
    print()
    print(format_host_table(rows))
    if args.json:
        write_json(rows, args.json, HOST_KEYS)
        progress(f"wrote {args.json}")
    if args.plot:
        write_host_plot(rows, args.plot, title=desc)
        progress(f"wrote {args.plot}")
    return 0
