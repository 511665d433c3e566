"""The EMA Scaling Rule in a real (small) training run, on CPU in about a minute.

Task: classify points drawn from a Gaussian mixture (10 classes, each a mixture of 3 Gaussians
in 24 dimensions, 10% of training labels flipped at random) with a 3-layer MLP, trained by
``ema_kernels.AdamW`` with an EMA of the weights (ρ = 0.999 at the base batch of 32). Every run
sees the same samples in the same order; a batch of 32κ samples is κ consecutive base batches.
We track the EMA model's held-out loss (``opt.ema_module(model)``, live views of the EMA)
against samples seen:

    κ=1            batch 32: the reference
    κ=8, full rule batch 256, ``kappa=8``: Adam's square-root rule *and* the EMA's ρ^κ
    κ=8, ρ fixed   batch 256, ``kappa=8`` with the EMA decay left at ρ per step (Adam rule only)
    progressive    κ = 1 → 4 → 8 at 1/3 and 2/3 of training (``g["kappa"] = κ`` mid-run)
    cosine         BYOL's schedule ``ek.schedules.cosine(0.99, 1.0, total_steps)``, indexed by
                   samples (base steps), at κ=1 and κ=8

The full rule tracks κ=1; keeping ρ fixed at batch 256 makes the EMA average over 8× more
samples, and it lags far behind.

    python examples/scaling_training.py          # writes docs/scaling_training.png
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

try:
    import ema_kernels as ek
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import ema_kernels as ek

BASE_BATCH = 32
LR = 1e-3
WEIGHT_DECAY = 1e-2
RHO = 0.999
COSINE_RHO_START = 0.99


# ------------------------------------------------------------------------------- the task ------
def make_data(n_train=16_384, n_test=8_192, dim=24, classes=10, modes=3, label_noise=0.1,
              seed=0):
    """Gaussian-mixture classification: class c is a mixture of ``modes`` Gaussians.

    Returns ``(x_train, y_train, x_test, y_test)``; training labels are flipped to a uniformly
    random class with probability ``label_noise``, test labels are clean.
    """
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, modes, dim, generator=g) * 1.1

    def sample(n, noisy):
        y = torch.randint(classes, (n,), generator=g)
        m = torch.randint(modes, (n,), generator=g)
        x = centers[y, m] + torch.randn(n, dim, generator=g)
        if noisy:
            flip = torch.rand(n, generator=g) < label_noise
            y = torch.where(flip, torch.randint(classes, (n,), generator=g), y)
        return x, y

    x_tr, y_tr = sample(n_train, True)
    x_te, y_te = sample(n_test, False)
    return x_tr, y_tr, x_te, y_te


def make_model(dim=24, classes=10, width=256, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(dim, width), torch.nn.GELU(),
        torch.nn.Linear(width, width), torch.nn.GELU(),
        torch.nn.Linear(width, classes))


def sample_order(n_train, total_samples, seed=0):
    """The index of every sample seen, epoch after epoch (a fresh permutation per epoch)."""
    g = torch.Generator().manual_seed(seed + 1)
    epochs = math.ceil(total_samples / n_train)
    return torch.cat([torch.randperm(n_train, generator=g) for _ in range(epochs)])[:total_samples]


# ------------------------------------------------------------------------------- a run ---------
def ema_decay_for(rule: str, rho: float, kappa: float) -> float:
    """``ema_decay`` to pass with ``kappa=κ`` so that the EMA runs ``rule``.

    With ``kappa=κ`` the optimizer applies Adam's rule and raises the EMA's base-batch decay to
    the power κ. "full": pass ρ (per-step decay ρ^κ, the EMA Scaling Rule). "fixed": pass ρ^(1/κ)
    so the per-step decay is (ρ^(1/κ))^κ = ρ — the optimizer is still scaled, the EMA is not.
    """
    if rule == "full":
        return rho
    if rule == "fixed":
        return rho ** (1.0 / kappa)
    raise ValueError(f"unknown rule {rule!r}: 'full' or 'fixed'")


def kappa_at(plan, samples):
    """κ in force after ``samples`` samples: ``plan`` is an int or [(start_sample, κ), ...]."""
    if isinstance(plan, (int, float)):
        return plan
    k = plan[0][1]
    for start, kk in plan:
        if samples >= start:
            k = kk
    return k


@torch.no_grad()
def held_out_loss(model, x, y):
    return F.cross_entropy(model(x), y).item()


def train(data, plan=1, rule="full", ema_schedule=None, total_samples=196_608,
          eval_every=4_096, seed=0, width=256, rho=RHO, backend="auto"):
    """One AdamW run; returns ``(samples_seen, ema_test_loss, model_test_loss)`` arrays.

    ``plan``: κ (constant) or a progressive plan [(start_sample, κ), ...]; the batch is 32κ.
    ``rule`` ("full" | "fixed") only matters where κ ≠ 1 and only for a constant κ.
    """
    x_tr, y_tr, x_te, y_te = data
    model = make_model(x_tr.shape[1], int(y_te.max()) + 1, width, seed)
    k0 = kappa_at(plan, 0)
    ema_decay = ema_decay_for(rule, rho, k0)
    opt = ek.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, ema_decay=ema_decay,
                   ema_schedule=ema_schedule, kappa=k0, backend=backend)
    teacher = opt.ema_module(model)    # parameters are live views of the EMA: no copies
    order = sample_order(x_tr.shape[0], total_samples, seed)
    seen, xs, ema_losses, model_losses = 0, [0], [], []
    ema_losses.append(held_out_loss(teacher, x_te, y_te))
    model_losses.append(held_out_loss(model, x_te, y_te))
    while seen < total_samples:
        kappa = kappa_at(plan, seen)
        for g in opt.param_groups:   # progressive scaling: κ may change between steps
            g["kappa"] = kappa
        batch = BASE_BATCH * kappa
        idx = order[seen:seen + batch]
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += batch
        if seen % eval_every == 0:
            xs.append(seen)
            ema_losses.append(held_out_loss(teacher, x_te, y_te))
            model_losses.append(held_out_loss(model, x_te, y_te))
    return np.array(xs), np.array(ema_losses), np.array(model_losses)


def gap(curve, ref):
    """Mean |held-out loss − κ=1's| over the evaluation points (after the shared start)."""
    return float(np.mean(np.abs(curve[1:] - ref[1:])))


def run_all(total_samples=196_608, eval_every=4_096, seed=0, width=256, n_train=16_384,
            n_test=8_192, rho=RHO, backend="auto", cosine=True, verbose=False):
    """Every run of the figure: {name: (samples_seen, ema_loss, model_loss)} + switch points."""
    if total_samples % 256 or eval_every % 256:
        raise ValueError("total_samples and eval_every must be multiples of 256 (the batch at κ=8)")
    data = make_data(n_train=n_train, n_test=n_test, seed=seed)
    third = total_samples // 3 // 256 * 256   # switch points on whole batches of 256
    base_steps = total_samples / BASE_BATCH
    runs = {
        "k1": dict(plan=1),
        "k8_full": dict(plan=8, rule="full"),
        "k8_fixed": dict(plan=8, rule="fixed"),
        "progressive": dict(plan=[(0, 1), (third, 4), (2 * third, 8)]),
    }
    if cosine:
        sched = ek.schedules.cosine(COSINE_RHO_START, 1.0, total_steps=base_steps)
        runs["cos_k1"] = dict(plan=1, ema_schedule=sched)
        runs["cos_k8"] = dict(plan=8, ema_schedule=sched)
    out = {}
    for name, kw in runs.items():
        t0 = time.perf_counter()
        out[name] = train(data, total_samples=total_samples, eval_every=eval_every, seed=seed,
                          width=width, rho=rho, backend=backend, **kw)
        if verbose:
            print(f"  {name:<12s} {time.perf_counter() - t0:5.1f} s", file=sys.stderr)
    out["switch_points"] = (third, 2 * third)
    return out


LABELS = {
    "k1": r"$\kappa=1$ (batch 32)",
    "k8_full": r"$\kappa=8$ (batch 256), kappa=8: Adam rule + $\rho^\kappa$",
    "k8_fixed": r"$\kappa=8$ (batch 256), Adam rule only ($\rho$ per step)",
    "progressive": r"progressive $\kappa$: 1 $\to$ 4 $\to$ 8",
    "cos_k1": r"cosine $\rho$ schedule, $\kappa=1$",
    "cos_k8": r"cosine $\rho$ schedule, $\kappa=8$",
}
COLORS = {"k1": "black", "k8_full": "tab:blue", "k8_fixed": "tab:red",
          "progressive": "tab:green", "cos_k1": "black", "cos_k8": "tab:purple"}


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    has_cos = "cos_k1" in res
    fig, axes = plt.subplots(1, 3 if has_cos else 2, figsize=(16 if has_cos else 11, 4.6),
                             constrained_layout=True)
    thousands = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k")
    ax = axes[0]
    s, _, raw = res["k1"]
    ax.plot(s, raw, color="0.6", lw=1, ls="--", label=r"$\kappa=1$ model itself (no EMA)")
    for name in ("k1", "k8_full", "k8_fixed", "progressive"):
        s, ema, _ = res[name]
        ax.plot(s, ema, color=COLORS[name], lw=2.2 if name == "k1" else 1.5,
                ls=":" if name == "progressive" else "-", label=LABELS[name])
    for x in res["switch_points"]:
        ax.axvline(x, color="tab:green", alpha=0.25, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("EMA model: held-out cross-entropy")
    ax.set_title("EMA model vs samples seen")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[1]
    ref = res["k1"][1]
    for name in ("k8_full", "k8_fixed", "progressive"):
        s, ema, _ = res[name]
        # The progressive run *is* the κ=1 run until its first switch: plot it from there.
        keep = s > (res["switch_points"][0] if name == "progressive" else 0)
        ax.plot(s[keep], np.abs(ema - ref)[keep], color=COLORS[name],
                ls=":" if name == "progressive" else "-", lw=1.5,
                label=f"{LABELS[name]}  (mean {gap(ema, ref):.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("samples seen")
    ax.set_ylabel(r"|EMA loss $-$ EMA loss at $\kappa=1$|")
    ax.set_title(r"Gap to $\kappa=1$")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    if has_cos:
        ax = axes[2]
        for name in ("cos_k1", "cos_k8"):
            s, ema, _ = res[name]
            ax.plot(s, ema, color=COLORS[name], lw=2.2 if name == "cos_k1" else 1.5,
                    label=LABELS[name])
        ax.set_yscale("log")
        ax.set_xlabel("samples seen")
        ax.set_title(r"ek.schedules.cosine(0.99, 1.0): $\rho(s)$, $s$ = samples / 32")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    for ax in axes:
        ax.xaxis.set_major_formatter(thousands)
    fig.suptitle("ek.AdamW(lr=1e-3, ema_decay=0.999) on a 10-class Gaussian mixture "
                 "(10% label noise), MLP 24-256-256-10", fontsize=11)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=196_608, help="samples per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(here, os.pardir, "docs", "scaling_training.png"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these matmuls are too small to gain from more, "
                        "and one thread gives the same numbers on every machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = run_all(total_samples=args.samples, seed=args.seed, backend=args.backend, verbose=True)
    print(f"{'run':<40s}{'final EMA loss':>16s}{'final model loss':>18s}{'mean gap to k=1':>17s}")
    for name in ("k1", "k8_full", "k8_fixed", "progressive", "cos_k1", "cos_k8"):
        s, ema, raw = res[name]
        g = gap(ema, res["cos_k1" if name == "cos_k8" else "k1"][1]) if name not in ("k1", "cos_k1") else 0.0
        print(f"{name:<40s}{ema[-1]:>16.4f}{raw[-1]:>18.4f}{g:>17.4f}")
    try:
        plot(res, args.out)
        print(f"wrote {os.path.normpath(args.out)}")
    except ImportError:
        print("matplotlib is not installed: skipped the figure (pip install matplotlib)")
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
