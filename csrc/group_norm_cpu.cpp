// CPU kernels of fastdiff::group_norm_silu (see group_norm.h for the math and
// the inputs).
//
// Statistics (never E[h^2] - E[h]^2): h = x + emb is reduced in blocks, each
// block exactly (two passes over it while it sits in L1, with kLanes
// independent partial sums so the loops vectorise), the blocks merged with
// Chan et al.'s formula.  Every sum runs in an order fixed by the shape alone
// (not by the thread count), so results are bit-reproducible on a machine.
//
// Contiguous layout: one task per group (at::parallel_for over N * G); a group
// is D rows of S contiguous elements, reduced in blocks of the flattened
// group.  The task computes the group statistics, then y while the group is
// still in L2, so x is read from memory once.  The backward task likewise
// computes the per-row sums S1, S2, S3 (keeping dz), the group's m1, m2 and
// the per-channel gradients, then dx.
//
// Channels_last: a group is D of the C contiguous channels of every position,
// so groups interleave in memory.  The kernels walk chunks of P positions of
// one sample instead (tasks (n, k), K chunks per sample, P fixed by C and S),
// each loop running over all C channels (contiguous, vectorised), in three
// phases: per-chunk per-channel partials into a workspace (N, K, C) per
// quantity; per group, the K partials of each channel merged in order, then
// its D channels (equal counts); then y (dx) chunk by chunk.
//
// dweight / dbias are written as (N, C) per-sample partials and summed over n
// in order.  All arithmetic is in the opmath type (float; double for fp64).
// SiLU uses a branch-free exp (one_plus_exp, cpu_math.h) so that its loops
// vectorise.
//
// Note: with torch's OpenMP backend, at::parallel_for (an inline template)
// only runs in parallel when this file is compiled with -fopenmp; setup.py and
// CMakeLists.txt pass it.

#include "group_norm.h"

#include "cpu_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace fastdiff {
namespace {

using namespace cpu;

// Contiguous layout: elements reduced exactly at once (through acc_t buffers
// of this size, in L1).
constexpr int64_t kRowBlock = 1024;
// Channels_last: elements of a sub-block reduced exactly at once (about
// 16 KiB of fp32, in L1), at most kMaxBlockPositions positions so that each
// channel's running sum stays short; elements of a parallel chunk.
constexpr int64_t kClBlock = 4096;
constexpr int64_t kMaxBlockPositions = 256;
constexpr int64_t kClChunk = 32768;
// Elements per parallel task at least: amortises the task overhead.
constexpr int64_t kGrain = 32768;
// Largest group whose dz the contiguous backward keeps between its two
// passes (a per-thread buffer of this many acc_t, 2 MiB in fp32 = one L2).
constexpr int64_t kMaxKeptDz = 1 << 19;

// Running (mean, M2) of a set of count na merged with those of count nb
// (Chan et al.): the scalars of the update.
template <typename acc_t>
struct MergeWeights {
  acc_t frac;  // nb / (na + nb)
  acc_t wgt;   // na nb / (na + nb)
};

template <typename acc_t>
MergeWeights<acc_t> merge_weights(int64_t na, int64_t nb) {
  const double n = static_cast<double>(na + nb);
  return {static_cast<acc_t>(static_cast<double>(nb) / n),
          static_cast<acc_t>(static_cast<double>(na) * static_cast<double>(nb) / n)};
}

template <typename acc_t>
struct Moments {
  acc_t mean, m2;
};

template <typename acc_t>
C10_ALWAYS_INLINE void merge(Moments<acc_t>& run, Moments<acc_t> b, MergeWeights<acc_t> w) {
  const acc_t delta = b.mean - run.mean;
  run.mean = run.mean + delta * w.frac;
  run.m2 = run.m2 + b.m2 + delta * delta * w.wgt;
}

// ---------------------------------------------------------------------------
// Per-channel inputs
// ---------------------------------------------------------------------------

// Raw pointers of the per-channel inputs; nullptr marks an absent one.
template <typename acc_t>
struct Affine {
  const acc_t* weight;  // (C,)
  const acc_t* bias;    // (C,)
  const acc_t* emb;     // (N, C)
  const acc_t* scale;   // (N, C)
  const acc_t* shift;   // (N, C)
  int64_t C;

  acc_t w(int64_t c) const { return weight != nullptr ? weight[c] : acc_t(1); }
  acc_t b(int64_t c) const { return bias != nullptr ? bias[c] : acc_t(0); }
  acc_t e(int64_t n, int64_t c) const { return emb != nullptr ? emb[n * C + c] : acc_t(0); }
  acc_t op(int64_t n, int64_t c) const {
    return scale != nullptr ? acc_t(1) + scale[n * C + c] : acc_t(1);
  }
  acc_t sh(int64_t n, int64_t c) const { return shift != nullptr ? shift[n * C + c] : acc_t(0); }
};

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->mutable_data_ptr<T>() : nullptr;
}

template <typename acc_t, typename Args>
Affine<acc_t> affine_of(const Args& a) {
  return {data_or_null<acc_t>(a.weight), data_or_null<acc_t>(a.bias), data_or_null<acc_t>(a.emb),
          data_or_null<acc_t>(a.scale),  data_or_null<acc_t>(a.shift), a.shape.C};
}

// Forward factors of channel (n, c): y = act((x + c0) alpha + beta).
template <typename acc_t>
struct FwdChannel {
  acc_t c0, alpha, beta;
};

template <typename acc_t>
FwdChannel<acc_t> fwd_channel(const Affine<acc_t>& a, int64_t n, int64_t c, acc_t mean,
                              acc_t rstd) {
  const acc_t op = a.op(n, c);
  return {a.e(n, c) - mean, rstd * a.w(c) * op, a.b(c) * op + a.sh(n, c)};
}

// Backward factors of channel (n, c): n̂ = (x + c0) rstd, z = n̂ g + bz.
template <typename acc_t>
struct BwdChannel {
  acc_t c0, rstd, g, bz;
};

template <typename acc_t>
BwdChannel<acc_t> bwd_channel(const Affine<acc_t>& a, int64_t n, int64_t c, acc_t mean,
                              acc_t rstd) {
  const acc_t op = a.op(n, c);
  return {a.e(n, c) - mean, rstd, a.w(c) * op, a.b(c) * op + a.sh(n, c)};
}

// (mean, rstd) of a group from the moments of its D channels of S positions
// each (Chan's formula with equal counts).
template <typename acc_t>
std::pair<acc_t, acc_t> group_stats(const Moments<acc_t>* ch, int64_t D, int64_t S, double eps) {
  acc_t sum = 0;
  for (int64_t d = 0; d < D; ++d) {
    sum += ch[d].mean;
  }
  const acc_t mean = sum / static_cast<acc_t>(D);
  acc_t m2 = 0;
  for (int64_t d = 0; d < D; ++d) {
    const acc_t dev = ch[d].mean - mean;
    m2 += ch[d].m2 + static_cast<acc_t>(S) * dev * dev;
  }
  const acc_t var = m2 / static_cast<acc_t>(D * S);
  return {mean, acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps))};
}

template <typename acc_t>
struct Sums {
  acc_t s1, s2, s3;  // Σ dz, Σ dz n̂, Σ n̂ over a channel's positions
};

// Outputs of the per-channel gradients, (N, C) each; nullptr when not wanted.
// dwp / dbp are the per-sample partials of dweight / dbias.
template <typename acc_t>
struct ChannelGrads {
  acc_t* dwp;
  acc_t* dbp;
  acc_t* demb;
  acc_t* dscale;
  acc_t* dshift;
};

// m1 = Σ_c g S1 / (D S), m2 = Σ_c g S2 / (D S) of group (n, g) whose channels
// start at c_begin.
template <typename acc_t>
std::pair<acc_t, acc_t> group_dot(const Affine<acc_t>& a, const Sums<acc_t>* ch, int64_t n,
                                  int64_t c_begin, int64_t D, int64_t S) {
  acc_t m1 = 0, m2 = 0;
  for (int64_t d = 0; d < D; ++d) {
    const acc_t g = a.w(c_begin + d) * a.op(n, c_begin + d);
    m1 += g * ch[d].s1;
    m2 += g * ch[d].s2;
  }
  const acc_t count = static_cast<acc_t>(D * S);
  return {m1 / count, m2 / count};
}

template <typename acc_t>
void write_channel_grads(const Affine<acc_t>& a, const ChannelGrads<acc_t>& o, int64_t n,
                         int64_t c, const Sums<acc_t>& s, acc_t rstd, acc_t m1, acc_t m2,
                         int64_t S) {
  const int64_t nc = n * a.C + c;
  const acc_t op = a.op(n, c), w = a.w(c);
  if (o.dshift != nullptr) {
    o.dshift[nc] = s.s1;
  }
  if (o.dscale != nullptr) {
    o.dscale[nc] = w * s.s2 + a.b(c) * s.s1;
  }
  if (o.dwp != nullptr) {
    o.dwp[nc] = op * s.s2;
  }
  if (o.dbp != nullptr) {
    o.dbp[nc] = op * s.s1;
  }
  if (o.demb != nullptr) {
    o.demb[nc] = rstd * (w * op * s.s1 - static_cast<acc_t>(S) * m1 - m2 * s.s3);
  }
}

// out[c] = Σ_n part[n, c], n in order (deterministic).
template <typename acc_t>
void sum_over_batch(const acc_t* part, int64_t N, int64_t C, acc_t* out) {
  std::copy(part, part + C, out);
  for (int64_t n = 1; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      out[c] += part[n * C + c];
    }
  }
}

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, elems_per_item));
}

// ---------------------------------------------------------------------------
// Contiguous layout: element loops over one group, D rows of S positions
// ---------------------------------------------------------------------------

// Moments of the group's h = x + e[d] (x: (D, S); e: (D,) or nullptr for 0),
// in blocks of kRowBlock elements of the flattened group (a block may span
// rows), so short rows cost no per-row reduction.
template <typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES Moments<acc_t> group_moments(const scalar_t* __restrict__ x, int64_t D,
                                                    int64_t S, const acc_t* __restrict__ e) {
  acc_t buf[kRowBlock];
  Moments<acc_t> run{0, 0};
  const int64_t numel = D * S;
  int64_t d = 0, s = 0;  // row and position of element i0
  for (int64_t i0 = 0; i0 < numel; i0 += kRowBlock) {
    const int64_t n = std::min(kRowBlock, numel - i0);
    for (int64_t filled = 0; filled < n;) {
      const int64_t len = std::min(n - filled, S - s);
      const acc_t ed = e != nullptr ? e[d] : acc_t(0);
      const scalar_t* xr = x + i0 + filled;
      for (int64_t j = 0; j < len; ++j) {
        buf[filled + j] = static_cast<acc_t>(xr[j]) + ed;
      }
      filled += len;
      s += len;
      if (s == S) {
        s = 0;
        ++d;
      }
    }
    const acc_t mean = lane_sum<acc_t>(n, [&](int64_t i) { return buf[i]; }) / static_cast<acc_t>(n);
    const acc_t m2 = lane_sum<acc_t>(n, [&](int64_t i) {
      const acc_t dev = buf[i] - mean;
      return dev * dev;
    });
    merge(run, {mean, m2}, merge_weights<acc_t>(i0, n));
  }
  return run;
}

// y of the group, row d with the factors f[d].
template <bool kSilu, typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void group_apply(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                        int64_t D, int64_t S,
                                        const FwdChannel<acc_t>* __restrict__ f) {
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t* xr = x + d * S;
    scalar_t* yr = y + d * S;
    const acc_t c0 = f[d].c0, alpha = f[d].alpha, beta = f[d].beta;
    for (int64_t i = 0; i < S; ++i) {
      yr[i] = static_cast<scalar_t>(act<kSilu>((static_cast<acc_t>(xr[i]) + c0) * alpha + beta));
    }
  }
}

// S1, S2, S3 of each row of the group into sums[d]: n̂ and dz of a block of
// the row go to buffers, then get summed.  With dz_keep (D * S values), dz is
// stored there for group_dx.
template <bool kSilu, typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void group_sums(const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ dy, int64_t D, int64_t S,
                                       const BwdChannel<acc_t>* __restrict__ f,
                                       Sums<acc_t>* __restrict__ sums,
                                       acc_t* __restrict__ dz_keep) {
  acc_t nh[kRowBlock], dz_block[kRowBlock];
  for (int64_t d = 0; d < D; ++d) {
    const acc_t c0 = f[d].c0, rstd = f[d].rstd, g = f[d].g, bz = f[d].bz;
    Sums<acc_t> s{0, 0, 0};
    for (int64_t i0 = 0; i0 < S; i0 += kRowBlock) {
      const int64_t n = std::min(kRowBlock, S - i0);
      const int64_t o = d * S + i0;
      acc_t* __restrict__ dz = dz_keep != nullptr ? dz_keep + o : dz_block;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t v = (static_cast<acc_t>(x[o + i]) + c0) * rstd;
        nh[i] = v;
        dz[i] = act_grad<kSilu>(static_cast<acc_t>(dy[o + i]), v * g + bz);
      }
      s.s1 += lane_sum<acc_t>(n, [&](int64_t i) { return dz[i]; });
      s.s2 += lane_sum<acc_t>(n, [&](int64_t i) { return dz[i] * nh[i]; });
      s.s3 += lane_sum<acc_t>(n, [&](int64_t i) { return nh[i]; });
    }
    sums[d] = s;
  }
}

// dx of the group, from dz_keep as group_sums stored it, or recomputing dz
// from dy when dz_keep is nullptr.
template <bool kSilu, typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void group_dx(const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ dy,
                                     const acc_t* __restrict__ dz_keep, scalar_t* __restrict__ dx,
                                     int64_t D, int64_t S, const BwdChannel<acc_t>* __restrict__ f,
                                     acc_t m1, acc_t m2) {
  for (int64_t d = 0; d < D; ++d) {
    const acc_t c0 = f[d].c0, rstd = f[d].rstd, g = f[d].g, bz = f[d].bz;
    const int64_t o = d * S;
    if (dz_keep != nullptr) {
      for (int64_t i = 0; i < S; ++i) {
        const acc_t v = (static_cast<acc_t>(x[o + i]) + c0) * rstd;
        dx[o + i] = static_cast<scalar_t>(rstd * (g * dz_keep[o + i] - m1 - v * m2));
      }
    } else {
      for (int64_t i = 0; i < S; ++i) {
        const acc_t v = (static_cast<acc_t>(x[o + i]) + c0) * rstd;
        const acc_t dzv = act_grad<kSilu>(static_cast<acc_t>(dy[o + i]), v * g + bz);
        dx[o + i] = static_cast<scalar_t>(rstd * (g * dzv - m1 - v * m2));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Channels_last: element loops over a chunk of positions, all C channels
// ---------------------------------------------------------------------------

// Chunking of the positions of a sample (fixed by C and S only).
struct ClChunks {
  int64_t P;  // positions per chunk
  int64_t K;  // chunks per sample
  int64_t Q;  // positions per sub-block

  ClChunks(int64_t C, int64_t S)
      : P(std::min(S, std::max<int64_t>(1, kClChunk / C))),
        K((S + P - 1) / P),
        Q(std::clamp<int64_t>(kClBlock / C, 1, kMaxBlockPositions)) {}
  int64_t positions(int64_t k, int64_t S) const { return std::min(P, S - k * P); }
};

// Per-channel moments of h = x + e over np positions (x: (np, C)), into mean
// and m2 (C each); bmean, bm2 (C each) are scratch.
template <typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void cl_moments(const scalar_t* __restrict__ x, int64_t np, int64_t C,
                                       int64_t Q, const acc_t* __restrict__ e,
                                       acc_t* __restrict__ mean, acc_t* __restrict__ m2,
                                       acc_t* __restrict__ bmean, acc_t* __restrict__ bm2) {
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = 0;
    m2[c] = 0;
  }
  for (int64_t p0 = 0; p0 < np; p0 += Q) {
    const int64_t q = std::min(Q, np - p0);
    const scalar_t* xb = x + p0 * C;
    for (int64_t c = 0; c < C; ++c) {
      bmean[c] = 0;
      bm2[c] = 0;
    }
    for (int64_t p = 0; p < q; ++p) {
      for (int64_t c = 0; c < C; ++c) {
        bmean[c] += static_cast<acc_t>(xb[p * C + c]) + e[c];
      }
    }
    const acc_t count = static_cast<acc_t>(q);
    for (int64_t c = 0; c < C; ++c) {
      bmean[c] = bmean[c] / count;
    }
    for (int64_t p = 0; p < q; ++p) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t dev = static_cast<acc_t>(xb[p * C + c]) + e[c] - bmean[c];
        bm2[c] += dev * dev;
      }
    }
    const MergeWeights<acc_t> w = merge_weights<acc_t>(p0, q);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t delta = bmean[c] - mean[c];
      mean[c] = mean[c] + delta * w.frac;
      m2[c] = m2[c] + bm2[c] + delta * delta * w.wgt;
    }
  }
}

template <bool kSilu, typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void cl_apply(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                     int64_t np, int64_t C, const acc_t* __restrict__ c0,
                                     const acc_t* __restrict__ alpha,
                                     const acc_t* __restrict__ beta) {
  for (int64_t p = 0; p < np; ++p) {
    const scalar_t* xp = x + p * C;
    scalar_t* yp = y + p * C;
    for (int64_t c = 0; c < C; ++c) {
      yp[c] = static_cast<scalar_t>(act<kSilu>((static_cast<acc_t>(xp[c]) + c0[c]) * alpha[c] + beta[c]));
    }
  }
}

// Per-channel backward factors of one sample, (C,) each.
template <typename acc_t>
struct ClBwdFactors {
  const acc_t* c0;
  const acc_t* rstd;
  const acc_t* g;
  const acc_t* bz;
};

// Per-channel S1, S2, S3 over np positions (x, dy: (np, C)) into s1, s2, s3;
// b1, b2, b3 (C each) are scratch for the sub-block sums.
template <bool kSilu, typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void cl_sums(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                    int64_t np, int64_t C, int64_t Q, ClBwdFactors<acc_t> f,
                                    acc_t* __restrict__ s1, acc_t* __restrict__ s2,
                                    acc_t* __restrict__ s3, acc_t* __restrict__ b1,
                                    acc_t* __restrict__ b2, acc_t* __restrict__ b3) {
  const acc_t* __restrict__ c0 = f.c0;
  const acc_t* __restrict__ rstd = f.rstd;
  const acc_t* __restrict__ g = f.g;
  const acc_t* __restrict__ bz = f.bz;
  for (int64_t c = 0; c < C; ++c) {
    s1[c] = 0;
    s2[c] = 0;
    s3[c] = 0;
  }
  for (int64_t p0 = 0; p0 < np; p0 += Q) {
    const int64_t q = std::min(Q, np - p0);
    for (int64_t c = 0; c < C; ++c) {
      b1[c] = 0;
      b2[c] = 0;
      b3[c] = 0;
    }
    for (int64_t p = p0; p < p0 + q; ++p) {
      const scalar_t* xp = x + p * C;
      const scalar_t* dyp = dy + p * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = (static_cast<acc_t>(xp[c]) + c0[c]) * rstd[c];
        const acc_t dzv = act_grad<kSilu>(static_cast<acc_t>(dyp[c]), v * g[c] + bz[c]);
        b1[c] += dzv;
        b2[c] += dzv * v;
        b3[c] += v;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += b1[c];
      s2[c] += b2[c];
      s3[c] += b3[c];
    }
  }
}

template <bool kSilu, typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void cl_dx(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                  scalar_t* __restrict__ dx, int64_t np, int64_t C,
                                  ClBwdFactors<acc_t> f, const acc_t* __restrict__ m1,
                                  const acc_t* __restrict__ m2) {
  const acc_t* __restrict__ c0 = f.c0;
  const acc_t* __restrict__ rstd = f.rstd;
  const acc_t* __restrict__ g = f.g;
  const acc_t* __restrict__ bz = f.bz;
  for (int64_t p = 0; p < np; ++p) {
    const scalar_t* xp = x + p * C;
    const scalar_t* dyp = dy + p * C;
    scalar_t* dxp = dx + p * C;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = (static_cast<acc_t>(xp[c]) + c0[c]) * rstd[c];
      const acc_t dzv = act_grad<kSilu>(static_cast<acc_t>(dyp[c]), v * g[c] + bz[c]);
      dxp[c] = static_cast<scalar_t>(rstd[c] * (g[c] * dzv - m1[c] - v * m2[c]));
    }
  }
}


// ---------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------

template <bool kSilu, typename scalar_t>
void fwd_contiguous(const GroupNormFwdArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const GroupNormShape& sh = a.shape;
  const int64_t S = sh.S, G = sh.G, D = sh.D, group_numel = D * S;
  const Affine<acc_t> aff = affine_of<acc_t>(a);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  scalar_t* y = a.y.mutable_data_ptr<scalar_t>();
  acc_t* mean = a.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd = a.rstd.mutable_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(a.eps);

  at::parallel_for(0, sh.N * G, grain_for(group_numel), [&](int64_t begin, int64_t end) {
    std::vector<FwdChannel<acc_t>> f(D);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c_begin = (ng % G) * D;
      const scalar_t* xg = x + ng * group_numel;  // (D, S): row d is channel c_begin + d
      const Moments<acc_t> mo = group_moments(
          xg, D, S, aff.emb != nullptr ? aff.emb + n * sh.C + c_begin : nullptr);
      const acc_t r = acc_t(1) / std::sqrt(mo.m2 / static_cast<acc_t>(group_numel) + eps);
      mean[ng] = mo.mean;
      rstd[ng] = r;
      for (int64_t d = 0; d < D; ++d) {
        f[d] = fwd_channel(aff, n, c_begin + d, mo.mean, r);
      }
      group_apply<kSilu>(xg, y + ng * group_numel, D, S, f.data());
    }
  });
}

template <bool kSilu, typename scalar_t>
void fwd_channels_last(const GroupNormFwdArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const GroupNormShape& sh = a.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S, G = sh.G, D = sh.D;
  const ClChunks ck(C, S);
  const int64_t K = ck.K, NC = N * C, NKC = N * K * C;
  const Affine<acc_t> aff = affine_of<acc_t>(a);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  scalar_t* y = a.y.mutable_data_ptr<scalar_t>();
  acc_t* mean = a.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd = a.rstd.mutable_data_ptr<acc_t>();

  // Phase 1: per-chunk channel moments, (N, K, C) planes of means and M2s.
  std::vector<acc_t> ws(2 * NKC);
  const std::vector<acc_t> no_emb(aff.emb != nullptr ? 0 : C, acc_t(0));
  at::parallel_for(0, N * K, grain_for(ck.P * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(2 * C);
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      cl_moments(x + (n * S + k * ck.P) * C, ck.positions(k, S), C, ck.Q,
                 aff.emb != nullptr ? aff.emb + n * C : no_emb.data(), ws.data() + nk * C,
                 ws.data() + NKC + nk * C, scratch.data(), scratch.data() + C);
    }
  });

  // Phase 2: per group, the chunks merged in order, the statistics, and the
  // channels' factors of y as (N, C) planes c0, alpha, beta.
  std::vector<acc_t> fac(3 * NC);
  at::parallel_for(0, N * G, grain_for(K * D), [&](int64_t begin, int64_t end) {
    std::vector<Moments<acc_t>> ch(D);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c_begin = (ng % G) * D;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t* wc = ws.data() + n * K * C + c_begin + d;  // chunk k at wc[k * C]
        Moments<acc_t> run{wc[0], wc[NKC]};
        for (int64_t k = 1; k < K; ++k) {
          merge(run, {wc[k * C], wc[NKC + k * C]}, merge_weights<acc_t>(k * ck.P, ck.positions(k, S)));
        }
        ch[d] = run;
      }
      const auto [m, r] = group_stats(ch.data(), D, S, a.eps);
      mean[ng] = m;
      rstd[ng] = r;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t nc = n * C + c_begin + d;
        const FwdChannel<acc_t> f = fwd_channel(aff, n, c_begin + d, m, r);
        fac[nc] = f.c0;
        fac[NC + nc] = f.alpha;
        fac[2 * NC + nc] = f.beta;
      }
    }
  });

  // Phase 3: y chunk by chunk.
  at::parallel_for(0, N * K, grain_for(ck.P * C), [&](int64_t begin, int64_t end) {
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / K, k = nk % K, offset = (n * S + k * ck.P) * C;
      cl_apply<kSilu>(x + offset, y + offset, ck.positions(k, S), C, fac.data() + n * C,
                      fac.data() + NC + n * C, fac.data() + 2 * NC + n * C);
    }
  });
}

template <bool kSilu, typename scalar_t>
void bwd_contiguous(const GroupNormBwdArgs& a, const ChannelGrads<at::opmath_type<scalar_t>>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const GroupNormShape& sh = a.shape;
  const int64_t S = sh.S, G = sh.G, D = sh.D, group_numel = D * S;
  const Affine<acc_t> aff = affine_of<acc_t>(a);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = a.dy.const_data_ptr<scalar_t>();
  scalar_t* dx = mutable_data_or_null<scalar_t>(a.dx);
  const acc_t* mean = a.mean.const_data_ptr<acc_t>();
  const acc_t* rstd = a.rstd.const_data_ptr<acc_t>();
  // With SiLU, dz of the group is kept for the dx pass (saves an exp and a
  // division per element) while the group fits kMaxKeptDz.
  const bool keep_dz = kSilu && dx != nullptr && group_numel <= kMaxKeptDz;

  at::parallel_for(0, sh.N * G, grain_for(2 * group_numel), [&](int64_t begin, int64_t end) {
    std::vector<BwdChannel<acc_t>> f(D);
    std::vector<Sums<acc_t>> sums(D);
    std::vector<acc_t> dz(keep_dz ? group_numel : 0);  // (D, S)
    acc_t* dz_keep = keep_dz ? dz.data() : nullptr;
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c_begin = (ng % G) * D;
      const scalar_t* xg = x + ng * group_numel;  // (D, S): row d is channel c_begin + d
      const scalar_t* dyg = dy + ng * group_numel;
      for (int64_t d = 0; d < D; ++d) {
        f[d] = bwd_channel(aff, n, c_begin + d, mean[ng], rstd[ng]);
      }
      group_sums<kSilu>(xg, dyg, D, S, f.data(), sums.data(), dz_keep);
      const auto [m1, m2] = group_dot(aff, sums.data(), n, c_begin, D, S);
      for (int64_t d = 0; d < D; ++d) {
        write_channel_grads(aff, out, n, c_begin + d, sums[d], rstd[ng], m1, m2, S);
      }
      if (dx != nullptr) {
        group_dx<kSilu>(xg, dyg, dz_keep, dx + ng * group_numel, D, S, f.data(), m1, m2);
      }
    }
  });
}

template <bool kSilu, typename scalar_t>
void bwd_channels_last(const GroupNormBwdArgs& a,
                       const ChannelGrads<at::opmath_type<scalar_t>>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const GroupNormShape& sh = a.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S, G = sh.G, D = sh.D;
  const ClChunks ck(C, S);
  const int64_t K = ck.K, NC = N * C, NKC = N * K * C;
  const Affine<acc_t> aff = affine_of<acc_t>(a);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = a.dy.const_data_ptr<scalar_t>();
  scalar_t* dx = mutable_data_or_null<scalar_t>(a.dx);
  const acc_t* mean = a.mean.const_data_ptr<acc_t>();
  const acc_t* rstd = a.rstd.const_data_ptr<acc_t>();

  // The channels' factors as (N, C) planes c0, rstd, g, bz, then m1, m2 (per
  // channel, the value of its group; filled in phase 2).
  std::vector<acc_t> fac(6 * NC);
  for (int64_t ng = 0; ng < N * G; ++ng) {
    const int64_t n = ng / G, c_begin = (ng % G) * D;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t nc = n * C + c_begin + d;
      const BwdChannel<acc_t> f = bwd_channel(aff, n, c_begin + d, mean[ng], rstd[ng]);
      fac[nc] = f.c0;
      fac[NC + nc] = f.rstd;
      fac[2 * NC + nc] = f.g;
      fac[3 * NC + nc] = f.bz;
    }
  }
  const auto factors = [&](int64_t n) {
    const acc_t* p = fac.data() + n * C;
    return ClBwdFactors<acc_t>{p, p + NC, p + 2 * NC, p + 3 * NC};
  };
  acc_t* m1c = fac.data() + 4 * NC;
  acc_t* m2c = fac.data() + 5 * NC;

  // Phase 1: per-chunk channel sums, (N, K, C) planes of S1, S2, S3.
  std::vector<acc_t> ws(3 * NKC);
  at::parallel_for(0, N * K, grain_for(2 * ck.P * C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(3 * C);
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / K, k = nk % K, offset = (n * S + k * ck.P) * C;
      acc_t* s = ws.data() + nk * C;
      cl_sums<kSilu>(x + offset, dy + offset, ck.positions(k, S), C, ck.Q, factors(n), s, s + NKC,
                     s + 2 * NKC, scratch.data(), scratch.data() + C, scratch.data() + 2 * C);
    }
  });

  // Phase 2: per group, the chunks' sums added in order, m1, m2 and the
  // per-channel gradients.
  at::parallel_for(0, N * G, grain_for(K * D), [&](int64_t begin, int64_t end) {
    std::vector<Sums<acc_t>> ch(D);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, c_begin = (ng % G) * D;
      for (int64_t d = 0; d < D; ++d) {
        const acc_t* wc = ws.data() + n * K * C + c_begin + d;  // chunk k at wc[k * C]
        Sums<acc_t> s{0, 0, 0};
        for (int64_t k = 0; k < K; ++k) {
          s.s1 += wc[k * C];
          s.s2 += wc[NKC + k * C];
          s.s3 += wc[2 * NKC + k * C];
        }
        ch[d] = s;
      }
      const auto [m1, m2] = group_dot(aff, ch.data(), n, c_begin, D, S);
      for (int64_t d = 0; d < D; ++d) {
        write_channel_grads(aff, out, n, c_begin + d, ch[d], rstd[ng], m1, m2, S);
        m1c[n * C + c_begin + d] = m1;
        m2c[n * C + c_begin + d] = m2;
      }
    }
  });

  // Phase 3: dx chunk by chunk.
  if (dx == nullptr) {
    return;
  }
  at::parallel_for(0, N * K, grain_for(3 * ck.P * C), [&](int64_t begin, int64_t end) {
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / K, k = nk % K, offset = (n * S + k * ck.P) * C;
      cl_dx<kSilu>(x + offset, dy + offset, dx + offset, ck.positions(k, S), C, factors(n),
                   m1c + n * C, m2c + n * C);
    }
  });
}

template <bool kSilu, typename scalar_t>
void fwd(const GroupNormFwdArgs& a) {
  if (a.shape.channels_last) {
    fwd_channels_last<kSilu, scalar_t>(a);
  } else {
    fwd_contiguous<kSilu, scalar_t>(a);
  }
}

template <bool kSilu, typename scalar_t>
void bwd(const GroupNormBwdArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = a.shape.N, C = a.shape.C;
  // dweight / dbias: per-sample partials, or the gradient itself for N == 1.
  std::vector<acc_t> dwp(a.dweight.has_value() && N > 1 ? N * C : 0);
  std::vector<acc_t> dbp(a.dbias.has_value() && N > 1 ? N * C : 0);
  const ChannelGrads<acc_t> out{
      dwp.empty() ? mutable_data_or_null<acc_t>(a.dweight) : dwp.data(),
      dbp.empty() ? mutable_data_or_null<acc_t>(a.dbias) : dbp.data(),
      mutable_data_or_null<acc_t>(a.demb), mutable_data_or_null<acc_t>(a.dscale),
      mutable_data_or_null<acc_t>(a.dshift)};
  if (a.shape.channels_last) {
    bwd_channels_last<kSilu, scalar_t>(a, out);
  } else {
    bwd_contiguous<kSilu, scalar_t>(a, out);
  }
  if (!dwp.empty()) {
    sum_over_batch(dwp.data(), N, C, a.dweight->mutable_data_ptr<acc_t>());
  }
  if (!dbp.empty()) {
    sum_over_batch(dbp.data(), N, C, a.dbias->mutable_data_ptr<acc_t>());
  }
}

}  // namespace

void group_norm_fwd_cpu(const GroupNormFwdArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "group_norm_fwd_cpu", [&] {
                                    if (a.silu) {
                                      fwd<true, scalar_t>(a);
                                    } else {
                                      fwd<false, scalar_t>(a);
                                    }
                                  });
}

void group_norm_bwd_cpu(const GroupNormBwdArgs& a) {
  const bool any = a.dx || a.dweight || a.dbias || a.demb || a.dscale || a.dshift;
  if (!any) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(),
                                  "group_norm_bwd_cpu", [&] {
                                    if (a.silu) {
                                      bwd<true, scalar_t>(a);
                                    } else {
                                      bwd<false, scalar_t>(a);
                                    }
                                  });
}

}  // namespace fastdiff
