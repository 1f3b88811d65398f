"""Import hygiene: ``import longtune`` and its subpackages load torch only (transformers, peft,
safetensors and accelerate are imported where they are used), and the package's modules import
each other without cycles."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "python" / "longtune"
HEAVY = ("transformers", "peft", "safetensors", "accelerate")

# every public subpackage / module that works without the Hugging Face stack
LIGHT_MODULES = [
    "longtune",
    "longtune.ops",
    "longtune.reference",
    "longtune.nn",
    "longtune.quant",
    "longtune.train",
    "longtune.train.chunkwise",
    "longtune.train.adapters",
    "longtune.train.s2ft",
    "longtune.train.sparse_delta",
    "longtune.train.sparse",
    "longtune.compat",
    "longtune.compat.fast_hadamard_transform",
    "longtune.recipes",
    "longtune.testing",
    "longtune.config",
    "longtune.bench",
    "longtune.integrations",
    "longtune.integrations.hf",
    "longtune.integrations.lm_infinite",
    "longtune.integrations.apply",
    "longtune.integrations.quant",
    "longtune.integrations.roste",
    "longtune.distributed",
]


def _loaded_heavy(module: str) -> list:
    code = (
        f"import sys, {module}\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PKG.parent)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_import_longtune_loads_torch_only():
    assert _loaded_heavy("longtune") == []


@pytest.mark.parametrize("module", LIGHT_MODULES[1:])
def test_subpackage_import_is_light(module):
    assert _loaded_heavy(module) == [], f"importing {module} pulls the Hugging Face stack"


def test_lazy_public_names_still_resolve():
    pytest.importorskip("transformers")
    import longtune.train

    assert longtune.train.SpIELCallback.__name__ == "SpIELCallback"


# ------------------------------------------------------------------ import graph
def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: dict) -> set:
    """The longtune modules ``name`` names in any import statement (module level or inside a
    function). The parent packages Python imports implicitly are not edges: only what is named."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                if f"{mod}.{a.name}" in known:  # `from pkg import submodule`
                    out.add(f"{mod}.{a.name}")
                elif mod in known and a.name != "*":
                    out.add(mod)
    out.discard(name)
    return out


def _import_graph() -> dict:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_no_import_cycles():
    graph = _import_graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_integration_modules():
    """The shared helpers of the integrations live in ``integrations._common`` under public names;
    no module reaches into another integration module for a private one."""
    known = _modules()
    bad = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package.split(".")
            mod = ".".join(
                base[: len(base) - (node.level - 1)] + ([node.module] if node.module else [])
            )
            if mod.startswith("longtune.integrations.") and mod != name:
                bad += [
                    f"{name}: from {mod} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and f"{mod}.{a.name}" not in known
                ]
    assert not bad, bad
