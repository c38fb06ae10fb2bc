// The inner loops of csrc/gelu_cpu.cpp on raw float32 pointers: the exact (erf) GELU with its derivative, and the
// backward's product with that derivative together with its column sums.
//
// Included by gelu_cpu.cpp once per build (see there): it includes cpu_math_f32.h and nothing else.
//
// The normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2 in two pieces, both computed and one selected (so the loop
// vectorizes), in terms of x and w = x^2 / 2 (no rounded 1 / sqrt 2, whose float32 value would bias every
// result): for w < 1, erf(x / sqrt 2) = x (a0 + w P(w)) (a0 = sqrt(2 / pi) as hi + lo, P of degree 5); for w >= 1,
// Phi(-|x|) = exp(-w) s Q(s) / 2 with s = 1 / |x| (Q of degree 9, fitted on 1 <= w <= 16; beyond,
// Phi(-|x|) < 2e-8).  The coefficients are least-squares fits of the relative error on Chebyshev nodes (<= 2e-9
// and <= 7e-9), each rounded to float32 before the higher ones are refitted.  In float32 the GELU and its
// derivative are within 1.7e-7 of exact for |x| <= 1.4 and their errors average out (mean error over an interval
// <= 5e-9, as torch's GELU; torch's GELU derivative and Abramowitz & Stegun 7.1.26 are biased by ~2e-8, enough
// to show in summed gradients).  The same exp(-w) gives the normal density exp(-x^2 / 2) / sqrt(2 pi).
#include "cpu_math_f32.h"

// exp(-w) for w >= 0 (exp_f32_normal, ~1 ulp), 0 beyond w = 87 (below FLT_MIN); NaN passes through.
FASTMED_INLINE float exp_neg(float w) { return w > 87.0f ? 0.0f : exp_f32_normal(w > 87.0f ? -87.0f : -w); }

// x[i] -> y[i] = gelu(x[i]) = x Phi(x), and x[i] overwritten with gelu'(x[i]) = Phi(x) + x phi(x).
// NaN stays NaN; gelu(+inf) = +inf, gelu(-inf) and the derivatives at +-inf are NaN (inf * 0), as torch's.
inline void gelu_and_derivative_run(float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float w = 0.5f * (v * v);
    float p = 5.546254033e-05f;
    p = p * w - 5.662201438e-04f;
    p = p * w + 3.668553429e-03f;
    p = p * w - 1.898849569e-02f;
    p = p * w + 7.978702337e-02f;
    p = p * w - 2.659614384e-01f;
    const float erf_small = v * 7.978845835e-01f + v * (p * w - 2.267034027e-08f);
    const float cdf_small = 0.5f + 0.5f * erf_small;
    const float s = 1.0f / (w < 1.0f ? 1.41421356f : __builtin_fabsf(v));  // NaN passes through
    float q = -1.499041319e+00f;
    q = q * s + 7.203809738e+00f;
    q = q * s - 1.532775784e+01f;
    q = q * s + 1.876405334e+01f;
    q = q * s - 1.410695648e+01f;
    q = q * s + 6.012797832e+00f;
    q = q * s - 5.793162584e-01f;
    q = q * s - 7.406494021e-01f;
    q = q * s - 3.166032489e-03f;
    q = q * s + 7.979581356e-01f;
    const float e = exp_neg(w);
    const float tail = 0.5f * (e * s * q);  // Phi(-|x|)
    const float cdf = w < 1.0f ? cdf_small : (v > 0.0f ? 1.0f - tail : tail);
    y[i] = v * cdf;
    const float ve = v * e;
    x[i] = cdf + (ve * 3.989422917e-01f + ve * -1.133517014e-08f);  // 1 / sqrt(2 pi) as hi + lo
  }
}

// a[r, :] *= b[r, :] for the rows [0, rows) of `cols` values, and sums[c] = the sum over those rows of the products
// in column c (row after row: one order for a given block of rows).
inline void mul_rows_and_sum(float* __restrict a, const float* __restrict b, int64_t rows, int64_t cols,
                             float* __restrict sums) {
  for (int64_t c = 0; c < cols; ++c) sums[c] = 0.0f;
  for (int64_t r = 0; r < rows; ++r) {
    float* ar = a + r * cols;
    const float* br = b + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const float v = ar[c] * br[c];
      ar[c] = v;
      sums[c] += v;
    }
  }
}
