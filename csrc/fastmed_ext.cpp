// fastmed._C: the optional compiled extension (pybind11 through torch's extension tooling).
//
// This file owns the module: build_info(), num_threads(), and the bindings of every op family.  An op family adds
// csrc/<op>_cpu.cpp (CPU) and csrc/<op>_cuda.cu (CUDA, compiled only with FASTMED_WITH_CUDA), declares its entry
// points in csrc/fastmed_ext.h, and binds them in PYBIND11_MODULE below.
#include <torch/extension.h>

#include "fastmed_ext.h"

#ifdef FASTMED_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <string>

namespace fastmed {

#ifdef FASTMED_WITH_CUDA
torch::Tensor cuda_selftest(int64_t n) {
  TORCH_CHECK(n >= 0 && n <= (int64_t(1) << 31), "cuda_selftest: n must be in [0, 2^31], got ", n);
  TORCH_CHECK(torch::cuda::is_available(), "cuda_selftest: no CUDA device is available");
  auto out = torch::empty({n}, torch::dtype(torch::kInt32).device(torch::kCUDA));
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaError_t err = launch_iota(out.data_ptr<int32_t>(), n, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "cuda_selftest: kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

std::string cuda_runtime_version() {
  const int v = cuda_runtime_version_number();
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}
#endif

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef FASTMED_WITH_CUDA
  info["cuda"] = true;
  info["cuda_runtime_version"] = cuda_runtime_version();
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["torch_version"] = TORCH_VERSION;
  return info;
}

int64_t num_threads() { return at::get_num_threads(); }

}  // namespace fastmed

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastmed compiled extension (C++ CPU kernels, optional CUDA kernels)";
  m.def("build_info", &fastmed::build_info, "What this build of fastmed._C contains.");
  m.def("num_threads", &fastmed::num_threads, "Threads available to CPU kernels (torch's intra-op pool).");
  m.def("distance_transform_cpu", &fastmed::distance_transform_cpu,
        "Exact Euclidean distance transform (scipy distance_transform_edt semantics) of the last spatial_dims dims "
        "of a contiguous uint8/bool CPU mask; spacing [] = unit; +inf where a map has no zero voxel.",
        pybind11::arg("mask"), pybind11::arg("spatial_dims"), pybind11::arg("spacing"), pybind11::arg("squared"),
        pybind11::arg("float64"));
  m.def("feature_transform_cpu", &fastmed::feature_transform_cpu,
        "distance_transform_cpu and the feature transform: (distances, int64 flat index within its map of each "
        "voxel's nearest zero, -1 in a map with no zero; ties to the lexicographically smallest nearest zero).",
        pybind11::arg("mask"), pybind11::arg("spatial_dims"), pybind11::arg("spacing"), pybind11::arg("squared"),
        pybind11::arg("float64"));
  m.def("loss_slots_cpu", &fastmed::loss_slots_cpu, "The statistics slots of the C++ loss pass, in order.");
  m.def("loss_stats_cpu", &fastmed::loss_stats_cpu, "Fused loss statistics (B, NUM_SLOTS, C), csrc/losses_cpu.cpp.");
  m.def("loss_stats_backward_cpu", &fastmed::loss_stats_backward_cpu,
        "d logits of the fused loss statistics into dlogits, csrc/losses_cpu.cpp.");
  m.def("loss_stats_probs_cpu", &fastmed::loss_stats_probs_cpu,
        "loss_stats_cpu that also writes the softmax to probs (B, C, S), for loss_stats_backward_probs_cpu.");
  m.def("loss_stats_backward_probs_cpu", &fastmed::loss_stats_backward_probs_cpu,
        "loss_stats_backward_cpu from the softmax loss_stats_probs_cpu wrote to dlogits, overwritten in place.");
  m.def("norm_act_forward_cpu", &fastmed::norm_act_forward_cpu,
        "Fused normalization + activation of a CPU tensor (contiguous or channels-last): (y, mean, rstd).",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("residual"),
        pybind11::arg("slope"), pybind11::arg("mean_in"), pybind11::arg("rstd_in"), pybind11::arg("kind"),
        pybind11::arg("num_groups"), pybind11::arg("eps"), pybind11::arg("activation"),
        pybind11::arg("negative_slope"));
  m.def("norm_act_backward_cpu", &fastmed::norm_act_backward_cpu,
        "Backward of norm_act_forward_cpu: (dx, dweight, dbias, dresidual, dslope), None where absent.",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("residual"), pybind11::arg("slope"), pybind11::arg("mean"), pybind11::arg("rstd"),
        pybind11::arg("kind"), pybind11::arg("num_groups"), pybind11::arg("activation"),
        pybind11::arg("negative_slope"), pybind11::arg("input_stats"));
  m.def("norm_act_autograd_cpu", &fastmed::norm_act_autograd_cpu,
        "norm_act_forward_cpu with its autograd in C++ (backward: norm_act_backward_cpu): [y, mean, rstd].",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("residual"),
        pybind11::arg("slope"), pybind11::arg("kind"), pybind11::arg("num_groups"), pybind11::arg("eps"),
        pybind11::arg("activation"), pybind11::arg("negative_slope"));
  m.def("set_norm_act_double_backward", &fastmed::set_norm_act_double_backward,
        "The Python function norm_act_autograd_cpu's backward calls under create_graph=True: (dy, x, weight, bias, "
        "residual, slope, kind, num_groups, eps, activation, negative_slope) -> (dx, dweight, dbias, dresidual, "
        "dslope), None where absent.", pybind11::arg("fn"));
  m.def("loss_finalize_cpu", &fastmed::loss_finalize_cpu,
        "The loss formula of a LossSpec on the statistics: [loss, jac, valid], csrc/losses_cpu_finalize.cpp.");
  m.def("loss_stats_nd_cpu", &fastmed::loss_stats_nd_cpu,
        "loss_stats_cpu on (B, C, *spatial) logits and targets as fastmed.ops.losses passes them.");
  m.def("loss_stats_backward_nd_cpu", &fastmed::loss_stats_backward_nd_cpu,
        "loss_stats_backward_cpu on (B, C, *spatial) operands: d logits in the logits' dtype and layout.");
  m.def("loss_stats_autograd_cpu", &fastmed::loss_stats_autograd_cpu,
        "loss_stats_nd_cpu with its autograd in C++ (backward: loss_stats_backward_nd_cpu, or from the softmax kept "
        "from the forward where that replaces the logits): the statistics.");
  m.def("loss_finalize_autograd_cpu", &fastmed::loss_finalize_autograd_cpu,
        "loss_finalize_cpu with its autograd in C++ (backward: jac times the output gradient): [loss, jac, valid].");
  m.def("set_loss_double_backward", &fastmed::set_loss_double_backward,
        "The Python functions the loss autograd nodes call under create_graph=True: stats_fn(gstats, logits, target, "
        "mask, *StatsSpec) -> d logits, finalize_fn(gloss, stats, region_weight, ce_weight, focal_alpha, "
        "focal_weight, *LossSpec) -> d stats.", pybind11::arg("stats_fn"), pybind11::arg("finalize_fn"));
  m.def("window_attention_forward_cpu", &fastmed::window_attention_forward_cpu,
        "(Shifted-)window attention of windows of <= 512 tokens on the token grid: [out, probabilities or "
        "log-sum-exp (an empty tensor with save=False: no backward will read it)], csrc/window_attention_cpu.cpp.",
        pybind11::arg("qkv"), pybind11::arg("bias"), pybind11::arg("qkv_pad"), pybind11::arg("slots"),
        pybind11::arg("heads"), pybind11::arg("window"), pybind11::arg("shift"), pybind11::arg("scale"),
        pybind11::arg("save_probabilities"), pybind11::arg("save") = true);
  m.def("window_attention_backward_cpu", &fastmed::window_attention_backward_cpu,
        "Backward of window_attention_forward_cpu: [dqkv, dbias or undefined, dqkv_pad or undefined].",
        pybind11::arg("dout"), pybind11::arg("qkv"), pybind11::arg("saved"), pybind11::arg("bias"),
        pybind11::arg("qkv_pad"), pybind11::arg("slots"), pybind11::arg("heads"), pybind11::arg("window"), pybind11::arg("shift"),
        pybind11::arg("scale"), pybind11::arg("saved_probabilities"), pybind11::arg("bias_grad"));
  m.def("sliding_window_accumulate_cpu", &fastmed::sliding_window_accumulate_cpu,
        "In place: buffer += weight * patch for each window in order (origins: n, z, y, x per window; the buffer's z "
        "axis a ring), csrc/sliding_window_cpu.cpp.", pybind11::arg("buffer"), pybind11::arg("patches"),
        pybind11::arg("weight"), pybind11::arg("origins"));
  m.def("sliding_window_finalize_cpu", &fastmed::sliding_window_finalize_cpu,
        "Image rows [z_lo, z_hi) of an accumulation buffer divided by the summed window weights (in place or into "
        "result) or argmaxed over channels into uint8 labels, csrc/sliding_window_cpu.cpp.", pybind11::arg("buffer"),
        pybind11::arg("result"), pybind11::arg("table"), pybind11::arg("starts_z"), pybind11::arg("starts_y"),
        pybind11::arg("first_z"), pybind11::arg("count_z"), pybind11::arg("first_y"), pybind11::arg("count_y"),
        pybind11::arg("z_lo"), pybind11::arg("z_hi"), pybind11::arg("output"), pybind11::arg("zero_buffer"));
  m.def("gelu_and_derivative_cpu_", &fastmed::gelu_and_derivative_cpu_,
        "The exact (erf) GELU of a contiguous float32 CPU tensor x, returned; x overwritten with GELU'(x), "
        "csrc/gelu_cpu.cpp.", pybind11::arg("x"));
  m.def("mul_and_column_sums_cpu_", &fastmed::mul_and_column_sums_cpu_,
        "a *= b in place (contiguous float32 CPU (rows, columns) tensors of one shape): [a, the column sums of the "
        "product], summed per fixed block of rows, blocks in order (the same bits for any number of threads), "
        "csrc/gelu_cpu.cpp.", pybind11::arg("a"), pybind11::arg("b"));
  m.def("layer_norm_cpu", &fastmed::layer_norm_cpu,
        "LayerNorm over the last dimension of a contiguous float32 CPU tensor: [y, mean, rstd] (the statistics "
        "undefined unless stats), csrc/layer_norm_cpu.cpp.", pybind11::arg("x"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("eps"), pybind11::arg("stats") = false);
  m.def("layer_norm_backward_cpu", &fastmed::layer_norm_backward_cpu,
        "Backward of layer_norm_cpu: [dx, dweight, dbias] (undefined unless asked for; dx plus residual_grad when "
        "that is given: x's gradient from a residual connection, added in the same pass), csrc/layer_norm_cpu.cpp.",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("mean"), pybind11::arg("rstd"), pybind11::arg("weight"),
        pybind11::arg("need_dx"), pybind11::arg("need_dw"), pybind11::arg("need_db"),
        pybind11::arg("residual_grad") = pybind11::none());
#ifdef FASTMED_WITH_CUDA
  m.def("distance_transform_cuda", &fastmed::distance_transform_cuda,
        "distance_transform_cpu for CUDA tensors: one thread per line, one launch per axis for the whole batch.",
        pybind11::arg("mask"), pybind11::arg("spatial_dims"), pybind11::arg("spacing"), pybind11::arg("squared"),
        pybind11::arg("float64"));
  m.def("feature_transform_cuda", &fastmed::feature_transform_cuda,
        "feature_transform_cpu for CUDA tensors.", pybind11::arg("mask"), pybind11::arg("spatial_dims"),
        pybind11::arg("spacing"), pybind11::arg("squared"), pybind11::arg("float64"));
  m.def("cuda_selftest", &fastmed::cuda_selftest,
        "Runs a tiny CUDA kernel writing 0..n-1 into an int32 CUDA tensor; returns it.", pybind11::arg("n"));
#endif
}
