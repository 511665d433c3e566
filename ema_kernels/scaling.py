"""The scaling rules as plain functions: what a hyperparameter becomes when the batch grows κ-fold.

- EMA Scaling Rule (Busbridge et al., "How to Scale Your EMA", NeurIPS 2023): ρ → ρ^κ.
- SGD (linear scaling rule, Goyal et al. 2017): lr → κ·lr.
- Adam / AdamW (square-root rule of Malladi et al., "On the SDEs and Scaling Rules for Adaptive
  Gradient Algorithms", NeurIPS 2022): lr → √κ·lr, β_i → 1 − κ(1 − β_i), ε → ε/√κ; AdamW's
  decoupled weight decay λ → √κ·λ, so that the per-step shrinkage lr·λ scales by κ.
- LARS: SGD's linear rule; LAMB: Adam's square-root rule with AdamW's weight decay (a
  ``lr_rule="linear"`` variant, which tracks κ = 1 better: docs/optimizers.md); Lion: none
  (κ ≠ 1 raises).

All are first-order approximations: they hold while κ·lr stays small (and, for Adam, while every
scaled β stays ≥ 0 — beyond that the rule has no meaning and we raise).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

__all__ = ["check_kappa", "check_rho", "ema_decay", "sgd", "adam", "lars", "lamb", "lion"]


def check_kappa(kappa) -> float:
    """κ as a float; ``ValueError`` unless it is finite and > 0."""
    k = float(kappa)
    if not math.isfinite(k) or k <= 0:
        raise ValueError(f"kappa={kappa!r} is invalid: kappa is the batch-size scale relative to "
                         f"the base batch (new_batch / base_batch) and must be a finite number > 0")
    return k


def check_rho(rho, name: str = "ema_decay") -> float:
    """ρ as a float; ``ValueError`` unless 0 ≤ ρ ≤ 1."""
    r = float(rho)
    if not (0.0 <= r <= 1.0):  # also rejects NaN
        raise ValueError(f"{name}={rho!r} is invalid: an EMA decay must lie in [0, 1] "
                         f"(0 copies the parameters, 1 freezes the EMA)")
    return r


def ema_decay(rho: float, kappa: float) -> float:
    """ρ^κ: the EMA decay at κ times the base batch size."""
    return check_rho(rho) ** check_kappa(kappa)


def sgd(lr: float, kappa: float, **unchanged) -> Dict[str, float]:
    """SGD's linear rule: ``{"lr": κ·lr, **unchanged}`` (momentum, weight decay… unchanged)."""
    return {"lr": float(lr) * check_kappa(kappa), **unchanged}


def adam(lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
         weight_decay: float = 0.0, kappa: float = 1.0, decoupled: bool = True) -> Dict:
    """Malladi et al.'s square-root rule for Adam (``decoupled=False``) and AdamW.

    Returns ``{"lr", "betas", "eps", "weight_decay"}`` scaled for κ. Coupled (L2) weight decay
    is part of the loss and is left unchanged; decoupled weight decay scales by √κ.
    Raises ``ValueError`` if κ ≤ 0 or a scaled β would fall below 0.
    """
    k = check_kappa(kappa)
    root = math.sqrt(k)
    scaled = []
    for i, b in enumerate(betas):
        nb = 1.0 - k * (1.0 - float(b))
        if nb < 0.0:
            raise ValueError(
                f"kappa={kappa!r} drives beta{i + 1}={b!r} to 1 - kappa*(1 - beta{i + 1}) = {nb:.6g} < 0: "
                f"the square-root rule for Adam only holds for kappa <= {1.0 / (1.0 - float(b)):.6g} "
                f"with this beta. Use a smaller kappa, a beta closer to 1, or scale_optimizer=False.")
        scaled.append(nb)
    return {"lr": float(lr) * root, "betas": tuple(scaled), "eps": float(eps) / root,
            "weight_decay": float(weight_decay) * root if decoupled else float(weight_decay)}


def lars(lr: float, kappa: float, **unchanged) -> Dict[str, float]:
    """LARS takes SGD's linear rule, lr → κ·lr (the rule of large-batch LARS training: You et
    al., "Large Batch Training of Convolutional Networks", 2017, and Goyal et al. 2017); the
    trust coefficient, momentum and weight decay are unchanged."""
    return sgd(lr, kappa, **unchanged)


def lamb(lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
         weight_decay: float = 0.0, kappa: float = 1.0, lr_rule: str = "sqrt") -> Dict:
    """LAMB's rule (``scale_optimizer=True`` applies it): Adam's square-root rule (Malladi et
    al. 2022; the square-root lr scaling of You et al. 2020's large-batch BERT runs) with the
    decoupled weight decay scaled as AdamW's: lr·√κ, β_i → 1 − κ(1 − β_i), ε/√κ, λ·√κ (see
    :func:`adam`).

    ``lr_rule="linear"`` gives lr·κ instead (β, ε, λ as above). LAMB's trust ratio fixes each
    tensor's step to lr·‖θ‖ whatever the size of Adam's direction, so in SDE terms it scales like
    LARS, not like Adam: on the noisy parabola (tests/test_lars_lamb_lion.py,
    docs/optimizers.md) the linear lr tracks the κ = 1 trajectory at κ = 8 and the square-root
    one does not. It is offered for ``scale_optimizer=False`` users; the optimizer's own rule is
    the documented square-root one.
    """
    if lr_rule not in ("sqrt", "linear"):
        raise ValueError(f"lr_rule={lr_rule!r}: choose 'sqrt' (Adam's rule, the default) or "
                         f"'linear' (lr·kappa)")
    out = adam(lr, betas, eps, weight_decay, kappa, decoupled=True)
    if lr_rule == "linear":
        out["lr"] = float(lr) * check_kappa(kappa)
    return out


def lion(lr: float, betas: Tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
         kappa: float = 1.0) -> Dict:
    """Lion has no established batch-size scaling rule: κ = 1 returns the values unchanged, any
    other κ raises ``ValueError`` (``scale_optimizer=False`` scales the EMA alone)."""
    k = check_kappa(kappa)
    if k != 1.0:
        raise ValueError(
            f"kappa={kappa!r} with scale_optimizer=True: Lion has no established batch-size "
            f"scaling rule for its hyperparameters (lr, betas, weight_decay), so none is applied "
            f"silently. Pass scale_optimizer=False to scale only the EMA (rho -> rho**kappa) and "
            f"set Lion's lr/betas/weight_decay for the new batch yourself")
    return {"lr": float(lr), "betas": tuple(float(b) for b in betas),
            "weight_decay": float(weight_decay)}
