"""``kvp-gym evaluate-e2e`` (task accuracy and perplexity with an evicting cache, per policy and budget) and
``kvp-gym evaluate-e2e-merge`` (join sharded runs) and ``kvp-gym evaluate-e2e-versus`` (one policy against the others,
paired).

Imports kvp_gym.cli.options at module level; kvp_gym.evaluation.end_to_end and kvp_gym.distributed_run only when a
command runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvp_gym.cli.options import (
    add_bootstrap,
    add_device,
    add_merge_arguments,
    add_model,
    add_out,
    add_policies,
    add_seed,
    add_shard,
    add_text_pool,
    int_list,
    non_negative_int,
    positive_int,
)


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``evaluate-e2e``."""
    e2e = commands.add_parser(
        "evaluate-e2e",
        help="task accuracy and perplexity with an evicting cache, per policy and budget",
        description="Prefill each sample once, decode with the full cache, then with every policy at every budget; "
        "write DIR/results.json, plots and a table. Resumable (finished samples are kept in DIR/parts); --shard i/N "
        "splits the samples between machines, joined by `kvp-gym evaluate-e2e-merge`; under torchrun the processes "
        "split them (one GPU each with --device auto) and process 0 writes the summary.",
    )
    add_model(e2e)
    e2e.add_argument("--tasks", default="niah_single,niah_multikey", help="comma-separated task names")
    e2e.add_argument("--context", type=positive_int, default=1024, help="prompt tokens (default 1024)")
    e2e.add_argument("--budgets", type=int_list, default=(64, 128, 256), help="tokens per KV head (default 64,128,256)")
    add_policies(e2e, help="'all' or comma-separated scorer specs")
    e2e.add_argument("--samples", type=non_negative_int, default=40, help="samples per task (default 40)")
    e2e.add_argument("--essays", type=non_negative_int, default=8, help="held-out essays for perplexity (default 8)")
    e2e.add_argument("--continuation", type=positive_int, default=64, help="essay tokens scored for perplexity")
    add_text_pool(e2e, default="heldout", help="text pool: heldout (default), train, val, test or all")
    e2e.add_argument(
        "--prefill-chunk",
        type=positive_int,
        metavar="C",
        help="also evaluate each policy through a chunked prefill (a variant): the cache is cut back to the budget "
        "after every C prompt tokens, rows labelled '(chunked prefill)'; h2o, expected_attention and the oracle "
        "cannot be chunked",
    )
    add_seed(e2e, type=int)  # unlike the other commands' --seed, any integer (kept as it was)
    add_out(e2e, required=True)
    add_shard(e2e, help="i/N: evaluate samples i, i+N, ... (default 0/1)")
    add_device(e2e)
    e2e.set_defaults(handler=_evaluate_e2e)


def add_merge_command(commands: argparse._SubParsersAction) -> None:
    """Register ``evaluate-e2e-merge``."""
    merge = commands.add_parser(
        "evaluate-e2e-merge", help="join the folders of sharded evaluate-e2e runs and write the summary"
    )
    add_merge_arguments(merge)
    merge.set_defaults(handler=_merge_e2e)


def add_versus_command(commands: argparse._SubParsersAction) -> None:
    """Register ``evaluate-e2e-versus``."""
    versus = commands.add_parser(
        "evaluate-e2e-versus",
        help="an end-to-end run's paired comparison: one policy's accuracy and perplexity against every other's",
        description="Read a finished evaluate-e2e run and print, per task and budget, every policy's accuracy and "
        "the VERSUS policy's paired difference against it (95%% bootstrap interval over the same prompts), and for "
        "the essays every policy's perplexity and the paired ratio VERSUS / it. VERSUS may be full_cache.",
    )
    versus.add_argument("run", type=Path, help="an evaluate-e2e output folder (every sample evaluated)")
    versus.add_argument("--versus", default="kvp", help="the policy to compare (a label of the run, or full_cache)")
    add_bootstrap(versus, help="bootstrap resamples (default 1000)")
    add_seed(versus, help="bootstrap seed (default 0)")
    add_out(versus, help="also write the tables to this Markdown file")
    versus.set_defaults(handler=_e2e_versus)


def _evaluate_e2e(args: argparse.Namespace) -> int:
    from kvp_gym.distributed_run import join
    from kvp_gym.evaluation.end_to_end import E2EConfig, run
    from kvp_gym.evaluation.report import end_to_end_table

    processes = join()  # under torchrun: this process's share; process 0 writes the summary

    config = E2EConfig(
        model=args.model,
        tasks=tuple(t for t in args.tasks.split(",") if t),
        context=args.context,
        budgets=tuple(args.budgets),
        policies="all" if args.policies == "all" else tuple(args.policies.split(",")),
        samples=args.samples,
        essays=args.essays,
        continuation=args.continuation,
        seed=args.seed,
        text=args.text,
        prefill_chunk=args.prefill_chunk,
    )
    record = run(config, args.out, shard=args.shard, device=args.device, processes=processes)
    if record is None and not processes.writes_result:
        print(processes.leaves_result_to_process_0())
        return 0
    if record is None:
        print(
            f"shard {args.shard[0]}/{args.shard[1]} done in {args.out}; join the shards with kvp-gym evaluate-e2e-merge"
        )
        return 0
    print(end_to_end_table(record))
    if args.prefill_chunk:
        print(
            f"'(chunked prefill)': a variant of ours, the cache cut back to each budget after every "
            f"{args.prefill_chunk} prompt tokens (query-window scorers read that chunk's last queries); it has no "
            "holistic score or needle retention (it ranks no whole prompt)"
        )
    for label, reason in record["skipped"].items():
        print(f"skipped {label}: {reason}")
    print(f"wrote {args.out / 'results.json'} and plots")
    return 0


def _merge_e2e(args: argparse.Namespace) -> int:
    from kvp_gym.evaluation.end_to_end import merge
    from kvp_gym.evaluation.report import end_to_end_table

    print(end_to_end_table(merge(args.out, args.inputs)))
    return 0


def _e2e_versus(args: argparse.Namespace) -> int:
    from kvp_gym.evaluation.comparison import end_to_end_versus_table
    from kvp_gym.evaluation.end_to_end import read_parts
    from kvp_gym.storage import atomic_path

    table = end_to_end_versus_table(read_parts(args.run), args.versus, resamples=args.bootstrap, seed=args.seed)
    print(table)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table + "\n")
    return 0
