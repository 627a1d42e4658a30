// Fused per-channel affine + residual add + ReLU: forward, backward reduce (plain, or also
// writing the recomputed forward activation), backward apply (plain, or with the IE-Skip update
// fused into it), and the double-backward reduce and apply.
#include <type_traits>

#include "reduce.cuh"

namespace pyeuler {
namespace kernels {
namespace {

// ---------------------------------------------------------------------------------------
// Per-element helpers

// V coefficients for the V elements of one access: one channel broadcast (channels-first:
// the access runs along S) or V consecutive channels (channels-last).
template <int V, bool kChannelsLast>
__device__ __forceinline__ void load_coefs(const pyeuler_coef_t& coef, int64_t sample,
                                           int64_t channel, float (&out)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = coef_at(coef, sample, kChannelsLast ? channel + i : channel);
}

// scale * x + shift rounded after each operation, like the eager reference's two kernels:
// the ReLU gate recomputed in the backward must agree with it bit for bit.
__device__ __forceinline__ float affine(float scale, float x, float shift) {
  return __fadd_rn(__fmul_rn(scale, x), shift);
}

// The ReLU gate as torch's threshold_backward has it: open unless y <= 0, so a NaN y passes
// its gradient.  Gating is a select (gated), never dy * m: a closed gate gives 0 even for a
// NaN or inf dy, as in torch.
__device__ __forceinline__ bool gate_open(float y) { return !(y <= 0.f); }
__device__ __forceinline__ float gated(bool open, float v) { return open ? v : 0.f; }

// act(v): ReLU iff relu; NaN propagates, as torch.relu.
__device__ __forceinline__ float activate(bool relu, float v) {
  return relu && v < 0.f ? 0.f : v;
}

// m of the backward: the saved mask, else the recomputed ReLU gate, else open.
template <int V>
__device__ __forceinline__ void backward_gate(const uint8_t* mask, bool relu, int64_t offset,
                                              const float (&x)[V], const float (&scale)[V],
                                              const float (&shift)[V], bool (&gate)[V]) {
  if (mask != nullptr) {
    load_mask<V>(mask, offset, gate);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) gate[i] = !relu || gate_open(affine(scale[i], x[i], shift[i]));
  }
}

// Grid-stride loop over the V-element accesses of a dense (N, C, S) tensor, handing each
// one's element offset, sample and (first) channel to `body`.
template <int V, bool kChannelsLast, typename Body>
__device__ __forceinline__ void for_each_vector(const pyeuler_geometry_t& geo, Body&& body) {
  const int64_t vectors = geo.n * geo.c * geo.s / V;
  const int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  if (start >= vectors) return;
  // digits (n, c, s / V) channels-first, (n, s, c / V) channels-last
  MixedRadixCursor pos(start, step, kChannelsLast ? geo.s : geo.c,
                       (kChannelsLast ? geo.c : geo.s) / V);
  for (int64_t i = start; i < vectors; i += step, pos.advance()) {
    body(i * V, pos.outer, kChannelsLast ? pos.inner * V : pos.middle);
  }
}

// Runs launch(width, channels_last) with the widest access the layout and pointers allow:
// channels-first vectors run along S (need S % V == 0), channels-last along C.
template <typename T, typename Launch>
cudaError_t launch_elementwise(const pyeuler_geometry_t& geo, bool pointers_aligned,
                               Launch&& launch) {
  constexpr int V = vector_width<T>();
  using Wide = std::integral_constant<int, V>;
  using Scalar = std::integral_constant<int, 1>;
  const bool channels_last = geo.layout == PYEULER_LAYOUT_CHANNELS_LAST;
  const bool vectorize = pointers_aligned && (channels_last ? geo.c : geo.s) % V == 0;
  if (channels_last) {
    return vectorize ? launch(Wide{}, std::true_type{}) : launch(Scalar{}, std::true_type{});
  }
  return vectorize ? launch(Wide{}, std::false_type{}) : launch(Scalar{}, std::false_type{});
}

// ---------------------------------------------------------------------------------------
// Forward: y = act(shortcut + scale * x + shift), mask = gate_open(y)

template <typename T>
struct ForwardArgs {
  const T* x;
  const T* shortcut;  // nullable
  pyeuler_coef_t scale, shift;
  bool relu;
  T* y;
  uint8_t* mask;  // nullable
};

template <typename T, int V, bool kChannelsLast>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    affine_act_forward_kernel(ForwardArgs<T> args, pyeuler_geometry_t geo) {
  for_each_vector<V, kChannelsLast>(geo, [&](int64_t offset, int64_t sample, int64_t channel) {
    float scale[V], shift[V], x[V], shortcut[V], y[V];
    load_coefs<V, kChannelsLast>(args.scale, sample, channel, scale);
    load_coefs<V, kChannelsLast>(args.shift, sample, channel, shift);
    load_floats<T, V>(args.x, offset, x);
    if (args.shortcut != nullptr) load_floats<T, V>(args.shortcut, offset, shortcut);
    bool open[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      y[i] = affine(scale[i], x[i], shift[i]);
      if (args.shortcut != nullptr) y[i] = __fadd_rn(y[i], shortcut[i]);
      y[i] = activate(args.relu, y[i]);
      open[i] = gate_open(y[i]);
    }
    store_floats<T, V>(args.y, offset, y);
    if (args.mask != nullptr) store_mask<V>(args.mask, offset, open);
  });
}

// ---------------------------------------------------------------------------------------
// Backward apply: g = dy * m, dx = ((a * g + b * (x - center) + c) + dx_addend) + dx_addend2,
// dshortcut = g.
// kIeUpdate (the IE-Skip's last VJP pass): dx is the VJP v, and the output receives the
// step x - 2γ·(e - θ·v) instead, so v is never written.  The step reads a residual r: e, or
// its term -2γ·e (which ie_update.cu's residual writes with e).

// The step (x + residual_coef·r) + 2γθ·v, residual_coef -2γ for r = e and 1 for the term;
// each operation rounded separately like the eager reference's kernels.
struct IeStep {
  float residual_coef;  // formed in double first as the reference does
  float v_coef;         // 2γθ, likewise
  __device__ __forceinline__ float operator()(float x, float r, float v) const {
    return __fadd_rn(__fadd_rn(x, __fmul_rn(residual_coef, r)), __fmul_rn(v_coef, v));
  }
};

template <typename T>
struct ApplyArgs {
  const T* dy;
  const T* x;
  const uint8_t* mask;  // nullable
  pyeuler_coef_t scale, shift;
  bool relu;
  pyeuler_coef_t a, b, c, center;
  T* dx;                // x_new with kIeUpdate
  T* dshortcut;         // nullable
  const T* dx_addend;   // nullable; not read with kIeUpdate
  const T* dx_addend2;  // likewise; added after dx_addend
  const T* residual;    // kIeUpdate only: e or its term -2γ·e
  IeStep step;          // kIeUpdate only
};

template <typename T, int V, bool kChannelsLast, bool kIeUpdate>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    affine_act_backward_apply_kernel(ApplyArgs<T> args, pyeuler_geometry_t geo) {
  const bool gate_from_affine = args.mask == nullptr && args.relu;
  for_each_vector<V, kChannelsLast>(geo, [&](int64_t offset, int64_t sample, int64_t channel) {
    float scale[V] = {}, shift[V] = {}, a[V], b[V], c[V], center[V], dy[V], x[V];
    bool gate[V];
    if (gate_from_affine) {
      load_coefs<V, kChannelsLast>(args.scale, sample, channel, scale);
      load_coefs<V, kChannelsLast>(args.shift, sample, channel, shift);
    }
    load_coefs<V, kChannelsLast>(args.a, sample, channel, a);
    load_coefs<V, kChannelsLast>(args.b, sample, channel, b);
    load_coefs<V, kChannelsLast>(args.c, sample, channel, c);
    load_coefs<V, kChannelsLast>(args.center, sample, channel, center);
    load_floats<T, V>(args.dy, offset, dy);
    load_floats<T, V>(args.x, offset, x);
    backward_gate<V>(args.mask, args.relu, offset, x, scale, shift, gate);
    float g[V], dx[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      g[i] = gated(gate[i], dy[i]);
      // a zero b (running statistics) contributes nothing, even at x = ±inf (0·inf is NaN)
      dx[i] = a[i] * g[i] + (b[i] == 0.f ? 0.f : b[i] * (x[i] - center[i])) + c[i];
    }
    // g is stored before the addends are loaded, and each addend is loaded only once the
    // one before it is summed, so that fewer values are live at once (the channels-last
    // 16-bit kernels then spill no more than without the addends)
    if (args.dshortcut != nullptr) store_floats<T, V>(args.dshortcut, offset, g);
    if constexpr (!kIeUpdate) {
      // other shares of x's gradient, summed here (in this order) rather than by passes of
      // their own
      const T* const addends[] = {args.dx_addend, args.dx_addend2};
#pragma unroll
      for (const T* addend_ptr : addends) {
        if (addend_ptr == nullptr) continue;
        float addend[V];
        load_floats<T, V>(addend_ptr, offset, addend);
#pragma unroll
        for (int i = 0; i < V; ++i) dx[i] += addend[i];
      }
    } else {
      float r[V];
      load_floats<T, V>(args.residual, offset, r);
#pragma unroll
      for (int i = 0; i < V; ++i) dx[i] = args.step(x[i], r[i], dx[i]);
    }
    store_floats<T, V>(args.dx, offset, dx);
  });
}

// Both C entry points of the backward apply; the addends are read only without kIeUpdate,
// `residual` and `step` only with it.
template <bool kIeUpdate>
cudaError_t launch_backward_apply(const void* dy, const void* x, const uint8_t* mask,
                                  pyeuler_dtype_t dtype, const pyeuler_geometry_t& geo,
                                  pyeuler_coef_t scale, pyeuler_coef_t shift, int relu,
                                  pyeuler_coef_t a, pyeuler_coef_t b, pyeuler_coef_t c,
                                  pyeuler_coef_t center, const void* dx_addend,
                                  const void* dx_addend2, const void* residual, IeStep step,
                                  void* dx, void* dshortcut, cudaStream_t stream) {
  if (!geometry_is_valid(geo)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ApplyArgs<T> args{static_cast<const T*>(dy), static_cast<const T*>(x), mask,
                            scale, shift, relu != 0, a, b, c, center, static_cast<T*>(dx),
                            static_cast<T*>(dshortcut), static_cast<const T*>(dx_addend),
                            static_cast<const T*>(dx_addend2), static_cast<const T*>(residual),
                            step};
    const bool aligned = all_vector_aligned<T>(
        {dy, x, dx, dshortcut, dx_addend, dx_addend2, residual}, {mask});
    return launch_elementwise<T>(geo, aligned, [&](auto width, auto channels_last) {
      constexpr int V = decltype(width)::value;
      unsigned blocks = 0;
      const cudaError_t err = elementwise_grid(geo.n * geo.c * geo.s / V, kMaxThreads, &blocks);
      if (err != cudaSuccess) return err;
      affine_act_backward_apply_kernel<T, V, decltype(channels_last)::value, kIeUpdate>
          <<<blocks, kMaxThreads, 0, stream>>>(args, geo);
      return cudaGetLastError();
    });
  });
}

// ---------------------------------------------------------------------------------------
// Double-backward apply: with g = dy * m,
//   ddy = m * (a * ddx + p + q * (x - center) + ddshortcut),  dxx = b * ddx + q * g,
// where a zero b or q is an absent term (eval mode): exactly 0, even against a NaN or inf.

template <typename T>
struct DoubleApplyArgs {
  const T* ddx;
  const T* dy;
  const T* x;
  const uint8_t* mask;  // nullable
  pyeuler_coef_t scale, shift;
  bool relu;
  pyeuler_coef_t a, b, p, q, center;
  const T* ddshortcut;  // nullable
  float ddx_scale;      // dd = ddx_scale * ddx
  const T* dxx_addend;  // nullable
  T* ddy;
  T* dxx;
};

template <typename T, int V, bool kChannelsLast>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSm)
    affine_act_double_backward_apply_kernel(DoubleApplyArgs<T> args, pyeuler_geometry_t geo) {
  const bool gate_from_affine = args.mask == nullptr && args.relu;
  for_each_vector<V, kChannelsLast>(geo, [&](int64_t offset, int64_t sample, int64_t channel) {
    // Each coefficient is loaded where it is used and dies there: holding V = 8 lanes of all
    // seven at once spills the channels-last 16-bit kernels past kMinBlocksPerSm's cap.
    float scale[V] = {}, shift[V] = {}, x[V];
    bool gate[V];
    if (gate_from_affine) {
      load_coefs<V, kChannelsLast>(args.scale, sample, channel, scale);
      load_coefs<V, kChannelsLast>(args.shift, sample, channel, shift);
    }
    load_floats<T, V>(args.x, offset, x);
    backward_gate<V>(args.mask, args.relu, offset, x, scale, shift, gate);
    float coef[V], ddx[V], dy[V], xc[V], ddy[V], dxx[V];
    load_floats<T, V>(args.ddx, offset, ddx);
    if (args.ddx_scale != 1.f) {
#pragma unroll
      for (int i = 0; i < V; ++i) ddx[i] *= args.ddx_scale;
    }
    load_coefs<V, kChannelsLast>(args.a, sample, channel, coef);
#pragma unroll
    for (int i = 0; i < V; ++i) ddy[i] = coef[i] * ddx[i];
    load_coefs<V, kChannelsLast>(args.p, sample, channel, coef);
#pragma unroll
    for (int i = 0; i < V; ++i) ddy[i] += coef[i];
    load_coefs<V, kChannelsLast>(args.b, sample, channel, coef);
#pragma unroll
    for (int i = 0; i < V; ++i) dxx[i] = coef[i] == 0.f ? 0.f : coef[i] * ddx[i];
    load_coefs<V, kChannelsLast>(args.center, sample, channel, coef);
#pragma unroll
    for (int i = 0; i < V; ++i) xc[i] = x[i] - coef[i];
    load_floats<T, V>(args.dy, offset, dy);
    load_coefs<V, kChannelsLast>(args.q, sample, channel, coef);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      ddy[i] += coef[i] == 0.f ? 0.f : coef[i] * xc[i];
      dxx[i] += coef[i] == 0.f ? 0.f : coef[i] * gated(gate[i], dy[i]);
    }
    if (args.ddshortcut != nullptr) {
      float ddshortcut[V];
      load_floats<T, V>(args.ddshortcut, offset, ddshortcut);
#pragma unroll
      for (int i = 0; i < V; ++i) ddy[i] += ddshortcut[i];
    }
    if (args.dxx_addend != nullptr) {
      float addend[V];
      load_floats<T, V>(args.dxx_addend, offset, addend);
#pragma unroll
      for (int i = 0; i < V; ++i) dxx[i] += addend[i];
    }
#pragma unroll
    for (int i = 0; i < V; ++i) ddy[i] = gated(gate[i], ddy[i]);
    store_floats<T, V>(args.ddy, offset, ddy);
    store_floats<T, V>(args.dxx, offset, dxx);
  });
}

// ---------------------------------------------------------------------------------------
// Backward reduces (policies for reduce.cuh), K sums per unit.  K = 2, the first order: g and
// g * (x - center).  K = 3, the double backward: ddx, ddx * (x - center) and ddx * g.
// A first-order reduce with Y (the storage type of y) also writes the forward's activation
// y = act(scale * x + shift) it recomputes for the gate: every element is pushed exactly once,
// so the pass that reads x for the sums writes y too (a recomputing backward needs both).

// Adds one element's terms to the sums.
template <int K>
__device__ __forceinline__ void accumulate(Sums<K>& sums, float g, float xc, float ddx) {
  static_assert(K == 2 || K == 3, "first-order (2) or double-backward (3) sums");
  if constexpr (K == 2) {
    sums.v[0] += g;
    sums.v[1] += g * xc;
  } else {
    sums.v[0] += ddx;
    sums.v[1] += ddx * xc;
    sums.v[2] += ddx * g;
  }
}

// Y of the reduces that write no activation.
struct NoActivation {};

template <typename T, int K, typename Y = NoActivation>
struct GradSumsInputs {
  static constexpr bool kWritesActivation = !std::is_same_v<Y, NoActivation>;
  static_assert(K == 2 || !kWritesActivation, "only the first-order reduce writes y");

  const T* ddx;  // read only when K == 3
  const T* dy;
  const T* x;
  const uint8_t* mask;  // nullable; NULL with kWritesActivation
  bool relu;
  Y* y;  // written only with kWritesActivation, at x's offsets

  // scale and shift enter only through the recomputed ReLU gate or y (else may be absent).
  __device__ __forceinline__ bool reads_affine() const {
    return kWritesActivation || (mask == nullptr && relu);
  }

  // g = dy * m, x and (K == 3) ddx as float for the V elements at `offset`; with
  // kWritesActivation also stores their y.
  template <int V>
  __device__ __forceinline__ void load(int64_t offset, const float (&scale)[V],
                                       const float (&shift)[V], float (&g)[V], float (&x_v)[V],
                                       float (&ddx_v)[V]) const {
    float dy_v[V];
    bool gate[V];
    load_floats<T, V>(x, offset, x_v);
    if constexpr (kWritesActivation) {
      // the gate's affine below, the same operations on the same operands (one computation
      // once compiled), rounded once, to Y; stored before dy is loaded, so that fewer values
      // are live at once (the channels-last 16-bit kernels spill less on sm_80)
      float y_v[V];
#pragma unroll
      for (int i = 0; i < V; ++i) y_v[i] = activate(relu, affine(scale[i], x_v[i], shift[i]));
      store_floats<Y, V>(y, offset, y_v);
    }
    load_floats<T, V>(dy, offset, dy_v);
    backward_gate<V>(mask, relu, offset, x_v, scale, shift, gate);
#pragma unroll
    for (int i = 0; i < V; ++i) g[i] = gated(gate[i], dy_v[i]);
    if constexpr (K == 3) load_floats<T, V>(ddx, offset, ddx_v);
  }
};

template <typename T, int K, typename Y = NoActivation>
struct GradSumsPolicy {
  using State = Sums<K>;
  using Combine = SumsCombine;
  using Inputs = GradSumsInputs<T, K, Y>;

  Inputs inputs;
  pyeuler_coef_t scale, shift, center;
  int64_t channels;

  __device__ __forceinline__ void coefs_at(int64_t sample, int64_t channel, float& scale_c,
                                           float& shift_c, float& center_c) const {
    const bool reads_affine = inputs.reads_affine();
    scale_c = reads_affine ? coef_at(scale, sample, channel) : 0.f;
    shift_c = reads_affine ? coef_at(shift, sample, channel) : 0.f;
    center_c = coef_at(center, sample, channel);
  }

  // Rows kernel: unit (sample, channel) = (u / C, u % C); BatchNorm units are channels (u < C).
  struct UnitBinding {
    Inputs inputs;
    float scale, shift, center;

    template <int V>
    __device__ __forceinline__ void push(State& acc, int64_t offset) const {
      float scale_v[V], shift_v[V], g[V], x_v[V], ddx_v[V] = {};
#pragma unroll
      for (int i = 0; i < V; ++i) scale_v[i] = scale, shift_v[i] = shift;
      inputs.template load<V>(offset, scale_v, shift_v, g, x_v, ddx_v);
#pragma unroll
      for (int i = 0; i < V; ++i) accumulate(acc, g[i], x_v[i] - center, ddx_v[i]);
    }
  };
  __device__ UnitBinding bind_unit(int64_t unit) const {
    UnitBinding binding{inputs};
    coefs_at(unit / channels, unit % channels, binding.scale, binding.shift, binding.center);
    return binding;
  }

  // Channels-last kernel: lanes are V consecutive channels of one sample.
  template <int V>
  struct LanesBinding {
    Inputs inputs;
    float scale[V], shift[V], center[V];

    __device__ __forceinline__ void push(State (&lanes)[V], int64_t offset) const {
      float g[V], x_v[V], ddx_v[V] = {};
      inputs.template load<V>(offset, scale, shift, g, x_v, ddx_v);
#pragma unroll
      for (int i = 0; i < V; ++i) accumulate(lanes[i], g[i], x_v[i] - center[i], ddx_v[i]);
    }
  };
  template <int V>
  __device__ LanesBinding<V> bind_lanes(int64_t sample, int64_t channel) const {
    LanesBinding<V> binding{inputs};
#pragma unroll
    for (int i = 0; i < V; ++i) {
      coefs_at(sample, channel + i, binding.scale[i], binding.shift[i], binding.center[i]);
    }
    return binding;
  }
};

cudaError_t plan_backward_reduce(const pyeuler_geometry_t& geo, int per_sample,
                                 ReductionPlan* plan) {
  if (!geometry_is_valid(geo)) return cudaErrorInvalidValue;
  int sm_count = 0;
  const cudaError_t err = current_sm_count(&sm_count);
  if (err != cudaSuccess) return err;
  if (geo.layout == PYEULER_LAYOUT_CHANNELS_LAST) {
    *plan = per_sample ? channels_last_reduction(geo.n, geo.s, geo.c, sm_count)
                       : channels_last_reduction(1, geo.n * geo.s, geo.c, sm_count);
  } else {
    const int64_t units = per_sample ? geo.n * geo.c : geo.c;
    const int64_t rows = per_sample ? 1 : geo.n;
    *plan = rows_reduction({units, units, geo.s, 0, rows, geo.s, geo.c * geo.s}, sm_count);
  }
  return cudaSuccess;
}

template <int K>
cudaError_t backward_reduce_workspace_size(const pyeuler_geometry_t& geo, int per_sample,
                                           size_t* bytes) {
  ReductionPlan plan;
  const cudaError_t err = plan_backward_reduce(geo, per_sample, &plan);
  if (err != cudaSuccess) return err;
  *bytes = partials_bytes<Sums<K>>(plan.splits(), plan.units());
  return cudaSuccess;
}

// The C entry points of the backward reduces; `ddx` is read only with K == 3, and `y` (in
// y_dtype) is written only when not NULL, by the first-order reduce that recomputes the gate.
template <int K>
cudaError_t launch_backward_reduce(const void* ddx, const void* dy, const void* x,
                                   const uint8_t* mask, pyeuler_dtype_t dtype,
                                   const pyeuler_geometry_t& geo, pyeuler_coef_t scale,
                                   pyeuler_coef_t shift, pyeuler_coef_t center, int relu,
                                   int per_sample, void* y, pyeuler_dtype_t y_dtype,
                                   const Results<K>& sums, void* workspace,
                                   size_t workspace_bytes, cudaStream_t stream) {
  // Summing over N needs one coefficient per channel.
  if (!per_sample && (scale.sample_stride || shift.sample_stride || center.sample_stride)) {
    return cudaErrorInvalidValue;
  }
  ReductionPlan plan;
  cudaError_t err = plan_backward_reduce(geo, per_sample, &plan);
  if (err != cudaSuccess) return err;
  if (workspace_bytes < partials_bytes<Sums<K>>(plan.splits(), plan.units())) {
    return cudaErrorInvalidValue;
  }
  float* partials = static_cast<float*>(workspace);
  err = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto y_tag) {
      using Y = decltype(y_tag);
      const GradSumsInputs<T, K, Y> inputs{static_cast<const T*>(ddx), static_cast<const T*>(dy),
                                           static_cast<const T*>(x), mask, relu != 0,
                                           static_cast<Y*>(y)};
      const GradSumsPolicy<T, K, Y> policy{inputs, scale, shift, center, geo.c};
      // y is stored V = vector_width<T>() elements at a time, like the activations are read
      const bool aligned = all_vector_aligned<T>({ddx, dy, x}, {mask}) &&
                           is_aligned(y, vector_width<T>() * int64_t(sizeof(Y)));
      return launch_partials<T>(policy, plan, aligned, partials, stream);
    };
    if constexpr (K == 2) {
      if (y != nullptr) return dispatch_dtype(y_dtype, launch);
    }
    return launch(NoActivation{});
  });
  if (err != cudaSuccess) return err;
  return launch_finalize<Sums<K>, SumsCombine>(partials, plan.splits(), plan.units(), sums,
                                               stream);
}

}  // namespace
}  // namespace kernels
}  // namespace pyeuler

using namespace pyeuler::kernels;

extern "C" cudaError_t pyeuler_affine_act_forward(const void* x, const void* shortcut,
                                                  pyeuler_dtype_t dtype, pyeuler_geometry_t geo,
                                                  pyeuler_coef_t scale, pyeuler_coef_t shift,
                                                  int relu, void* y, uint8_t* mask,
                                                  cudaStream_t stream) {
  if (!geometry_is_valid(geo)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ForwardArgs<T> args{static_cast<const T*>(x), static_cast<const T*>(shortcut), scale,
                              shift, relu != 0, static_cast<T*>(y), mask};
    const bool aligned = all_vector_aligned<T>({x, shortcut, y}, {mask});
    return launch_elementwise<T>(geo, aligned, [&](auto width, auto channels_last) {
      constexpr int V = decltype(width)::value;
      unsigned blocks = 0;
      const cudaError_t err = elementwise_grid(geo.n * geo.c * geo.s / V, kMaxThreads, &blocks);
      if (err != cudaSuccess) return err;
      affine_act_forward_kernel<T, V, decltype(channels_last)::value>
          <<<blocks, kMaxThreads, 0, stream>>>(args, geo);
      return cudaGetLastError();
    });
  });
}

extern "C" cudaError_t pyeuler_affine_act_backward_apply(
    const void* dy, const void* x, const uint8_t* mask, pyeuler_dtype_t dtype,
    pyeuler_geometry_t geo, pyeuler_coef_t scale, pyeuler_coef_t shift, int relu,
    pyeuler_coef_t a, pyeuler_coef_t b, pyeuler_coef_t c, pyeuler_coef_t center,
    const void* dx_addend, const void* dx_addend2, void* dx, void* dshortcut,
    cudaStream_t stream) {
  return launch_backward_apply<false>(dy, x, mask, dtype, geo, scale, shift, relu, a, b, c,
                                      center, dx_addend, dx_addend2, nullptr, IeStep{}, dx,
                                      dshortcut, stream);
}

extern "C" cudaError_t pyeuler_affine_act_backward_apply_ie_update(
    const void* dy, const void* x, const uint8_t* mask, pyeuler_dtype_t dtype,
    pyeuler_geometry_t geo, pyeuler_coef_t scale, pyeuler_coef_t shift, int relu,
    pyeuler_coef_t a, pyeuler_coef_t b, pyeuler_coef_t c, pyeuler_coef_t center,
    const void* residual, double step_size, double theta, int residual_is_term, void* x_new,
    cudaStream_t stream) {
  if (residual == nullptr) return cudaErrorInvalidValue;
  const IeStep step{float(residual_is_term ? 1.0 : -2.0 * step_size),
                    float(2.0 * step_size * theta)};
  return launch_backward_apply<true>(dy, x, mask, dtype, geo, scale, shift, relu, a, b, c,
                                     center, nullptr, nullptr, residual, step, x_new, nullptr,
                                     stream);
}

extern "C" cudaError_t pyeuler_affine_act_double_backward_apply(
    const void* ddx, const void* dy, const void* x, const uint8_t* mask, pyeuler_dtype_t dtype,
    pyeuler_geometry_t geo, pyeuler_coef_t scale, pyeuler_coef_t shift, int relu,
    pyeuler_coef_t a, pyeuler_coef_t b, pyeuler_coef_t p, pyeuler_coef_t q,
    pyeuler_coef_t center, const void* ddshortcut, float ddx_scale, const void* dxx_addend,
    void* ddy, void* dxx, cudaStream_t stream) {
  if (!geometry_is_valid(geo)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const DoubleApplyArgs<T> args{static_cast<const T*>(ddx), static_cast<const T*>(dy),
                                  static_cast<const T*>(x), mask, scale, shift, relu != 0, a, b, p,
                                  q, center, static_cast<const T*>(ddshortcut), ddx_scale,
                                  static_cast<const T*>(dxx_addend), static_cast<T*>(ddy),
                                  static_cast<T*>(dxx)};
    const bool aligned =
        all_vector_aligned<T>({ddx, dy, x, ddshortcut, dxx_addend, ddy, dxx}, {mask});
    return launch_elementwise<T>(geo, aligned, [&](auto width, auto channels_last) {
      constexpr int V = decltype(width)::value;
      unsigned blocks = 0;
      const cudaError_t err = elementwise_grid(geo.n * geo.c * geo.s / V, kMaxThreads, &blocks);
      if (err != cudaSuccess) return err;
      affine_act_double_backward_apply_kernel<T, V, decltype(channels_last)::value>
          <<<blocks, kMaxThreads, 0, stream>>>(args, geo);
      return cudaGetLastError();
    });
  });
}

extern "C" cudaError_t pyeuler_affine_act_backward_reduce_workspace_size(pyeuler_geometry_t geo,
                                                                         int per_sample,
                                                                         size_t* bytes) {
  return backward_reduce_workspace_size<2>(geo, per_sample, bytes);
}

extern "C" cudaError_t pyeuler_affine_act_backward_reduce(
    const void* dy, const void* x, const uint8_t* mask, pyeuler_dtype_t dtype,
    pyeuler_geometry_t geo, pyeuler_coef_t scale, pyeuler_coef_t shift, pyeuler_coef_t center,
    int relu, int per_sample, float* sum_g, float* sum_g_xc, void* workspace,
    size_t workspace_bytes, cudaStream_t stream) {
  return launch_backward_reduce<2>(nullptr, dy, x, mask, dtype, geo, scale, shift, center, relu,
                                   per_sample, nullptr, dtype, Results<2>{{sum_g, sum_g_xc}},
                                   workspace, workspace_bytes, stream);
}

extern "C" cudaError_t pyeuler_affine_act_backward_reduce_recompute(
    const void* dy, const void* x, pyeuler_dtype_t dtype, pyeuler_geometry_t geo,
    pyeuler_coef_t scale, pyeuler_coef_t shift, pyeuler_coef_t center, int relu, int per_sample,
    float* sum_g, float* sum_g_xc, void* y, pyeuler_dtype_t y_dtype, void* workspace,
    size_t workspace_bytes, cudaStream_t stream) {
  if (y == nullptr || !dtype_is_valid(y_dtype)) return cudaErrorInvalidValue;
  return launch_backward_reduce<2>(nullptr, dy, x, nullptr, dtype, geo, scale, shift, center,
                                   relu, per_sample, y, y_dtype,
                                   Results<2>{{sum_g, sum_g_xc}}, workspace, workspace_bytes,
                                   stream);
}

extern "C" cudaError_t pyeuler_affine_act_double_backward_reduce_workspace_size(
    pyeuler_geometry_t geo, int per_sample, size_t* bytes) {
  return backward_reduce_workspace_size<3>(geo, per_sample, bytes);
}

extern "C" cudaError_t pyeuler_affine_act_double_backward_reduce(
    const void* ddx, const void* dy, const void* x, const uint8_t* mask, pyeuler_dtype_t dtype,
    pyeuler_geometry_t geo, pyeuler_coef_t scale, pyeuler_coef_t shift, pyeuler_coef_t center,
    int relu, int per_sample, float* sum_ddx, float* sum_ddx_xc, float* sum_ddx_g,
    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (ddx == nullptr) return cudaErrorInvalidValue;
  return launch_backward_reduce<3>(ddx, dy, x, mask, dtype, geo, scale, shift, center, relu,
                                   per_sample, nullptr, dtype,
                                   Results<3>{{sum_ddx, sum_ddx_xc, sum_ddx_g}}, workspace,
                                   workspace_bytes, stream);
}
