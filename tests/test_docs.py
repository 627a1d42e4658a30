"""The documentation the repository cites is in the repository.

- No text file points at notes outside the repository (a sibling ``shared`` folder, or the
  semantics and performance notes that lived there): ``docs/semantics.md`` and
  ``docs/benchmarks.md`` replace them.  ``benchmarks/results/`` is exempt: its files are
  records of past runs.
- Every citation of ``docs/semantics.md`` by section ("docs/semantics.md §3",
  "semantics §1–§3", "docs/semantics.md §1, §3, §4") names a section the document has,
  and every link to one of its headings (``docs/semantics.md#…``) resolves.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEMANTICS = ROOT / "docs" / "semantics.md"

# Split so that this file does not match its own patterns.
FORBIDDEN = ("../" + "shared", "SPEC" + ".md", "PERF" + ".md", "SPEC" + " §")
EXEMPT_DIRS = ("benchmarks/results/",)

# "semantics §2", "docs/semantics.md §1, §3, §4", "semantics §1–§3"
CITATION = re.compile(r"semantics(?:\.md)?\s+(§\d+(?:\s*(?:[–-]|,|and)\s*§\d+)*)")
SECTION_HEADING = re.compile(r"^##\s+§(\d+)\b", re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)
LINK_TO_SEMANTICS = re.compile(r"\((?:[\w./]*/)?semantics\.md#([^)\s]+)\)")


def _repository_files() -> list[str]:
    """Tracked files and new files git does not ignore, relative to the root; without git,
    every file outside hidden, build and cache folders."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout
        return sorted({p for p in out.decode().split("\0") if p})
    except (OSError, subprocess.CalledProcessError):
        skip = {"build", "__pycache__"}
        return sorted(
            str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not any(part.startswith(".") or part in skip
                                       or part.endswith(".egg-info")
                                       for part in p.relative_to(ROOT).parts))


def _text_files() -> dict[str, str]:
    texts = {}
    for name in _repository_files():
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def _sections() -> set[int]:
    return {int(n) for n in SECTION_HEADING.findall(SEMANTICS.read_text(encoding="utf-8"))}


def _cited(group: str) -> set[int]:
    """Section numbers of one citation; a range "§1–§3" names every section between."""
    cited = set()
    for part in re.split(r",|\band\b", group):
        ends = [int(n) for n in re.findall(r"§(\d+)", part)]
        cited.update(range(ends[0], ends[-1] + 1) if len(ends) == 2 else ends)
    return cited


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped (letters,
    digits, spaces, '-' and '_' kept), spaces to '-'."""
    return "".join(c for c in heading.lower() if c.isalnum() or c in " -_").replace(" ", "-")


def test_semantics_document_has_numbered_sections():
    sections = sorted(_sections())
    assert sections, "docs/semantics.md has no '## §N …' headings"
    assert sections == list(range(1, len(sections) + 1)), f"sections are not 1..N: {sections}"


def test_no_file_cites_documents_outside_the_repository():
    offenders = []
    for name, text in _text_files().items():
        if name.startswith(EXEMPT_DIRS):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            offenders += [f"{name}:{number}: {pattern!r}" for pattern in FORBIDDEN
                          if pattern in line]
    assert not offenders, ("cite docs/semantics.md or docs/benchmarks.md instead:\n"
                           + "\n".join(offenders))


def test_semantics_citations_name_existing_sections():
    sections = _sections()
    bad, seen = [], 0
    for name, text in _text_files().items():
        for number, line in enumerate(text.splitlines(), 1):
            for match in CITATION.finditer(line):
                seen += 1
                missing = sorted(_cited(match.group(1)) - sections)
                if missing:
                    bad.append(f"{name}:{number}: {match.group(0)!r} (no §{missing})")
    assert seen, "no citation of docs/semantics.md found: is the pattern still right?"
    assert not bad, f"docs/semantics.md has sections {sorted(sections)}:\n" + "\n".join(bad)


def test_semantics_internal_references_exist():
    text = SEMANTICS.read_text(encoding="utf-8")
    sections = _sections()
    body = SECTION_HEADING.sub("", text)
    # "§3" but not a paper's "§3.3"
    cited = {int(n) for n in re.findall(r"§(\d+)(?![.\d])", body)}
    assert cited <= sections, f"docs/semantics.md refers to missing §{sorted(cited - sections)}"


@pytest.mark.parametrize("name", ["README.md", "docs/semantics.md", "docs/benchmarks.md"])
def test_links_to_semantics_headings_resolve(name):
    anchors = {_slug(h) for h in HEADING.findall(SEMANTICS.read_text(encoding="utf-8"))}
    text = (ROOT / name).read_text(encoding="utf-8")
    links = set(LINK_TO_SEMANTICS.findall(text))
    if name == "docs/semantics.md":
        links |= set(re.findall(r"\]\(#([^)\s]+)\)", text))
    assert links <= anchors, f"{name}: no heading for {sorted(links - anchors)}"
