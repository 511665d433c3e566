"""ema_kernels under accelerate: prepare(model, opt, loader), accumulate, bf16 autocast,
clip_grad_norm_, save_state/load_state with the EMAs, and the EMA API behind what prepare
returns."""
import pytest
import torch

from integration_support import require

accelerate = require("accelerate")

import ema_kernels as ek  # noqa: E402
from ema_kernels.integrations import ema_weights, find_ema_optimizer  # noqa: E402

RHO = 0.8


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate's state is a process-wide singleton: each test builds its own Accelerator
    (as accelerate's own tests do)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def loader():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 8, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)


def train(opt_name, steps_of=None, mixed_precision="no", accumulation=2, clip=0.05,
          seed=0, state_dir=None, resume_dir=None):
    """An accelerate loop; returns (model, the user's optimizer, params after each step)."""
    acc = accelerate.Accelerator(cpu=True, mixed_precision=mixed_precision,
                                 gradient_accumulation_steps=accumulation)
    net = model(seed)
    if opt_name == "torch":
        opt = torch.optim.SGD(net.parameters(), lr=5e-2, momentum=0.9)
    else:
        opt = ek.SGD(net.parameters(), lr=5e-2, momentum=0.9, ema_decay=(RHO, 0.5))
    p_net, p_opt, p_loader = acc.prepare(net, opt, loader())
    if resume_dir is not None:
        acc.load_state(resume_dir)
    after, norms = [], []
    for i, (x, y) in enumerate(p_loader):
        if resume_dir is not None and i < 6:
            continue  # the batches the saved run had consumed
        with acc.accumulate(p_net):
            loss = torch.nn.functional.mse_loss(p_net(x), y)
            acc.backward(loss)
            if acc.sync_gradients:
                norms.append(acc.clip_grad_norm_(p_net.parameters(), clip))
            p_opt.step()
            p_opt.zero_grad()
        if acc.sync_gradients:
            after.append([p.detach().clone() for p in net.parameters()])
            if state_dir is not None and len(after) == 3:
                acc.save_state(state_dir)
    return net, opt, p_opt, after, norms


def float64_ema(seq, rho):
    z = [t.double() for t in seq[0]]
    for xs in seq[1:]:
        z = [rho * zi + (1 - rho) * x.double() for zi, x in zip(z, xs)]
    return z


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_prepared_ek_optimizer_trains_like_torch(mixed_precision):
    init = [p.detach().clone() for p in model().parameters()]
    net_t, _, _, after_t, norms_t = train("torch", mixed_precision=mixed_precision)
    net_e, opt, p_opt, after_e, norms_e = train("ek", mixed_precision=mixed_precision)
    assert len(after_e) == 6  # 12 batches, accumulation 2
    assert all(n > 0.05 for n in norms_e)  # clipping active at every step
    torch.testing.assert_close(torch.stack(norms_e), torch.stack(norms_t), rtol=1e-5, atol=0)
    for pt, pe in zip(net_t.parameters(), net_e.parameters()):
        torch.testing.assert_close(pe, pt, rtol=1e-5, atol=1e-6)
    for z, w in zip(opt.ema_parameters(), float64_ema([init] + after_t, RHO)):
        torch.testing.assert_close(z.double(), w, rtol=1e-5, atol=1e-6)
    # the EMA API behind what prepare returned
    assert isinstance(p_opt, accelerate.optimizer.AcceleratedOptimizer)
    assert p_opt.optimizer is opt and find_ema_optimizer(p_opt) is opt
    student = [p.detach().clone() for p in net_e.parameters()]
    with p_opt.optimizer.swap_ema():
        for p, z in zip(net_e.parameters(), opt.ema_parameters()):
            assert torch.equal(p, z)
    with ema_weights(p_opt, net_e, index=1):
        for p, z in zip(net_e.parameters(), opt.ema_parameters(1)):
            assert torch.equal(p, z)
    for p, s in zip(net_e.parameters(), student):
        assert torch.equal(p, s)


def test_save_state_load_state_restore_the_emas_bit_for_bit(tmp_path):
    net_a, opt_a, _, _, _ = train("ek", state_dir=str(tmp_path / "state"))
    net_b, opt_b, _, _, _ = train("ek", seed=5, resume_dir=str(tmp_path / "state"))
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa, pb)
    for i in (0, 1):
        for za, zb in zip(opt_a.ema_parameters(i), opt_b.ema_parameters(i)):
            assert torch.equal(za, zb)
    # the saved state really held step-3 EMAs (not the final ones)
    saved = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=True)
    assert not torch.equal(saved["state"][0]["ema"], opt_a.ema_parameters()[0])


def test_a_teacher_registered_for_checkpointing_keeps_its_buffers_ema(tmp_path):
    """docs/integrations.md: accelerator.register_for_checkpointing(teacher) saves and restores
    the EMA of the buffers (BatchNorm statistics) with the optimizer's EMAs."""
    acc = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = ek.SGD(net.parameters(), lr=5e-2, momentum=0.9, ema_decay=RHO)
    p_net, p_opt, p_loader = acc.prepare(net, opt, loader())
    teacher = opt.ema_module(net)
    acc.register_for_checkpointing(teacher)
    batches = list(p_loader)

    def steps(bs):
        for x, y in bs:
            acc.backward(torch.nn.functional.mse_loss(p_net(x), y))
            p_opt.step()
            p_opt.zero_grad()
    steps(batches[:3])
    acc.save_state(str(tmp_path / "state"))
    saved_mean = teacher[1].running_mean.clone()
    saved_ema = [z.clone() for z in opt.ema_parameters()]
    steps(batches[3:6])
    assert not torch.equal(teacher[1].running_mean, saved_mean)
    acc.load_state(str(tmp_path / "state"))
    assert torch.equal(teacher[1].running_mean, saved_mean)
    for z, s in zip(opt.ema_parameters(), saved_ema):
        assert torch.equal(z, s)
    for p, z in zip(teacher.parameters(), opt.ema_parameters()):  # still live views
        assert p.data_ptr() == z.data_ptr()
