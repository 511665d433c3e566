"""The EMA Scaling Rule on the noisy parabola (Busbridge et al., "How to Scale Your EMA", §3).

R independent 1-d problems L(θ) = a/2·θ², held as ONE parameter tensor of R replicas, trained
with ``ema_kernels.SGD`` at batch-size scale κ. A sample's gradient is aθ + σε (ε ~ N(0, 1));
the base batch is one sample, so a batch of κ samples has gradient aθ + σ·mean(ε_1..ε_κ), i.e.
noise σ/√κ. With ``kappa=κ`` the optimizer scales its own learning rate (η → κη, the linear
rule for SGD) and we compare three choices for the EMA decay per step at scale κ:

    ρ^κ            the EMA Scaling Rule (what ``kappa=κ`` does by default)
    1 − κ(1 − ρ)   the "linear" rule (first-order expansion of ρ^κ)
    ρ              no scaling at all

Every run sees 4096 base steps' worth of samples (4096/κ optimizer steps). We plot mean and
variance of the EMA ζ across replicas against samples seen, one panel per rule, with the κ=1
closed form E[ζ](t) as a dashed line, and print max_t |E[ζ]_κ − E[ζ]_{κ=1}|.

    python examples/noisy_parabola.py            # writes docs/noisy_parabola.png
    python examples/noisy_parabola.py --replicas 50000 --out /tmp/p.png
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

try:
    import ema_kernels as ek
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import ema_kernels as ek

ETA = 0.01        # SGD learning rate at the base batch (one sample)
RHO = 0.999       # EMA decay at the base batch
A = 1.0           # curvature
SIGMA = 1.0       # per-sample gradient noise
BASE_STEPS = 4096
KAPPAS = (1, 2, 8, 32, 128)
RULES = ("ours", "linear", "unscaled")
RULE_LABELS = {"ours": r"$\rho^\kappa$ (EMA Scaling Rule, ours)",
               "linear": r"$1-\kappa(1-\rho)$ (linear rule)",
               "unscaled": r"$\rho$ (no EMA scaling)"}


def target_decay(rule: str, rho: float, kappa: float) -> float:
    """The EMA decay per optimizer step that ``rule`` prescribes at batch-size scale κ."""
    if rule == "ours":
        return rho ** kappa
    if rule == "linear":
        d = 1.0 - kappa * (1.0 - rho)
        if d < 0.0:
            raise ValueError(f"the linear rule 1 - kappa*(1 - rho) = {d:.6g} < 0 for kappa={kappa}, "
                             f"rho={rho}: it has no meaning beyond kappa = 1/(1 - rho) = "
                             f"{1.0 / (1.0 - rho):.6g}")
        return d
    if rule == "unscaled":
        return rho
    raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")


def ema_decay_for(rule: str, rho: float, kappa: float) -> float:
    """The ``ema_decay`` to pass to an optimizer built with ``kappa=κ`` so that it runs ``rule``.

    With ``kappa=κ`` our optimizers always raise the base-batch decay to the power κ (ρ̂ = ρ^κ).
    To run another rule *through the same optimizer* (same lr scaling, same step, only the EMA
    decay differs) we hand it the base-batch decay that maps onto the rule's per-step decay d:
    ``ema_decay = d^(1/κ)``, so that the optimizer's (d^(1/κ))^κ = d (exact up to one rounding
    of a double). For "ours" that is just ρ.
    """
    if rule == "ours":
        return rho
    return target_decay(rule, rho, kappa) ** (1.0 / kappa)


def closed_form_mean(t, a: float = A, eta: float = ETA, rho: float = RHO):
    """E[ζ](t) at κ = 1 in the continuous-time (SDE) limit, t = η·(base steps), θ0 = ζ0 = 1.

    dE[θ]/dt = −a E[θ],  dE[ζ]/dt = β0 (E[θ] − E[ζ]) with β0 = (1 − ρ)/η, so
    E[ζ] = e^{−β0 t} + β0/(β0 − a) · (e^{−a t} − e^{−β0 t}).
    """
    t = np.asarray(t, dtype=np.float64)
    b0 = (1.0 - rho) / eta
    return np.exp(-b0 * t) + b0 / (b0 - a) * (np.exp(-a * t) - np.exp(-b0 * t))


def simulate(kappa: int, rule: str = "ours", replicas: int = 10_000, base_steps: int = BASE_STEPS,
             seed: int = 0, eta: float = ETA, rho: float = RHO, a: float = A,
             sigma: float = SIGMA, backend: str = "auto"):
    """Train R replicas with ``ek.SGD(kappa=κ)``; returns (samples_seen, mean ζ, var ζ) arrays.

    Index 0 is the initial state (samples_seen 0). Statistics are over the R replicas (float64
    accumulation). Runs with the same seed draw the same per-sample noise for the same samples
    (a batch of κ samples is κ consecutive draws), so the κ runs and rules are compared on common
    random numbers and the θ trajectories of the three rules at one κ are identical.
    """
    if base_steps % kappa:
        raise ValueError(f"base_steps={base_steps} is not a multiple of kappa={kappa}")
    gen = torch.Generator().manual_seed(seed)
    theta = torch.nn.Parameter(torch.ones(replicas))
    opt = ek.SGD([theta], lr=eta, kappa=kappa, ema_decay=ema_decay_for(rule, rho, kappa),
                 backend=backend)
    zeta = opt.ema_parameters()[0]          # a live view of the EMA storage
    n = base_steps // kappa
    mean = np.empty(n + 1)
    var = np.empty(n + 1)
    mean[0], var[0] = 1.0, 0.0
    for i in range(1, n + 1):
        # Per-sample noise for the κ samples of this batch; the batch gradient is their mean.
        eps = torch.randn(kappa, replicas, generator=gen)
        noise = eps[0] if kappa == 1 else eps.mean(0)
        theta.grad = theta.detach() * a + sigma * noise
        opt.step()
        z = zeta.double()
        mean[i] = z.mean().item()
        var[i] = z.var().item()
    samples = np.arange(n + 1) * kappa
    return samples, mean, var


def max_error(kappa, mean, ref_mean):
    """max over the κ run's steps of |E[ζ]_κ − E[ζ]_{κ=1}| at equal samples seen."""
    return float(np.abs(mean - ref_mean[::kappa]).max())


def run_all(kappas=KAPPAS, rules=RULES, replicas=10_000, base_steps=BASE_STEPS, seed=0,
            backend="auto", verbose=False):
    """{(rule, κ): (samples, mean, var)}; κ = 1 is run once (all rules coincide there)."""
    results = {}
    for kappa in kappas:
        for rule in rules:
            if kappa == 1 and rule != rules[0]:
                results[(rule, 1)] = results[(rules[0], 1)]
                continue
            t0 = time.perf_counter()
            results[(rule, kappa)] = simulate(kappa, rule, replicas, base_steps, seed,
                                              backend=backend)
            if verbose:
                print(f"  kappa={kappa:<4d} {rule:<9s} {time.perf_counter() - t0:5.1f} s",
                      file=sys.stderr)
    return results


def error_table(results, kappas=KAPPAS, rules=RULES):
    """{rule: {κ: max |E[ζ]_κ − E[ζ]_{κ=1}|}}."""
    ref = results[(rules[0], 1)][1]
    return {rule: {k: max_error(k, results[(rule, k)][1], ref) for k in kappas} for rule in rules}


def format_table(table, kappas=KAPPAS, rules=RULES) -> str:
    head = "max |E[zeta] - E[zeta]_{kappa=1}|".ljust(36) + "".join(f"k={k:<8d}" for k in kappas)
    lines = [head]
    for rule in rules:
        name = {"ours": "rho^kappa (ours)", "linear": "1 - kappa(1 - rho)",
                "unscaled": "rho (unscaled)"}[rule]
        lines.append(name.ljust(36) + "".join(f"{table[rule][k]:<10.4f}" for k in kappas))
    return "\n".join(lines)


def plot(results, path, kappas=KAPPAS, rules=RULES, replicas=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(rules), figsize=(5.2 * len(rules), 7.4), sharex=True,
                             sharey="row", constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    colors = {k: cmap(i / max(1, len(kappas) - 1) * 0.9) for i, k in enumerate(kappas)}
    t_dense = np.linspace(0, BASE_STEPS, 1000)
    cf = closed_form_mean(ETA * t_dense)
    for j, rule in enumerate(rules):
        ax_m, ax_v = axes[0, j], axes[1, j]
        for k in kappas:
            s, m, v = results[(rule, k)]
            ax_m.plot(s, m, color=colors[k], lw=1.4, label=f"$\\kappa={k}$")
            ax_v.plot(s, v, color=colors[k], lw=1.4)
        ax_m.plot(t_dense, cf, "k--", lw=1.2, label=r"closed form, $\kappa=1$")
        ax_m.set_title(RULE_LABELS[rule])
        ax_v.set_xlabel("samples seen (base steps)")
        ax_m.grid(alpha=0.3)
        ax_v.grid(alpha=0.3)
    axes[0, 0].set_ylabel(r"$\mathbb{E}[\zeta]$")
    axes[1, 0].set_ylabel(r"$\mathrm{Var}[\zeta]$")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    sub = f", R = {replicas:,} replicas" if replicas else ""
    fig.suptitle("Noisy parabola, ek.SGD(lr=0.01, ema_decay=0.999, kappa=$\\kappa$): EMA of the "
                 f"weights vs samples seen{sub}", fontsize=11)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(here, os.pardir, "docs", "noisy_parabola.png"))
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    results = run_all(replicas=args.replicas, seed=args.seed, backend=args.backend, verbose=True)
    table = error_table(results)
    print(format_table(table))
    # The discrete κ = 1 run against its continuous-time limit (an O(η) discretisation gap).
    s, m, _ = results[("ours", 1)]
    print(f"kappa=1 simulation vs closed form: max |diff| = "
          f"{np.abs(m - closed_form_mean(ETA * s)).max():.4f}")
    try:
        plot(results, args.out, replicas=args.replicas)
        print(f"wrote {os.path.normpath(args.out)}")
    except ImportError:
        print("matplotlib is not installed: skipped the figure (pip install matplotlib)")
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
