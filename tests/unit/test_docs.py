"""The repository explains itself: its docs link only files it has, and every spec code the code cites is in the
glossary."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_in_the_docs_resolves_inside_the_repository():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path = (doc.parent / target).resolve()
            assert path.exists() and ROOT in path.parents, f"{doc.name}: {target}"
    assert not re.search(r"(^|[^.\w])shared/", (ROOT / "README.md").read_text())


def test_every_spec_code_the_code_cites_is_in_the_glossary():
    glossary = (ROOT / "docs" / "spec-glossary.md").read_text()
    known = set(re.findall(r"^\| (D-[\d.]+|Annex \d+) \|", glossary, re.M))
    cited = set()
    for path in [*ROOT.glob("pillsnap/**/*.py"), *ROOT.glob("tasks/*.py"), *ROOT.glob("flows/*.py")]:
        cited |= set(re.findall(r"\b(D-\d+(?:\.\d+)?|Annex \d+)\b", path.read_text()))
    assert cited and cited <= known, sorted(cited - known)
