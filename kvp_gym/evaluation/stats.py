"""The statistics every reported number carries: one seeded bootstrap over samples, paired differences, Spearman.

Every interval is a 95% percentile bootstrap over samples: ``resamples`` draws of the sample indices with
replacement (:func:`resample_rows`), the statistic on each draw, and the 2.5th and 97.5th percentiles of those.

Whose draws: every (policy, statistic) has its own generator, :func:`bootstrap_generator` (run seed, policy label,
statistic name...): a numpy ``SeedSequence`` of the seed and the SHA-256 of the names (never Python's ``hash()``,
which changes between processes). So a policy's interval is the same whichever other policies ran with it, in
whatever order, in one run or merged from several; and the same on every machine. A paired comparison draws from
the generator of its pair (``versus``, other): it depends on the two policies and on nothing else. The interval
functions take that generator and draw from it in place.

Imports only numpy.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def bootstrap_generator(seed: int, *names: str) -> np.random.Generator:
    """The generator of one statistic's bootstrap draws: ``names`` say whose, e.g. (policy label, statistic name),
    (label, "accuracy", task, budget), or (versus, other, "paired_difference") for a pair.

    ``numpy.random.SeedSequence([seed, w0, ..., w7])``, w the eight 32-bit words of the SHA-256 of the names as a
    JSON list (the same in every process and on every machine; distinct names give unrelated streams).
    ``seed`` must be >= 0.
    """
    if seed < 0:
        raise ValueError(f"bootstrap seed must be >= 0, got {seed}")
    digest = hashlib.sha256(json.dumps(list(names)).encode()).digest()
    words = np.frombuffer(digest, dtype="<u4").tolist()
    return np.random.default_rng(np.random.SeedSequence([seed, *words]))


def resample_rows(count: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, count] int64 indices into ``count`` samples, drawn with replacement: one bootstrap draw a row."""
    return rng.integers(0, count, size=(resamples, count))


def interval95(draws: np.ndarray) -> list[float]:
    """[2.5th, 97.5th] percentile of bootstrap ``draws`` [resamples]."""
    return [float(v) for v in np.percentile(draws, [2.5, 97.5])]


def mean_interval(
    values: Sequence[float] | np.ndarray, rng: np.random.Generator, resamples: int = 1000
) -> dict[str, Any]:
    """{"mean", "ci95": [low, high]}: the mean of ``values`` [S] (one per sample) with its 95% bootstrap interval;
    None for both without values."""
    data = np.asarray(values, float)
    if len(data) == 0:
        return {"mean": None, "ci95": [None, None]}
    means = data[resample_rows(len(data), resamples, rng)].mean(1)
    return {"mean": float(data.mean()), "ci95": interval95(means)}


def geometric_mean_interval(values: Sequence[float], rng: np.random.Generator, resamples: int = 1000) -> dict[str, Any]:
    """{"mean", "ci95"}: the geometric mean (exp of the mean log) of positive ``values`` with its 95% bootstrap
    interval: perplexities multiply."""
    logged = mean_interval([math.log(v) for v in values], rng, resamples)
    return {"mean": math.exp(logged["mean"]), "ci95": [math.exp(v) for v in logged["ci95"]]}


def paired_differences(scores: Mapping[str, Any], versus: str, resamples: int, seed: int) -> dict[str, dict[str, Any]]:
    """``versus`` against every other policy, on the same samples and heads.

    ``scores``: label -> [S, L, H] holistic scores per sample, layer and KV head (nested lists or an array). For
    each other label: the mean paired difference (versus - other, per sample averaged over heads) with a 95% paired
    bootstrap interval (resampling samples, the same draws for both policies of the pair), and the share of (layer,
    KV head) pairs on which ``versus``'s mean over samples is higher, with its interval from the same draws. Each
    pair draws from its own generator, ``bootstrap_generator(seed, versus, other, "paired_difference")``, so its
    numbers do not depend on which other policies are compared. ``interval_includes_zero`` marks a difference the
    data cannot tell from none. A ``versus`` not in ``scores`` is a ValueError.
    """
    if versus not in scores:
        raise ValueError(f"--versus {versus!r}: not among the evaluated policies {sorted(scores)}")
    mine = np.asarray(scores[versus])  # [S, L, H]
    found = {}
    for label, other in scores.items():
        if label != versus:
            rng = bootstrap_generator(seed, versus, label, "paired_difference")
            found[label] = paired_difference(mine, np.asarray(other), resample_rows(mine.shape[0], resamples, rng))
    return found


def paired_difference(mine: np.ndarray, other: np.ndarray, draws: np.ndarray) -> dict[str, Any]:
    """One pair of :func:`paired_differences`: ``mine`` and ``other`` [S, L, H], ``draws`` [resamples, S]."""
    difference = (mine - other).mean((1, 2))  # [S]
    boot_difference = difference[draws].mean(1)
    resamples = len(draws)
    boot_share = np.empty(resamples)
    for start in range(0, resamples, 64):  # bounded memory: 64 resamples x S x L x H at a time
        rows = draws[start : start + 64]
        boot_share[start : start + 64] = (mine[rows].mean(1) > other[rows].mean(1)).mean((1, 2))
    low, high = np.percentile(boot_difference, [2.5, 97.5])
    return {
        "mean_difference": float(difference.mean()),
        "ci95": [float(low), float(high)],
        "share_of_heads_won": float((mine.mean(0) > other.mean(0)).mean()),
        "share_ci95": interval95(boot_share),
        "interval_includes_zero": bool(low <= 0 <= high),
    }


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their average rank); None when either side is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):  # average rank within ties
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks
