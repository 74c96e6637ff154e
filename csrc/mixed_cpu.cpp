// The mixed-adapter ReFT edit on the CPU: many adapters at one site in one call, each edited row with its
// own adapter (reft_kernels/ops/mixed_edit.py holds the contract, the reference and the Triton kernels).
// Registered as reft_kernels_cpp::mixed_fwd / mixed_bwd (CPU and Meta) and mixed_edit (the eager,
// differentiable op with its autograd formula in C++, as edit_cpu.cpp's edit).
//
// The bank (A adapters, bank rank r, width d): lift [A, r, d], weight [A, r, d] (optional), bias [A, r],
// proj_bias [A, r] (optional), kinds [A] int32 (bit 0 source_linear, bit 1 subtract_proj, bits 8.. the
// activation code of activations.h), ranks [A] int32 (each adapter's own rank, <= r; rows at and above it
// are never read, so the padding is exact whatever it holds; rank 0 = an empty slot, which edits nothing),
// dropout [A] float32 (each adapter's dropout, applied when apply_dropout).
//
// Two layouts, told apart by the dimensions of hidden and positions:
// - batched: hidden [B, T, d], positions [B, P] (-1 = empty slot), adapter_ids [B] (one per batch row) or
//   [B, P] (one per slot);
// - flat: hidden [n_tokens, d], positions = the rows [N] (indices into n_tokens), adapter_ids [N]; handled
//   as the batched layout with B = 1, T = n_tokens, P = N.
// A slot edits when its position lies in [0, T), its adapter id in [0, A) and that adapter's rank is > 0;
// other slots are empty (no read, no write). A row named by several non-empty slots of one batch row is
// edited once, by the first of them, and its gradient counted once (the single-adapter op's rule).
// Dropout masks are the single-adapter op's Philox masks keyed by (seed, slot * d + column): the same seed
// gives the same mask as the Triton kernels, and as the single-adapter op at A = 1.
//
// How the work is laid out: the edited slots are counting-sorted by adapter (stable, O(N + A)), and each
// thread walks its share of that order in blocks of up to kTokens rows of one adapter, so every block runs
// edit_cpu_kernels.h's fwd_block / bwd_block with one adapter's parameters, exactly as the single-adapter
// op does (with the adapter's own rank as r). Types and activations are runtime flags per block: one pass
// over the rows whatever the mix. (One pass per type present instead measured slower: bench/bench_adapters.py
// reports both, provider mixed-per-type.)
// Parameter gradients without atomics: each thread chunk of the sorted order sums each run of one adapter
// in a zeroed fp32 buffer and writes it straight into that adapter's gradient when the adapter's rows all
// lie in the chunk; an adapter cut by a chunk boundary leaves its pieces in per-chunk carry buffers, added
// after the parallel region in chunk order. The result depends on the thread count only.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "activations.h"
#include "edit_cpu_kernels.h"
#include "validation.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace reft_cpp {
namespace {

constexpr int32_t kSourceLinear = 1, kSubtractProj = 2, kActShift = 8;

// ------------------------------------------------------------------------------------------------
// Inputs: shapes, the bank, and which slot edits which row with which adapter
// ------------------------------------------------------------------------------------------------

// The layout of one call: B batch rows of T rows each, P slots per batch row; hidden strides (sb, st, sd).
struct Layout {
  bool flat;
  int64_t B, T, P, d, sb, st, sd;
};

// x (hidden or grad_out) a CPU float tensor, [B, T, d] with positions [B, P] or [n_tokens, d] with the rows
// [N] (the flat layout, passed as `positions`); the messages are the public functions' (validation.py).
Layout layout_of(const at::Tensor& x, const char* x_name, const at::Tensor& positions) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "reft_kernels_cpp: ", x_name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, x_name, " must be [B, T, d] (batched) or [n_tokens, d] (flat), got "
                    "shape ", x.sizes());
  reft_checks::check_dtype(x, x_name);
  const bool flat = x.dim() == 2;
  const char* pos_name = flat ? "rows (positions)" : "positions";
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt, pos_name,
                   " must be int32 or int64, got ", positions.scalar_type());
  reft_checks::check_device(positions, pos_name, x);
  if (flat) {
    TORCH_CHECK_VALUE(positions.dim() == 1, "with ", x_name, " [n_tokens, d] (the flat layout) the rows (positions) "
                      "must be [N], got shape ", positions.sizes());
    return {true, 1, x.size(0), positions.size(0), x.size(1), 0, x.stride(0), x.stride(1)};
  }
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(0) == x.size(0), "positions must be [B, P] with B=",
                    x.size(0), " (", x_name, "'s batch), got shape ", positions.sizes());
  return {false, x.size(0), x.size(1), positions.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2)};
}

// The bank's tensors, checked against each other and against d; the per-adapter metadata, copied to the host.
struct Bank {
  int64_t A, r, d, rp;
  bool has_weight, has_pb;
  // (copies, read once before anything is written: a bank tensor sharing memory with hidden cannot change
  // them under the kernels, and nothing indexes the caller's tensors by their strides)
  std::vector<int32_t> kinds, ranks;
  std::vector<float> dropout;
};

// A [A, r] or [A, r, d] float tensor of the bank on x's device.
void check_bank_tensor(const at::Tensor& t, const char* name, c10::IntArrayRef shape, const char* dims,
                       const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "the bank's ", name, " must be ", dims, " = ", shape, ", got shape ", t.sizes());
  TORCH_CHECK_TYPE(reft_checks::kernel_float(t.scalar_type()), "the bank's ", name,
                   " must have a dtype in [float32, float16, bfloat16], got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "the bank's ", name, " must be on hidden's device ", x.device(), ", got ",
                    t.device());
}

// kinds, ranks [A] int32 and dropout [A] float32, copied out (whatever their strides).
template <typename T>
std::vector<T> bank_vector(const at::Tensor& t, const char* name, at::ScalarType want, int64_t A, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == A, "the bank's ", name, " must be [A] = [", A, "], got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == want, "the bank's ", name, " must be ", want, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "the bank's ", name, " must be on hidden's device ", x.device(), ", got ",
                    t.device());
  std::vector<T> out(A);
  const T* p = t.const_data_ptr<T>();
  for (int64_t a = 0; a < A; ++a) out[a] = p[a * t.stride(0)];
  return out;
}

// bias is null for the backward (which takes no bias); has_pb: whether the bank has a proj_bias.
Bank check_bank(const at::Tensor& lift, const std::optional<at::Tensor>& weight, const at::Tensor* bias,
                const std::optional<at::Tensor>& proj_bias, bool has_pb, const at::Tensor& kinds,
                const at::Tensor& ranks, const at::Tensor& dropout, const at::Tensor& x) {
  const int64_t d = x.size(-1);
  TORCH_CHECK_VALUE(lift.dim() == 3 && lift.size(2) == d && lift.size(0) >= 1 && lift.size(1) >= 1,
                    "the bank's lift must be [A, r, d] with d = ", d, " (hidden's), A >= 1 and r >= 1, got shape ",
                    lift.sizes());
  const int64_t A = lift.size(0), r = lift.size(1);
  check_bank_tensor(lift, "lift", lift.sizes(), "[A, r, d]", x);
  const bool has_weight = weight.has_value() && weight->defined();
  if (has_weight) check_bank_tensor(*weight, "weight", lift.sizes(), "[A, r, d]", x);
  if (bias) check_bank_tensor(*bias, "bias", {A, r}, "[A, r]", x);
  if (proj_bias.has_value() && proj_bias->defined()) check_bank_tensor(*proj_bias, "proj_bias", {A, r}, "[A, r]", x);
  Bank bk{A, r, d, r_pad(r), has_weight, has_pb, bank_vector<int32_t>(kinds, "kinds", at::kInt, A, x),
          bank_vector<int32_t>(ranks, "ranks", at::kInt, A, x), bank_vector<float>(dropout, "dropout", at::kFloat, A, x)};
  for (int64_t a = 0; a < A; ++a) {
    TORCH_CHECK_VALUE(bk.ranks[a] >= 0 && bk.ranks[a] <= r, "ranks must lie in [0, r] with r = ", r,
                      " (the bank's rank), got ranks[", a, "] = ", bk.ranks[a]);
    const int32_t k = bk.kinds[a];
    TORCH_CHECK_VALUE(k >= 0 && (k >> kActShift) <= 7, "kinds[", a, "] = ", k,
                      " names no fused activation (codes 0-7 in bits 8 and up)");
    TORCH_CHECK_VALUE(has_weight || !(k & kSourceLinear) || bk.ranks[a] == 0, "adapter ", a, " has a linear source "
                      "(kinds[", a, "] = ", k, ") but the bank has no weight");
    TORCH_CHECK_VALUE(bk.dropout[a] >= 0.0f && bk.dropout[a] < 1.0f, "dropout must lie in [0, 1), got dropout[", a,
                      "] = ", bk.dropout[a]);  // (NaN fails)
  }
  return bk;
}

// Which slot edits which row with which adapter, and the edited slots sorted by adapter.
struct Routing {
  int64_t N = 0;                  // slots (B * P)
  std::vector<int64_t> row;       // per slot: b * T + t, or -1 (the slot edits nothing)
  std::vector<int32_t> adapter;   // per slot: the adapter, or -1
  std::vector<int64_t> order;     // the edited slots, by adapter, in slot order within one adapter
  std::vector<int64_t> offsets;   // [A + 1]: adapter a's slots are order[offsets[a] : offsets[a + 1]]
};

// adapter_ids: [N] (flat), [B] or [B, P] (batched), int32/int64, on x's device.
void check_adapter_ids(const Layout& L, const at::Tensor& adapter_ids, const at::Tensor& x) {
  TORCH_CHECK_TYPE(adapter_ids.scalar_type() == at::kLong || adapter_ids.scalar_type() == at::kInt,
                   "adapter_ids must be int32 or int64, got ", adapter_ids.scalar_type());
  reft_checks::check_device(adapter_ids, "adapter_ids", x);
  if (L.flat) {
    TORCH_CHECK_VALUE(adapter_ids.dim() == 1 && adapter_ids.size(0) == L.P, "adapter_ids must be [N] = [", L.P,
                      "] (one per row), got shape ", adapter_ids.sizes());
  } else {
    TORCH_CHECK_VALUE((adapter_ids.dim() == 1 && adapter_ids.size(0) == L.B) ||
                      (adapter_ids.dim() == 2 && adapter_ids.size(0) == L.B && adapter_ids.size(1) == L.P),
                      "adapter_ids must be [B] = [", L.B, "] (one per batch row) or [B, P] = [", L.B, ", ", L.P,
                      "] (one per slot), got shape ", adapter_ids.sizes());
  }
}

// check: raise a ValueError for positions outside [-1, T) or adapter ids outside [-1, A) (the public
// functions ask for it on eager calls); otherwise such slots are empty, the kernels' contract. Reads positions
// and adapter ids once, before anything is written (they may share memory with hidden).
Routing route(const Layout& L, const at::Tensor& positions, const at::Tensor& adapter_ids, const Bank& bk, bool check) {
  const bool per_row = !L.flat && adapter_ids.dim() == 1;
  const auto as_long = [](const at::Tensor& t) { return (t.scalar_type() == at::kLong ? t : t.to(at::kLong)).contiguous(); };
  const at::Tensor pos = as_long(positions), ids = as_long(adapter_ids);
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t N = L.B * L.P, A = bk.A;
  if (check && N > 0) {
    const auto [lo, hi] = std::minmax_element(p, p + N);
    if (L.flat) {
      TORCH_CHECK_VALUE(*lo >= -1 && *hi < L.T, "rows must lie in [-1, n_tokens) with n_tokens=", L.T,
                        " (-1 = no edit), got values in [", *lo, ", ", *hi, "]");
    } else {
      TORCH_CHECK_VALUE(*lo >= -1 && *hi < L.T, "positions must lie in [-1, T) with T=", L.T,
                        " (-1 = no edit), got values in [", *lo, ", ", *hi, "]");
    }
    const int64_t n_ids = ids.numel();
    if (n_ids > 0) {
      const auto [ilo, ihi] = std::minmax_element(id, id + n_ids);
      TORCH_CHECK_VALUE(*ilo >= -1 && *ihi < A, "adapter_ids must lie in [-1, A) with A=", A,
                        " (the bank's adapters; -1 = no edit), got values in [", *ilo, ", ", *ihi, "]");
    }
  }
  Routing rt;
  rt.N = N;
  rt.row.assign(N, -1);
  rt.adapter.assign(N, -1);
  rt.offsets.assign(A + 1, 0);
  // first non-empty slot per row of each batch row: a stamp per row of T, O(B P + T)
  std::vector<int64_t> stamp(L.T, -1);
  for (int64_t b = 0; b < L.B; ++b) {
    for (int64_t j = 0; j < L.P; ++j) {
      const int64_t n = b * L.P + j, t = p[n];
      const int64_t a = id[per_row ? b : n];
      if (t < 0 || t >= L.T || a < 0 || a >= A || bk.ranks[a] == 0 || stamp[t] == b) continue;
      stamp[t] = b;
      rt.row[n] = b * L.T + t;
      rt.adapter[n] = static_cast<int32_t>(a);
      ++rt.offsets[a + 1];
    }
  }
  for (int64_t a = 0; a < A; ++a) rt.offsets[a + 1] += rt.offsets[a];
  rt.order.resize(rt.offsets[A]);
  std::vector<int64_t> fill(rt.offsets.begin(), rt.offsets.end() - 1);
  for (int64_t n = 0; n < N; ++n)
    if (rt.adapter[n] >= 0) rt.order[fill[rt.adapter[n]]++] = n;
  return rt;
}

// The registered ops' act / may_subtract hints (the Triton kernels compile them in) must agree with kinds:
// act >= 0 is the activation of every non-empty adapter with a linear source, and without may_subtract no
// non-empty adapter subtracts L h. (act = -1 with may_subtract holds for every bank.)
void check_hints(const Bank& bk, int64_t act, bool may_subtract) {
  TORCH_CHECK_VALUE(act >= -1 && act <= 7, "act must be -1 (each adapter's own, from kinds) or a fused activation "
                    "code in [0, 7], got ", act);
  for (int64_t a = 0; a < bk.A; ++a) {
    const int32_t k = bk.kinds[a];
    if (bk.ranks[a] <= 0) continue;
    TORCH_CHECK_VALUE(act < 0 || !(k & kSourceLinear) || (k >> kActShift) == act, "act=", act, " disagrees with kinds[",
                      a, "] = ", k, " (activation code ", k >> kActShift, ")");
    TORCH_CHECK_VALUE(may_subtract || !(k & kSubtractProj), "may_subtract=False but kinds[", a, "] = ", k,
                      " subtracts L h");
  }
}

// fp32 [r, d] parameter slices of the adapters a call touches: pointers into the bank when it is fp32 and
// contiguous, else the touched slices alone converted (never the whole bank: at A = 512 it outweighs the rows).
// copy: the bank shares memory with the rows the call edits, so it is read from a copy made before any write
// (what the reference computes; the single-adapter op does the same).
struct Slices {
  std::vector<const float*> ptr;  // [A] (null for adapters the call does not touch)
  at::Tensor buf;

  Slices(const at::Tensor& bank, const Routing& rt, int64_t A, int64_t r, int64_t d, bool copy) : ptr(A, nullptr) {
    if (A == 0) return;
    const int64_t rd = r * d;
    const at::Tensor src = copy ? bank.clone(at::MemoryFormat::Contiguous) : bank.contiguous();
    if (src.scalar_type() == at::kFloat) {
      buf = src;  // (keeps a copy alive)
      const float* base = src.data_ptr<float>();
      for (int64_t a = 0; a < A; ++a) ptr[a] = base + a * rd;
      return;
    }
    std::vector<int64_t> touched;
    for (int64_t a = 0; a < A; ++a)
      if (rt.offsets[a + 1] > rt.offsets[a]) touched.push_back(a);
    buf = at::empty({static_cast<int64_t>(touched.size()), r, d}, bank.options().dtype(at::kFloat));
    float* out = buf.data_ptr<float>();
    for (size_t k = 0; k < touched.size(); ++k) ptr[touched[k]] = out + k * rd;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "reft_mixed_slices", [&] {
      const scalar_t* in = src.data_ptr<scalar_t>();
      at::parallel_for(0, static_cast<int64_t>(touched.size()), 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) load_row(in + touched[k] * rd, 1, rd, out + k * rd);
      });
    });
  }
};

// The per-adapter arguments of fwd_block / bwd_block: adapter a's parameters, rank, type and dropout.
struct AdapterParams {
  const float *L, *W, *b, *pb;
  int64_t r;
  bool source_linear, subtract_proj, has_pb;
  int act;
  float p_drop;
};

inline bool aliased(const at::Tensor& t, const at::Tensor* written) {
  return written != nullptr && reft_checks::overlaps(t, *written);
}

struct BankParams {
  Slices L, W;
  at::Tensor b, pb;  // fp32 [A, r]
  const Bank& bk;
  bool apply_dropout;

  // written: hidden when the call edits it (the forward), else null; a bank tensor sharing memory with it is
  // read from a copy
  BankParams(const Bank& bk, const Routing& rt, const at::Tensor& lift, const std::optional<at::Tensor>& weight,
             const at::Tensor* bias, const std::optional<at::Tensor>& proj_bias, bool apply_dropout,
             const at::Tensor* written)
      : L(lift, rt, bk.A, bk.r, bk.d, aliased(lift, written)),
        W(bk.has_weight ? *weight : lift, rt, bk.has_weight ? bk.A : 0, bk.r, bk.d,
          bk.has_weight && aliased(*weight, written)),
        b(bias ? as_fp32(*bias, aliased(*bias, written)) : at::Tensor()),
        pb(proj_bias.has_value() && proj_bias->defined() ? as_fp32(*proj_bias, aliased(*proj_bias, written))
                                                          : at::Tensor()),
        bk(bk),
        apply_dropout(apply_dropout) {}

  AdapterParams of(int64_t a) const {
    const int32_t k = bk.kinds[a];
    AdapterParams p;
    p.L = L.ptr[a];
    p.source_linear = (k & kSourceLinear) != 0;
    p.subtract_proj = (k & kSubtractProj) != 0;
    p.W = p.source_linear ? W.ptr[a] : nullptr;
    p.b = b.defined() ? b.data_ptr<float>() + a * bk.r : nullptr;
    p.has_pb = p.subtract_proj && bk.has_pb;
    p.pb = p.has_pb && pb.defined() ? pb.data_ptr<float>() + a * bk.r : nullptr;
    p.r = bk.ranks[a];
    p.act = k >> kActShift;
    p.p_drop = apply_dropout ? bk.dropout[a] : 0.0f;
    return p;
  }
};

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <typename T>
void mixed_fwd_rows(T* X, T* saved, float* stats, const Layout& L, const Routing& rt, const BankParams& bp,
                    uint64_t seed) {
  const Bank& bk = bp.bk;
  const int64_t d = L.d, E = static_cast<int64_t>(rt.order.size());
  const bool direct = std::is_same<T, float>::value && L.sd == 1;  // fp32 unit-stride rows edited where they lie
  // slots that edit nothing: zero stats and saved rows (the op's outputs are defined everywhere)
  if (stats || saved) {
    at::parallel_for(0, rt.N, 1024, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        if (rt.row[n] >= 0) continue;
        if (stats) std::fill(stats + n * 2 * bk.rp, stats + (n + 1) * 2 * bk.rp, 0.0f);
        if (saved) std::fill(saved + n * d, saved + (n + 1) * d, T(0));
      }
    });
  }
  FwdArgs base{rt.N, L.P, L.T, d, bk.r, bk.rp, L.sb, L.st, L.sd, rt.row.data(), nullptr, nullptr, nullptr, nullptr,
               false, false, 0, 0.0f, seed, stats};
  const int64_t grain = std::max<int64_t>(kTokens, (1 << 15) / std::max<int64_t>(1, d * (bk.r + 1)));
  at::parallel_for(0, E, grain, [&](int64_t begin, int64_t end) {
    Scratch buf(direct ? 0 : kTokens * d);
    std::vector<float> z(kTokens * bk.r), q(kTokens * bk.r), delta(kTokens * bk.r);
    int64_t slots[kTokens];
    T* h[kTokens];
    float* x[kTokens];
    for (int64_t i = begin; i < end;) {
      // a block: up to kTokens consecutive slots of one adapter
      const int32_t a = rt.adapter[rt.order[i]];
      int nt = 0;
      for (; i < end && nt < kTokens && rt.adapter[rt.order[i]] == a; ++i, ++nt) {
        const int64_t n = rt.order[i], row = rt.row[n];
        slots[nt] = n;
        h[nt] = X + (row / L.T) * L.sb + (row % L.T) * L.st;
        if (saved) copy_row(h[nt], L.sd, saved + n * d, 1, d);
        if (direct) {
          x[nt] = reinterpret_cast<float*>(h[nt]);
        } else {
          x[nt] = buf.data() + nt * d;
          load_row(h[nt], L.sd, d, x[nt]);
        }
      }
      const AdapterParams p = bp.of(a);
      FwdArgs fa = base;
      fa.r = p.r, fa.L = p.L, fa.W = p.W, fa.b = p.b, fa.pb = p.pb, fa.source_linear = p.source_linear;
      fa.subtract_proj = p.subtract_proj, fa.act = p.act, fa.p_drop = p.p_drop;
      fwd_block(nt, slots, h, x, direct, z.data(), q.data(), delta.data(), fa);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> mixed_fwd_impl(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& adapter_ids, const at::Tensor& lift,
    const std::optional<at::Tensor>& weight, const at::Tensor& bias, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& kinds, const at::Tensor& ranks, const at::Tensor& dropout, bool apply_dropout, int64_t seed,
    int64_t save, bool check, int64_t act = -1, bool may_subtract = true) {
  const Layout L = layout_of(hidden, "hidden", positions);
  check_adapter_ids(L, adapter_ids, hidden);
  const Bank bk = check_bank(lift, weight, &bias, proj_bias, proj_bias.has_value() && proj_bias->defined(), kinds,
                             ranks, dropout, hidden);
  check_hints(bk, act, may_subtract);
  TORCH_CHECK_VALUE(save >= 0 && save <= 2, "save must be 0 (nothing), 1 (stats) or 2 (stats and rows), got ", save);
  reft_checks::check_no_internal_overlap(hidden);
  const int64_t N = L.B * L.P, d = L.d;
  at::Tensor saved = save >= 2 ? at::empty({N, d}, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor stats = save >= 1 ? at::empty({N, 2, bk.rp}, hidden.options().dtype(at::kFloat))
                               : at::empty({0}, hidden.options().dtype(at::kFloat));
  if (N == 0 || d == 0) return {saved, stats};
  // (positions, adapter ids and the bank are read, or copied where they share memory with hidden, before
  // anything is written)
  const Routing rt = route(L, positions, adapter_ids, bk, check);
  const BankParams bp(bk, rt, lift, weight, &bias, proj_bias, apply_dropout, &hidden);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "reft_mixed_fwd_cpu", [&] {
    mixed_fwd_rows<scalar_t>(hidden.data_ptr<scalar_t>(), save >= 2 ? saved.data_ptr<scalar_t>() : nullptr,
                             save >= 1 ? stats.data_ptr<float>() : nullptr, L, rt, bp, static_cast<uint64_t>(seed));
  });
  return {saved, stats};
}

// The registered forward: out-of-range positions, rows and adapter ids are empty slots. rows_unique (the
// flat layout's promise that no row is named twice) changes nothing here: resolving duplicates costs
// O(N + n_tokens) on the host, which the CPU kernels always pay.
std::tuple<at::Tensor, at::Tensor> mixed_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& adapter_ids, const at::Tensor& lift,
    const std::optional<at::Tensor>& weight, const at::Tensor& bias, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& kinds, const at::Tensor& ranks, const at::Tensor& dropout, int64_t act, bool may_subtract,
    bool apply_dropout, int64_t seed, int64_t save, bool) {
  return mixed_fwd_impl(hidden, positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout,
                        apply_dropout, seed, save, false, act, may_subtract);
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// The bank's gradients (fp32): lift [A, r, d], weight [A, r, d] or empty, bias [A, r], proj_bias [A, r] or empty.
struct Grads {
  at::Tensor lift, weight, bias, proj_bias;
};

// Adds (add) or writes adapter a's gradient sums from part (bwd_block's layout for rank p.r: its padded
// rows of stride part_ld(d), then the bias sums) into out at adapter slot `slot` (bank layout, bank rank).
void flush(const float* part, const AdapterParams& p, const Bank& bk, Grads& out, int64_t slot) {
  const int64_t d = bk.d, r = bk.r, ra = p.r, ld = part_ld(d), n_mats = p.source_linear ? 2 : 1;
  float* gl = out.lift.data_ptr<float>() + slot * r * d;
  for (int64_t k = 0; k < r; ++k)
    if (k < ra) {
      std::copy(part + k * ld, part + k * ld + d, gl + k * d);
    } else {
      std::fill(gl + k * d, gl + (k + 1) * d, 0.0f);
    }
  if (bk.has_weight) {
    float* gw = out.weight.data_ptr<float>() + slot * r * d;
    for (int64_t k = 0; k < r; ++k)
      if (p.source_linear && k < ra) {
        std::copy(part + (ra + k) * ld, part + (ra + k) * ld + d, gw + k * d);
      } else {
        std::fill(gw + k * d, gw + (k + 1) * d, 0.0f);
      }
  }
  const float* vecs = part + n_mats * ra * ld;
  float* gb = out.bias.data_ptr<float>() + slot * r;
  for (int64_t k = 0; k < r; ++k) gb[k] = k < ra ? vecs[k] : 0.0f;
  if (bk.has_pb) {
    float* gp = out.proj_bias.data_ptr<float>() + slot * r;
    for (int64_t k = 0; k < r; ++k) gp[k] = p.has_pb && k < ra ? vecs[ra + k] : 0.0f;
  }
}

void zero_adapter(Grads& g, const Bank& bk, int64_t a) {
  const int64_t rd = bk.r * bk.d;
  std::fill(g.lift.data_ptr<float>() + a * rd, g.lift.data_ptr<float>() + (a + 1) * rd, 0.0f);
  if (bk.has_weight) std::fill(g.weight.data_ptr<float>() + a * rd, g.weight.data_ptr<float>() + (a + 1) * rd, 0.0f);
  std::fill(g.bias.data_ptr<float>() + a * bk.r, g.bias.data_ptr<float>() + (a + 1) * bk.r, 0.0f);
  if (bk.has_pb)
    std::fill(g.proj_bias.data_ptr<float>() + a * bk.r, g.proj_bias.data_ptr<float>() + (a + 1) * bk.r, 0.0f);
}

// dst[a] += src[slot] over the bank's four gradients.
void add_adapter(Grads& dst, int64_t a, const Grads& src, int64_t slot, const Bank& bk) {
  const auto add = [](at::Tensor& to, int64_t i, const at::Tensor& from, int64_t j, int64_t len) {
    float* o = to.data_ptr<float>() + i * len;
    const float* s = from.data_ptr<float>() + j * len;
    for (int64_t c = 0; c < len; ++c) o[c] += s[c];
  };
  add(dst.lift, a, src.lift, slot, bk.r * bk.d);
  if (bk.has_weight) add(dst.weight, a, src.weight, slot, bk.r * bk.d);
  add(dst.bias, a, src.bias, slot, bk.r);
  if (bk.has_pb) add(dst.proj_bias, a, src.proj_bias, slot, bk.r);
}

Grads new_grads(const Bank& bk, int64_t slots, const at::TensorOptions& opt) {
  const auto o = opt.dtype(at::kFloat);
  return {at::empty({slots, bk.r, bk.d}, o), bk.has_weight ? at::empty({slots, bk.r, bk.d}, o) : at::empty({0}, o),
          at::empty({slots, bk.r}, o), bk.has_pb ? at::empty({slots, bk.r}, o) : at::empty({0}, o)};
}

template <typename T>
void mixed_bwd_rows(const T* G, const T* U, bool recompute, int64_t ub, int64_t ut, int64_t ud, T* DX, int64_t dx_b,
                    int64_t dx_t, int64_t dx_d, int64_t gb, int64_t gt, int64_t gd, const float* stats,
                    const Layout& L, const Routing& rt, const BankParams& bp, uint64_t seed, Grads& grads) {
  const Bank& bk = bp.bk;
  const int64_t d = L.d, A = bk.A, E = static_cast<int64_t>(rt.order.size());
  // the hidden gradient of rows nobody edits passes through bit for bit
  if (DX) {
    std::vector<uint8_t> edited(L.B * L.T, 0);
    for (int64_t n = 0; n < rt.N; ++n)
      if (rt.row[n] >= 0) edited[rt.row[n]] = 1;
    at::parallel_for(0, L.B * L.T, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        if (edited[row]) continue;
        const int64_t b = row / L.T, t = row % L.T;
        copy_row(G + b * gb + t * gt, gd, DX + b * dx_b + t * dx_t, dx_d, d);
      }
    });
  }
  // adapters with no edited row: zero gradients
  at::parallel_for(0, A, 16, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a)
      if (rt.offsets[a + 1] == rt.offsets[a]) zero_adapter(grads, bk, a);
  });
  if (E == 0) return;
  const int64_t chunks = n_chunks(E, d), per_chunk = (E + chunks - 1) / chunks;
  // carry[2 c]: chunk c's sums of an adapter that began in an earlier chunk; carry[2 c + 1]: of one that
  // goes on into a later chunk
  Grads carry = new_grads(bk, 2 * chunks, grads.lift.options());
  std::vector<int32_t> carry_adapter(2 * chunks, -1);
  const int64_t ld = part_ld(d), Mp = (2 * ld + 2) * bk.r;
  bool any_drop = false;
  for (int64_t a = 0; a < A && bp.apply_dropout; ++a) any_drop = any_drop || bk.dropout[a] > 0.0f;
  constexpr bool fp32 = std::is_same<T, float>::value;
  BwdArgs base{rt.N, L.P, L.T, d, bk.r, bk.rp, gb, gt, gd, ub, ut, ud, nullptr, nullptr, stats, false, false, false,
               recompute, 0, 0.0f, seed};
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    // buffered rows as the single-adapter backward decides (edit_cpu.cpp, edit_bwd_rows)
    BwdBuffers w(d, bk.r, !(fp32 && gd == 1 && !any_drop), !fp32 || recompute);
    std::vector<float> part(Mp);
    int64_t n[kTokens];
    const T* g_src[kTokens];
    const T* u_src[kTokens];
    T* dx[kTokens];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * per_chunk, hi = std::min(E, lo + per_chunk);
      for (int64_t i = lo; i < hi;) {
        const int32_t a = rt.adapter[rt.order[i]];
        const int64_t run_end = std::min(hi, rt.offsets[a + 1]);
        const AdapterParams p = bp.of(a);
        BwdArgs ba = base;
        ba.r = p.r, ba.L = p.L, ba.W = p.W, ba.source_linear = p.source_linear, ba.subtract_proj = p.subtract_proj;
        ba.has_proj_bias = p.has_pb, ba.act = p.act, ba.p_drop = p.p_drop;
        std::fill(part.begin(), part.begin() + ((p.source_linear ? 2 : 1) * ld + 2) * p.r, 0.0f);
        while (i < run_end) {
          int nt = 0;
          for (; i < run_end && nt < kTokens; ++i, ++nt) {
            const int64_t slot = rt.order[i], row = rt.row[slot], b = row / L.T, t = row % L.T;
            n[nt] = slot;
            g_src[nt] = G + b * gb + t * gt;
            u_src[nt] = recompute ? U + b * ub + t * ut : U + slot * d;
            dx[nt] = DX ? DX + b * dx_b + t * dx_t : nullptr;
          }
          bwd_block(nt, n, g_src, u_src, recompute ? ud : 1, dx, dx_d, ba, part.data(), w);
        }
        // the run's sums: final when the adapter lies in this chunk alone, else a carry piece
        if (rt.offsets[a] < lo) {
          flush(part.data(), p, bk, carry, 2 * c);
          carry_adapter[2 * c] = a;
        } else if (rt.offsets[a + 1] > hi) {
          flush(part.data(), p, bk, carry, 2 * c + 1);
          carry_adapter[2 * c + 1] = a;
        } else {
          flush(part.data(), p, bk, grads, a);
        }
      }
    }
  });
  // adapters cut by chunk boundaries: their pieces in chunk order
  for (int64_t c = 0; c < chunks; ++c) {
    const int32_t a = carry_adapter[2 * c + 1];
    if (a < 0) continue;
    zero_adapter(grads, bk, a);
    add_adapter(grads, a, carry, 2 * c + 1, bk);
    for (int64_t k = c + 1; k < chunks && carry_adapter[2 * k] == a; ++k) add_adapter(grads, a, carry, 2 * k, bk);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixed_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& positions, const at::Tensor& adapter_ids,
    const std::optional<at::Tensor>& rows, const std::optional<at::Tensor>& output, const at::Tensor& stats,
    const at::Tensor& lift, const std::optional<at::Tensor>& weight, bool has_proj_bias, const at::Tensor& kinds,
    const at::Tensor& ranks, const at::Tensor& dropout, bool apply_dropout, int64_t seed, bool need_grad_hidden,
    int64_t act = -1, bool may_subtract = true) {
  const Layout L = layout_of(grad_out, "grad_out", positions);
  check_adapter_ids(L, adapter_ids, grad_out);
  const Bank bk = check_bank(lift, weight, nullptr, std::nullopt, has_proj_bias, kinds, ranks, dropout, grad_out);
  check_hints(bk, act, may_subtract);
  const int64_t N = L.B * L.P, d = L.d;
  // the saved tensors are indexed by slot: exactly the forward's shapes (strides are free: read through a copy)
  reft_checks::check_saved_stats(stats, grad_out, N, bk.rp, "mixed");
  reft_checks::check_saved_rows(rows, output, grad_out, N, d, "mixed");
  const bool recompute = !rows.has_value() || !rows->defined();
  Grads grads = new_grads(bk, bk.A, grad_out.options());
  at::Tensor grad_hidden = need_grad_hidden ? at::empty(grad_out.sizes(), grad_out.options())
                                            : at::empty({0}, grad_out.options());
  if (N == 0 || L.B * L.T == 0 || d == 0) {
    for (at::Tensor* t : {&grads.lift, &grads.weight, &grads.bias, &grads.proj_bias}) t->zero_();
    if (need_grad_hidden) grad_hidden.copy_(grad_out);
    return {grad_hidden, grads.lift, grads.weight, grads.bias, grads.proj_bias};
  }
  const Routing rt = route(L, positions, adapter_ids, bk, false);
  const BankParams bp(bk, rt, lift, weight, nullptr, std::nullopt, apply_dropout, nullptr);
  const at::Tensor st = stats.contiguous();
  const at::Tensor u = recompute ? *output : rows->contiguous();
  // output strides in the batched form (flat: B = 1)
  const int64_t ub = recompute && !L.flat ? u.stride(0) : 0, ut = recompute ? u.stride(L.flat ? 0 : 1) : 0,
                ud = recompute ? u.stride(L.flat ? 1 : 2) : 1;
  const int64_t dx_b = need_grad_hidden && !L.flat ? grad_hidden.stride(0) : 0;
  const int64_t dx_t = need_grad_hidden ? grad_hidden.stride(L.flat ? 0 : 1) : 0;
  const int64_t dx_d = need_grad_hidden ? grad_hidden.stride(L.flat ? 1 : 2) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "reft_mixed_bwd_cpu", [&] {
    mixed_bwd_rows<scalar_t>(grad_out.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), recompute, ub, ut, ud,
                             need_grad_hidden ? grad_hidden.data_ptr<scalar_t>() : nullptr, dx_b, dx_t, dx_d, L.sb,
                             L.st, L.sd, st.data_ptr<float>(), L, rt, bp, static_cast<uint64_t>(seed), grads);
  });
  return {grad_hidden, grads.lift, grads.weight, grads.bias, grads.proj_bias};
}

// The registered backward (the hints as the forward's).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixed_bwd_op(
    const at::Tensor& grad_out, const at::Tensor& positions, const at::Tensor& adapter_ids,
    const std::optional<at::Tensor>& rows, const std::optional<at::Tensor>& output, const at::Tensor& stats,
    const at::Tensor& lift, const std::optional<at::Tensor>& weight, bool has_proj_bias, const at::Tensor& kinds,
    const at::Tensor& ranks, const at::Tensor& dropout, int64_t act, bool may_subtract, bool apply_dropout, int64_t seed,
    bool need_grad_hidden) {
  return mixed_bwd_cpu(grad_out, positions, adapter_ids, rows, output, stats, lift, weight, has_proj_bias, kinds, ranks,
                       dropout, apply_dropout, seed, need_grad_hidden, act, may_subtract);
}

// ------------------------------------------------------------------------------------------------
// Meta (shapes only: torch.compile and FakeTensor tracing)
// ------------------------------------------------------------------------------------------------

// What needs no concrete shape: every tensor on hidden's device (reft_checks::check_devices: a call mixing meta
// and CPU tensors lands here and must not return unedited), the bank's lift [A, r, d] (its r sizes the stats),
// and the flags.
void check_meta(const at::Tensor& x, const char* x_name, const at::Tensor& positions, const at::Tensor& adapter_ids,
                const at::Tensor& lift, const std::optional<at::Tensor>& weight, const at::Tensor* bias,
                const std::optional<at::Tensor>& proj_bias, const at::Tensor& kinds, const at::Tensor& ranks,
                const at::Tensor& dropout, int64_t act) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, x_name, " must be [B, T, d] (batched) or [n_tokens, d] (flat), got "
                    "shape ", x.sym_sizes());
  reft_checks::check_dtype(x, x_name);
  reft_checks::check_devices(x, {{"positions", &positions}, {"adapter_ids", &adapter_ids}, {"the bank's lift", &lift},
                                 {"the bank's weight", reft_checks::ptr(weight)}, {"the bank's bias", bias},
                                 {"the bank's proj_bias", reft_checks::ptr(proj_bias)}, {"the bank's kinds", &kinds},
                                 {"the bank's ranks", &ranks}, {"the bank's dropout", &dropout}});
  TORCH_CHECK_VALUE(lift.dim() == 3, "the bank's lift must be [A, r, d], got shape ", lift.sym_sizes());
  TORCH_CHECK_VALUE(act >= -1 && act <= 7, "act must be -1 (each adapter's own, from kinds) or a fused activation "
                    "code in [0, 7], got ", act);
}

std::tuple<at::Tensor, at::Tensor> mixed_fwd_meta(
    const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& adapter_ids, const at::Tensor& lift,
    const std::optional<at::Tensor>& weight, const at::Tensor& bias, const std::optional<at::Tensor>& proj_bias,
    const at::Tensor& kinds, const at::Tensor& ranks, const at::Tensor& dropout, int64_t act, bool, bool, int64_t,
    int64_t save, bool) {
  check_meta(hidden, "hidden", positions, adapter_ids, lift, weight, &bias, proj_bias, kinds, ranks, dropout, act);
  TORCH_CHECK_VALUE(save >= 0 && save <= 2, "save must be 0 (nothing), 1 (stats) or 2 (stats and rows), got ", save);
  const bool flat = hidden.dim() == 2;
  const auto N = flat ? positions.sym_size(0) : hidden.sym_size(0) * positions.sym_size(1);
  const int64_t rp = r_pad(lift.size(1));
  at::Tensor saved = save >= 2 ? at::empty_symint({N, hidden.sym_size(-1)}, hidden.options())
                               : at::empty({0}, hidden.options());
  at::Tensor stats = save >= 1 ? at::empty_symint({N, 2, rp}, hidden.options().dtype(at::kFloat))
                               : at::empty({0}, hidden.options().dtype(at::kFloat));
  return {saved, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixed_bwd_meta(
    const at::Tensor& grad_out, const at::Tensor& positions, const at::Tensor& adapter_ids,
    const std::optional<at::Tensor>& rows, const std::optional<at::Tensor>& output, const at::Tensor& stats,
    const at::Tensor& lift, const std::optional<at::Tensor>& weight, bool has_proj_bias, const at::Tensor& kinds,
    const at::Tensor& ranks, const at::Tensor& dropout, int64_t act, bool, bool, int64_t, bool need_grad_hidden) {
  check_meta(grad_out, "grad_out", positions, adapter_ids, lift, weight, nullptr, std::nullopt, kinds, ranks, dropout,
             act);
  reft_checks::check_devices(grad_out, {{"rows", reft_checks::ptr(rows)}, {"output", reft_checks::ptr(output)},
                                        {"stats", &stats}});
  const auto o = grad_out.options().dtype(at::kFloat);
  const int64_t A = lift.size(0), r = lift.size(1), d = lift.size(2);
  const bool has_weight = weight.has_value() && weight->defined();
  return {need_grad_hidden ? at::empty_symint(grad_out.sym_sizes(), grad_out.options()) : at::empty({0}, grad_out.options()),
          at::empty({A, r, d}, o), has_weight ? at::empty({A, r, d}, o) : at::empty({0}, o), at::empty({A, r}, o),
          has_proj_bias ? at::empty({A, r}, o) : at::empty({0}, o)};
}

// mixed_edit's: the edit is in place, hidden is the result
at::Tensor mixed_edit_meta(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& adapter_ids,
                           const at::Tensor& lift, const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                           const std::optional<at::Tensor>& proj_bias, const at::Tensor& kinds, const at::Tensor& ranks,
                           const at::Tensor& dropout, bool, int64_t, bool, bool) {
  check_meta(hidden, "hidden", positions, adapter_ids, lift, weight, &bias, proj_bias, kinds, ranks, dropout, -1);
  return hidden;
}

// ------------------------------------------------------------------------------------------------
// mixed_edit: forward and backward with the autograd formula in C++ (eager calls)
// ------------------------------------------------------------------------------------------------

at::Tensor as_dtype(const at::Tensor& g, const at::Tensor& like) {
  return g.scalar_type() == like.scalar_type() ? g : g.to(like.scalar_type());
}

struct MixedEditFunction : public torch::autograd::Function<MixedEditFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor hidden, const at::Tensor& positions,
                            const at::Tensor& adapter_ids, const at::Tensor& lift,
                            const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                            const std::optional<at::Tensor>& proj_bias, const at::Tensor& kinds, const at::Tensor& ranks,
                            const at::Tensor& dropout, bool apply_dropout, int64_t seed, bool recompute, bool check) {
    at::AutoDispatchBelowADInplaceOrView guard;
    recompute = recompute && !apply_dropout;  // dropped elements cannot be rebuilt from the output
    auto [rows, stats] = mixed_fwd_impl(hidden, positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks,
                                        dropout, apply_dropout, seed, recompute ? 1 : 2, check);
    ctx->mark_dirty({hidden});
    ctx->save_for_backward({positions, adapter_ids, recompute ? at::Tensor() : rows, stats, lift,
                            weight.value_or(at::Tensor()), bias, proj_bias.value_or(at::Tensor()), kinds, ranks, dropout,
                            recompute ? hidden : at::Tensor()});
    ctx->saved_data["apply_dropout"] = apply_dropout;
    ctx->saved_data["seed"] = seed;
    return hidden;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &positions = s[0], &ids = s[1], &rows = s[2], &stats = s[3], &lift = s[4], &weight = s[5],
                     &bias = s[6], &proj_bias = s[7], &kinds = s[8], &ranks = s[9], &dropout = s[10], &output = s[11];
    torch::autograd::variable_list out(14);
    const at::Tensor& grad = grad_outputs[0];
    if (!grad.defined()) return out;
    const bool has_w = weight.defined(), has_pb = proj_bias.defined();
    auto [grad_hidden, g_lift, g_weight, g_bias, g_pb] = mixed_bwd_cpu(
        grad, positions, ids, opt(rows), opt(output), stats, lift, opt(weight), has_pb, kinds, ranks, dropout,
        ctx->saved_data["apply_dropout"].toBool(), ctx->saved_data["seed"].toInt(), ctx->needs_input_grad(0));
    // out is indexed by forward argument; needs_input_grad by tensor input present (weight and proj_bias
    // may be absent): hidden 0, positions 1, adapter_ids 2, lift 3, then weight, bias, proj_bias as present
    const size_t e_weight = 4, e_bias = has_w ? 5 : 4, e_pb = e_bias + 1;
    if (ctx->needs_input_grad(0)) out[0] = grad_hidden;
    if (ctx->needs_input_grad(3)) out[3] = as_dtype(g_lift, lift);
    if (has_w && ctx->needs_input_grad(e_weight)) out[4] = as_dtype(g_weight, weight);
    if (ctx->needs_input_grad(e_bias)) out[5] = as_dtype(g_bias, bias);
    if (has_pb && ctx->needs_input_grad(e_pb)) out[6] = as_dtype(g_pb, proj_bias);
    return out;
  }
};

// The CPU kernel of mixed_edit: the forward alone, nothing saved (inference mode, and no-grad calls).
at::Tensor mixed_edit_inference(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& adapter_ids,
                                const at::Tensor& lift, const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                                const std::optional<at::Tensor>& proj_bias, const at::Tensor& kinds,
                                const at::Tensor& ranks, const at::Tensor& dropout, bool apply_dropout, int64_t seed,
                                bool, bool check) {
  mixed_fwd_impl(hidden, positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout, apply_dropout,
                 seed, 0, check);
  return hidden;
}

at::Tensor mixed_edit_autograd(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& adapter_ids,
                               const at::Tensor& lift, const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                               const std::optional<at::Tensor>& proj_bias, const at::Tensor& kinds,
                               const at::Tensor& ranks, const at::Tensor& dropout, bool apply_dropout, int64_t seed,
                               bool recompute, bool check) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (hidden.requires_grad() || lift.requires_grad() || bias.requires_grad() ||
                           (weight.has_value() && weight->requires_grad()) ||
                           (proj_bias.has_value() && proj_bias->requires_grad()));
  if (needs_grad) {
    TORCH_CHECK_VALUE(hidden.device().is_cpu(), "reft_kernels_cpp: hidden must be a CPU tensor, got ", hidden.device());
    reft_checks::check_not_leaf(hidden);
    // A tensor that shares memory with hidden is cloned before the autograd Function (for the bank's float
    // tensors a differentiable copy, so their gradient flows through it to what they viewed): the forward reads
    // it as it was, and the backward, which reads positions, ids and the bank again after the edit rewrote
    // hidden, reads the same values.
    const auto own = [&](const at::Tensor& x) { return reft_checks::overlaps(x, hidden) ? x.clone() : x; };
    const auto own_opt = [&](const std::optional<at::Tensor>& x) {
      return x.has_value() && x->defined() ? std::optional<at::Tensor>(own(*x)) : x;
    };
    return MixedEditFunction::apply(hidden, own(positions), own(adapter_ids), own(lift), own_opt(weight), own(bias),
                                    own_opt(proj_bias), own(kinds), own(ranks), own(dropout), apply_dropout, seed,
                                    recompute, check);
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    mixed_edit_inference(hidden, positions, adapter_ids, lift, weight, bias, proj_bias, kinds, ranks, dropout,
                         apply_dropout, seed, recompute, check);
  }
  if (!hidden.is_inference()) torch::autograd::impl::bump_version(hidden);  // the in-place write, for autograd
  return hidden;
}

}  // namespace
}  // namespace reft_cpp

// The schemas are those of the Triton ops (reft_kernels::mixed_fwd / mixed_bwd in mixed_edit.py).
TORCH_LIBRARY_FRAGMENT(reft_kernels_cpp, m) {
  m.def(
      "mixed_fwd(Tensor(a0!) hidden, Tensor positions, Tensor adapter_ids, Tensor lift, Tensor? weight, Tensor bias, "
      "Tensor? proj_bias, Tensor kinds, Tensor ranks, Tensor dropout, int act, bool may_subtract, bool apply_dropout, "
      "int seed, int save, bool rows_unique) -> (Tensor, Tensor)");
  m.def(
      "mixed_bwd(Tensor grad_out, Tensor positions, Tensor adapter_ids, Tensor? rows, Tensor? output, Tensor stats, "
      "Tensor lift, Tensor? weight, bool has_proj_bias, Tensor kinds, Tensor ranks, Tensor dropout, int act, "
      "bool may_subtract, bool apply_dropout, int seed, bool need_grad_hidden) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "mixed_edit(Tensor(a!) hidden, Tensor positions, Tensor adapter_ids, Tensor lift, Tensor? weight, Tensor bias, "
      "Tensor? proj_bias, Tensor kinds, Tensor ranks, Tensor dropout, bool apply_dropout, int seed, bool recompute, "
      "bool check_indices=False) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(reft_kernels_cpp, Autograd, m) {
  m.impl("mixed_edit", &reft_cpp::mixed_edit_autograd);
}

TORCH_LIBRARY_IMPL(reft_kernels_cpp, CPU, m) {
  m.impl("mixed_fwd", &reft_cpp::mixed_fwd_cpu);
  m.impl("mixed_bwd", &reft_cpp::mixed_bwd_op);
  m.impl("mixed_edit", &reft_cpp::mixed_edit_inference);
}

TORCH_LIBRARY_IMPL(reft_kernels_cpp, Meta, m) {
  m.impl("mixed_fwd", &reft_cpp::mixed_fwd_meta);
  m.impl("mixed_bwd", &reft_cpp::mixed_bwd_meta);
  m.impl("mixed_edit", &reft_cpp::mixed_edit_meta);
}
