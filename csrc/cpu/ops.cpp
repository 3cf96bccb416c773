// CPU implementations of the mpvg:: custom ops (schemas defined in mpvg_kernels/ops/layer_norm.py) and the
// Python module mpvg_kernels.ops._C that registers them when imported.
//
//   layer_norm_add(x, pe?, weight, bias, eps)            -> (y [B,N,D], stats [2*B*N]: mean, then rstd)
//   layer_norm_pool(x, pe?, weight, bias, eps)           -> (y [B,D],   stats [2*B*N])
//   layer_norm_{add,pool}_backward(grad, x, weight, stats, has_pe) -> (dx, dpe, dweight, dbias)
//
// This file does the tensor work (argument checks, parameter casts, output allocation), splits the
// rows into work units (forward) or chunks (backward), runs them with at::parallel_for and reduces
// the per-chunk partials. The arithmetic is in kernels_impl.h, compiled once per CPU capability; the
// table of kernels for the CPU at hand is picked at first use (best_cap(): the widest instruction
// set that this build has, the CPU supports, and torch's own ATEN_CPU_CAPABILITY and
// MPVG_CPU_CAPABILITY allow).
//
// Determinism: forward rows are independent, so any split gives the same bits. Backward gradients
// that sum over rows (dweight, dbias, dpe) are summed per chunk and then across chunks in chunk
// order; the chunks are a function of (B, N, D) only, never of the thread count, so gradients are
// bitwise identical run to run and for any torch.set_num_threads().
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace mpvg::cpu {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------- kernel table selection

enum class Cap : int { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

const char* cap_name(Cap c) {
  switch (c) {
    case Cap::kAVX512:
      return "AVX512";
    case Cap::kAVX2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

const KernelTable* table_for(Cap c) {
  switch (c) {
    case Cap::kAVX512:
      return kernels_AVX512();
    case Cap::kAVX2:
      return kernels_AVX2();
    default:
      return kernels_DEFAULT();
  }
}

std::optional<Cap> parse_cap(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  if (s == "DEFAULT") return Cap::kDefault;
  if (s == "AVX2") return Cap::kAVX2;
  if (s == "AVX512") return Cap::kAVX512;
  return std::nullopt;
}

// Does this CPU (and OS) run the instructions the capability's unit was compiled for?
bool cpu_supports(Cap c) {
  if (c == Cap::kDefault) return true;
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  if (c == Cap::kAVX2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// Is the capability usable here: compiled into this build and supported by the CPU?
bool usable(Cap c) { return table_for(c) != nullptr && cpu_supports(c); }

// The best usable capability, capped by torch's own choice (which honours ATEN_CPU_CAPABILITY) and by
// MPVG_CPU_CAPABILITY=default|avx2|avx512 when set.
Cap best_cap() {
  Cap limit = Cap::kAVX512;
  const std::string torch_cap = at::get_cpu_capability();
  if (torch_cap.find("AVX512") == std::string::npos) {
    limit = torch_cap.find("AVX2") != std::string::npos ? Cap::kAVX2 : Cap::kDefault;
  }
  if (const char* env = std::getenv("MPVG_CPU_CAPABILITY")) {
    if (auto c = parse_cap(env)) limit = std::min(limit, *c);
  }
  for (int c = static_cast<int>(limit); c > 0; --c) {
    if (usable(static_cast<Cap>(c))) return static_cast<Cap>(c);
  }
  return Cap::kDefault;
}

std::atomic<int> g_cap{-1};

Cap current_cap() {
  int c = g_cap.load(std::memory_order_acquire);
  if (c < 0) {
    c = static_cast<int>(best_cap());
    g_cap.store(c, std::memory_order_release);
  }
  return static_cast<Cap>(c);
}

const KernelTable& kernels() { return *table_for(current_cap()); }

// ------------------------------------------------------------------------------------ helpers

// Tuning parameters. Fixed in normal use; _C._tune() changes them for benchmarks and tests. The backward
// chunk geometry (and so the exact bits of dweight/dbias/dpe) is a function of the shape and of these.
struct Tuning {
  int64_t grain_elems = 32768;   // ~elements of x per forward work unit
  int64_t chunk_elems = 262144;  // ~elements of x per backward chunk
  int64_t max_chunks = 64;       // backward chunks at most (the most threads a call uses)
  int64_t pe_block_b = 16;       // backward with pe: samples per b-block at least
  int64_t min_run = 64;          // backward: tokens per n-block at least (unless N is smaller)
};
Tuning g_tune;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int dtype_index(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return kF32;
    case at::kDouble:
      return kF64;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      TORCH_CHECK(false, op, ": x has dtype ", t, "; supported: float32, float64, bfloat16, float16");
  }
  return kF32;  // unreachable
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D [B, N, D], got shape ", x.sizes());
  TORCH_CHECK(x.size(2) > 0, op, ": x must have D > 0, got shape ", x.sizes());
  TORCH_CHECK(x.stride(2) == 1 || x.size(2) == 1 || x.numel() == 0, op,
              ": x must have stride 1 in its last dim, got strides ", x.strides());
  dtype_index(x.scalar_type(), op);
}

void check_float(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
}

// A [D] parameter as a contiguous acc-dtype tensor (no copy when it already is one).
Tensor param(const Tensor& t, int64_t D, at::ScalarType acc, const char* name, const char* op) {
  check_float(t, name, op);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == D, op, ": ", name, " must have shape [", D, "], got ",
              t.sizes());
  return t.to(acc).contiguous();
}

// pe ([N, D] or anything with N * D elements ending in D) as a contiguous acc [N, D] tensor.
Tensor pe_param(const Tensor& pe, int64_t N, int64_t D, at::ScalarType acc, const char* op) {
  check_float(pe, "pe", op);
  TORCH_CHECK(pe.numel() == N * D && pe.dim() >= 1 && pe.size(-1) == D, op, ": pe must have shape [",
              N, ", ", D, "], got ", pe.sizes());
  return pe.to(acc).contiguous().view({N, D});
}

// 64-byte aligned scratch for one kernel call.
class Scratch {
 public:
  explicit Scratch(int64_t D) : buf_(scratch_bytes(D) / sizeof(double) + 16) {}
  void* get() {
    auto p = reinterpret_cast<std::uintptr_t>(buf_.data());
    return reinterpret_cast<void*>((p + 63) & ~static_cast<std::uintptr_t>(63));
  }

 private:
  std::vector<double> buf_;
};

// ------------------------------------------------------------------------------------ forward

// The fields both forward ops fill the same way; the caller sets pe / pe_mean and the work split.
FwdParams fwd_params(const Tensor& x, const Tensor& w, const Tensor& b, double eps, Tensor& y, Tensor& mean,
                     Tensor& rstd) {
  FwdParams p{};
  p.x = x.const_data_ptr();
  p.B = x.size(0);
  p.N = x.size(1);
  p.D = x.size(2);
  p.sxb = x.stride(0);
  p.sxn = x.stride(1);
  p.w = w.const_data_ptr();
  p.b = b.const_data_ptr();
  p.eps = eps;
  p.y = y.mutable_data_ptr();
  p.mean = mean.mutable_data_ptr();
  p.rstd = rstd.mutable_data_ptr();
  return p;
}

std::tuple<Tensor, Tensor> layer_norm_add_cpu(const Tensor& x, const std::optional<Tensor>& pe,
                                              const Tensor& weight, const Tensor& bias, double eps) {
  const char* op = "mpvg::layer_norm_add";
  check_x(x, op);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), R = B * N;
  const auto acc = acc_of(x.scalar_type());
  const Tensor w = param(weight, D, acc, "weight", op);
  const Tensor b = param(bias, D, acc, "bias", op);
  Tensor pe_acc;  // [N, D] acc; the kernel adds bias + pe[n] per token (no [N, D] temporary per call)
  if (pe.has_value()) pe_acc = pe_param(*pe, N, D, acc, op);

  Tensor y = at::empty({B, N, D}, x.options());
  Tensor stats = at::empty({2 * R}, x.options().dtype(acc));
  Tensor mean = stats.narrow(0, 0, R), rstd = stats.narrow(0, R, R);
  if (R == 0) return {y, stats};

  FwdParams p = fwd_params(x, w, b, eps, y, mean, rstd);
  p.pe = pe_acc.defined() ? pe_acc.const_data_ptr() : nullptr;
  p.pe_mean = nullptr;
  // work units: a pair of samples x an n-block, about grain_elems elements each
  const int64_t unit_rows = std::max<int64_t>(2, g_tune.grain_elems / D);
  p.kn = std::clamp<int64_t>(ceil_div(2 * N, unit_rows), 1, N);
  p.nb = ceil_div(N, p.kn);
  p.kn = ceil_div(N, p.nb);
  const AddFwdFn fn = kernels().add_fwd[dtype_index(x.scalar_type(), op)];
  at::parallel_for(0, ceil_div(B, 2) * p.kn, 1, [&](int64_t u0, int64_t u1) {
    Scratch s(D);
    fn(p, u0, u1, s.get());
  });
  return {y, stats};
}

// out[j] = mean over rows n of a[n, j], summed in row order.
template <typename A>
void column_mean(const A* a, int64_t N, int64_t D, A* out) {
  std::fill(out, out + D, A(0));
  for (int64_t n = 0; n < N; ++n) {
    const A* row = a + n * D;
    for (int64_t j = 0; j < D; ++j) out[j] += row[j];
  }
  for (int64_t j = 0; j < D; ++j) out[j] /= static_cast<A>(N);
}

std::tuple<Tensor, Tensor> layer_norm_pool_cpu(const Tensor& x, const std::optional<Tensor>& pe,
                                               const Tensor& weight, const Tensor& bias, double eps) {
  const char* op = "mpvg::layer_norm_pool";
  check_x(x, op);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), R = B * N;
  const auto acc = acc_of(x.scalar_type());
  const Tensor w = param(weight, D, acc, "weight", op);
  const Tensor b = param(bias, D, acc, "bias", op);
  Tensor pe_mean;
  if (pe.has_value()) {
    const Tensor pe_acc = pe_param(*pe, N, D, acc, op);
    pe_mean = at::empty({D}, x.options().dtype(acc));
    if (N > 0) {
      if (acc == at::kDouble) {
        column_mean(pe_acc.const_data_ptr<double>(), N, D, pe_mean.mutable_data_ptr<double>());
      } else {
        column_mean(pe_acc.const_data_ptr<float>(), N, D, pe_mean.mutable_data_ptr<float>());
      }
    }
  }

  Tensor y = at::empty({B, D}, x.options());
  Tensor stats = at::empty({2 * R}, x.options().dtype(acc));
  Tensor mean = stats.narrow(0, 0, R), rstd = stats.narrow(0, R, R);
  if (B == 0) return {y, stats};
  if (N == 0) {  // the mean over no tokens: zeros, as the reference kernel defines it
    y.zero_();
    return {y, stats};
  }

  FwdParams p = fwd_params(x, w, b, eps, y, mean, rstd);
  p.pe = nullptr;
  p.pe_mean = pe_mean.defined() ? pe_mean.const_data_ptr() : nullptr;
  const PoolFwdFn fn = kernels().pool_fwd[dtype_index(x.scalar_type(), op)];
  at::parallel_for(0, B, std::max<int64_t>(1, g_tune.grain_elems / (N * D)), [&](int64_t b0, int64_t b1) {
    Scratch s(D);
    fn(p, b0, b1, s.get());
  });
  return {y, stats};
}

// ----------------------------------------------------------------------------------- backward

// How the B * N rows are cut into backward chunks: b-blocks x n-blocks, a function of the shape (and
// of the tuning), never of the thread count.
struct ChunkPlan {
  int64_t count = 0;
  int64_t kb = 1, kn = 1;  // b-blocks x n-blocks
  int64_t bb = 1, nb = 1;  // their sizes

  BwdChunk chunk(int64_t c, int64_t B, int64_t N) const {
    BwdChunk k{};
    const int64_t ib = c / kn, in = c % kn;
    k.b0 = ib * bb;
    k.b1 = std::min(B, k.b0 + bb);
    k.n0 = in * nb;
    k.n1 = std::min(N, k.n0 + nb);
    return k;
  }
};

// About `target` chunks of chunk_elems elements each, at most max_chunks. Chunks split b first:
// each pair of samples is then processed over a long run of tokens, which streams best. With a pe,
// every b-block carries its own [N, D] dpe partial (summed in reduce_partials), so b-blocks hold at
// least pe_block_b samples. n-blocks make up the count when b alone cannot, keeping runs of at least
// min_run tokens.
ChunkPlan plan_chunks(int64_t B, int64_t N, int64_t D, bool has_dpe) {
  const int64_t target = std::clamp<int64_t>(ceil_div(B * N * D, g_tune.chunk_elems), 1, g_tune.max_chunks);
  ChunkPlan plan;
  plan.kb = std::clamp<int64_t>(std::min(target, ceil_div(B, has_dpe ? g_tune.pe_block_b : 2)), 1, B);
  plan.bb = ceil_div(B, plan.kb);
  plan.bb += plan.bb % 2 != 0 && plan.bb < B ? 1 : 0;  // whole pairs of samples per block
  plan.kb = ceil_div(B, plan.bb);
  plan.kn = std::clamp<int64_t>(ceil_div(target, plan.kb), 1, std::max<int64_t>(1, N / g_tune.min_run));
  plan.nb = ceil_div(N, plan.kn);
  plan.kn = ceil_div(N, plan.nb);
  plan.count = plan.kb * plan.kn;
  return plan;
}

// dst[j] = sum over k of src[k * stride + j], k = 0..K-1 in order.
template <typename A>
void sum_rows(const A* src, int64_t K, int64_t stride, int64_t D, A* dst) {
  std::copy(src, src + D, dst);
  for (int64_t k = 1; k < K; ++k) {
    const A* row = src + k * stride;
    for (int64_t j = 0; j < D; ++j) dst[j] += row[j];
  }
}

template <typename A>
void reduce_partials(const ChunkPlan& plan, bool pool, bool has_pe, int64_t B, int64_t N, int64_t D,
                     const Tensor& dw_part, const Tensor& db_part, const Tensor& dpe_part,
                     const Tensor& g, Tensor& dw, Tensor& db, Tensor& dpe) {
  sum_rows(dw_part.const_data_ptr<A>(), plan.count, D, D, dw.mutable_data_ptr<A>());
  A* dbp = db.mutable_data_ptr<A>();
  if (pool) {
    // dy[b, n] = g[b] for every n: dpe[n] = sum_b g[b], db = N * sum_b g[b].
    std::vector<A> s(D);
    sum_rows(g.const_data_ptr<A>(), B, D, D, s.data());
    for (int64_t j = 0; j < D; ++j) dbp[j] = static_cast<A>(N) * s[j];
    if (has_pe) {
      A* dpep = dpe.mutable_data_ptr<A>();
      for (int64_t n = 0; n < N; ++n) std::copy(s.begin(), s.end(), dpep + n * D);
    }
  } else if (has_pe) {
    A* dpep = dpe.mutable_data_ptr<A>();
    if (plan.kb > 1) {  // each element summed over the b-blocks in order: any split over n is exact
      const A* part = dpe_part.const_data_ptr<A>();
      at::parallel_for(0, N, std::max<int64_t>(1, 8192 / D), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) sum_rows(part + n * D, plan.kb, N * D, D, dpep + n * D);
      });
    }
    sum_rows(dpep, N, D, D, dbp);  // db = sum_n dpe[n]
  } else {
    sum_rows(db_part.const_data_ptr<A>(), plan.count, D, D, dbp);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad, const Tensor& x,
                                                        const Tensor& weight, const Tensor& stats, bool has_pe,
                                                        bool pool) {
  const char* op = pool ? "mpvg::layer_norm_pool_backward" : "mpvg::layer_norm_add_backward";
  check_x(x, op);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), R = B * N;
  const auto acc = acc_of(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
  check_float(grad, "grad", op);
  if (pool) {
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == D, op, ": grad must have shape [",
                B, ", ", D, "], got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == N && grad.size(2) == D, op,
                ": grad must have shape [", B, ", ", N, ", ", D, "], got ", grad.sizes());
  }
  check_float(stats, "stats", op);
  TORCH_CHECK(stats.dim() == 1 && stats.numel() == 2 * R, op, ": stats must be 1-D with 2 * B * N = ", 2 * R,
              " elements (mean, then rstd), got shape ", stats.sizes());
  const Tensor w = param(weight, D, acc, "weight", op);

  Tensor dx = at::empty({B, N, D}, x.options());
  Tensor dpe = has_pe ? at::empty({N, D}, acc_opts) : at::empty({0}, acc_opts);
  Tensor dw = at::empty({D}, acc_opts);
  Tensor db = at::empty({D}, acc_opts);
  if (R == 0) {
    dw.zero_();
    db.zero_();
    dpe.zero_();
    return {dx, dpe, dw, db};
  }

  const Tensor stats_c = stats.to(acc).contiguous();
  const Tensor mean_c = stats_c.narrow(0, 0, R), rstd_c = stats_c.narrow(0, R, R);
  // pool: every token of sample b receives grad[b] / N (kept as [B, D], never expanded).
  const Tensor g = pool ? grad.to(acc).contiguous().div(static_cast<double>(N))
                        : grad.to(x.scalar_type()).contiguous();

  const bool has_dpe = !pool && has_pe;
  const ChunkPlan plan = plan_chunks(B, N, D, has_dpe);
  Tensor dw_part = at::empty({plan.count, D}, acc_opts);
  Tensor db_part = (!pool && !has_pe) ? at::empty({plan.count, D}, acc_opts) : Tensor();
  Tensor dpe_part = (has_dpe && plan.kb > 1) ? at::empty({plan.kb, N, D}, acc_opts) : Tensor();

  BwdParams p{};
  p.dy = g.const_data_ptr();
  p.x = x.const_data_ptr();
  p.B = B;
  p.N = N;
  p.D = D;
  p.sxb = x.stride(0);
  p.sxn = x.stride(1);
  p.w = w.const_data_ptr();
  p.mean = mean_c.const_data_ptr();
  p.rstd = rstd_c.const_data_ptr();
  p.dx = dx.mutable_data_ptr();
  p.pool = pool;

  const size_t acc_size = acc == at::kDouble ? sizeof(double) : sizeof(float);
  char* dw_base = static_cast<char*>(dw_part.mutable_data_ptr());
  char* db_base = db_part.defined() ? static_cast<char*>(db_part.mutable_data_ptr()) : nullptr;
  char* dpe_base =
      has_dpe ? static_cast<char*>(plan.kb > 1 ? dpe_part.mutable_data_ptr() : dpe.mutable_data_ptr()) : nullptr;
  const BwdFn fn = kernels().bwd[dtype_index(x.scalar_type(), op)];
  at::parallel_for(0, plan.count, 1, [&](int64_t c0, int64_t c1) {
    Scratch s(D);
    for (int64_t c = c0; c < c1; ++c) {
      BwdChunk k = plan.chunk(c, B, N);
      k.dw = dw_base + static_cast<size_t>(c * D) * acc_size;
      k.db = db_base ? db_base + static_cast<size_t>(c * D) * acc_size : nullptr;
      k.dpe = dpe_base ? dpe_base + static_cast<size_t>((c / plan.kn) * N * D) * acc_size : nullptr;
      fn(p, k, s.get());
    }
  });

  if (acc == at::kDouble) {
    reduce_partials<double>(plan, pool, has_pe, B, N, D, dw_part, db_part, dpe_part, g, dw, db, dpe);
  } else {
    reduce_partials<float>(plan, pool, has_pe, B, N, D, dw_part, db_part, dpe_part, g, dw, db, dpe);
  }
  return {dx, dpe, dw, db};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_add_backward_cpu(const Tensor& grad, const Tensor& x,
                                                                       const Tensor& weight, const Tensor& stats,
                                                                       bool has_pe) {
  return backward_cpu(grad, x, weight, stats, has_pe, /*pool=*/false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_pool_backward_cpu(const Tensor& grad, const Tensor& x,
                                                                        const Tensor& weight, const Tensor& stats,
                                                                        bool has_pe) {
  return backward_cpu(grad, x, weight, stats, has_pe, /*pool=*/true);
}

}  // namespace

// ------------------------------------------------------------------------ Python-facing helpers

std::string capability() { return cap_name(current_cap()); }

std::vector<std::string> capabilities() {
  std::vector<std::string> out;
  for (Cap c : {Cap::kDefault, Cap::kAVX2, Cap::kAVX512}) {
    if (usable(c)) out.emplace_back(cap_name(c));
  }
  return out;
}

std::string set_capability(const std::string& name) {
  const auto c = parse_cap(name);
  TORCH_CHECK_VALUE(c.has_value(), "unknown CPU capability '", name, "'; choose DEFAULT, AVX2 or AVX512");
  TORCH_CHECK_VALUE(usable(*c), "CPU capability ", cap_name(*c),
                    " is not usable here (not built, or not supported by this CPU)");
  const std::string old = capability();
  g_cap.store(static_cast<int>(*c), std::memory_order_release);
  return old;
}

int64_t tune(const std::string& name, int64_t value) {
  int64_t* field = nullptr;
  if (name == "grain_elems") field = &g_tune.grain_elems;
  if (name == "chunk_elems") field = &g_tune.chunk_elems;
  if (name == "max_chunks") field = &g_tune.max_chunks;
  if (name == "pe_block_b") field = &g_tune.pe_block_b;
  if (name == "min_run") field = &g_tune.min_run;
  TORCH_CHECK_VALUE(field != nullptr, "unknown tuning parameter '", name, "'");
  TORCH_CHECK_VALUE(value >= 1, "tuning parameter ", name, " must be >= 1, got ", value);
  const int64_t old = *field;
  *field = value;
  return old;
}

}  // namespace mpvg::cpu

TORCH_LIBRARY_IMPL(mpvg, CPU, m) {
  m.impl("layer_norm_add", TORCH_FN(mpvg::cpu::layer_norm_add_cpu));
  m.impl("layer_norm_add_backward", TORCH_FN(mpvg::cpu::layer_norm_add_backward_cpu));
  m.impl("layer_norm_pool", TORCH_FN(mpvg::cpu::layer_norm_pool_cpu));
  m.impl("layer_norm_pool_backward", TORCH_FN(mpvg::cpu::layer_norm_pool_backward_cpu));
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++ CPU kernels of the mpvg:: ops (registered with the dispatcher on import)";
  m.def("capability", &mpvg::cpu::capability,
        "The instruction set the kernels run with: DEFAULT, AVX2 or AVX512.");
  m.def("capabilities", &mpvg::cpu::capabilities,
        "The instruction sets this build has kernels for and this CPU supports.");
  m.def("set_capability", &mpvg::cpu::set_capability, pybind11::arg("name"),
        "Use the kernels of another usable instruction set (for tests and benchmarks); returns the "
        "previous one.");
  m.def("_tune", &mpvg::cpu::tune, pybind11::arg("name"), pybind11::arg("value"),
        "Set a tuning parameter of the kernels (grain_elems, chunk_elems, max_chunks, pe_block_b, min_run), "
        "for benchmarks and tests; returns the previous value.");
}
