// Branch-free float32 math that vectorizes, shared by the CPU kernel headers (csrc/*_cpu_kernels.h).
//
// Like those headers it has no include guard and includes nothing: each kernel header includes it once per build
// (inside `namespace generic` and `namespace avx2`, see cpu_kernels_twice.h), so each build gets its own copy.

#define FASTMED_INLINE inline __attribute__((always_inline))

// exp(xc - n ln 2) for n = t - 1.5 * 2^23 (t = xc / ln 2 + 1.5 * 2^23, rounded: n = round(xc / ln 2)): Cephes expf's
// range reduction by ln 2 and degree-6 polynomial.
FASTMED_INLINE float exp_f32_mantissa(float xc, float t) {
  const float n = t - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

FASTMED_INLINE float exp_f32(float x) {  // Cephes expf: ~1 ulp
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);  // NaN passes through (selected below)
  const float t = xc * 1.44269504088896341f + 12582912.0f;            // round(x / ln 2) in the low bits of t
  const float p = exp_f32_mantissa(xc, t);
  const int32_t ni = __builtin_bit_cast(int32_t, t) - 0x4B400000;  // n as an integer, in [-150, 129]
  const int32_t n1 = ni >> 1, n2 = ni - n1;                          // 2^n = 2^n1 * 2^n2, both normal floats
  const float s1 = __builtin_bit_cast(float, (n1 + 127) << 23);
  const float s2 = __builtin_bit_cast(float, (n2 + 127) << 23);
  const float y = p * s1 * s2;
  return x != x ? x : y;
}

// exp_f32(x) for x in [-86.8, 88] (callers clamp), where 2^n is one normal float: one scale instead of two and no
// clamp or NaN select (a NaN x gives a NaN polynomial, hence a NaN product).  The same value as exp_f32 there
// (p * 2^n is exact either way).
FASTMED_INLINE float exp_f32_normal(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const int32_t ni = __builtin_bit_cast(int32_t, t) - 0x4B400000;
  return exp_f32_mantissa(x, t) * __builtin_bit_cast(float, (ni + 127) << 23);
}
