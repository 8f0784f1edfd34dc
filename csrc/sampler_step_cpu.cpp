// CPU kernel of fastdiff::sampler_step (see sampler_step.h for the inputs).
//
// at::parallel_for splits the flat range [0, B * F) into tasks; a task walks
// it in runs that lie inside one sample (constant coefficients) and each run
// in blocks of at most kBlock elements.  A block is one fused, branch-free
// loop, specialised at compile time on which optional inputs are present
// (model output plain / guided, noise tensor / seed, prev, prev2, x0_out), so
// the compiler vectorises it; Philox normals are drawn per block into a small
// scratch buffer first (philox_normals).  The clamp always runs, with +-inf
// for absent bounds, which is the identity on every float (NaN included).
// Terms are added in the reference's order, so without FMA contraction
// (setup.py passes -ffp-contract=off) the results equal the plain-torch
// reference bit for bit, apart from the Philox normals' log/cos.
// (-fno-trapping-math, also passed, lets the compiler if-convert and vectorise
// c10's fp16 conversions.)
//
// Note: with torch's OpenMP backend, at::parallel_for (an inline template)
// only runs in parallel when this file is compiled with -fopenmp; setup.py and
// CMakeLists.txt pass it.

#include "philox.h"
#include "sampler_step.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <type_traits>

// Extensions are compiled for the baseline ISA (SSE2 on x86-64); where the
// toolchain supports function multi-versioning (ifunc), the block loop is also
// compiled for AVX2 and AVX-512, philox_normals has versions for them written
// with intrinsics, and the best ones are picked at load time.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTDIFF_MULTIVERSIONED 1
#define FASTDIFF_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTDIFF_MULTIVERSIONED 0
#define FASTDIFF_TARGET_CLONES
#endif

#if FASTDIFF_MULTIVERSIONED
// GCC 12.2's AVX-512 intrinsics pass _mm512_undefined_* values that it then
// warns "may be used uninitialized" wherever they are inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace fastdiff {
namespace {

// Flat elements per parallel task: amortises the task overhead while still
// splitting a 64x3x32x32 batch (196608 elements) across a few threads.
constexpr int64_t kGrain = 32768;
// Elements per block: bounds the Philox scratch buffers (5 x 2 KiB, in L1).
constexpr int64_t kBlock = 512;
// Philox normals are computed for whole groups of kPhiloxGroup elements (the
// AVX-512 loop's step), past len into the scratch buffers' spare room.
constexpr int64_t kPhiloxGroup = 16;
static_assert(kBlock % kPhiloxGroup == 0, "a block's padded length must fit its buffers");

enum class Model { kNone, kPlain, kGuided };
enum class Noise { kNone, kTensor, kSeed };

// Raw pointers of one call; nullptr marks an absent input.
template <typename scalar_t, typename acc_t>
struct Inputs {
  const scalar_t* x;
  const scalar_t* m;       // model output, or its uncond half with guidance
  const scalar_t* m_cond;  // cond half (guidance only): m + B * F
  const scalar_t* prev;
  const scalar_t* prev2;
  const scalar_t* noise;
  uint64_t seed;  // Philox key (Noise::kSeed)
  scalar_t* out;
  scalar_t* x0_out;
  const acc_t* coefs;    // (R, NUM_COEFS)
  const int64_t* index;  // (B,)
  bool one_row;          // no index and R == 1: row 0 for every sample
  acc_t w;               // guidance scale
  acc_t lo, hi;          // clip bounds, -inf / +inf when absent
};

template <typename T>
T* offset(T* p, int64_t i) {
  return p == nullptr ? nullptr : p + i;
}

// Elements [i0, i0 + len) (len <= kBlock), all of one sample whose
// coefficient row is c.  seed_noise holds the block's Philox normals (kSeed).
template <typename scalar_t, typename acc_t, Model kModel, Noise kNoise, bool kPrev, bool kPrev2,
          bool kX0>
FASTDIFF_TARGET_CLONES void step_block(const Inputs<scalar_t, acc_t>& in, const acc_t* c,
                                       int64_t i0, int64_t len, const float* seed_noise) {
  const acc_t a_x = c[A_X], a_m = c[A_M], a_n = c[A_N];
  const acc_t c_x = c[C_X], c_m = c[C_M], c_0 = c[C_0], c_p = c[C_P], c_q = c[C_Q], c_n = c[C_N];
  const acc_t w = in.w, lo = in.lo, hi = in.hi;
  const scalar_t* __restrict__ x = in.x + i0;
  const scalar_t* __restrict__ mu = offset(in.m, i0);
  const scalar_t* __restrict__ mc = offset(in.m_cond, i0);
  const scalar_t* __restrict__ p = offset(in.prev, i0);
  const scalar_t* __restrict__ q = offset(in.prev2, i0);
  const scalar_t* __restrict__ nz = offset(in.noise, i0);
  const float* __restrict__ sn = seed_noise;
  scalar_t* __restrict__ out = in.out + i0;
  scalar_t* __restrict__ x0_out = offset(in.x0_out, i0);

  for (int64_t j = 0; j < len; ++j) {
    const acc_t xv = static_cast<acc_t>(x[j]);
    acc_t m = 0;
    if constexpr (kModel == Model::kPlain) {
      m = static_cast<acc_t>(mu[j]);
    } else if constexpr (kModel == Model::kGuided) {
      const acc_t u = static_cast<acc_t>(mu[j]);
      m = u + w * (static_cast<acc_t>(mc[j]) - u);
    }
    acc_t n = 0;
    if constexpr (kNoise == Noise::kTensor) {
      n = static_cast<acc_t>(nz[j]);
    } else if constexpr (kNoise == Noise::kSeed) {
      n = static_cast<acc_t>(sn[j]);
    }

    acc_t x0 = a_x * xv;
    if constexpr (kModel != Model::kNone) {
      x0 = x0 + a_m * m;
    }
    if constexpr (kNoise != Noise::kNone) {
      x0 = x0 + a_n * n;
    }
    // Compare-and-select keeps NaN, like torch.clamp.
    x0 = x0 < lo ? lo : x0;
    x0 = hi < x0 ? hi : x0;
    if constexpr (kX0) {
      x0_out[j] = static_cast<scalar_t>(x0);
    }

    acc_t o = c_x * xv + c_0 * x0;
    if constexpr (kModel != Model::kNone) {
      o = o + c_m * m;
    }
    if constexpr (kPrev) {
      o = o + c_p * static_cast<acc_t>(p[j]);
    }
    if constexpr (kPrev2) {
      o = o + c_q * static_cast<acc_t>(q[j]);
    }
    if constexpr (kNoise != Noise::kNone) {
      o = o + c_n * n;
    }
    out[j] = static_cast<scalar_t>(o);
  }
}

// Philox normals of a block, in three passes over L1-resident buffers:
//   1. the Philox words w0, w1 of each element;
//   2. the Box-Muller factors radius_sq(u1) and cos_angle(u2) (philox.h), plain
//      C++ that the compiler vectorises for the caller's ISA;
//   3. out = sqrt(radius_sq) * cos_angle.
// On x86-64, passes 1 and 3 are written with intrinsics in AVX-512 and AVX2
// versions of philox_normals (function multi-versioning picks one at load
// time): the compiler does not vectorise pass 3 at all, as sqrtf may set
// errno, and vectorises pass 1 with shuffles around every 32x32->64-bit
// product, which holding each word in a 64-bit lane avoids (see the AVX-512
// version).  Every version computes the same bits as philox::normal.

// Pass 2 for elements [0, n).
inline void box_muller_factors(int64_t n, const uint32_t* __restrict__ w0,
                               const uint32_t* __restrict__ w1, float* __restrict__ radius_sq,
                               float* __restrict__ cos_angle) {
  for (int64_t j = 0; j < n; ++j) {
    radius_sq[j] = philox::radius_sq(philox::uniform_u1(w0[j]));
    cos_angle[j] = philox::cos_angle(philox::uniform_u2(w1[j]));
  }
}

// Noise elements [i0, i0 + len) (len <= kBlock) of stream seed into out; the
// vector versions below also fill out past len, up to a multiple of
// kPhiloxGroup.
#if FASTDIFF_MULTIVERSIONED
__attribute__((target("default")))
#endif
void philox_normals(uint64_t seed, int64_t i0, int64_t len, float* __restrict__ out) {
  uint32_t w0[kBlock], w1[kBlock];
  float radius_sq[kBlock], cos_angle[kBlock];
  for (int64_t j = 0; j < len; ++j) {
    const philox::Words w = philox::noise_words(seed, static_cast<uint64_t>(i0 + j));
    w0[j] = w.w0;
    w1[j] = w.w1;
  }
  box_muller_factors(len, w0, w1, radius_sq, cos_angle);
  for (int64_t j = 0; j < len; ++j) {
    out[j] = sqrtf(radius_sq[j]) * cos_angle[j];
  }
}

#if FASTDIFF_MULTIVERSIONED
// Philox in 64-bit lanes: each lane holds one element's 32-bit word in its low
// half, so vpmuludq yields the full 64-bit product (it ignores the high
// halves, which may hold garbage), a dword swap brings its high half down,
// and vpternlogd takes the three-way xor.  Two vectors per step hide the
// multiply's latency as well as four do, without spilling registers.
__attribute__((target("avx512f"))) void philox_normals(uint64_t seed, int64_t i0, int64_t len,
                                                       float* __restrict__ out) {
  alignas(64) uint32_t w0[kBlock], w1[kBlock];
  alignas(64) float radius_sq[kBlock], cos_angle[kBlock];
  constexpr int kVecs = 2;
  static_assert(kPhiloxGroup == 8 * kVecs, "one step is one group");
  constexpr int kXor3 = 0x96;  // ternary-logic truth table of a ^ b ^ c
  const int64_t n = (len + kPhiloxGroup - 1) / kPhiloxGroup * kPhiloxGroup;
  const __m512i m0 = _mm512_set1_epi64(philox::kM0);
  const __m512i m1 = _mm512_set1_epi64(philox::kM1);
  const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  // Low dwords of two vectors, in element order.
  const __m512i low_dwords =
      _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t j = 0; j < n; j += kPhiloxGroup) {
    __m512i c0[kVecs], c1[kVecs], c2[kVecs], c3[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      // Counter (lo32(i), hi32(i), 0, 0) of element i = i0 + j + 8 v + lane.
      const __m512i i = _mm512_add_epi64(_mm512_set1_epi64(i0 + j + 8 * v), lanes);
      c0[v] = i;
      c1[v] = _mm512_srli_epi64(i, 32);
      c2[v] = _mm512_setzero_si512();
      c3[v] = _mm512_setzero_si512();
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < philox::kRounds; ++r) {
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0));
      const __m512i key1 = _mm512_set1_epi32(static_cast<int>(k1));
      for (int v = 0; v < kVecs; ++v) {
        const __m512i p0 = _mm512_mul_epu32(c0[v], m0);
        const __m512i p1 = _mm512_mul_epu32(c2[v], m1);
        c0[v] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p1, _MM_PERM_CDAB), c1[v], key0,
                                          kXor3);
        c1[v] = p1;
        c2[v] = _mm512_ternarylogic_epi32(_mm512_shuffle_epi32(p0, _MM_PERM_CDAB), c3[v], key1,
                                          kXor3);
        c3[v] = p0;
      }
      k0 += philox::kW0;
      k1 += philox::kW1;
    }
    _mm512_store_si512(w0 + j, _mm512_permutex2var_epi32(c0[0], low_dwords, c0[1]));
    _mm512_store_si512(w1 + j, _mm512_permutex2var_epi32(c1[0], low_dwords, c1[1]));
  }
  box_muller_factors(n, w0, w1, radius_sq, cos_angle);
  for (int64_t j = 0; j < n; j += 16) {
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_sqrt_ps(_mm512_load_ps(radius_sq + j)),
                                            _mm512_load_ps(cos_angle + j)));
  }
}

// As the AVX-512 version, in 4-lane vectors and with two xors for vpternlogd.
__attribute__((target("avx2"))) void philox_normals(uint64_t seed, int64_t i0, int64_t len,
                                                    float* __restrict__ out) {
  alignas(32) uint32_t w0[kBlock], w1[kBlock];
  alignas(32) float radius_sq[kBlock], cos_angle[kBlock];
  constexpr int kVecs = 2;
  constexpr int kSwapDwords = _MM_SHUFFLE(2, 3, 0, 1);
  constexpr int kEvenDwords = _MM_SHUFFLE(2, 0, 2, 0);
  constexpr int kQwordOrder = _MM_SHUFFLE(3, 1, 2, 0);
  constexpr int kStep = 4 * kVecs;
  const int64_t n = (len + kStep - 1) / kStep * kStep;
  const __m256i m0 = _mm256_set1_epi64x(philox::kM0);
  const __m256i m1 = _mm256_set1_epi64x(philox::kM1);
  const __m256i lanes = _mm256_set_epi64x(3, 2, 1, 0);
  for (int64_t j = 0; j < n; j += kStep) {
    __m256i c0[kVecs], c1[kVecs], c2[kVecs], c3[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      const __m256i i = _mm256_add_epi64(_mm256_set1_epi64x(i0 + j + 4 * v), lanes);
      c0[v] = i;
      c1[v] = _mm256_srli_epi64(i, 32);
      c2[v] = _mm256_setzero_si256();
      c3[v] = _mm256_setzero_si256();
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < philox::kRounds; ++r) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
      const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
      for (int v = 0; v < kVecs; ++v) {
        const __m256i p0 = _mm256_mul_epu32(c0[v], m0);
        const __m256i p1 = _mm256_mul_epu32(c2[v], m1);
        c0[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p1, kSwapDwords), c1[v]),
                                 key0);
        c1[v] = p1;
        c2[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_shuffle_epi32(p0, kSwapDwords), c3[v]),
                                 key1);
        c3[v] = p0;
      }
      k0 += philox::kW0;
      k1 += philox::kW1;
    }
    // The low dwords of vectors a, b in element order: shuffle_ps gives
    // (a0 a2 b0 b2 | a4 a6 b4 b6), the qword permutation (a0 a2 a4 a6 b0 b2 b4 b6).
    const __m256 w0_pairs =
        _mm256_shuffle_ps(_mm256_castsi256_ps(c0[0]), _mm256_castsi256_ps(c0[1]), kEvenDwords);
    const __m256 w1_pairs =
        _mm256_shuffle_ps(_mm256_castsi256_ps(c1[0]), _mm256_castsi256_ps(c1[1]), kEvenDwords);
    _mm256_store_si256(reinterpret_cast<__m256i*>(w0 + j),
                       _mm256_permute4x64_epi64(_mm256_castps_si256(w0_pairs), kQwordOrder));
    _mm256_store_si256(reinterpret_cast<__m256i*>(w1 + j),
                       _mm256_permute4x64_epi64(_mm256_castps_si256(w1_pairs), kQwordOrder));
  }
  box_muller_factors(n, w0, w1, radius_sq, cos_angle);
  for (int64_t j = 0; j < n; j += 8) {
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_sqrt_ps(_mm256_load_ps(radius_sq + j)),
                                            _mm256_load_ps(cos_angle + j)));
  }
}

#endif

template <typename scalar_t, typename acc_t, Model kModel, Noise kNoise, bool kPrev, bool kPrev2,
          bool kX0>
void run_specialised(const Inputs<scalar_t, acc_t>& in, int64_t numel, int64_t per_sample) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    float seed_noise[kNoise == Noise::kSeed ? kBlock : 1];
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / per_sample;
      const int64_t run_end = std::min(end, (b + 1) * per_sample);
      const int64_t row = in.index != nullptr ? in.index[b] : (in.one_row ? 0 : b);
      const acc_t* c = in.coefs + row * NUM_COEFS;
      while (i < run_end) {
        const int64_t len = std::min(kBlock, run_end - i);
        if constexpr (kNoise == Noise::kSeed) {
          philox_normals(in.seed, i, len, seed_noise);
        }
        step_block<scalar_t, acc_t, kModel, kNoise, kPrev, kPrev2, kX0>(in, c, i, len,
                                                                        seed_noise);
        i += len;
      }
    }
  });
}

// f(std::integral_constant<T, v>) for the runtime value v, one of values.
template <typename T, T... values, typename F>
void with_constant(T v, F&& f) {
  ((v == values ? (f(std::integral_constant<T, values>{}), true) : false) || ...);
}

template <typename F>
void with_bool(bool v, F&& f) {
  with_constant<bool, false, true>(v, f);
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
void run(const SamplerStepArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t numel = a.numel();
  const int64_t per_sample = a.per_sample();

  Inputs<scalar_t, acc_t> in{};
  in.x = a.x.const_data_ptr<scalar_t>();
  in.m = data_or_null<scalar_t>(a.model_output);
  in.m_cond = a.guidance_scale.has_value() ? in.m + numel : nullptr;
  in.prev = data_or_null<scalar_t>(a.prev);
  in.prev2 = data_or_null<scalar_t>(a.prev2);
  in.noise = data_or_null<scalar_t>(a.noise);
  in.seed = a.seed.has_value() ? static_cast<uint64_t>(*a.seed->const_data_ptr<int64_t>()) : 0;
  in.out = a.out.mutable_data_ptr<scalar_t>();
  in.x0_out = a.x0_out.has_value() ? a.x0_out->mutable_data_ptr<scalar_t>() : nullptr;
  in.coefs = a.coefs.const_data_ptr<acc_t>();
  in.index = data_or_null<int64_t>(a.index);
  in.one_row = a.coefs.size(0) == 1;
  // Scalars are rounded to the arithmetic type first, as torch does for a
  // Python scalar operand.
  in.w = static_cast<acc_t>(a.guidance_scale.value_or(0.0));
  in.lo = a.clip_min.has_value() ? static_cast<acc_t>(*a.clip_min) : -kInf;
  in.hi = a.clip_max.has_value() ? static_cast<acc_t>(*a.clip_max) : kInf;

  const Model model = in.m == nullptr      ? Model::kNone
                      : in.m_cond == nullptr ? Model::kPlain
                                             : Model::kGuided;
  const Noise noise = in.noise != nullptr  ? Noise::kTensor
                      : a.seed.has_value() ? Noise::kSeed
                                           : Noise::kNone;
  with_constant<Model, Model::kNone, Model::kPlain, Model::kGuided>(model, [&](auto kModel) {
    with_constant<Noise, Noise::kNone, Noise::kTensor, Noise::kSeed>(noise, [&](auto kNoise) {
      with_bool(in.prev != nullptr, [&](auto kPrev) {
        with_bool(in.prev2 != nullptr, [&](auto kPrev2) {
          with_bool(in.x0_out != nullptr, [&](auto kX0) {
            run_specialised<scalar_t, acc_t, kModel.value, kNoise.value, kPrev.value,
                            kPrev2.value, kX0.value>(in, numel, per_sample);
          });
        });
      });
    });
  });
}

}  // namespace

void sampler_step_cpu(const SamplerStepArgs& a) {
  if (a.index.has_value()) {
    // Checked up front so the parallel loop never reads outside coefs.
    const int64_t rows = a.coefs.size(0);
    const int64_t* index = a.index->const_data_ptr<int64_t>();
    for (int64_t b = 0; b < a.batch(); ++b) {
      TORCH_CHECK_INDEX(index[b] >= 0 && index[b] < rows, "sampler_step: index[", b, "] = ",
                        index[b], " is out of range for coefs with ", rows, " rows");
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.out.scalar_type(),
                                  "sampler_step_cpu", [&] { run<scalar_t>(a); });
}

}  // namespace fastdiff
