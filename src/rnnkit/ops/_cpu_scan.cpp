// Fused CPU linear scan h_t = a_t * h_{t-1} + b_t and its reverse-scan backward (rnnkit.ops.scan),
// and the chunk kernels' fused row pass (rnnkit.ops._rows, at the end).
//
// Tensors are contiguous (B, T, S); complex ones are interleaved (re, im) pairs and S counts
// complex elements. Channels (b, s) are independent, so threads split the B * S channels into
// (batch row, block of s) units, and inside one unit the time loop runs outermost with the s loop
// innermost: each step reads one contiguous row of a and b and the previous row of h (still in L1),
// which the compiler vectorises. a and b are read once and h written once, the minimum traffic.
// No torch headers: this builds in about a second with a plain `g++ -O3 -shared`.

#include <algorithm>
#include <cstdint>
#include <thread>
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

// Lets the loader check that the library it opened is the one built from this source.
extern "C" int rnnkit_scan_abi_version() { return 5; }
