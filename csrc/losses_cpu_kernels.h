// The vectorized inner loops of csrc/losses_cpu.cpp: the statistics and d logits of one block of kLanes voxels.
//
// Included twice by losses_cpu.cpp, like norm_act_cpu_kernels.h: inside `namespace generic` (the build's default
// target) and inside `namespace avx2` (compiled for AVX2 + FMA, chosen at run time when the CPU has them), both
// under `#pragma GCC optimize("no-trapping-math")` so that the selects vectorize.  It includes nothing and uses
// Spec, Block, the mode enums, the slot constants, kLanes and kSoftplusThreshold from the enclosing namespace.
//
// A block holds the operands of kLanes voxels of one sample as (class, lane) arrays: every loop below runs over the
// lanes (the voxels) with the class fixed, so the compiler turns it into vector instructions; the activation is
// computed across the classes per lane.  exp / log / log1p of float32 are the branch-free polynomials below (the
// C library's are calls, which do not vectorize); float64 uses the C library's (scalar; accuracy first).
// Lanes past the end of the voxels (the tail block) hold zeros and are dropped by `valid` before any sum.

// ---------------------------------------------------------------------------------------------- float32 math
inline float exp_f32(float x) {  // Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp
  const float xc = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);  // NaN passes through (selected below)
  const float t = xc * 1.44269504088896341f + 12582912.0f;            // round(x / ln 2) in the low bits of t
  const float n = t - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t ni = __builtin_bit_cast(int32_t, t) - 0x4B400000;  // n as an integer, in [-150, 129]
  const int32_t n1 = ni >> 1, n2 = ni - n1;                          // 2^n = 2^n1 * 2^n2, both normal floats
  const float s1 = __builtin_bit_cast(float, (n1 + 127) << 23);
  const float s2 = __builtin_bit_cast(float, (n2 + 127) << 23);
  const float y = p * s1 * s2;
  return x != x ? x : y;
}

inline float log_f32(float x) {  // x >= FLT_MIN or inf / NaN / 0 / negative: 2 atanh(f / (2 + f)); ~1 ulp
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

inline float log1p_f32(float x) {  // x >= 0: log(1 + x) / ((1 + x) - 1) * x keeps the low bits of small x
  const float u = 1.0f + x;
  const float d = u - 1.0f;
  const float y = log_f32(u) * (x / (d == 0.0f ? 1.0f : d));
  return d == 0.0f ? x : (u == __builtin_inff() ? u : y);
}

inline float vexp(float x) { return exp_f32(x); }
inline float vlog(float x) { return log_f32(x); }
inline float vlog1p(float x) { return log1p_f32(x); }
inline double vexp(double x) { return std::exp(x); }
inline double vlog(double x) { return std::log(x); }
inline double vlog1p(double x) { return std::log1p(x); }

template <typename A>
inline A vsoftplus(A z) {  // the reference's softplus (z above the threshold: z)
  return z > A(kSoftplusThreshold) ? z : vlog1p(vexp(z > A(kSoftplusThreshold) ? A(kSoftplusThreshold) : z));  // NaN stays
}

template <typename A>
inline A vweigh(A w, A v) {  // w * v, a zero weight times an infinite v is 0; NaN stays NaN
  const A inf = std::numeric_limits<A>::infinity();
  return w * ((w == A(0) && (v == inf || v == -inf)) ? A(0) : v);
}

template <typename A>
inline A vsign(A x) {
  return x > A(0) ? A(1) : (x < A(0) ? A(-1) : A(0));
}

#define FASTMED_LANES _Pragma("omp simd") for (int64_t l = 0; l < kLanes; ++l)

// ---------------------------------------------------------------------------------------------- one block
template <typename A>
inline A counted(A x, A m, bool masked, bool finite) {  // _counted of the reference
  return !masked ? x : (finite ? x * m : vweigh(m, x));
}

// mx, lse and the exponentials exp(z - mx) in p (the softmax's numerators); normalizes p when `normalize`.
template <typename A>
void softmax_block(Block<A>& k, bool normalize) {
  const A inf = std::numeric_limits<A>::infinity();
  FASTMED_LANES { k.mx[l] = -inf; k.sum[l] = 0; }
  for (int64_t c = 0; c < k.C; ++c) {
    const A* z = k.row(k.z, c);
    FASTMED_LANES { k.mx[l] = (z[l] > k.mx[l] || z[l] != z[l]) ? z[l] : k.mx[l]; }  // torch's max: NaN wins
  }
  for (int64_t c = 0; c < k.C; ++c) {
    const A* z = k.row(k.z, c);
    A* p = k.row(k.p, c);
    FASTMED_LANES {
      p[l] = vexp(z[l] - k.mx[l]);
      k.sum[l] += p[l];
    }
  }
  FASTMED_LANES { k.lse[l] = vlog(k.sum[l]); }
  if (normalize) {
    FASTMED_LANES { k.sum[l] = A(1) / k.sum[l]; }
    for (int64_t c = 0; c < k.C; ++c) {
      A* p = k.row(k.p, c);
      FASTMED_LANES { p[l] *= k.sum[l]; }
    }
  }
}

template <typename A>
void activate_block(Block<A>& k, Act act) {
  if (act == Act::kSoftmax) {
    softmax_block(k, true);
  } else {
    for (int64_t c = 0; c < k.C; ++c) {
      const A* z = k.row(k.z, c);
      A* p = k.row(k.p, c);
      if (act == Act::kSigmoid) {
        FASTMED_LANES { p[l] = A(1) / (A(1) + vexp(-z[l])); }
      } else {
        FASTMED_LANES { p[l] = z[l]; }
      }
    }
  }
}

// The focal terms of reference.sigmoid_focal_terms at one class: bce, mod, s, sz (rows of kLanes), and the focal
// loss of the class (times the mask) in `loss`.
template <typename A>
inline void sigmoid_focal_row(const A* z, const A* g, const A* m, bool masked, bool hard, A gamma, A* bce, A* mod,
                              A* s, A* sz) {
  FASTMED_LANES {
    const A zz = counted(z[l], m[l], masked, false);
    s[l] = g[l] * A(2) - A(1);
    if (hard) {
      sz[l] = s[l] * zz;
      bce[l] = vsoftplus(-sz[l]);
    } else {
      sz[l] = vweigh(s[l], zz);
      bce[l] = vweigh(A(1) - g[l], vsoftplus(zz)) + vweigh(g[l], vsoftplus(-zz));
    }
    mod[l] = gamma != A(0) ? vexp(-gamma * vsoftplus(sz[l])) : A(1);
  }
}

// Adds the block's terms to the lane sums acc ((NUM_SLOTS, C) rows of kLanes).
template <typename A>
void forward_block(Block<A>& k, const Spec& spec, A* acc) {
  const int64_t C = k.C;
  const bool masked = k.masked;
  const A* m = k.m;
  const A* valid = k.valid;
  auto slot = [&](int64_t s, int64_t c) { return acc + (s * C + c) * kLanes; };
  const bool softmax_ce = spec.ce == Ce::kSoftmax || spec.ce == Ce::kSoftmaxSmooth;
  if (spec.pow != Pow::kOff) {
    const bool bounded = spec.act != Act::kNone;
    activate_block(k, spec.act);
    for (int64_t c = 0; c < C; ++c) {
      const A* p = k.row(k.p, c);
      const A* g = k.row(k.gm, c);
      A* si = slot(kIntersect, c);
      A* sp = slot(kPred, c);
      A* sg = slot(kGround, c);
      A* sd = slot(kDiff, c);
      if (spec.pow == Pow::kLinear) {
        FASTMED_LANES {
          const A pm = counted(p[l], m[l], masked, bounded);
          const bool v = valid[l] != A(0);
          si[l] += v ? (bounded ? pm * g[l] : vweigh(g[l], pm)) : A(0);
          sp[l] += v ? pm : A(0);
          sg[l] += g[l];  // 0 in the padding
        }
      } else if (spec.pow == Pow::kSquare) {
        FASTMED_LANES {
          const A pm = counted(p[l], m[l], masked, bounded);
          const bool v = valid[l] != A(0);
          si[l] += v ? (bounded ? pm * g[l] : vweigh(g[l], pm)) : A(0);
          sp[l] += v ? pm * pm : A(0);
          sg[l] += g[l] * g[l];
        }
      } else {
        FASTMED_LANES {
          const A pm = counted(p[l], m[l], masked, bounded);
          const bool v = valid[l] != A(0);
          si[l] += v ? (bounded ? pm * g[l] : vweigh(g[l], pm)) : A(0);
          sp[l] += v ? std::fabs(pm) : A(0);
          sg[l] += std::fabs(g[l]);
          sd[l] += v ? std::fabs(pm - g[l]) : A(0);
        }
      }
    }
  }
  if (softmax_ce) {
    if (!(spec.pow != Pow::kOff && spec.act == Act::kSoftmax)) softmax_block(k, false);  // else: mx, lse known
    const bool smooth = spec.ce == Ce::kSoftmaxSmooth;
    for (int64_t c = 0; c < C; ++c) {
      const A* z = k.row(k.z, c);
      const A* g = k.row(k.gm, c);
      A* sn = slot(kNll, c);
      A* sl = slot(kLogsum, c);
      const bool label = k.label;
      const A cls = static_cast<A>(c);
      FASTMED_LANES {
        const A lq = z[l] - k.mx[l] - k.lse[l];
        const bool v = valid[l] != A(0);
        // labels: only the class of the voxel's label adds, weighed by whether it counts (as in the reference:
        // a NaN or -inf of another class's log q stays out)
        const A nll = label ? (k.pick[l] == cls ? vweigh(g[l], lq) : A(0)) : vweigh(g[l], lq);
        sn[l] -= v ? nll : A(0);
        if (smooth) sl[l] -= v ? counted(lq, m[l], masked, false) : A(0);
      }
    }
  }
  if (spec.focal == FocalMode::kSigmoid) {
    const bool hard = spec.label_mode;
    const A gamma = A(spec.gamma);
    A* bce = k.q;
    A* mod = k.q + kLanes;
    A* s = k.w;
    A* sz = k.w + kLanes;
    for (int64_t c = 0; c < C; ++c) {
      const A* z = k.row(k.z, c);
      const A* g = k.row(k.gm, c);
      sigmoid_focal_row(z, g, m, masked, hard, gamma, bce, mod, s, sz);
      A* sf = slot(kFocal, c);
      A* sfp = slot(kFocalPos, c);
      const FocalPos pos = spec.focal_pos;
      FASTMED_LANES {
        const A loss = counted(hard ? mod[l] * bce[l] : vweigh(mod[l], bce[l]), m[l], masked, false);
        const bool v = valid[l] != A(0);
        sf[l] += v ? loss : A(0);
        if (pos == FocalPos::kLinear) {
          sfp[l] += v ? vweigh(g[l], loss) : A(0);
        } else if (pos == FocalPos::kHard) {
          sfp[l] += v ? vweigh(g[l] == A(1) ? A(1) : A(0), loss) : A(0);
        }
      }
    }
  }
}

// d logits of the block into k.dz; gs: (NUM_SLOTS, C) = d loss / d stats of the sample.
template <typename A>
void backward_block(Block<A>& k, const Spec& spec, const A* gs) {
  const int64_t C = k.C;
  const bool masked = k.masked;
  const A* m = k.m;
  auto coef = [&](int64_t s, int64_t c) { return gs[s * C + c]; };
  for (int64_t c = 0; c < C; ++c) {
    A* d = k.row(k.dz, c);
    FASTMED_LANES { d[l] = A(0); }
  }
  const bool softmax_ce = spec.ce == Ce::kSoftmax || spec.ce == Ce::kSoftmaxSmooth;
  if (spec.pow != Pow::kOff) {
    activate_block(k, spec.act);
    const bool bounded = spec.act != Act::kNone;
    FASTMED_LANES { k.sum[l] = A(0); }  // sum_c p u
    for (int64_t c = 0; c < C; ++c) {
      const A* p = k.row(k.p, c);
      const A* g = k.row(k.gm, c);
      A* u = k.row(k.w, c);
      const A ci = coef(kIntersect, c), cp = coef(kPred, c), cd = coef(kDiff, c);
      const Pow pw = spec.pow;
      FASTMED_LANES {
        const A pm = counted(p[l], m[l], masked, bounded);
        A v = ci * g[l];
        if (pw == Pow::kLinear) {
          v += cp;
        } else if (pw == Pow::kSquare) {
          v += cp * A(2) * pm;
        } else {
          v += cp * vsign(pm) + cd * vsign(pm - g[l]);
        }
        u[l] = masked ? v * m[l] : v;
        k.sum[l] += p[l] * u[l];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const A* p = k.row(k.p, c);
      const A* u = k.row(k.w, c);
      A* d = k.row(k.dz, c);
      if (spec.act == Act::kSoftmax) {
        FASTMED_LANES { d[l] += p[l] * (u[l] - k.sum[l]); }
      } else if (spec.act == Act::kSigmoid) {
        FASTMED_LANES { d[l] += u[l] * p[l] * (A(1) - p[l]); }
      } else {
        FASTMED_LANES { d[l] += u[l]; }
      }
    }
  }
  if (softmax_ce) {
    if (!(spec.pow != Pow::kOff && spec.act == Act::kSoftmax)) softmax_block(k, true);  // else: p is the softmax
    const bool smooth = spec.ce == Ce::kSoftmaxSmooth;
    FASTMED_LANES { k.sum[l] = A(0); }  // sum_c w
    for (int64_t c = 0; c < C; ++c) {
      const A* g = k.row(k.gm, c);
      A* w = k.row(k.w, c);
      const A cn = coef(kNll, c), cl = coef(kLogsum, c);
      FASTMED_LANES {
        A v = cn * g[l];
        if (smooth) v += masked ? cl * m[l] : cl;
        w[l] = v;
        k.sum[l] += v;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const A* p = k.row(k.p, c);
      const A* w = k.row(k.w, c);
      A* d = k.row(k.dz, c);
      FASTMED_LANES { d[l] += p[l] * k.sum[l] - w[l]; }
    }
  }
  if (spec.focal == FocalMode::kSigmoid) {
    const bool hard = spec.label_mode;
    const A gamma = A(spec.gamma);
    A* bce = k.q;
    A* mod = k.q + kLanes;
    A* s = k.w;
    A* sz = k.w + kLanes;
    for (int64_t c = 0; c < C; ++c) {
      const A* z = k.row(k.z, c);
      const A* g = k.row(k.gm, c);
      sigmoid_focal_row(z, g, m, masked, hard, gamma, bce, mod, s, sz);
      A* d = k.row(k.dz, c);
      const A cf = coef(kFocal, c), cfp = coef(kFocalPos, c);
      const FocalPos pos = spec.focal_pos;
      FASTMED_LANES {
        const A zz = counted(z[l], m[l], masked, false);
        const A sig_zz = A(1) / (A(1) + vexp(-zz));
        const A sig_sz = A(1) / (A(1) + vexp(-sz[l]));
        const A dl = (sig_zz - g[l]) * mod[l] - vweigh(gamma * mod[l] * sig_sz * s[l], bce[l]);
        A cc = cf;
        if (pos == FocalPos::kLinear) {
          cc += cfp * g[l];
        } else if (pos == FocalPos::kHard) {
          cc += cfp * (g[l] == A(1) ? A(1) : A(0));
        }
        d[l] += masked ? cc * dl * m[l] * m[l] : cc * dl;
      }
    }
  }
}

#undef FASTMED_LANES
