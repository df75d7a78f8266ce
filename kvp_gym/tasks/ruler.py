"""RULER-style synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your LLM?").

Each task hides what the question needs in a filler text whose size is fitted to the token budget:

- ``niah_single``: one needle "The special magic number for KEY is VALUE." in Paul Graham essays.
- ``niah_multikey``: the target needle plus three distractor needles with other keys.
- ``niah_multivalue``: four needles with the same key and different values; all four are asked for.
- ``niah_multiquery``: four needles with different keys; all four are asked for.
- RULER's needle value and key types: ``niah_<kind>_words`` and ``niah_<kind>_uuids`` hide word values
  ("tall-tree", no digits) or UUIDs instead of 7-digit numbers, for every kind above; ``niah_single`` and
  ``niah_multikey`` also come with number or UUID keys instead of word keys: ``niah_single_numberkeys``,
  ``niah_multikey_uuids_uuidkeys``... (name = ``niah_<kind>[_<values>][_<key>keys]``, the defaults, number values
  and word keys, left out). The wording follows the value type ("special magic words/UUIDs").
- ``variable_tracking``: a chain "VAR A = 12345." "VAR B = VAR A." ... in the repeated-noise haystack; the answer
  is every variable holding the value.
- ``common_words``: a numbered word list where ten words repeat often; the answer is those ten.
- ``frequent_words``: a coded text of random strings with Zipf-distributed counts; the answer is the top three.

The answer prefix opens the assistant turn so that the answer follows at once (SmolLM2-135M rambles otherwise).

Imports kvp_gym.tasks.base and kvp_gym.tasks.text.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections import Counter
from dataclasses import dataclass

from kvp_gym.tasks.base import PoolTooSmall, Task, TaskSample, register
from kvp_gym.tasks.text import NOISE_SENTENCES, essay_sentences, words

# Needle value types and what the prompt calls them (singular, plural); the key types are the same three kinds.
NEEDLE_TYPES = {"numbers": ("number", "numbers"), "words": ("word", "words"), "uuids": ("UUID", "UUIDs")}


def _niah_intro(plural: str) -> str:
    return (
        f"Some special magic {plural} are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {plural} afterwards."
    )


def _key(rng: random.Random, pool: str) -> str:
    """An adjective-noun compound such as "tall-tree": RULER's word type, for keys and word values."""
    return f"{rng.choice(words('adjective', pool))}-{rng.choice(words('noun', pool))}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    """A random (version 4) UUID drawn from ``rng``, so that it is reproducible, unlike ``uuid.uuid4()``."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _draw(kind: str, rng: random.Random, pool: str) -> str:
    """One needle key or value of type ``kind`` (a NEEDLE_TYPES key)."""
    if kind == "numbers":
        return _number(rng)
    if kind == "words":
        return _key(rng, pool)
    return _uuid(rng)


def _distinct(draw, count: int) -> list[str]:
    """``count`` distinct results of ``draw()``, in the order drawn."""
    found: list[str] = []
    while len(found) < count:
        item = draw()
        found += [item] if item not in found else []
    return found


def _haystack(rng: random.Random, size: int, kind: str, pool: str) -> list[str]:
    source = essay_sentences(pool) if kind == "essay" else NOISE_SENTENCES
    start = rng.randrange(len(source)) if kind == "essay" else 0
    return [source[(start + i) % len(source)] for i in range(size)]


def _hide(filler: list[str], needles: list[tuple[float, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Insert needles (depth in [0, 1], sentence) between filler sentences; return the text and needle spans."""
    slots: dict[int, list[str]] = {}
    for depth, needle in needles:
        slots.setdefault(round(depth * len(filler)), []).append(needle)
    parts: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    length = 0

    def add(sentence: str, is_needle: bool) -> None:
        nonlocal length
        if parts:
            length += 1  # the joining space
        if is_needle:
            spans[sentence] = (length, length + len(sentence))
        parts.append(sentence)
        length += len(sentence)

    for i in range(len(filler) + 1):
        for needle in slots.get(i, []):
            add(needle, True)
        if i < len(filler):
            add(filler[i], False)
    return " ".join(parts), [spans[needle] for _, needle in needles]


@dataclass(frozen=True)
class NeedleInAHaystack(Task):
    """Needles "The special magic number for KEY is VALUE." hidden at random depths in a haystack.

    num_keys: distinct keys among the needles; num_values: needles (values) per key; num_queries: keys asked for
    (the first ``num_queries`` keys); haystack: ``essay`` or ``noise``; value_type and key_type: ``numbers``
    (7 digits), ``words`` (adjective-noun, "tall-tree") or ``uuids`` (NEEDLE_TYPES); the prompt names the value
    type ("special magic words").
    """

    name: str = "niah_single"
    description: str = "one needle 'The special magic number for KEY is VALUE.' in essays"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    haystack: str = "essay"
    answer_tokens: int = 16
    value_type: str = "numbers"
    key_type: str = "words"

    def __post_init__(self) -> None:
        for kind in (self.value_type, self.key_type):
            if kind not in NEEDLE_TYPES:
                raise ValueError(
                    f"{self.name}: unknown needle type {kind!r}; expected one of {', '.join(NEEDLE_TYPES)}"
                )

    def build(self, seed: int, size: int, pool: str = "all") -> TaskSample:
        rng = random.Random(seed)
        keys = _distinct(lambda: _draw(self.key_type, rng, pool), self.num_keys)
        if self.value_type == "numbers" and self.key_type == "words":  # the original tasks: drawn exactly as ever
            values = {key: [_number(rng) for _ in range(self.num_values)] for key in keys}
        else:  # every key and value distinct, so that an answer is found only where it is hidden
            drawn = _distinct(lambda: _draw(self.value_type, rng, pool), len(keys) * (self.num_values + 1))
            drawn = [v for v in drawn if v not in keys][: len(keys) * self.num_values]
            values = {key: drawn[i * self.num_values : (i + 1) * self.num_values] for i, key in enumerate(keys)}
        one, many = NEEDLE_TYPES[self.value_type]
        needles = [
            (rng.random(), f"The special magic {one} for {key} is {value}.") for key in keys for value in values[key]
        ]
        body, spans = _hide(_haystack(rng, size, self.haystack, pool), needles)
        queried = keys[: self.num_queries]
        answers = tuple(v for key in queried for v in values[key])
        if self.num_values > 1:
            question = f"What are all the special magic {many} for {queried[0]} mentioned in the provided text?"
            prefix = f"The special magic {many} for {queried[0]} mentioned in the provided text are"
        elif self.num_queries > 1:
            listed = ", ".join(queried[:-1]) + f", and {queried[-1]}"
            question = f"What are all the special magic {many} for {listed} mentioned in the provided text?"
            prefix = f"The special magic {many} for {listed} mentioned in the provided text are"
        else:
            question = f"What is the special magic {one} for {queried[0]} mentioned in the provided text?"
            prefix = f"The special magic {one} for {queried[0]} mentioned in the provided text is"
        head = _niah_intro(many) + "\n"
        return TaskSample(
            prompt=f"{head}{body}\n{question}",
            answer_prefix=prefix,
            answers=answers,
            needle_spans=tuple((a + len(head), b + len(head)) for a, b in spans),
            metadata={"keys": keys, "queried": queried, "depths": [round(d, 4) for d, _ in needles]},
        )

    def score(self, output: str, answers: tuple[str, ...]) -> float:
        """Exact match as :meth:`Task.score`; for word and UUID values a hyphen also continues a word, so that
        "tall-tree-house" or a longer hyphenated string does not count as "tall-tree"."""
        if self.value_type == "numbers" or not answers:
            return super().score(output, answers)
        found = [re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", output, re.IGNORECASE) is not None for a in answers]
        return sum(found) / len(answers)


@dataclass(frozen=True)
class VariableTracking(Task):
    """A chain of ``hops`` + 1 assignments "VAR X = 12345." "VAR Y = VAR X." hidden in the noise haystack."""

    name: str = "variable_tracking"
    description: str = "a chain of variable assignments in a noise haystack; name every variable"
    hops: int = 4
    answer_tokens: int = 32

    def build(self, seed: int, size: int, pool: str = "all") -> TaskSample:
        rng = random.Random(seed)
        value = str(rng.randint(10_000, 99_999))
        names = _distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), self.hops + 1)
        statements = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))
        ]
        depths = sorted(rng.random() for _ in statements)  # a chain reads in order
        body, spans = _hide(_haystack(rng, size, "noise", pool), list(zip(depths, statements, strict=True)))
        head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        return TaskSample(
            prompt=f"{head}{body}\nQuestion: Find all variables that are assigned the value {value} in the text above.",
            answer_prefix=(
                f"Answer: According to the chain(s) of variable assignment in the text above, "
                f"{len(names)} variables are assigned the value {value}, they are:"
            ),
            answers=tuple(names),
            needle_spans=tuple((a + len(head), b + len(head)) for a, b in spans),
            metadata={"value": value},
        )


@dataclass(frozen=True)
class CommonWords(Task):
    """A numbered list of ``size`` words: ``num_common`` words repeat often (each ~size/20 times, at least 3),
    the others appear once; the answer is the common ones."""

    name: str = "common_words"
    description: str = "a numbered word list; name the ten words that repeat"
    num_common: int = 10
    answer_tokens: int = 64

    def build(self, seed: int, size: int, pool: str = "all") -> TaskSample:
        rng = random.Random(seed)
        nouns = words("noun", pool)
        repeats = max(3, size // 20)
        once = max(0, size - repeats * self.num_common)  # list items that appear once
        needed = self.num_common + once
        if needed > len(nouns):
            raise PoolTooSmall(
                f"common_words: a list of {size} words needs {needed} distinct nouns, the text pool {pool!r} has "
                f"{len(nouns)}; use a shorter context or a larger pool"
            )
        # 2048 drawn where the pool has them (the held-out pools have fewer): the other pools' samples stay as ever.
        vocabulary = rng.sample(nouns, min(2048, len(nouns)))
        common, rare = vocabulary[: self.num_common], vocabulary[self.num_common :]
        items = [w for w in common for _ in range(repeats)] + rare[:once]
        rng.shuffle(items)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return TaskSample(
            prompt=(
                "Below is a numbered list of words. In these words, some appear more often than others. "
                f"Memorize the ones that appear most often.\n{listing}\n"
                f"Question: What are the {self.num_common} most common words in the above list?"
            ),
            answer_prefix=f"Answer: The top {self.num_common} words that appear most often in the list are:",
            answers=tuple(common),
            metadata={"repeats": repeats},
        )


@dataclass(frozen=True)
class FrequentWords(Task):
    """A coded text of ``size`` random strings whose counts follow a Zipf law (exponent ``alpha``) over a
    vocabulary of ``vocabulary`` strings; the answer is the ``top`` most frequent."""

    name: str = "frequent_words"
    description: str = "a coded text with Zipf word counts; name the three most frequent"
    top: int = 3
    vocabulary: int = 50
    alpha: float = 2.0
    answer_tokens: int = 24

    def build(self, seed: int, size: int, pool: str = "all") -> TaskSample:
        rng = random.Random(seed)
        coded = _distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))), self.vocabulary)
        weights = [1 / (rank + 1) ** self.alpha for rank in range(self.vocabulary)]
        counts = [int(size * w / sum(weights)) for w in weights]
        counts[0] += size - sum(counts)
        items = [w for w, c in zip(coded, counts, strict=True) for _ in range(c)]
        rng.shuffle(items)
        top = [w for w, _ in Counter(items).most_common(self.top)]
        return TaskSample(
            prompt=(
                "Read the following coded text and track the frequency of each coded word. Find the three most "
                f"frequently appeared coded words.\n{' '.join(items)}\n"
                "Question: What are the three most frequently appeared words in the above coded text?"
            ),
            answer_prefix="Answer: According to the coded text above, the three most frequently appeared words are:",
            answers=tuple(top),
            metadata={"counts": counts[: self.top + 1]},
        )


# The original tasks (number values, word keys) and their RULER value and key type variants.
_NIAH_KINDS = {
    "niah_single": dict(description="one needle 'The special magic {one} for KEY is VALUE.' in essays"),
    "niah_multikey": dict(num_keys=4, description="the target needle among three distractor needles with other keys"),
    "niah_multivalue": dict(num_values=4, description="four needles with one key; name all four values"),
    "niah_multiquery": dict(num_keys=4, num_queries=4, description="four needles with four keys; name all four values"),
}
# Greedy answer lengths: a number is ~9 SmolLM2 tokens, a word value ~4-6, a UUID ~33; SmolLM2 lists several
# answers as "- value" or "- key: value" lines (~15 tokens each with number values).
_ANSWER_TOKENS = {
    ("niah_single", "numbers"): 16,
    ("niah_single", "words"): 16,
    ("niah_single", "uuids"): 48,
    ("niah_multikey", "numbers"): 16,
    ("niah_multikey", "words"): 16,
    ("niah_multikey", "uuids"): 48,
    ("niah_multivalue", "numbers"): 64,
    ("niah_multivalue", "words"): 64,
    ("niah_multivalue", "uuids"): 176,
    ("niah_multiquery", "numbers"): 80,
    ("niah_multiquery", "words"): 80,
    ("niah_multiquery", "uuids"): 200,
}
_KEYED_KINDS = ("niah_single", "niah_multikey")  # where other key types are registered too


def niah_name(kind: str, value_type: str = "numbers", key_type: str = "words") -> str:
    """The registered name of a needle task: ``niah_<kind>[_<values>][_<key>keys]``, defaults left out
    (``niah_single``, ``niah_single_uuids``, ``niah_multikey_words_numberkeys``...)."""
    values = "" if value_type == "numbers" else f"_{value_type}"
    keys = "" if key_type == "words" else f"_{NEEDLE_TYPES[key_type][0].lower()}keys"
    return f"{kind}{values}{keys}"


def _register_niah() -> None:
    for kind, settings in _NIAH_KINDS.items():
        for key_type in ("words", "numbers", "uuids") if kind in _KEYED_KINDS else ("words",):
            for value_type in NEEDLE_TYPES:
                one, key_one = NEEDLE_TYPES[value_type][0], NEEDLE_TYPES[key_type][0].lower()
                description = settings["description"].format(one=one)
                if (value_type, key_type) != ("numbers", "words"):
                    description += f" ({one} values)" if key_type == "words" else f" ({one} values, {key_one} keys)"
                register(
                    NeedleInAHaystack(
                        **{**settings, "description": description},
                        name=niah_name(kind, value_type, key_type),
                        answer_tokens=_ANSWER_TOKENS[kind, value_type],
                        value_type=value_type,
                        key_type=key_type,
                    )
                )


_register_niah()
register(VariableTracking())
register(CommonWords())
register(FrequentWords())
