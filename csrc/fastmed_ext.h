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
// csrc/losses_cpu.cpp: the fused loss statistics (B, NUM_SLOTS, C) of logits (B, C, S) and their backward (into
// dlogits, a (B, C, S) view); the StatsSpec fields follow the tensors (see fastmed/reference/loss_spec.py).
std::vector<std::string> loss_slots_cpu();
torch::Tensor loss_stats_cpu(const torch::Tensor& logits, const torch::Tensor& target,
                             const c10::optional<torch::Tensor>& mask, const std::string& act,
                             const std::string& pow_mode, const std::string& ce_mode, const std::string& focal_mode,
                             int64_t focal_c0, double gamma, const std::string& focal_pos, bool label_mode,
                             bool has_ignore, int64_t ignore_index);
torch::Tensor loss_stats_backward_cpu(const torch::Tensor& gstats, const torch::Tensor& logits,
                                      const torch::Tensor& target, const c10::optional<torch::Tensor>& mask,
                                      const std::string& act, const std::string& pow_mode,
                                      const std::string& ce_mode, const std::string& focal_mode, int64_t focal_c0,
                                      double gamma, const std::string& focal_pos, bool label_mode, bool has_ignore,
                                      int64_t ignore_index, torch::Tensor dlogits);

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
