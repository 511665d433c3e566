// fused_cuda.cu -- CUDA kernels for the fused optimizer step + EMA.
//
// * Flat kernels: one contiguous buffer per role; grid-stride loop with 64-bit indices; each
//   thread moves 16 bytes of parameters/gradients per access (4 fp32 or 8 bf16/fp16 elements)
//   and the matching float4s of state and EMA when every pointer is 16-byte aligned, with a
//   scalar tail (and a scalar path for unaligned buffers).
// * List kernels: tensor lists in the style of torch's multi_tensor_apply: a pointer table and a
//   block -> (tensor, chunk) map passed as kernel parameters (< 4 KB), one block per 64K-element
//   chunk, as many launches as the tables need.
// * grad_scale / found_inf are read on the device (no host sync); a found_inf != 0 makes every
//   thread return before touching memory.
// * Capturable: lr, the step count and the EMA weight may instead be read from device tensors,
//   so the launch parameters are the same every step and a step can be captured in a CUDA graph.
//
// The math is fused_math.h's (shared with the CPU twin).  No torch or pybind headers here.
#include <cuda_runtime.h>
#include <stdint.h>

#include <vector>

#include "fused_math.h"
#include "kernels.h"

namespace ek {
namespace {

constexpr int kBlock = 512;                 // threads per block
constexpr int64_t kChunk = 65536;           // elements per block in the list kernels
constexpr int kListMaxTensors = 36;         // pointer-table capacity per launch
constexpr int kListMaxBlocks = 320;         // block-map capacity per launch

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

struct ListMeta {
  void* p[kListMaxTensors];
  const void* g[kListMaxTensors];
  float* s0[kListMaxTensors];
  float* s1[kListMaxTensors];
  float* s2[kListMaxTensors];
  float* z[kListMaxTensors];
  int64_t n[kListMaxTensors];
  unsigned char block_to_tensor[kListMaxBlocks];
  int block_to_chunk[kListMaxBlocks];
};

__device__ __forceinline__ TensorPtrs list_entry(const ListMeta& m, int i) {
  TensorPtrs t;
  t.p = m.p[i];
  t.g = m.g[i];
  t.s0 = m.s0[i];
  t.s1 = m.s1[i];
  t.s2 = m.s2[i];
  t.z = m.z[i];
  t.n = m.n[i];
  return t;
}

// The per-step scalars of this launch (from the host, or from device tensors when capturable),
// and the gradient scale.  Returns false when found_inf says to skip the step.
__device__ __forceinline__ bool prologue(const AdamKArgs& a, AdamScalars& s, float& gs) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return false;
  s = a.s;
  if (a.cap.lr != nullptr) {
    const double lr = double(*a.cap.lr);
    double step_size, bc2_sqrt;
    adam_step_values(lr, a.beta1, a.beta2, double(*a.cap.step), &step_size, &bc2_sqrt);
    const double w = a.cap.ema_w != nullptr ? double(*a.cap.ema_w) : 0.0;
    s = make_adam_scalars(lr, a.beta1, a.beta2, a.eps, a.wd, a.decoupled, a.maximize, step_size,
                          bc2_sqrt, w);
  }
  gs = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
  return true;
}

__device__ __forceinline__ bool prologue(const SgdKArgs& a, SgdScalars& s, float& gs) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return false;
  s = a.s;
  if (a.cap.lr != nullptr) {
    const double w = a.cap.ema_w != nullptr ? double(*a.cap.ema_w) : 0.0;
    s = make_sgd_scalars(double(*a.cap.lr), a.momentum, a.dampening, a.wd, a.maximize, w);
  }
  gs = a.grad_scale != nullptr ? *a.grad_scale : 1.0f;
  return true;
}

// ------------------------------------------------------------------------------------------
// 16-byte vector loads / stores
// ------------------------------------------------------------------------------------------
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
    x.u = src[w];
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
    dst[w] = x.u;
  }
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ------------------------------------------------------------------------------------------
// Adam: a span [lo, hi) of one tensor, walked by threads tid, tid+stride, ...
// ------------------------------------------------------------------------------------------
template <class S, bool AMSGRAD, bool HAS_EMA>
__device__ __forceinline__ void adam_span(const TensorPtrs& t, int64_t lo, int64_t hi,
                                          int64_t tid, int64_t stride, const AdamScalars& s,
                                          float gs, const AdamConfig& cfg) {
  using R = typename S::raw;
  constexpr int N = 16 / int(sizeof(R));
  R* __restrict__ p = static_cast<R*>(t.p);
  const R* __restrict__ g = static_cast<const R*>(t.g);
  float* __restrict__ m = t.s0;
  float* __restrict__ v = t.s1;
  float* __restrict__ vm = t.s2;
  float* __restrict__ z = t.z;
  const bool vec = aligned16(p + lo) && aligned16(g + lo) && aligned16(m + lo) &&
                   aligned16(v + lo) && (!AMSGRAD || aligned16(vm + lo)) &&
                   (!HAS_EMA || aligned16(z + lo));
  int64_t scalar_from = lo;
  if (vec) {
    const int64_t nv = (hi - lo) / N;
    for (int64_t j = tid; j < nv; j += stride) {
      const int64_t i = lo + j * N;
      R rp[N], rg[N];
      float rm[N], rv[N], rvm[N], rz[N];
      load_vec(rp, p + i);
      load_vec(rg, g + i);
      load_vec(rm, m + i);
      load_vec(rv, v + i);
      if (AMSGRAD) load_vec(rvm, vm + i);
      if (HAS_EMA) load_vec(rz, z + i);
#pragma unroll
      for (int k = 0; k < N; ++k)
        adam_ema_element<S, AMSGRAD, HAS_EMA>(rp[k], rg[k], rm[k], rv[k], rvm[k], rz[k], s, gs,
                                              cfg);
      store_vec(p + i, rp);
      store_vec(m + i, rm);
      store_vec(v + i, rv);
      if (AMSGRAD) store_vec(vm + i, rvm);
      if (HAS_EMA) store_vec(z + i, rz);
    }
    scalar_from = lo + nv * N;
  }
  for (int64_t i = scalar_from + tid; i < hi; i += stride) {
    R rp = p[i];
    float rm = m[i], rv = v[i], rvm = AMSGRAD ? vm[i] : 0.0f, rz = HAS_EMA ? z[i] : 0.0f;
    adam_ema_element<S, AMSGRAD, HAS_EMA>(rp, g[i], rm, rv, rvm, rz, s, gs, cfg);
    p[i] = rp;
    m[i] = rm;
    v[i] = rv;
    if (AMSGRAD) vm[i] = rvm;
    if (HAS_EMA) z[i] = rz;
  }
}

template <class S, bool AMSGRAD, bool HAS_EMA>
__global__ void __launch_bounds__(kBlock) adam_flat_kernel(TensorPtrs t, AdamKArgs a) {
  AdamScalars s;
  float gs;
  if (!prologue(a, s, gs)) return;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  adam_span<S, AMSGRAD, HAS_EMA>(t, 0, t.n, tid, stride, s, gs, a.cfg);
}

template <class S, bool AMSGRAD, bool HAS_EMA>
__global__ void __launch_bounds__(kBlock) adam_list_kernel(ListMeta meta, AdamKArgs a) {
  AdamScalars s;
  float gs;
  if (!prologue(a, s, gs)) return;
  const TensorPtrs t = list_entry(meta, meta.block_to_tensor[blockIdx.x]);
  const int64_t lo = int64_t(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t hi = lo + kChunk < t.n ? lo + kChunk : t.n;
  adam_span<S, AMSGRAD, HAS_EMA>(t, lo, hi, threadIdx.x, blockDim.x, s, gs, a.cfg);
}

// ------------------------------------------------------------------------------------------
// SGD
// ------------------------------------------------------------------------------------------
template <class S, int MODE, bool HAS_EMA>
__device__ __forceinline__ void sgd_span(const TensorPtrs& t, int64_t lo, int64_t hi,
                                         int64_t tid, int64_t stride, const SgdScalars& s,
                                         float gs, const SgdConfig& cfg) {
  using R = typename S::raw;
  constexpr int N = 16 / int(sizeof(R));
  constexpr bool kBuf = MODE != kNoMomentum;
  R* __restrict__ p = static_cast<R*>(t.p);
  const R* __restrict__ g = static_cast<const R*>(t.g);
  float* __restrict__ b = t.s0;
  float* __restrict__ z = t.z;
  const bool vec = aligned16(p + lo) && aligned16(g + lo) && (!kBuf || aligned16(b + lo)) &&
                   (!HAS_EMA || aligned16(z + lo));
  int64_t scalar_from = lo;
  if (vec) {
    const int64_t nv = (hi - lo) / N;
    for (int64_t j = tid; j < nv; j += stride) {
      const int64_t i = lo + j * N;
      R rp[N], rg[N];
      float rb[N], rz[N];
      load_vec(rp, p + i);
      load_vec(rg, g + i);
      if (MODE == kMomentum) load_vec(rb, b + i);
      if (HAS_EMA) load_vec(rz, z + i);
#pragma unroll
      for (int k = 0; k < N; ++k)
        sgd_ema_element<S, MODE, HAS_EMA>(rp[k], rg[k], rb[k], rz[k], s, gs, cfg);
      store_vec(p + i, rp);
      if (kBuf) store_vec(b + i, rb);
      if (HAS_EMA) store_vec(z + i, rz);
    }
    scalar_from = lo + nv * N;
  }
  for (int64_t i = scalar_from + tid; i < hi; i += stride) {
    R rp = p[i];
    float rb = MODE == kMomentum ? b[i] : 0.0f, rz = HAS_EMA ? z[i] : 0.0f;
    sgd_ema_element<S, MODE, HAS_EMA>(rp, g[i], rb, rz, s, gs, cfg);
    p[i] = rp;
    if (kBuf) b[i] = rb;
    if (HAS_EMA) z[i] = rz;
  }
}

template <class S, int MODE, bool HAS_EMA>
__global__ void __launch_bounds__(kBlock) sgd_flat_kernel(TensorPtrs t, SgdKArgs a) {
  SgdScalars s;
  float gs;
  if (!prologue(a, s, gs)) return;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  sgd_span<S, MODE, HAS_EMA>(t, 0, t.n, tid, stride, s, gs, a.cfg);
}

template <class S, int MODE, bool HAS_EMA>
__global__ void __launch_bounds__(kBlock) sgd_list_kernel(ListMeta meta, SgdKArgs a) {
  SgdScalars s;
  float gs;
  if (!prologue(a, s, gs)) return;
  const TensorPtrs t = list_entry(meta, meta.block_to_tensor[blockIdx.x]);
  const int64_t lo = int64_t(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t hi = lo + kChunk < t.n ? lo + kChunk : t.n;
  sgd_span<S, MODE, HAS_EMA>(t, lo, hi, threadIdx.x, blockDim.x, s, gs, a.cfg);
}

// ------------------------------------------------------------------------------------------
// EMA only (parameters that took no step while the EMA clock ticked)
// ------------------------------------------------------------------------------------------
template <class S>
__device__ __forceinline__ void ema_span(const TensorPtrs& t, int64_t lo, int64_t hi,
                                         int64_t tid, int64_t stride, float w) {
  using R = typename S::raw;
  constexpr int N = 16 / int(sizeof(R));
  const R* __restrict__ p = static_cast<const R*>(t.p);
  float* __restrict__ z = t.z;
  int64_t scalar_from = lo;
  if (aligned16(p + lo) && aligned16(z + lo)) {
    const int64_t nv = (hi - lo) / N;
    for (int64_t j = tid; j < nv; j += stride) {
      const int64_t i = lo + j * N;
      R rp[N];
      float rz[N];
      load_vec(rp, p + i);
      load_vec(rz, z + i);
#pragma unroll
      for (int k = 0; k < N; ++k) ema_only_element<S>(rp[k], rz[k], w);
      store_vec(z + i, rz);
    }
    scalar_from = lo + nv * N;
  }
  for (int64_t i = scalar_from + tid; i < hi; i += stride) {
    float rz = z[i];
    ema_only_element<S>(p[i], rz, w);
    z[i] = rz;
  }
}

template <class S>
__global__ void __launch_bounds__(kBlock) ema_flat_kernel(TensorPtrs t, float w) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  ema_span<S>(t, 0, t.n, tid, stride, w);
}

template <class S>
__global__ void __launch_bounds__(kBlock) ema_list_kernel(ListMeta meta, float w) {
  const TensorPtrs t = list_entry(meta, meta.block_to_tensor[blockIdx.x]);
  const int64_t lo = int64_t(meta.block_to_chunk[blockIdx.x]) * kChunk;
  const int64_t hi = lo + kChunk < t.n ? lo + kChunk : t.n;
  ema_span<S>(t, lo, hi, threadIdx.x, blockDim.x, w);
}

// ------------------------------------------------------------------------------------------
// Host side: grid sizing and launching
// ------------------------------------------------------------------------------------------
constexpr int kMaxDevices = 64;

int sm_count(int device) {
  static int cache[kMaxDevices] = {0};
  if (device < 0 || device >= kMaxDevices) return 108;
  if (cache[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        n <= 0)
      n = 108;
    cache[device] = n;
  }
  return cache[device];
}

// Resident blocks per SM for `kernel` (cached per kernel instantiation and device).
template <typename K>
int blocks_per_sm(K kernel, int device) {
  static int cache[kMaxDevices] = {0};
  if (device < 0 || device >= kMaxDevices) return 1;
  if (cache[device] == 0) {
    int nb = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, kBlock, 0) != cudaSuccess ||
        nb <= 0)
      nb = 1;
    cache[device] = nb;
  }
  return cache[device];
}

// Grid of the flat kernels: enough blocks to fill the GPU once (grid-stride beyond that).
template <typename K>
unsigned flat_grid(K kernel, int64_t n, int elems_per_thread, int device) {
  const int64_t work = (n + elems_per_thread - 1) / elems_per_thread;
  int64_t blocks = (work + kBlock - 1) / kBlock;
  const int64_t cap = int64_t(sm_count(device)) * blocks_per_sm(kernel, device);
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return unsigned(blocks);
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// Walks the tensors, filling pointer tables and block maps, and calls launch(meta, blocks)
// whenever a table is full (a tensor may continue into the next launch).
template <typename Launch>
const char* for_each_list_launch(const std::vector<TensorPtrs>& ts, Launch&& launch) {
  ListMeta meta;
  int nt = 0, nb = 0;
  for (const TensorPtrs& t : ts) {
    if (t.n == 0) continue;
    meta.p[nt] = t.p;
    meta.g[nt] = t.g;
    meta.s0[nt] = t.s0;
    meta.s1[nt] = t.s1;
    meta.s2[nt] = t.s2;
    meta.z[nt] = t.z;
    meta.n[nt] = t.n;
    ++nt;
    const int64_t chunks = (t.n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[nb] = static_cast<unsigned char>(nt - 1);
      meta.block_to_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kListMaxBlocks || (nt == kListMaxTensors && last_chunk)) {
        launch(meta, nb);
        if (const char* err = last_error()) return err;
        nb = 0;
        if (last_chunk) {
          nt = 0;
        } else {  // the current tensor continues in the next launch, as entry 0
          meta.p[0] = meta.p[nt - 1];
          meta.g[0] = meta.g[nt - 1];
          meta.s0[0] = meta.s0[nt - 1];
          meta.s1[0] = meta.s1[nt - 1];
          meta.s2[0] = meta.s2[nt - 1];
          meta.z[0] = meta.z[nt - 1];
          meta.n[0] = meta.n[nt - 1];
          nt = 1;
        }
      }
    }
  }
  if (nb > 0) {
    launch(meta, nb);
    if (const char* err = last_error()) return err;
  }
  return nullptr;
}

// Flat (one tensor) or list launch of a kernel pair.
template <int N, typename FlatK, typename ListK, typename Args>
const char* run(const std::vector<TensorPtrs>& ts, FlatK flat, ListK list, const Args& a,
                int device, cudaStream_t stream) {
  if (ts.size() == 1) {
    if (ts[0].n == 0) return nullptr;
    const unsigned grid = flat_grid(flat, ts[0].n, N, device);
    flat<<<grid, kBlock, 0, stream>>>(ts[0], a);
    return last_error();
  }
  return for_each_list_launch(ts, [&](const ListMeta& meta, int blocks) {
    list<<<blocks, kBlock, 0, stream>>>(meta, a);
  });
}

template <class S>
const char* adam_dispatch(const std::vector<TensorPtrs>& ts, const AdamKArgs& k, bool ams,
                          bool ema, int device, cudaStream_t st) {
  constexpr int N = 16 / int(sizeof(typename S::raw));
  if (ams) {
    return ema ? run<N>(ts, adam_flat_kernel<S, true, true>, adam_list_kernel<S, true, true>, k,
                        device, st)
               : run<N>(ts, adam_flat_kernel<S, true, false>, adam_list_kernel<S, true, false>,
                        k, device, st);
  }
  return ema ? run<N>(ts, adam_flat_kernel<S, false, true>, adam_list_kernel<S, false, true>, k,
                      device, st)
             : run<N>(ts, adam_flat_kernel<S, false, false>, adam_list_kernel<S, false, false>,
                      k, device, st);
}

template <class S, int MODE>
const char* sgd_dispatch_mode(const std::vector<TensorPtrs>& ts, const SgdKArgs& k, bool ema,
                              int device, cudaStream_t st) {
  constexpr int N = 16 / int(sizeof(typename S::raw));
  return ema ? run<N>(ts, sgd_flat_kernel<S, MODE, true>, sgd_list_kernel<S, MODE, true>, k,
                      device, st)
             : run<N>(ts, sgd_flat_kernel<S, MODE, false>, sgd_list_kernel<S, MODE, false>, k,
                      device, st);
}

template <class S>
const char* sgd_dispatch(const std::vector<TensorPtrs>& ts, const SgdKArgs& k, int mode,
                         bool ema, int device, cudaStream_t st) {
  switch (mode) {
    case kNoMomentum: return sgd_dispatch_mode<S, kNoMomentum>(ts, k, ema, device, st);
    case kFirstStep: return sgd_dispatch_mode<S, kFirstStep>(ts, k, ema, device, st);
    default: return sgd_dispatch_mode<S, kMomentum>(ts, k, ema, device, st);
  }
}

template <class S>
const char* ema_dispatch(const std::vector<TensorPtrs>& ts, float w, int device,
                         cudaStream_t st) {
  constexpr int N = 16 / int(sizeof(typename S::raw));
  return run<N>(ts, ema_flat_kernel<S>, ema_list_kernel<S>, w, device, st);
}

#define EK_STR2(...) #__VA_ARGS__
#define EK_STR(...) EK_STR2(__VA_ARGS__)

}  // namespace

const char* adam_ema_cuda(const std::vector<TensorPtrs>& ts, DType dtype, const AdamArgs& a,
                          int device, void* stream) {
  AdamKArgs k;
  k.s = make_adam_scalars(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.decoupled, a.maximize,
                          a.step_size, a.bc2_sqrt, a.ema_w);
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
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32: return adam_dispatch<F32>(ts, k, a.amsgrad, a.has_ema, device, st);
    case DType::kBF16: return adam_dispatch<BF16>(ts, k, a.amsgrad, a.has_ema, device, st);
    case DType::kF16: return adam_dispatch<F16>(ts, k, a.amsgrad, a.has_ema, device, st);
  }
  return "unsupported dtype";
}

const char* sgd_ema_cuda(const std::vector<TensorPtrs>& ts, DType dtype, const SgdArgs& a,
                         int device, void* stream) {
  SgdKArgs k;
  k.s = make_sgd_scalars(a.lr, a.momentum, a.dampening, a.weight_decay, a.maximize, a.ema_w);
  const int mode = a.momentum == 0.0 ? kNoMomentum : (a.first_step ? kFirstStep : kMomentum);
  k.cfg.l2 = a.weight_decay != 0.0;
  k.cfg.has_scale = a.grad_scale != nullptr;
  k.cfg.nesterov = mode != kNoMomentum && a.nesterov;
  k.grad_scale = a.grad_scale;
  k.found_inf = a.found_inf;
  k.cap = a.capturable ? a.cap : CapturablePtrs();
  k.momentum = a.momentum;
  k.dampening = a.dampening;
  k.wd = a.weight_decay;
  k.maximize = a.maximize;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32: return sgd_dispatch<F32>(ts, k, mode, a.has_ema, device, st);
    case DType::kBF16: return sgd_dispatch<BF16>(ts, k, mode, a.has_ema, device, st);
    case DType::kF16: return sgd_dispatch<F16>(ts, k, mode, a.has_ema, device, st);
  }
  return "unsupported dtype";
}

const char* ema_only_cuda(const std::vector<TensorPtrs>& ts, DType dtype, double ema_w,
                          int device, void* stream) {
  const float w = float(ema_w);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32: return ema_dispatch<F32>(ts, w, device, st);
    case DType::kBF16: return ema_dispatch<BF16>(ts, w, device, st);
    case DType::kF16: return ema_dispatch<F16>(ts, w, device, st);
  }
  return "unsupported dtype";
}

const char* cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return EK_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int cuda_compiled_version() { return CUDART_VERSION; }

}  // namespace ek
