"""Offline, RULER-style tasks that produce prompts for trace collection and evaluation.

``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery``, ``variable_tracking``,
``common_words`` and ``frequent_words`` (kvp_gym/tasks/ruler.py), the needle tasks' RULER value and key type
variants (word or UUID values, number or UUID keys: ``niah_single_words``, ``niah_multikey_uuids_uuidkeys``...),
and ``essay``, free text for perplexity-style traces (kvp_gym/tasks/essay.py).
docs/tasks.md describes each and how well SmolLM2-135M does them.

Imports kvp_gym.tasks.base, .essay and .ruler.
"""

from kvp_gym.tasks import essay, ruler  # noqa: F401  (importing registers the tasks)
from kvp_gym.tasks.base import TASKS, EncodedPrompt, Task, TaskSample, encode, get_task, make_sample, render

__all__ = ["TASKS", "EncodedPrompt", "Task", "TaskSample", "encode", "get_task", "make_sample", "render"]
