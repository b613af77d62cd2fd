"""The repository's documents stand on their own (issue 11: README.md and benchmarks/README.md
sent users to ../shared/BENCHMARKS.md, which a clone does not have)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(p for p in [ROOT / "README.md", *ROOT.glob("benchmarks/*.md"), *ROOT.glob("docs/*.md")]
                   if p.is_file())
pytestmark = pytest.mark.skipif(not (ROOT / "README.md").is_file(), reason="needs the repository")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_point_only_inside_the_repository(document):
    text = document.read_text()
    assert "../shared" not in text and "BENCHMARKS.md" not in text


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_exist(document):
    for target in re.findall(r"\]\(([^)#\s]+)\)", document.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (document.parent / target).exists() or (ROOT / target).exists(), target


def test_readme_starts_with_the_two_commands():
    first_block = (ROOT / "README.md").read_text().split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands == ["make train", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train:", makefile, re.M) and re.search(r"^test:\s*\n\tbash \.ci/run", makefile, re.M)
