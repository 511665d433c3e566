"""ema_kernels: the optimizer step and the weights' EMA in one pass over memory.

    opt = ema_kernels.AdamW(model.parameters(), lr=1e-3, ema_decay=0.9999, kappa=1.0)
    with opt.swap_ema():
        evaluate(model)           # the parameters hold their EMA here
    teacher = opt.ema_module(model)   # live EMA views, for EMA-teacher methods

See ``../shared/DESIGN.md`` (the contract), README.md and the guides in docs/.
"""
from . import posthoc, scaling, schedules
from ._ops import BackendUnavailableError, available_backends
from .optim import LAMB, LARS, SGD, Adam, AdamW, Lion, WithEMA

__version__ = "0.1.0"
__all__ = ["AdamW", "Adam", "SGD", "LARS", "LAMB", "Lion", "WithEMA", "available_backends",
           "BackendUnavailableError",
           "posthoc", "scaling", "schedules"]
