"""Device helpers shared by the fastmed Triton kernels."""
import math

import triton
import triton.language as tl

# Activation codes (tl.constexpr) shared by every kernel that fuses an activation.
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5, "prelu": 6}

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@triton.jit
def _tanh(u):
    # tanh from exp, stable for large |u|: tanh(u) = sign(u) * (1 - e) / (1 + e), e = exp(-2|u|)
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def apply_act(z, slope, ACT: tl.constexpr):
    """act(z) for the activation code ACT; slope is the leaky/prelu slope (scalar or broadcastable)."""
    if ACT == 0:
        out = z
    elif ACT == 1:
        out = tl.where(z < 0, 0.0, z)  # NaN stays NaN
    elif ACT == 2 or ACT == 6:
        out = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 4:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = 0.5 * z * (1.0 + _tanh(u))
    else:
        out = z / (1.0 + tl.exp(-z))
    return out


@triton.jit
def act_grad(z, slope, ACT: tl.constexpr):
    """d act(z) / dz for the activation code ACT."""
    if ACT == 0:
        out = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == 1:
        out = tl.where(z > 0, 1.0, 0.0)
    elif ACT == 2 or ACT == 6:
        out = tl.where(z > 0, 1.0, slope + 0.0 * z)
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        out = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 4:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = _tanh(u)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        out = s * (1.0 + z * (1.0 - s))
    return out.to(z.dtype)
