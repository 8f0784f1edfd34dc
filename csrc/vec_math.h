// Branch-free float log and cos for the Box-Muller transform of the Philox
// normals on the host (philox.h).
//
// Why not logf/cosf: a libm call in a loop keeps the compiler from vectorising
// it, and the CPU kernel applies the transform to whole blocks of Philox words
// (sampler_step_cpu.cpp).  These functions use only + - *, bit moves and
// conversions, so the same inline code is the scalar philox::normal and, in a
// loop, the kernel's vector code, and both round alike: IEEE arithmetic gives
// the same bits per element in scalar and vector registers as long as nothing
// is contracted to FMA (the build passes -ffp-contract=off).
//
// Each evaluates a minimax polynomial in double and rounds once to float.
// Measured on every input the transform can produce (all 2^24 values of u1
// and of u2), against double libm: at most 0.511 ulp for log and 0.500 ulp for
// cos, i.e. correctly rounded but for 0.3% (log) and 0.02% (cos) of the
// inputs, which are one ulp off.
#pragma once

#include <stdint.h>
#include <string.h>

namespace fastdiff {
namespace vec_math {

inline uint32_t bits_of(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
}

inline float float_of(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

// log(x) for a positive normal float x.
//
// x = 2^e m with m in (0.5, 1]: then log(x) = e log(2) + log1p(f), f = m - 1
// in (-0.5, 0] (exact in float), and both terms have the sign of log(x), so
// the sum has no cancellation.  log1p(f) = f - f^2/2 + f^3 P(f), with P of
// degree 8 (relative error 7e-10 on [-0.5, 0]); f^2 is exact in double.
inline float log_pos(float x) {
  // Adding 0x007fffff = bits(1) - bits(the float after 0.5) carries into the
  // exponent field unless the mantissa field is zero (x a power of two): the
  // exponent field then holds e + 127, and the low 23 bits plus bits(the float
  // after 0.5) are the bits of m.
  const uint32_t ix = bits_of(x) + (0x3f800000u - 0x3f000001u);
  const double e = static_cast<double>(static_cast<int32_t>(ix >> 23) - 127);
  const double f = float_of((ix & 0x007fffffu) + 0x3f000001u) - 1.0f;
  const double z = f * f;
  double p = 2.0298906143815074;
  p = p * f + 3.282166683227062;
  p = p * f + 2.799924057726896;
  p = p * f + 1.0866301055296035;
  p = p * f + 0.47369052854882504;
  p = p * f - 0.11162186403477696;
  p = p * f + 0.20534770229269156;
  p = p * f - 0.24972906060875616;
  p = p * f + 0.33333863808628145;
  return static_cast<float>(e * 0.6931471805599453 + (f + (p * z * f - 0.5 * z)));
}

// cos(t) for 0 <= t <= 2 pi.
//
// cos(t) = -sin(t - pi/2) = sin(t - 3 pi/2) = ...: with n the odd integer
// nearest to t 2/pi, r = t - n pi/2 lies in [-pi/2, pi/2] (a hair beyond when
// the float product rounds n the other way; the polynomial covers it) and
// cos(t) = (-1)^((n+1)/2) sin(r).  One polynomial serves every quadrant, and
// the zeros of cos are those of sin(r) at r = 0, where r keeps its relative
// accuracy: n pi_2_hi is exact (pi_2_hi has 33 bits) and so is
// t - n pi_2_hi (t's bits and pi_2_hi's fit in 53).  sin(r) = r + r^3 S(r^2)
// with S of degree 4 (relative error 2.4e-11 on [-pi/2, pi/2]).
inline float cos_small(float t) {
  // Adding 1.5 * 2^23 rounds t/pi - 1/2 to an integer k, which lands in the
  // low mantissa bits; n = 2k + 1.
  constexpr float kRound = 12582912.0f;
  const float k_biased = (t * 0.318309886f - 0.5f) + kRound;
  const uint32_t k = bits_of(k_biased);
  const double n = (k_biased - kRound) * 2.0f + 1.0f;
  const double r = (static_cast<double>(t) - n * 1.5707963267341256) - n * 6.077100506506192e-11;
  const double z = r * r;
  double s = -2.3887431195392114e-08;
  s = s * z + 2.7525302432566883e-06;
  s = s * z - 0.00019840866652305326;
  s = s * z + 0.008333331097027871;
  s = s * z - 0.16666666625884413;
  const float sin_r = static_cast<float>(r + r * z * s);
  // Negate for even k.
  return float_of(bits_of(sin_r) ^ ((~k & 1u) << 31));
}

}  // namespace vec_math
}  // namespace fastdiff
