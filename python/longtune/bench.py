"""``python -m longtune.bench [options]`` (console script ``longtune-bench``): runs longtune's
benchmark suite -- every family, or ``--only FAMILY ...``; ``--quick`` for the small cases;
``--check`` for the regression gate -- and writes JSON, CSV and PNG into ``--out`` (default
``./bench-results/<UTC stamp>/``), with a progress bar when tqdm is installed. ``--help`` lists
every option.

The suite is the ``benchmarks`` package of a longtune source checkout (its baselines live there
too). It is imported as installed or from the working directory, else from the checkout this
``longtune`` is imported from (an in-tree or editable build)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path


def _load_benchmarks():
    """The ``benchmarks`` package: importable as is, or the one next to this package's source
    tree."""
    try:
        return importlib.import_module("benchmarks.run_all")
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.run_all"):
            raise
    pkg = Path(__file__).resolve().parents[2] / "benchmarks"  # <checkout>/python/longtune/bench.py
    init = pkg / "__init__.py"
    if not init.is_file():
        raise SystemExit(
            "longtune.bench: the benchmark suite (the `benchmarks` package of a longtune source "
            "checkout) was not found; run from the repository root, or use an in-tree / editable "
            "install"
        )
    spec = importlib.util.spec_from_file_location(
        "benchmarks", init, submodule_search_locations=[str(pkg)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("benchmarks.run_all")


def main(argv=None) -> int:
    return _load_benchmarks().main(argv)


if __name__ == "__main__":
    sys.exit(main())
