// fastmed::norm_act on CPU tensors: y = act((x - mean) * rstd * weight + bias + residual), forward and backward,
// for instance, group and batch statistics, contiguous (N, C, *spatial) and channels-last inputs without copies.
//
// The `cpp` backend of fastmed.ops.norm_act (activations identity, relu, leaky_relu and prelu; the smooth ones run
// their torch activation around it, see fastmed/ops/norm_act.py).  Per call, over the tensor seen as (N, C, S):
//   forward   1 read of x for the statistics + 1 read of x (and of the residual) and 1 write of y;
//   backward  1 read of x and dy (and of the residual) for the sums + 1 read of each and 1 write of dx (and of
//             d residual).  Nothing is saved besides x and the statistics: z is recomputed.
// Work items are fixed runs of the data (kSegment values of one (n, c) plane, or kSegment / C voxels of one
// channels-last sample), threaded with at::parallel_for; every sum is formed inside one item and items are
// combined in a fixed order, so the results are bit-identical for any number of threads.  Statistics are exact
// when |mean| >> std (two-pass per chunk, Chan's update across chunks, in double), like torch's instance norm and
// unlike torch's channels-last CPU kernels (which sum x and x^2).  Float32 and float64 are computed in their own
// precision (sums of chunks in double); float16/bfloat16 inputs are computed in float32.
#include "cpu_dispatch.h"
#include "fastmed_ext.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace fastmed {
namespace norm_act_cpu {

enum class Act { Identity, Relu, Leaky };

constexpr int64_t kChunk = 512;       // values summed in the input's precision before a double accumulation
constexpr int64_t kSegment = 32768;   // values per work item (a multiple of kChunk)
constexpr int64_t kChunkValues = 2048;  // values per channels-last chunk (kChunkValues / C voxels)
constexpr int64_t kParallelValues = 65536;  // values per parallel task, at least

// Count, mean and sum of squared deviations, combined with Chan's parallel update.
struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;
  void merge(double nb, double mb, double m2b) {
    if (nb <= 0.0) return;
    const double total = count + nb;
    const double delta = mb - mean;
    mean += delta * (nb / total);
    m2 += m2b + delta * delta * (count * nb / total);
    count = total;
  }
};

#define FASTMED_KERNELS_HEADER "norm_act_cpu_kernels.h"
#include "cpu_kernels_twice.h"

namespace {

Act act_of(const std::string& activation) {
  if (activation == "identity") return Act::Identity;
  if (activation == "relu") return Act::Relu;
  if (activation == "leaky_relu" || activation == "prelu") return Act::Leaky;
  TORCH_CHECK(false, "norm_act_cpu: activation must be identity, relu, leaky_relu or prelu, got '", activation, "'");
}

// The tensor seen as (N, C, S): sizes, and whether it is laid out channels-last ((N, S, C) in memory) rather than
// contiguous.  Anything else is copied to contiguous first.
struct Geometry {
  int64_t N, C, S;
  bool channels_last;
};

bool dense_channels_last(const at::Tensor& x) {
  const int64_t C = x.size(1);
  if (C > 1 && x.stride(1) != 1) return false;
  int64_t expected = C;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return x.size(0) == 1 || x.stride(0) == expected;
}

// x in the accumulation dtype and a dense layout the kernels read (a copy only when it is neither).
at::Tensor prepare(const at::Tensor& x, at::ScalarType acc, Geometry* g) {
  TORCH_CHECK(x.dim() >= 3 && x.numel() > 0, "norm_act_cpu: x must be a non-empty (N, C, *spatial) tensor, got ",
              x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "norm_act_cpu: x must be a CPU tensor");
  at::Tensor t = x.to(acc);
  g->N = t.size(0);
  g->C = t.size(1);
  g->S = t.numel() / (g->N * g->C);
  if (t.is_contiguous()) {
    g->channels_last = false;
  } else if (dense_channels_last(t)) {
    g->channels_last = true;
  } else {
    t = t.contiguous();
    g->channels_last = false;
  }
  return t;
}

// `t` (shaped like `like`) in the accumulation dtype with exactly the strides of `like` (a copy when they differ).
at::Tensor like_layout(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), "norm_act_cpu: ", name, " must have the shape of x ", like.sizes(),
              ", got ", t.sizes());
  at::Tensor u = t.to(like.scalar_type());
  if (u.strides() == like.strides()) return u;
  at::Tensor out = at::empty_like(like);
  out.copy_(u);
  return out;
}

// A per-channel parameter as C values of type T: the tensor ((C,) or (1,), any dtype and stride), else `fill`.
template <typename T>
std::vector<T> per_channel(const c10::optional<at::Tensor>& t, int64_t C, T fill, const char* name) {
  std::vector<T> out(C, fill);
  if (!t.has_value() || !t->defined()) return out;
  const at::Tensor v = t->to(c10::CppTypeToScalarType<T>::value).contiguous();
  TORCH_CHECK(v.dim() == 1 && (v.size(0) == C || v.size(0) == 1), "norm_act_cpu: ", name, " must have shape (",
              C, ",) or (1,), got ", v.sizes());
  const T* p = v.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) out[c] = p[v.size(0) == 1 ? 0 : c];
  return out;
}

// Statistics rows: instance (n, c) -> n * C + c, group (n, g) -> n * G + c / (C / G), batch c -> c.
struct Rows {
  enum Kind { Instance, Group, Batch } kind;
  int64_t N, C, G, cg, R;
  Rows(const std::string& name, int64_t N_, int64_t C_, int64_t num_groups) : N(N_), C(C_) {
    if (name == "instance") {
      kind = Instance, G = C, cg = 1, R = N * C;
    } else if (name == "group") {
      TORCH_CHECK(num_groups >= 1 && C % num_groups == 0, "norm_act_cpu: num_groups must divide the ", C,
                  " channels, got ", num_groups);
      kind = Group, G = num_groups, cg = C / num_groups, R = N * num_groups;
    } else {
      TORCH_CHECK(name == "batch", "norm_act_cpu: kind must be instance, group or batch, got '", name, "'");
      kind = Batch, G = 1, cg = C, R = C;
    }
  }
  int64_t row(int64_t n, int64_t c) const { return kind == Batch ? c : n * G + c / cg; }
  // The (n, c) pairs of row r, in the fixed order the sums visit them.
  template <typename F>
  void for_each(int64_t r, F&& f) const {
    if (kind == Batch) {
      for (int64_t n = 0; n < N; ++n) f(n, r);
    } else {
      const int64_t n = r / G, c0 = (r % G) * cg;
      for (int64_t c = c0; c < c0 + cg; ++c) f(n, c);
    }
  }
};

// The fixed work items over the (N, C, S) view: contiguous, kSegment values of one (n, c) plane; channels-last,
// `seg` voxels (about kSegment values) of one sample.  Partial results of item i for channel c sit at
// slot(n, c, s) = index into arrays of N * C * nseg values.
struct Items {
  int64_t N, C, S, seg, nseg, chunk_vox;
  bool cl;
  explicit Items(const Geometry& g) : N(g.N), C(g.C), S(g.S), cl(g.channels_last) {
    if (cl) {
      chunk_vox = std::max<int64_t>(1, kChunkValues / C);
      seg = chunk_vox * std::max<int64_t>(1, kSegment / (chunk_vox * C));
    } else {
      chunk_vox = 1;
      seg = kSegment;
    }
    nseg = (S + seg - 1) / seg;
  }
  int64_t count() const { return cl ? N * nseg : N * C * nseg; }
  int64_t length(int64_t s) const { return std::min(seg, S - s * seg); }
  int64_t slot(int64_t n, int64_t c, int64_t s) const { return cl ? (n * nseg + s) * C + c : (n * C + c) * nseg + s; }
  // Items per parallel task: at least kParallelValues values, so that small tensors run on the calling thread.
  int64_t grain() const { return std::max<int64_t>(1, kParallelValues / (std::min(seg, S) * (cl ? C : 1))); }
};

template <typename T>
void compute_stats(const T* x, const Items& it, const Rows& rows, double eps, T* mean, T* rstd) {
  std::vector<double> pm(it.N * it.C * it.nseg), pm2(pm.size());
  at::parallel_for(0, it.count(), it.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> work(it.cl ? 3 * it.C : 0);
    for (int64_t i = begin; i < end; ++i) {
      if (it.cl) {
        const int64_t n = i / it.nseg, s = i % it.nseg;
        const int64_t slot = it.slot(n, 0, s);
        FASTMED_KERNEL(stats_channels_last<T>)(x + (n * it.S + s * it.seg) * it.C, it.length(s), it.C, it.chunk_vox,
                                               work.data(), &pm[slot], &pm2[slot]);
      } else {
        const int64_t nc = i / it.nseg, s = i % it.nseg;
        FASTMED_KERNEL(stats_contiguous<T>)(x + nc * it.S + s * it.seg, it.length(s), &pm[i], &pm2[i]);
      }
    }
  });
  at::parallel_for(0, rows.R, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      Moments m;
      rows.for_each(r, [&](int64_t n, int64_t c) {
        for (int64_t s = 0; s < it.nseg; ++s) {
          const int64_t k = it.slot(n, c, s);
          m.merge(double(it.length(s)), pm[k], pm2[k]);
        }
      });
      const double var = std::max(m.m2 / m.count, 0.0);
      mean[r] = T(m.mean);
      rstd[r] = T(1.0 / std::sqrt(var + eps));
    }
  });
}

template <typename T>
struct Coefficients {  // per (n, c): z = (x - m) * a + b + r, g = dy * act'(z)
  std::vector<T> m, a, rs, b, slope;
};

template <typename T>
Coefficients<T> coefficients(const Rows& rows, const T* mean, const T* rstd, const std::vector<T>& w,
                             const std::vector<T>& b, const std::vector<T>& slope) {
  const int64_t N = rows.N, C = rows.C;
  Coefficients<T> k{std::vector<T>(N * C), std::vector<T>(N * C), std::vector<T>(N * C), b, slope};
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t r = rows.row(n, c);
      k.m[n * C + c] = mean[r];
      k.rs[n * C + c] = rstd[r];
      k.a[n * C + c] = rstd[r] * w[c];
    }
  }
  return k;
}

template <typename T, Act A, bool RES>
void apply(const T* x, const T* r, T* y, const Items& it, const Coefficients<T>& k) {
  at::parallel_for(0, it.count(), it.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (it.cl) {
        const int64_t n = i / it.nseg, s = i % it.nseg;
        const int64_t off = (n * it.S + s * it.seg) * it.C;
        FASTMED_KERNEL(apply_channels_last<T, A, RES>)(x + off, RES ? r + off : r, y + off, it.length(s), it.C,
                                                       &k.m[n * it.C], &k.a[n * it.C], k.b.data(), k.slope.data());
      } else {
        const int64_t nc = i / it.nseg, s = i % it.nseg, c = nc % it.C;
        const int64_t off = nc * it.S + s * it.seg;
        FASTMED_KERNEL(apply_contiguous<T, A, RES>)(x + off, RES ? r + off : r, y + off, it.length(s), k.m[nc],
                                                    k.a[nc], k.b[c], k.slope[c]);
      }
    }
  });
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& r, at::Tensor& y, const Items& it, const Rows& rows,
                  const T* mean, const T* rstd, const std::vector<T>& w, const std::vector<T>& b,
                  const std::vector<T>& slope, Act act) {
  const Coefficients<T> k = coefficients<T>(rows, mean, rstd, w, b, slope);
  const T* xp = x.data_ptr<T>();
  const T* rp = r.defined() ? r.data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const bool res = r.defined();
  switch (act) {
    case Act::Identity:
      res ? apply<T, Act::Identity, true>(xp, rp, yp, it, k) : apply<T, Act::Identity, false>(xp, rp, yp, it, k);
      break;
    case Act::Relu:
      res ? apply<T, Act::Relu, true>(xp, rp, yp, it, k) : apply<T, Act::Relu, false>(xp, rp, yp, it, k);
      break;
    case Act::Leaky:
      res ? apply<T, Act::Leaky, true>(xp, rp, yp, it, k) : apply<T, Act::Leaky, false>(xp, rp, yp, it, k);
      break;
  }
}

// Backward: per (n, c) sums of g and g * (x - m) (and the prelu sums), in a fixed order.
template <typename T, Act A, bool RES, bool PRELU>
void backward_sums(const T* dy, const T* x, const T* r, const Items& it, const Coefficients<T>& k,
                   std::vector<double>& sg, std::vector<double>& sgx, std::vector<double>& sa) {
  std::vector<double> psg(it.N * it.C * it.nseg), psgx(psg.size()), psa(psg.size());
  at::parallel_for(0, it.count(), it.grain(), [&](int64_t begin, int64_t end) {
    std::vector<T> work(it.cl ? 3 * it.C : 0);
    for (int64_t i = begin; i < end; ++i) {
      if (it.cl) {
        const int64_t n = i / it.nseg, s = i % it.nseg;
        const int64_t off = (n * it.S + s * it.seg) * it.C, slot = it.slot(n, 0, s);
        FASTMED_KERNEL(backward_sums_channels_last<T, A, RES, PRELU>)(
            dy + off, x + off, RES ? r + off : r, it.length(s), it.C, it.chunk_vox, &k.m[n * it.C], &k.a[n * it.C],
            k.b.data(), k.slope.data(), work.data(), &psg[slot], &psgx[slot], &psa[slot]);
      } else {
        const int64_t nc = i / it.nseg, s = i % it.nseg, c = nc % it.C;
        const int64_t off = nc * it.S + s * it.seg;
        FASTMED_KERNEL(backward_sums_contiguous<T, A, RES, PRELU>)(
            dy + off, x + off, RES ? r + off : r, it.length(s), k.m[nc], k.a[nc], k.b[c], k.slope[c], &psg[i],
            &psgx[i], &psa[i]);
      }
    }
  });
  for (int64_t n = 0; n < it.N; ++n) {
    for (int64_t c = 0; c < it.C; ++c) {
      double a = 0, b = 0, e = 0;
      for (int64_t s = 0; s < it.nseg; ++s) {
        const int64_t q = it.slot(n, c, s);
        a += psg[q];
        b += psgx[q];
        e += psa[q];
      }
      sg[n * it.C + c] = a, sgx[n * it.C + c] = b, sa[n * it.C + c] = e;
    }
  }
}

template <typename T, Act A, bool RES>
void backward_apply(const T* dy, const T* x, const T* r, T* dx, T* dres, const Items& it, const Coefficients<T>& k,
                    const std::vector<T>& ka, const std::vector<T>& kb, const std::vector<T>& kc) {
  at::parallel_for(0, it.count(), it.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (it.cl) {
        const int64_t n = i / it.nseg, s = i % it.nseg;
        const int64_t off = (n * it.S + s * it.seg) * it.C, nc = n * it.C;
        FASTMED_KERNEL(backward_apply_channels_last<T, A, RES>)(
            dy + off, x + off, RES ? r + off : r, dx + off, RES ? dres + off : dres, it.length(s), it.C, &k.m[nc],
            &k.a[nc], k.b.data(), k.slope.data(), &ka[nc], &kb[nc], &kc[nc]);
      } else {
        const int64_t nc = i / it.nseg, s = i % it.nseg, c = nc % it.C;
        const int64_t off = nc * it.S + s * it.seg;
        FASTMED_KERNEL(backward_apply_contiguous<T, A, RES>)(
            dy + off, x + off, RES ? r + off : r, dx + off, RES ? dres + off : dres, it.length(s), k.m[nc], k.a[nc],
            k.b[c], k.slope[c], ka[nc], kb[nc], kc[nc]);
      }
    }
  });
}

struct BackwardOut {
  std::vector<double> dweight, dbias, dslope;  // per channel
};

template <typename T, Act A, bool RES>
BackwardOut backward_typed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& r, at::Tensor& dx,
                           at::Tensor& dres, const Items& it, const Rows& rows, const Coefficients<T>& k,
                           const std::vector<T>& w, bool prelu, bool input_stats, bool need_sums) {
  const int64_t N = it.N, C = it.C;
  const T* dyp = dy.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* rp = RES ? r.data_ptr<T>() : nullptr;
  std::vector<double> sg(N * C, 0.0), sgx(N * C, 0.0), sa(N * C, 0.0);
  if (need_sums) {
    if (prelu) {
      backward_sums<T, A, RES, true>(dyp, xp, rp, it, k, sg, sgx, sa);
    } else {
      backward_sums<T, A, RES, false>(dyp, xp, rp, it, k, sg, sgx, sa);
    }
  }
  BackwardOut out{std::vector<double>(C, 0.0), std::vector<double>(C, 0.0), std::vector<double>(C, 0.0)};
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = n * C + c;
      out.dweight[c] += sgx[i] * double(k.rs[i]);  // sum of g * xhat
      out.dbias[c] += sg[i];
      out.dslope[c] += sa[i];
    }
  }
  // dx = rstd * (g * w - mean_row(g * w) - xhat * mean_row(g * w * xhat)) = g * ka - kb - (x - m) * kc
  std::vector<T> ka(N * C), kb(N * C, T(0)), kc(N * C, T(0));
  for (int64_t i = 0; i < N * C; ++i) ka[i] = k.a[i];
  if (input_stats) {
    std::vector<double> m1(rows.R, 0.0), m2(rows.R, 0.0);
    for (int64_t rr = 0; rr < rows.R; ++rr) {
      double a = 0, b = 0, cnt = 0;
      rows.for_each(rr, [&](int64_t n, int64_t c) {
        const int64_t i = n * C + c;
        a += double(w[c]) * sg[i];
        b += double(w[c]) * sgx[i] * double(k.rs[i]);
        cnt += double(it.S);
      });
      m1[rr] = a / cnt, m2[rr] = b / cnt;
    }
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = n * C + c, rr = rows.row(n, c);
        const double rs = double(k.rs[i]);
        kb[i] = T(rs * m1[rr]);
        kc[i] = T(rs * rs * m2[rr]);
      }
    }
  }
  backward_apply<T, A, RES>(dyp, xp, rp, dx.data_ptr<T>(), RES ? dres.data_ptr<T>() : nullptr, it, k, ka, kb, kc);
  return out;
}

template <typename T>
BackwardOut backward_dispatch(Act act, bool res, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& r,
                              at::Tensor& dx, at::Tensor& dres, const Items& it, const Rows& rows,
                              const Coefficients<T>& k, const std::vector<T>& w, bool prelu, bool input_stats,
                              bool need_sums) {
#define FASTMED_BWD(A, RES) \
  return backward_typed<T, A, RES>(dy, x, r, dx, dres, it, rows, k, w, prelu, input_stats, need_sums)
  switch (act) {
    case Act::Identity:
      if (res) FASTMED_BWD(Act::Identity, true);
      FASTMED_BWD(Act::Identity, false);
    case Act::Relu:
      if (res) FASTMED_BWD(Act::Relu, true);
      FASTMED_BWD(Act::Relu, false);
    case Act::Leaky:
      if (res) FASTMED_BWD(Act::Leaky, true);
      FASTMED_BWD(Act::Leaky, false);
  }
#undef FASTMED_BWD
  TORCH_CHECK(false, "norm_act_cpu: unknown activation");
}

at::ScalarType accumulation(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor to_vector(const std::vector<double>& v, at::ScalarType dtype) {
  at::Tensor t = at::empty({int64_t(v.size())}, at::dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t.to(dtype);
}

}  // namespace
}  // namespace norm_act_cpu

std::vector<at::Tensor> norm_act_forward_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                                             const c10::optional<at::Tensor>& bias,
                                             const c10::optional<at::Tensor>& residual,
                                             const c10::optional<at::Tensor>& slope,
                                             const c10::optional<at::Tensor>& mean_in,
                                             const c10::optional<at::Tensor>& rstd_in, const std::string& kind,
                                             int64_t num_groups, double eps, const std::string& activation,
                                             double negative_slope) {
  using namespace norm_act_cpu;
  const Act act = act_of(activation);
  const at::ScalarType acc = accumulation(x_in);
  Geometry g;
  const at::Tensor x = prepare(x_in, acc, &g);
  const Rows rows(kind, g.N, g.C, num_groups);
  const Items it(g);
  at::Tensor r;
  if (residual.has_value() && residual->defined()) r = like_layout(*residual, x, "residual");
  at::Tensor y = at::empty_like(x);
  at::Tensor mean, rstd;
  TORCH_CHECK(mean_in.has_value() == rstd_in.has_value(), "norm_act_cpu: mean_in and rstd_in go together");
  if (mean_in.has_value()) {
    mean = mean_in->to(acc).contiguous();
    rstd = rstd_in->to(acc).contiguous();
    TORCH_CHECK(mean.numel() == rows.R && rstd.numel() == rows.R, "norm_act_cpu: mean_in and rstd_in must have ",
                rows.R, " values");
  } else {
    mean = at::empty({rows.R}, x.options());
    rstd = at::empty({rows.R}, x.options());
  }
  AT_DISPATCH_FLOATING_TYPES(acc, "norm_act_forward_cpu", [&] {
    using T = scalar_t;
    const T fill_slope = activation == "leaky_relu" ? T(negative_slope) : T(0);
    const std::vector<T> w = per_channel<T>(weight, g.C, T(1), "weight");
    const std::vector<T> b = per_channel<T>(bias, g.C, T(0), "bias");
    const std::vector<T> sl = per_channel<T>(activation == "prelu" ? slope : c10::nullopt, g.C, fill_slope, "slope");
    if (!mean_in.has_value()) {
      compute_stats<T>(x.data_ptr<T>(), it, rows, eps, mean.data_ptr<T>(), rstd.data_ptr<T>());
    }
    forward_impl<T>(x, r, y, it, rows, mean.data_ptr<T>(), rstd.data_ptr<T>(), w, b, sl, act);
  });
  return {y.to(x_in.scalar_type()), mean, rstd};
}

std::vector<at::Tensor> norm_act_backward_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                              const c10::optional<at::Tensor>& weight,
                                              const c10::optional<at::Tensor>& bias,
                                              const c10::optional<at::Tensor>& residual,
                                              const c10::optional<at::Tensor>& slope, const at::Tensor& mean_in,
                                              const at::Tensor& rstd_in, const std::string& kind, int64_t num_groups,
                                              const std::string& activation, double negative_slope, bool input_stats) {
  using namespace norm_act_cpu;
  const Act act = act_of(activation);
  const bool prelu = activation == "prelu";
  const at::ScalarType acc = accumulation(x_in);
  Geometry g;
  const at::Tensor x = prepare(x_in, acc, &g);
  const at::Tensor dy = like_layout(dy_in, x, "dy");
  const Rows rows(kind, g.N, g.C, num_groups);
  const Items it(g);
  const bool has_res = residual.has_value() && residual->defined();
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const bool has_slope = prelu && slope.has_value() && slope->defined();
  TORCH_CHECK(!prelu || has_slope, "norm_act_cpu: activation 'prelu' needs the slope tensor");
  // z is needed only for act'(z): the identity reads neither the residual nor z.
  at::Tensor r;
  if (has_res && act != Act::Identity) r = like_layout(*residual, x, "residual");
  const at::Tensor mean = mean_in.to(acc).contiguous();
  const at::Tensor rstd = rstd_in.to(acc).contiguous();
  TORCH_CHECK(mean.numel() == rows.R && rstd.numel() == rows.R, "norm_act_cpu: mean and rstd must have ", rows.R,
              " values");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dres = has_res ? at::empty_like(x) : at::Tensor();
  const bool need_sums = input_stats || has_w || has_b || prelu;
  BackwardOut out;
  AT_DISPATCH_FLOATING_TYPES(acc, "norm_act_backward_cpu", [&] {
    using T = scalar_t;
    const T fill_slope = activation == "leaky_relu" ? T(negative_slope) : T(0);
    const std::vector<T> w = per_channel<T>(weight, g.C, T(1), "weight");
    const std::vector<T> b = per_channel<T>(bias, g.C, T(0), "bias");
    const std::vector<T> sl = per_channel<T>(prelu ? slope : c10::nullopt, g.C, fill_slope, "slope");
    const Coefficients<T> k = coefficients<T>(rows, mean.data_ptr<T>(), rstd.data_ptr<T>(), w, b, sl);
    // With the identity and a residual, dres = g = dy and nothing reads r: run the residual-free kernels, then copy.
    const bool res_kernel = has_res && act != Act::Identity;
    at::Tensor none;
    out = backward_dispatch<T>(act, res_kernel, dy, x, res_kernel ? r : none, dx, res_kernel ? dres : none, it, rows,
                               k, w, prelu, input_stats, need_sums);
  });
  if (has_res && act == Act::Identity) dres.copy_(dy);
  at::Tensor dweight = has_w ? to_vector(out.dweight, weight->scalar_type()) : at::Tensor();
  at::Tensor dbias = has_b ? to_vector(out.dbias, bias->scalar_type()) : at::Tensor();
  at::Tensor dslope;
  if (prelu) {
    if (slope->numel() == 1) {  // one slope for every channel: the sum over channels, in double
      double total = 0.0;
      for (const double v : out.dslope) total += v;
      out.dslope.assign(1, total);
    }
    dslope = to_vector(out.dslope, slope->scalar_type());
  }
  return {dx.to(x_in.scalar_type()), dweight, dbias, has_res ? dres.to(residual->scalar_type()) : at::Tensor(), dslope};
}


// ---------------------------------------------------------------------------------------------------------------
// The op with its autograd in C++: what fastmed's direct path runs for the cpp backend when a gradient is needed
// (fastmed/ops/norm_act.py).  The forward and backward are the two functions above; the autograd node is C++, so a
// call costs what a native torch op costs (a Python autograd.Function costs tens of microseconds a call, more than
// the whole kernel on small tensors).  A differentiated backward (create_graph=True) calls the Python function
// registered with set_norm_act_double_backward, which computes the first-order gradient with its graph.
// ---------------------------------------------------------------------------------------------------------------
namespace norm_act_cpu {
namespace {

// Leaked on purpose: a pybind11 object must not be destroyed after the interpreter is finalized.
pybind11::object* double_backward_fn = nullptr;

c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

struct NormActFunction : public torch::autograd::Function<NormActFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const c10::optional<at::Tensor>& weight,
                                                const c10::optional<at::Tensor>& bias,
                                                const c10::optional<at::Tensor>& residual,
                                                const c10::optional<at::Tensor>& slope, const std::string& kind,
                                                int64_t num_groups, double eps, const std::string& activation,
                                                double negative_slope) {
    std::vector<at::Tensor> out = norm_act_forward_cpu(x, weight, bias, residual, slope, c10::nullopt, c10::nullopt,
                                                       kind, num_groups, eps, activation, negative_slope);
    // y is not saved (the caller may modify it in place): the backward recomputes z from x and the statistics.
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            residual.value_or(at::Tensor()), slope.value_or(at::Tensor()), out[1], out[2]});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->mark_non_differentiable({out[1], out[2]});
    ctx->set_materialize_grads(false);
    return {out[0], out[1], out[2]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list result(10);  // one per argument of forward
    const at::Tensor& dy = grads[0];
    if (!dy.defined()) return result;  // no gradient reached y
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const std::string kind = ctx->saved_data["kind"].toStringRef();
    const int64_t num_groups = ctx->saved_data["num_groups"].toInt();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const double negative_slope = ctx->saved_data["negative_slope"].toDouble();
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable first-order gradient, from Python
      TORCH_CHECK(double_backward_fn != nullptr, "norm_act_cpu: no double-backward function registered");
      pybind11::gil_scoped_acquire gil;
      pybind11::object none = pybind11::none();
      auto arg = [&](const at::Tensor& t) { return t.defined() ? pybind11::cast(t) : none; };
      pybind11::sequence out = (*double_backward_fn)(
          dy, saved[0], arg(saved[1]), arg(saved[2]), arg(saved[3]), arg(saved[4]), kind, num_groups,
          ctx->saved_data["eps"].toDouble(), activation, negative_slope);
      for (size_t i = 0; i < 5; ++i) {
        if (!out[i].is_none()) result[i] = out[i].cast<at::Tensor>();
      }
      return result;
    }
    std::vector<at::Tensor> g = norm_act_backward_cpu(dy, saved[0], maybe(saved[1]), maybe(saved[2]), maybe(saved[3]),
                                                      maybe(saved[4]), saved[5], saved[6], kind, num_groups,
                                                      activation, negative_slope, true);
    for (size_t i = 0; i < 5; ++i) result[i] = g[i];
    return result;
  }
};

}  // namespace
}  // namespace norm_act_cpu

std::vector<at::Tensor> norm_act_autograd_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                              const c10::optional<at::Tensor>& bias,
                                              const c10::optional<at::Tensor>& residual,
                                              const c10::optional<at::Tensor>& slope, const std::string& kind,
                                              int64_t num_groups, double eps, const std::string& activation,
                                              double negative_slope) {
  return norm_act_cpu::NormActFunction::apply(x, weight, bias, residual, slope, kind, num_groups, eps, activation,
                                              negative_slope);
}

void set_norm_act_double_backward(pybind11::object fn) {
  if (norm_act_cpu::double_backward_fn == nullptr) norm_act_cpu::double_backward_fn = new pybind11::object();
  *norm_act_cpu::double_backward_fn = std::move(fn);
}

}  // namespace fastmed
