"""How a row is timed, and :func:`run`, which builds and times every row of every case.

CPU: ``time.perf_counter`` around batches of calls (each sample >= 2 ms), the rows of a case
sampled in turns (round-robin), median per row. CUDA: ``triton.testing.do_bench`` (median),
CUDA events without triton."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import peers
from .cases import BASELINE, CLIP_BASELINE, COPY, RULE_BASELINE, Case
from .report import _fmt_numel
from .rows import build_row, calls_per_fn, row_names


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
def _calibrate(fn) -> int:
    """Calls per timed sample so that a sample lasts >= 2 ms (perf_counter noise stays small)."""
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(2e-3 / est))


def _sample(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _enough(n: int, spent: float, budget: float, repeats: Optional[int]) -> bool:
    """Stop after ``repeats`` samples, else once ``budget`` has passed (5 to 50 samples; 3 when
    a sample is so slow that 5 would take over 3 x ``budget``): bounded wall time."""
    if repeats:
        return n >= repeats
    return n >= 50 or (n >= 5 and spent >= budget) or (n >= 3 and spent >= 3 * budget)


def _time_cpu_interleaved(fns: Dict[str, Callable], *, warmup: int, repeats: Optional[int],
                          target_s: float) -> Dict[str, float]:
    """Median seconds per call of every row, the rows' samples taken in turns.

    Round-robin sampling spreads whatever else the machine is doing over all rows alike, so
    their ratios survive a busy machine better than row-after-row timing. Each sample is
    preceded by one untimed call (the row's buffers back in cache, as in a training loop).
    """
    for fn in fns.values():
        for _ in range(max(1, warmup)):
            fn()
    inner = {name: _calibrate(fn) for name, fn in fns.items()}
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    n = 0
    while not _enough(n, time.perf_counter() - start, target_s * len(fns), repeats):
        for name, fn in fns.items():
            fn()
            samples[name].append(_sample(fn, inner[name]))
        n += 1
    return {name: statistics.median(v) for name, v in samples.items()}


def _time_cpu(fn, *, warmup: int, repeats: Optional[int], target_s: float) -> float:
    """Median seconds per call of one row (perf_counter around batches of >= 2 ms)."""
    return _time_cpu_interleaved({"row": fn}, warmup=warmup, repeats=repeats,
                                 target_s=target_s)["row"]


def _time_cuda(fn, *, warmup: int, repeats: Optional[int], target_s: float) -> float:
    """Median seconds per call on CUDA: triton.testing.do_bench, or CUDA events without it."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(fn, warmup=25, rep=max(20, int(target_s * 1000)),
                        return_mode="median") / 1e3
    for _ in range(max(3, warmup)):
        fn()
    torch.cuda.synchronize()
    n = repeats or 50
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------
# CPU rows of a case are timed interleaved (all alive at once) while they fit in this much
# memory (estimate: 48 B per parameter per row), one after another beyond it.
INTERLEAVE_MAX_BYTES = 3 << 30


def _free(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _build(name: str, case: Case, progress, errors: Optional[Dict[str, str]] = None):
    torch.manual_seed(0)
    try:
        return build_row(name, case)
    except Exception as e:  # a baseline this torch does not support here: report, keep going
        why = str(e) if isinstance(e, peers.PeerMissing) else f"{type(e).__name__}: {e}"
        if errors is not None:
            errors.setdefault(name, why)
        if progress:
            progress(f"    {name}: could not be built ({why})")
        return None, None


def _measure_case(case: Case, names: Sequence[str], *, warmup, repeats, target_s,
                  progress, errors: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """Seconds per call of each row's fn for one case (NaN for a row that failed)."""
    out = {name: float("nan") for name in names}
    cuda = torch.device(case.device).type == "cuda"
    interleave = not cuda and 48 * case.numel * len(names) <= INTERLEAVE_MAX_BYTES
    if interleave:
        built = {name: _build(name, case, progress, errors) for name in names}
        fns = {name: fk[0] for name, fk in built.items() if fk[0] is not None}
        try:
            out.update(_time_cpu_interleaved(fns, warmup=warmup, repeats=repeats,
                                             target_s=target_s))
        except Exception as e:
            if progress:
                progress(f"    failed ({type(e).__name__}: {e}); timing rows one by one")
            interleave = False
        built = fns = None  # noqa: F841
        _free(case.device)
        if interleave:
            return out
    timer = _time_cuda if cuda else _time_cpu
    for name in names:
        fn, keep = _build(name, case, progress, errors)
        if fn is not None:
            try:
                for _ in range(warmup):
                    fn()  # lazy state, the first EMA copy, kernel compilation: not timed
                if cuda:
                    torch.cuda.synchronize()
                out[name] = timer(fn, warmup=warmup, repeats=repeats, target_s=target_s)
            except Exception as e:
                if progress:
                    progress(f"    {name}: failed ({type(e).__name__}: {e})")
        fn = keep = None  # noqa: F841 - release the buffers before the next row
        _free(case.device)
    return out


def run(cases: Sequence[Case], *, names: Optional[Sequence[str]] = None, warmup: int = 2,
        repeats: Optional[int] = None, target_s: float = 0.25,
        progress: Optional[Callable[[str], None]] = None,
        stochastic_rounding: bool = False, compile: bool = True,
        errors: Optional[Dict[str, str]] = None) -> List[dict]:
    """Benchmark every row on every case; a list of dicts with :data:`KEYS`. ``errors``: a
    dict that receives, for each row that could not be built, why (a missing package)."""
    rows: List[dict] = []
    for i, case in enumerate(cases, 1):
        case_names = list(names or row_names(case.device, clip=case.clip,
                                             stochastic_rounding=stochastic_rounding,
                                             compile=compile,
                                             optimizer=case.optimizer))
        if progress:
            progress(f"[{i}/{len(cases)}] {case.device} {case.optimizer} {case.dtype} "
                     f"numel={_fmt_numel(case.numel)} in {min(case.tensors, case.numel)} tensors, "
                     f"ema_every={case.ema_every}, emas={case.emas}"
                     f"{', clip' if case.clip else ''}: {len(case_names)} rows ...")
        t0 = time.perf_counter()
        secs = _measure_case(case, case_names, warmup=warmup, repeats=repeats,
                             target_s=target_s, progress=progress, errors=errors)
        for name in case_names:
            bpp = case.row_bytes_per_param(name)
            ms = secs[name] * 1e3 / calls_per_fn(name, case)
            gbps = bpp * case.numel / (ms * 1e-3) / 1e9 if ms == ms and ms > 0 \
                else float("nan")
            rows.append(dict(name=name, device=case.device, optimizer=case.optimizer,
                             dtype=case.dtype, numel=case.numel,
                             tensors=max(1, min(case.tensors, case.numel)),
                             ema_every=case.ema_every, emas=case.emas, ms=ms,
                             bytes_per_param=bpp, gbps=gbps,
                             pct_of_copy=float("nan"), speedup=float("nan"), clip=case.clip))
            if progress:
                progress(f"    {name:<30} {ms:10.4f} ms  {gbps:8.2f} GB/s")
        if progress:
            progress(f"    ({time.perf_counter() - t0:.1f} s)")
    _relative_columns(rows)
    return rows


def _relative_columns(rows: List[dict]) -> None:
    """Fill ``pct_of_copy`` and ``speedup`` from the copy and baseline rows of the same case."""
    def key(r):
        return (r["device"], r["optimizer"], r["dtype"], r["numel"], r["tensors"],
                r["ema_every"], r["emas"], r.get("clip", False))
    ref: Dict[tuple, dict] = {}
    for r in rows:
        ref.setdefault(key(r), {})[r["name"]] = r
    for r in rows:
        same = ref[key(r)]
        cp = same.get(COPY)
        base = same.get(BASELINE, same.get(CLIP_BASELINE, same.get(RULE_BASELINE)))
        if cp is not None and cp["gbps"] == cp["gbps"] and cp["gbps"] > 0:
            r["pct_of_copy"] = 100.0 * r["gbps"] / cp["gbps"]
        if base is not None and base["ms"] == base["ms"] and r["ms"] == r["ms"] and r["ms"] > 0:
            r["speedup"] = base["ms"] / r["ms"]


