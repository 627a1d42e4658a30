// IE-Skip elementwise steps (docs/semantics.md §2): the residual e = x - c - θ·f(x) and the
// gradient step x - 2γ·(e - θ·v).  Both read three tensors and write one, in whatever dense
// layout they share, so they are one ternary map.
#include "common.cuh"

namespace pyeuler {
namespace kernels {
namespace {

// Each operation rounded separately, like the eager reference's kernels (IeUpdate, the
// gradient step, is in common.cuh).
struct IeResidual {
  float theta;
  __device__ __forceinline__ float operator()(float x, float c, float fx) const {
    return __fsub_rn(__fsub_rn(x, c), __fmul_rn(theta, fx));
  }
};

// out = op(a, b, c) elementwise: V-wide accesses for the bulk, then the < V trailing elements.
template <typename T, int V, typename Op>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    ternary_map_kernel(const T* a, const T* b, const T* c, T* out, int64_t numel, Op op) {
  const int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  const int64_t vectors = numel / V;
  for (int64_t i = start; i < vectors; i += step) {
    float a_v[V], b_v[V], c_v[V], out_v[V];
    load_floats<T, V>(a, i * V, a_v);
    load_floats<T, V>(b, i * V, b_v);
    load_floats<T, V>(c, i * V, c_v);
#pragma unroll
    for (int k = 0; k < V; ++k) out_v[k] = op(a_v[k], b_v[k], c_v[k]);
    store_floats<T, V>(out, i * V, out_v);
  }
  for (int64_t i = vectors * V + start; i < numel; i += step) {
    out[i] = from_float<T>(op(to_float(a[i]), to_float(b[i]), to_float(c[i])));
  }
}

template <typename Op>
cudaError_t launch_ternary_map(const void* a, const void* b, const void* c, void* out,
                               pyeuler_dtype_t dtype, int64_t numel, Op op, cudaStream_t stream) {
  if (numel <= 0) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = vector_width<T>();
    const bool aligned = all_vector_aligned<T>({a, b, c, out});
    const int width = aligned ? V : 1;
    unsigned blocks = 0;
    const cudaError_t err = elementwise_grid(ceil_div(numel, width), kMaxThreads, &blocks);
    if (err != cudaSuccess) return err;
    const T* a_t = static_cast<const T*>(a);
    const T* b_t = static_cast<const T*>(b);
    const T* c_t = static_cast<const T*>(c);
    T* out_t = static_cast<T*>(out);
    auto* kernel = aligned ? ternary_map_kernel<T, V, Op> : ternary_map_kernel<T, 1, Op>;
    kernel<<<blocks, kMaxThreads, 0, stream>>>(a_t, b_t, c_t, out_t, numel, op);
    return cudaGetLastError();
  });
}

}  // namespace
}  // namespace kernels
}  // namespace pyeuler

using namespace pyeuler::kernels;

extern "C" cudaError_t pyeuler_ie_residual(const void* x, const void* c, const void* fx,
                                           pyeuler_dtype_t dtype, int64_t numel, double theta,
                                           void* e, cudaStream_t stream) {
  return launch_ternary_map(x, c, fx, e, dtype, numel, IeResidual{float(theta)}, stream);
}

extern "C" cudaError_t pyeuler_ie_update(const void* x, const void* e, const void* v,
                                         pyeuler_dtype_t dtype, int64_t numel, double step_size,
                                         double theta, void* x_next, cudaStream_t stream) {
  return launch_ternary_map(x, e, v, x_next, dtype, numel,
                            ie_update_step(step_size, theta), stream);
}
