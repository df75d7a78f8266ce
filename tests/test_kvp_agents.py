"""KVP agents: grouped network, Plackett-Luce, checkpoints and the kvp scorer, the RLOO trainer end to end."""

from __future__ import annotations

import dataclasses
import itertools
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import kvp_gym  # noqa: F401
from kvp_gym.attention import Rotary
from kvp_gym.envs.episodes import EpisodeKey
from kvp_gym.evaluation import evaluate
from kvp_gym.importance import ImportanceStore
from kvp_gym.scorers import HeadView, ScorerError, get_scorer, score
from kvp_gym.traces import open_traces
from kvp_gym.utility import holistic_reward
from kvp_gym_agents.checkpoint import SHIPPED, read_checkpoint, save_checkpoint
from kvp_gym_agents.config import TrainConfig
from kvp_gym_agents.data import Episodes, StreamingPool, model_inputs
from kvp_gym_agents.kvp import KVPNetwork, age_bucket, gumbel_ranking, plackett_luce_log_prob
from kvp_gym_agents.train import train


def small_network(seed: int = 0) -> KVPNetwork:
    torch.manual_seed(seed)
    network = KVPNetwork(heads=3, head_dim=8, width=16, position_dim=4, buckets=8, max_age=64)
    with torch.no_grad():  # move the affines off their identity initialisation so that folding them is tested
        for name, p in network.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return network


def reference_scores(network: KVPNetwork, h: int, keys, values, positions, ages) -> torch.Tensor:
    """Head h's scores computed literally from the architecture (no folding, no tables): keys [n, D] -> [n]."""
    p = dict(network.named_parameters())

    def linear(name, x):
        return x @ p[f"{name}.weight"][h] + p[f"{name}.bias"][h]

    def norm(name, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], p[f"{name}.weight"][h], p[f"{name}.bias"][h])

    def embed(table, row):
        return p[table][h][row]

    x = torch.cat(
        [
            norm("key_norm", linear("key", keys)),
            norm("value_norm", linear("value", values)),
            norm("index_norm", embed("index_table", positions.clamp(max=network.buckets - 1))),
            norm("age_norm", embed("age_table", age_bucket(ages, network.buckets, network.max_age))),
        ],
        -1,
    )
    x = torch.nn.functional.silu(norm("norm1", linear("hidden1", x)))
    x = torch.nn.functional.silu(norm("norm2", linear("hidden2", x)))
    return linear("out", x)[:, 0]


def test_network_computes_the_architecture_per_head():
    network = small_network()
    keys, values = torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    positions = torch.arange(10).expand(3, 2, 10) * 5  # reaches the log-spaced and the clamped buckets
    ages = positions.flip(-1)
    together = network(keys, values, positions, ages)
    for h in range(3):
        for b in range(2):
            expected = reference_scores(network, h, keys[h, b], values[h, b], positions[h, b], ages[h, b])
            torch.testing.assert_close(together[h, b], expected, rtol=1e-4, atol=1e-5)
    alone = network(keys[[1]], values[[1]], positions[[1]], ages[[1]], select=torch.tensor([1]))
    torch.testing.assert_close(together[1], alone[0])
    # Shared positions broadcast over the batch.
    torch.testing.assert_close(network(keys, values, positions[:, :1], ages), together)
    # A head's scores do not depend on the other heads' inputs, nor on the other tokens.
    keys2 = keys.clone()
    keys2[0] += 1
    keys2[1, :, 5:] += 1
    changed = network(keys2, values, positions, ages)
    torch.testing.assert_close(changed[1, :, :5], together[1, :, :5])
    torch.testing.assert_close(changed[2], together[2])


def test_age_buckets():
    positions = torch.tensor([0, 1, 31, 32, 33, 100, 1000, 8191, 8192, 10**6])
    rows = age_bucket(positions, buckets=64, max_age=8192)
    assert rows[:3].tolist() == [0, 1, 31] and rows[3].item() == 32  # exact below 32
    assert (rows.diff() >= 0).all() and rows.max().item() == 63 and rows[-3:].tolist() == [63, 63, 63]
    # 1000: 32 + floor(ln(1000 / 32) / ln(8192 / 32) * 32) = 32 + floor(19.87) = 51.
    assert rows[-4].item() == 51


def test_plackett_luce_is_a_distribution_sampled_by_gumbel_sort():
    scores = torch.tensor([1.5, 0.0, -1.0])
    valid = torch.ones(3, dtype=torch.bool)
    rankings = [torch.tensor(p) for p in itertools.permutations(range(3))]
    probs = torch.stack([plackett_luce_log_prob(scores, r, valid).exp() for r in rankings])
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    expected = math.exp(1.5) / sum(map(math.exp, [1.5, 0, -1])) * 1 / (1 + math.exp(-1))
    assert probs[0].item() == pytest.approx(expected, rel=1e-5)
    draws = gumbel_ranking(scores.expand(20000, 3), valid.expand(20000, 3), torch.Generator().manual_seed(0))
    frequency = torch.stack([(draws == r).all(-1).float().mean() for r in rankings])
    torch.testing.assert_close(frequency, probs, atol=0.015, rtol=0)
    padded = plackett_luce_log_prob(
        torch.tensor([1.5, 0.0, 9.0]), torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0]).bool()
    )
    assert padded.item() == pytest.approx(plackett_luce_log_prob(scores[:2], torch.tensor([0, 1]), valid[:2]).item())


@pytest.fixture(scope="module")
def trained(tiny_trace, tmp_path_factory):
    out = tmp_path_factory.mktemp("kvp")
    config = TrainConfig(
        traces=[str(tiny_trace)],
        out=str(out),
        heads="all",
        steps=6,
        batch=8,
        width=16,
        position_dim=4,
        lr=1e-3,
        warmup=2,
        eval_every=3,
        random_splits=2,
    )
    return config, train(config, progress=False)


def test_trainer_writes_a_checkpoint_and_resumes(trained):
    config, summary = trained
    assert summary["heads"] == 4 and summary["best_step"] in (3, 6)
    network, metadata = read_checkpoint(summary["checkpoint"])
    assert metadata["heads"] == [[0, 0], [0, 1], [1, 0], [1, 1]] and metadata["model"] == "tiny-random"
    assert len(metadata["validation"]["per_head"]) == 4 and metadata["training"]["steps"] == 6
    with open_traces(config.traces[0]) as trace:  # max_age 0 = the longest cache trained on
        assert network.max_age == max(s.prompt_length for s in trace.split("train"))
    state = torch.load(f"{config.out}/last.pt", weights_only=False)
    assert state["step"] == 6
    resumed = train(TrainConfig(**{**config.__dict__, "steps": 9}), progress=False)  # continues from step 6
    assert torch.load(f"{config.out}/last.pt", weights_only=False)["step"] == 9 and resumed["steps"] == 9
    finished = train(TrainConfig(**{**config.__dict__, "steps": 9}), progress=False)  # nothing left to do
    assert finished["steps_per_second"] is None and finished["best_step"] == resumed["best_step"]


def test_kvp_scorer_from_a_checkpoint(trained, tiny_trace, tmp_path):
    _, summary = trained
    scorer = get_scorer("kvp", checkpoint=summary["checkpoint"])
    keys = torch.randn(2, 30, 16)
    view = HeadView(
        keys,
        keys,
        torch.arange(30).expand(2, 30),
        torch.ones(2, 30, dtype=torch.bool),
        layer=torch.tensor([1, 0]),
        kv_head=torch.tensor([1, 0]),
    )
    network, _ = read_checkpoint(summary["checkpoint"])
    positions = torch.arange(30).expand(2, 1, 30)
    expected = network(keys[:, None], keys[:, None], positions, 29 - positions, torch.tensor([3, 0]))
    torch.testing.assert_close(score(scorer, view), expected[:, 0])
    with pytest.raises(ScorerError, match=r"has no agent for \(layer, kv_head\) \(5, 0\)"):
        score(
            scorer,
            HeadView(
                keys[:1],
                keys[:1],
                view.positions[:1],
                view.mask[:1],
                layer=torch.tensor([5]),
                kv_head=torch.tensor([0]),
            ),
        )
    with pytest.raises(ScorerError, match="trained for tiny-random .* but is used with smollm2-135m"):
        scorer.check_geometry("smollm2-135m", head_dim=64, num_layers=30, num_kv_heads=3)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    with pytest.raises(ScorerError, match="bad.safetensors: not a readable safetensors checkpoint"):
        get_scorer("kvp", checkpoint=str(bad))
    save_checkpoint(tmp_path / "ok.safetensors", network, [(1, 1), (1, 0), (0, 1), (0, 0)], {"model": "tiny-random"})
    assert read_checkpoint(tmp_path / "ok.safetensors")[1]["heads"] == [[1, 1], [1, 0], [0, 1], [0, 0]]
    # A checkpoint rewritten in place (retrained agents) is read again, not served from the cache of the old one.
    before = score(get_scorer("kvp", checkpoint=str(tmp_path / "ok.safetensors")), view)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(1.0)
    save_checkpoint(tmp_path / "ok.safetensors", network, [(1, 1), (1, 0), (0, 1), (0, 0)], {"model": "tiny-random"})
    after = score(get_scorer("kvp", checkpoint=str(tmp_path / "ok.safetensors")), view)
    assert not torch.allclose(before, after)
    with pytest.raises(ScorerError, match="missing.safetensors: not a readable safetensors checkpoint"):
        get_scorer("kvp", checkpoint=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="2 head ids for a network of 4 heads"):
        save_checkpoint(tmp_path / "no.safetensors", network, [(0, 0), (1, 1)], {})


def streaming_pool(path, heads, split="train", random_splits=0, min_prompt=16, sidecar=True) -> StreamingPool:
    files = [open_traces(path)]
    episodes = Episodes(files, split, random_splits, min_prompt, np.random.default_rng(0))
    return StreamingPool(files, [ImportanceStore(files[0], sidecar=sidecar)], episodes, heads)


def test_trainer_rewards_equal_the_environments(tiny_trace):
    pool = streaming_pool(tiny_trace, [(1, 0)])
    env = gym.make("KVEvict-v0", config={"traces": str(tiny_trace)}).unwrapped
    names = [s.name for s in env.episodes.traces[0].split("train")]
    batch = pool.batch(torch.arange(len(names))[None], torch.tensor([0]))
    keys, values, positions, ages, valid, importance = model_inputs(batch, torch.device("cpu"))
    rng = np.random.default_rng(1)
    for e, name in enumerate(names):
        n = int(valid[0, e].sum())
        episode = env.episodes.load(EpisodeKey(trace=0, sample=name, layer=1, head=0, split=n))
        torch.testing.assert_close(importance[0, e, :n], episode.importance)
        torch.testing.assert_close(keys[0, e, :n], episode.keys)
        env._episode = episode
        action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
        _, env_reward, _, _, _ = env.step(action)
        scores = torch.from_numpy(action[: importance.shape[-1]]).masked_fill(~valid[0, e], float("-inf"))
        assert holistic_reward(importance[0, e], scores).item() == pytest.approx(env_reward, rel=1e-6)


def test_length_groups_partition_the_episodes(tiny_trace):
    pool = streaming_pool(tiny_trace, [(0, 0)], min_prompt=4)
    pool.episodes.split = torch.tensor([5, 8, 9, 16, 17, 100, 128, 129])  # split points of every octave boundary case
    pool.episodes.sample = torch.zeros(8, dtype=torch.long)
    groups = [g.tolist() for g in pool.episodes.length_groups()]
    assert groups == [[0, 1], [2, 3], [4], [5, 6], [7]]  # (4, 8], (8, 16], (16, 32], (64, 128], (128, 256]


def test_kvp_in_evaluate(trained, tiny_trace):
    _, summary = trained
    label = f"kvp:checkpoint={summary['checkpoint']}"  # a policy's label is its spec
    record = evaluate(tiny_trace, [label, "random"], split="val", bootstrap=50, progress=False)
    assert 0 < record["policies"][label]["holistic_score"]["mean"] <= 1 and record["policies"][label]["name"] == "kvp"
    # The shipped agents are for smollm2-135m: on another model they are an error, or skipped under "all".
    with pytest.raises(ScorerError, match="trained for smollm2-135m .* but is used with tiny-random"):
        evaluate(tiny_trace, ["kvp"], split="val", bootstrap=10, progress=False)
    record = evaluate(tiny_trace, "all", split="val", bootstrap=10, progress=False)
    assert "kvp" not in record["policies"] and "used with tiny-random" in record["skipped"]["kvp"]


def test_shipped_agents_cover_smollm2():
    path = SHIPPED["smollm2-135m"]
    assert path.stat().st_size < 5 * 2**20  # a few MB in the repository
    network, metadata = read_checkpoint(path)
    assert metadata["model"] == "smollm2-135m" and metadata["network"]["heads"] == 90
    assert sorted(map(tuple, metadata["heads"])) == [(layer, h) for layer in range(30) for h in range(3)]
    assert metadata["geometry"] == {"head_dim": 64, "num_layers": 30, "num_kv_heads": 3}
    get_scorer("kvp").check_geometry("smollm2-135m", 64, 30, 3)  # the default: no error
    # The shipped ones: recipe 2 at 1,800 steps; v2, kept, is the same recipe at 600 steps (docs/agents.md).
    older, older_metadata = read_checkpoint(path.with_name("smollm2-135m-v2.safetensors"))
    assert metadata["training"]["steps"] == 1800 and older_metadata["training"]["steps"] == 600
    assert older_metadata["heads"] == metadata["heads"] and not torch.equal(
        older.state_dict()["key.weight"], network.state_dict()["key.weight"]
    )


def test_shipped_agents_for_gemma3_cover_its_global_layers():
    """kvp:model=gemma3-270m: one agent per full-attention layer (the only ones the evicting cache scores); the
    default kvp (SmolLM2's) used on Gemma says which spec to use instead."""
    gemma = get_scorer("kvp", model="gemma3-270m")
    assert gemma.path == str(SHIPPED["gemma3-270m"]) and SHIPPED["gemma3-270m"].stat().st_size < 2**20
    metadata = gemma.metadata
    assert metadata["model"] == "gemma3-270m" and sorted(map(tuple, metadata["heads"])) == [(5, 0), (11, 0), (17, 0)]
    assert metadata["geometry"] == {"head_dim": 256, "num_layers": 18, "num_kv_heads": 1}
    gemma.check_geometry("gemma3-270m", 256, 18, 1)
    with pytest.raises(ScorerError, match=r"differs in .*\(its shipped agents: kvp:model=gemma3-270m\)"):
        get_scorer("kvp").check_geometry("gemma3-270m", 256, 18, 1)
    with pytest.raises(ScorerError, match="kvp ships agents for smollm2-135m, gemma3-270m, not 'nope'"):
        get_scorer("kvp", model="nope")
    torch.manual_seed(0)
    keys = torch.randn(3, 40, 256)
    view = HeadView(keys, torch.randn(3, 40, 256), torch.arange(40).expand(3, 40), torch.ones(3, 40, dtype=torch.bool),
                    layer=torch.tensor([5, 11, 17]), kv_head=torch.zeros(3, dtype=torch.long))  # fmt: skip
    # The shipped ones read pre-RoPE keys (docs/agents.md): they need the layer's RoPE, which a view without one lacks.
    assert metadata["network"]["key_frame"] == "pre" and metadata["network"]["ages"] == "relative"
    with pytest.raises(ScorerError, match="RoPE"):
        score(gemma, view)
    scores = score(gemma, dataclasses.replace(view, rotary=Rotary.default(256, 1e6)))
    assert scores.shape == (3, 40) and torch.isfinite(scores).all() and not torch.equal(scores[0], scores[1])
    older = get_scorer("kvp", checkpoint=str(SHIPPED["gemma3-270m"].with_name("gemma3-270m-v1.safetensors")))
    assert older.metadata["network"].get("key_frame", "post") == "post" and torch.isfinite(score(older, view)).all()
    # v2: the same inputs, trained without the word-valued needle tasks (the shipped ones' training mix adds them).
    v2 = get_scorer("kvp", checkpoint=str(SHIPPED["gemma3-270m"].with_name("gemma3-270m-v2.safetensors")))
    assert v2.metadata["network"]["key_frame"] == "pre" and v2.metadata["network"]["ages"] == "relative"
    rotated = dataclasses.replace(view, rotary=Rotary.default(256, 1e6))
    assert not torch.allclose(score(v2, rotated), scores)


def test_distributed_training_with_two_processes(tiny_trace, tmp_path):
    """torchrun, 2 local processes, gloo: the replicas stay identical and process 0 writes the checkpoint."""
    import json
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "kvp_gym.cli",
        "train",
        "--traces",
        str(tiny_trace),
        "--heads",
        "all",
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch",
        "4",
        "--width",
        "8",
        "--position-dim",
        "4",
        "--eval-every",
        "2",
        "--random-splits",
        "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True
    assert (out / "agents.safetensors").exists() and result.stdout.count('"world_size"') == 1


@pytest.mark.slow
def test_shipped_agents_rank_a_fresh_smollm2_trace(smollm2, tmp_path):
    """End to end on a new SmolLM2 sample (held-out text): the shipped agents beat recency and random."""
    from kvp_gym.collect import CollectConfig, collect

    path = tmp_path / "essay.h5"
    config = CollectConfig(
        model="smollm2-135m", task="essay", samples=1, context=384, future=32, seed=7, splits=(0, 0, 1), text="heldout"
    )
    collect(config, path, progress=False)
    record = evaluate(path, ["kvp", "streaming_llm", "random"], split="test", bootstrap=10, progress=False)
    score = {name: p["holistic_score"]["mean"] for name, p in record["policies"].items()}
    assert score["kvp"] > score["streaming_llm"] > score["random"]
