// CUDA kernels of fastdiff::group_norm_silu (see group_norm.h for the math and
// the inputs).
//
// A block of kThreads threads works on one group (n, g), or on one of K
// chunks of its positions (split path: blockIdx.y = chunk).  Its threads form
// a [TD, TS] tile of channels x positions (powers of two, TD * TS = kThreads)
// whose fast-varying index follows memory (positions for contiguous x,
// channels for channels_last), so loads are coalesced in both layouts; the
// tile loops over the group's D channels and the chunk's positions.
//
// Forward.  Per-thread Welford statistics of h = x + emb, merged across the
// block with Chan's formula (warp shuffles, then one value per warp through
// shared memory), then y = act((x + c0) alpha + beta) per channel.  Fused
// path (grid N*G, taken when N*G fills the GPU or x is small): one kernel.
// Split path (grid (N*G, K)): a statistics kernel writes each chunk's
// (count, mean, M2) to a workspace and the apply kernel merges the K partials
// of its group (in order, identically in every block of the group) before
// normalising its chunk, so batch-1 shapes (N*G = 32) still fill the GPU.
//
// Backward.  The per-channel sums S1, S2, S3 of each chunk (per-thread sums,
// then a tree over the TS threads of a channel in shared memory) go to a
// workspace (N*G, K, D, 3); the apply kernel adds the K partials of each
// channel in order, reduces m1, m2 over the block, writes the per-channel
// gradients (chunk 0's block) and dx over its chunk.  The fused backward runs
// both phases in one block with a __syncthreads between them.  dweight /
// dbias are (N, C) per-sample partials summed over n in order by a last
// kernel: no atomics anywhere, so every result is bit-reproducible.
//
// Statistics and sums are in the opmath type (float; double for fp64); all
// element offsets are int64.  Launches go to the current stream and never sync
// with the host.
//
// Only c10's CUDA headers are used (c10::cuda::getCurrentCUDAStream is what
// at::cuda::getCurrentCUDAStream names): ATen/cuda/CUDAContext.h would also
// need the cuSPARSE/cuBLAS/cuSOLVER headers, which a minimal toolkit lacks.

#include "group_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace fastdiff {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Split path: aim for this many blocks per SM, in chunks of at least
// kMinChunkElems elements, at most kMaxChunks chunks per group.
constexpr int kBlocksPerSm = 4;
constexpr int64_t kMinChunkElems = 4096;
constexpr int64_t kMaxChunks = 1024;
// Below this many bytes of x one fused launch beats two launches.
constexpr int64_t kSmallBytes = 1 << 20;

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }

template <bool kSilu, typename acc_t>
__device__ __forceinline__ acc_t act(acc_t z) {
  if constexpr (kSilu) {
    return z / (acc_t(1) + exp_of(-z));
  } else {
    return z;
  }
}

// dz = dy act'(z), the reference's formula.
template <bool kSilu, typename acc_t>
__device__ __forceinline__ acc_t act_grad(acc_t dy, acc_t z) {
  if constexpr (kSilu) {
    const acc_t sig = acc_t(1) / (acc_t(1) + exp_of(-z));
    return dy * sig * (acc_t(1) + z * (acc_t(1) - sig));
  } else {
    return dy;
  }
}

// This thread's place (td, ts) in the [TD, TS] tile; TS = 1 << ts_log2.
struct Tile {
  int td, ts, TD, TS;
};

template <bool kCL>
__device__ __forceinline__ Tile tile_of(int ts_log2) {
  const int TS = 1 << ts_log2, TD = kThreads >> ts_log2;
  const int t = static_cast<int>(threadIdx.x);
  // The fast-varying (warp-contiguous) index follows memory.
  return kCL ? Tile{t % TD, t / TD, TD, TS} : Tile{t >> ts_log2, t & (TS - 1), TD, TS};
}

// Shared-memory slot of tile position (td, ts): the thread's own index.
template <bool kCL>
__device__ __forceinline__ int slot(const Tile& tl, int td, int ts) {
  return kCL ? ts * tl.TD + td : td * tl.TS + ts;
}

// Offset of element (n, c, s) of an (N, C, S) tensor in either layout.
template <bool kCL>
__device__ __forceinline__ int64_t offset(int64_t n, int64_t c, int64_t s, int64_t C, int64_t S) {
  return n * C * S + (kCL ? s * C + c : c * S + s);
}

template <typename acc_t>
struct Welford {
  acc_t n, mean, m2;
};

// Chan et al.'s merge of two partial statistics.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  if (b.n == 0) {
    return a;
  }
  if (a.n == 0) {
    return b;
  }
  const acc_t n = a.n + b.n;
  const acc_t delta = b.mean - a.mean;
  const acc_t frac = b.n / n;
  return {n, a.mean + delta * frac, a.m2 + b.m2 + delta * delta * a.n * frac};
}

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> shfl_down(const Welford<acc_t>& w, int offset) {
  return {__shfl_down_sync(0xffffffffu, w.n, offset), __shfl_down_sync(0xffffffffu, w.mean, offset),
          __shfl_down_sync(0xffffffffu, w.m2, offset)};
}

// Merge over the 32 lanes of a warp; lane 0 holds the result.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_merge(Welford<acc_t> w) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    w = merge(w, shfl_down(w, off));
  }
  return w;
}

// Merge over the block, returned to every thread.  smem: kWarps entries.
template <typename acc_t>
__device__ Welford<acc_t> block_merge(Welford<acc_t> w, Welford<acc_t>* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  w = warp_merge(w);
  if (lane == 0) {
    smem[warp] = w;
  }
  __syncthreads();
  if (warp == 0) {
    w = warp_merge(lane < kWarps ? smem[lane] : Welford<acc_t>{0, 0, 0});
    if (lane == 0) {
      smem[0] = w;
    }
  }
  __syncthreads();
  w = smem[0];
  __syncthreads();  // smem may be reused by the caller
  return w;
}

// (Σ a, Σ b) over the block in a fixed tree, returned to every thread.
// smem: 2 * kWarps entries.
template <typename acc_t>
__device__ void block_sum2(acc_t& a, acc_t& b, acc_t* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  if (lane == 0) {
    smem[warp] = a;
    smem[kWarps + warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t sa = 0, sb = 0;
    for (int w = 0; w < kWarps; ++w) {
      sa += smem[w];
      sb += smem[kWarps + w];
    }
    smem[0] = sa;
    smem[kWarps] = sb;
  }
  __syncthreads();
  a = smem[0];
  b = smem[kWarps];
  __syncthreads();
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct FwdParams {
  const scalar_t* x;
  scalar_t* y;
  const acc_t* weight;  // (C,), nullptr when absent (likewise below)
  const acc_t* bias;    // (C,)
  const acc_t* emb;     // (N, C)
  const acc_t* scale;   // (N, C)
  const acc_t* shift;   // (N, C)
  acc_t* mean;          // (N, G)
  acc_t* rstd;          // (N, G)
  acc_t* ws;            // split path: (N * G, K, 3) chunk (count, mean, M2)
  int64_t C, S, G, D;
  int64_t chunk;  // positions per chunk (S on the fused path)
  int ts_log2;
  acc_t eps;
};

// Positions [s_begin, s_end) of chunk k.
template <typename P>
__device__ __forceinline__ void chunk_range(const P& p, int64_t k, int64_t& s_begin,
                                            int64_t& s_end) {
  s_begin = k * p.chunk;
  s_end = s_begin + p.chunk < p.S ? s_begin + p.chunk : p.S;
}

// This thread's statistics of h over the group's channels x [s_begin, s_end).
template <bool kCL, typename scalar_t, typename acc_t>
__device__ Welford<acc_t> thread_stats(const FwdParams<scalar_t, acc_t>& p, const Tile& tl,
                                       int64_t n, int64_t c_begin, int64_t s_begin,
                                       int64_t s_end) {
  Welford<acc_t> w{0, 0, 0};
  for (int64_t d = tl.td; d < p.D; d += tl.TD) {
    const int64_t c = c_begin + d;
    const acc_t e = p.emb != nullptr ? p.emb[n * p.C + c] : acc_t(0);
    for (int64_t s = s_begin + tl.ts; s < s_end; s += tl.TS) {
      const acc_t h = static_cast<acc_t>(p.x[offset<kCL>(n, c, s, p.C, p.S)]) + e;
      w.n += 1;
      const acc_t delta = h - w.mean;
      w.mean += delta / w.n;
      w.m2 += delta * (h - w.mean);
    }
  }
  return w;
}

template <bool kCL, bool kSilu, typename scalar_t, typename acc_t>
__device__ void apply(const FwdParams<scalar_t, acc_t>& p, const Tile& tl, int64_t n,
                      int64_t c_begin, int64_t s_begin, int64_t s_end, acc_t mean, acc_t rstd) {
  for (int64_t d = tl.td; d < p.D; d += tl.TD) {
    const int64_t c = c_begin + d, nc = n * p.C + c;
    const acc_t op = p.scale != nullptr ? acc_t(1) + p.scale[nc] : acc_t(1);
    const acc_t c0 = (p.emb != nullptr ? p.emb[nc] : acc_t(0)) - mean;
    const acc_t alpha = rstd * (p.weight != nullptr ? p.weight[c] : acc_t(1)) * op;
    const acc_t beta = (p.bias != nullptr ? p.bias[c] : acc_t(0)) * op +
                       (p.shift != nullptr ? p.shift[nc] : acc_t(0));
    for (int64_t s = s_begin + tl.ts; s < s_end; s += tl.TS) {
      const int64_t o = offset<kCL>(n, c, s, p.C, p.S);
      p.y[o] = static_cast<scalar_t>(act<kSilu>((static_cast<acc_t>(p.x[o]) + c0) * alpha + beta));
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t rstd_of(acc_t var, acc_t eps) {
  return acc_t(1) / sqrt(var + eps);  // IEEE sqrt and division, like the CPU path
}

// Grid (N * G,): statistics and y of one group.
template <bool kCL, bool kSilu, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    group_norm_fwd_kernel_fused(const FwdParams<scalar_t, acc_t> p) {
  __shared__ Welford<acc_t> smem[kWarps];
  const Tile tl = tile_of<kCL>(p.ts_log2);
  const int64_t ng = blockIdx.x, n = ng / p.G, c_begin = (ng % p.G) * p.D;
  const Welford<acc_t> w =
      block_merge(thread_stats<kCL>(p, tl, n, c_begin, int64_t{0}, p.S), smem);
  const acc_t rstd = rstd_of(w.m2 / w.n, p.eps);
  if (threadIdx.x == 0) {
    p.mean[ng] = w.mean;
    p.rstd[ng] = rstd;
  }
  apply<kCL, kSilu>(p, tl, n, c_begin, int64_t{0}, p.S, w.mean, rstd);
}

// Grid (N * G, K): (count, mean, M2) of chunk blockIdx.y of group blockIdx.x.
template <bool kCL, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    group_norm_fwd_kernel_stats(const FwdParams<scalar_t, acc_t> p) {
  __shared__ Welford<acc_t> smem[kWarps];
  const Tile tl = tile_of<kCL>(p.ts_log2);
  const int64_t ng = blockIdx.x, k = blockIdx.y, n = ng / p.G, c_begin = (ng % p.G) * p.D;
  int64_t s_begin, s_end;
  chunk_range(p, k, s_begin, s_end);
  const Welford<acc_t> w = block_merge(thread_stats<kCL>(p, tl, n, c_begin, s_begin, s_end), smem);
  if (threadIdx.x == 0) {
    acc_t* out = p.ws + (ng * gridDim.y + k) * 3;
    out[0] = w.n;
    out[1] = w.mean;
    out[2] = w.m2;
  }
}

// Grid (N * G, K): merges the K partials of group blockIdx.x (every warp the
// same way, lane j taking chunks j, j + 32, ... in order), then y over chunk
// blockIdx.y; chunk 0's block stores mean / rstd.
template <bool kCL, bool kSilu, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    group_norm_fwd_kernel_apply(const FwdParams<scalar_t, acc_t> p) {
  const Tile tl = tile_of<kCL>(p.ts_log2);
  const int64_t ng = blockIdx.x, k = blockIdx.y, K = gridDim.y;
  const int64_t n = ng / p.G, c_begin = (ng % p.G) * p.D;
  Welford<acc_t> w{0, 0, 0};
  for (int64_t j = threadIdx.x % 32; j < K; j += 32) {
    const acc_t* part = p.ws + (ng * K + j) * 3;
    w = merge(w, Welford<acc_t>{part[0], part[1], part[2]});
  }
  w = warp_merge(w);
  const acc_t mean = __shfl_sync(0xffffffffu, w.mean, 0);
  const acc_t rstd = rstd_of(__shfl_sync(0xffffffffu, w.m2, 0) / __shfl_sync(0xffffffffu, w.n, 0),
                             p.eps);
  if (k == 0 && threadIdx.x == 0) {
    p.mean[ng] = mean;
    p.rstd[ng] = rstd;
  }
  int64_t s_begin, s_end;
  chunk_range(p, k, s_begin, s_end);
  apply<kCL, kSilu>(p, tl, n, c_begin, s_begin, s_end, mean, rstd);
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct BwdParams {
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* weight;  // (C,), nullptr when absent (likewise below)
  const acc_t* bias;    // (C,)
  const acc_t* emb;     // (N, C)
  const acc_t* scale;   // (N, C)
  const acc_t* shift;   // (N, C)
  const acc_t* mean;    // (N, G)
  const acc_t* rstd;    // (N, G)
  scalar_t* dx;
  acc_t* dwp;     // (N, C) per-sample partials of dweight
  acc_t* dbp;     // (N, C) per-sample partials of dbias
  acc_t* demb;    // (N, C)
  acc_t* dscale;  // (N, C)
  acc_t* dshift;  // (N, C)
  acc_t* ws;      // (N * G, K, D, 3) chunk sums S1, S2, S3 per channel
  int64_t C, S, G, D;
  int64_t chunk;  // positions per chunk (S on the fused path)
  int ts_log2;
};

// Factors of channel (n, c): n̂ = (x + c0) rstd, z = n̂ g + bz.
template <typename acc_t>
struct Channel {
  acc_t c0, g, bz, w, b, op;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Channel<acc_t> channel(const BwdParams<scalar_t, acc_t>& p, int64_t n,
                                                  int64_t c, acc_t mean) {
  const int64_t nc = n * p.C + c;
  const acc_t op = p.scale != nullptr ? acc_t(1) + p.scale[nc] : acc_t(1);
  const acc_t w = p.weight != nullptr ? p.weight[c] : acc_t(1);
  const acc_t b = p.bias != nullptr ? p.bias[c] : acc_t(0);
  return {(p.emb != nullptr ? p.emb[nc] : acc_t(0)) - mean, w * op,
          b * op + (p.shift != nullptr ? p.shift[nc] : acc_t(0)), w, b, op};
}

// Per-channel S1, S2, S3 over chunk k of group ng into the workspace.
// smem: 3 * kThreads entries.
template <bool kCL, bool kSilu, typename scalar_t, typename acc_t>
__device__ void bwd_sums(const BwdParams<scalar_t, acc_t>& p, const Tile& tl, int64_t ng,
                         int64_t k, int64_t K, acc_t* smem) {
  const int64_t n = ng / p.G, c_begin = (ng % p.G) * p.D;
  const acc_t mean = p.mean[ng], rstd = p.rstd[ng];
  int64_t s_begin, s_end;
  chunk_range(p, k, s_begin, s_end);
  const int t = threadIdx.x;
  // d0 is uniform across the block, so every thread reaches the barriers.
  for (int64_t d0 = 0; d0 < p.D; d0 += tl.TD) {
    const int64_t d = d0 + tl.td;
    acc_t s1 = 0, s2 = 0, s3 = 0;
    if (d < p.D) {
      const int64_t c = c_begin + d;
      const Channel<acc_t> f = channel(p, n, c, mean);
      for (int64_t s = s_begin + tl.ts; s < s_end; s += tl.TS) {
        const int64_t o = offset<kCL>(n, c, s, p.C, p.S);
        const acc_t v = (static_cast<acc_t>(p.x[o]) + f.c0) * rstd;
        const acc_t dz = act_grad<kSilu>(static_cast<acc_t>(p.dy[o]), v * f.g + f.bz);
        s1 += dz;
        s2 += dz * v;
        s3 += v;
      }
    }
    smem[t] = s1;
    smem[kThreads + t] = s2;
    smem[2 * kThreads + t] = s3;
    __syncthreads();
    // Tree over the TS threads of each channel (fixed order).
    for (int stride = tl.TS / 2; stride > 0; stride >>= 1) {
      if (tl.ts < stride) {
        const int from = slot<kCL>(tl, tl.td, tl.ts + stride);
#pragma unroll
        for (int j = 0; j < 3; ++j) {
          smem[j * kThreads + t] += smem[j * kThreads + from];
        }
      }
      __syncthreads();
    }
    if (tl.ts == 0 && d < p.D) {
      acc_t* out = p.ws + ((ng * K + k) * p.D + d) * 3;
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        out[j] = smem[j * kThreads + t];
      }
    }
    __syncthreads();  // smem is rewritten by the next channel block
  }
}

// Σ_k of quantity j of channel d of group ng (k in order).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t chunk_total(const BwdParams<scalar_t, acc_t>& p, int64_t ng,
                                             int64_t K, int64_t d, int j) {
  acc_t total = 0;
  for (int64_t k = 0; k < K; ++k) {
    total += p.ws[((ng * K + k) * p.D + d) * 3 + j];
  }
  return total;
}

// m1, m2 of group ng from the workspace; chunk 0 writes the per-channel
// gradients; dx over chunk k.  smem: 2 * kWarps entries.
template <bool kCL, bool kSilu, typename scalar_t, typename acc_t>
__device__ void bwd_apply(const BwdParams<scalar_t, acc_t>& p, const Tile& tl, int64_t ng,
                          int64_t k, int64_t K, acc_t* smem) {
  const int64_t n = ng / p.G, c_begin = (ng % p.G) * p.D;
  const acc_t mean = p.mean[ng], rstd = p.rstd[ng];
  acc_t m1 = 0, m2 = 0;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) {
    const Channel<acc_t> f = channel(p, n, c_begin + d, mean);
    m1 += f.g * chunk_total(p, ng, K, d, 0);
    m2 += f.g * chunk_total(p, ng, K, d, 1);
  }
  block_sum2(m1, m2, smem);
  const acc_t count = static_cast<acc_t>(p.D * p.S);
  m1 /= count;
  m2 /= count;

  if (k == 0) {
    for (int64_t d = threadIdx.x; d < p.D; d += kThreads) {
      const int64_t c = c_begin + d, nc = n * p.C + c;
      const Channel<acc_t> f = channel(p, n, c, mean);
      const acc_t s1 = chunk_total(p, ng, K, d, 0);
      const acc_t s2 = chunk_total(p, ng, K, d, 1);
      if (p.dshift != nullptr) {
        p.dshift[nc] = s1;
      }
      if (p.dscale != nullptr) {
        p.dscale[nc] = f.w * s2 + f.b * s1;
      }
      if (p.dwp != nullptr) {
        p.dwp[nc] = f.op * s2;
      }
      if (p.dbp != nullptr) {
        p.dbp[nc] = f.op * s1;
      }
      if (p.demb != nullptr) {
        p.demb[nc] = rstd * (f.g * s1 - static_cast<acc_t>(p.S) * m1 -
                             m2 * chunk_total(p, ng, K, d, 2));
      }
    }
  }

  if (p.dx == nullptr) {
    return;
  }
  int64_t s_begin, s_end;
  chunk_range(p, k, s_begin, s_end);
  for (int64_t d = tl.td; d < p.D; d += tl.TD) {
    const int64_t c = c_begin + d;
    const Channel<acc_t> f = channel(p, n, c, mean);
    for (int64_t s = s_begin + tl.ts; s < s_end; s += tl.TS) {
      const int64_t o = offset<kCL>(n, c, s, p.C, p.S);
      const acc_t v = (static_cast<acc_t>(p.x[o]) + f.c0) * rstd;
      const acc_t dz = act_grad<kSilu>(static_cast<acc_t>(p.dy[o]), v * f.g + f.bz);
      p.dx[o] = static_cast<scalar_t>(rstd * (f.g * dz - m1 - v * m2));
    }
  }
}

// Grid (N * G,): both phases of one group; the workspace holds (N * G, 1, D, 3).
template <bool kCL, bool kSilu, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    group_norm_bwd_kernel_fused(const BwdParams<scalar_t, acc_t> p) {
  __shared__ acc_t smem[3 * kThreads];
  const Tile tl = tile_of<kCL>(p.ts_log2);
  bwd_sums<kCL, kSilu>(p, tl, blockIdx.x, 0, 1, smem);
  // bwd_sums ends with a barrier: its workspace writes are visible here.
  bwd_apply<kCL, kSilu>(p, tl, blockIdx.x, 0, 1, smem);
}

// Grid (N * G, K): chunk sums.
template <bool kCL, bool kSilu, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    group_norm_bwd_kernel_sums(const BwdParams<scalar_t, acc_t> p) {
  __shared__ acc_t smem[3 * kThreads];
  bwd_sums<kCL, kSilu>(p, tile_of<kCL>(p.ts_log2), blockIdx.x, blockIdx.y, gridDim.y, smem);
}

// Grid (N * G, K): gradients from the chunk sums.
template <bool kCL, bool kSilu, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    group_norm_bwd_kernel_apply(const BwdParams<scalar_t, acc_t> p) {
  __shared__ acc_t smem[2 * kWarps];
  bwd_apply<kCL, kSilu>(p, tile_of<kCL>(p.ts_log2), blockIdx.x, blockIdx.y, gridDim.y, smem);
}

// out[c] = Σ_n part[n, c], n in order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    sum_over_batch_kernel(const acc_t* part, int64_t N, int64_t C, acc_t* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) {
    return;
  }
  acc_t total = part[c];
  for (int64_t n = 1; n < N; ++n) {
    total += part[n * C + c];
  }
  out[c] = total;
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

int log2_ceil(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) {
    ++l;
  }
  return l;
}

// Launch plan: K chunks of `chunk` positions per group, and the tile.
struct Plan {
  int64_t K, chunk;
  int ts_log2;
};

Plan plan_for(const GroupNormShape& sh, int64_t nbytes, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t groups = sh.N * sh.G, target = int64_t{kBlocksPerSm} * sms;
  int64_t K = 1;
  if (groups < target && nbytes > kSmallBytes) {
    K = std::min({(target + groups - 1) / groups, sh.D * sh.S / kMinChunkElems, sh.S, kMaxChunks});
    K = std::max<int64_t>(K, 1);
  }
  const int64_t chunk = (sh.S + K - 1) / K;
  K = (sh.S + chunk - 1) / chunk;
  // Tile: all kThreads along the memory-contiguous index as far as it goes.
  const int kThreadsLog2 = log2_ceil(kThreads);
  const int ts_log2 = sh.channels_last ? kThreadsLog2 - std::min(kThreadsLog2, log2_ceil(sh.D))
                                       : std::min(kThreadsLog2, log2_ceil(chunk));
  return {K, chunk, ts_log2};
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->mutable_data_ptr<T>() : nullptr;
}

template <bool kCL, bool kSilu, typename scalar_t>
void launch_fwd(const GroupNormFwdArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const GroupNormShape& sh = a.shape;
  const Plan plan = plan_for(sh, a.x.numel() * a.x.element_size(), a.x.device().index());
  FwdParams<scalar_t, acc_t> p{};
  p.x = a.x.const_data_ptr<scalar_t>();
  p.y = a.y.mutable_data_ptr<scalar_t>();
  p.weight = data_or_null<acc_t>(a.weight);
  p.bias = data_or_null<acc_t>(a.bias);
  p.emb = data_or_null<acc_t>(a.emb);
  p.scale = data_or_null<acc_t>(a.scale);
  p.shift = data_or_null<acc_t>(a.shift);
  p.mean = a.mean.mutable_data_ptr<acc_t>();
  p.rstd = a.rstd.mutable_data_ptr<acc_t>();
  p.C = sh.C;
  p.S = sh.S;
  p.G = sh.G;
  p.D = sh.D;
  p.chunk = plan.chunk;
  p.ts_log2 = plan.ts_log2;
  p.eps = static_cast<acc_t>(a.eps);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned groups = static_cast<unsigned>(sh.N * sh.G);
  if (plan.K == 1) {
    group_norm_fwd_kernel_fused<kCL, kSilu><<<groups, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Stream-ordered workspace from the caching allocator (no host sync).
  const at::Tensor ws = at::empty({sh.N * sh.G * plan.K * 3}, a.mean.options());
  p.ws = ws.mutable_data_ptr<acc_t>();
  const dim3 grid(groups, static_cast<unsigned>(plan.K));
  group_norm_fwd_kernel_stats<kCL><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_norm_fwd_kernel_apply<kCL, kSilu><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kCL, bool kSilu, typename scalar_t>
void launch_bwd(const GroupNormBwdArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const GroupNormShape& sh = a.shape;
  const Plan plan = plan_for(sh, a.x.numel() * a.x.element_size(), a.x.device().index());
  const at::TensorOptions acc_options = a.mean.options();
  // dweight / dbias: per-sample partials, or the gradient itself for N == 1.
  const bool dw_partial = a.dweight.has_value() && sh.N > 1;
  const bool db_partial = a.dbias.has_value() && sh.N > 1;
  const at::Tensor dwp = dw_partial ? at::empty({sh.N, sh.C}, acc_options) : at::Tensor();
  const at::Tensor dbp = db_partial ? at::empty({sh.N, sh.C}, acc_options) : at::Tensor();
  const at::Tensor ws = at::empty({sh.N * sh.G * plan.K * sh.D * 3}, acc_options);

  BwdParams<scalar_t, acc_t> p{};
  p.dy = a.dy.const_data_ptr<scalar_t>();
  p.x = a.x.const_data_ptr<scalar_t>();
  p.weight = data_or_null<acc_t>(a.weight);
  p.bias = data_or_null<acc_t>(a.bias);
  p.emb = data_or_null<acc_t>(a.emb);
  p.scale = data_or_null<acc_t>(a.scale);
  p.shift = data_or_null<acc_t>(a.shift);
  p.mean = a.mean.const_data_ptr<acc_t>();
  p.rstd = a.rstd.const_data_ptr<acc_t>();
  p.dx = mutable_data_or_null<scalar_t>(a.dx);
  p.dwp = dw_partial ? dwp.mutable_data_ptr<acc_t>() : mutable_data_or_null<acc_t>(a.dweight);
  p.dbp = db_partial ? dbp.mutable_data_ptr<acc_t>() : mutable_data_or_null<acc_t>(a.dbias);
  p.demb = mutable_data_or_null<acc_t>(a.demb);
  p.dscale = mutable_data_or_null<acc_t>(a.dscale);
  p.dshift = mutable_data_or_null<acc_t>(a.dshift);
  p.ws = ws.mutable_data_ptr<acc_t>();
  p.C = sh.C;
  p.S = sh.S;
  p.G = sh.G;
  p.D = sh.D;
  p.chunk = plan.chunk;
  p.ts_log2 = plan.ts_log2;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned groups = static_cast<unsigned>(sh.N * sh.G);
  if (plan.K == 1) {
    group_norm_bwd_kernel_fused<kCL, kSilu><<<groups, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const dim3 grid(groups, static_cast<unsigned>(plan.K));
    group_norm_bwd_kernel_sums<kCL, kSilu><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    group_norm_bwd_kernel_apply<kCL, kSilu><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const unsigned channel_blocks = static_cast<unsigned>((sh.C + kThreads - 1) / kThreads);
  if (dw_partial) {
    sum_over_batch_kernel<<<channel_blocks, kThreads, 0, stream>>>(
        p.dwp, sh.N, sh.C, a.dweight->mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (db_partial) {
    sum_over_batch_kernel<<<channel_blocks, kThreads, 0, stream>>>(
        p.dbp, sh.N, sh.C, a.dbias->mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// f(std::bool_constant<kCL>, std::bool_constant<kSilu>) for the runtime flags.
template <typename F>
void with_flags(bool cl, bool silu, F&& f) {
  if (cl) {
    silu ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    silu ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

}  // namespace

void group_norm_fwd_cuda(const GroupNormFwdArgs& a) {
  const c10::cuda::CUDAGuard guard(a.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "group_norm_fwd_cuda", [&] {
                                    with_flags(a.shape.channels_last, a.silu, [&](auto cl, auto silu) {
                                      launch_fwd<decltype(cl)::value, decltype(silu)::value, scalar_t>(a);
                                    });
                                  });
}

void group_norm_bwd_cuda(const GroupNormBwdArgs& a) {
  if (!(a.dx || a.dweight || a.dbias || a.demb || a.dscale || a.dshift)) {
    return;
  }
  const c10::cuda::CUDAGuard guard(a.x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "group_norm_bwd_cuda", [&] {
                                    with_flags(a.shape.channels_last, a.silu, [&](auto cl, auto silu) {
                                      launch_bwd<decltype(cl)::value, decltype(silu)::value, scalar_t>(a);
                                    });
                                  });
}

}  // namespace fastdiff
