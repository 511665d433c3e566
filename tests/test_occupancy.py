"""Occupancy budget of the main kernel variants for sm_90, read from the compilers' output
(tests/occupancy.py says how): fp32 / bf16 AdamW and SGD with momentum, 1 and 2 EMAs, flat and
list layouts, for the CUDA kernels (the built extension's sm_90 cubins) and the Triton kernels
(compiled ahead of time, ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``),
plus the fp32 one-EMA variants of Triton's Lion, LARS and LAMB (both passes).

Each must not spill, and must keep an H100 busy: at least 32 resident warps per SM, or -- the
rule of DESIGN.md for a variant below that -- at least twice the bytes in flight per SM that
Little's law needs (2 x 3.35 TB/s x 0.9 µs / 132 SMs = 45.7 KB), counted as resident warps x 32
lanes x the 16-byte loads each thread issues before its first use of them.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import occupancy as occ

ROOT = pathlib.Path(__file__).resolve().parent.parent
ARCH = 90
NEED = 2 * occ.LITTLE_BYTES_PER_SM


def _kblock() -> int:
    m = re.search(r"constexpr int kBlock = (\d+);", (ROOT / "csrc" / "fused_cuda.cu").read_text())
    return int(m[1])


def _verdict(label, regs, spills, threads_per_block, loads16):
    warps = occ.resident_warps(regs, threads_per_block)
    inflight = occ.bytes_in_flight_per_sm(warps, loads16)
    ok = not spills and (warps >= occ.MIN_WARPS or inflight >= NEED)
    return ok, (f"{label}: {regs} regs x {threads_per_block} threads -> {warps} warps/SM, "
                f"{loads16} x 16 B loads before use -> {inflight / 1024:.0f} KB in flight "
                f"(need {occ.MIN_WARPS} warps or {NEED / 1024:.1f} KB){', SPILLS' if spills else ''}")


# -------------------------------------------------------------------------------- CUDA ------
# fused_kernel_2bps: the fp32 list kernels, held to 2 resident blocks per SM (fused_cuda.cu)
_CUDA_MAIN = re.compile(r"fused_kernel(_2bps)?<ek::\(anonymous namespace\)::(AdamOp<ek::(F32|BF16), "
                        r"false, [12]>|SgdOp<ek::(F32|BF16), 2, [12]>), ")


def _cuda_library():
    from ema_kernels.backends import _extension as ext
    info = ext.extension_info()
    if not info.get("built") or str(info.get("cuda")) not in ("1", "True"):
        pytest.skip(f"the extension has no CUDA kernels here (built without nvcc: "
                    f"{info.get('error') or 'CPU-only build'}); CI's full build has them")
    if str(ARCH) not in str(info.get("cuda_arch_list", "")) and \
            f"{ARCH // 10}.{ARCH % 10}" not in str(info.get("cuda_archs", "")):
        pytest.skip(f"the extension was built without sm_{ARCH} ({info.get('cuda_archs')})")
    if occ.cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's) to read the cubins")
    return info["path"]


def _check_cuda_variants(pattern, count):
    """The occupancy rule (_verdict) on every kernel of the sm_90 build whose demangled name
    matches ``pattern``; exactly ``count`` of them must exist."""
    lib = _cuda_library()
    usage = occ.resource_usage(lib, ARCH)
    names = occ.demangle(list(usage))
    main = {k: v for k, v in usage.items() if pattern.search(names[k])}
    assert len(main) == count, sorted(names[k] for k in main)
    block = _kblock()
    report, bad = [], []
    for k, u in main.items():
        label = names[k].replace("ek::(anonymous namespace)::", "").split("(")[0]
        ok, line = _verdict(label, u.regs, u.spills, block,
                            occ.vector_loads_before_use(lib, ARCH, k))
        report.append(line)
        if not ok:
            bad.append(line)
    print("\n".join(sorted(report)))
    assert not bad, "\n".join(bad)


def test_cuda_main_variants_keep_an_sm_busy_without_spilling():
    _check_cuda_variants(_CUDA_MAIN, 16)  # 2 optimizers x 2 dtypes x 2 EMA counts x 2 layouts


def test_cuda_main_variants_access_memory_as_global():
    """Every 16-byte access of the main variants is a global one (LDG/STG.E.128). The list
    kernels read their tensor pointers from the work table in memory, whose address space nvcc
    cannot infer (it does for kernel parameters): without fused_cuda.cu's __isGlobal hint they
    would be generic LD/ST.E.128."""
    lib = _cuda_library()
    usage = occ.resource_usage(lib, ARCH)
    names = occ.demangle(list(usage))
    main = [k for k in usage if _CUDA_MAIN.search(names[k])]
    assert len(main) == 16
    bad = []
    for k in main:
        sass = subprocess.run([occ.cuobjdump(), "-sass", "-arch", f"sm_{ARCH}", "-fun", k, lib],
                              capture_output=True, text=True, check=True).stdout
        generic = re.findall(r"\b(?:LD|ST)\.E\.128\b", sass)
        if generic or "LDG.E.128" not in sass or "STG.E.128" not in sass:
            bad.append(f"{names[k].split('(')[0]}: {len(generic)} generic 16-byte accesses")
    assert not bad, "\n".join(bad)


_CUDA_RULES = re.compile(r"fused_kernel(_2bps)?<ek::\(anonymous namespace\)::(LarsOp<ek::F32, 2, 1>|"
                         r"LambMomentsOp<ek::F32>|LambEmaOp<ek::F32, 1>), ")


def test_cuda_lars_and_lamb_main_variants_keep_an_sm_busy_without_spilling():
    """LARS (momentum) and LAMB's two passes, fp32 with one EMA, flat and list layouts (issue
    25): no spills, and the same occupancy rule as the main variants. LAMB's first pass keeps
    two float64 partial sums per thread (4 registers more) and ends with two atomicAdds."""
    _check_cuda_variants(_CUDA_RULES, 6)  # 3 kernels x 2 layouts


# ------------------------------------------------------------------------------ Triton ------
_TRITON_WORKER = r"""
import json, os, sys
from ema_kernels.backends import triton as tk
from ema_kernels.backends.triton.checks import _interpreted
assert not _interpreted()
want, out = json.loads(sys.argv[1]), sys.argv[2]
for label, fn, sig, const, attrs in tk.aot_variants():
    if label not in want:
        continue
    c = tk.aot_compile(fn, sig, const, attrs, int(sys.argv[3]))
    path = os.path.join(out, "k%d.cubin" % want.index(label))
    with open(path, "wb") as f:
        f.write(c.asm["cubin"])
    print(json.dumps({"label": label, "cubin": path, "name": c.metadata.name,
                      "num_warps": c.metadata.num_warps}), flush=True)
"""


def _triton_labels():
    labels = []
    for ty in ("fp32", "bf16"):
        for k in (1, 2):
            for layout in ("flat", "list"):
                labels.append(f"adam_{layout}[{ty},emas={k},amsgrad=False]")
                labels.append(f"sgd_{layout}[{ty},emas={k},momentum=True]")
    # the issue-25 rules' main variants: fp32 with one EMA (LAMB: both passes)
    for layout in ("flat", "list"):
        labels += [f"lion_{layout}[fp32,emas=1]", f"lars_{layout}[fp32,emas=1,momentum=True]",
                   f"lamb_moments_{layout}[fp32]", f"lamb_ema_{layout}[fp32,emas=1]"]
    return labels


def test_triton_main_variants_keep_an_sm_busy_without_spilling(tmp_path):
    pytest.importorskip("triton")
    if occ.cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's) to read the cubins")
    labels = _triton_labels()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", _TRITON_WORKER, json.dumps(labels),
                           str(tmp_path), str(ARCH)], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["label"] for r in recs) == sorted(labels)
    report, bad = [], []
    for r in recs:
        (u,) = occ.resource_usage(r["cubin"], ARCH).values()
        ok, line = _verdict(r["label"], u.regs, u.spills, 32 * r["num_warps"],
                            occ.vector_loads_before_use(r["cubin"], ARCH, r["name"]))
        report.append(line)
        if not ok:
            bad.append(line)
    print("\n".join(sorted(report)))
    assert not bad, "\n".join(bad)


def test_the_occupancy_arithmetic():
    """The register-file arithmetic against values from NVIDIA's occupancy calculator (sm_90,
    512-thread blocks): 32 regs -> 64 warps, 40 -> 48, 64 -> 32, 65 -> 16 (one 512-thread
    block fits), 128 -> 16, and 8-warp blocks at 88 regs -> 16 warps."""
    assert [occ.resident_warps(r, 512) for r in (32, 40, 64, 65, 128)] == [64, 48, 32, 16, 16]
    assert occ.resident_warps(88, 256) == 16
    assert occ.resident_warps(56, 256) == 32
    assert 22_000 < occ.LITTLE_BYTES_PER_SM < 23_500
