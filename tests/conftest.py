"""Shared fixtures: the tiny random model and a small trace file collected from it once per session."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels are tested in the Triton interpreter (tests/test_kernels.py). Triton reads the
# flag when a kernel is decorated, its own library's included, and later imports here (transformers) import
# Triton: the flag must be set before them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvp_gym import models  # noqa: E402
from kvp_gym.collect import CollectConfig, collect  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def importance_store(tmp_path_factory):
    """Importance computed by the tests is stored in a temporary folder, not in the user's cache."""
    previous = os.environ.get("KVP_GYM_IMPORTANCE")
    os.environ["KVP_GYM_IMPORTANCE"] = str(tmp_path_factory.mktemp("importance"))
    yield
    if previous is None:
        del os.environ["KVP_GYM_IMPORTANCE"]
    else:
        os.environ["KVP_GYM_IMPORTANCE"] = previous


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
