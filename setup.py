"""Build script. Today: the pure-Python package. The compiled extension (csrc/) is added by the
CUDA/CPU extension work; until then this says so and installs Python only."""
from setuptools import setup

print("ema_kernels setup: building the pure-Python package only (no compiled extension yet)")
setup()
