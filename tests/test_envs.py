"""KVEvict-v0 and its native vector version: checkers, determinism, observations and rewards against the utility."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import kvp_gym  # noqa: F401  (registers the environments)
from kvp_gym.envs.episodes import EpisodeKey
from kvp_gym.traces import open_traces
from kvp_gym.utility import future_importance, holistic_reward, holistic_score, retained_fraction

ROOT = Path(__file__).parents[1]


@pytest.fixture
def config(tiny_trace):
    return {"traces": str(tiny_trace), "split": "train"}


@pytest.mark.parametrize(
    "extra",
    [{}, {"observe_queries": "window:8"}, {"observe_queries": "all", "split_point": "random"}, {"sinks": 2}],
)
def test_passes_gymnasium_and_sb3_checkers(config, extra):
    env = gym.make("KVEvict-v0", config={**config, **extra}).unwrapped
    check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=False)


def test_make_without_import_in_a_fresh_process(tiny_trace):
    code = (
        "import gymnasium as gym; "
        f"env = gym.make('kvp_gym:KVEvict-v0', config={{'traces': {str(tiny_trace)!r}}}); "
        "obs, _ = env.reset(seed=0); print(obs['key'].shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("(")


def test_same_seed_same_episodes(config):
    def episodes(seed):
        env = gym.make("KVEvict-v0", config=config)
        env.reset(seed=seed)
        found = []
        for _ in range(10):
            _, _, _, _, info = env.step(np.zeros(env.action_space.shape, np.float32))
            found.append((info["sample"], info["layer"], info["head"], info["split_point"]))
            env.reset()
        return found

    assert episodes(5) == episodes(5)
    assert episodes(5) != episodes(6)


def test_reset_replays_a_chosen_episode(config):
    env = gym.make("KVEvict-v0", config=config)
    first, info = env.reset(seed=3)
    assert isinstance(info["episode"], EpisodeKey)
    env.step(np.zeros(env.action_space.shape, np.float32))
    env.reset()  # another episode in between
    again, replay_info = env.reset(options={"episode": info["episode"]})
    assert replay_info["episode"] == info["episode"]
    for name in first:
        np.testing.assert_array_equal(again[name], first[name])
    with pytest.raises(TypeError, match="must be an EpisodeKey"):
        env.reset(options={"episode": ("tiny", 0)})


def test_observation_and_reward_match_the_trace(config, tiny_trace):
    env = gym.make("KVEvict-v0", config={**config, "observe_queries": "window:4"})
    obs, _ = env.reset(seed=1)
    scores = env.action_space.sample()
    _, reward, terminated, truncated, info = env.step(scores)
    assert terminated and not truncated
    n = info["split_point"]
    with open_traces(tiny_trace) as trace:
        sample = trace.samples[info["sample"]]
        head = trace.head(sample, info["layer"], info["head"])
    assert n == sample.prompt_length and obs["layer"] == info["layer"] and obs["head"] == info["head"]
    np.testing.assert_array_equal(obs["key"][:n], head.keys[:n].float().numpy())
    np.testing.assert_array_equal(obs["value"][:n], head.values[:n].float().numpy())
    assert (obs["key"][n:] == 0).all() and obs["mask"].sum() == n and obs["mask"][:n].all()
    np.testing.assert_array_equal(obs["positions"][:n], np.arange(n))
    np.testing.assert_array_equal(obs["query"], head.queries[:, n - 4 : n].float().numpy())
    importance = future_importance(head.queries, head.keys, n)
    action = torch.from_numpy(scores[:n])
    assert reward == pytest.approx(holistic_reward(importance, action).item(), rel=1e-6)
    assert info["holistic_score"] == pytest.approx(holistic_score(importance, action).item(), rel=1e-6)
    budgets = [16, 32, 64, 128, 256, 512]
    np.testing.assert_allclose(info["retained_fraction"], retained_fraction(importance, action, budgets), rtol=1e-6)


def test_oracle_scores_get_minus_one_and_padding_is_ignored(config):
    env = gym.make("KVEvict-v0", config=config).unwrapped
    env.reset(seed=2)
    episode = env._episode
    n = episode.key.split
    scores = np.full(env.action_space.shape, 1.0, np.float32)  # padding scored highest: must not matter
    scores[:n] = (episode.importance / episode.importance.max()).numpy() * 0.5
    _, reward, _, _, info = env.step(scores)
    assert reward == pytest.approx(-1.0) and info["holistic_score"] == pytest.approx(1.0)


def test_protected_tokens_are_kept_and_left_out_of_the_reward(config):
    env = gym.make("KVEvict-v0", config={**config, "sinks": 3, "recent": 2, "budgets": (4, 5, 6)}).unwrapped
    env.reset(seed=3)
    episode = env._episode
    n = episode.key.split
    importance = episode.importance
    # Scores that rank the protected tokens last: they are kept anyway, and do not enter the reward.
    action = np.zeros(env.action_space.shape, np.float32)
    action[:n] = np.linspace(0.5, 1.0, n)
    action[[0, 1, 2, n - 2, n - 1]] = -1.0
    _, reward, _, _, info = env.step(action)
    protected = torch.cat([importance[:3], importance[n - 2 : n]])
    assert np.isnan(info["retained_fraction"][0])  # budget 4 < 5 protected tokens
    assert info["retained_fraction"][1] == pytest.approx((protected.sum() / importance.sum()).item())
    rest = importance[3 : n - 2]
    expected = holistic_reward(rest, torch.from_numpy(action[3 : n - 2]))
    assert reward == pytest.approx(expected.item(), rel=1e-5)
    # The oracle of the unprotected tokens gets exactly -1, whatever it gives the protected ones.
    env.reset(options={"episode": episode.key})
    action[3 : n - 2] = (rest / rest.max()).numpy()
    assert env.step(action)[1] == pytest.approx(-1.0)


def test_random_split_points_stay_in_range(config, tiny_trace):
    env = gym.make("KVEvict-v0", config={**config, "split_point": "random", "min_prompt": 50})
    env.reset(seed=4)
    with open_traces(tiny_trace) as trace:
        lengths = {s.name: s.num_tokens for s in trace.samples.values()}
    for _ in range(30):
        _, _, _, _, info = env.step(env.action_space.sample())
        assert 50 <= info["split_point"] <= lengths[info["sample"]] - 1
        env.reset()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"nope": 1}, "unknown KVEvict config keys \\['nope'\\]"),
        ({"observe_queries": "window:x"}, "'observe_queries': expected 'none', 'all' or 'window:W'"),
        ({"observe_queries": True}, "'observe_queries': expected .* got True"),
        ({"split": "val", "layers": [5]}, "layers \\[5\\] were not recorded"),
        ({"layers": "0-1"}, "'layers': expected None .* got '0-1'"),
        ({"max_tokens": 10}, "max_tokens=10 is below the longest prompt"),
        ({"max_tokens": "1024"}, "'max_tokens': expected None .* or an integer >= 1, got '1024'"),
        ({"split_point": "middle"}, "'split_point': expected 'prompt' or 'random'"),
        ({"traces": 123}, "'traces': expected None .* got 123"),
        ({"budgets": 64}, "'budgets': expected a non-empty list of budgets >= 1, got 64"),
        ({"budgets": [0, -5]}, "'budgets': expected"),
        ({"sinks": -1}, "'sinks': expected an integer >= 0, got -1"),
        ({"sinks": "4"}, "'sinks': expected an integer >= 0, got '4'"),
        ({"cache_size": 0}, "'cache_size': expected an integer >= 1"),
        ({"min_prompt": -3}, "'min_prompt': expected an integer >= 1"),
    ],
)
def test_bad_configuration_is_a_clear_error(config, bad, message):
    with pytest.raises((KeyError, ValueError), match=message):
        gym.make("KVEvict-v0", config={**config, **bad})


def test_config_must_be_a_dict_and_num_envs_positive(config):
    with pytest.raises(TypeError, match="KVEvict config must be a dict"):
        gym.make("KVEvict-v0", config="x.h5")
    with pytest.raises(ValueError, match="num_envs: expected an integer >= 1, got 0"):
        gym.make_vec("KVEvict-v0", num_envs=0, config=config)


@pytest.mark.parametrize(
    "action, message",
    [
        ("nan", "must be finite scores; 1 are NaN or Inf"),
        ("large", r"must lie in the action space \[-1, 1\], got values in \[-1, 1.5\]"),
        ("short", r"must have shape \(\d+,\) \(one score per token slot\), got shape \(3,\)"),
    ],
)
def test_bad_actions_say_what_is_wrong(config, action, message):
    env = gym.make("KVEvict-v0", config=config)
    env.reset(seed=0)
    scores = np.zeros(env.action_space.shape, np.float32)
    if action == "nan":
        scores[1] = np.nan
    elif action == "large":
        scores[[0, 2]] = (-1, 1.5)
    else:
        scores = scores[:3]
    with pytest.raises(ValueError, match=message):
        env.step(scores)


def test_missing_split_lists_what_exists(tmp_path, tiny_config):
    import dataclasses

    from kvp_gym.collect import collect

    path = tmp_path / "train-only.h5"
    collect(dataclasses.replace(tiny_config, samples=2, splits=(1.0, 0.0, 0.0)), path, progress=False)
    with pytest.raises(ValueError, match=r"no 'test' samples in .*train-only.h5; splits present: \['train'\]"):
        gym.make("KVEvict-v0", config={"traces": str(path), "split": "test"})


@pytest.mark.parametrize("protection", [{}, {"sinks": 4, "recent": 16, "split_point": "random"}])
def test_native_vector_env_matches_single_envs(config, protection):
    config = {**config, **protection}
    vec = gym.make_vec("KVEvict-v0", num_envs=8, config=config)
    assert type(vec).__name__ == "KVEvictVectorEnv"
    obs, _ = vec.reset(seed=7)
    actions = vec.action_space.sample()
    next_obs, rewards, terminated, truncated, info = vec.step(actions)
    assert terminated.all() and not truncated.any() and rewards.shape == (8,)
    episodes = gym.make("KVEvict-v0", config=config).unwrapped.episodes
    final = info
    for i in range(8):
        key = EpisodeKey(
            trace=int(final["trace"][i]),
            sample=final["sample"][i],
            layer=int(final["layer"][i]),
            head=int(final["head"][i]),
            split=int(final["split_point"][i]),
        )
        episode = episodes.load(key)
        n = key.split
        np.testing.assert_array_equal(obs["key"][i][:n], episode.keys.float().numpy())
        single = gym.make("KVEvict-v0", config=config).unwrapped
        single.reset(options={"episode": key})
        _, expected, _, _, single_info = single.step(actions[i])
        assert rewards[i] == pytest.approx(expected, rel=1e-5)
        np.testing.assert_allclose(final["retained_fraction"][i], single_info["retained_fraction"], rtol=1e-5)
        if not protection:
            assert expected == pytest.approx(holistic_reward(episode.importance, torch.from_numpy(actions[i][:n])))
    assert not np.array_equal(next_obs["key"], obs["key"])  # the next episodes were drawn in the same step


def test_one_info_layout_for_the_native_and_the_sync_vector_env(config):
    """Reset info: the episodes' keys; step info: the single env's step info, batched with `_key` masks (the
    native env resets in the same step, SyncVectorEnv in the next one: the info looks the same)."""
    native = gym.make_vec("KVEvict-v0", num_envs=3, config=config)
    sync = gym.make_vec("KVEvict-v0", num_envs=3, config=config, vectorization_mode="sync")
    single = gym.make("KVEvict-v0", config=config)
    _, native_reset = native.reset(seed=0)
    _, sync_reset = sync.reset(seed=0)
    _, single_reset = single.reset(seed=0)
    assert set(native_reset) == set(sync_reset) == {"episode", "protocol", "_episode", "_protocol"}
    assert set(single_reset) == {"episode", "protocol"}
    assert isinstance(native_reset["episode"][0], EpisodeKey)
    _, _, _, _, native_info = native.step(native.action_space.sample())
    _, _, _, _, sync_info = sync.step(sync.action_space.sample())
    _, _, _, _, single_info = single.step(single.action_space.sample())
    assert set(native_info) == set(sync_info)
    assert {k for k in native_info if not k.startswith("_")} == set(single_info)
    for name, value in native_info.items():
        assert np.asarray(value).shape[0] == 3, name


def test_default_trace_set_is_collected_once(tmp_path, monkeypatch):
    from kvp_gym.envs.evict import default_traces

    monkeypatch.setenv("KVP_GYM_CACHE", str(tmp_path))
    paths = default_traces("tiny-random")
    assert [p.name for p in paths] == ["niah_single.h5", "essay.h5"]
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert default_traces("tiny-random") == paths and [p.stat().st_mtime_ns for p in paths] == stamps
    with open_traces(paths[1]) as trace:
        assert len(trace.samples) == 8 and {s.task for s in trace.samples.values()} == {"essay"}


@pytest.mark.parametrize("make", [gym.make, lambda *a, **k: gym.make_vec(*a, num_envs=2, **k)])
@pytest.mark.parametrize("env_id", ["KVEvict-v0", "KVEvictDecode-v0"])
def test_settings_as_keyword_arguments_say_where_they_go(make, env_id):
    """gym.make("KVEvict-v0", traces=...) names the config= form instead of Gymnasium's bare TypeError."""
    with pytest.raises(
        TypeError, match=r"takes its settings in one dict: gym.make\(\.\.\., config=\{'traces': \.\.\.\}"
    ):
        make(env_id, traces=["x.h5"])


@pytest.mark.parametrize(
    ("protection", "protocol"),
    [({}, "raw"), ({"sinks": 4, "recent": 16}, "paper"), ({"sinks": 4}, "custom:sinks=4;recent=0")],
)
def test_reset_info_names_the_protocol_its_scores_belong_to(config, protection, protocol):
    """The env's protected tokens decide which evaluation protocol its holistic score is: reset says which, in the
    single env and in both vector forms (the names kvp-gym evaluate records)."""
    from kvp_gym.evaluation import PROTOCOLS, evaluate

    config = {**config, **protection}
    _, info = gym.make("KVEvict-v0", config=config).reset(seed=0)
    assert info["protocol"] == protocol
    for mode in ("vector_entry_point", "sync"):
        _, infos = gym.make_vec("KVEvict-v0", num_envs=2, config=config, vectorization_mode=mode).reset(seed=0)
        assert list(infos["protocol"]) == [protocol, protocol] and infos["_protocol"].all()
    if protocol in PROTOCOLS:  # the same name as the evaluation record of the same protection
        record = evaluate(config["traces"], ["knorm"], split="val", protocol=protocol, bootstrap=5, progress=False)
        assert record["protocol"]["name"] == protocol
        assert (record["protocol"]["sinks"], record["protocol"]["recent"]) == (
            protection.get("sinks", 0),
            protection.get("recent", 0),
        )


def test_the_readme_snippet_runs_and_the_env_reports_the_tables_number(tiny_trace, capsys):
    """README's "Bring your own algorithm" block, as written but on the tiny trace file: every name it uses is
    defined, its env names the table's protocol, and the env's mean holistic score over the table's episodes is
    the table's."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Bring your own algorithm") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert re.search(r"^paths = \[.*\]$", code, re.M), "the snippet's paths line moved"
    code = re.sub(r"^paths = \[.*\]$", f"paths = [{str(tiny_trace)!r}]", code, flags=re.M)
    namespace: dict = {}
    exec(compile(code, "README.md (Bring your own algorithm)", "exec"), namespace)
    record, env = namespace["record"], namespace["env"]
    assert record["protocol"]["name"] == "paper"
    assert env.reset(seed=0)[1]["protocol"] == "paper"
    mine = record["policies"]["mine"]["holistic_score"]["mean"]
    assert np.mean(namespace["scores"]) == pytest.approx(mine, abs=1e-6)
    assert len(namespace["scores"]) == np.asarray(record["policies"]["mine"]["per_sample_head"]).size
    out = capsys.readouterr().out
    assert "streaming_llm" in out and f"in the env: {mine:.3f}, in the table: {mine:.3f}" in out
