// Fused segmentation-loss statistics on the CPU: the one-pass design of kernels/losses.py in C++.
//
// Forward: logits (B, C, S) (any strides; float16/bfloat16/float32/float64) and targets (labels (B, S) as int64,
// float32 or float64, or dense (B, Ct, S) in the accumulation dtype, with an optional (B, S) ignore mask) give the
// per-(sample, class) statistics (B, NUM_SLOTS, C) of fastmed/reference/loss_spec.py, computed in the accumulation
// dtype A (float32; float64 for float64 logits).  The voxels of each sample are cut into fixed chunks of kChunk
// voxels; at::parallel_for deals the (sample, chunk) tasks to threads, each task writes its own partial sums, and the
// partials are added in chunk order afterwards (in float64): the result does not depend on the number of threads
// (bit-identical at 1 and 2 threads).
//
// Every mode but the softmax focal term runs in blocks of kLanes voxels (losses_cpu_kernels.h): a block's
// logits and one-hot targets (by comparing the label with the class index) are loaded as (class, lane) rows, the
// activation is computed across the classes per lane, and each term adds to per-lane sums in A; at the end of a
// chunk the lanes are added in a fixed order in float64.  The label check (slot BAD) runs in the same pass.  The
// softmax focal term runs the scalar per-voxel loop below (sums in float64).
//
// Backward: d logits from gstats = d loss / d stats (B, NUM_SLOTS, C) in one pass, the closed forms of
// fastmed.reference.losses.loss_stats_backward, block by block (or voxel by voxel; no reduction: deterministic by
// construction).
//
// Semantics (the reference is the oracle): a zero weight times an infinite value is 0 (weigh), labels are checked in
// their own precision (float labels must be integers below 2^31 in magnitude), voxels whose label is neither a class
// nor ignore_index count in slot BAD; NaN logits give NaN.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_dispatch.h"
#include "fastmed_ext.h"
#include "losses_cpu_spec.h"

namespace fastmed {

namespace {

using namespace loss_vocab;  // the slots, pick
const char* const kSlotNames[] = {"intersect", "pred", "ground", "diff", "nll", "logsum", "focal", "focal_pos",
                                  "count", "bad"};
constexpr int64_t kChunk = 2048;  // voxels per task: fixed, so the combine order never depends on the threads
constexpr double kSoftplusThreshold = 40.0;  // fastmed.reference.losses.softplus

enum class Act { kNone, kSigmoid, kSoftmax };
enum class Pow { kOff, kLinear, kSquare, kAbs };
enum class Ce { kOff, kSoftmax, kSoftmaxSmooth, kBce };
enum class FocalMode { kOff, kSigmoid, kSoftmax };
enum class FocalPos { kOff, kLinear, kHard };

struct Spec {
  Act act;
  Pow pow;
  Ce ce;
  FocalMode focal;
  int64_t focal_c0;
  double gamma;
  FocalPos focal_pos;
  bool label_mode;
  bool has_ignore;
  int64_t ignore_index;
};

Spec make_spec(const std::string& act, const std::string& pow_mode, const std::string& ce_mode,
               const std::string& focal_mode, int64_t focal_c0, double gamma, const std::string& focal_pos,
               bool label_mode, bool has_ignore, int64_t ignore_index) {
  Spec s;
  s.act = pick<Act>(act, "StatsSpec", "act",
                    {{"none", Act::kNone}, {"sigmoid", Act::kSigmoid}, {"softmax", Act::kSoftmax}});
  s.pow = pick<Pow>(pow_mode, "StatsSpec", "pow_mode",
                    {{"off", Pow::kOff}, {"linear", Pow::kLinear}, {"square", Pow::kSquare}, {"abs", Pow::kAbs}});
  s.ce = pick<Ce>(ce_mode, "StatsSpec", "ce_mode",
                  {{"off", Ce::kOff}, {"softmax", Ce::kSoftmax}, {"softmax_smooth", Ce::kSoftmaxSmooth},
                   {"bce", Ce::kBce}});
  s.focal = pick<FocalMode>(focal_mode, "StatsSpec", "focal_mode",
                            {{"off", FocalMode::kOff}, {"sigmoid", FocalMode::kSigmoid},
                             {"softmax", FocalMode::kSoftmax}});
  s.focal_pos = pick<FocalPos>(focal_pos, "StatsSpec", "focal_pos",
                               {{"off", FocalPos::kOff}, {"linear", FocalPos::kLinear}, {"hard", FocalPos::kHard}});
  s.focal_c0 = focal_c0;
  s.gamma = gamma;
  s.label_mode = label_mode;
  s.has_ignore = has_ignore;
  s.ignore_index = ignore_index;
  return s;
}

// ---------------------------------------------------------------------------------------------- blocks of voxels
constexpr int64_t kLanes = 16;  // voxels per block (a multiple of every vector width); kChunk is a multiple of it
constexpr int64_t kPrefetch = 4;  // blocks ahead that a block's loads prefetch (one stream per class row)
static_assert(kChunk % kLanes == 0, "a chunk is a whole number of blocks");

// The operands of kLanes voxels of one sample, (class, lane) rows (see losses_cpu_kernels.h).
template <typename A>
struct Block {
  int64_t C = 0;
  bool masked = false;  // a mask exists (label ignore or dense mask): products with m use weigh
  bool label = false;   // gm is the one-hot of a label (0 or 1 exactly)
  A* z = nullptr;       // logits
  A* gm = nullptr;      // target times the mask (labels: 1 where the label is the class and the voxel counts)
  A* p = nullptr;       // activation (softmax / sigmoid / identity)
  A* q = nullptr;       // scratch (at least 2 rows)
  A* w = nullptr;       // scratch (at least 2 rows)
  A* dz = nullptr;      // d logits (backward)
  A m[kLanes];          // 1 where the voxel counts (mask or ignore), 0 elsewhere
  A valid[kLanes];      // 1 for a voxel of the tensor, 0 for the padding of the tail block
  A pick[kLanes];       // labels: the class whose NLL a voxel enters (its label, 0 when none; -1: padding)
  A mx[kLanes];         // max over the classes (NaN if any is NaN)
  A lse[kLanes];        // log of the sum of exp(z - mx)
  A sum[kLanes];        // scratch
  A* row(A* base, int64_t c) const { return base + c * kLanes; }
};

// The storage of one Block (one per thread).
template <typename A>
struct BlockStorage {
  std::vector<A> data;
  Block<A> k;
  explicit BlockStorage(int64_t C) {
    const int64_t rows = std::max<int64_t>(C, 2);
    data.assign(static_cast<size_t>((4 * C + 2 * rows) * kLanes), A(0));
    k.C = C;
    A* base = data.data();
    k.z = base;
    k.gm = base + C * kLanes;
    k.p = base + 2 * C * kLanes;
    k.dz = base + 3 * C * kLanes;
    k.q = base + 4 * C * kLanes;
    k.w = k.q + rows * kLanes;
  }
};

// Raw pointers and strides of the (B, C, S) logits, the targets and the (B, S) mask.
template <typename Z, typename T, typename A>
struct Operands {
  const Z* zp;
  const T* tp;
  const A* mp;
  int64_t zs[3], ts[3], ms[2];
  int64_t C, Ct, S;
};

template <typename Z, typename T, typename A>
Operands<Z, T, A> operands(const at::Tensor& z, const at::Tensor& t, const at::Tensor* mask, const Spec& spec) {
  Operands<Z, T, A> o;
  o.zp = z.data_ptr<Z>();
  o.tp = t.data_ptr<T>();
  o.mp = mask ? mask->data_ptr<A>() : nullptr;
  o.zs[0] = z.stride(0);
  o.zs[1] = z.stride(1);
  o.zs[2] = z.stride(2);
  o.ts[0] = t.stride(0);
  o.ts[1] = t.stride(1);
  o.ts[2] = spec.label_mode ? 0 : t.stride(2);
  o.ms[0] = mask ? mask->stride(0) : 0;
  o.ms[1] = mask ? mask->stride(1) : 0;
  o.C = z.size(1);
  o.Ct = spec.label_mode ? 1 : t.size(1);
  o.S = z.size(2);
  return o;
}

namespace generic {
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#include "losses_cpu_kernels.h"
#pragma GCC pop_options
}  // namespace generic

#ifdef FASTMED_CPU_AVX2
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("no-trapping-math")
#include "losses_cpu_kernels.h"
#pragma GCC pop_options
}  // namespace avx2
#endif

// The block kernels cover every mode but the softmax focal term (the scalar voxel loop below runs it).
bool blocked(const Spec& spec) { return spec.focal != FocalMode::kSoftmax; }

// ---------------------------------------------------------------------------------------------- scalar helpers
template <typename A>
inline A weigh(A w, A v) {  // w * v, a zero weight times an infinite v is 0; NaN stays NaN
  return w * ((w == A(0) && std::isinf(v)) ? A(0) : v);
}

template <typename A>
inline A softplus(A z) {
  return z > A(kSoftplusThreshold) ? z : std::log1p(std::exp(z));
}

template <typename A>
inline A sigmoid(A z) {
  return A(1) / (A(1) + std::exp(-z));
}

template <typename A>
inline A bce_with_logits(A z, A t) {
  return weigh(A(1) - t, softplus(z)) + weigh(t, softplus(-z));
}

template <typename A>
inline A sign(A x) {
  return x > A(0) ? A(1) : (x < A(0) ? A(-1) : A(0));
}

// max of v[lo:hi], NaN if any is NaN (torch's max)
template <typename A>
inline A row_max(const A* v, int64_t lo, int64_t hi) {
  A mx = -std::numeric_limits<A>::infinity();
  for (int64_t c = lo; c < hi; ++c) {
    if (std::isnan(v[c])) return v[c];
    mx = std::max(mx, v[c]);
  }
  return mx;
}

// log-softmax of v[lo:hi] into out[lo:hi] (torch's order: max, shift, log of the sum of exponentials)
template <typename A>
inline void log_softmax(const A* v, A* out, int64_t lo, int64_t hi) {
  const A mx = row_max(v, lo, hi);
  A sum = 0;
  for (int64_t c = lo; c < hi; ++c) sum += std::exp(v[c] - mx);
  const A lse = std::log(sum);
  for (int64_t c = lo; c < hi; ++c) out[c] = v[c] - mx - lse;
}

template <typename A>
inline void softmax(const A* v, A* out, int64_t lo, int64_t hi) {
  const A mx = row_max(v, lo, hi);
  A sum = 0;
  for (int64_t c = lo; c < hi; ++c) {
    out[c] = std::exp(v[c] - mx);
    sum += out[c];
  }
  for (int64_t c = lo; c < hi; ++c) out[c] /= sum;
}

// ---------------------------------------------------------------------------------------------- one voxel's operands
template <typename A>
struct Voxel {
  std::vector<A> z, g, p, q, lq, tmp;  // logits, target, activation, softmax, log-softmax, scratch (C each)
  A m = 1;          // 1 where the voxel counts (ignore), 0 elsewhere
  bool masked = false;  // a mask exists (label ignore or dense mask): products with m use weigh
  A hit = 0;        // label targets: 1 where the voxel counts and its label is a class
  int64_t label = 0;  // label targets: the class (0 where none)
  A bad = 0;        // 1 when the label is neither a class nor ignore_index
  explicit Voxel(int64_t C) : z(C), g(C), p(C), q(C), lq(C), tmp(C) {}
};

template <typename Z, typename T, typename A>
inline void load_voxel(Voxel<A>& v, const Z* zp, const int64_t* zs, const T* tp, const int64_t* ts, const A* mp,
                       const int64_t* ms, int64_t b, int64_t s, int64_t C, int64_t Ct, const Spec& spec) {
  for (int64_t c = 0; c < C; ++c) v.z[c] = static_cast<A>(zp[b * zs[0] + c * zs[1] + s * zs[2]]);
  if (spec.label_mode) {
    const T raw = tp[b * ts[0] + s * ts[1]];
    bool integral = true;
    int64_t li;
    if constexpr (std::is_floating_point<T>::value) {
      integral = raw == std::floor(raw) && std::fabs(raw) < T(2147483648.0);
      li = integral ? static_cast<int64_t>(raw) : 0;
    } else {
      li = static_cast<int64_t>(raw);
    }
    const bool inrange = integral && li >= 0 && li < C;
    if (spec.has_ignore) {
      const bool valid = !(integral && li == spec.ignore_index);
      v.bad = (valid && !inrange) ? A(1) : A(0);
      v.m = valid ? A(1) : A(0);
      v.masked = true;
      v.hit = (valid && inrange) ? A(1) : A(0);
    } else {
      v.bad = inrange ? A(0) : A(1);
      v.m = 1;
      v.masked = false;
      v.hit = inrange ? A(1) : A(0);
    }
    v.label = inrange ? li : 0;
    for (int64_t c = 0; c < C; ++c) v.g[c] = (inrange && li == c) ? A(1) : A(0);
  } else {
    for (int64_t c = 0; c < C; ++c) v.g[c] = static_cast<A>(tp[b * ts[0] + (Ct == 1 ? 0 : c) * ts[1] + s * ts[2]]);
    v.bad = 0;
    v.masked = mp != nullptr;
    v.m = mp ? mp[b * ms[0] + s * ms[1]] : A(1);
  }
}

template <typename A>
inline A counted(A x, const Voxel<A>& v, bool finite) {  // _counted of the reference
  if (!v.masked) return x;
  return finite ? x * v.m : weigh(v.m, x);
}

template <typename A>
inline void activate(Voxel<A>& v, Act act, int64_t C) {
  if (act == Act::kSoftmax) {
    softmax(v.z.data(), v.p.data(), 0, C);
  } else if (act == Act::kSigmoid) {
    for (int64_t c = 0; c < C; ++c) v.p[c] = sigmoid(v.z[c]);
  } else {
    for (int64_t c = 0; c < C; ++c) v.p[c] = v.z[c];
  }
}

// (bce, mod, s, sz) of reference.sigmoid_focal_terms at one class
template <typename A>
inline void sigmoid_focal_terms(A zz, A tt, double gamma, bool hard, A& bce, A& mod, A& s, A& sz) {
  s = tt * A(2) - A(1);
  if (hard) {
    sz = s * zz;
    bce = softplus(-sz);
  } else {
    sz = weigh(s, zz);
    bce = bce_with_logits(zz, tt);
  }
  mod = gamma != 0 ? std::exp(-A(gamma) * softplus(sz)) : A(1);
}

// ---------------------------------------------------------------------------------------------- forward
template <typename A>
void accumulate(Voxel<A>& v, const Spec& spec, int64_t C, double* acc) {  // acc: (NUM_SLOTS, C)
  std::vector<A>& gm = v.tmp;
  for (int64_t c = 0; c < C; ++c) gm[c] = counted(v.g[c], v, true);
  if (spec.pow != Pow::kOff) {
    const bool bounded = spec.act != Act::kNone;
    activate(v, spec.act, C);
    for (int64_t c = 0; c < C; ++c) {
      const A pm = counted(v.p[c], v, bounded);
      acc[kIntersect * C + c] += bounded ? pm * gm[c] : weigh(gm[c], pm);
      if (spec.pow == Pow::kLinear) {
        acc[kPred * C + c] += pm;
        acc[kGround * C + c] += gm[c];
      } else if (spec.pow == Pow::kSquare) {
        acc[kPred * C + c] += pm * pm;
        acc[kGround * C + c] += gm[c] * gm[c];
      } else {
        acc[kPred * C + c] += std::fabs(pm);
        acc[kGround * C + c] += std::fabs(gm[c]);
        acc[kDiff * C + c] += std::fabs(pm - gm[c]);
      }
    }
  }
  if (spec.ce == Ce::kSoftmax || spec.ce == Ce::kSoftmaxSmooth) {
    log_softmax(v.z.data(), v.lq.data(), 0, C);
    if (spec.label_mode) {
      acc[kNll * C + v.label] -= weigh(v.hit, v.lq[v.label]);
    } else {
      for (int64_t c = 0; c < C; ++c) acc[kNll * C + c] -= weigh(gm[c], v.lq[c]);
    }
    if (spec.ce == Ce::kSoftmaxSmooth) {
      for (int64_t c = 0; c < C; ++c) acc[kLogsum * C + c] -= counted(v.lq[c], v, false);
    }
  } else if (spec.ce == Ce::kBce) {
    for (int64_t c = 0; c < C; ++c) {
      acc[kNll * C + c] += counted(bce_with_logits(v.z[c], v.g[c]), v, false);
      acc[kLogsum * C + c] += weigh(gm[c], softplus(-v.z[c]));
    }
  }
  if (spec.focal == FocalMode::kSigmoid) {
    for (int64_t c = 0; c < C; ++c) {
      A bce, mod, s, sz;
      sigmoid_focal_terms(counted(v.z[c], v, false), gm[c], spec.gamma, spec.label_mode, bce, mod, s, sz);
      const A loss = counted(spec.label_mode ? mod * bce : weigh(mod, bce), v, false);
      acc[kFocal * C + c] += loss;
      if (spec.focal_pos == FocalPos::kLinear) {
        acc[kFocalPos * C + c] += weigh(gm[c], loss);
      } else if (spec.focal_pos == FocalPos::kHard) {
        acc[kFocalPos * C + c] += weigh(gm[c] == A(1) ? A(1) : A(0), loss);
      }
    }
  } else if (spec.focal == FocalMode::kSoftmax) {
    const int64_t c0 = spec.focal_c0;
    for (int64_t c = c0; c < C; ++c) v.q[c] = counted(v.z[c], v, false);  // zz
    log_softmax(v.q.data(), v.lq.data(), c0, C);
    for (int64_t c = c0; c < C; ++c) {
      const A w = counted(gm[c] * std::pow(A(1) - std::exp(v.lq[c]), A(spec.gamma)), v, true);
      acc[kFocal * C + c] -= weigh(w, v.lq[c]);
    }
  }
}

template <typename Z, typename T, typename A>
void stats_kernel(const at::Tensor& z, const at::Tensor& t, const at::Tensor* mask, const Spec& spec, at::Tensor& out) {
  const int64_t B = z.size(0), C = z.size(1), S = z.size(2);
  const int64_t Ct = spec.label_mode ? 1 : t.size(1);
  const int64_t chunks = std::max<int64_t>(1, (S + kChunk - 1) / kChunk);
  const int64_t zs[3] = {z.stride(0), z.stride(1), z.stride(2)};
  int64_t ts[3];
  if (spec.label_mode) {
    ts[0] = t.stride(0);
    ts[1] = t.stride(1);
    ts[2] = 0;
  } else {
    ts[0] = t.stride(0);
    ts[1] = t.stride(1);
    ts[2] = t.stride(2);
  }
  const int64_t ms[2] = {mask ? mask->stride(0) : 0, mask ? mask->stride(1) : 0};
  const Z* zp = z.data_ptr<Z>();
  const T* tp = t.data_ptr<T>();
  const A* mp = mask ? mask->data_ptr<A>() : nullptr;
  std::vector<double> partial(static_cast<size_t>(B * chunks * kNumSlots * C), 0.0);
  std::vector<double> counts(static_cast<size_t>(B * chunks), 0.0);
  if (blocked(spec)) {
    const auto o = operands<Z, T, A>(z, t, mask, spec);
    const auto forward = FASTMED_KERNEL(forward_block<A>);
    const auto load = FASTMED_KERNEL(load_block<Z, T, A>);
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      BlockStorage<A> storage(C);
      std::vector<A> lanes(static_cast<size_t>(kNumSlots * C * kLanes));  // per-lane sums over one chunk
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, k = task % chunks;
        std::fill(lanes.begin(), lanes.end(), A(0));
        double cnt = 0, bad = 0;
        for (int64_t s0 = k * kChunk; s0 < std::min(S, (k + 1) * kChunk); s0 += kLanes) {
          load(o, spec, b, s0, std::min(kLanes, S - s0), storage.k, cnt, bad);
          forward(storage.k, spec, lanes.data());
        }
        double* acc = partial.data() + task * kNumSlots * C;
        for (int64_t j = 0; j < kBad * C; ++j) {  // the lanes in a fixed order
          double sum = 0;
          for (int64_t l = 0; l < kLanes; ++l) sum += static_cast<double>(lanes[j * kLanes + l]);
          acc[j] = sum;
        }
        counts[task] = cnt;
        acc[kBad * C] = bad;
      }
    });
  } else {
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      Voxel<A> v(C);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, k = task % chunks;
        double* acc = partial.data() + task * kNumSlots * C;
        double cnt = 0, bad = 0;
        for (int64_t s = k * kChunk; s < std::min(S, (k + 1) * kChunk); ++s) {
          load_voxel(v, zp, zs, tp, ts, mp, ms, b, s, C, Ct, spec);
          accumulate(v, spec, C, acc);
          cnt += v.m;
          bad += v.bad;
        }
        counts[task] = cnt;
        acc[kBad * C] = bad;
      }
    });
  }
  A* o = out.data_ptr<A>();
  std::vector<double> sums(static_cast<size_t>(kNumSlots * C));
  for (int64_t b = 0; b < B; ++b) {
    std::fill(sums.begin(), sums.end(), 0.0);
    double cnt = 0, bad = 0;
    for (int64_t k = 0; k < chunks; ++k) {  // fixed order
      const double* acc = partial.data() + (b * chunks + k) * kNumSlots * C;
      for (int64_t j = 0; j < kBad * C; ++j) sums[j] += acc[j];
      cnt += counts[b * chunks + k];
      bad += acc[kBad * C];
    }
    for (int64_t j = 0; j < kBad * C; ++j) o[b * kNumSlots * C + j] = static_cast<A>(sums[j]);
    for (int64_t c = 0; c < C; ++c) {
      o[(b * kNumSlots + kCount) * C + c] = (mask || spec.has_ignore) ? static_cast<A>(cnt) : A(S);
      o[(b * kNumSlots + kBad) * C + c] = static_cast<A>(bad);
    }
  }
}

// ---------------------------------------------------------------------------------------------- backward
template <typename A>
void voxel_grad(Voxel<A>& v, const Spec& spec, int64_t C, const A* gs, A* dz) {  // gs: (NUM_SLOTS, C)
  std::vector<A>& gm = v.tmp;
  for (int64_t c = 0; c < C; ++c) {
    gm[c] = counted(v.g[c], v, true);
    dz[c] = 0;
  }
  if (spec.pow != Pow::kOff) {
    activate(v, spec.act, C);
    const bool bounded = spec.act != Act::kNone;
    A pu = 0;
    for (int64_t c = 0; c < C; ++c) {  // u in q (free: softmax of the CE below recomputes q)
      const A pm = counted(v.p[c], v, bounded);
      A u = gs[kIntersect * C + c] * gm[c];
      if (spec.pow == Pow::kLinear) {
        u += gs[kPred * C + c];
      } else if (spec.pow == Pow::kSquare) {
        u += gs[kPred * C + c] * A(2) * pm;
      } else {
        u += gs[kPred * C + c] * sign(pm) + gs[kDiff * C + c] * sign(pm - gm[c]);
      }
      v.q[c] = counted(u, v, true);
      pu += v.p[c] * v.q[c];
    }
    for (int64_t c = 0; c < C; ++c) {
      const A u = v.q[c];
      if (spec.act == Act::kSoftmax) {
        dz[c] += v.p[c] * (u - pu);
      } else if (spec.act == Act::kSigmoid) {
        dz[c] += u * v.p[c] * (A(1) - v.p[c]);
      } else {
        dz[c] += u;
      }
    }
  }
  if (spec.ce == Ce::kSoftmax || spec.ce == Ce::kSoftmaxSmooth) {
    softmax(v.z.data(), v.q.data(), 0, C);
    A wsum = 0;
    for (int64_t c = 0; c < C; ++c) {
      A w = gs[kNll * C + c] * gm[c];
      if (spec.ce == Ce::kSoftmaxSmooth) w += counted(gs[kLogsum * C + c], v, true);
      v.lq[c] = w;
      wsum += w;
    }
    for (int64_t c = 0; c < C; ++c) dz[c] += v.q[c] * wsum - v.lq[c];
  } else if (spec.ce == Ce::kBce) {
    for (int64_t c = 0; c < C; ++c) {
      const A sneg = sigmoid(-v.z[c]);
      const A g = v.g[c];
      dz[c] += counted(gs[kNll * C + c] * ((A(1) - g) - sneg) - gs[kLogsum * C + c] * g * sneg, v, true);
    }
  }
  if (spec.focal == FocalMode::kSigmoid) {
    for (int64_t c = 0; c < C; ++c) {
      const A zz = counted(v.z[c], v, false);
      A bce, mod, s, sz;
      sigmoid_focal_terms(zz, gm[c], spec.gamma, spec.label_mode, bce, mod, s, sz);
      const A dl = (sigmoid(zz) - gm[c]) * mod - weigh(A(spec.gamma) * mod * sigmoid(sz) * s, bce);
      A coef = gs[kFocal * C + c];
      if (spec.focal_pos == FocalPos::kLinear) {
        coef += gs[kFocalPos * C + c] * gm[c];
      } else if (spec.focal_pos == FocalPos::kHard) {
        coef += gs[kFocalPos * C + c] * (gm[c] == A(1) ? A(1) : A(0));
      }
      dz[c] += v.masked ? coef * dl * v.m * v.m : coef * dl;
    }
  } else if (spec.focal == FocalMode::kSoftmax) {
    const int64_t c0 = spec.focal_c0;
    for (int64_t c = c0; c < C; ++c) v.p[c] = counted(v.z[c], v, false);  // zz
    log_softmax(v.p.data(), v.lq.data(), c0, C);
    const A gamma = A(spec.gamma);
    A vsum = 0;
    for (int64_t c = c0; c < C; ++c) {
      const A q = std::exp(v.lq[c]);
      const A base = A(1) - q;
      const A powg = std::pow(base, gamma);
      const A dpow = spec.gamma == 0 ? A(0) : gamma * std::pow(base, gamma - A(1));
      const A val = counted(gs[kFocal * C + c] * (-gm[c] * (powg - weigh(weigh(q, v.lq[c]), dpow))), v, true);
      v.q[c] = q;
      v.p[c] = val;
      vsum += val;
    }
    for (int64_t c = c0; c < C; ++c) dz[c] += counted(v.p[c] - v.q[c] * vsum, v, true);
  }
}

template <typename Z, typename T, typename A>
void backward_kernel(const at::Tensor& gstats, const at::Tensor& z, const at::Tensor& t, const at::Tensor* mask,
                     const Spec& spec, at::Tensor& dz) {
  const int64_t B = z.size(0), C = z.size(1), S = z.size(2);
  const int64_t Ct = spec.label_mode ? 1 : t.size(1);
  const int64_t zs[3] = {z.stride(0), z.stride(1), z.stride(2)};
  const int64_t ds[3] = {dz.stride(0), dz.stride(1), dz.stride(2)};
  int64_t ts[3] = {t.stride(0), t.stride(1), spec.label_mode ? 0 : t.stride(2)};
  const int64_t ms[2] = {mask ? mask->stride(0) : 0, mask ? mask->stride(1) : 0};
  const Z* zp = z.data_ptr<Z>();
  const T* tp = t.data_ptr<T>();
  const A* mp = mask ? mask->data_ptr<A>() : nullptr;
  const A* gp = gstats.data_ptr<A>();
  Z* dp = dz.data_ptr<Z>();
  const int64_t chunks = std::max<int64_t>(1, (S + kChunk - 1) / kChunk);
  if (blocked(spec)) {
    const auto o = operands<Z, T, A>(z, t, mask, spec);
    const auto backward = FASTMED_KERNEL(backward_block<A>);
    const auto load = FASTMED_KERNEL(load_block<Z, T, A>);
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      BlockStorage<A> storage(C);
      Block<A>& blk = storage.k;
      double cnt = 0, bad = 0;  // not needed here
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, k = task % chunks;
        for (int64_t s0 = k * kChunk; s0 < std::min(S, (k + 1) * kChunk); s0 += kLanes) {
          const int64_t n = std::min(kLanes, S - s0);
          load(o, spec, b, s0, n, blk, cnt, bad);
          backward(blk, spec, gp + b * kNumSlots * C);
          for (int64_t c = 0; c < C; ++c) {
            const A* __restrict d = blk.row(blk.dz, c);
            Z* __restrict dst = dp + b * ds[0] + c * ds[1] + s0 * ds[2];
            if (ds[2] == 1 && n == kLanes) {
#pragma omp simd
              for (int64_t l = 0; l < kLanes; ++l) dst[l] = static_cast<Z>(d[l]);
            } else {
              for (int64_t l = 0; l < n; ++l) dst[l * ds[2]] = static_cast<Z>(d[l]);
            }
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    Voxel<A> v(C);
    std::vector<A> d(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, k = task % chunks;
      for (int64_t s = k * kChunk; s < std::min(S, (k + 1) * kChunk); ++s) {
        load_voxel(v, zp, zs, tp, ts, mp, ms, b, s, C, Ct, spec);
        voxel_grad(v, spec, C, gp + b * kNumSlots * C, d.data());
        for (int64_t c = 0; c < C; ++c) dp[b * ds[0] + c * ds[1] + s * ds[2]] = static_cast<Z>(d[c]);
      }
    }
  });
}

// Calls f(Z{}, T{}, A{}): Z the logits' type, T the targets' (labels: int64, float32 or float64, as
// fastmed/ops/losses.py prepares them; dense: the accumulation dtype), A the accumulation type (float64 for float64
// logits, else float32).
template <typename F>
void dispatch(const at::Tensor& logits, const at::Tensor& target, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "losses_cpu", [&] {
    using A = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    if (target.scalar_type() == at::kLong) {
      f(scalar_t(0), int64_t(0), A(0));
    } else if (target.scalar_type() == at::kFloat) {
      f(scalar_t(0), float(0), A(0));
    } else {
      TORCH_CHECK(target.scalar_type() == at::kDouble, "target: int64, float32 or float64 expected, got ",
                  target.scalar_type());
      f(scalar_t(0), double(0), A(0));
    }
  });
}

}  // namespace

std::vector<std::string> loss_slots_cpu() { return {std::begin(kSlotNames), std::end(kSlotNames)}; }

torch::Tensor loss_stats_cpu(const torch::Tensor& logits, const torch::Tensor& target,
                             const c10::optional<torch::Tensor>& mask, const std::string& act,
                             const std::string& pow_mode, const std::string& ce_mode, const std::string& focal_mode,
                             int64_t focal_c0, double gamma, const std::string& focal_pos, bool label_mode,
                             bool has_ignore, int64_t ignore_index) {
  TORCH_CHECK(logits.dim() == 3 && logits.device().is_cpu(), "logits: a (B, C, S) CPU tensor expected");
  const Spec spec = make_spec(act, pow_mode, ce_mode, focal_mode, focal_c0, gamma, focal_pos, label_mode, has_ignore,
                              ignore_index);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = torch::zeros({logits.size(0), kNumSlots, logits.size(1)}, logits.options().dtype(acc));
  const at::Tensor* m = mask.has_value() ? &mask.value() : nullptr;
  dispatch(logits, target, [&](auto z, auto t, auto a) {
    stats_kernel<decltype(z), decltype(t), decltype(a)>(logits, target, m, spec, out);
  });
  return out;
}

torch::Tensor loss_stats_backward_cpu(const torch::Tensor& gstats, const torch::Tensor& logits,
                                      const torch::Tensor& target, const c10::optional<torch::Tensor>& mask,
                                      const std::string& act, const std::string& pow_mode,
                                      const std::string& ce_mode, const std::string& focal_mode, int64_t focal_c0,
                                      double gamma, const std::string& focal_pos, bool label_mode, bool has_ignore,
                                      int64_t ignore_index, torch::Tensor dlogits) {
  TORCH_CHECK(logits.dim() == 3 && dlogits.dim() == 3, "logits, dlogits: (B, C, S) views expected");
  const Spec spec = make_spec(act, pow_mode, ce_mode, focal_mode, focal_c0, gamma, focal_pos, label_mode, has_ignore,
                              ignore_index);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(gstats.scalar_type() == acc && gstats.is_contiguous(), "gstats: contiguous, accumulation dtype");
  const at::Tensor* m = mask.has_value() ? &mask.value() : nullptr;
  dispatch(logits, target, [&](auto z, auto t, auto a) {
    backward_kernel<decltype(z), decltype(t), decltype(a)>(gstats, logits, target, m, spec, dlogits);
  });
  return dlogits;
}

}  // namespace fastmed
