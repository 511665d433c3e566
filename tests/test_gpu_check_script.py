"""scripts/gpu_check.sh's pieces that run anywhere: the bench's GPU rows (a device-to-device
copy, torch.compile'd AdamW + _foreach_lerp_), the summary's arithmetic, and the script's
syntax and dry-run flags. (The whole dry run -- ~3 minutes on a 2-core machine, the compiled
row's compilation most of it -- is ``scripts/gpu_check.sh --dry-run``.)"""
from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess

import pytest

from ema_kernels import bench

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_copy_row_is_default_on_cuda_only_and_accepted_by_name_anywhere():
    cpu = bench.row_names("cpu")
    assert bench.COPY_D2D not in cpu and bench.COMPILED in cpu  # the compiled peer: everywhere
    cuda = bench.row_names("cuda")
    assert cuda.index(bench.COMPILED) < cuda.index(bench.COPY) < cuda.index(bench.COPY_D2D)
    assert {bench.COPY_D2D, bench.COMPILED} <= set(bench.known_row_names("cpu"))
    assert bench.COPY_D2D not in bench.known_row_names("cpu", clip=True)


def test_the_copy_row_moves_the_steps_bytes():
    case = bench.Case(numel=3000, tensors=3)
    rows = bench.run([case], names=["ek[reference]", bench.BASELINE, bench.COPY,
                                    bench.COPY_D2D], repeats=3, warmup=1)
    by = {r["name"]: r for r in rows}
    assert by[bench.COPY_D2D]["ms"] > 0 and by[bench.COPY_D2D]["pct_of_copy"] > 0
    # one call of the copy is one "step": the same bytes as the fused step (36 B x numel)
    assert bench.calls_per_fn(bench.COPY_D2D, bench.Case(ema_every=4)) == 1
    fn, (src, dst) = bench._row_copy_d2d(case)
    assert src.numel() * 8 >= 36 * case.numel > (src.numel() - 1) * 8


def _summary():
    spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "scripts" /
                                                  "gpu_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_summary_relates_every_row_to_the_copy_and_both_torch_baselines():
    mod = _summary()
    common = dict(optimizer="adamw", dtype="fp32", numel=1 << 20, tensors=64, emas=1,
                  ema_every=1)
    rows = [dict(common, name="ek[cuda]", ms=0.5, gbps=90.0),
            dict(common, name=mod.FUSED, ms=1.0, gbps=45.0),
            dict(common, name=mod.COMPILED, ms=0.75, gbps=60.0),
            dict(common, name="copy dst.copy_(src)", ms=0.45, gbps=100.0)]
    table = mod.bench_table(rows)
    line = next(ln for ln in table.splitlines() if ln.startswith("| ek[cuda]"))
    assert line == "| ek[cuda] | 0.5000 | 90.0 | 90.0 | 2.00 | 1.50 |"
    assert "1M parameters in 64 tensors" in table


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_parses_and_refuses_unknown_flags(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--dry-run" in r.stdout
