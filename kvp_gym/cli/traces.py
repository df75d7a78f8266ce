"""``kvp-gym traces info|check|merge|upgrade|default``: inspect, verify, join and rewrite trace files, and fetch the
default trace set; ``describe`` is the summary ``info`` prints.

Imports kvp_gym.cli.options at module level; kvp_gym.traces and kvp_gym.envs.evict only when a command runs."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from kvp_gym.cli.options import add_merge_arguments, add_model

if TYPE_CHECKING:
    from kvp_gym.traces import TraceFile


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``traces`` and its actions."""
    traces = commands.add_parser("traces", help="inspect, verify, merge and upgrade trace files")
    traces.set_defaults(handler=_traces)
    actions = traces.add_subparsers(dest="traces_command", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="print a summary of a trace file (metadata verified, not tensors)")
    info.add_argument("path", type=Path)
    check = actions.add_parser(
        "check",
        help="verify the whole file: seal, metadata, every tensor's checksum and values; report every problem",
    )
    check.add_argument("path", type=Path)
    merge = actions.add_parser("merge", help="join trace files (e.g. shards) into one")
    add_merge_arguments(merge)
    upgrade = actions.add_parser(
        "upgrade", help="rewrite a trace file in the current format (version 1 -> 2: adds checksums)"
    )
    upgrade.add_argument("input", type=Path)
    upgrade.add_argument("out", type=Path, help="the new file (may be the input itself: it is replaced atomically)")
    default = actions.add_parser(
        "default",
        help="the default trace set (shared by the no-config environments and `make demo`): collect it if missing, "
        "print its files",
    )
    add_model(default)
    default.add_argument(
        "--link", type=Path, help="also make this path a symbolic link to the set's folder (e.g. traces/demo)"
    )


def _traces(args: argparse.Namespace) -> int:
    from kvp_gym.traces import merge_traces, open_traces

    if args.traces_command == "default":
        return _default_traces(args)
    if args.traces_command in ("merge", "upgrade"):
        inputs = args.inputs if args.traces_command == "merge" else [args.input]
        merge_traces(args.out, inputs)
        args.path = args.out
        what = f"merged {len(inputs)} files into" if args.traces_command == "merge" else f"rewrote {args.input} as"
        print(f"{what} {args.out}")
        args.traces_command = "info"
    with open_traces(args.path) as trace:
        if args.traces_command == "info":
            print(describe(trace))
            return 0
        problems = list(trace.check())
        for problem in problems:
            print(problem)
        print(
            f"{trace.path}: {len(trace.samples)} samples, "
            + (
                f"{len(problems)} problem(s)"
                if problems
                else "OK: " + ("sealed content verified, " if trace.sealed else "") + "every tensor read and valid"
            )
        )
        return 1 if problems else 0


def _default_traces(args: argparse.Namespace) -> int:
    from kvp_gym.envs.evict import default_trace_folder, default_traces

    paths = default_traces(args.model)
    folder = default_trace_folder(args.model)
    link = args.link
    if link and not (link.is_symlink() and link.resolve() == folder.resolve()):
        if link.exists() or link.is_symlink():
            raise FileExistsError(
                f"{link} exists and is not a link to the default trace set {folder}: move it away (its files, if "
                f"collected with the same settings, can go into {folder})"
            )
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(folder.resolve(), target_is_directory=True)
    for path in paths:
        print(path if not args.link else args.link / path.name)
    return 0


def describe(trace: TraceFile) -> str:
    """A human-readable summary of an open trace file."""
    header, samples = trace.header, list(trace.samples.values())
    g = header.geometry
    splits = Counter(s.split for s in samples)
    tasks = Counter(s.task for s in samples)
    prompts = [s.prompt_length for s in samples] or [0]
    futures = [s.num_tokens - s.prompt_length for s in samples] or [0]
    lines = [
        f"{trace.path}",
        f"  format v{header.format_version} "
        + ("(sealed: metadata verified, tensors checksummed)" if trace.sealed else "(no checksums: `traces upgrade`)")
        + f", written by kvp-gym {header.kvp_gym_version}, model {header.model}",
        f"  geometry: {g.num_layers} layers ({len(header.layers)} recorded), {g.num_query_heads} query heads, "
        f"{g.num_kv_heads} KV heads (GQA {g.num_query_heads // g.num_kv_heads}:1), head_dim {g.head_dim}",
        f"  samples: {len(samples)} (" + ", ".join(f"{k} {splits[k]}" for k in ("train", "val", "test")) + "); "
        "tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(tasks.items())),
        f"  prompt tokens: mean {sum(prompts) / len(prompts):.0f}, min {min(prompts)}, max {max(prompts)}; "
        f"future tokens: mean {sum(futures) / len(futures):.1f}, min {min(futures)}, max {max(futures)}",
        f"  size: {trace.path.stat().st_size / 2**20:.1f} MiB",
    ]
    scores = [s.metadata["full_cache_score"] for s in samples if "full_cache_score" in s.metadata]
    if scores:
        lines.append(f"  full-cache task score of the recorded continuations: {sum(scores) / len(scores):.3f}")
    for settings in header.collection:
        lines.append("  collection: " + " ".join(f"{k}={v}" for k, v in settings.items() if k != "layers"))
    return "\n".join(lines)
