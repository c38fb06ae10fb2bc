// Exact Euclidean distance transform on CUDA tensors: the algorithm of csrc/distance_transform_cpu.cpp with one
// thread per line.
//
// Pass 1 (last axis): each thread sweeps its line twice and writes squared distances to the nearest zero.
// Passes 2.. (the other axes, from the second-last to the first): each thread builds the lower envelope of the
// parabolas w (q - p)^2 + f(p) of its line (Felzenszwalb & Huttenlocher), keeping the envelope's roots v and their
// values f(v) in global scratch laid out [position][line of the launch] (neighbouring threads touch neighbouring
// addresses), and recomputing the breakpoints z from them when needed instead of storing them.  Lines of strided
// axes are read coalesced: neighbouring threads own neighbouring inner offsets.  Envelope arithmetic is float64,
// as on the CPU, so unit-spacing squared distances are exact.  A map with no zero voxel gets +inf everywhere.
//
// Feature transform (feature_transform_cuda): the passes also carry each voxel's nearest-zero flat index within its
// map (int64, in place in the index output); an envelope launch keeps each root's index in scratch too (the
// line is overwritten in place), with kDtIndexScratchEntries entries at most.  Ties: see distance_transform.cuh.
//
// Memory: besides the output, scratch is bounded whatever the batch.  An envelope pass runs as launches of at most
// dt_lines_per_launch(...) lines, each with kDtScratchEntries entries of (root, value) scratch at most (768 MiB);
// float32 results that need a float64 work buffer (spacing given, or huge maps) go through it kWorkVoxels voxels
// (whole maps) at a time.  Lines and maps are independent, so the chunking does not change any result.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "distance_transform.cuh"
#include "fastmed_ext.h"

namespace fastmed {

namespace {

constexpr int kThreads = 128;
// float64 work buffer of float32 results: whole maps, at most this many voxels at a time (one map if larger).
constexpr int64_t kWorkVoxels = int64_t(1) << 27;  // 1 GiB

inline unsigned int blocks_for(int64_t lines) {
  return static_cast<unsigned int>((lines + kThreads - 1) / kThreads);
}

// One thread per line of the last axis: `lines` contiguous lines of length n; idx (nullptr without indices): the
// nearest zero's flat index within its map of map_size voxels.
template <typename O>
__global__ void line_pass_kernel(const uint8_t* __restrict__ mask, O* __restrict__ out, int64_t lines, int64_t n,
                                 double s, bool take_sqrt, int64_t* __restrict__ idx, int64_t map_size) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l < lines)
    dt_line_pass(mask + l * n, out + l * n, n, s, take_sqrt, idx == nullptr ? nullptr : idx + l * n,
                 (l * n) % map_size);
}

// One thread per line of an axis of length n and stride `inner`: lines [first, first + count) of the pass (line l
// starts at (l / inner) * n * inner + l % inner).  May run in place.
// vbuf, fbuf (and ibuf with indices): scratch of n * count entries each, entry k of the launch's line t at
// k * count + t.  idx (nullptr without indices): nearest-zero indices, same layout as src, updated in place.
template <typename W, typename O>
__global__ void envelope_kernel(const W* src, O* dst, int32_t* __restrict__ vbuf, W* __restrict__ fbuf,
                                int64_t* idx, int64_t* __restrict__ ibuf, int64_t first, int64_t count, int64_t n,
                                int64_t inner, double w, bool take_sqrt) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= count) return;
  const int64_t l = first + t;
  const int64_t base = (l / inner) * n * inner + (l % inner);
  dt_envelope_line(src + base, dst + base, inner, n, vbuf + t, fbuf + t, count, w, take_sqrt,
                   static_cast<const void*>(src) == static_cast<const void*>(dst),
                   idx == nullptr ? nullptr : idx + base, ibuf == nullptr ? nullptr : ibuf + t);
}

// One envelope pass (axis of length n, stride inner, `lines` lines) in launches of at most `per_launch` lines.
template <typename W, typename O>
void envelope_pass(const W* src, O* dst, int32_t* vbuf, W* fbuf, int64_t* idx, int64_t* ibuf, int64_t lines,
                   int64_t per_launch, int64_t n, int64_t inner, double w, bool take_sqrt, cudaStream_t stream) {
  for (int64_t first = 0; first < lines; first += per_launch) {
    const int64_t count = std::min(per_launch, lines - first);
    envelope_kernel<W, O><<<blocks_for(count), kThreads, 0, stream>>>(src, dst, vbuf, fbuf, idx, ibuf, first, count,
                                                                       n, inner, w, take_sqrt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// idx (nullptr without indices): the nearest zero's flat index within its map, per voxel.
template <typename W, typename O>
void run_passes(const uint8_t* mask, W* work, O* out, int64_t* idx, int64_t batch, const std::vector<int64_t>& sizes,
                const std::vector<double>& spacing, bool squared, const at::TensorOptions& opts,
                cudaStream_t stream) {
  const int64_t nd = static_cast<int64_t>(sizes.size());
  int64_t total = batch;
  for (auto s : sizes) total *= s;
  const int64_t map_size = total / batch;
  const int64_t last = sizes[nd - 1];
  const int64_t last_lines = total / last;
  if (nd == 1) {
    line_pass_kernel<O><<<blocks_for(last_lines), kThreads, 0, stream>>>(mask, out, last_lines, last, spacing[0],
                                                                           !squared, idx, map_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  line_pass_kernel<W><<<blocks_for(last_lines), kThreads, 0, stream>>>(mask, work, last_lines, last,
                                                                         spacing[nd - 1], false, idx, map_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Envelope scratch: enough for the largest launch of any axis, at most `budget` entries (or one line).
  const int64_t budget = idx == nullptr ? kDtScratchEntries : kDtIndexScratchEntries;
  int64_t entries = 0;
  for (int64_t d = 0; d < nd - 1; ++d)
    entries = std::max(entries, dt_lines_per_launch(total / sizes[d], sizes[d], budget) * sizes[d]);
  auto vbuf = torch::empty({entries}, opts.dtype(at::kInt));
  auto fbuf = torch::empty({entries}, opts.dtype(c10::CppTypeToScalarType<W>::value));
  auto ibuf = torch::empty({idx == nullptr ? 0 : entries}, opts.dtype(at::kLong));
  int64_t* ib = idx == nullptr ? nullptr : ibuf.data_ptr<int64_t>();
  int64_t inner = last;
  for (int64_t d = nd - 2; d >= 0; --d) {
    const int64_t n = sizes[d];
    const int64_t lines = total / n;
    const int64_t per_launch = dt_lines_per_launch(lines, n, budget);
    const double w = spacing[d] * spacing[d];
    if (d == 0)
      envelope_pass<W, O>(work, out, vbuf.data_ptr<int32_t>(), fbuf.data_ptr<W>(), idx, ib, lines, per_launch, n,
                          inner, w, !squared, stream);
    else
      envelope_pass<W, W>(work, work, vbuf.data_ptr<int32_t>(), fbuf.data_ptr<W>(), idx, ib, lines, per_launch, n,
                          inner, w, false, stream);
    inner *= n;
  }
}

// The transform, and with want_indices the nearest zero's flat index within its map (int64, -1 where none).
std::tuple<torch::Tensor, torch::Tensor> transform(const torch::Tensor& mask, int64_t spatial_dims,
                                                   std::vector<double> spacing, bool squared, bool float64,
                                                   bool want_indices, const char* name) {
  TORCH_CHECK(mask.is_cuda(), name, ": mask must be a CUDA tensor, got ", mask.device());
  TORCH_CHECK(mask.scalar_type() == at::kByte || mask.scalar_type() == at::kBool, name,
              ": mask must be uint8 or bool (nonzero = foreground), got ", mask.scalar_type());
  TORCH_CHECK(spatial_dims >= 1 && spatial_dims <= 3, name, ": spatial_dims must be 1, 2 or 3, got ", spatial_dims);
  TORCH_CHECK(mask.dim() >= spatial_dims, name, ": mask must have at least spatial_dims=", spatial_dims,
              " dimensions, got ", mask.dim());
  TORCH_CHECK(spacing.empty() || static_cast<int64_t>(spacing.size()) == spatial_dims, name,
              ": spacing must be empty or have spatial_dims=", spatial_dims, " entries, got ", spacing.size());
  for (double s : spacing) TORCH_CHECK(std::isfinite(s) && s > 0, name, ": spacing entries must be positive, got ", s);

  const c10::cuda::CUDAGuard guard(mask.device());
  const auto m = mask.contiguous();
  auto out = torch::empty(m.sizes(), m.options().dtype(float64 ? at::kDouble : at::kFloat));
  auto index = torch::empty(want_indices ? m.sizes() : at::IntArrayRef{0}, m.options().dtype(at::kLong));
  if (m.numel() == 0) return {out, index};
  int64_t* ip = want_indices ? index.data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> sizes(m.sizes().end() - spatial_dims, m.sizes().end());
  int64_t map_size = 1;
  double max_d2 = 0;
  for (auto s : sizes) {
    TORCH_CHECK(s < (int64_t(1) << 31), name, ": spatial sizes must be below 2^31, got ", s);
    map_size *= s;
    max_d2 += static_cast<double>(s) * s;
  }
  const int64_t batch = m.numel() / map_size;
  const bool isotropic = spacing.empty();
  if (isotropic) spacing.assign(spatial_dims, 1.0);
  const auto* mp = reinterpret_cast<const uint8_t*>(m.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = m.options();

  if (float64) {
    double* o = out.data_ptr<double>();
    run_passes<double, double>(mp, o, o, ip, batch, sizes, spacing, squared, opts, stream);
  } else if (isotropic && max_d2 < 16777216.0) {  // integer squared distances are exact in float32
    float* o = out.data_ptr<float>();
    run_passes<float, float>(mp, o, o, ip, batch, sizes, spacing, squared, opts, stream);
  } else {  // float32 results through a float64 work buffer, a group of whole maps at a time
    const int64_t maps_per_chunk = std::max<int64_t>(1, std::min<int64_t>(batch, kWorkVoxels / map_size));
    auto work = torch::empty({maps_per_chunk * map_size}, opts.dtype(at::kDouble));
    float* o = out.data_ptr<float>();
    for (int64_t first = 0; first < batch; first += maps_per_chunk) {
      const int64_t maps = std::min(maps_per_chunk, batch - first);
      run_passes<double, float>(mp + first * map_size, work.data_ptr<double>(), o + first * map_size,
                                ip == nullptr ? nullptr : ip + first * map_size, maps, sizes, spacing, squared, opts,
                                stream);
    }
  }
  return {out, index};
}

}  // namespace

torch::Tensor distance_transform_cuda(const torch::Tensor& mask, int64_t spatial_dims, std::vector<double> spacing,
                                      bool squared, bool float64) {
  return std::get<0>(transform(mask, spatial_dims, std::move(spacing), squared, float64, false,
                               "distance_transform_cuda"));
}

std::tuple<torch::Tensor, torch::Tensor> feature_transform_cuda(const torch::Tensor& mask, int64_t spatial_dims,
                                                                std::vector<double> spacing, bool squared,
                                                                bool float64) {
  return transform(mask, spatial_dims, std::move(spacing), squared, float64, true, "feature_transform_cuda");
}

}  // namespace fastmed
