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

namespace fastdiff {
namespace {

// Extensions are compiled for the baseline ISA (SSE2 on x86-64); where the
// toolchain supports function multi-versioning (ifunc), the block loop is also
// compiled for AVX2 and AVX-512 and the best one is picked at load time.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define FASTDIFF_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTDIFF_TARGET_CLONES
#endif

// Flat elements per parallel task: amortises the task overhead while still
// splitting a 64x3x32x32 batch (196608 elements) across a few threads.
constexpr int64_t kGrain = 32768;
// Elements per block: bounds the Philox scratch buffers (3 x 2 KiB, in L1).
constexpr int64_t kBlock = 512;

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

// Noise elements [i0, i0 + len) (len <= kBlock) of stream seed into out.  The
// integer Philox rounds and the log/cos of Box-Muller run as separate loops:
// the first vectorises, and keeping the libm calls out of it lets the rounds
// of neighbouring elements overlap (about twice as fast as one fused loop).
FASTDIFF_TARGET_CLONES void philox_normals(uint64_t seed, int64_t i0, int64_t len,
                                           float* __restrict__ out) {
  float u1[kBlock], u2[kBlock];
  for (int64_t j = 0; j < len; ++j) {
    const philox::Words w = philox::noise_words(seed, static_cast<uint64_t>(i0 + j));
    u1[j] = philox::uniform_u1(w.w0);
    u2[j] = philox::uniform_u2(w.w1);
  }
  for (int64_t j = 0; j < len; ++j) {
    out[j] = philox::box_muller(u1[j], u2[j]);
  }
}

template <typename scalar_t, typename acc_t, Model kModel, Noise kNoise, bool kPrev, bool kPrev2,
          bool kX0>
void run_specialised(const Inputs<scalar_t, acc_t>& in, int64_t numel, int64_t per_sample) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    float seed_noise[kNoise == Noise::kSeed ? kBlock : 1];
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / per_sample;
      const int64_t run_end = std::min(end, (b + 1) * per_sample);
      const int64_t row = in.index != nullptr ? in.index[b] : b;
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
