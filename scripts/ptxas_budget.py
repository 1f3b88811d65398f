#!/usr/bin/env python3
"""Register / stack / spill / shared-memory budget of the CUDA kernels, from ptxas's own report.

    python scripts/ptxas_budget.py BUILD_DIR [--out-dir DIR] [--allow FILE] [--require-cuda]

Reads what a CUDA build with LONGTUNE_PTXAS_REPORT=ON (the default) leaves in BUILD_DIR/ptxas/:
config.txt (written by CMake: CUDA on or off, architectures, the CUDA translation units),
logs/**.log (ptxas's ``-v`` lines of each translation unit, filed by scripts/ptxas_log.py) and
launch_shapes.txt (each kernel's block size and dynamic shared memory, written by
csrc/cuda/launch_shapes.cpp). Writes OUT_DIR/ptxas.json and OUT_DIR/ptxas.md (default
benchmarks/results/) and exits non-zero listing every violation of the budget:

  spill      any spill store or load, in any kernel or device function
  stack      a stack frame (or a cumulative stack through calls) in a hot kernel
  regs       more than 255 registers per thread
  occupancy  fewer than 1 resident block per SM at the launched block size (registers x threads
             <= 65536, static + dynamic shared memory <= the architecture's per-block limit)
  shape      a hot kernel missing from csrc/cuda/launch_shapes.cpp (so its occupancy is unchecked)

Hot kernels are the product's: every kernel of lt::attn (forward and backward, every head dim),
lt::cross_entropy, lt::hadamard, lt::quant and lt::sparse_delta; the others (the intrinsics
self-test kernels) only must not spill.

A build without the CUDA kernels is skipped (exit 0) unless --require-cuda; a CUDA build without
the reports (option off, or a translation unit without its log) fails, so the check cannot go
quiet. The allow-list file (default benchmarks/ptxas_allow.txt) may excuse known violations, one
per line: ``KIND ARCH PATTERN  # reason`` with KIND one of the kinds above or ``*``, ARCH ``sm_90``
or ``*``, and PATTERN an fnmatch pattern of the demangled kernel name without its parameter list
(e.g. ``spill * lt::attn::attn_bwd_kernel*<*, 256, *>``); an entry that excuses nothing fails.
Exit status: 0 within budget (or skipped), 1 violations, 2 missing or unreadable reports.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_ALLOW = REPO / "benchmarks" / "ptxas_allow.txt"
REGEN = "make ptxas-report"

HOT = re.compile(r"^lt::(attn|cross_entropy|hadamard|quant|sparse_delta)::")
MAX_REGS = 255
REGS_PER_SM = 65536
KINDS = ("spill", "stack", "regs", "occupancy", "shape")


@dataclass(frozen=True)
class ArchLimits:
    smem_block: int  # opt-in shared memory per block, bytes
    smem_sm: int  # shared memory per SM, bytes
    threads_sm: int
    blocks_sm: int


# per-architecture limits (CUDA programming guide, compute capabilities table); each resident block
# also takes 1 KB of the SM's shared memory for the system
ARCHS = {
    80: ArchLimits(163 * 1024, 164 * 1024, 2048, 32),
    86: ArchLimits(99 * 1024, 100 * 1024, 1536, 16),
    87: ArchLimits(163 * 1024, 164 * 1024, 2048, 32),
    89: ArchLimits(99 * 1024, 100 * 1024, 1536, 24),
    90: ArchLimits(227 * 1024, 228 * 1024, 2048, 32),
    100: ArchLimits(227 * 1024, 228 * 1024, 2048, 32),
    103: ArchLimits(227 * 1024, 228 * 1024, 2048, 32),
    120: ArchLimits(99 * 1024, 100 * 1024, 1536, 32),
}
SMEM_RESERVED_PER_BLOCK = 1024


class ReportError(Exception):
    """The reports are missing or unreadable (exit status 2)."""


# ---------------------------------------------------------------- parsing ptxas -v


@dataclass
class Func:
    mangled: str
    arch: str = "?"
    entry: bool = False
    registers: int | None = None
    barriers: int = 0
    stack_frame: int = 0
    cumulative_stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem_static: int = 0
    source: str = ""


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_CUMUL = re.compile(r"(\d+) bytes cumulative stack size")
_SMEM = re.compile(r"(\d+) bytes smem")
_GMEM = re.compile(r"ptxas info\s*:\s*\d+ bytes gmem")


def parse_ptxas(text: str, source: str = "") -> list[Func]:
    """Kernels (entry=True) and device functions of ptxas -v output, in order, one per arch.

    ptxas prints, per architecture: "N bytes gmem", then for each kernel "Compiling entry function
    'NAME' for 'sm_XX'", "Function properties for NAME" + "A bytes stack frame, B bytes spill
    stores, C bytes spill loads", "Used R registers, [used K barriers,] [S bytes cumulative stack
    size,] [M bytes smem,] ..."; a device function that was not inlined gets its own "Function
    properties" block (without an entry line; its architecture is that of the kernels around it).
    """
    funcs: list[Func] = []
    cur: Func | None = None  # the kernel being reported
    target: Func | None = None  # the function whose properties line comes next
    arch = "?"
    pending: list[Func] = []  # device functions seen before the first kernel of an arch
    for raw in text.splitlines():
        line = raw.rstrip()
        if _GMEM.search(line):
            arch, cur, target = "?", None, None
            continue
        m = _ENTRY.search(line)
        if m:
            arch = m.group(2)
            for f in pending:
                f.arch = arch
            pending = []
            cur = Func(m.group(1), arch=arch, entry=True, source=source)
            funcs.append(cur)
            target = None
            continue
        m = _PROPS.search(line)
        if m:
            name = m.group(1)
            if cur is not None and name == cur.mangled:
                target = cur
            else:
                target = Func(name, arch=arch, entry=False, source=source)
                funcs.append(target)
                if arch == "?":
                    pending.append(target)
            continue
        m = _FRAME.search(line)
        if m and target is not None:
            target.stack_frame, target.spill_stores, target.spill_loads = map(int, m.groups())
            target = None
            continue
        m = _USED.search(line)
        if m and cur is not None:
            cur.registers = int(m.group(1))
            for rx, attr in ((_BARRIERS, "barriers"), (_CUMUL, "cumulative_stack")):
                mm = rx.search(line)
                if mm:
                    setattr(cur, attr, int(mm.group(1)))
            mm = _SMEM.search(line)
            if mm:
                cur.smem_static = int(mm.group(1))
    return funcs


# ---------------------------------------------------------------- names


_BUILTIN = {
    "v": "void",
    "b": "bool",
    "c": "char",
    "a": "signed char",
    "h": "unsigned char",
    "s": "short",
    "t": "unsigned short",
    "i": "int",
    "j": "unsigned int",
    "l": "long",
    "m": "unsigned long",
    "x": "long long",
    "y": "unsigned long long",
    "f": "float",
    "d": "double",
}


def _demangle_minimal(mangled: str) -> str | None:
    """The kernel's qualified name and template arguments from an Itanium-mangled name, for the
    forms the kernels use (nested names, builtin types, integer / bool literals, namespace
    substitutions), without the parameter list: 'lt::attn::k<lt::simt::bf16, 128, false>'. None
    for anything else (c++filt is used when installed; this is its stand-in)."""
    s, pos = mangled, 2
    if not s.startswith("_ZN"):
        return None
    prefixes: list[str] = []  # substitution candidates S_, S0_, ... (namespace prefixes)

    def ident(p: int) -> tuple[str, int]:
        m = re.match(r"\d+", s[p:])
        if not m:
            raise ValueError
        n, p = int(m.group()), p + len(m.group())
        return s[p : p + n], p + n

    def nested(p: int, record: bool) -> tuple[str, int]:
        parts: list[str] = []
        if s.startswith("S", p):
            m = re.match(r"S(\d*)_", s[p:])
            if not m:
                raise ValueError
            idx = int(m.group(1)) + 1 if m.group(1) else 0
            parts.append(prefixes[idx])
            p += len(m.group())
        while p < len(s) and s[p].isdigit():
            name, p = ident(p)
            parts.append(name)
            if record:
                prefixes.append("::".join(parts))
        return "::".join(parts), p

    def arg(p: int) -> tuple[str, int]:
        c = s[p]
        if c in _BUILTIN:
            return _BUILTIN[c], p + 1
        if c == "L":
            m = re.match(r"L([a-z])(n?\d+)E", s[p:])
            if not m:
                raise ValueError
            kind, val = m.group(1), m.group(2).replace("n", "-")
            text = ("true" if val == "1" else "false") if kind == "b" else val
            return text, p + len(m.group())
        if c == "N":
            name, p = nested(p + 1, record=False)
            if not s.startswith("E", p):
                raise ValueError
            return name, p + 1
        if c.isdigit() or c == "S":
            return nested(p, record=False)
        raise ValueError

    try:
        pos += 1
        name, pos = nested(pos, record=True)
        if s.startswith("I", pos):
            args, pos = [], pos + 1
            while not s.startswith("E", pos):
                a, pos = arg(pos)
                args.append(a)
            name += "<" + ", ".join(args) + ">"
        return name
    except (ValueError, IndexError):
        return None


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled (c++filt, one call; else a minimal demangler of the kernels' forms);
    names neither can demangle map to themselves."""
    out = {}
    for n in names:
        d = _demangle_minimal(n)
        out[n] = n if d is None else d
    tool = shutil.which("c++filt")
    if not names or tool is None:
        return out
    try:
        res = subprocess.run(
            [tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return out
    lines = res.stdout.splitlines()
    if len(lines) == len(names):
        out.update(zip(names, lines))
    return out


def strip_signature(demangled: str) -> str:
    """'void ns::k<T, 64>(ns::P<T>)' -> 'ns::k<T, 64>' (return type and parameter list dropped)."""
    s = demangled
    if s.startswith("void "):
        s = s[len("void ") :]
    depth = 0
    for i, c in enumerate(s):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0 and i > 0:
            return s[:i]
    return s


def display_name(name: str) -> str:
    """The table's kernel column: without the lt:: / simt:: qualifiers."""
    return name.replace("lt::", "").replace("simt::", "")


def family(name: str) -> str:
    m = re.match(r"^lt::(\w+)::", name)
    return m.group(1) if m else "other"


# ---------------------------------------------------------------- build directory


@dataclass
class BuildInfo:
    cuda: bool
    report: bool
    archs: str
    nvcc: str
    source_dir: str
    sources: list[str]


def read_config(build: Path) -> BuildInfo:
    cfg = build / "ptxas" / "config.txt"
    if not cfg.is_file():
        if not (build / "CMakeCache.txt").is_file():
            raise ReportError(f"{build} is not a CMake build directory (no CMakeCache.txt)")
        raise ReportError(
            f"{cfg} not found: the build directory was configured by an older CMakeLists.txt; "
            "re-run cmake (make build) and build again"
        )
    kv: dict[str, str] = {}
    sources: list[str] = []
    for line in cfg.read_text().splitlines():
        key, _, val = line.partition("=")
        if key == "source":
            sources.append(val)
        elif key:
            kv[key] = val

    def on(v: str | None) -> bool:
        return (v or "").upper() in ("ON", "TRUE", "1", "YES")

    return BuildInfo(
        cuda=on(kv.get("cuda")),
        report=on(kv.get("report")),
        archs=kv.get("archs", ""),
        nvcc=kv.get("nvcc", ""),
        source_dir=kv.get("source_dir", ""),
        sources=sources,
    )


def expected_archs(archs: str) -> set[str] | None:
    """{'sm_80', 'sm_90'} for '80;90' (None when the list has entries like 'native' or 'all')."""
    out = set()
    for a in filter(None, archs.split(";")):
        m = re.fullmatch(r"(\d+[a-z]?)(-real|-virtual)?", a.strip())
        if not m:
            return None
        if m.group(2) != "-virtual":
            out.add(f"sm_{m.group(1)}")
    return out


def read_logs(build: Path, info: BuildInfo) -> list[Func]:
    logs_dir = build / "ptxas" / "logs"
    logs = sorted(logs_dir.rglob("*.log")) if logs_dir.is_dir() else []
    if not logs:
        raise ReportError(
            f"CUDA was built in {build} but no ptxas reports were found under {logs_dir}: "
            "build with LONGTUNE_PTXAS_REPORT=ON (the default) and rebuild the CUDA sources"
        )
    by_source: dict[str, Path] = {}
    for log in logs:
        with open(log) as f:
            head = f.readline()
        if head.startswith("# source: "):
            by_source[head[len("# source: ") :].strip()] = log
    missing = [s for s in info.sources if s not in by_source]
    if missing:
        lines = "\n  ".join(missing)
        raise ReportError(
            f"no ptxas report for {len(missing)} CUDA translation unit(s) in {build}:\n  {lines}\n"
            "(the report is written when the unit compiles: touch it, or rebuild the CUDA sources)"
        )
    wanted = info.sources or list(by_source)
    funcs: list[Func] = []
    for src in wanted:
        funcs += parse_ptxas(by_source[src].read_text(), source=src)
    return funcs


def read_launch_shapes(path: Path) -> list[tuple[str, int, int | None]]:
    """(pattern, threads, dynamic smem bytes or None when it depends on the call)."""
    shapes = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ReportError(f"{path}:{n}: expected 'pattern<TAB>threads<TAB>smem', got {line!r}")
        pat, threads, smem = parts
        shapes.append((pat, int(threads), None if smem == "runtime" else int(smem)))
    return shapes


# ---------------------------------------------------------------- the budget


@dataclass
class Kernel:
    name: str  # demangled, without the parameter list
    mangled: str
    family: str
    arch: str
    hot: bool
    registers: int
    barriers: int
    stack_frame: int
    cumulative_stack: int
    spill_stores: int
    spill_loads: int
    smem_static: int
    threads: int | None = None
    smem_dynamic: int | None = None  # None: unknown (no shape) or set per call
    smem_dynamic_runtime: bool = False
    blocks_per_sm: int | None = None
    source: str = ""
    violations: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def blocks_per_sm(regs: int, threads: int, smem: int, limits: ArchLimits) -> int:
    """Resident blocks per SM (registers in 256-register units per warp, 1 KB of shared memory
    reserved per block)."""
    warps = (threads + 31) // 32
    regs_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = (REGS_PER_SM // regs_warp) // warps
    by_smem = limits.smem_sm // (smem + SMEM_RESERVED_PER_BLOCK) if smem > 0 else limits.blocks_sm
    if smem > limits.smem_block:
        by_smem = 0
    return min(by_regs, by_smem, limits.threads_sm // (warps * 32), limits.blocks_sm)


def arch_number(arch: str) -> int | None:
    m = re.fullmatch(r"sm_(\d+)[a-z]?", arch)
    return int(m.group(1)) if m else None


def build_kernels(
    funcs: list[Func], shapes: list[tuple[str, int, int | None]] | None
) -> tuple[list[Kernel], list[dict]]:
    """The kernels' rows (with their violations) and the device functions that were not inlined."""
    names = demangle(sorted({f.mangled for f in funcs}))
    kernels: dict[tuple[str, str], Kernel] = {}
    devfuncs: dict[tuple[str, str], dict] = {}
    for f in funcs:
        name = strip_signature(names[f.mangled])
        if not f.entry:
            d = devfuncs.setdefault(
                (f.mangled, f.arch),
                {
                    "name": name,
                    "mangled": f.mangled,
                    "arch": f.arch,
                    "stack_frame": f.stack_frame,
                    "spill_stores": f.spill_stores,
                    "spill_loads": f.spill_loads,
                    "source": f.source,
                    "violations": [],
                    "allowed": [],
                },
            )
            if f.spill_stores or f.spill_loads:
                v = (
                    f"spill: device function {name} ({f.arch}) spills {f.spill_stores} B stores / "
                    f"{f.spill_loads} B loads"
                )
                if v not in d["violations"]:
                    d["violations"].append(v)
            continue
        key = (f.mangled, f.arch)
        if key in kernels:  # the same instantiation from two translation units
            continue
        k = Kernel(
            name=name,
            mangled=f.mangled,
            family=family(name),
            arch=f.arch,
            hot=bool(HOT.match(name)),
            registers=f.registers if f.registers is not None else 0,
            barriers=f.barriers,
            stack_frame=f.stack_frame,
            cumulative_stack=f.cumulative_stack,
            spill_stores=f.spill_stores,
            spill_loads=f.spill_loads,
            smem_static=f.smem_static,
            source=f.source,
        )
        kernels[key] = k
        tag = f"{k.name} ({k.arch})"
        if f.registers is None:
            raise ReportError(f"no register count for kernel {tag} in {f.source}")
        if k.spill_stores or k.spill_loads:
            k.violations.append(
                f"spill: {tag} spills {k.spill_stores} B stores / {k.spill_loads} B loads"
            )
        if k.hot and (k.stack_frame or k.cumulative_stack):
            k.violations.append(
                f"stack: hot kernel {tag} has a {k.stack_frame} B stack frame"
                + (
                    f" ({k.cumulative_stack} B cumulative)"
                    if k.cumulative_stack != k.stack_frame
                    else ""
                )
            )
        if k.registers > MAX_REGS:
            k.violations.append(f"regs: {tag} uses {k.registers} registers (> {MAX_REGS})")
        if shapes is not None:
            shape = next((s for s in shapes if fnmatch.fnmatchcase(k.name, s[0])), None)
            if shape is None:
                if k.hot:
                    k.violations.append(
                        f"shape: hot kernel {tag} has no launch shape (add it to "
                        "csrc/cuda/launch_shapes.cpp)"
                    )
            else:
                k.threads, k.smem_dynamic = shape[1], shape[2]
                k.smem_dynamic_runtime = shape[2] is None
                n = arch_number(k.arch)
                limits = ARCHS.get(n) if n is not None else None
                if limits is not None:
                    smem = k.smem_static + (k.smem_dynamic or 0)
                    k.blocks_per_sm = blocks_per_sm(k.registers, k.threads, smem, limits)
                    if k.blocks_per_sm < 1:
                        k.violations.append(
                            f"occupancy: {tag} fits no block per SM ({k.registers} registers x "
                            f"{k.threads} threads, {smem} B shared memory; {k.arch} allows "
                            f"{REGS_PER_SM} registers and {limits.smem_block} B per block)"
                        )
    order = sorted(kernels.values(), key=lambda k: (k.family, _natural(k.name), k.arch))
    return order, sorted(devfuncs.values(), key=lambda d: (_natural(d["name"]), d["arch"]))


def _natural(name: str) -> list:
    """Sort key that orders head dims numerically (..., 32, 64, 128, ...)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------- allow-list


@dataclass
class Allow:
    kind: str
    arch: str
    pattern: str
    line: int
    used: bool = False


def read_allow(path: Path | None) -> list[Allow]:
    if path is None or not path.is_file():
        return []
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) != 3 or parts[0] not in (*KINDS, "*"):
            raise ReportError(
                f"{path}:{n}: expected 'KIND ARCH PATTERN' with KIND one of "
                f"{', '.join(KINDS)} or *, got {raw!r}"
            )
        out.append(Allow(parts[0], parts[1], parts[2], n))
    return out


def apply_allow(
    name: str, arch: str, violations: list[str], allowed: list[str], allow: list[Allow]
) -> None:
    """Moves the violations an allow-list entry excuses from `violations` to `allowed`."""
    keep = []
    for v in violations:
        kind = v.split(":", 1)[0]
        hit = None
        for a in allow:
            if (
                a.kind in (kind, "*")
                and fnmatch.fnmatchcase(arch, a.arch)
                and fnmatch.fnmatchcase(name, a.pattern)
            ):
                hit = a
                break
        if hit is None:
            keep.append(v)
        else:
            hit.used = True
            allowed.append(v)
    violations[:] = keep


# ---------------------------------------------------------------- output


def _rel(path: str, info: BuildInfo, build: Path) -> str:
    for base, label in ((info.source_dir, ""), (str(build.resolve()), "<build>/")):
        if base and path.startswith(base.rstrip("/") + "/"):
            return label + path[len(base.rstrip("/")) + 1 :]
    return path


def _kb(b: int) -> str:
    return f"{b / 1024:.1f} KB" if b >= 1024 else f"{b} B"


def render_md(
    kernels: list[Kernel], devfuncs: list[dict], info: BuildInfo, violations: list[str]
) -> str:
    out = [
        "# ptxas budget of the CUDA kernels",
        "",
        f"nvcc {info.nvcc or '?'}, architectures {info.archs.replace(';', ', ') or '?'}. "
        f"Regenerate: `{REGEN}` (a CUDA build, then `python scripts/ptxas_budget.py BUILD_DIR`); "
        "the rules are in docs/contributing.md (Register and stack budget).",
        "",
        "Budget: no spill anywhere; hot kernels (every lt::attn, lt::cross_entropy, lt::hadamard, "
        "lt::quant, lt::sparse_delta kernel) have no stack frame; <= 255 registers; >= 1 resident "
        "block per SM at the launched block size.",
        "",
    ]
    allowed = [v for k in kernels for v in k.allowed] + [v for d in devfuncs for v in d["allowed"]]
    if violations:
        out += [f"**{len(violations)} violation(s):**", ""] + [f"- {v}" for v in violations] + [""]
    else:
        out += ["Within budget: no violation.", ""]
    if allowed:
        out += ["Allowed (benchmarks/ptxas_allow.txt):", ""] + [f"- {v}" for v in allowed] + [""]
    out += [
        "| kernel | arch | registers | stack | spill st/ld | smem static + dynamic | threads "
        "| blocks/SM | hot | ok |",
        "|---|---|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for k in kernels:
        stack = f"{k.stack_frame}" + (
            f" ({k.cumulative_stack} cum.)" if k.cumulative_stack != k.stack_frame else ""
        )
        if k.smem_dynamic_runtime:
            dyn = "runtime"
        elif k.smem_dynamic is None:
            dyn = "?"
        else:
            dyn = _kb(k.smem_dynamic)
        ok = "yes" if k.ok else "**NO**"
        if k.ok and k.allowed:
            ok = "allowed"
        out.append(
            f"| `{display_name(k.name)}` | {k.arch} | {k.registers} | {stack} "
            f"| {k.spill_stores}/{k.spill_loads} | {_kb(k.smem_static)} + {dyn} "
            f"| {k.threads if k.threads is not None else '?'} "
            f"| {k.blocks_per_sm if k.blocks_per_sm is not None else '?'} "
            f"| {'yes' if k.hot else 'no'} | {ok} |"
        )
    if devfuncs:
        out += [
            "",
            "Device functions ptxas did not inline:",
            "",
            "| function | arch | stack | spill st/ld |",
            "|---|---|---:|---:|",
        ]
        for d in devfuncs:
            out.append(
                f"| `{display_name(d['name'])}` | {d['arch']} | {d['stack_frame']} "
                f"| {d['spill_stores']}/{d['spill_loads']} |"
            )
    return "\n".join(out) + "\n"


def _dump_json(doc: dict) -> str:
    """JSON with one list element (a kernel's row) per line: diffs show which kernels changed."""
    parts = []
    for key, val in doc.items():
        if isinstance(val, list) and val:
            body = ",\n".join("  " + json.dumps(v) for v in val)
            parts.append(f" {json.dumps(key)}: [\n{body}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(val)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_outputs(
    out_dir: Path,
    kernels: list[Kernel],
    devfuncs: list[dict],
    info: BuildInfo,
    build: Path,
    violations: list[str],
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in kernels:
        d = asdict(k)
        d["source"] = _rel(k.source, info, build)
        d["ok"] = k.ok
        rows.append(d)
    dev = [dict(d, source=_rel(d["source"], info, build)) for d in devfuncs]
    doc = {
        "nvcc": info.nvcc,
        "archs": [a for a in info.archs.split(";") if a],
        "regenerate": REGEN,
        "violations": violations,
        "kernels": rows,
        "device_functions": dev,
    }
    (out_dir / "ptxas.json").write_text(_dump_json(doc))
    (out_dir / "ptxas.md").write_text(render_md(kernels, devfuncs, info, violations))


# ---------------------------------------------------------------- main


def check(
    build: Path,
    out_dir: Path | None,
    allow_path: Path | None,
    require_cuda: bool = False,
) -> int:
    info = read_config(build)
    if not info.cuda:
        if require_cuda:
            raise ReportError(
                f"the CUDA kernels were not built in {build} (LONGTUNE_CUDA=ON needs them)"
            )
        print(f"ptxas budget: skipped (no CUDA kernels in {build})")
        return 0
    if not info.report:
        raise ReportError(
            f"CUDA was built in {build} without its ptxas report: configure with "
            "-DLONGTUNE_PTXAS_REPORT=ON (the default) and rebuild"
        )
    funcs = read_logs(build, info)
    shapes_path = build / "ptxas" / "launch_shapes.txt"
    if not shapes_path.is_file():
        raise ReportError(
            f"{shapes_path} not found (written by the build's longtune_launch_shapes_txt target)"
        )
    shapes = read_launch_shapes(shapes_path)
    kernels, devfuncs = build_kernels(funcs, shapes)
    if not kernels:
        raise ReportError(f"the ptxas reports in {build / 'ptxas' / 'logs'} name no kernel")
    want = expected_archs(info.archs)
    seen = {k.arch for k in kernels}
    if want is not None and want - seen:
        raise ReportError(
            f"no kernel reported for {', '.join(sorted(want - seen))} (configured: {info.archs})"
        )
    allow = read_allow(allow_path)
    for k in kernels:
        apply_allow(k.name, k.arch, k.violations, k.allowed, allow)
    for d in devfuncs:
        apply_allow(d["name"], d["arch"], d["violations"], d["allowed"], allow)
    violations = [v for k in kernels for v in k.violations] + [
        v for d in devfuncs for v in d["violations"]
    ]
    for a in allow:
        if not a.used:
            violations.append(
                f"allow-list: {allow_path}:{a.line} ({a.kind} {a.arch} {a.pattern}) excuses "
                "nothing: remove it"
            )
    if out_dir is not None:
        write_outputs(out_dir, kernels, devfuncs, info, build, violations)
    n_hot = sum(k.hot for k in kernels)
    where = f"; table in {out_dir / 'ptxas.md'}" if out_dir is not None else ""
    if violations:
        print(f"ptxas budget: {len(violations)} violation(s) in {len(kernels)} kernel builds:")
        for v in violations:
            print(f"  {v}")
        print(f"ptxas budget: FAILED{where}")
        return 1
    n_allowed = sum(len(k.allowed) for k in kernels) + sum(len(d["allowed"]) for d in devfuncs)
    print(
        f"ptxas budget: ok, {len(kernels)} kernel builds ({n_hot} hot) on "
        f"{', '.join(sorted(seen))}: no spill, no stack frame in a hot kernel, <= {MAX_REGS} "
        f"registers, >= 1 block per SM"
        + (f" ({n_allowed} allowed by {allow_path})" if n_allowed else "")
        + where
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build_dir", type=Path, help="the CMake build directory (e.g. build/dev)")
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT,
        help=f"where ptxas.json and ptxas.md go (default {DEFAULT_OUT.relative_to(REPO)})",
    )
    ap.add_argument(
        "--allow",
        type=Path,
        default=DEFAULT_ALLOW,
        help=f"allow-list of known violations (default {DEFAULT_ALLOW.relative_to(REPO)})",
    )
    ap.add_argument(
        "--require-cuda",
        action="store_true",
        help="fail when the build has no CUDA kernels (instead of skipping)",
    )
    a = ap.parse_args(argv)
    try:
        return check(a.build_dir, a.out_dir, a.allow, a.require_cuda)
    except ReportError as e:
        print(f"ptxas budget: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
