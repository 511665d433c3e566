// fused_math.h -- the one copy of the fused optimizer + EMA math in C++.
//
// Every function here is __host__ __device__: the CUDA kernels (fused_cuda.cu) and the CPU twin
// (fused_cpu.cpp) call exactly the same code, so testing the CPU build numerically tests the
// CUDA math too.  No torch or pybind headers: this file is compiled by nvcc for device code.
//
// The arithmetic follows ema_kernels/backends/reference.py operation for operation (which itself
// follows torch.optim's single-tensor Adam/SGD): float32 math whatever the storage dtype, every
// hyperparameter rounded to float32 once on the host (as torch does when a Python float meets a
// float32 tensor), and the EMA moves towards the parameter *as stored* (after rounding to
// bf16/fp16).  Per-step values (lr, bias corrections, EMA weights) are runtime values; only
// structural choices (dtype, AMSGrad, the number of EMAs updated, momentum mode) are template
// parameters.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define EK_HD __host__ __device__ __forceinline__
#else
#define EK_HD inline __attribute__((always_inline))
#endif

// EK_DEVICE_CODE: this is device code, which uses the CUDA intrinsics (the GPU's device pass, or
// the emulation build's host-compiled fused_cuda.cu, whose intrinsics come from cuda_emu.h).
#if defined(__CUDA_ARCH__) || defined(EK_EMULATE_DEVICE)
#define EK_DEVICE_CODE 1
#else
#define EK_DEVICE_CODE 0
#endif

#if defined(EK_EMULATE_DEVICE)
#include "cuda_emu.h"
#endif

// Full unrolling of the loops over the EMAs (bounded by a template parameter): the EMA values
// then live in registers.  nvcc and g++ spell the pragma differently.
#if defined(__CUDACC__)
#define EK_UNROLL _Pragma("unroll")
#else
#define EK_UNROLL _Pragma("GCC unroll 4")
#endif

namespace ek {
// Compiled as emulated device code, these inline functions get other bodies (the device branches
// below) than where the same header is compiled as host code; both can end up in one library, so
// the emulated copy lives in its own inline namespace: other mangled names, no ODR clash.
#if defined(EK_EMULATE_DEVICE)
inline namespace emulated_device {
#endif

// ------------------------------------------------------------------------------------------
// Bit casts and storage types.  bf16/fp16 are stored as raw uint16_t bits on both sides; the
// conversions round to nearest even (what torch's .to(), .copy_() and GPU stores do).
// ------------------------------------------------------------------------------------------
EK_HD float bits_to_f32(uint32_t u) {
#if EK_DEVICE_CODE
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

EK_HD uint32_t f32_to_bits(float f) {
#if EK_DEVICE_CODE
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

struct F32 {
  using raw = float;
  static EK_HD float load(float x) { return x; }
  static EK_HD float store(float x) { return x; }
  static EK_HD float store_r(float x, uint32_t) { return x; }  // no rounding: bits unused
  static constexpr bool kRounds = false;  // load(store(x)) == x
  static constexpr bool kStochastic = false;
};

struct BF16 {
  using raw = uint16_t;
  static EK_HD float load(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }
  static EK_HD uint16_t store(float f) {
#if EK_DEVICE_CODE
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    // c10::BFloat16's round_to_nearest_even, written so that it vectorises (no branch).
    const uint32_t u = f32_to_bits(f);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (f != f) ? uint16_t(0x7FC0) : uint16_t(rounded);
#endif
  }
  // store_r: the store of an element whose random bits are r (round to nearest: r unused).
  static EK_HD uint16_t store_r(float f, uint32_t) { return store(f); }
  static constexpr bool kRounds = true;
  static constexpr bool kStochastic = false;
};

struct F16 {
  using raw = uint16_t;
  static EK_HD float load(uint16_t h) {
#if EK_DEVICE_CODE
    return __half2float(__ushort_as_half(h));
#else
    // fp16_ieee_to_fp32_value (FP16 library, as in c10::Half): branch-free.
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float normalized = bits_to_f32((two_w >> 4) + exp_offset) * 0x1.0p-112f;
    const uint32_t magic_mask = 126u << 23;
    const float denormalized = bits_to_f32((two_w >> 17) | magic_mask) - 0.5f;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result =
        sign | (two_w < denormalized_cutoff ? f32_to_bits(denormalized) : f32_to_bits(normalized));
    return bits_to_f32(result);
#endif
  }
  static EK_HD uint16_t store(float f) {
#if EK_DEVICE_CODE
    return __half_as_ushort(__float2half_rn(f));
#else
    // fp16_ieee_from_fp32_value (FP16 library, as in c10::Half): round to nearest even.
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
  }
  static EK_HD uint16_t store_r(float f, uint32_t) { return store(f); }
  static constexpr bool kRounds = true;
  static constexpr bool kStochastic = false;
};

// ------------------------------------------------------------------------------------------
// Rounding-explicit arithmetic.  Where torch's vectorised CPU kernels use a fused multiply-add
// (lerp, add with alpha) we use one too, and nowhere else: nvcc would otherwise contract freely
// and g++ is run with -ffp-contract=off, so the CPU twin and the GPU kernels give bit-identical
// results and both match the reference's vector path.
// ------------------------------------------------------------------------------------------
EK_HD float fmul(float a, float b) {
#if EK_DEVICE_CODE
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

EK_HD float fadd(float a, float b) {
#if EK_DEVICE_CODE
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

EK_HD float fdiv(float a, float b) {
#if EK_DEVICE_CODE
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

EK_HD float fsqrt(float a) {
#if EK_DEVICE_CODE
  return __fsqrt_rn(a);
#else
  return sqrtf(a);
#endif
}

// a * b + c with one rounding.
EK_HD float ffma(float a, float b, float c) {
#if EK_DEVICE_CODE
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// torch.lerp as its vectorised CPU kernel computes it (ATen/native/cpu/LerpKernel.cpp):
// fma(w, end - self, self) for |w| < 0.5, else fma(w - 1, end - self, end).  Both are evaluated
// and one selected, so the CPU loops stay branch-free (vectorisable).
EK_HD float lerp(float self, float end, float weight) {
  const float diff = end - self;
  const bool small = fabsf(weight) < 0.5f;
  const float coeff = small ? weight : weight - 1.0f;
  const float base = small ? self : end;
  return ffma(coeff, diff, base);
}

// torch.maximum: NaN propagates from either side.
EK_HD float nan_maximum(float a, float b) { return ((a != a) | (a > b)) ? a : b; }

// ------------------------------------------------------------------------------------------
// Several EMAs per pass.  The number updated is a template parameter NZ in [0, kMaxEmas] (it
// decides which bytes move); each EMA k has its own weight float(1 - rho_hat_k), a runtime
// value.  Every EMA moves towards the same stored theta, so EMA k of an NZ-EMA pass is bit for
// bit the EMA of a one-EMA pass with weight k.
// ------------------------------------------------------------------------------------------
constexpr int kMaxEmas = 4;

struct EmaWeights {
  float w[kMaxEmas];  // entries >= the number of EMAs are 0 and never read
};

// From host doubles (1 - rho_hat computed in double) or, on the capturable path, from the
// float32 device tensor: the same float32 values either way.
template <typename T>
EK_HD EmaWeights make_ema_weights(const T* w, int nz) {
  EmaWeights e;
  for (int k = 0; k < kMaxEmas; ++k) e.w[k] = (w != nullptr && k < nz) ? float(w[k]) : 0.0f;
  return e;
}

// ------------------------------------------------------------------------------------------
// Per-step scalars, rounded to float32 exactly as the reference rounds them.  Built on the host
// from doubles (the normal path) or on the device from tensors (the capturable path) by the
// same functions below.
// ------------------------------------------------------------------------------------------
struct AdamScalars {
  float decay;            // float(1 - lr*wd) for decoupled (AdamW) decay, 1 otherwise
  float l2;               // float(wd) for coupled (Adam L2) decay
  float one_minus_beta1;  // float(1 - beta1)
  float beta2;            // float(beta2)
  float one_minus_beta2;  // float(1 - beta2)
  float bc2_sqrt;         // float(sqrt(1 - beta2^t))
  float eps;              // float(eps)
  float neg_step_size;    // float(-lr / (1 - beta1^t))
  float gsign;            // -1 if maximize else 1 (exact: g * -1 == -g)
  EmaWeights ema;         // float(1 - rho_hat_k) per EMA
  uint32_t sr_k0, sr_k1;  // stochastic rounding's key of (seed, step) (SrKey; 0 when off)
};

struct AdamConfig {  // runtime structural flags
  bool l2;           // coupled weight decay active (wd != 0 and not decoupled)
  bool has_scale;    // grad_scale given
};

// Double arithmetic with one rounding per operation on every side: on the device nvcc would
// contract 1.0 - lr * wd into one DFMA, where the host compilers (and Python, which forms the
// reference's values) round the product first.
EK_HD double dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

EK_HD double dadd(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

EK_HD AdamScalars make_adam_scalars(double lr, double beta1, double beta2, double eps, double wd,
                                    bool decoupled, bool maximize, double step_size,
                                    double bc2_sqrt, const EmaWeights& ema) {
  AdamScalars s;
  s.decay = (decoupled && wd != 0.0) ? float(dadd(1.0, -dmul(lr, wd))) : 1.0f;
  s.l2 = float(wd);
  s.one_minus_beta1 = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.bc2_sqrt = float(bc2_sqrt);
  s.eps = float(eps);
  s.neg_step_size = float(-step_size);
  s.gsign = maximize ? -1.0f : 1.0f;
  s.ema = ema;
  s.sr_k0 = s.sr_k1 = 0;
  return s;
}

// The capturable path: lr and the step count live in device tensors; the bias corrections are
// formed from them in double, as torch.optim forms them from Python floats.
// beta^t for a step count t (a whole number in a float tensor): binary powering, one rounding
// per product, so that the device, the emulation and the CPU twin agree bit for bit (CUDA's pow
// and glibc's differ in the last bits of a double).  Within ~2 log2(t) ulps of the exact power
// (the host path's Python pow: the float32 scalars derived from either almost always agree).
// Not a whole number in [0, 2^53]: pow.
EK_HD double pow_steps(double base, double t) {
  if (!(t >= 0.0 && t <= 9007199254740992.0) || t != floor(t)) return pow(base, t);
  unsigned long long n = static_cast<unsigned long long>(t);
  double r = 1.0, b = base;
  while (n != 0) {
    if (n & 1ull) r = dmul(r, b);
    b = dmul(b, b);
    n >>= 1;
  }
  return r;
}

EK_HD void adam_step_values(double lr, double beta1, double beta2, double step,
                            double* step_size, double* bc2_sqrt) {
  *step_size = lr / (1.0 - pow_steps(beta1, step));
  *bc2_sqrt = sqrt(1.0 - pow_steps(beta2, step));
}

// Adam / AdamW on one element.  `theta` and `g` are already in float32; returns the new theta
// (before rounding to the storage dtype).  Operation order = reference.adam_ema.
template <bool AMSGRAD, class Cfg>
EK_HD float adam_update(float theta, float g, float& m, float& v, float& vmax,
                        const AdamScalars& s, float grad_scale, const Cfg& cfg) {
  if (cfg.has_scale) g = fdiv(g, grad_scale);
  g = fmul(g, s.gsign);
  theta = fmul(theta, s.decay);
  if (cfg.l2) g = ffma(theta, s.l2, g);               // g.add_(theta, alpha=wd)
  m = lerp(m, g, s.one_minus_beta1);                  // m.lerp_(g, 1 - beta1)
  v = fmul(v, s.beta2);                               // v.mul_(beta2)
  v = ffma(fmul(s.one_minus_beta2, g), g, v);        // .addcmul_(g, g, value=1 - beta2)
  float d;
  if (AMSGRAD) {
    vmax = nan_maximum(vmax, v);
    d = fsqrt(vmax);
  } else {
    d = fsqrt(v);
  }
  d = fadd(fdiv(d, s.bc2_sqrt), s.eps);                     // .div_(bc2_sqrt).add_(eps)
  return fadd(theta, fdiv(fmul(s.neg_step_size, m), d));  // addcdiv_(m, d, value=-step_size)
}

struct SgdScalars {
  float l2;                   // float(wd)
  float momentum;             // float(momentum)
  float one_minus_dampening;  // float(1 - dampening)
  float neg_lr;               // float(-lr)
  float gsign;                // -1 if maximize else 1
  EmaWeights ema;             // float(1 - rho_hat_k) per EMA
  uint32_t sr_k0, sr_k1;      // stochastic rounding's key (SrKey; 0 when off)
};

struct SgdConfig {
  bool l2;         // wd != 0
  bool has_scale;  // grad_scale given
  bool nesterov;
};

// Momentum modes (structural: they decide which bytes move).
enum MomentumMode : int { kNoMomentum = 0, kFirstStep = 1, kMomentum = 2 };

EK_HD SgdScalars make_sgd_scalars(double lr, double momentum, double dampening, double wd,
                                  bool maximize, const EmaWeights& ema) {
  SgdScalars s;
  s.l2 = float(wd);
  s.momentum = float(momentum);
  s.one_minus_dampening = float(1.0 - dampening);
  s.neg_lr = float(-lr);
  s.gsign = maximize ? -1.0f : 1.0f;
  s.ema = ema;
  s.sr_k0 = s.sr_k1 = 0;
  return s;
}

// torch.optim.SGD's momentum, dampening, Nesterov and the parameter update on the direction d
// (shared by SGD and LARS, whose d is the trust-ratio-scaled gradient).
template <int MODE, class Cfg>
EK_HD float sgd_momentum_step(float theta, float d, float& buf, const SgdScalars& s,
                              const Cfg& cfg) {
  if (MODE == kFirstStep) {
    buf = d;                             // buf.copy_(d)
  } else if (MODE == kMomentum) {
    buf = ffma(d, s.one_minus_dampening, fmul(buf, s.momentum));  // buf.mul_(m).add_(d, alpha)
  }
  if (MODE != kNoMomentum) d = cfg.nesterov ? ffma(buf, s.momentum, d) : buf;
  return ffma(d, s.neg_lr, theta);       // theta.add_(d, alpha=-lr)
}

// SGD on one element; `buf` is the momentum buffer (untouched for kNoMomentum).  Operation
// order = reference.sgd_ema.
template <int MODE, class Cfg>
EK_HD float sgd_update(float theta, float g, float& buf, const SgdScalars& s, float grad_scale,
                       const Cfg& cfg) {
  float d = g;
  if (cfg.has_scale) d = fdiv(d, grad_scale);
  d = fmul(d, s.gsign);
  if (cfg.l2) d = ffma(theta, s.l2, d);  // d.add_(theta, alpha=wd)
  return sgd_momentum_step<MODE>(theta, d, buf, s, cfg);
}

// The EMA: zeta moves towards theta as stored.
EK_HD float ema_update(float z, float theta_stored, float w) { return lerp(z, theta_stored, w); }

// All NZ EMAs of one element, from the one stored theta.
template <int NZ>
EK_HD void ema_update_all(float* z, float theta_stored, const EmaWeights& e) {
  EK_UNROLL
  for (int k = 0; k < NZ; ++k) z[k] = ema_update(z[k], theta_stored, e.w[k]);
}

// ------------------------------------------------------------------------------------------
// Whole-element steps: load from storage, update, store (rounding), the EMAs from the stored
// value.  `z` holds the element's NZ EMA values (z[k]: EMA k).
// ------------------------------------------------------------------------------------------
template <class S, bool AMSGRAD, int NZ, class Cfg>
EK_HD void adam_ema_element(typename S::raw& p, typename S::raw g, float& m, float& v,
                            float& vmax, float* z, const AdamScalars& s, float grad_scale,
                            const Cfg& cfg, uint32_t rbits = 0) {
  const float th = adam_update<AMSGRAD>(S::load(p), S::load(g), m, v, vmax, s, grad_scale, cfg);
  p = S::store_r(th, rbits);  // rbits: the element's random bits (stochastic rounding only)
  ema_update_all<NZ>(z, S::kRounds ? S::load(p) : th, s.ema);
}

template <class S, int MODE, int NZ, class Cfg>
EK_HD void sgd_ema_element(typename S::raw& p, typename S::raw g, float& buf, float* z,
                           const SgdScalars& s, float grad_scale, const Cfg& cfg,
                           uint32_t rbits = 0) {
  const float th = sgd_update<MODE>(S::load(p), S::load(g), buf, s, grad_scale, cfg);
  p = S::store_r(th, rbits);
  ema_update_all<NZ>(z, S::kRounds ? S::load(p) : th, s.ema);
}

template <class S, int NZ>
EK_HD void ema_only_element(typename S::raw p, float* z, const EmaWeights& e) {
  ema_update_all<NZ>(z, S::load(p), e);
}


// ------------------------------------------------------------------------------------------
// Stochastic rounding of 16-bit parameters (issue 15).
//
// The new theta (float32) is rounded to bf16/fp16 up or down with the probabilities that make
// the rounding unbiased, E[round(x)] = x, from 32 random bits that are a pure function of
// (seed, step, element index): a counter-based hash, no generator state.  The same integer
// arithmetic is written in ema_kernels/backends/reference.py (torch int64 ops) and in
// triton_kernels.py (uint32), so every backend gives the same bits whatever the launch
// geometry.  All arithmetic is uint32 and wraps.
// ------------------------------------------------------------------------------------------
// A 32-bit integer hash (Wellons' hash-prospector "lowbias32" family, the 2022 constants
// 0x21f0aaad / 0x735a2d97, bias ~0.107): a bijection whose output bits all depend on all input
// bits.  Both multipliers are below 2^31 so that the torch reference can form the products in
// int64 without overflow.
EK_HD uint32_t sr_mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// The per-launch key of (seed, step): formed once per launch (on the host), so an element
// costs one sr_mix.
struct SrKey {
  uint32_t k0 = 0, k1 = 0;
};

EK_HD SrKey sr_key(uint64_t seed, uint64_t step) {
  uint32_t a = sr_mix(uint32_t(seed >> 32) ^ 0x9E3779B9u);
  a = sr_mix(uint32_t(seed) ^ a);
  a = sr_mix(uint32_t(step >> 32) ^ a);
  SrKey k;
  k.k0 = sr_mix(uint32_t(step) ^ a);
  k.k1 = sr_mix(k.k0 ^ 0x85EBCA6Bu);
  return k;
}

// The index's high half enters through a multiple of the golden-ratio constant (below 2^31,
// for the torch twin's int64 products) xor k1: distinct high halves shift the low half's
// inputs apart, at no cost for the common hi = 0 (a per-launch constant).
constexpr uint32_t kSrHiMul = 0x61C88647u;

EK_HD uint32_t sr_hi_term(const SrKey& k, uint32_t hi) { return (hi * kSrHiMul) ^ k.k1; }

// The 32 random bits of the element whose index (its offset in the set's flat layout, see
// layout.py) has low and high halves lo, hi: one sr_mix of the index xor the key, which for
// a fixed key is a bijection of the low half (distinct elements, distinct inputs) and for a
// fresh key per step fresh bits per element.
EK_HD uint32_t sr_bits32(const SrKey& k, uint32_t lo, uint32_t hi) {
  return sr_mix(lo ^ k.k0 ^ sr_hi_term(k, hi));
}

EK_HD uint32_t sr_bits(const SrKey& k, uint64_t idx) {
  return sr_bits32(k, uint32_t(idx), uint32_t(idx >> 32));
}

// Element i of a run starting at index base: the same bits as sr_bits(k, base + i) in 32-bit
// arithmetic only (the low half wraps, its carry selects the next high half's term), so CPU
// loops vectorise without 64-bit lanes.  The run's two high terms are computed once.
struct SrRun {
  uint32_t lo0, h0, h1;  // base's low half; the high terms of base's high half and the next
};

EK_HD SrRun sr_run(const SrKey& k, uint64_t base) {
  const uint32_t hi = uint32_t(base >> 32);
  return SrRun{uint32_t(base), sr_hi_term(k, hi), sr_hi_term(k, hi + 1u)};
}

EK_HD uint32_t sr_bits_at(const SrKey& k, const SrRun& run, uint32_t i) {
  const uint32_t lo = run.lo0 + i;
  return sr_mix(lo ^ k.k0 ^ (lo < run.lo0 ? run.h1 : run.h0));
}

// bf16: the top 16 bits of the float32 pattern after adding 16 random bits to the 16 that are
// cut off (the carry rounds the magnitude up with probability = the cut-off fraction; it runs
// into the exponent at a binade's end, and from the largest finite bf16 up to infinity, which
// is where a value beyond it rounds with the probability its distance past it implies).  Inf
// stays inf (the added bits stay below the mantissa); NaN becomes the quiet NaN 0x7FC0, as
// torch's conversion gives.
EK_HD uint16_t bf16_round_sr(float f, uint32_t r) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + (r & 0xFFFFu)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// fp16: not a truncation of fp32 (other exponent range), so the number of discarded bits s
// depends on the exponent e of |x| (float32 biased):
//   e >= 143 (|x| >= 2^16, inf included): inf;
//   113 <= e < 143 (fp16 normals): s = 13 bits of the 23-bit mantissa, exponent rebiased
//     (127 -> 15) by subtracting 112 << 23; a carry moves to the next binade, and from 65504
//     to inf (0x7BFF + 1 = 0x7C00);
//   e < 113 (fp16 subnormals, units of 2^-24): the 24-bit significand M (implicit bit where
//     e > 0) shifted right by s = 126 - max(e, 1) >= 14, with s random bits added first.  s is
//     capped at 31 (M shifted by the excess first): exact down to |x| >= 2^-32; below, the
//     probability of rounding up to 2^-24 is M >> (s - 31) / 2^31, truncated (an absolute bias
//     below 2^-55).
// NaN keeps its sign as the quiet NaN sign|0x7E00 (what torch's conversion gives).
// All shift amounts stay in [0, 31] for every input (the unused branch included).
EK_HD uint16_t f16_round_sr(float f, uint32_t r) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t e = a >> 23;
  const uint32_t normal = (a - (112u << 23) + (r & 0x1FFFu)) >> 13;
  const uint32_t eff = e > 0u ? e : 1u;
  const uint32_t mant = (a & 0x7FFFFFu) | (e > 0u ? 0x800000u : 0u);
  const uint32_t s = 126u - eff;  // wraps for e > 126: that branch is not selected
  const uint32_t sh = s < 31u ? s : 31u;
  const uint32_t pre = (s - sh) < 31u ? (s - sh) : 31u;
  const uint32_t sub = ((mant >> pre) + (r & ((1u << sh) - 1u))) >> sh;
  uint32_t res = e >= 113u ? normal : sub;
  res = e >= 143u ? 0x7C00u : res;
  res = a > 0x7F800000u ? 0x7E00u : res;
  return uint16_t(sign | res);
}

// Storage types with stochastic rounding: loads as BF16/F16, store_r rounds with the element's
// random bits.  Structural (a template parameter like the dtype): the key and the element
// index are runtime values.
// The key a launch's scalars carry.
template <class Scalars>
EK_HD SrKey sr_key_of(const Scalars& s) {
  SrKey k;
  k.k0 = s.sr_k0;
  k.k1 = s.sr_k1;
  return k;
}

struct BF16SR : BF16 {
  static EK_HD uint16_t store_r(float f, uint32_t r) { return bf16_round_sr(f, r); }
  static constexpr bool kStochastic = true;
};

struct F16SR : F16 {
  static EK_HD uint16_t store_r(float f, uint32_t r) { return f16_round_sr(f, r); }
  static constexpr bool kStochastic = true;
};

// ------------------------------------------------------------------------------------------
// Lion (issue 25; Chen et al. 2023, lucidrains/lion-pytorch's order of operations).  Operation
// order = ema_kernels/backends/_reference_rules.py lion_ema.
// ------------------------------------------------------------------------------------------
struct LionScalars {
  float beta1, one_minus_beta1;  // float(beta1), float(1 - beta1)
  float beta2, one_minus_beta2;  // float(beta2), float(1 - beta2)
  float decay;                   // float(1 - lr * wd)
  float neg_lr;                  // float(-lr)
  float gsign;                   // -1 if maximize else 1
  EmaWeights ema;
  uint32_t sr_k0, sr_k1;
};

struct LionConfig {
  bool wd;         // weight_decay != 0
  bool has_scale;  // grad_scale given
};

EK_HD LionScalars make_lion_scalars(double lr, double beta1, double beta2, double wd,
                                    bool maximize, const EmaWeights& ema) {
  LionScalars s;
  s.beta1 = float(beta1);
  s.one_minus_beta1 = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.decay = float(1.0 - lr * wd);
  s.neg_lr = float(-lr);
  s.gsign = maximize ? -1.0f : 1.0f;
  s.ema = ema;
  s.sr_k0 = s.sr_k1 = 0;
  return s;
}

// torch.sign: 1, -1, or 0 (for ±0 and NaN).
EK_HD float sign_of(float c) { return c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f); }

// Lion on one element; returns the new theta (before rounding to the storage dtype).
template <class Cfg>
EK_HD float lion_update(float theta, float g, float& m, const LionScalars& s, float grad_scale,
                        const Cfg& cfg) {
  if (cfg.has_scale) g = fdiv(g, grad_scale);
  g = fmul(g, s.gsign);
  if (cfg.wd) theta = fmul(theta, s.decay);                        // theta.mul_(1 - lr*wd)
  const float c = ffma(g, s.one_minus_beta1, fmul(m, s.beta1));    // mul(m, b1).add_(g, alpha)
  theta = ffma(sign_of(c), s.neg_lr, theta);                       // theta.add_(sign, alpha=-lr)
  m = ffma(g, s.one_minus_beta2, fmul(m, s.beta2));                // m.mul_(b2).add_(g, alpha)
  return theta;
}

template <class S, int NZ, class Cfg>
EK_HD void lion_ema_element(typename S::raw& p, typename S::raw g, float& m, float* z,
                            const LionScalars& s, float grad_scale, const Cfg& cfg,
                            uint32_t rbits = 0) {
  const float th = lion_update(S::load(p), S::load(g), m, s, grad_scale, cfg);
  p = S::store_r(th, rbits);
  ema_update_all<NZ>(z, S::kRounds ? S::load(p) : th, s.ema);
}

// ------------------------------------------------------------------------------------------
// LARS (issue 25; Lightning Bolts' LARS).  Operation order = _reference_rules.py lars_ema:
// d = g (unscaled, sign-flipped); d.addcmul_(theta, wd_i).mul_(ratio_i); then SGD's momentum.
// The per-tensor (ratio, wd) pair comes from the optimizer's norms pass (norms.lars_coefs) and
// is a runtime value of the tensor, read once per span; the other scalars are SGD's.
// ------------------------------------------------------------------------------------------
struct LarsConfig {
  bool has_scale;  // grad_scale given
  bool nesterov;
};

struct LarsCoef {
  float ratio, wd;  // the tensor's trust ratio and the weight decay applied (0: none)
};

template <int MODE, class Cfg>
EK_HD float lars_update(float theta, float g, float& buf, const SgdScalars& s, LarsCoef c,
                        float grad_scale, const Cfg& cfg) {
  float d = g;
  if (cfg.has_scale) d = fdiv(d, grad_scale);
  d = fmul(d, s.gsign);
  d = fmul(ffma(theta, c.wd, d), c.ratio);  // d.addcmul_(theta, wd).mul_(ratio)
  return sgd_momentum_step<MODE>(theta, d, buf, s, cfg);
}

template <class S, int MODE, int NZ, class Cfg>
EK_HD void lars_ema_element(typename S::raw& p, typename S::raw g, float& buf, float* z,
                            const SgdScalars& s, LarsCoef c, float grad_scale, const Cfg& cfg,
                            uint32_t rbits = 0) {
  const float th = lars_update<MODE>(S::load(p), S::load(g), buf, s, c, grad_scale, cfg);
  p = S::store_r(th, rbits);
  ema_update_all<NZ>(z, S::kRounds ? S::load(p) : th, s.ema);
}

// ------------------------------------------------------------------------------------------
// LAMB (issue 25; You et al. 2020), two passes as apex's FusedLAMB.  Operation order =
// _reference_rules.py lamb_moments / _lamb_direction / lamb_ema.
//   pass 1: m, v updated (Adam's ops); returns r = m/bc1 / (sqrt(v)/bc2_sqrt + eps) + wd*theta
//           (the caller sums theta^2 and r^2 per tensor);
//   pass 2: r recomputed from the stored m, v and the unchanged theta (the same ops: bit for
//           bit pass 1's r), theta += (-lr*ratio_i) * r, the EMAs.
// ------------------------------------------------------------------------------------------
struct LambScalars {
  float one_minus_beta1;  // float(1 - beta1)
  float beta2;            // float(beta2)
  float one_minus_beta2;  // float(1 - beta2)
  float bc1;              // float(1 - beta1^t) (1 without bias correction)
  float bc2_sqrt;         // float(sqrt(1 - beta2^t))
  float eps;              // float(eps)
  float wd;               // float(weight_decay)
  float gsign;            // -1 if maximize else 1
  EmaWeights ema;
  uint32_t sr_k0, sr_k1;
};

struct LambConfig {
  bool wd;         // weight_decay != 0
  bool has_scale;  // grad_scale given
};

EK_HD LambScalars make_lamb_scalars(double beta1, double beta2, double eps, double wd,
                                    bool maximize, double bc1, double bc2_sqrt,
                                    const EmaWeights& ema) {
  LambScalars s;
  s.one_minus_beta1 = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.bc1 = float(bc1);
  s.bc2_sqrt = float(bc2_sqrt);
  s.eps = float(eps);
  s.wd = float(wd);
  s.gsign = maximize ? -1.0f : 1.0f;
  s.ema = ema;
  s.sr_k0 = s.sr_k1 = 0;
  return s;
}

// r from the (new) moments: the one copy both passes use.
template <class Cfg>
EK_HD float lamb_direction(float theta, float m, float v, const LambScalars& s, const Cfg& cfg) {
  const float den = fadd(fdiv(fsqrt(v), s.bc2_sqrt), s.eps);  // sqrt(v).div_(bc2).add_(eps)
  float r = fdiv(fdiv(m, s.bc1), den);                         // div(m, bc1).div_(den)
  if (cfg.wd) r = ffma(theta, s.wd, r);                        // .add_(theta, alpha=wd)
  return r;
}

// Pass 1 on one element: updates m and v, returns r (theta is only read).
template <class Cfg>
EK_HD float lamb_moments_update(float theta, float g, float& m, float& v, const LambScalars& s,
                                float grad_scale, const Cfg& cfg) {
  if (cfg.has_scale) g = fdiv(g, grad_scale);
  g = fmul(g, s.gsign);
  m = lerp(m, g, s.one_minus_beta1);               // m.lerp_(g, 1 - beta1)
  v = ffma(fmul(s.one_minus_beta2, g), g, fmul(v, s.beta2));  // v.mul_(b2).addcmul_(g, g, 1-b2)
  return lamb_direction(theta, m, v, s, cfg);
}

// Pass 2 on one element; neg_step = -(lr * trust ratio) of the element's tensor.
template <class S, int NZ, class Cfg>
EK_HD void lamb_ema_element(typename S::raw& p, float m, float v, float* z, const LambScalars& s,
                            float neg_step, const Cfg& cfg, uint32_t rbits = 0) {
  const float theta = S::load(p);
  const float th = ffma(lamb_direction(theta, m, v, s, cfg), neg_step, theta);  // addcmul_
  p = S::store_r(th, rbits);
  ema_update_all<NZ>(z, S::kRounds ? S::load(p) : th, s.ema);
}

#if defined(EK_EMULATE_DEVICE)
}  // inline namespace emulated_device
#endif
}  // namespace ek
