// fused_cuda.cu -- CUDA kernels for the fused optimizer step + EMA.
//
// * One kernel template per update (Adam, SGD, EMA only) and number of EMAs updated (0..4, all
//   in the same pass: theta read once, each EMA read and written once), for two layouts:
//   - flat (one tensor): a grid-stride loop with 64-bit indices over the whole tensor;
//   - list: one launch per set whatever its tensor count: a persistent grid (one resident wave
//     at most, from the occupancy API) walks the 64K-element chunks of the set's tensors
//     through a work table in device memory (per tensor its pointers, n and SR base; per chunk
//     its tensor and chunk index), uploaded by csrc/list_tables.cpp only when it changes.
//   The layout only decides which spans [lo, hi) a thread walks and with which stride; the walk
//   and the per-element work are the same code for both.
// * Each thread moves 16 bytes of parameters/gradients per access (4 fp32 or 8 bf16/fp16
//   elements) and the matching float4s of state and EMA when every pointer of the span is 16-byte
//   aligned, with a scalar tail (and a scalar path for unaligned tensors).
// * grad_scale / found_inf are read on the device (no host sync); a found_inf != 0 makes every
//   thread return before touching memory.
// * Capturable: lr, the step count and the EMA weight may instead be read from device tensors,
//   so the launch parameters are the same every step and a step can be captured in a CUDA graph.
//
// The math is fused_math.h's (shared with the CPU twin).  No torch or pybind headers here.
//
// Emulation build (EK_EMULATE_DEVICE, ema_kernels._C_emu): this same file compiled as host C++
// against cuda_emu.h; launches (ek_launch) run every block and thread on the host.  Only there,
// the constants that decide a path (chunk size, flat grid cap) can be lowered at
// run time (emu_configure), so that tests reach every path with small tensors, and the SM count
// and resident blocks per SM overridden, so that a list launch's grid can be made smaller than
// its chunk count (several chunks per block).
#ifdef EK_EMULATE_DEVICE
#include "cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif
#include <stdint.h>

#include <atomic>
#include <type_traits>
#include <mutex>
#include <utility>
#include <vector>

#include "fused_math.h"
#include "kernels.h"

namespace ek {
namespace {

constexpr int kBlock = 512;                 // threads per block
constexpr int64_t kChunk = 65536;           // elements per chunk of the list kernels
constexpr int kKernelParamBytes = 4096;     // CUDA's kernel parameter limit before 12.1

// The path-deciding sizes as the code reads them: the constants on the GPU; in the emulation
// build, values the tests may set (0: the device's own answer).
#ifdef EK_EMULATE_DEVICE
struct EmuLimits {
  std::atomic<int64_t> chunk{kChunk};
  std::atomic<int> sm_count{0};        // 0: cudaDeviceGetAttribute's
  std::atomic<int> blocks_per_sm{0};   // 0: the occupancy API's
  std::atomic<int64_t> grid_cap{0};    // 0: only the occupancy cap
};
EmuLimits emu_limits;
inline int64_t chunk_elems() { return emu_limits.chunk.load(std::memory_order_relaxed); }
inline int sm_count_override() { return emu_limits.sm_count.load(std::memory_order_relaxed); }
inline int blocks_per_sm_override() {
  return emu_limits.blocks_per_sm.load(std::memory_order_relaxed);
}
inline int64_t grid_cap_override() { return emu_limits.grid_cap.load(std::memory_order_relaxed); }
#else
__host__ __device__ constexpr int64_t chunk_elems() { return kChunk; }
constexpr int sm_count_override() { return 0; }
constexpr int blocks_per_sm_override() { return 0; }
constexpr int64_t grid_cap_override() { return 0; }
#endif

// kernel<<<grid, block, 0, stream>>>(args...) -- the one launch site of every kernel.  In the
// emulation build: a loop over every block and thread (cuda_emu.h).
template <typename... P, typename... A>
void ek_launch(void (*kernel)(P...), unsigned grid, unsigned block, cudaStream_t stream,
               A&&... args) {
#ifdef EK_EMULATE_DEVICE
  ek_emu::launch(kernel, dim3(grid), dim3(block), 0, stream, std::forward<A>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
#endif
}

// ------------------------------------------------------------------------------------------
// Kernel arguments
// ------------------------------------------------------------------------------------------
struct AdamKArgs {
  AdamScalars s;       // host-computed per-step values (non-capturable)
  AdamConfig cfg;      // l2 / has_scale
  const float* grad_scale;
  const float* found_inf;
  CapturablePtrs cap;  // non-null lr => capturable: recompute s on the device
  double beta1, beta2, eps, wd;
  bool decoupled, maximize;
};

struct SgdKArgs {
  SgdScalars s;
  SgdConfig cfg;
  const float* grad_scale;
  const float* found_inf;
  CapturablePtrs cap;
  double momentum, dampening, wd;
  bool maximize;
};

struct EmaKArgs {
  EmaWeights w;
};

// The work table of a list launch, in device memory (the kernel reads it through ld_arg): one
// TensorPtrs per tensor of the set, then one ChunkRef per chunk of chunk_elems() elements, in
// tensor order (a tensor of n elements has ceil(n / chunk) of them; an empty one none).  Only
// the two addresses and the chunk count are kernel parameters: 24 bytes whatever the set.
//
// Why a device table, not CUDA 12.1's 32 KB kernel parameters: parameters would still cap the
// tensors per launch (32 KB / 88 B: ~370 tensors, fewer with a chunk map), so large sets would
// again be several launches, each drained before the next; and they are re-sent with every
// launch, i.e. every step, although a set's pointers rarely change.  The device table has no
// tensor limit, and a steady-state step copies nothing host -> device (list_tables.cpp keeps
// it, compares the host entries with its cached copy and uploads only when they differ).
struct alignas(8) ChunkRef {  // one 8-byte load
  int32_t tensor;  // index into the TensorPtrs entries
  int32_t chunk;   // elements [chunk * chunk_elems(), ...) of that tensor
};

struct ListTable {
  const TensorPtrs* tensors;
  const ChunkRef* chunks;
  int64_t n_chunks;
};

// ------------------------------------------------------------------------------------------
// Layouts: which elements [lo, hi) of which tensor this thread walks, with which stride
// ------------------------------------------------------------------------------------------
struct Span {
  TensorPtrs t;
  int64_t lo, hi;       // element range of t
  int64_t tid, stride;  // this thread's first offset and the step between its offsets
};

// Flat: the whole tensor, grid-stride over every thread of the grid (64-bit: a tensor may have
// more elements than a 32-bit product of block and grid indices can count).
__device__ __forceinline__ Span span_of(const TensorPtrs& t) {
  Span sp;
  sp.t = t;
  sp.lo = 0;
  sp.hi = t.n;
  sp.tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  sp.stride = int64_t(gridDim.x) * blockDim.x;
  return sp;
}

// List: chunk c of the work table, block-stride over the block's threads.  The entry's
// pointers are read from device memory (every thread of the block reads the same few words:
// one broadcast, cached), only the roles an update can use (EMAs < NZ; the SR base with SR).
template <class T>
__device__ __forceinline__ T ld_arg(const T* p);

template <int NZ, bool SR>
__device__ __forceinline__ Span span_of(const ListTable& w, int64_t c) {
  const ChunkRef r = ld_arg(w.chunks + c);
  const TensorPtrs* e = w.tensors + r.tensor;
  Span sp;
  sp.t.p = ld_arg(&e->p);
  sp.t.g = ld_arg(&e->g);
  sp.t.s0 = ld_arg(&e->s0);
  sp.t.s1 = ld_arg(&e->s1);
  sp.t.s2 = ld_arg(&e->s2);
#pragma unroll
  for (int k = 0; k < NZ; ++k) sp.t.z[k] = ld_arg(&e->z[k]);
  sp.t.n = ld_arg(&e->n);
  sp.t.sr_base = SR ? ld_arg(&e->sr_base) : 0;
  const int64_t chunk = chunk_elems();
  sp.lo = int64_t(r.chunk) * chunk;
  sp.hi = sp.lo + chunk < sp.t.n ? sp.lo + chunk : sp.t.n;
  sp.tid = threadIdx.x;
  sp.stride = blockDim.x;
  return sp;
}

// The chunks block blockIdx.x of a list launch walks: c = blockIdx.x, + gridDim.x, ... (the
// grid is at most one resident wave, so each block loops).  Chunk-strided rather than one
// contiguous range per block: the chunks are equal except each tensor's last, and a set often
// holds long runs of small tensors (biases, norms: one short chunk each) between big ones; a
// stride deals such a run out over all blocks, where a contiguous range would hand it to a few
// (which finish early while others still carry full chunks).  Each block gets ceil or floor of
// n_chunks / gridDim chunks either way, and the blocks of a wave touch neighbouring chunks.
template <class F>
__device__ __forceinline__ void for_each_chunk(const ListTable& w, F&& f) {
#pragma unroll 1  // one chunk's walk is the whole body: nothing to gain from copies of it
  for (int64_t c = blockIdx.x; c < w.n_chunks; c += gridDim.x) f(c);
}

// The one index walk of every kernel: this thread's N-element vectors starting at lo + j*N for
// j = tid, tid + stride, ... < (hi - lo) / N (when `vec`), then the elements from there to hi at
// tid, tid + stride, ... (every element one by one when not `vec`).
template <int N, class OnVec, class OnElem>
__device__ __forceinline__ void walk(const Span& sp, bool vec, OnVec&& on_vec, OnElem&& on_elem) {
  int64_t scalar_from = sp.lo;
  if (vec) {
    const int64_t nv = (sp.hi - sp.lo) / N;
    for (int64_t j = sp.tid; j < nv; j += sp.stride) on_vec(sp.lo + j * N);
    scalar_from = sp.lo + nv * N;
  }
  for (int64_t i = scalar_from + sp.tid; i < sp.hi; i += sp.stride) on_elem(i);
}

// ------------------------------------------------------------------------------------------
// 16-byte vector loads / stores
// ------------------------------------------------------------------------------------------
// Every pointer the kernels access is global memory (torch's CUDA tensors).  nvcc infers that
// for pointers passed as kernel parameters, not for the list kernels' pointers, which are read
// from the work table: without the hint their accesses would be generic (LD.E.128 / ST.E.128,
// not LDG / STG).  Said where the pointer is dereferenced (so it is not null there).
template <class T>
__device__ __forceinline__ void assume_global(const T* p) {
#ifndef EK_EMULATE_DEVICE
  __builtin_assume(__isGlobal(p));
#else
  (void)p;
#endif
}

__device__ __forceinline__ uint4 load16(const uint4* p) {
#ifdef EK_EMULATE_DEVICE
  return ek_emu::load16(p);  // faults on a misaligned address, as the GPU does
#else
  assume_global(p);
  return *p;
#endif
}

__device__ __forceinline__ void store16(uint4* p, const uint4& v) {
#ifdef EK_EMULATE_DEVICE
  ek_emu::store16(p, v);
#else
  assume_global(p);
  *p = v;
#endif
}

// Scalar global accesses (tails, unaligned tensors) and reads of launch arguments kept in device
// memory: every global access of the kernels is load16/store16/ld/st/ld_arg, which the
// emulation counts (ek_emu::stats: bytes read and written, 16-byte bytes, argument reads).
template <typename T>
__device__ __forceinline__ T ld(const T* p) {
#ifdef EK_EMULATE_DEVICE
  ek_emu::count_read(int64_t(sizeof(T)), false);
#endif
  assume_global(p);
  return *p;
}

template <typename T>
__device__ __forceinline__ void st(T* p, const T& v) {
#ifdef EK_EMULATE_DEVICE
  ek_emu::count_write(int64_t(sizeof(T)), false);
#endif
  assume_global(p);
  *p = v;
}

template <typename T>
__device__ __forceinline__ T ld_arg(const T* p) {
#ifdef EK_EMULATE_DEVICE
  ek_emu::count_arg_read();
#endif
  assume_global(p);
  return *p;
}

// The capturable EMA weights (nz floats on the device), through ld_arg.
__device__ __forceinline__ EmaWeights ema_weights_arg(const float* w, int nz) {
  float r[kMaxEmas] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (w != nullptr)
    for (int k = 0; k < nz && k < kMaxEmas; ++k) r[k] = ld_arg(w + k);
  return make_ema_weights(r, nz);
}

template <typename T, int N>
__device__ __forceinline__ void load_vec(T (&r)[N], const T* ptr) {
  static_assert((sizeof(T) * N) % 16 == 0, "vector of whole 16-byte words");
  constexpr int kPer = 16 / int(sizeof(T));
  const uint4* src = reinterpret_cast<const uint4*>(ptr);
#pragma unroll
  for (int w = 0; w < N / kPer; ++w) {
    union {
      uint4 u;
      T t[kPer];
    } x;
    x.u = load16(src + w);
#pragma unroll
    for (int k = 0; k < kPer; ++k) r[w * kPer + k] = x.t[k];
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const T (&r)[N]) {
  constexpr int kPer = 16 / int(sizeof(T));
  uint4* dst = reinterpret_cast<uint4*>(ptr);
#pragma unroll
  for (int w = 0; w < N / kPer; ++w) {
    union {
      uint4 u;
      T t[kPer];
    } x;
#pragma unroll
    for (int k = 0; k < kPer; ++k) x.t[k] = r[w * kPer + k];
    store16(dst + w, x.u);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ------------------------------------------------------------------------------------------
// The updates.  Each is a struct with
//   Args                      the kernel's second parameter
//   kVec                      elements per 16-byte access of the parameters
//   prologue(a, s)            the per-launch values; false: skip (found_inf)
//   span(sp, s, a)            the update of one thread's share of a span
// and one kernel template runs any of them on either layout.
// ------------------------------------------------------------------------------------------
// The per-step scalars of this launch (from the host, or from device tensors when capturable),
// and the gradient scale.  Returns false when found_inf says to skip the step.
struct AdamLaunch {
  AdamScalars s;
  float gs;
};

// Every EMA pointer of a span 16-byte aligned at element lo.
template <int NZ>
__device__ __forceinline__ bool emas_aligned16(const TensorPtrs& t, int64_t lo) {
  bool ok = true;
#pragma unroll
  for (int k = 0; k < NZ; ++k) ok = ok && aligned16(t.z[k] + lo);
  return ok;
}

template <class S, bool AMSGRAD, int NZ>
struct AdamOp {
  using Args = AdamKArgs;
  using Scalars = AdamLaunch;
  using R = typename S::raw;
  static constexpr int kVec = 16 / int(sizeof(R));
  static constexpr int kEmas = NZ;
  static constexpr bool kSR = S::kStochastic;

  __device__ static __forceinline__ bool prologue(const AdamKArgs& a, AdamLaunch& l) {
    if (a.found_inf != nullptr && ld_arg(a.found_inf) != 0.0f) return false;
    l.s = a.s;
    if (a.cap.lr != nullptr) {
      const double lr = double(ld_arg(a.cap.lr));
      double step_size, bc2_sqrt;
      adam_step_values(lr, a.beta1, a.beta2, double(ld_arg(a.cap.step)), &step_size,
                       &bc2_sqrt);
      l.s = make_adam_scalars(lr, a.beta1, a.beta2, a.eps, a.wd, a.decoupled, a.maximize,
                              step_size, bc2_sqrt, ema_weights_arg(a.cap.ema_w, NZ));
      l.s.sr_k0 = a.s.sr_k0;  // stochastic rounding's key: from the host's step count (a
      l.s.sr_k1 = a.s.sr_k1;  // device lr with a host step; capturable=True refuses SR)
    }
    l.gs = a.grad_scale != nullptr ? ld_arg(a.grad_scale) : 1.0f;
    return true;
  }

  __device__ static __forceinline__ void span(const Span& sp, const AdamLaunch& l,
                                              const AdamKArgs& a) {
    constexpr int N = kVec;
    R* __restrict__ p = static_cast<R*>(sp.t.p);
    const R* __restrict__ g = static_cast<const R*>(sp.t.g);
    float* __restrict__ m = sp.t.s0;
    float* __restrict__ v = sp.t.s1;
    float* __restrict__ vm = sp.t.s2;
    float* const* z = sp.t.z;
    const int64_t lo = sp.lo;
    const bool vec = aligned16(p + lo) && aligned16(g + lo) && aligned16(m + lo) &&
                     aligned16(v + lo) && (!AMSGRAD || aligned16(vm + lo)) &&
                     emas_aligned16<NZ>(sp.t, lo);
    const AdamScalars& s = l.s;
    const float gs = l.gs;
    const AdamConfig& cfg = a.cfg;
    // stochastic rounding: element i of the tensor draws the bits of index sr_base + i
    const SrKey key = sr_key_of(s);
    const uint64_t base = uint64_t(sp.t.sr_base);
    walk<N>(
        sp, vec,
        [&](int64_t i) {
          R rp[N], rg[N];
          float rm[N], rv[N], rvm[N], rz[kMaxEmas][N];
          load_vec(rp, p + i);
          load_vec(rg, g + i);
          load_vec(rm, m + i);
          load_vec(rv, v + i);
          if (AMSGRAD) load_vec(rvm, vm + i);
#pragma unroll
          for (int e = 0; e < NZ; ++e) load_vec(rz[e], z[e] + i);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            float ze[kMaxEmas];
#pragma unroll
            for (int e = 0; e < NZ; ++e) ze[e] = rz[e][k];
            const uint32_t rb = kSR ? sr_bits(key, base + uint64_t(i + k)) : 0u;
            adam_ema_element<S, AMSGRAD, NZ>(rp[k], rg[k], rm[k], rv[k], rvm[k], ze, s, gs, cfg,
                                             rb);
#pragma unroll
            for (int e = 0; e < NZ; ++e) rz[e][k] = ze[e];
          }
          store_vec(p + i, rp);
          store_vec(m + i, rm);
          store_vec(v + i, rv);
          if (AMSGRAD) store_vec(vm + i, rvm);
#pragma unroll
          for (int e = 0; e < NZ; ++e) store_vec(z[e] + i, rz[e]);
        },
        [&](int64_t i) {
          R rp = ld(p + i);
          float rm = ld(m + i), rv = ld(v + i), rvm = AMSGRAD ? ld(vm + i) : 0.0f, ze[kMaxEmas];
#pragma unroll
          for (int e = 0; e < NZ; ++e) ze[e] = ld(z[e] + i);
          const uint32_t rb = kSR ? sr_bits(key, base + uint64_t(i)) : 0u;
          adam_ema_element<S, AMSGRAD, NZ>(rp, ld(g + i), rm, rv, rvm, ze, s, gs, cfg, rb);
          st(p + i, rp);
          st(m + i, rm);
          st(v + i, rv);
          if (AMSGRAD) st(vm + i, rvm);
#pragma unroll
          for (int e = 0; e < NZ; ++e) st(z[e] + i, ze[e]);
        });
  }
};

struct SgdLaunch {
  SgdScalars s;
  float gs;
};

template <class S, int MODE, int NZ>
struct SgdOp {
  using Args = SgdKArgs;
  using Scalars = SgdLaunch;
  using R = typename S::raw;
  static constexpr int kVec = 16 / int(sizeof(R));
  static constexpr int kEmas = NZ;
  static constexpr bool kSR = S::kStochastic;

  __device__ static __forceinline__ bool prologue(const SgdKArgs& a, SgdLaunch& l) {
    if (a.found_inf != nullptr && ld_arg(a.found_inf) != 0.0f) return false;
    l.s = a.s;
    if (a.cap.lr != nullptr) {
      l.s = make_sgd_scalars(double(ld_arg(a.cap.lr)), a.momentum, a.dampening, a.wd,
                             a.maximize, ema_weights_arg(a.cap.ema_w, NZ));
      l.s.sr_k0 = a.s.sr_k0;
      l.s.sr_k1 = a.s.sr_k1;
    }
    l.gs = a.grad_scale != nullptr ? ld_arg(a.grad_scale) : 1.0f;
    return true;
  }

  __device__ static __forceinline__ void span(const Span& sp, const SgdLaunch& l,
                                              const SgdKArgs& a) {
    constexpr int N = kVec;
    constexpr bool kBuf = MODE != kNoMomentum;
    R* __restrict__ p = static_cast<R*>(sp.t.p);
    const R* __restrict__ g = static_cast<const R*>(sp.t.g);
    float* __restrict__ b = sp.t.s0;
    float* const* z = sp.t.z;
    const int64_t lo = sp.lo;
    const bool vec = aligned16(p + lo) && aligned16(g + lo) && (!kBuf || aligned16(b + lo)) &&
                     emas_aligned16<NZ>(sp.t, lo);
    const SgdScalars& s = l.s;
    const float gs = l.gs;
    const SgdConfig& cfg = a.cfg;
    const SrKey key = sr_key_of(s);
    const uint64_t base = uint64_t(sp.t.sr_base);
    walk<N>(
        sp, vec,
        [&](int64_t i) {
          R rp[N], rg[N];
          float rb[N], rz[kMaxEmas][N];
          load_vec(rp, p + i);
          load_vec(rg, g + i);
          if (MODE == kMomentum) load_vec(rb, b + i);
#pragma unroll
          for (int e = 0; e < NZ; ++e) load_vec(rz[e], z[e] + i);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            float ze[kMaxEmas];
#pragma unroll
            for (int e = 0; e < NZ; ++e) ze[e] = rz[e][k];
            const uint32_t rr = kSR ? sr_bits(key, base + uint64_t(i + k)) : 0u;
            sgd_ema_element<S, MODE, NZ>(rp[k], rg[k], rb[k], ze, s, gs, cfg, rr);
#pragma unroll
            for (int e = 0; e < NZ; ++e) rz[e][k] = ze[e];
          }
          store_vec(p + i, rp);
          if (kBuf) store_vec(b + i, rb);
#pragma unroll
          for (int e = 0; e < NZ; ++e) store_vec(z[e] + i, rz[e]);
        },
        [&](int64_t i) {
          R rp = ld(p + i);
          float rb = MODE == kMomentum ? ld(b + i) : 0.0f, ze[kMaxEmas];
#pragma unroll
          for (int e = 0; e < NZ; ++e) ze[e] = ld(z[e] + i);
          const uint32_t rr = kSR ? sr_bits(key, base + uint64_t(i)) : 0u;
          sgd_ema_element<S, MODE, NZ>(rp, ld(g + i), rb, ze, s, gs, cfg, rr);
          st(p + i, rp);
          if (kBuf) st(b + i, rb);
#pragma unroll
          for (int e = 0; e < NZ; ++e) st(z[e] + i, ze[e]);
        });
  }
};

// EMA only (parameters that took no step while the EMA clock ticked).
template <class S, int NZ>
struct EmaOp {
  using Args = EmaKArgs;
  using Scalars = EmaKArgs;
  using R = typename S::raw;
  static constexpr int kVec = 16 / int(sizeof(R));
  static constexpr int kEmas = NZ;
  static constexpr bool kSR = false;

  __device__ static __forceinline__ bool prologue(const EmaKArgs& a, EmaKArgs& l) {
    l = a;
    return true;
  }

  __device__ static __forceinline__ void span(const Span& sp, const EmaKArgs& l,
                                              const EmaKArgs&) {
    constexpr int N = kVec;
    const R* __restrict__ p = static_cast<const R*>(sp.t.p);
    float* const* z = sp.t.z;
    const EmaWeights& w = l.w;
    walk<N>(
        sp, aligned16(p + sp.lo) && emas_aligned16<NZ>(sp.t, sp.lo),
        [&](int64_t i) {
          R rp[N];
          float rz[kMaxEmas][N];
          load_vec(rp, p + i);
#pragma unroll
          for (int e = 0; e < NZ; ++e) load_vec(rz[e], z[e] + i);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            float ze[kMaxEmas];
#pragma unroll
            for (int e = 0; e < NZ; ++e) ze[e] = rz[e][k];
            ema_only_element<S, NZ>(rp[k], ze, w);
#pragma unroll
            for (int e = 0; e < NZ; ++e) rz[e][k] = ze[e];
          }
#pragma unroll
          for (int e = 0; e < NZ; ++e) store_vec(z[e] + i, rz[e]);
        },
        [&](int64_t i) {
          float ze[kMaxEmas];
#pragma unroll
          for (int e = 0; e < NZ; ++e) ze[e] = ld(z[e] + i);
          ema_only_element<S, NZ>(ld(p + i), ze, w);
#pragma unroll
          for (int e = 0; e < NZ; ++e) st(z[e] + i, ze[e]);
        });
  }
};

static_assert(sizeof(ListTable) + sizeof(AdamKArgs) <= kKernelParamBytes,
              "list kernel parameters exceed CUDA's 4 KB");
static_assert(sizeof(TensorPtrs) % 8 == 0 && alignof(TensorPtrs) <= 8 &&
                  sizeof(ChunkRef) == 8,
              "the work table: 8-byte aligned entries, the chunk map right after them");
static_assert(sizeof(SgdKArgs) <= sizeof(AdamKArgs) && sizeof(EmaKArgs) <= sizeof(AdamKArgs),
              "the Adam launch has the largest arguments");

// The spans of a launch: flat, the one tensor; list, every chunk this block walks.
template <class Op>
__device__ __forceinline__ void run_spans(const TensorPtrs& t, const typename Op::Scalars& l,
                                          const typename Op::Args& a) {
  Op::span(span_of(t), l, a);
}

template <class Op>
__device__ __forceinline__ void run_spans(const ListTable& w, const typename Op::Scalars& l,
                                          const typename Op::Args& a) {
  for_each_chunk(w, [&](int64_t c) { Op::span(span_of<Op::kEmas, Op::kSR>(w, c), l, a); });
}

// The kernel of every update and layout (Layout = TensorPtrs: flat; ListTable: list).
// The body of every kernel (Layout = TensorPtrs: flat; ListTable: list).
template <class Op, class Layout>
__device__ __forceinline__ void kernel_body(const Layout& where, const typename Op::Args& a) {
  typename Op::Scalars l;
  if (!Op::prologue(a, l)) return;
  run_spans<Op>(where, l, a);
}

// The kernel of every update and layout: the compiler's own register budget...
template <class Op, class Layout>
__global__ void __launch_bounds__(kBlock) fused_kernel(Layout where, typename Op::Args a) {
  kernel_body<Op>(where, a);
}

// ... except for the fp32 list kernels, held to 2 resident blocks (64 registers).  The list
// kernels read their tensor pointers from the work table in memory, where the old kernel-
// parameter tables let ptxas reload them from the constant bank at each use; left alone, ptxas
// keeps more of them in registers and e.g. fp32 AdamW + 2 EMAs takes 73 registers: 1 block of
// 512 threads per SM instead of 2.  For fp32 parameters 64 registers hold the list variants
// without spilling (ptxas -v, sm_90; SGD with momentum and 4 EMAs spills a few bytes); the
// 16-bit variants (8 elements per thread) need more and keep the compiler's choice, which
// `__launch_bounds__(kBlock, 1)` would change too.
template <class Op, class Layout>
__global__ void __launch_bounds__(kBlock, 2) fused_kernel_2bps(Layout where,
                                                               typename Op::Args a) {
  kernel_body<Op>(where, a);
}

template <class Op, class Layout>
constexpr void (*kernel_of())(Layout, typename Op::Args) {
  if constexpr (std::is_same<Layout, ListTable>::value && Op::kVec == 4)
    return &fused_kernel_2bps<Op, Layout>;
  else
    return &fused_kernel<Op, Layout>;
}

// ------------------------------------------------------------------------------------------
// Host side: grid sizing and launching
// ------------------------------------------------------------------------------------------
constexpr int kMaxDevices = 64;

// Device properties are asked of the runtime once per device (and per kernel instantiation for
// the occupancy), from any host thread: the fast path is one atomic load, the first query of a
// slot happens under a lock, so each is asked exactly once.
std::mutex g_query_mutex;

template <class Query>
int cached_query(std::atomic<int>& slot, Query&& query) {
  int v = slot.load(std::memory_order_acquire);
  if (v != 0) return v;
  const std::lock_guard<std::mutex> lock(g_query_mutex);
  v = slot.load(std::memory_order_relaxed);
  if (v == 0) {
    v = query();
    slot.store(v, std::memory_order_release);
  }
  return v;
}

int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];  // static storage: zero-initialised
  if (sm_count_override() > 0) return sm_count_override();
  if (device < 0 || device >= kMaxDevices) return 108;
  return cached_query(cache[device], [device] {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        n <= 0)
      n = 108;
    return n;
  });
}

// Resident blocks per SM of the kernel of `Op` on `Layout` (each instantiation has its own
// registers, hence its own occupancy, and its own cache).
template <class Op, class Layout>
int blocks_per_sm(int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return 1;
  const int nb = cached_query(cache[device], [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel_of<Op, Layout>(), kBlock, 0) !=
            cudaSuccess ||
        n <= 0)
      n = 1;
    return n;
  });
  return blocks_per_sm_override() > 0 ? blocks_per_sm_override() : nb;
}

// One resident wave of the kernel of `Op` on `Layout`: every SM full.
template <class Op, class Layout>
int64_t resident_blocks(int device) {
  return int64_t(sm_count(device)) * blocks_per_sm<Op, Layout>(device);
}

// Grid of the flat kernels: enough blocks to fill the GPU once (grid-stride beyond that).
template <class Op>
unsigned flat_grid(int64_t n, int device) {
  const int64_t work = (n + Op::kVec - 1) / Op::kVec;
  int64_t blocks = (work + kBlock - 1) / kBlock;
  int64_t cap = resident_blocks<Op, TensorPtrs>(device);
  if (grid_cap_override() > 0 && grid_cap_override() < cap) cap = grid_cap_override();
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return unsigned(blocks);
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// Grid of the list kernels: one block per chunk up to one resident wave, a whole wave beyond
// that (each block then walks several chunks: for_each_chunk).
template <class Op>
unsigned list_grid(int64_t n_chunks, int device) {
  const int64_t cap = resident_blocks<Op, ListTable>(device);
  return unsigned(n_chunks < cap ? n_chunks : cap);
}

// ------------------------------------------------------------------------------------------
// The list launch's work table
// ------------------------------------------------------------------------------------------
std::atomic<ListTableProvider> g_table_provider{nullptr};

// One address per kernel instantiation: the table cache's "op variant" (an update with 0 and
// with 2 EMAs over the same set, e.g. ema_every's steps, keep one cached table each).
template <class Op>
struct VariantTag {
  static const char id;
};
template <class Op>
const char VariantTag<Op>::id = 0;

// The chunks of a set (into *total); an error when the map cannot number them.
const char* count_chunks(const std::vector<TensorPtrs>& ts, int64_t chunk, int64_t* total) {
  if (ts.size() > size_t(INT32_MAX)) return "more tensors than the list kernel's table numbers";
  int64_t c = 0;
  for (const TensorPtrs& t : ts) {
    const int64_t k = (t.n + chunk - 1) / chunk;
    if (k > int64_t(INT32_MAX))  // ChunkRef::chunk: 2^47 elements at 64K chunks
      return "a tensor has more chunks than the list kernel's work table can number";
    c += k;
  }
  *total = c;
  return nullptr;
}

struct ChunkMapSource {
  const std::vector<TensorPtrs>* ts;
  int64_t chunk;
};

// The chunk map after the entries: every chunk of every tensor, in order (on an upload only).
void fill_chunk_map(void* dst, const void* ctx) {
  const ChunkMapSource& src = *static_cast<const ChunkMapSource*>(ctx);
  ChunkRef* out = static_cast<ChunkRef*>(dst);
  const std::vector<TensorPtrs>& ts = *src.ts;
  for (size_t i = 0; i < ts.size(); ++i)
    for (int64_t c = 0, k = (ts[i].n + src.chunk - 1) / src.chunk; c < k; ++c)
      *out++ = ChunkRef{int32_t(i), int32_t(c)};
}

// The request for the table of `ts` (entries: ts itself, byte for byte).
template <class Op>
ListTableRequest table_request(const std::vector<TensorPtrs>& ts, const ChunkMapSource& src,
                               int64_t n_chunks, int device, cudaStream_t stream) {
  ListTableRequest q;
  q.device = device;
  q.stream = static_cast<void*>(stream);
  q.variant = &VariantTag<Op>::id;
  q.set = ts[0].p;
  q.chunk = src.chunk;
  q.head = ts.data();
  q.head_bytes = ts.size() * sizeof(TensorPtrs);
  q.tail_bytes = size_t(n_chunks) * sizeof(ChunkRef);
  q.fill_tail = fill_chunk_map;
  q.ctx = &src;
  return q;
}

ListTable table_at(const void* device_table, size_t n_tensors, int64_t n_chunks) {
  const unsigned char* base = static_cast<const unsigned char*>(device_table);
  return ListTable{reinterpret_cast<const TensorPtrs*>(base),
                   reinterpret_cast<const ChunkRef*>(base + n_tensors * sizeof(TensorPtrs)),
                   n_chunks};
}

// The list launch of `Op` over a set: one launch, whatever its tensor count.
template <class Op>
const char* run_list(const std::vector<TensorPtrs>& ts, const typename Op::Args& a, int device,
                     cudaStream_t stream) {
  const ChunkMapSource src{&ts, chunk_elems()};
  int64_t n_chunks = 0;
  if (const char* err = count_chunks(ts, src.chunk, &n_chunks)) return err;
  if (n_chunks == 0) return nullptr;
  const ListTableProvider provide = g_table_provider.load(std::memory_order_acquire);
  if (provide == nullptr)
    return "no work-table provider is registered (csrc/list_tables.cpp is not linked in)";
  const ListTableAnswer t = provide(table_request<Op>(ts, src, n_chunks, device, stream));
  if (t.error != nullptr) return t.error;
#ifdef EK_EMULATE_DEVICE
  if (t.uploaded) ek_emu::stats.table_uploads.fetch_add(1, std::memory_order_relaxed);
#endif
  ek_launch(kernel_of<Op, ListTable>(), list_grid<Op>(n_chunks, device), kBlock, stream,
            table_at(t.table, ts.size(), n_chunks), a);
  return last_error();  // t.keep holds the table until here (the GPU: until enqueued)
}

// Flat (one tensor) or list launch of the update `Op`.
template <class Op>
const char* run(const std::vector<TensorPtrs>& ts, const typename Op::Args& a, int device,
                cudaStream_t stream) {
  if (ts.size() == 1) {
    if (ts[0].n == 0) return nullptr;
    ek_launch(kernel_of<Op, TensorPtrs>(), flat_grid<Op>(ts[0].n, device), kBlock, stream,
              ts[0], a);
    return last_error();
  }
  if (ts.empty()) return nullptr;
  return run_list<Op>(ts, a, device, stream);
}

template <class S, bool AMS>
const char* adam_dispatch_ams(const std::vector<TensorPtrs>& ts, const AdamKArgs& k, int nz,
                              int device, cudaStream_t st) {
  switch (nz) {
    case 0: return run<AdamOp<S, AMS, 0>>(ts, k, device, st);
    case 1: return run<AdamOp<S, AMS, 1>>(ts, k, device, st);
    case 2: return run<AdamOp<S, AMS, 2>>(ts, k, device, st);
    case 3: return run<AdamOp<S, AMS, 3>>(ts, k, device, st);
    case 4: return run<AdamOp<S, AMS, 4>>(ts, k, device, st);
  }
  return "more EMAs than the kernels update in one pass (kMaxEmas)";
}

template <class S>
const char* adam_dispatch(const std::vector<TensorPtrs>& ts, const AdamKArgs& k, bool ams,
                          int nz, int device, cudaStream_t st) {
  return ams ? adam_dispatch_ams<S, true>(ts, k, nz, device, st)
             : adam_dispatch_ams<S, false>(ts, k, nz, device, st);
}

template <class S, int MODE>
const char* sgd_dispatch_mode(const std::vector<TensorPtrs>& ts, const SgdKArgs& k, int nz,
                              int device, cudaStream_t st) {
  switch (nz) {
    case 0: return run<SgdOp<S, MODE, 0>>(ts, k, device, st);
    case 1: return run<SgdOp<S, MODE, 1>>(ts, k, device, st);
    case 2: return run<SgdOp<S, MODE, 2>>(ts, k, device, st);
    case 3: return run<SgdOp<S, MODE, 3>>(ts, k, device, st);
    case 4: return run<SgdOp<S, MODE, 4>>(ts, k, device, st);
  }
  return "more EMAs than the kernels update in one pass (kMaxEmas)";
}

template <class S>
const char* sgd_dispatch(const std::vector<TensorPtrs>& ts, const SgdKArgs& k, int mode,
                         int nz, int device, cudaStream_t st) {
  switch (mode) {
    case kNoMomentum: return sgd_dispatch_mode<S, kNoMomentum>(ts, k, nz, device, st);
    case kFirstStep: return sgd_dispatch_mode<S, kFirstStep>(ts, k, nz, device, st);
    default: return sgd_dispatch_mode<S, kMomentum>(ts, k, nz, device, st);
  }
}

template <class S>
const char* ema_dispatch(const std::vector<TensorPtrs>& ts, const EmaKArgs& k, int nz,
                         int device, cudaStream_t st) {
  switch (nz) {
    case 1: return run<EmaOp<S, 1>>(ts, k, device, st);
    case 2: return run<EmaOp<S, 2>>(ts, k, device, st);
    case 3: return run<EmaOp<S, 3>>(ts, k, device, st);
    case 4: return run<EmaOp<S, 4>>(ts, k, device, st);
  }
  return "ema_only updates 1 to kMaxEmas EMAs";
}

// Stochastic rounding's per-launch key into the scalars, formed on the host (zeros when off).
template <class Scalars>
void set_sr_key(Scalars& s, const SrArgs& sr) {
  const SrKey key = sr.on ? sr_key(sr.seed, sr.step) : SrKey();
  s.sr_k0 = key.k0;
  s.sr_k1 = key.k1;
}

#define EK_STR2(...) #__VA_ARGS__
#define EK_STR(...) EK_STR2(__VA_ARGS__)

}  // namespace

void set_list_table_provider(ListTableProvider provider) {
  g_table_provider.store(provider, std::memory_order_release);
}

const char* adam_ema_cuda(const std::vector<TensorPtrs>& ts, DType dtype, const AdamArgs& a,
                          int device, void* stream) {
  AdamKArgs k;
  k.s = make_adam_scalars(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.decoupled, a.maximize,
                          a.step_size, a.bc2_sqrt, make_ema_weights(a.ema_w, a.n_emas));
  k.cfg.l2 = !a.decoupled && a.weight_decay != 0.0;
  k.cfg.has_scale = a.grad_scale != nullptr;
  k.grad_scale = a.grad_scale;
  k.found_inf = a.found_inf;
  k.cap = a.capturable ? a.cap : CapturablePtrs();
  k.beta1 = a.beta1;
  k.beta2 = a.beta2;
  k.eps = a.eps;
  k.wd = a.weight_decay;
  k.decoupled = a.decoupled;
  k.maximize = a.maximize;
  set_sr_key(k.s, a.sr);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  // stochastic rounding: bf16/fp16 only (fp32 parameters are stored exactly: no cost there)
  const bool sr = a.sr.on;
  switch (dtype) {
    case DType::kF32: return adam_dispatch<F32>(ts, k, a.amsgrad, a.n_emas, device, st);
    case DType::kBF16:
      return sr ? adam_dispatch<BF16SR>(ts, k, a.amsgrad, a.n_emas, device, st)
                : adam_dispatch<BF16>(ts, k, a.amsgrad, a.n_emas, device, st);
    case DType::kF16:
      return sr ? adam_dispatch<F16SR>(ts, k, a.amsgrad, a.n_emas, device, st)
                : adam_dispatch<F16>(ts, k, a.amsgrad, a.n_emas, device, st);
  }
  return "unsupported dtype";
}

namespace {

// The launch arguments SGD and LARS share (LARS is SGD's momentum on its d; its weight decay is
// inside d, so its scalars get none): scalars, flags, AMP and capturable pointers, the SR key.
// Returns the momentum mode.
template <class K, class A>
int fill_momentum_kargs(K& k, const A& a, double weight_decay) {
  k.s = make_sgd_scalars(a.lr, a.momentum, a.dampening, weight_decay, a.maximize,
                         make_ema_weights(a.ema_w, a.n_emas));
  const int mode = a.momentum == 0.0 ? kNoMomentum : (a.first_step ? kFirstStep : kMomentum);
  k.cfg.has_scale = a.grad_scale != nullptr;
  k.cfg.nesterov = mode != kNoMomentum && a.nesterov;
  k.grad_scale = a.grad_scale;
  k.found_inf = a.found_inf;
  k.cap = a.capturable ? a.cap : CapturablePtrs();
  k.momentum = a.momentum;
  k.dampening = a.dampening;
  k.maximize = a.maximize;
  set_sr_key(k.s, a.sr);
  return mode;
}

}  // namespace

const char* sgd_ema_cuda(const std::vector<TensorPtrs>& ts, DType dtype, const SgdArgs& a,
                         int device, void* stream) {
  SgdKArgs k;
  const int mode = fill_momentum_kargs(k, a, a.weight_decay);
  k.cfg.l2 = a.weight_decay != 0.0;
  k.wd = a.weight_decay;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool sr = a.sr.on;
  switch (dtype) {
    case DType::kF32: return sgd_dispatch<F32>(ts, k, mode, a.n_emas, device, st);
    case DType::kBF16:
      return sr ? sgd_dispatch<BF16SR>(ts, k, mode, a.n_emas, device, st)
                : sgd_dispatch<BF16>(ts, k, mode, a.n_emas, device, st);
    case DType::kF16:
      return sr ? sgd_dispatch<F16SR>(ts, k, mode, a.n_emas, device, st)
                : sgd_dispatch<F16>(ts, k, mode, a.n_emas, device, st);
  }
  return "unsupported dtype";
}

const char* ema_only_cuda(const std::vector<TensorPtrs>& ts, DType dtype, const double* ema_w,
                          int n_emas, int device, void* stream) {
  const EmaKArgs k{make_ema_weights(ema_w, n_emas)};
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32: return ema_dispatch<F32>(ts, k, n_emas, device, st);
    case DType::kBF16: return ema_dispatch<BF16>(ts, k, n_emas, device, st);
    case DType::kF16: return ema_dispatch<F16>(ts, k, n_emas, device, st);
  }
  return "unsupported dtype";
}

#ifdef EK_EMULATE_DEVICE
// ------------------------------------------------------------------------------------------
// Emulation-only entry points (kernels.h): the tests' handles on the launch logic
// ------------------------------------------------------------------------------------------
const char* emu_configure(const EmuConfig& c) {
  if (c.chunk < 0 || c.sm_count < 0 || c.sm_count > 4096 || c.blocks_per_sm < 0 ||
      c.blocks_per_sm > 32 || c.grid_cap < 0)
    return "emu_configure: chunk >= 0, 0 <= sm_count <= 4096, 0 <= blocks_per_sm <= 32, "
           "grid_cap >= 0 (0: the default)";
  emu_limits.chunk.store(c.chunk > 0 ? c.chunk : kChunk);
  emu_limits.sm_count.store(c.sm_count);
  emu_limits.blocks_per_sm.store(c.blocks_per_sm);
  emu_limits.grid_cap.store(c.grid_cap);
  ek_emu::shuffle_seed.store(c.shuffle_seed);
  return nullptr;
}

EmuStats emu_stats() {
  EmuStats s;
  s.launches = ek_emu::stats.launches.load();
  s.blocks = ek_emu::stats.blocks.load();
  s.occupancy_queries = ek_emu::stats.occupancy_queries.load();
  s.bytes_read = ek_emu::stats.bytes_read.load();
  s.bytes_written = ek_emu::stats.bytes_written.load();
  s.bytes_vector = ek_emu::stats.bytes_vector.load();
  s.arg_reads = ek_emu::stats.arg_reads.load();
  s.table_uploads = ek_emu::stats.table_uploads.load();
  s.atomics = ek_emu::stats.atomics.load();
  return s;
}

namespace {
template <int N>
void flat_walk(int64_t n, bool aligned, unsigned grid, unsigned block, unsigned thread,
               int64_t* out) {
  TensorPtrs t;
  t.n = n;
  gridDim = dim3(grid);
  blockDim = dim3(kBlock);
  blockIdx = {block, 0, 0};
  threadIdx = {thread, 0, 0};
  const Span sp = span_of(t);
  int64_t nvec = 0, first_vec = -1, last_vec = -1, nel = 0, first_el = -1, last_el = -1;
  int64_t bad = 0;  // offsets outside [0, n), or not increasing
  walk<N>(
      sp, aligned,
      [&](int64_t i) {
        if (i < 0 || i + N > n || i <= last_vec) ++bad;
        if (nvec++ == 0) first_vec = i;
        last_vec = i;
      },
      [&](int64_t i) {
        if (i < 0 || i >= n || i <= last_el) ++bad;
        if (nel++ == 0) first_el = i;
        last_el = i;
      });
  const int64_t r[8] = {sp.tid, sp.stride, nvec, first_vec, last_vec, nel, first_el, last_el};
  for (int k = 0; k < 8; ++k) out[k] = r[k];
  out[8] = bad;
}
}  // namespace

const char* emu_flat_walk(int64_t n, int elem_bytes, bool aligned, int64_t grid, int64_t block,
                          int64_t thread, int64_t out[9]) {
  if (grid < 1 || grid > 0x7FFFFFFF || block < 0 || block >= grid || thread < 0 ||
      thread >= kBlock || n < 0)
    return "emu_flat_walk: needs n >= 0, 0 <= block < grid <= 2^31 - 1, 0 <= thread < 512";
  switch (elem_bytes) {
    case 4: flat_walk<4>(n, aligned, unsigned(grid), unsigned(block), unsigned(thread), out); break;
    case 2: flat_walk<8>(n, aligned, unsigned(grid), unsigned(block), unsigned(thread), out); break;
    default: return "emu_flat_walk: elem_bytes is 4 (fp32) or 2 (bf16/fp16)";
  }
  return nullptr;
}

int64_t emu_flat_grid(int64_t n, int elem_bytes) {
  return elem_bytes == 2 ? flat_grid<AdamOp<BF16, false, 1>>(n, 0)
                         : flat_grid<AdamOp<F32, false, 1>>(n, 0);
}

const char* emu_list_plan(const std::vector<int64_t>& sizes, std::vector<int64_t>* plan) {
  // Fake tensors: no memory, the parameter pointer numbers the tensor (1-based, 16-byte steps
  // so that nothing looks like nullptr); the table is built as for a launch, on the host, and
  // only the grid sizing, the chunk loop and span_of run.
  std::vector<TensorPtrs> ts(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] < 0) return "emu_list_plan: negative size";
    ts[i].p = reinterpret_cast<void*>(uintptr_t(i + 1) * 16);
    ts[i].n = sizes[i];
  }
  using Op = AdamOp<F32, false, 1>;  // the plan of a one-EMA fp32 AdamW launch
  const ChunkMapSource src{&ts, chunk_elems()};
  int64_t n_chunks = 0;
  if (const char* err = count_chunks(ts, src.chunk, &n_chunks)) return err;
  const unsigned grid = n_chunks > 0 ? list_grid<Op>(n_chunks, 0) : 0;
  plan->push_back(grid);
  plan->push_back(n_chunks);
  if (n_chunks == 0) return nullptr;
  std::vector<uint64_t> table((ts.size() * sizeof(TensorPtrs) + n_chunks * sizeof(ChunkRef)) / 8);
  memcpy(table.data(), ts.data(), ts.size() * sizeof(TensorPtrs));
  fill_chunk_map(reinterpret_cast<unsigned char*>(table.data()) + ts.size() * sizeof(TensorPtrs),
                 &src);
  const ListTable w = table_at(table.data(), ts.size(), n_chunks);
  gridDim = dim3(grid);
  blockDim = dim3(kBlock);
  threadIdx = {0, 0, 0};
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {b, 0, 0};
    for_each_chunk(w, [&](int64_t c) {
      const Span sp = span_of<Op::kEmas, Op::kSR>(w, c);
      plan->push_back(b);
      plan->push_back(int64_t(reinterpret_cast<uintptr_t>(sp.t.p) / 16) - 1);
      plan->push_back(sp.lo);
      plan->push_back(sp.hi);
    });
  }
  ek_emu::traffic = ek_emu::Traffic();  // span_of's table reads: not a launch's
  return nullptr;
}
#endif  // EK_EMULATE_DEVICE

#ifndef EK_EMULATE_DEVICE
const char* cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return EK_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int cuda_compiled_version() { return CUDART_VERSION; }
#endif

// ==========================================================================================
// Lion (issue 25): one pass, read theta g m z, write theta m z (s0 of the pointer table: m).
// The math is fused_math.h's lion_ema_element, shared with the CPU twin.
// ==========================================================================================
namespace {

struct LionKArgs {
  LionScalars s;
  LionConfig cfg;
  const float* grad_scale;
  const float* found_inf;
  CapturablePtrs cap;
  double beta1, beta2, wd;
  bool maximize;
};

static_assert(sizeof(LionKArgs) <= sizeof(AdamKArgs), "the Adam launch has the largest arguments");

struct LionLaunch {
  LionScalars s;
  float gs;
};

template <class S, int NZ>
struct LionOp {
  using Args = LionKArgs;
  using Scalars = LionLaunch;
  using R = typename S::raw;
  static constexpr int kVec = 16 / int(sizeof(R));
  static constexpr int kEmas = NZ;
  static constexpr bool kSR = S::kStochastic;

  __device__ static __forceinline__ bool prologue(const LionKArgs& a, LionLaunch& l) {
    if (a.found_inf != nullptr && *a.found_inf != 0.0f) return false;
    l.s = a.s;
    if (a.cap.lr != nullptr) {
      l.s = make_lion_scalars(double(*a.cap.lr), a.beta1, a.beta2, a.wd, a.maximize,
                              make_ema_weights(a.cap.ema_w, NZ));
      l.s.sr_k0 = a.s.sr_k0;
      l.s.sr_k1 = a.s.sr_k1;
    }
    l.gs = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
    return true;
  }

  __device__ static __forceinline__ void span(const Span& sp, const LionLaunch& l,
                                              const LionKArgs& a) {
    constexpr int N = kVec;
    R* __restrict__ p = static_cast<R*>(sp.t.p);
    const R* __restrict__ g = static_cast<const R*>(sp.t.g);
    float* __restrict__ m = sp.t.s0;
    float* const* z = sp.t.z;
    const int64_t lo = sp.lo;
    const bool vec = aligned16(p + lo) && aligned16(g + lo) && aligned16(m + lo) &&
                     emas_aligned16<NZ>(sp.t, lo);
    const LionScalars& s = l.s;
    const float gs = l.gs;
    const LionConfig& cfg = a.cfg;
    const SrKey key = sr_key_of(s);
    const uint64_t base = uint64_t(sp.t.sr_base);
    walk<N>(
        sp, vec,
        [&](int64_t i) {
          R rp[N], rg[N];
          float rm[N], rz[kMaxEmas][N];
          load_vec(rp, p + i);
          load_vec(rg, g + i);
          load_vec(rm, m + i);
#pragma unroll
          for (int e = 0; e < NZ; ++e) load_vec(rz[e], z[e] + i);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            float ze[kMaxEmas];
#pragma unroll
            for (int e = 0; e < NZ; ++e) ze[e] = rz[e][k];
            const uint32_t rr = kSR ? sr_bits(key, base + uint64_t(i + k)) : 0u;
            lion_ema_element<S, NZ>(rp[k], rg[k], rm[k], ze, s, gs, cfg, rr);
#pragma unroll
            for (int e = 0; e < NZ; ++e) rz[e][k] = ze[e];
          }
          store_vec(p + i, rp);
          store_vec(m + i, rm);
#pragma unroll
          for (int e = 0; e < NZ; ++e) store_vec(z[e] + i, rz[e]);
        },
        [&](int64_t i) {
          R rp = ld(p + i);
          float rm = ld(m + i), ze[kMaxEmas];
#pragma unroll
          for (int e = 0; e < NZ; ++e) ze[e] = ld(z[e] + i);
          const uint32_t rr = kSR ? sr_bits(key, base + uint64_t(i)) : 0u;
          lion_ema_element<S, NZ>(rp, ld(g + i), rm, ze, s, gs, cfg, rr);
          st(p + i, rp);
          st(m + i, rm);
#pragma unroll
          for (int e = 0; e < NZ; ++e) st(z[e] + i, ze[e]);
        });
  }
};

template <class S>
const char* lion_dispatch(const std::vector<TensorPtrs>& ts, const LionKArgs& k, int nz,
                          int device, cudaStream_t st) {
  switch (nz) {
    case 0: return run<LionOp<S, 0>>(ts, k, device, st);
    case 1: return run<LionOp<S, 1>>(ts, k, device, st);
    case 2: return run<LionOp<S, 2>>(ts, k, device, st);
    case 3: return run<LionOp<S, 3>>(ts, k, device, st);
    case 4: return run<LionOp<S, 4>>(ts, k, device, st);
  }
  return "more EMAs than the kernels update in one pass (kMaxEmas)";
}

}  // namespace

const char* lion_ema_cuda(const std::vector<TensorPtrs>& ts, DType dtype, const LionArgs& a,
                          int device, void* stream) {
  LionKArgs k;
  k.s = make_lion_scalars(a.lr, a.beta1, a.beta2, a.weight_decay, a.maximize,
                          make_ema_weights(a.ema_w, a.n_emas));
  k.cfg.wd = a.weight_decay != 0.0;
  k.cfg.has_scale = a.grad_scale != nullptr;
  k.grad_scale = a.grad_scale;
  k.found_inf = a.found_inf;
  k.cap = a.capturable ? a.cap : CapturablePtrs();
  k.beta1 = a.beta1;
  k.beta2 = a.beta2;
  k.wd = a.weight_decay;
  k.maximize = a.maximize;
  set_sr_key(k.s, a.sr);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool sr = a.sr.on;
  switch (dtype) {
    case DType::kF32: return lion_dispatch<F32>(ts, k, a.n_emas, device, st);
    case DType::kBF16:
      return sr ? lion_dispatch<BF16SR>(ts, k, a.n_emas, device, st)
                : lion_dispatch<BF16>(ts, k, a.n_emas, device, st);
    case DType::kF16:
      return sr ? lion_dispatch<F16SR>(ts, k, a.n_emas, device, st)
                : lion_dispatch<F16>(ts, k, a.n_emas, device, st);
  }
  return "unsupported dtype";
}

// ==========================================================================================
// LARS and LAMB (issue 25).  Per-tensor values (LARS' (ratio, wd) row, LAMB's step size and
// sums row) come through the pointer table's spare state slots (kernels.h LarsArgs/LambArgs),
// read once per span through ld_arg: the list machinery (ListMeta, run<Op>) is Adam's as is.
// ==========================================================================================
namespace {

// LARS: one pass, read theta g buf z, write theta buf z; SGD's scalars.
struct LarsKArgs {
  SgdScalars s;
  LarsConfig cfg;
  const float* grad_scale;
  const float* found_inf;
  CapturablePtrs cap;
  double momentum, dampening;
  bool maximize;
};

static_assert(sizeof(LarsKArgs) <= sizeof(AdamKArgs), "the Adam launch has the largest arguments");

template <class S, int MODE, int NZ>
struct LarsOp {
  using Args = LarsKArgs;
  using Scalars = SgdLaunch;
  using R = typename S::raw;
  static constexpr int kVec = 16 / int(sizeof(R));
  static constexpr int kEmas = NZ;
  static constexpr bool kSR = S::kStochastic;

  __device__ static __forceinline__ bool prologue(const LarsKArgs& a, SgdLaunch& l) {
    if (a.found_inf != nullptr && ld_arg(a.found_inf) != 0.0f) return false;
    l.s = a.s;
    if (a.cap.lr != nullptr) {
      l.s = make_sgd_scalars(double(ld_arg(a.cap.lr)), a.momentum, a.dampening, 0.0, a.maximize,
                             ema_weights_arg(a.cap.ema_w, NZ));
      l.s.sr_k0 = a.s.sr_k0;
      l.s.sr_k1 = a.s.sr_k1;
    }
    l.gs = a.grad_scale != nullptr ? ld_arg(a.grad_scale) : 1.0f;
    return true;
  }

  __device__ static __forceinline__ void span(const Span& sp, const SgdLaunch& l,
                                              const LarsKArgs& a) {
    constexpr int N = kVec;
    constexpr bool kBuf = MODE != kNoMomentum;
    R* __restrict__ p = static_cast<R*>(sp.t.p);
    const R* __restrict__ g = static_cast<const R*>(sp.t.g);
    float* __restrict__ b = sp.t.s0;
    float* const* z = sp.t.z;
    const int64_t lo = sp.lo;
    const LarsCoef c{ld_arg(sp.t.s1), ld_arg(sp.t.s1 + 1)};  // the tensor's (ratio, wd)
    const bool vec = aligned16(p + lo) && aligned16(g + lo) && (!kBuf || aligned16(b + lo)) &&
                     emas_aligned16<NZ>(sp.t, lo);
    const SgdScalars& s = l.s;
    const float gs = l.gs;
    const LarsConfig& cfg = a.cfg;
    const SrKey key = sr_key_of(s);
    const uint64_t base = uint64_t(sp.t.sr_base);
    walk<N>(
        sp, vec,
        [&](int64_t i) {
          R rp[N], rg[N];
          float rb[N], rz[kMaxEmas][N];
          load_vec(rp, p + i);
          load_vec(rg, g + i);
          if (MODE == kMomentum) load_vec(rb, b + i);
#pragma unroll
          for (int e = 0; e < NZ; ++e) load_vec(rz[e], z[e] + i);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            float ze[kMaxEmas];
#pragma unroll
            for (int e = 0; e < NZ; ++e) ze[e] = rz[e][k];
            const uint32_t rr = kSR ? sr_bits(key, base + uint64_t(i + k)) : 0u;
            lars_ema_element<S, MODE, NZ>(rp[k], rg[k], rb[k], ze, s, c, gs, cfg, rr);
#pragma unroll
            for (int e = 0; e < NZ; ++e) rz[e][k] = ze[e];
          }
          store_vec(p + i, rp);
          if (kBuf) store_vec(b + i, rb);
#pragma unroll
          for (int e = 0; e < NZ; ++e) store_vec(z[e] + i, rz[e]);
        },
        [&](int64_t i) {
          R rp = ld(p + i);
          float rb = MODE == kMomentum ? ld(b + i) : 0.0f, ze[kMaxEmas];
#pragma unroll
          for (int e = 0; e < NZ; ++e) ze[e] = ld(z[e] + i);
          const uint32_t rr = kSR ? sr_bits(key, base + uint64_t(i)) : 0u;
          lars_ema_element<S, MODE, NZ>(rp, ld(g + i), rb, ze, s, c, gs, cfg, rr);
          st(p + i, rp);
          if (kBuf) st(b + i, rb);
#pragma unroll
          for (int e = 0; e < NZ; ++e) st(z[e] + i, ze[e]);
        });
  }
};

template <class S, int MODE>
const char* lars_dispatch_mode(const std::vector<TensorPtrs>& ts, const LarsKArgs& k, int nz,
                               int device, cudaStream_t st) {
  switch (nz) {
    case 0: return run<LarsOp<S, MODE, 0>>(ts, k, device, st);
    case 1: return run<LarsOp<S, MODE, 1>>(ts, k, device, st);
    case 2: return run<LarsOp<S, MODE, 2>>(ts, k, device, st);
    case 3: return run<LarsOp<S, MODE, 3>>(ts, k, device, st);
    case 4: return run<LarsOp<S, MODE, 4>>(ts, k, device, st);
  }
  return "more EMAs than the kernels update in one pass (kMaxEmas)";
}

template <class S>
const char* lars_dispatch(const std::vector<TensorPtrs>& ts, const LarsKArgs& k, int mode,
                          int nz, int device, cudaStream_t st) {
  switch (mode) {
    case kNoMomentum: return lars_dispatch_mode<S, kNoMomentum>(ts, k, nz, device, st);
    case kFirstStep: return lars_dispatch_mode<S, kFirstStep>(ts, k, nz, device, st);
    default: return lars_dispatch_mode<S, kMomentum>(ts, k, nz, device, st);
  }
}

// LAMB.
struct LambKArgs {
  LambScalars s;
  LambConfig cfg;
  const float* grad_scale;
  const float* found_inf;
  const float* bc;         // device (1 - beta1^t, sqrt(1 - beta2^t)), or nullptr
  const float* cap_ema_w;  // device EMA weights (pass 2), or nullptr
};

static_assert(sizeof(LambKArgs) <= sizeof(AdamKArgs), "the Adam launch has the largest arguments");

struct LambLaunch {
  LambScalars s;
  float gs;
};

template <int NZ>
__device__ __forceinline__ bool lamb_prologue(const LambKArgs& a, LambLaunch& l) {
  if (a.found_inf != nullptr && ld_arg(a.found_inf) != 0.0f) return false;
  l.s = a.s;
  if (a.bc != nullptr) {
    l.s.bc1 = ld_arg(a.bc);
    l.s.bc2_sqrt = ld_arg(a.bc + 1);
  }
  if (a.cap_ema_w != nullptr) l.s.ema = ema_weights_arg(a.cap_ema_w, NZ);
  l.gs = a.grad_scale != nullptr ? ld_arg(a.grad_scale) : 1.0f;
  return true;
}

// Pass 1: read theta g m v, write m v; each thread sums theta^2 and r^2 of its elements in
// float64 (every square exact) and adds its two partials to the tensor's row of the float64
// accumulator with one atomicAdd each (no block-level reduction: it would need __syncthreads,
// which the emulation cannot honour, so the emulated kernel is the GPU's).  The order of the
// atomics is the hardware's: the sums are exact to float64 rounding, not bit-reproducible;
// rounded to float32 (the launcher's result) they agree with the CPU twin's except where a
// float64 sum lies within its last bits of a float32 rounding boundary.
template <class S>
struct LambMomentsOp {
  using Args = LambKArgs;
  using Scalars = LambLaunch;
  using R = typename S::raw;
  static constexpr int kVec = 16 / int(sizeof(R));
  static constexpr int kEmas = 0;
  static constexpr bool kSR = false;

  __device__ static __forceinline__ bool prologue(const LambKArgs& a, LambLaunch& l) {
    return lamb_prologue<0>(a, l);
  }

  __device__ static __forceinline__ void span(const Span& sp, const LambLaunch& l,
                                              const LambKArgs& a) {
    constexpr int N = kVec;
    const R* __restrict__ p = static_cast<const R*>(sp.t.p);
    const R* __restrict__ g = static_cast<const R*>(sp.t.g);
    float* __restrict__ m = sp.t.s0;
    float* __restrict__ v = sp.t.s1;
    const int64_t lo = sp.lo;
    const bool vec = aligned16(p + lo) && aligned16(g + lo) && aligned16(m + lo) &&
                     aligned16(v + lo);
    const LambScalars& s = l.s;
    const float gs = l.gs;
    const LambConfig& cfg = a.cfg;
    double sum_p = 0.0, sum_r = 0.0;
    bool any = false;
    walk<N>(
        sp, vec,
        [&](int64_t i) {
          R rp[N], rg[N];
          float rm[N], rv[N];
          load_vec(rp, p + i);
          load_vec(rg, g + i);
          load_vec(rm, m + i);
          load_vec(rv, v + i);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            const float th = S::load(rp[k]);
            const float r = lamb_moments_update(th, S::load(rg[k]), rm[k], rv[k], s, gs, cfg);
            sum_p += double(th) * double(th);
            sum_r += double(r) * double(r);
          }
          store_vec(m + i, rm);
          store_vec(v + i, rv);
          any = true;
        },
        [&](int64_t i) {
          float rm = ld(m + i), rv = ld(v + i);
          const float th = S::load(ld(p + i));
          const float r = lamb_moments_update(th, S::load(ld(g + i)), rm, rv, s, gs, cfg);
          st(m + i, rm);
          st(v + i, rv);
          sum_p += double(th) * double(th);
          sum_r += double(r) * double(r);
          any = true;
        });
    if (any) {
      double* row = lamb_sums_row(sp.t);
      atomicAdd(row, sum_p);
      atomicAdd(row + 1, sum_r);
    }
  }
};

// Pass 2: read theta m v z, write theta z; r recomputed (bit for bit pass 1's).
template <class S, int NZ>
struct LambEmaOp {
  using Args = LambKArgs;
  using Scalars = LambLaunch;
  using R = typename S::raw;
  static constexpr int kVec = 16 / int(sizeof(R));
  static constexpr int kEmas = NZ;
  static constexpr bool kSR = S::kStochastic;

  __device__ static __forceinline__ bool prologue(const LambKArgs& a, LambLaunch& l) {
    return lamb_prologue<NZ>(a, l);
  }

  __device__ static __forceinline__ void span(const Span& sp, const LambLaunch& l,
                                              const LambKArgs& a) {
    constexpr int N = kVec;
    R* __restrict__ p = static_cast<R*>(sp.t.p);
    const float* __restrict__ m = sp.t.s0;
    const float* __restrict__ v = sp.t.s1;
    float* const* z = sp.t.z;
    const int64_t lo = sp.lo;
    const float neg_step = -ld_arg(sp.t.s2);  // -(lr * the tensor's trust ratio)
    const bool vec = aligned16(p + lo) && aligned16(m + lo) && aligned16(v + lo) &&
                     emas_aligned16<NZ>(sp.t, lo);
    const LambScalars& s = l.s;
    const LambConfig& cfg = a.cfg;
    const SrKey key = sr_key_of(s);
    const uint64_t base = uint64_t(sp.t.sr_base);
    walk<N>(
        sp, vec,
        [&](int64_t i) {
          R rp[N];
          float rm[N], rv[N], rz[kMaxEmas][N];
          load_vec(rp, p + i);
          load_vec(rm, m + i);
          load_vec(rv, v + i);
#pragma unroll
          for (int e = 0; e < NZ; ++e) load_vec(rz[e], z[e] + i);
#pragma unroll
          for (int k = 0; k < N; ++k) {
            float ze[kMaxEmas];
#pragma unroll
            for (int e = 0; e < NZ; ++e) ze[e] = rz[e][k];
            const uint32_t rr = kSR ? sr_bits(key, base + uint64_t(i + k)) : 0u;
            lamb_ema_element<S, NZ>(rp[k], rm[k], rv[k], ze, s, neg_step, cfg, rr);
#pragma unroll
            for (int e = 0; e < NZ; ++e) rz[e][k] = ze[e];
          }
          store_vec(p + i, rp);
#pragma unroll
          for (int e = 0; e < NZ; ++e) store_vec(z[e] + i, rz[e]);
        },
        [&](int64_t i) {
          R rp = ld(p + i);
          float ze[kMaxEmas];
#pragma unroll
          for (int e = 0; e < NZ; ++e) ze[e] = ld(z[e] + i);
          const uint32_t rr = kSR ? sr_bits(key, base + uint64_t(i)) : 0u;
          lamb_ema_element<S, NZ>(rp, ld(m + i), ld(v + i), ze, s, neg_step, cfg, rr);
          st(p + i, rp);
#pragma unroll
          for (int e = 0; e < NZ; ++e) st(z[e] + i, ze[e]);
        });
  }
};

template <class S>
const char* lamb_ema_dispatch(const std::vector<TensorPtrs>& ts, const LambKArgs& k, int nz,
                              int device, cudaStream_t st) {
  switch (nz) {
    case 0: return run<LambEmaOp<S, 0>>(ts, k, device, st);
    case 1: return run<LambEmaOp<S, 1>>(ts, k, device, st);
    case 2: return run<LambEmaOp<S, 2>>(ts, k, device, st);
    case 3: return run<LambEmaOp<S, 3>>(ts, k, device, st);
    case 4: return run<LambEmaOp<S, 4>>(ts, k, device, st);
  }
  return "more EMAs than the kernels update in one pass (kMaxEmas)";
}

LambKArgs lamb_kargs(const LambArgs& a) {
  LambKArgs k;
  k.s = make_lamb_scalars(a.beta1, a.beta2, a.eps, a.weight_decay, a.maximize, a.bc1,
                          a.bc2_sqrt, make_ema_weights(a.ema_w, a.n_emas));
  k.cfg.wd = a.weight_decay != 0.0;
  k.cfg.has_scale = a.grad_scale != nullptr;
  k.grad_scale = a.grad_scale;
  k.found_inf = a.found_inf;
  k.bc = a.bc;
  k.cap_ema_w = a.cap_ema_w;
  set_sr_key(k.s, a.sr);
  return k;
}

}  // namespace

const char* lars_ema_cuda(const std::vector<TensorPtrs>& ts, DType dtype, const LarsArgs& a,
                          int device, void* stream) {
  LarsKArgs k;
  const int mode = fill_momentum_kargs(k, a, 0.0);  // λθ is inside d, scaled by the ratio
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool sr = a.sr.on;
  switch (dtype) {
    case DType::kF32: return lars_dispatch<F32>(ts, k, mode, a.n_emas, device, st);
    case DType::kBF16:
      return sr ? lars_dispatch<BF16SR>(ts, k, mode, a.n_emas, device, st)
                : lars_dispatch<BF16>(ts, k, mode, a.n_emas, device, st);
    case DType::kF16:
      return sr ? lars_dispatch<F16SR>(ts, k, mode, a.n_emas, device, st)
                : lars_dispatch<F16>(ts, k, mode, a.n_emas, device, st);
  }
  return "unsupported dtype";
}

const char* lamb_moments_cuda(const std::vector<TensorPtrs>& ts, DType dtype, const LambArgs& a,
                              int device, void* stream) {
  const LambKArgs k = lamb_kargs(a);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32: return run<LambMomentsOp<F32>>(ts, k, device, st);
    case DType::kBF16: return run<LambMomentsOp<BF16>>(ts, k, device, st);
    case DType::kF16: return run<LambMomentsOp<F16>>(ts, k, device, st);
  }
  return "unsupported dtype";
}

const char* lamb_ema_cuda(const std::vector<TensorPtrs>& ts, DType dtype, const LambArgs& a,
                          int device, void* stream) {
  const LambKArgs k = lamb_kargs(a);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool sr = a.sr.on;
  switch (dtype) {
    case DType::kF32: return lamb_ema_dispatch<F32>(ts, k, a.n_emas, device, st);
    case DType::kBF16:
      return sr ? lamb_ema_dispatch<BF16SR>(ts, k, a.n_emas, device, st)
                : lamb_ema_dispatch<BF16>(ts, k, a.n_emas, device, st);
    case DType::kF16:
      return sr ? lamb_ema_dispatch<F16SR>(ts, k, a.n_emas, device, st)
                : lamb_ema_dispatch<F16>(ts, k, a.n_emas, device, st);
  }
  return "unsupported dtype";
}

}  // namespace ek
