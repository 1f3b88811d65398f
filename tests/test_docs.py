"""The documentation stays navigable: the README is a landing page, every relative link in the
README and docs/ resolves (files and #anchors), and the op -> files table in docs/design.md lists
every registered op and only files that exist."""

import itertools
import re
from pathlib import Path

import pytest
import torch

import longtune  # noqa: F401  (registers torch.ops.longtune.*)

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
README_MAX_LINES = 200


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text without fenced code blocks (links and headings there are not links or headings)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: inline markup removed, lower case, punctuation other than
    '-' and '_' dropped, spaces turned into '-'."""
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    s = s.replace("`", "").replace("*", "").strip().lower()
    s = "".join(ch for ch in s if ch.isalnum() or ch in "-_ ")
    return s.replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for h in HEADING.findall(_prose(_text(path))):
        base = slug(h)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(path: Path):
    for target in LINK.findall(_prose(_text(path))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        yield target


def test_slug_follows_github():
    assert slug("Op to files") == "op-to-files"
    assert slug("`patch` / `unpatch`") == "patch--unpatch"
    assert slug("Example: long-context fine-tuning") == "example-long-context-fine-tuning"
    assert slug("S²FT (structured sparse fine-tuning)") == "s²ft-structured-sparse-fine-tuning"


def test_readme_is_a_landing_page():
    n = len(_text(ROOT / "README.md").splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines; keep it <= {README_MAX_LINES} and move detail to docs/"
    )


def test_docs_exist_and_are_linked_from_the_index():
    names = {p.name for p in DOCS}
    expected = {
        "index.md",
        "attention.md",
        "cross_entropy.md",
        "chunkwise.md",
        "sparse_delta.md",
        "quant.md",
        "huggingface.md",
        "distributed.md",
        "benchmarks.md",
        "design.md",
        "emulator.md",
        "contributing.md",
    }
    assert expected <= names, f"missing in docs/: {sorted(expected - names)}"
    linked = {t.split("#")[0] for t in links(ROOT / "docs" / "index.md")}
    assert expected - {"index.md"} <= linked, (
        f"not linked from docs/index.md: {sorted(expected - {'index.md'} - linked)}"
    )
    readme_links = set(links(ROOT / "README.md"))
    assert "docs/index.md" in readme_links and "docs/design.md" in readme_links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            bad.append(
                f"{target}: no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}"
            )
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n  " + "\n  ".join(bad)


def _op_table() -> list:
    text = _text(ROOT / "docs" / "design.md")
    m = re.search(r"^## Op to files\s*$(.*?)(?=^## )", text, re.S | re.M)
    assert m, "docs/design.md has no '## Op to files' section"
    rows = [ln for ln in m.group(1).splitlines() if ln.startswith("|")]
    assert len(rows) > 2, "docs/design.md: the op table is empty"
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows[2:]]


def registered_ops() -> set:
    return {
        name.split("::", 1)[1].split(".", 1)[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("longtune::")
    }


def test_every_registered_op_is_in_the_design_table():
    ops = registered_ops()
    assert ops, "no torch.ops.longtune.* op is registered"
    listed = {c.strip("`") for c in (row[0] for row in _op_table())}
    missing = sorted(ops - listed)
    assert not missing, f"ops missing from the op -> files table in docs/design.md: {missing}"
    unknown = sorted(listed - ops)
    assert not unknown, (
        f"the op -> files table in docs/design.md lists ops that are not registered: {unknown}"
    )


def _expand(name: str) -> list:
    """`attn_fwd_hd{64,80,96,128}.cu` -> the four names."""
    parts = re.split(r"\{([^}]*)\}", name)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_design_table_files_exist():
    paths = {
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*")
        if p.is_file() and not {".git", "build", ".venv"} & set(p.relative_to(ROOT).parts)
    }
    names = {p.rsplit("/", 1)[-1] for p in paths}
    missing = []
    for row in _op_table():
        for cell in row[1:]:
            for token in re.findall(r"`([^`]+)`", cell):
                if not re.search(r"\.(py|h|cuh|cpp|cu)$", token):
                    continue
                for name in _expand(token):
                    if name.rsplit("/", 1)[-1] not in names or (
                        "/" in name and not any(p == name or p.endswith("/" + name) for p in paths)
                    ):
                        missing.append(name)
    assert not missing, (
        f"docs/design.md's op table names files that do not exist: {sorted(set(missing))}"
    )
