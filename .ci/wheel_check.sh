#!/usr/bin/env bash
# make wheel-check: builds a wheel of longtune (CPU kernels only: LONGTUNE_CUDA=OFF, no emulator),
# installs it into a fresh virtual environment that sees the project venv's packages (torch is not
# downloaded again), and imports it + runs one op from outside the source tree, checking that the
# installed copy (not the in-tree package) is the one imported.
# Usage: .ci/wheel_check.sh PYTHON [WORK_DIR]   (make wheel-check passes the venv's python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: wheel_check.sh PYTHON [WORK_DIR]}
WORK=$(realpath -m "${2:-build/wheel-check}")
start=$(date +%s)
export PATH="$(dirname "$PY"):$PATH"  # the venv's cmake and ninja
rm -rf "$WORK/dist" "$WORK/venv"
mkdir -p "$WORK/dist"
echo "wheel-check: building the wheel (LONGTUNE_CUDA=OFF, LONGTUNE_EMU=OFF) in $WORK"
# a build folder of its own, kept between runs (incremental)
LONGTUNE_CUDA=OFF LONGTUNE_EMU=OFF LONGTUNE_BUILD_DIR="$WORK/cmake" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .
wheel=$(ls "$WORK"/dist/longtune-*.whl)
echo "wheel-check: built $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"
# a fresh venv that also sees the project venv's site-packages (torch, numpy): a .pth line adds the
# folder to sys.path after the venv's own, and .pth files inside it (an in-tree longtune-dev.pth)
# are not processed
"$PY" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
parent=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$VPY" -c "import sysconfig, sys; open(sysconfig.get_paths()['purelib'] + '/project-venv.pth', 'w').write(sys.argv[1] + '\n')" "$parent"
"$VPY" -m pip install -q --no-deps --no-index "$wheel"
cd "$WORK"  # outside the source tree
"$VPY" - <<'PYEOF'
import pathlib, sys
import torch
import longtune
from longtune.reference.hadamard import hadamard_transform as ref

where = pathlib.Path(longtune.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in where.parents, f"imported {where}, not the installed wheel"
x = torch.randn(3, 64, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
got = longtune.hadamard_transform(x, scale=1.0)
torch.testing.assert_close(got, ref(x).to(got.dtype), rtol=1e-5, atol=1e-5)
print(f"wheel-check: import longtune {longtune.__version__} from {where.parent}; hadamard_transform matches "
      f"the reference; CUDA kernels: {longtune.has_cuda_kernels()}")
PYEOF
echo "wheel-check: passed in $(( $(date +%s) - start )) s"
