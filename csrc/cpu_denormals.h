// Subnormal float arithmetic off for a scope of a CPU thread: FlushDenormals sets the MXCSR's flush-to-zero and
// denormals-are-zero bits (x86-64; a no-op elsewhere) and restores the thread's previous mode when it goes out of
// scope.  Intel cores take a microcode assist (~100+ cycles) for each SSE/AVX operation with a subnormal input or
// result; the shifted-window softmax makes many (exp of the -100 mask, and the products of those tiny
// probabilities in the backward), which made a 2D Swin block's attention backward ~6x slower on an Ice Lake Xeon.
// The loss kernels likewise: logits ~90 apart give subnormal softmax probabilities (a DiceCE call 5x slower).
// Only values below FLT_MIN (DBL_MIN) in magnitude change: they become zero, far below any tolerance.  Set inside
// each at::parallel_for body: the mode is per thread.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace fastmed {

class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushBits); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushBits = 0x8040u;  // FTZ (bit 15) | DAZ (bit 6)
  unsigned saved_;
#else
  FlushDenormals() = default;
#endif
 public:
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;
};

}  // namespace fastmed
