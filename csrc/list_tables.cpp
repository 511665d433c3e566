// list_tables.cpp -- the device copies of the CUDA list kernels' work tables, and their cache.
//
// fused_cuda.cu launches a set of any size as one persistent list kernel that reads a work table
// from device memory (per tensor its pointers, n and SR base; per chunk its tensor and chunk
// index).  This file owns that memory, through torch (the .cu never sees a torch header):
// device buffers from the CUDA caching allocator, the staging copy from pinned memory
// (`pinned_memory(true)`: torch's caching host allocator), copied with non_blocking=true on the
// launch's stream, so the host allocator keeps the pinned block until the copy has run and the
// upload never waits for the device.
//
// A steady-state step copies nothing: the cache keeps, per key (device, kernel instantiation,
// the set's first parameter address and tensor count, chunk size), the host bytes of the entries
// it last uploaded; a launch compares the new entries with them (memcmp) and uploads only when
// they differ (a pointer moved: e.g. a gradient re-allocated after zero_grad(set_to_none=True)).
//
// Cache size: kMaxEntries (64) tables, least recently used evicted.  One entry per (set, update
// variant): an optimizer has a few groups x (device, dtype) sets, and each set may alternate
// between a few kernel variants (ema_every's EMA and non-EMA steps, ema_only steps for frozen
// parameters, teachers), so a handful of entries is typical and 64 keeps several optimizers
// (student and teacher, several models) resident without thrashing, while a lookup stays a
// short linear scan.  An entry costs ~100 bytes per tensor on each side.
//
// Streams and graphs: a buffer is uploaded on the launch's stream and used eagerly only on that
// stream (an eager launch on another stream uploads its own copy), so freeing a replaced buffer
// is ordered after its last use by the caching allocator's per-stream reuse.  Inside a CUDA
// graph capture an upload is refused with a message saying to run one eager step first; a
// capture that finds its table cached records that buffer's address into the graph, so such a
// buffer is never freed afterwards (kept for as long as the process lives: a replay may read it).
//
// Compiled into ema_kernels._C with the CUDA kernels, and (list_tables_emu.cpp) into the
// emulation build, where "device" memory is host memory: the same cache, CPU tensors, no pinning.
#if !defined(EK_WITH_CUDA) && !defined(EK_CUDA_EMULATION)
#error "list_tables.cpp belongs to a build with the CUDA kernels (EK_WITH_CUDA or EK_CUDA_EMULATION)"
#endif

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <stdint.h>
#include <string.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#ifdef EK_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include "kernels.h"

#ifdef EK_CUDA_EMULATION
#define EK_OPS_NS ema_kernels_emu
#else
#define EK_OPS_NS ema_kernels_ext
#endif

namespace ek {
namespace {

constexpr size_t kMaxEntries = 64;

// The message of an upload refused inside a CUDA-graph capture (the wording of the triton
// backend's, ema_kernels/backends/triton/tables.py::_refuse_capture).
constexpr const char* kCaptureRefusal =
    "the cuda backend would upload a list launch's work table inside a CUDA-graph capture "
    "(these tensors' pointers were not seen in an eager launch, or have changed since): run one "
    "eager step() with the same parameters before capturing (it uploads the table; the captured "
    "step reuses it), and capture with capturable=True (its kernels read lr, the step count and "
    "the EMA weights on the device, so a replay uses their current values)";

using Buffer = std::shared_ptr<at::Tensor>;

struct Entry {
  // the key
  int device = 0;
  const void* variant = nullptr;
  const void* set = nullptr;
  size_t head_bytes = 0;
  int64_t chunk = 0;
  // the cached table
  std::vector<unsigned char> head;  // the entries last uploaded, compared with each request's
  Buffer table;                     // their device copy, then the chunk map
  void* stream = nullptr;           // the stream it was uploaded on
  uint64_t last_use = 0;
  bool captured = false;            // read by a graph capture: never free it
};

struct Cache {
  std::mutex mutex;
  std::vector<Entry> entries;
  std::vector<Buffer> graph_tables;  // replaced or evicted tables a captured graph may read
  uint64_t clock = 0;
  std::atomic<int64_t> uploads{0}, hits{0}, refusals{0};
};

// Never destroyed: freeing device memory from a static destructor may run after the CUDA
// runtime has shut down.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

bool same_key(const Entry& e, const ListTableRequest& q) {
  return e.device == q.device && e.variant == q.variant && e.set == q.set &&
         e.head_bytes == q.head_bytes && e.chunk == q.chunk;
}

// Is the launch's stream capturing a CUDA graph?  (The emulation has no graphs.)
const char* capturing(void* stream, bool* yes) {
  *yes = false;
#ifdef EK_WITH_CUDA
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(static_cast<cudaStream_t>(stream), &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return "cudaStreamIsCapturing failed on the launch's stream";
  }
  *yes = status != cudaStreamCaptureStatusNone;
#else
  (void)stream;
#endif
  return nullptr;
}

// A retired table: freed, unless a captured graph may still read it.
void retire(Cache& c, Entry& e) {
  if (e.captured && e.table) c.graph_tables.push_back(std::move(e.table));
  e.table.reset();
  e.captured = false;
}

// The entry a missing key takes: a free slot, else the least recently used one.
Entry& slot_for(Cache& c) {
  if (c.entries.size() < kMaxEntries) {
    c.entries.emplace_back();
    return c.entries.back();
  }
  Entry* lru = &c.entries[0];
  for (Entry& e : c.entries)
    if (e.last_use < lru->last_use) lru = &e;
  retire(c, *lru);
  return *lru;
}

// The staging buffer (pinned host memory on a GPU) and the device buffer, and the copy.
Buffer upload(const ListTableRequest& q) {
  const int64_t bytes = int64_t(q.head_bytes + q.tail_bytes);
  at::TensorOptions host = at::TensorOptions().dtype(at::kByte);
#ifdef EK_WITH_CUDA
  // the launch's stream current for the allocation and the copy (the callers launch on the
  // current stream: then it is torch's own stream object, else the one the caller named)
  const c10::cuda::CUDAGuard device(q.device);
  std::optional<c10::cuda::CUDAStreamGuard> stream;
  if (c10::cuda::getCurrentCUDAStream(q.device).stream() != static_cast<cudaStream_t>(q.stream))
    stream.emplace(
        c10::cuda::getStreamFromExternal(static_cast<cudaStream_t>(q.stream), q.device));
  host = host.pinned_memory(true);
  const at::TensorOptions dev = at::TensorOptions().dtype(at::kByte).device(at::kCUDA, q.device);
#else
  const at::TensorOptions dev = at::TensorOptions().dtype(at::kByte);
#endif
  at::Tensor staging = at::empty({bytes}, host);
  unsigned char* h = static_cast<unsigned char*>(staging.data_ptr());
  memcpy(h, q.head, q.head_bytes);
  q.fill_tail(h + q.head_bytes, q.ctx);
  Buffer table = std::make_shared<at::Tensor>(at::empty({bytes}, dev));
  // non_blocking from pinned memory: an async copy on the current (= the launch's) stream; the
  // host allocator records it and reuses `staging` only after it has run
  table->copy_(staging, /*non_blocking=*/true);
  return table;
}

ListTableAnswer answer(const Entry& e, bool uploaded) {
  ListTableAnswer a;
  a.table = e.table->data_ptr();
  a.keep = e.table;
  a.uploaded = uploaded;
  return a;
}

ListTableAnswer provide(const ListTableRequest& q) {
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  bool in_capture = false;
  if (const char* err = capturing(q.stream, &in_capture)) {
    ListTableAnswer a;
    a.error = err;
    return a;
  }
  ++c.clock;
  Entry* e = nullptr;
  for (Entry& x : c.entries)
    if (same_key(x, q)) {
      e = &x;
      break;
    }
  if (e != nullptr && e->table && (in_capture || e->stream == q.stream) &&
      memcmp(e->head.data(), q.head, q.head_bytes) == 0) {
    e->last_use = c.clock;
    e->captured = e->captured || in_capture;
    c.hits.fetch_add(1, std::memory_order_relaxed);
    return answer(*e, false);
  }
  if (in_capture) {
    c.refusals.fetch_add(1, std::memory_order_relaxed);
    ListTableAnswer a;
    a.error = kCaptureRefusal;
    return a;
  }
  Buffer table = upload(q);  // may throw (out of memory): the cache is unchanged then
  if (e == nullptr) {
    e = &slot_for(c);
  } else {
    retire(c, *e);
  }
  e->device = q.device;
  e->variant = q.variant;
  e->set = q.set;
  e->head_bytes = q.head_bytes;
  e->chunk = q.chunk;
  e->head.assign(static_cast<const unsigned char*>(q.head),
                 static_cast<const unsigned char*>(q.head) + q.head_bytes);
  e->table = std::move(table);
  e->stream = q.stream;
  e->last_use = c.clock;
  e->captured = false;
  c.uploads.fetch_add(1, std::memory_order_relaxed);
  return answer(*e, true);
}

// Registered before any op can run (a static initialiser of the extension library).
const bool g_registered = [] {
  set_list_table_provider(&provide);
  return true;
}();

// list_table_stats() -> [uploads, hits, refusals, cached entries, tables kept for graphs,
// capacity]: the cache's counters since the library was loaded (tests, and a check on a GPU
// that a steady-state step uploads nothing).
std::vector<int64_t> list_table_stats() {
  Cache& c = cache();
  const std::lock_guard<std::mutex> lock(c.mutex);
  return {c.uploads.load(), c.hits.load(), c.refusals.load(), int64_t(c.entries.size()),
          int64_t(c.graph_tables.size()), int64_t(kMaxEntries)};
}

}  // namespace
}  // namespace ek

#define EK_TORCH_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

EK_TORCH_LIBRARY_FRAGMENT(EK_OPS_NS, m) {
  m.def("list_table_stats() -> int[]", &ek::list_table_stats);
}
