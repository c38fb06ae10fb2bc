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
// Every mode runs in blocks of kLanes voxels (losses_cpu_kernels.h): a block's logits and one-hot targets (by
// comparing the label with the class index) are loaded as (class, lane) rows, the activations are computed across
// the classes per lane, and each term adds to per-lane sums in A; at the end of a chunk the lanes are added in a
// fixed order in float64.  The label check (slot BAD) runs in the same pass.
//
// Backward: d logits from gstats = d loss / d stats (B, NUM_SLOTS, C) in one pass, the closed forms of
// fastmed.reference.losses.loss_stats_backward, block by block (no reduction: deterministic by construction).
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

#include "cpu_denormals.h"
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
  const A* row(const A* base, int64_t c) const { return base + c * kLanes; }
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

#define FASTMED_KERNELS_HEADER "losses_cpu_kernels.h"
#include "cpu_kernels_twice.h"

// Writes the block rows src of the n <= kLanes voxels [s0, s0 + n) of sample b to the (B, C, S) tensor at p.
template <typename Z, typename A>
void store_rows(const A* src, int64_t C, int64_t b, int64_t s0, int64_t n, Z* p, const int64_t* ps) {
  for (int64_t c = 0; c < C; ++c) {
    const A* __restrict d = src + c * kLanes;
    Z* __restrict dst = p + b * ps[0] + c * ps[1] + s0 * ps[2];
    if (ps[2] == 1 && n == kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) dst[l] = static_cast<Z>(d[l]);
    } else {
      for (int64_t l = 0; l < n; ++l) dst[l * ps[2]] = static_cast<Z>(d[l]);
    }
  }
}

// Whether the forward's softmax can stand in for the logits in the backward: a softmax activation with a region
// term (the forward computes the normalized probabilities) and no BCE or focal term (those read the logits).
bool probs_suffice(const Spec& spec) {
  return spec.act == Act::kSoftmax && spec.pow != Pow::kOff && spec.ce != Ce::kBce && spec.focal == FocalMode::kOff;
}

// The operand types of the softmax Dice path of losses_cpu_kernels.h: float32 logits, int64 labels, float32 sums.
template <typename Z, typename T, typename A>
constexpr bool kDiceTypes = std::is_same_v<Z, float> && std::is_same_v<T, int64_t> && std::is_same_v<A, float>;

// Whether the softmax Dice path (softmax_dice_forward / softmax_dice_backward) serves the full blocks: its operand
// types, contiguous along the voxels (and probs, when given), and a spec it computes (softmax, pow linear, with or
// without the softmax cross entropy, no BCE or focal term).
template <typename Z, typename T, typename A>
bool softmax_dice_path(const Spec& spec, const Operands<Z, T, A>& o, const int64_t* ps) {
  if constexpr (kDiceTypes<Z, T, A>) {
    return spec.label_mode && spec.act == Act::kSoftmax && spec.pow == Pow::kLinear && spec.ce != Ce::kBce &&
           spec.focal == FocalMode::kOff && o.mp == nullptr && o.zs[2] == 1 && o.ts[1] == 1 &&
           (ps == nullptr || ps[2] == 1);
  } else {
    return false;
  }
}

// The softmax Dice path's cross-entropy mode: 0 none, 1 the cross entropy, 2 with label smoothing.
int softmax_dice_ce(const Spec& spec) {
  return spec.ce == Ce::kSoftmaxSmooth ? 2 : (spec.ce == Ce::kSoftmax ? 1 : 0);
}

// probs: when defined, a (B, C, S) tensor of the logits' dtype the forward's softmax is written to (for the backward
// to start from: backward_kernel with from_probs).
template <typename Z, typename T, typename A>
void stats_kernel(const at::Tensor& z, const at::Tensor& t, const at::Tensor* mask, const Spec& spec, at::Tensor& out,
                  const at::Tensor& probs) {
  const int64_t B = z.size(0), C = z.size(1), S = z.size(2);
  const int64_t chunks = std::max<int64_t>(1, (S + kChunk - 1) / kChunk);
  std::vector<double> partial(static_cast<size_t>(B * chunks * kNumSlots * C), 0.0);
  std::vector<double> counts(static_cast<size_t>(B * chunks), 0.0);
  const auto ops = operands<Z, T, A>(z, t, mask, spec);
  const auto forward = FASTMED_KERNEL(forward_block<A>);
  const auto load = FASTMED_KERNEL(load_block<Z, T, A>);
  Z* pp = probs.defined() ? probs.data_ptr<Z>() : nullptr;
  const int64_t ps[3] = {pp ? probs.stride(0) : 0, pp ? probs.stride(1) : 0, pp ? probs.stride(2) : 0};
  const bool dice = softmax_dice_path(spec, ops, pp ? ps : nullptr);
  const int ce = softmax_dice_ce(spec);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals no_subnormals;  // confident logits: softmax probabilities below FLT_MIN (see the header)
    BlockStorage<A> storage(C);
    std::vector<A> lanes(static_cast<size_t>(kNumSlots * C * kLanes));  // per-lane sums over one chunk
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, k = task % chunks;
      std::fill(lanes.begin(), lanes.end(), A(0));
      double cnt = 0, bad = 0;
      for (int64_t s0 = k * kChunk; s0 < std::min(S, (k + 1) * kChunk); s0 += kLanes) {
        const int64_t n = std::min(kLanes, S - s0);
        if constexpr (kDiceTypes<Z, T, A>) {
          if (dice && n == kLanes) {
            static const auto fast = FASTMED_KERNEL(softmax_dice_forward);
            float nc = 0, nbad = 0;  // whole numbers up to kLanes
            fast(ops.zp + b * ops.zs[0] + s0, ops.zs[1], ops.tp + b * ops.ts[0] + s0, C, spec.has_ignore,
                 spec.ignore_index, ce, lanes.data(), pp ? pp + b * ps[0] + s0 : nullptr, ps[1], storage.k.p, nc,
                 nbad);
            cnt += static_cast<double>(nc);
            bad += static_cast<double>(nbad);
            continue;
          }
        }
        load(ops, spec, b, s0, n, storage.k, cnt, bad, true);
        forward(storage.k, spec, lanes.data());
        if (pp) store_rows(storage.k.p, C, b, s0, n, pp, ps);
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
// from_probs: dz holds the forward's softmax (stats_kernel's probs), which the backward reads in place of the
// logits and overwrites with d logits (the logits are not read).
template <typename Z, typename T, typename A>
void backward_kernel(const at::Tensor& gstats, const at::Tensor& z, const at::Tensor& t, const at::Tensor* mask,
                     const Spec& spec, at::Tensor& dz, bool from_probs) {
  const int64_t B = z.size(0), C = z.size(1), S = z.size(2);
  const int64_t ds[3] = {dz.stride(0), dz.stride(1), dz.stride(2)};
  const A* gp = gstats.data_ptr<A>();
  Z* dp = dz.data_ptr<Z>();
  const int64_t chunks = std::max<int64_t>(1, (S + kChunk - 1) / kChunk);
  const auto o = operands<Z, T, A>(z, t, mask, spec);
  const auto backward = FASTMED_KERNEL(backward_block<A>);
  const auto load = FASTMED_KERNEL(load_block<Z, T, A>);
  const auto load_probs = FASTMED_KERNEL(load_rows<Z, A>);
  const bool dice = from_probs && softmax_dice_path(spec, o, ds);
  const int ce = softmax_dice_ce(spec);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals no_subnormals;  // confident logits: softmax probabilities below FLT_MIN (see the header)
    BlockStorage<A> storage(C);
    Block<A>& blk = storage.k;
    double cnt = 0, bad = 0;  // not needed here
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, k = task % chunks;
      for (int64_t s0 = k * kChunk; s0 < std::min(S, (k + 1) * kChunk); s0 += kLanes) {
        const int64_t n = std::min(kLanes, S - s0);
        if constexpr (kDiceTypes<Z, T, A>) {
          if (dice && n == kLanes) {
            static const auto fast = FASTMED_KERNEL(softmax_dice_backward);
            fast(dp + b * ds[0] + s0, ds[1], o.tp + b * o.ts[0] + s0, C, spec.has_ignore, spec.ignore_index, ce,
                 gp + b * kNumSlots * C, blk.q);  // q and w: 2 C rows
            continue;
          }
        }
        load(o, spec, b, s0, n, blk, cnt, bad, !from_probs);
        if (from_probs) load_probs(static_cast<const Z*>(dp), ds, C, b, s0, n, blk.p);
        backward(blk, spec, gp + b * kNumSlots * C, from_probs);
        store_rows(blk.dz, C, b, s0, n, dp, ds);
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

namespace {

// loss_stats_cpu; with probs defined, the forward's softmax is written to it as well (loss_stats_probs_cpu).
torch::Tensor stats(const torch::Tensor& logits, const torch::Tensor& target, const c10::optional<torch::Tensor>& mask,
                    const Spec& spec, const torch::Tensor& probs) {
  TORCH_CHECK(logits.dim() == 3 && logits.device().is_cpu(), "logits: a (B, C, S) CPU tensor expected");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto out = torch::zeros({logits.size(0), kNumSlots, logits.size(1)}, logits.options().dtype(acc));
  const at::Tensor* m = mask.has_value() ? &mask.value() : nullptr;
  dispatch(logits, target, [&](auto z, auto t, auto a) {
    stats_kernel<decltype(z), decltype(t), decltype(a)>(logits, target, m, spec, out, probs);
  });
  return out;
}

// loss_stats_backward_cpu; from_probs: dlogits holds the forward's softmax (loss_stats_backward_probs_cpu).
torch::Tensor stats_backward(const torch::Tensor& gstats, const torch::Tensor& logits, const torch::Tensor& target,
                             const c10::optional<torch::Tensor>& mask, const Spec& spec, torch::Tensor dlogits,
                             bool from_probs) {
  TORCH_CHECK(logits.dim() == 3 && dlogits.dim() == 3, "logits, dlogits: (B, C, S) views expected");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(gstats.scalar_type() == acc && gstats.is_contiguous(), "gstats: contiguous, accumulation dtype");
  const at::Tensor* m = mask.has_value() ? &mask.value() : nullptr;
  dispatch(logits, target, [&](auto z, auto t, auto a) {
    backward_kernel<decltype(z), decltype(t), decltype(a)>(gstats, logits, target, m, spec, dlogits, from_probs);
  });
  return dlogits;
}

// The checks of a stored softmax: a (B, C, S) tensor of the logits' shape and dtype (float32 / float64: the
// accumulation dtype, so the backward reads exactly what it would compute), for a spec whose backward needs no logits.
void check_probs(const torch::Tensor& logits, const torch::Tensor& probs, const Spec& spec) {
  TORCH_CHECK(probs_suffice(spec), "probs: only a softmax with a region term and no BCE or focal term");
  TORCH_CHECK(probs.dim() == 3 && probs.sizes() == logits.sizes() && probs.scalar_type() == logits.scalar_type(),
              "probs: a (B, C, S) tensor of the logits' shape and dtype expected");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "probs: float32 or float64 logits expected, got ", logits.scalar_type());
}

}  // namespace

torch::Tensor loss_stats_cpu(const torch::Tensor& logits, const torch::Tensor& target,
                             const c10::optional<torch::Tensor>& mask, FASTMED_STATS_SPEC_PARAMS) {
  const Spec spec = make_spec(FASTMED_STATS_SPEC_ARGS);
  return stats(logits, target, mask, spec, torch::Tensor());
}

bool loss_stats_probs_suffice(FASTMED_STATS_SPEC_PARAMS) { return probs_suffice(make_spec(FASTMED_STATS_SPEC_ARGS)); }

torch::Tensor loss_stats_probs_cpu(const torch::Tensor& logits, const torch::Tensor& target,
                                   const c10::optional<torch::Tensor>& mask, FASTMED_STATS_SPEC_PARAMS,
                                   torch::Tensor probs) {
  const Spec spec = make_spec(FASTMED_STATS_SPEC_ARGS);
  check_probs(logits, probs, spec);
  return stats(logits, target, mask, spec, probs);
}

torch::Tensor loss_stats_backward_cpu(const torch::Tensor& gstats, const torch::Tensor& logits,
                                      const torch::Tensor& target, const c10::optional<torch::Tensor>& mask,
                                      FASTMED_STATS_SPEC_PARAMS, torch::Tensor dlogits) {
  const Spec spec = make_spec(FASTMED_STATS_SPEC_ARGS);
  return stats_backward(gstats, logits, target, mask, spec, dlogits, false);
}

torch::Tensor loss_stats_backward_probs_cpu(const torch::Tensor& gstats, const torch::Tensor& logits,
                                            const torch::Tensor& target, const c10::optional<torch::Tensor>& mask,
                                            FASTMED_STATS_SPEC_PARAMS, torch::Tensor dlogits) {
  const Spec spec = make_spec(FASTMED_STATS_SPEC_ARGS);
  check_probs(logits, dlogits, spec);
  return stats_backward(gstats, logits, target, mask, spec, dlogits, true);
}

}  // namespace fastmed
