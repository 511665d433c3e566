"""ek.posthoc: EDM2's post-hoc EMA (snapshots of power EMAs, least-squares synthesis, CLI).

Oracles: EMAs simulated in float64 from a random-walk θ with EDM2's per-step recursion
β_n = (1 − 1/n)^(γ+1); numerical quadrature of the power profiles' inner products; an EMA
tracked directly at the target σ_rel (the quantity the synthesis estimates).
"""
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch

import ema_kernels as ek
from ema_kernels import posthoc
from ema_kernels import schedules as S
from ema_kernels.__main__ import main as cli

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


# ------------------------------------------------------------------- simulated training -------
def _random_walk(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(n + 1, d, generator=g, dtype=torch.float64), 0)


def _track(theta, gamma, every, kappa=1.0):
    """EDM2's power EMA over θ_1..θ_N (β_n = (1 − 1/n)^(γ+1)) in float64; snapshots every
    ``every`` steps as (s = nκ, ζ)."""
    z, snaps = theta[0].clone(), []
    for n in range(1, theta.shape[0]):
        beta = (1.0 - 1.0 / n) ** (gamma + 1.0)
        z = beta * z + (1.0 - beta) * theta[n]
        if n % every == 0:
            snaps.append((n * kappa, z.clone()))
    return snaps


def _snapshots(tracks, dtype=torch.float32):
    """Snapshot records (one per time) of simulated EMAs {γ: [(s, ζ), ...]}, one parameter."""
    gammas = list(tracks)
    out = []
    for i, (s, _) in enumerate(tracks[gammas[0]]):
        emas = [posthoc.SnapshotEMA(j, [g], [tracks[g][i][1].to(dtype)])
                for j, g in enumerate(gammas)]
        out.append(posthoc.Snapshot(names=["w"], group_of=[0], s=[s], emas=emas))
    return out


G05, G07, G10 = (S.sigma_rel_to_gamma(x) for x in (0.05, 0.07, 0.10))


@pytest.mark.parametrize("kappa", [1.0, 4.0])
def test_synthesised_007_matches_tracked_007(kappa):
    """The issue's criterion: σ_rel 0.07 from snapshots of 0.05 and 0.10 every 64 steps over 1024
    steps is within 5 % of ‖ζ_0.05 − ζ_0.10‖ of an EMA tracked at 0.07 (measured: 0.11 %).
    Time is in base steps, so κ=4 (s = 4n) gives the same answer."""
    theta = _random_walk(1024, 2000)
    tracks = {g: _track(theta, g, 64, kappa) for g in (G05, G10)}
    want = _track(theta, G07, 1024, kappa)[-1][1]
    got = posthoc.synthesize(_snapshots(tracks), 0.07)[0].double()
    spread = (tracks[G05][-1][1] - tracks[G10][-1][1]).norm()
    err = float((got - want).norm() / spread)
    assert err < 0.05, err
    # EDM2's method does much better than the criterion on this problem; a broken solve (e.g.
    # nearest-profile or a wrong inner product) lands at 10-50 %.
    assert err < 0.005, err


def test_synthesising_a_tracked_profile_returns_it():
    theta = _random_walk(1024, 500, seed=1)
    tracks = {g: _track(theta, g, 64) for g in (G05, G10)}
    snaps = _snapshots(tracks)
    for sigma, gamma, at in [(0.10, G10, -1), (0.05, G05, -1), (0.05, G05, 7), (0.10, G10, 0)]:
        s_at = tracks[gamma][at][0]
        got = posthoc.synthesize(snaps, sigma, s=s_at if at != -1 else None)[0]
        want = tracks[gamma][at][1].float()  # the snapshot itself, as stored (fp32)
        # the coefficients are a unit vector to ~1e-12; the rest is fp32 rounding of the result
        torch.testing.assert_close(got, want, rtol=2e-7, atol=2e-7 * float(want.abs().max()))


def test_profile_inner_products_against_quadrature():
    def quad(ta, ga, tb, gb):  # both profiles are smooth on [0, min(ta, tb)] and one is 0 after
        tau = np.linspace(0.0, min(ta, tb), 1_000_001)
        f = (ga + 1) * tau ** ga / ta ** (ga + 1) * (gb + 1) * tau ** gb / tb ** (gb + 1)
        return np.trapezoid(f, tau)

    for (ta, ga), (tb, gb) in [((1.0, 6.94), (1.0, 6.94)), ((0.5, 16.97), (1.0, 6.94)),
                               ((1.0, 3.0), (0.25, 0.0)), ((0.8, 2.0), (0.6, 11.0)),
                               ((300.0, 6.94), (1024.0, 16.97))]:
        want = quad(ta, ga, tb, gb)
        assert posthoc.profile_inner_product(ta, ga, tb, gb) == pytest.approx(want, rel=1e-8)
        assert posthoc.profile_inner_product(tb, gb, ta, ga) == pytest.approx(want, rel=1e-8)
    x, err = posthoc.solve_coefficients([10.0, 10.0], [G05, G10], 10.0, G10)
    assert x == pytest.approx([0.0, 1.0], abs=1e-12) and err == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------- through the optimizer ----
def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def _train(sigmas, steps, every_snapshot, kappa=1.0, ema_every=1, named=True, snap_at=()):
    """One identical model + ek.AdamW(power(σ)) per σ, same data: the θ trajectories are the
    same bit for bit, so their EMAs are different profiles of one training run."""
    runs = []
    for sigma in sigmas:
        model = _model()
        params = model.named_parameters() if named else model.parameters()
        opt = ek.AdamW(params, lr=3e-2, weight_decay=0.01, kappa=kappa, ema_every=ema_every,
                       ema_schedule=S.power(sigma_rel=sigma), backend="reference")
        runs.append((model, opt, []))
    gen = torch.Generator().manual_seed(5)
    for step in range(1, steps + 1):
        x = torch.randn(16, 6, generator=gen)
        y = torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin()], 1) + 0.3 * torch.randn(16, 2,
                                                                                   generator=gen)
        for model, opt, snaps in runs:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if step % every_snapshot == 0 or step in snap_at:
                snaps.append(posthoc.snapshot(opt, index=0))
    first = list(runs[0][0].parameters())
    for model, _, _ in runs[1:]:  # same trajectory in every run
        assert all(torch.equal(a, b) for a, b in zip(first, model.parameters()))
    return runs


def test_end_to_end_through_adamw():
    """ek.AdamW(ema_schedule=power(σ)): snapshots via opt.ema_parameters(index=0) of 0.05 and
    0.10 every 16 of 256 steps; synthesised 0.07 vs an optimizer tracking 0.07 directly, and
    the tracked 0.10 returned. κ=2 and ema_every=2: s is the base step of the last EMA update."""
    runs = _train((0.05, 0.10, 0.07), steps=256, every_snapshot=16, kappa=2.0, ema_every=2)
    (_, opt05, s05), (_, opt10, s10), (model, opt07, _) = runs
    assert s05[-1].s == [512.0] and s05[-1].emas[0].gammas == [pytest.approx(G05)]
    assert s05[-1].names == [n for n, _ in model.named_parameters()]
    snaps = s05 + s10
    got = posthoc.synthesize(snaps, 0.07)
    want = opt07.ema_parameters(index=0)
    spread = torch.cat([(a - b).flatten() for a, b in zip(opt05.ema_parameters(index=0),
                                                           opt10.ema_parameters(index=0))]).norm()
    err = torch.cat([(g - w).flatten() for g, w in zip(got, want)]).norm() / spread
    assert err < 0.05, float(err)
    assert err < 0.01, float(err)  # measured 0.19 %
    for g, w in zip(posthoc.synthesize(snaps, 0.10), opt10.ema_parameters(index=0)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    sd = posthoc.synthesize_state_dict(snaps, 0.07)
    assert list(sd) == [n for n, _ in model.named_parameters()]
    model.load_state_dict(sd)  # parameters only: the model has no buffers
    assert all(torch.equal(p, g) for p, g in zip(model.parameters(), got))


def test_snapshot_between_ema_updates_uses_the_last_update():
    runs = _train((0.10,), steps=7, every_snapshot=1000, ema_every=2, snap_at=(4, 5))
    _, opt, (at4, at5) = runs[0]
    g = opt.param_groups[0]
    assert g["base_steps"] == 7.0 and g["ema_base_steps"] == 6.0
    assert at4.s == [4.0] and at5.s == [4.0]  # step 5 moved θ, not ζ
    for a, b in zip(at4.emas[0].tensors, at5.emas[0].tensors):
        assert torch.equal(a, b)


def test_names_and_groups_without_ema():
    model = _model()
    opt = ek.SGD([{"params": model[0].parameters()},
                  {"params": model[2].parameters(), "ema_decay": None, "ema_schedule": None}],
                 lr=0.1, ema_schedule=S.power(gamma=5.0), backend="reference")
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    snap = posthoc.snapshot(opt, index=0)
    assert snap.names == [f"param.{k}" for k in range(4)]
    assert snap.emas[0].gammas == [5.0, None]
    assert [t is None for t in snap.emas[0].tensors] == [False, False, True, True]
    assert posthoc.snapshot(opt, index=0, model=model).names == \
        [n for n, _ in model.named_parameters()]
    out = posthoc.synthesize([snap], ek.schedules.gamma_to_sigma_rel(5.0))
    assert out[2] is None and out[3] is None
    for a, b in zip(out[:2], opt.ema_parameters(index=0)[:2]):
        assert torch.equal(a, b)
    assert list(posthoc.synthesize_state_dict([snap], 0.1)) == ["param.0", "param.1"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(ema_decay=0.999), "constant"),
    (dict(ema_schedule=S.warmup(0.999)), "warmup"),
    (dict(ema_schedule=S.polyak()), "polyak"),
])
def test_non_power_emas_are_refused(kwargs, match):
    model = _model()
    opt = ek.AdamW(model.parameters(), backend="reference", **kwargs)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match=f"not a power-function EMA.*{match}|{match}.*not a power"):
        posthoc.snapshot(opt, index=0)


def test_bad_requests_raise():
    model = _model()
    opt = ek.AdamW(model.parameters(), ema_schedule=S.power(sigma_rel=0.1), backend="reference")
    with pytest.raises(ValueError, match="no EMA update yet"):
        posthoc.snapshot(opt, index=0)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="keeps 1 EMA"):
        posthoc.snapshot(opt)  # the default index=(0, 1) needs two EMAs
    with pytest.raises(ValueError, match="index="):
        posthoc.snapshot(opt, index=())
    snap = posthoc.snapshot(opt, index=0)
    with pytest.raises(ValueError, match="sigma_rel=0.5"):
        posthoc.synthesize([snap], 0.5)
    with pytest.raises(ValueError, match="s=-1"):
        posthoc.synthesize([snap], 0.1, s=-1)
    other = posthoc.snapshot(opt, index=0, model=model)
    with pytest.raises(ValueError, match="different parameters"):
        posthoc.synthesize([snap, other], 0.1)
    with pytest.raises(ValueError, match="not an ema_kernels post-hoc snapshot"):
        posthoc.Snapshot.from_dict({"state": {}})


# ------------------------------------------------------------------- files and the CLI --------
def test_pickle_save_load_round_trip(tmp_path):
    (_, opt, snaps), = _train((0.05,), steps=8, every_snapshot=4)
    snap = snaps[-1]
    clone = pickle.loads(pickle.dumps(snap))
    assert clone.names == snap.names and clone.s == snap.s
    path = tmp_path / "snap.pt"
    saved = posthoc.save(opt, path, index=0)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    for mmap in (True, False):
        back = posthoc.load(path, mmap=mmap)
        assert back.names == saved.names and back.s == saved.s and back.group_of == [0] * 4
        assert back.emas[0].gammas == saved.emas[0].gammas
        for a, b in zip(back.emas[0].tensors, opt.ema_parameters(index=0)):
            assert torch.equal(a, b)
    # synthesize() takes paths too
    for a, b in zip(posthoc.synthesize([path], 0.05), posthoc.synthesize([snap], 0.05)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_cli_round_trip(tmp_path, capsys, suffix):
    runs = _train((0.05, 0.10), steps=64, every_snapshot=16)
    snap_dir = tmp_path / "snapshots"
    snap_dir.mkdir()
    k = 0
    for _, _, snaps in runs:
        for snap in snaps:
            torch.save(snap.to_dict(), snap_dir / f"{k:03d}.pt")
            k += 1
    out = tmp_path / f"ema{suffix}"
    assert cli(["posthoc", "--snapshots", str(snap_dir), "--sigma-rel", "0.07",
                "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("[") and "/8]" in line for line in lines) == 8, lines
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(out)
    else:
        sd = torch.load(out, weights_only=True)
    want = posthoc.synthesize_state_dict([posthoc.load(snap_dir / f"{i:03d}.pt")
                                          for i in range(8)], 0.07)
    assert list(want) == [n for n, _ in runs[0][0].named_parameters()]
    assert sorted(sd) == sorted(want)  # safetensors stores the keys sorted
    for n in want:
        assert torch.equal(sd[n], want[n])
    assert cli(["posthoc", "--snapshots", str(tmp_path / "nowhere"), "--sigma-rel", "0.07",
                "--out", str(out)]) == 2
    assert "not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------- the example --------------
def test_example_quick():
    """examples/posthoc_ema.py --quick: 300 steps, snapshots of 0.05 and 0.10 every 25 steps."""
    spec = importlib.util.spec_from_file_location(
        "_example_posthoc_ema", os.path.join(ROOT, "examples", "posthoc_ema.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        res = mod.main(["--quick", "--backend", "reference"])
    finally:
        torch.set_num_threads(threads)
    assert res["n_files"] == 24
    for s in (0.05, 0.10):  # the inputs come back (to rounding)
        assert res["param_err"][s] < 1e-5 and \
            res["synth"][s] == pytest.approx(res["tracked"][s], rel=1e-5)
    assert res["param_err"][0.07] < 0.05, res["param_err"]  # measured 0.5 %
    assert res["synth"][0.07] == pytest.approx(res["tracked"][0.07], rel=2e-3)
    assert all(v < res["raw"] for v in res["tracked"].values())  # the EMAs help here
