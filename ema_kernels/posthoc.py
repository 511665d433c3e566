"""Post-hoc EMA (EDM2: Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion
Models", CVPR 2024): choose the EMA length after training.

During training, track two power-function EMAs (``ek.schedules.power``) and save snapshots of
them every N steps::

    opt = ek.AdamW(model.parameters(), lr=1e-3,
                   ema_schedule=(ek.schedules.power(sigma_rel=0.05),
                                 ek.schedules.power(sigma_rel=0.10)))
    ...
    if step % 256 == 0:
        ek.posthoc.save(opt, f"snapshots/{step:08d}.pt", index=(0, 1), model=model)

Afterwards, :func:`synthesize` returns the EMA of any other width σ_rel (at any s up to the
last snapshot's) as the least-squares combination of the snapshots: a snapshot of the power
EMA with exponent γ_i taken at s = t_i averages θ with the profile
p_i(τ) = (γ_i+1) τ^γ_i / t_i^(γ_i+1) on [0, t_i], so the combination Σ x_i ζ_i averages θ with
Σ x_i p_i; x minimises ‖Σ x_i p_i − p_target‖² over τ, i.e. solves A x = b with the
closed-form inner products A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_target⟩ (EDM2's
``solve_posthoc_coefficients``). Or from the shell::

    python -m ema_kernels posthoc --snapshots snapshots --sigma-rel 0.07 --out ema_0.07.pt

Time is counted in base steps (samples seen / base batch, the optimizer's ``s``), so snapshots
taken at different batch sizes (κ) combine correctly. The power EMA's decay
(s_from/s_to)^(γ+1) makes the optimizer's ζ exactly ∫ p(τ) θ(τ) dτ with θ held between EMA
updates, so a synthesised profile that equals a tracked one returns the tracked EMA.

Names: a snapshot records one name per parameter, aligned with ``opt.ema_parameters()``: the
``model=``'s parameter name when given, else the optimizer's ``param_names`` (an optimizer built
from ``model.named_parameters()``), else ``"param.{k}"`` with k the position in
``[p for g in opt.param_groups for p in g["params"]]``. The CLI's state dict uses these names,
so with real names ``model.load_state_dict(sd, strict=False)`` loads the parameters (buffers
are not EMA'd by a power EMA snapshot and are not in it).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import schedules

__all__ = ["Snapshot", "SnapshotEMA", "snapshot", "save", "load", "synthesize",
           "synthesize_state_dict", "solve_coefficients", "profile_inner_product"]

FORMAT = "ema_kernels.posthoc.snapshot/1"


@dataclass
class SnapshotEMA:
    """One power EMA (optimizer EMA ``index``) in a snapshot.

    ``gammas[g]``: γ of param group g at this index (None: the group keeps no EMA there);
    ``tensors[k]``: a CPU copy of ζ of parameter k (None where ``ema_parameters`` has none).
    """

    index: int
    gammas: List[Optional[float]]
    tensors: List[Optional[torch.Tensor]]


@dataclass
class Snapshot:
    """A picklable record of an optimizer's power EMAs at one moment (see :func:`snapshot`).

    ``names[k]`` and ``group_of[k]`` describe parameter k (aligned with
    ``opt.ema_parameters()``); ``s[g]`` is the base steps of param group g at its last EMA
    update; ``emas`` one :class:`SnapshotEMA` per EMA index recorded.
    """

    names: List[str]
    group_of: List[int]
    s: List[float]
    emas: List[SnapshotEMA] = field(default_factory=list)
    source: str = ""  # where it was loaded from, for messages (not saved)

    def to_dict(self) -> Dict:
        """Plain containers of tensors, strings and numbers: ``torch.load(weights_only=True)``
        reads it back (no pickled classes in the file)."""
        return {"format": FORMAT, "names": list(self.names), "group_of": list(self.group_of),
                "s": [float(x) for x in self.s],
                "emas": [{"index": e.index, "gammas": list(e.gammas), "tensors": list(e.tensors)}
                         for e in self.emas]}

    @classmethod
    def from_dict(cls, d: Dict, source: str = "") -> "Snapshot":
        where = f" ({source})" if source else ""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not an ema_kernels post-hoc snapshot{where}: expected format "
                             f"{FORMAT!r}, got {got!r}. Write snapshots with "
                             f"ema_kernels.posthoc.save(opt, path)")
        return cls(names=list(d["names"]), group_of=[int(g) for g in d["group_of"]],
                   s=[float(x) for x in d["s"]],
                   emas=[SnapshotEMA(int(e["index"]), [None if g is None else float(g)
                                                       for g in e["gammas"]], list(e["tensors"]))
                         for e in d["emas"]], source=source)

    def describe(self) -> str:
        """One line: s and γ of what the snapshot holds (for progress output)."""
        s = sorted(set(self.s))
        gam = sorted({g for e in self.emas for g in e.gammas if g is not None})
        return (f"s={'/'.join(f'{x:g}' for x in s)}  gamma={', '.join(f'{g:.4g}' for g in gam)}"
                f"  ({len(self.names)} parameters)")


# ---------------------------------------------------------------------- taking snapshots -------
def _schedule_at(group: Dict, i: int):
    """EMA ``i`` of a param group: ema_schedule[i] if given, else constant(ema_decay[i]), else
    None (no EMA). A non-tuple ``ema_schedule`` / ``ema_decay`` applies to index 0."""

    def pick(v):
        if isinstance(v, (tuple, list)):
            return v[i] if i < len(v) else None
        return v if i == 0 else None

    if group.get("ema_decay") is None:
        return None  # ema_decay=None: no EMA, whatever the (optimizer-wide) schedule
    sched, decay = pick(group.get("ema_schedule")), pick(group.get("ema_decay"))
    if sched is not None:
        return sched
    return None if decay is None else schedules.constant(decay)


def _param_names(opt, model) -> List[str]:
    by_id = {}
    if model is not None:
        by_id = {id(p): n for n, p in model.named_parameters()}
    names, k = [], 0
    for g in opt.param_groups:
        group_names = g.get("param_names")
        for j, p in enumerate(g["params"]):
            if id(p) in by_id:
                names.append(by_id[id(p)])
            elif group_names is not None:
                names.append(str(group_names[j]))
            else:
                names.append(f"param.{k}")
            k += 1
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ValueError(f"parameter names repeat ({dup}): pass model= (or build the optimizer "
                         f"from model.named_parameters()) so that each parameter has one name")
    return names


def _cpu_copy(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2): gather it (a collective: every rank)
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True)


def _indices(index, num_emas: int) -> Tuple[int, ...]:
    idx = (index,) if isinstance(index, int) else tuple(index)
    if not idx or any(isinstance(i, bool) or not isinstance(i, int) for i in idx):
        raise ValueError(f"index={index!r} is invalid: give an EMA index or a tuple of them, "
                         f"e.g. index=(0, 1)")
    bad = [i for i in idx if not 0 <= i < num_emas]
    if bad or len(set(idx)) != len(idx):
        raise ValueError(f"index={index!r} is invalid: this optimizer keeps {num_emas} EMA(s) "
                         f"(indices 0..{num_emas - 1}), each index at most once. Track two "
                         f"profiles with ema_schedule=(power(sigma_rel=0.05), "
                         f"power(sigma_rel=0.10)), or snapshot index=0 of two optimizers")
    return idx


def snapshot(opt, index: Union[int, Sequence[int]] = (0, 1), *,
             model: Optional[torch.nn.Module] = None) -> Snapshot:
    """A :class:`Snapshot` of ``opt``'s power-function EMAs ``index`` (CPU copies, γ, s).

    Every chosen EMA must be a power-function EMA (``ema_schedule=ek.schedules.power(...)``) in
    every param group that keeps one at that index; another schedule or a constant
    ``ema_decay`` raises ``ValueError``. Groups without an EMA there give ``None`` entries (as
    ``ema_parameters`` does). ``s`` is the group's base steps at its last EMA update (with
    ``ema_every > 1`` the EMA has not moved since then). ``model=`` only names the parameters
    (see the module docstring). DTensor (FSDP2) EMAs are gathered: call it on every rank.
    """
    if hasattr(opt, "_settle"):
        opt._settle()  # s must not count a found_inf step the device skipped
    num = int(getattr(opt, "num_emas", 1))
    idx = _indices(index, num)
    names = _param_names(opt, model)
    group_of = [gi for gi, g in enumerate(opt.param_groups) for _ in g["params"]]
    s = [float(g["ema_base_steps"]) for g in opt.param_groups]
    emas = []
    for i in idx:
        gammas = []
        for gi, g in enumerate(opt.param_groups):
            sched = _schedule_at(g, i)
            if sched is not None and not isinstance(sched, schedules.power):
                raise ValueError(
                    f"EMA {i} of param group {gi} uses {sched!r}, not a power-function EMA: "
                    f"post-hoc synthesis combines power profiles (EDM2), whose inner products "
                    f"it computes in closed form. Track it with "
                    f"ema_schedule=ek.schedules.power(sigma_rel=...), or snapshot only the "
                    f"power EMAs (index=...)")
            if sched is not None and s[gi] <= 0:
                raise ValueError(f"param group {gi} has taken no EMA update yet (s=0): its EMA "
                                 f"is the initial copy of the parameters, with no profile to "
                                 f"combine. Snapshot after the first EMA step")
            gammas.append(None if sched is None else float(sched.gamma))
        tensors = [_cpu_copy(t) for t in opt.ema_parameters(index=i)]
        if len(tensors) != len(names):
            raise RuntimeError(f"ema_parameters(index={i}) returned {len(tensors)} entries for "
                               f"{len(names)} parameters")
        emas.append(SnapshotEMA(i, gammas, tensors))
    return Snapshot(names=names, group_of=group_of, s=s, emas=emas)


def save(opt, path: Union[str, os.PathLike], index: Union[int, Sequence[int]] = (0, 1), *,
         model: Optional[torch.nn.Module] = None) -> Snapshot:
    """Write :func:`snapshot` ``(opt, index, model=model)`` to ``path`` with ``torch.save``.

    The file is written next to its destination and renamed into place, so an interrupted run
    never leaves a truncated snapshot. Returns the snapshot.
    """
    snap = snapshot(opt, index, model=model)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(snap.to_dict(), tmp)
    os.replace(tmp, path)
    snap.source = path
    return snap


def load(path: Union[str, os.PathLike], mmap: bool = True) -> Snapshot:
    """Read a snapshot written by :func:`save` (``weights_only``: no code runs on load).

    ``mmap=True`` maps the tensors instead of reading them: :func:`synthesize` then reads each
    file's data once, while combining, and never holds all snapshots in memory.
    """
    path = os.fspath(path)
    return Snapshot.from_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap),
                              source=path)


# ---------------------------------------------------------------------- the least squares ------
def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
    """⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ of the power profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t].

    = (γ_a+1)(γ_b+1)/(γ_a+γ_b+1) · (t_lo/t_hi)^γ_hi / t_hi, with t_hi the later end and γ_hi its
    exponent (EDM2's ``power_function_correlation``). Broadcasts over numpy arrays.
    """
    ta, ga, tb, gb = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    lo, hi = np.minimum(ta, tb), np.maximum(ta, tb)
    g_hi = np.where(ta < tb, gb, ga)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (lo / hi) ** g_hi / hi


def solve_coefficients(t_in, gamma_in, t_out: float, gamma_out: float):
    """EDM2's least squares: x minimising ‖Σ x_i p_i − p_out‖ over profiles, and the fit's
    relative error ‖Σ x_i p_i − p_out‖ / ‖p_out‖ (0: the target is in the span).

    ``t_in``, ``gamma_in``: the inputs' s and γ; ``t_out``, ``gamma_out``: the target's.
    ``numpy.linalg.lstsq`` (as EDM2) gives the minimum-norm solution when inputs repeat.
    """
    t_in = np.asarray(t_in, dtype=np.float64).reshape(-1)
    g_in = np.asarray(gamma_in, dtype=np.float64).reshape(-1)
    A = profile_inner_product(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    b = profile_inner_product(t_in, g_in, t_out, gamma_out)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    norm2 = float(profile_inner_product(t_out, gamma_out, t_out, gamma_out))
    err2 = norm2 - 2.0 * float(x @ b) + float(x @ A @ x)
    return x, math.sqrt(max(err2, 0.0) / norm2)


def _as_snapshots(snapshots) -> List[Snapshot]:
    if isinstance(snapshots, (Snapshot, str, os.PathLike)):
        snapshots = [snapshots]
    out = [s if isinstance(s, Snapshot) else load(s) for s in snapshots]
    if not out:
        raise ValueError("synthesize() needs at least one snapshot")
    first = out[0]
    for s in out[1:]:
        if s.names != first.names or s.group_of != first.group_of:
            raise ValueError(f"snapshots describe different parameters: {_name(s)} vs "
                             f"{_name(first)} (names or param groups differ). Combine snapshots "
                             f"of one training run only")
    return out


def _name(snap: Snapshot) -> str:
    return snap.source or "a snapshot"


def synthesize(snapshots, sigma_rel: float, s: Optional[float] = None, *,
               progress: Optional[Callable[[str], None]] = None) -> List[Optional[torch.Tensor]]:
    """The EMA of relative width ``sigma_rel`` at base step ``s``, aligned with
    ``ema_parameters()``, combined from ``snapshots`` (Snapshot objects or paths).

    Every power EMA in every snapshot is an input; per parameter the coefficients solve EDM2's
    least-squares problem (:func:`solve_coefficients`) over the inputs that hold it. ``s``
    defaults to the latest snapshot's (per param group). Accumulates in float64 and returns
    tensors of the snapshots' dtype (``None`` where no snapshot has an EMA of the parameter).
    ``progress(line)`` is called once per snapshot combined.
    """
    gamma_out = schedules.sigma_rel_to_gamma(sigma_rel)
    if s is not None and not (math.isfinite(float(s)) and float(s) > 0):
        raise ValueError(f"s={s!r} is invalid: the target time is a number of base steps > 0")
    snaps = _as_snapshots(snapshots)
    n_params = len(snaps[0].names)

    # Inputs per parameter: the (snapshot, EMA) pairs that hold it. Parameters with the same
    # inputs (a param group) share one solve; plan[k][a] lists (EMA j, coefficient) of snapshot a.
    coef: Dict[Tuple, Tuple[np.ndarray, float]] = {}
    plan: List[Dict[int, List[Tuple[int, float]]]] = []
    for k in range(n_params):
        gi = snaps[0].group_of[k]
        inputs, ts, gs = [], [], []
        for a, snap in enumerate(snaps):
            for j, e in enumerate(snap.emas):
                if e.tensors[k] is not None and e.gammas[gi] is not None:
                    inputs.append((a, j))
                    ts.append(snap.s[gi])
                    gs.append(e.gammas[gi])
        per_snap: Dict[int, List[Tuple[int, float]]] = {}
        if inputs:
            t_out = float(s) if s is not None else max(ts)
            key = (tuple(inputs), tuple(ts), tuple(gs), t_out)
            if key not in coef:
                coef[key] = solve_coefficients(ts, gs, t_out, gamma_out)
            for (a, j), x in zip(inputs, coef[key][0]):
                per_snap.setdefault(a, []).append((j, float(x)))
        plan.append(per_snap)

    out: List[Optional[torch.Tensor]] = [None] * n_params
    dtypes: List[Optional[torch.dtype]] = [None] * n_params
    for a, snap in enumerate(snaps):
        for k, per_snap in enumerate(plan):
            for j, x in per_snap.get(a, ()):
                z = snap.emas[j].tensors[k]
                if out[k] is None:
                    out[k] = torch.zeros_like(z, dtype=torch.float64)
                    dtypes[k] = z.dtype
                elif z.shape != out[k].shape:
                    raise ValueError(f"parameter {snap.names[k]!r} has shape {tuple(z.shape)} in "
                                     f"{_name(snap)} but {tuple(out[k].shape)} in an earlier "
                                     f"snapshot: combine snapshots of one model only")
                out[k].add_(z.to(torch.float64), alpha=x)
        if progress is not None:
            progress(f"[{a + 1}/{len(snaps)}] {_name(snap)}: {snap.describe()}")
    fit = max((e for _, e in coef.values()), default=0.0)
    if progress is not None:
        progress(f"sigma_rel={sigma_rel:g} (gamma={gamma_out:.4g}) at "
                 f"s={'latest' if s is None else f'{float(s):g}'}: profile fit error "
                 f"{100 * fit:.3g}% (relative L2 of the profile)")
    return [None if t is None else t.to(d) for t, d in zip(out, dtypes)]


def synthesize_state_dict(snapshots, sigma_rel: float, s: Optional[float] = None, *,
                          progress: Optional[Callable[[str], None]] = None
                          ) -> Dict[str, torch.Tensor]:
    """:func:`synthesize` as ``{name: tensor}`` with the snapshots' parameter names (parameters
    without an EMA are left out): ``model.load_state_dict(sd, strict=False)``."""
    snaps = _as_snapshots(snapshots)
    tensors = synthesize(snaps, sigma_rel, s, progress=progress)
    return {n: t.contiguous() for n, t in zip(snaps[0].names, tensors) if t is not None}


def _write_state_dict(sd: Dict[str, torch.Tensor], path: str) -> None:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise RuntimeError(f"writing {path!r} needs the safetensors package "
                               f"(pip install safetensors), or give a .pt path "
                               f"(torch.save)") from e
        save_file(sd, path)
    else:
        torch.save(sd, path)


def _snapshot_files(directory: str, pattern: str) -> List[str]:
    import glob

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--snapshots {directory!r} is not a directory")
    files = sorted(f for f in glob.glob(os.path.join(directory, pattern)) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"no snapshot files matching {pattern!r} in {directory!r} (write "
                                f"them with ema_kernels.posthoc.save; --glob picks other names)")
    return files


def main(args) -> int:
    """``python -m ema_kernels posthoc``: synthesise an EMA from a directory of snapshots."""
    files = _snapshot_files(args.snapshots, args.glob)
    print(f"{len(files)} snapshot files in {args.snapshots}", flush=True)
    # Loading maps the files; each one's data is read while it is combined, one progress line
    # per file then.
    snaps = [load(f) for f in files]
    sd = synthesize_state_dict(snaps, args.sigma_rel, args.s,
                               progress=lambda line: print(line, flush=True))
    _write_state_dict(sd, args.out)
    print(f"wrote {args.out}: {len(sd)} tensors ({sum(t.numel() for t in sd.values())} "
          f"values), the EMA with sigma_rel={args.sigma_rel:g}", flush=True)
    return 0


def add_arguments(parser) -> None:
    """The CLI's flags (used by ``ema_kernels.__main__``)."""
    parser.add_argument("--snapshots", required=True, help="directory of posthoc.save files")
    parser.add_argument("--sigma-rel", type=float, required=True, dest="sigma_rel",
                        help="relative width of the EMA to synthesise (EDM2's sigma_rel)")
    parser.add_argument("--out", required=True,
                        help="output state dict (.safetensors: safetensors, else torch.save)")
    parser.add_argument("--s", type=float, default=None,
                        help="base step to synthesise at (default: the latest snapshot's)")
    parser.add_argument("--glob", default="*.pt", help="snapshot file pattern (default *.pt)")

