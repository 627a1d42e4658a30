// Two-stage deterministic reductions over (N, C, S) activations, shared by the statistics
// (Welford) and the backward reduces (gradient sums).
//
// Stage 1 writes one partial state per (split, unit) into a float32 workspace laid out as
// [state field][split][unit]; stage 2 (finalize_partials_kernel) folds the splits of every
// unit in a fixed tree.  No atomics anywhere, so results are bitwise reproducible for a given
// shape and device, and the partials can be gathered across GPUs before stage 2.
//
// A Policy says what one element contributes.  It provides
//   using State; using Combine;                          State{} is the empty state
//   bind_unit(unit)                -> b, b.push<V>(State&, offset)            (rows kernel)
//   bind_lanes<V>(sample, channel) -> b, b.push(State (&)[V], offset)  (channels-last kernel)
// where `offset` is the element offset of V consecutive elements.
#pragma once

#include "common.cuh"

namespace pyeuler {
namespace kernels {

// ---------------------------------------------------------------------------------------
// Partial states in the workspace: field-major planes of num_splits * num_units floats.

__device__ __forceinline__ void store_partial(float* partials, int64_t index, int64_t plane,
                                              const Welford& w) {
  partials[index] = w.count;
  partials[plane + index] = w.mean;
  partials[2 * plane + index] = w.m2;
}

__device__ __forceinline__ void load_partial(const float* partials, int64_t index, int64_t plane,
                                             Welford& w) {
  w = {partials[index], partials[plane + index], partials[2 * plane + index]};
}

template <int K>
__device__ __forceinline__ void store_partial(float* partials, int64_t index, int64_t plane,
                                              const Sums<K>& s) {
#pragma unroll
  for (int k = 0; k < K; ++k) partials[k * plane + index] = s.v[k];
}

template <int K>
__device__ __forceinline__ void load_partial(const float* partials, int64_t index, int64_t plane,
                                             Sums<K>& s) {
#pragma unroll
  for (int k = 0; k < K; ++k) s.v[k] = partials[k * plane + index];
}

// Every state is a plain aggregate of floats, one workspace plane per float.
template <typename State>
constexpr int64_t state_floats() {
  return sizeof(State) / sizeof(float);
}

// Destinations of stage 2: K float arrays of num_units each.
template <int K>
struct Results {
  float* arrays[K];
};

// Final outputs: (mean, biased variance), or the K sums.  Deliberately unlike torch, a
// variance that overflowed to +inf is written as NaN (primitives.norm_stats): torch's inf
// gives invstd = 0 and a confident, finite relu(bias) downstream; NaN reaches the loss.
__device__ __forceinline__ void write_result(const Welford& w, int64_t unit,
                                             const Results<2>& out) {
  const float var = w.m2 / w.count;
  out.arrays[0][unit] = w.mean;
  out.arrays[1][unit] = var == INFINITY ? __int_as_float(0x7fc00000) : var;
}

template <int K>
__device__ __forceinline__ void write_result(const Sums<K>& s, int64_t unit,
                                             const Results<K>& out) {
#pragma unroll
  for (int k = 0; k < K; ++k) out.arrays[k][unit] = s.v[k];
}

// Stage 2's epilogue, run by every thread of a block once its units' results are written:
// nothing for plain results.  A destination type with more to write per unit (the forward
// coefficients of norm_stats.cu) overloads write_result and finish_block.
template <int K>
__device__ __forceinline__ void finish_block(const Results<K>&, int64_t /*first_unit*/,
                                             int64_t /*num_units*/) {}

// ---------------------------------------------------------------------------------------
// Stage 1a: "rows" reductions.  Each unit is `rows` runs of `row_length` contiguous elements,
// `row_stride` apart; unit u starts at (u / units_per_group) * group_stride
// + (u % units_per_group) * unit_stride.  One block per (unit, split).
//   BatchNorm, channels-first:   unit c,      rows N, row_length S,      row_stride C*S
//   GroupNorm, channels-first:   unit (n, g), 1 row of (C/G)*S
//   GroupNorm, channels-last:    unit (n, g), rows S, row_length C/G,    row_stride C
//   per-sample sums, ch.-first:  unit (n, c), 1 row of S

struct RowSet {
  int64_t units;
  int64_t units_per_group;
  int64_t unit_stride;
  int64_t group_stride;
  int64_t rows;
  int64_t row_length;
  int64_t row_stride;

  __host__ __device__ int64_t unit_offset(int64_t unit) const {
    return (unit / units_per_group) * group_stride + (unit % units_per_group) * unit_stride;
  }

  // Whether every run starts V-aligned (relative to the tensor) and is a whole number of V.
  bool allows_vector_width(int64_t v) const {
    return row_length % v == 0 && row_stride % v == 0 && unit_stride % v == 0 &&
           group_stride % v == 0;
  }
};

template <typename Policy, int V>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    reduce_rows_kernel(Policy policy, RowSet set, int64_t num_splits, float* partials) {
  using State = typename Policy::State;
  const int64_t unit = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t vectors_per_row = set.row_length / V;
  const int64_t vectors = set.rows * vectors_per_row;
  const int64_t start = split * blockDim.x + threadIdx.x;
  const int64_t step = num_splits * blockDim.x;

  State acc{};
  if (start < vectors) {
    const auto binding = policy.bind_unit(unit);
    const int64_t base = set.unit_offset(unit);
    // (outer, middle) = (row, vector within the row); inner radix 1 is unused.
    MixedRadixCursor pos(start, step, vectors_per_row, 1);
    for (int64_t i = start; i < vectors; i += step, pos.advance()) {
      binding.template push<V>(acc, base + pos.outer * set.row_stride + pos.middle * V);
    }
  }
  acc = block_reduce(acc, typename Policy::Combine{});
  if (threadIdx.x == 0) {
    store_partial(partials, split * set.units + unit, num_splits * set.units, acc);
  }
}

// ---------------------------------------------------------------------------------------
// Stage 1b: channels-last reductions.  Per sample, `rows` rows of C contiguous channels;
// one unit per (sample, channel).  A block covers a tile of channel vectors (threadIdx % tile)
// over a strided subset of rows (threadIdx / tile), so every warp reads whole row segments;
// the row lanes of each column are then folded in shared memory.
// Grid: x = sample * num_splits + split, y = channel tile.

constexpr int64_t kChannelsPerTile = 128;

template <typename Policy, int V>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    reduce_channels_last_kernel(Policy policy, int64_t rows, int64_t channels, int64_t num_splits,
                                float* partials) {
  using State = typename Policy::State;
  extern __shared__ unsigned char shared_bytes[];
  State* scratch = reinterpret_cast<State*>(shared_bytes);

  const int64_t vectors_per_row = channels / V;
  const int tile_width = int(ceil_div(vectors_per_row, gridDim.y));
  const int row_lanes = blockDim.x / tile_width;
  const int column = threadIdx.x % tile_width;
  const int row_lane = threadIdx.x / tile_width;
  const int64_t vector_column = int64_t(blockIdx.y) * tile_width + column;
  const int64_t sample = blockIdx.x / num_splits;
  const int64_t split = blockIdx.x % num_splits;
  const bool active = row_lane < row_lanes && vector_column < vectors_per_row;

  State lanes[V] = {};
  if (active) {
    const auto binding = policy.template bind_lanes<V>(sample, vector_column * V);
    const int64_t sample_offset = sample * rows * channels + vector_column * V;
    for (int64_t row = split * row_lanes + row_lane; row < rows; row += num_splits * row_lanes) {
      binding.push(lanes, sample_offset + row * channels);
    }
  }
  reduce_over_row_lanes<State, V>(lanes, scratch, row_lane, column, tile_width, row_lanes,
                                  typename Policy::Combine{});
  if (active && row_lane == 0) {
    const int64_t units = gridDim.x / num_splits * channels;
    const int64_t first_unit = sample * channels + vector_column * V;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      store_partial(partials, split * units + first_unit + i, num_splits * units, lanes[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Stage 2: fold the splits of every unit.  A block covers kFinalizeUnits consecutive units
// (coalesced reads of each split's row) and blockDim.x / kFinalizeUnits split lanes.
// `out` is a Results<K>, or another destination type with its own write_result and
// finish_block (found by argument-dependent lookup).

constexpr int kFinalizeUnits = 32;
constexpr int kFinalizeThreads = 512;

template <typename State, typename Combine, typename Out>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_partials_kernel(const float* partials, int64_t num_splits, int64_t num_units,
                             Out out) {
  extern __shared__ unsigned char shared_bytes[];
  State* scratch = reinterpret_cast<State*>(shared_bytes);
  const int column = threadIdx.x % kFinalizeUnits;
  const int split_lane = threadIdx.x / kFinalizeUnits;
  const int split_lanes = blockDim.x / kFinalizeUnits;
  const int64_t unit = int64_t(blockIdx.x) * kFinalizeUnits + column;

  State acc[1] = {};
  if (unit < num_units) {
    const int64_t plane = num_splits * num_units;
    for (int64_t split = split_lane; split < num_splits; split += split_lanes) {
      State partial;
      load_partial(partials, split * num_units + unit, plane, partial);
      acc[0] = Combine{}(acc[0], partial);
    }
  }
  reduce_over_row_lanes<State, 1>(acc, scratch, split_lane, column, kFinalizeUnits, split_lanes,
                                  Combine{});
  if (split_lane == 0 && unit < num_units) write_result(acc[0], unit, out);
  finish_block(out, int64_t(blockIdx.x) * kFinalizeUnits, num_units);
}

// ---------------------------------------------------------------------------------------
// Host side: launch plans.  The split counts depend only on sizes and the SM count (never on
// dtype or pointer alignment), so *_workspace_size and the launch always agree.

constexpr int64_t kMaxSplits = 1024;
constexpr int64_t kMinElementsPerThread = 64;  // amortises the per-block partial write
constexpr int64_t kMinRowsPerSplit = 64;       // keeps channels-last partials << the input

inline int64_t clamp_splits(int64_t splits) {
  return splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits);
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Blocks for one full wave of kMaxThreads-thread blocks.
inline int64_t full_wave_blocks(int sm_count) {
  return int64_t(sm_count) * (2048 / kMaxThreads);
}

struct RowsPlan {
  RowSet set;
  int threads;
  int64_t splits;
};

inline RowsPlan plan_rows(const RowSet& set, int sm_count) {
  const int64_t elements = set.rows * set.row_length;
  // Small units get smaller blocks (per-sample sums over an 8x8 map are 64 elements).
  int threads = kWarpSize;
  while (threads < kMaxThreads && threads * kMinElementsPerThread < elements) threads *= 2;
  int64_t splits = ceil_div(full_wave_blocks(sm_count), set.units);
  splits = min64(splits, ceil_div(elements, threads * kMinElementsPerThread));
  return {set, threads, clamp_splits(splits)};
}

struct ChannelsLastPlan {
  int64_t samples;
  int64_t rows;  // per sample
  int64_t channels;
  int64_t tiles;
  int64_t splits;
};

inline ChannelsLastPlan plan_channels_last(int64_t samples, int64_t rows, int64_t channels,
                                           int sm_count) {
  const int64_t tiles = ceil_div(channels, kChannelsPerTile);
  int64_t splits = ceil_div(full_wave_blocks(sm_count), samples * tiles);
  splits = min64(splits, ceil_div(rows, kMinRowsPerSplit));
  splits = min64(splits, ceil_div(rows * channels, kMaxThreads * kMinElementsPerThread));
  return {samples, rows, channels, tiles, clamp_splits(splits)};
}

template <typename State>
size_t partials_bytes(int64_t splits, int64_t units) {
  return size_t(state_floats<State>() * splits * units) * sizeof(float);
}

template <typename Policy, int V>
cudaError_t launch_rows(const Policy& policy, const RowsPlan& plan, float* partials,
                        cudaStream_t stream) {
  const dim3 grid(unsigned(plan.set.units), unsigned(plan.splits));
  reduce_rows_kernel<Policy, V><<<grid, plan.threads, 0, stream>>>(policy, plan.set, plan.splits,
                                                                   partials);
  return cudaGetLastError();
}

template <typename Policy, int V>
cudaError_t launch_channels_last(const Policy& policy, const ChannelsLastPlan& plan,
                                 float* partials, cudaStream_t stream) {
  const dim3 grid(unsigned(plan.samples * plan.splits), unsigned(plan.tiles));
  const size_t scratch = size_t(kMaxThreads) * V * sizeof(typename Policy::State);
  reduce_channels_last_kernel<Policy, V><<<grid, kMaxThreads, scratch, stream>>>(
      policy, plan.rows, plan.channels, plan.splits, partials);
  return cudaGetLastError();
}

template <typename State, typename Combine, typename Out>
cudaError_t launch_finalize(const float* partials, int64_t splits, int64_t units, const Out& out,
                            cudaStream_t stream) {
  const unsigned blocks = unsigned(ceil_div(units, kFinalizeUnits));
  const size_t scratch = size_t(kFinalizeThreads) * sizeof(State);
  finalize_partials_kernel<State, Combine, Out><<<blocks, kFinalizeThreads, scratch, stream>>>(
      partials, splits, units, out);
  return cudaGetLastError();
}

// A reduction is either kind of stage 1 plus the shared stage 2.
struct ReductionPlan {
  bool channels_last;
  RowsPlan rows;             // valid when !channels_last
  ChannelsLastPlan columns;  // valid when channels_last

  int64_t units() const {
    return channels_last ? columns.samples * columns.channels : rows.set.units;
  }
  int64_t splits() const { return channels_last ? columns.splits : rows.splits; }
};

inline ReductionPlan rows_reduction(const RowSet& set, int sm_count) {
  ReductionPlan plan{};
  plan.channels_last = false;
  plan.rows = plan_rows(set, sm_count);
  return plan;
}

inline ReductionPlan channels_last_reduction(int64_t samples, int64_t rows, int64_t channels,
                                             int sm_count) {
  ReductionPlan plan{};
  plan.channels_last = true;
  plan.columns = plan_channels_last(samples, rows, channels, sm_count);
  return plan;
}

// Stage 1 with 128-bit accesses when the layout and every pointer allow them, else scalar.
template <typename T, typename Policy>
cudaError_t launch_partials(const Policy& policy, const ReductionPlan& plan,
                            bool pointers_aligned, float* partials, cudaStream_t stream) {
  constexpr int V = vector_width<T>();
  if (plan.channels_last) {
    if (pointers_aligned && plan.columns.channels % V == 0) {
      return launch_channels_last<Policy, V>(policy, plan.columns, partials, stream);
    }
    return launch_channels_last<Policy, 1>(policy, plan.columns, partials, stream);
  }
  if (pointers_aligned && plan.rows.set.allows_vector_width(V)) {
    return launch_rows<Policy, V>(policy, plan.rows, partials, stream);
  }
  return launch_rows<Policy, 1>(policy, plan.rows, partials, stream);
}

}  // namespace kernels
}  // namespace pyeuler
