// Run-time choice between the two builds of a CPU kernel header (csrc/<op>_cpu_kernels.h), which the op's .cpp
// includes twice: once in `namespace generic` (baseline x86-64) and, where FASTMED_CPU_AVX2 is defined (GCC on
// x86-64), once in `namespace avx2` under `#pragma GCC target("avx2,fma")`.  FASTMED_KERNEL(fn) is the AVX2 build
// of `fn` when this CPU has AVX2 and FMA, else the generic one.  A .cpp that defines FASTMED_KERNELS_AVX512 before
// including cpu_kernels_twice.h gets a third build, in `namespace avx512` (AVX-512 F/DQ/VL/BW, 512-bit vectors), and
// FASTMED_KERNEL_AVX512(fn) picks it where this CPU has those extensions, else FASTMED_KERNEL(fn).
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

inline bool use_avx512() {
#ifdef FASTMED_CPU_AVX2
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
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
#define FASTMED_KERNEL_AVX512(...) \
  (::fastmed::cpu_dispatch::use_avx512() ? &avx512::__VA_ARGS__ : FASTMED_KERNEL(__VA_ARGS__))
#else
#define FASTMED_KERNEL(...) (&generic::__VA_ARGS__)
#define FASTMED_KERNEL_AVX512(...) FASTMED_KERNEL(__VA_ARGS__)
#endif
