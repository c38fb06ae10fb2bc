#pragma once
// Declarations shared by the translation units of fastmed._C.
#include <torch/extension.h>

#include <cstdint>

#ifdef FASTMED_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fastmed {

#ifdef FASTMED_WITH_CUDA
// csrc/cuda_selftest.cu (plain CUDA, no torch headers)
cudaError_t launch_iota(int32_t* out, int64_t n, cudaStream_t stream);
int cuda_runtime_version_number();
#endif

}  // namespace fastmed
