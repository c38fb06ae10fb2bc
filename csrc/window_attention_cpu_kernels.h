// The per-(window, head) work of csrc/window_attention_cpu.cpp: gather, scores, softmax, products, scatter.
//
// Included twice by window_attention_cpu.cpp, like the other kernel headers (see cpu_kernels_twice.h): inside
// `namespace generic` and inside `namespace avx2`.  It uses Geometry, Scratch and kMaskValue from the enclosing
// namespace.  Every product is `rows_times`: output rows of W values (a multiple of the vector width), each the sum
// of K rows of a matrix scaled by K coefficients, with up to 8 vectors of sums (two rows of up to 4, or one row of
// up to 8) in registers, enough independent chains to cover the FMA latency: a (window, head)'s 49 x 49 x 32
// products run from the L1 cache at close to the FMA rate.  The other operands are read in place from the window's
// gathered rows (rows_times takes any strides for its scalar operand and 32-byte aligned rows for its vector one);
// only the operand needed as columns (k in the forward, v in the backward) is transposed, in 8 x 8 blocks.  The
// softmax runs on whole vectors (the padded columns are -inf through the padded bias) and its normalization is
// deferred: the products use exp(s - max) and their rows are scaled by 1 / sum on the way out.  The row maxima and
// sums (and the backward's row dot products) are vector accumulations reduced by halves at the end (an `omp simd`
// reduction's per-lane array went through the stack, a serial chain of scalar adds per row).  Nothing in here
// depends on the thread that runs it: a (window, head) is always computed the same way.
#include "cpu_math_f32.h"  // exp_f32_normal, FASTMED_INLINE
#include "cpu_vec.h"       // Vec, load_vec, store_vec, lanes_sum, lanes_max

#include <type_traits>

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
FASTMED_INLINE float softmax_exp(float z) { return exp_f32_normal(z < -86.8f ? -86.8f : z); }
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

// dst[e * ldd + t] = src[t * lds + e] for e < 8, t < 8 (float32: three rounds of shuffles, no scalar stores).
FASTMED_INLINE void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  typedef float V __attribute__((vector_size(32)));
  V r[8];
  for (int i = 0; i < 8; ++i) std::memcpy(&r[i], src + i * lds, sizeof(V));
  V t[8], u[8];
  for (int i = 0; i < 4; ++i) {  // pairs of rows interleaved
    t[2 * i] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[2 * i + 1] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {  // quadruples of rows
    u[4 * i + 0] = __builtin_shufflevector(t[4 * i], t[4 * i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[4 * i + 1] = __builtin_shufflevector(t[4 * i], t[4 * i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[4 * i + 2] = __builtin_shufflevector(t[4 * i + 1], t[4 * i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[4 * i + 3] = __builtin_shufflevector(t[4 * i + 1], t[4 * i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int c = 0; c < 4; ++c) {  // the 128-bit halves: columns c and c + 4
    const V lo = __builtin_shufflevector(u[c], u[4 + c], 0, 1, 2, 3, 8, 9, 10, 11);
    const V hi = __builtin_shufflevector(u[c], u[4 + c], 4, 5, 6, 7, 12, 13, 14, 15);
    std::memcpy(dst + c * ldd, &lo, sizeof(V));
    std::memcpy(dst + (c + 4) * ldd, &hi, sizeof(V));
  }
}

// The n rows x[t * ldx + 0:d] as the columns of dst (d rows of np); padded lanes are left as they are (zero from
// Scratch).
template <typename T>
inline void load_columns(const Geometry& g, const T* x, int64_t ldx, T* dst) {
  const int64_t n = g.n, d = g.head_dim, np = g.np;
  int64_t t0 = 0, e8 = 0;
  if constexpr (std::is_same_v<T, float>) {
    e8 = d / 8 * 8;
    for (; t0 + 8 <= n; t0 += 8) {
      for (int64_t e = 0; e < e8; e += 8) transpose8(x + t0 * ldx + e, ldx, dst + e * np + t0, np);
    }
    for (int64_t t = 0; t < t0; ++t) {
      for (int64_t e = e8; e < d; ++e) dst[e * np + t] = x[t * ldx + e];
    }
  }
  for (int64_t t = t0; t < n; ++t) {
    for (int64_t e = 0; e < d; ++e) dst[e * np + t] = x[t * ldx + e];
  }
}

// An operand read as 32-byte aligned rows by rows_times: the d columns at x (rows of ldx) in place when d is a
// multiple of the vector width (x and ldx are then aligned too), else copied into `copy` (n x dp, padded lanes zero).
template <typename T>
struct Rows {
  const T* at;
  int64_t ld;
};

template <typename T>
inline Rows<T> aligned_rows(const Geometry& g, const T* x, int64_t ldx, T* copy) {
  if (g.head_dim % kLanesOf<T> == 0) return {x, ldx};
  for (int64_t t = 0; t < g.n; ++t) std::memcpy(copy + t * g.dp, x + t * ldx, sizeof(T) * g.head_dim);
  return {copy, g.dp};
}

// The window's additive shift mask (n x np: kMaskValue between tokens of different regions, else 0; 0 in the padded
// columns, which the padded bias already sets to -inf).
template <typename T>
inline void window_mask(const Geometry& g, const int32_t* region, T* mask) {
  for (int64_t i = 0; i < g.n; ++i) {
    const int32_t ri = region[i];
    T* m = mask + i * g.np;
#pragma omp simd
    for (int64_t j = 0; j < g.n; ++j) m[j] = region[j] != ri ? T(kMaskValue) : T(0);
  }
}

// Row i of the scores from q k^T: times the scale, plus row i of the padded bias (np values: the bias, -inf in the
// padded columns) and of the window's mask (when shifted); returns the row's maximum.
template <typename T>
FASTMED_INLINE T scores_row(const Geometry& g, const T* add_row, const T* mask_row, T* row) {
  constexpr int64_t L = kLanesOf<T>;
  const Vec<T> scale = Vec<T>{} + T(g.scale);
  Vec<T> m = Vec<T>{} - std::numeric_limits<T>::infinity();  // a NaN score makes its row NaN via exp(NaN - m)
  for (int64_t j = 0; j < g.np; j += L) {  // np: whole vectors
    Vec<T> r = load_vec<T>(row + j) * scale + load_vec<T>(add_row + j);
    if (mask_row != nullptr) r = r + load_vec<T>(mask_row + j);
    store_vec<T>(row + j, r);
    m = r > m ? r : m;
  }
  return lanes_max<T>(m);
}

// The rows of `tmp` (n x dp), row t times `mul` and row_mul[t] (when not null), as the columns [0, d) of the rows of
// `dst` (rows of `width`).
template <typename T>
FASTMED_INLINE void store_rows(const Geometry& g, const T* tmp, T mul, const T* row_mul, T* dst, int64_t width) {
  const int64_t d = g.head_dim;
  for (int64_t t = 0; t < g.n; ++t) {
    const T* from = tmp + t * g.dp;
    const T m = row_mul != nullptr ? row_mul[t] * mul : mul;
    T* to = dst + t * width;
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) to[e] = from[e] * m;
  }
}

// The forward of windows [w0, w1), every head: out rows of the real tokens, and the probabilities
// (saved (windows, heads, n, n)) or the log-sum-exp (saved (windows, n, heads)), window `win` at slots[win];
// nothing when saved is null.
// `add` is the padded bias (heads, n, np): the bias (zero when there is none), -inf in the padded columns.
template <typename T>
void forward_windows(const Geometry& g, const T* qkv, const T* add, const T* pad, T* out, T* saved,
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
    if (g.shifted) window_mask(g, s.region, s.mask);
    const T* mask = g.shifted ? s.mask : nullptr;
    const int64_t slot = slots[win];
    for (int64_t h = 0; h < g.heads; ++h) {
      const T* add_h = add + h * n * np;
      const T* q = s.x + h * d;  // rows of 3C
      load_columns(g, s.x + C + h * d, 3 * C, s.kt);
      const Rows<T> v = aligned_rows(g, s.x + 2 * C + h * d, 3 * C, s.v);
      T* sv = saved == nullptr ? nullptr : probs ? saved + (slot * g.heads + h) * n * n : saved + slot * n * g.heads + h;
      rows_times(q, 1, 3 * C, n, d, s.kt, np, np, s.p, np);  // q k^T
      for (int64_t i = 0; i < n; ++i) {
        T* p = s.p + i * np;
        const T mx = scores_row(g, add_h + i * np, mask != nullptr ? mask + i * np : nullptr, p);
#pragma omp simd
        for (int64_t j = 0; j < np; ++j) p[j] = softmax_exp(p[j] - mx);
        Vec<T> acc = {};
        for (int64_t j = 0; j < np; j += kLanesOf<T>) acc += load_vec<T>(p + j);
        const T sum = lanes_sum<T>(acc);
        const T inv = T(1) / sum;
        s.inv[i] = inv;
        if (sv == nullptr) continue;  // nothing kept (no backward will run)
        if (probs) {  // normalized on the way out; the products use exp(s - max) and scale their rows by inv
          T* to = sv + i * n;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) to[j] = p[j] * inv;
        } else {
          sv[i * g.heads] = mx + std::log(sum);
        }
      }
      rows_times(s.p, 1, np, n, n, v.at, v.ld, dp, s.tmp, dp);  // exp(S - max) v
      store_rows(g, s.tmp, T(1), s.inv, s.y + h * d, C);
    }
    for (int64_t t = 0; t < n; ++t) {
      if (s.rows[t] >= 0) std::memcpy(out + s.rows[t] * C, s.y + t * C, sizeof(T) * C);
    }
  }
}

// The backward of windows [w0, w1) (one block), every head: dq, dk, dv of the real tokens into dqkv (whole rows), the
// padding tokens' summed into dpad (3C, this block's), dS summed over the windows into dbias (heads x n x n, this
// block's: written, not added to).
// `add` as in forward_windows (null when the probabilities were saved: only recomputed ones need the bias).
template <typename T>
void backward_windows(const Geometry& g, const T* dout, const T* qkv, const T* saved, const int64_t* slots,
                      bool probs, const T* add, const T* pad, T* dqkv, T* dbias, T* dpad, int64_t w0, int64_t w1,
                      Scratch<T>& s) {
  const int64_t n = g.n, np = g.np, dp = g.dp, d = g.head_dim, C = g.channels;
  const T scale = T(g.scale);
  const int64_t per_window = probs ? g.heads * n * n : 0;  // the saved probabilities of a window
  if (dbias != nullptr) std::memset(s.db, 0, sizeof(T) * g.heads * n * n);  // this block's, summed in the cache
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
    if (g.shifted && !probs) window_mask(g, s.region, s.mask);
    const T* mask = g.shifted ? s.mask : nullptr;
    const int64_t slot = slots[win];
    for (int64_t h = 0; h < g.heads; ++h) {
      const T* add_h = probs ? nullptr : add + h * n * np;
      const T* dy = s.y + h * d;  // rows of C
      const Rows<T> q = aligned_rows(g, s.x + h * d, 3 * C, s.q);  // unscaled: dK below is scaled on the way out
      const Rows<T> k = aligned_rows(g, s.x + C + h * d, 3 * C, s.k);
      const Rows<T> dyr = aligned_rows(g, dy, C, s.dout);
      load_columns(g, s.x + 2 * C + h * d, 3 * C, s.vt);
      const T* sv = probs ? saved + (slot * g.heads + h) * n * n : saved + slot * n * g.heads + h;
      const T* P = sv;  // the probabilities, rows of pl
      int64_t pl = n;
      if (!probs) {  // recomputed from the log-sum-exp: exp(s * scale + bias + mask - lse)
        load_columns(g, s.x + C + h * d, 3 * C, s.kt);
        rows_times(s.x + h * d, 1, 3 * C, n, d, s.kt, np, np, s.p, np);
        for (int64_t i = 0; i < n; ++i) {
          T* p = s.p + i * np;
          scores_row(g, add_h + i * np, mask != nullptr ? mask + i * np : nullptr, p);
          const T lse = sv[i * g.heads];
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) p[j] = softmax_exp(p[j] - lse);
        }
        P = s.p;
        pl = np;
      }
      T* gq = s.g + h * d;
      T* gk = s.g + C + h * d;
      T* gv = s.g + 2 * C + h * d;
      // dV_j = sum_i P_ij dO_i (the rows of P^T)
      rows_times(P, pl, 1, n, n, dyr.at, dyr.ld, dp, s.tmp, dp);
      store_rows(g, s.tmp, T(1), static_cast<const T*>(nullptr), gv, 3 * C);
      // dS_i = P_i * (dO_i V^T - sum_j P_ij (dO_i V^T)_j)
      rows_times(dy, 1, C, n, d, s.vt, np, np, s.ds, np);
      T* db = dbias != nullptr ? s.db + h * n * n : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        T* ds = s.ds + i * np;
        const T* p = P + i * pl;
        Vec<T> acc = {};
        int64_t j0 = 0;
        for (; j0 + kLanesOf<T> <= n; j0 += kLanesOf<T>) acc += load_vec<T>(p + j0) * load_vec<T>(ds + j0);
        T r = lanes_sum<T>(acc);
        for (int64_t j = j0; j < n; ++j) r += p[j] * ds[j];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - r);
        if (db != nullptr) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) db[i * n + j] += ds[j];
        }
      }
      // dQ_i = scale * dS_i K; dK_j = scale * sum_i dS_ij q_i (the rows of dS^T)
      rows_times(s.ds, 1, np, n, n, k.at, k.ld, dp, s.tmp, dp);
      store_rows(g, s.tmp, scale, static_cast<const T*>(nullptr), gq, 3 * C);
      rows_times(s.ds, np, 1, n, n, q.at, q.ld, dp, s.tmp, dp);
      store_rows(g, s.tmp, scale, static_cast<const T*>(nullptr), gk, 3 * C);
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
  if (dbias != nullptr) std::memcpy(dbias, s.db, sizeof(T) * g.heads * n * n);
}
