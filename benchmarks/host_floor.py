"""The floor under a step's host time at many tiny tensors, measured beside the step itself.

Issue 12 asks for <= 150 µs per ``step()`` at 2000 eight-element tensors on the 2-core CPU VM
(cpp backend, fresh gradients every step). This script measures, in one process and
interleaved (the VM is shared and noisy), what any optimizer step must at least do there and
what ours does:

- ``read addresses (C++)``: a C++ loop over the parameters reading ``p.data_ptr()`` and
  ``p.grad().data_ptr()`` through torch's public API, nothing checked: the least a step that
  finds the gradients itself must do (built here with ``torch.utils.cpp_extension.load_inline``),
- ``+ one float of θ and g (C++)``: the same loop also loading one element of each (the
  kernel's first touch of the data),
- ``prepare()``: ``StepTable.prepare()``, the checks of every parameter and gradient plus the
  addresses (csrc/step_table.cpp),
- ``cpp kernel``: ``StepTable.adam(...)`` over the prepared table,
- ``step()``: the whole ``ek.AdamW(...).step()``,
- ``[p.grad for p in params]``: Python only listing the gradients,
- ``torch fused AdamW + _foreach_lerp_``: the baseline of ``bench --host``.

Each row's sample: fresh gradients (new tensor objects, as after a backward), one untimed
step, fresh gradients again, then the timed call (``time.thread_time``: CPU time, so a
descheduled process does not count). Medians over ``--repeats``.

    python benchmarks/host_floor.py --tensors 16 2000 --json benchmarks/results/cpu_host_floor_1thread.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

_FLOOR_SRC = r"""
#include <torch/extension.h>
#include <vector>

// The least per-step host work: every parameter's and every gradient's data address.
struct Floor {
  std::vector<at::Tensor> ps;
  explicit Floor(std::vector<at::Tensor> p) : ps(std::move(p)) {}
  int64_t addresses() const {
    uintptr_t acc = 0;
    for (const auto& p : ps)
      acc ^= reinterpret_cast<uintptr_t>(p.data_ptr()) ^
             reinterpret_cast<uintptr_t>(p.grad().data_ptr());
    return int64_t(acc & 0xffff);
  }
  double with_data() const {
    double acc = 0;
    for (const auto& p : ps)
      acc += *static_cast<const float*>(p.grad().const_data_ptr()) +
             *static_cast<const float*>(p.const_data_ptr());
    return acc;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Floor>(m, "Floor")
      .def(pybind11::init<std::vector<at::Tensor>>())
      .def("addresses", &Floor::addresses)
      .def("with_data", &Floor::with_data);
}
"""

ROWS = ("read addresses (C++)", "+ one float of θ and g (C++)", "prepare()", "cpp kernel",
        "step()", "[p.grad for p in params]", "torch fused AdamW + _foreach_lerp_")


def _floor_module():
    from torch.utils.cpp_extension import load_inline
    return load_inline("ek_host_floor", cpp_sources=[_FLOOR_SRC], extra_cflags=["-O3"],
                       verbose=False)


def measure(tensors: int, repeats: int, floor_mod) -> dict:
    from ema_kernels import bench
    from ema_kernels.bench import Case, _HostRow
    case = Case(device="cpu", optimizer="adamw", dtype="fp32", numel=tensors * bench.HOST_NUMEL,
                tensors=tensors)
    ek_row = _HostRow("ek default", case, "cpp")
    torch_row = _HostRow(bench.HOST_BASELINE, case, "cpp")
    for _ in range(5):
        for r in (ek_row, torch_row):
            r.feed()
            r.step()
    sets = [ts for gsets in ek_row.opt._sets for ts in gsets]
    if len(sets) != 1 or sets[0].table in (None, False):
        raise RuntimeError("the ek row did not build one StepTable: is the cpp backend built?")
    table = sets[0].table
    floor = floor_mod.Floor(ek_row.params)
    params = ek_row.params
    hp = ek_row.opt.param_groups[0]

    def kernel():
        table.adam(hp["lr"], 0.9, 0.999, 1e-8, 0.01, True, False, False, 1e-3, 0.5, (1e-4,),
                   None, None, None, 0)

    calls = {
        ROWS[0]: (ek_row, floor.addresses, None),
        ROWS[1]: (ek_row, floor.with_data, None),
        ROWS[2]: (ek_row, table.prepare, None),
        ROWS[3]: (ek_row, kernel, table.prepare),  # prepared (untimed) first
        ROWS[4]: (ek_row, ek_row.step, None),
        ROWS[5]: (ek_row, lambda: [p.grad for p in params], None),
        ROWS[6]: (torch_row, torch_row.step, None),
    }
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (row, fn, before) in calls.items():
            row.feed()
            row.step()
            row.feed()
            if before is not None:
                before()
            t0 = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - t0)
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tensors", type=int, nargs="+", default=[16, 2000])
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as bench --host --threads 1: no OpenMP fork/join in the rows
    mod = _floor_module()
    out = []
    for k in args.tensors:
        us = measure(k, args.repeats, mod)
        for name in ROWS:
            out.append(dict(tensors=k, row=name, us=us[name], us_per_tensor=us[name] / k,
                            repeats=args.repeats))
    print(f"# host floor, {_machine()}: CPU µs per call, median of {args.repeats}")
    print("| row | " + " | ".join(f"{k} tensors" for k in args.tensors) + " |")
    print("|:---|" + "---:|" * len(args.tensors))
    for name in ROWS:
        vals = [r["us"] for r in out if r["row"] == name]
        print(f"| {name} | " + " | ".join(f"{v:,.1f}" for v in vals) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=_machine(), load=os.getloadavg(), rows=out), f, indent=1)
    return 0


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, " \
        f"torch {torch.__version__}, 1 thread"


if __name__ == "__main__":
    sys.exit(main())
