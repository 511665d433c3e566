"""The CUDA list path: one launch per parameter set whatever its tensor count, a persistent grid
of at most one resident wave walking the chunks of a device-resident work table, and the table's
cache (csrc/fused_cuda.cu ``run_list``, csrc/list_tables.cpp) -- run on the CPU by the emulation
build (``ema_kernels._C_emu``, csrc/cuda_emu.h), compared bit for bit with the CPU twin.

The emulated device's SM count and resident blocks per SM are lowered
(``emu_configure(chunk, sm_count, blocks_per_sm, grid_cap, shuffle_seed)``) so that a launch's
grid is smaller than its chunk count (each block walks many chunks), and the blocks run in a
shuffled order.
"""
from __future__ import annotations

import random

import pytest
import torch

import ema_kernels as ek
from ema_kernels.backends import cuda

pytestmark = pytest.mark.skipif(not cuda._emulation_availability()[0],
                                reason="the emulation build (ema_kernels._C_emu) is not built")

ODD = (1, 7, 33, 4097, 65537, 2 ** 20 + 3)
CHUNK = 4096                # small chunks: many per tensor, many per block
SMS, BLOCKS_PER_SM = 3, 2   # a 6-block grid: far fewer blocks than chunks


def _sizes(seed, count=1000):
    """`count` sizes, every odd size of ODD present, mostly small ones (emulation time)."""
    rng = random.Random(seed)
    sizes = list(ODD) + [65537] * 3 + [2 ** 20 + 3]
    sizes += [rng.choice((1, 7, 33, 129, 4097, 1000)) for _ in range(count - len(sizes))]
    rng.shuffle(sizes)
    return sizes


def _chunks(sizes, chunk=CHUNK):
    return sum(-(-n // chunk) for n in sizes)


def _stats(emu):
    return dict(zip(("launches", "blocks", "occupancy_queries", "bytes_read", "bytes_written",
                     "bytes_vector", "arg_reads", "table_uploads"), emu.emu_stats()))


def _delta(emu, before):
    after = _stats(emu)
    return {k: after[k] - before[k] for k in after}


def _params(sizes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, generator=g).to(dtype))
        p.grad = (torch.randn(n, generator=g) * 1e-2).to(dtype)
        out.append(p)
    return out


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


VARIANTS = {
    "adamw_fp32": (ek.AdamW, dict(ema_decay=0.99), torch.float32),
    "adam_amsgrad_l2_fp32": (ek.Adam, dict(amsgrad=True, weight_decay=0.1, ema_decay=0.9),
                             torch.float32),
    "adamw_bf16_2emas": (ek.AdamW, dict(ema_decay=(0.99, 0.9)), torch.bfloat16),
    "adamw_bf16_sr": (ek.AdamW, dict(ema_decay=0.99, stochastic_rounding=True), torch.bfloat16),
    "adamw_fp16_capturable": (ek.AdamW, dict(ema_decay=0.99, capturable=True), torch.float16),
    "sgd_momentum_fp32": (ek.SGD, dict(momentum=0.9, nesterov=True, ema_decay=0.99),
                          torch.float32),
    "sgd_plain_bf16": (ek.SGD, dict(ema_decay=(0.99, 0.9, 0.8)), torch.bfloat16),
    "lion_fp32": (ek.Lion, dict(weight_decay=0.1, ema_decay=0.99), torch.float32),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_1000_odd_tensors_are_one_launch_bit_for_bit(cuda_emulation, name):
    """1000 tensors of mixed odd sizes: each step one launch of min(chunks, SMs x blocks/SM)
    blocks (6 here, against ~1800 chunks; blocks shuffled), results bit for bit those of cpp,
    the table uploaded once per kernel variant, a steady-state step uploading nothing."""
    emu = cuda_emulation
    seed = random.randrange(1, 1 << 30)
    cls, kw, dtype = VARIANTS[name]
    sizes = _sizes(seed)
    emu.emu_configure(CHUNK, SMS, BLOCKS_PER_SM, 0, seed)
    runs = {}
    for backend in ("cuda", "cpp"):
        params = _params(sizes, dtype, seed)
        lr = 1e-4 if cls is ek.Lion else 1e-3
        torch.manual_seed(seed)  # the stochastic-rounding seed is drawn at construction
        opt = cls(params, lr=lr, backend=backend, **kw)
        for step in range(3):
            before = _stats(emu)
            opt.step()
            d = _delta(emu, before)
            if backend == "cuda":
                assert d["launches"] == 1, (name, step, d)
                assert d["blocks"] == min(_chunks(sizes), SMS * BLOCKS_PER_SM), d
                # the first step uploads; SGD's second too (its first step is another kernel
                # variant: it writes the momentum buffer without reading it); then nothing
                assert d["table_uploads"] == (1 if step == 0 else 0 if step == 2 else
                                              int(cls is ek.SGD and "momentum" in kw)), (step, d)
            else:
                assert d["launches"] == 0
        runs[backend] = [p.detach() for p in params] + list(opt.ema_parameters())
    for i, (a, b) in enumerate(zip(runs["cuda"], runs["cpp"])):
        assert torch.equal(_bits(a), _bits(b)), f"{name}: tensor {i} differs (seed {seed})"


def test_ema_only_1000_tensors_one_launch(cuda_emulation):
    emu = cuda_emulation
    from ema_kernels.backends import cpp
    seed = random.randrange(1, 1 << 30)
    sizes = _sizes(seed)
    emu.emu_configure(CHUNK, SMS, BLOCKS_PER_SM, 0, seed)
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g) for n in sizes]
    z1 = [torch.randn(n, generator=g) for n in sizes]
    z2 = [t.clone() for t in z1]
    before = _stats(emu)
    cuda.ema_only(params, z1, 0.25)
    cpp.ema_only(params, z2, 0.25)
    d = _delta(emu, before)
    assert d["launches"] == 1 and d["blocks"] == SMS * BLOCKS_PER_SM, d
    for a, b in zip(z1, z2):
        assert torch.equal(a, b)


def test_exact_bytes_and_vector_share_of_a_1000_tensor_set(cuda_emulation):
    """fp32 AdamW + 1 EMA over 1000 tensors: 36 bytes per parameter and nothing else (the table
    reads are launch-argument reads, not update bytes); with every size a multiple of 4 elements
    (16-byte aligned starts and ends, chunk starts too) every byte moves in 16-byte accesses."""
    emu = cuda_emulation
    seed = random.randrange(1, 1 << 30)
    emu.emu_configure(CHUNK, SMS, BLOCKS_PER_SM, 0, seed)
    rng = random.Random(seed)
    for sizes, vector_share in ((_sizes(seed), 0.9),
                                ([4 * rng.randint(1, 3000) for _ in range(999)] + [2 ** 20],
                                 1.0)):
        opt = ek.AdamW(_params(sizes, torch.float32, seed), lr=1e-3, ema_decay=0.99,
                       backend="cuda")
        opt.step()
        cuda.reset_emulation_counters()
        opt.step()
        c = cuda.emulation_counters()
        n = sum(sizes)
        assert c["launches"] == 1 and c["table_uploads"] == 0, c
        assert c["bytes_read"] == 20 * n and c["bytes_written"] == 16 * n, (c, n)
        assert c["bytes_vector"] >= vector_share * 36 * n, c
        assert c["arg_reads"] > 0  # the work table, read on the "device"


def test_the_table_is_uploaded_again_when_a_pointer_changes(cuda_emulation):
    """A stale table would write the old tensor: after one gradient and one EMA are replaced by
    new tensors, the next step uploads, updates the new ones and leaves the old ones alone."""
    emu = cuda_emulation
    from ema_kernels.backends import cpp
    sizes = [5, 4097, 70000, 33] * 25
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(n, generator=gen) for n in sizes]
    z = [torch.randn(n, generator=gen) for n in sizes]
    ref_z = [t.clone() for t in z]
    before = _stats(emu)
    for _ in range(3):
        cuda.ema_only(p, z, 0.5)
        cpp.ema_only(p, ref_z, 0.5)
    assert _delta(emu, before)["table_uploads"] == 1
    old = z[50]
    kept = old.clone()
    z[50] = old.clone()          # a new tensor: a new pointer in the middle of the table
    before = _stats(emu)
    cuda.ema_only(p, z, 0.5)
    cpp.ema_only(p, ref_z, 0.5)
    d = _delta(emu, before)
    assert d["table_uploads"] == 1 and d["launches"] == 1, d
    assert torch.equal(old, kept), "the replaced tensor was written through a stale table"
    for a, b in zip(z, ref_z):
        assert torch.equal(a, b)
    before = _stats(emu)
    cuda.ema_only(p, z, 0.5)
    assert _delta(emu, before)["table_uploads"] == 0


def test_sets_and_variants_keep_their_own_tables(cuda_emulation):
    """Two sets stepped in turn, and one set alternating two kernel variants (ema_every: EMA and
    non-EMA steps), each upload once; a set evicted by 64 others (least recently used) uploads
    again."""
    emu = cuda_emulation
    stats = emu.list_table_stats
    capacity = list(stats())[5]
    assert capacity == 64
    sets = [[torch.randn(n) for n in (3, 4097, 9)] for _ in range(2)]
    emas = [[torch.zeros_like(t) for t in s] for s in sets]
    before = _stats(emu)
    for _ in range(4):
        for s, z in zip(sets, emas):
            cuda.ema_only(s, z, 0.5)
    assert _delta(emu, before)["table_uploads"] == 2
    params = _params([7, 4097, 33], torch.float32, 1)
    opt = ek.AdamW(params, lr=1e-3, ema_decay=0.9, ema_every=2, backend="cuda")
    before = _stats(emu)
    for _ in range(6):
        opt.step()
    d = _delta(emu, before)
    assert d["launches"] == 6 and d["table_uploads"] == 2, d
    others = [[torch.randn(5), torch.randn(6)] for _ in range(capacity)]
    for s in others:
        cuda.ema_only(s, [torch.zeros_like(t) for t in s], 0.5)
    before = _stats(emu)
    cuda.ema_only(sets[0], emas[0], 0.5)
    assert _delta(emu, before)["table_uploads"] == 1, "evicted after 64 newer tables"
    assert list(stats())[3] == capacity
