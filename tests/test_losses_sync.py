"""No host synchronization in the losses' default path on CUDA tensors (issue 11 item 3).

* A static check of the loss op code (``fastmed/ops/losses.py``, ``kernels/losses.py``): no value read back to the
  host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool/int/float`` of a tensor, ``if tensor:``), no
  device wait (``.nonzero()``, ``synchronize()``) and no host-to-device copy (``.cuda()``, ``.to(<device>)``,
  ``torch.tensor(..., device=)``), except on the way to an error (a branch that ends in ``raise``), in a branch
  taken for CPU tensors only (``if <t>.device.type == "cpu":``), or on the allow-list below with the reason.
* A dynamic check here on the CPU (Triton interpreter, the ``triton`` backend the GPU runs): a loss forward and
  backward reads no value back (no ``aten._local_scalar_dense``) outside the CPU-only label check.
"""
from __future__ import annotations

import ast
import contextlib
import os

import pytest
import torch
from conftest import triton_device
from torch.utils._python_dispatch import TorchDispatchMode

import fastmed
from fastmed import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("fastmed/ops/losses.py", "kernels/losses.py")
READBACK = {"item", "tolist", "cpu", "numpy", "nonzero", "synchronize", "cuda"}
NOT_TENSOR_METHODS = {"dim", "size", "numel", "stride", "is_floating_point", "is_complex", "element_size",
                      "data_ptr", "is_contiguous"}
TENSOR_METHODS = {"any", "all", "sum", "max", "min", "mean", "amax", "amin", "count_nonzero", "abs", "floor", "eq",
                  "ne", "lt", "gt", "le", "ge"}

# (file, function, construct) -> why it is not on the CUDA default path
ALLOWED = {
    ("fastmed/ops/losses.py", "_weights_like", "to(device)"):
        "a no-op for class weights already on the logits' device (module buffers move with .cuda(), a per-class "
        "FocalLoss alpha is a buffer too); only a Python list given to the functional API is copied, as MONAI does",
    ("fastmed/ops/losses.py", "_focal_alpha", "float(tensor)"):
        "a 0-d tensor alpha is read once as a number, like MONAI; a float alpha involves no tensor",
    ("fastmed/ops/losses.py", "_dense", "bool(tensor)"):
        "reduction='none' only: MONAI's per-voxel focal output is the plain PyTorch composition, its labels are "
        "checked there",
}


def _tensor_names(fn: ast.FunctionDef) -> set[str]:
    """Parameters annotated as tensors and names assigned from tensor methods or other tensor names."""
    names = {a.arg for a in fn.args.args + fn.args.kwonlyargs
             if a.annotation is not None and "Tensor" in ast.unparse(a.annotation)}
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and _is_tensor(node.value, names):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _is_tensor(node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Name):
        return node.id in names
    if isinstance(node, ast.Subscript):
        return _is_tensor(node.value, names)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr in NOT_TENSOR_METHODS:
            return False
        if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            return node.func.attr in ("as_tensor", "tensor", "where", "zeros", "ones", "full")
        return node.func.attr in TENSOR_METHODS or _is_tensor(node.func.value, names)
    if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot, ast.In, ast.NotIn))
                                             for op in node.ops):
        return False  # identity and membership tests are Python booleans
    if isinstance(node, (ast.Compare, ast.BinOp)):
        parts = [node.left] + (node.comparators if isinstance(node, ast.Compare) else [node.right])
        return any(_is_tensor(p, names) for p in parts)
    if isinstance(node, ast.UnaryOp):
        return _is_tensor(node.operand, names)
    return False


def _cpu_only(test: ast.AST) -> bool:
    """``<x>.device.type == "cpu"``: a branch only CPU tensors take."""
    return (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
            and ast.unparse(test.left).endswith("device.type") and ast.unparse(test.comparators[0]) == "'cpu'")


def _findings(node: ast.AST, names: set[str], out: list[tuple[str, int]]) -> None:
    if isinstance(node, ast.Raise) or isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return
    if isinstance(node, ast.If):
        skip_body = _cpu_only(node.test) or (node.body and isinstance(node.body[-1], ast.Raise))
        if not skip_body and _is_tensor(node.test, names):
            out.append(("if tensor", node.lineno))
        for child in [node.test] + ([] if skip_body else node.body) + node.orelse:
            _findings(child, names, out)
        return
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in READBACK and not node.args:
            out.append((f"{f.attr}()", node.lineno))
        elif isinstance(f, ast.Attribute) and f.attr == "to" and (
                any(k.arg == "device" for k in node.keywords) or any("device" in ast.unparse(a) for a in node.args)):
            out.append(("to(device)", node.lineno))
        elif (isinstance(f, ast.Attribute) and ast.unparse(f.value) == "torch" and f.attr in ("tensor", "as_tensor")
              and any(k.arg == "device" for k in node.keywords)):
            out.append(("torch.tensor(device)", node.lineno))
        elif isinstance(f, ast.Name) and f.id in ("bool", "int", "float") and node.args and _is_tensor(node.args[0],
                                                                                                     names):
            out.append((f"{f.id}(tensor)", node.lineno))
    for child in ast.iter_child_nodes(node):
        _findings(child, names, out)


def scan(source: str, path: str) -> list[tuple[str, str, str, int]]:
    """(path, function, construct, line) of every host sync / host-to-device copy outside triton.jit code."""
    out = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef):
            continue
        if any(ast.unparse(d).startswith("triton.") for d in fn.decorator_list):
            continue
        found: list[tuple[str, int]] = []
        names = _tensor_names(fn)
        for stmt in fn.body:
            _findings(stmt, names, found)
        out += [(path, fn.name, kind, line) for kind, line in found]
    return out


def _scan_repository():
    out = []
    for path in SCANNED:
        with open(os.path.join(ROOT, path)) as fh:
            out += scan(fh.read(), path)
    return out


def test_loss_code_has_no_host_sync():
    found = [f for f in _scan_repository() if f[:3] not in ALLOWED]
    assert not found, "host synchronization in the loss code:\n" + "\n".join(map(str, found))


def test_allow_list_is_current():
    keys = {f[:3] for f in _scan_repository()}
    assert not [k for k in ALLOWED if k not in keys]


SYNTHETIC = '''
def f(x: Tensor, w, n: int):
    a = x.item()
    if (x < 0).any():
        pass
    b = int(x.sum())
    c = w.to(device=x.device)
    d = torch.tensor([1.0], device=x.device)
    if x.device.type == "cpu":
        e = bool(x.all())
    if bool(x.any()):
        raise ValueError(x.tolist())
    return int(n), float(x.shape[0])
'''


def test_checker_finds_each_construct():
    """The checker reports each construct it looks for and nothing on error paths or CPU-only branches."""
    got = sorted((kind, line) for _, _, kind, line in scan(SYNTHETIC, "s.py"))
    assert got == sorted([("item()", 3), ("if tensor", 4), ("int(tensor)", 6), ("to(device)", 7),
                          ("torch.tensor(device)", 8), ("bool(tensor)", 11)])


class _ReadBacks(TorchDispatchMode):
    """Counts the ops that read a tensor value back to the host, outside Triton launches (the interpreter's own
    copies)."""

    def __init__(self):
        super().__init__()
        self.count, self.in_launch = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_local_scalar_dense" and not self.in_launch:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_readbacks(monkeypatch):
    kl = pytest.importorskip("fastmed.kernels.losses")
    real = kl.wrap_triton
    mode = _ReadBacks()

    def wrap(kernel):
        def grid_of(grid):
            def launch(*args, **kwargs):
                mode.in_launch = True
                try:
                    return real(kernel)[grid](*args, **kwargs)
                finally:
                    mode.in_launch = False
            return launch
        return type("Launcher", (), {"__getitem__": lambda self, grid: grid_of(grid)})()

    monkeypatch.setattr(kl, "wrap_triton", wrap)
    with mode:
        yield mode


#: loss name -> (labels call, one-hot call); nnU-Net's loss takes labels only
CASES = {
    "dice_ce": (lambda x, y: ops.dice_ce_loss(x, y, softmax=True, to_onehot_y=True),
                lambda x, y: ops.dice_ce_loss(x, y, softmax=True)),
    "dice_focal": (lambda x, y: ops.dice_focal_loss(x, y, softmax=True, to_onehot_y=True),
                   lambda x, y: ops.dice_focal_loss(x, y, softmax=True)),
    "focal": (lambda x, y: ops.focal_loss(x, y, to_onehot_y=True, alpha=0.25),
              lambda x, y: ops.focal_loss(x, y, alpha=0.25)),
    "generalized_dice": (lambda x, y: ops.generalized_dice_loss(x, y, softmax=True, to_onehot_y=True),
                         lambda x, y: ops.generalized_dice_loss(x, y, softmax=True)),
    "tversky": (lambda x, y: ops.tversky_loss(x, y, softmax=True, to_onehot_y=True),
                lambda x, y: ops.tversky_loss(x, y, softmax=True)),
    "nnunet": (lambda x, y: ops.nnunet_dice_ce_loss(x, y), None),
}
PARAMS = [(case, targets) for case, calls in CASES.items() for targets, call in zip(("labels", "onehot"), calls)
          if call is not None]


@pytest.mark.parametrize(("case", "targets"), PARAMS)
def test_no_value_read_back(case, targets, monkeypatch):
    """Forward and backward on the Triton backend: one-hot targets read nothing back; label targets read only the
    CPU label check's flag (on a GPU that flag feeds ``torch._assert_async`` instead)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=gen).to(triton_device()).requires_grad_()
    y = torch.randint(0, 3, (2, 1, 4, 5), generator=gen).to(x.device)
    labels_call, onehot_call = CASES[case]
    onehot = torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1).float()  # (one_hot reads the labels' range)
    with fastmed.use_backend("triton"), _count_readbacks(monkeypatch) as mode:
        loss = labels_call(x, y) if targets == "labels" else onehot_call(x, onehot)
        loss.backward()
    assert mode.count == (1 if targets == "labels" and x.device.type == "cpu" else 0)
