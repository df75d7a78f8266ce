"""Kernels for the hot paths: an exact torch implementation for every device, and Triton on CUDA tensors.

Each kernel module (:mod:`~kvp_gym.kernels.attention_stats`, :mod:`~kvp_gym.kernels.compaction`) holds a
dispatcher, a torch implementation of the same signature (``*_torch``), and loads its Triton implementation
(``*_triton``, in a ``*_triton`` module) only when a call chooses it: importing :mod:`kvp_gym` needs neither a
GPU, nor Triton, nor a C compiler.

The dispatcher runs Triton on CUDA tensors when Triton is installed, and torch otherwise. Users force either with
the environment variable ``KVP_GYM_KERNELS=auto|torch|triton`` (read at each call), code (tests, benchmarks) with
``with use_backend("torch"): ...``, which wins over the variable inside its block. Forcing Triton without a CUDA
device runs the kernels in the Triton interpreter (slow, for correctness tests on small shapes).

Imports nothing from kvp_gym; the kernel modules import it for the dispatch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")
ENVIRONMENT_VARIABLE = "KVP_GYM_KERNELS"
_forced: list[Backend | None] = [None]  # a one-element list: use_backend's switch (None: the environment decides)


@contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Force every kernel dispatch inside the block to ``name`` ("torch", "triton", or "auto": by device), whatever
    ``KVP_GYM_KERNELS`` says."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _forced[0] = _forced[0], name
    try:
        yield
    finally:
        _forced[0] = previous


def forced_backend() -> Backend:
    """The backend in force: :func:`use_backend`'s inside its block, else ``KVP_GYM_KERNELS`` (default "auto")."""
    if _forced[0] is not None:
        return _forced[0]
    name = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"environment variable {ENVIRONMENT_VARIABLE}={os.environ[ENVIRONMENT_VARIABLE]!r}: expected one of "
            f"{', '.join(BACKENDS)}"
        )
    return name


def describe(value: object) -> str:
    """A kernel argument for error messages: dtype, shape and device of a tensor, else its type's name."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor {list(value.shape)} on {value.device}"
    return type(value).__name__


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (it is not imported)."""
    return importlib.util.find_spec("triton") is not None


def choose(device: torch.device) -> Literal["torch", "triton"]:
    """The backend a call on ``device`` runs: the forced one, else Triton on CUDA (when installed), else torch."""
    forced = forced_backend()
    if forced == "torch" or (forced == "auto" and (device.type != "cuda" or not triton_available())):
        return "torch"
    if not triton_available():
        raise RuntimeError("the Triton backend was forced, but triton is not installed (pip install triton)")
    if device.type != "cuda" and torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"the Triton backend runs CUDA tensors, got {device} tensors (set TRITON_INTERPRET=1 before the first "
            "kernel call to run CPU tensors in the Triton interpreter)"
        )
    return "triton"


def triton_module(name: str) -> ModuleType:
    """``kvp_gym.kernels.<name>_triton``, imported on first use.

    Without a CUDA device Triton can only interpret, and it reads TRITON_INTERPRET when a kernel is decorated,
    including its own library's kernels when ``triton`` is first imported: the flag is set here if Triton was not
    imported yet, and a clear error is raised if it was imported without it (set TRITON_INTERPRET=1 earlier).
    """
    if not torch.cuda.is_available():
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        import triton.language as tl
        from triton.runtime.jit import JITFunction

        if isinstance(tl.zeros, JITFunction):  # Triton's own library was decorated for compiling, not interpreting
            raise RuntimeError(
                "Triton kernels without a CUDA device need the Triton interpreter, but triton was imported before "
                "TRITON_INTERPRET=1 was set: set it in the environment (or before importing transformers or torch "
                "modules that import triton)"
            )
    return importlib.import_module(f"kvp_gym.kernels.{name}_triton")
