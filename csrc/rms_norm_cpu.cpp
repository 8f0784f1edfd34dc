// CPU kernels of fastdiff::rms_norm_silu (see rms_norm.h for the math and the
// inputs).
//
// The norm reduces over the channels of a position, so the work is cut into
// blocks of P positions of one sample (tasks (n, k), K = ceil(S / P) blocks per
// sample, P fixed by C and S alone), at::parallel_for over N * K:
//
// * contiguous: a block is C rows of P contiguous positions.  The loops run
//   over the positions (vectorised), the channels outermost: the sum of
//   squares of every position of the block, then y, re-reading the block
//   (C * P elements, sized to stay in L2).  The backward keeps dz of the block
//   in a per-thread buffer between its two passes (the dot, then dx).
// * channels_last: a block is P rows of C contiguous channels; each position
//   is reduced (kLanes partial sums) and written while its row is in L1, and
//   the backward needs a single pass.
//
// dweight / dscale / dshift: each task writes its block's per-channel sums
// S1, S2 to a (2, N, K, C) workspace; they are added over k, then over n, in
// order.  Every sum runs in an order fixed by the shape alone (not by the
// thread count), so results are bit-reproducible on a machine.  All
// arithmetic is in the opmath type (float; double for fp64).
//
// Note: with torch's OpenMP backend, at::parallel_for (an inline template)
// only runs in parallel when this file is compiled with -fopenmp; setup.py and
// CMakeLists.txt pass it.

#include "rms_norm.h"

#include "cpu_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace fastdiff {
namespace {

using namespace cpu;

// Elements of a block (C * P): 64 KiB of fp32, so that the contiguous
// layout's second pass over the block reads it from L2.
constexpr int64_t kBlock = 16384;
// Fewest positions of a contiguous-layout block: the length of its
// vectorised rows.
constexpr int64_t kMinRow = 32;
// Elements per parallel task at least: amortises the task overhead.
constexpr int64_t kGrain = 32768;

// Blocking of the positions of a sample (fixed by C, S and the layout only).
struct Blocks {
  int64_t P;  // positions per block
  int64_t K;  // blocks per sample

  explicit Blocks(const RmsNormShape& sh)
      : P(std::min(sh.S, std::max<int64_t>(sh.channels_last ? 1 : kMinRow, kBlock / sh.C))),
        K((sh.S + P - 1) / P) {}
  int64_t positions(int64_t k, int64_t S) const { return std::min(P, S - k * P); }
};

int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, elems_per_item));
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// 1 / max(sqrt(ss), eps); NaN stays NaN.  With ss = 0: the clamp threshold
// 1 / eps, rounded as every clamped rstd is.
template <typename acc_t>
C10_ALWAYS_INLINE acc_t inv_norm(acc_t ss, acc_t eps) {
  const acc_t norm = std::sqrt(ss);
  return acc_t(1) / (norm < eps ? eps : norm);
}

// Per-channel factors of every sample as (N, C) planes: g = sqrt(C) w
// (1 + scale) and shift (0 when absent).
template <typename acc_t, typename Args>
std::vector<acc_t> channel_factors(const Args& a) {
  const int64_t N = a.shape.N, C = a.shape.C, NC = N * C;
  const acc_t* w = data_or_null<acc_t>(a.weight);
  const acc_t* scale = data_or_null<acc_t>(a.scale);
  const acc_t* shift = data_or_null<acc_t>(a.shift);
  const acc_t root = static_cast<acc_t>(std::sqrt(static_cast<double>(C)));
  std::vector<acc_t> f(2 * NC);
  for (int64_t nc = 0; nc < NC; ++nc) {
    const int64_t c = nc % C;
    acc_t g = root;
    if (w != nullptr) {
      g = g * w[c];
    }
    if (scale != nullptr) {
      g = g * (acc_t(1) + scale[nc]);
    }
    f[nc] = g;
    f[NC + nc] = shift != nullptr ? shift[nc] : acc_t(0);
  }
  return f;
}

// ---------------------------------------------------------------------------
// Contiguous layout: a block is C rows of q positions (row stride S)
// ---------------------------------------------------------------------------

// r[i] = 1 / max(norm of position i, eps), i < q.
template <typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void rows_inv_norm(const scalar_t* __restrict__ x, int64_t C, int64_t S,
                                          int64_t q, acc_t eps, acc_t* __restrict__ r) {
  for (int64_t i = 0; i < q; ++i) {
    r[i] = 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xr = x + c * S;
    for (int64_t i = 0; i < q; ++i) {
      const acc_t v = static_cast<acc_t>(xr[i]);
      r[i] += v * v;
    }
  }
  for (int64_t i = 0; i < q; ++i) {
    r[i] = inv_norm(r[i], eps);
  }
}

template <bool kSilu, typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void rows_apply(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                       int64_t C, int64_t S, int64_t q,
                                       const acc_t* __restrict__ r, const acc_t* __restrict__ g,
                                       const acc_t* __restrict__ sh) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xr = x + c * S;
    scalar_t* yr = y + c * S;
    const acc_t gc = g[c], shc = sh[c];
    for (int64_t i = 0; i < q; ++i) {
      yr[i] = static_cast<scalar_t>(act<kSilu>(static_cast<acc_t>(xr[i]) * r[i] * gc + shc));
    }
  }
}

// Backward of a block.  Pass 1: per row c, x̂ and dz (kept in dz_keep, (C, q)),
// the row's S1 / S2 into s1[c], s2[c] and the positions' dot; pass 2: dx
// (when dx is not nullptr).  xh (q) is scratch; dot (q) is overwritten.
template <bool kSilu, typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void rows_bwd(const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ dy, scalar_t* __restrict__ dx,
                                     int64_t C, int64_t S, int64_t q, const acc_t* __restrict__ r,
                                     acc_t r_clamp, const acc_t* __restrict__ g,
                                     const acc_t* __restrict__ sh, acc_t* __restrict__ s1,
                                     acc_t* __restrict__ s2, acc_t* __restrict__ dz_keep,
                                     acc_t* __restrict__ xh, acc_t* __restrict__ dot) {
  for (int64_t i = 0; i < q; ++i) {
    dot[i] = 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xr = x + c * S;
    const scalar_t* dyr = dy + c * S;
    acc_t* dz = dz_keep + c * q;
    const acc_t gc = g[c], shc = sh[c];
    for (int64_t i = 0; i < q; ++i) {
      const acc_t v = static_cast<acc_t>(xr[i]) * r[i];
      const acc_t d = act_grad<kSilu>(static_cast<acc_t>(dyr[i]), v * gc + shc);
      xh[i] = v;
      dz[i] = d;
      dot[i] += d * gc * v;
    }
    s1[c] = lane_sum<acc_t>(q, [&](int64_t i) { return dz[i]; });
    s2[c] = lane_sum<acc_t>(q, [&](int64_t i) { return dz[i] * xh[i]; });
  }
  if (dx == nullptr) {
    return;
  }
  for (int64_t i = 0; i < q; ++i) {
    dot[i] = r[i] < r_clamp ? dot[i] : acc_t(0);
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* xr = x + c * S;
    scalar_t* dxr = dx + c * S;
    const acc_t* dz = dz_keep + c * q;
    const acc_t gc = g[c];
    for (int64_t i = 0; i < q; ++i) {
      const acc_t v = static_cast<acc_t>(xr[i]) * r[i];
      dxr[i] = static_cast<scalar_t>(r[i] * (dz[i] * gc - v * dot[i]));
    }
  }
}

// ---------------------------------------------------------------------------
// Channels_last: a block is q rows of C channels (row stride C)
// ---------------------------------------------------------------------------

template <bool kSilu, typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void positions_fwd(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                          int64_t C, int64_t q, acc_t eps,
                                          const acc_t* __restrict__ g,
                                          const acc_t* __restrict__ sh, acc_t* __restrict__ r) {
  for (int64_t p = 0; p < q; ++p) {
    const scalar_t* xp = x + p * C;
    scalar_t* yp = y + p * C;
    const acc_t rp = inv_norm(lane_sum<acc_t>(C, [&](int64_t c) {
                                const acc_t v = static_cast<acc_t>(xp[c]);
                                return v * v;
                              }),
                              eps);
    r[p] = rp;
    for (int64_t c = 0; c < C; ++c) {
      yp[c] = static_cast<scalar_t>(act<kSilu>(static_cast<acc_t>(xp[c]) * rp * g[c] + sh[c]));
    }
  }
}

// Backward of a block in one pass: per position, x̂ and dz into the row
// buffers xh, dz (C each), its dot, its dx, and the block's S1 / S2 summed
// into s1, s2 (C each, overwritten) position by position.
template <bool kSilu, typename scalar_t, typename acc_t>
FASTDIFF_TARGET_CLONES void positions_bwd(const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ dy,
                                          scalar_t* __restrict__ dx, int64_t C, int64_t q,
                                          const acc_t* __restrict__ r, acc_t r_clamp,
                                          const acc_t* __restrict__ g,
                                          const acc_t* __restrict__ sh, acc_t* __restrict__ s1,
                                          acc_t* __restrict__ s2, acc_t* __restrict__ xh,
                                          acc_t* __restrict__ dz) {
  for (int64_t c = 0; c < C; ++c) {
    s1[c] = 0;
    s2[c] = 0;
  }
  for (int64_t p = 0; p < q; ++p) {
    const scalar_t* xp = x + p * C;
    const scalar_t* dyp = dy + p * C;
    const acc_t rp = r[p];
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(xp[c]) * rp;
      const acc_t d = act_grad<kSilu>(static_cast<acc_t>(dyp[c]), v * g[c] + sh[c]);
      xh[c] = v;
      dz[c] = d;
      s1[c] += d;
      s2[c] += d * v;
    }
    if (dx == nullptr) {
      continue;
    }
    const acc_t dot =
        rp < r_clamp ? lane_sum<acc_t>(C, [&](int64_t c) { return dz[c] * g[c] * xh[c]; }) : 0;
    scalar_t* dxp = dx + p * C;
    for (int64_t c = 0; c < C; ++c) {
      dxp[c] = static_cast<scalar_t>(rp * (dz[c] * g[c] - xh[c] * dot));
    }
  }
}

// ---------------------------------------------------------------------------
// Drivers
// ---------------------------------------------------------------------------

template <bool kSilu, typename scalar_t>
void fwd(const RmsNormFwdArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const RmsNormShape& sh = a.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S, NC = N * C;
  const Blocks bk(sh);
  const std::vector<acc_t> fac = channel_factors<acc_t>(a);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  scalar_t* y = a.y.mutable_data_ptr<scalar_t>();
  acc_t* rstd = a.rstd.mutable_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(a.eps);

  at::parallel_for(0, N * bk.K, grain_for(bk.P * C), [&](int64_t begin, int64_t end) {
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / bk.K, p0 = (nk % bk.K) * bk.P, q = bk.positions(nk % bk.K, S);
      const acc_t* g = fac.data() + n * C;
      const acc_t* shift = fac.data() + NC + n * C;
      acc_t* r = rstd + n * S + p0;
      if (sh.channels_last) {
        const int64_t offset = (n * S + p0) * C;
        positions_fwd<kSilu>(x + offset, y + offset, C, q, eps, g, shift, r);
      } else {
        const int64_t offset = n * C * S + p0;
        rows_inv_norm(x + offset, C, S, q, eps, r);
        rows_apply<kSilu>(x + offset, y + offset, C, S, q, r, g, shift);
      }
    }
  });
}

template <bool kSilu, typename scalar_t>
void bwd(const RmsNormBwdArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const RmsNormShape& sh = a.shape;
  const int64_t N = sh.N, C = sh.C, S = sh.S, NC = N * C;
  const Blocks bk(sh);
  const int64_t K = bk.K, NKC = N * K * C;
  const std::vector<acc_t> fac = channel_factors<acc_t>(a);
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = a.dy.const_data_ptr<scalar_t>();
  scalar_t* dx = a.dx.has_value() ? a.dx->mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t* rstd = a.rstd.const_data_ptr<acc_t>();
  const acc_t r_clamp = inv_norm(acc_t(0), static_cast<acc_t>(a.eps));

  // Phase 1: dx, and the blocks' channel sums as (N, K, C) planes S1, S2.
  std::vector<acc_t> ws(2 * NKC);
  at::parallel_for(0, N * K, grain_for(2 * bk.P * C), [&](int64_t begin, int64_t end) {
    // channels_last: row buffers x̂, dz (C each); contiguous: dz of the block
    // (C * P), then x̂ and dot (P each)
    std::vector<acc_t> scratch(sh.channels_last ? 2 * C : (C + 2) * bk.P);
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / K, p0 = (nk % K) * bk.P, q = bk.positions(nk % K, S);
      const acc_t* g = fac.data() + n * C;
      const acc_t* shift = fac.data() + NC + n * C;
      const acc_t* r = rstd + n * S + p0;
      acc_t* s1 = ws.data() + nk * C;
      if (sh.channels_last) {
        const int64_t offset = (n * S + p0) * C;
        positions_bwd<kSilu>(x + offset, dy + offset, dx != nullptr ? dx + offset : nullptr, C, q,
                             r, r_clamp, g, shift, s1, s1 + NKC, scratch.data(),
                             scratch.data() + C);
      } else {
        const int64_t offset = n * C * S + p0;
        acc_t* dz = scratch.data();
        rows_bwd<kSilu>(x + offset, dy + offset, dx != nullptr ? dx + offset : nullptr, C, S, q, r,
                        r_clamp, g, shift, s1, s1 + NKC, dz, dz + C * bk.P, dz + (C + 1) * bk.P);
      }
    }
  });

  // Phase 2: per (n, c), the K block sums added in order; the per-channel
  // gradients, dweight as per-sample partials added over n in order.
  acc_t* dscale = a.dscale.has_value() ? a.dscale->mutable_data_ptr<acc_t>() : nullptr;
  acc_t* dshift = a.dshift.has_value() ? a.dshift->mutable_data_ptr<acc_t>() : nullptr;
  std::vector<acc_t> dwp(a.dweight.has_value() ? NC : 0);
  if (dscale == nullptr && dshift == nullptr && dwp.empty()) {
    return;
  }
  const acc_t* w = data_or_null<acc_t>(a.weight);
  const acc_t* scale = data_or_null<acc_t>(a.scale);
  const acc_t root = static_cast<acc_t>(std::sqrt(static_cast<double>(C)));
  at::parallel_for(0, NC, grain_for(2 * K), [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      const acc_t* wc = ws.data() + n * K * C + c;  // block k at wc[k * C]
      acc_t s1 = 0, s2 = 0;
      for (int64_t k = 0; k < K; ++k) {
        s1 += wc[k * C];
        s2 += wc[NKC + k * C];
      }
      if (dshift != nullptr) {
        dshift[nc] = s1;
      }
      if (dscale != nullptr) {
        dscale[nc] = (w != nullptr ? root * w[c] : root) * s2;
      }
      if (!dwp.empty()) {
        dwp[nc] = (scale != nullptr ? root * (acc_t(1) + scale[nc]) : root) * s2;
      }
    }
  });
  if (!dwp.empty()) {
    acc_t* dweight = a.dweight->mutable_data_ptr<acc_t>();
    std::copy(dwp.begin(), dwp.begin() + C, dweight);
    for (int64_t n = 1; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        dweight[c] += dwp[n * C + c];
      }
    }
  }
}

}  // namespace

void rms_norm_fwd_cpu(const RmsNormFwdArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "rms_norm_fwd_cpu",
                                  [&] {
                                    if (a.silu) {
                                      fwd<true, scalar_t>(a);
                                    } else {
                                      fwd<false, scalar_t>(a);
                                    }
                                  });
}

void rms_norm_bwd_cpu(const RmsNormBwdArgs& a) {
  if (!(a.dx || a.dweight || a.dscale || a.dshift)) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "rms_norm_bwd_cpu",
                                  [&] {
                                    if (a.silu) {
                                      bwd<true, scalar_t>(a);
                                    } else {
                                      bwd<false, scalar_t>(a);
                                    }
                                  });
}

}  // namespace fastdiff
