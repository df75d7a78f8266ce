"""``kvp-gym tasks list|eval``: list the tasks, or measure a model's full-cache accuracy on them.

Imports kvp_gym.cli.options at module level; kvp_gym.tasks, kvp_gym.models, kvp_gym.generation and kvp_gym.storage
only when a command runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvp_gym.cli.options import add_model, add_out, add_seed, int_list, positive_int


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``tasks`` and its actions."""
    tasks = commands.add_parser("tasks", help="list the tasks, or measure a model's full-cache accuracy on them")
    tasks.set_defaults(handler=_tasks)
    actions = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="list the tasks")
    accuracy = actions.add_parser("eval", help="full-cache accuracy (perplexity for free text)")
    add_model(accuracy)
    accuracy.add_argument("--tasks", default="all", help="'all' or comma-separated task names")
    accuracy.add_argument("--context", type=int_list, default=(1024,), help="context lengths, e.g. 1024,2048")
    accuracy.add_argument("--samples", type=positive_int, default=8, help="samples per task and context (default 8)")
    add_seed(accuracy)
    add_out(
        accuracy,
        help="also write the results as JSON here, after each task and context; rerunning with the same "
        "file skips the rows it holds (same model, samples and seed), so a stopped run resumes and rows can be added",
    )


def _tasks(args: argparse.Namespace) -> int:
    from kvp_gym.tasks import TASKS, get_task

    if args.tasks_command == "list":
        width = max(map(len, TASKS))
        for name, task in TASKS.items():
            print(f"{name:{width}s}  {task.description}")
        return 0
    from dataclasses import asdict

    from kvp_gym import models
    from kvp_gym.generation import task_accuracy

    names = list(TASKS) if args.tasks == "all" else args.tasks.split(",")
    selected = [get_task(n) for n in names]
    settings = {"model": args.model, "samples": args.samples, "seed": args.seed}
    done = _finished_rows(args.out, settings) if args.out else {}
    model, tokenizer = models.load(args.model)
    results = list(done.values())
    print("| task | context | samples | prompt tokens | full-cache score | perplexity |")
    print("|---|---|---|---|---|---|")
    for task in selected:
        for context in args.context:
            row = done.get((task.name, context))
            if row is None:  # not in --out yet: measure it, and write --out at once (a stopped run resumes here)
                row = asdict(task_accuracy(model, tokenizer, task, context, args.samples, seed=args.seed))
                results.append(row)
                if args.out:
                    _write_rows(args.out, settings, results)
            score = "-" if row["score"] is None else f"{row['score']:.2f}"
            ppl = "-" if row["perplexity"] is None else f"{row['perplexity']:.1f}"
            print(
                f"| {row['task']} | {context} | {row['samples']} | {row['prompt_tokens']:.0f} | {score} | {ppl} |",
                flush=True,
            )
    return 0


def _finished_rows(out: Path, settings: dict) -> dict[tuple[str, int], dict]:
    """The (task, context) rows already in ``out`` (a stopped or earlier run with the same model, samples and seed;
    more tasks or contexts may be added), or none when it does not exist."""
    if not out.exists():
        return {}
    try:
        found = json.loads(out.read_text())
        rows = {(row["task"], int(row["context"])): row for row in found["results"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{out}: not a tasks eval result ({err}); move it away or choose another --out") from None
    mismatch = [f"{k} {found[k]!r} there, {v!r} asked" for k, v in settings.items() if k in found and found[k] != v]
    mismatch += [  # files written before the settings were recorded: each row's sample count
        f"{task}@{context} has {row['samples']} samples, {settings['samples']} asked"
        for (task, context), row in rows.items()
        if row["samples"] != settings["samples"]
    ]
    if mismatch:
        raise FileExistsError(f"{out} holds results of other settings ({mismatch[0]}); choose another --out")
    return rows


def _write_rows(out: Path, settings: dict, results: list[dict]) -> None:
    from kvp_gym.storage import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps({**settings, "results": results}, indent=2))
