"""Triton backend: the fused optimizer step + EMA update as ``@triton.jit`` kernels.

Same interface and math as :mod:`ema_kernels.backends.reference` (read its docstring): every
element of θ, g, the optimizer state and ζ is read once and written once, in float32 registers
whatever the storage dtype, in the reference's order of operations.

Two entry points share the per-element math (``_adam_math`` / ``_sgd_math``):

- **flat** (the lists hold one tensor, e.g. a flat buffer): one launch, ``BLOCK`` elements per
  program, 64-bit offsets, full blocks unmasked (so accesses vectorise: 16 bytes for fp32,
  8 bytes for bf16/fp16, all streams in one register layout) and a masked tail block.
- **tensor list** (several tensors): a table of int64 addresses per role (θ, g, state..., ζ), the
  tensors' sizes and a chunk table (tensor index, chunk start) built on the host and copied to the
  device in one small transfer (cached by content, so a steady-state step copies nothing), so any
  number of tensors goes in one launch per parameter dtype.  A tensor with an address that is not
  16-byte aligned (an odd-offset view) gets its own flat launch instead.

Per-step values (lr, step size, bias corrections, betas, eps, weight decay, the ρ̂ weights,
momentum, Nesterov, first step, "divide by grad_scale") are runtime arguments; only the flags
that decide which bytes move (how many EMAs are updated this step, 0 to :data:`MAX_EMAS`, all
in the same pass; AMSGrad; momentum), where the lr-dependent values come from
(``DEVICE_SCALARS``) and the parameter dtype are ``tl.constexpr``: 164 kernels per 16-bit dtype
at most (84 for fp32, which has no SR variants), each compiled on first use.  ``grad_scale`` / ``found_inf`` are read inside the kernel (cached
device stand-ins 1.0 / 0.0 when absent): no host sync, and a step with a non-zero ``found_inf``
writes nothing.

``adam_ema_capturable`` / ``sgd_ema_capturable`` (capturable=True, and any step with a tensor
lr) read lr, the step count and the EMA weights on the device, never on the host: the
``DEVICE_SCALARS`` variants load the lr-dependent values from a small float32 device tensor
(Adam: formed from lr and t in double by a few torch ops, as the reference forms them; SGD:
the lr tensor itself) instead of taking them as launch arguments.

bf16 stores round to nearest even by bit manipulation (Triton's interpreter truncates in its
fp32→bf16 cast), so interpreted and compiled kernels round the same way as torch.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (set before this module is
imported), which is how the test-suite checks them without a GPU; ``aot_variants`` /
``aot_compile`` compile every kernel variant ahead of time for a GPU architecture without one.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _sr
from ._emas import MAX_EMAS, ema_lists, ema_lists_capturable

Tensor = torch.Tensor

NAME = "triton"

try:  # importing triton does not touch a device; decorating a kernel compiles nothing
    import triton
    import triton.language as tl
    _IMPORT_ERROR = ""
except Exception as _e:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

# Launch configuration: a fixed choice, no autotuning.  2048 elements per program are 8 KB per
# fp32 stream: 8 elements per thread with 8 warps, as two runs of 4, i.e. two 16-byte accesses
# per fp32 stream (two 8-byte ones per bf16/fp16 stream) per thread, all loads issued before any
# math: 32-192 bytes in flight per thread, 36-116 registers and no spills on sm_80/sm_90
# (see the AOT test).  ``BLOCK`` is read at launch time; tests under the interpreter raise it.
BLOCK = 2048
NUM_WARPS = 8

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TABLE_CACHE_SIZE = 16


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
if triton is not None:
    # Helpers are few on purpose: the interpreter pays ~1 ms per @triton.jit call per program.

    @triton.jit
    def _sr_mix(x):
        """fused_math.h's sr_mix on uint32 (wrapping) values."""
        x = x ^ (x >> 16)
        x = x * 0x21F0AAAD
        x = x ^ (x >> 15)
        x = x * 0x735A2D97
        return x ^ (x >> 15)

    @triton.jit
    def _store_param(p_ptr, offs, theta, mask, sr_start, k0, k1, SR: tl.constexpr):
        """Store θ in the parameter's dtype (round to nearest even, or stochastically with SR);
        return θ as stored, fp32.

        SR (stochastic rounding, bf16/fp16): lane j of the block (offsets ``offs``, consecutive)
        is element index ``sr_start + j`` (the block's first element's index, an int64 scalar)
        and draws the 32 random bits sr_bits((k0, k1), index) of fused_math.h, rounded as
        bf16_round_sr / f16_round_sr round it: the same integer arithmetic, so the same bits as
        every other backend.  The index's halves are formed in 32 bits (the low half wraps,
        its carry bumps the high half): no 64-bit vector, which the 3- and 4-EMA kernels have
        no registers left for."""
        if SR:
            lo0 = sr_start.to(tl.uint32)
            lo = lo0 + tl.arange(0, offs.shape[0]).to(tl.uint32)
            # the high half's term (fused_math.h sr_hi_term) for the block's high half and the
            # next, as scalars; a lane whose low half wrapped takes the second (SrRun)
            hi0 = (sr_start >> 32).to(tl.uint32)
            k1u = k1.to(tl.uint32, bitcast=True)
            h0 = (hi0 * 0x61C88647) ^ k1u
            h1 = ((hi0 + 1) * 0x61C88647) ^ k1u
            r = _sr_mix(lo ^ k0.to(tl.uint32, bitcast=True) ^ tl.where(lo < lo0, h1, h0))
            u = theta.to(tl.uint32, bitcast=True)
            a = u & 0x7FFFFFFF
            if p_ptr.dtype.element_ty == tl.bfloat16:
                res = (u + (r & 0xFFFF)) >> 16
                res = tl.where(a > 0x7F800000, 0x7FC0, res)
                val = res.to(tl.uint16).to(tl.bfloat16, bitcast=True)
                tl.store(p_ptr + offs, val, mask=mask)
                stored = (res << 16).to(tl.float32, bitcast=True)
            else:
                sign = (u >> 16) & 0x8000
                e = a >> 23
                # f16_round_sr's two branches folded into one add-and-shift (the same
                # function, fewer live registers: the 4-EMA AMSGrad kernel spilled on sm_80
                # otherwise): normals add 13 random bits to the rebiased pattern, subnormals
                # sh bits to the significand shifted right by pre
                eff = tl.where(e > 0, e, 1)
                mant = (a & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
                sh_s = 126 - eff  # wraps for e > 126: the normal branch is selected there
                sh = tl.where(sh_s < 31, sh_s, 31)
                pre = tl.where(sh_s - sh < 31, sh_s - sh, 31)
                is_normal = e >= 113
                val = tl.where(is_normal, a - (112 << 23), mant >> pre)
                shift = tl.where(is_normal, 13, sh)
                one = (shift & 0) + 1
                res = (val + (r & ((one << shift) - 1))) >> shift
                res = tl.where(e >= 143, 0x7C00, res)
                res = tl.where(a > 0x7F800000, 0x7E00, res)
                half = (sign | res).to(tl.uint16).to(tl.float16, bitcast=True)
                tl.store(p_ptr + offs, half, mask=mask)
                stored = half.to(tl.float32)
        elif p_ptr.dtype.element_ty == tl.bfloat16:
            bits = theta.to(tl.uint32, bitcast=True)
            lsb = (bits >> 16) & 1
            rounded = (bits + 0x7FFF + lsb) >> 16
            rounded = tl.where(theta != theta, 0x7FC0, rounded)  # NaN stays a quiet NaN
            tl.store(p_ptr + offs, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
            stored = (rounded << 16).to(tl.float32, bitcast=True)
        elif p_ptr.dtype.element_ty == tl.float16:
            half = theta.to(tl.float16)  # cvt.rn on GPUs, numpy's RNE in the interpreter
            tl.store(p_ptr + offs, half, mask=mask)
            stored = half.to(tl.float32)
        else:
            tl.store(p_ptr + offs, theta, mask=mask)
            stored = theta
        return stored

    # Several EMAs: up to MAX_EMAS (4) pointer arguments z0..z3 and weights w0..w3; N_EMAS
    # (constexpr) says how many are real, the others are never touched.  Every ζ_k moves
    # towards the one stored θ with ATen's two-sided lerp (exact at weight 1).

    @triton.jit
    def _adam_math(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs,
                   mask, scale, beta1_w, beta2, beta2_w, eps, decay, l2_wd, grad_sign,
                   neg_step_size, bc2_sqrt, w0, w1, w2, w3, has_scale, sr_start, k0, k1,
                   N_EMAS: tl.constexpr, AMSGRAD: tl.constexpr, SR: tl.constexpr):
        # All loads first: stores cannot be proven not to alias later loads, so issuing the
        # loads up front keeps every stream's requests in flight together.
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=mask)
        if N_EMAS > 0:
            z0 = tl.load(z0_ptr + offs, mask=mask)
        if N_EMAS > 1:
            z1 = tl.load(z1_ptr + offs, mask=mask)
        if N_EMAS > 2:
            z2 = tl.load(z2_ptr + offs, mask=mask)
        if N_EMAS > 3:
            z3 = tl.load(z3_ptr + offs, mask=mask)

        if has_scale != 0:                      # a uniform branch: no division without AMP
            g = tl.div_rn(g, scale)
        g = g * grad_sign                       # ±1: exact negation for maximize
        theta = theta * decay                   # decoupled: 1 − lr·λ; otherwise exactly 1
        if l2_wd != 0.0:
            g = g + l2_wd * theta
        # m.lerp_(g, 1 − β1), ATen's two-sided formula (exact at weight 1)
        diff = g - m
        m = tl.where(tl.abs(beta1_w) < 0.5, m + beta1_w * diff, g - diff * (1.0 - beta1_w))
        v = v * beta2 + (beta2_w * g) * g
        if AMSGRAD:
            vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
            denom = tl.sqrt_rn(vmax)
        else:
            denom = tl.sqrt_rn(v)
        denom = tl.div_rn(denom, bc2_sqrt) + eps
        theta = theta + tl.div_rn(neg_step_size * m, denom)

        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, vmax, mask=mask)
        stored = _store_param(p_ptr, offs, theta, mask, sr_start, k0, k1, SR)
        # ζ_k.lerp_(θ as stored, 1 − ρ̂_k)
        if N_EMAS > 0:
            d = stored - z0
            z0 = tl.where(tl.abs(w0) < 0.5, z0 + w0 * d, stored - d * (1.0 - w0))
            tl.store(z0_ptr + offs, z0, mask=mask)
        if N_EMAS > 1:
            d = stored - z1
            z1 = tl.where(tl.abs(w1) < 0.5, z1 + w1 * d, stored - d * (1.0 - w1))
            tl.store(z1_ptr + offs, z1, mask=mask)
        if N_EMAS > 2:
            d = stored - z2
            z2 = tl.where(tl.abs(w2) < 0.5, z2 + w2 * d, stored - d * (1.0 - w2))
            tl.store(z2_ptr + offs, z2, mask=mask)
        if N_EMAS > 3:
            d = stored - z3
            z3 = tl.where(tl.abs(w3) < 0.5, z3 + w3 * d, stored - d * (1.0 - w3))
            tl.store(z3_ptr + offs, z3, mask=mask)

    @triton.jit
    def _sgd_math(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, scale,
                  grad_sign, weight_decay, momentum, dampening_w, neg_lr, nesterov, first_step,
                  w0, w1, w2, w3, has_scale, sr_start, k0, k1, N_EMAS: tl.constexpr,
                  HAS_MOMENTUM: tl.constexpr, SR: tl.constexpr):
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        if N_EMAS > 0:
            z0 = tl.load(z0_ptr + offs, mask=mask)
        if N_EMAS > 1:
            z1 = tl.load(z1_ptr + offs, mask=mask)
        if N_EMAS > 2:
            z2 = tl.load(z2_ptr + offs, mask=mask)
        if N_EMAS > 3:
            z3 = tl.load(z3_ptr + offs, mask=mask)

        if has_scale != 0:
            g = tl.div_rn(g, scale)
        g = g * grad_sign
        if weight_decay != 0.0:
            g = g + weight_decay * theta
        if HAS_MOMENTUM:
            if first_step != 0:                 # the buffer holds nothing yet: not read
                buf = g
            else:
                buf = tl.load(b_ptr + offs, mask=mask)
                buf = buf * momentum + dampening_w * g
            tl.store(b_ptr + offs, buf, mask=mask)
            if nesterov != 0:
                g = g + momentum * buf
            else:
                g = buf
        theta = theta + neg_lr * g

        stored = _store_param(p_ptr, offs, theta, mask, sr_start, k0, k1, SR)
        if N_EMAS > 0:
            d = stored - z0
            z0 = tl.where(tl.abs(w0) < 0.5, z0 + w0 * d, stored - d * (1.0 - w0))
            tl.store(z0_ptr + offs, z0, mask=mask)
        if N_EMAS > 1:
            d = stored - z1
            z1 = tl.where(tl.abs(w1) < 0.5, z1 + w1 * d, stored - d * (1.0 - w1))
            tl.store(z1_ptr + offs, z1, mask=mask)
        if N_EMAS > 2:
            d = stored - z2
            z2 = tl.where(tl.abs(w2) < 0.5, z2 + w2 * d, stored - d * (1.0 - w2))
            tl.store(z2_ptr + offs, z2, mask=mask)
        if N_EMAS > 3:
            d = stored - z3
            z3 = tl.where(tl.abs(w3) < 0.5, z3 + w3 * d, stored - d * (1.0 - w3))
            tl.store(z3_ptr + offs, z3, mask=mask)

    @triton.jit
    def _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS: tl.constexpr):
        """The EMA weights w_k = 1 − ρ̂_k from the device tensor ``ew_ptr`` (one float32 per
        EMA updated; the launch arguments of the EMAs not updated are kept, never read)."""
        if N_EMAS > 0:
            w0 = tl.load(ew_ptr)
        if N_EMAS > 1:
            w1 = tl.load(ew_ptr + 1)
        if N_EMAS > 2:
            w2 = tl.load(ew_ptr + 2)
        if N_EMAS > 3:
            w3 = tl.load(ew_ptr + 3)
        return w0, w1, w2, w3

    # DEVICE_SCALARS (structural: where the per-step values come from, not what they are): the
    # values that depend on lr, the step count or ρ̂ are loaded from device tensors instead of
    # taken from the launch arguments (capturable=True, a tensor lr: nothing is read on the
    # host, and a replayed CUDA graph uses the tensors' current values).  Adam: ``sc_ptr`` holds
    # float32 [−step_size, √(1 − β2^t), 1 − lr·λ (or 1)], formed on the device in double by
    # _adam_device_scalars as the reference forms them; SGD: ``sc_ptr`` is the float32 lr
    # itself (−lr is exact).  ``ew_ptr``: the EMA weights.

    # Offsets are hinted as runs of 4 contiguous elements: every stream then has 4 elements per
    # thread in ONE register layout (16-byte fp32, 8-byte bf16/fp16 accesses).  Left alone,
    # Triton gives 16-bit streams 8 elements per thread but fp32 stores 4, and converts between
    # the two layouts through shared memory on every store.

    _NO_SPEC = ["n", "nesterov", "first_step", "has_scale", "n_tensors", "n_chunks", "sr_base",
                "k0", "k1"]

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _adam_flat_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr,
                          grad_scale_ptr, found_inf_ptr, n, beta1_w, beta2, beta2_w, eps, decay,
                          l2_wd, grad_sign, neg_step_size, bc2_sqrt, w0, w1, w2, w3, has_scale,
                          sr_base, k0, k1, sc_ptr, ew_ptr, N_EMAS: tl.constexpr,
                          AMSGRAD: tl.constexpr, SR: tl.constexpr, DEVICE_SCALARS: tl.constexpr,
                          BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK   # 64-bit offsets
        offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
        # GradScaler's tensors (or the host's stand-ins), read on the device: no host sync
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            if DEVICE_SCALARS:
                neg_step_size = tl.load(sc_ptr)
                bc2_sqrt = tl.load(sc_ptr + 1)
                decay = tl.load(sc_ptr + 2)
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            if start + BLOCK <= n:  # full block: unmasked, vectorised
                _adam_math(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr,
                           offs, None, scale, beta1_w, beta2, beta2_w, eps, decay, l2_wd,
                           grad_sign, neg_step_size, bc2_sqrt, w0, w1, w2, w3, has_scale,
                           sr_base + start, k0, k1, N_EMAS, AMSGRAD, SR)
            else:
                _adam_math(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr,
                           offs, offs < n, scale, beta1_w, beta2, beta2_w, eps, decay, l2_wd,
                           grad_sign, neg_step_size, bc2_sqrt, w0, w1, w2, w3, has_scale,
                           sr_base + start, k0, k1, N_EMAS, AMSGRAD, SR)

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _sgd_flat_kernel(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, grad_scale_ptr,
                         found_inf_ptr, n, grad_sign, weight_decay, momentum, dampening_w,
                         neg_lr, nesterov, first_step, w0, w1, w2, w3, has_scale, sr_base, k0,
                         k1, sc_ptr, ew_ptr, N_EMAS: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                         SR: tl.constexpr, DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            if DEVICE_SCALARS:
                neg_lr = -tl.load(sc_ptr)
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            if start + BLOCK <= n:
                _sgd_math(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, None, scale,
                          grad_sign, weight_decay, momentum, dampening_w, neg_lr, nesterov,
                          first_step, w0, w1, w2, w3, has_scale, sr_base + start, k0, k1, N_EMAS,
                          HAS_MOMENTUM, SR)
            else:
                _sgd_math(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, offs < n,
                          scale, grad_sign, weight_decay, momentum, dampening_w, neg_lr,
                          nesterov, first_step, w0, w1, w2, w3, has_scale, sr_base + start, k0,
                          k1, N_EMAS, HAS_MOMENTUM, SR)

    @triton.jit
    def _ema_math(p_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, w0, w1, w2, w3,
                  N_EMAS: tl.constexpr):
        theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        if N_EMAS > 0:
            z0 = tl.load(z0_ptr + offs, mask=mask)
        if N_EMAS > 1:
            z1 = tl.load(z1_ptr + offs, mask=mask)
        if N_EMAS > 2:
            z2 = tl.load(z2_ptr + offs, mask=mask)
        if N_EMAS > 3:
            z3 = tl.load(z3_ptr + offs, mask=mask)
        if N_EMAS > 0:
            d = theta - z0
            z0 = tl.where(tl.abs(w0) < 0.5, z0 + w0 * d, theta - d * (1.0 - w0))
            tl.store(z0_ptr + offs, z0, mask=mask)
        if N_EMAS > 1:
            d = theta - z1
            z1 = tl.where(tl.abs(w1) < 0.5, z1 + w1 * d, theta - d * (1.0 - w1))
            tl.store(z1_ptr + offs, z1, mask=mask)
        if N_EMAS > 2:
            d = theta - z2
            z2 = tl.where(tl.abs(w2) < 0.5, z2 + w2 * d, theta - d * (1.0 - w2))
            tl.store(z2_ptr + offs, z2, mask=mask)
        if N_EMAS > 3:
            d = theta - z3
            z3 = tl.where(tl.abs(w3) < 0.5, z3 + w3 * d, theta - d * (1.0 - w3))
            tl.store(z3_ptr + offs, z3, mask=mask)

    @triton.jit(do_not_specialize=["n"])
    def _ema_flat_kernel(p_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, n, w0, w1, w2, w3,
                         N_EMAS: tl.constexpr, BLOCK: tl.constexpr):
        """EMA only (parameters that took no step while the EMA clock ticked): θ read once,
        every ζ_k read and written once."""
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
        if start + BLOCK <= n:  # full block: unmasked, vectorised
            _ema_math(p_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, None, w0, w1, w2, w3, N_EMAS)
        else:
            _ema_math(p_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, offs < n, w0, w1, w2, w3,
                      N_EMAS)

    # Tensor-list kernels.  The table (int64): one row of n_tensors addresses per role, a row of
    # sizes, then n_chunks chunk tensor indices and n_chunks chunk starts (multiples of BLOCK).
    # The host sends only tensors whose addresses are all 16-byte aligned (the others take the
    # flat kernel), so the pointers are hinted 16-byte aligned and the accesses vectorise.

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _adam_list_kernel(table_ptr, n_tensors, n_chunks, grad_scale_ptr, found_inf_ptr,
                          beta1_w, beta2, beta2_w, eps, decay, l2_wd, grad_sign, neg_step_size,
                          bc2_sqrt, w0, w1, w2, w3, has_scale, k0, k1, sc_ptr, ew_ptr,
                          P_DTYPE: tl.constexpr, N_EMAS: tl.constexpr, AMSGRAD: tl.constexpr,
                          SR: tl.constexpr, DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
        # rows: θ, g, m, v, vmax, ζ0, ζ1, ζ2, ζ3, sizes; with SR a row of element-index bases
        # after the chunk rows
        pid = tl.program_id(0)
        t = tl.load(table_ptr + 10 * n_tensors + pid)
        start = tl.multiple_of(tl.load(table_ptr + 10 * n_tensors + n_chunks + pid), BLOCK)
        numel = tl.load(table_ptr + 9 * n_tensors + t)
        sr_base = 0
        if SR:
            sr_base = tl.load(table_ptr + 10 * n_tensors + 2 * n_chunks + t)
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            if DEVICE_SCALARS:
                neg_step_size = tl.load(sc_ptr)
                bc2_sqrt = tl.load(sc_ptr + 1)
                decay = tl.load(sc_ptr + 2)
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            row = table_ptr + t
            p_ptr = tl.multiple_of(
                tl.load(row).to(tl.pointer_type(P_DTYPE)), 16)
            g_ptr = tl.multiple_of(
                tl.load(row + n_tensors).to(tl.pointer_type(P_DTYPE)), 16)
            m_ptr = tl.multiple_of(
                tl.load(row + 2 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            v_ptr = tl.multiple_of(
                tl.load(row + 3 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            vmax_ptr = m_ptr
            if AMSGRAD:
                vmax_ptr = tl.multiple_of(
                    tl.load(row + 4 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            z0_ptr = m_ptr
            z1_ptr = m_ptr
            z2_ptr = m_ptr
            z3_ptr = m_ptr
            if N_EMAS > 0:
                z0_ptr = tl.multiple_of(
                    tl.load(row + 5 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            if N_EMAS > 1:
                z1_ptr = tl.multiple_of(
                    tl.load(row + 6 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            if N_EMAS > 2:
                z2_ptr = tl.multiple_of(
                    tl.load(row + 7 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            if N_EMAS > 3:
                z3_ptr = tl.multiple_of(
                    tl.load(row + 8 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
            if start + BLOCK <= numel:
                _adam_math(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr,
                           offs, None, scale, beta1_w, beta2, beta2_w, eps, decay, l2_wd,
                           grad_sign, neg_step_size, bc2_sqrt, w0, w1, w2, w3, has_scale,
                           sr_base + start, k0, k1, N_EMAS, AMSGRAD, SR)
            else:
                _adam_math(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr,
                           offs, offs < numel, scale, beta1_w, beta2, beta2_w, eps, decay,
                           l2_wd, grad_sign, neg_step_size, bc2_sqrt, w0, w1, w2, w3,
                           has_scale, sr_base + start, k0, k1, N_EMAS, AMSGRAD, SR)

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _sgd_list_kernel(table_ptr, n_tensors, n_chunks, grad_scale_ptr, found_inf_ptr,
                         grad_sign, weight_decay, momentum, dampening_w, neg_lr, nesterov,
                         first_step, w0, w1, w2, w3, has_scale, k0, k1, sc_ptr, ew_ptr,
                         P_DTYPE: tl.constexpr, N_EMAS: tl.constexpr,
                         HAS_MOMENTUM: tl.constexpr, SR: tl.constexpr,
                         DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
        # rows: θ, g, momentum buffer, ζ0, ζ1, ζ2, ζ3, sizes; with SR a row of element-index
        # bases after the chunk rows
        pid = tl.program_id(0)
        t = tl.load(table_ptr + 8 * n_tensors + pid)
        start = tl.multiple_of(tl.load(table_ptr + 8 * n_tensors + n_chunks + pid), BLOCK)
        numel = tl.load(table_ptr + 7 * n_tensors + t)
        sr_base = 0
        if SR:
            sr_base = tl.load(table_ptr + 8 * n_tensors + 2 * n_chunks + t)
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            if DEVICE_SCALARS:
                neg_lr = -tl.load(sc_ptr)
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            row = table_ptr + t
            p_ptr = tl.multiple_of(
                tl.load(row).to(tl.pointer_type(P_DTYPE)), 16)
            g_ptr = tl.multiple_of(
                tl.load(row + n_tensors).to(tl.pointer_type(P_DTYPE)), 16)
            b_ptr = p_ptr
            if HAS_MOMENTUM:
                b_ptr = tl.multiple_of(
                    tl.load(row + 2 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            z0_ptr = p_ptr
            z1_ptr = p_ptr
            z2_ptr = p_ptr
            z3_ptr = p_ptr
            if N_EMAS > 0:
                z0_ptr = tl.multiple_of(
                    tl.load(row + 3 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            if N_EMAS > 1:
                z1_ptr = tl.multiple_of(
                    tl.load(row + 4 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            if N_EMAS > 2:
                z2_ptr = tl.multiple_of(
                    tl.load(row + 5 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            if N_EMAS > 3:
                z3_ptr = tl.multiple_of(
                    tl.load(row + 6 * n_tensors).to(tl.pointer_type(tl.float32)), 16)
            offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
            if start + BLOCK <= numel:
                _sgd_math(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, None, scale,
                          grad_sign, weight_decay, momentum, dampening_w, neg_lr, nesterov,
                          first_step, w0, w1, w2, w3, has_scale, sr_base + start, k0, k1, N_EMAS,
                          HAS_MOMENTUM, SR)
            else:
                _sgd_math(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs,
                          offs < numel, scale, grad_sign, weight_decay, momentum, dampening_w,
                          neg_lr, nesterov, first_step, w0, w1, w2, w3, has_scale,
                          sr_base + start, k0, k1, N_EMAS, HAS_MOMENTUM, SR)


    @triton.jit(do_not_specialize=["n", "sr_base", "k0", "k1"])
    def _sr_round_kernel(x_ptr, out_ptr, n, sr_base, k0, k1, BLOCK: tl.constexpr):
        """Stochastic rounding alone (the kernels' _store_param with SR): for the tests."""
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        _store_param(out_ptr, offs, x, mask, sr_base + start, k0, k1, True)


def sr_round(x: Tensor, dtype: torch.dtype, seed: int, step: int, base: int = 0) -> Tensor:
    """float32 ``x`` rounded stochastically to ``dtype`` (bf16/fp16) by the kernels' code, with
    the bits of (seed, step, base + i): the tests compare it with the other backends."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    k0, k1 = _sr.key(seed, step)
    n = x.numel()
    if n:
        _sr_round_kernel[(triton.cdiv(n, BLOCK),)](x.contiguous(), out, n, base, _as_i32(k0),
                                                    _as_i32(k1), BLOCK=BLOCK)
    return out


# ----------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    """Were the kernels decorated under TRITON_INTERPRET=1 (i.e. do they run on the CPU)?"""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_adam_flat_kernel, InterpretedFunction)


def availability(device_type: str) -> Tuple[bool, str]:
    """``(ok, reason)`` for running the Triton kernels on tensors of ``device_type``."""
    if triton is None:
        return False, (f"triton cannot be imported ({_IMPORT_ERROR}); install it with "
                       f"`pip install triton` (Linux)")
    env = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, ("torch.cuda.is_available() is False (no GPU, or a CPU-only torch "
                           "build); use backend='cpp' or 'reference'")
        if _interpreted():
            return True, (f"triton {triton.__version__} under TRITON_INTERPRET=1: the kernels "
                          f"are interpreted on the host (slow, for tests)")
        return True, f"triton {triton.__version__}"
    if device_type == "cpu":
        if not env:
            return False, ("Triton runs on CPU tensors only under TRITON_INTERPRET=1 (its "
                           "interpreter, a test vehicle); use backend='cpp' or 'reference' "
                           "for CPU tensors")
        if not _interpreted():
            return False, ("TRITON_INTERPRET=1 was set after ema_kernels.backends.triton_kernels "
                           "was imported; set it before importing triton or ema_kernels, or use "
                           "backend='cpp' or 'reference' for CPU tensors")
        return True, (f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): slow, "
                      f"for tests")
    return False, f"Triton does not run on {device_type} tensors; use backend='reference'"


# ----------------------------------------------------------------------------------------------
# Validation and launch helpers
# ----------------------------------------------------------------------------------------------
def _check_lists(what: str, params: Sequence[Tensor], grads: Sequence[Tensor],
                 states: Sequence[Tuple[str, Optional[Sequence[Tensor]]]],
                 grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> torch.device:
    """Cheap structural checks with messages that name the problem; returns the device."""
    if triton is None:
        raise RuntimeError(availability("cuda")[1])
    n = len(params)
    device = params[0].device
    ok, why = availability(device.type)
    if not ok:
        raise RuntimeError(f"{what}: the triton backend cannot run on {device.type} tensors: "
                           f"{why}")
    if len(grads) != n:
        raise ValueError(f"{what}: {n} params but {len(grads)} grads")
    for name, lst in states:
        if lst is not None and len(lst) != n:
            raise ValueError(f"{what}: {n} params but {len(lst)} {name}")
    for i in range(n):
        p, g = params[i], grads[i]
        if p.dtype not in _PARAM_DTYPES:
            if p.dtype == torch.float64:
                raise TypeError(f"{what}: params[{i}] is float64; the triton backend supports "
                                f"float32, bfloat16 and float16 parameters: use "
                                f"backend='reference' for float64")
            raise TypeError(f"{what}: params[{i}] has dtype {p.dtype}; the triton backend "
                            f"supports float32, bfloat16 and float16 parameters")
        if g.dtype != p.dtype:
            raise TypeError(f"{what}: grads[{i}] is {g.dtype} but params[{i}] is {p.dtype}; "
                            f"gradients must have their parameter's dtype")
        numel = p.numel()
        for name, t in (("params", p), ("grads", g)):
            if t.device != device:
                raise ValueError(f"{what}: {name}[{i}] is on {t.device}, params[0] on {device}")
            if not t.is_contiguous():
                raise ValueError(f"{what}: {name}[{i}] is not contiguous")
        if g.numel() != numel:
            raise ValueError(f"{what}: grads[{i}] has {g.numel()} elements, params[{i}] "
                             f"{numel}")
        for name, lst in states:
            if lst is None:
                continue
            s = lst[i]
            if s.dtype != torch.float32:
                raise TypeError(f"{what}: {name}[{i}] is {s.dtype}; optimizer state and EMA "
                                f"must be float32")
            if s.device != device:
                raise ValueError(f"{what}: {name}[{i}] is on {s.device}, params[0] on {device}")
            if not s.is_contiguous():
                raise ValueError(f"{what}: {name}[{i}] is not contiguous")
            if s.numel() != numel:
                raise ValueError(f"{what}: {name}[{i}] has {s.numel()} elements, params[{i}] "
                                 f"{numel}")
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is None:
            continue
        if t.numel() != 1 or t.dtype != torch.float32:
            raise ValueError(f"{what}: {name} must be a one-element float32 tensor, got "
                             f"{tuple(t.shape)} {t.dtype}")
        if t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device}, params on {device}")
    return device


_const_cache: Dict[Tuple[torch.device, float], Tensor] = {}


def _const(device: torch.device, value: float) -> Tensor:
    """A cached one-element float32 tensor (stands in for a missing grad_scale / found_inf)."""
    key = (device, value)
    t = _const_cache.get(key)
    if t is None:
        _refuse_capture("its device constants")
        t = torch.full((1,), value, dtype=torch.float32, device=device)
        _const_cache[key] = t
    return t


def _amp_tensors(device, grad_scale, found_inf):
    """``(has_scale, grad_scale, found_inf)``: cached device stand-ins for absent tensors.

    The kernels always read both scalars (8 bytes per program) and divide only when
    ``has_scale``: one compiled variant serves steps with and without a GradScaler.
    """
    has_scale = grad_scale is not None
    if grad_scale is None:
        grad_scale = _const(device, 1.0)
    if found_inf is None:
        found_inf = _const(device, 0.0)
    return int(has_scale), grad_scale, found_inf


class _DeviceGuard:
    """Launch on the tensors' GPU (Triton launches on the current device)."""

    def __init__(self, device: torch.device):
        self.ctx = None
        if device.type == "cuda" and device.index is not None \
                and device.index != torch.cuda.current_device():
            self.ctx = torch.cuda.device(device.index)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


_table_cache: Dict[tuple, Tuple[Tensor, int]] = {}


def _table(addrs: List[List[int]], numels: List[int], device: torch.device,
           bases: Optional[List[int]] = None):
    """The address / size / chunk table of a tensor-list launch, on ``device``.

    Layout (int64): ``roles × n`` addresses (0 for an absent role), ``n`` sizes, ``C`` chunk
    tensor indices, ``C`` chunk starts (multiples of BLOCK), and with stochastic rounding
    ``n`` element-index bases (``bases``) at the end, where only the SR kernels look.  Built on the host with a few
    vectorised torch ops and sent in one host→device copy; the device table is cached by its
    content (addresses and sizes), so a steady-state step with the same tensors copies nothing.
    """
    flat_addrs = [a for row in addrs for a in row]
    key = (device, BLOCK, tuple(flat_addrs), tuple(numels),
           None if bases is None else tuple(bases))
    hit = _table_cache.get(key)
    if hit is not None:
        return hit
    n = len(numels)
    counts_l = [(k + BLOCK - 1) // BLOCK for k in numels]
    n_chunks = sum(counts_l)  # from the Python ints (int(tensor) is a value read)
    counts = torch.tensor(counts_l, dtype=torch.int64)
    chunk_t = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    chunk_start = (torch.arange(n_chunks, dtype=torch.int64) - first[chunk_t]) * BLOCK
    parts = [torch.tensor(flat_addrs + numels, dtype=torch.int64), chunk_t, chunk_start]
    if bases is not None:
        parts.append(torch.tensor(bases, dtype=torch.int64))
    host = torch.cat(parts)
    if device.type != "cpu":
        _refuse_capture("its pointer tables")
    table = host if device.type == "cpu" else _upload(host, device)
    if len(_table_cache) >= _TABLE_CACHE_SIZE:
        _table_cache.pop(next(iter(_table_cache)))
    _table_cache[key] = hit = (table, n_chunks)
    return hit


_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                  torch.float16: tl.float16}


def _launch(flat_kernel, list_kernel, roles: List[Optional[Sequence[Tensor]]], device,
            grad_scale, found_inf, scalars: dict, flags: dict,
            sr_offsets: Optional[List[int]] = None) -> None:
    """Run the update over ``roles`` = [params, grads, state..., emas] (``None``: role absent).

    One tensor: the flat kernel.  Several: one tensor-list launch per parameter dtype for the
    tensors whose every address is 16-byte aligned (the list kernel assumes it, so its accesses
    vectorise); a tensor with a misaligned address (an odd-offset view) gets its own flat launch.

    ``sr_offsets`` (stochastic rounding on, ``flags["SR"]``): each tensor's element-index base,
    passed to a flat launch as ``sr_base`` and to a list launch in its table.
    """
    params = roles[0]

    def flat(i):
        n = params[i].numel()
        flat_kernel[(triton.cdiv(n, BLOCK),)](
            *[None if r is None else r[i] for r in roles], grad_scale, found_inf, n,
            **scalars, sr_base=sr_offsets[i] if sr_offsets is not None else 0, **flags,
            num_warps=NUM_WARPS)

    with _DeviceGuard(device):
        if len(params) == 1:
            if params[0].numel() > 0:
                flat(0)
            return
        addrs = [None if r is None else [t.data_ptr() for t in r] for r in roles]
        numels = [p.numel() for p in params]
        groups: Dict[torch.dtype, List[int]] = {}
        for i, p in enumerate(params):
            if numels[i] == 0:
                continue
            if all(a is None or a[i] % 16 == 0 for a in addrs):
                groups.setdefault(p.dtype, []).append(i)
            else:
                flat(i)
        for dtype, idx in groups.items():
            if len(idx) == 1:
                flat(idx[0])
                continue
            sub = [[0] * len(idx) if a is None else [a[i] for i in idx] for a in addrs]
            table, n_chunks = _table(sub, [numels[i] for i in idx], device,
                                     None if sr_offsets is None else
                                     [sr_offsets[i] for i in idx])
            list_kernel[(n_chunks,)](table, len(idx), n_chunks, grad_scale, found_inf,
                                     **scalars, P_DTYPE=_TL_DTYPES[dtype], **flags,
                                     num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------------------------
# Backend interface
# ----------------------------------------------------------------------------------------------
def _as_i32(k: int) -> int:
    """A uint32 key as the int32 with its bits (always an i32 launch argument: one kernel
    signature, no respecialisation on the value; the kernel bitcasts it back)."""
    return k - (1 << 32) if k >= (1 << 31) else k


def _sr_scalars(what, params, scalars, on, seed, step, offsets):
    """Add the key arguments k0, k1 to ``scalars``; returns ``(SR flag, offsets or None)``.
    SR is on only for bf16/fp16 parameters (fp32 is stored exactly: the flag costs nothing)."""
    sr = bool(on) and params[0].dtype in (torch.bfloat16, torch.float16)
    k0 = k1 = 0
    if sr:
        _sr.check_args(what, len(params), seed, step, offsets)
        k0, k1 = _sr.key(seed, step)
        if offsets is None:
            offsets = _sr.flat_offsets([p.numel() for p in params])
    scalars["k0"], scalars["k1"] = _as_i32(k0), _as_i32(k1)
    return sr, (list(offsets) if sr else None)


def _ema_roles(what, emas, ema_weight, n):
    """``(z roles, scalars, N_EMAS)``: the EMA lists padded to MAX_EMAS roles with None, the
    weights w0..w3 (0.0 where absent: never read) and the EMA count."""
    lists, weights = ema_lists(emas, ema_weight, n, what)
    pad = MAX_EMAS - len(lists)
    roles = list(lists) + [None] * pad
    ws = dict(zip(("w0", "w1", "w2", "w3"), list(weights) + [0.0] * pad))
    return roles, ws, len(lists)


_NO_WEIGHTS = dict(w0=0.0, w1=0.0, w2=0.0, w3=0.0)  # DEVICE_SCALARS launches: loaded instead


def _ema_roles_capturable(what, emas, ema_weight, n):
    """``(z roles, weights tensor or None, N_EMAS)`` of a capturable call: the EMA lists padded
    to MAX_EMAS roles with None, and the device tensor of weights (one element per EMA)."""
    lists, w = ema_lists_capturable(emas, ema_weight, n, what)
    return list(lists) + [None] * (MAX_EMAS - len(lists)), w, len(lists)


def _device_scalar(what: str, name: str, t: Optional[Tensor], device: torch.device,
                   numel: int) -> Optional[Tensor]:
    """``t`` as the contiguous float32 tensor the kernels load, checked without reading it:
    ``numel`` elements on ``device`` (a kernel cannot read a host tensor, and copying one
    there would be the host round trip capturable=True exists to avoid). ``numel == 0``: no
    EMA this step, ``None``. Converting another float dtype is a device op, never a read."""
    if numel == 0:
        return None
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{what}: {name} must be a floating-point tensor on the parameters' "
                        f"device (the kernels read it there), got {type(t).__name__}"
                        f"{f' of dtype {t.dtype}' if isinstance(t, Tensor) else ''}")
    if t.numel() != numel:
        raise ValueError(f"{what}: {name} must have {numel} element{'s' * (numel != 1)}, got "
                         f"shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{what}: {name} is on {t.device} but the parameters are on {device}; "
                         f"create it on {device} (the kernels read it there, never on the "
                         f"host)")
    return t.detach().reshape(numel).to(torch.float32).contiguous()


def _adam_device_scalars(lr: Tensor, step: Tensor, beta1: float, beta2: float,
                         weight_decay: float, decoupled: bool) -> Tensor:
    """float32 ``[−lr/(1 − β1^t), √(1 − β2^t), 1 − lr·λ (AdamW with λ ≠ 0; else 1)]`` from the
    device tensors ``lr`` and ``step`` (t, float32): the reference's capturable ops, in double
    on the device, so both round the same doubles to float32 (and so does fused_math.h's
    adam_step_values). A few tiny device ops, no host read, nothing created that outlives
    the step (legal inside a CUDA-graph capture: a replay recomputes them)."""
    lr64 = lr.reshape(()).double()
    t = step.reshape(()).double()
    step_size = lr64 / (1.0 - beta1 ** t)
    bc2_sqrt = torch.sqrt(1.0 - beta2 ** t)
    # −x rounds to −float32(x): negating in double first is the same float32 value
    parts = [-step_size, bc2_sqrt]
    parts.append(1.0 - lr64 * weight_decay if decoupled and weight_decay != 0 else
                 torch.ones_like(lr64))  # theta * 1.0 is exact: the kernels multiply anyway
    return torch.stack(parts).to(torch.float32)


def _adam_scalars(lr, beta1, beta2, eps, weight_decay, decoupled, maximize, step_size,
                  bias_correction2_sqrt, ws, has_scale) -> dict:
    # Host scalars as torch forms them (Python doubles); Triton passes them as float32, as
    # torch casts a Python scalar to the float32 compute type of the reference's ops.
    return dict(
        beta1_w=1.0 - beta1, beta2=beta2, beta2_w=1.0 - beta2, eps=eps,
        decay=(1.0 - lr * weight_decay) if (decoupled and weight_decay != 0) else 1.0,
        l2_wd=0.0 if decoupled else weight_decay, grad_sign=-1.0 if maximize else 1.0,
        neg_step_size=-step_size, bc2_sqrt=bias_correction2_sqrt, **ws, has_scale=has_scale,
        sc_ptr=None, ew_ptr=None)


def _sgd_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, ws,
                 has_scale) -> dict:
    return dict(grad_sign=-1.0 if maximize else 1.0, weight_decay=weight_decay,
                momentum=momentum, dampening_w=1.0 - dampening, neg_lr=-lr,
                nesterov=int(bool(nesterov)), first_step=int(bool(first_step)), **ws,
                has_scale=has_scale, sc_ptr=None, ew_ptr=None)


def _refuse_capture(what: str) -> None:
    """Creating a device constant or table inside a CUDA-graph capture would only record it
    (filled on replay, garbage for the eager steps that share the cache) and its host->device
    copy is illegal there: refuse, before anything is launched. (A device query: only asked
    on a cache miss.)"""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"the triton backend would create {what} inside a CUDA-graph capture: run one "
            f"eager step() with the same parameters before capturing (it creates them; the "
            f"captured step reuses them), and capture with capturable=True (its kernels read "
            f"lr, the step count and the EMA weights on the device, so a replay uses their "
            f"current values)")


# Device copies of StepTable pointer tables, by content hash: {(device, hash): (host, device)}.
_dev_tables: Dict[tuple, Tuple[Tensor, Tensor]] = {}


def _upload(host: Tensor, device: torch.device) -> Tensor:
    """A host table's copy on ``device`` without a stream synchronisation: staged through
    pinned memory (a copy from pageable memory waits for the stream), copied non-blocking.
    The caching host allocator keeps the pinned block until the copy has run (it records the
    copy's stream), so dropping the staging tensor here is safe."""
    staged = host.pin_memory()
    return staged.to(device, non_blocking=True)


def _device_table(host: Tensor, key: int, device: torch.device) -> Tensor:
    """``host`` (a StepTable's Triton table) on ``device``: CPU tensors are used as they are;
    on a GPU the copy made the first time this content was seen (compared in full before a
    hit is trusted), marked as used on the current stream (``record_stream``) so that evicting
    it from the cache cannot free memory a kernel on another stream still reads."""
    if device.type == "cpu":
        return host
    hit = _dev_tables.get((device, key))
    # compared as numpy arrays: torch.equal is a value read the step must not make
    if hit is not None and hit[0].shape == host.shape and \
            np.array_equal(hit[0].numpy(), host.numpy()):
        dev = hit[1]
    else:
        _refuse_capture("its pointer tables")
        dev = _upload(host, device)
        if len(_dev_tables) >= _TABLE_CACHE_SIZE:
            _dev_tables.pop(next(iter(_dev_tables)))
        _dev_tables[(device, key)] = (host, dev)
    dev.record_stream(torch.cuda.current_stream(device))
    return dev


def _table_common(dtype, device, ema_weight, grad_scale, found_inf, sr_seed, sr_step):
    """``(weights, n_emas, has_scale, grad_scale, found_inf, SR flag)`` of a StepTable launch;
    the SR key (k0, k1) goes into the weights dict (the kernels' scalar arguments)."""
    weights = tuple(ema_weight or ())
    pad = MAX_EMAS - len(weights)
    ws = dict(zip(("w0", "w1", "w2", "w3"), list(weights) + [0.0] * pad))
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    sr = sr_seed is not None and dtype in (torch.bfloat16, torch.float16)
    k0, k1 = _sr.key(sr_seed, sr_step) if sr else (0, 0)
    ws["k0"], ws["k1"] = _as_i32(k0), _as_i32(k1)
    return ws, len(weights), has_scale, grad_scale, found_inf, sr


def _launch_table(kernel, table, state_rows, dtype, device, n_emas, sr, grad_scale, found_inf,
                  scalars, **flags):
    """One list-kernel launch over a StepTable's pointer table (``state_rows`` state rows:
    Adam 3, SGD 1); ``flags`` the kernel's own structural constexprs."""
    host, n_chunks, key = table.triton_table(state_rows, n_emas, BLOCK, sr)
    if n_chunks == 0:
        return
    with _DeviceGuard(device):
        kernel[(n_chunks,)](_device_table(host, key, device), len(table), n_chunks, grad_scale,
                            found_inf, **scalars, P_DTYPE=_TL_DTYPES[dtype], N_EMAS=n_emas,
                            SR=sr, DEVICE_SCALARS=False, BLOCK=BLOCK, num_warps=NUM_WARPS,
                            **flags)


def adam_ema_table(table, dtype: torch.dtype, device: torch.device, *, amsgrad: bool,
                   lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   decoupled: bool, maximize: bool, step_size: float,
                   bias_correction2_sqrt: float, ema_weight, grad_scale=None, found_inf=None,
                   sr_seed: Optional[int] = None, sr_step: int = 0) -> None:
    """:func:`adam_ema` over a prepared StepTable (csrc/step_table.cpp, kernels='triton'):
    its pointer table comes from C++ and is cached on the device by content, so the host does
    no per-tensor work. One list launch (every address was checked 16-byte aligned)."""
    ws, n_emas, has_scale, gs, fi, sr = _table_common(dtype, device, ema_weight, grad_scale,
                                                      found_inf, sr_seed, sr_step)
    scalars = _adam_scalars(lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                            step_size, bias_correction2_sqrt, ws, has_scale)
    _launch_table(_adam_list_kernel, table, 3, dtype, device, n_emas, sr, gs, fi, scalars,
                  AMSGRAD=bool(amsgrad))


def sgd_ema_table(table, dtype: torch.dtype, device: torch.device, *, lr: float,
                  momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                  maximize: bool, first_step: bool, ema_weight, grad_scale=None,
                  found_inf=None, sr_seed: Optional[int] = None, sr_step: int = 0) -> None:
    """:func:`sgd_ema` over a prepared StepTable (see :func:`adam_ema_table`)."""
    ws, n_emas, has_scale, gs, fi, sr = _table_common(dtype, device, ema_weight, grad_scale,
                                                      found_inf, sr_seed, sr_step)
    scalars = _sgd_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize,
                           first_step, ws, has_scale)
    _launch_table(_sgd_list_kernel, table, 1, dtype, device, n_emas, sr, gs, fi, scalars,
                  HAS_MOMENTUM=momentum != 0)


def adam_ema(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
             exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
             emas: Optional[List[Tensor]], *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, decoupled: bool, maximize: bool, step_size: float,
             bias_correction2_sqrt: float, ema_weight: Optional[float],
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, sr_seed: int = 0, sr_step: int = 0,
             sr_offsets: Optional[List[int]] = None) -> None:
    """Adam / AdamW step followed by the EMA update(s) (see the reference backend's docstring)."""
    if len(params) == 0:
        return
    z_roles, ws, n_emas = _ema_roles("adam_ema", emas, ema_weight, len(params))
    device = _check_lists("adam_ema", params, grads,
                          [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                           ("max_exp_avg_sqs", max_exp_avg_sqs)] +
                          [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in
                           enumerate(z_roles)],
                          grad_scale, found_inf)
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    scalars = _adam_scalars(lr, beta1, beta2, eps, weight_decay, decoupled, maximize,
                            step_size, bias_correction2_sqrt, ws, has_scale)
    sr_flag, sr_offsets = _sr_scalars("adam_ema", params, scalars, stochastic_rounding, sr_seed,
                                      sr_step, sr_offsets)
    flags = dict(N_EMAS=n_emas, AMSGRAD=max_exp_avg_sqs is not None, SR=sr_flag,
                 DEVICE_SCALARS=False, BLOCK=BLOCK)
    _launch(_adam_flat_kernel, _adam_list_kernel,
            [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs] + z_roles, device,
            grad_scale, found_inf, scalars, flags, sr_offsets)


def sgd_ema(params: List[Tensor], grads: List[Tensor], momentum_buffers: Optional[List[Tensor]],
            emas: Optional[List[Tensor]], *, lr: float, momentum: float, dampening: float,
            weight_decay: float, nesterov: bool, maximize: bool, first_step: bool,
            ema_weight: Optional[float], grad_scale: Optional[Tensor] = None,
            found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
            sr_seed: int = 0, sr_step: int = 0, sr_offsets: Optional[List[int]] = None) -> None:
    """SGD step followed by the EMA update(s) (see the reference backend's docstring)."""
    if len(params) == 0:
        return
    z_roles, ws, n_emas = _ema_roles("sgd_ema", emas, ema_weight, len(params))
    has_momentum = momentum != 0
    if has_momentum and momentum_buffers is None:
        raise ValueError("sgd_ema: momentum is non-zero but momentum_buffers is None")
    momentum_buffers = momentum_buffers if has_momentum else None
    device = _check_lists("sgd_ema", params, grads,
                          [("momentum_buffers", momentum_buffers)] +
                          [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in
                           enumerate(z_roles)],
                          grad_scale, found_inf)
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    scalars = _sgd_scalars(lr, momentum, dampening, weight_decay, nesterov, maximize,
                           first_step, ws, has_scale)
    sr_flag, sr_offsets = _sr_scalars("sgd_ema", params, scalars, stochastic_rounding, sr_seed,
                                      sr_step, sr_offsets)
    flags = dict(N_EMAS=n_emas, HAS_MOMENTUM=has_momentum, SR=sr_flag, DEVICE_SCALARS=False,
                 BLOCK=BLOCK)
    _launch(_sgd_flat_kernel, _sgd_list_kernel, [params, grads, momentum_buffers] + z_roles,
            device, grad_scale, found_inf, scalars, flags, sr_offsets)


def adam_ema_capturable(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                        exp_avg_sqs: List[Tensor], max_exp_avg_sqs: Optional[List[Tensor]],
                        emas: Optional[List[Tensor]], *, lr: Tensor, step: Tensor,
                        beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled: bool, maximize: bool, ema_weight: Optional[Tensor],
                        grad_scale: Optional[Tensor] = None,
                        found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
                        sr_seed: int = 0, sr_step: int = 0,
                        sr_offsets: Optional[List[int]] = None) -> None:
    """Adam / AdamW + EMA reading ``lr``, ``step`` (t, already incremented) and ``ema_weight``
    (1 − ρ̂, one float32 element per EMA, or None) from one-element tensors on the parameters'
    device: nothing is read on the host, so the call can be captured in a CUDA graph and a
    replay uses the tensors' current values.

    The bias corrections and the decoupled decay 1 − lr·λ are formed on the device in double,
    with the reference's torch ops (:func:`_adam_device_scalars`), and the kernels load them
    (their ``DEVICE_SCALARS`` variants); the stochastic-rounding key comes from the host's
    ``sr_step`` (a device lr with a host step count; capturable=True refuses SR)."""
    if len(params) == 0:
        return
    what = "adam_ema_capturable"
    z_roles, ew, n_emas = _ema_roles_capturable(what, emas, ema_weight, len(params))
    device = _check_lists(what, params, grads,
                          [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                           ("max_exp_avg_sqs", max_exp_avg_sqs)] +
                          [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in
                           enumerate(z_roles)],
                          grad_scale, found_inf)
    lr, step, ew = (_device_scalar(what, name, t, device, numel) for name, t, numel in
                    (("lr", lr, 1), ("step", step, 1), ("ema_weight", ew, n_emas)))
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    # the host arguments these replace are placeholders (never read by DEVICE_SCALARS kernels)
    scalars = _adam_scalars(0.0, beta1, beta2, eps, weight_decay, decoupled, maximize, 0.0, 1.0,
                            _NO_WEIGHTS, has_scale)
    scalars.update(sc_ptr=_adam_device_scalars(lr, step, beta1, beta2, weight_decay,
                                               decoupled), ew_ptr=ew)
    sr_flag, sr_offsets = _sr_scalars(what, params, scalars, stochastic_rounding, sr_seed,
                                      sr_step, sr_offsets)
    flags = dict(N_EMAS=n_emas, AMSGRAD=max_exp_avg_sqs is not None, SR=sr_flag,
                 DEVICE_SCALARS=True, BLOCK=BLOCK)
    _launch(_adam_flat_kernel, _adam_list_kernel,
            [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs] + z_roles, device,
            grad_scale, found_inf, scalars, flags, sr_offsets)


def sgd_ema_capturable(params: List[Tensor], grads: List[Tensor],
                       momentum_buffers: Optional[List[Tensor]], emas: Optional[List[Tensor]], *,
                       lr: Tensor, momentum: float, dampening: float, weight_decay: float,
                       nesterov: bool, maximize: bool, first_step: bool,
                       ema_weight: Optional[Tensor], grad_scale: Optional[Tensor] = None,
                       found_inf: Optional[Tensor] = None, stochastic_rounding: bool = False,
                       sr_seed: int = 0, sr_step: int = 0,
                       sr_offsets: Optional[List[int]] = None) -> None:
    """SGD + EMA reading ``lr`` and ``ema_weight`` (1 − ρ̂, one float32 element per EMA, or
    None) from tensors on the parameters' device, never on the host: the kernels load the
    float32 lr itself (−lr is exact) and the weights, so no device op runs before the launch."""
    if len(params) == 0:
        return
    what = "sgd_ema_capturable"
    z_roles, ew, n_emas = _ema_roles_capturable(what, emas, ema_weight, len(params))
    has_momentum = momentum != 0
    if has_momentum and momentum_buffers is None:
        raise ValueError(f"{what}: momentum is non-zero but momentum_buffers is None")
    momentum_buffers = momentum_buffers if has_momentum else None
    device = _check_lists(what, params, grads,
                          [("momentum_buffers", momentum_buffers)] +
                          [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in
                           enumerate(z_roles)],
                          grad_scale, found_inf)
    lr, ew = (_device_scalar(what, name, t, device, numel) for name, t, numel in
              (("lr", lr, 1), ("ema_weight", ew, n_emas)))
    has_scale, grad_scale, found_inf = _amp_tensors(device, grad_scale, found_inf)
    scalars = _sgd_scalars(0.0, momentum, dampening, weight_decay, nesterov, maximize,
                           first_step, _NO_WEIGHTS, has_scale)
    scalars.update(sc_ptr=lr, ew_ptr=ew)
    sr_flag, sr_offsets = _sr_scalars(what, params, scalars, stochastic_rounding, sr_seed,
                                      sr_step, sr_offsets)
    flags = dict(N_EMAS=n_emas, HAS_MOMENTUM=has_momentum, SR=sr_flag, DEVICE_SCALARS=True,
                 BLOCK=BLOCK)
    _launch(_sgd_flat_kernel, _sgd_list_kernel, [params, grads, momentum_buffers] + z_roles,
            device, grad_scale, found_inf, scalars, flags, sr_offsets)


def ema_only(params: List[Tensor], emas: List[Tensor], ema_weight: float) -> None:
    """ζ_k += w_k (θ − ζ_k) for parameters that took no optimizer step but whose EMA clock
    ticked: one flat launch per parameter, θ read once for all its EMAs.  (This path serves
    only the parameters without a gradient on a step, so it has no tensor-list kernel.)"""
    if not params:
        return
    z_roles, ws, n_emas = _ema_roles("ema_only", emas, ema_weight, len(params))
    if n_emas == 0:
        raise ValueError("ema_only: ema_weight is None; give one weight per EMA list")
    device = _check_lists("ema_only", params, params,
                          [(f"emas[{k}]" if n_emas > 1 else "emas", z) for k, z in
                           enumerate(z_roles)], None, None)
    with _DeviceGuard(device):
        for i, p in enumerate(params):
            n = p.numel()
            if n == 0:
                continue
            _ema_flat_kernel[(triton.cdiv(n, BLOCK),)](
                p, *[None if z is None else z[i] for z in z_roles], n, **ws, N_EMAS=n_emas,
                BLOCK=BLOCK, num_warps=NUM_WARPS)


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): every kernel variant the launchers can produce
# ----------------------------------------------------------------------------------------------
_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_variants():
    """Yield ``(label, kernel, signature, constexprs, attrs)`` for every kernel variant the
    launchers can produce, but DEVICE_SCALARS only for the EMA counts that cover its prologue.

    Variants: parameter dtype x {flat, list} x {AdamW/Adam, SGD} x the structural constexprs
    (the number of EMAs updated, 0..MAX_EMAS; AMSGrad or momentum; stochastic rounding for
    16-bit parameters; DEVICE_SCALARS, the capturable kernels, for the EMA counts in
    ``_AOT_DEVICE_SCALAR_EMAS``), and the EMA-only flat kernel for 1..MAX_EMAS EMAs.  Flat
    kernels get the 16-byte pointer alignment the JIT specialises on for ordinary (allocator-
    or flat-buffer-aligned) tensors; list kernels hint it themselves.
    """
    import itertools
    adam_scalars = ("beta1_w", "beta2", "beta2_w", "eps", "decay", "l2_wd", "grad_sign",
                    "neg_step_size", "bc2_sqrt", "w0", "w1", "w2", "w3")
    sgd_scalars = ("grad_sign", "weight_decay", "momentum", "dampening_w", "neg_lr")
    counts = range(MAX_EMAS + 1)

    def zs(k):
        return {f"z{j}_ptr": "*fp32" if j < k else "constexpr" for j in range(MAX_EMAS)}

    def device(dev, k):
        # the device-scalar pointers: absent (constexpr None) on host-scalar variants, and
        # the EMA weights' pointer absent where no EMA is updated
        return dict(sc_ptr="*fp32" if dev else "constexpr",
                    ew_ptr="*fp32" if dev and k > 0 else "constexpr")

    for dtype in _PARAM_DTYPES:
        pt, ty = "*" + _TY[dtype], _TY[dtype]
        amp = {"grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
        # stochastic rounding: a variant for 16-bit parameters only (fp32 never rounds)
        srs = (False, True) if dtype != torch.float32 else (False,)
        for ams, k, sr, dev in itertools.product((False, True), counts, srs, (False, True)):
            if dev and k not in _AOT_DEVICE_SCALAR_EMAS:
                continue
            flags = dict(N_EMAS=k, AMSGRAD=ams, SR=sr, DEVICE_SCALARS=dev, BLOCK=BLOCK)
            tail = dict({s: "fp32" for s in adam_scalars}, has_scale="i32", k0="i32",
                        k1="i32", **device(dev, k))
            tag = f"{_sr_tag(sr)}{_device_tag(dev)}"
            sig = dict(p_ptr=pt, g_ptr=pt, m_ptr="*fp32", v_ptr="*fp32",
                       vmax_ptr="*fp32" if ams else "constexpr", **zs(k), **amp, n="i32",
                       **tail, sr_base="i64")
            yield _variant(f"adam_flat[{ty},emas={k},amsgrad={ams}{tag}]",
                           _adam_flat_kernel, sig, flags)
            sig = dict(table_ptr="*i64", n_tensors="i32", n_chunks="i32", **amp, **tail)
            yield _variant(f"adam_list[{ty},emas={k},amsgrad={ams}{tag}]",
                           _adam_list_kernel, sig, dict(flags, P_DTYPE=_TL_DTYPES[dtype]))
        for mom, k, sr, dev in itertools.product((False, True), counts, srs, (False, True)):
            if dev and k not in _AOT_DEVICE_SCALAR_EMAS:
                continue
            flags = dict(N_EMAS=k, HAS_MOMENTUM=mom, SR=sr, DEVICE_SCALARS=dev, BLOCK=BLOCK)
            tail = dict({s: "fp32" for s in sgd_scalars}, nesterov="i32", first_step="i32",
                        w0="fp32", w1="fp32", w2="fp32", w3="fp32", has_scale="i32", k0="i32",
                        k1="i32", **device(dev, k))
            tag = f"{_sr_tag(sr)}{_device_tag(dev)}"
            sig = dict(p_ptr=pt, g_ptr=pt, b_ptr="*fp32" if mom else "constexpr", **zs(k),
                       **amp, n="i32", **tail, sr_base="i64")
            yield _variant(f"sgd_flat[{ty},emas={k},momentum={mom}{tag}]",
                           _sgd_flat_kernel, sig, flags)
            sig = dict(table_ptr="*i64", n_tensors="i32", n_chunks="i32", **amp, **tail)
            yield _variant(f"sgd_list[{ty},emas={k},momentum={mom}{tag}]",
                           _sgd_list_kernel, sig, dict(flags, P_DTYPE=_TL_DTYPES[dtype]))
        for k in range(1, MAX_EMAS + 1):
            sig = dict(p_ptr=pt, **zs(k), n="i32", w0="fp32", w1="fp32", w2="fp32", w3="fp32")
            yield _variant(f"ema_flat[{ty},emas={k}]", _ema_flat_kernel, sig,
                           dict(N_EMAS=k, BLOCK=BLOCK))


def _sr_tag(sr: bool) -> str:
    """A stochastic-rounding variant's label suffix (the others keep their labels)."""
    return ",sr=True" if sr else ""


def _device_tag(dev: bool) -> str:
    """A DEVICE_SCALARS variant's label suffix (the host-scalar ones keep their labels)."""
    return ",device_scalars=True" if dev else ""


# The EMA counts whose DEVICE_SCALARS variants aot_variants yields.  A DEVICE_SCALARS variant
# differs from its host-scalar twin (always compiled) only in its scalar prologue, whose one
# dependence on N_EMAS is how many weights it loads; 0 (no weight pointer), 1 (the default
# configuration) and MAX_EMAS (every weight, the most registers) cover that, over every other
# axis (dtype, AMSGrad / momentum, SR, flat / list), at 3/5 of the compile time that all five
# counts would add to the AOT tests (~1 s per variant and architecture).
_AOT_DEVICE_SCALAR_EMAS = (0, 1, MAX_EMAS)


def _variant(label, kernel, sig, flags):
    """Complete a signature: absent pointers are constexpr None, flags constexpr values."""
    const = {k: None for k, v in sig.items() if v == "constexpr"}
    const.update(flags)
    sig = dict(sig, **{k: "constexpr" for k in flags})
    missing = set(kernel.arg_names) - set(sig)
    assert not missing, (label, missing)
    return label, kernel, sig, const, _aligned_attrs(kernel, sig)


def _aligned_attrs(kernel, sig):
    """16-byte divisibility for every pointer argument (what the JIT infers for aligned data)."""
    return {(kernel.arg_names.index(k),): [["tt.divisibility", 16]]
            for k, v in sig.items() if v.startswith("*")}


def aot_compile(kernel, signature, constexprs, attrs, arch: int = 90):
    """Compile one variant for ``sm_<arch>`` without a GPU; returns triton's CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    ordered = {k: signature[k] for k in kernel.arg_names}
    src = ASTSource(kernel, ordered, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": NUM_WARPS})
