"""Several EMAs per param group, all updated in the same kernel pass (issue 14).

- Kernels, every CPU-runnable backend (reference, cpp, cuda emulated, triton interpreted): one
  call updating k EMAs equals k one-EMA calls bit for bit (θ, state and each ζ_i), flat and
  tensor-list layouts, fp32/bf16/fp16, Adam(W)/SGD/EMA-only; the k-EMA call also matches the
  reference within the usual rules (fp32 1e-6 relative; 16-bit parameters within one ulp of the
  reference's rounding; EMA 1e-5). More than MAX_EMAS EMAs: a clear error.
- Optimizers: ``ema_decay=(ρ0, ρ1)`` / ``ema_schedule=(s0, s1)`` equals two optimizers with one
  EMA each, bit for bit, on every backend, default and flat layouts; the EMA API with ``index``
  (num_emas, ema_parameters, swap_ema, ema_module and its buffers), state dicts (keys, old
  checkpoints, resume bit-exact), validation messages, post-hoc snapshots of one optimizer.
"""
import copy

import pytest
import torch

import ema_kernels as ek
from backend_support import cpu_backends
from ema_kernels import _ops, posthoc
from ema_kernels import schedules as S
from ema_kernels.backends import _emas
from ema_kernels.backends import reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


BACKENDS = cpu_backends()


@pytest.fixture
def backend(request):
    """The backend module; for 'cuda', the emulated CUDA kernels on CPU tensors (switched on for
    this test only, as tests/test_cuda_emulation.py does)."""
    name = request.param
    if name == "cuda":
        request.getfixturevalue("cuda_emulation")
    return _ops.resolve(name, "cpu")


def _param_backends():
    return pytest.mark.parametrize("backend", BACKENDS, indirect=True)


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------
LAYOUTS = {"flat": [4097], "list": [4097, 1, 0, 300, 33]}


def _data(sizes, dtype, k, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(n, scale=1.0):
        return torch.randn(n, generator=g) * scale

    p = [rnd(n).to(dtype) for n in sizes]
    gr = [rnd(n, 0.1).to(dtype) for n in sizes]
    m = [rnd(n, 0.01) for n in sizes]
    v = [rnd(n, 0.01).abs() for n in sizes]
    vmax = [t + rnd(t.numel(), 0.01).abs() for t in v]
    z = [[rnd(n) for n in sizes] for _ in range(k)]
    return p, gr, m, v, vmax, z


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    return [_clone(t) for t in x]


WEIGHTS = (1e-3, 0.25, 0.75, 1.0)  # both sides of lerp's 0.5 switch, and a copy (weight 1)


def _adam(mod, p, g, m, v, vmax, emas, w, amsgrad):
    mod.adam_ema(p, g, m, v, vmax if amsgrad else None, emas, lr=1e-2, beta1=0.9, beta2=0.999,
                 eps=1e-8, weight_decay=0.1, decoupled=True, maximize=False, step_size=1e-2,
                 bias_correction2_sqrt=0.3, ema_weight=w)


def _sgd(mod, p, g, m, emas, w):
    mod.sgd_ema(p, g, m, emas, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-3,
                nesterov=True, maximize=False, first_step=False, ema_weight=w)


def _bits_equal(a, b):
    return a.shape == b.shape and torch.equal(a.view(-1).view(torch.int16 if a.element_size() == 2
                                                               else torch.int32),
                                              b.view(-1).view(torch.int16 if b.element_size() == 2
                                                              else torch.int32))


def _ulp(t):
    """One unit in the last place of each element of a 16-bit tensor (as fp32)."""
    t32 = t.float().abs()
    bits = {torch.bfloat16: 8, torch.float16: 11}[t.dtype]
    tiny = {torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}[t.dtype]
    exp = torch.floor(torch.log2(t32.clamp_min(torch.finfo(t.dtype).tiny)))
    return torch.maximum(2.0 ** (exp - (bits - 1)), torch.full_like(t32, tiny))


def _close_to_reference(got, want, what):
    if got.dtype == torch.float32 and want.dtype == torch.float32 and what.startswith("ema"):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2.0 ** -20, msg=what)
    elif got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=2.0 ** -20, msg=what)
    else:  # 16-bit parameters: within one ulp of the reference's rounding
        diff = (got.float() - want.float()).abs()
        assert bool((diff <= _ulp(want) + 2.0 ** -20).all()), what


@_param_backends()
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("k", [2, 4])
def test_adam_k_emas_in_one_call_equal_k_one_ema_calls(backend, layout, dtype, k):
    amsgrad = k == 4  # both structural variants, without doubling the runtime
    sizes = LAYOUTS[layout]
    p, g, m, v, vmax, z = _data(sizes, dtype, k, seed=k)
    w = list(WEIGHTS[:k])
    multi = _clone((p, m, v, vmax, z))
    _adam(backend, multi[0], g, multi[1], multi[2], multi[3], multi[4], w, amsgrad)
    for i in range(k):  # the same step with EMA i only
        one = _clone((p, m, v, vmax, z[i]))
        _adam(backend, one[0], g, one[1], one[2], one[3], one[4], w[i], amsgrad)
        for a, b in zip(multi[4][i], one[4]):
            assert _bits_equal(a, b), f"EMA {i} of a {k}-EMA call vs a one-EMA call"
        for a, b in zip(multi[0] + multi[1] + multi[2], one[0] + one[1] + one[2]):
            assert _bits_equal(a, b), "θ/state of a k-EMA call vs a one-EMA call"
    want = _clone((p, m, v, vmax, z))
    _adam(ref, want[0], g, want[1], want[2], want[3], want[4], w, amsgrad)
    for j, (a, b) in enumerate(zip(multi[0], want[0])):
        _close_to_reference(a, b, f"param {j}")
    for i in range(k):
        for j, (a, b) in enumerate(zip(multi[4][i], want[4][i])):
            _close_to_reference(a, b, f"ema {i} of param {j}")


@_param_backends()
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_sgd_and_ema_only_three_emas(backend, layout, dtype):
    sizes = LAYOUTS[layout]
    p, g, m, _, _, z = _data(sizes, dtype, 3, seed=11)
    w = list(WEIGHTS[:3])
    multi = _clone((p, m, z))
    _sgd(backend, multi[0], g, multi[1], multi[2], w)
    for i in range(3):
        one = _clone((p, m, z[i]))
        _sgd(backend, one[0], g, one[1], one[2], w[i])
        assert all(_bits_equal(a, b) for a, b in zip(multi[2][i], one[2])), f"sgd EMA {i}"
        assert all(_bits_equal(a, b) for a, b in zip(multi[0], one[0]))
    want = _clone((p, m, z))
    _sgd(ref, want[0], g, want[1], want[2], w)
    for i in range(3):
        for j, (a, b) in enumerate(zip(multi[2][i], want[2][i])):
            _close_to_reference(a, b, f"ema {i} of param {j}")
    # EMA only: θ read once for all three
    multi = _clone(z)
    backend.ema_only(p, multi, w)
    for i in range(3):
        one = _clone(z[i])
        backend.ema_only(p, one, w[i])
        assert all(_bits_equal(a, b) for a, b in zip(multi[i], one)), f"ema_only EMA {i}"
        r = _clone(z[i])
        ref.ema_only(p, r, w[i])
        for j, (a, b) in enumerate(zip(multi[i], r)):
            _close_to_reference(a, b, f"ema_only {i} of param {j}")


@_param_backends()
def test_more_emas_than_the_bound_is_a_clear_error(backend):
    k = _emas.MAX_EMAS + 1
    p, g, m, v, vmax, z = _data([33], torch.float32, k, seed=0)
    with pytest.raises(ValueError, match=f"{k} EMAs in one call.*at most {_emas.MAX_EMAS}"):
        _adam(backend, p, g, m, v, vmax, z, [0.5] * k, False)
    with pytest.raises(ValueError, match="2 EMA weights but 3 EMA lists"):
        _adam(backend, p, g, m, v, vmax, z[:3], [0.5, 0.5], False)


def test_compiled_op_refuses_too_many_emas():
    if not _ops.availability("cpp", "cpu")[0]:
        pytest.skip("the compiled extension is not built here")
    ops = torch.ops.ema_kernels_ext
    n, k = 9, _emas.MAX_EMAS + 1
    p = [torch.randn(n)]
    with pytest.raises(RuntimeError, match=f"{k} EMAs, but the fused kernels update at most"):
        ops.ema_only_([torch.zeros(n) for _ in range(k)], p, ema_weights=[0.5] * k)
    with pytest.raises(RuntimeError, match="emas has 1 tensors but 2 EMA"):
        ops.ema_only_([torch.zeros(n)], p, ema_weights=[0.5, 0.5])
    with pytest.raises(RuntimeError, match=r"emas\[1\] has 8 elements but params\[0\] has 9"):
        ops.ema_only_([torch.zeros(n), torch.zeros(n - 1)], p, ema_weights=[0.5, 0.5])


def test_capturable_kernels_take_one_weight_per_ema():
    """The cpp backend's capturable kernels (device-scalar reads) with a two-element weight
    tensor equal two one-EMA capturable calls and the plain kernels."""
    if not _ops.availability("cpp", "cpu")[0]:
        pytest.skip("the compiled extension is not built here")
    from ema_kernels.backends import cpp
    p, g, m, v, _, z = _data([4097, 31], torch.float32, 2, seed=3)
    lr, step = torch.tensor([1e-2]), torch.tensor([3.0])
    kw = dict(lr=lr, step=step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
              decoupled=True, maximize=False)
    multi = _clone((p, m, v, z))
    cpp.adam_ema_capturable(multi[0], g, multi[1], multi[2], None, multi[3],
                            ema_weight=torch.tensor([0.25, 0.75]), **kw)
    for i, w in enumerate((0.25, 0.75)):
        one = _clone((p, m, v, z[i]))
        cpp.adam_ema_capturable(one[0], g, one[1], one[2], None, one[3],
                                ema_weight=torch.tensor([w]), **kw)
        assert all(_bits_equal(a, b) for a, b in zip(multi[3][i], one[3]))
    with pytest.raises(ValueError, match="ema_weight has 3 elements but there are 2"):
        cpp.adam_ema_capturable(p, g, m, v, None, z, ema_weight=torch.tensor([0.1] * 3), **kw)


# ------------------------------------------------------------------------------------------
# Optimizers: two EMAs in one optimizer == two optimizers with one EMA each
# ------------------------------------------------------------------------------------------
def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))
    return m.to(dtype)


def _train(model, opt, steps, seed=1, drop_grad_at=2):
    """Deterministic gradients; at step ``drop_grad_at`` the last bias has none (it takes no
    step but its EMAs follow the clock: the EMA-only path)."""
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    for t in range(steps):
        if opt.flatten:
            opt.zero_grad(set_to_none=False)
        for k, p in enumerate(params):
            grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)
            if t == drop_grad_at and k == len(params) - 1:
                p.grad = None
            elif p.grad is not None and opt.flatten:
                p.grad.copy_(grad)
            else:
                p.grad = grad
        opt.step()


CONFIGS = {
    "adamw_decays": (ek.AdamW, dict(lr=1e-2, ema_decay=(0.9, 0.99))),
    "sgd_schedules": (ek.SGD, dict(lr=0.1, momentum=0.9, ema_every=2, kappa=2.0,
                                   ema_schedule=(S.power(sigma_rel=0.05),
                                                 S.power(sigma_rel=0.10)))),
    "adam_mixed": (ek.Adam, dict(lr=1e-2, weight_decay=0.01, amsgrad=True,
                                 ema_decay=(0.999, 0.9),
                                 ema_schedule=(S.warmup(0.999), None))),
}


def _single(kw, i):
    """The one-EMA optimizer settings of EMA i of ``kw``."""
    out = dict(kw)
    decay, sched = kw.get("ema_decay", 0.9999), kw.get("ema_schedule")
    pick = (lambda v: v[i] if isinstance(v, tuple) and i < len(v) else (v if i == 0 else None))
    s = pick(sched)
    out["ema_schedule"] = s
    out["ema_decay"] = pick(decay) if s is None else 0.9999
    return out


def _optimizer_cases():
    """backend x config x dtype; the Triton interpreter (slow) runs fp32 AdamW and SGD, its
    dtype and AMSGrad variants being covered by the kernel tests above."""
    out = []
    for b in BACKENDS:
        for config in CONFIGS:
            for dtype in (torch.float32, torch.bfloat16):
                if b == "triton" and (dtype != torch.float32 or config == "adam_mixed"):
                    continue
                out.append(pytest.param(b, config, dtype,
                                        id=f"{b}-{config}-{str(dtype).split('.')[-1]}"))
    return out


@pytest.mark.parametrize("backend, config, dtype", _optimizer_cases(), indirect=["backend"])
@pytest.mark.parametrize("flatten", [False, True], ids=["default", "flat"])
def test_two_emas_equal_two_optimizers_bit_for_bit(backend, flatten, dtype, config):
    cls, kw = CONFIGS[config]
    name = backend.NAME
    m2 = _model(dtype)
    o2 = cls(m2.parameters(), backend=name, flatten=flatten, **kw)
    assert o2.num_emas == 2
    _train(m2, o2, steps=5)
    for i in range(2):
        m1 = _model(dtype)
        o1 = cls(m1.parameters(), backend=name, flatten=flatten, **_single(kw, i))
        assert o1.num_emas == 1
        _train(m1, o1, steps=5)
        for a, b in zip(m2.parameters(), m1.parameters()):
            assert _bits_equal(a.detach(), b.detach())
        for a, b in zip(o2.ema_parameters(index=i), o1.ema_parameters(index=0)):
            assert _bits_equal(a, b), f"EMA {i} ({config}, {name})"
        # The optimizer state is the same tensors' worth too
        for p2, p1 in zip(m2.parameters(), m1.parameters()):
            for key in o1.state[p1]:
                if key.startswith("ema"):
                    continue
                a, b = o2.state[p2][key], o1.state[p1][key]
                assert torch.equal(a, b), key


# ------------------------------------------------------------------------------------------
# The EMA API with an index
# ------------------------------------------------------------------------------------------
def test_num_emas_and_ema_parameters_per_group():
    model = _model()
    opt = ek.AdamW([{"params": model[0].parameters(), "ema_decay": (0.9, 0.99, 0.999)},
                    {"params": model[2].weight},
                    {"params": model[2].bias, "ema_decay": None}], lr=1e-2, ema_decay=0.9)
    assert opt.num_emas == 3
    for i in range(3):
        zs = opt.ema_parameters(index=i)
        assert len(zs) == 4
        assert all(z is not None for z in zs[:2])
        assert (zs[2] is not None) == (i == 0) and zs[3] is None
    z0, z1 = opt.ema_parameters(index=0)[0], opt.ema_parameters(index=1)[0]
    assert z0.data_ptr() != z1.data_ptr() and torch.equal(z0, z1)  # own storage, same start
    assert sorted(k for k in opt.state[model[0].weight] if k.startswith("ema")) == \
        ["ema", "ema_1", "ema_2"]
    with pytest.raises(IndexError, match="tracks 3 EMA"):
        opt.ema_parameters(index=3)
    none = ek.SGD(model.parameters(), lr=0.1, ema_decay=None)
    assert none.num_emas == 0


def test_swap_ema_and_ema_module_with_index():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Linear(6, 2))
    opt = ek.AdamW(model.parameters(), lr=0.1, ema_decay=(0.5, 0.9), backend="reference")
    teachers = [opt.ema_module(model, index=i) for i in range(2)]
    before = [t[1].running_mean.clone() for t in teachers]
    x = torch.randn(16, 4)
    model(x).square().sum().backward()  # train mode: BatchNorm's running stats move
    opt.step()
    student_rm = model[1].running_mean
    for i, (t, rho) in enumerate(zip(teachers, (0.5, 0.9))):
        # parameters: live views of EMA i
        z = opt.ema_parameters(index=i)
        for tp, zi in zip(t.parameters(), z):
            assert tp.data_ptr() == zi.data_ptr()
        # float buffers follow EMA i's weight (1 - rho)
        assert torch.equal(t[1].running_mean, torch.lerp(before[i], student_rm, 1 - rho))
        assert torch.equal(t[1].num_batches_tracked, model[1].num_batches_tracked)
    saved = [p.detach().clone() for p in model.parameters()]
    with opt.swap_ema(index=1):
        for p, z in zip(model.parameters(), opt.ema_parameters(index=1)):
            assert torch.equal(p, z)
        with pytest.raises(RuntimeError, match="swap_ema"):
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), saved))
    with pytest.raises(IndexError):
        opt.ema_module(model, index=2)


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpp")],
                         indirect=True)
@pytest.mark.parametrize("flatten", [False, True], ids=["default", "flat"])
def test_resume_is_bit_exact(backend, flatten):
    kw = dict(lr=1e-2, ema_decay=(0.9, 0.999), ema_schedule=(None, S.power(gamma=7.0)),
              backend=backend.NAME, flatten=flatten)
    m_full = _model()
    o_full = ek.AdamW(m_full.parameters(), **kw)
    _train(m_full, o_full, steps=3, seed=1)
    _train(m_full, o_full, steps=3, seed=2)

    m_a = _model()
    o_a = ek.AdamW(m_a.parameters(), **kw)
    _train(m_a, o_a, steps=3, seed=1)
    sd = copy.deepcopy(o_a.state_dict())
    assert {k for k in sd["state"][0] if k.startswith("ema")} == {"ema", "ema_1"}
    m_b = _model(seed=5)  # other parameters: everything comes from the checkpoints
    m_b.load_state_dict(m_a.state_dict())
    o_b = ek.AdamW(m_b.parameters(), **kw)
    o_b.load_state_dict(sd)
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(o_b.ema_parameters(index=i),
                                                     o_a.ema_parameters(index=i)))
    _train(m_b, o_b, steps=3, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(m_b.parameters(), m_full.parameters()))
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(o_b.ema_parameters(index=i),
                                                     o_full.ema_parameters(index=i)))


def test_old_and_torch_checkpoints_start_missing_emas_from_the_parameters():
    model = _model()
    one = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=0.9, backend="reference")
    _train(model, one, steps=3)
    sd_old = copy.deepcopy(one.state_dict())  # only 'ema'
    assert not any(k == "ema_1" for st in sd_old["state"].values() for k in st)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the parameters now differ from the saved EMA
    two = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=(0.9, 0.99), backend="reference")
    sd_old["param_groups"][0]["ema_decay"] = (0.9, 0.99)  # as a user changing the settings
    two.load_state_dict(sd_old)
    for z0, z_saved in zip(two.ema_parameters(index=0), one.ema_parameters(index=0)):
        assert torch.equal(z0, z_saved)
    for z1, p in zip(two.ema_parameters(index=1), model.parameters()):
        assert torch.equal(z1, p.detach())
    # a torch.optim checkpoint: both EMAs start from the parameters
    topt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 9)).sum().backward()
    topt.step()
    two.load_state_dict(topt.state_dict())  # keeps our ema_decay (torch has none)
    assert two.num_emas == 2
    for i in range(2):
        for z, p in zip(two.ema_parameters(index=i), model.parameters()):
            assert torch.equal(z, p.detach())
    # and ours loads into torch's (the EMA entries are kept as another optimizer's state)
    torch.optim.AdamW(model.parameters(), lr=1e-2).load_state_dict(two.state_dict())


def test_adding_and_dropping_an_ema_later():
    """EMA 1 added to a group's tuple starts from the parameters of the next step (before its
    update) and shares the group's EMA clock; dropped, its state goes."""
    model = _model()
    opt = ek.SGD(model.parameters(), lr=0.1, ema_decay=0.9, backend="reference")
    _train(model, opt, steps=2)
    opt.param_groups[0]["ema_decay"] = (0.9, 0.5)
    assert opt.num_emas == 2
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, steps=1, drop_grad_at=-1)
    for z, b, p in zip(opt.ema_parameters(index=1), before, model.parameters()):
        assert torch.equal(z, torch.lerp(b, p.detach(), 0.5))
    opt.param_groups[0]["ema_decay"] = 0.9
    _train(model, opt, steps=1)
    assert opt.num_emas == 1 and opt.ema_parameters(index=0)[0] is not None
    assert not any("ema_1" in st for st in opt.state.values())


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, exc, match", [
    (dict(ema_decay=(0.9, 0.99, 0.999, 0.9999, 0.5)), ValueError,
     r"5 EMAs .*at most 4 EMAs per pass"),
    (dict(ema_decay=(0.9, 1.5)), ValueError, r"ema_decay\[1\].*=1.5 is invalid"),
    (dict(ema_decay=(0.9, None)), ValueError, r"ema_decay\[1\].* is None"),
    (dict(ema_decay=()), ValueError, "empty sequence"),
    (dict(ema_decay=0.9, ema_schedule=(S.power(gamma=5.0), None)), ValueError,
     r"ema_schedule\[1\] is None .*no element 1"),
    (dict(ema_schedule=(S.power(gamma=5.0), 0.5)), TypeError,
     r"ema_schedule\[1\]=0.5 .*must be a schedule"),
    (dict(ema_decay=(0.9, "0.99")), TypeError, r"ema_decay\[1\].*must be a number"),
])
def test_bad_ema_tuples_raise_naming_the_value(kw, exc, match):
    with pytest.raises(exc, match=match):
        ek.AdamW(_model().parameters(), **kw)


def test_capturable_with_two_decays_matches_plain():
    if not _ops.availability("cpp", "cpu")[0]:
        pytest.skip("the compiled extension is not built here")
    runs = []
    for capturable in (False, True):
        model = _model()
        opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=(0.9, 0.99), backend="cpp",
                       capturable=capturable)
        _train(model, opt, steps=3, drop_grad_at=-1)  # capturable: every parameter has a grad
        runs.append([p.detach().clone() for p in model.parameters()] +
                    opt.ema_parameters(index=0) + opt.ema_parameters(index=1))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# Post-hoc EMA from one optimizer
# ------------------------------------------------------------------------------------------
def test_posthoc_snapshots_of_one_optimizer_with_two_power_emas():
    """ema_schedule=(power(0.05), power(0.10), power(0.07)) in one optimizer:
    snapshot(opt, index=(0, 1)) every 16 of 256 steps; the synthesised 0.07 is within 5 % of
    ‖ζ_0.05 − ζ_0.10‖ of the directly tracked EMA 2, and the tracked 0.10 comes back."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = ek.AdamW(model.named_parameters(), lr=3e-2, weight_decay=0.01,
                   ema_schedule=tuple(S.power(sigma_rel=s) for s in (0.05, 0.10, 0.07)),
                   backend="reference")
    gen = torch.Generator().manual_seed(5)
    snaps = []
    for step in range(1, 257):
        x = torch.randn(16, 6, generator=gen)
        y = torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin()], 1)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step % 16 == 0:
            snaps.append(posthoc.snapshot(opt, index=(0, 1)))
    last = snaps[-1]
    assert [e.index for e in last.emas] == [0, 1]
    assert last.emas[0].gammas == [pytest.approx(S.sigma_rel_to_gamma(0.05))]
    for e in last.emas:
        for t, z in zip(e.tensors, opt.ema_parameters(index=e.index)):
            assert torch.equal(t, z)
    got = posthoc.synthesize(snaps, 0.07)
    want = opt.ema_parameters(index=2)
    spread = torch.cat([(a - b).flatten() for a, b in zip(opt.ema_parameters(index=0),
                                                           opt.ema_parameters(index=1))]).norm()
    err = torch.cat([(g - w).flatten() for g, w in zip(got, want)]).norm() / spread
    assert err < 0.05, float(err)
    for g, w in zip(posthoc.synthesize(snaps, 0.10), opt.ema_parameters(index=1)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# With the host-side machinery: found_inf consumed on the device, tensor lr
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"], indirect=True)
def test_found_inf_step_moves_no_ema_and_tensor_lr_matches_float_lr(backend):
    """A found_inf step (on the device, no host read) leaves both EMAs bit for bit, the
    EMA-only path of a parameter without gradient included; a tensor lr (the device-scalar
    kernels, one weight per EMA) gives the float lr's result."""
    name = backend.NAME
    model = _model()
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=(0.9, 0.99), backend=name)
    _train(model, opt, steps=2)
    before = [[z.clone() for z in opt.ema_parameters(index=i)] for i in range(2)]
    params = list(model.parameters())
    for p in params[:-1]:
        p.grad = torch.full_like(p, float("inf"))
    params[-1].grad = None  # its EMAs take the EMA-only path
    opt.step(grad_scale=torch.ones(1), found_inf=torch.ones(1))
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(opt.ema_parameters(index=i), before[i]))
    runs = []
    for lr in (1e-2, torch.tensor(1e-2)):
        m = _model()
        o = ek.AdamW(m.parameters(), lr=lr, ema_decay=(0.9, 0.99), backend=name)
        _train(m, o, steps=3)
        runs.append([p.detach().clone() for p in m.parameters()] +
                    o.ema_parameters(index=0) + o.ema_parameters(index=1))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
