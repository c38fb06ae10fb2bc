"""No host synchronization in the forward or backward of any op on CUDA tensors (issue 11).

(a) A static check, run everywhere: the op code (``fastmed/ops/*.py``, ``kernels/*.py``, the modules wrapping the
    ops in ``fastmed/nn/*.py``, and ``fastmed/_validate.py``, ``_backend.py``, ``_tensors.py`` that every op call
    runs; not ``fastmed/reference``, which ``auto`` runs for CPU tensors, nor ``fastmed/models``, whose
    ``fused=False`` paths are plain PyTorch) is parsed with ``ast`` and every construct that reads a device value
    on the host or copies host data to the device is reported:
      ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``                       reads back a value
      ``bool(t)`` / ``int(t)`` / ``float(t)`` and ``if t:`` of a tensor          reads back a value (where the
                                                                                argument is decidably a tensor)
      ``.nonzero()``, ``torch.unique``, ``masked_select``, ``synchronize()``     wait for the device
      ``torch.tensor(..., device=)``, ``.cuda()``, ``.to(<a device>)``           host-to-device copies
    Code that only runs on the way to an error (inside ``raise``, or an ``if`` whose body ends in ``raise``; its
    test is still checked), code that only runs for CPU tensors (the body of ``if x.device.type == "cpu":``, and
    what follows ``if x.device.type != "cpu": ... return``) and ``@triton.jit`` device code are not reported.
    What remains must be on the allow-list ``ALLOWED``, each entry with the reason it is not on the CUDA hot path;
    an entry that no longer matches anything fails, so the list shrinks as the code is fixed.  Input checks that
    need a device value (label ranges, binary masks, class weights) run on the host for CPU tensors only and are
    device-side asserts (``torch._assert_async``) for the others.
(b) ``test_ops_do_not_sync_on_cuda`` (GPU only): every op, forward and backward, on CUDA tensors under
    ``torch.cuda.set_sync_debug_mode("error")``, after one unguarded warm-up call (Triton compilation and the
    per-configuration caches).
"""
from __future__ import annotations

import ast
import glob
import os
from typing import NamedTuple, Optional

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("fastmed/ops/*.py", "kernels/*.py", "fastmed/nn/*.py", "fastmed/_validate.py", "fastmed/_backend.py",
           "fastmed/_tensors.py")

READBACK_METHODS = {"item": "item", "tolist": "tolist", "cpu": "cpu", "numpy": "numpy"}
SYNC_METHODS = {"nonzero", "unique", "masked_select", "synchronize", "unique_consecutive"}
# methods whose result is a tensor when called on a tensor (a tensor receiver makes the result a tensor too)
REDUCTIONS = {"any", "all", "sum", "min", "max", "mean", "amax", "amin", "prod", "count_nonzero", "norm", "std",
              "var", "abs", "floor", "ceil", "isnan", "isinf", "isfinite", "eq", "ne", "lt", "gt", "le", "ge"}
NOT_TENSOR_METHODS = {"size", "dim", "numel", "stride", "element_size", "is_contiguous", "is_floating_point",
                      "data_ptr", "nelement", "ndimension", "get_device", "storage_offset", "is_complex",
                      "tolist", "item", "untyped_storage"}
NOT_TENSOR_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "names", "is_leaf",
                    "type", "is_meta", "is_sparse"}
NOT_TENSOR_TORCH = {"Size", "finfo", "iinfo", "device", "dtype", "is_tensor", "is_floating_point", "is_complex",
                    "get_default_dtype", "compiler", "library", "ops", "cuda", "backends", "numel", "is_grad_enabled",
                    "jit", "promote_types", "result_type", "can_cast", "get_num_threads", "is_nonzero"}
HOST_MODULES = {"math", "np", "numpy", "statistics", "builtins", "operator"}
H2D_FACTORIES = {"tensor", "as_tensor", "from_numpy", "asarray", "scalar_tensor"}


class Finding(NamedTuple):
    path: str      # relative to the repository root
    function: str  # qualified name of the enclosing function
    kind: str      # item, tolist, cpu, numpy, host-scalar, implicit-bool, sync, h2d
    line: int
    code: str


# why it is not a synchronization on the CUDA hot path -> the (path, function, kind) it covers.  Keep it short and
# specific; one reason covers every key it explains.
ALLOWED_BY_REASON = {
    "lru_cache'd per (kernel, stride, dilation, device): the tap tables are copied once per configuration, not per "
    "call (issue 11 item 4)": [("kernels/conv_block.py", "_class_taps_cached", "h2d")],
    "under torch.compile only (a traced graph may not capture a cached real tensor); eager calls use the cache":
        [("kernels/conv_block.py", "class_taps", "h2d")],
    "a 0-d alpha given as a tensor is read once as a Python number, like MONAI; a float alpha (the common case) "
    "involves no tensor": [("fastmed/ops/losses.py", "_focal_alpha", "host-scalar")],
    "reduction='none' only: the per-voxel output of FocalLoss / DiceFocalLoss is MONAI's plain-PyTorch composition, "
    "not the fused path, and its integer labels are checked there":
        [("fastmed/ops/losses.py", "_dense", "host-scalar")],
    "the caller's precomputed distance maps moved to the logits' device: no copy when they already live there (the "
    "documented use); a copy only for maps the caller keeps on the host":
        [("fastmed/nn/boundary_losses.py", "BoundaryLoss.forward", "h2d")],
    "no copy for the modules' class weights and focal alpha (buffers already on the device); only weights the caller "
    "passes as a list/CPU tensor to the functional API are copied, per call, as MONAI does (documented)":
        [("fastmed/ops/losses.py", "_weights_like", "h2d")],
    "a buffer created once in the constructor, not per call": [("fastmed/nn/norm_act.py", "NormAct.__init__", "h2d")],
    "fused=False only (the plain-PyTorch composition fastmed is compared with), not fastmed's op path":
        [("fastmed/nn/swin.py", "WindowAttention._eager", "h2d")],
    "a one-off warm-up before timing (compiles every Triton specialization of the given cases), not an op; its "
    "random inputs are created once per warmed case": [("fastmed/ops/conv_block.py", "warm_triton_cache", "sync"),
                                                       ("fastmed/ops/conv_block.py", "_random_leaf", "h2d")],
    "the aten backend runs CPU tensors only (its index is built on the CPU: .to(device) is a no-op there)":
        [("fastmed/ops/window_attention.py", "_mask_parts", "h2d")],
    "per-axis numbers (spacing, deep-supervision weights) given as a 1-D tensor are read once as Python numbers; "
    "they are hyper-parameters, not per-voxel data": [("fastmed/_validate.py", "check_number_sequence", "tolist")],
}
#: (path, function, kind) -> why it is not a synchronization on the CUDA hot path
ALLOWED = {key: reason for reason, keys in ALLOWED_BY_REASON.items() for key in keys}


# --------------------------------------------------------------------------------------------------- the checker
def _is_jit(fn: ast.AST) -> bool:
    for dec in getattr(fn, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = ast.unparse(target)
        if name.startswith("triton.") or name in ("jit", "tl.constexpr_function"):
            return True
    return False


def _annotated_tensor(arg: ast.arg) -> bool:
    return arg.annotation is not None and "Tensor" in ast.unparse(arg.annotation)


class _Function:
    """Tensor-valued names of one function: parameters annotated ``Tensor`` and names assigned tensor values."""

    def __init__(self, fn):
        args = fn.args
        self.tensors = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if _annotated_tensor(a)}
        assigns = [n for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.AnnAssign))]
        for _ in range(3):  # names assigned from names assigned from tensors
            for node in assigns:
                value = node.value
                if value is None or not self.is_tensor(value):
                    continue
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        self.tensors.add(t.id)

    def is_tensor(self, node: ast.AST) -> bool:
        """Whether ``node`` is decidably a tensor (False where it cannot be told)."""
        if isinstance(node, ast.Name):
            return node.id in self.tensors
        if isinstance(node, ast.Attribute):
            return node.attr not in NOT_TENSOR_ATTRS and self.is_tensor(node.value)
        if isinstance(node, ast.Subscript):
            return self.is_tensor(node.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            recv, attr = node.func.value, node.func.attr
            if isinstance(recv, ast.Name) and recv.id in HOST_MODULES:
                return False
            if isinstance(recv, ast.Name) and recv.id == "torch":
                return attr not in NOT_TENSOR_TORCH and not attr.startswith(("is_", "get_", "are_"))
            if attr in NOT_TENSOR_METHODS:
                return False
            return attr in REDUCTIONS or self.is_tensor(recv)
        if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot, ast.In, ast.NotIn))
                                                 for op in node.ops):
            return False  # identity and membership tests give Python booleans
        if isinstance(node, (ast.Compare, ast.BinOp, ast.BoolOp)):
            parts = ([node.left] + node.comparators if isinstance(node, ast.Compare) else
                     [node.left, node.right] if isinstance(node, ast.BinOp) else node.values)
            return any(self.is_tensor(p) for p in parts)
        if isinstance(node, ast.UnaryOp):
            return self.is_tensor(node.operand)
        return False


def _device_like(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return "device" in node.id or node.id in ("dev", "cuda")
    if isinstance(node, ast.Attribute):
        return node.attr == "device"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.startswith("cuda")
    if isinstance(node, ast.Call):
        return ast.unparse(node.func) in ("torch.device",)
    return False


def _error_path(stmts) -> bool:
    return bool(stmts) and isinstance(stmts[-1], ast.Raise)


def _cpu_guard(test: ast.AST) -> Optional[bool]:
    """True for a test that holds only for CPU tensors (``x.device.type == "cpu"``, ``not x.is_cuda``), False for
    one that holds only for the others (``x.device.type != "cpu"``, ``x.is_cuda``), else None."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        inner = _cpu_guard(test.operand)
        return None if inner is None else not inner
    if isinstance(test, ast.Attribute) and test.attr == "is_cuda":
        return False
    if (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.Eq, ast.NotEq))
            and ast.unparse(test.left).endswith(".device.type") and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "cpu"):
        return isinstance(test.ops[0], ast.Eq)
    return None


def _classify(call: ast.Call, fn: _Function) -> Optional[str]:
    func = call.func
    if isinstance(func, ast.Attribute):
        attr = func.attr
        if attr in READBACK_METHODS and not call.args:
            return READBACK_METHODS[attr]
        if attr in SYNC_METHODS:
            return "sync"
        if attr == "cuda":
            return "h2d"
        if attr == "to" and (any(_device_like(a) for a in call.args)
                             or any(k.arg == "device" for k in call.keywords)):
            return "h2d"
        if isinstance(func.value, ast.Name) and func.value.id == "torch" and attr in H2D_FACTORIES:
            if any(k.arg == "device" for k in call.keywords):
                return "h2d"
    if isinstance(func, ast.Name) and func.id in ("bool", "int", "float") and len(call.args) == 1:
        if fn.is_tensor(call.args[0]):
            return "host-scalar"
    return None


def _visit_stmts(stmts, fn: _Function, qualname: str, path: str, lines: list[str], out: list[Finding]) -> None:
    """A statement list, leaving out what only runs for CPU tensors."""
    for stmt in stmts:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue  # nested definitions are scanned on their own, under their own name
        guard = _cpu_guard(stmt.test) if isinstance(stmt, ast.If) else None
        if guard is None:
            _visit(stmt, fn, qualname, path, lines, out)
        elif guard:  # if <cpu>: body (CPU only) else: orelse
            _visit_stmts(stmt.orelse, fn, qualname, path, lines, out)
        else:  # if <not cpu>: body else: orelse (CPU only)
            _visit_stmts(stmt.body, fn, qualname, path, lines, out)
            if stmt.body and isinstance(stmt.body[-1], (ast.Return, ast.Raise)):
                return  # the rest of the list runs for CPU tensors only


def _visit(node: ast.AST, fn: _Function, qualname: str, path: str, lines: list[str], out: list[Finding]) -> None:
    if isinstance(node, ast.Raise):
        return
    if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)) and fn.is_tensor(node.test):
        out.append(Finding(path, qualname, "implicit-bool", node.test.lineno, lines[node.test.lineno - 1].strip()))
    if isinstance(node, ast.If) and _error_path(node.body):
        # the error branch is not visited; its test is (``if bool(t.any()): raise`` still reads t back)
        _visit(node.test, fn, qualname, path, lines, out)
        _visit_stmts(node.orelse, fn, qualname, path, lines, out)
        return
    if isinstance(node, ast.Call):
        kind = _classify(node, fn)
        if kind:
            out.append(Finding(path, qualname, kind, node.lineno, lines[node.lineno - 1].strip()))
    for value in (v for _, v in ast.iter_fields(node)):
        if isinstance(value, list) and value and all(isinstance(v, ast.stmt) for v in value):
            _visit_stmts(value, fn, qualname, path, lines, out)
            continue
        for child in value if isinstance(value, list) else [value]:
            if not isinstance(child, ast.AST) or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.ClassDef)):
                continue  # nested definitions are scanned on their own, under their own name
            _visit(child, fn, qualname, path, lines, out)


def scan_source(source: str, path: str) -> list[Finding]:
    """Every host read-back, device wait or host-to-device copy in the functions of ``source``."""
    tree = ast.parse(source)
    lines = source.splitlines()
    out: list[Finding] = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                if not _is_jit(child):
                    _visit_stmts(child.body, _Function(child), name, path, lines, out)
                walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, prefix)

    walk(tree, "")
    return out


def scan_repository() -> list[Finding]:
    out = []
    for pattern in SCANNED:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            with open(path) as fh:
                out += scan_source(fh.read(), os.path.relpath(path, ROOT).replace(os.sep, "/"))
    return out


# ------------------------------------------------------------------------------------------------------- tests
def test_no_host_sync_in_op_code():
    found = [f for f in scan_repository() if (f.path, f.function, f.kind) not in ALLOWED]
    assert not found, "host synchronization or host-to-device copy in op code (fix it, or allow-list it in " \
        "tests/test_no_sync.py with the reason it is off the CUDA hot path):\n" + "\n".join(
            f"  {f.path}:{f.line} in {f.function}() [{f.kind}]: {f.code}" for f in found)


def test_allow_list_entries_still_match():
    keys = {(f.path, f.function, f.kind) for f in scan_repository()}
    stale = [k for k in ALLOWED if k not in keys]
    assert not stale, f"allow-list entries that match nothing any more (delete them): {stale}"


SYNTHETIC = '''
import torch
from torch import Tensor


def reads(x: Tensor, w, spec, n: int, flag: bool):
    a = x.item()
    b = w.tolist()
    c = x.cpu()
    d = bool((x > 0).any())
    e = int(x.max())
    s = torch.as_tensor(w)
    f = float(s)
    if (x < 0).all():
        pass
    g = x.nonzero()
    h = torch.tensor([1, 2], device=x.device)
    i = w.to(x.device)
    j = w.cuda()
    return int(x.shape[1]), float(spec.gamma), bool(flag), int(n), x.size(0), float(x.numel())


def errors(x: Tensor):
    if bool((x < 0).any()):
        raise ValueError(f"negative values {x[x < 0].tolist()}")
    if x.dim() > 5:
        bad = x.flatten()[0].item()
        raise ValueError(f"bad {bad}")
    if (x > 9).any():
        raise ValueError("too large")


def cpu_only(x: Tensor, y: Tensor):
    if x.device.type == "cpu":
        a = x.item()
    else:
        b = y.tolist()
    if not x.is_cuda:
        c = x.cpu()
    if x.device.type != "cpu":
        torch._assert_async(y)
        return y
    d = x.sum().item()
    return d


def gpu_tail(x: Tensor):
    if x.device.type != "cpu":
        e = x.numpy()
    f = x.item()

    def inner(z: Tensor):
        return z.item()
    return inner


class Op:
    def method(self, y: Tensor):
        return y.sum().item()


@triton.jit
def kernel(x_ptr):
    v = tl.load(x_ptr).to(tl.float32)
    return float("inf")
'''


def test_checker_finds_each_pattern():
    """The checker reports every kind it looks for and nothing it must not (shapes, plain numbers, error paths,
    CPU-only branches, Triton device code), so the repository check above can fail."""
    found = scan_source(SYNTHETIC, "synthetic.py")
    got = sorted((f.function, f.kind, f.code.split(" = ")[0]) for f in found)
    assert got == sorted([
        ("reads", "item", "a"), ("reads", "tolist", "b"), ("reads", "cpu", "c"), ("reads", "host-scalar", "d"),
        ("reads", "host-scalar", "e"), ("reads", "host-scalar", "f"), ("reads", "implicit-bool", "if (x < 0).all():"),
        ("reads", "sync", "g"), ("reads", "h2d", "h"), ("reads", "h2d", "i"), ("reads", "h2d", "j"),
        ("errors", "host-scalar", "if bool((x < 0).any()):"), ("errors", "implicit-bool", "if (x > 9).any():"),
        ("cpu_only", "tolist", "b"), ("gpu_tail", "numpy", "e"), ("gpu_tail", "item", "f"),
        ("gpu_tail.inner", "item", "return z.item()"), ("Op.method", "item", "return y.sum().item()"),
    ]), got


# --------------------------------------------------------------------------------------------- (b) on the GPU
def _grad_inputs(*tensors):
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def _case_norm_act(dtype):
    from fastmed.ops import norm_act

    x = torch.randn(2, 16, 12, 12, 12, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.rand(16, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    return lambda: norm_act(x, "instance", w, b), [x, w, b]


def _case_group_norm_act(dtype):
    from fastmed.ops import norm_act

    x = torch.randn(2, 16, 24, 24, device="cuda", dtype=dtype, requires_grad=True)
    return lambda: norm_act(x, "group", num_groups=4, activation="silu"), [x]


def _case_conv(dtype, implementation):
    from fastmed.ops import conv_norm_act

    x = torch.randn(2, 8, 12, 12, 12, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(16, 8, 3, 3, 3, device="cuda") / 15).to(dtype).requires_grad_()
    b = torch.zeros(16, device="cuda", dtype=dtype, requires_grad=True)
    return lambda: conv_norm_act(x, w, b, stride=2, implementation=implementation), [x, w, b]


def _case_window_attention(dtype):
    from fastmed.ops import window_attention

    qkv = torch.randn(2, 14, 14, 3 * 32, device="cuda", dtype=dtype, requires_grad=True)
    table = (torch.randn(13 * 13, 2, device="cuda") * 0.02).to(dtype).requires_grad_()
    return lambda: window_attention(qkv, 2, 7, 3, table), [qkv, table]


def _case_attention(dtype):
    from fastmed.ops import attention

    q, k, v = (torch.randn(2, 4, 64, 32, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    return lambda: attention(q, k, v), [q, k, v]


def _case_loss(name, dtype, **kw):
    import fastmed.ops as ops

    x = torch.randn(2, 4, 16, 16, 16, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.randint(0, 4, (2, 1, 16, 16, 16), device="cuda")
    return lambda: getattr(ops, name)(x, y, **kw), [x]


def _case_deep_supervision(dtype):
    import fastmed.ops as ops

    outs = [torch.randn(2, 3, s, s, s, device="cuda", dtype=dtype, requires_grad=True) for s in (16, 8, 4)]
    y = torch.randint(0, 3, (2, 1, 16, 16, 16), device="cuda")
    # nnU-Net's weights give the lowest resolution 0: it takes no part in the graph
    return lambda: ops.deep_supervision_loss(ops.nnunet_dice_ce_loss, outs, y), outs[:-1]


def _case_distance_transform(dtype):
    from fastmed.ops import distance_transform

    m = torch.rand(2, 3, 20, 20, 20, device="cuda") > 0.7
    return lambda: distance_transform(m), []


def _case_signed_distance(dtype):
    from fastmed.ops import signed_distance

    y = torch.randint(0, 3, (2, 1, 20, 20, 20), device="cuda")
    return lambda: signed_distance(y, 3), []


GPU_CASES = {
    "norm_act-instance": _case_norm_act,
    "norm_act-group": _case_group_norm_act,
    "conv_norm_act-cudnn": lambda dt: _case_conv(dt, "cudnn"),
    "conv_norm_act-implicit_gemm": lambda dt: _case_conv(dt, "implicit_gemm"),
    "window_attention": _case_window_attention,
    "attention": _case_attention,
    "dice_loss": lambda dt: _case_loss("dice_loss", dt, softmax=True, to_onehot_y=True),
    "dice_ce_loss": lambda dt: _case_loss("dice_ce_loss", dt, softmax=True, to_onehot_y=True),
    "dice_focal_loss": lambda dt: _case_loss("dice_focal_loss", dt, softmax=True, to_onehot_y=True),
    "focal_loss": lambda dt: _case_loss("focal_loss", dt, to_onehot_y=True),
    "tversky_loss": lambda dt: _case_loss("tversky_loss", dt, softmax=True, to_onehot_y=True),
    "generalized_dice_loss": lambda dt: _case_loss("generalized_dice_loss", dt, softmax=True, to_onehot_y=True),
    "nnunet_dice_ce_loss": lambda dt: _case_loss("nnunet_dice_ce_loss", dt),
    "deep_supervision_loss": _case_deep_supervision,
    "distance_transform": _case_distance_transform,
    "signed_distance": _case_signed_distance,
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_ops_do_not_sync_on_cuda(case, dtype):
    fn, inputs = GPU_CASES[case](dtype)

    def step():
        out = fn()
        if inputs:
            torch.autograd.grad(out.float().sum() if out.dim() else out, inputs)

    step()  # warm-up: Triton compilation, autotuning and per-configuration caches may synchronize once
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
