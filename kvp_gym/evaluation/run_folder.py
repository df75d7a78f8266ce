"""The folder of a resumable, shardable run (``kvp-gym evaluate-e2e``): its settings and its finished parts.

``OUT/settings.json`` holds the run's settings and the SHA-256 of every file a policy reads (a checkpoint);
``OUT/parts/`` holds one JSON file per finished sample, written atomically. A folder holds one run: resuming or
merging with other settings, or with a changed file behind a label, is an error naming what differs. The processes
of a torchrun job share one folder (each writes its own samples' parts); :func:`gather_parts` joins the folders of
separate shard runs.

Imports only kvp_gym.scorers and kvp_gym.storage.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvp_gym.scorers import Scorer, scorer_files
from kvp_gym.storage import atomic_path


def part_path(parts: Path, task: str, index: int) -> Path:
    """The part file of sample ``index`` of ``task`` (``essay`` for the essays) in the ``parts`` folder."""
    return parts / f"{task}-{index:05d}.json"


def read_settings(out: Path) -> dict:
    """The settings.json of the run folder ``out``; ValueError when it has none."""
    path = out / "settings.json"
    if not path.exists():
        raise ValueError(f"{out}: no settings.json; not an evaluate-e2e output folder")
    return json.loads(path.read_text())


def write_settings(out: Path, settings: dict) -> None:
    """Write ``out/settings.json`` atomically."""
    with atomic_path(out / "settings.json") as tmp:
        tmp.write_text(json.dumps(settings, indent=2))


def run_settings(config: Any, scorers: dict[str, Scorer]) -> dict[str, Any]:
    """settings.json: the config (a dataclass) as JSON, and "policy_files": {label: {path: SHA-256}} of the policies
    that read files (:func:`kvp_gym.scorers.scorer_files`), so that a label cannot silently change what is behind
    it."""
    settings = json.loads(json.dumps(dataclasses.asdict(config)))
    settings["policy_files"] = {label: files for label, scorer in scorers.items() if (files := scorer_files(scorer))}
    return settings


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """A folder holds one run: resuming with other settings or policy files is an error (its parts would not be
    comparable)."""
    if not (out / "settings.json").exists():
        write_settings(out, settings)
        return
    changed = settings_differences(read_settings(out), settings)
    if changed:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(changed)}); use another folder")


def gather_parts(out: Path, inputs: Sequence[str | Path]) -> dict[str, Any]:
    """Copy the parts of the run folders ``inputs`` (the shards of one run) into ``out/parts`` and write their
    settings to ``out``; return them. ValueError when the inputs' settings differ or there is none."""
    settings = None
    for folder in map(Path, inputs):
        found = read_settings(folder)
        if settings is not None and (changed := settings_differences(settings, found)):
            raise ValueError(f"{folder}: its run has other settings than {inputs[0]} ({'; '.join(changed)})")
        settings = found
        (out / "parts").mkdir(parents=True, exist_ok=True)
        for part in sorted((folder / "parts").glob("*.json")):
            with atomic_path(out / "parts" / part.name) as tmp:
                tmp.write_text(part.read_text())
    if settings is None:
        raise ValueError("merge needs at least one input folder")
    write_settings(out, settings)
    return settings


def settings_differences(was: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two runs' settings: the config keys, and each label whose files' contents differ (by
    SHA-256: the same checkpoint at another path, as on another machine, is the same run)."""
    changed = sorted(k for k in {*was, *now} - {"policy_files"} if was.get(k) != now.get(k))
    if "policy_files" not in was or "policy_files" not in now:
        return [*changed, "policy_files: one run was started by a kvp-gym that did not record the policies' files"]
    old, new = was["policy_files"], now["policy_files"]
    for label in sorted({*old, *new}):
        if sorted(old.get(label, {}).values()) != sorted(new.get(label, {}).values()):
            changed.append(f"{label} read {_describe_files(old.get(label))}, now {_describe_files(new.get(label))}")
    return changed


def _describe_files(files: dict[str, str] | None) -> str:
    if not files:
        return "no file"
    return ", ".join(f"{path} (SHA-256 {digest[:12]}...)" for path, digest in files.items())
