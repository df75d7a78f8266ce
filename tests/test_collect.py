"""The collector: what it stores is what the model computed; it is deterministic, resumable and shardable."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from kvp_gym import models
from kvp_gym.collect import CollectConfig, collect
from kvp_gym.traces import SPLITS, TraceFormatError, merge_traces, open_traces


def content(path) -> dict:
    """Every attribute and dataset of an HDF5 file, for equality checks."""
    found = {}
    with h5py.File(path) as h5:
        found["/"] = {k: np.asarray(v).tolist() for k, v in h5.attrs.items()}

        def visit(name, node):
            found[name + "@"] = {k: np.asarray(v).tolist() for k, v in node.attrs.items()}
            if isinstance(node, h5py.Dataset):
                found[name] = (node.dtype.str, node.shape, node[()].tobytes())

        h5.visititems(visit)
    return found


def test_stored_tensors_are_the_models_own(tiny_trace):
    model, _ = models.load("tiny-random")  # sdpa, as the collector ran it
    with open_traces(tiny_trace) as trace:
        assert trace.header.model == "tiny-random" and trace.header.layers == (0, 1)
        for info in list(trace.samples.values())[:2]:
            with torch.inference_mode():
                cache = model(torch.tensor([info.tokens.tolist()]), use_cache=True).cache
            for layer in trace.header.layers:
                for kv_head in range(2):
                    head = trace.head(info, layer, kv_head)
                    assert torch.equal(head.keys, cache.layers[layer].keys[0, kv_head].half())
                    assert torch.equal(head.values, cache.layers[layer].values[0, kv_head].half())


def test_samples_carry_task_metadata(tiny_trace, tiny, tiny_config):
    _, tokenizer = tiny
    with open_traces(tiny_trace) as trace:
        samples = list(trace.samples.values())
    assert len(samples) == tiny_config.samples
    assert sorted(s.index for s in samples) == list(range(tiny_config.samples))
    assert {s.split for s in samples} <= set(SPLITS)
    for s in samples:
        assert s.task == "niah_single" and s.future_source == "greedy"
        assert 0.8 * tiny_config.context <= s.prompt_length <= tiny_config.context
        assert 1 <= s.num_tokens - s.prompt_length <= tiny_config.future
        ((start, end),) = s.needle_spans
        needle = tokenizer.decode(s.tokens[start:end].tolist())
        assert needle == f"The special magic number for {s.metadata['keys'][0]} is {s.answers[0]}."


def test_splits_follow_the_fractions():
    config = CollectConfig(model="tiny-random", samples=40, splits=(0.5, 0.25, 0.25), seed=1)
    split = config.split_by_index()
    assert [split.count(s) for s in SPLITS] == [20, 10, 10]
    assert split == config.split_by_index() and split != dataclasses.replace(config, seed=2).split_by_index()


def test_shards_merge_to_the_single_run(tmp_path, tiny_trace, tiny_config):
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"shard{i}.h5")
        summary = collect(tiny_config, shards[-1], shard=(i, 3), progress=False)
        assert summary.samples == 2
    merge_traces(tmp_path / "merged.h5", shards)
    assert content(tmp_path / "merged.h5") == content(tiny_trace)


def test_text_pool_is_part_of_the_identity_only_when_chosen(tiny_config):
    assert "text" not in tiny_config.sample_identity() and "text" not in tiny_config.settings()
    heldout = dataclasses.replace(tiny_config, text="heldout")
    assert heldout.sample_identity()["text"] == "heldout" and heldout.settings()["text"] == "heldout"
    with pytest.raises(ValueError, match="text must be one of all, train, heldout, val, test"):
        dataclasses.replace(tiny_config, text="validation")


def test_refuses_to_clobber_and_to_mix_settings(tmp_path, tiny_config):
    out = tmp_path / "t.h5"
    small = dataclasses.replace(tiny_config, samples=2, layers=(1,))
    collect(small, out, progress=False)
    with pytest.raises(FileExistsError, match="pass --resume"):
        collect(small, out, progress=False)
    with pytest.raises(TraceFormatError, match="cannot resume into this file: collection settings differ"):
        collect(dataclasses.replace(small, future=5), out, resume=True, progress=False)
    summary = collect(dataclasses.replace(small, future=5), out, overwrite=True, progress=False)
    assert summary.collected == 2
    with open_traces(out) as trace:
        assert trace.header.layers == (1,)


def test_resuming_a_complete_file_only_reads_its_header(tmp_path, tiny_config, monkeypatch):
    out = tmp_path / "t.h5"
    small = dataclasses.replace(tiny_config, samples=2, layers=(1,))
    collect(small, out, progress=False)
    before = content(out)
    loads = []
    real_load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    summary = collect(small, out, resume=True, progress=False)
    assert (summary.samples, summary.collected, loads) == (2, 0, []) and content(out) == before
    assert summary.tokens == sum(s.num_tokens for s in open_traces(out).samples.values())
    # Other settings load the model and are refused as before.
    with pytest.raises(TraceFormatError, match="collection settings differ"):
        collect(dataclasses.replace(small, future=5), out, resume=True, progress=False)
    assert len(loads) == 1


def test_resume_after_kill_loses_nothing(tmp_path, tiny_config):
    """SIGKILL a real collection mid-way: the finished samples survive and --resume completes the file."""
    config = dataclasses.replace(tiny_config, samples=16, context=1200, future=32)
    out = tmp_path / "killed.h5"
    parts = tmp_path / "killed.h5.parts"
    command = [
        sys.executable,
        "-m",
        "kvp_gym.cli",
        "collect",
        "--model",
        "tiny-random",
        "--task",
        "niah_single",
        "--samples",
        "16",
        "--context",
        "1200",
        "--future",
        "32",
        "--seed",
        str(config.seed),
        "--out",
        str(out),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.h5"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    survived = len(list(parts.glob("*.h5")))
    assert 3 <= survived < 16 and not out.exists()

    summary = collect(config, out, resume=True, progress=False)
    assert summary.samples == 16 and summary.collected <= 16 - survived
    assert not parts.exists()
    reference = tmp_path / "reference.h5"
    collect(config, reference, progress=False)
    assert content(out) == content(reference)


def test_free_text_uses_the_real_continuation(tmp_path):
    config = CollectConfig(model="tiny-random", task="essay", samples=2, context=300, future=20)
    collect(config, tmp_path / "essay.h5", progress=False)
    with open_traces(tmp_path / "essay.h5") as trace:
        for s in trace.samples.values():
            assert s.future_source == "text" and s.num_tokens - s.prompt_length == 20
            assert s.answers == () and len(s.needle_spans) == 0
