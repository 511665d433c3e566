"""opt.clip_grad_norm_ (issue 15): torch.nn.utils.clip_grad_norm_'s norm, its coefficient applied
inside the next step's pass (gradients never written), a non-finite norm skipping the step,
GradScaler, the stale-coefficient rule, no host reads, capturable, DDP and FSDP2."""
import copy
import os
import socket
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ema_kernels as ek

from test_host_side import NoHostRead, guarded

BACKENDS = ["reference", "cpp"]
RHO = 0.9


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.LayerNorm(17), torch.nn.Tanh(),
                            torch.nn.Linear(17, 4))
    return m.to(dtype)


def two_groups(model, **second):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay}, dict(params=rest, **second)]


def loss_fn(model, x):
    return model(x).pow(2).mean() + model(x).sin().sum() * 0.1


OPTS = {
    "adamw": (torch.optim.AdamW, ek.AdamW,
              dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), dict(lr=1e-2)),
    "sgd": (torch.optim.SGD, ek.SGD,
            dict(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=1e-3), dict(momentum=0.5)),
}


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


# ---------------------------------------------------------------- against torch ----------
@pytest.mark.parametrize("max_norm", [0.05, 1e3], ids=["active", "inactive"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTS))
def test_matches_torch_clip_and_float64_ema(name, backend, max_norm):
    """Several steps of ours (clip inside the step) against torch.nn.utils.clip_grad_norm_ +
    torch.optim + a float64 EMA: the same norms, parameters, state and EMA; p.grad untouched."""
    tcls, ecls, kw, second = OPTS[name]
    ref, ours = make_model(1), make_model(1)
    t_opt = tcls(two_groups(ref, **second), **kw)
    e_opt = ecls(two_groups(ours, **second), ema_decay=RHO, backend=backend, **kw)
    params_t, params_e = _params(t_opt), _params(e_opt)
    ema64 = [p.detach().double().clone() for p in params_t]
    clipped = 0
    for step in range(6):
        x = torch.randn(8, 9)
        for m, o in ((ref, t_opt), (ours, e_opt)):
            o.zero_grad()
            loss_fn(m, x).backward()
        grads = [p.grad.clone() for p in params_e]
        n_t = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        n_e = e_opt.clip_grad_norm_(max_norm)
        assert n_e.dtype == n_t.dtype and n_e.shape == () and n_e.device == n_t.device
        if step == 0:  # same parameters, same gradients: bit-equal norms
            assert torch.equal(n_e, n_t)
        torch.testing.assert_close(n_e, n_t, rtol=1e-6, atol=0)
        clipped += bool(n_t > max_norm)
        t_opt.step()
        e_opt.step()
        for p, g in zip(params_e, grads):
            assert torch.equal(p.grad, g)  # never rewritten, bit for bit
        for z, p in zip(ema64, params_t):
            z.mul_(RHO).add_(p.detach().double(), alpha=1 - RHO)
        for p, q in zip(params_t, params_e):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for z, e in zip(ema64, e_opt.ema_parameters()):
            torch.testing.assert_close(e.double(), z, rtol=1e-5, atol=1e-6)
        for p, q in zip(params_t, params_e):
            for key, val in t_opt.state[p].items():
                if isinstance(val, torch.Tensor) and key != "step":
                    torch.testing.assert_close(e_opt.state[q][key], val, rtol=1e-6, atol=1e-7)
    assert clipped == (6 if max_norm < 1 else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_equals_a_step_with_grad_scale_one_over_torch_coef(backend, flatten, dtype):
    """The fold, bit for bit: clip_grad_norm_ + step() == step(grad_scale=1/coef) with torch's
    coefficient computed from torch's norm (in the norm's dtype, torch's formula)."""
    a, b = make_model(2, dtype), make_model(2, dtype)
    oa = ek.AdamW(two_groups(a, lr=1e-2), lr=3e-2, ema_decay=RHO, backend=backend,
                  flatten=flatten)
    ob = ek.AdamW(two_groups(b, lr=1e-2), lr=3e-2, ema_decay=RHO, backend=backend,
                  flatten=flatten)
    gen = torch.Generator().manual_seed(5)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in a.parameters()]
        for m in (a, b):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
        max_norm = 0.5 if step % 2 == 0 else 1e6
        n = oa.clip_grad_norm_(max_norm)
        n_t = torch.nn.utils.get_total_norm([p.grad for p in _params(ob)])
        assert n.dtype == dtype and torch.equal(n, n_t)
        coef = torch.clamp(max_norm / (n_t + 1e-6), max=1.0)
        oa.step()
        ob.step(grad_scale=torch.reciprocal(coef.float()).reshape(1))
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
        for z, y in zip(oa.ema_parameters(), ob.ema_parameters()):
            assert torch.equal(z, y)


def _ulp(t):
    t32 = t.float().abs()
    exp = torch.floor(torch.log2(t32.clamp_min(torch.finfo(t.dtype).tiny)))
    return 2.0 ** (exp - 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTS))
def test_bf16_per_step_within_one_ulp_of_the_reference_with_torchs_coefficient(name, backend):
    """bf16 parameters. torch.optim keeps bf16 state and torch's clip rounds g·coef to bf16,
    so neither is an oracle for fp32-state steps; the oracle is the reference backend from the
    same state, fed torch's coefficient (from torch's bf16 norm, which ours equals bit for
    bit) as grad_scale = 1/coef: each step within one ulp of the parameters (the design's
    16-bit tolerance; bit-exact for the reference itself), p.grad untouched."""
    _, ecls, kw, second = OPTS[name]
    model = make_model(3, torch.bfloat16)
    opt = ecls(two_groups(model, **second), ema_decay=RHO, backend=backend, **kw)
    gen = torch.Generator().manual_seed(6)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16)
                 for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        m_r, o_r = copy.deepcopy((model, opt))  # the same state; deepcopy drops .grad
        o_r.backend = "reference"
        for q, g in zip(m_r.parameters(), grads):
            q.grad = g.clone()
        max_norm = 0.3 if step != 2 else 1e6
        n = opt.clip_grad_norm_(max_norm)
        n_t = torch.nn.utils.get_total_norm(grads)
        assert n.dtype == torch.bfloat16 and torch.equal(n, n_t)
        coef = torch.clamp(max_norm / (n_t + 1e-6), max=1.0)
        assert (coef < 1) == (step != 2)
        opt.step()
        o_r.step(grad_scale=torch.reciprocal(coef.float()).reshape(1))
        for p, q in zip(model.parameters(), m_r.parameters()):
            diff = (p.detach().float() - q.detach().float()).abs()
            assert bool((diff <= _ulp(q.detach())).all()), step
            if backend == "reference":
                assert torch.equal(p, q)
        w = 1 - RHO
        for z, y, q in zip(opt.ema_parameters(), o_r.ema_parameters(), _params(o_r)):
            diff = (z - y).abs()
            assert bool((diff <= w * _ulp(q.detach()) + 1e-6 * y.abs()).all()), step
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize("norm_type", [2.0, float("inf"), "inf", 1.0, 3.5])
def test_norm_types_and_mixed_dtypes_equal_torch_bit_for_bit(norm_type):
    """Two groups, fp32 and bf16 sets, duplicates, a parameter without a gradient: the same
    value and dtype as torch over the optimizer's parameters (each once)."""
    torch.manual_seed(7)
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (5, 33, 1, 4097)]
    ps += [torch.nn.Parameter(torch.randn(n).to(torch.bfloat16)) for n in (7, 130)]
    for p in ps:
        p.grad = torch.randn_like(p) * 3
    ps[2].grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the duplicate
        opt = ek.AdamW([{"params": [ps[0], ps[4], ps[1], ps[0]]}, {"params": ps[2:4] + ps[5:]}],
                       lr=1e-2, backend="cpp")
    n = opt.clip_grad_norm_(1.0, norm_type)
    n_t = torch.nn.utils.get_total_norm([p.grad for p in (ps[0], ps[4], ps[1], ps[3], ps[5])],
                                        norm_type)
    assert n.dtype == n_t.dtype == torch.float32
    assert torch.equal(n, n_t)
    # a bf16-only optimizer: torch's norm is bf16, and so is ours
    o16 = ek.AdamW(ps[4:], lr=1e-2, backend="cpp")
    n16 = o16.clip_grad_norm_(1.0, norm_type)
    n16_t = torch.nn.utils.get_total_norm([ps[4].grad, ps[5].grad], norm_type)
    assert n16.dtype == torch.bfloat16 and torch.equal(n16, n16_t)


def test_no_gradients_returns_torch_zero_and_steps_nothing():
    m = make_model(4)
    opt = ek.AdamW(m.parameters(), lr=1e-2, backend="cpp")
    n = opt.clip_grad_norm_(1.0)
    assert torch.equal(n, torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0))
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_max_norm_inf_measures_and_clips_nothing():
    a, b = make_model(5), make_model(5)
    oa = ek.AdamW(a.parameters(), lr=1e-2, ema_decay=RHO, backend="cpp")
    ob = ek.AdamW(b.parameters(), lr=1e-2, ema_decay=RHO, backend="cpp")
    x = torch.randn(4, 9)
    for m in (a, b):
        loss_fn(m, x).backward()
    n = oa.clip_grad_norm_(float("inf"))
    assert torch.equal(n, torch.nn.utils.get_total_norm([p.grad for p in b.parameters()]))
    oa.step()
    ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(max_norm=-1.0), ValueError, r"max_norm=-1.0 is invalid.*>= 0"),
    (dict(max_norm=float("nan")), ValueError, r"max_norm=nan is invalid"),
    (dict(max_norm=float("-inf")), ValueError, r"max_norm=-inf is invalid"),
    (dict(max_norm="1"), TypeError, r"max_norm must be a real number"),
    (dict(max_norm=1.0, norm_type=0), ValueError, r"norm_type=0 is invalid.*p > 0"),
    (dict(max_norm=1.0, norm_type=-2.0), ValueError, r"norm_type=-2.0 is invalid"),
    (dict(max_norm=1.0, norm_type=float("-inf")), ValueError, r"norm_type=-inf is invalid"),
    (dict(max_norm=1.0, norm_type=float("nan")), ValueError, r"norm_type=nan is invalid"),
    (dict(max_norm=1.0, norm_type="fro"), ValueError, r"norm_type='fro' is invalid"),
    (dict(max_norm=1.0, grad_scaler=object()), TypeError, r"grad_scaler must be a torch.amp"),
])
def test_bad_arguments_raise_before_anything_moves(bad, exc, match):
    a, b = make_model(6), make_model(6)
    oa = ek.AdamW(a.parameters(), lr=1e-2, backend="cpp")
    ob = ek.AdamW(b.parameters(), lr=1e-2, backend="cpp")
    x = torch.randn(4, 9)
    for m in (a, b):
        loss_fn(m, x).backward()
    oa.clip_grad_norm_(0.01)
    ob.clip_grad_norm_(0.01)
    with pytest.raises(exc, match=match):
        oa.clip_grad_norm_(**bad)
    oa.step()  # the earlier, valid clip is still pending and applies
    ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- non-finite norms -------
def _snapshot(model, opt):
    sd = opt.state_dict()
    return ([p.detach().clone() for p in model.parameters()],
            [e.clone() for e in opt.ema_parameters()],
            copy.deepcopy(sd["state"]),
            [{k: g[k] for k in ("steps", "base_steps", "ema_base_steps")}
             for g in sd["param_groups"]])


def _bits_equal(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _assert_same_snapshot(a, b, counters=True):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)
    for k in a[2]:
        for role, v in a[2][k].items():
            assert torch.equal(torch.as_tensor(b[2][k][role]), torch.as_tensor(v)), (k, role)
    if counters:
        assert a[3] == b[3]


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e30], ids=["inf", "nan", "huge"])
@pytest.mark.parametrize("name", list(OPTS))
def test_non_finite_norm_skips_the_step_entirely(name, bad, capturable):
    """A non-finite norm (an inf/NaN gradient, or finite ones whose squares overflow): torch's
    value is returned, and the step changes nothing — parameters, state, EMA, counters — and
    the next step equals an optimizer that never saw it."""
    _, ecls, kw, _ = OPTS[name]
    a, b = make_model(8), make_model(8)
    oa = ecls(a.parameters(), ema_decay=RHO, backend="cpp", capturable=capturable, **kw)
    ob = ecls(b.parameters(), ema_decay=RHO, backend="cpp", capturable=capturable, **kw)
    xs = [torch.randn(4, 9) for _ in range(3)]
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        loss_fn(m, xs[0]).backward()
        o.clip_grad_norm_(0.1)
        o.step()
    oa.zero_grad()
    loss_fn(a, xs[1]).backward()
    with torch.no_grad():
        list(a.parameters())[2].grad.view(-1)[3] = bad
        if bad == 1e30:
            list(a.parameters())[0].grad.view(-1)[0] = bad
    grads = [p.grad.clone() for p in a.parameters()]
    before = _snapshot(a, oa)
    n = oa.clip_grad_norm_(0.1)
    n_t = torch.nn.utils.get_total_norm(grads)
    torch.testing.assert_close(n, n_t, equal_nan=True, rtol=0, atol=0)
    assert not torch.isfinite(n)
    with pytest.raises(RuntimeError, match="non-finite.*error_if_nonfinite=False"):
        oa.clip_grad_norm_(0.1, error_if_nonfinite=True)
    oa.step()
    # capturable=True counts calls in the host counters (the device step count, in the state,
    # is the truth there: it was rolled back on the device)
    _assert_same_snapshot(_snapshot(a, oa), before, counters=not capturable)
    for p, g in zip(a.parameters(), grads):
        assert _bits_equal(p.grad, g)
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        loss_fn(m, xs[2]).backward()
        o.clip_grad_norm_(0.1)
        o.step()
    _assert_same_snapshot(_snapshot(a, oa), _snapshot(b, ob), counters=not capturable)


def test_error_if_nonfinite_raises_like_torch_and_leaves_everything():
    m = make_model(9)
    opt = ek.AdamW(m.parameters(), lr=1e-2, backend="cpp")
    loss_fn(m, torch.randn(4, 9)).backward()
    with torch.no_grad():
        next(m.parameters()).grad.view(-1)[0] = float("nan")
    grads = [p.grad.clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="The total norm of order 2.0 for gradients from "
                                           "`parameters` is non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="is non-finite"):
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, error_if_nonfinite=True)
    for p, g in zip(m.parameters(), grads):
        torch.testing.assert_close(p.grad, g, equal_nan=True, rtol=0, atol=0)
    assert opt._clip_pending is None


# ---------------------------------------------------------------- GradScaler -------------
@pytest.mark.parametrize("pattern", ["unscale_", "grad_scaler="])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_with_an_injected_inf_matches_torch(backend, pattern):
    """torch: scale → backward → unscale_ → clip_grad_norm_ → scaler.step → update. Ours: the
    same, or clip_grad_norm_(grad_scaler=scaler) with no unscale pass. An inf gradient at one
    step: skipped (nothing moves), the scale backs off as torch's does."""
    ref, ours = make_model(10), make_model(10)
    t_opt = torch.optim.AdamW(ref.parameters(), lr=3e-2, weight_decay=0.1)
    e_opt = ek.AdamW(ours.parameters(), lr=3e-2, weight_decay=0.1, ema_decay=RHO,
                     backend=backend)
    s_t = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    s_e = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    ema64 = [p.detach().double().clone() for p in ref.parameters()]
    inf_at = {2, 5}
    for step in range(7):
        x = torch.randn(8, 9)
        for m, o, s in ((ref, t_opt, s_t), (ours, e_opt, s_e)):
            o.zero_grad()
            s.scale(loss_fn(m, x)).backward()
            if step in inf_at:
                with torch.no_grad():
                    list(m.parameters())[1].grad.view(-1)[0] = float("inf")
        s_t.unscale_(t_opt)
        n_t = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.2)
        before = [p.detach().clone() for p in ours.parameters()]
        emas_before = [e.clone() for e in e_opt.ema_parameters()]
        if pattern == "unscale_":
            s_e.unscale_(e_opt)
            n_e = e_opt.clip_grad_norm_(0.2)
        else:
            n_e = e_opt.clip_grad_norm_(0.2, grad_scaler=s_e)
        if step in inf_at:
            assert not torch.isfinite(n_e) and not torch.isfinite(n_t)
        else:
            torch.testing.assert_close(n_e, n_t, rtol=1e-6, atol=0)
        s_t.step(t_opt)
        s_e.step(e_opt)
        s_t.update()
        s_e.update()
        assert s_e.get_scale() == s_t.get_scale()
        if step in inf_at:
            assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), before))
            assert all(torch.equal(z, y) for z, y in zip(e_opt.ema_parameters(), emas_before))
        else:
            for z, p in zip(ema64, ref.parameters()):
                z.mul_(RHO).add_(p.detach().double(), alpha=1 - RHO)
        for p, q in zip(ref.parameters(), ours.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for z, e in zip(ema64, e_opt.ema_parameters()):
            torch.testing.assert_close(e.double(), z, rtol=1e-5, atol=1e-6)
    assert e_opt.state_dict()["param_groups"][0]["steps"] == 7 - len(inf_at)
    assert {float(s["step"]) for s in e_opt.state.values()} == {7.0 - len(inf_at)}


def test_grad_scaler_and_clip_must_agree_about_scaling():
    """Scaled gradients measured as if unscaled, or the other way round: a clear error at the
    step, before anything moves."""
    m = make_model(11)
    opt = ek.AdamW(m.parameters(), lr=1e-2, backend="cpp")
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(loss_fn(m, torch.randn(4, 9))).backward()
    before = [p.detach().clone() for p in m.parameters()]
    opt.clip_grad_norm_(1.0, grad_scaler=scaler)
    with pytest.raises(RuntimeError, match="got no grad_scale.*scaler.step"):
        opt.step()
    opt.zero_grad()
    scaler.scale(loss_fn(m, torch.randn(4, 9))).backward()
    opt.clip_grad_norm_(1.0)
    with pytest.raises(RuntimeError, match="pass grad_scaler=scaler.*unscale_"):
        opt.step(grad_scale=torch.full((1,), 8.0), found_inf=torch.zeros(1))
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert opt.param_groups[0]["steps"] == 0
    # grad_scaler= after unscale_ is the unscaled case (no second division)
    opt.zero_grad()
    scaler.scale(loss_fn(m, torch.randn(4, 9))).backward()
    scaler.unscale_(opt)
    n = opt.clip_grad_norm_(1.0, grad_scaler=scaler)
    assert torch.equal(n, torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]))
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="no scale yet"):
        opt.clip_grad_norm_(1.0, grad_scaler=torch.amp.GradScaler("cpu"))


# ---------------------------------------------------------------- the stale rule ---------
def _pair(seed=12, backend="cpp"):
    a, b = make_model(seed), make_model(seed)
    kw = dict(lr=3e-2, ema_decay=RHO, backend=backend)
    return a, ek.AdamW(a.parameters(), **kw), b, ek.AdamW(b.parameters(), **kw)


def _coef(grads, max_norm):
    return torch.clamp(max_norm / (torch.nn.utils.get_total_norm(grads) + 1e-6), max=1.0)


def _same(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_coefficient_is_used_by_one_step_only():
    """clip, step, step (no new backward): the first step is clipped, the second is not (torch
    would step with its rewritten gradients again; here the gradients were never rewritten)."""
    a, oa, b, ob = _pair()
    x = torch.randn(4, 9)
    for m in (a, b):
        loss_fn(m, x).backward()
    coef = _coef([p.grad for p in a.parameters()], 0.05)
    assert coef < 1
    oa.clip_grad_norm_(0.05)
    oa.step()
    ob.step(grad_scale=torch.reciprocal(coef).reshape(1))
    _same(a, b)
    oa.step()
    ob.step()
    _same(a, b)


@pytest.mark.parametrize("change", ["accumulate", "replace", "in-place", "set-none"])
def test_a_gradient_change_before_the_step_discards_the_coefficient(change):
    a, oa, b, ob = _pair()
    x, y = torch.randn(4, 9), torch.randn(4, 9)
    for m in (a, b):
        loss_fn(m, x).backward()
    oa.clip_grad_norm_(0.05)
    for m in (a, b):
        p = list(m.parameters())[1]
        if change == "accumulate":
            loss_fn(m, y).backward()
        elif change == "replace":
            p.grad = p.grad * 2
        elif change == "in-place":
            p.grad.mul_(2)
        else:
            p.grad = None
    with pytest.warns(UserWarning, match="gradients changed after opt.clip_grad_norm_"):
        oa.step()
    ob.step()
    _same(a, b)


def test_zero_grad_discards_the_coefficient_silently():
    a, oa, b, ob = _pair()
    for m in (a, b):
        loss_fn(m, torch.randn(4, 9)).backward()
    oa.clip_grad_norm_(0.05)
    x = torch.randn(4, 9)
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        loss_fn(m, x).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        oa.step()
    ob.step()
    _same(a, b)


def test_a_second_clip_composes_like_torch():
    """torch's second clip_grad_norm_ measures the gradients its first one clipped: the same
    returned norms, and the step uses both coefficients."""
    ref, ours = make_model(13), make_model(13)
    t_opt = torch.optim.AdamW(ref.parameters(), lr=3e-2)
    e_opt = ek.AdamW(ours.parameters(), lr=3e-2, backend="cpp")
    x = torch.randn(4, 9)
    for m in (ref, ours):
        loss_fn(m, x).backward()
    for max_norm, kind in ((0.5, 2.0), (0.1, float("inf"))):
        n_t = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, kind)
        n_e = e_opt.clip_grad_norm_(max_norm, kind)
        torch.testing.assert_close(n_e, n_t, rtol=1e-6, atol=0)
    t_opt.step()
    e_opt.step()
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- host side, capturable --
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_read_in_clip_or_step(backend):
    """Gradients, grad_scale and found_inf that raise on any host read: clip_grad_norm_ and the
    step (the fold of the coefficient, the non-finite flag) never read a device value."""
    a, oa, b, ob = _pair(backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # creates its scale tensor, which is then guarded
    scaler._scale = guarded(4.0)
    gen = torch.Generator().manual_seed(14)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen) * 4 for p in a.parameters()]
        if step == 2:
            grads[0].view(-1)[0] = float("inf")
        for p, g in zip(a.parameters(), grads):
            p.grad = g.clone().as_subclass(NoHostRead)
        n = oa.clip_grad_norm_(0.5, grad_scaler=scaler)
        assert type(n) is NoHostRead  # computed from the guarded gradients
        oa.step(grad_scale=guarded(4.0), found_inf=guarded(0.0))
        if step != 2:
            for p, g in zip(b.parameters(), grads):
                p.grad = g.clone()
            coef = _coef([g / 4 for g in grads], 0.5)
            ob.step(grad_scale=(4.0 / coef).reshape(1))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert oa.state_dict()["param_groups"][0]["steps"] == 3


def test_capturable_equals_non_capturable_with_clipping():
    a, oa, b, ob = _pair(seed=15)
    c = make_model(15)
    oc = ek.AdamW(c.parameters(), lr=3e-2, ema_decay=RHO, backend="cpp", capturable=True)
    for step in range(4):
        x = torch.randn(4, 9)
        for m, o in ((a, oa), (c, oc)):
            o.zero_grad()
            loss_fn(m, x).backward()
            o.clip_grad_norm_(0.1 if step % 2 else 1e3)
            o.step()
    for p, q in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for z, y in zip(oa.ema_parameters(), oc.ema_parameters()):
        torch.testing.assert_close(z, y, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- DDP and FSDP2 ----------
WORLD = 2
DSTEPS = 3


def _dist_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _dist_batches():
    g = torch.Generator().manual_seed(321)
    return [torch.randn(8, 8, generator=g) for _ in range(DSTEPS)]


DIST_CASES = [(0.05, 2.0), (0.05, float("inf")), (1e3, 2.0)]


def _dist_train(model, opt, xs, max_norm, norm_type, rank=None, torch_norm=None):
    norms = []
    for x in xs:
        opt.zero_grad()
        if rank is not None:
            x = x[rank * 4:(rank + 1) * 4]
        model(x).pow(2).mean().backward()
        if torch_norm is not None:
            norms.append(torch_norm(model))
        norms.append(opt.clip_grad_norm_(max_norm, norm_type).clone())
        opt.step()
    return norms


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _clip_worker(rank, tmp, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel as DDP

        mesh = init_device_mesh("cpu", (WORLD,))
        out = {}
        for max_norm, kind in DIST_CASES:
            model = DDP(_dist_model(0))
            opt = ek.AdamW(model.parameters(), lr=5e-2, ema_decay=0.5, backend="cpp")
            norms = _dist_train(model, opt, _dist_batches(), max_norm, kind, rank)
            out[f"ddp-{max_norm}-{kind}"] = ([p.detach().clone() for p in model.parameters()],
                                             [e.clone() for e in opt.ema_parameters()], norms)
            m = _dist_model(0)
            for layer in (m[0], m[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(m, mesh=mesh)
            opt = ek.AdamW(m.parameters(), lr=5e-2, ema_decay=0.5, backend="reference")

            def torch_norm(model):  # torch's clip_grad_norm_ on the same DTensor gradients
                return _full(torch.nn.utils.get_total_norm(
                    [p.grad for p in model.parameters()], kind)).clone()
            norms = _dist_train(m, opt, _dist_batches(), max_norm, kind, rank, torch_norm)
            out[f"fsdp-{max_norm}-{kind}"] = ([_full(p.detach()).clone() for p in m.parameters()],
                                              [_full(e).clone() for e in opt.ema_parameters()],
                                              norms)
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(tmp, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("clipdist"))
    try:
        mp.spawn(_clip_worker, args=(tmp, _free_port()), nprocs=WORLD, join=True)
    except Exception:
        errs = [open(os.path.join(tmp, f)).read() for f in os.listdir(tmp) if f.endswith(".err")]
        pytest.fail("a distributed worker failed:\n" + "\n".join(errs))
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]


def _single_process_torch(max_norm, kind):
    """torch.optim.AdamW + torch.nn.utils.clip_grad_norm_ + a float64 EMA, full batch."""
    model = _dist_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    ema64 = [p.detach().double().clone() for p in model.parameters()]
    norms = []
    for x in _dist_batches():
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, kind))
        opt.step()
        for z, p in zip(ema64, model.parameters()):
            z.mul_(0.5).add_(p.detach().double(), alpha=0.5)
    return [p.detach() for p in model.parameters()], ema64, norms


@pytest.mark.parametrize("max_norm,kind", DIST_CASES)
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_distributed_clipping_equals_single_process_torch(dist_results, wrap, max_norm, kind):
    params, ema64, norms = _single_process_torch(max_norm, kind)
    for r in range(WORLD):
        got_p, got_e, got_n = dist_results[r][f"{wrap}-{max_norm}-{kind}"]
        if wrap == "fsdp":  # [torch's norm of the DTensor grads, ours] per step
            for t_norm, e_norm in zip(got_n[0::2], got_n[1::2]):
                torch.testing.assert_close(e_norm, t_norm, rtol=1e-6, atol=0)
            got_n = got_n[1::2]
        for a, b in zip(got_n, norms):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
        for a, b in zip(got_p, params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_e, ema64):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    if max_norm < 1:
        assert all(n > max_norm for n in norms)  # clipping was active at every step


def test_grad_scaler_norm_of_scaled_fp16_gradients_does_not_overflow():
    """grad_scaler= with fp16 gradients whose *scaled* norm exceeds fp16's range: the norm is
    taken in fp32 before unscaling, so it is finite and equals the unscaled gradients' norm (in
    fp16, the dtype torch returns). torch's unscale_ refuses fp16 gradients altogether."""
    torch.manual_seed(16)
    p = torch.nn.Parameter(torch.randn(4096).half())
    opt = ek.AdamW([p], lr=1e-2, backend="cpp")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    g = torch.randn(4096) * 10
    scaler.scale(torch.zeros(()))  # its scale tensor exists from the first scale()
    p.grad = (g * 2.0 ** 10).half()
    assert not torch.isfinite(torch.nn.utils.get_total_norm([p.grad]))  # fp16 overflows
    n = opt.clip_grad_norm_(1.0, grad_scaler=scaler)
    want = torch.linalg.vector_norm(p.grad.float()) / 2.0 ** 10
    assert n.dtype == torch.float16 and torch.isfinite(n)
    assert torch.equal(n, want.half())
    before = p.detach().clone()
    scaler.step(opt)
    assert not torch.equal(p, before) and torch.isfinite(p).all()
