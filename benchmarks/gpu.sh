#!/usr/bin/env bash
# Everything Tulpar measures on a GPU machine, in one run:
#   1. the `gpu`-marked tests (tests/test_gpu.py): bf16 train step vs the CPU reference, DDP and FSDP2 over NCCL,
#      torch.compile, activation checkpointing, vLLM GPU serving and bitsandbytes (those two need the `gpu` extra);
#   2. training MFU of gpt-130m and kk-350m in bf16 (benchmarks/gpu_mfu.py);
#   3. serving tokens/s, our app vs raw vLLM vs HF (benchmarks/serve.py --gpu), when vLLM and Ray are installed and
#      SERVE_MODEL names an HF model directory (SERVE_GPU_MODEL: a bigger one for 4-bit vs 16-bit).
# Each part appends a dated section to docs/benchmarks.md; logs and JSON go to GPU_OUT (default
# benchmarks/.gpu-out). Exit status: non-zero when a test failed or a benchmark broke.
#
#   bash benchmarks/gpu.sh                       # PYTHON=python3 by default
#   SERVE_MODEL=/models/tiny-hf bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${GPU_OUT:-benchmarks/.gpu-out}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"

echo "== 1. gpu-marked tests"
"$PY" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q -rA \
  --junitxml="$OUT_DIR/gpu-tests.xml" 2>&1 | tee "$OUT_DIR/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" -eq 0 ] || status=1
"$PY" - "$OUT_DIR/gpu-tests.xml" "$tests_rc" <<'EOF'
import datetime, sys, xml.etree.ElementTree as ET
sys.path.insert(0, "benchmarks")
from machine import append_section
path, rc = sys.argv[1], sys.argv[2]
gpu = open(sys.argv[1].rsplit("/", 1)[0] + "/gpu.txt").read().strip()
rows = []
for case in ET.parse(path).getroot().iter("testcase"):
    outcome, why = "passed", ""
    for tag in ("failure", "error", "skipped"):
        el = case.find(tag)
        if el is not None:
            outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
            why = (el.get("message") or "").splitlines()[0][:120].replace("|", "/")
    rows.append(f"| {case.get('name')} | {outcome} | {float(case.get('time', 0)):.1f} | {why} |")
text = (f"\n## GPU tests (`pytest -m gpu`), {datetime.datetime.now():%Y-%m-%d %H:%M}\n\n"
        f"Machine: {gpu}. Command: `bash benchmarks/gpu.sh`; pytest exit status {rc}.\n\n"
        "| test | outcome | s | reason |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
print(text)
append_section(text)
EOF

echo "== 2. training MFU"
"$PY" benchmarks/gpu_mfu.py --json "$OUT_DIR/mfu.jsonl" 2>&1 | tee "$OUT_DIR/mfu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 3. serving"
if "$PY" -c "import vllm, ray" 2>/dev/null && [ -n "${SERVE_MODEL:-}" ]; then
  "$PY" benchmarks/serve.py --gpu --model "$SERVE_MODEL" ${SERVE_GPU_MODEL:+--gpu-model "$SERVE_GPU_MODEL"} \
    2>&1 | tee "$OUT_DIR/serve.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  why="vLLM and Ray are not installed in $PY's environment"
  "$PY" -c "import vllm, ray" 2>/dev/null && why="SERVE_MODEL names no HF model directory"
  "$PY" - "$why" <<'EOF'
import datetime, sys
sys.path.insert(0, "benchmarks")
from machine import append_section
append_section(f"\n## GPU serving, {datetime.datetime.now():%Y-%m-%d %H:%M}\n\nNot measured: {sys.argv[1]}.\n")
EOF
fi
cp docs/benchmarks.md "$OUT_DIR/benchmarks.md"
exit $status
