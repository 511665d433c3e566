"""The EMA Scaling Rule for BYOL's target network, on a CPU toy.

BYOL (Grill et al. 2020) trains an online network (encoder + projector + predictor) to predict
the projection that an EMA *target* of itself gives to another augmented view of the same
input; the target is never trained, it only follows the online weights. Busbridge et al. (*How
to Scale Your EMA*, NeurIPS 2023) show that the target's momentum must follow ρ → ρ^κ when the
batch grows κ-fold. This script builds the smallest BYOL we could make that learns something:

    data        1-d signals of length 64, 8 classes; class c is a sum of two sinusoids with a
                class-specific pair of frequencies, random phases and amplitudes, plus noise.
                The phase makes the raw signal useless to a linear model (probe ≈ 0.2).
    views       random circular shift (a crop of the periodic signal), gain, noise, and a masked
                segment of 16 samples: invariance to them is what separates the classes.
    networks    encoder MLP 64-128-128-64, projector 64-128-32, predictor 32-128-32, with
                BatchNorm as in BYOL (``track_running_stats=False``: batch statistics only, so
                the target has no buffers and is exactly the EMA of the online parameters).
    optimizer   ``ek.LARS`` (the optimizer of BYOL and of the EMA paper's self-supervised
                runs): momentum 0.9, trust coefficient η, weight decay on the weight matrices,
                biases and BatchNorm in groups with ``weight_decay=0`` (no decay, no trust
                ratio: BYOL's exclusion); ``kappa=κ``, ``ema_schedule=ek.schedules.cosine(0.99,
                1.0, total_steps=base steps)``; the predictor's groups keep no EMA
                (``ema_decay=None``); ``target = opt.ema_module(online)``, built once.
    scaling     base batch 64, κ ∈ {1, 8}: batch 512 takes 8 consecutive base batches, same
                samples seen. With the rule the schedule is passed as is (indexed by base steps,
                ρ(s)^κ per step). Without it, ρ(s)^(1/κ) is passed (a plain callable, which the
                optimizer raises to the power κ): ρ(s) per step, LARS' own rule (lr·κ) only.
    measured    linear-probe accuracy (ridge regression on 50 labelled signals per class) of
                the target's and the online encoder; the target's lag ‖ζ − θ‖/‖θ‖; and the
                spread of the target's normalised projections, std·√d (1: spread over all
                directions, 0: collapsed to a point).

What it shows (docs/optimizers.md, "BYOL with LARS"; docs/teachers.md): the rule keeps the target's lag at κ=8
where it is at κ=1 (0.048 against 0.043, mean ‖ζ − θ‖/‖θ‖ over 5 seeds), while without it the
target averages over 8× more samples and lags about three times further behind (0.135); in the
short --quick run the lagging target is also the worse encoder at the end. On this toy, BYOL does
not fail or collapse without the rule: by the end of the full run (ρ → 1 freezes both targets)
the final probe accuracies of all three arms are level (0.95-0.96; with LARS' linear rule the
ruled κ=8 run matches κ=1's final probe to 0.000 ± 0.033).

    python examples/byol.py            # full run, ~4 min on an idle 2-core CPU: docs/byol.png
    python examples/byol.py --quick    # 2 seeds, 1,024 base steps: seconds (tests)
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

CLASSES, LENGTH = 8, 64
BASE_BATCH = 64
LR = 0.2               # LARS at the base batch (64); κ scales it linearly (scale_optimizer=True)
MOMENTUM = 0.9
TRUST = 0.002          # LARS' η: a step moves each weight matrix by about lr·η·‖θ‖
WEIGHT_DECAY = 1e-4
RHO_START = 0.99       # BYOL's cosine schedule from 0.99 to 1 over the run (in base steps)
WIDTH, REPR, PROJ = 128, 64, 32
MASK = 16              # length of the masked segment of a view


# ------------------------------------------------------------------------------- the task ------
def make_data(seed=0, n_train=8_192, probe_per_class=50, n_test=2_048, noise=0.3):
    """Unlabelled training signals, a small labelled probe set and a test set (dict)."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(a, b) for a in range(1, 9) for b in range(a + 1, 10)]
    pick = torch.randperm(len(pairs), generator=g)[:CLASSES]
    freqs = torch.tensor([pairs[int(i)] for i in pick], dtype=torch.float32)   # [C, 2]
    t = torch.arange(LENGTH, dtype=torch.float32) / LENGTH

    def sample(y):
        n = len(y)
        phase = torch.rand(n, 2, 1, generator=g) * 2 * math.pi
        amp = 0.5 + torch.rand(n, 2, 1, generator=g)
        waves = amp * torch.sin(2 * math.pi * freqs[y][:, :, None] * t + phase)   # [n, 2, L]
        return waves.sum(1) + noise * torch.randn(n, LENGTH, generator=g)

    y_train = torch.randint(CLASSES, (n_train,), generator=g)
    y_probe = torch.arange(CLASSES).repeat_interleave(probe_per_class)
    y_test = torch.randint(CLASSES, (n_test,), generator=g)
    return dict(x_train=sample(y_train), x_probe=sample(y_probe), y_probe=y_probe,
                x_test=sample(y_test), y_test=y_test)


def augment(x, g):
    """One random view: circular shift, gain in [0.6, 1.4], noise 0.3, a zeroed segment."""
    n = x.shape[0]
    shift = torch.randint(LENGTH, (n, 1), generator=g)
    x = torch.gather(x, 1, (torch.arange(LENGTH) + shift) % LENGTH)
    x = x * (0.6 + 0.8 * torch.rand(n, 1, generator=g)) + 0.3 * torch.randn(x.shape, generator=g)
    start = torch.randint(LENGTH - MASK, (n, 1), generator=g)
    pos = torch.arange(LENGTH)
    return x.masked_fill((pos >= start) & (pos < start + MASK), 0.0)


def _bn(n):
    # Batch statistics only (no running buffers): the target is then exactly the EMA of the
    # online parameters, and evaluation needs no train/eval switch.
    return torch.nn.BatchNorm1d(n, track_running_stats=False)


def mlp(n_in, hidden, n_out):
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), _bn(hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, n_out))


class Online(torch.nn.Module):
    """Encoder + projector: the part of the online network that the target averages."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(LENGTH, WIDTH), _bn(WIDTH), torch.nn.ReLU(),
            torch.nn.Linear(WIDTH, WIDTH), _bn(WIDTH), torch.nn.ReLU(),
            torch.nn.Linear(WIDTH, REPR))
        self.projector = mlp(REPR, WIDTH, PROJ)

    def forward(self, x):
        return self.projector(self.encoder(x))


# ------------------------------------------------------------------------------- metrics -------
@torch.no_grad()
def linear_probe(encoder, data, ridge=0.1):
    """Test accuracy of a ridge-regression classifier on the frozen encoder's features."""
    fa, fb = encoder(data["x_probe"]), encoder(data["x_test"])
    mu, sd = fa.mean(0), fa.std(0) + 1e-6
    fa = torch.cat([(fa - mu) / sd, torch.ones(len(fa), 1)], 1)
    fb = torch.cat([(fb - mu) / sd, torch.ones(len(fb), 1)], 1)
    w = torch.linalg.solve(fa.T @ fa + ridge * torch.eye(fa.shape[1]),
                           fa.T @ F.one_hot(data["y_probe"], CLASSES).float())
    return ((fb @ w).argmax(1) == data["y_test"]).float().mean().item()


@torch.no_grad()
def spread(net, x):
    """std over samples of the l2-normalised output, averaged over dimensions, times √d."""
    z = F.normalize(net(x), dim=1)
    return (z.std(0).mean() * math.sqrt(z.shape[1])).item()


@torch.no_grad()
def lag(target, online):
    """‖ζ − θ‖ / ‖θ‖ over all averaged parameters (the target's parameters are the EMA)."""
    num = sum(((t - o) ** 2).sum() for t, o in zip(target.parameters(), online.parameters()))
    den = sum((o ** 2).sum() for o in online.parameters())
    return math.sqrt(num / den)


def lars_groups(online, predictor):
    """BYOL's LARS groups: weight matrices with weight decay (and the trust ratio), biases and
    BatchNorm without either; the predictor keeps no EMA (``ema_decay=None``)."""
    def split(module, **extra):
        ps = list(module.parameters())
        return [dict(params=[p for p in ps if p.dim() > 1], **extra),
                dict(params=[p for p in ps if p.dim() <= 1], weight_decay=0.0, **extra)]
    return split(online) + split(predictor, ema_decay=None)


class PerStep:
    """``ema_schedule`` that makes the EMA decay by ρ(s) per *step* when given with kappa=κ.

    A plain callable: the optimizer treats it to first order, raising ρ(s)^(1/κ) to the
    power κ over the κ base steps a step covers, which gives ρ(s) — the "without the rule" arm.
    """

    def __init__(self, schedule, kappa):
        self.schedule, self.kappa = schedule, kappa

    def __call__(self, s):
        return self.schedule(s) ** (1.0 / self.kappa)


# ------------------------------------------------------------------------------- a run ---------
def train(data, kappa=1, rule="rule", base_steps=4_096, evals=16, seed=0):
    """One BYOL run; a dict of arrays against base steps ``s`` (samples seen = 64·s)."""
    if base_steps % (kappa * evals):
        raise ValueError(f"base_steps={base_steps} must be a multiple of κ·evals={kappa * evals}")
    torch.manual_seed(seed)
    online, predictor = Online(), mlp(PROJ, WIDTH, PROJ)
    cosine = ek.schedules.cosine(RHO_START, 1.0, total_steps=base_steps)   # in base steps
    schedule = {"rule": cosine, "none": PerStep(cosine, kappa)}[rule]
    opt = ek.LARS(lars_groups(online, predictor), lr=LR, momentum=MOMENTUM,
                  weight_decay=WEIGHT_DECAY, trust_coefficient=TRUST, ema_schedule=schedule,
                  kappa=kappa)
    target = opt.ema_module(online)   # once: live views of the EMA, current after every step()

    x_train = data["x_train"]
    order = torch.randint(len(x_train), (base_steps * BASE_BATCH,),
                          generator=torch.Generator().manual_seed(seed + 1))
    views = torch.Generator().manual_seed(seed + 2)

    def record(out, s, loss):
        out["s"].append(s)
        out["target"].append(linear_probe(target.encoder, data))
        out["online"].append(linear_probe(online.encoder, data))
        out["spread"].append(spread(target, data["x_test"]))
        out["lag"].append(lag(target, online))
        out["loss"].append(loss)

    out = {k: [] for k in ("s", "target", "online", "spread", "lag", "loss")}
    record(out, 0, float("nan"))
    every, s, running = base_steps // evals, 0, []
    while s < base_steps:
        x = x_train[order[s * BASE_BATCH:(s + kappa) * BASE_BATCH]]
        v1, v2 = augment(x, views), augment(x, views)
        p1, p2 = predictor(online(v1)), predictor(online(v2))
        with torch.no_grad():
            z1, z2 = target(v1), target(v2)
        # BYOL's symmetric loss: 2 − 2·cos(prediction of one view, target of the other).
        loss = (4 - 2 * F.cosine_similarity(p1, z2, dim=1).mean()
                - 2 * F.cosine_similarity(p2, z1, dim=1).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        s += kappa
        running.append(loss.item())
        if s % every == 0:
            record(out, s, float(np.mean(running)))
            running = []
    return {k: np.array(v) for k, v in out.items()}


# ------------------------------------------------------------------------------- all runs ------
FULL = dict(kappas=(1, 8), seeds=(0, 1, 2, 3, 4), base_steps=4_096, evals=16)
QUICK = dict(kappas=(1, 8), seeds=(0, 1), base_steps=1_024, evals=8)


def run_all(kappas=FULL["kappas"], seeds=FULL["seeds"], base_steps=FULL["base_steps"],
            evals=FULL["evals"], verbose=False):
    """{(κ, rule): {metric: array[seed, eval]}}; κ=1 has only the "rule" arm (both are equal)."""
    arms = [(k, r) for k in kappas for r in (("rule",) if k == 1 else ("rule", "none"))]
    per = {arm: [] for arm in arms}
    for seed in seeds:
        data = make_data(seed)
        for kappa, rule in arms:
            t0 = time.perf_counter()
            per[(kappa, rule)].append(train(data, kappa, rule, base_steps, evals, seed))
            if verbose:
                print(f"  seed {seed} κ={kappa} {rule:<4s} {time.perf_counter() - t0:5.1f} s",
                      file=sys.stderr)
    return {arm: {m: np.stack([r[m] for r in runs]) for m in runs[0]} for arm, runs in per.items()}


def summary(res):
    """Per arm: (mean, std over seeds) of the target's probe accuracy at a quarter of the run
    and at the end, the online probe at the end, the target's mean lag and final spread, and
    the paired gap of the final target probe to κ=1."""
    ref = res[(1, "rule")]
    rows = []
    for (kappa, rule), r in res.items():
        q = (r["s"].shape[1] - 1) // 4       # evaluation index at a quarter of the samples
        stats = dict(quarter=r["target"][:, q], target=r["target"][:, -1],
                     online=r["online"][:, -1], lag=r["lag"][:, 1:].mean(1),
                     spread=r["spread"][:, -1], gap=ref["target"][:, -1] - r["target"][:, -1],
                     gap_quarter=ref["target"][:, q] - r["target"][:, q])
        rows.append(dict(kappa=kappa, rule=rule,
                         **{k: (float(v.mean()), float(v.std())) for k, v in stats.items()}))
    return rows


def format_table(rows, n_seeds):
    pm = lambda m, f=".3f": f"{m[0]:{f}} ± {m[1]:{f}}"  # noqa: E731
    arm = {"rule": "with the rule (ρ(s)^κ per step)", "none": "without (ρ(s) per step)"}
    lines = ["| κ (batch) | target momentum | target probe at 1/4 | final target probe | "
             "final online probe | mean lag ‖ζ−θ‖/‖θ‖ | final spread |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kappa"], r["rule"] != "rule")):
        k = r["kappa"]
        lines.append(f"| {k} ({k * BASE_BATCH}) | {'—' if k == 1 else arm[r['rule']]} | "
                     f"{pm(r['quarter'])} | {pm(r['target'])} | {pm(r['online'])} | "
                     f"{pm(r['lag'], '.4f')} | {pm(r['spread'], '.2f')} |")
    gaps = [f"κ={r['kappa']} {r['rule']}: {pm(r['gap_quarter'])} at 1/4, {pm(r['gap'])} at the end"
            for r in sorted(rows, key=lambda r: (r["kappa"], r["rule"] != "rule")) if r["kappa"] != 1]
    lines.append(f"\nmean ± std over {n_seeds} seeds; gap of the target probe to κ=1 (paired "
                 f"per seed): " + "; ".join(gaps))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the figure ----
COLORS = {(1, "rule"): "black", "rule": "tab:blue", "none": "tab:red"}


def _label(arm):
    k, rule = arm
    if k == 1:
        return r"$\kappa=1$"
    return rf"$\kappa={k}$, " + (r"with the rule: $\rho(s)^\kappa$ per step" if rule == "rule"
                                 else r"without: $\rho(s)$ per step")


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), constrained_layout=True)
    panels = (("target", "linear-probe accuracy (solid: target, dashed: online)", "linear"),
              ("lag", r"target lag $\|\zeta-\theta\|/\|\theta\|$", "log"),
              ("spread", r"target spread: std of $z/\|z\|$ $\times\sqrt{d}$", "linear"))
    for ax, (metric, ylabel, scale) in zip(axes, panels):
        for arm, r in res.items():
            color = COLORS.get(arm, COLORS[arm[1]])
            x = r["s"][0] * BASE_BATCH
            keep = slice(1, None) if metric == "lag" else slice(None)   # lag is 0 at the start
            y = r[metric][:, keep]
            ax.plot(x[keep], y.mean(0), color=color, lw=1.8, label=_label(arm))
            ax.fill_between(x[keep], y.min(0), y.max(0), color=color, alpha=0.15, lw=0)
            if metric == "target":
                ax.plot(x, r["online"].mean(0), color=color, lw=1, ls="--")
        ax.set_yscale(scale)
        ax.set_xlabel("samples seen")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_formatter(
            matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
    axes[0].legend(fontsize=8, loc="lower right")
    n = res[(1, "rule")]["target"].shape[0]
    fig.suptitle("BYOL on 1-d signals, ek.LARS(kappa=κ, ema_schedule=cosine(0.99, 1.0)), "
                 f"predictor without EMA; mean of {n} seeds, band: min–max", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"seeds {QUICK['seeds']}, {QUICK['base_steps']} base steps "
                        f"(seconds; used by the tests)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, ...)")
    p.add_argument("--out", default=os.path.join(here, os.pardir, "docs", "byol.png"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the matmuls are tiny, and one thread gives "
                        "the same numbers on every machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = tuple(range(args.seeds))
    t0 = time.perf_counter()
    res = run_all(verbose=True, **cfg)
    rows = summary(res)
    start = res[(1, "rule")]["target"][:, 0]
    print(f"BYOL, cosine(0.99, 1.0) over {cfg['base_steps']} base steps "
          f"({cfg['base_steps'] * BASE_BATCH:,} samples) per run; probe of the random-init "
          f"encoder: {start.mean():.3f} ± {start.std():.3f}")
    print(format_table(rows, len(cfg["seeds"])))
    try:
        plot(res, args.out)
        print(f"wrote {os.path.normpath(args.out)}")
    except ImportError:
        print("matplotlib is not installed: skipped the figure (pip install matplotlib)")
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return dict(results=res, rows=rows)


if __name__ == "__main__":
    main()
