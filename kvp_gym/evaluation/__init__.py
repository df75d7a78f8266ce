"""Evaluation: how well eviction policies do, at trace level and end to end, with the statistics and the reports.

- :mod:`kvp_gym.evaluation.trace_level`: ``kvp-gym evaluate``, every scorer on every (sample, layer, KV head) of
  recorded traces at the prompt boundary (:func:`evaluate`, its protocols and budgets, merging runs, paired
  comparisons); :mod:`kvp_gym.evaluation.selection`: what it scores (samples, layers and heads, the same as
  ``KVEvict-v0`` episodes) and the view a scorer gets of one layer.
- :mod:`kvp_gym.evaluation.end_to_end`: ``kvp-gym evaluate-e2e``, a real model's answers and perplexity with the
  evicting cache (:class:`E2EConfig`, :func:`run`, :func:`merge`, :func:`summarize`);
  :mod:`kvp_gym.evaluation.run_folder`: its resumable folder (settings.json, parts/).
- :mod:`kvp_gym.evaluation.stats`: the one seeded bootstrap (a generator per policy and statistic, mean and
  geometric mean intervals), paired differences and Spearman's correlation, shared by both levels and by the
  leaderboard.
- :mod:`kvp_gym.evaluation.report`: the tables and plots of both levels' records;
  :mod:`kvp_gym.evaluation.comparison`: ``kvp-gym evaluate-table``, summaries of several trace-level records, and
  ``kvp-gym evaluate-e2e-versus``, an end-to-end run's paired comparison.
- :mod:`kvp_gym.evaluation.token_classes`: ``kvp-gym evaluate-shortcut``, the share of a token class (digits) in
  each policy's top-k tokens against the oracle's and the base rate (a shortcut control).

Policy specs (``name:param=value;...``) parse in :mod:`kvp_gym.scorers` (``from_spec``, ``resolve_policies``).
Inside the room: trace_level imports selection, report and stats; end_to_end imports run_folder, report and
stats; token_classes imports selection and stats; comparison imports stats and report; stats only numpy. The
room imports kvp_gym's core modules (scorers, traces, importance, utility; end_to_end also cache, models, tasks;
token_classes models), never kvp_gym.cli. This package imports nothing
itself: each public name loads its module on first use.
"""

import importlib

# Public name -> the module of the room that defines it. Imported on first use: the statistics need only numpy
# (the leaderboard reads them without torch), the end-to-end names import transformers.
_HOMES = {
    **dict.fromkeys(
        (
            "ABSOLUTE_BUDGETS",
            "FRACTION_BUDGETS",
            "PROTOCOLS",
            "Protocol",
            "evaluate",
            "merge_results",
            "paired_comparison",
            "write_results",
        ),
        "trace_level",
    ),
    **dict.fromkeys(
        ("chosen_layers_and_heads", "evaluation_episodes", "evaluation_samples", "layer_view"), "selection"
    ),
    **dict.fromkeys(("E2EConfig", "merge", "run", "summarize"), "end_to_end"),
    **dict.fromkeys(("TOKEN_CLASSES", "shares_table", "token_class_shares", "write_shares"), "token_classes"),
    **dict.fromkeys(
        ("bootstrap_generator", "geometric_mean_interval", "mean_interval", "paired_differences", "spearman"), "stats"
    ),
    **dict.fromkeys(("end_to_end_table", "plot_end_to_end", "plot_trace_level", "trace_level_table"), "report"),
    **dict.fromkeys(("policies_table", "versus_table"), "comparison"),
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """A public name of the room, imported from its module (:data:`_HOMES`) on first use."""
    if name in _HOMES:
        return getattr(importlib.import_module(f"kvp_gym.evaluation.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'kvp_gym.evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
