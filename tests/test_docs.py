"""The book cannot rot: links, file paths and `module.function` references in the README, docs and
chapters all resolve; every chapter has its output-free notebook pair; the README links them all."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))
CHAPTERS = sorted((REPO / "chapters").glob("[0-9][0-9]_*.py"))
TEXTS = [REPO / "README.md", *DOCS, *CHAPTERS]

LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")                       # markdown [x](target)
PATH = re.compile(r"(?<![\w./-])((?:kimi_ref|weights_tools|tests|benchmarks|chapters|docs)/[\w./-]*\w)")
DOTTED = re.compile(r"`((?:kimi_ref|weights_tools)(?:\.\w+)+)")          # `kimi_ref.mla.MLA...`
RUN_MODULE = re.compile(r"python -m ((?:kimi_ref|weights_tools)(?:\.\w+)*)")


def _ids(paths):
    return [str(p.relative_to(REPO)) for p in paths]


def resolve_dotted(name: str) -> bool:
    """Import the longest importable module prefix, then getattr the rest."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("text", TEXTS, ids=_ids(TEXTS))
def test_links_and_paths_resolve(text):
    body = text.read_text()
    missing = []
    for target in LINK.findall(body):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (text.parent / target).resolve().exists():
            missing.append(f"link {target}")
    for match in PATH.finditer(body):
        path = match.group(1)
        if body[match.end():match.end() + 1] in ("<", "{", "*") or "NN_" in path:
            continue  # a pattern such as tests/test_<concept>.py, not a path
        if not (REPO / path).exists() and not (text.parent / path).exists():
            missing.append(f"path {path}")
    assert not missing, f"{text.relative_to(REPO)} refers to things that do not exist: {missing}"


@pytest.mark.parametrize("text", TEXTS, ids=_ids(TEXTS))
def test_code_references_resolve(text):
    body = text.read_text()
    names = set(DOTTED.findall(body)) | set(RUN_MODULE.findall(body))
    broken = sorted(n for n in names if not resolve_dotted(n))
    assert not broken, f"{text.relative_to(REPO)} names code that does not exist: {broken}"


def test_resolver_can_fail():
    assert resolve_dotted("kimi_ref.config.KimiConfig")
    assert not resolve_dotted("kimi_ref.config.NoSuchThing")
    assert not resolve_dotted("kimi_ref.no_such_module")


def test_notebooks_paired_without_outputs():
    result = subprocess.run([sys.executable, str(REPO / "chapters" / "pair.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"run `python chapters/pair.py` and commit the notebooks: {result.stdout}"


def test_readme_links_chapters_in_order_and_docs():
    readme = (REPO / "README.md").read_text()
    links = LINK.findall(readme)
    chapter_links = [l for l in links if re.match(r"chapters/\d\d_\w+\.(py|ipynb)$", l)]
    stems = [Path(l).stem for l in chapter_links]
    expected = [c.stem for c in CHAPTERS]
    seen = list(dict.fromkeys(stems))
    assert seen == expected, f"README must link every chapter once, in order: found {seen}, expected {expected}"
    for doc in DOCS:
        assert f"docs/{doc.name}" in links, f"README does not link docs/{doc.name}"


SOURCES = REPO / "docs" / "sources.md"
CITATION = re.compile(r"sources(?:\.md)? §(\d+(?:\.\d+)?)((?:, §\d+(?:\.\d+)?)*)")


def _tracked_texts() -> list[Path]:
    names = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True).stdout.split()
    return [REPO / n for n in names if n.endswith((".py", ".md", ".json", ".ipynb")) and (REPO / n).is_file()]


def test_every_sources_citation_lands_on_a_heading_and_nothing_cites_the_shared_sheet():
    """Code, tests and docs cite docs/sources.md ("sources §N"); users have no ../shared to look things up in."""
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[.\s]", SOURCES.read_text(), re.M))
    assert {"0", "5", "9", "12.3"} <= headings
    cited, broken, shared = 0, [], []
    for path in _tracked_texts():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in CITATION.finditer(text):
            for number in [m[1], *re.findall(r"§(\d+(?:\.\d+)?)", m[2])]:
                cited += 1
                if number not in headings:
                    broken.append(f"{path.relative_to(REPO)}: sources §{number}")
        if re.search(r"FACTS(?:\.md)?`? §", text):
            shared.append(str(path.relative_to(REPO)))
    assert cited > 40 and not broken, broken
    assert not shared, f"cite docs/sources.md, not the shared FACTS sheet: {shared}"
