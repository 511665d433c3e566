"""Checkpoints as a resume and torch's suite use them (issue 23): the constructor's EMAs survive
a load, schedules are saved as data (``torch.load(weights_only=True)`` loads every checkpoint)
and rebuilt, state dicts of parameters that never stepped hold what torch's would, and
non-parameter entries of ``opt.state`` pass through as in torch."""
import copy
import io
import warnings

import pytest
import torch

import ema_kernels as ek
from ema_kernels import schedules


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 5, generator=g).to(dtype)).float().pow(2).mean().backward()
        opt.step()


def _round_trip(sd):
    """torch.save, then torch.load with weights_only=True: data only, or it raises."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------- the constructor's EMAs stay ----
def test_adding_emas_and_resuming_keeps_them():
    model = _model()
    one = ek.SGD(model.parameters(), lr=0.1, ema_decay=0.9, backend="reference")
    _train(model, one, steps=3)
    sd = copy.deepcopy(one.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # the parameters now differ from the saved EMA
    two = ek.SGD(model.parameters(), lr=0.1, ema_decay=(0.999, 0.5), backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warning-free
        two.load_state_dict(sd)
    assert two.num_emas == 2
    # EMA 0: the checkpoint's (its decay and tensor); EMA 1: ours, from the current parameters
    assert two.param_groups[0]["ema_decay"] == (0.9, 0.5)
    for z, z_saved in zip(two.ema_parameters(index=0), one.ema_parameters(index=0)):
        assert torch.equal(z, z_saved)
    for z, p in zip(two.ema_parameters(index=1), model.parameters()):
        assert torch.equal(z, p.detach())
    # and both follow their decays from here
    z0 = [z.clone() for z in two.ema_parameters(index=0)]
    z1 = [z.clone() for z in two.ema_parameters(index=1)]
    _train(model, two, steps=1, seed=5)
    for a, b, p in zip(two.ema_parameters(index=0), z0, model.parameters()):
        assert torch.allclose(a, torch.lerp(b, p.detach(), 0.1), rtol=0, atol=1e-6)
    for a, b, p in zip(two.ema_parameters(index=1), z1, model.parameters()):
        assert torch.allclose(a, torch.lerp(b, p.detach(), 0.5), rtol=0, atol=1e-6)


def test_fewer_emas_and_no_ema_groups_keep_the_constructors_structure():
    model = _model()
    three = ek.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                     lr=1e-2, ema_decay=(0.9, 0.99, 0.999), backend="reference")
    _train(model, three, steps=2)
    sd = copy.deepcopy(three.state_dict())
    one = ek.AdamW([{"params": model[0].parameters()},
                    {"params": model[2].parameters(), "ema_decay": None}],
                   lr=1e-2, ema_decay=0.5, backend="reference")
    one.load_state_dict(sd)
    assert one.num_emas == 1
    assert one.param_groups[0]["ema_decay"] == 0.9  # the checkpoint's decay for EMA 0
    assert one.param_groups[1]["ema_decay"] is None  # no EMA stays no EMA
    assert [e is None for e in one.ema_parameters()] == [False, False, True, True]
    assert not any(k.startswith("ema_") for st in one.state.values() for k in st)
    for z, z_saved in zip(one.ema_parameters()[:2], three.ema_parameters(index=0)[:2]):
        assert torch.equal(z, z_saved)
    _train(model, one, steps=1)  # and it trains on


# ------------------------------------------------------------- schedules, as data -------------
SCHEDULES = [
    schedules.constant(0.99),
    schedules.warmup(0.999, gamma=2.0, power=0.75),
    schedules.cosine(0.9, 1.0, total_steps=50),
    schedules.polyak(),
    schedules.power(sigma_rel=0.1),
]


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: type(s).__name__)
def test_builtin_schedules_round_trip_as_data(sched):
    data = schedules.to_data(sched)
    assert data["kind"] == type(sched).__name__
    assert all(isinstance(v, (str, float, int)) for v in data.values())
    back = schedules.from_data(_round_trip(data))
    assert back == sched and type(back) is type(sched)
    for a, b in ((0.0, 1.0), (3.0, 7.5), (10.0, 11.0)):
        assert back.decay(a, b) == sched.decay(a, b)


def test_from_data_names_bad_data():
    with pytest.raises(ValueError, match="unknown"):
        schedules.from_data({"kind": "nope"})
    with pytest.raises(ValueError, match="takes the arguments"):
        schedules.from_data({"kind": "warmup", "rho": 0.9})
    assert schedules.from_data(schedules.to_data(lambda s: 0.9)) is None  # custom


CONFIGS = {
    "adamw-warmup": (ek.AdamW, dict(lr=1e-2, ema_schedule=schedules.warmup(0.99))),
    "adamw-tuple": (ek.AdamW, dict(lr=1e-2, ema_decay=(0.9, 0.99),
                                   ema_schedule=(schedules.power(gamma=3.0), None,
                                                 schedules.polyak()))),
    "adam-amsgrad-cosine": (ek.Adam, dict(lr=1e-2, amsgrad=True, ema_every=2,
                                          ema_schedule=schedules.cosine(0.5, total_steps=9))),
    "sgd-tensor-lr": (ek.SGD, dict(lr=torch.tensor(0.05), momentum=0.9, dampening=0.1,
                                   ema_schedule=schedules.constant(0.8), kappa=2.0)),
    "adamw-sr-bf16": (ek.AdamW, dict(lr=1e-2, stochastic_rounding=True)),
    "adamw-capturable": (ek.AdamW, dict(lr=1e-2, capturable=True, ema_decay=0.9)),
    "sgd-flat": (ek.SGD, dict(lr=0.1, momentum=0.9, flatten=True,
                              ema_schedule=schedules.warmup(0.99))),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_checkpoint_loads_with_weights_only_and_resumes(name):
    """The resume a user writes: a fresh optimizer with default EMA settings (no schedule),
    ``load_state_dict(torch.load(path, weights_only=True))``, and training goes on exactly as
    the uninterrupted run (built-in schedules rebuilt from the checkpoint)."""
    cls, kw = CONFIGS[name]
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    model = _model().to(dtype)
    opt = cls(model.parameters(), backend="reference", **kw)
    _train(model, opt, steps=3)
    sd = _round_trip(opt.state_dict())
    model_b = copy.deepcopy(model)
    plain = {k: v for k, v in kw.items() if k not in ("ema_decay", "ema_schedule")}
    # the structure (how many EMAs) is the constructor's: give the same number
    n = opt.num_emas
    opt_b = cls(model_b.parameters(), backend="reference",
                ema_decay=(0.5,) * n if n > 1 else 0.5, **plain)
    opt_b.load_state_dict(sd)
    for k in range(n):
        assert opt_b.param_groups[0]["ema_schedule"] == opt.param_groups[0]["ema_schedule"]
    _train(model, opt, steps=4, seed=9)
    _train(model_b, opt_b, steps=4, seed=9)
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for k in range(n):
        for z, y in zip(opt.ema_parameters(index=k), opt_b.ema_parameters(index=k)):
            assert torch.equal(z, y), (name, k)


def test_custom_schedule_rule():
    """A user's own callable is not saved (a marker with its repr is): loading keeps the
    schedule the optimizer was built with at that index, and raises if there is none."""
    def mine(s):
        return 0.9

    model = _model()
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_schedule=mine, backend="reference")
    _train(model, opt, steps=2)
    sd = _round_trip(opt.state_dict())
    assert sd["param_groups"][0]["ema_schedule"]["kind"] == "custom"
    assert "mine" in sd["param_groups"][0]["ema_schedule"]["repr"]
    again = ek.AdamW(model.parameters(), lr=1e-2, ema_schedule=mine, backend="reference")
    again.load_state_dict(sd)
    assert again.param_groups[0]["ema_schedule"] is mine
    bare = ek.AdamW(model.parameters(), lr=1e-3, backend="reference")
    before = copy.deepcopy(bare.state_dict())
    with pytest.raises(ValueError, match="custom schedule.*Pass the same ema_schedule"):
        bare.load_state_dict(sd)
    assert bare.param_groups[0]["lr"] == 1e-3 and bare.param_groups[0]["ema_schedule"] is None
    after = bare.state_dict()
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][i][k], v)


# ------------------------------------------------------------- parameters that never stepped --
@pytest.mark.parametrize("dampening, nesterov", [(0.0, False), (0.3, False), (0.0, True)])
def test_sgd_checkpoint_of_an_unstepped_parameter_continues_in_torch(dampening, nesterov):
    """A parameter without a gradient so far: torch.optim.SGD continuing ek's checkpoint (and
    ek continuing torch's) takes exactly the step an uninterrupted torch run takes."""
    torch.manual_seed(0)
    init = [torch.randn(3, 4), torch.randn(5)]
    kw = dict(lr=0.1, momentum=0.9, dampening=dampening, nesterov=nesterov)
    g1 = [torch.randn(3, 4), None]              # p1 steps, p2 has no gradient yet
    g2 = [torch.randn(3, 4), torch.randn(5)]    # then both do

    def run(first, second):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = first(ps, **kw)
        for p, g in zip(ps, g1):
            p.grad = None if g is None else g.clone()
        opt.step()
        sd = _round_trip(opt.state_dict())
        opt2 = second(ps, **kw)
        opt2.load_state_dict(sd)
        for p, g in zip(ps, g2):
            p.grad = g.clone()
        opt2.step()
        return [p.detach() for p in ps], sd

    want, torch_sd = run(torch.optim.SGD, torch.optim.SGD)
    assert 1 not in torch_sd["state"]  # torch holds nothing for p2
    ek_sgd = lambda ps, **k: ek.SGD(ps, backend="reference", **k)  # noqa: E731
    for first, second in ((ek_sgd, torch.optim.SGD), (torch.optim.SGD, ek_sgd),
                          (ek_sgd, ek_sgd)):
        got, sd = run(first, second)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=0, atol=1e-7), (first, second)
        if first is ek_sgd and dampening:
            # no moment torch would read as initialised: p2 holds its EMA and step 0 only
            assert "momentum_buffer" not in sd["state"][1]
            assert "momentum_buffer" in sd["state"][0]


def test_adam_checkpoint_of_an_unstepped_parameter_continues_in_torch():
    """Adam's zero moments with step 0 are torch.optim.Adam's fresh state: saved as they are
    (torch reads a state with an entry as initialised, so leaving them out would break it)."""
    torch.manual_seed(0)
    init = [torch.randn(3, 4), torch.randn(5)]
    grads = [[torch.randn(3, 4), None], [torch.randn(3, 4), torch.randn(5)]]
    out = {}
    for name, first in (("torch", torch.optim.AdamW),
                        ("ek", lambda ps, **k: ek.AdamW(ps, backend="reference", **k))):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = first(ps, lr=0.1)
        for p, g in zip(ps, grads[0]):
            p.grad = None if g is None else g.clone()
        opt.step()
        opt2 = torch.optim.AdamW(ps, lr=0.1)
        opt2.load_state_dict(_round_trip(opt.state_dict()))
        for p, g in zip(ps, grads[1]):
            p.grad = g.clone()
        opt2.step()
        out[name] = [p.detach() for p in ps]
    for a, b in zip(out["ek"], out["torch"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------- non-parameter entries ---------
def _opts():
    return [lambda ps: ek.AdamW(ps, lr=1e-3), lambda ps: ek.Adam(ps, lr=1e-3),
            lambda ps: ek.SGD(ps, lr=1e-3, momentum=0.9)]


@pytest.mark.parametrize("make", _opts(), ids=["AdamW", "Adam", "SGD"])
def test_state_dict_hooks_with_non_parameter_state(make):
    """torch's test_state_dict_pre_hook and test_state_dict_pre_post_hook, and the load
    hooks writing into opt.state: entries that are not a parameter's pass through."""
    param = torch.rand(2, 3, requires_grad=True)
    opt = make([param])

    def pre(optimizer):
        optimizer.state["test"] = 1

    def post(optimizer, state_dict):
        if "test" in state_dict["state"]:
            state_dict["state"].pop("test")
            state_dict["ran_state_dict_pre_hook"] = True
        else:
            state_dict["ran_state_dict_pre_hook"] = False
        return state_dict

    h = opt.register_state_dict_pre_hook(pre)
    sd = opt.state_dict()
    assert sd["state"]["test"] == 1  # torch's test_state_dict_pre_hook
    h2 = opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"]  # ..._pre_post_hook
    h.remove(), h2.remove()

    # load: the checkpoint's non-parameter entries replace ours (torch builds a new state)
    opt.state["mine"] = {"k": 2}
    sd = opt.state_dict()
    assert sd["state"]["mine"] == {"k": 2} and sd["state"]["test"] == 1
    other = make([torch.rand(2, 3, requires_grad=True)])
    other.state["stale"] = 3
    other.load_state_dict(_round_trip(sd))
    assert other.state["mine"] == {"k": 2} and other.state["test"] == 1
    assert "stale" not in other.state

    def load_post(optimizer):
        optimizer.state["ran_load_state_dict_post_hook"] = True

    other.register_load_state_dict_post_hook(load_post)
    other.load_state_dict(other.state_dict())
    assert other.state["ran_load_state_dict_post_hook"] is True
    assert other.state_dict()["state"]["ran_load_state_dict_post_hook"] is True
    # and training goes on with them in place
    param.grad = torch.ones_like(param)
    before = param.detach().clone()
    opt.step()
    assert not torch.equal(param, before) and opt.state["test"] == 1
