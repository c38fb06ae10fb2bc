#pragma once
// Declarations shared by the translation units of fastmed._C.
#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#ifdef FASTMED_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fastmed {

// csrc/distance_transform_cpu.cpp: exact Euclidean distance transform of the last `spatial_dims` dims of a uint8/bool
// mask (nonzero = foreground); spacing empty (unit) or one entry per spatial dim; float32 or float64 result.
torch::Tensor distance_transform_cpu(const torch::Tensor& mask, int64_t spatial_dims, std::vector<double> spacing,
                                     bool squared, bool float64);

// csrc/distance_transform_cpu.cpp: the same transform and, per voxel, the flat index within its map of the nearest
// zero voxel (int64; -1 throughout a map with no zero; ties to the lexicographically smallest nearest zero).
std::tuple<torch::Tensor, torch::Tensor> feature_transform_cpu(const torch::Tensor& mask, int64_t spatial_dims,
                                                               std::vector<double> spacing, bool squared,
                                                               bool float64);
// csrc/window_attention_cpu.cpp: (shifted-)window attention of windows of at most 64 tokens straight on the token
// grid qkv (B, D, H, W, 3C) (contiguous float32/float64), bias (heads, n, n) (the relative position bias of every
// pair, or none), qkv_pad (3C) (the qkv of a padding token, or none = zeros), slots (windows,) (int64: where each
// window, in raster order, keeps its saved rows): returns {out (B, D, H, W, C), saved}, saved the probabilities
// (windows, heads, n, n) or the log-sum-exp (windows, n, heads).  The backward returns
// {dqkv, dbias (heads, n, n) when bias_grad, dqkv_pad (3C) when qkv_pad is given}.  Bit-identical for any number of
// threads.
std::vector<at::Tensor> window_attention_forward_cpu(const at::Tensor& qkv, const c10::optional<at::Tensor>& bias,
                                                     const c10::optional<at::Tensor>& qkv_pad, const at::Tensor& slots,
                                                     int64_t heads, std::vector<int64_t> window,
                                                     std::vector<int64_t> shift, double scale,
                                                     bool save_probabilities, bool save);
std::vector<at::Tensor> window_attention_backward_cpu(const at::Tensor& dout, const at::Tensor& qkv,
                                                      const at::Tensor& saved, const c10::optional<at::Tensor>& bias,
                                                      const c10::optional<at::Tensor>& qkv_pad,
                                                      const at::Tensor& slots, int64_t heads,
                                                      std::vector<int64_t> window, std::vector<int64_t> shift,
                                                      double scale, bool saved_probabilities, bool bias_grad);
// csrc/sliding_window_cpu.cpp: the blending of sliding-window inference on CPU tensors (any strides).  Accumulate:
// buffer[n, :, (z + dz) % R, y + dy, x + dx] += weight[dz, dy, dx] * patches[k, :, dz, dy, dx] per window k in order,
// origins 4 ints (n, z, y, x) per window, weight in the buffer's accumulation dtype (float32; float64 for float64).
// Finalize: image rows [z_lo, z_hi) divided by the summed window weights (the normalizer table and its int32 index
// vectors, fastmed/reference/sliding_window.py), in place (no result) or into result, or their argmax over channels
// into uint8 labels (output "labels"); zero_buffer zeroes the rows read.  Bit-identical for any number of threads.
void sliding_window_accumulate_cpu(at::Tensor buffer, const at::Tensor& patches, const at::Tensor& weight,
                                   std::vector<int64_t> origins);
void sliding_window_finalize_cpu(at::Tensor buffer, const c10::optional<at::Tensor>& result, const at::Tensor& table,
                                 const at::Tensor& starts_z, const at::Tensor& starts_y, const at::Tensor& first_z,
                                 const at::Tensor& count_z, const at::Tensor& first_y, const at::Tensor& count_y,
                                 int64_t z_lo, int64_t z_hi, const std::string& output, bool zero_buffer);
// csrc/gelu_cpu.cpp: the exact (erf) GELU of a contiguous float32 CPU tensor x (to ~1 ulp, errors unbiased),
// returned, with x overwritten by GELU'(x).  The same values for any number of threads.
torch::Tensor gelu_and_derivative_cpu_(torch::Tensor& x);
std::vector<torch::Tensor> mul_and_column_sums_cpu_(torch::Tensor& a, const torch::Tensor& b);
// csrc/layer_norm_cpu.cpp: LayerNorm over the last dimension of a contiguous float32 CPU tensor (weight and bias
// optional, C values each): [y, mean, rstd] (the row statistics when `stats`, else undefined), and the backward
// [dx, dweight, dbias] (each undefined unless asked for); the same values for any number of threads.
std::vector<at::Tensor> layer_norm_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, double eps, bool stats);
std::vector<at::Tensor> layer_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                                const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                                bool need_dx, bool need_dw, bool need_db,
                                                const c10::optional<at::Tensor>& residual_grad);
// csrc/norm_act_cpu.cpp: y = act((x - mean) * rstd * weight + bias + residual) for CPU tensors (N, C, *spatial),
// contiguous or channels-last, instance/group/batch statistics, activation identity/relu/leaky_relu/prelu:
// returns {y, mean, rstd} (statistics (R,) in float32, float64 for float64 x); mean_in/rstd_in given are used
// instead of the statistics of x.  The backward returns {dx, dweight, dbias, dresidual, dslope}, undefined where
// the input is absent.  Bit-identical results for any number of threads.
std::vector<torch::Tensor> norm_act_forward_cpu(const torch::Tensor& x, const c10::optional<torch::Tensor>& weight,
                                                const c10::optional<torch::Tensor>& bias,
                                                const c10::optional<torch::Tensor>& residual,
                                                const c10::optional<torch::Tensor>& slope,
                                                const c10::optional<torch::Tensor>& mean_in,
                                                const c10::optional<torch::Tensor>& rstd_in, const std::string& kind,
                                                int64_t num_groups, double eps, const std::string& activation,
                                                double negative_slope);
std::vector<torch::Tensor> norm_act_backward_cpu(const torch::Tensor& dy, const torch::Tensor& x,
                                                 const c10::optional<torch::Tensor>& weight,
                                                 const c10::optional<torch::Tensor>& bias,
                                                 const c10::optional<torch::Tensor>& residual,
                                                 const c10::optional<torch::Tensor>& slope, const torch::Tensor& mean,
                                                 const torch::Tensor& rstd, const std::string& kind,
                                                 int64_t num_groups, const std::string& activation,
                                                 double negative_slope, bool input_stats);
// csrc/norm_act_cpu.cpp: norm_act_forward_cpu (statistics of x) as an autograd function whose backward is
// norm_act_backward_cpu: {y, mean, rstd}, mean and rstd non-differentiable; a differentiated backward calls the Python
// function set with set_norm_act_double_backward.
std::vector<torch::Tensor> norm_act_autograd_cpu(const torch::Tensor& x, const c10::optional<torch::Tensor>& weight,
                                                 const c10::optional<torch::Tensor>& bias,
                                                 const c10::optional<torch::Tensor>& residual,
                                                 const c10::optional<torch::Tensor>& slope, const std::string& kind,
                                                 int64_t num_groups, double eps, const std::string& activation,
                                                 double negative_slope);
void set_norm_act_double_backward(pybind11::object fn);

// The fields of a StatsSpec and of a LossSpec (fastmed/reference/loss_spec.py), in order, as C++ parameters (and
// the same names as arguments).
#define FASTMED_STATS_SPEC_PARAMS                                                                                  \
  const std::string &act, const std::string &pow_mode, const std::string &ce_mode, const std::string &focal_mode, \
      int64_t focal_c0, double gamma, const std::string &focal_pos, bool label_mode, bool has_ignore,             \
      int64_t ignore_index
#define FASTMED_STATS_SPEC_ARGS \
  act, pow_mode, ce_mode, focal_mode, focal_c0, gamma, focal_pos, label_mode, has_ignore, ignore_index
#define FASTMED_LOSS_SPEC_PARAMS                                                                                     \
  int64_t num_voxels, const std::string &region, int64_t region_c0, const std::string &pow_mode, bool batch,        \
      double smooth_nr, double smooth_dr, double tversky_alpha, double tversky_beta, const std::string &w_type,     \
      const std::string &region_reduction, double region_scale, const std::string &ce,                              \
      const std::string &ce_reduction, double label_smoothing, double ce_scale, const std::string &focal,           \
      int64_t focal_c0, const std::string &alpha_mode, double alpha, const std::string &focal_reduction,            \
      bool focal_masked, double focal_scale
#define FASTMED_LOSS_SPEC_ARGS                                                                                     \
  num_voxels, region, region_c0, pow_mode, batch, smooth_nr, smooth_dr, tversky_alpha, tversky_beta, w_type,      \
      region_reduction, region_scale, ce, ce_reduction, label_smoothing, ce_scale, focal, focal_c0, alpha_mode, alpha, \
      focal_reduction, focal_masked, focal_scale
#define FASTMED_LOSS_WEIGHT_PARAMS                                                                                 \
  const c10::optional<torch::Tensor>&region_weight, const c10::optional<torch::Tensor>&ce_weight,               \
      const c10::optional<torch::Tensor>&focal_alpha, const c10::optional<torch::Tensor>&focal_weight
// csrc/losses_cpu.cpp: the fused loss statistics (B, NUM_SLOTS, C) of logits (B, C, S) and their backward (into
// dlogits, a (B, C, S) view); the StatsSpec fields follow the tensors (see fastmed/reference/loss_spec.py).
std::vector<std::string> loss_slots_cpu();
torch::Tensor loss_stats_cpu(const torch::Tensor& logits, const torch::Tensor& target,
                             const c10::optional<torch::Tensor>& mask, FASTMED_STATS_SPEC_PARAMS);
torch::Tensor loss_stats_backward_cpu(const torch::Tensor& gstats, const torch::Tensor& logits,
                                      const torch::Tensor& target, const c10::optional<torch::Tensor>& mask,
                                      FASTMED_STATS_SPEC_PARAMS, torch::Tensor dlogits);
// The same two with the softmax kept between them, for specs where it stands in for the logits in the backward
// (loss_stats_probs_suffice: softmax activation, a region term, no BCE or focal term; float32 / float64 logits):
// loss_stats_probs_cpu also writes the softmax to probs (B, C, S); loss_stats_backward_probs_cpu reads it from
// dlogits and overwrites it with d logits (the logits are not read).
bool loss_stats_probs_suffice(FASTMED_STATS_SPEC_PARAMS);
torch::Tensor loss_stats_probs_cpu(const torch::Tensor& logits, const torch::Tensor& target,
                                   const c10::optional<torch::Tensor>& mask, FASTMED_STATS_SPEC_PARAMS,
                                   torch::Tensor probs);
torch::Tensor loss_stats_backward_probs_cpu(const torch::Tensor& gstats, const torch::Tensor& logits,
                                            const torch::Tensor& target, const c10::optional<torch::Tensor>& mask,
                                            FASTMED_STATS_SPEC_PARAMS, torch::Tensor dlogits);
// csrc/losses_cpu_finalize.cpp: the loss formula of a LossSpec on the statistics (B, NUM_SLOTS, C): {loss,
// jac = d loss / d stats, valid}.
std::vector<torch::Tensor> loss_finalize_cpu(const torch::Tensor& stats, FASTMED_LOSS_WEIGHT_PARAMS,
                                             FASTMED_LOSS_SPEC_PARAMS);
// csrc/losses_cpu_finalize.cpp: loss_stats_cpu and loss_stats_backward_cpu on logits (B, C, *spatial), targets
// (B, 1 | C, *spatial) and a (B, 1, *spatial) mask as fastmed.ops.losses passes them (views and conversions done
// here); the backward returns d logits in the logits' dtype and layout.
torch::Tensor loss_stats_nd_cpu(const torch::Tensor& logits, const torch::Tensor& target,
                                const c10::optional<torch::Tensor>& mask, FASTMED_STATS_SPEC_PARAMS);
torch::Tensor loss_stats_backward_nd_cpu(const torch::Tensor& gstats, const torch::Tensor& logits,
                                         const torch::Tensor& target, const c10::optional<torch::Tensor>& mask,
                                         FASTMED_STATS_SPEC_PARAMS);
// csrc/losses_cpu_finalize.cpp: loss_stats_nd_cpu and loss_finalize_cpu as autograd functions in C++ (backward:
// loss_stats_backward_nd_cpu; jac times the output gradient); a differentiated backward calls the Python functions
// set with set_loss_double_backward: stats_fn(gstats, logits, target, mask, *StatsSpec) -> d logits and
// finalize_fn(gloss, stats, region_weight, ce_weight, focal_alpha, focal_weight, *LossSpec) -> d stats.
torch::Tensor loss_stats_autograd_cpu(const torch::Tensor& logits, const torch::Tensor& target,
                                      const c10::optional<torch::Tensor>& mask, FASTMED_STATS_SPEC_PARAMS);
std::vector<torch::Tensor> loss_finalize_autograd_cpu(const torch::Tensor& stats, FASTMED_LOSS_WEIGHT_PARAMS,
                                                      FASTMED_LOSS_SPEC_PARAMS);
void set_loss_double_backward(pybind11::object stats_fn, pybind11::object finalize_fn);
#ifdef FASTMED_WITH_CUDA
// csrc/cuda_selftest.cu (plain CUDA, no torch headers)
cudaError_t launch_iota(int32_t* out, int64_t n, cudaStream_t stream);
int cuda_runtime_version_number();
// csrc/distance_transform_cuda.cu: the same transform for CUDA tensors, one launch per axis for the whole batch.
torch::Tensor distance_transform_cuda(const torch::Tensor& mask, int64_t spatial_dims, std::vector<double> spacing,
                                      bool squared, bool float64);
// csrc/distance_transform_cuda.cu: feature_transform_cpu for CUDA tensors.
std::tuple<torch::Tensor, torch::Tensor> feature_transform_cuda(const torch::Tensor& mask, int64_t spatial_dims,
                                                                std::vector<double> spacing, bool squared,
                                                                bool float64);
#endif

}  // namespace fastmed
