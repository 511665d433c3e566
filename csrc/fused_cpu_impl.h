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
template <class S, bool AMSGRAD, bool HAS_EMA, bool L2, bool SCALE>
void adam_loop(typename S::raw* __restrict p, const typename S::raw* __restrict g,
               float* __restrict m, float* __restrict v, float* __restrict vmax,
               float* __restrict z, int64_t n, const AdamScalars s, const float scale) {
  using R = typename S::raw;
  const StaticAdamCfg<L2, SCALE> cfg;
  for (int64_t i = 0; i < n; ++i) {
    R pi = p[i];
    float mi = m[i], vi = v[i];
    float vmi = AMSGRAD ? vmax[i] : 0.0f;
    float zi = HAS_EMA ? z[i] : 0.0f;
    adam_ema_element<S, AMSGRAD, HAS_EMA>(pi, g[i], mi, vi, vmi, zi, s, scale, cfg);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (AMSGRAD) vmax[i] = vmi;
    if (HAS_EMA) z[i] = zi;
  }
}

template <class S, bool AMSGRAD, bool HAS_EMA, bool L2, bool SCALE>
void adam_range(const TensorPtrs& t, int64_t a, int64_t b, const AdamScalars& s, float scale) {
  using R = typename S::raw;
  adam_loop<S, AMSGRAD, HAS_EMA, L2, SCALE>(
      static_cast<R*>(t.p) + a, static_cast<const R*>(t.g) + a, t.s0 + a, t.s1 + a,
      AMSGRAD ? t.s2 + a : nullptr, HAS_EMA ? t.z + a : nullptr, b - a, s, scale);
}

template <class S, int MODE, bool HAS_EMA, bool L2, bool SCALE, bool NESTEROV>
void sgd_loop(typename S::raw* __restrict p, const typename S::raw* __restrict g,
              float* __restrict buf, float* __restrict z, int64_t n, const SgdScalars s,
              const float scale) {
  using R = typename S::raw;
  const StaticSgdCfg<L2, SCALE, NESTEROV> cfg;
  for (int64_t i = 0; i < n; ++i) {
    R pi = p[i];
    float bi = MODE == kMomentum ? buf[i] : 0.0f;
    float zi = HAS_EMA ? z[i] : 0.0f;
    sgd_ema_element<S, MODE, HAS_EMA>(pi, g[i], bi, zi, s, scale, cfg);
    p[i] = pi;
    if (MODE != kNoMomentum) buf[i] = bi;
    if (HAS_EMA) z[i] = zi;
  }
}

template <class S, int MODE, bool HAS_EMA, bool L2, bool SCALE, bool NESTEROV>
void sgd_range(const TensorPtrs& t, int64_t a, int64_t b, const SgdScalars& s, float scale) {
  using R = typename S::raw;
  sgd_loop<S, MODE, HAS_EMA, L2, SCALE, NESTEROV>(
      static_cast<R*>(t.p) + a, static_cast<const R*>(t.g) + a,
      MODE != kNoMomentum ? t.s0 + a : nullptr, HAS_EMA ? t.z + a : nullptr, b - a, s, scale);
}

template <class S>
void ema_loop(const typename S::raw* __restrict p, float* __restrict z, int64_t n,
              const float w) {
  for (int64_t i = 0; i < n; ++i) {
    float zi = z[i];
    ema_only_element<S>(p[i], zi, w);
    z[i] = zi;
  }
}

template <class S>
void ema_range(const TensorPtrs& t, int64_t a, int64_t b, float w) {
  using R = typename S::raw;
  ema_loop<S>(static_cast<const R*>(t.p) + a, t.z + a, b - a, w);
}

// ---- dispatch from runtime flags to the instantiation (one per ISA variant) ----

template <class S>
AdamRangeFn adam_pick(bool ams, bool ema, bool l2, bool scale) {
  const int k = (ams << 3) | (ema << 2) | (l2 << 1) | int(scale);
  switch (k) {
#define EK_CASE(A, E, L, C) \
  case (A << 3) | (E << 2) | (L << 1) | C: return &adam_range<S, A, E, L, C>;
    EK_CASE(0, 0, 0, 0) EK_CASE(0, 0, 0, 1) EK_CASE(0, 0, 1, 0) EK_CASE(0, 0, 1, 1)
    EK_CASE(0, 1, 0, 0) EK_CASE(0, 1, 0, 1) EK_CASE(0, 1, 1, 0) EK_CASE(0, 1, 1, 1)
    EK_CASE(1, 0, 0, 0) EK_CASE(1, 0, 0, 1) EK_CASE(1, 0, 1, 0) EK_CASE(1, 0, 1, 1)
    EK_CASE(1, 1, 0, 0) EK_CASE(1, 1, 0, 1) EK_CASE(1, 1, 1, 0) EK_CASE(1, 1, 1, 1)
#undef EK_CASE
  }
  return nullptr;
}

template <class S, int MODE, bool NESTEROV>
SgdRangeFn sgd_pick_mode(bool ema, bool l2, bool scale) {
  const int k = (ema << 2) | (l2 << 1) | int(scale);
  switch (k) {
#define EK_CASE(E, L, C) \
  case (E << 2) | (L << 1) | C: return &sgd_range<S, MODE, E, L, C, NESTEROV>;
    EK_CASE(0, 0, 0) EK_CASE(0, 0, 1) EK_CASE(0, 1, 0) EK_CASE(0, 1, 1)
    EK_CASE(1, 0, 0) EK_CASE(1, 0, 1) EK_CASE(1, 1, 0) EK_CASE(1, 1, 1)
#undef EK_CASE
  }
  return nullptr;
}

template <class S>
SgdRangeFn sgd_pick(int mode, bool nesterov, bool ema, bool l2, bool scale) {
  if (mode == kNoMomentum) return sgd_pick_mode<S, kNoMomentum, false>(ema, l2, scale);
  if (mode == kFirstStep)
    return nesterov ? sgd_pick_mode<S, kFirstStep, true>(ema, l2, scale)
                    : sgd_pick_mode<S, kFirstStep, false>(ema, l2, scale);
  return nesterov ? sgd_pick_mode<S, kMomentum, true>(ema, l2, scale)
                  : sgd_pick_mode<S, kMomentum, false>(ema, l2, scale);
}

inline AdamRangeFn adam_fn(DType dt, bool ams, bool ema, bool l2, bool scale) {
  switch (dt) {
    case DType::kF32: return adam_pick<F32>(ams, ema, l2, scale);
    case DType::kBF16: return adam_pick<BF16>(ams, ema, l2, scale);
    case DType::kF16: return adam_pick<F16>(ams, ema, l2, scale);
  }
  return nullptr;
}

inline SgdRangeFn sgd_fn(DType dt, int mode, bool nesterov, bool ema, bool l2, bool scale) {
  switch (dt) {
    case DType::kF32: return sgd_pick<F32>(mode, nesterov, ema, l2, scale);
    case DType::kBF16: return sgd_pick<BF16>(mode, nesterov, ema, l2, scale);
    case DType::kF16: return sgd_pick<F16>(mode, nesterov, ema, l2, scale);
  }
  return nullptr;
}

inline EmaRangeFn ema_fn(DType dt) {
  switch (dt) {
    case DType::kF32: return &ema_range<F32>;
    case DType::kBF16: return &ema_range<BF16>;
    case DType::kF16: return &ema_range<F16>;
  }
  return nullptr;
}
