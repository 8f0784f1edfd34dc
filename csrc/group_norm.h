// fastdiff::group_norm_silu, GroupNorm + time-embedding add + scale-shift +
// SiLU; shared by the CPU and CUDA kernels and the bindings.  The math is
// specified by fastdiff/reference/group_norm.py:
//
//   h = x + emb[n, c];  mean, rstd per (n, g) over the D = C / G channels x S
//   spatial positions of h (biased variance, rstd = 1 / sqrt(var + eps));
//   n̂ = (h - mean) rstd;  z = (n̂ w[c] + b[c]) (1 + scale[n, c]) + shift[n, c];
//   y = silu(z) or z.
//
// Every kernel applies the forward per channel as
//   y = act((x + c0) alpha + beta),  c0 = emb - mean,
//   alpha = rstd w (1 + scale),  beta = b (1 + scale) + shift,
// and the backward from the per-channel sums over the positions of
//   S1 = Σ dz,  S2 = Σ dz n̂,  S3 = Σ n̂   (dz = dy act'(z))
// with g = w (1 + scale), m1 = Σ_c g S1 / (D S), m2 = Σ_c g S2 / (D S):
//   dshift = S1,  dscale = w S2 + b S1,  dweight = Σ_n (1 + scale) S2,
//   dbias = Σ_n (1 + scale) S1,  demb = rstd (g S1 - S m1 - m2 S3),
//   dx = rstd (g dz - m1 - n̂ m2).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fastdiff {

// Sizes of a call: x is (N, C, *spatial) with S = prod(spatial) positions,
// G groups of D = C / G channels.  Element (n, c, s) lies at
// n C S + c S + s (contiguous) or n C S + s C + c (channels_last: the
// channels of a position are contiguous).  With S == 1 both maps agree and the
// bindings report channels_last, the layout whose kernels vectorise over C.
struct GroupNormShape {
  int64_t N, C, S, G, D;
  bool channels_last;
};

// Inputs of the forward, validated by the bindings (bindings.cpp):
// * x, y: (N, C, *spatial), fp16 / bf16 / fp32 / fp64, dense in the layout of
//   `shape`; numel > 0.
// * weight, bias: (C,); emb, scale, shift: (N, C); each absent or contiguous
//   in the opmath dtype (float, double for fp64 x).
// * mean, rstd: (N, G) contiguous, opmath dtype: written.
struct GroupNormFwdArgs {
  GroupNormShape shape;
  at::Tensor x;
  std::optional<at::Tensor> weight, bias, emb, scale, shift;
  double eps;
  bool silu;
  at::Tensor y, mean, rstd;
};

// Inputs of the backward: dy and dx like x; mean, rstd as the forward wrote
// them; each gradient absent (not wanted) or preallocated: dx like x, the
// others contiguous in the opmath dtype with the shape of their input.
struct GroupNormBwdArgs {
  GroupNormShape shape;
  at::Tensor dy, x;
  std::optional<at::Tensor> weight, bias, emb, scale, shift;
  at::Tensor mean, rstd;
  bool silu;
  std::optional<at::Tensor> dx, dweight, dbias, demb, dscale, dshift;
};

void group_norm_fwd_cpu(const GroupNormFwdArgs& args);
void group_norm_bwd_cpu(const GroupNormBwdArgs& args);

#ifdef FASTDIFF_WITH_CUDA
void group_norm_fwd_cuda(const GroupNormFwdArgs& args);
void group_norm_bwd_cuda(const GroupNormBwdArgs& args);
#endif

}  // namespace fastdiff
