"""The ``@triton.jit`` kernels of Lion and LAMB (issue 25), flat and persistent tensor-list
variants; LARS is the SGD kernels with ``TRUST`` (kernels.py).

The per-element math is the reference's (``backends/_reference_rules.py``), in float32
registers, sharing kernels.py's pieces: the gradient's unscaling (``_unscaled``), Adam's moments
(``_moments``), the EMA loads and updates (``_load_emas`` / ``_store_emas``), the parameter's
store with round-to-nearest or stochastic rounding (``_store_param``), the chunk lookup of the
persistent list kernels (``_chunk``, ``_role``, ``_ema_roles``, ``_tensor_position``).

LAMB is two passes, as the reference: ``lamb_moments`` updates m and v and writes each chunk's
partial sums (Σθ², Σr²) into a float32 (chunks, 2) buffer, one row per chunk and no atomics;
``_chunk_sums_kernel`` then adds each tensor's rows in a fixed order, in float64: a
deterministic two-stage reduction (atomic adds would make the trust ratio, and so θ, differ in
the last bits from run to run on a GPU).  ``lamb_ema`` recomputes r from the stored m, v, θ with
the same ops, moves θ by the tensor's step size and updates the EMAs.
"""
from __future__ import annotations

from .config import tl, triton

if triton is not None:
    from .kernels import (_NO_SPEC, _chunk, _device_weights, _ema_roles, _load_emas, _moments,
                          _role, _store_emas, _store_param, _tensor_position, _unscaled)

    # ------------------------------------------------------------------------------ Lion ------
    @triton.jit
    def _lion_math(p_ptr, g_ptr, m_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, scale,
                   has_scale, grad_sign, beta1, beta1_w, beta2, beta2_w, decay, neg_lr, w0, w1,
                   w2, w3, sr_start, k0, k1, N_EMAS: tl.constexpr, SR: tl.constexpr):
        """c = β1 m + (1−β1) g;  θ ← θ(1 − lr·λ) − lr·sign(c);  m ← β2 m + (1−β2) g."""
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        z0, z1, z2, z3 = _load_emas(z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, m, N_EMAS)

        g = _unscaled(g, scale, has_scale, grad_sign)
        theta = theta * decay                   # exactly θ where λ = 0 (decay 1)
        c = tl.fma(g, beta1_w, m * beta1)       # torch.mul(m, β1).add_(g, alpha=1 − β1)
        sign = tl.where(c > 0.0, 1.0, tl.where(c < 0.0, -1.0, 0.0))  # torch.sign (0 at NaN)
        theta = theta + sign * neg_lr           # the product is exact: ±lr or 0
        m = tl.fma(g, beta2_w, m * beta2)

        tl.store(m_ptr + offs, m, mask=mask)
        stored = _store_param(p_ptr, offs, theta, mask, sr_start, k0, k1, SR)
        _store_emas(stored, z0, z1, z2, z3, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, w0, w1,
                    w2, w3, N_EMAS)

    @triton.jit
    def _lion_lr(sc_ptr, weight_decay, decay, neg_lr, DEVICE_SCALARS: tl.constexpr):
        """``(decay, −lr)``: the launch's, or (DEVICE_SCALARS) from the device lr, as the
        reference forms them from a device lr (float32 ops)."""
        if DEVICE_SCALARS:
            lr = tl.load(sc_ptr)
            decay = 1.0 - lr * weight_decay
            neg_lr = -lr
        return decay, neg_lr

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _lion_flat_kernel(p_ptr, g_ptr, m_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, grad_scale_ptr,
                          found_inf_ptr, n, grad_sign, beta1, beta1_w, beta2, beta2_w,
                          weight_decay, decay, neg_lr, w0, w1, w2, w3, has_scale, sr_base, k0,
                          k1, sc_ptr, ew_ptr, N_EMAS: tl.constexpr, SR: tl.constexpr,
                          DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        sr_start = sr_base + start
        offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            decay, neg_lr = _lion_lr(sc_ptr, weight_decay, decay, neg_lr, DEVICE_SCALARS)
            if DEVICE_SCALARS:
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            if start + BLOCK <= n:  # a full chunk: unmasked, vectorised
                _lion_math(p_ptr, g_ptr, m_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, None, scale,
                           has_scale, grad_sign, beta1, beta1_w, beta2, beta2_w, decay, neg_lr, w0,
                           w1, w2, w3, sr_start, k0, k1, N_EMAS, SR)
            else:
                _lion_math(p_ptr, g_ptr, m_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, offs < n,
                           scale, has_scale, grad_sign, beta1, beta1_w, beta2, beta2_w, decay,
                           neg_lr, w0, w1, w2, w3, sr_start, k0, k1, N_EMAS, SR)

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _lion_list_kernel(table_ptr, n_tensors, n_chunks, grad_scale_ptr, found_inf_ptr,
                          grad_sign, beta1, beta1_w, beta2, beta2_w, weight_decay, decay, neg_lr,
                          w0, w1, w2, w3, has_scale, k0, k1, sc_ptr, ew_ptr,
                          P_DTYPE: tl.constexpr, N_EMAS: tl.constexpr, SR: tl.constexpr,
                          DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
        # rows: θ, g, m, ζ0, ζ1, ζ2, ζ3, sizes, chunks; with SR the element-index bases
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            decay, neg_lr = _lion_lr(sc_ptr, weight_decay, decay, neg_lr, DEVICE_SCALARS)
            if DEVICE_SCALARS:
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
                t, start, numel, sr_start = _chunk(table_ptr, 7, n_tensors, n_chunks, c, SR,
                                                   BLOCK)
                p_ptr = _role(table_ptr, t, 0, n_tensors, P_DTYPE)
                g_ptr = _role(table_ptr, t, 1, n_tensors, P_DTYPE)
                m_ptr = _role(table_ptr, t, 2, n_tensors, tl.float32)
                z0_ptr, z1_ptr, z2_ptr, z3_ptr = _ema_roles(table_ptr, t, 3, n_tensors, m_ptr,
                                                              N_EMAS)
                offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
                if start + BLOCK <= numel:  # a full chunk: unmasked, vectorised
                    _lion_math(p_ptr, g_ptr, m_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, None,
                               scale, has_scale, grad_sign, beta1, beta1_w, beta2, beta2_w, decay,
                               neg_lr, w0, w1, w2, w3, sr_start, k0, k1, N_EMAS, SR)
                else:
                    _lion_math(p_ptr, g_ptr, m_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs,
                               offs < numel, scale, has_scale, grad_sign, beta1, beta1_w, beta2,
                               beta2_w, decay, neg_lr, w0, w1, w2, w3, sr_start, k0, k1,
                               N_EMAS, SR)

    # ------------------------------------------------------------------------------ LAMB ------
    @triton.jit
    def _lamb_direction(m, v, theta, bc1, bc2_sqrt, eps, weight_decay):
        """r = m̂ / (√v̂ + ε) + λθ with the reference's ops (``_lamb_direction``), in both
        passes: the second recomputes the first's r bit for bit."""
        den = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        return tl.div_rn(tl.div_rn(m, bc1), den) + weight_decay * theta

    @triton.jit
    def _lamb_bias(sc_ptr, bc1, bc2_sqrt, DEVICE_SCALARS: tl.constexpr):
        """The bias corrections: the launch's, or (DEVICE_SCALARS) the device tensor's."""
        if DEVICE_SCALARS:
            bc1 = tl.load(sc_ptr)
            bc2_sqrt = tl.load(sc_ptr + 1)
        return bc1, bc2_sqrt

    @triton.jit
    def _lamb_moments_math(p_ptr, g_ptr, m_ptr, v_ptr, part_ptr, offs, mask, scale, has_scale,
                           grad_sign, beta1_w, beta2, beta2_w, eps, weight_decay, bc1,
                           bc2_sqrt):
        """Pass 1 on one chunk: m, v updated and stored; the chunk's (Σθ², Σr²) into
        ``part_ptr`` (its row of the partial sums)."""
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        m, v = _moments(_unscaled(g, scale, has_scale, grad_sign), m, v, beta1_w, beta2,
                        beta2_w)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        r = _lamb_direction(m, v, theta, bc1, bc2_sqrt, eps, weight_decay)
        if mask is not None:  # (static) the lanes past the tensor's end add nothing
            theta = tl.where(mask, theta, 0.0)
            r = tl.where(mask, r, 0.0)
        tl.store(part_ptr, tl.sum(theta * theta, axis=0))
        tl.store(part_ptr + 1, tl.sum(r * r, axis=0))

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _lamb_moments_flat_kernel(p_ptr, g_ptr, m_ptr, v_ptr, grad_scale_ptr, found_inf_ptr, n,
                                  part_ptr, grad_sign, beta1_w, beta2, beta2_w, eps,
                                  weight_decay, bc1, bc2_sqrt, has_scale, sc_ptr,
                                  DEVICE_SCALARS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        start = pid.to(tl.int64) * BLOCK
        offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            bc1, bc2_sqrt = _lamb_bias(sc_ptr, bc1, bc2_sqrt, DEVICE_SCALARS)
            if start + BLOCK <= n:  # a full chunk: unmasked, vectorised
                _lamb_moments_math(p_ptr, g_ptr, m_ptr, v_ptr, part_ptr + 2 * pid, offs, None,
                                   scale, has_scale, grad_sign, beta1_w, beta2, beta2_w, eps,
                                   weight_decay, bc1, bc2_sqrt)
            else:
                _lamb_moments_math(p_ptr, g_ptr, m_ptr, v_ptr, part_ptr + 2 * pid, offs,
                                   offs < n, scale, has_scale, grad_sign, beta1_w, beta2,
                                   beta2_w, eps, weight_decay, bc1, bc2_sqrt)

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _lamb_moments_list_kernel(table_ptr, n_tensors, n_chunks, grad_scale_ptr, found_inf_ptr,
                                  part_ptr, grad_sign, beta1_w, beta2, beta2_w, eps,
                                  weight_decay, bc1, bc2_sqrt, has_scale, sc_ptr,
                                  P_DTYPE: tl.constexpr, DEVICE_SCALARS: tl.constexpr,
                                  BLOCK: tl.constexpr):
        # rows: θ, g, m, v, sizes, chunks, positions, first chunks; chunk c's sums: row c
        scale = tl.load(grad_scale_ptr)
        if tl.load(found_inf_ptr) == 0.0:
            bc1, bc2_sqrt = _lamb_bias(sc_ptr, bc1, bc2_sqrt, DEVICE_SCALARS)
            for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
                t, start, numel, _ = _chunk(table_ptr, 4, n_tensors, n_chunks, c, False,
                                            BLOCK)
                p_ptr = _role(table_ptr, t, 0, n_tensors, P_DTYPE)
                g_ptr = _role(table_ptr, t, 1, n_tensors, P_DTYPE)
                m_ptr = _role(table_ptr, t, 2, n_tensors, tl.float32)
                v_ptr = _role(table_ptr, t, 3, n_tensors, tl.float32)
                offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
                if start + BLOCK <= numel:  # a full chunk: unmasked, vectorised
                    _lamb_moments_math(p_ptr, g_ptr, m_ptr, v_ptr, part_ptr + 2 * c, offs, None,
                                       scale, has_scale, grad_sign, beta1_w, beta2, beta2_w, eps,
                                       weight_decay, bc1, bc2_sqrt)
                else:
                    _lamb_moments_math(p_ptr, g_ptr, m_ptr, v_ptr, part_ptr + 2 * c, offs,
                                       offs < numel, scale, has_scale, grad_sign, beta1_w, beta2,
                                       beta2_w, eps, weight_decay, bc1, bc2_sqrt)

    @triton.jit(do_not_specialize=["n_tensors", "n_chunks"])
    def _chunk_sums_kernel(table_ptr, n_tensors, n_chunks, part_ptr, out_ptr, ROLES: tl.constexpr,
                           BLOCK: tl.constexpr, RB: tl.constexpr):
        """Stage 2 of the LAMB sums: tensor t's chunk rows of ``part_ptr`` added in float64 in
        a fixed order (deterministic), into row (its position) of the (n, 2) ``out_ptr``."""
        chunk_rows = (ROLES + 1) * n_tensors
        for t in range(tl.program_id(0), n_tensors, tl.num_programs(0)):
            first = tl.load(table_ptr + (chunk_rows + 2 * n_chunks + n_tensors + t))
            count = tl.cdiv(tl.load(table_ptr + (ROLES * n_tensors + t)), BLOCK)
            acc0 = tl.zeros([RB], dtype=tl.float64)
            acc1 = tl.zeros([RB], dtype=tl.float64)
            for k in range(0, count, RB):
                cs = first + k + tl.arange(0, RB)
                ok = k + tl.arange(0, RB) < count
                acc0 += tl.load(part_ptr + 2 * cs, mask=ok, other=0.0).to(tl.float64)
                acc1 += tl.load(part_ptr + 2 * cs + 1, mask=ok, other=0.0).to(tl.float64)
            i = _tensor_position(table_ptr, chunk_rows, n_tensors, n_chunks, t, False)
            tl.store(out_ptr + 2 * i, tl.sum(acc0, axis=0).to(tl.float32))
            tl.store(out_ptr + 2 * i + 1, tl.sum(acc1, axis=0).to(tl.float32))

    @triton.jit
    def _lamb_ema_math(p_ptr, m_ptr, v_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, eps,
                       weight_decay, bc1, bc2_sqrt, neg_step, w0, w1, w2, w3, sr_start, k0, k1,
                       N_EMAS: tl.constexpr, SR: tl.constexpr):
        """Pass 2 on one chunk: θ += −(lr·ratio)·r, r from the stored m, v and θ; the EMAs."""
        theta = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        z0, z1, z2, z3 = _load_emas(z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, m, N_EMAS)
        r = _lamb_direction(m, v, theta, bc1, bc2_sqrt, eps, weight_decay)
        theta = theta + r * neg_step
        stored = _store_param(p_ptr, offs, theta, mask, sr_start, k0, k1, SR)
        _store_emas(stored, z0, z1, z2, z3, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, mask, w0, w1,
                    w2, w3, N_EMAS)

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _lamb_ema_flat_kernel(p_ptr, m_ptr, v_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, found_inf_ptr,
                              n, step_ptr, eps, weight_decay, bc1, bc2_sqrt, w0, w1, w2, w3,
                              sr_base, k0, k1, sc_ptr, ew_ptr, N_EMAS: tl.constexpr,
                              SR: tl.constexpr, DEVICE_SCALARS: tl.constexpr,
                              BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        sr_start = sr_base + start
        offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
        if tl.load(found_inf_ptr) == 0.0:
            bc1, bc2_sqrt = _lamb_bias(sc_ptr, bc1, bc2_sqrt, DEVICE_SCALARS)
            if DEVICE_SCALARS:
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            neg_step = -tl.load(step_ptr)
            if start + BLOCK <= n:  # a full chunk: unmasked, vectorised
                _lamb_ema_math(p_ptr, m_ptr, v_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, None,
                               eps, weight_decay, bc1, bc2_sqrt, neg_step, w0, w1, w2, w3,
                               sr_start, k0, k1, N_EMAS, SR)
            else:
                _lamb_ema_math(p_ptr, m_ptr, v_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs,
                               offs < n, eps, weight_decay, bc1, bc2_sqrt, neg_step, w0, w1, w2,
                               w3, sr_start, k0, k1, N_EMAS, SR)

    @triton.jit(do_not_specialize=_NO_SPEC)
    def _lamb_ema_list_kernel(table_ptr, n_tensors, n_chunks, found_inf_ptr, step_ptr, eps,
                              weight_decay, bc1, bc2_sqrt, w0, w1, w2, w3, k0, k1, sc_ptr,
                              ew_ptr, P_DTYPE: tl.constexpr, N_EMAS: tl.constexpr,
                              SR: tl.constexpr, DEVICE_SCALARS: tl.constexpr,
                              BLOCK: tl.constexpr):
        # rows: θ, m, v, ζ0, ζ1, ζ2, ζ3, sizes, chunks, [SR bases], positions, first chunks
        if tl.load(found_inf_ptr) == 0.0:
            bc1, bc2_sqrt = _lamb_bias(sc_ptr, bc1, bc2_sqrt, DEVICE_SCALARS)
            if DEVICE_SCALARS:
                w0, w1, w2, w3 = _device_weights(ew_ptr, w0, w1, w2, w3, N_EMAS)
            for c in range(tl.program_id(0), n_chunks, tl.num_programs(0)):
                t, start, numel, sr_start = _chunk(table_ptr, 7, n_tensors, n_chunks, c, SR,
                                                   BLOCK)
                i = _tensor_position(table_ptr, 8 * n_tensors, n_tensors, n_chunks, t, SR)
                neg_step = -tl.load(step_ptr + i)
                p_ptr = _role(table_ptr, t, 0, n_tensors, P_DTYPE)
                m_ptr = _role(table_ptr, t, 1, n_tensors, tl.float32)
                v_ptr = _role(table_ptr, t, 2, n_tensors, tl.float32)
                z0_ptr, z1_ptr, z2_ptr, z3_ptr = _ema_roles(table_ptr, t, 3, n_tensors, m_ptr,
                                                              N_EMAS)
                offs = tl.max_contiguous(start + tl.arange(0, BLOCK), 4)
                if start + BLOCK <= numel:  # a full chunk: unmasked, vectorised
                    _lamb_ema_math(p_ptr, m_ptr, v_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs, None,
                                   eps, weight_decay, bc1, bc2_sqrt, neg_step, w0, w1, w2, w3,
                                   sr_start, k0, k1, N_EMAS, SR)
                else:
                    _lamb_ema_math(p_ptr, m_ptr, v_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, offs,
                                   offs < numel, eps, weight_decay, bc1, bc2_sqrt, neg_step, w0,
                                   w1, w2, w3, sr_start, k0, k1, N_EMAS, SR)
