// Block-format matrix products for the engine: XLA FFI handlers that call ggml's CPU kernels.
//
// The weights stay as a GGUF file holds them (rows of blocks: Q4_K, Q8_0, ...). For
// y = x @ W^T with x [M, K] float32 and W [N, row_bytes] uint8, each row of x is quantized
// once to the weight type's dot type (ggml's `vec_dot_type`: Q8_0, Q8_1 or Q8_K), then
// ggml's `vec_dot` for the weight type computes each output. Rows of W are split into
// chunks taken by the calling thread and by tasks on XLA's intra-op thread pool.
//
// ggml is not linked: `enjambre_ggml_load` opens libggml-base and libggml-cpu (the
// `libggml-python` wheel's prebuilt libraries) by path, so a missing or unusable library
// is an error string for Python to report, never a failed import, and the build needs only
// ggml's headers. The same source builds on Linux (x86-64, aarch64) and macOS arm64: the
// SIMD lives in libggml-cpu, built for its platform.

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ggml-cpu.h"
#include "ggml.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using TraitsCpuFn = const ggml_type_traits_cpu* (*)(ggml_type);
using TraitsFn = const ggml_type_traits* (*)(ggml_type);
using RowSizeFn = size_t (*)(ggml_type, int64_t);
using InitFn = void (*)();

TraitsCpuFn traits_cpu = nullptr;
TraitsFn traits = nullptr;
RowSizeFn row_size = nullptr;
std::string load_error = "the ggml libraries were not loaded (enjambre_ggml_load)";
std::mutex load_mutex;

// Rows per chunk of work: small enough to balance two to a few dozen threads, large
// enough that taking a chunk (one atomic add) is noise next to computing it.
constexpr int64_t kMinChunkRows = 16;
// Below this many weight bytes a product runs on the calling thread alone.
constexpr int64_t kParallelBytes = 1 << 16;

// Runs fn(chunk) for chunk in [0, chunks) on the calling thread and up to `helpers` pool
// tasks. A chunk is claimed by an atomic counter; the caller returns once every chunk is
// done. A task that starts late finds no chunk left and returns without touching fn, so
// fn (which refers to the caller's stack) is never called after the caller returns.
struct Chunks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t count = 0;
  std::function<void(int64_t)> fn;

  void drain() {
    for (int64_t c = next.fetch_add(1); c < count; c = next.fetch_add(1)) {
      fn(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void parallel_chunks(ffi::ThreadPool& pool, int64_t chunks, int64_t helpers,
                     std::function<void(int64_t)> fn) {
  auto shared = std::make_shared<Chunks>();
  shared->count = chunks;
  shared->fn = std::move(fn);
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([shared] { shared->drain(); });
  }
  shared->drain();
  while (shared->done.load(std::memory_order_acquire) < chunks) {
    std::this_thread::yield();
  }
}

struct Plan {
  int64_t chunks = 1;
  int64_t rows_per_chunk = 0;
  int64_t helpers = 0;
};

Plan plan(ffi::ThreadPool& pool, int64_t rows, int64_t bytes, int32_t threads) {
  int64_t workers = threads > 0 ? threads : std::max<int64_t>(1, pool.num_threads());
  Plan p;
  p.rows_per_chunk = rows;
  if (workers <= 1 || bytes < kParallelBytes || rows < 2 * kMinChunkRows) return p;
  int64_t chunks = std::min<int64_t>(rows / kMinChunkRows, workers * 4);
  p.rows_per_chunk = (rows + chunks - 1) / chunks;
  p.chunks = (rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
  p.helpers = std::min<int64_t>(workers, p.chunks) - 1;
  return p;
}

ffi::Error check_weight(ggml_type type, int64_t cols, int64_t row_bytes,
                        const ggml_type_traits** tt, const ggml_type_traits_cpu** tc) {
  if (traits_cpu == nullptr) return ffi::Error::Internal(load_error);
  if (type < 0 || type >= GGML_TYPE_COUNT) {
    return ffi::Error::InvalidArgument("unknown ggml type " + std::to_string(type));
  }
  *tt = traits(type);
  *tc = traits_cpu(type);
  if (*tt == nullptr || (*tt)->blck_size <= 0 || (*tt)->to_float == nullptr) {
    return ffi::Error::InvalidArgument("ggml has no kernels for type " + std::to_string(type));
  }
  if (cols <= 0 || cols % (*tt)->blck_size != 0) {
    return ffi::Error::InvalidArgument("a row of " + std::to_string(cols) +
                                       " values is not whole blocks of " +
                                       std::string((*tt)->type_name));
  }
  if (static_cast<int64_t>(row_size(type, cols)) != row_bytes) {
    return ffi::Error::InvalidArgument("row bytes do not match " + std::string((*tt)->type_name));
  }
  return ffi::Error::Success();
}

// One weight matrix of a product: its bytes, rows and kernel, and where its outputs go.
struct Weight {
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t row_bytes = 0;
  ggml_vec_dot_t vec_dot = nullptr;
  ggml_type dot_type = GGML_TYPE_F32;
  const uint8_t* x = nullptr;  // the activations in dot_type, `xrow` bytes per row
  size_t xrow = 0;
  float* out = nullptr;  // [M, rows]
  int64_t first = 0;  // this matrix's first row in the rows of all matrices together
};

ffi::Error describe(ffi::AnyBuffer::Dimensions wd, int32_t type_id, int64_t cols, Weight* w) {
  if (wd.size() != 2) return ffi::Error::InvalidArgument("w must be 2-D");
  w->rows = wd[0];
  w->row_bytes = wd[1];
  const auto type = static_cast<ggml_type>(type_id);
  const ggml_type_traits* tt = nullptr;
  const ggml_type_traits_cpu* tc = nullptr;
  if (auto err = check_weight(type, cols, w->row_bytes, &tt, &tc); err.failure()) return err;
  if (tc == nullptr || tc->vec_dot == nullptr) {
    return ffi::Error::InvalidArgument("ggml has no dot kernel for " + std::string(tt->type_name));
  }
  w->vec_dot = tc->vec_dot;
  w->dot_type = tc->vec_dot_type;
  return ffi::Error::Success();
}

// y_i [M, N_i] = x [M, K] @ W_i^T for every matrix: x is quantized once per dot type (q, k
// and v, or gate and up, share it), and the rows of all matrices are split together.
ffi::Error products(ffi::ThreadPool& pool, const float* xs, int64_t m, int64_t cols,
                    std::vector<Weight>& ws, int32_t threads) {
  std::vector<std::pair<ggml_type, std::vector<uint8_t>>> quantized;
  int64_t total_rows = 0, total_bytes = 0;
  for (Weight& w : ws) {
    w.first = total_rows;
    total_rows += w.rows;
    total_bytes += w.rows * w.row_bytes;
    if (w.dot_type == GGML_TYPE_F32) {
      w.x = reinterpret_cast<const uint8_t*>(xs);
      w.xrow = static_cast<size_t>(cols) * sizeof(float);
      continue;
    }
    w.xrow = row_size(w.dot_type, cols);
    auto found = std::find_if(quantized.begin(), quantized.end(),
                              [&](const auto& q) { return q.first == w.dot_type; });
    if (found == quantized.end()) {
      const ggml_type_traits_cpu* dc = traits_cpu(w.dot_type);
      if (dc == nullptr || dc->from_float == nullptr) {
        return ffi::Error::InvalidArgument("ggml cannot quantize activations to type " +
                                           std::to_string(w.dot_type));
      }
      std::vector<uint8_t> buf(w.xrow * static_cast<size_t>(m));
      for (int64_t j = 0; j < m; ++j) dc->from_float(xs + j * cols, buf.data() + j * w.xrow, cols);
      quantized.emplace_back(w.dot_type, std::move(buf));
      found = std::prev(quantized.end());
    }
    w.x = found->second.data();
  }
  const Plan p = plan(pool, total_rows, total_bytes, threads);
  auto work = [&](int64_t c) {
    const int64_t r0 = c * p.rows_per_chunk, r1 = std::min(total_rows, r0 + p.rows_per_chunk);
    for (const Weight& w : ws) {
      const int64_t a = std::max(r0, w.first), b = std::min(r1, w.first + w.rows);
      for (int64_t r = a; r < b; ++r) {
        const int64_t row = r - w.first;
        const uint8_t* wr = w.data + row * w.row_bytes;
        for (int64_t j = 0; j < m; ++j) {
          w.vec_dot(static_cast<int>(cols), w.out + j * w.rows + row, 0, wr, 0, w.x + j * w.xrow, 0, 1);
        }
      }
    }
  };
  if (p.chunks == 1) {
    work(0);
  } else {
    parallel_chunks(pool, p.chunks, p.helpers, work);
  }
  return ffi::Error::Success();
}

// y [M, N] = x [M, K] @ W^T, W [N, row_bytes] in `type` holding K values per row.
ffi::Error MatMulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F32> x,
                      ffi::ResultBuffer<ffi::F32> y, int32_t type_id, int32_t threads) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D");
  std::vector<Weight> ws(1);
  if (auto err = describe(w.dimensions(), type_id, xd[1], &ws[0]); err.failure()) return err;
  auto yd = y->dimensions();
  if (yd.size() != 2 || yd[0] != xd[0] || yd[1] != ws[0].rows) {
    return ffi::Error::InvalidArgument("y must be [M, N]");
  }
  ws[0].data = w.typed_data();
  ws[0].out = y->typed_data();
  return products(pool, x.typed_data(), xd[0], xd[1], ws, threads);
}

// y_i = x @ W_i^T for several matrices of the same input (q/k/v, gate/up).
ffi::Error MatMulManyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                          ffi::RemainingRets rets, ffi::Span<const int32_t> types, int32_t threads) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("x must be 2-D");
  const size_t n = args.size();
  if (n == 0 || rets.size() != n || types.size() != n) {
    return ffi::Error::InvalidArgument("one type and one result per weight matrix");
  }
  std::vector<Weight> ws(n);
  for (size_t i = 0; i < n; ++i) {
    auto w = args.get<ffi::Buffer<ffi::U8>>(i);
    auto y = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (w.has_error()) return w.error();
    if (y.has_error()) return y.error();
    if (auto err = describe(w->dimensions(), types[i], xd[1], &ws[i]); err.failure()) return err;
    auto yd = (*y)->dimensions();
    if (yd.size() != 2 || yd[0] != xd[0] || yd[1] != ws[i].rows) {
      return ffi::Error::InvalidArgument("each y must be [M, N]");
    }
    ws[i].data = w->typed_data();
    ws[i].out = (*y)->typed_data();
  }
  return products(pool, x.typed_data(), xd[0], xd[1], ws, threads);
}

// out [N, K] float32 = W [N, row_bytes] in `type`, dequantized by ggml's own to_float.
ffi::Error DequantizeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> w,
                          ffi::ResultBuffer<ffi::F32> out, int32_t type_id, int32_t threads) {
  auto wd = w.dimensions();
  auto od = out->dimensions();
  if (wd.size() != 2 || od.size() != 2 || od[0] != wd[0]) {
    return ffi::Error::InvalidArgument("w must be [N, row_bytes] and out [N, K]");
  }
  const int64_t rows = wd[0], row_bytes = wd[1], cols = od[1];
  const auto type = static_cast<ggml_type>(type_id);
  const ggml_type_traits* tt = nullptr;
  const ggml_type_traits_cpu* tc = nullptr;
  if (auto err = check_weight(type, cols, row_bytes, &tt, &tc); err.failure()) return err;
  const auto to_float = tt->to_float;
  const uint8_t* wp = w.typed_data();
  float* op = out->typed_data();
  const Plan p = plan(pool, rows, rows * row_bytes, threads);
  auto work = [&](int64_t c) {
    const int64_t r0 = c * p.rows_per_chunk, r1 = std::min(rows, r0 + p.rows_per_chunk);
    if (r1 > r0) to_float(wp + r0 * row_bytes, op + r0 * cols, (r1 - r0) * cols);
  };
  if (p.chunks == 1) {
    work(0);
  } else {
    parallel_chunks(pool, p.chunks, p.helpers, work);
  }
  return ffi::Error::Success();
}

}  // namespace

// Opens ggml's libraries by path and initialises its CPU tables. Returns null on success,
// else why not (the string stays valid). Safe to call more than once.
extern "C" const char* enjambre_ggml_load(const char* base_path, const char* cpu_path) {
  std::lock_guard<std::mutex> lock(load_mutex);
  if (traits_cpu != nullptr) return nullptr;
  void* base = dlopen(base_path, RTLD_NOW | RTLD_GLOBAL);
  if (base == nullptr) return (load_error = dlerror()).c_str();
  void* cpu = dlopen(cpu_path, RTLD_NOW | RTLD_LOCAL);
  if (cpu == nullptr) return (load_error = dlerror()).c_str();
  auto init = reinterpret_cast<InitFn>(dlsym(cpu, "ggml_cpu_init"));
  auto tcpu = reinterpret_cast<TraitsCpuFn>(dlsym(cpu, "ggml_get_type_traits_cpu"));
  auto tbase = reinterpret_cast<TraitsFn>(dlsym(base, "ggml_get_type_traits"));
  auto rsize = reinterpret_cast<RowSizeFn>(dlsym(base, "ggml_row_size"));
  if (init == nullptr || tcpu == nullptr || tbase == nullptr || rsize == nullptr) {
    return (load_error = "the ggml libraries lack the CPU type traits").c_str();
  }
  init();
  traits = tbase;
  row_size = rsize;
  traits_cpu = tcpu;
  return nullptr;
}

// The dot type ggml quantizes activations to for a weight type (-1 if none): tests use it.
extern "C" int enjambre_ggml_dot_type(int type_id) {
  if (traits_cpu == nullptr || type_id < 0 || type_id >= GGML_TYPE_COUNT) return -1;
  const ggml_type_traits_cpu* tc = traits_cpu(static_cast<ggml_type>(type_id));
  return (tc == nullptr || tc->vec_dot == nullptr) ? -1 : static_cast<int>(tc->vec_dot_type);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(EnjambreGgmlMatMul, MatMulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("ggml_type")
                                  .Attr<int32_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EnjambreGgmlMatMulMany, MatMulManyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int32_t>>("ggml_types")
                                  .Attr<int32_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EnjambreGgmlDequantize, DequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("ggml_type")
                                  .Attr<int32_t>("threads"));
