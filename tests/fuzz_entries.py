"""Fuzzing the leaderboard's validator: seeded tampered copies of valid entries, each through ``validate``.

``tests/test_fuzz.py`` runs a small set in the suite; ``make fuzz-entries`` runs hundreds::

    python tests/fuzz_entries.py --mutants 300 [--entries DIR] [--benchmark TOML] [--seed 0] [--out FILE]

A mutant is a copy of one entry with one tampering (:data:`MUTATIONS`): a published number changed, an interval
widened, a field removed, added or retyped, the kind, benchmark, manifest hash, seeds, scorer or checkpoint swapped,
the raw records truncated, duplicated, reordered or taken from another entry, or the file's text cut short. A
mutation that would leave the entry as it was is drawn again. Each outcome is one of:

- ``error``: refused with a problem report;
- ``unaffected``: ``validate`` found nothing wrong, and all but the records is the original's: the tampering moved
  records in a way no published number depends on (the retained fractions of two heads swapped: the board averages
  them), which only ``validate --rerun`` can see;
- ``accepted``: ``validate`` found nothing wrong with any other tampering;
- ``traceback``: ``validate`` raised.

Only the trace level's ``seconds`` (a time, which records cannot reproduce) and free text (name, description,
authors, url) are never tampered with: changing them is not a lie about a number.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUTCOMES = ("error", "unaffected", "accepted", "traceback")
MEASURED = (("results", "trace_level", "seconds"),)
REQUIRED_TOP = ("schema", "schema_version", "name", "description", "authors", "kind", "load", "benchmark",
                "kvp_gym_version", "hardware", "seeds", "created", "results", "records")  # fmt: skip


# -- walking an entry --------------------------------------------------------------------------------------------


def _leaves(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path to a number (not a bool) under ``node``."""
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in _leaves(value, (*path, key))]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in _leaves(value, (*path, i))]
    return [path] if isinstance(node, int | float) and not isinstance(node, bool) else []


def _nodes(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path to any value under ``node`` (the root excluded)."""
    found = []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in children:
        found.append((*path, key))
        found += _nodes(value, (*path, key))
    return found


def _get(entry: Any, path: tuple) -> Any:
    for key in path:
        entry = entry[key]
    return entry


def _set(entry: Any, path: tuple, value: Any) -> None:
    _get(entry, path[:-1])[path[-1]] = value


def _protected(path: tuple) -> bool:
    """Paths a mutation leaves alone: a time, and free text."""
    return path[:3] in MEASURED or (len(path) >= 1 and path[0] in ("name", "description", "authors", "url"))


# -- mutations: (entry, other entries, rng) -> a tampered entry (dict) or text (str), or None if not applicable ----


def _number(entry, others, rng):
    paths = [p for p in _leaves(entry["results"], ("results",)) if not _protected(p)]
    path = rng.choice(paths)
    old = _get(entry, path)
    new = rng.choice(
        [
            old * (1 + rng.uniform(1e-6, 0.5)),
            old + rng.uniform(-0.1, 0.1),
            rng.random(),
            0.0,
            1.0,
            old - 1e-6,
        ]
    )
    _set(entry, path, type(old)(new) if isinstance(old, int) and new == int(new) else new)
    return entry


def _widen(entry, others, rng):
    paths = [p for p in _nodes(entry["results"], ("results",)) if p[-1] == "ci95"]
    path = rng.choice(paths)
    low, high = _get(entry, path)
    _set(entry, path, rng.choice([[0.0, 1.0], [low * 0.9, high], [low, high * 1.1 + 1e-3], [low - 0.05, high + 0.05]]))
    return entry


def _remove(entry, others, rng):
    paths = [p for p in _nodes(entry) if not _protected(p) and p != ("url",)]
    path = rng.choice(paths)
    parent = _get(entry, path[:-1])
    del parent[path[-1]]
    return entry


def _add(entry, others, rng):
    objects = [p for p in [(), *_nodes(entry)] if isinstance(_get(entry, p), dict) and not _protected(p)]
    path = rng.choice(objects)
    target = _get(entry, path)
    target[rng.choice(["extra", "note", "0", "score", "holistic"])] = rng.choice([1, 0.5, "x", None, [], {}])
    return entry


def _retype(entry, others, rng):
    paths = [p for p in _nodes(entry) if not _protected(p)]
    path = rng.choice(paths)
    old = _get(entry, path)
    choices = [v for v in ("1", 1, 1.5, None, True, [old], {"value": old}) if type(v) is not type(old)]
    _set(entry, path, rng.choice(choices))
    return entry


def _kind(entry, others, rng):
    kinds = ["attention-free", "uses-prefill-queries", "privileged-upper-bound"]
    entry["kind"] = rng.choice([k for k in kinds if k != entry["kind"]])
    return entry


def _benchmark(entry, others, rng):
    if rng.random() < 0.5:
        entry["benchmark"]["id"] = rng.choice(["bench-v1", "tiny-v0", entry["benchmark"]["id"] + "x"])
    else:
        entry["benchmark"]["manifest_sha256"] = "".join(rng.choice("0123456789abcdef") for _ in range(64))
    return entry


def _seeds(entry, others, rng):
    key = rng.choice(sorted(entry["seeds"]))
    entry["seeds"][key] += rng.choice([-1, 1, 1000])
    return entry


def _scorer(entry, others, rng):
    """Another entry's scorer, parameters and entry point, or another entry point for the same scorer."""
    other = rng.choice([o for o in others if o["load"]["scorer"] != entry["load"]["scorer"]])
    if rng.random() < 0.3:
        entry["load"]["entry_point"] = other["load"]["entry_point"]
    else:
        entry["load"] = {k: copy.deepcopy(v) for k, v in other["load"].items() if k != "checkpoint"}
    return entry


def _checkpoint(entry, others, rng):
    """The checkpoint of another entry (path and hash: a consistent pair), its hash alone, or one added."""
    pinned = [o["load"]["checkpoint"] for o in others if "checkpoint" in o["load"]]
    mine = entry["load"].get("checkpoint")
    swaps = [c for c in pinned if mine is None or c["sha256"] != mine["sha256"]]
    if not swaps:
        return None
    choice = copy.deepcopy(rng.choice(swaps))
    if mine is not None and rng.random() < 0.3:
        choice = {"path": mine["path"], "sha256": choice["sha256"]}
    entry["load"]["checkpoint"] = choice
    return entry


def _records_truncate(entry, others, rng):
    if not (target := _record_target(entry, rng)):
        return None
    path, value = target
    if isinstance(value, list):
        _set(entry, path, value[: rng.randrange(len(value))])
    elif rng.random() < 0.5:
        value["data"] = value["data"][: rng.randrange(len(value["data"]))]
    else:
        value["shape"] = [max(0, value["shape"][0] - 1), *value["shape"][1:]]
    return entry


def _records_duplicate(entry, others, rng):
    if not (target := _record_target(entry, rng)):
        return None
    path, value = target
    if isinstance(value, list):
        i = rng.randrange(len(value))
        value.insert(i, copy.deepcopy(value[i]))
        if rng.random() < 0.5:
            del value[(i + 2) % len(value)]  # the same length, one item twice
        return entry
    return _repack(entry, path, lambda array: array[[0, *range(len(array) - 1)]])


def _records_reorder(entry, others, rng):
    if not (target := _record_target(entry, rng)):
        return None
    path, value = target
    if isinstance(value, list):
        if len(value) < 2:
            return None
        i, j = rng.sample(range(len(value)), 2)
        value[i], value[j] = value[j], value[i]
        return entry
    axis = rng.randrange(len(value["shape"]))
    return _repack(entry, path, lambda array: array.take(_rolled(array.shape[axis]), axis=axis))


def _records_other(entry, others, rng):
    """A part of another entry's records: all of them, one level, or one array."""
    if "records" not in entry:
        return None
    other = rng.choice([o for o in others if o.get("records") and o["records"] != entry["records"]])
    part = rng.choice(
        [
            ("records",),
            ("records", "trace_level"),
            ("records", "end_to_end"),
            ("records", "trace_level", "holistic_score"),
            ("records", "trace_level", "retained_fraction"),
            ("records", "end_to_end", "nll"),
        ]
    )
    try:
        _set(entry, part, copy.deepcopy(_get(other, part)))
    except (KeyError, TypeError):
        return None
    return entry


def _cut_text(entry, others, rng):
    text = json.dumps(entry, indent=1)
    return text[: rng.randrange(1, len(text))]


def _record_target(entry, rng) -> tuple[tuple, Any] | None:
    """(path, value) of a random record list or array of ``entry``; None if it has none."""
    targets = _record_lists(entry) + _record_arrays(entry)
    if not targets:
        return None
    path = rng.choice(targets)
    return path, _get(entry, path)


def _record_lists(entry) -> list[tuple]:
    records = entry.get("records") or {}
    found = [("records", "trace_level", "samples")] if records.get("trace_level") else []
    return found + ([("records", "end_to_end", "prompts")] if records.get("end_to_end") else [])


def _record_arrays(entry) -> list[tuple]:
    records = entry.get("records") or {}
    found = []
    if records.get("trace_level"):
        found += [
            ("records", "trace_level", "holistic_score"),
            ("records", "trace_level", "retained_fraction", "values"),
        ]
    return found + ([("records", "end_to_end", "nll")] if records.get("end_to_end") else [])


def _rolled(n: int) -> list[int]:
    return [*range(1, n), 0] if n > 1 else [0]


def _repack(entry, path, change):
    from kvp_gym_leaderboard.records import pack, unpack

    record = _get(entry, path)
    array = unpack(record, "fuzz", record["dtype"], record["shape"])
    changed = change(array)
    if (changed == array).all():
        return None
    _set(entry, path, pack(changed, record["dtype"]))
    return entry


MUTATIONS: dict[str, Callable] = {
    "number changed": _number,
    "interval widened": _widen,
    "field removed": _remove,
    "field added": _add,
    "field retyped": _retype,
    "kind swapped": _kind,
    "benchmark or manifest swapped": _benchmark,
    "seed changed": _seeds,
    "scorer swapped": _scorer,
    "checkpoint swapped": _checkpoint,
    "records truncated": _records_truncate,
    "records duplicated": _records_duplicate,
    "records reordered": _records_reorder,
    "records from another entry": _records_other,
    "text cut short": _cut_text,
}


# -- running -------------------------------------------------------------------------------------------------------


def make_mutants(entries: list[Path], out: Path, count: int, seed: int = 0) -> list[tuple[str, Path, Path]]:
    """``count`` (mutation kind, file, original file) triples, the files in ``out``: the kinds in turn, each applied
    to a random entry with a random tampering of that kind; one that does not apply or changes nothing is drawn
    again."""
    from kvp_gym_leaderboard.submission import read_entry

    rng = random.Random(seed)
    loaded = {path: read_entry(path) for path in entries}  # checkpoint paths made absolute: mutants go anywhere
    kinds = list(MUTATIONS)
    out.mkdir(parents=True, exist_ok=True)
    mutants = []
    for n in range(count):
        kind = kinds[n % len(kinds)]
        for _ in range(100):
            path = rng.choice(entries)
            original = loaded[path]
            others = [e for p, e in loaded.items() if p != path]
            try:
                mutated = MUTATIONS[kind](copy.deepcopy(original), others, rng)
            except (IndexError, ValueError):  # nothing of that kind in this entry
                mutated = None
            if mutated is not None and mutated != original:
                break
        else:
            continue
        target = out / f"{n:04d}-{path.stem}.json"
        target.write_text(mutated if isinstance(mutated, str) else json.dumps(mutated))
        mutants.append((kind, target, path))
    return mutants


def classify(mutants: list[tuple[str, Path, Path]], benchmark: Path | None = None) -> list[dict[str, str]]:
    """The outcome of ``validate`` on each mutant (each alone: duplicate names across mutants are not the point),
    against ``benchmark`` (a .toml) if given, else each entry's own."""
    from kvp_gym_leaderboard.benchmark import load_benchmark
    from kvp_gym_leaderboard.submission import validate

    given = None if benchmark is None else load_benchmark(benchmark)
    rows = []
    for kind, path, original in mutants:
        try:
            problems = validate([path], given)
            outcome, detail = ("error", problems[0]) if problems else ("accepted", "validate found nothing wrong")
            if not problems and _without_records(path) == _without_records(original):
                outcome = "unaffected"
        except Exception:  # noqa: BLE001 - what the fuzzer is looking for
            outcome, detail = "traceback", traceback.format_exc(limit=3)
        rows.append({"kind": kind, "file": str(path), "outcome": outcome, "detail": detail})
    return rows


def _without_records(path: Path) -> Any:
    from kvp_gym_leaderboard.submission import read_entry

    entry = read_entry(path)  # checkpoint paths resolved, as make_mutants loads the originals
    entry.pop("records", None)
    return entry


def table(rows: list[dict[str, str]]) -> str:
    """Mutation kind x outcome, as Markdown."""
    counts = Counter((r["kind"], r["outcome"]) for r in rows)
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    lines = ["| mutation | " + " | ".join(OUTCOMES) + " |", "|---|" + "---|" * len(OUTCOMES)]
    lines += [f"| {k} | " + " | ".join(str(counts[k, o]) for o in OUTCOMES) + " |" for k in kinds]
    lines.append("| all | " + " | ".join(str(sum(r["outcome"] == o for r in rows)) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=Path, default=Path("leaderboard/entries"), help="folder of valid entries")
    parser.add_argument("--mutants", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--benchmark", type=Path, help="validate against this benchmark .toml (default: each entry's)")
    parser.add_argument("--work", type=Path, default=Path("runs/fuzz/entries"), help="where mutants are written")
    parser.add_argument("--out", type=Path, default=Path("runs/fuzz/entries.json"), help="outcomes, one per mutant")
    args = parser.parse_args(argv)
    entries = sorted(args.entries.glob("*.json"))
    if not entries:
        parser.error(f"--entries {args.entries}: no entry files")
    rows = classify(make_mutants(entries, args.work, args.mutants, args.seed), args.benchmark)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    bad = [r for r in rows if r["outcome"] in ("accepted", "traceback")]
    for row in bad:
        print(f"{row['outcome']}: {row['kind']} ({row['file']}): {row['detail'][:300]}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
