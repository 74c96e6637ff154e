// The activations of the fused ReFT edit, shared by the C++ CPU kernels (edit_cpu.cpp) and the CUDA
// kernel (edit_cuda.cu). Names and formulas are those of reft_kernels/ops/activations.py (SUPPORTED; the
// test suites check every name against the torch reference). Everything runs in fp32.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#if defined(__CUDACC__)
#define REFT_HD __host__ __device__ __forceinline__
#else
#define REFT_HD inline
#endif

namespace reft_act {

// The activation's code, or an error naming it (its host-side lookup; the kernels switch on the code).
inline int act_code(const std::string& act) {
  if (act == "identity" || act == "linear") return 0;
  if (act == "relu") return 1;
  if (act == "gelu") return 2;
  if (act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast") return 3;
  if (act == "silu" || act == "swish") return 4;
  if (act == "tanh") return 5;
  if (act == "sigmoid") return 6;
  if (act == "quick_gelu") return 7;
  TORCH_CHECK_VALUE(false, "act='", act, "' has no fused kernel; use backend='torch' for it");
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// (::expf, ::erff, ::tanhf: the C library's on the host, CUDA's math library on the device)
REFT_HD float sigmoid(float x) { return 1.0f / (1.0f + ::expf(-x)); }

REFT_HD float act_fwd(float z, int code) {
  switch (code) {
    case 0: return z;
    case 1: return z > 0.0f ? z : 0.0f;
    case 2: return 0.5f * z * (1.0f + ::erff(z * kInvSqrt2));
    case 3: return 0.5f * z * (1.0f + ::tanhf(kSqrt2OverPi * (z + 0.044715f * z * z * z)));
    case 4: return z * sigmoid(z);
    case 5: return ::tanhf(z);
    case 6: return sigmoid(z);
    default: return z * sigmoid(1.702f * z);
  }
}

// d act / dz
REFT_HD float act_grad(float z, int code) {
  switch (code) {
    case 0: return 1.0f;
    case 1: return z > 0.0f ? 1.0f : 0.0f;
    case 2: return 0.5f * (1.0f + ::erff(z * kInvSqrt2)) + z * kInvSqrt2Pi * ::expf(-0.5f * z * z);
    case 3: {
      const float t = ::tanhf(kSqrt2OverPi * (z + 0.044715f * z * z * z));
      return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * z * z);
    }
    case 4: { const float s = sigmoid(z); return s * (1.0f + z * (1.0f - s)); }
    case 5: { const float t = ::tanhf(z); return 1.0f - t * t; }
    case 6: { const float s = sigmoid(z); return s * (1.0f - s); }
    default: { const float s = sigmoid(1.702f * z); return s * (1.0f + 1.702f * z * (1.0f - s)); }
  }
}

}  // namespace reft_act
