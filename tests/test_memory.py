"""step() allocates nothing proportional to the model, on every backend.

CPU: every allocation and free of torch's CPU allocator during one ``step()`` is recorded with
``torch.profiler`` (``profile_memory=True``: the raw ``[memory]`` records, not per-op sums, so a
temporary freed inside an op still counts) after a warm-up step, on a ~1M-parameter model.
The method is calibrated first: it must see a known allocation, and torch.optim.AdamW's foreach
step (which allocates temporaries of the model's size) must register as such.

The compiled kernels allocate nothing through torch (their per-call work list is a small
``std::vector``: 24 bytes per 16K-element chunk, outside torch's allocator and so not counted);
the reference may allocate per-step scalars and, on its first step only, a fixed chunk-sized
scratch (3 x 64K elements per compute dtype); the Triton launcher caches its tables.

The exception, by design: the reference on a non-CPU device (CUDA) takes its ``_foreach_*``
path (ema_kernels/backends/_reference_foreach.py: a number of launches independent of numel),
whose transient memory is like torch.optim's foreach AdamW -- temporaries the size of the
parameter list, freed at the end of the step. Measured here on CPU with that path forced: a
peak of 1x the fp32 model bytes (fp32 AdamW), 2x (grad_scale, L2, SGD + Nesterov), 3x (bf16
parameters), never above :data:`REFERENCE_FOREACH_TRANSIENT`, which the GPU test allows the
reference.

GPU (skipped without one): ``torch.cuda`` memory statistics around one step, for every backend
that runs on CUDA tensors.
"""
import pytest
import torch

import ema_kernels as ek
import reliability_support as rs
from ema_kernels.backends import reference as reference_backend

N_PARAMS = 1 << 20  # ~1M parameters (plus biases)
# "Far below the model size": 1/64 of the fp32 parameter bytes (64 KB at 1M parameters).
FRACTION = 1 / 64
# The reference's foreach path (CUDA tensors): at most 3 float32 temporaries per parameter live
# at once (the Adam denominator or SGD direction, a modified gradient's copy, θ of a 16-bit
# parameter), in units of the fp32 model bytes; test_reference_foreach_path_transient_memory
# measures it.
REFERENCE_FOREACH_TRANSIENT = 3


def cpu_allocations(fn):
    """(total bytes allocated, number of allocations, peak live bytes above the start) of
    torch's CPU allocator while ``fn()`` runs."""
    return cpu_allocation_trace(fn)[:3]


def cpu_allocation_trace(fn):
    """:func:`cpu_allocations` and the live bytes above the start when ``fn()`` returns."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    total = count = live = peak = 0
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(records, key=lambda e: e.start_ns()):
        if str(e.device_type()).endswith("CPU"):
            n = e.nbytes()
            if n > 0:
                total += n
                count += 1
            live += n
            peak = max(peak, live)
    return total, count, peak, live


def make_model(dtype=torch.float32, n=N_PARAMS):
    torch.manual_seed(0)
    width = int(n ** 0.5)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 17)).to(dtype)


def _fill_grads(model, opt, mode):
    if mode == "flat":
        opt.zero_grad(set_to_none=False)
        with torch.no_grad():
            for p in model.parameters():
                p.grad.normal_()
    else:  # the tensor-list path: grads are separate tensors (allocated before the step)
        opt.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad = torch.randn_like(p)


def test_the_measurement_sees_allocations():
    total, count, peak = cpu_allocations(lambda: torch.empty(N_PARAMS))
    assert total >= 4 * N_PARAMS and count >= 1
    x = torch.randn(N_PARAMS)
    total, count, peak = cpu_allocations(lambda: (x * 2).add_(1).sum())
    assert total >= 4 * N_PARAMS and peak >= 4 * N_PARAMS  # a temporary, freed at once
    # torch's foreach AdamW step allocates temporaries proportional to the model
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    total, _, _ = cpu_allocations(opt.step)
    assert total >= 4 * N_PARAMS


CASES = {
    "adamw-amsgrad": (ek.AdamW, dict(lr=1e-3, amsgrad=True, weight_decay=0.1)),
    "adam-l2-maximize": (ek.Adam, dict(lr=1e-3, weight_decay=0.1, maximize=True)),
    "sgd-nesterov": (ek.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-3)),
}
MEASURED = {}


def _measure(backend, case, dtype, mode, amp, n=N_PARAMS, flatten=True,
             measure=cpu_allocations):
    cls, kw = CASES[case]
    model = make_model(dtype, n)
    opt = cls(model.parameters(), backend=backend, ema_decay=0.999, flatten=flatten, **kw)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    extra = {}
    if amp:
        extra = dict(grad_scale=torch.full((1,), 1024.0), found_inf=torch.zeros(1))
    ptrs = [p.data_ptr() for p in params]
    _fill_grads(model, opt, mode)
    first = measure(lambda: opt.step(**extra))
    _fill_grads(model, opt, mode)
    steady = measure(lambda: opt.step(**extra))
    assert [p.data_ptr() for p in params] == ptrs  # θ never reallocated
    return n_params, first, steady


CONFIGS = [(case, dtype, mode, amp) for case in CASES for dtype, mode, amp in (
    (torch.float32, "flat", False), (torch.float32, "list", False),
    (torch.bfloat16, "flat", True))]


@pytest.mark.parametrize("case,dtype,mode,amp", CONFIGS,
                         ids=[f"{c}-{str(d)[6:]}-{m}-{'amp' if a else 'plain'}"
                              for c, d, m, a in CONFIGS])
@pytest.mark.parametrize("backend", [b for b in rs.BACKENDS if b not in rs.SLOW_BACKENDS])
def test_step_allocates_nothing_proportional_to_the_model(backend, case, dtype, mode, amp):
    n_params, first, (total, count, peak) = _measure(backend, case, dtype, mode, amp)
    MEASURED[(backend, case, str(dtype), mode, amp)] = (total, count, peak)
    model_bytes = 4 * n_params
    assert total <= FRACTION * model_bytes, (
        f"{backend} {case} {dtype} {mode}: one step allocated {total} bytes in {count} "
        f"allocations (peak {peak}) for a model of {n_params} parameters")
    if backend != "reference":  # compiled kernels: no torch allocation at all (0 measured)
        assert total <= 4096, f"{backend}: {total} bytes in {count} torch allocations per step"
    # the first step: at most the reference's fixed scratch (3 chunks per compute dtype)
    scratch = 3 * reference_backend._CHUNK * 4 if backend == "reference" else 0
    assert first[0] <= scratch + FRACTION * model_bytes


@pytest.mark.parametrize("backend", [b for b in rs.BACKENDS if b not in rs.SLOW_BACKENDS])
def test_tensor_list_layout_allocates_nothing_proportional(backend):
    """flatten=False (parameters stay where they are, e.g. FSDP shards): same bound."""
    n_params, _, (total, count, peak) = _measure(backend, "adamw-amsgrad", torch.float32,
                                                 "list", True, flatten=False)
    MEASURED[(backend, "adamw-amsgrad", "flatten=False", "list", True)] = (total, count, peak)
    assert total <= FRACTION * 4 * n_params, (backend, total, count)
    if backend != "reference":
        assert total <= 4096, (backend, total, count)


def test_reference_scratch_does_not_grow_with_the_model():
    """The reference's first-step allocation is its fixed scratch, the same for a 4x model."""
    reference_backend._scratch.clear()
    _, small, _ = _measure("reference", "adamw-amsgrad", torch.float32, "flat", False, 1 << 18)
    reference_backend._scratch.clear()
    _, big, _ = _measure("reference", "adamw-amsgrad", torch.float32, "flat", False, 1 << 20)
    assert big[0] <= small[0] + 64 * 1024, (small, big)


FOREACH_CONFIGS = [(case, dtype, mode, amp) for case in CASES for dtype, mode, amp in (
    (torch.float32, "flat", False), (torch.float32, "list", True),
    (torch.bfloat16, "flat", True), (torch.bfloat16, "list", False))]


@pytest.mark.parametrize("case,dtype,mode,amp", FOREACH_CONFIGS,
                         ids=[f"{c}-{str(d)[6:]}-{m}-{'amp' if a else 'plain'}"
                              for c, d, m, a in FOREACH_CONFIGS])
def test_reference_foreach_path_transient_memory(case, dtype, mode, amp):
    """The reference's foreach path (its choice for CUDA tensors), forced on CPU: temporaries
    the size of the parameter list at the step's peak, at most REFERENCE_FOREACH_TRANSIENT x
    the fp32 model bytes, and all freed when the step returns. This is the allowance the GPU
    test gives the reference."""
    with reference_backend._force_path("foreach"):
        n_params, first, (total, count, peak, end) = _measure(
            "reference", case, dtype, mode, amp, measure=cpu_allocation_trace)
    MEASURED[("reference-foreach", case, str(dtype), mode, amp)] = (total, count, peak)
    model_bytes = 4 * n_params
    for what, (_, _, pk, left) in (("first", first), ("steady", (total, count, peak, end))):
        assert pk <= (REFERENCE_FOREACH_TRANSIENT + FRACTION) * model_bytes, (
            f"{case} {dtype} {mode}: {what} step's peak {pk / model_bytes:.2f}x the model")
        assert left <= FRACTION * model_bytes, f"{what} step kept {left} bytes"  # freed
    # the measurement sees the path's temporaries: at least the Adam denominator / SGD
    # direction (the chunked path measures ~0 here, test_step_allocates_nothing_...)
    assert peak >= 0.99 * model_bytes, (case, dtype, mode, peak / model_bytes)


@pytest.mark.skipif("triton" not in rs.BACKENDS, reason="triton backend not available here")
@pytest.mark.parametrize("mode", ["flat", "list"])
def test_triton_launcher_allocates_nothing_per_step(mode):
    """Under the interpreter only the launcher's torch allocations are meaningful (tables,
    constants; the interpreter's numpy copies are not the GPU's behaviour): after the first
    step, none.  A smaller model (the interpreter costs ~5 ms per 2048-element program)."""
    n_params, first, (total, count, peak) = _measure("triton", "adamw-amsgrad", torch.float32,
                                                     mode, True, n=1 << 16)
    MEASURED[("triton", "adamw-amsgrad", "torch.float32", mode, True)] = (total, count, peak)
    # flat: nothing.  list: fresh gradient tensors every step (set_to_none=True) mean new
    # addresses, so the launcher builds a new address/chunk table: 8 bytes per tensor and role
    # plus 16 per 2048-element chunk -- proportional to the tensor count, ~1/1000 of the model
    limit = 0 if mode == "flat" else FRACTION * 4 * n_params
    assert total <= limit, f"triton launcher: {total} bytes in {count} allocations per step"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_step_allocates_nothing(case):  # pragma: no cover - GPU machines only
    cls, kw = CASES[case]
    for backend in ek.available_backends("cuda"):
        model = make_model().cuda()
        opt = cls(model.parameters(), backend=backend, ema_decay=0.999, **kw)
        n = sum(p.numel() for p in model.parameters())
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        # the reference on CUDA takes its foreach path: temporaries the size of the parameter
        # list, like torch.optim's foreach AdamW (measured on CPU by
        # test_reference_foreach_path_transient_memory); the kernels allocate nothing
        allowed = REFERENCE_FOREACH_TRANSIENT if backend == "reference" else 0
        assert extra <= (allowed + FRACTION) * 4 * n, \
            f"{backend}: {extra} bytes above the baseline ({extra / (4 * n):.2f}x the model)"
        if backend == "reference":  # its temporaries are freed by the end of the step
            assert torch.cuda.memory_allocated() - base <= FRACTION * 4 * n
