"""The importance store: computed once, read back bit for bit, stale and damaged entries rebuilt, and reused by
KVEvict-v0 and ``kvp-gym evaluate`` with the same results as without it."""

from __future__ import annotations

import json
import os

import gymnasium as gym
import numpy as np
import pytest
import torch

import kvp_gym  # noqa: F401
from kvp_gym.envs.episodes import EpisodeKey
from kvp_gym.evaluation import evaluate
from kvp_gym.importance import ENTRY_MAGIC, ImportanceStore, ImportanceWarning, content_id
from kvp_gym.traces import ModelGeometry, SampleInfo, TraceHeader, open_traces, write_traces
from kvp_gym.utility import future_importance

GEOMETRY = ModelGeometry(2, 4, 2, 8, (0, 0, 1, 1), "{}", 0, 100)


def write(path, seed: int, samples: int = 3, tokens: int = 40, prompt: int = 30):
    """A small sealed trace file of random tensors (2 layers, 2 KV heads of 2 query heads, head_dim 8)."""
    rng = np.random.default_rng(seed)
    header = TraceHeader("tiny-synthetic", GEOMETRY, (0, 1), ({},), "test")

    def generate():
        for i in range(samples):
            info = SampleInfo(f"s{i}", i, "t", "test", prompt, np.full(tokens, i, np.int32))
            yield info, {layer: [rng.standard_normal((h, tokens, 8)) for h in (4, 2, 2)] for layer in (0, 1)}

    write_traces(path, header, generate())
    return path


@pytest.fixture
def root(tmp_path, monkeypatch):
    folder = tmp_path / "importance"
    monkeypatch.setenv("KVP_GYM_IMPORTANCE", str(folder))
    return folder


def test_stored_importance_is_the_computed_importance(tmp_path, root):
    path = write(tmp_path / "a.h5", 0)
    with open_traces(path) as trace:
        store = ImportanceStore(trace)
        assert store.folder == root / content_id(trace) and content_id(trace) == trace.content_id
        first = store.layer("s1", 1, 30)
        entry = store.entry_path("s1", 1, 30)
        assert entry.exists() and first.shape == (2, 30) and first.dtype == torch.float32
        for h in range(2):  # each head's importance as the utility computes it
            head = trace.head("s1", 1, h)
            torch.testing.assert_close(first[h], future_importance(head.queries, head.keys, 30))
        assert torch.equal(ImportanceStore(trace).layer("s1", 1, 30), first)  # read back, bit for bit
        assert torch.equal(ImportanceStore(trace, sidecar=False).layer("s1", 1, 30), first)  # computed again
        assert ImportanceStore(trace, sidecar=False).entry_path("s1", 1, 30) is None
        # Resumable: what exists is kept, what is missing is computed.
        assert store.ensure("s1", 1, [30, 12, 30]) == 1 and store.ensure("s1", 1, [12, 30]) == 0
        assert torch.equal(store.layer("s1", 1, 12), ImportanceStore(trace, sidecar=False).layer("s1", 1, 12))
        with pytest.raises(ValueError, match="split point 41 outside"):
            store.layer("s1", 1, 41)
    manifest = json.loads((store.folder / "trace.json").read_text())
    assert manifest["paths"] == [str(path.resolve())] and manifest["model"] == "tiny-synthetic"


@pytest.mark.parametrize(
    "damage, field",
    [
        (lambda raw: raw[:-4], "data"),  # truncated
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "sha256"),  # one flipped bit in a value
        (lambda raw: b"nonsense" + raw, "header"),
        (lambda raw: raw.replace(b'"layer": 0', b'"layer": 1'), "layer"),  # another layer's entry
    ],
)
def test_a_damaged_entry_is_recomputed(tmp_path, root, damage, field):
    with open_traces(write(tmp_path / "a.h5", 0)) as trace:
        store = ImportanceStore(trace)
        good = store.layer("s0", 0, 30)
        entry = store.entry_path("s0", 0, 30)
        entry.write_bytes(damage(entry.read_bytes()))
        with pytest.warns(ImportanceWarning, match=rf"{entry.name}: {field}: .*recomputing it"):
            assert torch.equal(store.layer("s0", 0, 30), good)
        assert entry.read_bytes().startswith(ENTRY_MAGIC)
        assert torch.equal(store.layer("s0", 0, 30), good)  # rewritten: read back without a warning


def test_a_rewritten_trace_gets_a_fresh_store_and_the_stale_one_goes(tmp_path, root):
    path = write(tmp_path / "a.h5", 0)
    with open_traces(path) as trace:
        old = ImportanceStore(trace)
        old_values = old.layer("s0", 0, 30)
    write(path, 1)  # new content at the same path
    with open_traces(path) as trace:
        new = ImportanceStore(trace)
        assert new.folder != old.folder and not old.folder.exists()
        assert not torch.equal(new.layer("s0", 0, 30), old_values)
    # A folder another path still uses (a copy) loses only the changed path.
    copy = tmp_path / "b.h5"
    os.link(path, copy)
    with open_traces(copy) as trace:
        shared = ImportanceStore(trace).folder
    write(path, 2)
    with open_traces(path) as trace:
        ImportanceStore(trace)
    assert json.loads((shared / "trace.json").read_text())["paths"] == [str(copy.resolve())]


def test_env_and_evaluate_reuse_the_store(tmp_path, root, monkeypatch):
    path = write(tmp_path / "a.h5", 0)
    record = evaluate(path, ["random", "tova"], split="test", bootstrap=10, progress=False)
    env = gym.make("KVEvict-v0", config={"traces": str(path), "split": "test"}).unwrapped
    key = EpisodeKey(trace=0, sample="s2", layer=1, head=1, split=30)
    with open_traces(path) as trace:
        store = ImportanceStore(trace)
        assert all(store.entry_path(f"s{i}", layer, 30).exists() for i in range(3) for layer in (0, 1))
        torch.testing.assert_close(env.episodes.load(key).importance, store.layer("s2", 1, 30)[1])
        # The same results without the store.
        monkeypatch.setenv("KVP_GYM_IMPORTANCE", "off")
        again = evaluate(path, ["random", "tova"], split="test", bootstrap=10, progress=False)
        for label, policy in record["policies"].items():
            assert again["policies"][label]["per_sample_head"] == policy["per_sample_head"]
        off = gym.make("KVEvict-v0", config={"traces": str(path), "split": "test"}).unwrapped
        assert torch.equal(off.episodes.load(key).importance, env.episodes.load(key).importance)
        # Reused, not recomputed: a (valid) entry with other values is what both read. Equal importance makes
        # every ranking optimal: random then scores exactly 1 on that head.
        monkeypatch.setenv("KVP_GYM_IMPORTANCE", str(root))
        planted = store.layer("s2", 1, 30)
        planted[1] = 1.0
        store._write(store.entry_path("s2", 1, 30), "s2", 1, 30, planted)
        fresh = gym.make("KVEvict-v0", config={"traces": str(path), "split": "test"}).unwrapped
        assert torch.equal(fresh.episodes.load(key).importance, torch.ones(30))
        scores = evaluate(path, ["random"], split="test", bootstrap=10, progress=False, protocol="raw")
        head0, head1 = scores["policies"]["random"]["per_sample_head"][2][1]
        assert head1 == 1.0 and head0 < 1.0
