#!/usr/bin/env bash
# Applies the repository's formatters in place: ruff's safe fixes (import order, unused imports)
# and ruff's formatter on the Python sources, clang-format (.clang-format) on csrc/.
# `make lint` checks that the tree is formatted; `make format` runs this script.
# Tools: $VENV/bin/{ruff,clang-format} (installed by `make setup`), else the ones on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

tool() {
  if [ -x "$VENV/bin/$1" ]; then
    echo "$VENV/bin/$1"
  elif command -v "$1" >/dev/null; then
    command -v "$1"
  else
    echo "format.sh: $1 not found; run 'make setup' or 'pip install ruff clang-format'" >&2
    exit 1
  fi
}
RUFF=$(tool ruff)
CLANG_FORMAT=$(tool clang-format)

"$RUFF" check --fix --exit-zero --quiet .
"$RUFF" format .
git ls-files -z -- 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' | xargs -0 -r "$CLANG_FORMAT" -i
echo "format.sh: done (ruff $("$RUFF" --version | cut -d' ' -f2), $("$CLANG_FORMAT" --version | grep -o 'version [0-9.]*'))"
