"""benchmarks/results.py: a benchmark rewrites its own section of RESULTS.md and no other."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from results import write_section  # noqa: E402

BEFORE = "# Benchmark results\n\n## First\n\nkeep me\n\n## Speed (issue 3)\n\nold table\n\n## Last\n\nkeep me too\n"


def test_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(BEFORE)
    write_section("Speed (issue 3)", "new table\n", path)
    assert path.read_text() == BEFORE.replace("old table", "new table")


def test_appends_a_missing_section_and_creates_the_file(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section("Families", "rows", path)
    write_section("Speed (issue 3)", "table", path)
    assert path.read_text() == "# Benchmark results\n\n## Families\n\nrows\n\n## Speed (issue 3)\n\ntable\n"
