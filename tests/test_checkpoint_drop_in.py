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
