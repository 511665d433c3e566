"""The reference backend's ``_foreach_*`` path (its choice for CUDA tensors) against its chunked
path (the CPU oracle), both forced on CPU tensors: the same bits in every case, and a number of
aten ops per step that does not depend on the number of elements.

The memory the foreach path allocates per step is measured in tests/test_memory.py.
"""
import itertools
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ema_kernels.backends import reference as ref

# odd sizes: 1, an empty tensor, a tail, > 64K (the chunked path splits it), and an odd-offset
# view (see _params)
SIZES = [1, 0, 4097, (1 << 16) * 2 + 3, 33]
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
        torch.float16: torch.int16}


def _state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _params(g, dtype, sizes):
    """Fresh random parameters; the third is a view at an odd element offset of a buffer."""
    out = []
    for k, n in enumerate(sizes):
        if k == 2:
            buf = torch.randn(n + 3, generator=g).to(dtype)
            out.append(buf[3:])
        else:
            out.append(torch.randn(n, generator=g).to(dtype))
    return out


def _data(dtype, seed, sizes=SIZES, n_emas=1, inf_grads=False):
    g = torch.Generator().manual_seed(seed)
    sdt = _state_dtype(dtype)
    d = dict(params=_params(g, dtype, sizes),
             grads=[torch.randn(n, generator=g).to(dtype) for n in sizes],
             m=[torch.randn(n, generator=g, dtype=sdt) * 0.1 for n in sizes],
             v=[torch.rand(n, generator=g, dtype=sdt) * 0.01 for n in sizes],
             vmax=[torch.rand(n, generator=g, dtype=sdt) * 0.02 for n in sizes],
             buf=[torch.randn(n, generator=g, dtype=sdt) for n in sizes],
             emas=[[torch.randn(n, generator=g, dtype=sdt) for n in sizes]
                   for _ in range(n_emas)])
    if inf_grads:  # what a GradScaler skip step sees
        big = max(range(len(sizes)), key=lambda i: sizes[i])
        d["grads"][big][5] = float("inf")
        d["grads"][big][sizes[big] // 2] = float("nan")
        d["grads"][0][0] = float("-inf")
    return d


def _seed(*what):
    """A fixed seed per test case (str hashes vary between runs)."""
    return zlib.crc32(repr(what).encode()) % 100000


def _clone(d):
    return {k: [[t.clone() for t in x] for x in v] if k == "emas" else [t.clone() for t in v]
            for k, v in d.items()}


def _assert_same_bits(a, b, what=""):
    for key in a:
        xs = [t for lst in a[key] for t in lst] if key == "emas" else a[key]
        ys = [t for lst in b[key] for t in lst] if key == "emas" else b[key]
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert x.dtype == y.dtype and x.shape == y.shape
            bx, by = x.view(BITS[x.dtype]), y.view(BITS[y.dtype])
            if not torch.equal(bx, by):
                bad = (bx != by).nonzero()[:5].flatten().tolist()
                raise AssertionError(f"{what} {key}[{i}]: {int((bx != by).sum())} elements "
                                     f"differ, e.g. at {bad}: {x[bad]} vs {y[bad]}")


def _run_both(data, fn):
    """``fn(data)`` on two copies, through the chunked and the foreach path: their results."""
    out = {}
    for path in ("chunked", "foreach"):
        d = _clone(data)
        with ref._force_path(path):
            fn(d)
        out[path] = d
    return out["chunked"], out["foreach"]


def _emas_arg(d, n_emas):
    if n_emas == 0:
        return None, None
    if n_emas == 1:
        return d["emas"][0], 1e-3
    return d["emas"], [1e-3 * (k + 1) for k in range(n_emas)][::-1]


def _amp(amp):
    """(grad_scale, found_inf) of an AMP mode, on the parameters' device (CPU here)."""
    if amp == "none":
        return None, None
    scale = torch.full((1,), 1024.0)
    if amp == "scale":
        return scale, None
    return scale, torch.full((1,), 1.0 if amp == "skip" else 0.0)


def _adam(d, *, n_emas, amsgrad, decoupled, maximize, wd, amp, sr=False):
    emas, w = _emas_arg(d, n_emas)
    grad_scale, found_inf = _amp(amp)
    lr, b1, b2, t = 1e-2, 0.9, 0.999, 3
    ref.adam_ema(d["params"], d["grads"], d["m"], d["v"], d["vmax"] if amsgrad else None,
                 emas, lr=lr, beta1=b1, beta2=b2, eps=1e-8, weight_decay=wd,
                 decoupled=decoupled, maximize=maximize, step_size=lr / (1 - b1 ** t),
                 bias_correction2_sqrt=(1 - b2 ** t) ** 0.5, ema_weight=w,
                 grad_scale=grad_scale, found_inf=found_inf, stochastic_rounding=sr,
                 sr_seed=12345, sr_step=7)


def _sgd(d, *, n_emas, momentum, dampening, nesterov, first_step, maximize, wd, amp,
         sr=False):
    emas, w = _emas_arg(d, n_emas)
    grad_scale, found_inf = _amp(amp)
    ref.sgd_ema(d["params"], d["grads"], d["buf"] if momentum else None, emas, lr=0.05,
                momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
                maximize=maximize, first_step=first_step, ema_weight=w, grad_scale=grad_scale,
                found_inf=found_inf, stochastic_rounding=sr, sr_seed=99, sr_step=3)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
AMPS = ["none", "scale", "scale+found_inf=0", "skip"]
ADAM_VARIANTS = {  # name: (amsgrad, decoupled, maximize, weight_decay)
    "adamw": (False, True, False, 0.1),
    "adam-l2": (False, False, False, 0.1),
    "amsgrad-maximize": (True, True, True, 0.1),
    "adam-plain": (False, True, False, 0.0),
    "amsgrad-l2": (True, False, False, 0.01),
}
SGD_VARIANTS = {  # name: (momentum, dampening, nesterov, first_step, maximize, weight_decay)
    "plain": (0.0, 0.0, False, False, False, 0.0),
    "momentum-dampening": (0.9, 0.25, False, False, False, 1e-3),
    "nesterov-maximize": (0.9, 0.0, True, False, True, 1e-3),
    "first-step": (0.9, 0.0, False, True, False, 0.0),
    "first-step-nesterov": (0.9, 0.0, True, True, False, 1e-2),
}


def _check_skip_changed_nothing(data, result):
    """found_inf set: every tensor as it was, bit for bit."""
    _assert_same_bits(data, result, "skip")


@pytest.mark.parametrize("amp", AMPS)
@pytest.mark.parametrize("variant", list(ADAM_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_adam_foreach_equals_chunked(dtype, variant, amp):
    amsgrad, decoupled, maximize, wd = ADAM_VARIANTS[variant]
    n_emas = (DTYPES.index(dtype) + list(ADAM_VARIANTS).index(variant)) % 4  # 0..3 EMAs
    data = _data(dtype, seed=_seed(dtype, variant, amp), n_emas=n_emas,
                 inf_grads=amp == "skip")
    kw = dict(n_emas=n_emas, amsgrad=amsgrad, decoupled=decoupled, maximize=maximize, wd=wd,
              amp=amp)
    chunked, foreach = _run_both(data, lambda d: _adam(d, **kw))
    _assert_same_bits(chunked, foreach, f"adam {variant} {dtype} {amp}")
    if amp == "skip":
        _check_skip_changed_nothing(data, foreach)
    else:  # the step did something (the comparison is not between two no-ops)
        assert not torch.equal(foreach["params"][3], data["params"][3])


@pytest.mark.parametrize("amp", AMPS)
@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_sgd_foreach_equals_chunked(dtype, variant, amp):
    momentum, dampening, nesterov, first_step, maximize, wd = SGD_VARIANTS[variant]
    n_emas = (DTYPES.index(dtype) + list(SGD_VARIANTS).index(variant)) % 4
    data = _data(dtype, seed=_seed(dtype, variant, amp, "sgd"), n_emas=n_emas,
                 inf_grads=amp == "skip")
    kw = dict(n_emas=n_emas, momentum=momentum, dampening=dampening, nesterov=nesterov,
              first_step=first_step, maximize=maximize, wd=wd, amp=amp)
    chunked, foreach = _run_both(data, lambda d: _sgd(d, **kw))
    _assert_same_bits(chunked, foreach, f"sgd {variant} {dtype} {amp}")
    if amp == "skip":
        _check_skip_changed_nothing(data, foreach)
    else:
        assert not torch.equal(foreach["params"][3], data["params"][3])


@pytest.mark.parametrize("amp", ["none", "skip"])
@pytest.mark.parametrize("opt", ["adamw", "adam-l2", "sgd-nesterov", "sgd-plain"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_stochastic_rounding_foreach_equals_chunked(dtype, opt, amp, monkeypatch):
    # pieces of the SR hash smaller than a tensor, so the piece loop runs more than once
    from ema_kernels.backends import _reference_foreach
    monkeypatch.setattr(_reference_foreach, "SR_PIECE", 50000)
    data = _data(dtype, seed=5 + len(opt), n_emas=2, inf_grads=amp == "skip")
    if opt.startswith("adam"):
        amsgrad, decoupled, maximize, wd = ADAM_VARIANTS[opt]
        fn = lambda d: _adam(d, n_emas=2, amsgrad=amsgrad, decoupled=decoupled,  # noqa: E731
                             maximize=maximize, wd=wd, amp=amp, sr=True)
    else:
        momentum, nesterov = (0.9, True) if opt == "sgd-nesterov" else (0.0, False)
        fn = lambda d: _sgd(d, n_emas=2, momentum=momentum, dampening=0.0,  # noqa: E731
                            nesterov=nesterov, first_step=False, maximize=False, wd=1e-3,
                            amp=amp, sr=True)
    chunked, foreach = _run_both(data, fn)
    _assert_same_bits(chunked, foreach, f"sr {opt} {dtype}")
    if amp == "skip":
        _check_skip_changed_nothing(data, foreach)
    else:
        # stochastic, not nearest: the same step with round-to-nearest differs somewhere
        nearest = _clone(data)
        with ref._force_path("foreach"):
            if opt.startswith("adam"):
                _adam(nearest, n_emas=2, amsgrad=amsgrad, decoupled=decoupled,
                      maximize=maximize, wd=wd, amp=amp, sr=False)
            else:
                _sgd(nearest, n_emas=2, momentum=momentum, dampening=0.0, nesterov=nesterov,
                     first_step=False, maximize=False, wd=1e-3, amp=amp, sr=False)
        assert not torch.equal(nearest["params"][3], foreach["params"][3])


def test_stochastic_rounding_offsets_foreach_equals_chunked():
    """Explicit ``sr_offsets`` (the per-parameter layout's element-index bases)."""
    data = _data(torch.bfloat16, seed=77, n_emas=1)
    offsets = [0, 10, 100, 5000, 1 << 33]  # one beyond 2^32: the hash's high word

    def fn(d):
        ref.adam_ema(d["params"], d["grads"], d["m"], d["v"], None, d["emas"][0], lr=1e-2,
                     beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True,
                     maximize=False, step_size=0.05, bias_correction2_sqrt=0.3, ema_weight=0.1,
                     stochastic_rounding=True, sr_seed=3, sr_step=11, sr_offsets=offsets)
    _assert_same_bits(*_run_both(data, fn), "sr offsets")


CAPTURABLE = list(itertools.product(
    ["adamw", "amsgrad-l2", "sgd-momentum", "sgd-nesterov-first"],
    [torch.float32, torch.bfloat16], ["none", "scale", "skip"]))


@pytest.mark.parametrize("opt,dtype,amp", CAPTURABLE,
                         ids=[f"{o}-{str(d)[6:]}-{a}" for o, d, a in CAPTURABLE])
def test_capturable_foreach_equals_chunked(opt, dtype, amp):
    """lr, the step count and the EMA weights as (device) tensors."""
    n_emas = 2 if dtype == torch.float32 else 1
    data = _data(dtype, seed=len(opt) * 31 + n_emas, n_emas=n_emas, inf_grads=amp == "skip")
    grad_scale, found_inf = _amp(amp)
    lr = torch.tensor(3e-3)
    weights = torch.tensor([1e-3, 5e-2][:n_emas])
    emas = (lambda d: d["emas"][0]) if n_emas == 1 else (lambda d: d["emas"])
    if opt.startswith("sgd"):
        nesterov, first = opt == "sgd-nesterov-first", opt == "sgd-nesterov-first"

        def fn(d):
            ref.sgd_ema_capturable(d["params"], d["grads"], d["buf"], emas(d), lr=lr,
                                   momentum=0.9, dampening=0.0, weight_decay=1e-3,
                                   nesterov=nesterov, maximize=False, first_step=first,
                                   ema_weight=weights, grad_scale=grad_scale,
                                   found_inf=found_inf)
    else:
        amsgrad, decoupled, maximize, wd = ADAM_VARIANTS[opt]

        def fn(d):
            ref.adam_ema_capturable(d["params"], d["grads"], d["m"], d["v"],
                                    d["vmax"] if amsgrad else None, emas(d), lr=lr,
                                    step=torch.tensor([5.0]), beta1=0.9, beta2=0.999, eps=1e-8,
                                    weight_decay=wd, decoupled=decoupled, maximize=maximize,
                                    ema_weight=weights, grad_scale=grad_scale,
                                    found_inf=found_inf)
    chunked, foreach = _run_both(data, fn)
    _assert_same_bits(chunked, foreach, f"capturable {opt} {dtype} {amp}")
    if amp == "skip":
        _check_skip_changed_nothing(data, foreach)
    else:
        assert not torch.equal(foreach["params"][3], data["params"][3])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("n_emas", [1, 3])
@pytest.mark.parametrize("tensor_weight", [False, True])
def test_ema_only_foreach_equals_chunked(dtype, n_emas, tensor_weight):
    data = _data(dtype, seed=n_emas + 10 * tensor_weight, n_emas=n_emas)
    weights = [0.3, 1e-3, 0.9][:n_emas]
    if tensor_weight:  # a device scalar per EMA (the capturable path's weights)
        weights = [torch.tensor(w) for w in weights]

    def fn(d):
        if n_emas == 1:
            ref.ema_only(d["params"], d["emas"][0], weights[0])
        else:
            ref.ema_only(d["params"], d["emas"], weights)
    chunked, foreach = _run_both(data, fn)
    _assert_same_bits(chunked, foreach, "ema_only")
    assert not torch.equal(foreach["emas"][0][3], data["emas"][0][3])


def test_path_choice():
    """By device: the chunked loop on CPU, the foreach ops elsewhere; forced in a block."""
    assert not ref._use_foreach(torch.device("cpu"))
    assert ref._use_foreach(torch.device("cuda", 0))
    assert ref._use_foreach(torch.device("meta"))
    with ref._force_path("foreach"):
        assert ref._use_foreach(torch.device("cpu"))
        with ref._force_path("chunked"):
            assert not ref._use_foreach(torch.device("cuda"))
        assert ref._use_foreach(torch.device("cpu"))
    assert not ref._use_foreach(torch.device("cpu"))
    with pytest.raises(ValueError, match="foreach"):
        with ref._force_path("loop"):
            pass


def test_empty_lists_on_the_foreach_path():
    """No tensors: nothing to do (torch's foreach ops refuse empty lists)."""
    with ref._force_path("foreach"):
        _adam(dict(params=[], grads=[], m=[], v=[], vmax=[], emas=[[]]), n_emas=1,
              amsgrad=True, decoupled=True, maximize=False, wd=0.1, amp="skip")
        _sgd(dict(params=[], grads=[], buf=[], emas=[[]]), n_emas=1, momentum=0.9,
             dampening=0.0, nesterov=True, first_step=False, maximize=False, wd=0.0, amp="skip")
        ref.ema_only([], [], 0.5)


# ---- aten ops per step -------------------------------------------------------------------

class _CountOps(TorchDispatchMode):
    """Every aten op (by overload) called while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _count_step(opt, amp, sizes, path, dtype=torch.float32):
    data = _data(dtype, seed=1, sizes=sizes, n_emas=2, inf_grads=amp == "skip")
    if opt == "adam":
        fn = lambda d: _adam(d, n_emas=2, amsgrad=True, decoupled=True,  # noqa: E731
                             maximize=False, wd=0.1, amp=amp)
    else:
        fn = lambda d: _sgd(d, n_emas=2, momentum=0.9, dampening=0.0,  # noqa: E731
                            nesterov=True, first_step=False, maximize=False, wd=1e-3, amp=amp)
    with ref._force_path(path), _CountOps() as counter:
        fn(data)
    return counter.ops


COUNT_SIZES = [3, 70001, 1000, 0, 20000]  # ~91K elements in 5 tensors; x16 below


@pytest.mark.parametrize("amp", ["none", "skip"])
@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_foreach_op_count_does_not_depend_on_numel(opt, amp, dtype):
    small = _count_step(opt, amp, COUNT_SIZES, "foreach", dtype)
    big = _count_step(opt, amp, [16 * n for n in COUNT_SIZES], "foreach", dtype)
    assert small == big, (len(small), len(big))  # the same ops, in the same order
    # no host read of a device scalar (found_inf, grad_scale): .item() is _local_scalar_dense
    assert not any("_local_scalar_dense" in op for op in small)
    # the update's math is _foreach_* ops, plus the temporaries' allocations (no launch) ...
    rest = [op for op in small if not op.startswith(("aten._foreach", "aten.empty_like."))]
    if amp == "none":
        assert rest == [], sorted(set(rest))
    else:
        # ... and, with found_inf, per tensor what torch has no foreach op for: torch.where
        # (Adam: the gradient, AMSGrad's max kept, the numerator; SGD + Nesterov: the gradient
        # and the direction) and AMSGrad's maximum feeding it; then the 0-d device weights
        # _Skip chooses, a fixed number (no host read)
        per_tensor = {"adam": 3, "sgd": 2}[opt] * len(COUNT_SIZES)
        assert rest.count("aten.where.self_out") == per_tensor
        assert rest.count("aten.maximum.default") == (len(COUNT_SIZES) if opt == "adam" else 0)
        scalars = [op for op in rest if op not in ("aten.where.self_out", "aten.maximum.default")]
        assert set(scalars) <= {"aten.full.default", "aten.ne.Scalar", "aten.view.default",
                                "aten.zeros.default", "aten.where.self"}, sorted(set(scalars))
        assert len(scalars) <= 32  # ~4 ops per device weight (21 here), not per tensor


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_chunked_op_count_grows_with_numel(opt):
    """The same measurement sees the chunked loop's ops grow: it can fail."""
    small = _count_step(opt, "none", COUNT_SIZES, "chunked")
    big = _count_step(opt, "none", [16 * n for n in COUNT_SIZES], "chunked")
    assert len(big) > 3 * len(small), (len(small), len(big))  # ~4x measured
    foreach = _count_step(opt, "none", [16 * n for n in COUNT_SIZES], "foreach")
    assert len(foreach) * 20 < len(big), (len(foreach), len(big))


# ---- through the optimizers ----------------------------------------------------------------

def _model(dtype):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 6 * 6, 70000 // 288 * 3), torch.nn.Linear(
                                70000 // 288 * 3, 5))
    return m.to(dtype=dtype, memory_format=torch.channels_last)


OPT_CASES = {
    "adamw-amsgrad-2emas": ("AdamW", dict(lr=1e-3, weight_decay=0.1, amsgrad=True,
                                          ema_decay=(0.99, 0.9))),
    "adam-l2-maximize": ("Adam", dict(lr=1e-3, weight_decay=0.1, maximize=True,
                                      ema_decay=0.999)),
    "sgd-dampening": ("SGD", dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-3,
                                  ema_decay=0.99)),
    "adamw-capturable": ("AdamW", dict(lr=1e-3, capturable=True, ema_decay=0.99)),
    "sgd-nesterov-capturable": ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True,
                                            capturable=True, ema_decay=(0.9, 0.99))),
    "adamw-sr": ("AdamW", dict(lr=1e-3, stochastic_rounding=True, ema_decay=0.99)),
}


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(OPT_CASES))
def test_optimizer_steps_foreach_equal_chunked(case, dtype, flatten, monkeypatch):
    """ek optimizers on the reference backend, a few steps (one of them a GradScaler skip with
    an inf gradient): the same parameters, state and EMAs on both paths."""
    import ema_kernels as ek
    from ema_kernels.backends import _reference_foreach
    calls = []
    for name in ("adam_ema", "sgd_ema"):
        fn = getattr(_reference_foreach, name)
        monkeypatch.setattr(_reference_foreach, name,
                            lambda *a, _fn=fn, **k: calls.append(_fn) or _fn(*a, **k))
    cls_name, kw = OPT_CASES[case]
    results = {}
    for path in ("chunked", "foreach"):
        model = _model(dtype)
        opt = getattr(ek, cls_name)(model.parameters(), backend="reference", flatten=flatten,
                                    **kw)
        g = torch.Generator().manual_seed(_seed(case, dtype, flatten))
        with ref._force_path(path):
            for step in range(4):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=g).to(dtype)
                if step == 2:  # a skipped step
                    next(model.parameters()).grad.view(-1)[3] = float("inf")
                opt.step(grad_scale=torch.full((1,), 4.0),
                         found_inf=torch.full((1,), float(step == 2)))
        state = opt.state_dict()["state"]
        results[path] = [p.detach().clone() for p in model.parameters()] + \
            [t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor)] + \
            [z.clone() for i in range(opt.num_emas) for z in opt.ema_parameters(i)
             if z is not None]
    chunked, foreach = results["chunked"], results["foreach"]
    assert len(calls) >= 4  # the foreach path ran (once per step and parameter set)
    assert not torch.equal(chunked[2], _model(dtype)[2].weight)  # and the steps moved θ
    assert len(chunked) == len(foreach)
    for a, b in zip(chunked, foreach):
        assert a.dtype == b.dtype and torch.equal(a, b)
