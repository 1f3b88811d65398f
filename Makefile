# longtune: the README's commands.
#   make test       bootstrap .venv, lint, build (CPU + CUDA when nvcc is found + emulator), check the CUDA
#                   kernels' ptxas budget (no spill, no stack in hot kernels, <= 255 registers, >= 1 block
#                   per SM; skipped without CUDA; table in $(BUILD_DIR)/ptxas/ptxas.md), run all tests
#   make ptxas-report  CUDA build + the same check, writing the committed table
#                   benchmarks/results/ptxas.{md,json} (regenerate it with this one command)
#   make lint       ruff check + ruff format --check (Python), clang-format --dry-run -Werror (csrc/)
#   make format     apply the formatters (scripts/format.sh)
#   make bench      bootstrap, build, run the benchmarks -> bench-results/<stamp>/*.json|csv|png + a summary
#   make bench-check  a quick benchmark run compared with benchmarks/baselines/ (fails on a regression)
#   make wheel-check  build a CPU-only wheel (pip wheel --no-build-isolation), install it into a fresh venv
#                   (seeing .venv's torch) and import it + run one op from outside the tree
#   make gpu-check  on a GPU machine: build against its torch, CUDA tests, compute-sanitizer,
#                   benchmarks vs GPU peers -> gpu-results/<stamp>/
#   make gpu-check DRY_RUN=1  the same script without a GPU (CI): runs every step that needs none
#                   (test collection, the sanitizer subset's ids, the benchmark families) and prints
#                   the GPU steps' commands
# Knobs: BENCH_ARGS (e.g. --quick, --only attention, --update-baseline), BENCH_CHECK_ARGS,
#        LONGTUNE_CUDA=AUTO|ON|OFF, LONGTUNE_CUDA_ARCHS="80;90", PYTHON=python3.11, VENV=.venv,
#        LINT=0 (make test without the lint step), DRY_RUN=1 (gpu-check), BUILD_DIR=build/dev
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LONGTUNE_CUDA ?= AUTO
LONGTUNE_CUDA_ARCHS ?= 80;90
BUILD_DIR ?= build/dev
TORCH_SPEC ?= torch==2.14.1
# the formatters' versions are pinned: another version formats differently and `make lint` would fail
LINT_SPEC ?= ruff==0.17.6 clang-format==23.1.5

# make has a built-in LINT variable (the `lint` program): replace that default, keep a user's LINT=0
ifeq ($(origin LINT),default)
LINT := 1
endif
export LONGTUNE_CUDA LONGTUNE_CUDA_ARCHS

.PHONY: all setup build test lint format bench bench-check wheel-check gpu-check ptxas-report clean

all: test

# ---------------------------------------------------------------- environment
$(VENV)/.deps-stamp: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy pytest hypothesis scipy pybind11 ninja "cmake>=3.26" triton matplotlib tqdm \
	  "transformers>=4.56" safetensors peft trl $(LINT_SPEC)
	@touch $@

setup: $(VENV)/.deps-stamp

# ---------------------------------------------------------------- build (CMake is the build truth)
# The extension lands in python/longtune/ (in-tree), and the package is installed editable once.
build: setup
	@PATH="$(abspath $(VENV))/bin:$$PATH" cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -DLONGTUNE_OUTPUT_DIR=$(abspath python/longtune) \
	  -DLONGTUNE_CUDA=$(LONGTUNE_CUDA) "-DLONGTUNE_CUDA_ARCHS=$(LONGTUNE_CUDA_ARCHS)" -DLONGTUNE_EMU=ON >/dev/null
	@start=$$(date +%s); PATH="$(abspath $(VENV))/bin:$$PATH" cmake --build $(BUILD_DIR) -j $${MAX_JOBS:-$$(nproc)} && \
	  echo "longtune: build finished in $$(( $$(date +%s) - start )) s"
	@# make the in-tree package importable from the venv (what `pip install -e .` does, minus a second build)
	@$(PY) -c "import sysconfig; open(sysconfig.get_paths()['purelib'] + '/longtune-dev.pth', 'w').write('$(abspath python)\\n')"

# ---------------------------------------------------------------- lint (config: pyproject.toml [tool.ruff], .clang-format)
CXX_SOURCES = $(shell git ls-files -- 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 2>/dev/null || \
                find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')

# every check runs; the target fails if any of them does
lint: setup
	@rc=0; \
	echo "lint: ruff check"; $(VENV)/bin/ruff check . || rc=1; \
	echo "lint: ruff format --check"; $(VENV)/bin/ruff format --check . || rc=1; \
	echo "lint: clang-format --dry-run -Werror (csrc/)"; \
	  $(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES) || rc=1; \
	if [ $$rc -ne 0 ]; then echo "lint: failed (make format applies the formatters)"; fi; exit $$rc

format: setup
	VENV=$(VENV) bash scripts/format.sh

# ---------------------------------------------------------------- the two commands
# The ptxas budget (scripts/ptxas_budget.py) runs right after the build; the tests run either way
# and the target fails if either does. LONGTUNE_CUDA=ON makes a build without CUDA kernels a failure.
PTXAS_CHECK = $(PY) scripts/ptxas_budget.py $(BUILD_DIR) $(if $(filter ON,$(LONGTUNE_CUDA)),--require-cuda)
test: $(if $(filter 1,$(LINT)),lint) build
	@$(PTXAS_CHECK) --out-dir $(BUILD_DIR)/ptxas; prc=$$?; \
	  set -o pipefail; $(PY) -m pytest tests -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=1; fi; \
	  if [ $$prc -ne 0 ]; then echo "make test: the ptxas budget check failed (see above)"; [ $$rc -ne 0 ] || rc=$$prc; fi; \
	  exit $$rc

# the committed table: a CUDA build for LONGTUNE_CUDA_ARCHS, then benchmarks/results/ptxas.{md,json}
ptxas-report: LONGTUNE_CUDA = ON
ptxas-report: build
	$(PTXAS_CHECK)

BENCH_ARGS ?=
BENCH_CHECK_ARGS ?= --quick
bench: build
	$(PY) -m longtune.bench $(BENCH_ARGS)

bench-check: build
	$(PY) -m longtune.bench --check $(BENCH_CHECK_ARGS)

wheel-check: setup
	bash .ci/wheel_check.sh $(abspath $(PY)) build/wheel-check

# DRY_RUN=1 (or GPU_CHECK_DRY_RUN=1): no GPU needed; it then uses .venv's python unless PYTHON is set
DRY_RUN ?= $(GPU_CHECK_DRY_RUN)
gpu-check:
	$(if $(filter 1,$(DRY_RUN)),GPU_CHECK_DRY_RUN=1 $(if $(and $(filter file,$(origin PYTHON)),$(wildcard $(PY))),PYTHON=$(abspath $(PY)))) \
	  bash benchmarks/gpu_check.sh

clean:
	rm -rf build python/longtune/_C*.so
