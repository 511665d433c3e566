// step_table.cpp -- the per-step host work of optimizer.step() in C++: one call per parameter set.
//
// On a GPU the fused kernel for a 100M-parameter model takes well under a millisecond, so the
// host work around it decides the speed: reading every parameter's .grad, checking it, gathering
// the pointer table.  Done in Python that is ~15 us per parameter (attribute reads, list
// building, boxing 4+ tensors per parameter into a torch.ops call); here it is a few ns.
//
// A StepTable is built once per parameter set (ema_kernels/optim/layout.py's TensorSet) and
// holds the set's parameters (the Parameter objects' TensorImpls, so `p.data = t` and new .grad
// tensors are seen), its state and EMA tensors.  Each step:
//
//   table.prepare()  -> 0 when every parameter has a gradient the kernels can take as it is
//                       (right dtype/device/shape, the parameter's strides) and every
//                       parameter still has the shape, strides, dtype and device its state was
//                       made for; the pointers are gathered.  Anything else returns a nonzero
//                       status and step() takes its general path (which raises the error that
//                       names the parameter, re-makes state, skips grad-None parameters, or
//                       copies an odd gradient layout) -- the same results, only in Python.
//   table.adam(...) / table.sgd(...)  -> one fused launch over the gathered table; then the
//                       set's host step counts (`steps`, where the table was given them) +1.
//
// prepare() runs for every set of every group before the first launch, so a step that must
// fail does so before anything moves.  Exposed with pybind11 (not torch.ops): a torch.ops call
// boxes every tensor argument (~0.3 us each), which is the cost this file exists to remove.
#include <torch/extension.h>

#include <string>
#include <vector>

#ifdef EK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "kernels.h"

namespace py = pybind11;

namespace ek {
namespace {

using at::Tensor;

// prepare()'s answer.  Not errors: each sends step() to its general path, which decides.
enum Status : int {
  kReady = 0,         // pointers gathered: launch
  kParamChanged = 1,  // a parameter's dtype/device/shape/strides differ from its state's
  kNoGrad = 2,        // a parameter has no gradient this step
  kGradLayout = 3,    // a gradient the kernels cannot take as it is (dtype, shape, strides...)
  kFlatUnbound = 4,   // flatten=True: a parameter or gradient is no longer our buffer's view
  kMisaligned = 5,    // triton: an address not 16-byte aligned (its list kernel assumes it)
};

DType kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return DType::kF32;
    case c10::ScalarType::BFloat16: return DType::kBF16;
    case c10::ScalarType::Half: return DType::kF16;
    default:
      TORCH_CHECK_TYPE(false, "StepTable: parameters of dtype ", c10::toString(t),
                       "; the fused kernels take float32, bfloat16 or float16");
  }
}

const float* device_scalar(const c10::optional<Tensor>& t, const char* name,
                           const c10::Device& device) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == device, "StepTable: ", name, " is on ", t->device(),
              " but the parameters are on ", device);
  TORCH_CHECK_TYPE(t->scalar_type() == c10::ScalarType::Float, "StepTable: ", name,
                   " must be a float32 tensor, got ", c10::toString(t->scalar_type()));
  TORCH_CHECK(t->numel() == 1, "StepTable: ", name, " must have one element, got ",
              t->numel());
  return t->const_data_ptr<float>();
}

class StepTable {
 public:
  // params: the set's parameters (the Parameter objects).  state: one list per state role
  // (Adam: exp_avg, exp_avg_sq[, max_exp_avg_sq]; SGD: [momentum_buffer] or none), emas: one
  // list per EMA, each aligned with params and holding the kernel views (1-D aliases for
  // channels_last tensors).  kernels: "cuda" launches fused_cuda.cu's kernels (on the current
  // stream; emulated on the host in the _C_emu build), "cpu" the CPU twin, "triton" nothing:
  // the table then only prepares, and hands the Triton launcher its pointer table
  // (triton_table()).
  // like: an empty tensor of the set's dtype and device; shapes/strides: each parameter's when
  // its state was made (a parameter that no longer has them goes the general path).
  StepTable(std::vector<Tensor> params, const Tensor& like,
            const std::vector<std::vector<int64_t>>& shapes,
            const std::vector<std::vector<int64_t>>& strides,
            std::vector<std::vector<Tensor>> state, std::vector<std::vector<Tensor>> emas,
            const std::vector<int64_t>& sr_bases, const std::string& kernels,
            const c10::optional<Tensor>& steps)
      : params_(std::move(params)), state_(std::move(state)), emas_(std::move(emas)) {
    init_common(like, kernels);
    set_steps(steps);
    const size_t n = params_.size();
    TORCH_CHECK(shapes.size() == n && strides.size() == n, "StepTable: ", shapes.size(),
                " shapes and ", strides.size(), " strides for ", n, " parameters");
    for (size_t i = 0; i < n; ++i)
      TORCH_CHECK(shapes[i].size() == strides[i].size(), "StepTable: parameter ", i, " has ",
                  shapes[i].size(), " sizes but ", strides[i].size(), " strides");
    for (const auto& role : state_) check_aligned(role, "state");
    for (const auto& z : emas_) check_aligned(z, "emas");
    TORCH_CHECK(sr_bases.size() == n, "StepTable: ", sr_bases.size(), " sr_bases for ", n,
                " parameters");
    table_.resize(n);
    for (size_t i = 0; i < n; ++i) table_[i].sr_base = sr_bases[i];
    pack_geometry(shapes, strides);
    ema_ptrs_.assign(kMaxEmas, std::vector<float*>(n, nullptr));
    gather_state();
  }

  // flatten=True: one entry over whole buffers.  bound_grads are the views zero_grad bound
  // (a step is one launch only while every p.grad is that very view and every parameter still
  // lives at its offset of flat_param).
  static StepTable flat(std::vector<Tensor> params, std::vector<Tensor> bound_grads,
                        std::vector<int64_t> param_ptrs, Tensor flat_param, Tensor flat_grad,
                        std::vector<Tensor> state, std::vector<Tensor> emas,
                        const std::string& kernels, const c10::optional<Tensor>& steps) {
    StepTable t;
    t.params_ = std::move(params);
    t.is_flat_ = true;
    t.init_common(flat_param, kernels);
    t.set_steps(steps);
    TORCH_CHECK(bound_grads.size() == t.params_.size() &&
                    param_ptrs.size() == t.params_.size(),
                "StepTable.flat: ", bound_grads.size(), " bound gradients and ",
                param_ptrs.size(), " parameter pointers for ", t.params_.size(), " parameters");
    for (const auto& g : bound_grads) {
      t.bound_impls_.push_back(g.unsafeGetTensorImpl());
      t.bound_ptrs_.push_back(g.data_ptr());
    }
    for (int64_t p : param_ptrs) t.param_ptrs_.push_back(reinterpret_cast<void*>(p));
    t.flat_param_ = std::move(flat_param);
    t.flat_grad_ = std::move(flat_grad);
    for (auto& s : state) t.state_.push_back({std::move(s)});
    for (auto& z : emas) t.emas_.push_back({std::move(z)});
    t.table_.resize(1);
    t.ema_ptrs_.assign(kMaxEmas, std::vector<float*>(1, nullptr));
    t.gather_state();
    return t;
  }

  int prepare() {
    prepared_ = false;
    const int rc = is_flat_ ? prepare_flat() : prepare_list();
    prepared_ = rc == kReady;
    return rc;
  }

  // Adam / AdamW over the prepared table (host step count: step_size, bc2_sqrt from the host).
  void adam(double lr, double beta1, double beta2, double eps, double weight_decay,
            bool decoupled, bool maximize, bool amsgrad, double step_size, double bc2_sqrt,
            const std::vector<double>& ema_weights, const c10::optional<Tensor>& grad_scale,
            const c10::optional<Tensor>& found_inf, c10::optional<int64_t> sr_seed,
            int64_t sr_step) {
    TORCH_CHECK(!triton_, "StepTable.adam: a triton table is launched by Triton");
    TORCH_CHECK(state_.size() == (amsgrad ? 3u : 2u), "StepTable.adam: the table holds ",
                state_.size(), " state roles; Adam needs ", amsgrad ? 3 : 2);
    AdamArgs a = make_adam_args(beta1, beta2, eps, weight_decay, decoupled, maximize, amsgrad,
                                check_emas(ema_weights),
                                device_scalar(grad_scale, "grad_scale", device_),
                                device_scalar(found_inf, "found_inf", device_));
    a.lr = lr;
    a.step_size = step_size;
    a.bc2_sqrt = bc2_sqrt;
    run(a, ema_weights, sr_seed, sr_step);
  }

  void sgd(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
           bool maximize, bool first_step, const std::vector<double>& ema_weights,
           const c10::optional<Tensor>& grad_scale, const c10::optional<Tensor>& found_inf,
           c10::optional<int64_t> sr_seed, int64_t sr_step) {
    TORCH_CHECK(!triton_, "StepTable.sgd: a triton table is launched by Triton");
    TORCH_CHECK(state_.size() == (momentum != 0 ? 1u : 0u), "StepTable.sgd: the table holds ",
                state_.size(), " state roles; momentum=", momentum, " needs ",
                momentum != 0 ? 1 : 0);
    SgdArgs a = make_sgd_args(momentum, dampening, weight_decay, nesterov, maximize, first_step,
                              check_emas(ema_weights),
                              device_scalar(grad_scale, "grad_scale", device_),
                              device_scalar(found_inf, "found_inf", device_));
    a.lr = lr;
    run(a, ema_weights, sr_seed, sr_step);
  }

  // capturable=True: the same launches with lr, the step count t (Adam) and the EMA weights
  // read from device tensors (CapturablePtrs), so a CUDA-graph replay uses their current
  // values; Python keeps and advances them (stepping._run_capturable).
  void adam_capturable(const Tensor& lr, const Tensor& step,
                       const c10::optional<Tensor>& ema_weight, double beta1, double beta2,
                       double eps, double weight_decay, bool decoupled, bool maximize,
                       bool amsgrad, const c10::optional<Tensor>& grad_scale,
                       const c10::optional<Tensor>& found_inf) {
    TORCH_CHECK(!triton_, "StepTable.adam_capturable: a triton table is launched by Triton");
    TORCH_CHECK(state_.size() == (amsgrad ? 3u : 2u), "StepTable.adam_capturable: the table "
                "holds ", state_.size(), " state roles; Adam needs ", amsgrad ? 3 : 2);
    AdamArgs a = make_adam_args(beta1, beta2, eps, weight_decay, decoupled, maximize, amsgrad,
                                ema_count(ema_weight),
                                device_scalar(grad_scale, "grad_scale", device_),
                                device_scalar(found_inf, "found_inf", device_));
    set_capturable(a, lr, &step, ema_weight);
    launch_and_count(a);
  }

  // SGD's capturable launch never has a first step (which applied step is the first is known
  // only on the device): see sgd.py.
  void sgd_capturable(const Tensor& lr, const c10::optional<Tensor>& ema_weight,
                      double momentum, double dampening, double weight_decay, bool nesterov,
                      bool maximize, const c10::optional<Tensor>& grad_scale,
                      const c10::optional<Tensor>& found_inf) {
    TORCH_CHECK(!triton_, "StepTable.sgd_capturable: a triton table is launched by Triton");
    TORCH_CHECK(state_.size() == (momentum != 0 ? 1u : 0u), "StepTable.sgd_capturable: the "
                "table holds ", state_.size(), " state roles; momentum=", momentum, " needs ",
                momentum != 0 ? 1 : 0);
    SgdArgs a = make_sgd_args(momentum, dampening, weight_decay, nesterov, maximize, false,
                              ema_count(ema_weight),
                              device_scalar(grad_scale, "grad_scale", device_),
                              device_scalar(found_inf, "found_inf", device_));
    set_capturable(a, lr, nullptr, ema_weight);
    launch_and_count(a);
  }

  // The Triton list kernels' table of the prepared step (int64, on the host): address rows
  // θ, g, `state_rows` state slots (0 where this table has fewer roles), ζ0..ζ3 (0 past
  // n_emas), a row of sizes, then per BLOCK-sized chunk its tensor index and start, and with
  // sr_bases each tensor's stochastic-rounding element-index base.  Returns
  // (table, number of chunks, a 63-bit hash of the table's content): the launcher keeps device
  // copies keyed by it, so a steady-state step copies nothing to the device.
  py::tuple triton_table(int64_t state_rows, int64_t n_emas, int64_t block, bool sr_bases) {
    TORCH_CHECK(triton_, "StepTable.triton_table: this table launches its own kernels");
    TORCH_CHECK(prepared_, "StepTable.triton_table: no successful prepare() in this step");
    TORCH_CHECK(state_rows >= int64_t(state_.size()) && n_emas <= int64_t(emas_.size()) &&
                    n_emas <= kMaxEmas && block > 0,
                "StepTable.triton_table: ", state_rows, " state rows for ", state_.size(),
                " roles, ", n_emas, " EMAs of ", emas_.size(), ", block ", block);
    fill_state(int(n_emas));
    prepared_ = false;
    const int64_t n = int64_t(table_.size());
    const int64_t rows = 2 + state_rows + kMaxEmas;
    int64_t chunks = 0;
    for (const auto& t : table_) chunks += (t.n + block - 1) / block;
    Tensor host = at::empty({(rows + 1) * n + 2 * chunks + (sr_bases ? n : 0)},
                            at::TensorOptions().dtype(at::kLong));
    int64_t* out = host.data_ptr<int64_t>();
    auto addr = [](const void* ptr) { return int64_t(reinterpret_cast<uintptr_t>(ptr)); };
    for (int64_t i = 0; i < n; ++i) {
      const TensorPtrs& t = table_[i];
      const float* state[3] = {t.s0, t.s1, t.s2};
      out[i] = addr(t.p);
      out[n + i] = addr(t.g);
      for (int64_t r = 0; r < state_rows; ++r)
        out[(2 + r) * n + i] = r < int64_t(state_.size()) && r < 3 ? addr(state[r]) : 0;
      for (int k = 0; k < kMaxEmas; ++k) out[(2 + state_rows + k) * n + i] = addr(t.z[k]);
      out[rows * n + i] = t.n;
    }
    int64_t* chunk_t = out + (rows + 1) * n;
    int64_t* chunk_start = chunk_t + chunks;
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t a = 0; a < table_[i].n; a += block, ++c) {
        chunk_t[c] = i;
        chunk_start[c] = a;
      }
    if (sr_bases)  // after the chunk rows, where only the stochastic-rounding kernels look
      for (int64_t i = 0; i < n; ++i) chunk_start[chunks + i] = table_[i].sr_base;
    // splitmix64 over the words: a content key, not a proof (the launcher compares a cached
    // table's content before it trusts a hit)
    uint64_t h = 0x9E3779B97F4A7C15ull ^ uint64_t(host.numel());
    for (int64_t w = 0; w < host.numel(); ++w) {
      uint64_t x = h ^ uint64_t(out[w]);
      x += 0x9E3779B97F4A7C15ull;
      x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
      x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
      h = x ^ (x >> 31);
    }
    return py::make_tuple(host, chunks, int64_t(h >> 1));
  }

  int64_t size() const { return int64_t(params_.size()); }
  bool is_flat() const { return is_flat_; }
  std::string kernels() const { return triton_ ? "triton" : (cuda_ ? "cuda" : "cpu"); }

 private:
  StepTable() = default;

  void init_common(const Tensor& like, const std::string& kernels) {
    TORCH_CHECK(!params_.empty(), "StepTable: no parameters");
    TORCH_CHECK(kernels == "cpu" || kernels == "cuda" || kernels == "triton",
                "StepTable: kernels must be 'cpu', 'cuda' or 'triton', got '", kernels, "'");
    cuda_ = kernels == "cuda";
    triton_ = kernels == "triton";
    device_ = like.device();
    sdtype_ = like.scalar_type();
    meta_ = like.dtype();
    dtype_ = kernel_dtype(sdtype_);
    if (triton_) return;  // launched by Triton, on whatever device it runs
#ifdef EK_CUDA_EMULATION
    TORCH_CHECK(cuda_, "StepTable: the emulation build has only the CUDA kernels");
    TORCH_CHECK(device_.is_cpu(), "StepTable: the emulated CUDA kernels run on CPU tensors");
#else
    if (cuda_) {
#ifdef EK_WITH_CUDA
      TORCH_CHECK(device_.is_cuda(), "StepTable: CUDA kernels for tensors on ", device_);
#else
      TORCH_CHECK(false, "StepTable: this build of ema_kernels._C has no CUDA kernels");
#endif
    } else {
      TORCH_CHECK(device_.is_cpu(), "StepTable: the CPU kernels for tensors on ", device_);
    }
#endif
  }

  // steps: the set's host step counts (float32, one per parameter: the memory the state's
  // "step" tensors view), advanced by adam()/sgd() after their launch -- in C++, because
  // numpy's `steps += 1` costs ~9 us per step once a backward pass has flushed the caches.
  void set_steps(const c10::optional<Tensor>& steps) {
    if (!steps.has_value() || !steps->defined()) return;
    TORCH_CHECK(!triton_, "StepTable: a triton table's launcher advances its own step counts");
    TORCH_CHECK(steps->device().is_cpu() && steps->scalar_type() == c10::ScalarType::Float &&
                    steps->is_contiguous() && steps->numel() == int64_t(params_.size()),
                "StepTable: steps must be a contiguous float32 CPU tensor of ",
                params_.size(), " elements (one per parameter), got ", steps->sizes(), " ",
                c10::toString(steps->scalar_type()), " on ", steps->device());
    steps_ = *steps;
  }

  void check_aligned(const std::vector<Tensor>& ts, const char* what) const {
    TORCH_CHECK(ts.size() == params_.size(), "StepTable: a ", what, " list of ", ts.size(),
                " tensors for ", params_.size(), " parameters");
    for (size_t i = 0; i < ts.size(); ++i) {
      const Tensor& t = ts[i];
      TORCH_CHECK(t.defined() && t.device() == device_ &&
                      t.scalar_type() == c10::ScalarType::Float && t.is_contiguous() &&
                      t.numel() == params_[i].numel(),
                  "StepTable: ", what, " tensor ", i, " must be a contiguous float32 tensor of ",
                  params_[i].numel(), " elements on ", device_);
    }
  }

  // The per-parameter loop of every step, through libtorch's public accessors only
  // (TensorImpl::grad, device, has_storage, data): reading AutogradMeta and StorageImpl
  // directly, with software prefetch of each parameter's pointer chain, was measured not to pay
  // at 100 or more tensors of real sizes (100 x 4096, 100 x 2^16, 1000 x 4096 fp32: equal or
  // slower, interleaved runs) and to save 15-25 % of host time only at thousands of tiny
  // tensors. The geometry the state was made for lives in one packed array (geo_) read in order.
  int prepare_list() {
    if (state_misaligned_) return kMisaligned;
    const size_t n = params_.size();
    for (size_t i = 0; i < n; ++i) {
      c10::TensorImpl* p = params_[i].unsafeGetTensorImpl();
      const int64_t* geo = geo_.data() + geo_off_[i];
      if (p->layout() != c10::kStrided || p->dtype() != meta_ || p->device() != device_ ||
          !same_geometry(p, geo))
        return kParamChanged;
      const Tensor& gt = p->grad();
      if (!gt.defined()) return kNoGrad;
      // The kernels walk θ and g with one index: same strides (a channels_last gradient of a
      // channels_last weight is fine, a contiguous one is not: step()'s general path copies).
      const c10::TensorImpl* g = gt.unsafeGetTensorImpl();
      if (g->layout() != c10::kStrided || g->dtype() != meta_ || g->device() != device_ ||
          !same_geometry(g, geo))
        return kGradLayout;
      TensorPtrs& t = table_[i];
      if (t.n == 0) continue;  // never launched (active()): it may have no storage at all
      t.p = p->has_storage() ? p->mutable_data() : nullptr;
      t.g = g->has_storage() ? g->data() : nullptr;
      if (t.p == nullptr || t.g == nullptr) return kGradLayout;  // the general path decides
      if (triton_ &&
          ((reinterpret_cast<uintptr_t>(t.p) | reinterpret_cast<uintptr_t>(t.g)) & 15) != 0)
        return kMisaligned;
    }
    return kReady;
  }

  // geo_: per parameter [ndim, sizes..., strides...] as its state was made, packed in order.
  void pack_geometry(const std::vector<std::vector<int64_t>>& shapes,
                     const std::vector<std::vector<int64_t>>& strides) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      geo_off_.push_back(int64_t(geo_.size()));
      geo_.push_back(int64_t(shapes[i].size()));
      geo_.insert(geo_.end(), shapes[i].begin(), shapes[i].end());
      geo_.insert(geo_.end(), strides[i].begin(), strides[i].end());
    }
  }

  static bool same_geometry(const c10::TensorImpl* t, const int64_t* geo) {
    const c10::IntArrayRef sz = t->sizes(), st = t->strides();
    const size_t nd = size_t(geo[0]);
    if (sz.size() != nd) return false;
    for (size_t d = 0; d < nd; ++d)
      if (sz[d] != geo[1 + d] || st[d] != geo[1 + nd + d]) return false;
    return true;
  }

  int prepare_flat() {
    const size_t n = params_.size();
    for (size_t i = 0; i < n; ++i) {
      c10::TensorImpl* p = params_[i].unsafeGetTensorImpl();
      if (p->mutable_data() != param_ptrs_[i]) return kFlatUnbound;
      const Tensor& g = p->grad();
      if (!g.defined()) return kNoGrad;
      if (g.unsafeGetTensorImpl() != bound_impls_[i] || g.unsafeGetTensorImpl()->data() !=
                                                            bound_ptrs_[i])
        return kFlatUnbound;
    }
    TensorPtrs& t = table_[0];
    t.p = flat_param_.data_ptr();
    t.g = flat_grad_.const_data_ptr();
    return kReady;
  }

  // State and EMA pointers, gathered once: these are the optimizer's own tensors, updated in
  // place (a loaded state dict replaces optimizer.state, and step() then builds new tables).
  void gather_state() {
    for (size_t i = 0; i < table_.size(); ++i) {
      TensorPtrs& t = table_[i];
      t.n = is_flat_ ? flat_param_.numel() : params_[i].numel();
      t.s0 = state_.size() > 0 ? state_[0][i].data_ptr<float>() : nullptr;
      t.s1 = state_.size() > 1 ? state_[1][i].data_ptr<float>() : nullptr;
      t.s2 = state_.size() > 2 ? state_[2][i].data_ptr<float>() : nullptr;
      for (size_t k = 0; k < emas_.size() && k < size_t(kMaxEmas); ++k)
        ema_ptrs_[k][i] = emas_[k][i].data_ptr<float>();
    }
    // Triton's list kernel assumes every address 16-byte aligned, state and EMAs included
    // (views of flat buffers at odd offsets are not): such a table is never ready.
    state_misaligned_ = false;
    if (triton_) {
      for (size_t i = 0; i < table_.size(); ++i) {
        const TensorPtrs& t = table_[i];
        uintptr_t bits = reinterpret_cast<uintptr_t>(t.s0) | reinterpret_cast<uintptr_t>(t.s1) |
                         reinterpret_cast<uintptr_t>(t.s2);
        for (size_t k = 0; k < emas_.size() && k < size_t(kMaxEmas); ++k)
          bits |= reinterpret_cast<uintptr_t>(ema_ptrs_[k][i]);
        if (t.n != 0 && (bits & 15) != 0) state_misaligned_ = true;
      }
    }
  }

  // EMA pointers of this launch: the first n_emas EMAs, the others nullptr (a non-EMA step
  // reads and writes no EMA bytes).
  void fill_state(int n_emas) {
    TORCH_CHECK(prepared_, "StepTable: launch without a successful prepare() in this step");
    TORCH_CHECK(n_emas <= int(emas_.size()), "StepTable: ", n_emas, " EMA weights but the "
                "table holds ", emas_.size(), " EMAs");
    if (n_emas == filled_emas_) return;
    for (size_t i = 0; i < table_.size(); ++i)
      for (int k = 0; k < kMaxEmas; ++k) table_[i].z[k] = k < n_emas ? ema_ptrs_[k][i] : nullptr;
    filled_emas_ = n_emas;
  }

  // Stochastic rounding of this launch: a seed (16-bit parameters only; fp32 is stored
  // exactly), the step count t; each tensor's element-index base came with the table.
  SrArgs sr_args(const c10::optional<int64_t>& seed, int64_t step) const {
    SrArgs sr;
    if (!seed.has_value()) return sr;
    TORCH_CHECK(*seed >= 0 && step >= 0, "StepTable: sr_seed ", *seed, " and sr_step ", step,
                " must be non-negative");
    sr.on = sdtype_ != c10::ScalarType::Float;
    sr.seed = uint64_t(*seed);
    sr.step = uint64_t(step);
    return sr;
  }

  // The capturable EMA weights: one float32 element per EMA on the set's device (none: a
  // step without EMA); their count is the launch's n_emas.
  int ema_count(const c10::optional<Tensor>& w) const {
    if (!w.has_value() || !w->defined()) return 0;
    TORCH_CHECK(w->device() == device_, "StepTable: ema_weight is on ", w->device(),
                " but the parameters are on ", device_);
    TORCH_CHECK_TYPE(w->scalar_type() == c10::ScalarType::Float,
                     "StepTable: ema_weight must be a float32 tensor, got ",
                     c10::toString(w->scalar_type()));
    TORCH_CHECK(w->is_contiguous() && w->numel() >= 1 && w->numel() <= kMaxEmas,
                "StepTable: ema_weight must be a contiguous tensor of 1 to ", kMaxEmas,
                " elements (one per EMA), got ", w->numel());
    return int(w->numel());
  }

  template <class Args>
  void set_capturable(Args& a, const Tensor& lr, const Tensor* step,
                      const c10::optional<Tensor>& ema_weight) const {
    a.capturable = true;
    a.cap.lr = device_scalar(lr, "lr", device_);
    a.cap.step = step != nullptr ? device_scalar(*step, "step", device_) : nullptr;
    a.cap.ema_w = a.n_emas > 0 ? ema_weight->template const_data_ptr<float>() : nullptr;
  }

  static int check_emas(const std::vector<double>& w) {
    TORCH_CHECK(w.size() <= size_t(kMaxEmas), "StepTable: ", w.size(), " EMA weights, at most ",
                kMaxEmas);
    return int(w.size());
  }

  // The launch of adam()/sgd(): the step's EMA weights and stochastic rounding, the EMA
  // pointers of this launch, then the kernels of this table (overloads on the Args type).
  template <class Args>
  void run(Args& a, const std::vector<double>& ema_weights,
           const c10::optional<int64_t>& sr_seed, int64_t sr_step) {
    set_ema_weights(a.ema_w, ema_weights.data(), ema_weights.size());
    a.sr = sr_args(sr_seed, sr_step);
    launch_and_count(a);
  }

  // The EMA pointers of this launch, the kernels of this table, then the host step counts.
  template <class Args>
  void launch_and_count(const Args& a) {
    fill_state(a.n_emas);
    launch([&](int dev, void* stream) -> const char* {
#if defined(EK_WITH_CUDA) || defined(EK_CUDA_EMULATION)
      if (cuda_) return cuda_kernel(active(), dtype_, a, dev, stream);
#endif
#ifndef EK_CUDA_EMULATION
      cpu_kernel(active(), dtype_, a);
#endif
      return nullptr;
    });
    if (steps_.defined()) {  // launched: the host counts move (float32, as numpy's += 1)
      float* s = steps_.data_ptr<float>();
      for (int64_t i = 0, n = steps_.numel(); i < n; ++i) s[i] += 1.0f;
    }
  }
#if defined(EK_WITH_CUDA) || defined(EK_CUDA_EMULATION)
  static const char* cuda_kernel(const std::vector<TensorPtrs>& ts, DType dt, const AdamArgs& a,
                                 int dev, void* stream) {
    return adam_ema_cuda(ts, dt, a, dev, stream);
  }
  static const char* cuda_kernel(const std::vector<TensorPtrs>& ts, DType dt, const SgdArgs& a,
                                 int dev, void* stream) {
    return sgd_ema_cuda(ts, dt, a, dev, stream);
  }
#endif
#ifndef EK_CUDA_EMULATION
  static void cpu_kernel(const std::vector<TensorPtrs>& ts, DType dt, const AdamArgs& a) {
    adam_ema_cpu(ts, dt, a);
  }
  static void cpu_kernel(const std::vector<TensorPtrs>& ts, DType dt, const SgdArgs& a) {
    sgd_ema_cpu(ts, dt, a);
  }
#endif

  // The tensors a launch walks: the prepared table without zero-element entries (a 0-element
  // parameter may have no storage at all).
  const std::vector<TensorPtrs>& active() {
    bool any_empty = false;
    for (const auto& t : table_) any_empty |= t.n == 0;
    if (!any_empty) return table_;
    launch_.clear();
    for (const auto& t : table_)
      if (t.n != 0) launch_.push_back(t);
    return launch_;
  }

  template <class Launch>
  void launch(Launch&& run) {
    const char* err = nullptr;
    {
      py::gil_scoped_release no_gil;  // a large model's CPU kernel runs for milliseconds
#ifdef EK_WITH_CUDA
      if (cuda_) {
        const c10::cuda::CUDAGuard guard(device_);
        const auto stream = c10::cuda::getCurrentCUDAStream(device_.index());
        err = run(device_.index(), static_cast<void*>(stream.stream()));
      } else {
        err = run(-1, nullptr);
      }
#else
      err = run(0, nullptr);
#endif
    }
    prepared_ = false;
    TORCH_CHECK(err == nullptr, "StepTable: CUDA kernel launch failed: ", err);
  }

  std::vector<Tensor> params_;
  std::vector<std::vector<Tensor>> state_, emas_;
  Tensor steps_;  // the host step counts adam()/sgd() advance (undefined: the caller does)
  // each parameter's shape and strides when its state was made, packed (pack_geometry)
  std::vector<int64_t> geo_, geo_off_;
  std::vector<TensorPtrs> table_, launch_;
  std::vector<std::vector<float*>> ema_ptrs_;  // [EMA k][tensor i]
  int filled_emas_ = -1;                        // EMAs whose pointers table_ holds now
  // flatten=True
  bool is_flat_ = false;
  std::vector<const c10::TensorImpl*> bound_impls_;
  std::vector<const void*> bound_ptrs_;
  std::vector<const void*> param_ptrs_;
  Tensor flat_param_, flat_grad_;

  c10::Device device_ = c10::Device(c10::kCPU);
  c10::ScalarType sdtype_ = c10::ScalarType::Float;
  caffe2::TypeMeta meta_;
  bool state_misaligned_ = false;  // triton: a state or EMA address not 16-byte aligned
  DType dtype_ = DType::kF32;
  bool cuda_ = false;
  bool triton_ = false;
  bool prepared_ = false;
};

}  // namespace

// Called by the module's PyInit (bindings.cpp): adds StepTable to ema_kernels._C / _C_emu.
void add_step_table(PyObject* module) {
  py::module_ m = py::reinterpret_borrow<py::module_>(module);
  py::class_<StepTable>(m, "StepTable",
                        "One parameter set's per-step host work (csrc/step_table.cpp).")
      .def(py::init<std::vector<Tensor>, const Tensor&, const std::vector<std::vector<int64_t>>&,
                    const std::vector<std::vector<int64_t>>&, std::vector<std::vector<Tensor>>,
                    std::vector<std::vector<Tensor>>, const std::vector<int64_t>&,
                    const std::string&, const c10::optional<Tensor>&>(),
           py::arg("params"), py::arg("like"), py::arg("shapes"), py::arg("strides"),
           py::arg("state"), py::arg("emas"), py::arg("sr_bases"), py::arg("kernels"),
           py::arg("steps") = py::none())
      .def_static("flat", &StepTable::flat, py::arg("params"), py::arg("bound_grads"),
                  py::arg("param_ptrs"), py::arg("flat_param"), py::arg("flat_grad"),
                  py::arg("state"), py::arg("emas"), py::arg("kernels"),
                  py::arg("steps") = py::none())
      .def("prepare", &StepTable::prepare,
           "Read and check every .grad; 0: ready to launch, else the reason it is not")
      .def("adam", &StepTable::adam, py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
           py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("maximize"),
           py::arg("amsgrad"), py::arg("step_size"), py::arg("bias_correction2_sqrt"),
           py::arg("ema_weights"), py::arg("grad_scale"), py::arg("found_inf"),
           py::arg("sr_seed") = py::none(), py::arg("sr_step") = 0)
      .def("sgd", &StepTable::sgd, py::arg("lr"), py::arg("momentum"), py::arg("dampening"),
           py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"),
           py::arg("first_step"), py::arg("ema_weights"), py::arg("grad_scale"),
           py::arg("found_inf"), py::arg("sr_seed") = py::none(), py::arg("sr_step") = 0)
      .def("adam_capturable", &StepTable::adam_capturable, py::arg("lr"), py::arg("step"),
           py::arg("ema_weight"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
           py::arg("weight_decay"), py::arg("decoupled"), py::arg("maximize"),
           py::arg("amsgrad"), py::arg("grad_scale"), py::arg("found_inf"))
      .def("sgd_capturable", &StepTable::sgd_capturable, py::arg("lr"), py::arg("ema_weight"),
           py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"),
           py::arg("nesterov"), py::arg("maximize"), py::arg("grad_scale"),
           py::arg("found_inf"))
      .def("triton_table", &StepTable::triton_table, py::arg("state_rows"), py::arg("n_emas"),
           py::arg("block"), py::arg("sr_bases"))
      .def_property_readonly("kernels", &StepTable::kernels)
      .def("__len__", &StepTable::size)
      .def_property_readonly("is_flat", &StepTable::is_flat);
  m.attr("STATUS") = py::dict(py::arg("ready") = int(kReady),
                              py::arg("param_changed") = int(kParamChanged),
                              py::arg("no_grad") = int(kNoGrad),
                              py::arg("grad_layout") = int(kGradLayout),
                              py::arg("flat_unbound") = int(kFlatUnbound),
                              py::arg("misaligned") = int(kMisaligned));
}

}  // namespace ek
