"""Stochastic rounding of 16-bit parameters (issue 15): ``stochastic_rounding=True``.

The contract: θ (computed in float32) is rounded to bf16/fp16 up or down with the
probabilities that make E[round(x)] = x, from random bits that are a pure function of
(seed, step, element index); the same bits on every backend, in both layouts, whatever the
launch geometry, and after a resume from a state dict.

- The rounding functions (csrc/fused_math.h; ema_kernels/backends/_sr.py; Triton's
  ``_store_param``) are compared bit for bit on fresh random values and every special case,
  and checked for unbiasedness *exactly* where their random bits can be enumerated (bf16: all
  2^16 values of the 16 bits used; fp16 normals: all 2^13; fp16 subnormals down to 2^-16: all
  2^16), and statistically with the hash's own bits elsewhere (deep subnormals).
- The optimizers: every backend gives the same bits where their float32 arithmetic is the same
  (SGD with power-of-two lr / weight decay / momentum, whose products are exact, so that FMA
  contraction cannot differ: see tests/test_triton_kernels.py for why interpreted Triton and
  the reference may differ by a float32 ulp elsewhere); ``cuda`` (emulated) and ``cpp`` share
  fused_math.h and are bit for bit identical for AdamW too, under varied launch geometry.
"""
from __future__ import annotations

import copy
import importlib
import io
import math
import os
import pickle

import pytest
import torch

import ema_kernels as ek
from ema_kernels import _ops
from ema_kernels.backends import _sr

NO_EXT = os.environ.get("EMA_KERNELS_NO_EXT", "").strip().lower() in ("1", "true")
HALF = (torch.bfloat16, torch.float16)


def _ids(dt):
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dt]


def _bits16(t):
    return t.view(torch.int16)


def _ext_ops():
    if NO_EXT:
        pytest.skip("EMA_KERNELS_NO_EXT=1: extension deliberately not built")
    from ema_kernels.backends import _extension
    return _extension.load_extension()


def _emu_ops():
    if NO_EXT:
        pytest.skip("EMA_KERNELS_NO_EXT=1: extension deliberately not built")
    from ema_kernels.backends import _extension
    return _extension.load_emulation()


def _triton():
    pytest.importorskip("triton")
    from triton_support import triton_backend
    tk = triton_backend()
    from ema_kernels.backends.triton.checks import _interpreted
    if not _interpreted():
        pytest.skip("Triton is not interpreted here (TRITON_INTERPRET != 1)")
    return tk


# ----------------------------------------------------------------------------------------------
# The hash
# ----------------------------------------------------------------------------------------------
def _bits_py(seed, step, idx):
    k0, k1 = _sr.key(seed, step)
    hi_term = (((idx >> 32) * 0x61C88647) & _sr.MASK32) ^ k1
    return _sr.mix((idx & _sr.MASK32) ^ k0 ^ hi_term)


def test_hash_tensor_matches_python_ints():
    g = torch.Generator().manual_seed(1)
    idx = torch.cat([torch.randint(0, 2 ** 62, (500,), generator=g),
                     torch.arange(0, 70), torch.tensor([2 ** 32 - 1, 2 ** 32, 2 ** 33 + 5])])
    for seed, step in ((0, 1), (2 ** 63 - 1, 7), (123456789, 2 ** 40 + 3)):
        got = _sr.bits(_sr.key(seed, step), idx).tolist()
        assert got == [_bits_py(seed, step, int(i)) for i in idx.tolist()]
        assert all(0 <= b < 2 ** 32 for b in got)


def test_hash_bits_are_uniform_and_depend_on_every_input():
    idx = torch.arange(1 << 16)
    r = _sr.bits(_sr.key(5, 1), idx)
    # every bit position is a fair coin over consecutive indices (5 sigma: 0.5 +- 0.0098)
    for b in range(32):
        frac = ((r >> b) & 1).double().mean().item()
        assert abs(frac - 0.5) < 0.01, (b, frac)
    # the low 16 bits (bf16's) are close to uniform over 256 buckets
    hist = torch.bincount((r & 0xFFFF) >> 8, minlength=256).double()
    chi2 = ((hist - 256.0) ** 2 / 256.0).sum().item()
    assert chi2 < 400, chi2  # 255 dof: mean 255, sd ~22.6
    other_seed = _sr.bits(_sr.key(6, 1), idx)
    other_step = _sr.bits(_sr.key(5, 2), idx)
    for other in (other_seed, other_step):
        same = (other == r).double().mean().item()
        assert same < 1e-3, same


# ----------------------------------------------------------------------------------------------
# The rounding functions
# ----------------------------------------------------------------------------------------------
def _step16(y, up):
    """The next 16-bit float above (``up``) or below ``y``, by its bit pattern."""
    b = _bits16(y).to(torch.int32) & 0xFFFF
    neg = b >= 0x8000
    mag = b & 0x7FFF
    away = torch.where(neg, ~torch.tensor(up), torch.tensor(up))  # magnitude grows
    new_mag = torch.where(away, mag + 1, mag - 1)
    # crossing zero: from +0 down (or -0 up) to the smallest value of the other sign
    cross = (mag == 0) & ~away
    new_b = torch.where(cross, (b ^ 0x8000) + 1, (b & 0x8000) | new_mag)
    return new_b.to(torch.int16).view(y.dtype)


def _neighbours(x, dtype):
    """The two values of ``dtype`` around float32 ``x`` (exact values: both equal x), as
    float64."""
    rn = x.to(dtype)
    lo = torch.where(rn.double() > x.double(), _step16(rn, up=False), rn)
    hi = torch.where(rn.double() < x.double(), _step16(rn, up=True), rn)
    return lo.double(), hi.double()


def _values(n, seed, dtype):
    """Fresh random float32 values spanning the dtype's range, subnormals included."""
    g = torch.Generator().manual_seed(seed)
    lo_exp, hi_exp = (-133, 127) if dtype == torch.bfloat16 else (-30, 15)
    e = torch.randint(lo_exp, hi_exp, (n,), generator=g).double()
    m = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (s * m * torch.pow(2.0, e)).float()


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_rounding_gives_a_neighbour_and_keeps_exact_values(dtype):
    x = _values(20000, 3, dtype)
    r = _sr.bits(_sr.key(11, 4), torch.arange(x.numel()))
    out = _sr.round_to(dtype, x, r).double()
    lo, hi = _neighbours(x, dtype)
    assert bool(((out == lo) | (out == hi)).all())
    # both directions happen (the values are not exact)
    assert bool((out == lo).any()) and bool((out == hi).any())
    exact = x.to(dtype).float()  # representable values never move
    assert torch.equal(_sr.round_to(dtype, exact, r), exact.to(dtype))


def _mean_over_all_bits(dtype, x, nbits):
    """E over all 2^nbits values of the random bits' low nbits (the bits the rounding reads)."""
    r = torch.arange(1 << nbits, dtype=torch.int64)
    xs = x.repeat_interleave(r.numel())
    out = _sr.round_to(dtype, xs, r.repeat(x.numel())).double().view(x.numel(), -1)
    return out.mean(1)


def test_bf16_unbiased_exactly():
    # every random value of the 16 bits bf16 uses: the mean is x exactly (float64 sums of
    # bf16 values and the power-of-two count are exact), normals and subnormals alike
    x = _values(48, 7, torch.bfloat16)
    x[:4] = torch.tensor([1.0 + 2 ** -12, -3.1e-39, 1e-42, 3.3e38])
    assert torch.equal(_mean_over_all_bits(torch.bfloat16, x, 16), x.double())


def test_fp16_unbiased_exactly_normals_and_shallow_subnormals():
    g = torch.Generator().manual_seed(8)
    normals = (1 + torch.rand(40, generator=g, dtype=torch.float64)) * torch.pow(
        2.0, torch.randint(-14, 16, (40,), generator=g).double())
    normals = normals.float()
    assert torch.equal(_mean_over_all_bits(torch.float16, normals, 13), normals.double())
    # fp16 subnormals with at most 16 discarded bits: [2^-16, 2^-14)
    sub = ((1 + torch.rand(24, generator=g, dtype=torch.float64)) *
           torch.pow(2.0, torch.randint(-16, -14, (24,), generator=g).double())).float()
    sub[0] = 2 ** -14 - 2 ** -30  # rounds up into the normal binade
    assert torch.equal(_mean_over_all_bits(torch.float16, sub, 16), sub.double())


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_unbiased_with_the_hash_bits(dtype):
    # deep subnormals (up to 31 random bits) and a spread of values, with the bits the kernels
    # draw: the mean of 2^16 roundings of each value is within 5 sigma of it
    tiny = 2.0 ** -24 if dtype == torch.float16 else 2.0 ** -133
    xs = [tiny * 0.3, tiny * 5.7, -tiny * 0.01, tiny * 0.001, 1.0 + 2 ** -10, 0.1, -7.77, 1e-5]
    n = 1 << 16
    for j, x in enumerate(xs):
        xt = torch.full((n,), x, dtype=torch.float32)
        out = _sr.round_to(dtype, xt, _sr.bits(_sr.key(99, j + 1), torch.arange(n))).double()
        lo, hi = _neighbours(xt[:1], dtype)
        ulp = (hi - lo).item() or 1.0
        x32 = xt[0].double().item()
        p = (x32 - lo.item()) / ulp
        sigma = ulp * math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(out.mean().item() - x32) <= 5 * sigma + 1e-300, (x, out.mean().item())


def _nans():
    """A positive and a negative quiet NaN, by bit pattern (the sign is what matters)."""
    return torch.tensor([0x7FC00000, -0x00400000], dtype=torch.int32).view(torch.float32)


def test_special_values():
    x = torch.cat([_nans(), torch.tensor([math.inf, -math.inf, 0.0, -0.0, 3.4e38, -3.4e38,
                                          65519.0, 65536.0, 1e6, -70000.0, 2 ** -25,
                                          -(2 ** -40)])])
    r = _sr.bits(_sr.key(3, 3), torch.arange(x.numel()))
    b = _sr.round_bf16(x, r)
    assert _bits16(b)[:2].tolist() == [0x7FC0, 0x7FC0]
    assert b[2:4].tolist() == [math.inf, -math.inf]
    assert _bits16(b)[4:6].tolist() == [0, -0x8000]  # signed zeros kept
    assert b[6].item() in (3.3895313892515355e+38, math.inf)
    h = _sr.round_f16(x, r)
    assert (_bits16(h)[:2] & 0x7FFF).tolist() == [0x7E00, 0x7E00]
    assert _bits16(h)[1].item() < 0  # NaN keeps its sign, as torch's conversion
    assert h[2:4].tolist() == [math.inf, -math.inf]
    assert _bits16(h)[4:6].tolist() == [0, -0x8000]
    assert h[6:8].tolist() == [math.inf, -math.inf]  # beyond 2^16: inf
    assert h[8].item() in (65504.0, math.inf)
    assert h[9:12].tolist() == [math.inf, math.inf, -math.inf]
    assert h[12].item() in (0.0, 2 ** -24)


def _rounding_cases():
    x = torch.cat([_values(3000, 21, torch.bfloat16), _values(3000, 22, torch.float16),
                   _nans(), torch.tensor([math.inf, -math.inf, 0.0, -0.0, 65520.0, 65535.9,
                                          2 ** -24, 2 ** -14 - 2 ** -26, 3.39e38, 1e-45])])
    return x


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("lib", ["cpp", "cuda-emulated", "triton"])
def test_rounding_bit_identical_across_backends(lib, dtype):
    x = _rounding_cases()
    seed, step, base = 2 ** 62 + 12345, 77, 2 ** 32 - 100  # an index range crossing 2^32
    want = _sr.round_to(dtype, x, _sr.bits(_sr.key(seed, step), base + torch.arange(x.numel())))
    if lib == "triton":
        got = _triton().sr_round(x, dtype, seed, step, base)
    else:
        ops = _ext_ops() if lib == "cpp" else _emu_ops()
        got = ops.sr_round(x, dtype == torch.float16, seed, step, base)
    assert got.dtype == dtype
    assert torch.equal(_bits16(got), _bits16(want))


# ----------------------------------------------------------------------------------------------
# The optimizers
# ----------------------------------------------------------------------------------------------
def _backends():
    names = ["reference"]
    if not NO_EXT:
        names.append("cpp")
    names += ["cuda-emulated", "triton"]
    return names


@pytest.fixture
def emulated_cuda(request):
    """backend='cuda' on CPU tensors through the emulation build, for this test only (see
    tests/test_cuda_emulation.py for why the variable is not set for the session)."""
    if NO_EXT:
        pytest.skip("EMA_KERNELS_NO_EXT=1: extension deliberately not built")
    return request.getfixturevalue("cuda_emulation")


def _backend_name(name, request):
    if name == "cuda-emulated":
        request.getfixturevalue("emulated_cuda")
        return "cuda"
    if name == "triton":
        _triton()
    return name


SIZES = (1, 4097, 33, 300, 16)  # odd sizes; the list launches mix them


def _make_params(dtype, seed, odd_view=False):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i, n in enumerate(SIZES):
        t = torch.randn(n + 1, generator=g).to(dtype)
        t = t[1:] if (odd_view and i % 2 == 0) else t[:n]  # odd-offset views (unaligned)
        ps.append(torch.nn.Parameter(t.clone() if not odd_view else t))
    return ps


def _grads(ps, step, seed):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in ps]


def _steps(opt, ps, ts, seed, flatten, frozen=None):
    """Steps ``ts`` with fresh gradients; with flatten=True the gradients are written into the
    flat gradient buffer (zero_grad(set_to_none=False)), so the one-launch flat kernel runs."""
    for t in ts:
        if flatten:
            opt.zero_grad(set_to_none=False)
        for i, (p, g) in enumerate(zip(ps, _grads(ps, t, seed))):
            if frozen is not None and t in frozen.get(i, ()):
                p.grad = None
            elif flatten:
                p.grad.copy_(g)
            else:
                p.grad = g
        opt.step()


def _run(opt_cls, backend, dtype, steps=4, seed=0, flatten=False, odd_view=False, kw=None,
         frozen=None, sr=True):
    ps = _make_params(dtype, seed, odd_view)
    kw = dict(kw or {})
    kw.setdefault("lr", 2 ** -6)
    torch.manual_seed(seed + 100)
    opt = opt_cls(ps, backend=backend, flatten=flatten, stochastic_rounding=sr,
                  ema_decay=0.75, **kw)
    _steps(opt, ps, range(steps), seed, flatten, frozen)
    return [p.detach().clone() for p in ps], [z.clone() for z in opt.ema_parameters()], opt


# SGD with exactly representable products: every backend computes the same float32 θ
SGD_EXACT = dict(lr=2 ** -5, momentum=0.5, weight_decay=2 ** -4)


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("flatten", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("backend", _backends())
def test_sgd_bit_identical_on_every_backend_and_layout(request, backend, dtype, flatten):
    want_p, want_z, _ = _run(ek.SGD, "reference", dtype, kw=SGD_EXACT)  # list layout
    name = _backend_name(backend, request)
    got_p, got_z, opt = _run(ek.SGD, name, dtype, kw=SGD_EXACT, flatten=flatten)
    for a, b in zip(got_p, want_p):
        assert torch.equal(_bits16(a), _bits16(b))
    for a, b in zip(got_z, want_z):
        assert torch.equal(a, b)
    # and SR did something: round-to-nearest gives other bits
    rn_p, _, _ = _run(ek.SGD, "reference", dtype, kw=SGD_EXACT, sr=False)
    assert sum(int((_bits16(a) != _bits16(b)).sum()) for a, b in zip(rn_p, want_p)) > 100


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("backend", _backends()[1:])
def test_adamw_bits_match_the_reference(request, backend, dtype):
    # AdamW's float32 θ agrees across these backends on this data (the design allows an fp32
    # ulp of FMA-contraction difference for reference/triton, which SR would turn into a
    # different bit with probability ~2^-16 per element); SR must add no difference of its own
    want_p, want_z, _ = _run(ek.AdamW, "reference", dtype, steps=3)
    got_p, got_z, _ = _run(ek.AdamW, _backend_name(backend, request), dtype, steps=3)
    for a, b in zip(got_p, want_p):
        assert torch.equal(_bits16(a), _bits16(b))


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("backend", _backends()[1:])
def test_default_offsets_are_the_lists_flat_layout(request, backend, dtype):
    # backend level, sr_offsets omitted: tensor i starts where the list's flat layout puts it
    from ema_kernels.backends import reference
    mod = importlib.import_module(
        "ema_kernels.backends." + {"cpp": "cpp", "cuda-emulated": "cuda",
                                   "triton": "triton"}[backend])
    _backend_name(backend, request)
    ps = [p.detach() for p in _make_params(dtype, 12)]
    gs = _grads(ps, 0, 12)
    kw = dict(lr=2 ** -5, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False, first_step=True, ema_weight=None, stochastic_rounding=True,
              sr_seed=77, sr_step=3)
    a, b = [p.clone() for p in ps], [p.clone() for p in ps]
    reference.sgd_ema(a, gs, None, None, **kw)
    mod.sgd_ema(b, gs, None, None, **kw)
    offs = _sr.flat_offsets([p.numel() for p in ps])
    c = [p.clone() for p in ps]
    reference.sgd_ema(c, gs, None, None, **kw, sr_offsets=offs)
    for x, y, z in zip(a, b, c):
        assert torch.equal(_bits16(x), _bits16(y)) and torch.equal(_bits16(x), _bits16(z))
    d = [p.clone() for p in ps]  # other bases: other bits
    reference.sgd_ema(d, gs, None, None, **kw, sr_offsets=[o + 1 for o in offs])
    assert any(not torch.equal(_bits16(x), _bits16(w)) for x, w in zip(a, d))


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_odd_offset_views_and_frozen_parameters(request, dtype):
    frozen = {1: (1, 2), 3: (0,)}  # parameters without a gradient on some steps
    want = _run(ek.SGD, "reference", dtype, kw=SGD_EXACT, odd_view=True, frozen=frozen)
    for backend in _backends()[1:]:
        name = _backend_name(backend, request)
        got = _run(ek.SGD, name, dtype, kw=SGD_EXACT, odd_view=True, frozen=frozen)
        for a, b in zip(got[0], want[0]):
            assert torch.equal(_bits16(a), _bits16(b)), backend


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("geometry", [(0, 0, 0, 0, 0), (256, 2, 3, 0, 0), (1024, 3, 1, 1, 7),
                                      (0, 0, 0, 2, 12345)],
                         ids=["shipped", "tiny-chunks+6-blocks", "3-blocks+grid1+shuffled",
                              "grid2+shuffled"])
def test_adamw_cuda_emulated_matches_cpp_under_any_geometry(emulated_cuda, dtype, geometry):
    if NO_EXT:
        pytest.skip("no extension")
    want = _run(ek.AdamW, "cpp", dtype, steps=3)
    emulated_cuda.emu_configure(*geometry)
    for flatten in (False, True):
        got = _run(ek.AdamW, "cuda", dtype, steps=3, flatten=flatten)
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            assert torch.equal(a.view(torch.int16) if a.dtype in HALF else a,
                               b.view(torch.int16) if b.dtype in HALF else b)


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_adamw_flat_equals_list(dtype):
    for backend in ("reference", "cpp") if not NO_EXT else ("reference",):
        a = _run(ek.AdamW, backend, dtype, steps=3, flatten=False)
        b = _run(ek.AdamW, backend, dtype, steps=3, flatten=True)
        for x, y in zip(a[0], b[0]):
            assert torch.equal(_bits16(x), _bits16(y)), backend


def test_same_seed_same_bits_other_seed_other_bits():
    a = _run(ek.AdamW, "reference", torch.bfloat16, seed=0)
    b = _run(ek.AdamW, "reference", torch.bfloat16, seed=0)
    assert a[2].param_groups[0]["sr_seed"] == b[2].param_groups[0]["sr_seed"]
    for x, y in zip(a[0], b[0]):
        assert torch.equal(_bits16(x), _bits16(y))
    ps = _make_params(torch.bfloat16, 0)
    torch.manual_seed(12345)  # another default-generator state: another seed
    opt = ek.AdamW(ps, lr=2 ** -6, stochastic_rounding=True, ema_decay=0.75,
                   backend="reference")
    assert opt.param_groups[0]["sr_seed"] != a[2].param_groups[0]["sr_seed"]
    for t in range(4):
        for p, g in zip(ps, _grads(ps, t, 0)):
            p.grad = g
        opt.step()
    differ = sum(int((_bits16(x) != _bits16(y)).sum()) for x, y in zip(ps, a[0]))
    assert differ > 100


def test_sr_moves_what_round_to_nearest_cannot():
    # lr so small that round-to-nearest never moves a bf16 parameter at 1.0 (|Δ| < 2^-9),
    # SR's mean moves by the float32 update within 10 % over 200 steps
    n, steps, lr = 4096, 200, 2 ** -14
    backend = "cpp" if not NO_EXT else "reference"
    results = {}
    for sr in (False, True):
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        torch.manual_seed(0)
        opt = ek.SGD([p], lr=lr, stochastic_rounding=sr, ema_decay=None, backend=backend)
        for _ in range(steps):
            p.grad = torch.ones(n, dtype=torch.bfloat16)
            opt.step()
        results[sr] = p.detach().double()
    assert bool((results[False] == 1.0).all())  # round to nearest: stuck
    expected = 1.0 - steps * lr
    moved = 1.0 - results[True].mean().item()
    assert abs(moved - steps * lr) <= 0.1 * steps * lr, (moved, steps * lr, expected)


def test_fp32_parameters_ignore_the_flag():
    for backend in ("reference", "cpp") if not NO_EXT else ("reference",):
        outs = []
        for sr in (False, True):
            ps = _make_params(torch.float32, 4)
            opt = ek.AdamW(ps, lr=1e-3, stochastic_rounding=sr, backend=backend)
            for t in range(3):
                for p, g in zip(ps, _grads(ps, t, 4)):
                    p.grad = g
                opt.step()
            outs.append([p.detach().clone() for p in ps])
        for a, b in zip(*outs):
            assert torch.equal(a, b)


def test_flag_off_draws_nothing_and_rounds_to_nearest():
    # without SR no seed is drawn (the default generator is untouched, as with torch.optim)
    # and the 16-bit parameters are the round-to-nearest results of the float32 update
    ps = _make_params(torch.bfloat16, 5)
    state = torch.get_rng_state()
    opt = ek.SGD(ps, lr=2 ** -5, backend="reference", ema_decay=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert "sr_seed" not in opt.param_groups[0]
    before = [p.detach().float() for p in ps]
    grads = _grads(ps, 0, 5)
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()
    for p, b, g in zip(ps, before, grads):
        assert torch.equal(p.detach(), (b - 2 ** -5 * g.float()).to(torch.bfloat16))


@pytest.mark.parametrize("flatten", [False, True], ids=["list", "flat"])
def test_resume_from_state_dict_bit_exact(flatten):
    backend = "cpp" if not NO_EXT else "reference"
    full = _run(ek.AdamW, backend, torch.float16, steps=6, flatten=flatten)
    half_ps = _make_params(torch.float16, 0)
    torch.manual_seed(100)
    opt = ek.AdamW(half_ps, lr=2 ** -6, backend=backend, flatten=flatten,
                   stochastic_rounding=True, ema_decay=0.75)
    _steps(opt, half_ps, range(3), 0, flatten)
    buf = io.BytesIO()
    torch.save({"p": [p.detach().clone() for p in half_ps], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    assert ck["opt"]["param_groups"][0]["sr_seed"] == opt.param_groups[0]["sr_seed"]
    new_ps = [torch.nn.Parameter(t) for t in ck["p"]]
    torch.manual_seed(999)  # another default-generator state: the seed must come from the file
    opt2 = ek.AdamW(new_ps, lr=2 ** -6, backend=backend, flatten=flatten,
                    stochastic_rounding=True, ema_decay=0.75)
    opt2.load_state_dict(ck["opt"])
    _steps(opt2, new_ps, range(3, 6), 0, flatten)
    for a, b in zip(new_ps, full[0]):
        assert torch.equal(_bits16(a.detach()), _bits16(b))
    for a, b in zip(opt2.ema_parameters(), full[1]):
        assert torch.equal(a, b)


def test_deepcopy_and_pickle_keep_the_seed():
    ps = _make_params(torch.bfloat16, 6)
    opt = ek.SGD(ps, lr=0.1, stochastic_rounding=True, backend="reference")
    seed = opt.param_groups[0]["sr_seed"]
    assert isinstance(seed, int) and 0 <= seed < 2 ** 63
    assert copy.deepcopy(opt).param_groups[0]["sr_seed"] == seed
    assert pickle.loads(pickle.dumps(opt)).param_groups[0]["sr_seed"] == seed


def test_torch_state_dict_and_old_checkpoints_load():
    ps = _make_params(torch.bfloat16, 7)
    opt = ek.AdamW(ps, lr=1e-3, stochastic_rounding=True, backend="reference")
    seed = opt.param_groups[0]["sr_seed"]
    tparams = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    topt = torch.optim.AdamW(tparams, lr=1e-3)
    for p in tparams:
        p.grad = torch.ones_like(p)
    topt.step()
    opt.load_state_dict(topt.state_dict())  # no SR keys: ours are kept
    assert opt.param_groups[0]["sr_seed"] == seed
    assert opt.param_groups[0]["stochastic_rounding"] is True
    # an older ema_kernels checkpoint (no SR keys at all) loads and rounds to nearest if the
    # optimizer does
    old = ek.AdamW(_make_params(torch.bfloat16, 7), lr=1e-3, backend="reference")
    sd = old.state_dict()
    for g in sd["param_groups"]:
        g.pop("stochastic_rounding")
    old.load_state_dict(sd)
    assert old.param_groups[0]["stochastic_rounding"] is False
    # and torch loads ours (extra group keys are carried along)
    topt.load_state_dict(opt.state_dict())


def test_group_switching_sr_on_later_draws_its_seed_once():
    ps = _make_params(torch.bfloat16, 8)
    opt = ek.SGD(ps, lr=0.1, backend="reference")
    assert "sr_seed" not in opt.param_groups[0]
    opt.param_groups[0]["stochastic_rounding"] = True
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    seed = opt.param_groups[0]["sr_seed"]
    opt.step()
    assert opt.param_groups[0]["sr_seed"] == seed
    assert "sr_seed" in opt.state_dict()["param_groups"][0]


def test_groups_get_their_own_seeds():
    a, b = _make_params(torch.bfloat16, 9)[:2]
    opt = ek.AdamW([{"params": [a]}, {"params": [b], "sr_seed": 42}], stochastic_rounding=True,
                   backend="reference")
    assert opt.param_groups[1]["sr_seed"] == 42
    assert opt.param_groups[0]["sr_seed"] != 42


def test_validation_errors_name_the_value_and_fix():
    ps = _make_params(torch.bfloat16, 10)
    with pytest.raises(TypeError, match=r"stochastic_rounding=1 .*must be True or False"):
        ek.AdamW(ps, stochastic_rounding=1)
    with pytest.raises(ValueError, match=r"sr_seed=-3 .*\[0, 2\*\*63\)"):
        ek.SGD([{"params": ps, "sr_seed": -3}], lr=0.1, stochastic_rounding=True)
    with pytest.raises(ValueError, match="capturable=True.*stochastic_rounding=False"):
        ek.AdamW(ps, stochastic_rounding=True, capturable=True)
    opt = ek.SGD(ps, lr=0.1)
    opt.param_groups[0]["stochastic_rounding"] = "yes"
    for p in ps:
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="stochastic_rounding='yes'"):
        opt.step()


def test_tensor_lr_with_sr_equals_float_lr():
    # a tensor lr runs the device-scalar kernels with the host's step count as SR's step
    for backend in ("reference", "triton") + (("cpp",) if not NO_EXT else ()):
        outs = []
        for lr in (2 ** -6, torch.tensor(2 ** -6)):
            ps = _make_params(torch.bfloat16, 11)
            torch.manual_seed(3)
            opt = ek.AdamW(ps, lr=lr, stochastic_rounding=True, backend=backend)
            for t in range(3):
                for p, g in zip(ps, _grads(ps, t, 11)):
                    p.grad = g
                opt.step()
            outs.append([p.detach().clone() for p in ps])
        for a, b in zip(*outs):
            assert torch.equal(_bits16(a), _bits16(b)), backend


@pytest.mark.skipif(NO_EXT, reason="extension deliberately not built")
def test_op_checks_sr_arguments():
    ops = _ext_ops()
    p = [torch.zeros(5, dtype=torch.bfloat16)]
    kw = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False, first_step=True, ema_weights=[])
    with pytest.raises(RuntimeError, match="sr_offsets has 2 entries but params has 1"):
        ops.sgd_ema_(p, p, [], [], **kw, stochastic_rounding=True, sr_seed=1, sr_step=1,
                     sr_offsets=[0, 16])
    with pytest.raises(RuntimeError, match="sr_seed=-1"):
        ops.sgd_ema_(p, p, [], [], **kw, stochastic_rounding=True, sr_seed=-1, sr_step=1)
