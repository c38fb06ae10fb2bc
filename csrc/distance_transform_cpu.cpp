// Exact Euclidean distance transform on the CPU (scipy.ndimage.distance_transform_edt semantics).
//
// Separable algorithm: pass 1 runs along the last (contiguous) axis and gives, per voxel, the squared distance to
// the nearest zero of its line (two sweeps).  Every further axis, from the second-last to the first, replaces each
// line f by its lower envelope of parabolas g(q) = min_p w (q - p)^2 + f(p) (Felzenszwalb & Huttenlocher, 2012),
// with w = spacing^2 of that axis.  Lines of a strided axis are processed in blocks of kBlock neighbouring lines:
// one block is gathered into a small buffer (each row read touches kBlock contiguous values), transformed line by
// line, and scattered back, so no transposes are needed and the passes run in place.  Blocks are dealt to threads
// round-robin (blob masks put the work in a few places, a static split would leave threads idle).
//
// Numerics: the envelope arithmetic is float64.  Without spacing every squared distance is an integer; it is
// stored in float32 when the sum of squared sizes stays below 2^24 (then exact), else in float64, so squared
// distances are exact and sqrt(d2) (std::sqrt, correctly rounded) equals scipy's value.  With spacing the work
// buffer is float64.  A map with no zero voxel has no finite distance: every voxel gets +inf.
//
// Feature transform (return_indices): the passes also carry, per voxel, the flat index within its map of the
// nearest zero found so far (int64, -1 while none).  Pass 1 takes the left zero on a tie; an envelope pass copies
// the index of the root of the envelope parabola that wins at q, which is the smallest root among the exact
// minimizers (pop on s <= z, stay on z == q).  So a tie goes to the nearest zero that is smallest in
// lexicographic order, as in the reference (exact for unit spacing, where all arithmetic is on integers).
//
// Memory: besides the output, each thread holds O(kBlock * n) scratch; float32 results that need a float64 work
// buffer go through it kWorkVoxels voxels (whole maps) at a time, so it stays bounded whatever the batch.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <tuple>
#include <utility>
#include <vector>

#include "fastmed_ext.h"

namespace fastmed {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kBlock = 16;  // lines per gathered block: 16 float32 = one 64-byte cache line per row read
// float64 work buffer of float32 results: whole maps, at most this many voxels at a time (one map if larger).
constexpr int64_t kWorkVoxels = int64_t(1) << 22;  // 32 MiB (tests/test_distance_transform.py relies on it)

// Runs body(task) for task in [0, tasks), dealing tasks to threads round-robin.
template <typename F>
void for_each_task(int64_t tasks, F body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tid = begin; tid < end; ++tid)
      for (int64_t t = tid; t < tasks; t += threads) body(t);
  });
}

template <typename O>
inline O finish(double d2, bool take_sqrt) {
  return static_cast<O>(take_sqrt ? std::sqrt(d2) : d2);
}

// Pass 1: along the last axis.  lines x n contiguous mask -> squared distance to the nearest zero in the line
// (spacing s), +inf where the line has no zero.  With idx: the flat index within its map (maps of map_size
// voxels) of that zero, the left one on a tie, -1 where none.
template <typename O>
void line_pass(const uint8_t* mask, O* out, int64_t lines, int64_t n, double s, bool take_sqrt, int64_t* idx,
               int64_t map_size) {
  const int64_t lines_per_task = std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1));
  const int64_t tasks = (lines + lines_per_task - 1) / lines_per_task;
  for_each_task(tasks, [&](int64_t t) {
    std::vector<double> left(n);
    std::vector<int64_t> left_zero(idx != nullptr ? n : 0);
    const int64_t l_end = std::min(lines, (t + 1) * lines_per_task);
    for (int64_t l = t * lines_per_task; l < l_end; ++l) {
      const uint8_t* m = mask + l * n;
      O* o = out + l * n;
      double d = kInf;  // voxels since the last zero on the left
      int64_t z = -1;   // that zero
      for (int64_t i = 0; i < n; ++i) {
        d = m[i] ? d + 1.0 : 0.0;
        left[i] = d;
        if (idx != nullptr) {
          z = m[i] ? z : i;
          left_zero[i] = z;
        }
      }
      d = kInf;
      z = -1;
      const int64_t base = (l * n) % map_size;  // flat index of the line's first voxel within its map
      for (int64_t i = n - 1; i >= 0; --i) {
        d = m[i] ? d + 1.0 : 0.0;
        const bool take_left = left[i] <= d;
        const double k = (take_left ? left[i] : d) * s;
        o[i] = finish<O>(k * k, take_sqrt);
        if (idx != nullptr) {
          z = m[i] ? z : i;
          const int64_t zero = take_left ? left_zero[i] : z;
          idx[l * n + i] = zero < 0 ? -1 : base + zero;
        }
      }
    }
  });
}

// Lower envelope of the parabolas w (q - p)^2 + f(p) over the finite f(p), evaluated at every q.
// v, z: scratch of n and n + 1 entries.  Only the span from the zero before the first nonzero to the zero after
// the last nonzero matters: parabolas beyond a zero can never undercut the one rooted at that zero (strictly, so
// no tie is lost).  With fi/gi (nearest-zero indices in and out; nullptr without): gi[q] = fi[root that wins
// at q]; voxels with f = 0 are zeros and keep their own index.
void line_envelope(const double* f, double* g, int64_t n, double w, int64_t* v, double* z, const int64_t* fi,
                   int64_t* gi) {
  int64_t lo = 0;
  while (lo < n && f[lo] == 0.0) ++lo;
  if (fi != nullptr) std::copy(fi, fi + n, gi);
  if (lo == n) {
    std::fill(g, g + n, 0.0);
    return;
  }
  int64_t hi = n - 1;
  while (f[hi] == 0.0) --hi;
  std::fill(g, g + lo, 0.0);
  std::fill(g + hi + 1, g + n, 0.0);
  const int64_t a = lo > 0 ? lo - 1 : lo;
  const int64_t b = hi < n - 1 ? hi + 1 : hi;

  int64_t k = -1;
  for (int64_t q = a; q <= b; ++q) {
    const double fq = f[q];
    if (fq == kInf) continue;
    if (k < 0) {
      k = 0;
      v[0] = q;
      z[0] = -kInf;
      continue;
    }
    const double cq = fq + w * static_cast<double>(q * q);
    double s;
    while (true) {  // terminates: z[0] = -inf
      const int64_t p = v[k];
      s = (cq - (f[p] + w * static_cast<double>(p * p))) / (2.0 * w * static_cast<double>(q - p));
      if (s <= z[k])
        --k;
      else
        break;
    }
    ++k;
    v[k] = q;
    z[k] = s;
  }
  if (k < 0) {  // no finite value on the line (the whole map has no zero)
    std::fill(g + lo, g + hi + 1, kInf);
    if (gi != nullptr) std::fill(gi + lo, gi + hi + 1, int64_t(-1));
    return;
  }
  z[k + 1] = kInf;
  int64_t j = 0;
  for (int64_t q = lo; q <= hi; ++q) {
    while (z[j + 1] < static_cast<double>(q)) ++j;  // a breakpoint at q keeps the smaller root
    const double d = static_cast<double>(q - v[j]);
    g[q] = w * d * d + f[v[j]];
    if (gi != nullptr) gi[q] = fi[v[j]];
  }
}

// One envelope pass along an axis of length n with stride `inner`; `outer` blocks of n * inner values.  idx (same
// layout, nullptr without indices) is updated in place.
template <typename I, typename O>
void envelope_pass(const I* src, O* dst, int64_t outer, int64_t n, int64_t inner, double w, bool take_sqrt,
                   int64_t* idx) {
  const int64_t blocks = (inner + kBlock - 1) / kBlock;
  const int64_t tasks = outer * blocks;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> f(kBlock * n), g(kBlock * n), z(n + 1);
    std::vector<int64_t> v(n);
    std::vector<int64_t> fi(idx != nullptr ? kBlock * n : 0), gi(fi.size());
    for (int64_t tid = begin; tid < end; ++tid) {
      for (int64_t t = tid; t < tasks; t += threads) {
        const int64_t o = t / blocks;
        const int64_t i0 = (t % blocks) * kBlock;
        const int64_t bl = std::min(kBlock, inner - i0);
        const int64_t base = o * n * inner + i0;
        bool any = false;
        for (int64_t p = 0; p < n; ++p) {
          const I* row = src + base + p * inner;
          for (int64_t j = 0; j < bl; ++j) {
            const double x = static_cast<double>(row[j]);
            f[j * n + p] = x;
            any |= x != 0.0;
          }
        }
        if (!any) {  // background only: zeros stay zeros (and keep their own indices)
          if (static_cast<const void*>(src) != static_cast<const void*>(dst))
            for (int64_t p = 0; p < n; ++p) std::fill(dst + base + p * inner, dst + base + p * inner + bl, O(0));
          continue;
        }
        if (idx != nullptr)
          for (int64_t p = 0; p < n; ++p) {
            const int64_t* row = idx + base + p * inner;
            for (int64_t j = 0; j < bl; ++j) fi[j * n + p] = row[j];
          }
        for (int64_t j = 0; j < bl; ++j)
          line_envelope(&f[j * n], &g[j * n], n, w, v.data(), z.data(), idx != nullptr ? &fi[j * n] : nullptr,
                        idx != nullptr ? &gi[j * n] : nullptr);
        for (int64_t p = 0; p < n; ++p) {
          O* row = dst + base + p * inner;
          for (int64_t j = 0; j < bl; ++j) row[j] = finish<O>(g[j * n + p], take_sqrt);
        }
        if (idx != nullptr)
          for (int64_t p = 0; p < n; ++p) {
            int64_t* row = idx + base + p * inner;
            for (int64_t j = 0; j < bl; ++j) row[j] = gi[j * n + p];
          }
      }
    }
  });
}

// All passes for maps of `sizes` stacked `batch` times; W is the work (squared distance) type, O the output type;
// idx (nullptr without indices): the nearest zero's flat index within its map, per voxel.
template <typename W, typename O>
void run_passes(const uint8_t* mask, W* work, O* out, int64_t batch, const std::vector<int64_t>& sizes,
                const std::vector<double>& spacing, bool squared, int64_t* idx) {
  const int64_t nd = static_cast<int64_t>(sizes.size());
  int64_t total = batch;
  for (auto s : sizes) total *= s;
  const int64_t map_size = total / batch;
  const int64_t last = sizes[nd - 1];
  if (nd == 1) {
    line_pass<O>(mask, out, total / last, last, spacing[0], !squared, idx, map_size);
    return;
  }
  line_pass<W>(mask, work, total / last, last, spacing[nd - 1], false, idx, map_size);
  int64_t inner = last;
  for (int64_t d = nd - 2; d >= 0; --d) {
    const int64_t n = sizes[d];
    const int64_t outer = total / (n * inner);
    const double w = spacing[d] * spacing[d];
    if (d == 0)
      envelope_pass<W, O>(work, out, outer, n, inner, w, !squared, idx);
    else
      envelope_pass<W, W>(work, work, outer, n, inner, w, false, idx);
    inner *= n;
  }
}

}  // namespace

namespace {

// The transform, and with want_indices the nearest zero's flat index within its map (int64, -1 where none).
std::tuple<torch::Tensor, torch::Tensor> transform(const torch::Tensor& mask, int64_t spatial_dims,
                                                   std::vector<double> spacing, bool squared, bool float64,
                                                   bool want_indices, const char* name) {
  TORCH_CHECK(mask.device().is_cpu(), name, ": mask must be a CPU tensor, got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kByte || mask.scalar_type() == at::kBool, name,
              ": mask must be uint8 or bool (nonzero = foreground), got ", mask.scalar_type());
  TORCH_CHECK(spatial_dims >= 1 && spatial_dims <= 3, name, ": spatial_dims must be 1, 2 or 3, got ", spatial_dims);
  TORCH_CHECK(mask.dim() >= spatial_dims, name, ": mask must have at least spatial_dims=", spatial_dims,
              " dimensions, got ", mask.dim());
  TORCH_CHECK(spacing.empty() || static_cast<int64_t>(spacing.size()) == spatial_dims, name,
              ": spacing must be empty or have spatial_dims=", spatial_dims, " entries, got ", spacing.size());
  for (double s : spacing) TORCH_CHECK(std::isfinite(s) && s > 0, name, ": spacing entries must be positive, got ", s);

  const auto m = mask.contiguous();
  auto out = torch::empty(m.sizes(), m.options().dtype(float64 ? at::kDouble : at::kFloat));
  auto index = torch::empty(want_indices ? m.sizes() : at::IntArrayRef{0}, m.options().dtype(at::kLong));
  if (m.numel() == 0) return {out, index};
  int64_t* ip = want_indices ? index.data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> sizes(m.sizes().end() - spatial_dims, m.sizes().end());
  const int64_t batch = m.numel() / std::accumulate(sizes.begin(), sizes.end(), int64_t(1), std::multiplies<>());
  const bool isotropic = spacing.empty();
  if (isotropic) spacing.assign(spatial_dims, 1.0);
  double max_d2 = 0;
  for (auto s : sizes) max_d2 += static_cast<double>(s) * s;
  const auto* mp = reinterpret_cast<const uint8_t*>(m.data_ptr());

  if (float64) {
    double* o = out.data_ptr<double>();
    run_passes<double, double>(mp, o, o, batch, sizes, spacing, squared, ip);
  } else if (isotropic && max_d2 < 16777216.0) {  // integer squared distances are exact in float32
    float* o = out.data_ptr<float>();
    run_passes<float, float>(mp, o, o, batch, sizes, spacing, squared, ip);
  } else {  // float32 results through a float64 work buffer, a group of whole maps at a time
    const int64_t map_size = m.numel() / batch;
    const int64_t maps_per_chunk = std::max<int64_t>(1, std::min<int64_t>(batch, kWorkVoxels / map_size));
    std::vector<double> work(static_cast<size_t>(maps_per_chunk * map_size));
    float* o = out.data_ptr<float>();
    for (int64_t first = 0; first < batch; first += maps_per_chunk) {
      const int64_t maps = std::min(maps_per_chunk, batch - first);
      run_passes<double, float>(mp + first * map_size, work.data(), o + first * map_size, maps, sizes, spacing,
                                squared, ip == nullptr ? nullptr : ip + first * map_size);
    }
  }
  return {out, index};
}

}  // namespace

torch::Tensor distance_transform_cpu(const torch::Tensor& mask, int64_t spatial_dims, std::vector<double> spacing,
                                     bool squared, bool float64) {
  return std::get<0>(transform(mask, spatial_dims, std::move(spacing), squared, float64, false,
                               "distance_transform_cpu"));
}

std::tuple<torch::Tensor, torch::Tensor> feature_transform_cpu(const torch::Tensor& mask, int64_t spatial_dims,
                                                               std::vector<double> spacing, bool squared,
                                                               bool float64) {
  return transform(mask, spatial_dims, std::move(spacing), squared, float64, true, "feature_transform_cpu");
}

}  // namespace fastmed
