"""Every citation in the package, docs, tools, benchmarks and tests resolves inside this repository.

A reader of this repository has only its files, papers and public URLs. This scans the text of those trees
for references to documents that are not here (design briefs, research notes, section marks of files
that are not here, bare pitfall tags), for repository paths and `python -m` modules that do not exist, and for
`file.md, "Section"` citations whose section heading is missing.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ("prefixattn", "tests", "benchmarks", "tools", "docs", "csrc", ".ci")
TOP_FILES = ("README.md", "setup.py", "pyproject.toml")
SUFFIXES = {".py", ".md", ".sh", ".txt", ".toml", ".cu", ".cuh", ".h", ".cpp", ""}
SKIP_DIRS = {"__pycache__", "fixtures", ".venv", ".venv-ci", "build"}
# benchmarks/results/ records past runs with the code of their day: checked for foreign documents only.
HISTORY = ROOT / "benchmarks" / "results"

# Documents that live outside the repository, however they are cited.
FOREIGN = {
    "a research note": re.compile(r"\bresearch/|\bresearch §"),
    "the shared folder": re.compile(r"\.\./shared\b"),
    "a section mark (§) of a document that is not here": re.compile("\u00a7"),
    "a brief": re.compile(r"\bthe brief\b|\bdesign brief\b", re.IGNORECASE),
    "a bare pitfall tag (P1, P2, ...)": re.compile(r"\bP[1-9][0-9]?\b"),
    "the anchors folder": re.compile(r"\banchors/"),
}
URL = re.compile(r"\w+://\S+")
MARKDOWN = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)\b")
# A path has a suffix or ends in "/" (so "prefixattn/limit", a ratio's label, is not one); "*" globs.
REPO_PATH = re.compile(r"(?<![\w./-])((?:prefixattn|tests|benchmarks|tools|csrc|docs)/[\w./*-]*(?:\.\w+\b|/))")
MODULE_RUN = re.compile(r"-m\s+(prefixattn(?:\.\w+)+)|\"-m\",\s*\"(prefixattn(?:\.\w+)+)\"")
SECTION = re.compile(r"([\w./-]*\w\.md),?\s+\"([^\"]{1,100})\"")


def _files():
    for name in TOP_FILES:
        yield ROOT / name
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and not SKIP_DIRS & set(path.relative_to(ROOT).parts):
                yield path


def _markdown_names() -> dict[str, list[Path]]:
    names: dict[str, list[Path]] = {}
    for path in _files():
        if path.suffix == ".md":
            names.setdefault(path.name, []).append(path)
    return names


def _resolve_markdown(cited: str, source: Path, names: dict[str, list[Path]]) -> list[Path]:
    """The files a cited .md name can mean: a path from the root or from the citing file, else a bare name."""
    for base in (ROOT, source.parent):
        if (base / cited).is_file():
            return [base / cited]
    return [] if "/" in cited else names.get(cited, [])


def _headings(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [re.sub(r"[`\"*]", "", line.lstrip("#").strip()) for line in lines if line.startswith("#")]


def problems(text: str, source: Path, names: dict[str, list[Path]]) -> list[str]:
    """What in `text` (the contents of `source`) cites something this repository does not have."""
    found = []
    text = URL.sub("", text)
    for what, pattern in FOREIGN.items():
        for m in pattern.finditer(text):
            found.append(f"{what}: {m.group(0)!r}")
    if HISTORY in source.parents:
        return found
    for m in MARKDOWN.finditer(text):
        if not _resolve_markdown(m.group(1), source, names):
            found.append(f"a document that is not in the repository: {m.group(1)}")
    for m in REPO_PATH.finditer(text):
        if not any(ROOT.glob(m.group(1).rstrip("/"))):
            found.append(f"a path that does not exist: {m.group(1)}")
    for m in MODULE_RUN.finditer(text):
        module = m.group(1) or m.group(2)
        stem = ROOT.joinpath(*module.split("."))
        if not (stem.with_suffix(".py").is_file() or (stem / "__main__.py").is_file()):
            found.append(f"a module that does not exist: python -m {module}")
    # A citation wrapped over two lines (docstring or comment) reads as one.
    joined = re.sub(r"[ \t]*\n[ \t]*(?:#[ \t]*)?", " ", text)
    for m in SECTION.finditer(joined):
        cited, section = m.group(1), re.sub(r"[`\"*]", "", m.group(2))
        targets = _resolve_markdown(cited, source, names)
        if targets and not any(h.startswith(section) for t in targets for h in _headings(t)):
            found.append(f'a section that {cited} does not have: "{section}"')
    return found


def test_every_citation_resolves_in_the_repository():
    names = _markdown_names()
    report = []
    for path in _files():
        if path == Path(__file__).resolve():
            continue  # its own examples of broken citations
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        report += [f"{path.relative_to(ROOT)}: {p}" for p in problems(text, path, names)]
    assert not report, "\n".join(report)


def test_the_scan_finds_each_kind_of_broken_citation():
    """The checker itself: each kind of citation it must catch, in a made-up file, is reported."""
    names = _markdown_names()
    source = ROOT / "prefixattn" / "made_up.py"
    bad = [
        "see DESIGN.md",
        "semantics (spec §2)",
        "from research/prefix_libs.md",
        "as the brief asks",
        "(pitfall P3)",
        "anchors/h200.json",
        "tests/no_such_helper.py",
        "python -m prefixattn.kernels._no_such_tool",
        'docs/design.md, "No such section"',
    ]
    for text in bad:
        assert problems(text, source, names), text
    good = [
        'docs/design.md, "Semantics"',
        'benchmarks/NOTES.md, "Decode kernels"',
        "see README.md and tests/helpers.py",
        "https://github.com/example/repo/blob/main/DESIGN.md",
        "P=128, B=4",
    ]
    for text in good:
        assert not problems(text, source, names), text
