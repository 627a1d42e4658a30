// IE-Skip elementwise steps (docs/semantics.md §2): the residual e = x - c - θ·f(x) (and, for
// the fused step, its term -2γ·e), that map's adjoint, and the gradient step x - 2γ·(e - θ·v).
// Each reads and writes a few tensors of one dense layout, so all are one elementwise map.
#include "common.cuh"

namespace pyeuler {
namespace kernels {
namespace {

// The maps, each operation rounded separately like the eager reference's kernels.  A map of
// kIn inputs to kOut outputs computes every output; map_kernel stores those it was given.

// e = x - c - θ·fx, and the step's term -2γ·e from e in float32 (before e is rounded).
struct IeResidual {
  static constexpr int kIn = 3, kOut = 2;
  float theta, minus_two_step_size;  // -2γ, formed in double first as the reference does
  __device__ __forceinline__ void operator()(const float (&in)[kIn], float (&out)[kOut]) const {
    out[0] = __fsub_rn(__fsub_rn(in[0], in[1]), __fmul_rn(theta, in[2]));
    out[1] = __fmul_rn(minus_two_step_size, out[0]);
  }
};

// The transpose of IeResidual's linear map: u = de - 2γ·dterm; (dx, dc, dfx) = (u, -u, -θ·u).
// kAddend: a third input, another share of x's gradient, is added to dx alone (dx = u +
// dx_addend), summed here rather than by a pass of its own.
template <bool kAddend>
struct IeResidualAdjoint {
  static constexpr int kIn = kAddend ? 3 : 2, kOut = 3;
  float two_step_size, minus_theta;  // 2γ and -θ, formed in double first
  __device__ __forceinline__ void operator()(const float (&in)[kIn], float (&out)[kOut]) const {
    const float u = __fsub_rn(in[0], __fmul_rn(two_step_size, in[1]));
    if constexpr (kAddend) {
      out[0] = __fadd_rn(u, in[kIn - 1]);
    } else {
      out[0] = u;
    }
    out[1] = -u;
    out[2] = __fmul_rn(minus_theta, u);
  }
};

// The gradient step x - 2γ·(e - θ·v).
struct IeUpdate {
  static constexpr int kIn = 3, kOut = 1;
  float two_step_size, theta;  // 2γ formed in double first
  __device__ __forceinline__ void operator()(const float (&in)[kIn], float (&out)[kOut]) const {
    out[0] = __fsub_rn(in[0], __fmul_rn(two_step_size, __fsub_rn(in[1], __fmul_rn(theta, in[2]))));
  }
};

// A map's operands: every input, and the outputs, NULL where not wanted (not written).
template <typename T, int kIn, int kOut>
struct Streams {
  const T* in[kIn];
  T* out[kOut];
};

// out = op(in) elementwise: V-wide accesses for the bulk, then the < V trailing elements.
template <typename T, int V, typename Op>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    map_kernel(Streams<T, Op::kIn, Op::kOut> streams, int64_t numel, Op op) {
  constexpr int kIn = Op::kIn, kOut = Op::kOut;
  const int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  const int64_t vectors = numel / V;
  for (int64_t i = start; i < vectors; i += step) {
    float in_v[kIn][V], out_v[kOut][V];
#pragma unroll
    for (int k = 0; k < kIn; ++k) load_floats<T, V>(streams.in[k], i * V, in_v[k]);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float in[kIn], out[kOut];
#pragma unroll
      for (int k = 0; k < kIn; ++k) in[k] = in_v[k][j];
      op(in, out);
#pragma unroll
      for (int k = 0; k < kOut; ++k) out_v[k][j] = out[k];
    }
#pragma unroll
    for (int k = 0; k < kOut; ++k) {
      if (streams.out[k] != nullptr) store_floats<T, V>(streams.out[k], i * V, out_v[k]);
    }
  }
  for (int64_t i = vectors * V + start; i < numel; i += step) {
    float in[kIn], out[kOut];
#pragma unroll
    for (int k = 0; k < kIn; ++k) in[k] = to_float(streams.in[k][i]);
    op(in, out);
#pragma unroll
    for (int k = 0; k < kOut; ++k) {
      if (streams.out[k] != nullptr) streams.out[k][i] = from_float<T>(out[k]);
    }
  }
}

// Every input and the first output are required; later outputs may be NULL.
template <typename Op>
cudaError_t launch_map(const void* const (&in)[Op::kIn], void* const (&out)[Op::kOut],
                       pyeuler_dtype_t dtype, int64_t numel, Op op, cudaStream_t stream) {
  if (numel <= 0 || out[0] == nullptr) return cudaErrorInvalidValue;
  for (const void* p : in) {
    if (p == nullptr) return cudaErrorInvalidValue;
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vector_width<T>();
    Streams<T, Op::kIn, Op::kOut> streams;
    bool aligned = true;
    for (int k = 0; k < Op::kIn; ++k) {
      streams.in[k] = static_cast<const T*>(in[k]);
      aligned = aligned && all_vector_aligned<T>({in[k]});
    }
    for (int k = 0; k < Op::kOut; ++k) {
      streams.out[k] = static_cast<T*>(out[k]);
      aligned = aligned && all_vector_aligned<T>({out[k]});
    }
    const int width = aligned ? V : 1;
    unsigned blocks = 0;
    const cudaError_t err = elementwise_grid(ceil_div(numel, width), kMaxThreads, &blocks);
    if (err != cudaSuccess) return err;
    auto* kernel = aligned ? map_kernel<T, V, Op> : map_kernel<T, 1, Op>;
    kernel<<<blocks, kMaxThreads, 0, stream>>>(streams, numel, op);
    return cudaGetLastError();
  });
}

IeResidual ie_residual_map(double theta, double step_size) {
  return {float(theta), float(-2.0 * step_size)};
}

}  // namespace
}  // namespace kernels
}  // namespace pyeuler

using namespace pyeuler::kernels;

extern "C" cudaError_t pyeuler_ie_residual(const void* x, const void* c, const void* fx,
                                           pyeuler_dtype_t dtype, int64_t numel, double theta,
                                           void* e, cudaStream_t stream) {
  return launch_map({x, c, fx}, {e, nullptr}, dtype, numel, ie_residual_map(theta, 0.0), stream);
}

extern "C" cudaError_t pyeuler_ie_residual_with_term(const void* x, const void* c,
                                                     const void* fx, pyeuler_dtype_t dtype,
                                                     int64_t numel, double theta,
                                                     double step_size, void* e, void* term,
                                                     cudaStream_t stream) {
  if (term == nullptr) return cudaErrorInvalidValue;
  return launch_map({x, c, fx}, {e, term}, dtype, numel, ie_residual_map(theta, step_size),
                    stream);
}

extern "C" cudaError_t pyeuler_ie_residual_with_term_adjoint(
    const void* de, const void* dterm, pyeuler_dtype_t dtype, int64_t numel, double theta,
    double step_size, const void* dx_addend, void* dx, void* dc, void* dfx,
    cudaStream_t stream) {
  if (dc == nullptr) return cudaErrorInvalidValue;
  const float two_step_size = float(2.0 * step_size), minus_theta = float(-theta);
  if (dx_addend == nullptr) {
    return launch_map({de, dterm}, {dx, dc, dfx}, dtype, numel,
                      IeResidualAdjoint<false>{two_step_size, minus_theta}, stream);
  }
  return launch_map({de, dterm, dx_addend}, {dx, dc, dfx}, dtype, numel,
                    IeResidualAdjoint<true>{two_step_size, minus_theta}, stream);
}

extern "C" cudaError_t pyeuler_ie_update(const void* x, const void* e, const void* v,
                                         pyeuler_dtype_t dtype, int64_t numel, double step_size,
                                         double theta, void* x_next, cudaStream_t stream) {
  return launch_map({x, e, v}, {x_next}, dtype, numel,
                    IeUpdate{float(2.0 * step_size), float(theta)}, stream);
}
