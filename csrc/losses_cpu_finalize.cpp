// The loss formula on the statistics (fastmed::loss_finalize, the cpp backend) and the operands of the statistics
// pass as csrc/losses_cpu.cpp reads them.
//
// loss_finalize_cpu: the closed forms of fastmed.reference.losses.loss_finalize (the oracle; tests/test_losses_cpp.py
// and tests/test_losses_finalize.py compare them) on the tiny statistics (B, NUM_SLOTS, C), in plain loops in the
// statistics' dtype A (float32, or float64): the loss (a 0-d tensor, or for region_reduction "none" MONAI's (B, C')
// / (C',), generalized Dice (B, 1) / (1,)), jac = d loss / d stats (B, NUM_SLOTS, C) and valid (1 when no voxel holds
// a bad label).  The reference needs some thirty torch operations for the same (about a third of the whole loss's
// time on small inputs).
//
// loss_stats_operands_cpu: the views and conversions of fastmed.ops.losses' _cpp_operands in one call (a Python
// function of a dozen tensor calls costs more than the statistics pass on small inputs).
//
// loss_stats_autograd_cpu / loss_finalize_autograd_cpu: both steps with their autograd nodes in C++ (see below).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "fastmed_ext.h"
#include "losses_cpu_spec.h"

namespace fastmed {

namespace {

using namespace loss_vocab;  // the slots, pick

enum class Region { kOff, kDice, kJaccard, kTversky, kGeneralized, kNnunet };
enum class CeTerm { kOff, kLabels, kDense, kBce, kNnunet };
enum class Reduction { kMean, kSum, kNone };
enum class WType { kSquare, kSimple, kUniform };
enum class AlphaMode { kOff, kScalar, kPerClass };

Reduction reduction(const std::string& value, const char* name, bool allow_none) {
  const Reduction r = pick<Reduction>(value, "LossSpec", name,
                                      {{"mean", Reduction::kMean}, {"sum", Reduction::kSum},
                                       {"none", Reduction::kNone}});
  TORCH_CHECK_VALUE(allow_none || r != Reduction::kNone, "LossSpec.", name, ": 'mean' or 'sum' expected, got "
                    "'none'");
  return r;
}

// A LossSpec (fastmed/reference/loss_spec.py), parsed.
struct Formula {
  double num_voxels;
  Region region;
  int64_t region_c0;
  bool abs_pow;  // pow_mode "abs": tp = (PRED + GROUND - DIFF) / 2
  bool batch;
  double smooth_nr, smooth_dr, tversky_alpha, tversky_beta;
  WType w_type;
  Reduction region_reduction;
  double region_scale;
  CeTerm ce;
  Reduction ce_reduction;
  double label_smoothing, ce_scale;
  bool focal, focal_softmax;
  int64_t focal_c0;
  AlphaMode alpha_mode;
  double alpha;
  Reduction focal_reduction;
  bool focal_masked;
  double focal_scale;
};

// Per-class weights as contiguous tensors of the statistics' dtype (null pointer: absent).
template <typename A>
const A* weights(const c10::optional<at::Tensor>& w, at::Tensor& keep, at::ScalarType dtype) {
  if (!w.has_value() || !w->defined()) return nullptr;
  keep = w->to(dtype).contiguous();
  return keep.data_ptr<A>();
}

// MONAI's overlap coefficients (a_n, a_t, a_fp, a_fn): reference.overlap_coefficients.
void overlap_coefficients(const Formula& f, double* a) {
  if (f.region == Region::kTversky) {
    a[0] = 1, a[1] = 1, a[2] = f.tversky_alpha, a[3] = f.tversky_beta;
  } else if (f.region == Region::kJaccard) {
    a[0] = a[1] = a[2] = a[3] = 2;
  } else {
    a[0] = 2, a[1] = 2, a[2] = 1, a[3] = 1;
  }
}

// reference._region_closed_form: the overlap term (values in `value`, R x Cp or R x 1 for the generalized Dice)
// and its derivative added to jac.
template <typename A>
void region_term(const A* s, const A* region_w, const Formula& f, int64_t B, int64_t C, A* jac,
                 std::vector<A>& value) {
  const int64_t c0 = f.region_c0, Cp = C - c0, R = f.batch ? 1 : B;
  auto at = [&](int64_t b, int64_t k, int64_t c) { return s[(b * kNumSlots + k) * C + c]; };
  std::vector<A> tp(R * Cp), fp(R * Cp), fn(R * Cp), ground(R * Cp);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < Cp; ++c) {
      A in = 0, pr = 0, gr = 0, di = 0;
      for (int64_t b = f.batch ? 0 : r; b < (f.batch ? B : r + 1); ++b) {  // batch: the sum over the samples
        in += at(b, kIntersect, c0 + c);
        pr += at(b, kPred, c0 + c);
        gr += at(b, kGround, c0 + c);
        di += at(b, kDiff, c0 + c);
      }
      const A t = f.abs_pow ? (pr + gr - di) / A(2) : in;
      tp[r * Cp + c] = t;
      fp[r * Cp + c] = pr - t;
      fn[r * Cp + c] = gr - t;
      ground[r * Cp + c] = gr;
    }
  }
  std::vector<A> d_tp(R * Cp), d_fp(R * Cp), d_fn(R * Cp);
  if (f.region == Region::kGeneralized) {
    // class weights in float32 from the ground sums (MONAI's .float()), infinite ones replaced by the row's largest
    value.assign(R, A(0));
    std::vector<A> w(R * Cp);
    for (int64_t r = 0; r < R; ++r) {
      std::vector<float> wf(Cp);
      std::vector<bool> inf(Cp);
      float mx = -std::numeric_limits<float>::infinity();  // torch.max over the row: NaN wins
      for (int64_t c = 0; c < Cp; ++c) {
        const float g = static_cast<float>(ground[r * Cp + c]);
        const float v = f.w_type == WType::kSquare ? 1.0f / (g * g) : (f.w_type == WType::kSimple ? 1.0f / g : 1.0f);
        inf[c] = std::isinf(v);
        wf[c] = inf[c] ? 0.0f : v;
        mx = (std::isnan(wf[c]) || std::isnan(mx)) ? std::numeric_limits<float>::quiet_NaN() : std::max(mx, wf[c]);
      }
      for (int64_t c = 0; c < Cp; ++c) w[r * Cp + c] = static_cast<A>(wf[c] + (inf[c] ? 1.0f : 0.0f) * mx);
    }
    const A unit_base = f.region_reduction == Reduction::kMean ? A(1) / A(R) : A(1);
    const A unit = unit_base * A(f.region_scale);
    for (int64_t r = 0; r < R; ++r) {
      A num = 0, den = 0;
      for (int64_t c = 0; c < Cp; ++c) {
        const int64_t i = r * Cp + c;
        num += tp[i] * w[i];
        den += (A(2) * tp[i] + fp[i] + fn[i]) * w[i];
      }
      const A numer = A(2) * num + A(f.smooth_nr);
      const A denom = den + A(f.smooth_dr);
      value[r] = A(1) - numer / denom;
      for (int64_t c = 0; c < Cp; ++c) {
        const int64_t i = r * Cp + c;
        d_fp[i] = numer / (denom * denom) * w[i] * unit;
        d_tp[i] = A(2) * d_fp[i] - A(2) * w[i] / denom * unit;
        d_fn[i] = d_fp[i];
      }
    }
  } else {
    double a[4];
    overlap_coefficients(f, a);
    const bool nnunet = f.region == Region::kNnunet;
    const A smooth_dr = A(nnunet ? f.smooth_nr : f.smooth_dr);  // nnU-Net: one smooth
    const A unit = f.region_reduction == Reduction::kMean ? A(1) / A(R * Cp) : A(1);
    value.assign(R * Cp, A(0));
    for (int64_t i = 0; i < R * Cp; ++i) {
      const A numer = A(a[0]) * tp[i] + A(f.smooth_nr);
      A denom = A(a[1]) * tp[i] + A(a[2]) * fp[i] + A(a[3]) * fn[i] + smooth_dr;
      A live = 1;
      A v;
      if (nnunet) {  // -(2 tp + s) / clip(2 tp + fp + fn + s, 1e-8)
        live = denom >= A(1e-8) ? A(1) : A(0);
        denom = (denom >= A(1e-8) || std::isnan(denom)) ? denom : A(1e-8);  // NaN stays (torch.clip)
        v = -numer / denom;
      } else {
        v = A(1) - numer / denom;
      }
      A scale = A(f.region_scale);
      if (region_w != nullptr) {
        v = v * region_w[i % Cp];
        scale = scale * region_w[i % Cp];
      }
      value[i] = v;
      scale = scale * unit;
      const A q = numer / (denom * denom) * live * scale;
      d_tp[i] = -A(a[0]) / denom * scale + A(a[1]) * q;
      d_fp[i] = A(a[2]) * q;
      d_fn[i] = A(a[3]) * q;
    }
  }
  for (int64_t b = 0; b < B; ++b) {  // reference._tp_fp_fn_grad; with batch every sample takes row 0
    const int64_t r = f.batch ? 0 : b;
    for (int64_t c = 0; c < Cp; ++c) {
      const int64_t i = r * Cp + c;
      A* j = jac + b * kNumSlots * C + c0 + c;
      if (f.abs_pow) {
        j[kPred * C] += (d_tp[i] + d_fp[i] - d_fn[i]) / A(2);
        j[kDiff * C] += (d_fp[i] + d_fn[i] - d_tp[i]) / A(2);
      } else {
        j[kIntersect * C] += d_tp[i] - d_fp[i] - d_fn[i];
        j[kPred * C] += d_fp[i];
      }
    }
  }
}

// reference._ce_closed_form
template <typename A>
A ce_term(const A* s, const A* ce_w, const Formula& f, int64_t B, int64_t C, A* jac) {
  auto at = [&](int64_t b, int64_t k, int64_t c) { return s[(b * kNumSlots + k) * C + c]; };
  auto j = [&](int64_t b, int64_t k, int64_t c) -> A& { return jac[(b * kNumSlots + k) * C + c]; };
  const A scale = A(f.ce_scale);
  if (f.ce == CeTerm::kNnunet) {
    A count = 0, nll = 0;
    for (int64_t b = 0; b < B; ++b) count += at(b, kCount, 0);
    const A denom = (count >= A(1) || std::isnan(count)) ? count : A(1);  // clamp(min=1); NaN stays
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        nll += at(b, kNll, c);
        j(b, kNll, c) += scale / denom;
      }
    }
    return scale * nll / denom;
  }
  if (f.ce == CeTerm::kBce) {
    A nll = 0, lsum = 0;
    for (int64_t b = 0; b < B; ++b) {
      nll += at(b, kNll, 0);
      lsum += at(b, kLogsum, 0);
    }
    const A denom = f.ce_reduction == Reduction::kMean ? A(double(B) * f.num_voxels) : A(1);
    const A total = ce_w != nullptr ? nll + (ce_w[0] - A(1)) * lsum : nll;
    for (int64_t b = 0; b < B; ++b) {
      j(b, kNll, 0) += scale / denom;
      if (ce_w != nullptr) j(b, kLogsum, 0) += scale * (ce_w[0] - A(1)) / denom;
    }
    return scale * total / denom;
  }
  const A eps = A(f.label_smoothing);
  A denom;
  if (f.ce_reduction == Reduction::kSum) {
    denom = 1;
  } else if (f.ce == CeTerm::kLabels && ce_w != nullptr) {
    denom = 0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) denom += at(b, kGround, c) * ce_w[c];
    }
  } else {
    denom = A(double(B) * f.num_voxels);
  }
  A total = 0, smooth = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const A w = ce_w != nullptr ? ce_w[c] : A(1);
      total += (A(1) - eps) * at(b, kNll, c) * w;
      j(b, kNll, c) += scale * (A(1) - eps) * w / denom;
      if (f.label_smoothing > 0) {
        smooth += at(b, kLogsum, c) * w;
        j(b, kLogsum, c) += scale * eps / A(C) * w / denom;
      }
    }
  }
  if (f.label_smoothing > 0) total = total + eps / A(C) * smooth;
  return scale * total / denom;
}

// reference._focal_closed_form
template <typename A>
A focal_term(const A* s, const A* alpha_w, const A* focal_w, const Formula& f, int64_t B, int64_t C, A* jac) {
  const int64_t c0 = f.focal_c0, Cp = C - c0;
  std::vector<A> coef_l(Cp, A(1)), coef_p(Cp, A(0));
  if (f.focal_softmax) {
    if (f.alpha_mode == AlphaMode::kScalar) {  // MONAI's [1 - alpha, alpha, alpha, ...]
      std::fill(coef_l.begin(), coef_l.end(), A(f.alpha));
      coef_l[0] = A(1 - f.alpha);
    } else if (f.alpha_mode == AlphaMode::kPerClass) {
      for (int64_t c = 0; c < Cp; ++c) coef_l[c] = alpha_w[c];
    }
  } else if (f.alpha_mode == AlphaMode::kScalar) {
    for (int64_t c = 0; c < Cp; ++c) {
      coef_l[c] = coef_l[c] * A(1 - f.alpha);
      coef_p[c] = coef_p[c] + A(2 * f.alpha - 1);
    }
  } else if (f.alpha_mode == AlphaMode::kPerClass) {
    for (int64_t c = 0; c < Cp; ++c) coef_p[c] = alpha_w[c] - A(1);
  }
  if (focal_w != nullptr) {
    for (int64_t c = 0; c < Cp; ++c) {
      coef_l[c] = coef_l[c] * focal_w[c];
      coef_p[c] = coef_p[c] * focal_w[c];
    }
  }
  const A eps = A(std::numeric_limits<float>::epsilon());
  auto count = [&](int64_t b) { return s[(b * kNumSlots + kCount) * C]; };
  std::vector<A> unit(B);
  if (f.focal_reduction == Reduction::kSum) {
    for (int64_t b = 0; b < B; ++b) {
      const A per = f.focal_masked ? (count(b) >= eps ? count(b) : (std::isnan(count(b)) ? count(b) : eps))
                                   : A(f.num_voxels);
      unit[b] = A(f.focal_scale) / per;
    }
  } else {
    A denom;
    if (f.focal_masked) {
      A total = 0;
      for (int64_t b = 0; b < B; ++b) total += count(b);
      denom = total >= eps ? total : (std::isnan(total) ? total : eps);
    } else {
      denom = A(double(B) * double(Cp) * f.num_voxels);
    }
    std::fill(unit.begin(), unit.end(), A(f.focal_scale) / denom);
  }
  A total = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < Cp; ++c) {
      const A* row = s + b * kNumSlots * C + c0 + c;
      A* j = jac + b * kNumSlots * C + c0 + c;
      j[kFocal * C] += coef_l[c] * unit[b];
      j[kFocalPos * C] += coef_p[c] * unit[b];
      total += (coef_l[c] * row[kFocal * C] + coef_p[c] * row[kFocalPos * C]) * unit[b];
    }
  }
  return total;
}

template <typename A>
std::vector<at::Tensor> finalize(const at::Tensor& stats_in, const c10::optional<at::Tensor>& region_weight,
                                 const c10::optional<at::Tensor>& ce_weight, const c10::optional<at::Tensor>& focal_alpha,
                                 const c10::optional<at::Tensor>& focal_weight, const Formula& f) {
  const at::Tensor stats = stats_in.contiguous();
  const int64_t B = stats.size(0), C = stats.size(2);
  const auto dtype = stats.scalar_type();
  at::Tensor keep_r, keep_c, keep_a, keep_f;
  const A* rw = weights<A>(region_weight, keep_r, dtype);
  const A* cw = weights<A>(ce_weight, keep_c, dtype);
  const A* aw = weights<A>(focal_alpha, keep_a, dtype);
  const A* fw = weights<A>(focal_weight, keep_f, dtype);
  const A* s = stats.data_ptr<A>();
  at::Tensor jac = at::zeros_like(stats);
  A* j = jac.data_ptr<A>();
  at::Tensor loss;
  A scalar = 0;
  bool have = false;
  if (f.region != Region::kOff) {
    std::vector<A> value;
    region_term<A>(s, rw, f, B, C, j, value);
    const A scale = A(f.region_scale);
    const int64_t R = f.batch ? 1 : B, per_row = static_cast<int64_t>(value.size()) / R;
    if (f.region_reduction == Reduction::kNone) {
      std::vector<int64_t> shape = f.batch ? std::vector<int64_t>{per_row} : std::vector<int64_t>{R, per_row};
      loss = at::empty(shape, stats.options());
      A* o = loss.data_ptr<A>();
      for (size_t i = 0; i < value.size(); ++i) o[i] = f.region_scale != 1.0 ? value[i] * scale : value[i];
    } else {
      A sum = 0;
      for (const A v : value) sum += v;
      scalar = f.region_reduction == Reduction::kMean ? sum / A(value.size()) : sum;
      if (f.region_scale != 1.0) scalar = scale * scalar;
      have = true;
    }
  }
  if (f.ce != CeTerm::kOff) {
    const A v = ce_term<A>(s, cw, f, B, C, j);
    scalar = have ? scalar + v : v;
    have = true;
  }
  if (f.focal) {
    const A v = focal_term<A>(s, aw, fw, f, B, C, j);
    scalar = have ? scalar + v : v;
    have = true;
  }
  TORCH_CHECK_VALUE(have || loss.defined(), "LossSpec: every term is off (region, ce and focal); nothing to compute");
  if (!loss.defined()) loss = at::scalar_tensor(scalar, stats.options());
  A bad = 0;
  for (int64_t b = 0; b < B; ++b) bad += s[(b * kNumSlots + kBad) * C];
  at::Tensor valid = at::scalar_tensor(bad == A(0) ? 1.0 : 0.0, stats.options());
  return {loss, jac, valid};
}

}  // namespace

std::vector<torch::Tensor> loss_finalize_cpu(const torch::Tensor& stats, FASTMED_LOSS_WEIGHT_PARAMS,
                                             FASTMED_LOSS_SPEC_PARAMS) {
  TORCH_CHECK(stats.dim() == 3 && stats.size(1) == kNumSlots && stats.device().is_cpu(),
              "stats: a (B, NUM_SLOTS, C) CPU tensor expected");
  Formula f;
  f.num_voxels = static_cast<double>(num_voxels);
  f.region = pick<Region>(region, "LossSpec", "region",
                          {{"off", Region::kOff}, {"dice", Region::kDice}, {"jaccard", Region::kJaccard},
                           {"tversky", Region::kTversky}, {"generalized", Region::kGeneralized},
                           {"nnunet", Region::kNnunet}});
  f.region_c0 = region_c0;
  const int pow = pick<int>(pow_mode, "LossSpec", "pow_mode",
                            {{"off", 0}, {"linear", 1}, {"square", 2}, {"abs", 3}});
  f.abs_pow = pow == 3;
  f.batch = batch;
  f.smooth_nr = smooth_nr;
  f.smooth_dr = smooth_dr;
  f.tversky_alpha = tversky_alpha;
  f.tversky_beta = tversky_beta;
  f.w_type = pick<WType>(w_type, "LossSpec", "w_type",
                         {{"square", WType::kSquare}, {"simple", WType::kSimple}, {"uniform", WType::kUniform}});
  f.region_reduction = reduction(region_reduction, "region_reduction", true);
  f.region_scale = region_scale;
  f.ce = pick<CeTerm>(ce, "LossSpec", "ce",
                      {{"off", CeTerm::kOff}, {"labels", CeTerm::kLabels}, {"dense", CeTerm::kDense},
                       {"bce", CeTerm::kBce}, {"nnunet", CeTerm::kNnunet}});
  f.ce_reduction = reduction(ce_reduction, "ce_reduction", false);
  f.label_smoothing = label_smoothing;
  f.ce_scale = ce_scale;
  const int fm = pick<int>(focal, "LossSpec", "focal", {{"off", 0}, {"sigmoid", 1}, {"softmax", 2}});
  f.focal = fm != 0;
  f.focal_softmax = fm == 2;
  f.focal_c0 = focal_c0;
  f.alpha_mode = pick<AlphaMode>(alpha_mode, "LossSpec", "alpha_mode",
                                 {{"off", AlphaMode::kOff}, {"scalar", AlphaMode::kScalar},
                                  {"per_class", AlphaMode::kPerClass}});
  f.alpha = alpha;
  f.focal_reduction = reduction(focal_reduction, "focal_reduction", false);
  f.focal_masked = focal_masked;
  f.focal_scale = focal_scale;
  TORCH_CHECK_VALUE(f.region != Region::kNnunet || (pow == 1 && f.region_reduction == Reduction::kMean),
                    "LossSpec.region='nnunet' is nnU-Net's soft Dice: pow_mode 'linear', region_reduction 'mean'");
  TORCH_CHECK_VALUE(f.region_reduction != Reduction::kNone || (f.ce == CeTerm::kOff && !f.focal),
                    "LossSpec.region_reduction='none' keeps one value per sample and class: the ce and focal terms "
                    "must be off");
  const int64_t C = stats.size(2);
  TORCH_CHECK_VALUE(region_c0 >= 0 && region_c0 < C && focal_c0 >= 0 && focal_c0 < C,
                    "LossSpec: region_c0 and focal_c0 must be classes of the statistics");
  if (stats.scalar_type() == at::kDouble) {
    return finalize<double>(stats, region_weight, ce_weight, focal_alpha, focal_weight, f);
  }
  TORCH_CHECK(stats.scalar_type() == at::kFloat, "stats: float32 or float64 expected, got ", stats.scalar_type());
  return finalize<float>(stats, region_weight, ce_weight, focal_alpha, focal_weight, f);
}

namespace {

// (B, C, *spatial) -> (B, C, S): a view where the spatial dims collapse, else a contiguous copy
// (fastmed._validate.flat_view).
at::Tensor flat(const at::Tensor& x) {
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  return x.reshape({x.size(0), x.size(1), S});
}

at::ScalarType accumulation(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The operands as loss_stats_cpu reads them: logits (B, C, S); labels (B, S) as int64, float32 or float64 (checked
// there in their own precision; float16 / bfloat16 labels are exact in float32) or a dense target (B, Ct, S) in the
// accumulation dtype; the (B, S) mask in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, c10::optional<at::Tensor>> operands(const at::Tensor& logits,
                                                                       const at::Tensor& target,
                                                                       const c10::optional<at::Tensor>& mask,
                                                                       bool label_mode) {
  const auto acc = accumulation(logits);
  at::Tensor t = flat(target);
  if (label_mode) {
    t = t.select(1, 0);
    if (!t.is_floating_point()) {
      t = t.to(at::kLong);
    } else if (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble) {
      t = t.to(at::kFloat);
    }
  } else {
    t = t.to(acc);
  }
  c10::optional<at::Tensor> m;
  if (mask.has_value() && mask->defined()) m = flat(*mask).select(1, 0).to(acc);
  return {flat(logits), t, m};
}

}  // namespace

namespace {

// loss_stats_nd_cpu; with probs defined (a tensor like the logits whose (B, C, S) view is a view: probs_buffer), the
// softmax is written to it too (loss_stats_probs_cpu).
torch::Tensor stats_nd(const torch::Tensor& logits, const torch::Tensor& target,
                       const c10::optional<torch::Tensor>& mask, FASTMED_STATS_SPEC_PARAMS, const torch::Tensor& probs) {
  TORCH_CHECK(logits.dim() >= 2 && target.dim() >= 2, "logits, target: (B, C, *spatial) tensors expected");
  auto [z, t, m] = operands(logits, target, mask, label_mode);
  return probs.defined() ? loss_stats_probs_cpu(z, t, m, FASTMED_STATS_SPEC_ARGS, flat(probs))
                         : loss_stats_cpu(z, t, m, FASTMED_STATS_SPEC_ARGS);
}

// loss_stats_backward_nd_cpu; with probs defined (the softmax stats_nd stored there), the backward starts from it,
// overwrites it with d logits and returns it (loss_stats_backward_probs_cpu).  The logits are not read then: the
// stored softmax's (B, C, S) view stands in for theirs (no copy of logits whose dims do not collapse).
torch::Tensor stats_backward_nd(const torch::Tensor& gstats, const torch::Tensor& logits, const torch::Tensor& target,
                                const c10::optional<torch::Tensor>& mask, FASTMED_STATS_SPEC_PARAMS,
                                const torch::Tensor& probs) {
  TORCH_CHECK(logits.dim() >= 2 && target.dim() >= 2, "logits, target: (B, C, *spatial) tensors expected");
  const at::Tensor gs = gstats.to(accumulation(logits)).contiguous();
  if (probs.defined()) {
    auto [p, t, m] = operands(probs, target, mask, label_mode);
    loss_stats_backward_probs_cpu(gs, p, t, m, FASTMED_STATS_SPEC_ARGS, p);
    return probs;
  }
  auto [z, t, m] = operands(logits, target, mask, label_mode);
  at::Tensor dlogits = at::empty_like(logits);  // the logits' dtype and layout
  at::Tensor dz = flat(dlogits);
  loss_stats_backward_cpu(gs, z, t, m, FASTMED_STATS_SPEC_ARGS, dz);
  if (dz.data_ptr() != dlogits.data_ptr()) dlogits.copy_(dz.view(dlogits.sizes()));  // dims that do not collapse
  return dlogits;
}

// A tensor like the logits for the forward to keep its softmax in (the backward's d logits later), when the spec's
// backward can start from it (loss_stats_probs_suffice) and its (B, C, S) view is a view; else undefined.
at::Tensor probs_buffer(const at::Tensor& logits, FASTMED_STATS_SPEC_PARAMS) {
  if (logits.dim() < 2 || (logits.scalar_type() != at::kFloat && logits.scalar_type() != at::kDouble) ||
      !loss_stats_probs_suffice(FASTMED_STATS_SPEC_ARGS)) {
    return at::Tensor();
  }
  at::Tensor probs = at::empty_like(logits);
  return flat(probs).is_alias_of(probs) ? probs : at::Tensor();
}

}  // namespace

torch::Tensor loss_stats_nd_cpu(const torch::Tensor& logits, const torch::Tensor& target,
                                const c10::optional<torch::Tensor>& mask, FASTMED_STATS_SPEC_PARAMS) {
  return stats_nd(logits, target, mask, FASTMED_STATS_SPEC_ARGS, at::Tensor());
}

torch::Tensor loss_stats_backward_nd_cpu(const torch::Tensor& gstats, const torch::Tensor& logits,
                                         const torch::Tensor& target, const c10::optional<torch::Tensor>& mask,
                                         FASTMED_STATS_SPEC_PARAMS) {
  return stats_backward_nd(gstats, logits, target, mask, FASTMED_STATS_SPEC_ARGS, at::Tensor());
}

// ---------------------------------------------------------------------------------------------- autograd nodes
// The direct path's native implementations (fastmed/ops/_direct.py): the two loss steps as autograd functions in
// C++ (a Python autograd.Function costs tens of microseconds a call, forward and backward: on small inputs more than
// the whole C++ work).  Their backwards are the registered ops' backwards: d logits = loss_stats_backward_nd_cpu
// (gstats); gstats = jac * (the output gradient broadcast to jac, reference.finalize_output_grad).  A differentiated
// backward (create_graph=True) calls the Python functions set with set_loss_double_backward.
namespace {

pybind11::object* stats_double_backward_fn = nullptr;
pybind11::object* finalize_double_backward_fn = nullptr;

// The spec fields of a call, kept for the backward (one saved entry instead of one per field).
template <typename... Fields>
c10::impl::GenericList spec_list(const Fields&... fields) {
  c10::impl::GenericList list(c10::AnyType::get());
  list.reserve(sizeof...(Fields));
  (list.push_back(c10::IValue(fields)), ...);
  return list;
}

pybind11::object to_python(const c10::IValue& v) {
  if (v.isString()) return pybind11::str(v.toStringRef());
  if (v.isBool()) return pybind11::bool_(v.toBool());
  if (v.isInt()) return pybind11::int_(v.toInt());
  return pybind11::float_(v.toDouble());
}

// fn(grad, *tensors, *spec) under the GIL; the tensor it returns (None: undefined).
at::Tensor call_python(pybind11::object* fn, const char* what, const at::Tensor& grad,
                       const std::vector<at::Tensor>& tensors, const c10::impl::GenericList& spec) {
  TORCH_CHECK(fn != nullptr, what, ": no double-backward function registered");
  pybind11::gil_scoped_acquire gil;
  pybind11::tuple args(1 + tensors.size() + spec.size());
  size_t i = 0;
  args[i++] = pybind11::cast(grad);
  for (const at::Tensor& t : tensors) args[i++] = t.defined() ? pybind11::cast(t) : pybind11::none();
  for (size_t k = 0; k < spec.size(); ++k) args[i++] = to_python(spec.get(k));
  pybind11::object out = (*fn)(*args);
  return out.is_none() ? at::Tensor() : out.cast<at::Tensor>();
}

c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

struct LossStatsFunction : public torch::autograd::Function<LossStatsFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                const at::Tensor& target, const c10::optional<at::Tensor>& mask,
                                                FASTMED_STATS_SPEC_PARAMS) {
    // With a gradient to compute and a spec whose backward needs only the softmax, the forward keeps it in the
    // buffer that becomes d logits: the backward then reads it instead of computing it again (no second exp pass;
    // the same memory as d logits, held from the forward on).
    const at::Tensor probs = ctx->needs_input_grad(0) ? probs_buffer(logits, FASTMED_STATS_SPEC_ARGS) : at::Tensor();
    at::Tensor stats = stats_nd(logits, target, mask, FASTMED_STATS_SPEC_ARGS, probs);
    ctx->save_for_backward({logits, target, mask.value_or(at::Tensor())});
    ctx->saved_data["spec"] = spec_list(FASTMED_STATS_SPEC_ARGS);
    if (probs.defined()) ctx->saved_data["probs"] = probs;
    ctx->set_materialize_grads(false);
    return {stats};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list result(13);  // one per argument of forward; only the logits get a gradient
    const at::Tensor& gstats = grads[0];
    if (!gstats.defined()) return result;
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const c10::impl::GenericList spec = ctx->saved_data["spec"].toList();
    if (at::GradMode::is_enabled()) {  // create_graph=True: the reference's differentiable closed form
      result[0] = call_python(stats_double_backward_fn, "loss_stats_autograd_cpu", gstats, saved, spec);
      return result;
    }
    auto str = [&](size_t k) { return spec.get(k).toStringRef(); };
    // The first backward takes the softmax the forward stored and writes d logits over it (a second one,
    // retain_graph=True, computes it again).  Dropped from saved_data first, so the returned tensor has no other
    // owner and autograd can keep it as the gradient without a copy.
    at::Tensor buffer;
    const auto probs = ctx->saved_data.find("probs");
    if (probs != ctx->saved_data.end()) {
      buffer = probs->second.toTensor();
      ctx->saved_data.erase(probs);
    }
    result[0] = stats_backward_nd(gstats, saved[0], saved[1], maybe(saved[2]), str(0), str(1), str(2), str(3),
                                  spec.get(4).toInt(), spec.get(5).toDouble(), str(6), spec.get(7).toBool(),
                                  spec.get(8).toBool(), spec.get(9).toInt(), buffer);
    return result;
  }
};

constexpr size_t kFinalizeInputs = 5 + 23;  // stats, four weights, the LossSpec fields

struct LossFinalizeFunction : public torch::autograd::Function<LossFinalizeFunction> {
  template <typename... Fields>
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& stats,
                                                const c10::optional<at::Tensor>& region_weight,
                                                const c10::optional<at::Tensor>& ce_weight,
                                                const c10::optional<at::Tensor>& focal_alpha,
                                                const c10::optional<at::Tensor>& focal_weight,
                                                const Fields&... fields) {
    static_assert(5 + sizeof...(Fields) == kFinalizeInputs, "the LossSpec fields");
    std::vector<at::Tensor> out = loss_finalize_cpu(stats, region_weight, ce_weight, focal_alpha, focal_weight,
                                                    fields...);
    ctx->save_for_backward({stats, out[1], region_weight.value_or(at::Tensor()), ce_weight.value_or(at::Tensor()),
                            focal_alpha.value_or(at::Tensor()), focal_weight.value_or(at::Tensor())});
    ctx->saved_data["spec"] = spec_list(fields...);
    ctx->mark_non_differentiable({out[1], out[2]});
    ctx->set_materialize_grads(false);  // jac and valid never carry a gradient: the backward reads the loss's only
    return {out[0], out[1], out[2]};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list result(kFinalizeInputs);
    const at::Tensor& gloss = grads[0];
    if (!gloss.defined()) return result;
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    const c10::impl::GenericList spec = ctx->saved_data["spec"].toList();
    if (at::GradMode::is_enabled()) {  // create_graph=True: autograd through the plain torch formula
      result[0] = call_python(finalize_double_backward_fn, "loss_finalize_autograd_cpu", gloss,
                              {saved[0], saved[2], saved[3], saved[4], saved[5]}, spec);
      return result;
    }
    const at::Tensor& jac = saved[1];
    if (gloss.dim() == 0) {
      result[0] = jac * gloss;
    } else if (spec.get(1).toStringRef() == "generalized") {  // (B, 1) or (1,): one value per sample (or batch)
      result[0] = jac * gloss.reshape({-1, 1, 1});
    } else {  // (B, C') or (C',): each value's gradient to its (sample, class) entries, from class region_c0 on
      at::Tensor g = gloss.reshape({-1, gloss.size(-1)});
      const int64_t c0 = spec.get(2).toInt();
      if (c0 != 0) g = at::constant_pad_nd(g, {c0, 0});
      result[0] = jac * g.reshape({g.size(0), 1, jac.size(2)});
    }
    return result;
  }
};

}  // namespace

torch::Tensor loss_stats_autograd_cpu(const torch::Tensor& logits, const torch::Tensor& target,
                                      const c10::optional<torch::Tensor>& mask, FASTMED_STATS_SPEC_PARAMS) {
  return LossStatsFunction::apply(logits, target, mask, FASTMED_STATS_SPEC_ARGS)[0];
}

std::vector<torch::Tensor> loss_finalize_autograd_cpu(const torch::Tensor& stats, FASTMED_LOSS_WEIGHT_PARAMS,
                                                      FASTMED_LOSS_SPEC_PARAMS) {
  return LossFinalizeFunction::apply(stats, region_weight, ce_weight, focal_alpha, focal_weight,
                                     FASTMED_LOSS_SPEC_ARGS);
}

void set_loss_double_backward(pybind11::object stats_fn, pybind11::object finalize_fn) {
  if (stats_double_backward_fn == nullptr) stats_double_backward_fn = new pybind11::object();
  if (finalize_double_backward_fn == nullptr) finalize_double_backward_fn = new pybind11::object();
  *stats_double_backward_fn = std::move(stats_fn);
  *finalize_double_backward_fn = std::move(finalize_fn);
}

}  // namespace fastmed
