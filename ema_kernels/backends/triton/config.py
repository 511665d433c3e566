"""The Triton backend's launch configuration and whether ``triton`` imports at all.

``BLOCK`` and ``NUM_WARPS`` are read from this module at launch time (``config.BLOCK``), so a
test that changes them sets them here, where the launchers look them up.
"""
from __future__ import annotations

import torch

try:  # importing triton does not touch a device; decorating a kernel compiles nothing
    import triton  # the real package: absolute import, never this package
    import triton.language as tl
    IMPORT_ERROR = ""
except Exception as _e:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    IMPORT_ERROR = f"{type(_e).__name__}: {_e}"


# Launch configuration: a fixed choice, no autotuning.  2048 elements per program are 8 KB per
# fp32 stream: 8 elements per thread with 8 warps, as two runs of 4, i.e. two 16-byte accesses
# per fp32 stream (two 8-byte ones per bf16/fp16 stream) per thread, all loads issued before any
# math: 32-192 bytes in flight per thread, 36-116 registers and no spills on sm_80/sm_90
# (see the AOT test).  ``BLOCK`` is read at launch time; tests under the interpreter raise it.
BLOCK = 2048
NUM_WARPS = 8

# Persistent list launches (grid.py sizes them).  ``PROGRAMS``: None sizes the grid from the
# device (a whole number of resident waves); an int caps every list launch at that many
# programs on any device (tests force grids smaller than the chunk count with it).
PROGRAMS = None
# Under TRITON_INTERPRET=1 there is no device to size a wave from: this many programs, few on
# purpose, so that every interpreted list launch of more chunks runs the persistent loop several
# times per program (what the compiled kernels do on a GPU).
INTERPRETER_PROGRAMS = 3

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
