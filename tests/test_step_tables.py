"""The C++ step tables (csrc/step_table.cpp, ema_kernels/optim/tables.py).

A set run by the cpp backend (or the cuda backend, here its emulation build on CPU tensors)
is prepared and launched by one StepTable call each (triton: prepared by one, and its pointer
table handed to the Triton launcher); everything the table cannot take goes
through step()'s Python planning. The two paths must give the same bits, the table must really
be the path of an ordinary step, and Python's work per step must not grow with the number of
parameters.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import ema_kernels as ek
from ema_kernels import _ops
from ema_kernels.backends import _extension as _ext
from ema_kernels.optim import tables


def _backends():
    names = []
    if _ops.availability("cpp", "cpu")[0]:
        names.append("cpp")
    from ema_kernels.backends import cuda
    if cuda._emulation_availability()[0]:
        names.append("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1" and _ops.availability("triton", "cpu")[0] \
            and names:  # Triton's tables are built by the extension too
        names.append("triton")
    return names


BACKENDS = _backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="the compiled extension is not built")


@pytest.fixture
def backend(request):
    """'cpp', or 'cuda' with the emulated CUDA kernels on CPU tensors for this test only."""
    name = request.param
    if name == "cuda":
        request.getfixturevalue("cuda_emulation")
    return name


def _python_path(monkeypatch):
    """Every set planned in Python (the tables switched off)."""
    monkeypatch.setattr(tables, "table_for", lambda ts, backend, capturable: None)


def _model(dtype=torch.float32, channels_last=False, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten(),
                            torch.nn.Linear(5 * 4 * 4, 7), torch.nn.Linear(7, 1))
    m = m.to(dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


CONFIGS = {
    "adamw": (ek.AdamW, dict(lr=1e-2, weight_decay=0.1, ema_decay=0.9)),
    "adam_amsgrad": (ek.Adam, dict(lr=1e-2, weight_decay=0.05, amsgrad=True, ema_decay=0.8)),
    "adamw_two_emas_every2": (ek.AdamW, dict(lr=1e-2, ema_decay=(0.9, 0.99), ema_every=2,
                                             kappa=2.0)),
    "sgd_nesterov": (ek.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01,
                                  ema_decay=0.95)),
    "sgd_plain": (ek.SGD, dict(lr=1e-2, ema_decay=0.95, maximize=True)),
}


def _train(m, opt, steps, seed=1, amp=False):
    g = torch.Generator().manual_seed(seed)
    dtype = next(m.parameters()).dtype
    for t in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 3, 6, 6, generator=g).to(dtype)
        m(x).float().pow(2).mean().backward()
        if amp:
            scale = torch.full((1,), 4.0)
            for p in m.parameters():
                p.grad.mul_(4.0)
            inf = torch.full((1,), 1.0 if t == 2 else 0.0)  # step 2 is skipped
            opt.step(grad_scale=scale, found_inf=inf)
        else:
            opt.step()


def _snapshot(m, opt):
    out = [p.detach().clone() for p in m.parameters()]
    for st in opt.state.values():
        out += [v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
                for _, v in sorted(st.items())]
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("variant", ["fp32", "bf16", "bf16_sr", "fp16_sr_flat", "channels_last",
                                     "flat", "amp"])
def test_table_path_equals_python_path_bit_for_bit(backend, config, variant, monkeypatch):
    cls, kw = CONFIGS[config]
    dtype = {"bf16": torch.bfloat16, "bf16_sr": torch.bfloat16,
             "fp16_sr_flat": torch.float16}.get(variant, torch.float32)
    if variant.endswith(("_sr", "_sr_flat")):
        kw = dict(kw, stochastic_rounding=True)
    flat = variant.endswith("flat")
    runs = []
    for python in (False, True):
        with monkeypatch.context() as mp:
            if python:
                _python_path(mp)
            m = _model(dtype, channels_last=variant == "channels_last")
            opt = cls(m.parameters(), backend=backend, flatten=flat, **kw)
            if flat:
                opt.zero_grad(set_to_none=False)  # bind the flat gradient views
                _train_flat(m, opt, 5)
            else:
                _train(m, opt, 5, amp=variant == "amp")
            used = [ts.table for gsets in opt._sets for ts in gsets]
            if python:
                assert all(t is None or t is False for t in used)
            else:  # the ordinary step really took the tables
                assert all(t not in (None, False) for t in used), used
            runs.append(_snapshot(m, opt) + [torch.tensor(opt.param_groups[0]["steps"])])
    _assert_same(*runs)


CAPTURABLE_CONFIGS = {
    "adamw_two_emas": (ek.AdamW, dict(lr=1e-2, weight_decay=0.1, ema_decay=(0.9, 0.99),
                                      kappa=2.0)),
    "adam_amsgrad": CONFIGS["adam_amsgrad"],
    "sgd_nesterov": CONFIGS["sgd_nesterov"],
    "sgd_plain": CONFIGS["sgd_plain"],
}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"], indirect=True)
@pytest.mark.parametrize("config", sorted(CAPTURABLE_CONFIGS))
@pytest.mark.parametrize("variant", ["fp32", "bf16", "channels_last", "flat", "amp"])
def test_capturable_table_path_equals_python_path_bit_for_bit(backend, config, variant,
                                                              monkeypatch):
    """capturable=True through the C++ tables (adam_capturable / sgd_capturable: lr, t and
    the EMA weights read on the device) gives the Python path's bits, device step counts
    included, and an ordinary capturable step really takes the tables."""
    cls, kw = CAPTURABLE_CONFIGS[config]
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    flat = variant == "flat"
    runs = []
    for python in (False, True):
        with monkeypatch.context() as mp:
            if python:
                _python_path(mp)
            m = _model(dtype, channels_last=variant == "channels_last")
            opt = cls(m.parameters(), backend=backend, flatten=flat, capturable=True, **kw)
            if flat:
                opt.zero_grad(set_to_none=False)
                _train_flat(m, opt, 5)
            else:
                _train(m, opt, 5, amp=variant == "amp")
            used = [ts.table for gsets in opt._sets for ts in gsets]
            if python:
                assert all(t is None or t is False for t in used)
            else:
                assert all(t not in (None, False) for t in used), used
            runs.append(_snapshot(m, opt) + [torch.tensor(opt.param_groups[0]["steps"])])
    _assert_same(*runs)
    if variant == "amp":  # the found_inf step was not counted on the device
        assert {float(st["step"]) for st in opt.state.values()} == {4.0}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"], indirect=True)
def test_a_capturable_step_plans_nothing_in_python(backend, monkeypatch):
    m = _model()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9, backend=backend, capturable=True)
    _train(m, opt, 1)

    def refuse(*a, **k):
        raise AssertionError("planned in Python")
    monkeypatch.setattr(opt, "_plan_set", refuse)
    monkeypatch.setattr(opt, "_check_params", refuse)
    _train(m, opt, 3, amp=True)
    assert int(opt.param_groups[0]["steps"]) == 4


def _train_flat(m, opt, steps):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=False)
        dtype = next(m.parameters()).dtype
        m(torch.randn(4, 3, 6, 6, generator=g).to(dtype)).float().pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_an_ordinary_step_plans_nothing_in_python(backend, monkeypatch):
    m = _model()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9, backend=backend)
    _train(m, opt, 1)

    def refuse(*a, **k):
        raise AssertionError("planned in Python")
    monkeypatch.setattr(opt, "_plan_set", refuse)
    monkeypatch.setattr(opt, "_check_params", refuse)
    _train(m, opt, 3)
    assert int(opt.param_groups[0]["steps"]) == 4


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_what_the_table_cannot_take_goes_the_python_way(backend, monkeypatch):
    """grad None on one parameter (frozen, then unfrozen), a contiguous gradient of a
    channels_last weight, ``p.data = t``: each step equals the Python path's."""
    runs = []
    for python in (False, True):
        with monkeypatch.context() as mp:
            if python:
                _python_path(mp)
            m = _model(channels_last=True)
            opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9, backend=backend)
            conv, head = m[0].weight, m[3].weight
            _train(m, opt, 2)
            head.requires_grad_(False)  # no gradient: its EMA still ticks
            _train(m, opt, 2)
            head.requires_grad_(True)
            _train(m, opt, 2)
            for _ in range(2):  # a contiguous gradient for the channels_last conv weight
                for p in m.parameters():
                    p.grad = torch.full(p.shape, 0.01)  # contiguous, whatever p's layout
                assert not conv.grad.is_contiguous(memory_format=torch.channels_last)
                opt.step()
            with torch.no_grad():
                head.data = head.detach().clone() * 0.5  # new storage, same shape
            _train(m, opt, 2)
            runs.append(_snapshot(m, opt))
    _assert_same(*runs)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_cast_after_steps_raises_before_anything_moves(backend):
    m = _model()
    opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9, backend=backend)
    _train(m, opt, 2)
    before = _snapshot(m, opt)
    m[3].double()
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="changed from .* after the optimizer stepped it"):
        opt.step()
    m[3].float()
    for p in m.parameters():
        p.grad = None
    _assert_same(before, _snapshot(m, opt))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_odd_offset_views_and_empty_parameters(backend, monkeypatch):
    """Parameters that are views at odd element offsets of one storage, and a 0-element one."""
    runs = []
    for python in (False, True):
        with monkeypatch.context() as mp:
            if python:
                _python_path(mp)
            torch.manual_seed(3)
            base = torch.randn(1000)
            ps = [torch.nn.Parameter(base[1:130]), torch.nn.Parameter(base[131:132]),
                  torch.nn.Parameter(torch.randn(0)), torch.nn.Parameter(base[333:1000])]
            opt = ek.AdamW(ps, lr=1e-2, ema_decay=0.9, backend=backend)
            g = torch.Generator().manual_seed(4)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            runs.append([p.detach().clone() for p in ps] + list(opt.ema_parameters()))
    _assert_same(*runs)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_storage_reallocated_in_place_is_followed(backend, monkeypatch):
    """The table reads every data address each step (from the StorageImpl, not a cache): a
    parameter and a gradient whose storage is reallocated in place (same TensorImpl and
    StorageImpl, new memory: what FSDP-style storage resizing does) are updated where they
    now live, exactly as the Python path does."""
    runs = []
    for python in (False, True):
        with monkeypatch.context() as mp:
            if python:
                _python_path(mp)
            m = _model()
            opt = ek.AdamW(m.parameters(), lr=1e-2, ema_decay=0.9, backend=backend)
            _train(m, opt, 2)
            w = m[2].weight

            def move(st):
                # a larger resize allocates while the old block is alive (then copies and
                # frees it): the new address necessarily differs; the tensor's values stay
                addr = st.data_ptr()
                st.resize_(st.nbytes() + 64)
                assert st.data_ptr() != addr

            move(w.untyped_storage())
            g = torch.Generator().manual_seed(9)
            for _ in range(2):
                for p in m.parameters():
                    p.grad = torch.randn(p.shape, generator=g)
                move(w.grad.untyped_storage())
                opt.step()
            runs.append(_snapshot(m, opt))
    _assert_same(*runs)


def _python_calls_per_step(n: int, backend: str) -> int:
    ps = [torch.nn.Parameter(torch.randn(4)) for _ in range(n)]
    opt = ek.AdamW(ps, lr=1e-3, ema_decay=0.9, backend=backend)
    for p in ps:
        p.grad = torch.randn(4)
    opt.step()
    opt.step()
    calls = [0]

    def prof(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1
    sys.setprofile(prof)
    try:
        opt.step()
    finally:
        sys.setprofile(None)
    return calls[0]


# Not triton here: under TRITON_INTERPRET=1 the kernel itself runs as Python, per program.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"], indirect=True)
def test_python_work_per_step_does_not_grow_with_the_parameters(backend):
    """Python function calls in step(): the same for 10 and 2000 parameters (O(groups))."""
    small, large = _python_calls_per_step(10, backend), _python_calls_per_step(2000, backend)
    assert large == small, (small, large)


def test_step_table_checks_its_inputs():
    _ext.load_extension()
    from ema_kernels import _C
    p = torch.nn.Parameter(torch.randn(5))
    like = torch.empty(0)
    state = [[torch.zeros(5)], [torch.zeros(5)]]
    with pytest.raises(RuntimeError, match="a state list of 2 tensors for 1 parameters"):
        _C.StepTable([p], like, [[5]], [[1]], [[torch.zeros(5), torch.zeros(5)]], [], [0],
                     "cpu")
    with pytest.raises(RuntimeError, match="must be a contiguous float32 tensor of 5"):
        _C.StepTable([p], like, [[5]], [[1]], [[torch.zeros(4)]], [], [0], "cpu")
    with pytest.raises(TypeError, match="dtype Double"):
        _C.StepTable([p.double()], like.double(), [[5]], [[1]], state, [], [0], "cpu")
    t = _C.StepTable([p], like, [[5]], [[1]], state, [[p.detach().clone()]], [0], "cpu")
    assert t.prepare() == _C.STATUS["no_grad"]
    with pytest.raises(RuntimeError, match="without a successful prepare"):
        t.adam(1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, False, 1e-2, 0.03, [], None, None)
    w = torch.nn.Parameter(torch.randn(2, 3))
    tw = _C.StepTable([w], like, [[2, 3]], [[3, 1]], [[torch.zeros(6)], [torch.zeros(6)]], [],
                      [0], "cpu")
    w.grad = torch.randn(3, 2).t()  # the right shape, transposed strides
    assert tw.prepare() == _C.STATUS["grad_layout"]
    p.grad = torch.randn(5)
    assert t.prepare() == _C.STATUS["ready"]
    with pytest.raises(RuntimeError, match="Adam needs 3"):
        t.adam(1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, True, 1e-2, 0.03, [], None, None)
    assert t.prepare() == _C.STATUS["ready"]
    with pytest.raises(RuntimeError, match="2 EMA weights but the table holds 1"):
        t.adam(1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, False, 1e-2, 0.03, [0.1, 0.1], None,
               None)
    assert t.prepare() == _C.STATUS["ready"]
    with pytest.raises(RuntimeError, match="found_inf must have one element"):
        t.adam(1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, False, 1e-2, 0.03, [], None,
               torch.zeros(2))
    with torch.no_grad():
        p.data = torch.randn(6)
    assert t.prepare() == _C.STATUS["param_changed"]


def test_a_table_advances_the_host_step_counts_after_its_launch():
    _ext.load_extension()
    from ema_kernels import _C
    p = torch.nn.Parameter(torch.randn(5))
    like = torch.empty(0)
    state = [[torch.zeros(5)], [torch.zeros(5)]]
    steps = torch.tensor([3.0])
    t = _C.StepTable([p], like, [[5]], [[1]], state, [], [0], "cpu", steps=steps)
    p.grad = torch.randn(5)
    assert t.prepare() == 0
    with pytest.raises(RuntimeError, match="2 EMA weights but the table holds 0"):
        t.adam(1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, False, 1e-2, 0.03, [0.1, 0.1], None,
               None)
    assert steps.tolist() == [3.0]  # a launch refused moves no count
    assert t.prepare() == 0
    t.adam(1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, False, 1e-2, 0.03, [], None, None)
    assert steps.tolist() == [4.0]
    ts = _C.StepTable([p], like, [[5]], [[1]], [], [], [0], "cpu", steps=steps)
    assert ts.prepare() == 0
    ts.sgd(0.1, 0.0, 0.0, 0.0, False, False, False, [], None, None)
    assert steps.tolist() == [5.0]
    with pytest.raises(RuntimeError, match="steps must be a contiguous float32 CPU tensor of 1 "):
        _C.StepTable([p], like, [[5]], [[1]], state, [], [0], "cpu", steps=torch.zeros(2))
    with pytest.raises(RuntimeError, match="a triton table's launcher advances"):
        _C.StepTable([p], like, [[5]], [[1]], state, [], [0], "triton", steps=steps)


def test_triton_tables_export_the_list_kernels_table():
    _ext.load_extension()
    from ema_kernels import _C
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (3, 40)]
    m = [torch.zeros(p.numel()) for p in ps]
    z = [p.detach().clone() for p in ps]
    t = _C.StepTable(ps, torch.empty(0), [[3], [40]], [[1], [1]], [m], [z], [0, 16], "triton")
    assert t.kernels == "triton"
    with pytest.raises(RuntimeError, match="no successful prepare"):
        t.triton_table(1, 1, 16, True)
    for p in ps:
        p.grad = torch.randn(p.shape)
    assert t.prepare() == 0
    with pytest.raises(RuntimeError, match="launched by Triton"):
        t.sgd(0.1, 0.9, 0.0, 0.0, False, False, False, [], None, None)
    assert t.prepare() == 0
    host, n_chunks, key = t.triton_table(1, 1, 16, True)
    n = 2
    rows = host[:8 * n].view(8, n).tolist()  # θ, g, momentum, ζ0..ζ3, sizes
    assert rows[0] == [p.data_ptr() for p in ps] and rows[1] == [p.grad.data_ptr() for p in ps]
    assert rows[2] == [b.data_ptr() for b in m] and rows[3] == [q.data_ptr() for q in z]
    assert rows[4] == rows[5] == rows[6] == [0, 0] and rows[7] == [3, 40]
    assert n_chunks == 1 + 3
    assert host[8 * n:8 * n + n_chunks].tolist() == [0, 1, 1, 1]       # chunk -> tensor
    assert host[8 * n + n_chunks:8 * n + 2 * n_chunks].tolist() == [0, 0, 16, 32]  # starts
    assert host[8 * n + 2 * n_chunks:].tolist() == [0, 16]              # SR bases
    assert t.prepare() == 0
    assert t.triton_table(1, 1, 16, True)[2] == key  # same content, same key
    ps[1].grad = torch.randn(40)
    assert t.prepare() == 0
    assert t.triton_table(1, 1, 16, True)[2] != key
    with torch.no_grad():  # a misaligned parameter: its list kernel cannot take it
        ps[0].data = torch.randn(4)[1:]
    assert t.prepare() == _C.STATUS["misaligned"]
