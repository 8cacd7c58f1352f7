"""The repository's documents stand alone: every relative link resolves, nothing cites a file outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the repository's own: not the README that pytest writes into .pytest_cache, nor a build's or a venv's
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                    *(p for p in ROOT.glob("*/README.md") if not p.parent.name.startswith(".")
                      and not p.parent.name.endswith(".egg-info"))])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    inside_code = False
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside_code = not inside_code
        elif not inside_code and line.startswith("#"):
            found.add(anchor(line.lstrip("#")))
    return found


def test_the_documents_are_found():
    names = {str(p.relative_to(ROOT)) for p in DOCUMENTS}
    assert {"README.md", "docs/formats.md", "docs/decisions.md", "extract/README.md"} <= names


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    broken = []
    for target in LINK.findall(document.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(f"{target}: no heading #{fragment} in {path.relative_to(ROOT)}")
    assert broken == [], broken


def test_the_anchor_rule_matches_githubs():
    assert anchor(" Several GPUs or machines") == "several-gpus-or-machines"
    assert anchor("Variants and the paper's tables") == "variants-and-the-papers-tables"
    assert anchor("run") == "run"


def test_nothing_cites_a_file_outside_the_repository_or_a_placeholder():
    offenders = []
    for path in sorted([*DOCUMENTS, *ROOT.glob("*/**/*.py")]):
        if ".venv" in path.parts or path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{path.relative_to(ROOT)}: {p}" for p in ("../shared", "DESIGN §", "DESIGN.md") if p in text]
        if path.suffix == ".md":
            offenders += [f"{path.relative_to(ROOT)}: {p}" for p in re.findall(r"\[\[[A-Z_]+\]\]", text)]
    assert offenders == [], offenders
