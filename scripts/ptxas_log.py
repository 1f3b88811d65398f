#!/usr/bin/env python3
"""CUDA compiler launcher that keeps ptxas's resource report of each translation unit.

CMake runs every CUDA compile through it (CMAKE_CUDA_COMPILER_LAUNCHER, option
LONGTUNE_PTXAS_REPORT) with ``-Xptxas=-v`` added to the flags:

    ptxas_log.py --log-dir BUILD/ptxas/logs --build-dir BUILD -- [ccache] nvcc ARGS...

It runs the command, writes the ``ptxas info`` lines (and the indented ``N bytes stack frame, ...``
lines that belong to them) to ``<log-dir>/<object path relative to the build dir>.log`` and passes
every other stderr line through unchanged, so the build log keeps nvcc's warnings and errors but
is not flooded with one report per kernel. stdout and the exit status are the compiler's.
A command that is not a compile to an object (no ``-c``/``-o``) runs untouched.
scripts/ptxas_budget.py reads the logs.
"""

from __future__ import annotations

import os
import subprocess
import sys


def _arg_after(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv[:-1]):
        if a == flag:
            return argv[i + 1]
    return None


def _source(argv: list[str]) -> str | None:
    src = _arg_after(argv, "-c")
    if src is not None and not src.startswith("-"):
        return src
    cands = [a for a in argv if a.endswith(".cu") and not a.startswith("-")]
    return cands[-1] if cands else None


def _is_report_line(line: str, in_props: bool) -> bool:
    if line.startswith("ptxas info"):
        return True
    # "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" after
    # "ptxas info    : Function properties for NAME"
    return in_props and line.startswith(" ") and "bytes stack frame" in line


def split_stderr(text: str) -> tuple[list[str], list[str]]:
    """(report lines, lines to pass through) of a compiler's stderr."""
    report, other = [], []
    in_props = False
    for line in text.splitlines(keepends=True):
        if _is_report_line(line, in_props):
            report.append(line.rstrip("\n"))
            in_props = "Function properties for" in line
        else:
            other.append(line)
            in_props = False
    return report, other


def main(argv: list[str]) -> int:
    log_dir = build_dir = None
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] in ("--log-dir", "--build-dir") and i + 1 < len(argv):
            if argv[i] == "--log-dir":
                log_dir = argv[i + 1]
            else:
                build_dir = argv[i + 1]
            i += 2
        else:
            print(f"ptxas_log.py: unknown argument {argv[i]!r}", file=sys.stderr)
            return 2
    cmd = argv[i + 1 :]
    if not cmd or log_dir is None:
        print(
            "usage: ptxas_log.py --log-dir DIR [--build-dir DIR] -- COMPILER ARGS...",
            file=sys.stderr,
        )
        return 2
    obj = _arg_after(cmd, "-o")
    if "-c" not in cmd or obj is None:
        return subprocess.call(cmd)

    proc = subprocess.run(cmd, stderr=subprocess.PIPE)
    stderr = proc.stderr.decode("utf-8", errors="replace")
    report, other = split_stderr(stderr)
    if other:
        sys.stderr.write("".join(other))
        sys.stderr.flush()

    obj_abs = os.path.abspath(obj)
    base = os.path.abspath(build_dir) if build_dir else os.getcwd()
    rel = os.path.relpath(obj_abs, base)
    if rel.startswith(".."):
        rel = obj_abs.lstrip("/")
    log = os.path.join(log_dir, rel + ".log")
    if proc.returncode != 0:
        # no report for a failed compile (and none left over from an earlier one)
        if os.path.exists(log):
            os.remove(log)
        return proc.returncode
    src = _source(cmd)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    tmp = f"{log}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"# source: {os.path.abspath(src) if src else '?'}\n")
        f.write(f"# object: {obj_abs}\n")
        for line in report:
            f.write(line + "\n")
    os.replace(tmp, log)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
