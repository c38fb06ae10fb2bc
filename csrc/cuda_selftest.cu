// A tiny CUDA kernel that proves the CUDA part of fastmed._C was built and can launch.
//
// Plain CUDA (a kernel and a launcher taking a raw pointer and a cudaStream_t), no torch headers; its torch glue
// (device guard, current stream, TORCH_CHECK) is cuda_selftest() in fastmed_ext.cpp.  Other .cu files may use torch
// and c10/cuda headers (not ATen/cuda/*): see "Compiled extension" in ARCHITECTURE.md.
#include <cuda_runtime.h>

#include <cstdint>

namespace fastmed {

namespace {
__global__ void iota_kernel(int32_t* __restrict__ out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = static_cast<int32_t>(i);
}
}  // namespace

cudaError_t launch_iota(int32_t* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  iota_kernel<<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(out, n);
  return cudaGetLastError();
}

int cuda_runtime_version_number() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace fastmed
