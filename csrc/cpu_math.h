// Element helpers shared by the CPU kernels (group_norm_cpu.cpp,
// rms_norm_cpu.cpp): the function multi-versioning attribute of their element
// loops, a vectorisable SiLU and its derivative, and lane-parallel sums.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/bit_cast.h>

#include <cmath>
#include <cstdint>

// Extensions are compiled for the baseline ISA (SSE2 on x86-64).  Where the
// toolchain supports function multi-versioning (ifunc), the element loops are
// also compiled for x86-64-v4 (AVX-512) and x86-64-v3 (AVX2 + FMA), the best
// one picked at load time, with FMA contraction allowed in them (the build
// turns it off for the bit-exact sampler kernels; here the statistics' order
// differs from torch's anyway, and the exp polynomial needs the FMAs).  GCC
// before 12 gets AVX-512F / AVX2 clones without FMA.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 12
#define FASTDIFF_TARGET_CLONES                                                   \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), \
                 optimize("fp-contract=fast")))
#elif defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTDIFF_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTDIFF_TARGET_CLONES
#endif

namespace fastdiff {
namespace cpu {

// Independent partial sums of a row reduction: enough vector accumulators to
// hide the add latency (two AVX-512 vectors of float).
constexpr int kLanes = 32;

// 1 + exp(v) without a libm call, so that the loops using it vectorise
// (glibc's expf is a scalar call unless -ffast-math): v = k ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite, ln2 in two parts), exp(r) by Cephes' degree-6
// polynomial (about 1 ulp), 2^k built in the exponent bits.  v is clamped to
// [-87, 89]: below, 1 + exp(v) rounds to 1 anyway; above 88.38, k = 128 makes
// 2^k (hence the result) +inf, the true value for v > 88.72 and, for silu
// z / (1 + exp(-z)), a difference below 1e-36 in between.  NaN stays NaN.
C10_ALWAYS_INLINE float one_plus_exp(float v) {
  v = v < -87.0f ? -87.0f : v;
  v = v > 89.0f ? 89.0f : v;
  // t = round(v log2(e)) + 1.5 * 2^23: adding 1.5 * 2^23 rounds to an
  // integer, which then sits in the low mantissa bits of t.
  constexpr float kShifter = 12582912.0f;
  const float t = v * 1.44269504088896341f + kShifter;
  const float k = t - kShifter;
  const float r = (v - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^k: k (two's complement in t's low bits) shifted into the exponent
  // field, whose bias is 127; the shift drops t's own exponent bits.
  const uint32_t bits = (c10::bit_cast<uint32_t>(t) << 23) + (127u << 23);
  return 1.0f + p * c10::bit_cast<float>(bits);
}

// fp64 is the precise path (tests hold it to 1e-12): libm's exp.
C10_ALWAYS_INLINE double one_plus_exp(double v) {
  return 1.0 + std::exp(v);
}

template <bool kSilu, typename acc_t>
C10_ALWAYS_INLINE acc_t act(acc_t z) {
  if constexpr (kSilu) {
    return z / one_plus_exp(-z);
  } else {
    return z;
  }
}

// dz = dy act'(z), the reference's formula.
template <bool kSilu, typename acc_t>
C10_ALWAYS_INLINE acc_t act_grad(acc_t dy, acc_t z) {
  if constexpr (kSilu) {
    const acc_t sig = acc_t(1) / one_plus_exp(-z);
    return dy * sig * (acc_t(1) + z * (acc_t(1) - sig));
  } else {
    return dy;
  }
}

// ---------------------------------------------------------------------------
// Reductions over an acc_t buffer: kLanes partial sums, folded pairwise.
// ---------------------------------------------------------------------------

template <typename acc_t, int kN>
C10_ALWAYS_INLINE acc_t fold(acc_t (&lane)[kN]) {
  for (int w = kN / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) {
      lane[l] += lane[l + w];
    }
  }
  return lane[0];
}

// Σ f(i) for i < len in kN partial sums (lane l takes i = l mod kN), folded pairwise.
template <int kN, typename acc_t, typename F>
C10_ALWAYS_INLINE acc_t lane_sum_n(int64_t len, F f) {
  acc_t lane[kN] = {};
  int64_t i = 0;
  for (; i + kN <= len; i += kN) {
    for (int l = 0; l < kN; ++l) {
      lane[l] += f(i + l);
    }
  }
  for (int l = 0; i + l < len; ++l) {
    lane[l] += f(i + l);
  }
  return fold(lane);
}

// Σ f(i) for i < len.  A row shorter than kLanes (e.g. the 16 positions of a 4x4
// map) takes 8 lanes: with 32 all its elements would fall in the scalar tail and
// the fold would add 31 lanes, most of them zero.
template <typename acc_t, typename F>
C10_ALWAYS_INLINE acc_t lane_sum(int64_t len, F f) {
  if (len < kLanes) {
    return lane_sum_n<8, acc_t>(len, f);
  }
  return lane_sum_n<kLanes, acc_t>(len, f);
}

}  // namespace cpu
}  // namespace fastdiff
