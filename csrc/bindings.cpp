// Python bindings of fastdiff._C: argument checks, device dispatch and the
// Philox debug helpers used by tests/test_extension.py.
//
// The Python op layers (fastdiff/ops/*.py) validate shapes and values and
// canonicalise layouts before calling in; the checks here are the cheap ones
// the kernels' raw-pointer walks rely on, so that a direct call cannot read or
// write out of bounds.

#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/extension.h>

#include "group_norm.h"
#include "philox.h"
#include "rms_norm.h"
#include "sampler_step.h"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fastdiff {
namespace {

// t has out's dtype and device, the sizes of out (with `batch` rows) and the
// same element -> memory map: dense, batch stride per_sample (F), and out's
// strides on every other dimension of size > 1.
void check_like_out(const char* name, const at::Tensor& t, const at::Tensor& out, int64_t batch,
                    int64_t per_sample) {
  TORCH_CHECK(t.scalar_type() == out.scalar_type(), "sampler_step: ", name, " has dtype ",
              t.scalar_type(), " but out has ", out.scalar_type());
  TORCH_CHECK(t.device() == out.device(), "sampler_step: ", name, " is on ", t.device(),
              " but out is on ", out.device());
  bool same_layout = t.dim() == out.dim() && t.size(0) == batch &&
                     t.is_non_overlapping_and_dense() &&
                     (batch <= 1 || t.stride(0) == per_sample);
  for (int64_t d = 1; same_layout && d < t.dim(); ++d) {
    same_layout = t.size(d) == out.size(d) && (t.size(d) == 1 || t.stride(d) == out.stride(d));
  }
  TORCH_CHECK(same_layout, "sampler_step: ", name, " (sizes ", t.sizes(), ", strides ",
              t.strides(), ") must be dense with ", batch, " samples in out's memory order (sizes ",
              out.sizes(), ", strides ", out.strides(), ")");
}

void check_args(const SamplerStepArgs& a) {
  const at::Tensor& out = a.out;
  TORCH_CHECK(out.dim() >= 1, "sampler_step: out needs a batch dimension");
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              "sampler_step: out must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t batch = a.batch();
  const int64_t per_sample = batch > 0 ? out.numel() / batch : 0;
  TORCH_CHECK(out.is_non_overlapping_and_dense() && (batch <= 1 || out.stride(0) == per_sample),
              "sampler_step: out must be dense with the batch dimension outermost, got strides ",
              out.strides());

  check_like_out("x", a.x, out, batch, per_sample);
  if (a.model_output.has_value()) {
    check_like_out("model_output", *a.model_output, out,
                   a.guidance_scale.has_value() ? 2 * batch : batch, per_sample);
  } else {
    TORCH_CHECK(!a.guidance_scale.has_value(),
                "sampler_step: guidance_scale needs model_output (the uncond/cond halves)");
  }
  for (const auto& [name, t] : {std::pair{"prev", &a.prev}, std::pair{"prev2", &a.prev2},
                                std::pair{"noise", &a.noise}, std::pair{"x0_out", &a.x0_out}}) {
    if (t->has_value()) {
      check_like_out(name, **t, out, batch, per_sample);
    }
  }

  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor& coefs = a.coefs;
  TORCH_CHECK(coefs.scalar_type() == acc && coefs.dim() == 2 && coefs.size(1) == NUM_COEFS &&
                  coefs.size(0) >= 1 && coefs.is_contiguous() && coefs.device() == out.device(),
              "sampler_step: coefs must be a contiguous (rows, ", int(NUM_COEFS), ") ", acc,
              " tensor on ", out.device(), ", got ", coefs.scalar_type(), " ", coefs.sizes(),
              " on ", coefs.device());
  if (a.index.has_value()) {
    const at::Tensor& index = *a.index;
    TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == batch &&
                    index.is_contiguous() && index.device() == out.device(),
                "sampler_step: index must be a contiguous (", batch, ",) int64 tensor on ",
                out.device());
  } else {
    TORCH_CHECK(coefs.size(0) == batch || coefs.size(0) == 1,
                "sampler_step: without index, coefs needs 1 or ", batch,
                " rows (one per sample), got ", coefs.size(0));
  }
  if (a.seed.has_value()) {
    TORCH_CHECK(!a.noise.has_value(), "sampler_step: give noise or seed, not both");
    const at::Tensor& seed = *a.seed;
    TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1 &&
                    seed.device() == out.device(),
                "sampler_step: seed must be a one-element int64 tensor on ", out.device());
  }
}

void sampler_step(const at::Tensor& x, const std::optional<at::Tensor>& model_output,
                  const at::Tensor& coefs, const std::optional<at::Tensor>& index,
                  const std::optional<at::Tensor>& prev, const std::optional<at::Tensor>& prev2,
                  const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                  std::optional<double> guidance_scale, std::optional<double> clip_min,
                  std::optional<double> clip_max, const at::Tensor& out,
                  const std::optional<at::Tensor>& x0_out) {
  const SamplerStepArgs args{x, model_output, coefs, index, prev, prev2, noise,
                             seed, guidance_scale, clip_min, clip_max, out, x0_out};
  check_args(args);
  if (out.numel() == 0) {
    return;
  }
  if (out.is_cuda()) {
#ifdef FASTDIFF_WITH_CUDA
    sampler_step_cuda(args);
#else
    TORCH_CHECK(false, "sampler_step: got tensors on ", out.device(),
                " but fastdiff._C was built without CUDA kernels (rebuild with a CUDA build of "
                "torch and nvcc, FASTDIFF_BUILD_CUDA=1, or use the 'triton' or 'torch' backend)");
#endif
  } else {
    TORCH_CHECK(out.is_cpu(), "sampler_step: unsupported device ", out.device());
    sampler_step_cpu(args);
  }
}

// ---------------------------------------------------------------------------
// group_norm_silu
// ---------------------------------------------------------------------------

constexpr const char* kGroupNorm = "group_norm_silu";

// t (N, C, *spatial) is dense with the channels innermost (strides C S, 1,
// and C times the later spatial sizes); as for is_contiguous, dimensions of
// size 1 may have any stride.
bool is_channels_last_dense(const at::Tensor& t) {
  int64_t expected = t.size(1);
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) {
      return false;
    }
    expected *= t.size(d);
  }
  return (t.size(1) == 1 || t.stride(1) == 1) && (t.size(0) == 1 || t.stride(0) == expected);
}

// Checks x and num_groups; x_contiguous tells which layout the other
// x-shaped tensors must share.
GroupNormShape group_norm_shape(const at::Tensor& x, int64_t num_groups, bool& x_contiguous) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              "group_norm_silu: x must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(x.dim() >= 2, "group_norm_silu: x must be (N, C, *spatial), got sizes ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK(num_groups >= 1 && C % num_groups == 0, "group_norm_silu: num_groups (", num_groups,
              ") must be positive and divide the channels of x (", C, ")");
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    S *= x.size(d);
  }
  x_contiguous = x.is_contiguous();
  TORCH_CHECK(x_contiguous || is_channels_last_dense(x),
              "group_norm_silu: x must be contiguous or channels_last (channels innermost), got "
              "sizes ",
              x.sizes(), " and strides ", x.strides());
  // With one position per channel both layouts are the same memory map.
  return {N, C, S, num_groups, C / num_groups, !x_contiguous || S == 1};
}

void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                  bool x_contiguous) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device() &&
                  t.sizes() == x.sizes(),
              op, ": ", name, " must match x (", x.scalar_type(), " ", x.sizes(), " on ",
              x.device(), "), got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(x_contiguous ? t.is_contiguous() : is_channels_last_dense(t), op, ": ", name,
              " must be in x's memory layout (", x_contiguous ? "contiguous" : "channels_last",
              "), got strides ", t.strides());
}

// A per-channel tensor: absent, or contiguous with the given sizes, in the
// opmath dtype, on x's device.
void check_small(const char* op, const char* name, const std::optional<at::Tensor>& t,
                 const std::vector<int64_t>& sizes, const at::Tensor& x) {
  if (!t.has_value()) {
    return;
  }
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t->scalar_type() == acc && t->sizes() == at::IntArrayRef(sizes) &&
                  t->is_contiguous() && t->device() == x.device(),
              op, ": ", name, " must be a contiguous ", at::IntArrayRef(sizes), " ",
              acc, " tensor on ", x.device(), ", got ", t->scalar_type(), " ", t->sizes(),
              t->is_contiguous() ? "" : " (not contiguous)", " on ", t->device());
}

void check_params(const GroupNormShape& sh, const at::Tensor& x,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& emb, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& shift) {
  check_small(kGroupNorm, "weight", weight, {sh.C}, x);
  check_small(kGroupNorm, "bias", bias, {sh.C}, x);
  check_small(kGroupNorm, "emb", emb, {sh.N, sh.C}, x);
  check_small(kGroupNorm, "scale", scale, {sh.N, sh.C}, x);
  check_small(kGroupNorm, "shift", shift, {sh.N, sh.C}, x);
}

bool parse_act(const char* op, const std::string& act) {
  TORCH_CHECK(act == "silu" || act == "none", op, ": act must be 'silu' or 'none', got '", act,
              "'");
  return act == "silu";
}

void group_norm_silu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& emb,
                         const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, int64_t num_groups, double eps,
                         const std::string& act, const at::Tensor& y, const at::Tensor& mean,
                         const at::Tensor& rstd) {
  bool x_contiguous = true;
  const GroupNormShape sh = group_norm_shape(x, num_groups, x_contiguous);
  const bool silu = parse_act(kGroupNorm, act);
  TORCH_CHECK(eps >= 0, "group_norm_silu: eps must be >= 0, got ", eps);
  check_params(sh, x, weight, bias, emb, scale, shift);
  check_like_x(kGroupNorm, "y", y, x, x_contiguous);
  check_small(kGroupNorm, "mean", mean, {sh.N, sh.G}, x);
  check_small(kGroupNorm, "rstd", rstd, {sh.N, sh.G}, x);
  if (x.numel() == 0) {
    mean.zero_();
    rstd.zero_();
    return;
  }
  const GroupNormFwdArgs args{sh, x, weight, bias, emb, scale, shift, eps, silu, y, mean, rstd};
  if (x.is_cuda()) {
#ifdef FASTDIFF_WITH_CUDA
    group_norm_fwd_cuda(args);
#else
    TORCH_CHECK(false, "group_norm_silu: got tensors on ", x.device(),
                " but fastdiff._C was built without CUDA kernels (rebuild with a CUDA build of "
                "torch and nvcc, FASTDIFF_BUILD_CUDA=1, or use the 'triton' or 'torch' backend)");
#endif
  } else {
    TORCH_CHECK(x.is_cpu(), "group_norm_silu: unsupported device ", x.device());
    group_norm_fwd_cpu(args);
  }
}

void group_norm_silu_bwd(const at::Tensor& dy, const at::Tensor& x,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& emb,
                         const std::optional<at::Tensor>& scale,
                         const std::optional<at::Tensor>& shift, const at::Tensor& mean,
                         const at::Tensor& rstd, int64_t num_groups, const std::string& act,
                         const std::optional<at::Tensor>& dx,
                         const std::optional<at::Tensor>& dweight,
                         const std::optional<at::Tensor>& dbias,
                         const std::optional<at::Tensor>& demb,
                         const std::optional<at::Tensor>& dscale,
                         const std::optional<at::Tensor>& dshift) {
  bool x_contiguous = true;
  const GroupNormShape sh = group_norm_shape(x, num_groups, x_contiguous);
  const bool silu = parse_act(kGroupNorm, act);
  check_params(sh, x, weight, bias, emb, scale, shift);
  check_like_x(kGroupNorm, "dy", dy, x, x_contiguous);
  check_small(kGroupNorm, "mean", mean, {sh.N, sh.G}, x);
  check_small(kGroupNorm, "rstd", rstd, {sh.N, sh.G}, x);
  if (dx.has_value()) {
    check_like_x(kGroupNorm, "dx", *dx, x, x_contiguous);
  }
  check_small(kGroupNorm, "dweight", dweight, {sh.C}, x);
  check_small(kGroupNorm, "dbias", dbias, {sh.C}, x);
  check_small(kGroupNorm, "demb", demb, {sh.N, sh.C}, x);
  check_small(kGroupNorm, "dscale", dscale, {sh.N, sh.C}, x);
  check_small(kGroupNorm, "dshift", dshift, {sh.N, sh.C}, x);
  if (x.numel() == 0) {  // empty batch or no positions: every gradient is 0
    for (const auto* g : {&dx, &dweight, &dbias, &demb, &dscale, &dshift}) {
      if (g->has_value()) {
        (*g)->zero_();
      }
    }
    return;
  }
  const GroupNormBwdArgs args{sh,   dy,   x,    weight, bias,  emb,  scale,   shift, mean,
                              rstd, silu, dx, dweight, dbias, demb, dscale, dshift};
  if (x.is_cuda()) {
#ifdef FASTDIFF_WITH_CUDA
    group_norm_bwd_cuda(args);
#else
    TORCH_CHECK(false, "group_norm_silu: got tensors on ", x.device(),
                " but fastdiff._C was built without CUDA kernels (rebuild with a CUDA build of "
                "torch and nvcc, FASTDIFF_BUILD_CUDA=1, or use the 'triton' or 'torch' backend)");
#endif
  } else {
    TORCH_CHECK(x.is_cpu(), "group_norm_silu: unsupported device ", x.device());
    group_norm_bwd_cpu(args);
  }
}

// The op bodies of the cpu / cuda backends in one call each: canonical layout,
// opmath per-channel inputs, outputs allocated here.  They compute what
// fastdiff/ops/group_norm.py's _forward / _backward_body compute around the
// kernels above, without a Python step per tensor: at small sizes those steps
// cost more than the kernels, the more so between a model's other ops (cold
// caches).

// channels_last(_3d) when x is in it (and not also plain contiguous), else
// contiguous: the layout the outputs keep.
at::MemoryFormat layout_of(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

at::ScalarType opmath_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::optional<at::Tensor> as_opmath(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) {
    return std::nullopt;
  }
  return t->to(acc).contiguous();
}

// What a norm backward body reads and writes: x and dy in x's layout, then one
// gradient buffer per input -- dx like x, an opmath buffer per wanted, present
// per-channel input (params, in output_mask order after x).
struct NormBackward {
  at::ScalarType acc;
  at::Tensor x, dy;
  std::vector<const std::optional<at::Tensor>*> params;
  std::vector<std::optional<at::Tensor>> grads;

  NormBackward(const char* op, const at::Tensor& dy_, const at::Tensor& x_,
               std::vector<const std::optional<at::Tensor>*> params_,
               const std::vector<bool>& output_mask)
      : acc(opmath_of(x_)), params(std::move(params_)), grads(params.size() + 1) {
    TORCH_CHECK(output_mask.size() == grads.size(), op, ": output_mask must have ", grads.size(),
                " entries, got ", output_mask.size());
    const at::MemoryFormat fmt = layout_of(x_);
    x = x_.contiguous(fmt);
    dy = dy_.to(x_.scalar_type()).contiguous(fmt);
    if (output_mask[0]) {
      grads[0] = at::empty_like(x);
    }
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& t = *params[i];
      if (output_mask[i + 1] && t.has_value() && t->defined()) {
        grads[i + 1] = at::empty(t->sizes(), x.options().dtype(acc));
      }
    }
  }

  // The op's outputs: each gradient in its input's dtype, a 0-element tensor where
  // the input is absent or its gradient not wanted.
  std::vector<at::Tensor> results() const {
    std::vector<at::Tensor> out;
    out.reserve(grads.size());
    out.push_back(grads[0].has_value() ? *grads[0] : at::empty({0}, x.options()));
    for (size_t i = 0; i < params.size(); ++i) {
      out.push_back(grads[i + 1].has_value() ? grads[i + 1]->to((*params[i])->scalar_type())
                                             : at::empty({0}, x.options()));
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& emb,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
    int64_t num_groups, double eps, const std::string& act) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_silu: x must be (N, C, *spatial), got sizes ", x.sizes());
  const at::ScalarType acc = opmath_of(x);
  const at::Tensor xc = x.contiguous(layout_of(x));
  at::Tensor y = at::empty_like(xc);
  at::Tensor mean = at::empty({x.size(0), num_groups}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({x.size(0), num_groups}, x.options().dtype(acc));
  group_norm_silu_fwd(xc, as_opmath(weight, acc), as_opmath(bias, acc), as_opmath(emb, acc),
                      as_opmath(scale, acc), as_opmath(shift, acc), num_groups, eps, act, y, mean,
                      rstd);
  return {y, mean, rstd};
}

// Gradients of (x, weight, bias, emb, scale, shift), each in its input's dtype;
// a 0-element tensor for an input that is absent or not in output_mask.
std::vector<at::Tensor> group_norm_silu_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& emb,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups, const std::string& act,
    const std::vector<bool>& output_mask) {
  NormBackward b(kGroupNorm, dy, x, {&weight, &bias, &emb, &scale, &shift}, output_mask);
  group_norm_silu_bwd(b.dy, b.x, as_opmath(weight, b.acc), as_opmath(bias, b.acc),
                      as_opmath(emb, b.acc), as_opmath(scale, b.acc), as_opmath(shift, b.acc), mean,
                      rstd, num_groups, act, b.grads[0], b.grads[1], b.grads[2], b.grads[3],
                      b.grads[4], b.grads[5]);
  return b.results();
}

// ---------------------------------------------------------------------------
// rms_norm_silu
// ---------------------------------------------------------------------------

constexpr const char* kRmsNorm = "rms_norm_silu";

// Checks x; x_contiguous tells which layout the other x-shaped tensors must
// share.
RmsNormShape rms_norm_shape(const at::Tensor& x, bool& x_contiguous) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat ||
                  dtype == at::kDouble,
              "rms_norm_silu: x must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(x.dim() >= 2, "rms_norm_silu: x must be (N, C, *spatial), got sizes ", x.sizes());
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    S *= x.size(d);
  }
  x_contiguous = x.is_contiguous();
  TORCH_CHECK(x_contiguous || is_channels_last_dense(x),
              "rms_norm_silu: x must be contiguous or channels_last (channels innermost), got "
              "sizes ",
              x.sizes(), " and strides ", x.strides());
  // With one position per sample both layouts are the same memory map.
  return {x.size(0), x.size(1), S, !x_contiguous || S == 1};
}

// rstd: contiguous (N, *spatial) in the opmath dtype on x's device.
void check_rstd(const at::Tensor& rstd, const at::Tensor& x) {
  std::vector<int64_t> sizes{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) {
    sizes.push_back(x.size(d));
  }
  check_small(kRmsNorm, "rstd", rstd, sizes, x);
}

void check_rms_params(const RmsNormShape& sh, const at::Tensor& x,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& shift) {
  check_small(kRmsNorm, "weight", weight, {sh.C}, x);
  check_small(kRmsNorm, "scale", scale, {sh.N, sh.C}, x);
  check_small(kRmsNorm, "shift", shift, {sh.N, sh.C}, x);
}

void rms_norm_silu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& shift, double eps, const std::string& act,
                       const at::Tensor& y, const at::Tensor& rstd) {
  bool x_contiguous = true;
  const RmsNormShape sh = rms_norm_shape(x, x_contiguous);
  const bool silu = parse_act(kRmsNorm, act);
  TORCH_CHECK(eps >= 0, "rms_norm_silu: eps must be >= 0, got ", eps);
  check_rms_params(sh, x, weight, scale, shift);
  check_like_x(kRmsNorm, "y", y, x, x_contiguous);
  check_rstd(rstd, x);
  TORCH_CHECK(x.is_cpu(), "rms_norm_silu: fastdiff._C has CPU kernels only (got tensors on ",
              x.device(), "); GPUs run the 'triton' backend");
  if (x.numel() == 0) {  // no samples or positions (rstd empty), or no channels (norm 0)
    rstd.fill_(1.0 / eps);
    return;
  }
  rms_norm_fwd_cpu({sh, x, weight, scale, shift, eps, silu, y, rstd});
}

void rms_norm_silu_bwd(const at::Tensor& dy, const at::Tensor& x,
                       const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& shift, const at::Tensor& rstd, double eps,
                       const std::string& act, const std::optional<at::Tensor>& dx,
                       const std::optional<at::Tensor>& dweight,
                       const std::optional<at::Tensor>& dscale,
                       const std::optional<at::Tensor>& dshift) {
  bool x_contiguous = true;
  const RmsNormShape sh = rms_norm_shape(x, x_contiguous);
  const bool silu = parse_act(kRmsNorm, act);
  TORCH_CHECK(eps >= 0, "rms_norm_silu: eps must be >= 0, got ", eps);
  check_rms_params(sh, x, weight, scale, shift);
  check_like_x(kRmsNorm, "dy", dy, x, x_contiguous);
  check_rstd(rstd, x);
  if (dx.has_value()) {
    check_like_x(kRmsNorm, "dx", *dx, x, x_contiguous);
  }
  check_small(kRmsNorm, "dweight", dweight, {sh.C}, x);
  check_small(kRmsNorm, "dscale", dscale, {sh.N, sh.C}, x);
  check_small(kRmsNorm, "dshift", dshift, {sh.N, sh.C}, x);
  TORCH_CHECK(x.is_cpu(), "rms_norm_silu: fastdiff._C has CPU kernels only (got tensors on ",
              x.device(), "); GPUs run the 'triton' backend");
  if (x.numel() == 0) {  // no samples, channels or positions: every gradient is 0
    for (const auto* g : {&dx, &dweight, &dscale, &dshift}) {
      if (g->has_value()) {
        (*g)->zero_();
      }
    }
    return;
  }
  rms_norm_bwd_cpu({sh, dy, x, weight, scale, shift, rstd, eps, silu, dx, dweight, dscale, dshift});
}

// The CPU body of fastdiff::rms_norm_silu in one call each way (see
// group_norm_silu_forward): (y, rstd), and the gradients of (x, weight, scale,
// shift) in their inputs' dtypes (0-element where absent or not wanted).
std::tuple<at::Tensor, at::Tensor> rms_norm_silu_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, double eps,
    const std::string& act) {
  TORCH_CHECK(x.dim() >= 2, "rms_norm_silu: x must be (N, C, *spatial), got sizes ", x.sizes());
  const at::ScalarType acc = opmath_of(x);
  const at::Tensor xc = x.contiguous(layout_of(x));
  at::Tensor y = at::empty_like(xc);
  std::vector<int64_t> rstd_sizes{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) {
    rstd_sizes.push_back(x.size(d));
  }
  at::Tensor rstd = at::empty(rstd_sizes, x.options().dtype(acc));
  rms_norm_silu_fwd(xc, as_opmath(weight, acc), as_opmath(scale, acc), as_opmath(shift, acc), eps,
                    act, y, rstd);
  return {y, rstd};
}

std::vector<at::Tensor> rms_norm_silu_backward(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    double eps, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
    const at::Tensor& rstd, const std::string& act, const std::vector<bool>& output_mask) {
  NormBackward b(kRmsNorm, dy, x, {&weight, &scale, &shift}, output_mask);
  rms_norm_silu_bwd(b.dy, b.x, as_opmath(weight, b.acc), as_opmath(scale, b.acc),
                    as_opmath(shift, b.acc), rstd.contiguous(), eps, act, b.grads[0], b.grads[1],
                    b.grads[2], b.grads[3]);
  return b.results();
}

// ---------------------------------------------------------------------------
// Eager autograd in C++: the norms' forward body plus an autograd node whose
// backward is the fused backward body, so an eager training step crosses into
// Python once per norm (the forward call) instead of twice plus the Python
// autograd.Function machinery (~100 us per norm per step on CPU).  The Python
// op layer takes this path only where the registered op would run these same
// bodies (the cpu / cuda backend, eager mode, nothing tracing): outputs and
// gradients are the registered op's bit for bit.
// ---------------------------------------------------------------------------

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

at::Tensor or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// Which inputs want a gradient.  saved[i] is forward input i (undefined where
// an optional one was absent); the node has one input edge per present tensor,
// so edge numbers skip the absent ones.
std::vector<bool> wanted_grads(AutogradContext* ctx, const variable_list& saved, size_t inputs) {
  std::vector<bool> mask(inputs, false);
  size_t edge = 0;
  for (size_t i = 0; i < inputs; ++i) {
    if (saved[i].defined()) {
      mask[i] = ctx->needs_input_grad(edge++);
    }
  }
  return mask;
}

// The fused backward kernels are not differentiable.  Under create_graph=True
// (grad mode on inside backward) with any input of the backward requiring
// grad, the gradients get a node that raises when differentiated, as Python's
// @once_differentiable does: a double backward fails loudly instead of
// silently missing the second-order terms.
void once_differentiable(const char* op, variable_list& grads, const variable_list& inputs) {
  if (!at::GradMode::is_enabled()) {
    return;
  }
  bool recorded = false;
  for (const auto& t : inputs) {
    recorded = recorded || (t.defined() && t.requires_grad());
  }
  if (!recorded) {
    return;
  }
  std::vector<size_t> where;
  variable_list aliases;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].defined()) {
      where.push_back(i);
      aliases.push_back(grads[i].detach().requires_grad_(true));
    }
  }
  auto error = std::make_shared<torch::autograd::DelayedError>(
      std::string("fastdiff.") + op +
          ": no double backward (its backward runs fused kernels that autograd cannot "
          "differentiate); create_graph=True through it is not supported",
      static_cast<int64_t>(aliases.size()));
  variable_list raising = (*error)(std::move(aliases));
  for (size_t k = 0; k < where.size(); ++k) {
    grads[where[k]] = raising[k];
  }
}

// The node's gradients: g[i] for each wanted tensor input i (the first
// mask.size() forward arguments), undefined for the other ones of the
// forward's `arguments` (not wanted, absent, or not tensors), then made
// once-differentiable against grad_output and the saved inputs.
variable_list node_grads(const char* op, const std::vector<at::Tensor>& g,
                         const std::vector<bool>& mask, size_t arguments,
                         const at::Tensor& grad_output, const variable_list& saved) {
  variable_list grads(arguments);
  variable_list inputs{grad_output};
  for (size_t i = 0; i < mask.size(); ++i) {
    if (mask[i]) {
      grads[i] = g[i];
    }
    inputs.push_back(saved[i]);
  }
  once_differentiable(op, grads, inputs);
  return grads;
}

// group_norm_silu: forward inputs (x, weight, bias, emb, scale, shift,
// num_groups, eps, act); y is the one output (mean / rstd stay saved here).
struct GroupNormSiluEager : public torch::autograd::Function<GroupNormSiluEager> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& emb,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift, int64_t num_groups,
                            double eps, const std::string& act) {
    auto [y, mean, rstd] =
        group_norm_silu_forward(x, weight, bias, emb, scale, shift, num_groups, eps, act);
    ctx->save_for_backward({x, or_undefined(weight), or_undefined(bias), or_undefined(emb),
                            or_undefined(scale), or_undefined(shift), mean, rstd});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["act"] = act;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<bool> mask = wanted_grads(ctx, saved, 6);
    const std::vector<at::Tensor> g = group_norm_silu_backward(
        grad_outputs[0], saved[0], present(saved[1]), present(saved[2]), present(saved[3]),
        present(saved[4]), present(saved[5]), saved[6], saved[7],
        ctx->saved_data["num_groups"].toInt(), ctx->saved_data["act"].toStringRef(), mask);
    return node_grads("group_norm_silu", g, mask, 9, grad_outputs[0], saved);
  }
};

at::Tensor group_norm_silu_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& emb,
                                    const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& shift, int64_t num_groups,
                                    double eps, const std::string& act) {
  return GroupNormSiluEager::apply(x, weight, bias, emb, scale, shift, num_groups, eps, act);
}

// rms_norm_silu: forward inputs (x, weight, scale, shift, eps, act).
struct RmsNormSiluEager : public torch::autograd::Function<RmsNormSiluEager> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift, double eps,
                            const std::string& act) {
    auto [y, rstd] = rms_norm_silu_forward(x, weight, scale, shift, eps, act);
    ctx->save_for_backward(
        {x, or_undefined(weight), or_undefined(scale), or_undefined(shift), rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<bool> mask = wanted_grads(ctx, saved, 4);
    const std::vector<at::Tensor> g = rms_norm_silu_backward(
        grad_outputs[0], saved[0], present(saved[1]), ctx->saved_data["eps"].toDouble(),
        present(saved[2]), present(saved[3]), saved[4], ctx->saved_data["act"].toStringRef(),
        mask);
    return node_grads("rms_norm_silu", g, mask, 6, grad_outputs[0], saved);
  }
};

at::Tensor rms_norm_silu_autograd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& scale,
                                  const std::optional<at::Tensor>& shift, double eps,
                                  const std::string& act) {
  return RmsNormSiluEager::apply(x, weight, scale, shift, eps, act);
}

// Words (w0, w1, w2, w3) of noise elements offset .. offset + numel - 1 of
// stream seed, as an int64 (numel, 4) tensor holding the uint32 values.
at::Tensor philox_words_cpu(uint64_t seed, int64_t numel, uint64_t offset) {
  TORCH_CHECK(numel >= 0, "numel must be >= 0");
  at::Tensor words = at::empty({numel, 4}, at::kLong);
  int64_t* w = words.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < numel; ++i) {
    const philox::Words r = philox::noise_words(seed, offset + static_cast<uint64_t>(i));
    w[4 * i + 0] = r.w0;
    w[4 * i + 1] = r.w1;
    w[4 * i + 2] = r.w2;
    w[4 * i + 3] = r.w3;
  }
  return words;
}

// Noise elements offset .. offset + numel - 1 of stream seed (float32, (numel,)).
at::Tensor philox_normal_cpu(uint64_t seed, int64_t numel, uint64_t offset) {
  TORCH_CHECK(numel >= 0, "numel must be >= 0");
  at::Tensor z = at::empty({numel}, at::kFloat);
  float* p = z.mutable_data_ptr<float>();
  for (int64_t i = 0; i < numel; ++i) {
    p[i] = philox::normal(seed, offset + static_cast<uint64_t>(i));
  }
  return z;
}

bool has_cuda() {
#ifdef FASTDIFF_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fastdiff

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fastdiff C++/CUDA kernels (use them through fastdiff.ops)";
  m.def("sampler_step", &fastdiff::sampler_step,
        "Fused sampler update into out (and x0_out); see fastdiff.reference.sampler_step.",
        py::arg("x"), py::arg("model_output"), py::arg("coefs"), py::arg("index"),
        py::arg("prev"), py::arg("prev2"), py::arg("noise"), py::arg("seed"),
        py::arg("guidance_scale"), py::arg("clip_min"), py::arg("clip_max"), py::arg("out"),
        py::arg("x0_out"), py::call_guard<py::gil_scoped_release>());
  m.def("group_norm_silu_fwd", &fastdiff::group_norm_silu_fwd,
        "GroupNorm + emb + scale-shift + act into y, mean, rstd; see "
        "fastdiff.reference.group_norm.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("emb"), py::arg("scale"),
        py::arg("shift"), py::arg("num_groups"), py::arg("eps"), py::arg("act"), py::arg("y"),
        py::arg("mean"), py::arg("rstd"), py::call_guard<py::gil_scoped_release>());
  m.def("group_norm_silu_bwd", &fastdiff::group_norm_silu_bwd,
        "Gradients of group_norm_silu_fwd into the given (non-None) outputs.", py::arg("dy"),
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("emb"), py::arg("scale"),
        py::arg("shift"), py::arg("mean"), py::arg("rstd"), py::arg("num_groups"), py::arg("act"),
        py::arg("dx"), py::arg("dweight"), py::arg("dbias"), py::arg("demb"), py::arg("dscale"),
        py::arg("dshift"), py::call_guard<py::gil_scoped_release>());
  m.def("group_norm_silu_forward", &fastdiff::group_norm_silu_forward,
        "The cpu / cuda body of fastdiff::group_norm_silu: (y, mean, rstd) allocated here.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("emb"), py::arg("scale"),
        py::arg("shift"), py::arg("num_groups"), py::arg("eps"), py::arg("act"),
        py::call_guard<py::gil_scoped_release>());
  m.def("group_norm_silu_backward", &fastdiff::group_norm_silu_backward,
        "The cpu / cuda body of fastdiff::group_norm_silu_backward: the six gradients "
        "(0-element tensors where not wanted) allocated here.",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("emb"),
        py::arg("scale"), py::arg("shift"), py::arg("mean"), py::arg("rstd"),
        py::arg("num_groups"), py::arg("act"), py::arg("output_mask"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm_silu_forward", &fastdiff::rms_norm_silu_forward,
        "The CPU body of fastdiff::rms_norm_silu: (y, rstd) allocated here.", py::arg("x"),
        py::arg("weight"), py::arg("scale"), py::arg("shift"), py::arg("eps"), py::arg("act"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm_silu_backward", &fastdiff::rms_norm_silu_backward,
        "The CPU body of fastdiff::rms_norm_silu_backward: the four gradients (0-element "
        "tensors where not wanted) allocated here.",
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("scale"),
        py::arg("shift"), py::arg("rstd"), py::arg("act"), py::arg("output_mask"),
        py::call_guard<py::gil_scoped_release>());
  m.def("group_norm_silu_autograd", &fastdiff::group_norm_silu_autograd,
        "Eager training path of fastdiff::group_norm_silu: y from the cpu / cuda body, with "
        "an autograd node whose backward is the fused backward body.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("emb"), py::arg("scale"),
        py::arg("shift"), py::arg("num_groups"), py::arg("eps"), py::arg("act"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm_silu_autograd", &fastdiff::rms_norm_silu_autograd,
        "Eager training path of fastdiff::rms_norm_silu (CPU): y, with an autograd node "
        "whose backward is the fused backward body.",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"), py::arg("eps"),
        py::arg("act"), py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm_silu_fwd", &fastdiff::rms_norm_silu_fwd,
        "RMSNorm (F.normalize over C x sqrt(C) weight) + scale-shift + act into y, rstd; see "
        "fastdiff.reference.rms_norm.",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"), py::arg("eps"),
        py::arg("act"), py::arg("y"), py::arg("rstd"), py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm_silu_bwd", &fastdiff::rms_norm_silu_bwd,
        "Gradients of rms_norm_silu_fwd into the given (non-None) outputs.", py::arg("dy"),
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("shift"), py::arg("rstd"),
        py::arg("eps"), py::arg("act"), py::arg("dx"), py::arg("dweight"), py::arg("dscale"),
        py::arg("dshift"), py::call_guard<py::gil_scoped_release>());
  m.def("has_cuda", &fastdiff::has_cuda, "True when built with the CUDA kernels.");
  m.def("_philox_words_cpu", &fastdiff::philox_words_cpu,
        "Debug: Philox4x32-10 words of noise elements [offset, offset + numel), (numel, 4) int64.",
        py::arg("seed"), py::arg("numel"), py::arg("offset") = 0);
  m.def("_philox_normal_cpu", &fastdiff::philox_normal_cpu,
        "Debug: noise elements [offset, offset + numel) of stream seed as float32.",
        py::arg("seed"), py::arg("numel"), py::arg("offset") = 0);
}
