// fastdiff::sampler_step, the fused sampler update; shared by the CPU and CUDA
// kernels and the bindings.  The math is specified by
// fastdiff/reference/sampler_step.py:
//
//   m   = model_output                     or  m_u + w (m_c - m_u) with guidance_scale w
//   x0  = clamp(a_x x + a_m m + a_n n, clip_min, clip_max)
//   out = c_x x + c_0 x0 + c_m m + c_p prev + c_q prev2 + c_n n
//
// (absent tensors contribute nothing), with the coefficients of sample b read
// from row index[b] (or b) of coefs and n the noise tensor or Philox normals.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fastdiff {

// Columns of a coefficient row, in the order of the reference (and Triton) code.
enum Coef : int { A_X = 0, A_M, A_N, C_X, C_M, C_0, C_P, C_Q, C_N, NUM_COEFS };

// The inputs of one call, validated by the bindings (bindings.cpp):
// * x, prev, prev2, noise, out, x0_out: (B, *S), out's dtype (fp16, bf16, fp32
//   or fp64), dense and in out's memory order with the batch dimension
//   outermost, so every kernel walks them as flat arrays of numel = B * F
//   elements in which sample b is [b * F, (b + 1) * F).
// * model_output: like x, or (2B, *S) = cat(uncond, cond) with guidance_scale,
//   the cond half then starting at flat offset numel.
// * coefs: (R, NUM_COEFS) contiguous, float64 for fp64 x and float32 otherwise
//   (the kernels' arithmetic type); R == B when index is absent.
// * index: (B,) contiguous int64 rows of coefs; seed: one int64 (its 64 bits
//   are the Philox key) on x's device.  noise and seed are never both given.
struct SamplerStepArgs {
  at::Tensor x;
  std::optional<at::Tensor> model_output;
  at::Tensor coefs;
  std::optional<at::Tensor> index;
  std::optional<at::Tensor> prev;
  std::optional<at::Tensor> prev2;
  std::optional<at::Tensor> noise;
  std::optional<at::Tensor> seed;
  std::optional<double> guidance_scale;
  std::optional<double> clip_min;
  std::optional<double> clip_max;
  at::Tensor out;
  std::optional<at::Tensor> x0_out;

  int64_t batch() const { return out.size(0); }
  int64_t numel() const { return out.numel(); }
  int64_t per_sample() const { return out.numel() / out.size(0); }
};

void sampler_step_cpu(const SamplerStepArgs& args);

#ifdef FASTDIFF_WITH_CUDA
void sampler_step_cuda(const SamplerStepArgs& args);
#endif

}  // namespace fastdiff
