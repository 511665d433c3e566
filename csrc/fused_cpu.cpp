// fused_cpu.cpp -- the CPU twin of the CUDA kernels: the same fused_math.h, OpenMP over
// cache-sized chunks, one vectorisable loop per structural variant.
//
// The loops are compiled twice: for the x86-64 baseline and (on x86) for AVX2, picked at run
// time with __builtin_cpu_supports.  FP contraction is off (ISO C++ mode), so both variants give
// bit-identical results: only the vector width differs.
#include <stdint.h>
#include <math.h>
#include <string.h>

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fused_math.h"
#include "kernels.h"

namespace ek {

using AdamRangeFn = void (*)(const TensorPtrs&, int64_t, int64_t, const AdamScalars&, float);
using SgdRangeFn = void (*)(const TensorPtrs&, int64_t, int64_t, const SgdScalars&, float);
using EmaRangeFn = void (*)(const TensorPtrs&, int64_t, int64_t, const EmaWeights&);
using LionRangeFn = void (*)(const TensorPtrs&, int64_t, int64_t, const LionScalars&, float);
using LambMomentsRangeFn = void (*)(const TensorPtrs&, int64_t, int64_t, const LambScalars&,
                                    float, double*);
using LambEmaRangeFn = void (*)(const TensorPtrs&, int64_t, int64_t, const LambScalars&);

namespace base {
#include "fused_cpu_impl.h"
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__)
#define EK_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "fused_cpu_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace {

bool use_avx2() {
#ifdef EK_HAVE_AVX2_VARIANT
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// 16K elements per chunk: ~576 KB of traffic for fp32 AdamW+EMA, i.e. an L2-sized piece of work
// per scheduling unit.  Chunks of a thread are contiguous (static schedule), so each thread
// streams through memory in order and the hardware prefetchers stay engaged.
constexpr int64_t kChunk = int64_t(1) << 14;
// Below this many elements in total the OpenMP fork/join costs more than it saves.
constexpr int64_t kParallelMin = int64_t(1) << 15;

// Stochastic rounding's per-launch key into the scalars (zeros when off: never read).
template <class Scalars>
void set_sr_key(Scalars& s, const SrArgs& sr) {
  const SrKey k = sr.on ? sr_key(sr.seed, sr.step) : SrKey();
  s.sr_k0 = k.k0;
  s.sr_k1 = k.k1;
}

struct Work {
  int32_t t;
  int64_t a, b;
};

inline void prefetch_start(const TensorPtrs& t) {
  __builtin_prefetch(t.p, 1);
  __builtin_prefetch(t.g);
  __builtin_prefetch(t.s0, 1);
  __builtin_prefetch(t.s1, 1);
  __builtin_prefetch(t.s2, 1);
  for (int k = 0; k < kMaxEmas; ++k) __builtin_prefetch(t.z[k], 1);
}

// The work items of a launch: each tensor cut into kChunk-element ranges, in order.
std::vector<Work> plan_work(const std::vector<TensorPtrs>& ts, int64_t* total_out) {
  int64_t total = 0;
  for (const auto& t : ts) total += t.n;
  *total_out = total;
  std::vector<Work> work;
  if (total == 0) return work;
  work.reserve(size_t(total / kChunk + ts.size()));
  for (size_t i = 0; i < ts.size(); ++i) {
    for (int64_t a = 0; a < ts[i].n; a += kChunk)
      work.push_back({int32_t(i), a, std::min(a + kChunk, ts[i].n)});
  }
  return work;
}

// f(w, tensor, lo, hi) for every work item w, in parallel.
template <class F>
void run_work(const std::vector<TensorPtrs>& ts, const std::vector<Work>& work, int64_t total,
              F&& f) {
  const int64_t nw = int64_t(work.size());
#ifdef _OPENMP
  const bool par = total >= kParallelMin && nw > 1 && omp_get_max_threads() > 1;
#pragma omp parallel for schedule(static) if (par)
#else
  (void)total;
#endif
  for (int64_t w = 0; w < nw; ++w) {
    // Many small tensors: each is a few scattered cache lines the hardware prefetcher cannot
    // guess, so ask for the start of every array of the tensor two items ahead (a prefetch
    // never faults, nullptr or not); a large tensor's chunks stream anyway.
    if (w + 2 < nw && work[w + 2].a == 0) prefetch_start(ts[work[w + 2].t]);
    f(w, ts[work[w].t], work[w].a, work[w].b);
  }
}

template <class F>
void for_each_chunk(const std::vector<TensorPtrs>& ts, F&& f) {
  int64_t total = 0;
  const std::vector<Work> work = plan_work(ts, &total);
  if (total == 0) return;
  run_work(ts, work, total,
           [&](int64_t, const TensorPtrs& t, int64_t lo, int64_t hi) { f(t, lo, hi); });
}

}  // namespace

const char* cpu_isa() { return use_avx2() ? "avx2" : "baseline"; }

void adam_ema_cpu(const std::vector<TensorPtrs>& ts, DType dtype, const AdamArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  double lr = a.lr, step_size = a.step_size, bc2_sqrt = a.bc2_sqrt;
  EmaWeights ema = make_ema_weights(a.ema_w, a.n_emas);
  if (a.capturable) {  // CPU tensors: read them here, with the device path's formulas
    lr = double(*a.cap.lr);
    adam_step_values(lr, a.beta1, a.beta2, double(*a.cap.step), &step_size, &bc2_sqrt);
    ema = make_ema_weights(a.cap.ema_w, a.n_emas);
  }
  AdamScalars s = make_adam_scalars(lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.decoupled,
                                    a.maximize, step_size, bc2_sqrt, ema);
  set_sr_key(s, a.sr);
  const bool l2 = !a.decoupled && a.weight_decay != 0.0;
  const bool scale = a.grad_scale != nullptr;
  const float gs = scale ? *a.grad_scale : 1.0f;
#ifdef EK_HAVE_AVX2_VARIANT
  const AdamRangeFn fn =
      use_avx2() ? avx2::adam_fn(dtype, a.amsgrad, a.n_emas, l2, scale, a.sr.on)
                 : base::adam_fn(dtype, a.amsgrad, a.n_emas, l2, scale, a.sr.on);
#else
  const AdamRangeFn fn = base::adam_fn(dtype, a.amsgrad, a.n_emas, l2, scale, a.sr.on);
#endif
  if (fn == nullptr) return;  // n_emas out of range: refused by the bindings before this
  for_each_chunk(ts, [&](const TensorPtrs& t, int64_t lo, int64_t hi) { fn(t, lo, hi, s, gs); });
}

void sgd_ema_cpu(const std::vector<TensorPtrs>& ts, DType dtype, const SgdArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  double lr = a.lr;
  EmaWeights ema = make_ema_weights(a.ema_w, a.n_emas);
  if (a.capturable) {
    lr = double(*a.cap.lr);
    ema = make_ema_weights(a.cap.ema_w, a.n_emas);
  }
  SgdScalars s = make_sgd_scalars(lr, a.momentum, a.dampening, a.weight_decay, a.maximize, ema);
  set_sr_key(s, a.sr);
  const int mode = a.momentum == 0.0 ? kNoMomentum : (a.first_step ? kFirstStep : kMomentum);
  const bool nesterov = mode != kNoMomentum && a.nesterov;
  const bool l2 = a.weight_decay != 0.0;
  const bool scale = a.grad_scale != nullptr;
  const float gs = scale ? *a.grad_scale : 1.0f;
#ifdef EK_HAVE_AVX2_VARIANT
  const SgdRangeFn fn =
      use_avx2() ? avx2::sgd_fn(dtype, mode, nesterov, a.n_emas, l2, scale, a.sr.on)
                 : base::sgd_fn(dtype, mode, nesterov, a.n_emas, l2, scale, a.sr.on);
#else
  const SgdRangeFn fn = base::sgd_fn(dtype, mode, nesterov, a.n_emas, l2, scale, a.sr.on);
#endif
  if (fn == nullptr) return;
  for_each_chunk(ts, [&](const TensorPtrs& t, int64_t lo, int64_t hi) { fn(t, lo, hi, s, gs); });
}

void ema_only_cpu(const std::vector<TensorPtrs>& ts, DType dtype, const double* ema_w,
                  int n_emas) {
  const EmaWeights w = make_ema_weights(ema_w, n_emas);
#ifdef EK_HAVE_AVX2_VARIANT
  const EmaRangeFn fn = use_avx2() ? avx2::ema_fn(dtype, n_emas) : base::ema_fn(dtype, n_emas);
#else
  const EmaRangeFn fn = base::ema_fn(dtype, n_emas);
#endif
  if (fn == nullptr) return;
  for_each_chunk(ts, [&](const TensorPtrs& t, int64_t lo, int64_t hi) { fn(t, lo, hi, w); });
}

// Lion (issue 25).
void lion_ema_cpu(const std::vector<TensorPtrs>& ts, DType dtype, const LionArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  double lr = a.lr;
  EmaWeights ema = make_ema_weights(a.ema_w, a.n_emas);
  if (a.capturable) {
    lr = double(*a.cap.lr);
    ema = make_ema_weights(a.cap.ema_w, a.n_emas);
  }
  LionScalars s = make_lion_scalars(lr, a.beta1, a.beta2, a.weight_decay, a.maximize, ema);
  set_sr_key(s, a.sr);
  const bool wd = a.weight_decay != 0.0;
  const bool scale = a.grad_scale != nullptr;
  const float gs = scale ? *a.grad_scale : 1.0f;
#ifdef EK_HAVE_AVX2_VARIANT
  const LionRangeFn fn = use_avx2() ? avx2::lion_fn(dtype, a.n_emas, wd, scale, a.sr.on)
                                    : base::lion_fn(dtype, a.n_emas, wd, scale, a.sr.on);
#else
  const LionRangeFn fn = base::lion_fn(dtype, a.n_emas, wd, scale, a.sr.on);
#endif
  if (fn == nullptr) return;
  for_each_chunk(ts, [&](const TensorPtrs& t, int64_t lo, int64_t hi) { fn(t, lo, hi, s, gs); });
}

// LARS (issue 25): SGD's scalars, the per-tensor coefficients from the table (s1).
void lars_ema_cpu(const std::vector<TensorPtrs>& ts, DType dtype, const LarsArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  double lr = a.lr;
  EmaWeights ema = make_ema_weights(a.ema_w, a.n_emas);
  if (a.capturable) {
    lr = double(*a.cap.lr);
    ema = make_ema_weights(a.cap.ema_w, a.n_emas);
  }
  SgdScalars s = make_sgd_scalars(lr, a.momentum, a.dampening, 0.0, a.maximize, ema);
  set_sr_key(s, a.sr);
  const int mode = a.momentum == 0.0 ? kNoMomentum : (a.first_step ? kFirstStep : kMomentum);
  const bool nesterov = mode != kNoMomentum && a.nesterov;
  const bool scale = a.grad_scale != nullptr;
  const float gs = scale ? *a.grad_scale : 1.0f;
#ifdef EK_HAVE_AVX2_VARIANT
  const SgdRangeFn fn = use_avx2() ? avx2::lars_fn(dtype, mode, nesterov, a.n_emas, scale, a.sr.on)
                                   : base::lars_fn(dtype, mode, nesterov, a.n_emas, scale, a.sr.on);
#else
  const SgdRangeFn fn = base::lars_fn(dtype, mode, nesterov, a.n_emas, scale, a.sr.on);
#endif
  if (fn == nullptr) return;
  for_each_chunk(ts, [&](const TensorPtrs& t, int64_t lo, int64_t hi) { fn(t, lo, hi, s, gs); });
}

// LAMB's scalars of a launch (host values, or the device ones: CPU tensors, read here).
LambScalars lamb_scalars(const LambArgs& a) {
  double bc1 = a.bc1, bc2 = a.bc2_sqrt;
  if (a.bc != nullptr) {
    bc1 = double(a.bc[0]);
    bc2 = double(a.bc[1]);
  }
  const EmaWeights ema = a.cap_ema_w != nullptr ? make_ema_weights(a.cap_ema_w, a.n_emas)
                                                : make_ema_weights(a.ema_w, a.n_emas);
  LambScalars s = make_lamb_scalars(a.beta1, a.beta2, a.eps, a.weight_decay, a.maximize, bc1,
                                    bc2, ema);
  set_sr_key(s, a.sr);
  return s;
}

// LAMB pass 1.  Each work item (a <= 16K-element range of one tensor) sums into its own slot;
// the slots are then added into the tensor's row in work order (a tensor's ranges in index
// order): the sums do not depend on the thread count or schedule.
void lamb_moments_cpu(const std::vector<TensorPtrs>& ts, DType dtype, const LambArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  const LambScalars s = lamb_scalars(a);
  const bool wd = a.weight_decay != 0.0;
  const bool scale = a.grad_scale != nullptr;
  const float gs = scale ? *a.grad_scale : 1.0f;
#ifdef EK_HAVE_AVX2_VARIANT
  const LambMomentsRangeFn fn = use_avx2() ? avx2::lamb_moments_fn(dtype, wd, scale)
                                           : base::lamb_moments_fn(dtype, wd, scale);
#else
  const LambMomentsRangeFn fn = base::lamb_moments_fn(dtype, wd, scale);
#endif
  if (fn == nullptr) return;
  int64_t total = 0;
  const std::vector<Work> work = plan_work(ts, &total);
  if (total == 0) return;
  std::vector<double> part(2 * work.size(), 0.0);
  run_work(ts, work, total, [&](int64_t w, const TensorPtrs& t, int64_t lo, int64_t hi) {
    fn(t, lo, hi, s, gs, &part[size_t(2 * w)]);
  });
  for (size_t w = 0; w < work.size(); ++w) {
    double* row = lamb_sums_row(ts[size_t(work[w].t)]);
    row[0] += part[2 * w];
    row[1] += part[2 * w + 1];
  }
}

// LAMB pass 2 (the per-tensor step size from the table: s2).
void lamb_ema_cpu(const std::vector<TensorPtrs>& ts, DType dtype, const LambArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  const LambScalars s = lamb_scalars(a);
  const bool wd = a.weight_decay != 0.0;
#ifdef EK_HAVE_AVX2_VARIANT
  const LambEmaRangeFn fn = use_avx2() ? avx2::lamb_ema_fn(dtype, a.n_emas, wd, a.sr.on)
                                       : base::lamb_ema_fn(dtype, a.n_emas, wd, a.sr.on);
#else
  const LambEmaRangeFn fn = base::lamb_ema_fn(dtype, a.n_emas, wd, a.sr.on);
#endif
  if (fn == nullptr) return;
  for_each_chunk(ts, [&](const TensorPtrs& t, int64_t lo, int64_t hi) { fn(t, lo, hi, s); });
}

}  // namespace ek
