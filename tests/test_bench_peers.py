"""The bench's peer rows are the real packages (timm, ema-pytorch, diffusers, torch's
AveragedModel and torch.compile), do the rows' job (one EMA update with decay ρ^k per
``ema_every=k`` steps), and a missing package is reported instead of timed."""
import sys

import pytest
import torch

from ema_kernels import bench
from integration_support import require

for _module, _pip in (("timm", "timm"), ("ema_pytorch", "ema-pytorch"), ("diffusers", "diffusers")):
    require(_module, _pip)

PEER_TYPES = {
    "torch foreach + timm ModelEmaV3": "timm.utils.model_ema.ModelEmaV3",
    "torch fused + ema-pytorch EMA": "ema_pytorch.ema_pytorch.EMA",
    "torch fused + diffusers EMAModel": "diffusers.training_utils.EMAModel",
}


def _qualname(obj):
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _ema_values(name, emas):
    """The EMA tensors of a peer's EMA object, in parameter order."""
    if "timm" in name:
        return list(emas.module.parameters())
    if "ema-pytorch" in name:
        return list(emas.ema_model.parameters())
    return list(emas.shadow_params)


@pytest.mark.parametrize("name", list(PEER_TYPES))
@pytest.mark.parametrize("ema_every", [1, 3])
def test_peer_rows_are_the_packages_and_average_like_every_row(name, ema_every):
    case = bench.Case(numel=50, tensors=3, ema_every=ema_every, emas=2)
    fn, (opt, model, emas) = bench.build_row(name, case)
    assert [_qualname(e) for e in emas] == [PEER_TYPES[name]] * 2
    before = [p.detach().clone() for p in model.parameters()]
    starts = [[z.detach().clone() for z in _ema_values(name, e)] for e in emas]
    for s in starts:  # every EMA starts as the parameters
        for z, p in zip(s, before):
            assert torch.equal(z, p)
    fn()
    after = [p.detach().clone() for p in model.parameters()]
    assert not torch.equal(after[0], before[0])  # the optimizer stepped
    for e, start, rho in zip(emas, starts, case.decays):
        d = rho ** ema_every
        if "diffusers" in name:  # EMAModel's own warm-up: its 1st step copies, then (1+t)/(10+t)
            d = e.get_decay(e.optimization_step)
        elif "ema-pytorch" in name:  # ema-pytorch's warm-up, capped at beta
            d = e.get_current_decay()
        for z, z0, p in zip(_ema_values(name, e), start, after):
            want = d * z0.double() + (1 - d) * p.double()
            torch.testing.assert_close(z.double(), want, rtol=1e-6, atol=1e-7)


def test_compiled_row_matches_eager_foreach_and_lerp():
    case = bench.Case(numel=40, tensors=3)
    fn, (opt, params, emas) = bench.build_row(bench.COMPILED, case)
    ref = bench._make_params(case)
    ref_opt = torch.optim.AdamW(ref, lr=bench.LR, foreach=True)
    ref_ema = [p.detach().clone() for p in ref]
    for _ in range(3):
        fn()
        ref_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ref_ema, [p.detach() for p in ref], 1 - bench.EMA_DECAY)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    for z, r in zip(emas[0], ref_ema):
        torch.testing.assert_close(z, r, rtol=1e-6, atol=1e-7)
    assert bench.COMPILED in bench.row_names("cpu")
    assert bench.COMPILED not in bench.row_names("cpu", compile=False)


def test_a_missing_package_is_reported_not_timed(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now fails as if absent
    monkeypatch.setitem(sys.modules, "timm.utils", None)
    with pytest.raises(bench.peers.PeerMissing, match="timm is not installed"):
        bench.build_row("torch foreach + timm ModelEmaV3", bench.Case(numel=10, tensors=2))
    rows = ["ek[reference]", bench.BASELINE, "torch foreach + timm ModelEmaV3", bench.COPY]
    assert bench.main(["--device", "cpu", "--numel", "300", "--tensors", "3", "--repeats", "2",
                       "--warmup", "1", "--quiet", "--rows", *rows]) == 0
    out = capsys.readouterr().out
    assert "| torch foreach + timm ModelEmaV3 | 300 | 3 | n/a |" in out
    assert "# not run: torch foreach + timm ModelEmaV3: timm is not installed" in out
