"""The task contract: samples, encoding, fitting a prompt to a token budget, the registry.

A task builds a :class:`TaskSample` (prompt text, answer prefix, answers, needle character spans) for a seed
and a size; :func:`make_sample` picks the largest size whose chat-formatted prompt fits the token budget, and
:func:`encode` turns it into token ids with token-level needle spans. Every task's :meth:`Task.score` is an
exact-match scorer: the fraction of expected answers that appear, as whole words, in the model's output.

Imports nothing from kvp_gym.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TaskSample:
    """One task instance, as text.

    prompt: the user message (or, for free text, the raw text).
    answer_prefix: text that opens the assistant turn, so the answer follows at once.
    answers: the strings an output must contain.
    needle_spans: character spans [start, end) of the needles inside ``prompt``.
    chat: False for free text: no chat template, ``continuation`` is the text's real continuation.
    """

    prompt: str
    answer_prefix: str = ""
    answers: tuple[str, ...] = ()
    needle_spans: tuple[tuple[int, int], ...] = ()
    metadata: dict = field(default_factory=dict)
    chat: bool = True
    continuation: str = ""


@dataclass(frozen=True)
class EncodedPrompt:
    """A task sample as token ids: ``ids`` [n] int, ``needle_spans`` token spans [start, end) inside them."""

    ids: list[int]
    needle_spans: list[tuple[int, int]]
    continuation_ids: list[int]


class Task:
    """Base class: subclasses set ``name``, ``answer_tokens`` and implement :meth:`build`."""

    name: str = ""
    description: str = ""  # one line, for `kvp-gym tasks list`
    answer_tokens: int = 16  # how many tokens an answer needs when generating
    has_answers: bool = True  # False for free text, which is scored by perplexity instead

    def build(self, seed: int, size: int, pool: str = "all") -> TaskSample:
        """The sample for ``seed`` with ``size`` filler units (sentences, words...), drawing essays and words from
        the text ``pool`` (``all``, ``train`` or ``heldout``: kvp_gym.tasks.text.TEXT_POOLS); deterministic."""
        raise NotImplementedError

    def score(self, output: str, answers: tuple[str, ...]) -> float:
        """Fraction of ``answers`` found in ``output`` as whole words (case-insensitive); 1.0 if no answers."""
        if not answers:
            return 1.0
        found = [re.search(rf"(?<!\w){re.escape(a)}(?!\w)", output, re.IGNORECASE) is not None for a in answers]
        return sum(found) / len(answers)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task called ``name``; a KeyError lists the available ones."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def render(tokenizer: PreTrainedTokenizerBase, sample: TaskSample) -> str:
    """The exact text fed to the model. An instruction model (its tokenizer has a chat template): the template
    around the prompt, then the answer prefix; free text as it is. A base model (no chat template): a plain
    completion, the BOS token, the prompt, a blank line and the answer prefix; free text after the BOS token."""
    if tokenizer.chat_template is None:
        bos = tokenizer.bos_token or ""
        return bos + sample.prompt + (f"\n\n{sample.answer_prefix}" if sample.chat else "")
    if not sample.chat:
        return sample.prompt
    messages = [{"role": "user", "content": sample.prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + sample.answer_prefix


def encode(tokenizer: PreTrainedTokenizerBase, sample: TaskSample) -> EncodedPrompt:
    """Tokenise a sample; needle character spans become token spans (every token overlapping the needle)."""
    text = render(tokenizer, sample)
    offset = text.index(sample.prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for start, end in sample.needle_spans:
        a, b = offset + start, offset + end
        covered = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < b and e > a]
        spans.append((covered[0], covered[-1] + 1))
    continuation = tokenizer(sample.continuation, add_special_tokens=False)["input_ids"] if sample.continuation else []
    return EncodedPrompt(ids=list(enc["input_ids"]), needle_spans=spans, continuation_ids=list(continuation))


class PoolTooSmall(ValueError):
    """A task instance needs more distinct words than its text pool holds."""


def make_sample(
    task: Task, tokenizer: PreTrainedTokenizerBase, context: int, seed: int, pool: str = "all"
) -> TaskSample:
    """The largest instance of ``task`` (for ``seed``, text ``pool``) whose encoded prompt has at most ``context``
    tokens. A ValueError if even the smallest is longer, or if the pool runs out of words long before ``context``
    (the prompt would silently be shorter than asked)."""
    too_large: set[int] = set()  # sizes the pool cannot build

    def length(size: int) -> float:
        try:
            sample = task.build(seed, size, pool)
        except PoolTooSmall:
            too_large.add(size)
            return math.inf
        return len(tokenizer(render(tokenizer, sample), add_special_tokens=False)["input_ids"])

    best = _largest_fitting(length, context)
    if best is None:
        raise ValueError(f"task {task.name}: even the smallest prompt exceeds {context} tokens")
    if best + 1 in too_large:
        raise ValueError(
            f"task {task.name}: the text pool {pool!r} has words for prompts of at most {int(length(best))} tokens, "
            f"not {context}; use a shorter context or a larger pool"
        )
    return task.build(seed, best, pool)


def _largest_fitting(length: Callable[[int], float], budget: int) -> int | None:
    """Largest size >= 1 with length(size) <= budget, for a length non-decreasing in size (doubling + bisection)."""
    if length(1) > budget:
        return None
    low, high = 1, 2
    while length(high) <= budget:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if length(mid) <= budget else (low, mid)
    return low
