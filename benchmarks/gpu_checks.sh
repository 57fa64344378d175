#!/usr/bin/env bash
# Every check that needs a GPU, as one script for a lent CUDA machine (the device tool's `run`).
#
#   bash benchmarks/gpu_checks.sh [LOG_FOLDER] [SECONDS]
#   STEPS="gpu-tests bench-gpu" bash benchmarks/gpu_checks.sh    # only these steps
#
# Builds the compiled CPU loops for that machine's python3, runs the test files that hold CUDA
# tests, then the GPU benchmarks, then (while SECONDS, default 540, allow) the whole suite. Each
# step's output goes to LOG_FOLDER (default $OUT, else ./gpu-logs) and to the terminal; a step
# that fails is reported and the next one still runs. Exits 0 when every step passed. STEPS
# (default: all) names the steps to run, so that a short lease can be split over two calls;
# METHODS (default: every method) names the methods bench-methods times.
set -u
export PYTHONUNBUFFERED=1
logs=${1:-${OUT:-gpu-logs}}
budget=${2:-540}
mkdir -p "$logs"
started=$(date +%s)
failed=()
python=${PYTHON:-python3}
steps=${STEPS:-gpu-tests bench-gpu bench-averaging bench-methods all-tests}
wanted() { [[ " $steps " == *" $1 "* ]]; }

step() { # step NAME TIMEOUT COMMAND...: run it, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(($(date +%s) - started)) s in)"
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log" | tail -n 60
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { failed+=("$name (exit $rc)"); echo "=== $name FAILED: exit $rc"; }
}

nvidia-smi -L
$python -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())'
step build 180 $python setup.py build_ext --inplace -q -j 4
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
$python -c 'from terge.kernels import fastloop, fastmethods; print("compiled loops:", fastloop.available(), fastmethods.available())'

cuda_tests=$(grep -rl "cuda" tests --include='test_*.py' | sort)
wanted gpu-tests && step gpu-tests 240 $python -m pytest -q -p no:cacheprovider -n 8 -rs $cuda_tests
wanted bench-gpu && step bench-gpu 150 $python benchmarks/bench_gpu.py --repeat 5 --profile --json "$logs/bench_gpu.json"
wanted bench-averaging && step bench-averaging 120 $python benchmarks/bench_averaging.py --device cuda --repeat 11
wanted bench-methods && step bench-methods 240 $python benchmarks/bench_methods.py --device cuda --repeat 3 --timeout 40 --json "$logs/bench_methods.json" ${METHODS:+--methods $METHODS}

left=$((budget - ($(date +%s) - started)))
if ! wanted all-tests; then
    :
elif [ "$left" -gt 60 ]; then
    step all-tests "$left" $python -m pytest -q -p no:cacheprovider -n 12 --maxfail 20
else
    echo "=== all-tests skipped: $left s left of $budget"
fi
echo "=== done in $(($(date +%s) - started)) s; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
