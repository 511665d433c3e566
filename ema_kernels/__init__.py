"""ema_kernels: the optimizer step and the weights' EMA in one pass over memory."""
from . import schedules, scaling
from ._ops import available_backends

__version__ = "0.1.0"
