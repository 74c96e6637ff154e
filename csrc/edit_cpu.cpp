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
// kCols in edit_cpu_kernels.h, which holds these building blocks and shares them with mixed_cpu.cpp), with
// independent accumulators (or 8-lane vector-extension values) so that the compiler vectorizes them
// without -ffast-math; the loader compiles this file with the widest ISA the machine has (AVX2/FMA or
// AVX-512), see extension.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "activations.h"
#include "edit_cpu_kernels.h"
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
  reft_checks::check_saved_stats(stats, grad_out, N, rp, "edit");
  const int64_t n_mats = source_linear ? 2 : 1, M = n_mats * r * d + (has_proj_bias ? 2 : 1) * r;
  at::Tensor grads = at::empty({M}, grad_out.options().dtype(at::kFloat));  // written by edit_bwd_rows
  at::Tensor grad_hidden = need_grad_hidden ? at::empty({B, T, d}, grad_out.options()) : at::empty({0}, grad_out.options());
  if (N == 0 || B * T == 0 || d == 0) {
    grads.zero_();
    if (need_grad_hidden) grad_hidden.copy_(grad_out);
    return {grad_hidden, grads};
  }
  reft_checks::check_saved_rows(rows, output, grad_out, N, d, "edit");
  const bool recompute = !rows.has_value() || !rows->defined();
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

// Every tensor on x's device (reft_checks::check_devices): the one check that needs no concrete shape.
using reft_checks::check_devices;
using reft_checks::ptr;

std::tuple<at::Tensor, at::Tensor> edit_fwd_meta(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift, const std::optional<at::Tensor>& weight,
    const at::Tensor& bias, const std::optional<at::Tensor>& proj_bias, bool, bool, c10::string_view, double, int64_t,
    int64_t save) {
  check_devices(hidden, {{"positions", &positions}, {"lift", &lift}, {"weight", ptr(weight)}, {"bias", &bias},
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
  check_devices(grad_out, {{"positions", &positions}, {"rows", ptr(rows)}, {"output", ptr(output)},
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
  check_devices(hidden, {{"positions", &positions}, {"lift", &lift}, {"weight", ptr(weight)}, {"bias", &bias},
                         {"proj_bias", ptr(proj_bias)}});
  return hidden;
}

// ------------------------------------------------------------------------------------------------
// edit: forward and backward with the autograd formula in C++ (eager calls)
// ------------------------------------------------------------------------------------------------


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
    // copy): the edit reads it as it was, and its gradient flows through the clone to what it viewed. So are
    // positions: the backward reads them again, after the edit rewrote hidden.
    const auto own = [&](const at::Tensor& x) { return reft_checks::overlaps(x, hidden) ? x.clone() : x; };
    const auto own_opt = [&](const std::optional<at::Tensor>& x) {
      return x.has_value() && x->defined() ? std::optional<at::Tensor>(own(*x)) : x;
    };
    return EditFunction::apply(hidden, own(positions), own(lift), own_opt(weight), own(bias), own_opt(proj_bias),
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
