"""The optimizers against torch.optim plus a float64 EMA (the oracle chain), and the EMA API."""
import copy
import io
import math

import pytest
import torch

import ema_kernels as ek

BACKEND = "reference"


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.LayerNorm(17), torch.nn.Tanh(),
                            torch.nn.Linear(17, 4))
    return m.to(dtype)


def two_groups(model, **second):
    """Weights in one group, biases/LayerNorm in another with its own hyperparameters."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay}, dict(params=rest, **second)]


def loss_fn(model, x):
    return model(x).pow(2).mean() + model(x).sin().sum() * 0.1


def train_step(model, opt, x, zero_to_none=False):
    opt.zero_grad(set_to_none=zero_to_none)
    loss_fn(model, x).backward()
    opt.step()


CASES = {
    "adamw": (torch.optim.AdamW, ek.AdamW,
              dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), dict(lr=1e-2)),
    "adam": (torch.optim.Adam, ek.Adam,
             dict(lr=3e-2, betas=(0.85, 0.995), weight_decay=0.05), dict(weight_decay=0.0)),
    "adam-amsgrad-max": (torch.optim.Adam, ek.Adam,
                         dict(lr=1e-2, amsgrad=True, maximize=True), dict(lr=2e-2)),
    "sgd-nesterov": (torch.optim.SGD, ek.SGD,
                     dict(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=1e-3),
                     dict(momentum=0.5)),
    "sgd-damp-max": (torch.optim.SGD, ek.SGD,
                     dict(lr=5e-2, momentum=0.9, dampening=0.3, maximize=True),
                     dict(momentum=0.0, weight_decay=0.01)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch_and_float64_ema(case):
    tcls, ecls, kw, second = CASES[case]
    rho = 0.9
    ref, ours = make_model(1), make_model(1)
    t_opt = tcls(two_groups(ref, **second), **kw)
    e_opt = ecls(two_groups(ours, **second), ema_decay=rho, backend=BACKEND, **kw)
    params_t = [p for g in t_opt.param_groups for p in g["params"]]
    params_e = [p for g in e_opt.param_groups for p in g["params"]]
    ema64 = [p.detach().double().clone() for p in params_t]
    for step in range(25):
        x = torch.randn(8, 9)
        train_step(ref, t_opt, x)
        train_step(ours, e_opt, x)
        for z, p in zip(ema64, params_t):
            z.mul_(rho).add_(p.detach().double(), alpha=1 - rho)
        for p, q in zip(params_t, params_e):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for z, e in zip(ema64, e_opt.ema_parameters()):
            torch.testing.assert_close(e.double(), z, rtol=1e-5, atol=1e-6)
        for p, q in zip(params_t, params_e):
            for key, val in t_opt.state[p].items():
                if isinstance(val, torch.Tensor):
                    torch.testing.assert_close(e_opt.state[q][key], val, rtol=1e-6, atol=1e-7)


def test_state_keys_match_torch():
    for case in CASES:
        tcls, ecls, kw, second = CASES[case]
        ref, ours = make_model(2), make_model(2)
        t_opt, e_opt = tcls(ref.parameters(), **kw), ecls(ours.parameters(), **kw)
        x = torch.randn(4, 9)
        train_step(ref, t_opt, x)
        train_step(ours, e_opt, x)
        t_sd, e_sd = t_opt.state_dict(), e_opt.state_dict()
        assert set(e_sd["state"]) == set(t_sd["state"]) or not t_sd["state"]
        for k, st in t_sd["state"].items():
            # ours: torch's keys, the EMA, and a step for SGD too (its momentum-init flag)
            assert set(e_sd["state"][k]) == set(st) | {"ema", "step"}, case


def _hand_scaled_adam(kw, kappa, decoupled):
    lr, (b1, b2), eps = kw["lr"], kw["betas"], kw["eps"]
    r = math.sqrt(kappa)
    out = dict(lr=lr * r, betas=(1 - kappa * (1 - b1), 1 - kappa * (1 - b2)), eps=eps / r,
               weight_decay=kw["weight_decay"] * (r if decoupled else 1.0))
    return out


@pytest.mark.parametrize("kappa", [0.5, 4.0])
@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_kappa_scaling_against_hand_scaled_torch(name, kappa):
    rho = 0.95
    base = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    if name == "sgd":
        tkw, ekw, tcls, ecls = dict(lr=1e-2 * kappa, momentum=0.9), dict(lr=1e-2, momentum=0.9), \
            torch.optim.SGD, ek.SGD
    else:
        dec = name == "adamw"
        tcls, ecls = (torch.optim.AdamW, ek.AdamW) if dec else (torch.optim.Adam, ek.Adam)
        tkw, ekw = _hand_scaled_adam(base, kappa, dec), base
    ref, ours = make_model(3), make_model(3)
    t_opt = tcls(ref.parameters(), **tkw)
    e_opt = ecls(ours.parameters(), ema_decay=rho, kappa=kappa, backend=BACKEND, **ekw)
    ema64 = [p.detach().double().clone() for p in ref.parameters()]
    rho_k = rho ** kappa
    for _ in range(12):
        x = torch.randn(8, 9)
        train_step(ref, t_opt, x)
        train_step(ours, e_opt, x)
        for z, p in zip(ema64, ref.parameters()):
            z.mul_(rho_k).add_(p.detach().double(), alpha=1 - rho_k)
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for z, e in zip(ema64, e_opt.ema_parameters()):
        torch.testing.assert_close(e.double(), z, rtol=1e-5, atol=1e-6)


def test_scale_optimizer_false_scales_only_the_ema():
    ref, ours = make_model(4), make_model(4)
    t_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    e_opt = ek.AdamW(ours.parameters(), lr=1e-2, kappa=8, scale_optimizer=False, ema_decay=0.99,
                     backend=BACKEND)
    ema64 = [p.detach().double().clone() for p in ref.parameters()]
    for _ in range(5):
        x = torch.randn(8, 9)
        train_step(ref, t_opt, x)
        train_step(ours, e_opt, x)
        for z, p in zip(ema64, ref.parameters()):
            z.mul_(0.99 ** 8).add_(p.detach().double(), alpha=1 - 0.99 ** 8)
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    for z, e in zip(ema64, e_opt.ema_parameters()):
        torch.testing.assert_close(e.double(), z, rtol=1e-5, atol=1e-6)


def test_progressive_kappa_and_ema_every():
    """κ changes between steps; ema_every=3 raises ρ to the base steps covered (Σκ)."""
    rho, every = 0.9, 3
    kappas = [1, 1, 2, 2, 2, 4, 4, 4, 4]
    model = make_model(5)
    opt = ek.SGD(model.parameters(), lr=1e-2, ema_decay=rho, ema_every=every, backend=BACKEND)
    ema64 = [p.detach().double().clone() for p in model.parameters()]
    covered = 0.0
    before = [e.clone() for e in opt.ema_parameters()]
    for t, k in enumerate(kappas, start=1):
        for g in opt.param_groups:
            g["kappa"] = k
        train_step(model, opt, torch.randn(4, 9))
        covered += k
        now = opt.ema_parameters()
        if t % every == 0:
            w = rho ** covered
            for z, p in zip(ema64, model.parameters()):
                z.mul_(w).add_(p.detach().double(), alpha=1 - w)
            covered = 0.0
        else:  # non-EMA steps leave ζ untouched
            for b, n in zip(before, now):
                assert torch.equal(b, n)
        before = [e.clone() for e in now]
        for z, e in zip(ema64, now):
            torch.testing.assert_close(e.double(), z, rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["base_steps"] == sum(kappas)


def test_polyak_schedule_is_the_exact_running_mean():
    model = make_model(6)
    opt = ek.SGD(model.parameters(), lr=0.1, momentum=0.9,
                 ema_schedule=ek.schedules.polyak(), backend=BACKEND)
    history = []
    for _ in range(10):
        train_step(model, opt, torch.randn(4, 9))
        history.append([p.detach().double().clone() for p in model.parameters()])
        mean = [torch.stack(h).mean(0) for h in zip(*history)]
        for e, m in zip(opt.ema_parameters(), mean):
            torch.testing.assert_close(e.double(), m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sched", [
    ek.schedules.constant(0.9),
    ek.schedules.warmup(0.99, gamma=1.0, power=2 / 3),
    ek.schedules.cosine(0.9, 1.0, total_steps=8),
])
def test_schedules_drive_the_ema(sched):
    kappa = 2.0
    model = make_model(7)
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_schedule=sched, kappa=kappa, backend=BACKEND)
    ema64 = [p.detach().double().clone() for p in model.parameters()]
    s = 0.0
    for _ in range(6):
        train_step(model, opt, torch.randn(4, 9))
        w = sched(s) * sched(s + 1)  # κ=2: the product of the two base steps' decays
        s += kappa
        for z, p in zip(ema64, model.parameters()):
            z.mul_(w).add_(p.detach().double(), alpha=1 - w)
    for z, e in zip(ema64, opt.ema_parameters()):
        torch.testing.assert_close(e.double(), z, rtol=1e-5, atol=1e-6)


def test_schedule_values():
    assert ek.schedules.constant(0.5)(123.0) == 0.5
    w = ek.schedules.warmup(0.999, gamma=1.0, power=2 / 3)
    assert w(0) == 0.0
    assert w(10) == pytest.approx(1 - 11 ** (-2 / 3))
    assert w(1e9) == 0.999
    c = ek.schedules.cosine(0.99, 1.0, total_steps=100)
    assert c(0) == pytest.approx(0.99)
    assert c(50) == pytest.approx(0.995)
    assert c(100) == pytest.approx(1.0) and c(500) == pytest.approx(1.0)
    p = ek.schedules.polyak()
    assert p(0) == 0.0 and p(3) == 0.75
    with pytest.raises(ValueError, match="total_steps"):
        ek.schedules.cosine(0.99)
    with pytest.raises(ValueError, match="rho"):
        ek.schedules.constant(1.5)
    assert "warmup" in repr(w)


def test_ema_none_group_keeps_no_ema():
    model = make_model(8)
    opt = ek.AdamW([{"params": model[0].parameters()},
                    {"params": model[3].parameters(), "ema_decay": None},
                    {"params": model[1].parameters()}], backend=BACKEND)
    emas = opt.ema_parameters()
    assert [e is None for e in emas] == [False, False, True, True, False, False]
    before = [p.detach().clone() for p in model[3].parameters()]
    with opt.swap_ema():
        for p, b in zip(model[3].parameters(), before):
            assert torch.equal(p, b)
    train_step(model, opt, torch.randn(3, 9))


def test_swap_ema_bit_exact_and_step_inside_raises():
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(9, dtype)
        opt = ek.AdamW(model.parameters(), lr=1e-1, ema_decay=0.5, backend=BACKEND)
        for _ in range(3):
            train_step(model, opt, torch.randn(4, 9, dtype=dtype))
        own = [p.detach().clone() for p in model.parameters()]
        emas = [e.clone() for e in opt.ema_parameters()]
        assert not all(torch.equal(o, e.to(dtype)) for o, e in zip(own, emas))
        with opt.swap_ema():
            for p, e in zip(model.parameters(), emas):
                assert torch.equal(p, e.to(dtype))
            with pytest.raises(RuntimeError, match="swap_ema"):
                opt.step()
        for p, o in zip(model.parameters(), own):
            assert torch.equal(p, o)
        with pytest.raises(KeyError):
            with opt.swap_ema():
                raise KeyError("the body failed")
        for p, o in zip(model.parameters(), own):
            assert torch.equal(p, o)


def test_ema_module_is_live_and_buffers_follow():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Linear(6, 2))
    rho = 0.8
    opt = ek.SGD(model.parameters(), lr=0.1, ema_decay=rho, backend=BACKEND)
    teacher = opt.ema_module(model)
    assert type(teacher) is type(model)
    t_params = list(teacher.parameters())
    for tp, e in zip(t_params, opt.ema_parameters()):
        assert tp.data_ptr() == e.data_ptr() and not tp.requires_grad
    mean64 = model[1].running_mean.double().clone()
    for _ in range(3):
        train_step(model, opt, torch.randn(8, 5))  # BN in train mode updates running stats
        mean64.mul_(rho).add_(model[1].running_mean.double(), alpha=1 - rho)
        for tp, e in zip(teacher.parameters(), opt.ema_parameters()):
            assert torch.equal(tp, e)
    torch.testing.assert_close(teacher[1].running_mean.double(), mean64, rtol=1e-5, atol=1e-6)
    # integer buffers are copied (loss_fn runs the model twice per step)
    assert teacher[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 6
    teacher.eval()
    out = teacher(torch.randn(4, 5))
    assert out.shape == (4, 2) and not out.requires_grad


def test_state_dict_resume_is_bit_exact():
    for cls, kw in ((ek.AdamW, dict(lr=1e-2, amsgrad=True)), (ek.SGD, dict(lr=1e-2, momentum=0.9)),
                    (ek.Adam, dict(lr=1e-2, weight_decay=0.01))):
        xs = [torch.randn(4, 9) for _ in range(10)]
        a = make_model(10)
        oa = cls(two_groups(a, ema_decay=0.5), ema_decay=0.9, ema_every=2, kappa=2,
                 ema_schedule=None, backend=BACKEND, **kw)
        for x in xs[:5]:
            train_step(a, oa, x)
        buf = io.BytesIO()
        torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
        ckpt_size = buf.tell()
        buf.seek(0)
        ck = torch.load(buf, weights_only=True)
        b = make_model(11)  # other initial values: everything must come from the checkpoint
        ob = cls(two_groups(b, ema_decay=0.5), ema_decay=0.9, ema_every=2, kappa=2,
                 backend=BACKEND, **kw)
        b.load_state_dict(ck["model"])
        ob.load_state_dict(ck["opt"])
        for x in xs[5:]:
            train_step(a, oa, x)
            train_step(b, ob, x)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
        for p, q in zip(oa.ema_parameters(), ob.ema_parameters()):
            assert torch.equal(p, q)
        n = sum(p.numel() for p in a.parameters())
        assert ckpt_size < 4 * n * 8 + 20000  # copies, not views of whole flat buffers


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_torch_checkpoint_interop_both_ways(name):
    tcls, ecls = (torch.optim.AdamW, ek.AdamW) if name == "adamw" else (torch.optim.SGD, ek.SGD)
    kw = dict(lr=1e-2, momentum=0.9) if name == "sgd" else dict(lr=1e-2)
    xs = [torch.randn(4, 9) for _ in range(8)]
    # torch -> ours
    a = make_model(12)
    ta = tcls(two_groups(a, lr=2e-2), **kw)
    for x in xs[:4]:
        train_step(a, ta, x)
    b = copy.deepcopy(a)
    eb = ecls(two_groups(b, lr=5.0), ema_decay=0.9, backend=BACKEND, **kw)
    eb.load_state_dict(ta.state_dict())
    assert eb.param_groups[1]["lr"] == 2e-2 and eb.param_groups[0]["ema_decay"] == 0.9
    for e, p in zip(eb.ema_parameters(), [p for g in eb.param_groups for p in g["params"]]):
        assert torch.equal(e, p)  # the EMA starts from the current parameters
    for x in xs[4:]:
        train_step(a, ta, x)
        train_step(b, eb, x)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    # ours -> torch
    c = copy.deepcopy(b)
    tc = tcls(two_groups(c, lr=5.0), **kw)
    # state_dict() returns the state tensors themselves (as torch's does) and torch's
    # load_state_dict keeps same-device tensors: copy, or both optimizers share moments
    tc.load_state_dict(copy.deepcopy(eb.state_dict()))
    for x in xs[:3]:
        train_step(b, eb, x)
        train_step(c, tc, x)
    for p, q in zip(b.parameters(), c.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_lr_scheduler_steplr():
    ref, ours = make_model(13), make_model(13)
    t_opt = torch.optim.AdamW(ref.parameters(), lr=1e-1)
    e_opt = ek.AdamW(ours.parameters(), lr=1e-1, backend=BACKEND)
    ts = torch.optim.lr_scheduler.StepLR(t_opt, step_size=3, gamma=0.1)
    es = torch.optim.lr_scheduler.StepLR(e_opt, step_size=3, gamma=0.1)
    for _ in range(8):
        x = torch.randn(4, 9)
        train_step(ref, t_opt, x)
        train_step(ours, e_opt, x)
        ts.step()
        es.step()
    assert e_opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_grad_scaler_inf_step_changes_nothing_then_matches_torch():
    ref, ours = make_model(14), make_model(14)
    t_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    e_opt = ek.AdamW(ours.parameters(), lr=1e-2, ema_decay=0.9, backend=BACKEND)
    ts, es = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu",
                                                                                    init_scale=1024.0)
    for step in range(6):
        x = torch.randn(4, 9)
        for m, o, s in ((ref, t_opt, ts), (ours, e_opt, es)):
            o.zero_grad()
            s.scale(loss_fn(m, x)).backward()
            if step == 2:
                next(m.parameters()).grad[0, 0] = float("inf")
            if m is ours and step == 2:
                before = ([p.detach().clone() for p in m.parameters()],
                          [e.clone() for e in o.ema_parameters()],
                          copy.deepcopy(o.state_dict()))
            s.step(o)
            s.update()
        if step == 2:
            params, emas, sd = before
            assert all(torch.equal(p, q) for p, q in zip(params, ours.parameters()))
            assert all(torch.equal(p, q) for p, q in zip(emas, e_opt.ema_parameters()))
            sd2 = e_opt.state_dict()
            for k, st in sd["state"].items():
                for key, v in st.items():
                    assert torch.equal(v, sd2["state"][k][key]), key
            assert sd["param_groups"][0]["steps"] == sd2["param_groups"][0]["steps"]
        for p, q in zip(ref.parameters(), ours.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert ts.get_scale() == es.get_scale() < 1024.0


def test_found_inf_keyword():
    model = make_model(15)
    opt = ek.SGD(model.parameters(), lr=0.1, momentum=0.9, backend=BACKEND)
    loss_fn(model, torch.randn(4, 9)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(found_inf=torch.ones(1))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    st = opt.state_dict()["state"][0]
    assert opt.param_groups[0]["steps"] == 0 and st["step"] == 0
    assert not st["momentum_buffer"].any()
    opt.step(grad_scale=torch.full((1,), 2.0), found_inf=torch.zeros(1))
    assert opt.param_groups[0]["steps"] == 1


def test_none_and_user_replaced_grads_follow_torch():
    """set_to_none=True / model.zero_grad(): skipped params untouched, others read in place."""
    ref, ours = make_model(16), make_model(16)
    t_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    e_opt = ek.AdamW(ours.parameters(), lr=1e-2, ema_decay=0.9, backend=BACKEND)
    for step in range(6):
        x = torch.randn(4, 9)
        for m, o in ((ref, t_opt), (ours, e_opt)):
            m.zero_grad()  # torch's default: set_to_none=True
            loss_fn(m, x).backward()
            if step % 2 == 0:
                m[3].bias.grad = None  # this parameter skips this step
            if step == 3:
                m[0].weight.grad = m[0].weight.grad * 2.0  # a grad replaced by the user
            o.step()
        for p, q in zip(ref.parameters(), ours.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for p, q in zip(ref.parameters(), ours.parameters()):
            for key, val in t_opt.state[p].items():
                torch.testing.assert_close(e_opt.state[q][key], val, rtol=1e-6, atol=1e-7)
    # zero_grad(set_to_none=False) zeroes the gradients in place, as torch's does
    for m, o in ((ref, t_opt), (ours, e_opt)):
        o.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
        loss_fn(m, torch.ones(4, 9)).backward()
        o.step()
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_flat_layout_and_views():
    model = make_model(17)
    params = list(model.parameters())
    ids = [id(p) for p in params]
    opt = ek.AdamW(model.parameters(), backend=BACKEND, flatten=True)
    assert [id(p) for p in model.parameters()] == ids  # same Parameter objects
    assert all(p.grad is None for p in params)  # p.grad is not touched at construction
    b = opt._flat[0][(params[0].device, params[0].dtype)]
    base = b.param.data_ptr()
    opt.zero_grad(set_to_none=False)  # binds the gradient views
    for p, off in zip(params, b.offsets):
        assert p.data_ptr() == base + off * p.element_size()
        assert (p.data_ptr() % 16) == 0 and p.grad.data_ptr() % 16 == 0
        assert p.grad is not None and p.grad.data_ptr() == b.grad.data_ptr() + off * 4
    loss_fn(model, torch.randn(2, 9)).backward()
    assert b.grad.abs().sum() > 0  # autograd accumulated into the views


def test_frozen_params_are_never_touched():
    model = make_model(18)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    ptr = model[0].weight.data_ptr()
    opt = ek.AdamW(model.parameters(), lr=1e-1, backend=BACKEND)
    train_step(model, opt, torch.randn(4, 9))
    assert model[0].weight.data_ptr() == ptr and torch.equal(model[0].weight, frozen)
    assert torch.equal(opt.ema_parameters()[0], frozen)  # its EMA: the (constant) parameter
    assert "exp_avg" not in opt.state[model[0].weight]  # no moments until it trains


def test_mixed_dtypes_in_one_group():
    model = make_model(19)
    model[3].to(torch.bfloat16)
    opt = ek.SGD(model.parameters(), lr=0.1, ema_decay=0.5, backend=BACKEND)
    assert len(opt._sets[0]) == 2  # one launch per (device, dtype)
    for p in model[3].parameters():
        p.grad = torch.ones_like(p)
    before = model[3].weight.detach().float().clone()
    opt.step()
    expect = (before - 0.1).to(torch.bfloat16)
    assert torch.equal(model[3].weight.detach(), expect)
    torch.testing.assert_close(opt.ema_parameters()[4], 0.5 * before + 0.5 * expect.float())


# ----------------------------------------------------------------------- bad input -----------
def _params():
    return list(make_model(20).parameters())


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(betas=(1.0, 0.999)), ValueError, "betas"),
    (dict(betas=(0.9, -0.1)), ValueError, "betas"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(ema_decay=1.5), ValueError, "ema_decay"),
    (dict(ema_decay=-0.1), ValueError, "ema_decay"),
    (dict(ema_every=0), ValueError, "ema_every"),
    (dict(ema_every=1.5), ValueError, "ema_every"),
    (dict(kappa=0), ValueError, "kappa"),
    (dict(kappa=-2), ValueError, "kappa"),
    (dict(kappa=20), ValueError, "beta1"),
    (dict(ema_schedule=0.99), TypeError, "ema_schedule"),
    (dict(backend="cudnn"), ValueError, "backend"),
    (dict(differentiable=True), RuntimeError, "differentiable"),
])
def test_bad_hyperparameters_raise_and_touch_nothing(kwargs, exc, match):
    params = _params()
    before = [p.detach().clone() for p in params]
    ptrs = [p.data_ptr() for p in params]
    with pytest.raises(exc, match=match):
        ek.AdamW(params, **kwargs)
    assert [p.data_ptr() for p in params] == ptrs  # nothing rebound
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_sgd_bad_hyperparameters():
    with pytest.raises(ValueError, match="nesterov"):
        ek.SGD(_params(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        ek.SGD(_params(), lr=0.1, momentum=-0.5)


def test_bad_params():
    with pytest.raises(ValueError, match="empty"):
        ek.AdamW([])
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="duplicate"):  # as torch: a warning
        ek.AdamW([p, p])
    with pytest.raises(ValueError, match="more than one"):
        ek.AdamW([{"params": [p]}, {"params": [p]}])
    with pytest.raises(TypeError, match="complex"):
        ek.AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(TypeError, match="sets"):
        ek.AdamW([{"params": {p}}])


def test_bad_grads_at_step_and_nothing_changes():
    model = make_model(21)
    opt = ek.AdamW(model.parameters(), backend=BACKEND)
    before = [p.detach().clone() for p in model.parameters()]
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    model[0].weight.grad.data = torch.randn(3, 3)  # torch's own check does not see this
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    model[0].weight.grad_dtype = None  # lets torch accept a grad of another dtype
    model[0].weight.grad = torch.randn(17, 9, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()
    model[0].weight.grad = torch.randn(17, 9).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.param_groups[0]["steps"] == 0
    opt.zero_grad()
    train_step(model, opt, torch.randn(4, 9))
    assert opt.param_groups[0]["steps"] == 1


def test_bad_kappa_at_step_changes_nothing():
    model = make_model(22)
    opt = ek.AdamW(model.parameters(), backend=BACKEND)
    train_step(model, opt, torch.randn(4, 9))
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["kappa"] = 50  # beta1=0.9 -> 1 - 50*0.1 < 0
    with pytest.raises(ValueError, match="beta1"):
        train_step(model, opt, torch.randn(4, 9))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.param_groups[0]["steps"] == 1


def test_stale_storage_is_detected():
    model = make_model(23)
    opt = ek.AdamW(model.parameters(), backend=BACKEND)
    train_step(model, opt, torch.randn(4, 9))
    model.double()  # after a step: the state no longer matches
    with pytest.raises(RuntimeError, match="changed from"):
        opt.step()


def test_accepted_torch_keywords():
    opt = ek.AdamW(_params(), fused=True, foreach=False, backend=BACKEND)
    assert opt.param_groups[0]["fused"] is True
    assert ek.AdamW(_params(), capturable=True).param_groups[0]["capturable"] is True
    opt = ek.AdamW(list(make_model(24).named_parameters()), backend=BACKEND)
    assert opt.param_groups[0]["param_names"][0] == "0.weight"


def test_add_param_group_after_construction():
    model = make_model(25)
    opt = ek.AdamW(model[0].parameters(), lr=1e-2, ema_decay=0.9, backend=BACKEND)
    opt.add_param_group({"params": model[3].parameters(), "lr": 1e-1, "ema_decay": 0.5})
    assert len(opt.ema_parameters()) == 4
    train_step(model, opt, torch.randn(4, 9))
    assert opt.param_groups[1]["steps"] == 1 and opt.state[model[3].weight]["step"] == 1
    with pytest.raises(ValueError, match="ema_decay"):
        opt.add_param_group({"params": model[1].parameters(), "ema_decay": 2.0})
    assert len(opt.param_groups) == 2
