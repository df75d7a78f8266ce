"""The trainer at scale: streaming equals the in-memory pool, chunks of heads add up to the whole step, resuming
continues the same run, head groups over two processes equal separate runs, and CUDA training agrees with the CPU:
importance computed on the GPU, float32 agents near the CPU's, bf16 agents near float32's (the CUDA tests run only
where a GPU is present)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kvp_gym.importance import ImportanceStore, ImportanceWarning
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
    assert a["step"] == b["step"] == 6
    assert_same_weights(a["network"], b["network"])
    assert_same_weights(a["ema"], b["ema"])
    assert torch.equal(a["generator"], b["generator"]), "the batch generator's state differs after resuming"


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


def stored_importance(trace_path, folder) -> dict[tuple[str, int, int], torch.Tensor]:
    """Every entry the importance store in ``folder`` holds for ``trace_path``: (sample, layer, split point) ->
    float32 [H_kv, split]. An entry that fails its checks is an error here (the store would recompute it on the
    CPU, hiding what the run wrote)."""
    with open_traces(trace_path) as trace, warnings.catch_warnings():
        warnings.simplefilter("error", ImportanceWarning)
        store = ImportanceStore(trace, sidecar=folder)
        entries = {}
        for path in sorted(store.folder.glob("*/*.importance")):
            layer, split = (int(part) for part in path.stem.split("-"))
            entries[path.parent.name, layer, split] = store.layer(path.parent.name, layer, split)
    return entries


def last_weights(run: dict) -> dict[str, torch.Tensor]:
    """The network's weights after a run's last step (OUT/last.pt; agents.safetensors holds the EMA weights of the
    best validation step, which two runs may reach at different steps)."""
    state = torch.load(Path(run["checkpoint"]).parent / "last.pt", map_location="cpu", weights_only=False)
    return state["network"]


def initial_weights(run: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights every run with ``run``'s network settings and ``seed`` starts from (as Learner.build draws them)."""
    settings = read_checkpoint(run["checkpoint"])[1]["network"]  # before seeding: reading builds a network too
    torch.manual_seed(seed)
    return KVPNetwork(**settings).state_dict()


# out.bias adds the same amount to every score of a head, which changes no ranking: its gradient is zero in exact
# arithmetic, and AdamW's normalised step turns the rounding noise left in it into moves of up to about lr per step
# whose sign follows the device's summation order. It carries no signal, so distances between runs leave it out.
SHIFT_ONLY = ("out.bias",)


def relative_distance(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||b - start|| over every weight but SHIFT_ONLY: how far apart two runs from ``start`` ended, as a
    fraction of how far ``b`` moved."""

    def norm(x: dict, y: dict) -> float:
        return sum(float(((x[n] - y[n]).double() ** 2).sum()) for n in x if n not in SHIFT_ONLY) ** 0.5

    assert a.keys() == b.keys() == start.keys()
    return norm(a, b) / norm(b, start)


@needs_gpu
def test_cuda_training_agrees_with_the_cpu(tiny_trace, tmp_path, monkeypatch):
    """A few steps on one GPU, future importance included: each run computes it into a private store (the shared one
    would hand the GPU runs what a CPU run stored), so the GPU runs take the Triton path. The GPU's importance
    equals the CPU's; the same batches and rankings (drawn on the CPU) give nearly the same agents in float32, and
    agents near the float32 ones in bf16 autocast."""
    runs, stores = {}, {}
    for name, device, bf16 in (("cpu", "cpu", False), ("cuda", "cuda", False), ("bf16", "cuda", True)):
        stores[name] = tmp_path / f"importance-{name}"
        monkeypatch.setenv("KVP_GYM_IMPORTANCE", str(stores[name]))
        runs[name] = train(config(tiny_trace, tmp_path / name, device=device, bf16=bf16), progress=False)
    assert runs["cpu"]["device"] == "cpu" and runs["cuda"]["device"] == runs["bf16"]["device"] == "cuda:0"

    # Triton vs the torch path: both accumulate float32 from the same float16 inputs and differ by summation order
    # and exp2 rounding only: tests/test_kernels.py's rtol, and an atol of 1e-7 because this trace's importance
    # lies below 0.03 (1.1e-8 apart at most between the torch path and the Triton interpreter).
    cpu_importance = stored_importance(tiny_trace, stores["cpu"])
    cuda_importance = stored_importance(tiny_trace, stores["cuda"])
    assert cpu_importance and cuda_importance.keys() == cpu_importance.keys()
    for key, expected in cpu_importance.items():
        torch.testing.assert_close(
            cuda_importance[key], expected, rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}"
        )

    # Weights after 4 steps, as a fraction of how far they moved from the common start (0.32). Measured on a CPU:
    # importance off by a random 1e-4 (relative) ends 0.012 away, 1e-3 ends 0.12 away; the Triton interpreter's
    # importance (5e-7 relative from the torch path's) 6e-4 away. float32 on a GPU differs from the CPU by summation
    # order only, at that level: <= 0.01 leaves 15x.
    start = initial_weights(runs["cpu"])
    cpu, cuda, bf16 = (last_weights(runs[name]) for name in ("cpu", "cuda", "bf16"))
    assert relative_distance(cuda, cpu, start) <= 1e-2
    # bf16 autocast rounds the network's matmul inputs to 8 significant bits (2^-9 relative): with CPU autocast the
    # bf16 run ended 0.037 from the float32 one. 0.2 allows five times that; a run that diverges (importance 1% off:
    # 0.75) fails.
    assert relative_distance(bf16, cuda, start) <= 0.2
    # Validation scores are a coarse check: tiny-random's near-uniform attention puts any agent near 0.99
    # (importance 1% off moves it by 1.6e-3, bf16 on a CPU by 5e-6).
    assert runs["cuda"]["best_validation_score"] == pytest.approx(runs["cpu"]["best_validation_score"], abs=1e-3)
    assert runs["bf16"]["best_validation_score"] == pytest.approx(runs["cuda"]["best_validation_score"], abs=1e-3)


@needs_two_gpus
def test_two_gpus_under_torchrun(tiny_trace, tmp_path, monkeypatch):
    """torchrun, 2 processes on 2 GPUs (NCCL): one GPU each, importance computed there (a private store, which the
    processes share), replicas in sync."""
    monkeypatch.setenv("KVP_GYM_IMPORTANCE", str(tmp_path / "importance"))
    torchrun(flags(config(tiny_trace, tmp_path / "ddp", device="cuda")))
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True and summary["device"] == "cuda:0"
    assert stored_importance(tiny_trace, tmp_path / "importance"), "the processes computed no importance"
