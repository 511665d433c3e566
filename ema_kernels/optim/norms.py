"""Per-tensor norms and trust ratios of LARS and LAMB, as device ops on one small vector per set.

Both rules scale each parameter tensor's update by a ratio of norms of that *whole* tensor. The
norms are measured as per-tensor sums of squares (a (n, 2) float32 tensor per parameter set), and
under FSDP2, where each rank holds a shard of every parameter, those partial sums are
all-reduced over the sharded mesh dimensions — the machinery of ``clip_grad_norm_``
(:func:`.clipping.all_reduce_over`), one all-reduce per set and step — so every rank applies the
ratio of the global tensor. DDP needs nothing: its gradients are averaged before the step and
its parameters replicated. Nothing here reads a device value on the host.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import layout
from .clipping import _shard_dims, all_reduce_over

_F32 = torch.float32


def shard_domain(params) -> Optional[tuple]:
    """``(mesh, sharded dims)`` over which the per-tensor sums of a set's parameters are reduced
    (None for plain tensors and replicated DTensors). A set mixing shardings is refused: one
    reduction per set cannot serve both (put them in separate param groups)."""
    if not params or not layout.is_dtensor(params[0]):
        return None
    specs = {_shard_dims(p) for p in params}
    if len(specs) != 1:
        raise NotImplementedError(
            "LARS/LAMB: one parameter set (a param group's parameters of one device and dtype) "
            "mixes DTensor shardings, so their per-tensor norms need different reductions; put "
            "the differently sharded parameters in separate param groups")
    return specs.pop()


def _sq_norms(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Per-tensor Σx² in float32 (float64 for float64 tensors): one ``_foreach_norm`` read,
    the norm squared."""
    dt = torch.float64 if tensors[0].dtype == torch.float64 else _F32
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dt)).square_()


def lars_coefs(params: List[torch.Tensor], grads: List[torch.Tensor], *, weight_decay: float,
               trust_coefficient: float, eps: float, grad_scale: Optional[torch.Tensor],
               domain: Optional[tuple]) -> torch.Tensor:
    """``(n, 2)`` float32: per tensor (trust ratio, weight decay applied), Lightning Bolts' LARS:
    where ‖θ‖ ≠ 0 and ‖g‖ ≠ 0, ``η·‖θ‖/(‖g‖ + λ‖θ‖ + ε)`` and λ; elsewhere 1 and 0 (the gradient
    unchanged). ``grads`` may still carry a GradScaler's scale: ‖g‖ is divided by it here."""
    sums = torch.stack([_sq_norms(params), _sq_norms(grads)], 1)
    sums = all_reduce_over(sums, domain)
    pn, gn = sums.sqrt().unbind(1)
    if grad_scale is not None:
        gn = gn / grad_scale.reshape(())
    ok = (pn != 0) & (gn != 0)
    ratio = pn / (gn + pn * weight_decay + eps) * trust_coefficient
    one, zero = pn.new_ones(()), pn.new_zeros(())
    return torch.stack([torch.where(ok, ratio, one),
                        torch.where(ok, torch.full_like(pn, weight_decay), zero)], 1)


def lamb_step_sizes(sums: torch.Tensor, lr, domain: Optional[tuple]) -> torch.Tensor:
    """``(n,)`` per tensor lr·‖θ‖/‖r‖ (You et al. 2020; ratio 1 where either norm is 0) from
    :func:`lamb_moments`'s per-tensor sums (Σθ², Σr²); ``lr`` a number or a device scalar."""
    sums = all_reduce_over(sums, domain)
    pn, rn = sums.sqrt().unbind(1)
    ratio = torch.where((pn > 0) & (rn > 0), pn / rn, torch.ones((), dtype=pn.dtype,
                                                                  device=pn.device))
    if isinstance(lr, torch.Tensor):
        return ratio * lr.detach().to(device=ratio.device, dtype=ratio.dtype).reshape(())
    return ratio * lr
