"""``step()`` never reads a tensor's value on the host, in any path (DESIGN.md: "Checking without
a GPU"): counted with a dispatch mode on CPU tensors (tests/sync_counting.py says what is
counted and what is not), on every backend CI can run -- ``reference``, ``cpp``, ``triton``
(interpreted) and ``cuda`` (the emulation build) -- and both layouts.

Each case is a real training loop with ``torch.amp.GradScaler("cpu")`` (or plain steps where
the case says so), one step of which has an inf gradient (a skipped step), and counts what
``scaler.step(opt)``, ``scaler.update()``, ``opt.clip_grad_norm_`` and ``opt.step()`` dispatch.
torch's fused AdamW under the same loop reads nothing: the yardstick. On a GPU the same is
checked with ``torch.cuda.set_sync_debug_mode("error")`` (tests/test_gpu_sync.py).
"""
from __future__ import annotations

import os
import pathlib
import re

import pytest
import torch

import ema_kernels as ek
from ema_kernels import _ops

from sync_counting import SyncCounter, interpreter_launches_excluded


def _backends():
    names = ["reference"]
    if _ops.availability("cpp", "cpu")[0]:
        names.append("cpp")
    if os.environ.get("TRITON_INTERPRET") == "1" and _ops.availability("triton", "cpu")[0]:
        names.append("triton")
    from ema_kernels.backends import cuda
    if cuda._emulation_availability()[0]:
        names.append("cuda")
    return names


BACKENDS = _backends()


@pytest.fixture
def backend(request):
    name = request.param
    if name == "cuda":
        request.getfixturevalue("cuda_emulation")
    return name


class _Net(torch.nn.Module):
    """A small model with BatchNorm buffers (float and integer) and an unused head whose
    parameters never get a gradient (grad None: frozen layers, unused heads)."""

    def __init__(self, dtype):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 11), torch.nn.BatchNorm1d(11),
                                        torch.nn.Tanh(), torch.nn.Linear(11, 3))
        self.head = torch.nn.Linear(3, 2)
        self.to(dtype)

    def forward(self, x):
        return self.body(x)


# name -> (optimizer class, kwargs, features)
CASES = {
    "adamw_scaler": (ek.AdamW, dict(lr=1e-2, weight_decay=0.1, ema_decay=0.9), {"scaler"}),
    "adamw_scaler_gradless": (ek.AdamW, dict(lr=1e-2, ema_decay=0.9), {"scaler", "gradless"}),
    "adamw_teacher_scaler_gradless": (ek.AdamW, dict(lr=1e-2, ema_decay=0.9),
                                      {"scaler", "gradless", "teacher"}),
    "adamw_teacher_clip": (ek.AdamW, dict(lr=1e-2, ema_decay=0.9), {"clip", "teacher"}),
    "adam_clip_scaler_gradless": (ek.Adam, dict(lr=1e-2, amsgrad=True, ema_decay=0.9),
                                  {"clip", "scaler", "gradless"}),
    "adamw_tensor_lr_scaler": (ek.AdamW, dict(lr=None, ema_decay=0.9), {"scaler", "tensor_lr"}),
    "adamw_capturable_scaler": (ek.AdamW, dict(lr=1e-2, ema_decay=0.9, capturable=True),
                                {"scaler"}),
    "sgd_capturable_clip": (ek.SGD, dict(lr=1e-2, momentum=0.9, ema_decay=0.9,
                                         capturable=True), {"clip", "teacher"}),
    "adamw_two_emas_every2_scaler_gradless": (
        ek.AdamW, dict(lr=1e-2, ema_decay=(0.9, 0.99), ema_every=2),
        {"scaler", "gradless", "teacher"}),
    "sgd_scaler_gradless": (ek.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, ema_decay=0.9),
                            {"scaler", "gradless"}),
    "adamw_bf16_sr_found_inf": (ek.AdamW, dict(lr=1e-2, ema_decay=0.9,
                                               stochastic_rounding=True),
                                {"bf16", "found_inf", "gradless"}),
    "adamw_plain": (ek.AdamW, dict(lr=1e-2, ema_decay=0.9), set()),
}

STEPS = 5
INF_AT = 2  # this step's gradients hold an inf: GradScaler's found_inf skips it


def _train(counter, model, opt, features, steps=STEPS):
    """A training loop; ``counter`` is active around everything the optimizer and the scaler
    do (not around the forward and backward passes, which are the user's)."""
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4) if "scaler" in features else None
    teacher = opt.ema_module(model) if "teacher" in features else None
    for t in range(steps):
        x = torch.randn(8, 6, generator=gen, dtype=dtype)
        opt.zero_grad()
        loss = model(x).float().pow(2).mean()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if t == INF_AT:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        if "gradless" not in features:  # give the head a gradient too
            for p in model.head.parameters():
                p.grad = torch.full_like(p, 1e-2)
        with counter:
            if scaler is not None:
                if "clip" in features:
                    scaler.unscale_(opt)
                    opt.clip_grad_norm_(1.0)
                scaler.step(opt)
                scaler.update()
            else:
                if "clip" in features:
                    opt.clip_grad_norm_(1.0)
                if "found_inf" in features:
                    fi = torch.full((1,), float(t == INF_AT))
                    opt.step(grad_scale=torch.ones(1), found_inf=fi)
                else:
                    opt.step()
    return teacher


def _build(name, backend, flatten):
    cls, kw, features = CASES[name] if name in CASES else RULE_CASES[name]
    kw = dict(kw)
    if kw.get("lr", 0) is None:
        kw["lr"] = torch.tensor(1e-2)
    torch.manual_seed(0)
    model = _Net(torch.bfloat16 if "bf16" in features else torch.float32)
    opt = cls(model.parameters(), backend=backend, flatten=flatten, **kw)
    return model, opt, features


@pytest.mark.parametrize("flatten", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_step_reads_nothing_on_the_host(backend, name, flatten):
    model, opt, features = _build(name, backend, flatten)
    counter = SyncCounter()
    with interpreter_launches_excluded():
        _train(counter, model, opt, features)
    assert not counter.hits, (f"{len(counter.hits)} host reads in {name} on {backend} "
                              f"({'flat' if flatten else 'list'}):\n{counter.report()}")
    # the loop really ran, and the inf step was skipped (capturable=True counts calls on
    # the host: its device step count is the truth there)
    skipped = bool(features & {"scaler", "found_inf", "clip"}) and not opt.capturable
    assert opt.param_groups[0]["steps"] == STEPS - skipped


# LARS, LAMB, Lion (issue 25) on the backends that have their kernels (RuleOptimizer refuses
# the others by name): the same loop, every path of their launchers (GradScaler with a
# grad-less head, clipping, a tensor lr, capturable, SR, two EMAs with ema_every).
RULE_CASES = {
    "lion_scaler_gradless": (ek.Lion, dict(lr=1e-3, weight_decay=0.1, ema_decay=0.9),
                             {"scaler", "gradless", "teacher"}),
    "lion_capturable_clip": (ek.Lion, dict(lr=1e-3, ema_decay=(0.9, 0.99), capturable=True),
                             {"clip"}),
    "lion_bf16_sr_found_inf": (ek.Lion, dict(lr=1e-3, ema_decay=0.9, stochastic_rounding=True),
                               {"bf16", "found_inf", "gradless"}),
    "lars_scaler_gradless": (ek.LARS, dict(lr=0.1, weight_decay=1e-2, ema_decay=0.9),
                             {"scaler", "gradless"}),
    "lars_tensor_lr_clip": (ek.LARS, dict(lr=None, weight_decay=1e-2, ema_decay=0.9),
                            {"clip", "teacher"}),
    "lars_capturable_scaler": (ek.LARS, dict(lr=0.1, weight_decay=1e-2, ema_decay=0.9,
                                             capturable=True), {"scaler"}),
    "lamb_scaler_gradless": (ek.LAMB, dict(lr=1e-2, ema_decay=(0.9, 0.5), ema_every=2),
                             {"scaler", "gradless", "teacher"}),
    "lamb_capturable_clip": (ek.LAMB, dict(lr=1e-2, ema_decay=0.9, capturable=True), {"clip"}),
    "lamb_bf16_sr_found_inf": (ek.LAMB, dict(lr=1e-2, ema_decay=0.9, stochastic_rounding=True),
                               {"bf16", "found_inf"}),
    "lars_capturable_clip_scaler": (ek.LARS, dict(lr=0.1, momentum=0.9, weight_decay=1e-4,
                                                  ema_decay=0.9, capturable=True),
                                    {"clip", "scaler", "teacher"}),
    "lars_tensor_lr_two_emas": (ek.LARS, dict(lr=None, weight_decay=1e-4,
                                              ema_decay=(0.9, 0.99)), {"scaler"}),
    "lamb_scaler_clip_gradless": (ek.LAMB, dict(lr=1e-2, ema_decay=0.9),
                                  {"scaler", "clip", "gradless"}),
    "lamb_capturable_scaler": (ek.LAMB, dict(lr=1e-2, ema_decay=0.9, capturable=True),
                               {"scaler", "teacher"}),
}


def _rule_params():
    out = []
    for name, (cls, _, _) in RULE_CASES.items():
        for b in BACKENDS:
            if hasattr(_ops._load(b)[0], cls._BACKEND_OP):
                out.append((b, name))
    return out


@pytest.mark.parametrize("flatten", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("backend,name", _rule_params(), indirect=["backend"])
def test_rules_read_nothing_on_the_host(backend, name, flatten):
    test_step_reads_nothing_on_the_host(backend, name, flatten)  # _build finds RULE_CASES


def test_rule_cases_cover_triton():
    """The triton backend has all three rules (where it runs at all here)."""
    if "triton" in BACKENDS:
        assert {n for b, n in _rule_params() if b == "triton"} == set(RULE_CASES)


def test_the_counter_sees_a_scalar_bound_zero_dim_tensor():
    """The mistake this file guards against, made on purpose: a 0-dim tensor weight through
    ``_foreach_lerp_`` binds the Scalar overload (a host read); the tensor-list form does not."""
    a, b, w = [torch.zeros(3)], [torch.ones(3)], torch.tensor(0.5)
    counter = SyncCounter()
    with counter:
        torch._foreach_lerp_(a, b, w)
    assert [op for op, _ in counter.hits] == ["aten._local_scalar_dense.default"]
    counter = SyncCounter()
    with counter:
        torch._foreach_lerp_(a, b, [w])
    assert not counter.hits


def test_torch_fused_adamw_reads_nothing_either():
    """The yardstick: torch's fused AdamW (``_step_supports_amp_scaling``) under the same
    GradScaler loop, with a gradient-less parameter and an inf step."""
    torch.manual_seed(0)
    model = _Net(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    counter = SyncCounter()
    gen = torch.Generator().manual_seed(1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for t in range(STEPS):
        opt.zero_grad()
        scaler.scale(model(torch.randn(8, 6, generator=gen)).pow(2).mean()).backward()
        if t == INF_AT:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        with counter:
            scaler.step(opt)
            scaler.update()
    assert not counter.hits, counter.report()


def test_the_compiled_sources_read_no_tensor_values():
    """What the dispatch mode cannot see: ops dispatched inside our compiled custom ops. The C++
    sources call none of the value-reading APIs."""
    csrc = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    pattern = re.compile(r"\.item\s*[<(]|_local_scalar_dense|\.equal\s*\(|is_nonzero|"
                         r"\.to\s*\(\s*(at::)?kCPU|\.cpu\s*\(")
    found = [f"{path.name}:{i}: {line.strip()}"
             for path in sorted(csrc.iterdir()) if path.suffix in (".cpp", ".cu", ".h")
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert not found, "\n".join(found)
