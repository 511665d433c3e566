"""Migrating from diffusers' EMAModel: the schedule's decay equals EMAModel.get_decay at every
step, and an ek optimizer's EMA equals EMAModel(foreach=True)'s in a training loop, with
swap_ema / ema_module in place of store / copy_to / restore."""
import pytest
import torch

from integration_support import require

require("diffusers")
from diffusers.training_utils import EMAModel  # noqa: E402

import ema_kernels as ek  # noqa: E402
from ema_kernels.integrations.diffusers import (DiffusersDefault, ema_schedule,  # noqa: E402
                                                from_ema_model)

SETTINGS = [
    dict(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3),
    dict(decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4, update_after_step=5),
    dict(decay=0.995, use_ema_warmup=True, inv_gamma=7.5, power=0.5, min_decay=0.3),
    dict(decay=0.9, use_ema_warmup=True, inv_gamma=2.0, power=1.0, min_decay=0.95,
         update_after_step=2),
    dict(decay=0.9999),  # EMAModel's default: (1 + t)/(10 + t)
    dict(decay=0.99, update_after_step=3, min_decay=0.5),
]


@pytest.mark.parametrize("kw", SETTINGS, ids=[str(i) for i in range(len(SETTINGS))])
def test_decay_equals_ema_model_get_decay_step_for_step(kw):
    ema = EMAModel(torch.nn.Linear(2, 2).parameters(), **kw)
    for sched in (ema_schedule(**kw), from_ema_model(ema)):
        assert isinstance(sched, ek.schedules.warmup if kw.get("use_ema_warmup")
                          else DiffusersDefault)
        for n in range(1, 3000):
            assert sched.decay(n - 1, n) == ema.get_decay(n), n
        # the flat tail (one closed-form power) agrees with the per-step values too
        assert sched.decay(5000, 5003) == pytest.approx(
            ema.get_decay(5001) * ema.get_decay(5002) * ema.get_decay(5003), rel=1e-12)


def test_ek_ema_equals_ema_model_foreach_in_a_training_loop():
    kw = dict(decay=0.99, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
              update_after_step=2)
    torch.manual_seed(0)
    net_d = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    net_e = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    net_e.load_state_dict(net_d.state_dict())
    opt_d = torch.optim.SGD(net_d.parameters(), lr=0.05, momentum=0.9)
    ema = EMAModel(net_d.parameters(), foreach=True, **kw)
    opt_e = ek.SGD(net_e.parameters(), lr=0.05, momentum=0.9, ema_schedule=ema_schedule(**kw))
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randn(4, 8, generator=g)
        y = x.sum(1, keepdim=True).sin()
        for net, opt in ((net_d, opt_d), (net_e, opt_e)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        ema.step(net_d.parameters())
    for a, b in zip(net_d.parameters(), net_e.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for s, z in zip(ema.shadow_params, opt_e.ema_parameters()):
        torch.testing.assert_close(z, s, rtol=1e-5, atol=1e-6)
    # store / copy_to / restore  ->  with opt.swap_ema():
    student = [p.detach().clone() for p in net_e.parameters()]
    ema.store(net_d.parameters())
    ema.copy_to(net_d.parameters())
    x = torch.randn(4, 8, generator=g)
    with opt_e.swap_ema():
        out_ema = net_e(x)
        torch.testing.assert_close(out_ema, net_d(x), rtol=1e-5, atol=1e-6)
    ema.restore(net_d.parameters())
    for p, s in zip(net_e.parameters(), student):
        assert torch.equal(p, s)
    # a second model holding the EMA  ->  opt.ema_module(net): live views, no copy
    teacher = opt_e.ema_module(net_e)
    assert torch.equal(teacher(x), out_ema)
    for p, z in zip(teacher.parameters(), opt_e.ema_parameters()):
        assert p.data_ptr() == z.data_ptr()


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="update_after_step"):
        ema_schedule(update_after_step=-1)
    with pytest.raises(ValueError):
        ema_schedule(decay=1.5)
    assert "DiffusersDefault(decay=0.99" in repr(ema_schedule(0.99))
