"""Integrations with the training frameworks people keep their EMAs in.

Each lives in its own module and imports its framework only when that module is imported
(``import ema_kernels`` imports none of them):

- :mod:`ema_kernels.integrations.transformers`: ``EMACallback`` for Hugging Face's ``Trainer``
  (evaluate on the EMA, save it beside each checkpoint as a ``from_pretrained`` folder);
- :mod:`ema_kernels.integrations.lightning`: ``EMACallback`` for Lightning (validate and test on
  the EMA, no second copy of the model);
- :mod:`ema_kernels.integrations.diffusers`: diffusers' ``EMAModel`` decay as an ek schedule;
- :func:`find_ema_optimizer`: the ema_kernels optimizer inside accelerate's
  ``AcceleratedOptimizer`` or Lightning's ``LightningOptimizer``.

docs/integrations.md has a runnable example for each framework.
"""
from ._common import ema_weights, find_ema_optimizer

__all__ = ["ema_weights", "find_ema_optimizer"]
