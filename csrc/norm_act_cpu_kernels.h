// The inner loops of csrc/norm_act_cpu.cpp on raw pointers, for one work item (a run of one (n, c) plane of a
// contiguous (N, C, S) tensor, or a run of voxels of one sample of a channels-last (N, S, C) tensor).
//
// Included twice by norm_act_cpu.cpp: inside `namespace generic` (the build's default target) and inside
// `namespace avx2` (compiled for AVX2 + FMA, chosen at run time when the CPU has them), both under
// `#pragma GCC optimize("no-trapping-math")` so that the selects of the activations vectorize (the results are
// the same; only floating-point exception flags are not preserved).  It includes nothing and uses `Act`,
// `kChunk` and `Moments` from the enclosing namespace.
//
// Sums over a chunk (at most kChunk values of one plane, or one chunk of voxels) run in T with vector lanes
// (`omp simd reduction`, a fixed order for a given build); chunks are combined in double, in order.  Statistics
// are two-pass per chunk (the chunk is in L1): its mean, then the squared deviations from it, combined with
// Chan's update, so nothing cancels when |mean| >> std.

template <Act A, typename T>
inline T act_forward(T z, T slope) {
  if constexpr (A == Act::Identity) {
    return z;
  } else if constexpr (A == Act::Relu) {
    return z < T(0) ? T(0) : z;  // NaN stays NaN
  } else {
    return z > T(0) ? z : z * slope;
  }
}

// dy * act'(z): the formulas of torch's leaky_relu_backward (relu: slope 0).
template <Act A, typename T>
inline T act_backward(T z, T dy, T slope) {
  if constexpr (A == Act::Identity) {
    return dy;
  } else if constexpr (A == Act::Relu) {
    return z > T(0) ? dy : dy * T(0);
  } else {
    return z > T(0) ? dy : dy * slope;
  }
}

// z = (x - m) * a + b + r[i] (the residual with RES) from the centered value xc = x - m.
template <bool RES, typename T>
inline T pre_activation(T xc, T a, T b, const T* r, int64_t i) {
  T z = xc * a + b;
  if constexpr (RES) z += r[i];
  return z;
}

// Mean and sum of squared deviations of x[0 .. len).
template <typename T>
void stats_contiguous(const T* x, int64_t len, double* mean, double* m2) {
  Moments acc;
  for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
    const int64_t n = len - c0 < kChunk ? len - c0 : kChunk;
    const T* p = x + c0;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += p[i];
    const T mu = s / T(n);
    T d = 0, q = 0;
#pragma omp simd reduction(+ : d, q)
    for (int64_t i = 0; i < n; ++i) {
      const T v = p[i] - mu;
      d += v;
      q += v * v;
    }
    acc.merge(double(n), double(mu) + double(d) / double(n), double(q) - double(d) * double(d) / double(n));
  }
  *mean = acc.mean;
  *m2 = acc.m2;
}

// Per-channel mean and sum of squared deviations over nvox voxels of C channels (x[v * C + c]), in chunks of
// chunk_vox voxels; work: 3 * C values of scratch.
template <typename T>
void stats_channels_last(const T* x, int64_t nvox, int64_t C, int64_t chunk_vox, T* work, double* mean, double* m2) {
  T* s = work;
  T* d = work + C;
  T* q = work + 2 * C;
  double count = 0;
  for (int64_t c = 0; c < C; ++c) mean[c] = m2[c] = 0.0;
  for (int64_t v0 = 0; v0 < nvox; v0 += chunk_vox) {
    const int64_t nv = nvox - v0 < chunk_vox ? nvox - v0 : chunk_vox;
    const T* p = x + v0 * C;
    for (int64_t c = 0; c < C; ++c) s[c] = d[c] = q[c] = T(0);
    for (int64_t v = 0; v < nv; ++v) {
      const T* row = p + v * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) s[c] += row[c];
    }
    const T inv = T(1) / T(nv);
    for (int64_t c = 0; c < C; ++c) s[c] *= inv;  // the chunk means
    for (int64_t v = 0; v < nv; ++v) {
      const T* row = p + v * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T t = row[c] - s[c];
        d[c] += t;
        q[c] += t * t;
      }
    }
    const double nb = double(nv), total = count + nb;
    for (int64_t c = 0; c < C; ++c) {
      const double cm = double(s[c]) + double(d[c]) / nb;
      const double cm2 = double(q[c]) - double(d[c]) * double(d[c]) / nb;
      const double delta = cm - mean[c];
      mean[c] += delta * (nb / total);
      m2[c] += cm2 + delta * delta * (count * nb / total);
    }
    count = total;
  }
}

// y = act((x - m) * a + b + r) over one run of one plane (scalars per plane).
template <typename T, Act A, bool RES>
void apply_contiguous(const T* x, const T* r, T* y, int64_t len, T m, T a, T b, T slope) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    y[i] = act_forward<A>(pre_activation<RES>(x[i] - m, a, b, r, i), slope);
  }
}

// The same over nvox channels-last voxels (per-channel m, a, b, slope).
template <typename T, Act A, bool RES>
void apply_channels_last(const T* x, const T* r, T* y, int64_t nvox, int64_t C, const T* m, const T* a, const T* b,
                         const T* slope) {
  for (int64_t v = 0; v < nvox; ++v) {
    const T* xr = x + v * C;
    T* yr = y + v * C;
    const T* rr = RES ? r + v * C : r;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      yr[c] = act_forward<A>(pre_activation<RES>(xr[c] - m[c], a[c], b[c], rr, c), slope[c]);
    }
  }
}

// Backward sums over one run of one plane: sg += sum g, sgx += sum g * (x - m), sa += sum over z <= 0 of dy * z
// (the prelu slope gradient, with PRELU), where z = (x - m) * a + b + r and g = dy * act'(z).
template <typename T, Act A, bool RES, bool PRELU>
void backward_sums_contiguous(const T* dy, const T* x, const T* r, int64_t len, T m, T a, T b, T slope, double* sg,
                              double* sgx, double* sa) {
  double tg = 0, tgx = 0, ta = 0;
  for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
    const int64_t n = len - c0 < kChunk ? len - c0 : kChunk;
    T s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s1, s2, s3)
    for (int64_t i = c0; i < c0 + n; ++i) {
      const T xc = x[i] - m;
      const T z = pre_activation<RES>(xc, a, b, r, i);
      const T g = act_backward<A>(z, dy[i], slope);
      s1 += g;
      s2 += g * xc;
      if constexpr (PRELU) s3 += z > T(0) ? T(0) : dy[i] * z;
    }
    tg += double(s1);
    tgx += double(s2);
    ta += double(s3);
  }
  *sg = tg;
  *sgx = tgx;
  *sa = ta;
}

// The same per channel over nvox channels-last voxels, in chunks of chunk_vox voxels; work: 3 * C scratch values.
template <typename T, Act A, bool RES, bool PRELU>
void backward_sums_channels_last(const T* dy, const T* x, const T* r, int64_t nvox, int64_t C, int64_t chunk_vox,
                                 const T* m, const T* a, const T* b, const T* slope, T* work, double* sg, double* sgx,
                                 double* sa) {
  T* s1 = work;
  T* s2 = work + C;
  T* s3 = work + 2 * C;
  for (int64_t c = 0; c < C; ++c) sg[c] = sgx[c] = sa[c] = 0.0;
  for (int64_t v0 = 0; v0 < nvox; v0 += chunk_vox) {
    const int64_t nv = nvox - v0 < chunk_vox ? nvox - v0 : chunk_vox;
    for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = s3[c] = T(0);
    for (int64_t v = v0; v < v0 + nv; ++v) {
      const T* xr = x + v * C;
      const T* dr = dy + v * C;
      const T* rr = RES ? r + v * C : r;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T xc = xr[c] - m[c];
        const T z = pre_activation<RES>(xc, a[c], b[c], rr, c);
        const T g = act_backward<A>(z, dr[c], slope[c]);
        s1[c] += g;
        s2[c] += g * xc;
        if constexpr (PRELU) s3[c] += z > T(0) ? T(0) : dr[c] * z;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sg[c] += double(s1[c]);
      sgx[c] += double(s2[c]);
      sa[c] += double(s3[c]);
    }
  }
}

// dx = g * ka - kb - (x - m) * kc and dres = g (with RES) over one run of one plane.
template <typename T, Act A, bool RES>
void backward_apply_contiguous(const T* dy, const T* x, const T* r, T* dx, T* dres, int64_t len, T m, T a, T b,
                               T slope, T ka, T kb, T kc) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const T xc = x[i] - m;
    const T g = act_backward<A>(pre_activation<RES>(xc, a, b, r, i), dy[i], slope);
    dx[i] = g * ka - kb - xc * kc;
    if constexpr (RES) dres[i] = g;
  }
}

// The same per channel over nvox channels-last voxels.
template <typename T, Act A, bool RES>
void backward_apply_channels_last(const T* dy, const T* x, const T* r, T* dx, T* dres, int64_t nvox, int64_t C,
                                  const T* m, const T* a, const T* b, const T* slope, const T* ka, const T* kb,
                                  const T* kc) {
  for (int64_t v = 0; v < nvox; ++v) {
    const T* xr = x + v * C;
    const T* dr = dy + v * C;
    const T* rr = RES ? r + v * C : r;
    T* dxr = dx + v * C;
    T* der = RES ? dres + v * C : dres;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T xc = xr[c] - m[c];
      const T g = act_backward<A>(pre_activation<RES>(xc, a[c], b[c], rr, c), dr[c], slope[c]);
      dxr[c] = g * ka[c] - kb[c] - xc * kc[c];
      if constexpr (RES) der[c] = g;
    }
  }
}
