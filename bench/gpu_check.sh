#!/usr/bin/env bash
# GPU check on one CUDA machine (fits in 8 minutes on one H200): the gpu-marked correctness tests, then the CUDA
# kernel benchmarks. Results go to bench/results/: pytest-benchmark's JSON and a Markdown table (date, GPU, torch,
# triton, per case: median ms, TFLOP/s, GB/s).
#
#   bash bench/gpu_check.sh            # from the repository root; PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=bench/results
mkdir -p "$OUT_DIR"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

# test dependencies: only what is missing (the GPU image usually has them; it may have no network)
for pkg in pytest pytest_benchmark hypothesis; do
  "$PY" -c "import $pkg" 2>/dev/null || "$PY" -m pip install -q "${pkg//_/-}" || echo "could not install $pkg"
done
# the package itself, without touching the machine's torch/triton; PYTHONPATH covers an offline machine
"$PY" -m pip install -q -e . --no-deps --no-build-isolation 2>/dev/null || echo "pip install -e . failed; using PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print('GPU', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)"

echo "== correctness (gpu-marked tests)"
set +e
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_moe.py 2>&1 | tee "$OUT_DIR/gpu_tests_$STAMP.log"
tests_rc=${PIPESTATUS[0]}
set -e

echo "== benchmarks"
JSON="$OUT_DIR/kernels_cuda_$STAMP.json"
"$PY" -m pytest -q -p no:cacheprovider bench/bench_kernels_cuda.py --benchmark-only \
  --benchmark-json="$JSON" --benchmark-columns=median,min,rounds --benchmark-sort=name

"$PY" - "$JSON" "$OUT_DIR/kernels_cuda_$STAMP.md" <<'EOF'
"""Markdown summary of the pytest-benchmark JSON: one row per (model, tokens, implementation)."""
import json
import sys

data = json.load(open(sys.argv[1]))
rows = sorted((b["extra_info"] for b in data["benchmarks"]),
              key=lambda i: (i["model"], i["tokens"], i["implementation"]))
first = rows[0] if rows else {}
lines = [
    "# moeless CUDA kernel benchmark",
    "",
    f"date {data.get('datetime', '?')} | GPU {first.get('device', '?')} | torch {first.get('torch', '?')} | "
    f"triton {first.get('triton', '?')} | bf16",
    "",
    "| model | T | implementation | median ms | TFLOP/s | GB/s | experts hit |",
    "|---|---:|---|---:|---:|---:|---:|",
]
for i in rows:
    lines.append(f"| {i['model']} | {i['tokens']} | {i['implementation']} | {i.get('median_ms', float('nan')):.3f} | "
                 f"{i.get('tflops', float('nan')):.1f} | {i.get('gbps', float('nan')):.0f} | {i['experts_hit']} |")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "results: $JSON and ${JSON%.json}.md"
# the benchmarks run even when a correctness test fails (their numbers still say something); the exit code tells
exit "$tests_rc"
