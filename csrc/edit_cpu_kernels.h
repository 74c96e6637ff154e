// The building blocks of the fused CPU edit, shared by the single-adapter kernels (edit_cpu.cpp) and the
// mixed-adapter ones (mixed_cpu.cpp): Philox dropout, the blocked dot/lift/outer-product loops, row loads
// and stores, and the per-block forward (fwd_block) and backward (bwd_block) of up to kTokens rows that share
// one set of parameters. The measurements quoted beside them were taken on the single-adapter op
// (edit_cpu.cpp's header says how); the formula and conventions are in that file's header too.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "activations.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

namespace reft_cpp {

// ------------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------------

inline int64_t r_pad(int64_t r) {
  int64_t p = 1;
  while (p < r) p <<= 1;
  return std::max<int64_t>(16, p);
}

using reft_act::act_code;
using reft_act::act_fwd;
using reft_act::act_grad;

// Triton's tl.rand(seed, offset): Philox 4x32, 10 rounds, counter (offset_lo, offset_hi, 0, 0), key
// (seed_lo, seed_hi); the first word as int32, folded to non-negative, times 2^-31 (rounded down).
inline float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint32_t a = c0, b = c2;
    c0 = static_cast<uint32_t>((uint64_t{0xCD9E8D57u} * b) >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>((uint64_t{0xD2511F53u} * a) >> 32) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * b;
    c3 = 0xD2511F53u * a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  if (x < 0) x = ~x;  // -x - 1 without overflow
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// x[c] *= keep(n, c) / (1 - p): the dropout of slot n's row (Triton's _keep_scale).
inline void dropout_row(float* x, int64_t d, int64_t n, uint64_t seed, float p) {
  const float scale = 1.0f / (1.0f - p);
  const uint64_t base = static_cast<uint64_t>(n) * static_cast<uint64_t>(d);
  for (int64_t c = 0; c < d; ++c) x[c] = philox_uniform(seed, base + c) >= p ? x[c] * scale : 0.0f;
}

constexpr int kLanes = 16;

// Cache blocking. Rows are edited in blocks of kTokens, and each pass over a block walks the columns in
// chunks of kCols: a chunk of every row of the block and of every parameter row (up to 8 for r = 4) stays
// in L1 (4 x 2 KB + 8 x 2 KB = 24 KB of Zen's 32 KB), so each parameter byte comes from L2 once per block
// instead of once per row (the parameters, 2 r d fp32, are 128 KB at d = 4096, r = 4). With outer_add and
// lift_add2 below, against one row at a time (LoReFT, d = 4096, r = 4, fp32, one thread, both builds
// interleaved in one process, medians of 8 rounds on this repository's 2-core CPU machines): forward
// 58 -> 55 us at N = 16 and 208 -> 192 us at N = 64; backward 139 -> 114 us and 530 -> 424 us.
// Blocks of 8 rows, or 256-column chunks, measured no faster (after the changes of part_ld and the direct
// fp32 rows below).
constexpr int kTokens = 4;
constexpr int64_t kCols = 512;

// 8 fp32 lanes (the GCC/Clang vector extension: one AVX2 register, or two SSE ones in the portable build);
// unaligned, and allowed to alias the float buffers it is read from.
// (-Wpsabi: in the portable build GCC notes that returning such a value is passed differently without
// AVX; these functions are internal and inlined, so no ABI is crossed)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float vf8 __attribute__((vector_size(32), aligned(4), may_alias));
inline vf8 vload(const float* p) { return *reinterpret_cast<const vf8*>(p); }
inline void vstore(float* p, vf8 v) { *reinterpret_cast<vf8*>(p) = v; }

// out[k] += <x[0:len], M[k][0:len]> for the r rows of M (row stride ld). Four rows share each pass over x,
// so eight vector accumulator chains run at once: one row per pass is bound by the FMA latency (84 us ->
// 39 us for the LoReFT forward at N = 16, d = 4096, r = 4 before blocking).
inline void dots(const float* x, const float* M, int64_t r, int64_t ld, int64_t len, float* out) {
  int64_t k = 0;
  for (; k + 4 <= r; k += 4) {
    const float *m0 = M + k * ld, *m1 = m0 + ld, *m2 = m1 + ld, *m3 = m2 + ld;
    float a0[kLanes] = {0}, a1[kLanes] = {0}, a2[kLanes] = {0}, a3[kLanes] = {0};
    int64_t c = 0;
    for (; c + kLanes <= len; c += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float xv = x[c + j];
        a0[j] += xv * m0[c + j];
        a1[j] += xv * m1[c + j];
        a2[j] += xv * m2[c + j];
        a3[j] += xv * m3[c + j];
      }
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    for (int j = 0; j < kLanes; ++j) {
      s0 += a0[j];
      s1 += a1[j];
      s2 += a2[j];
      s3 += a3[j];
    }
    for (; c < len; ++c) {
      s0 += x[c] * m0[c];
      s1 += x[c] * m1[c];
      s2 += x[c] * m2[c];
      s3 += x[c] * m3[c];
    }
    out[k] += s0, out[k + 1] += s1, out[k + 2] += s2, out[k + 3] += s3;
  }
  for (; k < r; ++k) {
    const float* m = M + k * ld;
    float a[2 * kLanes] = {0};
    int64_t c = 0;
    for (; c + 2 * kLanes <= len; c += 2 * kLanes)
      for (int j = 0; j < 2 * kLanes; ++j) a[j] += x[c + j] * m[c + j];
    float sum = 0.0f;
    for (int j = 0; j < 2 * kLanes; ++j) sum += a[j];
    for (; c < len; ++c) sum += x[c] * m[c];
    out[k] += sum;
  }
}

// y[0:len] = src[0:len] + sum_k coef[k] M[k][0:len] over the r rows of M (row stride ld), four rows per
// pass (src may be y).
inline void lift_add(const float* coef, const float* M, int64_t r, int64_t ld, int64_t len, const float* src,
                     float* y) {
  int64_t k = 0;
  for (; k + 4 <= r; k += 4, src = y) {
    const float *m0 = M + k * ld, *m1 = m0 + ld, *m2 = m1 + ld, *m3 = m2 + ld;
    const float c0 = coef[k], c1 = coef[k + 1], c2 = coef[k + 2], c3 = coef[k + 3];
    for (int64_t c = 0; c < len; ++c) y[c] = src[c] + (c0 * m0[c] + c1 * m1[c] + c2 * m2[c] + c3 * m3[c]);
  }
  for (; k < r; ++k, src = y) {
    const float* m = M + k * ld;
    const float ck = coef[k];
    for (int64_t c = 0; c < len; ++c) y[c] = src[c] + ck * m[c];
  }
}

// y[0:len] = src[0:len] + sum_k ca[k] A[k][0:len] + cb[k] B[k][0:len]: both lifts of the backward's hidden
// gradient in one pass (eight parameter rows per pass for r a multiple of 4; src may be y).
inline void lift_add2(const float* ca, const float* A, const float* cb, const float* B, int64_t r, int64_t ld,
                      int64_t len, const float* src, float* y) {
  int64_t k = 0;
  for (; k + 4 <= r; k += 4, src = y) {
    const float *a0 = A + k * ld, *a1 = a0 + ld, *a2 = a1 + ld, *a3 = a2 + ld;
    const float *b0 = B + k * ld, *b1 = b0 + ld, *b2 = b1 + ld, *b3 = b2 + ld;
    const float p0 = ca[k], p1 = ca[k + 1], p2 = ca[k + 2], p3 = ca[k + 3];
    const float q0 = cb[k], q1 = cb[k + 1], q2 = cb[k + 2], q3 = cb[k + 3];
    for (int64_t c = 0; c < len; ++c)
      y[c] = src[c] + ((p0 * a0[c] + p1 * a1[c] + p2 * a2[c] + p3 * a3[c]) +
                       (q0 * b0[c] + q1 * b1[c] + q2 * b2[c] + q3 * b3[c]));
  }
  if (k < r) {
    lift_add(ca + k, A + k * ld, r - k, ld, len, src, y);
    lift_add(cb + k, B + k * ld, r - k, ld, len, y, y);
  }
}

// sum_t coef[t r + k] v[t] over t < NT as a pairwise tree rather than a serial chain of FMAs, each waiting
// on the last (GCC does not reassociate without -ffast-math). A small gain: fp32 backward 316 -> 304 us at
// N = 64, bf16 442 -> 424 us (d = 4096, r = 4). The loop is bound by the L1 traffic of the gradient rows
// (see part_ld); a variant looping over parameter rows outside, coefficients held in registers, measured
// the same.
template <int NT>
inline vf8 tree(const float* coef, int64_t r, int64_t k, const vf8* v) {
  if constexpr (NT == 1) {
    return coef[k] * v[0];
  } else {
    constexpr int H = NT / 2;
    return tree<H>(coef, r, k, v) + tree<NT - H>(coef + H * r, r, k, v + H);
  }
}

// The parameter gradients of NT rows at once, over one column chunk:
//     dA[k] += sum_t ca[t r + k] g[t] + cb[t r + k] u[t]      (cb null: no u term)
//     dB[k] += sum_t cc[t r + k] u[t]                         (dB null: none)
// Each column vector of the NT rows of g and u is loaded once for all r parameter rows, and each
// parameter-gradient vector once per NT rows. One axpy per (row, parameter row) instead: 41 us -> 22 us
// for the dL update of 16 rows at d = 4096, r = 4 on this repository's 2-core CPU machines.
template <int NT>
void outer_add(const float* ca, const float* const* g, const float* cb, const float* cc, const float* const* u,
               int64_t r, int64_t ld, int64_t len, float* dA, float* dB) {
  const bool use_u = cb != nullptr || dB != nullptr;
  const int64_t lv = len & ~int64_t{7};
  for (int64_t c = 0; c < lv; c += 8) {
    vf8 gv[NT], uv[NT];
    for (int t = 0; t < NT; ++t) {
      gv[t] = vload(g[t] + c);
      uv[t] = use_u ? vload(u[t] + c) : gv[t];
    }
    for (int64_t k = 0; k < r; ++k) {
      vf8 s = tree<NT>(ca, r, k, gv);
      if (cb) s += tree<NT>(cb, r, k, uv);
      vstore(dA + k * ld + c, vload(dA + k * ld + c) + s);
      if (dB) vstore(dB + k * ld + c, vload(dB + k * ld + c) + tree<NT>(cc, r, k, uv));
    }
  }
  for (int64_t c = lv; c < len; ++c)
    for (int64_t k = 0; k < r; ++k) {
      float sa = dA[k * ld + c];
      for (int t = 0; t < NT; ++t) {
        sa += ca[t * r + k] * g[t][c];
        if (cb) sa += cb[t * r + k] * u[t][c];
      }
      dA[k * ld + c] = sa;
      if (dB) {
        float sb = dB[k * ld + c];
        for (int t = 0; t < NT; ++t) sb += cc[t * r + k] * u[t][c];
        dB[k * ld + c] = sb;
      }
    }
}

// Row copies are written as loops, and GCC is told not to turn them back into memcpy calls: glibc's
// memcpy (rep movsb) copies a hot 16 KB row in 6.7 us on this repository's AMD EPYC CPU machines, a
// vectorized loop in 0.3 us (measured; it made the forward 10x slower at N = 16, d = 4096).
#if defined(__GNUC__) && !defined(__clang__)
#define REFT_NO_MEMCPY __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define REFT_NO_MEMCPY
#endif

template <typename T>
REFT_NO_MEMCPY inline void load_row(const T* src, int64_t stride, int64_t d, float* dst) {
  if (stride == 1) {
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<float>(src[c]);
  } else {
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<float>(src[c * stride]);
  }
}

template <typename T>
REFT_NO_MEMCPY inline void store_row(const float* src, int64_t d, T* dst, int64_t stride) {
  if (stride == 1) {
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(src[c]);
  } else {
    for (int64_t c = 0; c < d; ++c) dst[c * stride] = static_cast<T>(src[c]);
  }
}

template <typename T>
REFT_NO_MEMCPY inline void copy_row(const T* src, int64_t src_stride, T* dst, int64_t dst_stride, int64_t d) {
  if (src_stride == 1 && dst_stride == 1) {
    if constexpr (sizeof(T) == 2) {  // bf16/fp16 as bits: GCC does not vectorize the c10 types' assignment
      // (the bf16 forward with its saved copy of 16 rows at d = 4096: 82 -> 63 us)
      const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
      uint16_t* t = reinterpret_cast<uint16_t*>(dst);
      for (int64_t c = 0; c < d; ++c) t[c] = s[c];
    } else {
      for (int64_t c = 0; c < d; ++c) dst[c] = src[c];
    }
  } else {
    for (int64_t c = 0; c < d; ++c) dst[c * dst_stride] = src[c * src_stride];
  }
}

// A per-thread fp32 scratch buffer of n floats, left uninitialized (std::vector would zero it: 128 KB
// of memset per backward call for the widened rows of a block at d = 4096).
struct Scratch {
  std::unique_ptr<float[]> p;
  explicit Scratch(int64_t n) : p(n > 0 ? new float[n] : nullptr) {}
  float* data() const { return p.get(); }
};

inline at::Tensor as_fp32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// Row stride of the backward's parameter-gradient sums: d plus one cache line (they are copied into the
// flat layout at the end). With a stride that is a multiple of 4 KB (d = 4096) the 2 r gradient rows, and
// the rows of grad_out and of the saved input beside them (16 KB apart as well), all fall into the same L1
// set at a given column, more lines than its 8 ways: the padding took the fp32 backward from 108 to 88 us
// at N = 16 and from 303 to 288 us at N = 64 (d = 4096, r = 4, one thread, this repository's 2-core CPU
// machines). Padding our widened-row buffers or copying L and W to padded rows measured no gain.
inline int64_t part_ld(int64_t d) { return d + 16; }

// Number of fixed row chunks for the parameter-gradient partial sums: enough work per chunk to pay for
// a thread, never more chunks than threads.
inline int64_t n_chunks(int64_t rows, int64_t d) {
  const int64_t work = std::max<int64_t>(1, rows * d / (1 << 15));
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), std::min(rows, work)));
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

struct FwdArgs {
  int64_t N, P, T, d, r, rp;
  int64_t sb, st, sd;  // hidden strides
  const int64_t* row_of_slot;
  const float* L;  // [r, d] fp32
  const float* W;  // [r, d] fp32 or null
  const float* b;  // [r]
  const float* pb;  // [r] or null
  bool source_linear, subtract_proj;
  int act;
  float p_drop;
  uint64_t seed;
  float* stats;  // [N, 2, rp] or null
};

// One block of nt <= kTokens edited rows: x[t] is row t in fp32 (hidden's own row, edited in place, when
// direct; else a widened copy, stored back to h[t] at the end), slots their slot numbers.
template <typename T>
void fwd_block(int nt, const int64_t* slots, T* const* h, float* const* x, bool direct, float* z, float* q,
               float* delta, const FwdArgs& a) {
  const int64_t d = a.d, r = a.r;
  std::fill(z, z + nt * r, 0.0f);
  std::fill(q, q + nt * r, 0.0f);
  for (int64_t c0 = 0; c0 < d; c0 += kCols) {
    const int64_t len = std::min(kCols, d - c0);
    for (int t = 0; t < nt; ++t) {
      if (a.source_linear) dots(x[t] + c0, a.W + c0, r, d, len, z + t * r);
      if (a.subtract_proj) dots(x[t] + c0, a.L + c0, r, d, len, q + t * r);
    }
  }
  for (int t = 0; t < nt; ++t)
    for (int64_t k = 0; k < r; ++k) {
      float& zk = z[t * r + k];
      float s;
      if (a.source_linear) {
        zk += a.b[k];
        s = act_fwd(zk, a.act);
      } else {
        zk = a.b[k];
        s = zk;
      }
      if (a.subtract_proj) s -= q[t * r + k] + (a.pb ? a.pb[k] : 0.0f);
      delta[t * r + k] = s;
    }
  for (int64_t c0 = 0; c0 < d; c0 += kCols) {  // x becomes y
    const int64_t len = std::min(kCols, d - c0);
    for (int t = 0; t < nt; ++t) lift_add(delta + t * r, a.L + c0, r, d, len, x[t] + c0, x[t] + c0);
  }
  for (int t = 0; t < nt; ++t) {
    if (a.p_drop > 0.0f) dropout_row(x[t], d, slots[t], a.seed, a.p_drop);
    if (!direct) store_row(x[t], d, h[t], a.sd);
    if (a.stats) {
      float* st = a.stats + slots[t] * 2 * a.rp;
      std::fill(st, st + 2 * a.rp, 0.0f);
      for (int64_t k = 0; k < r; ++k) {
        st[k] = z[t * r + k];
        st[a.rp + k] = delta[t * r + k];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

struct BwdArgs {
  int64_t N, P, T, d, r, rp;
  int64_t gb, gt, gd;  // grad_out strides
  int64_t ub, ut, ud;  // output strides (recompute)
  const float* L;
  const float* W;
  const float* stats;  // [N, 2, rp]: z, delta
  bool source_linear, subtract_proj, has_proj_bias, recompute;
  int act;
  float p_drop;
  uint64_t seed;
};

// Per-thread fp32 buffers of the backward: a block's grad_out rows and input rows (where they are not read
// in place), one column chunk of the hidden gradient, and per-row r-vectors: d_delta, dz, delta (from the
// stats), and coef, which holds -delta while the input rows are rebuilt (recompute) and -d_delta after that.
struct BwdBuffers {
  Scratch g, u, buf;  // (g, u: null where rows are read in place)
  std::vector<float> d_delta, dz, coef, delta;
  BwdBuffers(int64_t d, int64_t r, bool g_rows, bool u_rows)
      : g(g_rows ? kTokens * d : 0), u(u_rows ? kTokens * d : 0), buf(kCols), d_delta(kTokens * r),
        dz(kTokens * r), coef(kTokens * r), delta(kTokens * r) {}
};

// One block of nt <= kTokens edited rows (slot n[t], grad_out row g_src[t], input or output row u_src[t],
// hidden-gradient row dx[t] or null): writes their hidden gradients and adds their parameter gradients to
// part, row by row in block order (so the sums do not depend on the blocking of other threads). fp32 rows
// with unit stride are read (and the hidden gradient written) where they lie, unless they must be changed
// first (dropout of grad_out, recompute of the input rows); the others go through fp32 buffers.
template <typename T>
void bwd_block(int nt, const int64_t* n, const T* const* g_src, const T* const* u_src, int64_t u_stride, T* const* dx,
               int64_t dx_stride, const BwdArgs& a, float* part, BwdBuffers& w) {
  const int64_t d = a.d, r = a.r, ld = part_ld(d), rd = r * ld;
  float *buf = w.buf.data();
  float *d_delta = w.d_delta.data(), *dz = w.dz.data(), *coef = w.coef.data(), *dl = w.delta.data();
  const bool need_u = a.source_linear || a.subtract_proj;
  const bool g_direct = w.g.data() == nullptr, u_direct = w.u.data() == nullptr;
  const bool dx_direct = std::is_same<T, float>::value && dx_stride == 1;
  const float* g[kTokens];
  const float* u[kTokens];
  for (int t = 0; t < nt; ++t) {
    if (g_direct) {
      g[t] = reinterpret_cast<const float*>(g_src[t]);
    } else {
      float* gb = w.g.data() + t * d;
      load_row(g_src[t], a.gd, d, gb);
      if (a.p_drop > 0.0f) dropout_row(gb, d, n[t], a.seed, a.p_drop);
      g[t] = gb;
    }
    if (!need_u) {
      u[t] = g[t];  // unused
    } else if (u_direct) {
      u[t] = reinterpret_cast<const float*>(u_src[t]);
    } else {
      float* ub = w.u.data() + t * d;
      load_row(u_src[t], u_stride, d, ub);
      u[t] = ub;
    }
    const float* delta = a.stats + n[t] * 2 * a.rp + a.rp;
    for (int64_t k = 0; k < r; ++k) {
      dl[t * r + k] = delta[k];
      coef[t * r + k] = -delta[k];  // recompute: the input row is y - L^T delta
    }
  }
  std::fill(d_delta, d_delta + nt * r, 0.0f);
  for (int64_t c0 = 0; c0 < d; c0 += kCols) {
    const int64_t len = std::min(kCols, d - c0);
    for (int t = 0; t < nt; ++t) {
      dots(g[t] + c0, a.L + c0, r, d, len, d_delta + t * r);
      if (need_u && a.recompute) {  // the buffered input row: y - L^T delta
        float* ub = w.u.data() + t * d + c0;
        lift_add(coef + t * r, a.L + c0, r, d, len, ub, ub);
      }
    }
  }
  for (int t = 0; t < nt; ++t) {
    const float* z = a.stats + n[t] * 2 * a.rp;
    for (int64_t k = 0; k < r; ++k) {
      const float dd = d_delta[t * r + k];
      dz[t * r + k] = a.source_linear ? dd * act_grad(z[k], a.act) : dd;
      coef[t * r + k] = -dd;
    }
  }
  const int64_t n_mats = a.source_linear ? 2 : 1;
  for (int64_t c0 = 0; c0 < d; c0 += kCols) {
    const int64_t len = std::min(kCols, d - c0);
    for (int t = 0; t < nt; ++t) {
      const float* gt = g[t] + c0;
      if (dx[t]) {  // dh = g - L^T d_delta (subtract_proj) + W^T dz (source_linear)
        float* y = dx_direct ? reinterpret_cast<float*>(dx[t] + c0) : buf;
        if (a.subtract_proj && a.source_linear) {
          lift_add2(coef + t * r, a.L + c0, dz + t * r, a.W + c0, r, d, len, gt, y);
        } else if (a.subtract_proj) {
          lift_add(coef + t * r, a.L + c0, r, d, len, gt, y);
        } else if (a.source_linear) {
          lift_add(dz + t * r, a.W + c0, r, d, len, gt, y);
        } else {
          copy_row(gt, 1, y, 1, len);
        }
        if (!dx_direct) store_row(buf, len, dx[t] + c0 * dx_stride, dx_stride);
      }
    }
    // dL += delta g - d_delta u (or delta g), dW += dz u
    const float* gp[kTokens];
    const float* up[kTokens];
    for (int t = 0; t < nt; ++t) gp[t] = g[t] + c0, up[t] = u[t] + c0;
    const float* cb = a.subtract_proj ? coef : nullptr;
    float* dW = a.source_linear ? part + rd + c0 : nullptr;
    int t = 0;
    for (; t + 4 <= nt; t += 4)
      outer_add<4>(dl + t * r, gp + t, cb ? cb + t * r : nullptr, dz + t * r, up + t, r, ld, len, part + c0, dW);
    for (; t < nt; ++t)
      outer_add<1>(dl + t * r, gp + t, cb ? cb + t * r : nullptr, dz + t * r, up + t, r, ld, len, part + c0, dW);
  }
  for (int t = 0; t < nt; ++t)
    for (int64_t k = 0; k < r; ++k) {
      part[n_mats * rd + k] += dz[t * r + k];
      if (a.has_proj_bias) part[n_mats * rd + r + k] += coef[t * r + k];
    }
}

inline std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The gradient piece flat[offset : offset + prod(sizes)] (flat: 1-D, contiguous) as a contiguous tensor of
// the given shape sharing flat's storage, in like's dtype (a copy if that differs). Built without the
// dispatcher: narrow and view cost two ATen calls per gradient.
inline at::Tensor grad_piece(const at::Tensor& flat, int64_t offset, c10::IntArrayRef sizes, const at::Tensor& like) {
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(flat.storage()), flat.key_set(), flat.dtype());
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  impl->set_storage_offset(flat.storage_offset() + offset);
  impl->set_sizes_contiguous(sizes);
  return t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
}

}  // namespace reft_cpp
