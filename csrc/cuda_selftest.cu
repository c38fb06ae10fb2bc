// A tiny CUDA kernel that proves the CUDA part of fastmed._C was built and can launch.
//
// Convention for csrc/*.cu: plain CUDA (kernels + a launcher taking raw pointers and a cudaStream_t), no torch
// headers.  The torch glue (device guard, current stream, TORCH_CHECK) lives in the .cpp files under
// FASTMED_WITH_CUDA.  This keeps every .cu compilable by nvcc alone, which CI checks for sm_90 on machines whose
// torch is a CPU build (CPU wheels lack the generated c10/cuda headers).
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
