"""``kvp-gym evaluate`` (score eviction policies on a trace split) and ``kvp-gym evaluate-table`` (one Markdown row
per evaluation run).

Under torchrun (``torchrun --nproc_per_node N -m kvp_gym.cli evaluate ...``) the processes split the (sample, layer)
pairs and process 0 writes the result and prints the table (kvp_gym.distributed_run).

Imports kvp_gym.cli.options at module level (and reads the kvp_gym.scorers entry points' names for the help);
kvp_gym.evaluation, kvp_gym.distributed_run and kvp_gym.storage only when a command runs."""

from __future__ import annotations

import argparse
import json
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

from kvp_gym.cli.options import (
    add_bootstrap,
    add_out,
    add_policies,
    add_seed,
    add_trace_files,
    comma_list,
    int_list,
    layer_ids,
    positive_int,
)

# The rest of `kvp-gym evaluate --help`'s description, printed as written: lines under 80 characters, so that
# neither argparse nor the terminal wraps a spec mid-word.
_EVALUATE_EXAMPLES = """\
examples:
  kvp-gym evaluate --traces traces/demo/*.h5 --policies all --split all \\
      --out runs/eval
  kvp-gym evaluate --traces traces/demo/*.h5 --out runs/eval2 --versus tova \\
      --policies "tova,snapkv:window=32,h2o:recent=16"
  kvp-gym evaluate --traces traces/demo/*.h5 --out runs/eval3 \\
      --add-to runs/eval --versus kvp \\
      --policies kvp:checkpoint=runs/kvp/agents.safetensors"""


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``evaluate``."""
    evaluate = commands.add_parser(
        "evaluate",
        help="score eviction policies on a trace split (holistic score, retained attention, plots)",
        description="Run every policy on every (sample, layer, KV head) of a split at the prompt\n"
        "boundary; write DIR/results.json and PNG plots; print a table. Under torchrun\n"
        "(torchrun --nproc_per_node N -m kvp_gym.cli evaluate ...) the processes split\n"
        "the (sample, layer) pairs; process 0 writes the one result.\n\n"
        "registered policies (kvp_gym.scorers entry points; packages can add more):\n"
        + textwrap.fill(", ".join(_registered_scorers()), 76, initial_indent="  ", subsequent_indent="  ")
        + "\n\n"
        + _EVALUATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_trace_files(evaluate, help="trace files of one model")
    add_policies(
        evaluate,
        help="'all' (every registered scorer with its defaults, plus the variants it declares) or comma-separated "
        "scorer specs, each NAME or NAME:param=value;param=value (the names and examples are listed above)",
    )
    evaluate.add_argument("--split", default="test", help="train, val, test or all (default test)")
    add_out(evaluate, required=True, help="folder for results.json and the plots")
    add_seed(evaluate, help="bootstrap seed")
    add_bootstrap(evaluate, help="bootstrap resamples for the intervals (default 1000)")
    evaluate.add_argument(
        "--protocol",
        default="paper",
        choices=("paper", "raw"),
        help="paper (default): 4 sink + 16 recent prompt tokens kept for every method, the score measures the "
        "ranking of the rest; raw: nothing protected, the whole ranking is scored (the training signal)",
    )
    evaluate.add_argument(
        "--versus",
        metavar="POLICY",
        help="paired comparisons of POLICY (a label among --policies) with every other policy: mean difference with "
        "a 95%% paired bootstrap interval, and the share of heads won",
    )
    evaluate.add_argument(
        "--layers", type=layer_ids, help="evaluate only these layers, e.g. 10 or 0-3,10 (default all)"
    )
    evaluate.add_argument("--heads", type=int_list, help="evaluate only these KV heads, e.g. 0,1 (default all)")
    evaluate.add_argument(
        "--max-samples", type=positive_int, help="evaluate only the first N samples of the split (default all)"
    )
    evaluate.add_argument(
        "--add-to",
        type=Path,
        help="an earlier run (folder or results.json) on the same traces, split, protocol and seed: evaluate only "
        "--policies and write them together with its policies (baselines once, new agents against them later)",
    )
    evaluate.set_defaults(handler=_evaluate)


def _registered_scorers() -> list[str]:
    """The names of the ``kvp_gym.scorers`` entry points, from the installed packages' metadata (imports none of
    them: building the parser stays fast). The group's name is kvp_gym.scorers.ENTRY_POINT_GROUP, not imported
    here because that module imports torch."""
    return sorted({point.name for point in entry_points(group="kvp_gym.scorers")})


def add_table_command(commands: argparse._SubParsersAction) -> None:
    """Register ``evaluate-table``."""
    table = commands.add_parser(
        "evaluate-table",
        help="one Markdown row per evaluation (e.g. per prompt length): a policy against the attention-free and the "
        "best query-using policies, paired",
        description="Summarise several `kvp-gym evaluate` runs of the same policies, one row each: the VERSUS policy's "
        "score, the attention-free policy it beats on the fewest heads, and the paired difference (95%% bootstrap "
        "interval) against the best query-using policy.",
    )
    table.add_argument("runs", type=Path, nargs="+", help="evaluate output folders (or their results.json)")
    table.add_argument("--versus", default="kvp", help="the policy to compare (a label in every run; default kvp)")
    table.add_argument("--labels", type=comma_list, help="row labels (default: the folder names)")
    table.add_argument(
        "--every-policy",
        action="store_true",
        help="one row per policy and one column per run instead: each policy's score and the VERSUS policy's paired "
        "difference against it (95%% interval, share of heads won)",
    )
    add_bootstrap(table, help="bootstrap resamples (default 1000)")
    add_out(table, help="also write the table to this Markdown file")
    table.set_defaults(handler=_evaluate_table)


def _evaluate(args: argparse.Namespace) -> int:
    from kvp_gym.distributed_run import join
    from kvp_gym.evaluation.report import trace_level_table
    from kvp_gym.evaluation.trace_level import evaluate, merge_results, write_results

    processes = join()  # under torchrun: this process's share; process 0 writes the result
    policies = "all" if args.policies == "all" else args.policies.split(",")
    base = _read_results(args.add_to) if args.add_to else None
    record = evaluate(
        args.traces,
        policies,
        split=args.split,
        seed=args.seed,
        bootstrap=args.bootstrap,
        protocol=args.protocol,
        versus=None if base else args.versus,
        layers=args.layers,
        heads=args.heads,
        max_samples=args.max_samples,
        processes=processes,
    )
    if record is None:
        print(processes.leaves_result_to_process_0())
        return 0
    if base:
        record = merge_results(base, record, args.versus)
    written = write_results(record, args.out)
    print(trace_level_table(record))
    for name, reason in record["skipped"].items():
        print(f"skipped {name}: {reason}")
    timing = record["timing"]
    print(
        f"{timing['total_seconds']:.1f} s in all; attention-based scorers {timing['attention_scorer_seconds']:.1f} s, "
        f"future importance {timing['importance_seconds']:.1f} s"
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _read_results(run: Path) -> dict:
    """The record of a `kvp-gym evaluate` run (its folder or its results.json)."""
    path = run / "results.json" if run.is_dir() else run
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    if not isinstance(record, dict) or record.get("schema") != "kvp-gym/trace-evaluation":
        raise ValueError(f"{path}: not a results.json of kvp-gym evaluate (schema kvp-gym/trace-evaluation)")
    return record


def _evaluate_table(args: argparse.Namespace) -> int:
    from kvp_gym.evaluation.comparison import policies_table, versus_table
    from kvp_gym.storage import atomic_path

    labels = args.labels or [(run if run.is_dir() else run.parent).name for run in args.runs]
    if len(labels) != len(args.runs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    records = {label: _read_results(run) for label, run in zip(labels, args.runs, strict=True)}
    table = (policies_table if args.every_policy else versus_table)(records, args.versus, resamples=args.bootstrap)
    print(table)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table + "\n")
    return 0
