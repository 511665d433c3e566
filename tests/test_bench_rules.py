"""``bench --optimizer lars|lamb|lion``: the bytes per parameter, the rows, and the foreach
baselines (ema_kernels/bench/foreach_rules.py) doing the optimizers' math."""
import pytest
import torch

import ema_kernels as ek
from ema_kernels import bench
from ema_kernels.bench import foreach_rules


def test_bytes_per_param_of_the_rules():
    assert bench.bytes_per_param("lars") == 36
    assert bench.bytes_per_param("lamb") == 48
    assert bench.bytes_per_param("lion") == 28
    assert bench.bytes_per_param("lion", emas=3) == 28 + 16
    assert bench.bytes_per_param("lars", "bf16") == 5 * 2 + 8 + 8
    assert bench.bytes_per_param("lamb", ema_every=2) == 40 + 4


def _params(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(k, generator=g) for k in (5, 4097, 33)[:n]]
    gs = [torch.randn(p.shape, generator=g) * 0.1 for p in ps]
    return ps, gs


@pytest.mark.parametrize("rule", ["lars", "lamb", "lion"])
def test_foreach_baselines_do_the_optimizers_math(rule):
    ps, gs = _params(0)
    qs = [torch.nn.Parameter(p.clone()) for p in ps]
    for q, g in zip(qs, gs):
        q.grad = g.clone()
    hp = bench._torch_hparams(bench.Case(optimizer=rule))
    if rule == "lars":
        opt = ek.LARS(qs, **hp, backend="reference")
        foreach_rules.lars_step(ps, gs, [torch.zeros_like(p) for p in ps], **{
            k: hp[k] for k in ("lr", "momentum", "weight_decay", "trust_coefficient", "eps")})
    elif rule == "lamb":
        opt = ek.LAMB(qs, **hp, backend="reference")
        foreach_rules.lamb_step(ps, gs, [torch.zeros_like(p) for p in ps],
                                [torch.zeros_like(p) for p in ps], lr=hp["lr"], beta1=0.9,
                                beta2=0.999, eps=1e-6, weight_decay=hp["weight_decay"], step=1)
    else:
        opt = ek.Lion(qs, **hp, backend="reference")
        foreach_rules.lion_step(ps, gs, [torch.zeros_like(p) for p in ps], lr=hp["lr"],
                                beta1=0.9, beta2=0.99, weight_decay=hp["weight_decay"])
    opt.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q.detach(), p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", ["lars", "lamb", "lion"])
def test_rows_and_a_tiny_run(rule):
    names = bench.row_names("cpu", optimizer=rule)
    assert names[-2:] == [bench.RULE_BASELINE, bench.COPY]
    assert "ek[reference]" in names
    for n in names:
        if n.startswith("ek["):
            b = n[3:].split(",")[0].rstrip("]")
            assert hasattr(ek._ops.resolve(b, "cpu"), f"{rule}_ema")
    with pytest.raises(ValueError, match="--clip"):
        bench.row_names("cpu", clip=True, optimizer=rule)
    case = bench.Case(optimizer=rule, numel=5000, tensors=3)
    rows = bench.run([case], names=["ek[reference]", bench.RULE_BASELINE, bench.COPY],
                     warmup=1, repeats=2)
    by = {r["name"]: r for r in rows}
    assert by["ek[reference]"]["bytes_per_param"] == bench.bytes_per_param(rule)
    for r in rows:
        assert r["gbps"] > 0 and r["pct_of_copy"] > 0, r
    assert by[bench.RULE_BASELINE]["speedup"] == pytest.approx(1.0)


def test_table_names_the_rules_baseline():
    rows = [dict(name=n, device="cpu", optimizer="lion", dtype="fp32", numel=10, tensors=1,
                 ema_every=1, emas=1, ms=1.0, bytes_per_param=28, gbps=1.0, pct_of_copy=1.0,
                 speedup=1.0, clip=False) for n in (bench.RULE_BASELINE, bench.COPY)]
    text = bench.format_table(rows)
    assert f"speedup vs '{bench.RULE_BASELINE}'" in text
