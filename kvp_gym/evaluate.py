"""Trace-level evaluation: every scorer on every (sample, layer, KV head) of a split, at the prompt boundary.

The numbers come from the same utility code as the environment (:mod:`kvp_gym.utility`). Results go to
``DIR/results.json`` (schema below, versioned) and three PNG plots; :func:`format_table` renders the summary.

results.json, schema ``kvp-gym/trace-evaluation`` version 1::

    {"schema", "schema_version", "kvp_gym_version", "created_by",
     "traces": [{"path", "sha256"}], "model", "layers", "num_kv_heads", "split", "samples": [names],
     "tasks": [task of each sample], "seed",
     "bootstrap_resamples", "budgets": {"absolute": [...], "fractions": [...]}, "skipped": {name: reason},
     "policies": {name: {"parameters", "needs_queries", "privileged",
                         "holistic_score": {"mean", "ci95": [low, high]},   # bootstrap over samples
                         "per_task": {task: mean},
                         "per_layer": [L], "per_head": [L][H],                # means over samples
                         "retained_fraction": {"absolute": {"16": ...}, "fractions": {"0.05": ...}},
                         "seconds"}},
     "timing": {"total_seconds", "attention_scorer_seconds", "importance_seconds"}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from kvp_gym import __version__
from kvp_gym.scorers import HeadView, Scorer, ScorerError, available_scorers, get_scorer, parameters, score
from kvp_gym.storage import atomic_path
from kvp_gym.traces import SPLITS, open_compatible
from kvp_gym.utility import future_importance, holistic_score, retained_fraction

SCHEMA, SCHEMA_VERSION = "kvp-gym/trace-evaluation", 1
ABSOLUTE_BUDGETS = (16, 32, 64, 128, 256, 512)
FRACTION_BUDGETS = (0.05, 0.10, 0.25, 0.50)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_policies(policies: str | Sequence[str]) -> tuple[dict[str, Scorer], dict[str, str]]:
    """Instantiate scorers from ``'all'`` or specs ``name`` / ``name:param=value,...``.

    Returns (scorers by name, skipped): with ``'all'``, a registered scorer that cannot be built with default
    parameters is skipped with its reason instead of failing the run. An unknown
    name is a ValueError listing the available ones.
    """
    if policies == "all":
        scorers, skipped = {}, {}
        for name in available_scorers():
            try:
                scorers[name] = get_scorer(name)
            except ScorerError as err:
                skipped[name] = str(err)
        return scorers, skipped
    scorers = {}
    for spec in policies:
        name, _, arguments = spec.partition(":")
        if name not in available_scorers():
            raise ValueError(f"unknown policies [{name!r}]; available: {', '.join(available_scorers())}")
        params = dict(pair.split("=", 1) for pair in arguments.split(";") if pair)
        scorers[name] = get_scorer(name, **{k: _number(v) for k, v in params.items()})
    return scorers, {}


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def evaluate(
    traces: str | Path | Sequence[str | Path],
    policies: str | list[str] = "all",
    split: str = "test",
    seed: int = 0,
    bootstrap: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate scorers on a split (``all`` = every sample) of one or more trace files of the same model.

    Returns the results record (see the module docstring).
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}; expected one of {(*SPLITS, 'all')}")
    scorers, skipped = resolve_policies(policies)
    paths = [traces] if isinstance(traces, str | Path) else list(traces)
    started = time.perf_counter()
    files = open_compatible(paths)
    try:
        header = files[0].header
        for name, reason in _model_mismatches(scorers, header).items():  # an error, or skipped under 'all'
            if policies != "all":
                raise ScorerError(reason)
            skipped[name] = reason
            del scorers[name]
        names = list(scorers)
        samples = [(t, s) for t in files for s in t.samples.values() if split == "all" or s.split == split]
        if not samples:
            present = sorted({s.split for t in files for s in t.samples.values()})
            raise ValueError(f"{', '.join(str(p) for p in paths)}: no {split!r} samples; splits present: {present}")
        layers, heads = header.layers, header.geometry.num_kv_heads
        budgets = len(ABSOLUTE_BUDGETS) + len(FRACTION_BUDGETS)
        scores = {name: np.zeros((len(samples), len(layers), heads)) for name in names}
        kept = {name: np.zeros((len(samples), len(layers), heads, budgets)) for name in names}
        seconds = dict.fromkeys(names, 0.0)
        importance_seconds = 0.0
        work = [(i, t, s, j, layer) for i, (t, s) in enumerate(samples) for j, layer in enumerate(layers)]
        for i, trace, sample, j, layer in tqdm(work, desc=f"evaluate {split}", unit="layer", disable=not progress):
            view, importance, tick = _layer_view(trace, sample, layer, heads)
            importance_seconds += tick
            n = sample.prompt_length
            at = list(ABSOLUTE_BUDGETS) + [max(1, round(f * n)) for f in FRACTION_BUDGETS]
            for name, scorer in scorers.items():
                tick = time.perf_counter()
                given = view if not scorer.needs_future else dataclasses.replace(view, future_importance=importance)
                if not scorer.needs_queries:
                    given = dataclasses.replace(given, queries=None)  # a scorer sees only what it declares
                s = score(scorer, given)
                seconds[name] += time.perf_counter() - tick
                scores[name][i, j] = holistic_score(importance, s).numpy()
                kept[name][i, j] = retained_fraction(importance, s, at).numpy()
        record = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "kvp_gym_version": __version__,
            "created_by": "kvp-gym evaluate",
            "traces": [{"path": str(t.path), "sha256": file_sha256(t.path)} for t in files],
            "model": header.model,
            "layers": list(layers),
            "num_kv_heads": heads,
            "split": split,
            "samples": [s.name for _, s in samples],
            "tasks": [s.task for _, s in samples],
            "seed": seed,
            "bootstrap_resamples": bootstrap,
            "budgets": {"absolute": list(ABSOLUTE_BUDGETS), "fractions": list(FRACTION_BUDGETS)},
            "policies": {},
            "skipped": skipped,
        }
    finally:
        for trace in files:
            trace.close()
    rng = np.random.default_rng(seed)
    for name, scorer in scorers.items():
        per_sample = scores[name].mean((1, 2))
        resampled = rng.choice(per_sample, size=(bootstrap, len(per_sample))).mean(1)
        mean_kept = kept[name].mean((0, 1, 2))
        record["policies"][name] = {
            "parameters": parameters(scorer),
            "needs_queries": scorer.needs_queries,
            "privileged": scorer.needs_future,
            "holistic_score": {
                "mean": float(per_sample.mean()),
                "ci95": [float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))],
            },
            "per_task": {
                task: float(per_sample[[t == task for t in record["tasks"]]].mean())
                for task in sorted(set(record["tasks"]))
            },
            "per_layer": scores[name].mean((0, 2)).tolist(),
            "per_head": scores[name].mean(0).tolist(),
            "retained_fraction": {
                "absolute": {str(b): float(v) for b, v in zip(ABSOLUTE_BUDGETS, mean_kept, strict=False)},
                "fractions": {
                    str(f): float(v) for f, v in zip(FRACTION_BUDGETS, mean_kept[len(ABSOLUTE_BUDGETS) :], strict=True)
                },
            },
            "seconds": seconds[name],
        }
    record["timing"] = {
        "total_seconds": time.perf_counter() - started,
        "attention_scorer_seconds": sum(seconds[n] for n in names if scorers[n].needs_queries),
        "importance_seconds": importance_seconds,
    }
    return record


def _model_mismatches(scorers: dict[str, Scorer], header) -> dict[str, str]:
    """Scorers trained for another model than the traces' (their optional ``check_geometry``), with the reason."""
    found = {}
    g = header.geometry
    for name, scorer in scorers.items():
        check = getattr(scorer, "check_geometry", None)
        try:
            if check is not None:
                check(header.model, g.head_dim, g.num_layers, g.num_kv_heads)
        except ScorerError as err:
            found[name] = str(err)
    return found


def _layer_view(trace, sample, layer: int, heads: int) -> tuple[HeadView, torch.Tensor, float]:
    """All KV heads of one layer of one sample, cut at the prompt boundary, and their future importance."""
    reads = [trace.head(sample, layer, h) for h in range(heads)]
    n = sample.prompt_length
    queries = torch.stack([r.queries for r in reads])  # [H, G, S, D]
    keys = torch.stack([r.keys for r in reads])  # [H, S, D]
    tick = time.perf_counter()
    importance = future_importance(queries, keys, n)  # [H, n]
    tick = time.perf_counter() - tick
    view = HeadView(
        keys=keys[:, :n],
        values=torch.stack([r.values[:n] for r in reads]),
        positions=torch.arange(n).expand(heads, n),
        mask=torch.ones(heads, n, dtype=torch.bool),
        queries=queries[:, :, :n],
        layer=torch.full((heads,), layer),
        kv_head=torch.arange(heads),
    )
    return view, importance, tick


def write_results(record: dict[str, Any], out: str | Path) -> list[Path]:
    """Write ``out/results.json`` and the PNG plots atomically; return the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return [out / "results.json", *plot_results(record, out)]


def heads_won(record: dict[str, Any], name: str) -> dict[str, float]:
    """For every other policy: the fraction of (layer, KV head) pairs on which ``name``'s mean holistic score is
    higher than that policy's."""
    if name not in record["policies"]:
        raise ValueError(f"--versus {name!r}: not among the evaluated policies {sorted(record['policies'])}")
    mine = np.array(record["policies"][name]["per_head"])
    return {
        other: float((mine > np.array(p["per_head"])).mean())
        for other, p in record["policies"].items()
        if other != name
    }


def format_table(record: dict[str, Any], versus: str | None = None) -> str:
    """A plain-text table: policy, mean holistic score, 95% interval, retained fraction at 64 and 256 tokens, the
    mean per task when there are several, and with ``versus`` the share of heads on which that policy wins."""
    files = ", ".join(t["path"] for t in record["traces"])
    tasks = sorted(set(record.get("tasks", []))) if len(set(record.get("tasks", []))) > 1 else []
    won = heads_won(record, versus) if versus else {}
    header = f"{'policy':16s} {'holistic score':>14s} {'95% interval':>16s} {'kept@64':>8s} {'kept@256':>9s}"
    header += "".join(f" {t[:12]:>12s}" for t in tasks) + (f" {versus[:7] + ' wins':>12s}" if versus else "")
    lines = [
        f"{files} ({record['model']}), split {record['split']}, {len(record['samples'])} samples x "
        f"{len(record['layers'])} layers x {record['num_kv_heads']} KV heads",
        header + "  sees",
    ]
    ranked = sorted(record["policies"].items(), key=lambda kv: -kv[1]["holistic_score"]["mean"])
    for name, p in ranked:
        low, high = p["holistic_score"]["ci95"]
        sees = "future (upper bound)" if p["privileged"] else ("queries" if p["needs_queries"] else "K/V")
        kept = p["retained_fraction"]["absolute"]
        line = (
            f"{name:16s} {p['holistic_score']['mean']:14.3f} {f'[{low:.3f}, {high:.3f}]':>16s} "
            f"{kept['64']:8.3f} {kept['256']:9.3f}"
        )
        line += "".join(f" {p['per_task'][t]:12.3f}" for t in tasks)
        if versus:
            line += f" {won[name]:12.0%}" if name in won else f" {'':12s}"
        lines.append(line + f"  {sees}")
    if versus:
        lines.append(f"'{versus} wins': share of the (layer, KV head) pairs on which {versus} scores higher")
    return "\n".join(lines)


def plot_results(record: dict[str, Any], out: Path) -> list[Path]:
    """holistic_score.png, retained_fraction.png and layer_head_scores.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted(record["policies"].items(), key=lambda kv: kv[1]["holistic_score"]["mean"])
    names = [n + (" (upper bound)" if p["privileged"] else "") for n, p in policies]
    means = np.array([p["holistic_score"]["mean"] for _, p in policies])
    intervals = np.array([p["holistic_score"]["ci95"] for _, p in policies])
    written = []

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(policies) + 1.5))
    colors = ["0.6" if p["privileged"] else ("tab:orange" if p["needs_queries"] else "tab:blue") for _, p in policies]
    ax.barh(names, means, xerr=np.abs(intervals.T - means), color=colors, capsize=3)
    ax.set_xlabel("holistic score (oracle cost / cost), 95% bootstrap interval over samples")
    ax.set_xlim(0, 1.05)
    ax.set_title(f"{record['model']}, split {record['split']} (orange: sees queries)")
    fig.tight_layout()
    written.append(_save(fig, out / "holistic_score.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = record["budgets"]["absolute"]
    for (_, p), label in zip(policies[::-1], names[::-1], strict=True):
        values = [p["retained_fraction"]["absolute"][str(b)] for b in budgets]
        ax.plot(budgets, values, marker="o", label=label, linestyle="--" if p["privileged"] else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (tokens kept per head)")
    ax.set_ylabel("share of future attention retained")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "retained_fraction.png"))

    shown = [(n, p) for n, p in policies[::-1] if not p["privileged"]]
    columns = min(4, len(shown)) or 1
    rows = -(-len(shown) // columns) or 1
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.6 * columns + 1, 3.4 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for index, (ax, (name, p)) in enumerate(zip(axes.flat, shown, strict=False)):
        ax.axis("on")
        image = ax.imshow(np.array(p["per_head"]), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=9)
        if index // columns == rows - 1:
            ax.set_xlabel("KV head")
        if index % columns == 0:
            ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="holistic score (oracle = 1)")
    written.append(_save(fig, out / "layer_head_scores.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
