"""The user's tensors stay the user's: torch.optim's semantics in both layouts (issue 11).

Every test compares against torch.optim (+ a float64 EMA) wherever torch has the behaviour.
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
import weakref

import pytest
import torch

import ema_kernels as ek

LAYOUTS = [False, True]  # flatten


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _loss(model, x):
    return model(x).pow(2).mean()


def _close(a, b, tol=1e-6):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach().double(), y.detach().double(), rtol=tol, atol=tol)


class _Ema64:
    """The float64 oracle of a constant-ρ EMA."""

    def __init__(self, params, rho):
        self.z = [p.detach().double().clone() for p in params]
        self.rho = rho

    def update(self, params):
        for z, p in zip(self.z, params):
            z.mul_(self.rho).add_(p.detach().double(), alpha=1 - self.rho)


@pytest.mark.parametrize("flatten", LAYOUTS)
def test_grad_untouched_at_construction_and_zero_grad_default_none(flatten):
    m = _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2, flatten=flatten)
    assert all(p.grad is None for p in m.parameters())
    _loss(m, torch.randn(4, 5)).backward()
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("flatten", LAYOUTS)
def test_frozen_at_construction_then_unfrozen_trains_like_torch(flatten):
    m, t = _mlp(), _mlp()
    for mm in (m, t):
        mm[0].requires_grad_(False)  # a frozen backbone
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9, flatten=flatten)
    ref = torch.optim.AdamW(t.parameters(), lr=1e-2)
    ema = _Ema64(t.parameters(), 0.9)
    g = torch.Generator().manual_seed(1)
    for it in range(6):
        if it == 3:
            for mm in (m, t):
                mm[0].requires_grad_(True)  # fine-tuning: unfreeze the backbone
        x = torch.randn(8, 5, generator=g)
        for mm, o in ((m, opt), (t, ref)):
            o.zero_grad()
            _loss(mm, x).backward()
            o.step()
        ema.update(t.parameters())
    assert (m[0].weight - _mlp()[0].weight).abs().max() > 1e-3  # it did train
    _close(m.parameters(), t.parameters())
    _close(opt.ema_parameters(), ema.z)


@pytest.mark.parametrize("flatten", LAYOUTS)
def test_frozen_mid_run_does_not_move(flatten):
    m, t = _mlp(), _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, flatten=flatten)
    ref = torch.optim.AdamW(t.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(2)
    for it in range(5):
        if it == 2:
            for mm in (m, t):
                mm[2].requires_grad_(False)
            frozen = m[2].weight.detach().clone()
        x = torch.randn(8, 5, generator=g)
        for mm, o in ((m, opt), (t, ref)):
            o.zero_grad()
            _loss(mm, x).backward()
            o.step()
    assert torch.equal(m[2].weight, frozen)
    _close(m.parameters(), t.parameters())


class _TwoBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x, use_b):
        y = self.a(x)
        return (self.b(y) if use_b else y).pow(2).mean()


@pytest.mark.parametrize("flatten", LAYOUTS)
def test_unused_branch_not_moved_like_torch(flatten):
    m, t = _TwoBranch(), _TwoBranch()
    opt = ek.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, ema_decay=0.8, flatten=flatten)
    ref = torch.optim.AdamW(t.parameters(), lr=1e-2, weight_decay=0.1)
    ema = _Ema64(t.parameters(), 0.8)
    b0 = m.b.weight.detach().clone()
    g = torch.Generator().manual_seed(4)
    for it, use_b in enumerate([False, True, False, True, True]):
        x = torch.randn(6, 4, generator=g)
        for mm, o in ((m, opt), (t, ref)):
            o.zero_grad()
            mm(x, use_b).backward()
            o.step()
        ema.update(t.parameters())
        if it == 0:
            assert torch.equal(m.b.weight, b0)  # no gradient on the first step: not moved
    _close(m.parameters(), t.parameters())
    _close(opt.ema_parameters(), ema.z)
    # per-parameter step counts as torch keeps them
    assert float(opt.state[m.b.weight]["step"]) == float(ref.state[t.b.weight]["step"]) == 3


_RESUME = textwrap.dedent("""
    import sys, torch, ema_kernels as ek
    sys.path.insert(0, {tests!r})
    from test_layout_semantics import _TwoBranch
    m = _TwoBranch()
    opt = ek.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, ema_decay=0.8, flatten={flatten})
    ck = torch.load({path!r}, weights_only=False)
    m.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"])
    g = torch.Generator().manual_seed(5)
    for it, use_b in enumerate({uses!r}):
        x = torch.randn(6, 4, generator=g)
        if it < {k}:
            continue
        opt.zero_grad(); m(x, use_b).backward(); opt.step()
    torch.save({{"params": [p.detach() for p in m.parameters()],
                "ema": [z.detach() for z in opt.ema_parameters()]}}, {out!r})
""")


@pytest.mark.parametrize("flatten", LAYOUTS)
def test_resume_in_new_process_bit_exact(tmp_path, flatten):
    uses = [True, False, True, False, False, True, True, False]
    k = 3
    m = _TwoBranch()
    opt = ek.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, ema_decay=0.8, flatten=flatten)
    g = torch.Generator().manual_seed(5)
    for it, use_b in enumerate(uses):
        x = torch.randn(6, 4, generator=g)
        if it == k:
            torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
        opt.zero_grad()
        m(x, use_b).backward()
        opt.step()
    code = _RESUME.format(tests=os.path.dirname(__file__), flatten=flatten,
                          path=str(tmp_path / "ck.pt"), uses=uses, k=k,
                          out=str(tmp_path / "out.pt"))
    subprocess.run([sys.executable, "-c", code], check=True)
    out = torch.load(tmp_path / "out.pt")
    for a, b in zip(m.parameters(), out["params"]):
        assert torch.equal(a.detach(), b)
    for a, b in zip(opt.ema_parameters(), out["ema"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("flatten", LAYOUTS)
def test_channels_last_cnn_like_torch_and_kept(flatten):
    def net():
        torch.manual_seed(6)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                   torch.nn.Conv2d(8, 4, 3)).to(memory_format=torch.channels_last)
    m, t = net(), net()
    opt = ek.SGD(m.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-3, ema_decay=0.9,
                 flatten=flatten)
    ref = torch.optim.SGD(t.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-3)
    ema = _Ema64(t.parameters(), 0.9)
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        x = torch.randn(2, 3, 11, 11, generator=g).to(memory_format=torch.channels_last)
        for mm, o in ((m, opt), (t, ref)):
            o.zero_grad()
            mm(x).pow(2).mean().backward()
            o.step()
        ema.update(t.parameters())
    _close(m.parameters(), t.parameters())
    _close(opt.ema_parameters(), ema.z)
    w = m[0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    z = opt.ema_parameters()[0]
    assert z.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[w]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)


def test_strided_parameter_and_grad_layouts():
    """A parameter that is a strided view (not dense) and gradients in other layouts work."""
    base = torch.randn(6, 8)
    p = torch.nn.Parameter(base[:, ::2])  # shares base's storage, not dense
    q = torch.nn.Parameter(torch.randn(5, 3).t())  # dense, transposed
    p2, q2 = (torch.nn.Parameter(t.detach().clone()) for t in (p, q))
    opt = ek.Adam([p, q], lr=1e-2, weight_decay=0.1, ema_decay=0.9)
    ref = torch.optim.Adam([p2, q2], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        gp = torch.randn(6, 4, generator=g)
        gq = torch.randn(3, 5, generator=g)
        p.grad, q.grad = gp.t().contiguous().t(), gq.contiguous()  # odd strides for p's grad
        p2.grad, q2.grad = gp.clone(), gq.clone()
        opt.step()
        ref.step()
    _close([p, q], [p2, q2])
    assert p.data_ptr() == base.data_ptr()  # still the user's storage


def test_safetensors_save_model_and_teacher_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    m = _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9)
    teacher = opt.ema_module(m)
    for _ in range(2):
        opt.zero_grad()
        _loss(m, torch.randn(4, 5)).backward()
        opt.step()
    st.save_model(m, str(tmp_path / "m.safetensors"))
    st.save_model(teacher, str(tmp_path / "t.safetensors"))
    m2, t2 = _mlp(1), _mlp(2)
    st.load_model(m2, str(tmp_path / "m.safetensors"))
    st.load_model(t2, str(tmp_path / "t.safetensors"))
    _close(m2.parameters(), m.parameters(), 0)
    _close(t2.parameters(), opt.ema_parameters(), 0)


def test_submodule_save_writes_only_the_submodule(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 10))
    ek.AdamW(model.parameters(), lr=1e-3, ema_decay=0.99)
    torch.save(model[1].state_dict(), tmp_path / "head.pt")
    size = os.path.getsize(tmp_path / "head.pt")
    assert size < 40_000, size  # 5130 floats = 20.5 KB, not the 1 MB model


@pytest.mark.parametrize("flatten", LAYOUTS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_train_on_identically(flatten, how):
    m = _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9, flatten=flatten,
                   ema_schedule=ek.schedules.warmup(0.95))

    def run(mm, oo, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(3):
            oo.zero_grad(set_to_none=not flatten)
            _loss(mm, torch.randn(4, 5, generator=g)).backward()
            oo.step()
    run(m, opt, 0)
    if how == "deepcopy":
        m2, o2 = copy.deepcopy((m, opt))
    elif how == "pickle":
        m2, o2 = pickle.loads(pickle.dumps((m, opt)))
    else:
        buf = io.BytesIO()
        torch.save((m, opt), buf)
        buf.seek(0)
        m2, o2 = torch.load(buf, weights_only=False)
    assert all(p2 is not p for p2, p in zip(m2.parameters(), m.parameters()))
    run(m, opt, 1)
    run(m2, o2, 1)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.ema_parameters(), o2.ema_parameters()):
        assert torch.equal(a, b)
    # the copy's state belongs to the copy's parameters
    assert set(o2.state) == set(m2.parameters())


def test_schedules_pickle_with_readable_repr():
    for s in (ek.schedules.warmup(0.999), ek.schedules.cosine(0.99, 1.0, total_steps=10),
              ek.schedules.polyak(), ek.schedules.constant(0.9)):
        s2 = pickle.loads(pickle.dumps(s))
        assert s2(3.0) == s(3.0) and "(" in repr(s)


def test_every_torch_hook_is_called():
    m = _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        sd = dict(sd)
        sd["extra"] = 1
        return sd
    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        calls.append("load_pre")
        sd = dict(sd)
        sd["param_groups"] = [dict(g, lr=0.5) for g in sd["param_groups"]]
        return sd
    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    _loss(m, torch.randn(3, 5)).backward()
    opt.step()
    sd = opt.state_dict()
    assert sd["extra"] == 1  # the post-hook's return value replaces the dict
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5  # the pre-hook's return value is what loads
    assert calls == ["step_pre", "step_post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_param_names_kept_like_torch():
    m = _mlp()
    opt = ek.AdamW(m.named_parameters(), lr=1e-2)
    ref = torch.optim.AdamW(_mlp().named_parameters(), lr=1e-2)
    names = [n for n, _ in m.named_parameters()]
    assert opt.param_groups[0]["param_names"] == names
    assert opt.state_dict()["param_groups"][0]["param_names"] == \
        ref.state_dict()["param_groups"][0]["param_names"]
    sd = opt.state_dict()
    sd["param_groups"][0]["param_names"] = [f"x.{n}" for n in names]
    opt.load_state_dict(sd)
    ref_sd = ref.state_dict()
    ref_sd["param_groups"][0]["param_names"] = [f"x.{n}" for n in names]
    ref.load_state_dict(ref_sd)
    assert opt.param_groups[0]["param_names"] == ref.param_groups[0]["param_names"]


def test_duplicate_params_numbered_like_torch():
    a, b = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(3))
    with warnings.catch_warnings(record=True) as w_ours:
        warnings.simplefilter("always")
        ours = ek.AdamW([a, b, a], lr=1e-2)
    with warnings.catch_warnings(record=True) as w_torch:
        warnings.simplefilter("always")
        theirs = torch.optim.AdamW([a, b, a], lr=1e-2)
    assert len(w_ours) == len(w_torch) == 1
    assert ours.state_dict()["param_groups"][0]["params"] == \
        theirs.state_dict()["param_groups"][0]["params"]


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test compares exception types
        return type(e)
    return None


@pytest.mark.parametrize("case", [
    "bare tensor", "empty", "set", "non-leaf", "not a tensor", "two groups share",
    "names missing", "named and unnamed groups"])
def test_validation_parity_with_torch(case):
    p, q = torch.nn.Parameter(torch.randn(2)), torch.nn.Parameter(torch.randn(2))
    inputs = {
        "bare tensor": lambda: p,
        "empty": lambda: [],
        "set": lambda: [{"params": {p}}],
        "non-leaf": lambda: [p * 2],
        "not a tensor": lambda: [p, 3],
        "two groups share": lambda: [{"params": [p]}, {"params": [p, q]}],
        "names missing": lambda: [("a", p), q],
        "named and unnamed groups": lambda: [{"params": [("a", p)]}, {"params": [q]}],
    }[case]
    theirs = _raises(lambda: torch.optim.AdamW(inputs(), lr=1e-2))
    ours = _raises(lambda: ek.AdamW(inputs(), lr=1e-2))
    assert theirs is not None
    assert ours is theirs, (case, ours, theirs)


def test_state_clear_means_fresh_state():
    m = _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9)
    t = copy.deepcopy(m)
    for _ in range(2):
        opt.zero_grad()
        _loss(m, torch.randn(4, 5)).backward()
        opt.step()
    opt.state.clear()
    t.load_state_dict(m.state_dict())
    ref = torch.optim.AdamW(t.parameters(), lr=1e-2)
    x = torch.randn(4, 5)
    for mm, o in ((m, opt), (t, ref)):
        o.zero_grad()
        _loss(mm, x).backward()
        o.step()
    _close(m.parameters(), t.parameters())
    assert float(opt.state[m[0].weight]["step"]) == 1.0


def test_teachers_are_held_weakly():
    import gc
    m = _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9)
    refs = []
    for _ in range(1000):
        t = opt.ema_module(m)
        refs.append(weakref.ref(t))
        del t
    gc.collect()
    assert all(r() is None for r in refs)
    _loss(m, torch.randn(4, 5)).backward()
    opt.step()
    assert opt._teachers == []  # nothing is kept for the dropped teachers


def test_teacher_buffers_follow_ema():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = ek.SGD(m.parameters(), lr=1e-2, ema_decay=0.5)
    teacher = opt.ema_module(m)
    rm0 = teacher[1].running_mean.clone()
    m(torch.randn(8, 3)).sum().backward()
    opt.step()
    torch.testing.assert_close(teacher[1].running_mean, rm0.lerp(m[1].running_mean, 0.5))
    assert torch.equal(teacher[1].num_batches_tracked, m[1].num_batches_tracked)


@pytest.mark.parametrize("flatten", LAYOUTS)
def test_ema_switched_on_later_starts_from_parameters(flatten):
    m = _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=None, flatten=flatten)
    for _ in range(2):
        opt.zero_grad()
        _loss(m, torch.randn(4, 5)).backward()
        opt.step()
    assert opt.ema_parameters() == [None] * 4
    start = [p.detach().clone() for p in m.parameters()]
    opt.param_groups[0]["ema_decay"] = 0.9
    opt.zero_grad()
    _loss(m, torch.randn(4, 5)).backward()
    opt.step()
    for z, s, p in zip(opt.ema_parameters(), start, m.parameters()):
        torch.testing.assert_close(z, 0.9 * s + 0.1 * p.detach())
    opt.param_groups[0]["ema_decay"] = None  # and off again
    _loss(m, torch.randn(4, 5)).backward()
    opt.step()
    assert opt.ema_parameters() == [None] * 4


def test_cast_before_first_step_follows_after_raises():
    m = _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9)
    m.to(torch.float64)  # before the first step: the state follows, as with torch.optim
    _loss(m, torch.randn(4, 5, dtype=torch.float64)).backward()
    opt.step()
    assert opt.state[m[0].weight]["exp_avg"].dtype == torch.float64
    assert opt.ema_parameters()[0].dtype == torch.float64
    m.to(torch.float32)
    _loss(m, torch.randn(4, 5)).backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 changed"):
        opt.step()
    for a, b in zip(m.parameters(), before):
        assert torch.equal(a, b)


def _counting_backend():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend, graphs


def test_compiled_training_step_matches_eager_bounded_graphs():
    torch._dynamo.reset()
    m, t = _mlp(), _mlp()
    opts = []
    for mm in (m, t):
        o = ek.AdamW(mm.parameters(), lr=1e-2, ema_decay=0.9)
        s = torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (1 + k))
        opts.append((o, s))
    backend, graphs = _counting_backend()

    def train_step(mm, o, x):
        o.zero_grad()
        loss = _loss(mm, x)
        loss.backward()
        o.step()
        return loss

    compiled = torch.compile(train_step, backend=backend)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(4, 5, generator=g)
        compiled(m, opts[0][0], x)
        opts[0][1].step()
        train_step(t, opts[1][0], x)
        opts[1][1].step()
    _close(m.parameters(), t.parameters(), 1e-5)
    _close(opts[0][0].ema_parameters(), opts[1][0].ema_parameters(), 1e-5)
    assert 1 <= len(graphs) <= 6, len(graphs)


def test_compile_fullgraph_step_raises_clearly_or_works():
    torch._dynamo.reset()
    m = _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2)
    _loss(m, torch.randn(4, 5)).backward()
    with pytest.raises(Exception, match="disable|graph break|Skip"):
        torch.compile(opt.step, fullgraph=True, backend="eager")()


@pytest.mark.parametrize("flatten", LAYOUTS)
def test_parameter_data_replaced_is_followed(flatten):
    """``p.data = t`` (same shape and dtype) after steps: the optimizer updates the new storage,
    as torch.optim does (it reads the parameter each step)."""
    m, t = _mlp(), _mlp()
    opt = ek.AdamW(m.parameters(), lr=1e-2, flatten=flatten)
    ref = torch.optim.AdamW(t.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for it in range(4):
        if it == 2:
            for mm in (m, t):
                mm[0].weight.data = mm[0].weight.data.clone()
        x = torch.randn(4, 5, generator=g)
        for mm, o in ((m, opt), (t, ref)):
            o.zero_grad(set_to_none=False)
            _loss(mm, x).backward()
            o.step()
    _close(m.parameters(), t.parameters())


def test_empty_group_and_set_accepted_like_torch():
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = ek.AdamW([{"params": [p]}, {"params": []}], lr=0.1, ema_decay=0.5)
    ek.AdamW({q}, lr=0.1)  # torch takes list(set) too
    p.grad = torch.ones(3)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p, before)
    assert opt.ema_parameters()[0] is not None and len(opt.ema_parameters()) == 1
