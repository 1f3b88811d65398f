"""The CUDA kernels' ptxas budget check (scripts/ptxas_budget.py) and the compiler launcher that
files ptxas's report per translation unit (scripts/ptxas_log.py), on synthetic ptxas output: spills
anywhere, a stack frame in a hot kernel (allowed in a non-hot one), registers, occupancy, missing
reports, the allow-list. LONGTUNE_PTXAS_BUILD_DIR=<a CUDA build directory> also parses a real
build's reports."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


budget = _load("ptxas_budget")
ptxas_log = _load("ptxas_log")

# mangled names of lt::attn::attn_fwd_kernel<lt::simt::bf16, 128, false>(AKParams<bf16>), a
# cross-entropy kernel, a device function and a non-product (self-test) kernel
ATTN = "_ZN2lt4attn15attn_fwd_kernelINS_4simt4bf16ELi128ELb0EEEvNS0_8AKParamsIT_EE"
CE = "_ZN2lt13cross_entropy24cross_entropy_fwd_kernelIfEEvNS0_4FwdKIT_EE"
PROBE = "_ZN2lt8selftest16mma_probe_kernelENS0_8MmaProbeE"
DEVFN = "_ZN2lt4attn9load_tileEv"
SHAPES = (
    "lt::attn::attn_fwd_kernel<*, 128, *>\t128\t87040\n"
    "lt::cross_entropy::cross_entropy_fwd_kernel<*>\t256\t46400\n"
)


def kernel(name, arch, regs=64, stack=0, st=0, ld=0, smem=0, cumulative=0):
    used = f"Used {regs} registers, used 1 barriers"
    if cumulative:
        used += f", {cumulative} bytes cumulative stack size"
    if smem:
        used += f", {smem} bytes smem"
    return (
        f"ptxas info    : Compiling entry function '{name}' for '{arch}'\n"
        f"ptxas info    : Function properties for {name}\n"
        f"    {stack} bytes stack frame, {st} bytes spill stores, {ld} bytes spill loads\n"
        f"ptxas info    : {used}, 400 bytes cmem[0]\n"
        "ptxas info    : Compile time = 12.345 ms\n"
    )


def gmem():
    return "ptxas info    : 0 bytes gmem\n"


def clean_log():
    return (
        gmem()
        + kernel(ATTN, "sm_80", regs=168)
        + kernel(CE, "sm_80", regs=128)
        + gmem()
        + kernel(ATTN, "sm_90", regs=170)
        + kernel(CE, "sm_90", regs=128)
    )


def make_build(tmp_path, logs=None, cuda="ON", report="ON", shapes=SHAPES, sources=None):
    """A build directory as CMake + the launcher leave it: ptxas/config.txt, ptxas/logs/*.log,
    ptxas/launch_shapes.txt. logs: {source file name: ptxas output}."""
    build = tmp_path / "build"
    (build / "ptxas").mkdir(parents=True)
    (build / "CMakeCache.txt").write_text("")
    logs = {"k.cu": clean_log()} if logs is None else logs
    srcs = [str(tmp_path / "src" / s) for s in (logs if sources is None else sources)]
    cfg = f"cuda={cuda}\nreport={report}\narchs=80;90\nnvcc=13.0\nsource_dir={tmp_path / 'src'}\n"
    cfg += "".join(f"source={s}\n" for s in srcs)
    (build / "ptxas" / "config.txt").write_text(cfg)
    for src, text in logs.items():
        log = build / "ptxas" / "logs" / "CMakeFiles" / "_C.dir" / f"{src}.o.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"# source: {tmp_path / 'src' / src}\n# object: x\n{text}")
    if shapes is not None:
        (build / "ptxas" / "launch_shapes.txt").write_text(shapes)
    return build


def run(build, tmp_path, capsys, *extra, allow=None):
    out = tmp_path / "out"
    args = [str(build), "--out-dir", str(out), "--allow", str(allow or tmp_path / "no-allow.txt")]
    rc = budget.main(args + list(extra))
    cap = capsys.readouterr()
    return rc, cap.out + cap.err, out


# ---------------------------------------------------------------- parser


def test_parser_reads_every_field_per_arch():
    text = (
        gmem()
        + kernel(ATTN, "sm_80", regs=168, stack=16, st=8, ld=4, smem=1024, cumulative=32)
        + f"ptxas info    : Function properties for {DEVFN}\n"
        "    24 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        + gmem()
        # a device function reported before the first kernel of its architecture
        + f"ptxas info    : Function properties for {DEVFN}\n"
        "    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        + kernel(ATTN, "sm_90", regs=170)
    )
    funcs = budget.parse_ptxas(text, source="a.cu")
    k80, dev80, dev90, k90 = funcs
    assert (k80.entry, k80.arch, k80.registers, k80.barriers) == (True, "sm_80", 168, 1)
    assert (k80.stack_frame, k80.spill_stores, k80.spill_loads) == (16, 8, 4)
    assert (k80.smem_static, k80.cumulative_stack, k80.source) == (1024, 32, "a.cu")
    assert (dev80.entry, dev80.arch, dev80.stack_frame) == (False, "sm_80", 24)
    assert (dev90.arch, dev90.spill_stores) == ("sm_90", 4)
    assert (k90.arch, k90.registers, k90.stack_frame) == ("sm_90", 170, 0)


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt not installed")
def test_names_are_demangled_without_their_signature():
    name = budget.strip_signature(budget.demangle([ATTN])[ATTN])
    assert name == "lt::attn::attn_fwd_kernel<lt::simt::bf16, 128, false>"
    assert budget.display_name(name) == "attn::attn_fwd_kernel<bf16, 128, false>"
    assert budget.family(name) == "attn"


def test_minimal_demangler_stands_in_for_cxxfilt(monkeypatch):
    monkeypatch.setattr(budget.shutil, "which", lambda name: None)
    d = budget.demangle([ATTN, CE, "_Z1gPf"])
    assert d[ATTN] == "lt::attn::attn_fwd_kernel<lt::simt::bf16, 128, false>"
    assert d[CE] == "lt::cross_entropy::cross_entropy_fwd_kernel<float>"
    assert d["_Z1gPf"] == "_Z1gPf"  # not a form the kernels use: left mangled


def test_blocks_per_sm():
    a80 = budget.ARCHS[80]
    assert budget.blocks_per_sm(64, 128, 0, a80) == 8  # 8 warps of 64 regs = 16384 / 65536
    assert budget.blocks_per_sm(255, 256, 0, a80) == 1  # 256 x 255 (256 per warp) = 65536
    assert budget.blocks_per_sm(255, 512, 0, a80) == 0
    assert budget.blocks_per_sm(32, 128, 100 * 1024, a80) == 1
    assert budget.blocks_per_sm(32, 128, 164 * 1024, a80) == 0  # over the 163 KB per block
    assert budget.blocks_per_sm(32, 128, 200 * 1024, budget.ARCHS[90]) == 1


# ---------------------------------------------------------------- the check


def test_clean_build_passes_and_writes_the_table(tmp_path, capsys):
    rc, out, res = run(make_build(tmp_path), tmp_path, capsys)
    assert rc == 0, out
    assert "ptxas budget: ok, 4 kernel builds (4 hot)" in out
    doc = json.loads((res / "ptxas.json").read_text())
    assert doc["violations"] == [] and doc["archs"] == ["80", "90"]
    rows = {(k["mangled"], k["arch"]): k for k in doc["kernels"]}
    attn = rows[(ATTN, "sm_90")]
    assert (attn["registers"], attn["threads"], attn["smem_dynamic"], attn["hot"]) == (
        170,
        128,
        87040,
        True,
    )
    assert attn["blocks_per_sm"] == 2 and attn["ok"] and attn["source"] == "k.cu"
    md = (res / "ptxas.md").read_text()
    assert "Within budget" in md and "| sm_80 | 168 |" in md


def test_spill_is_flagged_in_any_kernel_and_device_function(tmp_path, capsys):
    log = (
        gmem()
        + kernel(ATTN, "sm_80", st=16, ld=8)
        + kernel(PROBE, "sm_80", st=4, ld=4)
        + f"ptxas info    : Function properties for {DEVFN}\n"
        "    8 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads\n"
        + kernel(CE, "sm_80")
        + gmem()
        + kernel(ATTN, "sm_90")
        + kernel(CE, "sm_90")
    )
    rc, out, res = run(make_build(tmp_path, {"k.cu": log}), tmp_path, capsys)
    assert rc == 1, out
    spills = [line for line in out.splitlines() if line.strip().startswith("spill:")]
    assert len(spills) == 3, out
    assert any("16 B stores / 8 B loads" in s and "sm_80" in s for s in spills)
    assert any("device function" in s for s in spills)
    assert "FAILED" in out
    assert "**NO**" in (res / "ptxas.md").read_text()


def test_stack_frame_in_a_hot_kernel_is_flagged_not_in_a_test_kernel(tmp_path, capsys):
    log = (
        gmem()
        + kernel(ATTN, "sm_80", stack=240)
        + kernel(PROBE, "sm_80", stack=64)
        + kernel(CE, "sm_80")
        + gmem()
        + kernel(ATTN, "sm_90")
        + kernel(CE, "sm_90", cumulative=16)
    )
    rc, out, _ = run(make_build(tmp_path, {"k.cu": log}), tmp_path, capsys)
    assert rc == 1, out
    stacks = [line.strip() for line in out.splitlines() if line.strip().startswith("stack:")]
    assert len(stacks) == 2, out  # the self-test kernel's 64 B frame is allowed
    assert "240 B stack frame" in stacks[0] or "240 B stack frame" in stacks[1]
    assert any("16 B cumulative" in s for s in stacks)
    assert "mma_probe" not in out


def test_registers_and_occupancy_are_flagged(tmp_path, capsys):
    shapes = SHAPES.replace("\t256\t46400", "\t1024\t46400")
    log = (
        gmem()
        + kernel(ATTN, "sm_80", regs=300)
        + kernel(CE, "sm_80", regs=128)  # 128 x 1024 threads > 65536 registers
        + gmem()
        + kernel(ATTN, "sm_90")
        + kernel(CE, "sm_90", regs=64)
    )
    rc, out, _ = run(make_build(tmp_path, {"k.cu": log}, shapes=shapes), tmp_path, capsys)
    assert rc == 1, out
    assert "regs: lt::attn::attn_fwd_kernel" in out and "uses 300 registers (> 255)" in out
    assert "occupancy:" in out and "128 registers x 1024 threads" in out


def test_hot_kernel_without_a_launch_shape_is_flagged(tmp_path, capsys):
    shapes = "lt::attn::attn_fwd_kernel<*, 128, *>\t128\t87040\n"
    rc, out, _ = run(make_build(tmp_path, shapes=shapes), tmp_path, capsys)
    assert rc == 1, out
    assert "shape: hot kernel" in out and "csrc/cuda/launch_shapes.cpp" in out


def test_allow_list_excuses_a_known_violation_and_fails_when_stale(tmp_path, capsys):
    log = (
        gmem()
        + kernel(ATTN, "sm_80", st=16, ld=8)
        + kernel(CE, "sm_80")
        + gmem()
        + kernel(ATTN, "sm_90")
        + kernel(CE, "sm_90")
    )
    build = make_build(tmp_path, {"k.cu": log})
    allow = tmp_path / "allow.txt"
    allow.write_text("# known\nspill sm_80 lt::attn::attn_fwd_kernel<*, 128, *>  # in progress\n")
    rc, out, res = run(build, tmp_path, capsys, allow=allow)
    assert rc == 0, out
    assert "1 allowed" in out
    assert "allowed" in (res / "ptxas.md").read_text()
    allow.write_text(allow.read_text() + "stack * lt::quant::*\n")
    rc, out, _ = run(build, tmp_path, capsys, allow=allow)
    assert rc == 1 and "excuses nothing: remove it" in out and ":3" in out
    allow.write_text("oops sm_80 x\n")
    rc, out, _ = run(build, tmp_path, capsys, allow=allow)
    assert rc == 2 and "expected 'KIND ARCH PATTERN'" in out


def test_missing_reports_fail(tmp_path, capsys):
    # CUDA built, but not one log
    build = make_build(tmp_path, logs={}, sources=["k.cu"])
    rc, out, _ = run(build, tmp_path, capsys)
    assert rc == 2 and "no ptxas reports were found" in out
    # one translation unit without its log
    build2 = make_build(tmp_path / "b2", sources=["k.cu", "other.cu"])
    rc, out, _ = run(build2, tmp_path, capsys)
    assert rc == 2 and "no ptxas report for 1 CUDA translation unit" in out and "other.cu" in out
    # the report switched off in a CUDA build
    rc, out, _ = run(make_build(tmp_path / "b3", report="OFF"), tmp_path, capsys)
    assert rc == 2 and "LONGTUNE_PTXAS_REPORT=ON" in out
    # an architecture without any kernel
    log = gmem() + kernel(ATTN, "sm_80") + kernel(CE, "sm_80")
    rc, out, _ = run(make_build(tmp_path / "b4", {"k.cu": log}), tmp_path, capsys)
    assert rc == 2 and "no kernel reported for sm_90" in out
    # no launch shapes
    rc, out, _ = run(make_build(tmp_path / "b5", shapes=None), tmp_path, capsys)
    assert rc == 2 and "launch_shapes.txt not found" in out
    # not a build directory
    rc, out, _ = run(tmp_path / "nowhere", tmp_path, capsys)
    assert rc == 2 and "not a CMake build directory" in out


def test_build_without_cuda_is_skipped_unless_required(tmp_path, capsys):
    build = make_build(tmp_path, logs={}, cuda="OFF", sources=[])
    rc, out, res = run(build, tmp_path, capsys)
    assert rc == 0 and "skipped" in out and not res.exists()
    rc, out, _ = run(build, tmp_path, capsys, "--require-cuda")
    assert rc == 2 and "not built" in out


# ---------------------------------------------------------------- the launcher

FAKE_NVCC = """
import sys
sys.stderr.write("a.cu(3): warning #177-D: variable x was declared but never referenced\\n")
sys.stderr.write({report!r})
sys.stderr.write("nvcc warning : something the user must see\\n")
print("compiler stdout")
sys.exit({rc})
"""


@pytest.mark.parametrize("rc", [0, 1])
def test_launcher_files_the_report_and_passes_the_rest_through(tmp_path, capfd, rc):
    report = gmem() + kernel(ATTN, "sm_80") + kernel(f"{DEVFN}", "sm_80")
    fake = tmp_path / "fake_nvcc.py"
    fake.write_text(FAKE_NVCC.format(report=report, rc=rc))
    build, logs = tmp_path / "build", tmp_path / "build" / "ptxas" / "logs"
    obj = build / "CMakeFiles" / "_C.dir" / "a.cu.o"
    log = logs / "CMakeFiles" / "_C.dir" / "a.cu.o.log"
    log.parent.mkdir(parents=True)
    log.write_text("stale\n")
    argv = ["--log-dir", str(logs), "--build-dir", str(build), "--"]
    argv += [sys.executable, str(fake), "-x", "cu", "-c", str(tmp_path / "a.cu"), "-o", str(obj)]
    assert ptxas_log.main(argv) == rc
    cap = capfd.readouterr()
    assert "compiler stdout" in cap.out
    assert "warning #177-D" in cap.err and "nvcc warning : something" in cap.err
    assert "ptxas info" not in cap.err and "bytes stack frame" not in cap.err
    if rc != 0:
        assert not log.exists()  # no report of a failed compile, and not the stale one
        return
    text = log.read_text()
    assert text.startswith(f"# source: {tmp_path / 'a.cu'}\n")
    assert text.count("ptxas info") == report.count("ptxas info")
    assert text.count("bytes stack frame") == 2
    assert [f.mangled for f in budget.parse_ptxas(text) if f.entry] == [ATTN, DEVFN]


def test_launcher_runs_other_commands_untouched(tmp_path, capfd):
    fake = tmp_path / "fake.py"
    fake.write_text("import sys\nsys.stderr.write('ptxas info    : kept\\n')\nsys.exit(3)\n")
    argv = ["--log-dir", str(tmp_path / "logs"), "--", sys.executable, str(fake), "-M", "a.cu"]
    assert ptxas_log.main(argv) == 3
    assert "ptxas info    : kept" in capfd.readouterr().err
    assert not (tmp_path / "logs").exists()


# ---------------------------------------------------------------- a real build


@pytest.mark.skipif(
    not os.environ.get("LONGTUNE_PTXAS_BUILD_DIR"),
    reason="LONGTUNE_PTXAS_BUILD_DIR (a CUDA build directory) not set",
)
def test_real_build_reports_parse(tmp_path):
    build = Path(os.environ["LONGTUNE_PTXAS_BUILD_DIR"])
    info = budget.read_config(build)
    if not info.cuda:
        pytest.skip(f"{build} has no CUDA kernels")
    funcs = budget.read_logs(build, info)
    shapes = budget.read_launch_shapes(build / "ptxas" / "launch_shapes.txt")
    kernels, _ = budget.build_kernels(funcs, shapes)
    families = {k.family for k in kernels}
    assert {"attn", "cross_entropy", "hadamard", "quant", "sparse_delta"} <= families
    assert all(k.registers > 0 for k in kernels)
    assert all(k.threads is not None for k in kernels if k.hot)
