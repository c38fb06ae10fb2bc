// The vectorized inner loops of csrc/losses_cpu.cpp: the statistics and d logits of one block of kLanes voxels.
//
// Included twice by losses_cpu.cpp, like norm_act_cpu_kernels.h: inside `namespace generic` (the build's default
// target) and inside `namespace avx2` (compiled for AVX2 + FMA, chosen at run time when the CPU has them), both
// under `#pragma GCC optimize("no-trapping-math")` so that the selects vectorize.  It includes nothing and uses
// Spec, Block, Operands, the mode enums, the slot constants, kLanes and kSoftplusThreshold from the enclosing namespace.
//
// A block holds the operands of kLanes voxels of one sample as (class, lane) arrays: every loop below runs over the
// lanes (the voxels) with the class fixed, so the compiler turns it into vector instructions; the activation is
// computed across the classes per lane.  exp / log / log1p of float32 are the branch-free polynomials below (the
// C library's are calls, which do not vectorize); float64 uses the C library's (scalar; accuracy first).
// Lanes past the end of the voxels (the tail block) hold zeros and are dropped by `valid` before any sum.

#define FASTMED_LANES _Pragma("omp simd") for (int64_t l = 0; l < kLanes; ++l)

// ---------------------------------------------------------------------------------------------- float32 math
#include "cpu_math_f32.h"  // exp_f32

FASTMED_INLINE float log_f32(float x) {  // x >= FLT_MIN or inf / NaN / 0 / negative: 2 atanh(f / (2 + f)); ~1 ulp
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  const float m0 = __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f800000);  // mantissa in [1, 2)
  const bool big = m0 > 1.41421356f;
  const float m = big ? m0 * 0.5f : m0;
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 127 + (big ? 1 : 0));
  const float f = m - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  float q = 1.0f / 9.0f;
  q = q * z + 1.0f / 7.0f;
  q = q * z + 1.0f / 5.0f;
  q = q * z + 1.0f / 3.0f;
  q = q * z + 1.0f;
  const float y = e * 0.693359375f + (2.0f * s * q - e * 2.12194440e-4f);
  const float inf = __builtin_inff();
  return x != x ? x : (x == inf ? inf : (x == 0.0f ? -inf : (x < 0.0f ? __builtin_nanf("") : y)));
}

FASTMED_INLINE float log1p_f32(float x) {  // x >= 0: log(1 + x) / ((1 + x) - 1) * x keeps the low bits of small x
  const float u = 1.0f + x;
  const float d = u - 1.0f;
  const float y = log_f32(u) * (x / (d == 0.0f ? 1.0f : d));
  return d == 0.0f ? x : (u == __builtin_inff() ? u : y);
}

FASTMED_INLINE float vexp(float x) { return exp_f32(x); }
FASTMED_INLINE float vlog(float x) { return log_f32(x); }
FASTMED_INLINE float vlog1p(float x) { return log1p_f32(x); }
FASTMED_INLINE float vabs(float x) { return __builtin_fabsf(x); }  // std::fabs is not inlined here (it
FASTMED_INLINE double vabs(double x) { return __builtin_fabs(x); }  // has other optimize options): no vectors
inline double vexp(double x) { return std::exp(x); }
inline double vlog(double x) { return std::log(x); }
inline double vlog1p(double x) { return std::log1p(x); }
FASTMED_INLINE float vpow(float b, float e) {  // b >= 0 or NaN: b^e as torch gives it (0^0 = 1, 0^e = 0 for e > 0)
  return e == 0.0f ? 1.0f : exp_f32(e * log_f32(b));
}
inline double vpow(double b, double e) { return std::pow(b, e); }

template <typename A>
FASTMED_INLINE A vsoftplus(A z) {  // the reference's softplus (z above the threshold: z)
  return z > A(kSoftplusThreshold) ? z : vlog1p(vexp(z > A(kSoftplusThreshold) ? A(kSoftplusThreshold) : z));  // NaN stays
}

template <typename A>
FASTMED_INLINE A vweigh(A w, A v) {  // w * v, a zero weight times an infinite v is 0; NaN stays NaN
  constexpr A inf = std::numeric_limits<A>::infinity();
  return w * ((w == A(0) && (v == inf || v == -inf)) ? A(0) : v);
}

template <typename A>
FASTMED_INLINE A vsign(A x) {
  return x > A(0) ? A(1) : (x < A(0) ? A(-1) : A(0));
}


// ---------------------------------------------------------------------------------------------- one block
// _counted of the reference on one lane.  m is 1 on every voxel of the tensor when nothing is masked (and 0 in the
// padding, whose values are dropped), so the masked forms serve both: 1 * x and weigh(1, x) are x (NaN and inf too).
// `finite`: x has no infinity (a probability, a target), a plain product does.
template <typename A>
FASTMED_INLINE A counted(A x, A m) { return vweigh(m, x); }

// The softmax numerators over the classes c0..C-1 of the rows v (class c's kLanes values at v + c * vs): their max in
// mx (NaN wins, as in torch's max), exp(v - mx) in the rows of p (class c at p + c * kLanes), their sum in sum and,
// when log_sum, its log in lse.  Shared by softmax_rows and the softmax Dice path (rows read from the tensor there).
template <typename A>
FASTMED_INLINE void softmax_numerators(const A* v, int64_t vs, int64_t c0, int64_t C, A* p, A* __restrict mx,
                                       A* __restrict sum, A* __restrict lse, bool log_sum) {
  constexpr A inf = std::numeric_limits<A>::infinity();
  FASTMED_LANES {
    mx[l] = -inf;
    sum[l] = 0;
  }
  for (int64_t c = c0; c < C; ++c) {
    const A* __restrict z = v + c * vs;
    FASTMED_LANES { mx[l] = (z[l] > mx[l] || z[l] != z[l]) ? z[l] : mx[l]; }  // torch's max: NaN wins
  }
  for (int64_t c = c0; c < C; ++c) {
    const A* __restrict z = v + c * vs;
    A* __restrict pr = p + c * kLanes;
    FASTMED_LANES {
      const A e = vexp(z[l] - mx[l]);
      pr[l] = e;
      sum[l] += e;
    }
  }
  if (log_sum) {
    FASTMED_LANES { lse[l] = vlog(sum[l]); }
  }
}

// The softmax over the classes c0..C-1 of the rows `v` (the logits k.z, or others of the block's layout): their max in
// mx, the exponentials exp(v - mx) in p (the softmax's numerators) and, when `log_sum` (the cross entropy needs it),
// lse; normalizes p when `normalize`.
template <typename A>
void softmax_rows(Block<A>& k, const A* v, int64_t c0, bool normalize, bool log_sum) {
  A* __restrict sum = k.sum;
  softmax_numerators(v, kLanes, c0, k.C, k.p, k.mx, sum, k.lse, log_sum);
  if (normalize) {
    FASTMED_LANES { sum[l] = A(1) / sum[l]; }
    for (int64_t c = c0; c < k.C; ++c) {
      A* __restrict p = k.row(k.p, c);
      FASTMED_LANES { p[l] *= sum[l]; }
    }
  }
}

template <typename A>
void activate_block(Block<A>& k, Act act, bool log_sum) {
  if (act == Act::kSoftmax) {
    softmax_rows(k, k.z, 0, true, log_sum);
    return;
  }
  for (int64_t c = 0; c < k.C; ++c) {
    const A* __restrict z = k.row(k.z, c);
    A* __restrict p = k.row(k.p, c);
    if (act == Act::kSigmoid) {
      FASTMED_LANES { p[l] = A(1) / (A(1) + vexp(-z[l])); }
    } else {
      FASTMED_LANES { p[l] = z[l]; }
    }
  }
}

// The log-softmax of the softmax focal term over the classes c0..C-1 of the counted logits zz = m z: zz in the rows of
// k.w, their max in mx and the log of the sum of their exponentials in lse (log q = zz - mx - lse; p is scratch).
template <typename A>
void focal_softmax_block(Block<A>& k, int64_t c0) {
  const A* __restrict m = k.m;
  for (int64_t c = c0; c < k.C; ++c) {
    const A* __restrict z = k.row(k.z, c);
    A* __restrict zz = k.row(k.w, c);
    FASTMED_LANES { zz[l] = counted(z[l], m[l]); }
  }
  softmax_rows(k, k.w, c0, false, true);
}

// reference.sigmoid_focal_terms at one class: bce, mod, s, sz (rows of kLanes); kHard: label targets.
template <bool kHard, typename A>
FASTMED_INLINE void sigmoid_focal_row(const A* __restrict z, const A* __restrict g, const A* __restrict m, A gamma,
                                      A* __restrict bce, A* __restrict mod, A* __restrict s, A* __restrict sz) {
  const bool powered = gamma != A(0);
  FASTMED_LANES {
    const A zz = counted(z[l], m[l]);
    const A sl = g[l] * A(2) - A(1);
    A szl, b;
    A sp;  // softplus(sz)
    if constexpr (kHard) {
      // s = +-1: softplus(-sz) and softplus(sz) share e = exp(-|sz|) (the reference's threshold form gives the
      // same values: above it the log term is below the last bit)
      szl = sl * zz;
      const A e = vexp(-vabs(szl));
      const A lg = vlog1p(e);
      sp = (szl > A(0) ? szl : A(0)) + lg;
      b = (szl < A(0) ? -szl : A(0)) + lg;
    } else {
      szl = vweigh(sl, zz);
      b = vweigh(A(1) - g[l], vsoftplus(zz)) + vweigh(g[l], vsoftplus(-zz));
      sp = vsoftplus(szl);
    }
    const A e = vexp(-gamma * sp);
    s[l] = sl;
    sz[l] = szl;
    bce[l] = b;
    mod[l] = powered ? e : A(1);
  }
}

// The sigmoid focal terms of class c (sigmoid_focal_row) into the block's scratch rows: bce, mod in k.q; s, sz in
// k.w.  Returns {bce, mod, s, sz}.
template <typename A>
struct FocalRows {
  const A* bce;
  const A* mod;
  const A* s;
  const A* sz;
};

template <typename A>
FASTMED_INLINE FocalRows<A> sigmoid_focal_class(Block<A>& k, int64_t c, bool hard, A gamma) {
  const A* __restrict z = k.row(k.z, c);
  const A* __restrict g = k.row(k.gm, c);
  A* bce = k.q;
  A* mod = k.q + kLanes;
  A* s = k.w;
  A* sz = k.w + kLanes;
  if (hard) {
    sigmoid_focal_row<true>(z, g, k.m, gamma, bce, mod, s, sz);
  } else {
    sigmoid_focal_row<false>(z, g, k.m, gamma, bce, mod, s, sz);
  }
  return {bce, mod, s, sz};
}

// Adds the block's terms to the lane sums acc ((NUM_SLOTS, C) rows of kLanes).
template <typename A>
void forward_block(Block<A>& k, const Spec& spec, A* acc) {
  const int64_t C = k.C;
  const A* __restrict m = k.m;
  const A* __restrict valid = k.valid;
  auto slot = [&](int64_t s, int64_t c) { return acc + (s * C + c) * kLanes; };
  const bool ce = spec.ce == Ce::kSoftmax || spec.ce == Ce::kSoftmaxSmooth;
  if (spec.pow != Pow::kOff) {
    activate_block(k, spec.act, ce);  // the cross entropy below takes mx and lse from here
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict p = k.row(k.p, c);
      const A* __restrict g = k.row(k.gm, c);
      A* __restrict si = slot(kIntersect, c);
      A* __restrict sp = slot(kPred, c);
      A* __restrict sg = slot(kGround, c);
      A* __restrict sd = slot(kDiff, c);
      if (spec.pow == Pow::kLinear) {
        FASTMED_LANES {
          const A pm = counted(p[l], m[l]);
          const bool v = valid[l] != A(0);
          const A in = vweigh(g[l], pm);
          si[l] += v ? in : A(0);
          sp[l] += v ? pm : A(0);
          sg[l] += g[l];  // 0 in the padding
        }
      } else if (spec.pow == Pow::kSquare) {
        FASTMED_LANES {
          const A pm = counted(p[l], m[l]);
          const bool v = valid[l] != A(0);
          const A in = vweigh(g[l], pm);
          si[l] += v ? in : A(0);
          sp[l] += v ? pm * pm : A(0);
          sg[l] += g[l] * g[l];
        }
      } else {
        FASTMED_LANES {
          const A pm = counted(p[l], m[l]);
          const bool v = valid[l] != A(0);
          const A in = vweigh(g[l], pm);
          const A ap = vabs(pm), ad = vabs(pm - g[l]);
          si[l] += v ? in : A(0);
          sp[l] += v ? ap : A(0);
          sg[l] += vabs(g[l]);
          sd[l] += v ? ad : A(0);
        }
      }
    }
  }
  if (ce) {
    if (!(spec.pow != Pow::kOff && spec.act == Act::kSoftmax)) softmax_rows(k, k.z, 0, false, true);  // else: mx, lse known
    const bool smooth = spec.ce == Ce::kSoftmaxSmooth;
    const bool label = k.label;
    const A* __restrict mx = k.mx;
    const A* __restrict lse = k.lse;
    const A* __restrict pick = k.pick;
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict z = k.row(k.z, c);
      const A* __restrict g = k.row(k.gm, c);
      A* __restrict sn = slot(kNll, c);
      A* __restrict sl = slot(kLogsum, c);
      const A cls = static_cast<A>(c);
      // labels: only the class of the voxel's label adds, weighed by whether it counts (as in the reference: a
      // NaN or -inf of another class's log q stays out)
      FASTMED_LANES {
        const A lq = z[l] - mx[l] - lse[l];
        const bool take = (valid[l] != A(0)) & (!label | (pick[l] == cls));
        const A w = vweigh(g[l], lq);
        sn[l] -= take ? w : A(0);
      }
      if (smooth) {
        FASTMED_LANES {
          const A lq = z[l] - mx[l] - lse[l];
          const A w = counted(lq, m[l]);
          sl[l] -= valid[l] != A(0) ? w : A(0);
        }
      }
    }
  }
  if (spec.ce == Ce::kBce) {  // BCE with logits: NLL m bce(z, g), LOGSUM g' softplus(-z) (the pos_weight part)
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict z = k.row(k.z, c);
      const A* __restrict g = k.row(k.gm, c);  // g' = g m: the same as g wherever m is not 0 (m is 0 or 1)
      A* __restrict sn = slot(kNll, c);
      A* __restrict sl = slot(kLogsum, c);
      FASTMED_LANES {
        const A up = vsoftplus(z[l]), down = vsoftplus(-z[l]);
        const A nll = counted(vweigh(A(1) - g[l], up) + vweigh(g[l], down), m[l]);
        const A pos = vweigh(g[l], down);
        const bool v = valid[l] != A(0);
        sn[l] += v ? nll : A(0);
        sl[l] += v ? pos : A(0);
      }
    }
  }
  if (spec.focal == FocalMode::kSigmoid) {
    const A gamma = A(spec.gamma);
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict g = k.row(k.gm, c);
      const FocalRows<A> rows = sigmoid_focal_class(k, c, spec.label_mode, gamma);
      A* __restrict sf = slot(kFocal, c);
      A* __restrict sfp = slot(kFocalPos, c);
      const A* __restrict bc = rows.bce;
      const A* __restrict md = rows.mod;
      const bool hard = spec.label_mode;
      FASTMED_LANES {
        const A loss = counted(hard ? md[l] * bc[l] : vweigh(md[l], bc[l]), m[l]);
        sf[l] += valid[l] != A(0) ? loss : A(0);
      }
      if (spec.focal_pos == FocalPos::kLinear) {
        FASTMED_LANES {
          const A loss = counted(hard ? md[l] * bc[l] : vweigh(md[l], bc[l]), m[l]);
          const A w = vweigh(g[l], loss);
          sfp[l] += valid[l] != A(0) ? w : A(0);
        }
      } else if (spec.focal_pos == FocalPos::kHard) {
        FASTMED_LANES {
          const A loss = counted(hard ? md[l] * bc[l] : vweigh(md[l], bc[l]), m[l]);
          const A w = vweigh(g[l] == A(1) ? A(1) : A(0), loss);
          sfp[l] += valid[l] != A(0) ? w : A(0);
        }
      }
    }
  } else if (spec.focal == FocalMode::kSoftmax) {  // -(m g (1 - q)^gamma) log q over the classes c0..
    focal_softmax_block(k, spec.focal_c0);
    const A gamma = A(spec.gamma);
    const A* __restrict mx = k.mx;
    const A* __restrict lse = k.lse;
    for (int64_t c = spec.focal_c0; c < C; ++c) {
      const A* __restrict zz = k.row(k.w, c);
      const A* __restrict g = k.row(k.gm, c);
      A* __restrict sf = slot(kFocal, c);
      FASTMED_LANES {
        const A lq = zz[l] - mx[l] - lse[l];
        const A b = A(1) - vexp(lq);
        const A w = g[l] * vpow(b < A(0) ? A(0) : b, gamma) * m[l];
        const A v = vweigh(w, lq);
        sf[l] -= valid[l] != A(0) ? v : A(0);
      }
    }
  }
}

// d logits of the block into k.dz; gs: (NUM_SLOTS, C) = d loss / d stats of the sample.  `have_p`: k.p already
// holds the softmax the forward stored (softmax activation with a region term, no BCE or focal term: the logits are
// not read).
template <typename A>
void backward_block(Block<A>& k, const Spec& spec, const A* gs, bool have_p) {
  const int64_t C = k.C;
  const A* __restrict m = k.m;
  A* __restrict sum = k.sum;
  auto coef = [&](int64_t s, int64_t c) { return gs[s * C + c]; };
  for (int64_t c = 0; c < C; ++c) {
    A* __restrict d = k.row(k.dz, c);
    FASTMED_LANES { d[l] = A(0); }
  }
  if (spec.pow != Pow::kOff) {
    if (!have_p) activate_block(k, spec.act, false);
    FASTMED_LANES { sum[l] = A(0); }  // sum_c p u
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict p = k.row(k.p, c);
      const A* __restrict g = k.row(k.gm, c);
      A* __restrict u = k.row(k.w, c);
      const A ci = coef(kIntersect, c), cp = coef(kPred, c), cd = coef(kDiff, c);
      if (spec.pow == Pow::kLinear) {
        FASTMED_LANES {
          const A v = (ci * g[l] + cp) * m[l];
          u[l] = v;
          sum[l] += p[l] * v;
        }
      } else if (spec.pow == Pow::kSquare) {
        FASTMED_LANES {
          const A pm = counted(p[l], m[l]);
          const A v = (ci * g[l] + cp * A(2) * pm) * m[l];
          u[l] = v;
          sum[l] += p[l] * v;
        }
      } else {
        FASTMED_LANES {
          const A pm = counted(p[l], m[l]);
          const A v = (ci * g[l] + cp * vsign(pm) + cd * vsign(pm - g[l])) * m[l];
          u[l] = v;
          sum[l] += p[l] * v;
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict p = k.row(k.p, c);
      const A* __restrict u = k.row(k.w, c);
      A* __restrict d = k.row(k.dz, c);
      if (spec.act == Act::kSoftmax) {
        FASTMED_LANES { d[l] += p[l] * (u[l] - sum[l]); }
      } else if (spec.act == Act::kSigmoid) {
        FASTMED_LANES { d[l] += u[l] * p[l] * (A(1) - p[l]); }
      } else {
        FASTMED_LANES { d[l] += u[l]; }
      }
    }
  }
  if (spec.ce == Ce::kSoftmax || spec.ce == Ce::kSoftmaxSmooth) {
    if (!(spec.pow != Pow::kOff && spec.act == Act::kSoftmax)) softmax_rows(k, k.z, 0, true, false);  // else: p is it
    const A smooth = spec.ce == Ce::kSoftmaxSmooth ? A(1) : A(0);
    FASTMED_LANES { sum[l] = A(0); }  // sum_c w
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict g = k.row(k.gm, c);
      A* __restrict w = k.row(k.w, c);
      const A cn = coef(kNll, c), cl = coef(kLogsum, c) * smooth;
      FASTMED_LANES {
        const A v = cn * g[l] + cl * m[l];
        w[l] = v;
        sum[l] += v;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict p = k.row(k.p, c);
      const A* __restrict w = k.row(k.w, c);
      A* __restrict d = k.row(k.dz, c);
      FASTMED_LANES { d[l] += p[l] * sum[l] - w[l]; }
    }
  }
  if (spec.ce == Ce::kBce) {
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict z = k.row(k.z, c);
      const A* __restrict g = k.row(k.gm, c);
      A* __restrict d = k.row(k.dz, c);
      const A cn = coef(kNll, c), cl = coef(kLogsum, c);
      FASTMED_LANES {
        const A sneg = A(1) / (A(1) + vexp(z[l]));  // sigmoid(-z)
        d[l] += (cn * ((A(1) - g[l]) - sneg) - cl * g[l] * sneg) * m[l];
      }
    }
  }
  if (spec.focal == FocalMode::kSigmoid) {
    const A gamma = A(spec.gamma);
    for (int64_t c = 0; c < C; ++c) {
      const A* __restrict g = k.row(k.gm, c);
      const A* __restrict z = k.row(k.z, c);
      const FocalRows<A> rows = sigmoid_focal_class(k, c, spec.label_mode, gamma);
      A* __restrict d = k.row(k.dz, c);
      const A* __restrict bc = rows.bce;
      const A* __restrict md = rows.mod;
      const A* __restrict sv = rows.s;
      const A* __restrict szv = rows.sz;
      const A cf = coef(kFocal, c), cfp = coef(kFocalPos, c);
      const A lin = spec.focal_pos == FocalPos::kLinear ? A(1) : A(0);
      const A hard = spec.focal_pos == FocalPos::kHard ? A(1) : A(0);
      if (spec.label_mode) {  // s = +-1, zz = s sz: both sigmoids from e = exp(-|sz|)
        FASTMED_LANES {
          const A e = vexp(-vabs(szv[l]));
          const A r = A(1) / (A(1) + e);
          const bool up = szv[l] >= A(0);
          const A sig_sz = up ? r : e * r;
          const A sig_msz = up ? e * r : r;  // sigmoid(-sz)
          const A sig_zz = sv[l] > A(0) ? sig_sz : sig_msz;
          const A dl = (sig_zz - g[l]) * md[l] - vweigh(gamma * md[l] * sig_sz * sv[l], bc[l]);
          const A cc = cf + cfp * (lin * g[l] + hard * (g[l] == A(1) ? A(1) : A(0)));
          d[l] += cc * dl * m[l] * m[l];
        }
      } else {
        FASTMED_LANES {
          const A zz = counted(z[l], m[l]);
          const A sig_zz = A(1) / (A(1) + vexp(-zz));
          const A sig_sz = A(1) / (A(1) + vexp(-szv[l]));
          const A dl = (sig_zz - g[l]) * md[l] - vweigh(gamma * md[l] * sig_sz * sv[l], bc[l]);
          const A cc = cf + cfp * (lin * g[l] + hard * (g[l] == A(1) ? A(1) : A(0)));
          d[l] += cc * dl * m[l] * m[l];
        }
      }
    }
  } else if (spec.focal == FocalMode::kSoftmax) {  // reference.loss_stats_backward's softmax focal closed form
    focal_softmax_block(k, spec.focal_c0);
    const A gamma = A(spec.gamma);
    const bool powered = spec.gamma != 0;
    const A* __restrict mx = k.mx;
    const A* __restrict lse = k.lse;
    A vsum[kLanes], lqs[kLanes], bs[kLanes], pg[kLanes], dp[kLanes];
    FASTMED_LANES { vsum[l] = A(0); }
    for (int64_t c = spec.focal_c0; c < C; ++c) {
      A* __restrict zz = k.row(k.w, c);  // zz in, the voxel term v out
      A* __restrict q = k.row(k.q, c);
      const A* __restrict g = k.row(k.gm, c);
      const A cf = coef(kFocal, c);
      FASTMED_LANES {
        const A lq = zz[l] - mx[l] - lse[l];
        const A qv = vexp(lq);
        const A b = A(1) - qv;
        q[l] = qv;
        lqs[l] = lq;
        bs[l] = b < A(0) ? A(0) : b;
      }
      // (1 - q)^gamma and its derivative gamma (1 - q)^(gamma - 1), torch's 0^0 = 1 (one loop per case: a branch in
      // the loop would keep it from vectorizing)
      if (!powered) {
        FASTMED_LANES {
          pg[l] = A(1);
          dp[l] = A(0);
        }
      } else if (spec.gamma == 1) {
        FASTMED_LANES {
          pg[l] = bs[l];
          dp[l] = A(1);
        }
      } else {
        FASTMED_LANES {
          const A lb = vlog(bs[l]);
          pg[l] = vexp(gamma * lb);
          dp[l] = gamma * vexp((gamma - A(1)) * lb);
        }
      }
      FASTMED_LANES {
        const A v = cf * (-g[l] * (pg[l] - vweigh(vweigh(q[l], lqs[l]), dp[l]))) * m[l];
        zz[l] = v;
        vsum[l] += v;
      }
    }
    for (int64_t c = spec.focal_c0; c < C; ++c) {
      const A* __restrict v = k.row(k.w, c);
      const A* __restrict q = k.row(k.q, c);
      A* __restrict d = k.row(k.dz, c);
      FASTMED_LANES { d[l] += (v[l] - q[l] * vsum[l]) * m[l]; }
    }
  }
}

// Loads the (B, C, S) rows of the n <= kLanes voxels [s0, s0 + n) of sample b (pointer p, strides ps) into the
// block rows dst (zeros past n).
template <typename Z, typename A>
FASTMED_INLINE void load_rows(const Z* p, const int64_t* ps, int64_t C, int64_t b, int64_t s0, int64_t n, A* dst) {
  for (int64_t c = 0; c < C; ++c) {
    A* __restrict z = dst + c * kLanes;
    const Z* __restrict src = p + b * ps[0] + c * ps[1] + s0 * ps[2];
    if (ps[2] == 1 && n == kLanes) {  // one row of each class: C streams, prefetched kPrefetch blocks ahead
      __builtin_prefetch(src + kPrefetch * kLanes);
      FASTMED_LANES { z[l] = static_cast<A>(src[l]); }
    } else {
      for (int64_t l = 0; l < kLanes; ++l) z[l] = l < n ? static_cast<A>(src[l * ps[2]]) : A(0);
    }
  }
}

// Loads the n <= kLanes voxels [s0, s0 + n) of sample b into k (zeros past n), adds their counted weight to cnt
// and their bad labels to bad.  The label check is the one of load_voxel.  `logits`: false leaves k.z unread (a
// backward from the stored softmax).
template <typename Z, typename T, typename A>
void load_block(const Operands<Z, T, A>& o, const Spec& spec, int64_t b, int64_t s0, int64_t n, Block<A>& k,
                double& cnt, double& bad, bool logits) {
  const int64_t C = o.C;
  if (logits) load_rows(o.zp, o.zs, C, b, s0, n, k.z);
  for (int64_t l = 0; l < kLanes; ++l) k.valid[l] = l < n ? A(1) : A(0);
  if (spec.label_mode) {
    A lab[kLanes];  // the class of a voxel that counts and holds one, else -1
    k.masked = spec.has_ignore;
    k.label = true;
    if constexpr (std::is_same<T, int64_t>::value) {
      if (n == kLanes && o.ts[1] == 1) {  // a full block of contiguous int64 labels: vectors, no branch
        const int64_t* __restrict src = o.tp + b * o.ts[0] + s0;
        __builtin_prefetch(src + kPrefetch * kLanes);
        const bool ignore = spec.has_ignore;
        const int64_t ig = spec.ignore_index;
        const uint64_t classes = static_cast<uint64_t>(C);
        A* __restrict m = k.m;
        A* __restrict pick = k.pick;
        A* __restrict lb = lab;
        A nb[kLanes];
        FASTMED_LANES {
          const int64_t li = src[l];
          const bool inrange = static_cast<uint64_t>(li) < classes;
          const bool counts = !(ignore & (li == ig));
          const A cls = static_cast<A>(static_cast<int32_t>(inrange ? li : 0));  // exact: 0 <= cls < C
          m[l] = counts ? A(1) : A(0);
          lb[l] = (counts & inrange) ? cls : A(-1);
          pick[l] = cls;
          nb[l] = (counts & !inrange) ? A(1) : A(0);
        }
        A nc = 0, nbad = 0;  // whole numbers up to kLanes: exact in any order
#pragma omp simd reduction(+ : nc, nbad)
        for (int64_t l = 0; l < kLanes; ++l) {
          nc += m[l];
          nbad += nb[l];
        }
        cnt += static_cast<double>(nc);
        bad += static_cast<double>(nbad);
        for (int64_t c = 0; c < C; ++c) {
          A* g = k.row(k.gm, c);
          const A cls = static_cast<A>(c);
          FASTMED_LANES { g[l] = lab[l] == cls ? A(1) : A(0); }
        }
        return;
      }
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      if (l >= n) {
        lab[l] = A(-1);
        k.pick[l] = A(-1);
        k.m[l] = A(0);
        continue;
      }
      const T raw = o.tp[b * o.ts[0] + (s0 + l) * o.ts[1]];
      bool integral = true;
      int64_t li;
      if constexpr (std::is_floating_point<T>::value) {
        const double r = static_cast<double>(raw);  // exact for float32 and float64 labels
        integral = r == __builtin_floor(r) && __builtin_fabs(r) < 2147483648.0;
        li = integral ? static_cast<int64_t>(r) : 0;
      } else {
        li = static_cast<int64_t>(raw);
      }
      const bool inrange = integral && li >= 0 && li < C;
      const bool counts = !(spec.has_ignore && integral && li == spec.ignore_index);
      k.m[l] = counts ? A(1) : A(0);
      lab[l] = (counts && inrange) ? static_cast<A>(li) : A(-1);
      k.pick[l] = inrange ? static_cast<A>(li) : A(0);
      cnt += counts ? 1.0 : 0.0;
      bad += (counts && !inrange) ? 1.0 : 0.0;
    }
    for (int64_t c = 0; c < C; ++c) {
      A* g = k.row(k.gm, c);
      const A cls = static_cast<A>(c);
      for (int64_t l = 0; l < kLanes; ++l) g[l] = lab[l] == cls ? A(1) : A(0);
    }
  } else {
    k.masked = o.mp != nullptr;
    k.label = false;
    for (int64_t l = 0; l < kLanes; ++l) {
      k.m[l] = l < n ? (o.mp ? o.mp[b * o.ms[0] + (s0 + l) * o.ms[1]] : A(1)) : A(0);
      cnt += static_cast<double>(k.m[l]);
    }
    for (int64_t c = 0; c < C; ++c) {
      A* g = k.row(k.gm, c);
      const T* src = o.tp + b * o.ts[0] + (o.Ct == 1 ? 0 : c) * o.ts[1] + s0 * o.ts[2];
      for (int64_t l = 0; l < kLanes; ++l) {
        const A v = l < n ? static_cast<A>(src[l * o.ts[2]]) : A(0);
        g[l] = k.masked ? v * k.m[l] : v;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------- the softmax Dice path
// The most common specs (Dice, Tversky or generalized Dice after a softmax, alone or with the softmax cross entropy,
// label smoothing included: DiceCE, nnU-Net's DC+CE; on int64 labels: spec.act softmax, pow linear, ce off / softmax
// / softmax_smooth, no focal term) on a full block of contiguous float32 rows: the same arithmetic as load_block +
// forward_block / backward_block in the same order (so the same values), without their one-hot rows, finiteness
// checks of a softmax and padding selects (a softmax is finite or NaN; a full block has no padding).  ce: 0 none,
// 1 the cross entropy, 2 with label smoothing.

// The labels of a full block: lab[l] the class (as a float) of a voxel that counts and holds one, else -1; pick[l]
// the class whose NLL the voxel enters (its label, 0 when out of range); m[l] 1 where the voxel counts (not
// ignore_index); adds the voxels that count to nc and those with a bad label to nbad.
FASTMED_INLINE void softmax_dice_labels(const int64_t* __restrict src, int64_t C, bool ignore, int64_t ig,
                                        float* __restrict lab, float* __restrict pick, float* __restrict m,
                                        float& nc, float& nbad) {
  const uint64_t classes = static_cast<uint64_t>(C);
  float c_sum = 0, b_sum = 0;
#pragma omp simd reduction(+ : c_sum, b_sum)
  for (int64_t l = 0; l < kLanes; ++l) {
    const int64_t li = src[l];
    const bool inrange = static_cast<uint64_t>(li) < classes;
    const bool counts = !(ignore & (li == ig));
    const float cls = static_cast<float>(static_cast<int32_t>(inrange ? li : 0));
    m[l] = counts ? 1.0f : 0.0f;
    lab[l] = (counts & inrange) ? cls : -1.0f;
    pick[l] = cls;
    c_sum += counts ? 1.0f : 0.0f;
    b_sum += (counts & !inrange) ? 1.0f : 0.0f;
  }
  nc += c_sum;
  nbad += b_sum;
}

// The statistics of one full block into acc ((NUM_SLOTS, C) rows of kLanes, as forward_block); z: the block's first
// logit of class 0, class rows zs1 apart; the softmax is written to probs (class rows ps1 apart) when not null.
// e: C rows of scratch.
FASTMED_INLINE void softmax_dice_forward(const float* z, int64_t zs1, const int64_t* labels, int64_t C, bool ignore,
                                         int64_t ig, int ce, float* acc, float* probs, int64_t ps1, float* e,
                                         float& nc, float& nbad) {
  float lab[kLanes], pick[kLanes], m[kLanes], mx[kLanes], sum[kLanes], lse[kLanes];
  softmax_dice_labels(labels, C, ignore, ig, lab, pick, m, nc, nbad);
  constexpr float inf = std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < C; ++c) __builtin_prefetch(z + c * zs1 + kPrefetch * kLanes);  // C streams
  softmax_numerators(z, zs1, 0, C, e, mx, sum, lse, ce != 0);
  FASTMED_LANES { sum[l] = 1.0f / sum[l]; }
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict er = e + c * kLanes;
    float* __restrict si = acc + (kIntersect * C + c) * kLanes;
    float* __restrict sp = acc + (kPred * C + c) * kLanes;
    float* __restrict sg = acc + (kGround * C + c) * kLanes;
    const float cls = static_cast<float>(c);
    if (probs) {
      float* __restrict pr = probs + c * ps1;
      FASTMED_LANES { pr[l] = er[l] * sum[l]; }
    }
    FASTMED_LANES {
      const float p = er[l] * sum[l];
      const float g = lab[l] == cls ? 1.0f : 0.0f;
      const float pm = m[l] * p;
      si[l] += g * pm;
      sp[l] += pm;
      sg[l] += g;
    }
  }
  if (!ce) return;
  for (int64_t c = 0; c < C; ++c) {  // forward_block's cross entropy on labels: -log q of the voxel's class
    const float* __restrict zr = z + c * zs1;
    float* __restrict sn = acc + (kNll * C + c) * kLanes;
    float* __restrict sl = acc + (kLogsum * C + c) * kLanes;
    const float cls = static_cast<float>(c);
    FASTMED_LANES {
      const float lq = zr[l] - mx[l] - lse[l];
      const float g = lab[l] == cls ? 1.0f : 0.0f;
      const float w = g * ((g == 0.0f && (lq == inf || lq == -inf)) ? 0.0f : lq);  // weigh(g, lq)
      sn[l] -= pick[l] == cls ? w : 0.0f;
    }
    if (ce == 2) {
      FASTMED_LANES {
        const float lq = zr[l] - mx[l] - lse[l];
        sl[l] -= m[l] * ((m[l] == 0.0f && (lq == inf || lq == -inf)) ? 0.0f : lq);  // weigh(m, lq)
      }
    }
  }
}

// d logits of one full block from the stored softmax, in place: p (class rows ps1 apart) is read and overwritten;
// gs: (NUM_SLOTS, C) = d loss / d stats of the sample; u: 2 C rows of scratch.
FASTMED_INLINE void softmax_dice_backward(float* p, int64_t ps1, const int64_t* labels, int64_t C, bool ignore,
                                          int64_t ig, int ce, const float* gs, float* u) {
  float lab[kLanes], pick[kLanes], m[kLanes], sum[kLanes], wsum[kLanes];
  float nc = 0, nbad = 0;  // not needed here
  softmax_dice_labels(labels, C, ignore, ig, lab, pick, m, nc, nbad);
  float* w = u + C * kLanes;
  const float smooth = ce == 2 ? 1.0f : 0.0f;
  FASTMED_LANES {
    sum[l] = 0;
    wsum[l] = 0;
  }
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict pr = p + c * ps1;
    float* __restrict ur = u + c * kLanes;
    const float ci = gs[kIntersect * C + c], cp = gs[kPred * C + c];
    const float cls = static_cast<float>(c);
    FASTMED_LANES {
      const float g = lab[l] == cls ? 1.0f : 0.0f;
      const float v = (ci * g + cp) * m[l];
      ur[l] = v;
      sum[l] += pr[l] * v;
    }
  }
  if (!ce) {
    for (int64_t c = 0; c < C; ++c) {
      float* __restrict pr = p + c * ps1;
      const float* __restrict ur = u + c * kLanes;
      FASTMED_LANES { pr[l] = pr[l] * (ur[l] - sum[l]); }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {  // backward_block's cross entropy: w = cn g + cl m, d += p sum_c w - w
    float* __restrict wr = w + c * kLanes;
    const float cn = gs[kNll * C + c], cl = gs[kLogsum * C + c] * smooth;
    const float cls = static_cast<float>(c);
    FASTMED_LANES {
      const float g = lab[l] == cls ? 1.0f : 0.0f;
      const float v = cn * g + cl * m[l];
      wr[l] = v;
      wsum[l] += v;
    }
  }
  // backward_block's two steps, each through memory as there (d = p (u - sum), then d += p sum_c w - w): the same
  // roundings whatever the compiler contracts into fused multiply-adds
  for (int64_t c = 0; c < C; ++c) {
    const float* __restrict pr = p + c * ps1;
    float* __restrict ur = u + c * kLanes;
    FASTMED_LANES { ur[l] = pr[l] * (ur[l] - sum[l]); }
  }
  for (int64_t c = 0; c < C; ++c) {
    float* __restrict pr = p + c * ps1;
    const float* __restrict ur = u + c * kLanes;
    const float* __restrict wr = w + c * kLanes;
    FASTMED_LANES { pr[l] = ur[l] + (pr[l] * wsum[l] - wr[l]); }
  }
}

#undef FASTMED_LANES
#undef FASTMED_INLINE
