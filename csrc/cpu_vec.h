// 32-byte vectors for the CPU kernel headers (GCC vector extension): Vec<T>, load_vec / store_vec at any alignment,
// and lane reductions in a fixed order.  Included by a kernel header once per build (inside its namespace, see
// cpu_kernels_twice.h), so no include guard; include cpu_math_f32.h (FASTMED_INLINE) before it; the including .cpp
// has <cstdint> and <cstring>.

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

// 32 bytes at any alignment as one vector, and back.
template <typename T>
FASTMED_INLINE Vec<T> load_vec(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
FASTMED_INLINE void store_vec(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// The sum and the maximum of a vector's lanes, by halves (a fixed order); the maximum skips NaN lanes, as
// `a > m ? a : m` does (a NaN score still makes its row NaN through exp(NaN - max)).  Vectors by reference: a
// 32-byte vector by value in the baseline build draws GCC's -Wpsabi note at every instantiation.
template <typename T, typename Combine>
FASTMED_INLINE T lanes_reduce(const Vec<T>& v, Combine combine) {
  T l[kLanesOf<T>];
  std::memcpy(l, &v, sizeof(v));
  for (int64_t w = kLanesOf<T> / 2; w >= 1; w /= 2) {
    for (int64_t i = 0; i < w; ++i) l[i] = combine(l[i], l[i + w]);
  }
  return l[0];
}
template <typename T>
FASTMED_INLINE T lanes_sum(const Vec<T>& v) {
  return lanes_reduce<T>(v, [](T a, T b) { return a + b; });
}
template <typename T>
FASTMED_INLINE T lanes_max(const Vec<T>& v) {
  return lanes_reduce<T>(v, [](T a, T b) { return b > a ? b : a; });
}
