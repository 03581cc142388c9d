// Fused CPU linear scan h_t = a_t * h_{t-1} + b_t and its reverse-scan backward (rnnkit.ops.scan),
// the chunk kernels' fused row pass (rnnkit.ops._rows), Mamba's fused selective scan
// (rnnkit.ops.selective_scan) and the short causal convolution (rnnkit.ops.short_conv).
//
// Tensors are contiguous (B, T, S); complex ones are interleaved (re, im) pairs and S counts
// complex elements. Channels (b, s) are independent, so threads split the B * S channels into
// (batch row, block of s) units, and inside one unit the time loop runs outermost with the s loop
// innermost: each step reads one contiguous row of a and b and the previous row of h (still in L1),
// which the compiler vectorises. a and b are read once and h written once, the minimum traffic.
// No torch headers: this builds in seconds with a plain `g++ -O3 -shared`.

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

// Below this many elements a second thread costs more (its start, ~20 us) than it saves.
constexpr int64_t kMinPerThread = int64_t(1) << 15;
// Rows are split into s-blocks no smaller than this (keeps the inner loop long enough to vectorise).
constexpr int64_t kMinBlock = 64;

// Calls run(u0, u1) for `want` disjoint ranges covering [0, units), each on its own thread (the
// first on the caller's).
template <class Run>
void split_units(int64_t units, int64_t want, const Run& run) {
  if (want <= 1) {
    run(0, units);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(want - 1);
  for (int64_t k = 1; k < want; ++k) pool.emplace_back(run, units * k / want, units * (k + 1) / want);
  run(0, units / want);
  for (auto& th : pool) th.join();
}

// Calls body(batch, s0, s1) for disjoint units covering all B x S channels, on up to nthreads threads.
template <class Body>
void for_channels(int64_t B, int64_t T, int64_t S, int nthreads, const Body& body) {
  const int64_t work = B * T * S;
  int64_t want = std::max<int64_t>(1, std::min<int64_t>(nthreads, work / kMinPerThread));
  // Enough s-blocks per row that B * blocks covers the threads (a single long sequence still splits).
  int64_t blocks = std::max<int64_t>(1, (want + B - 1) / B);
  blocks = std::min<int64_t>(blocks, std::max<int64_t>(1, S / kMinBlock));
  const int64_t block = (S + blocks - 1) / blocks;
  const int64_t units = B * blocks;
  want = std::min<int64_t>(want, units);
  split_units(units, want, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bi = u / blocks, s0 = (u % blocks) * block;
      body(bi, s0, std::min(S, s0 + block));
    }
  });
}

template <class R>
void fwd_real(const R* a, const R* b, const R* h0, R* h, int64_t B, int64_t T, int64_t S, int nthreads) {
  for_channels(B, T, S, nthreads, [=](int64_t bi, int64_t s0, int64_t s1) {
    const int64_t base = bi * T * S;
    const R* __restrict__ a0 = a + base;
    const R* __restrict__ b0 = b + base;
    R* __restrict__ out = h + base;
    if (h0) {
      const R* __restrict__ init = h0 + bi * S;
      for (int64_t s = s0; s < s1; ++s) out[s] = a0[s] * init[s] + b0[s];
    } else {
      for (int64_t s = s0; s < s1; ++s) out[s] = b0[s];
    }
    for (int64_t t = 1; t < T; ++t) {
      const R* __restrict__ at = a0 + t * S;
      const R* __restrict__ bt = b0 + t * S;
      const R* __restrict__ prev = out + (t - 1) * S;
      R* __restrict__ cur = out + t * S;
      for (int64_t s = s0; s < s1; ++s) cur[s] = at[s] * prev[s] + bt[s];
    }
  });
}

// g_t = gh_t + a_{t+1} g_{t+1} (db_t = g_t), da_t = g_t h_{t-1}, dh0 = a_0 g_0.
template <class R>
void bwd_real(const R* a, const R* h, const R* h0, const R* gh, R* da, R* db, R* dh0, int64_t B, int64_t T,
              int64_t S, int nthreads) {
  for_channels(B, T, S, nthreads, [=](int64_t bi, int64_t s0, int64_t s1) {
    const int64_t base = bi * T * S;
    const R* a0 = a + base;
    const R* h_ = h + base;
    const R* g0 = gh + base;
    R* dbb = db + base;
    R* dab = da ? da + base : nullptr;
    const R* init = h0 ? h0 + bi * S : nullptr;
    for (int64_t t = T - 1; t >= 0; --t) {
      R* __restrict__ g = dbb + t * S;
      const R* __restrict__ gt = g0 + t * S;
      if (t == T - 1) {
        for (int64_t s = s0; s < s1; ++s) g[s] = gt[s];
      } else {
        const R* __restrict__ an = a0 + (t + 1) * S;
        const R* __restrict__ gn = dbb + (t + 1) * S;
        for (int64_t s = s0; s < s1; ++s) g[s] = gt[s] + an[s] * gn[s];
      }
      if (dab) {
        R* __restrict__ d = dab + t * S;
        if (t > 0) {
          const R* __restrict__ hp = h_ + (t - 1) * S;
          for (int64_t s = s0; s < s1; ++s) d[s] = g[s] * hp[s];
        } else if (init) {
          for (int64_t s = s0; s < s1; ++s) d[s] = g[s] * init[s];
        } else {
          for (int64_t s = s0; s < s1; ++s) d[s] = R(0);
        }
      }
    }
    if (dh0) {
      R* __restrict__ d = dh0 + bi * S;
      for (int64_t s = s0; s < s1; ++s) d[s] = a0[s] * dbb[s];
    }
  });
}

// Complex versions on interleaved (re, im) pairs; index s counts complex numbers.
template <class R>
void fwd_complex(const R* a, const R* b, const R* h0, R* h, int64_t B, int64_t T, int64_t S, int nthreads) {
  for_channels(B, T, S, nthreads, [=](int64_t bi, int64_t s0, int64_t s1) {
    const int64_t base = 2 * bi * T * S;
    const R* __restrict__ a0 = a + base;
    const R* __restrict__ b0 = b + base;
    R* __restrict__ out = h + base;
    for (int64_t s = s0; s < s1; ++s) {
      R hr = 0, hi = 0;
      if (h0) hr = h0[2 * (bi * S + s)], hi = h0[2 * (bi * S + s) + 1];
      const R ar = a0[2 * s], ai = a0[2 * s + 1];
      out[2 * s] = ar * hr - ai * hi + b0[2 * s];
      out[2 * s + 1] = ar * hi + ai * hr + b0[2 * s + 1];
    }
    for (int64_t t = 1; t < T; ++t) {
      const R* __restrict__ at = a0 + 2 * t * S;
      const R* __restrict__ bt = b0 + 2 * t * S;
      const R* __restrict__ prev = out + 2 * (t - 1) * S;
      R* __restrict__ cur = out + 2 * t * S;
      for (int64_t s = s0; s < s1; ++s) {
        const R ar = at[2 * s], ai = at[2 * s + 1], pr = prev[2 * s], pi = prev[2 * s + 1];
        cur[2 * s] = ar * pr - ai * pi + bt[2 * s];
        cur[2 * s + 1] = ar * pi + ai * pr + bt[2 * s + 1];
      }
    }
  });
}

// g_t = gh_t + conj(a_{t+1}) g_{t+1}, da_t = g_t conj(h_{t-1}), dh0 = conj(a_0) g_0.
template <class R>
void bwd_complex(const R* a, const R* h, const R* h0, const R* gh, R* da, R* db, R* dh0, int64_t B, int64_t T,
                 int64_t S, int nthreads) {
  for_channels(B, T, S, nthreads, [=](int64_t bi, int64_t s0, int64_t s1) {
    const int64_t base = 2 * bi * T * S;
    const R* a0 = a + base;
    const R* h_ = h + base;
    const R* g0 = gh + base;
    R* dbb = db + base;
    R* dab = da ? da + base : nullptr;
    const R* init = h0 ? h0 + 2 * bi * S : nullptr;
    for (int64_t t = T - 1; t >= 0; --t) {
      R* __restrict__ g = dbb + 2 * t * S;
      const R* __restrict__ gt = g0 + 2 * t * S;
      if (t == T - 1) {
        for (int64_t s = s0; s < s1; ++s) g[2 * s] = gt[2 * s], g[2 * s + 1] = gt[2 * s + 1];
      } else {
        const R* __restrict__ an = a0 + 2 * (t + 1) * S;
        const R* __restrict__ gn = dbb + 2 * (t + 1) * S;
        for (int64_t s = s0; s < s1; ++s) {
          const R ar = an[2 * s], ai = an[2 * s + 1], nr = gn[2 * s], ni = gn[2 * s + 1];
          g[2 * s] = gt[2 * s] + ar * nr + ai * ni;
          g[2 * s + 1] = gt[2 * s + 1] + ar * ni - ai * nr;
        }
      }
      if (dab) {
        R* __restrict__ d = dab + 2 * t * S;
        const R* hp = t > 0 ? h_ + 2 * (t - 1) * S : init;
        if (hp) {
          for (int64_t s = s0; s < s1; ++s) {
            const R gr = g[2 * s], gi = g[2 * s + 1], pr = hp[2 * s], pi = hp[2 * s + 1];
            d[2 * s] = gr * pr + gi * pi;
            d[2 * s + 1] = gi * pr - gr * pi;
          }
        } else {
          for (int64_t s = s0; s < s1; ++s) d[2 * s] = R(0), d[2 * s + 1] = R(0);
        }
      }
    }
    if (dh0) {
      R* __restrict__ d = dh0 + 2 * bi * S;
      for (int64_t s = s0; s < s1; ++s) {
        const R ar = a0[2 * s], ai = a0[2 * s + 1], gr = dbb[2 * s], gi = dbb[2 * s + 1];
        d[2 * s] = ar * gr + ai * gi;
        d[2 * s + 1] = ar * gi - ai * gr;
      }
    }
  });
}

// Calls body(g0, g1) for disjoint ranges of groups covering [0, groups), on up to nthreads threads.
template <class Body>
void for_groups(int64_t groups, int64_t work, int nthreads, const Body& body) {
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>({int64_t(nthreads), work / kMinPerThread, groups}));
  split_units(groups, want, body);
}

// Dot product of two rows with 8 partial sums, so that the compiler vectorises it without
// reassociating one sum (no -ffast-math).
template <class R>
R row_dot(const R* __restrict__ u, const R* __restrict__ v, int64_t D) {
  R p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) p[j] += u[d + j] * v[d + j];
  for (; d < D; ++d) p[0] += u[d] * v[d];
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// The fused row pass of rnnkit.ops._rows.row_pass: rows i of an (rows, D) matrix x (row stride
// x_rs, column stride x_cs; 0, 0 for a broadcast scalar) in groups of `group` consecutive rows
// (g = i / group). Per row, with flags bit 0 "causal", bit 1 "dot before scale", bit 2 "accumulate":
//   u = x_i + a_i vec_g                a null: a_i = 1; vec null: nothing added
//   t = u * s_i                        s null: s_i = 1; s_full (rows, D): elementwise with its row i;
//                                      causal: entries d > i mod group set to 0
//   out_i = t  (accumulate: += t)      out null: not written (out may be x itself)
//   dot_i = v . y_i or v . yvec_g      v = u (dot before scale) or t; dot null: not computed
//   col_g = sum_i w_i t                col null: not computed; w null: w_i = 1
// vec and yvec step vec_gs / yvec_gs elements per group (0: one row for every group). Threads
// take whole groups, so each col_g has one writer. out, y, s_full, vec, yvec, col: contiguous rows.
template <class R>
void row_pass(int64_t rows, int64_t D, int64_t group, const R* x, int64_t x_rs, int64_t x_cs, const R* a,
              const R* vec, int64_t vec_gs, const R* s, const R* s_full, R* out, const R* y, const R* yvec,
              int64_t yvec_gs, R* dot, const R* w, R* col, int flags, int nthreads) {
  const bool causal = flags & 1, dot_first = flags & 2, accumulate = flags & 4;
  const int64_t groups = rows / group;
  for_groups(groups, rows * D, nthreads, [=](int64_t g0, int64_t g1) {
    std::vector<R> scratch(out && !accumulate ? 0 : D);
    for (int64_t g = g0; g < g1; ++g) {
      R* __restrict__ c = col ? col + g * D : nullptr;
      if (c)
        for (int64_t d = 0; d < D; ++d) c[d] = R(0);
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        R* t = out && !accumulate ? out + i * D : scratch.data();  // may be x itself: no __restrict__
        const R* xi = x + i * x_rs;
        if (vec) {
          const R* __restrict__ v = vec + g * vec_gs;
          const R ai = a ? a[i] : R(1);
          if (x_cs == 1)
            for (int64_t d = 0; d < D; ++d) t[d] = xi[d] + ai * v[d];
          else
            for (int64_t d = 0; d < D; ++d) t[d] = xi[d * x_cs] + ai * v[d];
        } else if (t != xi) {
          if (x_cs == 1)
            for (int64_t d = 0; d < D; ++d) t[d] = xi[d];
          else
            for (int64_t d = 0; d < D; ++d) t[d] = xi[d * x_cs];
        }
        const R* ydot = dot ? (y ? y + i * D : yvec + g * yvec_gs) : nullptr;
        if (dot && dot_first) dot[i] = row_dot<R>(t, ydot, D);
        if (s_full) {
          const R* __restrict__ sf = s_full + i * D;
          for (int64_t d = 0; d < D; ++d) t[d] *= sf[d];
        } else if (s) {
          const R si = s[i];
          for (int64_t d = 0; d < D; ++d) t[d] *= si;
        }
        if (causal)
          for (int64_t d = i - g * group + 1; d < D; ++d) t[d] = R(0);
        if (dot && !dot_first) dot[i] = row_dot<R>(t, ydot, D);
        if (c) {
          const R wi = w ? w[i] : R(1);
          for (int64_t d = 0; d < D; ++d) c[d] += wi * t[d];
        }
        if (out && accumulate) {
          R* __restrict__ o = out + i * D;
          for (int64_t d = 0; d < D; ++d) o[d] += t[d];
        }
      }
    }
  });
}


// ---------------------------------------------------------------------------------------------
// Mamba's fused selective scan (rnnkit.ops.selective_scan, mode "fused"). Per batch row b and
// channel e, with the state h (N,) of the channel:
//   h_t = exp(delta_t A_e) * h_{t-1} + delta_t u_t B_t,   y_t = (h_t . C_t + D_e u_t) * silu(z_t)
// (D, z optional; delta optionally softplus(delta + delta_bias)). Vectors run across channels: one
// vector holds L consecutive channels e, so the N-loop keeps the N state vectors in registers and
// y is a vertical sum (no horizontal reduction). The (B, T, E, N) decays and states are never
// written: the forward keeps the state in registers and stores it only every K steps (the
// checkpoints of the backward); the backward recomputes one chunk of K steps of one vector of
// channels from its checkpoint into a scratch that stays in cache, then walks it in reverse. The
// per-step operands (step sizes, inputs, gates, gradients) are read and written in separate
// passes over whole rows of a unit's channels: one vector every E elements per step starves the
// hardware prefetcher, whole rows do not. Padded steps (t >= length) keep the state, and their
// output reads it.

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <class V, class R>
inline V splat(R s) {
  return V{} + s;
}

// 2^t = 2^k p(f), k = round(t), f = t - k in [-1/2, 1/2], p(f) = 1 + f q(f) with q a weighted
// least-squares fit on Chebyshev nodes (relative error of p below 1.6e-8 for float, 4e-17 for
// double). t is first clamped to [-lim, lim], beyond which 2^t is 0 or infinity in the type (so
// the result saturates to exactly those); NaN stays NaN. With AVX-512, k is rounded and applied
// by vrndscale and vscalef (which saturates by itself for finite t); otherwise k is rounded by
// adding 1.5 * 2^(mantissa bits), which leaves it in the low bits, and applied as two powers of
// two, each in the normal range.
template <class R>
struct Exp2Consts;

template <>
struct Exp2Consts<float> {
  static constexpr float lim = 200.0f, magic = 12582912.0f;
  static constexpr int bias = 127, mantissa = 23, degree = 6;
  static constexpr float q[degree] = {0.00015370704932138324f, 0.0013399848248809576f, 0.009618373587727547f,
                                      0.05550329014658928f, 0.24022647738456726f, 0.6931471824645996f};
};

template <>
struct Exp2Consts<double> {
  static constexpr double lim = 2000.0, magic = 6755399441055744.0;
  static constexpr int bias = 1023, mantissa = 52, degree = 11;
  static constexpr double q[degree] = {4.4307278984014654e-10, 7.073810155099862e-09, 1.0178229258049394e-07,
                                       1.3215435106247474e-06, 1.5252733412140717e-05, 0.00015403530457518835,
                                       0.0013333558146874727,  0.009618129107593736,   0.05550410866481954,
                                       0.24022650695910133,    0.6931471805599453};
};

#if defined(__AVX512F__)
// t clamped to [-lim, lim] (max/min return their second operand when either is NaN, so NaN passes),
// its nearest integer k, and p 2^k, for a vector V of float or double.
template <class V, class R>
inline V clamp_abs(V t, R lim) {
  if constexpr (sizeof(R) == 4)
    return (V)_mm512_min_ps(_mm512_set1_ps(lim), _mm512_max_ps(_mm512_set1_ps(-lim), (__m512)t));
  else
    return (V)_mm512_min_pd(_mm512_set1_pd(lim), _mm512_max_pd(_mm512_set1_pd(-lim), (__m512d)t));
}
template <class V>
inline V round_nearest(V t) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  if constexpr (sizeof(t[0]) == 4)
    return (V)_mm512_roundscale_ps((__m512)t, mode);
  else
    return (V)_mm512_roundscale_pd((__m512d)t, mode);
}
template <class V>
inline V scale2(V p, V k) {
  if constexpr (sizeof(p[0]) == 4)
    return (V)_mm512_scalef_ps((__m512)p, (__m512)k);
  else
    return (V)_mm512_scalef_pd((__m512d)p, (__m512d)k);
}
#endif

template <class R>
struct Simd {
  typedef R V __attribute__((vector_size(kVecBytes)));
  typedef std::conditional_t<sizeof(R) == 4, int32_t, int64_t> Int;
  typedef Int I __attribute__((vector_size(kVecBytes)));
  static constexpr int L = kVecBytes / sizeof(R);
  // FINITE: the caller knows t is finite or NaN, and the AVX-512 form skips the clamp (which
  // only maps infinities, beyond vscalef's own saturation, to 0 and infinity).
  template <bool FINITE = false>
  static V exp2(V t) {
    using C = Exp2Consts<R>;
#if defined(__AVX512F__)
    if (!FINITE) t = clamp_abs(t, C::lim);
    const V k = round_nearest(t);
#else
    t = t < -C::lim ? splat<V>(-C::lim) : t;
    t = t > C::lim ? splat<V>(C::lim) : t;
    const V magic = splat<V>(C::magic), tm = t + magic, k = tm - magic;
#endif
    const V f = t - k;
    V q = splat<V>(C::q[0]);
    for (int i = 1; i < C::degree; ++i) q = q * f + C::q[i];
    const V p = q * f + R(1);
#if defined(__AVX512F__)
    return scale2(p, k);
#else
    const I ki = (I)tm - (I)magic, k1 = ki >> 1, k2 = ki - k1;
    return p * (V)((k1 + C::bias) << C::mantissa) * (V)((k2 + C::bias) << C::mantissa);
#endif
  }
};

// log2(e), to turn exp(x) into exp2(x log2(e)).
template <class R>
constexpr R kLog2e = R(1.44269504088896340735992468100189214);

// N vectors of state: a plain array when N is fixed at compile time (NF > 0), which the compiler
// keeps in registers once the loops over n unroll; heap storage otherwise.
template <class V, int NF>
struct Lanes {
  V v[NF];
  explicit Lanes(int64_t) {}
  V& operator[](int64_t n) { return v[n]; }
};

template <class V>
struct Lanes<V, 0> {
  std::vector<V> v;
  explicit Lanes(int64_t n) : v(n) {}
  V& operator[](int64_t n) { return v[n]; }
};

// A vector from p, or to p. FULL: all its lanes; otherwise the first cnt (the rest read as 0).
template <bool FULL, class V, class R>
inline V load_part(const R* p, int cnt) {
  V v{};
  if (FULL)
    __builtin_memcpy(&v, p, sizeof(V));
  else
    for (int l = 0; l < cnt; ++l) v[l] = p[l];
  return v;
}

template <bool FULL, class V, class R>
inline void store_part(R* p, V v, int cnt) {
  if (FULL)
    __builtin_memcpy(p, &v, sizeof(V));
  else
    for (int l = 0; l < cnt; ++l) p[l] = v[l];
}

template <class V, class R>
inline V load_vec(const R* p) {
  return load_part<true, V>(p, 0);
}

// The same with cnt known only at run time: all lanes (cnt = L), or the first cnt of the last
// vector of a row whose length is not a multiple of L.
template <class V, class R>
inline V load_lanes(const R* p, int cnt) {
  return cnt == int(sizeof(V) / sizeof(R)) ? load_vec<V>(p) : load_part<false, V>(p, cnt);
}

template <class V, class R>
inline void store_lanes(R* p, V v, int cnt) {
  if (cnt == int(sizeof(V) / sizeof(R)))
    store_part<true>(p, v, cnt);
  else
    store_part<false>(p, v, cnt);
}

template <class V>
inline V sigmoid(V x) {
  using R = decltype(x[0] + 0);
  return R(1) / (Simd<R>::exp2(x * -kLog2e<R>) + R(1));
}

// log1p(y) = y P(y) on [0, 1], P a least-squares fit on Chebyshev nodes (relative error below
// 8.5e-9 for float, 2.7e-17 for double), coefficients from the highest degree down.
template <class R>
struct Log1pConsts;

template <>
struct Log1pConsts<float> {
  static constexpr int degree = 10;
  static constexpr float p[degree + 1] = {0.0020376904867589474f, -0.013444830663502216f, 0.04155762121081352f,
                                          -0.08253533393144608f,  0.12425103038549423f,   -0.1610863208770752f,
                                          0.19891537725925446f,   -0.24987392127513885f,  0.33332568407058716f,
                                          -0.4999998211860657f,   1.0f};
};

template <>
struct Log1pConsts<double> {
  static constexpr int degree = 20;
  static constexpr double p[degree + 1] = {
      2.5114001900888034e-05, -0.00028953020088755337, 0.0015850560125338633, -0.00551162876495279,
      0.013774744576437275,   -0.026649451120931616,   0.04219445835854525,   -0.05741097936274404,
      0.07029426422495635,    -0.08077991585419028,    0.09011825055727095,   -0.09980587359591535,
      0.11107399725660062,    -0.12499459526508468,    0.14285656074789715,   -0.16666662213064942,
      0.19999999771497465,    -0.2499999999279503,     0.3333333333321263,    -0.49999999999999195,
      1.0};
};

// Above this the softplus is its input (torch.nn.functional.softplus's threshold).
constexpr int kSoftplusThreshold = 20;

// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|), x itself above the threshold.
template <class V>
inline V softplus(V x) {
  using R = decltype(x[0] + 0);
  using C = Log1pConsts<R>;
  const V ax = x < R(0) ? -x : x;
  const V y = Simd<R>::exp2(ax * -kLog2e<R>);
  V p = splat<V>(C::p[0]);
  for (int i = 1; i <= C::degree; ++i) p = p * y + C::p[i];
  const V pos = x > R(0) ? x : V{};
  const V out = pos + y * p;
  return x > R(kSoftplusThreshold) ? x : out;
}

// d softplus(x) / dx: sigmoid(x), 1 above the threshold.
template <class V>
inline V softplus_slope(V x) {
  using R = decltype(x[0] + 0);
  return x > R(kSoftplusThreshold) ? splat<V>(R(1)) : sigmoid(x);
}

// Sizes, strides (in elements; the last dim of every tensor is contiguous) and operands.
template <class R>
struct SelArgs {
  int64_t B, T, E, N, K, parts;  // K: steps per checkpoint; parts: channel ranges per batch row
  int64_t use_softplus;           // the step size is softplus(delta + delta_bias), else delta + delta_bias
  int64_t sd_b, sd_t, su_b, su_t, sB_b, sB_t, sC_b, sC_t, sz_b, sz_t;
  const R *delta, *u, *Bm, *Cm, *A, *D, *z, *h0, *dbias;
  const int64_t* lengths;
  // Derived: vector blocks of channels, E padded to whole blocks, checkpoints per row, and the
  // per-channel operands padded with zeros so that a vector of channels is one load.
  int64_t nblk, Epad, nC;
  // (nblk, N, L): A and A log2(e), each vector block's N vectors together; (Epad): D, delta_bias.
  std::vector<R> At, At2, Dp, biasp;

  // Channels in vector block blk: L, fewer in the last one when E is not a multiple of L.
  int width(int64_t blk) const { return int(std::min<int64_t>(Simd<R>::L, E - blk * Simd<R>::L)); }

  // The step size from delta's row x at channels [e0, e0 + L), before (pre) and after the softplus.
  template <class V>
  V step_size(V x, int64_t e0, V* pre = nullptr) const {
    x += load_vec<V>(biasp.data() + e0);
    if (pre) *pre = x;
    return use_softplus ? softplus(x) : x;
  }
};

constexpr int kSelStrides = 10;
// Steps whose step sizes, inputs and gates are prepared together (see sel_forward_unit): enough
// to keep the scans of a group busy while the next group's rows arrive, few enough that the rows
// and the group's scratch stay in L2.
constexpr int64_t kSelGroup = 16;

template <class R>
void sel_setup(SelArgs<R>& a, const int64_t* dims, const int64_t* strides) {
  constexpr int L = Simd<R>::L;
  a.B = dims[0], a.T = dims[1], a.E = dims[2], a.N = dims[3], a.K = dims[4], a.parts = dims[5];
  a.use_softplus = dims[6];
  int64_t* s = &a.sd_b;
  for (int i = 0; i < kSelStrides; ++i) s[i] = strides[i];
  a.nblk = (a.E + L - 1) / L;
  a.Epad = a.nblk * L;
  a.nC = (a.T + a.K - 1) / a.K;
  a.At.assign(a.N * a.Epad, R(0));
  a.At2.assign(a.N * a.Epad, R(0));
  for (int64_t e = 0; e < a.E; ++e)
    for (int64_t n = 0; n < a.N; ++n) {
      const int64_t i = (e / L) * a.N * L + n * L + e % L;
      a.At[i] = a.A[e * a.N + n];
      a.At2[i] = a.A[e * a.N + n] * kLog2e<R>;
    }
  if (a.D) {
    a.Dp.assign(a.Epad, R(0));
    for (int64_t e = 0; e < a.E; ++e) a.Dp[e] = a.D[e];
  }
  a.biasp.assign(a.Epad, R(0));
  if (a.dbias)
    for (int64_t e = 0; e < a.E; ++e) a.biasp[e] = a.dbias[e];
}

// Runs body(b, p, blk0, blk1) for every unit: batch row b, its channel range p, made of the vector
// blocks [blk0, blk1). The units depend on the shape only, never on the thread count, so neither
// does the result.
template <class R, class Body>
void sel_units(const SelArgs<R>& a, int nthreads, const Body& body) {
  const int64_t units = a.B * a.parts;
  const int64_t work = a.B * a.T * a.E * a.N;
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>({int64_t(nthreads), units, work / kMinPerThread}));
  split_units(units, want, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / a.parts, p = u % a.parts;
      body(b, p, a.nblk * p / a.parts, a.nblk * (p + 1) / a.parts);
    }
  });
}

// One vector of channels [e0, e0 + L) of batch row b: its rows' starts and steps in time.
template <class R>
struct SelCursor {
  const R *delta, *u, *z, *Bm, *Cm;
  int64_t sd, su, sz, sB, sC;
  SelCursor(const SelArgs<R>& a, int64_t b, int64_t e0)
      : delta(a.delta + b * a.sd_b + e0),
        u(a.u + b * a.su_b + e0),
        z(a.z ? a.z + b * a.sz_b + e0 : nullptr),
        Bm(a.Bm + b * a.sB_b),
        Cm(a.Cm + b * a.sC_b),
        sd(a.sd_t), su(a.su_t), sz(a.sz_t), sB(a.sB_t), sC(a.sC_t) {}
};

// The scan of one vector of channels (block j of its unit) over the steps [g0, g1) of a group, of
// which [g0, gv) are valid: from its step sizes dl, inputs du and outputs so far (the skip) in the
// group's scratch, its state in `state` (N vectors), which it updates; y: its channels' column
// of the output, (T, E) with row stride E. NF: N fixed at compile time (the loops over n unroll
// and the state stays in registers), or 0.
template <class R, int NF>
void sel_scan_group(const SelArgs<R>& a, const SelCursor<R>& c, const R* At2, int64_t g0, int64_t gv, int64_t g1,
                    const typename Simd<R>::V* dls, const typename Simd<R>::V* dus, typename Simd<R>::V* outs,
                    typename Simd<R>::V* state, R* y) {
  using S = Simd<R>;
  using V = typename S::V;
  constexpr int L = S::L;
  const int64_t N = NF ? NF : a.N;
  Lanes<V, NF> h(N);
#pragma GCC unroll 32
  for (int64_t n = 0; n < N; ++n) h[n] = state[n];
  for (int64_t t = g0; t < gv; ++t) {
    if (t + kSelGroup < a.T) {  // the next group's rows, fetched while this one computes
      const int64_t tp = t + kSelGroup;
      __builtin_prefetch(c.u + tp * c.su);
      __builtin_prefetch(c.delta + tp * c.sd);
      if (c.z) __builtin_prefetch(c.z + tp * c.sz);
      __builtin_prefetch(y + tp * a.E, 1);
    }
    const V dl = dls[t - g0], du = dus[t - g0];
    const R* Bt = c.Bm + t * c.sB;
    const R* Ct = c.Cm + t * c.sC;
    V acc[2] = {outs[t - g0], V{}};  // two sums, half the latency of the chain
#pragma GCC unroll 32
    for (int64_t n = 0; n < N; ++n) {
      h[n] = S::template exp2<true>(dl * load_vec<V>(At2 + n * L)) * h[n] + du * Bt[n];
      acc[n & 1] += h[n] * Ct[n];
    }
    outs[t - g0] = acc[0] + acc[1];
  }
  for (int64_t t = gv; t < g1; ++t) {  // padding: the state is kept and read
    const R* Ct = c.Cm + t * c.sC;
    V acc = outs[t - g0];
#pragma GCC unroll 32
    for (int64_t n = 0; n < N; ++n) acc += h[n] * Ct[n];
    outs[t - g0] = acc;
  }
#pragma GCC unroll 32
  for (int64_t n = 0; n < N; ++n) state[n] = h[n];
}

// The forward of one unit (batch row b, vector blocks [blk0, blk1)). Time runs in groups of up to
// kSelGroup steps, each in three passes: the rows of delta and u of all the unit's channels (step
// sizes, their softplus, inputs, skip), the scan of each vector of channels in turn with its state
// in registers, and the rows of the output (gate, store). The passes over rows read and write
// whole rows of the unit's channels, which stream, rather than one vector every E elements; the
// scans read only the group's scratch, B and C, and prefetch the next group's rows meanwhile, so
// that the memory traffic overlaps the arithmetic.
template <class R, int NF>
void sel_forward_unit(const SelArgs<R>& a, int64_t b, int64_t blk0, int64_t blk1, R* y, R* hT, R* ckpt) {
  using S = Simd<R>;
  using V = typename S::V;
  constexpr int L = S::L;
  constexpr int64_t G = kSelGroup;
  const int64_t N = NF ? NF : a.N, T = a.T, E = a.E, Epad = a.Epad, nb = blk1 - blk0;
  const int64_t len = a.lengths ? a.lengths[b] : T;
  const bool skip = a.D != nullptr;
  std::vector<V> dls(nb * G), dus(nb * G), outs(nb * G), state(nb * N);
  std::vector<SelCursor<R>> cur;
  for (int64_t j = 0; j < nb; ++j) cur.emplace_back(a, b, (blk0 + j) * L);
  auto width = [&](int64_t j) { return a.width(blk0 + j); };
  auto load = [&](const R* p, int cnt) { return load_lanes<V>(p, cnt); };
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t e0 = (blk0 + j) * L;
    for (int64_t n = 0; n < N; ++n) state[j * N + n] = V{};
    if (a.h0)
      for (int l = 0; l < width(j); ++l)
        for (int64_t n = 0; n < N; ++n) state[j * N + n][l] = a.h0[(b * E + e0 + l) * a.N + n];
  }
  for (int64_t t0 = 0; t0 < T; t0 += a.K) {
    const int64_t t1 = std::min(T, t0 + a.K);
    if (ckpt)
      for (int64_t j = 0; j < nb; ++j) {
        R* ck = ckpt + ((b * a.nC + t0 / a.K) * N) * Epad + (blk0 + j) * L;
        for (int64_t n = 0; n < N; ++n) __builtin_memcpy(ck + n * Epad, &state[j * N + n], sizeof(V));
      }
    for (int64_t g0 = t0; g0 < t1; g0 += G) {
      const int64_t g1 = std::min(t1, g0 + G), gv = std::min(g1, std::max(g0, len));
      for (int64_t t = g0; t < g1; ++t)
        for (int64_t j = 0; j < nb; ++j) {
          const SelCursor<R>& c = cur[j];
          const int64_t i = j * G + t - g0;
          const V uu = t < gv || skip ? load(c.u + t * c.su, width(j)) : V{};
          if (t < gv) {
            dls[i] = a.step_size(load(c.delta + t * c.sd, width(j)), (blk0 + j) * L);
            dus[i] = dls[i] * uu;
          }
          outs[i] = skip ? load_vec<V>(a.Dp.data() + (blk0 + j) * L) * uu : V{};
        }
      for (int64_t j = 0; j < nb; ++j)
        sel_scan_group<R, NF>(a, cur[j], a.At2.data() + (blk0 + j) * L * N, g0, gv, g1, &dls[j * G], &dus[j * G],
                              &outs[j * G], &state[j * N], y + b * T * E + (blk0 + j) * L);
      for (int64_t t = g0; t < g1; ++t)
        for (int64_t j = 0; j < nb; ++j) {
          const SelCursor<R>& c = cur[j];
          V out = outs[j * G + t - g0];
          if (c.z) {
            const V zz = load(c.z + t * c.sz, width(j));
            out *= zz * sigmoid(zz);
          }
          store_lanes(y + (b * T + t) * E + (blk0 + j) * L, out, width(j));
        }
    }
  }
  for (int64_t j = 0; j < nb; ++j)
    for (int l = 0; l < width(j); ++l)
      for (int64_t n = 0; n < N; ++n) hT[(b * E + (blk0 + j) * L + l) * a.N + n] = state[j * N + n][l];
}

template <class R, int NF>
void sel_forward(const SelArgs<R>& a, R* y, R* hT, R* ckpt, int nthreads) {
  sel_units(a, nthreads, [&](int64_t b, int64_t, int64_t blk0, int64_t blk1) {
    sel_forward_unit<R, NF>(a, b, blk0, blk1, y, hT, ckpt);
  });
}

// Gradients. ddelta, du, dz: (B, T, E); dBp, dCp: (parts, B, T, N) per channel range (summed by
// the caller); dAp: (B, E, N), dDp and dbiasp (delta_bias): (B, E) per batch row (summed by the
// caller); dh0: (B, E, N).
template <class R>
struct SelGrads {
  const R *gy, *ghT;
  R *ddelta, *du, *dBp, *dCp, *dAp, *dDp, *dz, *dh0, *dbiasp;
};

// What one unit's backward keeps. Per chunk and vector of channels j: the per-step operands (step
// size, input, their product, the gated output gradient, the factor of dz, the softplus slope)
// and the partial sums over n of the per-step gradients, (nb, K) each; per chunk, the decays and
// states of the vector being walked, and the (t, n) sums over the unit's channels of dB and dC,
// still as lanes, (K, N) each; per vector of channels, across chunks, the carried state gradient,
// dA, dD and d delta_bias.
template <class V>
struct SelScratch {
  int64_t K;
  std::vector<V> dl, u, du, gy, gz, slope, s, dd, y;  // (nb, K)
  std::vector<V> as, hs, dB, dC;                      // (K, N)
  std::vector<V> carry, dA, dD, dBias;                // (nb, N), (nb, N), (nb,), (nb,)
  SelScratch(int64_t K_, int64_t N, int64_t nb)
      : K(K_), dl(nb * K), u(nb * K), du(nb * K), gy(nb * K), gz(nb * K), slope(nb * K), s(nb * K), dd(nb * K),
        y(nb * K), as(K * N), hs(K * N), dB(K * N), dC(K * N), carry(nb * N), dA(nb * N), dD(nb), dBias(nb) {}
};

// The reverse walk over the chunk for vector j and the state indices [n0, n0 + NS) (NS = 0: all
// N), adding their terms to the per-step sums s = sum_n g_n B_n, dd = sum_n q_n A_n,
// y = sum_n h_n C_n. In slices of n, the carried gradient and dA of a slice fit in registers.
template <class R, int NS>
void sel_reverse_slice(const SelArgs<R>& a, const SelCursor<R>& c, int64_t j, int64_t n0, int64_t ns, int64_t t0,
                       int64_t tv, int64_t t1, const typename Simd<R>::V* hstart, const R* At,
                       SelScratch<typename Simd<R>::V>& w) {
  using V = typename Simd<R>::V;
  constexpr int L = Simd<R>::L;
  const int64_t N = a.N, S = NS ? NS : ns, o = j * w.K - t0;  // o: step t's index in the (nb, K) arrays
  V* carry = w.carry.data() + j * N + n0;
  V* dA = w.dA.data() + j * N + n0;
  Lanes<V, NS> gl(S), dAl(S);
#pragma GCC unroll 32
  for (int64_t i = 0; i < S; ++i) gl[i] = carry[i], dAl[i] = dA[i];
  for (int64_t t = t1 - 1; t >= tv; --t) {  // padding: only the read of the kept state
    const V gy = w.gy[o + t];
    const R* Ct = c.Cm + t * c.sC + n0;
    const V* ht = w.hs.data() + (t - t0) * N + n0;
    V* dCt = w.dC.data() + (t - t0) * N + n0;
    V yv = w.y[o + t];
#pragma GCC unroll 32
    for (int64_t i = 0; i < S; ++i) {
      gl[i] += gy * Ct[i];
      dCt[i] += gy * ht[i];
      yv += ht[i] * Ct[i];
    }
    w.y[o + t] = yv;
  }
  for (int64_t t = tv - 1; t >= t0; --t) {
    const int64_t tt = t - t0;
    const V gy = w.gy[o + t], dl = w.dl[o + t], du = w.du[o + t];
    const R* Bt = c.Bm + t * c.sB + n0;
    const R* Ct = c.Cm + t * c.sC + n0;
    const V* ht = w.hs.data() + tt * N + n0;
    const V* at = w.as.data() + tt * N + n0;
    const V* hp = tt > 0 ? ht - N : hstart + n0;
    V* dBt = w.dB.data() + tt * N + n0;
    V* dCt = w.dC.data() + tt * N + n0;
    V yv = w.y[o + t], s = w.s[o + t], dd = w.dd[o + t];
#pragma GCC unroll 32
    for (int64_t i = 0; i < S; ++i) {
      const V gn = gl[i] + gy * Ct[i];
      dCt[i] += gy * ht[i];
      yv += ht[i] * Ct[i];
      const V qn = gn * (at[i] * hp[i]);  // the gradient of delta A's term
      dd += qn * load_vec<V>(At + (n0 + i) * L);
      dAl[i] += qn * dl;
      s += gn * Bt[i];
      dBt[i] += gn * du;
      gl[i] = gn * at[i];
    }
    w.y[o + t] = yv, w.s[o + t] = s, w.dd[o + t] = dd;
  }
#pragma GCC unroll 32
  for (int64_t i = 0; i < S; ++i) carry[i] = gl[i], dA[i] = dAl[i];
}

// The chunk [t0, t1) of vector j (channels from e0): recompute its decays and states from the
// checkpoint, then walk it in reverse. The state gradient carried from step t + 1 (multiplied by
// its decay) plus gy_t C_t is the gradient of the state after step t.
template <class R, int NF>
void sel_backward_block(const SelArgs<R>& a, const R* ckpt, const SelCursor<R>& c, int64_t b, int64_t e0,
                        int64_t j, int64_t t0, int64_t tv, int64_t t1, SelScratch<typename Simd<R>::V>& w) {
  using S = Simd<R>;
  using V = typename S::V;
  constexpr int L = S::L;
  const int64_t N = NF ? NF : a.N, Epad = a.Epad, o = j * w.K - t0;
  const R* At = a.At.data() + e0 * N;  // this vector's (N, L)
  const R* At2 = a.At2.data() + e0 * N;
  Lanes<V, NF> hstart(N), h(N);
  const R* ck = ckpt + ((b * a.nC + t0 / a.K) * N) * Epad + e0;
#pragma GCC unroll 32
  for (int64_t n = 0; n < N; ++n) hstart[n] = h[n] = load_vec<V>(ck + n * Epad);
  for (int64_t t = t0; t < tv; ++t) {
    const V dl = w.dl[o + t], du = w.du[o + t];
    const R* Bt = c.Bm + t * c.sB;
    V* at = w.as.data() + (t - t0) * N;
    V* ht = w.hs.data() + (t - t0) * N;
#pragma GCC unroll 32
    for (int64_t n = 0; n < N; ++n) {
      const V an = S::template exp2<true>(dl * load_vec<V>(At2 + n * L));
      h[n] = an * h[n] + du * Bt[n];
      at[n] = an;
      ht[n] = h[n];
    }
  }
  for (int64_t t = tv; t < t1; ++t)
#pragma GCC unroll 32
    for (int64_t n = 0; n < N; ++n) w.hs[(t - t0) * N + n] = h[n];
  constexpr int kSlice = 8;
  if constexpr (NF > 0 && NF % kSlice == 0) {
    for (int64_t n0 = 0; n0 < N; n0 += kSlice)
      sel_reverse_slice<R, kSlice>(a, c, j, n0, kSlice, t0, tv, t1, &hstart[0], At, w);
  } else {
    sel_reverse_slice<R, NF>(a, c, j, 0, N, t0, tv, t1, &hstart[0], At, w);
  }
}

// The backward of one unit (batch row b, channel range p made of vector blocks [blk0, blk1)),
// chunk by chunk in reverse. As in the forward, the per-step operands and gradients are read and
// written in passes over whole rows of the unit's channels, and the chunk's walk goes one vector
// of channels at a time.
template <class R, int NF>
void sel_backward_unit(const SelArgs<R>& a, const R* ckpt, const SelGrads<R>& g, int64_t b, int64_t p,
                       int64_t blk0, int64_t blk1) {
  using V = typename Simd<R>::V;
  constexpr int L = Simd<R>::L;
  const int64_t N = a.N, T = a.T, E = a.E, K = a.K, nb = blk1 - blk0;
  const int64_t len = a.lengths ? a.lengths[b] : T;
  const bool skip = a.D != nullptr;
  SelScratch<V> w(K, N, nb);
  std::vector<SelCursor<R>> cur;
  for (int64_t j = 0; j < nb; ++j) cur.emplace_back(a, b, (blk0 + j) * L);
  auto width = [&](int64_t j) { return a.width(blk0 + j); };
  auto load = [&](const R* ptr, int cnt) { return load_lanes<V>(ptr, cnt); };
  auto store = [&](R* ptr, V v, int cnt) { store_lanes(ptr, v, cnt); };
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t e0 = (blk0 + j) * L;
    for (int64_t n = 0; n < N; ++n) {
      V v{};
      if (g.ghT)
        for (int l = 0; l < width(j); ++l) v[l] = g.ghT[(b * E + e0 + l) * N + n];
      w.carry[j * N + n] = v;
    }
  }
  for (int64_t c = a.nC - 1; c >= 0; --c) {
    const int64_t t0 = c * K, t1 = std::min(T, t0 + K), tv = std::min(t1, std::max(t0, len));
    std::fill(w.dB.begin(), w.dB.begin() + (t1 - t0) * N, V{});
    std::fill(w.dC.begin(), w.dC.begin() + (t1 - t0) * N, V{});
    // The per-step operands, independent of the state.
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < nb; ++j) {
        const SelCursor<R>& cj = cur[j];
        const int64_t i = j * K + t - t0, e0 = (blk0 + j) * L;
        const bool valid = t < tv;
        const V go = load(g.gy + (b * T + t) * E + e0, width(j));
        w.u[i] = valid || skip ? load(cj.u + t * cj.su, width(j)) : V{};
        w.gy[i] = go;
        if (cj.z) {
          const V zz = load(cj.z + t * cj.sz, width(j)), sig = sigmoid(zz);
          w.gy[i] = go * (zz * sig);
          w.gz[i] = go * (sig * (zz * (R(1) - sig) + R(1)));  // d silu(z) / dz = sig (1 + z (1 - sig))
        }
        if (valid) {
          V pre;
          w.dl[i] = a.step_size(load(cj.delta + t * cj.sd, width(j)), e0, &pre);
          w.du[i] = w.dl[i] * w.u[i];
          if (a.use_softplus) w.slope[i] = softplus_slope(pre);
        }
        w.s[i] = w.dd[i] = w.y[i] = V{};
      }
    for (int64_t j = 0; j < nb; ++j)
      sel_backward_block<R, NF>(a, ckpt, cur[j], b, (blk0 + j) * L, j, t0, tv, t1, w);
    // The per-step gradients from the sums over n.
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t i = j * K + t - t0, e0 = (blk0 + j) * L, row = (b * T + t) * E + e0;
        const V uu = w.u[i], gy = w.gy[i];
        V dU{}, dDelta{}, yv = w.y[i];
        if (t < tv) {
          dU = w.dl[i] * w.s[i];
          dDelta = w.dd[i] + uu * w.s[i];  // of the step size; then of delta (and delta_bias)
          if (a.use_softplus) dDelta *= w.slope[i];
          w.dBias[j] += dDelta;
        }
        if (skip) {
          const V Dv = load_vec<V>(a.Dp.data() + e0);
          dU += Dv * gy;
          w.dD[j] += gy * uu;
          yv += Dv * uu;
        }
        store(g.ddelta + row, dDelta, width(j));
        store(g.du + row, dU, width(j));
        if (cur[j].z && g.dz) store(g.dz + row, w.gz[i] * yv, width(j));
      }
    // Lanes -> this channel range's share of dB and dC.
    R* dBo = g.dBp + ((p * a.B + b) * T + t0) * N;
    R* dCo = g.dCp + ((p * a.B + b) * T + t0) * N;
    for (int64_t i = 0; i < (t1 - t0) * N; ++i) {
      R sb = 0, sc = 0;
      for (int l = 0; l < L; ++l) sb += w.dB[i][l], sc += w.dC[i][l];
      dBo[i] = sb, dCo[i] = sc;
    }
  }
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t e0 = (blk0 + j) * L;
    for (int l = 0; l < width(j); ++l) {
      for (int64_t n = 0; n < N; ++n) {
        g.dAp[(b * E + e0 + l) * N + n] = w.dA[j * N + n][l];
        if (g.dh0) g.dh0[(b * E + e0 + l) * N + n] = w.carry[j * N + n][l];
      }
      if (g.dDp) g.dDp[b * E + e0 + l] = w.dD[j][l];
      if (g.dbiasp) g.dbiasp[b * E + e0 + l] = w.dBias[j][l];
    }
  }
}

template <class R, int NF>
void sel_backward(const SelArgs<R>& a, const R* ckpt, const SelGrads<R>& g, int nthreads) {
  sel_units(a, nthreads, [&](int64_t b, int64_t p, int64_t blk0, int64_t blk1) {
    sel_backward_unit<R, NF>(a, ckpt, g, b, p, blk0, blk1);
  });
}

// N = 16 (Mamba's default) in fp32 with the state in registers; every other N and fp64 (the
// reference dtype) through the loops over a run-time N, which keeps the compile time down.
template <class R>
void sel_dispatch_fwd(const SelArgs<R>& a, R* y, R* hT, R* ckpt, int nthreads) {
  if (std::is_same_v<R, float> && a.N == 16)
    sel_forward<R, std::is_same_v<R, float> ? 16 : 0>(a, y, hT, ckpt, nthreads);
  else
    sel_forward<R, 0>(a, y, hT, ckpt, nthreads);
}

template <class R>
void sel_dispatch_bwd(const SelArgs<R>& a, const R* ckpt, const SelGrads<R>& g, int nthreads) {
  if (std::is_same_v<R, float> && a.N == 16)
    sel_backward<R, std::is_same_v<R, float> ? 16 : 0>(a, ckpt, g, nthreads);
  else
    sel_backward<R, 0>(a, ckpt, g, nthreads);
}


// ---------------------------------------------------------------------------------------------
// Causal depthwise convolution over time with its input history (rnnkit.ops.short_conv, mode
// "fused"), channels-last: per batch row b and channel d,
//   y_t = act(bias_d + sum_{s<W} w_{d,s} x_{t-W+1+s}),   x_{-k} = state_{b,d,W-1-k} for k = 1..W-1,
// act the identity or SiLU. Vectors run across channels, so every step reads one row of x and
// writes one row of y; the W - 1 rows before it are still in L1. The backward recomputes the
// pre-activation and scatters each step's gradient into the W rows it read, keeping the W - 1
// not yet complete in a small window: one read of x and of the output's gradient, one write of
// the input's gradient.

struct ConvDims {
  int64_t B, T, D, W, parts, silu;
  int64_t sx_b, sx_t;  // strides of x's batch and time dims
};

template <class R>
struct ConvArgs {
  ConvDims d;
  const R *x, *state;                 // x (B, T, D) strided; state (B, D, W-1) or null (zeros)
  int64_t nblk, Dpad;
  std::vector<R> Wt, bias;            // (W, Dpad) weight transposed; (Dpad) bias (zeros if none)
  ConvArgs(const int64_t* dims, const R* x_, const R* w, const R* b, const R* state_) : x(x_), state(state_) {
    constexpr int L = Simd<R>::L;
    int64_t* p = &d.B;
    for (int i = 0; i < 8; ++i) p[i] = dims[i];
    nblk = (d.D + L - 1) / L;
    Dpad = nblk * L;
    Wt.assign(d.W * Dpad, R(0));
    bias.assign(Dpad, R(0));
    for (int64_t c = 0; c < d.D; ++c) {
      for (int64_t s = 0; s < d.W; ++s) Wt[s * Dpad + c] = w[c * d.W + s];
      if (b) bias[c] = b[c];
    }
  }
  // Runs body(b, blk0, blk1) over the (batch row, channel range) units; as sel_units.
  template <class Body>
  void units(int nthreads, const Body& body) const {
    const int64_t n = d.B * d.parts;
    const int64_t want = std::max<int64_t>(1, std::min<int64_t>({int64_t(nthreads), n, d.B * d.T * d.D / kMinPerThread}));
    split_units(n, want, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / d.parts, p = u % d.parts;
        body(b, nblk * p / d.parts, nblk * (p + 1) / d.parts);
      }
    });
  }
  int width(int64_t blk) const { return int(std::min<int64_t>(Simd<R>::L, d.D - blk * Simd<R>::L)); }
  // Input row t of channels [c0, c0 + cnt) of row b: x, or the history hist (oldest first) for t < 0.
  template <class V>
  V input(const V* hist, int64_t b, int64_t t, int64_t c0, int cnt) const {
    return t >= 0 ? load_lanes<V>(x + b * d.sx_b + t * d.sx_t + c0, cnt) : hist[d.W - 1 + t];
  }
  // The W - 1 history vectors of channels [c0, c0 + cnt) of row b, oldest first.
  template <class V>
  void history(int64_t b, int64_t c0, int cnt, V* out) const {
    for (int64_t k = 0; k < d.W - 1; ++k) {
      V v{};
      if (state)
        for (int l = 0; l < cnt; ++l) v[l] = state[((b * d.D) + c0 + l) * (d.W - 1) + k];
      out[k] = v;
    }
  }
};

// The forward of one unit (batch row b, vector blocks [blk0, blk1)): step by step, one row of x
// and y across the unit's channels; the W - 1 rows before it are still in cache.
template <class R>
void conv_forward_unit(const ConvArgs<R>& a, int64_t b, int64_t blk0, int64_t blk1, R* y) {
  using V = typename Simd<R>::V;
  constexpr int L = Simd<R>::L;
  const int64_t T = a.d.T, D = a.d.D, W = a.d.W, Dpad = a.Dpad, nb = blk1 - blk0;
  std::vector<V> hist(nb * W);  // (nb, W - 1) history vectors, oldest first
  for (int64_t j = 0; j < nb; ++j) a.history(b, (blk0 + j) * L, a.width(blk0 + j), &hist[j * W]);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t c0 = (blk0 + j) * L;
      const int cnt = a.width(blk0 + j);
      V acc = load_vec<V>(a.bias.data() + c0);
      for (int64_t s = 0; s < W; ++s)
        acc += load_vec<V>(a.Wt.data() + s * Dpad + c0) * a.input(&hist[j * W], b, t - W + 1 + s, c0, cnt);
      if (a.d.silu) acc *= sigmoid(acc);
      store_lanes(y + (b * T + t) * D + c0, acc, cnt);
    }
}

// The backward of one unit: step by step, the pre-activation recomputed, its gradient scattered
// into the W input rows it read; input row i's gradient is complete (and written) once step
// i + W - 1 has added to it. dx (B, T, D), dstate (B, D, W-1) or null, dwp (B, D, W) and dbp (B, D)
// per batch row (summed by the caller).
template <class R>
void conv_backward_unit(const ConvArgs<R>& a, int64_t b, int64_t blk0, int64_t blk1, const R* gy, R* dx, R* dstate,
                        R* dwp, R* dbp) {
  using V = typename Simd<R>::V;
  constexpr int L = Simd<R>::L;
  const int64_t T = a.d.T, D = a.d.D, W = a.d.W, Dpad = a.Dpad, nb = blk1 - blk0;
  // Per vector block j: its history, the partial gradients of the W input rows the current step
  // reads (win[j * W + s]: of row t - W + 1 + s), and the sums of dw and db.
  std::vector<V> hist(nb * W), win(nb * W), dw(nb * W), db(nb);
  for (int64_t j = 0; j < nb; ++j) a.history(b, (blk0 + j) * L, a.width(blk0 + j), &hist[j * W]);
  auto emit = [&](int64_t i, int64_t c0, int cnt, V v) {
    if (i >= 0)
      store_lanes(dx + (b * T + i) * D + c0, v, cnt);
    else if (dstate)
      for (int l = 0; l < cnt; ++l) dstate[((b * D) + c0 + l) * (W - 1) + (W - 1 + i)] = v[l];
  };
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t c0 = (blk0 + j) * L;
      const int cnt = a.width(blk0 + j);
      const V* hj = &hist[j * W];
      V* wj = &win[j * W];
      V gp = load_lanes<V>(gy + (b * T + t) * D + c0, cnt);
      if (a.d.silu) {
        V pre = load_vec<V>(a.bias.data() + c0);
        for (int64_t s = 0; s < W; ++s)
          pre += load_vec<V>(a.Wt.data() + s * Dpad + c0) * a.input(hj, b, t - W + 1 + s, c0, cnt);
        const V sig = sigmoid(pre);
        gp *= sig * (pre * (R(1) - sig) + R(1));
      }
      db[j] += gp;
      for (int64_t s = 0; s < W; ++s) {
        wj[s] += load_vec<V>(a.Wt.data() + s * Dpad + c0) * gp;
        dw[j * W + s] += gp * a.input(hj, b, t - W + 1 + s, c0, cnt);
      }
      emit(t - W + 1, c0, cnt, wj[0]);
      for (int64_t s = 0; s + 1 < W; ++s) wj[s] = wj[s + 1];
      wj[W - 1] = V{};
    }
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t c0 = (blk0 + j) * L;
    const int cnt = a.width(blk0 + j);
    for (int64_t s = 0; s + 1 < W; ++s) emit(T - W + 1 + s, c0, cnt, win[j * W + s]);
    for (int l = 0; l < cnt; ++l) {
      for (int64_t s = 0; s < W; ++s) dwp[((b * D) + c0 + l) * W + s] = dw[j * W + s][l];
      dbp[b * D + c0 + l] = db[j][l];
    }
  }
}

template <class R>
void conv_forward(const ConvArgs<R>& a, R* y, int nthreads) {
  a.units(nthreads, [&](int64_t b, int64_t blk0, int64_t blk1) { conv_forward_unit(a, b, blk0, blk1, y); });
}

template <class R>
void conv_backward(const ConvArgs<R>& a, const R* gy, R* dx, R* dstate, R* dwp, R* dbp, int nthreads) {
  a.units(nthreads, [&](int64_t b, int64_t blk0, int64_t blk1) {
    conv_backward_unit(a, b, blk0, blk1, gy, dx, dstate, dwp, dbp);
  });
}

// The arithmetic ceiling of the selective scan's forward (benchmarks/mamba_speed.py): per element
// one exp, by the kernel's own exp2, and one FMA, on values held in registers (no memory traffic),
// 8 independent vectors per thread so that latency is hidden. Each pass updates
// x <- x - 2^-20 exp(x), so that nothing is loop-invariant and x stays in [-1, 0]. Returns the sum
// of the final values, so that the work cannot be optimised away.
template <class R>
R exp_fma_ceiling(int64_t passes, int nthreads) {
  using V = typename Simd<R>::V;
  constexpr int kIndependent = 8;
  std::vector<R> sums(std::max(nthreads, 1), R(0));
  split_units(std::max(nthreads, 1), std::max(nthreads, 1), [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      V x[kIndependent];
      for (int k = 0; k < kIndependent; ++k)
        for (int l = 0; l < Simd<R>::L; ++l) x[k][l] = -R(k * Simd<R>::L + l + 1) / R(kIndependent * Simd<R>::L);
      for (int64_t i = 0; i < passes; ++i)
#pragma GCC unroll 8
        for (int k = 0; k < kIndependent; ++k) x[k] = Simd<R>::exp2(x[k] * kLog2e<R>) * R(-1.0 / (1 << 20)) + x[k];
      R total = 0;
      for (int k = 0; k < kIndependent; ++k)
        for (int l = 0; l < Simd<R>::L; ++l) total += x[k][l];
      sums[u] = total;
    }
  });
  R total = 0;
  for (R v : sums) total += v;
  return total;
}

}  // namespace

#define RNNKIT_ROWS_EXPORT(suffix, R)                                                                   \
  extern "C" void rnnkit_row_pass_##suffix(int64_t rows, int64_t D, int64_t group, const R* x, int64_t x_rs, \
                                           int64_t x_cs, const R* a, const R* vec, int64_t vec_gs,     \
                                           const R* s, const R* s_full, R* out, const R* y, const R* yvec, \
                                           int64_t yvec_gs, R* dot, const R* w, R* col, int flags, int nthreads) { \
    row_pass<R>(rows, D, group, x, x_rs, x_cs, a, vec, vec_gs, s, s_full, out, y, yvec, yvec_gs, dot, w, col, \
                flags, nthreads);                                                                       \
  }

RNNKIT_ROWS_EXPORT(f32, float)
RNNKIT_ROWS_EXPORT(f64, double)

#define RNNKIT_SCAN_EXPORT(suffix, R, fwd, bwd)                                                          \
  extern "C" void rnnkit_scan_fwd_##suffix(const R* a, const R* b, const R* h0, R* h, int64_t B, int64_t T, \
                                           int64_t S, int nthreads) {                                   \
    fwd<R>(a, b, h0, h, B, T, S, nthreads);                                                             \
  }                                                                                                     \
  extern "C" void rnnkit_scan_bwd_##suffix(const R* a, const R* h, const R* h0, const R* gh, R* da, R* db, \
                                           R* dh0, int64_t B, int64_t T, int64_t S, int nthreads) {     \
    bwd<R>(a, h, h0, gh, da, db, dh0, B, T, S, nthreads);                                               \
  }

RNNKIT_SCAN_EXPORT(f32, float, fwd_real, bwd_real)
RNNKIT_SCAN_EXPORT(f64, double, fwd_real, bwd_real)
RNNKIT_SCAN_EXPORT(c64, float, fwd_complex, bwd_complex)
RNNKIT_SCAN_EXPORT(c128, double, fwd_complex, bwd_complex)

#define RNNKIT_SELECTIVE_EXPORT(suffix, R)                                                              \
  extern "C" void rnnkit_selective_fwd_##suffix(const int64_t* dims, const int64_t* strides, const R* delta, \
                                                const R* u, const R* Bm, const R* Cm, const R* A, const R* D, \
                                                const R* z, const R* dbias, const R* h0, const int64_t* lengths, \
                                                R* y, R* hT, R* ckpt, int nthreads) {                   \
    SelArgs<R> a;                                                                                       \
    a.delta = delta, a.u = u, a.Bm = Bm, a.Cm = Cm, a.A = A, a.D = D, a.z = z, a.dbias = dbias;        \
    a.h0 = h0, a.lengths = lengths;                                                                     \
    sel_setup(a, dims, strides);                                                                        \
    sel_dispatch_fwd(a, y, hT, ckpt, nthreads);                                                         \
  }                                                                                                     \
  extern "C" void rnnkit_selective_bwd_##suffix(const int64_t* dims, const int64_t* strides, const R* delta, \
                                                const R* u, const R* Bm, const R* Cm, const R* A, const R* D, \
                                                const R* z, const R* dbias, const int64_t* lengths, const R* ckpt, \
                                                const R* gy, const R* ghT, R* ddelta, R* du, R* dBp, R* dCp, \
                                                R* dAp, R* dDp, R* dz, R* dh0, R* dbiasp, int nthreads) { \
    SelArgs<R> a;                                                                                       \
    a.delta = delta, a.u = u, a.Bm = Bm, a.Cm = Cm, a.A = A, a.D = D, a.z = z, a.dbias = dbias;        \
    a.h0 = nullptr, a.lengths = lengths;                                                                \
    sel_setup(a, dims, strides);                                                                        \
    SelGrads<R> g{gy, ghT, ddelta, du, dBp, dCp, dAp, dDp, dz, dh0, dbiasp};                            \
    sel_dispatch_bwd(a, ckpt, g, nthreads);                                                             \
  }

RNNKIT_SELECTIVE_EXPORT(f32, float)
RNNKIT_SELECTIVE_EXPORT(f64, double)

#define RNNKIT_CONV_EXPORT(suffix, R)                                                                   \
  extern "C" void rnnkit_conv_fwd_##suffix(const int64_t* dims, const R* x, const R* w, const R* bias,   \
                                           const R* state, R* y, int nthreads) {                        \
    conv_forward(ConvArgs<R>(dims, x, w, bias, state), y, nthreads);                                    \
  }                                                                                                     \
  extern "C" void rnnkit_conv_bwd_##suffix(const int64_t* dims, const R* x, const R* w, const R* bias,   \
                                           const R* state, const R* gy, R* dx, R* dstate, R* dwp, R* dbp, \
                                           int nthreads) {                                              \
    conv_backward(ConvArgs<R>(dims, x, w, bias, state), gy, dx, dstate, dwp, dbp, nthreads);            \
  }

RNNKIT_CONV_EXPORT(f32, float)
RNNKIT_CONV_EXPORT(f64, double)

// Elements per thread of the ceiling: passes * 8 vectors of lanes each.
extern "C" double rnnkit_exp_fma_ceiling_f32(int64_t passes, int nthreads) {
  return exp_fma_ceiling<float>(passes, nthreads);
}
extern "C" double rnnkit_exp_fma_ceiling_f64(int64_t passes, int nthreads) {
  return exp_fma_ceiling<double>(passes, nthreads);
}

// Elements per vector of the channels-last kernels (selective scan, convolution), which pad their
// per-channel operands and checkpoints to whole vectors.
extern "C" int rnnkit_lanes_f32() { return Simd<float>::L; }
extern "C" int rnnkit_lanes_f64() { return Simd<double>::L; }

// Lets the loader check that the library it opened is the one built from this source.
extern "C" int rnnkit_scan_abi_version() { return 6; }
