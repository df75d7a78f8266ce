"""The trainer's settings and the ``kvp-gym train`` command line, without importing torch: ``kvp-gym --help``
builds every command's parser, and this module keeps that fast (the trainer itself, agents/train.py, is imported
only when the command runs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

TRAIN_DOC = """Train KVP agents (one small scorer per KV head) with RLOO on trace files: the
KVP paper's recipe (arXiv 2602.10238), agents/train.py; docs/agents.md explains
the method, the presets, the ablation options and the shipped agents.

    kvp-gym train --traces traces/demo/niah_single.h5 traces/demo/essay.h5 \\
        --heads all --out runs/kvp --preset demo

Writes OUT/agents.safetensors (the best EMA weights by validation score),
OUT/last.pt (to resume) and TensorBoard logs in OUT/tb. Batches stream from the
trace files; future importance is computed once and kept in the user cache
($KVP_GYM_IMPORTANCE, or importance/ in $KVP_GYM_CACHE). --device auto uses
CUDA when present. Several processes or machines: torchrun --nproc_per_node N
-m kvp_gym.cli train ... (DDP: gloo on CPU, NCCL with one GPU per process;
--parallel heads trains a disjoint head group per process instead). Every
option below defaults to the paper's value; --preset demo sizes it for 2 CPU
cores. --key-frame, --ages and --index choose the agents' inputs (ablations,
docs/agents.md), recorded in the checkpoint; the defaults are the shipped
agents' inputs."""


@dataclass
class TrainConfig:
    """Defaults are the paper's hyperparameters; ``PRESETS`` holds smaller settings."""

    traces: list[str] = field(default_factory=list)
    out: str = "runs/kvp"
    heads: str = "all"  # "all" or "layer:head,layer:head"
    steps: int = 4000
    batch: int = 128  # episodes per head per step
    rankings: int = 1  # sampled rankings per episode (> 1: leave-one-out baseline within each episode)
    width: int = 256
    position_dim: int = 32
    buckets: int = 64  # rows of each position table (agents/kvp.py)
    max_age: int = 0  # ages from here on share the age table's last row; 0 = the longest training cache
    # Ablation options (agents/kvp.py; recorded in the checkpoint's network configuration):
    key_frame: str = "post"  # post: keys as cached (rotated by RoPE) | pre: un-rotated with the layer's RoPE
    ages: str = "table"  # table (bucketed, capped at max_age) | none | relative (age / context) | log (no cap)
    index: str = "table"  # table (the paper's clamped index embedding) | none
    lr: float = 5e-5
    min_lr: float = 1e-6
    weight_decay: float = 1e-3
    warmup: int = 100  # linear warm-up from 1% of lr, then cosine decay to min_lr
    grad_clip: float = 5.0  # per head
    ema: float = 0.99
    advantage_clip: float = 2.0
    random_splits: int = 8  # random split points per free-text sample (task samples use the prompt boundary)
    min_prompt: int = 16
    eval_every: int = 200
    seed: int = 0
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda; under torchrun, each process its own GPU
    bf16: bool = False  # bf16 autocast for the network on a GPU (rewards stay float32)
    parallel: str = "data"  # under torchrun: data (DDP over batches) | heads (a disjoint head group per process)
    in_memory: bool = False  # hold every episode in RAM instead of streaming batches from the trace files
    chunk_tokens: int = 0  # heads x episodes x tokens per chunk of a step (bounds memory); 0 = by device


PRESETS = {
    # Sized for 2 CPU cores: all 90 SmolLM2 heads in minutes.
    "demo": dict(
        steps=200,
        batch=8,
        rankings=8,
        width=32,
        position_dim=16,
        lr=3e-3,
        min_lr=1e-5,
        warmup=20,
        eval_every=50,
        random_splits=4,
    ),
}


# The ablation options' choices, as agents/kvp.py's KEY_FRAMES, AGE_FEATURES and INDEX_FEATURES (not imported:
# that module loads torch; tests/test_kvp_ablations.py checks they agree).
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "parallel": ("data", "heads"),
    "key_frame": ("post", "pre"),
    "ages": ("table", "none", "relative", "log"),
    "index": ("table", "none"),
}
FLAG_HELP = {
    "bf16": "bf16 autocast for the network on a GPU",
    "in_memory": "hold every episode in RAM (faster for small sets) instead of streaming from the trace files",
    "device": "auto = CUDA when present; under torchrun each process uses its LOCAL_RANK GPU",
    "parallel": "under torchrun: data = DDP over batches, heads = a disjoint head group per process",
    "chunk_tokens": "heads x episodes x tokens per chunk of a step, bounds memory; 0 = 2^18 on CPU, 2^21 on GPU",
    "key_frame": "keys the agents read: post = as the model caches them (rotated by RoPE at their position), "
    "pre = un-rotated with the layer's RoPE from the trace header (position-free)",
    "ages": "age input: table = bucketed, capped at max_age; none; relative = age / (newest position + 1) "
    "through a learned projection; log = the table's log spacing without the cap (rows past the training "
    "ages stay untrained)",
    "index": "index input: table = the paper's clamped index embedding; none",
}


def add_command(commands: argparse._SubParsersAction) -> None:
    """The ``kvp-gym train`` command (registered through the ``kvp_gym.commands`` entry points)."""
    from kvp_gym.cli.options import add_out, add_trace_files

    parser = commands.add_parser(
        "train",
        help="train KVP agents with RLOO on trace files",
        description=TRAIN_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Strings, not Paths, as TrainConfig holds them (its fields are written into the checkpoint as JSON).
    add_trace_files(parser, type=str)
    parser.add_argument("--heads", default="all", help="'all' or layer:head,layer:head")
    add_out(parser, default="runs/kvp", type=str)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="smaller settings (demo: 2 CPU cores)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("traces", "heads", "out"):
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=FLAG_HELP[f.name])
            continue
        demo = f"; demo preset {PRESETS['demo'][f.name]}" if f.name in PRESETS["demo"] else ""
        extra = {"choices": CHOICES[f.name]} if f.name in CHOICES else {}
        more = f"; {FLAG_HELP[f.name]}" if f.name in FLAG_HELP else ""
        parser.add_argument(flag, type=type(f.default), default=None, help=f"default {f.default}{demo}{more}", **extra)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from kvp_gym_agents.train import train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    settings = {**PRESETS.get(args.preset or "", {}), **{k: v for k, v in values.items() if v is not None}}
    summary = train(TrainConfig(**settings))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
