"""Reliability across every CPU backend: checkpoints, faults, bad inputs, 64-bit indexing.

Every test runs on each backend of ``ema_kernels.available_backends('cpu')`` (reference, cpp when
the extension is built, triton under TRITON_INTERPRET=1, which tests/conftest.py sets).

- Checkpoints: resuming from ``state_dict`` mid-run is bit-exact (random problems and a real
  model through ``torch.save``/``torch.load(weights_only=True)``); torch.optim checkpoints load
  into ours and ours into torch.optim; a checkpoint written under one backend loads exactly
  under every other.
- Faults: inf/NaN gradients under ``torch.amp.GradScaler('cpu')`` (flat views, tensor lists,
  explicit ``unscale_`` + clipping) and a non-zero ``found_inf`` change nothing -- θ, state, EMA,
  counters -- and the run afterwards is the run without the bad step, bit for bit; every error
  ``step()`` raises leaves everything unchanged (validate before mutating); ``add_param_group``
  after construction gets buffers and an EMA; ``model.to(...)``/``p.data = ...`` after
  construction raises a clear error instead of training a stale copy.
- Bad inputs: each raises with a message naming the problem and touches nothing.
- Indexing past 2**31 elements: the Triton chunk table and the kernels' offset arithmetic.
"""
import copy
import io
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import ema_kernels as ek
import reliability_support as rs

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = rs.BACKENDS
FAST_BACKENDS = [b for b in BACKENDS if b not in rs.SLOW_BACKENDS]


def make_model(seed=0, dtype=torch.float32, bf16_head=False):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.LayerNorm(17), torch.nn.Tanh(),
                            torch.nn.Linear(17, 4)).to(dtype)
    if bf16_head:
        m[3].to(torch.bfloat16)
    return m


def loss_fn(model, x):
    h = model[2](model[1](model[0](x.to(model[0].weight.dtype))))
    out = model[3](h.to(model[3].weight.dtype)).float()  # the head may be bf16
    return out.pow(2).mean() + out.sin().sum() * 0.1


def groups_of(model, **second):
    """First Linear in group 0; LayerNorm and head in group 1 with its own settings."""
    return [{"params": list(model[0].parameters())},
            dict(params=list(model[1].parameters()) + list(model[3].parameters()), **second)]


def train_step(model, opt, x, set_to_none=False, drop=None):
    opt.zero_grad(set_to_none=set_to_none)
    loss_fn(model, x).backward()
    if drop is not None:
        drop.grad = None  # this parameter skips this step (torch semantics)
    opt.step()


def full_state(model, opt):
    return rs.snapshot(list(model.parameters()), opt)


def inputs(n, seed=100):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 9, generator=g) for _ in range(n)]


# ================================================================================================
# Checkpoints
# ================================================================================================
CKPT_CASES = {
    "adamw-amsgrad-bf16head": (ek.AdamW, dict(lr=1e-2, amsgrad=True, weight_decay=0.1), True),
    "adam-l2-maximize": (ek.Adam, dict(lr=1e-2, weight_decay=0.05, maximize=True), False),
    "sgd-nesterov": (ek.SGD, dict(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
                     False),
}
EMA_KW = dict(ema_decay=0.9, ema_every=2, kappa=2.0,
              ema_schedule=ek.schedules.warmup(0.99, gamma=1.0))


@pytest.mark.parametrize("none_grads", [False, True], ids=["flat", "none-grads"])
@pytest.mark.parametrize("case", list(CKPT_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_run_is_bit_exact_through_torch_save(backend, case, none_grads):
    cls, kw, bf16 = CKPT_CASES[case]
    xs = inputs(7)

    def run(model, opt, steps):
        for k in steps:
            drop = model[3].bias if (none_grads and k % 2 == 0) else None
            train_step(model, opt, xs[k], set_to_none=none_grads, drop=drop)

    a = make_model(1, bf16_head=bf16)
    oa = cls(groups_of(a, ema_decay=None, lr=3e-2), backend=backend, **EMA_KW, **kw)
    run(a, oa, range(7))

    b = make_model(1, bf16_head=bf16)
    ob = cls(groups_of(b, ema_decay=None, lr=3e-2), backend=backend, **EMA_KW, **kw)
    run(b, ob, range(3))
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    c = make_model(2, bf16_head=bf16)  # other initial values: all must come from the checkpoint
    oc = cls(groups_of(c, ema_decay=None, lr=1.0), backend=backend, **EMA_KW, **kw)
    c.load_state_dict(ck["model"])
    oc.load_state_dict(ck["opt"])
    assert oc.param_groups[1]["lr"] == 3e-2
    rs.assert_snapshots_equal(full_state(b, ob), full_state(c, oc), "right after loading")
    run(c, oc, range(3, 7))
    rs.assert_snapshots_equal(full_state(a, oa), full_state(c, oc),
                              f"{backend}: resumed run vs uninterrupted run")


@rs.hsettings(25)
@given(problem=rs.problems(max_tensors=4, max_steps=5), split=st.integers(1, 4),
       backend=st.sampled_from(BACKENDS))
def test_resume_random_problems_bit_exact(problem, split, backend):
    """Random problems (every optimizer option, AMP steps, None grads, flatten=False...):
    stop after ``split`` steps, state_dict through torch.save/load, continue in a fresh
    optimizer over fresh parameters: bit-identical to the uninterrupted run."""
    note(rs.describe(problem))
    n = len(problem["steps"])
    split = min(split, n)
    ps_a, opt_a = rs.build(problem, backend)
    ps_b, opt_b = rs.build(problem, backend)
    for k in range(n):
        for ps, opt in ((ps_a, opt_a), (ps_b, opt_b)) if k < split else ((ps_a, opt_a),):
            rs.set_kappa(problem, k, opt)
            rs.apply_grads(problem, k, ps, opt)
            opt.step(**rs.amp_args(problem, k))
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps_b], "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    other = dict(problem, seed=problem["seed"] + 1)
    ps_c, opt_c = rs.build(other, backend)
    with torch.no_grad():
        for p, q in zip(ps_c, ck["params"]):
            p.copy_(q)
    opt_c.load_state_dict(ck["opt"])
    for k in range(split, n):
        rs.set_kappa(problem, k, opt_c)
        rs.apply_grads(problem, k, ps_c, opt_c)
        opt_c.step(**rs.amp_args(problem, k))
    rs.assert_snapshots_equal(rs.snapshot(ps_a, opt_a), rs.snapshot(ps_c, opt_c),
                              f"{backend}: resumed after {split} of {n} steps")


@pytest.mark.parametrize("src,dst", [(s, d) for s in BACKENDS for d in BACKENDS if s != d])
def test_checkpoint_written_under_one_backend_loads_under_another(src, dst):
    cls, kw, bf16 = CKPT_CASES["adamw-amsgrad-bf16head"]
    xs = inputs(5)
    a = make_model(4, bf16_head=bf16)
    oa = cls(groups_of(a, ema_decay=None), backend=src, **EMA_KW, **kw)
    for x in xs[:3]:
        train_step(a, oa, x)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    b = make_model(5, bf16_head=bf16)
    ob = cls(groups_of(b, ema_decay=None), backend=dst, **EMA_KW, **kw)
    b.load_state_dict(ck["model"])
    ob.load_state_dict(ck["opt"])
    # loading is exact whatever wrote it: the next step starts from identical state
    rs.assert_snapshots_equal(full_state(a, oa), full_state(b, ob), f"{src} -> {dst}")
    assert ob.backend == dst
    # and the next steps agree within the backends' tolerance (fp32 1e-6, bf16 1 ulp)
    for x in xs[3:]:
        train_step(a, oa, x)
        train_step(b, ob, x)
    for p, q in zip(a.parameters(), b.parameters()):
        if p.dtype == torch.float32:
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        else:
            assert int(rs.ulp_distance(q.detach(), p.detach()).max()) <= 2
    for e, f in zip(oa.ema_parameters(), ob.ema_parameters()):
        if e is not None:
            torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)


MISMATCHES = {
    # (parameter index in the checkpoint, key, replacement): a checkpoint of another model
    "exp_avg of another size": (3, "exp_avg", torch.zeros(7)),
    "exp_avg that would broadcast": (0, "exp_avg", torch.ones(9)),  # into (17, 9): silent
    "ema of another shape": (4, "ema", torch.zeros(17, 4)),
    "momentum-free state for Adam": (5, "exp_avg_sq", torch.zeros(())),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_loading_a_mismatched_checkpoint_raises_and_changes_nothing(backend, case):
    """A checkpoint whose tensors do not fit the parameters must be refused with a message that
    names the parameter and the entry, before anything is loaded (not half-loaded, and never
    broadcast into the state)."""
    idx, key, value = MISMATCHES[case]
    model = make_model(70)
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=0.9, backend=backend)
    train_step(model, opt, inputs(1)[0])
    sd = opt.state_dict()
    bad = {"param_groups": sd["param_groups"],
           "state": {i: {k: (v + 1 if isinstance(v, torch.Tensor) and k != "step" else v)
                         for k, v in st.items()} for i, st in sd["state"].items()}}
    bad["state"][idx][key] = value
    params = list(model.parameters())
    before = rs.snapshot(params, opt)
    with pytest.raises((ValueError, RuntimeError)) as e:
        opt.load_state_dict(bad)
    msg = str(e.value)
    assert key in msg and str(idx) in msg, f"unclear message: {msg}"
    rs.assert_snapshots_equal(before, rs.snapshot(params, opt), f"failed load ({case})")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the compiled extension is not built")
def test_capturable_load_of_unequal_step_counts():
    """A checkpoint whose parameters took different numbers of steps (some had no gradient on
    some step) loaded into a capturable optimizer (one device step count per bucket) must
    either keep each parameter's count or refuse with a clear error -- never silently give
    every parameter the largest count (wrong bias corrections from then on)."""
    xs = inputs(4, seed=80)
    a = make_model(81)
    oa = ek.AdamW(a.parameters(), lr=1e-2, ema_decay=0.9, backend="reference")
    train_step(a, oa, xs[0])
    train_step(a, oa, xs[1], set_to_none=True, drop=a[3].bias)
    assert {float(oa.state[p]["step"]) for p in a.parameters()} == {1.0, 2.0}
    b = copy.deepcopy(a)
    ob = ek.AdamW(b.parameters(), lr=1e-2, ema_decay=0.9, backend="cpp", capturable=True)
    try:
        ob.load_state_dict(_roundtrip(oa.state_dict()))
    except (ValueError, RuntimeError) as e:
        assert "step" in str(e) and "capturable" in str(e), str(e)
        return
    assert [float(ob.state[p]["step"]) for p in b.parameters()] == \
        [float(oa.state[p]["step"]) for p in a.parameters()]
    for x in xs[2:]:
        train_step(a, oa, x)
        train_step(b, ob, x)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


TORCH_CASES = {
    "adamw-amsgrad": (torch.optim.AdamW, ek.AdamW, dict(lr=1e-2, amsgrad=True,
                                                        weight_decay=0.05)),
    "adam-l2-maximize": (torch.optim.Adam, ek.Adam, dict(lr=1e-2, weight_decay=0.05,
                                                         maximize=True)),
    # torch's Adam(decoupled_weight_decay=True) is AdamW: the flag must survive the round trip
    "adam-decoupled": (torch.optim.Adam, ek.Adam, dict(lr=1e-2, weight_decay=0.3,
                                                       decoupled_weight_decay=True)),
    "sgd-nesterov": (torch.optim.SGD, ek.SGD, dict(lr=5e-2, momentum=0.9, nesterov=True,
                                                   weight_decay=1e-3)),
    "sgd-plain": (torch.optim.SGD, ek.SGD, dict(lr=5e-2)),
}


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("case", list(TORCH_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_optim_checkpoint_loads_and_the_reverse(backend, case):
    tcls, ecls, kw = TORCH_CASES[case]
    xs = inputs(9, seed=7)
    # torch.optim -> ours
    a = make_model(6)
    ta = tcls(groups_of(a, lr=2e-2), **kw)
    for x in xs[:3]:
        train_step(a, ta, x)
    b = copy.deepcopy(a)
    eb = ecls(groups_of(b, lr=5.0), ema_decay=0.9, backend=backend, **kw)
    eb.load_state_dict(_roundtrip(ta.state_dict()))
    assert eb.param_groups[1]["lr"] == 2e-2 and eb.param_groups[0]["ema_decay"] == 0.9
    for p, e in zip(b.parameters(), eb.ema_parameters()):
        assert torch.equal(e, p)  # the EMA starts from the current parameters
    for p, q in zip(a.parameters(), b.parameters()):
        for key, val in ta.state[p].items():
            if isinstance(val, torch.Tensor):
                assert torch.equal(eb.state[q][key].float(), val.float()), key
    for x in xs[3:6]:
        train_step(a, ta, x)
        train_step(b, eb, x)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    # ours -> torch.optim
    c = copy.deepcopy(b)
    tc = tcls(groups_of(c, lr=5.0), **kw)
    tc.load_state_dict(_roundtrip(eb.state_dict()))
    assert tc.param_groups[1]["lr"] == 2e-2
    for x in xs[6:]:
        train_step(b, eb, x)
        train_step(c, tc, x)
        for p, q in zip(b.parameters(), c.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_optim_bf16_checkpoint_interop(backend):
    """torch.optim keeps bf16 state for bf16 parameters, ours keeps fp32: both directions load
    (the values cast exactly where representable) and training continues."""
    xs = inputs(4, seed=8)
    a = make_model(9, dtype=torch.bfloat16)
    ta = torch.optim.AdamW(a.parameters(), lr=1e-2)
    for x in xs[:2]:
        train_step(a, ta, x)
    b = copy.deepcopy(a)
    eb = ek.AdamW(b.parameters(), lr=1e-2, backend=backend)
    eb.load_state_dict(_roundtrip(ta.state_dict()))
    for p, q in zip(a.parameters(), b.parameters()):
        assert eb.state[q]["exp_avg"].dtype == torch.float32
        assert torch.equal(eb.state[q]["exp_avg"], ta.state[p]["exp_avg"].float())
        assert float(eb.state[q]["step"]) == float(ta.state[p]["step"]) == 2
    train_step(b, eb, xs[2])
    c = copy.deepcopy(b)
    tc = torch.optim.AdamW(c.parameters(), lr=1e-2)
    tc.load_state_dict(_roundtrip(eb.state_dict()))
    for p, q in zip(b.parameters(), c.parameters()):
        assert torch.equal(tc.state[q]["exp_avg"], eb.state[p]["exp_avg"].to(torch.bfloat16))
    train_step(c, tc, xs[3])
    assert all(torch.isfinite(p).all() for p in c.parameters())


# ================================================================================================
# Faults
# ================================================================================================
@pytest.mark.parametrize("mode", ["flat", "list", "unscale-clip"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_non_finite_step_changes_nothing(backend, bad, mode):
    """GradScaler('cpu'): the step with a non-finite gradient changes nothing (θ, moments, EMA,
    per-parameter and group counters); the scale backs off; every other step matches
    torch.optim.AdamW under its own GradScaler."""
    xs = inputs(5, seed=11)
    ref, ours = make_model(12), make_model(12)
    t_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    e_opt = ek.AdamW(ours.parameters(), lr=1e-2, ema_decay=0.9, ema_every=1, backend=backend)
    ts = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    es = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for k, x in enumerate(xs):
        for m, o, s in ((ref, t_opt, ts), (ours, e_opt, es)):
            o.zero_grad(set_to_none=(mode == "list"))
            s.scale(loss_fn(m, x)).backward()
            if k == 2:
                m[3].weight.grad[1, 3] = bad
            if mode == "unscale-clip":
                s.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            if m is ours and k == 2:
                before = full_state(ours, e_opt)
            s.step(o)
            s.update()
        if k == 2:
            rs.assert_snapshots_equal(before, full_state(ours, e_opt),
                                      f"{backend}: GradScaler step with a {bad} gradient")
            assert es.get_scale() == 2.0 ** 11
        for p, q in zip(ref.parameters(), ours.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert ts.get_scale() == es.get_scale()
    assert e_opt.param_groups[0]["steps"] == len(xs) - 1


@pytest.mark.parametrize("found", [1.0, 2.0, float("inf"), float("nan"), -1.0], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_step_is_as_if_it_never_happened(backend, found):
    """A step with found_inf != 0 (any non-zero value, 0-dim or one-element) changes nothing,
    with poisoned gradients, ema_every=2 and a schedule: the run with the skipped step equals
    the run without it, bit for bit."""
    xs = inputs(5, seed=13)
    kw = dict(lr=1e-2, momentum=0.9, ema_decay=0.9, ema_every=2, kappa=1.5,
              ema_schedule=ek.schedules.warmup(0.99), backend=backend)
    a, b = make_model(14), make_model(14)
    oa, ob = ek.SGD(groups_of(a, lr=2e-2), **kw), ek.SGD(groups_of(b, lr=2e-2), **kw)
    for k, x in enumerate(xs):
        train_step(a, oa, x)
        if k == 2:
            for mode in ("flat", "list"):
                ob.zero_grad(set_to_none=(mode == "list"))
                loss_fn(b, x).backward()
                b[0].weight.grad.fill_(float("nan"))
                before = full_state(b, ob)
                shape = () if mode == "flat" else (1,)
                ob.step(found_inf=torch.full(shape, found),
                        grad_scale=torch.full((1,), 4.0))
                rs.assert_snapshots_equal(before, full_state(b, ob),
                                          f"{backend}: found_inf={found} ({mode} grads)")
        train_step(b, ob, x)
    rs.assert_snapshots_equal(full_state(a, oa), full_state(b, ob),
                              f"{backend}: run with skipped steps vs run without")


def _two_group_setup(backend, cls=ek.AdamW, **kw):
    model = make_model(20)
    opt = cls(groups_of(model), lr=1e-2, ema_decay=0.9, backend=backend, **kw)
    train_step(model, opt, inputs(1, seed=21)[0])  # state is non-trivial
    opt.zero_grad()
    loss_fn(model, inputs(1, seed=22)[0]).backward()
    return model, opt


class _Boom(Exception):
    pass


def _raise(s):
    raise _Boom("schedule failed")


# (name, optimizer, inject(model, opt) -> undo, expected exception, message pattern)
STEP_FAULTS = {
    "kappa-breaks-beta1": (ek.AdamW, lambda m, o: o.param_groups[1].update(kappa=50.0),
                           ValueError, "beta1"),
    "kappa-zero": (ek.AdamW, lambda m, o: o.param_groups[1].update(kappa=0.0), ValueError,
                   "kappa"),
    "lr-nan": (ek.AdamW, lambda m, o: o.param_groups[1].update(lr=float("nan")), ValueError,
               "lr"),
    "lr-negative": (ek.SGD, lambda m, o: o.param_groups[1].update(lr=-0.1), ValueError, "lr"),
    "eps-inf": (ek.AdamW, lambda m, o: o.param_groups[1].update(eps=float("inf")), ValueError,
                "eps"),
    "beta2-above-one": (ek.AdamW, lambda m, o: o.param_groups[1].update(betas=(0.9, 1.5)),
                        ValueError, "betas"),
    "weight-decay-nan": (ek.Adam, lambda m, o: o.param_groups[1].update(
        weight_decay=float("nan")), ValueError, "weight_decay"),
    "momentum-inf": (ek.SGD, lambda m, o: o.param_groups[1].update(momentum=float("inf")),
                     ValueError, "momentum"),
    "nesterov-with-dampening": (ek.SGD, lambda m, o: o.param_groups[1].update(
        momentum=0.9, nesterov=True, dampening=0.5), ValueError, "nesterov"),
    "ema-decay-above-one": (ek.AdamW, lambda m, o: o.param_groups[1].update(ema_decay=1.5),
                            ValueError, "ema_decay"),
    "ema-every-zero": (ek.AdamW, lambda m, o: o.param_groups[1].update(ema_every=0),
                       ValueError, "ema_every"),
    "schedule-not-callable": (ek.AdamW, lambda m, o: o.param_groups[1].update(
        ema_schedule=0.99), TypeError, "ema_schedule"),
    # the schedule's value is validation too: it must be checked before group 0 is stepped
    "schedule-returns-1.5": (ek.AdamW, lambda m, o: o.param_groups[1].update(
        ema_schedule=lambda s: 1.5), ValueError, "ema_schedule"),
    "schedule-raises": (ek.AdamW, lambda m, o: o.param_groups[1].update(ema_schedule=_raise),
                        _Boom, "schedule failed"),
    "grad-wrong-shape": (ek.AdamW, lambda m, o: setattr(m[3].weight.grad, "data",
                                                        torch.randn(3, 3)), RuntimeError,
                         "shape"),
    "grad-other-dtype": (ek.AdamW, lambda m, o: (setattr(m[3].weight, "grad_dtype", None),
                                                 setattr(m[3].weight, "grad",
                                                         torch.randn(4, 17, dtype=torch.float64))),
                         RuntimeError, "dtype"),
    "grad-sparse": (ek.SGD, lambda m, o: setattr(m[3].weight, "grad",
                                                 torch.randn(4, 17).to_sparse()),
                    RuntimeError, "sparse"),
    "storage-replaced-other-shape": (ek.AdamW, lambda m, o: (
        setattr(m[3].bias, "data", torch.zeros(5)), setattr(m[3].bias, "grad", torch.ones(5))),
        RuntimeError, "changed from"),
    "found-inf-two-elements": (ek.AdamW, None, (RuntimeError, ValueError), ""),
}


@pytest.mark.parametrize("fault", list(STEP_FAULTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_error_leaves_everything_unchanged(backend, fault):
    """Each fault sits in the *second* group, so a step that mutated before validating would
    already have stepped the first: everything (θ of every group, state, EMA, counters) must be
    exactly as before the failed step."""
    cls, inject, exc, match = STEP_FAULTS[fault]
    kw = dict(momentum=0.5) if cls is ek.SGD else {}
    model, opt = _two_group_setup(backend, cls, **kw)
    params = list(model.parameters())
    views = [p.data for p in params]  # where the optimizer keeps θ
    before = rs.snapshot(params, opt)
    if inject is None:
        with pytest.raises(exc):
            opt.step(found_inf=torch.zeros(2))
    else:
        inject(model, opt)
        with pytest.raises(exc, match=match):
            opt.step()
    after = rs.snapshot(params, opt) if not fault.startswith("storage-replaced") else None
    if after is not None:
        rs.assert_snapshots_equal(before, after, f"{backend}: after the failed step ({fault})")
    for v, p0 in zip(views, before["vecs"][0]["theta"].split(
            before["vecs"][0]["numels"]) + before["vecs"][1]["theta"].split(
            before["vecs"][1]["numels"])):
        assert torch.equal(v.reshape(-1).double(), p0), f"{fault}: θ storage changed"
    assert [g["steps"] for g in opt.param_groups] == [1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_inside_swap_ema_raises_and_changes_nothing(backend):
    model, opt = _two_group_setup(backend)
    params = list(model.parameters())
    before = rs.snapshot(params, opt)
    with opt.swap_ema():
        with pytest.raises(RuntimeError, match="swap_ema"):
            opt.step()
    rs.assert_snapshots_equal(before, rs.snapshot(params, opt), f"{backend}: swap_ema")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_after_construction(backend):
    """A group added after training started gets flat buffers, state (step 0), an EMA starting
    at its current values (or none with ema_decay=None), trains like torch.optim.AdamW with the
    same add_param_group, and survives a state_dict round trip."""
    xs = inputs(6, seed=30)
    ref, ours = make_model(31), make_model(31)
    t_opt = torch.optim.AdamW(ref[0].parameters(), lr=1e-2)
    e_opt = ek.AdamW(ours[0].parameters(), lr=1e-2, ema_decay=0.9, backend=backend)
    for x in xs[:2]:
        t_opt.zero_grad()
        loss_fn(ref, x).backward()
        t_opt.step()
        train_step(ours, e_opt, x)
    new = list(ours[3].parameters())
    values = [p.detach().clone() for p in new]
    ptrs = [p.data_ptr() for p in new]
    t_opt.add_param_group({"params": list(ref[3].parameters()), "lr": 3e-2})
    t_opt.add_param_group({"params": list(ref[1].parameters()), "lr": 1e-3})
    e_opt.add_param_group({"params": new, "lr": 3e-2, "ema_decay": 0.5})
    e_opt.add_param_group({"params": list(ours[1].parameters()), "lr": 1e-3, "ema_decay": None})
    for p, v, ptr in zip(new, values, ptrs):
        assert torch.equal(p, v) and p.data_ptr() == ptr  # the user's storage, untouched
        assert float(e_opt.state[p]["step"]) == 0 and not e_opt.state[p]["exp_avg"].any()
    emas = e_opt.ema_parameters()
    assert len(emas) == 6 and emas[4] is None and emas[5] is None
    for e, v in zip(emas[2:4], values):
        assert torch.equal(e, v)
    ema64 = [e.double().clone() for e in emas[2:4]]
    for x in xs[2:]:
        t_opt.zero_grad()
        loss_fn(ref, x).backward()
        t_opt.step()
        train_step(ours, e_opt, x)
        for z, p in zip(ema64, new):
            z.mul_(0.5).add_(p.detach().double(), alpha=0.5)
        for p, q in zip(ref.parameters(), ours.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    for z, e in zip(ema64, e_opt.ema_parameters()[2:4]):
        torch.testing.assert_close(e.double(), z, rtol=1e-5, atol=1e-6)
    assert [g["steps"] for g in e_opt.param_groups] == [6, 4, 4]
    sd = _roundtrip(e_opt.state_dict())
    other = make_model(32)
    o2 = ek.AdamW(other[0].parameters(), lr=1e-2, ema_decay=0.9, backend=backend)
    o2.add_param_group({"params": list(other[3].parameters()), "ema_decay": 0.5})
    o2.add_param_group({"params": list(other[1].parameters()), "ema_decay": None})
    o2.load_state_dict(sd)
    with torch.no_grad():
        for p, q in zip(other.parameters(), ours.parameters()):
            p.copy_(q)
    rs.assert_snapshots_equal(full_state(ours, e_opt), full_state(other, o2), "round trip")
    # a parameter already optimized cannot be added again; nothing changes
    with pytest.raises(ValueError, match="more than one"):
        e_opt.add_param_group({"params": [ours[0].weight]})
    assert len(e_opt.param_groups) == 3


def _state_tensors(opt):
    return {(i, k): v.clone() for i, st in opt.state_dict()["state"].items()
            for k, v in st.items()}


REPLACEMENTS = {
    # (p.data replaced by a tensor of the same shape and dtype is followed: see
    # test_layout_semantics.py::test_parameter_data_replaced_is_followed)
    "model.to(float64)": (True, lambda m: m.to(torch.float64), "changed from"),
    "model.half()": (True, lambda m: m.half(), "changed from"),
    "flatten=False: model.to(float64)": (False, lambda m: m.to(torch.float64),
                                         "changed from"),
    "flatten=False: p.data = other shape": (False, lambda m: setattr(
        m[3].bias, "data", torch.zeros(5)), "changed from"),
}


@pytest.mark.parametrize("how", list(REPLACEMENTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_moved_after_construction_are_detected(backend, how):
    flatten, replace, match = REPLACEMENTS[how]
    model = make_model(40)
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=0.9, backend=backend, flatten=flatten)
    train_step(model, opt, inputs(1, seed=41)[0])
    params = list(model.parameters())
    before = rs.snapshot(params, opt)
    state_before = _state_tensors(opt)
    old = [p.data for p in params]
    replace(model)
    for p in model.parameters():
        if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype:
            p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=match) as e:
        opt.step()
    assert "optimizer" in str(e.value)  # says what to do: build the optimizer after moving
    with pytest.raises(RuntimeError, match=match):
        with opt.swap_ema():
            pass
    # nothing was trained: the optimizer's own copies and state are untouched
    for v, w in zip(old, before["vecs"][0]["theta"].split(before["vecs"][0]["numels"])):
        assert torch.equal(v.reshape(-1).double(), w)
    state_after = _state_tensors(opt)
    assert state_after.keys() == state_before.keys()
    for k, v in state_before.items():
        assert torch.equal(v, state_after[k]), k
    assert opt.param_groups[0]["steps"] == 1


# ================================================================================================
# Bad inputs
# ================================================================================================
def _p(*shape, **kw):
    return torch.nn.Parameter(torch.randn(*shape, **kw))


def _twice(make):
    p = _p(3)
    return make(p)


CONSTRUCTION_ERRORS = {
    "sparse param": (lambda: [torch.nn.Parameter(torch.randn(3, 3).to_sparse())], TypeError,
                     "sparse"),
    "complex param": (lambda: [_p(3, dtype=torch.complex64)], TypeError, "complex"),
    "integer param": (lambda: [torch.nn.Parameter(torch.arange(3), requires_grad=False)],
                      TypeError, "floating point"),
    "param in two groups": (lambda: _twice(lambda p: [{"params": [p]}, {"params": [p]}]),
                            ValueError, "more than one"),
    "empty list": (lambda: [], ValueError, "empty"),
    # (an empty group and a bare set of parameters are accepted, as torch.optim accepts them)
    "set of params in a group": (lambda: [{"params": {_p(3)}}], TypeError, "sets"),
    "non-tensor": (lambda: [_p(2), "weight"], TypeError, "Tensor"),
    "non-leaf": (lambda: [_p(3) * 2], ValueError, "leaf"),
}


@pytest.mark.parametrize("case", list(CONSTRUCTION_ERRORS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_parameters_raise_a_clear_error(backend, case):
    make, exc, match = CONSTRUCTION_ERRORS[case]
    params = make()
    flat = [p for g in (params if isinstance(params, (list, set)) else [params])
            for p in (g["params"] if isinstance(g, dict) else [g]) if isinstance(p, torch.Tensor)]
    ptrs = [p.data_ptr() for p in flat if p.layout == torch.strided]
    with pytest.raises(exc, match=match):
        ek.AdamW(params, backend=backend)
    # a failed construction leaves the parameters as they were: storage not moved into a
    # buffer of the optimizer that was never built, and no zero .grad views attached
    assert [p.data_ptr() for p in flat if p.layout == torch.strided] == ptrs
    assert all(p.grad is None for p in flat if p.is_leaf)


NON_FINITE = [float("nan"), float("inf"), -float("inf")]
HPARAMS = {
    ek.AdamW: ["lr", "eps", "weight_decay", "betas0", "betas1", "ema_decay", "kappa"],
    ek.SGD: ["lr", "momentum", "dampening", "weight_decay", "ema_decay", "kappa"],
}


def _with(key, value, cls):
    if key.startswith("betas"):
        b = [0.9, 0.999]
        b[int(key[-1])] = value
        return "betas", tuple(b)
    return key, value


@pytest.mark.parametrize("cls", [ek.AdamW, ek.SGD], ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_hyperparameters_raise_naming_the_value(backend, cls):
    """nan/±inf for every hyperparameter: at construction, and set in a param group later
    (checked at step, nothing changed)."""
    tried = 0
    for key, value in itertools.product(HPARAMS[cls], NON_FINITE):
        name, v = _with(key, value, cls)
        params = [_p(5), _p(3, 2)]
        ptrs = [p.data_ptr() for p in params]
        with pytest.raises(ValueError, match=name) as e:
            cls(params, backend=backend, **dict(dict(lr=0.1), **{name: v}))
        assert any(s in str(e.value) for s in ("finite", "must", "invalid")), str(e.value)
        assert [p.data_ptr() for p in params] == ptrs
        model, opt = _two_group_setup(backend, cls)
        ps = list(model.parameters())
        before = rs.snapshot(ps, opt)
        opt.param_groups[1][name] = v
        with pytest.raises(ValueError, match=name):
            opt.step()
        rs.assert_snapshots_equal(before, rs.snapshot(ps, opt), f"{cls.__name__} {name}={v}")
        tried += 1
    assert tried == 3 * len(HPARAMS[cls])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_gradients_raise_a_clear_error(backend):
    """Gradients torch's own checks let through: set via .data (wrong shape), another dtype
    (after p.grad_dtype = None), sparse; each named in the message, nothing changed; after
    zero_grad() the flat views are back and training proceeds."""
    model = make_model(50)
    opt = ek.AdamW(model.parameters(), lr=1e-2, backend=backend)
    params = list(model.parameters())
    before = rs.snapshot(params, opt)
    w = model[0].weight
    cases = [
        (lambda: setattr(w.grad, "data", torch.randn(3, 3)), "shape"),
        (lambda: setattr(w.grad, "data", torch.randn(9, 17)), "shape"),  # same numel, transposed
        (lambda: (setattr(w, "grad_dtype", None),
                  setattr(w, "grad", torch.randn(17, 9, dtype=torch.float64))), "dtype"),
        (lambda: setattr(w, "grad", torch.randn(17, 9, dtype=torch.bfloat16)), "dtype"),
        (lambda: setattr(w, "grad", torch.randn(17, 9).to_sparse()), "sparse"),
    ]
    for inject, match in cases:
        opt.zero_grad()
        loss_fn(model, inputs(1)[0]).backward()
        inject()
        with pytest.raises(RuntimeError, match=match):
            opt.step()
        rs.assert_snapshots_equal(before, rs.snapshot(params, opt), f"bad grad ({match})")
    opt.zero_grad()
    train_step(model, opt, inputs(1)[0])
    assert opt.param_groups[0]["steps"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_user_gradient_is_read_correctly(backend):
    """A user-set gradient that is a transposed (non-contiguous) view is a valid input: the
    result equals the one with the contiguous gradient."""
    a, b = make_model(51), make_model(51)
    oa = ek.AdamW(a.parameters(), lr=1e-2, ema_decay=0.5, backend=backend)
    ob = ek.AdamW(b.parameters(), lr=1e-2, ema_decay=0.5, backend=backend)
    g = torch.randn(9, 17)
    for m, o, grad in ((a, oa, g.t().contiguous()), (b, ob, g.t())):
        o.zero_grad()
        loss_fn(m, inputs(1)[0]).backward()
        m[0].weight.grad = grad
        o.step()
    rs.assert_snapshots_equal(full_state(a, oa), full_state(b, ob), "non-contiguous grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_group_on_two_devices(backend):
    """DESIGN.md packs a group by (device, dtype): parameters of one group on two devices are
    supported, not a bad input.  Without a GPU the second device is 'meta': the reference (and
    'auto', which picks it for meta tensors) steps both buckets, the CPU part exactly as a
    CPU-only group would; a backend that cannot run on meta tensors says so (naming 'meta')
    before anything moves."""
    x = torch.randn(7)
    cpu = torch.nn.Parameter(x.clone())
    meta = torch.nn.Parameter(torch.randn(3, 4, device="meta"))
    alone = torch.nn.Parameter(x.clone())
    opt = ek.AdamW([cpu, meta], lr=0.1, ema_decay=0.5, backend=backend)
    solo = ek.AdamW([alone], lr=0.1, ema_decay=0.5, backend=backend)
    assert len(opt._sets[0]) == 2  # one set (launch) per device
    cpu.grad = (torch.linspace(-1, 1, 7)).to(cpu.dtype)
    alone.grad = (torch.linspace(-1, 1, 7)).to(alone.dtype)
    meta.grad = torch.zeros_like(meta)  # stepped iff it has a gradient, as in torch
    before = cpu.detach().clone()
    if backend == "reference":
        opt.step()
        solo.step()
        assert torch.equal(cpu, alone) and not torch.equal(cpu, before)
        assert torch.equal(opt.ema_parameters()[0], solo.ema_parameters()[0])
        assert meta.device.type == "meta" and meta.shape == (3, 4)
        assert opt.state[meta]["exp_avg"].device.type == "meta"
        assert float(opt.state[meta]["step"]) == 1
    else:
        with pytest.raises(ek.BackendUnavailableError, match="meta"):
            opt.step()
        assert torch.equal(cpu, before) and opt.param_groups[0]["steps"] == 0
        assert float(opt.state[cpu]["step"]) == 0


def test_auto_backend_with_a_meta_parameter():
    cpu, meta = _p(4), torch.nn.Parameter(torch.randn(2, device="meta"))
    opt = ek.SGD([cpu, meta], lr=0.1)
    cpu.grad = torch.full_like(cpu, 1.0)
    before = cpu.detach().clone()
    opt.step()
    torch.testing.assert_close(cpu.detach(), before - 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_group_on_cpu_and_cuda():  # pragma: no cover - GPU machines only
    x = torch.randn(33)
    a, b = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone().cuda())
    opt = ek.AdamW([a, b], lr=0.1, ema_decay=0.5)
    a.grad = torch.full_like(a, 0.5)
    b.grad = torch.full_like(b, 0.5)
    opt.step()
    torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.ema_parameters()[1].cpu(), opt.ema_parameters()[0],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", [b for b in ("cuda",) if b not in BACKENDS])
def test_backend_that_cannot_run_here_says_why(backend):
    model = make_model(60)
    opt = ek.AdamW(model.parameters(), backend=backend)
    params = list(model.parameters())
    before = rs.snapshot(params, opt)
    loss_fn(model, inputs(1)[0]).backward()
    with pytest.raises(ek.BackendUnavailableError, match=backend) as e:
        opt.step()
    assert "cpu" in str(e.value)
    rs.assert_snapshots_equal(before, rs.snapshot(params, opt), "unavailable backend")


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
def test_float64_parameters(backend):
    """fp64 parameters are accepted at construction (fp64 state, DESIGN/flat.py).  The
    reference trains them (vs torch.optim.AdamW in float64); 'auto' must pick a backend that
    can (cpp/triton kernels take fp32/bf16/fp16 only); a named backend that cannot must say so
    before anything moves -- here the fp64 bucket comes *after* an fp32 bucket of the same
    group, which a step that mutated before validating would already have stepped."""
    torch.manual_seed(61)
    a32, a64 = _p(5), _p(6, dtype=torch.float64)
    ref64 = torch.nn.Parameter(a64.detach().clone())
    t_opt = torch.optim.AdamW([ref64], lr=1e-2)
    opt = ek.AdamW([a32, a64], lr=1e-2, ema_decay=0.9, backend=backend)
    params = [a32, a64]
    g = torch.randn(6, dtype=torch.float64)
    a32.grad = torch.full_like(a32, 1.0)
    a64.grad = (g).to(a64.dtype)
    ref64.grad = g.clone()
    before = rs.snapshot(params, opt)
    runs_fp64 = backend in ("reference", "auto")
    if runs_fp64:
        opt.step()
        t_opt.step()
        torch.testing.assert_close(a64.detach(), ref64.detach(), rtol=1e-12, atol=1e-14)
        assert opt.state[a64]["exp_avg"].dtype == torch.float64
    else:
        with pytest.raises(TypeError, match="float64"):
            opt.step()
        rs.assert_snapshots_equal(before, rs.snapshot(params, opt),
                                  f"{backend}: step that cannot run fp64 parameters")


# ================================================================================================
# 64-bit indexing
# ================================================================================================
@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available here")
def test_triton_chunk_table_past_2_31_elements():
    """The tensor-list launch's table (built on the host, int64) for tensors of 2**31 + 5 and
    2**32 + 2049 elements: no allocation of the tensors themselves, only of the table."""
    from ema_kernels.backends.triton import config, tables
    B = config.BLOCK
    numels = [2 ** 31 + 5, 7, 0, 2 ** 32 + B + 1]
    base = 1 << 40  # fake, 16-byte aligned addresses: the table only stores them
    addrs = [[base + 16 * (r * 8 + i) for i in range(len(numels))] for r in range(2)]
    n = len(numels)
    before = set(tables._table_cache)
    try:
        table, n_chunks = tables._table(addrs, numels, torch.device("cpu"))
    finally:
        for key in set(tables._table_cache) - before:
            tables._table_cache.pop(key)
    counts = [math.ceil(k / B) for k in numels]
    assert n_chunks == sum(counts) and table.dtype == torch.int64
    assert table[:2 * n].tolist() == [a for row in addrs for a in row]
    assert table[2 * n:3 * n].tolist() == numels
    chunk_t = table[3 * n:3 * n + n_chunks]
    chunk_start = table[3 * n + n_chunks:]
    assert chunk_start.numel() == n_chunks
    assert torch.equal(chunk_t, torch.repeat_interleave(torch.arange(n), torch.tensor(counts)))
    off = 0
    for i, c in enumerate(counts):
        starts = chunk_start[off:off + c]
        if c:
            assert torch.equal(starts, torch.arange(c, dtype=torch.int64) * B)
            last = int(starts[-1])
            assert last < numels[i] <= last + B  # the last chunk covers the end, and no more
        off += c
    assert int(chunk_start.max()) > 2 ** 32  # exact past 2**31 and 2**32


_TTIR_SCRIPT = r"""
import json, re, sys
from ema_kernels.backends import triton as tk
from ema_kernels.backends.triton.config import NUM_WARPS
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def ttir(kernel, sig, const, attrs):
    ordered = {k: sig[k] for k in kernel.arg_names}
    src = ASTSource(kernel, ordered, const, attrs)
    target = GPUTarget("cuda", 90, 32)
    try:  # front end only: no ptxas, a fraction of a second per variant
        from triton._C.libtriton import ir
        from triton.backends.nvidia.compiler import CUDABackend
        be = CUDABackend(target)
        opts = be.parse_options({"num_warps": NUM_WARPS})
        ctx = ir.context(); ir.load_dialects(ctx); be.load_dialects(ctx)
        return str(src.make_ir(target, opts, be.get_codegen_implementation(opts),
                               be.get_module_map(), ctx))
    except Exception:  # another triton version: compile fully and read the TTIR
        return tk.aot_compile(kernel, sig, const, attrs, 90).asm["ttir"]

out = []
variants = list(tk.aot_variants())
for prefix in ("adam_flat[", "sgd_flat[", "adam_list[", "sgd_list["):
    label, kernel, sig, const, attrs = [v for v in variants if v[0].startswith(prefix)][-1]
    if "n" in sig:
        sig = dict(sig, n="i64")  # the JIT passes n > 2**31 - 1 as a 64-bit integer
    text = ttir(kernel, sig, const, attrs)
    tensor_addptrs = re.findall(r"tt\.addptr [^\n]*: tensor<[^\n]*", text)
    out.append(dict(label=label, n=len(tensor_addptrs),
                    i32=[a for a in tensor_addptrs if re.search(r"tensor<\d+xi32>", a)]))
print(json.dumps(out))
"""


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available here")
def test_triton_element_offsets_are_64_bit_in_every_kernel():
    """Every per-element pointer of the flat (with n as a 64-bit integer, as the JIT passes
    n >= 2**31) and tensor-list kernels is formed from int64 offsets (Triton's front end, no
    GPU; test_triton_kernels checks the compiled flat kernels with n as i32)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _TTIR_SCRIPT], cwd=str(ROOT), env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    recs = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(recs) == 4
    for r in recs:
        assert r["n"] >= 4, r  # θ, g and state loads/stores were found
        assert not r["i32"], f"{r['label']}: 32-bit element offsets: {r['i32'][:3]}"


@pytest.mark.skipif(not torch.cuda.is_available()
                    or torch.cuda.get_device_properties(0).total_memory < 40 * 2 ** 30,
                    reason="needs a CUDA GPU with >= 40 GB")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_flat_buffer_past_2_31_elements(backend):  # pragma: no cover - GPU machines only
    """The real thing: SGD + EMA on one bf16 tensor of 2**31 + 4099 elements; the elements past
    2**31 (and around it) are updated exactly as the reference updates them."""
    if backend not in ek.available_backends("cuda"):
        pytest.skip(f"{backend} not available on this GPU machine")
    n = 2 ** 31 + 4099
    p = torch.nn.Parameter(torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_())
    opt = ek.SGD([p], lr=0.5, ema_decay=0.5, backend=backend)
    p.grad = torch.full_like(p, 1.0)
    probes = [0, 2 ** 31 - 3, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, n - 2050, n - 1]
    idx = torch.tensor(probes, device="cuda")
    before = p.detach()[idx].float()
    opt.step()
    torch.cuda.synchronize()
    expect = (before - 0.5).to(torch.bfloat16)
    assert torch.equal(p.detach()[idx], expect)
    torch.testing.assert_close(opt.ema_parameters()[0][idx], 0.5 * before + 0.5 * expect.float())
    tail = p.detach()[2 ** 31 - 8:]
    assert torch.isfinite(tail.float()).all()
