"""The compiled kernels of the issue-25 rules (today: Lion) against the reference: ``cpp`` within
1e-6 relative in fp32 (one ulp of the rounding for 16-bit parameters), the CUDA kernels (run on
the CPU by the emulation build) equal to ``cpp`` bit for bit; fresh random data, odd sizes,
odd-offset views, every storage dtype, GradScaler's scale and skip, several EMAs, stochastic
rounding, a device lr.
"""
import pytest
import torch

import ema_kernels as ek
from ema_kernels.backends import cpp, reference

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


@pytest.mark.parametrize("flatten", [False, True])
def test_lion_optimizer_cpp_matches_reference_and_auto_picks_it(flatten):
    runs = {}
    for backend in ("reference", "cpp", "auto"):
        m = _model(1)
        opt = ek.Lion([{"params": m[0].parameters()},
                       {"params": m[2].parameters(), "weight_decay": 0.0}], lr=1e-2,
                      weight_decay=0.1, ema_decay=(0.9, 0.5), backend=backend, flatten=flatten)
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


def test_lion_optimizer_capturable_and_tensor_lr_on_cpp():
    runs = []
    for mode in ("float", "tensor", "capturable"):
        m = _model(2)
        lr = torch.tensor(1e-2) if mode == "tensor" else 1e-2
        opt = ek.Lion(m.parameters(), lr=lr, weight_decay=0.1, ema_decay=0.8, backend="cpp",
                      capturable=mode == "capturable")
        _train(m, opt)
        runs.append(list(m.parameters()) + opt.ema_parameters())
    for other in runs[1:]:
        for x, y in zip(other, runs[0]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_lion_optimizer_emulated_cuda_equals_cpp(cuda_emulation):
    outs = []
    for backend in ("cpp", "cuda"):
        m = _model(3, torch.bfloat16)
        torch.manual_seed(5)
        opt = ek.Lion(m.parameters(), lr=1e-2, weight_decay=0.1, ema_decay=0.8,
                      stochastic_rounding=True, backend=backend)
        _train(m, opt)
        outs.append(list(m.parameters()) + opt.ema_parameters() +
                    [opt.state[p]["exp_avg"] for p in m.parameters()])
    for x, y in zip(*outs):
        assert torch.equal(x, y)
