// Per-line steps of the CUDA distance transform (csrc/distance_transform_cuda.cu), one call per thread, and the
// plan that bounds its scratch memory.
//
// They depend on nothing but the C++ standard library, so the CPU test suite compiles them with nvcc into a host
// program that replays the kernels' index mapping and chunking, distances and feature transform, and checks it
// against scipy and the tie rule (tests/test_distance_transform.py) without a GPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FASTMED_HD __host__ __device__ __forceinline__
#else
#define FASTMED_HD inline
#endif

namespace fastmed {

// Scratch budget of an envelope pass, in entries (an entry is an int32 root and its W value): one launch covers
// at most this many entries' worth of lines, so the scratch is at most 64 Mi * 12 bytes = 768 MiB whatever the
// size of the batch (it used to be one entry per voxel: 8-12 bytes a voxel).
constexpr int64_t kDtScratchEntries = int64_t(1) << 26;
// With the feature transform an entry also holds its root's int64 nearest-zero index (up to 20 bytes): half as
// many entries, 640 MiB at most.
constexpr int64_t kDtIndexScratchEntries = kDtScratchEntries / 2;

// Lines of length n handled by one envelope launch when `lines` lines are to be done within `budget` entries of
// scratch (n entries a line): at least one line, at most all of them.
inline int64_t dt_lines_per_launch(int64_t lines, int64_t n, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(lines, budget / std::max<int64_t>(n, 1)));
}

template <typename O>
FASTMED_HD O dt_finish(double d2, bool take_sqrt) {
  return static_cast<O>(take_sqrt ? std::sqrt(d2) : d2);
}

// Pass 1 of one line of the last axis: squared distance (spacing s) to the nearest zero of the line, +inf when
// the line has none; o doubles as storage for the left-to-right sweep.  With idx (nullptr without the feature
// transform): the flat index within its map of that zero (base = the flat index of the line's first voxel),
// the left zero on a tie, -1 when none; idx doubles as storage for the left zeros.
template <typename O>
FASTMED_HD void dt_line_pass(const uint8_t* m, O* o, int64_t n, double s, bool take_sqrt, int64_t* idx = nullptr,
                             int64_t base = 0) {
  double d = INFINITY;  // voxels since the last zero on the left
  int64_t z = -1;       // that zero
  for (int64_t i = 0; i < n; ++i) {
    d = m[i] ? d + 1.0 : 0.0;
    o[i] = static_cast<O>(d);
    if (idx != nullptr) {
      z = m[i] ? z : i;
      idx[i] = z;
    }
  }
  d = INFINITY;
  z = -1;
  for (int64_t i = n - 1; i >= 0; --i) {
    d = m[i] ? d + 1.0 : 0.0;
    const double left = static_cast<double>(o[i]);
    const bool take_left = left <= d;
    const double k = (take_left ? left : d) * s;
    o[i] = dt_finish<O>(k * k, take_sqrt);
    if (idx != nullptr) {
      z = m[i] ? z : i;
      const int64_t zero = take_left ? idx[i] : z;
      idx[i] = zero < 0 ? -1 : base + zero;
    }
  }
}

// Abscissa where the parabolas w (x - p)^2 + fp and w (x - q)^2 + fq (q > p) meet.
FASTMED_HD double dt_meet(int64_t p, double fp, int64_t q, double fq, double w) {
  return ((fq + w * static_cast<double>(q * q)) - (fp + w * static_cast<double>(p * p))) /
         (2.0 * w * static_cast<double>(q - p));
}

// One line of an envelope pass: g(q) = min_p w (q - p)^2 + f(p) over the finite f(p) (Felzenszwalb-Huttenlocher).
// f, g: the line in the source and destination (element q at q * stride; g may equal f).
// v, fv: scratch for the envelope's roots and their values, entry k at k * sstride, n entries each.  The
// breakpoints between envelope parabolas are recomputed from (v, fv) rather than stored.
// idx, iv (nullptr without the feature transform): the nearest-zero indices of the line, updated in place
// (element q at q * stride), and scratch for the index of each envelope root.  idx[q] becomes the index of the
// root that wins at q: a parabola is popped when the next one meets it at or before its own breakpoint, and a
// breakpoint at q keeps the earlier root, so on a tie the smallest root wins (exact for unit spacing, where the
// meeting points are quotients of integers).  Voxels with f = 0 are zeros and keep their own index.
template <typename W, typename O>
FASTMED_HD void dt_envelope_line(const W* f, O* g, int64_t stride, int64_t n, int32_t* v, W* fv, int64_t sstride,
                                 double w, bool take_sqrt, bool in_place, int64_t* idx = nullptr,
                                 int64_t* iv = nullptr) {
  int64_t lo = 0;
  while (lo < n && f[lo * stride] == W(0)) ++lo;
  if (lo == n) {  // background only
    if (!in_place)
      for (int64_t q = 0; q < n; ++q) g[q * stride] = O(0);
    return;
  }
  int64_t hi = n - 1;
  while (f[hi * stride] == W(0)) --hi;
  // Parabolas beyond the zero next to the foreground span cannot undercut the one rooted at that zero.
  const int64_t a = lo > 0 ? lo - 1 : lo;
  const int64_t b = hi < n - 1 ? hi + 1 : hi;

  int64_t k = -1;
  double ztop = -INFINITY;  // breakpoint where the top parabola of the envelope starts
  for (int64_t q = a; q <= b; ++q) {
    const W fq = f[q * stride];
    if (std::isinf(static_cast<double>(fq))) continue;
    if (k < 0) {
      k = 0;
      v[0] = static_cast<int32_t>(q);
      fv[0] = fq;
      if (idx != nullptr) iv[0] = idx[q * stride];
      ztop = -INFINITY;
      continue;
    }
    double s;
    while (true) {  // terminates: the bottom parabola starts at -inf
      s = dt_meet(v[k * sstride], fv[k * sstride], q, fq, w);
      if (s > ztop) break;
      --k;
      ztop = k == 0 ? -INFINITY
                    : dt_meet(v[(k - 1) * sstride], fv[(k - 1) * sstride], v[k * sstride], fv[k * sstride], w);
    }
    ++k;
    v[k * sstride] = static_cast<int32_t>(q);
    fv[k * sstride] = fq;
    if (idx != nullptr) iv[k * sstride] = idx[q * stride];
    ztop = s;
  }

  if (!in_place) {
    for (int64_t q = 0; q < lo; ++q) g[q * stride] = O(0);
    for (int64_t q = hi + 1; q < n; ++q) g[q * stride] = O(0);
  }
  if (k < 0) {  // no finite value on the line: the map has no zero voxel
    for (int64_t q = lo; q <= hi; ++q) {
      g[q * stride] = static_cast<O>(INFINITY);
      if (idx != nullptr) idx[q * stride] = -1;
    }
    return;
  }
  int64_t j = 0;
  double znext = k > 0 ? dt_meet(v[0], fv[0], v[sstride], fv[sstride], w) : INFINITY;
  for (int64_t q = lo; q <= hi; ++q) {
    while (znext < static_cast<double>(q)) {
      ++j;
      znext = j < k ? dt_meet(v[j * sstride], fv[j * sstride], v[(j + 1) * sstride], fv[(j + 1) * sstride], w)
                    : INFINITY;
    }
    const double d = static_cast<double>(q - v[j * sstride]);
    g[q * stride] = dt_finish<O>(w * d * d + static_cast<double>(fv[j * sstride]), take_sqrt);
    if (idx != nullptr) idx[q * stride] = iv[j * sstride];
  }
}

}  // namespace fastmed
