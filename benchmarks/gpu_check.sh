#!/usr/bin/env bash
# make gpu-check: everything only a GPU can tell, in one go, on a GPU machine
# (Python 3.12 + torch 2.11 there, no network). Builds against that machine's own torch for its own
# architecture, runs tests/cuda, compute-sanitizer (memcheck on every CUDA kernel family, racecheck
# on the shared-memory kernels) over a small CUDA test subset, then the benchmarks against the GPU
# peers. Everything lands in one folder (default gpu-results/<UTC stamp>/) plus a tarball of it.
# GPU_BASELINE=1 also records the benchmark run as the GPU baselines (benchmarks/baselines/cuda/,
# python -m longtune.bench --update-baseline): review and commit them.
# When GPU time comes in short slots (e.g. ~15 minutes in all, 10 per command), the steps can be run in separate calls
# on the same warm machine (the build folder is kept between calls):
#   GPU_CHECK_STEPS="build tests"  then  GPU_CHECK_STEPS="sanitizer bench" BENCH_ONLY="attention cross_entropy"
# GPU_CHECK_STEPS: any of build tests sanitizer bench (default all); BENCH_ONLY: benchmark families
# (python -m longtune.bench --only; default all).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${GPU_RESULTS:-gpu-results/$STAMP}
mkdir -p "$OUT"
status=0
STEPS=" ${GPU_CHECK_STEPS:-build tests sanitizer bench} "
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
want() { [[ "$STEPS" == *" $1 "* ]]; }

step "machine"
(nvidia-smi; $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())") \
  > "$OUT/machine.txt" 2>&1
ARCH=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")

if want build; then
  step "build (sm_$ARCH, against $($PY -c 'import torch; print(torch.__version__)'))"
  start=$(date +%s)
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DLONGTUNE_OUTPUT_DIR="$PWD/python/longtune" -DLONGTUNE_CUDA=ON "-DLONGTUNE_CUDA_ARCHS=$ARCH" \
    -DLONGTUNE_EMU=ON > "$OUT/build.log" 2>&1 && cmake --build build/gpu -j "$(nproc)" >> "$OUT/build.log" 2>&1
  rc=$?; echo "build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || { tail -50 "$OUT/build.log"; exit $rc; }
elif [ ! -f "python/longtune/_C$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" ]; then
  echo "gpu-check: no build for $PY in python/longtune/; run with GPU_CHECK_STEPS containing build first" >&2
  exit 2
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"

if want tests; then
  step "CUDA tests"
  $PY -m pytest tests/cuda -q -rs -p no:cacheprovider > "$OUT/cuda-tests.log" 2>&1; rc=$?
  tail -3 "$OUT/cuda-tests.log" | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1
fi

SUBSET="tests/cuda/test_hadamard_cuda.py::test_factor_sizes[0-76-dtype2] tests/cuda/test_hadamard_cuda.py::test_pow2[4096-dtype2] tests/cuda/test_hadamard_cuda.py::test_pow2[128-dtype0] tests/cuda/test_hadamard_cuda.py::test_misaligned_rows[2048] tests/cuda/test_probes_cuda.py tests/cuda/test_attention_cuda.py::test_forward_backward[s2_leakfree-bf16] tests/cuda/test_attention_cuda.py::test_forward_backward[window_global-f16] tests/cuda/test_cross_entropy_cuda.py::test_forward_backward[T7-V50-d24-bf16]"
if ! want sanitizer; then
  :
elif command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer memcheck"
  compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all \
    $PY -m pytest $SUBSET -q -p no:cacheprovider > "$OUT/memcheck.log" 2>&1; rc=$?
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3 | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1
  step "compute-sanitizer racecheck (shared-memory kernels)"
  compute-sanitizer --tool racecheck --error-exitcode 3 --target-processes all \
    $PY -m pytest $SUBSET -q -p no:cacheprovider > "$OUT/racecheck.log" 2>&1; rc=$?
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -3 | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1
else
  step "compute-sanitizer not found: skipped" 
fi

if want bench; then
  step "benchmarks vs GPU peers${BENCH_ONLY:+ ($BENCH_ONLY)}"
  $PY -m longtune.bench --device cuda --out "$OUT" ${BENCH_ONLY:+--only $BENCH_ONLY} \
    ${GPU_BASELINE:+--update-baseline} > "$OUT/bench.log" 2>&1 || status=1
  sed -n '/^== summary/,$p' "$OUT/bench.log" | tee -a "$OUT/summary.txt"
fi

tar -czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
echo "gpu-check: results in $OUT (and $OUT.tar.gz), status $status" | tee -a "$OUT/summary.txt"
exit $status
