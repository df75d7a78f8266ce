"""The long commands under torchrun (2 CPU processes, gloo): the processes split the work, process 0 assembles, and
the result is the one a single process writes; --shard composes with the processes' split."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_benchmark import benchmark_toml

from kvp_gym.collect import CollectConfig, collect
from kvp_gym.distributed_run import Processes, join
from kvp_gym.evaluation.end_to_end import E2EConfig, run
from kvp_gym.traces import open_traces
from kvp_gym_leaderboard.benchmark import load_benchmark, prepare

COLLECT = CollectConfig(model="tiny-random", task="niah_single", samples=5, context=600, future=8, seed=4)
E2E = E2EConfig(
    model="tiny-random",
    tasks=("niah_single",),
    context=600,
    budgets=(32, 64),
    policies=("knorm", "tova", "oracle"),
    samples=3,
    essays=1,
    continuation=8,
)
BENCHMARK = benchmark_toml("tiny-v0", "tiny-random, 4 trace files", end_to_end={"budgets": [32], "samples": 1})


def torchrun(*arguments: str) -> str:
    """Run ``kvp-gym ARGUMENTS`` as 2 processes under torchrun; return the output of both (failing on an error)."""
    with socket.socket() as free:  # a port no other test's job is using
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(port)]
    # One thread per process, as the single-process references below run: the test compares the split, not how
    # a thread count rounds a sum.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "-m", "kvp_gym.cli", *arguments], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_collect_under_torchrun_writes_what_one_process_writes(tmp_path, one_thread):
    collect(COLLECT, tmp_path / "one.h5", progress=False)
    output = torchrun(
        "collect", "--model", "tiny-random", "--task", "niah_single", "--samples", "5", "--context", "600"
        , "--future", "8", "--seed", "4", "--out", str(tmp_path / "two.h5"),
    )  # fmt: skip
    assert "process 1 of 2: its share is done; process 0 writes the result" in output
    assert f"{tmp_path / 'two.h5'}: 5 samples (5 collected now)" in output  # counts both processes' samples
    assert not (tmp_path / "two.h5.parts").exists()
    with open_traces(tmp_path / "one.h5") as one, open_traces(tmp_path / "two.h5") as two:
        assert two.header == one.header
        assert list(two.samples) == list(one.samples)  # every sample once, in the same order
        for name, info in one.samples.items():
            other = two.samples[name]
            assert (other.index, other.split, other.prompt_length, other.answers, other.metadata) == (
                info.index, info.split, info.prompt_length, info.answers, info.metadata
            )  # fmt: skip
            assert np.array_equal(other.tokens, info.tokens)
            assert np.array_equal(other.needle_spans, info.needle_spans)
            mine, theirs = one.tensors(name), two.tensors(name)
            for layer in one.header.layers:
                for a, b in zip(mine[layer], theirs[layer], strict=True):
                    assert a.dtype == b.dtype and np.array_equal(a, b)


def test_evaluate_e2e_under_torchrun_writes_what_one_process_writes(tmp_path, one_thread):
    run(E2E, tmp_path / "one", device="cpu", progress=False)
    output = torchrun(
        "evaluate-e2e", "--model", "tiny-random", "--tasks", "niah_single", "--context", "600", "--budgets", "32,64"
        , "--policies", "knorm,tova,oracle", "--samples", "3", "--essays", "1", "--continuation", "8"
        , "--device", "cpu", "--out", str(tmp_path / "two"),
    )  # fmt: skip
    assert "process 1 of 2: its share is done; process 0 writes the result" in output
    one, two = (json.loads((tmp_path / folder / "results.json").read_text()) for folder in ("one", "two"))
    assert set(one) == set(two) and one.pop("seconds").keys() == two.pop("seconds").keys()  # timings differ
    assert two == one
    parts = sorted(p.name for p in (tmp_path / "one" / "parts").iterdir())
    assert parts == sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) and len(parts) == 4
    for name in parts:
        mine, theirs = (json.loads((tmp_path / folder / "parts" / name).read_text()) for folder in ("one", "two"))
        assert {k: v for k, v in theirs.items() if k != "seconds"} == {k: v for k, v in mine.items() if k != "seconds"}


def test_leaderboard_prepare_under_torchrun_writes_the_manifest_one_process_writes(tmp_path, one_thread):
    """The processes deal the files out and fingerprint their own; process 0 writes the manifest of all of them."""
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "tiny-v0.toml").write_text(BENCHMARK)
    prepare(load_benchmark(tmp_path / "one" / "tiny-v0.toml"), tmp_path / "one" / "set", write_manifest=True)
    output = torchrun("leaderboard", "prepare", str(tmp_path / "two" / "tiny-v0.toml"),
                      "--dir", str(tmp_path / "two" / "set"), "--write-manifest")  # fmt: skip
    assert output.count("manifest written to") == 1  # the verdict once, from process 0
    assert "process 1 of 2: its share is done; process 0 writes the result" in output
    one, two = ((tmp_path / folder / "tiny-v0.manifest.json").read_text() for folder in ("one", "two"))
    assert len(json.loads(two)["files"]) == 4 and two == one
    assert sorted(p.name for p in (tmp_path / "two" / "set").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "set").iterdir()
    )


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_the_processes_of_a_shard_split_it_exactly(shards, world):
    items = range(23)
    for index in range(shards):
        shard_items = list(items[index::shards])
        taken = []
        for rank in range(world):
            own_index, own_count = Processes(rank, world).share((index, shards))
            taken += items[own_index::own_count]
        assert sorted(taken) == shard_items  # each of the shard's items once, none of another shard's


def test_without_torchrun_one_process_runs_alone(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    processes = join()
    assert (processes.rank, processes.world, processes.writes_result) == (0, 1, True)
    assert processes.share((1, 3)) == (1, 3) and processes.gather("x") == ["x"]
    processes.wait_for_all()  # no process group: returns at once
    assert not torch.distributed.is_initialized()
