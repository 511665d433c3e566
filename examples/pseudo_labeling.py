"""The EMA Scaling Rule for a pseudo-labeling teacher (the paper's Figure 4, on a CPU toy).

Busbridge et al. (*How to Scale Your EMA*, NeurIPS 2023) train a student on labelled data plus
pseudo-labels produced by an EMA *teacher* of the student itself. Here the EMA feeds back into
training: a teacher that lags produces stale labels, and the student learns from them. This
script reproduces that setting small enough for two CPU cores:

    task      10-class Gaussian mixture in 32 dimensions, classes overlapping (Bayes ≈ 0.9);
              2 labelled points per class, 8,192 unlabelled, 4,096 clean test points
    student   MLP 32-128-128-10, pre-trained on the 20 labelled points (≈ 0.55 test accuracy)
    teacher   ``teacher = opt.ema_module(model)`` — live views of the EMA kept by
              ``ek.AdamW(..., ema_decay=ρ, kappa=κ)``; built once, reused every step
    a step    the teacher labels the unlabelled batch (hard labels, kept where its confidence
              is > 0.8, as in pseudo-labeling / FixMatch); the student trains on labelled +
              pseudo-labelled points, its inputs perturbed by Gaussian noise ("noisy student")
    scaling   base batch 16 labelled + 64 unlabelled; at κ the batch is κ times larger and a
              batch is κ consecutive base batches, so every run sees the same samples in the
              same order. κ ∈ {1, 2, 4, 8}, ρ = 0.999 at the base batch (the paper's ρ_B = 0.9999
              scaled down to a run of 4,096 base steps).

Two arms at each κ, both with Adam's square-root rule (lr·√κ, β → 1 − κ(1 − β), ε/√κ):

    with the rule     ``ema_decay=ρ, kappa=κ``: the teacher decays by ρ^κ per step
    without the rule  ``ema_decay=ρ**(1/κ), kappa=κ``: the optimizer raises it to the power κ,
                      so the teacher decays by ρ per step and averages over κ× more samples

With the rule the teacher (and the student it teaches) tracks κ=1 at every κ; without it the
teacher lags, its labels stay close to the pre-trained model's, and the student learns from
them: both end far below κ=1, more so as κ grows.

    python examples/pseudo_labeling.py            # full run, ~4 min: writes docs/pseudo_labeling.png
    python examples/pseudo_labeling.py --quick    # κ ∈ {1, 8}, 2 seeds, shorter: seconds (tests)
"""
from __future__ import annotations

import argparse
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

CLASSES, DIM = 10, 32
LABELLED_BATCH, UNLABELLED_BATCH = 16, 64   # the base batch (κ = 1)
LR = 1e-3
WEIGHT_DECAY = 1e-2
RHO = 0.999            # teacher momentum at the base batch
THRESHOLD = 0.8        # keep a pseudo-label where the teacher's confidence exceeds this
INPUT_NOISE = 0.5      # std of the Gaussian noise on the student's unlabelled inputs
PRETRAIN_STEPS = 200


# ------------------------------------------------------------------------------- the task ------
def make_data(seed=0, per_class=2, n_unlabelled=8_192, n_test=4_096, separation=0.6):
    """Gaussian mixture, one unit-variance Gaussian per class around centres ~ N(0, sep²·I).

    With ``separation=0.6`` the classes overlap (the nearest-centre rule scores ≈ 0.9), and two
    labelled points per class leave the supervised model at ≈ 0.55: the unlabelled points are
    needed to find where the classes are, which is what pseudo-labeling exploits.
    Returns a dict of tensors; ``y_unl`` (the unlabelled points' labels) is only used to
    measure how good the pseudo-labels are, never for training.
    """
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=g) * separation
    y_lab = torch.arange(CLASSES).repeat_interleave(per_class)
    x_lab = centres[y_lab] + torch.randn(len(y_lab), DIM, generator=g)
    y_unl = torch.randint(CLASSES, (n_unlabelled,), generator=g)
    x_unl = centres[y_unl] + torch.randn(n_unlabelled, DIM, generator=g)
    y_test = torch.randint(CLASSES, (n_test,), generator=g)
    x_test = centres[y_test] + torch.randn(n_test, DIM, generator=g)
    return dict(x_lab=x_lab, y_lab=y_lab, x_unl=x_unl, y_unl=y_unl, x_test=x_test, y_test=y_test)


def make_model(seed=0, width=128):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, width), torch.nn.GELU(),
        torch.nn.Linear(width, width), torch.nn.GELU(),
        torch.nn.Linear(width, CLASSES))


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


def pretrain(model, x_lab, y_lab, steps=PRETRAIN_STEPS):
    """Supervised warm start on the labelled points only (full batch, plain torch AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x_lab), y_lab).backward()
        opt.step()


def ema_decay_for(rule: str, rho: float, kappa: float) -> float:
    """``ema_decay`` to pass with ``kappa=κ``: "rule" → ρ (ρ^κ per step), "none" → ρ^(1/κ)
    (the optimizer raises it to the power κ, so ρ per step: Adam's rule only)."""
    if rule == "rule":
        return rho
    if rule == "none":
        return rho ** (1.0 / kappa)
    raise ValueError(f"unknown rule {rule!r}: 'rule' or 'none'")


# ------------------------------------------------------------------------------- a run ---------
def train(data, kappa=1, rule="rule", rho=RHO, base_steps=4_096, evals=32, seed=0):
    """Pre-train, then pseudo-label for ``base_steps`` base steps (base_steps/κ steps).

    Returns a dict of arrays against base steps ``s`` (samples seen = s · 80): teacher and
    student test accuracy, the fraction of unlabelled points that got a pseudo-label and the
    accuracy of those labels (both over the last evaluation interval).
    """
    x_lab, y_lab, x_unl, x_test, y_test = (data[k] for k in ("x_lab", "y_lab", "x_unl", "x_test",
                                                                "y_test"))
    if base_steps % (kappa * evals):
        raise ValueError(f"base_steps={base_steps} must be a multiple of κ·evals={kappa * evals}")
    model = make_model(seed)
    pretrain(model, x_lab, y_lab)
    opt = ek.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                   ema_decay=ema_decay_for(rule, rho, kappa), kappa=kappa)
    # Built once, after the optimizer: its parameters are live views of the EMA, so after
    # every step() it already is the new teacher. The EMA starts as a copy of the pre-trained
    # student, so the teacher's first labels are the supervised model's.
    teacher = opt.ema_module(model)

    # The same sample stream for every κ and rule: a step at κ takes κ consecutive base batches.
    g = torch.Generator().manual_seed(seed + 1)
    unl_order = torch.randint(len(x_unl), (base_steps * UNLABELLED_BATCH,), generator=g)
    lab_order = torch.randint(len(x_lab), (base_steps * LABELLED_BATCH,), generator=g)
    noise = torch.Generator().manual_seed(seed + 2)

    every = base_steps // evals
    out = {k: [v] for k, v in (("s", 0), ("teacher", accuracy(teacher, x_test, y_test)),
                                ("student", accuracy(model, x_test, y_test)),
                                ("mask_rate", float("nan")), ("label_acc", float("nan")))}
    kept = correct = offered = 0
    s = 0
    while s < base_steps:
        iu = unl_order[s * UNLABELLED_BATCH:(s + kappa) * UNLABELLED_BATCH]
        il = lab_order[s * LABELLED_BATCH:(s + kappa) * LABELLED_BATCH]
        xu = x_unl[iu]
        with torch.no_grad():
            conf, pseudo = F.softmax(teacher(xu), dim=1).max(dim=1)
        mask = (conf > THRESHOLD).float()
        xu_noisy = xu + INPUT_NOISE * torch.randn(xu.shape, generator=noise)
        loss_u = (F.cross_entropy(model(xu_noisy), pseudo, reduction="none") * mask).mean()
        loss = F.cross_entropy(model(x_lab[il]), y_lab[il]) + loss_u
        opt.zero_grad()
        loss.backward()
        opt.step()
        s += kappa
        # Diagnostics only (the labels of the unlabelled points are never used for training).
        kept += int(mask.sum())
        offered += len(iu)
        correct += int(((pseudo == data["y_unl"][iu]) * mask.bool()).sum())
        if s % every == 0:
            out["s"].append(s)
            out["teacher"].append(accuracy(teacher, x_test, y_test))
            out["student"].append(accuracy(model, x_test, y_test))
            out["mask_rate"].append(kept / offered)
            out["label_acc"].append(correct / max(kept, 1))
            kept = correct = offered = 0
    return {k: np.array(v) for k, v in out.items()}


# ------------------------------------------------------------------------------- all runs ------
FULL = dict(kappas=(1, 2, 4, 8), seeds=(0, 1, 2, 3, 4), base_steps=4_096, evals=32, rho=RHO)
# A quarter of the run with the same teacher horizon relative to the run length: 1/(1 − ρ) is
# a quarter of the run's base steps in both (1,000 of 4,096; 250 of 1,024).
QUICK = dict(kappas=(1, 8), seeds=(0, 1), base_steps=1_024, evals=16, rho=0.996)


def run_all(kappas=FULL["kappas"], seeds=FULL["seeds"], base_steps=FULL["base_steps"],
            evals=FULL["evals"], rho=RHO, verbose=False):
    """{(κ, rule): {metric: array[seed, eval]}}; κ=1 has only the "rule" arm (both are equal)."""
    arms = [(k, r) for k in kappas for r in (("rule",) if k == 1 else ("rule", "none"))]
    per = {arm: [] for arm in arms}
    for seed in seeds:
        data = make_data(seed)
        for kappa, rule in arms:
            t0 = time.perf_counter()
            per[(kappa, rule)].append(train(data, kappa, rule, rho, base_steps, evals, seed))
            if verbose:
                print(f"  seed {seed} κ={kappa} {rule:<4s} {time.perf_counter() - t0:5.1f} s",
                      file=sys.stderr)
    return {arm: {m: np.stack([r[m] for r in runs]) for m in runs[0]} for arm, runs in per.items()}


def summary(res):
    """Rows of the table in docs/teachers.md: final accuracies (mean, std over seeds) and the paired gap
    to κ=1 (κ=1 final teacher accuracy − this run's, per seed)."""
    ref = res[(1, "rule")]["teacher"][:, -1]
    rows = []
    for (kappa, rule), r in res.items():
        t, st = r["teacher"][:, -1], r["student"][:, -1]
        gap = ref - t
        rows.append(dict(kappa=kappa, rule=rule, teacher=(t.mean(), t.std()),
                         student=(st.mean(), st.std()), gap=(gap.mean(), gap.std()),
                         label_acc=float(np.nanmean(r["label_acc"][:, -1])),
                         mask_rate=float(np.nanmean(r["mask_rate"][:, -1]))))
    return rows


def format_table(rows, n_seeds):
    pm = lambda m: f"{m[0]:.3f} ± {m[1]:.3f}"  # noqa: E731
    arm = {"rule": "with the rule (ρ^κ per step)", "none": "without (ρ per step)"}
    lines = [f"| κ (batch) | teacher momentum | final teacher acc. | final student acc. | "
             f"gap to κ=1 (teacher) |",
             "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kappa"], r["rule"] != "rule")):
        k = r["kappa"]
        name = "—" if k == 1 else arm[r["rule"]]
        gap = "—" if k == 1 else pm(r["gap"])
        lines.append(f"| {k} ({k * (LABELLED_BATCH + UNLABELLED_BATCH)}) | {name} | "
                     f"{pm(r['teacher'])} | {pm(r['student'])} | {gap} |")
    lines.append(f"\nmean ± std over {n_seeds} seeds (new data, labelled set, init and sample "
                 f"order per seed); gap: paired per seed")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the figure ----
def plot(res, path, rho=RHO):
    """Top row: test accuracy per κ (teacher solid, student dashed), mean over seeds. Bottom
    row: the teacher's accuracy minus κ=1's, paired per seed (the seeds differ in how hard
    their task is, so unpaired bands would hide the effect), and at the left the pseudo-labels
    themselves at the largest κ."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    kappas = sorted({k for k, _ in res})
    fig, axes = plt.subplots(2, len(kappas), figsize=(4.2 * len(kappas), 7.2), sharex=True,
                             constrained_layout=True, squeeze=False,
                             gridspec_kw=dict(height_ratios=(3, 2)))
    per_base_step = LABELLED_BATCH + UNLABELLED_BATCH
    ref = res[(1, "rule")]
    x = ref["s"][0] * per_base_step
    color = {"rule": "tab:blue", "none": "tab:red"}
    label = {"rule": r"with the rule: $\rho^\kappa$ per step",
             "none": r"without: $\rho$ per step"}
    for col, k in enumerate(kappas):
        top, bottom = axes[0][col], axes[1][col]
        top.plot(x, ref["teacher"].mean(0), color="black", lw=1.8, label=r"$\kappa=1$ teacher")
        top.plot(x, ref["student"].mean(0), color="black", lw=1, ls="--",
                 label=r"$\kappa=1$ student")
        for rule in ("rule", "none"):
            r = res.get((k, rule))
            if k == 1 or r is None:
                continue
            top.plot(x, r["teacher"].mean(0), color=color[rule], lw=1.8,
                     label=f"{label[rule]}, teacher")
            top.plot(x, r["student"].mean(0), color=color[rule], lw=1, ls="--")
            gap = r["teacher"] - ref["teacher"]
            bottom.plot(x, gap.mean(0), color=color[rule], lw=1.8, label=label[rule])
            bottom.fill_between(x, gap.min(0), gap.max(0), color=color[rule], alpha=0.2, lw=0)
        top.set_title(rf"$\kappa={k}$ (batch {k * LABELLED_BATCH}+{k * UNLABELLED_BATCH})")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        bottom.set_xlabel("samples seen")
        bottom.xaxis.set_major_formatter(
            matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
    # Same y-range across the κ panels of each row (set after plotting, so autoscaling saw
    # every curve).
    for row in (axes[0], axes[1][1:]):
        lo = min(ax.get_ylim()[0] for ax in row)
        hi = max(ax.get_ylim()[1] for ax in row)
        for ax in row:
            ax.set_ylim(lo, hi)
    axes[0][0].set_ylabel("test accuracy (solid: EMA teacher, dashed: student)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    axes[0][0].legend(fontsize=8, loc="lower right")
    axes[1][1].set_ylabel(r"teacher accuracy $-$ $\kappa=1$'s (paired)")
    axes[1][-1].legend(fontsize=8, loc="lower left")
    # Bottom left: what the teacher hands the student at the largest κ.
    ax, kmax = axes[1][0], kappas[-1]
    for arm, c, name in (((1, "rule"), "black", r"$\kappa=1$"),
                         ((kmax, "rule"), color["rule"], rf"$\kappa={kmax}$, rule"),
                         ((kmax, "none"), color["none"], rf"$\kappa={kmax}$, without")):
        if arm in res:
            r = res[arm]
            ax.plot(x[1:], np.nanmean(r["label_acc"][:, 1:], 0), color=c, lw=1.5,
                    label=f"{name}: accuracy of kept labels")
            ax.plot(x[1:], np.nanmean(r["mask_rate"][:, 1:], 0), color=c, lw=1, ls=":",
                    label=f"{name}: fraction kept")
    ax.set_ylabel(f"pseudo-labels (confidence > {THRESHOLD:g})")
    ax.legend(fontsize=7, loc="lower right")
    n = ref["teacher"].shape[0]
    fig.suptitle(f"Pseudo-labeling with an EMA teacher (opt.ema_module), ek.AdamW(lr={LR:g}, "
                 f"kappa=κ), teacher ρ={rho:g} at the base batch\n10-class Gaussian mixture, "
                 f"2 labels per class; mean of {n} seeds, bands: min–max over seeds", fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"κ ∈ {QUICK['kappas']}, seeds {QUICK['seeds']}, "
                        f"{QUICK['base_steps']} base steps (seconds; used by the tests)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0, 1, ...)")
    p.add_argument("--rho", type=float, default=None,
                   help=f"teacher momentum at the base batch (default {RHO}, --quick "
                        f"{QUICK['rho']})")
    p.add_argument("--out", default=os.path.join(here, os.pardir, "docs", "pseudo_labeling.png"))
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the matmuls are tiny, and one thread gives "
                        "the same numbers on every machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = tuple(range(args.seeds))
    if args.rho is not None:
        cfg["rho"] = args.rho
    t0 = time.perf_counter()
    res = run_all(verbose=True, **cfg)
    rows = summary(res)
    pre = res[(1, "rule")]["teacher"][:, 0]
    print(f"pseudo-labeling, teacher ρ={cfg['rho']:g} at the base batch, "
          f"{cfg['base_steps']} base steps ({cfg['base_steps'] * (LABELLED_BATCH + UNLABELLED_BATCH):,}"
          f" samples) per run; pre-trained student: {pre.mean():.3f} ± {pre.std():.3f}")
    print(format_table(rows, len(cfg["seeds"])))
    try:
        plot(res, args.out, cfg["rho"])
        print(f"wrote {os.path.normpath(args.out)}")
    except ImportError:
        print("matplotlib is not installed: skipped the figure (pip install matplotlib)")
    print(f"total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return dict(results=res, rows=rows)


if __name__ == "__main__":
    main()
