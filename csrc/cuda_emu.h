// cuda_emu.h -- what fused_cuda.cu uses of CUDA, for compiling it as host C++ (the emulation
// build, ema_kernels._C_emu).  Included instead of <cuda_runtime.h> (and cuda_bf16.h /
// cuda_fp16.h) when EK_EMULATE_DEVICE is defined, i.e. by fused_cuda_emu.cpp; never seen by nvcc.
//
// A launch (ek_launch in fused_cuda.cu, the one launch site) runs every thread of every block to completion, one after
// the other, on the calling host thread: blockIdx/threadIdx/blockDim/gridDim are thread-local
// values set before each call of the kernel function.  That is a legal CUDA schedule for kernels
// that do not synchronise within a block (ours never call __syncthreads), so a kernel whose
// result depends on the order is wrong on the GPU too; the order can be shuffled (a seed set by
// the tests) to shake out such assumptions.  Memory is the host's: pointers are the CPU tensors'.
// There is deliberately no __syncthreads (nor shared memory): this schedule cannot honour a
// barrier, so a kernel that starts needing one fails to compile here instead of being emulated
// wrongly.
//
// The device arithmetic is IEEE single precision with one rounding per operation, as the _rn
// intrinsics are on the GPU: the emulation build is compiled with -ffp-contract=off (no implicit
// fma) on x86-64's SSE math (no x87 excess precision) and without -ffast-math, so denormals are
// kept as nvcc keeps them by default (-ftz=false, -prec-div=true, -prec-sqrt=true).
#pragma once

#ifdef __CUDACC__
#error "cuda_emu.h is for the host-compiled emulation build only"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <numeric>
#include <random>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------------------
// Function and variable qualifiers
// ------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

// ------------------------------------------------------------------------------------------
// Built-in vector types and the thread coordinates
// ------------------------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

// One set per host thread, so that several host threads may run emulated launches at once.
inline thread_local uint3 blockIdx = {0, 0, 0};
inline thread_local uint3 threadIdx = {0, 0, 0};
inline thread_local dim3 blockDim = dim3(1, 1, 1);
inline thread_local dim3 gridDim = dim3(1, 1, 1);

// ------------------------------------------------------------------------------------------
// Rounding-explicit arithmetic and bit casts (device intrinsics)
// ------------------------------------------------------------------------------------------
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }   // sqrtss: correctly rounded
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}

// ------------------------------------------------------------------------------------------
// bf16 / fp16 (cuda_bf16.h / cuda_fp16.h): storage types and round-to-nearest-even conversions.
// Written independently of fused_math.h's host conversions (which the CPU twin uses), so that
// the bit-for-bit comparison with the CPU twin checks both.  A NaN becomes the canonical NaN
// that the GPU's cvt.rn.{bf16,f16}.f32 produces (0x7FFF).
// ------------------------------------------------------------------------------------------
struct __nv_bfloat16 {
  unsigned short bits;
};
struct __half {
  unsigned short bits;
};

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const unsigned u = __float_as_uint(f);
  __nv_bfloat16 r;
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    r.bits = 0x7FFF;
  } else {
    // Round the discarded 16 bits to nearest, ties to the even result (may carry into the
    // exponent, which is correct: up to the next binade or to infinity).
    const unsigned lower = u & 0xFFFFu;
    unsigned upper = u >> 16;
    if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u))) ++upper;
    r.bits = static_cast<unsigned short>(upper);
  }
  return r;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

// GCC's _Float16 (x86-64, SSE2): an IEEE binary16 whose conversions round to nearest even,
// subnormals and overflow to infinity included.
inline __half __float2half_rn(float f) {
  __half r;
  if (f != f) {
    r.bits = 0x7FFF;
  } else {
    const _Float16 h = static_cast<_Float16>(f);
    memcpy(&r.bits, &h, 2);
  }
  return r;
}
inline float __half2float(__half h) {
  _Float16 x;
  memcpy(&x, &h.bits, 2);
  return static_cast<float>(x);
}
inline __half __ushort_as_half(unsigned short u) {
  __half h;
  h.bits = u;
  return h;
}
inline unsigned short __half_as_ushort(__half h) { return h.bits; }

// ------------------------------------------------------------------------------------------
// Runtime API: errors, streams, device attributes, occupancy
// ------------------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

namespace ek_emu {

// The emulated device: an H100-sized SM count; 2048 resident threads per SM.
constexpr int kSmCount = 132;
constexpr int kThreadsPerSm = 2048;

// The error of the last launch on this host thread (cudaGetLastError reads and clears it).
inline thread_local cudaError_t last_error = cudaSuccess;

// Counters the tests read (relaxed atomics: several host threads may launch at once).
struct Stats {
  std::atomic<int64_t> launches{0};
  std::atomic<int64_t> blocks{0};
  std::atomic<int64_t> occupancy_queries{0};
  // Global-memory traffic of the kernels (every load and store goes through fused_cuda.cu's
  // ld/st/load16/store16, which count here): bytes read, bytes written, the bytes of both moved
  // by 16-byte accesses, and reads of launch arguments kept in device memory (found_inf,
  // grad_scale, the capturable lr/step/EMA weights: the same few bytes for every thread,
  // counted apart, as reads, not as bytes of the update).
  std::atomic<int64_t> bytes_read{0};
  std::atomic<int64_t> bytes_written{0};
  std::atomic<int64_t> bytes_vector{0};
  std::atomic<int64_t> arg_reads{0};
  // List launches whose work table was copied host -> "device" (fused_cuda.cu's run_list).
  std::atomic<int64_t> table_uploads{0};
  // atomicAdd calls (LAMB's per-tensor sums: a thread's partials into the tensor's row), counted
  // apart from the update's bytes.
  std::atomic<int64_t> atomics{0};
};
inline Stats stats;

// The traffic of the launch running on this host thread, added to `stats` when it ends (one
// atomic add per counter and launch, not per access).
struct Traffic {
  int64_t read = 0, written = 0, vector = 0, args = 0, atomics = 0;
};
inline thread_local Traffic traffic;
inline void count_read(int64_t bytes, bool vector) {
  traffic.read += bytes;
  if (vector) traffic.vector += bytes;
}
inline void count_write(int64_t bytes, bool vector) {
  traffic.written += bytes;
  if (vector) traffic.vector += bytes;
}
inline void count_arg_read() { ++traffic.args; }
inline void count_atomic() { ++traffic.atomics; }

// 0: blocks and threads run in order.  Otherwise the seed of a random order of the blocks and
// of the threads within each block (a fresh permutation per launch).
inline std::atomic<uint64_t> shuffle_seed{0};
inline std::atomic<uint64_t> launch_counter{0};

// Thrown by an emulated device access that the GPU would fault on; ends the launch, whose error
// cudaGetLastError then reports.
struct DeviceFault {
  cudaError_t code;
};

// A 16-byte vector access, as the GPU performs it: on a misaligned address it faults.
inline void check_aligned16(const void* p) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) != 0) throw DeviceFault{cudaErrorMisalignedAddress};
}
inline uint4 load16(const uint4* p) {
  check_aligned16(p);
  count_read(16, true);
  uint4 v;
  memcpy(&v, p, 16);
  return v;
}
inline void store16(uint4* p, const uint4& v) {
  check_aligned16(p);
  count_write(16, true);
  memcpy(p, &v, 16);
}

// kernel<<<grid, block, smem, stream>>>(args...): checks the launch configuration as the
// runtime does, then runs every (block, thread).  Kernel parameters are converted to the
// kernel's parameter types once, as the launch copies them into constant memory once.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            A&&... args) {
  (void)stream;
  // The parameter space the design promises (< 4 KB: any CUDA version, any arch).
  static_assert((sizeof(std::decay_t<P>) + ... + 0) <= 4096, "kernel parameters exceed 4 KB");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535u ||
      grid.z > 65535u || threads == 0 || threads > 1024 || block.z > 64 || smem > 49152) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  stats.launches.fetch_add(1, std::memory_order_relaxed);
  stats.blocks.fetch_add(int64_t(grid.x) * grid.y * grid.z, std::memory_order_relaxed);
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> border, torder(threads);
  std::iota(torder.begin(), torder.end(), uint64_t(0));
  const uint64_t seed = shuffle_seed.load(std::memory_order_relaxed);
  std::mt19937_64 rng(seed ^ (0x9E3779B97F4A7C15ull *
                              (launch_counter.fetch_add(1, std::memory_order_relaxed) + 1)));
  if (seed != 0) {
    border.resize(nblocks);
    std::iota(border.begin(), border.end(), uint64_t(0));
    std::shuffle(border.begin(), border.end(), rng);
  }
  gridDim = grid;
  blockDim = block;
  traffic = Traffic();
  struct Flush {  // the launch's traffic into the totals, however the launch ends
    ~Flush() {
      stats.bytes_read.fetch_add(traffic.read, std::memory_order_relaxed);
      stats.bytes_written.fetch_add(traffic.written, std::memory_order_relaxed);
      stats.bytes_vector.fetch_add(traffic.vector, std::memory_order_relaxed);
      stats.arg_reads.fetch_add(traffic.args, std::memory_order_relaxed);
      stats.atomics.fetch_add(traffic.atomics, std::memory_order_relaxed);
      traffic = Traffic();
    }
  } flush;
  try {
    for (uint64_t bi = 0; bi < nblocks; ++bi) {
      const uint64_t b = seed != 0 ? border[bi] : bi;
      blockIdx = {unsigned(b % grid.x), unsigned((b / grid.x) % grid.y),
                  unsigned(b / (uint64_t(grid.x) * grid.y))};
      if (seed != 0) std::shuffle(torder.begin(), torder.end(), rng);
      for (const uint64_t t : torder) {
        threadIdx = {unsigned(t % block.x), unsigned((t / block.x) % block.y),
                     unsigned(t / (uint64_t(block.x) * block.y))};
        std::apply(kernel, params);
      }
    }
  } catch (const DeviceFault& f) {
    last_error = f.code;
  }
}

}  // namespace ek_emu

// atomicAdd on global memory: a launch runs on one host thread, one emulated thread at a time,
// so a plain read-modify-write is atomic here; counted (ek_emu::stats.atomics).
inline double atomicAdd(double* address, double val) {
  ek_emu::count_atomic();
  const double old = *address;
  *address = old + val;
  return old;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ek_emu::last_error;
  ek_emu::last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMisalignedAddress: return "misaligned address";
  }
  return "unknown error";
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device < 0) return cudaErrorInvalidValue;
  *value = ek_emu::kSmCount;
  return cudaSuccess;
}

template <typename K>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, K kernel, int block_size,
                                                          size_t smem) {
  (void)kernel;
  (void)smem;
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  ek_emu::stats.occupancy_queries.fetch_add(1, std::memory_order_relaxed);
  *blocks = ek_emu::kThreadsPerSm / block_size;
  return cudaSuccess;
}
