"""README.md and docs/ stay a front page and a map that resolves: every relative link, every
file of the repository and every ``fxprop.*`` name they cite exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FILE = re.compile(r"(?<![\w/.])((?:fxprop|tests|tools|docs|\.ci)/[\w/.-]*\w)")
NAME = re.compile(r"(?<![\w./])(fxprop(?:\.\w+)+)")
#: Paths the text names that are not the repository's: the Calibrate node's default filename
#: (in ComfyUI's output folder), the export's metadata file, and a file of the clone in
#: ComfyUI's custom_nodes (named fxprop/ there).
ELSEWHERE = {"fxprop/calibration.json", "fxprop.json", "fxprop/requirements.txt"}


def relative_links(page: Path) -> list[str]:
    """The page's links that point into the repository (no scheme, no bare anchor)."""
    return [t for t in LINK.findall(page.read_text())
            if not re.match(r"^[a-z]+:", t) and not t.startswith("#")]


def resolves(name: str) -> bool:
    """Whether ``fxprop.a.b.c`` is a module, or an attribute reached from the longest module."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(value, attr):
                return False
            value = getattr(value, attr)
        return True
    return False


def test_readme_is_a_front_page_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {(ROOT / t.split("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    assert {p.resolve() for p in PAGES[1:]} <= linked


def test_every_relative_link_resolves():
    broken = [(p.name, t) for p in PAGES for t in relative_links(p)
              if not (p.parent / t.split("#")[0]).exists()]
    assert broken == []


def test_every_cited_file_and_name_exists():
    """Test files, tools and modules named in the text (claims keep what backs them), and
    dotted names such as ``fxprop.graph.cache.CAPTURE_CACHE_SIZE``."""
    files = {f for p in PAGES for f in FILE.findall(p.read_text())}
    assert files, "no file cited: the pattern is wrong"
    assert sorted(f for f in files - ELSEWHERE if not (ROOT / f).exists()) == []
    names = {n.rstrip(".") for p in PAGES for n in NAME.findall(p.read_text())} - ELSEWHERE
    assert sorted(n for n in names if not resolves(n)) == []


def test_the_checks_catch_what_they_should(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](missing.md) [b](https://example.org) [c](#here)\n")
    assert relative_links(page) == ["missing.md"]
    assert resolves("fxprop.graph.cache.CAPTURE_CACHE_SIZE")
    assert not resolves("fxprop.cache.CAPTURE_CACHE_SIZE")   # a path from before the move
    assert FILE.findall("see `tests/test_layers.py`, tools/bench.py.") == [
        "tests/test_layers.py", "tools/bench.py"]
