"""The reference backend against float64 re-computations of the update, per storage dtype."""
import pytest
import torch

from ema_kernels.backends import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _data(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(dtype)
    grad = torch.randn(n, generator=g).to(dtype)
    m = torch.randn(n, generator=g) * 0.1
    v = torch.rand(n, generator=g) * 0.01
    z = torch.randn(n, generator=g)
    return p, grad, m, v, z


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("n", [1, 4097, (1 << 16) * 2 + 3])
def test_adam_against_float64(dtype, decoupled, n):
    p, g, m, v, z = _data(n, dtype, seed=n + decoupled)
    p64, g64, m64, v64, z64 = (t.double() for t in (p, g, m, v, z))
    lr, b1, b2, eps, wd, t, w = 1e-2, 0.9, 0.999, 1e-8, 0.1, 3, 1e-3
    step_size, bc2 = lr / (1 - b1 ** t), (1 - b2 ** t) ** 0.5
    ref.adam_ema([p], [g], [m], [v], None, [z], lr=lr, beta1=b1, beta2=b2, eps=eps,
                 weight_decay=wd, decoupled=decoupled, maximize=False, step_size=step_size,
                 bias_correction2_sqrt=bc2, ema_weight=w)
    if decoupled:
        p64 = p64 * (1 - lr * wd)
    else:
        g64 = g64 + wd * p64
    m64 = b1 * m64 + (1 - b1) * g64
    v64 = b2 * v64 + (1 - b2) * g64 * g64
    p64 = p64 - step_size * m64 / (v64.sqrt() / bc2 + eps)
    torch.testing.assert_close(m.double(), m64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v.double(), v64, rtol=1e-5, atol=1e-9)
    if dtype == torch.float32:
        torch.testing.assert_close(p.double(), p64, rtol=1e-5, atol=1e-6)
    else:  # within one ulp of the exact result rounded to the storage dtype
        ulp = torch.finfo(dtype).eps * p64.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((p.double() - p64).abs() <= ulp * 1.01 + 1e-7).all()
    z64 = z64 + w * (p.double() - z64)  # the EMA follows θ as stored
    torch.testing.assert_close(z.double(), z64, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_against_float64_and_first_step(dtype, nesterov):
    n = 4097
    p, g, buf, _, z = _data(n, dtype, seed=7)
    lr, mom, damp, wd = 0.1, 0.9, 0.0 if nesterov else 0.25, 0.01
    p64, g64, buf64, z64 = p.double(), g.double(), buf.double(), z.double()
    for first in (True, False):
        ref.sgd_ema([p], [g], [buf], [z], lr=lr, momentum=mom, dampening=damp, weight_decay=wd,
                    nesterov=nesterov, maximize=True, first_step=first, ema_weight=0.5)
        d = -g64 + wd * p64
        buf64 = d.clone() if first else mom * buf64 + (1 - damp) * d
        d = d + mom * buf64 if nesterov else buf64
        p64 = p64 - lr * d
        if dtype != torch.float32:
            p64 = p64.to(dtype).double()
        torch.testing.assert_close(p.double(), p64, rtol=2e-3 if dtype != torch.float32
                                   else 1e-5, atol=1e-6)
        p64 = p.double()  # continue from the stored value
        z64 = z64 + 0.5 * (p64 - z64)
        torch.testing.assert_close(z.double(), z64, rtol=1e-5, atol=1e-6)


def test_found_inf_and_grad_scale():
    p, g, m, v, z = _data(1000, torch.float32, seed=1)
    saved = [t.clone() for t in (p, g, m, v, z)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True,
              maximize=False, step_size=0.1, bias_correction2_sqrt=0.1, ema_weight=0.1)
    ref.adam_ema([p], [g], [m], [v], None, [z], found_inf=torch.ones(1), **kw)
    assert all(torch.equal(a, b) for a, b in zip((p, g, m, v, z), saved))
    ref.adam_ema([p], [g * 8], [m], [v], None, [z], grad_scale=torch.full((1,), 8.0), **kw)
    p2, g2, m2, v2, z2 = saved
    ref.adam_ema([p2], [g2], [m2], [v2], None, [z2], **kw)
    assert torch.equal(p, p2) and torch.equal(m, m2) and torch.equal(z, z2)


def test_no_ema_step_touches_no_ema():
    p, g, m, v, z = _data(100, torch.float32, seed=2)
    z0 = z.clone()
    ref.adam_ema([p], [g], [m], [v], None, [z], lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                 weight_decay=0.0, decoupled=True, maximize=False, step_size=0.1,
                 bias_correction2_sqrt=0.1, ema_weight=None)
    assert torch.equal(z, z0)
