"""benchmarks/scale_on_paper.py: its cost model against what the code really does (torch's FLOP counter, the cache's
own byte count, the model's own parameter count), and the script's measure -> save -> resume -> report path on
tiny-random. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kvp_gym import models
from kvp_gym.cache import prefill
from kvp_gym.cache.generate import query_window
from kvp_gym.scorers import from_spec
from kvp_gym_agents.kvp import KVPNetwork

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "scale_on_paper.py"
_spec = importlib.util.spec_from_file_location("scale_on_paper", SCRIPT)
paper = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = paper  # dataclasses look their module up there
_spec.loader.exec_module(paper)


@pytest.fixture(scope="module")
def tiny():
    model, _ = models.load("tiny-random")
    return model


@pytest.fixture(scope="module")
def tiny_prefill(tiny):
    """A 200-token prefill keeping every query: 200 is not a multiple of the 128-query chunks of the statistics."""
    return prefill(tiny, paper.prompt_ids(tiny, 200), None)


@pytest.mark.parametrize("policy", ["knorm", "streaming_llm", "tova", "snapkv", "h2o", "expected_attention"])
def test_the_matmul_flops_of_each_scorer_are_what_torch_counts(tiny, tiny_prefill, policy):
    """The formula's matrix-multiply part equals FlopCounterMode's count of one whole compression: a formula that
    forgets a matmul, counts the causal triangle wrongly or misses the chunking fails here."""
    scorer = from_spec(policy)
    queries = paper.kept_queries(tiny_prefill.queries, query_window(scorer))
    with FlopCounterMode(display=False) as counter:
        tiny_prefill.cache.copy().compress(scorer, 64, queries)
    geometry = paper.geometry_of(tiny, "tiny-random")
    assert counter.get_total_flops() == paper.scorer_flops(policy, geometry, 200)[0]


@pytest.mark.parametrize("n", [1, 37, 300])
def test_the_kvp_network_flops_are_what_torch_counts(n):
    """KVP's formula (width W, position_dim p, head_dim D) equals the counted FLOPs of the network's forward pass
    over every KV head."""
    width, position, heads, head_dim = 24, 8, 3, 16
    network = KVPNetwork(heads, head_dim, width=width, position_dim=position, buckets=paper.KVP_BUCKETS)
    keys, values = torch.randn(2, heads, 1, n, head_dim).unbind(0)
    positions = torch.arange(n).expand(heads, 1, n)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network(keys, values, positions, positions.flip(-1))
    geometry = paper.Geometry("one layer", 1, heads, heads, head_dim, 8, 8, 8, True, 4)
    assert counter.get_total_flops() == paper.scorer_flops("kvp", geometry, n, (width, position))[0]


def test_kv_bytes_are_the_caches_own_before_and_after_compression(tiny, tiny_prefill):
    geometry = paper.geometry_of(tiny, "tiny-random")
    assert tiny_prefill.cache.kv_bytes == paper.kv_bytes(geometry, 200)
    compressed = tiny_prefill.cache.copy()
    compressed.compress(from_spec("knorm"), 48)
    assert compressed.kv_bytes == paper.kv_bytes(geometry, 200, 48)


@pytest.mark.parametrize("budget", [None, 24, 10])
def test_kv_bytes_of_a_hybrid_model_are_the_caches_own(budget):
    """tiny-gemma3 (5 sliding layers of window 16, 1 global): its sliding layers hold min(W - 1, budget) rows."""
    model, _ = models.load("tiny-gemma3")
    geometry = paper.geometry_of(model, "tiny-gemma3")
    assert (geometry.local_layers, geometry.window) == (5, models.TINY_GEMMA3_SIZES["sliding_window"])
    cache = prefill(model, paper.prompt_ids(model, 70), sinks=2, recent=4).cache  # budget 10 > protected
    if budget:
        cache.compress(from_spec("knorm"), budget)
    assert cache.kv_bytes == paper.kv_bytes(geometry, 70, budget)


def test_the_parameter_formula_counts_the_model(tiny):
    """Block parameters + embeddings equal the model's parameters less its RMSNorm weights (which the formula
    leaves out: 2 per layer and a final one, each of the hidden size)."""
    geometry = paper.geometry_of(tiny, "tiny-random")
    norms = (2 * geometry.layers + 1) * geometry.hidden
    assert sum(p.numel() for p in tiny.parameters()) - norms == geometry.params


def test_only_global_layers_grow_with_the_context():
    """Gemma 3's sliding layers hold at most their window: past it, the KV grows by the global layers' rows only;
    and Llama-3.1-8B's KV is the 128 KiB per token (bf16) the architecture implies; the parameter formula gives
    the published sizes."""
    gemma = next(g for g in paper.TARGETS if g.name == "Gemma 3 12B")
    per_token = 2 * gemma.kv_heads * gemma.head_dim * gemma.dtype_bytes
    grown = paper.kv_bytes(gemma, 4 * gemma.window) - paper.kv_bytes(gemma, 2 * gemma.window)
    assert grown == per_token * gemma.global_layers * 2 * gemma.window
    assert paper.kv_bytes(gemma, 4 * gemma.window, 512) < paper.kv_bytes(gemma, 4 * gemma.window)
    llama = next(g for g in paper.TARGETS if g.name == "Llama-3.1-8B")
    assert paper.kv_bytes(llama, 1) == 128 * 1024
    assert 7.9e9 < llama.params < 8.1e9  # "8B"
    gemma_small = next(g for g in paper.TARGETS if g.name == "Gemma 3 270M")
    assert 0.26e9 < gemma_small.params < 0.28e9  # "270M", its embedding table tied to the output projection


def test_prefill_flops_are_the_textbook_count_without_windows():
    """2 x params x n + 2 x layers x H_q x head_dim x n^2, up to the causal diagonal and the last-token logits."""
    llama = next(g for g in paper.TARGETS if g.name == "Llama-3.1-8B")
    n = 32768
    textbook = 2 * llama.block_params * n + 2 * llama.layers * llama.query_heads * llama.head_dim * n * n
    assert paper.prefill_flops(llama, n) == pytest.approx(textbook, rel=1e-3)
    assert paper.chunked_pairs(n) == n * n // 2 + n * paper.QUERY_CHUNK // 2


def test_the_script_measures_resumes_and_reports(tmp_path, monkeypatch, capsys):
    """Two runs on tiny-random (in this process: starting Python twice would cost more than the runs): the second
    measures only the new context and reports both; the KVP agents (for SmolLM2) are skipped with the reason."""
    out = tmp_path / "measured.json"
    base = ["scale_on_paper.py", "--model", "tiny-random", "--policies", "kvp,knorm,h2o", "--budgets", "32"]
    base += ["--repeats", "1", "--steps", "2", "--out", str(out)]
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(sys, "argv", [*base, "--contexts", "64"])
        paper.main()
        assert "skipped kvp" in capsys.readouterr().out
        monkeypatch.setattr(sys, "argv", [*base, "--contexts", "64,96"])
        paper.main()
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "n=64: measured before" in printed and "n=96: prefill" in printed
    saved = json.loads(out.read_text())
    assert sorted(saved["contexts"]) == ["64", "96"]
    assert set(saved["contexts"]["96"]["compress_s"]) == {"knorm", "h2o"}
    assert [row["cached"] for row in saved["contexts"]["96"]["decode"]] == [96, 32]
    assert "## Predicted" in printed and "| Llama-3.1-8B | 128k |" in printed
