"""The CUDA kernels (csrc/fused_cuda.cu) run on the CPU through the emulation build.

``ema_kernels._C_emu`` is fused_cuda.cu compiled as host C++ against csrc/cuda_emu.h: every launch
runs all its blocks and threads on the host, so the kernels' launch logic -- grid-stride loops,
the 16-byte vector path and its alignment checks, scalar tails, the list kernels' persistent
grid over a device-resident work table (its chunk map, the chunk-strided walk of each block, the
table cache that uploads only on a change), the found_inf exit, the capturable prologue --
executes in CI.
Every case here compares the ``cuda`` backend on CPU tensors with the ``cpp`` backend (the CPU
twin, same fused_math.h), **bit for bit** for every dtype (the 1-ulp allowance for bf16/fp16 is
not needed: both round to nearest even), after every step.  Every tensor is a view into a larger
buffer with guard elements on both sides, and the whole buffers are compared: a write out of
bounds fails too.  cpp itself is checked against the reference in tests/test_cpp_backend.py.

How emulation is switched on here: ``EMA_KERNELS_CUDA_EMULATION=1`` is read once, when
ema_kernels is first imported.  Setting it for the whole test session (conftest) would make
``available_backends("cpu")`` list ``cuda`` and so add it to every reliability and property
test (which run each available CPU backend), roughly doubling their CPU time and changing what
other tests assert about CPU backends.  Instead the matrix below runs in-process with the
``cuda`` backend module's emulation switch turned on by a fixture (the same module functions,
ops, schemas and checks as under the variable), and one subprocess test checks the public
contract of the variable itself (available_backends, auto, info, the optimizers).

Emulation-only overrides (``torch.ops.ema_kernels_emu.emu_configure(chunk, sm_count,
blocks_per_sm, grid_cap, shuffle_seed)``) lower the chunk size, the emulated device's SM count
and resident blocks per SM, and the flat grid cap, so that small tensors reach many chunks per
block of a list launch, unaligned chunk starts and multi-pass grid-stride loops; the 64-bit
index arithmetic is checked without memory by ``emu_flat_walk`` / ``emu_list_plan``, which run
the kernels' own span, chunk and walk code for given coordinates.
"""
from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import threading

import pytest
import torch

import test_cpp_backend as M  # the shared case tables (tests/ is on sys.path under pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(M.NO_EXT, reason="EMA_KERNELS_NO_EXT=1: extension deliberately "
                                                 "not built")

GUARD = 16      # guard elements before (keeps the data 16-byte aligned) and after each tensor
BLOCK = 512     # threads per block (fused_cuda.cu kBlock)
CHUNK = 65536   # elements per list-kernel block
SMS, BLOCKS_PER_SM = 132, 4  # the emulated device (cuda_emu.h): one resident wave: 528 blocks


@pytest.fixture
def emu(cuda_emulation):
    """The emulation ops namespace, the cuda backend switched to emulation for this test
    (conftest.cuda_emulation)."""
    return cuda_emulation


def _backends():
    from ema_kernels.backends import cpp, cuda
    return cpp, cuda


# ----------------------------------------------------------------------------------------------
# Guarded tensors and bitwise comparison
# ----------------------------------------------------------------------------------------------
class Guarded:
    """A contiguous view of n elements at element `start` of a buffer with guards around it."""

    def __init__(self, buf: torch.Tensor, start: int, n: int):
        self.buf, self.start, self.n = buf, start, n

    @classmethod
    def make(cls, n, dtype, gen, scale=1.0, positive=False, offset=0):
        buf = torch.randn(GUARD + offset + n + GUARD, generator=gen) * scale
        if positive:
            buf = buf.abs()
        return cls(buf.to(dtype), GUARD + offset, n)

    def view(self) -> torch.Tensor:
        return self.buf[self.start:self.start + self.n]

    def clone(self) -> "Guarded":
        return Guarded(self.buf.clone(), self.start, self.n)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_bitwise(actual: Guarded, expected: Guarded, what: str):
    a, e = _bits(actual.buf), _bits(expected.buf)
    if torch.equal(a, e):
        return
    i = int(torch.nonzero(a != e)[0])
    where = ("in the front guard" if i < actual.start else
             "in the back guard" if i >= actual.start + actual.n else
             f"at element {i - actual.start}")
    raise AssertionError(f"{what}: differs {where} of {actual.n}: emulated cuda "
                         f"{actual.buf[i].item()!r} vs cpp {expected.buf[i].item()!r}")


def _views(gs):
    return None if gs is None else [g.view() for g in gs]


def _clones(gs):
    return None if gs is None else [g.clone() for g in gs]


def _scalar(x):
    return torch.tensor([x], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# One case: `steps` steps of emulated cuda and cpp from identical inputs, compared bit for bit
# ----------------------------------------------------------------------------------------------
def run_pair(opt_name, dtype_name, sizes, mode_name, seed, *, steps=3, offsets=None,
             capturable=False):
    """`offsets`: None (every tensor 16-byte aligned) or a function (role, i) -> element offset
    of that tensor in its buffer (odd offsets take the scalar path)."""
    cpp, cuda = _backends()
    cfg = dict(M.OPTIMIZERS[opt_name])
    kind = cfg.pop("kind")
    amsgrad = cfg.pop("amsgrad", False)
    dtype = M.DTYPES[dtype_name]
    ema_ws, scaled, found = M.MODES[mode_name]
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    off = offsets or (lambda role, i: 0)

    def role(name, dt, **kw):
        return [Guarded.make(n, dt, gen, offset=off(name, i), **kw) for i, n in enumerate(sizes)]

    params = role("params", dtype)
    emas = role("emas", torch.float32)
    if kind == "adam":
        state = {"exp_avgs": role("exp_avgs", torch.float32, scale=0.1),
                 "exp_avg_sqs": role("exp_avg_sqs", torch.float32, scale=0.01, positive=True),
                 "max_exp_avg_sqs": (role("max_exp_avg_sqs", torch.float32, scale=0.02,
                                          positive=True) if amsgrad else None)}
    else:
        state = {"momentum_buffers": (role("momentum_buffers", torch.float32)
                                      if cfg.get("momentum", 0.0) != 0 else None)}
    lr, beta1, beta2, eps = 1e-2, 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        grads = [Guarded.make(n, dtype, gen, scale=rng.choice([1e-3, 1.0, 10.0]),
                              offset=off("grads", i)) for i, n in enumerate(sizes)]
        w = ema_ws[(step - 1) % len(ema_ws)]
        gscale = _scalar(rng.choice([1.0, 2.0, 1024.0])) if scaled else None
        fi = found[(step - 1) % len(found)]
        finf = None if fi is None else _scalar(fi)
        runs = {}
        for name, mod in (("cuda", cuda), ("cpp", cpp)):
            p, z = _clones(params), _clones(emas)
            s = {k: _clones(v) for k, v in state.items()}
            g = [x.view() for x in grads]
            if kind == "adam":
                common = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=cfg["weight_decay"],
                              decoupled=cfg["decoupled"], maximize=cfg.get("maximize", False),
                              grad_scale=gscale, found_inf=finf)
                lists = (_views(p), g, _views(s["exp_avgs"]), _views(s["exp_avg_sqs"]),
                         _views(s["max_exp_avg_sqs"]), _views(z))
                if capturable:
                    mod.adam_ema_capturable(*lists, lr=_scalar(lr), step=_scalar(step),
                                            ema_weight=None if w is None else _scalar(w),
                                            **common)
                else:
                    mod.adam_ema(*lists, lr=lr, step_size=lr / (1 - beta1 ** step),
                                 bias_correction2_sqrt=math.sqrt(1 - beta2 ** step),
                                 ema_weight=w, **common)
            else:
                common = dict(momentum=cfg.get("momentum", 0.0),
                              dampening=cfg.get("dampening", 0.0),
                              weight_decay=cfg["weight_decay"],
                              nesterov=cfg.get("nesterov", False),
                              maximize=cfg.get("maximize", False), first_step=step == 1,
                              grad_scale=gscale, found_inf=finf)
                lists = (_views(p), g, _views(s["momentum_buffers"]), _views(z))
                if capturable:
                    mod.sgd_ema_capturable(*lists, lr=_scalar(lr),
                                           ema_weight=None if w is None else _scalar(w), **common)
                else:
                    mod.sgd_ema(*lists, lr=lr, ema_weight=w, **common)
            runs[name] = (p, z, s)
        where = f"{opt_name} {dtype_name} {len(sizes)} tensors {mode_name} step {step}"
        (tp, tz, ts), (rp, rz, rs) = runs["cuda"], runs["cpp"]
        for i in range(len(sizes)):
            assert_bitwise(tp[i], rp[i], f"{where} params[{i}]")
            assert_bitwise(tz[i], rz[i], f"{where} emas[{i}]")
            for k in ts:
                if ts[k] is not None:
                    assert_bitwise(ts[k][i], rs[k][i], f"{where} {k}[{i}]")
        if fi:  # a skipped step: nothing moved (cpp is checked for this too, so cuda is)
            for a, b in zip(tp + tz, params + emas):
                assert_bitwise(a, b, f"{where}: found_inf step changed a tensor")
        params, emas, state = rp, rz, rs


def _sizes(size_name, seed):
    return M._sizes(size_name, random.Random(seed))


# ----------------------------------------------------------------------------------------------
# The cuda matrix of tests/test_cuda_ext.py (every optimizer x dtype x flat/list x mode)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name,dtype_name,size_name,mode_name", M.matrix())
def test_matrix_matches_cpp_bitwise(emu, opt_name, dtype_name, size_name, mode_name):
    seed = random.randrange(1 << 30)
    try:
        run_pair(opt_name, dtype_name, _sizes(size_name, seed), mode_name, seed)
    except AssertionError as e:
        raise AssertionError(f"{e} (seed {seed})") from None


@pytest.mark.parametrize("opt_name", list(M.OPTIMIZERS))
@pytest.mark.parametrize("dtype_name", list(M.DTYPES))
def test_capturable_matches_cpp_bitwise(emu, opt_name, dtype_name):
    """The capturable prologue (lr, step, EMA weight and the bias corrections formed on the
    device), flat and list, with a found_inf skip in the middle."""
    seed = random.randrange(1 << 30)
    for sizes in ([4099], [3, 70000, 1, 0, 129]):
        for mode in ("ema", "ema_every2_scaled", "found_inf"):
            try:
                run_pair(opt_name, dtype_name, sizes, mode, seed, capturable=True)
            except AssertionError as e:
                raise AssertionError(f"{e} (seed {seed})") from None


@pytest.mark.parametrize("opt_name", list(M.OPTIMIZERS))
@pytest.mark.parametrize("dtype_name", list(M.DTYPES))
def test_odd_offset_views(emu, opt_name, dtype_name):
    """Contiguous views at odd element offsets, chosen per tensor and per role: a span takes the
    vector path only when every one of its pointers is 16-byte aligned (one misaligned vector
    access would fault in the emulator, as on the GPU), the others the scalar path."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    table = {}

    def offsets(role, i):
        return table.setdefault((role, i), rng.choice([0, 0, 1, 2, 3, 4, 5, 8]))

    sizes = [4099] if rng.random() < 0.3 else [rng.randint(1, 3000) for _ in range(9)] + [70001]
    try:
        run_pair(opt_name, dtype_name, sizes, "ema", seed, steps=2, offsets=offsets)
        run_pair(opt_name, dtype_name, [4099], "ema_every2_scaled", seed, steps=2,
                 offsets=lambda role, i: 1)
    except AssertionError as e:
        raise AssertionError(f"{e} (seed {seed})") from None


_ROLES = {"adam": ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "emas"),
          "sgd": ("params", "grads", "momentum_buffers", "emas")}


@pytest.mark.parametrize("opt_name", ["adamw_amsgrad", "sgd_mom_damp_wd"])
@pytest.mark.parametrize("dtype_name", list(M.DTYPES))
def test_each_role_misaligned_alone(emu, opt_name, dtype_name):
    """One role's tensor misaligned, every other one aligned, for each role in turn: the vector
    path's alignment test must cover every pointer it loads or stores through."""
    seed = random.randrange(1 << 30)
    for role in _ROLES[M.OPTIMIZERS[opt_name]["kind"]]:
        try:
            run_pair(opt_name, dtype_name, [4099], "ema", seed, steps=1,
                     offsets=lambda r, i, role=role: 1 if r == role else 0)
            run_pair(opt_name, dtype_name, [100, 70001], "ema", seed, steps=1,
                     offsets=lambda r, i, role=role: 1 if (r == role and i == 1) else 0)
        except AssertionError as e:
            raise AssertionError(f"{e} (misaligned: {role}; seed {seed})") from None


def _plan(emu_ops, sizes):
    """emu_list_plan decoded: (grid, [(block, tensor, lo, hi) per chunk, in walk order])."""
    flat = list(emu_ops.emu_list_plan(list(sizes)))
    grid, n_chunks = flat[0], flat[1]
    chunks = [tuple(flat[2 + 4 * k:6 + 4 * k]) for k in range(n_chunks)]
    assert len(flat) == 2 + 4 * n_chunks
    return grid, chunks


def _expected_chunks(sizes, chunk):
    return [(i, lo, min(lo + chunk, n)) for i, n in enumerate(sizes) for lo in range(0, n, chunk)]


def _check_plan(grid, chunks, sizes, chunk, resident):
    """One launch: its grid min(chunks, one resident wave); chunk k (in tensor order) walked by
    block k % grid, so each block walks ceil or floor of chunks / grid, every chunk once."""
    want = _expected_chunks(sizes, chunk)
    assert grid == min(len(want), resident), (grid, len(want), resident)
    assert sorted(c[1:] for c in chunks) == want, "every chunk of every tensor once"
    order = {c: k for k, c in enumerate(want)}
    per_block = [0] * grid
    last = [-1] * grid
    for b, *c in chunks:
        k = order[tuple(c)]
        assert k % grid == b, f"chunk {k} walked by block {b} (grid {grid})"
        assert k > last[b], "a block walks its chunks in increasing order"
        last[b] = k
        per_block[b] += 1
    if grid:
        assert max(per_block) - min(per_block) <= 1, per_block


def test_120_mixed_tensors_one_launch(emu):
    """120 tensors of mixed sizes (zero-size, tiny, several chunks): one launch of one block per
    chunk (fewer chunks than one resident wave)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, rng.randint(2, 40), rng.randint(41, 5000)]) for _ in range(114)]
    sizes += [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 0, 7]
    rng.shuffle(sizes)
    grid, chunks = _plan(emu, sizes)
    _check_plan(grid, chunks, sizes, CHUNK, SMS * BLOCKS_PER_SM)
    before = emu.emu_stats()[0]
    try:
        run_pair("adamw_amsgrad", "bf16", sizes, "ema", seed, steps=1)
        assert emu.emu_stats()[0] - before == 1, "one launch for the whole set"
        run_pair("sgd_mom_damp_wd", "f32", sizes, "found_inf", seed, steps=2)
    except AssertionError as e:
        raise AssertionError(f"{e} (seed {seed})") from None


@pytest.mark.parametrize("chunk,sm_count,blocks_per_sm", [
    (CHUNK, 0, 0),   # the shipped sizes: tensors crossing 65536-element chunk boundaries
    (96, 1, 3),      # small chunks (a multiple of 8: chunk starts stay aligned), a 3-block grid
    (37, 2, 1),      # odd chunk: chunk starts misaligned -> those chunks take the scalar path
    (1, 0, 0),       # one element per chunk
])
def test_chunk_boundaries_and_small_grids(emu, chunk, sm_count, blocks_per_sm):
    seed = random.randrange(1 << 30)
    emu.emu_configure(chunk, sm_count, blocks_per_sm, 0, 0)
    if chunk == CHUNK:
        sizes = [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7, 5]
    else:
        rng = random.Random(seed)
        sizes = [rng.choice([1, chunk - 1, chunk, chunk + 1, 2 * chunk + 3, 5 * chunk])
                 for _ in range(11)] + [0, 3]
    grid, chunks = _plan(emu, sizes)
    _check_plan(grid, chunks, sizes, chunk, (sm_count or SMS) * (blocks_per_sm or BLOCKS_PER_SM))
    try:
        for opt_name, dtype_name in (("adamw_amsgrad", "f32"), ("sgd_nesterov_max", "bf16"),
                                     ("adam_l2_max", "f16")):
            before = emu.emu_stats()
            run_pair(opt_name, dtype_name, sizes, "ema", seed, steps=2)
            after = emu.emu_stats()
            assert after[0] - before[0] == 2 and after[1] - before[1] == 2 * grid, \
                "each step one launch of the planned grid"
    except AssertionError as e:
        raise AssertionError(f"{e} (seed {seed})") from None


@pytest.mark.parametrize("grid_cap", [1, 2, 3])
def test_flat_grid_stride_loops(emu, grid_cap):
    """A capped grid: each thread walks several vectors of the flat kernel, then the tail."""
    seed = random.randrange(1 << 30)
    emu.emu_configure(0, 0, 0, grid_cap, 0)
    for n in (4099, 8 * BLOCK * grid_cap * 3 + 13):
        assert emu.emu_flat_grid(n, 4) == grid_cap
        for opt_name, dtype_name in (("adamw", "f32"), ("sgd_mom_damp_wd", "bf16"),
                                     ("adam", "f16")):
            run_pair(opt_name, dtype_name, [n], "ema", seed, steps=2)


def test_shuffled_block_and_thread_order(emu):
    """Blocks and threads in a random order per launch give the same bits: no kernel relies on
    the order the hardware happens to schedule them in."""
    seed = random.randrange(1, 1 << 30)
    emu.emu_configure(96, 1, 3, 2, seed)  # a 3-block list grid: several chunks per block
    sizes = [1, 95, 96, 97, 500, 4099, 0, 33]
    try:
        run_pair("adamw_amsgrad", "bf16", sizes, "ema", seed, steps=2)
        run_pair("sgd_mom_damp_wd", "f32", [4099], "ema", seed, steps=2)
    except AssertionError as e:
        raise AssertionError(f"{e} (seed {seed})") from None


def test_empty_tensors(emu):
    _, cuda = _backends()
    before = emu.emu_stats()[0]
    p, z = torch.zeros(0), torch.zeros(0)
    cuda.ema_only([p], [z], 0.5)            # the flat path of an empty tensor: no launch
    cuda.ema_only([p, p], [z, z], 0.5)      # a list of empty tensors: no launch
    cuda.adam_ema([], [], [], [], None, None, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, decoupled=True, maximize=False, step_size=1e-3,
                  bias_correction2_sqrt=1.0, ema_weight=0.1)
    assert emu.emu_stats()[0] == before
    run_pair("adamw", "f32", [0], "ema", 1, steps=1)
    run_pair("sgd_mom_damp_wd", "bf16", [0, 5, 0], "ema", 2, steps=2)


@pytest.mark.parametrize("dtype_name", list(M.DTYPES))
@pytest.mark.parametrize("sizes", [[1], [4099], [3, 0, 5000, 17, 70000]])
def test_ema_only_matches_cpp_bitwise(emu, dtype_name, sizes):
    cpp, cuda = _backends()
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    params = [Guarded.make(n, M.DTYPES[dtype_name], gen) for n in sizes]
    emas = [Guarded.make(n, torch.float32, gen) for n in sizes]
    for w in (1e-4, 0.5, 0.9):
        a, b = _clones(emas), _clones(emas)
        cuda.ema_only(_views(params), _views(a), w)
        cpp.ema_only(_views(params), _views(b), w)
        for i in range(len(sizes)):
            assert_bitwise(a[i], b[i], f"ema_only w={w} emas[{i}]")


@pytest.mark.parametrize("dtype_name", ["bf16", "f16"])
def test_16bit_conversions_every_bit_pattern(emu, dtype_name):
    """Every 16-bit pattern as a parameter, stepped by SGD (θ - g, one fp32 rounding) and stored
    back: the emulated device conversions (cuda_emu.h's __float2bfloat16_rn / __float2half_rn /
    __half2float, written independently) and the CPU twin's agree on every result, subnormals,
    ties, overflow to infinity included.  NaN results are only required to be NaN: the GPU
    (and the emulation) store the canonical NaN 0x7FFF, the CPU twin 0x7FC0 / 0x7E00."""
    cpp, cuda = _backends()
    dtype = M.DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    theta = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    grads = (torch.randint(-32768, 32768, (theta.numel(),), generator=gen, dtype=torch.int32)
             .to(torch.int16).view(dtype))
    small = torch.randn(theta.numel(), generator=gen).mul_(1e-6).to(dtype)
    for g in (grads, small, torch.zeros_like(theta)):
        out = {}
        for name, mod in (("cuda", cuda), ("cpp", cpp)):
            p, z = theta.clone(), torch.zeros(theta.numel())
            mod.sgd_ema([p], [g], None, [z], lr=1.0, momentum=0.0, dampening=0.0,
                        weight_decay=0.0, nesterov=False, maximize=False, first_step=True,
                        ema_weight=0.5)
            out[name] = (p, z)
        for a, b in zip(out["cuda"], out["cpp"]):
            same = _bits(a) == _bits(b)
            both_nan = torch.isnan(a.float()) & torch.isnan(b.float())
            bad = ~(same | both_nan)
            assert not bool(bad.any()), (f"{int(bad.sum())} differ, first at "
                                         f"{int(torch.nonzero(bad)[0])}")


def test_concurrent_host_threads(emu):
    """Emulated launches from several host threads at once (each has its own block/thread
    coordinates) give the results of sequential ones."""
    cpp, cuda = _backends()
    sizes = [4099, 17, 70000]
    cases = []
    for k in range(4):
        g = torch.Generator().manual_seed(k)
        p = [torch.randn(n, generator=g) for n in sizes]
        z = [torch.randn(n, generator=g) for n in sizes]
        cases.append((p, z, [t.clone() for t in z]))
    errors = []

    def work(p, z):
        try:
            for _ in range(3):
                cuda.ema_only(p, z, 0.25)
        except RuntimeError as e:  # reported below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p, z)) for p, z, _ in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for p, z, ref in cases:
        for _ in range(3):
            cpp.ema_only(p, ref, 0.25)
        for a, b in zip(z, ref):
            assert torch.equal(_bits(a), _bits(b))


def test_emulation_refuses_wrong_devices(emu):
    _, cuda = _backends()
    p = torch.randn(4, device="meta")
    # meta tensors: neither the emulation's CPU tensors nor (without a GPU) runnable at all
    with pytest.raises((RuntimeError, ValueError), match="backend 'cuda'"):
        cuda.ema_only([p], [p], 0.5)
    with pytest.raises(TypeError, match="backend='reference'"):
        q = torch.randn(4, dtype=torch.float64)
        cuda.ema_only([q], [q.clone()], 0.5)
    with pytest.raises(RuntimeError, match="grads has 1 tensors but params has 2"):  # the checks
        cuda.sgd_ema([torch.randn(3), torch.randn(3)], [torch.randn(3)], None, None, lr=0.1,
                     momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False, first_step=True, ema_weight=None)


# ----------------------------------------------------------------------------------------------
# 64-bit index arithmetic, without allocating 2^31+ elements
# ----------------------------------------------------------------------------------------------
def _ceil_div(a, b):
    return -(-a // b)


def _expect_walk(n, vec, aligned, grid, block, thread):
    """What thread (block, thread) of a flat launch must visit, in Python's exact integers."""
    tid, stride = block * BLOCK + thread, grid * BLOCK
    nv = n // vec if aligned else 0
    cnt_v = max(0, _ceil_div(nv - tid, stride))
    first_v = tid * vec if cnt_v else -1
    last_v = (tid + (cnt_v - 1) * stride) * vec if cnt_v else -1
    tail0 = nv * vec
    cnt_e = max(0, _ceil_div(n - tail0 - tid, stride))
    first_e = tail0 + tid if cnt_e else -1
    last_e = tail0 + tid + (cnt_e - 1) * stride if cnt_e else -1
    return [tid, stride, cnt_v, first_v, last_v, cnt_e, first_e, last_e, 0]


@pytest.mark.parametrize("n", [2 ** 31 - 1, 2 ** 31 + 5, 2 ** 32 + 3, 2 ** 33 + 12345])
def test_flat_index_arithmetic_64bit(emu, n):
    for elem_bytes, vec in ((4, 4), (2, 8)):
        grid = emu.emu_flat_grid(n, elem_bytes)
        assert grid == min(_ceil_div(_ceil_div(n, vec), BLOCK), SMS * BLOCKS_PER_SM)
        for aligned in (True, False):
            # the first and last threads, and some whose offsets cross 2^31 and 2^32 first
            for block, thread in ((0, 0), (grid - 1, BLOCK - 1), (grid // 2, 7), (1, 0)):
                got = list(emu.emu_flat_walk(n, elem_bytes, aligned, grid, block, thread))
                assert got == _expect_walk(n, vec, aligned, grid, block, thread), \
                    (n, elem_bytes, aligned, block, thread)
    # a grid so large that block * blockDim overflows 32 bits (never launched: the grid is
    # capped), so the thread index itself must be formed in 64 bits
    big_grid = 2 ** 23 + 1
    for block in (2 ** 23, 2 ** 22 + 3):
        got = list(emu.emu_flat_walk(2 ** 34 + 7, 4, True, big_grid, block, BLOCK - 1))
        assert got == _expect_walk(2 ** 34 + 7, 4, True, big_grid, block, BLOCK - 1)


def test_flat_walk_covers_every_element_once(emu):
    """All threads of small flat launches together visit every element exactly once."""
    for n, elem_bytes, vec in ((BLOCK * 4 * 3 + 77, 4, 4), (BLOCK * 8 * 2 + 9, 2, 8), (5, 4, 4)):
        for grid in (1, 2, emu.emu_flat_grid(n, elem_bytes)):
            for aligned in (True, False):
                nv = n // vec if aligned else 0
                seen_v = seen_e = 0
                for block in range(grid):
                    for thread in range(BLOCK):
                        got = list(emu.emu_flat_walk(n, elem_bytes, aligned, grid, block, thread))
                        assert got == _expect_walk(n, vec, aligned, grid, block, thread)
                        seen_v += got[2]
                        seen_e += got[5]
                assert seen_v == nv and seen_v * vec + seen_e == n


def test_list_plan_for_huge_tensors(emu):
    """The block map of tensors with more than 2^31 elements (chunk offsets computed in 64 bits),
    mixed with small ones; no memory is touched."""
    sizes = [2 ** 33 + 5, 3, 2 ** 31 + 1, 0, 70000]
    grid, chunks = _plan(emu, sizes)
    _check_plan(grid, chunks, sizes, CHUNK, SMS * BLOCKS_PER_SM)
    n_chunks = len(chunks)
    assert ((n_chunks - 1) % grid, 4, CHUNK, 70000) in chunks  # the last chunk of all
    assert (0, 0, 0, CHUNK) in chunks and (1, 0, CHUNK, 2 * CHUNK) in chunks
    big = (2 ** 33 + 5) // CHUNK  # the last chunk of tensor 0 starts beyond 2^33
    assert (big % grid, 0, big * CHUNK, 2 ** 33 + 5) in chunks


def test_emu_configure_rejects_bad_values(emu):
    with pytest.raises(RuntimeError, match="sm_count <= 4096"):
        emu.emu_configure(0, 4097, 0, 0, 0)
    with pytest.raises(RuntimeError, match="blocks_per_sm <= 32"):
        emu.emu_configure(0, 0, 33, 0, 0)


# ----------------------------------------------------------------------------------------------
# The public switch: EMA_KERNELS_CUDA_EMULATION=1 before the first import
# ----------------------------------------------------------------------------------------------
_CONTRACT = r"""
import os, subprocess, sys, torch
import ema_kernels as ek
from ema_kernels import _ops
from ema_kernels.backends import cuda

names = ek.available_backends("cpu")
assert names[-1] == "cuda" and names[0] == "cpp", names
assert _ops.resolve("auto", "cpu").NAME == "cpp"          # auto never picks the emulation
assert _ops.resolve("cuda", "cpu") is cuda
emu = torch.ops.ema_kernels_emu

# Occupancy is asked once per kernel instantiation (and device), not once per kernel type.
q0 = emu.emu_stats()[2]
def adam(amsgrad, n=4099):
    p, g = torch.randn(n), torch.randn(n)
    st = [torch.zeros(n), torch.zeros(n)]
    cuda.adam_ema([p], [g], [st[0]], [st[1]], [torch.zeros(n)] if amsgrad else None, None,
                  lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                  maximize=False, step_size=1e-3, bias_correction2_sqrt=1.0, ema_weight=None)
adam(False); adam(False)
assert emu.emu_stats()[2] == q0 + 1, emu.emu_stats()
adam(True); adam(True)
assert emu.emu_stats()[2] == q0 + 2, emu.emu_stats()
# a list launch asks once for its own kernel (its grid is one resident wave of it)
cuda.ema_only([torch.randn(9)] * 2, [torch.zeros(9)] * 2, 0.5)
cuda.ema_only([torch.randn(9)] * 2, [torch.zeros(9)] * 2, 0.5)
assert emu.emu_stats()[2] == q0 + 3, emu.emu_stats()

# The optimizers run on it, bit for bit as on cpp (flat and tensor-list layouts).
results = []
for backend in ("cuda", "cpp"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.Linear(17, 5))
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=0.9, backend=backend)
    x = torch.randn(8, 33)
    for it in range(4):
        opt.zero_grad(set_to_none=it >= 2)
        model(x).square().sum().backward()
        opt.step()
    results.append([t.detach().clone() for t in model.parameters()] +
                   [z.clone() for z in opt.ema_parameters()])
for a, b in zip(*results):
    assert torch.equal(a, b)

info = subprocess.run([sys.executable, "-m", "ema_kernels", "info"], capture_output=True,
                      text=True, check=True).stdout
line = [ln for ln in info.splitlines() if ln.strip().startswith("cuda ")][0]
assert "available: the CUDA kernels emulated on the CPU" in line, info
assert "ema_kernels._C_emu built" in info, info
print("ok")
"""

_NO_EMULATION = r"""
import ema_kernels as ek
from ema_kernels.backends import cuda
assert "cuda" not in ek.available_backends("cpu")
ok, why = cuda.availability("cpu")
assert not ok and "CUDA tensors only" in why and "EMA_KERNELS_CUDA_EMULATION=1" in why, why
print("ok")
"""


def _run(code, emulation):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("EMA_KERNELS_BACKEND", None)
    if emulation:
        env["EMA_KERNELS_CUDA_EMULATION"] = "1"
    else:
        env.pop("EMA_KERNELS_CUDA_EMULATION", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_environment_variable_contract():
    r = _run(_CONTRACT, emulation=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    r = _run(_NO_EMULATION, emulation=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
