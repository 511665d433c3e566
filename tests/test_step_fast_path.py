"""step()'s steady-state planner (stepping._plan_tables) and the hyperparameter cache.

An ordinary step (every set has a prepared StepTable, no grad_scale/found_inf, no pending clip,
no tensor lr, not capturable) is planned by ``_plan_tables``, a short path through Python; any
other step by ``_plan``. The two must give the same bits, the short path must really be the
path of an ordinary step, and everything it does not handle must reach ``_plan``.
"""
from __future__ import annotations

import pytest
import torch

import ema_kernels as ek
from ema_kernels import _ops
from ema_kernels.optim import stepping

# backend: test_step_tables' fixture ('cuda' = the emulated CUDA kernels on CPU tensors)
from test_step_tables import BACKENDS, _assert_same, _model, _snapshot, backend  # noqa: F401

pytestmark = pytest.mark.skipif(not BACKENDS, reason="the compiled extension is not built")


def _general_only(monkeypatch):
    """Every step planned by _plan (the steady-state planner switched off)."""
    monkeypatch.setattr(stepping.StepMixin, "_plan_tables", lambda self, hps: None)


def _data(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 6, 6, generator=g) for _ in range(steps)]


def _loss(m, x):
    return m(x.to(next(m.parameters()).dtype)).float().pow(2).mean()


CASES = {
    "adamw_schedule": (ek.AdamW, dict(lr=1e-2, weight_decay=0.1,
                                      ema_schedule=ek.schedules.warmup(0.99))),
    "adamw_two_emas_every2_kappa": (ek.AdamW, dict(lr=1e-2, ema_decay=(0.9, 0.99), ema_every=2,
                                                   kappa=2.0, scale_optimizer=True)),
    "adam_amsgrad_bf16_sr": (ek.Adam, dict(lr=1e-2, amsgrad=True, ema_decay=0.8,
                                           stochastic_rounding=True)),
    "sgd_momentum": (ek.SGD, dict(lr=1e-2, momentum=0.9, ema_decay=0.95)),
    "sgd_no_ema": (ek.SGD, dict(lr=1e-2, ema_decay=None)),
}


def _run(case, backend, monkeypatch, general: bool):
    cls, kw = CASES[case]
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    with monkeypatch.context() as mp:
        if general:
            _general_only(mp)
        m = _model(dtype)
        *body, head = list(m.children())
        # two groups with their own lr: the second one's changed by a scheduler every step
        groups = [{"params": [p for mod in body for p in mod.parameters()]},
                  {"params": list(head.parameters()), "lr": 3e-2}]
        opt = cls(groups, backend=backend, **kw)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        for t, x in enumerate(_data(6)):
            opt.zero_grad()
            _loss(m, x).backward()
            opt.step()
            sched.step()
        return _snapshot(m, opt) + [torch.tensor(float(g[k])) for g in opt.param_groups
                                    for k in ("steps", "base_steps", "ema_base_steps")]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
def test_steady_state_planner_equals_the_general_one_bit_for_bit(backend, case, monkeypatch):
    _assert_same(_run(case, backend, monkeypatch, general=False),
                 _run(case, backend, monkeypatch, general=True))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_an_ordinary_step_takes_the_steady_state_planner(backend, monkeypatch):
    m = _model()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9, backend=backend)
    xs = _data(4)
    opt.zero_grad()
    _loss(m, xs[0]).backward()
    opt.step()  # the first step: EMAs start from the parameters, tables built (_plan)

    def refuse(*a, **k):
        raise AssertionError("planned by _plan")
    monkeypatch.setattr(opt, "_plan", refuse)
    for x in xs[1:]:
        opt.zero_grad()
        _loss(m, x).backward()
        opt.step()
    assert int(opt.param_groups[0]["steps"]) == 4


def _counting(monkeypatch):
    calls = {"general": 0}
    plan = stepping.StepMixin._plan

    def counted(self, *a):
        calls["general"] += 1
        return plan(self, *a)
    monkeypatch.setattr(stepping.StepMixin, "_plan", counted)
    return calls


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("change", ["grad_none", "tensor_lr", "grad_scale", "backend_env",
                                    "new_param_data", "load_state_dict"])
def test_what_the_steady_state_planner_does_not_take_reaches_the_general_one(
        backend, change, monkeypatch):
    """Each change below must be planned by _plan (but a parameter's new storage of the same
    layout, which the table follows), with the results of an optimizer that only ever used
    _plan."""
    runs = []
    for general in (False, True):
        with monkeypatch.context() as mp:
            if general:
                _general_only(mp)
            calls = _counting(mp)
            m = _model()
            params = list(m.parameters())
            opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9,
                           backend="auto" if change == "backend_env" else backend)
            if change == "backend_env":
                mp.setenv(_ops.ENV_VAR, backend)
            xs = _data(4)
            for t, x in enumerate(xs):
                opt.zero_grad()
                _loss(m, x).backward()
                kw = {}
                if t == 2:
                    before = calls["general"]
                    if change == "grad_none":
                        params[1].grad = None
                    elif change == "tensor_lr":
                        opt.param_groups[0]["lr"] = torch.tensor(5e-3)
                    elif change == "grad_scale":
                        for p in params:
                            p.grad.mul_(2.0)
                        kw = dict(grad_scale=torch.full((1,), 2.0),
                                  found_inf=torch.zeros(1))
                    elif change == "backend_env":
                        mp.setenv(_ops.ENV_VAR, "reference")
                    elif change == "new_param_data":
                        with torch.no_grad():
                            params[0].data = params[0].detach().clone()
                    elif change == "load_state_dict":
                        opt.load_state_dict(opt.state_dict())
                opt.step(**kw)
                if t == 2 and not general:
                    # p.data = a tensor of the same shape and strides: the table follows it
                    assert calls["general"] == before + (change != "new_param_data"), change
            if change == "backend_env":
                names = {ts.backend_module.NAME for gsets in opt._sets for ts in gsets}
                assert names == {"reference"}, names
            runs.append(_snapshot(m, opt))
    _assert_same(*runs)


# ------------------------------------------------------------------ the hyperparameter cache
def test_unchanged_hyperparameters_are_checked_once():
    opt = ek.AdamW(_model().parameters(), lr=1e-2, ema_decay=0.9)
    g = opt.param_groups[0]
    g["betas"] = [0.9, 0.999]  # a list, unchanged
    hp = opt._step_hparams(0, g)
    # the counters step() advances change every step: not hyperparameters
    g["steps"], g["base_steps"], g["ema_base_steps"] = 7, 7.0, 6.0
    assert opt._step_hparams(0, g) is hp


@pytest.mark.parametrize("change", ["new_lr", "list_in_place", "new_key", "replaced_tuple",
                                    "ema_decay", "kappa"])
def test_a_changed_hyperparameter_is_seen(change):
    opt = ek.AdamW(_model().parameters(), lr=1e-2, ema_decay=0.9)
    g = opt.param_groups[0]
    g["betas"] = [0.9, 0.999]  # a list in the group (construction keeps a tuple)
    hp = opt._step_hparams(0, g)
    assert opt._step_hparams(0, g) is hp
    if change == "new_lr":
        g["lr"] = 2e-2
    elif change == "list_in_place":
        g["betas"][0] = 0.5  # the same list object
    elif change == "new_key":
        g["my_note"] = "x"
    elif change == "replaced_tuple":
        g["betas"] = (0.8, 0.999)
    elif change == "ema_decay":
        g["ema_decay"] = 0.5
    elif change == "kappa":
        g["kappa"] = 4.0
    new = opt._step_hparams(0, g)
    assert new is not hp
    expect = {"new_lr": ("lr", 2e-2), "list_in_place": ("betas", (0.5, 0.999)),
              "new_key": ("lr", 1e-2), "replaced_tuple": ("betas", (0.8, 0.999)),
              "ema_decay": ("ema_sources", (0.5,)), "kappa": ("kappa", 4.0)}[change]
    assert new[expect[0]] == expect[1]
    assert opt._step_hparams(0, g) is new  # and cached again


def test_a_bad_hyperparameter_set_between_steps_raises_before_anything_moves():
    m = _model()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9)
    for x in _data(2):
        opt.zero_grad()
        _loss(m, x).backward()
        opt.step()
    before = _snapshot(m, opt)
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="betas"):
        opt.step()
    _assert_same(before, _snapshot(m, opt))


# ------------------------------------------------------------------ grad mode
@pytest.mark.parametrize("enabled", [True, False])
def test_step_runs_without_grad_and_restores_the_grad_mode(enabled):
    m = _model()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9)
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())  # torch.optim: a closure runs with grad
        opt.zero_grad()
        loss = _loss(m, _data(1)[0])
        loss.backward()
        return loss

    hook = opt.register_step_post_hook(lambda *a: seen.append(torch.is_grad_enabled()))
    with torch.set_grad_enabled(enabled):
        opt.step(closure)
        assert torch.is_grad_enabled() is enabled
        opt.param_groups[0]["lr"] = -1.0
        with pytest.raises(ValueError, match="lr"):
            opt.step()
        assert torch.is_grad_enabled() is enabled  # restored after an error too
    hook.remove()
    assert seen == [True, enabled]  # post-hooks run outside step's no_grad, as in torch
