"""ek.schedules: per-base-step values, exact interval decays, EDM2's power EMA, pickling.

The oracles are written from the definitions (DESIGN.md "Schedules", EDM2's paper and code):
products of per-base-step values computed one step at a time in float64, EDM2's per-step
recursion β = (1 − 1/n)^(γ+1), and the σ_rel formula.
"""
import copy
import math
import pickle

import pytest
import torch

import ema_kernels as ek
from ema_kernels import schedules as S


def _cell_product(sched, a, b):
    """Π over the unit cells [n, n+1) of ρ(n) ** (the part of the cell inside [a, b))."""
    out, n = 1.0, 0
    while n < b:
        out *= sched(float(n)) ** max(0.0, min(b, n + 1.0) - max(a, float(n)))
        n += 1
    return out


SCHEDULES = [
    S.constant(0.9),
    S.warmup(0.99),
    S.warmup(0.999, gamma=0.5, power=0.75),
    S.cosine(0.9, 1.0, total_steps=13),
    S.cosine(0.5, 0.9, total_steps=7.5),
    S.polyak(),
    S.power(gamma=6.94),
    S.power(sigma_rel=0.05),
]


# -------------------------------------------------------------------- closed forms -----------
@pytest.mark.parametrize("a,b", [(0, 0), (0, 1), (3, 7), (2.5, 4.0), (10, 10.25), (0, 40)])
def test_constant_decay_is_rho_to_the_interval(a, b):
    for rho in (0.0, 0.3, 0.9, 1.0):
        assert S.constant(rho).decay(a, b) == rho ** (b - a)


@pytest.mark.parametrize("sched", [S.warmup(0.99), S.warmup(0.999, gamma=0.5, power=0.75),
                                   S.warmup(0.9, gamma=2.0, power=1.0),
                                   S.cosine(0.9, 1.0, total_steps=13),
                                   S.cosine(0.5, 0.9, total_steps=7.5)])
def test_warmup_cosine_integer_intervals_are_products_of_base_steps(sched):
    for a in range(0, 30, 3):
        for length in (1, 2, 4, 7):
            want = math.prod(sched(float(n)) for n in range(a, a + length))
            assert sched.decay(a, a + length) == pytest.approx(want, rel=1e-14, abs=0)
    # one base step from an integer is the schedule's own value
    for n in range(20):
        assert sched.decay(n, n + 1) == sched(n)


def test_warmup_long_intervals_past_the_ramp():
    # rho is reached at s = gamma((1 − rho)^(−1/power) − 1) = 999 for these values; the product
    # over an interval straddling it equals the step-by-step product.
    w = S.warmup(0.999, gamma=1.0, power=1.0)
    assert w(998.0) < 0.999 and w(1000.0) == 0.999
    want = math.prod(w(float(n)) for n in range(900, 1200))
    assert w.decay(900, 1200) == pytest.approx(want, rel=1e-12)
    assert w.decay(5000, 5003.5) == pytest.approx(0.999 ** 3.5, rel=1e-15)


@pytest.mark.parametrize("sched", [S.warmup(0.99), S.cosine(0.9, 1.0, total_steps=13)])
def test_fractional_intervals_are_cell_products_and_compose(sched):
    """Fractional κ: ρ(n) held over [n, n+1), partial cells to the power of the part covered.
    Then cutting an interval anywhere gives the same total decay (κ=2.5, 0.5, 0.3 below)."""
    for a, b in [(0.0, 2.5), (2.5, 5.0), (0.5, 1.0), (1.3, 1.6), (11.7, 14.2), (3.0, 3.0)]:
        assert sched.decay(a, b) == pytest.approx(_cell_product(sched, a, b), rel=1e-13)
    for k in (2.5, 0.5, 0.3):
        cuts = [i * k for i in range(int(20 / k) + 1)]
        total = math.prod(sched.decay(x, y) for x, y in zip(cuts, cuts[1:]))
        assert total == pytest.approx(sched.decay(0.0, cuts[-1]) if cuts[-1] else 1.0,
                                      rel=1e-12, abs=1e-300)
    a, b = 4.0, 9.5  # from a point in the middle: the warmup's ρ(0) = 0 no longer zeroes it
    assert sched.decay(a, b) == pytest.approx(
        sched.decay(a, 6.25) * sched.decay(6.25, 9.5), rel=1e-13)


def test_polyak_telescopes():
    p = S.polyak()
    assert p.decay(0, 1) == 0.0 and p.decay(0, 4) == 0.0  # the first update copies θ
    for a, b in [(1, 2), (3, 7), (4, 8), (2.5, 5.0), (7.5, 10)]:
        assert p.decay(a, b) == a / b
    for a in range(1, 12):  # the product of per-base-step values s/(s+1) telescopes to a/b
        for length in (1, 3, 5):
            assert math.prod(p(float(n)) for n in range(a, a + length)) == \
                pytest.approx(p.decay(a, a + length), rel=1e-14)


def test_polyak_weights_are_uniform_at_any_kappa():
    """The issue's numbers: at κ=4 the iterates' weights are [1, 1/2, 1/3, 1/4, 1/5] of the
    mean after 1..5 steps (the first-order rule gave [1, 0.590, 0.376, 0.274, 0.215])."""
    p, kappa = S.polyak(), 4.0
    for n in range(1, 6):
        weight_of_newest = 1.0 - p.decay((n - 1) * kappa, n * kappa)
        assert weight_of_newest == pytest.approx(1.0 / n, rel=1e-15)


@pytest.mark.parametrize("kappa", [1.0, 4.0])
@pytest.mark.parametrize("gamma", [0.0, 6.94, 16.97, 3.5])
def test_power_is_edm2_recursion(gamma, kappa):
    """EDM2: after the n-th step at constant batch, β_n = (1 − 1/n)^(γ+1); the optimizer's
    counters are s_from = (n−1)κ, s_to = nκ. Also the EMA these β build from a sequence equals
    the integral of the profile (γ+1)τ^γ/t^(γ+1) over the held θ (checked in float64)."""
    sched = S.power(gamma=gamma)
    for n in range(1, 200):
        beta = (1.0 - 1.0 / n) ** (gamma + 1.0)
        assert sched.decay((n - 1) * kappa, n * kappa) == pytest.approx(beta, rel=1e-13, abs=0)
    theta = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = torch.tensor(0.0, dtype=torch.float64)
    for n in range(1, 51):
        d = sched.decay((n - 1) * kappa, n * kappa)
        z = d * z + (1 - d) * theta[n - 1]
    t = 50 * kappa
    cdf = [(i * kappa / t) ** (gamma + 1) for i in range(51)]
    want = sum((cdf[i + 1] - cdf[i]) * theta[i] for i in range(50))
    assert float(z) == pytest.approx(float(want), rel=1e-12, abs=1e-12)


def test_power_one_step_value_and_empty_interval():
    p = S.power(gamma=2.0)
    assert p(3.0) == (3 / 4) ** 3 and p(0.0) == 0.0
    assert p.decay(5, 5) == 1.0 and S.polyak().decay(0, 0) == 1.0


# -------------------------------------------------------------------- σ_rel ↔ γ --------------
def test_sigma_rel_conversions():
    assert S.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert S.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for gamma in (0.0, 0.5, 1.0, 6.94, 16.97, 100.0, 1e4):
        sigma = S.gamma_to_sigma_rel(gamma)
        assert sigma == pytest.approx(math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))),
                                      rel=1e-15)
        assert S.sigma_rel_to_gamma(sigma) == pytest.approx(gamma, rel=1e-12, abs=1e-12)
    for sigma in (0.01, 0.02, 0.05, 0.07, 0.1, 0.2, 0.25, 0.28):
        gamma = S.sigma_rel_to_gamma(sigma)
        # EDM2 defines γ through the cubic γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0
        t = sigma ** -2
        assert gamma ** 3 + 7 * gamma ** 2 + (16 - t) * gamma + 12 - t == \
            pytest.approx(0.0, abs=1e-9 * t * max(1.0, gamma))
        assert S.gamma_to_sigma_rel(gamma) == pytest.approx(sigma, rel=1e-12)
    p = S.power(sigma_rel=0.05)
    assert p.gamma == S.sigma_rel_to_gamma(0.05) and p.sigma_rel == pytest.approx(0.05)


@pytest.mark.parametrize("call,match", [
    (lambda: S.power(), "exactly one"),
    (lambda: S.power(6.94, sigma_rel=0.1), "exactly one"),
    (lambda: S.power(gamma=-0.5), "gamma=-0.5"),
    (lambda: S.power(sigma_rel=0.3), "sigma_rel=0.3"),
    (lambda: S.power(sigma_rel=0.0), "sigma_rel=0.0"),
    (lambda: S.sigma_rel_to_gamma(float("nan")), "sigma_rel=nan"),
    (lambda: S.gamma_to_sigma_rel(float("inf")), "gamma=inf"),
    (lambda: S.warmup(0.99, gamma=0.0), "gamma"),
    (lambda: S.warmup(0.99, power=-1), "power"),
    (lambda: S.warmup(1.2), "rho"),
    (lambda: S.cosine(0.9), "total_steps"),
    (lambda: S.cosine(0.9, 1.0, total_steps=-3), "total_steps"),
    (lambda: S.cosine(0.9, 1.1, total_steps=3), "rho_end"),
    (lambda: S.constant(-0.1), "rho"),
    (lambda: S.constant(0.9).decay(3, 2), "s_from"),
    (lambda: S.polyak().decay(-1, 2), "s_from"),
    (lambda: S.interval_decay(S.polyak(), 5, 4), "s_from"),
    (lambda: S.interval_decay(lambda s: 1.5, 0, 1), "1.5"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -------------------------------------------------------------------- objects ----------------
@pytest.mark.parametrize("sched", SCHEDULES, ids=repr)
def test_pickle_copy_repr_eq(sched):
    for clone in (pickle.loads(pickle.dumps(sched)), copy.deepcopy(sched)):
        assert clone == sched and hash(clone) == hash(sched) and type(clone) is type(sched)
        assert clone(7.0) == sched(7.0) and clone.decay(3, 9) == sched.decay(3, 9)
    assert repr(sched).startswith(f"schedules.{type(sched).__name__}(")
    assert eval(repr(sched), {"schedules": S}) == sched  # the repr rebuilds the schedule


def test_repr_examples():
    assert repr(S.constant(0.9)) == "schedules.constant(rho=0.9)"
    assert repr(S.polyak()) == "schedules.polyak()"
    assert repr(S.power(gamma=7.0)) == "schedules.power(gamma=7.0)"
    assert repr(S.cosine(0.99, total_steps=100)) == \
        "schedules.cosine(rho_start=0.99, rho_end=1.0, total_steps=100.0)"
    assert S.power(gamma=7.0) != S.power(gamma=7.5) and S.constant(0.5) != S.polyak()


def test_interval_decay_uses_decay_or_the_first_order_rule():
    for sched in SCHEDULES:
        assert S.interval_decay(sched, 2.5, 6.0) == sched.decay(2.5, 6.0)

    def plain(s):
        return 0.9 + 0.001 * s

    # a plain callable: ρ(s_from) ** (s_to − s_from), first order
    assert S.interval_decay(plain, 3.0, 7.0) == plain(3.0) ** 4.0
    assert S.interval_decay(plain, 2.0, 2.5) == plain(2.0) ** 0.5
    with pytest.raises(TypeError, match="callable"):
        S.interval_decay(0.99, 0.0, 1.0)


# -------------------------------------------------------------------- in the optimizer -------
def _sgd(sched, every, kappa):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    opt = ek.SGD(model.parameters(), lr=0.1, momentum=0.9, ema_schedule=sched, ema_every=every,
                 kappa=kappa, backend="reference")
    return model, opt


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("kappa", [1.0, 4.0, 2.5])
def test_power_ema_in_the_optimizer_matches_edm2_profile(kappa, every):
    """ek.SGD(ema_schedule=power(γ)) at κ and ema_every: ζ is the profile's weighted average of
    the iterates the EMA saw, weight_i = (t_i/t)^(γ+1) − (t_{i−1}/t)^(γ+1) (float64 oracle)."""
    gamma = 6.94
    model, opt = _sgd(S.power(gamma=gamma), every, kappa)
    seen = []  # (s at the EMA update, θ then)
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 25):
        opt.zero_grad()
        model(torch.randn(8, 5, generator=gen)).sub(1.0).square().mean().backward()
        opt.step()
        if step % every == 0:
            seen.append((step * kappa, [p.detach().double().clone() for p in model.parameters()]))
    t = seen[-1][0]
    prev = 0.0
    want = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for s, thetas in seen:
        w = (s / t) ** (gamma + 1) - (prev / t) ** (gamma + 1)
        prev = s
        for acc, th in zip(want, thetas):
            acc.add_(th, alpha=w)
    for e, w in zip(opt.ema_parameters(), want):
        torch.testing.assert_close(e.double(), w, rtol=1e-5, atol=1e-6)
