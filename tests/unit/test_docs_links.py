"""Every link between the README and the pages under docs/ resolves: the file exists and, when the
link names a heading (`page.md#heading`), that page has the heading."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"```.*?```", re.S)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in CODE.sub("", page.read_text()).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(CODE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    return broken


def test_every_link_between_pages_resolves() -> None:
    assert len(pages()) > 5
    problems = {p.relative_to(ROOT).as_posix(): b for p in pages() if (b := broken_links(p))}
    assert problems == {}


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# B page\n\n## Its part\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md) [ok](b.md#its-part) [no](c.md) [no](b.md#other) [web](https://x)\n")
    assert broken_links(page) == ["c.md", "b.md#other"]
