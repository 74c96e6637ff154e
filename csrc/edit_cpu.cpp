// The fused ReFT edit on the CPU: forward and backward of every intervention type in one pass over the
// edited rows each, registered in the dispatcher as reft_kernels_cpp::edit_fwd / edit_bwd (CPU and Meta).
//
// Same contract as the Triton kernels (reft_kernels/ops/fused_edit.py, whose module docstring gives the
// formula). For an edited row h (d wide):
//     z = W h + b (source_linear) ; s = act(z) or b ; delta = s - (L h + pb) (subtract_proj) or s
//     y = h + L^T delta ; out = dropout(y) (whole row, training only)
// - hidden [B, T, d] is edited in place; positions [B, P] name rows, -1 or out of range = empty slot; a
//   position named twice in a batch row is edited once, by its first slot, and its gradient counted once.
// - Everything is computed in fp32 whatever the storage (fp32, fp16, bf16 hidden; parameters of any of
//   those): fp16/bf16 rows (and fp32 rows with a column stride) are widened into a per-thread fp32
//   buffer right after the load; fp32 rows with unit stride are read and edited where they lie.
// - Per-slot stats [N, 2, R_PAD] fp32 hold z and delta for the backward (zeros for slots that edit
//   nothing), R_PAD = max(16, next power of two >= r), the Triton kernels' layout.
// - Dropout draws Triton's Philox (tl.rand(seed, n * d + col), 10 rounds), so a mask is bit-for-bit the
//   one the Triton kernels draw for the same seed.
// - Parameter gradients are summed per thread chunk in fp32, then the chunks in a fixed order: the result
//   depends on the thread count, never on scheduling.
//
// Ops (schemas at the end of the file):
// - edit_fwd / edit_bwd: the two halves, CPU and Meta kernels. torch.compile traces these, through the
//   Python autograd.Function of fused_edit.py, like the Triton ops.
// - edit: the whole differentiable edit for eager calls, with its autograd formula registered here (a
//   C++ autograd::Function). A Python autograd.Function round trip costs ~150 us of host time per
//   forward+backward on this repository's 2-core CPU machines, more than the arithmetic of 16 rows.
//   Its check_positions flag raises a ValueError for position values outside [-1, T) (the public
//   function's check, done here in the pass that maps slots to rows); edit_fwd never checks. Calls
//   without gradients go on to the device's kernel: the CPU one here, or the CUDA one of edit_cuda.cu
//   (the CUDA host path, a separate extension built with nvcc where there is a GPU).
//
// Vectorization: the inner loops over d work on fp32 rows, blocked so that they stay in L1 (kTokens,
// kCols below), with independent accumulators (or 8-lane vector-extension values) so that the compiler
// vectorizes them without -ffast-math; the loader compiles this file with the widest ISA the machine
// has (AVX2/FMA or AVX-512), see extension.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "activations.h"
#include "validation.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace reft_cpp {
namespace {

// ------------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------------

int64_t r_pad(int64_t r) {
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

// The row of hidden each slot edits (b * T + t), or -1: the slot is empty, out of range, or names a
// position an earlier slot of its batch row already names. check: raise a ValueError (the message of
// validation.check_positions) for values outside [-1, T) instead; the public function asks for it on
// eager calls, which saves the Python-side min/max pass (~10 us a call).
// (Every ATen call costs ~1 us through the dispatcher on these machines, so CPU int64 positions, the
// common case, are read as they are.)
std::vector<int64_t> slot_rows(const at::Tensor& positions, int64_t T, bool check = false) {
  at::Tensor pos = positions;
  if (!pos.is_cpu()) pos = pos.cpu();
  if (pos.scalar_type() != at::kLong) pos = pos.to(at::kLong);
  pos = pos.contiguous();
  const int64_t B = pos.size(0), P = pos.size(1);
  const int64_t* p = pos.data_ptr<int64_t>();
  if (check && B * P > 0) {
    const auto [lo, hi] = std::minmax_element(p, p + B * P);
    TORCH_CHECK_VALUE(*lo >= -1 && *hi < T, "positions must lie in [-1, T) with T=", T,
                      " (-1 = no edit), got values in [", *lo, ", ", *hi, "]");
  }
  std::vector<int64_t> rows(B * P, -1);
  std::vector<std::pair<int64_t, int64_t>> seen;
  for (int64_t b = 0; b < B; ++b) {
    seen.clear();
    for (int64_t j = 0; j < P; ++j) {
      const int64_t t = p[b * P + j];
      if (t >= 0 && t < T) seen.emplace_back(t, j);
    }
    // first slot per position: a stable sort by position keeps slot order among equals
    std::stable_sort(seen.begin(), seen.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
    for (size_t k = 0; k < seen.size(); ++k)
      if (k == 0 || seen[k].first != seen[k - 1].first) rows[b * P + seen[k].second] = b * T + seen[k].first;
  }
  return rows;
}

// t as a contiguous fp32 tensor: t itself when it already is one, unless `copy` (a parameter that shares memory
// with the rows being edited must be read as it was before the edit).
at::Tensor as_fp32(const at::Tensor& t, bool copy = false) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return copy ? t.clone() : t;
  return t.to(at::kFloat).contiguous();
}

// The checks both ops share (validation.h; the Python wrapper's messages): x (hidden or grad_out) a CPU
// [B, T, d] float tensor, positions [B, P] int32/int64 (their values never index memory: out-of-range slots
// are empty), lift [r, d] with 1 <= r <= d, weight [r, d] exactly when source_linear, everything on x's
// device. Returns r.
int64_t check_common(const at::Tensor& x, const char* x_name, const at::Tensor& positions, const at::Tensor& lift,
                     const std::optional<at::Tensor>& weight, bool source_linear, double dropout) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "reft_kernels_cpp: ", x_name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 3, x_name, " must be [B, T, d], got shape ", x.sizes());
  TORCH_CHECK_TYPE(reft_checks::kernel_float(x.scalar_type()), x_name,
                   " must have a dtype in [float32, float16, bfloat16], got ", x.scalar_type());
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(0) == x.size(0), "positions must be [B, P] with B=",
                    x.size(0), " (", x_name, "'s batch), got shape ", positions.sizes());
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt,
                   "positions must be int32 or int64, got ", positions.scalar_type());
  TORCH_CHECK_VALUE(positions.device().is_cpu(), "positions must be on the CPU or on hidden's device cpu, got ",
                    positions.device());
  const int64_t r = reft_checks::check_lift(lift, x);
  reft_checks::check_weight(weight, source_linear, lift, x);
  reft_checks::check_dropout(dropout);
  return r;
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
int64_t n_chunks(int64_t rows, int64_t d) {
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

template <typename T>
void edit_fwd_rows(T* X, T* saved, const FwdArgs& a) {
  const int64_t grain = std::max<int64_t>(kTokens, (1 << 15) / std::max<int64_t>(1, a.d * (a.r + 1)));
  // fp32 rows with unit stride are edited where they lie, other rows in a widened buffer: skipping the
  // load and store passes took the fp32 forward from 55 to 39-45 us at N = 16, 184 to 142 us at N = 64
  // (d = 4096, r = 4, one thread; the backward reads grad_out and the saved rows the same way: 135 -> 96 us
  // and 457 -> 302 us)
  const bool direct = std::is_same<T, float>::value && a.sd == 1;
  at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) {
    Scratch buf(direct ? 0 : kTokens * a.d);
    std::vector<float> z(kTokens * a.r), q(kTokens * a.r), delta(kTokens * a.r);
    int64_t slots[kTokens];
    T* h[kTokens];
    float* x[kTokens];
    int nt = 0;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t row = a.row_of_slot[n];
      if (row < 0) {
        if (a.stats) std::fill(a.stats + n * 2 * a.rp, a.stats + (n + 1) * 2 * a.rp, 0.0f);
        if (saved)
          for (int64_t c = 0; c < a.d; ++c) saved[n * a.d + c] = T(0);
        continue;
      }
      slots[nt] = n;
      h[nt] = X + (row / a.T) * a.sb + (row % a.T) * a.st;
      if (saved) copy_row(h[nt], a.sd, saved + n * a.d, 1, a.d);
      if (direct) {
        x[nt] = reinterpret_cast<float*>(h[nt]);
      } else {
        x[nt] = buf.data() + nt * a.d;
        load_row(h[nt], a.sd, a.d, x[nt]);
      }
      if (++nt == kTokens) {
        fwd_block(nt, slots, h, x, direct, z.data(), q.data(), delta.data(), a);
        nt = 0;
      }
    }
    if (nt) fwd_block(nt, slots, h, x, direct, z.data(), q.data(), delta.data(), a);
  });
}

std::tuple<at::Tensor, at::Tensor> edit_fwd_impl(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift, const std::optional<at::Tensor>& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proj_bias, bool source_linear, bool subtract_proj,
    c10::string_view act, double dropout, int64_t seed, int64_t save, bool check_positions) {
  const int64_t r = check_common(hidden, "hidden", positions, lift, weight, source_linear, dropout);
  reft_checks::check_vector(bias, "bias", r, hidden);
  const bool has_pb = proj_bias.has_value() && proj_bias->defined();
  reft_checks::check_proj_bias(has_pb, subtract_proj);
  if (has_pb) reft_checks::check_vector(*proj_bias, "proj_bias", r, hidden);
  TORCH_CHECK_VALUE(save >= 0 && save <= 2, "save must be 0 (nothing), 1 (stats) or 2 (stats and rows), got ", save);
  const int act_id = act_code(std::string(act));
  reft_checks::check_no_internal_overlap(hidden);
  const int64_t B = hidden.size(0), T = hidden.size(1), d = hidden.size(2), P = positions.size(1);
  const int64_t N = B * P, rp = r_pad(r);
  at::Tensor saved = save >= 2 ? at::empty({N, d}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor stats = save >= 1 ? at::empty({N, 2, rp}, hidden.options().dtype(at::kFloat))
                               : at::empty({0}, hidden.options().dtype(at::kFloat));
  if (N == 0 || d == 0) return {saved, stats};
  const std::vector<int64_t> rows = slot_rows(positions, T, check_positions);
  // A parameter that shares memory with hidden (a view of it) is read from a copy: the rows are edited where
  // they lie, and the parameter must read as it was before the edit (what the torch reference computes).
  // Positions are read into row_of_slot above, before any write.
  using reft_checks::overlaps;
  const at::Tensor L = as_fp32(lift, overlaps(lift, hidden)), b = as_fp32(bias, overlaps(bias, hidden));
  const at::Tensor W = source_linear ? as_fp32(*weight, overlaps(*weight, hidden)) : at::Tensor();
  const at::Tensor pb = has_pb ? as_fp32(*proj_bias, overlaps(*proj_bias, hidden)) : at::Tensor();
  FwdArgs a{N, P, T, d, r, rp, hidden.stride(0), hidden.stride(1), hidden.stride(2), rows.data(),
            L.data_ptr<float>(), source_linear ? W.data_ptr<float>() : nullptr, b.data_ptr<float>(),
            has_pb ? pb.data_ptr<float>() : nullptr, source_linear, subtract_proj, act_id,
            static_cast<float>(dropout), static_cast<uint64_t>(seed), save >= 1 ? stats.data_ptr<float>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "reft_edit_fwd_cpu", [&] {
    edit_fwd_rows<scalar_t>(hidden.data_ptr<scalar_t>(), save >= 2 ? saved.data_ptr<scalar_t>() : nullptr, a);
  });
  return {saved, stats};
}

// The registered forward: out-of-range positions are empty slots (the Triton ops' contract).
std::tuple<at::Tensor, at::Tensor> edit_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift, const std::optional<at::Tensor>& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proj_bias, bool source_linear, bool subtract_proj,
    c10::string_view act, double dropout, int64_t seed, int64_t save) {
  return edit_fwd_impl(hidden, positions, lift, weight, bias, proj_bias, source_linear, subtract_proj, act, dropout,
                       seed, save, false);
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

template <typename T>
void edit_bwd_rows(const T* G, const T* U, T* DX, int64_t dx_b, int64_t dx_t, int64_t dx_d,
                   const std::vector<int64_t>& row_of_slot, const BwdArgs& a, at::Tensor& grads) {
  // Items are all B*T rows when the hidden gradient is written (edited rows computed, the others copied
  // through), else the N slots.
  const bool row_major = DX != nullptr;
  const int64_t n_items = row_major ? static_cast<int64_t>(row_of_slot.size() / a.P) * a.T : a.N;
  std::vector<int64_t> slot_of_row;
  if (row_major) {
    slot_of_row.assign(n_items, -1);
    for (int64_t n = 0; n < a.N; ++n)
      if (row_of_slot[n] >= 0) slot_of_row[row_of_slot[n]] = n;
  }
  const int64_t chunks = n_chunks(n_items, a.d);
  const int64_t ld = part_ld(a.d), n_mats = a.source_linear ? 2 : 1, n_vecs = a.has_proj_bias ? 2 : 1;
  const int64_t Mp = (n_mats * ld + n_vecs) * a.r;  // a chunk's sums, padded rows (part_ld)
  std::vector<float> part(chunks * Mp);  // zero-filled
  float* part_ptr = part.data();
  const int64_t per_chunk = (n_items + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    constexpr bool fp32 = std::is_same<T, float>::value;
    // buffered rows: grad_out unless fp32 with unit stride and no dropout; the input rows unless fp32 saved
    // rows (recompute rebuilds them from the output, in the buffer)
    BwdBuffers w(a.d, a.r, !(fp32 && a.gd == 1 && a.p_drop == 0.0f),
                 (a.source_linear || a.subtract_proj) && (!fp32 || a.recompute));
    int64_t n[kTokens];
    const T* g_src[kTokens];
    const T* u_src[kTokens];
    T* dx[kTokens];
    for (int64_t c = c0; c < c1; ++c) {
      float* pc = part_ptr + c * Mp;
      const int64_t end = std::min(n_items, (c + 1) * per_chunk);
      int nt = 0;
      for (int64_t item = c * per_chunk; item < end; ++item) {
        int64_t slot, row;
        if (row_major) {
          row = item;
          slot = slot_of_row[item];
        } else {
          slot = item;
          row = row_of_slot[item];
          if (row < 0) continue;
        }
        const int64_t bi = row / a.T, ti = row % a.T;
        const T* g_row = G + bi * a.gb + ti * a.gt;
        T* dx_row = row_major ? DX + bi * dx_b + ti * dx_t : nullptr;
        if (slot < 0) {  // not edited: the gradient passes through bit for bit
          copy_row(g_row, a.gd, dx_row, dx_d, a.d);
          continue;
        }
        n[nt] = slot;
        g_src[nt] = g_row;
        u_src[nt] = a.recompute ? U + bi * a.ub + ti * a.ut : U + slot * a.d;
        dx[nt] = dx_row;
        if (++nt == kTokens) {
          bwd_block(nt, n, g_src, u_src, a.recompute ? a.ud : 1, dx, dx_d, a, pc, w);
          nt = 0;
        }
      }
      if (nt) bwd_block(nt, n, g_src, u_src, a.recompute ? a.ud : 1, dx, dx_d, a, pc, w);
    }
  });
  // grads = sum of the chunks' parts, in chunk order, into the flat layout
  float* out = grads.data_ptr<float>();
  for (int64_t m = 0; m < n_mats * a.r; ++m) {
    float* o = out + m * a.d;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* src = part_ptr + c * Mp + m * ld;
      if (c == 0) {
        for (int64_t j = 0; j < a.d; ++j) o[j] = src[j];
      } else {
        for (int64_t j = 0; j < a.d; ++j) o[j] += src[j];
      }
    }
  }
  for (int64_t j = 0; j < n_vecs * a.r; ++j) {
    float sum = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) sum += part_ptr[c * Mp + n_mats * a.r * ld + j];
    out[n_mats * a.r * a.d + j] = sum;
  }
}

std::tuple<at::Tensor, at::Tensor> edit_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& positions, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& output, const at::Tensor& stats, const at::Tensor& lift,
    const std::optional<at::Tensor>& weight, bool source_linear, bool subtract_proj, bool has_proj_bias,
    c10::string_view act, double dropout, int64_t seed, bool need_grad_hidden) {
  const int64_t r = check_common(grad_out, "grad_out", positions, lift, weight, source_linear, dropout);
  reft_checks::check_proj_bias(has_proj_bias, subtract_proj);
  const int64_t B = grad_out.size(0), T = grad_out.size(1), d = grad_out.size(2), P = positions.size(1);
  const int64_t N = B * P, rp = r_pad(r);
  const int act_id = act_code(std::string(act));
  // the saved tensors index memory by slot: their shapes must be exactly the forward's
  TORCH_CHECK_VALUE(stats.scalar_type() == at::kFloat && stats.dim() == 3 && stats.size(0) == N &&
                        stats.size(1) == 2 && stats.size(2) == rp && stats.device() == grad_out.device(),
                    "stats must be [N, 2, r_pad] = [", N, ", 2, ", rp, "] float32 on ", grad_out.device(),
                    " (edit_fwd's output with save >= 1), got ", stats.sizes(), " ", stats.scalar_type(), " on ",
                    stats.device());
  const int64_t n_mats = source_linear ? 2 : 1, M = n_mats * r * d + (has_proj_bias ? 2 : 1) * r;
  at::Tensor grads = at::empty({M}, grad_out.options().dtype(at::kFloat));  // written by edit_bwd_rows
  at::Tensor grad_hidden = need_grad_hidden ? at::empty({B, T, d}, grad_out.options()) : at::empty({0}, grad_out.options());
  if (N == 0 || B * T == 0 || d == 0) {
    grads.zero_();
    if (need_grad_hidden) grad_hidden.copy_(grad_out);
    return {grad_hidden, grads};
  }
  const bool recompute = !rows.has_value() || !rows->defined();
  TORCH_CHECK_VALUE(!recompute || (output.has_value() && output->defined() && output->sizes() == grad_out.sizes() &&
                                   output->scalar_type() == grad_out.scalar_type() &&
                                   output->device() == grad_out.device()),
                    "edit_bwd needs the saved rows [N, d] or the op's output (recompute) [B, T, d] in grad_out's "
                    "dtype and device; got output ", output.has_value() && output->defined() ? output->sizes()
                                                                                               : c10::IntArrayRef{});
  TORCH_CHECK_VALUE(recompute || (rows->dim() == 2 && rows->size(0) == N && rows->size(1) == d &&
                                  rows->scalar_type() == grad_out.scalar_type() && rows->device() == grad_out.device()),
                    "rows must be [N, d] = [", N, ", ", d, "] in grad_out's dtype and device, got ", rows->sizes(), " ",
                    rows->scalar_type());
  const std::vector<int64_t> row_of_slot = slot_rows(positions, T);
  const at::Tensor L = as_fp32(lift);
  const at::Tensor W = source_linear ? as_fp32(*weight) : at::Tensor();
  const at::Tensor st = stats.contiguous();
  const at::Tensor u = recompute ? *output : rows->contiguous();
  BwdArgs a{N, P, T, d, r, rp, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            recompute ? u.stride(0) : 0, recompute ? u.stride(1) : 0, recompute ? u.stride(2) : 1,
            L.data_ptr<float>(), source_linear ? W.data_ptr<float>() : nullptr, st.data_ptr<float>(),
            source_linear, subtract_proj, has_proj_bias, recompute, act_id,
            static_cast<float>(dropout), static_cast<uint64_t>(seed)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "reft_edit_bwd_cpu", [&] {
    scalar_t* dx = need_grad_hidden ? grad_hidden.data_ptr<scalar_t>() : nullptr;
    edit_bwd_rows<scalar_t>(grad_out.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), dx,
                            need_grad_hidden ? grad_hidden.stride(0) : 0, need_grad_hidden ? grad_hidden.stride(1) : 0,
                            need_grad_hidden ? grad_hidden.stride(2) : 0, row_of_slot, a, grads);
  });
  return {grad_hidden, grads};
}

// ------------------------------------------------------------------------------------------------
// Meta (shapes only: torch.compile and FakeTensor tracing)
// ------------------------------------------------------------------------------------------------

// Every tensor on x's device: the one check that needs no concrete shape (these kernels also trace symbolic
// ones). A call mixing meta tensors with CPU ones is sent here by the dispatcher, and would otherwise
// return without editing anything.
void check_meta_devices(const at::Tensor& x, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  for (const auto& [name, t] : ts)
    if (t != nullptr && t->defined()) reft_checks::check_device(*t, name, x);
}

const at::Tensor* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

std::tuple<at::Tensor, at::Tensor> edit_fwd_meta(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift, const std::optional<at::Tensor>& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proj_bias, bool, bool, c10::string_view, double, int64_t,
    int64_t save) {
  check_meta_devices(hidden, {{"positions", &positions}, {"lift", &lift}, {"weight", ptr(weight)}, {"bias", &bias},
                              {"proj_bias", ptr(proj_bias)}});
  const auto N = hidden.sym_size(0) * positions.sym_size(1);
  const int64_t rp = r_pad(lift.size(0));
  at::Tensor saved = save >= 2 ? at::empty_symint({N, hidden.sym_size(2)}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor stats = save >= 1 ? at::empty_symint({N, 2, rp}, hidden.options().dtype(at::kFloat))
                               : at::empty({0}, hidden.options().dtype(at::kFloat));
  return {saved, stats};
}

std::tuple<at::Tensor, at::Tensor> edit_bwd_meta(
    const at::Tensor& grad_out, const at::Tensor& positions, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& output, const at::Tensor& stats, const at::Tensor& lift,
    const std::optional<at::Tensor>& weight, bool source_linear, bool, bool has_proj_bias, c10::string_view, double,
    int64_t, bool need_grad_hidden) {
  check_meta_devices(grad_out, {{"positions", &positions}, {"rows", ptr(rows)}, {"output", ptr(output)},
                                {"stats", &stats}, {"lift", &lift}, {"weight", ptr(weight)}});
  const int64_t r = lift.size(0), d = lift.size(1);
  const int64_t M = (source_linear ? 2 : 1) * r * d + (has_proj_bias ? 2 : 1) * r;
  at::Tensor grad_hidden = need_grad_hidden ? at::empty_symint(grad_out.sym_sizes(), grad_out.options())
                                            : at::empty({0}, grad_out.options());
  return {grad_hidden, at::empty({M}, grad_out.options().dtype(at::kFloat))};
}

// edit's: the edit is in place, hidden is the result
at::Tensor edit_meta(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift,
                     const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                     const std::optional<at::Tensor>& proj_bias, bool, bool, c10::string_view, double, int64_t, bool,
                     bool) {
  check_meta_devices(hidden, {{"positions", &positions}, {"lift", &lift}, {"weight", ptr(weight)}, {"bias", &bias},
                              {"proj_bias", ptr(proj_bias)}});
  return hidden;
}

// ------------------------------------------------------------------------------------------------
// edit: forward and backward with the autograd formula in C++ (eager calls)
// ------------------------------------------------------------------------------------------------

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The gradient piece flat[offset : offset + prod(sizes)] (flat: 1-D, contiguous) as a contiguous tensor of
// the given shape sharing flat's storage, in like's dtype (a copy if that differs). Built without the
// dispatcher: narrow and view cost two ATen calls per gradient.
at::Tensor grad_piece(const at::Tensor& flat, int64_t offset, c10::IntArrayRef sizes, const at::Tensor& like) {
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(flat.storage()), flat.key_set(), flat.dtype());
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  impl->set_storage_offset(flat.storage_offset() + offset);
  impl->set_sizes_contiguous(sizes);
  return t.scalar_type() == like.scalar_type() ? t : t.to(like.scalar_type());
}

struct EditFunction : public torch::autograd::Function<EditFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor hidden, const at::Tensor& positions,
                            const at::Tensor& lift, const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& proj_bias, bool source_linear, bool subtract_proj,
                            std::string act, double dropout, int64_t seed, bool recompute, bool check_positions) {
    at::AutoDispatchBelowADInplaceOrView guard;
    recompute = recompute && dropout == 0.0;  // dropped elements cannot be rebuilt from the output
    auto [rows, stats] = edit_fwd_impl(hidden, positions, lift, weight, bias, proj_bias, source_linear, subtract_proj,
                                       act, dropout, seed, recompute ? 1 : 2, check_positions);
    ctx->mark_dirty({hidden});
    ctx->save_for_backward({positions, recompute ? at::Tensor() : rows, stats, lift, weight.value_or(at::Tensor()),
                            bias, proj_bias.value_or(at::Tensor()), recompute ? hidden : at::Tensor()});
    ctx->saved_data["source_linear"] = source_linear;
    ctx->saved_data["subtract_proj"] = subtract_proj;
    ctx->saved_data["act"] = act;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed"] = seed;
    return hidden;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &positions = saved[0], &rows = saved[1], &stats = saved[2], &lift = saved[3], &weight = saved[4],
                     &bias = saved[5], &proj_bias = saved[6], &output = saved[7];
    const bool source_linear = ctx->saved_data["source_linear"].toBool();
    const bool subtract_proj = ctx->saved_data["subtract_proj"].toBool();
    const bool has_pb = proj_bias.defined();
    torch::autograd::variable_list out(13);
    at::Tensor grad = grad_outputs[0];
    if (!grad.defined()) return out;
    const int64_t r = lift.size(0), d = lift.size(1);
    auto [grad_hidden, flat] = edit_bwd_cpu(
        grad, positions, opt(rows), opt(output), stats, lift, opt(weight), source_linear, subtract_proj, has_pb,
        ctx->saved_data["act"].toStringRef(), ctx->saved_data["dropout"].toDouble(), ctx->saved_data["seed"].toInt(),
        ctx->needs_input_grad(0));
    // (the parameter gradients are computed whether or not they are wanted: they are one pass of fused
    // axpys over rows already in registers/L1, and a frozen-parameter edit still needs the hidden gradient)
    // flat: [d_lift (r*d), d_weight (r*d, source_linear), d_bias (r), d_proj_bias (r, has_pb)], fp32
    // out is indexed by forward argument; needs_input_grad by tensor input present (weight and proj_bias
    // may be absent): hidden 0, positions 1, lift 2, then weight, bias, proj_bias as present
    const int64_t n_mats = source_linear ? 2 : 1;
    const size_t e_weight = 3, e_bias = source_linear ? 4 : 3, e_pb = e_bias + 1;
    if (ctx->needs_input_grad(0)) out[0] = grad_hidden;
    if (ctx->needs_input_grad(2)) out[2] = grad_piece(flat, 0, {r, d}, lift);
    if (source_linear && ctx->needs_input_grad(e_weight)) out[3] = grad_piece(flat, r * d, {r, d}, weight);
    if (ctx->needs_input_grad(e_bias)) out[4] = grad_piece(flat, n_mats * r * d, {r}, bias);
    if (has_pb && ctx->needs_input_grad(e_pb)) out[5] = grad_piece(flat, n_mats * r * d + r, {r}, proj_bias);
    return out;
  }
};

// The CPU kernel of edit: the forward alone, nothing saved (inference mode, and no-grad calls, which the
// Autograd kernel below sends on to the device's kernel).
at::Tensor edit_inference(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift,
                          const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                          const std::optional<at::Tensor>& proj_bias, bool source_linear, bool subtract_proj,
                          c10::string_view act, double dropout, int64_t seed, bool, bool check_positions) {
  edit_fwd_impl(hidden, positions, lift, weight, bias, proj_bias, source_linear, subtract_proj, act, dropout, seed, 0,
                check_positions);
  return hidden;
}

at::Tensor edit_autograd(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift,
                         const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& proj_bias, bool source_linear, bool subtract_proj,
                         c10::string_view act, double dropout, int64_t seed, bool recompute, bool check_positions) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (hidden.requires_grad() || lift.requires_grad() || bias.requires_grad() ||
                           (weight.has_value() && weight->requires_grad()) ||
                           (proj_bias.has_value() && proj_bias->requires_grad()));
  if (needs_grad) {
    TORCH_CHECK(hidden.device().is_cpu(), "reft_kernels_cpp::edit: its autograd formula runs CPU tensors; CUDA calls "
                "that need gradients take the Triton ops (reft_kernels.reft_edit routes them), got ", hidden.device());
    reft_checks::check_not_leaf(hidden);
    // A parameter that shares memory with hidden is cloned before the autograd Function (a differentiable
    // copy): the edit reads it as it was, and its gradient flows through the clone to what it viewed.
    const auto own = [&](const at::Tensor& x) { return reft_checks::overlaps(x, hidden) ? x.clone() : x; };
    const auto own_opt = [&](const std::optional<at::Tensor>& x) {
      return x.has_value() && x->defined() ? std::optional<at::Tensor>(own(*x)) : x;
    };
    return EditFunction::apply(hidden, positions, own(lift), own_opt(weight), own(bias), own_opt(proj_bias),
                               source_linear, subtract_proj, std::string(act), dropout, seed, recompute,
                               check_positions);
  }
  {
    // no gradient: the device's own kernel (CPU here, CUDA in edit_cuda.cu when that extension is loaded)
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("reft_kernels_cpp::edit", "")
                               .typed<decltype(edit_inference)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(hidden, positions, lift, weight, bias, proj_bias, source_linear, subtract_proj, act, dropout, seed,
            recompute, check_positions);
  }
  if (!hidden.is_inference()) torch::autograd::impl::bump_version(hidden);  // the in-place write, for autograd
  return hidden;
}

}  // namespace
}  // namespace reft_cpp

// The schemas are those of the Triton ops (reft_kernels::edit_fwd / edit_bwd in fused_edit.py).
TORCH_LIBRARY(reft_kernels_cpp, m) {
  m.def(
      "edit_fwd(Tensor(a0!) hidden, Tensor positions, Tensor lift, Tensor? weight, Tensor bias, Tensor? proj_bias, "
      "bool source_linear, bool subtract_proj, str act, float dropout, int seed, int save) -> (Tensor, Tensor)");
  m.def(
      "edit_bwd(Tensor grad_out, Tensor positions, Tensor? rows, Tensor? output, Tensor stats, Tensor lift, "
      "Tensor? weight, bool source_linear, bool subtract_proj, bool has_proj_bias, str act, float dropout, int seed, "
      "bool need_grad_hidden) -> (Tensor, Tensor)");
  m.def(
      "edit(Tensor(a!) hidden, Tensor positions, Tensor lift, Tensor? weight, Tensor bias, Tensor? proj_bias, "
      "bool source_linear, bool subtract_proj, str act, float dropout, int seed, bool recompute, "
      "bool check_positions=False) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(reft_kernels_cpp, Autograd, m) {
  m.impl("edit", &reft_cpp::edit_autograd);
}

TORCH_LIBRARY_IMPL(reft_kernels_cpp, CPU, m) {
  m.impl("edit_fwd", &reft_cpp::edit_fwd_cpu);
  m.impl("edit_bwd", &reft_cpp::edit_bwd_cpu);
  m.impl("edit", &reft_cpp::edit_inference);
}

TORCH_LIBRARY_IMPL(reft_kernels_cpp, Meta, m) {
  m.impl("edit_fwd", &reft_cpp::edit_fwd_meta);
  m.impl("edit_bwd", &reft_cpp::edit_bwd_meta);
  m.impl("edit", &reft_cpp::edit_meta);
}
