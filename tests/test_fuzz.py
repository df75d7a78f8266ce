"""Fuzzing: mutated trace files through every command that reads them (tests/fuzz_traces.py), and tampered
leaderboard entries through validate (tests/fuzz_entries.py).

Zero tracebacks, zero hangs, and every file whose content differs from the original refused: by the seal and the
checksums for version-2 files, by the strict validation for edits that break the format (also when the edited file
is resealed, as a buggy writer would leave it), and by the metadata probe's deadline for version-1 files. `make
fuzz` runs hundreds of mutants; this is a small, fast sample.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_traces import classify, make_mutants, preload, table

from kvp_gym.traces import TraceFormatWarning, merge_traces, seal

V1_FILE = Path(__file__).parent / "data" / "trace-v1.h5"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "source.h5"
    with pytest.warns(TraceFormatWarning):
        merge_traces(path, [V1_FILE])  # the version-1 fixture, upgraded
    preload()
    return path


def _failures(rows: list[dict], allowed: tuple[str, ...] = ("error", "unaffected")) -> list[str]:
    return [
        f"{r['outcome']}: {r['command']} on {r['kind']}: {r['detail'][:160]}"
        for r in rows
        if r["outcome"] not in allowed
    ]


def test_damaged_and_edited_version_2_files(source, tmp_path):
    rows = classify(make_mutants(source, tmp_path, 24, seed=1), source, timeout=60)
    assert _failures(rows) == [], table(rows)
    check = [r for r in rows if r["command"] == "traces check"]
    assert all(r["outcome"] == "error" for r in check), table(rows)  # every mutant differs from the source


def test_resealed_edits_that_break_the_format(source, tmp_path):
    rows = classify(make_mutants(source, tmp_path, 16, seed=2, reseal=True), source, timeout=60)
    assert _failures(rows) == [], table(rows)
    assert all(r["outcome"] == "error" for r in rows if r["command"] == "traces check"), table(rows)


def test_version_1_files(tmp_path, monkeypatch):
    """Unprotected files: edits that break the format are refused; byte damage may go unseen but never crashes
    or hangs a command."""
    monkeypatch.setattr(seal, "UNSEALED_PROBE_SECONDS", 5.0)
    preload()
    edits = make_mutants(V1_FILE, tmp_path / "edits", 8, seed=3, byte_share=0, breaking_only=True)
    damage = make_mutants(V1_FILE, tmp_path / "damage", 4, seed=4, byte_share=1)
    rows = classify(edits, V1_FILE, timeout=60)
    assert _failures(rows) == [], table(rows)
    assert all(r["outcome"] == "error" for r in rows if r["command"] == "traces check"), table(rows)
    rows = classify(damage, V1_FILE, timeout=60)
    assert _failures(rows, ("error", "unaffected", "accepted")) == [], table(rows)


def test_tampered_leaderboard_entries_are_refused(tmp_path):
    """A sample of `make fuzz-entries`: every kind of tampering of the committed entries, through validate."""
    from fuzz_entries import MUTATIONS, classify, make_mutants, table

    from kvp_gym_leaderboard.submission import ENTRIES

    rows = classify(make_mutants(sorted(ENTRIES.glob("*.json")), tmp_path, 2 * len(MUTATIONS), seed=7))
    assert {r["kind"] for r in rows} == set(MUTATIONS)
    assert [r for r in rows if r["outcome"] in ("accepted", "traceback")] == [], table(rows)
    assert sum(r["outcome"] == "error" for r in rows) >= len(rows) - 2, table(rows)
