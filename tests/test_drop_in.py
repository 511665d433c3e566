"""Drop-in behaviour a user trial and torch's own optimizer suite caught (issue 23): a group's
``ema_decay=None`` against an optimizer-wide schedule, torch's validation messages,
``torch.compile(opt.step, fullgraph=True)``, the ``zero_grad`` profiler range."""
import importlib.util
import os

import pytest
import torch

import ema_kernels as ek

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _load_example(name):
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------ ema_decay=None in a group -------
@pytest.mark.parametrize("cls", [ek.AdamW, ek.SGD])
def test_group_none_wins_over_optimizer_wide_schedule(cls):
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    sched = ek.schedules.cosine(0.9, 1.0, total_steps=100)
    opt = cls([{"params": a.parameters()}, {"params": b.parameters(), "ema_decay": None}],
              lr=0.1, ema_schedule=sched)
    emas = opt.ema_parameters()
    assert [e is None for e in emas] == [False, False, True, True]
    assert all("ema" not in opt.state.get(p, {}) for p in b.parameters())
    b_before = [p.detach().clone() for p in b.parameters()]
    b(a(torch.randn(5, 3))).sum().backward()
    opt.step()
    assert all("ema" not in opt.state.get(p, {}) for p in b.parameters())
    with opt.swap_ema():  # the predictor is not swapped: it has no EMA
        for p, q in zip(b.parameters(), b_before):
            assert not torch.equal(p, q)  # it stepped, and holds its own value
    assert opt.num_emas == 1
    # a group may switch its EMA on later: it starts from the parameters of that moment and
    # follows the (inherited) schedule
    opt.param_groups[1]["ema_decay"] = 0.5
    opt.zero_grad()
    b(a(torch.randn(5, 3))).sum().backward()
    opt.step()
    assert all(e is not None for e in opt.ema_parameters())


def test_byol_example_predictor_keeps_no_ema(monkeypatch):
    """examples/byol.py's own optimizer (ek.LARS, a whole-optimizer ema_schedule, the
    predictor's groups with ema_decay=None): the predictor has no EMA, the online network has."""
    byol = _load_example("byol")
    made = []
    real = ek.LARS

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(byol.ek, "LARS", spy)
    data = byol.make_data(seed=0, n_train=256, probe_per_class=4, n_test=64)
    byol.train(data, kappa=1, rule="rule", base_steps=2, evals=1, seed=0)
    (opt,) = made
    keeps = [g for g in opt.param_groups if g["ema_decay"] is not None]
    none = [g for g in opt.param_groups if g["ema_decay"] is None]
    assert keeps and none  # the online network's groups, the predictor's groups
    online = [p for g in keeps for p in g["params"]]
    predictor = [p for g in none for p in g["params"]]
    assert online and predictor
    flat = [p for g in opt.param_groups for p in g["params"]]
    emas = dict(zip(map(id, flat), opt.ema_parameters()))
    assert all(emas[id(p)] is opt.state[p]["ema"] for p in online)
    assert all(emas[id(p)] is None for p in predictor)
    assert all("ema" not in opt.state.get(p, {}) for p in predictor)


@pytest.mark.parametrize("where", ["defaults", "group"])
def test_none_and_schedule_given_together_is_refused(where):
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    sched = ek.schedules.warmup(0.99)
    with pytest.raises(ValueError, match="ema_decay=None means this group keeps no EMA"):
        if where == "defaults":
            ek.AdamW([p], ema_decay=None, ema_schedule=sched)
        else:
            ek.AdamW([{"params": [p]}, {"params": [q], "ema_decay": None,
                                        "ema_schedule": sched}])


# ------------------------------------------------------------ torch's validation messages -----
PAIRS = {"AdamW": (torch.optim.AdamW, ek.AdamW), "Adam": (torch.optim.Adam, ek.Adam),
         "SGD": (torch.optim.SGD, ek.SGD)}
BAD = {
    "AdamW": [dict(lr=-1e-2), dict(eps=-1), dict(betas=(1.0, 0.0)), dict(betas=(0.9, -0.5)),
              dict(weight_decay=-1), dict(lr=torch.tensor([0.001, 0.001])),
              dict(lr=torch.tensor(0.001), foreach=True),
              dict(betas=(0.9, torch.tensor(0.99))),
              dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True)],
    "Adam": [dict(lr=-1), dict(eps=-1e-8), dict(betas=(0.0, 1.0)), dict(weight_decay=-0.5),
             dict(lr=torch.tensor([0.001, 0.001])), dict(lr=torch.tensor(0.001), foreach=True),
             dict(betas=(torch.tensor(0.9), 0.999))],
    "SGD": [dict(lr=-0.5), dict(momentum=-0.5), dict(weight_decay=-1),
            dict(nesterov=True, momentum=0.0), dict(nesterov=True, momentum=0.9, dampening=0.1),
            dict(lr=torch.tensor([0.001, 0.001]))],
}


@pytest.mark.parametrize("name, kw", [(n, kw) for n, kws in BAD.items() for kw in kws],
                         ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_validation_messages_start_with_torchs(name, kw):
    """Same exception type and torch's exact text first (``Invalid weight_decay value: -1``),
    then ours; at construction and for a param group added later."""
    theirs, ours = PAIRS[name]
    kw = dict(kw)
    if name == "SGD":
        kw.setdefault("lr", 0.1)
    with pytest.raises(Exception) as t:
        theirs([torch.nn.Parameter(torch.zeros(2))], **kw)
    torch_msg = str(t.value)
    with pytest.raises(type(t.value)) as e:
        ours([torch.nn.Parameter(torch.zeros(2))], **kw)
    assert str(e.value).startswith(torch_msg), (str(e.value), torch_msg)
    assert len(str(e.value)) > len(torch_msg)  # and ours says which value and what to do
    opt = ours([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(type(t.value)) as e:
        opt.add_param_group(dict(kw, params=[torch.nn.Parameter(torch.zeros(2))]))
    assert str(e.value).startswith(torch_msg), (str(e.value), torch_msg)


# ------------------------------------------------------------ torch.compile -------------------
def test_compile_fullgraph_step_names_the_deliberate_graph_break():
    """Under dynamo the first thing step() does is the documented graph break: fullgraph=True
    fails with its reason (not with whatever dynamo first trips on), and without fullgraph the
    step runs eagerly, hooks included, with the eager numbers."""
    from ema_kernels.optim.step_hooks import GRAPH_BREAK_REASON
    torch._dynamo.reset()
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = ek.AdamW([p], lr=0.1, ema_decay=0.5)
    p.grad = torch.randn(5)
    before = p.detach().clone()
    with pytest.raises(torch._dynamo.exc.Unsupported) as e:
        torch.compile(opt.step, fullgraph=True, backend="eager")()
    assert "ema_kernels: optimizer.step() is a deliberate graph break" in str(e.value)
    assert GRAPH_BREAK_REASON in str(e.value)
    assert torch.equal(p, before)  # nothing moved

    q = torch.nn.Parameter(before.clone())
    ref = ek.AdamW([q], lr=0.1, ema_decay=0.5)
    q.grad = p.grad.clone()
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    torch.compile(opt.step, backend="eager")()
    ref.step()
    assert calls == [1]
    assert torch.equal(p, q) and torch.equal(opt.ema_parameters()[0], ref.ema_parameters()[0])


# ------------------------------------------------------------ zero_grad's profiler range -------
@pytest.mark.parametrize("cls, torch_cls", [(ek.AdamW, torch.optim.AdamW),
                                            (ek.SGD, torch.optim.SGD)])
def test_zero_grad_profiler_range_like_torchs(cls, torch_cls):
    names = {}
    for c in (cls, torch_cls):
        p = torch.nn.Parameter(torch.randn(3))
        opt = c([p], lr=0.1)
        p.grad = torch.ones(3)
        with torch.profiler.profile() as prof:
            opt.zero_grad()
        names[c] = {e.name for e in prof.events() if e.name.startswith("Optimizer.")}
        assert p.grad is None
    want = f"Optimizer.zero_grad#{cls.__name__}.zero_grad"
    assert want in names[torch_cls]  # torch's name ...
    assert want in names[cls]        # ... and ours


def test_zero_grad_still_compiles_with_fullgraph():
    """The range is opened in eager mode only: zero_grad stays traceable (fullgraph=True)."""
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(4))
    opt = ek.AdamW([p], lr=0.1)
    p.grad = torch.ones(4)
    torch.compile(lambda: opt.zero_grad(), fullgraph=True, backend="eager")()
    assert p.grad is None
