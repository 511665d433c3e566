"""The optimizers: AdamW, Adam and SGD that also keep EMAs of the weights, in the same pass.

Where things are:

- :mod:`.adam`, :mod:`.sgd`, :mod:`.lars`, :mod:`.lamb`, :mod:`.lion` — one file per update
  rule (defaults, group keys, scaling glue); :mod:`.rule_base` what LARS/LAMB/Lion share
  (backends that have their kernels, per-tensor launches), :mod:`.norms` their per-tensor norms;
- :mod:`.base` — construction, param groups, the parameter sets, ``zero_grad``, pickling;
- :mod:`.checks` — validation of parameters, groups and hyperparameters (torch's cases);
- :mod:`.layout` — where state lives (per parameter by default; ``flatten=True`` buffers);
- :mod:`.stepping` — ``step()``: planning, then one fused launch per parameter set;
- :mod:`.clipping` — ``clip_grad_norm_``: the norm, and its coefficient folded into the step;
- :mod:`.ema_api` — ``ema_parameters``, ``swap_ema``, ``ema_module`` (teachers);
- :mod:`.checkpoint` — ``state_dict``/``load_state_dict`` and their hooks;
- :mod:`.with_ema` — ``WithEMA``: the EMAs of any torch optimizer, one EMA-only launch per set.
"""
from .adam import Adam, AdamW
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .sgd import SGD
from .with_ema import WithEMA

__all__ = ["AdamW", "Adam", "SGD", "LARS", "LAMB", "Lion", "WithEMA"]
