"""RULER-style synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your LLM?").

Each task hides what the question needs in a filler text whose size is fitted to the token budget:

- ``niah_single``: one needle "The special magic number for KEY is VALUE." in Paul Graham essays.
- ``niah_multikey``: the target needle plus three distractor needles with other keys.
- ``niah_multivalue``: four needles with the same key and different values; all four are asked for.
- ``niah_multiquery``: four needles with different keys; all four are asked for.
- ``variable_tracking``: a chain "VAR A = 12345." "VAR B = VAR A." ... in the repeated-noise haystack; the answer
  is every variable holding the value.
- ``common_words``: a numbered word list where ten words repeat often; the answer is those ten.
- ``frequent_words``: a coded text of random strings with Zipf-distributed counts; the answer is the top three.

The answer prefix opens the assistant turn so that the answer follows at once (SmolLM2-135M rambles otherwise).
"""

from __future__ import annotations

import random
import string
from collections import Counter
from dataclasses import dataclass

from kvp_gym.tasks.base import Task, TaskSample, register
from kvp_gym.tasks.text import NOISE_SENTENCES, essay_sentences, words

_NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)


def _key(rng: random.Random, pool: str) -> str:
    return f"{rng.choice(words('adjective', pool))}-{rng.choice(words('noun', pool))}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


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
    (the first ``num_queries`` keys); haystack: ``essay`` or ``noise``.
    """

    name: str = "niah_single"
    description: str = "one needle 'The special magic number for KEY is VALUE.' in essays"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    haystack: str = "essay"
    answer_tokens: int = 16

    def build(self, seed: int, size: int, pool: str = "all") -> TaskSample:
        rng = random.Random(seed)
        keys = _distinct(lambda: _key(rng, pool), self.num_keys)
        values = {key: [_number(rng) for _ in range(self.num_values)] for key in keys}
        needles = [
            (rng.random(), f"The special magic number for {key} is {value}.") for key in keys for value in values[key]
        ]
        body, spans = _hide(_haystack(rng, size, self.haystack, pool), needles)
        queried = keys[: self.num_queries]
        answers = tuple(v for key in queried for v in values[key])
        if self.num_values > 1:
            question = f"What are all the special magic numbers for {queried[0]} mentioned in the provided text?"
            prefix = f"The special magic numbers for {queried[0]} mentioned in the provided text are"
        elif self.num_queries > 1:
            listed = ", ".join(queried[:-1]) + f", and {queried[-1]}"
            question = f"What are all the special magic numbers for {listed} mentioned in the provided text?"
            prefix = f"The special magic numbers for {listed} mentioned in the provided text are"
        else:
            question = f"What is the special magic number for {queried[0]} mentioned in the provided text?"
            prefix = f"The special magic number for {queried[0]} mentioned in the provided text is"
        head = _NIAH_INTRO + "\n"
        return TaskSample(
            prompt=f"{head}{body}\n{question}",
            answer_prefix=prefix,
            answers=answers,
            needle_spans=tuple((a + len(head), b + len(head)) for a, b in spans),
            metadata={"keys": keys, "queried": queried, "depths": [round(d, 4) for d, _ in needles]},
        )


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
        vocabulary = rng.sample(words("noun", pool), 2048)
        common, rare = vocabulary[: self.num_common], vocabulary[self.num_common :]
        repeats = max(3, size // 20)
        items = [w for w in common for _ in range(repeats)] + rare[: max(0, size - repeats * self.num_common)]
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


register(NeedleInAHaystack())
register(
    NeedleInAHaystack(
        name="niah_multikey",
        num_keys=4,
        description="the target needle among three distractor needles with other keys",
    )
)
register(
    NeedleInAHaystack(
        name="niah_multivalue",
        num_values=4,
        answer_tokens=64,
        description="four needles with one key; name all four values",
    )
)
register(
    NeedleInAHaystack(
        name="niah_multiquery",
        num_keys=4,
        num_queries=4,
        answer_tokens=80,  # SmolLM2 lists "- key: value" lines, ~15 tokens each
        description="four needles with four keys; name all four values",
    )
)
register(VariableTracking())
register(CommonWords())
register(FrequentWords())
