// A tiny CUDA kernel that proves the CUDA part of fastmed._C was built and can launch on the
// current device and stream.  Real CUDA kernels (distance transform) live beside it.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <string>

#include "fastmed_ext.h"

namespace fastmed {

namespace {
__global__ void iota_kernel(int32_t* __restrict__ out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<int32_t>(i);
}
}  // namespace

std::string cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

torch::Tensor cuda_selftest(int64_t n) {
  TORCH_CHECK(n >= 0 && n <= (int64_t(1) << 31), "cuda_selftest: n must be in [0, 2^31], got ", n);
  TORCH_CHECK(torch::cuda::is_available(), "cuda_selftest: no CUDA device is available");
  auto out = torch::empty({n}, torch::dtype(torch::kInt32).device(torch::kCUDA));
  if (n == 0) return out;
  const at::cuda::CUDAGuard guard(out.device());
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  iota_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(out.data_ptr<int32_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace fastmed
