"""The Triton backend package for tests that need its kernels interpreted on the CPU."""
import importlib
import os
import sys

# the package's modules in import order: a kernel's decoration (interpreted or compiled) is
# fixed when kernels.py runs, and the others bind its kernels by name at their own import
_MODULES = ("config", "kernels", "rule_kernels", "checks", "tables", "scalars", "grid", "launch",
            "rule_launch", "aot", "")


def triton_backend():
    """``ema_kernels.backends.triton``, re-imported in place (every module of the package, in
    order) if another module imported it before TRITON_INTERPRET=1 was set."""
    from ema_kernels.backends import triton as tk
    from ema_kernels.backends.triton import checks
    if os.environ.get("TRITON_INTERPRET") == "1" and not checks._interpreted():
        for name in _MODULES:
            importlib.reload(sys.modules[".".join(filter(None, (tk.__name__, name)))])
    return tk
