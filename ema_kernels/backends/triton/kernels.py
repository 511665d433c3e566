"""The Triton backend's ``@triton.jit`` kernels: the fused AdamW/Adam and SGD steps with their
EMA updates (flat and tensor-list entry points), the EMA-only kernel and stochastic rounding.

Launched by :mod:`.launch`; compiled ahead of time by :mod:`.aot`.  Nothing here runs or
compiles at import (``@triton.jit`` only wraps the functions).
"""
from __future__ import annotations

from .config import tl, triton

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
    # towards the one stored θ with ATen's two-sided lerp (exact at weight 1).  Every kernel
    # issues all its loads before any math (stores cannot be proven not to alias later loads,
    # so loads issued up front keep every stream's requests in flight together): the EMAs are
    # loaded by _load_emas at the top and moved by _store_emas at the end.

    @triton.jit
    def _lerp(a, b, w):
        """``a.lerp_(b, w)``: ATen's two-sided formula (exact at w = 1)."""
        d = b - a
        return tl.where(tl.abs(w) < 0.5, a + w * d, b - d * (1.0 - w))

    @triton.jit
    def _load_emas(z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, like, N_EMAS: tl.constexpr):
        """ζ_0..ζ_{N_EMAS-1} (``like`` for the others: never used)."""
        z0 = like
        z1 = like
        z2 = like
        z3 = like
        if N_EMAS > 0:
            z0 = tl.load(z0_ptr + offs, mask=mask)
        if N_EMAS > 1:
            z1 = tl.load(z1_ptr + offs, mask=mask)
        if N_EMAS > 2:
            z2 = tl.load(z2_ptr + offs, mask=mask)
        if N_EMAS > 3:
            z3 = tl.load(z3_ptr + offs, mask=mask)
        return z0, z1, z2, z3

    @triton.jit
    def _store_emas(theta, z0, z1, z2, z3, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, w0, w1,
                    w2, w3, N_EMAS: tl.constexpr):
        """ζ_k.lerp_(θ as stored, w_k) for the N_EMAS EMAs, stored."""
        if N_EMAS > 0:
            tl.store(z0_ptr + offs, _lerp(z0, theta, w0), mask=mask)
        if N_EMAS > 1:
            tl.store(z1_ptr + offs, _lerp(z1, theta, w1), mask=mask)
        if N_EMAS > 2:
            tl.store(z2_ptr + offs, _lerp(z2, theta, w2), mask=mask)
        if N_EMAS > 3:
            tl.store(z3_ptr + offs, _lerp(z3, theta, w3), mask=mask)

    @triton.jit
    def _unscaled(g, scale, has_scale, grad_sign):
        """The gradient unscaled (GradScaler's scale, a uniform branch: no division without
        AMP) and negated for maximize (±1: exact)."""
        if has_scale != 0:
            g = tl.div_rn(g, scale)
        return g * grad_sign

    @triton.jit
    def _moments(g, m, v, beta1_w, beta2, beta2_w):
        """Adam's moments as torch forms them: ``m.lerp_(g, 1 − β1)``,
        ``v.mul_(β2).addcmul_(g, g, value=1 − β2)``."""
        return _lerp(m, g, beta1_w), v * beta2 + (beta2_w * g) * g

    @triton.jit
    def _adam_math(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs,
                   mask, scale, beta1_w, beta2, beta2_w, eps, decay, l2_wd, grad_sign,
                   neg_step_size, bc2_sqrt, w0, w1, w2, w3, has_scale, sr_start, k0, k1,
                   N_EMAS: tl.constexpr, AMSGRAD: tl.constexpr, SR: tl.constexpr):
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=mask)
        z0, z1, z2, z3 = _load_emas(z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, m, N_EMAS)

        g = _unscaled(g, scale, has_scale, grad_sign)
        theta = theta * decay                   # decoupled: 1 − lr·λ; otherwise exactly 1
        if l2_wd != 0.0:
            g = g + l2_wd * theta
        m, v = _moments(g, m, v, beta1_w, beta2, beta2_w)
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
        _store_emas(stored, z0, z1, z2, z3, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, w0, w1,
                    w2, w3, N_EMAS)

    @triton.jit
    def _sgd_math(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, scale,
                  grad_sign, weight_decay, ratio, momentum, dampening_w, neg_lr, nesterov,
                  first_step, w0, w1, w2, w3, has_scale, sr_start, k0, k1, N_EMAS: tl.constexpr,
                  HAS_MOMENTUM: tl.constexpr, TRUST: tl.constexpr, SR: tl.constexpr):
        """SGD, and LARS (``TRUST``: the direction g + λθ times the tensor's trust ratio
        before the momentum, Lightning Bolts' order)."""
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        z0, z1, z2, z3 = _load_emas(z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, theta, N_EMAS)

        g = _unscaled(g, scale, has_scale, grad_sign)
        if weight_decay != 0.0:
            g = g + weight_decay * theta
        if TRUST:
            g = g * ratio
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
        _store_emas(stored, z0, z1, z2, z3, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, w0, w1,
                    w2, w3, N_EMAS)

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
        sr_start = sr_base + start
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
                           sr_start, k0, k1, N_EMAS, AMSGRAD, SR)
            else:
                _adam_math(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr,
                           offs, offs < n, scale, beta1_w, beta2, beta2_w, eps, decay, l2_wd,
                           grad_sign, neg_step_size, bc2_sqrt, w0, w1, w2, w3, has_scale,
                           sr_start, k0, k1, N_EMAS, AMSGRAD, SR)

    # LARS is SGD with TRUST: ``coefs_ptr`` holds the tensor's (trust ratio, weight decay)
    # (flat: the caller's row for this tensor; list: the (n, 2) tensor, indexed by the table's
    # per-tensor position row), replacing the ``weight_decay`` argument.

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _sgd_flat_kernel(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, grad_scale_ptr,
                         found_inf_ptr, n, grad_sign, weight_decay, momentum, dampening_w,
                         neg_lr, nesterov, first_step, w0, w1, w2, w3, has_scale, sr_base, k0,
                         k1, sc_ptr, ew_ptr, coefs_ptr, N_EMAS: tl.constexpr,
                         HAS_MOMENTUM: tl.constexpr, TRUST: tl.constexpr, SR: tl.constexpr,
                         DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        sr_start = sr_base + start
        offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            if DEVICE_SCALARS:
                neg_lr = -tl.load(sc_ptr)
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            ratio = 1.0
            if TRUST:
                ratio = tl.load(coefs_ptr)
                weight_decay = tl.load(coefs_ptr + 1)
            if start + BLOCK <= n:
                _sgd_math(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, None, scale,
                          grad_sign, weight_decay, ratio, momentum, dampening_w, neg_lr,
                          nesterov, first_step, w0, w1, w2, w3, has_scale, sr_start, k0,
                          k1, N_EMAS, HAS_MOMENTUM, TRUST, SR)
            else:
                _sgd_math(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, offs < n,
                          scale, grad_sign, weight_decay, ratio, momentum, dampening_w, neg_lr,
                          nesterov, first_step, w0, w1, w2, w3, has_scale, sr_start, k0,
                          k1, N_EMAS, HAS_MOMENTUM, TRUST, SR)

    @triton.jit
    def _ema_math(p_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, w0, w1, w2, w3,
                  N_EMAS: tl.constexpr):
        theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        z0, z1, z2, z3 = _load_emas(z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, theta, N_EMAS)
        _store_emas(theta, z0, z1, z2, z3, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, w0, w1,
                    w2, w3, N_EMAS)

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
    #
    # Persistent grid (issue 24 §2): program p runs chunks p, p + P, p + 2P, ... (P programs,
    # a whole number of resident waves, sized by grid.py), so a launch of any size is one wave
    # of long-lived programs instead of a queue of short ones; a chunk's work does not depend on
    # the program that runs it, so every grid gives the same bits.

    # Table indices are formed in 32 bits (tensor index + row offset) before they meet the
    # 64-bit table pointer: the loop-invariant row offsets then cost one register each across
    # the persistent loop instead of a 64-bit byte offset each (the fp16 AMSGrad SR 3-EMA
    # kernel spilled on sm_80 otherwise).

    @triton.jit
    def _chunk(table_ptr, roles, n_tensors, n_chunks, c, SR: tl.constexpr, BLOCK: tl.constexpr):
        """Chunk ``c`` of a list launch over a table of ``roles`` address rows: (tensor index
        t, the chunk's first element, t's size, the element index of the chunk's first element
        for stochastic rounding: t's base from the SR row plus the start, or just the start)."""
        chunk_rows = (roles + 1) * n_tensors
        t = tl.load(table_ptr + (chunk_rows + c)).to(tl.int32)
        start = tl.multiple_of(tl.load(table_ptr + (chunk_rows + n_chunks + c)), BLOCK)
        sr_start = start
        if SR:
            sr_start += tl.load(table_ptr + (chunk_rows + 2 * n_chunks + t))
        return t, start, tl.load(table_ptr + (roles * n_tensors + t)), sr_start

    @triton.jit
    def _role(table_ptr, t, k, n_tensors, DTYPE: tl.constexpr):
        """Role ``k``'s address of table column ``t``, as a 16-byte aligned ``DTYPE`` pointer
        (the host checked the alignment)."""
        return tl.multiple_of(tl.load(table_ptr + (t + k * n_tensors)).to(
            tl.pointer_type(DTYPE)), 16)

    @triton.jit
    def _ema_roles(table_ptr, t, first, n_tensors, like, N_EMAS: tl.constexpr):
        """The ζ pointers of table column ``t`` (rows ``first`` ..), ``like`` where the EMA is
        absent (never dereferenced)."""
        z0_ptr = like
        z1_ptr = like
        z2_ptr = like
        z3_ptr = like
        if N_EMAS > 0:
            z0_ptr = _role(table_ptr, t, first, n_tensors, tl.float32)
        if N_EMAS > 1:
            z1_ptr = _role(table_ptr, t, first + 1, n_tensors, tl.float32)
        if N_EMAS > 2:
            z2_ptr = _role(table_ptr, t, first + 2, n_tensors, tl.float32)
        if N_EMAS > 3:
            z3_ptr = _role(table_ptr, t, first + 3, n_tensors, tl.float32)
        return z0_ptr, z1_ptr, z2_ptr, z3_ptr

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _adam_list_kernel(table_ptr, n_tensors, n_chunks, grad_scale_ptr, found_inf_ptr,
                          beta1_w, beta2, beta2_w, eps, decay, l2_wd, grad_sign, neg_step_size,
                          bc2_sqrt, w0, w1, w2, w3, has_scale, k0, k1, sc_ptr, ew_ptr,
                          P_DTYPE: tl.constexpr, N_EMAS: tl.constexpr, AMSGRAD: tl.constexpr,
                          SR: tl.constexpr, DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
        # rows: θ, g, m, v, vmax, ζ0, ζ1, ζ2, ζ3, sizes; with SR a row of element-index bases
        # after the chunk rows
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            if DEVICE_SCALARS:
                neg_step_size = tl.load(sc_ptr)
                bc2_sqrt = tl.load(sc_ptr + 1)
                decay = tl.load(sc_ptr + 2)
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
                t, start, numel, sr_start = _chunk(table_ptr, 9, n_tensors, n_chunks, c, SR,
                                                   BLOCK)
                p_ptr = _role(table_ptr, t, 0, n_tensors, P_DTYPE)
                g_ptr = _role(table_ptr, t, 1, n_tensors, P_DTYPE)
                m_ptr = _role(table_ptr, t, 2, n_tensors, tl.float32)
                v_ptr = _role(table_ptr, t, 3, n_tensors, tl.float32)
                vmax_ptr = m_ptr
                if AMSGRAD:
                    vmax_ptr = _role(table_ptr, t, 4, n_tensors, tl.float32)
                z0_ptr, z1_ptr, z2_ptr, z3_ptr = _ema_roles(table_ptr, t, 5, n_tensors, m_ptr,
                                                              N_EMAS)
                offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
                if start + BLOCK <= numel:
                    _adam_math(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, z0_ptr, z1_ptr, z2_ptr,
                               z3_ptr, offs, None, scale, beta1_w, beta2, beta2_w, eps, decay,
                               l2_wd, grad_sign, neg_step_size, bc2_sqrt, w0, w1, w2, w3,
                               has_scale, sr_start, k0, k1, N_EMAS, AMSGRAD, SR)
                else:
                    _adam_math(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, z0_ptr, z1_ptr, z2_ptr,
                               z3_ptr, offs, offs < numel, scale, beta1_w, beta2, beta2_w, eps,
                               decay, l2_wd, grad_sign, neg_step_size, bc2_sqrt, w0, w1, w2, w3,
                               has_scale, sr_start, k0, k1, N_EMAS, AMSGRAD, SR)

    @triton.jit
    def _tensor_position(table_ptr, chunk_rows, n_tensors, n_chunks, t, SR: tl.constexpr):
        """Table column ``t``'s position in the caller's lists (the per-tensor kernels' row
        after the chunk rows and, with SR, the element-index bases)."""
        row = chunk_rows + 2 * n_chunks
        if SR:
            row += n_tensors
        return tl.load(table_ptr + (row + t))

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _sgd_list_kernel(table_ptr, n_tensors, n_chunks, grad_scale_ptr, found_inf_ptr,
                         grad_sign, weight_decay, momentum, dampening_w, neg_lr, nesterov,
                         first_step, w0, w1, w2, w3, has_scale, k0, k1, sc_ptr, ew_ptr,
                         coefs_ptr, P_DTYPE: tl.constexpr, N_EMAS: tl.constexpr,
                         HAS_MOMENTUM: tl.constexpr, TRUST: tl.constexpr, SR: tl.constexpr,
                         DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
        # rows: θ, g, momentum buffer, ζ0, ζ1, ζ2, ζ3, sizes; with SR a row of element-index
        # bases after the chunk rows; with TRUST the positions and first chunks after those
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            if DEVICE_SCALARS:
                neg_lr = -tl.load(sc_ptr)
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
                t, start, numel, sr_start = _chunk(table_ptr, 7, n_tensors, n_chunks, c, SR,
                                                   BLOCK)
                wd = weight_decay
                ratio = 1.0
                if TRUST:
                    i = _tensor_position(table_ptr, 8 * n_tensors, n_tensors, n_chunks, t, SR)
                    ratio = tl.load(coefs_ptr + 2 * i)
                    wd = tl.load(coefs_ptr + 2 * i + 1)
                p_ptr = _role(table_ptr, t, 0, n_tensors, P_DTYPE)
                g_ptr = _role(table_ptr, t, 1, n_tensors, P_DTYPE)
                b_ptr = p_ptr
                if HAS_MOMENTUM:
                    b_ptr = _role(table_ptr, t, 2, n_tensors, tl.float32)
                z0_ptr, z1_ptr, z2_ptr, z3_ptr = _ema_roles(table_ptr, t, 3, n_tensors, p_ptr,
                                                              N_EMAS)
                offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
                if start + BLOCK <= numel:
                    _sgd_math(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, None,
                              scale, grad_sign, wd, ratio, momentum, dampening_w, neg_lr,
                              nesterov, first_step, w0, w1, w2, w3, has_scale, sr_start,
                              k0, k1, N_EMAS, HAS_MOMENTUM, TRUST, SR)
                else:
                    _sgd_math(p_ptr, g_ptr, b_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs,
                              offs < numel, scale, grad_sign, wd, ratio, momentum, dampening_w,
                              neg_lr, nesterov, first_step, w0, w1, w2, w3, has_scale,
                              sr_start, k0, k1, N_EMAS, HAS_MOMENTUM, TRUST, SR)

    @triton.jit(do_not_specialize=["n_tensors", "n_chunks"])
    def _ema_list_kernel(table_ptr, n_tensors, n_chunks, w0, w1, w2, w3, P_DTYPE: tl.constexpr,
                         N_EMAS: tl.constexpr, BLOCK: tl.constexpr):
        """EMA only over a tensor list (WithEMA's one launch per set, the frozen parameters of a
        fused step): rows θ, ζ0, ζ1, ζ2, ζ3, sizes, then the chunk rows."""
        for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
            t, start, numel, _ = _chunk(table_ptr, 5, n_tensors, n_chunks, c, False,
                                        BLOCK)
            p_ptr = _role(table_ptr, t, 0, n_tensors, P_DTYPE)
            z0_ptr, z1_ptr, z2_ptr, z3_ptr = _ema_roles(table_ptr, t, 1, n_tensors, p_ptr,
                                                          N_EMAS)
            offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
            if start + BLOCK <= numel:
                _ema_math(p_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, None, w0, w1, w2, w3,
                          N_EMAS)
            else:
                _ema_math(p_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, offs < numel, w0, w1, w2,
                          w3, N_EMAS)

    @triton.jit(do_not_specialize=["n", "sr_base", "k0", "k1"])
    def _sr_round_kernel(x_ptr, out_ptr, n, sr_base, k0, k1, BLOCK: tl.constexpr):
        """Stochastic rounding alone (the kernels' _store_param with SR): for the tests."""
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        sr_start = sr_base + start
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        _store_param(out_ptr, offs, x, mask, sr_start, k0, k1, True)
