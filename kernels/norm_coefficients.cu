// The per-channel algebra of the norms (pyeuler/ops/norm_algebra.py), one launch each:
// statistics -> the forward's (scale, shift), and reduce sums -> the backward's (a, b, c)
// and parameter gradients, and BatchNorm's running-statistics update.  These are vectors of
// C or N * C floats, so the kernels are latency-bound: one launch instead of the dozen tiny
// torch ops the algebra would take.
//
// BatchNorm runs as the GroupNorm layout with one sample and a group per channel (its
// statistics and sums are [C]), so one code path serves both.  Every operation is rounded
// separately (__fmul_rn / __fadd_rn: no contracted multiply-adds) as the torch ops round
// them (torch's lerp fuses its one multiply-add, so the running-statistics update does too),
// and every sum has a fixed order: results are bitwise reproducible.
#include "common.cuh"

namespace pyeuler {
namespace kernels {
namespace {

constexpr int kThreads = kMaxThreads;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride beyond; these vectors are small
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------
// Operands

// The statistics' layout: `groups` statistics per sample, each over `group_channels`
// consecutive channels.  BatchNorm: 1 sample, C groups of 1 channel.
struct Layout {
  int64_t samples;
  int64_t channels;
  int64_t groups;
  int64_t group_channels;

  __device__ __forceinline__ int64_t statistic(int64_t n, int64_t c) const {
    return n * groups + c / group_channels;
  }
};

// ---------------------------------------------------------------------------------------
// Forward: scale = h·(w·invstd), shift = −scale·mean + h·b.  Element-wise.

__global__ void __launch_bounds__(kThreads)
    forward_coefficients_kernel(const float* mean, const float* var, Layout layout,
                                NormParams params, float eps, float* scale, float* shift) {
  const int64_t total = layout.samples * layout.channels;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t n = i / layout.channels;
    const int64_t c = i - n * layout.channels;
    const int64_t stat = layout.statistic(n, c);
    const ForwardCoefficients k = forward_coefficients_of(mean[stat], var[stat], c, params, eps);
    scale[i] = k.scale;
    shift[i] = k.shift;
  }
}

// ---------------------------------------------------------------------------------------
// Backward.  One launch, three kinds of blocks:
//   [0, scalar_blocks)       the 0-dim dh: one block folds every (sample, channel) term;
//   next column_blocks       dweight, dbias, per-channel dh: a tile of channels per block,
//                            its sample lanes folded in shared memory by a fixed tree;
//   the rest (unit blocks)   a, b, c: a segment of `unit_width` lanes per (sample, group)
//                            unit sums the group's terms (butterfly shuffles), then writes.

struct BackwardPlan {
  int64_t scalar_blocks;  // 0, or 1 for a 0-dim dh
  int64_t column_blocks;
  int column_tile;   // channels per column block
  int column_lanes;  // sample lanes per column block: tile * lanes == kThreads
  int64_t unit_blocks;
  int unit_width;  // lanes per unit: a power of two <= 32
};

struct BackwardArgs {
  const float* sum_g;    // NULL: no sums
  const float* sum_gxc;
  const float* dmean;    // may be NULL
  const float* dvar;     // may be NULL
  const float* var;
  Layout layout;
  NormParams params;
  float eps;
  int statistic_terms;   // need_x and batch_stats: b and c get the batch-statistics terms
  float inv_count;       // torch's v / count on CUDA is v * (1 / count), in float
  float neg_inv_count;   // float(−1.0 / count)
  float two_over_count;  // float(2.0 / count)
  float* a;
  float* b;
  float* c;
  float* dweight;  // NULL where not wanted
  float* dbias;
  float* dh;
  int dh_scalar;
  BackwardPlan plan;
};

// The terms of dweight, dbias and dh at one (sample, channel) of the sums.
struct GradientTerms {
  float weight, bias, h;
};

__device__ __forceinline__ GradientTerms gradient_terms(const BackwardArgs& args, int64_t n,
                                                        int64_t c) {
  const Layout& layout = args.layout;
  const int64_t i = n * layout.channels + c;
  const float invstd = inverse_std(args.var[layout.statistic(n, c)], args.eps);
  const float sum_g = args.sum_g[i];
  const float sum_gxhat = __fmul_rn(args.sum_gxc[i], invstd);  // Σ dŷ·x̂
  const float step = args.params.step(c);
  float dh = args.params.weight.data != nullptr
                 ? __fmul_rn(param_at(args.params.weight, c), sum_gxhat)
                 : sum_gxhat;
  if (args.params.bias.data != nullptr) {
    dh = __fadd_rn(dh, __fmul_rn(param_at(args.params.bias, c), sum_g));
  }
  return {__fmul_rn(step, sum_gxhat), __fmul_rn(step, sum_g), dh};
}

// The 0-dim dh: Σ over samples and channels, one block, a fixed order per thread and a
// fixed tree across threads.
__device__ void scalar_step_gradient(const BackwardArgs& args) {
  const Layout& layout = args.layout;
  const int64_t total = layout.samples * layout.channels;
  Sums<1> acc{};
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    const int64_t n = e / layout.channels;
    acc.v[0] = __fadd_rn(acc.v[0], gradient_terms(args, n, e - n * layout.channels).h);
  }
  acc = block_reduce(acc, SumsCombine{});
  if (threadIdx.x == 0) args.dh[0] = acc.v[0];
}

// dweight, dbias and a per-channel dh for one tile of channels: Σ over samples.
__device__ void parameter_gradients(const BackwardArgs& args, int64_t block) {
  __shared__ Sums<3> scratch[kThreads];
  const Layout& layout = args.layout;
  const int tile = args.plan.column_tile;
  const int lanes = args.plan.column_lanes;
  const int column = threadIdx.x % tile;
  const int row_lane = threadIdx.x / tile;
  const int64_t c = block * tile + column;
  const bool active = c < layout.channels;

  Sums<3> acc[1] = {};
  if (active) {
    for (int64_t n = row_lane; n < layout.samples; n += lanes) {
      const GradientTerms t = gradient_terms(args, n, c);
      acc[0].v[0] = __fadd_rn(acc[0].v[0], t.weight);
      acc[0].v[1] = __fadd_rn(acc[0].v[1], t.bias);
      acc[0].v[2] = __fadd_rn(acc[0].v[2], t.h);
    }
  }
  reduce_over_row_lanes<Sums<3>, 1>(acc, scratch, row_lane, column, tile, lanes, SumsCombine{});
  if (active && row_lane == 0) {
    if (args.dweight != nullptr) args.dweight[c] = acc[0].v[0];
    if (args.dbias != nullptr) args.dbias[c] = acc[0].v[1];
    if (args.dh != nullptr && !args.dh_scalar) args.dh[c] = acc[0].v[2];
  }
}

// a, b, c of every (sample, group) unit in this block's grid-stride share.
__device__ void input_coefficients(const BackwardArgs& args, int64_t block) {
  const Layout& layout = args.layout;
  const int width = args.plan.unit_width;
  const int units_per_warp = kWarpSize / width;
  const int warps_per_block = blockDim.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int segment_lane = lane % width;
  const int64_t warp = block * warps_per_block + threadIdx.x / kWarpSize;
  const int64_t units_per_round = args.plan.unit_blocks * warps_per_block * units_per_warp;
  const int64_t units = layout.samples * layout.groups;
  const bool group_sums = args.statistic_terms && args.sum_g != nullptr;

  // Warp-uniform trip count: every lane reaches the shuffles.
  for (int64_t first = warp * units_per_warp; first < units; first += units_per_round) {
    const int64_t unit = first + lane / width;  // = n * groups + g, the statistic's index
    const bool active = unit < units;
    const int64_t n = active ? unit / layout.groups : 0;
    const int64_t first_channel = active ? (unit - n * layout.groups) * layout.group_channels : 0;
    const float invstd = active ? inverse_std(args.var[unit], args.eps) : 0.f;

    // Σ over the group of dx̂ = h·w·Σg and of dx̂·x̂ = h·w·Σg·x̂
    float sum_dxhat = 0.f, sum_dxhat_xhat = 0.f;
    if (group_sums) {
      if (active) {
        for (int64_t k = segment_lane; k < layout.group_channels; k += width) {
          const int64_t c = first_channel + k;
          const int64_t i = n * layout.channels + c;
          const float step_w = args.params.step_weight(c);
          sum_dxhat = __fadd_rn(sum_dxhat, __fmul_rn(step_w, args.sum_g[i]));
          sum_dxhat_xhat = __fadd_rn(sum_dxhat_xhat,
                                     __fmul_rn(step_w, __fmul_rn(args.sum_gxc[i], invstd)));
        }
      }
      // butterfly within the segment: a + b == b + a, so every lane ends with the same sum
      for (int offset = width / 2; offset > 0; offset /= 2) {
        sum_dxhat = __fadd_rn(sum_dxhat, __shfl_xor_sync(kFullMask, sum_dxhat, offset));
        sum_dxhat_xhat =
            __fadd_rn(sum_dxhat_xhat, __shfl_xor_sync(kFullMask, sum_dxhat_xhat, offset));
      }
    }
    if (!active) continue;

    // c = Σdx̂·(−invstd/n) + dmean/n,  b = Σdx̂·x̂·(invstd²·(−1/n)) + dvar·(2/n)
    float b_value = 0.f, c_value = 0.f;
    if (args.statistic_terms) {
      if (group_sums) {
        c_value = __fmul_rn(sum_dxhat, __fmul_rn(-invstd, args.inv_count));
        const float invstd_sq = __fmul_rn(invstd, invstd);
        b_value = __fmul_rn(sum_dxhat_xhat, __fmul_rn(invstd_sq, args.neg_inv_count));
      }
      if (args.dmean != nullptr) {
        c_value = __fadd_rn(c_value, __fmul_rn(args.dmean[unit], args.inv_count));
      }
      if (args.dvar != nullptr) {
        b_value = __fadd_rn(b_value, __fmul_rn(args.dvar[unit], args.two_over_count));
      }
    }
    for (int64_t k = segment_lane; k < layout.group_channels; k += width) {
      const int64_t c = first_channel + k;
      const int64_t i = n * layout.channels + c;
      args.a[i] = __fmul_rn(args.params.step_weight(c), invstd);
      args.b[i] = b_value;
      args.c[i] = c_value;
    }
  }
}

__global__ void __launch_bounds__(kThreads) backward_coefficients_kernel(const BackwardArgs args) {
  int64_t block = blockIdx.x;
  if (block < args.plan.scalar_blocks) {
    scalar_step_gradient(args);
    return;
  }
  block -= args.plan.scalar_blocks;
  if (block < args.plan.column_blocks) {
    parameter_gradients(args, block);
    return;
  }
  input_coefficients(args, block - args.plan.column_blocks);
}

// ---------------------------------------------------------------------------------------
// The backward's vector–Jacobian product (norm_algebra.backward_coefficients_vjp): the
// gradients of the sums, dmean, dvar, var and the parameters from the cotangents of
// (a, b, c, dweight, dbias, dh).  Its group sums (u_c, u_b, Σ h·w·Σg, Σ h·w·Σg·x̂) feed
// per-element terms that are in turn summed over the samples per channel, so a block owns
// whole statistics: a tile of whole groups (C / groups <= kThreads channels per group,
// `unit_lanes` = C / groups threads each) or one kThreads-channel part of a larger group,
// whose group sums it then takes over all of the group's channels itself (strided by
// kThreads; the parts of a group repeat that small work).  Group sums fold in shared memory
// by a fixed tree, the per-channel sums over the samples in registers, in sample order.  A
// 0-dim h has its gradient summed over everything: then one block walks every tile.
//
// The same kernel is the double backward's per-channel pass
// (norm_algebra.double_backward_coefficients) when given its extra operands: it also writes
// the backward's a and b (b from the VJP's own group sum Σ h·w·Σg·x̂), adds the sums' own
// cotangents to their gradients (the apply pass's p and q), and sums the centre's gradient
// −(b·cot_c + q·Σg) over each group as it sums var's.

struct VjpArgs {
  const float* sum_g;  // NULL: no sums
  const float* sum_gxc;
  const float* var;
  const float* cot_a;  // NULL where absent
  const float* cot_b;  // used only with statistic_terms
  const float* cot_c;
  pyeuler_param_t cot_dweight;  // used only with the sums
  pyeuler_param_t cot_dbias;
  pyeuler_param_t cot_dh;  // [C], or one value (stride 0) for a 0-dim h
  Layout layout;
  NormParams params;
  float eps;
  int statistic_terms;  // need_x and batch_stats
  float inv_count;      // float(1 / count) as torch's v / count
  float neg_inv_count;  // float(-1.0 / count)
  float neg_two_over_count;
  float two_over_count;
  float* d_sum_g;  // NULL where not wanted
  float* d_sum_gxc;
  float* d_dmean;
  float* d_dvar;
  float* d_var;
  void* d_weight;  // in the parameter's dtype
  void* d_bias;
  void* d_h;
  // the double backward's extras (all NULL for the plain VJP)
  const float* dvar;         // b's dvar term; used only with statistic_terms, may be NULL
  const float* cot_sum_g;    // the sums' own cotangents; used only with the sums
  const float* cot_sum_gxc;
  float* a;       // the backward's a and b, NULL where not wanted
  float* b;
  float* d_mean;  // the centre's gradient, statistic-shaped, NULL where not wanted
  // tiling
  int unit_lanes;        // threads per group: min(C / groups, kThreads)
  int groups_per_tile;   // kThreads / unit_lanes (1 for a group wider than a block)
  int64_t parts;         // blocks-worth of channels per group: ceil(C / groups / kThreads)
  int64_t tiles;
};

__device__ __forceinline__ float fmul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float fadd(float a, float b) { return __fadd_rn(a, b); }

__device__ __forceinline__ void store_param(void* data, pyeuler_dtype_t dtype, int64_t i,
                                            float v) {
  switch (dtype) {
    case PYEULER_DTYPE_FLOAT16: static_cast<__half*>(data)[i] = from_float<__half>(v); break;
    case PYEULER_DTYPE_BFLOAT16:
      static_cast<__nv_bfloat16*>(data)[i] = from_float<__nv_bfloat16>(v);
      break;
    default: static_cast<float*>(data)[i] = v;
  }
}

// The group sums of one (sample, group).
struct VjpUnit {
  float mean_dxhat;       // Σ h·w·Σg
  float mean_dxhat_xhat;  // Σ h·w·Σg·x̂
  float u_c;              // Σ cot_c·(−invstd·(1/count))
  float u_b;              // Σ cot_b·(invstd²·(−1/count))
  float cot_c;            // Σ cot_c
  float cot_b;            // Σ cot_b
};

__device__ __forceinline__ bool vjp_centered_sums(const VjpArgs& args) {
  return args.statistic_terms && args.sum_g != nullptr;
}

// This (sample, channel)'s terms of the group sums.
__device__ __forceinline__ Sums<6> vjp_unit_terms(const VjpArgs& args, int64_t i, int64_t c,
                                                  float invstd) {
  Sums<6> t{};
  if (!args.statistic_terms) return t;
  if (args.sum_g != nullptr) {
    const float step_w = args.params.step_weight(c);
    t.v[0] = fmul(step_w, args.sum_g[i]);
    t.v[1] = fmul(step_w, fmul(args.sum_gxc[i], invstd));
  }
  if (args.cot_c != nullptr) {
    t.v[2] = fmul(args.cot_c[i], fmul(-invstd, args.inv_count));
    t.v[4] = args.cot_c[i];
  }
  if (args.cot_b != nullptr) {
    t.v[3] = fmul(args.cot_b[i], fmul(fmul(invstd, invstd), args.neg_inv_count));
    t.v[5] = args.cot_b[i];
  }
  return t;
}

// One (sample, channel)'s share of every gradient, each term present only with its
// operands, as in the algebra.
struct VjpElement {
  float d_invstd;
  float d_sum_g;
  float d_sum_gxhat;
  float d_step_w;      // Σₙ-summed, then split into h's and w's
  float d_step_sums;   // cot_dweight·Σg·x̂ + cot_dbias·Σg
  float dh_gxhat;      // cot_dh·Σg·x̂ (into w's gradient)
  float dh_g;          // cot_dh·Σg (into b's gradient)
  bool has_sum_g;      // whether d_sum_g / d_sum_gxhat have a term (the algebra's not None)
  bool has_sum_gxhat;
};

__device__ __forceinline__ VjpElement vjp_element(const VjpArgs& args, int64_t i, int64_t c,
                                                  float invstd, const VjpUnit& u) {
  VjpElement e{};
  const NormParams& p = args.params;
  const float step = p.step(c);
  const bool has_w = p.weight.data != nullptr;
  const float w = has_w ? param_at(p.weight, c) : 1.f;
  const float step_w = has_w ? fmul(step, w) : step;
  const bool centered = vjp_centered_sums(args);
  const float cot_a = args.cot_a != nullptr ? args.cot_a[i] : 0.f;
  const float cot_b = args.statistic_terms && args.cot_b != nullptr ? args.cot_b[i] : 0.f;
  const float cot_c = args.statistic_terms && args.cot_c != nullptr ? args.cot_c[i] : 0.f;
  if (args.cot_a != nullptr) {
    e.d_invstd = fmul(step_w, cot_a);
    e.d_step_w = fmul(cot_a, invstd);
  }
  if (args.sum_g == nullptr) return e;
  const float sum_g = args.sum_g[i];
  const float sum_gxc = args.sum_gxc[i];
  const float sum_gxhat = fmul(sum_gxc, invstd);
  bool has_gxhat = false, has_g = false;
  if (args.cot_dweight.data != nullptr) {
    const float cot = param_at(args.cot_dweight, c);
    e.d_step_sums = fmul(cot, sum_gxhat);
    e.d_sum_gxhat = fmul(step, cot);
    has_gxhat = true;
  }
  if (args.cot_dbias.data != nullptr) {
    const float cot = param_at(args.cot_dbias, c);
    e.d_step_sums = fadd(e.d_step_sums, fmul(cot, sum_g));
    e.d_sum_g = fmul(step, cot);
    has_g = true;
  }
  if (args.cot_dh.data != nullptr) {
    const float cot = param_at(args.cot_dh, c);
    e.dh_gxhat = fmul(cot, sum_gxhat);
    e.d_sum_gxhat = fadd(e.d_sum_gxhat, has_w ? fmul(w, cot) : cot);
    has_gxhat = true;
    if (p.bias.data != nullptr) {
      e.dh_g = fmul(cot, sum_g);
      e.d_sum_g = fadd(e.d_sum_g, fmul(param_at(p.bias, c), cot));
      has_g = true;
    }
  }
  if (centered && args.cot_c != nullptr) {  // c = −invstd·Σ(h·w·Σg)/n
    e.d_invstd = fadd(e.d_invstd, fmul(fmul(cot_c, u.mean_dxhat), args.neg_inv_count));
    e.d_step_w = fadd(e.d_step_w, fmul(u.u_c, sum_g));
    e.d_sum_g = fadd(e.d_sum_g, fmul(step_w, u.u_c));
    has_g = true;
  }
  if (centered && args.cot_b != nullptr) {  // b = −invstd²·Σ(h·w·Σg·x̂)/n
    e.d_invstd = fadd(e.d_invstd, fmul(fmul(fmul(cot_b, u.mean_dxhat_xhat), invstd),
                                       args.neg_two_over_count));
    e.d_step_w = fadd(e.d_step_w, fmul(u.u_b, sum_gxhat));
    e.d_sum_gxhat = fadd(e.d_sum_gxhat, fmul(step_w, u.u_b));
    has_gxhat = true;
  }
  if (has_gxhat) e.d_invstd = fadd(e.d_invstd, fmul(e.d_sum_gxhat, sum_gxc));
  e.has_sum_g = has_g;
  e.has_sum_gxhat = has_gxhat;
  return e;
}

// v (when has) plus term[i] (when given), the algebra's add_optional; 0 with neither.
__device__ __forceinline__ float plus_optional(bool has, float v, const float* term, int64_t i) {
  if (term == nullptr) return has ? v : 0.f;
  return has ? fadd(v, term[i]) : term[i];
}

// The gradients of Σg and Σg·(x − center) at (sample, channel) i: the VJP's, plus the sums'
// own cotangents in the double backward (there the apply pass's p and q).
struct SumGradients {
  float sum_g;
  float sum_gxc;
  bool has_sum_gxc;
};

__device__ __forceinline__ SumGradients sum_gradients(const VjpArgs& args, const VjpElement& e,
                                                      int64_t i, float invstd) {
  return {plus_optional(e.has_sum_g, e.d_sum_g, args.cot_sum_g, i),
          plus_optional(e.has_sum_gxhat, fmul(e.d_sum_gxhat, invstd), args.cot_sum_gxc, i),
          e.has_sum_gxhat || args.cot_sum_gxc != nullptr};
}

// The backward's b of one statistic as backward_coefficients computes it (its group sum
// Σ h·w·Σg·x̂ is the VJP's u.mean_dxhat_xhat); 0 without the batch-statistics terms.
__device__ __forceinline__ float backward_b(const VjpArgs& args, const VjpUnit& u, float invstd,
                                            int64_t unit) {
  float b = 0.f;
  if (!args.statistic_terms) return b;
  if (args.sum_g != nullptr) {
    b = fmul(u.mean_dxhat_xhat, fmul(fmul(invstd, invstd), args.neg_inv_count));
  }
  if (args.dvar != nullptr) b = fadd(b, fmul(args.dvar[unit], args.two_over_count));
  return b;
}

// The centre's gradient at (sample, channel) i, −(b·cot_c) + −(q·Σg), each product present
// only with its operands (cot_c: the batch-statistics terms; q: the sums).
__device__ __forceinline__ float center_term(const VjpArgs& args, int64_t i, float b,
                                             const SumGradients& s) {
  float t = 0.f;
  if (args.cot_c != nullptr) t = -fmul(b, args.cot_c[i]);
  if (s.has_sum_gxc) {
    const float q_term = -fmul(s.sum_gxc, args.sum_g[i]);
    t = args.cot_c != nullptr ? fadd(t, q_term) : q_term;
  }
  return t;
}

// Folds K values per thread over segments of `lanes` consecutive threads by a fixed tree;
// the sum lands at the segment's first thread.  Every thread of the block must call this.
template <int K>
__device__ Sums<K> segment_reduce(Sums<K> value, Sums<K>* scratch, int lanes) {
  const int t = threadIdx.x;
  const int lane = t % lanes;
  __syncthreads();  // the scratch's previous readers are done
  scratch[t] = value;
  for (int stride = 1; stride < lanes; stride *= 2) {
    __syncthreads();
    if (lane % (2 * stride) == 0 && lane + stride < lanes && t + stride < int(blockDim.x)) {
      scratch[t] = SumsCombine{}(scratch[t], scratch[t + stride]);
    }
  }
  __syncthreads();
  return scratch[t - lane];
}

__global__ void __launch_bounds__(kThreads)
    backward_coefficients_vjp_kernel(const VjpArgs args) {
  __shared__ Sums<6> unit_scratch[kThreads];
  __shared__ Sums<2> statistic_scratch[kThreads];
  const Layout& layout = args.layout;
  const NormParams& p = args.params;
  const int lanes = args.unit_lanes;
  const int lane = threadIdx.x % lanes;
  const int group_in_tile = threadIdx.x / lanes;
  const bool learnable_step_w = p.weight.data != nullptr || p.h.data != nullptr;
  const bool scalar_dh = args.d_h != nullptr && p.h.stride == 0;
  float dh_total = 0.f;  // a 0-dim h: this thread's share, in a fixed order

  for (int64_t tile = blockIdx.x; tile < args.tiles; tile += gridDim.x) {
    const int64_t group = tile / args.parts * args.groups_per_tile + group_in_tile;
    const int64_t part = tile % args.parts;
    const bool group_ok = group_in_tile < args.groups_per_tile && group < layout.groups;
    const int64_t first_channel = group * layout.group_channels;
    const int64_t own = part * kThreads + lane;  // this thread's channel within the group
    const bool active = group_ok && own < layout.group_channels;
    const int64_t c = first_channel + own;
    const bool writes_unit = group_ok && part == 0 && lane == 0;
    float s_step_w = 0.f, s_step_sums = 0.f, s_dh_gxhat = 0.f, s_dh_g = 0.f;

    for (int64_t n = 0; n < layout.samples; ++n) {
      const int64_t unit = n * layout.groups + group;
      const float invstd = group_ok ? inverse_std(args.var[unit], args.eps) : 0.f;
      const int64_t row = n * layout.channels + first_channel;
      // the group sums: this thread's channels own, own + lanes, ... of the group
      Sums<6> partial{};
      if (group_ok && args.statistic_terms) {
        for (int64_t k = lane; k < layout.group_channels; k += lanes) {
          const Sums<6> t = vjp_unit_terms(args, row + k, first_channel + k, invstd);
          partial = SumsCombine{}(partial, t);
        }
      }
      const Sums<6> sums = segment_reduce(partial, unit_scratch, lanes);
      const VjpUnit u{sums.v[0], sums.v[1], sums.v[2], sums.v[3], sums.v[4], sums.v[5]};
      const float b = group_ok ? backward_b(args, u, invstd, unit) : 0.f;
      // the statistic's own gradients, Σ over the group: var's through invstd =
      // (var + eps)^(−1/2), and the centre's (the double backward's mean)
      if (args.d_var != nullptr || args.d_mean != nullptr) {
        Sums<2> terms{};
        if (group_ok && part == 0) {
          for (int64_t k = lane; k < layout.group_channels; k += lanes) {
            const VjpElement e = vjp_element(args, row + k, first_channel + k, invstd, u);
            terms.v[0] = fadd(terms.v[0], e.d_invstd);
            if (args.d_mean != nullptr) {
              const SumGradients g = sum_gradients(args, e, row + k, invstd);
              terms.v[1] = fadd(terms.v[1], center_term(args, row + k, b, g));
            }
          }
        }
        terms = segment_reduce(terms, statistic_scratch, lanes);
        if (writes_unit && args.d_var != nullptr) {
          const float cube = fmul(fmul(fmul(invstd, invstd), invstd), -0.5f);
          args.d_var[unit] = fmul(terms.v[0], cube);
        }
        if (writes_unit && args.d_mean != nullptr) args.d_mean[unit] = terms.v[1];
      }
      if (writes_unit && args.d_dmean != nullptr) {
        args.d_dmean[unit] = fmul(u.cot_c, args.inv_count);
      }
      if (writes_unit && args.d_dvar != nullptr) {
        args.d_dvar[unit] = fmul(u.cot_b, args.two_over_count);
      }
      if (!active) continue;
      const int64_t i = row + own;
      const VjpElement e = vjp_element(args, i, c, invstd, u);
      const SumGradients g = sum_gradients(args, e, i, invstd);
      if (args.d_sum_g != nullptr) args.d_sum_g[i] = g.sum_g;
      if (args.d_sum_gxc != nullptr) args.d_sum_gxc[i] = g.sum_gxc;
      if (args.a != nullptr) args.a[i] = fmul(p.step_weight(c), invstd);
      if (args.b != nullptr) args.b[i] = b;
      s_step_w = fadd(s_step_w, e.d_step_w);
      s_step_sums = fadd(s_step_sums, e.d_step_sums);
      s_dh_gxhat = fadd(s_dh_gxhat, e.dh_gxhat);
      s_dh_g = fadd(s_dh_g, e.dh_g);
    }
    if (!active) continue;
    // h·w's gradient splits into h's and w's
    const bool has_w = p.weight.data != nullptr;
    const float w = has_w ? param_at(p.weight, c) : 1.f;
    if (args.d_weight != nullptr) {
      const float d_w = fadd(s_dh_gxhat, learnable_step_w ? fmul(p.step(c), s_step_w) : 0.f);
      store_param(args.d_weight, p.weight.dtype, c, d_w);
    }
    if (args.d_bias != nullptr) store_param(args.d_bias, p.bias.dtype, c, s_dh_g);
    if (args.d_h != nullptr) {
      const float d_step = fadd(s_step_sums, has_w ? fmul(s_step_w, w) : s_step_w);
      if (scalar_dh) {
        dh_total = fadd(dh_total, d_step);
      } else {
        store_param(args.d_h, p.h.dtype, c, d_step);
      }
    }
  }
  if (scalar_dh) {  // one block: every channel's share, a fixed tree across threads
    Sums<1> total{{dh_total}};
    total = block_reduce(total, SumsCombine{});
    if (threadIdx.x == 0) store_param(args.d_h, p.h.dtype, 0, total.v[0]);
  }
}

// ---------------------------------------------------------------------------------------
// nn.BatchNorm's running-statistics update (norm_algebra.update_running_stats).  One block:
// thread 0 reads and increments the counter once and forms the rate, which every thread
// then applies to its channels, so no block can read the counter half-updated.

constexpr int kRunningStatsThreads = 1024;

struct RunningStatsArgs {
  void* running_mean;  // [C] in the kernel's T
  void* running_var;
  int64_t* num_batches_tracked;  // NULL: none
  const float* mean;
  const float* var;
  int64_t channels;
  pyeuler_param_t momentum;  // a 0-dim tensor; data NULL: cumulative or momentum_value
  int cumulative;            // rate 1 / num_batches_tracked (after the increment)
  float momentum_value;
  float unbiased_factor;  // float(count / (count − 1)), formed in double
};

// v as the buffers' dtype T holds it.
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return to_float(from_float<T>(v));
}

// torch's lerp (ATen/native/Lerp.h) from the nearer end, in float: its multiply-add is
// fused as nvcc contracts it on CUDA (and as the CPU kernel's fmadd computes it), so
// weight 1 gives exactly `end`.
__device__ __forceinline__ float torch_lerp(float self, float end, float weight) {
  const float diff = __fsub_rn(end, self);
  return fabsf(weight) < 0.5f ? __fmaf_rn(weight, diff, self)
                              : __fmaf_rn(-diff, __fsub_rn(1.f, weight), end);
}

template <typename T>
__global__ void __launch_bounds__(kRunningStatsThreads)
    update_running_stats_kernel(const RunningStatsArgs args) {
  __shared__ float shared_rate;
  if (threadIdx.x == 0) {
    int64_t batches = 0;
    if (args.num_batches_tracked != nullptr) {
      batches = *args.num_batches_tracked + 1;
      *args.num_batches_tracked = batches;
    }
    float rate = args.momentum_value;  // a float weight: lerp_ reads it as float
    if (args.momentum.data != nullptr) {
      rate = rounded<T>(param_at(args.momentum, 0));  // lerp_ casts a tensor weight to T
    } else if (args.cumulative) {
      // 1.0 / num_batches_tracked.to(T): the int64 -> float -> T conversion, then
      // torch's reciprocal in float, rounded to T
      rate = rounded<T>(__frcp_rn(rounded<T>(float(batches))));
    }
    shared_rate = rate;
  }
  __syncthreads();
  const float rate = shared_rate;
  T* running_mean = static_cast<T*>(args.running_mean);
  T* running_var = static_cast<T*>(args.running_var);
  for (int64_t c = threadIdx.x; c < args.channels; c += blockDim.x) {
    // all four loads before either store (the buffers could alias, as far as nvcc knows)
    const float old_mean = to_float(running_mean[c]);
    const float old_var = to_float(running_var[c]);
    // the batch values in T first (mean.to(T), (var * factor).to(T)), as lerp_'s `end`
    const float batch_mean = rounded<T>(args.mean[c]);
    const float unbiased = rounded<T>(__fmul_rn(args.var[c], args.unbiased_factor));
    running_mean[c] = from_float<T>(torch_lerp(old_mean, batch_mean, rate));
    running_var[c] = from_float<T>(torch_lerp(old_var, unbiased, rate));
  }
}

// ---------------------------------------------------------------------------------------
// Host side

cudaError_t make_layout(int64_t samples, int64_t channels, int64_t groups, Layout* layout) {
  if (channels < 1 || groups < 0) return cudaErrorInvalidValue;
  if (groups == 0) {
    *layout = {1, channels, channels, 1};
    return cudaSuccess;
  }
  if (samples < 0 || channels % groups != 0) return cudaErrorInvalidValue;
  *layout = {samples, channels, groups, channels / groups};
  return cudaSuccess;
}

int64_t clamp_blocks(int64_t blocks) { return blocks < kMaxBlocks ? blocks : kMaxBlocks; }

BackwardPlan plan_backward(const Layout& layout, bool column_gradients, bool scalar_dh) {
  BackwardPlan plan{};
  plan.scalar_blocks = scalar_dh ? 1 : 0;
  // Sample lanes: up to 32 (a block then covers 8 channels: 32-byte row segments).
  int lanes = 1;
  while (lanes < 32 && lanes * 2 <= layout.samples) lanes *= 2;
  plan.column_lanes = lanes;
  plan.column_tile = kThreads / lanes;
  plan.column_blocks = column_gradients ? ceil_div(layout.channels, plan.column_tile) : 0;
  int width = 1;
  while (width < kWarpSize && width < layout.group_channels) width *= 2;
  plan.unit_width = width;
  const int64_t units_per_block = int64_t(kThreads / width);
  const int64_t units = layout.samples * layout.groups;
  plan.unit_blocks = units > 0 ? clamp_blocks(ceil_div(units, units_per_block)) : 0;
  return plan;
}

}  // namespace
}  // namespace kernels
}  // namespace pyeuler

using namespace pyeuler::kernels;

extern "C" cudaError_t pyeuler_forward_coefficients(const float* mean, const float* var,
                                                    int64_t samples, int64_t channels,
                                                    int64_t groups, pyeuler_param_t weight,
                                                    pyeuler_param_t bias, pyeuler_param_t h,
                                                    double h_value, double eps, float* scale,
                                                    float* shift, cudaStream_t stream) {
  Layout layout;
  if (make_layout(samples, channels, groups, &layout) != cudaSuccess || !param_is_valid(weight) ||
      !param_is_valid(bias) || !param_is_valid(h)) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = layout.samples * layout.channels;
  if (total == 0) return cudaSuccess;  // an empty batch: nothing to read or write
  if (mean == nullptr || var == nullptr || scale == nullptr || shift == nullptr) {
    return cudaErrorInvalidValue;
  }
  const unsigned blocks = unsigned(clamp_blocks(ceil_div(total, kThreads)));
  const NormParams params{weight, bias, h, float(h_value)};
  forward_coefficients_kernel<<<blocks, kThreads, 0, stream>>>(mean, var, layout, params,
                                                               float(eps), scale, shift);
  return cudaGetLastError();
}

extern "C" cudaError_t pyeuler_backward_coefficients(
    const float* sum_g, const float* sum_gxc, const float* dmean, const float* dvar,
    const float* var, int64_t samples, int64_t channels, int64_t groups, pyeuler_param_t weight,
    pyeuler_param_t bias, pyeuler_param_t h, double h_value, double eps, int batch_stats,
    int need_x, int64_t count, float* a, float* b, float* c, float* dweight, float* dbias,
    float* dh, cudaStream_t stream) {
  Layout layout;
  if (make_layout(samples, channels, groups, &layout) != cudaSuccess ||
      (dh != nullptr && h.data == nullptr) || count < 1 || !param_is_valid(weight) ||
      !param_is_valid(bias) || !param_is_valid(h)) {
    return cudaErrorInvalidValue;
  }
  // An empty batch reads none of the [samples, ...] vectors (empty tensors may have NULL
  // data); its parameter gradients are sums over nothing.
  if (layout.samples > 0) {
    const bool sums = sum_g != nullptr;
    const bool gradients = dweight != nullptr || dbias != nullptr || dh != nullptr;
    if (var == nullptr || a == nullptr || b == nullptr || c == nullptr ||
        (sum_gxc != nullptr) != sums || (gradients && !sums)) {
      return cudaErrorInvalidValue;
    }
  }
  const bool scalar_dh = dh != nullptr && h.stride == 0;
  const bool column_gradients =
      dweight != nullptr || dbias != nullptr || (dh != nullptr && !scalar_dh);

  BackwardArgs args{};
  args.sum_g = sum_g;
  args.sum_gxc = sum_gxc;
  args.dmean = dmean;
  args.dvar = dvar;
  args.var = var;
  args.layout = layout;
  args.params = {weight, bias, h, float(h_value)};
  args.eps = float(eps);
  args.statistic_terms = batch_stats && need_x;
  args.inv_count = 1.0f / float(count);
  args.neg_inv_count = float(-1.0 / double(count));
  args.two_over_count = float(2.0 / double(count));
  args.a = a;
  args.b = b;
  args.c = c;
  args.dweight = dweight;
  args.dbias = dbias;
  args.dh = dh;
  args.dh_scalar = scalar_dh;
  args.plan = plan_backward(layout, column_gradients, scalar_dh);

  const int64_t blocks = args.plan.scalar_blocks + args.plan.column_blocks + args.plan.unit_blocks;
  if (blocks == 0) return cudaSuccess;
  backward_coefficients_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

extern "C" cudaError_t pyeuler_backward_coefficients_vjp(
    const float* sum_g, const float* sum_gxc, const float* var, int64_t samples, int64_t channels,
    int64_t groups, pyeuler_param_t weight, pyeuler_param_t bias, pyeuler_param_t h,
    double h_value, double eps, int batch_stats, int need_x, int64_t count, const float* cot_a,
    const float* cot_b, const float* cot_c, pyeuler_param_t cot_dweight, pyeuler_param_t cot_dbias,
    pyeuler_param_t cot_dh, float* d_sum_g, float* d_sum_gxc, float* d_dmean, float* d_dvar,
    float* d_var, void* d_weight, void* d_bias, void* d_h, cudaStream_t stream) {
  // the double backward's kernel without its extras
  return pyeuler_double_backward_coefficients(
      sum_g, sum_gxc, nullptr, var, samples, channels, groups, weight, bias, h, h_value, eps,
      batch_stats, need_x, count, cot_a, cot_b, cot_c, cot_dweight, cot_dbias, cot_dh, nullptr,
      nullptr, nullptr, nullptr, d_sum_g, d_sum_gxc, d_dmean, d_dvar, d_var, d_weight, d_bias, d_h,
      nullptr, stream);
}

extern "C" cudaError_t pyeuler_double_backward_coefficients(
    const float* sum_g, const float* sum_gxc, const float* dvar, const float* var, int64_t samples,
    int64_t channels, int64_t groups, pyeuler_param_t weight, pyeuler_param_t bias,
    pyeuler_param_t h, double h_value, double eps, int batch_stats, int need_x, int64_t count,
    const float* cot_a, const float* cot_b, const float* cot_c, pyeuler_param_t cot_dweight,
    pyeuler_param_t cot_dbias, pyeuler_param_t cot_dh, const float* cot_sum_g,
    const float* cot_sum_gxc, float* a, float* b, float* d_sum_g, float* d_sum_gxc,
    float* d_dmean, float* d_dvar, float* d_var, void* d_weight, void* d_bias, void* d_h,
    float* d_mean, cudaStream_t stream) {
  Layout layout;
  if (make_layout(samples, channels, groups, &layout) != cudaSuccess || count < 1 ||
      (sum_gxc != nullptr) != (sum_g != nullptr) ||
      (d_weight != nullptr && weight.data == nullptr) ||
      (d_bias != nullptr && bias.data == nullptr) || (d_h != nullptr && h.data == nullptr) ||
      !param_is_valid(weight) || !param_is_valid(bias) || !param_is_valid(h) ||
      !param_is_valid(cot_dweight) || !param_is_valid(cot_dbias) || !param_is_valid(cot_dh)) {
    return cudaErrorInvalidValue;
  }
  if (layout.samples > 0 && var == nullptr) return cudaErrorInvalidValue;
  const bool sums = sum_g != nullptr;
  const bool statistic_terms = batch_stats && need_x;

  VjpArgs args{};
  args.sum_g = sum_g;
  args.sum_gxc = sum_gxc;
  args.var = var;
  args.cot_a = cot_a;
  // b and c are constants (0) without the batch-statistics terms, the parameter gradients
  // and the sums' own without the sums: their cotangents do not reach anything then
  args.cot_b = statistic_terms ? cot_b : nullptr;
  args.cot_c = statistic_terms ? cot_c : nullptr;
  const pyeuler_param_t none{nullptr, PYEULER_DTYPE_FLOAT32, 0};
  args.cot_dweight = sums ? cot_dweight : none;
  args.cot_dbias = sums ? cot_dbias : none;
  args.cot_dh = sums ? cot_dh : none;
  args.cot_sum_g = sums ? cot_sum_g : nullptr;
  args.cot_sum_gxc = sums ? cot_sum_gxc : nullptr;
  args.dvar = statistic_terms ? dvar : nullptr;
  args.layout = layout;
  args.params = {weight, bias, h, float(h_value)};
  args.eps = float(eps);
  args.statistic_terms = statistic_terms;
  args.inv_count = 1.0f / float(count);
  args.neg_inv_count = float(-1.0 / double(count));
  args.neg_two_over_count = float(-2.0 / double(count));
  args.two_over_count = float(2.0 / double(count));
  args.a = a;
  args.b = b;
  args.d_sum_g = d_sum_g;
  args.d_sum_gxc = d_sum_gxc;
  args.d_dmean = d_dmean;
  args.d_dvar = d_dvar;
  args.d_var = d_var;
  args.d_weight = d_weight;
  args.d_bias = d_bias;
  args.d_h = d_h;
  args.d_mean = d_mean;
  const int64_t group_channels = layout.group_channels;
  args.unit_lanes = group_channels < kThreads ? int(group_channels) : kThreads;
  args.groups_per_tile = kThreads / args.unit_lanes;
  args.parts = ceil_div(group_channels, kThreads);
  args.tiles = ceil_div(layout.groups, args.groups_per_tile) * args.parts;

  const bool per_sample_outputs = layout.samples > 0 &&
      (a != nullptr || b != nullptr || d_sum_g != nullptr || d_sum_gxc != nullptr ||
       d_dmean != nullptr || d_dvar != nullptr || d_var != nullptr || d_mean != nullptr);
  if (!per_sample_outputs && d_weight == nullptr && d_bias == nullptr && d_h == nullptr) {
    return cudaSuccess;  // nothing to write
  }
  // a 0-dim h's gradient sums over every channel: one block walks every tile
  const int64_t blocks = d_h != nullptr && h.stride == 0 ? 1 : clamp_blocks(args.tiles);
  backward_coefficients_vjp_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

extern "C" cudaError_t pyeuler_update_running_stats(void* running_mean, void* running_var,
                                                    pyeuler_dtype_t dtype,
                                                    int64_t* num_batches_tracked,
                                                    const float* mean, const float* var,
                                                    int64_t channels, int64_t count,
                                                    pyeuler_param_t momentum,
                                                    double momentum_value, int cumulative,
                                                    cudaStream_t stream) {
  if (channels < 0 || count < 2 || !dtype_is_valid(dtype) || !param_is_valid(momentum) ||
      (cumulative && (num_batches_tracked == nullptr || momentum.data != nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (channels > 0 && (running_mean == nullptr || running_var == nullptr || mean == nullptr ||
                       var == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (channels == 0 && num_batches_tracked == nullptr) return cudaSuccess;  // nothing to write

  RunningStatsArgs args{};
  args.running_mean = running_mean;
  args.running_var = running_var;
  args.num_batches_tracked = num_batches_tracked;
  args.mean = mean;
  args.var = var;
  args.channels = channels;
  args.momentum = momentum;
  args.cumulative = cumulative != 0;
  args.momentum_value = float(momentum_value);
  // torch's var * (count / (count - 1)): the Python float read as float by the multiply
  args.unbiased_factor = float(double(count) / double(count - 1));
  // whole warps, enough for every channel up to a full block (one warp for the counter alone)
  const int64_t lanes = ceil_div(channels, kWarpSize) * kWarpSize;
  const int threads = lanes < kWarpSize ? kWarpSize
                      : lanes < kRunningStatsThreads ? int(lanes)
                                                     : kRunningStatsThreads;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    update_running_stats_kernel<T><<<1, threads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}
