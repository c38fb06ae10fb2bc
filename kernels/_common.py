"""Device helpers shared by the fastmed Triton kernels: the activations of
:data:`fastmed.reference.norm_act.ACTIVATIONS`, chosen by name (``ACT: tl.constexpr`` is one of those strings)."""
import triton
import triton.language as tl

from fastmed.reference.norm_act import GELU_TANH_CUBIC, INV_SQRT_2, INV_SQRT_2PI, SQRT_2_OVER_PI

_SQRT_2_OVER_PI = tl.constexpr(SQRT_2_OVER_PI)
_INV_SQRT_2 = tl.constexpr(INV_SQRT_2)
_INV_SQRT_2PI = tl.constexpr(INV_SQRT_2PI)
_GELU_TANH_CUBIC = tl.constexpr(GELU_TANH_CUBIC)


@triton.jit
def _tanh(u):
    # tanh from exp, stable for large |u|: tanh(u) = sign(u) * (1 - e) / (1 + e), e = exp(-2|u|)
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def apply_act(z, slope, ACT: tl.constexpr):
    """act(z) for the activation named ACT; slope is the leaky_relu/prelu slope (scalar or broadcastable)."""
    if ACT == "identity":
        out = z
    elif ACT == "relu":
        out = tl.where(z < 0, 0.0, z)  # NaN stays NaN
    elif ACT == "leaky_relu" or ACT == "prelu":
        out = tl.where(z > 0, z, z * slope)
    elif ACT == "gelu":
        out = 0.5 * z * (1.0 + tl.erf(z * _INV_SQRT_2))
    elif ACT == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_CUBIC * z * z * z)
        out = 0.5 * z * (1.0 + _tanh(u))
    else:
        tl.static_assert(ACT == "silu", "ACT must be a name of fastmed.reference.norm_act.ACTIVATIONS")
        out = z / (1.0 + tl.exp(-z))
    return out


@triton.jit
def act_grad(z, slope, ACT: tl.constexpr):
    """d act(z) / dz for the activation named ACT."""
    if ACT == "identity":
        out = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == "relu":
        out = tl.where(z > 0, 1.0, 0.0)
    elif ACT == "leaky_relu" or ACT == "prelu":
        out = tl.where(z > 0, 1.0, slope + 0.0 * z)
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(z * _INV_SQRT_2))
        out = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_CUBIC * z * z * z)
        t = _tanh(u)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * z * z)
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    else:
        tl.static_assert(ACT == "silu", "ACT must be a name of fastmed.reference.norm_act.ACTIVATIONS")
        s = 1.0 / (1.0 + tl.exp(-z))
        out = s * (1.0 + z * (1.0 - s))
    return out.to(z.dtype)


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, PREC: tl.constexpr):
    """One key tile of flash attention's online softmax: scores ``s`` (BLOCK_M, BLOCK_N) and values ``v``
    (BLOCK_N, BLOCK_D) update the running row max ``m_i``, row sum ``l_i`` and output ``acc``; returns the new
    ``(m_i, l_i, acc)``."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(acc.dtype)
    return m_new, l_i, acc
