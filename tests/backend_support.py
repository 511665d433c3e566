"""Which backends the CPU-tensor tests can run here (shared by the test modules that
parametrize over backends)."""
import os

from ema_kernels import _ops


def cpu_backends():
    """Backend names usable on CPU tensors in this process: reference always; cpp if built;
    cuda if the emulation build is there (tests switch emulation on per test); triton only
    under ``TRITON_INTERPRET=1``."""
    names = ["reference"]
    if _ops.availability("cpp", "cpu")[0]:
        names.append("cpp")
    from ema_kernels.backends import cuda
    if cuda._emulation_availability()[0]:
        names.append("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1" and _ops.availability("triton", "cpu")[0]:
        names.append("triton")
    return names
