"""Edge-case suite over every public op and module (issue 10 §6), on the reference and Triton backends.

Each case is ``<op>-<category>-<variant>-<backend>``; categories:

``layout``     inputs and parameters non-contiguous (NaN in the gaps), expanded (stride 0), offset
               (storage_offset > 0, NaN before), flipped, permuted (increasing strides) or channels-last
``dtype``      float16 / bfloat16 / float32 / float64 inputs; integer and bool labels and masks
``size``       empty and size-1 dims
``nonfinite``  NaN and +-inf in inputs and parameters (and a large mean, where cancellation bites)
``bad``        wrong shapes, ranks, dtypes and values: a ValueError/TypeError naming the argument
``classes``    1, 2, 33, 105 and 200 classes
``config``     option combinations (norm kinds, activations, 1D/3D inputs, strides, padded or shrunk windows...)
``value``      the default call of a module, model or helper
``double_backward``, ``grad_mode`` (``no_grad`` / ``inference_mode``), ``meta``, ``inplace_output`` (the output
modified in place before backward, as torch's own modules allow)

A case passes when fastmed raises a clear error naming the argument, or agrees with an independent oracle (a torch
composition written here, MONAI, scipy), leaves every input untouched, and gives bit-equal results when run twice
(see ``edge_support``).  Triton runs under ``TRITON_INTERPRET=1`` on CPU (set by conftest).  Ops that have no
Triton backend run on the backends they register (``attention``: reference; distance transforms and metrics:
``cpp`` and reference).
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import edge_support as E
import pytest
import torch
import torch.nn.functional as F
from edge_support import FLOATS, LAYOUTS_1D, LAYOUTS_ND, Call, lay
from torch import nn
from torch.func import functional_call

import fastmed
import fastmed.nn as FN
from fastmed import _ext, metrics, ops

monai_losses = pytest.importorskip("monai.losses")
monai_metrics = pytest.importorskip("monai.metrics")
from monai.networks.nets import swin_unetr as monai_swin  # noqa: E402

F16, BF16, F32, F64 = FLOATS
DT_NAMES = {F16: "float16", BF16: "bfloat16", F32: "float32", F64: "float64"}


class Case(NamedTuple):
    op: str
    category: str
    variant: str
    backend: str
    run: Callable[[], None]

    @property
    def id(self) -> str:
        return f"{self.op}-{self.category}-{self.variant}-{self.backend}"


def _randn(shape, g, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift


def _place(raw: dict, dev, dtype, layouts: dict, diff) -> dict:
    """Cast the float64 CPU tensors of ``raw`` to ``dtype`` (floats only) on ``dev`` and lay them out."""
    out = {}
    for k, v in raw.items():
        v = v.to(dev, dtype) if v.is_floating_point() else v.to(dev)
        out[k] = lay(v, layouts.get(k), requires_grad=k in diff and v.is_floating_point())
    return out


def _apply_over(t: dict, kw: dict, over: dict, dev) -> None:
    """Replace tensors (or add them) and keyword arguments of a built call: the bad-argument cases."""
    for k, v in (over or {}).items():
        if isinstance(v, torch.Tensor):
            t[k] = v.to(dev)
        else:
            (t if k in t else kw)[k] = v


def _cases_for(op, backends, table: dict, triton=None) -> list:
    """``table``: {(category, variant): run(backend) or (run, backends)} -> one Case per backend.

    With ``triton`` (a set of keys), only those entries run on the Triton backend as well (the interpreter is slow:
    each op's Triton cases are chosen to cover what its kernels do), the others on ``backends`` minus Triton."""
    out = []
    for key, entry in table.items():
        run, bks = entry if isinstance(entry, tuple) else (entry, backends)
        if triton is not None and not isinstance(entry, tuple) and key not in triton:
            bks = tuple(b for b in bks if b != "triton")
        for b in bks:
            out.append(Case(op, key[0], key[1], b, (lambda run=run, b=b: run(b))))
    return out


def standard_checks(build, names, *, meta=True, double=True, grad_modes=True, inplace=False) -> dict:
    """double_backward / no_grad / inference_mode / meta / inplace_output entries for a builder ``build(dev, **kw)``."""
    table = {}
    if double:
        table[("double_backward", "create_graph")] = lambda b: E.check_double_backward(build(E.device_of(b)), b)
    if grad_modes:
        for mode in ("no_grad", "inference_mode"):
            table[("grad_mode", mode)] = lambda b, mode=mode: E.check_grad_mode(build(E.device_of(b)), b, mode)
    if meta:
        table[("meta", "meta_tensors")] = (lambda b: E.check_meta(build("cpu"), names), ("reference",))
    if inplace:
        table[("inplace_output", "mul_")] = lambda b: check_inplace_output(build(E.device_of(b)), b)
    return table


def check_inplace_output(call: Call, backend: str) -> None:
    """``y = op(...); y.mul_(2); backward``: legal for torch's own modules, so it must be here, with the right
    gradients."""
    inputs = [call.t[k] for k in call.diff]
    with fastmed.use_backend(backend):
        y = call.fn(call.t)
        y.mul_(2)
        up = torch.randn(y.shape, generator=E.gen(5), dtype=torch.float64).to(y)
        grads = torch.autograd.grad(y, inputs, up, allow_unused=True)
    t64 = E.oracle_inputs(call.t, call.diff)
    want = call.oracle(t64) * 2
    wgrads = torch.autograd.grad(want, [t64[k] for k in call.diff], up.double().cpu(), allow_unused=True)
    E.assert_close(y, want, E.tolerance(call.dtype), "output")
    for k, g, w in zip(call.diff, grads, wgrads):
        if w is not None:
            E.assert_close(g, w, E.tolerance(call.t[k].dtype), f"gradient of {k!r}")


def value_case(build, **kw):
    return lambda b: E.check_against_oracle(build(E.device_of(b), **kw), b)


def error_case(build, names, **kw):
    return lambda b: E.check_error(build(E.device_of(b), **kw), b, names)


def error_or_value_case(build, names, **kw):
    return lambda b: E.check_error_or_oracle(build(E.device_of(b), **kw), b, names)


def _set(index, value):
    """A ``values`` hook: raw[name][index] = value."""
    name, idx = index
    return lambda raw: raw[name].__setitem__(idx, value)


TRITON = ("reference", "triton")


# ================================================================================================ norm_act
def _norm_tensors(raw, C, g, prelu, stats, values, dev, dtype, layouts):
    """Adds the prelu slope and running statistics of a C-channel normalization to ``raw``, applies the ``values``
    hook and places the tensors: (tensors, names differentiated: all but the running statistics)."""
    if prelu:
        raw["negative_slope"] = torch.rand(C, generator=g, dtype=torch.float64) * 0.3 + 0.1
    if stats:
        raw["running_mean"] = _randn(C, g, 0.3)
        raw["running_var"] = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    if values:
        values(raw)
    diff = tuple(k for k in raw if not k.startswith("running"))
    return _place(raw, dev, dtype, layouts or {}, diff), diff


def norm_act_call(dev, *, dtype=F32, kind="instance", shape=(2, 4, 3, 5), act="leaky_relu", affine=True,
                  residual=False, prelu=False, stats=None, layouts=None, values=None, over=None, seed=1,
                  **call_kw):
    """``stats``: None, "eval" (running statistics used) or "train" (updated in place)."""
    g = E.gen(seed)
    C = shape[1]
    raw = {"x": _randn(shape, g)}
    if affine:
        raw["weight"], raw["bias"] = _randn(C, g, 0.5, 1.0), _randn(C, g, 0.5)
    if residual:
        raw["residual"] = _randn(shape, g)
    t, diff = _norm_tensors(raw, C, g, prelu, stats, values, dev, dtype, layouts)
    act = "prelu" if prelu else act
    kw = dict(kind=kind, num_groups=2 if kind == "group" else None, eps=1e-5, activation=act,
              training=stats != "eval", momentum=0.1)
    _apply_over(t, kw, over, dev)

    def fn(t):
        return ops.norm_act(t["x"], kw["kind"], t.get("weight"), t.get("bias"), num_groups=kw["num_groups"],
                            eps=kw["eps"], activation=kw["activation"], negative_slope=t.get("negative_slope", 0.01),
                            residual=t.get("residual"), running_mean=t.get("running_mean"),
                            running_var=t.get("running_var"), momentum=kw["momentum"], training=kw["training"])

    def oracle(t):
        z = E.normalize(t["x"], kw["kind"], t.get("weight"), t.get("bias"), kw["num_groups"], kw["eps"],
                        t.get("running_mean"), t.get("running_var"), kw["training"], kw["momentum"])
        if "residual" in t:
            z = z + t["residual"]
        return E.activation(z, kw["activation"], t.get("negative_slope", 0.01))

    return Call(fn, oracle, t, diff, dtype, mutable=("running_mean", "running_var") if stats == "train" else (),
                **call_kw)


# norm_act also has a C++ CPU backend (when fastmed._C is built): every case but the Triton-only ones runs on it.
NORM_ACT_BACKENDS = TRITON + (("cpp",) if _ext.extension_info()["built"] else ())


def norm_act_cases():
    b = norm_act_call
    full = dict(residual=True)
    T = {}
    for name in ("x", "residual"):
        for L in LAYOUTS_ND:
            T[("layout", f"{name}:{L}")] = value_case(b, layouts={name: L}, **full)
    for name in ("weight", "bias"):
        for L in LAYOUTS_1D:
            T[("layout", f"{name}:{L}")] = value_case(b, layouts={name: L}, **full)
    for L in LAYOUTS_1D:
        T[("layout", f"prelu_slope:{L}")] = value_case(b, prelu=True, layouts={"negative_slope": L})
        T[("layout", f"running_stats:{L}")] = value_case(b, kind="batch", stats="eval",
                                                         layouts={"running_mean": L, "running_var": L})
    for dt in FLOATS:
        T[("dtype", DT_NAMES[dt])] = value_case(b, dtype=dt, **full)
    configs = {"group_silu_5d": dict(kind="group", act="silu", shape=(2, 4, 3, 2, 3)),
               "batch_train_stats_relu": dict(kind="batch", act="relu", stats="train"),
               "batch_eval_identity": dict(kind="batch", act="identity", stats="eval"),
               "instance_gelu_3d": dict(act="gelu", shape=(2, 3, 7)),
               "instance_gelu_tanh_no_affine": dict(act="gelu_tanh", affine=False)}
    for name, cfg in configs.items():
        T[("config", name)] = value_case(b, **cfg)
    T[("size", "batch1")] = value_case(b, shape=(1, 4, 3, 5), **full)
    T[("size", "channel1")] = value_case(b, shape=(2, 1, 3, 5), **full)
    T[("size", "spatial1x5")] = value_case(b, shape=(2, 4, 1, 5), **full)
    T[("size", "spatial1x1_instance")] = error_case(b, ("x",), shape=(2, 4, 1, 1))
    T[("size", "spatial1x1_batch")] = value_case(b, kind="batch", shape=(3, 4, 1, 1))
    T[("size", "empty_batch")] = error_or_value_case(b, ("x",), shape=(0, 4, 3, 5))
    T[("size", "empty_spatial")] = error_or_value_case(b, ("x",), shape=(2, 4, 0, 5))
    for v, val in (("nan", float("nan")), ("posinf", float("inf")), ("neginf", float("-inf"))):
        T[("nonfinite", f"x_{v}")] = value_case(b, values=_set(("x", (0, 1, 1, 2)), val), nonfinite=True, **full)
    # A NaN weight must give NaN in its channel.  An infinite weight is left out: inf * (x - mean) + bias is
    # inf - inf = NaN or +-inf depending on the order of operations, in torch's own instance norm too, so no
    # oracle defines the result.
    T[("nonfinite", "weight_nan")] = value_case(b, values=_set(("weight", 2), float("nan")), nonfinite=True, **full)
    for L in ("contiguous", "channels_last"):
        T[("nonfinite", f"large_mean_{L}")] = value_case(
            b, shape=(2, 3, 4, 4, 4), layouts={"x": L}, values=lambda raw: raw["x"].add_(1000.0), lowp=True)
    bad = {"x_rank2": ("x", dict(shape=(2, 4))),
           "x_rank6": ("x", dict(shape=(1, 2, 2, 2, 2, 2))),
           "x_int": ("x", dict(over={"x": torch.ones(2, 4, 3, 5, dtype=torch.int64)})),
           "weight_len5": ("weight", dict(over={"weight": torch.ones(5)})),
           "weight_rank2": ("weight", dict(over={"weight": torch.ones(4, 1)})),
           "bias_int": ("bias", dict(over={"bias": torch.ones(4, dtype=torch.int32)})),
           "residual_shape": ("residual", dict(over={"residual": torch.ones(2, 4, 3, 4)})),
           "kind_layer": ("kind", dict(over={"kind": "layer"})),
           "num_groups_3": ("num_groups", dict(kind="group", over={"num_groups": 3})),
           "eps_negative": ("eps", dict(over={"eps": -1.0})),
           "activation_tanh": ("activation", dict(over={"activation": "tanh"})),
           "prelu_float_slope": ("negative_slope", dict(over={"activation": "prelu"})),
           "prelu_slope_len3": ("negative_slope", dict(prelu=True, over={"negative_slope": torch.ones(3)})),
           "running_mean_alone": ("running_var", dict(kind="batch", over={"running_mean": torch.zeros(4)})),
           "running_var_len3": ("running_var", dict(kind="batch", stats="eval",
                                                    over={"running_var": torch.ones(3)}))}
    for v, (name, kw) in bad.items():
        T[("bad", v)] = error_case(b, name if isinstance(name, tuple) else (name,), **kw)
    T.update(standard_checks(lambda dev: b(dev, act="gelu", **full), ("x",), inplace=True))
    T[("inplace_output", "mul_leaky_relu")] = lambda bk: check_inplace_output(b(E.device_of(bk), **full), bk)
    T[("grad_mode", "no_grad_batch_train_stats")] = lambda bk: E.check_grad_mode(
        b(E.device_of(bk), kind="batch", stats="train"), bk, "no_grad")
    tri = {("layout", f"{n}:{L}") for n in ("weight", "bias", "prelu_slope", "running_stats")
           for L in ("noncontiguous", "expanded")}
    tri |= {("layout", "x:noncontiguous"), ("layout", "x:expanded"), ("layout", "x:channels_last"),
            ("layout", "weight:permuted"), ("layout", "weight:offset"), ("layout", "residual:noncontiguous"),
            ("dtype", "float16"), ("dtype", "bfloat16"), ("dtype", "float64"), ("config", "group_silu_5d"),
            ("config", "batch_train_stats_relu"), ("config", "instance_gelu_3d"), ("size", "channel1"),
            ("nonfinite", "x_nan"), ("nonfinite", "weight_nan"), ("nonfinite", "large_mean_channels_last"),
            ("double_backward", "create_graph"), ("grad_mode", "no_grad_batch_train_stats"),
            ("inplace_output", "mul_"), ("inplace_output", "mul_leaky_relu")}
    return _cases_for("norm_act", NORM_ACT_BACKENDS, T, tri)


# ================================================================================================ conv_norm_act
def conv_call(dev, *, dtype=F32, shape=(2, 2, 4, 5), cout=3, k=3, stride=1, padding=None, norm="instance",
              act="leaky_relu", residual=False, skip=0, prelu=False, bias=True, affine=True, stats=None,
              impl="cudnn", layouts=None, values=None, over=None, seed=2, **call_kw):
    g = E.gen(seed)
    sd = len(shape) - 2
    cin = shape[1] + skip
    raw = {"x": _randn(shape, g), "weight": _randn((cout, cin) + (k,) * sd, g, 0.3)}
    if skip:
        raw["skip"] = _randn((shape[0], skip) + shape[2:], g)
    if bias:
        raw["bias"] = _randn(cout, g, 0.5)
    if affine and norm != "none":
        raw["norm_weight"], raw["norm_bias"] = _randn(cout, g, 0.5, 1.0), _randn(cout, g, 0.5)
    pad = (k - 1) // 2 if padding is None else padding
    out_sp = tuple((s + 2 * pad - k) // stride + 1 for s in shape[2:])
    if residual:
        raw["residual"] = _randn((shape[0], cout) + out_sp, g)
    t, diff = _norm_tensors(raw, cout, g, prelu, stats, values, dev, dtype, layouts)
    act = "prelu" if prelu else act
    kw = dict(stride=stride, padding=padding, norm=norm, activation=act, training=stats != "eval",
              implementation=impl, num_groups=2 if norm == "group" else None)
    _apply_over(t, kw, over, dev)

    def fn(t):
        return ops.conv_norm_act(t["x"], t["weight"], t.get("bias"), t.get("norm_weight"), t.get("norm_bias"),
                                 stride=kw["stride"], padding=kw["padding"], norm=kw["norm"],
                                 num_groups=kw["num_groups"], activation=kw["activation"],
                                 negative_slope=t.get("negative_slope", 0.01), residual=t.get("residual"),
                                 running_mean=t.get("running_mean"), running_var=t.get("running_var"),
                                 training=kw["training"], skip=t.get("skip"), implementation=kw["implementation"])

    def oracle(t):
        x = t["x"] if "skip" not in t else torch.cat([t["x"], t["skip"]], 1)
        conv = F.conv3d if x.dim() == 5 else F.conv2d
        z = conv(x, t["weight"], t.get("bias"), kw["stride"], pad)
        z = E.normalize(z, kw["norm"], t.get("norm_weight"), t.get("norm_bias"), kw["num_groups"], 1e-5,
                        t.get("running_mean"), t.get("running_var"), kw["training"], 0.1)
        if "residual" in t:
            z = z + t["residual"]
        return E.activation(z, kw["activation"], t.get("negative_slope", 0.01))

    return Call(fn, oracle, t, diff, dtype, mutable=("running_mean", "running_var") if stats == "train" else (),
                **call_kw)


def conv_cases():
    T, tri = {}, set()
    for impl in ("cudnn", "implicit_gemm"):
        def b(dev, impl=impl, **kw):
            return conv_call(dev, impl=impl, **kw)
        full = dict(residual=True)
        sub = {}
        for name in ("x", "residual"):
            for L in LAYOUTS_ND:
                sub[("layout", f"{name}:{L}")] = value_case(b, layouts={name: L}, **full)
        for L in ("noncontiguous", "expanded", "offset", "permuted", "channels_last"):
            sub[("layout", f"weight:{L}")] = value_case(b, layouts={"weight": L}, **full)
            sub[("layout", f"skip:{L}")] = value_case(b, skip=2, layouts={"skip": L})
        for L in LAYOUTS_1D:
            sub[("layout", f"bias:{L}")] = value_case(b, layouts={"bias": L}, **full)
            sub[("layout", f"norm_params:{L}")] = value_case(b, layouts={"norm_weight": L, "norm_bias": L}, **full)
            sub[("layout", f"prelu_slope:{L}")] = value_case(b, prelu=True, layouts={"negative_slope": L})
        for dt in FLOATS:
            check = value_case(b, dtype=dt, **full)
            if dt == F64 and impl == "implicit_gemm":  # documented: implicit GEMM takes 16/32-bit floats
                check = error_or_value_case(b, ("implementation",), dtype=dt, **full)
            sub[("dtype", DT_NAMES[dt])] = check
        sub[("config", "3d_group_stride2")] = value_case(b, shape=(1, 2, 4, 5, 3), cout=4, norm="group", stride=2)
        sub[("config", "batch_train_stats")] = value_case(b, norm="batch", stats="train", act="relu")
        sub[("config", "batch_eval")] = value_case(b, norm="batch", stats="eval")
        sub[("config", "norm_none")] = value_case(b, norm="none", act="silu", residual=True)
        sub[("config", "no_bias_no_affine")] = value_case(b, bias=False, affine=False)
        sub[("size", "batch1_channel1")] = value_case(b, shape=(1, 1, 4, 4), cout=1)
        sub[("size", "spatial1_kernel1")] = value_case(b, shape=(2, 2, 1, 5), k=1)
        sub[("size", "empty_batch")] = error_or_value_case(b, ("x",), shape=(0, 2, 4, 5))
        sub[("nonfinite", "x_nan")] = value_case(b, values=_set(("x", (1, 0, 2, 2)), float("nan")), nonfinite=True)
        sub[("nonfinite", "weight_inf")] = value_case(b, values=_set(("weight", (1, 0, 1, 1)), float("inf")),
                                                      nonfinite=True)
        sub[("nonfinite", "bias_nan")] = value_case(b, values=_set(("bias", 2), float("nan")), nonfinite=True)
        sub.update(standard_checks(lambda dev, b=b: b(dev, act="gelu", residual=True), ("x", "weight"),
                                   meta=impl == "cudnn", grad_modes=True, inplace=True))
        for (cat, var), run in sub.items():
            T[(cat, f"{impl}:{var}")] = run
        picks = _CONV_TRITON[impl]
        tri |= {(cat, f"{impl}:{var}") for cat, var in sub if var in picks or cat in picks}
    b = conv_call
    bad = {"x_rank3": ("x", dict(shape=(2, 2, 5))),
           "x_int": ("x", dict(over={"x": torch.ones(2, 2, 4, 5, dtype=torch.int32)})),
           "weight_rank": ("weight", dict(over={"weight": torch.ones(3, 2, 3)})),
           "weight_cin": ("weight", dict(over={"weight": torch.ones(3, 4, 3, 3)})),
           "weight_dtype": ("weight", dict(over={"weight": torch.ones(3, 2, 3, 3, dtype=torch.float64)})),
           "bias_len": ("bias", dict(over={"bias": torch.ones(2)})),
           "norm_weight_len": ("norm_weight", dict(over={"norm_weight": torch.ones(5)})),
           "residual_shape": ("residual", dict(residual=True, over={"residual": torch.ones(2, 3, 4, 4)})),
           "skip_spatial": ("skip", dict(skip=2, over={"skip": torch.ones(2, 2, 4, 4)})),
           "stride0": ("stride", dict(over={"stride": 0})),
           "padding_neg": ("padding", dict(over={"padding": -1})),
           "kernel_too_big": (("weight", "kernel", "padding"), dict(shape=(1, 2, 2, 2), k=5, padding=0)),
           "norm_bogus": ("norm", dict(over={"norm": "layer"})),
           "implementation_bogus": ("implementation", dict(over={"implementation": "winograd"}))}
    for v, (name, kw) in bad.items():
        T[("bad", v)] = error_case(b, name if isinstance(name, tuple) else (name,), **kw)
    return _cases_for("conv_norm_act", TRITON, T, tri)


# What each implementation's Triton kernels read directly (cudnn: torch's convolution, then the norm-act kernel).
_CONV_TRITON = {
    "cudnn": {"x:channels_last", "residual:noncontiguous", "norm_params:noncontiguous", "norm_params:expanded",
              "prelu_slope:noncontiguous", "bfloat16", "batch_train_stats", "double_backward"},
    "implicit_gemm": {"x:noncontiguous", "x:expanded", "x:channels_last", "weight:noncontiguous", "weight:expanded",
                      "weight:permuted", "bias:noncontiguous", "bias:expanded", "skip:noncontiguous", "float16",
                      "float64", "3d_group_stride2", "batch_train_stats", "double_backward", "inplace_output"},
}


# ================================================================================================ window_attention
def _attention_inputs(raw, qkv_pad, values, dev, dtype, layouts, kw, over):
    """An attention op's inputs ``raw`` (plus ``qkv_pad`` unless None) after ``values``, placed on ``dev`` with
    ``layouts`` and then ``over`` applied to them and to the arguments ``kw``: (tensors, differentiable names)."""
    if qkv_pad is not None:
        raw["qkv_pad"] = qkv_pad
    if values:
        values(raw)
    diff = tuple(raw)
    t = _place(raw, dev, dtype, layouts or {}, diff)
    _apply_over(t, kw, over, dev)
    return t, diff


def wa_call(dev, *, dtype=F32, B=1, grid=(4, 3), heads=2, hd=4, window=(2, 3), shift=(1, 1), table=True,
            pad=False, bias_index="coords", scale=None, layouts=None, values=None, over=None, seed=3, **call_kw):
    g = E.gen(seed)
    nd = len(grid)
    window = (window,) * nd if isinstance(window, int) else tuple(window)
    C = heads * hd
    raw = {"qkv": _randn((B,) + tuple(grid) + (3 * C,), g)}
    if table:
        raw["table"] = _randn((math.prod(2 * w - 1 for w in window), heads), g)
    kw = dict(num_heads=heads, window_size=window, shift_size=shift, scale=scale, bias_index=bias_index)
    t, diff = _attention_inputs(raw, _randn(3 * C, g) if pad else None, values, dev, dtype, layouts, kw, over)

    def fn(t):
        return ops.window_attention(t["qkv"], kw["num_heads"], kw["window_size"], kw["shift_size"], t.get("table"),
                                    kw["scale"], qkv_pad=t.get("qkv_pad"), bias_index=kw["bias_index"])

    def oracle(t):
        return E.window_attention_oracle(t["qkv"], kw["num_heads"], kw["window_size"], kw["shift_size"],
                                         t.get("table"), kw["scale"], t.get("qkv_pad"), kw["bias_index"])

    return Call(fn, oracle, t, diff, dtype, **call_kw)


def _attention_layout_dtype_cases(b, others):
    """The layout cases of a windowed attention op (``qkv`` with a batch of 2; each other input ``name`` with the
    builder arguments ``others[name]``) and one case per float dtype."""
    T = {}
    for L in LAYOUTS_1D:
        T[("layout", f"qkv:{L}")] = value_case(b, layouts={"qkv": L}, B=2)
        for name, kw in others.items():
            T[("layout", f"{name}:{L}")] = value_case(b, layouts={name: L}, **kw)
    for dt in FLOATS:
        T[("dtype", DT_NAMES[dt])] = value_case(b, dtype=dt)
    return T


def _attention_qkv_cases(b):
    """A windowed attention op's head_dim 1, empty batch and non-finite ``qkv`` cases."""
    T = {("size", "head_dim1"): value_case(b, hd=1, heads=3),
         ("size", "empty_batch"): error_or_value_case(b, ("qkv",), B=0)}
    for v, val in (("nan", float("nan")), ("posinf", float("inf")), ("neginf", float("-inf"))):
        T[("nonfinite", f"qkv_{v}")] = value_case(b, values=_set(("qkv", (0, 1, 2, 3)), val), nonfinite=True)
    return T


def window_attention_cases():
    b = wa_call
    T = _attention_layout_dtype_cases(b, {"table": {}, "qkv_pad": dict(grid=(3, 3), pad=True)})
    T[("config", "3d_shift")] = value_case(b, grid=(2, 4, 2), window=2, shift=1, hd=2)
    T[("config", "padded_grid_shift")] = value_case(b, grid=(4, 5), window=3, shift=1, pad=True)
    T[("config", "shrunk_window_monai_index")] = value_case(b, grid=(2, 6), window=(4, 3), shift=(2, 1),
                                                            bias_index="monai")
    T[("config", "no_table_scale")] = value_case(b, table=False, scale=0.7)
    T[("size", "grid1x1")] = value_case(b, grid=(1, 1))
    T[("size", "window1")] = value_case(b, grid=(2, 2), window=1, shift=0)
    T.update(_attention_qkv_cases(b))
    T[("nonfinite", "table_neginf")] = value_case(b, values=_set(("table", (3, 1)), float("-inf")), nonfinite=True)
    bad = {"qkv_rank3": ("qkv", dict(over={"qkv": torch.ones(4, 6, 24)})),
           "qkv_int": ("qkv", dict(over={"qkv": torch.ones(1, 4, 6, 24, dtype=torch.int64)})),
           "qkv_not_3C": ("qkv", dict(over={"qkv": torch.ones(1, 4, 6, 25)})),
           "num_heads_3": ("num_heads", dict(over={"num_heads": 3})),
           "window_0": ("window_size", dict(over={"window_size": 0})),
           "shift_ge_window": ("shift_size", dict(over={"shift_size": (2, 1)})),
           "table_shape": ("rel_pos_bias_table", dict(over={"table": torch.ones(15, 3)})),
           "qkv_pad_shape": ("qkv_pad", dict(pad=True, over={"qkv_pad": torch.ones(23)})),
           "scale_nan": ("scale", dict(over={"scale": float("nan")})),
           "bias_index_bogus": ("bias_index", dict(over={"bias_index": "timm"}))}
    for v, (name, kw) in bad.items():
        T[("bad", v)] = error_case(b, name if isinstance(name, tuple) else (name,), **kw)
    T.update(standard_checks(b, ("qkv",), inplace=True))
    tri = {("layout", "qkv:noncontiguous"), ("layout", "qkv:expanded"), ("layout", "table:noncontiguous"),
           ("layout", "table:expanded"), ("layout", "qkv_pad:noncontiguous"), ("dtype", "float16"),
           ("dtype", "float64"), ("config", "3d_shift"), ("config", "padded_grid_shift"),
           ("config", "shrunk_window_monai_index"), ("nonfinite", "qkv_nan"), ("double_backward", "create_graph"),
           ("inplace_output", "mul_")}
    return _cases_for("window_attention", TRITON, T, tri)


# ================================================================================================ sam_attention
def sam_attention_oracle(qkv, heads, rel_pos_h, rel_pos_w, window, scale, qkv_pad):
    """segment_anything's windowed / global attention written out: pad, per window ``(q*scale) k^T`` plus the
    tables gathered by ``q_coord - k_coord + size - 1`` (``get_rel_pos``), softmax, crop."""
    B, H, W, C3 = qkv.shape
    hd = C3 // 3 // heads
    wh, ww = (H, W) if window == 0 else (window, window)
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    pad = qkv.new_zeros(C3) if qkv_pad is None else qkv_pad
    x = pad.expand(B, Hp, Wp, C3).clone()
    x[:, :H, :W] = qkv
    scale = hd ** -0.5 if scale is None else scale
    rh = rel_pos_h[torch.arange(wh)[:, None] - torch.arange(wh)[None, :] + wh - 1]  # (wh, wh, hd)
    rw = rel_pos_w[torch.arange(ww)[:, None] - torch.arange(ww)[None, :] + ww - 1]
    out = torch.zeros(B, Hp, Wp, heads, hd, dtype=qkv.dtype, device=qkv.device)
    for i in range(0, Hp, wh):
        for j in range(0, Wp, ww):
            q, k, v = x[:, i:i + wh, j:j + ww].reshape(B, wh, ww, 3, heads, hd).unbind(3)
            s = torch.einsum("byxnc,bkmnc->bnyxkm", q * scale, k)
            s = s + torch.einsum("byxnc,ykc->bnyxk", q, rh)[..., None] + torch.einsum("byxnc,xmc->bnyxm", q,
                                                                                        rw)[..., None, :]
            p = torch.softmax(s.flatten(-2), dim=-1).view(s.shape)
            out[:, i:i + wh, j:j + ww] = torch.einsum("bnyxkm,bkmnc->byxnc", p, v)
    return out[:, :H, :W].reshape(B, H, W, heads * hd)


def sam_call(dev, *, dtype=F32, B=1, grid=(5, 4), heads=2, hd=4, window=3, pad=True, scale=None, layouts=None,
             values=None, over=None, seed=3, **call_kw):
    g = E.gen(seed)
    C = heads * hd
    wh, ww = tuple(grid) if window == 0 else (window, window)
    raw = {"qkv": _randn((B,) + tuple(grid) + (3 * C,), g), "rel_pos_h": _randn((2 * wh - 1, hd), g, 0.5),
           "rel_pos_w": _randn((2 * ww - 1, hd), g, 0.5)}
    kw = dict(num_heads=heads, window_size=window, scale=scale)
    t, diff = _attention_inputs(raw, _randn(3 * C, g) if pad else None, values, dev, dtype, layouts, kw, over)

    def fn(t):
        return ops.sam_attention(t["qkv"], kw["num_heads"], t["rel_pos_h"], t["rel_pos_w"], kw["window_size"],
                                 kw["scale"], qkv_pad=t.get("qkv_pad"))

    def oracle(t):
        return sam_attention_oracle(t["qkv"], kw["num_heads"], t["rel_pos_h"], t["rel_pos_w"], kw["window_size"],
                                    kw["scale"], t.get("qkv_pad"))

    return Call(fn, oracle, t, diff, dtype, **call_kw)


def sam_attention_cases():
    b = sam_call
    T = _attention_layout_dtype_cases(b, {"rel_pos_h": {}, "qkv_pad": {}})
    T[("config", "global")] = value_case(b, window=0, grid=(3, 4))
    T[("config", "divisible_no_pad")] = value_case(b, grid=(4, 2), window=2, pad=False)
    T[("config", "scale")] = value_case(b, scale=0.7)
    T[("size", "grid1x1")] = value_case(b, grid=(1, 1), window=1)
    T[("size", "window_larger_than_grid")] = value_case(b, grid=(2, 3), window=4)
    T.update(_attention_qkv_cases(b))
    bad = {"qkv_rank3": ("qkv", dict(over={"qkv": torch.ones(4, 6, 24)})),
           "qkv_int": ("qkv", dict(over={"qkv": torch.ones(1, 5, 4, 24, dtype=torch.int64)})),
           "qkv_not_3C": ("qkv", dict(over={"qkv": torch.ones(1, 5, 4, 25)})),
           "num_heads_3": ("num_heads", dict(over={"num_heads": 3})),
           "window_negative": ("window_size", dict(over={"window_size": -1})),
           "table_interpolated": ("rel_pos_h", dict(over={"rel_pos_h": torch.ones(7, 4)})),
           "table_dtype": ("rel_pos_w", dict(over={"rel_pos_w": torch.ones(5, 4, dtype=torch.float64)})),
           "qkv_pad_shape": ("qkv_pad", dict(over={"qkv_pad": torch.ones(23)})),
           "scale_nan": ("scale", dict(over={"scale": float("nan")}))}
    for v, (name, kw) in bad.items():
        T[("bad", v)] = error_case(b, (name,), **kw)
    T.update(standard_checks(b, ("qkv",), inplace=True))
    tri = {("layout", "qkv:noncontiguous"), ("layout", "qkv:expanded"), ("layout", "rel_pos_h:noncontiguous"),
           ("layout", "qkv_pad:noncontiguous"), ("dtype", "float16"), ("dtype", "float64"), ("config", "global"),
           ("size", "window_larger_than_grid"), ("nonfinite", "qkv_nan"), ("double_backward", "create_graph"),
           ("inplace_output", "mul_")}
    return _cases_for("sam_attention", TRITON, T, tri)


# ================================================================================================ attention
def attention_call(dev, *, dtype=F32, B=1, heads=2, Lq=5, Lk=6, hd=4, bias_shape=(1, 1, 5, 6), scale=None,
                   layouts=None, values=None, over=None, seed=4, **call_kw):
    g = E.gen(seed)
    raw = {"q": _randn((B, heads, Lq, hd), g), "k": _randn((B, heads, Lk, hd), g), "v": _randn((B, heads, Lk, hd), g)}
    if bias_shape:
        raw["bias"] = _randn(bias_shape, g)
    if values:
        values(raw)
    diff = tuple(raw)
    t = _place(raw, dev, dtype, layouts or {}, diff)
    kw = dict(scale=scale)
    _apply_over(t, kw, over, dev)

    def fn(t):
        return ops.attention(t["q"], t["k"], t["v"], t.get("bias"), kw["scale"])

    def oracle(t):
        s = (t["q"] @ t["k"].transpose(-1, -2)) * (t["q"].shape[-1] ** -0.5 if kw["scale"] is None else kw["scale"])
        if "bias" in t:
            s = s + t["bias"]
        return torch.softmax(s, -1) @ t["v"]

    return Call(fn, oracle, t, diff, dtype, **call_kw)


def attention_cases():
    b = attention_call
    T = {}
    for name in ("q", "k", "v", "bias"):
        for L in LAYOUTS_ND[:-1]:
            T[("layout", f"{name}:{L}")] = value_case(b, layouts={name: L}, B=2, bias_shape=(2, 2, 5, 6))
    for dt in FLOATS:
        T[("dtype", DT_NAMES[dt])] = value_case(b, dtype=dt)
    T[("size", "L1_hd1")] = value_case(b, Lq=1, Lk=1, hd=1, bias_shape=(1, 1))
    T[("size", "empty_batch")] = error_or_value_case(b, ("q",), B=0, bias_shape=None)
    T[("nonfinite", "bias_neginf_one")] = value_case(b, values=_set(("bias", (0, 0, 1, 2)), float("-inf")),
                                                     nonfinite=True)
    T[("nonfinite", "q_nan")] = value_case(b, values=_set(("q", (0, 1, 1, 0)), float("nan")), nonfinite=True)
    bad = {"q_rank3": ("q", dict(over={"q": torch.ones(2, 5, 4)})),
           "kv_mismatch": ("v", dict(over={"v": torch.ones(1, 2, 7, 4)})),
           "k_head_dim": ("k", dict(over={"k": torch.ones(1, 2, 6, 3), "v": torch.ones(1, 2, 6, 3)})),
           "v_dtype": ("v", dict(over={"v": torch.ones(1, 2, 6, 4, dtype=torch.float64)})),
           "bias_shape": ("bias", dict(over={"bias": torch.ones(3, 6)})),
           "scale_nan": ("scale", dict(over={"scale": float("nan")})),
           "scale_inf": ("scale", dict(over={"scale": float("inf")}))}
    for v, (name, kw) in bad.items():
        T[("bad", v)] = error_case(b, name if isinstance(name, tuple) else (name,), **kw)
    T.update(standard_checks(b, ("q", "k", "v")))
    T[("backend", "forced_triton")] = (_attention_forced_triton, ("triton",))
    return _cases_for("attention", ("reference",), T)


def _attention_forced_triton(backend):
    call = attention_call("cpu")
    with fastmed.use_backend(backend), pytest.raises(fastmed.BackendUnavailableError, match="attention"):
        call.fn(call.t)



# ================================================================================================ distance maps
# The C++ backend runs where fastmed._C is built (as in test_distance_transform.py).
DT_BACKENDS = ("reference",) + (("cpp",) if _ext.extension_info()["built"] else ())
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
               torch.uint64) + FLOATS


def dt_call(dev, *, shape=(2, 5, 6), spatial_dims=2, mdtype=torch.bool, spacing=None, squared=False, dtype=F32,
            layouts=None, values=None, over=None, requires_grad=False, seed=5):
    g = E.gen(seed)
    m = torch.rand(shape, generator=g) > 0.35
    if m.numel():  # every map has a zero voxel (a map without one is a case of its own)
        m.view(-1, math.prod(shape[len(shape) - spatial_dims:]))[:, 0] = False
    raw = {"mask": m.to(mdtype)}
    if values:
        values(raw)
    t = {"mask": lay(raw["mask"].to(dev), (layouts or {}).get("mask"), requires_grad=requires_grad)}
    kw = dict(spacing=spacing, squared=squared, spatial_dims=spatial_dims, dtype=dtype)
    _apply_over(t, kw, over, dev)

    def fn(t):
        return ops.distance_transform(t["mask"], kw["spacing"], squared=kw["squared"],
                                      spatial_dims=kw["spatial_dims"], dtype=kw["dtype"])

    def oracle(t):
        sp = kw["spacing"]
        sp = [sp] * kw["spatial_dims"] if isinstance(sp, (int, float)) else sp
        d = E.edt_batch(t["mask"], kw["spatial_dims"], sp)
        return d * d if kw["squared"] else d

    return Call(fn, oracle, t, (), dtype)


def _dt_requires_grad(backend):
    """A float mask that requires grad: the map has no gradient, so it must not claim one (or a clear error)."""
    call = dt_call("cpu", mdtype=F32, requires_grad=True)
    with fastmed.use_backend(backend):
        try:
            out = call.fn(call.t)
        except (ValueError, TypeError) as exc:
            assert "mask" in str(exc), exc
            return
    assert not out.requires_grad, "distance_transform of a mask that requires grad returns a map that requires " \
                                  "grad, whose backward then fails"
    E.check_against_oracle(call, backend, grad=False)


def distance_transform_cases():
    b = dt_call
    T = {}
    for L in LAYOUTS_ND:
        T[("layout", f"mask:{L}")] = value_case(b, shape=(2, 3, 4, 5), layouts={"mask": L})
    for md in MASK_DTYPES:
        T[("dtype", f"mask_{str(md).replace('torch.', '')}")] = value_case(b, mdtype=md)
    T[("dtype", "out_float64")] = value_case(b, dtype=F64)
    T[("dtype", "out_float16")] = error_case(b, ("dtype",), dtype=F16)
    T[("config", "3d_spacing")] = value_case(b, shape=(2, 3, 4, 5), spatial_dims=3, spacing=(2.0, 0.5, 1.5))
    T[("config", "1d_squared")] = value_case(b, shape=(3, 7), spatial_dims=1, squared=True)
    T[("config", "scalar_spacing")] = value_case(b, spacing=0.7)
    T[("size", "all_ones_map")] = value_case(b, values=lambda raw: raw["mask"].fill_(1))
    T[("size", "single_voxel")] = value_case(b, shape=(1, 1), values=lambda raw: raw["mask"].fill_(1))
    T[("size", "spatial1")] = value_case(b, shape=(2, 1, 6))
    T[("size", "empty_batch")] = value_case(b, shape=(0, 5, 6))
    T[("size", "empty_spatial")] = value_case(b, shape=(2, 0, 6))
    T[("bad", "float_mask_half")] = error_case(b, ("mask",), mdtype=F32, values=_set(("mask", (0, 1, 1)), 0.5))
    T[("nonfinite", "float_mask_nan")] = error_case(b, ("mask",), mdtype=F32,
                                                    values=_set(("mask", (0, 1, 1)), float("nan")))
    T[("nonfinite", "float_mask_inf")] = error_case(b, ("mask",), mdtype=F32,
                                                    values=_set(("mask", (0, 1, 1)), float("inf")))
    bad = {"spatial_dims_4": ("spatial_dims", dict(over={"spatial_dims": 4})),
           "rank_below_spatial_dims": ("mask", dict(shape=(6,), spatial_dims=2)),
           "spacing_len": ("spacing", dict(over={"spacing": (1.0, 2.0, 3.0)})),
           "spacing_zero": ("spacing", dict(over={"spacing": (1.0, 0.0)})),
           "spacing_nan": ("spacing", dict(over={"spacing": float("nan")})),
           "mask_complex": ("mask", dict(over={"mask": torch.zeros(2, 3, dtype=torch.complex64)}))}
    for v, (name, kw) in bad.items():
        T[("bad", v)] = error_case(b, (name,), **kw)
    T[("grad_mode", "mask_requires_grad")] = _dt_requires_grad
    T[("grad_mode", "inference_mode")] = lambda bk: E.check_grad_mode(b("cpu"), bk, "inference_mode")
    T[("meta", "meta_tensors")] = (lambda bk: E.check_meta(b("cpu"), ("mask",)), ("reference",))
    return _cases_for("distance_transform", DT_BACKENDS, T)


def sd_call(dev, *, target="labels", shape=(2, 1, 5, 6), C=3, num_classes=3, include_background=False,
            spacing=None, dtype=F32, tdtype=None, layouts=None, values=None, over=None, seed=6):
    g = E.gen(seed)
    B, sp = shape[0], shape[2:]
    lab = torch.randint(0, C, (B, 1) + sp, generator=g)
    if target == "labels":
        tt = lab.to(tdtype or torch.int64)
    else:
        tt = F.one_hot(lab[:, 0], C).movedim(-1, 1).to(tdtype or torch.bool)
    raw = {"target": tt}
    if values:
        values(raw)
    t = {"target": lay(raw["target"].to(dev), (layouts or {}).get("target"))}
    kw = dict(num_classes=num_classes, spacing=spacing, include_background=include_background, dtype=dtype)
    _apply_over(t, kw, over, dev)

    def fn(t):
        return ops.signed_distance(t["target"], kw["num_classes"], kw["spacing"], kw["include_background"],
                                   dtype=kw["dtype"])

    def oracle(t):
        x = t["target"]
        oh = E.one_hot(x, kw["num_classes"]) if target == "labels" else x
        first = 0 if kw["include_background"] else 1
        sp = kw["spacing"]
        sp = [sp] * (x.dim() - 2) if isinstance(sp, (int, float)) else sp
        return E.kervadec(oh[:, first:] != 0, sp)

    return Call(fn, oracle, t, (), dtype)


def signed_distance_cases():
    b = sd_call
    T = {}
    for L in LAYOUTS_ND:
        T[("layout", f"labels:{L}")] = value_case(b, layouts={"target": L})
        T[("layout", f"onehot:{L}")] = value_case(b, target="onehot", shape=(2, 3, 5, 6), layouts={"target": L})
    for td in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        T[("dtype", f"labels_{str(td).replace('torch.', '')}")] = value_case(b, tdtype=td)
    for td in (torch.bool,) + FLOATS:
        T[("dtype", f"onehot_{str(td).replace('torch.', '')}")] = value_case(b, target="onehot", tdtype=td,
                                                                             shape=(2, 3, 5, 6))
    T[("dtype", "out_float64_spacing")] = value_case(b, dtype=F64, spacing=(0.5, 2.0))
    T[("config", "3d_include_background")] = value_case(b, shape=(1, 1, 3, 4, 5), include_background=True)
    T[("classes", "C1_include_background")] = value_case(b, C=1, num_classes=1, include_background=True)
    T[("classes", "C33")] = value_case(b, C=33, num_classes=33, shape=(1, 1, 6, 7))
    T[("size", "spatial1")] = value_case(b, shape=(2, 1, 1, 6))
    T[("size", "empty_batch")] = error_or_value_case(b, ("target",), shape=(0, 1, 5, 6))
    T[("size", "empty_spatial")] = error_or_value_case(b, ("target",), shape=(2, 1, 0, 6))
    T[("nonfinite", "onehot_nan")] = error_case(b, ("target",), target="onehot", tdtype=F32, shape=(2, 3, 5, 6),
                                                values=_set(("target", (0, 1, 1, 1)), float("nan")))
    bad = {"label_out_of_range": ("target", dict(values=_set(("target", (0, 0, 1, 1)), 3))),
           "label_negative": ("target", dict(values=_set(("target", (1, 0, 2, 2)), -1))),
           "labels_without_num_classes": ("num_classes", dict(over={"num_classes": None})),
           "labels_NDHW": ("target", dict(over={"target": torch.randint(0, 3, (2, 3, 5, 6), generator=E.gen(9))})),
           "onehot_num_classes": ("num_classes", dict(target="onehot", shape=(2, 3, 5, 6), over={"num_classes": 4})),
           "no_class_left": ("num_classes", dict(C=1, num_classes=1)),
           "rank6": ("target", dict(over={"target": torch.zeros(1, 1, 2, 2, 2, 2, dtype=torch.long)})),
           "dtype_f16_out": ("dtype", dict(over={"dtype": F16}))}
    for v, (name, kw) in bad.items():
        T[("bad", v)] = error_case(b, (name,), **kw)
    T[("meta", "meta_tensors")] = (lambda bk: E.check_meta(b("cpu"), ("target",)), ("reference",))
    return _cases_for("signed_distance", DT_BACKENDS, T)


# ================================================================================================ losses
def _monai(cls):
    def make(**kw):
        return lambda input, target: getattr(monai_losses, cls)(**kw)(input, target)
    return make


# name: (fastmed function, oracle factory, kwargs for C > 1, kwargs for C = 1 (None: C = 1 is an error),
#        takes a class-weight tensor, softmax-based (a -inf logit masks a class))
LOSSES = {
    "dice_loss": (ops.dice_loss, _monai("DiceLoss"), dict(to_onehot_y=True, softmax=True), dict(sigmoid=True),
                  True, True),
    "generalized_dice_loss": (ops.generalized_dice_loss, _monai("GeneralizedDiceLoss"),
                              dict(to_onehot_y=True, softmax=True), dict(sigmoid=True), False, True),
    "tversky_loss": (ops.tversky_loss, _monai("TverskyLoss"), dict(to_onehot_y=True, softmax=True, alpha=0.3, beta=0.7),
                     dict(sigmoid=True, alpha=0.3), False, True),
    "focal_loss": (ops.focal_loss, _monai("FocalLoss"), dict(to_onehot_y=True, use_softmax=True), dict(), True,
                   False),
    "dice_ce_loss": (ops.dice_ce_loss, _monai("DiceCELoss"), dict(to_onehot_y=True, softmax=True),
                     dict(sigmoid=True), True, True),
    "dice_focal_loss": (ops.dice_focal_loss, _monai("DiceFocalLoss"), dict(to_onehot_y=True, softmax=True),
                        dict(sigmoid=True), False, False),
    "nnunet_dice_ce_loss": (ops.nnunet_dice_ce_loss, lambda **kw: (lambda i, t: E.nnunet_dc_ce(i, t, **kw)), dict(),
                            None, False, True),
}


def loss_call(name, dev, *, dtype=F32, C=3, B=2, spatial=(4, 5), ldtype=torch.int64, weight=False, layouts=None,
              values=None, over=None, seed=7, **call_kw):
    fn_, make_oracle, kw_multi, kw_single, _, _ = LOSSES[name]
    g = E.gen(seed)
    kw = dict(kw_multi if C > 1 or kw_single is None else kw_single)
    raw = {"input": _randn((B, C) + spatial, g, 2.0)}
    lab = torch.randint(0, max(C, 2), (B, 1) + spatial, generator=g)
    raw["target"] = lab.to(ldtype) if C > 1 else lab.double()  # one channel: a binary float target
    if weight:
        raw["weight"] = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    if values:
        values(raw)
    target = raw.pop("target")
    t = _place(raw, dev, dtype, layouts or {}, ("input",))
    t["target"] = lay(target.to(dev), (layouts or {}).get("target"))  # labels keep their dtype
    if "weight" in t:
        t["weight"] = t["weight"].to(torch.float32 if dtype != F64 else F64)
    _apply_over(t, kw, over, dev)

    def fn(t):
        extra = {"weight": t["weight"]} if "weight" in t else {}
        return fn_(t["input"], t["target"], **kw, **extra)

    def oracle(t):
        extra = {"weight": t["weight"]} if "weight" in t else {}
        target = t["target"] if t["target"].is_floating_point() and C == 1 else t["target"].long()
        return make_oracle(**kw, **extra)(t["input"], target)

    od = F32 if "focal" in name else None  # MONAI's focal term computes in float32
    return Call(fn, oracle, t, ("input",), dtype, oracle_dtype=od, **call_kw)


_TRITON_LOSS = {("layout", "input:noncontiguous"), ("layout", "input:channels_last"),
                ("layout", "target:noncontiguous"), ("layout", "weight:expanded"), ("dtype", "float16"),
                ("dtype", "bfloat16"), ("dtype", "labels_uint8"), ("nonfinite", "input_nan"),
                ("nonfinite", "input_neginf_other_class"), ("bad", "label_eq_C"), ("bad", "label_1_plus_1e-9"),
                ("bad", "label_half"), ("double_backward", "create_graph"), ("size", "classification_BC")}


def _other_class_neginf(raw):
    """-inf at one voxel for a class that is not its label (how users mask classes)."""
    lab = int(raw["target"][0, 0, 1, 2])
    raw["input"][0, (lab + 1) % raw["input"].shape[1], 1, 2] = float("-inf")


def loss_cases():
    out = []
    for name, (_, _, _kw_multi, kw_single, has_weight, softmax_based) in LOSSES.items():
        def b(dev, name=name, **kw):
            return loss_call(name, dev, **kw)
        T = {}
        for L in LAYOUTS_ND:
            T[("layout", f"input:{L}")] = value_case(b, layouts={"input": L})
        for L in ("noncontiguous", "expanded", "offset", "permuted", "channels_last"):
            T[("layout", f"target:{L}")] = value_case(b, layouts={"target": L})
        if has_weight:
            for L in LAYOUTS_1D:
                T[("layout", f"weight:{L}")] = value_case(b, weight=True, layouts={"weight": L})
        for dt in FLOATS:
            T[("dtype", DT_NAMES[dt])] = value_case(b, dtype=dt)
        for ld in (torch.int8, torch.int16, torch.int32, torch.uint8, torch.float32, torch.float64):
            T[("dtype", f"labels_{str(ld).replace('torch.', '')}")] = value_case(b, ldtype=ld)
        T[("dtype", "labels_bool")] = error_or_value_case(b, ("target",), C=2, ldtype=torch.bool)
        for C in (1, 2, 33, 105, 200):
            spatial = (3, 4) if C > 33 else (4, 5)
            if C == 1 and kw_single is None:
                T[("classes", f"C{C}")] = error_case(b, ("input",), C=C)
            else:
                T[("classes", f"C{C}")] = value_case(b, C=C, spatial=spatial, B=1 if C > 33 else 2)
        T[("size", "batch1_spatial1x1")] = value_case(b, B=1, spatial=(1, 1))
        T[("size", "3d_spatial1")] = value_case(b, spatial=(1, 3, 1))
        # classification-shaped (B, C) logits with (B, 1) labels: MONAI's value where MONAI accepts them (its
        # GeneralizedDiceLoss fails there; nnU-Net's loss is for images)
        if name in ("generalized_dice_loss", "nnunet_dice_ce_loss"):
            T[("size", "classification_BC")] = error_case(b, ("input",), spatial=())
        else:
            T[("size", "classification_BC")] = value_case(b, spatial=())
        T[("size", "empty_batch")] = error_or_value_case(b, ("input",), B=0)
        T[("size", "empty_spatial")] = error_or_value_case(b, ("input",), spatial=(0, 5))
        T[("nonfinite", "input_nan")] = value_case(b, values=_set(("input", (1, 0, 2, 3)), float("nan")),
                                                   nonfinite=True)
        if softmax_based:
            T[("nonfinite", "input_neginf_other_class")] = value_case(b, values=_other_class_neginf, nonfinite=True)
        T[("nonfinite", "input_posinf")] = value_case(b, values=_set(("input", (0, 1, 0, 0)), float("inf")),
                                                      nonfinite=True)
        bad = {"input_rank2": ("input", dict(over={"input": torch.zeros(2, 3)})),
               "input_int": ("input", dict(over={"input": torch.zeros(2, 3, 4, 5, dtype=torch.long)})),
               "target_spatial": ("target", dict(over={"target": torch.zeros(2, 1, 4, 6, dtype=torch.long)})),
               "target_channels": ("target", dict(over={"target": torch.zeros(2, 2, 4, 5, dtype=torch.long)})),
               "label_eq_C": ("target", dict(values=_set(("target", (1, 0, 3, 4)), 3))),
               "label_negative": ("target", dict(values=_set(("target", (0, 0, 0, 1)), -1))),
               "label_1_plus_1e-9": ("target", dict(ldtype=F64, values=_set(("target", (0, 0, 1, 1)), 1 + 1e-9))),
               "label_half": ("target", dict(ldtype=F32, values=_set(("target", (0, 0, 1, 1)), 0.5))),
               "label_nan": ("target", dict(ldtype=F32, values=_set(("target", (0, 0, 1, 1)), float("nan"))))}
        if name != "nnunet_dice_ce_loss":
            bad["reduction_bogus"] = ("reduction", dict(over={"reduction": "avg"}))
        for v, (arg, kw) in bad.items():
            T[("bad", v)] = error_case(b, (arg,), **kw)
        T.update(standard_checks(b, ("input", "target")))
        out += _cases_for(name, TRITON, T, {k for k in T if k in _TRITON_LOSS or k[0] == "classes"})
    return out


def ds_call(dev, *, dtype=F32, weights=None, target_list=False, module=False, layouts=None, over=None, seed=8,
            **call_kw):
    g = E.gen(seed)
    sizes = [(8, 8), (4, 4), (2, 2)]
    raw = {f"out{i}": _randn((2, 3) + s, g, 2.0) for i, s in enumerate(sizes)}
    raw["target"] = torch.randint(0, 3, (2, 1, 8, 8), generator=g)
    diff = tuple(k for k in raw if k.startswith("out"))
    t = _place(raw, dev, dtype, layouts or {}, diff)
    kw = dict(weights=weights, target_mode="nearest-exact")
    _apply_over(t, kw, over, dev)
    n = len(sizes)

    def targets(t):
        full = t["target"].double()
        return [F.interpolate(full, size=s, mode="nearest-exact").long() for s in sizes]

    def fn(t):
        target = [x.to(t["target"]) for x in targets(t)] if target_list else t["target"]
        outputs = [t[f"out{i}"] for i in range(n)]
        if module:
            return FN.DeepSupervisionLoss(FN.NNUNetDiceCELoss(), kw["weights"], kw["target_mode"])(outputs, target)
        return ops.deep_supervision_loss(FN.NNUNetDiceCELoss(), outputs, target, weights=kw["weights"],
                                         target_mode=kw["target_mode"])

    def oracle(t):
        w = E.nnunet_ds_weights(n) if kw["weights"] is None else kw["weights"]
        return sum(wi * E.nnunet_dc_ce(t[f"out{i}"], tg) for i, (wi, tg) in enumerate(zip(w, targets(t))))

    return Call(fn, oracle, t, diff, dtype, **call_kw)


def deep_supervision_cases():
    b = ds_call
    T = {}
    for L in LAYOUTS_ND:
        T[("layout", f"outputs:{L}")] = value_case(b, layouts={"out0": L, "out1": L})
    for L in ("noncontiguous", "expanded", "channels_last"):
        T[("layout", f"target:{L}")] = value_case(b, layouts={"target": L})
    for dt in FLOATS:
        T[("dtype", DT_NAMES[dt])] = value_case(b, dtype=dt)
    T[("config", "target_list")] = value_case(b, target_list=True)
    T[("config", "custom_weights")] = value_case(b, weights=[0.5, 0.3, 0.2])
    bad = {"weights_negative": ("weights", dict(weights=[1.0, -0.5, 0.0])),
           "weights_len": ("weights", dict(weights=[1.0, 0.5])),
           "weights_all_zero": ("weights", dict(weights=[0.0, 0.0, 0.0])),
           "target_mode_bogus": ("target_mode", dict(over={"target_mode": "bilinear"}))}
    for v, (arg, kw) in bad.items():
        T[("bad", v)] = error_case(b, (arg,), **kw)
    T.update(standard_checks(b, ("outputs", "target"), meta=False, double=False))
    out = _cases_for("deep_supervision_loss", TRITON, T, {("dtype", "float32"), ("layout", "outputs:channels_last")})
    mb = lambda dev, **kw: ds_call(dev, module=True, **kw)  # noqa: E731
    out += _cases_for("DeepSupervisionLoss", TRITON, {
        ("value", "default"): value_case(mb), ("layout", "outputs:noncontiguous"):
            value_case(mb, layouts={"out0": "noncontiguous"}), ("dtype", "float16"): value_case(mb, dtype=F16),
        ("bad", "weights_negative"): error_case(mb, ("weights",), weights=[1.0, -0.5, 0.0]),
        ("grad_mode", "no_grad"): lambda bk: E.check_grad_mode(mb(E.device_of(bk)), bk, "no_grad")}, set())
    for v, n in (("n_2.5", 2.5), ("n_0", 0), ("n_str", "3")):
        out.append(Case("deep_supervision_weights", "bad", v, "none", lambda n=n: _check_ds_weights_error(n)))
    for n in (1, 2, 5):
        out.append(Case("deep_supervision_weights", "value", f"n{n}", "none",
                        lambda n=n: torch.testing.assert_close(ops.deep_supervision_weights(n),
                                                               E.nnunet_ds_weights(n))))
    return out


def _check_ds_weights_error(n):
    with pytest.raises((ValueError, TypeError), match=r"\bn\b"):
        ops.deep_supervision_weights(n)


# ================================================================================================ metrics
def metric_call(name, dev, *, C=3, B=2, spatial=(6, 7), mdtype=F32, include_background=False, ignore_empty=True,
                percentile=None, directed=False, spacing=None, tolerance=1.0, distance_metric="euclidean",
                ignore_index=None, use_subvoxels=False, layouts=None, values=None, over=None, seed=10):
    g = E.gen(seed)
    lab_p = torch.randint(0, max(C, 2), (B, 1) + spatial, generator=g)
    lab_y = torch.where(torch.rand((B, 1) + spatial, generator=g) < 0.7, lab_p,
                        torch.randint(0, max(C, 2), (B, 1) + spatial, generator=g))
    oh = (lambda lab: E.one_hot(lab, C)) if C > 1 else (lambda lab: (lab != 0).double())
    raw = {"y_pred": oh(lab_p).to(mdtype), "y": oh(lab_y).to(mdtype)}
    if values:
        values(raw)
    t = {k: lay(v.to(dev), (layouts or {}).get(k)) for k, v in raw.items()}
    ncls = C if include_background or C == 1 else C - 1
    kw = dict(include_background=include_background, ignore_empty=ignore_empty, percentile=percentile,
              directed=directed, spacing=spacing, tolerance=[tolerance] * ncls, distance_metric=distance_metric,
              ignore_index=ignore_index, use_subvoxels=use_subvoxels)
    _apply_over(t, kw, over, dev)

    def fn(t):
        if name == "dice":
            return metrics.dice(t["y_pred"], t["y"], kw["include_background"], kw["ignore_empty"],
                                ignore_index=kw["ignore_index"])
        if name == "hausdorff_distance":
            return metrics.hausdorff_distance(t["y_pred"], t["y"], kw["include_background"], kw["percentile"],
                                              kw["directed"], kw["spacing"], distance_metric=kw["distance_metric"],
                                              ignore_index=kw["ignore_index"])
        return metrics.surface_dice(t["y_pred"], t["y"], kw["tolerance"], kw["include_background"], kw["spacing"],
                                    distance_metric=kw["distance_metric"], ignore_index=kw["ignore_index"],
                                    use_subvoxels=kw["use_subvoxels"])

    def oracle(t):
        p, y = t["y_pred"].double(), t["y"].double()
        if name == "dice":
            return monai_metrics.compute_dice(p, y, kw["include_background"], kw["ignore_empty"],
                                              ignore_index=kw["ignore_index"])
        if name == "hausdorff_distance":
            return monai_metrics.compute_hausdorff_distance(p, y, kw["include_background"], kw["distance_metric"],
                                                            percentile=kw["percentile"], directed=kw["directed"],
                                                            spacing=kw["spacing"], ignore_index=kw["ignore_index"])
        return monai_metrics.compute_surface_dice(p, y, kw["tolerance"], kw["include_background"],
                                                  kw["distance_metric"], spacing=kw["spacing"],
                                                  use_subvoxels=kw["use_subvoxels"], ignore_index=kw["ignore_index"])

    return Call(fn, oracle, t, (), F32, tol=dict(atol=1e-5, rtol=1e-5))


def _empty_class(which, c, n=0):
    """Class ``c`` of sample ``n`` emptied (its voxels moved to the background) in the one-hot tensors ``which``."""
    def hook(raw):
        for k in which:
            raw[k][n, 0] += raw[k][n, c]
            raw[k][n, c] = 0
    return hook


def metric_cases():
    out = []
    for name in ("dice", "hausdorff_distance", "surface_dice"):
        def b(dev, name=name, **kw):
            return metric_call(name, dev, **kw)
        T = {}
        for L in LAYOUTS_ND:
            T[("layout", f"y_pred:{L}")] = value_case(b, layouts={"y_pred": L})
        for L in ("noncontiguous", "expanded", "channels_last"):
            T[("layout", f"y:{L}")] = value_case(b, layouts={"y": L})
        for md in (torch.bool, torch.uint8, torch.int64, F16, BF16, F64):
            T[("dtype", str(md).replace("torch.", ""))] = value_case(b, mdtype=md)
        for C in (1, 2, 33):
            T[("classes", f"C{C}")] = value_case(b, C=C, spatial=(9, 10) if C == 33 else (6, 7))
            T[("classes", f"C{C}_include_background")] = value_case(b, C=C, include_background=True)
        T[("config", "3d_spacing")] = value_case(b, spatial=(4, 5, 6), spacing=(2.0, 1.0, 0.5))
        T[("config", "spacing_per_sample")] = value_case(b, spacing=[[1.0, 2.0], [0.5, 1.5]])
        if name == "hausdorff_distance":
            T[("config", "percentile95")] = value_case(b, percentile=95)
            T[("config", "percentile95_C1")] = value_case(b, percentile=95, C=1)
            T[("config", "directed")] = value_case(b, directed=True)
        if name == "dice":
            T[("config", "ignore_empty_false")] = value_case(b, ignore_empty=False, values=_empty_class(("y",), 1))
        if name == "surface_dice":
            T[("config", "tolerance_0")] = value_case(b, tolerance=0.0)
            T[("config", "use_subvoxels")] = value_case(b, use_subvoxels=True, spacing=(2.0, 0.5))
            T[("config", "use_subvoxels_3d")] = value_case(b, use_subvoxels=True, spatial=(4, 5, 6))
        for ii in (1, 255):
            T[("config", f"ignore_index_{ii}")] = value_case(b, ignore_index=ii)
        if name != "dice":
            for dm in ("chessboard", "taxicab"):
                T[("config", f"distance_metric_{dm}")] = value_case(b, distance_metric=dm, spacing=(2.0, 1.0))
        T[("size", "pred_empty_class")] = value_case(b, values=_empty_class(("y_pred",), 1))
        T[("size", "both_empty_class")] = value_case(b, values=_empty_class(("y_pred", "y"), 2))
        T[("size", "spatial1")] = value_case(b, spatial=(1, 7))
        T[("size", "batch1")] = value_case(b, B=1)
        bad = {"y_pred_rank3": ("y_pred", dict(over={"y_pred": torch.zeros(2, 3, 6)})),
               "shape_mismatch": (("y_pred", "y"), dict(over={"y": torch.zeros(2, 3, 6, 6)})),
               "y_list": ("y", dict(over={"y": [[0.0]]}))}
        if name == "hausdorff_distance":
            bad["percentile_101"] = ("percentile", dict(over={"percentile": 101}))
        if name == "surface_dice":
            bad["tolerance_len"] = ("tolerance", dict(over={"tolerance": [1.0, 2.0, 3.0]}))
            bad["tolerance_negative"] = ("tolerance", dict(over={"tolerance": [-1.0, 1.0]}))
        if name != "dice":
            bad["spacing_len3"] = ("spacing", dict(over={"spacing": (1.0, 2.0, 3.0)}))
            bad["distance_metric_typo"] = ("distance_metric", dict(distance_metric="manhattan"))
        for v, (arg, kw) in bad.items():
            T[("bad", v)] = error_case(b, arg if isinstance(arg, tuple) else (arg,), **kw)
        T[("grad_mode", "inference_mode")] = lambda bk, b=b: E.check_grad_mode(b("cpu"), bk, "inference_mode")
        T[("meta", "meta_tensors")] = (lambda bk, b=b: E.check_meta(b("cpu"), ("y_pred", "y")), ("reference",))
        out += _cases_for(name, DT_BACKENDS, T)
    return out


# ================================================================================================ fastmed.nn modules
def module_call(make, oracle, inputs: dict, dev, *, dtype=F32, layouts=None, train=True, mutable=(), forward_kw=None,
                values=None, seed=11, lowp=True, **call_kw):
    """A module called through ``functional_call`` with its parameters and buffers as tensors of the case (so they
    can take any layout and dtype, and be compared with clones); parameters are perturbed from their init.
    Modules contain plain torch layers too, so the low-precision rule (``Call.lowp``) applies by default."""
    with E.seeded(seed):
        module = make()
    module.train(train)
    g = E.gen(seed)
    raw = dict(inputs)
    names = []
    for name, p in module.named_parameters():
        raw[name] = p.detach().double() + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64)
        names.append(name)
    params = set(names)
    for name, buf in module.named_buffers():
        raw[name] = buf.detach().double() if buf.is_floating_point() else buf.detach().clone()
        names.append(name)
        if train and name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            mutable = tuple(mutable) + (name,)  # batch norm in training updates them, as documented
    if values:
        values(raw)
    diff = tuple(k for k in raw if raw[k].is_floating_point() and (k in inputs or k in params))
    t = _place(raw, dev, dtype, layouts or {}, diff)
    module.to(dev)

    def fn(t):
        return functional_call(module, {k: t[k] for k in names}, tuple(t[k] for k in inputs), forward_kw or {})

    return Call(fn, oracle, t, diff, dtype, mutable=mutable, lowp=lowp, **call_kw)


def _inorm(x, t, prefix):
    return F.instance_norm(x, weight=t.get(prefix + "weight"), bias=t.get(prefix + "bias"), eps=1e-5)


def _conv_block(x, t, prefix, stride=1, act=True, padding=None):
    w = t[prefix + "conv.weight"]
    pad = (w.shape[-1] - 1) // 2 if padding is None else padding
    z = _inorm(F.conv2d(x, w, t.get(prefix + "conv.bias"), stride, pad), t, prefix + "norm.")
    return F.leaky_relu(z, 0.01) if act else z


def _bn_oracle(t, train):
    if train:
        t["num_batches_tracked"] += 1
    z = F.batch_norm(t["x"], t["running_mean"], t["running_var"], t["weight"], t["bias"], train, 0.1, 1e-5)
    return F.leaky_relu(z, 0.01)


def _swin_oracle(dim, heads, window, shift):
    def oracle(t):
        with E.seeded(0):
            block = monai_swin.SwinTransformerBlock(dim, heads, window, shift).double()
        x = t["x"]
        grid = tuple(x.shape[1:-1])
        win, sh = monai_swin.get_window_size(grid, window, shift)
        padded = [math.ceil(s / w) * w for s, w in zip(grid, win)]
        mask = monai_swin.compute_mask(padded, win, sh, x.device)
        params = {k: v for k, v in t.items() if k != "x"}
        return functional_call(block, params, (x, mask))
    return oracle


def _window_attention_oracle(window, shift):
    def oracle(t):
        qkv = F.linear(t["x"], t["qkv.weight"], t["qkv.bias"])
        heads = t["relative_position_bias_table"].shape[1]
        out = E.window_attention_oracle(qkv, heads, window, shift, t["relative_position_bias_table"], None,
                                        t["qkv.bias"], "monai")
        return F.linear(out, t["proj.weight"], t["proj.bias"])
    return oracle


def _pixel_shuffle(x, p):
    B, H, W, C = x.shape
    return x.reshape(B, H, W, p, p, C // (p * p)).permute(0, 1, 3, 2, 4, 5).reshape(B, H * p, W * p, C // (p * p))


def _expand_oracle(p):
    def oracle(t):
        y = _pixel_shuffle(F.linear(t["x"], t["expand.weight"]), p)
        return F.layer_norm(y, y.shape[-1:], t["norm.weight"], t["norm.bias"])
    return oracle


def _merging_oracle(sd, mode):
    def oracle(t):
        cls = monai_swin.PatchMerging if (sd == 3 and mode == "merging") else monai_swin.PatchMergingV2
        with E.seeded(0):
            m = cls(t["x"].shape[-1], spatial_dims=sd).double()
        return functional_call(m, {k: v for k, v in t.items() if k != "x"}, (t["x"],))
    return oracle


def _x(shape, seed=12, scale=1.0):
    return {"x": _randn(shape, E.gen(seed), scale)}


def _labels(shape, C, seed=13):
    return torch.randint(0, C, shape, generator=E.gen(seed))


def _boundary_oracle(t):
    C = t["x"].shape[1]
    phi = E.kervadec(E.one_hot(t["target"], C)[:, 1:] != 0)
    return (torch.softmax(t["x"], 1)[:, 1:] * phi).mean()


def _hausdorff_dt_oracle(t):
    return monai_losses.HausdorffDTLoss(include_background=False, to_onehot_y=True, softmax=True)(
        t["x"], t["target"].long())


# name: (constructor, oracle, inputs, module options, layouts to try, runs on Triton)
MODULES = {
    "InstanceNormAct": (lambda: FN.InstanceNormAct(4),
                        lambda t: F.leaky_relu(_inorm(t["x"], t, ""), 0.01), _x((2, 4, 3, 5)), {}, True),
    "GroupNormAct_gelu": (lambda: FN.GroupNormAct(2, 4, activation="gelu"),
                          lambda t: F.gelu(F.group_norm(t["x"], 2, t["weight"], t["bias"], 1e-5)),
                          _x((2, 4, 3, 5)), {}, False),
    "BatchNormAct_train": (lambda: FN.BatchNormAct(4), lambda t: _bn_oracle(t, True), _x((3, 4, 2, 3)), {}, True),
    "BatchNormAct_eval": (lambda: FN.BatchNormAct(4), lambda t: _bn_oracle(t, False), _x((3, 4, 2, 3)),
                          dict(train=False), False),
    "NormAct_prelu": (lambda: FN.NormAct("instance", 4, activation="prelu"),
                      lambda t: F.prelu(_inorm(t["x"], t, ""), t["act_weight"]), _x((2, 4, 3, 5)), {}, False),
    "ConvNormAct": (lambda: FN.ConvNormAct(2, 3, 4), lambda t: _conv_block(t["x"], t, ""), _x((2, 3, 5, 6)), {},
                    True),
    "ResidualBlock": (lambda: FN.ResidualBlock(2, 3, 4, stride=2),
                      lambda t: F.leaky_relu(_conv_block(_conv_block(t["x"], t, "conv1.", 2), t, "conv2.", act=False)
                                             + _conv_block(F.avg_pool2d(t["x"], 2, 2), t, "skip.1.", act=False), 0.01),
                      _x((2, 3, 6, 4)), {}, True),
    "UpBlock": (lambda: FN.UpBlock(2, 4, 2, 3),
                lambda t: _conv_block(_conv_block(torch.cat([F.conv_transpose2d(
                    t["x"], t["transpconv.weight"], t["transpconv.bias"], 2), t["skip"]], 1), t, "convs.0."), t,
                    "convs.1."),
                {"x": _randn((2, 4, 3, 3), E.gen(14)), "skip": _randn((2, 2, 6, 6), E.gen(15))}, {}, False),
    "WindowAttention": (lambda: FN.WindowAttention(8, 2, (2, 2)), _window_attention_oracle((2, 2), (1, 1)),
                        _x((1, 3, 4, 8)), dict(forward_kw={"shift_size": 1}), True),
    "SwinTransformerBlock": (lambda: FN.SwinTransformerBlock(8, 2, (2, 2), (1, 1)),
                             _swin_oracle(8, 2, (2, 2), (1, 1)), _x((1, 3, 4, 8)), {}, True),
    "SwinTransformerBlock_3d": (lambda: FN.SwinTransformerBlock(8, 2, (2, 2, 2), (1, 1, 1)),
                                _swin_oracle(8, 2, (2, 2, 2), (1, 1, 1)), _x((1, 2, 4, 3, 8)), {}, False),
    "Mlp": (lambda: FN.Mlp(8, 16),
            lambda t: F.linear(F.gelu(F.linear(t["x"], t["linear1.weight"], t["linear1.bias"])), t["linear2.weight"],
                               t["linear2.bias"]), _x((2, 3, 8)), {}, False),
    "PatchMerging_2d": (lambda: FN.PatchMerging(8, spatial_dims=2), _merging_oracle(2, "merging"), _x((2, 3, 5, 8)),
                        {}, False),
    "PatchMerging_3d": (lambda: FN.PatchMerging(4, spatial_dims=3), _merging_oracle(3, "merging"),
                        _x((1, 3, 4, 5, 4)), {}, False),
    "PatchMerging_3d_v2": (lambda: FN.PatchMerging(4, spatial_dims=3, mode="mergingv2"),
                           _merging_oracle(3, "mergingv2"), _x((1, 2, 4, 3, 4)), {}, False),
    "PatchExpand": (lambda: FN.PatchExpand(8), _expand_oracle(2), _x((2, 3, 4, 8)), {}, False),
    "FinalPatchExpandX4": (lambda: FN.FinalPatchExpandX4(4), _expand_oracle(4), _x((1, 2, 3, 4)), {}, False),
    "BoundaryLoss": (lambda: FN.BoundaryLoss(include_background=False, to_onehot_y=True, softmax=True),
                     _boundary_oracle,
                     {"x": _randn((2, 3, 6, 7), E.gen(16), 2.0), "target": _labels((2, 1, 6, 7), 3)}, {}, False),
    "HausdorffDTLoss": (lambda: FN.HausdorffDTLoss(to_onehot_y=True, softmax=True), _hausdorff_dt_oracle,
                        {"x": _randn((2, 3, 6, 7), E.gen(17), 2.0), "target": _labels((2, 1, 6, 7), 3)}, {}, False),
}
_LOSS_MODULES = {"DiceLoss": "dice_loss", "GeneralizedDiceLoss": "generalized_dice_loss",
                 "TverskyLoss": "tversky_loss", "FocalLoss": "focal_loss", "DiceCELoss": "dice_ce_loss",
                 "DiceFocalLoss": "dice_focal_loss"}
for _cls, _fn in _LOSS_MODULES.items():
    _kw = dict(LOSSES[_fn][2])
    MODULES[_cls] = ((lambda c=_cls, k=_kw: getattr(FN, c)(**k)),
                     (lambda t, c=_cls, k=_kw: getattr(monai_losses, c)(**k)(t["x"], t["target"].long())),
                     {"x": _randn((2, 3, 4, 5), E.gen(18), 2.0), "target": _labels((2, 1, 4, 5), 3)},
                     dict(oracle_dtype=F32) if "Focal" in _cls else {}, False)
MODULES["NNUNetDiceCELoss"] = (lambda: FN.NNUNetDiceCELoss(), lambda t: E.nnunet_dc_ce(t["x"], t["target"]),
                               {"x": _randn((2, 3, 4, 5), E.gen(19), 2.0), "target": _labels((2, 1, 4, 5), 3)}, {},
                               False)


# Modules that validate their input themselves (the others fail inside torch's own layers, as MONAI's do).
_VALIDATING = ("InstanceNormAct", "GroupNormAct_gelu", "BatchNormAct_train", "BatchNormAct_eval", "NormAct_prelu",
               "ConvNormAct", "ResidualBlock", "WindowAttention", "PatchMerging_2d", "PatchMerging_3d",
               "PatchMerging_3d_v2", "PatchExpand", "FinalPatchExpandX4")
# What each module runs on the Triton backend (the ops' own cases cover the kernels; these check the wiring).
_MODULE_TRITON = {
    "InstanceNormAct": {("inplace_output", "mul_")},
    "BatchNormAct_train": {("value", "default")},
    "ConvNormAct": {("value", "default"), ("layout", "params:noncontiguous")},
    "ResidualBlock": {("inplace_output", "mul_")},
    "WindowAttention": {("value", "default")},
    "SwinTransformerBlock": {("value", "default")},
}


def _module_bad_input(name, backend):
    """Wrong channels (or a missing spatial dim for the losses): a clear error, and no state changed."""
    make, _, inputs, opts, _ = MODULES[name]
    bad = dict(inputs)
    x = inputs["x"]
    bad["x"] = x[..., :3] if name.startswith(("Window", "Patch", "Final")) else x[:, :1]
    call = module_call(make, None, bad, E.device_of(backend), **opts)
    E.check_error(call, backend, ("x", "input", "weight", "num_channels", "dim"))


def module_cases():
    out = []
    for name, (make, oracle, inputs, opts, _) in MODULES.items():
        def b(dev, make=make, oracle=oracle, inputs=inputs, opts=opts, **kw):
            return module_call(make, oracle, inputs, dev, **{**opts, **kw})
        T = {("value", "default"): value_case(b)}
        token_grid = name.startswith(("Swin", "Window", "Patch", "Final", "Mlp"))
        for L in ["noncontiguous", "expanded", "permuted"] + ([] if token_grid else ["channels_last"]):
            T[("layout", f"x:{L}")] = value_case(b, layouts={"x": L})
        params = [k for k, _ in make().named_parameters()]
        if params:
            for L in ("noncontiguous", "expanded"):
                T[("layout", f"params:{L}")] = value_case(b, layouts={k: L for k in params})
        if not name.endswith("Loss"):
            for dt in (F16, BF16, F64):  # module.to(dtype); torch layers inside: the low-precision rule applies
                T[("dtype", DT_NAMES[dt])] = value_case(b, dtype=dt)
        if name in _VALIDATING:
            T[("bad", "wrong_channels")] = lambda bk, name=name: _module_bad_input(name, bk)
        T.update(standard_checks(b, ("x", "input") + tuple(params), double=not name.endswith("Loss"),
                                 inplace=name in ("InstanceNormAct", "ConvNormAct", "ResidualBlock", "UpBlock")))
        out += _cases_for(name, TRITON, T, _MODULE_TRITON.get(name, set()))
    out += _misc_nn_cases()
    return out


def _misc_nn_cases():
    def drop_path_eval(bk):
        x = torch.randn(3, 4, 5)
        m = FN.DropPath(0.5).eval()
        assert torch.equal(m(x), x)

    def drop_path_train(bk):
        x = torch.randn(64, 2, 3)
        with E.seeded(0):
            y = FN.DropPath(0.25).train()(x)
        kept = (y != 0).flatten(1).all(1)
        assert torch.equal(y[kept], x[kept] / 0.75) and bool((y[~kept] == 0).all()) and 0 < int(kept.sum()) < 64

    def drop_path_bad(bk):
        with pytest.raises(ValueError, match="drop_prob"):
            FN.DropPath(1.0)

    def boundary_weights(bk):
        assert FN.boundary_loss_weights(0) == (1.0, 0.01)
        r, w = FN.boundary_loss_weights(200)
        assert r == 0.1 and abs(w - 2.01) < 1e-12
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="epoch"):
                FN.boundary_loss_weights(bad)

    def convert_monai_block(bk):
        from monai.networks.blocks import Convolution
        with E.seeded(0):
            src = Convolution(2, 3, 4, kernel_size=3, norm=("instance", {"affine": True}), act=("leakyrelu", {}))
            dst = FN.ConvNormAct(2, 3, 4)
        dst.load_state_dict(FN.convert_monai_state_dict(src.state_dict(), "convolution"))
        x = torch.randn(2, 3, 5, 6)
        with fastmed.use_backend(bk):
            E.assert_close(dst(x), src(x), E.TOL[F32], "ConvNormAct with MONAI Convolution weights")
        with pytest.raises(ValueError, match="block"):
            FN.convert_monai_state_dict(src.state_dict(), "unet")

    table = {("value", "DropPath_eval"): drop_path_eval, ("value", "DropPath_train"): drop_path_train,
             ("bad", "DropPath_p1"): drop_path_bad, ("value", "boundary_loss_weights"): boundary_weights,
             ("value", "convert_monai_state_dict"): convert_monai_block}
    return _cases_for("nn", ("reference",), table)


# ======================================================================================== models, convert, patch
def _unfused_oracle(make_unfused):
    def oracle(t):
        with E.seeded(0):
            model = make_unfused().double()
        return functional_call(model, {k: v for k, v in t.items() if k != "x"}, (t["x"],))
    return oracle


def _monai_attention_unet_oracle(t):
    from monai.networks.nets import AttentionUnet
    with E.seeded(0):
        ref = AttentionUnet(2, 1, 2, channels=(4, 8), strides=(2,)).double().train()
    keys = list(ref.state_dict())
    index = fastmed.convert.from_monai_attention_unet({k: torch.tensor(float(i)) for i, k in enumerate(keys)})
    params = {keys[int(v)]: t[k] for k, v in index.items() if k in t}
    return functional_call(ref, params, (t["x"],))


def _monai_unet_oracle(t):
    from monai.networks.nets import UNet as MonaiRef
    with E.seeded(0):
        ref = MonaiRef(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1).double().train()
    return functional_call(ref, {k: v for k, v in t.items() if k != "x"}, (t["x"],))


MODELS = {
    "UNet": (lambda fused=True: fastmed.models.UNet(2, 1, 3, features=(4, 8), strides=(1, 2), fused=fused),
             (2, 1, 8, 8)),
    "UNet_resenc_deep_supervision_head0": (
        lambda fused=True: _Head0(fastmed.models.UNet(2, 2, 2, features=(4, 8), strides=(1, 2), residual=True,
                                                      deep_supervision=True, fused=fused)), (1, 2, 8, 8)),
    "SwinUNet": (lambda fused=True: fastmed.models.SwinUNet(2, 1, 2, img_size=8, patch_size=4, embed_dim=8,
                                                            depths=(2, 2), num_heads=(2, 2), window_size=2,
                                                            drop_path_rate=0.0, fused=fused), (1, 1, 8, 8)),
    "ViT": (lambda fused=True: fastmed.models.ViT(2, img_size=8, patch_size=4, in_channels=1, num_classes=3,
                                                  embed_dim=8, depth=1, num_heads=2, fused=fused), (2, 1, 8, 8)),
    # 2 input channels: with 1, encoder1's residual norm3(conv3(x)) ignores conv3's weight (zero gradient); 56 x 40
    # is padded to 64 x 64: a 2 x 2 bottleneck (instance norm over 2 voxels would amplify rounding beyond 1e-4)
    "SwinUNETR": (lambda fused=True: fastmed.models.SwinUNETR(2, 2, spatial_dims=2, feature_size=12,
                                                              depths=(2, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                                              window_size=4, fused=fused), (1, 2, 56, 40)),
    "UNETR": (lambda fused=True: fastmed.models.UNETR(2, 2, 16, spatial_dims=2, feature_size=2, hidden_size=8,
                                                      mlp_dim=8, num_heads=2, fused=fused), (1, 2, 16, 16)),
    "TransUNet": (lambda fused=True: fastmed.models.TransUNet(img_size=32, num_classes=2, hidden_size=8, mlp_dim=8,
                                                              num_heads=2, num_layers=1, block_units=(1, 1, 1),
                                                              width=32, skip_channels=(256, 128, 32, 16),
                                                              dropout=0.0, fused=fused), (2, 3, 32, 32)),
    "UNetPlusPlus_deep_supervision_head0": (
        lambda fused=True: _Head0(fastmed.models.UNetPlusPlus(2, 1, 2, features=(2, 4), deep_supervision=True,
                                                              fused=fused)), (2, 1, 8, 8)),
}


class _Head0(nn.Module):
    """The full-resolution head of a deep-supervision model (its output list, first entry)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def model_cases():
    T = {}
    for name, (make, shape) in MODELS.items():
        def b(dev, make=make, shape=shape, **kw):
            return module_call(make, _unfused_oracle(lambda: make(fused=False)), _x(shape, 20), dev, **kw)
        T[("value", f"{name}")] = value_case(b)
        T[("layout", f"{name}:x_channels_last")] = value_case(b, layouts={"x": "channels_last"})
        T[("grad_mode", f"{name}:no_grad")] = lambda bk, b=b: E.check_grad_mode(b("cpu"), bk, "no_grad")
        T[("bad", f"{name}:wrong_channels")] = (
            lambda bk, make=make, shape=shape: E.check_error(module_call(
                make, None, _x((shape[0], shape[1] + 1) + shape[2:]), "cpu"), bk, ("x", "in_channels")))
    T[("value", "AttentionUNet_vs_monai")] = value_case(
        lambda dev, **kw: module_call(lambda: fastmed.models.AttentionUNet(2, 1, 2, channels=(4, 8), strides=(2,)),
                                      _monai_attention_unet_oracle, _x((2, 1, 8, 8), 21), dev, **kw))
    T[("value", "MonaiUNet_vs_monai")] = value_case(
        lambda dev, **kw: module_call(lambda: fastmed.models.MonaiUNet(2, 1, 2, channels=(4, 8), strides=(2,),
                                                                       num_res_units=1),
                                      _monai_unet_oracle, _x((2, 1, 8, 8), 22), dev, **kw))
    return _cases_for("models", ("reference",), T)


def _check_raises(fn, types, pattern):
    with pytest.raises(types) as info:
        fn()
    assert re.search(pattern, str(info.value)), f"the error does not say {pattern!r}: {info.value}"


def _check_same_state(got, want):
    """A whole nnU-Net checkpoint converts like its ``network_weights`` entry (issue 13 accepts both)."""
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), (list(got), list(want))


def convert_cases():
    from fastmed.convert import from_monai_unet, from_nnunet, to_nnunet
    w = torch.zeros(2)
    table = {
        ("bad", "nnunet_seg_layers_key"): lambda bk: _check_raises(
            lambda: from_nnunet({"encoder.stages.0.weight": w, "decoder.seg_layers.final.weight": w}), ValueError,
            r"seg_layers"),
        ("value", "nnunet_whole_checkpoint"): lambda bk: _check_same_state(
            from_nnunet({"network_weights": {"encoder.stages.0.0.convs.0.conv.weight": w}, "optimizer_state": {},
                         "init_args": {}}),
            from_nnunet({"encoder.stages.0.0.convs.0.conv.weight": w})),
        ("bad", "nnunet_not_a_mapping"): lambda bk: _check_raises(lambda: from_nnunet([w]), TypeError, r"state_dict"),
        ("bad", "monai_unet_module_prefix"): lambda bk: _check_raises(
            lambda: from_monai_unet({"module.model.0.conv.weight": w}), ValueError, r"module\."),
        ("value", "nnunet_keys_kept"): lambda bk: _nnunet_keys(),
        ("bad", "to_nnunet_not_a_mapping"): lambda bk: _check_raises(lambda: to_nnunet([w]), TypeError, r"state_dict"),
        ("value", "to_nnunet_input_unchanged"): lambda bk: _to_nnunet_keys(),
    }
    return _cases_for("convert", ("reference",), table)


def _nnunet_keys():
    sd = {"encoder.stages.0.0.convs.0.conv.weight": torch.ones(1), "decoder.seg_layers.0.weight": torch.ones(2),
          "decoder.seg_layers.1.weight": torch.full((2,), 2.0), "decoder.encoder.stages.0.x": torch.ones(1),
          "encoder.stages.0.0.convs.0.all_modules.0.weight": torch.ones(1)}
    snap = {k: v.clone() for k, v in sd.items()}
    out = fastmed.convert.from_nnunet(sd, deep_supervision=False)
    assert sorted(out) == ["decoder.seg_layers.0.weight", "encoder.stages.0.0.convs.0.conv.weight"]
    assert torch.equal(out["decoder.seg_layers.0.weight"], torch.full((2,), 2.0))
    assert all(torch.equal(sd[k], snap[k]) for k in snap) and sorted(sd) == sorted(snap)


def _to_nnunet_keys():
    sd = {"encoder.stages.0.0.convs.0.conv.weight": torch.ones(1), "decoder.stages.0.convs.0.norm.bias": torch.ones(2),
          "decoder.seg_layers.0.weight": torch.ones(2)}
    snap = {k: v.clone() for k, v in sd.items()}
    out = fastmed.convert.to_nnunet(sd)
    assert sorted(out) == sorted(list(sd) + ["encoder.stages.0.0.convs.0.all_modules.0.weight",
                                             "decoder.encoder.stages.0.0.convs.0.conv.weight",
                                             "decoder.encoder.stages.0.0.convs.0.all_modules.0.weight",
                                             "decoder.stages.0.convs.0.all_modules.1.bias"]), sorted(out)
    assert all(torch.equal(sd[k], snap[k]) for k in snap) and sorted(sd) == sorted(snap)


def _patched_sequential():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.LeakyReLU(0.1))
    report = fastmed.patch(model)
    assert len(report.replaced) == 1, str(report)
    return model


def _patched_oracle(t):
    with E.seeded(0):
        ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True),
                            nn.LeakyReLU(0.1)).double()
    return functional_call(ref, {k: v for k, v in t.items() if k != "x"}, (t["x"],))


def _swin_dropout_after_train(kind):
    """Patched in eval mode with attention dropout, then .train(): the dropout must act as in the original."""
    def run(bk):
        torch.manual_seed(0)
        if kind == "monai":
            ref = nn.Sequential(monai_swin.SwinTransformerBlock(8, 2, (2, 2), (0, 0), attn_drop=0.5))
        else:
            from test_patch import TimmBlock
            ref = nn.Sequential(TimmBlock(8, (4, 4), 2, (2, 2), (0, 0)))
            ref[0].attn.attn_drop.p = 0.5
        ref.eval()
        model = copy.deepcopy(ref)
        fastmed.patch(model)
        model.train()
        ref.train()
        x = torch.randn(2, 4, 4, 8)
        with fastmed.use_backend(bk):
            with E.seeded(3):
                want = ref(x) if kind != "monai" else ref[0](x, None)
            with E.seeded(3):
                got = model(x) if kind != "monai" else model[0](x, None)
        E.assert_close(got, want, E.TOL[F32], "train-mode output with attention dropout")
    return run


def patch_cases():
    def b(dev, **kw):
        return module_call(_patched_sequential, _patched_oracle, _x((2, 3, 5, 6), 23), dev, **kw)
    T = {("value", "conv_in_lrelu"): (value_case(b), TRITON),
         ("layout", "x_channels_last"): value_case(b, layouts={"x": "channels_last"}),
         ("inplace_output", "mul_"): (lambda bk: check_inplace_output(b(E.device_of(bk)), bk), TRITON),
         ("bad", "not_a_module"): lambda bk: _check_raises(lambda: fastmed.patch(lambda x: x), TypeError, r"model"),
         ("config", "monai_swin_eval_then_train_attn_drop"): _swin_dropout_after_train("monai"),
         ("config", "timm_swin_eval_then_train_attn_drop"): _swin_dropout_after_train("timm")}
    return _cases_for("patch", ("reference",), T)


def _sw_check(bk, *, shape=(1, 2, 9, 7), roi=(4, 5), dtype=F64, layout=None, output="values", nan=False,
              overlap=0.5, mode="gaussian"):
    """``fastmed.inference.sliding_window_inference`` against MONAI's on float64 (or its argmax), inputs
    untouched, two runs bit-equal."""
    from monai.inferers import sliding_window_inference as monai_swi

    from fastmed.inference import sliding_window_inference

    mix = _randn((3, shape[1]), E.gen(41))
    maps = {}

    def net(w):  # a 1x1 channel mix plus a fixed map of the window's shape: overlapping windows disagree
        key = tuple(w.shape[2:])
        maps.setdefault(key, _randn((3,) + key, E.gen(42)))
        return torch.einsum("kc...,oc->ko...", w, mix.to(w)) + maps[key].to(w)

    x64 = _randn(shape, E.gen(43))
    if nan:
        x64.view(-1)[5] = math.nan
    x = lay(x64.to(E.device_of(bk), dtype), layout)
    snap = x.clone()
    with torch.no_grad(), fastmed.use_backend(bk):
        got = sliding_window_inference(x, roi, 3, net, overlap, mode, output=output)
        again = sliding_window_inference(x, roi, 3, net, overlap, mode, output=output)
        want = monai_swi(x64, roi, 3, net, overlap, mode)
    assert torch.equal(x.isnan(), snap.isnan()) and torch.equal(x.nan_to_num(), snap.nan_to_num()), "input modified"
    E.assert_bit_equal(got, again, "output")
    if output == "labels":
        assert got.dtype == torch.uint8 and torch.equal(got.cpu().long(), want.argmax(1, keepdim=True))
    else:
        assert got.dtype == dtype
        E.assert_close(got, want, E.TOL[dtype], "output")


def sliding_window_cases():
    from fastmed.inference import sliding_window_inference

    def bad(pattern, types=ValueError, **kw):
        args = dict(inputs=torch.zeros(1, 1, 6, 6), roi_size=(4, 4), sw_batch_size=1, predictor=lambda w: w)
        args.update(kw)
        return lambda bk: _check_raises(lambda: sliding_window_inference(*[args.pop(k) for k in (
            "inputs", "roi_size", "sw_batch_size", "predictor")], **args), types, pattern)

    T = {("value", "monai_2d_gaussian"): (lambda bk: _sw_check(bk), TRITON),
         ("config", "labels_3d"): (lambda bk: _sw_check(bk, shape=(2, 1, 7, 6, 5), roi=(4, 3, 4),
                                                         output="labels"), TRITON),
         ("config", "roi_larger_than_image_constant"): lambda bk: _sw_check(bk, roi=(12, 4), mode="constant"),
         ("config", "overlap_0_1d"): lambda bk: _sw_check(bk, shape=(1, 1, 17), roi=(5,), overlap=0.0),
         ("layout", "x_noncontiguous"): lambda bk: _sw_check(bk, layout="noncontiguous"),
         ("layout", "x_channels_last"): lambda bk: _sw_check(bk, shape=(1, 2, 6, 7, 5), roi=(4, 4, 4),
                                                             layout="channels_last"),
         ("dtype", "float32"): lambda bk: _sw_check(bk, dtype=F32),
         ("dtype", "float16"): lambda bk: _sw_check(bk, dtype=F16),
         ("size", "size1_axis"): lambda bk: _sw_check(bk, shape=(1, 1, 1, 9), roi=(1, 4)),
         ("nonfinite", "nan_input"): lambda bk: _sw_check(bk, nan=True),
         ("bad", "overlap_1"): bad(r"overlap", overlap=1.0),
         ("bad", "roi_rank"): bad(r"roi_size", roi_size=(4, 4, 4)),
         ("bad", "int_inputs"): bad(r"inputs", TypeError, inputs=torch.zeros(1, 1, 6, 6, dtype=torch.int32)),
         ("bad", "labels_one_channel"): bad(r"labels", output="labels")}
    return _cases_for("sliding_window", ("reference",), T)


CASES = (norm_act_cases() + conv_cases() + window_attention_cases() + attention_cases() + distance_transform_cases()
         + signed_distance_cases() + loss_cases() + deep_supervision_cases() + metric_cases() + module_cases()
         + model_cases() + convert_cases() + patch_cases() + sliding_window_cases() + sam_attention_cases())


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one intra-op thread is several times faster


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_edge(case):
    case.run()
