"""The compiled extension's CPU kernels (backend 'cpp') against the reference backend.

CI builds the extension, so these tests FAIL when it is missing or broken (set
EMA_KERNELS_NO_EXT=1 to skip them in a deliberately extension-free environment).

Every case draws fresh random data, runs a few steps on both backends and, after each step,
compares (then copies the reference's results into the tested tensors, so every step is
compared from identical inputs):

* fp32 parameters and all fp32 state: |a - e| <= 1e-6 * max(|e|, |e - before|), i.e. relative
  to the value or to the step's change where the value cancels to ~0.  (torch's AVX2 sqrt, used
  by the reference on CPU, is not correctly rounded; the kernels' is, as on the GPU, so an exact
  match is not expected.)
* bf16/fp16 parameters: within 1 ulp of the reference's (round-to-nearest-even) result.
* EMA: within 1e-5 (same relative measure) of lerp(ζ_before, θ_as_stored, w), and equal to
  the reference's where θ equals the reference's θ exactly.
* found_inf != 0: nothing changes, bit for bit.

The matrix runner (`run_case`) is shared with tests/test_cuda_ext.py's GPU section.
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from ema_kernels.backends import reference

NO_EXT = os.environ.get("EMA_KERNELS_NO_EXT", "").strip().lower() in ("1", "true", "yes", "on")
pytestmark = pytest.mark.skipif(NO_EXT, reason="EMA_KERNELS_NO_EXT=1: extension deliberately "
                                               "not built")


def _backend(name):
    """The backend module; fails (not skips) when the compiled extension is unavailable."""
    if name == "cpp":
        from ema_kernels.backends import cpp as mod
        device_type = "cpu"
    else:
        from ema_kernels.backends import cuda as mod
        device_type = "cuda"
    ok, why = mod.availability(device_type)
    if not ok:
        pytest.fail(f"backend {name!r} unavailable: {why}")
    return mod


# ----------------------------------------------------------------------------------------------
# Comparison helpers
# ----------------------------------------------------------------------------------------------
def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 values mapped to integers whose difference counts ulps (sign-magnitude ->
    two's complement order; +0 and -0 coincide)."""
    b = x.contiguous().view(torch.int16).to(torch.int32)
    mag = b & 0x7FFF
    return torch.where(b < 0, -mag, mag)


def assert_ulp(actual, expected, what, max_ulp=1, before=None):
    """Within `max_ulp` ulp; where the value cancels to ~0 (|e| << |e - before|), within the
    fp32 tolerance of the change instead (the fp32 result is only 1e-6-close to the step)."""
    assert actual.dtype == expected.dtype
    a, e = actual.detach().cpu(), expected.detach().cpu()
    both_nan = torch.isnan(a.float()) & torch.isnan(e.float())
    d = (_ordered_bits(a) - _ordered_bits(e)).abs()
    d = torch.where(both_nan, torch.zeros_like(d), d)
    if before is not None:
        change = (e.double() - before.detach().cpu().double()).abs()
        ok = (a.double() - e.double()).abs() <= 1e-6 * change
        d = torch.where(ok, torch.zeros_like(d), d)
    worst = int(d.max()) if d.numel() else 0
    if worst > max_ulp:
        i = int(d.argmax())
        raise AssertionError(f"{what}: {worst} ulp apart at [{i}]: {a.flatten()[i].item()} vs "
                             f"reference {e.flatten()[i].item()} (allowed {max_ulp})")


def assert_rel(actual, expected, before, what, rtol):
    """|a - e| <= rtol * max(|e|, |e - before|) elementwise (fp32)."""
    a = actual.detach().cpu().double().flatten()
    e = expected.detach().cpu().double().flatten()
    scale = e.abs()
    if before is not None:
        scale = torch.maximum(scale, (e - before.detach().cpu().double().flatten()).abs())
    scale = torch.clamp(scale, min=1e-30)
    err = (a - e).abs()
    nan_ok = torch.isnan(a) & torch.isnan(e)
    bad = (err > rtol * scale) & ~nan_ok
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements off, first [{i}]: "
                             f"{a[i].item()!r} vs reference {e[i].item()!r} (rel. err "
                             f"{(err[i] / scale[i]).item():.3g} > {rtol})")


def assert_param(actual, expected, before, what):
    if actual.dtype == torch.float32:
        assert_rel(actual, expected, before, what, 1e-6)
    else:
        assert_ulp(actual, expected, what, before=before)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------
OPTIMIZERS = {
    "adamw": dict(kind="adam", decoupled=True, weight_decay=1e-2),
    "adam": dict(kind="adam", decoupled=False, weight_decay=0.0),
    "adam_l2_max": dict(kind="adam", decoupled=False, weight_decay=0.1, maximize=True),
    "adamw_amsgrad": dict(kind="adam", decoupled=True, weight_decay=1e-2, amsgrad=True),
    "sgd": dict(kind="sgd", momentum=0.0, weight_decay=0.0),
    "sgd_mom_damp_wd": dict(kind="sgd", momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "sgd_nesterov_max": dict(kind="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3,
                             maximize=True),
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# name -> list of tensor sizes (one => the flat kernel; several => the tensor-list kernel)
SIZES = {
    "n1": [1],
    "n5": [5],
    "n4099": [4099],
    "n2p20p3": [2 ** 20 + 3],
    "list": "many",
}
# name -> (ema weights per step (None: EMA not updated that step), grad_scale?, found_inf per step)
MODES = {
    "ema": ([0.3, 0.7, 1e-4], False, [None, None, None]),
    "ema_every2_scaled": ([None, 0.02, None], True, [None, None, None]),
    "found_inf": ([0.1, 0.1, 0.1], True, [0.0, 1.0, 0.0]),
}


def _sizes(name, rng):
    s = SIZES[name]
    if s == "many":  # many small tensors, a zero-size one, and one spanning several chunks
        return [rng.randint(1, 3000) for _ in range(40)] + [0, 7, 70000]
    return list(s)


def _make_tensors(sizes, dtype, device, rng_seed, unaligned):
    """Per-role lists.  With `unaligned`, tensors are contiguous views at odd offsets into a
    larger buffer (legal inputs; the CUDA kernels must fall back from vector loads)."""
    g = torch.Generator().manual_seed(rng_seed)

    def mk(n, dt, fn):
        off = 1 if unaligned else 0
        return fn(n + off, g).to(dt).to(device)[off:]

    params = [mk(n, dtype, lambda k, g: torch.randn(k, generator=g)) for n in sizes]
    return params, mk


def _clone_all(lst):
    return None if lst is None else [t.clone() for t in lst]


def run_case(backend_name, device, opt_name, dtype_name, size_name, mode_name, seed,
             steps=3, unaligned=False):
    """Runs `steps` steps of the tested backend and the reference; asserts after each."""
    mod = _backend(backend_name)
    cfg = dict(OPTIMIZERS[opt_name])
    kind = cfg.pop("kind")
    dtype = DTYPES[dtype_name]
    ema_ws, scaled, found = MODES[mode_name]
    rng = random.Random(seed)
    sizes = _sizes(size_name, rng)
    params, mk = _make_tensors(sizes, dtype, device, seed, unaligned)
    randn = lambda k, g: torch.randn(k, generator=g)  # noqa: E731
    emas = [mk(n, torch.float32, randn) for n in sizes]
    amsgrad = cfg.pop("amsgrad", False)
    if kind == "adam":
        state = {"exp_avgs": [mk(n, torch.float32, lambda k, g: 0.1 * torch.randn(k, generator=g))
                              for n in sizes],
                 "exp_avg_sqs": [mk(n, torch.float32, lambda k, g: 0.01 * torch.rand(k, generator=g))
                                 for n in sizes],
                 "max_exp_avg_sqs": ([mk(n, torch.float32, lambda k, g: 0.02 * torch.rand(k, generator=g))
                                      for n in sizes] if amsgrad else None)}
    else:
        state = {"momentum_buffers": ([mk(n, torch.float32, randn) for n in sizes]
                                      if cfg.get("momentum", 0.0) != 0 else None)}
    lr, beta1, beta2, eps = 1e-2, 0.9, 0.999, 1e-8
    gen = torch.Generator().manual_seed(seed + 1)

    for step in range(1, steps + 1):
        grads = [(torch.randn(n, generator=gen) * rng.choice([1e-3, 1.0, 10.0])).to(dtype)
                 .to(device) for n in sizes]
        w = ema_ws[step - 1]
        gscale = torch.tensor([rng.choice([1.0, 2.0, 1024.0])], device=device) if scaled else None
        fi = found[step - 1]
        finf = None if fi is None else torch.tensor([fi], device=device)
        # tested (t) and reference (r) copies of everything
        t_p, r_p = _clone_all(params), _clone_all(params)
        t_z, r_z = _clone_all(emas), _clone_all(emas)
        t_s = {k: _clone_all(v) for k, v in state.items()}
        r_s = {k: _clone_all(v) for k, v in state.items()}
        if kind == "adam":
            hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, step_size=lr / (1 - beta1 ** step),
                      bias_correction2_sqrt=math.sqrt(1 - beta2 ** step),
                      weight_decay=cfg["weight_decay"], decoupled=cfg["decoupled"],
                      maximize=cfg.get("maximize", False), ema_weight=w)
            mod.adam_ema(t_p, grads, t_s["exp_avgs"], t_s["exp_avg_sqs"],
                         t_s["max_exp_avg_sqs"], t_z, **hp, grad_scale=gscale, found_inf=finf)
            reference.adam_ema(r_p, grads, r_s["exp_avgs"], r_s["exp_avg_sqs"],
                               r_s["max_exp_avg_sqs"], r_z, **hp, grad_scale=gscale,
                               found_inf=finf)
        else:
            hp = dict(lr=lr, momentum=cfg.get("momentum", 0.0),
                      dampening=cfg.get("dampening", 0.0), weight_decay=cfg["weight_decay"],
                      nesterov=cfg.get("nesterov", False), maximize=cfg.get("maximize", False),
                      first_step=step == 1, ema_weight=w)
            mod.sgd_ema(t_p, grads, t_s["momentum_buffers"], t_z, **hp, grad_scale=gscale,
                        found_inf=finf)
            reference.sgd_ema(r_p, grads, r_s["momentum_buffers"], r_z, **hp,
                              grad_scale=gscale, found_inf=finf)
        where = f"{backend_name} {opt_name} {dtype_name} {size_name} {mode_name} step {step}"
        if fi:  # a skipped step: bit for bit unchanged
            for a, b in zip(t_p + t_z, params + emas):
                assert torch.equal(a, b), f"{where}: found_inf step changed a tensor"
            for k in t_s:
                for a, b in zip(t_s[k] or [], state[k] or []):
                    assert torch.equal(a, b), f"{where}: found_inf step changed {k}"
        else:
            for i in range(len(sizes)):
                assert_param(t_p[i], r_p[i], params[i].float(), f"{where} params[{i}]")
                for k in t_s:
                    if t_s[k] is not None:
                        assert_rel(t_s[k][i], r_s[k][i], state[k][i], f"{where} {k}[{i}]", 1e-6)
                if w is None:
                    assert torch.equal(t_z[i], emas[i]), f"{where}: EMA written on a non-EMA step"
                else:
                    expect = emas[i].clone().lerp_(t_p[i].float(), w)
                    assert_rel(t_z[i], expect, emas[i], f"{where} emas[{i}]", 1e-5)
                    same = t_p[i] == r_p[i]
                    assert_rel(t_z[i][same], r_z[i][same], emas[i][same],
                               f"{where} emas[{i}] vs reference", 1e-5)
        # next step starts from the reference's results
        params, emas, state = r_p, r_z, r_s


def matrix():
    """optimizer x dtype x size x mode; the 2^20+3 flat size (slow on the reference) runs every
    optimizer and dtype with the EMA mode, and every mode with adamw/fp32 and sgd/bf16."""
    out = []
    for opt_name in OPTIMIZERS:
        for dtype_name in DTYPES:
            for size_name in SIZES:
                for mode_name in MODES:
                    if size_name == "n2p20p3" and mode_name != "ema" and \
                            (opt_name, dtype_name) not in (("adamw", "f32"),
                                                           ("sgd_mom_damp_wd", "bf16")):
                        continue
                    out.append((opt_name, dtype_name, size_name, mode_name))
    return out


@pytest.mark.parametrize("opt_name,dtype_name,size_name,mode_name", matrix())
def test_cpp_matches_reference(opt_name, dtype_name, size_name, mode_name):
    seed = random.randrange(1 << 30)  # fresh data every run; printed on failure
    try:
        run_case("cpp", "cpu", opt_name, dtype_name, size_name, mode_name, seed)
    except AssertionError as e:
        raise AssertionError(f"{e} (seed {seed})") from None


@pytest.mark.parametrize("opt_name", ["adamw_amsgrad", "sgd_mom_damp_wd"])
def test_cpp_unaligned_views(opt_name):
    """Contiguous tensors at odd offsets (not 16-byte aligned) give the same results."""
    run_case("cpp", "cpu", opt_name, "bf16", "list", "ema", random.randrange(1 << 30),
             unaligned=True)


# ----------------------------------------------------------------------------------------------
# ema_only, capturable variants, argument handling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("sizes", [[1], [4099], [2 ** 20 + 3], [3, 0, 5000, 17]])
def test_ema_only(dtype_name, sizes):
    mod = _backend("cpp")
    dtype = DTYPES[dtype_name]
    params = [torch.randn(n).to(dtype) for n in sizes]
    emas = [torch.randn(n) for n in sizes]
    for w in (1e-4, 0.5, 0.9):
        t, r = _clone_all(emas), _clone_all(emas)
        mod.ema_only(params, t, w)
        reference.ema_only(params, r, w)
        for i in range(len(sizes)):
            assert_rel(t[i], r[i], emas[i], f"ema_only[{i}] w={w}", 1e-6)


def _scalar(x):
    return torch.tensor([x], dtype=torch.float32)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype_name", ["f32", "bf16"])
def test_adam_capturable_matches_reference(amsgrad, dtype_name):
    """The capturable op reads lr/step/ema_weight from tensors and forms the bias corrections
    itself (the CUDA-graph path); on CPU tensors the same math runs on the host."""
    mod = _backend("cpp")
    dtype = DTYPES[dtype_name]
    n = 70001
    p = torch.randn(n).to(dtype)
    m, v, z = 0.1 * torch.randn(n), 0.01 * torch.rand(n), torch.randn(n)
    vmax = v + 0.01 * torch.rand(n) if amsgrad else None
    beta1, beta2 = 0.9, 0.99
    lr32 = float(torch.tensor(3e-3, dtype=torch.float32))
    for step, w in [(1, 0.25), (2, None), (7, 1e-3)]:
        g = torch.randn(n).to(dtype)
        tp, rp = p.clone(), p.clone()
        ts = [m.clone(), v.clone(), vmax.clone() if amsgrad else None, z.clone()]
        rs = [m.clone(), v.clone(), vmax.clone() if amsgrad else None, z.clone()]
        mod.adam_ema_capturable([tp], [g], [ts[0]], [ts[1]], [ts[2]] if amsgrad else None,
                                [ts[3]], lr=_scalar(lr32), step=_scalar(step), beta1=beta1,
                                beta2=beta2, eps=1e-8, weight_decay=0.05, decoupled=True,
                                maximize=False, ema_weight=None if w is None else _scalar(w),
                                grad_scale=_scalar(4.0), found_inf=_scalar(0.0))
        w32 = None if w is None else float(torch.tensor(w, dtype=torch.float32))
        reference.adam_ema([rp], [g], [rs[0]], [rs[1]], [rs[2]] if amsgrad else None, [rs[3]],
                           lr=lr32, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=0.05,
                           decoupled=True, maximize=False,
                           step_size=lr32 / (1 - beta1 ** step),
                           bias_correction2_sqrt=math.sqrt(1 - beta2 ** step), ema_weight=w32,
                           grad_scale=_scalar(4.0), found_inf=_scalar(0.0))
        assert_param(tp, rp, p.float(), f"capturable step {step} params")
        assert_rel(ts[0], rs[0], m, "exp_avg", 1e-6)
        assert_rel(ts[1], rs[1], v, "exp_avg_sq", 1e-6)
        if w is None:
            assert torch.equal(ts[3], z)
        else:
            assert_rel(ts[3], z.clone().lerp_(tp.float(), w32), z, "ema", 1e-5)
        p, m, v, z = rp, rs[0], rs[1], rs[3]
        vmax = rs[2]


def test_sgd_capturable_matches_plain():
    mod = _backend("cpp")
    n = 40000
    p, g, buf, z = torch.randn(n), torch.randn(n), torch.randn(n), torch.randn(n)
    lr32 = float(torch.tensor(0.05, dtype=torch.float32))
    for first in (True, False):
        a = [p.clone(), buf.clone(), z.clone()]
        b = [p.clone(), buf.clone(), z.clone()]
        kw = dict(momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True, maximize=False,
                  first_step=first)
        mod.sgd_ema_capturable([a[0]], [g], [a[1]], [a[2]], lr=_scalar(lr32),
                               ema_weight=_scalar(0.125), **kw)
        mod.sgd_ema([b[0]], [g], [b[1]], [b[2]], lr=lr32, ema_weight=0.125, **kw)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_found_inf_skips_capturable():
    mod = _backend("cpp")
    p, g, m, v, z = (torch.randn(100) for _ in range(5))
    v = v.abs()
    before = [t.clone() for t in (p, m, v, z)]
    mod.adam_ema_capturable([p], [g], [m], [v], None, [z], lr=_scalar(0.1), step=_scalar(1),
                            beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                            maximize=False, ema_weight=_scalar(0.5), found_inf=_scalar(1.0))
    for a, b in zip((p, m, v, z), before):
        assert torch.equal(a, b)


def test_ema_weight_none_touches_no_ema():
    mod = _backend("cpp")
    p, g, m, v = torch.randn(1000), torch.randn(1000), torch.zeros(1000), torch.zeros(1000)
    z = torch.full((1000,), float("nan"))
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
              maximize=False, step_size=1e-2, bias_correction2_sqrt=0.05, ema_weight=None)
    mod.adam_ema([p], [g], [m], [v], None, [z], **kw)  # emas given but ignored
    mod.adam_ema([p], [g], [m], [v], None, None, **kw)  # or None
    assert torch.isnan(z).all()
    mod.sgd_ema([p], [g], None, None, lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                nesterov=False, maximize=False, first_step=True, ema_weight=None)


def test_first_step_ignores_uninitialised_momentum_buffer():
    mod = _backend("cpp")
    p, g = torch.randn(4099), torch.randn(4099)
    buf = torch.full((4099,), float("inf"))  # garbage, as from torch.empty
    mod.sgd_ema([p], [g], [buf], None, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.0,
                nesterov=False, maximize=False, first_step=True, ema_weight=None)
    assert torch.equal(buf, g)
    assert torch.isfinite(p).all()


def test_empty_lists_are_no_ops():
    mod = _backend("cpp")
    mod.adam_ema([], [], [], [], None, None, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, decoupled=True, maximize=False, step_size=1e-3,
                 bias_correction2_sqrt=1.0, ema_weight=0.1)
    mod.ema_only([], [], 0.5)


def _adam_kw(**over):
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
              maximize=False, step_size=1e-3, bias_correction2_sqrt=1.0, ema_weight=0.1)
    kw.update(over)
    return kw


def test_float64_raises_type_error_naming_reference():
    mod = _backend("cpp")
    p = torch.randn(10, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='reference'"):
        mod.adam_ema([p], [p.clone()], [p.clone()], [p.clone()], None, [p.clone()], **_adam_kw())
    with pytest.raises(TypeError, match="backend='reference'"):  # the op itself says so too
        torch.ops.ema_kernels_ext.sgd_ema_([p], [p.clone()], [], [], lr=0.1, momentum=0.0,
                                           dampening=0.0, weight_decay=0.0, nesterov=False,
                                           maximize=False, first_step=True, ema_weights=[])


@pytest.mark.parametrize("problem,match", [
    ("length", "grads has 1 tensors but params has 2"),
    ("numel", r"exp_avg_sqs\[0\] has 9 elements but params\[0\] has 10"),
    ("state_dtype", r"exp_avgs\[0\] has dtype BFloat16, expected Float"),
    ("grad_dtype", r"grads\[0\] has dtype Half, expected BFloat16"),
    ("noncontig", r"emas\[0\] is not contiguous"),
    ("mixed_param_dtypes", r"params\[1\] has dtype Half but params\[0\] has BFloat16"),
    ("grad_scale", "grad_scale must have exactly one element"),
    ("found_inf_dtype", "found_inf must be a float32 tensor"),
])
def test_input_checks_name_the_tensor(problem, match):
    mod = _backend("cpp")
    bf = torch.bfloat16
    p = [torch.randn(10).to(bf)]
    g = [torch.randn(10).to(bf)]
    m, v, z = [torch.zeros(10)], [torch.zeros(10)], [torch.zeros(10)]
    extra = {}
    if problem == "length":
        p = p + [torch.randn(3).to(bf)]
    elif problem == "numel":
        v = [torch.zeros(9)]
    elif problem == "state_dtype":
        m = [torch.zeros(10, dtype=bf)]
    elif problem == "grad_dtype":
        g = [torch.randn(10).half()]
    elif problem == "noncontig":
        z = [torch.zeros(20)[::2]]
    elif problem == "mixed_param_dtypes":
        p = p + [torch.randn(3).half()]
        g, m, v, z = g + [torch.randn(3).half()], m + [torch.zeros(3)], v + [torch.zeros(3)], \
            z + [torch.zeros(3)]
    elif problem == "grad_scale":
        extra["grad_scale"] = torch.ones(2)
    elif problem == "found_inf_dtype":
        extra["found_inf"] = torch.zeros(1, dtype=torch.float64)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=match):
        mod.adam_ema(p, g, m, v, None, z, **_adam_kw(), **extra)


def test_cpp_backend_rejects_other_devices():
    from ema_kernels.backends import cpp
    ok, why = cpp.availability("cuda")
    assert not ok and "CPU tensors only" in why
    p = torch.randn(4, device="meta")
    with pytest.raises(ValueError, match="runs on cpu tensors"):
        cpp.adam_ema([p], [p], [p], [p], None, None, **_adam_kw(ema_weight=None))


# ----------------------------------------------------------------------------------------------
# torch.library: schemas, fake tensors, autograd registration, AOT dispatch
# ----------------------------------------------------------------------------------------------
def _opcheck_cases():
    def lst(n, dt=torch.float32, k=2):
        return [torch.randn(n + i).to(dt) for i in range(k)]

    ops = torch.ops.ema_kernels_ext
    n = 33
    cases = {
        "adam_ema_": (ops.adam_ema_.default,
                      (lst(n, torch.bfloat16), lst(n, torch.bfloat16), lst(n), [t.abs() for t in lst(n)],
                       [t.abs() for t in lst(n)], lst(n)),
                      dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                           decoupled=True, maximize=False, step_size=1e-2,
                           bias_correction2_sqrt=0.1, ema_weights=[0.01],
                           grad_scale=torch.ones(1), found_inf=torch.zeros(1))),
        "adam_ema_capturable_": (ops.adam_ema_capturable_.default,
                                 (lst(n), lst(n), lst(n), [t.abs() for t in lst(n)], [], []),
                                 dict(lr=_scalar(1e-3), step=_scalar(3.0), beta1=0.9,
                                      beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False,
                                      maximize=True, ema_weight=None)),
        "sgd_ema_": (ops.sgd_ema_.default, (lst(n), lst(n), lst(n), lst(n) + lst(n)),
                     dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=True,
                          maximize=False, first_step=False, ema_weights=[0.5, 0.25])),
        "sgd_ema_capturable_": (ops.sgd_ema_capturable_.default,
                                (lst(n, torch.float16), lst(n, torch.float16), [], lst(n)),
                                dict(lr=_scalar(0.1), momentum=0.0, dampening=0.0,
                                     weight_decay=0.0, nesterov=False, maximize=False,
                                     first_step=True, ema_weight=_scalar(0.5))),
        "ema_only_": (ops.ema_only_.default, (lst(n), lst(n)), dict(ema_weights=[0.25])),
    }
    return cases


@pytest.mark.parametrize("op_name", ["adam_ema_", "adam_ema_capturable_", "sgd_ema_",
                                     "sgd_ema_capturable_", "ema_only_"])
def test_opcheck(op_name):
    _backend("cpp")  # loads the extension and registers the fake implementations
    op, args, kwargs = _opcheck_cases()[op_name]
    torch.library.opcheck(op, args, kwargs)


def test_build_info_reports_cpu_kernels():
    from ema_kernels.backends import cuda
    _backend("cpp")
    info = cuda.extension_info()
    assert info["built"] is True
    assert info["cpu_isa"] in ("avx2", "baseline")
    assert info["path"] and os.path.exists(info["path"])


def test_compiled_backends_have_the_reference_interface():
    """cpp and cuda export one CompiledBackend's methods (backends/_compiled.py): every fused op
    of the reference, with the reference's parameter names and kinds."""
    import inspect

    from ema_kernels.backends import _reference_rules, cpp, cuda, reference
    for name in ("adam_ema", "sgd_ema", "ema_only", "adam_ema_capturable",
                 "sgd_ema_capturable", "lion_ema", "lars_ema", "lamb_moments", "lamb_ema"):
        ref = getattr(reference, name, None) or getattr(_reference_rules, name)
        want = [(p.name, p.kind) for p in inspect.signature(ref).parameters.values()]
        for mod in (cpp, cuda):
            got = [(p.name, p.kind)
                   for p in inspect.signature(getattr(mod, name)).parameters.values()]
            assert got == want, (mod.NAME, name)
