// The two builds of a CPU kernel header (see cpu_dispatch.h): define FASTMED_KERNELS_HEADER as its quoted name, then
// include this file where the kernels belong.  It includes that header in `namespace generic` (baseline x86-64) and,
// where FASTMED_CPU_AVX2 is defined, again in `namespace avx2` under `#pragma GCC target("avx2,fma")`; both without
// trapping-math, so the per-voxel loops vectorize; a .cpp that defines FASTMED_KERNELS_AVX512 first also gets an
// AVX-512 build in `namespace avx512` (FASTMED_KERNEL_AVX512 picks it).  No include guard: one inclusion per kernel
// header.
#include "cpu_dispatch.h"

#ifndef FASTMED_KERNELS_HEADER
#error "define FASTMED_KERNELS_HEADER (the kernel header's quoted name) before including cpu_kernels_twice.h"
#endif

namespace generic {
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#pragma GCC diagnostic push
// 32-byte vector values passed between the (always inlined) helpers: GCC's note that their ABI differs without AVX
// concerns calls across builds, which never happen here
#pragma GCC diagnostic ignored "-Wpsabi"
#include FASTMED_KERNELS_HEADER
#pragma GCC diagnostic pop
#pragma GCC pop_options
}  // namespace generic

#ifdef FASTMED_CPU_AVX2
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("no-trapping-math")
#include FASTMED_KERNELS_HEADER
#pragma GCC pop_options
}  // namespace avx2

#ifdef FASTMED_KERNELS_AVX512  // opted in by the including .cpp: a third build (see cpu_dispatch.h)
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")
#pragma GCC optimize("no-trapping-math")
#include FASTMED_KERNELS_HEADER
#pragma GCC pop_options
}  // namespace avx512
#endif
#endif

#undef FASTMED_KERNELS_HEADER
#undef FASTMED_KERNELS_AVX512
