"""The trainer at scale: streaming equals the in-memory pool, chunks of heads add up to the whole step, resuming
continues the same run, head groups over two processes equal separate runs, and CUDA training agrees with the CPU
(the CUDA tests run only where a GPU is present)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvp_gym.importance import ImportanceStore
from kvp_gym.traces import open_traces
from kvp_gym_agents.checkpoint import read_checkpoint
from kvp_gym_agents.config import TrainConfig
from kvp_gym_agents.data import Episodes, MemoryPool, StreamingPool, model_inputs
from kvp_gym_agents.kvp import KVPNetwork
from kvp_gym_agents.train import chunk_loss, train

GPUS = torch.cuda.device_count()
needs_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU (torch sees none)")
needs_two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs (torch sees {GPUS})")


@pytest.fixture(autouse=True)
def importance_folder(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KVP_GYM_IMPORTANCE", str(tmp_path_factory.getbasetemp() / "importance"))


def config(trace, out, **changes) -> TrainConfig:
    settings = dict(
        traces=[str(trace)], out=str(out), steps=4, batch=4, rankings=3, width=16, position_dim=4, lr=3e-3,
        warmup=1, eval_every=2, random_splits=0,
    )  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def weights(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0].state_dict()


def assert_same_weights(a: dict, b: dict, exact: bool = True, **tolerance) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], **tolerance)


def test_streaming_and_in_memory_pools_give_the_same_batches_and_agents(tiny_trace, tmp_path, monkeypatch):
    files = [open_traces(tiny_trace)]
    episodes = Episodes(files, "train", 0, 16, np.random.default_rng(0))
    stores = [ImportanceStore(files[0])]
    heads = [(1, 0), (0, 1), (1, 1)]
    stream, memory = StreamingPool(files, stores, episodes, heads), MemoryPool(files, stores, episodes, heads)
    index = torch.tensor([[0, 3, 3], [2, 1, 0]])
    rows = torch.tensor([2, 0])
    for a, b in zip(stream.batch(index, rows, {}), memory.batch(index, rows), strict=True):
        assert torch.equal(a, b)
    keys, _, _, _, valid, importance = model_inputs(stream.batch(index, rows), torch.device("cpu"))
    sample = episodes.samples[int(episodes.sample[3])][1]
    n = sample.prompt_length
    assert torch.equal(keys[0, 1, :n], files[0].head(sample, 1, 1).keys[:n]) and not keys[0, 1, n:].any()
    assert int(valid[0, 1].sum()) == n and not importance[0, 1, n:].any()
    files[0].close()

    streamed = train(config(tiny_trace, tmp_path / "stream"), progress=False)
    in_memory = train(config(tiny_trace, tmp_path / "memory", in_memory=True), progress=False)
    monkeypatch.setenv("KVP_GYM_IMPORTANCE", "off")  # no store: importance computed in the run
    without = train(config(tiny_trace, tmp_path / "off"), progress=False)
    assert streamed["best_validation_score"] == in_memory["best_validation_score"] == without["best_validation_score"]
    assert_same_weights(weights(streamed["checkpoint"]), weights(in_memory["checkpoint"]))
    assert_same_weights(weights(streamed["checkpoint"]), weights(without["checkpoint"]))


def test_chunks_of_heads_add_up_to_the_whole_step(tiny_trace):
    files = [open_traces(tiny_trace)]
    episodes = Episodes(files, "train", 0, 16, np.random.default_rng(0))
    heads = [(0, 0), (0, 1), (1, 0), (1, 1)]
    pool = StreamingPool(files, [ImportanceStore(files[0])], episodes, heads)
    settings = config(tiny_trace, "unused")
    torch.manual_seed(0)
    network = KVPNetwork(4, 16, 16, 4, 8, 64)
    index = torch.randint(len(episodes), (4, settings.batch), generator=torch.Generator().manual_seed(1))
    noise = torch.rand(4, settings.batch, settings.rankings, int(episodes.split[index].max()))

    def gradients(chunks: list[list[int]]) -> list[torch.Tensor]:
        network.zero_grad()
        total = torch.zeros(4)
        for chunk in chunks:
            rows = torch.tensor(chunk)
            inputs = model_inputs(pool.batch(index[rows], rows), torch.device("cpu"))
            n = inputs[0].shape[2]
            loss, stats = chunk_loss(network, rows, *inputs, noise[rows][..., :n], settings)
            loss.backward()
            total += stats
        return [p.grad.clone() for p in network.parameters()] + [total]

    whole = gradients([[0, 1, 2, 3]])
    for a, b in zip(whole, gradients([[0], [1, 2], [3]]), strict=True):
        # Padding lengths differ, so float32 sums run in another order: gradients whose terms reach ~30 differ by up
        # to ~1e-6 (1.2e-6 seen), also where they cancel to a small result. A lost or doubled chunk shows at >= 1e-2.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    files[0].close()


def test_resuming_continues_the_same_run(tiny_trace, tmp_path):
    # A flat learning rate after warm-up, so that a 4-step run is the first 4 steps of a 6-step one.
    straight = train(config(tiny_trace, tmp_path / "straight", steps=6, min_lr=3e-3), progress=False)
    train(config(tiny_trace, tmp_path / "resumed", steps=4, min_lr=3e-3), progress=False)
    resumed = train(config(tiny_trace, tmp_path / "resumed", steps=6, min_lr=3e-3), progress=False)
    assert resumed["best_validation_score"] == straight["best_validation_score"]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert_same_weights(a["network"], b["network"]) and torch.equal(a["generator"], b["generator"])


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run(
        [*command, "-m", "kvp_gym.cli", "train", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def flags(settings: TrainConfig) -> list[str]:
    """The command line of ``settings`` (the fields that differ from the defaults)."""
    found = ["--traces", *settings.traces, "--heads", settings.heads, "--out", settings.out]
    for name, value in vars(settings).items():
        if name not in ("traces", "heads", "out") and value != getattr(TrainConfig(), name):
            flag = f"--{name.replace('_', '-')}"
            found += [flag] if value is True else [flag, str(value)]
    return found


def test_head_groups_over_two_processes_equal_separate_runs(tiny_trace, tmp_path):
    """torchrun --parallel heads, 2 local processes (gloo): process r trains heads group r on its own; the merged
    checkpoint equals the two groups trained separately, and loads as one scorer."""
    settings = config(tiny_trace, tmp_path / "groups", parallel="heads")
    torchrun(flags(settings))
    summary = json.loads((tmp_path / "groups" / "summary.json").read_text())
    assert summary["parallel"] == "heads" and summary["world_size"] == 2 and summary["heads"] == 4
    merged, metadata = read_checkpoint(summary["checkpoint"])
    assert metadata["heads"] == [[0, 0], [0, 1], [1, 0], [1, 1]] and len(metadata["validation"]["per_head"]) == 4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes: the same arithmetic
    try:
        for group, spec in enumerate(("0:0,0:1", "1:0,1:1")):
            alone = train(config(tiny_trace, tmp_path / f"alone{group}", heads=spec), progress=False)
            network = read_checkpoint(alone["checkpoint"])[0].state_dict()
            rows = slice(2 * group, 2 * group + 2)
            part = {name: t[rows] for name, t in merged.state_dict().items()}
            assert_same_weights(part, network, exact=False, rtol=1e-5, atol=1e-6)
            assert metadata["validation"]["groups"][group]["step"] == alone["best_step"]
    finally:
        torch.set_num_threads(threads)


@needs_gpu
def test_cuda_training_agrees_with_the_cpu(tiny_trace, tmp_path):
    """A few steps on one GPU: the same batches and rankings (drawn on the CPU) give nearly the same agents."""
    cpu = train(config(tiny_trace, tmp_path / "cpu", device="cpu"), progress=False)
    gpu = train(config(tiny_trace, tmp_path / "gpu", device="cuda"), progress=False)
    assert gpu["device"] == "cuda:0" and cpu["device"] == "cpu"
    assert gpu["best_validation_score"] == pytest.approx(cpu["best_validation_score"], abs=2e-3)
    assert_same_weights(weights(cpu["checkpoint"]), weights(gpu["checkpoint"]), exact=False, rtol=1e-3, atol=1e-4)
    bf16 = train(config(tiny_trace, tmp_path / "bf16", device="cuda", bf16=True), progress=False)
    assert 0 < bf16["best_validation_score"] <= 1


@needs_two_gpus
def test_two_gpus_under_torchrun(tiny_trace, tmp_path):
    """torchrun, 2 processes on 2 GPUs (NCCL): one GPU each, replicas in sync."""
    torchrun(flags(config(tiny_trace, tmp_path / "ddp", device="cuda")))
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True and summary["device"] == "cuda:0"
