#pragma once
#include <torch/extension.h>

#include <string>

namespace fastmed {

#ifdef FASTMED_WITH_CUDA
// csrc/cuda_selftest.cu
std::string cuda_runtime_version();
torch::Tensor cuda_selftest(int64_t n);
#endif

}  // namespace fastmed
