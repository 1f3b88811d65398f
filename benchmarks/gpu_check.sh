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
# GPU_CHECK_DRY_RUN=1 (make gpu-check DRY_RUN=1): on a machine without a GPU (CI runs it after
# make test, against the tree's own build), every step that needs no GPU runs for real -- the
# arguments, the step selection, the machine probe, pytest --collect-only of tests/cuda and of the
# sanitizer subset (so a renamed test id fails), the benchmark families and the CLI's --help, the
# summary and the tarball -- and each GPU step prints the exact command it would run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
case "$DRY" in 0 | 1) ;; *) echo "gpu-check: GPU_CHECK_DRY_RUN must be 0 or 1, got '$DRY'" >&2; exit 2 ;; esac
ALL_STEPS="build tests sanitizer bench"
STEPS=" ${GPU_CHECK_STEPS:-$ALL_STEPS} "
for s in $STEPS; do
  [[ " $ALL_STEPS " == *" $s "* ]] || {
    echo "gpu-check: unknown step '$s' in GPU_CHECK_STEPS (expected any of: $ALL_STEPS)" >&2
    exit 2
  }
done
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${GPU_RESULTS:-gpu-results/$STAMP$([ "$DRY" = 1 ] && echo -dry-run)}
mkdir -p "$OUT" || { echo "gpu-check: cannot create the output folder '$OUT'" >&2; exit 2; }
status=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
want() { [[ "$STEPS" == *" $1 "* ]]; }
# a GPU step's command: run it, or (dry run) print it
would() { echo "   would run: $*" | tee -a "$OUT/summary.txt"; }
[ "$DRY" = 1 ] && step "dry run (no GPU needed): steps '$(echo $STEPS)', python $PY, results in $OUT"

step "machine"
{
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  $PY - <<'EOF'
import sys

import torch

print(sys.version)
print("torch", torch.__version__, torch.version.cuda)
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print("device", torch.cuda.get_device_name(), f"(sm_{major}{minor})")
    print(f"arch={major}{minor}")
else:
    print("device none (no CUDA device visible)")
    print("arch=")
EOF
} > "$OUT/machine.txt" 2>&1
grep -E "^device|^torch|Error" "$OUT/machine.txt" | tee -a "$OUT/summary.txt"
ARCH=$(sed -n 's/^arch=//p' "$OUT/machine.txt")
TORCH_V=$(sed -n 's/^torch \([^ ]*\).*/\1/p' "$OUT/machine.txt")
if [ -z "$ARCH" ]; then
  if [ "$DRY" = 1 ]; then
    ARCH='<the device'"'"'s sm, e.g. 90>'
  else
    echo "gpu-check: no CUDA device visible to $PY's torch (see $OUT/machine.txt); GPU_CHECK_DRY_RUN=1 checks the script without one" >&2
    exit 2
  fi
fi

if want build; then
  step "build (sm_$ARCH, against $TORCH_V)"
  CONFIGURE=(cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release "-DPython_EXECUTABLE=$(command -v "$PY")"
    "-DLONGTUNE_OUTPUT_DIR=$PWD/python/longtune" -DLONGTUNE_CUDA=ON "-DLONGTUNE_CUDA_ARCHS=$ARCH" -DLONGTUNE_EMU=ON)
  BUILD=(cmake --build build/gpu -j "$(nproc)")
  if [ "$DRY" = 1 ]; then
    would "${CONFIGURE[*]} > $OUT/build.log 2>&1"
    would "${BUILD[*]} >> $OUT/build.log 2>&1"
  else
    start=$(date +%s)
    "${CONFIGURE[@]}" > "$OUT/build.log" 2>&1 && "${BUILD[@]}" >> "$OUT/build.log" 2>&1
    rc=$?; echo "build rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || { tail -50 "$OUT/build.log"; exit $rc; }
  fi
elif [ ! -f "python/longtune/_C$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" ]; then
  echo "gpu-check: no build for $PY in python/longtune/; run with GPU_CHECK_STEPS containing build first" >&2
  exit 2
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"

# dry run: tests/cuda collected once, for the tests step and for the sanitizer subset's ids
if [ "$DRY" = 1 ] && { want tests || want sanitizer; }; then
  $PY -m pytest tests/cuda --collect-only -q -p no:cacheprovider > "$OUT/cuda-tests-collect.log" 2>&1 ||
    { tail -20 "$OUT/cuda-tests-collect.log"; status=1; }
fi

if want tests; then
  step "CUDA tests"
  if [ "$DRY" = 1 ]; then
    echo "   collected: $(tail -1 "$OUT/cuda-tests-collect.log")" | tee -a "$OUT/summary.txt"
    would "$PY -m pytest tests/cuda -q -rs -p no:cacheprovider > $OUT/cuda-tests.log 2>&1"
  else
    $PY -m pytest tests/cuda -q -rs -p no:cacheprovider > "$OUT/cuda-tests.log" 2>&1; rc=$?
    tail -3 "$OUT/cuda-tests.log" | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1
  fi
fi

SUBSET="tests/cuda/test_hadamard_cuda.py::test_factor_sizes[0-76-dtype2] tests/cuda/test_hadamard_cuda.py::test_pow2[4096-dtype2] tests/cuda/test_hadamard_cuda.py::test_pow2[128-dtype0] tests/cuda/test_hadamard_cuda.py::test_misaligned_rows[2048] tests/cuda/test_probes_cuda.py tests/cuda/test_attention_cuda.py::test_forward_backward[s2_leakfree-bf16] tests/cuda/test_attention_cuda.py::test_forward_backward[window_global-f16] tests/cuda/test_cross_entropy_cuda.py::test_forward_backward[T7-V50-d24-bf16]"
# shellcheck disable=SC2206  # SUBSET is a list of test ids
MEMCHECK=(compute-sanitizer --tool memcheck --error-exitcode 3 --target-processes all "$PY" -m pytest $SUBSET -q -p no:cacheprovider)
# shellcheck disable=SC2206
RACECHECK=(compute-sanitizer --tool racecheck --error-exitcode 3 --target-processes all "$PY" -m pytest $SUBSET -q -p no:cacheprovider)
if ! want sanitizer; then
  :
elif [ "$DRY" = 1 ]; then
  step "compute-sanitizer subset (test ids checked against the collection)"
  n=0; missing=""
  for id in $SUBSET; do  # a test id, or a file / test function standing for all its tests
    n=$((n + 1))
    grep -qxF -- "$id" "$OUT/cuda-tests-collect.log" || grep -qF -e "$id::" -e "$id[" "$OUT/cuda-tests-collect.log" ||
      missing="$missing $id"
  done
  if [ -n "$missing" ]; then
    echo "   subset: test ids not found in tests/cuda:$missing" | tee -a "$OUT/summary.txt"; status=1
  else
    echo "   subset: all $n entries found" | tee -a "$OUT/summary.txt"
  fi
  command -v compute-sanitizer >/dev/null || echo "   (compute-sanitizer: not found on this machine)" | tee -a "$OUT/summary.txt"
  would "${MEMCHECK[*]} > $OUT/memcheck.log 2>&1"
  would "${RACECHECK[*]} > $OUT/racecheck.log 2>&1"
elif command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer memcheck"
  "${MEMCHECK[@]}" > "$OUT/memcheck.log" 2>&1; rc=$?
  grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -3 | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1
  step "compute-sanitizer racecheck (shared-memory kernels)"
  "${RACECHECK[@]}" > "$OUT/racecheck.log" 2>&1; rc=$?
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -3 | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1
else
  step "compute-sanitizer not found: skipped"
fi

if want bench; then
  step "benchmarks vs GPU peers${BENCH_ONLY:+ ($BENCH_ONLY)}"
  # shellcheck disable=SC2206  # BENCH_ONLY is a list of families
  BENCH=("$PY" -m longtune.bench --device cuda --out "$OUT" ${BENCH_ONLY:+--only $BENCH_ONLY} ${GPU_BASELINE:+--update-baseline})
  if [ "$DRY" = 1 ]; then
    # the families it would run (an unknown name in BENCH_ONLY fails here) and the CLI's --help
    $PY - ${BENCH_ONLY:-} > "$OUT/bench-families.txt" 2>&1 <<'EOF'
import contextlib
import io
import sys

from longtune import bench

with contextlib.redirect_stdout(io.StringIO()) as help_text:
    try:
        bench.main(["--help"])
    except SystemExit as e:
        if e.code not in (0, None):
            sys.exit(f"gpu-check: python -m longtune.bench --help failed ({e.code})")
if "--only" not in help_text.getvalue():
    sys.exit("gpu-check: python -m longtune.bench --help does not list --only")
FAMILIES = sys.modules["benchmarks.run_all"].FAMILIES
unknown = [f for f in sys.argv[1:] if f not in FAMILIES]
if unknown:
    sys.exit(
        f"gpu-check: unknown benchmark family in BENCH_ONLY: {' '.join(unknown)} "
        f"(known: {' '.join(FAMILIES)})"
    )
print(" ".join(sys.argv[1:] or FAMILIES))
EOF
    rc=$?
    echo "   families: $(tail -1 "$OUT/bench-families.txt")" | tee -a "$OUT/summary.txt"; [ $rc -eq 0 ] || status=1
    would "${BENCH[*]} > $OUT/bench.log 2>&1"
  else
    "${BENCH[@]}" > "$OUT/bench.log" 2>&1 || status=1
    sed -n '/^== summary/,$p' "$OUT/bench.log" | tee -a "$OUT/summary.txt"
  fi
fi

tar -czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")" || status=1
echo "gpu-check: results in $OUT (and $OUT.tar.gz), status $status$([ "$DRY" = 1 ] && echo ' (dry run)')" | tee -a "$OUT/summary.txt"
exit $status
