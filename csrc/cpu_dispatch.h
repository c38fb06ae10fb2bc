// Run-time choice between the two builds of a CPU kernel header (csrc/<op>_cpu_kernels.h), which the op's .cpp
// includes twice: once in `namespace generic` (baseline x86-64) and, where FASTMED_CPU_AVX2 is defined (GCC on
// x86-64), once in `namespace avx2` under `#pragma GCC target("avx2,fma")`.  FASTMED_KERNEL(fn) is the AVX2 build
// of `fn` when this CPU has AVX2 and FMA, else the generic one.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTMED_CPU_AVX2 1
#endif

namespace fastmed {
namespace cpu_dispatch {

inline bool use_avx2() {
#ifdef FASTMED_CPU_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace cpu_dispatch
}  // namespace fastmed

#ifdef FASTMED_CPU_AVX2
#define FASTMED_KERNEL(...) \
  (::fastmed::cpu_dispatch::use_avx2() ? &avx2::__VA_ARGS__ : &generic::__VA_ARGS__)
#else
#define FASTMED_KERNEL(...) (&generic::__VA_ARGS__)
#endif
