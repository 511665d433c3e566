"""``python -m ema_kernels bench``: an optimizer step + an EMA update, ours against the peers.

Every row does the same job on the same parameters — one optimizer step and one EMA update
ζ ← ρζ + (1−ρ)θ (on every ``ema_every``-th step) over ``--tensors`` parameter tensors holding
``--numel`` elements in all — and is timed end to end (median of many steps after a warm-up):

- ``ek[<backend>]``: ``ema_kernels.AdamW/Adam/SGD(..., backend=<backend>)``, one row per backend
  in :func:`ema_kernels.available_backends` for the device (a backend that lands shows up by
  itself; the Triton *interpreter* on CPU is skipped, it is a test vehicle, not a fast path);
- ``torch fused + foreach_lerp``: ``torch.optim.X(fused=True)`` + ``torch._foreach_lerp_`` over
  prebuilt lists — the strongest unfused baseline; the ``speedup`` column is relative to it;

With ``--emas N`` every row keeps N EMAs (decays 0.9999, 0.999, ...): ``ek`` rows one optimizer
with an ``ema_decay`` tuple (all N updated in the step's one pass), the baselines N EMA updates
after the optimizer step (N ``_foreach_lerp_`` calls, N EMA objects of each package).
With ``--clip`` every step also clips the gradients' total norm (max_norm
:data:`CLIP_MAX_NORM`, active at every step): ``ek`` rows ``opt.clip_grad_norm_`` + ``step()``
(the norm reads g once, the coefficient is applied inside the step's pass: fp32 AdamW + EMA
40 B/param), against ``torch fused + clip_grad_norm_ + foreach_lerp``:
``torch.nn.utils.clip_grad_norm_`` (reads g, then reads and writes it) + fused AdamW +
``_foreach_lerp_`` (52 B/param, :func:`torch_clip_bytes_per_param`). In this mode every row's
GB/s is against its own byte count (the ``B/param`` column), and only those rows (and the
stream) run.
- the peers, the real packages imported and called as their users call them
  (:mod:`ema_kernels.bench.peers`; a row whose package is missing is reported, not timed):
  ``torch fused + AveragedModel`` (``torch.optim.swa_utils.AveragedModel`` with
  ``get_ema_multi_avg_fn``), ``torch foreach + timm ModelEmaV3``, ``torch fused + ema-pytorch
  EMA``, ``torch fused + diffusers EMAModel`` (``foreach=True``), and
  ``torch.compile(foreach step + foreach_lerp)`` (inductor's generated optimizer + the lerp;
  its first call compiles, in the untimed warm-up; ``--no-compile`` leaves it out);
- ``ek.WithEMA(torch fused)``: ``ek.WithEMA(torch.optim.X(fused=True))``: torch's fused step,
  then ema_kernels' EMA-only launch (what any torch optimizer gets from the wrapper);
- ``copy dst.copy_(src)`` (default on a GPU only; by name with ``--rows`` anywhere): a
  device-to-device copy of the same bytes (read src, write dst), the figure GPU bandwidth is
  usually quoted against;
- ``stream a+=b``: the copy bandwidth the rows are measured against: ``a.add_(b)`` over two
  contiguous fp32 buffers, in place, moving the *same number of bytes* as the step must (reads
  a and b, writes a: 12 B per element) — the device's streaming ceiling at that footprint,
  measured in the same run; ``pct_of_copy`` is a row's GB/s over this one's. Why not
  ``dst.copy_(src)``: on a CPU a copy's destination is read before it is written
  (write-allocate), so a copy moves 12 B for the 8 it is credited with, while in-place updates
  (the optimizer's θ m v ζ, and a += b) pay no such read; on a 2-core EPYC an in-place
  stream reached up to ~1.7x a copy's credited GB/s, so fused in-place steps would show
  "170 % of copy".

Bytes: ``bytes_per_param`` is what the fused step must move per parameter (see
:func:`bytes_per_param`: fp32 AdamW+EMA = 36 B); ``gbps = bytes_per_param · numel / time`` is
then the *effective* bandwidth of every row for the same job, whatever the row actually moves
(the unfused baselines move more; with 16-bit parameters torch keeps its optimizer state and
the baselines their EMA in the parameter dtype, i.e. fewer bytes and less precision than
ema_kernels' fp32 state and EMA).

``--host`` times something else: the host (CPU-side) µs of one ``step()`` call at
:data:`HOST_NUMEL`-element tensors over a sweep of tensor counts (``--tensors K [K ...]``,
default :data:`HOST_TENSORS`), fresh gradients every step; see :func:`run_host`.

Timing: CPU — ``time.perf_counter`` around batches of calls (each sample >= 2 ms), the rows
of a size sampled in turns (round-robin, so a busy machine slows them alike), median per row;
CUDA — ``triton.testing.do_bench`` (median; L2 flushed between calls), CUDA events if triton is
missing. ``ema_every=k``: a timed call is k steps (one with the EMA), reported per step.

Where things are: :mod:`~ema_kernels.bench.cases` (a :class:`Case`, the bytes per parameter,
the row names, the parameters and optimizers rows are built from),
:mod:`~ema_kernels.bench.rows` (how each row is built, which rows a run has),
:mod:`~ema_kernels.bench.peers` (the peer packages' rows), :mod:`~ema_kernels.bench.foreach_rules`
(LARS/LAMB/Lion in foreach ops: their baseline), :mod:`~ema_kernels.bench.timing` (how a row
is timed; :func:`run`), :mod:`~ema_kernels.bench.host` (``--host``),
:mod:`~ema_kernels.bench.report` (table, JSON, plot), :mod:`~ema_kernels.bench.cli` (the flags,
:func:`main`). Every name is re-exported here: ``from ema_kernels import bench; bench.run(...)``.
"""
from __future__ import annotations

from . import foreach_rules, peers
from .cases import (BASELINE, CLIP_BASELINE, CLIP_MAX_NORM, COPY, COPY_D2D, DTYPES, EMA_DECAY,
                    EMA_DECAYS, KEYS, LR, OPTIMIZERS, RULE_BASELINE, RULES, SGD_MOMENTUM,
                    WITH_EMA, Case, _ek_optimizer, _every, _foreach_lerp_emas, _itemsize,
                    _ITEMSIZE, _make_params, _Model, _torch_hparams, _torch_optimizer,
                    bytes_per_param, torch_clip_bytes_per_param)
from .cli import _SUFFIX, _main_host, _parser, _positive_int, default_sizes, main, parse_size
from .host import (_OPT_TITLE, HOST_BASELINE, HOST_KEYS, HOST_NUMEL, HOST_TENSORS,
                   _host_backend, _HostRow, format_host_table, host_repeats, host_row_names,
                   run_host, write_host_plot)
from .report import (_busy_note, _fmt_numel, _json_value, _num, device_description,
                     format_table, write_json, write_plot)
from .rows import (BASELINES, COMPILED, GPU_ROWS, _row_averaged_model, _row_copy, _row_copy_d2d,
                   _row_ek, _row_foreach_rule, _row_fused_clip_lerp, _row_fused_lerp,
                   _row_with_ema, build_row, calls_per_fn, ek_backends, known_row_names,
                   row_names)
from .timing import (INTERLEAVE_MAX_BYTES, _build, _calibrate, _enough, _free, _measure_case,
                     _relative_columns, _sample, _time_cpu, _time_cpu_interleaved, _time_cuda,
                     run)

__all__ = ["bytes_per_param", "torch_clip_bytes_per_param", "main", "run", "Case",
           "row_names", "build_row", "KEYS", "run_host", "host_row_names", "HOST_KEYS"]
