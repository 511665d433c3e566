"""Shared machinery of the reliability tests (test_properties, test_reliability, test_memory).

Not a test module.  It holds:

- the hypothesis profiles (``HYPOTHESIS_PROFILE=ci|local|dev``; ``ci`` is the default:
  derandomized, so every CI run tries the same examples and a failure reproduces exactly);
- ``BACKENDS``: every backend that runs on CPU tensors here (``reference``, ``cpp`` when the
  extension is built, ``triton`` under ``TRITON_INTERPRET=1``, which tests/conftest.py sets);
- a random *problem* (parameters, per-step gradients, hyperparameters, AMP flags) as plain data,
  and the code that builds an optimizer for it and feeds it step by step;
- a float64 re-computation of one optimizer step (the whole step: scaling rules, per-parameter
  step counters, skipped parameters, EMA clock, ``ema_every``, schedules, ``found_inf``), written
  from DESIGN.md and torch.optim's documented update, independently of the library's code;
- comparisons with the DESIGN.md tolerances, with rigorous per-element error scales.

Tolerances (DESIGN.md): fp32 <= 1e-6 relative, bf16/fp16 parameters within 1 ulp, EMA <= 1e-5.
"Relative" is relative to the magnitude of the quantities that enter the computation (for
θ − lr·u that is |θ| + |lr·u| evaluated with absolute values), so that cancellation towards 0
does not turn a last-bit difference into a huge relative error.
"""
from __future__ import annotations

import copy
import functools
import math
import os
from typing import Any, Dict, List, Optional

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import ema_kernels as ek

# ------------------------------------------------------------------------------------------------
# Hypothesis profiles
# ------------------------------------------------------------------------------------------------
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("local", **_COMMON)
settings.register_profile("dev", derandomize=True, database=None, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "local", "dev"):
    raise ValueError(f"HYPOTHESIS_PROFILE={PROFILE!r}: choose ci, local or dev")
# Examples per test = base count x factor: ci is what CI runs (>= 200 optimizer-level examples in
# total); local explores 10x more with fresh randomness each run; dev is a quick smoke run.
_FACTOR = {"ci": 1.0, "local": 10.0, "dev": 0.1}[PROFILE]


def hsettings(examples: int, **kw) -> settings:
    """Settings for one property test: the active profile, ``examples`` scaled by it."""
    return settings(settings.get_profile(PROFILE), max_examples=max(1, int(examples * _FACTOR)),
                    **kw)


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------
BACKENDS: List[str] = list(ek.available_backends("cpu"))
if "reference" not in BACKENDS:  # pragma: no cover - the reference always runs
    BACKENDS.insert(0, "reference")
# Backends compared with the reference (the reference itself is compared with float64).
OTHER_BACKENDS = [b for b in BACKENDS if b != "reference"]
SLOW_BACKENDS = {"triton"}  # the interpreter: ~5 ms per 2048-element program, ~13 ms per tensor

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPTIMIZERS = {"adamw": ek.AdamW, "adam": ek.Adam, "sgd": ek.SGD,
              # torch's Adam(decoupled_weight_decay=True) is AdamW
              "adam_dwd": functools.partial(ek.Adam, decoupled_weight_decay=True)}
DECOUPLED = ("adamw", "adam_dwd")


# ------------------------------------------------------------------------------------------------
# Schedules as data (so a problem can be printed, and rebuilt per optimizer)
# ------------------------------------------------------------------------------------------------
def make_schedule(spec):
    if spec is None:
        return None
    name, args = spec
    return getattr(ek.schedules, name)(*args)


# ------------------------------------------------------------------------------------------------
# A problem: everything an optimizer run depends on, as plain data
# ------------------------------------------------------------------------------------------------
SHAPES = [(), (0,), (1,), (2,), (3,), (5,), (7,), (15,), (16,), (17,), (31,), (33,), (4, 0),
          (5, 3), (64,), (100,), (3, 7, 5), (257,), (33, 31)]
BIG_SHAPES = [(2049,), (4097,)]  # a Triton block (2048) + 1: the masked tail of a second program


@st.composite
def shapes(draw):
    if draw(st.integers(0, 15)) == 0:
        return draw(st.sampled_from(BIG_SHAPES))
    return draw(st.sampled_from(SHAPES))


def _valid_kappas(opt: str, betas, choices=(0.5, 1.0, 2.0, 3.0)):
    if opt == "sgd":
        return list(choices)
    return [k for k in choices if all(1.0 - k * (1.0 - b) >= 0.0 for b in betas)]


@st.composite
def problems(draw, max_tensors: int = 6, max_steps: int = 5, opt=None, dtypes=None,
             allow_amp: bool = True, capturable: bool = False):
    """A random optimizer problem (see module docstring).  ``capturable=True``: what that mode
    supports (ema_every=1, no schedule, SGD without dampening, every trainable parameter gets
    a gradient)."""
    opt = opt or draw(st.sampled_from(sorted(OPTIMIZERS)))
    dtype_set = dtypes or draw(st.sampled_from(
        [(torch.float32,), (torch.bfloat16,), (torch.float16,), (torch.float32, torch.bfloat16),
         (torch.float32, torch.float16, torch.bfloat16)]))
    hp: Dict[str, Any] = dict(lr=draw(st.floats(1e-4, 0.5)))
    if opt == "sgd":
        nesterov = draw(st.booleans())
        momentum = draw(st.sampled_from([0.5, 0.9]) if nesterov
                        else st.sampled_from([0.0, 0.5, 0.9]))
        hp.update(momentum=momentum, nesterov=nesterov,
                  # capturable=True SGD requires dampening=0 (the first applied step, which
                  # initialises the buffer undampened, is known only on the device)
                  dampening=0.0 if (nesterov or capturable)
                  else draw(st.sampled_from([0.0, 0.1, 0.5])),
                  weight_decay=draw(st.sampled_from([0.0, 0.0, 1e-2, 0.1])))
    else:
        betas = (draw(st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.99])),
                 draw(st.sampled_from([0.5, 0.9, 0.99, 0.999, 0.9999])))
        hp.update(betas=betas, eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
                  weight_decay=draw(st.sampled_from([0.0, 1e-2, 0.1, 0.5])),
                  amsgrad=draw(st.booleans()))
    hp["maximize"] = draw(st.booleans())
    hp["ema_decay"] = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999, 1.0, None]))
    hp["ema_every"] = draw(st.sampled_from([1, 1, 2, 3]))
    schedule = draw(st.sampled_from([
        None, None, None, ("constant", (0.7,)), ("warmup", (0.99, 1.0, 2.0 / 3.0)),
        ("warmup", (0.999, 0.5, 0.75)), ("cosine", (0.9, 1.0, 4.0)), ("polyak", ())]))
    if capturable:
        hp["ema_every"], schedule = 1, None
    if schedule is not None and hp["ema_decay"] is None:
        hp["ema_decay"] = 0.9  # a schedule means an EMA (it overrides ema_decay)
    kappas = _valid_kappas(opt, hp.get("betas", ()))
    hp["kappa"] = draw(st.sampled_from(kappas))
    hp["scale_optimizer"] = draw(st.booleans())
    flatten = draw(st.integers(0, 3)) != 0  # 1 in 4: the tensor-list layout

    groups = []
    for gi in range(draw(st.sampled_from([1, 1, 2]))):
        tensors = []
        for _ in range(draw(st.integers(1, max_tensors))):
            tensors.append(dict(shape=draw(shapes()), dtype=draw(st.sampled_from(dtype_set)),
                                requires_grad=draw(st.sampled_from([True] * 9 + [False]))))
        overrides = {}
        if gi > 0:
            if draw(st.booleans()):
                overrides["lr"] = draw(st.floats(1e-4, 0.5))
            if draw(st.booleans()):
                overrides["weight_decay"] = draw(st.sampled_from([0.0, 0.05]))
            if draw(st.booleans()):
                overrides["ema_decay"] = draw(st.sampled_from([None, 0.0, 0.8]))
                if overrides["ema_decay"] is None:
                    overrides["ema_schedule"] = None
            if draw(st.booleans()) and not capturable:
                overrides["ema_every"] = draw(st.sampled_from([1, 2]))
        groups.append(dict(tensors=tensors, overrides=overrides))

    n_trainable = sum(t["requires_grad"] for g in groups for t in g["tensors"])
    steps = []
    progressive = draw(st.integers(0, 3)) == 0
    for _ in range(draw(st.integers(1, max_steps))):
        mode = "list" if not flatten else draw(st.sampled_from(["flat", "flat", "list",
                                                                  "replaced"]))
        none_mask = [draw(st.integers(0, 3)) == 0 if (mode == "list" and not capturable)
                     else False for _ in range(n_trainable)]
        step = dict(mode=mode, none_mask=none_mask,
                    found_inf=draw(st.sampled_from([None, None, None, 0.0, 1.0]))
                    if allow_amp else None,
                    grad_scale=draw(st.sampled_from([None, None, None, 2.0, 0.5, 3.0, 65536.0]))
                    if allow_amp else None,
                    kappa=draw(st.sampled_from(kappas)) if progressive else None)
        steps.append(step)
    return dict(opt=opt, hp=hp, schedule=schedule, flatten=flatten, groups=groups, steps=steps,
                views=draw(st.sampled_from([False, False, False, True])),
                seed=draw(st.integers(0, 2 ** 31 - 1)),
                init_scale=draw(st.sampled_from([1e-2, 1.0, 10.0])),
                grad_scale_mag=draw(st.sampled_from([1e-3, 1.0, 30.0])))


def describe(problem) -> str:
    """A short one-line summary (for failure messages)."""
    sizes = [[(tuple(t["shape"]), str(t["dtype"]).replace("torch.", ""), t["requires_grad"])
              for t in g["tensors"]] for g in problem["groups"]]
    return (f"{problem['opt']} hp={problem['hp']} sched={problem['schedule']} "
            f"flatten={problem['flatten']} views={problem.get('views', False)} groups={sizes} "
            f"overrides={[g['overrides'] for g in problem['groups']]} steps={problem['steps']}")


# ------------------------------------------------------------------------------------------------
# Building and driving an optimizer for a problem
# ------------------------------------------------------------------------------------------------
def _tensor_specs(problem):
    return [t for g in problem["groups"] for t in g["tensors"]]


def _random_split(problem, seed: int, fn):
    """One random float64 vector for all parameters, split and cast to each one's shape/dtype
    (one generator call, whatever the number of tensors)."""
    specs = _tensor_specs(problem)
    numels = [math.prod(t["shape"]) for t in specs]
    gen = torch.Generator().manual_seed(seed)
    flat = fn(sum(numels), gen)
    out = []
    for t, part in zip(specs, torch.split(flat, numels)):
        out.append(part.reshape(t["shape"]).to(t["dtype"]))
    return out


def initial_params(problem) -> List[torch.Tensor]:
    return _random_split(problem, problem["seed"], lambda n, gen: torch.randn(
        n, generator=gen, dtype=torch.float64) * problem["init_scale"])


def step_grads(problem, k: int) -> List[torch.Tensor]:
    """Gradients of step k for every parameter (frozen ones included, they are not used);
    about 10% exact zeros."""
    def fn(n, gen):
        x = torch.randn(n, generator=gen, dtype=torch.float64) * problem["grad_scale_mag"]
        return x.masked_fill(torch.rand(n, generator=gen) < 0.1, 0.0)
    return _random_split(problem, problem["seed"] * 7 + 1000 + k, fn)


def odd_views(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """Copies of ``tensors`` that are views into one shared buffer per dtype, each starting at
    an odd element offset (so at a data pointer that is not 16-byte aligned)."""
    out = []
    for dt in {t.dtype for t in tensors}:
        idx = [i for i, t in enumerate(tensors) if t.dtype == dt]
        total = sum(tensors[i].numel() + 1 for i in idx) + 1
        buf = torch.zeros(total, dtype=dt)
        off = 1
        for i in idx:
            n = tensors[i].numel()
            v = buf[off:off + n].view(tensors[i].shape)
            v.copy_(tensors[i])
            out.append((i, v))
            off += n + 1
    return [v for _, v in sorted(out, key=lambda iv: iv[0])]


def build(problem, backend: str, params: Optional[List[torch.Tensor]] = None, **extra):
    """``(params, optimizer)`` for the problem: fresh Parameters (copies of ``params``; with
    ``problem["views"]``, views at odd offsets into shared buffers, as parameters that alias a
    bigger tensor are)."""
    init = params if params is not None else initial_params(problem)
    init = odd_views(init) if problem.get("views") else [t.detach().clone() for t in init]
    ps, k = [], 0
    groups = []
    for g in problem["groups"]:
        gp = []
        for t in g["tensors"]:
            p = torch.nn.Parameter(init[k].detach(), requires_grad=t["requires_grad"])
            gp.append(p)
            ps.append(p)
            k += 1
        groups.append(dict(params=gp, **g["overrides"]))
    hp = dict(problem["hp"], **extra)
    opt = OPTIMIZERS[problem["opt"]](groups, ema_schedule=make_schedule(problem["schedule"]),
                                     backend=backend, flatten=problem["flatten"], **hp)
    return ps, opt


def trainable_index(problem) -> List[int]:
    return [i for i, t in enumerate(_tensor_specs(problem)) if t["requires_grad"]]


def grads_for_step(problem, k: int) -> List[Optional[torch.Tensor]]:
    """Step k's gradient per parameter as the optimizer will see it (None: skipped/frozen)."""
    raw = step_grads(problem, k)
    step = problem["steps"][k]
    out: List[Optional[torch.Tensor]] = [None] * len(raw)
    for j, i in enumerate(trainable_index(problem)):
        out[i] = None if step["none_mask"][j] else raw[i]
    return out


def apply_grads(problem, k: int, ps, opt, grads=None) -> None:
    """Put step k's gradients where the mode says: into the flat views, as fresh tensors (some
    None: the tensor-list path), or views plus one user-replaced gradient."""
    step = problem["steps"][k]
    grads = grads if grads is not None else grads_for_step(problem, k)
    mode = step["mode"]
    if mode == "list" or not problem["flatten"]:
        opt.zero_grad(set_to_none=True)
        present = [g for p, g in zip(ps, grads) if p.requires_grad and g is not None]
        fresh = iter(odd_views(present) if problem.get("views") else
                     [g.clone() for g in present])
        for p, g in zip(ps, grads):
            if p.requires_grad and g is not None:
                p.grad = next(fresh)
        return
    opt.zero_grad(set_to_none=False)
    with torch.no_grad():
        for p, g in zip(ps, grads):
            if p.requires_grad:
                p.grad.copy_(g)
    if mode == "replaced":
        for p in ps:
            if p.requires_grad:
                p.grad = p.grad.clone()  # a user-replaced gradient: the tensor-list path
                break


def set_kappa(problem, k: int, opt) -> None:
    kappa = problem["steps"][k]["kappa"]
    if kappa is not None:
        for g in opt.param_groups:
            g["kappa"] = kappa


def amp_args(problem, k: int) -> Dict[str, torch.Tensor]:
    step = problem["steps"][k]
    out = {}
    if step["found_inf"] is not None:
        out["found_inf"] = torch.tensor([step["found_inf"]], dtype=torch.float32)
    if step["grad_scale"] is not None:
        out["grad_scale"] = torch.tensor([step["grad_scale"]], dtype=torch.float32)
    return out


# ------------------------------------------------------------------------------------------------
# Snapshots: per param group, every quantity concatenated over the group's trainable parameters
# (in parameter order) as one float64 vector -- exact for fp32/bf16/fp16 values -- so that the
# oracle and the checks are a handful of vector ops even with thousands of tensors.
# ------------------------------------------------------------------------------------------------
COUNTERS = ("base_steps", "ema_base_steps", "steps")
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_CODE_DTYPES = {1: torch.bfloat16, 2: torch.float16}


def _cat64(ts):
    """One float64 vector of the tensors' values (exact for fp32/bf16/fp16)."""
    if not ts:
        return torch.zeros(0, dtype=torch.float64)
    with torch.no_grad():
        try:  # one C++ call (views + cat): thousands of tiny tensors stay cheap
            return torch._C._nn.flatten_dense_tensors(list(ts)).to(torch.float64)
        except (AttributeError, RuntimeError):  # pragma: no cover
            return torch.cat([t.reshape(-1) for t in ts]).to(torch.float64)


def snapshot(ps, opt) -> Dict[str, Any]:
    """Everything a step may change, copied: θ, per-parameter state (step, moments, EMA: read
    through ``opt.state``, torch.optim's public per-parameter state), the live EMA views of
    ``ema_parameters()``, the group counters; frozen parameters separately.

    The host counters of a found_inf step are learnt one step late (step() never reads
    found_inf on the host); what reads them (state_dict, the next step) settles them first,
    and so does this."""
    if hasattr(opt, "_settle"):
        opt._settle()
    ordered = [p for g in opt.param_groups for p in g["params"]]
    ema_of = dict(zip(map(id, ordered), opt.ema_parameters()))
    emas = [ema_of.get(id(p)) for p in ps]
    pos = {id(p): i for i, p in enumerate(ps)}
    groups, vecs, keys_all = [], [], []
    for g in opt.param_groups:
        groups.append({k: copy.deepcopy(v) for k, v in g.items()
                       if k not in ("params", "ema_schedule")})
        idx = [pos[id(p)] for p in g["params"]]
        # trainable: the parameters with a step count (a frozen one has at most its EMA)
        tr = [i for i in idx if ps[i] in opt.state and "step" in opt.state[ps[i]]]
        numels = [ps[i].numel() for i in tr]
        vec = dict(index=tr, numels=numels)
        vec["theta"] = _cat64([ps[i] for i in tr])
        counts = torch.tensor(numels, dtype=torch.int64)
        codes = torch.tensor([_CODES[ps[i].dtype] for i in tr], dtype=torch.int64)
        vec["code"] = torch.repeat_interleave(codes, counts)
        keys = sorted(opt.state[ps[tr[0]]].keys()) if tr else []
        for i in tr:
            keys_all.append((i, sorted(opt.state[ps[i]].keys())))
        for k in keys:
            if k == "step":
                steps = torch.tensor([float(opt.state[ps[i]]["step"]) for i in tr],
                                     dtype=torch.float64)
                vec["step"] = torch.repeat_interleave(steps, counts)
            else:
                vec[k] = _cat64([opt.state[ps[i]][k] for i in tr])
        if "ema" in keys:
            vec["ema_view"] = _cat64([emas[i] for i in tr])
        vec["no_ema_view"] = "ema" not in keys and all(emas[i] is None for i in idx)
        vecs.append(vec)
    frozen = {i: p.detach().clone() for i, p in enumerate(ps)
              if not (p in opt.state and "step" in opt.state[p])}
    return dict(groups=groups, vecs=vecs, frozen=frozen, state_keys=keys_all)


def _where(vec, flat_index: int) -> str:
    """'param i element j' for an index into a group vector."""
    off = 0
    for i, n in zip(vec["index"], vec["numels"]):
        if flat_index < off + n:
            return f"param {i} element {flat_index - off}"
        off += n
    return f"element {flat_index}"


def assert_snapshots_equal(a, b, what: str = "") -> None:
    """Equality of every value in two snapshots (bitwise up to the sign of zero)."""
    assert a["state_keys"] == b["state_keys"], f"{what}: state entries differ"
    for gi, (g, h) in enumerate(zip(a["groups"], b["groups"])):
        for c in COUNTERS:
            assert g[c] == h[c], f"{what}: group {gi} {c} changed: {g[c]} -> {h[c]}"
    for gi, (va, vb) in enumerate(zip(a["vecs"], b["vecs"])):
        assert va.keys() == vb.keys(), what
        for k in va:
            if isinstance(va[k], torch.Tensor):
                x, y = va[k], vb[k]
                same = (x == y) | (x.isnan() & y.isnan())
                assert bool(same.all()), (f"{what}: {k} changed at {_where(va, int((~same).nonzero()[0]))}: "
                                          f"{x[~same][0].item()!r} -> {y[~same][0].item()!r}")
    for i, x in a["frozen"].items():
        assert torch.equal(x, b["frozen"][i]), f"{what}: frozen parameter {i} changed"


def grad_vecs(snap, grads) -> List[Dict[str, torch.Tensor]]:
    """Per group: the gradients as one float64 vector (0 where None) and the mask of elements
    whose parameter has a gradient."""
    out = []
    for vec in snap["vecs"]:
        tr = vec["index"]
        gs = [grads[i] if grads[i] is not None else torch.zeros(n, dtype=torch.float64)
              for i, n in zip(tr, vec["numels"])]
        has = [torch.full((n,), grads[i] is not None) for i, n in zip(tr, vec["numels"])]
        out.append(dict(g=_cat64(gs), has=torch.cat(has) if has else torch.zeros(0, dtype=bool)))
    return out


# ------------------------------------------------------------------------------------------------
# The float64 oracle of one optimizer step
# ------------------------------------------------------------------------------------------------
def oracle_decay(spec, sched, s_from: float, s_to: float) -> float:
    """DESIGN.md's decay of one EMA update over the base steps [s_from, s_to), written from the
    definitions (not from ``schedules.*.decay``): ρ^(b−a) for constant, the telescoped s_from/s_to
    for Polyak, and for warmup/cosine the product of the per-base-step values ρ(n), a cell
    [n, n+1) covered in part contributing ρ(n) to the power of the part covered."""
    name, args = spec
    if name == "constant":
        return float(args[0]) ** (s_to - s_from)
    if name == "polyak":
        return 1.0 if s_to == s_from else s_from / s_to
    out, n = 1.0, 0
    while n < s_to:
        out *= sched(float(n)) ** max(0.0, min(s_to, n + 1.0) - max(s_from, float(n)))
        n += 1
    return out


def gi_has_schedule(problem, gi: int) -> bool:
    """Whether group gi uses the problem's schedule (a group override may drop it)."""
    ov = problem["groups"][gi]["overrides"]
    return problem["schedule"] is not None and not ("ema_schedule" in ov
                                                     and ov["ema_schedule"] is None)


def oracle_step(problem, pre, gvecs, found_inf=None, grad_scale=None):
    """Expected state after one step, in float64, from snapshot ``pre`` and the gradients.

    Written from DESIGN.md and torch.optim's documented updates (not from the library).
    Returns per group: ``exp[key]`` expected vectors (θ before rounding to its storage dtype),
    ``mag[key]`` per-element magnitude of the computation (the scale of rounding errors: every
    term with its absolute value), ``ema_w`` (1 − ρ̂ of this step or None), and the counters.
    """
    kind = problem["opt"]
    decoupled = kind in DECOUPLED
    sched = make_schedule(problem["schedule"])
    skipped = found_inf is not None and float(found_inf) != 0.0
    gs = 1.0 if grad_scale is None else float(grad_scale)
    out = []
    for gi, (g0, vec, gv) in enumerate(zip(pre["groups"], pre["vecs"], gvecs)):
        g = dict(g0)
        exp = {k: v for k, v in vec.items() if isinstance(v, torch.Tensor)}
        mag: Dict[str, torch.Tensor] = {}
        res = dict(exp=exp, mag=mag, ema_w=None, group=g)
        out.append(res)
        if skipped:
            continue
        kappa = float(g["kappa"])
        root = math.sqrt(kappa)
        s_before = float(g["base_steps"])
        s_after = s_before + kappa
        steps = int(g["steps"]) + 1
        uses_sched = sched is not None and gi_has_schedule(problem, gi)
        if (g["ema_decay"] is not None or uses_sched) and steps % int(g["ema_every"]) == 0:
            s_from = float(g["ema_base_steps"])
            res["ema_w"] = 1.0 - (oracle_decay(problem["schedule"], sched, s_from, s_after)
                                  if uses_sched else float(g["ema_decay"]) ** (s_after - s_from))
            g["ema_base_steps"] = s_after
        g["base_steps"] = s_after
        g["steps"] = steps
        if not vec["index"]:
            continue
        has = gv["has"]
        theta = vec["theta"]
        grad = gv["g"] / gs
        gmag = grad.abs()
        if g["maximize"]:
            grad = -grad
        t = vec["step"] + 1.0
        if kind == "sgd":
            lr = g["lr"] * kappa if g["scale_optimizer"] else g["lr"]
            wd, mom, damp = g["weight_decay"], g["momentum"], g["dampening"]
            d = grad + wd * theta
            dmag = gmag + wd * theta.abs()
            if mom != 0:
                buf = vec["momentum_buffer"]
                first = t == 1.0
                nbuf = torch.where(first, d, mom * buf + (1.0 - damp) * d)
                bmag = torch.where(first, dmag, mom * buf.abs() + (1.0 - damp) * dmag)
                exp["momentum_buffer"] = torch.where(has, nbuf, buf)
                mag["momentum_buffer"] = bmag
                if g["nesterov"]:
                    d, dmag = d + mom * nbuf, dmag + mom * bmag
                else:
                    d, dmag = nbuf, bmag
            new = theta - lr * d
            mag["theta"] = theta.abs() + lr * dmag
        else:
            b1, b2 = g["betas"]
            lr, eps, wd = g["lr"], g["eps"], g["weight_decay"]
            if g["scale_optimizer"]:
                lr, eps = lr * root, eps / root
                b1, b2 = 1.0 - kappa * (1.0 - b1), 1.0 - kappa * (1.0 - b2)
                wd = wd * root if decoupled else wd
            th = theta * (1.0 - lr * wd) if decoupled else theta
            if not decoupled:
                grad = grad + wd * theta
                gmag = gmag + wd * theta.abs()
            m = b1 * vec["exp_avg"] + (1.0 - b1) * grad
            mmag = b1 * vec["exp_avg"].abs() + (1.0 - b1) * gmag
            v = b2 * vec["exp_avg_sq"] + (1.0 - b2) * grad * grad
            # g may cancel (g + wd·θ): its rounding error scales with |g| + wd|θ|, not |g|
            vmag = b2 * vec["exp_avg_sq"] + (1.0 - b2) * gmag * gmag
            exp["exp_avg"] = torch.where(has, m, vec["exp_avg"])
            exp["exp_avg_sq"] = torch.where(has, v, vec["exp_avg_sq"])
            mag["exp_avg"], mag["exp_avg_sq"] = mmag, vmag
            vhat = v
            if g["amsgrad"]:
                vhat = torch.maximum(vec["max_exp_avg_sq"], v)
                exp["max_exp_avg_sq"] = torch.where(has, vhat, vec["max_exp_avg_sq"])
                mag["max_exp_avg_sq"] = torch.maximum(vec["max_exp_avg_sq"], vmag)
            step_size = lr / (1.0 - torch.pow(b1, t))
            denom = vhat.sqrt() / torch.sqrt(1.0 - torch.pow(b2, t)) + eps
            new = th - step_size * m / denom
            mag["theta"] = th.abs() + step_size * mmag / denom
        exp["theta"] = torch.where(has, new, theta)
        exp["step"] = torch.where(has, t, vec["step"])
    return dict(groups=out, skipped=skipped)


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------
FP32_RTOL = 1e-6
EMA_RTOL = 1e-5
TINY = 1e-30  # below every value the tests produce; keeps exact zeros exact


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Monotone integer image of 16-bit floats (adjacent floats differ by 1; +0 == -0)."""
    bits = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFF))


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)
    return (ordered_bits(a) - ordered_bits(b)).abs()


def _report(label, key, vec, bad, actual, expected, note=""):
    first = int(bad.nonzero()[0])
    return (f"{label}: {key}: {int(bad.sum())} element(s) out of tolerance, first at "
            f"{_where(vec, first)}: got {actual[first].item()!r}, expected "
            f"{expected[first].item()!r} {note}")


def _check_theta(label, vec, actual, expected, mag, has, pre_theta):
    """θ: elements without a gradient bitwise unchanged; fp32 <= 1e-6 of the magnitudes involved;
    bf16/fp16 within one ulp (of the expected value rounded to the storage dtype), or within the
    fp32 tolerance where the update cancels θ towards 0."""
    bad = ~has & (actual != pre_theta)
    assert not bad.any(), _report(label, "theta of a parameter without gradient", vec, bad,
                                  actual, pre_theta)
    fp32 = has & (vec["code"] == 0)
    bad = fp32 & ~((actual - expected).abs() <= FP32_RTOL * mag + TINY)
    assert not bad.any(), _report(label, "theta (fp32)", vec, bad, actual, expected)
    for code, dt in _CODE_DTYPES.items():
        sel = has & (vec["code"] == code)
        if sel.any():
            d = torch.zeros_like(actual, dtype=torch.int32)
            d[sel] = ulp_distance(actual[sel].to(dt), expected[sel].to(dt))
            # Where θ − lr·u cancels towards 0, the float32 rounding of the operands (<= 1e-6 of
            # their magnitude, as for fp32 parameters) is many 16-bit ulps of the tiny result:
            # that is the float32 math's error, not a rounding error of the storage.
            bad = (d > 1) & ~((actual - expected).abs() <= FP32_RTOL * mag + TINY)
            assert not bad.any(), _report(label, f"theta ({dt})", vec, bad, actual, expected,
                                          "(more than 1 ulp apart)")


def _check_close(label, key, vec, actual, expected, scale, rtol, slack=None):
    tol = rtol * scale + TINY
    if slack is not None:
        tol = tol + slack
    bad = ~((actual - expected).abs() <= tol)  # NaN fails
    assert not bad.any(), _report(label, key, vec, bad, actual, expected)


def _check_group(label, pre_vec, post_vec, res, gv, target, ema_slack_from=None):
    """One group after a step: ``target`` holds the expected vectors (the oracle's or the
    reference's) and ``res`` the oracle's magnitudes and EMA weight."""
    assert post_vec.keys() == pre_vec.keys(), f"{label}: state keys changed"
    if not post_vec["index"]:  # every parameter of the group is frozen
        return
    has, mag = gv["has"], res["mag"]
    _check_theta(label, post_vec, post_vec["theta"], target["theta"], mag.get("theta"), has,
                 pre_vec["theta"])
    bad = post_vec["step"] != target["step"]
    assert not bad.any(), _report(label, "step", post_vec, bad, post_vec["step"],
                                  target["step"])
    for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
        if k not in post_vec:
            continue
        bad = ~has & (post_vec[k] != pre_vec[k])
        assert not bad.any(), _report(label, f"{k} of a parameter without gradient", post_vec,
                                      bad, post_vec[k], pre_vec[k])
        _check_close(label, k, post_vec, torch.where(has, post_vec[k], target[k]), target[k],
                     torch.where(has, mag[k], 0.0), FP32_RTOL)
    if "ema" in post_vec:
        z0, z = pre_vec["ema"], post_vec["ema"]
        w = res["ema_w"]
        if w is None:  # not an EMA step: not a bit of ζ moves
            bad = z != z0
            assert not bad.any(), _report(label, "EMA moved on a non-EMA step", post_vec, bad, z,
                                          z0)
        else:
            theta = post_vec["theta"]  # ζ moves towards θ as stored
            if ema_slack_from is None:
                expected, slack = z0 + w * (theta - z0), None
            else:  # vs the reference: a one-ulp θ difference moves ζ by w·|Δθ| at most
                expected, slack = ema_slack_from["ema"], w * (theta - ema_slack_from["theta"]).abs()
            _check_close(label, f"EMA (w={w!r})", post_vec, z, expected, z0.abs() + theta.abs(),
                         EMA_RTOL, slack)
        bad = post_vec["ema_view"] != z
        assert not bad.any(), _report(label, "ema_parameters() vs state_dict's ema", post_vec,
                                      bad, post_vec["ema_view"], z)
    else:
        assert post_vec["no_ema_view"], f"{label}: ema_parameters() has an entry for a group " \
                                        f"without EMA"


def check_step_against_oracle(pre, post, oracle, gvecs, label: str):
    """The reference after one step vs the float64 oracle from its own state before the step."""
    if oracle["skipped"]:
        assert_snapshots_equal(pre, post, f"{label}: found_inf step")
        return
    _check_common(pre, post, [r["group"] for r in oracle["groups"]], label)
    for gi, (res, gv) in enumerate(zip(oracle["groups"], gvecs)):
        _check_group(f"{label} group {gi}", pre["vecs"][gi], post["vecs"][gi], res, gv,
                     res["exp"])


def check_step_against_reference(pre, post, ref_post, oracle, gvecs, label: str):
    """A backend after one step vs the reference after the same step from the same state."""
    if oracle["skipped"]:
        assert_snapshots_equal(pre, post, f"{label}: found_inf step")
        return
    _check_common(pre, post, ref_post["groups"], label)
    for gi, (res, gv) in enumerate(zip(oracle["groups"], gvecs)):
        _check_group(f"{label} group {gi}", pre["vecs"][gi], post["vecs"][gi], res, gv,
                     ref_post["vecs"][gi], ema_slack_from=ref_post["vecs"][gi])


def _check_common(pre, post, want_groups, label):
    for gi, (g, h) in enumerate(zip(want_groups, post["groups"])):
        for c in COUNTERS:
            assert g[c] == h[c], f"{label}: group {gi} {c}: expected {g[c]}, got {h[c]}"
    assert post["state_keys"] == pre["state_keys"], f"{label}: state entries changed"
    for i, x in pre["frozen"].items():
        assert torch.equal(x, post["frozen"][i]), f"{label}: frozen parameter {i} changed"


def sync_from(dst_ps, dst_opt, src_ps, src_opt) -> None:
    """Make (dst_ps, dst_opt) hold exactly the state of (src_ps, src_opt): θ copied in place
    (the optimizer's storage stays), the rest through the public state_dict round trip."""
    with torch.no_grad():
        for d, s in zip(dst_ps, src_ps):
            d.copy_(s)
    dst_opt.load_state_dict(src_opt.state_dict())


def check_capturable_skip(pre, post, label: str) -> None:
    """found_inf != 0 under capturable=True: θ, state (the per-parameter step is the device
    count, which skips the step) and EMA unchanged; the host group counters count calls
    (docs/layout_and_checkpoints.md: a replayed graph runs no Python), the EMA clock included."""
    assert_snapshots_equal(dict(pre, groups=post["groups"]), post, label)
    for gi, (g, h) in enumerate(zip(pre["groups"], post["groups"])):
        s_after = float(g["base_steps"]) + float(g["kappa"])
        assert h["steps"] == g["steps"] + 1 and h["base_steps"] == s_after, label
        has_ema = "ema" in pre["vecs"][gi] or g["ema_decay"] is not None
        assert h["ema_base_steps"] == (s_after if has_ema else g["ema_base_steps"]), label


def run_problem(problem, backends: List[str], check_f64: bool = True,
                build_kw: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, int]:
    """Run ``problem`` step by step on the reference (checked after every step against float64
    from its own state) and on every other backend (checked after every step against the
    reference stepped from the backend's own state).  Returns the steps checked per backend."""
    label0 = describe(problem) if sum(len(g["tensors"]) for g in problem["groups"]) < 50 \
        else f"{problem['opt']} with {sum(len(g['tensors']) for g in problem['groups'])} tensors"
    counts = {}
    ref_ps, ref_opt = build(problem, "reference")
    runs = {}
    build_kw = build_kw or {}
    for b in backends:
        if b != "reference":
            runs[b] = build(problem, b, **build_kw.get(b, {})) + build(problem, "reference")
    for k in range(len(problem["steps"])):
        amp = amp_args(problem, k)
        amp_f = {k2: v.item() for k2, v in amp.items()}
        grads = grads_for_step(problem, k)
        set_kappa(problem, k, ref_opt)
        pre = snapshot(ref_ps, ref_opt)
        apply_grads(problem, k, ref_ps, ref_opt, grads)
        ref_opt.step(**amp)
        if check_f64:
            post = snapshot(ref_ps, ref_opt)
            gvecs = grad_vecs(pre, grads)
            oracle = oracle_step(problem, pre, gvecs, **amp_f)
            check_step_against_oracle(pre, post, oracle, gvecs,
                                      f"reference step {k} of [{label0}]")
        counts["reference"] = counts.get("reference", 0) + 1
        for b, (ps, opt, sps, sopt) in runs.items():
            set_kappa(problem, k, opt)
            pre_b = snapshot(ps, opt)
            sync_from(sps, sopt, ps, opt)
            apply_grads(problem, k, ps, opt, grads)
            apply_grads(problem, k, sps, sopt, grads)
            opt.step(**amp)
            sopt.step(**amp)
            gvecs = grad_vecs(pre_b, grads)
            oracle_b = oracle_step(problem, pre_b, gvecs, **amp_f)
            label = f"{b}{' ' + str(build_kw[b]) if b in build_kw else ''} step {k} of [{label0}]"
            if oracle_b["skipped"] and getattr(opt, "capturable", False):
                check_capturable_skip(pre_b, snapshot(ps, opt), label)
            else:
                check_step_against_reference(pre_b, snapshot(ps, opt), snapshot(sps, sopt),
                                             oracle_b, gvecs, label)
            counts[b] = counts.get(b, 0) + 1
    return counts
