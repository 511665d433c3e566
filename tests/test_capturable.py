"""capturable=True: lr, step and 1 − ρ̂ read from device tensors, found_inf never read on the host.

CI has no GPU, so the capturable path runs through the compiled extension's CPU twin (`cpp`),
which uses the same device-tensor interface as the CUDA kernels, and through the Triton kernels
under the interpreter (`triton`, TRITON_INTERPRET=1); the CUDA-graph capture itself is tested in
tests/test_cuda_ext.py and tests/test_host_side.py on GPU machines.
"""
import types

import pytest
import torch

import ema_kernels as ek


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.Tanh(), torch.nn.Linear(11, 3))


def run(cls, capturable, steps, found_inf_at=(), backend="cpp", **kw):
    model = make_model()
    opt = cls(model.parameters(), capturable=capturable, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        x = torch.randn(5, 6, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        fi = torch.ones(1) if t in found_inf_at else torch.zeros(1)
        opt.step(grad_scale=torch.full((1,), 2.0), found_inf=fi)
    return model, opt


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("cls,kw", [
    (ek.AdamW, dict(lr=1e-2, weight_decay=0.1, ema_decay=0.8, kappa=2.0)),
    (ek.Adam, dict(lr=1e-2, amsgrad=True, ema_decay=0.9)),
    (ek.SGD, dict(lr=1e-1, momentum=0.9, nesterov=True, ema_decay=0.7)),
])
def test_capturable_matches_the_host_path_without_syncing(cls, kw, backend, monkeypatch):
    ref_model, ref_opt = run(cls, False, 6, found_inf_at=(3,), backend="reference", **kw)

    def no_sync(self):
        raise AssertionError("capturable step() read a tensor on the host")

    model = make_model()
    opt = cls(model.parameters(), capturable=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    for t in range(6):
        x = torch.randn(5, 6, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        fi = torch.ones(1) if t == 3 else torch.zeros(1)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", no_sync)
            opt.step(grad_scale=torch.full((1,), 2.0), found_inf=fi)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for p, q in zip(ref_opt.ema_parameters(), opt.ema_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    # the device step count skipped the found_inf step; the state dict carries it
    steps = {float(st["step"]) for st in opt.state_dict()["state"].values()}
    assert steps == {5.0}


def test_reference_capturable_matches_cpp_capturable():
    """The reference reads lr, t and 1 − ρ̂ from device tensors too (pure torch ops, so a
    capture records them): the oracle of the capturable kernels."""
    kw = dict(lr=1e-2, weight_decay=0.1, ema_decay=0.8, kappa=2.0)
    m_ref, o_ref = run(ek.AdamW, True, 5, found_inf_at=(2,), backend="reference", **kw)
    m_cpp, o_cpp = run(ek.AdamW, True, 5, found_inf_at=(2,), backend="cpp", **kw)
    for p, q in zip(m_ref.parameters(), m_cpp.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    for p, q in zip(o_ref.ema_parameters(), o_cpp.ema_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_capturable_state_dict_round_trip():
    model, opt = run(ek.AdamW, True, 3, lr=1e-2, ema_decay=0.9)
    sd = opt.state_dict()
    model2 = make_model(5)
    model2.load_state_dict(model.state_dict())
    opt2 = ek.AdamW(model2.parameters(), capturable=True, backend="cpp", lr=1e-2, ema_decay=0.9)
    opt2.load_state_dict(sd)
    assert float(opt2.state[next(model2.parameters())]["step"]) == 3.0
    x = torch.randn(4, 6)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_capturable_rejects_what_a_graph_cannot_replay():
    params = list(make_model().parameters())
    with pytest.raises(ValueError, match="ema_every"):
        ek.AdamW(params, capturable=True, ema_every=2)
    with pytest.raises(ValueError, match="ema_schedule"):
        ek.AdamW(params, capturable=True, ema_schedule=ek.schedules.polyak())
    # a backend without device-scalar kernels (every shipped one has them: a stand-in)
    opt = ek.AdamW(params, capturable=True, backend="reference")
    opt._backend_for = lambda ts, env=None: types.SimpleNamespace(NAME="custom")
    with pytest.raises(ek.BackendUnavailableError,
                       match="capturable=True needs a backend with device-scalar kernels.*"
                             "'custom' has none"):
        opt.step()
    opt = ek.AdamW(params, capturable=True, backend="cpp")
    opt.zero_grad(set_to_none=True)
    params[0].grad = torch.zeros_like(params[0])
    with pytest.raises(RuntimeError, match="grad None"):
        opt.step()
