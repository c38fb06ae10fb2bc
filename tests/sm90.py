"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter accepts programs a GPU compiler rejects (tile shapes, dtypes of ``tl.dot``, constexpr misuse,
shared memory over the limit).  ``compile_for_sm90`` runs ``triton.compile`` with a CUDA sm_90 target in a
subprocess without ``TRITON_INTERPRET`` (the kernels must be real ``JITFunction`` objects), down to a cubin with
the ptxas that triton ships.  A spec names a kernel, its constexprs and the pointer dtypes; other arguments are
i32, or fp32 when listed in ``floats``.

``compile_for_sm90`` returns one resource report per spec (registers, spill stores/loads in bytes, shared memory),
read from ``ptxas -v`` on the kernel's PTX, so tests can assert that the shipped specializations do not spill.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource


def resources(ptx):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}


specs = json.loads(sys.argv[1])
reports = []
for s in specs:
    fn = getattr(importlib.import_module(s["module"]), s["kernel"])
    consts = s.get("constexprs", {})
    unknown = set(consts) - set(fn.arg_names)
    assert not unknown, (s["kernel"], "unknown constexprs", unknown)
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = s.get("pointers", {}).get(a, s.get("ptr", "*fp32"))
        elif a in s.get("floats", ()):
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": s.get("num_warps", 4), "num_stages": s.get("num_stages", 3)})
    assert k.asm.get("cubin"), s["kernel"]
    assert k.metadata.shared <= 232448, (s["kernel"], "shared memory", k.metadata.shared)  # 227 KB per block
    reports.append({"kernel": s["kernel"], "constexprs": consts, "num_warps": s.get("num_warps", 4),
                    "shared": k.metadata.shared, **resources(k.asm["ptx"])})
print("compiled", len(specs))
print("REPORTS " + json.dumps(reports))
"""


def compile_for_sm90(specs: list[dict]) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(specs)], env=env, capture_output=True, text=True,
                         timeout=900)
    if res.returncode != 0 and "ptxas" in res.stderr and ("not found" in res.stderr or "No such file" in res.stderr):
        pytest.skip("triton's CUDA assembler (ptxas) is missing on this machine")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("REPORTS "))
    return json.loads(line[len("REPORTS "):])


def assert_no_spills(reports: list[dict]) -> None:
    """Every compiled specialization keeps its values in registers (no local-memory spill stores or loads)."""
    spilling = [r for r in reports if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "kernels that spill on sm_90:\n" + "\n".join(
        f"  {r['kernel']} {r['constexprs']} num_warps={r['num_warps']}: {r['registers']} registers, "
        f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads" for r in spilling)
