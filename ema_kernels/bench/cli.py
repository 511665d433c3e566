"""``python -m ema_kernels bench``'s command line: the flags and :func:`main`."""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Dict, List, Optional

import torch

from .cases import CLIP_BASELINE, DTYPES, EMA_DECAYS, CLIP_MAX_NORM, OPTIMIZERS, RULES, Case
from .host import (HOST_KEYS, HOST_NUMEL, HOST_TENSORS, format_host_table, host_row_names,
                   run_host, write_host_plot)
from .report import _busy_note, device_description, format_table, write_json, write_plot
from .rows import COMPILED, ek_backends, known_row_names
from .timing import run


_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``4096``, ``2^20``, ``2**20``, ``1e6``, ``16M``, ``4k`` -> an int > 0."""
    t = text.strip().lower().replace("_", "")
    try:
        m = re.fullmatch(r"(\d+)\s*(?:\^|\*\*)\s*(\d+)", t)
        if m:
            n = int(m.group(1)) ** int(m.group(2))
        elif t and t[-1] in _SUFFIX:
            n = int(float(t[:-1]) * _SUFFIX[t[-1]])
        else:
            n = int(float(t)) if ("e" in t or "." in t) else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (examples: 4096, 2^20, 1e6, 16M)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be >= 1")
    return n


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return n


def default_sizes(device: str) -> List[int]:
    if torch.device(device).type == "cuda":
        return [1 << e for e in (16, 18, 20, 22, 24, 26, 27)]
    return [1 << e for e in (12, 14, 16, 18, 20, 22)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ema_kernels bench",
        description="Time one optimizer step + EMA update: every available ema_kernels backend "
                    "against torch's optimizers with the EMAs people use, the packages "
                    "themselves (foreach lerp, AveragedModel, timm ModelEmaV3, ema-pytorch EMA, "
                    "diffusers EMAModel, torch.compile'd step + lerp) and an in-place stream "
                    "(a += b) of the same bytes. Table (Markdown) to stdout, progress to stderr.")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if a GPU is visible, else cpu")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="parameter (and gradient) dtype; ema_kernels keeps state and EMA in fp32")
    p.add_argument("--numel", type=parse_size, nargs="+", default=None, metavar="N",
                   help="total parameters (e.g. 2^20, 16M); several for a sweep; default a "
                        "sweep (cpu: 2^12..2^22, cuda: 2^16..2^27)")
    # One K for the GB/s bench; a list only with --host (its sweep of tensor counts).
    p.add_argument("--tensors", type=_positive_int, nargs="+", default=None, metavar="K",
                   help="split the parameters into K tensors (default 64); with --host: the "
                        f"tensor counts to sweep (default {' '.join(map(str, HOST_TENSORS))})")
    p.add_argument("--host", action="store_true",
                   help=f"host time per step() instead: µs per call at {HOST_NUMEL}-element "
                        f"tensors (the kernels nearly free), fresh gradients every step, rows "
                        f"'ek default', 'ek flat', torch fused and foreach + _foreach_lerp_; "
                        f"on CUDA the CPU side of the call (not synchronized inside)")
    p.add_argument("--ema-every", type=_positive_int, default=1, metavar="k",
                   help="update the EMA every k-th step (bytes and times are per step)")
    p.add_argument("--emas", type=int, choices=range(1, len(EMA_DECAYS) + 1), default=1,
                   metavar="N",
                   help=f"EMAs per parameter (1..{len(EMA_DECAYS)}, decays "
                        f"{', '.join(map(str, EMA_DECAYS))}): ek updates all N in the step's "
                        f"one pass, the baselines run N EMA updates")
    p.add_argument("--clip", action="store_true",
                   help=f"clip the gradients' norm every step (max_norm {CLIP_MAX_NORM}): ek "
                        f"rows clip_grad_norm_ + step (fp32 AdamW+EMA 40 B/param) against "
                        f"'{CLIP_BASELINE}' (52 B/param)")
    p.add_argument("--rows", nargs="+", default=None, metavar="NAME",
                   help="run only these rows (exact names as in the table; e.g. to keep a "
                        "large case within the interleaved-timing memory bound)")
    p.add_argument("--no-compile", action="store_true",
                   help=f"leave out the '{COMPILED}' row (its first call compiles: ~10-25 s "
                        f"per case on a CPU, in the untimed warm-up)")
    p.add_argument("--stochastic-rounding", action="store_true",
                   help="also time every ema_kernels row with stochastic_rounding=True (rows "
                        "ek[...,sr]; it rounds bf16/fp16 parameters, fp32 ones are unaffected)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed samples per row (CPU; default: as many as fit ~0.25 s, 3..50; "
                        "--host: timed steps per row, default 60000/K within 30..1000)")
    p.add_argument("--warmup", type=_positive_int, default=2, help="warm-up calls per row (CPU)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (torch.set_num_threads); default: torch's default")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of GB/s vs size (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m ema_kernels bench [flags]``; returns the exit status."""
    args = _parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible to torch "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
              file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib, which is not installed: "
                  "pip install 'ema-kernels[plot]' (or pip install matplotlib)", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.host:
        return _main_host(args, device)
    if args.tensors and len(args.tensors) > 1:
        print(f"error: --tensors takes one K here (got {args.tensors}); several tensor counts "
              f"are a sweep of --host", file=sys.stderr)
        return 2
    tensors = args.tensors[0] if args.tensors else 64
    sizes = args.numel or default_sizes(device)
    cases = [Case(device=device, optimizer=args.optimizer, dtype=args.dtype, numel=n,
                  tensors=tensors, ema_every=args.ema_every, emas=args.emas,
                  clip=args.clip)
             for n in sizes]
    if args.rows:
        known = known_row_names(device, clip=args.clip, optimizer=args.optimizer)
        bad = [r for r in args.rows if r not in known]
        if bad:
            print(f"error: --rows {bad} are not rows of this run; choose from {known}",
                  file=sys.stderr)
            return 2

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    skipped = [b for b in __import__("ema_kernels").available_backends(device)
               if b not in ek_backends(device)]
    for b in skipped:
        progress(f"note: backend {b!r} skipped on {device} (the Triton interpreter is a test "
                 f"vehicle, not a fast path)")
    desc = device_description(device)
    progress(f"bench on {desc}")
    busy = _busy_note(device)
    if busy:
        progress(busy)
    t0 = time.perf_counter()
    errors: Dict[str, str] = {}
    rows = run(cases, names=args.rows, warmup=args.warmup, repeats=args.repeats,
               progress=progress, stochastic_rounding=args.stochastic_rounding,
               compile=not args.no_compile, errors=errors)
    progress(f"done in {time.perf_counter() - t0:.1f} s")

    print(f"# {desc}")
    if hasattr(os, "getloadavg") and device == "cpu":
        print(f"# load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("# B/param = bytes the fused step must move per parameter; GB/s = B/param x numel / "
          "median time;\n# % of stream = GB/s over that of an in-place fp32 a += b moving the "
          "same bytes (the copy bandwidth)")
    if args.clip:
        print(f"# --clip: the '{CLIP_BASELINE}' row is credited with the bytes it moves "
              f"(norm pass + clip pass + step + lerp), the ek rows with the fused count")
    print()
    print(format_table(rows))
    for name, why in errors.items():
        print(f"# not run: {name}: {why}")
    if args.json:
        write_json(rows, args.json)
        progress(f"wrote {args.json}")
    if args.plot:
        write_plot(rows, args.plot, title=desc)
        progress(f"wrote {args.plot}")
    return 0


def _main_host(args, device: str) -> int:
    """``bench --host``: the host-time sweep (options that only shape the GB/s bench refused,
    so that a run never silently ignores what was asked)."""
    if args.optimizer in RULES:
        print(f"error: --host times {OPTIMIZERS[:3]} (against torch's own); "
              f"--optimizer {args.optimizer} has no torch twin there", file=sys.stderr)
        return 2
    ignored = [flag for flag, on in (("--numel", args.numel), ("--clip", args.clip),
                                     ("--emas", args.emas != 1),
                                     ("--ema-every", args.ema_every != 1)) if on]
    if ignored:
        print(f"error: {' '.join(ignored)}: not used by --host (it times {HOST_NUMEL}-element "
              f"tensors, one EMA updated every step)", file=sys.stderr)
        return 2
    names = host_row_names(args.optimizer)
    if args.rows:
        bad = [r for r in args.rows if r not in names]
        if bad:
            print(f"error: --rows {bad} are not rows of --host; choose from {names}",
                  file=sys.stderr)
            return 2

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    desc = device_description(device)
    progress(f"bench --host on {desc}")
    busy = _busy_note(device)
    if busy:
        progress(busy)
    counts = args.tensors or list(HOST_TENSORS)
    t0 = time.perf_counter()
    rows = run_host(counts, device=device, optimizer=args.optimizer, dtype=args.dtype,
                    names=args.rows, warmup=max(args.warmup, 3), repeats=args.repeats,
                    progress=progress)
    progress(f"done in {time.perf_counter() - t0:.1f} s")

    print(f"# {desc}")
    if hasattr(os, "getloadavg"):
        print(f"# load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    backend = next((r["backend"] for r in rows if r["name"].startswith("ek ")), None)
    print(f"# host time per step(): {args.optimizer} + EMA, {args.dtype}, {HOST_NUMEL} elements "
          f"per tensor, fresh gradients every step, median of the repeats"
          + (f"; ek backend {backend}" if backend else ""))
    if torch.device(device).type == "cuda":
        print("# cuda: the time is the CPU side of the call (launches queued, not waited "
              "for); the device is synchronized between repetitions only")
    print("# vs torch fused = torch fused + _foreach_lerp_ µs / the row's µs "
          "(higher = less host time)")
    print()
    print(format_host_table(rows))
    if args.json:
        write_json(rows, args.json, HOST_KEYS)
        progress(f"wrote {args.json}")
    if args.plot:
        write_host_plot(rows, args.plot, title=desc)
        progress(f"wrote {args.plot}")
    return 0
