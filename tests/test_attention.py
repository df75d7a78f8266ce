"""Attention semantics: recorded from the model at collection, honoured by the importance and the attention
statistics (sliding window, scale, soft-cap), and refused where kvp-gym cannot reproduce them."""

from __future__ import annotations

import pytest
import torch
from transformers import GptOssConfig, GptOssForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kvp_gym import models
from kvp_gym.attention import AttentionSpec, Rotary
from kvp_gym.capture import CaptureError, capture_qkv, probe_attention
from kvp_gym.cli import main
from kvp_gym.collect import CollectConfig, collect
from kvp_gym.traces import open_traces
from kvp_gym.utility import attention_received, future_importance

WINDOW = 24


@pytest.fixture(scope="module")
def sliding_folder(tmp_path_factory, tiny):
    """A tiny random Qwen2 whose layers 1 and 2 use a 24-token sliding window, saved as a model folder."""
    _, tokenizer = tiny
    folder = tmp_path_factory.mktemp("qwen2-sliding")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        **{**models.TINY_RANDOM_SIZES, "num_hidden_layers": 3},
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_probe_reads_each_layers_semantics(sliding_folder, tiny):
    model, _ = models.load(str(sliding_folder))
    specs, rotaries = probe_attention(model)
    assert specs == (AttentionSpec(0.25), AttentionSpec(0.25, WINDOW), AttentionSpec(0.25, WINDOW))
    assert rotaries == (Rotary(tuple(float(f) for f in model.model.rotary_emb.inv_freq), 1.0),) * 3
    assert probe_attention(tiny[0])[0] == (AttentionSpec(0.25),) * 2


def test_importance_and_statistics_follow_the_sliding_window(sliding_folder):
    """Future importance and attention received, recomputed from captured q/k, equal the model's own eager
    attention on every layer, full and sliding alike."""
    model, _ = models.load(str(sliding_folder), attn_implementation="eager")
    specs, _ = probe_attention(model)
    ids = torch.tensor([list(range(10, 90))])
    n = 50
    with torch.inference_mode(), capture_qkv(model, range(3)) as captured:
        attentions = model(ids, output_attentions=True).attentions
    for layer in range(3):
        queries, keys, _ = (t[0] for t in captured[layer])
        probs = attentions[layer][0].float().view(2, 2, 80, 80)  # [KV head, group, query, key]
        expected = probs[:, :, n:, :n].amax(1).sum(1)
        got = future_importance(queries.view(2, 2, 80, -1), keys, n, attention=specs[layer], chunk=16)
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-2)
        received = attention_received(queries.view(2, 2, 80, -1), keys, attention=specs[layer], chunk=16)
        torch.testing.assert_close(received, probs.sum(2), atol=5e-3, rtol=1e-2)
    assert specs[1].sliding_window == WINDOW  # and the window changes the numbers:
    plain = future_importance(queries.view(2, 2, 80, -1), keys, n)
    assert not torch.allclose(plain, future_importance(queries.view(2, 2, 80, -1), keys, n, attention=specs[2]))


def test_softcap_and_scale():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 12, 4) * 4, torch.randn(12, 4) * 4
    spec = AttentionSpec(scale=0.3, softcap=5.0)
    logits = torch.tanh(q @ k.T * 0.3 / 5.0) * 5.0
    probs = logits.masked_fill(torch.ones(12, 12).triu(1).bool(), float("-inf")).softmax(-1)
    torch.testing.assert_close(future_importance(q, k, 7, attention=spec), probs[..., 7:, :7].amax(1).sum(-2))
    torch.testing.assert_close(attention_received(q, k, attention=spec, chunk=5), probs.sum(-2))


def test_rotary_undo_and_mean_rotation(tiny):
    model, _ = tiny
    rotary = probe_attention(model)[1][0]
    x, positions = torch.randn(3, 7, 16), torch.arange(5, 12)
    cos, sin = model.model.rotary_emb(x, positions[None])
    rotated = x * cos + torch.cat([-x[..., 8:], x[..., :8]], -1) * sin  # the model's own RoPE
    torch.testing.assert_close(rotary.unrotate(rotated, positions), x, atol=1e-5, rtol=1e-5)
    per_position = torch.stack([rotary.mean_rotation(positions[i : i + 1]) for i in range(7)])
    torch.testing.assert_close((per_position @ x[0, :, :, None])[..., 0], rotated[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_position.mean(0), rotary.mean_rotation(positions))


def test_collection_records_the_semantics(sliding_folder, tmp_path):
    config = CollectConfig(model=str(sliding_folder), task="niah_single", samples=1, context=700, future=4)
    collect(config, tmp_path / "s.h5", progress=False)
    with open_traces(tmp_path / "s.h5") as trace:
        assert [spec.sliding_window for spec in trace.header.attention] == [0, WINDOW, WINDOW]
        assert trace.header.rotary_of(0) == trace.header.rotary_of(2) is not None


def test_unsupported_attention_is_refused_at_collection(tmp_path, tiny, capsys, monkeypatch):
    """gpt-oss adds learned attention sinks (s_aux) to the softmax: the importance would be silently wrong."""
    _, tokenizer = tiny
    config = GptOssConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["full_attention", "full_attention"],
    )
    torch.manual_seed(0)
    GptOssForCausalLM(config).save_pretrained(tmp_path / "gpt-oss")
    tokenizer.save_pretrained(tmp_path / "gpt-oss")
    load = models.load
    monkeypatch.setattr(
        models, "load", lambda name, **kwargs: load(name, attn_implementation="eager", **kwargs)
    )  # no sdpa for gpt-oss
    model, _ = models.load(str(tmp_path / "gpt-oss"))
    with pytest.raises(CaptureError, match=r"receives \['s_aux'\], which kvp-gym cannot reproduce"):
        probe_attention(model)
    code = main(
        ["collect", "--model", str(tmp_path / "gpt-oss"), "--samples", "1", "--context", "700", "--future", "4"]
        + ["--out", str(tmp_path / "x.h5")]
    )
    assert code == 2 and "s_aux" in capsys.readouterr().err and not (tmp_path / "x.h5").exists()
