"""Stochastic rounding of 16-bit parameters (issue 15): the random bits and the roundings, in
Python integers and torch ops.

The one specification is csrc/fused_math.h (``sr_mix``, ``sr_key``, ``sr_bits``,
``bf16_round_sr``, ``f16_round_sr``); this module is its bit-for-bit twin for the reference
backend (and the host half of the Triton one), read it there for the reasoning. Everything is
uint32 arithmetic that wraps; torch has no usable uint32 arithmetic, so the values live in int64
tensors in [0, 2^32) and every product is masked back to 32 bits. The hash's multipliers are
below 2^31, so a product of a 32-bit value and one of them stays below 2^63: no int64 overflow.

An element's random bits are a pure function of (seed, step, element index), where the element
index is its offset in the set's flat layout (:func:`flat_offsets`: cumulative numels rounded
up to ``layout.ALIGN``, the offsets :class:`~ema_kernels.optim.layout.FlatBuffers` uses), so
the flat and the per-parameter layouts draw the same bits for the same element.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

MASK32 = 0xFFFFFFFF
_M1 = 0x21F0AAAD
_M2 = 0x735A2D97
ALIGN = 16  # layout.ALIGN (not imported: the backends do not depend on the optimizers)
SEED_BOUND = 1 << 63  # seeds are in [0, 2^63): they travel as int64 through the ops


def mix(x: int) -> int:
    """``sr_mix`` on a Python int (uint32 semantics)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 15
    return x


def key(seed: int, step: int) -> Tuple[int, int]:
    """``sr_key``: the per-launch key (k0, k1) of (seed, step), as uint32 Python ints."""
    a = mix(((seed >> 32) & MASK32) ^ 0x9E3779B9)
    a = mix((seed & MASK32) ^ a)
    a = mix(((step >> 32) & MASK32) ^ a)
    k0 = mix((step & MASK32) ^ a)
    return k0, mix(k0 ^ 0x85EBCA6B)


def _mix_t(x: Tensor) -> Tensor:
    """``sr_mix`` on an int64 tensor of values in [0, 2^32), in place where possible."""
    x = x ^ (x >> 16)
    x = x.mul_(_M1).bitwise_and_(MASK32)
    x = x.bitwise_xor_(x >> 15)
    x = x.mul_(_M2).bitwise_and_(MASK32)
    return x.bitwise_xor_(x >> 15)


HI_MUL = 0x61C88647  # kSrHiMul


def bits(k: Tuple[int, int], idx: Tensor) -> Tensor:
    """``sr_bits``: the 32 random bits (int64 in [0, 2^32)) of element indices ``idx`` (int64):
    one mix of ``lo ^ k0 ^ ((hi * HI_MUL) mod 2^32 ^ k1)``."""
    hi_term = ((idx >> 32) * HI_MUL).bitwise_and_(MASK32).bitwise_xor_(k[1])
    return _mix_t((idx & MASK32).bitwise_xor_(k[0]).bitwise_xor_(hi_term))


def _f32_bits(x: Tensor) -> Tensor:
    return x.view(torch.int32).to(torch.int64) & MASK32


def round_bf16(x: Tensor, r: Tensor) -> Tensor:
    """``bf16_round_sr``: float32 ``x`` to bfloat16, rounded up with the probability of its
    cut-off fraction, from random bits ``r``; NaN → 0x7FC0."""
    u = _f32_bits(x)
    out = (u + (r & 0xFFFF)) >> 16
    out = torch.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, out)
    return out.to(torch.int16).view(torch.bfloat16)  # int64 → int16 keeps the low 16 bits


def round_f16(x: Tensor, r: Tensor) -> Tensor:
    """``f16_round_sr``: float32 ``x`` to float16 stochastically (see fused_math.h for the
    exponent-dependent number of discarded bits); |x| ≥ 2^16 → inf, NaN → sign|0x7E00."""
    u = _f32_bits(x)
    a = u & 0x7FFFFFFF
    sign = (u >> 16) & 0x8000
    e = a >> 23
    normal = (a - (112 << 23) + (r & 0x1FFF)) >> 13
    eff = e.clamp(min=1)
    mant = (a & 0x7FFFFF) | ((e > 0).to(torch.int64) << 23)
    s = 126 - eff
    # the C++ shifts are uint32 (s wraps for e > 126, where the subnormal branch is unused):
    # clamping into [0, 31] gives the same selected results and keeps every shift defined
    sh = s.clamp(0, 31)
    pre = (s - sh).clamp(0, 31)
    sub = ((mant >> pre) + (r & ((torch.ones_like(sh) << sh) - 1))) >> sh
    res = torch.where(e >= 113, normal, sub)
    res = torch.where(e >= 143, 0x7C00, res)
    res = torch.where(a > 0x7F800000, 0x7E00, res)
    return (sign | res).to(torch.int16).view(torch.float16)


def round_to(dtype: torch.dtype, x: Tensor, r: Tensor) -> Tensor:
    if dtype == torch.bfloat16:
        return round_bf16(x, r)
    if dtype == torch.float16:
        return round_f16(x, r)
    raise TypeError(f"stochastic rounding rounds float32 to bfloat16 or float16, not {dtype}")


def flat_offsets(numels: Sequence[int]) -> List[int]:
    """Each tensor's element-index base: where :class:`FlatBuffers` would place it."""
    out, at = [], 0
    for n in numels:
        out.append(at)
        at += (n + ALIGN - 1) // ALIGN * ALIGN
    return out


def check_args(what: str, n: int, seed: int, step: int,
               offsets: Optional[Sequence[int]]) -> None:
    """The op's checks (bindings.cpp, sr_prepare), with the same meaning everywhere."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_BOUND:
        raise ValueError(f"{what}: sr_seed={seed!r} must be an int in [0, 2^63)")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{what}: sr_step={step!r} must be an int >= 0 (the step count t)")
    if offsets is not None:
        if len(offsets) != n:
            raise ValueError(f"{what}: sr_offsets has {len(offsets)} entries but params has {n}; "
                             f"give one element-index base per tensor")
        for i, o in enumerate(offsets):
            if o < 0:
                raise ValueError(f"{what}: sr_offsets[{i}]={o} must be >= 0")
