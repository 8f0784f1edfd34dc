// CUDA kernel of fastdiff::sampler_step (see sampler_step.h for the inputs).
//
// A grid-stride loop over groups of kVec consecutive flat elements: each
// thread loads a group of every input (one 8/16/32-byte vector load per input
// when all pointers are aligned to it), computes the kVec elements in
// registers and stores the group.  Optional inputs are nullptr checks on
// kernel parameters (uniform branches, no divergence).  The seed is read from
// device memory by the kernel, so the launch never syncs with the host.
//
// Only c10's CUDA headers are used (c10::cuda::getCurrentCUDAStream is what
// at::cuda::getCurrentCUDAStream names): ATen/cuda/CUDAContext.h would also
// need the cuSPARSE/cuBLAS/cuSOLVER headers, which a minimal toolkit lacks.

#include "philox.h"
#include "sampler_step.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace fastdiff {
namespace {

constexpr int kVec = 4;  // elements per thread per loop iteration
constexpr int kThreads = 256;

// kVec elements loaded or stored with one vector access.
template <typename scalar_t>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// Kernel parameters; nullptr marks an absent input.
template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* x;
  const scalar_t* m;       // model output, or its uncond half with guidance
  const scalar_t* m_cond;  // cond half (guidance only): m + numel
  const scalar_t* prev;
  const scalar_t* prev2;
  const scalar_t* noise;
  const int64_t* seed;  // one int64 on the device
  scalar_t* out;
  scalar_t* x0_out;
  const acc_t* coefs;    // (rows, NUM_COEFS)
  const int64_t* index;  // (B,)
  int64_t numel;
  int64_t per_sample;
  int64_t rows;
  acc_t w;       // guidance scale
  acc_t lo, hi;  // clip bounds, -inf / +inf when absent
};

// Elements [i, i + count) of p as acc_t (count <= kVec; lanes past count are 0).
template <bool kAligned, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_group(const scalar_t* __restrict__ p, int64_t i, int count,
                                           acc_t (&v)[kVec]) {
  if (kAligned && count == kVec) {
    const Pack<scalar_t> pack = *reinterpret_cast<const Pack<scalar_t>*>(p + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      v[k] = static_cast<acc_t>(pack.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      v[k] = k < count ? static_cast<acc_t>(p[i + k]) : acc_t(0);
    }
  }
}

template <bool kAligned, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_group(scalar_t* __restrict__ p, int64_t i, int count,
                                            const acc_t (&v)[kVec]) {
  if (kAligned && count == kVec) {
    Pack<scalar_t> pack;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      pack.v[k] = static_cast<scalar_t>(v[k]);
    }
    *reinterpret_cast<Pack<scalar_t>*>(p + i) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k < count) {
        p[i + k] = static_cast<scalar_t>(v[k]);
      }
    }
  }
}

template <typename acc_t>
struct Row {
  acc_t c[NUM_COEFS];
};

// Coefficient row of sample b.  An index outside [0, rows) fails a device
// assert and is clamped, so it never reads outside coefs.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Row<acc_t> load_row(const Params<scalar_t, acc_t>& p, int64_t b) {
  int64_t row = p.rows == 1 ? 0 : b;  // without index: row b, or row 0 when R == 1
  if (p.index != nullptr) {
    row = p.index[b];
    CUDA_KERNEL_ASSERT(row >= 0 && row < p.rows);
    row = row < 0 ? 0 : (row >= p.rows ? p.rows - 1 : row);
  }
  Row<acc_t> r;
#pragma unroll
  for (int c = 0; c < NUM_COEFS; ++c) {
    r.c[c] = p.coefs[row * NUM_COEFS + c];
  }
  return r;
}

// Resident blocks per SM the register budget is sized for: 4 (64 registers,
// half occupancy) in float arithmetic; fp64 needs up to 128 registers.
template <typename scalar_t>
constexpr int kMinBlocks = sizeof(at::opmath_type<scalar_t>) == 8 ? 2 : 4;

template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(kThreads, kMinBlocks<scalar_t>)
    sampler_step_kernel(const Params<scalar_t, at::opmath_type<scalar_t>> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool has_noise = p.noise != nullptr || p.seed != nullptr;
  const uint64_t seed = p.seed != nullptr ? static_cast<uint64_t>(*p.seed) : 0;
  const int64_t groups = (p.numel + kVec - 1) / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    const int64_t i = g * kVec;
    const int64_t remaining = p.numel - i;
    const int count = remaining < kVec ? static_cast<int>(remaining) : kVec;

    acc_t x[kVec], m[kVec], mc[kVec], q1[kVec], q2[kVec], n[kVec];
    load_group<kAligned>(p.x, i, count, x);
    if (p.m != nullptr) {
      load_group<kAligned>(p.m, i, count, m);
    }
    if (p.m_cond != nullptr) {
      load_group<kAligned>(p.m_cond, i, count, mc);
    }
    if (p.prev != nullptr) {
      load_group<kAligned>(p.prev, i, count, q1);
    }
    if (p.prev2 != nullptr) {
      load_group<kAligned>(p.prev2, i, count, q2);
    }
    if (p.noise != nullptr) {
      load_group<kAligned>(p.noise, i, count, n);
    }

    // The group may straddle samples (F need not be a multiple of kVec): the
    // row is reloaded when an element passes the current sample's end.
    int64_t b = i / p.per_sample;
    int64_t sample_end = (b + 1) * p.per_sample;
    Row<acc_t> r = load_row(p, b);

    acc_t out[kVec], x0[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k >= count) {
        break;
      }
      if (i + k >= sample_end) {
        b = (i + k) / p.per_sample;
        sample_end = (b + 1) * p.per_sample;
        r = load_row(p, b);
      }
      if (p.m_cond != nullptr) {
        m[k] = m[k] + p.w * (mc[k] - m[k]);
      }
      if (p.seed != nullptr) {
        n[k] = static_cast<acc_t>(philox::normal(seed, static_cast<uint64_t>(i + k)));
      }
      acc_t v = r.c[A_X] * x[k];
      if (p.m != nullptr) {
        v = v + r.c[A_M] * m[k];
      }
      if (has_noise) {
        v = v + r.c[A_N] * n[k];
      }
      // Compare-and-select keeps NaN, like torch.clamp (fmin/fmax would
      // not); with +-inf bounds it is the identity.
      v = v < p.lo ? p.lo : v;
      v = p.hi < v ? p.hi : v;
      x0[k] = v;
      acc_t o = r.c[C_X] * x[k] + r.c[C_0] * v;
      if (p.m != nullptr) {
        o = o + r.c[C_M] * m[k];
      }
      if (p.prev != nullptr) {
        o = o + r.c[C_P] * q1[k];
      }
      if (p.prev2 != nullptr) {
        o = o + r.c[C_Q] * q2[k];
      }
      if (has_noise) {
        o = o + r.c[C_N] * n[k];
      }
      out[k] = o;
    }

    store_group<kAligned>(p.out, i, count, out);
    if (p.x0_out != nullptr) {
      store_group<kAligned>(p.x0_out, i, count, x0);
    }
  }
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

bool aligned_to(const void* ptr, size_t bytes) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

template <typename scalar_t>
void launch(const SamplerStepArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

  Params<scalar_t, acc_t> p{};
  p.numel = a.numel();
  p.per_sample = a.per_sample();
  p.rows = a.coefs.size(0);
  p.x = a.x.const_data_ptr<scalar_t>();
  p.m = data_or_null<scalar_t>(a.model_output);
  p.m_cond = a.guidance_scale.has_value() ? p.m + p.numel : nullptr;
  p.prev = data_or_null<scalar_t>(a.prev);
  p.prev2 = data_or_null<scalar_t>(a.prev2);
  p.noise = data_or_null<scalar_t>(a.noise);
  p.seed = data_or_null<int64_t>(a.seed);
  p.out = a.out.mutable_data_ptr<scalar_t>();
  p.x0_out = a.x0_out.has_value() ? a.x0_out->mutable_data_ptr<scalar_t>() : nullptr;
  p.coefs = a.coefs.const_data_ptr<acc_t>();
  p.index = data_or_null<int64_t>(a.index);
  // Scalars are rounded to the arithmetic type first, as torch does for a
  // Python scalar operand.
  p.w = static_cast<acc_t>(a.guidance_scale.value_or(0.0));
  p.lo = a.clip_min.has_value() ? static_cast<acc_t>(*a.clip_min) : -kInf;
  p.hi = a.clip_max.has_value() ? static_cast<acc_t>(*a.clip_max) : kInf;

  constexpr size_t kPackBytes = sizeof(Pack<scalar_t>);
  const bool aligned = aligned_to(p.x, kPackBytes) && aligned_to(p.m, kPackBytes) &&
                       aligned_to(p.m_cond, kPackBytes) && aligned_to(p.prev, kPackBytes) &&
                       aligned_to(p.prev2, kPackBytes) && aligned_to(p.noise, kPackBytes) &&
                       aligned_to(p.out, kPackBytes) && aligned_to(p.x0_out, kPackBytes);

  // Enough blocks to fill every SM (2048 resident threads each); the
  // grid-stride loop covers the rest.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        a.out.device().index()));
  const int64_t groups = (p.numel + kVec - 1) / kVec;
  const int64_t blocks =
      std::min((groups + kThreads - 1) / kThreads, int64_t{sms} * (2048 / kThreads));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (aligned) {
    sampler_step_kernel<scalar_t, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  } else {
    sampler_step_kernel<scalar_t, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void sampler_step_cuda(const SamplerStepArgs& a) {
  const c10::cuda::CUDAGuard guard(a.out.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.out.scalar_type(),
                                  "sampler_step_cuda", [&] { launch<scalar_t>(a); });
}

}  // namespace fastdiff
