"""What an entry's policy is: its kind (from what its scorer declares), the label its intervals are drawn under, the
scorer spec that rebuilds it, and the files its ``load`` record pins.

Imports kvp_gym.scorers when a scorer is built or its defaults are read.
"""

from __future__ import annotations

from typing import Any

KINDS = {"attention-free": "attention-free", "queries": "uses-prefill-queries", "future": "privileged-upper-bound"}
PINNED = ("checkpoint", "policy_file")  # the load record's files, each {path: relative to the entry, sha256}


def kind_of(needs_queries: bool, privileged: bool) -> str:
    """The board's kind of a policy, from what its scorer declares it reads."""
    return KINDS["future"] if privileged else KINDS["queries"] if needs_queries else KINDS["attention-free"]


def declarations(load: dict[str, Any]) -> tuple[bool, bool]:
    """(needs_queries, needs_future) of the scorer an entry's ``load`` record builds: its ``scorer`` (or its
    ``policy_file``'s factory: the file's code runs) with its ``parameters`` and its ``checkpoint``, paths as given
    (absolute, or relative to the working directory; see :func:`kvp_gym_leaderboard.submission.read_entry`). A
    scorer is only ever given what it declares, so this, not the entry, says what it reads; its kind is
    ``kind_of(*declarations(load))``.
    ScorerError when it cannot be built."""
    from kvp_gym.scorers import get_scorer, load_policy_file

    checkpoint = load.get("checkpoint")
    extra = {"checkpoint": checkpoint["path"]} if checkpoint else {}
    source = load.get("policy_file")
    if source is not None:
        scorer = load_policy_file(source["path"], source["factory"], **load["parameters"], **extra)
    else:
        scorer = get_scorer(load["scorer"], **load["parameters"], **extra)
    return bool(scorer.needs_queries), bool(scorer.needs_future)


def bootstrap_label(load: dict[str, Any]) -> str:
    """The label an entry's intervals are drawn under: its policy spec without the checkpoint's path (which differs
    between machines) but with the checkpoint's SHA-256, e.g. ``tova`` or ``kvp@sha256:9f2c...``; a policy file's
    is ``file:FACTORY[:params]@sha256:<the file's>`` (then the checkpoint's). So the intervals belong to the files'
    content: records moved under another checkpoint or policy file no longer give the stated ones."""
    checkpoint, source = load.get("checkpoint"), load.get("policy_file")
    if source is not None:
        arguments = ";".join(f"{key}={value}" for key, value in load["parameters"].items())
        spec = f"file:{source['factory']}" + (f":{arguments}" if arguments else "") + f"@sha256:{source['sha256']}"
    else:
        spec = policy_spec(load["scorer"], load["parameters"])
    return spec + (f"@sha256:{checkpoint['sha256']}" if checkpoint else "")


def policy_spec(scorer_name: str, parameters: dict[str, Any], checkpoint: str | None = None) -> str:
    """The scorer spec (``name:param=value;...``) that rebuilds a scorer: the parameters that differ from its
    defaults, and the checkpoint path if any."""
    from kvp_gym.scorers import get_scorer
    from kvp_gym.scorers import parameters as defaults_of

    defaults = defaults_of(get_scorer(scorer_name)) if not checkpoint else {}
    changed = {k: v for k, v in parameters.items() if k != "checkpoint" and defaults.get(k, object()) != v}
    if checkpoint:
        changed["checkpoint"] = checkpoint
    return scorer_name + (":" + ";".join(f"{k}={v}" for k, v in changed.items()) if changed else "")
