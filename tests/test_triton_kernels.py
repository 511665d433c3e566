"""The Triton backend against the reference backend, without a GPU.

- Numerics: the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set below before
  triton or the backend is imported) on CPU tensors and are compared with the reference backend
  step by step: every optimizer configuration x dtype x {flat, list} x ema_every in {1, 3} x
  sizes, with ``grad_scale`` / ``found_inf`` steps in every sequence.
- Compilation: every kernel variant is compiled ahead of time for sm_80 and sm_90 (no GPU
  needed) in two background processes, started when this module's first test runs so that they
  use the second CPU core while the interpreter tests run; the PTX is checked for vector
  accesses (16-byte fp32, 8-byte bf16/fp16: exactly one per 4-element run per stream the variant
  must touch, so no EMA bytes on non-EMA variants), 64-bit offsets, no shared-memory layout
  conversions, and the cubin for spills.

Tolerances (see DESIGN.md): fp32 <= 1e-6 relative; bf16/fp16 parameters within one ulp of the
reference's (round-to-nearest-even) result; EMA <= 1e-5.  The absolute floor of all comparisons
is 2**-20 (~8 fp32 ulp at 1.0) because the data are O(1): the kernel and the reference may
contract a multiply-add into an FMA differently (ATen's vectorised add-with-alpha and lerp use
FMA, the interpreter's numpy never does, GPUs do where LLVM contracts), which costs up to an ulp
of the O(1) fp32 *operands*, not of a result that cancels towards zero (θ − lr·g ≈ 0 can come
out as 0 on one side and 7e-10 on the other; in bf16 that is "many ulps" of a tiny number).
Both sides start every step from identical state (the reference's state is copied over after
each comparison), so differences cannot accumulate across steps.
"""
import os

# Before triton or the backend decorate anything (tests/conftest.py sets it too).  A GPU machine
# can run this module on CUDA tensors with the compiled kernels: TRITON_INTERPRET=0 pytest ...
# (test_compiled_kernels_on_cuda does exactly that in a subprocess where a GPU is visible).
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ema_kernels.backends import reference as ref  # noqa: E402
from triton_support import triton_backend  # noqa: E402

tk = triton_backend()  # re-imported if another module imported it before the env was set
from ema_kernels.backends.triton import checks as tchecks  # noqa: E402
from ema_kernels.backends.triton import config as tcfg  # noqa: E402  (BLOCK: read at launch)
from ema_kernels.backends.triton import tables as ttables  # noqa: E402

INTERPRETED = tchecks._interpreted()
DEVICE = "cpu" if INTERPRETED else "cuda"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is not 1 and no GPU is visible: nothing can run the kernels",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
PROD_BLOCK, PROD_WARPS = tcfg.BLOCK, tcfg.NUM_WARPS
# The interpreter costs milliseconds per program whatever its size: the numerical tests run with
# big blocks (BLOCK is a constexpr of the kernels; the production value is compiled by the AOT
# tests and run by test_production_block_size).  2**16 + 3 elements still span 5 programs.
TEST_BLOCK = 16384 if INTERPRETED else PROD_BLOCK
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
FP32_ATOL = 2.0 ** -20
SIZES = (1, 7, 4097, 2 ** 16 + 3)
# Tensor-list layout: mixed sizes, an empty tensor, the production BLOCK and every SIZES entry.
LIST_SIZES = (4097, 1, 300, 0, 7, 2048, 2 ** 16 + 3, 33)

ADAM_CASES = {
    "adamw": dict(decoupled=True, weight_decay=0.1, amsgrad=False, maximize=False),
    "adam_l2": dict(decoupled=False, weight_decay=0.05, amsgrad=False, maximize=False),
    "adam_nowd_maximize": dict(decoupled=False, weight_decay=0.0, amsgrad=False, maximize=True),
    "adamw_amsgrad": dict(decoupled=True, weight_decay=0.1, amsgrad=True, maximize=False),
    "adam_l2_amsgrad_maximize": dict(decoupled=False, weight_decay=0.01, amsgrad=True,
                                     maximize=True),
}
SGD_CASES = {
    "sgd": dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    "sgd_wd_maximize": dict(momentum=0.0, dampening=0.0, weight_decay=0.01, nesterov=False,
                            maximize=True),
    "sgd_momentum_wd": dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
                            maximize=False),
    "sgd_dampening": dict(momentum=0.8, dampening=0.25, weight_decay=0.0, nesterov=False,
                          maximize=True),
    "sgd_nesterov_wd": dict(momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True,
                            maximize=False),
}

# One step sequence for every test: (grad_scale, found_inf) per step.  found_inf=1 steps get
# non-finite gradients and must change nothing; the scaler tensors also come alone.
AMP_STEPS = [(None, None), (1024.0, 1.0), (1024.0, 0.0), (None, 1.0), (None, 0.0), (3.0, None)]


# ----------------------------------------------------------------------------------------------
# Background AOT compilation (see the module docstring)
# ----------------------------------------------------------------------------------------------
AOT_ARCHS = (80, 90)
_AOT_WORKER = r"""
import json, os, re, subprocess, sys, tempfile, time
import triton
from ema_kernels.backends import triton as tk
from ema_kernels.backends.triton.checks import _interpreted
arch = int(sys.argv[1])
assert not _interpreted()
cuobjdump = os.path.join(os.path.dirname(triton.knobs.nvidia.ptxas.path), "cuobjdump")
os.makedirs(os.environ["TRITON_CACHE_DIR"], exist_ok=True)
tmp = tempfile.mkdtemp(dir=os.environ["TRITON_CACHE_DIR"])
for label, fn, sig, const, attrs in tk.aot_variants():
    t0 = time.time()
    rec = {"label": label}
    try:
        c = tk.aot_compile(fn, sig, const, attrs, arch)
        ptx, ttir = c.asm["ptx"], c.asm["ttir"]
        for op in ("ld", "st"):
            for w in ("v2", "v4"):
                pattern = op + r"\.global(?:\.\w+)*\." + w + r"\."
                rec[op + "_" + w] = len(re.findall(pattern, ptx))
        rec["shared"] = c.metadata.shared
        rec["convert_layout"] = c.asm["ttgir"].count("convert_layout")
        rec["i64_offsets"] = bool(re.search(r"arith\.muli .*: i64", ttir))
        rec["target"] = ".target sm_%d" % arch in ptx
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(c.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                               text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
        rec.update(regs=int(m[1]), stack=int(m[2]), local=int(m[3])) if m else rec.update(
            usage=usage)
    except Exception as e:
        rec["error"] = "%s: %s" % (type(e).__name__, e)
    rec["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(rec), flush=True)
"""
_aot_procs = {}
_aot_tmp = []


def _start_aot_workers():
    if _aot_procs:
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cache = tempfile.mkdtemp(prefix="ek-triton-aot-")  # a cold cache: really compile
    _aot_tmp.append(cache)
    for arch in AOT_ARCHS:
        env_a = dict(env, TRITON_CACHE_DIR=os.path.join(cache, str(arch)))
        _aot_procs[arch] = subprocess.Popen(
            [sys.executable, "-c", _AOT_WORKER, str(arch)], cwd=str(ROOT), env=env_a,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module", autouse=True)
def _aot_in_background(request):
    if any(item.name.startswith("test_aot_compile") for item in request.session.items):
        _start_aot_workers()
    tcfg.BLOCK = TEST_BLOCK
    # One intra-op thread: the tensors are small, and the second core compiles in background.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    tcfg.BLOCK = PROD_BLOCK
    for proc in _aot_procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for path in _aot_tmp:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |x| (x in float32), subnormal floor included."""
    fi = torch.finfo(dtype)
    mant_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    _, e = torch.frexp(x.abs().clamp_min(fi.tiny))
    return torch.ldexp(torch.ones_like(x), (e - 1 - mant_bits)).clamp_min(fi.smallest_normal *
                                                                            fi.eps)


def _assert_params_close(got, want, what):
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=FP32_ATOL, msg=lambda m: what + m)
        return
    g, w = got.float(), want.float()
    # One ulp of the stored dtype; a result that cancels towards zero gets the fp32 floor (see
    # the module docstring: FMA contraction differs by up to an ulp of the fp32 operands).
    bad = ~((g - w).abs() <= _ulp(w, got.dtype).clamp_min(FP32_ATOL))
    bad &= ~(g.isnan() & w.isnan())
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements beyond 1 ulp, e.g. "
                           f"{g[bad][:4].tolist()} vs {w[bad][:4].tolist()}")


def _assert_state_close(got, want, what, rtol=1e-6):
    torch.testing.assert_close(got, want, rtol=rtol, atol=FP32_ATOL, msg=lambda m: what + m)


class _Problem:
    """Tensors for one backend: params, grads, state roles and EMAs (lists aligned by index).

    ``emas`` is the first EMA list; ``n_emas`` > 1 adds ``more_emas``, one list per further EMA
    (``ema_lists()``: all of them)."""

    def __init__(self, sizes, dtype, roles, seed, misalign=(), n_emas=1):
        g = _gen(seed)
        self.params, self.grads, self.emas = [], [], []
        self.more_emas = [[] for _ in range(n_emas - 1)]
        self.state = {r: [] for r in roles}
        for i, n in enumerate(sizes):
            p = torch.randn(n, generator=g).to(DEVICE, dtype)
            if i in misalign:  # an odd-offset view: 4 (or 2) bytes off 16-byte alignment
                base = torch.empty(n + 1, dtype=dtype, device=DEVICE)
                p = base[1:].copy_(p)
            self.params.append(p)
            self.grads.append(torch.randn(n, generator=g).to(DEVICE, dtype))
            self.emas.append(torch.randn(n, generator=g).to(DEVICE))
            for r in roles:
                if r == "exp_avg_sq":
                    t = torch.rand(n, generator=g) * 0.01
                elif r == "max_exp_avg_sq":
                    t = torch.rand(n, generator=g) * 0.02
                elif r == "momentum_buffer":
                    t = torch.full((n,), float("nan"))  # never read on the first step
                else:
                    t = torch.randn(n, generator=g) * 0.1
                self.state[r].append(t.to(DEVICE))
            for lst in self.more_emas:
                lst.append(torch.randn(n, generator=g).to(DEVICE))

    def ema_lists(self):
        return [self.emas] + list(getattr(self, "more_emas", []))

    def tensors(self):
        out = list(self.params) + list(self.grads) + [z for zs in self.ema_lists() for z in zs]
        for lst in self.state.values():
            out += lst
        return out

    def clone(self):
        other = object.__new__(_Problem)
        other.params = [p.clone() for p in self.params]
        other.grads = [g.clone() for g in self.grads]
        other.emas = [z.clone() for z in self.emas]
        other.more_emas = [[z.clone() for z in zs] for zs in getattr(self, "more_emas", [])]
        other.state = {r: [t.clone() for t in lst] for r, lst in self.state.items()}
        return other

    def copy_from(self, other):
        for a, b in zip(self.tensors(), other.tensors()):
            a.copy_(b)

    def new_grads(self, gen, scale, nonfinite):
        for g in self.grads:
            x = torch.randn(g.numel(), generator=gen)
            if scale is not None:
                x = x * scale
            if nonfinite and x.numel():
                x[0] = float("inf")
                x[-1] = float("nan")
            g.copy_(x)


def _compare(tri, want, step, ema_weight, before):
    """Triton's tensors against the reference's after one step (``before``: pre-step copy).

    ``ema_weight``: None (no EMA moves), a number (the first EMA list moves) or a sequence of
    weights, one per EMA list that moves (the lists after them must not)."""
    for i, (p, q) in enumerate(zip(tri.params, want.params)):
        _assert_params_close(p, q, f"step {step} param[{i}] ({p.numel()} elements): ")
    for r in tri.state:
        for i, (a, b) in enumerate(zip(tri.state[r], want.state[r])):
            _assert_state_close(a, b, f"step {step} {r}[{i}]: ")
    weights = [] if ema_weight is None else \
        list(ema_weight) if isinstance(ema_weight, (list, tuple)) else [ema_weight]
    for k, (zs, ys, z0s) in enumerate(zip(tri.ema_lists(), want.ema_lists(),
                                          before.ema_lists())):
        for i, (z, y, z0, p) in enumerate(zip(zs, ys, z0s, tri.params)):
            if k >= len(weights):
                assert torch.equal(z, z0), f"step {step}: ema {k} [{i}] changed on a step " \
                                           f"that does not update it"
                continue
            # ζ moves towards θ *as stored*: a bf16/fp16 θ may sit one ulp away from the
            # reference's, and the EMA then rightly differs by ema_weight·ulp, so the EMA is
            # checked against the reference formula applied to this backend's stored θ (and,
            # for fp32, also against the reference's ζ directly).
            expect = z0.lerp(p.float(), weights[k])
            _assert_state_close(z, expect, f"step {step} ema {k} [{i}]: ", rtol=1e-5)
            if p.dtype == torch.float32:
                _assert_state_close(z, y, f"step {step} ema {k} [{i}] vs reference: ",
                                    rtol=1e-5)
    for i, (g, g0) in enumerate(zip(tri.grads, before.grads)):
        assert torch.equal(g.nan_to_num(), g0.nan_to_num()), f"grads[{i}] written"


def _assert_unchanged(tri, before, step):
    for a, b in zip(tri.tensors(), before.tensors()):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"step {step}: a found_inf step " \
                                                            f"changed a tensor"


def _run_sequence(sizes, dtype, roles, ema_every, step_fn, seed, misalign=(), steps=None,
                  n_emas=1):
    """Drive both backends through AMP_STEPS; compare after each step, then re-sync."""
    tri = _Problem(sizes, dtype, roles, seed, misalign, n_emas)
    want = tri.clone()
    gen = _gen(seed + 1)
    steps = AMP_STEPS if steps is None else steps
    taken = 0
    for k, (scale, inf) in enumerate(steps):
        tri.new_grads(gen, scale, nonfinite=bool(inf))
        for a, b in zip(want.grads, tri.grads):
            a.copy_(b)
        gs = None if scale is None else torch.tensor([scale], device=DEVICE)
        fi = None if inf is None else torch.tensor([inf], device=DEVICE)
        ema_on = (k + 1) % ema_every == 0
        # Alternate how a non-EMA step is expressed: emas passed (and ignored) or None.
        before = tri.clone()
        for backend, prob in ((tk, tri), (ref, want)):
            weight = step_fn(backend, prob, taken, ema_on, (k % 2 == 0), gs, fi)
        if inf:
            _assert_unchanged(tri, before, k)
            _assert_unchanged(want, before, k)
        else:
            taken += 1
            _compare(tri, want, k, weight, before)
        tri.copy_from(want)


def _adam_step(case, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8):
    def step(backend, prob, taken, ema_on, pass_emas_anyway, gs, fi):
        t = taken + 1
        # ρ̂ weights on both sides of lerp's 0.5 switch between its two formulas
        weight = (0.0625 if t % 2 else 0.75) if ema_on else None
        backend.adam_ema(
            prob.params, prob.grads, prob.state["exp_avg"], prob.state["exp_avg_sq"],
            prob.state["max_exp_avg_sq"] if case["amsgrad"] else None,
            prob.emas if (ema_on or pass_emas_anyway) else None,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=case["weight_decay"],
            decoupled=case["decoupled"], maximize=case["maximize"],
            step_size=lr / (1 - beta1 ** t), bias_correction2_sqrt=(1 - beta2 ** t) ** 0.5,
            ema_weight=weight, grad_scale=gs, found_inf=fi)
        return weight
    return step


def _sgd_step(case, lr=0.05):
    def step(backend, prob, taken, ema_on, pass_emas_anyway, gs, fi):
        weight = (1e-3 if taken % 2 else 1.0) if ema_on else None  # 1.0: ζ becomes θ exactly
        backend.sgd_ema(
            prob.params, prob.grads,
            prob.state["momentum_buffer"] if case["momentum"] else None,
            prob.emas if (ema_on or pass_emas_anyway) else None,
            lr=lr, momentum=case["momentum"], dampening=case["dampening"],
            weight_decay=case["weight_decay"], nesterov=case["nesterov"],
            maximize=case["maximize"], first_step=taken == 0,
            ema_weight=weight, grad_scale=gs, found_inf=fi)
        return weight
    return step


def _adam_roles(case):
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if case["amsgrad"] else ())


def _sgd_roles(case):
    return ("momentum_buffer",) if case["momentum"] else ()


def _layout_sizes(layout):
    return LIST_SIZES if layout == "list" else (int(layout[4:]),)


# Every optimizer case x dtype x ema_every x {each flat size, list}: the flat sizes rotate over
# the cases (each case sees two sizes per dtype, every size is seen by every dtype and by both
# optimizers, with both ema_every values); the list layout runs for every combination.
def _grid(cases):
    out = []
    for ci, name in enumerate(cases):
        for di, dtype in enumerate(DTYPES):
            for every in (1, 3):
                out.append((name, dtype, every, "list"))
                size = SIZES[(ci + di + every) % len(SIZES)]
                out.append((name, dtype, every, f"flat{size}"))
    return out


def _id(p):
    return DT.get(p, str(p)) if isinstance(p, torch.dtype) else str(p)


@pytest.mark.parametrize("case,dtype,ema_every,layout", _grid(ADAM_CASES), ids=_id)
def test_adam_matches_reference(case, dtype, ema_every, layout):
    cfg = ADAM_CASES[case]
    sizes = _layout_sizes(layout)
    misalign = (2,) if layout == "list" else ()
    _run_sequence(sizes, dtype, _adam_roles(cfg), ema_every, _adam_step(cfg),
                  seed=hash((case, DT[dtype], ema_every, layout)) % 10_000, misalign=misalign)


@pytest.mark.parametrize("case,dtype,ema_every,layout", _grid(SGD_CASES), ids=_id)
def test_sgd_matches_reference(case, dtype, ema_every, layout):
    cfg = SGD_CASES[case]
    sizes = _layout_sizes(layout)
    misalign = (2,) if layout == "list" else ()
    _run_sequence(sizes, dtype, _sgd_roles(cfg), ema_every, _sgd_step(cfg),
                  seed=hash((case, DT[dtype], ema_every, layout)) % 10_000, misalign=misalign)


# capturable (DEVICE_SCALARS kernels): lr, t and the EMA weights are device tensors
def _cap_weights(t, n_emas):
    """One weight per EMA, on both sides of lerp's 0.5 switch between its formulas; 1.0 makes
    the second EMA equal θ exactly."""
    return [0.0625 if t % 2 else 0.75, 1e-3 if t % 2 else 1.0][:n_emas]


def _cap_emas(prob, n_emas):
    """The EMA argument: one list (the single-EMA form) or a list of lists."""
    return prob.emas if n_emas == 1 else prob.ema_lists()[:max(n_emas, 1)]


def _cap_lr(t, base):
    return torch.tensor([base * (1.0 + 0.5 * (t % 3))], device=DEVICE)  # changes every step


def _adam_cap_step(case, n_emas, beta1=0.9, beta2=0.999, eps=1e-8):
    def step(backend, prob, taken, ema_on, pass_emas_anyway, gs, fi):
        t = taken + 1
        weights = _cap_weights(t, n_emas) if ema_on and n_emas else None
        backend.adam_ema_capturable(
            prob.params, prob.grads, prob.state["exp_avg"], prob.state["exp_avg_sq"],
            prob.state["max_exp_avg_sq"] if case["amsgrad"] else None,
            _cap_emas(prob, n_emas) if (weights or pass_emas_anyway) else None,
            lr=_cap_lr(t, 1e-2), step=torch.tensor([float(t)], device=DEVICE), beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=case["weight_decay"],
            decoupled=case["decoupled"], maximize=case["maximize"],
            ema_weight=None if weights is None else torch.tensor(weights, device=DEVICE),
            grad_scale=gs, found_inf=fi)
        return weights
    return step


def _sgd_cap_step(case, n_emas):
    def step(backend, prob, taken, ema_on, pass_emas_anyway, gs, fi):
        weights = _cap_weights(taken + 1, n_emas) if ema_on and n_emas else None
        backend.sgd_ema_capturable(
            prob.params, prob.grads,
            prob.state["momentum_buffer"] if case["momentum"] else None,
            _cap_emas(prob, n_emas) if (weights or pass_emas_anyway) else None,
            lr=_cap_lr(taken + 1, 0.05), momentum=case["momentum"],
            dampening=case["dampening"], weight_decay=case["weight_decay"],
            nesterov=case["nesterov"], maximize=case["maximize"], first_step=taken == 0,
            ema_weight=None if weights is None else torch.tensor(weights, device=DEVICE),
            grad_scale=gs, found_inf=fi)
        return weights
    return step


CAP_ADAM = ("adamw", "adam_l2_amsgrad_maximize", "adamw_amsgrad")
CAP_SGD = ("sgd", "sgd_momentum_wd", "sgd_nesterov_wd")


def _cap_grid(cases):
    """case x dtype x {list (with an odd-offset view), one flat size}: the EMA count (0-2),
    the flat size and ema_every rotate so every dtype sees every EMA count and both layouts."""
    out = []
    for ci, name in enumerate(cases):
        for di, dtype in enumerate(DTYPES):
            k = (ci + di) % 3
            out.append((name, dtype, k, "list"))
            out.append((name, dtype, (k + 1) % 3, f"flat{SIZES[(ci + 2 * di) % len(SIZES)]}"))
    return out


@pytest.mark.parametrize("case,dtype,n_emas,layout", _cap_grid(CAP_ADAM), ids=_id)
def test_adam_capturable_matches_reference_capturable(case, dtype, n_emas, layout):
    """adam_ema_capturable (lr, t, 1 − ρ̂ read on the device) against the reference's, with
    grad_scale / found_inf steps (a found_inf step changes nothing)."""
    cfg = ADAM_CASES[case]
    _run_sequence(_layout_sizes(layout), dtype, _adam_roles(cfg), 1 + n_emas % 2,
                  _adam_cap_step(cfg, n_emas), seed=hash((case, DT[dtype], layout)) % 10_000,
                  misalign=(2,) if layout == "list" else (), n_emas=max(n_emas, 1))


@pytest.mark.parametrize("case,dtype,n_emas,layout", _cap_grid(CAP_SGD), ids=_id)
def test_sgd_capturable_matches_reference_capturable(case, dtype, n_emas, layout):
    cfg = SGD_CASES[case]
    _run_sequence(_layout_sizes(layout), dtype, _sgd_roles(cfg), 1 + n_emas % 2,
                  _sgd_cap_step(cfg, n_emas), seed=hash((case, DT[dtype], layout)) % 10_000,
                  misalign=(2,) if layout == "list" else (), n_emas=max(n_emas, 1))


def test_cap_grid_covers_every_axis():
    for cases in (CAP_ADAM, CAP_SGD):
        grid = _cap_grid(cases)
        for dtype in DTYPES:
            assert {k for _, d, k, _ in grid if d == dtype} == {0, 1, 2}
            assert {lay == "list" for _, d, _, lay in grid if d == dtype} == {True, False}
    assert {lay for _, _, _, lay in _cap_grid(CAP_ADAM) + _cap_grid(CAP_SGD)} >= \
        {f"flat{s}" for s in SIZES}


def test_grid_covers_every_axis():
    for cases in (ADAM_CASES, SGD_CASES):
        grid = _grid(cases)
        assert {c for c, *_ in grid} == set(cases)
        for dtype in DTYPES:
            for every in (1, 3):
                seen = {lay for _, d, e, lay in grid if d == dtype and e == every}
                assert "list" in seen
            flat = {lay for _, d, _, lay in grid if d == dtype}
            assert {f"flat{s}" for s in SIZES} <= flat, (dtype, flat)
    assert set(SIZES) <= set(LIST_SIZES)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_mixed_dtype_list(opt):
    """One call over tensors of different parameter dtypes: one launch per dtype."""
    gen = _gen(5)
    sizes = (4097, 7, 2 ** 12, 1)
    probs = [_Problem(sizes[i:i + 1] * 2, DTYPES[i % 3], ("exp_avg", "exp_avg_sq")
                      if opt == "adam" else ("momentum_buffer",), seed=i) for i in range(3)]
    tri = object.__new__(_Problem)
    tri.params = [t for p in probs for t in p.params]
    tri.grads = [t for p in probs for t in p.grads]
    tri.emas = [t for p in probs for t in p.emas]
    tri.state = {r: [t for p in probs for t in p.state[r]] for r in probs[0].state}
    for lst in tri.state.values():
        for t in lst:
            t.copy_(torch.randn(t.numel(), generator=gen) * 0.01).abs_()
    want = tri.clone()
    before = tri.clone()
    if opt == "adam":
        step = _adam_step(ADAM_CASES["adamw"])
    else:
        step = _sgd_step(SGD_CASES["sgd_nesterov_wd"])
    for backend, prob in ((tk, tri), (ref, want)):
        weight = step(backend, prob, 1, True, True, None, None)
    _compare(tri, want, 0, weight, before)


def test_table_is_cached_and_chunked():
    ttables._table_cache.clear()
    B = tcfg.BLOCK
    prob = _Problem((2 * B + 5, 1, B, 0), torch.float32, ("exp_avg", "exp_avg_sq"), seed=3)
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                  maximize=False, step_size=1e-2, bias_correction2_sqrt=0.1, ema_weight=None)
    args = (prob.params, prob.grads, prob.state["exp_avg"], prob.state["exp_avg_sq"], None, None)
    tk.adam_ema(*args, **kwargs)
    assert len(ttables._table_cache) == 1
    (table, n_chunks), = ttables._table_cache.values()
    assert n_chunks == 3 + 1 + 1  # the empty tensor is left out and has no chunk
    n = 3
    # rows: θ g m v vmax ζ0 ζ1 ζ2 ζ3 (MAX_EMAS EMA rows), sizes, chunk tensors, chunk starts
    rows = table.tolist()
    assert rows[:n] == [p.data_ptr() for p in prob.params[:n]]
    assert rows[4 * n:9 * n] == [0] * (5 * n)  # no AMSGrad, no EMA: absent roles
    assert rows[9 * n:10 * n] == [2 * B + 5, 1, B]
    assert rows[10 * n:10 * n + n_chunks] == [0, 0, 0, 1, 2]
    assert rows[10 * n + n_chunks:] == [0, B, 2 * B, 0, 0]
    tk.adam_ema(*args, **kwargs)
    assert len(ttables._table_cache) == 1  # same tensors: no new table, no copy
    # two EMAs: their rows hold the ζ_i addresses, the others stay 0
    zs = [[torch.zeros_like(p) for p in prob.params] for _ in range(2)]
    tk.adam_ema(*args[:5], zs, **dict(kwargs, ema_weight=[0.5, 0.25]))
    assert len(ttables._table_cache) == 2
    rows = list(ttables._table_cache.values())[-1][0].tolist()
    assert rows[5 * n:6 * n] == [z.data_ptr() for z in zs[0][:n]]
    assert rows[6 * n:7 * n] == [z.data_ptr() for z in zs[1][:n]]
    assert rows[7 * n:9 * n] == [0] * (2 * n)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_production_block_size(opt, monkeypatch):
    """The launchers' real BLOCK under the interpreter: many programs, list and flat."""
    monkeypatch.setattr(tcfg, "BLOCK", PROD_BLOCK)
    if opt == "adam":
        cfg = ADAM_CASES["adam_l2_amsgrad_maximize"]
        roles, step = _adam_roles(cfg), _adam_step(cfg)
    else:
        cfg = SGD_CASES["sgd_nesterov_wd"]
        roles, step = _sgd_roles(cfg), _sgd_step(cfg)
    for sizes in ((3 * PROD_BLOCK + 17,), (PROD_BLOCK + 1, 5, 2 * PROD_BLOCK, 1)):
        _run_sequence(sizes, torch.bfloat16, roles, 1, step, seed=len(sizes),
                      steps=AMP_STEPS[:3])


def test_validation_messages():
    p, g, m, v = (torch.zeros(8, device=DEVICE) for _ in range(4))
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
              maximize=False, step_size=1e-3, bias_correction2_sqrt=1.0, ema_weight=None)
    with pytest.raises(TypeError, match="float64.*backend='reference'"):
        tk.adam_ema([p.double()], [g.double()], [m.double()], [v.double()], None, None, **kw)
    with pytest.raises(ValueError, match="2 params but 1 grads"):
        tk.adam_ema([p, p], [g], [m, m], [v, v], None, None, **kw)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] is not contiguous"):
        tk.adam_ema([p], [g], [torch.zeros(16, device=DEVICE)[::2]], [v], None, None, **kw)
    with pytest.raises(TypeError, match=r"grads\[0\] is torch.float16"):
        tk.adam_ema([p], [g.half()], [m], [v], None, None, **kw)
    with pytest.raises(TypeError, match=r"exp_avg_sqs\[0\] is torch.bfloat16.*float32"):
        tk.adam_ema([p], [g], [m], [v.bfloat16()], None, None, **kw)
    with pytest.raises(ValueError, match=r"emas\[0\] has 4 elements"):
        tk.adam_ema([p], [g], [m], [v], None, [torch.zeros(4, device=DEVICE)],
                    **dict(kw, ema_weight=0.1))
    with pytest.raises(ValueError, match=r"grads\[0\] is on meta"):
        tk.adam_ema([p], [torch.empty(8, device="meta")], [m], [v], None, None, **kw)
    with pytest.raises(ValueError, match="ema_weight is set but emas is None"):
        tk.adam_ema([p], [g], [m], [v], None, None, **dict(kw, ema_weight=0.1))
    with pytest.raises(ValueError, match="found_inf must be a one-element float32"):
        tk.adam_ema([p], [g], [m], [v], None, None, found_inf=torch.zeros(2, device=DEVICE),
                    **kw)
    skw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
               maximize=False, first_step=True, ema_weight=None)
    with pytest.raises(ValueError, match="momentum_buffers is None"):
        tk.sgd_ema([p], [g], None, None, **skw)
    with pytest.raises(TypeError, match="float64.*backend='reference'"):
        tk.sgd_ema([p.double()], [g.double()], None, None, **dict(skw, momentum=0.0))
    tk.adam_ema([], [], [], [], None, None, **kw)  # nothing to do
    tk.ema_only([p], [m], 0.5)


def test_capturable_validation_messages():
    """The device scalars are checked without being read: type, element count, device."""
    p, g, m, v = (torch.zeros(8, device=DEVICE) for _ in range(4))
    one = torch.ones(1, device=DEVICE)
    kw = dict(lr=one, step=one, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
              decoupled=True, maximize=False, ema_weight=None)
    with pytest.raises(TypeError, match="adam_ema_capturable: lr must be a floating-point "
                                        "tensor.*got float"):
        tk.adam_ema_capturable([p], [g], [m], [v], None, None, **dict(kw, lr=1e-3))
    with pytest.raises(ValueError, match=r"step must have 1 element, got shape \(2,\)"):
        tk.adam_ema_capturable([p], [g], [m], [v], None, None,
                               **dict(kw, step=torch.ones(2, device=DEVICE)))
    with pytest.raises(ValueError, match="lr is on meta but the parameters are on"):
        tk.adam_ema_capturable([p], [g], [m], [v], None, None,
                               **dict(kw, lr=torch.ones(1, device="meta")))
    with pytest.raises(ValueError, match="ema_weight has 2 elements but emas is one EMA list"):
        tk.adam_ema_capturable([p], [g], [m], [v], None, [m.clone()],
                               **dict(kw, ema_weight=torch.ones(2, device=DEVICE)))
    skw = dict(lr=one, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
               maximize=False, first_step=False, ema_weight=None)
    with pytest.raises(ValueError, match="sgd_ema_capturable: momentum is non-zero but "
                                         "momentum_buffers is None"):
        tk.sgd_ema_capturable([p], [g], None, None, **skw)
    with pytest.raises(TypeError, match="sgd_ema_capturable: lr must be a floating-point "
                                        "tensor.*torch.int64"):
        tk.sgd_ema_capturable([p], [g], [m], None,
                              **dict(skw, lr=torch.ones(1, dtype=torch.int64, device=DEVICE)))
    # a float64 lr is converted on the device (no host read): the float32 value is used
    q = p.clone().fill_(1.0)
    tk.sgd_ema_capturable([q], [g.clone().fill_(1.0)], None, None,
                          **dict(skw, momentum=0.0, lr=torch.full((1,), 0.25, device=DEVICE,
                                                                  dtype=torch.float64)))
    assert torch.equal(q, torch.full_like(q, 0.75))
    tk.adam_ema_capturable([], [], [], [], None, None, **kw)  # nothing to do


def test_interface_matches_reference():
    import inspect
    for name in ("adam_ema", "sgd_ema", "ema_only", "adam_ema_capturable",
                 "sgd_ema_capturable"):
        a, b = inspect.signature(getattr(tk, name)), inspect.signature(getattr(ref, name))
        assert list(a.parameters) == list(b.parameters), name
        assert [p.kind for p in a.parameters.values()] == [p.kind for p in b.parameters.values()]
    assert tk.NAME == "triton"
    ok, why = tk.availability(DEVICE)
    assert ok and ("TRITON_INTERPRET" in why) == INTERPRETED


def test_backend_package_does_not_shadow_triton():
    """The package is named ``ema_kernels.backends.triton``: its modules' ``import triton`` must
    still get the real triton (absolute imports), whose JIT decorated the kernels."""
    import triton
    from ema_kernels.backends.triton import config, kernels
    assert config.triton is triton and kernels.triton is triton
    assert triton.__name__ == "triton" and "ema_kernels" not in Path(triton.__file__).parts
    assert type(kernels._adam_flat_kernel).__module__.startswith("triton.")


def test_registry_and_optimizers_run_it():
    """Through the registry and the public optimizers (flat and tensor-list paths)."""
    import ema_kernels as ek
    from ema_kernels import _ops
    assert _ops.resolve("triton", DEVICE) is tk
    assert "triton" in ek.available_backends(DEVICE)
    for make in (lambda ps, b: ek.AdamW(ps, lr=1e-2, ema_decay=0.9, backend=b),
                 lambda ps, b: ek.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, ema_decay=0.9,
                                      ema_every=2, backend=b)):
        models, opts = [], []
        for backend in ("triton", "reference"):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(9, 5), torch.nn.Linear(5, 3)).to(DEVICE)
            models.append(model)
            opts.append(make(model.parameters(), backend))
        x = torch.randn(4, 9, device=DEVICE)
        for it in range(4):
            for model, opt in zip(models, opts):
                opt.zero_grad(set_to_none=it >= 2)  # flat buffer, then separate grads
                model(x).square().sum().backward()
                opt.step()
        # Four steps without re-syncing: ulp-level differences compound, hence 1e-5.
        for pa, pb in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=FP32_ATOL)
        for za, zb in zip(opts[0].ema_parameters(), opts[1].ema_parameters()):
            torch.testing.assert_close(za, zb, rtol=1e-5, atol=FP32_ATOL)


_NO_INTERPRET = r"""
import os, torch
os.environ.pop("TRITON_INTERPRET", None)
def _no(*a, **k):
    raise AssertionError("device query or compile at import")
torch.cuda.is_available = _no
torch.cuda.device_count = _no
import triton
triton.compile = _no
from ema_kernels.backends import triton as tk   # must query and compile nothing
ok, why = tk.availability("cpu")
assert not ok and "TRITON_INTERPRET=1" in why and "'cpp'" in why and "'reference'" in why, why
from ema_kernels import _ops
assert "triton" not in _ops.available_backends("cpu")
try:
    _ops.resolve("triton", "cpu")
except _ops.BackendUnavailableError as e:
    assert "TRITON_INTERPRET=1" in str(e), e
else:
    raise AssertionError("resolve('triton', 'cpu') did not raise")
x = torch.zeros(4)
try:
    tk.sgd_ema([x], [x.clone()], None, None, lr=0.1, momentum=0.0, dampening=0.0,
               weight_decay=0.0, nesterov=False, maximize=False, first_step=True,
               ema_weight=None)
except RuntimeError as e:
    assert "TRITON_INTERPRET=1" in str(e), e
else:
    raise AssertionError("ran on CPU without the interpreter")
print("OK")
"""


@pytest.mark.skipif(not (INTERPRETED and torch.cuda.is_available()),
                    reason="needs a visible GPU (this run interprets the kernels on the CPU)")
def test_compiled_kernels_on_cuda():  # pragma: no cover - GPU machines only
    """On a GPU machine: this module's numerical tests again, on CUDA tensors, with the
    compiled kernels (a subprocess: TRITON_INTERPRET is process-wide)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          str(Path(__file__)), "-k", "not aot and not compiled_kernels_on_cuda"],
                         cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " skipped" not in out.stdout.splitlines()[-1], out.stdout


def test_cpu_without_interpreter_is_unavailable_and_import_is_inert():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _NO_INTERPRET], cwd=str(ROOT), env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation results (collected from the background workers)
# ----------------------------------------------------------------------------------------------
def _expected_vectors(label):
    """Vector accesses in the unmasked path of a variant: each thread owns its elements in runs
    of 4 (16-byte fp32 / 8-byte bf16, fp16 accesses), one access per run per stream the variant
    must touch, and none for a stream it must not (EMAs not updated, no AMSGrad, no
    momentum): each of the ``emas=k`` EMAs one fp32 stream read and written."""
    kind, rest = label.split("[")
    dtype, *flags = rest.rstrip("]").split(",")
    on = {k: (int(v) if v.isdigit() else v == "True") for k, v in (f.split("=") for f in flags)}
    runs = PROD_BLOCK // (PROD_WARPS * 32) // 4
    emas = on.get("emas", 0)
    reads, writes = 2, 1                                 # θ g read, θ written
    if kind.startswith("adam"):
        state_in = state_out = 2 + on["amsgrad"] + emas  # m v [vmax] z_0..z_k-1
    elif kind.startswith(("sgd", "lars")):
        state_in = state_out = on["momentum"] + emas     # [buf] z_0..z_k-1
    elif kind.startswith("lion"):
        state_in = state_out = 1 + emas                  # m z_0..z_k-1
    elif kind.startswith("lamb_moments"):
        state_in = state_out = 2                         # m v; θ read, not written
        reads, writes = 2, 0
    elif kind.startswith("lamb_ema"):
        state_in, state_out = 2 + emas, emas             # m v read; z_0..z_k-1; no g
        reads, writes = 1, 1
    elif kind.startswith("chunk_sums"):
        state_in = state_out = reads = writes = 0        # scalar rows of partial sums
    else:
        state_in = state_out = emas                      # EMA only: z_0..z_k-1, θ read
        reads, writes = 1, 0
    fp32_in, fp32_out = state_in, state_out
    half_in, half_out = 0, 0
    if dtype == "fp32":
        fp32_in, fp32_out = fp32_in + reads, fp32_out + writes
    else:
        half_in, half_out = reads, writes
    return dict(ld_v4=runs * fp32_in, st_v4=runs * fp32_out, ld_v2=runs * half_in,
                st_v2=runs * half_out)


# Kernels that reduce across the block (LAMB's per-chunk sums): their tl.sum goes through
# shared memory, which the others must not touch.
_REDUCING = ("lamb_moments", "chunk_sums")


@pytest.mark.parametrize("arch", AOT_ARCHS, ids=lambda a: f"sm_{a}")
def test_aot_compile_every_variant(arch):
    _start_aot_workers()
    proc = _aot_procs[arch]
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-4000:]
    recs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    labels = [label for label, *_ in tk.aot_variants()]
    assert [r["label"] for r in recs] == labels
    errors = [f"{r['label']}: {r['error']}" for r in recs if "error" in r]
    assert not errors, "\n".join(errors)
    report = []
    for r in recs:
        assert r["target"], r
        assert "regs" in r, r
        assert r["local"] == 0 and r["stack"] == 0, f"{r['label']} spills: {r}"
        if "_flat[" in r["label"]:  # pid * BLOCK in int64 (list kernels load int64 starts)
            assert r["i64_offsets"], f"{r['label']}: offsets are not computed in 64 bits"
        want = _expected_vectors(r["label"])
        assert {k: r[k] for k in want} == want, (r["label"], r, want)
        assert r["convert_layout"] == 0, f"{r['label']}: layout conversion"
        assert r["shared"] == 0 or r["label"].startswith(_REDUCING), f"{r['label']}: shared"
        report.append(f"sm_{arch} {r['label']}: {r['regs']} regs, {r['local']} B local, "
                      f"ld v4/v2 {r['ld_v4']}/{r['ld_v2']}, st v4/v2 {r['st_v4']}/{r['st_v2']},"
                      f" {r['seconds']} s")
    print("\n".join(report))
    # The fp32 flat AdamW + EMA kernel: 16-byte loads of every stream (θ g m v ζ), 16-byte
    # stores of θ m v ζ; without EMA, one stream fewer each way; each further EMA (all in the
    # same pass) one more each way.
    fp32 = {r["label"]: r for r in recs}
    ema, no_ema, two = (fp32[f"adam_flat[fp32,emas={k},amsgrad=False]"] for k in (1, 0, 2))
    assert ema["ld_v4"] >= 5 and ema["st_v4"] >= 4 and ema["ld_v2"] == 0
    assert ema["ld_v4"] * 4 == no_ema["ld_v4"] * 5 and ema["st_v4"] * 3 == no_ema["st_v4"] * 4
    assert two["ld_v4"] * 5 == ema["ld_v4"] * 6 and two["st_v4"] * 4 == ema["st_v4"] * 5


# ----------------------------------------------------------------------------------------------
# Persistent list launches (grid.py)
# ----------------------------------------------------------------------------------------------
def test_persistent_grid_gives_the_same_bits(monkeypatch):
    """A list launch's grid (1 program, 2, 3, one per chunk) changes which program runs a chunk,
    never the result: the same bits, SR and several EMAs included."""
    from ema_kernels.backends.triton import grid as tgrid
    sizes = (3 * TEST_BLOCK + 5, 7, TEST_BLOCK, 2 * TEST_BLOCK - 1)
    n_chunks = sum(-(-n // TEST_BLOCK) for n in sizes)
    base = _Problem(sizes, torch.bfloat16, ("exp_avg", "exp_avg_sq"), seed=11, n_emas=2)
    results = []
    for programs in (1, 2, n_chunks, None):
        monkeypatch.setattr(tcfg, "PROGRAMS", programs)
        if programs is not None:
            assert tgrid.programs("k", torch.device(DEVICE), n_chunks) == min(programs, n_chunks)
        prob = base.clone()
        tk.adam_ema(prob.params, prob.grads, prob.state["exp_avg"], prob.state["exp_avg_sq"],
                    None, prob.ema_lists(), lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.1, decoupled=True, maximize=False, step_size=1e-2,
                    bias_correction2_sqrt=0.5, ema_weight=[0.25, 0.75], stochastic_rounding=True,
                    sr_seed=99, sr_step=3)
        results.append(prob.tensors())
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    assert not all(torch.equal(a, b) for a, b in zip(results[0], base.tensors()))


def test_grid_is_a_whole_number_of_resident_waves(monkeypatch):
    """grid.py's occupancy arithmetic (NVIDIA's calculator for sm_90: 64K registers, 2048
    threads, 228 KB shared memory per SM), and its cache: the first launch of a variant on a
    device runs one program per chunk, later ones one wave of the resident programs."""
    from ema_kernels.backends.triton import grid as tgrid
    h100 = dict(regs_per_sm=65536, threads_per_sm=2048, shared_per_sm=233472)
    assert tgrid.resident_programs(88, 8, 0, **h100) == 2      # 88 regs x 256 threads
    assert tgrid.resident_programs(56, 8, 0, **h100) == 4
    assert tgrid.resident_programs(32, 8, 0, **h100) == 8      # the thread limit
    assert tgrid.resident_programs(32, 1, 0, **h100) == 32     # the block limit
    assert tgrid.resident_programs(32, 8, 100_000, **h100) == 2  # shared memory
    assert tgrid.resident_programs(255, 32, 0, **h100) == 1    # never 0

    class Props:
        regs_per_multiprocessor, max_threads_per_multi_processor = 65536, 2048
        shared_memory_per_multiprocessor, warp_size, multi_processor_count = 233472, 32, 132

    class Compiled:
        n_regs = 56

        class metadata:
            num_warps, shared = 8, 0

    monkeypatch.setattr(tcfg, "PROGRAMS", None)
    monkeypatch.setattr(tgrid, "_capacity", {})
    monkeypatch.setattr(tgrid, "_is_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props)
    dev = torch.device("cuda", 0)
    assert tgrid.programs("v", dev, 10_000) == 10_000  # not launched yet: one per chunk
    tgrid.record("v", dev, None)  # (the interpreter returns no kernel: nothing learnt)
    assert tgrid.programs("v", dev, 10_000) == 10_000
    tgrid.record("v", dev, Compiled)
    assert tgrid.programs("v", dev, 10_000) == 132 * 4
    assert tgrid.programs("v", dev, 100) == 100
    assert tgrid.programs("other", dev, 10_000) == 10_000
    monkeypatch.setattr(tcfg, "PROGRAMS", 7)
    assert tgrid.programs("v", dev, 10_000) == 7
