"""``essay``: free text for perplexity-style traces.

The prompt is a run of Paul Graham essay sentences starting at a random sentence, with no chat template; the
future is the text's real continuation (not a generated one), so the trace records how the model attends while
reading natural text. The environment picks split points inside it at random.

Imports kvp_gym.tasks.base and kvp_gym.tasks.text.
"""

from __future__ import annotations

import random

from kvp_gym.tasks.base import Task, TaskSample, register
from kvp_gym.tasks.text import essay_sentences

_CONTINUATION_SENTENCES = 60  # enough text for a few hundred future tokens


class Essay(Task):
    name = "essay"
    description = "free essay text, no question; scored by perplexity of the real continuation"
    has_answers = False

    def build(self, seed: int, size: int, pool: str = "all") -> TaskSample:
        sentences = essay_sentences(pool)
        start = random.Random(seed).randrange(len(sentences))
        run = [sentences[(start + i) % len(sentences)] for i in range(size + _CONTINUATION_SENTENCES)]
        return TaskSample(
            prompt=" ".join(run[:size]),
            continuation=" " + " ".join(run[size:]),
            metadata={"first_sentence": start},
            chat=False,
        )


register(Essay())
