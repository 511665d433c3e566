"""Teachers as a user's script uses them (issue 23): a deep copy of (model, teacher, optimizer)
follows the copied EMA, and evaluating the EMA of a BatchNorm network gives the EMA buffers too
(the numbers of timm's ModelEmaV3)."""
import copy
import io

import pytest
import torch

import ema_kernels as ek

RHO = 0.8


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Conv2d(6, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 3))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 5, 5, generator=g) * 2 + 1 for _ in range(n)]


def _train(model, opt, xs, after_step=None):
    model.train()
    for x in xs:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if after_step is not None:
            after_step()


class ModelEmaV3Oracle:
    """timm.utils.ModelEmaV3's update (decay constant, no warm-up), written out: after each
    optimizer step, every floating-point entry of the state dict (parameters and buffers)
    lerps towards the model's with weight 1 - decay; the others are copied."""

    def __init__(self, model, decay):
        self.module, self.decay = copy.deepcopy(model), decay

    @torch.no_grad()
    def update(self, model):
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.lerp_(m, 1.0 - self.decay)
            else:
                e.copy_(m)


# ------------------------------------------------------------- evaluating a BatchNorm net -----
@pytest.mark.parametrize("cls", [ek.SGD, ek.AdamW])
def test_swap_ema_with_model_gives_the_ema_buffers_as_timm(cls):
    model = _net()
    opt = cls(model.parameters(), lr=0.05, ema_decay=RHO, backend="reference")
    teacher = opt.ema_module(model)  # before training: its buffers follow the EMA from here
    timm_like = ModelEmaV3Oracle(model, RHO)
    _train(model, opt, _batches(6), after_step=lambda: timm_like.update(model))
    x = _batches(1, seed=7)[0]
    model.eval(), teacher.eval(), timm_like.module.eval()
    with torch.no_grad():
        want = timm_like.module(x)
        own = model(x)
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        params = [p.detach().clone() for p in model.parameters()]
        with opt.swap_ema(model=model):
            got = model(x)
            for (k, b), (_, t) in zip(model.named_buffers(), teacher.named_buffers()):
                assert torch.equal(b, t), k
        with opt.swap_ema():  # parameters only: the student's running statistics
            params_only = model(x)
        by_teacher = teacher(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(by_teacher, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, by_teacher)
    # the buffers matter here: parameters only differ (the issue measured 0.12)
    assert (params_only - want).abs().max() > 1e-2
    # everything is the model's own again after the block, bit for bit
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    assert torch.equal(model(x), own)


def test_swap_ema_with_model_needs_a_live_teacher():
    model = _net()
    opt = ek.SGD(model.parameters(), lr=0.05, ema_decay=RHO)
    with pytest.raises(RuntimeError, match=r"teacher = opt.ema_module\(model, index=0\)"):
        with opt.swap_ema(model=model):
            pass
    opt.ema_module(model)  # dropped at once: the optimizer holds teachers weakly
    with pytest.raises(RuntimeError, match="none is alive"):
        with opt.swap_ema(model=model):
            pass
    assert not opt._swapped


# ------------------------------------------------------------- deep copies --------------------
@pytest.mark.parametrize("order", ["model-teacher-opt", "opt-teacher-model", "teacher-opt-model"])
@pytest.mark.parametrize("flatten", [False, True])
def test_deepcopy_of_model_teacher_opt_follows_the_copied_ema(order, flatten):
    model = _net()
    frozen = model[6].bias
    frozen.requires_grad_(False)  # not trained, aliased by the teacher
    opt = ek.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05,
                   ema_decay=RHO, flatten=flatten, backend="reference")
    teacher = opt.ema_module(model)
    _train(model, opt, _batches(2))
    parts = {"model": model, "teacher": teacher, "opt": opt}
    copied = dict(zip(order.split("-"), copy.deepcopy(tuple(parts[k] for k in
                                                              order.split("-")))))
    m2, t2, o2 = copied["model"], copied["teacher"], copied["opt"]
    assert t2 is not teacher and o2 is not opt
    # the copy trains on and its teacher follows it, as the original's follows the original
    xs = _batches(3, seed=4)
    _train(model, opt, xs)
    _train(m2, o2, xs)
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(teacher.parameters(), t2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(teacher.buffers(), t2.buffers()):
        assert torch.equal(a, b)
    # the copied teacher's parameters are views of the copied EMA, not of the original's
    trained = [p for p in m2.parameters() if p.requires_grad]
    emas = dict(zip(map(id, trained), o2.ema_parameters()))
    for p, tp in zip(m2.parameters(), t2.parameters()):
        if p.requires_grad:
            assert tp.data_ptr() == emas[id(p)].data_ptr()
        else:
            assert tp.data_ptr() == p.data_ptr()  # the copied student's frozen parameter
    # the copies are independent of the originals
    _train(m2, o2, _batches(1, seed=9))
    assert not torch.equal(next(teacher.parameters()), next(t2.parameters()))
    with o2.swap_ema(model=m2):  # the copied optimizer knows the copied teacher
        pass


def test_copied_teacher_buffers_follow_not_freeze():
    model = _net()
    opt = ek.SGD(model.parameters(), lr=0.05, ema_decay=RHO, backend="reference")
    teacher = opt.ema_module(model)
    _train(model, opt, _batches(2))
    m2, t2, o2 = copy.deepcopy((model, teacher, opt))
    before = t2[1].running_mean.clone()
    _train(m2, o2, _batches(2, seed=5))
    assert not torch.equal(t2[1].running_mean, before)  # followed, not a frozen snapshot


def test_teacher_pickles_as_plain_modules():
    model = _net()
    opt = ek.SGD(model.parameters(), lr=0.05, ema_decay=RHO, backend="reference")
    teacher = opt.ema_module(model)
    _train(model, opt, _batches(1))
    buf = io.BytesIO()
    torch.save(teacher, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert all(type(p) is torch.nn.Parameter for p in back.parameters())
    for a, b in zip(back.parameters(), teacher.parameters()):
        assert torch.equal(a, b)
    sd = io.BytesIO()
    torch.save(teacher.state_dict(), sd)
    sd.seek(0)
    torch.load(sd, weights_only=True)
