// LayerNorm over the last dimension of a contiguous float32 CPU tensor, forward only: the Swin blocks of fastmed.nn
// in inference (fastmed/nn/swin.py, _layer_norm; with autograd they run torch's LayerNorm).  One pass per row
// computes its two sums and writes the row (torch's CPU LayerNorm took ~0.12 ms for 3,136 x 96 on 2 threads here,
// several times the cost of reading and writing it).
//
// Three builds of the loop (layer_norm_cpu_kernels.h): baseline x86-64, AVX2 + FMA and AVX-512, chosen at run time.
// Work items are fixed blocks of rows; every row is computed alone, so the results do not depend on the number of
// threads.
#include "cpu_dispatch.h"
#include "fastmed_ext.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace fastmed {
namespace layer_norm_kernels {

constexpr int64_t kRowBlock = 64;  // rows per work item

#define FASTMED_KERNELS_HEADER "layer_norm_cpu_kernels.h"
#define FASTMED_KERNELS_AVX512 1
#include "cpu_kernels_twice.h"

}  // namespace layer_norm_kernels

at::Tensor layer_norm_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, double eps) {
  using namespace layer_norm_kernels;
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
                    "layer_norm_cpu: x must be a contiguous float32 CPU tensor of at least one dimension, got ",
                    x.scalar_type(), " on ", x.device(), x.is_contiguous() ? "" : " (not contiguous)");
  const int64_t C = x.size(-1);
  TORCH_CHECK_VALUE(C >= 1, "layer_norm_cpu: the last dimension of x must not be empty");
  TORCH_CHECK_VALUE(eps >= 0.0, "layer_norm_cpu: eps must be >= 0, got ", eps);
  const float* w = nullptr;
  const float* b = nullptr;
  for (const auto* t : {&weight, &bias}) {
    if (t->has_value() && (*t)->defined()) {
      const at::Tensor& p = **t;
      TORCH_CHECK_VALUE(p.device().is_cpu() && p.scalar_type() == at::kFloat && p.is_contiguous() && p.numel() == C,
                        "layer_norm_cpu: ", t == &weight ? "weight" : "bias",
                        " must be a contiguous float32 CPU tensor of ", C, " values (x's last dimension)");
      (t == &weight ? w : b) = p.data_ptr<float>();
    }
  }
  at::Tensor y = at::empty_like(x);
  const int64_t rows = x.numel() / C;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  const auto run = FASTMED_KERNEL_AVX512(layer_norm_rows);
  at::parallel_for(0, (rows + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock;
      run(xp + r0 * C, w, b, e, C, std::min(kRowBlock, rows - r0), yp + r0 * C);
    }
  });
  return y;
}

}  // namespace fastmed
