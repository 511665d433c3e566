"""The CUDA kernels move exactly the design's bytes (DESIGN.md: fp32 AdamW + one EMA reads θ g m
v ζ and writes θ m v ζ, 36 bytes per parameter, each extra EMA 8 more, and nothing else), in
16-byte accesses, in one launch per parameter set -- counted by the emulation build, whose
every global load and store goes through the counted helpers of csrc/fused_cuda.cu
(``ema_kernels.backends.cuda.emulation_counters()``).

The byte counts are derived here from the roles each update reads and writes (the hand count
of the design), not read from the code under test: θ and g in the parameter dtype, every state
buffer and EMA in fp32; g is read, never written; a buffer the update does not need (SGD without
momentum; SGD's first step, which writes the momentum buffer without reading it) moves nothing.
"""
from __future__ import annotations

import pytest
import torch

import ema_kernels as ek
from ema_kernels.backends import cuda

pytestmark = pytest.mark.skipif(not cuda._emulation_availability()[0],
                                reason="the emulation build (ema_kernels._C_emu) is not built")

# odd sizes (4097: tails; 1: a tensor of one element) in a set that is 16-byte aligned at every
# tensor's start (fresh allocations), so nearly every byte moves in 16-byte accesses
SIZES = (4096, 3 * 1024, 4097, 1, 20000)
F32, BF16 = torch.float32, torch.bfloat16


def design_bytes(opt: str, dtype, *, emas=1, ema_step=True, amsgrad=False, momentum=0.9,
                 first_step=False):
    """(read, written) bytes per parameter of one fused step, from the roles it moves."""
    p = torch.empty((), dtype=dtype).element_size()
    read = 2 * p          # θ, g
    written = p           # θ
    if opt == "adam":
        state = 3 if amsgrad else 2
        read += 4 * state
        written += 4 * state
    elif momentum:
        read += 0 if first_step else 4
        written += 4
    if ema_step:
        read += 4 * emas
        written += 4 * emas
    return read, written


def _params(dtype, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, generator=g).to(dtype))
        p.grad = (torch.randn(n, generator=g) * 1e-2).to(dtype)
        ps.append(p)
    return ps


def _flat_numel(opt):
    (ts,), = opt._ensure_sets()
    return ts.flat.param.numel()


def _counted_step(opt, **step_kw):
    cuda.reset_emulation_counters()
    opt.step(**step_kw)
    return cuda.emulation_counters()


def _check(c, n, read, written, launches=1, vector_share=0.99):
    assert c["launches"] == launches, c
    assert c["bytes_read"] == read * n, (c, read * n)
    assert c["bytes_written"] == written * n, (c, written * n)
    total = c["bytes_read"] + c["bytes_written"]
    assert c["bytes_vector"] >= vector_share * total, c


VARIANTS = {
    # name: (optimizer class, kwargs, dtype, design_bytes kwargs)
    "adamw_fp32": (ek.AdamW, dict(ema_decay=0.99), F32, dict(opt="adam")),
    "adamw_fp32_2emas": (ek.AdamW, dict(ema_decay=(0.99, 0.9)), F32, dict(opt="adam", emas=2)),
    "adamw_fp32_4emas": (ek.AdamW, dict(ema_decay=(0.99, 0.9, 0.8, 0.7)), F32,
                         dict(opt="adam", emas=4)),
    "adam_amsgrad_fp32": (ek.Adam, dict(amsgrad=True, ema_decay=0.99), F32,
                          dict(opt="adam", amsgrad=True)),
    "adamw_bf16": (ek.AdamW, dict(ema_decay=0.99), BF16, dict(opt="adam")),
    "adamw_bf16_sr": (ek.AdamW, dict(ema_decay=0.99, stochastic_rounding=True), BF16,
                      dict(opt="adam")),
    "adamw_fp32_no_ema": (ek.AdamW, dict(ema_decay=None), F32, dict(opt="adam", ema_step=False)),
    "sgd_momentum_fp32": (ek.SGD, dict(momentum=0.9, ema_decay=0.99), F32, dict(opt="sgd")),
    "sgd_plain_fp32": (ek.SGD, dict(ema_decay=0.99), F32, dict(opt="sgd", momentum=0.0)),
    "sgd_momentum_bf16_2emas": (ek.SGD, dict(momentum=0.9, ema_decay=(0.99, 0.9)), BF16,
                                dict(opt="sgd", emas=2)),
    # Lion moves SGD-with-momentum's roles: θ g m ζ read, θ m ζ written
    "lion_fp32": (ek.Lion, dict(ema_decay=0.99), F32, dict(opt="lion")),
    "lion_bf16_2emas": (ek.Lion, dict(ema_decay=(0.99, 0.9)), BF16, dict(opt="lion", emas=2)),
}


# capturable=True refuses stochastic rounding (its key needs the host step count)
_CASES = [(name, cap) for name in VARIANTS for cap in (False, True)
          if not (cap and VARIANTS[name][1].get("stochastic_rounding"))]


@pytest.mark.parametrize("flatten", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("name,capturable", _CASES,
                         ids=[f"{n}-{'capturable' if c else 'host'}" for n, c in _CASES])
def test_each_variant_moves_the_designs_bytes(cuda_emulation, name, flatten, capturable):
    cls, kw, dtype, bkw = VARIANTS[name]
    params = _params(dtype)
    n = sum(SIZES)
    opt = cls(params, lr=1e-3, backend="cuda", flatten=flatten, capturable=capturable, **kw)
    if flatten:
        grads = [p.grad.clone() for p in params]
        opt.zero_grad(set_to_none=False)  # gradients become views of the flat buffer
        for p, g in zip(params, grads):
            p.grad.copy_(g)
    if flatten:  # the flat buffers pad each parameter to 64 bytes: the kernel walks them all
        n = _flat_numel(opt)
        assert sum(SIZES) < n < sum(SIZES) + 16 * len(SIZES)
    first = _counted_step(opt)  # the first step (SGD: the momentum buffer is only written)
    if bkw.get("opt") == "sgd" and bkw.get("momentum", 0.9):
        # capturable=True cannot know on the host which step is the first applied one: its
        # kernels always read the (zero-initialised) momentum buffer
        _check(first, n, *design_bytes(dtype=dtype, first_step=not capturable, **bkw))
    steady = _counted_step(opt)
    _check(steady, n, *design_bytes(dtype=dtype, **bkw))


@pytest.mark.parametrize("flatten", [False, True], ids=["list", "flat"])
def test_ema_every_moves_no_ema_bytes_between_ema_steps(cuda_emulation, flatten):
    params = _params(F32)
    n = sum(SIZES)
    opt = ek.AdamW(params, lr=1e-3, ema_decay=(0.99, 0.9), ema_every=3, backend="cuda",
                   flatten=flatten)
    if flatten:
        opt.zero_grad(set_to_none=False)
        for p in params:
            p.grad.normal_()
        n = _flat_numel(opt)
    for step in range(1, 7):
        c = _counted_step(opt)
        ema_step = step % 3 == 0
        _check(c, n, *design_bytes("adam", F32, emas=2, ema_step=ema_step))
        if not ema_step:
            assert c["bytes_read"] + c["bytes_written"] == 28 * n  # the design's 28


def test_a_skipped_step_moves_nothing_and_clipping_adds_no_kernel_bytes(cuda_emulation):
    """found_inf set: every thread returns before touching memory. A pending clip coefficient
    joins grad_scale (read as a launch argument): the kernel moves the same 36 B; the norm's
    read of g (the design's 40 - 36) is torch's ``_foreach_norm``, outside the kernels."""
    params = _params(F32)
    n = sum(SIZES)
    opt = ek.AdamW(params, lr=1e-3, ema_decay=0.99, backend="cuda")
    c = _counted_step(opt, grad_scale=torch.ones(1), found_inf=torch.ones(1))
    assert c["launches"] == 1 and c["bytes_read"] == 0 and c["bytes_written"] == 0, c
    assert c["arg_reads"] > 0  # found_inf was read on the "device"
    opt.clip_grad_norm_(1e-3)
    cuda.reset_emulation_counters()
    opt.step()
    _check(cuda.emulation_counters(), n, *design_bytes("adam", F32))


@pytest.mark.parametrize("cls,opt_name", [(ek.AdamW, "adam"), (ek.SGD, "sgd"),
                                          (ek.Lion, "lion")])
def test_unaligned_tensors_fall_back_to_scalar_accesses_with_the_same_bytes(cuda_emulation, cls,
                                                                            opt_name):
    """Odd-offset views (not 16-byte aligned): the same bytes, moved element by element (every
    scalar access counted too)."""
    base = [torch.randn(n + 1) for n in SIZES]
    params = [torch.nn.Parameter(b[1:]) for b in base]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    n = sum(SIZES)
    kw = dict(momentum=0.9) if cls is ek.SGD else {}
    opt = cls(params, lr=1e-3, ema_decay=0.99, backend="cuda", **kw)
    _counted_step(opt)
    c = _counted_step(opt)
    _check(c, n, *design_bytes(opt_name, F32), vector_share=0.0)
    # θ and g are unaligned; the state and EMA are fresh (aligned) but a span walks
    # vectorised only when every pointer is: all scalar
    assert c["bytes_vector"] == 0


def test_the_counters_are_deltas_since_reset(cuda_emulation):
    params = _params(F32, sizes=(64,))
    opt = ek.SGD(params, lr=1e-3, ema_decay=0.99, backend="cuda")
    cuda.reset_emulation_counters()
    assert set(cuda.emulation_counters()) >= {"launches", "bytes_read", "bytes_written",
                                              "bytes_vector"}
    assert all(v == 0 for v in cuda.emulation_counters().values())
    opt.step()
    after = cuda.emulation_counters()
    assert after["launches"] == 1 and after["bytes_read"] == 12 * 64  # θ g ζ
    cuda.reset_emulation_counters()
    assert cuda.emulation_counters()["bytes_read"] == 0


# ------------------------------------------------------------------ LARS and LAMB (issue 25) --
def rule_bytes(rule: str, dtype, *, emas=1, first_step=False):
    """(read, written) bytes per parameter of the kernels of one LARS or LAMB step, from the
    roles they move (the per-tensor norms before LARS' pass are torch's ``_foreach_norm``, 8 B
    more in fp32, outside the kernels).

    LARS, one pass: reads θ g buf ζ, writes θ buf ζ (fp32 + 1 EMA: 16 + 12 = 28 B; the first
    step writes buf without reading it). LAMB, two passes: pass 1 reads θ g m v and writes m v
    (16 + 8), pass 2 reads θ m v ζ and writes θ ζ (16 + 8): 48 B."""
    p = torch.empty((), dtype=dtype).element_size()
    if rule == "lars":
        return 2 * p + (0 if first_step else 4) + 4 * emas, p + 4 + 4 * emas
    return (2 * p + 8) + (p + 8 + 4 * emas), 8 + (p + 4 * emas)


RULE_VARIANTS = {
    "lars_fp32": (ek.LARS, dict(momentum=0.9, weight_decay=1e-4), F32, dict(rule="lars")),
    "lars_bf16_2emas_sr": (ek.LARS, dict(momentum=0.9, weight_decay=1e-4,
                                         ema_decay=(0.99, 0.9), stochastic_rounding=True),
                           BF16, dict(rule="lars", emas=2)),
    "lamb_fp32": (ek.LAMB, dict(), F32, dict(rule="lamb")),
    "lamb_bf16_2emas": (ek.LAMB, dict(ema_decay=(0.99, 0.9)), BF16, dict(rule="lamb", emas=2)),
}
_RULE_CASES = [(name, cap) for name in RULE_VARIANTS for cap in (False, True)
               if not (cap and RULE_VARIANTS[name][1].get("stochastic_rounding"))]


@pytest.mark.parametrize("flatten", [False, True], ids=["list", "flat"])
@pytest.mark.parametrize("name,capturable", _RULE_CASES,
                         ids=[f"{n}-{'capturable' if c else 'host'}" for n, c in _RULE_CASES])
def test_lars_and_lamb_move_the_designs_bytes(cuda_emulation, name, flatten, capturable):
    """One launch per pass and set (LARS 1, LAMB 2), the design's bytes per parameter (the
    list path over the parameters, flat buffers' views included: LARS' and LAMB's ratios need
    each tensor's own norms), 16-byte accesses; LAMB's sums are atomics, counted apart."""
    cls, kw, dtype, bkw = RULE_VARIANTS[name]
    kw = {"ema_decay": 0.99, **kw}
    params = _params(dtype)
    n = sum(SIZES)
    opt = cls(params, lr=1e-3, backend="cuda", flatten=flatten, capturable=capturable, **kw)
    if flatten:
        grads = [p.grad.clone() for p in params]
        opt.zero_grad(set_to_none=False)
        for p, g in zip(params, grads):
            p.grad.copy_(g)
    launches = 1 if bkw["rule"] == "lars" else 2
    first = _counted_step(opt)
    if bkw["rule"] == "lars":  # capturable: the momentum buffer is always read (see above)
        _check(first, n, *rule_bytes(dtype=dtype, first_step=not capturable, **bkw), launches)
    steady = _counted_step(opt)
    _check(steady, n, *rule_bytes(dtype=dtype, **bkw), launches)
    if bkw["rule"] == "lamb":
        # each thread that walked elements adds its two partial sums: at most 2 per thread
        assert 0 < steady["atomics"] <= 2 * 512 * steady["blocks"], steady
    else:
        assert steady["atomics"] == 0


@pytest.mark.parametrize("cls", [ek.LARS, ek.LAMB], ids=["lars", "lamb"])
def test_a_skipped_lars_or_lamb_step_moves_nothing(cuda_emulation, cls):
    params = _params(F32)
    opt = cls(params, lr=1e-3, weight_decay=1e-4, ema_decay=0.99, backend="cuda")
    before = [p.detach().clone() for p in params]
    c = _counted_step(opt, grad_scale=torch.ones(1), found_inf=torch.ones(1))
    assert c["bytes_read"] == 0 and c["bytes_written"] == 0 and c["atomics"] == 0, c
    assert c["launches"] == (1 if cls is ek.LARS else 2) and c["arg_reads"] > 0
    assert all(torch.equal(p, b) for p, b in zip(params, before))
