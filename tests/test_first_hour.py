"""The first-hour tour (tests/first_hour.py): the README's commands run in order in a fresh shell on tiny
settings, and every marked block ran; the tour's own rules (markers, stale rewrites, stopping at the first failing
command with its README line) on small made-up READMEs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from first_hour import REWRITES, TourError, apply_rewrites, link_checkout, read_blocks, tour

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "tests" / "first_hour.py"
# The commands a new user types first: each must be in the tour, not skipped.
CORE = (
    "source .venv/bin/activate",
    "kvp-gym collect",
    "kvp-gym evaluate ",
    "kvp-gym evaluate-e2e",
    "kvp-gym generate",
    "kvp-gym train",
    "python examples/reinforce.py",
    "kvp-gym leaderboard prepare",
    "kvp-gym leaderboard validate",
    "kvp-gym leaderboard build",
    "kvp-gym submit --benchmark bench-v0 --policy ",
    "kvp-gym submit --benchmark bench-v0 --policy-file",
)


def test_every_readme_command_runs_as_written_on_tiny_settings(tmp_path):
    record_file = tmp_path / "tour.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--work", str(tmp_path / "work"), "--json", str(record_file)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = done.stdout + done.stderr[-6000:]
    assert done.returncode == 0, summary
    record = json.loads(record_file.read_text())
    blocks = read_blocks((ROOT / "README.md").read_text())
    assert [b["line"] for b in record["blocks"] if b["runs"]] == [b.line for b in blocks if b.runs]
    ran = [c for b in record["blocks"] if b["runs"] for c in b["commands"]]
    assert ran and all(c["status"] == 0 and c["seconds"] is not None for c in ran), summary
    as_written = [c["text"] for c in ran]
    missing = [core for core in CORE if not any(text.startswith(core) for text in as_written)]
    assert not missing, f"README commands missing from the tour (skipped or renamed): {missing}"


def made_up_readme(tmp_path: Path, text: str) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text(text)
    return readme


def test_a_bash_block_without_a_marker_is_an_error():
    text = "# x\n\n<!-- tour -->\n```bash\ntrue\n```\n\n```bash\necho unmarked\n```\n"
    with pytest.raises(TourError, match=r"README.md:8: a bash block without a tour marker"):
        read_blocks(text)
    with pytest.raises(TourError, match=r"README.md:3: .* is not a tour marker right before"):
        read_blocks("x\n\n<!-- tour -->\ntext\n\n```python\nx = 1\n```\n")  # a marker with no bash block
    with pytest.raises(TourError, match=r"README.md:1: .* is not a tour marker"):
        read_blocks("<!-- tour: skip -->\n```bash\ntrue\n```\n")  # a skip must say why
    blocks = read_blocks("<!-- tour: skip (slow) -->\n```bash\nmake demo\n```\n\n```python\nx = 1\n```\n")
    assert [(b.line, b.runs, b.why) for b in blocks] == [(2, False, "slow")]


def test_commands_are_lines_with_their_continuations_and_loops():
    text = (
        "<!-- tour -->\n```bash\n# a comment\nfirst --a \\\n    --b\n\nfor i in 1 2; do\n    echo $i\ndone; wait\n"
        "last   # trailing comment\n```\n"
    )
    (block,) = read_blocks(text)
    assert [(c.line, c.text.splitlines()[0]) for c in block.commands] == [
        (4, "first --a \\"),
        (7, "for i in 1 2; do"),
        (10, "last   # trailing comment"),
    ]


def test_a_rewrite_that_matches_nothing_is_an_error():
    blocks = read_blocks("<!-- tour -->\n```bash\nkvp-gym collect --samples 32\n```\n")
    with pytest.raises(TourError, match=r"'--samples 256\\\\b' \(the sharded collection"):
        apply_rewrites(blocks, REWRITES)
    apply_rewrites(blocks, tuple(r for r in REWRITES if r.pattern == r"--samples 32\b"))
    assert blocks[0].commands[0].run == "kvp-gym collect --samples 2"


def test_the_tour_stops_at_the_first_failing_command_and_names_its_line(tmp_path):
    readme = made_up_readme(
        tmp_path,
        "intro\n\n<!-- tour -->\n```bash\ncommand -v kvp-gym || echo fresh > fresh.txt\nsource .venv/bin/activate\n"
        "command -v kvp-gym\n```\n\n<!-- tour -->\n```bash\nls no-such-file\necho never > never.txt\n```\n",
    )
    work = tmp_path / "work"
    work.mkdir()
    record = tour(readme, work, timeout=60, rewrites=(), stand_ins=link_checkout)
    commands = [c for b in record["blocks"] for c in b["commands"]]
    assert [c["status"] for c in commands] == [0, 0, 0, 2, None]
    assert record["failed"]["line"] == 12 and record["failed"]["status"] == 2
    assert (work / "fresh.txt").exists()  # kvp-gym was not on PATH before the README activated .venv
    assert not (work / "never.txt").exists()
