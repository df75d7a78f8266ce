"""``kvp-gym collect``: record a model's post-RoPE q/k/v on a task into a trace file.

Under torchrun (``torchrun --nproc_per_node N -m kvp_gym.cli collect ...``) the processes split the samples and
process 0 writes the file (kvp_gym.distributed_run).

Imports kvp_gym.cli.options at module level; kvp_gym.collect and kvp_gym.distributed_run only when the command
runs."""

from __future__ import annotations

import argparse

from kvp_gym.cli.options import (
    add_model,
    add_out,
    add_seed,
    add_shard,
    add_text_pool,
    float_list,
    layer_ids_or_global,
    positive_int,
)


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``collect``."""
    collect = commands.add_parser(
        "collect",
        help="record post-RoPE q/k/v traces of a model on a task",
        description="Build task prompts, continue each greedily, record q/k/v of every "
        "chosen layer into an HDF5 trace file (docs/trace-format.md).",
    )
    add_model(collect, help="smollm2-135m, tiny-random, a folder or a hub id")
    collect.add_argument("--task", default="niah_single", help="a task name (kvp-gym tasks list)")
    collect.add_argument("--samples", type=positive_int, default=32, help="number of samples (default 32)")
    collect.add_argument("--context", type=positive_int, default=1024, help="prompt length in tokens (default 1024)")
    collect.add_argument("--future", type=positive_int, default=64, help="greedy continuation tokens (default 64)")
    add_out(collect, required=True, help="the trace file to write")
    add_seed(collect)
    collect.add_argument(
        "--layers",
        type=layer_ids_or_global,
        default=None,
        help="layers to record, e.g. 0-29, or 'global': a hybrid model's full-attention layers (default all)",
    )
    collect.add_argument("--splits", type=float_list, default=(0.7, 0.15, 0.15), help="train,val,test fractions")
    add_text_pool(
        collect,
        default="all",
        help="essays and words to draw from: all (default), or train / heldout, which are disjoint (training vs "
        "held-out sets); val and test halve heldout (validation vs final test sets)",
    )
    add_shard(collect, help="collect every N-th sample from i: i/N (under torchrun, split between the processes)")
    collect.add_argument(
        "--allow-download",
        action="store_true",
        help="let the Hugging Face hub client download a model that is not cached (off: kvp-gym works offline)",
    )
    state = collect.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="keep the samples already written and add the rest")
    state.add_argument("--overwrite", action="store_true", help="discard an existing file or interrupted run")
    collect.set_defaults(handler=_collect)


def _collect(args: argparse.Namespace) -> int:
    from kvp_gym.collect import CollectConfig, collect
    from kvp_gym.distributed_run import join

    processes = join()  # under torchrun: this process's share; process 0 assembles the file

    config = CollectConfig(
        model=args.model,
        task=args.task,
        samples=args.samples,
        context=args.context,
        future=args.future,
        seed=args.seed,
        layers=args.layers,
        splits=args.splits,
        text=args.text,
    )
    summary = collect(
        config,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        shard=args.shard,
        allow_download=args.allow_download,
        processes=processes,
    )
    print(summary if summary is not None else processes.leaves_result_to_process_0())
    return 0
