"""Token-class shares (``kvp-gym evaluate-shortcut``): how much of a policy's top-k is one class of tokens.

A shortcut control: on text that hides no needle (essays), a policy that keeps far more digit-bearing tokens than
the oracle does keeps them for what they look like, not for the attention they will get. For each (sample, layer,
KV head) of a split, at the prompt boundary (the view ``kvp-gym evaluate`` gives, :func:`layer_view`), the policy
ranks every prompt token; the candidates are the prompt tokens the protocol does not protect (``paper``: all but
the first 4 and the last 16, which every policy keeps anyway; ``raw``: all), the same for every policy; the share
is the fraction of the class among the top ``k`` candidates (all of them if fewer). The base rate is the class's
fraction among the candidates: a ranking blind to the class has it as its expected share.

Aggregation, as the holistic score's: per sample the mean over layers and heads, then the mean over samples, with a
95% bootstrap interval over samples (:mod:`kvp_gym.evaluation.stats`, one generator per (policy, statistic)). The
ratio to the oracle (the first policy whose scorer is named ``oracle``) is the ratio of the two means, its interval
paired: the same resampled samples for both.

results.json, schema ``kvp-gym/token-class-shares`` version 1::

    {"schema", "schema_version", "kvp_gym_version", "created_by", "traces": [{"path", "sha256"}], "model",
     "split", "samples", "layers", "num_kv_heads", "protocol": {"name", "sinks", "recent", "description"},
     "top", "token_class", "seed", "bootstrap_resamples", "oracle": label | null,
     "base_rate": {"mean", "ci95"}, "base_rate_per_sample": [S],
     "policies": {label: {"share": {"mean", "ci95"}, "per_sample_head": [S][L][H],
                          "ratio_to_oracle": {"mean", "ci95"} | null}}}

Imports kvp_gym.importance, .models (the tokenizer, when none is given), .scorers, .storage, .traces, .utility,
.version and kvp_gym.evaluation.selection and .stats.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kvp_gym.evaluation.selection import declared_view, evaluation_samples, layer_view
from kvp_gym.evaluation.stats import bootstrap_generator, interval95, mean_interval, resample_rows
from kvp_gym.importance import ImportanceStore
from kvp_gym.scorers import PolicySpec, ScorerError, model_mismatches, resolve_policies, score
from kvp_gym.storage import atomic_path, file_sha256
from kvp_gym.traces import open_compatible
from kvp_gym.utility import PROTOCOLS, as_ranking, protected_tokens
from kvp_gym.version import __version__

SCHEMA, SCHEMA_VERSION = "kvp-gym/token-class-shares", 1

# Class name -> predicate on a token's decoded text. One line per class; ship only the tested ones.
TOKEN_CLASSES: dict[str, Callable[[str], bool]] = {
    "digits": lambda text: re.search(r"[0-9]", text) is not None,
}


def class_mask(tokenizer, token_ids: Sequence[int] | np.ndarray, token_class: str) -> np.ndarray:
    """Bool [T]: whether each token id's decoded text (``tokenizer.decode([id])``) is in ``token_class``."""
    _check_token_class(token_class)
    member = TOKEN_CLASSES[token_class]
    ids = np.asarray(token_ids, dtype=np.int64)
    unique, inverse = np.unique(ids, return_inverse=True)
    found = np.array([member(tokenizer.decode([int(i)])) for i in unique], dtype=bool)
    return found[inverse.reshape(-1)] if len(ids) else np.zeros(0, dtype=bool)


def _check_token_class(token_class: str) -> None:
    if token_class not in TOKEN_CLASSES:
        raise ValueError(f"unknown token class {token_class!r}; expected one of {sorted(TOKEN_CLASSES)}")


def top_k_shares(scores: torch.Tensor, candidates: torch.Tensor, in_class: torch.Tensor, k: int) -> torch.Tensor:
    """Float64 [H]: the class's share of each head's top ``min(k, candidates)`` candidate tokens.

    ``scores`` [H, n] (higher = keep; ties: the earlier token first, as :func:`kvp_gym.utility.as_ranking`),
    ``candidates`` and ``in_class`` bool [n]. Non-candidates are never in the top. NaN without candidates."""
    count = int(candidates.sum())
    if count == 0:
        return torch.full((scores.shape[0],), float("nan"), dtype=torch.float64)
    order = as_ranking(scores, candidates.expand_as(scores))  # [H, n], candidates first
    top = order[:, : min(k, count)]
    return in_class[top].double().mean(-1)


def base_rate(candidates: torch.Tensor, in_class: torch.Tensor) -> float:
    """The class's fraction among the candidate tokens (bool [n] each); NaN without candidates."""
    count = int(candidates.sum())
    return float((in_class & candidates).sum()) / count if count else float("nan")


def ratio_interval(mine: np.ndarray, reference: np.ndarray, rng: np.random.Generator, resamples: int) -> dict | None:
    """{"mean", "ci95"}: mean(mine) / mean(reference) over samples ([S] each), with a paired 95% bootstrap interval
    (the same resampled samples for both); None when the reference's mean is 0. A resample whose reference mean is
    0 counts as an infinite ratio (0/0: left out); an infinite bound is reported as null."""
    if reference.mean() == 0:
        return None
    draws = resample_rows(len(mine), resamples, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = mine[draws].mean(1) / reference[draws].mean(1)
    ratio = float(mine.mean() / reference.mean())
    if np.isfinite(boot).all():
        return {"mean": ratio, "ci95": interval95(boot)}
    bounds = np.nanpercentile(boot, [2.5, 97.5], method="inverted_cdf")  # no interpolation: exact with inf
    return {"mean": ratio, "ci95": [float(b) if np.isfinite(b) else None for b in bounds]}


def token_class_shares(
    traces: str | Path | Sequence[str | Path],
    policies: Sequence[PolicySpec],
    token_class: str = "digits",
    top: int = 64,
    split: str = "val",
    protocol: str = "paper",
    seed: int = 0,
    bootstrap: int = 1000,
    max_samples: int | None = None,
    tokenizer=None,
    progress: bool = True,
) -> dict[str, Any]:
    """The record of the module docstring for ``policies`` (specs or scorer objects, as ``kvp-gym evaluate``) on
    every sample of ``split`` (``all``: every sample; the first ``max_samples``), every layer and KV head.
    ``tokenizer`` (anything with ``decode(list[int]) -> str``) defaults to the trace model's."""
    _check_token_class(token_class)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    if top < 1 or bootstrap < 1:
        raise ValueError(f"top and bootstrap must be >= 1, got top={top}, bootstrap={bootstrap}")
    scorers = resolve_policies(list(policies))[0]
    files = open_compatible([traces] if isinstance(traces, str | Path) else list(traces))
    try:
        header = files[0].header
        mismatches = model_mismatches(scorers, header.model, header.geometry)
        if mismatches:
            raise ScorerError(next(iter(mismatches.values())))
        samples = [(files[i], s) for i, s in evaluation_samples(files, split, max_samples)]
        if not samples:
            present = sorted({s.split for t in files for s in t.samples.values()})
            where = ", ".join(str(t.path) for t in files)
            raise ValueError(f"{where}: no {split!r} samples; splits present: {present} (or 'all')")
        if tokenizer is None:
            from kvp_gym.models import load

            tokenizer = load(header.model)[1]
        rules, layers = PROTOCOLS[protocol], list(header.layers)
        shares, rates = _score_cells(samples, layers, scorers, rules, tokenizer, token_class, top, progress)
        traces_used = [{"path": str(t.path), "sha256": file_sha256(t.path)} for t in files]
    finally:
        for trace in files:
            trace.close()
    oracle = next((label for label, s in scorers.items() if s.name == "oracle"), None)
    per_sample = {label: values.mean((1, 2)) for label, values in shares.items()}
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "kvp_gym_version": __version__,
        "created_by": "kvp-gym evaluate-shortcut",
        "traces": traces_used,
        "model": header.model,
        "split": split,
        "samples": [s.name for _, s in samples],
        "layers": layers,
        "num_kv_heads": header.geometry.num_kv_heads,
        "protocol": dataclasses.asdict(rules),
        "top": top,
        "token_class": token_class,
        "seed": seed,
        "bootstrap_resamples": bootstrap,
        "oracle": oracle,
        "base_rate": mean_interval(rates, bootstrap_generator(seed, "base_rate", token_class), bootstrap),
        "base_rate_per_sample": rates.tolist(),
        "policies": {
            label: {
                "share": mean_interval(
                    per_sample[label], bootstrap_generator(seed, label, f"{token_class}_share@{top}"), bootstrap
                ),
                "per_sample_head": np.round(shares[label], 6).tolist(),
                "ratio_to_oracle": None
                if oracle is None
                else ratio_interval(
                    per_sample[label],
                    per_sample[oracle],
                    bootstrap_generator(seed, label, oracle, f"{token_class}_share_ratio@{top}"),
                    bootstrap,
                ),
            }
            for label in scorers
        },
    }


def _score_cells(
    samples: list, layers: list[int], scorers: dict, rules, tokenizer, token_class: str, top: int, progress: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every scorer's share on every (sample, layer, KV head): label -> [S, L, H]; and each sample's base rate [S].
    ``samples``: (open trace, SampleInfo) pairs; ``rules``: the protocol."""
    heads = samples[0][0].header.geometry.num_kv_heads
    stores = {trace: ImportanceStore(trace) for trace in {t for t, _ in samples}}
    shares = {label: np.zeros((len(samples), len(layers), heads)) for label in scorers}
    rates = np.zeros(len(samples))
    work = [(i, j) for i in range(len(samples)) for j in range(len(layers))]
    for i, j in tqdm(work, desc=f"{token_class} share", unit="layer", disable=not progress):
        trace, sample = samples[i]
        n = sample.prompt_length
        candidates = ~protected_tokens(n, n, rules.sinks, rules.recent)
        in_class = torch.from_numpy(class_mask(tokenizer, sample.tokens[:n], token_class))
        rates[i] = base_rate(candidates, in_class)
        view, importance, _ = layer_view(trace, stores[trace], sample, layers[j], heads)
        for label, scorer in scorers.items():  # each scorer sees what it declares, as in `kvp-gym evaluate`
            with torch.no_grad():
                scores = score(scorer, declared_view(scorer, view, importance)).cpu()
            shares[label][i, j] = top_k_shares(scores, candidates, in_class, top).numpy()
    return shares, rates


def shares_table(record: dict[str, Any]) -> str:
    """A Markdown table of a record: one row per policy (share, its interval, ratio to the oracle's, base rate)."""
    cls, top, base = record["token_class"], record["top"], record["base_rate"]["mean"]
    rows = [
        f"| policy | {cls} share of top-{top} | 95% interval | ratio to {record['oracle'] or 'oracle'} "
        "(paired 95%) | base rate |",
        "|---|---|---|---|---|",
    ]
    for label, found in record["policies"].items():
        share, ratio = found["share"], found["ratio_to_oracle"]
        low, high = share["ci95"]
        said = "n/a" if ratio is None else f"{ratio['mean']:.2f} [" + ", ".join(_bound(b) for b in ratio["ci95"]) + "]"
        rows.append(f"| {label} | {share['mean']:.4f} | [{low:.4f}, {high:.4f}] | {said} | {base:.4f} |")
    return "\n".join(rows)


def _bound(value: float | None) -> str:
    return "inf" if value is None else f"{value:.2f}"


def write_shares(record: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/results.json`` atomically; return its path."""
    path = Path(out) / "results.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return path
