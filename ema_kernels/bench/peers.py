"""The bench's peer rows: the EMA packages people use, imported and called as their users call
them (``python -m ema_kernels bench``; see :mod:`ema_kernels.bench`).

Each builder takes a :class:`~ema_kernels.bench.Case` and returns ``(fn, keepalive)``: ``fn()``
runs ``case.ema_every`` optimizer steps and one EMA update of every EMA (``case.decays``, each
decay taken to the power ``ema_every`` so that every row averages alike). The packages are
imported when a row is built, never with ``ema_kernels`` or its bench: a row whose package is
missing raises :class:`PeerMissing`, which the bench reports instead of a time
(``pip install 'ema-kernels[integrations]'`` installs them all).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

from .cases import _every, _foreach_lerp_emas, _make_params, _Model, _torch_optimizer

__all__ = ["PeerMissing", "PEERS", "COMPILED"]


class PeerMissing(ModuleNotFoundError):
    """A peer row's package is not installed."""


def _require(module: str, pip_name: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not (e.name == module or module.startswith(f"{e.name}.")):
            raise  # installed, but one of its own imports failed: not a missing peer
        raise PeerMissing(f"{pip_name} is not installed (pip install {pip_name}, or "
                          f"pip install 'ema-kernels[integrations]')", name=e.name) from None


def _setup(case, **optimizer_mode):
    params = _make_params(case)
    model = _Model(params)
    opt = _torch_optimizer(case, params, **optimizer_mode)
    return params, model, opt, [d ** case.ema_every for d in case.decays]


def timm_model_ema_v3(case):
    """``torch.optim.X(foreach=True)`` + ``timm.utils.ModelEmaV3(model, decay)``, ``.update(model)``
    (timm's default foreach path)."""
    timm_utils = _require("timm.utils", "timm")
    params, model, opt, decays = _setup(case, foreach=True)
    emas = [timm_utils.ModelEmaV3(model, decay=d) for d in decays]

    def ema():
        for e in emas:
            e.update(model)
    return _every(case.ema_every, opt.step, ema), (opt, model, emas)


def ema_pytorch_ema(case):
    """``torch.optim.X(fused=True)`` + ema-pytorch's ``EMA(model, beta, update_after_step=0,
    update_every=1)``, ``.update()`` (its defaults otherwise: no foreach; ``update_after_step``
    and ``update_every`` set so that it averages at every call, as every row does)."""
    ema_pytorch = _require("ema_pytorch", "ema-pytorch")
    params, model, opt, decays = _setup(case, fused=True)
    emas = [ema_pytorch.EMA(model, beta=d, update_after_step=0, update_every=1)
            for d in decays]
    for e in emas:
        e.update()  # its first update copies the weights (initialisation); later ones average

    def ema():
        for e in emas:
            e.update()
    return _every(case.ema_every, opt.step, ema), (opt, model, emas)


def diffusers_ema_model(case):
    """``torch.optim.X(fused=True)`` + diffusers' ``EMAModel(params, decay, foreach=True)``,
    ``.step(params)`` (as diffusers' training scripts call it)."""
    training_utils = _require("diffusers.training_utils", "diffusers")
    params, model, opt, decays = _setup(case, fused=True)
    emas = [training_utils.EMAModel(model.parameters(), decay=d, foreach=True) for d in decays]

    def ema():
        for e in emas:
            e.step(model.parameters())
    return _every(case.ema_every, opt.step, ema), (opt, model, emas)


def compiled_foreach_lerp(case):
    """``torch.compile`` of ``torch.optim.X(foreach=True).step()`` + ``torch._foreach_lerp_``:
    inductor's generated (fused) optimizer, what a user picks instead of a fused kernel
    library. With ``ema_every=1`` step and EMA are one compiled function (inductor may fuse
    the lerp into the step's loops); otherwise two. The first call compiles (~10-25 s on a CPU
    per case), inside the bench's untimed warm-up."""
    params = _make_params(case)
    opt = _torch_optimizer(case, params, foreach=True)
    ema, emas = _foreach_lerp_emas(case, params)
    if case.ema_every == 1:
        def step_and_ema():
            opt.step()
            ema()
        fn = torch.no_grad()(torch.compile(step_and_ema))
    else:
        fn = _every(case.ema_every, torch.compile(opt.step), torch.compile(ema))
    return fn, (opt, params, emas)


COMPILED = "torch.compile(foreach step + foreach_lerp)"

# name -> builder; rows.BASELINES lists these after torch's own rows
PEERS: "dict[str, Callable]" = {
    "torch foreach + timm ModelEmaV3": timm_model_ema_v3,
    "torch fused + ema-pytorch EMA": ema_pytorch_ema,
    "torch fused + diffusers EMAModel": diffusers_ema_model,
}
