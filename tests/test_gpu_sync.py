"""On a GPU: 100 GradScaler steps under ``torch.cuda.set_sync_debug_mode("error")`` -- any
device synchronisation made by the optimizer (a host read of a device scalar, a copy from
pageable memory, a stream synchronize) raises. The CPU counterpart, run by CI on every backend
and path, is tests/test_no_host_sync.py; this file is what only a GPU can show
(scripts/gpu_check.sh runs it).
"""
from __future__ import annotations

import pytest
import torch

import ema_kernels as ek

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: torch.cuda.set_sync_debug_mode sees real device synchronisations "
           "only (without one, tests/test_no_host_sync.py counts host reads on CPU tensors)")

STEPS = 100
WARMUP = 3  # first steps build tables, state and compiled kernels (allowed to synchronise)


def _backends():
    if not torch.cuda.is_available():
        return ["cuda", "triton"]
    return [b for b in ("cuda", "triton") if b in ek.available_backends("cuda")]


CASES = {
    "adamw": (ek.AdamW, dict(lr=1e-3, weight_decay=0.1, ema_decay=0.999), set()),
    "adamw_gradless_teacher": (ek.AdamW, dict(lr=1e-3, ema_decay=(0.999, 0.99)),
                               {"gradless", "teacher"}),
    "adam_clip_amsgrad": (ek.Adam, dict(lr=1e-3, amsgrad=True, ema_decay=0.999), {"clip"}),
    "sgd_every2": (ek.SGD, dict(lr=1e-2, momentum=0.9, ema_decay=0.99, ema_every=2), set()),
    "adamw_capturable": (ek.AdamW, dict(lr=1e-3, ema_decay=0.999, capturable=True), set()),
    "adamw_tensor_lr": (ek.AdamW, dict(lr=None, ema_decay=0.999), set()),
    "adamw_bf16_sr": (ek.AdamW, dict(lr=1e-3, ema_decay=0.999, stochastic_rounding=True),
                      {"bf16"}),
}


@pytest.mark.parametrize("flatten", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", _backends())
def test_grad_scaler_steps_never_synchronise(backend, name, flatten):
    cls, kw, features = CASES[name]
    kw = dict(kw)
    dev = torch.device("cuda")
    if kw.get("lr", 0) is None:
        kw["lr"] = torch.tensor(1e-3, device=dev)
    dtype = torch.bfloat16 if "bf16" in features else torch.float32
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.BatchNorm1d(256),
                                torch.nn.GELU(), torch.nn.Linear(256, 10)).to(dev, dtype)
    head = torch.nn.Linear(10, 4).to(dev, dtype)  # never used: its grads stay None
    params = list(model.parameters()) + (list(head.parameters()) if "gradless" in features
                                         else [])
    opt = cls(params, backend=backend, flatten=flatten, **kw)
    teacher = opt.ema_module(model) if "teacher" in features else None  # noqa: F841
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    x = torch.randn(32, 64, device=dev, dtype=dtype)
    for t in range(WARMUP + STEPS):
        opt.zero_grad()
        scaler.scale(model(x).float().pow(2).mean()).backward()
        if t == WARMUP + 7:  # one skipped step: found_inf set on the device
            model[0].weight.grad.view(-1)[0] = float("inf")
        if t >= WARMUP:
            torch.cuda.set_sync_debug_mode("error")
        try:
            if "clip" in features:
                scaler.unscale_(opt)
                opt.clip_grad_norm_(1.0)
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(z is None or torch.isfinite(z).all() for z in opt.ema_parameters())
