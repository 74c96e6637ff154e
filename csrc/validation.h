// Argument checks of the registered C++ ops (edit_cpu.cpp, edit_cuda.cu). Every op validates its own inputs:
// the ops are a public surface (torch.compile graphs, other libraries call them without the Python wrapper),
// so a bad shape, dtype, device, flag or value range is a Python exception naming the argument, never a
// read past a buffer. The messages and exception types are those of reft_kernels/ops/validation.py where
// the same check exists there (TORCH_CHECK_VALUE raises ValueError, TORCH_CHECK_TYPE TypeError).
// Each check is a few integer comparisons: no allocation, no dispatcher call, no device sync.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

namespace reft_checks {

inline bool kernel_float(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16;
}

// Whether a and b share bytes: their address ranges [first element, last element] intersect. Addresses, not
// storage identity: two storages over one buffer (from_blob, numpy) alias as much as two views of one storage.
// (A strided pair can intersect in range without sharing an element; counting that as an overlap costs only a
// copy of the parameter, see the callers.)
inline bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined() || a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage())
    return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;  // element offset of the last element (torch strides are non-negative)
    for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
    const auto lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::pair<uintptr_t, uintptr_t>{lo, lo + static_cast<uintptr_t>((last + 1) * t.itemsize())};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// hidden is written in place: two of its elements sharing memory would be edited twice.
inline void check_no_internal_overlap(const at::Tensor& hidden) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(hidden) != at::MemOverlap::Yes,
                    "hidden has overlapping memory (an expanded or stride-0 view); the edit is written in place, "
                    "so pass a tensor whose elements are distinct (e.g. hidden.contiguous())");
}

inline void check_device(const at::Tensor& x, const char* name, const at::Tensor& hidden) {
  TORCH_CHECK_VALUE(x.device() == hidden.device(), name, " must be on hidden's device ", hidden.device(), ", got ",
                    x.device());
}

// Every tensor on x's device: what a Meta kernel checks (it needs no concrete shape; these kernels also trace
// symbolic ones). A call mixing meta tensors with CPU ones is sent to the Meta kernel by the dispatcher, and
// would otherwise return without editing anything.
inline void check_devices(const at::Tensor& x, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  for (const auto& [name, t] : ts)
    if (t != nullptr && t->defined()) check_device(*t, name, x);
}

inline const at::Tensor* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

inline void check_dtype(const at::Tensor& x, const char* name) {
  TORCH_CHECK_TYPE(kernel_float(x.scalar_type()), name, " must have a dtype in [float32, float16, bfloat16], got ",
                   x.scalar_type());
}

// lift [r, d] (d = hidden's width), 1 <= r <= d; returns r.
inline int64_t check_lift(const at::Tensor& lift, const at::Tensor& hidden) {
  const int64_t d = hidden.size(2);
  TORCH_CHECK_VALUE(lift.dim() == 2 && lift.size(1) == d, "lift must be [r, d] with d = ", d, ", got shape ",
                    lift.sizes());
  TORCH_CHECK_VALUE(lift.size(0) >= 1 && lift.size(0) <= d, "lift must have 1 <= r <= d=", d, " rows, got r=",
                    lift.size(0));
  check_dtype(lift, "lift");
  check_device(lift, "lift", hidden);
  return lift.size(0);
}

// weight [r, d] when source_linear, absent otherwise (the autograd formula numbers its inputs by presence).
inline void check_weight(const std::optional<at::Tensor>& weight, bool source_linear, const at::Tensor& lift,
                         const at::Tensor& hidden) {
  const bool given = weight.has_value() && weight->defined();
  if (!source_linear) {
    TORCH_CHECK_VALUE(!given, "weight must be None when the source is the bias alone (source_linear=False)");
    return;
  }
  TORCH_CHECK_VALUE(given && weight->sizes() == lift.sizes(), "weight must be [r, d] = ", lift.sizes(),
                    " when source_linear, got ", given ? weight->sizes() : c10::IntArrayRef{});
  check_dtype(*weight, "weight");
  check_device(*weight, "weight", hidden);
}

// A [r] vector: bias, proj_bias.
inline void check_vector(const at::Tensor& x, const char* name, int64_t r, const at::Tensor& hidden) {
  TORCH_CHECK_VALUE(x.dim() == 1 && x.size(0) == r, name, " must be [", r, "] (r), got shape ", x.sizes());
  check_dtype(x, name);
  check_device(x, name, hidden);
}

inline void check_proj_bias(bool has_proj_bias, bool subtract_proj) {
  TORCH_CHECK_VALUE(!has_proj_bias || subtract_proj, "proj_bias needs subtract_proj=True");
}

inline void check_dropout(double dropout) {
  TORCH_CHECK_VALUE(dropout >= 0.0 && dropout < 1.0, "dropout must lie in [0, 1), got ", dropout);  // (NaN fails)
}

// What a backward reads by slot (op: "edit" or "mixed", for the messages): the forward's stats [N, 2, r_pad]
// float32, and its saved rows [N, d] or, recomputing, its output of grad_out's shape; exactly the forward's
// shapes, since they index memory (strides are free).
inline void check_saved_stats(const at::Tensor& stats, const at::Tensor& grad_out, int64_t N, int64_t rp,
                              const char* op) {
  TORCH_CHECK_VALUE(stats.scalar_type() == at::kFloat && stats.dim() == 3 && stats.size(0) == N &&
                        stats.size(1) == 2 && stats.size(2) == rp && stats.device() == grad_out.device(),
                    "stats must be [N, 2, r_pad] = [", N, ", 2, ", rp, "] float32 on ", grad_out.device(), " (", op,
                    "_fwd's output with save >= 1), got ", stats.sizes(), " ", stats.scalar_type(), " on ",
                    stats.device());
}

inline void check_saved_rows(const std::optional<at::Tensor>& rows, const std::optional<at::Tensor>& output,
                             const at::Tensor& grad_out, int64_t N, int64_t d, const char* op) {
  const bool recompute = !rows.has_value() || !rows->defined();
  TORCH_CHECK_VALUE(!recompute || (output.has_value() && output->defined() && output->sizes() == grad_out.sizes() &&
                                   output->scalar_type() == grad_out.scalar_type() &&
                                   output->device() == grad_out.device()),
                    op, "_bwd needs the saved rows [N, d] or the op's output (recompute) of grad_out's shape, dtype "
                    "and device; got output ", output.has_value() && output->defined() ? output->sizes()
                                                                                      : c10::IntArrayRef{});
  TORCH_CHECK_VALUE(recompute || (rows->dim() == 2 && rows->size(0) == N && rows->size(1) == d &&
                                  rows->scalar_type() == grad_out.scalar_type() && rows->device() == grad_out.device()),
                    "rows must be [N, d] = [", N, ", ", d, "] in grad_out's dtype and device (", op,
                    "_fwd's saved rows), got ", rows->sizes(), " ", rows->scalar_type(), " on ", rows->device());
}

// hidden, when the edit needs its gradient: written in place, which autograd forbids on a leaf that requires
// grad and on a view of one (torch's own error would name neither the argument nor the way out).
inline void check_not_leaf(const at::Tensor& hidden) {
  TORCH_CHECK_VALUE(!(hidden.is_leaf() && hidden.requires_grad()),
                    "hidden is a leaf tensor that requires grad; the edit is written in place, which autograd "
                    "forbids on leaves. Pass a non-leaf (e.g. hidden.clone())");
  if (hidden.is_view()) {
    const at::TensorBase& base = hidden._base();
    TORCH_CHECK_VALUE(!(base.is_leaf() && base.requires_grad()),
                      "hidden is a view of a leaf tensor that requires grad; the edit is written in place, which "
                      "autograd forbids on views of leaves. Pass a non-leaf (e.g. hidden.clone())");
  }
}

}  // namespace reft_checks
