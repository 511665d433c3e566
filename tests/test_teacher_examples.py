"""The EMA-teacher examples (issue 16): pseudo-labeling and BYOL with and without the rule.

examples/pseudo_labeling.py and examples/byol.py are imported from their files (the examples
directory is not a package) and their ``main(["--quick", ...])`` is run: the same code path as
the command line, shortened, seeded, single-threaded. Each asserts that the figure is written
and one claim of docs/teachers.md that could fail. The thresholds were checked over seeds 0-5 of the
quick settings (numbers in the comments); the tests use seeds 0 and 1.
"""
import importlib.util
import os

import pytest
import torch

import ema_kernels as ek

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _load(name):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    yield            # main() sets one thread itself; restore what the session had
    torch.set_num_threads(n)


def _rows(out):
    return {(r["kappa"], r["rule"]): r for r in out["rows"]}


# ------------------------------------------------------------------------- pseudo-labeling -----
@pytest.fixture(scope="module")
def pseudo(one_thread, tmp_path_factory):
    mod = _load("pseudo_labeling")
    path = tmp_path_factory.mktemp("figs") / "pseudo_labeling.png"
    out = mod.main(["--quick", "--out", str(path)])
    return mod, out, path


def test_pseudo_labeling_writes_figure(pseudo):
    _, _, path = pseudo
    assert path.is_file() and path.stat().st_size > 10_000


def test_pseudo_labeling_rule_keeps_teacher_on_kappa1(pseudo):
    mod, out, _ = pseudo
    res = out["results"]
    ref, ruled, unruled = res[(1, "rule")], res[(8, "rule")], res[(8, "none")]
    # Paired per seed, final teacher accuracy of κ=1 minus κ=8's. Seeds 0-5 of the quick
    # setting: with the rule -0.003 to 0.009, without 0.14-0.19.
    gap_rule = ref["teacher"][:, -1] - ruled["teacher"][:, -1]
    gap_none = ref["teacher"][:, -1] - unruled["teacher"][:, -1]
    assert (abs(gap_rule) < 0.03).all(), gap_rule
    assert (gap_none > 0.08).all(), gap_none
    # The stale teacher also holds the student back (the feedback the rule is about):
    # student accuracy without the rule trails by 0.08-0.13 on seeds 0-5.
    stud = ruled["student"][:, -1] - unruled["student"][:, -1]
    assert (stud > 0.05).all(), stud
    # Pseudo-labeling is doing the work: the teacher ends well above the pre-trained student
    # (by 0.19-0.25 on seeds 0-5).
    assert (ref["teacher"][:, -1] - ref["teacher"][:, 0] > 0.1).all()


# ------------------------------------------------------------------------- BYOL ----------------
@pytest.fixture(scope="module")
def byol(one_thread, tmp_path_factory):
    mod = _load("byol")
    path = tmp_path_factory.mktemp("figs") / "byol.png"
    out = mod.main(["--quick", "--out", str(path)])
    return mod, out, path


def test_byol_writes_figure(byol):
    _, _, path = byol
    assert path.is_file() and path.stat().st_size > 10_000


def test_byol_rule_keeps_target_lag(byol):
    mod, out, _ = byol
    res = out["results"]
    lag = {arm: res[arm]["lag"][:, 1:].mean(1) for arm in ((1, "rule"), (8, "rule"), (8, "none"))}
    # Mean ‖ζ − θ‖/‖θ‖ over the run, per seed. Seeds 0-3 of the quick setting (ek.LARS): the
    # ruled target's lag is 1.05-1.10× κ=1's, the unruled one's 1.89-2.07×: it averages over 8×
    # more samples, so it trails the online network further.
    assert ((lag[(8, "rule")] / lag[(1, "rule")]) < 1.25).all(), lag
    assert ((lag[(8, "none")] / lag[(1, "rule")]) > 1.4).all(), lag
    # The lagging target is the worse encoder in this short run: its probe accuracy at the
    # end trails the ruled target's by 0.04-0.10 on seeds 0-3. (Not so at the end of the full
    # run, where both targets are frozen by ρ → 1 and the online networks have converged.)
    diff = res[(8, "rule")]["target"][:, -1] - res[(8, "none")]["target"][:, -1]
    assert (diff > 0.03).all(), diff
    # No collapse in any arm: the target's normalised projections stay spread out.
    for arm, r in res.items():
        assert (r["spread"][:, -1] > 0.5).all(), (arm, r["spread"][:, -1])


# ------------------------------------------------------------------------- the two arms --------
def _per_step_decay(opt, p):
    """The decay of one step, read from the public EMA: ζ1 = d·ζ0 + (1 − d)·θ1."""
    zeta0, theta0 = opt.ema_parameters()[0].detach().clone(), p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    zeta1, theta1 = opt.ema_parameters()[0], p.detach()
    assert not torch.equal(theta0, theta1)
    return ((zeta1 - theta1) / (zeta0 - theta1)).mean().item()


@pytest.mark.parametrize("kappa", [1, 2, 8])
def test_without_the_rule_arms_decay_by_rho_per_step(kappa):
    """What both examples rely on: passing ρ^(1/κ) (or ρ(s)^(1/κ)) with kappa=κ decays the
    EMA by ρ per step (Adam's rule only), passing ρ decays it by ρ^κ (the EMA Scaling Rule)."""
    pl, by = _load("pseudo_labeling"), _load("byol")
    rho = 0.9
    for rule, want in (("rule", rho ** kappa), ("none", rho)):
        p = torch.nn.Parameter(torch.zeros(7))
        opt = ek.SGD([p], lr=0.1, ema_decay=pl.ema_decay_for(rule, rho, kappa), kappa=kappa)
        assert _per_step_decay(opt, p) == pytest.approx(want, rel=1e-5)
    cosine = ek.schedules.cosine(0.5, 1.0, total_steps=10_000)
    for sched, want in ((cosine, cosine(0.0) ** kappa), (by.PerStep(cosine, kappa), cosine(0.0))):
        p = torch.nn.Parameter(torch.zeros(7))
        opt = ek.SGD([p], lr=0.1, ema_schedule=sched, kappa=kappa)
        # First step: s goes from 0 to κ. Built-in schedules may integrate ρ(s) exactly over
        # [0, κ); at s ≈ 0 the cosine is flat to second order, so ρ(0)^κ holds to 1e-3.
        assert _per_step_decay(opt, p) == pytest.approx(want, rel=1e-3)
