"""The step() wrapper (ema_kernels/optim/step_hooks.py) behaves as torch.optim's: the same
hooks in the same order with the same arguments, a pre-hook's (args, kwargs) used, a bad
return refused, and the profiler range present whenever a profiler records."""
import pytest
import torch
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

import ema_kernels as ek


def _setup(cls_ek, cls_torch, **kw):
    out = []
    for cls in (cls_ek, cls_torch):
        torch.manual_seed(0)
        m = torch.nn.Linear(4, 3)
        m(torch.randn(2, 4)).sum().backward()
        out.append((m, cls(m.parameters(), lr=0.1, **kw)))
    return out


def _record(opt, calls, tag):
    """Per-optimizer and global hooks that log (who, what it saw)."""
    hs = [opt.register_step_pre_hook(
              lambda o, a, k: calls.append((tag, "pre", a[0] is o, len(a), dict(k)))),
          opt.register_step_post_hook(
              lambda o, a, k: calls.append((tag, "post", a[0] is o, len(a), dict(k))))]
    return hs


@pytest.mark.parametrize("cls_ek,cls_torch", [(ek.AdamW, torch.optim.AdamW),
                                              (ek.SGD, torch.optim.SGD)])
def test_hooks_are_called_like_torchs(cls_ek, cls_torch):
    (_, opt), (_, ref) = _setup(cls_ek, cls_torch)
    got, want = [], []
    handles = _record(opt, got, "x") + _record(ref, want, "x")
    g_pre = register_optimizer_step_pre_hook(lambda o, a, k: (got if o is opt else want)
                                             .append(("g", "pre", a[0] is o, len(a), dict(k))))
    g_post = register_optimizer_step_post_hook(lambda o, a, k: (got if o is opt else want)
                                               .append(("g", "post", a[0] is o, len(a),
                                                        dict(k))))
    try:
        opt.step()
        ref.step()
    finally:
        for h in handles + [g_pre, g_post]:
            h.remove()
    assert got == want
    assert [c[:2] for c in got] == [("g", "pre"), ("x", "pre"), ("x", "post"), ("g", "post")]
    opt.step()  # removed hooks are not called any more
    assert len(got) == 4


def test_a_pre_hook_can_replace_the_arguments():
    (m, opt), _ = _setup(ek.AdamW, torch.optim.AdamW)
    seen = []

    def closure():
        seen.append("closure")
        return torch.tensor(1.5)

    opt.register_step_pre_hook(lambda o, a, k: ((o,), {"closure": closure}))
    assert opt.step().item() == 1.5
    assert seen == ["closure"]


def test_a_bad_pre_hook_return_is_refused_before_the_step():
    (m, opt), _ = _setup(ek.AdamW, torch.optim.AdamW)
    before = [p.detach().clone() for p in m.parameters()]
    opt.register_step_pre_hook(lambda o, a, k: 3)
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))


def test_profiler_records_the_step_range():
    (_, opt), _ = _setup(ek.AdamW, torch.optim.AdamW)
    opt.step()  # the unprofiled path first
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.key for e in prof.key_averages()]
    assert "Optimizer.step#AdamW.step" in names


def test_the_wrapper_is_installed_once_per_class():
    a = ek.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    step = type(a).step
    ek.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert type(a).step is step and step.hooked

    # A subclass's own step is wrapped too. Its super().step() is the base class's wrapped
    # step once that class has had an instance (as here): the hooks then run twice, exactly
    # as with torch.optim (whose result depends on the same history).
    def subclass(base):
        class Mine(base):
            def step(self, closure=None):
                self.ran = True
                return super().step(closure)
        return Mine

    torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    ek.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    counts = []
    for base in (ek.AdamW, torch.optim.AdamW):
        m = torch.nn.Linear(2, 2)
        opt = subclass(base)(m.parameters(), lr=0.1)
        calls = []
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        m(torch.randn(1, 2)).sum().backward()
        opt.step()
        assert opt.ran
        counts.append(len(calls))
    assert counts[0] == counts[1] == 2
