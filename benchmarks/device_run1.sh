#!/usr/bin/env bash
# First GPU pass (lead): build the CUDA extension, GPU tests, loss bench, train-step bench.
set -u
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
OUT="${OUT:-$PWD/device_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
s() { local n=$1 t=$2; shift 2; echo "=== $n"; timeout --kill-after=5 "$t" "$@" > "$OUT/$n.log" 2>&1; echo "=== $n rc=$? ($SECONDS s)"; tail -n "${TAILN:-25}" "$OUT/$n.log"; }
s build "${T_BUILD:-120}" python3 -c "from fastunlearn.losses import cuda_backend as c; print(c.load())"
TAILN=30 s gpu_tests "${T_TESTS:-120}" env FASTUNLEARN_STRICT=1 python3 -m pytest -m gpu -q -rf -p no:cacheprovider --durations=8 tests/
s bench_loss "${T_BENCH:-120}" python3 benchmarks/bench_loss.py --quick --providers "${PROVIDERS:-naive,liger,chunked,triton,cuda,floor}"
s train_step "${T_TRAIN:-60}" python3 benchmarks/bench_train_step.py
cp -f benchmarks/results/*.json "$OUT"/ 2>/dev/null
echo "done in $SECONDS s"
