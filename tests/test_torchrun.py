"""The long commands under torchrun (2 CPU processes, gloo): the processes split the work, process 0 assembles, and
the result is the one a single process writes (collect, evaluate, evaluate-e2e, leaderboard prepare, submit);
--shard composes with the processes' split."""

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

from kvp_gym.cli import main
from kvp_gym.collect import CollectConfig, collect
from kvp_gym.distributed_run import Processes, join
from kvp_gym.evaluation.end_to_end import E2EConfig, run
from kvp_gym.evaluation.trace_level import evaluate
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


def torchrun(*arguments: str, importance: str | None = None, stderr: bool = False) -> str:
    """Run ``kvp-gym ARGUMENTS`` as 2 processes under torchrun; return the output of both (failing on an error), with
    their stderr (progress bars) after it if ``stderr``. ``importance``: a folder for the importance store instead of
    the session's (so that the processes compute it)."""
    with socket.socket() as free:  # a port no other test's job is using
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(port)]
    # One thread per process, as the single-process references below run: the test compares the split, not how
    # a thread count rounds a sum.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"KVP_GYM_IMPORTANCE": importance} if importance else {})}
    done = subprocess.run(
        [*command, "-m", "kvp_gym.cli", *arguments], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + (done.stderr if stderr else "")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """(the tiny benchmark's .toml, its trace set), prepared by one process with its manifest written."""
    root = tmp_path_factory.mktemp("one")
    (root / "tiny-v0.toml").write_text(BENCHMARK)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert prepare(load_benchmark(root / "tiny-v0.toml"), root / "set", write_manifest=True, progress=False) == []
    torch.set_num_threads(threads)
    return root / "tiny-v0.toml", root / "set"


def without_times(record: dict, fields: list[tuple[str, ...]]) -> str:
    """The JSON text of ``record`` without ``fields`` (JSON paths; ``*`` = every key), each of which must be there:
    the wall times and the clock, which no two runs share. Text: the order of the keys counts too."""
    record = json.loads(json.dumps(record))
    for path in fields:
        found = [record]
        for key in path[:-1]:
            found = [value for at in found for value in (at.values() if key == "*" else [at[key]])]
        for at in found:
            del at[path[-1]]
    return json.dumps(record, indent=1)


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
        , "--device", "cpu", "--out", str(tmp_path / "two"), stderr=True,
    )  # fmt: skip
    assert "process 1 of 2: its share is done; process 0 writes the result" in output
    assert "evaluate-e2e (process 0's share, 1/2)" in output and "evaluate-e2e:" not in output  # one progress bar
    one, two = (json.loads((tmp_path / folder / "results.json").read_text()) for folder in ("one", "two"))
    assert set(one) == set(two) and one.pop("seconds").keys() == two.pop("seconds").keys()  # timings differ
    assert two == one
    parts = sorted(p.name for p in (tmp_path / "one" / "parts").iterdir())
    assert parts == sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) and len(parts) == 4
    for name in parts:
        mine, theirs = (json.loads((tmp_path / folder / "parts" / name).read_text()) for folder in ("one", "two"))
        assert {k: v for k, v in theirs.items() if k != "seconds"} == {k: v for k, v in mine.items() if k != "seconds"}


def test_leaderboard_prepare_under_torchrun_writes_the_manifest_one_process_writes(tmp_path, tiny_set):
    """The processes deal the files out and fingerprint their own; process 0 writes the manifest of all of them."""
    definition, one_set = tiny_set
    (tmp_path / "tiny-v0.toml").write_text(BENCHMARK)
    output = torchrun("leaderboard", "prepare", str(tmp_path / "tiny-v0.toml"),
                      "--dir", str(tmp_path / "set"), "--write-manifest")  # fmt: skip
    assert output.count("manifest written to") == 1  # the verdict once, from process 0
    assert "process 1 of 2: its share is done; process 0 writes the result" in output
    one = definition.with_name("tiny-v0.manifest.json").read_text()
    two = (tmp_path / "tiny-v0.manifest.json").read_text()
    assert len(json.loads(two)["files"]) == 4 and two == one
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == sorted(p.name for p in one_set.iterdir())


def test_evaluate_under_torchrun_writes_what_one_process_writes(tiny_trace, tmp_path, one_thread, capsys):
    """The processes split the (sample, layer) pairs (12: 6 samples x 2 layers), computing their own importance;
    process 0 gathers every number into the one results.json: a head-wise, a layer-scope (tova), a query-using and
    the privileged policy, with paired comparisons drawn from the gathered scores."""
    arguments = ["evaluate", "--traces", str(tiny_trace), "--policies", "knorm,tova,snapkv,oracle", "--split", "all"]
    arguments += ["--versus", "tova", "--bootstrap", "200"]
    assert main([*arguments, "--out", str(tmp_path / "one")]) == 0
    table = capsys.readouterr().out.split("\n")[0]  # the table's title
    output = torchrun(*arguments, "--out", str(tmp_path / "two"), importance=str(tmp_path / "importance"))
    assert "process 1 of 2: its share is done; process 0 writes the result" in output
    assert output.count(table) == 1 and output.count("s in all;") == 1  # the table and timing once, from process 0
    assert any((tmp_path / "importance").rglob("*.importance"))  # computed by the processes, not read
    one, two = (json.loads((tmp_path / folder / "results.json").read_text()) for folder in ("one", "two"))
    assert two["timing"].keys() == one["timing"].keys()
    times = [("timing",), ("policies", "*", "seconds")]
    assert without_times(two, times) == without_times(one, times)
    assert len(two["policies"]) == 4 and np.array(two["policies"]["tova"]["per_sample_head"]).shape == (6, 2, 2)


class SecondOfTwo(Processes):
    """Process 1 of 2 without a process group: what it would send process 0 is kept in ``SENT``."""

    def gather(self, value):
        SENT.append(value)
        return [value, value]


SENT: list = []


def test_each_process_scores_only_its_share_of_the_pairs(tiny_trace):
    """Process 1 of 2 scores the pairs 1, 3, 5, ... of the 12 (sample, layer) pairs, sample-major: 6 cells, each with
    the numbers one process gives it; it returns nothing, process 0 writes."""
    SENT.clear()
    one = evaluate(tiny_trace, ["knorm"], split="all", bootstrap=10, progress=False)
    assert (
        evaluate(tiny_trace, ["knorm"], split="all", bootstrap=10, progress=False, processes=SecondOfTwo(1, 2)) is None
    )
    (part,) = SENT
    cells = [(sample, layer) for sample in range(6) for layer in range(2)][1::2]
    expected = [np.array(one["policies"]["knorm"]["per_sample_head"])[cell] for cell in cells]  # [H] each
    assert part.scores["knorm"].shape == (6, 2)
    assert np.allclose(part.scores["knorm"], expected, atol=1e-6)  # the record keeps 6 decimals


def test_submit_under_torchrun_writes_the_entries_one_process_writes(tiny_set, tmp_path, one_thread, capsys):
    """Both evaluations of a submission split between the processes; process 0 writes the entries, the same as one
    process's but for the clock (``created``) and the trace level's scoring time (``results.trace_level.seconds``)."""
    definition, traces = tiny_set
    arguments = ["submit", "--benchmark", str(definition), "--traces", str(traces), "--device", "cpu"]
    arguments += ["--policy", "tova", "--policy", "knorm"]
    assert main([*arguments, "--work", str(tmp_path / "w1"), "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    output = torchrun(*arguments, "--work", str(tmp_path / "w2"), "--out", str(tmp_path / "two"))
    assert "process 1 of 2: its share is done; process 0 writes the result" in output
    assert output.count("wrote ") == 2  # each entry once, from process 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) == ["knorm.json", "tova.json"]
    for name in names:
        one, two = (json.loads((tmp_path / folder / name).read_text()) for folder in ("one", "two"))
        times = [("created",), ("results", "trace_level", "seconds")]
        assert two["results"]["end_to_end"] is not None and without_times(two, times) == without_times(one, times)


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
