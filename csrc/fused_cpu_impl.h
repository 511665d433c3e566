// fused_cpu_impl.h -- the CPU loops, included by fused_cpu.cpp once per instruction-set variant
// (inside `namespace ek::EK_CPU_NS`, under a `#pragma GCC target` for the AVX2 one).  No include
// guard on purpose.  The math is fused_math.h's; this file only walks memory.
//
// Each loop is a plain indexed loop over __restrict pointers with the per-step scalars hoisted
// and every flag a compile-time constant, so GCC vectorises it (-O3 -fno-math-errno: sqrtf
// becomes a vector sqrt).  Rounding to bf16/fp16 is branch-free round-to-nearest-even.

template <bool V>
struct Flag {
  static constexpr bool value = V;
};

template <bool L2, bool SCALE>
struct StaticAdamCfg {
  static constexpr bool l2 = L2;
  static constexpr bool has_scale = SCALE;
};

template <bool L2, bool SCALE, bool NESTEROV>
struct StaticSgdCfg {
  static constexpr bool l2 = L2;
  static constexpr bool has_scale = SCALE;
  static constexpr bool nesterov = NESTEROV;
};

// The loops take their pointers as __restrict *parameters* (GCC ignores restrict on locals and
// would otherwise version the loop with pairwise alias checks, or give up past ten of them).
// EMA k < NZ is z<k>; the others are nullptr and never touched (NZ is a template parameter).
template <class S, bool AMSGRAD, int NZ, bool L2, bool SCALE>
void adam_loop(typename S::raw* __restrict p, const typename S::raw* __restrict g,
               float* __restrict m, float* __restrict v, float* __restrict vmax,
               float* __restrict z0, float* __restrict z1, float* __restrict z2,
               float* __restrict z3, int64_t n, const AdamScalars s, const float scale,
               const uint64_t idx0) {
  using R = typename S::raw;
  const StaticAdamCfg<L2, SCALE> cfg;
  const SrKey key = sr_key_of(s);
  const SrRun run = sr_run(key, idx0);
  for (int64_t i = 0; i < n; ++i) {
    R pi = p[i];
    float mi = m[i], vi = v[i];
    float vmi = AMSGRAD ? vmax[i] : 0.0f;
    float zi[kMaxEmas];
    if (NZ > 0) zi[0] = z0[i];
    if (NZ > 1) zi[1] = z1[i];
    if (NZ > 2) zi[2] = z2[i];
    if (NZ > 3) zi[3] = z3[i];
    // idx0 + i: the element's index for stochastic rounding (a no-op for other types); a
    // range is at most one chunk (< 2^32 elements), so i fits 32 bits
    const uint32_t rb = S::kStochastic ? sr_bits_at(key, run, uint32_t(i)) : 0u;
    adam_ema_element<S, AMSGRAD, NZ>(pi, g[i], mi, vi, vmi, zi, s, scale, cfg, rb);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (AMSGRAD) vmax[i] = vmi;
    if (NZ > 0) z0[i] = zi[0];
    if (NZ > 1) z1[i] = zi[1];
    if (NZ > 2) z2[i] = zi[2];
    if (NZ > 3) z3[i] = zi[3];
  }
}

// EMA k of a range starting at element a (nullptr past the EMAs updated).
template <int NZ>
inline float* ema_at(const TensorPtrs& t, int k, int64_t a) {
  return k < NZ ? t.z[k] + a : nullptr;
}

template <class S, bool AMSGRAD, int NZ, bool L2, bool SCALE>
void adam_range(const TensorPtrs& t, int64_t a, int64_t b, const AdamScalars& s, float scale) {
  using R = typename S::raw;
  adam_loop<S, AMSGRAD, NZ, L2, SCALE>(
      static_cast<R*>(t.p) + a, static_cast<const R*>(t.g) + a, t.s0 + a, t.s1 + a,
      AMSGRAD ? t.s2 + a : nullptr, ema_at<NZ>(t, 0, a), ema_at<NZ>(t, 1, a),
      ema_at<NZ>(t, 2, a), ema_at<NZ>(t, 3, a), b - a, s, scale, uint64_t(t.sr_base + a));
}

template <class S, int MODE, int NZ, bool L2, bool SCALE, bool NESTEROV>
void sgd_loop(typename S::raw* __restrict p, const typename S::raw* __restrict g,
              float* __restrict buf, float* __restrict z0, float* __restrict z1,
              float* __restrict z2, float* __restrict z3, int64_t n, const SgdScalars s,
              const float scale, const uint64_t idx0) {
  using R = typename S::raw;
  const StaticSgdCfg<L2, SCALE, NESTEROV> cfg;
  const SrKey key = sr_key_of(s);
  const SrRun run = sr_run(key, idx0);
  for (int64_t i = 0; i < n; ++i) {
    R pi = p[i];
    float bi = MODE == kMomentum ? buf[i] : 0.0f;
    float zi[kMaxEmas];
    if (NZ > 0) zi[0] = z0[i];
    if (NZ > 1) zi[1] = z1[i];
    if (NZ > 2) zi[2] = z2[i];
    if (NZ > 3) zi[3] = z3[i];
    const uint32_t rb = S::kStochastic ? sr_bits_at(key, run, uint32_t(i)) : 0u;
    sgd_ema_element<S, MODE, NZ>(pi, g[i], bi, zi, s, scale, cfg, rb);
    p[i] = pi;
    if (MODE != kNoMomentum) buf[i] = bi;
    if (NZ > 0) z0[i] = zi[0];
    if (NZ > 1) z1[i] = zi[1];
    if (NZ > 2) z2[i] = zi[2];
    if (NZ > 3) z3[i] = zi[3];
  }
}

template <class S, int MODE, int NZ, bool L2, bool SCALE, bool NESTEROV>
void sgd_range(const TensorPtrs& t, int64_t a, int64_t b, const SgdScalars& s, float scale) {
  using R = typename S::raw;
  sgd_loop<S, MODE, NZ, L2, SCALE, NESTEROV>(
      static_cast<R*>(t.p) + a, static_cast<const R*>(t.g) + a,
      MODE != kNoMomentum ? t.s0 + a : nullptr, ema_at<NZ>(t, 0, a), ema_at<NZ>(t, 1, a),
      ema_at<NZ>(t, 2, a), ema_at<NZ>(t, 3, a), b - a, s, scale, uint64_t(t.sr_base + a));
}

template <class S, int NZ>
void ema_loop(const typename S::raw* __restrict p, float* __restrict z0, float* __restrict z1,
              float* __restrict z2, float* __restrict z3, int64_t n, const EmaWeights w) {
  for (int64_t i = 0; i < n; ++i) {
    float zi[kMaxEmas];
    if (NZ > 0) zi[0] = z0[i];
    if (NZ > 1) zi[1] = z1[i];
    if (NZ > 2) zi[2] = z2[i];
    if (NZ > 3) zi[3] = z3[i];
    ema_only_element<S, NZ>(p[i], zi, w);
    if (NZ > 0) z0[i] = zi[0];
    if (NZ > 1) z1[i] = zi[1];
    if (NZ > 2) z2[i] = zi[2];
    if (NZ > 3) z3[i] = zi[3];
  }
}

template <class S, int NZ>
void ema_range(const TensorPtrs& t, int64_t a, int64_t b, const EmaWeights& w) {
  using R = typename S::raw;
  ema_loop<S, NZ>(static_cast<const R*>(t.p) + a, ema_at<NZ>(t, 0, a), ema_at<NZ>(t, 1, a),
                  ema_at<NZ>(t, 2, a), ema_at<NZ>(t, 3, a), b - a, w);
}

// ---- dispatch from runtime flags to the instantiation (one per ISA variant) ----
static_assert(kMaxEmas == 4, "the loops above and the switches below spell out EMAs 0..3");

template <class S, int NZ>
AdamRangeFn adam_pick_nz(bool ams, bool l2, bool scale) {
  const int k = (ams << 2) | (l2 << 1) | int(scale);
  switch (k) {
#define EK_CASE(A, L, C) \
  case (A << 2) | (L << 1) | C: return &adam_range<S, A, NZ, L, C>;
    EK_CASE(0, 0, 0) EK_CASE(0, 0, 1) EK_CASE(0, 1, 0) EK_CASE(0, 1, 1)
    EK_CASE(1, 0, 0) EK_CASE(1, 0, 1) EK_CASE(1, 1, 0) EK_CASE(1, 1, 1)
#undef EK_CASE
  }
  return nullptr;
}

template <class S>
AdamRangeFn adam_pick(bool ams, int nz, bool l2, bool scale) {
  switch (nz) {
    case 0: return adam_pick_nz<S, 0>(ams, l2, scale);
    case 1: return adam_pick_nz<S, 1>(ams, l2, scale);
    case 2: return adam_pick_nz<S, 2>(ams, l2, scale);
    case 3: return adam_pick_nz<S, 3>(ams, l2, scale);
    case 4: return adam_pick_nz<S, 4>(ams, l2, scale);
  }
  return nullptr;
}

template <class S, int MODE, bool NESTEROV, int NZ>
SgdRangeFn sgd_pick_nz(bool l2, bool scale) {
  const int k = (l2 << 1) | int(scale);
  switch (k) {
#define EK_CASE(L, C) \
  case (L << 1) | C: return &sgd_range<S, MODE, NZ, L, C, NESTEROV>;
    EK_CASE(0, 0) EK_CASE(0, 1) EK_CASE(1, 0) EK_CASE(1, 1)
#undef EK_CASE
  }
  return nullptr;
}

template <class S, int MODE, bool NESTEROV>
SgdRangeFn sgd_pick_mode(int nz, bool l2, bool scale) {
  switch (nz) {
    case 0: return sgd_pick_nz<S, MODE, NESTEROV, 0>(l2, scale);
    case 1: return sgd_pick_nz<S, MODE, NESTEROV, 1>(l2, scale);
    case 2: return sgd_pick_nz<S, MODE, NESTEROV, 2>(l2, scale);
    case 3: return sgd_pick_nz<S, MODE, NESTEROV, 3>(l2, scale);
    case 4: return sgd_pick_nz<S, MODE, NESTEROV, 4>(l2, scale);
  }
  return nullptr;
}

template <class S>
SgdRangeFn sgd_pick(int mode, bool nesterov, int nz, bool l2, bool scale) {
  if (mode == kNoMomentum) return sgd_pick_mode<S, kNoMomentum, false>(nz, l2, scale);
  if (mode == kFirstStep)
    return nesterov ? sgd_pick_mode<S, kFirstStep, true>(nz, l2, scale)
                    : sgd_pick_mode<S, kFirstStep, false>(nz, l2, scale);
  return nesterov ? sgd_pick_mode<S, kMomentum, true>(nz, l2, scale)
                  : sgd_pick_mode<S, kMomentum, false>(nz, l2, scale);
}

// sr: stochastic rounding (bf16/fp16 only: fp32 parameters are stored exactly, the flag costs
// nothing there).
inline AdamRangeFn adam_fn(DType dt, bool ams, int nz, bool l2, bool scale, bool sr) {
  switch (dt) {
    case DType::kF32: return adam_pick<F32>(ams, nz, l2, scale);
    case DType::kBF16:
      return sr ? adam_pick<BF16SR>(ams, nz, l2, scale) : adam_pick<BF16>(ams, nz, l2, scale);
    case DType::kF16:
      return sr ? adam_pick<F16SR>(ams, nz, l2, scale) : adam_pick<F16>(ams, nz, l2, scale);
  }
  return nullptr;
}

inline SgdRangeFn sgd_fn(DType dt, int mode, bool nesterov, int nz, bool l2, bool scale,
                         bool sr) {
  switch (dt) {
    case DType::kF32: return sgd_pick<F32>(mode, nesterov, nz, l2, scale);
    case DType::kBF16:
      return sr ? sgd_pick<BF16SR>(mode, nesterov, nz, l2, scale)
                : sgd_pick<BF16>(mode, nesterov, nz, l2, scale);
    case DType::kF16:
      return sr ? sgd_pick<F16SR>(mode, nesterov, nz, l2, scale)
                : sgd_pick<F16>(mode, nesterov, nz, l2, scale);
  }
  return nullptr;
}

template <class S>
EmaRangeFn ema_pick(int nz) {
  switch (nz) {
    case 1: return &ema_range<S, 1>;
    case 2: return &ema_range<S, 2>;
    case 3: return &ema_range<S, 3>;
    case 4: return &ema_range<S, 4>;
  }
  return nullptr;
}

inline EmaRangeFn ema_fn(DType dt, int nz) {
  switch (dt) {
    case DType::kF32: return ema_pick<F32>(nz);
    case DType::kBF16: return ema_pick<BF16>(nz);
    case DType::kF16: return ema_pick<F16>(nz);
  }
  return nullptr;
}

// ---- Lion (issue 25) ----
template <bool WD, bool SCALE>
struct StaticLionCfg {
  static constexpr bool wd = WD;
  static constexpr bool has_scale = SCALE;
};

template <class S, int NZ, bool WD, bool SCALE>
void lion_loop(typename S::raw* __restrict p, const typename S::raw* __restrict g,
               float* __restrict m, float* __restrict z0, float* __restrict z1,
               float* __restrict z2, float* __restrict z3, int64_t n, const LionScalars s,
               const float scale, const uint64_t idx0) {
  using R = typename S::raw;
  const StaticLionCfg<WD, SCALE> cfg;
  const SrKey key = sr_key_of(s);
  const SrRun run = sr_run(key, idx0);
  for (int64_t i = 0; i < n; ++i) {
    R pi = p[i];
    float mi = m[i];
    float zi[kMaxEmas];
    if (NZ > 0) zi[0] = z0[i];
    if (NZ > 1) zi[1] = z1[i];
    if (NZ > 2) zi[2] = z2[i];
    if (NZ > 3) zi[3] = z3[i];
    const uint32_t rb = S::kStochastic ? sr_bits_at(key, run, uint32_t(i)) : 0u;
    lion_ema_element<S, NZ>(pi, g[i], mi, zi, s, scale, cfg, rb);
    p[i] = pi;
    m[i] = mi;
    if (NZ > 0) z0[i] = zi[0];
    if (NZ > 1) z1[i] = zi[1];
    if (NZ > 2) z2[i] = zi[2];
    if (NZ > 3) z3[i] = zi[3];
  }
}

template <class S, int NZ, bool WD, bool SCALE>
void lion_range(const TensorPtrs& t, int64_t a, int64_t b, const LionScalars& s, float scale) {
  using R = typename S::raw;
  lion_loop<S, NZ, WD, SCALE>(static_cast<R*>(t.p) + a, static_cast<const R*>(t.g) + a,
                              t.s0 + a, ema_at<NZ>(t, 0, a), ema_at<NZ>(t, 1, a),
                              ema_at<NZ>(t, 2, a), ema_at<NZ>(t, 3, a), b - a, s, scale,
                              uint64_t(t.sr_base + a));
}

template <class S, int NZ>
LionRangeFn lion_pick_nz(bool wd, bool scale) {
  switch ((wd << 1) | int(scale)) {
#define EK_CASE(W, C) \
  case (W << 1) | C: return &lion_range<S, NZ, W, C>;
    EK_CASE(0, 0) EK_CASE(0, 1) EK_CASE(1, 0) EK_CASE(1, 1)
#undef EK_CASE
  }
  return nullptr;
}

template <class S>
LionRangeFn lion_pick(int nz, bool wd, bool scale) {
  switch (nz) {
    case 0: return lion_pick_nz<S, 0>(wd, scale);
    case 1: return lion_pick_nz<S, 1>(wd, scale);
    case 2: return lion_pick_nz<S, 2>(wd, scale);
    case 3: return lion_pick_nz<S, 3>(wd, scale);
    case 4: return lion_pick_nz<S, 4>(wd, scale);
  }
  return nullptr;
}

inline LionRangeFn lion_fn(DType dt, int nz, bool wd, bool scale, bool sr) {
  switch (dt) {
    case DType::kF32: return lion_pick<F32>(nz, wd, scale);
    case DType::kBF16:
      return sr ? lion_pick<BF16SR>(nz, wd, scale) : lion_pick<BF16>(nz, wd, scale);
    case DType::kF16:
      return sr ? lion_pick<F16SR>(nz, wd, scale) : lion_pick<F16>(nz, wd, scale);
  }
  return nullptr;
}

// ---- LARS (issue 25): SGD's loop on the trust-ratio-scaled direction ----
template <bool SCALE, bool NESTEROV>
struct StaticLarsCfg {
  static constexpr bool has_scale = SCALE;
  static constexpr bool nesterov = NESTEROV;
};

template <class S, int MODE, int NZ, bool SCALE, bool NESTEROV>
void lars_loop(typename S::raw* __restrict p, const typename S::raw* __restrict g,
               float* __restrict buf, float* __restrict z0, float* __restrict z1,
               float* __restrict z2, float* __restrict z3, int64_t n, const SgdScalars s,
               const LarsCoef c, const float scale, const uint64_t idx0) {
  using R = typename S::raw;
  const StaticLarsCfg<SCALE, NESTEROV> cfg;
  const SrKey key = sr_key_of(s);
  const SrRun run = sr_run(key, idx0);
  for (int64_t i = 0; i < n; ++i) {
    R pi = p[i];
    float bi = MODE == kMomentum ? buf[i] : 0.0f;
    float zi[kMaxEmas];
    if (NZ > 0) zi[0] = z0[i];
    if (NZ > 1) zi[1] = z1[i];
    if (NZ > 2) zi[2] = z2[i];
    if (NZ > 3) zi[3] = z3[i];
    const uint32_t rb = S::kStochastic ? sr_bits_at(key, run, uint32_t(i)) : 0u;
    lars_ema_element<S, MODE, NZ>(pi, g[i], bi, zi, s, c, scale, cfg, rb);
    p[i] = pi;
    if (MODE != kNoMomentum) buf[i] = bi;
    if (NZ > 0) z0[i] = zi[0];
    if (NZ > 1) z1[i] = zi[1];
    if (NZ > 2) z2[i] = zi[2];
    if (NZ > 3) z3[i] = zi[3];
  }
}

template <class S, int MODE, int NZ, bool SCALE, bool NESTEROV>
void lars_range(const TensorPtrs& t, int64_t a, int64_t b, const SgdScalars& s, float scale) {
  using R = typename S::raw;
  const LarsCoef c{t.s1[0], t.s1[1]};  // the tensor's row of coefs
  lars_loop<S, MODE, NZ, SCALE, NESTEROV>(
      static_cast<R*>(t.p) + a, static_cast<const R*>(t.g) + a,
      MODE != kNoMomentum ? t.s0 + a : nullptr, ema_at<NZ>(t, 0, a), ema_at<NZ>(t, 1, a),
      ema_at<NZ>(t, 2, a), ema_at<NZ>(t, 3, a), b - a, s, c, scale, uint64_t(t.sr_base + a));
}

template <class S, int MODE, bool NESTEROV, int NZ>
SgdRangeFn lars_pick_nz(bool scale) {
  return scale ? &lars_range<S, MODE, NZ, true, NESTEROV>
               : &lars_range<S, MODE, NZ, false, NESTEROV>;
}

template <class S, int MODE, bool NESTEROV>
SgdRangeFn lars_pick_mode(int nz, bool scale) {
  switch (nz) {
    case 0: return lars_pick_nz<S, MODE, NESTEROV, 0>(scale);
    case 1: return lars_pick_nz<S, MODE, NESTEROV, 1>(scale);
    case 2: return lars_pick_nz<S, MODE, NESTEROV, 2>(scale);
    case 3: return lars_pick_nz<S, MODE, NESTEROV, 3>(scale);
    case 4: return lars_pick_nz<S, MODE, NESTEROV, 4>(scale);
  }
  return nullptr;
}

template <class S>
SgdRangeFn lars_pick(int mode, bool nesterov, int nz, bool scale) {
  if (mode == kNoMomentum) return lars_pick_mode<S, kNoMomentum, false>(nz, scale);
  if (mode == kFirstStep)
    return nesterov ? lars_pick_mode<S, kFirstStep, true>(nz, scale)
                    : lars_pick_mode<S, kFirstStep, false>(nz, scale);
  return nesterov ? lars_pick_mode<S, kMomentum, true>(nz, scale)
                  : lars_pick_mode<S, kMomentum, false>(nz, scale);
}

inline SgdRangeFn lars_fn(DType dt, int mode, bool nesterov, int nz, bool scale, bool sr) {
  switch (dt) {
    case DType::kF32: return lars_pick<F32>(mode, nesterov, nz, scale);
    case DType::kBF16:
      return sr ? lars_pick<BF16SR>(mode, nesterov, nz, scale)
                : lars_pick<BF16>(mode, nesterov, nz, scale);
    case DType::kF16:
      return sr ? lars_pick<F16SR>(mode, nesterov, nz, scale)
                : lars_pick<F16>(mode, nesterov, nz, scale);
  }
  return nullptr;
}

// ---- LAMB (issue 25) ----
template <bool WD, bool SCALE>
struct StaticLambCfg {
  static constexpr bool wd = WD;
  static constexpr bool has_scale = SCALE;
};

// Pass 1 over n elements: m, v updated in place; out[0] += sum theta^2, out[1] += sum r^2 of
// these elements, in float64 (each square exact).  The summation order (fixed, whatever the
// thread count): per sub-block of kLambBlock elements the elementwise loop (vectorised) keeps
// theta and r, then element j of the range goes to partial sum j mod 4 (the range's last n mod 4
// elements to partial 0), the partials combined as (p0 + p1) + (p2 + p3).
constexpr int kLambBlock = 256;

template <class S, bool WD, bool SCALE>
void lamb_moments_loop(const typename S::raw* __restrict p, const typename S::raw* __restrict g,
                       float* __restrict m, float* __restrict v, int64_t n,
                       const LambScalars s, const float scale, double* out) {
  const StaticLambCfg<WD, SCALE> cfg;
  float th[kLambBlock], rr[kLambBlock];
  double a[4] = {0.0, 0.0, 0.0, 0.0}, b[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t i0 = 0; i0 < n; i0 += kLambBlock) {
    const int nb = int(n - i0 < kLambBlock ? n - i0 : kLambBlock);
    for (int j = 0; j < nb; ++j) {
      const float t = S::load(p[i0 + j]);
      float mi = m[i0 + j], vi = v[i0 + j];
      rr[j] = lamb_moments_update(t, S::load(g[i0 + j]), mi, vi, s, scale, cfg);
      m[i0 + j] = mi;
      v[i0 + j] = vi;
      th[j] = t;
    }
    int j = 0;
    for (; j + 4 <= nb; j += 4) {
      for (int k = 0; k < 4; ++k) {
        a[k] += double(th[j + k]) * double(th[j + k]);
        b[k] += double(rr[j + k]) * double(rr[j + k]);
      }
    }
    for (; j < nb; ++j) {
      a[0] += double(th[j]) * double(th[j]);
      b[0] += double(rr[j]) * double(rr[j]);
    }
  }
  out[0] = (a[0] + a[1]) + (a[2] + a[3]);
  out[1] = (b[0] + b[1]) + (b[2] + b[3]);
}

template <class S, bool WD, bool SCALE>
void lamb_moments_range(const TensorPtrs& t, int64_t a, int64_t b, const LambScalars& s,
                        float scale, double* out) {
  using R = typename S::raw;
  lamb_moments_loop<S, WD, SCALE>(static_cast<const R*>(t.p) + a, static_cast<const R*>(t.g) + a,
                                  t.s0 + a, t.s1 + a, b - a, s, scale, out);
}

template <class S>
LambMomentsRangeFn lamb_moments_pick(bool wd, bool scale) {
  switch ((wd << 1) | int(scale)) {
#define EK_CASE(W, C) \
  case (W << 1) | C: return &lamb_moments_range<S, W, C>;
    EK_CASE(0, 0) EK_CASE(0, 1) EK_CASE(1, 0) EK_CASE(1, 1)
#undef EK_CASE
  }
  return nullptr;
}

inline LambMomentsRangeFn lamb_moments_fn(DType dt, bool wd, bool scale) {
  switch (dt) {
    case DType::kF32: return lamb_moments_pick<F32>(wd, scale);
    case DType::kBF16: return lamb_moments_pick<BF16>(wd, scale);
    case DType::kF16: return lamb_moments_pick<F16>(wd, scale);
  }
  return nullptr;
}

// Pass 2.
template <class S, int NZ, bool WD>
void lamb_ema_loop(typename S::raw* __restrict p, const float* __restrict m,
                   const float* __restrict v, float* __restrict z0, float* __restrict z1,
                   float* __restrict z2, float* __restrict z3, int64_t n, const LambScalars s,
                   const float neg_step, const uint64_t idx0) {
  using R = typename S::raw;
  const StaticLambCfg<WD, false> cfg;
  const SrKey key = sr_key_of(s);
  const SrRun run = sr_run(key, idx0);
  for (int64_t i = 0; i < n; ++i) {
    R pi = p[i];
    float zi[kMaxEmas];
    if (NZ > 0) zi[0] = z0[i];
    if (NZ > 1) zi[1] = z1[i];
    if (NZ > 2) zi[2] = z2[i];
    if (NZ > 3) zi[3] = z3[i];
    const uint32_t rb = S::kStochastic ? sr_bits_at(key, run, uint32_t(i)) : 0u;
    lamb_ema_element<S, NZ>(pi, m[i], v[i], zi, s, neg_step, cfg, rb);
    p[i] = pi;
    if (NZ > 0) z0[i] = zi[0];
    if (NZ > 1) z1[i] = zi[1];
    if (NZ > 2) z2[i] = zi[2];
    if (NZ > 3) z3[i] = zi[3];
  }
}

template <class S, int NZ, bool WD>
void lamb_ema_range(const TensorPtrs& t, int64_t a, int64_t b, const LambScalars& s) {
  using R = typename S::raw;
  const float neg_step = -t.s2[0];  // the tensor's lr * trust ratio
  lamb_ema_loop<S, NZ, WD>(static_cast<R*>(t.p) + a, t.s0 + a, t.s1 + a, ema_at<NZ>(t, 0, a),
                           ema_at<NZ>(t, 1, a), ema_at<NZ>(t, 2, a), ema_at<NZ>(t, 3, a), b - a,
                           s, neg_step, uint64_t(t.sr_base + a));
}

template <class S>
LambEmaRangeFn lamb_ema_pick(int nz, bool wd) {
  switch (nz) {
#define EK_CASE(N) \
  case N: return wd ? &lamb_ema_range<S, N, true> : &lamb_ema_range<S, N, false>;
    EK_CASE(0) EK_CASE(1) EK_CASE(2) EK_CASE(3) EK_CASE(4)
#undef EK_CASE
  }
  return nullptr;
}

inline LambEmaRangeFn lamb_ema_fn(DType dt, int nz, bool wd, bool sr) {
  switch (dt) {
    case DType::kF32: return lamb_ema_pick<F32>(nz, wd);
    case DType::kBF16: return sr ? lamb_ema_pick<BF16SR>(nz, wd) : lamb_ema_pick<BF16>(nz, wd);
    case DType::kF16: return sr ? lamb_ema_pick<F16SR>(nz, wd) : lamb_ema_pick<F16>(nz, wd);
  }
  return nullptr;
}
