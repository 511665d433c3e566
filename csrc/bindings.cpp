// bindings.cpp -- torch.library registrations of the fused optimizer + EMA ops.
//
// Namespace `ema_kernels_ext` (torch.ops.ema_kernels_ext.*).  Every op mutates tensor lists in
// place and returns nothing.  adam_ema_ / sgd_ema_ take stochastic rounding's flag, seed, step
// and per-tensor element-index bases (`sr_offsets`; see sr_prepare); off by default, and then
// the ops are bit for bit what they were.
// `emas` holds the lists of up to kMaxEmas EMAs concatenated
// (EMA-major), with one weight each (`ema_weights`, or the capturable ops' `ema_weight` tensor
// with one element per EMA): all of them are updated in the same pass; the schemas declare each mutated list (`Tensor(a!)[]`) so that
// functionalization / torch.compile see the writes.  Fake (meta) implementations are registered
// from Python (ema_kernels/backends/cuda.py, torch.library.register_fake).
//
// This file validates the tensors (messages name the tensor and the problem) and hands raw
// pointers to the kernels: fused_cpu.cpp for CPU tensors, fused_cuda.cu for CUDA tensors.  The
// .cu file never sees a torch header.
//
// Compiled twice: into ema_kernels._C (above), and with EK_CUDA_EMULATION into
// ema_kernels._C_emu, the emulation build: namespace `ema_kernels_emu`, the same schemas and
// checks, whose CPU kernel is fused_cuda.cu compiled for the host (cuda_emu.h) -- the CUDA
// kernels' launch logic on CPU tensors -- plus a few emulation-only ops for the tests.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#if defined(EK_WITH_CUDA) && defined(EK_CUDA_EMULATION)
#error "EK_WITH_CUDA and EK_CUDA_EMULATION are two different builds"
#endif

#ifdef EK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "kernels.h"

#ifndef EK_CUDA_ARCHS
#define EK_CUDA_ARCHS ""
#endif

// The CUDA kernels' entry points exist: compiled by nvcc, or emulated on the host.
#if defined(EK_WITH_CUDA) || defined(EK_CUDA_EMULATION)
#define EK_CUDA_KERNELS 1
#endif

// The ops' namespace (torch.ops.<ns>): the emulation build registers its own, so that both
// libraries can be loaded in one process.
#ifdef EK_CUDA_EMULATION
#define EK_OPS_NS ema_kernels_emu
#else
#define EK_OPS_NS ema_kernels_ext
#endif

namespace ek {
namespace {

using at::Tensor;
using TList = std::vector<Tensor>;  // the boxed form of Tensor[] arguments

const char* dtype_name(c10::ScalarType t) { return c10::toString(t); }

// Validation of one op call.  `op` prefixes every message.
struct Checker {
  const char* op;
  c10::Device device = c10::Device(c10::kCPU);
  c10::ScalarType pdtype = c10::ScalarType::Float;

  // params decide the device and dtype of the call.
  void params(const at::TensorList ps) {
    if (ps.empty()) return;
    device = ps[0].device();
    pdtype = ps[0].scalar_type();
    if (pdtype == c10::ScalarType::Double) {
      TORCH_CHECK_TYPE(false, op, ": params[0] is float64; the fused kernels (backends 'cpp' and "
                       "'cuda') take float32, bfloat16 or float16 parameters -- use "
                       "backend='reference' for float64");
    }
    TORCH_CHECK_TYPE(pdtype == c10::ScalarType::Float || pdtype == c10::ScalarType::BFloat16 ||
                         pdtype == c10::ScalarType::Half,
                     op, ": params[0] has dtype ", dtype_name(pdtype),
                     "; the fused kernels take float32, bfloat16 or float16 parameters");
    for (size_t i = 0; i < ps.size(); ++i) {
      TORCH_CHECK_TYPE(ps[i].scalar_type() == pdtype, op, ": params[", i, "] has dtype ",
                       dtype_name(ps[i].scalar_type()), " but params[0] has ",
                       dtype_name(pdtype), "; one call takes one parameter dtype");
      one(ps[i], "params", i, pdtype, ps[i].numel());
    }
  }

  // pi: the index of the tensor's parameter when it is not i (EMA lists after the first).
  void one(const Tensor& t, const char* name, size_t i, c10::ScalarType want, int64_t numel,
           int64_t pi = -1) {
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
                " but params[0] is on ", device, "; all tensors of a call share one device");
    TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, "[", i, "] has dtype ",
                     dtype_name(t.scalar_type()), ", expected ", dtype_name(want));
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i,
                "] is not contiguous; the fused kernels walk contiguous memory");
    TORCH_CHECK(t.numel() == numel, op, ": ", name, "[", i, "] has ", t.numel(),
                " elements but params[", pi < 0 ? int64_t(i) : pi, "] has ", numel);
  }

  // A list aligned with params: same length, per-tensor dtype `want` (or the params' dtype).
  void list(const at::TensorList ts, const at::TensorList ps, const char* name,
            bool same_dtype_as_params) {
    TORCH_CHECK(ts.size() == ps.size(), op, ": ", name, " has ", ts.size(),
                " tensors but params has ", ps.size());
    for (size_t i = 0; i < ts.size(); ++i)
      one(ts[i], name, i, same_dtype_as_params ? pdtype : c10::ScalarType::Float, ps[i].numel());
  }

  // `emas` holds n_emas lists aligned with params, concatenated EMA-major (EMA k of params[i]
  // is emas[k * len(params) + i]): float32 tensors of their parameters' sizes.
  void ema_lists(const at::TensorList emas, const at::TensorList ps, int64_t n_emas) {
    TORCH_CHECK(n_emas >= 0 && n_emas <= kMaxEmas, op, ": ", n_emas, " EMAs, but the fused "
                "kernels update at most ", kMaxEmas, " EMAs per pass (a compile-time bound); "
                "track at most ", kMaxEmas, " EMAs per param group");
    TORCH_CHECK(emas.size() == size_t(n_emas) * ps.size(), op, ": emas has ", emas.size(),
                " tensors but ", n_emas, " EMA(s) of ", ps.size(), " params need ",
                size_t(n_emas) * ps.size(), " (the EMA lists concatenated, EMA-major)");
    for (size_t i = 0; i < emas.size(); ++i)
      one(emas[i], "emas", i, c10::ScalarType::Float, ps[i % ps.size()].numel(),
          int64_t(i % ps.size()));
  }

  // The capturable EMA weights: float32, one element per EMA, on the params' device.
  const float* weights(const c10::optional<Tensor>& t, int64_t n_emas) {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->device() == device, op, ": ema_weight is on ", t->device(),
                " but the parameters are on ", device);
    TORCH_CHECK_TYPE(t->scalar_type() == c10::ScalarType::Float, op,
                     ": ema_weight must be a float32 tensor, got ", dtype_name(t->scalar_type()));
    TORCH_CHECK(t->numel() == n_emas && t->is_contiguous(), op, ": ema_weight must be a "
                "contiguous tensor with one element per EMA (", n_emas, "), got ", t->numel(),
                " elements");
    return t->const_data_ptr<float>();
  }

  // grad_scale / found_inf / capturable scalars: one float32 element on the params' device.
  const float* scalar(const c10::optional<Tensor>& t, const char* name) {
    if (!t.has_value() || !t->defined()) return nullptr;
    return scalar(*t, name);
  }
  const float* scalar(const Tensor& t, const char* name) {
    TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(),
                " but the parameters are on ", device);
    TORCH_CHECK_TYPE(t.scalar_type() == c10::ScalarType::Float, op, ": ", name,
                     " must be a float32 tensor, got ", dtype_name(t.scalar_type()));
    TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have exactly one element, got ",
                t.numel());
    return t.const_data_ptr<float>();
  }

  DType kernel_dtype() const {
    switch (pdtype) {
      case c10::ScalarType::BFloat16: return DType::kBF16;
      case c10::ScalarType::Half: return DType::kF16;
      default: return DType::kF32;
    }
  }
};

void expect_device(const Checker& c, c10::DeviceType type, const char* which) {
  TORCH_CHECK(c.device.type() == type, c.op, ": the ", which, " implementation got tensors on ",
              c.device);
}

#ifdef EK_CUDA_KERNELS
// Runs launch(device_index, stream) -> error string of fused_cuda.cu's entry points on the
// call's device and current stream; the emulation build runs them on CPU tensors (device 0 of
// the emulated GPU, no stream).
template <class Launch>
void cuda_launch(const Checker& c, Launch&& launch) {
#ifdef EK_CUDA_EMULATION
  expect_device(c, c10::kCPU, "emulated CUDA");
  const char* err = launch(0, nullptr);
#else
  expect_device(c, c10::kCUDA, "CUDA");
  const c10::cuda::CUDAGuard guard(c.device);
  const auto stream = c10::cuda::getCurrentCUDAStream(c.device.index());
  const char* err = launch(c.device.index(), static_cast<void*>(stream.stream()));
#endif
  TORCH_CHECK(err == nullptr, c.op, ": CUDA kernel launch failed: ", err);
}
#endif

// ------------------------------------------------------------------------------------------
// Gathering pointers
// ------------------------------------------------------------------------------------------
// EMA k of params[i] is z[k * n + i] (the lists concatenated EMA-major).
void ema_ptrs(std::vector<TensorPtrs>& ts, const at::TensorList z, int n_emas) {
  const size_t n = ts.size();
  for (int k = 0; k < n_emas; ++k)
    for (size_t i = 0; i < n; ++i) ts[i].z[k] = z[k * n + i].data_ptr<float>();
}

std::vector<TensorPtrs> adam_ptrs(const at::TensorList params, const at::TensorList grads,
                                  const at::TensorList m, const at::TensorList v,
                                  const at::TensorList vmax, const at::TensorList z,
                                  bool amsgrad, int n_emas) {
  std::vector<TensorPtrs> ts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    ts[i].p = params[i].data_ptr();
    ts[i].g = grads[i].const_data_ptr();
    ts[i].s0 = m[i].data_ptr<float>();
    ts[i].s1 = v[i].data_ptr<float>();
    ts[i].s2 = amsgrad ? vmax[i].data_ptr<float>() : nullptr;
    ts[i].n = params[i].numel();
  }
  ema_ptrs(ts, z, n_emas);
  return ts;
}

std::vector<TensorPtrs> sgd_ptrs(const at::TensorList params, const at::TensorList grads,
                                 const at::TensorList bufs, const at::TensorList z,
                                 bool has_buf, int n_emas) {
  std::vector<TensorPtrs> ts(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    ts[i].p = params[i].data_ptr();
    ts[i].g = grads[i].const_data_ptr();
    ts[i].s0 = has_buf ? bufs[i].data_ptr<float>() : nullptr;
    ts[i].n = params[i].numel();
  }
  ema_ptrs(ts, z, n_emas);
  return ts;
}

// ------------------------------------------------------------------------------------------
// Stochastic rounding (issue 15): the call's flag, seed and step, and each tensor's element
// index base (TensorPtrs::sr_base).  Without sr_offsets the tensors are numbered as the flat
// layout of this list would place them (layout.py: cumulative numels rounded up to 16).
// ------------------------------------------------------------------------------------------
constexpr int64_t kSrAlign = 16;  // layout.ALIGN

SrArgs sr_prepare(const Checker& c, std::vector<TensorPtrs>& ts, bool on, int64_t seed,
                  int64_t step, const at::OptionalIntArrayRef& offsets) {
  SrArgs sr;
  if (!on) return sr;
  TORCH_CHECK(seed >= 0, c.op, ": sr_seed=", seed, " must be >= 0 (a 63-bit seed)");
  TORCH_CHECK(step >= 0, c.op, ": sr_step=", step, " must be >= 0 (the step count t)");
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->size() == ts.size(), c.op, ": sr_offsets has ", offsets->size(),
                " entries but params has ", ts.size(), "; give one element-index base per "
                "tensor");
    for (size_t i = 0; i < ts.size(); ++i) {
      TORCH_CHECK((*offsets)[i] >= 0, c.op, ": sr_offsets[", i, "]=", (*offsets)[i],
                  " must be >= 0");
      ts[i].sr_base = (*offsets)[i];
    }
  } else {
    int64_t at = 0;
    for (auto& t : ts) {
      t.sr_base = at;
      at += (t.n + kSrAlign - 1) / kSrAlign * kSrAlign;
    }
  }
  sr.on = c.pdtype != c10::ScalarType::Float;  // fp32 is stored exactly: nothing to round
  sr.seed = uint64_t(seed);
  sr.step = uint64_t(step);
  return sr;
}

// ------------------------------------------------------------------------------------------
// Adam / AdamW
// ------------------------------------------------------------------------------------------
struct AdamCall {
  Checker c;
  AdamArgs a;
  std::vector<TensorPtrs> ts;
};

AdamCall adam_prepare(const char* op, at::TensorList params, at::TensorList grads,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, at::TensorList emas, int64_t n_emas,
                      double beta1, double beta2, double eps, double weight_decay,
                      bool decoupled, bool maximize, const c10::optional<Tensor>& grad_scale,
                      const c10::optional<Tensor>& found_inf) {
  AdamCall call{Checker{op}, AdamArgs(), {}};
  Checker& c = call.c;
  c.params(params);
  c.list(grads, params, "grads", true);
  c.list(exp_avgs, params, "exp_avgs", false);
  c.list(exp_avg_sqs, params, "exp_avg_sqs", false);
  const bool amsgrad = !max_exp_avg_sqs.empty();
  if (amsgrad) c.list(max_exp_avg_sqs, params, "max_exp_avg_sqs", false);
  c.ema_lists(emas, params, n_emas);
  call.a = make_adam_args(beta1, beta2, eps, weight_decay, decoupled, maximize, amsgrad,
                          int(n_emas), c.scalar(grad_scale, "grad_scale"),
                          c.scalar(found_inf, "found_inf"));
  call.ts = adam_ptrs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas, amsgrad,
                      int(n_emas));
  return call;
}

AdamCall adam_prepare_plain(const char* op, at::TensorList params, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList emas, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            bool decoupled, bool maximize, double step_size,
                            double bias_correction2_sqrt, std::vector<double> ema_weights,
                            const c10::optional<Tensor>& grad_scale,
                            const c10::optional<Tensor>& found_inf, bool stochastic_rounding,
                            int64_t sr_seed, int64_t sr_step,
                            at::OptionalIntArrayRef sr_offsets) {
  AdamCall call = adam_prepare(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas,
                               int64_t(ema_weights.size()), beta1, beta2, eps, weight_decay,
                               decoupled, maximize, grad_scale, found_inf);
  call.a.sr = sr_prepare(call.c, call.ts, stochastic_rounding, sr_seed, sr_step, sr_offsets);
  call.a.lr = lr;
  call.a.step_size = step_size;
  call.a.bc2_sqrt = bias_correction2_sqrt;
  set_ema_weights(call.a.ema_w, ema_weights.data(), ema_weights.size());
  return call;
}

AdamCall adam_prepare_capturable(const char* op, at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                 at::TensorList max_exp_avg_sqs, at::TensorList emas,
                                 const Tensor& lr, const Tensor& step, double beta1,
                                 double beta2, double eps, double weight_decay, bool decoupled,
                                 bool maximize, const c10::optional<Tensor>& ema_weight,
                                 const c10::optional<Tensor>& grad_scale,
                                 const c10::optional<Tensor>& found_inf,
                                 bool stochastic_rounding, int64_t sr_seed, int64_t sr_step,
                                 at::OptionalIntArrayRef sr_offsets) {
  const bool has_ema = ema_weight.has_value() && ema_weight->defined();
  const int64_t n_emas = has_ema ? ema_weight->numel() : 0;
  AdamCall call = adam_prepare(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas,
                               n_emas, beta1, beta2, eps, weight_decay, decoupled, maximize,
                               grad_scale, found_inf);
  // The step of stochastic rounding's key is a host value here (sr_step): the device-scalar
  // ops serve a host-counted step with a tensor lr; capturable=True refuses SR in Python.
  call.a.sr = sr_prepare(call.c, call.ts, stochastic_rounding, sr_seed, sr_step, sr_offsets);
  if (params.empty()) return call;
  call.a.capturable = true;
  call.a.cap.lr = call.c.scalar(lr, "lr");
  call.a.cap.step = call.c.scalar(step, "step");
  call.a.cap.ema_w = call.c.weights(ema_weight, n_emas);
  return call;
}

#ifndef EK_CUDA_EMULATION
void adam_cpu_run(AdamCall&& call) {
  if (call.ts.empty()) return;
  expect_device(call.c, c10::kCPU, "CPU");
  adam_ema_cpu(call.ts, call.c.kernel_dtype(), call.a);
}
#endif

#ifdef EK_CUDA_KERNELS
void adam_cuda_run(AdamCall&& call) {
  if (call.ts.empty()) return;
  cuda_launch(call.c, [&](int device, void* stream) {
    return adam_ema_cuda(call.ts, call.c.kernel_dtype(), call.a, device, stream);
  });
}
#endif

#define EK_ADAM_PLAIN_ARGS                                                                    \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,                       \
      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList emas,        \
      double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled, \
      bool maximize, double step_size, double bias_correction2_sqrt,                         \
      std::vector<double> ema_weights, const c10::optional<Tensor>& grad_scale,               \
      const c10::optional<Tensor>& found_inf, bool stochastic_rounding, int64_t sr_seed,      \
      int64_t sr_step, at::OptionalIntArrayRef sr_offsets
#define EK_ADAM_PLAIN_FWD                                                                     \
  params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas, lr, beta1, beta2, eps,         \
      weight_decay, decoupled, maximize, step_size, bias_correction2_sqrt, ema_weights,       \
      grad_scale, found_inf, stochastic_rounding, sr_seed, sr_step, sr_offsets

#define EK_ADAM_CAPT_ARGS                                                                     \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,                       \
      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList emas,        \
      const Tensor& lr, const Tensor& step, double beta1, double beta2, double eps,           \
      double weight_decay, bool decoupled, bool maximize,                                     \
      const c10::optional<Tensor>& ema_weight, const c10::optional<Tensor>& grad_scale,       \
      const c10::optional<Tensor>& found_inf, bool stochastic_rounding, int64_t sr_seed,      \
      int64_t sr_step, at::OptionalIntArrayRef sr_offsets
#define EK_ADAM_CAPT_FWD                                                                      \
  params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, emas, lr, step, beta1, beta2, eps,   \
      weight_decay, decoupled, maximize, ema_weight, grad_scale, found_inf,                   \
      stochastic_rounding, sr_seed, sr_step, sr_offsets

#ifndef EK_CUDA_EMULATION
void adam_ema_cpu_impl(EK_ADAM_PLAIN_ARGS) {
  adam_cpu_run(adam_prepare_plain("adam_ema_", EK_ADAM_PLAIN_FWD));
}
void adam_ema_capturable_cpu_impl(EK_ADAM_CAPT_ARGS) {
  adam_cpu_run(adam_prepare_capturable("adam_ema_capturable_", EK_ADAM_CAPT_FWD));
}
#endif
#ifdef EK_CUDA_KERNELS
void adam_ema_cuda_impl(EK_ADAM_PLAIN_ARGS) {
  adam_cuda_run(adam_prepare_plain("adam_ema_", EK_ADAM_PLAIN_FWD));
}
void adam_ema_capturable_cuda_impl(EK_ADAM_CAPT_ARGS) {
  adam_cuda_run(adam_prepare_capturable("adam_ema_capturable_", EK_ADAM_CAPT_FWD));
}
#endif

// ------------------------------------------------------------------------------------------
// SGD
// ------------------------------------------------------------------------------------------
struct SgdCall {
  Checker c;
  SgdArgs a;
  std::vector<TensorPtrs> ts;
};

SgdCall sgd_prepare(const char* op, at::TensorList params, at::TensorList grads,
                    at::TensorList momentum_buffers, at::TensorList emas, int64_t n_emas,
                    double momentum, double dampening, double weight_decay, bool nesterov,
                    bool maximize, bool first_step, const c10::optional<Tensor>& grad_scale,
                    const c10::optional<Tensor>& found_inf) {
  SgdCall call{Checker{op}, SgdArgs(), {}};
  Checker& c = call.c;
  c.params(params);
  c.list(grads, params, "grads", true);
  const bool has_buf = momentum != 0.0;
  if (has_buf) c.list(momentum_buffers, params, "momentum_buffers", false);
  c.ema_lists(emas, params, n_emas);
  call.a = make_sgd_args(momentum, dampening, weight_decay, nesterov, maximize, first_step,
                         int(n_emas), c.scalar(grad_scale, "grad_scale"),
                         c.scalar(found_inf, "found_inf"));
  call.ts = sgd_ptrs(params, grads, momentum_buffers, emas, has_buf, int(n_emas));
  return call;
}

#ifndef EK_CUDA_EMULATION
void sgd_cpu_run(SgdCall&& call) {
  if (call.ts.empty()) return;
  expect_device(call.c, c10::kCPU, "CPU");
  sgd_ema_cpu(call.ts, call.c.kernel_dtype(), call.a);
}
#endif

#ifdef EK_CUDA_KERNELS
void sgd_cuda_run(SgdCall&& call) {
  if (call.ts.empty()) return;
  cuda_launch(call.c, [&](int device, void* stream) {
    return sgd_ema_cuda(call.ts, call.c.kernel_dtype(), call.a, device, stream);
  });
}
#endif

#define EK_SGD_PLAIN_ARGS                                                                     \
  at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,               \
      at::TensorList emas, double lr, double momentum, double dampening, double weight_decay, \
      bool nesterov, bool maximize, bool first_step, std::vector<double> ema_weights,         \
      const c10::optional<Tensor>& grad_scale, const c10::optional<Tensor>& found_inf,       \
      bool stochastic_rounding, int64_t sr_seed, int64_t sr_step,                             \
      at::OptionalIntArrayRef sr_offsets

SgdCall sgd_prepare_plain(const char* op, EK_SGD_PLAIN_ARGS) {
  SgdCall call = sgd_prepare(op, params, grads, momentum_buffers, emas,
                             int64_t(ema_weights.size()), momentum, dampening, weight_decay,
                             nesterov, maximize, first_step, grad_scale, found_inf);
  call.a.sr = sr_prepare(call.c, call.ts, stochastic_rounding, sr_seed, sr_step, sr_offsets);
  call.a.lr = lr;
  set_ema_weights(call.a.ema_w, ema_weights.data(), ema_weights.size());
  return call;
}

#define EK_SGD_CAPT_ARGS                                                                      \
  at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,               \
      at::TensorList emas, const Tensor& lr, double momentum, double dampening,               \
      double weight_decay, bool nesterov, bool maximize, bool first_step,                     \
      const c10::optional<Tensor>& ema_weight, const c10::optional<Tensor>& grad_scale,       \
      const c10::optional<Tensor>& found_inf, bool stochastic_rounding, int64_t sr_seed,      \
      int64_t sr_step, at::OptionalIntArrayRef sr_offsets

SgdCall sgd_prepare_capturable(const char* op, EK_SGD_CAPT_ARGS) {
  const bool has_ema = ema_weight.has_value() && ema_weight->defined();
  const int64_t n_emas = has_ema ? ema_weight->numel() : 0;
  SgdCall call = sgd_prepare(op, params, grads, momentum_buffers, emas, n_emas, momentum,
                             dampening, weight_decay, nesterov, maximize, first_step, grad_scale,
                             found_inf);
  call.a.sr = sr_prepare(call.c, call.ts, stochastic_rounding, sr_seed, sr_step, sr_offsets);
  if (params.empty()) return call;
  call.a.capturable = true;
  call.a.cap.lr = call.c.scalar(lr, "lr");
  call.a.cap.ema_w = call.c.weights(ema_weight, n_emas);
  return call;
}

#define EK_SGD_PLAIN_FWD                                                                      \
  params, grads, momentum_buffers, emas, lr, momentum, dampening, weight_decay, nesterov,     \
      maximize, first_step, ema_weights, grad_scale, found_inf, stochastic_rounding, sr_seed, \
      sr_step, sr_offsets
#define EK_SGD_CAPT_FWD                                                                       \
  params, grads, momentum_buffers, emas, lr, momentum, dampening, weight_decay, nesterov,     \
      maximize, first_step, ema_weight, grad_scale, found_inf, stochastic_rounding, sr_seed,  \
      sr_step, sr_offsets

#ifndef EK_CUDA_EMULATION
void sgd_ema_cpu_impl(EK_SGD_PLAIN_ARGS) {
  sgd_cpu_run(sgd_prepare_plain("sgd_ema_", EK_SGD_PLAIN_FWD));
}
void sgd_ema_capturable_cpu_impl(EK_SGD_CAPT_ARGS) {
  sgd_cpu_run(sgd_prepare_capturable("sgd_ema_capturable_", EK_SGD_CAPT_FWD));
}
#endif
#ifdef EK_CUDA_KERNELS
void sgd_ema_cuda_impl(EK_SGD_PLAIN_ARGS) {
  sgd_cuda_run(sgd_prepare_plain("sgd_ema_", EK_SGD_PLAIN_FWD));
}
void sgd_ema_capturable_cuda_impl(EK_SGD_CAPT_ARGS) {
  sgd_cuda_run(sgd_prepare_capturable("sgd_ema_capturable_", EK_SGD_CAPT_FWD));
}
#endif

// ------------------------------------------------------------------------------------------
// Lion (issue 25): lion_ema_ / lion_ema_capturable_ (exp_avgs: s0 of the pointer table)
// ------------------------------------------------------------------------------------------
struct LionCall {
  Checker c;
  LionArgs a;
  std::vector<TensorPtrs> ts;
};

LionCall lion_prepare(const char* op, at::TensorList params, at::TensorList grads,
                      at::TensorList exp_avgs, at::TensorList emas, int64_t n_emas, double beta1,
                      double beta2, double weight_decay, bool maximize,
                      const c10::optional<Tensor>& grad_scale,
                      const c10::optional<Tensor>& found_inf) {
  LionCall call{Checker{op}, LionArgs(), {}};
  Checker& c = call.c;
  c.params(params);
  c.list(grads, params, "grads", true);
  c.list(exp_avgs, params, "exp_avgs", false);
  c.ema_lists(emas, params, n_emas);
  call.a.beta1 = beta1;
  call.a.beta2 = beta2;
  call.a.weight_decay = weight_decay;
  call.a.maximize = maximize;
  call.a.n_emas = int(n_emas);
  call.a.grad_scale = c.scalar(grad_scale, "grad_scale");
  call.a.found_inf = c.scalar(found_inf, "found_inf");
  // the same pointer table as SGD's, with exp_avg where SGD has its momentum buffer
  call.ts = sgd_ptrs(params, grads, exp_avgs, emas, true, int(n_emas));
  return call;
}

#define EK_LION_PLAIN_ARGS                                                                    \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList emas,  \
      double lr, double beta1, double beta2, double weight_decay, bool maximize,              \
      std::vector<double> ema_weights, const c10::optional<Tensor>& grad_scale,               \
      const c10::optional<Tensor>& found_inf, bool stochastic_rounding, int64_t sr_seed,      \
      int64_t sr_step, at::OptionalIntArrayRef sr_offsets
#define EK_LION_PLAIN_FWD                                                                     \
  params, grads, exp_avgs, emas, lr, beta1, beta2, weight_decay, maximize, ema_weights,       \
      grad_scale, found_inf, stochastic_rounding, sr_seed, sr_step, sr_offsets
#define EK_LION_CAPT_ARGS                                                                     \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList emas,  \
      const Tensor& lr, double beta1, double beta2, double weight_decay, bool maximize,       \
      const c10::optional<Tensor>& ema_weight, const c10::optional<Tensor>& grad_scale,       \
      const c10::optional<Tensor>& found_inf, bool stochastic_rounding, int64_t sr_seed,      \
      int64_t sr_step, at::OptionalIntArrayRef sr_offsets
#define EK_LION_CAPT_FWD                                                                      \
  params, grads, exp_avgs, emas, lr, beta1, beta2, weight_decay, maximize, ema_weight,        \
      grad_scale, found_inf, stochastic_rounding, sr_seed, sr_step, sr_offsets

LionCall lion_prepare_plain(const char* op, EK_LION_PLAIN_ARGS) {
  LionCall call = lion_prepare(op, params, grads, exp_avgs, emas, int64_t(ema_weights.size()),
                               beta1, beta2, weight_decay, maximize, grad_scale, found_inf);
  call.a.sr = sr_prepare(call.c, call.ts, stochastic_rounding, sr_seed, sr_step, sr_offsets);
  call.a.lr = lr;
  set_ema_weights(call.a.ema_w, ema_weights.data(), ema_weights.size());
  return call;
}

LionCall lion_prepare_capturable(const char* op, EK_LION_CAPT_ARGS) {
  const bool has_ema = ema_weight.has_value() && ema_weight->defined();
  const int64_t n_emas = has_ema ? ema_weight->numel() : 0;
  LionCall call = lion_prepare(op, params, grads, exp_avgs, emas, n_emas, beta1, beta2,
                               weight_decay, maximize, grad_scale, found_inf);
  call.a.sr = sr_prepare(call.c, call.ts, stochastic_rounding, sr_seed, sr_step, sr_offsets);
  if (params.empty()) return call;
  call.a.capturable = true;
  call.a.cap.lr = call.c.scalar(lr, "lr");
  call.a.cap.ema_w = call.c.weights(ema_weight, n_emas);
  return call;
}

#ifndef EK_CUDA_EMULATION
void lion_cpu_run(LionCall&& call) {
  if (call.ts.empty()) return;
  expect_device(call.c, c10::kCPU, "CPU");
  lion_ema_cpu(call.ts, call.c.kernel_dtype(), call.a);
}
void lion_ema_cpu_impl(EK_LION_PLAIN_ARGS) {
  lion_cpu_run(lion_prepare_plain("lion_ema_", EK_LION_PLAIN_FWD));
}
void lion_ema_capturable_cpu_impl(EK_LION_CAPT_ARGS) {
  lion_cpu_run(lion_prepare_capturable("lion_ema_capturable_", EK_LION_CAPT_FWD));
}
#endif
#ifdef EK_CUDA_KERNELS
void lion_cuda_run(LionCall&& call) {
  if (call.ts.empty()) return;
  cuda_launch(call.c, [&](int device, void* stream) {
    return lion_ema_cuda(call.ts, call.c.kernel_dtype(), call.a, device, stream);
  });
}
void lion_ema_cuda_impl(EK_LION_PLAIN_ARGS) {
  lion_cuda_run(lion_prepare_plain("lion_ema_", EK_LION_PLAIN_FWD));
}
void lion_ema_capturable_cuda_impl(EK_LION_CAPT_ARGS) {
  lion_cuda_run(lion_prepare_capturable("lion_ema_capturable_", EK_LION_CAPT_FWD));
}
#endif

// ------------------------------------------------------------------------------------------
// LARS and LAMB (issue 25).  One op per pass; the per-step values are host numbers, or device
// tensors where given (lr_tensor / bias_corrections / ema_weight: the capturable and tensor-lr
// steps, read by the kernels).  The per-tensor vectors (LARS' coefs, LAMB's sums accumulator and
// step sizes) reach the kernels as one pointer per tensor in the pointer table (kernels.h).
// ------------------------------------------------------------------------------------------
// A per-tensor vector: `per` elements of `want` per parameter, contiguous, on the call's device.
const void* per_tensor(const Checker& c, const Tensor& t, const char* name, size_t n, int64_t per,
                       c10::ScalarType want) {
  TORCH_CHECK(t.device() == c.device, c.op, ": ", name, " is on ", t.device(),
              " but the parameters are on ", c.device);
  TORCH_CHECK_TYPE(t.scalar_type() == want, c.op, ": ", name, " must be ", dtype_name(want),
                   ", got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.is_contiguous() && t.numel() == int64_t(n) * per, c.op, ": ", name,
              " must be a contiguous tensor of ", per, " element(s) per parameter (",
              int64_t(n) * per, "), got ", t.numel(), " elements");
  return t.const_data_ptr();
}

// The EMA count and weights of a call: host numbers, or the device tensor `ema_weight`.
int64_t emas_of(const Checker& c, const std::vector<double>& ema_weights,
                const c10::optional<Tensor>& ema_weight) {
  const bool dev = ema_weight.has_value() && ema_weight->defined();
  TORCH_CHECK(!(dev && !ema_weights.empty()), c.op, ": give ema_weights (numbers) or ema_weight "
              "(a device tensor), not both");
  return dev ? ema_weight->numel() : int64_t(ema_weights.size());
}

struct LarsCall {
  Checker c;
  LarsArgs a;
  std::vector<TensorPtrs> ts;
};

#define EK_LARS_ARGS                                                                          \
  at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,               \
      at::TensorList emas, const Tensor& coefs, double lr, double momentum, double dampening, \
      bool nesterov, bool maximize, bool first_step, std::vector<double> ema_weights,         \
      const c10::optional<Tensor>& lr_tensor, const c10::optional<Tensor>& ema_weight,        \
      const c10::optional<Tensor>& grad_scale, const c10::optional<Tensor>& found_inf,       \
      bool stochastic_rounding, int64_t sr_seed, int64_t sr_step,                             \
      at::OptionalIntArrayRef sr_offsets

LarsCall lars_prepare(EK_LARS_ARGS) {
  LarsCall call{Checker{"lars_ema_"}, LarsArgs(), {}};
  Checker& c = call.c;
  c.params(params);
  c.list(grads, params, "grads", true);
  const bool has_buf = momentum != 0.0;
  if (has_buf) c.list(momentum_buffers, params, "momentum_buffers", false);
  const int64_t n_emas = emas_of(c, ema_weights, ema_weight);
  c.ema_lists(emas, params, n_emas);
  LarsArgs& a = call.a;
  a.lr = lr;
  a.n_emas = int(n_emas);
  set_ema_weights(a.ema_w, ema_weights.data(), ema_weights.size());
  a.momentum = momentum;
  a.dampening = dampening;
  a.nesterov = nesterov;
  a.maximize = maximize;
  a.first_step = first_step;
  a.grad_scale = c.scalar(grad_scale, "grad_scale");
  a.found_inf = c.scalar(found_inf, "found_inf");
  call.ts = sgd_ptrs(params, grads, momentum_buffers, emas, has_buf, int(n_emas));
  if (params.empty()) return call;
  const float* rows = static_cast<const float*>(
      per_tensor(c, coefs, "coefs", params.size(), 2, c10::ScalarType::Float));
  for (size_t i = 0; i < call.ts.size(); ++i) call.ts[i].s1 = const_cast<float*>(rows + 2 * i);
  a.sr = sr_prepare(c, call.ts, stochastic_rounding, sr_seed, sr_step, sr_offsets);
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    a.capturable = true;
    a.cap.lr = c.scalar(*lr_tensor, "lr_tensor");
    a.cap.ema_w = c.weights(ema_weight, n_emas);
  } else {
    TORCH_CHECK(!(ema_weight.has_value() && ema_weight->defined()), c.op, ": a device "
                "ema_weight goes with a device lr (lr_tensor)");
  }
  return call;
}

struct LambCall {
  Checker c;
  LambArgs a;
  std::vector<TensorPtrs> ts;
};

// The parts of both LAMB passes' arguments that are the same.
void lamb_common(LambCall& call, at::TensorList params, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs, double eps, double weight_decay, double bc1,
                 double bc2_sqrt, const c10::optional<Tensor>& bias_corrections,
                 const c10::optional<Tensor>& found_inf) {
  Checker& c = call.c;
  c.list(exp_avgs, params, "exp_avgs", false);
  c.list(exp_avg_sqs, params, "exp_avg_sqs", false);
  LambArgs& a = call.a;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.bc1 = bc1;
  a.bc2_sqrt = bc2_sqrt;
  a.found_inf = c.scalar(found_inf, "found_inf");
  if (bias_corrections.has_value() && bias_corrections->defined() && !params.empty())
    a.bc = static_cast<const float*>(per_tensor(c, *bias_corrections, "bias_corrections", 1, 2,
                                                c10::ScalarType::Float));
}

#define EK_LAMB_MOMENTS_ARGS                                                                  \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,                       \
      at::TensorList exp_avg_sqs, const Tensor& sums, double beta1, double beta2, double eps, \
      double weight_decay, bool maximize, double bias_correction1,                            \
      double bias_correction2_sqrt, const c10::optional<Tensor>& bias_corrections,            \
      const c10::optional<Tensor>& grad_scale, const c10::optional<Tensor>& found_inf

LambCall lamb_moments_prepare(EK_LAMB_MOMENTS_ARGS) {
  LambCall call{Checker{"lamb_moments_"}, LambArgs(), {}};
  Checker& c = call.c;
  c.params(params);
  c.list(grads, params, "grads", true);
  lamb_common(call, params, exp_avgs, exp_avg_sqs, eps, weight_decay, bias_correction1,
              bias_correction2_sqrt, bias_corrections, found_inf);
  LambArgs& a = call.a;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.maximize = maximize;
  a.grad_scale = c.scalar(grad_scale, "grad_scale");
  const at::TensorList none;
  call.ts = adam_ptrs(params, grads, exp_avgs, exp_avg_sqs, none, none, false, 0);
  if (params.empty()) return call;
  double* rows = static_cast<double*>(const_cast<void*>(
      per_tensor(c, sums, "sums", params.size(), 2, c10::ScalarType::Double)));
  for (size_t i = 0; i < call.ts.size(); ++i)
    call.ts[i].s2 = reinterpret_cast<float*>(rows + 2 * i);  // kernels.h lamb_sums_row
  return call;
}

#define EK_LAMB_EMA_ARGS                                                                      \
  at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,                 \
      at::TensorList emas, const Tensor& step_sizes, double eps, double weight_decay,         \
      double bias_correction1, double bias_correction2_sqrt, std::vector<double> ema_weights, \
      const c10::optional<Tensor>& bias_corrections, const c10::optional<Tensor>& ema_weight, \
      const c10::optional<Tensor>& found_inf, bool stochastic_rounding, int64_t sr_seed,      \
      int64_t sr_step, at::OptionalIntArrayRef sr_offsets

LambCall lamb_ema_prepare(EK_LAMB_EMA_ARGS) {
  LambCall call{Checker{"lamb_ema_"}, LambArgs(), {}};
  Checker& c = call.c;
  c.params(params);
  lamb_common(call, params, exp_avgs, exp_avg_sqs, eps, weight_decay, bias_correction1,
              bias_correction2_sqrt, bias_corrections, found_inf);
  const int64_t n_emas = emas_of(c, ema_weights, ema_weight);
  c.ema_lists(emas, params, n_emas);
  LambArgs& a = call.a;
  a.n_emas = int(n_emas);
  set_ema_weights(a.ema_w, ema_weights.data(), ema_weights.size());
  // params stand in for the gradients (not read by pass 2)
  call.ts = adam_ptrs(params, params, exp_avgs, exp_avg_sqs, at::TensorList(), emas, false,
                      int(n_emas));
  if (params.empty()) return call;
  const float* steps = static_cast<const float*>(
      per_tensor(c, step_sizes, "step_sizes", params.size(), 1, c10::ScalarType::Float));
  for (size_t i = 0; i < call.ts.size(); ++i) {
    call.ts[i].g = nullptr;
    call.ts[i].s2 = const_cast<float*>(steps + i);
  }
  a.cap_ema_w = c.weights(ema_weight, n_emas);
  a.sr = sr_prepare(c, call.ts, stochastic_rounding, sr_seed, sr_step, sr_offsets);
  return call;
}

#define EK_LARS_FWD                                                                           \
  params, grads, momentum_buffers, emas, coefs, lr, momentum, dampening, nesterov, maximize,  \
      first_step, ema_weights, lr_tensor, ema_weight, grad_scale, found_inf,                  \
      stochastic_rounding, sr_seed, sr_step, sr_offsets
#define EK_LAMB_MOMENTS_FWD                                                                   \
  params, grads, exp_avgs, exp_avg_sqs, sums, beta1, beta2, eps, weight_decay, maximize,      \
      bias_correction1, bias_correction2_sqrt, bias_corrections, grad_scale, found_inf
#define EK_LAMB_EMA_FWD                                                                       \
  params, exp_avgs, exp_avg_sqs, emas, step_sizes, eps, weight_decay, bias_correction1,       \
      bias_correction2_sqrt, ema_weights, bias_corrections, ema_weight, found_inf,            \
      stochastic_rounding, sr_seed, sr_step, sr_offsets

#ifndef EK_CUDA_EMULATION
void lars_ema_cpu_impl(EK_LARS_ARGS) {
  LarsCall call = lars_prepare(EK_LARS_FWD);
  if (call.ts.empty()) return;
  expect_device(call.c, c10::kCPU, "CPU");
  lars_ema_cpu(call.ts, call.c.kernel_dtype(), call.a);
}
void lamb_moments_cpu_impl(EK_LAMB_MOMENTS_ARGS) {
  LambCall call = lamb_moments_prepare(EK_LAMB_MOMENTS_FWD);
  if (call.ts.empty()) return;
  expect_device(call.c, c10::kCPU, "CPU");
  lamb_moments_cpu(call.ts, call.c.kernel_dtype(), call.a);
}
void lamb_ema_cpu_impl(EK_LAMB_EMA_ARGS) {
  LambCall call = lamb_ema_prepare(EK_LAMB_EMA_FWD);
  if (call.ts.empty()) return;
  expect_device(call.c, c10::kCPU, "CPU");
  lamb_ema_cpu(call.ts, call.c.kernel_dtype(), call.a);
}
#endif
#ifdef EK_CUDA_KERNELS
void lars_ema_cuda_impl(EK_LARS_ARGS) {
  LarsCall call = lars_prepare(EK_LARS_FWD);
  if (call.ts.empty()) return;
  cuda_launch(call.c, [&](int device, void* stream) {
    return lars_ema_cuda(call.ts, call.c.kernel_dtype(), call.a, device, stream);
  });
}
void lamb_moments_cuda_impl(EK_LAMB_MOMENTS_ARGS) {
  LambCall call = lamb_moments_prepare(EK_LAMB_MOMENTS_FWD);
  if (call.ts.empty()) return;
  cuda_launch(call.c, [&](int device, void* stream) {
    return lamb_moments_cuda(call.ts, call.c.kernel_dtype(), call.a, device, stream);
  });
}
void lamb_ema_cuda_impl(EK_LAMB_EMA_ARGS) {
  LambCall call = lamb_ema_prepare(EK_LAMB_EMA_FWD);
  if (call.ts.empty()) return;
  cuda_launch(call.c, [&](int device, void* stream) {
    return lamb_ema_cuda(call.ts, call.c.kernel_dtype(), call.a, device, stream);
  });
}
#endif

// ------------------------------------------------------------------------------------------
// EMA only
// ------------------------------------------------------------------------------------------
struct EmaCall {
  Checker c;
  std::vector<TensorPtrs> ts;
  double w[kMaxEmas] = {};
  int n_emas = 0;
};

EmaCall ema_prepare(at::TensorList emas, at::TensorList params,
                    const std::vector<double>& ema_weights) {
  EmaCall call{Checker{"ema_only_"}, {}};
  call.c.params(params);
  TORCH_CHECK(!ema_weights.empty() || params.empty(), "ema_only_: ema_weights is empty; give "
              "one weight per EMA list");
  call.c.ema_lists(emas, params, int64_t(ema_weights.size()));
  call.n_emas = int(ema_weights.size());
  set_ema_weights(call.w, ema_weights.data(), ema_weights.size());
  call.ts.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    call.ts[i].p = const_cast<void*>(params[i].const_data_ptr());
    call.ts[i].n = params[i].numel();
  }
  ema_ptrs(call.ts, emas, call.n_emas);
  return call;
}

#ifndef EK_CUDA_EMULATION
void ema_only_cpu_impl(at::TensorList emas, at::TensorList params,
                       std::vector<double> ema_weights) {
  EmaCall call = ema_prepare(emas, params, ema_weights);
  if (call.ts.empty()) return;
  expect_device(call.c, c10::kCPU, "CPU");
  ema_only_cpu(call.ts, call.c.kernel_dtype(), call.w, call.n_emas);
}
#endif

#ifdef EK_CUDA_KERNELS
void ema_only_cuda_impl(at::TensorList emas, at::TensorList params,
                        std::vector<double> ema_weights) {
  EmaCall call = ema_prepare(emas, params, ema_weights);
  if (call.ts.empty()) return;
  cuda_launch(call.c, [&](int device, void* stream) {
    return ema_only_cuda(call.ts, call.c.kernel_dtype(), call.w, call.n_emas, device, stream);
  });
}
#endif

#ifdef EK_CUDA_EMULATION
// ------------------------------------------------------------------------------------------
// Emulation-only ops (torch.ops.ema_kernels_emu.emu_*): see kernels.h
// ------------------------------------------------------------------------------------------
void emu_configure_op(int64_t chunk, int64_t sm_count, int64_t blocks_per_sm, int64_t grid_cap,
                      int64_t shuffle_seed) {
  TORCH_CHECK(sm_count >= 0 && sm_count <= 4096 && blocks_per_sm >= 0 && blocks_per_sm <= 32 &&
                  shuffle_seed >= 0,
              "emu_configure: chunk >= 0, 0 <= sm_count <= 4096, 0 <= blocks_per_sm <= 32, "
              "grid_cap >= 0, shuffle_seed >= 0 (0: the default); got sm_count ", sm_count,
              ", blocks_per_sm ", blocks_per_sm, ", shuffle_seed ", shuffle_seed);
  EmuConfig c;
  c.chunk = chunk;
  c.sm_count = int(sm_count);
  c.blocks_per_sm = int(blocks_per_sm);
  c.grid_cap = grid_cap;
  c.shuffle_seed = uint64_t(shuffle_seed);
  const char* err = emu_configure(c);
  TORCH_CHECK(err == nullptr, err);
}

std::vector<int64_t> emu_stats_op() {
  const EmuStats s = emu_stats();
  return {s.launches,   s.blocks,        s.occupancy_queries, s.bytes_read,
          s.bytes_written, s.bytes_vector, s.arg_reads,        s.table_uploads,
          s.atomics};
}

std::vector<int64_t> emu_flat_walk_op(int64_t n, int64_t elem_bytes, bool aligned, int64_t grid,
                                      int64_t block, int64_t thread) {
  int64_t out[9];
  const char* err = emu_flat_walk(n, int(elem_bytes), aligned, grid, block, thread, out);
  TORCH_CHECK(err == nullptr, err);
  return std::vector<int64_t>(out, out + 9);
}

int64_t emu_flat_grid_op(int64_t n, int64_t elem_bytes) {
  TORCH_CHECK(n >= 0 && (elem_bytes == 2 || elem_bytes == 4), "emu_flat_grid: n >= 0, "
              "elem_bytes 2 or 4");
  return emu_flat_grid(n, int(elem_bytes));
}

std::vector<int64_t> emu_list_plan_op(std::vector<int64_t> sizes) {
  std::vector<int64_t> plan;
  const char* err = emu_list_plan(sizes, &plan);
  TORCH_CHECK(err == nullptr, err);
  return plan;
}
#endif

// ------------------------------------------------------------------------------------------
// Stochastic rounding, alone (issue 15): float32 `x` (contiguous) rounded to bf16/fp16 with
// the random bits of (seed, step, base + i) for element i -- fused_math.h's functions as the
// kernels call them, so the tests can compare them with the reference and Triton bit for bit,
// and check unbiasedness on chosen values.  Not on the optimizers' path.
// ------------------------------------------------------------------------------------------
Tensor sr_round_op(const Tensor& x, bool half, int64_t seed, int64_t step, int64_t base) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == c10::ScalarType::Float &&
                  x.is_contiguous(),
              "sr_round: x must be a contiguous float32 CPU tensor");
  TORCH_CHECK(seed >= 0 && step >= 0 && base >= 0, "sr_round: seed, step and base are >= 0");
  Tensor out = at::empty(x.sizes(), x.options().dtype(half ? c10::ScalarType::Half
                                                           : c10::ScalarType::BFloat16));
  const float* src = x.const_data_ptr<float>();
  uint16_t* dst = static_cast<uint16_t*>(out.data_ptr());
  const SrKey key = sr_key(uint64_t(seed), uint64_t(step));
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t r = sr_bits(key, uint64_t(base + i));
    dst[i] = half ? F16SR::store_r(src[i], r) : BF16SR::store_r(src[i], r);
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// Build information (what `python -m ema_kernels info` shows)
// ------------------------------------------------------------------------------------------
std::string build_info() {
  std::ostringstream o;
#ifdef EK_CUDA_EMULATION
  // The CUDA kernels, emulated on the host; no CPU twin in this library.
  o << "cuda=0\n";
  o << "cuda_emulation=1\n";
#else
#ifdef EK_WITH_CUDA
  o << "cuda=1\n";
  o << "cuda_archs=" << EK_CUDA_ARCHS << "\n";
  o << "cuda_arch_list=" << cuda_arch_list() << "\n";
  o << "cuda_version=" << cuda_compiled_version() << "\n";
#else
  o << "cuda=0\n";
#endif
  o << "cpu_isa=" << cpu_isa() << "\n";
#ifdef _OPENMP
  o << "openmp=1\n";
#else
  o << "openmp=0\n";
#endif
#endif
  return o.str();
}

}  // namespace
}  // namespace ek

// TORCH_LIBRARY pastes its namespace argument: one more macro level expands EK_OPS_NS first.
#define EK_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define EK_TORCH_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

EK_TORCH_LIBRARY(EK_OPS_NS, m) {
  m.def(
      "adam_ema_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] emas, *, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool maximize, "
      "float step_size, float bias_correction2_sqrt, float[] ema_weights, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, bool stochastic_rounding=False, "
      "int sr_seed=0, int sr_step=0, int[]? sr_offsets=None) -> ()");
  m.def(
      "adam_ema_capturable_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] emas, *, Tensor lr, "
      "Tensor step, float beta1, float beta2, float eps, float weight_decay, bool decoupled, "
      "bool maximize, Tensor? ema_weight, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "bool stochastic_rounding=False, int sr_seed=0, int sr_step=0, int[]? sr_offsets=None) "
      "-> ()");
  m.def(
      "sgd_ema_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] emas, *, float lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool first_step, float[] ema_weights, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, bool stochastic_rounding=False, "
      "int sr_seed=0, int sr_step=0, int[]? sr_offsets=None) -> ()");
  m.def(
      "sgd_ema_capturable_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] emas, *, Tensor lr, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool first_step, Tensor? ema_weight, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, bool stochastic_rounding=False, "
      "int sr_seed=0, int sr_step=0, int[]? sr_offsets=None) -> ()");
  m.def("ema_only_(Tensor(a!)[] emas, Tensor[] params, *, float[] ema_weights) -> ()");
  m.def(
      "lion_ema_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] emas, "
      "*, float lr, float beta1, float beta2, float weight_decay, bool maximize, "
      "float[] ema_weights, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "bool stochastic_rounding=False, int sr_seed=0, int sr_step=0, int[]? sr_offsets=None) "
      "-> ()");
  m.def(
      "lion_ema_capturable_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] emas, *, Tensor lr, float beta1, float beta2, float weight_decay, "
      "bool maximize, Tensor? ema_weight, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "bool stochastic_rounding=False, int sr_seed=0, int sr_step=0, int[]? sr_offsets=None) "
      "-> ()");
  m.def(
      "lars_ema_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] emas, *, Tensor coefs, float lr, float momentum, float dampening, "
      "bool nesterov, bool maximize, bool first_step, float[] ema_weights, "
      "Tensor? lr_tensor=None, Tensor? ema_weight=None, Tensor? grad_scale=None, "
      "Tensor? found_inf=None, bool stochastic_rounding=False, int sr_seed=0, int sr_step=0, "
      "int[]? sr_offsets=None) -> ()");
  m.def(
      "lamb_moments_(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, "
      "Tensor(b!)[] exp_avg_sqs, Tensor(c!) sums, *, float beta1, float beta2, float eps, "
      "float weight_decay, bool maximize, float bias_correction1, float bias_correction2_sqrt, "
      "Tensor? bias_corrections=None, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  m.def(
      "lamb_ema_(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor(b!)[] emas, *, Tensor step_sizes, float eps, float weight_decay, "
      "float bias_correction1, float bias_correction2_sqrt, float[] ema_weights, "
      "Tensor? bias_corrections=None, Tensor? ema_weight=None, Tensor? found_inf=None, "
      "bool stochastic_rounding=False, int sr_seed=0, int sr_step=0, int[]? sr_offsets=None) "
      "-> ()");
  m.def("build_info() -> str", &ek::build_info);
  m.def("sr_round(Tensor x, bool half, int seed, int step, int base) -> Tensor",
        &ek::sr_round_op);
#ifdef EK_CUDA_EMULATION
  m.def("emu_configure(int chunk, int sm_count, int blocks_per_sm, int grid_cap, "
        "int shuffle_seed) -> ()", &ek::emu_configure_op);
  m.def("emu_stats() -> int[]", &ek::emu_stats_op);
  m.def("emu_flat_walk(int n, int elem_bytes, bool aligned, int grid, int block, int thread) "
        "-> int[]", &ek::emu_flat_walk_op);
  m.def("emu_flat_grid(int n, int elem_bytes) -> int", &ek::emu_flat_grid_op);
  m.def("emu_list_plan(int[] sizes) -> int[]", &ek::emu_list_plan_op);
#endif
}

#ifdef EK_CUDA_EMULATION
// The CUDA kernels' implementations, for CPU tensors.
EK_TORCH_LIBRARY_IMPL(EK_OPS_NS, CPU, m) {
  m.impl("adam_ema_", &ek::adam_ema_cuda_impl);
  m.impl("adam_ema_capturable_", &ek::adam_ema_capturable_cuda_impl);
  m.impl("sgd_ema_", &ek::sgd_ema_cuda_impl);
  m.impl("sgd_ema_capturable_", &ek::sgd_ema_capturable_cuda_impl);
  m.impl("ema_only_", &ek::ema_only_cuda_impl);
  m.impl("lion_ema_", &ek::lion_ema_cuda_impl);
  m.impl("lion_ema_capturable_", &ek::lion_ema_capturable_cuda_impl);
  m.impl("lars_ema_", &ek::lars_ema_cuda_impl);
  m.impl("lamb_moments_", &ek::lamb_moments_cuda_impl);
  m.impl("lamb_ema_", &ek::lamb_ema_cuda_impl);
}
#else
EK_TORCH_LIBRARY_IMPL(EK_OPS_NS, CPU, m) {
  m.impl("adam_ema_", &ek::adam_ema_cpu_impl);
  m.impl("adam_ema_capturable_", &ek::adam_ema_capturable_cpu_impl);
  m.impl("sgd_ema_", &ek::sgd_ema_cpu_impl);
  m.impl("sgd_ema_capturable_", &ek::sgd_ema_capturable_cpu_impl);
  m.impl("ema_only_", &ek::ema_only_cpu_impl);
  m.impl("lion_ema_", &ek::lion_ema_cpu_impl);
  m.impl("lion_ema_capturable_", &ek::lion_ema_capturable_cpu_impl);
  m.impl("lars_ema_", &ek::lars_ema_cpu_impl);
  m.impl("lamb_moments_", &ek::lamb_moments_cpu_impl);
  m.impl("lamb_ema_", &ek::lamb_ema_cpu_impl);
}
#endif

#ifdef EK_WITH_CUDA
EK_TORCH_LIBRARY_IMPL(EK_OPS_NS, CUDA, m) {
  m.impl("adam_ema_", &ek::adam_ema_cuda_impl);
  m.impl("adam_ema_capturable_", &ek::adam_ema_capturable_cuda_impl);
  m.impl("sgd_ema_", &ek::sgd_ema_cuda_impl);
  m.impl("sgd_ema_capturable_", &ek::sgd_ema_capturable_cuda_impl);
  m.impl("ema_only_", &ek::ema_only_cuda_impl);
  m.impl("lion_ema_", &ek::lion_ema_cuda_impl);
  m.impl("lion_ema_capturable_", &ek::lion_ema_capturable_cuda_impl);
  m.impl("lars_ema_", &ek::lars_ema_cuda_impl);
  m.impl("lamb_moments_", &ek::lamb_moments_cuda_impl);
  m.impl("lamb_ema_", &ek::lamb_ema_cuda_impl);
}
#endif

// The Python module: importing ema_kernels._C (or _C_emu) loads this library, whose static
// initialisers above register the ops (torch.ops.<namespace>); the module itself holds only
// StepTable (step_table.cpp), step()'s per-step host work.
#ifdef EK_CUDA_EMULATION
#define EK_PYINIT PyInit__C_emu
#define EK_MODULE_NAME "_C_emu"
#define EK_MODULE_DOC \
  "ema_kernels' CUDA kernels emulated on the CPU: ops registered as torch.ops.ema_kernels_emu.*"
#else
#define EK_PYINIT PyInit__C
#define EK_MODULE_NAME "_C"
#define EK_MODULE_DOC \
  "ema_kernels compiled extension: ops registered as torch.ops.ema_kernels_ext.*"
#endif

namespace ek {
void add_step_table(PyObject* module);  // step_table.cpp: the per-step host work, via pybind11
}

extern "C" PyMODINIT_FUNC EK_PYINIT(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      EK_MODULE_NAME,
      EK_MODULE_DOC,
      -1,
      nullptr,
  };
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  try {
    ek::add_step_table(m);
  } catch (const std::exception& e) {  // pybind11 raised: report it as the import's error
    Py_DECREF(m);
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return m;
}
