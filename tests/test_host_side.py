"""The host side of step() (issue 12): no host read of found_inf / grad_scale / a tensor lr,
skipped steps learnt one step late, capturable lr read on the device, GradScaler tensors per
device, and planning that fails before anything moves."""
import copy

import pytest
import torch

import ema_kernels as ek
from ema_kernels.optim import stepping, tables

_HOST_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__,
               torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__index__}


class NoHostRead(torch.Tensor):
    """A tensor that raises if anything reads its value on the host."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _HOST_READS:
            raise AssertionError(f"step() read a device scalar on the host ({func.__name__})")
        return super().__torch_function__(func, types, args, kwargs or {})


def guarded(value):
    return torch.tensor([float(value)]).as_subclass(NoHostRead)


def test_the_guard_catches_every_host_read():
    t = guarded(1.0)
    for read in (lambda: t.item(), lambda: bool(t), lambda: float(t), lambda: t.tolist()):
        with pytest.raises(AssertionError, match="host"):
            read()


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


CASES = {
    "adamw-warmup": (ek.AdamW, dict(weight_decay=0.1, amsgrad=True, kappa=2.0,
                                    ema_schedule=ek.schedules.warmup(0.99, gamma=1.0))),
    "adam-l2": (ek.Adam, dict(weight_decay=0.05, ema_decay=0.9, ema_every=2)),
    "sgd-momentum": (ek.SGD, dict(momentum=0.9, dampening=0.1, weight_decay=0.01,
                                  ema_schedule=ek.schedules.warmup(0.95))),
}


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_found_inf_steps_are_skipped_without_a_host_read(case, backend, flatten):
    """Steps with found_inf in between (the first one among them) equal an optimizer that
    simply did not take them: parameters, EMA (a warmup schedule), every counter."""
    cls, kw = CASES[case]
    skip_at = {0, 3, 4, 7}
    n_steps = 8
    m_a, m_b = _model(), _model()
    lr_a = guarded(0.03)
    lr_b = torch.tensor([0.03])
    opt_a = cls(m_a.parameters(), lr=lr_a, backend=backend, flatten=flatten, **kw)
    opt_b = cls(m_b.parameters(), lr=lr_b, backend=backend, flatten=flatten, **kw)
    g = torch.Generator().manual_seed(3)
    scale = 8.0
    for t in range(n_steps):
        grads = [torch.randn(p.shape, generator=g) for p in m_a.parameters()]
        skipped = t in skip_at
        for i, (p, gr) in enumerate(zip(m_a.parameters(), grads)):
            bad = gr.clone()
            if skipped:
                bad.view(-1)[0] = float("inf")
            p.grad = None if (t == 5 and i == 1) else bad * scale
        lr_a.copy_(torch.tensor([0.03 / (1 + t)]))  # a scheduler writing the tensor lr
        opt_a.step(grad_scale=guarded(scale), found_inf=guarded(1.0 if skipped else 0.0))
        if not skipped:
            for i, (p, gr) in enumerate(zip(m_b.parameters(), grads)):
                p.grad = None if (t == 5 and i == 1) else gr * scale
            lr_b.copy_(torch.tensor([0.03 / (1 + t)]))
            opt_b.step(grad_scale=torch.tensor([scale]), found_inf=torch.zeros(1))
    # the last step was skipped: anything reading the counters learns it first
    assert n_steps - 1 in skip_at
    for p, q in zip(m_a.parameters(), m_b.parameters()):
        assert torch.equal(p, q)
    for z, y in zip(opt_a.ema_parameters(), opt_b.ema_parameters()):
        assert torch.equal(z, y)
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    for ga, gb in zip(sd_a["param_groups"], sd_b["param_groups"]):
        for k in ("steps", "base_steps", "ema_base_steps"):
            assert ga[k] == gb[k], k
    for k in sd_b["state"]:
        for role, v in sd_b["state"][k].items():
            assert torch.equal(sd_a["state"][k][role], v), (k, role)
    assert sd_a["param_groups"][0]["steps"] == n_steps - len(skip_at)


def test_pickling_and_state_dict_settle_a_pending_skip():
    m = _model()
    opt = ek.AdamW(m.parameters(), lr=1e-2, backend="cpp")
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step(found_inf=torch.ones(1), grad_scale=torch.ones(1))
    clone = copy.deepcopy(opt)
    assert clone.param_groups[0]["steps"] == 1
    assert opt.state_dict()["param_groups"][0]["steps"] == 1
    assert {float(s["step"]) for s in opt.state.values()} == {1.0}


def test_grad_scale_must_be_a_scalar_tensor_and_fails_before_anything_moves():
    m = _model()
    opt = ek.AdamW(m.parameters(), lr=1e-2, backend="cpp")
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="grad_scale must have exactly one element"):
        opt.step(grad_scale=torch.ones(2))
    with pytest.raises(TypeError, match="found_inf must be a one-element"):
        opt.step(found_inf=1.0)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert opt.param_groups[0]["steps"] == 0


@pytest.mark.parametrize("where", ["plan", "launch"])
def test_a_failure_in_the_second_group_leaves_the_first_group_and_counters(where, monkeypatch):
    m = _model()
    params = list(m.parameters())
    opt = ek.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2, backend="cpp",
                   ema_decay=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    emas = [z.clone() for z in opt.ema_parameters()]
    counters = [{k: g[k] for k in ("steps", "base_steps", "ema_base_steps")}
                for g in opt.param_groups]
    steps = [float(s["step"]) for s in opt.state.values()]
    if where == "plan":
        real = opt._plan_set

        def plan_set(ts, gi, group):
            if gi == 1:
                raise RuntimeError("injected planning failure")
            return real(ts, gi, group)
        monkeypatch.setattr(opt, "_plan_set", plan_set)
        # ... and where the set is planned in C++ (the StepTable path, cpp backend)
        real_ready, second = tables.ready, opt._sets[1]

        def ready(table, ts):
            if any(ts is s for s in second):
                raise RuntimeError("injected planning failure")
            return real_ready(table, ts)
        monkeypatch.setattr(tables, "ready", ready)
    else:
        real = opt._run_set

        def run_set(group, *a):
            if group is opt.param_groups[1]:
                raise RuntimeError("injected launch failure")
            return real(group, *a)
        monkeypatch.setattr(opt, "_run_set", run_set)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step(grad_scale=torch.ones(1), found_inf=torch.zeros(1))
    assert [{k: g[k] for k in counters[0]} for g in opt.param_groups] == counters
    if where == "plan":  # planning fails before anything moves
        assert all(torch.equal(p, q) for p, q in zip(params, before))
        assert all(torch.equal(z, y) for z, y in zip(opt.ema_parameters(), emas))
        assert [float(s["step"]) for s in opt.state.values()] == steps


# Tensor lr on triton: the same model stepped with a float lr and with a guarded tensor lr that
# holds the same float32 value (powers of two, so the float path's double lr is that value too:
# every per-step scalar is then the same double, and the kernels' math the same).
TRITON_LR_CASES = {
    "adamw-amsgrad-2emas": (ek.AdamW, dict(weight_decay=0.1, amsgrad=True, kappa=4.0,
                                           ema_decay=(0.9, 0.5))),
    "adam-l2-maximize": (ek.Adam, dict(weight_decay=0.05, maximize=True, ema_decay=0.9,
                                       ema_every=2)),
    "sgd-nesterov": (ek.SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.01,
                                  ema_schedule=ek.schedules.warmup(0.95))),
    "sgd-plain": (ek.SGD, dict(ema_decay=None)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("case", list(TRITON_LR_CASES))
def test_triton_tensor_lr_is_read_on_the_device_and_equals_the_float_lr(case, flatten, dtype):
    """Issue 12 on triton: a tensor lr (changed between steps, as a scheduler does) is read by
    the kernels, never on the host, and the step equals the float-lr step bit for bit."""
    cls, kw = TRITON_LR_CASES[case]
    models = [_model().to(dtype), _model().to(dtype)]
    lr_t = guarded(2.0 ** -6)
    opt_t = cls(models[0].parameters(), lr=lr_t, backend="triton", flatten=flatten, **kw)
    opt_f = cls(models[1].parameters(), lr=2.0 ** -6, backend="triton", flatten=flatten, **kw)
    g = torch.Generator().manual_seed(4)
    for t in range(5):
        grads = [torch.randn(p.shape, generator=g).to(dtype) for p in models[0].parameters()]
        lr = 2.0 ** -(6 + t)
        lr_t.copy_(torch.tensor([lr]))
        opt_f.param_groups[0]["lr"] = lr
        skip = t == 2
        for m, o in zip(models, (opt_t, opt_f)):
            for i, (p, gr) in enumerate(zip(m.parameters(), grads)):
                # one parameter without a gradient on one step: the EMA-only path too
                p.grad = None if (t == 3 and i == 1) else gr.clone()
            fi = guarded(1.0 if skip else 0.0) if o is opt_t else \
                torch.tensor([1.0 if skip else 0.0])
            o.step(found_inf=fi)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)
    for k in range(opt_f.num_emas):
        for z, y in zip(opt_t.ema_parameters(k), opt_f.ema_parameters(k)):
            assert (z is None and y is None) or torch.equal(z, y)
    sd_t, sd_f = opt_t.state_dict(), opt_f.state_dict()
    for k in sd_f["state"]:
        for role, v in sd_f["state"][k].items():
            assert torch.equal(sd_t["state"][k][role], v), (k, role)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("cls,kw", [
    (ek.AdamW, dict(weight_decay=0.1, ema_decay=0.9, kappa=2.0)),
    (ek.SGD, dict(momentum=0.9, ema_decay=0.8)),
])
def test_capturable_tensor_lr_changed_between_steps_equals_non_capturable(cls, kw, backend):
    models = [_model(), _model()]
    # capturable=True's lr is guarded: a host read of it anywhere in step() fails the test
    lrs = [guarded(0.05), torch.tensor([0.05])]
    opts = [cls(m.parameters(), lr=lr, capturable=c, backend=backend, **kw)
            for m, lr, c in zip(models, lrs, (True, False))]
    g = torch.Generator().manual_seed(0)
    for t in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in models[0].parameters()]
        for m, lr, o in zip(models, lrs, opts):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            lr.fill_(0.05 * 0.5 ** t)
            o.step()
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for z, y in zip(*(o.ema_parameters() for o in opts)):
        torch.testing.assert_close(z, y, rtol=1e-6, atol=1e-7)


def test_capturable_float_lr_follows_a_scheduler_and_is_not_written_while_capturing(
        monkeypatch):
    m_c, m_h = _model(), _model()
    o_c = ek.AdamW(m_c.parameters(), lr=0.05, capturable=True, backend="cpp")
    o_h = ek.AdamW(m_h.parameters(), lr=0.05, backend="cpp")
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (o_c, o_h)]
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in m_c.parameters()]
        for m, o, s in zip((m_c, m_h), (o_c, o_h), scheds):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            o.step()
            s.step()
    for p, q in zip(m_c.parameters(), m_h.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # Inside a capture the device lr is left alone (a fill would be recorded into the graph
    # and replayed with the capture-time value forever).
    cap_lr = o_c._sets[0][0].cap["lr"]
    seen = cap_lr.clone()
    o_c.param_groups[0]["lr"] = 123.0
    monkeypatch.setattr(stepping, "_capturing", lambda: True)
    o_c.step()
    assert torch.equal(cap_lr, seen)


def test_capturable_eager_steps_fill_the_device_scalars_only_when_they_change(monkeypatch):
    """lr and the EMA weights are written into their device scalars when their host values
    change, not every step (each fill is a kernel launch on a GPU); the results stay the
    host path's."""
    filled = []
    real = stepping._fill_weights
    monkeypatch.setattr(stepping, "_fill_weights",
                        lambda t, w: filled.append(tuple(w)) or real(t, w))
    m_c, m_h = _model(), _model()
    o_c = ek.AdamW(m_c.parameters(), lr=0.05, ema_decay=0.9, capturable=True, backend="cpp")
    o_h = ek.AdamW(m_h.parameters(), lr=0.05, ema_decay=0.9, backend="cpp")
    g = torch.Generator().manual_seed(3)
    for t in range(6):
        if t == 3:
            for o in (o_c, o_h):
                o.param_groups[0]["lr"] = 0.02
        grads = [torch.randn(p.shape, generator=g) for p in m_c.parameters()]
        for m, o in ((m_c, o_c), (m_h, o_h)):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            o.step()
    # one set: lr 0.05 then 0.02, and the constant EMA weight once
    assert len(filled) == 3 and (0.05,) in filled and (0.02,) in filled
    assert [w for w in filled if w not in ((0.05,), (0.02,))] == [(pytest.approx(0.1),)]
    for p, q in zip(m_c.parameters(), m_h.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for z, y in zip(o_c.ema_parameters(), o_h.ema_parameters()):
        torch.testing.assert_close(z, y, rtol=1e-6, atol=1e-7)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_backend(backend):
    if backend not in ek.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available on this GPU machine: "
                    f"{ek.available_backends('cuda')}")
    return backend


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_captured_step_replays_with_the_current_tensor_lr(backend):
    m = _model().cuda()
    lr = torch.tensor([0.01], device="cuda")
    opt = ek.AdamW(m.parameters(), lr=lr, capturable=True, ema_decay=0.9,
                   backend=_gpu_backend(backend))
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    lr.fill_(0.0)
    before = [p.detach().clone() for p in m.parameters()]
    graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q)  # lr 0 (and weight decay lr·λ = 0): θ unchanged
    lr.fill_(0.01)
    graph.replay()
    torch.cuda.synchronize()
    assert any(not torch.equal(p, q) for p, q in zip(m.parameters(), before))


@gpu
def test_gpu_no_sync_with_a_grad_scaler():
    m = _model().cuda()
    opt = ek.AdamW(m.parameters(), lr=1e-3, ema_schedule=ek.schedules.warmup(0.999))
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(16, 5, device="cuda")
    for _ in range(3):  # warm up (first-use allocations, lazy inits)
        opt.zero_grad()
        scaler.scale(m(x).sum()).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(100):
            opt.zero_grad()
            scaler.scale(m(x).sum()).backward()
            opt.step(grad_scale=scaler._scale, found_inf=torch.zeros(1, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_gpu_grad_scaler_tensors_reach_every_device():
    """Parameters on the CPU and on a GPU, GradScaler tensors on the GPU: each set's kernel
    gets them on its own device."""
    cpu_p = torch.nn.Parameter(torch.randn(5))
    gpu_p = torch.nn.Parameter(torch.randn(5, device="cuda"))
    ref = [cpu_p.detach().clone(), gpu_p.detach().clone()]
    opt = ek.AdamW([{"params": [cpu_p]}, {"params": [gpu_p]}], lr=1e-2)
    g = [torch.randn(5), torch.randn(5, device="cuda")]
    cpu_p.grad, gpu_p.grad = g[0] * 4, g[1] * 4
    opt.step(grad_scale=torch.full((1,), 4.0, device="cuda"),
             found_inf=torch.zeros(1, device="cuda"))
    r0, r1 = torch.nn.Parameter(ref[0]), torch.nn.Parameter(ref[1])
    r0.grad, r1.grad = g[0], g[1]
    ek.AdamW([{"params": [r0]}, {"params": [r1]}], lr=1e-2).step()
    torch.testing.assert_close(cpu_p, r0)
    torch.testing.assert_close(gpu_p, r1)
