"""kvp_gym.device.resolve_device: the one --device rule of every command, with and without CUDA and torchrun."""

from __future__ import annotations

import os

import pytest
import torch

from kvp_gym.device import device_name, resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_without_cuda_auto_and_cpu_are_the_cpu(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_without_cuda_asking_for_it_is_an_error(no_cuda, name):
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        resolve_device(name)


def test_with_cuda_auto_and_cuda_are_the_first_gpu_or_torchruns_own(cuda, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # named explicitly: not the rank's


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_unknown_names_say_what_is_accepted(cuda, name):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:i'"):
        resolve_device(name)


def test_the_cpu_is_named_in_provenance_records():
    name = device_name(torch.device("cpu"))
    assert name.startswith("cpu (") and name.endswith(f", {os.cpu_count()} cores)")
    assert "?" not in name and "unknown" not in name  # /proc/cpuinfo or the architecture says what it is
