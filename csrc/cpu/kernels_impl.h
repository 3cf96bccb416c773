// The vectorized CPU kernels of layer_norm_add / layer_norm_pool, forward and backward.
//
// Included by exactly one translation unit per CPU capability (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp). That unit first defines CPU_CAPABILITY (DEFAULT, AVX2, AVX512) and
// CPU_CAPABILITY_<X>, which select ATen's at::vec::Vectorized implementation, and sets the matching
// target flags. Everything here lives in mpvg::cpu::<CPU_CAPABILITY>::{anonymous}, so the copies of
// these templates built for different instruction sets never share a symbol, and the only names a
// unit exports are its kernels_<CAPABILITY>() table accessor.
//
// No static data with a dynamic initializer may appear here: it would run at load time, before
// ops.cpp has checked that the CPU supports this unit's instruction set. (The one initializer these
// units do carry is libstdc++'s std::ios_base::Init guard, pulled in by c10 headers: a plain call,
// no vector instructions; checked with objdump on GCC 12.) Nothing here is emitted as a weak
// symbol either (all helpers are in an anonymous namespace and inline), so the linker cannot
// substitute a wide-ISA copy of a function for a baseline one.
//
// Arithmetic: statistics and accumulation in acc = float (double for double x). A row is read from
// memory once; the second and third passes over it hit L1 (rows are at most a few KiB). Half types
// are widened into a scratch row first. Every reduction (within a row, across rows of a chunk) runs
// in an order fixed by the shape, so results are bitwise reproducible.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels.h"

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including kernels_impl.h"
#endif

#define MPVG_CAT_(a, b) a##b
#define MPVG_CAT(a, b) MPVG_CAT_(a, b)
#define MPVG_STR_(a) #a
#define MPVG_STR(a) MPVG_STR_(a)

namespace mpvg::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// ---------------------------------------------------------------------------------------- helpers

// Horizontal sum of one vector, in a fixed lane order.
#if defined(CPU_CAPABILITY_AVX512)
inline float hsum(const Vectorized<float>& v) {
  __m512 x = v;
  __m256 a = _mm256_add_ps(_mm512_castps512_ps256(x),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}
inline double hsum(const Vectorized<double>& v) {
  __m512d x = v;
  __m256d a = _mm256_add_pd(_mm512_castpd512_pd256(x), _mm512_extractf64x4_pd(x, 1));
  __m128d b = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
  b = _mm_add_sd(b, _mm_unpackhi_pd(b, b));
  return _mm_cvtsd_f64(b);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline float hsum(const Vectorized<float>& v) {
  __m256 x = v;
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}
inline double hsum(const Vectorized<double>& v) {
  __m256d x = v;
  __m128d b = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  b = _mm_add_sd(b, _mm_unpackhi_pd(b, b));
  return _mm_cvtsd_f64(b);
}
#else
template <typename A>
inline A hsum(const Vectorized<A>& v) {
  constexpr int W = Vectorized<A>::size();
  A lanes[W];
  v.store(lanes);
  // pairwise tree, fixed order
  for (int width = W / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}
#endif

// A row of x (or dy) as acc values: the row itself when T == acc, else widened into buf.
template <typename T, typename A>
inline const A* row_as_acc(const T* src, A* buf, int64_t D) {
  if constexpr (std::is_same_v<T, A>) {
    (void)buf;
    (void)D;
    return src;
  } else {
    static_assert(std::is_same_v<A, float>);
    using V = Vectorized<float>;
    constexpr int64_t W = V::size();
    int64_t j = 0;
    for (; j + W <= D; j += W) {
      V v;
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        at::vec::load_fp32_from_bf16(src + j, v);
      } else {
        at::vec::load_fp32_from_fp16(src + j, v);
      }
      v.store(buf + j);
    }
    for (; j < D; ++j) buf[j] = static_cast<float>(src[j]);
    return buf;
  }
}

// Where a kernel writes an output row: straight into the output when T == acc, else into buf.
template <typename T, typename A>
inline A* out_row(T* dst, A* buf) {
  if constexpr (std::is_same_v<T, A>) {
    (void)buf;
    return dst;
  } else {
    (void)dst;
    return buf;
  }
}

// Narrows buf into dst when T != acc (round to nearest even, as PyTorch's casts).
template <typename T, typename A>
inline void store_row(T* dst, const A* buf, int64_t D) {
  if constexpr (!std::is_same_v<T, A>) {
    at::vec::convert(buf, dst, D);
  } else {
    (void)dst;
    (void)buf;
    (void)D;
  }
}

// Mean and 1/sqrt(var + eps) of one row, two passes (the second from L1), biased variance.
template <typename A>
inline void row_stats(const A* x, int64_t D, A eps, A& mean_out, A& rstd_out) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  V a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0));
  int64_t j = 0;
  for (; j + 4 * W <= D; j += 4 * W) {
    a0 += V::loadu(x + j);
    a1 += V::loadu(x + j + W);
    a2 += V::loadu(x + j + 2 * W);
    a3 += V::loadu(x + j + 3 * W);
  }
  for (; j + W <= D; j += W) a0 += V::loadu(x + j);
  A s = hsum((a0 + a1) + (a2 + a3));
  for (; j < D; ++j) s += x[j];
  const A mean = s / static_cast<A>(D);

  const V m(mean);
  a0 = a1 = a2 = a3 = V(A(0));
  j = 0;
  for (; j + 4 * W <= D; j += 4 * W) {
    V d0 = V::loadu(x + j) - m, d1 = V::loadu(x + j + W) - m;
    V d2 = V::loadu(x + j + 2 * W) - m, d3 = V::loadu(x + j + 3 * W) - m;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
    a2 = at::vec::fmadd(d2, d2, a2);
    a3 = at::vec::fmadd(d3, d3, a3);
  }
  for (; j + W <= D; j += W) {
    V d = V::loadu(x + j) - m;
    a0 = at::vec::fmadd(d, d, a0);
  }
  A q = hsum((a0 + a1) + (a2 + a3));
  for (; j < D; ++j) {
    const A d = x[j] - mean;
    q += d * d;
  }
  mean_out = mean;
  rstd_out = A(1) / std::sqrt(q / static_cast<A>(D) + eps);
}

// ---------------------------------------------------------------------------------------- forward

// out = (x - mean) * rstd * w + b (+ pe)
template <typename A, bool HAS_PE>
inline void add_row(const A* x, A mean, A rstd, const A* w, const A* b, const A* pe, A* out, int64_t D) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V m(mean), r(rstd);
  int64_t j = 0;
  for (; j + W <= D; j += W) {
    V o = at::vec::fmadd((V::loadu(x + j) - m) * r, V::loadu(w + j), V::loadu(b + j));
    if constexpr (HAS_PE) o = o + V::loadu(pe + j);
    o.store(out + j);
  }
  for (; j < D; ++j) {
    A o = (x[j] - mean) * rstd * w[j] + b[j];
    if constexpr (HAS_PE) o += pe[j];
    out[j] = o;
  }
}

template <typename T, bool HAS_PE>
void add_fwd_impl(const FwdParams& p, int64_t r0, int64_t r1, void* scratch) {
  using A = typename AccOf<T>::type;
  const int64_t N = p.N, D = p.D;
  const T* x = static_cast<const T*>(p.x);
  const A* w = static_cast<const A*>(p.w);
  const A* b = static_cast<const A*>(p.b);
  const A* pe = static_cast<const A*>(p.pe);
  T* y = static_cast<T*>(p.y);
  A* mean = static_cast<A*>(p.mean);
  A* rstd = static_cast<A*>(p.rstd);
  A* xbuf = static_cast<A*>(scratch);
  A* ybuf = xbuf + D + 16;
  const A eps = static_cast<A>(p.eps);

  int64_t bi = r0 / N, n = r0 - bi * N;
  for (int64_t r = r0; r < r1; ++r) {
    const A* xr = row_as_acc<T, A>(x + bi * p.sxb + n * p.sxn, xbuf, D);
    A mu, rs;
    row_stats<A>(xr, D, eps, mu, rs);
    mean[r] = mu;
    rstd[r] = rs;
    T* yr = y + r * D;
    A* o = out_row<T, A>(yr, ybuf);
    add_row<A, HAS_PE>(xr, mu, rs, w, b, HAS_PE ? pe + n * D : nullptr, o, D);
    store_row<T, A>(yr, o, D);
    if (++n == N) {
      n = 0;
      ++bi;
    }
  }
}

template <typename T>
void add_fwd(const FwdParams& p, int64_t r0, int64_t r1, void* scratch) {
  if (p.pe != nullptr) {
    add_fwd_impl<T, true>(p, r0, r1, scratch);
  } else {
    add_fwd_impl<T, false>(p, r0, r1, scratch);
  }
}

// y[b] = w * mean_n(xhat[b, n]) + bias + pe_mean, for b in [b0, b1). N >= 1.
template <typename T>
void pool_fwd(const FwdParams& p, int64_t b0, int64_t b1, void* scratch) {
  using A = typename AccOf<T>::type;
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const int64_t N = p.N, D = p.D;
  const T* x = static_cast<const T*>(p.x);
  const A* w = static_cast<const A*>(p.w);
  const A* bias = static_cast<const A*>(p.b);
  const A* pe_mean = static_cast<const A*>(p.pe_mean);
  T* y = static_cast<T*>(p.y);
  A* mean = static_cast<A*>(p.mean);
  A* rstd = static_cast<A*>(p.rstd);
  A* xbuf = static_cast<A*>(scratch);
  A* xsum = xbuf + D + 16;
  A* ybuf = xsum + D + 16;
  const A eps = static_cast<A>(p.eps);
  const A inv_n = A(1) / static_cast<A>(N);

  for (int64_t bi = b0; bi < b1; ++bi) {
    std::memset(xsum, 0, sizeof(A) * D);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t r = bi * N + n;
      const A* xr = row_as_acc<T, A>(x + bi * p.sxb + n * p.sxn, xbuf, D);
      A mu, rs;
      row_stats<A>(xr, D, eps, mu, rs);
      mean[r] = mu;
      rstd[r] = rs;
      const V m(mu), rv(rs);
      int64_t j = 0;
      for (; j + W <= D; j += W) {
        at::vec::fmadd(V::loadu(xr + j) - m, rv, V::loadu(xsum + j)).store(xsum + j);
      }
      for (; j < D; ++j) xsum[j] += (xr[j] - mu) * rs;
    }
    T* yb = y + bi * D;
    A* o = out_row<T, A>(yb, ybuf);
    for (int64_t j = 0; j < D; ++j) {
      A v = w[j] * (xsum[j] * inv_n) + bias[j];
      if (pe_mean != nullptr) v += pe_mean[j];
      o[j] = v;
    }
    store_row<T, A>(yb, o, D);
  }
}

// --------------------------------------------------------------------------------------- backward

// One row: dx = (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)) * rstd; dw += dy * xhat;
// db += dy (DB); dpe += dy (DPE).
template <typename A, bool DB, bool DPE>
inline void bwd_row(const A* x, const A* dy, A mean, A rstd, const A* w, A* dw, A* db, A* dpe, A* dx,
                    int64_t D) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V m(mean), r(rstd);
  V c1a(A(0)), c1b(A(0)), c2a(A(0)), c2b(A(0));
  int64_t j = 0;
  for (; j + 2 * W <= D; j += 2 * W) {
    const V xh0 = (V::loadu(x + j) - m) * r, xh1 = (V::loadu(x + j + W) - m) * r;
    const V g0 = V::loadu(dy + j), g1 = V::loadu(dy + j + W);
    const V wdy0 = g0 * V::loadu(w + j), wdy1 = g1 * V::loadu(w + j + W);
    c1a = at::vec::fmadd(wdy0, xh0, c1a);
    c1b = at::vec::fmadd(wdy1, xh1, c1b);
    c2a = c2a + wdy0;
    c2b = c2b + wdy1;
    at::vec::fmadd(g0, xh0, V::loadu(dw + j)).store(dw + j);
    at::vec::fmadd(g1, xh1, V::loadu(dw + j + W)).store(dw + j + W);
    if constexpr (DB) {
      (V::loadu(db + j) + g0).store(db + j);
      (V::loadu(db + j + W) + g1).store(db + j + W);
    }
    if constexpr (DPE) {
      (V::loadu(dpe + j) + g0).store(dpe + j);
      (V::loadu(dpe + j + W) + g1).store(dpe + j + W);
    }
  }
  for (; j + W <= D; j += W) {
    const V xh = (V::loadu(x + j) - m) * r;
    const V g = V::loadu(dy + j);
    const V wdy = g * V::loadu(w + j);
    c1a = at::vec::fmadd(wdy, xh, c1a);
    c2a = c2a + wdy;
    at::vec::fmadd(g, xh, V::loadu(dw + j)).store(dw + j);
    if constexpr (DB) (V::loadu(db + j) + g).store(db + j);
    if constexpr (DPE) (V::loadu(dpe + j) + g).store(dpe + j);
  }
  A c1 = hsum(c1a + c1b), c2 = hsum(c2a + c2b);
  for (; j < D; ++j) {
    const A xh = (x[j] - mean) * rstd;
    const A g = dy[j];
    const A wdy = g * w[j];
    c1 += wdy * xh;
    c2 += wdy;
    dw[j] += g * xh;
    if constexpr (DB) db[j] += g;
    if constexpr (DPE) dpe[j] += g;
  }
  c1 /= static_cast<A>(D);
  c2 /= static_cast<A>(D);

  const V v1(c1), v2(c2);
  j = 0;
  for (; j + W <= D; j += W) {
    const V xh = (V::loadu(x + j) - m) * r;
    const V wdy = V::loadu(dy + j) * V::loadu(w + j);
    ((wdy - at::vec::fmadd(xh, v1, v2)) * r).store(dx + j);
  }
  for (; j < D; ++j) {
    const A xh = (x[j] - mean) * rstd;
    dx[j] = (dy[j] * w[j] - (xh * c1 + c2)) * rstd;
  }
}

template <typename T, bool DB, bool DPE>
void bwd_impl(const BwdParams& p, const BwdChunk& c, void* scratch) {
  using A = typename AccOf<T>::type;
  const int64_t N = p.N, D = p.D;
  const T* x = static_cast<const T*>(p.x);
  const A* w = static_cast<const A*>(p.w);
  const A* mean = static_cast<const A*>(p.mean);
  const A* rstd = static_cast<const A*>(p.rstd);
  T* dx = static_cast<T*>(p.dx);
  A* dw = static_cast<A*>(c.dw);
  A* db = static_cast<A*>(c.db);
  A* dpe = static_cast<A*>(c.dpe);
  A* xbuf = static_cast<A*>(scratch);
  A* dybuf = xbuf + D + 16;
  A* dxbuf = dybuf + D + 16;

  std::memset(dw, 0, sizeof(A) * D);
  if constexpr (DB) std::memset(db, 0, sizeof(A) * D);
  if constexpr (DPE) std::memset(dpe + c.n0 * D, 0, sizeof(A) * D * (c.n1 - c.n0));

  auto row = [&](int64_t bi, int64_t n) {
    const int64_t r = bi * N + n;
    const A* xr = row_as_acc<T, A>(x + bi * p.sxb + n * p.sxn, xbuf, D);
    const A* g;
    if (p.pool) {
      g = static_cast<const A*>(p.dy) + bi * D;
    } else {
      g = row_as_acc<T, A>(static_cast<const T*>(p.dy) + r * D, dybuf, D);
    }
    T* dxr = dx + r * D;
    A* o = out_row<T, A>(dxr, dxbuf);
    bwd_row<A, DB, DPE>(xr, g, mean[r], rstd[r], w, dw, db, DPE ? dpe + n * D : nullptr, o, D);
    store_row<T, A>(dxr, o, D);
  };

  if (c.rect) {
    for (int64_t bi = c.b0; bi < c.b1; ++bi) {
      for (int64_t n = c.n0; n < c.n1; ++n) row(bi, n);
    }
  } else {
    int64_t bi = c.r0 / N, n = c.r0 - bi * N;
    for (int64_t r = c.r0; r < c.r1; ++r) {
      row(bi, n);
      if (++n == N) {
        n = 0;
        ++bi;
      }
    }
  }
}

template <typename T>
void bwd(const BwdParams& p, const BwdChunk& c, void* scratch) {
  const bool has_db = c.db != nullptr, has_dpe = c.dpe != nullptr;
  if (has_dpe && has_db) {
    bwd_impl<T, true, true>(p, c, scratch);
  } else if (has_dpe) {
    bwd_impl<T, false, true>(p, c, scratch);
  } else if (has_db) {
    bwd_impl<T, true, false>(p, c, scratch);
  } else {
    bwd_impl<T, false, false>(p, c, scratch);
  }
}

constexpr KernelTable kTable = {
    MPVG_STR(CPU_CAPABILITY),
    {&add_fwd<float>, &add_fwd<double>, &add_fwd<c10::BFloat16>, &add_fwd<c10::Half>},
    {&pool_fwd<float>, &pool_fwd<double>, &pool_fwd<c10::BFloat16>, &pool_fwd<c10::Half>},
    {&bwd<float>, &bwd<double>, &bwd<c10::BFloat16>, &bwd<c10::Half>},
};

}  // namespace
}  // namespace CPU_CAPABILITY

const KernelTable* MPVG_CAT(kernels_, CPU_CAPABILITY)() { return &CPU_CAPABILITY::kTable; }

}  // namespace mpvg::cpu
