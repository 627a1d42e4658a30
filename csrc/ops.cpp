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

pyeuler_dtype_t kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return PYEULER_DTYPE_FLOAT32;
    case at::kHalf: return PYEULER_DTYPE_FLOAT16;
    case at::kBFloat16: return PYEULER_DTYPE_BFLOAT16;
    default:
      TORCH_CHECK_TYPE(false, "pyeuler.cuda: ", name,
                       " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
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
Tensor companion(const Tensor& t, const Tensor& x, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == x.device(), "pyeuler.cuda: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.sizes() == x.sizes(), "pyeuler.cuda: ", name, " has shape ", t.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "pyeuler.cuda: ", name, " must be ", dtype,
                   ", got ", t.scalar_type());
  return in_layout_of(t, x);
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
  std::optional<Tensor> shortcut;
  if (shortcut_in.has_value()) shortcut = companion(*shortcut_in, x, "shortcut", x.scalar_type());
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

std::tuple<Tensor, Tensor> affine_act_backward_reduce(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const Tensor& center, const std::optional<Tensor>& mask_in, bool relu, bool per_sample) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const ReduceOperands in = reduce_operands(dy_in, x, scale, shift, center, mask_in, per_sample,
                                            "affine_act_backward_reduce");
  const c10::DeviceGuard guard(x.device());
  Tensor sum_g = empty_sums(x, in.geo, per_sample);
  Tensor sum_g_xc = at::empty_like(sum_g);
  size_t bytes = 0;
  check_launch(pyeuler_affine_act_backward_reduce_workspace_size(in.geo, per_sample, &bytes),
               "affine_act_backward_reduce");
  Tensor scratch = workspace(bytes, x);
  check_launch(pyeuler_affine_act_backward_reduce(
                   in.dy.data_ptr(), x.data_ptr(), mask_data(in.mask), kernel_dtype(x, "x"), in.geo,
                   in.scale.abi, in.shift.abi, in.center.abi, relu, per_sample,
                   sum_g.data_ptr<float>(), sum_g_xc.data_ptr<float>(), scratch.data_ptr(), bytes,
                   current_stream(x.device())),
               "affine_act_backward_reduce");
  return {sum_g, sum_g_xc};
}

std::tuple<Tensor, Tensor> affine_act_backward_apply(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& mask_in, bool relu, const Tensor& a, const Tensor& b,
    const Tensor& c, const Tensor& center, bool want_dshortcut) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Tensor dy = companion(dy_in, x, "dy", x.scalar_type());
  const std::optional<Tensor> mask = mask_arg(mask_in, x);
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
                   c_arg.abi, center_arg.abi, dx.data_ptr(),
                   want_dshortcut ? dshortcut.data_ptr() : nullptr, current_stream(x.device())),
               "affine_act_backward_apply");
  return {dx, dshortcut};
}

Tensor affine_act_backward_apply_ie_update(
    const Tensor& dy_in, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& mask_in, bool relu, const Tensor& a, const Tensor& b,
    const Tensor& c, const Tensor& center, const Tensor& e_in, double step_size, double theta) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Tensor dy = companion(dy_in, x, "dy", x.scalar_type());
  const Tensor e = companion(e_in, x, "e", x.scalar_type());
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
                   c_arg.abi, center_arg.abi, e.data_ptr(), step_size, theta, x_new.data_ptr(),
                   current_stream(x.device())),
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
    const std::optional<Tensor>& ddshortcut_in) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Tensor ddx = companion(ddx_in, x, "ddx", x.scalar_type());
  const Tensor dy = companion(dy_in, x, "dy", x.scalar_type());
  const std::optional<Tensor> mask = mask_arg(mask_in, x);
  std::optional<Tensor> ddshortcut;
  if (ddshortcut_in.has_value()) {
    ddshortcut = companion(*ddshortcut_in, x, "ddshortcut", x.scalar_type());
  }
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
                   data_or_null<const void>(ddshortcut), ddy.data_ptr(), dxx.data_ptr(),
                   current_stream(x.device())),
               "affine_act_double_backward_apply");
  return {ddy, dxx};
}

Tensor ie_residual(const Tensor& x_in, const Tensor& c_in, const Tensor& fx_in, double theta) {
  check_activation(x_in, "x");
  const Tensor x = as_kernel_layout(x_in);
  const Tensor c = companion(c_in, x, "c", x.scalar_type());
  const Tensor fx = companion(fx_in, x, "fx", x.scalar_type());
  const c10::DeviceGuard guard(x.device());
  Tensor e = empty_in_layout_of(x, x.scalar_type());
  check_launch(pyeuler_ie_residual(x.data_ptr(), c.data_ptr(), fx.data_ptr(), kernel_dtype(x, "x"),
                                   x.numel(), theta, e.data_ptr(), current_stream(x.device())),
               "ie_residual");
  return e;
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

}  // namespace
}  // namespace pyeuler

TORCH_LIBRARY_FRAGMENT(pyeuler, m) {
  m.def("cuda_norm_stats(Tensor x, int groups) -> (Tensor, Tensor)");
  m.def(
      "cuda_affine_act_forward(Tensor x, Tensor scale, Tensor shift, Tensor? shortcut, "
      "bool relu, bool save_mask) -> (Tensor, Tensor)");
  m.def(
      "cuda_affine_act_backward_reduce(Tensor dy, Tensor x, Tensor scale, Tensor shift, "
      "Tensor center, Tensor? mask, bool relu, bool per_sample) -> (Tensor, Tensor)");
  m.def(
      "cuda_affine_act_backward_apply(Tensor dy, Tensor x, Tensor scale, Tensor shift, "
      "Tensor? mask, bool relu, Tensor a, Tensor b, Tensor c, Tensor center, "
      "bool want_dshortcut) -> (Tensor, Tensor)");
  m.def(
      "cuda_affine_act_backward_apply_ie_update(Tensor dy, Tensor x, Tensor scale, "
      "Tensor shift, Tensor? mask, bool relu, Tensor a, Tensor b, Tensor c, Tensor center, "
      "Tensor e, float step_size, float theta) -> Tensor");
  m.def(
      "cuda_affine_act_double_backward_reduce(Tensor ddx, Tensor dy, Tensor x, Tensor scale, "
      "Tensor shift, Tensor center, Tensor? mask, bool relu, bool per_sample) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "cuda_affine_act_double_backward_apply(Tensor ddx, Tensor dy, Tensor x, Tensor scale, "
      "Tensor shift, Tensor? mask, bool relu, Tensor a, Tensor b, Tensor p, Tensor q, "
      "Tensor center, Tensor? ddshortcut) -> (Tensor, Tensor)");
  m.def("cuda_ie_residual(Tensor x, Tensor c, Tensor fx, float theta) -> Tensor");
  m.def("cuda_ie_update(Tensor x, Tensor e, Tensor v, float step_size, float theta) -> Tensor");
}

TORCH_LIBRARY_IMPL(pyeuler, CUDA, m) {
  m.impl("cuda_norm_stats", &pyeuler::norm_stats);
  m.impl("cuda_affine_act_forward", &pyeuler::affine_act_forward);
  m.impl("cuda_affine_act_backward_reduce", &pyeuler::affine_act_backward_reduce);
  m.impl("cuda_affine_act_backward_apply", &pyeuler::affine_act_backward_apply);
  m.impl("cuda_affine_act_backward_apply_ie_update",
         &pyeuler::affine_act_backward_apply_ie_update);
  m.impl("cuda_affine_act_double_backward_reduce", &pyeuler::affine_act_double_backward_reduce);
  m.impl("cuda_affine_act_double_backward_apply", &pyeuler::affine_act_double_backward_apply);
  m.impl("cuda_ie_residual", &pyeuler::ie_residual);
  m.impl("cuda_ie_update", &pyeuler::ie_update);
}
