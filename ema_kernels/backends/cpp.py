"""CPU backend: the compiled extension's CPU twin of the CUDA kernels (csrc/fused_cpu.cpp).

Same ``fused_math.h`` as the CUDA kernels, OpenMP over cache-sized chunks, a vectorised loop
(an AVX2 variant picked at run time where the CPU has it).  Interface: that of
:mod:`ema_kernels.backends.reference`, plus ``ema_only`` and the capturable variants (which read
``lr``/``step``/``ema_weight`` from one-element CPU tensors: the CPU path of the CUDA-graph-friendly
kernels, useful to test their math without a GPU).  Importing this module loads nothing; the
extension is loaded on first use or on ``availability()`` (by
:mod:`ema_kernels.backends._extension`, shared with the ``cuda`` backend).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from . import _extension as _ext
from ._compiled import CompiledBackend

Tensor = torch.Tensor

NAME = "cpp"

_avail_cache: Dict[str, Tuple[bool, str]] = {}


def availability(device_type: str) -> Tuple[bool, str]:
    """``(ok, reason)`` for running the ``cpp`` backend on ``device_type`` tensors."""
    if device_type != "cpu":
        return False, (f"the 'cpp' backend runs on CPU tensors only, not {device_type} tensors "
                       f"(on CUDA use 'cuda' or 'triton')")
    res = _avail_cache.get(device_type)
    if res is None:
        try:
            _ext.load_extension()
        except _ext.ExtensionUnavailable as e:
            res = (False, str(e))
        else:
            info = _ext.MAIN.info
            res = (True, f"compiled CPU kernels ({info.get('cpu_isa', '?')}"
                         f"{', OpenMP' if info.get('openmp') == '1' else ''})")
        _avail_cache[device_type] = res
    return res


def _ops_for(params: List[Tensor]):
    """The ops namespace after checking that this backend can run on these tensors."""
    ok, why = availability("cpu")
    if not ok:
        raise _ext.ExtensionUnavailable(f"backend 'cpp' cannot run: {why}")
    if params and params[0].device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on cpu tensors, but params[0] is on "
                         f"{params[0].device}")
    _ext.check_params(NAME, params)
    return torch.ops.ema_kernels_ext


_compiled = CompiledBackend(NAME, _ops_for)
adam_ema = _compiled.adam_ema
sgd_ema = _compiled.sgd_ema
ema_only = _compiled.ema_only
adam_ema_capturable = _compiled.adam_ema_capturable
sgd_ema_capturable = _compiled.sgd_ema_capturable
lion_ema = _compiled.lion_ema
lars_ema = _compiled.lars_ema
lamb_moments = _compiled.lamb_moments
lamb_ema = _compiled.lamb_ema
