"""The markdown summary of scripts/gpu_check.sh: the GB/s bench's rows with their share of the
copy bandwidth and their speedups over torch's baselines, and the host-time rows.

    python scripts/gpu_summary.py BENCH_JSON HOST_JSON [--env FILE] > summary.md

Per case (one parameter count): ms, GB/s (the fused step's bytes over the time), % of the
device-to-device copy measured in the same run (``copy dst.copy_(src)``, or the in-place
stream ``a+=b`` where the run has no copy row), the speedup over ``torch fused +
foreach_lerp`` and over ``torch.compile foreach + foreach_lerp``. Missing rows read "n/a".
"""
from __future__ import annotations

import argparse
import json
import math
import sys

FUSED = "torch fused + foreach_lerp"
COMPILED = "torch.compile(foreach step + foreach_lerp)"  # ema_kernels.bench.COMPILED
COPIES = ("copy dst.copy_(src)", "stream a+=b")


def _num(x, fmt):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _ratio(a, b):
    if a is None or b is None or not (a == a and b == b) or b <= 0:
        return None
    return a / b


def _size(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def bench_table(rows) -> str:
    out = []
    cases = []
    for r in rows:
        key = (r["optimizer"], r["dtype"], r["numel"], r["tensors"], r["emas"], r["ema_every"])
        if key not in cases:
            cases.append(key)
    for key in cases:
        same = {r["name"]: r for r in rows
                if (r["optimizer"], r["dtype"], r["numel"], r["tensors"], r["emas"],
                    r["ema_every"]) == key}
        copy_name = next((c for c in COPIES if c in same), None)
        copy = same[copy_name]["gbps"] if copy_name else None
        fused = same.get(FUSED, {}).get("ms")
        compiled = same.get(COMPILED, {}).get("ms")
        opt, dtype, numel, tensors, emas, every = key
        out.append(f"### {opt} {dtype}, {_size(numel)} parameters in {tensors} tensors, "
                   f"{emas} EMA(s), ema_every={every} (% of '{copy_name or 'no copy row'}')")
        out.append("")
        out.append("| row | ms | GB/s | % of copy | vs fused | vs compiled |")
        out.append("|:---|---:|---:|---:|---:|---:|")
        for name, r in same.items():
            pct = _ratio(r["gbps"], copy)
            out.append("| " + " | ".join([
                name, _num(r["ms"], ".4f"), _num(r["gbps"], ".1f"),
                _num(None if pct is None else 100 * pct, ".1f"),
                _num(_ratio(fused, r["ms"]), ".2f"), _num(_ratio(compiled, r["ms"]), ".2f"),
            ]) + " |")
        out.append("")
    return "\n".join(out)


def host_table(rows) -> str:
    out = ["| row | tensors | µs per step() | vs torch fused |", "|:---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['tensors']} | {_num(r.get('us'), '.1f')} | "
                   f"{_num(r.get('speedup'), '.2f')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_json")
    p.add_argument("host_json", nargs="?")
    p.add_argument("--env", help="a file of environment lines to put first")
    args = p.parse_args(argv)
    parts = []
    if args.env:
        with open(args.env) as f:
            parts.append("```\n" + f.read().strip() + "\n```\n")
    with open(args.bench_json) as f:
        parts.append("## bench (GB/s)\n\n" + bench_table(json.load(f)))
    if args.host_json:
        with open(args.host_json) as f:
            parts.append("## bench --host\n\n" + host_table(json.load(f)) + "\n")
    sys.stdout.write("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
