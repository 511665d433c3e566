"""Post-hoc EMA (EDM2, Karras et al. 2024): pick the EMA length after training.

A small MLP learns a random teacher network from noisy samples (fresh ones every step, so the
EMA's averaging of the optimizer's noise is what matters) with ``ema_kernels.AdamW``. Two
power-function EMAs, σ_rel = 0.05 and 0.10, are snapshotted every N steps with
``ek.posthoc.save``; after training ``ek.posthoc.synthesize`` builds the EMA of every σ_rel in
0.02…0.25 from the snapshots, and we plot its held-out loss against σ_rel next to EMAs tracked
directly at a few σ_rel values (the ground truth the synthesis estimates).

Each tracked profile here is its own identical replica of the model, optimizer and data stream
(the trajectories are asserted equal bit for bit), so the run works with one EMA per optimizer;
with several EMAs per optimizer, ``ema_schedule=(power(sigma_rel=0.05),
power(sigma_rel=0.10))`` and ``posthoc.save(opt, path, index=(0, 1))`` do the same in one.

    python examples/posthoc_ema.py             # writes docs/posthoc_ema.png (~1 min, 1 core)
    python examples/posthoc_ema.py --quick     # a few seconds, for the tests
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

import numpy as np
import torch

try:
    import ema_kernels as ek
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    import ema_kernels as ek

from ema_kernels import posthoc
from ema_kernels.schedules import power, sigma_rel_to_gamma

D_IN, HIDDEN = 16, 64
LR = 5e-3
NOISE = 1.0          # label noise of the training samples (the held-out targets are clean)
BATCH = 16
TRACKED = (0.05, 0.10)            # EDM2's pair: snapshotted, the inputs of the synthesis
DIRECT = (0.03, 0.07, 0.15, 0.25)  # tracked directly, to check the synthesis against
GRID = tuple(np.round(np.linspace(0.02, 0.25, 24), 4))


def teacher():
    g = torch.Generator().manual_seed(100)
    w1 = torch.randn(D_IN, HIDDEN, generator=g) / D_IN ** 0.5
    w2 = torch.randn(HIDDEN, 1, generator=g) * 3 / HIDDEN ** 0.5
    return lambda x: torch.tanh(x @ w1) @ w2


def student(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, 1))


def held_out_loss(model, params, x, y) -> float:
    """MSE of ``model`` evaluated with ``params`` ({name: tensor}) on the held-out set."""
    with torch.no_grad():
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.mse_loss(out, y).item()


def train(steps: int, snapshot_every: int, snap_dir: str, seed: int = 0, backend="auto"):
    """Train one replica per profile in TRACKED + DIRECT; snapshot the TRACKED ones."""
    f = teacher()
    runs = {}
    for sigma in TRACKED + DIRECT:
        model = student(seed)
        opt = ek.AdamW(model.named_parameters(), lr=LR, weight_decay=0.0,
                       ema_schedule=power(sigma_rel=sigma), backend=backend)
        runs[sigma] = (model, opt)
    data = torch.Generator().manual_seed(seed + 1)
    for step in range(1, steps + 1):
        x = torch.randn(BATCH, D_IN, generator=data)
        y = f(x) + NOISE * torch.randn(BATCH, 1, generator=data)
        for model, opt in runs.values():
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        if step % snapshot_every == 0:
            for k, sigma in enumerate(TRACKED):
                posthoc.save(runs[sigma][1], os.path.join(snap_dir, f"{step:07d}-{k}.pt"),
                             index=0)
    ref = list(runs[TRACKED[0]][0].parameters())
    for model, _ in runs.values():  # one trajectory: every replica's θ is the same
        assert all(torch.equal(a, b) for a, b in zip(ref, model.parameters()))
    return runs


def run(steps=1500, snapshot_every=50, grid=GRID, seed=0, backend="auto", snap_dir=None):
    """Train, synthesise every σ_rel in ``grid``, and measure. Returns a dict of results."""
    f = teacher()
    g = torch.Generator().manual_seed(seed + 2)
    x_test = torch.randn(4096, D_IN, generator=g)
    y_test = f(x_test)
    with tempfile.TemporaryDirectory() as tmp:
        snap_dir = snap_dir or tmp
        t0 = time.perf_counter()
        runs = train(steps, snapshot_every, snap_dir, seed, backend)
        t_train = time.perf_counter() - t0
        files = sorted(glob.glob(os.path.join(snap_dir, "*.pt")))
        snaps = [posthoc.load(p) for p in files]
        model, opt = runs[TRACKED[0]]
        names = [n for n, _ in model.named_parameters()]
        raw = held_out_loss(model, dict(model.named_parameters()), x_test, y_test)

        def tracked_params(sigma):
            return dict(zip(names, runs[sigma][1].ema_parameters()))

        tracked = {s: held_out_loss(model, tracked_params(s), x_test, y_test)
                   for s in TRACKED + DIRECT}
        t0 = time.perf_counter()
        synth = {float(s): held_out_loss(model, posthoc.synthesize_state_dict(snaps, float(s)),
                                         x_test, y_test) for s in grid}
        t_synth = time.perf_counter() - t0
        # parameter error of the synthesis vs the directly tracked EMA, relative to the spread
        # of the two inputs ‖ζ_0.05 − ζ_0.10‖ (the measure)
        z05, z10 = (torch.cat([t.flatten() for t in tracked_params(s).values()])
                    for s in TRACKED)
        spread = float((z05 - z10).norm())
        param_err = {}
        for s in TRACKED + DIRECT:
            got = torch.cat([t.flatten() for t in posthoc.synthesize_state_dict(snaps, s).values()])
            want = torch.cat([t.flatten() for t in tracked_params(s).values()])
            param_err[s] = float((got - want).norm()) / spread
            synth.setdefault(s, held_out_loss(model, posthoc.synthesize_state_dict(snaps, s),
                                              x_test, y_test))
    return dict(steps=steps, snapshot_every=snapshot_every, n_files=len(files), raw=raw,
                tracked=tracked, synth=dict(sorted(synth.items())), param_err=param_err,
                t_train=t_train, t_synth=t_synth, s_last=snaps[-1].s[0])


def report(res) -> str:
    lines = [f"{res['steps']} steps, {res['n_files']} snapshot files (every "
             f"{res['snapshot_every']} steps, sigma_rel {TRACKED}); training "
             f"{res['t_train']:.1f} s for {len(TRACKED + DIRECT)} replicas, synthesis of "
             f"{len(res['synth'])} EMAs {res['t_synth']:.1f} s",
             f"held-out MSE of the raw parameters: {res['raw']:.5f}",
             "sigma_rel  tracked     synthesised  |synth - tracked| / |z_0.05 - z_0.10|"]
    for s in sorted(res["tracked"]):
        lines.append(f"{s:<9.3f}  {res['tracked'][s]:.5f}     {res['synth'][s]:.5f}      "
                     f"{100 * res['param_err'][s]:.3f} %")
    best = min(res["synth"], key=res["synth"].get)
    lines.append(f"best synthesised sigma_rel: {best:.3f} (held-out MSE {res['synth'][best]:.5f})")
    return "\n".join(lines)


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = sorted(res["synth"])
    ax.plot(xs, [res["synth"][s] for s in xs], "-", color="C0", lw=2,
            label="synthesised post hoc (ek.posthoc.synthesize)")
    for s in sorted(res["tracked"]):
        inp = s in TRACKED
        ax.plot([s], [res["tracked"][s]], "s" if inp else "o", ms=8, mfc="none" if inp else "C1",
                mec="C3" if inp else "C1", mew=2,
                label=None if s not in (TRACKED[0], DIRECT[0]) else
                ("tracked and snapshotted (the inputs)" if inp else "tracked directly"))
    ax.axhline(res["raw"], color="gray", ls="--", lw=1, label=f"raw parameters ({res['raw']:.3f})")
    ax.set_xlabel(r"EMA length $\sigma_\mathrm{rel}$")
    ax.set_ylabel("held-out MSE")
    ax.set_title(f"MLP, AdamW, {res['steps']} steps; snapshots every {res['snapshot_every']}")
    lo = min(min(res["synth"].values()), min(res["tracked"].values()))
    hi = max(max(res["synth"].values()), max(res["tracked"].values()))
    ax.set_ylim(lo - 0.1 * (hi - lo), min(res["raw"], hi + 0.6 * (hi - lo)) + 0.05 * (hi - lo))
    ax.legend(fontsize=8)
    # Right: what the least squares does to the averaging profile (over τ/t)
    t_last = res["s_last"]
    times = np.arange(res["snapshot_every"], res["steps"] + 1, res["snapshot_every"], dtype=float)
    t_in = np.concatenate([times, times])
    g_in = np.concatenate([np.full_like(times, sigma_rel_to_gamma(s)) for s in TRACKED])
    tau = np.linspace(0, 1, 600) * t_last
    for k, s in enumerate((0.035, 0.07, 0.25)):
        g = sigma_rel_to_gamma(s)
        x, err = posthoc.solve_coefficients(t_in, g_in, t_last, g)
        prof = lambda t, gg: np.where(tau <= t, (gg + 1) * (tau / t) ** gg / t, 0.0)  # noqa
        synth = sum(c * prof(t, gg) for c, t, gg in zip(x, t_in, g_in))
        bx.plot(tau / t_last, prof(t_last, g) * t_last, color=f"C{k}", lw=2.5, alpha=0.45,
                label=rf"target $\sigma_\mathrm{{rel}}$={s}")
        bx.plot(tau / t_last, synth * t_last, color=f"C{k}", lw=1, ls="--",
                label=f"least-squares fit (error {100 * err:.1f} %)")
    bx.set_xlabel(r"$\tau / t$ (base steps, relative)")
    bx.set_ylabel("weight of θ(τ) in the EMA")
    bx.set_title(r"profiles from snapshots of $\sigma_\mathrm{rel}$ 0.05 and 0.10")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--snapshot-every", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="300 steps, 7 sigma_rel values")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--snapshots", default=None, help="keep the snapshot files in this directory")
    p.add_argument("--out", default=os.path.join(here, os.pardir, "docs", "posthoc_ema.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = GRID
    if args.quick:
        args.steps, args.snapshot_every, grid = 300, 25, GRID[::4]
    if args.snapshots:
        os.makedirs(args.snapshots, exist_ok=True)
    res = run(args.steps, args.snapshot_every, grid, args.seed, args.backend, args.snapshots)
    print(report(res))
    if not args.quick:
        plot(res, args.out)
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
