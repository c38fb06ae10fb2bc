#!/usr/bin/env bash
# The prepared run for a lent GPU machine (15 minutes of device time in all: this script stays under 9, leaving room
# for one rerun).  torch 2.11, triton 3.6 and python 3.12 are installed there, MONAI and edt are not, and nothing
# outside can be reached: only the tracked and untracked-not-ignored files of the checkout travel, plus the paths
# named in the run's `carry`.  The peers MONAI, edt and segment_anything (pure Python; bench_sam_attention.py imports its
# modeling code without its torchvision-importing __init__) travel as wheels in .whl/ (ignored by git; carry it):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl -r bench/device_wheels.txt          # 4.6 MB, checked 2026-11-30 (einops: MONAI SwinUNETR)
# and installed by step 1 under /tmp.  Without MONAI, tests/test_losses.py (the losses' GPU correctness at the
# benchmark shapes, against MONAI) is skipped entirely and the MONAI rows are left out: the run says so and counts
# it as a failed step.
# In priority order:
#   1. install fastmed (the CUDA part of fastmed._C for sm_90 when nvcc is present; without the extension if that
#      fails; from a copy of the source tree if even that fails) and the wheels in .whl/
#   2. the environment (nvidia-smi, python -m fastmed info)
#   3. correctness of every op at real sizes on the GPU: the `gpu`-marked tests (tests/test_no_sync.py first: no
#      host synchronization in any op), JUnit XML in $OUT/gpu_tests.xml
#   4. benchmarks, most important first: losses, window attention, norm_act, the training step of the two models
#      (UNet.nnunet 3D, SwinUNet 2D), whole-volume sliding-window inference (the blending with a 1x1x1 conv and
#      with UNet.nnunet, vs MONAI: time and tracked memory), the SAM ViT-B image encoder (inference b1/b8, training; then its attention
#      op), then the conv block and the distance transform.  Each benchmark puts its own
#      most important cases first and writes its rows after every case, so one stopped at its limit keeps them.
#      Triton compilation happens in each benchmark's untimed warm-up (the conv kernels' cache is warmed first
#      where kernels/conv_block.py offers it); the GPU tests have compiled most kernels already.
#   5. merge every benchmark's rows into $OUT/device_check.json (device, versions, commit, bytes, % of the copy
#      bandwidth measured in the same run, in every row), $OUT/summary.md (the README table), $OUT/plots/*.png,
#      and $OUT/_conv_block_choice.py (the conv implementation table measured here).
# Every step has a time cap and the whole run a deadline (DEADLINE_S, default 480 s, then ~30 s of merging and
# plotting: about 8.5 minutes in all); a step that would start with
# less than 10 s left is skipped and says so.
#
#   FASTMED_COMMIT=<hash> bash bench/device_check.sh   # on the GPU machine; OUT defaults to bench/results/device
#       (through the device tool: command "FASTMED_COMMIT=<hash> bash bench/device_check.sh", carry [".whl"],
#        timeout_s 570; its $OUT comes back: device_check.json, summary.md, device_check.log, gpu_tests.xml,
#        plots/bench-<gpu>.png, _conv_block_choice.py)
#   BENCHES="losses norm_act" bash bench/device_check.sh   # a subset (names of bench/bench_<name>.py)
#   bash bench/device_check.sh --rehearse      # the same script on the CPU: Triton interpreter, tiny shapes, every
#                                              # step (install as a dry run, GPU tests collected, not run); CI runs it
#
# After a GPU run (see README "Benchmarks"):
#   cp $OUT/device_check.json bench/results/device_check-<gpu>-<UTC stamp>.json && git add it
#   python bench/bench_conv_block.py --write-choice --from bench/results/device_check-<...>.json
#   python bench/summarize.py bench/results/device_check-<...>.json bench/results/<latest CPU files> --readme README.md
#   python bench/plot.py bench/results/device_check-<...>.json --out bench/results/plots   # the README shows it
#   then commit the results file, fastmed/ops/_conv_block_choice.py, README.md and the plot.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
if [ "${1:-}" = "--rehearse" ]; then
  MODE=rehearse
elif [ -n "${1:-}" ]; then
  echo "usage: bash bench/device_check.sh [--rehearse]" >&2
  exit 2
fi
if [ "$MODE" = rehearse ]; then
  OUT=${OUT:-$(mktemp -d /tmp/fastmed_rehearse.XXXXXX)}
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEADLINE_S=${DEADLINE_S:-900}
  BENCH_ARGS="--quick --device cpu --no-compile"
  export FASTMED_BENCH_CASE_S=${FASTMED_BENCH_CASE_S:-1}
else
  OUT=${OUT:-bench/results/device}
  DEADLINE_S=${DEADLINE_S:-480}
  BENCH_ARGS=""
  export FASTMED_BENCH_CASE_S=${FASTMED_BENCH_CASE_S:-2}
fi
PY=${PYTHON:-python3}
mkdir -p "$OUT"
TMP=$(mktemp -d)
export PYTHONUNBUFFERED=1 FASTMED_RESULTS_DIR="$TMP"
# the copy of the checkout on the GPU machine may have no .git: pass FASTMED_COMMIT=$(git rev-parse --short HEAD)
FASTMED_COMMIT=${FASTMED_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export FASTMED_COMMIT
exec > >(tee "$OUT/device_check.log") 2>&1
t0=$(date +%s)
FAILED=()
step() { echo; echo "== [$(( $(date +%s) - t0 )) s] $*"; }
left() { echo $(( DEADLINE_S - ($(date +%s) - t0) )); }
# run NAME CAP CMD...: CMD under min(CAP, time left); SIGINT first (pytest still reports, a benchmark has saved its
# rows), SIGKILL 10 s later.  A failure is recorded and the run goes on.
run() {
  local name=$1 cap=$2 l rc
  shift 2
  l=$(left)
  [ "$cap" -gt "$l" ] && cap=$l
  if [ "$cap" -lt 10 ]; then
    echo "SKIPPED $name: ${l} s left of the ${DEADLINE_S} s deadline"
    FAILED+=("$name (skipped: out of time)")
    return 0
  fi
  timeout -s INT -k 10 "$cap" "$@"
  rc=$?
  if [ $rc != 0 ]; then
    echo "$name: stopped or failed (rc=$rc$([ $rc = 124 ] && echo ", its ${cap} s limit"))"
    FAILED+=("$name (rc=$rc)")
  fi
  return 0
}
echo "device_check.sh mode=$MODE OUT=$OUT deadline=${DEADLINE_S}s commit=$FASTMED_COMMIT"

step "1. install"
WHEELS=(.whl/*.whl)
if [ -e "${WHEELS[0]}" ]; then
  # the peers (MONAI, edt) as carried wheels, into a folder of their own (never over the machine's packages)
  if [ "$MODE" = rehearse ]; then
    echo "would install (cp312 wheels, for the GPU machine): ${WHEELS[*]}"
  else
    run wheels 60 $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastmed_wheels "${WHEELS[@]}" \
      && export PYTHONPATH=/tmp/fastmed_wheels${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
if [ "$MODE" = rehearse ]; then
  # the same pip command without installing (this environment keeps its editable install)
  run install 120 $PY -m pip install -q --dry-run --no-deps --no-build-isolation .
else
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # this machine's GPU only: half the nvcc time
  MAX_JOBS=16 run install 130 $PY -m pip install -q --no-deps --no-build-isolation .
  if ! (cd /tmp && $PY -c "import fastmed._C") 2>/dev/null; then
    echo "fastmed._C did not build or install: installing without it"
    FASTMED_BUILD_EXT=0 run install-without-extension 60 $PY -m pip install -q --no-deps --no-build-isolation .
  fi
fi
if ! (cd /tmp && $PY -c "import fastmed.kernels") 2>/dev/null; then
  # last resort (pip could not install at all): the source tree, kernels/ placed where the install maps it
  echo "fastmed is not importable after the install: running from a copy of the source tree"
  rm -rf /tmp/fastmed_src && mkdir -p /tmp/fastmed_src && cp -r fastmed /tmp/fastmed_src/ \
    && cp -r kernels /tmp/fastmed_src/fastmed/kernels
  export PYTHONPATH=/tmp/fastmed_src${PYTHONPATH:+:$PYTHONPATH}
  FAILED+=("install (ran from the source tree)")
fi

for peer in monai edt; do
  if ! (cd /tmp && $PY -c "import $peer") 2>/dev/null; then
    echo "WARNING: the peer '$peer' is not importable: carry .whl (see this script's header).$([ $peer = monai ] \
      && echo " tests/test_losses.py is SKIPPED (no loss correctness check on the GPU); MONAI rows left out.")"
    FAILED+=("peer $peer missing")
  fi
done

step "2. environment"
if [ "$MODE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
fi
# from /tmp, so that Python imports the installed fastmed (with fastmed.kernels and fastmed._C), not the source tree
run info 30 bash -c 'cd /tmp && exec "$@"' in-tmp $PY -m fastmed info

step "3. GPU tests (correctness of every op at real sizes; no host synchronization)"
TESTS=()
for t in no_sync losses window_attention norm_act backend distance_transform conv_block sam_attention sam_finetune; do
  TESTS+=("$PWD/tests/test_$t.py")
done
if [ "$MODE" = rehearse ]; then
  # nothing marked gpu runs on the CPU: collect them, and fail if there are none or a file does not import
  (cd /tmp && $PY -m pytest "${TESTS[@]}" -m gpu -q -p no:cacheprovider --collect-only) > "$OUT/gpu_tests_collected.txt" 2>&1
  rc=$?
  tail -1 "$OUT/gpu_tests_collected.txt"
  n=$(grep -c "::" "$OUT/gpu_tests_collected.txt" || true)
  if [ $rc != 0 ] || [ "${n:-0}" -lt 1 ]; then
    FAILED+=("gpu-tests-collection (rc=$rc, $n tests)")
    cat "$OUT/gpu_tests_collected.txt"
  fi
else
  run gpu-tests 150 bash -c 'cd /tmp && exec "$@"' in-tmp $PY -m pytest "${TESTS[@]}" -m gpu -q -p no:cacheprovider \
    -rfE --durations=15 --junitxml="$(realpath "$OUT")/gpu_tests.xml"
fi

step "4. benchmarks"
DEFAULT_BENCHES="losses window_attention norm_act models sliding_window sam_attention conv_block distance_transform"
for name in ${BENCHES:-$DEFAULT_BENCHES}; do
  case $name in
    losses) cap=60 ;; window_attention) cap=70 ;; norm_act) cap=45 ;; models) cap=60 ;; sam_attention) cap=60 ;;
    conv_block) cap=55 ;; sliding_window) cap=45 ;; *) cap=30 ;;
  esac
  EXTRA=()
  if [ "$name" = sliding_window ]; then  # whole volumes: few rounds; the UNet case (blending vs the network) second
    EXTRA=(--reps 3 --warmup 1 --cases accumulation-c3,unet,accumulation-c14,swinunetr)
    [ "$MODE" = rehearse ] && EXTRA=(--reps 3 --warmup 1 --cases accumulation-c3)  # fastmed's UNet: interpreted
  fi
  [ "$MODE" = rehearse ] && cap=$((cap * 4))
  step "4. bench_$name (limit ${cap} s)"
  # shellcheck disable=SC2086
  run "bench_$name" $cap $PY "bench/bench_$name.py" $BENCH_ARGS "${EXTRA[@]}"
done

step "5. results"
$PY bench/results_io.py --merge "$OUT/device_check.json" "$TMP" || FAILED+=("merge")
$PY bench/summarize.py --targets "$OUT/device_check.json" > "$OUT/summary.md" || FAILED+=("summarize")
grep -A20 "GPU targets" "$OUT/summary.md"
head -5 "$OUT/summary.md"
if $PY -c "import matplotlib" 2>/dev/null; then
  $PY bench/plot.py "$OUT/device_check.json" --out "$OUT/plots" || FAILED+=("plot")
else
  echo "matplotlib is not installed here: plot from the results file afterwards (bench/plot.py)"
fi
CHOICE_ARGS=()
[ "$MODE" = rehearse ] && CHOICE_ARGS=(--any-device)  # CPU rows say nothing about the GPU: rehearsal only
$PY bench/bench_conv_block.py --write-choice --from "$OUT/device_check.json" --choice-file "$OUT/_conv_block_choice.py" \
  "${CHOICE_ARGS[@]}" || FAILED+=("conv-choice")
if [ "$MODE" = rehearse ]; then
  # every step must have produced its part: rows of each benchmark, the table, a plot, the choice table
  $PY - "$OUT" ${BENCHES:-$DEFAULT_BENCHES} <<'PY' || FAILED+=("rehearsal-check")
import glob, json, os, sys
out, want = sys.argv[1], set(sys.argv[2:])
rows = json.load(open(os.path.join(out, "device_check.json")))["rows"]
timed = {r["op"] for r in rows if r.get("ms") is not None}
problems = [f"no timed rows from bench_{op}" for op in sorted(want - timed)]
problems += [f"{r['op']} {r['case']} {r['impl']}: {r['error']}" for r in rows if r.get("error")]
problems += [f"{r['op']} {r['case']} {r['impl']}: no min_bytes / pct_copy_bw" for r in rows
             if r.get("ms") is not None and (r.get("min_bytes") is None or r.get("pct_copy_bw") is None)]
if not glob.glob(os.path.join(out, "plots", "*.png")):
    problems.append("no plot")
if not os.path.exists(os.path.join(out, "_conv_block_choice.py")):
    problems.append("no conv choice table")
print(f"rehearsal: {len(rows)} rows from {sorted(timed)}")
for p in problems:
    print("  PROBLEM:", p)
sys.exit(1 if problems else 0)
PY
fi
rm -rf "$TMP"

step "done in $(( $(date +%s) - t0 )) s; outputs in $OUT"
ls "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "steps that failed, stopped or were skipped: ${FAILED[*]}"
  [ "$MODE" = rehearse ] && exit 1
fi
exit 0
