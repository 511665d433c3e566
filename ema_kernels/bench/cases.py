"""What the bench runs: a :class:`Case` (device, optimizer, dtype, size), the bytes a fused
step must move per parameter, the row names, and the parameters and optimizers every row is
built from (:mod:`ema_kernels.bench.rows` builds the rows themselves)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

# The GB/s rows' columns (run() returns dicts with these keys, write_json() writes them).
KEYS = ("name", "device", "optimizer", "dtype", "numel", "tensors", "ema_every", "emas", "ms",
        "bytes_per_param", "gbps", "pct_of_copy", "speedup", "clip")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
OPTIMIZERS = ("adamw", "adam", "sgd", "lars", "lamb", "lion")
RULES = ("lars", "lamb", "lion")  # torch has none: their baseline is a foreach implementation
BASELINE = "torch fused + foreach_lerp"
RULE_BASELINE = "foreach + foreach_lerp"  # foreach_rules.py's LARS/LAMB/Lion + _foreach_lerp_
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


def _foreach_lerp_emas(case: Case, params) -> tuple:
    """``(ema, emas)``: one list of EMA tensors per decay (clones of the parameters) and
    ``ema()``, one ``torch._foreach_lerp_`` per EMA towards the parameters, with the weight of
    ``ema_every`` steps (the baselines' EMA; state in the parameters' dtype, as torch keeps it)."""
    cur = [p.detach() for p in params]
    emas = [[c.clone() for c in cur] for _ in case.decays]
    ws = [1.0 - d ** case.ema_every for d in case.decays]

    def ema():
        for zs, w in zip(emas, ws):
            torch._foreach_lerp_(zs, cur, w)
    return ema, emas


def _every(k: int, step: Callable[[], None], ema: Callable[[], None]) -> Callable[[], None]:
    """k optimizer steps and one EMA update: a call covers one EMA period."""
    @torch.no_grad()
    def run():
        for _ in range(k):
            step()
        ema()
    return run

