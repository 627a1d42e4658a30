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
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
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
  // ±2^k with k uniform in [lo_exp, hi_exp]: a product with one is exact
  std::vector<float> signed_powers_of_two(size_t count, int lo_exp, int hi_exp) {
    std::uniform_int_distribution<int> exponent(lo_exp, hi_exp);
    std::bernoulli_distribution negative(0.5);
    std::vector<float> out(count);
    for (float& v : out) v = std::ldexp(negative(engine_) ? -1.f : 1.f, exponent(engine_));
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

// sum_g, sum_g_xc ([C], or [N, C] per sample) and the workspace of a first-order reduce.
struct FirstOrderSums {
  int64_t units;
  size_t bytes;
  DeviceArray<float> sum_g, sum_g_xc;
  DeviceArray<unsigned char> workspace;

  FirstOrderSums(const Shape& shape, bool per_sample)
      : units(per_sample ? shape.n * shape.c : shape.c),
        bytes(workspace_size(shape, per_sample)),
        sum_g(units, false),
        sum_g_xc(units, false),
        workspace(bytes, false) {}

  static size_t workspace_size(const Shape& shape, bool per_sample) {
    size_t bytes = 0;
    CHECK_CUDA(
        pyeuler_affine_act_backward_reduce_workspace_size(shape.geometry(), per_sample, &bytes));
    return bytes;
  }
};

// Shared inputs of the backward tests.
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

  // A first-order reduce's sums against float64 sums over (N, S), or S per sample.
  void expect_sums(const std::string& what, bool use_mask, bool relu, bool per_sample,
                   const FirstOrderSums& out) const {
    const int64_t units = out.units;
    std::vector<double> want_g(units), want_g_xc(units), abs_g(units), abs_g_xc(units);
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t c = 0; c < shape.c; ++c)
        for (int64_t s = 0; s < shape.s; ++s) {
          const int64_t i = shape.at(n, c, s);
          const int64_t u = per_sample ? n * shape.c + c : c;
          const double g = gradient(n, c, i, use_mask, relu);
          const double g_xc = g * (double(x.values[i]) - center.at(n, c));
          want_g[u] += g, want_g_xc[u] += g_xc;
          abs_g[u] += std::fabs(g), abs_g_xc[u] += std::fabs(g_xc);
        }
    // float32 accumulation: error bounded relative to the sum of magnitudes
    for (int64_t u = 0; u < units; ++u) abs_g[u] = 1e-5 * abs_g[u] + 1e-6;
    for (int64_t u = 0; u < units; ++u) abs_g_xc[u] = 1e-5 * abs_g_xc[u] + 1e-6;
    expect_close(what + "sum_g", out.sum_g.download(), want_g, 0.0, abs_g);
    expect_close(what + "sum_g_xc", out.sum_g_xc.download(), want_g_xc, 0.0, abs_g_xc);
  }
};

template <typename T>
void test_backward_reduce(const Shape& shape, Random& rng, bool use_mask, bool relu,
                          bool per_sample) {
  const BackwardCase<T> in(shape, rng, per_sample);
  DeviceArray<T> dy(in.dy.stored, false), x(in.x.stored, false);
  DeviceArray<uint8_t> mask(in.mask, false);
  const FirstOrderSums out(shape, per_sample);
  CHECK_CUDA(pyeuler_affine_act_backward_reduce(
      dy.get(), x.get(), use_mask ? mask.get() : nullptr, Dtype<T>::kEnum, shape.geometry(),
      in.scale.abi(), in.shift.abi(), in.center.abi(), relu, per_sample, out.sum_g.get(),
      out.sum_g_xc.get(), out.workspace.get(), out.bytes, nullptr));
  const std::string what = std::string("backward_reduce mask=") + std::to_string(use_mask) +
                           " relu=" + std::to_string(relu) +
                           " per_sample=" + std::to_string(per_sample) + " ";
  in.expect_sums(what, use_mask, relu, per_sample, out);
}

// The reduce that recomputes the gate and also writes y = act(scale * x + shift) in Y: the
// sums as the plain reduce's, y bit for bit (float32 arithmetic rounded once to Y, whatever
// x's dtype); misaligned pointers take the scalar path.
template <typename T, typename Y>
void test_backward_reduce_recompute(const Shape& shape, Random& rng, bool relu, bool per_sample,
                                    bool misaligned) {
  const BackwardCase<T> in(shape, rng, per_sample);
  DeviceArray<T> dy(in.dy.stored, misaligned), x(in.x.stored, misaligned);
  DeviceArray<Y> y(shape.numel(), misaligned);
  const FirstOrderSums out(shape, per_sample);
  CHECK_CUDA(pyeuler_affine_act_backward_reduce_recompute(
      dy.get(), x.get(), Dtype<T>::kEnum, shape.geometry(), in.scale.abi(), in.shift.abi(),
      in.center.abi(), relu, per_sample, out.sum_g.get(), out.sum_g_xc.get(), y.get(),
      Dtype<Y>::kEnum, out.workspace.get(), out.bytes, nullptr));

  std::vector<double> want_y(shape.numel());
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t i = shape.at(n, c, s);
        float v = affine(in.scale.at(n, c), in.x.values[i], in.shift.at(n, c));
        if (relu && v < 0.f) v = 0.f;
        want_y[i] = Dtype<Y>::to_float(Dtype<Y>::from_float(v));
      }
  const std::string what = std::string("backward_reduce_recompute y=") + Dtype<Y>::kName +
                           " relu=" + std::to_string(relu) + " per_sample=" +
                           std::to_string(per_sample) + " misaligned=" +
                           std::to_string(misaligned) + " ";
  expect_close(what + "y", to_floats(y.download()), want_y, 0.0, 0.0);
  in.expect_sums(what, false, relu, per_sample, out);
}

// An apply's a, b and c ([C], or [N, C] per sample): a and b in [-1, 1], or (exact_products)
// signed powers of two; c in [-0.1, 0.1].
struct ApplyCoefs {
  Coef a, b, c;

  ApplyCoefs(const Shape& shape, Random& rng, bool per_sample, bool exact_products = false)
      : a(draw(shape, rng, per_sample, exact_products), per_sample ? shape.c : 0),
        b(draw(shape, rng, per_sample, exact_products), per_sample ? shape.c : 0),
        c(rng.uniform((per_sample ? shape.n : 1) * shape.c, -0.1f, 0.1f),
          per_sample ? shape.c : 0) {}

  static std::vector<float> draw(const Shape& shape, Random& rng, bool per_sample,
                                 bool exact_products) {
    const size_t count = (per_sample ? shape.n : 1) * shape.c;
    return exact_products ? rng.signed_powers_of_two(count, -2, 2)
                          : rng.uniform(count, -1.f, 1.f);
  }
};

// dx = a * g + b * (x - center) + c (+ dx_addend with_addend), dshortcut = g.
template <typename T>
void test_backward_apply(const Shape& shape, Random& rng, bool use_mask, bool relu,
                         bool per_sample_coefs, bool with_addend, bool misaligned) {
  const BackwardCase<T> in(shape, rng, per_sample_coefs);
  const auto& [a, b, c_coef] = ApplyCoefs(shape, rng, per_sample_coefs);
  const Activation<T> addend(rng.uniform(shape.numel(), -1.f, 1.f));
  DeviceArray<T> dy(in.dy.stored, misaligned), x(in.x.stored, misaligned),
      addend_dev(addend.stored, misaligned);
  DeviceArray<uint8_t> mask(in.mask, misaligned);
  DeviceArray<T> dx(shape.numel(), misaligned), dshortcut(shape.numel(), misaligned);
  CHECK_CUDA(pyeuler_affine_act_backward_apply(
      dy.get(), x.get(), use_mask ? mask.get() : nullptr, Dtype<T>::kEnum, shape.geometry(),
      in.scale.abi(), in.shift.abi(), relu, a.abi(), b.abi(), c_coef.abi(), in.center.abi(),
      with_addend ? addend_dev.get() : nullptr, nullptr, dx.get(), dshortcut.get(), nullptr));

  std::vector<double> want_dx(shape.numel()), want_g(shape.numel()), atol(shape.numel());
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t i = shape.at(n, c, s);
        const double g = in.gradient(n, c, i, use_mask, relu);
        const double xc = double(in.x.values[i]) - in.center.at(n, c);
        const double added = with_addend ? double(addend.values[i]) : 0.0;
        want_dx[i] = a.at(n, c) * g + b.at(n, c) * xc + c_coef.at(n, c) + added;
        want_g[i] = g;
        // float32 rounding of the terms
        atol[i] = 1e-6 * (std::fabs(a.at(n, c) * g) + std::fabs(b.at(n, c) * xc) +
                          std::fabs(added) + 1.0);
      }
  const std::string what = std::string("backward_apply mask=") + std::to_string(use_mask) +
                           " relu=" + std::to_string(relu) + " addend=" +
                           std::to_string(with_addend) + " ";
  expect_close(what + "dx", to_floats(dx.download()), want_dx, Dtype<T>::kRtol, atol);
  expect_close(what + "dshortcut", to_floats(dshortcut.download()), want_g, 0.0, 0.0);
}

// The addends' rounding sequence, bit for bit: dx = (base + dx_addend) + dx_addend2 in
// float32, rounded once to T, with only the first, only the second or both addends (the
// other NULL).  a and b are signed powers of two, so that a * g and b * (x - center) are
// exact and base = (a * g + b * (x - center)) + c rounds the same whether or not the
// compiler fuses a multiply into an add.
template <typename T>
void test_backward_apply_addends(const Shape& shape, Random& rng, bool use_mask, bool relu,
                                 bool per_sample_coefs, bool misaligned) {
  const BackwardCase<T> in(shape, rng, per_sample_coefs);
  const auto& [a, b, c_coef] = ApplyCoefs(shape, rng, per_sample_coefs, true);
  const Activation<T> first(rng.uniform(shape.numel(), -1.f, 1.f));
  const Activation<T> second(rng.uniform(shape.numel(), -0.01f, 0.01f));
  DeviceArray<T> dy(in.dy.stored, misaligned), x(in.x.stored, misaligned),
      first_dev(first.stored, misaligned), second_dev(second.stored, misaligned);
  DeviceArray<uint8_t> mask(in.mask, misaligned);
  struct AddendCase {
    bool first, second;
  };
  for (const AddendCase given : {AddendCase{false, true}, AddendCase{true, true},
                                 AddendCase{true, false}}) {
    DeviceArray<T> dx(shape.numel(), misaligned), dshortcut(shape.numel(), misaligned);
    CHECK_CUDA(pyeuler_affine_act_backward_apply(
        dy.get(), x.get(), use_mask ? mask.get() : nullptr, Dtype<T>::kEnum, shape.geometry(),
        in.scale.abi(), in.shift.abi(), relu, a.abi(), b.abi(), c_coef.abi(), in.center.abi(),
        given.first ? first_dev.get() : nullptr, given.second ? second_dev.get() : nullptr,
        dx.get(), dshortcut.get(), nullptr));

    std::vector<double> want_dx(shape.numel()), want_g(shape.numel());
    for (int64_t n = 0; n < shape.n; ++n)
      for (int64_t c = 0; c < shape.c; ++c)
        for (int64_t s = 0; s < shape.s; ++s) {
          const int64_t i = shape.at(n, c, s);
          const float g = in.gradient(n, c, i, use_mask, relu);
          const volatile float xc = in.x.values[i] - in.center.at(n, c);
          const volatile float terms = a.at(n, c) * g + b.at(n, c) * xc;  // exact products
          volatile float sum = terms + c_coef.at(n, c);
          if (given.first) sum = sum + first.values[i];
          if (given.second) sum = sum + second.values[i];
          want_dx[i] = Dtype<T>::to_float(Dtype<T>::from_float(sum));
          want_g[i] = g;
        }
    const std::string what = std::string("backward_apply addends first=") +
                             std::to_string(given.first) + " second=" +
                             std::to_string(given.second) + " mask=" + std::to_string(use_mask) +
                             " relu=" + std::to_string(relu) + " misaligned=" +
                             std::to_string(misaligned) + " ";
    expect_close(what + "dx", to_floats(dx.download()), want_dx, 0.0, 0.0);
    expect_close(what + "dshortcut", to_floats(dshortcut.download()), want_g, 0.0, 0.0);
  }
}

// The IE-Skip step fused into the apply: x - 2γ·(e - θ·v) as (x + residual_coef·r) + 2γθ·v,
// from r = e (residual_coef = -2γ) or from its term r = -2γ·e (residual_coef = 1); v the
// apply's dx (never written).
template <typename T>
void test_backward_apply_ie_update(const Shape& shape, Random& rng, bool use_mask, bool relu,
                                   bool per_sample_coefs, bool residual_is_term,
                                   bool misaligned) {
  const double step_size = 0.1, theta = 0.75;
  const BackwardCase<T> in(shape, rng, per_sample_coefs);
  const auto& [a, b, c_coef] = ApplyCoefs(shape, rng, per_sample_coefs);
  const Activation<T> residual(rng.uniform(shape.numel(), -1.f, 1.f));
  DeviceArray<T> dy(in.dy.stored, misaligned), x(in.x.stored, misaligned);
  DeviceArray<T> residual_dev(residual.stored, misaligned), x_new(shape.numel(), misaligned);
  DeviceArray<uint8_t> mask(in.mask, misaligned);
  CHECK_CUDA(pyeuler_affine_act_backward_apply_ie_update(
      dy.get(), x.get(), use_mask ? mask.get() : nullptr, Dtype<T>::kEnum, shape.geometry(),
      in.scale.abi(), in.shift.abi(), relu, a.abi(), b.abi(), c_coef.abi(), in.center.abi(),
      residual_dev.get(), step_size, theta, residual_is_term, x_new.get(), nullptr));
  const double residual_coef = residual_is_term ? 1.0 : -2.0 * step_size;

  std::vector<double> want(shape.numel()), atol(shape.numel());
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t i = shape.at(n, c, s);
        const double g = in.gradient(n, c, i, use_mask, relu);
        const double xc = double(in.x.values[i]) - in.center.at(n, c);
        const double v = a.at(n, c) * g + b.at(n, c) * xc + c_coef.at(n, c);
        const double scaled_v = 2.0 * step_size * theta * v;
        const double scaled_r = residual_coef * residual.values[i];
        want[i] = double(in.x.values[i]) + scaled_r + scaled_v;
        // float32 rounding of v's three terms (scaled by 2γθ) and of the step's operations
        const double v_err = 1e-6 * (std::fabs(a.at(n, c) * g) + std::fabs(b.at(n, c) * xc) + 1.0);
        atol[i] = 2.0 * step_size * theta * v_err +
                  1e-6 * (std::fabs(in.x.values[i]) + std::fabs(scaled_r) + std::fabs(scaled_v));
      }
  const std::string what = std::string("backward_apply_ie_update mask=") +
                           std::to_string(use_mask) + " relu=" + std::to_string(relu) +
                           " residual_is_term=" + std::to_string(residual_is_term) + " ";
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

// ddy = m * (a * dd + p + q * (x - center) + ddshortcut), dxx = b * dd + q * g + addend,
// dd = ddx_scale * ddx; with a ddshortcut also the IE update's terms (ddx_scale 0.5, ddx as
// the addend), else ddx_scale 1 and no addend.
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
  const float ddx_scale = with_ddshortcut ? 0.5f : 1.f;
  CHECK_CUDA(pyeuler_affine_act_double_backward_apply(
      ddx_dev.get(), dy.get(), x.get(), use_mask ? mask.get() : nullptr, Dtype<T>::kEnum,
      shape.geometry(), in.scale.abi(), in.shift.abi(), relu, a.abi(), b.abi(), p.abi(), q.abi(),
      in.center.abi(), with_ddshortcut ? ddshortcut_dev.get() : nullptr, ddx_scale,
      with_ddshortcut ? ddx_dev.get() : nullptr, ddy.get(), dxx.get(), nullptr));

  std::vector<double> want_ddy(shape.numel()), want_dxx(shape.numel());
  std::vector<double> atol_ddy(shape.numel()), atol_dxx(shape.numel());
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t i = shape.at(n, c, s);
        const double dd = double(ddx_scale) * ddx.values[i];
        const double addend = with_ddshortcut ? double(ddx.values[i]) : 0.0;
        const double xc = double(in.x.values[i]) - in.center.at(n, c);
        const double shortcut_term = with_ddshortcut ? ddshortcut.values[i] : 0.0;
        const double inner = a.at(n, c) * dd + p.at(n, c) + q.at(n, c) * xc + shortcut_term;
        const double g = in.gradient(n, c, i, use_mask, relu);
        want_ddy[i] = in.gate(n, c, i, use_mask, relu) ? inner : 0.0;
        want_dxx[i] = (b.at(n, c) == 0.f ? 0.f : b.at(n, c) * dd) +
                      (q.at(n, c) == 0.f ? 0.f : q.at(n, c) * g) + addend;
        // float32 rounding of the terms
        atol_ddy[i] = 1e-6 * (std::fabs(a.at(n, c) * dd) + std::fabs(q.at(n, c) * xc) +
                              std::fabs(shortcut_term) + 1.0);
        atol_dxx[i] = 1e-6 * (std::fabs(b.at(n, c) * dd) + std::fabs(q.at(n, c) * g) +
                              std::fabs(addend) + 1.0);
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

// The residual with its term (-2γ·e from e in float32, before rounding), and that map's
// adjoint u = de - 2γ·dterm, (dx, dc, dfx) = (u, -u, -θ·u), with dfx written or (NULL) not,
// and with an addend summed into dx alone (dx = u + dx_addend in float32): bit for bit
// against the kernels' rounding sequence.
template <typename T>
void test_ie_residual_with_term(const Shape& shape, Random& rng, bool misaligned) {
  const double theta = 0.75, step_size = 0.1;
  const int64_t numel = shape.numel();
  const Activation<T> x(rng.uniform(numel, -2.f, 2.f)), c(rng.uniform(numel, -2.f, 2.f)),
      f(rng.uniform(numel, -2.f, 2.f));
  DeviceArray<T> x_dev(x.stored, misaligned), c_dev(c.stored, misaligned),
      f_dev(f.stored, misaligned), e(numel, misaligned), term(numel, misaligned),
      e_alone(numel, misaligned);
  CHECK_CUDA(pyeuler_ie_residual_with_term(x_dev.get(), c_dev.get(), f_dev.get(), Dtype<T>::kEnum,
                                           numel, theta, step_size, e.get(), term.get(),
                                           nullptr));
  CHECK_CUDA(pyeuler_ie_residual(x_dev.get(), c_dev.get(), f_dev.get(), Dtype<T>::kEnum, numel,
                                 theta, e_alone.get(), nullptr));
  std::vector<double> want_e(numel), want_term(numel);
  for (int64_t i = 0; i < numel; ++i) {
    const volatile float difference = x.values[i] - c.values[i];
    const volatile float scaled = float(theta) * f.values[i];
    const volatile float residual = difference - scaled;
    want_e[i] = Dtype<T>::to_float(Dtype<T>::from_float(residual));
    want_term[i] = Dtype<T>::to_float(Dtype<T>::from_float(float(-2.0 * step_size) * residual));
  }
  const std::string what = std::string("ie_residual_with_term misaligned=") +
                           std::to_string(misaligned) + " ";
  expect_close(what + "e", to_floats(e.download()), want_e, 0.0, 0.0);
  expect_close(what + "term", to_floats(term.download()), want_term, 0.0, 0.0);
  expect_close(what + "ie_residual", to_floats(e_alone.download()), want_e, 0.0, 0.0);

  // the adjoint, from de = x and dterm = c (and dx_addend = f)
  struct AdjointCase {
    double theta;
    bool with_addend;
  };
  for (const AdjointCase adjoint_case : {AdjointCase{theta, false}, AdjointCase{1.0, false},
                                         AdjointCase{theta, true}, AdjointCase{1.0, true}}) {
    const double adjoint_theta = adjoint_case.theta;
    const bool write_dfx = adjoint_theta != 1.0, with_addend = adjoint_case.with_addend;
    DeviceArray<T> dx(numel, misaligned), dc(numel, misaligned), dfx(numel, misaligned);
    CHECK_CUDA(pyeuler_ie_residual_with_term_adjoint(
        x_dev.get(), c_dev.get(), Dtype<T>::kEnum, numel, adjoint_theta, step_size,
        with_addend ? f_dev.get() : nullptr, dx.get(), dc.get(), write_dfx ? dfx.get() : nullptr,
        nullptr));
    std::vector<double> want_dx(numel), want_dc(numel), want_dfx(numel);
    for (int64_t i = 0; i < numel; ++i) {
      const volatile float scaled = float(2.0 * step_size) * c.values[i];
      const volatile float u = x.values[i] - scaled;
      const volatile float u_plus_addend = u + (with_addend ? f.values[i] : 0.f);
      want_dx[i] = Dtype<T>::to_float(Dtype<T>::from_float(with_addend ? u_plus_addend : u));
      want_dc[i] = Dtype<T>::to_float(Dtype<T>::from_float(-u));
      const float minus_theta_u = float(-adjoint_theta) * u;
      // NULL dfx: the buffer keeps its zeros
      want_dfx[i] = write_dfx ? Dtype<T>::to_float(Dtype<T>::from_float(minus_theta_u)) : 0.0;
    }
    const std::string adjoint = std::string("ie_residual_with_term_adjoint theta=") +
                                std::to_string(adjoint_theta) + " addend=" +
                                std::to_string(with_addend) + " misaligned=" +
                                std::to_string(misaligned) + " ";
    expect_close(adjoint + "dx", to_floats(dx.download()), want_dx, 0.0, 0.0);
    expect_close(adjoint + "dc", to_floats(dc.download()), want_dc, 0.0, 0.0);
    expect_close(adjoint + "dfx", to_floats(dfx.download()), want_dfx, 0.0, 0.0);
  }
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
        test_backward_apply<T>(shape, rng, true, true, false, false, misaligned);
        test_backward_apply<T>(shape, rng, false, true, true, false, misaligned);
        test_backward_apply<T>(shape, rng, false, true, false, true, misaligned);
        test_backward_apply<T>(shape, rng, true, false, true, true, misaligned);
        test_backward_apply_addends<T>(shape, rng, true, false, false, misaligned);
        test_backward_apply_addends<T>(shape, rng, false, true, true, misaligned);
        test_backward_apply_ie_update<T>(shape, rng, true, true, false, true, misaligned);
        test_backward_apply_ie_update<T>(shape, rng, false, true, true, false, misaligned);
        test_backward_apply_ie_update<T>(shape, rng, false, false, false, true, misaligned);
        test_backward_apply_ie_update<T>(shape, rng, true, false, true, false, misaligned);
        test_double_backward_apply<T>(shape, rng, true, true, true, false, misaligned);
        test_double_backward_apply<T>(shape, rng, false, true, false, true, misaligned);
        test_double_backward_apply<T>(shape, rng, false, false, true, false, misaligned);
        test_ie<T>(shape, rng, misaligned);
        test_ie_residual_with_term<T>(shape, rng, misaligned);
      }
      test_backward_reduce<T>(shape, rng, true, true, false);
      test_backward_reduce<T>(shape, rng, false, true, false);
      test_backward_reduce<T>(shape, rng, false, false, false);
      test_backward_reduce<T>(shape, rng, false, true, true);
      test_backward_reduce<T>(shape, rng, true, false, true);
      test_backward_reduce_recompute<T, T>(shape, rng, true, false, false);
      test_backward_reduce_recompute<T, T>(shape, rng, false, true, true);
      test_backward_reduce_recompute<T, float>(shape, rng, true, true, false);
      test_backward_reduce_recompute<T, __half>(shape, rng, false, false, false);
      test_backward_reduce_recompute<T, __nv_bfloat16>(shape, rng, true, false, true);
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


// ---- the per-channel algebra (norm_coefficients.cu) -----------------------------------
// Double-precision references of pyeuler/ops/norm_algebra.py over every flag combination:
// BatchNorm and GroupNorm layouts (groups of 1, 3, 4 and 80 channels, 1 to 40 samples, an
// empty batch), weight / bias absent or present in every parameter dtype (one strided),
// h absent (h_value 1 or 0.3), 0-dim or per channel, sums and dmean / dvar present or not,
// and every needs combination.  Sums are compared relative to the sum of their terms'
// magnitudes (float32 accumulation in another order).

// The statistics' layout of one case (kernels/pyeuler_kernels.h).
struct AlgebraShape {
  int64_t n, c, groups;  // groups 0: BatchNorm

  int64_t samples() const { return groups == 0 ? 1 : n; }
  int64_t stat_groups() const { return groups == 0 ? c : groups; }
  int64_t group_channels() const { return groups == 0 ? 1 : c / groups; }
  int64_t stats() const { return samples() * stat_groups(); }
  int64_t coefs() const { return samples() * c; }
  int64_t stat(int64_t i_n, int64_t i_c) const {
    return i_n * stat_groups() + i_c / group_channels();
  }
  std::string name() const {
    return (groups == 0 ? std::string("BN C=") + std::to_string(c)
                        : std::string("GN N=") + std::to_string(n) + " C=" + std::to_string(c) +
                              " G=" + std::to_string(groups));
  }
};

// An optional per-channel parameter stored in `dtype` with an element stride (0: one value,
// a 0-dim tensor), and its values as the kernel reads them.
struct Param {
  bool present = false;
  pyeuler_dtype_t dtype = PYEULER_DTYPE_FLOAT32;
  int64_t stride = 1;
  std::vector<float> values;  // per channel, rounded to dtype
  std::unique_ptr<DeviceArray<unsigned char>> device;

  Param() = default;
  Param(Random& rng, int64_t channels, pyeuler_dtype_t dtype_, int64_t stride_, float lo, float hi)
      : present(true), dtype(dtype_), stride(stride_) {
    const size_t element = dtype == PYEULER_DTYPE_FLOAT32 ? 4 : 2;
    const int64_t stored = stride == 0 ? 1 : (channels - 1) * stride + 1;
    std::vector<unsigned char> bytes(stored * element, 0);
    const std::vector<float> raw = rng.uniform(stored, lo, hi);
    for (int64_t i = 0; i < stored; ++i) {
      float v = raw[i];
      if (dtype == PYEULER_DTYPE_FLOAT16) {
        const __half stored_v = Dtype<__half>::from_float(v);
        v = Dtype<__half>::to_float(stored_v);
        std::memcpy(&bytes[i * element], &stored_v, element);
      } else if (dtype == PYEULER_DTYPE_BFLOAT16) {
        const __nv_bfloat16 stored_v = Dtype<__nv_bfloat16>::from_float(v);
        v = Dtype<__nv_bfloat16>::to_float(stored_v);
        std::memcpy(&bytes[i * element], &stored_v, element);
      } else {
        std::memcpy(&bytes[i * element], &v, element);
      }
      if (stride == 0 || i % stride == 0) {
        const int64_t copies = stride == 0 ? channels : 1;
        for (int64_t k = 0; k < copies; ++k) values.push_back(v);
      }
    }
    device = std::make_unique<DeviceArray<unsigned char>>(bytes, false);
  }
  pyeuler_param_t abi() const {
    return {present ? static_cast<const void*>(device->get()) : nullptr, dtype, stride};
  }
  double at(int64_t c, double absent) const { return present ? values[c] : absent; }
};

const pyeuler_dtype_t kParamDtypes[] = {PYEULER_DTYPE_FLOAT32, PYEULER_DTYPE_FLOAT16,
                                        PYEULER_DTYPE_BFLOAT16};

// Statistics (and the gradients into them) of one shape, host and device.
struct StatVector {
  std::vector<float> host;
  DeviceArray<float> device;
  StatVector(std::vector<float> values) : host(std::move(values)), device(host, false) {}
};

// The forward coefficients of float32 statistics, in double, checked against the kernel's.
void expect_forward_coefficients(const AlgebraShape& shape, const Param& weight,
                                 const Param& bias, const Param& h, double h_value, double eps,
                                 const std::vector<float>& mean, const std::vector<float>& var,
                                 const std::vector<float>& scale, const std::vector<float>& shift,
                                 const std::string& what) {
  if (shape.coefs() == 0) return;
  std::vector<double> want_scale(shape.coefs()), want_shift(shape.coefs()), atol(shape.coefs());
  for (int64_t n = 0; n < shape.samples(); ++n)
    for (int64_t c = 0; c < shape.c; ++c) {
      const int64_t i = n * shape.c + c, s = shape.stat(n, c);
      const double invstd = 1.0 / std::sqrt(double(var[s]) + double(float(eps)));
      const double step = h.at(c, double(float(h_value)));
      const double sc = step * weight.at(c, 1.0) * invstd;
      const double hb = bias.present ? step * bias.at(c, 0.0) : 0.0;
      want_scale[i] = sc;
      want_shift[i] = -sc * mean[s] + hb;
      atol[i] = 2e-6 * (std::fabs(sc * mean[s]) + std::fabs(hb)) + 1e-12;
    }
  // float32: var + eps, rsqrtf (2 ulp) and one rounding per operation
  expect_close(what + " scale", scale, want_scale, 2e-6, 0.0);
  expect_close(what + " shift", shift, want_shift, 2e-6, atol);
}

void test_forward_coefficients(const AlgebraShape& shape, const Param& weight, const Param& bias,
                               const Param& h, double h_value, const StatVector& mean,
                               const StatVector& var, const std::string& what) {
  const double eps = 1e-5;
  const int64_t count = std::max<int64_t>(shape.coefs(), 1);
  DeviceArray<float> scale(count, false), shift(count, false);
  CHECK_CUDA(pyeuler_forward_coefficients(mean.device.get(), var.device.get(), shape.n, shape.c,
                                          shape.groups, weight.abi(), bias.abi(), h.abi(),
                                          h_value, eps, scale.get(), shift.get(), nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  expect_forward_coefficients(shape, weight, bias, h, h_value, eps, mean.host, var.host,
                              scale.download(), shift.download(), what);
}

// Bit for bit (NaN payloads included): outputs of one device function.
void expect_bitwise(const std::string& what, const std::vector<float>& got,
                    const std::vector<float>& want) {
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      std::printf("FAIL %s: [%zu] got %.9g want %.9g (bitwise)\n", what.c_str(), i, got[i],
                  want[i]);
      ++g_failures;
      return;
    }
  }
}

// The statistics with the forward coefficients from their finalize
// (pyeuler_norm_stats_and_coefficients): statistics bitwise pyeuler_norm_stats', coefficients
// bitwise pyeuler_forward_coefficients' of them and close to the double reference; and the
// SyncBatchNorm seam, pyeuler_welford_finalize_and_coefficients of host-made partials (three
// per statistic, one of them empty), bitwise pyeuler_welford_finalize +
// pyeuler_forward_coefficients.
template <typename T>
void test_norm_stats_and_coefficients(const Shape& shape, Random& rng, int64_t groups,
                                      int round) {
  const double eps = 1e-5;
  const AlgebraShape algebra{shape.n, shape.c, groups};
  const Activation<T> x(rng.uniform(shape.numel(), -2.f, 3.f));
  DeviceArray<T> x_dev(x.stored, false);
  const int64_t units = algebra.stats(), coefs = algebra.coefs();
  const Param weight = round % 4 == 0 ? Param()
                                      : Param(rng, shape.c, kParamDtypes[round % 3],
                                              1 + round % 2, 0.5f, 1.5f);
  const Param bias = round % 3 == 0 ? Param()
                                    : Param(rng, shape.c, kParamDtypes[(round + 1) % 3], 1,
                                            -0.5f, 0.5f);
  const int h_kind = round % 4;  // h_value 1, h_value 0.3, 0-dim, [C]
  const Param h = h_kind < 2 ? Param()
                             : Param(rng, shape.c, kParamDtypes[(round + 2) % 3],
                                     h_kind == 2 ? 0 : 1, 0.05f, 0.5f);
  const double h_value = h_kind == 1 ? 0.3 : 1.0;
  const std::string what = std::string("norm_stats_and_coefficients ") + Dtype<T>::kName + " " +
                           shape.name() + " groups=" + std::to_string(groups) +
                           " round=" + std::to_string(round);

  DeviceArray<float> mean(units, false), var(units, false), scale(coefs, false),
      shift(coefs, false), ref_mean(units, false), ref_var(units, false),
      ref_scale(coefs, false), ref_shift(coefs, false);
  size_t bytes = 0;
  CHECK_CUDA(pyeuler_norm_stats_workspace_size(shape.geometry(), groups, &bytes));
  DeviceArray<unsigned char> workspace(bytes, false);
  CHECK_CUDA(pyeuler_norm_stats_and_coefficients(
      x_dev.get(), Dtype<T>::kEnum, shape.geometry(), groups, weight.abi(), bias.abi(), h.abi(),
      h_value, eps, mean.get(), var.get(), scale.get(), shift.get(), workspace.get(), bytes,
      nullptr));
  CHECK_CUDA(pyeuler_norm_stats(x_dev.get(), Dtype<T>::kEnum, shape.geometry(), groups,
                                ref_mean.get(), ref_var.get(), workspace.get(), bytes, nullptr));
  CHECK_CUDA(pyeuler_forward_coefficients(ref_mean.get(), ref_var.get(), shape.n, shape.c, groups,
                                          weight.abi(), bias.abi(), h.abi(), h_value, eps,
                                          ref_scale.get(), ref_shift.get(), nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> got_mean = mean.download(), got_var = var.download();
  expect_bitwise(what + " mean", got_mean, ref_mean.download());
  expect_bitwise(what + " var", got_var, ref_var.download());
  expect_bitwise(what + " scale", scale.download(), ref_scale.download());
  expect_bitwise(what + " shift", shift.download(), ref_shift.download());
  expect_forward_coefficients(algebra, weight, bias, h, h_value, eps, got_mean, got_var,
                              scale.download(), shift.download(), what);
  // the statistics against double sums
  std::vector<double> sum(units), sum_sq(units), count(units);
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t u = algebra.stat(groups == 0 ? 0 : n, c);
        const double v = x.values[shape.at(n, c, s)];
        sum[u] += v, sum_sq[u] += v * v, count[u] += 1;
      }
  std::vector<double> want_mean(units), want_var(units);
  for (int64_t u = 0; u < units; ++u) {
    want_mean[u] = sum[u] / count[u];
    want_var[u] = sum_sq[u] / count[u] - want_mean[u] * want_mean[u];
  }
  expect_close(what + " mean vs double", got_mean, want_mean, 1e-4, 1e-5);
  expect_close(what + " var vs double", got_var, want_var, 1e-4, 1e-5);

  // the finalize alone, from partials [3][num_partials][units]: element k of a statistic goes
  // to partial k % 2 (partial 2 stays empty: count 0)
  const int64_t num_partials = 3;
  std::vector<std::vector<double>> p_values(num_partials * units);
  std::vector<int64_t> seen(units);
  for (int64_t n = 0; n < shape.n; ++n)
    for (int64_t c = 0; c < shape.c; ++c)
      for (int64_t s = 0; s < shape.s; ++s) {
        const int64_t u = algebra.stat(groups == 0 ? 0 : n, c);
        const int64_t p = (seen[u]++) % 2;
        p_values[p * units + u].push_back(x.values[shape.at(n, c, s)]);
      }
  std::vector<float> partials(3 * num_partials * units, 0.f);
  const int64_t plane = num_partials * units;
  for (int64_t k = 0; k < plane; ++k) {
    const std::vector<double>& v = p_values[k];
    double m = 0.0, m2 = 0.0;
    for (double e : v) m += e;
    if (!v.empty()) m /= double(v.size());
    for (double e : v) m2 += (e - m) * (e - m);
    partials[k] = float(v.size());
    partials[plane + k] = float(m);
    partials[2 * plane + k] = float(m2);
  }
  DeviceArray<float> partials_dev(partials, false);
  CHECK_CUDA(pyeuler_welford_finalize_and_coefficients(
      partials_dev.get(), num_partials, shape.n, shape.c, groups, weight.abi(), bias.abi(),
      h.abi(), h_value, eps, mean.get(), var.get(), scale.get(), shift.get(), nullptr));
  CHECK_CUDA(pyeuler_welford_finalize(partials_dev.get(), num_partials, units, ref_mean.get(),
                                      ref_var.get(), nullptr));
  CHECK_CUDA(pyeuler_forward_coefficients(ref_mean.get(), ref_var.get(), shape.n, shape.c, groups,
                                          weight.abi(), bias.abi(), h.abi(), h_value, eps,
                                          ref_scale.get(), ref_shift.get(), nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  expect_bitwise(what + " finalize mean", mean.download(), ref_mean.download());
  expect_bitwise(what + " finalize var", var.download(), ref_var.download());
  expect_bitwise(what + " finalize scale", scale.download(), ref_scale.download());
  expect_bitwise(what + " finalize shift", shift.download(), ref_shift.download());
  expect_close(what + " finalize mean vs double", mean.download(), want_mean, 1e-4, 1e-5);
}

template <typename T>
void test_norm_stats_and_coefficients_dtype(Random& rng) {
  // odd and vector-friendly sizes, both layouts; groups of 1 to 600 channels, statistics
  // spanning several finalize blocks (32 units each)
  const Shape base_shapes[] = {{3, 5, 7}, {2, 16, 64}, {4, 24, 9}, {5, 6, 1}, {64, 40, 16},
                               {3, 600, 5}, {40, 12, 3}};
  int round = 0;
  for (const Shape& base : base_shapes) {
    for (pyeuler_layout_t layout : {PYEULER_LAYOUT_CHANNELS_FIRST, PYEULER_LAYOUT_CHANNELS_LAST}) {
      Shape shape = base;
      shape.layout = layout;
      const int failures_before = g_failures;
      const int64_t groups = shape.c % 4 == 0 ? 4 : shape.c % 3 == 0 ? 3 : 1;
      for (int64_t g : {int64_t(0), int64_t(1), groups}) {
        for (int k = 0; k < 4; ++k) test_norm_stats_and_coefficients<T>(shape, rng, g, round++);
      }
      std::printf("%-4s norm_stats_and_coefficients %-8s %s\n",
                  g_failures == failures_before ? "ok" : "FAIL", Dtype<T>::kName,
                  shape.name().c_str());
    }
  }
}

struct BackwardFlags {
  bool sums, dstats, batch_stats, need_x, need_weight, need_bias, need_h;
  std::string name() const {
    return std::string(" sums=") + std::to_string(sums) + " dstats=" + std::to_string(dstats) +
           " batch_stats=" + std::to_string(batch_stats) + " needs=" + std::to_string(need_x) +
           std::to_string(need_weight) + std::to_string(need_bias) + std::to_string(need_h);
  }
};

// Σ and Σ|·| of float terms, in double.
struct Total {
  double sum = 0.0, magnitude = 0.0;
  void add(double v) { sum += v, magnitude += std::fabs(v); }
};

void test_backward_coefficients(const AlgebraShape& shape, const Param& weight, const Param& bias,
                                const Param& h, double h_value, const StatVector& var,
                                const StatVector& sum_g, const StatVector& sum_gxc,
                                const StatVector& dmean, const StatVector& dvar,
                                const BackwardFlags& f, const std::string& what_in) {
  const double eps = 1e-5;
  const int64_t count = 7;
  const int64_t coefs = std::max<int64_t>(shape.coefs(), 1);
  const bool want_dweight = f.sums && f.need_weight, want_dbias = f.sums && f.need_bias;
  const bool want_dh = f.sums && f.need_h && h.present;
  const bool scalar_h = h.present && h.stride == 0;
  DeviceArray<float> a(coefs, false), b(coefs, false), c_out(coefs, false);
  DeviceArray<float> dweight(shape.c, false), dbias(shape.c, false), dh(shape.c, false);
  CHECK_CUDA(pyeuler_backward_coefficients(
      f.sums ? sum_g.device.get() : nullptr, f.sums ? sum_gxc.device.get() : nullptr,
      f.dstats ? dmean.device.get() : nullptr, f.dstats ? dvar.device.get() : nullptr,
      var.device.get(), shape.n, shape.c, shape.groups, weight.abi(), bias.abi(), h.abi(),
      h_value, eps, f.batch_stats, f.need_x, count, a.get(), b.get(), c_out.get(),
      want_dweight ? dweight.get() : nullptr, want_dbias ? dbias.get() : nullptr,
      want_dh ? dh.get() : nullptr, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());

  const int64_t samples = shape.samples(), channels = shape.c;
  const double step_value = double(float(h_value));
  auto invstd_at = [&](int64_t s) {
    return 1.0 / std::sqrt(double(var.host[s]) + double(float(eps)));
  };
  // a, b, c per (sample, channel); the group sums first
  std::vector<Total> group_dxhat(shape.stats()), group_dxhat_xhat(shape.stats());
  std::vector<Total> dw(channels), db(channels), dh_c(channels);
  Total dh_total;
  for (int64_t n = 0; n < samples && f.sums; ++n)
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t i = n * channels + c, s = shape.stat(n, c);
      const double step = h.at(c, step_value), step_w = step * weight.at(c, 1.0);
      const double sum_gxhat = sum_gxc.host[i] * invstd_at(s);
      group_dxhat[s].add(step_w * sum_g.host[i]);
      group_dxhat_xhat[s].add(step_w * sum_gxhat);
      dw[c].add(step * sum_gxhat);
      db[c].add(step * sum_g.host[i]);
      const double w_term = weight.at(c, 1.0) * sum_gxhat;
      const double b_term = bias.present ? bias.at(c, 0.0) * sum_g.host[i] : 0.0;
      dh_c[c].add(w_term), dh_c[c].add(b_term);
      dh_total.add(w_term), dh_total.add(b_term);
    }
  std::vector<double> want_a, want_b, want_c, atol_b, atol_c;
  for (int64_t n = 0; n < samples; ++n)
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t s = shape.stat(n, c);
      const double invstd = invstd_at(s);
      want_a.push_back(h.at(c, step_value) * weight.at(c, 1.0) * invstd);
      double bv = 0.0, cv = 0.0, b_mag = 0.0, c_mag = 0.0;
      if (f.need_x && f.batch_stats) {
        if (f.sums) {
          cv = group_dxhat[s].sum * -invstd / count;
          c_mag = group_dxhat[s].magnitude * invstd / count;
          bv = group_dxhat_xhat[s].sum * invstd * invstd * (-1.0 / count);
          b_mag = group_dxhat_xhat[s].magnitude * invstd * invstd / count;
        }
        if (f.dstats) {
          cv += double(dmean.host[s]) / count, c_mag += std::fabs(dmean.host[s]) / count;
          bv += double(dvar.host[s]) * 2.0 / count, b_mag += std::fabs(dvar.host[s]) * 2.0 / count;
        }
      }
      want_b.push_back(bv), want_c.push_back(cv);
      atol_b.push_back(1e-5 * b_mag + 1e-12), atol_c.push_back(1e-5 * c_mag + 1e-12);
    }
  const std::string what = what_in + f.name();
  if (!want_a.empty()) {
    expect_close(what + " a", a.download(), want_a, 2e-6, 0.0);
    // b and c are exactly 0 without the batch-statistics terms
    const double exact = f.need_x && f.batch_stats ? 1.0 : 0.0;
    for (double& t : atol_b) t *= exact;
    for (double& t : atol_c) t *= exact;
    expect_close(what + " b", b.download(), want_b, 0.0, atol_b);
    expect_close(what + " c", c_out.download(), want_c, 0.0, atol_c);
  }
  auto check_total = [&](const std::string& name, const std::vector<float>& got,
                         const std::vector<Total>& totals) {
    std::vector<double> want, atol;
    for (const Total& t : totals) want.push_back(t.sum), atol.push_back(1e-5 * t.magnitude + 1e-12);
    expect_close(what + " " + name, got, want, 0.0, atol);
  };
  if (want_dweight) check_total("dweight", dweight.download(), dw);
  if (want_dbias) check_total("dbias", dbias.download(), db);
  if (want_dh && scalar_h) check_total("dh", {dh.download()[0]}, {dh_total});
  if (want_dh && !scalar_h) check_total("dh", dh.download(), dh_c);
}

void test_norm_coefficients(Random& rng) {
  const AlgebraShape shapes[] = {{1, 5, 0},  {1, 300, 0}, {3, 6, 2},  {2, 80, 1},
                                 {5, 8, 8},  {40, 12, 3}, {9, 600, 150}, {0, 4, 2}};
  int param_round = 0;
  for (const AlgebraShape& shape : shapes) {
    const int failures_before = g_failures;
    const int64_t stats = std::max<int64_t>(shape.stats(), 1);
    const int64_t coefs = std::max<int64_t>(shape.coefs(), 1);
    const StatVector mean(rng.uniform(stats, -1.f, 1.f)), var(rng.uniform(stats, 0.2f, 2.f));
    const StatVector sum_g(rng.uniform(coefs, -3.f, 3.f)), sum_gxc(rng.uniform(coefs, -3.f, 3.f));
    const StatVector dmean(rng.uniform(stats, -1.f, 1.f)), dvar(rng.uniform(stats, -1.f, 1.f));
    for (int with_weight = 0; with_weight < 2; ++with_weight)
      for (int with_bias = 0; with_bias < 2; ++with_bias)
        for (int h_kind = 0; h_kind < 4; ++h_kind) {  // h_value 1, h_value 0.3, 0-dim, [C]
          ++param_round;
          const pyeuler_dtype_t dtype = kParamDtypes[param_round % 3];
          // the weight strided every other round, to read parameters through their stride
          const Param weight = with_weight ? Param(rng, shape.c, dtype, 1 + param_round % 2,
                                                   0.5f, 1.5f)
                                           : Param();
          const Param bias = with_bias ? Param(rng, shape.c, kParamDtypes[(param_round + 1) % 3],
                                               1, -0.5f, 0.5f)
                                       : Param();
          const Param h = h_kind < 2 ? Param()
                                     : Param(rng, shape.c, kParamDtypes[(param_round + 2) % 3],
                                             h_kind == 2 ? 0 : 1, 0.05f, 0.5f);
          const double h_value = h_kind == 1 ? 0.3 : 1.0;
          const std::string what = "norm_coefficients " + shape.name() +
                                   " weight=" + std::to_string(with_weight) +
                                   " bias=" + std::to_string(with_bias) +
                                   " h_kind=" + std::to_string(h_kind);
          test_forward_coefficients(shape, weight, bias, h, h_value, mean, var, what + " forward");
          for (int bits = 0; bits < 128; ++bits) {
            const BackwardFlags f{(bits & 1) != 0,  (bits & 2) != 0,  (bits & 4) != 0,
                                  (bits & 8) != 0,  (bits & 16) != 0, (bits & 32) != 0,
                                  (bits & 64) != 0};
            if (!f.sums && (f.need_weight || f.need_bias || f.need_h)) continue;  // no gradients
            test_backward_coefficients(shape, weight, bias, h, h_value, var, sum_g, sum_gxc, dmean,
                                       dvar, f, what + " backward");
          }
        }
    std::printf("%-4s norm_coefficients %s\n", g_failures == failures_before ? "ok" : "FAIL",
                shape.name().c_str());
  }
}

// backward_coefficients_vjp against a double reference of norm_algebra's formulas, over
// the shapes above (groups wider than a block included), parameters in every dtype,
// sums / dmean / dvar / batch statistics / needs and which cotangents are given.  Outputs
// are compared with 1e-4 of the magnitude of their terms (float32 sums in another order).
void test_backward_coefficients_vjp(Random& rng) {
  const AlgebraShape shapes[] = {{1, 5, 0}, {1, 300, 0}, {3, 6, 2}, {2, 80, 1},
                                 {40, 12, 3}, {3, 600, 1}, {0, 4, 2}};
  const double eps = 1e-5;
  const int64_t count = 7;
  int round = 0;
  for (const AlgebraShape& shape : shapes) {
    const int failures_before = g_failures;
    const int64_t S = shape.samples(), C = shape.c;
    const int64_t stats = std::max<int64_t>(shape.stats(), 1);
    const int64_t coefs = std::max<int64_t>(shape.coefs(), 1);
    const StatVector var(rng.uniform(stats, 0.2f, 2.f));
    const StatVector sum_g(rng.uniform(coefs, -3.f, 3.f)), sum_gxc(rng.uniform(coefs, -3.f, 3.f));
    const StatVector cot_a(rng.uniform(coefs, -1.f, 1.f)), cot_b(rng.uniform(coefs, -1.f, 1.f));
    const StatVector cot_c(rng.uniform(coefs, -1.f, 1.f));
    for (int params = 0; params < 16; ++params) {
      ++round;
      const bool with_weight = params & 1, with_bias = params & 2;
      const int h_kind = params >> 2;  // h_value 1, h_value 0.3, 0-dim, [C]
      const pyeuler_dtype_t dtype = kParamDtypes[round % 3];
      const Param weight = with_weight ? Param(rng, C, dtype, 1 + round % 2, 0.5f, 1.5f) : Param();
      const Param bias = with_bias ? Param(rng, C, dtype, 1, -0.5f, 0.5f) : Param();
      const Param h = h_kind < 2 ? Param() : Param(rng, C, dtype, h_kind == 2 ? 0 : 1, 0.05f, 0.5f);
      const double h_value = h_kind == 1 ? 0.3 : 1.0;
      const Param cot_dweight(rng, C, PYEULER_DTYPE_FLOAT32, 1, -1.f, 1.f);
      const Param cot_dbias(rng, C, PYEULER_DTYPE_BFLOAT16, 1, -1.f, 1.f);
      const Param cot_dh(rng, C, PYEULER_DTYPE_FLOAT32, h_kind == 2 ? 0 : 1, -1.f, 1.f);
      for (int bits = 0; bits < 256; bits += 1 + (bits % 3)) {  // a spread of flag sets
        const bool sums = bits & 1, centered = bits & 2;
        const bool give_a = !(bits & 4), give_b = !(bits & 8), give_c = !(bits & 16);
        const bool give_dw = (bits & 32) && sums, give_db = (bits & 64) && sums;
        const bool give_dh = (bits & 128) && sums && h.present;
        const bool stat_terms = centered;  // need_x and batch_stats, both set together here
        // outputs: every one requested (structurally zero ones must come out as 0)
        DeviceArray<float> d_sum_g(coefs, false), d_sum_gxc(coefs, false), d_dmean(stats, false),
            d_dvar(stats, false), d_var(stats, false);
        DeviceArray<float> d_weight_f(C, false), d_bias_f(C, false), d_h_f(C, false);
        const pyeuler_param_t none{nullptr, PYEULER_DTYPE_FLOAT32, 0};
        // parameter gradients in the parameter's dtype: request float32 ones only
        const bool out_w = weight.present && weight.dtype == PYEULER_DTYPE_FLOAT32;
        const bool out_b = bias.present && bias.dtype == PYEULER_DTYPE_FLOAT32;
        const bool out_h = h.present && h.dtype == PYEULER_DTYPE_FLOAT32;
        CHECK_CUDA(pyeuler_backward_coefficients_vjp(
            sums ? sum_g.device.get() : nullptr, sums ? sum_gxc.device.get() : nullptr,
            var.device.get(), shape.n, C, shape.groups, weight.abi(), bias.abi(), h.abi(),
            h_value, eps, stat_terms, 1, count, give_a ? cot_a.device.get() : nullptr,
            give_b ? cot_b.device.get() : nullptr, give_c ? cot_c.device.get() : nullptr,
            give_dw ? cot_dweight.abi() : none, give_db ? cot_dbias.abi() : none,
            give_dh ? cot_dh.abi() : none, d_sum_g.get(), d_sum_gxc.get(), d_dmean.get(),
            d_dvar.get(), d_var.get(), out_w ? d_weight_f.get() : nullptr,
            out_b ? d_bias_f.get() : nullptr, out_h ? d_h_f.get() : nullptr, nullptr));
        CHECK_CUDA(cudaDeviceSynchronize());
        if (shape.coefs() == 0 && !out_w && !out_b && !out_h) continue;
        // the reference, with each gradient's Σ|term| for the tolerance
        const double step_value = double(float(h_value));
        auto invstd_at = [&](int64_t s) { return 1.0 / std::sqrt(double(var.host[s]) + double(float(eps))); };
        const bool cs = centered && sums;
        std::vector<Total> md(stats), mdx(stats), uc(stats), ub(stats), sc(stats), sb(stats);
        for (int64_t n = 0; n < S; ++n)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = n * C + c, s = shape.stat(n, c);
            const double iv = invstd_at(s), sw = h.at(c, step_value) * weight.at(c, 1.0);
            if (sums) md[s].add(sw * sum_g.host[i]), mdx[s].add(sw * sum_gxc.host[i] * iv);
            if (centered && give_c) uc[s].add(cot_c.host[i] * -iv / count), sc[s].add(cot_c.host[i]);
            if (centered && give_b) ub[s].add(cot_b.host[i] * iv * iv * -1.0 / count), sb[s].add(cot_b.host[i]);
          }
        std::vector<Total> g_sum_g(coefs), g_sum_gxc(coefs), g_var(stats), g_w(C), g_b(C), g_h(C);
        Total g_h_total;
        for (int64_t n = 0; n < S; ++n)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = n * C + c, s = shape.stat(n, c);
            const double iv = invstd_at(s), step = h.at(c, step_value), w = weight.at(c, 1.0);
            const double sw = step * w;
            const double sg = sums ? sum_g.host[i] : 0.0, sgxc = sums ? sum_gxc.host[i] : 0.0;
            const double sgxhat = sgxc * iv;
            const double ca = give_a ? cot_a.host[i] : 0.0;
            const double cdw = give_dw ? cot_dweight.values[c] : 0.0;
            const double cdb = give_db ? cot_dbias.values[c] : 0.0;
            const double cdh = give_dh ? cot_dh.values[c] : 0.0;
            const double ucv = cs ? uc[s].sum : 0.0, ubv = cs ? ub[s].sum : 0.0;
            const double ccv = cs && give_c ? cot_c.host[i] : 0.0;
            const double cbv = cs && give_b ? cot_b.host[i] : 0.0;
            Total dsg, dsgxhat, dinv, dsw;
            dsg.add(step * cdb), dsg.add(bias.at(c, 0.0) * cdh), dsg.add(sw * ucv);
            dsgxhat.add(step * cdw), dsgxhat.add(w * cdh), dsgxhat.add(sw * ubv);
            dinv.add(sw * ca), dinv.add(ccv * md[s].sum * -1.0 / count);
            dinv.add(cbv * mdx[s].sum * iv * -2.0 / count), dinv.add(dsgxhat.sum * sgxc);
            dsw.add(ca * iv), dsw.add(ucv * sg), dsw.add(ubv * sgxhat);
            g_sum_g[i].add(dsg.sum), g_sum_g[i].magnitude = dsg.magnitude + uc[s].magnitude * std::fabs(sw);
            g_sum_gxc[i].add(dsgxhat.sum * iv);
            g_sum_gxc[i].magnitude = (dsgxhat.magnitude + ub[s].magnitude * std::fabs(sw)) * iv;
            g_var[s].add(dinv.sum * iv * iv * iv * -0.5);
            g_var[s].magnitude += (dinv.magnitude + std::fabs(ccv * md[s].magnitude / count) +
                                   std::fabs(2.0 * cbv * mdx[s].magnitude * iv / count)) *
                                  iv * iv * iv * 0.5;
            const double wt = cdh * sgxhat + step * dsw.sum, bt = cdh * sg;
            const double ht = cdw * sgxhat + cdb * sg + dsw.sum * w;
            const double dsw_mag = dsw.magnitude + std::fabs(uc[s].magnitude * sg) +
                                   std::fabs(ub[s].magnitude * sgxhat);
            g_w[c].add(wt), g_w[c].magnitude += std::fabs(step) * dsw_mag;
            g_b[c].add(bt);
            g_h[c].add(ht), g_h[c].magnitude += std::fabs(w) * dsw_mag;
            g_h_total.add(ht), g_h_total.magnitude += std::fabs(w) * dsw_mag;
          }
        const std::string what = "backward_coefficients_vjp " + shape.name() + " params=" +
                                 std::to_string(params) + " bits=" + std::to_string(bits);
        auto check = [&](const std::string& name, const std::vector<float>& got,
                         const std::vector<Total>& want_totals, size_t n_values) {
          std::vector<double> want, atol;
          for (size_t k = 0; k < n_values; ++k) {
            want.push_back(want_totals[k].sum);
            atol.push_back(1e-4 * want_totals[k].magnitude + 1e-6);
          }
          std::vector<float> head(got.begin(), got.begin() + n_values);
          expect_close(what + " " + name, head, want, 1e-5, atol);
        };
        const size_t n_coefs = size_t(shape.coefs()), n_stats = size_t(shape.stats());
        check("d_sum_g", d_sum_g.download(), g_sum_g, n_coefs);
        check("d_sum_gxc", d_sum_gxc.download(), g_sum_gxc, n_coefs);
        check("d_var", d_var.download(), g_var, n_stats);
        std::vector<Total> want_dmean(stats), want_dvar(stats);
        for (size_t s = 0; s < n_stats; ++s) {
          want_dmean[s].add(sc[s].sum / count), want_dmean[s].magnitude = sc[s].magnitude / count;
          want_dvar[s].add(sb[s].sum * 2.0 / count), want_dvar[s].magnitude = sb[s].magnitude * 2.0 / count;
        }
        check("d_dmean", d_dmean.download(), want_dmean, n_stats);
        check("d_dvar", d_dvar.download(), want_dvar, n_stats);
        if (out_w) check("d_weight", d_weight_f.download(), g_w, size_t(C));
        if (out_b) check("d_bias", d_bias_f.download(), g_b, size_t(C));
        if (out_h && h.stride == 0) check("d_h", {d_h_f.download()[0]}, {g_h_total}, 1);
        if (out_h && h.stride != 0) check("d_h", d_h_f.download(), g_h, size_t(C));
      }
    }
    std::printf("%-4s backward_coefficients_vjp %s\n",
                g_failures == failures_before ? "ok" : "FAIL", shape.name().c_str());
  }
}

// pyeuler_double_backward_coefficients: its VJP outputs bitwise
// pyeuler_backward_coefficients_vjp's (one kernel), plus the sums' own cotangents where given
// (one float addition); a bitwise pyeuler_backward_coefficients' (one formula); b against a
// double reference and pyeuler_backward_coefficients' (another summation order); the
// centre's gradient against a double reference of Σ -(b·cot_c) - q·Σg over each statistic's
// channels.  Over the VJP test's shapes, parameters and a spread of flags, with dvar and the
// sums' cotangents each absent or present.
void test_double_backward_coefficients(Random& rng) {
  const AlgebraShape shapes[] = {{1, 5, 0}, {1, 300, 0}, {3, 6, 2}, {2, 80, 1},
                                 {40, 12, 3}, {3, 600, 1}, {0, 4, 2}};
  const double eps = 1e-5;
  const int64_t count = 7;
  int round = 0;
  for (const AlgebraShape& shape : shapes) {
    const int failures_before = g_failures;
    const int64_t S = shape.samples(), C = shape.c;
    const int64_t stats = std::max<int64_t>(shape.stats(), 1);
    const int64_t coefs = std::max<int64_t>(shape.coefs(), 1);
    const StatVector var(rng.uniform(stats, 0.2f, 2.f)), dvar(rng.uniform(stats, -1.f, 1.f));
    const StatVector sum_g(rng.uniform(coefs, -3.f, 3.f)), sum_gxc(rng.uniform(coefs, -3.f, 3.f));
    const StatVector cot_a(rng.uniform(coefs, -1.f, 1.f)), cot_b(rng.uniform(coefs, -1.f, 1.f));
    const StatVector cot_c(rng.uniform(coefs, -1.f, 1.f));
    const StatVector cot_sum_g(rng.uniform(coefs, -1.f, 1.f));
    const StatVector cot_sum_gxc(rng.uniform(coefs, -1.f, 1.f));
    for (int params = 0; params < 16; ++params) {
      ++round;
      const bool with_weight = params & 1, with_bias = params & 2;
      const int h_kind = params >> 2;  // h_value 1, h_value 0.3, 0-dim, [C]
      const pyeuler_dtype_t dtype = kParamDtypes[round % 3];
      const Param weight = with_weight ? Param(rng, C, dtype, 1 + round % 2, 0.5f, 1.5f) : Param();
      const Param bias = with_bias ? Param(rng, C, dtype, 1, -0.5f, 0.5f) : Param();
      const Param h = h_kind < 2 ? Param() : Param(rng, C, dtype, h_kind == 2 ? 0 : 1, 0.05f, 0.5f);
      const double h_value = h_kind == 1 ? 0.3 : 1.0;
      const Param cot_dweight(rng, C, PYEULER_DTYPE_FLOAT32, 1, -1.f, 1.f);
      const Param cot_dbias(rng, C, PYEULER_DTYPE_BFLOAT16, 1, -1.f, 1.f);
      const Param cot_dh(rng, C, PYEULER_DTYPE_FLOAT32, h_kind == 2 ? 0 : 1, -1.f, 1.f);
      const pyeuler_param_t none{nullptr, PYEULER_DTYPE_FLOAT32, 0};
      for (int bits = 0; bits < 2048; bits += 1 + 7 * (bits % 5)) {  // a spread of flag sets
        const bool sums = bits & 1, centered = bits & 2;
        const bool give_a = !(bits & 4), give_b = !(bits & 8), give_c = !(bits & 16);
        const bool give_dw = (bits & 32) && sums, give_db = (bits & 64) && sums;
        const bool give_dh = (bits & 128) && sums && h.present;
        const bool give_dvar = bits & 256, give_sg = bits & 512, give_sgxc = bits & 1024;
        const bool out_w = weight.present && weight.dtype == PYEULER_DTYPE_FLOAT32;
        const bool out_b = bias.present && bias.dtype == PYEULER_DTYPE_FLOAT32;
        const bool out_h = h.present && h.dtype == PYEULER_DTYPE_FLOAT32;
        // the double backward: every output requested
        DeviceArray<float> a(coefs, false), b(coefs, false), d_sum_g(coefs, false),
            d_sum_gxc(coefs, false), d_dmean(stats, false), d_dvar(stats, false),
            d_var(stats, false), d_mean(stats, false);
        DeviceArray<float> d_weight(C, false), d_bias(C, false), d_h(C, false);
        CHECK_CUDA(pyeuler_double_backward_coefficients(
            sums ? sum_g.device.get() : nullptr, sums ? sum_gxc.device.get() : nullptr,
            give_dvar ? dvar.device.get() : nullptr, var.device.get(), shape.n, C, shape.groups,
            weight.abi(), bias.abi(), h.abi(), h_value, eps, centered, 1, count,
            give_a ? cot_a.device.get() : nullptr, give_b ? cot_b.device.get() : nullptr,
            give_c ? cot_c.device.get() : nullptr, give_dw ? cot_dweight.abi() : none,
            give_db ? cot_dbias.abi() : none, give_dh ? cot_dh.abi() : none,
            give_sg ? cot_sum_g.device.get() : nullptr,
            give_sgxc ? cot_sum_gxc.device.get() : nullptr, a.get(), b.get(), d_sum_g.get(),
            d_sum_gxc.get(), d_dmean.get(), d_dvar.get(), d_var.get(),
            out_w ? d_weight.get() : nullptr, out_b ? d_bias.get() : nullptr,
            out_h ? d_h.get() : nullptr, d_mean.get(), nullptr));
        // the VJP and the backward of the same arguments
        DeviceArray<float> v_sum_g(coefs, false), v_sum_gxc(coefs, false), v_dmean(stats, false),
            v_dvar(stats, false), v_var(stats, false);
        DeviceArray<float> v_weight(C, false), v_bias(C, false), v_h(C, false);
        CHECK_CUDA(pyeuler_backward_coefficients_vjp(
            sums ? sum_g.device.get() : nullptr, sums ? sum_gxc.device.get() : nullptr,
            var.device.get(), shape.n, C, shape.groups, weight.abi(), bias.abi(), h.abi(),
            h_value, eps, centered, 1, count, give_a ? cot_a.device.get() : nullptr,
            give_b ? cot_b.device.get() : nullptr, give_c ? cot_c.device.get() : nullptr,
            give_dw ? cot_dweight.abi() : none, give_db ? cot_dbias.abi() : none,
            give_dh ? cot_dh.abi() : none, v_sum_g.get(), v_sum_gxc.get(), v_dmean.get(),
            v_dvar.get(), v_var.get(), out_w ? v_weight.get() : nullptr,
            out_b ? v_bias.get() : nullptr, out_h ? v_h.get() : nullptr, nullptr));
        DeviceArray<float> bw_a(coefs, false), bw_b(coefs, false), bw_c(coefs, false);
        CHECK_CUDA(pyeuler_backward_coefficients(
            sums ? sum_g.device.get() : nullptr, sums ? sum_gxc.device.get() : nullptr, nullptr,
            give_dvar ? dvar.device.get() : nullptr, var.device.get(), shape.n, C, shape.groups,
            weight.abi(), bias.abi(), h.abi(), h_value, eps, centered, 1, count, bw_a.get(),
            bw_b.get(), bw_c.get(), nullptr, nullptr, nullptr, nullptr));
        CHECK_CUDA(cudaDeviceSynchronize());
        if (shape.coefs() == 0 && !out_w && !out_b && !out_h) continue;
        const std::string what = "double_backward_coefficients " + shape.name() + " params=" +
                                 std::to_string(params) + " bits=" + std::to_string(bits);
        const size_t n_coefs = size_t(shape.coefs()), n_stats = size_t(shape.stats());
        auto head = [](const std::vector<float>& v, size_t n) {
          return std::vector<float>(v.begin(), v.begin() + n);
        };
        // the VJP's outputs, the sums' cotangents added where given
        std::vector<float> want_sum_g = head(v_sum_g.download(), n_coefs);
        std::vector<float> want_sum_gxc = head(v_sum_gxc.download(), n_coefs);
        for (size_t i = 0; i < n_coefs; ++i) {
          if (sums && give_sg) want_sum_g[i] += cot_sum_g.host[i];
          if (sums && give_sgxc) want_sum_gxc[i] += cot_sum_gxc.host[i];
        }
        const std::vector<float> got_sum_gxc = head(d_sum_gxc.download(), n_coefs);
        expect_bitwise(what + " d_sum_g", head(d_sum_g.download(), n_coefs), want_sum_g);
        expect_bitwise(what + " d_sum_gxc", got_sum_gxc, want_sum_gxc);
        expect_bitwise(what + " d_dmean", head(d_dmean.download(), n_stats),
                       head(v_dmean.download(), n_stats));
        expect_bitwise(what + " d_dvar", head(d_dvar.download(), n_stats),
                       head(v_dvar.download(), n_stats));
        expect_bitwise(what + " d_var", head(d_var.download(), n_stats),
                       head(v_var.download(), n_stats));
        if (out_w) expect_bitwise(what + " d_weight", d_weight.download(), v_weight.download());
        if (out_b) expect_bitwise(what + " d_bias", d_bias.download(), v_bias.download());
        if (out_h) {
          const size_t n_h = h.stride == 0 ? 1 : size_t(C);
          expect_bitwise(what + " d_h", head(d_h.download(), n_h), head(v_h.download(), n_h));
        }
        if (n_coefs == 0) continue;
        expect_bitwise(what + " a", head(a.download(), n_coefs), head(bw_a.download(), n_coefs));
        // b and the centre's gradient against double references
        const double step_value = double(float(h_value));
        std::vector<Total> group_b(stats);
        for (int64_t n = 0; n < S && sums; ++n)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = n * C + c, s = shape.stat(n, c);
            const double iv = 1.0 / std::sqrt(double(var.host[s]) + double(float(eps)));
            const double sw = h.at(c, step_value) * weight.at(c, 1.0);
            group_b[s].add(sw * sum_gxc.host[i] * iv * iv * iv * (-1.0 / count));
          }
        const std::vector<float> got_b = head(b.download(), n_coefs);
        std::vector<double> want_b(n_coefs), atol_b(n_coefs);
        std::vector<Total> center(stats);
        for (int64_t n = 0; n < S; ++n)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = n * C + c, s = shape.stat(n, c);
            if (centered) {
              const double dv = give_dvar ? dvar.host[s] * 2.0 / count : 0.0;
              want_b[i] = group_b[s].sum + dv;
              atol_b[i] = 1e-5 * (group_b[s].magnitude + std::fabs(dv)) + 1e-12;
            }
            if (centered && give_c) center[s].add(-double(got_b[i]) * cot_c.host[i]);
            if (sums) center[s].add(-double(got_sum_gxc[i]) * sum_g.host[i]);
          }
        expect_close(what + " b", got_b, want_b, 0.0, atol_b);
        expect_close(what + " backward's b", head(bw_b.download(), n_coefs), want_b, 0.0, atol_b);
        std::vector<double> want_center, atol_center;
        for (size_t s = 0; s < n_stats; ++s) {
          want_center.push_back(center[s].sum);
          atol_center.push_back(1e-5 * center[s].magnitude + 1e-7);
        }
        expect_close(what + " d_mean", head(d_mean.download(), n_stats), want_center, 0.0,
                     atol_center);
      }
    }
    std::printf("%-4s double_backward_coefficients %s\n",
                g_failures == failures_before ? "ok" : "FAIL", shape.name().c_str());
  }
}

// Bitwise reproducibility (fixed summation orders) and the argument errors.
void test_norm_coefficients_determinism_and_errors(Random& rng) {
  const int failures_before = g_failures;
  const AlgebraShape shape{64, 512, 32};
  const StatVector var(rng.uniform(shape.stats(), 0.2f, 2.f));
  const StatVector sum_g(rng.uniform(shape.coefs(), -3.f, 3.f));
  const StatVector sum_gxc(rng.uniform(shape.coefs(), -3.f, 3.f));
  const Param weight(rng, shape.c, PYEULER_DTYPE_BFLOAT16, 1, 0.5f, 1.5f);
  const Param bias(rng, shape.c, PYEULER_DTYPE_FLOAT32, 1, -0.5f, 0.5f);
  const Param h(rng, shape.c, PYEULER_DTYPE_FLOAT32, 0, 0.05f, 0.5f);
  std::vector<float> first[6];
  for (int run = 0; run < 3; ++run) {
    DeviceArray<float> a(shape.coefs(), false), b(shape.coefs(), false), c(shape.coefs(), false);
    DeviceArray<float> dweight(shape.c, false), dbias(shape.c, false), dh(1, false);
    CHECK_CUDA(pyeuler_backward_coefficients(
        sum_g.device.get(), sum_gxc.device.get(), nullptr, nullptr, var.device.get(), shape.n,
        shape.c, shape.groups, weight.abi(), bias.abi(), h.abi(), 1.0, 1e-5, 1, 1, 49, a.get(),
        b.get(), c.get(), dweight.get(), dbias.get(), dh.get(), nullptr));
    const std::vector<float> outs[6] = {a.download(),       b.download(),     c.download(),
                                        dweight.download(), dbias.download(), dh.download()};
    for (int k = 0; k < 6; ++k) {
      if (run == 0) {
        first[k] = outs[k];
      } else if (std::memcmp(first[k].data(), outs[k].data(), outs[k].size() * sizeof(float))) {
        std::printf("FAIL norm_coefficients determinism: output %d differs in run %d\n", k, run);
        ++g_failures;
      }
    }
  }
  // argument errors are reported, not launched
  float out[4];
  const pyeuler_param_t none{nullptr, PYEULER_DTYPE_FLOAT32, 0};
  const pyeuler_param_t bad_dtype{out, pyeuler_dtype_t(7), 1};
  struct Expectation {
    const char* what;
    cudaError_t got;
  } const errors[] = {
      {"groups not dividing C", pyeuler_forward_coefficients(out, out, 2, 6, 4, none, none, none,
                                                             1.0, 1e-5, out, out, nullptr)},
      {"bad parameter dtype", pyeuler_forward_coefficients(out, out, 1, 4, 0, bad_dtype, none,
                                                           none, 1.0, 1e-5, out, out, nullptr)},
      {"dweight without sums",
       pyeuler_backward_coefficients(nullptr, nullptr, nullptr, nullptr, out, 1, 4, 0, none, none,
                                     none, 1.0, 1e-5, 1, 1, 4, out, out, out, out, nullptr,
                                     nullptr, nullptr)},
      {"dh without h", pyeuler_backward_coefficients(out, out, nullptr, nullptr, out, 1, 4, 0,
                                                     none, none, none, 1.0, 1e-5, 1, 1, 4, out,
                                                     out, out, nullptr, nullptr, out, nullptr)},
      {"sum_g without sum_gxc",
       pyeuler_backward_coefficients(out, nullptr, nullptr, nullptr, out, 1, 4, 0, none, none,
                                     none, 1.0, 1e-5, 1, 1, 4, out, out, out, nullptr, nullptr,
                                     nullptr, nullptr)},
      {"count 0", pyeuler_backward_coefficients(nullptr, nullptr, nullptr, nullptr, out, 1, 4, 0,
                                                none, none, none, 1.0, 1e-5, 1, 1, 0, out, out,
                                                out, nullptr, nullptr, nullptr, nullptr)},
  };
  for (const Expectation& e : errors) {
    if (e.got != cudaErrorInvalidValue) {
      std::printf("FAIL norm_coefficients: %s returned %d, not cudaErrorInvalidValue\n", e.what,
                  int(e.got));
      ++g_failures;
    }
  }
  std::printf("%-4s norm_coefficients determinism and argument errors\n",
              g_failures == failures_before ? "ok" : "FAIL");
}

// ---- BatchNorm's running-statistics update -------------------------------------------
// Bitwise against a host replay of the torch ops' rounding (norm_algebra.update_running_stats
// on CUDA): batch values and a tensor or cumulative rate rounded to the buffers' dtype,
// torch's lerp in float with its one fused multiply-add.  Three consecutive updates per case,
// so the counter and the cumulative rate move; C = 0 only increments the counter.

// float -> T -> float, as the buffers' dtype holds the value.
template <typename T>
float in_dtype(float v) {
  return Dtype<T>::to_float(Dtype<T>::from_float(v));
}

float torch_lerp_reference(float self, float end, float weight) {
  const volatile float diff = end - self;
  return std::fabs(weight) < 0.5f ? std::fmaf(weight, diff, self)
                                  : std::fmaf(-diff, 1.f - weight, end);
}

// The 0-dim momentum tensor of a case: stored in `dtype`, and its value as stored.
struct Momentum {
  pyeuler_dtype_t dtype;
  float value;
  std::unique_ptr<DeviceArray<unsigned char>> device;

  Momentum(pyeuler_dtype_t dtype_, float raw) : dtype(dtype_) {
    unsigned char bytes[4] = {};
    if (dtype == PYEULER_DTYPE_FLOAT16) {
      const __half v = Dtype<__half>::from_float(raw);
      value = Dtype<__half>::to_float(v);
      std::memcpy(bytes, &v, sizeof(v));
    } else if (dtype == PYEULER_DTYPE_BFLOAT16) {
      const __nv_bfloat16 v = Dtype<__nv_bfloat16>::from_float(raw);
      value = Dtype<__nv_bfloat16>::to_float(v);
      std::memcpy(bytes, &v, sizeof(v));
    } else {
      value = raw;
      std::memcpy(bytes, &raw, sizeof(raw));
    }
    device = std::make_unique<DeviceArray<unsigned char>>(
        std::vector<unsigned char>(bytes, bytes + 4), false);
  }
  pyeuler_param_t abi() const { return {device->get(), dtype, 0}; }
};

enum class RateKind { kFloat, kTensor, kCumulative };

template <typename T>
void test_update_running_stats(Random& rng, int64_t channels, RateKind kind, bool with_counter,
                               float momentum_value, pyeuler_dtype_t momentum_dtype) {
  const std::string rate_name = kind == RateKind::kFloat
                                    ? " momentum=" + std::to_string(momentum_value)
                                : kind == RateKind::kTensor ? " momentum tensor"
                                                            : std::string(" cumulative");
  const std::string what = std::string("update_running_stats ") + Dtype<T>::kName + " C=" +
                           std::to_string(channels) + rate_name +
                           (with_counter ? " counter" : "");
  const Activation<T> mean0(rng.uniform(channels, -2.f, 2.f));
  const Activation<T> var0(rng.uniform(channels, 0.5f, 1.5f));
  std::vector<float> ref_mean = mean0.values, ref_var = var0.values;
  DeviceArray<T> running_mean(mean0.stored, false), running_var(var0.stored, false);
  int64_t ref_counter = 4;
  DeviceArray<int64_t> counter(std::vector<int64_t>{ref_counter}, false);
  const Momentum momentum(momentum_dtype, momentum_value);
  const int64_t counts[3] = {2, 49, 1024};
  for (int step = 0; step < 3; ++step) {
    const int64_t count = counts[step];
    const std::vector<float> mean = rng.uniform(channels, -3.f, 3.f);
    const std::vector<float> var = rng.uniform(channels, 0.f, 4.f);
    const DeviceArray<float> mean_d(mean, false), var_d(var, false);
    const pyeuler_param_t none{nullptr, PYEULER_DTYPE_FLOAT32, 0};
    CHECK_CUDA(pyeuler_update_running_stats(
        running_mean.get(), running_var.get(), Dtype<T>::kEnum,
        with_counter ? counter.get() : nullptr, mean_d.get(), var_d.get(), channels, count,
        kind == RateKind::kTensor ? momentum.abi() : none, momentum_value,
        kind == RateKind::kCumulative, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    // the host replay
    if (with_counter) ++ref_counter;
    float rate = float(momentum_value);
    if (kind == RateKind::kTensor) rate = in_dtype<T>(momentum.value);
    if (kind == RateKind::kCumulative) rate = in_dtype<T>(1.0f / in_dtype<T>(float(ref_counter)));
    const float factor = float(double(count) / double(count - 1));
    for (int64_t c = 0; c < channels; ++c) {
      const volatile float unbiased = var[c] * factor;
      ref_mean[c] = in_dtype<T>(torch_lerp_reference(ref_mean[c], in_dtype<T>(mean[c]), rate));
      ref_var[c] = in_dtype<T>(torch_lerp_reference(ref_var[c], in_dtype<T>(unbiased), rate));
    }
  }
  const std::vector<float> got_mean = to_floats(running_mean.download());
  const std::vector<float> got_var = to_floats(running_var.download());
  for (int64_t c = 0; c < channels; ++c) {
    if (std::memcmp(&got_mean[c], &ref_mean[c], sizeof(float)) != 0 ||
        std::memcmp(&got_var[c], &ref_var[c], sizeof(float)) != 0) {
      std::printf("FAIL %s: channel %lld got (%.9g, %.9g) want (%.9g, %.9g)\n", what.c_str(),
                  (long long)c, got_mean[c], got_var[c], ref_mean[c], ref_var[c]);
      ++g_failures;
      break;
    }
  }
  const int64_t got_counter = counter.download()[0];
  if (got_counter != ref_counter) {
    std::printf("FAIL %s: num_batches_tracked %lld, want %lld\n", what.c_str(),
                (long long)got_counter, (long long)ref_counter);
    ++g_failures;
  }
}

template <typename T>
void test_update_running_stats_dtype(Random& rng) {
  const int failures_before = g_failures;
  for (int64_t channels : {int64_t(0), int64_t(1), int64_t(7), int64_t(640), int64_t(2049)}) {
    for (bool counter : {false, true}) {
      for (float m : {0.1f, 0.5f, 1.0f, 0.f}) {
        test_update_running_stats<T>(rng, channels, RateKind::kFloat, counter, m,
                                     PYEULER_DTYPE_FLOAT32);
      }
      for (pyeuler_dtype_t md : kParamDtypes) {
        test_update_running_stats<T>(rng, channels, RateKind::kTensor, counter, 0.3f, md);
        test_update_running_stats<T>(rng, channels, RateKind::kTensor, counter, 0.7f, md);
      }
    }
    test_update_running_stats<T>(rng, channels, RateKind::kCumulative, true, 0.f,
                                 PYEULER_DTYPE_FLOAT32);
  }
  std::printf("%-4s update_running_stats %s\n", g_failures == failures_before ? "ok" : "FAIL",
              Dtype<T>::kName);
}

void expect_invalid_value(const std::string& what, cudaError_t got) {
  if (got != cudaErrorInvalidValue) {
    std::printf("FAIL %s: returned %d, not cudaErrorInvalidValue\n", what.c_str(), int(got));
    ++g_failures;
  }
}

// The recomputing reduce's own argument errors (no y, a bad y_dtype) and the reduce's
// coefficient rule are reported before anything is launched (host pointers are not touched).
void test_backward_reduce_recompute_errors() {
  const int failures_before = g_failures;
  float buffer[4] = {};
  const pyeuler_geometry_t geo{2, 2, 1, PYEULER_LAYOUT_CHANNELS_FIRST};
  const pyeuler_coef_t per_channel{buffer, 0}, per_sample{buffer, 2};
  auto reduce = [&](void* y, pyeuler_dtype_t y_dtype, pyeuler_coef_t center) {
    return pyeuler_affine_act_backward_reduce_recompute(
        buffer, buffer, PYEULER_DTYPE_FLOAT32, geo, per_channel, per_channel, center, 1, 0,
        buffer, buffer, y, y_dtype, nullptr, 0, nullptr);
  };
  const std::string what = "backward_reduce_recompute ";
  expect_invalid_value(what + "NULL y", reduce(nullptr, PYEULER_DTYPE_FLOAT32, per_channel));
  expect_invalid_value(what + "bad y_dtype", reduce(buffer, pyeuler_dtype_t(7), per_channel));
  expect_invalid_value(what + "[N, C] center summed over N",
                       reduce(buffer, PYEULER_DTYPE_FLOAT32, per_sample));
  std::printf("%-4s backward_reduce_recompute argument errors\n",
              g_failures == failures_before ? "ok" : "FAIL");
}

// The IE maps' argument errors (a required output NULL, nothing to do, a bad dtype) are
// reported before anything is launched (host pointers are not touched).
void test_ie_errors() {
  const int failures_before = g_failures;
  float buffer[4] = {};
  const std::string what = "ie ";
  auto with_term = [&](void* term, int64_t numel, pyeuler_dtype_t dtype) {
    return pyeuler_ie_residual_with_term(buffer, buffer, buffer, dtype, numel, 0.5, 0.1, buffer,
                                         term, nullptr);
  };
  expect_invalid_value(what + "residual_with_term NULL term",
                       with_term(nullptr, 4, PYEULER_DTYPE_FLOAT32));
  expect_invalid_value(what + "residual_with_term numel 0",
                       with_term(buffer, 0, PYEULER_DTYPE_FLOAT32));
  expect_invalid_value(what + "residual_with_term bad dtype",
                       with_term(buffer, 4, pyeuler_dtype_t(7)));
  expect_invalid_value(what + "residual_with_term NULL e",
                       pyeuler_ie_residual_with_term(buffer, buffer, buffer,
                                                     PYEULER_DTYPE_FLOAT32, 4, 0.5, 0.1, nullptr,
                                                     buffer, nullptr));
  auto adjoint = [&](const void* dterm, void* dx, void* dc) {
    return pyeuler_ie_residual_with_term_adjoint(buffer, dterm, PYEULER_DTYPE_FLOAT32, 4, 0.5,
                                                 0.1, nullptr, dx, dc, buffer, nullptr);
  };
  expect_invalid_value(what + "adjoint NULL dterm", adjoint(nullptr, buffer, buffer));
  expect_invalid_value(what + "adjoint NULL dx", adjoint(buffer, nullptr, buffer));
  expect_invalid_value(what + "adjoint NULL dc", adjoint(buffer, buffer, nullptr));
  std::printf("%-4s ie argument errors\n", g_failures == failures_before ? "ok" : "FAIL");
}

// Argument errors are reported, not launched; C = 0 without a counter launches nothing.
void test_update_running_stats_errors() {
  const int failures_before = g_failures;
  float buffer[4] = {};
  int64_t host_counter = 0;
  const pyeuler_param_t none{nullptr, PYEULER_DTYPE_FLOAT32, 0};
  const pyeuler_param_t momentum{buffer, PYEULER_DTYPE_FLOAT32, 0};
  const pyeuler_param_t bad_momentum{buffer, pyeuler_dtype_t(7), 0};
  struct Expectation {
    const char* what;
    cudaError_t got;
  } const errors[] = {
      {"channels < 0", pyeuler_update_running_stats(buffer, buffer, PYEULER_DTYPE_FLOAT32,
                                                    nullptr, buffer, buffer, -1, 8, none, 0.1,
                                                    0, nullptr)},
      {"count 1", pyeuler_update_running_stats(buffer, buffer, PYEULER_DTYPE_FLOAT32, nullptr,
                                               buffer, buffer, 4, 1, none, 0.1, 0, nullptr)},
      {"bad buffer dtype", pyeuler_update_running_stats(buffer, buffer, pyeuler_dtype_t(7),
                                                        nullptr, buffer, buffer, 4, 8, none,
                                                        0.1, 0, nullptr)},
      {"bad momentum dtype",
       pyeuler_update_running_stats(buffer, buffer, PYEULER_DTYPE_FLOAT32, nullptr, buffer,
                                    buffer, 4, 8, bad_momentum, 0.1, 0, nullptr)},
      {"cumulative without a counter",
       pyeuler_update_running_stats(buffer, buffer, PYEULER_DTYPE_FLOAT32, nullptr, buffer,
                                    buffer, 4, 8, none, 0.1, 1, nullptr)},
      {"cumulative with a momentum tensor",
       pyeuler_update_running_stats(buffer, buffer, PYEULER_DTYPE_FLOAT32, &host_counter, buffer,
                                    buffer, 4, 8, momentum, 0.1, 1, nullptr)},
      {"NULL statistics", pyeuler_update_running_stats(buffer, buffer, PYEULER_DTYPE_FLOAT32,
                                                       nullptr, nullptr, buffer, 4, 8, none, 0.1,
                                                       0, nullptr)},
      {"NULL running_var", pyeuler_update_running_stats(buffer, nullptr, PYEULER_DTYPE_FLOAT32,
                                                        nullptr, buffer, buffer, 4, 8, none, 0.1,
                                                        0, nullptr)},
  };
  for (const Expectation& e : errors) {
    if (e.got != cudaErrorInvalidValue) {
      std::printf("FAIL update_running_stats: %s returned %d, not cudaErrorInvalidValue\n",
                  e.what, int(e.got));
      ++g_failures;
    }
  }
  // nothing to write: no launch, so host pointers are never touched
  if (pyeuler_update_running_stats(nullptr, nullptr, PYEULER_DTYPE_FLOAT32, nullptr, nullptr,
                                   nullptr, 0, 8, none, 0.1, 0, nullptr) != cudaSuccess) {
    std::printf("FAIL update_running_stats: C = 0 without a counter is not a no-op\n");
    ++g_failures;
  }
  std::printf("%-4s update_running_stats argument errors\n",
              g_failures == failures_before ? "ok" : "FAIL");
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
  test_norm_coefficients(rng);
  test_norm_coefficients_determinism_and_errors(rng);
  test_backward_coefficients_vjp(rng);
  test_double_backward_coefficients(rng);
  test_norm_stats_and_coefficients_dtype<float>(rng);
  test_norm_stats_and_coefficients_dtype<__half>(rng);
  test_norm_stats_and_coefficients_dtype<__nv_bfloat16>(rng);
  test_update_running_stats_dtype<float>(rng);
  test_update_running_stats_dtype<__half>(rng);
  test_update_running_stats_dtype<__nv_bfloat16>(rng);
  test_update_running_stats_errors();
  test_backward_reduce_recompute_errors();
  test_ie_errors();
  if (g_failures != 0) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all kernel tests passed\n");
  return 0;
}
