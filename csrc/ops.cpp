// Torch bindings of the CUDA kernels: the pyeuler::cuda_* op schemas and their CUDA
// implementations, which validate the tensors, allocate outputs and workspaces through
// torch's caching allocator, and call the C ABI of kernels/pyeuler_kernels.h on the current
// stream.  Semantics: pyeuler/ops/primitives.py.
//
// Only device-generic c10 headers are used (no ATen/cuda, c10/cuda), so this file also
// compiles against a CPU-only torch; .ci/build_kernels.sh syntax-checks it that way.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "pyeuler_kernels.h"

namespace pyeuler {
namespace {

using at::Tensor;

// ---- plumbing ---------------------------------------------------------------------------

// The current CUDA stream of `device`, via the device-generic guard interface.
cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl cuda_guard(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(cuda_guard.getStream(device).native_handle());
}

void check_launch(cudaError_t err, const char* primitive) {
  TORCH_CHECK(err == cudaSuccess, "pyeuler.cuda.", primitive, ": kernel launch failed: ",
              cudaGetErrorString(err));
}

pyeuler_dtype_t kernel_dtype(at::ScalarType dtype, const char* name) {
  switch (dtype) {
    case at::kFloat: return PYEULER_DTYPE_FLOAT32;
    case at::kHalf: return PYEULER_DTYPE_FLOAT16;
    case at::kBFloat16: return PYEULER_DTYPE_BFLOAT16;
    default:
      TORCH_CHECK_TYPE(false, "pyeuler.cuda: ", name,
                       " must be float32, float16 or bfloat16, got ", dtype);
  }
}

pyeuler_dtype_t kernel_dtype(const Tensor& t, const char* name) {
  return kernel_dtype(t.scalar_type(), name);
}

// ---- activations: (N, C, *spatial) in one of the two dense layouts ----------------------

bool is_dense_in_layout(const Tensor& t, bool channels_last) {
  return channels_last ? t.movedim(1, -1).is_contiguous() : t.is_contiguous();
}

// Channels-last when that is x's dense layout and differs from channels-first.
bool is_channels_last(const Tensor& x) {
  return !x.is_contiguous() && is_dense_in_layout(x, /*channels_last=*/true);
}

// x itself when the kernels can read it, else a contiguous copy.
Tensor as_kernel_layout(const Tensor& x) {
  return x.is_contiguous() || is_channels_last(x) ? x : x.contiguous();
}

// A new tensor shaped like `like` in its kernel layout.
Tensor empty_in_layout_of(const Tensor& like, at::ScalarType dtype) {
  const auto options = like.options().dtype(dtype);
  if (!is_channels_last(like)) return at::empty(like.sizes(), options);
  std::vector<int64_t> nsc(like.sizes().begin(), like.sizes().end());
  nsc.erase(nsc.begin() + 1);
  nsc.push_back(like.size(1));
  return at::empty(nsc, options).movedim(-1, 1);
}

// `t` in the layout of `like` (copied only when it is not already).
Tensor in_layout_of(const Tensor& t, const Tensor& like) {
  if (is_dense_in_layout(t, is_channels_last(like))) return t;
  return empty_in_layout_of(like, t.scalar_type()).copy_(t);
}

void check_activation(const Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "pyeuler.cuda: ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, "pyeuler.cuda: ", name,
              " must be (N, C, *spatial) with 0 to 3 spatial dims, got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, "pyeuler.cuda: ", name, " must not be empty");
  kernel_dtype(x, name);
}

// Another activation operand of x's op: same shape, dtype and device, in x's layout.
// `x_name`: x's argument name in the op, for the errors.
Tensor companion(const Tensor& t, const Tensor& x, const char* name, at::ScalarType dtype,
                 const char* x_name = "x") {
  TORCH_CHECK(t.device() == x.device(), "pyeuler.cuda: ", name, " is on ", t.device(), " but ",
              x_name, " is on ", x.device());
  TORCH_CHECK(t.sizes() == x.sizes(), "pyeuler.cuda: ", name, " has shape ", t.sizes(), " but ",
              x_name, " has shape ", x.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "pyeuler.cuda: ", name, " must be ", dtype,
                   ", got ", t.scalar_type());
  return in_layout_of(t, x);
}

// An optional activation operand (an absent term): a companion of x in x's dtype, or none.
std::optional<Tensor> optional_companion(const std::optional<Tensor>& t, const Tensor& x,
                                         const char* name, const char* x_name = "x") {
  if (!t.has_value()) return std::nullopt;
  return companion(*t, x, name, x.scalar_type(), x_name);
}

pyeuler_geometry_t geometry_of(const Tensor& x) {
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
  return {x.size(0), x.size(1), spatial,
          is_channels_last(x) ? PYEULER_LAYOUT_CHANNELS_LAST : PYEULER_LAYOUT_CHANNELS_FIRST};
}

template <typename T>
T* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

// ---- per-channel coefficients: float32 [C] or [N, C] -------------------------------------

struct Coef {
  Tensor tensor;  // keeps a contiguous copy alive for the launch
  pyeuler_coef_t abi;
};

Coef coef_arg(const Tensor& v, const Tensor& x, const char* name) {
  TORCH_CHECK(v.device() == x.device(), "pyeuler.cuda: ", name, " is on ", v.device(),
              " but x is on ", x.device());
  TORCH_CHECK_TYPE(v.scalar_type() == at::kFloat, "pyeuler.cuda: ", name,
                   " must be float32, got ", v.scalar_type());
  const int64_t n = x.size(0), c = x.size(1);
  const bool per_channel = v.dim() == 1 && v.size(0) == c;
  const bool per_sample = v.dim() == 2 && v.size(0) == n && v.size(1) == c;
  TORCH_CHECK(per_channel || per_sample, "pyeuler.cuda: ", name, " must be [C] = [", c,
              "] or [N, C] = [", n, ", ", c, "], got ", v.sizes());
  Tensor dense = v.contiguous();
  const pyeuler_coef_t abi{dense.data_ptr<float>(), per_sample ? c : 0};
  return {std::move(dense), abi};
}

std::optional<Tensor> mask_arg(const std::optional<Tensor>& mask, const Tensor& x) {
  if (!mask.has_value()) return std::nullopt;
  return companion(*mask, x, "mask", at::kBool);
}

// What both backward reductions read besides x: dy, the ReLU gate and the coefficients.
struct ReduceOperands {
  Tensor dy;
  std::optional<Tensor> mask;
  Coef scale, shift, center;
  pyeuler_geometry_t geo;
};

ReduceOperands reduce_operands(const Tensor& dy_in, const Tensor& x, const Tensor& scale,
                               const Tensor& shift, const Tensor& center,
                               const std::optional<Tensor>& mask_in, bool per_sample,
                               const char* op) {
  ReduceOperands in{companion(dy_in, x, "dy", x.scalar_type()), mask_arg(mask_in, x),
                    coef_arg(scale, x, "scale"), coef_arg(shift, x, "shift"),
                    coef_arg(center, x, "center"), geometry_of(x)};
  TORCH_CHECK(per_sample || (scale.dim() == 1 && shift.dim() == 1 && center.dim() == 1),
              "pyeuler.cuda.", op, ": scale, shift and center must be [C] when per_sample is "
              "False (sums over N need one coefficient per channel)");
  return in;
}

// Float32 sums: [C], or [N, C] per sample.
Tensor empty_sums(const Tensor& x, const pyeuler_geometry_t& geo, bool per_sample) {
  const auto options = x.options().dtype(at::kFloat);
  return per_sample ? at::empty({geo.n, geo.c}, options) : at::empty({geo.c}, options);
}

const uint8_t* mask_data(const std::optional<Tensor>& mask) {
  return mask.has_value() ? reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>()) : nullptr;
}

Tensor workspace(size_t bytes, const Tensor& x) {
  return at::empty({int64_t(bytes)}, x.options().dtype(at::kByte));
}

// ---- the primitives ----------------------------------------------------------------------

std::tuple<Tensor, Tensor> norm_stats(const Tensor& x_in, int64_t groups) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  TORCH_CHECK(groups >= 0 && (groups == 0 || x.size(1) % groups == 0),
              "pyeuler.cuda.norm_stats: groups must be 0 (BatchNorm) or divide C = ", x.size(1),
              ", got ", groups);
  const c10::DeviceGuard guard(x.device());
  const pyeuler_geometry_t geo = geometry_of(x);
  const auto options = x.options().dtype(at::kFloat);
  Tensor mean = groups == 0 ? at::empty({geo.c}, options) : at::empty({geo.n, groups}, options);
  Tensor var = at::empty_like(mean);
  size_t bytes = 0;
  check_launch(pyeuler_norm_stats_workspace_size(geo, groups, &bytes), "norm_stats");
  Tensor scratch = workspace(bytes, x);
  check_launch(pyeuler_norm_stats(x.data_ptr(), kernel_dtype(x, "x"), geo, groups,
                                  mean.data_ptr<float>(), var.data_ptr<float>(),
                                  scratch.data_ptr(), bytes, current_stream(x.device())),
               "norm_stats");
  return {mean, var};
}

// The optional output is an empty tensor when not requested (the Python wrapper maps it to
// None); a schema with a plain Tensor return keeps fake tensors and torch.compile simple.
std::tuple<Tensor, Tensor> affine_act_forward(const Tensor& x_in, const Tensor& scale,
                                              const Tensor& shift,
                                              const std::optional<Tensor>& shortcut_in,
                                              bool relu, bool save_mask) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Coef scale_arg = coef_arg(scale, x, "scale");
  const Coef shift_arg = coef_arg(shift, x, "shift");
  const std::optional<Tensor> shortcut = optional_companion(shortcut_in, x, "shortcut");
  const c10::DeviceGuard guard(x.device());
  Tensor y = empty_in_layout_of(x, x.scalar_type());
  Tensor mask = save_mask ? empty_in_layout_of(x, at::kBool)
                          : at::empty({0}, x.options().dtype(at::kBool));
  uint8_t* mask_out = save_mask ? reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  check_launch(pyeuler_affine_act_forward(x.data_ptr(), data_or_null<const void>(shortcut),
                                          kernel_dtype(x, "x"), geometry_of(x), scale_arg.abi,
                                          shift_arg.abi, relu, y.data_ptr(), mask_out,
                                          current_stream(x.device())),
               "affine_act_forward");
  return {y, mask};
}

// Both first-order reduces: the plain one (y_dtype absent; the third result is undefined), and
// the one that recomputes the gate and also writes y = act(scale * x + shift) in y_dtype and
// x's layout (mask_in absent).  One workspace size serves both (the same partials).
std::tuple<Tensor, Tensor, Tensor> first_order_reduce(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const Tensor& center, const std::optional<Tensor>& mask_in, bool relu, bool per_sample,
    std::optional<at::ScalarType> y_dtype, const char* op) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const ReduceOperands in = reduce_operands(dy_in, x, scale, shift, center, mask_in, per_sample,
                                            op);
  const pyeuler_dtype_t y_kernel_dtype =
      y_dtype.has_value() ? kernel_dtype(*y_dtype, "y_dtype") : PYEULER_DTYPE_FLOAT32;
  const c10::DeviceGuard guard(x.device());
  Tensor sum_g = empty_sums(x, in.geo, per_sample);
  Tensor sum_g_xc = at::empty_like(sum_g);
  size_t bytes = 0;
  check_launch(pyeuler_affine_act_backward_reduce_workspace_size(in.geo, per_sample, &bytes), op);
  Tensor scratch = workspace(bytes, x);
  const cudaStream_t stream = current_stream(x.device());
  if (!y_dtype.has_value()) {
    check_launch(pyeuler_affine_act_backward_reduce(
                     in.dy.data_ptr(), x.data_ptr(), mask_data(in.mask), kernel_dtype(x, "x"),
                     in.geo, in.scale.abi, in.shift.abi, in.center.abi, relu, per_sample,
                     sum_g.data_ptr<float>(), sum_g_xc.data_ptr<float>(), scratch.data_ptr(),
                     bytes, stream),
                 op);
    return {sum_g, sum_g_xc, Tensor()};
  }
  Tensor y = empty_in_layout_of(x, *y_dtype);
  check_launch(pyeuler_affine_act_backward_reduce_recompute(
                   in.dy.data_ptr(), x.data_ptr(), kernel_dtype(x, "x"), in.geo, in.scale.abi,
                   in.shift.abi, in.center.abi, relu, per_sample, sum_g.data_ptr<float>(),
                   sum_g_xc.data_ptr<float>(), y.data_ptr(), y_kernel_dtype, scratch.data_ptr(),
                   bytes, stream),
               op);
  return {sum_g, sum_g_xc, y};
}

std::tuple<Tensor, Tensor> affine_act_backward_reduce(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const Tensor& center, const std::optional<Tensor>& mask_in, bool relu, bool per_sample) {
  const auto sums = first_order_reduce(dy_in, x_in, scale, shift, center, mask_in, relu,
                                       per_sample, std::nullopt, "affine_act_backward_reduce");
  return {std::get<0>(sums), std::get<1>(sums)};
}

std::tuple<Tensor, Tensor, Tensor> affine_act_backward_reduce_recompute(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const Tensor& center, bool relu, bool per_sample, at::ScalarType y_dtype) {
  return first_order_reduce(dy_in, x_in, scale, shift, center, std::nullopt, relu, per_sample,
                            y_dtype, "affine_act_backward_reduce_recompute");
}

std::tuple<Tensor, Tensor> affine_act_backward_apply(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& mask_in, bool relu, const Tensor& a, const Tensor& b,
    const Tensor& c, const Tensor& center, bool want_dshortcut,
    const std::optional<Tensor>& dx_addend_in, const std::optional<Tensor>& dx_addend2_in) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Tensor dy = companion(dy_in, x, "dy", x.scalar_type());
  const std::optional<Tensor> mask = mask_arg(mask_in, x);
  const std::optional<Tensor> dx_addend = optional_companion(dx_addend_in, x, "dx_addend");
  const std::optional<Tensor> dx_addend2 = optional_companion(dx_addend2_in, x, "dx_addend2");
  const Coef scale_arg = coef_arg(scale, x, "scale");
  const Coef shift_arg = coef_arg(shift, x, "shift");
  const Coef a_arg = coef_arg(a, x, "a");
  const Coef b_arg = coef_arg(b, x, "b");
  const Coef c_arg = coef_arg(c, x, "c");
  const Coef center_arg = coef_arg(center, x, "center");
  const c10::DeviceGuard guard(x.device());
  Tensor dx = empty_in_layout_of(x, x.scalar_type());
  Tensor dshortcut = want_dshortcut ? empty_in_layout_of(x, dy.scalar_type())
                                    : at::empty({0}, dy.options());
  check_launch(pyeuler_affine_act_backward_apply(
                   dy.data_ptr(), x.data_ptr(), mask_data(mask), kernel_dtype(x, "x"),
                   geometry_of(x), scale_arg.abi, shift_arg.abi, relu, a_arg.abi, b_arg.abi,
                   c_arg.abi, center_arg.abi, data_or_null<const void>(dx_addend),
                   data_or_null<const void>(dx_addend2), dx.data_ptr(),
                   want_dshortcut ? dshortcut.data_ptr() : nullptr, current_stream(x.device())),
               "affine_act_backward_apply");
  return {dx, dshortcut};
}

Tensor affine_act_backward_apply_ie_update(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& mask_in, bool relu, const Tensor& a, const Tensor& b,
    const Tensor& c, const Tensor& center, const Tensor& residual_in, double step_size,
    double theta, bool residual_is_term) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Tensor dy = companion(dy_in, x, "dy", x.scalar_type());
  const Tensor residual = companion(residual_in, x, "residual", x.scalar_type());
  const std::optional<Tensor> mask = mask_arg(mask_in, x);
  const Coef scale_arg = coef_arg(scale, x, "scale");
  const Coef shift_arg = coef_arg(shift, x, "shift");
  const Coef a_arg = coef_arg(a, x, "a");
  const Coef b_arg = coef_arg(b, x, "b");
  const Coef c_arg = coef_arg(c, x, "c");
  const Coef center_arg = coef_arg(center, x, "center");
  const c10::DeviceGuard guard(x.device());
  Tensor x_new = empty_in_layout_of(x, x.scalar_type());
  check_launch(pyeuler_affine_act_backward_apply_ie_update(
                   dy.data_ptr(), x.data_ptr(), mask_data(mask), kernel_dtype(x, "x"),
                   geometry_of(x), scale_arg.abi, shift_arg.abi, relu, a_arg.abi, b_arg.abi,
                   c_arg.abi, center_arg.abi, residual.data_ptr(), step_size, theta,
                   residual_is_term, x_new.data_ptr(), current_stream(x.device())),
               "affine_act_backward_apply_ie_update");
  return x_new;
}

std::tuple<Tensor, Tensor, Tensor> affine_act_double_backward_reduce(
    const Tensor& ddx_in, const Tensor& dy_in, const Tensor& x_in, const Tensor& scale,
    const Tensor& shift, const Tensor& center, const std::optional<Tensor>& mask_in, bool relu,
    bool per_sample) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Tensor ddx = companion(ddx_in, x, "ddx", x.scalar_type());
  const ReduceOperands in = reduce_operands(dy_in, x, scale, shift, center, mask_in, per_sample,
                                            "affine_act_double_backward_reduce");
  const c10::DeviceGuard guard(x.device());
  Tensor sum_ddx = empty_sums(x, in.geo, per_sample);
  Tensor sum_ddx_xc = at::empty_like(sum_ddx);
  Tensor sum_ddx_g = at::empty_like(sum_ddx);
  size_t bytes = 0;
  check_launch(
      pyeuler_affine_act_double_backward_reduce_workspace_size(in.geo, per_sample, &bytes),
      "affine_act_double_backward_reduce");
  Tensor scratch = workspace(bytes, x);
  check_launch(pyeuler_affine_act_double_backward_reduce(
                   ddx.data_ptr(), in.dy.data_ptr(), x.data_ptr(), mask_data(in.mask),
                   kernel_dtype(x, "x"), in.geo, in.scale.abi, in.shift.abi, in.center.abi, relu,
                   per_sample, sum_ddx.data_ptr<float>(), sum_ddx_xc.data_ptr<float>(),
                   sum_ddx_g.data_ptr<float>(), scratch.data_ptr(), bytes,
                   current_stream(x.device())),
               "affine_act_double_backward_reduce");
  return {sum_ddx, sum_ddx_xc, sum_ddx_g};
}

std::tuple<Tensor, Tensor> affine_act_double_backward_apply(
    const Tensor& ddx_in, const Tensor& dy_in, const Tensor& x_in, const Tensor& scale,
    const Tensor& shift, const std::optional<Tensor>& mask_in, bool relu, const Tensor& a,
    const Tensor& b, const Tensor& p, const Tensor& q, const Tensor& center,
    const std::optional<Tensor>& ddshortcut_in, double ddx_scale,
    const std::optional<Tensor>& dxx_addend_in) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Tensor ddx = companion(ddx_in, x, "ddx", x.scalar_type());
  const Tensor dy = companion(dy_in, x, "dy", x.scalar_type());
  const std::optional<Tensor> mask = mask_arg(mask_in, x);
  const std::optional<Tensor> ddshortcut = optional_companion(ddshortcut_in, x, "ddshortcut");
  const std::optional<Tensor> dxx_addend = optional_companion(dxx_addend_in, x, "dxx_addend");
  const Coef scale_arg = coef_arg(scale, x, "scale");
  const Coef shift_arg = coef_arg(shift, x, "shift");
  const Coef a_arg = coef_arg(a, x, "a");
  const Coef b_arg = coef_arg(b, x, "b");
  const Coef p_arg = coef_arg(p, x, "p");
  const Coef q_arg = coef_arg(q, x, "q");
  const Coef center_arg = coef_arg(center, x, "center");
  const c10::DeviceGuard guard(x.device());
  Tensor ddy = empty_in_layout_of(x, dy.scalar_type());
  Tensor dxx = empty_in_layout_of(x, x.scalar_type());
  check_launch(pyeuler_affine_act_double_backward_apply(
                   ddx.data_ptr(), dy.data_ptr(), x.data_ptr(), mask_data(mask),
                   kernel_dtype(x, "x"), geometry_of(x), scale_arg.abi, shift_arg.abi, relu,
                   a_arg.abi, b_arg.abi, p_arg.abi, q_arg.abi, center_arg.abi,
                   data_or_null<const void>(ddshortcut), static_cast<float>(ddx_scale),
                   data_or_null<const void>(dxx_addend), ddy.data_ptr(), dxx.data_ptr(),
                   current_stream(x.device())),
               "affine_act_double_backward_apply");
  return {ddy, dxx};
}

// Both residuals: e alone (step_size absent; the second result is undefined), or e and its
// term -2γ·e in the IE step, written by the same pass.
std::tuple<Tensor, Tensor> residual_pass(const Tensor& x_in, const Tensor& c_in,
                                         const Tensor& fx_in, double theta,
                                         std::optional<double> step_size, const char* op) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Tensor c = companion(c_in, x, "c", x.scalar_type());
  const Tensor fx = companion(fx_in, x, "fx", x.scalar_type());
  const c10::DeviceGuard guard(x.device());
  Tensor e = empty_in_layout_of(x, x.scalar_type());
  const cudaStream_t stream = current_stream(x.device());
  if (!step_size.has_value()) {
    check_launch(pyeuler_ie_residual(x.data_ptr(), c.data_ptr(), fx.data_ptr(),
                                     kernel_dtype(x, "x"), x.numel(), theta, e.data_ptr(), stream),
                 op);
    return {e, Tensor()};
  }
  Tensor term = empty_in_layout_of(x, x.scalar_type());
  check_launch(pyeuler_ie_residual_with_term(x.data_ptr(), c.data_ptr(), fx.data_ptr(),
                                             kernel_dtype(x, "x"), x.numel(), theta, *step_size,
                                             e.data_ptr(), term.data_ptr(), stream),
               op);
  return {e, term};
}

Tensor ie_residual(const Tensor& x_in, const Tensor& c_in, const Tensor& fx_in, double theta) {
  return std::get<0>(residual_pass(x_in, c_in, fx_in, theta, std::nullopt, "ie_residual"));
}

std::tuple<Tensor, Tensor> ie_residual_with_term(const Tensor& x_in, const Tensor& c_in,
                                                 const Tensor& fx_in, double theta,
                                                 double step_size) {
  return residual_pass(x_in, c_in, fx_in, theta, step_size, "ie_residual_with_term");
}

// (dx, dc, dfx) in de's layout, dx with the addend; at theta == 1, where dfx = -u is dc, dfx
// is not written and comes back empty (outputs may not alias; the Python wrapper returns dc
// in its place).
std::tuple<Tensor, Tensor, Tensor> ie_residual_with_term_adjoint(
    const Tensor& de_in, const Tensor& dterm_in, double theta, double step_size,
    const std::optional<Tensor>& dx_addend_in) {
  check_activation(de_in, "de");
  const Tensor de = as_kernel_layout(de_in);
  const Tensor dterm = companion(dterm_in, de, "dterm", de.scalar_type(), "de");
  const std::optional<Tensor> dx_addend = optional_companion(dx_addend_in, de, "dx_addend", "de");
  const c10::DeviceGuard guard(de.device());
  Tensor dx = empty_in_layout_of(de, de.scalar_type());
  Tensor dc = empty_in_layout_of(de, de.scalar_type());
  const bool write_dfx = theta != 1.0;
  Tensor dfx = write_dfx ? empty_in_layout_of(de, de.scalar_type()) : at::empty({0}, de.options());
  check_launch(pyeuler_ie_residual_with_term_adjoint(
                   de.data_ptr(), dterm.data_ptr(), kernel_dtype(de, "de"), de.numel(), theta,
                   step_size, data_or_null<const void>(dx_addend), dx.data_ptr(), dc.data_ptr(),
                   write_dfx ? dfx.data_ptr() : nullptr, current_stream(de.device())),
               "ie_residual_with_term_adjoint");
  return {dx, dc, dfx};
}

Tensor ie_update(const Tensor& x_in, const Tensor& e_in, const Tensor& v_in, double step_size,
                 double theta) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Tensor e = companion(e_in, x, "e", x.scalar_type());
  const Tensor v = companion(v_in, x, "v", x.scalar_type());
  const c10::DeviceGuard guard(x.device());
  Tensor x_next = empty_in_layout_of(x, x.scalar_type());
  check_launch(pyeuler_ie_update(x.data_ptr(), e.data_ptr(), v.data_ptr(), kernel_dtype(x, "x"),
                                 x.numel(), step_size, theta, x_next.data_ptr(),
                                 current_stream(x.device())),
               "ie_update");
  return x_next;
}

// ---- the per-channel algebra: float32 statistics and sums, parameters in their dtype ------

// The layout both coefficient ops share (kernels/pyeuler_kernels.h): statistics [C] for
// BatchNorm (groups == 0), [N, groups] for GroupNorm; sums and coefficients [C] or [N, C].
struct AlgebraShape {
  int64_t samples;
  std::vector<int64_t> statistics;
  std::vector<int64_t> coefficients;
};

AlgebraShape algebra_shape(const Tensor& var, int64_t groups, int64_t channels, const char* op) {
  TORCH_CHECK(var.is_cuda(), "pyeuler.cuda: var must be a CUDA tensor, got ", var.device());
  TORCH_CHECK_TYPE(var.scalar_type() == at::kFloat, "pyeuler.cuda: var must be float32, got ",
                   var.scalar_type());
  TORCH_CHECK(channels >= 1 && groups >= 0 && (groups == 0 || channels % groups == 0),
              "pyeuler.cuda.", op, ": groups must be 0 (BatchNorm) or divide channels = ",
              channels, ", got ", groups);
  if (groups == 0) {
    TORCH_CHECK(var.dim() == 1 && var.size(0) == channels, "pyeuler.cuda.", op,
                ": var must be [C] = [", channels, "] for BatchNorm (groups = 0), got ",
                var.sizes());
    return {1, {channels}, {channels}};
  }
  TORCH_CHECK(var.dim() == 2 && var.size(1) == groups, "pyeuler.cuda.", op,
              ": var must be [N, groups] = [N, ", groups, "] for GroupNorm, got ", var.sizes());
  return {var.size(0), {var.size(0), groups}, {var.size(0), channels}};
}

// An optional float32 vector of a given shape (a dense copy only when it is not dense).
struct VectorArg {
  Tensor dense;  // keeps a contiguous copy alive for the launch
  const float* data = nullptr;
};

VectorArg vector_arg(const std::optional<Tensor>& t, const Tensor& var,
                     const std::vector<int64_t>& shape, const char* name) {
  if (!t.has_value()) return {};
  TORCH_CHECK(t->device() == var.device(), "pyeuler.cuda: ", name, " is on ", t->device(),
              " but var is on ", var.device());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "pyeuler.cuda: ", name,
                   " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), "pyeuler.cuda: ", name, " must have shape ",
              at::IntArrayRef(shape), ", got ", t->sizes());
  Tensor dense = t->contiguous();
  const float* data = dense.data_ptr<float>();
  return {std::move(dense), data};
}

// An optional per-channel parameter read in its own dtype: [C], or 0-dim where allowed.
struct ParamArg {
  Tensor dense;  // a copy only for a [C] view of one value (stride 0 would read as 0-dim)
  pyeuler_param_t abi{nullptr, PYEULER_DTYPE_FLOAT32, 0};
};

ParamArg param_arg(const std::optional<Tensor>& t, const Tensor& var, int64_t channels,
                   bool allow_0dim, const char* name) {
  if (!t.has_value()) return {};
  TORCH_CHECK(t->device() == var.device(), "pyeuler.cuda: ", name, " is on ", t->device(),
              " but var is on ", var.device());
  const bool scalar = allow_0dim && t->dim() == 0;
  TORCH_CHECK(scalar || (t->dim() == 1 && t->size(0) == channels), "pyeuler.cuda: ", name,
              " must be [C] = [", channels, "]", allow_0dim ? " or 0-dim" : "", ", got shape ",
              t->sizes());
  const pyeuler_dtype_t dtype = kernel_dtype(*t, name);
  if (scalar) return {*t, {t->data_ptr(), dtype, 0}};
  if (channels == 1) return {*t, {t->data_ptr(), dtype, 1}};
  Tensor dense = t->stride(0) == 0 ? t->contiguous() : *t;
  const pyeuler_param_t abi{dense.data_ptr(), dtype, dense.stride(0)};
  return {std::move(dense), abi};
}

std::tuple<Tensor, Tensor> forward_coefficients(
    const Tensor& mean, const Tensor& var, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& h, double h_value,
    double eps, int64_t groups, int64_t channels) {
  const AlgebraShape shape = algebra_shape(var, groups, channels, "forward_coefficients");
  const VectorArg mean_arg = vector_arg(mean, var, shape.statistics, "mean");
  const VectorArg var_arg = vector_arg(var, var, shape.statistics, "var");
  const ParamArg weight_arg = param_arg(weight, var, channels, false, "weight");
  const ParamArg bias_arg = param_arg(bias, var, channels, false, "bias");
  const ParamArg h_arg = param_arg(h, var, channels, true, "h");
  const c10::DeviceGuard guard(var.device());
  Tensor scale = at::empty(shape.coefficients, var.options());
  Tensor shift = at::empty(shape.coefficients, var.options());
  check_launch(pyeuler_forward_coefficients(mean_arg.data, var_arg.data, shape.samples, channels,
                                            groups, weight_arg.abi, bias_arg.abi, h_arg.abi,
                                            h_value, eps, scale.data_ptr<float>(),
                                            shift.data_ptr<float>(), current_stream(var.device())),
               "forward_coefficients");
  return {scale, shift};
}

// norm_stats with the forward coefficients written by the statistics' second stage: two
// launches for what norm_stats and forward_coefficients do in three, the same bits.
std::tuple<Tensor, Tensor, Tensor, Tensor> norm_stats_and_coefficients(
    const Tensor& x_in, int64_t groups, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, const std::optional<Tensor>& h, double h_value,
    double eps) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  TORCH_CHECK(groups >= 0 && (groups == 0 || x.size(1) % groups == 0),
              "pyeuler.cuda.norm_stats_and_coefficients: groups must be 0 (BatchNorm) or divide "
              "C = ", x.size(1), ", got ", groups);
  const c10::DeviceGuard guard(x.device());
  const pyeuler_geometry_t geo = geometry_of(x);
  const auto options = x.options().dtype(at::kFloat);
  Tensor mean = groups == 0 ? at::empty({geo.c}, options) : at::empty({geo.n, groups}, options);
  Tensor var = at::empty_like(mean);
  Tensor scale = groups == 0 ? at::empty({geo.c}, options) : at::empty({geo.n, geo.c}, options);
  Tensor shift = at::empty_like(scale);
  // checked against the statistics' device, x's
  const ParamArg weight_arg = param_arg(weight, var, geo.c, false, "weight");
  const ParamArg bias_arg = param_arg(bias, var, geo.c, false, "bias");
  const ParamArg h_arg = param_arg(h, var, geo.c, true, "h");
  size_t bytes = 0;
  check_launch(pyeuler_norm_stats_workspace_size(geo, groups, &bytes),
               "norm_stats_and_coefficients");
  Tensor scratch = workspace(bytes, x);
  check_launch(pyeuler_norm_stats_and_coefficients(
                   x.data_ptr(), kernel_dtype(x, "x"), geo, groups, weight_arg.abi, bias_arg.abi,
                   h_arg.abi, h_value, eps, mean.data_ptr<float>(), var.data_ptr<float>(),
                   scale.data_ptr<float>(), shift.data_ptr<float>(), scratch.data_ptr(), bytes,
                   current_stream(x.device())),
               "norm_stats_and_coefficients");
  return {mean, var, scale, shift};
}

// Outputs not computed (dweight, dbias, dh without the sums or not in `needs`) are empty
// tensors; the Python wrapper maps them to None.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_coefficients(
    const std::optional<Tensor>& sum_g, const std::optional<Tensor>& sum_gxc,
    const std::optional<Tensor>& dmean, const std::optional<Tensor>& dvar,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& h, const Tensor& var, double h_value, double eps, int64_t groups,
    bool batch_stats, std::array<bool, 5> needs, int64_t channels, int64_t count) {
  const AlgebraShape shape = algebra_shape(var, groups, channels, "backward_coefficients");
  const bool sums = sum_g.has_value();
  TORCH_CHECK(sum_gxc.has_value() == sums,
              "pyeuler.cuda.backward_coefficients: sum_g and sum_gxc must be given together");
  TORCH_CHECK(count >= 1, "pyeuler.cuda.backward_coefficients: count must be >= 1, got ", count);
  const bool want_dweight = sums && needs[2];
  const bool want_dbias = sums && needs[3];
  const bool want_dh = sums && needs[4];
  TORCH_CHECK(!want_dh || h.has_value(), "pyeuler.cuda.backward_coefficients: the gradient of "
              "h (needs[4]) needs h as a tensor, got None");
  const VectorArg sum_g_arg = vector_arg(sum_g, var, shape.coefficients, "sum_g");
  const VectorArg sum_gxc_arg = vector_arg(sum_gxc, var, shape.coefficients, "sum_gxc");
  const VectorArg dmean_arg = vector_arg(dmean, var, shape.statistics, "dmean");
  const VectorArg dvar_arg = vector_arg(dvar, var, shape.statistics, "dvar");
  const VectorArg var_arg = vector_arg(var, var, shape.statistics, "var");
  const ParamArg weight_arg = param_arg(weight, var, channels, false, "weight");
  const ParamArg bias_arg = param_arg(bias, var, channels, false, "bias");
  const ParamArg h_arg = param_arg(h, var, channels, true, "h");
  const c10::DeviceGuard guard(var.device());
  const auto options = var.options();
  Tensor a = at::empty(shape.coefficients, options);
  Tensor b = at::empty(shape.coefficients, options);
  Tensor c = at::empty(shape.coefficients, options);
  Tensor dweight = at::empty({want_dweight ? channels : 0}, options);
  Tensor dbias = at::empty({want_dbias ? channels : 0}, options);
  Tensor dh = want_dh ? at::empty(h->sizes(), options) : at::empty({0}, options);
  check_launch(pyeuler_backward_coefficients(
                   sum_g_arg.data, sum_gxc_arg.data, dmean_arg.data, dvar_arg.data, var_arg.data,
                   shape.samples, channels, groups, weight_arg.abi, bias_arg.abi, h_arg.abi,
                   h_value, eps, batch_stats, needs[0], count, a.data_ptr<float>(),
                   b.data_ptr<float>(), c.data_ptr<float>(),
                   want_dweight ? dweight.data_ptr<float>() : nullptr,
                   want_dbias ? dbias.data_ptr<float>() : nullptr,
                   want_dh ? dh.data_ptr<float>() : nullptr, current_stream(var.device())),
               "backward_coefficients");
  return {a, b, c, dweight, dbias, dh};
}

// The per-channel pass of the second order: backward_coefficients_vjp, or with `double_`
// double_backward_coefficients (also a, b, the sums' own cotangents and the centre's
// gradient), one launch of pyeuler_double_backward_coefficients either way.  The outputs in
// norm_algebra.DOUBLE_BACKWARD_KEYS order; those the cotangents do not reach (the algebra's
// None) are empty tensors, which the Python wrapper maps to None by the same presence rules
// (norm_algebra.vjp_presence / double_backward_presence).  weight, bias and h's gradients
// come in the parameter's dtype, the others float32: sums-shaped [C] or [N, C], or
// statistics-shaped.
struct SecondOrderCoefficients {
  Tensor a, b, d_sum_g, d_sum_gxc, d_dmean, d_dvar, d_weight, d_bias, d_h, d_var, d_mean;
};

SecondOrderCoefficients second_order_coefficients(
    const std::optional<Tensor>& sum_g, const std::optional<Tensor>& sum_gxc,
    const std::optional<Tensor>& dmean, const std::optional<Tensor>& dvar,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& h, const Tensor& var, double h_value, double eps, int64_t groups,
    bool batch_stats, std::array<bool, 5> needs, int64_t channels, int64_t count,
    const c10::List<std::optional<Tensor>>& cotangents,
    const c10::List<std::optional<Tensor>>* sum_cotangents, const char* op) {
  const bool double_ = sum_cotangents != nullptr;
  const AlgebraShape shape = algebra_shape(var, groups, channels, op);
  TORCH_CHECK(cotangents.size() == 6, "pyeuler.cuda.", op, ": cotangents must be those of "
              "(a, b, c, dweight, dbias, dh), got ", cotangents.size());
  TORCH_CHECK(!double_ || sum_cotangents->size() == 2, "pyeuler.cuda.", op, ": sum_cotangents "
              "must be those of (sum_g, sum_gxc), got ", double_ ? sum_cotangents->size() : 0);
  const bool sums = sum_g.has_value();
  TORCH_CHECK(sum_gxc.has_value() == sums, "pyeuler.cuda.", op,
              ": sum_g and sum_gxc must be given together");
  TORCH_CHECK(count >= 1, "pyeuler.cuda.", op, ": count must be >= 1, got ", count);
  const bool centered = needs[0] && batch_stats;
  std::array<std::optional<Tensor>, 6> cot;
  for (size_t k = 0; k < 6; ++k) cot[k] = cotangents.get(k);
  // only the cotangents that reach something: b and c are constants without the batch
  // statistics' terms, the parameter gradients exist only with the sums and their need,
  // and the sums' own cotangents only with the sums
  if (!centered) cot[1] = cot[2] = std::nullopt;
  for (size_t k = 0; k < 3; ++k) {
    if (!(sums && needs[2 + k])) cot[3 + k] = std::nullopt;
  }
  std::optional<Tensor> cot_sum_g, cot_sum_gxc;
  if (double_ && sums) {
    cot_sum_g = sum_cotangents->get(0);
    cot_sum_gxc = sum_cotangents->get(1);
  }
  const bool cot_a = cot[0].has_value(), cot_b = cot[1].has_value(), cot_c = cot[2].has_value();
  const bool cot_dweight = cot[3].has_value(), cot_dbias = cot[4].has_value(),
             cot_dh = cot[5].has_value();
  TORCH_CHECK(!cot_dh || h.has_value(), "pyeuler.cuda.", op, ": the gradient of h (needs[4]) "
              "needs h as a tensor, got None");
  // which gradients are structurally nonzero (norm_algebra.vjp_presence, and
  // double_backward_presence for the double backward's additions)
  const bool learnable = weight.has_value() || h.has_value();
  const bool statistic_sums = sums && centered && (cot_c || cot_b);
  const bool vjp_sum_g = sums && (cot_dbias || (cot_dh && bias.has_value()) || (centered && cot_c));
  const bool vjp_sum_gxc = sums && (cot_dweight || cot_dh || (centered && cot_b));
  const bool want_step_w = learnable && (cot_a || statistic_sums);
  const bool want_sum_g = vjp_sum_g || cot_sum_g.has_value();
  const bool want_sum_gxc = vjp_sum_gxc || cot_sum_gxc.has_value();
  const bool want_weight = weight.has_value() && (cot_dh || want_step_w);
  const bool want_bias = bias.has_value() && cot_dh;
  const bool want_h = h.has_value() && (cot_dweight || cot_dbias || want_step_w);
  const bool want_var = cot_a || vjp_sum_gxc || statistic_sums;
  const bool want_dmean = centered && dmean.has_value() && cot_c;
  const bool want_dvar = centered && dvar.has_value() && cot_b;
  const bool want_mean = double_ && (cot_c || (sums && want_sum_gxc));

  const VectorArg sum_g_arg = vector_arg(sum_g, var, shape.coefficients, "sum_g");
  const VectorArg sum_gxc_arg = vector_arg(sum_gxc, var, shape.coefficients, "sum_gxc");
  vector_arg(dmean, var, shape.statistics, "dmean");  // checked only: its value does not enter
  // dvar's value enters only the double backward's b (with the batch statistics' terms)
  const VectorArg dvar_arg = vector_arg(dvar, var, shape.statistics, "dvar");
  const VectorArg var_arg = vector_arg(var, var, shape.statistics, "var");
  const ParamArg weight_arg = param_arg(weight, var, channels, false, "weight");
  const ParamArg bias_arg = param_arg(bias, var, channels, false, "bias");
  const ParamArg h_arg = param_arg(h, var, channels, true, "h");
  const VectorArg cot_a_arg = vector_arg(cot[0], var, shape.coefficients, "the cotangent of a");
  const VectorArg cot_b_arg = vector_arg(cot[1], var, shape.coefficients, "the cotangent of b");
  const VectorArg cot_c_arg = vector_arg(cot[2], var, shape.coefficients, "the cotangent of c");
  const ParamArg cot_dweight_arg =
      param_arg(cot[3], var, channels, false, "the cotangent of dweight");
  const ParamArg cot_dbias_arg = param_arg(cot[4], var, channels, false, "the cotangent of dbias");
  const ParamArg cot_dh_arg = param_arg(cot[5], var, channels, true, "the cotangent of dh");
  const VectorArg cot_sum_g_arg =
      vector_arg(cot_sum_g, var, shape.coefficients, "the cotangent of sum_g");
  const VectorArg cot_sum_gxc_arg =
      vector_arg(cot_sum_gxc, var, shape.coefficients, "the cotangent of sum_gxc");
  const c10::DeviceGuard guard(var.device());
  const auto options = var.options();
  auto output = [&](bool want, at::IntArrayRef sizes, const at::TensorOptions& like) {
    return want ? at::empty(sizes, like) : at::empty({0}, options);
  };
  SecondOrderCoefficients out;
  out.a = output(double_, shape.coefficients, options);
  out.b = output(double_, shape.coefficients, options);
  out.d_sum_g = output(want_sum_g, shape.coefficients, options);
  out.d_sum_gxc = output(want_sum_gxc, shape.coefficients, options);
  out.d_dmean = output(want_dmean, shape.statistics, options);
  out.d_dvar = output(want_dvar, shape.statistics, options);
  out.d_weight = want_weight ? at::empty({channels}, weight->options()) : at::empty({0}, options);
  out.d_bias = want_bias ? at::empty({channels}, bias->options()) : at::empty({0}, options);
  out.d_h = want_h ? at::empty(h->sizes(), h->options()) : at::empty({0}, options);
  out.d_var = output(want_var, shape.statistics, options);
  out.d_mean = output(want_mean, shape.statistics, options);
  auto out_or_null = [](bool want, Tensor& t) { return want ? t.data_ptr<float>() : nullptr; };
  auto param_or_null = [](bool want, Tensor& t) { return want ? t.data_ptr() : nullptr; };
  check_launch(pyeuler_double_backward_coefficients(
                   sum_g_arg.data, sum_gxc_arg.data, double_ ? dvar_arg.data : nullptr,
                   var_arg.data, shape.samples, channels, groups, weight_arg.abi, bias_arg.abi,
                   h_arg.abi, h_value, eps, batch_stats, needs[0], count, cot_a_arg.data,
                   cot_b_arg.data, cot_c_arg.data, cot_dweight_arg.abi, cot_dbias_arg.abi,
                   cot_dh_arg.abi, cot_sum_g_arg.data, cot_sum_gxc_arg.data,
                   out_or_null(double_, out.a), out_or_null(double_, out.b),
                   out_or_null(want_sum_g, out.d_sum_g), out_or_null(want_sum_gxc, out.d_sum_gxc),
                   out_or_null(want_dmean, out.d_dmean), out_or_null(want_dvar, out.d_dvar),
                   out_or_null(want_var, out.d_var), param_or_null(want_weight, out.d_weight),
                   param_or_null(want_bias, out.d_bias), param_or_null(want_h, out.d_h),
                   out_or_null(want_mean, out.d_mean), current_stream(var.device())),
               op);
  return out;
}

// The gradients of (sum_g, sum_gxc, dmean, dvar, weight, bias, h, var)
// (norm_algebra.VJP_KEYS order).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
backward_coefficients_vjp(
    const std::optional<Tensor>& sum_g, const std::optional<Tensor>& sum_gxc,
    const std::optional<Tensor>& dmean, const std::optional<Tensor>& dvar,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& h, const Tensor& var, double h_value, double eps, int64_t groups,
    bool batch_stats, std::array<bool, 5> needs, int64_t channels, int64_t count,
    const c10::List<std::optional<Tensor>>& cotangents) {
  SecondOrderCoefficients out = second_order_coefficients(
      sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups, batch_stats, needs,
      channels, count, cotangents, nullptr, "backward_coefficients_vjp");
  return {out.d_sum_g, out.d_sum_gxc, out.d_dmean, out.d_dvar,
          out.d_weight, out.d_bias, out.d_h, out.d_var};
}

// a, b, then the gradients of (sum_g, sum_gxc, dmean, dvar, weight, bias, h, var) with the
// sums' own cotangents added, then the centre's (mean's): norm_algebra.DOUBLE_BACKWARD_KEYS.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
double_backward_coefficients(
    const std::optional<Tensor>& sum_g, const std::optional<Tensor>& sum_gxc,
    const std::optional<Tensor>& dmean, const std::optional<Tensor>& dvar,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& h, const Tensor& var, double h_value, double eps, int64_t groups,
    bool batch_stats, std::array<bool, 5> needs, int64_t channels, int64_t count,
    const c10::List<std::optional<Tensor>>& cotangents,
    const c10::List<std::optional<Tensor>>& sum_cotangents) {
  SecondOrderCoefficients out = second_order_coefficients(
      sum_g, sum_gxc, dmean, dvar, weight, bias, h, var, h_value, eps, groups, batch_stats, needs,
      channels, count, cotangents, &sum_cotangents, "double_backward_coefficients");
  return {out.a,       out.b,      out.d_sum_g, out.d_sum_gxc, out.d_dmean, out.d_dvar,
          out.d_weight, out.d_bias, out.d_h,     out.d_var,     out.d_mean};
}

// nn.BatchNorm's running-statistics update, in place: the counter and the running buffers
// are written on the device, nothing is read on the host.  The contract's momentum
// (float | Tensor | None) is two schema arguments: a 0-dim tensor `momentum` (read on the
// device), else the float `momentum_value`, else (neither) the cumulative average.
void update_running_stats(const Tensor& running_mean, const Tensor& running_var,
                          const std::optional<Tensor>& num_batches_tracked, const Tensor& mean,
                          const Tensor& var, int64_t count, const std::optional<Tensor>& momentum,
                          std::optional<double> momentum_value) {
  TORCH_CHECK_VALUE(count >= 2, "pyeuler.cuda.update_running_stats: running statistics need "
                    "more than one value per channel, got count = ", count);
  const bool cumulative = !momentum.has_value() && !momentum_value.has_value();
  TORCH_CHECK_VALUE(!cumulative || num_batches_tracked.has_value(),
                    "pyeuler.cuda.update_running_stats: momentum=None (cumulative average) "
                    "needs num_batches_tracked");
  TORCH_CHECK(!(momentum.has_value() && momentum_value.has_value()),
              "pyeuler.cuda.update_running_stats: give momentum as a tensor or as "
              "momentum_value, not both");
  TORCH_CHECK(running_mean.is_cuda(), "pyeuler.cuda: running_mean must be a CUDA tensor, got ",
              running_mean.device());
  const pyeuler_dtype_t dtype = kernel_dtype(running_mean, "running_mean");
  TORCH_CHECK(running_mean.dim() == 1 && running_mean.is_contiguous(),
              "pyeuler.cuda.update_running_stats: running_mean must be a contiguous [C], got "
              "shape ", running_mean.sizes(), " and strides ", running_mean.strides());
  const int64_t channels = running_mean.size(0);
  TORCH_CHECK(running_var.device() == running_mean.device(), "pyeuler.cuda: running_var is on ",
              running_var.device(), " but running_mean is on ", running_mean.device());
  TORCH_CHECK_TYPE(running_var.scalar_type() == running_mean.scalar_type(),
                   "pyeuler.cuda: running_var must have running_mean's dtype ",
                   running_mean.scalar_type(), ", got ", running_var.scalar_type());
  TORCH_CHECK(running_var.sizes() == running_mean.sizes() && running_var.is_contiguous(),
              "pyeuler.cuda.update_running_stats: running_var must be a contiguous [C] = [",
              channels, "], got shape ", running_var.sizes(), " and strides ",
              running_var.strides());
  TORCH_CHECK(var.device() == running_mean.device(), "pyeuler.cuda: var is on ", var.device(),
              " but running_mean is on ", running_mean.device());
  const VectorArg mean_arg = vector_arg(mean, var, {channels}, "mean");
  const VectorArg var_arg = vector_arg(var, var, {channels}, "var");
  int64_t* counter = nullptr;
  if (num_batches_tracked.has_value()) {
    const Tensor& t = *num_batches_tracked;
    TORCH_CHECK(t.device() == running_mean.device(), "pyeuler.cuda: num_batches_tracked is on ",
                t.device(), " but running_mean is on ", running_mean.device());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "pyeuler.cuda: num_batches_tracked must be "
                     "int64, got ", t.scalar_type());
    TORCH_CHECK(t.dim() <= 1 && t.numel() == 1, "pyeuler.cuda: num_batches_tracked must be "
                "0-dim or [1], got shape ", t.sizes());
    counter = t.data_ptr<int64_t>();
  }
  pyeuler_param_t rate{nullptr, PYEULER_DTYPE_FLOAT32, 0};
  if (momentum.has_value()) {
    TORCH_CHECK(momentum->device() == running_mean.device(), "pyeuler.cuda: momentum is on ",
                momentum->device(), " but running_mean is on ", running_mean.device());
    TORCH_CHECK(momentum->dim() <= 1 && momentum->numel() == 1, "pyeuler.cuda: momentum must "
                "be 0-dim or [1], got shape ", momentum->sizes());
    rate = {momentum->data_ptr(), kernel_dtype(*momentum, "momentum"), 0};
  }
  const c10::DeviceGuard guard(running_mean.device());
  check_launch(pyeuler_update_running_stats(
                   running_mean.data_ptr(), running_var.data_ptr(), dtype, counter, mean_arg.data,
                   var_arg.data, channels, count, rate, momentum_value.value_or(0.0), cumulative,
                   current_stream(running_mean.device())),
               "update_running_stats");
}

}  // namespace
}  // namespace pyeuler

TORCH_LIBRARY_FRAGMENT(pyeuler, m) {
  m.def("cuda_norm_stats(Tensor x, int groups) -> (Tensor, Tensor)");
  m.def(
      "cuda_norm_stats_and_coefficients(Tensor x, int groups, Tensor? weight, Tensor? bias, "
      "Tensor? h, float h_value, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_affine_act_forward(Tensor x, Tensor scale, Tensor shift, Tensor? shortcut, "
      "bool relu, bool save_mask) -> (Tensor, Tensor)");
  m.def(
      "cuda_affine_act_backward_reduce(Tensor dy, Tensor x, Tensor scale, Tensor shift, "
      "Tensor center, Tensor? mask, bool relu, bool per_sample) -> (Tensor, Tensor)");
  m.def(
      "cuda_affine_act_backward_reduce_recompute(Tensor dy, Tensor x, Tensor scale, "
      "Tensor shift, Tensor center, bool relu, bool per_sample, ScalarType y_dtype) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "cuda_affine_act_backward_apply(Tensor dy, Tensor x, Tensor scale, Tensor shift, "
      "Tensor? mask, bool relu, Tensor a, Tensor b, Tensor c, Tensor center, "
      "bool want_dshortcut, Tensor? dx_addend, Tensor? dx_addend2) -> (Tensor, Tensor)");
  m.def(
      "cuda_affine_act_backward_apply_ie_update(Tensor dy, Tensor x, Tensor scale, "
      "Tensor shift, Tensor? mask, bool relu, Tensor a, Tensor b, Tensor c, Tensor center, "
      "Tensor residual, float step_size, float theta, bool residual_is_term) -> Tensor");
  m.def(
      "cuda_affine_act_double_backward_reduce(Tensor ddx, Tensor dy, Tensor x, Tensor scale, "
      "Tensor shift, Tensor center, Tensor? mask, bool relu, bool per_sample) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "cuda_affine_act_double_backward_apply(Tensor ddx, Tensor dy, Tensor x, Tensor scale, "
      "Tensor shift, Tensor? mask, bool relu, Tensor a, Tensor b, Tensor p, Tensor q, "
      "Tensor center, Tensor? ddshortcut, float ddx_scale, Tensor? dxx_addend) "
      "-> (Tensor, Tensor)");
  m.def("cuda_ie_residual(Tensor x, Tensor c, Tensor fx, float theta) -> Tensor");
  m.def(
      "cuda_ie_residual_with_term(Tensor x, Tensor c, Tensor fx, float theta, float step_size) "
      "-> (Tensor, Tensor)");
  m.def(
      "cuda_ie_residual_with_term_adjoint(Tensor de, Tensor dterm, float theta, "
      "float step_size, Tensor? dx_addend) -> (Tensor, Tensor, Tensor)");
  m.def("cuda_ie_update(Tensor x, Tensor e, Tensor v, float step_size, float theta) -> Tensor");
  m.def(
      "cuda_forward_coefficients(Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "Tensor? h, float h_value, float eps, int groups, int channels) -> (Tensor, Tensor)");
  m.def(
      "cuda_backward_coefficients(Tensor? sum_g, Tensor? sum_gxc, Tensor? dmean, Tensor? dvar, "
      "Tensor? weight, Tensor? bias, Tensor? h, Tensor var, float h_value, float eps, "
      "int groups, bool batch_stats, bool[5] needs, int channels, int count) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_backward_coefficients_vjp(Tensor? sum_g, Tensor? sum_gxc, Tensor? dmean, "
      "Tensor? dvar, Tensor? weight, Tensor? bias, Tensor? h, Tensor var, float h_value, "
      "float eps, int groups, bool batch_stats, bool[5] needs, int channels, int count, "
      "Tensor?[] cotangents) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_double_backward_coefficients(Tensor? sum_g, Tensor? sum_gxc, Tensor? dmean, "
      "Tensor? dvar, Tensor? weight, Tensor? bias, Tensor? h, Tensor var, float h_value, "
      "float eps, int groups, bool batch_stats, bool[5] needs, int channels, int count, "
      "Tensor?[] cotangents, Tensor?[] sum_cotangents) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!)? num_batches_tracked, Tensor mean, Tensor var, int count, Tensor? momentum, "
      "float? momentum_value) -> ()");
}

TORCH_LIBRARY_IMPL(pyeuler, CUDA, m) {
  m.impl("cuda_norm_stats", &pyeuler::norm_stats);
  m.impl("cuda_norm_stats_and_coefficients", &pyeuler::norm_stats_and_coefficients);
  m.impl("cuda_affine_act_forward", &pyeuler::affine_act_forward);
  m.impl("cuda_affine_act_backward_reduce", &pyeuler::affine_act_backward_reduce);
  m.impl("cuda_affine_act_backward_reduce_recompute",
         &pyeuler::affine_act_backward_reduce_recompute);
  m.impl("cuda_affine_act_backward_apply", &pyeuler::affine_act_backward_apply);
  m.impl("cuda_affine_act_backward_apply_ie_update",
         &pyeuler::affine_act_backward_apply_ie_update);
  m.impl("cuda_affine_act_double_backward_reduce", &pyeuler::affine_act_double_backward_reduce);
  m.impl("cuda_affine_act_double_backward_apply", &pyeuler::affine_act_double_backward_apply);
  m.impl("cuda_ie_residual", &pyeuler::ie_residual);
  m.impl("cuda_ie_residual_with_term", &pyeuler::ie_residual_with_term);
  m.impl("cuda_ie_residual_with_term_adjoint", &pyeuler::ie_residual_with_term_adjoint);
  m.impl("cuda_ie_update", &pyeuler::ie_update);
  m.impl("cuda_forward_coefficients", &pyeuler::forward_coefficients);
  m.impl("cuda_backward_coefficients", &pyeuler::backward_coefficients);
  m.impl("cuda_backward_coefficients_vjp", &pyeuler::backward_coefficients_vjp);
  m.impl("cuda_double_backward_coefficients", &pyeuler::double_backward_coefficients);
  m.impl("cuda_update_running_stats", &pyeuler::update_running_stats);
}
