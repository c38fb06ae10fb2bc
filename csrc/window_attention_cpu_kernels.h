// The per-(window, head) work of csrc/window_attention_cpu.cpp: gather, scores, softmax, products, scatter.
//
// Included twice by window_attention_cpu.cpp, like the other kernel headers (see cpu_kernels_twice.h): inside
// `namespace generic` and inside `namespace avx2`.  It uses Geometry, Scratch and kMaskValue from the enclosing
// namespace.  Every product is `rows_times`: output rows of W values (a multiple of the vector width), each the sum
// of K rows of a matrix scaled by K coefficients, with up to 8 vectors of sums (two rows of up to 4, or one row of
// up to 8) in registers, enough independent chains to cover the FMA latency: a (window, head)'s 49 x 49 x 32
// products run from the L1 cache at close to the FMA rate.  Nothing in here depends
// on the thread that runs it: a (window, head) is always computed the same way.
#include "cpu_math_f32.h"  // exp_f32, FASTMED_INLINE

template <typename T>
struct VecOf;  // 32 bytes of T as one value (GCC vector extension): 2 SSE registers in the baseline build, 1 AVX one
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename T>
using Vec = typename VecOf<T>::type;

template <typename T>
constexpr int64_t kLanesOf = 32 / static_cast<int64_t>(sizeof(T));

// R rows of NV vectors: out[r * ldo + 0:NV*L] = sum_k a[r * ar + k * as] * B[k * ldb + 0:NV*L], the R x NV sums in
// registers (independent chains: enough of them to cover the FMA latency).
template <typename T, int NV, int R>
FASTMED_INLINE void rows_times_block(const T* a, int64_t as, int64_t ar, int64_t K, const T* B, int64_t ldb, T* out,
                                     int64_t ldo) {
  Vec<T> acc[R][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    T x[R];
    for (int r = 0; r < R; ++r) x[r] = a[r * ar + k * as];
    const Vec<T>* b = reinterpret_cast<const Vec<T>*>(B + k * ldb);
    for (int v = 0; v < NV; ++v) {
      const Vec<T> bv = b[v];
      for (int r = 0; r < R; ++r) acc[r][v] += x[r] * bv;
    }
  }
  for (int r = 0; r < R; ++r) {
    Vec<T>* o = reinterpret_cast<Vec<T>*>(out + r * ldo);
    for (int v = 0; v < NV; ++v) o[v] = acc[r][v];
  }
}

// Rows [0, rows) of width NV vectors: pairs of rows when NV <= 4 (8 chains), single rows otherwise.
template <typename T, int NV>
FASTMED_INLINE void rows_times_fixed(const T* a, int64_t as, int64_t ar, int64_t rows, int64_t K, const T* B,
                                     int64_t ldb, T* out, int64_t ldo) {
  int64_t r = 0;
  if constexpr (NV <= 4) {
    for (; r + 2 <= rows; r += 2) rows_times_block<T, NV, 2>(a + r * ar, as, ar, K, B, ldb, out + r * ldo, ldo);
  }
  for (; r < rows; ++r) rows_times_block<T, NV, 1>(a + r * ar, as, ar, K, B, ldb, out + r * ldo, ldo);
}

// out (rows x W) = A (rows x K) B (K x W), A read as a[r * ar + k * as] (any strides: rows of a matrix or of its
// transpose), B rows and out rows 32-byte aligned, W a multiple of the lanes; columns in chunks of <= 8 vectors.
template <typename T>
inline void rows_times(const T* a, int64_t as, int64_t ar, int64_t rows, int64_t K, const T* B, int64_t ldb,
                       int64_t W, T* out, int64_t ldo) {
  constexpr int64_t L = kLanesOf<T>;
  for (int64_t c = 0; c < W; c += 8 * L) {
    const int64_t nv = std::min<int64_t>(8, (W - c) / L);
    const T* b = B + c;
    T* o = out + c;
    switch (nv) {
      case 1: rows_times_fixed<T, 1>(a, as, ar, rows, K, b, ldb, o, ldo); break;
      case 2: rows_times_fixed<T, 2>(a, as, ar, rows, K, b, ldb, o, ldo); break;
      case 3: rows_times_fixed<T, 3>(a, as, ar, rows, K, b, ldb, o, ldo); break;
      case 4: rows_times_fixed<T, 4>(a, as, ar, rows, K, b, ldb, o, ldo); break;
      case 5: rows_times_fixed<T, 5>(a, as, ar, rows, K, b, ldb, o, ldo); break;
      case 6: rows_times_fixed<T, 6>(a, as, ar, rows, K, b, ldb, o, ldo); break;
      case 7: rows_times_fixed<T, 7>(a, as, ar, rows, K, b, ldb, o, ldo); break;
      default: rows_times_fixed<T, 8>(a, as, ar, rows, K, b, ldb, o, ldo); break;
    }
  }
}

// exp(z) for the softmax of z = s - max <= 0: float32 clamps z at log(FLT_MIN) + 0.5, so that the -100 of the shift
// mask gives ~2e-38 instead of a subnormal (which costs the CPU ~20x per operation); no float32 result changes.
// NaN stays NaN.
FASTMED_INLINE float softmax_exp(float z) { return exp_f32(z < -86.8f ? -86.8f : z); }
inline double softmax_exp(double z) { return std::exp(z); }

// The grid rows of the n tokens of window `win` (-1 for a padding token) and their shift regions.
inline void window_tokens(const Geometry& g, int64_t win, int64_t* rows, int32_t* region) {
  const int64_t b = win / g.per_batch;
  int64_t cell = win % g.per_batch;
  int64_t c[3];
  for (int a = 2; a >= 0; --a) {
    c[a] = cell % g.cells[a];
    cell /= g.cells[a];
  }
  int64_t t = 0;
  for (int64_t o0 = 0; o0 < g.window[0]; ++o0) {
    for (int64_t o1 = 0; o1 < g.window[1]; ++o1) {
      for (int64_t o2 = 0; o2 < g.window[2]; ++o2, ++t) {
        const int64_t o[3] = {o0, o1, o2};
        int64_t p[3];
        bool real = true;
        int32_t rid = 0;
        for (int a = 0; a < 3; ++a) {
          const int64_t r = c[a] * g.window[a] + o[a];  // the rolled (shifted) frame
          const int64_t q = r + g.shift[a];             // the grid position it reads: (r + shift) mod padded
          p[a] = q >= g.padded[a] ? q - g.padded[a] : q;
          real = real && p[a] < g.grid[a];
          const int32_t id = g.shift[a] > 0 ? int32_t(r >= g.padded[a] - g.window[a]) +
                                                  int32_t(r >= g.padded[a] - g.shift[a])
                                            : 0;
          rid = rid * 3 + id;
        }
        rows[t] = real ? ((b * g.grid[0] + p[0]) * g.grid[1] + p[1]) * g.grid[2] + p[2] : -1;
        region[t] = rid;
      }
    }
  }
}

// Copies the window's token rows (width values each) of `src` into x (n rows of `width`): real tokens from their grid
// rows (whole contiguous rows: streaming reads), padding tokens from `pad` (zeros when null).
template <typename T>
inline void gather_rows(const T* src, int64_t width, const T* pad, const int64_t* rows, int64_t n, T* x) {
  for (int64_t t = 0; t < n; ++t) {
    const T* from = rows[t] >= 0 ? src + rows[t] * width : pad;
    T* to = x + t * width;
    if (from != nullptr) {
      std::memcpy(to, from, sizeof(T) * width);
    } else {
      std::memset(to, 0, sizeof(T) * width);
    }
  }
}

// Asks for the window's token rows of `src` (and `count` values from `extra`, when given) to be brought to the cache
// while the current window is computed (the gathers are otherwise waits on memory).
template <typename T>
inline void prefetch_rows(const T* src, int64_t width, const int64_t* rows, int64_t n, const T* extra, int64_t count) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < n; ++t) {
    if (rows[t] < 0) continue;
    const T* row = src + rows[t] * width;
    for (int64_t e = 0; e < width; e += kLine) __builtin_prefetch(row + e, 0, 2);
  }
  for (int64_t e = 0; e < count; e += kLine) __builtin_prefetch(extra + e, 0, 2);
}

// The columns [offset, offset + d) of the window's rows x (n x width) as rows (n x dp, times `mul`) or, with
// `transposed`, as columns (dp x np); padded lanes are left as they are (zero from Scratch).
template <typename T>
inline void load_part(const Geometry& g, const T* x, int64_t width, int64_t offset, T mul, bool transposed, T* dst) {
  const int64_t d = g.head_dim;
  for (int64_t t = 0; t < g.n; ++t) {
    const T* from = x + t * width + offset;
    if (transposed) {
      for (int64_t e = 0; e < d; ++e) dst[e * g.np + t] = from[e] * mul;
    } else {
      T* y = dst + t * g.dp;
#pragma omp simd
      for (int64_t e = 0; e < d; ++e) y[e] = from[e] * mul;
    }
  }
}

// Adds the bias row and the shift mask to row i of the scores s = q k^T (the first n values of `row`); returns the
// row's maximum.
template <typename T>
inline T scores_row(const Geometry& g, const T* bias_row, const int32_t* region, int64_t i, T* row) {
  const int64_t n = g.n;
  if (bias_row != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] += bias_row[j];
  }
  if (g.shifted) {
    const int32_t ri = region[i];
    for (int64_t j = 0; j < n; ++j) row[j] += region[j] != ri ? T(kMaskValue) : T(0);
  }
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = row[j] > m ? row[j] : m;  // a NaN score makes its row NaN via exp(NaN - m)
  return m;
}

// The forward of windows [w0, w1), every head: out rows of the real tokens, and the probabilities
// (saved (windows, heads, n, n)) or the log-sum-exp (saved (windows, n, heads)), window `win` at slots[win].
template <typename T>
void forward_windows(const Geometry& g, const T* qkv, const T* bias, const T* pad, T* out, T* saved,
                     const int64_t* slots, bool probs, int64_t w0, int64_t w1, Scratch<T>& s) {
  const int64_t n = g.n, np = g.np, dp = g.dp, d = g.head_dim, C = g.channels;
  if (w0 < w1) window_tokens(g, w0, s.next_rows, s.next_region);
  for (int64_t win = w0; win < w1; ++win) {
    std::swap(s.rows, s.next_rows);
    std::swap(s.region, s.next_region);
    gather_rows(qkv, 3 * C, pad, s.rows, n, s.x);
    if (win + 1 < w1) {
      window_tokens(g, win + 1, s.next_rows, s.next_region);
      prefetch_rows(qkv, 3 * C, s.next_rows, n, static_cast<const T*>(nullptr), 0);
    }
    const int64_t slot = slots[win];
    for (int64_t h = 0; h < g.heads; ++h) {
      const T* bias_h = bias != nullptr ? bias + h * n * n : nullptr;
      load_part(g, s.x, 3 * C, h * d, T(g.scale), false, s.q);
      load_part(g, s.x, 3 * C, C + h * d, T(1), true, s.kt);
      load_part(g, s.x, 3 * C, 2 * C + h * d, T(1), false, s.v);
      T* sv = probs ? saved + (slot * g.heads + h) * n * n : saved + slot * n * g.heads + h;
      rows_times(s.q, 1, dp, n, d, s.kt, np, np, s.p, np);  // scores
      for (int64_t i = 0; i < n; ++i) {
        T* p = s.p + i * np;
        const T mx = scores_row(g, bias_h != nullptr ? bias_h + i * n : nullptr, s.region, i, p);
        T sum = T(0);
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
          p[j] = softmax_exp(p[j] - mx);
          sum += p[j];
        }
        const T inv = T(1) / sum;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) p[j] *= inv;
        for (int64_t j = n; j < np; ++j) p[j] = T(0);
        if (probs) {
          std::memcpy(sv + i * n, p, sizeof(T) * n);
        } else {
          sv[i * g.heads] = mx + std::log(sum);
        }
      }
      rows_times(s.p, 1, np, n, n, s.v, dp, dp, s.tmp, dp);  // P v
      for (int64_t i = 0; i < n; ++i) std::memcpy(s.y + i * C + h * d, s.tmp + i * dp, sizeof(T) * d);
    }
    for (int64_t t = 0; t < n; ++t) {
      if (s.rows[t] >= 0) std::memcpy(out + s.rows[t] * C, s.y + t * C, sizeof(T) * C);
    }
  }
}

// The backward of windows [w0, w1), every head: dq, dk, dv of the real tokens into dqkv (whole rows), the padding
// tokens' summed into dpad (3C, this block's), dS summed over the windows into dbias (heads x n x n, this block's).
template <typename T>
void backward_windows(const Geometry& g, const T* dout, const T* qkv, const T* saved, const int64_t* slots,
                      bool probs, const T* bias, const T* pad, T* dqkv, T* dbias, T* dpad, int64_t w0, int64_t w1,
                      Scratch<T>& s) {
  const int64_t n = g.n, np = g.np, dp = g.dp, d = g.head_dim, C = g.channels;
  const T scale = T(g.scale);
  const int64_t per_window = probs ? g.heads * n * n : 0;  // the saved probabilities of a window
  if (w0 < w1) window_tokens(g, w0, s.next_rows, s.next_region);
  for (int64_t win = w0; win < w1; ++win) {
    std::swap(s.rows, s.next_rows);
    std::swap(s.region, s.next_region);
    gather_rows(qkv, 3 * C, pad, s.rows, n, s.x);
    gather_rows(dout, C, static_cast<const T*>(nullptr), s.rows, n, s.y);  // cropped outputs: zero gradient
    if (win + 1 < w1) {
      window_tokens(g, win + 1, s.next_rows, s.next_region);
      prefetch_rows(qkv, 3 * C, s.next_rows, n, saved + slots[win + 1] * per_window, per_window);
      prefetch_rows(dout, C, s.next_rows, n, static_cast<const T*>(nullptr), 0);
    }
    const int64_t slot = slots[win];
    for (int64_t h = 0; h < g.heads; ++h) {
      const T* bias_h = bias != nullptr ? bias + h * n * n : nullptr;
      load_part(g, s.x, 3 * C, h * d, scale, false, s.q);  // q * scale, rows
      load_part(g, s.x, 3 * C, C + h * d, T(1), false, s.k);
      load_part(g, s.x, 3 * C, 2 * C + h * d, T(1), true, s.vt);
      load_part(g, s.y, C, h * d, T(1), false, s.dout);
      const T* sv = probs ? saved + (slot * g.heads + h) * n * n : saved + slot * n * g.heads + h;
      if (probs) {
        for (int64_t i = 0; i < n; ++i) std::memcpy(s.p + i * np, sv + i * n, sizeof(T) * n);
      } else {  // recomputed from the log-sum-exp: exp(s + bias + mask - lse)
        load_part(g, s.x, 3 * C, C + h * d, T(1), true, s.kt);
        rows_times(s.q, 1, dp, n, d, s.kt, np, np, s.p, np);
        for (int64_t i = 0; i < n; ++i) {
          T* p = s.p + i * np;
          scores_row(g, bias_h != nullptr ? bias_h + i * n : nullptr, s.region, i, p);
          const T lse = sv[i * g.heads];
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) p[j] = softmax_exp(p[j] - lse);
          for (int64_t j = n; j < np; ++j) p[j] = T(0);
        }
      }
      T* gq = s.g + h * d;
      T* gk = s.g + C + h * d;
      T* gv = s.g + 2 * C + h * d;
      // dV_j = sum_i P_ij dO_i (the rows of P^T)
      rows_times(s.p, np, 1, n, n, s.dout, dp, dp, s.tmp, dp);
      for (int64_t j = 0; j < n; ++j) std::memcpy(gv + j * 3 * C, s.tmp + j * dp, sizeof(T) * d);
      // dS_i = P_i * (dO_i V^T - sum_j P_ij (dO_i V^T)_j)
      rows_times(s.dout, 1, dp, n, d, s.vt, np, np, s.ds, np);
      T* db = dbias != nullptr ? dbias + h * n * n : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        T* ds = s.ds + i * np;
        const T* p = s.p + i * np;
        T r = T(0);
#pragma omp simd reduction(+ : r)
        for (int64_t j = 0; j < n; ++j) r += p[j] * ds[j];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - r);
        for (int64_t j = n; j < np; ++j) ds[j] = T(0);
        if (db != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) db[i * n + j] += ds[j];
        }
      }
      // dQ_i = scale * dS_i K; dK_j = sum_i dS_ij (q_i * scale) (the rows of dS^T)
      rows_times(s.ds, 1, np, n, n, s.k, dp, dp, s.tmp, dp);
      for (int64_t i = 0; i < n; ++i) {
        const T* from = s.tmp + i * dp;
        T* to = gq + i * 3 * C;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) to[e] = from[e] * scale;
      }
      rows_times(s.ds, np, 1, n, n, s.q, dp, dp, s.tmp, dp);
      for (int64_t j = 0; j < n; ++j) std::memcpy(gk + j * 3 * C, s.tmp + j * dp, sizeof(T) * d);
    }
    for (int64_t t = 0; t < n; ++t) {  // whole rows to the grid; padding tokens into the padding token's gradient
      const T* from = s.g + t * 3 * C;
      if (s.rows[t] >= 0) {
        std::memcpy(dqkv + s.rows[t] * 3 * C, from, sizeof(T) * 3 * C);
      } else if (dpad != nullptr) {
#pragma omp simd
        for (int64_t e = 0; e < 3 * C; ++e) dpad[e] += from[e];
      }
    }
  }
}
