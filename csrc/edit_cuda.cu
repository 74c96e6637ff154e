// The fused ReFT edit's forward on CUDA, launched from C++: the CUDA kernel of reft_kernels_cpp::edit.
//
// Why: an eager call of the Triton forward costs ~90 us of host time on an H100 before any byte moves
// (Python argument binding of a ~30-argument launcher, the autograd.Function, the public wrapper), against
// ~11 us for torch.add_ (README, issue 2's small-N figures). In prefill and decode that host time is the
// cost. Here the dispatcher calls a C++ function that checks shapes and launches one kernel on the
// current stream, as a torch op does.
//
// Scope: the forward without gradients (inference, generation: the host-bound regime). Calls that need
// gradients, or dropout, take the Triton ops (reft_kernels.reft_edit routes them); this kernel refuses
// dropout. Same contract as the Triton and C++ CPU kernels (fused_edit.py's module docstring): for each
// slot (b, j), with t = positions[b, j]:
//     z = W h + b (source_linear) ; s = act(z) or b ; delta = s - (L h + pb) (subtract_proj) or s
//     h <- h + L^T delta, in place, computed in fp32 whatever the storage (fp32 / fp16 / bf16 hidden)
// - t outside [0, T) (-1 = empty) edits nothing; a position named twice in a batch row is edited once, by
//   its first slot (each block looks back over its row's earlier slots: P is small).
// - Parameters are fp32 in the kernel: others are converted on the host (one copy kernel each).
//
// Kernel: one block of kThreads threads per slot. Pass 1 walks the row once per group of kGroup
// parameter rows, with per-thread fp32 partial dot products reduced across the block (warp shuffles, then
// shared memory); pass 2 writes h + L^T delta. The row and the parameters are read from global memory
// (the row's second read hits L1/L2). Bytes moved per slot: the row read twice and written once, and
// 2 r d fp32 of parameters (shared by all slots through L2).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "activations.h"
#include "validation.h"

namespace reft_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 4;  // parameter rows of W and of L reduced per pass over the row

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) edit_fwd_kernel(
    scalar_t* __restrict__ hidden,     // [B, T, d], edited in place
    int64_t sb, int64_t st, int64_t sd,  // hidden strides
    int64_t T, int64_t d,
    const index_t* __restrict__ positions,  // [B, P]
    int64_t P, int64_t spb, int64_t spp,     // positions strides
    const float* __restrict__ L,    // [r, d] lift, contiguous
    const float* __restrict__ W,    // [r, d] source weight (source_linear) or null
    const float* __restrict__ bias,  // [r]
    const float* __restrict__ pb,    // [r] projection bias or null
    int r, bool source_linear, bool subtract_proj, int act) {
  extern __shared__ float delta[];  // [r]
  __shared__ float partial[kWarps][2 * kGroup];
  const int64_t n = blockIdx.x;
  const int64_t b = n / P, j = n % P;
  const int64_t t = static_cast<int64_t>(positions[b * spb + j * spp]);
  if (t < 0 || t >= T) return;
  for (int64_t jj = 0; jj < j; ++jj)
    if (static_cast<int64_t>(positions[b * spb + jj * spp]) == t) return;  // an earlier slot edits this row
  scalar_t* h = hidden + b * sb + t * st;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  for (int k0 = 0; k0 < r; k0 += kGroup) {
    const int kc = min(kGroup, r - k0);
    float acc_w[kGroup] = {0.0f}, acc_l[kGroup] = {0.0f};
    for (int64_t c = threadIdx.x; c < d; c += kThreads) {
      const float x = static_cast<float>(h[c * sd]);
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        if (k < kc) {
          if (source_linear) acc_w[k] += x * W[(k0 + k) * d + c];
          if (subtract_proj) acc_l[k] += x * L[(k0 + k) * d + c];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        acc_w[k] += __shfl_xor_sync(0xffffffffu, acc_w[k], off);
        acc_l[k] += __shfl_xor_sync(0xffffffffu, acc_l[k], off);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < kGroup; ++k) partial[warp][k] = acc_w[k], partial[warp][kGroup + k] = acc_l[k];
    }
    __syncthreads();
    if (threadIdx.x < kc) {
      const int k = threadIdx.x;
      float z = 0.0f, q = 0.0f;
      for (int w = 0; w < kWarps; ++w) z += partial[w][k], q += partial[w][kGroup + k];
      float s;
      if (source_linear) {
        s = reft_act::act_fwd(z + bias[k0 + k], act);
      } else {
        s = bias[k0 + k];
      }
      if (subtract_proj) s -= q + (pb != nullptr ? pb[k0 + k] : 0.0f);
      delta[k0 + k] = s;
    }
    __syncthreads();  // delta written; partial free for the next group
  }
  for (int64_t c = threadIdx.x; c < d; c += kThreads) {
    float y = static_cast<float>(h[c * sd]);
    for (int k = 0; k < r; ++k) y += delta[k] * L[k * d + c];
    h[c * sd] = static_cast<scalar_t>(y);
  }
}

// t as a contiguous fp32 tensor; a copy when it shares memory with hidden (the rows are edited in place, and a
// parameter must read as it was before the edit).
at::Tensor fp32_on(const at::Tensor& t, const at::Tensor& hidden) {
  at::Tensor f = t.to(at::kFloat).contiguous();
  return reft_checks::overlaps(f, hidden) ? f.clone() : f;
}

// The CUDA kernel of reft_kernels_cpp::edit (schema in edit_cpu.cpp): the forward, in place, no gradient.
at::Tensor edit_cuda(const at::Tensor& hidden, const at::Tensor& positions, const at::Tensor& lift,
                     const std::optional<at::Tensor>& weight, const at::Tensor& bias,
                     const std::optional<at::Tensor>& proj_bias, bool source_linear, bool subtract_proj,
                     c10::string_view act, double dropout, int64_t /*seed*/, bool /*recompute*/,
                     bool check_positions) {
  TORCH_CHECK(hidden.is_cuda() && hidden.dim() == 3, "reft_kernels_cpp::edit: hidden must be a CUDA tensor [B, T, d], "
              "got ", hidden.device(), " ", hidden.sizes());
  const auto dt = hidden.scalar_type();
  TORCH_CHECK_TYPE(reft_checks::kernel_float(dt), "hidden must have a dtype in [float32, float16, bfloat16], got ", dt);
  reft_checks::check_no_internal_overlap(hidden);
  TORCH_CHECK(dropout == 0.0, "reft_kernels_cpp::edit: the CUDA kernel runs without dropout (got ", dropout,
              "); reft_kernels.reft_edit sends dropout to the Triton ops");
  const int64_t B = hidden.size(0), T = hidden.size(1), d = hidden.size(2);
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(0) == B, "positions must be [B, P] with B=", B,
                    " (hidden's batch), got shape ", positions.sizes());
  reft_checks::check_device(positions, "positions", hidden);
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong || positions.scalar_type() == at::kInt,
                   "positions must be int32 or int64, got ", positions.scalar_type());
  const int64_t r = reft_checks::check_lift(lift, hidden), P = positions.size(1);
  reft_checks::check_weight(weight, source_linear, lift, hidden);
  reft_checks::check_vector(bias, "bias", r, hidden);
  const bool has_pb = proj_bias.has_value() && proj_bias->defined();
  reft_checks::check_proj_bias(has_pb, subtract_proj);
  if (has_pb) reft_checks::check_vector(*proj_bias, "proj_bias", r, hidden);
  const int code = reft_act::act_code(std::string(act));
  // r floats of dynamic shared memory per block (48 KB without opting in)
  TORCH_CHECK(r <= 8192, "reft_kernels_cpp::edit: the CUDA kernel takes r <= 8192, got r = ", r);
  const c10::cuda::CUDAGuard guard(hidden.device());
  if (check_positions && positions.numel() > 0) {  // asked for explicitly: costs a device-to-host sync
    const auto [lo, hi] = at::aminmax(positions);
    const int64_t vlo = lo.item<int64_t>(), vhi = hi.item<int64_t>();
    TORCH_CHECK_VALUE(vlo >= -1 && vhi < T, "positions must lie in [-1, T) with T=", T,
                      " (-1 = no edit), got values in [", vlo, ", ", vhi, "]");
  }
  const int64_t N = B * P;
  if (N == 0 || d == 0) return hidden;
  TORCH_CHECK(N <= INT32_MAX, "reft_kernels_cpp::edit: B * P must be below 2^31, got ", N);
  const at::Tensor L = fp32_on(lift, hidden), b = fp32_on(bias, hidden);
  const at::Tensor Wf = source_linear ? fp32_on(*weight, hidden) : at::Tensor();
  const at::Tensor pbf = has_pb ? fp32_on(*proj_bias, hidden) : at::Tensor();
  // positions are read while rows are written: a view of hidden is read from a copy (as the parameters)
  const at::Tensor pos_t = reft_checks::overlaps(positions, hidden) ? positions.clone() : positions;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t shared = static_cast<size_t>(r) * sizeof(float);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "reft_edit_cuda", [&] {
    const auto launch = [&](auto* pos) {
      edit_fwd_kernel<scalar_t><<<static_cast<unsigned>(N), kThreads, shared, stream>>>(
          hidden.data_ptr<scalar_t>(), hidden.stride(0), hidden.stride(1), hidden.stride(2), T, d, pos, P,
          pos_t.stride(0), pos_t.stride(1), L.data_ptr<float>(),
          source_linear ? Wf.data_ptr<float>() : nullptr, b.data_ptr<float>(),
          pbf.defined() ? pbf.data_ptr<float>() : nullptr, static_cast<int>(r), source_linear, subtract_proj, code);
    };
    if (pos_t.scalar_type() == at::kLong) {
      launch(pos_t.data_ptr<int64_t>());
    } else {
      launch(pos_t.data_ptr<int32_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return hidden;
}

}  // namespace
}  // namespace reft_cuda

TORCH_LIBRARY_IMPL(reft_kernels_cpp, CUDA, m) {
  m.impl("edit", &reft_cuda::edit_cuda);
}
