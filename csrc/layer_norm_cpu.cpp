// LayerNorm over the last dimension of a contiguous float32 CPU tensor, forward and backward: the Swin blocks of
// fastmed.nn (fastmed/nn/swin.py, _layer_norm).  The forward computes a row's two sums (mean, then the squared
// deviations) and writes the row, 4 rows at a time (torch's CPU LayerNorm took ~0.12 ms for 3,136 x 96 on 2 threads
// here, several times the cost of reading and writing it); the backward computes a row's two sums and writes its
// gradient, and adds the rows' weight and bias gradients into one partial per fixed block of rows.
//
// Three builds of the loop (layer_norm_cpu_kernels.h): baseline x86-64, AVX2 + FMA and AVX-512, chosen at run time.
// Work items are fixed blocks of rows; every row is computed alone and the blocks' partials are added in block
// order, so the results do not depend on the number of threads.
#include "cpu_dispatch.h"
#include "fastmed_ext.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastmed {
namespace layer_norm_kernels {

constexpr int64_t kRowBlock = 64;        // rows per work item of the forward
constexpr int64_t kBackwardBlock = 256;  // ... of the backward (one partial of dw and db each)

#define FASTMED_KERNELS_HEADER "layer_norm_cpu_kernels.h"
#define FASTMED_KERNELS_AVX512 1
#include "cpu_kernels_twice.h"

}  // namespace layer_norm_kernels

namespace {

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1 &&
                        x.size(-1) >= 1,
                    "layer_norm_cpu: ", name, " must be a contiguous float32 CPU tensor of at least one dimension "
                    "with a non-empty last one, got ", x.scalar_type(), " on ", x.device(),
                    x.is_contiguous() ? "" : " (not contiguous)");
}

// weight / bias: null, or C contiguous float32 CPU values.
const float* param(const c10::optional<at::Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == C,
                    "layer_norm_cpu: ", name, " must be a contiguous float32 CPU tensor of ", C,
                    " values (x's last dimension)");
  return t->data_ptr<float>();
}

}  // namespace

std::vector<at::Tensor> layer_norm_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, double eps, bool stats) {
  using namespace layer_norm_kernels;
  check_x(x, "x");
  const int64_t C = x.size(-1);
  TORCH_CHECK_VALUE(eps >= 0.0, "layer_norm_cpu: eps must be >= 0, got ", eps);
  const float* w = param(weight, C, "weight");
  const float* b = param(bias, C, "bias");
  const int64_t rows = x.numel() / C;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = stats ? at::empty({rows}, x.options()) : at::Tensor();
  at::Tensor rstd = stats ? at::empty({rows}, x.options()) : at::Tensor();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* mp = stats ? mean.data_ptr<float>() : nullptr;
  float* rp = stats ? rstd.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  const auto run = FASTMED_KERNEL_AVX512(layer_norm_rows);
  at::parallel_for(0, (rows + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kRowBlock;
      run(xp + r0 * C, w, b, e, C, std::min(kRowBlock, rows - r0), yp + r0 * C, stats ? mp + r0 : nullptr,
          stats ? rp + r0 : nullptr);
    }
  });
  return {y, mean, rstd};
}

std::vector<at::Tensor> layer_norm_backward_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                                const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                                bool need_dx, bool need_dw, bool need_db,
                                                const c10::optional<at::Tensor>& residual_grad) {
  using namespace layer_norm_kernels;
  check_x(x, "x");
  check_x(dy, "dy");
  const int64_t C = x.size(-1), rows = x.numel() / C;
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "layer_norm_cpu: dy must have x's shape ", x.sizes(), ", got ",
                    dy.sizes());
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                          t->numel() == rows,
                      "layer_norm_cpu: mean and rstd must be contiguous float32 CPU tensors of ", rows,
                      " values (x's rows)");
  }
  const float* w = param(weight, C, "weight");
  const float* add = nullptr;
  if (residual_grad.has_value() && residual_grad->defined()) {
    check_x(*residual_grad, "residual_grad");
    TORCH_CHECK_VALUE(residual_grad->sizes() == x.sizes(), "layer_norm_cpu: residual_grad must have x's shape ",
                      x.sizes(), ", got ", residual_grad->sizes());
    TORCH_CHECK_VALUE(need_dx, "layer_norm_cpu: residual_grad is added to dx, so need_dx must be true");
    add = residual_grad->data_ptr<float>();
  }
  at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
  const int64_t blocks = (rows + kBackwardBlock - 1) / kBackwardBlock;
  // per block: the sums of dy x^ and of dy over its rows, added in block order below (any number of threads)
  at::Tensor parts = need_dw || need_db ? at::zeros({blocks, 2, C}, x.options()) : at::Tensor();
  const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>();
  const float *mp = mean.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  float* dxp = need_dx ? dx.data_ptr<float>() : nullptr;
  float* pp = parts.defined() ? parts.data_ptr<float>() : nullptr;
  const auto run = FASTMED_KERNEL_AVX512(layer_norm_backward_rows);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * kBackwardBlock;
      float* part = pp != nullptr ? pp + blk * 2 * C : nullptr;
      run(dyp + r0 * C, xp + r0 * C, mp + r0, rp + r0, w, C, std::min(kBackwardBlock, rows - r0),
          dxp != nullptr ? dxp + r0 * C : nullptr, need_dw ? part : nullptr, need_db ? part + C : nullptr,
          add != nullptr ? add + r0 * C : nullptr);
    }
  });
  at::Tensor dw, db;
  if (parts.defined()) {
    float* p = pp;
    for (int64_t blk = 1; blk < blocks; ++blk) {  // in block order
      const float* q = pp + blk * 2 * C;
      for (int64_t i = 0; i < 2 * C; ++i) p[i] += q[i];
    }
    if (need_dw) dw = parts[0][0].clone();
    if (need_db) db = parts[0][1].clone();
  }
  return {dx, dw, db};
}

}  // namespace fastmed
