// fastdiff::rms_norm_silu, denoising-diffusion-pytorch 2.x's RMSNorm
// (F.normalize over the channels times sqrt(C) g) + scale-shift + SiLU; shared
// by the CPU kernels and the bindings.  The math is specified by
// fastdiff/reference/rms_norm.py:
//
//   rstd = 1 / max(||x[n, :, s]||_2, eps) per (n, position s), fp32 (fp64);
//   x̂ = x rstd;  z = x̂ g + shift[n, c],  g = sqrt(C) w[c] (1 + scale[n, c]);
//   y = silu(z) or z.
//
// The backward, with dz = dy act'(z), per position
//   dot = Σ_c dz g x̂,  dx = rstd (dz g - x̂ dot)
// (dot taken as 0 where the norm was clamped: rstd >= 1 / eps), and from the
// per-channel sums over the positions S1 = Σ dz, S2 = Σ dz x̂:
//   dshift = S1,  dscale = sqrt(C) w S2,  dweight = Σ_n sqrt(C) (1 + scale) S2.
//
// There is no CUDA kernel: on GPUs the op runs on its Triton kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fastdiff {

// Sizes of a call: x is (N, C, *spatial) with S = prod(spatial) positions.
// Element (n, c, s) lies at n C S + c S + s (contiguous) or n C S + s C + c
// (channels_last).  With S == 1 both maps agree and the bindings report
// channels_last, the layout whose kernels vectorise over C.
struct RmsNormShape {
  int64_t N, C, S;
  bool channels_last;
};

// Inputs of the forward, validated by the bindings (bindings.cpp):
// * x, y: (N, C, *spatial), fp16 / bf16 / fp32 / fp64, dense in the layout of
//   `shape`; numel > 0.
// * weight: (C,); scale, shift: (N, C); each absent or contiguous in the
//   opmath dtype (float, double for fp64 x).
// * rstd: (N, *spatial) contiguous, opmath dtype: written.
struct RmsNormFwdArgs {
  RmsNormShape shape;
  at::Tensor x;
  std::optional<at::Tensor> weight, scale, shift;
  double eps;
  bool silu;
  at::Tensor y, rstd;
};

// Inputs of the backward: dy and dx like x; rstd as the forward wrote it; eps
// the forward's; each gradient absent (not wanted) or preallocated: dx like
// x, the others contiguous in the opmath dtype with the shape of their input.
struct RmsNormBwdArgs {
  RmsNormShape shape;
  at::Tensor dy, x;
  std::optional<at::Tensor> weight, scale, shift;
  at::Tensor rstd;
  double eps;
  bool silu;
  std::optional<at::Tensor> dx, dweight, dscale, dshift;
};

void rms_norm_fwd_cpu(const RmsNormFwdArgs& args);
void rms_norm_bwd_cpu(const RmsNormBwdArgs& args);

}  // namespace fastdiff
