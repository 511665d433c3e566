"""The bench's output: the device's description, the Markdown table, the JSON file and the
GB/s plot (the ``--host`` sweep's table and plot are in :mod:`ema_kernels.bench.host`)."""
from __future__ import annotations

import json
import os
import platform
from typing import Sequence

import torch

from .cases import BASELINE, CLIP_BASELINE, COPY, KEYS, RULE_BASELINE, RULES


def _fmt_numel(n: int) -> str:
    if n > 0 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("k", 1 << 10)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def device_description(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return (f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{threads} thread{'s' if threads != 1 else ''}")


def _busy_note(device: str) -> str:
    """A warning when other processes keep the CPUs busy (CPU timings then mislead)."""
    if torch.device(device).type != "cpu" or not hasattr(os, "getloadavg"):
        return ""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load <= 0.75 * cpus:
        return ""
    return (f"warning: this machine is busy (load average {load:.1f} on {cpus} CPUs): timings "
            f"will be noisy; with several torch threads, OpenMP regions stall whenever one "
            f"thread is descheduled (--threads 1 is steadier on a shared machine)")


def _num(x: float, fmt: str) -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table (readable in a terminal, pasteable into RESULTS.md)."""
    head = ["name", "numel", "tensors", "ms", "B/param", "GB/s", "% of stream", "speedup"]
    out = []
    configs = []
    for r in rows:
        c = (r["device"], r["optimizer"], r["dtype"], r["ema_every"], r.get("emas", 1),
             r.get("clip", False))
        if c not in configs:
            configs.append(c)
    for device, opt, dtype, every, n_emas, clip in configs:
        base = CLIP_BASELINE if clip else RULE_BASELINE if opt in RULES else BASELINE
        out.append(f"device={device}  optimizer={opt}  dtype={dtype}  ema_every={every}  "
                   f"emas={n_emas}{'  clip=True' if clip else ''}  (speedup vs '{base}')")
        out.append("")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in rows:
            if (r["device"], r["optimizer"], r["dtype"], r["ema_every"], r.get("emas", 1),
                    r.get("clip", False)) != (device, opt, dtype, every, n_emas, clip):
                continue
            ms, speedup = r["ms"], r["speedup"]
            out.append("| " + " | ".join([
                r["name"], _fmt_numel(r["numel"]), str(r["tensors"]),
                _num(ms, ".4f" if ms == ms and ms < 0.1 else ".3f"),
                _num(r["bytes_per_param"], "g"), _num(r["gbps"], ".2f"),
                _num(r["pct_of_copy"], ".1f"),
                _num(speedup, ".2f") + ("x" if speedup == speedup else ""),
            ]) + " |")
        out.append("")
    return "\n".join(out)


def _json_value(v):
    return None if isinstance(v, float) and v != v else v


def write_json(rows: Sequence[dict], path: str, keys: Sequence[str] = KEYS) -> None:
    """The rows' ``keys`` (the GB/s bench's by default; ``HOST_KEYS`` for ``--host``) as a
    JSON list, NaN as null."""
    with open(path, "w") as f:
        json.dump([{k: _json_value(r[k]) for k in keys} for r in rows], f, indent=1)
        f.write("\n")


def write_plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """GB/s vs numel, one line per row (log-log); the copy row dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = []
    for r in rows:
        c = (r["optimizer"], r["dtype"], r["ema_every"])
        if c not in configs:
            configs.append(c)
    fig, axes = plt.subplots(1, len(configs), figsize=(7.5 * len(configs), 5), squeeze=False)
    for ax, (opt, dtype, every) in zip(axes[0], configs):
        sel = [r for r in rows if (r["optimizer"], r["dtype"], r["ema_every"]) == (opt, dtype,
                                                                                  every)]
        names = list(dict.fromkeys(r["name"] for r in sel))
        for name in names:
            pts = sorted((r["numel"], r["gbps"]) for r in sel if r["name"] == name
                         and r["gbps"] == r["gbps"])
            if not pts:
                continue
            style = dict(linestyle="--", color="gray") if name == COPY else \
                dict(linewidth=2.2 if name.startswith("ek[") else 1.4)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("parameters (numel)")
        ax.set_ylabel(f"effective GB/s ({sel[0]['bytes_per_param']:g} B/param)")
        ax.set_title(f"{opt} + EMA, {dtype}, ema_every={every}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

