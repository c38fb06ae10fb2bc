// fastmed::window_attention on CPU tensors, for windows of at most 512 tokens (the `cpp` backend of
// fastmed.ops.window_attention: Swin-Unet's 7x7 = 49, SwinUNETR's 7x7x7 = 343, 8x8x8; larger windows take torch's
// flash-attention kernel, see fastmed/ops/window_attention.py).
//
// One pass per window, straight from and to the token grid: the cyclic shift, the window partition and the padding
// are index arithmetic (a window's token rows are computed, padding tokens read the qkv of a padding token), the
// window's token rows are copied once (whole rows, the next window's prefetched meanwhile), the shift mask comes from
// the tokens' region ids, and per head q k^T, the bias, the mask, the softmax and P v run on the window's rows in
// the cache (only k, or v in the backward, transposed into scratch); the window's output rows are written whole.
// No rolled, partitioned or padded copy of the grid.
//   forward   reads qkv and the (heads, n, n) bias once, writes out and the probabilities (training) or the
//             log-sum-exp (inference; the backward then recomputes the probabilities);
//   backward  reads qkv, dout and the saved tensor once, writes dqkv once (every real token belongs to exactly one
//             window), and the bias and padding-token gradients summed per block of windows.
// Work items are blocks of windows (every head) fixed by the geometry and the dtype alone (at most kMaxBlocks of
// them, fewer when their bias-gradient partials would pass kMaxPartialBytes, at least kMinBlock windows each), and
// the per-block bias and padding gradients are added in block order: the results are bit-identical for any number of
// threads.  float32 and float64; float16/bfloat16 are computed in float32 by the caller.
// Subnormals are flushed to zero inside the kernel's threads (cpu_denormals.h): Intel cores take a microcode assist
// for each operation on one, and the shift mask's tiny probabilities make many.
#include "cpu_denormals.h"
#include "cpu_dispatch.h"
#include "fastmed_ext.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

namespace fastmed {
namespace window_attention_cpu {

constexpr int64_t kMaxTokens = 512;  // tokens per window this kernel takes (scratch: a few n x n per thread)
constexpr int64_t kMaxBlocks = 64;   // blocks of windows (bias / padding gradients: one partial per block)
constexpr int64_t kMinBlocks = 8;    // ... at least this many when there are enough windows (parallel work)
// The blocks' (heads, n, n) bias-gradient partials, at most (under glibc's 32 MiB mmap ceiling: a larger buffer would
// be mapped anew, page by page, every call).
constexpr int64_t kMaxPartialBytes = int64_t{24} << 20;
constexpr int64_t kMinBlock = 4;     // windows per block at least (fewer partials to write and add)
constexpr double kMaskValue = -100.0;  // timm / Swin / MONAI's shifted-window mask

struct Geometry {
  int64_t batch = 0, grid[3] = {}, padded[3] = {}, window[3] = {}, shift[3] = {}, cells[3] = {};
  int64_t per_batch = 0, windows = 0, n = 0, np = 0, dp = 0, heads = 0, head_dim = 0, channels = 0;
  double scale = 1.0;
  bool shifted = false;
};

// A (window, head)'s working set, 32-byte aligned rows; zeroed once, so padded lanes read zeros.
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> buffer;
  std::vector<int64_t> row_store;     // rows / next_rows: this window's token rows and the next one's
  std::vector<int32_t> region_store;  // region / next_region: their shift regions
  int64_t *rows = nullptr, *next_rows = nullptr;
  int32_t *region = nullptr, *next_region = nullptr;
  // q, k, v, dout: copies when the head dim is not a multiple of the vector width; kt, vt: k and v as columns; p, ds:
  // scores / probabilities and their gradient; tmp: a product; mask: the window's shift mask; inv: 1 / the softmax
  // sums; x: the window's qkv rows; y: its out / d out rows; g: its d qkv rows; db: the block's bias gradient
  T *q = nullptr, *k = nullptr, *kt = nullptr, *v = nullptr, *vt = nullptr, *dout = nullptr, *p = nullptr,
    *ds = nullptr, *tmp = nullptr, *mask = nullptr, *inv = nullptr, *x = nullptr, *y = nullptr, *g = nullptr,
    *db = nullptr;

  Scratch(const Geometry& geo, bool backward) : row_store(2 * geo.n), region_store(2 * geo.n) {
    constexpr int64_t L = 32 / sizeof(T);
    const int64_t nd = geo.n * geo.dp, dn = geo.dp * geo.np, nn = geo.n * geo.np, c = geo.channels;
    const int64_t sizes[15] = {nd, nd, dn, nd, dn, nd, nn, nn, nd, nn, geo.np, geo.n * 3 * c, geo.n * c,
                               backward ? geo.n * 3 * c : 0, backward ? geo.heads * geo.n * geo.n : 0};
    int64_t total = L;  // room to align the start
    for (int64_t z : sizes) total += (z + L - 1) / L * L;
    buffer.reset(new T[total]());
    T* at = buffer.get();
    at += (L - (reinterpret_cast<uintptr_t>(at) / sizeof(T)) % L) % L;
    T** slots[15] = {&q, &k, &kt, &v, &vt, &dout, &p, &ds, &tmp, &mask, &inv, &x, &y, &g, &db};
    for (int i = 0; i < 15; ++i) {
      *slots[i] = at;
      at += (sizes[i] + L - 1) / L * L;
    }
    rows = row_store.data();
    next_rows = rows + geo.n;
    region = region_store.data();
    next_region = region + geo.n;
  }
};

#define FASTMED_KERNELS_HEADER "window_attention_cpu_kernels.h"
#include "cpu_kernels_twice.h"

namespace {

Geometry geometry(const at::Tensor& qkv, int64_t heads, const std::vector<int64_t>& window,
                  const std::vector<int64_t>& shift, double scale) {
  TORCH_CHECK_VALUE(qkv.device().is_cpu() && qkv.is_contiguous() &&
                        (qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kDouble),
                    "window_attention_cpu: qkv must be a contiguous float32/float64 CPU tensor");
  TORCH_CHECK_VALUE(qkv.dim() == 5, "window_attention_cpu: qkv must be (B, D, H, W, 3C), got ", qkv.dim(), " dims");
  TORCH_CHECK_VALUE(window.size() == 3 && shift.size() == 3, "window_attention_cpu: window and shift need 3 values");
  TORCH_CHECK_VALUE(heads >= 1 && qkv.size(4) % (3 * heads) == 0, "window_attention_cpu: qkv's last dim ",
                    qkv.size(4), " is not 3 * C with C divisible by heads = ", heads);
  Geometry g;
  g.batch = qkv.size(0);
  int64_t n = 1;
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK_VALUE(window[a] >= 1 && shift[a] >= 0 && shift[a] < window[a],
                      "window_attention_cpu: need window >= 1 and 0 <= shift < window on every axis");
    g.grid[a] = qkv.size(a + 1);
    g.window[a] = window[a];
    g.shift[a] = shift[a];
    g.cells[a] = (g.grid[a] + window[a] - 1) / window[a];
    g.padded[a] = g.cells[a] * window[a];
    g.shifted = g.shifted || shift[a] > 0;
    n *= window[a];
  }
  TORCH_CHECK_VALUE(n <= kMaxTokens, "window_attention_cpu: windows of at most ", kMaxTokens, " tokens, got ", n);
  g.per_batch = g.cells[0] * g.cells[1] * g.cells[2];
  g.windows = g.batch * g.per_batch;
  g.n = n;
  g.heads = heads;
  g.channels = qkv.size(4) / 3;
  g.head_dim = g.channels / heads;
  const int64_t lanes = qkv.scalar_type() == at::kDouble ? 4 : 8;
  g.np = (n + lanes - 1) / lanes * lanes;
  g.dp = (g.head_dim + lanes - 1) / lanes * lanes;
  g.scale = scale;
  return g;
}

// The kernels' padded bias (heads, n, np): the bias (zero without one), -inf in the padded columns (so that the
// softmax runs on whole vectors).
at::Tensor padded_bias(const at::Tensor* bias, const at::Tensor& qkv, const Geometry& g) {
  auto add = at::full({g.heads, g.n, g.np}, -std::numeric_limits<double>::infinity(), qkv.options());
  auto real = add.narrow(2, 0, g.n);
  if (bias != nullptr) {
    real.copy_(bias->view({g.heads, g.n, g.n}));
  } else {
    real.zero_();
  }
  return add;
}

// Windows per block: at most kMaxBlocks blocks, and for large windows few enough that their bias-gradient partials
// (one (heads, n, n) per block) stay within kMaxPartialBytes (SwinUNETR's 343 tokens, 3 heads, float32: 1.4 MB each,
// at most 17 blocks), but not fewer than kMinBlocks; at least kMinBlock windows per block.
int64_t block_size(const Geometry& g, int64_t elem_size) {
  const int64_t partial = g.heads * g.n * g.n * elem_size;
  const int64_t max_blocks = std::clamp<int64_t>(kMaxPartialBytes / partial, kMinBlocks, kMaxBlocks);
  return std::max<int64_t>(kMinBlock, (g.windows + max_blocks - 1) / max_blocks);
}

void check_operand(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == like.scalar_type() && t.is_contiguous(),
                    "window_attention_cpu: ", name, " must be a contiguous CPU tensor of qkv's dtype");
}

// slots (windows,): where window w (raster order: batch, then cells) keeps its saved rows; a permutation.
void check_slots(const at::Tensor& slots, const Geometry& g) {
  TORCH_CHECK_VALUE(slots.device().is_cpu() && slots.scalar_type() == at::kLong && slots.is_contiguous() &&
                        slots.numel() == g.windows,
                    "window_attention_cpu: slots must be a contiguous int64 CPU tensor of the ", g.windows,
                    " windows, got ", slots.numel(), " values");
  const int64_t* s = slots.data_ptr<int64_t>();
  std::vector<char> seen(g.windows, 0);
  for (int64_t w = 0; w < g.windows; ++w) {
    TORCH_CHECK_VALUE(s[w] >= 0 && s[w] < g.windows && !seen[s[w]], "window_attention_cpu: slots must be a "
                      "permutation of the windows");
    seen[s[w]] = 1;
  }
}

// The bias (heads, n, n), the padding token (3C) and the slots of a call on qkv with geometry g.
void check_operands(const at::Tensor* bias, const at::Tensor* pad, const at::Tensor& slots, const at::Tensor& qkv,
                    const Geometry& g) {
  if (bias != nullptr) {
    check_operand(*bias, qkv, "bias");
    TORCH_CHECK_VALUE(bias->numel() == g.heads * g.n * g.n, "window_attention_cpu: bias must be (heads, n, n)");
  }
  if (pad != nullptr) {
    check_operand(*pad, qkv, "qkv_pad");
    TORCH_CHECK_VALUE(pad->numel() == 3 * g.channels, "window_attention_cpu: qkv_pad must have 3C values");
  }
  check_slots(slots, g);
}

const at::Tensor* present(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

template <typename T>
const T* data_or_null(const at::Tensor* t) {
  return t != nullptr ? t->data_ptr<T>() : nullptr;
}

// (blocks, m) -> (m,): each value summed over the blocks in block order (one order for any number of threads).
at::Tensor sum_blocks(const at::Tensor& parts) {
  const int64_t blocks = parts.size(0), m = parts.numel() / std::max<int64_t>(blocks, 1);
  auto out = at::zeros({m}, parts.options());
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "window_attention_cpu_sum_blocks", [&] {
    const scalar_t* x = parts.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, m, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t blk = 0; blk < blocks; ++blk) {
        for (int64_t i = begin; i < end; ++i) y[i] += x[blk * m + i];
      }
    });
  });
  return out;
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& qkv, const c10::optional<at::Tensor>& bias_opt,
                                const c10::optional<at::Tensor>& pad_opt, const at::Tensor& slots, int64_t heads,
                                std::vector<int64_t> window, std::vector<int64_t> shift, double scale,
                                bool save_probabilities, bool save) {
  const Geometry g = geometry(qkv, heads, window, shift, scale);
  const at::Tensor* bias = present(bias_opt);
  const at::Tensor* pad = present(pad_opt);
  check_operands(bias, pad, slots, qkv, g);
  auto out = at::empty({g.batch, g.grid[0], g.grid[1], g.grid[2], g.channels}, qkv.options());
  // save == false (no backward will run): nothing kept, and the kernel skips the log-sum-exp
  auto saved = !save ? at::empty({0}, qkv.options())
               : save_probabilities ? at::empty({g.windows, heads, g.n, g.n}, qkv.options())
                                    : at::empty({g.windows, g.n, heads}, qkv.options());
  const int64_t bs = block_size(g, qkv.element_size()), blocks = (g.windows + bs - 1) / bs;
  const at::Tensor add = padded_bias(bias, qkv, g);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_cpu_forward", [&] {
    auto kernel = FASTMED_KERNEL(forward_windows<scalar_t>);
    const scalar_t *x = qkv.data_ptr<scalar_t>(), *b = add.data_ptr<scalar_t>(), *p = data_or_null<scalar_t>(pad);
    scalar_t *o = out.data_ptr<scalar_t>(), *sv = save ? saved.data_ptr<scalar_t>() : nullptr;
    const int64_t* sl = slots.data_ptr<int64_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals no_subnormals;
      Scratch<scalar_t> scratch(g, false);
      for (int64_t blk = begin; blk < end; ++blk) {
        kernel(g, x, b, p, o, sv, sl, save_probabilities, blk * bs, std::min(g.windows, (blk + 1) * bs), scratch);
      }
    });
  });
  return {out, saved};
}

std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& saved,
                                 const c10::optional<at::Tensor>& bias_opt, const c10::optional<at::Tensor>& pad_opt,
                                 const at::Tensor& slots, int64_t heads, std::vector<int64_t> window,
                                 std::vector<int64_t> shift, double scale, bool saved_probabilities, bool bias_grad) {
  const Geometry g = geometry(qkv, heads, window, shift, scale);
  const at::Tensor* bias = present(bias_opt);
  const at::Tensor* pad = present(pad_opt);
  check_operand(dout, qkv, "dout");
  check_operand(saved, qkv, "saved");
  TORCH_CHECK_VALUE(dout.numel() == qkv.numel() / 3, "window_attention_cpu: dout must be (B, D, H, W, C)");
  TORCH_CHECK_VALUE(saved.numel() == g.windows * heads * g.n * (saved_probabilities ? g.n : 1),
                    "window_attention_cpu: saved does not match the geometry");
  check_operands(bias, pad, slots, qkv, g);
  const int64_t bs = block_size(g, qkv.element_size()), blocks = (g.windows + bs - 1) / bs;
  auto dqkv = at::empty_like(qkv);
  const bool any_padding = g.padded[0] != g.grid[0] || g.padded[1] != g.grid[1] || g.padded[2] != g.grid[2];
  auto dbias_blocks = bias_grad ? at::empty({blocks, heads, g.n, g.n}, qkv.options()) : at::Tensor();  // written
  auto dpad_blocks = pad != nullptr && any_padding ? at::zeros({blocks, 3 * g.channels}, qkv.options()) : at::Tensor();
  // the bias only enters recomputed probabilities
  const at::Tensor add = saved_probabilities ? at::Tensor() : padded_bias(bias, qkv, g);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_cpu_backward", [&] {
    auto kernel = FASTMED_KERNEL(backward_windows<scalar_t>);
    const scalar_t *x = qkv.data_ptr<scalar_t>(), *dy = dout.data_ptr<scalar_t>(), *sv = saved.data_ptr<scalar_t>();
    const int64_t* sl = slots.data_ptr<int64_t>();
    const scalar_t *b = add.defined() ? add.data_ptr<scalar_t>() : nullptr, *p = data_or_null<scalar_t>(pad);
    scalar_t* dx = dqkv.data_ptr<scalar_t>();
    scalar_t* db = bias_grad ? dbias_blocks.data_ptr<scalar_t>() : nullptr;
    scalar_t* dp = dpad_blocks.defined() ? dpad_blocks.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const FlushDenormals no_subnormals;
      Scratch<scalar_t> scratch(g, true);
      for (int64_t blk = begin; blk < end; ++blk) {
        kernel(g, dy, x, sv, sl, saved_probabilities, b, p, dx, db != nullptr ? db + blk * heads * g.n * g.n : nullptr,
               dp != nullptr ? dp + blk * 3 * g.channels : nullptr, blk * bs, std::min(g.windows, (blk + 1) * bs),
               scratch);
      }
    });
  });
  at::Tensor dbias, dpad;
  if (bias_grad) dbias = sum_blocks(dbias_blocks).view({heads, g.n, g.n});
  if (pad != nullptr) dpad = dpad_blocks.defined() ? sum_blocks(dpad_blocks) : at::zeros({3 * g.channels}, qkv.options());
  return {dqkv, dbias, dpad};
}

}  // namespace window_attention_cpu

std::vector<at::Tensor> window_attention_forward_cpu(const at::Tensor& qkv, const c10::optional<at::Tensor>& bias,
                                                     const c10::optional<at::Tensor>& qkv_pad, const at::Tensor& slots,
                                                     int64_t heads, std::vector<int64_t> window,
                                                     std::vector<int64_t> shift, double scale,
                                                     bool save_probabilities, bool save) {
  return window_attention_cpu::forward(qkv, bias, qkv_pad, slots, heads, std::move(window), std::move(shift), scale,
                                       save_probabilities, save);
}

std::vector<at::Tensor> window_attention_backward_cpu(const at::Tensor& dout, const at::Tensor& qkv,
                                                      const at::Tensor& saved, const c10::optional<at::Tensor>& bias,
                                                      const c10::optional<at::Tensor>& qkv_pad,
                                                      const at::Tensor& slots, int64_t heads,
                                                      std::vector<int64_t> window, std::vector<int64_t> shift,
                                                      double scale, bool saved_probabilities, bool bias_grad) {
  return window_attention_cpu::backward(dout, qkv, saved, bias, qkv_pad, slots, heads, std::move(window), std::move(shift),
                                        scale, saved_probabilities, bias_grad);
}

}  // namespace fastmed
