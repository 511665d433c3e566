"""pytest-benchmark suite: the rows of ``python -m ema_kernels bench`` at a few sizes.

    pytest benchmarks --benchmark-only                       # CPU, or the GPU if one is visible
    EMA_BENCH_OPTIMIZER=sgd EMA_BENCH_DTYPE=bf16 pytest benchmarks --benchmark-only
    pytest benchmarks --benchmark-only --benchmark-json=out.json --benchmark-group-by=group

Not part of the default test run (``testpaths = ["tests"]``). Each benchmark is one optimizer
step + one EMA update of ``numel`` parameters split over 64 tensors; ``extra_info`` carries
the bytes per parameter the step must move and the effective GB/s at the median time.
"""
import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from ema_kernels import bench  # noqa: E402

DEVICE = os.environ.get("EMA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
OPTIMIZER = os.environ.get("EMA_BENCH_OPTIMIZER", "adamw")
DTYPE = os.environ.get("EMA_BENCH_DTYPE", "fp32")
TENSORS = int(os.environ.get("EMA_BENCH_TENSORS", "64"))
SIZES = [1 << 12, 1 << 16, 1 << 20] + ([1 << 24] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("numel", SIZES, ids=lambda n: f"numel=2^{n.bit_length() - 1}")
@pytest.mark.parametrize("name", bench.row_names(DEVICE))
def test_step_plus_ema(benchmark, name, numel):
    case = bench.Case(device=DEVICE, optimizer=OPTIMIZER, dtype=DTYPE, numel=numel,
                      tensors=TENSORS, ema_every=1)
    try:
        fn, keep = bench.build_row(name, case)
    except bench.peers.PeerMissing as e:  # a peer row whose package is not installed
        pytest.skip(str(e))
    if DEVICE == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    for _ in range(2):
        timed()  # warm-up: lazy state, first EMA copy, kernel compilation
    benchmark.group = f"{DEVICE} {OPTIMIZER} {DTYPE} numel=2^{numel.bit_length() - 1}"
    benchmark.extra_info.update(device=DEVICE, optimizer=OPTIMIZER, dtype=DTYPE, numel=numel,
                                tensors=TENSORS, bytes_per_param=case.bytes_per_param)
    benchmark(timed)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        median = stats.stats.median
        benchmark.extra_info["gbps"] = case.bytes_per_param * numel / median / 1e9
    del keep
