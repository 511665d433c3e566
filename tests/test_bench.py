"""`python -m ema_kernels bench`: byte counts against hand counts, and a tiny run's rows/keys."""
import json
import math
import sys

import pytest
import torch

import ema_kernels
from ema_kernels import bench

# --no-compile: the torch.compile row compiles for 10-25 s per case (tests/test_bench_peers.py
# runs it once)
TINY = ["--device", "cpu", "--numel", "300", "--tensors", "3", "--repeats", "2", "--warmup", "1",
        "--quiet", "--no-compile"]


# --- bytes per parameter: hand counts ------------------------------------------------------
@pytest.mark.parametrize("optimizer, dtype, kw, expected", [
    # read θ g m v ζ, write θ m v ζ: 5·4 + 4·4
    ("adamw", "fp32", {}, 36),
    ("adam", "fp32", {}, 36),
    # + v_max read and written
    ("adamw", "fp32", {"amsgrad": True}, 44),
    # read θ g buf ζ, write θ buf ζ
    ("sgd", "fp32", {}, 28),
    # plain SGD: read θ g ζ, write θ ζ
    ("sgd", "fp32", {"momentum": 0.0}, 20),
    # bf16 θ g (2 B), fp32 m v ζ: read 2+2+4+4+4, write 2+4+4+4
    ("adamw", "bf16", {}, 30),
    ("adam", "fp16", {}, 30),
    # bf16 θ g, fp32 buf ζ: read 2+2+4+4, write 2+4+4
    ("sgd", "bf16", {}, 22),
    # no EMA: AdamW alone, 28
    ("adamw", "fp32", {"ema": False}, 28),
    # ema_every=k: the EMA's 8 bytes spread over k steps
    ("adamw", "fp32", {"ema_every": 4}, 28 + 8 / 4),
    ("sgd", "fp32", {"ema_every": 2}, 20 + 8 / 2),
    ("adamw", "bf16", {"ema_every": 8}, 22 + 8 / 8),
    # a bf16 EMA (hypothetical ema_dtype option) moves 2+2
    ("adamw", "bf16", {"ema_dtype": "bf16"}, 26),
])
def test_bytes_per_param_hand_counts(optimizer, dtype, kw, expected):
    assert bench.bytes_per_param(optimizer, dtype, **kw) == pytest.approx(expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bytes_per_param_with_n_emas(n):
    """N EMAs in one pass: θ is read once, each ζ_i read and written: 36 + 8·(N − 1) for fp32
    AdamW (44 for two, against torch fused AdamW + two _foreach_lerp_'s 56)."""
    assert bench.bytes_per_param("adamw", "fp32", emas=n) == 36 + 8 * (n - 1)
    assert bench.Case(emas=n).bytes_per_param == 36 + 8 * (n - 1)
    # SGD with momentum: 20 + 8·N; bf16 AdamW: 22 + 8·N; ema_every=2 halves the EMAs' part
    assert bench.bytes_per_param("sgd", "fp32", emas=n) == 20 + 8 * n
    assert bench.bytes_per_param("adamw", "bf16", emas=n) == 22 + 8 * n
    assert bench.bytes_per_param("adamw", "fp32", 2, emas=n) == 28 + 4 * n
    with pytest.raises(ValueError, match="emas"):
        bench.bytes_per_param("adamw", "fp32", emas=0)


def test_bytes_per_param_takes_torch_dtypes_and_rejects_nonsense():
    assert bench.bytes_per_param("adamw", torch.bfloat16) == 30
    with pytest.raises(ValueError, match="optimizer"):
        bench.bytes_per_param("adagrad", "fp32")  # (lamb is a bench optimizer now)
    with pytest.raises(ValueError, match="dtype"):
        bench.bytes_per_param("adamw", "fp8")
    with pytest.raises(ValueError, match="ema_every"):
        bench.bytes_per_param("adamw", "fp32", ema_every=0)


def test_case_splits_numel_over_tensors():
    assert bench.Case(numel=10, tensors=3).sizes() == [4, 3, 3]
    assert bench.Case(numel=2, tensors=5).sizes() == [1, 1]
    assert sum(bench.Case(numel=4097, tensors=64).sizes()) == 4097


@pytest.mark.parametrize("text, n", [("4096", 4096), ("2^20", 1 << 20), ("2**10", 1024),
                                     ("1e6", 10 ** 6), ("16M", 16 << 20), ("4k", 4096)])
def test_parse_size(text, n):
    assert bench.parse_size(text) == n


def test_parse_size_rejects():
    import argparse
    for bad in ("zero", "0", "-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_size(bad)


# --- a tiny run ----------------------------------------------------------------------------
def _expected_names():
    names = []
    for b in ema_kernels.available_backends("cpu"):
        if b != "triton":
            names += [f"ek[{b}]", f"ek[{b},flat]"]  # the default layout, then flatten=True
    return names + [b for b in bench.BASELINES if b != bench.COMPILED] + [bench.COPY]


def _check_rows(rows, *, optimizer, dtype, ema_every, numel=300, tensors=3, emas=1):
    assert [r["name"] for r in rows] == _expected_names()
    assert "ek[reference]" in [r["name"] for r in rows]
    bpp = bench.bytes_per_param(optimizer, dtype, ema_every, emas=emas)
    for r in rows:
        assert list(r) == list(bench.KEYS)
        assert (r["device"], r["optimizer"], r["dtype"]) == ("cpu", optimizer, dtype)
        assert (r["numel"], r["tensors"], r["ema_every"]) == (numel, tensors, ema_every)
        assert r["emas"] == emas
        assert r["bytes_per_param"] == pytest.approx(bpp)
        assert r["ms"] > 0 and math.isfinite(r["ms"]), r
        assert r["gbps"] == pytest.approx(bpp * numel / (r["ms"] * 1e-3) / 1e9)
        assert r["pct_of_copy"] > 0 and r["speedup"] > 0
    by = {r["name"]: r for r in rows}
    assert by[bench.BASELINE]["speedup"] == pytest.approx(1.0)
    assert by[bench.COPY]["pct_of_copy"] == pytest.approx(100.0)


def test_bench_json_has_every_row_and_key(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(TINY + ["--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    _check_rows(rows, optimizer="adamw", dtype="fp32", ema_every=1)
    out = capsys.readouterr().out
    for name in _expected_names():
        assert f"| {name} |" in out


def test_bench_sgd_bf16_ema_every(tmp_path):
    path = tmp_path / "bench.json"
    rc = bench.main(TINY + ["--optimizer", "sgd", "--dtype", "bf16", "--ema-every", "2",
                            "--json", str(path)])
    assert rc == 0
    _check_rows(json.loads(path.read_text()), optimizer="sgd", dtype="bf16", ema_every=2)


def test_bench_two_emas(tmp_path, capsys):
    """--emas 2: every row keeps two EMAs (ek in its one pass, the baselines two updates),
    44 B/param for fp32 AdamW."""
    path = tmp_path / "bench.json"
    assert bench.main(TINY + ["--emas", "2", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    _check_rows(rows, optimizer="adamw", dtype="fp32", ema_every=1, emas=2)
    assert rows[0]["bytes_per_param"] == 44
    assert "emas=2" in capsys.readouterr().out


def test_bench_rows_update_every_ema():
    """The rows really keep N EMAs: after one call each of the baseline's and ek's EMAs has
    moved, with its own decay."""
    case = bench.Case(numel=64, tensors=2, emas=2)
    fn, (opt, params, emas) = bench.build_row(bench.BASELINE, case)
    fn()
    assert len(emas) == 2
    assert not torch.equal(emas[0][0], emas[1][0])  # decays 0.9999 and 0.999
    fn, (opt, params) = bench.build_row("ek[reference]", case)
    assert opt.num_emas == 2 and opt.param_groups[0]["ema_decay"] == (0.9999, 0.999)
    fn()
    z0, z1 = opt.ema_parameters(index=0)[0], opt.ema_parameters(index=1)[0]
    assert not torch.equal(z0, z1)


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert bench.main(TINY + ["--numel", "200", "400", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.main(TINY + ["--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_cuda_without_gpu_says_so(capsys):
    assert bench.main(["--device", "cuda", "--quiet"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_python_m_ema_kernels_bench(tmp_path, monkeypatch):
    """The command line through ema_kernels.__main__ (in process: no second torch import)."""
    from ema_kernels.__main__ import main as cli_main

    path = tmp_path / "bench.json"
    argv = ["bench"] + TINY + ["--json", str(path)]
    monkeypatch.setattr(sys, "argv", ["python -m ema_kernels"])  # argv is passed, not read
    assert cli_main(argv) == 0
    _check_rows(json.loads(path.read_text()), optimizer="adamw", dtype="fp32", ema_every=1)


# --- --clip: clip_grad_norm_ folded into the step vs torch's clip + fused step + lerp -------
@pytest.mark.parametrize("optimizer, dtype, ours, theirs", [
    # ours: + read g for the norm. torch: norm (read g) + g *= coef (read, write g) + fused
    # step (state in the parameter dtype) + lerp (read θ ζ, write ζ)
    ("adamw", "fp32", 36 + 4, 4 + 8 + 28 + 12),
    ("sgd", "fp32", 28 + 4, 4 + 8 + 20 + 12),
    ("adamw", "bf16", 30 + 2, 2 + 4 + (6 + 8) + 6),
])
def test_clip_bytes_per_param_hand_counts(optimizer, dtype, ours, theirs):
    assert bench.bytes_per_param(optimizer, dtype, clip=True) == ours
    assert bench.torch_clip_bytes_per_param(optimizer, dtype) == theirs
    case = bench.Case(optimizer=optimizer, dtype=dtype, clip=True)
    assert case.row_bytes_per_param("ek[cpp]") == ours
    assert case.row_bytes_per_param(bench.CLIP_BASELINE) == theirs
    assert bench.torch_clip_bytes_per_param("adamw", "fp32", emas=2) == 52 + 12


def test_bench_clip_rows(tmp_path, capsys):
    """--clip: the ek rows (40 B/param, fp32 AdamW) against torch's clip + fused AdamW + lerp
    (52 B/param), each row's GB/s against its own count, speedup vs the clip baseline."""
    path = tmp_path / "bench.json"
    assert bench.main(TINY + ["--clip", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    names = [n for n in _expected_names() if n.startswith("ek[")]
    assert [r["name"] for r in rows] == names + [bench.CLIP_BASELINE, bench.COPY]
    for r in rows:
        assert list(r) == list(bench.KEYS) and r["clip"] is True
        bpp = 52 if r["name"] == bench.CLIP_BASELINE else 40
        assert r["bytes_per_param"] == bpp
        assert r["gbps"] == pytest.approx(bpp * 300 / (r["ms"] * 1e-3) / 1e9)
        assert r["speedup"] > 0 and r["pct_of_copy"] > 0
    by = {r["name"]: r for r in rows}
    assert by[bench.CLIP_BASELINE]["speedup"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert "clip=True" in out and f"| {bench.CLIP_BASELINE} |" in out


def test_bench_clip_rows_really_clip():
    """The ek row clips inside its step (gradients untouched, the coefficient consumed), the
    baseline through torch.nn.utils.clip_grad_norm_ (gradients rewritten to norm max_norm)."""
    case = bench.Case(numel=1 << 15, tensors=4, clip=True)
    fn, (opt, params) = bench.build_row("ek[reference]", case)
    grads = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    norm = torch.nn.utils.get_total_norm(grads)
    assert norm > bench.CLIP_MAX_NORM
    fn()
    assert opt._clip_pending is None
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    ref = [torch.nn.Parameter(b.clone()) for b in before]
    coef = torch.clamp(bench.CLIP_MAX_NORM / (norm + 1e-6), max=1.0)
    for r, g in zip(ref, grads):
        r.grad = g.clone()
    bench._ek_optimizer(case, ref, "reference").step(grad_scale=(1 / coef).reshape(1))
    assert all(torch.equal(p, r) for p, r in zip(params, ref))
    fn, (t_opt, t_params, _) = bench.build_row(bench.CLIP_BASELINE, case)
    fn()
    after = torch.nn.utils.get_total_norm([p.grad for p in t_params])
    assert after == pytest.approx(bench.CLIP_MAX_NORM, rel=1e-4)
    with pytest.raises(ValueError, match="no clipping variant"):
        bench.build_row("torch fused + AveragedModel", case)


def test_bench_rows_option_and_its_error(tmp_path, capsys):
    path = tmp_path / "bench.json"
    keep = ["ek[reference]", bench.BASELINE, bench.COPY]
    assert bench.main(TINY + ["--rows", *keep, "--json", str(path)]) == 0
    assert [r["name"] for r in json.loads(path.read_text())] == keep
    assert bench.main(TINY + ["--clip", "--rows", "torch fused + AveragedModel"]) == 2
    assert "not rows of this run" in capsys.readouterr().err


# --- --host: host µs per step() at tiny tensors ---------------------------------------------
HOST = ["--host", "--device", "cpu", "--tensors", "2", "5", "--repeats", "3", "--warmup", "1",
        "--quiet"]


def test_bench_host_rows_and_keys(tmp_path, capsys):
    """Every row at every tensor count, positive times, speedup relative to torch fused (never
    a speed assertion: the numbers depend on the machine)."""
    path = tmp_path / "host.json"
    assert bench.main(HOST + ["--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    names = bench.host_row_names("adamw")
    assert names[2] == bench.HOST_BASELINE
    assert [(r["tensors"], r["name"]) for r in rows] == [(k, n) for k in (2, 5) for n in names]
    for r in rows:
        assert list(r) == list(bench.HOST_KEYS)
        assert r["us"] > 0 and math.isfinite(r["us"]), r
        assert r["us_per_tensor"] == pytest.approx(r["us"] / r["tensors"])
        assert r["numel_per_tensor"] == bench.HOST_NUMEL and r["repeats"] == 3
        assert r["speedup"] > 0
        assert r["backend"] == (bench._host_backend("cpu") if r["name"].startswith("ek ")
                                else "torch")
        if r["name"] == bench.HOST_BASELINE:
            assert r["speedup"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert "| 5 | ek flat |" in out and "µs/step" in out


def test_bench_host_feeds_fresh_gradients():
    """The default layout gets new gradient objects each step (as after a backward), the flat
    layout new values in its bound views; both optimizers really step on them."""
    case = bench.Case(numel=3 * bench.HOST_NUMEL, tensors=3)
    row = bench._HostRow("ek default", case, "reference")
    first = [p.grad for p in row.params]
    row.feed()
    assert all(p.grad is not g for p, g in zip(row.params, first))
    flat = bench._HostRow("ek flat", case, "reference")
    views = [p.grad for p in flat.params]
    flat.feed()
    assert all(p.grad is v for p, v in zip(flat.params, views))
    assert all(torch.equal(v, g) for v, g in zip(views, flat.grad_sets[flat.turn]))
    for r in (row, flat):
        before = [p.detach().clone() for p in r.params]
        r.step()
        assert not any(torch.equal(p, b) for p, b in zip(r.params, before))


def test_bench_host_plot_and_option_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "host.png"
    assert bench.main(HOST + ["--rows", "ek default", bench.HOST_BASELINE, "--plot",
                              str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.main(HOST + ["--rows", "ek[cpp]"]) == 2
    assert "not rows of --host" in capsys.readouterr().err
    assert bench.main(HOST + ["--clip"]) == 2
    assert "not used by --host" in capsys.readouterr().err
    # without --host, --tensors keeps its meaning: one K
    assert bench.main(TINY + ["--tensors", "3", "4"]) == 2
    assert "several tensor counts" in capsys.readouterr().err


def test_stochastic_rounding_rows(capsys):
    """--stochastic-rounding adds an ek[...,sr] row after each ek row (bf16 here), timed like
    the others; the SR optimizer it builds really rounds stochastically."""
    assert bench.main(TINY + ["--dtype", "bf16", "--stochastic-rounding", "--json",
                              "/dev/null"]) == 0
    out = capsys.readouterr().out
    ek_rows = [n for n in bench.row_names("cpu", stochastic_rounding=True) if n.startswith("ek[")]
    plain = [n for n in _expected_names() if n.startswith("ek[")]
    assert ek_rows[0::2] == plain and ek_rows[1::2] == [n[:-1] + ",sr]" for n in plain]
    for name in ek_rows:
        assert f"| {name} " in out or f"|{name}" in out or name in out
    case = bench.Case(dtype="bf16", numel=300, tensors=3)
    fn, (opt, params) = bench.build_row("ek[reference,sr]", case)
    assert opt.param_groups[0]["stochastic_rounding"] is True
    fn()
    _, (opt_rn, _) = bench.build_row("ek[reference]", case)
    assert opt_rn.param_groups[0]["stochastic_rounding"] is False
