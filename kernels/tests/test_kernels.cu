// Standalone tests of the kernels' C ABI against CPU reference loops (no torch).
//
// Every primitive runs on float32, float16 and bfloat16, channels-first and channels-last,
// odd and vector-friendly sizes, aligned and deliberately misaligned (scalar-path) pointers.
// The element-wise outputs are compared bit for bit in float32 (the reference rounds
// each operation the way the kernels do), the reductions against float64 sums.
// Exits 77 (ctest's SKIP_RETURN_CODE) when there is no CUDA device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "pyeuler_kernels.h"

namespace {

constexpr int kSkipReturnCode = 77;

#define CHECK_CUDA(expr)                                                                   \
  do {                                                                                     \
    const cudaError_t err_ = (expr);                                                       \
    if (err_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #expr,            \
                   cudaGetErrorString(err_));                                              \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

// ---- dtypes ---------------------------------------------------------------------------

template <typename T>
struct Dtype;
template <>
struct Dtype<float> {
  static constexpr pyeuler_dtype_t kEnum = PYEULER_DTYPE_FLOAT32;
  static constexpr const char* kName = "float32";
  static constexpr double kRtol = 1e-6;  // storage rounding of element-wise outputs
  static float to_float(float v) { return v; }
  static float from_float(float v) { return v; }
};
template <>
struct Dtype<__half> {
  static constexpr pyeuler_dtype_t kEnum = PYEULER_DTYPE_FLOAT16;
  static constexpr const char* kName = "float16";
  static constexpr double kRtol = 1e-3;
  static float to_float(__half v) { return __half2float(v); }
  static __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Dtype<__nv_bfloat16> {
  static constexpr pyeuler_dtype_t kEnum = PYEULER_DTYPE_BFLOAT16;
  static constexpr const char* kName = "bfloat16";
  static constexpr double kRtol = 8e-3;
  static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// ---- device buffers -------------------------------------------------------------------

// A device array with one spare element in front, so tests can also pass a pointer that is
// one element off 16-byte alignment (the scalar fallback path).
template <typename T>
class DeviceArray {
 public:
  DeviceArray(size_t count, bool misaligned) : count_(count), shift_(misaligned ? 1 : 0) {
    CHECK_CUDA(cudaMalloc(&base_, (count + 1) * sizeof(T)));
    CHECK_CUDA(cudaMemset(base_, 0, (count + 1) * sizeof(T)));
  }
  DeviceArray(const std::vector<T>& host, bool misaligned) : DeviceArray(host.size(), misaligned) {
    CHECK_CUDA(cudaMemcpy(get(), host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(base_); }

  T* get() const { return base_ + shift_; }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    CHECK_CUDA(cudaMemcpy(host.data(), get(), count_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* base_ = nullptr;
  size_t count_;
  size_t shift_;
};

// ---- test data ------------------------------------------------------------------------

struct Shape {
  int64_t n, c, s;
  pyeuler_layout_t layout;

  int64_t numel() const { return n * c * s; }
  int64_t at(int64_t i_n, int64_t i_c, int64_t i_s) const {
    return layout == PYEULER_LAYOUT_CHANNELS_LAST ? (i_n * s + i_s) * c + i_c
                                                  : (i_n * c + i_c) * s + i_s;
  }
  pyeuler_geometry_t geometry() const { return {n, c, s, layout}; }
  std::string name() const {
    return std::to_string(n) + "x" + std::to_string(c) + "x" + std::to_string(s) +
           (layout == PYEULER_LAYOUT_CHANNELS_LAST ? " channels_last" : " channels_first");
  }
};

// Host copy of a [C] or [N, C] coefficient plus its device twin.
struct Coef {
  std::vector<float> host;
  int64_t sample_stride;
  DeviceArray<float> device;

  Coef(std::vector<float> values, int64_t stride)
      : host(std::move(values)), sample_stride(stride), device(host, false) {}
  float at(int64_t n, int64_t c) const { return host[n * sample_stride + c]; }
  pyeuler_coef_t abi() const { return {device.get(), sample_stride}; }
};

class Random {
 public:
  explicit Random(unsigned seed) : engine_(seed) {}
  std::vector<float> uniform(size_t count, float lo, float hi) {
    std::uniform_real_distribution<float> dist(lo, hi);
    std::vector<float> out(count);
    for (float& v : out) v = dist(engine_);
    return out;
  }
  std::vector<uint8_t> bits(size_t count) {
    std::bernoulli_distribution dist(0.5);
    std::vector<uint8_t> out(count);
    for (uint8_t& v : out) v = dist(engine_) ? 1 : 0;
    return out;
  }

 private:
  std::mt19937 engine_;
};

// Values rounded to T, both as T (for the device) and as float (for the reference).
template <typename T>
struct Activation {
  std::vector<T> stored;
  std::vector<float> values;

  explicit Activation(const std::vector<float>& raw) {
    for (float v : raw) {
      stored.push_back(Dtype<T>::from_float(v));
      values.push_back(Dtype<T>::to_float(stored.back()));
    }
  }
};

// ---- comparison -----------------------------------------------------------------------

int g_failures = 0;

// |got - want| <= atol + rtol * |want| everywhere; reports the first violation.
void expect_close(const std::string& what, const std::vector<float>& got,
                  const std::vector<double>& want, double rtol, const std::vector<double>& atol) {
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want[i]);
    if (!(err <= atol[i] + rtol * std::fabs(want[i]))) {
      std::printf("FAIL %s: [%zu] got %.9g want %.9g\n", what.c_str(), i, got[i], want[i]);
      ++g_failures;
      return;
    }
  }
}

void expect_close(const std::string& what, const std::vector<float>& got,
                  const std::vector<double>& want, double rtol, double atol) {
  expect_close(what, got, want, rtol, std::vector<double>(want.size(), atol));
}

template <typename T>
std::vector<float> to_floats(const std::vector<T>& stored) {
  std::vector<float> out;
  for (const T& v : stored) out.push_back(Dtype<T>::to_float(v));
  return out;
}

void expect_equal(const std::string& what, const std::vector<uint8_t>& got,
                  const std::vector<uint8_t>& want) {
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[i] != want[i]) {
      std::printf("FAIL %s: [%zu] got %d want %d\n", what.c_str(), i, got[i], want[i]);
      ++g_failures;
      return;
    }
  }
}

// The kernels' rounding sequence for scale * x + shift (separate mul and add).
float affine(float scale, float x, float shift) {
  const volatile float product = scale * x;
  return product + shift;
}

// ---- the tests ------------------------------------------------------------------------

template <typename T>
void test_norm_stats(const Shape& shape, Random& rng, int64_t groups) {
  const Activation<T> x(rng.uniform(shape.numel(), -2.f, 3.f));
  DeviceArray<T> x_dev(x.stored, false);
  const int64_t units = groups == 0 ? shape.c : shape.n * groups;
  DeviceArray<float> mean(units, false), var(units, false);
  size_t bytes = 0;
  CHECK_CUDA(pyeuler_norm_stats_workspace_size(shape.geometry(), groups, &bytes));
  DeviceArray<unsigned char> workspace(bytes, false);
  CHECK_CUDA(pyeuler_norm_stats(x_dev.get(), Dtype<T>::kEnum, shape.geometry(), groups,
                                mean.get(), var.get(), workspace.get(), bytes, nullptr));

  std::vector<double> sum(units), sum_sq(units), count(units);
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t u = groups == 0 ? c : n * groups + c / (shape.c / groups);
        const double v = x.values[shape.at(n, c, s)];
        sum[u] += v, sum_sq[u] += v * v, count[u] += 1;
      }
  std::vector<double> want_mean(units), want_var(units);
  for (int64_t u = 0; u < units; ++u) {
    want_mean[u] = sum[u] / count[u];
    want_var[u] = sum_sq[u] / count[u] - want_mean[u] * want_mean[u];
  }
  const std::string what = std::string("norm_stats groups=") + std::to_string(groups) + " ";
  expect_close(what + "mean", mean.download(), want_mean, 1e-4, 1e-5);
  expect_close(what + "var", var.download(), want_var, 1e-4, 1e-5);
}

template <typename T>
void test_forward(const Shape& shape, Random& rng, bool with_shortcut, bool relu,
                  bool per_sample_coefs, bool misaligned) {
  const int64_t coef_rows = per_sample_coefs ? shape.n : 1;
  const Activation<T> x(rng.uniform(shape.numel(), -2.f, 2.f));
  const Activation<T> shortcut(rng.uniform(shape.numel(), -1.f, 1.f));
  const Coef scale(rng.uniform(coef_rows * shape.c, -1.5f, 1.5f), per_sample_coefs ? shape.c : 0);
  const Coef shift(rng.uniform(coef_rows * shape.c, -0.5f, 0.5f), per_sample_coefs ? shape.c : 0);
  DeviceArray<T> x_dev(x.stored, misaligned), shortcut_dev(shortcut.stored, misaligned);
  DeviceArray<T> y(shape.numel(), misaligned);
  DeviceArray<uint8_t> mask(shape.numel(), misaligned);
  CHECK_CUDA(pyeuler_affine_act_forward(x_dev.get(), with_shortcut ? shortcut_dev.get() : nullptr,
                                        Dtype<T>::kEnum, shape.geometry(), scale.abi(),
                                        shift.abi(), relu, y.get(), mask.get(), nullptr));

  std::vector<double> want_y(shape.numel());
  std::vector<uint8_t> want_mask(shape.numel());
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t i = shape.at(n, c, s);
        float v = affine(scale.at(n, c), x.values[i], shift.at(n, c));
        if (with_shortcut) v += shortcut.values[i];
        if (relu && v < 0.f) v = 0.f;
        want_y[i] = Dtype<T>::to_float(Dtype<T>::from_float(v));
        want_mask[i] = !(v <= 0.f);
      }
  const std::string what = std::string("forward shortcut=") + std::to_string(with_shortcut) +
                           " relu=" + std::to_string(relu) + " ";
  expect_close(what + "y", to_floats(y.download()), want_y, 0.0, 0.0);
  expect_equal(what + "mask", mask.download(), want_mask);
}

// Shared inputs of the two backward tests.
template <typename T>
struct BackwardCase {
  Shape shape;
  Activation<T> dy, x;
  std::vector<uint8_t> mask;
  Coef scale, shift, center;

  BackwardCase(const Shape& s, Random& rng, bool per_sample_coefs)
      : shape(s),
        dy(rng.uniform(s.numel(), -1.f, 1.f)),
        x(rng.uniform(s.numel(), -2.f, 3.f)),
        mask(rng.bits(s.numel())),
        scale(rng.uniform((per_sample_coefs ? s.n : 1) * s.c, -1.5f, 1.5f),
              per_sample_coefs ? s.c : 0),
        shift(rng.uniform((per_sample_coefs ? s.n : 1) * s.c, -0.5f, 0.5f),
              per_sample_coefs ? s.c : 0),
        center(rng.uniform((per_sample_coefs ? s.n : 1) * s.c, 0.f, 1.f),
               per_sample_coefs ? s.c : 0) {}

  // m = mask / recomputed ReLU gate / 1
  bool gate(int64_t n, int64_t c, int64_t i, bool use_mask, bool relu) const {
    return use_mask ? mask[i] != 0
                    : (!relu || !(affine(scale.at(n, c), x.values[i], shift.at(n, c)) <= 0.f));
  }
  // g = dy * m
  float gradient(int64_t n, int64_t c, int64_t i, bool use_mask, bool relu) const {
    return gate(n, c, i, use_mask, relu) ? dy.values[i] : 0.f;
  }
};

template <typename T>
void test_backward_reduce(const Shape& shape, Random& rng, bool use_mask, bool relu,
                          bool per_sample) {
  const BackwardCase<T> in(shape, rng, per_sample);
  DeviceArray<T> dy(in.dy.stored, false), x(in.x.stored, false);
  DeviceArray<uint8_t> mask(in.mask, false);
  const int64_t units = per_sample ? shape.n * shape.c : shape.c;
  DeviceArray<float> sum_g(units, false), sum_g_xc(units, false);
  size_t bytes = 0;
  CHECK_CUDA(
      pyeuler_affine_act_backward_reduce_workspace_size(shape.geometry(), per_sample, &bytes));
  DeviceArray<unsigned char> workspace(bytes, false);
  CHECK_CUDA(pyeuler_affine_act_backward_reduce(
      dy.get(), x.get(), use_mask ? mask.get() : nullptr, Dtype<T>::kEnum, shape.geometry(),
      in.scale.abi(), in.shift.abi(), in.center.abi(), relu, per_sample, sum_g.get(),
      sum_g_xc.get(), workspace.get(), bytes, nullptr));

  std::vector<double> want_g(units), want_g_xc(units), abs_g(units), abs_g_xc(units);
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t i = shape.at(n, c, s);
        const int64_t u = per_sample ? n * shape.c + c : c;
        const double g = in.gradient(n, c, i, use_mask, relu);
        const double g_xc = g * (double(in.x.values[i]) - in.center.at(n, c));
        want_g[u] += g, want_g_xc[u] += g_xc;
        abs_g[u] += std::fabs(g), abs_g_xc[u] += std::fabs(g_xc);
      }
  // float32 accumulation: error bounded relative to the sum of magnitudes
  for (int64_t u = 0; u < units; ++u) abs_g[u] = 1e-5 * abs_g[u] + 1e-6;
  for (int64_t u = 0; u < units; ++u) abs_g_xc[u] = 1e-5 * abs_g_xc[u] + 1e-6;
  const std::string what = std::string("backward_reduce mask=") + std::to_string(use_mask) +
                           " relu=" + std::to_string(relu) +
                           " per_sample=" + std::to_string(per_sample) + " ";
  expect_close(what + "sum_g", sum_g.download(), want_g, 0.0, abs_g);
  expect_close(what + "sum_g_xc", sum_g_xc.download(), want_g_xc, 0.0, abs_g_xc);
}

template <typename T>
void test_backward_apply(const Shape& shape, Random& rng, bool use_mask, bool relu,
                         bool per_sample_coefs, bool misaligned) {
  const BackwardCase<T> in(shape, rng, per_sample_coefs);
  const int64_t coef_rows = per_sample_coefs ? shape.n : 1;
  const int64_t stride = per_sample_coefs ? shape.c : 0;
  const Coef a(rng.uniform(coef_rows * shape.c, -1.f, 1.f), stride);
  const Coef b(rng.uniform(coef_rows * shape.c, -1.f, 1.f), stride);
  const Coef c_coef(rng.uniform(coef_rows * shape.c, -0.1f, 0.1f), stride);
  DeviceArray<T> dy(in.dy.stored, misaligned), x(in.x.stored, misaligned);
  DeviceArray<uint8_t> mask(in.mask, misaligned);
  DeviceArray<T> dx(shape.numel(), misaligned), dshortcut(shape.numel(), misaligned);
  CHECK_CUDA(pyeuler_affine_act_backward_apply(
      dy.get(), x.get(), use_mask ? mask.get() : nullptr, Dtype<T>::kEnum, shape.geometry(),
      in.scale.abi(), in.shift.abi(), relu, a.abi(), b.abi(), c_coef.abi(), in.center.abi(),
      dx.get(), dshortcut.get(), nullptr));

  std::vector<double> want_dx(shape.numel()), want_g(shape.numel()), atol(shape.numel());
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t i = shape.at(n, c, s);
        const double g = in.gradient(n, c, i, use_mask, relu);
        const double xc = double(in.x.values[i]) - in.center.at(n, c);
        want_dx[i] = a.at(n, c) * g + b.at(n, c) * xc + c_coef.at(n, c);
        want_g[i] = g;
        // float32 rounding of the three terms
        atol[i] = 1e-6 * (std::fabs(a.at(n, c) * g) + std::fabs(b.at(n, c) * xc) + 1.0);
      }
  const std::string what = std::string("backward_apply mask=") + std::to_string(use_mask) +
                           " relu=" + std::to_string(relu) + " ";
  expect_close(what + "dx", to_floats(dx.download()), want_dx, Dtype<T>::kRtol, atol);
  expect_close(what + "dshortcut", to_floats(dshortcut.download()), want_g, 0.0, 0.0);
}

// The IE-Skip step fused into the apply: x - 2γ·(e - θ·v), v the apply's dx (never written).
template <typename T>
void test_backward_apply_ie_update(const Shape& shape, Random& rng, bool use_mask, bool relu,
                                   bool per_sample_coefs, bool misaligned) {
  const double step_size = 0.1, theta = 0.75;
  const BackwardCase<T> in(shape, rng, per_sample_coefs);
  const int64_t coef_rows = per_sample_coefs ? shape.n : 1;
  const int64_t stride = per_sample_coefs ? shape.c : 0;
  const Coef a(rng.uniform(coef_rows * shape.c, -1.f, 1.f), stride);
  const Coef b(rng.uniform(coef_rows * shape.c, -1.f, 1.f), stride);
  const Coef c_coef(rng.uniform(coef_rows * shape.c, -0.1f, 0.1f), stride);
  const Activation<T> e(rng.uniform(shape.numel(), -1.f, 1.f));
  DeviceArray<T> dy(in.dy.stored, misaligned), x(in.x.stored, misaligned);
  DeviceArray<T> e_dev(e.stored, misaligned), x_new(shape.numel(), misaligned);
  DeviceArray<uint8_t> mask(in.mask, misaligned);
  CHECK_CUDA(pyeuler_affine_act_backward_apply_ie_update(
      dy.get(), x.get(), use_mask ? mask.get() : nullptr, Dtype<T>::kEnum, shape.geometry(),
      in.scale.abi(), in.shift.abi(), relu, a.abi(), b.abi(), c_coef.abi(), in.center.abi(),
      e_dev.get(), step_size, theta, x_new.get(), nullptr));

  std::vector<double> want(shape.numel()), atol(shape.numel());
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t i = shape.at(n, c, s);
        const double g = in.gradient(n, c, i, use_mask, relu);
        const double xc = double(in.x.values[i]) - in.center.at(n, c);
        const double v = a.at(n, c) * g + b.at(n, c) * xc + c_coef.at(n, c);
        const double step = 2.0 * step_size * (double(e.values[i]) - theta * v);
        want[i] = in.x.values[i] - step;
        // float32 rounding of v's three terms (scaled by 2γθ) and of the step's operations
        const double v_err = 1e-6 * (std::fabs(a.at(n, c) * g) + std::fabs(b.at(n, c) * xc) + 1.0);
        atol[i] = 2.0 * step_size * theta * v_err +
                  1e-6 * (std::fabs(in.x.values[i]) + std::fabs(step) + std::fabs(e.values[i]));
      }
  const std::string what = std::string("backward_apply_ie_update mask=") +
                           std::to_string(use_mask) + " relu=" + std::to_string(relu) + " ";
  expect_close(what + "x_new", to_floats(x_new.download()), want, Dtype<T>::kRtol, atol);
}

// Sums of ddx, ddx * (x - center) and ddx * g; misaligned pointers take the scalar path.
template <typename T>
void test_double_backward_reduce(const Shape& shape, Random& rng, bool use_mask, bool relu,
                                 bool per_sample, bool misaligned) {
  const BackwardCase<T> in(shape, rng, per_sample);
  const Activation<T> ddx(rng.uniform(shape.numel(), -1.f, 1.f));
  DeviceArray<T> ddx_dev(ddx.stored, misaligned), dy(in.dy.stored, misaligned),
      x(in.x.stored, misaligned);
  DeviceArray<uint8_t> mask(in.mask, misaligned);
  const int64_t units = per_sample ? shape.n * shape.c : shape.c;
  DeviceArray<float> sum_ddx(units, false), sum_ddx_xc(units, false), sum_ddx_g(units, false);
  size_t bytes = 0;
  CHECK_CUDA(pyeuler_affine_act_double_backward_reduce_workspace_size(shape.geometry(),
                                                                      per_sample, &bytes));
  DeviceArray<unsigned char> workspace(bytes, false);
  CHECK_CUDA(pyeuler_affine_act_double_backward_reduce(
      ddx_dev.get(), dy.get(), x.get(), use_mask ? mask.get() : nullptr, Dtype<T>::kEnum,
      shape.geometry(), in.scale.abi(), in.shift.abi(), in.center.abi(), relu, per_sample,
      sum_ddx.get(), sum_ddx_xc.get(), sum_ddx_g.get(), workspace.get(), bytes, nullptr));

  constexpr int kSums = 3;  // ddx, ddx * (x - center), ddx * g
  std::vector<double> want[kSums], atol[kSums];
  for (int k = 0; k < kSums; ++k) want[k].assign(units, 0.0), atol[k].assign(units, 0.0);
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t i = shape.at(n, c, s);
        const int64_t u = per_sample ? n * shape.c + c : c;
        const double dd = ddx.values[i];
        const double terms[kSums] = {dd, dd * (double(in.x.values[i]) - in.center.at(n, c)),
                                     dd * in.gradient(n, c, i, use_mask, relu)};
        for (int k = 0; k < kSums; ++k) want[k][u] += terms[k], atol[k][u] += std::fabs(terms[k]);
      }
  // float32 accumulation: error bounded relative to the sum of magnitudes
  for (int k = 0; k < kSums; ++k)
    for (double& bound : atol[k]) bound = 1e-5 * bound + 1e-6;
  const std::string what = std::string("double_backward_reduce mask=") +
                           std::to_string(use_mask) + " relu=" + std::to_string(relu) +
                           " per_sample=" + std::to_string(per_sample) + " ";
  expect_close(what + "sum_ddx", sum_ddx.download(), want[0], 0.0, atol[0]);
  expect_close(what + "sum_ddx_xc", sum_ddx_xc.download(), want[1], 0.0, atol[1]);
  expect_close(what + "sum_ddx_g", sum_ddx_g.download(), want[2], 0.0, atol[2]);
}

// ddy = m * (a * ddx + p + q * (x - center) + ddshortcut), dxx = b * ddx + q * g.
template <typename T>
void test_double_backward_apply(const Shape& shape, Random& rng, bool use_mask, bool relu,
                                bool with_ddshortcut, bool per_sample_coefs, bool misaligned) {
  const BackwardCase<T> in(shape, rng, per_sample_coefs);
  const int64_t coef_rows = per_sample_coefs ? shape.n : 1;
  const int64_t stride = per_sample_coefs ? shape.c : 0;
  const Coef a(rng.uniform(coef_rows * shape.c, -1.f, 1.f), stride);
  const Coef b(rng.uniform(coef_rows * shape.c, -1.f, 1.f), stride);
  const Coef p(rng.uniform(coef_rows * shape.c, -0.1f, 0.1f), stride);
  const Coef q(rng.uniform(coef_rows * shape.c, -1.f, 1.f), stride);
  const Activation<T> ddx(rng.uniform(shape.numel(), -1.f, 1.f));
  const Activation<T> ddshortcut(rng.uniform(shape.numel(), -1.f, 1.f));
  DeviceArray<T> ddx_dev(ddx.stored, misaligned), dy(in.dy.stored, misaligned),
      x(in.x.stored, misaligned), ddshortcut_dev(ddshortcut.stored, misaligned);
  DeviceArray<T> ddy(shape.numel(), misaligned), dxx(shape.numel(), misaligned);
  DeviceArray<uint8_t> mask(in.mask, misaligned);
  CHECK_CUDA(pyeuler_affine_act_double_backward_apply(
      ddx_dev.get(), dy.get(), x.get(), use_mask ? mask.get() : nullptr, Dtype<T>::kEnum,
      shape.geometry(), in.scale.abi(), in.shift.abi(), relu, a.abi(), b.abi(), p.abi(), q.abi(),
      in.center.abi(), with_ddshortcut ? ddshortcut_dev.get() : nullptr, ddy.get(), dxx.get(),
      nullptr));

  std::vector<double> want_ddy(shape.numel()), want_dxx(shape.numel());
  std::vector<double> atol_ddy(shape.numel()), atol_dxx(shape.numel());
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t i = shape.at(n, c, s);
        const double dd = ddx.values[i];
        const double xc = double(in.x.values[i]) - in.center.at(n, c);
        const double shortcut_term = with_ddshortcut ? ddshortcut.values[i] : 0.0;
        const double inner = a.at(n, c) * dd + p.at(n, c) + q.at(n, c) * xc + shortcut_term;
        const double g = in.gradient(n, c, i, use_mask, relu);
        want_ddy[i] = in.gate(n, c, i, use_mask, relu) ? inner : 0.0;
        want_dxx[i] = b.at(n, c) * dd + q.at(n, c) * g;
        // float32 rounding of the terms
        atol_ddy[i] = 1e-6 * (std::fabs(a.at(n, c) * dd) + std::fabs(q.at(n, c) * xc) +
                              std::fabs(shortcut_term) + 1.0);
        atol_dxx[i] = 1e-6 * (std::fabs(b.at(n, c) * dd) + std::fabs(q.at(n, c) * g) + 1.0);
      }
  const std::string what = std::string("double_backward_apply mask=") +
                           std::to_string(use_mask) + " relu=" + std::to_string(relu) +
                           " ddshortcut=" + std::to_string(with_ddshortcut) + " ";
  expect_close(what + "ddy", to_floats(ddy.download()), want_ddy, Dtype<T>::kRtol, atol_ddy);
  expect_close(what + "dxx", to_floats(dxx.download()), want_dxx, Dtype<T>::kRtol, atol_dxx);
}

template <typename T>
void test_ie(const Shape& shape, Random& rng, bool misaligned) {
  const double theta = 0.75, step_size = 0.1;
  const Activation<T> x(rng.uniform(shape.numel(), -2.f, 2.f));
  const Activation<T> c(rng.uniform(shape.numel(), -2.f, 2.f));
  const Activation<T> f(rng.uniform(shape.numel(), -2.f, 2.f));
  DeviceArray<T> x_dev(x.stored, misaligned), c_dev(c.stored, misaligned),
      f_dev(f.stored, misaligned), out(shape.numel(), misaligned);

  CHECK_CUDA(pyeuler_ie_residual(x_dev.get(), c_dev.get(), f_dev.get(), Dtype<T>::kEnum,
                                 shape.numel(), theta, out.get(), nullptr));
  std::vector<double> want(shape.numel());
  for (int64_t i = 0; i < shape.numel(); ++i) {
    const volatile float difference = x.values[i] - c.values[i];
    const volatile float scaled = float(theta) * f.values[i];
    want[i] = Dtype<T>::to_float(Dtype<T>::from_float(difference - scaled));
  }
  expect_close("ie_residual", to_floats(out.download()), want, 0.0, 0.0);

  CHECK_CUDA(pyeuler_ie_update(x_dev.get(), c_dev.get(), f_dev.get(), Dtype<T>::kEnum,
                               shape.numel(), step_size, theta, out.get(), nullptr));
  for (int64_t i = 0; i < shape.numel(); ++i) {
    const volatile float scaled_v = float(theta) * f.values[i];
    const volatile float inner = c.values[i] - scaled_v;
    const volatile float step = float(2.0 * step_size) * inner;
    want[i] = Dtype<T>::to_float(Dtype<T>::from_float(x.values[i] - step));
  }
  expect_close("ie_update", to_floats(out.download()), want, 0.0, 0.0);
}

template <typename T>
void test_dtype(Random& rng) {
  // odd sizes (scalar paths), vector-friendly sizes, S = 1, and one shape large enough
  // for many splits per reduction unit
  const Shape base_shapes[] = {{3, 5, 7},   {2, 16, 64}, {4, 24, 9},
                               {5, 6, 1},   {2, 3, 515}, {64, 40, 16}};
  for (const Shape& base : base_shapes) {
    for (pyeuler_layout_t layout : {PYEULER_LAYOUT_CHANNELS_FIRST, PYEULER_LAYOUT_CHANNELS_LAST}) {
      Shape shape = base;
      shape.layout = layout;
      const int failures_before = g_failures;
      const int64_t groups = shape.c % 4 == 0 ? 4 : shape.c % 3 == 0 ? 3 : 1;
      test_norm_stats<T>(shape, rng, 0);
      test_norm_stats<T>(shape, rng, 1);
      test_norm_stats<T>(shape, rng, groups);
      for (bool misaligned : {false, true}) {
        test_forward<T>(shape, rng, true, true, false, misaligned);
        test_forward<T>(shape, rng, false, false, true, misaligned);
        test_backward_apply<T>(shape, rng, true, true, false, misaligned);
        test_backward_apply<T>(shape, rng, false, true, true, misaligned);
        test_backward_apply_ie_update<T>(shape, rng, true, true, false, misaligned);
        test_backward_apply_ie_update<T>(shape, rng, false, true, true, misaligned);
        test_backward_apply_ie_update<T>(shape, rng, false, false, false, misaligned);
        test_double_backward_apply<T>(shape, rng, true, true, true, false, misaligned);
        test_double_backward_apply<T>(shape, rng, false, true, false, true, misaligned);
        test_double_backward_apply<T>(shape, rng, false, false, true, false, misaligned);
        test_ie<T>(shape, rng, misaligned);
      }
      test_backward_reduce<T>(shape, rng, true, true, false);
      test_backward_reduce<T>(shape, rng, false, true, false);
      test_backward_reduce<T>(shape, rng, false, false, false);
      test_backward_reduce<T>(shape, rng, false, true, true);
      test_backward_reduce<T>(shape, rng, true, false, true);
      test_double_backward_reduce<T>(shape, rng, true, true, false, false);
      test_double_backward_reduce<T>(shape, rng, false, true, false, false);
      test_double_backward_reduce<T>(shape, rng, false, false, true, false);
      test_double_backward_reduce<T>(shape, rng, false, true, true, true);
      test_double_backward_reduce<T>(shape, rng, true, false, false, true);
      std::printf("%-4s %-8s %s\n", g_failures == failures_before ? "ok" : "FAIL",
                  Dtype<T>::kName, shape.name().c_str());
    }
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device\n");
    return kSkipReturnCode;
  }
  Random rng(1234);
  test_dtype<float>(rng);
  test_dtype<__half>(rng);
  test_dtype<__nv_bfloat16>(rng);
  if (g_failures != 0) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all kernel tests passed\n");
  return 0;
}
