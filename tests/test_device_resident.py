"""Compression on the cache's own device: no host copy on the path (checked on the meta device, where any read
back to the host raises), the kernel backend switch (KVP_GYM_KERNELS), and the end-to-end path through the Triton
kernels (in the Triton interpreter, TRITON_INTERPRET=1 from conftest.py) answering as the torch path."""

from __future__ import annotations

import json

import pytest
import torch

from kvp_gym.cache import EvictingCache, prefill
from kvp_gym.cache.generate import query_window
from kvp_gym.evaluation.end_to_end import E2EConfig, run
from kvp_gym.kernels import forced_backend, use_backend
from kvp_gym.scorers import HeadView, available_scorers, get_scorer, score
from kvp_gym_agents.checkpoint import save_checkpoint
from kvp_gym_agents.kvp import KVPNetwork
from kvp_gym_baselines.lagkv import LagKV

PROMPT = [10 + (i * 7) % 200 for i in range(300)]  # long enough for LagKV's partitions and SnapKV's window
BUDGET = 48


def _on(cache: EvictingCache, device: str) -> EvictingCache:
    """A copy of ``cache`` whose tensors live on ``device``."""
    moved = cache.copy()
    for layer in moved.layers:
        layer.keys, layer.values, layer.positions = (t.to(device) for t in (layer.keys, layer.values, layer.positions))
    return moved


@pytest.fixture(scope="module")
def kvp_checkpoint(tmp_path_factory):
    """Random KVP agents for tiny-random's 2 layers x 2 KV heads (the shipped ones are for SmolLM2)."""
    path = tmp_path_factory.mktemp("kvp") / "agents.safetensors"
    torch.manual_seed(0)
    heads = [(layer, head) for layer in range(2) for head in range(2)]
    geometry = {"head_dim": 16, "num_layers": 2, "num_kv_heads": 2}
    save_checkpoint(path, KVPNetwork(4, 16, width=16, position_dim=8, buckets=8, max_age=64), heads,
                    {"model": "tiny-random", "geometry": geometry})  # fmt: skip
    return path


def _scorers(kvp_checkpoint) -> dict:
    scorers = {name: get_scorer(name) for name in available_scorers() if name != "kvp"}
    return scorers | {"kvp": get_scorer("kvp", checkpoint=str(kvp_checkpoint))}


def test_compression_never_reads_the_cache_back_to_the_host(tiny, kvp_checkpoint):
    """Every registered scorer compresses a cache living on the meta device: a tensor copied to the host, a value
    read back (.item(), bool(), .tolist()), or a host tensor mixed into the device's arithmetic raises there, as
    each would be a transfer (or a failure) on a GPU. The kernels take their torch path on meta, the one a GPU
    without Triton takes."""
    model, _ = tiny
    state = prefill(model, PROMPT, keep_queries=None)
    meta_queries = {i: q.to("meta") for i, q in state.queries.items()}
    meta_importance = {i: torch.rand(1, 2, len(PROMPT)).to("meta") for i in meta_queries}  # read by the oracle
    for name, scorer in _scorers(kvp_checkpoint).items():
        cache = _on(state.cache, "meta")
        window = query_window(scorer)
        queries = {i: q[..., -window:, :] for i, q in meta_queries.items()} if window else meta_queries
        done = cache.compress(scorer, BUDGET, queries, meta_importance)
        assert done.evicted and cache.physical_length(1) == BUDGET, name
        assert {layer.keys.device.type for layer in cache.layers} == {"meta"}, name


def test_the_meta_check_catches_a_host_copy(tiny):
    """The check above can fail: a scorer that copies keys to the host raises on the meta device."""

    class CopiesToHost:
        name, needs_queries, needs_future = "copies", False, False

        def score(self, view):
            return -view.keys.cpu().float().norm(dim=-1)

    model, _ = tiny
    cache = _on(prefill(model, PROMPT).cache, "meta")
    with pytest.raises(Exception, match="meta"):
        cache.compress(CopiesToHost(), BUDGET)


def test_device_resident_scores_equal_the_host_scores(tiny, kvp_checkpoint):
    """On the CPU the device-resident path is the old one: the cache's scores equal each scorer's scores of host
    copies of the same tensors (bit for bit, except where the kernels' torch path differs on the CPU)."""
    model, _ = tiny
    state = prefill(model, PROMPT, keep_queries=None)
    for name, scorer in _scorers(kvp_checkpoint).items():
        if scorer.needs_future:
            continue
        window = query_window(scorer)
        queries = {i: q[..., -window:, :] for i, q in state.queries.items()} if window else state.queries
        scores = state.cache.score(scorer, queries)
        assert all(s.device.type == "cpu" and s.shape == (1, 2, len(PROMPT)) for s in scores), name
        assert all(torch.isfinite(s).all() for s in scores), name


def test_lagkv_scores_each_padded_row_as_alone():
    """LagKV scores every row at once: a row padded to a longer view gets the ranking it gets alone."""
    torch.manual_seed(1)
    lengths, n, scorer = (300, 150, 20, 400), 400, LagKV(partition=32, sinks=4)
    keys, values = torch.randn(4, n, 8), torch.randn(4, n, 8)
    mask = torch.arange(n) < torch.tensor(lengths)[:, None]
    together = score(scorer, HeadView(keys, values, torch.arange(n).expand(4, n), mask))
    for row, length in enumerate(lengths):
        alone = score(scorer, HeadView(keys[row, :length], values[row, :length], torch.arange(length),
                                       torch.ones(length, dtype=torch.bool)))  # fmt: skip
        ranking = together[row, :length].argsort(descending=True, stable=True)
        assert torch.equal(ranking, alone.argsort(descending=True, stable=True)), length


def test_the_backend_switch(monkeypatch):
    monkeypatch.delenv("KVP_GYM_KERNELS", raising=False)
    assert forced_backend() == "auto"
    monkeypatch.setenv("KVP_GYM_KERNELS", "Torch")
    assert forced_backend() == "torch"
    with use_backend("triton"):
        assert forced_backend() == "triton"  # code wins over the environment inside its block
    assert forced_backend() == "torch"
    monkeypatch.setenv("KVP_GYM_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"KVP_GYM_KERNELS='cuda': expected one of auto, torch, triton"):
        forced_backend()


def test_end_to_end_through_the_triton_kernels_answers_as_torch(tmp_path, monkeypatch):
    """evaluate-e2e with KVP_GYM_KERNELS=triton (attention statistics and compaction in the Triton interpreter) and
    =torch: the same outputs for every prompt and budget, and the same essay NLLs."""
    config = E2EConfig(
        model="tiny-random",
        tasks=("niah_single",),
        context=700,
        budgets=(32,),
        policies=("tova", "snapkv:window=16"),  # short query windows: the interpreter is slow (h2o: minutes)
        samples=1,
        essays=1,
        continuation=4,
    )
    parts = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("KVP_GYM_KERNELS", backend)
        run(config, tmp_path / backend, progress=False)
        parts[backend] = {p.name: json.loads(p.read_text()) for p in sorted((tmp_path / backend / "parts").glob("*"))}
    assert parts["torch"].keys() == parts["triton"].keys() and len(parts["torch"]) == 2
    for name, torch_part in parts["torch"].items():
        triton_part = parts["triton"][name]
        for label, result in torch_part["policies"].items():
            assert result["holistic_score"] == pytest.approx(triton_part["policies"][label]["holistic_score"], abs=1e-5)
            for budget, numbers in result["budgets"].items():
                other = triton_part["policies"][label]["budgets"][budget]
                if "output" in numbers:
                    assert numbers["output"] == other["output"], (name, label, budget)
                if "nll" in numbers:
                    torch.testing.assert_close(torch.tensor(numbers["nll"]), torch.tensor(other["nll"]), atol=1e-4,
                                               rtol=0)  # fmt: skip
