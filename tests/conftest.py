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
