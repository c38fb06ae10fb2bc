// The exact (erf) GELU on float32 CPU tensors for the MLPs of fastmed.nn's Swin blocks in training
// (fastmed/nn/swin.py, _OneDnnMlp): one pass computes GELU(x) and overwrites x with GELU'(x) (one erf and one
// exponential per value; torch's GELU and its backward compute one and two), so that the backward's GELU is a
// product, which oneDNN applies in the epilogue of the GEMM that forms the GELU's input gradient.
//
// mul_and_column_sums_cpu_ is that backward's product where it runs outside a GEMM: d pre *= GELU' in place, with
// the column sums (the first Linear's bias gradient) from the same pass.
//
// Three builds of the loops (gelu_cpu_kernels.h): baseline x86-64, AVX2 + FMA and AVX-512, chosen at run time.
// Work items are fixed blocks of values; every value is computed alone, so the results do not depend on the
// number of threads.
#include "cpu_dispatch.h"
#include "fastmed_ext.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastmed {
namespace gelu_cpu {

constexpr int64_t kForwardBlock = 16384;  // values per work item
constexpr int64_t kRowsBlock = 64;        // rows per work item of the product and column sums

#define FASTMED_KERNELS_HEADER "gelu_cpu_kernels.h"
#define FASTMED_KERNELS_AVX512 1  // the AVX-512 build too: ~23% faster than AVX2 on Zen 4 here, the same bits
#include "cpu_kernels_twice.h"

namespace {

void check_float32_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
                    "gelu_cpu: ", name, " must be a contiguous float32 CPU tensor, got ", t.scalar_type(), " on ",
                    t.device(), t.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace
}  // namespace gelu_cpu

torch::Tensor gelu_and_derivative_cpu_(torch::Tensor& x) {
  using namespace gelu_cpu;
  check_float32_cpu_contiguous(x, "x");
  at::Tensor y = at::empty_like(x);
  float* xp = x.mutable_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  const int64_t n = x.numel();
  const auto run = FASTMED_KERNEL_AVX512(gelu_and_derivative_run);
  const int64_t blocks = (n + kForwardBlock - 1) / kForwardBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b * kForwardBlock;
      run(xp + s, yp + s, std::min(kForwardBlock, n - s));
    }
  });
  return y;
}

std::vector<torch::Tensor> mul_and_column_sums_cpu_(torch::Tensor& a, const torch::Tensor& b) {
  using namespace gelu_cpu;
  check_float32_cpu_contiguous(a, "a");
  check_float32_cpu_contiguous(b, "b");
  TORCH_CHECK_VALUE(a.dim() == 2 && b.sizes() == a.sizes(), "gelu_cpu: a and b must be two (rows, columns) tensors "
                    "of one shape, got ", a.sizes(), " and ", b.sizes());
  const int64_t rows = a.size(0), cols = a.size(1), blocks = (rows + kRowsBlock - 1) / kRowsBlock;
  at::Tensor parts = at::empty({std::max<int64_t>(blocks, 1), cols}, a.options());
  float* ap = a.mutable_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* pp = parts.mutable_data_ptr<float>();
  const auto run = FASTMED_KERNEL_AVX512(mul_rows_and_sum);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowsBlock;
      run(ap + r0 * cols, bp + r0 * cols, std::min(kRowsBlock, rows - r0), cols, pp + blk * cols);
    }
  });
  at::Tensor sums = at::zeros({cols}, a.options());
  float* sp = sums.mutable_data_ptr<float>();
  for (int64_t blk = 0; blk < blocks; ++blk) {  // the blocks' sums in block order: the same for any thread count
    for (int64_t c = 0; c < cols; ++c) sp[c] += pp[blk * cols + c];
  }
  return {a, sums};
}

}  // namespace fastmed
