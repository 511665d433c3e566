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
  static constexpr bool kRounds = false;  // load(store(x)) == x
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
  static constexpr bool kRounds = true;
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
  static constexpr bool kRounds = true;
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
};

struct AdamConfig {  // runtime structural flags
  bool l2;           // coupled weight decay active (wd != 0 and not decoupled)
  bool has_scale;    // grad_scale given
};

EK_HD AdamScalars make_adam_scalars(double lr, double beta1, double beta2, double eps, double wd,
                                    bool decoupled, bool maximize, double step_size,
                                    double bc2_sqrt, const EmaWeights& ema) {
  AdamScalars s;
  s.decay = (decoupled && wd != 0.0) ? float(1.0 - lr * wd) : 1.0f;
  s.l2 = float(wd);
  s.one_minus_beta1 = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_minus_beta2 = float(1.0 - beta2);
  s.bc2_sqrt = float(bc2_sqrt);
  s.eps = float(eps);
  s.neg_step_size = float(-step_size);
  s.gsign = maximize ? -1.0f : 1.0f;
  s.ema = ema;
  return s;
}

// The capturable path: lr and the step count live in device tensors; the bias corrections are
// formed from them in double, as torch.optim forms them from Python floats.
EK_HD void adam_step_values(double lr, double beta1, double beta2, double step,
                            double* step_size, double* bc2_sqrt) {
  *step_size = lr / (1.0 - pow(beta1, step));
  *bc2_sqrt = sqrt(1.0 - pow(beta2, step));
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
  return s;
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
  if (MODE == kFirstStep) {
    buf = d;                             // buf.copy_(d)
  } else if (MODE == kMomentum) {
    buf = ffma(d, s.one_minus_dampening, fmul(buf, s.momentum));  // buf.mul_(m).add_(d, alpha)
  }
  if (MODE != kNoMomentum) d = cfg.nesterov ? ffma(buf, s.momentum, d) : buf;
  return ffma(d, s.neg_lr, theta);       // theta.add_(d, alpha=-lr)
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
                            const Cfg& cfg) {
  const float th = adam_update<AMSGRAD>(S::load(p), S::load(g), m, v, vmax, s, grad_scale, cfg);
  p = S::store(th);
  ema_update_all<NZ>(z, S::kRounds ? S::load(p) : th, s.ema);
}

template <class S, int MODE, int NZ, class Cfg>
EK_HD void sgd_ema_element(typename S::raw& p, typename S::raw g, float& buf, float* z,
                           const SgdScalars& s, float grad_scale, const Cfg& cfg) {
  const float th = sgd_update<MODE>(S::load(p), S::load(g), buf, s, grad_scale, cfg);
  p = S::store(th);
  ema_update_all<NZ>(z, S::kRounds ? S::load(p) : th, s.ema);
}

template <class S, int NZ>
EK_HD void ema_only_element(typename S::raw p, float* z, const EmaWeights& e) {
  ema_update_all<NZ>(z, S::load(p), e);
}

#if defined(EK_EMULATE_DEVICE)
}  // inline namespace emulated_device
#endif
}  // namespace ek
