"""Tiny benchmark definitions for the tests: bench-v0's layout on tiny-random, prepared in seconds.

:func:`benchmark_toml` renders a definition from the settings below with the changes a test needs, so that each test
says only how its benchmark differs (a TOML file each, as ``leaderboard/benchmarks/`` holds them)."""

from __future__ import annotations

import json
from typing import Any

TRACE_LEVEL = {
    "tasks": ["niah_single", "essay"],
    "contexts": [600, 700],
    "samples": 2,
    "future": 8,
    "seed": 5,
    "protocol": "paper",
    "budgets": [32, 64],
    "bootstrap": 200,
    "bootstrap_seed": 0,
}
END_TO_END = {
    "tasks": ["niah_single"],
    "context": 700,
    "budgets": [32, 64],
    "samples": 2,
    "essays": 1,
    "continuation": 8,
    "seed": 6,
}


def benchmark_toml(
    id: str, title: str, trace_level: dict[str, Any] | None = None, end_to_end: dict[str, Any] | None = None
) -> str:
    """The TOML text of benchmark ``id`` on tiny-random: :data:`TRACE_LEVEL` and :data:`END_TO_END` with the given
    changes (strings and lists of numbers or strings: JSON writes them as TOML does)."""
    lines = [f"id = {json.dumps(id)}", f"title = {json.dumps(title)}", 'model = "tiny-random"', 'text = "heldout"']
    lines.append("held_out_tasks = []")
    for section, settings in (
        ("trace_level", {**TRACE_LEVEL, **(trace_level or {})}),
        ("end_to_end", {**END_TO_END, **(end_to_end or {})}),
    ):
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"
