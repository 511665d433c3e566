"""The Triton kernels of Lion, LARS and LAMB (issue 25) against the reference backend, without a
GPU (``TRITON_INTERPRET=1``, as tests/test_triton_kernels.py; its AOT tests compile them).

Every op (``lion_ema``, ``lars_ema``, ``lamb_moments``, ``lamb_ema``) on fresh random data, odd
sizes (1, 4097, 2^16 + 3) and an odd-offset view in a list (its own flat launch beside the list
launch), fp32 (<= 1e-6 relative) and bf16 (within one ulp of the reference's rounding), one to
four EMAs, steps without EMA (``ema_every``), GradScaler's scale, ``found_inf`` (nothing moves),
stochastic rounding, the device-scalar variants (a device lr, device EMA weights and bias
corrections), and the persistent grid: forced to 1 program, the same bits as one per chunk.
Both sides start every step from identical state (the reference's state is copied over after
each comparison), so ulp differences cannot accumulate.

Lion takes the sign of c = β1·m + (1−β1)·g: where c is within a few ulps of 0, FMA contraction
(ATen's vectorised add-with-alpha fuses, the interpreter's numpy does not) may flip it, moving θ
by up to 2·lr; those elements (|c| within 4 ulps of its operands, about 1 in 10^7) are held to
that bound and counted, every other element to the tolerance.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import ema_kernels as ek  # noqa: E402
from ema_kernels.backends import reference as ref  # noqa: E402
from triton_support import triton_backend  # noqa: E402

tk = triton_backend()
from ema_kernels.backends.triton import checks as tchecks  # noqa: E402
from ema_kernels.backends.triton import config as tcfg  # noqa: E402

if not tchecks._interpreted():
    pytest.skip("these tests run the kernels under TRITON_INTERPRET=1 on CPU tensors",
                allow_module_level=True)

BLOCK = 16384  # the interpreter pays per program: big blocks (2^16 + 3 still spans 5 chunks)
ATOL = 2.0 ** -20  # tests/test_triton_kernels.py's floor: FMA contraction on O(1) operands
LIST_SIZES = (4097, 1, 2 ** 16 + 3, 0, 33)
FLAT_SIZES = (1, 4097, 2 ** 16 + 3)
# (grad_scale, found_inf, ema on) per step: plain, a skipped step, scaled, no EMA (ema_every),
# scaled with an explicit found_inf = 0
STEPS = [(None, None, True), (1024.0, 1.0, True), (8.0, None, True), (None, None, False),
         (4.0, 0.0, True)]


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(tcfg, "BLOCK", BLOCK)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ulp(x, dtype):
    bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    fi = torch.finfo(dtype)
    e = torch.frexp(x.abs().clamp_min(fi.tiny)).exponent
    return torch.ldexp(torch.ones_like(x), (e - 1 - bits).to(torch.int32))


def _close_params(got, want, what, slack=None):
    """fp32: 1e-6 relative; 16-bit: one ulp of the stored dtype.  ``slack`` (a bool mask and a
    bound): elements allowed to differ by up to the bound instead (Lion's sign at c ≈ 0)."""
    g, w = got.float(), want.float()
    if got.dtype == torch.float32:
        tol = ATOL + 1e-6 * w.abs()
    else:
        tol = _ulp(w, got.dtype).clamp_min(ATOL)
    bad = ~((g - w).abs() <= tol) & ~(g.isnan() & w.isnan())
    if slack is not None:
        mask, bound = slack
        assert int(mask.sum()) <= max(2, mask.numel() // 10 ** 5), (what, int(mask.sum()))
        bad &= ~(mask & ((g - w).abs() <= bound + tol))
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, e.g. "
                           f"{g[bad][:4].tolist()} vs {w[bad][:4].tolist()}")


def _close_state(got, want, what, rtol=1e-6):
    torch.testing.assert_close(got, want, rtol=rtol, atol=ATOL, msg=lambda m: f"{what}: {m}")


class _Tensors:
    """params, grads, named state lists and EMA lists of one backend (index-aligned)."""

    def __init__(self, sizes, dtype, state, n_emas, seed, misalign):
        gen = torch.Generator().manual_seed(seed)
        self.params, self.grads = [], []
        self.state = {name: [] for name in state}
        self.emas = [[] for _ in range(n_emas)]
        for i, n in enumerate(sizes):
            p = torch.randn(n, generator=gen).to(dtype)
            if i in misalign:  # an odd-offset view (2 or 4 bytes off 16-byte alignment)
                p = torch.empty(n + 1, dtype=dtype)[1:].copy_(p)
            self.params.append(p)
            self.grads.append(torch.randn(n, generator=gen).to(dtype))
            for name, (scale, positive) in state.items():
                t = torch.randn(n, generator=gen) * scale
                self.state[name].append(t.abs() if positive else t)
            for zs in self.emas:
                zs.append(torch.randn(n, generator=gen))

    def all(self):
        return self.params + self.grads + [t for lst in self.state.values() for t in lst] + \
            [z for zs in self.emas for z in zs]

    def clone(self):
        other = object.__new__(_Tensors)
        other.params = [p.clone() for p in self.params]
        other.grads = [g.clone() for g in self.grads]
        other.state = {k: [t.clone() for t in v] for k, v in self.state.items()}
        other.emas = [[z.clone() for z in zs] for zs in self.emas]
        return other

    def copy_from(self, other):
        for a, b in zip(self.all(), other.all()):
            a.copy_(b)

    def new_grads(self, gen, scale, nonfinite):
        for g in self.grads:
            x = torch.randn(g.numel(), generator=gen) * (scale or 1.0)
            if nonfinite and x.numel():
                x[0] = float("inf")
            g.copy_(x)


def _weights(k, n_emas):
    """One weight per EMA, on both sides of lerp's 0.5 switch; 1.0: ζ becomes θ exactly."""
    return [0.0625 if k % 2 else 0.75, 1.0, 1e-3, 0.5][:n_emas]


def _ema_args(backend, tensors, weights, device_scalars):
    """The emas / ema_weight arguments as each backend takes them (one EMA: a plain list)."""
    if weights is None:
        return None, None
    emas = tensors.emas[0] if len(weights) == 1 else tensors.emas[:len(weights)]
    if not device_scalars:
        return emas, weights[0] if len(weights) == 1 else weights
    if backend is ref:
        w = [torch.tensor(x) for x in weights]
        return emas, w[0] if len(w) == 1 else w
    return emas, torch.tensor(weights)


def _lr(backend, lr, device_scalars):
    if not device_scalars:
        return lr
    return torch.tensor(lr) if backend is ref else torch.tensor([lr])


# ---------------------------------------------------------------------------- the rules ------
def _lion(cfg):
    def step(backend, t, k, weights, gs, fi, sr):
        emas, w = _ema_args(backend, t, weights, cfg.get("device"))
        backend.lion_ema(t.params, t.grads, t.state["exp_avg"], emas,
                         lr=_lr(backend, 3e-3, cfg.get("device")), beta1=0.9, beta2=0.99,
                         weight_decay=cfg.get("wd", 0.0), maximize=cfg.get("maximize", False),
                         ema_weight=w, grad_scale=gs, found_inf=fi, **sr)

    def slack(t, gs):
        """Elements whose sign(c) is ill-conditioned, and the bound on their θ difference."""
        masks = []
        for g, m in zip(t.grads, t.state["exp_avg"]):
            g = g.float() / (1.0 if gs is None else gs.item())
            c = 0.9 * m + 0.1 * g
            masks.append(c.abs() <= 4 * 2 ** -23 * (0.9 * m.abs() + 0.1 * g.abs()))
        return masks, 2 * 3e-3 * 1.01
    return step, {"exp_avg": (0.1, False)}, slack


def _lars(cfg):
    def step(backend, t, k, weights, gs, fi, sr):
        emas, w = _ema_args(backend, t, weights, cfg.get("device"))
        n = len(t.params)
        gen = torch.Generator().manual_seed(100 + k)
        coefs = torch.stack([torch.rand(n, generator=gen) * 2, torch.rand(n, generator=gen) * 0.1],
                            1)
        coefs[0] = torch.tensor([1.0, 0.0])  # a tensor with a zero norm: plain SGD
        backend.lars_ema(t.params, t.grads, t.state.get("momentum_buffer"), emas, coefs=coefs,
                         lr=_lr(backend, 0.1, cfg.get("device")),
                         momentum=cfg.get("momentum", 0.9), dampening=cfg.get("dampening", 0.0),
                         nesterov=cfg.get("nesterov", False), maximize=cfg.get("maximize", False),
                         first_step=k == 0, ema_weight=w, grad_scale=gs, found_inf=fi, **sr)
    state = {"momentum_buffer": (0.1, False)} if cfg.get("momentum", 0.9) else {}
    return step, state, None


def _lamb(cfg):
    """Both passes; the step sizes come from the reference's sums on both sides (so the
    comparison of the second pass does not inherit the first's rounding), and the sums of the
    two backends are compared with each other."""
    sums = {}

    def step(backend, t, k, weights, gs, fi, sr):
        dev = cfg.get("device")
        b1, b2, tt = 0.9, 0.999, k + 1
        bc1, bc2 = (1 - b1 ** tt, (1 - b2 ** tt) ** 0.5) if cfg.get("bias", True) else (1.0, 1.0)
        if dev:
            bc1, bc2 = torch.tensor(bc1, dtype=torch.float64), torch.tensor(bc2,
                                                                            dtype=torch.float64)
        common = dict(eps=cfg.get("eps", 1e-6), weight_decay=cfg.get("wd", 0.01),
                      bias_correction1=bc1, bias_correction2_sqrt=bc2)
        s = backend.lamb_moments(t.params, t.grads, t.state["exp_avg"], t.state["exp_avg_sq"],
                                 beta1=b1, beta2=b2, maximize=cfg.get("maximize", False),
                                 grad_scale=gs, found_inf=fi, **common)
        sums[backend.NAME] = s
        if backend is ref or "steps" not in sums:  # (triton alone: its own sums)
            sums["steps"] = s.sqrt()[:, 0] / s.sqrt()[:, 1].clamp_min(1e-30) * 1e-2
        emas, w = _ema_args(backend, t, weights, dev)
        backend.lamb_ema(t.params, t.state["exp_avg"], t.state["exp_avg_sq"], emas,
                         step_sizes=sums["steps"] if backend is ref else sums["steps"].clone(),
                         ema_weight=w, found_inf=fi, **sr, **common)
    step.sums = sums
    return step, {"exp_avg": (0.1, False), "exp_avg_sq": (0.01, True)}, None


RULES = {"lion": _lion, "lars": _lars, "lamb": _lamb}


def _run(rule, cfg, sizes, dtype, seed, misalign=(), n_emas=1, steps=STEPS):
    """Triton against the reference over ``steps``; the reference goes first each step (LAMB's
    step sizes are formed from its sums)."""
    step, state, slack = RULES[rule](cfg)
    tri = _Tensors(sizes, dtype, state, n_emas, seed, misalign)
    want = tri.clone()
    gen = torch.Generator().manual_seed(seed + 1)
    sr = dict(stochastic_rounding=True, sr_seed=1234, sr_step=0) if cfg.get("sr") else {}
    for k, (scale, inf, ema_on) in enumerate(steps):
        tri.new_grads(gen, scale, nonfinite=bool(inf))
        want.copy_from(tri)
        before = tri.clone()
        gs = None if scale is None else torch.tensor([scale])
        fi = None if inf is None else torch.tensor([inf])
        weights = _weights(k, n_emas) if ema_on else None
        if sr:
            sr["sr_step"] = k
        sl = slack(before, gs) if slack is not None else None
        step(ref, want, k, weights, gs, fi, sr)
        step(tk, tri, k, weights, gs, fi, sr)
        if inf:
            for a, b in zip(tri.all(), before.all()):
                assert torch.equal(a.nan_to_num(), b.nan_to_num()), f"step {k}: a skip moved"
            if rule == "lamb":  # documented: nothing read, the sums 0 (pass 2 skips too)
                assert torch.equal(step.sums["triton"], torch.zeros(len(sizes), 2))
            continue
        where = f"{rule} {cfg} {dtype} step {k}"
        for i, (p, q) in enumerate(zip(tri.params, want.params)):
            _close_params(p, q, f"{where} param[{i}]",
                          None if sl is None else (sl[0][i], sl[1]))
        for name in state:
            for i, (a, b) in enumerate(zip(tri.state[name], want.state[name])):
                _close_state(a, b, f"{where} {name}[{i}]")
        if rule == "lamb":
            _close_state(step.sums["triton"], step.sums["reference"], f"{where} sums")
        for j, (zs, z0s) in enumerate(zip(tri.emas, before.emas)):
            for i, (z, z0, p) in enumerate(zip(zs, z0s, tri.params)):
                if weights is None or j >= len(weights):
                    assert torch.equal(z, z0), f"{where}: EMA {j} [{i}] moved off its clock"
                else:  # towards θ as this backend stored it
                    _close_state(z, z0.lerp(p.float(), weights[j]), f"{where} EMA {j} [{i}]",
                                 rtol=1e-5)
        tri.copy_from(want)


# (rule, config): the axes each rule has
CASES = {
    "lion": dict(wd=0.1),
    "lion-maximize-nowd": dict(maximize=True),
    "lion-device": dict(wd=0.1, device=True),
    "lars": dict(),
    "lars-nesterov-damp": dict(nesterov=True, dampening=0.0, maximize=True),
    "lars-dampening": dict(dampening=0.3),
    "lars-nomomentum": dict(momentum=0.0),
    "lars-device": dict(device=True),
    "lamb": dict(),
    "lamb-nobias-maximize": dict(bias=False, maximize=True, wd=0.0, eps=1e-4),
    "lamb-device": dict(device=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_list_matches_reference(case, dtype):
    """A tensor list with an empty tensor and an odd-offset view (its own flat launch, so the
    list launch's table columns are not the tensors' positions), two EMAs."""
    _run(case.split("-")[0], CASES[case], LIST_SIZES, dtype,
         seed=hash((case, str(dtype))) % 10_000, misalign=(1,), n_emas=2)


@pytest.mark.parametrize("size", FLAT_SIZES)
@pytest.mark.parametrize("rule", list(RULES))
def test_flat_matches_reference(rule, size):
    """One tensor (a flat buffer): the flat kernels, each odd size, fp16 and fp32 alternating."""
    dtype = (torch.float32, torch.float16)[FLAT_SIZES.index(size) % 2]
    _run(rule, {"lion": dict(wd=0.05), "lars": dict(), "lamb": dict()}[rule], (size,), dtype,
         seed=size)


@pytest.mark.parametrize("rule", list(RULES))
def test_four_emas_and_stochastic_rounding(rule):
    cfg = {"lion": dict(wd=0.1), "lars": dict(), "lamb": dict()}[rule]
    _run(rule, dict(cfg, sr=True), LIST_SIZES, torch.bfloat16, seed=7, misalign=(1,), n_emas=4,
         steps=STEPS[:3])
    _run(rule, dict(cfg, sr=True, device=True), (4097, 300), torch.float16, seed=8, n_emas=3,
         steps=STEPS[2:4])


@pytest.mark.parametrize("rule", list(RULES))
def test_persistent_grid_gives_the_same_bits(rule, monkeypatch):
    """1 program, 2, one per chunk: the same bits (SR and per-tensor values included)."""
    n_chunks = sum(-(-n // BLOCK) for n in LIST_SIZES)
    results = []
    for programs in (1, 2, n_chunks):
        monkeypatch.setattr(tcfg, "PROGRAMS", programs)
        step, state, _ = RULES[rule](dict(sr=True))
        t = _Tensors(LIST_SIZES, torch.bfloat16, state, 2, seed=5, misalign=())
        step(tk, t, 1, [0.25, 0.5], torch.tensor([2.0]), None,
             dict(stochastic_rounding=True, sr_seed=3, sr_step=1))
        if rule == "lamb":
            results.append(t.all() + [step.sums["triton"]])
        else:
            results.append(t.all())
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_lamb_sums_are_deterministic_and_per_tensor():
    """Each tensor's sums land in its own row whatever the launch (list, flat for a view, flat
    for a dtype's only tensor), and a repeat gives the same bits."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen) for n in (5, 2 * BLOCK + 1, 7)]
    params.append(torch.randn(40, generator=gen)[1:])  # odd-offset view: flat
    grads = [torch.randn_like(p) for p in params]
    kw = dict(beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, maximize=False,
              bias_correction1=0.1, bias_correction2_sqrt=0.2)
    outs = []
    for _ in range(2):
        ms = [torch.zeros_like(p) for p in params]
        vs = [torch.zeros_like(p) for p in params]
        outs.append(tk.lamb_moments(params, grads, ms, vs, **kw))
    assert torch.equal(outs[0], outs[1])
    for i, p in enumerate(params):
        torch.testing.assert_close(outs[0][i, 0], p.double().square().sum().float(), rtol=1e-6,
                                   atol=0)


def test_validation_messages():
    p, g, m = (torch.zeros(8) for _ in range(3))
    with pytest.raises(ValueError, match=r"lars_ema: coefs must have shape \(1, 2\)"):
        tk.lars_ema([p], [g], [m], None, coefs=torch.ones(2), lr=0.1, momentum=0.9,
                    dampening=0.0, nesterov=False, maximize=False, first_step=True,
                    ema_weight=None)
    with pytest.raises(ValueError, match="momentum is non-zero but momentum_buffers is None"):
        tk.lars_ema([p], [g], None, None, coefs=torch.ones(1, 2), lr=0.1, momentum=0.9,
                    dampening=0.0, nesterov=False, maximize=False, first_step=True,
                    ema_weight=None)
    with pytest.raises(TypeError, match="lamb_ema: step_sizes must be a floating-point"):
        tk.lamb_ema([p], [m], [m.clone()], None, step_sizes=[0.1], eps=1e-6, weight_decay=0.0,
                    bias_correction1=1.0, bias_correction2_sqrt=1.0, ema_weight=None)
    with pytest.raises(TypeError, match=r"lion_ema: exp_avgs\[0\] is torch.bfloat16"):
        tk.lion_ema([p], [g], [m.bfloat16()], None, lr=0.1, beta1=0.9, beta2=0.99,
                    weight_decay=0.0, maximize=False, ema_weight=None)
    with pytest.raises(ValueError, match="lion_ema: ema_weight has 2 elements but emas is one"):
        tk.lion_ema([p], [g], [m], [m.clone()], lr=torch.ones(1), beta1=0.9, beta2=0.99,
                    weight_decay=0.0, maximize=False, ema_weight=torch.ones(2))


def test_interface_matches_reference():
    import inspect
    for name in ("lion_ema", "lars_ema", "lamb_moments", "lamb_ema"):
        a, b = inspect.signature(getattr(tk, name)), inspect.signature(getattr(ref, name))
        assert list(a.parameters) == list(b.parameters), name


# ------------------------------------------------------------------------ the optimizers ------
def _model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(),
                               torch.nn.Linear(17, 4)).to(dtype)


OPTIMIZERS = {
    "lion": lambda ps, **kw: ek.Lion(ps, lr=1e-2, weight_decay=0.1, **kw),
    "lars": lambda ps, **kw: ek.LARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-2,
                                     trust_coefficient=0.02, **kw),
    "lamb": lambda ps, **kw: ek.LAMB(ps, lr=2e-2, weight_decay=0.05, **kw),
}


@pytest.mark.parametrize("mode", ["list", "flatten", "capturable"])
@pytest.mark.parametrize("rule", list(OPTIMIZERS))
def test_optimizers_run_triton(rule, mode):
    """ek.Lion / LARS / LAMB find the triton ops (RuleOptimizer checks hasattr) and agree with
    the reference over a few steps (ulp differences compound over steps, hence 1e-5), with a
    GradScaler-style skipped step in between."""
    runs = []
    for backend in ("triton", "reference"):
        m = _model(3)
        opt = OPTIMIZERS[rule](m.parameters(), ema_decay=(0.9, 0.5), backend=backend,
                               flatten=mode == "flatten", capturable=mode == "capturable")
        gen = torch.Generator().manual_seed(0)
        for it in range(4):
            opt.zero_grad()
            m(torch.randn(6, 9, generator=gen)).pow(2).mean().backward()
            if it == 2:
                opt.step(grad_scale=torch.ones(1), found_inf=torch.ones(1))
            else:
                opt.step()
        assert opt._sets[0][0].backend_module.NAME == backend
        runs.append(list(m.parameters()) + opt.ema_parameters(0) + opt.ema_parameters(1))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
