// BatchNorm / GroupNorm statistics: Welford partials per block, Chan-merged in a fixed order.
#include "reduce.cuh"

namespace pyeuler {
namespace kernels {
namespace {

template <typename T>
struct WelfordPolicy {
  using State = Welford;
  using Combine = WelfordCombine;

  const T* x;

  // Rows kernel: the V elements of one access belong to the same unit.
  struct UnitBinding {
    const T* x;
    template <int V>
    __device__ __forceinline__ void push(Welford& acc, int64_t offset) const {
      float values[V];
      load_floats<T, V>(x, offset, values);
      acc = welford_combine(acc, welford_of(values));
    }
  };
  __device__ UnitBinding bind_unit(int64_t) const { return {x}; }

  // Channels-last kernel: the V elements are V channels of one row.
  template <int V>
  struct LanesBinding {
    const T* x;
    __device__ __forceinline__ void push(Welford (&lanes)[V], int64_t offset) const {
      float values[V];
      load_floats<T, V>(x, offset, values);
      welford_push_lanes(lanes, values);
    }
  };
  template <int V>
  __device__ LanesBinding<V> bind_lanes(int64_t, int64_t) const {
    return {x};
  }
};

cudaError_t plan_norm_stats(const pyeuler_geometry_t& geo, int64_t groups, ReductionPlan* plan) {
  if (!geometry_is_valid(geo) || groups < 0 || (groups > 0 && geo.c % groups != 0)) {
    return cudaErrorInvalidValue;
  }
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;

  const bool channels_last = geo.layout == PYEULER_LAYOUT_CHANNELS_LAST;
  if (groups == 0) {  // BatchNorm: one unit per channel
    if (channels_last) {
      *plan = channels_last_reduction(1, geo.n * geo.s, geo.c, sm_count);
    } else {
      *plan = rows_reduction({geo.c, geo.c, geo.s, 0, geo.n, geo.s, geo.c * geo.s}, sm_count);
    }
    return cudaSuccess;
  }
  // GroupNorm: one unit per (sample, group)
  const int64_t group_channels = geo.c / groups;
  const int64_t units = geo.n * groups;
  if (channels_last) {
    *plan = rows_reduction(
        {units, groups, group_channels, geo.s * geo.c, geo.s, group_channels, geo.c}, sm_count);
  } else {
    const int64_t group_size = group_channels * geo.s;
    *plan = rows_reduction({units, units, group_size, 0, 1, group_size, 0}, sm_count);
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace kernels
}  // namespace pyeuler

using namespace pyeuler::kernels;

extern "C" cudaError_t pyeuler_norm_stats_workspace_size(pyeuler_geometry_t geo, int64_t groups,
                                                         size_t* bytes) {
  ReductionPlan plan;
  const cudaError_t err = plan_norm_stats(geo, groups, &plan);
  if (err != cudaSuccess) return err;
  *bytes = partials_bytes<Welford>(plan.splits(), plan.units());
  return cudaSuccess;
}

extern "C" cudaError_t pyeuler_norm_stats(const void* x, pyeuler_dtype_t dtype,
                                          pyeuler_geometry_t geo, int64_t groups, float* mean,
                                          float* var, void* workspace, size_t workspace_bytes,
                                          cudaStream_t stream) {
  ReductionPlan plan;
  cudaError_t err = plan_norm_stats(geo, groups, &plan);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < partials_bytes<Welford>(plan.splits(), plan.units())) {
    return cudaErrorInvalidValue;
  }
  float* partials = static_cast<float*>(workspace);
  err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const WelfordPolicy<T> policy{static_cast<const T*>(x)};
    return launch_partials<T>(policy, plan, all_vector_aligned<T>({x}), partials, stream);
  });
  if (err != cudaSuccess) return err;
  return launch_finalize<Welford, WelfordCombine>(partials, plan.splits(), plan.units(),
                                                  Results<2>{{mean, var}}, stream);
}

extern "C" cudaError_t pyeuler_welford_finalize(const float* partials, int64_t num_partials,
                                                int64_t num_units, float* mean, float* var,
                                                cudaStream_t stream) {
  if (num_partials < 1 || num_units < 1) return cudaErrorInvalidValue;
  return launch_finalize<Welford, WelfordCombine>(partials, num_partials, num_units,
                                                  Results<2>{{mean, var}}, stream);
}
