"""Occupancy of compiled kernels from their cubins, without a GPU (used by tests/test_occupancy.py).

The registers, stack and local memory of each kernel come from ``cuobjdump
--dump-resource-usage`` (local memory or a stack: spills); the resident warps per SM from the
register file of the architecture (sm_80/sm_90: 64K 32-bit registers and 2048 threads per SM,
at most 32 blocks, registers allocated per warp in units of 256); the bytes each thread has in
flight from the SASS: the 16-byte loads (``LDG.E.128``) issued from the first one up to the
first instruction that uses loaded data arithmetically. DESIGN.md's rule: a variant needs 32
resident warps per SM, or at least twice the bytes in flight that Little's law asks of an SM
(an H100: 3.35 TB/s x ~0.9 µs over 132 SMs, about 23 KB).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional

REGS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32
REG_UNIT = 256  # registers are allocated per warp in units of 256
H100_BANDWIDTH = 3.35e12  # B/s
H100_LATENCY = 0.9e-6  # s, a DRAM load's latency under load
H100_SMS = 132
LITTLE_BYTES_PER_SM = H100_BANDWIDTH * H100_LATENCY / H100_SMS  # ~22.8 KB
MIN_WARPS = 32

# The first instruction that consumes loaded data (float arithmetic, conversions, the bf16
# unpacking by PRMT/shifts/IMAD.U32): loads issued before it are in flight together.
_USE = re.compile(r"\b(FFMA|FMUL|FADD|MUFU|FSETP|FMNMX|F2F|F2FP|PRMT|HADD2|HFMA2|FSEL|"
                  r"IMAD\.U32|SHF|DADD|DMUL|DFMA)\b")


def cuobjdump() -> Optional[str]:
    """cuobjdump from the CUDA toolkit on PATH, or the one triton ships; None if neither."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
        path = os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), "cuobjdump")
    except (ImportError, AttributeError):
        return None
    return path if os.path.exists(path) else None


@dataclass
class Usage:
    name: str          # mangled
    regs: int
    stack: int
    local: int

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def resource_usage(binary: str, arch: int) -> Dict[str, Usage]:
    """``{mangled name: Usage}`` of every kernel compiled for ``sm_<arch>`` in ``binary`` (a
    cubin, or a host library with an embedded fatbin)."""
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", binary], capture_output=True,
                         text=True, check=True).stdout
    usages, cur_arch, name = {}, None, None
    for line in out.splitlines():
        m = re.search(r"arch = sm_(\d+)", line)
        if m:
            cur_arch = int(m[1])
            continue
        m = re.search(r"Function (\S+?):?$", line.strip())
        if m:
            name = m[1]
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)
        if m and name and cur_arch in (None, arch):  # a bare cubin names no arch
            usages[name] = Usage(name, int(m[1]), int(m[2]), int(m[3]))
    return usages


def demangle(names: List[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if filt is None:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def resident_warps(regs: int, threads_per_block: int) -> int:
    """Warps resident per SM for a kernel of ``regs`` registers per thread."""
    warps_per_block = -(-threads_per_block // 32)
    per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    blocks = min(REGS_PER_SM // (per_warp * warps_per_block),
                 THREADS_PER_SM // threads_per_block, BLOCKS_PER_SM)
    return blocks * warps_per_block


def vector_loads_before_use(binary: str, arch: int, function: str) -> int:
    """The 16-byte global loads a thread issues, in the kernel's SASS, from its first one up to
    the first instruction that uses loaded data (see ``_USE``)."""
    sass = subprocess.run([cuobjdump(), "-sass", "-arch", f"sm_{arch}", "-fun", function,
                           binary], capture_output=True, text=True, check=True).stdout
    count, started = 0, False
    for line in sass.splitlines():
        if "LDG.E.128" in line:
            started = True
            count += 1
        elif started and _USE.search(line):
            break
    return count


def bytes_in_flight_per_sm(warps: int, loads16: int) -> int:
    return warps * 32 * 16 * loads16
