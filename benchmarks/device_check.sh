#!/usr/bin/env bash
# One-command GPU check: build the extensions, the GPU tests of every backend, the loss
# benchmark on its four default head shapes, the torch.compile baseline, the train-step
# benchmark, the 8B LoRA memory check and the activation bytes per token (stock vs lean
# layers). Copies logs and JSON into $OUT (default ./device_out).
# Every step has its own timeout (T_* variables) and a failing step never stops the next one.
# Budget: < 8 minutes on an H100 / H200 (torch 2.11, triton 3.6, no network). Wheels of missing
# optional packages (liger-kernel) in .whl/ are installed first when present.
#
#   bash benchmarks/device_check.sh            # from the repository root
#   OUT=/tmp/out bash benchmarks/device_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fastunlearn_site .whl/*.whl && export PYTHONPATH=/tmp/fastunlearn_site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
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

# 1. build the compiled extensions once (the machine starts with an empty build cache)
step build_ext "${T_BUILD:-90}" "$PY" -c "from fastunlearn.losses import cuda_backend, cpp_backend
print(cpp_backend.load().__file__)
import torch
print(cuda_backend.load().__file__ if torch.cuda.is_available() else 'no CUDA')"

# 2. GPU tests (all backends), strict: no silent fallback
step gpu_tests "${T_TESTS:-110}" env FASTUNLEARN_STRICT=1 "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider \
    --durations=15 tests/

# 2b. the C++ input-check test alone, with its full failure text (a native crash's faulthandler
# trace) in the log: it crashed on the H200 image once
step input_errors "${T_ERRORS:-40}" "$PY" -m pytest -m gpu -q -p no:cacheprovider --tb=short \
    tests/test_cuda_sources.py -k input_errors

HAS_CUDA=$(timeout 20 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
if [ "$HAS_CUDA" = "1" ]; then
    SHAPES=()  # the bench's four default head shapes
    COMPILE_SHAPES=(--shapes 8192x576x49152,8192x2048x128256)
else
    echo "no CUDA here: benchmark smoke test on tiny CPU shapes" | tee -a "$LOG"
    SHAPES=(--shapes 96x32x500)
    COMPILE_SHAPES=(--shapes 96x32x500)
fi

# 3. loss benchmark (quick mode: fewer repetitions)
step bench "${T_BENCH:-130}" "$PY" benchmarks/bench_loss.py --quick "${SHAPES[@]}" \
    --providers naive,liger,chunked,triton,cuda,floor,chunked_floor,rows

# 4. torch.compile baseline on the two smaller shapes (compile time is the cost)
step bench_compile "${T_COMPILE:-45}" "$PY" benchmarks/bench_loss.py --quick \
    "${COMPILE_SHAPES[@]}" \
    --providers compile,floor --out-name compile

# 5. whole unlearning step: paper-style vs ours (SmolLM2-135M, Llama-3.2-1B, random weights)
if [ "$HAS_CUDA" = "1" ]; then
    step train_step "${T_TRAIN:-130}" "$PY" benchmarks/bench_train_step.py
    step lora_8b "${T_LORA8B:-45}" "$PY" benchmarks/bench_train_step.py --lora-8b
    step activation_memory "${T_ACT:-40}" "$PY" benchmarks/bench_activation_memory.py \
        --device cuda
else
    step train_step 120 "$PY" benchmarks/bench_train_step.py --quick
fi

cp -f benchmarks/results/bench_loss_*.json benchmarks/results/train_step_*.json \
    benchmarks/results/activation_memory_*.json "$OUT"/ 2> /dev/null
echo "device_check done in $(( $(date +%s) - T0 ))s; files in $OUT" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"
exit 0
