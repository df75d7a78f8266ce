"""``kvp-gym tasks list|eval``: list the tasks, or measure a model's full-cache accuracy on them.

Imports kvp_gym.cli.options at module level; kvp_gym.tasks, kvp_gym.models, kvp_gym.generation and kvp_gym.storage
only when a command runs."""

from __future__ import annotations

import argparse
import json

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
    add_out(accuracy, help="also write the results as JSON here")


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
    model, tokenizer = models.load(args.model)
    results = []
    print("| task | context | samples | prompt tokens | full-cache score | perplexity |")
    print("|---|---|---|---|---|---|")
    for task in selected:
        for context in args.context:
            r = task_accuracy(model, tokenizer, task, context, args.samples, seed=args.seed)
            results.append(asdict(r))
            score = "-" if r.score is None else f"{r.score:.2f}"
            ppl = "-" if r.perplexity is None else f"{r.perplexity:.1f}"
            print(
                f"| {r.task} | {context} | {r.samples} | {r.prompt_tokens:.0f} | {score} | {ppl} |",
                flush=True,
            )
    if args.out:
        from kvp_gym.storage import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps({"model": args.model, "results": results}, indent=2))
    return 0
