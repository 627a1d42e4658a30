/*
 * pyeuler CUDA kernels: the C ABI.
 *
 * Plain C, no torch: the host wrapper (csrc/) and the standalone tests (kernels/tests/)
 * both call these.  The math of every entry point is defined by pyeuler/ops/primitives.py;
 * the comments here only say how the arguments are laid out.
 *
 * Tensors are dense (N, C, S) views of (N, C, *spatial) activations, S = prod(spatial):
 *   PYEULER_LAYOUT_CHANNELS_FIRST: element (n, c, s) at (n * C + c) * S + s  (NCHW)
 *   PYEULER_LAYOUT_CHANNELS_LAST:  element (n, c, s) at (n * S + s) * C + c  (NHWC)
 * All activation tensors of one call (x, dy, ddx, shortcut, mask, outputs) share that layout.
 * Activations are float32, float16 or bfloat16 (one dtype per call, except the y_dtype of
 * pyeuler_affine_act_backward_reduce_recompute's y); masks are one byte per element
 * (torch.bool); statistics, coefficients and sums are float32, and all accumulation is in
 * float32.  Indexing is 64-bit throughout.
 *
 * Every entry point only enqueues work on `stream` (no host synchronisation, no
 * allocation) and returns cudaSuccess, cudaErrorInvalidValue for arguments it cannot
 * handle, or the launch error.  Entry points with a `workspace` need at least the bytes
 * their *_workspace_size function reports for the same arguments on the current device.
 */
#ifndef PYEULER_KERNELS_H_
#define PYEULER_KERNELS_H_

#include <stddef.h>
#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pyeuler_dtype {
  PYEULER_DTYPE_FLOAT32 = 0,
  PYEULER_DTYPE_FLOAT16 = 1,
  PYEULER_DTYPE_BFLOAT16 = 2,
} pyeuler_dtype_t;

typedef enum pyeuler_layout {
  PYEULER_LAYOUT_CHANNELS_FIRST = 0,
  PYEULER_LAYOUT_CHANNELS_LAST = 1,
} pyeuler_layout_t;

typedef struct pyeuler_geometry {
  int64_t n; /* batch */
  int64_t c; /* channels */
  int64_t s; /* flattened spatial size, 1 for (N, C) tensors */
  pyeuler_layout_t layout;
} pyeuler_geometry_t;

/* A float32 per-channel coefficient: value for (n, c) is data[n * sample_stride + c].
 * sample_stride is 0 for a [C] vector and C for an [N, C] matrix. */
typedef struct pyeuler_coef {
  const float* data;
  int64_t sample_stride;
} pyeuler_coef_t;

/* An optional per-channel parameter (weight, bias or the step h) in its own dtype
 * (float32, float16 or bfloat16, read as float32): channel c's value is data[c * stride];
 * stride 0 gives every channel the one value of a 0-dim tensor.  data == NULL: absent. */
typedef struct pyeuler_param {
  const void* data;
  pyeuler_dtype_t dtype;
  int64_t stride;
} pyeuler_param_t;

/* ---- statistics ------------------------------------------------------------------ */

/* Biased mean and variance (primitives.norm_stats).  groups == 0: BatchNorm statistics,
 * mean/var are [C].  groups >= 1 (dividing C): GroupNorm statistics, mean/var are [N, groups].
 * A variance that overflows to +inf is returned as NaN (unlike torch, on purpose).
 * Two stages: per-block Welford partials (count, mean, M2) into the workspace, then
 * pyeuler_welford_finalize merges them in a fixed order (deterministic, no atomics). */
cudaError_t pyeuler_norm_stats_workspace_size(pyeuler_geometry_t geo, int64_t groups,
                                              size_t* bytes);
cudaError_t pyeuler_norm_stats(const void* x, pyeuler_dtype_t dtype, pyeuler_geometry_t geo,
                               int64_t groups, float* mean, float* var, void* workspace,
                               size_t workspace_bytes, cudaStream_t stream);

/* Chan-merges Welford partials, float32 laid out as [3][num_partials][num_units]
 * (counts, then means, then M2s), partial p = 0, 1, ... in order, into mean/var [num_units].
 * This is pyeuler_norm_stats' second stage; a multi-GPU caller can gather every rank's
 * partials (or every rank's (count, mean, M2)) into this layout and finalize them once,
 * which gives SyncBatchNorm's statistics. */
cudaError_t pyeuler_welford_finalize(const float* partials, int64_t num_partials,
                                     int64_t num_units, float* mean, float* var,
                                     cudaStream_t stream);

/* pyeuler_norm_stats followed by pyeuler_forward_coefficients of those statistics
 * (primitives.norm_stats_and_coefficients), the coefficients written by the statistics'
 * second stage: two launches, not three.  weight, bias, h, h_value, eps and the float32
 * outputs scale, shift ([C] for BatchNorm, [N, C] for GroupNorm, all required) are
 * pyeuler_forward_coefficients', with the same device code, so the same bits (the variance
 * read as written, an overflow's NaN included).  The workspace is
 * pyeuler_norm_stats_workspace_size's for the same geometry and groups. */
cudaError_t pyeuler_norm_stats_and_coefficients(const void* x, pyeuler_dtype_t dtype,
                                                pyeuler_geometry_t geo, int64_t groups,
                                                pyeuler_param_t weight, pyeuler_param_t bias,
                                                pyeuler_param_t h, double h_value, double eps,
                                                float* mean, float* var, float* scale,
                                                float* shift, void* workspace,
                                                size_t workspace_bytes, cudaStream_t stream);

/* pyeuler_welford_finalize with the forward coefficients, written as
 * pyeuler_norm_stats_and_coefficients writes them (SyncBatchNorm's gathered partials give
 * the statistics and coefficients in one launch).  The partials' units are the statistics
 * of `channels` channels: C of them for BatchNorm (groups == 0; samples is not read), else
 * samples * groups, [samples, groups] row-major, samples >= 1. */
cudaError_t pyeuler_welford_finalize_and_coefficients(
    const float* partials, int64_t num_partials, int64_t samples, int64_t channels,
    int64_t groups, pyeuler_param_t weight, pyeuler_param_t bias, pyeuler_param_t h,
    double h_value, double eps, float* mean, float* var, float* scale, float* shift,
    cudaStream_t stream);

/* ---- fused affine + residual + ReLU ---------------------------------------------- */

/* y = act(shortcut + scale * x + shift) (primitives.affine_act_forward); the ReLU keeps NaN.
 * shortcut may be NULL (same dtype as x otherwise); mask may be NULL, else it receives
 * !(y <= 0): torch's ReLU gate, open at NaN. */
cudaError_t pyeuler_affine_act_forward(const void* x, const void* shortcut, pyeuler_dtype_t dtype,
                                       pyeuler_geometry_t geo, pyeuler_coef_t scale,
                                       pyeuler_coef_t shift, int relu, void* y, uint8_t* mask,
                                       cudaStream_t stream);

/* Sums of g and g * (x - center), g = dy * m (primitives.affine_act_backward_reduce):
 * m = mask if mask != NULL, else !(scale * x + shift <= 0) if relu, else 1; dy * m is a
 * select (0 where m is 0, even for NaN dy).  per_sample == 0:
 * sums over (N, S) into [C]; all coefficients must then be [C].  per_sample != 0: sums over S
 * into [N, C].  dy has x's dtype.  Partials then a fixed-order second stage, like the stats. */
cudaError_t pyeuler_affine_act_backward_reduce_workspace_size(pyeuler_geometry_t geo,
                                                              int per_sample, size_t* bytes);
cudaError_t pyeuler_affine_act_backward_reduce(const void* dy, const void* x, const uint8_t* mask,
                                               pyeuler_dtype_t dtype, pyeuler_geometry_t geo,
                                               pyeuler_coef_t scale, pyeuler_coef_t shift,
                                               pyeuler_coef_t center, int relu, int per_sample,
                                               float* sum_g, float* sum_g_xc, void* workspace,
                                               size_t workspace_bytes, cudaStream_t stream);

/* pyeuler_affine_act_backward_reduce with the gate recomputed (no mask), which in the same
 * pass also writes the forward's activation y = act(scale * x + shift)
 * (primitives.affine_act_backward_reduce_recompute): act is ReLU iff relu (NaN kept, as in
 * pyeuler_affine_act_forward), computed in float32 and rounded once to y_dtype (float32,
 * float16 or bfloat16, independent of x's dtype).  y (required) is dense in x's layout.  The
 * sums, reduction sets, coefficient rules (scale and shift are read even without relu) and
 * two stages are pyeuler_affine_act_backward_reduce's, and so is the workspace:
 * pyeuler_affine_act_backward_reduce_workspace_size for the same geo and per_sample.
 * cudaErrorInvalidValue also for a NULL y or an invalid y_dtype. */
cudaError_t pyeuler_affine_act_backward_reduce_recompute(
    const void* dy, const void* x, pyeuler_dtype_t dtype, pyeuler_geometry_t geo,
    pyeuler_coef_t scale, pyeuler_coef_t shift, pyeuler_coef_t center, int relu, int per_sample,
    float* sum_g, float* sum_g_xc, void* y, pyeuler_dtype_t y_dtype, void* workspace,
    size_t workspace_bytes, cudaStream_t stream);

/* dx = ((a * g + b * (x - center) + c) + dx_addend) + dx_addend2 with g as in the reduce
 * (primitives.affine_act_backward_apply); a zero b contributes exactly 0, even at
 * x = +-inf.  dx_addend and dx_addend2 may each be NULL (no term), independently; each has
 * x's dtype and layout, and they are added in float32, in that order, before dx is rounded.
 * dshortcut (may be NULL) receives g, without the addends. */
cudaError_t pyeuler_affine_act_backward_apply(const void* dy, const void* x, const uint8_t* mask,
                                              pyeuler_dtype_t dtype, pyeuler_geometry_t geo,
                                              pyeuler_coef_t scale, pyeuler_coef_t shift, int relu,
                                              pyeuler_coef_t a, pyeuler_coef_t b, pyeuler_coef_t c,
                                              pyeuler_coef_t center, const void* dx_addend,
                                              const void* dx_addend2, void* dx, void* dshortcut,
                                              cudaStream_t stream);

/* The IE-Skip step fused into the apply (primitives.affine_act_backward_apply_ie_update),
 * x - 2 * step_size * (e - theta * v) with v the dx above without addends (never written),
 * computed as
 *   x_new = (x + residual_coef * residual) + (2 * step_size * theta) * v
 * from residual = e (residual_is_term == 0; residual_coef = -2 * step_size), or from its term
 * -2 * step_size * e (residual_is_term != 0, as pyeuler_ie_residual_with_term writes it;
 * residual_coef = 1).  Both factors are formed in double, then used as float32.  residual
 * (required) has x's dtype; x_new is written instead of dx (there is no dshortcut). */
cudaError_t pyeuler_affine_act_backward_apply_ie_update(
    const void* dy, const void* x, const uint8_t* mask, pyeuler_dtype_t dtype,
    pyeuler_geometry_t geo, pyeuler_coef_t scale, pyeuler_coef_t shift, int relu,
    pyeuler_coef_t a, pyeuler_coef_t b, pyeuler_coef_t c, pyeuler_coef_t center,
    const void* residual, double step_size, double theta, int residual_is_term, void* x_new,
    cudaStream_t stream);

/* Sums of ddx, ddx * (x - center) and ddx * g, g as in the reduce above
 * (primitives.affine_act_double_backward_reduce).  ddx has x's dtype; reduction sets,
 * coefficient rules and the two stages are those of pyeuler_affine_act_backward_reduce. */
cudaError_t pyeuler_affine_act_double_backward_reduce_workspace_size(pyeuler_geometry_t geo,
                                                                     int per_sample,
                                                                     size_t* bytes);
cudaError_t pyeuler_affine_act_double_backward_reduce(
    const void* ddx, const void* dy, const void* x, const uint8_t* mask, pyeuler_dtype_t dtype,
    pyeuler_geometry_t geo, pyeuler_coef_t scale, pyeuler_coef_t shift, pyeuler_coef_t center,
    int relu, int per_sample, float* sum_ddx, float* sum_ddx_xc, float* sum_ddx_g,
    void* workspace, size_t workspace_bytes, cudaStream_t stream);

/* ddy = m * (a * dd + p + q * (x - center) + ddshortcut) and dxx = b * dd + q * g + dxx_addend,
 * dd = ddx_scale * ddx, with m and g as in the reduce
 * (primitives.affine_act_double_backward_apply; a zero q contributes exactly 0 to ddy and dxx,
 * a zero b exactly 0 to dxx, even against a NaN or +-inf).  ddshortcut and dxx_addend may be
 * NULL (no term); ddx, ddshortcut, dxx_addend, ddy and dxx have x's dtype. */
cudaError_t pyeuler_affine_act_double_backward_apply(
    const void* ddx, const void* dy, const void* x, const uint8_t* mask, pyeuler_dtype_t dtype,
    pyeuler_geometry_t geo, pyeuler_coef_t scale, pyeuler_coef_t shift, int relu,
    pyeuler_coef_t a, pyeuler_coef_t b, pyeuler_coef_t p, pyeuler_coef_t q,
    pyeuler_coef_t center, const void* ddshortcut, float ddx_scale, const void* dxx_addend,
    void* ddy, void* dxx, cudaStream_t stream);

/* ---- IE-Skip elementwise steps (layout-agnostic: all operands share one dense layout) ---- */

/* The operands of each are numel > 0 elements of one dtype, every pointer required unless
 * said otherwise; each operation is rounded to float32 separately, like the eager reference's
 * kernels, and the factors (2 * step_size, -theta, ...) are formed in double first.  One
 * launch each. */

/* e = x - c - theta * fx (primitives.ie_residual) */
cudaError_t pyeuler_ie_residual(const void* x, const void* c, const void* fx,
                                pyeuler_dtype_t dtype, int64_t numel, double theta, void* e,
                                cudaStream_t stream);

/* e = x - c - theta * fx and its term in the IE step, term = -2 * step_size * e
 * (primitives.ie_residual_with_term), in one pass: the term is formed from e in float32,
 * before e is rounded to dtype.  pyeuler_affine_act_backward_apply_ie_update reads the term
 * as its residual (residual_is_term). */
cudaError_t pyeuler_ie_residual_with_term(const void* x, const void* c, const void* fx,
                                          pyeuler_dtype_t dtype, int64_t numel, double theta,
                                          double step_size, void* e, void* term,
                                          cudaStream_t stream);

/* The adjoint of pyeuler_ie_residual_with_term (primitives.ie_residual_with_term_adjoint),
 * from the gradients de of e and dterm of its term, in one pass:
 *   u = de - 2 * step_size * dterm,  dx = u + dx_addend,  dc = -u,  dfx = -theta * u.
 * dx_addend may be NULL (no term); it has de's dtype and layout, is added in float32 before
 * dx is rounded, and enters dx alone (not dc or dfx).  dfx may be NULL: not written (at
 * theta == 1 it equals dc, so a caller passes NULL and uses dc). */
cudaError_t pyeuler_ie_residual_with_term_adjoint(const void* de, const void* dterm,
                                                  pyeuler_dtype_t dtype, int64_t numel,
                                                  double theta, double step_size,
                                                  const void* dx_addend, void* dx, void* dc,
                                                  void* dfx, cudaStream_t stream);

/* x_next = x - 2 * step_size * (e - theta * v) */
cudaError_t pyeuler_ie_update(const void* x, const void* e, const void* v, pyeuler_dtype_t dtype,
                              int64_t numel, double step_size, double theta, void* x_next,
                              cudaStream_t stream);

/* ---- the per-channel algebra of the norms (pyeuler/ops/norm_algebra.py) ----------- */

/* The entry points share one layout of the vectors, all float32 and dense:
 *   groups == 0 (BatchNorm): statistics (mean, var, dmean, dvar), sums and a, b, c, scale,
 *     shift are [C] (`samples` is not read);
 *   groups >= 1 dividing C (GroupNorm): statistics are [samples, groups] and sums and
 *     coefficients [samples, C]; channel c belongs to group c / (C / groups).
 * samples may be 0 (GroupNorm of an empty batch): the [samples, ...] vectors are then
 * neither read nor written and may be NULL; the parameter gradients are written, as 0
 * (sums over nothing).  Every operation is rounded separately as in the torch-op
 * definition (no contracted multiply-adds); sums run in a fixed order (no atomics), so
 * results are bitwise reproducible.  One kernel launch each (none when there is nothing
 * to write). */

/* scale = h * (w * invstd), shift = -scale * mean + h * b, invstd = rsqrt(var + eps)
 * (norm_algebra.forward_coefficients): weight absent reads as 1, bias absent as 0 (no
 * term), h absent as h_value.  scale, shift: [C] or [samples, C]. */
cudaError_t pyeuler_forward_coefficients(const float* mean, const float* var, int64_t samples,
                                         int64_t channels, int64_t groups, pyeuler_param_t weight,
                                         pyeuler_param_t bias, pyeuler_param_t h, double h_value,
                                         double eps, float* scale, float* shift,
                                         cudaStream_t stream);

/* The backward's coefficients of dx = a * g + b * (x - center) + c and the parameter
 * gradients (norm_algebra.backward_coefficients), from the reduce sums sum_g = sum g and
 * sum_gxc = sum g * (x - center), both given or both NULL.  With invstd = rsqrt(var + eps),
 * h·w = h * w and sums over the channels of each statistic's group (one channel for
 * BatchNorm):
 *   a = h·w * invstd, always;
 *   b = (sum h·w * sum_gxc * invstd) * (invstd^2 * (-1/count)) + dvar * (2/count),
 *   c = (sum h·w * sum_g) * (-invstd * (1/count)) + dmean * (1/count),
 * where each term is present only with its operands (the sums; dmean, dvar: the gradients
 * flowing into the batch statistics, statistic-shaped, may be NULL), and b = c = 0 unless
 * need_x and batch_stats.  count >= 1: the elements behind one statistic.
 * Parameter gradients, each written iff its pointer is not NULL (which needs the sums),
 * summed over the samples:
 *   dweight[C] = sum h * sum_gxc * invstd,  dbias[C] = sum h * sum_g,
 *   dh = sum w * sum_gxc * invstd + b * sum_g: [C] when h.stride != 0, else one float
 *     summed over the channels too; needs h (data not NULL). */
cudaError_t pyeuler_backward_coefficients(
    const float* sum_g, const float* sum_gxc, const float* dmean, const float* dvar,
    const float* var, int64_t samples, int64_t channels, int64_t groups, pyeuler_param_t weight,
    pyeuler_param_t bias, pyeuler_param_t h, double h_value, double eps, int batch_stats,
    int need_x, int64_t count, float* a, float* b, float* c, float* dweight, float* dbias,
    float* dh, cudaStream_t stream);

/* The vector-Jacobian product of pyeuler_backward_coefficients
 * (norm_algebra.backward_coefficients_vjp): from the cotangents of (a, b, c, dweight, dbias,
 * dh), the gradients of sum_g, sum_gxc, dmean, dvar, var and the parameters.  The arguments
 * up to count are pyeuler_backward_coefficients' (dmean and dvar enter the coefficients
 * linearly, so their values are not needed).  Cotangents, NULL (data NULL) where absent:
 * cot_a, cot_b, cot_c float32 and shaped like a, b, c; cot_b and cot_c are ignored unless
 * need_x and batch_stats (b and c are constants otherwise); cot_dweight, cot_dbias and
 * cot_dh, in any parameter dtype, are ignored without the sums and should be given only
 * where that gradient was computed; cot_dh is [C] or, for a 0-dim h, one value (stride 0).
 * With h·w, invstd and the group sums as above, and u_c = sum cot_c * (-invstd * (1/count)),
 * u_b = sum cot_b * (invstd^2 * (-1/count)) over each statistic's group, per (sample,
 * channel) (terms of the batch statistics only with need_x and batch_stats and the sums):
 *   d_sum_g   = h * cot_dbias + b * cot_dh + h·w * u_c,
 *   d_sum_gxc = (h * cot_dweight + w * cot_dh + h·w * u_b) * invstd,
 *   d_invstd  = h·w * cot_a - cot_c * (sum h·w * sum_g) / count
 *               - 2 * cot_b * (sum h·w * sum_gxc * invstd) * invstd / count
 *               + (d_sum_gxc / invstd) * sum_gxc,
 *   d(h·w)    = cot_a * invstd + u_c * sum_g + u_b * sum_gxc * invstd;
 * per statistic: d_var = (sum d_invstd) * (invstd^3 * -0.5), d_dmean = (sum cot_c) / count,
 * d_dvar = (sum cot_b) * (2/count) (0 without need_x and batch_stats); per channel, summed
 * over the samples: d_weight = cot_dh * sum_gxc * invstd + h * d(h·w),
 * d_bias = cot_dh * sum_g, d_h = cot_dweight * sum_gxc * invstd + cot_dbias * sum_g +
 * w * d(h·w), summed over the channels too for a 0-dim h (h.stride == 0).  Each output is
 * written iff its pointer is not NULL (d_weight, d_bias and d_h need that parameter, and are
 * written dense in its dtype: [C], or one value for a 0-dim h); the float32 ones are shaped
 * like sum_g (d_sum_g, d_sum_gxc) and var (d_dmean, d_dvar, d_var).  A gradient the given
 * cotangents do not reach comes out as 0 (the algebra's None).  One launch, one block when
 * d_h is a 0-dim h's. */
cudaError_t pyeuler_backward_coefficients_vjp(
    const float* sum_g, const float* sum_gxc, const float* var, int64_t samples, int64_t channels,
    int64_t groups, pyeuler_param_t weight, pyeuler_param_t bias, pyeuler_param_t h,
    double h_value, double eps, int batch_stats, int need_x, int64_t count, const float* cot_a,
    const float* cot_b, const float* cot_c, pyeuler_param_t cot_dweight, pyeuler_param_t cot_dbias,
    pyeuler_param_t cot_dh, float* d_sum_g, float* d_sum_gxc, float* d_dmean, float* d_dvar,
    float* d_var, void* d_weight, void* d_bias, void* d_h, cudaStream_t stream);

/* The double backward's per-channel pass (norm_algebra.double_backward_coefficients):
 * pyeuler_backward_coefficients_vjp, same arguments and outputs, plus in the same launch
 *   a, b        the backward's coefficients as pyeuler_backward_coefficients computes them
 *               (shaped like sum_g; b reads dvar, the gradient into the variance,
 *               statistic-shaped, NULL: no term; dvar is read only with need_x and
 *               batch_stats);
 *   cot_sum_g, cot_sum_gxc  the cotangents of the sums themselves (shaped like sum_g, NULL
 *               where absent, ignored without the sums), added to d_sum_g and d_sum_gxc: these
 *               are the apply pass's p and q;
 *   d_mean      the gradient of the statistic mean through the centre, statistic-shaped:
 *               -(b * cot_c) + -(q * sum_g) summed over each statistic's channels, the first
 *               term only with need_x and batch_stats, the second only with q's terms.
 * d_sum_g and d_sum_gxc are the VJP's term plus the sum's cotangent where both are present,
 * either alone where one is, 0 where neither (the algebra's add_optional).  Each output is
 * written iff its pointer is not NULL; pyeuler_backward_coefficients_vjp is this entry with
 * every extra NULL. */
cudaError_t pyeuler_double_backward_coefficients(
    const float* sum_g, const float* sum_gxc, const float* dvar, const float* var, int64_t samples,
    int64_t channels, int64_t groups, pyeuler_param_t weight, pyeuler_param_t bias,
    pyeuler_param_t h, double h_value, double eps, int batch_stats, int need_x, int64_t count,
    const float* cot_a, const float* cot_b, const float* cot_c, pyeuler_param_t cot_dweight,
    pyeuler_param_t cot_dbias, pyeuler_param_t cot_dh, const float* cot_sum_g,
    const float* cot_sum_gxc, float* a, float* b, float* d_sum_g, float* d_sum_gxc,
    float* d_dmean, float* d_dvar, float* d_var, void* d_weight, void* d_bias, void* d_h,
    float* d_mean, cudaStream_t stream);

/* nn.BatchNorm's running-statistics update, in place (norm_algebra.update_running_stats):
 * num_batches_tracked (one int64; NULL: none) is incremented, then, with rate m,
 *   running_mean[c] = lerp(running_mean[c], mean[c], m),
 *   running_var[c]  = lerp(running_var[c], var[c] * float(count / (count - 1)), m),
 * the batch value rounded to the buffers' dtype first and the lerp computed in float32 as
 * torch's is (from the nearer end, its multiply-add fused: m = 1 gives exactly the batch
 * value), then stored in that dtype.  The rate m: the 0-dim tensor `momentum` (stride 0)
 * when its data is not NULL, read in its dtype and rounded to the buffers' dtype (as
 * Tensor.lerp_ casts a tensor weight); else 1 / num_batches_tracked after the increment,
 * rounded to the buffers' dtype, when `cumulative` (which needs the counter and no momentum
 * tensor); else float(momentum_value).
 * running_mean, running_var: dense [C] in `dtype` (float32, float16 or bfloat16); mean,
 * var: the biased batch statistics, float32 dense [C]; count >= 2: the values behind each.
 * One launch of one block: the counter is read and written once, before any channel reads
 * the rate, so nothing reads it half-updated; nothing is read on the host.  channels == 0
 * launches only to increment a counter (none without one); the [C] pointers may then be
 * NULL. */
cudaError_t pyeuler_update_running_stats(void* running_mean, void* running_var,
                                         pyeuler_dtype_t dtype, int64_t* num_batches_tracked,
                                         const float* mean, const float* var, int64_t channels,
                                         int64_t count, pyeuler_param_t momentum,
                                         double momentum_value, int cumulative,
                                         cudaStream_t stream);

/* ---- build information ----------------------------------------------------------- */

/* Writes the compute capabilities (major * 10 + minor) the kernels were compiled for into
 * archs[0 .. capacity) and returns how many there are. */
int pyeuler_compiled_archs(int* archs, int capacity);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* PYEULER_KERNELS_H_ */
