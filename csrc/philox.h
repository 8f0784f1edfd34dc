// Philox4x32-10 counter-based random numbers and the normal transform of
// fastdiff's noise stream, for host and device code alike.
//
// The specification is fastdiff/reference/philox.py: noise element i (its
// position in memory of the output) for seed s is
//
//   (w0, w1, _, _) = Philox4x32-10(counter=(lo32(i), hi32(i), 0, 0),
//                                  key=(lo32(s), hi32(s)))
//   u1 = ((w0 >> 8) + 1) * 2^-24        in (0, 1], so log(u1) is finite
//   u2 =  (w1 >> 8)      * 2^-24        in [0, 1)
//   z  = sqrt(-2 log u1) * cos(2 pi u2)  in float
//
// The uint32 words are bit-exact with the reference (tests/test_extension.py
// checks them); log/cos/sqrt may differ from torch's by an ulp.  On the host,
// log and cos are vec_math.h's, which the CPU kernel vectorises; normal() and
// the kernel give the same bits.
#pragma once

#include <math.h>
#include <stdint.h>

#include "vec_math.h"

#if defined(__CUDACC__)
#define FASTDIFF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTDIFF_HOST_DEVICE inline
#endif

namespace fastdiff {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // key schedule increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Words {
  uint32_t w0, w1, w2, w3;
};

// The high and low 32-bit halves of the 64-bit product a * m.
FASTDIFF_HOST_DEVICE void mulhilo(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, m);
  lo = a * m;
#else
  const uint64_t p = static_cast<uint64_t>(a) * m;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with kRounds rounds on counter (c0, c1, c2, c3) and key (k0, k1).
FASTDIFF_HOST_DEVICE Words philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                      uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(c0, kM0, hi0, lo0);
    mulhilo(c2, kM1, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Words{c0, c1, c2, c3};
}

// The Philox words of noise element i of stream seed.
FASTDIFF_HOST_DEVICE Words noise_words(uint64_t seed, uint64_t i) {
  return philox4x32(static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32), 0u, 0u,
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The uniforms of the transform, exact in float: (w0 >> 8) + 1 <= 2^24 and
// w1 >> 8 < 2^24 convert exactly, and the scaling is by a power of two.
FASTDIFF_HOST_DEVICE float uniform_u1(uint32_t w0) {
  return static_cast<float>((w0 >> 8) + 1u) * (1.0f / 16777216.0f);  // in (0, 1]
}

FASTDIFF_HOST_DEVICE float uniform_u2(uint32_t w1) {
  return static_cast<float>(w1 >> 8) * (1.0f / 16777216.0f);  // in [0, 1)
}

// Box-Muller in float as the reference computes it (its Python constants 2.0
// and 2*pi are rounded to float before use): sqrt(radius_sq(u1)) *
// cos_angle(u2).  The factors are separate functions because the CPU kernel
// vectorises them over a block and takes the square roots in a loop of its own
// (a sqrtf call, which may set errno, would keep the loop scalar).
FASTDIFF_HOST_DEVICE float radius_sq(float u1) {
#if defined(__CUDA_ARCH__)
  return -2.0f * logf(u1);
#else
  return -2.0f * vec_math::log_pos(u1);
#endif
}

FASTDIFF_HOST_DEVICE float cos_angle(float u2) {
  constexpr float kTwoPi = static_cast<float>(2.0 * 3.14159265358979323846);
#if defined(__CUDA_ARCH__)
  return cosf(kTwoPi * u2);
#else
  return vec_math::cos_small(kTwoPi * u2);
#endif
}

FASTDIFF_HOST_DEVICE float box_muller(float u1, float u2) {
  return sqrtf(radius_sq(u1)) * cos_angle(u2);
}

// Noise element i of stream seed: fastdiff.reference.philox.philox_normal(seed, n)[i].
FASTDIFF_HOST_DEVICE float normal(uint64_t seed, uint64_t i) {
  const Words w = noise_words(seed, i);
  return box_muller(uniform_u1(w.w0), uniform_u2(w.w1));
}

}  // namespace philox
}  // namespace fastdiff
