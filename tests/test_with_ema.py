"""``ek.WithEMA``: any torch optimizer plus the EMA family (issue 25, section 2).

- Oracle: the wrapped optimizer's parameters equal those of the same torch optimizer alone, bit
  for bit, and every EMA equals a float64 EMA written by hand from those parameters (fresh
  random data, odd sizes, transposed and strided parameters, fp32 and bf16), for torch's
  Adafactor, RMSprop, NAdam, Adam, AdamW and SGD, on every CPU-runnable backend (reference,
  cpp, cuda emulated, triton interpreted); several EMAs, schedules, ``ema_every``, ``kappa``,
  groups without EMA, parameters without a gradient.
- GradScaler: a skipped step moves no EMA and no clock (fused AdamW inner: decided on the
  device; RMSprop inner: GradScaler skips the call); no host read beyond the inner step's.
- Checkpoints: bit-exact resume through ``torch.load(weights_only=True)``, plain inner
  checkpoints in and out, refusals before anything loads.
- torch.optim behaviour: param_groups are the inner's (LR schedulers), zero_grad,
  add_param_group, closures, hooks, deepcopy; LBFGS and EMA optimizers refused.
"""
import copy
import io
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ema_kernels as ek
from backend_support import cpu_backends
from ema_kernels import posthoc
from ema_kernels import schedules as S


BACKENDS = cpu_backends()


@pytest.fixture
def backend(request):
    """A backend name; 'cuda' runs the emulated CUDA kernels on CPU tensors for this test."""
    if request.param == "cuda":
        request.getfixturevalue("cuda_emulation")
    return request.param


INNERS = {
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
}


def _params(seed, dtype):
    """Odd sizes and layouts: a 1-element, a 4097-element, a transposed (dense, not
    contiguous), a strided view (not dense) and a channels_last parameter."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)
    return [torch.nn.Parameter(rnd(1)), torch.nn.Parameter(rnd(4097)),
            torch.nn.Parameter(rnd(7, 33).t()), torch.nn.Parameter(rnd(301)[::3]),
            torch.nn.Parameter(rnd(2, 3, 5, 4).contiguous(memory_format=torch.channels_last))]


def _grads(gen, params, step, frozen=()):
    out = []
    for i, p in enumerate(params):
        out.append(None if i in frozen else torch.randn(p.shape, generator=gen).to(p.dtype))
    return out


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


class _Oracle:
    """Float64 EMAs by hand: ζ ← d ζ + (1 − d) θ on EMA steps, d from ρ^(κ·k) or the schedule
    over the base steps the interval covers."""

    def __init__(self, params, sources, kappa, every):
        self.z = [[p.detach().double().clone() for p in params] for _ in sources]
        self.sources, self.kappa, self.every = sources, kappa, every
        self.step = 0
        self.s_from = 0.0

    def update(self, params):
        self.step += 1
        if self.step % self.every:
            return
        s_to = self.step * self.kappa
        for zs, src in zip(self.z, self.sources):
            d = src.decay(self.s_from, s_to) if callable(src) else src ** (s_to - self.s_from)
            for z, p in zip(zs, params):
                z.mul_(d).add_(p.detach().double(), alpha=1 - d)
        self.s_from = s_to


def _assert_ema(opt, oracle, where):
    for k, zs in enumerate(oracle.z):
        got = opt.ema_parameters(k)
        assert len(got) == len(zs)
        for j, (a, b) in enumerate(zip(got, zs)):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{where}: EMA {k} of param {j}: {m}")


CONFIGS = {
    "one": dict(ema_decay=0.9),
    "two_kappa_every": dict(ema_decay=(0.9, 0.6), kappa=2.0, ema_every=2),
    "schedule": dict(ema_decay=(0.99, 0.5), ema_schedule=(S.warmup(0.99, gamma=1.0), None),
                     kappa=0.5),
}


def _run_against_oracle(inner_name, dtype, backend, config, steps=7, seed=0):
    seed = seed * 1000 + torch.randint(0, 1000, ()).item()
    ps, twin = _params(seed, dtype), _params(seed, dtype)
    cfg = CONFIGS[config]
    opt = ek.WithEMA(INNERS[inner_name](ps), backend=backend, **cfg)
    ref = INNERS[inner_name](twin)
    decays = cfg["ema_decay"] if isinstance(cfg["ema_decay"], tuple) else (cfg["ema_decay"],)
    scheds = cfg.get("ema_schedule") or (None,) * len(decays)
    sources = [s if s is not None else d for d, s in zip(decays, scheds)]
    oracle = _Oracle(twin, sources, cfg.get("kappa", 1.0), cfg.get("ema_every", 1))
    gen = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        grads = _grads(gen, ps, t, frozen=(0, 3) if t == 2 else ())
        _set_grads(ps, grads)
        _set_grads(twin, grads)
        opt.step()
        ref.step()
        oracle.update(twin)
        for j, (a, b) in enumerate(zip(ps, twin)):
            assert torch.equal(a, b), f"step {t}: param {j} differs from the inner optimizer alone"
        _assert_ema(opt, oracle, f"{inner_name} {dtype} {backend} {config} step {t}")
    assert opt.param_groups[0]["steps"] == steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inner", list(INNERS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_matches_inner_and_float64_ema(inner, dtype, backend):
    _run_against_oracle(inner, dtype, backend, "one")


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_every_backend_configs(backend, config):
    """Several EMAs, κ, ema_every, schedules on each backend (Adafactor fp32, NAdam bf16)."""
    _run_against_oracle("adafactor", torch.float32, backend, config, seed=1)
    _run_against_oracle("nadam", torch.bfloat16, backend, config, seed=2)


def _launch_count_setup(backend):
    """A WithEMA over four groups: two fp32 groups with the same EMA settings (5 tensors), a
    bf16 one, one with other weights; every parameter with a gradient. Returns it and the
    first group's parameters."""
    a = [torch.nn.Parameter(torch.randn(n)) for n in (5, 4097, 33)]
    b = [torch.nn.Parameter(torch.randn(n)) for n in (7, 300)]
    c = [torch.nn.Parameter(torch.randn(9).bfloat16())]
    d = [torch.nn.Parameter(torch.randn(11))]
    inner = torch.optim.SGD([{"params": a}, {"params": b}, {"params": c},
                             {"params": d, "ema_decay": 0.5}], lr=0.1)
    opt = ek.WithEMA(inner, ema_decay=(0.9, 0.99), backend=backend)
    for p in a + b + c + d:
        p.grad = torch.randn_like(p)
    return opt, a


def test_one_launch_per_set(cuda_emulation):
    """The EMAs of a step are one launch per (device, dtype, weights): two groups with the
    same EMA settings share it, bf16 parameters get their own, a group with other weights its
    own; no launch on a step that is not an EMA step."""
    opt, a = _launch_count_setup("cuda")
    before = cuda_emulation.emu_stats()[0]
    opt.step()
    assert cuda_emulation.emu_stats()[0] - before == 3
    opt2 = ek.WithEMA(torch.optim.SGD(a, lr=0.1), ema_every=2, backend="cuda")
    before = cuda_emulation.emu_stats()[0]
    opt2.step()
    assert cuda_emulation.emu_stats()[0] == before
    opt2.step()
    assert cuda_emulation.emu_stats()[0] - before == 1


class _LaunchCounter:
    """Stands in for a Triton kernel in launch.py: counts its launches (``kernel[grid]``)."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton runs on CPU only under "
                                                     "TRITON_INTERPRET=1")
def test_one_launch_per_set_triton(monkeypatch):
    """As test_one_launch_per_set on the triton backend: one list launch per (dtype, weights),
    a flat launch for a set of one tensor (and for an odd-offset view), none off the EMA
    clock."""
    from triton_support import triton_backend
    triton_backend()
    from ema_kernels.backends.triton import launch
    counts = {}
    for name in ("_ema_flat_kernel", "_ema_list_kernel"):
        monkeypatch.setattr(launch, name, _LaunchCounter(getattr(launch, name), counts, name))
    opt, a = _launch_count_setup("triton")
    opt.step()
    assert counts == {"_ema_list_kernel": 1, "_ema_flat_kernel": 2}, counts
    counts.clear()
    opt2 = ek.WithEMA(torch.optim.SGD(a, lr=0.1), ema_every=2, backend="triton")
    opt2.step()
    assert counts == {}
    opt2.step()
    assert counts == {"_ema_list_kernel": 1}
    # an odd-offset view: its own flat launch beside the list launch of the others
    counts.clear()
    from ema_kernels.backends.triton import ema_only
    ps = [torch.randn(4097), torch.randn(301)[1:], torch.randn(64)]
    zs = [torch.zeros_like(p) for p in ps]
    ema_only(ps, zs, 0.25)
    assert counts == {"_ema_list_kernel": 1, "_ema_flat_kernel": 1}, counts
    for p, z in zip(ps, zs):
        assert torch.equal(z, torch.zeros_like(p).lerp(p, 0.25))


def test_groups_without_ema_and_duplicates():
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(4))
    with pytest.warns(UserWarning, match="duplicate"):
        inner = torch.optim.SGD([{"params": [a, a]}, {"params": [b], "ema_decay": None}], lr=1)
    opt = ek.WithEMA(inner, ema_decay=0.5)
    emas = opt.ema_parameters()
    assert emas[2] is None and emas[0] is emas[1]
    a0 = a.detach().clone()
    a.grad, b.grad = torch.ones(6), torch.ones(4)
    opt.step()  # the duplicate is averaged once: ζ = (a0 + a1) / 2
    torch.testing.assert_close(emas[0], (a0 + a.detach()) / 2, rtol=1e-6, atol=1e-7)
    assert b not in opt.state
    # switching the EMA on later starts it from the parameters of that moment
    opt.param_groups[1]["ema_decay"] = 0.5
    b1 = b.detach().clone()
    opt.step()
    torch.testing.assert_close(opt.ema_parameters()[2], (b1 + b.detach()) / 2, rtol=1e-6,
                               atol=1e-7)


# ------------------------------------------------------------------------------------------
# GradScaler and host reads
# ------------------------------------------------------------------------------------------
class _HostReads(TorchDispatchMode):
    """Counts the aten ops that read a device value on the host."""
    NAMES = ("_local_scalar_dense", "item", "is_nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _scaled_run(make_inner, steps, inf_at, wrap, backend="auto"):
    """Train with GradScaler; gradient infs at the steps in ``inf_at``. Returns the params, the
    optimizer, and the host reads each scaler.step made."""
    gen = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (3, 4097, 64)]
    opt = make_inner(ps)
    if wrap:
        opt = ek.WithEMA(opt, ema_decay=0.8, ema_schedule=S.warmup(0.9), backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    reads = []
    for t in range(steps):
        for p in ps:
            g = torch.randn(p.shape, generator=gen)
            if t in inf_at:
                g[0] = float("inf")
            p.grad = g * scaler.scale(torch.ones(())).detach()  # as backward of a scaled loss
        with _HostReads() as hr:
            scaler.step(opt)
        reads.append(hr.count)
        scaler.update()
    return ps, opt, reads


@pytest.mark.parametrize("backend", ["reference", "cpp"], indirect=True)
@pytest.mark.parametrize("inner", ["adamw_fused", "rmsprop"])
def test_gradscaler_skip_moves_no_ema(inner, backend):
    make = {"adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
            "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2)}[inner]
    steps, inf_at = 7, (2, 3, 5)
    ps, opt, reads = _scaled_run(make, steps, inf_at, wrap=True, backend=backend)
    twin, ref, ref_reads = _scaled_run(make, steps, inf_at, wrap=False)
    assert opt._step_supports_amp_scaling == (inner == "adamw_fused")
    # θ as the inner optimizer alone, and no host read beyond the inner step's (GradScaler's
    # own .item() for an inner optimizer that cannot skip on the device)
    for a, b in zip(ps, twin):
        assert torch.equal(a, b)
    assert reads == ref_reads, (reads, ref_reads)
    if inner == "adamw_fused":
        assert reads == [0] * steps
    # the EMA saw only the applied steps: the oracle replays the run without the skipped ones
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(n, generator=gen) for n in (3, 4097, 64)]
    orc = _Oracle(init, [S.warmup(0.9)], 1.0, 1)
    replay = _params_after_applied_steps(make, steps, inf_at)
    for theta in replay:
        orc.update(theta)
    opt._settle()
    assert opt.param_groups[0]["steps"] == steps - len(inf_at)
    _assert_ema(opt, orc, inner)


def _params_after_applied_steps(make, steps, inf_at):
    """θ after each applied step of the same GradScaler run (the inner optimizer alone)."""
    gen = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (3, 4097, 64)]
    opt = make(ps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    out = []
    for t in range(steps):
        for p in ps:
            g = torch.randn(p.shape, generator=gen)
            if t in inf_at:
                g[0] = float("inf")
            p.grad = g * scaler.scale(torch.ones(())).detach()
        scaler.step(opt)
        scaler.update()
        if t not in inf_at:
            out.append([p.detach().clone() for p in ps])
    return out


@pytest.mark.parametrize("inner", list(INNERS))
def test_step_adds_no_host_reads(inner):
    """A step reads nothing on the host that the inner optimizer alone does not (Adafactor
    reads its parameters' norms itself)."""
    ps, twin = _params(3, torch.float32), _params(3, torch.float32)
    opt = ek.WithEMA(INNERS[inner](ps), ema_decay=(0.9, 0.99), ema_every=1)
    ref = INNERS[inner](twin)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        grads = _grads(gen, ps, 0)
        _set_grads(ps, grads)
        _set_grads(twin, grads)
        with _HostReads() as a:
            opt.step()
        with _HostReads() as b:
            ref.step()
        assert a.count == b.count, (a.count, b.count)


def test_found_inf_needs_an_inner_that_takes_it():
    p = torch.nn.Parameter(torch.randn(3))
    opt = ek.WithEMA(torch.optim.RMSprop([p]))
    p.grad = torch.ones(3)
    opt.found_inf = torch.zeros(())
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="_step_supports_amp_scaling"):
        opt.step()
    assert torch.equal(p, before)


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
def _train(opt, ps, gen, steps):
    for t in range(steps):
        _set_grads(ps, _grads(gen, ps, t, frozen=(1,) if t == 1 else ()))
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("inner", ["adafactor", "nadam", "rmsprop"])
def test_state_dict_resume_is_bit_exact(inner):
    kw = dict(ema_decay=(0.9, 0.99), ema_schedule=(S.warmup(0.999), None), ema_every=2,
              kappa=1.5)
    ps = _params(7, torch.float32)
    opt = ek.WithEMA(INNERS[inner](ps), **kw)
    gen = torch.Generator().manual_seed(8)
    _train(opt, ps, gen, 5)  # odd: the EMA interval is open at the checkpoint
    sd = _roundtrip(opt.state_dict())
    saved_params = [p.detach().clone() for p in ps]
    gen_state = gen.get_state()
    _train(opt, ps, gen, 4)

    ps2 = _params(99, torch.float32)
    with torch.no_grad():
        for a, b in zip(ps2, saved_params):
            a.copy_(b)
    opt2 = ek.WithEMA(INNERS[inner](ps2), **kw)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["ema_schedule"] == (S.warmup(0.999), None)
    gen.set_state(gen_state)
    _train(opt2, ps2, gen, 4)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)
    for k in range(2):
        for a, b in zip(opt.ema_parameters(k), opt2.ema_parameters(k)):
            assert torch.equal(a, b)
    assert opt.param_groups[0]["base_steps"] == opt2.param_groups[0]["base_steps"]


def test_state_dict_format_and_plain_inner_checkpoints():
    ps = _params(11, torch.float32)
    opt = ek.WithEMA(torch.optim.AdamW(ps, lr=1e-2), ema_decay=0.9,
                     ema_schedule=S.power(sigma_rel=0.1))
    gen = torch.Generator().manual_seed(12)
    _train(opt, ps, gen, 3)
    sd = opt.state_dict()
    assert set(sd) == {"optimizer", "ema", "format"}
    inner_sd = sd["optimizer"]
    for g in inner_sd["param_groups"]:
        assert not {"ema_decay", "ema_schedule", "kappa", "base_steps", "steps"} & set(g)
    assert sd["ema"]["param_groups"][0]["steps"] == 3
    assert set(sd["ema"]["state"][0]) == {"ema"}
    # the inner part loads into the plain inner optimizer, and has its state
    plain = torch.optim.AdamW(_params(13, torch.float32), lr=1e-2)
    plain.load_state_dict(_roundtrip(inner_sd))
    assert torch.equal(plain.state[plain.param_groups[0]["params"][1]]["exp_avg"],
                       opt.optimizer.state[ps[1]]["exp_avg"])
    # a plain checkpoint loads into WithEMA: the EMAs start from the current parameters and
    # their clock from now; the settings stay
    emas = opt.ema_parameters()
    opt.load_state_dict(plain.state_dict())
    assert opt.ema_parameters()[1] is emas[1]  # in place: teachers stay live
    for z, p in zip(opt.ema_parameters(), ps):
        assert torch.equal(z, p.detach())
    g = opt.param_groups[0]
    assert g["ema_base_steps"] == g["base_steps"] == 3.0
    assert g["ema_schedule"] == S.power(sigma_rel=0.1) and g["ema_decay"] == 0.9
    assert opt.param_groups is opt.optimizer.param_groups
    _train(opt, ps, gen, 1)  # and it trains on


def test_load_refuses_a_checkpoint_that_does_not_fit():
    ps = _params(14, torch.float32)
    opt = ek.WithEMA(torch.optim.SGD(ps, lr=1e-2), ema_decay=0.9)
    _train(opt, ps, torch.Generator().manual_seed(1), 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["ema"]["state"][1]["ema"] = torch.zeros(5)
    before = [z.clone() for z in opt.ema_parameters()]
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["ema"]["param_groups"][0]["ema_decay"] = 1.5
    with pytest.raises(ValueError, match="ema_decay"):
        opt.load_state_dict(sd)
    for a, b in zip(before, opt.ema_parameters()):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["steps"] == 2


def test_deepcopy_trains_independently():
    ps = _params(15, torch.float32)
    opt = ek.WithEMA(torch.optim.NAdam(ps, lr=1e-2), ema_decay=0.9)
    _train(opt, ps, torch.Generator().manual_seed(2), 2)
    twin = copy.deepcopy(opt)
    tps = [p for g in twin.param_groups for p in g["params"]]
    assert twin.param_groups is twin.optimizer.param_groups
    _train(twin, tps, torch.Generator().manual_seed(3), 2)
    _train(opt, ps, torch.Generator().manual_seed(3), 2)
    for a, b in zip(opt.ema_parameters(), twin.ema_parameters()):
        assert torch.equal(a, b) and a is not b


# ------------------------------------------------------------------------------------------
# The EMA API
# ------------------------------------------------------------------------------------------
def test_ema_api_swap_teacher_posthoc():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = ek.WithEMA(torch.optim.Adafactor(model.parameters(), lr=1e-2),
                     ema_schedule=(S.power(sigma_rel=0.05), S.power(sigma_rel=0.1)))
    assert opt.num_emas == 2
    teacher = opt.ema_module(model, index=1)
    for _ in range(3):
        model(torch.randn(8, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    for tp, z in zip(teacher.parameters(), opt.ema_parameters(1)):
        assert tp.data_ptr() == z.data_ptr()
    assert not torch.equal(teacher[1].running_mean, torch.zeros(3))  # buffers follow the EMA
    own = [p.detach().clone() for p in model.parameters()]
    with opt.swap_ema(1):
        for p, z in zip(model.parameters(), opt.ema_parameters(1)):
            assert torch.equal(p, z)
        with pytest.raises(RuntimeError, match="swap_ema"):
            opt.step()
    for p, o in zip(model.parameters(), own):
        assert torch.equal(p, o)
    snap = posthoc.snapshot(opt, index=(0, 1), model=model)
    assert snap.s == [3.0]
    for k in range(2):
        for a, b in zip(snap.emas[k].tensors, opt.ema_parameters(k)):
            assert torch.equal(a, b)


def test_param_groups_are_the_inner_ones_lr_scheduler():
    ps = _params(16, torch.float32)
    inner = torch.optim.RMSprop(ps, lr=0.1)
    opt = ek.WithEMA(inner)
    assert opt.param_groups is inner.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()"
        for t in range(2):
            _set_grads(ps, _grads(torch.Generator().manual_seed(t), ps, t))
            opt.step()
            sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt.defaults["lr"] == 0.1 and opt.defaults["ema_decay"] == 0.9999


def test_add_param_group_zero_grad_closure_hooks():
    a = torch.nn.Parameter(torch.randn(5))
    opt = ek.WithEMA(torch.optim.SGD([a], lr=0.5), ema_decay=0.5)
    b = torch.nn.Parameter(torch.randn(7))
    c = torch.nn.Parameter(torch.randn(2))
    a.grad = torch.ones(5)
    opt.step()
    opt.add_param_group({"params": [b], "lr": 0.25})
    opt.add_param_group({"params": [c], "ema_decay": None})
    assert len(opt.optimizer.param_groups) == 3
    emas = opt.ema_parameters()
    assert torch.equal(emas[1], b.detach()) and emas[2] is None
    with pytest.raises(ValueError, match="ema_decay"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))],
                             "ema_decay": 2.0})
    assert len(opt.param_groups) == 3
    calls = []
    opt.register_step_pre_hook(lambda o, args, kw: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kw: calls.append("post"))

    def closure():
        calls.append("closure")
        opt.zero_grad(set_to_none=False)
        for p in (a, b, c):
            p.grad = torch.ones_like(p)
        return torch.tensor(3.0)
    b0 = b.detach().clone()
    assert opt.step(closure).item() == 3.0
    assert calls == ["pre", "closure", "post"]
    torch.testing.assert_close(opt.ema_parameters()[1], (b0 + b.detach()) / 2)
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_refusals():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"LBFGS.*closure-driven.*several"):
        ek.WithEMA(torch.optim.LBFGS([p]))
    with pytest.raises(ValueError, match="already keeps EMAs"):
        ek.WithEMA(ek.AdamW([p]))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ek.WithEMA([p])
    inner = torch.optim.SGD([p], lr=1)
    for kw, match in ((dict(ema_decay=1.5), "ema_decay"), (dict(kappa=0), "kappa"),
                      (dict(ema_every=0), "ema_every"), (dict(backend="nope"), "backend")):
        with pytest.raises(ValueError, match=match):
            ek.WithEMA(inner, **kw)
    assert "ema_decay" not in inner.param_groups[0]  # nothing adopted by a refused wrapper
    opt = ek.WithEMA(inner, ema_schedule=lambda s: 2.0)
    p.grad = torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="ema_schedule"):
        opt.step()  # the schedule is checked before the inner step moves anything
    assert torch.equal(p, before)


def test_docs_snippets_run():
    """Every python block of docs/with_ema.md runs as written (fresh namespace each)."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "with_ema.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4, len(blocks)
    for code in blocks:
        exec(compile(code, "docs/with_ema.md", "exec"), {})


class _SignSGD(torch.optim.Optimizer):
    """A third-party-style optimizer: its own state, a step() without a closure argument."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self.state[p]["n"] = self.state[p].get("n", 0) + 1
                    p.add_(p.grad.sign(), alpha=-g["lr"])


def test_any_optimizer_fp64_and_pickling():
    import pickle
    ps = [torch.nn.Parameter(torch.randn(9, dtype=torch.float64)),
          torch.nn.Parameter(torch.randn(4))]
    with pytest.raises(TypeError, match="float64"):
        ek.WithEMA(_SignSGD(ps), backend="cpp")  # the kernels take fp32/bf16/fp16
    opt = ek.WithEMA(_SignSGD(ps), ema_decay=0.75)  # auto: the reference for float64
    orc = _Oracle(ps, [0.75], 1.0, 1)
    for t in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        orc.update(ps)
    z = opt.ema_parameters()
    assert z[0].dtype == torch.float64 and opt.optimizer.state[ps[0]]["n"] == 3
    torch.testing.assert_close(z[0], orc.z[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z[1].double(), orc.z[0][1], rtol=1e-5, atol=1e-6)
    back = pickle.loads(pickle.dumps(opt))
    assert back.param_groups is back.optimizer.param_groups
    bps = [p for g in back.param_groups for p in g["params"]]
    for p in bps:
        p.grad = torch.ones_like(p)
    back.step()
    assert back.param_groups[0]["steps"] == 4 and opt.param_groups[0]["steps"] == 3


def test_step_under_torch_compile_is_a_graph_break():
    ps, twin = _params(21, torch.float32), _params(21, torch.float32)
    opt = ek.WithEMA(torch.optim.AdamW(ps, lr=1e-2), ema_decay=0.9)
    ref = ek.WithEMA(torch.optim.AdamW(twin, lr=1e-2), ema_decay=0.9)
    compiled = torch.compile(lambda: opt.step(), backend="eager")
    gen = torch.Generator().manual_seed(22)
    for t in range(2):
        grads = _grads(gen, ps, t)
        _set_grads(ps, grads)
        _set_grads(twin, grads)
        compiled()
        ref.step()
    for a, b in zip(opt.ema_parameters() + ps, ref.ema_parameters() + twin):
        assert torch.equal(a, b)


def test_inner_load_state_dict_directly_and_bad_settings_move_nothing():
    """The inner optimizer's own load_state_dict replaces the groups: the EMA settings come back
    (the defaults) and the clock restarts; a group switched to a bad decay refuses the step
    before the inner step and before its EMA is made."""
    ps = _params(23, torch.float32)
    opt = ek.WithEMA(torch.optim.RMSprop(ps, lr=1e-2), ema_decay=0.5)
    _train(opt, ps, torch.Generator().manual_seed(1), 2)
    opt.optimizer.load_state_dict(torch.optim.RMSprop(ps, lr=1e-2).state_dict())
    before = [p.detach().clone() for p in ps]
    _train(opt, ps, torch.Generator().manual_seed(2), 1)
    g = opt.param_groups[0]
    assert g["ema_decay"] == 0.5 and g["steps"] == 1
    for z, p, b in zip(opt.ema_parameters(), ps, before):
        # restarted from θ before the step, then one EMA step: halfway between the iterates
        torch.testing.assert_close(z, (b + p.detach()) / 2, rtol=0, atol=1e-6)
    a = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [a], "ema_decay": None, "ema_schedule": None})
    opt.param_groups[1]["ema_decay"] = 1.5
    a.grad = torch.ones(3)
    before = a.detach().clone()
    with pytest.raises(ValueError, match="ema_decay"):
        opt.step()
    assert torch.equal(a, before) and a not in opt.state
