"""The compiled kernels of the issue-25 rules (Lion, LARS, LAMB) against the reference: ``cpp``
within 1e-6 relative in fp32 (one ulp of the rounding for 16-bit parameters), the CUDA kernels
(run on the CPU by the emulation build) equal to ``cpp`` bit for bit; fresh random data, odd
sizes, odd-offset views, every storage dtype, GradScaler's scale and skip, several EMAs,
stochastic rounding, a device lr.

LAMB's per-tensor sums (Σθ², Σr²) are reductions: every backend accumulates them in float64
(each square is exact), in its own order, and returns them rounded to float32, so they agree to
float32 rounding (checked to 2e-7 relative between cpp and emulated cuda, 1e-6 against the
reference, whose r differs from the kernels' by torch's CPU sqrt, not correctly rounded).
"""
import pytest
import torch

import ema_kernels as ek
from ema_kernels.backends import cpp, reference
from ema_kernels.optim import norms

SIZES = [1, 4097, (1 << 16) + 3, 0, 33]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _views(dtype, seed, offset, scale=1.0, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in SIZES:
        t = torch.randn(n + offset, generator=g) * scale
        out.append((t.abs() if positive else t).to(dtype)[offset:])
    return out


def _inputs(dtype, seed):
    params = _views(dtype, seed, 1)
    grads = _views(dtype, seed + 1, 3, 0.1)
    ms = _views(torch.float32, seed + 2, 2, 0.05)
    emas = [[(p.float() + 0.01 * k) for p in params] for k in range(2)]
    return params, grads, ms, emas


def _clone(xs):
    if isinstance(xs, list):
        return [_clone(x) for x in xs]
    return xs.clone()


def _ulp(x, dtype):
    bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    e = torch.frexp(x.abs().clamp_min(torch.finfo(dtype).tiny)).exponent
    return torch.ldexp(torch.ones_like(x), (e - 1 - bits).to(torch.int32))


VARIANTS = {
    "plain": dict(),
    "wd-scale-maximize": dict(weight_decay=0.1, grad_scale=4.0, maximize=True),
    "two-emas": dict(n_emas=2, weight_decay=0.05),
    "sr": dict(stochastic_rounding=True, weight_decay=0.05),
    "device-lr": dict(device_lr=True, weight_decay=0.1, n_emas=2),
    "skip": dict(found_inf=1.0, grad_scale=2.0, weight_decay=0.1),
}


def _call(mod, params, grads, ms, emas, v, lr=3e-3):
    n_emas = v.get("n_emas", 1)
    weights = [0.3, 0.05][:n_emas]
    kw = dict(beta1=0.9, beta2=0.99, weight_decay=v.get("weight_decay", 0.0),
              maximize=v.get("maximize", False))
    if "grad_scale" in v:
        kw["grad_scale"] = torch.tensor([v["grad_scale"]])
    if "found_inf" in v:
        kw["found_inf"] = torch.tensor([v["found_inf"]])
    if v.get("stochastic_rounding"):
        kw.update(stochastic_rounding=True, sr_seed=1234567, sr_step=7)
    zs = emas[:n_emas]
    if v.get("device_lr"):
        if mod is reference:
            mod.lion_ema(params, grads, ms, zs, lr=torch.tensor(lr),
                         ema_weight=[torch.tensor(w) for w in weights], **kw)
        else:
            mod.lion_ema(params, grads, ms, zs, lr=torch.tensor([lr]),
                         ema_weight=torch.tensor(weights), **kw)
        return
    mod.lion_ema(params, grads, ms, zs, lr=lr, ema_weight=weights, **kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_lion_cpp_matches_reference(dtype, variant):
    v = VARIANTS[variant]
    base = _inputs(dtype, 10)
    ref, ours = _clone(list(base)), _clone(list(base))
    _call(reference, *ref, v)
    _call(cpp, *ours, v)
    (rp, _, rm, rz), (op, _, om, oz) = ref, ours
    for a, b in zip(om, rm):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(op, rp):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert ((a.float() - b.float()).abs() <= _ulp(b.float(), dtype)).all()
    for za, zb in zip(oz, rz):
        for a, b in zip(za, zb):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if variant == "skip":  # nothing moved
        for a, b in zip(op + om, base[0] + base[2]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_lion_emulated_cuda_equals_cpp_bit_for_bit(cuda_emulation, dtype, variant):
    from ema_kernels.backends import cuda
    v = VARIANTS[variant]
    base = _inputs(dtype, 20)
    a, b = _clone(list(base)), _clone(list(base))
    _call(cpp, *a, v)
    _call(cuda, *b, v)
    for x, y in zip(a[0] + a[2] + a[3][0] + a[3][1], b[0] + b[2] + b[3][0] + b[3][1]):
        assert torch.equal(x, y)


def _model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.Tanh(),
                               torch.nn.Linear(33, 5)).to(dtype)


def _train(model, opt, steps=4):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(6, 9, generator=g).to(next(model.parameters()).dtype)) \
            .float().pow(2).mean().backward()
        opt.step()


RULES = {
    "lion": (ek.Lion, dict(lr=1e-2, weight_decay=0.1)),
    "lars": (ek.LARS, dict(lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02)),
    "lamb": (ek.LAMB, dict(lr=2e-2, weight_decay=0.05)),
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("flatten", [False, True])
def test_optimizer_cpp_matches_reference_and_auto_picks_it(rule, flatten):
    cls, kw = RULES[rule]
    runs = {}
    for backend in ("reference", "cpp", "auto"):
        m = _model(1)
        opt = cls([{"params": m[0].parameters()},
                   {"params": m[2].parameters(), "weight_decay": 0.0}],
                  ema_decay=(0.9, 0.5), backend=backend, flatten=flatten, **kw)
        _train(m, opt)
        runs[backend] = (list(m.parameters()), opt.ema_parameters(0), opt.ema_parameters(1))
        if backend == "auto":
            assert opt._sets[0][0].backend_module.NAME == "cpp"
    for xs, ys in zip(runs["cpp"], runs["reference"]):
        for x, y in zip(xs, ys):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    for xs, ys in zip(runs["cpp"], runs["auto"]):
        for x, y in zip(xs, ys):
            assert torch.equal(x, y)


@pytest.mark.parametrize("rule", list(RULES))
def test_optimizer_capturable_and_tensor_lr_on_cpp(rule):
    cls, kw = RULES[rule]
    runs = []
    for mode in ("float", "tensor", "capturable"):
        m = _model(2)
        lr = torch.tensor(kw["lr"]) if mode == "tensor" else kw["lr"]
        opt = cls(m.parameters(), **{**kw, "lr": lr}, ema_decay=0.8, backend="cpp",
                  capturable=mode == "capturable")
        _train(m, opt)
        runs.append(list(m.parameters()) + opt.ema_parameters())
    for other in runs[1:]:
        for x, y in zip(other, runs[0]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", list(RULES))
def test_optimizer_emulated_cuda_equals_cpp(cuda_emulation, rule):
    cls, kw = RULES[rule]
    outs = []
    for backend in ("cpp", "cuda"):
        m = _model(3, torch.bfloat16)
        torch.manual_seed(5)
        opt = cls(m.parameters(), ema_decay=0.8, stochastic_rounding=True, backend=backend, **kw)
        _train(m, opt)
        outs.append(list(m.parameters()) + opt.ema_parameters() +
                    [t for p in m.parameters() for t in opt.state[p].values()
                     if isinstance(t, torch.Tensor) and t.numel() > 1])
    for x, y in zip(*outs):
        assert torch.equal(x, y)


# ------------------------------------------------------------------ LARS and LAMB ------------
def _close_to_reference(dtype, ps, rps, states, rstates, zs, rzs):
    for a, b in zip(states, rstates):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ps, rps):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert ((a.float() - b.float()).abs() <= _ulp(b.float(), dtype)).all()
    for a, b, p in zip(zs, rzs, rps * 2):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:  # θ as stored may differ by an ulp: the EMA by its weight (<= 0.3) times that
            assert ((a - b).abs() <= 0.3 * _ulp(p.float(), dtype) + 1e-6).all()


def _lars_inputs(dtype, seed):
    params = _views(dtype, seed, 1)
    grads = _views(dtype, seed + 1, 3, 0.1)
    grads[-1].zero_()  # a zero gradient: that tensor's row is (1, 0), the gradient unchanged
    bufs = _views(torch.float32, seed + 2, 2, 0.05)
    emas = [[(p.float() + 0.01 * k) for p in params] for k in range(2)]
    return params, grads, bufs, emas


LARS_VARIANTS = {
    "momentum-dampening": dict(dampening=0.1),
    "first-step-nesterov": dict(first_step=True, nesterov=True),
    "nesterov": dict(nesterov=True),
    "no-momentum-scale-maximize": dict(momentum=0.0, grad_scale=4.0, maximize=True),
    "two-emas": dict(n_emas=2),
    "no-ema": dict(n_emas=0),
    "sr": dict(stochastic_rounding=True),
    "device-lr": dict(device_lr=True, n_emas=2),
    "skip": dict(found_inf=1.0, grad_scale=2.0),
}


def _lars_call(mod, params, grads, bufs, emas, v, lr=0.7):
    n_emas = v.get("n_emas", 1)
    weights = [0.3, 0.05][:n_emas]
    momentum = v.get("momentum", 0.9)
    scale = torch.tensor([v["grad_scale"]]) if "grad_scale" in v else None
    coefs = norms.lars_coefs(params, grads, weight_decay=0.01, trust_coefficient=0.1, eps=1e-8,
                             grad_scale=scale, domain=None)
    kw = dict(coefs=coefs, momentum=momentum, dampening=v.get("dampening", 0.0),
              nesterov=v.get("nesterov", False), maximize=v.get("maximize", False),
              first_step=v.get("first_step", False), grad_scale=scale)
    if "found_inf" in v:
        kw["found_inf"] = torch.tensor([v["found_inf"]])
    if v.get("stochastic_rounding"):
        kw.update(stochastic_rounding=True, sr_seed=1234567, sr_step=7)
    bufs = bufs if momentum != 0 else None
    zs = emas[:n_emas] if n_emas else None
    if v.get("device_lr"):
        if mod is reference:
            mod.lars_ema(params, grads, bufs, zs, lr=torch.tensor(lr),
                         ema_weight=[torch.tensor(w) for w in weights], **kw)
        else:
            mod.lars_ema(params, grads, bufs, zs, lr=torch.tensor([lr]),
                         ema_weight=torch.tensor(weights), **kw)
        return
    mod.lars_ema(params, grads, bufs, zs, lr=lr, ema_weight=weights if n_emas else None, **kw)


@pytest.mark.parametrize("variant", list(LARS_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_lars_cpp_matches_reference(dtype, variant):
    v = LARS_VARIANTS[variant]
    base = _lars_inputs(dtype, 30)
    ref, ours = _clone(list(base)), _clone(list(base))
    _lars_call(reference, *ref, v)
    _lars_call(cpp, *ours, v)
    _close_to_reference(dtype, ours[0], ref[0], ours[2], ref[2], ours[3][0] + ours[3][1],
                        ref[3][0] + ref[3][1])
    moved = [not torch.equal(a, b) for a, b in zip(ours[0] + ours[2], base[0] + base[2])]
    if variant == "skip":  # nothing moved
        assert not any(moved)
    else:
        assert any(moved)


@pytest.mark.parametrize("variant", list(LARS_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_lars_emulated_cuda_equals_cpp_bit_for_bit(cuda_emulation, dtype, variant):
    from ema_kernels.backends import cuda
    v = LARS_VARIANTS[variant]
    base = _lars_inputs(dtype, 40)
    a, b = _clone(list(base)), _clone(list(base))
    _lars_call(cpp, *a, v)
    _lars_call(cuda, *b, v)
    for x, y in zip(a[0] + a[2] + a[3][0] + a[3][1], b[0] + b[2] + b[3][0] + b[3][1]):
        assert torch.equal(x, y)


def _lamb_inputs(dtype, seed):
    params = _views(dtype, seed, 1)
    grads = _views(dtype, seed + 1, 3, 0.1)
    ms = _views(torch.float32, seed + 2, 2, 0.05)
    vs = _views(torch.float32, seed + 3, 1, 0.01, positive=True)
    vs = [v.square() for v in vs]
    emas = [[(p.float() + 0.01 * k) for p in params] for k in range(2)]
    return params, grads, ms, vs, emas


LAMB_VARIANTS = {
    "plain": dict(),
    "no-bias-correction-wd0": dict(bias_correction=False, weight_decay=0.0),
    "scale-maximize": dict(grad_scale=4.0, maximize=True),
    "two-emas": dict(n_emas=2),
    "no-ema": dict(n_emas=0),
    "sr": dict(stochastic_rounding=True),
    "device-scalars": dict(device=True, n_emas=2),
    "skip": dict(found_inf=1.0, grad_scale=2.0),
}


def _lamb_common(v, t=3):
    if v.get("device"):  # as LAMB._bias_corrections forms them from a device step count
        step = torch.tensor(float(t)).double()
        bc1, bc2 = 1.0 - torch.pow(0.9, step), torch.sqrt(1.0 - torch.pow(0.999, step))
    elif v.get("bias_correction", True):
        bc1, bc2 = 1 - 0.9 ** t, (1 - 0.999 ** t) ** 0.5
    else:
        bc1, bc2 = 1.0, 1.0
    found_inf = torch.tensor([v["found_inf"]]) if "found_inf" in v else None
    return dict(eps=1e-6, weight_decay=v.get("weight_decay", 0.02), bias_correction1=bc1,
                bias_correction2_sqrt=bc2, found_inf=found_inf)


def _lamb_pass1(mod, params, grads, ms, vs, v):
    scale = torch.tensor([v["grad_scale"]]) if "grad_scale" in v else None
    return mod.lamb_moments(params, grads, ms, vs, beta1=0.9, beta2=0.999,
                            maximize=v.get("maximize", False), grad_scale=scale,
                            **_lamb_common(v))


def _lamb_steps(mod, sums, v, lr=0.05):
    return norms.lamb_step_sizes(sums, torch.tensor([lr]) if v.get("device") else lr, None)


def _lamb_pass2(mod, params, ms, vs, emas, steps, v):
    n_emas = v.get("n_emas", 1)
    weights = [0.3, 0.05][:n_emas]
    if not n_emas:
        w = None
    elif v.get("device"):
        w = [torch.tensor(x) for x in weights] if mod is reference else torch.tensor(weights)
    else:
        w = weights
    sr = dict(stochastic_rounding=True, sr_seed=99, sr_step=3) \
        if v.get("stochastic_rounding") else {}
    mod.lamb_ema(params, ms, vs, emas[:n_emas] if n_emas else None, step_sizes=steps,
                 ema_weight=w, **_lamb_common(v), **sr)


def _lamb_call(mod, params, grads, ms, vs, emas, v):
    """Both passes; returns pass 1's sums."""
    sums = _lamb_pass1(mod, params, grads, ms, vs, v)
    _lamb_pass2(mod, params, ms, vs, emas, _lamb_steps(mod, sums, v), v)
    return sums


@pytest.mark.parametrize("variant", list(LAMB_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_lamb_cpp_matches_reference(dtype, variant):
    v = LAMB_VARIANTS[variant]
    base = _lamb_inputs(dtype, 50)
    ref, ours = _clone(list(base)), _clone(list(base))
    rs = _lamb_call(reference, *ref, v)
    os_ = _lamb_call(cpp, *ours, v)
    assert os_.dtype == torch.float32 and os_.shape == (len(SIZES), 2)
    if variant == "skip":  # nothing moved (the kernels skip pass 1 too: its sums stay 0)
        for a, b in zip(ours[0] + ours[2] + ours[3], base[0] + base[2] + base[3]):
            assert torch.equal(a, b)
        assert torch.equal(os_, torch.zeros_like(os_))
        return
    torch.testing.assert_close(os_, rs, rtol=1e-6, atol=0)
    _close_to_reference(dtype, ours[0], ref[0], ours[2] + ours[3], ref[2] + ref[3],
                        ours[4][0] + ours[4][1], ref[4][0] + ref[4][1])
    assert any(not torch.equal(a, b) for a, b in zip(ours[0], base[0]))


@pytest.mark.parametrize("variant", list(LAMB_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_lamb_emulated_cuda_equals_cpp_bit_for_bit(cuda_emulation, dtype, variant):
    """The per-element math bit for bit (pass 1's m, v; pass 2's θ and EMAs from the same step
    sizes); the float64-accumulated sums to float32 rounding (2e-7)."""
    from ema_kernels.backends import cuda
    v = LAMB_VARIANTS[variant]
    base = _lamb_inputs(dtype, 60)
    a, b = _clone(list(base)), _clone(list(base))
    sa = _lamb_pass1(cpp, a[0], a[1], a[2], a[3], v)
    sb = _lamb_pass1(cuda, b[0], b[1], b[2], b[3], v)
    torch.testing.assert_close(sb, sa, rtol=2e-7, atol=0)
    for x, y in zip(a[2] + a[3], b[2] + b[3]):
        assert torch.equal(x, y)
    steps = _lamb_steps(cpp, sa, v)
    _lamb_pass2(cpp, a[0], a[2], a[3], a[4], steps, v)
    _lamb_pass2(cuda, b[0], b[2], b[3], b[4], steps, v)
    for x, y in zip(a[0] + a[4][0] + a[4][1], b[0] + b[4][0] + b[4][1]):
        assert torch.equal(x, y)


def test_lamb_sums_equal_float64_sums_of_what_the_kernels_computed(cuda_emulation):
    """The sums are the float64 sums of θ² and of the r the kernels compute (r read back from
    pass 2: θ_new = θ − s·r), rounded to float32, for each backend: lists of several tensors,
    a multi-block tensor (2^16 + 3 elements: two list-kernel chunks), a lone tensor (the flat
    CUDA launch)."""
    from ema_kernels.backends import cuda
    for sizes in ([5, (1 << 16) + 3, 1, 4097], [(1 << 16) + 3]):
        g = torch.Generator().manual_seed(len(sizes))
        ps = [torch.randn(n, generator=g) for n in sizes]
        gs = [torch.randn(n, generator=g) * 0.1 for n in sizes]
        for mod in (cpp, cuda):
            ms = [torch.zeros(n) for n in sizes]
            vs = [torch.zeros(n) for n in sizes]
            sums = mod.lamb_moments(ps, gs, ms, vs, beta1=0.9, beta2=0.999, eps=1e-6,
                                    weight_decay=0.0, maximize=False, bias_correction1=0.1,
                                    bias_correction2_sqrt=0.001 ** 0.5)
            # r = m̂/(√v̂ + ε) from the stored moments, as the kernels form it (float32 ops)
            r = [(m / 0.1) / (v.sqrt().div(torch.tensor(0.001 ** 0.5)) + 1e-6)
                 for m, v in zip(ms, vs)]
            want = torch.tensor([[p.double().square().sum().item(),
                                  x.double().square().sum().item()] for p, x in zip(ps, r)])
            torch.testing.assert_close(sums, want.float(), rtol=2e-6, atol=0)
            assert torch.equal(sums[:, 0], want[:, 0].float())  # θ² needs no recomputation
