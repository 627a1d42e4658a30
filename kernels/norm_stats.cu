// BatchNorm / GroupNorm statistics: Welford partials per block, Chan-merged in a fixed order.
// The merge (the finalize) can also write the forward's scale and shift from the statistics
// it just formed (pyeuler_norm_stats_and_coefficients), so the statistics and the forward
// coefficients take two launches, not three.
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

// The finalize's destination with the forward coefficients: mean and var of every
// statistic, then scale and shift of its channels (norm_algebra.forward_coefficients, the
// device function pyeuler_forward_coefficients uses).  Statistic u covers channels
// (u % groups) * group_channels + j, j < group_channels, of sample u / groups, whose
// coefficients sit at u * group_channels + j of the [C] or [N, C] outputs (BatchNorm:
// groups = C statistics of one channel each, one sample).
struct StatsAndCoefficients {
  float* mean;
  float* var;
  int64_t groups;  // statistics per sample
  int64_t group_channels;
  NormParams params;
  float eps;
  float* scale;
  float* shift;
};

__device__ __forceinline__ void write_result(const Welford& w, int64_t unit,
                                             const StatsAndCoefficients& out) {
  write_result(w, unit, Results<2>{{out.mean, out.var}});
}

// Every thread of the block, after its units' mean and var are written: those units'
// channels are one contiguous run of the coefficients, written coalesced.  The variance is
// read back as written (an overflow's NaN included), as forward_coefficients reads it.
__device__ __forceinline__ void finish_block(const StatsAndCoefficients& out,
                                             int64_t first_unit, int64_t num_units) {
  __syncthreads();  // the block's mean and var stores are visible to the whole block
  const int64_t last_unit =
      first_unit + kFinalizeUnits < num_units ? first_unit + kFinalizeUnits : num_units;
  const int64_t end = last_unit * out.group_channels;
  for (int64_t i = first_unit * out.group_channels + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t unit = i / out.group_channels;
    const int64_t c = (unit % out.groups) * out.group_channels + (i - unit * out.group_channels);
    const ForwardCoefficients k =
        forward_coefficients_of(out.mean[unit], out.var[unit], c, out.params, out.eps);
    out.scale[i] = k.scale;
    out.shift[i] = k.shift;
  }
}

// The coefficient destination of `units` statistics over `channels` channels (groups 0:
// BatchNorm), or cudaErrorInvalidValue.
cudaError_t stats_and_coefficients(int64_t units, int64_t channels, int64_t groups,
                                   pyeuler_param_t weight, pyeuler_param_t bias, pyeuler_param_t h,
                                   double h_value, double eps, float* mean, float* var,
                                   float* scale, float* shift, StatsAndCoefficients* out) {
  if (channels < 1 || groups < 0 || (groups > 0 && channels % groups != 0) ||
      (groups == 0 && units != channels) || !param_is_valid(weight) || !param_is_valid(bias) ||
      !param_is_valid(h) || mean == nullptr || var == nullptr || scale == nullptr ||
      shift == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t stat_groups = groups == 0 ? channels : groups;
  *out = {mean, var, stat_groups, channels / stat_groups,
          NormParams{weight, bias, h, float(h_value)}, float(eps), scale, shift};
  return cudaSuccess;
}

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

// Both stages of the statistics into `out` (Results<2> or StatsAndCoefficients).
template <typename Out>
cudaError_t norm_stats_into(const void* x, pyeuler_dtype_t dtype, const ReductionPlan& plan,
                            const Out& out, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  if (workspace_bytes < partials_bytes<Welford>(plan.splits(), plan.units())) {
    return cudaErrorInvalidValue;
  }
  float* partials = static_cast<float*>(workspace);
  const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const WelfordPolicy<T> policy{static_cast<const T*>(x)};
    return launch_partials<T>(policy, plan, all_vector_aligned<T>({x}), partials, stream);
  });
  if (err != cudaSuccess) return err;
  return launch_finalize<Welford, WelfordCombine>(partials, plan.splits(), plan.units(), out,
                                                  stream);
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
  const cudaError_t err = plan_norm_stats(geo, groups, &plan);
  if (err != cudaSuccess) return err;
  return norm_stats_into(x, dtype, plan, Results<2>{{mean, var}}, workspace,
                         workspace_bytes, stream);
}

extern "C" cudaError_t pyeuler_norm_stats_and_coefficients(
    const void* x, pyeuler_dtype_t dtype, pyeuler_geometry_t geo, int64_t groups,
    pyeuler_param_t weight, pyeuler_param_t bias, pyeuler_param_t h, double h_value, double eps,
    float* mean, float* var, float* scale, float* shift, void* workspace, size_t workspace_bytes,
    cudaStream_t stream) {
  ReductionPlan plan;
  cudaError_t err = plan_norm_stats(geo, groups, &plan);
  if (err != cudaSuccess) return err;
  StatsAndCoefficients out;
  err = stats_and_coefficients(plan.units(), geo.c, groups, weight, bias, h, h_value, eps, mean,
                               var, scale, shift, &out);
  if (err != cudaSuccess) return err;
  return norm_stats_into(x, dtype, plan, out, workspace, workspace_bytes, stream);
}

extern "C" cudaError_t pyeuler_welford_finalize(const float* partials, int64_t num_partials,
                                                int64_t num_units, float* mean, float* var,
                                                cudaStream_t stream) {
  if (num_partials < 1 || num_units < 1) return cudaErrorInvalidValue;
  return launch_finalize<Welford, WelfordCombine>(partials, num_partials, num_units,
                                                  Results<2>{{mean, var}}, stream);
}

extern "C" cudaError_t pyeuler_welford_finalize_and_coefficients(
    const float* partials, int64_t num_partials, int64_t samples, int64_t channels,
    int64_t groups, pyeuler_param_t weight, pyeuler_param_t bias, pyeuler_param_t h,
    double h_value, double eps, float* mean, float* var, float* scale, float* shift,
    cudaStream_t stream) {
  if (num_partials < 1 || groups < 0 || (groups > 0 && samples < 1)) {
    return cudaErrorInvalidValue;
  }
  const int64_t units = groups == 0 ? channels : samples * groups;
  StatsAndCoefficients out;
  const cudaError_t err = stats_and_coefficients(units, channels, groups, weight, bias, h,
                                                 h_value, eps, mean, var, scale, shift, &out);
  if (err != cudaSuccess) return err;
  return launch_finalize<Welford, WelfordCombine>(partials, num_partials, units, out, stream);
}
