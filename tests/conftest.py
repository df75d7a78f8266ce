"""Shared fixtures: the tiny random model and a small trace file collected from it once per session."""

from __future__ import annotations

import pytest

from kvp_gym import models
from kvp_gym.collect import CollectConfig, collect


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of tiny-random with eager attention, so attention weights can be compared."""
    return models.load("tiny-random", attn_implementation="eager")


@pytest.fixture(scope="session")
def tiny_config() -> CollectConfig:
    return CollectConfig(model="tiny-random", task="niah_single", samples=6, context=700, future=12, seed=3)


@pytest.fixture(scope="session")
def tiny_trace(tmp_path_factory, tiny_config):
    """A trace file of 6 tiny-random niah_single samples (collected once per test session)."""
    path = tmp_path_factory.mktemp("traces") / "tiny.h5"
    collect(tiny_config, path, progress=False)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (converted from the packaged GGUF on first use), eager attention."""
    return models.load("smollm2-135m", attn_implementation="eager")
