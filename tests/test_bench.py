"""The benchmark tooling (bench/): harness, results merge, README table, plots, conv choice table; no GPU needed.

Synthetic results files stand in for GPU runs; the benchmarks themselves run end to end in the device script's
rehearsal (``bash bench/device_check.sh --rehearse``, a CI step).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import harness  # noqa: E402
import plot  # noqa: E402
import results_io  # noqa: E402
import summarize  # noqa: E402


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(op, case, impl, ms, device, mem=None, **kw):
    return dict(op=op, case=case, impl=impl, dtype="bfloat16", shape="2x3", ms=ms, ms_q20=ms * 0.9, ms_q80=ms * 1.1,
                peak_mem_mb=mem, device=device, min_bytes=1000, pct_copy_bw=kw.pop("pct", None), **kw)


def _write(path, data) -> str:
    with open(path, "w") as fh:
        json.dump(data, fh)
    return str(path)


@pytest.fixture
def results(tmp_path):
    """A merged GPU file (two ops) and a single-benchmark CPU file."""
    gpu = "NVIDIA H200"
    merged = {"runs": [{"op": "losses", "device": gpu}, {"op": "conv_block", "device": gpu}], "rows": [
        _row("losses", "DiceCELoss 2x14x128^3", "fastmed", 1.0, gpu, mem=100.0, pct=61.5),
        _row("losses", "DiceCELoss 2x14x128^3", "monai", 8.0, gpu, mem=400.0),
        _row("losses", "DiceCELoss 2x14x128^3", "monai-compile", 2.5, gpu, mem=200.0),
        dict(op="losses", case="DiceCELoss 2x14x128^3", impl="flaky-peer", error="RuntimeError: boom", device=gpu),
        _row("conv_block", "stage0 fwd+bwd", "fastmed-auto", 2.0, gpu),
        _row("conv_block", "stage0 fwd+bwd", "fastmed-cudnn", 2.0, gpu),  # a variant, not a baseline
        _row("conv_block", "stage0 fwd+bwd", "eager", 1.0, gpu),
    ]}
    cpu = "cpu (AMD EPYC, 2 cores)"
    single = {"op": "norm_act", "env": {"device": cpu}, "copy_GB/s": 10.0, "rows": [
        _row("norm_act", "instance fwd+bwd", "fastmed", 4.0, None, mem=10.0),
        _row("norm_act", "instance fwd+bwd", "eager", 6.0, None, mem=20.0),
    ]}
    for r in single["rows"]:
        del r["device"]  # older files: the device only in the file's env
    return _write(tmp_path / "device_check.json", merged), _write(tmp_path / "norm_act-cpu.json", single)


def test_comparisons_pick_fastmed_and_classify_baselines(results):
    rows = [r for p in results for r in results_io.load_rows(p)]
    got = {(c["op"], c["baseline"]): c for c in results_io.comparisons(rows)}
    assert set(got) == {("losses", "monai"), ("losses", "monai-compile"), ("conv_block", "eager"),
                        ("norm_act", "eager")}
    assert got["losses", "monai"]["speedup"] == pytest.approx(8.0)
    assert got["losses", "monai"]["mem_ratio"] == pytest.approx(0.25)
    assert got["losses", "monai-compile"]["category"] == "compile"
    assert got["losses", "monai"]["category"] == "peer"
    assert got["conv_block", "eager"] == dict(got["conv_block", "eager"], fastmed="fastmed-auto", speedup=0.5,
                                               category="eager", mem_ratio=None)
    assert got["norm_act", "eager"]["device"] == "cpu (AMD EPYC, 2 cores)"  # filled in from the file's env


def test_summarize_table(results):
    lines = summarize.table(list(results)).splitlines()
    assert lines[0].startswith("| op | device | case |") and len(lines) == 2 + 3
    dice = next(line for line in lines if "DiceCELoss" in line)
    assert "8.00x vs monai" in dice and "2.50x vs monai-compile" in dice
    assert "0.25x of monai" in dice and "0.50x of monai-compile" in dice and "| 61.5% |" in dice
    assert "flaky-peer" not in dice  # a failed row has no time
    conv = next(line for line in lines if "stage0" in line)
    assert "0.50x vs eager" in conv and "vs fastmed-cudnn" not in conv and "| n/a | n/a |" in conv
    assert "1.50x vs eager" in next(line for line in lines if "norm_act" in line)


def test_summarize_rewrites_the_readme_table(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{summarize.BEGIN}\nold table\n{summarize.END}\nafter\n")
    summarize.main(list(results) + ["--readme", str(readme)])
    text = readme.read_text()
    assert "old table" not in text and "8.00x vs monai" in text
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{summarize.END}\nafter\n")
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="expected one"):
        summarize.main(list(results) + ["--readme", str(readme)])


def test_plot_writes_one_png_per_device(results, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    written = plot.plot(list(results), str(out))
    assert sorted(os.path.basename(p) for p in written) == ["bench-cpu-amd-epyc-2-cores.png", "bench-nvidia-h200.png"]
    for path in written:
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 10_000


def test_plot_refuses_files_without_a_comparison(tmp_path):
    lone = _write(tmp_path / "lone.json", {"runs": [{"op": "x", "device": "d"}],
                                          "rows": [_row("x", "c", "fastmed", 1.0, "d")]})
    with pytest.raises(SystemExit, match="nothing to plot"):
        plot.main([lone, "--out", str(tmp_path / "p")])


def test_merge_keeps_every_row_and_run(results, tmp_path):
    out = tmp_path / "merged.json"
    results_io.main(["--merge", str(out), str(tmp_path)])  # a directory: its *.json files
    merged = json.loads(out.read_text())
    assert len(merged["rows"]) == 7 + 2 and len(merged["runs"]) == 3
    assert {r["device"] for r in merged["rows"]} == {"NVIDIA H200", "cpu (AMD EPYC, 2 cores)"}
    ratios = {(c["op"], c["baseline"]): c["speedup"] for c in merged["comparisons"]}
    assert ratios == {("losses", "monai"): 8.0, ("losses", "monai-compile"): 2.5, ("conv_block", "eager"): 0.5,
                      ("norm_act", "eager"): 1.5}


def test_conv_choice_from_a_results_file(tmp_path):
    gpu = "NVIDIA H200"
    env = dict(device=gpu, torch="2.9", triton="3.6", cuda="12.8", cudnn="9", commit="abc1234")
    common = dict(op="conv_block", mode="fwd+bwd", timer="cuda-events", dtype="bfloat16", Cin=32, Cout=32,
                  spatial="128x128x128", stride=1, Cskip=0, **env)
    rows = [dict(common, impl="fastmed-cudnn", ms=3.0, layout="channels_first"),
            dict(common, impl="fastmed-implicit_gemm", ms=2.0, layout="channels_first"),
            dict(common, impl="fastmed-cudnn", ms=1.0, layout="channels_last"),
            dict(common, impl="fastmed-implicit_gemm", ms=2.0, layout="channels_last"),
            dict(common, impl="eager", ms=0.5, layout="channels_last"),          # not a fastmed implementation
            dict(common, impl="fastmed-cudnn", ms=0.1, layout="channels_first", mode="fwd")]  # forward only
    source = _write(tmp_path / "device_check.json", {"runs": [dict(op="conv_block", **env)], "rows": rows})
    choice_file = tmp_path / "choice.py"
    bench = _module("bench_conv_block")
    bench.main(["--write-choice", "--from", source, "--choice-file", str(choice_file)])
    spec = importlib.util.spec_from_file_location("choice", choice_file)
    choice = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(choice)
    key = (3, "bfloat16", 32, 32, (128, 128, 128), (1, 1, 1), (3, 3, 3))
    assert choice.MEASURED and choice.TABLE == {key + (False,): "implicit_gemm", key + (True,): "cudnn"}
    assert "NVIDIA H200" in choice.__doc__ and "abc1234" in choice.__doc__
    cpu_only = _write(tmp_path / "cpu.json", {"runs": [dict(op="conv_block", device="cpu")],
                                             "rows": [dict(r, timer="cpu-wall-clock") for r in rows]})
    with pytest.raises(SystemExit, match="no conv_block rows measured on a GPU"):
        bench.main(["--write-choice", "--from", cpu_only, "--choice-file", str(tmp_path / "c2.py")])


def test_rotation_runs_each_first_equally_often():
    order = harness.rotation(["a", "b", "c"], 6)
    assert order[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]] and order[3:] == order[:3]
    assert harness.quantiles([4.0, 1.0, 3.0, 2.0, 5.0]) == (3.0, pytest.approx(1.8), pytest.approx(4.2))


def test_compare_interleaves_and_records_bytes_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMED_RESULTS_DIR", str(tmp_path))
    bench = harness.Bench("unit", quick=True, device="cpu", reps=6, warmup=1)
    bench._copy_gbs = 10.0
    calls = []

    def broken():
        raise RuntimeError("no compiler")

    impls = {"fastmed": lambda: calls.append("f"), "eager": lambda: calls.append("e"), "peer": broken}
    rows = bench.compare("case", impls, dtype=torch.float32, shape=(2, 3), min_bytes=4_000_000, formula="2*x",
                         extra={"mode": "fwd"}, impl_extra={"fastmed": {"backend": "reference"}})
    assert set(rows) == {"fastmed", "eager"}
    timed = calls[-12:]  # 6 rounds of two, alternating, the order rotating each round
    assert timed == ["f", "e", "e", "f"] * 3
    fast = rows["fastmed"]
    assert fast["reps"] == 6 and fast["timing"] == "interleaved x2" and fast["backend"] == "reference"
    assert fast["min_bytes"] == 4_000_000 and fast["min_bytes_formula"] == "2*x" and fast["mode"] == "fwd"
    assert fast["GB/s"] == pytest.approx(4e6 / (fast["ms"] * 1e-3) / 1e9, rel=1e-2)
    assert fast["pct_copy_bw"] == pytest.approx(100 * fast["GB/s"] / 10.0, rel=1e-2)
    assert fast["threads"] == torch.get_num_threads() and fast["device"].startswith("cpu (")
    assert "loadavg_start" in fast and "loadavg_end" in fast and fast["cpu_cores"] == os.cpu_count()
    failed = [r for r in bench.rows if r["impl"] == "peer"]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError: no compiler" and "ms" not in failed[0]
    saved = json.loads(open(bench._default_path()).read())  # checkpointed after the case
    assert len(saved["rows"]) == 3 and "loadavg_run_start" in saved["env"]
    (ratio,) = saved["comparisons"]
    assert ratio["baseline"] == "eager" and ratio["speedup"] == pytest.approx(rows["eager"]["ms"] / fast["ms"])


def test_cpu_peak_memory_counts_the_allocations_of_one_call():
    peak = harness.cpu_peak_bytes(lambda: torch.ones(1 << 20, dtype=torch.float64).sum())
    assert peak is not None and 8 * (1 << 20) <= peak < 8 * (1 << 20) + 4096


def test_cpu_peak_memory_ignores_frees_of_older_blocks():
    """A call that frees a block from before it (a gradient the step resets) and allocates its own: the peak is its
    own allocation.  The profiler reports such a free only for a block it saw allocated in an earlier session, so
    counting it made the peak depend on what was measured before (0 instead of a gradient's size)."""
    held = {}
    harness.cpu_peak_bytes(lambda: held.update(old=torch.ones(1 << 20, dtype=torch.float64)))  # seen allocated

    def step():
        held.pop("old")
        held["new"] = torch.ones(1 << 20, dtype=torch.float64)

    peak = harness.cpu_peak_bytes(step)
    assert peak is not None and 8 * (1 << 20) <= peak < 8 * (1 << 20) + 4096


def test_loss_benchmark_rows_count_the_minimum_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMED_BENCH_CASE_S", "0.01")
    bench = _module("bench_losses")
    out = tmp_path / "losses.json"
    bench.main(["--quick", "--device", "cpu", "--losses", "DiceLoss", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    tiny = [r for r in rows if r["shape"] == "1x3x4x4x4" and r.get("ms")]
    assert {r["impl"] for r in tiny} == {"fastmed", "monai"}
    assert all(r["min_bytes"] == 2 * 3 * 64 * 4 + 64 * 8 for r in tiny)  # 2 x fp32 logits + int64 labels
    assert all(r["pct_copy_bw"] > 0 and r["reps"] >= harness.MIN_REPS for r in tiny)


def test_device_script_names_existing_files():
    """The device script parses, and every benchmark and test file it names exists (a rename would otherwise be
    found on the lent GPU machine; the CI rehearsal runs the script itself)."""
    import re
    import subprocess

    script = os.path.join(BENCH, "device_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    benches = re.search(r'DEFAULT_BENCHES="([a-z_ ]+)"', text).group(1).split()
    assert "for name in ${BENCHES:-$DEFAULT_BENCHES}" in text
    tests = re.search(r"for t in ([a-z_ ]+); do", text).group(1).split()
    assert benches[:2] == ["losses", "window_attention"] and len(benches) == 8
    assert {"sam_attention", "sliding_window"} <= set(benches)
    missing = [f"bench/bench_{b}.py" for b in benches if not os.path.exists(os.path.join(BENCH, f"bench_{b}.py"))]
    missing += [f"tests/test_{t}.py" for t in tests if not os.path.exists(os.path.join(ROOT, "tests", f"test_{t}.py"))]
    assert not missing and tests[0] == "no_sync", missing


def test_targets_met_missed_and_unmeasured(tmp_path):
    gpu = "NVIDIA H200"
    case = "DiceCELoss 2x14x128x128x128 bfloat16"
    rows = [_row("losses", case, "fastmed", 1.0, gpu, mem=100.0, timer="cuda-events"),
            _row("losses", case, "monai", 8.0, gpu, mem=200.0, timer="cuda-events"),  # 8x: met; memory 0.5x: not
            _row("losses", case, "monai-compile", 1.5, gpu, timer="cuda-events"),     # 1.5x: not met
            _row("norm_act", "instance fwd+bwd cf 2x32x128x128x128", "fastmed", 1.0, "cpu", pct=90.0,
                 timer="cpu-wall-clock")]                                             # a CPU row: not a GPU target
    path = _write(tmp_path / "r.json", {"runs": [{"op": "losses", "device": gpu}], "rows": rows})
    lines = summarize.targets([path]).splitlines()
    dice = [line for line in lines if line.startswith("| DiceCE")]
    assert dice == ["| DiceCE fwd+bwd (2, 14, 128^3) bf16 | >= 6.0x monai | 8x | yes |",
                    "| DiceCE fwd+bwd (2, 14, 128^3) bf16 | >= 2.0x monai-compile | 1.5x | NO |",
                    "| DiceCE fwd+bwd (2, 14, 128^3) bf16 | peak memory <= 0.3x monai's | 0.5x | NO |"]
    others = [line for line in lines[2:] if not line.startswith("| DiceCE")]
    assert others and all(line.endswith("| unmeasured | n/a |") for line in others)


def test_loss_benchmark_runs_without_monai(tmp_path, monkeypatch):
    """The GPU machine has no MONAI unless its wheel is carried: the benchmark must still time fastmed and the
    written-out nnU-Net peer, leaving the MONAI rows out."""
    monkeypatch.setenv("FASTMED_BENCH_CASE_S", "0.01")
    monkeypatch.setitem(sys.modules, "monai", None)
    monkeypatch.setitem(sys.modules, "monai.losses", None)
    bench = _module("bench_losses")
    out = tmp_path / "losses.json"
    bench.main(["--quick", "--device", "cpu", "--losses", "DiceLoss,nnU-Net", "--out", str(out)])
    tiny = {(r["loss"], r["impl"]) for r in json.loads(out.read_text())["rows"] if r["shape"] == "1x3x4x4x4"}
    assert tiny == {("DiceLoss", "fastmed"), ("nnU-Net", "fastmed"), ("nnU-Net", "nnunet")}


@pytest.mark.parametrize("name", ["bench_sliding_window", "bench_models", "bench_losses", "bench_norm_act",
                                  "bench_conv_block", "bench_window_attention", "bench_distance_transform",
                                  "bench_sam_attention"])
def test_every_benchmark_parses_its_arguments(name):
    """Every benchmark builds its parser (the harness's common options plus its own, no clash) and prints --help."""
    bench = _module(name)
    with pytest.raises(SystemExit) as stop:
        bench.main(["--help"])
    assert stop.value.code == 0


def test_inference_benchmark_runs_on_the_cpu(tmp_path):
    bench = _module("bench_sliding_window")
    out = tmp_path / "inference.json"
    bench.main(["--quick", "--device", "cpu", "--cases", "accumulation", "--reps", "1", "--warmup", "0",
                "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows if r.get("ms")} >= {"fastmed", "monai"}


def test_sam_benchmark_runs_on_the_cpu(tmp_path, monkeypatch):
    """bench_sam_attention --quick: the tiny encoder (inference and training) and the op, fastmed against
    segment_anything's own code and SDPA, each checked equal before timing; rows carry images/s, FLOP/s and bytes."""
    from fastmed.models.sam import segment_anything_modeling

    try:
        segment_anything_modeling()
    except ImportError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("FASTMED_BENCH_CASE_S", "0.01")
    bench = _module("bench_sam_attention")
    out = tmp_path / "sam.json"
    bench.main(["--quick", "--device", "cpu", "--no-compile", "--warmup", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if r.get("error")]
    encoder = [r for r in rows if r["kind"] == "encoder"]
    assert {(r["mode"], r["impl"]) for r in encoder} == {(m, i) for m in ("inference", "training")
                                                        for i in ("fastmed", "segment_anything", "sdpa")}
    assert all(r["images/s"] == pytest.approx(2 / (r["ms"] * 1e-3), rel=1e-3) and r["TFLOP/s"] > 0 for r in encoder)
    assert all(r["max_abs_diff_vs_fastmed"] < 1e-4 for r in rows)
    op = {(r["case"], r["impl"]) for r in rows if r["kind"] == "op"}
    assert len(op) == 4 * 4 and ("op quick-global-8^2 fwd+bwd", "segment_anything") in op
    assert all(r["min_bytes"] > 0 and r["pct_copy_bw"] > 0 for r in rows)
