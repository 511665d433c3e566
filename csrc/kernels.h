// kernels.h -- the torch-free interface between bindings.cpp and the kernels
// (fused_cpu.cpp for CPU tensors, fused_cuda.cu for CUDA tensors).
//
// bindings.cpp validates the tensors and fills these plain structs; the kernel files see only
// raw pointers, element counts and scalars, so neither includes torch or pybind headers.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <memory>
#include <vector>

#include "fused_math.h"

namespace ek {

enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// One entry per tensor of the list (a flat buffer is a list of one).  Unused roles are nullptr
// (vmax unless AMSGrad, z[k] for k >= the number of EMAs updated, buf unless momentum).
struct TensorPtrs {
  void* p = nullptr;         // parameters, storage dtype
  const void* g = nullptr;   // gradients, storage dtype
  float* s0 = nullptr;       // Adam: exp_avg           SGD: momentum_buffer
  float* s1 = nullptr;       // Adam: exp_avg_sq
  float* s2 = nullptr;       // Adam: max_exp_avg_sq (AMSGrad)
  float* z[kMaxEmas] = {};   // EMAs 0 .. n_emas-1 (all updated in the same pass)
  int64_t n = 0;             // elements
  // Stochastic rounding: the element index of this tensor's element 0 (its offset in the
  // set's flat layout, layout.py), so that element i draws the bits of index sr_base + i.
  int64_t sr_base = 0;
};

// Stochastic rounding of 16-bit parameters (issue 15): on for a call, with the group's seed and
// the launch's step count t; the random bits of an element are sr_bits(sr_key(seed, t), index).
struct SrArgs {
  bool on = false;
  uint64_t seed = 0, step = 0;
};

// Device-resident per-step values for the capturable kernels (all 1-element float32 tensors).
struct CapturablePtrs {
  const float* lr = nullptr;     // learning rate
  const float* step = nullptr;   // Adam: the step count t (already incremented for this step)
  const float* ema_w = nullptr;  // 1 - rho_hat_k, one element per EMA (nullptr: no EMA)
};

struct AdamArgs {
  // Host-side per-step values (ignored by the capturable path where `cap` gives them).
  double lr = 0, step_size = 0, bc2_sqrt = 1;
  double ema_w[kMaxEmas] = {};  // 1 - rho_hat_k of EMA k < n_emas
  int n_emas = 0;               // EMAs updated this step (0: none), <= kMaxEmas
  // Per-group constants.
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  bool decoupled = true, maximize = false, amsgrad = false;
  bool capturable = false;
  CapturablePtrs cap;
  const float* grad_scale = nullptr;  // divide gradients by *grad_scale
  const float* found_inf = nullptr;   // *found_inf != 0: change nothing
  SrArgs sr;                          // stochastic rounding (bf16/fp16 parameters only)
};

struct SgdArgs {
  double lr = 0;
  double ema_w[kMaxEmas] = {};
  int n_emas = 0;
  double momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false, maximize = false, first_step = false;
  bool capturable = false;
  CapturablePtrs cap;
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
  SrArgs sr;
};

// The per-group part of a launch's arguments, filled the same way by every entry point (the
// torch.ops in bindings.cpp and StepTable in step_table.cpp); the per-step part (lr, step size,
// EMA weights or the capturable pointers, stochastic rounding) is set by the caller.
inline AdamArgs make_adam_args(double beta1, double beta2, double eps, double weight_decay,
                               bool decoupled, bool maximize, bool amsgrad, int n_emas,
                               const float* grad_scale, const float* found_inf) {
  AdamArgs a;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.decoupled = decoupled;
  a.maximize = maximize;
  a.amsgrad = amsgrad;
  a.n_emas = n_emas;
  a.grad_scale = grad_scale;
  a.found_inf = found_inf;
  return a;
}

inline SgdArgs make_sgd_args(double momentum, double dampening, double weight_decay,
                             bool nesterov, bool maximize, bool first_step, int n_emas,
                             const float* grad_scale, const float* found_inf) {
  SgdArgs a;
  a.momentum = momentum;
  a.dampening = dampening;
  a.weight_decay = weight_decay;
  a.nesterov = nesterov;
  a.maximize = maximize;
  a.first_step = first_step;
  a.n_emas = n_emas;
  a.grad_scale = grad_scale;
  a.found_inf = found_inf;
  return a;
}

// The host EMA weights of a plain launch: w[0..n) (n <= kMaxEmas, checked by the caller).
inline void set_ema_weights(double* out, const double* w, size_t n) {
  for (size_t k = 0; k < n && k < size_t(kMaxEmas); ++k) out[k] = w[k];
}

// Lion (issue 25): s0 of TensorPtrs is exp_avg.
struct LionArgs {
  double lr = 0;
  double ema_w[kMaxEmas] = {};
  int n_emas = 0;
  double beta1 = 0.9, beta2 = 0.99, weight_decay = 0;
  bool maximize = false;
  bool capturable = false;
  CapturablePtrs cap;
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
  SrArgs sr;
};

// LARS (issue 25): SGD's pointer table (s0: momentum_buffer, nullptr without momentum) plus, in
// s1, the tensor's row of the (n, 2) float32 coefficient tensor (trust ratio, weight decay
// applied) that norms.lars_coefs formed on the device: a per-tensor pointer, read once per span.
struct LarsArgs {
  double lr = 0;
  double ema_w[kMaxEmas] = {};
  int n_emas = 0;
  double momentum = 0, dampening = 0;
  bool nesterov = false, maximize = false, first_step = false;
  bool capturable = false;  // lr and the EMA weights from cap (device tensors)
  CapturablePtrs cap;
  const float* grad_scale = nullptr;
  const float* found_inf = nullptr;
  SrArgs sr;
};

// LAMB (issue 25), two passes.  s0: exp_avg, s1: exp_avg_sq; s2: the tensor's slot of a
// per-tensor vector -- pass 1 (moments): its row of the (n, 2) float64 accumulator of
// (sum theta^2, sum r^2), zeroed by the caller (a double*, stored in the float* slot);
// pass 2 (ema): its element of the (n,) float32 step sizes lr * trust ratio.
struct LambArgs {
  double ema_w[kMaxEmas] = {};  // pass 2
  int n_emas = 0;               // pass 2
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-6, weight_decay = 0;
  double bc1 = 1, bc2_sqrt = 1;  // 1 - beta1^t, sqrt(1 - beta2^t) (host values)
  bool maximize = false;
  // Device values (capturable / tensor-lr steps): bc[0], bc[1] replace bc1, bc2_sqrt; ema_w the
  // EMA weights (pass 2).  nullptr: the host values.
  const float* bc = nullptr;
  const float* cap_ema_w = nullptr;
  bool capturable = false;
  const float* grad_scale = nullptr;  // pass 1
  const float* found_inf = nullptr;
  SrArgs sr;  // pass 2
};

EK_HD double* lamb_sums_row(const TensorPtrs& t) { return reinterpret_cast<double*>(t.s2); }

// CPU twin (fused_cpu.cpp): OpenMP over cache-sized chunks.
void adam_ema_cpu(const std::vector<TensorPtrs>& t, DType dtype, const AdamArgs& a);
void sgd_ema_cpu(const std::vector<TensorPtrs>& t, DType dtype, const SgdArgs& a);
void ema_only_cpu(const std::vector<TensorPtrs>& t, DType dtype, const double* ema_w,
                  int n_emas);
const char* cpu_isa();  // which instruction-set variant of the CPU kernels runs here
void lion_ema_cpu(const std::vector<TensorPtrs>& t, DType dtype, const LionArgs& a);
void lars_ema_cpu(const std::vector<TensorPtrs>& t, DType dtype, const LarsArgs& a);
void lamb_moments_cpu(const std::vector<TensorPtrs>& t, DType dtype, const LambArgs& a);
void lamb_ema_cpu(const std::vector<TensorPtrs>& t, DType dtype, const LambArgs& a);

#if defined(EK_WITH_CUDA) || defined(EK_CUDA_EMULATION)
// CUDA (fused_cuda.cu).  `stream` is a cudaStream_t.  Return nullptr on success, else the CUDA
// error string of the failed launch.  In the emulation build (EK_CUDA_EMULATION, the library
// ema_kernels._C_emu) the same kernels run on the host, on CPU tensors (cuda_emu.h).
const char* adam_ema_cuda(const std::vector<TensorPtrs>& t, DType dtype, const AdamArgs& a,
                          int device, void* stream);
const char* sgd_ema_cuda(const std::vector<TensorPtrs>& t, DType dtype, const SgdArgs& a,
                         int device, void* stream);
const char* ema_only_cuda(const std::vector<TensorPtrs>& t, DType dtype, const double* ema_w,
                          int n_emas, int device, void* stream);
const char* lion_ema_cuda(const std::vector<TensorPtrs>& t, DType dtype, const LionArgs& a,
                          int device, void* stream);
const char* lars_ema_cuda(const std::vector<TensorPtrs>& t, DType dtype, const LarsArgs& a,
                          int device, void* stream);
const char* lamb_moments_cuda(const std::vector<TensorPtrs>& t, DType dtype, const LambArgs& a,
                              int device, void* stream);
const char* lamb_ema_cuda(const std::vector<TensorPtrs>& t, DType dtype, const LambArgs& a,
                          int device, void* stream);

// The list kernels' work table in device memory.  fused_cuda.cu describes the table of a list
// launch (the per-tensor entries, compared byte for byte, and the chunk map that follows from
// them); the provider -- csrc/list_tables.cpp, on the torch side, which owns the memory
// (torch's caching allocators) -- answers with a device copy, uploading only when the entries
// differ from its cached copy under the same key.  Registered by list_tables.cpp's static
// initialiser; fused_cuda.cu never sees a torch header.
struct ListTableRequest {
  int device = 0;
  void* stream = nullptr;          // the launch's cudaStream_t (an upload is ordered on it)
  // the key of the cached copy: the kernel instantiation (the op variant), the set (its first
  // tensor's parameter address and its tensor count) and the chunk size the map counts in
  const void* variant = nullptr;
  const void* set = nullptr;
  int64_t chunk = 0;
  const void* head = nullptr;      // the per-tensor entries (TensorPtrs[]): compared, uploaded
  size_t head_bytes = 0;
  size_t tail_bytes = 0;           // the chunk map after them: written by fill_tail on an
  void (*fill_tail)(void* dst, const void* ctx) = nullptr;  // upload only (a function of head)
  const void* ctx = nullptr;
};

struct ListTableAnswer {
  const void* table = nullptr;  // device address of head, then tail
  std::shared_ptr<const void> keep;  // the buffer, held by the caller until it has launched
  bool uploaded = false;        // this request copied the table to the device
  const char* error = nullptr;  // a static message; nullptr on success
};

using ListTableProvider = ListTableAnswer (*)(const ListTableRequest&);
void set_list_table_provider(ListTableProvider provider);
#endif

#ifdef EK_WITH_CUDA
const char* cuda_arch_list();  // __CUDA_ARCH_LIST__ of the device code in this build
int cuda_compiled_version();   // CUDART_VERSION the kernels were compiled against
#endif

#ifdef EK_CUDA_EMULATION
// Emulation-only handles on the launch logic, for the tests (fused_cuda.cu).
struct EmuConfig {    // 0 everywhere: the shipped values
  int64_t chunk = 0;  // elements per chunk of the list kernels' work table (65536)
  int sm_count = 0;   // the emulated device's SMs (cuda_emu.h: 132)
  int blocks_per_sm = 0;  // resident blocks per SM, instead of the occupancy API's answer
  int64_t grid_cap = 0;  // flat-kernel grid cap below the occupancy cap (0: none)
  uint64_t shuffle_seed = 0;  // 0: blocks and threads in order; else a random order per launch
};
const char* emu_configure(const EmuConfig& c);  // nullptr, or what is wrong with c

struct EmuStats {
  int64_t launches = 0, blocks = 0, occupancy_queries = 0;
  // the kernels' global-memory traffic (cuda_emu.h's ek_emu::Stats)
  int64_t bytes_read = 0, bytes_written = 0, bytes_vector = 0, arg_reads = 0;
  int64_t table_uploads = 0;  // list launches that copied their work table to the "device"

  int64_t atomics = 0;  // atomicAdd calls (LAMB's per-tensor sums)
};
EmuStats emu_stats();

// One thread (block, thread) of a flat launch of `grid` blocks over n elements of elem_bytes
// (4: fp32, 2: bf16/fp16), walked as the kernels walk it, without memory: out = {tid, stride,
// vectors, first vector offset, last, scalar elements, first element, last, bad offsets}.
const char* emu_flat_walk(int64_t n, int elem_bytes, bool aligned, int64_t grid, int64_t block,
                          int64_t thread, int64_t out[9]);
int64_t emu_flat_grid(int64_t n, int elem_bytes);  // the grid a flat launch over n would get
// The list launch for tensors of these sizes (no memory): its grid and chunk count, then per
// chunk, in the order the blocks walk them, (block, tensor index, lo, hi) as the kernel's
// chunk loop and span_of compute them (the table built as for a launch, kept on the host).
const char* emu_list_plan(const std::vector<int64_t>& sizes, std::vector<int64_t>* plan);
#endif

}  // namespace ek
