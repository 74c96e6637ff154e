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
//   those): rows are widened into a per-thread fp32 buffer right after the load.
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
//
// Vectorization: the inner loops over d (dot products and axpys on fp32 buffers that stay in L1) are
// written with 16 independent accumulators so the compiler vectorizes them without -ffast-math; the
// loader compiles this file with the widest ISA the machine has (AVX2/FMA or AVX-512), see extension.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
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

// Activation codes: reft_kernels/ops/activations.py SUPPORTED (the test suite checks every name).
int act_code(const std::string& act) {
  if (act == "identity" || act == "linear") return 0;
  if (act == "relu") return 1;
  if (act == "gelu") return 2;
  if (act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast") return 3;
  if (act == "silu" || act == "swish") return 4;
  if (act == "tanh") return 5;
  if (act == "sigmoid") return 6;
  if (act == "quick_gelu") return 7;
  TORCH_CHECK(false, "reft_kernels_cpp: act='", act, "' has no fused kernel; use backend='torch' for it");
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

inline float act_fwd(float z, int code) {
  switch (code) {
    case 0: return z;
    case 1: return z > 0.0f ? z : 0.0f;
    case 2: return 0.5f * z * (1.0f + std::erf(z * kInvSqrt2));
    case 3: return 0.5f * z * (1.0f + std::tanh(kSqrt2OverPi * (z + 0.044715f * z * z * z)));
    case 4: return z * sigmoid(z);
    case 5: return std::tanh(z);
    case 6: return sigmoid(z);
    default: return z * sigmoid(1.702f * z);
  }
}

inline float act_grad(float z, int code) {
  switch (code) {
    case 0: return 1.0f;
    case 1: return z > 0.0f ? 1.0f : 0.0f;
    case 2: return 0.5f * (1.0f + std::erf(z * kInvSqrt2)) + z * kInvSqrt2Pi * std::exp(-0.5f * z * z);
    case 3: {
      float t = std::tanh(kSqrt2OverPi * (z + 0.044715f * z * z * z));
      return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * z * z);
    }
    case 4: { float s = sigmoid(z); return s * (1.0f + z * (1.0f - s)); }
    case 5: { float t = std::tanh(z); return 1.0f - t * t; }
    case 6: { float s = sigmoid(z); return s * (1.0f - s); }
    default: { float s = sigmoid(1.702f * z); return s * (1.0f + 1.702f * z * (1.0f - s)); }
  }
}

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

// out[k] = <x, M[k]> for the r rows of M [r, d]. Four rows share each pass over x, so eight vector
// accumulator chains run at once: one row per pass is bound by the FMA latency (84 us -> 39 us for the
// LoReFT forward at N = 16, d = 4096, r = 4 on this repository's 2-core CPU machines).
inline void dots(const float* x, const float* M, int64_t r, int64_t d, float* out) {
  int64_t k = 0;
  for (; k + 4 <= r; k += 4) {
    const float *m0 = M + k * d, *m1 = m0 + d, *m2 = m1 + d, *m3 = m2 + d;
    float a0[kLanes] = {0}, a1[kLanes] = {0}, a2[kLanes] = {0}, a3[kLanes] = {0};
    int64_t c = 0;
    for (; c + kLanes <= d; c += kLanes)
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
    for (; c < d; ++c) {
      s0 += x[c] * m0[c];
      s1 += x[c] * m1[c];
      s2 += x[c] * m2[c];
      s3 += x[c] * m3[c];
    }
    out[k] = s0, out[k + 1] = s1, out[k + 2] = s2, out[k + 3] = s3;
  }
  for (; k < r; ++k) {
    const float* m = M + k * d;
    float a[2 * kLanes] = {0};
    int64_t c = 0;
    for (; c + 2 * kLanes <= d; c += 2 * kLanes)
      for (int j = 0; j < 2 * kLanes; ++j) a[j] += x[c + j] * m[c + j];
    float sum = 0.0f;
    for (int j = 0; j < 2 * kLanes; ++j) sum += a[j];
    for (; c < d; ++c) sum += x[c] * m[c];
    out[k] = sum;
  }
}

// y += sum_k coef[k] M[k] over the r rows of M [r, d], four rows per pass over y.
inline void lift_add(const float* coef, const float* M, int64_t r, int64_t d, float* y) {
  int64_t k = 0;
  for (; k + 4 <= r; k += 4) {
    const float *m0 = M + k * d, *m1 = m0 + d, *m2 = m1 + d, *m3 = m2 + d;
    const float c0 = coef[k], c1 = coef[k + 1], c2 = coef[k + 2], c3 = coef[k + 3];
    for (int64_t c = 0; c < d; ++c) y[c] += c0 * m0[c] + c1 * m1[c] + c2 * m2[c] + c3 * m3[c];
  }
  for (; k < r; ++k) {
    const float* m = M + k * d;
    const float ck = coef[k];
    for (int64_t c = 0; c < d; ++c) y[c] += ck * m[c];
  }
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t c = 0; c < n; ++c) y[c] += alpha * x[c];
}

// out += a x + b y
inline void axpby_add(float a, const float* x, float b, const float* y, float* out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) out[c] += a * x[c] + b * y[c];
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
    for (int64_t c = 0; c < d; ++c) dst[c] = src[c];
  } else {
    for (int64_t c = 0; c < d; ++c) dst[c * dst_stride] = src[c * src_stride];
  }
}

REFT_NO_MEMCPY inline void zero_floats(float* x, int64_t n) {
  for (int64_t c = 0; c < n; ++c) x[c] = 0.0f;
}

// The row of hidden each slot edits (b * T + t), or -1: the slot is empty, out of range, or names a
// position an earlier slot of its batch row already names.
std::vector<int64_t> slot_rows(const at::Tensor& positions, int64_t T) {
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t B = pos.size(0), P = pos.size(1);
  const int64_t* p = pos.data_ptr<int64_t>();
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

at::Tensor as_fp32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void check_common(const at::Tensor& x, const char* x_name, const at::Tensor& positions, const at::Tensor& lift,
                  const std::optional<at::Tensor>& weight, bool source_linear) {
  TORCH_CHECK(x.device().is_cpu(), "reft_kernels_cpp: ", x_name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, "reft_kernels_cpp: ", x_name, " must be [B, T, d], got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "reft_kernels_cpp: ", x_name,
              " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == x.size(0), "reft_kernels_cpp: positions must be [B, P] with B = ",
              x.size(0), ", got shape ", positions.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt,
              "reft_kernels_cpp: positions must be int32 or int64, got ", positions.scalar_type());
  TORCH_CHECK(lift.dim() == 2 && lift.size(1) == x.size(2), "reft_kernels_cpp: lift must be [r, d] with d = ", x.size(2),
              ", got shape ", lift.sizes());
  if (source_linear) {
    TORCH_CHECK(weight.has_value() && weight->sizes() == lift.sizes(), "reft_kernels_cpp: weight must be [r, d] = ",
                lift.sizes(), " when source_linear");
  }
}

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

template <typename T>
void edit_fwd_rows(T* X, T* saved, const FwdArgs& a) {
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, a.d * (a.r + 1)));
  at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> x(a.d), z(a.r), q(a.r), delta(a.r);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t row = a.row_of_slot[n];
      float* st = a.stats ? a.stats + n * 2 * a.rp : nullptr;
      if (row < 0) {
        if (st) std::fill(st, st + 2 * a.rp, 0.0f);
        if (saved)
          for (int64_t c = 0; c < a.d; ++c) saved[n * a.d + c] = T(0);
        continue;
      }
      T* h = X + (row / a.T) * a.sb + (row % a.T) * a.st;
      if (saved) copy_row(h, a.sd, saved + n * a.d, 1, a.d);
      load_row(h, a.sd, a.d, x.data());
      if (a.source_linear) dots(x.data(), a.W, a.r, a.d, z.data());
      if (a.subtract_proj) dots(x.data(), a.L, a.r, a.d, q.data());
      for (int64_t k = 0; k < a.r; ++k) {
        float s;
        if (a.source_linear) {
          z[k] += a.b[k];
          s = act_fwd(z[k], a.act);
        } else {
          z[k] = a.b[k];
          s = z[k];
        }
        if (a.subtract_proj) s -= q[k] + (a.pb ? a.pb[k] : 0.0f);
        delta[k] = s;
      }
      lift_add(delta.data(), a.L, a.r, a.d, x.data());  // x becomes y
      if (a.p_drop > 0.0f) dropout_row(x.data(), a.d, n, a.seed, a.p_drop);
      store_row(x.data(), a.d, h, a.sd);
      if (st) {
        std::fill(st, st + 2 * a.rp, 0.0f);
        for (int64_t k = 0; k < a.r; ++k) {
          st[k] = a.source_linear ? z[k] : a.b[k];
          st[a.rp + k] = delta[k];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> edit_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift, const std::optional<at::Tensor>& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proj_bias, bool source_linear, bool subtract_proj,
    c10::string_view act, double dropout, int64_t seed, int64_t save) {
  check_common(hidden, "hidden", positions, lift, weight, source_linear);
  const int64_t B = hidden.size(0), T = hidden.size(1), d = hidden.size(2), P = positions.size(1), r = lift.size(0);
  const int64_t N = B * P, rp = r_pad(r);
  TORCH_CHECK(bias.numel() == r, "reft_kernels_cpp: bias must be [r] with r = ", r, ", got shape ", bias.sizes());
  at::Tensor saved = save >= 2 ? at::empty({N, d}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor stats = save >= 1 ? at::empty({N, 2, rp}, hidden.options().dtype(at::kFloat))
                               : at::empty({0}, hidden.options().dtype(at::kFloat));
  if (N == 0 || d == 0) return {saved, stats};
  const std::vector<int64_t> rows = slot_rows(positions.cpu(), T);
  const at::Tensor L = as_fp32(lift), b = as_fp32(bias);
  const at::Tensor W = source_linear ? as_fp32(*weight) : at::Tensor();
  const at::Tensor pb = proj_bias.has_value() ? as_fp32(*proj_bias) : at::Tensor();
  FwdArgs a{N, P, T, d, r, rp, hidden.stride(0), hidden.stride(1), hidden.stride(2), rows.data(),
            L.data_ptr<float>(), source_linear ? W.data_ptr<float>() : nullptr, b.data_ptr<float>(),
            pb.defined() ? pb.data_ptr<float>() : nullptr, source_linear, subtract_proj, act_code(std::string(act)),
            static_cast<float>(dropout), static_cast<uint64_t>(seed), save >= 1 ? stats.data_ptr<float>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "reft_edit_fwd_cpu", [&] {
    edit_fwd_rows<scalar_t>(hidden.data_ptr<scalar_t>(), save >= 2 ? saved.data_ptr<scalar_t>() : nullptr, a);
  });
  return {saved, stats};
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
  int64_t M;  // flat gradient length
};

// One edited row: writes its hidden gradient (if dx) and adds its parameter gradients to part.
template <typename T>
inline void bwd_row(const T* g_src, const T* u_src, int64_t u_stride, T* dx, int64_t dx_stride, int64_t n,
                    const BwdArgs& a, float* part, float* g, float* u, float* buf, float* d_delta, float* dz,
                    float* coef) {
  load_row(g_src, a.gd, a.d, g);
  if (a.p_drop > 0.0f) dropout_row(g, a.d, n, a.seed, a.p_drop);
  const float* z = a.stats + n * 2 * a.rp;
  const float* delta = z + a.rp;
  dots(g, a.L, a.r, a.d, d_delta);
  for (int64_t k = 0; k < a.r; ++k) dz[k] = a.source_linear ? d_delta[k] * act_grad(z[k], a.act) : d_delta[k];
  const bool need_u = a.source_linear || a.subtract_proj;
  if (need_u) {
    load_row(u_src, u_stride, a.d, u);
    if (a.recompute) {  // the original row is y - L^T delta
      for (int64_t k = 0; k < a.r; ++k) coef[k] = -delta[k];
      lift_add(coef, a.L, a.r, a.d, u);
    }
  }
  if (dx) {
    copy_row(g, 1, buf, 1, a.d);
    if (a.subtract_proj) {
      for (int64_t k = 0; k < a.r; ++k) coef[k] = -d_delta[k];
      lift_add(coef, a.L, a.r, a.d, buf);
    }
    if (a.source_linear) lift_add(dz, a.W, a.r, a.d, buf);
    store_row(buf, a.d, dx, dx_stride);
  }
  const int64_t rd = a.r * a.d;
  const int64_t n_mats = a.source_linear ? 2 : 1;
  for (int64_t k = 0; k < a.r; ++k) {
    float* dL = part + k * a.d;
    if (a.subtract_proj) {
      axpby_add(delta[k], g, -d_delta[k], u, dL, a.d);
    } else {
      axpy(delta[k], g, dL, a.d);
    }
    if (a.source_linear) axpy(dz[k], u, part + rd + k * a.d, a.d);
    part[n_mats * rd + k] += dz[k];
    if (a.has_proj_bias) part[n_mats * rd + a.r + k] -= d_delta[k];
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
  at::Tensor part = chunks == 1 ? grads : at::zeros({chunks, a.M}, grads.options());
  float* part_ptr = part.data_ptr<float>();
  const int64_t per_chunk = (n_items + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> g(a.d), u(a.d), buf(a.d), d_delta(a.r), dz(a.r), coef(a.r);
    for (int64_t c = c0; c < c1; ++c) {
      float* pc = part_ptr + c * a.M;
      const int64_t end = std::min(n_items, (c + 1) * per_chunk);
      for (int64_t item = c * per_chunk; item < end; ++item) {
        int64_t n, row;
        if (row_major) {
          row = item;
          n = slot_of_row[item];
        } else {
          n = item;
          row = row_of_slot[item];
          if (row < 0) continue;
        }
        const int64_t bi = row / a.T, ti = row % a.T;
        const T* g_src = G + bi * a.gb + ti * a.gt;
        T* dx = row_major ? DX + bi * dx_b + ti * dx_t : nullptr;
        if (n < 0) {  // not edited: the gradient passes through bit for bit
          copy_row(g_src, a.gd, dx, dx_d, a.d);
          continue;
        }
        const T* u_src = a.recompute ? U + bi * a.ub + ti * a.ut : U + n * a.d;
        bwd_row(g_src, u_src, a.recompute ? a.ud : 1, dx, dx_d, n, a, pc, g.data(), u.data(), buf.data(),
                d_delta.data(), dz.data(), coef.data());
      }
    }
  });
  if (chunks > 1) at::sum_out(grads, part, {0});
}

std::tuple<at::Tensor, at::Tensor> edit_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& positions, const std::optional<at::Tensor>& rows,
    const std::optional<at::Tensor>& output, const at::Tensor& stats, const at::Tensor& lift,
    const std::optional<at::Tensor>& weight, bool source_linear, bool subtract_proj, bool has_proj_bias,
    c10::string_view act, double dropout, int64_t seed, bool need_grad_hidden) {
  check_common(grad_out, "grad_out", positions, lift, weight, source_linear);
  const int64_t B = grad_out.size(0), T = grad_out.size(1), d = grad_out.size(2), P = positions.size(1);
  const int64_t r = lift.size(0), N = B * P, rp = r_pad(r);
  const int64_t n_mats = source_linear ? 2 : 1, M = n_mats * r * d + (has_proj_bias ? 2 : 1) * r;
  at::Tensor grads = at::zeros({M}, grad_out.options().dtype(at::kFloat));
  at::Tensor grad_hidden = need_grad_hidden ? at::empty({B, T, d}, grad_out.options()) : at::empty({0}, grad_out.options());
  if (N == 0 || B * T == 0 || d == 0) {
    if (need_grad_hidden) grad_hidden.copy_(grad_out);
    return {grad_hidden, grads};
  }
  const bool recompute = !rows.has_value() || !rows->defined();
  TORCH_CHECK(!recompute || (output.has_value() && output->defined() && output->sizes() == grad_out.sizes() &&
                             output->scalar_type() == grad_out.scalar_type()),
              "reft_kernels_cpp: edit_bwd needs the saved rows [N, d] or the op's output [B, T, d]");
  TORCH_CHECK(recompute || (rows->dim() == 2 && rows->size(0) == N && rows->size(1) == d &&
                            rows->scalar_type() == grad_out.scalar_type()),
              "reft_kernels_cpp: rows must be [N, d] = [", N, ", ", d, "] in grad_out's dtype, got ", rows->sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == N * 2 * rp,
              "reft_kernels_cpp: stats must be [N, 2, r_pad] = [", N, ", 2, ", rp, "] float32, got ", stats.sizes());
  const std::vector<int64_t> row_of_slot = slot_rows(positions.cpu(), T);
  const at::Tensor L = as_fp32(lift);
  const at::Tensor W = source_linear ? as_fp32(*weight) : at::Tensor();
  const at::Tensor st = stats.contiguous();
  const at::Tensor u = recompute ? *output : rows->contiguous();
  BwdArgs a{N, P, T, d, r, rp, grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            recompute ? u.stride(0) : 0, recompute ? u.stride(1) : 0, recompute ? u.stride(2) : 1,
            L.data_ptr<float>(), source_linear ? W.data_ptr<float>() : nullptr, st.data_ptr<float>(),
            source_linear, subtract_proj, has_proj_bias, recompute, act_code(std::string(act)),
            static_cast<float>(dropout), static_cast<uint64_t>(seed), M};
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

std::tuple<at::Tensor, at::Tensor> edit_fwd_meta(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift, const std::optional<at::Tensor>&,
    const at::Tensor&, const std::optional<at::Tensor>&, bool, bool, c10::string_view, double, int64_t, int64_t save) {
  const auto N = hidden.sym_size(0) * positions.sym_size(1);
  const int64_t rp = r_pad(lift.size(0));
  at::Tensor saved = save >= 2 ? at::empty_symint({N, hidden.sym_size(2)}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor stats = save >= 1 ? at::empty_symint({N, 2, rp}, hidden.options().dtype(at::kFloat))
                               : at::empty({0}, hidden.options().dtype(at::kFloat));
  return {saved, stats};
}

std::tuple<at::Tensor, at::Tensor> edit_bwd_meta(
    const at::Tensor& grad_out, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor& lift, const std::optional<at::Tensor>&, bool source_linear, bool, bool has_proj_bias,
    c10::string_view, double, int64_t, bool need_grad_hidden) {
  const int64_t r = lift.size(0), d = lift.size(1);
  const int64_t M = (source_linear ? 2 : 1) * r * d + (has_proj_bias ? 2 : 1) * r;
  at::Tensor grad_hidden = need_grad_hidden ? at::empty_symint(grad_out.sym_sizes(), grad_out.options())
                                            : at::empty({0}, grad_out.options());
  return {grad_hidden, at::empty({M}, grad_out.options().dtype(at::kFloat))};
}

// ------------------------------------------------------------------------------------------------
// edit: forward and backward with the autograd formula in C++ (eager calls)
// ------------------------------------------------------------------------------------------------

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

at::Tensor grad_as(const at::Tensor& g, const at::Tensor& like) {
  return g.scalar_type() == like.scalar_type() ? g : g.to(like.scalar_type());
}

struct EditFunction : public torch::autograd::Function<EditFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor hidden, const at::Tensor& positions,
                            const at::Tensor& lift, const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& proj_bias, bool source_linear, bool subtract_proj,
                            std::string act, double dropout, int64_t seed, bool recompute) {
    at::AutoDispatchBelowADInplaceOrView guard;
    recompute = recompute && dropout == 0.0;  // dropped elements cannot be rebuilt from the output
    auto [rows, stats] = edit_fwd_cpu(hidden, positions, lift, weight, bias, proj_bias, source_linear, subtract_proj,
                                      act, dropout, seed, recompute ? 1 : 2);
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
    torch::autograd::variable_list out(12);
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
    if (ctx->needs_input_grad(2)) out[2] = grad_as(flat.narrow(0, 0, r * d).view({r, d}), lift);
    if (source_linear && ctx->needs_input_grad(e_weight))
      out[3] = grad_as(flat.narrow(0, r * d, r * d).view({r, d}), weight);
    if (ctx->needs_input_grad(e_bias)) out[4] = grad_as(flat.narrow(0, n_mats * r * d, r), bias);
    if (has_pb && ctx->needs_input_grad(e_pb)) out[5] = grad_as(flat.narrow(0, n_mats * r * d + r, r), proj_bias);
    return out;
  }
};

at::Tensor edit_autograd(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift,
                         const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& proj_bias, bool source_linear, bool subtract_proj,
                         c10::string_view act, double dropout, int64_t seed, bool recompute) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (hidden.requires_grad() || lift.requires_grad() || bias.requires_grad() ||
                           (weight.has_value() && weight->requires_grad()) ||
                           (proj_bias.has_value() && proj_bias->requires_grad()));
  if (needs_grad)
    return EditFunction::apply(hidden, positions, lift, weight, bias, proj_bias, source_linear, subtract_proj,
                               std::string(act), dropout, seed, recompute);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    edit_fwd_cpu(hidden, positions, lift, weight, bias, proj_bias, source_linear, subtract_proj, act, dropout, seed, 0);
  }
  if (!hidden.is_inference()) torch::autograd::impl::bump_version(hidden);  // the in-place write, for autograd
  return hidden;
}

// Below autograd (inference mode): the forward alone, nothing saved.
at::Tensor edit_inference(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift,
                          const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                          const std::optional<at::Tensor>& proj_bias, bool source_linear, bool subtract_proj,
                          c10::string_view act, double dropout, int64_t seed, bool) {
  edit_fwd_cpu(hidden, positions, lift, weight, bias, proj_bias, source_linear, subtract_proj, act, dropout, seed, 0);
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
      "bool source_linear, bool subtract_proj, str act, float dropout, int seed, bool recompute) -> Tensor(a!)");
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
}
