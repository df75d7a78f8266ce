"""``KVEvict-v0``: rank one KV head's cached tokens; the reward is the holistic all-budget utility.

Imports kvp_gym.envs.episodes, kvp_gym.storage and kvp_gym.utility; kvp_gym.collect only to build the default trace
set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from kvp_gym.envs.episodes import Episode, EpisodeKey, TraceEpisodes
from kvp_gym.storage import cache_dir
from kvp_gym.utility import holistic_costs, protected_tokens, protocol_name, retained_fraction

log = logging.getLogger(__name__)
FLOAT16_MAX = float(np.finfo(np.float16).max)  # traces store float16: no observed value can exceed it

DEFAULT_CONFIG: dict[str, Any] = {
    "traces": None,  # a trace file or a list of them; None = the default SmolLM2 trace set (collected on first use)
    "split": "train",  # train | val | test
    "layers": None,  # layers to draw episodes from; None = every recorded layer
    "heads": None,  # KV heads to draw from; None = all
    "split_point": "prompt",  # prompt = the true prompt boundary | random = uniform in [min_prompt, S-1]
    "min_prompt": 16,
    "max_tokens": None,  # padded length of the observation; None = the longest cache the trace files can produce
    "observe_queries": "none",  # none | window:W (the last W prompt queries of the GQA group) | all
    "sinks": 0,  # first cached tokens always kept, left out of the reward (4 with recent=16 = the paper protocol)
    "recent": 0,  # last cached tokens always kept, left out of the reward
    "budgets": (16, 32, 64, 128, 256, 512),  # budgets whose retained fraction `info` reports
    "cache_size": 1024,  # episodes kept in memory
}


def resolve_config(config: Mapping[str, Any] | None, loose: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULT_CONFIG updated with ``config`` and validated (:func:`validated_config`)."""
    return validated_config(config, DEFAULT_CONFIG, "KVEvict", loose)


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= low


def _is_path(value: Any) -> bool:
    return isinstance(value, str | os.PathLike)


def _int_list(value: Any, low: int) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str | bytes)
        and len(value) > 0
        and all(_is_int(v, low) for v in value)
    )


def _query_mode(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    return value in ("none", "all") or (value.startswith("window:") and value[7:].isdigit() and int(value[7:]) > 0)


# key -> (test, what is allowed), for every key of every KVEvict environment's config.
CONFIG_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "traces": (
        lambda v: v is None or _is_path(v) or (isinstance(v, Sequence) and len(v) > 0 and all(map(_is_path, v))),
        "None (the default trace set), a trace file path, or a non-empty list of paths",
    ),
    "split": (lambda v: v in ("train", "val", "test"), "'train', 'val' or 'test'"),
    "layers": (lambda v: v is None or _int_list(v, 0), "None (all recorded layers) or a non-empty list of layer ids"),
    "heads": (lambda v: v is None or _int_list(v, 0), "None (all KV heads) or a non-empty list of KV head ids"),
    "split_point": (lambda v: v in ("prompt", "random"), "'prompt' or 'random'"),
    "min_prompt": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "max_tokens": (lambda v: v is None or _is_int(v, 1), "None (the longest cache) or an integer >= 1"),
    "observe_queries": (_query_mode, "'none', 'all' or 'window:W' with W > 0"),
    "sinks": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "recent": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "budgets": (lambda v: _int_list(v, 1), "a non-empty list of budgets >= 1"),
    "cache_size": (lambda v: _is_int(v, 1), "an integer >= 1 (episodes kept in memory)"),
    "budget": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "action": (lambda v: v in ("index", "scores"), "'index' or 'scores'"),
}


def validated_config(
    config: Mapping[str, Any] | None, defaults: Mapping[str, Any], env: str, loose: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``defaults`` updated with ``config``. An unknown key (KeyError, listing the known ones), or a value of the
    wrong type or range (ValueError naming the key, the value and what is allowed), is refused. ``loose``: keyword
    arguments the constructor received beside ``config`` (``gym.make(id, traces=...)``), refused with a TypeError
    that shows the ``config=`` form, since Gymnasium's own message would not say where settings go."""
    if loose:
        settings = ", ".join(f"{key!r}: ..." for key in loose)
        raise TypeError(
            f"{env} takes its settings in one dict: gym.make(..., config={{{settings}}}), not as keyword arguments "
            f"({', '.join(loose)}); known keys: {sorted(defaults)}"
        )
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TypeError(f"{env} config must be a dict with keys from {sorted(defaults)}, got {config!r}")
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise KeyError(f"unknown {env} config keys {unknown}; known: {sorted(defaults)}")
    merged = {**defaults, **config}
    for key, value in merged.items():
        test, allowed = CONFIG_RULES[key]
        if not test(value):
            raise ValueError(f"{env} config {key!r}: expected {allowed}, got {value!r}")
    return merged


def checked_scores(action: Any, shape: tuple[int, ...], what: str = "action") -> np.ndarray:
    """``action`` as float32 scores of ``shape``, all finite and inside the action space [-1, 1]; else ValueError
    saying which of the three it breaks."""
    scores = np.asarray(action, np.float32)
    if scores.shape != shape:
        raise ValueError(f"{what} must have shape {shape} (one score per token slot), got shape {scores.shape}")
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"{what} must be finite scores; {bad} are NaN or Inf")
    if scores.size and np.abs(scores).max() > 1:
        raise ValueError(
            f"{what} must lie in the action space [-1, 1], got values in [{scores.min():.3g}, {scores.max():.3g}] "
            "(only the order of the scores matters: squash them, e.g. with tanh)"
        )
    return scores


def default_trace_folder(model: str = "smollm2-135m") -> Path:
    """Where the default trace set of ``model`` lives: ``<user cache>/traces/default-<model>``."""
    return cache_dir() / "traces" / f"default-{model}"


def default_traces(model: str = "smollm2-135m", progress: bool = True) -> list[Path]:
    """The default trace set in the user cache: 8 niah_single + 8 essay samples of 1k tokens, collected if missing
    (resumable). The no-config environments and ``make demo`` (``kvp-gym traces default``) share it."""
    from kvp_gym.collect import CollectConfig, collect  # needs transformers: imported only when collecting

    folder = default_trace_folder(model)
    paths = []
    for task, future in (("niah_single", 32), ("essay", 64)):
        path = folder / f"{task}.h5"
        if not path.exists():
            log.warning("collecting the default %s trace set with %s into %s (once, a few minutes)", task, model, path)
            config = CollectConfig(model=model, task=task, samples=8, context=1024, future=future)
            collect(config, path, resume=True, progress=progress)
        paths.append(path)
    return paths


def trace_paths(traces: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list:
    """The ``traces`` config value as a list of files; None = the default trace set."""
    if traces is None:
        return default_traces()
    return [traces] if isinstance(traces, str | os.PathLike) else list(traces)


def episode_source(config: Mapping[str, Any]) -> TraceEpisodes:
    return TraceEpisodes(
        trace_paths(config["traces"]),
        split=config["split"],
        layers=config["layers"],
        heads=config["heads"],
        split_point=config["split_point"],
        min_prompt=config["min_prompt"],
        max_tokens=config["max_tokens"],
        keep_queries=config["observe_queries"] != "none",
        cache_size=config["cache_size"],
    )


class Observations:
    """The observation space of a configuration, and the writing of episodes into (batched) observation arrays."""

    def __init__(self, config: Mapping[str, Any], episodes: TraceEpisodes):
        geometry = episodes.geometry
        self.max_tokens, self.head_dim = episodes.max_tokens, geometry.head_dim
        self.group = len(geometry.query_heads_of(0))
        mode = config["observe_queries"]
        self.window = None if mode == "none" else (self.max_tokens if mode == "all" else int(mode[7:]))
        self.aligned = mode == "all"  # queries row i = token i; else the window ends at the split point
        t, d = self.max_tokens, self.head_dim
        fields = {
            "key": spaces.Box(-FLOAT16_MAX, FLOAT16_MAX, (t, d), np.float32),
            "value": spaces.Box(-FLOAT16_MAX, FLOAT16_MAX, (t, d), np.float32),
            "positions": spaces.Box(0, np.iinfo(np.int32).max, (t,), np.int64),
            "mask": spaces.MultiBinary(t),
            "layer": spaces.Discrete(geometry.num_layers),
            "head": spaces.Discrete(geometry.num_kv_heads),
        }
        if self.window is not None:
            fields["query"] = spaces.Box(-FLOAT16_MAX, FLOAT16_MAX, (self.group, self.window, d), np.float32)
            fields["query_mask"] = spaces.MultiBinary(self.window)
        self.space = spaces.Dict(fields)

    def empty(self, batch: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
        return {name: np.zeros(batch + space.shape, space.dtype) for name, space in self.space.spaces.items()}

    def write(self, out: dict[str, np.ndarray], episode: Episode, index: tuple[int, ...] = ()) -> None:
        """Write ``episode`` into a fresh :meth:`empty` ``out`` at ``index`` (``()`` for a single observation)."""
        n = episode.key.split
        # torch converts float16 -> float32 about 10x faster than numpy's assignment does.
        torch.from_numpy(out["key"][index][:n]).copy_(episode.keys)
        torch.from_numpy(out["value"][index][:n]).copy_(episode.values)
        out["positions"][index][:n] = episode.positions.numpy()
        out["mask"][index][:n] = 1
        out["layer"][index] = episode.key.layer
        out["head"][index] = episode.key.head
        if self.window is not None:
            queries = episode.queries
            m = min(self.window, n)
            rows = slice(0, m) if self.aligned else slice(self.window - m, self.window)
            torch.from_numpy(out["query"][index][:, rows]).copy_(
                queries[:, n - m : n] if not self.aligned else queries[:, :m]
            )
            out["query_mask"][index][rows] = 1


class KVEvictEnv(gym.Env):
    """Rank the cached tokens of one KV head so that every budget keeps what the future will attend to.

    A one-step episode (a contextual bandit, as in the KVP paper): the environment draws a (trace sample, layer,
    KV head, split point n) and shows the head's cache; the agent answers with one score per cached token; the
    reward measures the ranking those scores induce at every budget at once.

    ## Observation
    A Dict, padded to ``max_tokens`` (T) rows, D = head_dim:

    - ``key``, ``value``: float32 [T, D], post-RoPE keys and values of tokens 0..n-1 (zeros beyond n). (Not
      "keys"/"values": those names clash with SB3's MultiInputPolicy, which keeps one module per field.)
    - ``positions``: int64 [T], each token's position in the sequence.
    - ``mask``: int8 [T], 1 for the n real tokens.
    - ``layer``, ``head``: which layer and KV head this is (Discrete).
    - with ``observe_queries="window:W"``: ``query`` float32 [G, W, D], the last W prompt queries of the head's
      GQA group (right-aligned at the split point), and ``query_mask`` [W]; with ``"all"``: [G, T, D] aligned
      with the keys.

    ## Action
    ``Box(-1, 1, (T,))``: one score per token, higher = keep. Scores on padding are ignored; ties keep the earlier
    token first. With ``sinks``/``recent`` protection those tokens are kept at every budget whatever their scores,
    and the reward measures the ranking of the other tokens only (``kvp-gym evaluate --protocol paper`` is
    ``sinks=4, recent=16``).

    ## Reward
    ``-cost / oracle_cost`` with cost = sum_k k * importance[sigma_k] over the ranking sigma of the unprotected
    tokens, importance = the attention each cached token receives from the trace's future queries (max over the
    GQA group, summed over queries). It is <= -1, and -1 exactly for the oracle ranking.

    ## Episode end
    Terminates after one step (``terminated=True``); never truncates.

    ## Info
    From ``reset``: ``episode`` (the :class:`EpisodeKey`, to replay it) and ``protocol``, the evaluation protocol
    whose score ``holistic_score`` is: ``"raw"`` by default (nothing protected, the training signal), ``"paper"``
    with ``sinks=4, recent=16`` (the protocol of ``kvp-gym evaluate``'s tables and the leaderboard), else
    ``"custom:sinks=S;recent=R"`` (:func:`kvp_gym.utility.protocol_name`).

    After the step: ``holistic_score`` (oracle_cost / cost, in (0, 1]), ``retained_fraction`` (float32
    [len(budgets)], the share of importance kept at each configured budget, protected tokens counted in it; NaN for
    a budget below the protected count), ``budgets``, ``cost``, ``oracle_cost``, ``trace``, ``sample``, ``layer``,
    ``head``, ``split_point``, ``num_tokens``.

    ## Arguments
    ``gym.make("KVEvict-v0", config={...})`` with keys of :data:`DEFAULT_CONFIG` (highway-env style): the trace
    files, split, layers/heads to draw from, split-point mode, padding length, query observation, protected
    tokens, reported budgets.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: Mapping[str, Any] | None = None, render_mode: str | None = None, **loose: Any):
        self.config = resolve_config(config, loose)
        self.episodes = episode_source(self.config)
        self.observations = Observations(self.config, self.episodes)
        self.observation_space = self.observations.space
        self.action_space = spaces.Box(-1.0, 1.0, (self.episodes.max_tokens,), np.float32)
        self.budgets = tuple(self.config["budgets"])
        self.protocol = protocol_name(self.config["sinks"], self.config["recent"])
        self._episode: Episode | None = None
        self._observation: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Draw an episode, or replay ``options["episode"]`` (the EpisodeKey that ``info["episode"]`` reported),
        e.g. to score several rankings of one episode."""
        super().reset(seed=seed)
        key = (options or {}).get("episode") or self.episodes.draw(self.np_random)
        if not isinstance(key, EpisodeKey):
            raise TypeError(f"options['episode'] must be an EpisodeKey (from info['episode']), got {key!r}")
        self._episode = self.episodes.load(key)
        observation = self.observations.empty()  # fresh arrays: nothing the caller holds is ever overwritten
        self.observations.write(observation, self._episode)
        # Discrete fields (layer, head) are 0-d arrays here; observations carry them as numpy integers.
        self._observation = {name: value if value.ndim else value[()] for name, value in observation.items()}
        return self._observation, {"episode": key, "protocol": self.protocol}

    def step(self, action):
        if self._episode is None:
            raise RuntimeError("call reset() before step()")
        episode, self._episode = self._episode, None
        action = checked_scores(action, self.action_space.shape)
        n = episode.key.split
        scores = torch.from_numpy(action[:n])
        protected = protected_tokens(n, n, self.config["sinks"], self.config["recent"])
        importance = episode.importance
        cost, oracle, reward = holistic_costs(importance * ~protected, scores, ~protected)
        reward = float(reward)
        info = {
            "holistic_score": -1.0 / reward,
            "retained_fraction": retained_fraction(importance, scores, self.budgets, protected=protected).numpy(),
            "budgets": np.asarray(self.budgets),
            "cost": float(cost),
            "oracle_cost": float(oracle),
            "trace": episode.key.trace,
            "sample": episode.key.sample,
            "layer": episode.key.layer,
            "head": episode.key.head,
            "split_point": n,
            "num_tokens": episode.num_tokens,
        }
        # The terminal observation is the one the ranking was made for, as new arrays (callers keep observations).
        terminal = {name: value.copy() for name, value in self._observation.items()}
        return terminal, reward, True, False, info

    def close(self) -> None:
        self.episodes.close()
