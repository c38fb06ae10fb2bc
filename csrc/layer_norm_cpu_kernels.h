// The per-row loop of csrc/layer_norm_cpu.cpp on raw float32 pointers (included once per build, see
// cpu_kernels_twice.h).  A row's sums are 8-lane vector accumulations over its whole vectors, reduced by halves, then
// its tail values added in order: a fixed order for any number of threads.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_math_f32.h"  // FASTMED_INLINE
#include "cpu_vec.h"       // Vec, load_vec, store_vec, lanes_sum

// R rows of x (C values each) -> y = (x - mean) * rstd * weight + bias, the mean and the biased variance of each row
// in two passes (the deviations' squares summed, no cancellation), rstd = 1 / sqrt(var + eps); weight and bias may
// be null (1 and 0).  The R rows' sums are independent chains (a row alone is a chain of dependent adds, then a
// square root and a division).  NaN in a row makes that row NaN.
template <int R>
FASTMED_INLINE void layer_norm_block(const float* __restrict x, const float* __restrict weight,
                                     const float* __restrict bias, float eps, int64_t C, float* __restrict y,
                                     float* __restrict mean_out, float* __restrict rstd_out) {
  const int64_t cv = C / 8 * 8;
  float mean[R], rstd[R];
  Vec<float> acc[R] = {};
  for (int64_t c = 0; c < cv; c += 8) {
    for (int r = 0; r < R; ++r) acc[r] += load_vec<float>(x + r * C + c);
  }
  for (int r = 0; r < R; ++r) {
    float s = lanes_sum<float>(acc[r]);
    for (int64_t c = cv; c < C; ++c) s += x[r * C + c];
    mean[r] = s / static_cast<float>(C);
    acc[r] = Vec<float>{};
  }
  for (int64_t c = 0; c < cv; c += 8) {
    for (int r = 0; r < R; ++r) {
      const Vec<float> d = load_vec<float>(x + r * C + c) - mean[r];
      acc[r] += d * d;
    }
  }
  for (int r = 0; r < R; ++r) {
    float v = lanes_sum<float>(acc[r]);
    for (int64_t c = cv; c < C; ++c) v += (x[r * C + c] - mean[r]) * (x[r * C + c] - mean[r]);
    rstd[r] = 1.0f / std::sqrt(v / static_cast<float>(C) + eps);
    if (mean_out != nullptr) {
      mean_out[r] = mean[r];
      rstd_out[r] = rstd[r];
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    for (int64_t c = 0; c < cv; c += 8) {
      Vec<float> o = (load_vec<float>(xr + c) - mean[r]) * rstd[r];
      if (weight != nullptr) o = o * load_vec<float>(weight + c);
      if (bias != nullptr) o = o + load_vec<float>(bias + c);
      store_vec<float>(yr + c, o);
    }
    for (int64_t c = cv; c < C; ++c) {
      float o = (xr[c] - mean[r]) * rstd[r];
      if (weight != nullptr) o = o * weight[c];
      if (bias != nullptr) o = o + bias[c];
      yr[c] = o;
    }
  }
}

// Rows [0, rows): 4 at a time, then one by one (a row's values do not depend on its block); each row's mean and
// rstd into mean / rstd when they are not null (the backward's).
inline void layer_norm_rows(const float* __restrict x, const float* __restrict weight, const float* __restrict bias,
                            float eps, int64_t C, int64_t rows, float* __restrict y, float* __restrict mean,
                            float* __restrict rstd) {
  const bool stats = mean != nullptr;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    layer_norm_block<4>(x + r * C, weight, bias, eps, C, y + r * C, stats ? mean + r : nullptr,
                        stats ? rstd + r : nullptr);
  }
  for (; r < rows; ++r) {
    layer_norm_block<1>(x + r * C, weight, bias, eps, C, y + r * C, stats ? mean + r : nullptr,
                        stats ? rstd + r : nullptr);
  }
}

// The backward of rows [0, rows): with x^ = (x - mean) rstd and g = dy * weight (dy without a weight),
// dx = rstd (g - mean(g) - x^ mean(g x^)) (when dx is not null; plus `add`'s row when that is not null: the
// gradient x receives from elsewhere, a residual connection's), and the rows' sums of dy x^ and of dy added to
// dw_part and db_part (C values each, this block's; when not null), row after row: a fixed order.
inline void layer_norm_backward_rows(const float* __restrict dy, const float* __restrict x,
                                     const float* __restrict mean, const float* __restrict rstd,
                                     const float* __restrict weight, int64_t C, int64_t rows, float* __restrict dx,
                                     float* __restrict dw_part, float* __restrict db_part,
                                     const float* __restrict add) {
  const int64_t cv = C / 8 * 8;
  const float inv_c = 1.0f / static_cast<float>(C);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    const float* dyr = dy + r * C;
    const float m = mean[r], rs = rstd[r];
    const Vec<float> mv = Vec<float>{} + m, rv = Vec<float>{} + rs;
    if (dw_part != nullptr || db_part != nullptr) {
      for (int64_t c = 0; c < cv; c += 8) {
        const Vec<float> d = load_vec<float>(dyr + c);
        if (dw_part != nullptr) store_vec<float>(dw_part + c, load_vec<float>(dw_part + c) + d * ((load_vec<float>(xr + c) - mv) * rv));
        if (db_part != nullptr) store_vec<float>(db_part + c, load_vec<float>(db_part + c) + d);
      }
      for (int64_t c = cv; c < C; ++c) {
        if (dw_part != nullptr) dw_part[c] += dyr[c] * ((xr[c] - m) * rs);
        if (db_part != nullptr) db_part[c] += dyr[c];
      }
    }
    if (dx == nullptr) continue;
    Vec<float> sg = {}, sgx = {};
    for (int64_t c = 0; c < cv; c += 8) {
      Vec<float> g = load_vec<float>(dyr + c);
      if (weight != nullptr) g = g * load_vec<float>(weight + c);
      sg += g;
      sgx += g * ((load_vec<float>(xr + c) - mv) * rv);
    }
    float a = lanes_sum<float>(sg), b = lanes_sum<float>(sgx);
    for (int64_t c = cv; c < C; ++c) {
      const float g = weight != nullptr ? dyr[c] * weight[c] : dyr[c];
      a += g;
      b += g * ((xr[c] - m) * rs);
    }
    a *= inv_c;
    b *= inv_c;
    const Vec<float> av = Vec<float>{} + a, bv = Vec<float>{} + b;
    float* dxr = dx + r * C;
    const float* addr = add != nullptr ? add + r * C : nullptr;
    for (int64_t c = 0; c < cv; c += 8) {
      Vec<float> g = load_vec<float>(dyr + c);
      if (weight != nullptr) g = g * load_vec<float>(weight + c);
      const Vec<float> d = rv * (g - av - ((load_vec<float>(xr + c) - mv) * rv) * bv);
      store_vec<float>(dxr + c, addr != nullptr ? load_vec<float>(addr + c) + d : d);
    }
    for (int64_t c = cv; c < C; ++c) {
      const float g = weight != nullptr ? dyr[c] * weight[c] : dyr[c];
      const float d = rs * (g - a - ((xr[c] - m) * rs) * b);
      dxr[c] = addr != nullptr ? addr[c] + d : d;
    }
  }
}
