"""``bench --host``: the host (CPU-side) µs of one ``step()`` call at many tiny tensors, its
rows, how they are timed (:func:`run_host`), its table and its plot."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .cases import EMA_DECAY, Case, _ek_optimizer, _torch_optimizer
from .report import _num
from .rows import ek_backends
from .timing import _free


# With HOST_NUMEL-element tensors the kernels are nearly free, so a step's time is what the
# optimizer does on the host per call: walk the parameters, read and check every .grad, build
# the launch. The sweep shows how that grows with the tensor count.
HOST_NUMEL = 8
HOST_TENSORS = (16, 100, 1000, 2000, 10000)
HOST_BASELINE = "torch fused AdamW + _foreach_lerp_"
HOST_KEYS = ("name", "device", "backend", "optimizer", "dtype", "tensors", "numel_per_tensor",
             "repeats", "us", "us_per_tensor", "speedup")
_OPT_TITLE = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}


def host_row_names(optimizer: str = "adamw") -> List[str]:
    """The ``--host`` rows, in table order; the third is the baseline of ``speedup``."""
    t = _OPT_TITLE[optimizer]
    return ["ek default", "ek flat", f"torch fused {t} + _foreach_lerp_",
            f"torch foreach {t} + _foreach_lerp_"]


def host_repeats(tensors: int) -> int:
    """Timed steps per row: 30 at >= 2000 tensors, more where a step is cheap (16 tensors:
    1000), so that small counts get a steady median and the sweep stays within ~a minute."""
    return max(30, min(1000, 60000 // tensors))


class _HostRow:
    """One ``--host`` row: an optimizer over ``tensors`` tiny parameters and two pre-made
    gradient sets. :meth:`feed` (untimed) hands the next step its gradients, :meth:`step`
    (timed) is the call whose host time is measured."""

    def __init__(self, name: str, case: Case, backend: str):
        self.name = name
        torch.manual_seed(0)
        dt, dev = case.torch_dtype, case.device
        self.params = [torch.nn.Parameter(torch.randn(HOST_NUMEL, device=dev).to(dt))
                       for _ in range(case.tensors)]
        self.grad_sets = [[(torch.randn(HOST_NUMEL, device=dev) * 1e-2).to(dt)
                           for _ in self.params] for _ in range(2)]
        self.turn = 0
        self.flat = name == "ek flat"
        for p, g in zip(self.params, self.grad_sets[0]):
            p.grad = g
        if name.startswith("ek "):
            # _ek_optimizer binds the flat layout's gradient views (zero_grad(set_to_none=
            # False)) and copies the current gradients into them.
            self.opt = _ek_optimizer(case, self.params, backend, flatten=self.flat)
            self.views = [p.grad for p in self.params] if self.flat else None
            self._ema = None
        else:
            self.fallback = False
            if name.startswith("torch fused"):
                try:
                    self.opt = _torch_optimizer(case, self.params, fused=True)
                except RuntimeError:  # torch has no fused kernel for this device or dtype
                    self.opt = _torch_optimizer(case, self.params, foreach=True)
                    self.fallback = True
            else:
                self.opt = _torch_optimizer(case, self.params, foreach=True)
            cur = [p.detach() for p in self.params]
            zs = [c.clone() for c in cur]
            w = 1.0 - EMA_DECAY

            def ema():
                torch._foreach_lerp_(zs, cur, w)
            self._ema = ema

    def feed(self) -> None:
        """The next step's gradients, as after a backward: new tensor objects for the default
        layouts; for ``ek flat`` new values copied into the bound views (that layout's fast
        path reads the flat buffer the views share, so new objects would leave it)."""
        self.turn ^= 1
        src = self.grad_sets[self.turn]
        if self.flat:
            torch._foreach_copy_(self.views, src)
        else:
            for p, g in zip(self.params, src):
                p.grad = g

    @torch.no_grad()
    def step(self) -> None:
        self.opt.step()
        if self._ema is not None:
            self._ema()


def _host_backend(device: str) -> str:
    """The backend the ek rows use: what ``backend="auto"`` picks on the device (cpp on a CPU
    with the extension built), named so that the table says which one was measured."""
    names = ek_backends(device)
    return names[0] if names else "reference"


def run_host(tensor_counts: Sequence[int] = HOST_TENSORS, *, device: str = "cpu",
             optimizer: str = "adamw", dtype: str = "fp32",
             names: Optional[Sequence[str]] = None, warmup: int = 3,
             repeats: Optional[int] = None,
             progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Host µs per ``step()`` of every ``--host`` row at each tensor count; dicts with
    :data:`HOST_KEYS` (``speedup`` = the torch fused row's µs over the row's).

    Each repetition visits the rows in turn (round-robin, so load from other processes lands
    on all rows alike): one untimed step (caches warm again after the other rows), fresh
    gradients (untimed), then one step timed with ``perf_counter``; the median over the
    repetitions is reported. On CUDA the timed region
    is only the host side of the call (kernels are launched, not waited for); the device is
    synchronized between repetitions, outside it, so queued work never throttles the host.
    """
    backend = _host_backend(device)
    all_names = host_row_names(optimizer)
    names = list(names or all_names)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out: List[dict] = []
    for i, k in enumerate(tensor_counts, 1):
        case = Case(device=device, optimizer=optimizer, dtype=dtype, numel=k * HOST_NUMEL,
                    tensors=k)
        reps = repeats or host_repeats(k)
        if progress:
            progress(f"[{i}/{len(tensor_counts)}] host time, {k} tensors x {HOST_NUMEL} "
                     f"elements, {reps} steps per row ...")
        rows = {name: _HostRow(name, case, backend) for name in names}
        for row in rows.values():
            for _ in range(warmup):  # lazy state, first-step paths, table caches: untimed
                row.feed()
                row.step()
        sync()
        samples: Dict[str, List[float]] = {name: [] for name in rows}
        for _ in range(reps):
            for name, row in rows.items():
                # One untimed step first, as the GB/s bench does before each sample: the
                # row's code and data back in cache after the other rows ran, so the sample
                # is the step's own host work, not the cache misses the round-robin causes.
                row.feed()
                row.step()
                row.feed()
                sync()
                t0 = time.perf_counter()
                row.step()
                samples[name].append(time.perf_counter() - t0)
        sync()
        base_name = all_names[2]
        us = {name: statistics.median(v) * 1e6 for name, v in samples.items()}
        for name in names:
            base = us.get(base_name)
            if name.startswith("ek "):
                impl = backend
            else:  # the fused row says so when it had to fall back to foreach
                impl = "torch foreach" if rows[name].fallback else "torch"
            out.append(dict(name=name, device=device, backend=impl, optimizer=optimizer,
                            dtype=dtype, tensors=k,
                            numel_per_tensor=HOST_NUMEL, repeats=reps, us=us[name],
                            us_per_tensor=us[name] / k,
                            speedup=base / us[name] if base is not None else float("nan")))
            if progress:
                progress(f"    {name:<38} {us[name]:12.1f} us/step")
        rows = None  # noqa: F841 - release before the next count
        _free(device)
    return out


def format_host_table(rows: Sequence[dict]) -> str:
    """Markdown: tensors, row, µs/step, µs per tensor, speedup vs torch fused."""
    head = ["tensors", "row", "µs/step", "µs/tensor", "vs torch fused"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", ":---"] + ["---:"] * 3) + "|"]
    for r in rows:
        s = r["speedup"]
        out.append("| " + " | ".join([
            str(r["tensors"]), r["name"], _num(r["us"], ".1f"), _num(r["us_per_tensor"], ".3f"),
            _num(s, ".1f" if s == s and s >= 10 else ".2f") + ("x" if s == s else ""),
        ]) + " |")
    return "\n".join(out) + "\n"


def write_host_plot(rows: Sequence[dict], path: str, title: str = "") -> None:
    """µs per step vs tensor count, one line per row (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name in dict.fromkeys(r["name"] for r in rows):
        pts = sorted((r["tensors"], r["us"]) for r in rows if r["name"] == name
                     and r["us"] == r["us"])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                    linewidth=2.2 if name.startswith("ek ") else 1.4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"parameter tensors ({HOST_NUMEL} elements each)")
    ax.set_ylabel("host µs per step() (median)")
    r0 = rows[0] if rows else {}
    ax.set_title(f"host time per step, {r0.get('optimizer', '')} + EMA, ek backend "
                 f"{next((r['backend'] for r in rows if r['name'].startswith('ek ')), '?')}",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

