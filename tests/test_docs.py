"""The project's Markdown points only at files that exist (reports and plots are generated
by commands, so a link can outlive, or precede, the file it names)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"runs", "build", "dist"}  # generated, not the project's docs
DOCS = sorted(p for p in ROOT.rglob("*.md")
              if not any(part.startswith(".") or part in SKIP for part in p.relative_to(ROOT).parts))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(md: Path) -> list[str]:
    links = LINK.findall(md.read_text(encoding="utf-8"))
    return [link.split("#")[0] for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]


def test_the_docs_are_found():
    assert {"README.md", "docs/results.md", "benchmarks/README.md"} <= {p.relative_to(ROOT).as_posix() for p in DOCS}


@pytest.mark.parametrize("md", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(md):
    missing = [link for link in relative_links(md) if not (md.parent / link).exists()]
    assert not missing, f"{md.relative_to(ROOT)} links to missing files: {missing}"


def test_the_library_example_runs_and_its_loss_falls():
    import runpy

    losses = runpy.run_path(str(ROOT / "examples" / "library.py"))["main"]()
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0]
