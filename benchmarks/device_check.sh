#!/usr/bin/env bash
# One-command GPU check: the GPU tests of every backend, then the loss benchmark on the
# issue's four head shapes. Copies logs and JSON into $OUT (default ./device_out).
# Every step has its own timeout and a failing step never stops the next one.
# Budget: < 6 minutes on an H100 / H200 (torch 2.11, triton 3.6, no network): step limits
# 30 + 20 + 140 + 150 + 40 s; a step that hits its limit is killed and the next one runs.
#
#   bash benchmarks/device_check.sh            # from the repository root
#   OUT=/tmp/out bash benchmarks/device_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
LOG="$OUT/device_check.log"
: > "$LOG"
T0=$(date +%s)

step() {  # step NAME TIMEOUT_S CMD... : run, log, never abort the script
    local name=$1 limit=$2
    shift 2
    echo "=== [$name] start (limit ${limit}s, t=$(( $(date +%s) - T0 ))s): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log" | tee -a "$LOG"
    echo "=== [$name] rc=$rc (t=$(( $(date +%s) - T0 ))s)" | tee -a "$LOG"
}

step env 30 "$PY" - <<'EOF'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
from fastunlearn.losses import describe_backends
for b in describe_backends():
    print(b)
EOF
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# 1. GPU tests (all backends), strict: no silent fallback
step gpu_tests 140 env FASTUNLEARN_STRICT=1 "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider \
    --durations=15 tests/

HAS_CUDA=$(timeout 20 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
if [ "$HAS_CUDA" = "1" ]; then
    SHAPES=()  # the bench's defaults: the four shapes of issue 3
    COMPILE_SHAPES=(--shapes 8192x576x49152,8192x2048x128256)
else
    echo "no CUDA here: benchmark smoke test on tiny CPU shapes" | tee -a "$LOG"
    SHAPES=(--shapes 96x32x500)
    COMPILE_SHAPES=(--shapes 96x32x500)
fi

# 2. benchmark (quick mode: fewer repetitions)
step bench 150 "$PY" benchmarks/bench_loss.py --quick "${SHAPES[@]}" \
    --providers naive,liger,chunked,triton,cuda,cpp,floor,rows

# 3. torch.compile baseline on the two smaller shapes (compile time is the cost)
step bench_compile 40 "$PY" benchmarks/bench_loss.py --quick "${COMPILE_SHAPES[@]}" \
    --providers compile,floor --out-name compile

cp -f benchmarks/results/bench_loss_*.json "$OUT"/ 2> /dev/null
echo "device_check done in $(( $(date +%s) - T0 ))s; files in $OUT" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
exit 0
