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
// no vector instructions; checked with objdump on GCC 12.) The helpers here are in an anonymous
// namespace, and the few weak symbols these units emit are at::vec templates that ATen itself puts
// in at::vec::<CAPABILITY> (checked with nm), so the linker cannot substitute a wide-ISA copy of a
// function for a baseline one.
//
// Arithmetic: statistics and accumulation in acc = float (double for double x). A row is read from
// memory once; the second and third passes over it hit L1 (rows are at most a few KiB). Half types
// are widened into a scratch row first. Every reduction (within a row, across rows of a chunk) runs
// in an order fixed by the shape, so results are bitwise reproducible.
//
// Rows are processed in pairs (b, n), (b + 1, n): the two rows share their loads of the parameters
// and of the pe / dpe row, and their two independent dependency chains (sum -> horizontal sum ->
// mean -> deviations -> horizontal sum -> rsqrt) overlap. The arithmetic of each row is the same
// whether it is processed in a pair or alone, so the forward result never depends on the grouping.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
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

// Mean and 1/sqrt(var + eps) (biased variance) of R = 1 or 2 rows, two passes each (the second from
// L1). Row 1 (x1) is ignored when R == 1; each row's arithmetic does not depend on R.
template <typename A, int R>
inline void row_stats(const A* x0, const A* x1, int64_t D, A eps, A* mean, A* rstd) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const A inv_d = A(1) / static_cast<A>(D);
  V a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0)), b0(A(0)), b1(A(0)), b2(A(0)), b3(A(0));
  int64_t j = 0;
  for (; j + 4 * W <= D; j += 4 * W) {
    a0 += V::loadu(x0 + j);
    a1 += V::loadu(x0 + j + W);
    a2 += V::loadu(x0 + j + 2 * W);
    a3 += V::loadu(x0 + j + 3 * W);
    if constexpr (R == 2) {
      b0 += V::loadu(x1 + j);
      b1 += V::loadu(x1 + j + W);
      b2 += V::loadu(x1 + j + 2 * W);
      b3 += V::loadu(x1 + j + 3 * W);
    }
  }
  const int64_t jv = j;
  for (; j + W <= D; j += W) {
    a0 += V::loadu(x0 + j);
    if constexpr (R == 2) b0 += V::loadu(x1 + j);
  }
  const int64_t jt = j;
  A s0 = hsum((a0 + a1) + (a2 + a3)), s1 = 0;
  if constexpr (R == 2) s1 = hsum((b0 + b1) + (b2 + b3));
  for (j = jt; j < D; ++j) {
    s0 += x0[j];
    if constexpr (R == 2) s1 += x1[j];
  }
  const A mu0 = s0 * inv_d, mu1 = s1 * inv_d;
  const V m0(mu0), m1(mu1);
  a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = V(A(0));
  for (j = 0; j < jv; j += 4 * W) {
    const V d0 = V::loadu(x0 + j) - m0, d1 = V::loadu(x0 + j + W) - m0;
    const V d2 = V::loadu(x0 + j + 2 * W) - m0, d3 = V::loadu(x0 + j + 3 * W) - m0;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
    a2 = at::vec::fmadd(d2, d2, a2);
    a3 = at::vec::fmadd(d3, d3, a3);
    if constexpr (R == 2) {
      const V e0 = V::loadu(x1 + j) - m1, e1 = V::loadu(x1 + j + W) - m1;
      const V e2 = V::loadu(x1 + j + 2 * W) - m1, e3 = V::loadu(x1 + j + 3 * W) - m1;
      b0 = at::vec::fmadd(e0, e0, b0);
      b1 = at::vec::fmadd(e1, e1, b1);
      b2 = at::vec::fmadd(e2, e2, b2);
      b3 = at::vec::fmadd(e3, e3, b3);
    }
  }
  for (; j < jt; j += W) {
    const V d = V::loadu(x0 + j) - m0;
    a0 = at::vec::fmadd(d, d, a0);
    if constexpr (R == 2) {
      const V e = V::loadu(x1 + j) - m1;
      b0 = at::vec::fmadd(e, e, b0);
    }
  }
  A q0 = hsum((a0 + a1) + (a2 + a3)), q1 = 0;
  if constexpr (R == 2) q1 = hsum((b0 + b1) + (b2 + b3));
  for (j = jt; j < D; ++j) {
    const A d = x0[j] - mu0;
    q0 += d * d;
    if constexpr (R == 2) {
      const A e = x1[j] - mu1;
      q1 += e * e;
    }
  }
  mean[0] = mu0;
  rstd[0] = A(1) / std::sqrt(q0 * inv_d + eps);
  if constexpr (R == 2) {
    mean[1] = mu1;
    rstd[1] = A(1) / std::sqrt(q1 * inv_d + eps);
  }
}

// ---------------------------------------------------------------------------------------- forward

// o_k = (x_k - mean_k) * rstd_k * w + c for R = 1 or 2 rows sharing the bias row c (bias + pe[n]).
template <typename A, int R>
inline void add_rows(const A* x0, const A* x1, const A* mean, const A* rstd, const A* w, const A* c, A* o0,
                     A* o1, int64_t D) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V m0(mean[0]), r0(rstd[0]);
  const V m1(R == 2 ? mean[1] : A(0)), r1(R == 2 ? rstd[1] : A(0));
  int64_t j = 0;
  for (; j + W <= D; j += W) {
    const V vw = V::loadu(w + j), vc = V::loadu(c + j);
    at::vec::fmadd((V::loadu(x0 + j) - m0) * r0, vw, vc).store(o0 + j);
    if constexpr (R == 2) at::vec::fmadd((V::loadu(x1 + j) - m1) * r1, vw, vc).store(o1 + j);
  }
  for (; j < D; ++j) {
    o0[j] = (x0[j] - mean[0]) * rstd[0] * w[j] + c[j];
    if constexpr (R == 2) o1[j] = (x1[j] - mean[1]) * rstd[1] * w[j] + c[j];
  }
}

// Work units [u0, u1) of the forward of layer_norm_add. Unit u covers samples b = 2 * (u / kn) and
// b + 1 (when < B) and the tokens of n-block u % kn (FwdParams::nb tokens each); it writes those rows
// of y, mean and rstd, taking the rows in pairs (b, n), (b + 1, n) which share the bias row c.
template <typename T, bool HAS_PE>
void add_fwd_impl(const FwdParams& p, int64_t u0, int64_t u1, void* scratch) {
  using A = typename AccOf<T>::type;
  const int64_t B = p.B, N = p.N, D = p.D, nb = p.nb, kn = p.kn;
  const T* x = static_cast<const T*>(p.x);
  const A* w = static_cast<const A*>(p.w);
  const A* b = static_cast<const A*>(p.b);
  const A* pe = static_cast<const A*>(p.pe);
  T* y = static_cast<T*>(p.y);
  A* mean = static_cast<A*>(p.mean);
  A* rstd = static_cast<A*>(p.rstd);
  const int64_t ld = D + 16;
  A* base = static_cast<A*>(scratch);
  A* xbuf0 = base;
  A* xbuf1 = base + ld;
  A* ybuf0 = base + 2 * ld;
  A* ybuf1 = base + 3 * ld;
  A* cbuf = base + 4 * ld;  // HAS_PE: the row bias + pe[n], built once per token and shared by the pair
  const A eps = static_cast<A>(p.eps);

  for (int64_t u = u0; u < u1; ++u) {
    const int64_t bi = 2 * (u / kn);
    const int64_t n0 = (u % kn) * nb, n1 = std::min(N, n0 + nb);
    const bool two = bi + 1 < B;
    const T* xa = x + bi * p.sxb;
    const T* xb = xa + p.sxb;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t r = bi * N + n;
      const A* c = b;
      if constexpr (HAS_PE) {
        const A* pen = pe + n * D;
        for (int64_t j = 0; j < D; ++j) cbuf[j] = pen[j] + b[j];
        c = cbuf;
      }
      const A* x0 = row_as_acc<T, A>(xa + n * p.sxn, xbuf0, D);
      T* y0 = y + r * D;
      A* o0 = out_row<T, A>(y0, ybuf0);
      if (two) {
        const A* x1 = row_as_acc<T, A>(xb + n * p.sxn, xbuf1, D);
        T* y1 = y0 + N * D;
        A* o1 = out_row<T, A>(y1, ybuf1);
        A mu[2], rs[2];
        row_stats<A, 2>(x0, x1, D, eps, mu, rs);
        mean[r] = mu[0];
        rstd[r] = rs[0];
        mean[r + N] = mu[1];
        rstd[r + N] = rs[1];
        add_rows<A, 2>(x0, x1, mu, rs, w, c, o0, o1, D);
        store_row<T, A>(y0, o0, D);
        store_row<T, A>(y1, o1, D);
      } else {
        A mu[1], rs[1];
        row_stats<A, 1>(x0, nullptr, D, eps, mu, rs);
        mean[r] = mu[0];
        rstd[r] = rs[0];
        add_rows<A, 1>(x0, nullptr, mu, rs, w, c, o0, nullptr, D);
        store_row<T, A>(y0, o0, D);
      }
    }
  }
}

template <typename T>
void add_fwd(const FwdParams& p, int64_t u0, int64_t u1, void* scratch) {
  if (p.pe != nullptr) {
    add_fwd_impl<T, true>(p, u0, u1, scratch);
  } else {
    add_fwd_impl<T, false>(p, u0, u1, scratch);
  }
}

// y[b] = w * mean_n(xhat[b, n]) + bias + pe_mean, for b in [b0, b1). N >= 1. The tokens of a sample
// are taken in pairs (n, n + 1) for the statistics; xhat is summed over n in order.
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
  const int64_t ld = D + 16;
  A* xbuf0 = static_cast<A*>(scratch);
  A* xbuf1 = xbuf0 + ld;
  A* xsum = xbuf1 + ld;
  A* ybuf = xsum + ld;
  const A eps = static_cast<A>(p.eps);
  const A inv_n = A(1) / static_cast<A>(N);

  auto accumulate = [&](const A* xr, A mu, A rs) {
    const V m(mu), rv(rs);
    int64_t j = 0;
    for (; j + W <= D; j += W) {
      at::vec::fmadd(V::loadu(xr + j) - m, rv, V::loadu(xsum + j)).store(xsum + j);
    }
    for (; j < D; ++j) xsum[j] += (xr[j] - mu) * rs;
  };
  for (int64_t bi = b0; bi < b1; ++bi) {
    std::memset(xsum, 0, sizeof(A) * D);
    const T* xs = x + bi * p.sxb;
    int64_t n = 0;
    for (; n + 2 <= N; n += 2) {
      const A* x0 = row_as_acc<T, A>(xs + n * p.sxn, xbuf0, D);
      const A* x1 = row_as_acc<T, A>(xs + (n + 1) * p.sxn, xbuf1, D);
      A mu[2], rs[2];
      row_stats<A, 2>(x0, x1, D, eps, mu, rs);
      const int64_t r = bi * N + n;
      mean[r] = mu[0];
      rstd[r] = rs[0];
      mean[r + 1] = mu[1];
      rstd[r + 1] = rs[1];
      accumulate(x0, mu[0], rs[0]);
      accumulate(x1, mu[1], rs[1]);
    }
    if (n < N) {
      const A* x0 = row_as_acc<T, A>(xs + n * p.sxn, xbuf0, D);
      A mu[1], rs[1];
      row_stats<A, 1>(x0, nullptr, D, eps, mu, rs);
      mean[bi * N + n] = mu[0];
      rstd[bi * N + n] = rs[0];
      accumulate(x0, mu[0], rs[0]);
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

// R = 1 or 2 rows sharing w and the dpe row: dx_k = (w*dy_k - xhat_k * mean(w*dy_k*xhat_k)
// - mean(w*dy_k)) * rstd_k; dw += dy_0 * xhat_0 (+ dy_1 * xhat_1); db += dy_0 (+ dy_1) (DB);
// dpe += dy_0 (+ dy_1) (DPE). Each row's dx does not depend on R.
template <typename A, int R, bool DB, bool DPE>
inline void bwd_rows(const A* x0, const A* x1, const A* g0, const A* g1, const A* mean, const A* rstd,
                     const A* w, A* dw, A* db, A* dpe, A* dx0, A* dx1, int64_t D) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V m0(mean[0]), r0(rstd[0]);
  const V m1(R == 2 ? mean[1] : A(0)), r1(R == 2 ? rstd[1] : A(0));
  V c1a(A(0)), c1b(A(0)), c2a(A(0)), c2b(A(0));  // row 0: sum of w*dy*xhat, of w*dy (two lanes each)
  V e1a(A(0)), e1b(A(0)), e2a(A(0)), e2b(A(0));  // row 1
  auto step = [&](int64_t j, V& c1, V& c2, V& e1, V& e2) {
    const V vw = V::loadu(w + j);
    const V xh0 = (V::loadu(x0 + j) - m0) * r0;
    const V gv0 = V::loadu(g0 + j);
    const V wdy0 = gv0 * vw;
    c1 = at::vec::fmadd(wdy0, xh0, c1);
    c2 = c2 + wdy0;
    V vdw = at::vec::fmadd(gv0, xh0, V::loadu(dw + j));
    V gsum = gv0;
    if constexpr (R == 2) {
      const V xh1 = (V::loadu(x1 + j) - m1) * r1;
      const V gv1 = V::loadu(g1 + j);
      const V wdy1 = gv1 * vw;
      e1 = at::vec::fmadd(wdy1, xh1, e1);
      e2 = e2 + wdy1;
      vdw = at::vec::fmadd(gv1, xh1, vdw);
      if constexpr (DB || DPE) gsum = gsum + gv1;
    }
    vdw.store(dw + j);
    if constexpr (DB) (V::loadu(db + j) + gsum).store(db + j);
    if constexpr (DPE) (V::loadu(dpe + j) + gsum).store(dpe + j);
  };
  int64_t j = 0;
  for (; j + 2 * W <= D; j += 2 * W) {
    step(j, c1a, c2a, e1a, e2a);
    step(j + W, c1b, c2b, e1b, e2b);
  }
  for (; j + W <= D; j += W) step(j, c1a, c2a, e1a, e2a);
  A c1 = hsum(c1a + c1b), c2 = hsum(c2a + c2b), f1 = 0, f2 = 0;
  if constexpr (R == 2) {
    f1 = hsum(e1a + e1b);
    f2 = hsum(e2a + e2b);
  }
  for (; j < D; ++j) {
    const A xh0 = (x0[j] - mean[0]) * rstd[0];
    const A wdy0 = g0[j] * w[j];
    c1 += wdy0 * xh0;
    c2 += wdy0;
    A vdw = dw[j] + g0[j] * xh0;
    A gsum = g0[j];
    if constexpr (R == 2) {
      const A xh1 = (x1[j] - mean[1]) * rstd[1];
      const A wdy1 = g1[j] * w[j];
      f1 += wdy1 * xh1;
      f2 += wdy1;
      vdw += g1[j] * xh1;
      gsum += g1[j];
    }
    dw[j] = vdw;
    if constexpr (DB) db[j] += gsum;
    if constexpr (DPE) dpe[j] += gsum;
  }
  const A inv_d = A(1) / static_cast<A>(D);
  c1 *= inv_d;
  c2 *= inv_d;
  f1 *= inv_d;
  f2 *= inv_d;

  const V v1(c1), v2(c2), u1(f1), u2(f2);
  j = 0;
  for (; j + W <= D; j += W) {
    const V vw = V::loadu(w + j);
    const V xh0 = (V::loadu(x0 + j) - m0) * r0;
    ((V::loadu(g0 + j) * vw - at::vec::fmadd(xh0, v1, v2)) * r0).store(dx0 + j);
    if constexpr (R == 2) {
      const V xh1 = (V::loadu(x1 + j) - m1) * r1;
      ((V::loadu(g1 + j) * vw - at::vec::fmadd(xh1, u1, u2)) * r1).store(dx1 + j);
    }
  }
  for (; j < D; ++j) {
    const A xh0 = (x0[j] - mean[0]) * rstd[0];
    dx0[j] = (g0[j] * w[j] - (xh0 * c1 + c2)) * rstd[0];
    if constexpr (R == 2) {
      const A xh1 = (x1[j] - mean[1]) * rstd[1];
      dx1[j] = (g1[j] * w[j] - (xh1 * f1 + f2)) * rstd[1];
    }
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
  const int64_t ld = D + 16;
  A* buf = static_cast<A*>(scratch);
  A *xbuf0 = buf, *xbuf1 = buf + ld, *gbuf0 = buf + 2 * ld, *gbuf1 = buf + 3 * ld;
  A *dxbuf0 = buf + 4 * ld, *dxbuf1 = buf + 5 * ld;

  std::memset(dw, 0, sizeof(A) * D);
  if constexpr (DB) std::memset(db, 0, sizeof(A) * D);
  if constexpr (DPE) std::memset(dpe + c.n0 * D, 0, sizeof(A) * D * (c.n1 - c.n0));

  auto grad_row = [&](int64_t bi, int64_t n, A* gbuf) -> const A* {
    if (p.pool) return static_cast<const A*>(p.dy) + bi * D;
    return row_as_acc<T, A>(static_cast<const T*>(p.dy) + (bi * N + n) * D, gbuf, D);
  };
  for (int64_t bi = c.b0; bi < c.b1; bi += 2) {
    const bool two = bi + 1 < c.b1;
    for (int64_t n = c.n0; n < c.n1; ++n) {
      const int64_t r = bi * N + n;
      const A* x0 = row_as_acc<T, A>(x + bi * p.sxb + n * p.sxn, xbuf0, D);
      const A* g0 = grad_row(bi, n, gbuf0);
      T* dxr0 = dx + r * D;
      A* o0 = out_row<T, A>(dxr0, dxbuf0);
      A* dpe_row = DPE ? dpe + n * D : nullptr;
      if (two) {
        const A* x1 = row_as_acc<T, A>(x + (bi + 1) * p.sxb + n * p.sxn, xbuf1, D);
        const A* g1 = grad_row(bi + 1, n, gbuf1);
        T* dxr1 = dxr0 + N * D;
        A* o1 = out_row<T, A>(dxr1, dxbuf1);
        const A mu[2] = {mean[r], mean[r + N]}, rs[2] = {rstd[r], rstd[r + N]};
        bwd_rows<A, 2, DB, DPE>(x0, x1, g0, g1, mu, rs, w, dw, db, dpe_row, o0, o1, D);
        store_row<T, A>(dxr0, o0, D);
        store_row<T, A>(dxr1, o1, D);
      } else {
        const A mu[1] = {mean[r]}, rs[1] = {rstd[r]};
        bwd_rows<A, 1, DB, DPE>(x0, nullptr, g0, nullptr, mu, rs, w, dw, db, dpe_row, o0, nullptr, D);
        store_row<T, A>(dxr0, o0, D);
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
