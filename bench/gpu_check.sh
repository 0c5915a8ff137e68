#!/usr/bin/env bash
# GPU check for one CUDA machine without network, sized for one 15-minute window (see bench/README.md):
#   1. the test tools from gpu-wheels/, installed offline into build/gpu-site (pip --no-index; only what the
#      machine's Python lacks);
#   2. correctness at real shapes: the gpu-marked tests (bf16 Mixtral, Qwen3-30B-A3B and DeepSeek-V3 layers
#      against fp32, zero host syncs under torch.cuda.set_sync_debug_mode, CUDA-graph capture of a decode layer);
#   3. the host-sync count table (bench/sync_count.py);
#   4. the kernel benchmarks (bench/bench_kernels_cuda.py: the three shapes at T = 64 and 4096, bf16;
#      fused_moe vs torch grouped_mm vs the eager loop; TFLOP/s and weight GB/s);
#   5. CUDA correctness of every kernel against its torch reference: the kernel test files, whose Triton cases
#      run on CUDA there (tests/triton_device.py), with the time left;
#   6. optionally (COMPILE_CHECK=1) the compile check of every kernel for sm_90 and sm_80.
# No `set -e`: every step runs whatever the others did, with its own time limit, inside a total budget
# (GPU_CHECK_SECONDS, default 540). Each step's exit code, time and log are recorded, and one Markdown summary
# (date, GPU, versions, results, benchmark table) is rewritten after every step, so it exists however the run
# ends: bench/results/gpu_check_<UTC stamp>.md, logs in bench/results/gpu_check_<UTC stamp>/; both are copied
# to $OUT when that is set (the project's device machine returns $OUT). Nothing reaches the network.
#
#   make gpu-wheels                    # once, where there is network: gpu-wheels/ (a few MB, git-ignored)
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root or anywhere
#   PYTHON=python3.11 GPU_CHECK_SECONDS=900 COMPILE_CHECK=1 bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=bench/results
RUN_DIR=$RESULTS/gpu_check_$STAMP
SUMMARY=$RESULTS/gpu_check_$STAMP.md
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-540} ))
mkdir -p "$RUN_DIR" build
export PYTHONPATH="$ROOT/build/gpu-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_DEFAULT_TIMEOUT=5
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TRITON_HOME="$ROOT/build/triton-home"  # Triton's compile cache stays inside the tree

STEP_NAMES=(); STEP_RCS=(); STEP_SECS=(); STEP_NOTES=()
record() { STEP_NAMES+=("$1"); STEP_RCS+=("$2"); STEP_SECS+=("$3"); STEP_NOTES+=("$4"); write_summary; }

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in $RUN_DIR/NAME.log, within LIMIT_S and the budget
step() {
  local name=$1 limit=$2; shift 2
  local now left start rc
  now=$(date +%s); left=$(( DEADLINE - now ))
  if (( left < 30 )); then record "$name" skipped 0 "out of time (GPU_CHECK_SECONDS)"; return 0; fi
  (( limit > left )) && limit=$left
  echo "== $name (at most ${limit}s)"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$RUN_DIR/$name.log" 2>&1
  rc=$?
  tail -n 4 "$RUN_DIR/$name.log"
  local note=""
  (( rc == 124 || rc == 137 )) && note="timed out after ${limit}s"
  record "$name" "$rc" "$(( $(date +%s) - start ))" "$note"
  return 0
}
skip() { echo "== $1: skipped ($2)"; record "$1" skipped 0 "$2"; }
has() { "$PY" -c "import $1" > /dev/null 2>&1; }

section() {  # section TITLE FILE: the file's content, or a line saying why it is not there
  echo; echo "## $1"; echo
  if [[ -s $2 ]]; then cat "$2"; else echo "(no result: see the steps table)"; fi
}

write_summary() {
  {
    echo "# moeless GPU check, $STAMP"
    echo
    echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
    echo "- host: $(hostname 2>/dev/null || echo '?'); GPU: ${GPU:-?}"
    echo "- python: ${PY_VERSION:-?}; torch: ${TORCH_VERSION:-?}; triton: ${TRITON_VERSION:-?}; CUDA device: ${HAS_CUDA:-?}"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'n/a (no .git in this copy)')"
    echo "- logs: $RUN_DIR/"
    echo
    echo "| step | exit code | seconds | note |"
    echo "|---|---|---:|---|"
    local i
    for i in "${!STEP_NAMES[@]}"; do
      echo "| ${STEP_NAMES[$i]} | ${STEP_RCS[$i]} | ${STEP_SECS[$i]} | ${STEP_NOTES[$i]} |"
    done
    echo
    echo "## Correctness (Triton on CUDA against the torch references)"
    local log
    for log in correctness kernel_tests; do
      echo; echo "$log:"
      if [[ -s $RUN_DIR/$log.log ]]; then
        echo '```'
        grep -E "^(FAILED|ERROR) " "$RUN_DIR/$log.log" | head -40
        tail -n 1 "$RUN_DIR/$log.log"
        echo '```'
      else
        echo "(not run: see the steps table)"
      fi
    done
    echo
    echo "CUDA-graph capture of a decode layer: $(graph_result)"
    section "Host syncs per fused_moe call" "$RUN_DIR/sync_count.md"
    section "Benchmark (bf16; weight GB/s = bytes of the experts hit / time)" "$RUN_DIR/benchmark.md"
    if [[ -s $RUN_DIR/compile_check.md ]]; then
      echo; echo "## Compile check"; echo; head -n 1 "$RUN_DIR/compile_check.md"
      grep -A40 "FAILED" "$RUN_DIR/compile_check.log" 2>/dev/null | head -40
    fi
  } > "$SUMMARY"
  if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
    cp "$SUMMARY" "$OUT/" 2>/dev/null; cp -r "$RUN_DIR" "$OUT/" 2>/dev/null
  fi
}

graph_result() {  # from the JUnit XML of the correctness step
  local xml=$RUN_DIR/correctness.xml block
  [[ -s $xml ]] || { echo "unknown (no JUnit XML)"; return; }
  block=$(grep -A3 'name="test_decode_layer_has_no_host_sync_and_captures_in_a_cuda_graph"' "$xml" | head -4)
  if [[ -z $block ]]; then echo "not collected"
  elif grep -q "<skipped" <<< "$block"; then echo "skipped"
  elif grep -qE "<failure|<error" <<< "$block"; then echo "FAILED (see correctness.log)"
  else echo "passed (replayed on new inputs, bitwise equal to an eager call)"
  fi
}

# ---------------------------------------------------------------------------------------------------- 0. what runs
if "$PY" -c "import torch, triton" > "$RUN_DIR/environment.log" 2>&1; then
  read -r PY_VERSION TORCH_VERSION TRITON_VERSION HAS_CUDA < <("$PY" -c "import sys, torch, triton; \
print(sys.version.split()[0], torch.__version__, triton.__version__, torch.cuda.is_available())")
  if [[ $HAS_CUDA == True ]]; then
    GPU=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); \
print(f'{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s))')")
  else
    GPU="none"
  fi
  nvidia-smi -L >> "$RUN_DIR/environment.log" 2>&1
  record environment 0 0 ""
else
  record environment 1 0 "$PY cannot import torch and triton (PYTHON=... to choose another interpreter)"
  echo "$PY cannot import torch and triton; summary: $SUMMARY"
  exit 1
fi

# ---------------------------------------------------------------------------------------------------- 1. tools
missing=()
for module in pytest pytest_benchmark hypothesis tqdm; do has "$module" || missing+=("${module//_/-}"); done
if (( ${#missing[@]} == 0 )); then
  record install 0 0 "pytest, pytest-benchmark, hypothesis, tqdm already there"
elif [[ ! -d gpu-wheels ]]; then
  record install skipped 0 "no gpu-wheels/ (make gpu-wheels, then copy it here); missing: ${missing[*]}"
else
  rm -rf build/gpu-site
  step install 120 "$PY" -m pip install --no-index --find-links gpu-wheels --target build/gpu-site --quiet "${missing[@]}"
  STEP_NOTES[-1]="offline from gpu-wheels/: ${missing[*]} ${STEP_NOTES[-1]}"
fi
STILL_MISSING=()
for module in pytest pytest_benchmark hypothesis tqdm; do has "$module" || STILL_MISSING+=("$module"); done
(( ${#STILL_MISSING[@]} )) && STEP_NOTES[-1]="${STEP_NOTES[-1]} still missing: ${STILL_MISSING[*]}" && write_summary

# ---------------------------------------------------------------------------------------------------- 2-4. CUDA
# Most telling first: the real-shape tests (bf16 Mixtral / Qwen3 / DeepSeek-V3 layers against fp32, zero host
# syncs under the CUDA sync debug mode, CUDA-graph capture), the sync table and the benchmark; then the whole
# kernel suite on CUDA (many small shapes, each a kernel compile) with the time that is left.
GPU_TESTS=(tests/test_fused_moe.py tests/test_host_syncs.py)
KERNEL_TESTS=(tests/test_topk.py tests/test_dispatch.py tests/test_combine.py tests/test_grouped_gemm.py
              tests/test_fused_moe.py tests/test_host_syncs.py tests/test_launch_configs.py
              tests/test_kernel_properties.py)
if [[ $HAS_CUDA != True ]]; then
  # (the CPU counterparts run in CI: python bench/sync_count.py, the kernel tests under the interpreter)
  for name in correctness sync_count benchmark kernel_tests; do skip "$name" "no CUDA device"; done
  if has pytest; then  # still prove the offline tools load: collect the kernel tests and the benchmarks
    step collect_only 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only "${KERNEL_TESTS[@]}" \
      bench/bench_kernels_cuda.py
  fi
else
  if has pytest; then
    step correctness 150 "$PY" -m pytest -q -p no:cacheprovider -rfEs -m gpu --junitxml="$RUN_DIR/correctness.xml" \
      "${GPU_TESTS[@]}"
  else
    skip correctness "pytest missing (gpu-wheels/ not copied?)"
  fi
  step sync_count 60 "$PY" bench/sync_count.py --markdown "$RUN_DIR/sync_count.md"
  step benchmark 240 "$PY" bench/bench_kernels_cuda.py --json "$RUN_DIR/benchmark.json" \
    --markdown "$RUN_DIR/benchmark.md"
  if has pytest; then
    step kernel_tests 300 "$PY" -m pytest -q -p no:cacheprovider -rfEs "${KERNEL_TESTS[@]}"
  else
    skip kernel_tests "pytest missing"
  fi
fi

# ---------------------------------------------------------------------------------------------------- 6. compile
if [[ ${COMPILE_CHECK:-0} == 1 ]]; then
  step compile_check 240 "$PY" bench/compile_check.py --out "$RUN_DIR/compile_check.md"
fi

write_summary
echo "summary: $SUMMARY"
failed=0
for rc in "${STEP_RCS[@]}"; do [[ $rc == 0 || $rc == skipped ]] || failed=1; done
exit $failed
