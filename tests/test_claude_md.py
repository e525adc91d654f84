"""CLAUDE.md is part of the product: the hierarchy must stay true as folders change."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

ROOT_MAX, SUB_MAX = 300, 100


def _subs() -> list:
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*CLAUDE.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sorted(ROOT / t for t in tracked if t != "CLAUDE.md")


def test_root_lists_every_sub_and_only_existing_ones():
    root = (ROOT / "CLAUDE.md").read_text()
    listed = set(re.findall(r"`([\w./-]+/CLAUDE\.md)`", root))
    on_disk = {str(p.relative_to(ROOT)) for p in _subs()}
    assert on_disk, "expected per-folder CLAUDE.md files"
    assert listed == on_disk, f"root CLAUDE.md lists {sorted(listed)}, disk has {sorted(on_disk)}"


def test_every_sub_refers_to_the_root():
    for sub in _subs():
        text = sub.read_text()
        assert re.search(r"\]\((\.\./)+CLAUDE\.md\)", text), f"{sub} does not link the root CLAUDE.md"


def test_sizes_within_limits():
    assert len((ROOT / "CLAUDE.md").read_text().splitlines()) <= ROOT_MAX
    for sub in _subs():
        assert len(sub.read_text().splitlines()) <= SUB_MAX, sub


def test_root_commands_exist_in_makefile():
    root = (ROOT / "CLAUDE.md").read_text()
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for cmd in re.findall(r"^make ([\w-]+)", root, re.M):
        assert cmd in targets, f"root CLAUDE.md documents `make {cmd}` but the Makefile has no such target"


def test_stages_stay_one_screen_as_stages_claude_md_says():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "stages").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 300} == {}
