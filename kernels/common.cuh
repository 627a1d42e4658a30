// Device helpers shared by the pyeuler kernels: dtype conversion, 128-bit vector access,
// Welford merges, deterministic block reductions, and the host-side launch plumbing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "pyeuler_kernels.h"

namespace pyeuler {
namespace kernels {

// ---------------------------------------------------------------------------------------
// dtypes: storage type T, arithmetic in float

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f(T{}) with T the storage type of `dtype`; invalid dtypes are an argument error.
template <typename F>
cudaError_t dispatch_dtype(pyeuler_dtype_t dtype, F&& f) {
  switch (dtype) {
    case PYEULER_DTYPE_FLOAT32: return f(float{});
    case PYEULER_DTYPE_FLOAT16: return f(__half{});
    case PYEULER_DTYPE_BFLOAT16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------
// 128-bit vector access

constexpr int kVectorBytes = 16;

// Elements per 128-bit access: 4 floats or 8 halves.
template <typename T>
constexpr int vector_width() {
  return kVectorBytes / sizeof(T);
}

// V consecutive elements aligned as one access, so the compiler emits a single LDG/STG.
template <typename T, int V>
struct alignas(sizeof(T) * V) Packed {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_floats(const T* ptr, int64_t offset, float (&out)[V]) {
  const Packed<T, V> packed = *reinterpret_cast<const Packed<T, V>*>(ptr + offset);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_float(packed.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_floats(T* ptr, int64_t offset, const float (&in)[V]) {
  Packed<T, V> packed;
#pragma unroll
  for (int i = 0; i < V; ++i) packed.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Packed<T, V>*>(ptr + offset) = packed;
}

// Masks are torch.bool: one byte, 0 or 1.
template <int V>
__device__ __forceinline__ void load_mask(const uint8_t* ptr, int64_t offset, bool (&out)[V]) {
  const Packed<uint8_t, V> packed = *reinterpret_cast<const Packed<uint8_t, V>*>(ptr + offset);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = packed.v[i] != 0;
}

template <int V>
__device__ __forceinline__ void store_mask(uint8_t* ptr, int64_t offset, const bool (&in)[V]) {
  Packed<uint8_t, V> packed;
#pragma unroll
  for (int i = 0; i < V; ++i) packed.v[i] = in[i] ? 1 : 0;
  *reinterpret_cast<Packed<uint8_t, V>*>(ptr + offset) = packed;
}

inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// The vector path needs every activation pointer aligned for a V-element access
// (null pointers are absent operands and do not count).
template <typename T>
bool all_vector_aligned(std::initializer_list<const void*> activations,
                        std::initializer_list<const void*> masks = {}) {
  constexpr int64_t kWidth = vector_width<T>();
  for (const void* p : activations) {
    if (p != nullptr && !is_aligned(p, kWidth * sizeof(T))) return false;
  }
  for (const void* p : masks) {
    if (p != nullptr && !is_aligned(p, kWidth)) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// Welford statistics

struct Welford {
  float count;
  float mean;
  float m2;  // sum of squared deviations from the mean
};

// Chan et al.'s pairwise merge; exact for empty operands (count 0).  The cross term is
// (delta·count_a)·(delta·weight_b), not delta²·count_a·weight_b: with an empty operand a
// |delta| > 1.8e19 would make the latter inf·0 = NaN.
__device__ __forceinline__ Welford welford_combine(const Welford& a, const Welford& b) {
  const float count = a.count + b.count;
  const float b_weight = count > 0.f ? b.count / count : 0.f;
  const float delta = b.mean - a.mean;
  return {count, a.mean + delta * b_weight, a.m2 + b.m2 + (delta * a.count) * (delta * b_weight)};
}

// Statistics of V values, merged in as one block: one division per vector, not per element.
template <int V>
__device__ __forceinline__ Welford welford_of(const float (&values)[V]) {
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) sum += values[i];
  const float mean = sum * (1.f / V);
  float m2 = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) m2 += (values[i] - mean) * (values[i] - mean);
  return {float(V), mean, m2};
}

// One Welford per lane (channel) of a vector; every lane has seen the same number of rows,
// so the reciprocal of the count is shared.
template <int V>
__device__ __forceinline__ void welford_push_lanes(Welford (&lanes)[V], const float (&values)[V]) {
  const float count = lanes[0].count + 1.f;
  const float inv_count = 1.f / count;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float delta = values[i] - lanes[i].mean;
    lanes[i].count = count;
    lanes[i].mean += delta * inv_count;
    lanes[i].m2 += delta * (values[i] - lanes[i].mean);
  }
}

struct WelfordCombine {
  __device__ __forceinline__ Welford operator()(const Welford& a, const Welford& b) const {
    return welford_combine(a, b);
  }
};

// K plain sums, the state of the backward reduces: (g, g * (x - center)) for the first
// order, (ddx, ddx * (x - center), ddx * g) for the double backward.
template <int K>
struct Sums {
  float v[K];
};

struct SumsCombine {
  template <int K>
  __device__ __forceinline__ Sums<K> operator()(const Sums<K>& a, const Sums<K>& b) const {
    Sums<K> sum;
#pragma unroll
    for (int k = 0; k < K; ++k) sum.v[k] = a.v[k] + b.v[k];
    return sum;
  }
};

__device__ __forceinline__ Welford shfl_down(const Welford& w, int offset) {
  return {__shfl_down_sync(0xffffffffu, w.count, offset),
          __shfl_down_sync(0xffffffffu, w.mean, offset),
          __shfl_down_sync(0xffffffffu, w.m2, offset)};
}

template <int K>
__device__ __forceinline__ Sums<K> shfl_down(const Sums<K>& s, int offset) {
  Sums<K> shifted;
#pragma unroll
  for (int k = 0; k < K; ++k) shifted.v[k] = __shfl_down_sync(0xffffffffu, s.v[k], offset);
  return shifted;
}

// ---------------------------------------------------------------------------------------
// Deterministic block reductions (fixed combine order, no atomics)

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
// Streaming kernels keep >= 3 blocks (768 threads) resident per SM to hide DRAM latency;
// this caps them at 80 registers (4 spills the widest channels-last kernels).
constexpr int kMinBlocksPerSm = 3;

// Reduces one value per thread; the result is valid in thread 0 only.  blockDim.x must be
// a multiple of 32 and at most kMaxThreads; every thread of the block must call this.
template <typename State, typename Combine>
__device__ State block_reduce(State value, Combine combine) {
  __shared__ State warp_results[kMaxThreads / kWarpSize];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = combine(value, shfl_down(value, offset));
  }
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x / kWarpSize); ++w) value = combine(value, warp_results[w]);
  }
  return value;
}

// Channel-tiled blocks: thread t works on column t % tile_width of rows t / tile_width.
// Folds the `row_lanes` partial states of each column onto row lane 0 by a fixed tree
// (lanes [half, active) onto [0, active - half)).  `scratch` holds blockDim.x * V states.
// Every thread of the block must call this.
template <typename State, int V, typename Combine>
__device__ void reduce_over_row_lanes(State (&state)[V], State* scratch, int row_lane, int column,
                                      int tile_width, int row_lanes, Combine combine) {
  for (int active = row_lanes; active > 1;) {
    const int half = (active + 1) / 2;
    if (row_lane >= half && row_lane < active) {
#pragma unroll
      for (int i = 0; i < V; ++i) scratch[(row_lane * tile_width + column) * V + i] = state[i];
    }
    __syncthreads();
    if (row_lane < active - half) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        state[i] = combine(state[i], scratch[((row_lane + half) * tile_width + column) * V + i]);
      }
    }
    __syncthreads();
    active = half;
  }
}

// ---------------------------------------------------------------------------------------
// Index arithmetic

// A position in a 3-digit mixed-radix number (outer, middle, inner) that advances by a
// fixed stride without any division inside the loop: grid-stride loops over (N, C, S) or
// (N, S, C) tensors use it to know each vector's sample and channel cheaply.
struct MixedRadixCursor {
  int64_t outer, middle, inner;
  int64_t middle_radix, inner_radix;
  int64_t step_outer, step_middle, step_inner;

  __device__ MixedRadixCursor(int64_t start, int64_t step, int64_t middle_radix_,
                              int64_t inner_radix_)
      : middle_radix(middle_radix_), inner_radix(inner_radix_) {
    inner = start % inner_radix;
    middle = (start / inner_radix) % middle_radix;
    outer = start / (inner_radix * middle_radix);
    step_inner = step % inner_radix;
    step_middle = (step / inner_radix) % middle_radix;
    step_outer = step / (inner_radix * middle_radix);
  }

  __device__ __forceinline__ void advance() {
    inner += step_inner;
    const int64_t inner_carry = inner >= inner_radix;
    inner -= inner_carry * inner_radix;
    middle += step_middle + inner_carry;
    const int64_t middle_carry = middle >= middle_radix;
    middle -= middle_carry * middle_radix;
    outer += step_outer + middle_carry;
  }
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-(sample, channel) coefficient of a [C] or [N, C] float32 vector.
__device__ __forceinline__ float coef_at(const pyeuler_coef_t& coef, int64_t n, int64_t c) {
  return coef.data[n * coef.sample_stride + c];
}

// ---------------------------------------------------------------------------------------
// The norms' per-channel parameters and forward coefficients (norm_algebra.py), shared by
// norm_coefficients.cu and the statistics' finalize (norm_stats.cu): one definition, so
// pyeuler_forward_coefficients and pyeuler_norm_stats_and_coefficients give the same bits.

// An optional parameter's value for channel c, read in its dtype (pyeuler_param_t).
__device__ __forceinline__ float param_at(const pyeuler_param_t& p, int64_t c) {
  const int64_t i = c * p.stride;
  switch (p.dtype) {
    case PYEULER_DTYPE_FLOAT16: return to_float(static_cast<const __half*>(p.data)[i]);
    case PYEULER_DTYPE_BFLOAT16: return to_float(static_cast<const __nv_bfloat16*>(p.data)[i]);
    default: return static_cast<const float*>(p.data)[i];
  }
}

// weight, bias and the step h (a parameter, or the float h_value).
struct NormParams {
  pyeuler_param_t weight;
  pyeuler_param_t bias;
  pyeuler_param_t h;
  float h_value;

  __device__ __forceinline__ float step(int64_t c) const {
    return h.data != nullptr ? param_at(h, c) : h_value;
  }
  // h·w, the scale of dx̂ = h·w·g (h alone without a weight)
  __device__ __forceinline__ float step_weight(int64_t c) const {
    const float s = step(c);
    return weight.data != nullptr ? __fmul_rn(s, param_at(weight, c)) : s;
  }
};

__device__ __forceinline__ float inverse_std(float var, float eps) {
  return rsqrtf(__fadd_rn(var, eps));  // torch's rsqrt on CUDA
}

struct ForwardCoefficients {
  float scale;
  float shift;
};

// scale = h·(w·invstd), shift = −scale·mean + h·b of channel c, its statistic's mean and var;
// every operation rounded separately, in the torch ops' order.
__device__ __forceinline__ ForwardCoefficients forward_coefficients_of(float mean, float var,
                                                                      int64_t c,
                                                                      const NormParams& params,
                                                                      float eps) {
  const float invstd = inverse_std(var, eps);
  const float h = params.step(c);
  float s = params.weight.data != nullptr ? __fmul_rn(param_at(params.weight, c), invstd)
                                          : invstd;
  s = __fmul_rn(h, s);
  float t = __fmul_rn(-s, mean);
  if (params.bias.data != nullptr) t = __fadd_rn(t, __fmul_rn(h, param_at(params.bias, c)));
  return {s, t};
}

// ---------------------------------------------------------------------------------------
// Host-side launch plumbing

inline bool dtype_is_valid(pyeuler_dtype_t dtype) {
  return dtype == PYEULER_DTYPE_FLOAT32 || dtype == PYEULER_DTYPE_FLOAT16 ||
         dtype == PYEULER_DTYPE_BFLOAT16;
}

// An absent parameter (data NULL), or one in a dtype param_at reads.
inline bool param_is_valid(const pyeuler_param_t& p) {
  return p.data == nullptr || dtype_is_valid(p.dtype);
}

inline bool geometry_is_valid(const pyeuler_geometry_t& geo) {
  return geo.n > 0 && geo.c > 0 && geo.s > 0 &&
         (geo.layout == PYEULER_LAYOUT_CHANNELS_FIRST ||
          geo.layout == PYEULER_LAYOUT_CHANNELS_LAST);
}

// Streaming multiprocessors of the current device: sizes the grids (two cheap driver
// queries, no synchronisation).
inline cudaError_t current_sm_count(int* sm_count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, device);
}

// Grid for a grid-stride elementwise loop over `work_items`: enough resident blocks to
// fill every SM, never more than there is work for.
inline cudaError_t elementwise_grid(int64_t work_items, int threads, unsigned* blocks) {
  int sm_count = 0;
  cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  constexpr int64_t kBlocksPerSm = 2048 / kMaxThreads * 4;
  const int64_t wanted = ceil_div(work_items, threads);
  const int64_t cap = int64_t(sm_count) * kBlocksPerSm;
  *blocks = unsigned(wanted < cap ? wanted : cap);
  return cudaSuccess;
}

}  // namespace kernels
}  // namespace pyeuler
