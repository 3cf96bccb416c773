// Interface between the tensor-level CPU ops (ops.cpp) and the vectorized kernels (kernels_impl.h).
//
// The kernels are compiled once per CPU capability (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp), each in its own namespace, and reached only through the KernelTable pointers
// below, which ops.cpp picks at run time for the CPU it runs on. This header is plain C++: no ATen,
// no SIMD types, so every translation unit can include it whatever its target flags.
//
// All pointers are raw and typed by the kernel: "x dtype" is the input dtype (float, double,
// c10::BFloat16, c10::Half); "acc" is the accumulation dtype (double for double x, float otherwise).
#pragma once

#include <cstddef>
#include <cstdint>

namespace mpvg::cpu {

// Index of the x dtype in the KernelTable arrays.
enum DTypeIndex : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3, kNumDTypes = 4 };

// Forward of layer_norm_add (y per token) and layer_norm_pool (y per sample).
struct FwdParams {
  const void* x;  // [B, N, D], x dtype, element strides (sxb, sxn, 1)
  int64_t B, N, D, sxb, sxn;
  const void* w;        // acc [D]
  const void* b;        // acc [D]
  const void* pe;       // add: acc [N, D] contiguous (row n is added with b), or nullptr
  const void* pe_mean;  // pool: acc [D] = mean over n of pe, or nullptr
  double eps;
  void* y;     // add: [B, N, D] contiguous; pool: [B, D]; x dtype
  void* mean;  // acc [B * N]
  void* rstd;  // acc [B * N]
  int64_t nb, kn;  // add: work unit u = samples 2 (u / kn), +1 x tokens [nb (u % kn), + nb)
};

// Backward of both ops. The row (b, n) of dy is dy + (b * N + n) * D in x dtype (add), or
// dy + b * D in acc dtype (pool: dy holds grad / N, shared by the N tokens of a sample).
struct BwdParams {
  const void* dy;
  const void* x;  // as in FwdParams
  int64_t B, N, D, sxb, sxn;
  const void* w;     // acc [D]
  const void* mean;  // acc [B * N]
  const void* rstd;  // acc [B * N]
  void* dx;          // [B, N, D] contiguous, x dtype
  bool pool;
};

// One unit of backward work: the rows b in [b0, b1) x n in [n0, n1), visited as pairs of samples
// (b, b + 1), tokens in order within each pair. The kernel overwrites (never accumulates into) the
// partials it is given:
//   dw [D]  = sum over its rows of dy * xhat
//   db [D]  = sum over its rows of dy                                   (when db != nullptr)
//   dpe[n]  = sum over b in [b0, b1) of dy[b, n], n0 <= n < n1, dpe being an [N, D] base (when != nullptr)
// Every sum runs in a fixed order, so the partials depend on the chunk alone, never on the thread.
struct BwdChunk {
  int64_t b0, b1, n0, n1;
  void* dw;
  void* db;
  void* dpe;
};

using AddFwdFn = void (*)(const FwdParams&, int64_t u0, int64_t u1, void* scratch);
using PoolFwdFn = void (*)(const FwdParams&, int64_t b0, int64_t b1, void* scratch);
using BwdFn = void (*)(const BwdParams&, const BwdChunk&, void* scratch);

struct KernelTable {
  const char* name;
  AddFwdFn add_fwd[kNumDTypes];    // work units [u0, u1) (see FwdParams::nb) of y, mean, rstd
  PoolFwdFn pool_fwd[kNumDTypes];  // samples [b0, b1) of y, and their rows of mean, rstd
  BwdFn bwd[kNumDTypes];
};

// Bytes of scratch a kernel call needs for rows of length D (at most 6 acc rows of D + 16).
inline size_t scratch_bytes(int64_t D) {
  return static_cast<size_t>(6 * (D + 16)) * sizeof(double) + 64;
}

// One table per capability; nullptr when this build has no kernels for that capability.
const KernelTable* kernels_DEFAULT();
const KernelTable* kernels_AVX2();
const KernelTable* kernels_AVX512();

}  // namespace mpvg::cpu
