"""Test-session set-up.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here, before any
test module imports ema_kernels' Triton backend: CI has no GPU and runs the Triton kernels on CPU
tensors through the interpreter. It changes nothing else: ``backend="auto"`` never picks Triton
for CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# EMA_KERNELS_CUDA_EMULATION is deliberately not set for the session (it would add the emulated
# 'cuda' backend to every test that runs each CPU backend): tests/test_cuda_emulation.py says why
# and switches it on where it is tested.


import pytest  # noqa: E402


@pytest.fixture
def cuda_emulation(monkeypatch):
    """backend='cuda' on CPU tensors through the emulation build (ema_kernels._C_emu), for this
    test only; yields the emulation's ops namespace, its launch limits at their shipped values
    before and after the test."""
    import torch
    from ema_kernels import _ops
    from ema_kernels.backends import cuda
    monkeypatch.setattr(cuda, "EMULATION", True)
    monkeypatch.setattr(cuda, "_avail_cache", {})
    monkeypatch.setattr(_ops, "_availability_cache", {})
    ok, why = cuda.availability("cpu")
    if not ok:
        pytest.fail(f"the emulation build is unavailable: {why}")
    ops = torch.ops.ema_kernels_emu
    ops.emu_configure(0, 0, 0, 0, 0)
    yield ops
    ops.emu_configure(0, 0, 0, 0, 0)
