"""Ahead-of-time compilation (no GPU needed): every kernel variant the launchers can produce,
and :func:`aot_compile` for one of them (the tests compile them all for sm_80 and sm_90)."""
from __future__ import annotations

import torch

from .._emas import MAX_EMAS
from . import config
from .config import triton
from .kernels import (_adam_flat_kernel, _adam_list_kernel, _ema_flat_kernel,
                      _ema_list_kernel,
                      _sgd_flat_kernel, _sgd_list_kernel)
from .launch import _TL_DTYPES
from .rule_kernels import (_chunk_sums_kernel, _lamb_ema_flat_kernel, _lamb_ema_list_kernel,
                           _lamb_moments_flat_kernel, _lamb_moments_list_kernel,
                           _lion_flat_kernel, _lion_list_kernel)
from .rule_launch import _SUM_ROWS


_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_variants():
    """Yield ``(label, kernel, signature, constexprs, attrs)`` for every kernel variant the
    launchers can produce, but DEVICE_SCALARS only for the EMA counts that cover its prologue.

    Variants: parameter dtype x {flat, list} x {AdamW/Adam, SGD} x the structural constexprs
    (the number of EMAs updated, 0..MAX_EMAS; AMSGrad or momentum; stochastic rounding for
    16-bit parameters; DEVICE_SCALARS, the capturable kernels, for the EMA counts in
    ``_AOT_DEVICE_SCALAR_EMAS``), and the EMA-only kernels (flat, list) for 1..MAX_EMAS EMAs.  Flat
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

    for dtype in config.PARAM_DTYPES:
        pt, ty = "*" + _TY[dtype], _TY[dtype]
        amp = {"grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
        # stochastic rounding: a variant for 16-bit parameters only (fp32 never rounds)
        srs = (False, True) if dtype != torch.float32 else (False,)
        for ams, k, sr, dev in itertools.product((False, True), counts, srs, (False, True)):
            if dev and k not in _AOT_DEVICE_SCALAR_EMAS:
                continue
            flags = dict(N_EMAS=k, AMSGRAD=ams, SR=sr, DEVICE_SCALARS=dev, BLOCK=config.BLOCK)
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
        # SGD, and LARS (TRUST: the per-tensor coefs) for the EMA counts of _AOT_RULE_EMAS
        for trust, mom, k, sr, dev in itertools.product((False, True), (False, True), counts,
                                                        srs, (False, True)):
            if (dev and k not in _AOT_DEVICE_SCALAR_EMAS) or \
                    (trust and k not in _AOT_RULE_EMAS):
                continue
            flags = dict(N_EMAS=k, HAS_MOMENTUM=mom, TRUST=trust, SR=sr, DEVICE_SCALARS=dev,
                         BLOCK=config.BLOCK)
            tail = dict({s: "fp32" for s in sgd_scalars}, nesterov="i32", first_step="i32",
                        w0="fp32", w1="fp32", w2="fp32", w3="fp32", has_scale="i32", k0="i32",
                        k1="i32", **device(dev, k), coefs_ptr="*fp32" if trust else "constexpr")
            tag = f"{_sr_tag(sr)}{_device_tag(dev)}"
            name = "lars" if trust else "sgd"
            sig = dict(p_ptr=pt, g_ptr=pt, b_ptr="*fp32" if mom else "constexpr", **zs(k),
                       **amp, n="i32", **tail, sr_base="i64")
            yield _variant(f"{name}_flat[{ty},emas={k},momentum={mom}{tag}]",
                           _sgd_flat_kernel, sig, flags)
            sig = dict(table_ptr="*i64", n_tensors="i32", n_chunks="i32", **amp, **tail)
            yield _variant(f"{name}_list[{ty},emas={k},momentum={mom}{tag}]",
                           _sgd_list_kernel, sig, dict(flags, P_DTYPE=_TL_DTYPES[dtype]))
        yield from _rule_variants(dtype, pt, ty, amp, srs, zs, device)
        for k in range(1, MAX_EMAS + 1):
            sig = dict(p_ptr=pt, **zs(k), n="i32", w0="fp32", w1="fp32", w2="fp32", w3="fp32")
            yield _variant(f"ema_flat[{ty},emas={k}]", _ema_flat_kernel, sig,
                           dict(N_EMAS=k, BLOCK=config.BLOCK))
            sig = dict(table_ptr="*i64", n_tensors="i32", n_chunks="i32", w0="fp32", w1="fp32",
                       w2="fp32", w3="fp32")
            yield _variant(f"ema_list[{ty},emas={k}]", _ema_list_kernel, sig,
                           dict(N_EMAS=k, BLOCK=config.BLOCK, P_DTYPE=_TL_DTYPES[dtype]))


def _rule_variants(dtype, pt, ty, amp, srs, zs, device):
    """Lion's and LAMB's kernels (rule_kernels.py) for one parameter dtype: the EMA counts of
    ``_AOT_RULE_EMAS`` x SR x DEVICE_SCALARS, flat and list (LARS: the SGD kernels with TRUST,
    in aot_variants)."""
    import itertools
    list_head = dict(table_ptr="*i64", n_tensors="i32", n_chunks="i32")
    p_dtype = dict(P_DTYPE=_TL_DTYPES[dtype])
    for k, sr, dev in itertools.product(_AOT_RULE_EMAS, srs, (False, True)):
        flags = dict(N_EMAS=k, SR=sr, DEVICE_SCALARS=dev, BLOCK=config.BLOCK)
        tag = f"{_sr_tag(sr)}{_device_tag(dev)}"
        ws = dict(w0="fp32", w1="fp32", w2="fp32", w3="fp32")
        tail = dict({s: "fp32" for s in ("grad_sign", "beta1", "beta1_w", "beta2", "beta2_w",
                                         "weight_decay", "decay", "neg_lr")}, **ws,
                    has_scale="i32", k0="i32", k1="i32", **device(dev, k))
        sig = dict(p_ptr=pt, g_ptr=pt, m_ptr="*fp32", **zs(k), **amp, n="i32", **tail,
                   sr_base="i64")
        yield _variant(f"lion_flat[{ty},emas={k}{tag}]", _lion_flat_kernel, sig, flags)
        yield _variant(f"lion_list[{ty},emas={k}{tag}]", _lion_list_kernel,
                       dict(list_head, **amp, **tail), dict(flags, **p_dtype))
        tail = dict(eps="fp32", weight_decay="fp32", bc1="fp32", bc2_sqrt="fp32", **ws,
                    k0="i32", k1="i32", **device(dev, k))
        sig = dict(p_ptr=pt, m_ptr="*fp32", v_ptr="*fp32", **zs(k), found_inf_ptr="*fp32",
                   n="i32", step_ptr="*fp32", **tail, sr_base="i64")
        yield _variant(f"lamb_ema_flat[{ty},emas={k}{tag}]", _lamb_ema_flat_kernel, sig, flags)
        sig = dict(list_head, found_inf_ptr="*fp32", step_ptr="*fp32", **tail)
        yield _variant(f"lamb_ema_list[{ty},emas={k}{tag}]", _lamb_ema_list_kernel, sig,
                       dict(flags, **p_dtype))
    for dev in (False, True):
        flags = dict(DEVICE_SCALARS=dev, BLOCK=config.BLOCK)
        tail = dict({s: "fp32" for s in ("grad_sign", "beta1_w", "beta2", "beta2_w", "eps",
                                         "weight_decay", "bc1", "bc2_sqrt")}, has_scale="i32",
                    sc_ptr="*fp32" if dev else "constexpr")
        sig = dict(p_ptr=pt, g_ptr=pt, m_ptr="*fp32", v_ptr="*fp32", **amp, n="i32",
                   part_ptr="*fp32", **tail)
        yield _variant(f"lamb_moments_flat[{ty}{_device_tag(dev)}]", _lamb_moments_flat_kernel,
                       sig, flags)
        sig = dict(list_head, **amp, part_ptr="*fp32", **tail)
        yield _variant(f"lamb_moments_list[{ty}{_device_tag(dev)}]", _lamb_moments_list_kernel,
                       sig, dict(flags, **p_dtype))
    if dtype == torch.float32:  # (not per dtype: it adds float32 sums)
        sig = dict(list_head, part_ptr="*fp32", out_ptr="*fp32")
        yield _variant("chunk_sums[fp32]", _chunk_sums_kernel, sig,
                       dict(ROLES=4, BLOCK=config.BLOCK, RB=_SUM_ROWS))


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

# The EMA counts of the issue-25 rules' variants (LARS, Lion, LAMB): their one dependence on
# N_EMAS is the EMA loads and updates of kernels.py's _load_emas / _store_emas, which Adam's and
# SGD's variants compile for every count; 0, 1 and MAX_EMAS cover the rules' own code over every
# other axis at 3/5 of the compile time.
_AOT_RULE_EMAS = (0, 1, MAX_EMAS)


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
                          options={"num_warps": config.NUM_WARPS})
