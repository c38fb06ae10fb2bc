// fastmed::sliding_window_accumulate / sliding_window_finalize on CPU tensors: the `cpp` backend of
// fastmed.ops.sliding_window (the blending step of fastmed.inference).
//
//   accumulate  buffer[n, :, (z + dz) % R, y + dy, x + dx] += weight[dz, dy, dx] * patches[k, :, dz, dy, dx], window
//               after window in order: one pass over each window (read the patch, the weight and the buffer rows,
//               write the buffer rows), in the accumulation dtype (float32; float64 for a float64 buffer), stored in
//               the buffer's dtype (float16 / bfloat16 / float32 / float64).  Any strides.
//   finalize    for image rows [z_lo, z_hi): per (n, z, y) row the summed window weights from the normalizer table
//               (the covering windows' table rows, added in the reference's order: z windows outer, y windows
//               inner), then every channel's row divided by them, in place or into a result of any float dtype,
//               or the argmax over channels into uint8 labels (the first maximum; the first NaN wins, as
//               torch.argmax); optionally the buffer rows read are zeroed.
// Threads: the rows (c, dz) of one window (accumulate) or the (n, z, y) rows (finalize) are split with
// at::parallel_for; every element is written by one thread and windows are added in their order, so the results
// are bit-identical for any number of threads.  No allocation besides one normalizer row per task.
#include "fastmed_ext.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTMED_SW_F16C 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace fastmed {
namespace sliding_window_cpu {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kGrainValues = 16384;  // values per parallel task, at least

// float16 rows converted with F16C (vcvtph2ps / vcvtps2ph, round to nearest even like c10::Half) where the CPU has
// it: c10::Half's scalar conversion is several times slower than the blending itself.
#ifdef FASTMED_SW_F16C
bool has_f16c() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}

__attribute__((target("avx,f16c"))) void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx,f16c"))) void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#endif

// A row of n values at stride `stride` into / from the accumulation dtype.
template <typename T, typename A>
void load_row(const T* src, int64_t stride, int64_t n, A* dst) {
#ifdef FASTMED_SW_F16C
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    if (stride == 1 && has_f16c()) return half_to_float(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i * stride]);
}

template <typename T, typename A>
void store_row(const A* src, int64_t n, T* dst, int64_t stride) {
#ifdef FASTMED_SW_F16C
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<A, float>) {
    if (stride == 1 && has_f16c()) return float_to_half(src, dst, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<T>(src[i]);
}

template <typename B, typename P>
void accumulate_impl(const at::Tensor& buffer, const at::Tensor& patches, const at::Tensor& weight,
                     const std::vector<int64_t>& origins) {
  using A = acc_t<B>;
  B* buf = buffer.data_ptr<B>();
  const P* pat = patches.const_data_ptr<P>();
  const A* w = weight.const_data_ptr<A>();
  const int64_t C = buffer.size(1), R = buffer.size(2);
  const int64_t K = patches.size(0), wz = patches.size(2), wy = patches.size(3), wx = patches.size(4);
  const auto bs = buffer.strides();
  const auto ps = patches.strides();
  const auto ws = weight.strides();
  const bool unit = bs[4] == 1 && ps[4] == 1 && ws[2] == 1;  // the in-place loop of float32 / float64 operands
  const int64_t rows = C * wz;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, wy * wx));
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = origins[4 * k], z = origins[4 * k + 1], y = origins[4 * k + 2], x = origins[4 * k + 3];
    B* b0 = buf + n * bs[0] + y * bs[3] + x * bs[4];
    const P* p0 = pat + k * ps[0];
    at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
      std::vector<A> acc(wx), pv(wx);
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t c = row / wz, dz = row % wz;
        B* bz = b0 + c * bs[1] + ((z + dz) % R) * bs[2];
        const P* pz = p0 + c * ps[1] + dz * ps[2];
        const A* wzp = w + dz * ws[0];
        for (int64_t dy = 0; dy < wy; ++dy) {
          B* b = bz + dy * bs[3];
          const P* p = pz + dy * ps[3];
          const A* ww = wzp + dy * ws[1];
          if constexpr (std::is_same_v<B, A> && std::is_same_v<P, A>) {
            if (unit) {  // float32 / float64 throughout: in place, vectorized by the compiler
              for (int64_t dx = 0; dx < wx; ++dx) b[dx] = b[dx] + ww[dx] * p[dx];
              continue;
            }
          }
          load_row(b, bs[4], wx, acc.data());
          load_row(p, ps[4], wx, pv.data());
          for (int64_t dx = 0; dx < wx; ++dx) acc[dx] = acc[dx] + ww[dx * ws[2]] * pv[dx];
          store_row(acc.data(), wx, b, bs[4]);
        }
      }
    });
  }
}

// The summed weights of image row (z, y) into norm[0, X): the table rows of every window covering it.
template <typename A>
struct Normalizer {
  const A* table;
  int64_t ts0, ts1, ts2;  // table strides (wz, wy, X)
  const int32_t *starts_z, *starts_y, *first_z, *count_z, *first_y, *count_y;
  int64_t X;

  void row(int64_t z, int64_t y, A* norm) const {
    for (int64_t x = 0; x < X; ++x) norm[x] = A(0);
    const int64_t fz = first_z[z], cz = count_z[z], fy = first_y[y], cy = count_y[y];
    for (int64_t i = fz; i < fz + cz; ++i) {
      const int64_t tz = z - starts_z[i];
      for (int64_t j = fy; j < fy + cy; ++j) {
        const A* t = table + tz * ts0 + (y - starts_y[j]) * ts1;
        for (int64_t x = 0; x < X; ++x) norm[x] += t[x * ts2];
      }
    }
  }
};

// Per-task scratch of the finalization: the normalizer row, a row of values, and the running maximum and label of
// the argmax.
template <typename A>
struct RowScratch {
  std::vector<A> norm, best, row;
  std::vector<int32_t> label;  // int32: the same width as the values, so the argmax loop vectorizes
  explicit RowScratch(int64_t X) : norm(X), best(X), row(X), label(X) {}
};

// body(n, z, y, scratch) for every (n, z, y) row of image rows [z_lo, z_hi), scratch.norm holding the row's summed
// weights; the rows are split between threads (each row is one thread's).
template <typename A, typename F>
void for_each_row(const at::Tensor& buffer, const Normalizer<A>& nm, int64_t z_lo, int64_t z_hi, const F& body) {
  const int64_t N = buffer.size(0), C = buffer.size(1), Y = buffer.size(3), X = buffer.size(4);
  const int64_t Z = z_hi - z_lo;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, C * X));
  at::parallel_for(0, N * Z * Y, grain, [&](int64_t lo, int64_t hi) {
    RowScratch<A> scratch(X);
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t y = item % Y, z = z_lo + (item / Y) % Z, n = item / (Y * Z);
      nm.row(z, y, scratch.norm.data());
      body(n, z, y, scratch);
    }
  });
}

template <typename B, typename O>
void finalize_values(const at::Tensor& buffer, const at::Tensor& result, const Normalizer<acc_t<B>>& nm,
                     int64_t z_lo, int64_t z_hi, bool in_place, bool zero_buffer) {
  using A = acc_t<B>;
  B* buf = buffer.data_ptr<B>();
  O* res = in_place ? nullptr : result.data_ptr<O>();
  const int64_t C = buffer.size(1), R = buffer.size(2), X = buffer.size(4);
  const auto bs = buffer.strides();
  const std::vector<int64_t> rs = in_place ? std::vector<int64_t>(5, 0) : result.strides().vec();
  for_each_row(buffer, nm, z_lo, z_hi, [&](int64_t n, int64_t z, int64_t y, RowScratch<A>& s) {
    const A* norm = s.norm.data();
    A* v = s.row.data();
    for (int64_t c = 0; c < C; ++c) {
      B* b = buf + n * bs[0] + c * bs[1] + (z % R) * bs[2] + y * bs[3];
      load_row(b, bs[4], X, v);
      for (int64_t x = 0; x < X; ++x) v[x] = v[x] / norm[x];
      if (in_place) {
        store_row(v, X, b, bs[4]);
      } else {
        store_row(v, X, res + n * rs[0] + c * rs[1] + z * rs[2] + y * rs[3], rs[4]);
      }
      if (zero_buffer) {
        for (int64_t x = 0; x < X; ++x) b[x * bs[4]] = static_cast<B>(0);
      }
    }
  });
}

template <typename B>
void finalize_labels(const at::Tensor& buffer, const at::Tensor& result, const Normalizer<acc_t<B>>& nm,
                     int64_t z_lo, int64_t z_hi, bool zero_buffer) {
  using A = acc_t<B>;
  B* buf = buffer.data_ptr<B>();
  uint8_t* res = result.data_ptr<uint8_t>();
  const int64_t C = buffer.size(1), R = buffer.size(2), X = buffer.size(4);
  const auto bs = buffer.strides();
  const auto rs = result.strides();
  for_each_row(buffer, nm, z_lo, z_hi, [&](int64_t n, int64_t z, int64_t y, RowScratch<A>& s) {
    const A* norm = s.norm.data();
    A* best = s.best.data();
    int32_t* label = s.label.data();
    A* row = s.row.data();
    for (int64_t c = 0; c < C; ++c) {
      B* b = buf + n * bs[0] + c * bs[1] + (z % R) * bs[2] + y * bs[3];
      load_row(b, bs[4], X, row);
      if (c == 0) {
        for (int64_t x = 0; x < X; ++x) {
          best[x] = row[x] / norm[x];
          label[x] = 0;
        }
      } else {
        const int32_t cc = static_cast<int32_t>(c);
        for (int64_t x = 0; x < X; ++x) {  // branch-free (vectorized): the first maximum; the first NaN wins
          const A v = row[x] / norm[x], bx = best[x];
          const bool take = (v > bx) | ((v != v) & (bx == bx));  // bitwise: no branch to predict
          best[x] = take ? v : bx;
          label[x] = take ? cc : label[x];
        }
      }
      if (zero_buffer) {
        for (int64_t x = 0; x < X; ++x) b[x * bs[4]] = static_cast<B>(0);
      }
    }
    uint8_t* o = res + n * rs[0] + z * rs[2] + y * rs[3];
    for (int64_t x = 0; x < X; ++x) o[x * rs[4]] = static_cast<uint8_t>(label[x]);
  });
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "sliding_window (cpp): ", name, " must be a CPU tensor, got ", t.device());
}

at::ScalarType acc_type(at::ScalarType buffer) {
  return buffer == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace sliding_window_cpu

void sliding_window_accumulate_cpu(at::Tensor buffer, const at::Tensor& patches, const at::Tensor& weight,
                                   std::vector<int64_t> origins) {
  using namespace sliding_window_cpu;
  check_cpu(buffer, "buffer");
  check_cpu(patches, "patches");
  check_cpu(weight, "weight");
  TORCH_CHECK(buffer.dim() == 5 && patches.dim() == 5 && weight.dim() == 3,
              "sliding_window_accumulate_cpu: buffer (N, C, R, Y, X), patches (K, C, wz, wy, wx) and weight "
              "(wz, wy, wx) expected");
  TORCH_CHECK(weight.scalar_type() == acc_type(buffer.scalar_type()),
              "sliding_window_accumulate_cpu: weight must be in the buffer's accumulation dtype");
  const int64_t N = buffer.size(0), C = buffer.size(1), R = buffer.size(2), Y = buffer.size(3), X = buffer.size(4);
  const int64_t K = patches.size(0), wz = patches.size(2), wy = patches.size(3), wx = patches.size(4);
  TORCH_CHECK(patches.size(1) == C && weight.size(0) == wz && weight.size(1) == wy && weight.size(2) == wx && wz <= R,
              "sliding_window_accumulate_cpu: shapes do not fit");
  TORCH_CHECK(static_cast<int64_t>(origins.size()) == 4 * K, "sliding_window_accumulate_cpu: 4 origins per window");
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = origins[4 * k], z = origins[4 * k + 1], y = origins[4 * k + 2], x = origins[4 * k + 3];
    TORCH_CHECK(0 <= n && n < N && z >= 0 && 0 <= y && y + wy <= Y && 0 <= x && x + wx <= X,
                "sliding_window_accumulate_cpu: window ", k, " is not inside the buffer");
  }
  if (K == 0 || C == 0 || wz == 0 || wy == 0 || wx == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(), "sliding_window_accumulate_cpu", [&] {
    using B = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, patches.scalar_type(), "sliding_window_patches", [&] {
      accumulate_impl<B, scalar_t>(buffer, patches, weight, origins);
    });
  });
}

void sliding_window_finalize_cpu(at::Tensor buffer, const c10::optional<at::Tensor>& result, const at::Tensor& table,
                                 const at::Tensor& starts_z, const at::Tensor& starts_y, const at::Tensor& first_z,
                                 const at::Tensor& count_z, const at::Tensor& first_y, const at::Tensor& count_y,
                                 int64_t z_lo, int64_t z_hi, const std::string& output, bool zero_buffer) {
  using namespace sliding_window_cpu;
  check_cpu(buffer, "buffer");
  check_cpu(table, "table");
  TORCH_CHECK(buffer.dim() == 5 && table.dim() == 3, "sliding_window_finalize_cpu: buffer (N, C, R, Y, X) and table "
              "(wz, wy, X) expected");
  TORCH_CHECK(table.scalar_type() == acc_type(buffer.scalar_type()),
              "sliding_window_finalize_cpu: table must be in the buffer's accumulation dtype");
  const bool labels = output == "labels";
  TORCH_CHECK(labels || output == "values", "sliding_window_finalize_cpu: output must be values or labels");
  TORCH_CHECK(!labels || result.has_value(), "sliding_window_finalize_cpu: labels need a result");
  const at::Tensor index[] = {starts_z, starts_y, first_z, count_z, first_y, count_y};
  for (const auto& t : index) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous(),
                "sliding_window_finalize_cpu: the normalizer's index tensors must be contiguous int32 CPU vectors");
  }
  const int64_t Y = buffer.size(3), X = buffer.size(4);
  TORCH_CHECK(count_z.size(0) >= z_hi && 0 <= z_lo && z_lo < z_hi && z_hi - z_lo <= buffer.size(2) &&
              count_y.size(0) == Y && table.size(2) == X, "sliding_window_finalize_cpu: shapes do not fit");
  if (result.has_value()) {
    check_cpu(*result, "result");
    TORCH_CHECK(result->dim() == 5 && result->size(0) == buffer.size(0) && result->size(2) >= z_hi &&
                result->size(3) == Y && result->size(4) == X &&
                result->size(1) == (labels ? 1 : buffer.size(1)),
                "sliding_window_finalize_cpu: result does not fit the buffer");
    TORCH_CHECK(!labels || result->scalar_type() == at::kByte, "sliding_window_finalize_cpu: labels are uint8");
  }
  if (buffer.numel() == 0 || (result.has_value() && result->numel() == 0)) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(), "sliding_window_finalize_cpu", [&] {
    using B = scalar_t;
    using A = acc_t<B>;
    const auto ts = table.strides();
    const Normalizer<A> nm{table.const_data_ptr<A>(), ts[0], ts[1], ts[2],
                           starts_z.const_data_ptr<int32_t>(), starts_y.const_data_ptr<int32_t>(),
                           first_z.const_data_ptr<int32_t>(), count_z.const_data_ptr<int32_t>(),
                           first_y.const_data_ptr<int32_t>(), count_y.const_data_ptr<int32_t>(), X};
    if (labels) {
      finalize_labels<B>(buffer, *result, nm, z_lo, z_hi, zero_buffer);
    } else if (!result.has_value()) {
      finalize_values<B, B>(buffer, buffer, nm, z_lo, z_hi, true, zero_buffer);
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, result->scalar_type(), "sliding_window_result", [&] {
        finalize_values<B, scalar_t>(buffer, *result, nm, z_lo, z_hi, false, zero_buffer);
      });
    }
  });
}

}  // namespace fastmed
