"""Property-based equivalence: every CPU backend equals the reference, the reference equals float64.

For random problems (tensor counts and shapes including 0-element, 0-dim and odd sizes; fp32,
bf16, fp16 and mixed-dtype groups; one or two param groups with their own hyperparameters;
frozen parameters; AdamW / Adam / SGD with every option: betas, eps, weight decay, AMSGrad,
maximize, momentum, dampening, Nesterov; EMA decay incl. 0, 1 and None, ema_every, schedules,
κ fixed or changing every step, scale_optimizer; flat gradients, tensor-list gradients with some
None, user-replaced gradients, flatten=False; 1-5 steps with found_inf / grad_scale on some):

- the reference backend, free-running, is checked after *every* step against a float64
  re-computation of that step from its own state before the step (tests/reliability_support.py,
  written from DESIGN.md and torch.optim's update, not from the library's code);
- every other backend, free-running, is checked after every step against the reference stepped
  from the backend's own state (synchronised through the public state_dict round trip), with the
  DESIGN.md tolerances.

Examples: ``HYPOTHESIS_PROFILE=ci`` (default, derandomized) runs 200 problems per backend set,
``local`` ten times more with fresh randomness, ``dev`` a tenth (50 per optimizer in ci).
"""
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import ema_kernels as ek

import reliability_support as rs

# Problems where every backend runs.  The Triton interpreter costs ~13 ms per tensor in the
# tensor-list path, so these stay at <= 6 tensors per group and <= 4097 elements per tensor.
EXAMPLES = 200


OPTS = ["adamw", "adam", "sgd", "adam_dwd"]  # adam_dwd: Adam(decoupled_weight_decay=True)


@pytest.mark.parametrize("opt", OPTS)
@rs.hsettings(EXAMPLES // len(OPTS))
@given(data=st.data())
def test_every_backend_equals_reference_and_reference_equals_float64(opt, data):
    problem = data.draw(rs.problems(opt=opt), label="problem")
    note(rs.describe(problem))
    counts = rs.run_problem(problem, rs.BACKENDS)
    assert counts["reference"] == len(problem["steps"])


# Without the slow interpreter: more tensors per group and more examples per run.
@pytest.mark.parametrize("opt", OPTS)
@rs.hsettings(100 // len(OPTS))
@given(data=st.data())
def test_compiled_backends_many_tensors(opt, data):
    problem = data.draw(rs.problems(opt=opt, max_tensors=24), label="problem")
    note(rs.describe(problem))
    rs.run_problem(problem, [b for b in rs.BACKENDS if b not in rs.SLOW_BACKENDS])


@pytest.mark.skipif("cpp" not in rs.BACKENDS, reason="the compiled extension is not built")
@rs.hsettings(60)
@given(problem=rs.problems(max_tensors=8, capturable=True))
def test_capturable_cpp_equals_reference(problem):
    """capturable=True (lr, step and 1 − ρ̂ from device tensors, found_inf never read on the
    host) on the cpp backend against the reference's ordinary path, step by step; on found_inf
    steps nothing but the host call counters moves (docs/layout_and_checkpoints.md)."""
    note(rs.describe(problem))
    rs.run_problem(problem, ["cpp"], check_f64=False, build_kw={"cpp": dict(capturable=True)})


# ------------------------------------------------------------------------------------------------
# Deterministic edge cases (not left to chance)
# ------------------------------------------------------------------------------------------------
def _problem(opt, shapes, dtype, steps, hp=None, flatten=True, groups=None, seed=0, **kw):
    base = dict(lr=0.01, maximize=False, ema_decay=0.9, ema_every=1, kappa=1.0,
                scale_optimizer=True)
    if opt == "sgd":
        base.update(momentum=0.9, nesterov=True, dampening=0.0, weight_decay=0.01)
    else:
        base.update(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=True)
    base.update(hp or {})
    tensors = [dict(shape=s, dtype=dtype, requires_grad=True) for s in shapes]
    return dict(opt=opt, hp=base, schedule=kw.get("schedule"), flatten=flatten,
                groups=groups or [dict(tensors=tensors, overrides={})], steps=steps, seed=seed,
                init_scale=1.0, grad_scale_mag=1.0)


def _steps(n, n_trainable, modes=("flat",), none_every=0):
    out = []
    for k in range(n):
        mode = modes[k % len(modes)]
        mask = [mode == "list" and none_every and (j + k) % none_every == 0
                for j in range(n_trainable)]
        out.append(dict(mode=mode, none_mask=mask, found_inf=None, grad_scale=None, kappa=None))
    return out


@pytest.mark.parametrize("opt,dtype", [("adamw", torch.bfloat16), ("sgd", torch.float32)],
                         ids=["adamw-bf16", "sgd-fp32"])
def test_a_few_thousand_small_tensors(opt, dtype):
    """2500 tensors of 0-5 elements (+ a 0-dim one) in one group: one flat bucket on every
    backend; then tensor-list steps with some gradients None and a flat step with per-parameter
    step counts that differ, on the compiled backends (the interpreter's list path costs ~13 ms
    per tensor: it runs that part on 200 of them)."""
    gen = torch.Generator().manual_seed(7)
    sizes = torch.randint(0, 6, (2500,), generator=gen).tolist()
    shapes = [()] + [(n,) for n in sizes]
    flat = _problem(opt, shapes, dtype, _steps(2, len(shapes)), seed=1)
    rs.run_problem(flat, rs.BACKENDS)
    lst = _problem(opt, shapes, dtype, _steps(2, len(shapes), ("list", "flat"), none_every=5),
                   seed=2)
    rs.run_problem(lst, [b for b in rs.BACKENDS if b not in rs.SLOW_BACKENDS])
    if "triton" in rs.BACKENDS:
        few = _problem(opt, shapes[:200], dtype,
                       _steps(2, 200, ("list", "flat"), none_every=5), seed=3)
        rs.run_problem(few, ["triton"])


@pytest.mark.parametrize("opt,dtype", [("adamw", torch.bfloat16), ("adamw", torch.float32),
                                       ("sgd", torch.float16)],
                         ids=["adamw-bf16", "adamw-fp32", "sgd-fp16"])
def test_odd_sizes_across_chunk_boundaries(opt, dtype):
    """Sizes straddling every backend's internal chunking: Triton's 2048-element blocks, the cpp
    kernel's 16384-element chunks and 32768-element OpenMP threshold, the reference's 65536-
    element scratch chunks; 2**20 + 3 (DESIGN.md's odd size) on the compiled backends.  The
    interpreter (~5 ms per 2048-element program) gets the sizes that matter to Triton."""
    shapes = [(1,), (2047,), (2049,), (16385,), (32769,), (65537,)]
    fast = [b for b in rs.BACKENDS if b not in rs.SLOW_BACKENDS]
    rs.run_problem(_problem(opt, shapes, dtype, _steps(2, len(shapes), ("flat", "list"))), fast)
    big = _problem(opt, [(2 ** 20 + 3,), (3,)], dtype, _steps(2, 2, ("flat", "list")), seed=5)
    rs.run_problem(big, fast)
    if "triton" in rs.BACKENDS:
        tri = [(1,), (2047,), (2049,), (4097,), (6143,)]
        rs.run_problem(_problem(opt, tri, dtype, _steps(2, len(tri), ("flat", "list")), seed=6),
                       ["triton"])


@pytest.mark.skipif("cpp" not in rs.BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_capturable_sgd_first_step_skipped_by_found_inf(dampening):
    """GradScaler's first step often overflows: under capturable=True that skipped step must not
    count as the momentum buffer's initialisation (torch: the first *applied* step sets
    buf = d; a dampened update of a zero buffer gives (1 − dampening)·d instead)."""
    steps = _steps(3, 2)
    steps[0]["found_inf"] = 1.0
    prob = _problem("sgd", [(5,), (3,)], torch.float32, steps,
                    hp=dict(nesterov=False, dampening=dampening))
    if dampening != 0:
        # which step is the first applied one is known only on the device: refused, clearly
        with pytest.raises(ValueError, match="dampening=0"):
            ek.SGD([torch.nn.Parameter(torch.randn(3))], momentum=0.9, dampening=dampening,
                   capturable=True, backend="cpp")
        return
    rs.run_problem(prob, ["cpp"], check_f64=False, build_kw={"cpp": dict(capturable=True)})
