"""Which torch device a command runs on: the one rule every ``--device`` option follows; and its name for records.

Imports nothing from kvp_gym.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:i``.

    Under torchrun (``LOCAL_RANK`` set) ``auto`` and ``cuda`` mean this process's own GPU, ``cuda:LOCAL_RANK``;
    ``cuda:i`` names a GPU explicitly. Asking for CUDA where torch sees none is an error, not a silent CPU run.
    """
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:i', got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device (use --device cpu or auto)")
    if name.startswith("cuda:"):
        return torch.device(name)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def device_name(device: torch.device) -> str:
    """What ``device`` is, for provenance records: the GPU's name, or ``cpu (MODEL, N cores)``.

    ``platform.processor()`` is empty on most Linux systems, so the CPU model comes from /proc/cpuinfo there, and
    from the architecture (``x86_64``) where neither says more.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()}, {os.cpu_count()} cores)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"
