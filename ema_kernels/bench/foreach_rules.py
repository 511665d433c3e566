"""The bench's baselines for LARS, LAMB and Lion: the same math written with torch's ``_foreach_*``
ops (as torch.optim's foreach optimizers are written; torch ships none of these three), the EMA
then updated by ``torch._foreach_lerp_``. Each op is one full pass over its tensors; the bytes
per fp32 parameter of each op are in the comments (docs/optimizers.md sums them: LARS 72, LAMB
132, Lion 80 with one EMA, against the fused 36, 48 and 28).

These are baselines, not oracles: the oracles are tests/test_lars_lamb_lion.py's per-tensor
code, and these functions are checked against the optimizers there (tests/test_bench_rules.py).
"""
from __future__ import annotations

from typing import List

import torch

Tensor = torch.Tensor


def _per_tensor(v: Tensor) -> List[Tensor]:
    return list(v.unbind(0))


def lars_step(params: List[Tensor], grads: List[Tensor], bufs: List[Tensor], *, lr: float,
              momentum: float, weight_decay: float, trust_coefficient: float,
              eps: float) -> None:
    """Lightning Bolts' LARS (weight decay ≠ 0, momentum after the first step) in foreach ops.
    A baseline: Bolts' exception for a zero norm (no decay there) is not written out."""
    pn = torch.stack(torch._foreach_norm(params))                   # read θ          4
    gn = torch.stack(torch._foreach_norm(grads))                    # read g          4
    ok = (pn != 0) & (gn != 0)
    ratio = torch.where(ok, pn / (gn + pn * weight_decay + eps) * trust_coefficient,
                        torch.ones_like(pn))
    d = torch._foreach_add(grads, params, alpha=weight_decay)        # g + λθ → tmp  12
    torch._foreach_mul_(d, _per_tensor(ratio))                       # tmp ·= ratio   8
    torch._foreach_mul_(bufs, momentum)                              # buf ·= β       8
    torch._foreach_add_(bufs, d)                                     # buf += d      12
    torch._foreach_add_(params, bufs, alpha=-lr)                     # θ −= lr·buf   12


def lamb_step(params: List[Tensor], grads: List[Tensor], ms: List[Tensor], vs: List[Tensor], *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              step: int) -> None:
    """You et al. 2020's LAMB in foreach ops (r in temporaries, norms by ``_foreach_norm``)."""
    bc1, bc2_sqrt = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
    torch._foreach_lerp_(ms, grads, 1 - beta1)                       # m              12
    torch._foreach_mul_(vs, beta2)                                   # v ·= β2         8
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)       # v += g²        16
    r = torch._foreach_div(ms, bc1)                                  # m̂               8
    den = torch._foreach_sqrt(vs)                                    # √v              8
    torch._foreach_div_(den, bc2_sqrt)                               #                 8
    torch._foreach_add_(den, eps)                                    #                 8
    torch._foreach_div_(r, den)                                      # m̂/(√v̂+ε)       12
    torch._foreach_add_(r, params, alpha=weight_decay)               # + λθ           12
    pn = torch.stack(torch._foreach_norm(params))                    # read θ          4
    rn = torch.stack(torch._foreach_norm(r))                         # read r          4
    ratio = torch.where((pn > 0) & (rn > 0), pn / rn, torch.ones_like(pn))
    torch._foreach_mul_(r, _per_tensor(ratio * -lr))                 # r ·= −lr·ratio  8
    torch._foreach_add_(params, r)                                   # θ += r         12


def lion_step(params: List[Tensor], grads: List[Tensor], ms: List[Tensor], *, lr: float,
              beta1: float, beta2: float, weight_decay: float) -> None:
    """Chen et al. 2023's Lion in foreach ops (lucidrains' order)."""
    torch._foreach_mul_(params, 1 - lr * weight_decay)               # θ ·= 1 − lrλ    8
    c = torch._foreach_mul(ms, beta1)                                # β1·m            8
    torch._foreach_add_(c, grads, alpha=1 - beta1)                   # + (1−β1)·g     12
    torch._foreach_sign_(c)                                          #                 8
    torch._foreach_add_(params, c, alpha=-lr)                        # θ −= lr·sign   12
    torch._foreach_mul_(ms, beta2)                                   # m ·= β2         8
    torch._foreach_add_(ms, grads, alpha=1 - beta2)                  # m += (1−β2)·g  12
