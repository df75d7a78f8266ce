"""``kvp-gym leaderboard prepare|validate|build`` and ``kvp-gym submit`` (registered through the
``kvp_gym.commands`` entry points; this module imports nothing heavy until a command runs).

``leaderboard prepare`` and ``submit`` run under torchrun too (``torchrun --nproc_per_node N -m kvp_gym.cli
submit ...``): the processes split the work and process 0 writes the result and prints the verdict. For a benchmark
of several models (bench-v1), ``--model`` names one model's part: ``prepare`` does each part without it, ``submit``
needs it, ``validate`` checks each entry against its own model's part without it; trace sets and work folders hold
a folder per model.

Imports kvp_gym.cli.options (the shared options) at module level; kvp_gym.scorers, kvp_gym.storage,
kvp_gym.distributed_run and kvp_gym_leaderboard's benchmark, page, submission and site modules only when a command
runs."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvp_gym.cli.options import add_device, add_out, add_shard

if TYPE_CHECKING:
    from kvp_gym_leaderboard.definition import Benchmark

_PREPARE = """\
Collect a benchmark's trace set (or resume it) and check it against the
committed manifest: token ids and settings exactly, tensors within a tolerance
that survives another CPU. Prints one line per difference and exits with status
1 if there is any. It prints its plan first (the files, where they go, which
are already there and only checked, the expected time: about 17 minutes for
bench-v0 on 2 quiet cores, longer on a loaded machine), then "file i/N: NAME"
as it goes. --shard i/N splits the files between machines (copy the shards'
files into one folder afterwards). A benchmark of several models (bench-v1) has
a trace set per model, in DIR/MODEL: --model prepares one of them, else each in
turn (with --shard, shard i of each)."""


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``leaderboard`` and ``submit``."""
    leaderboard = commands.add_parser(
        "leaderboard", help="prepare a benchmark's trace set, validate entries, build the board"
    )
    actions = leaderboard.add_subparsers(dest="leaderboard_command", required=True, metavar="COMMAND")
    _add_prepare(actions)
    _add_validate(actions)
    _add_build(actions)
    _add_submit(commands)


def _add_prepare(actions: argparse._SubParsersAction) -> None:
    prepare = actions.add_parser(
        "prepare",
        help="collect and verify a benchmark's trace set",
        description=_PREPARE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prepare.add_argument("benchmark", help="a benchmark id (bench-v0) or the path of its .toml")
    _model_option(prepare, "prepare only this model's trace set (default: every model's)")
    prepare.add_argument(
        "--dir",
        type=Path,
        help="where the trace set goes (default: $KVP_GYM_CACHE/benchmarks/ID; a model's: DIR/MODEL)",
    )
    add_shard(prepare, help="i/N: collect only shard i's files")
    prepare.add_argument(
        "--write-manifest", action="store_true", help="maintainers: write the manifest from this set instead"
    )
    prepare.set_defaults(handler=_prepare)


def _add_validate(actions: argparse._SubParsersAction) -> None:
    validate = actions.add_parser(
        "validate",
        help="check submission entries (schema, benchmark and manifest hash, consistency, checkpoints)",
        description="Check entries; one line per problem (file, JSON path, what is wrong); exit status 1 if any.",
    )
    validate.add_argument("files", type=Path, nargs="*", help="entry files or folders (default: the board's entries)")
    validate.add_argument("--rerun", action="store_true", help="also re-evaluate each entry and compare its numbers")
    validate.add_argument("--benchmark", help="check against this benchmark (id or .toml; default: each entry's id)")
    _model_option(validate, "with --benchmark: check against this model's part only (default: each entry's model)")
    _evaluation_options(validate)
    validate.set_defaults(handler=_validate)


def _add_build(actions: argparse._SubParsersAction) -> None:
    build = actions.add_parser(
        "build",
        help="render the board: a static HTML page with its plots, and a Markdown table",
        description="Validate the entries, then write OUT/index.html (no network needed), its SVG plots and "
        "OUT/leaderboard.md. Nothing is written if an entry is invalid.",
    )
    add_out(build, required=True, help="the site folder (replaced atomically)")
    build.add_argument("--entries", type=Path, nargs="*", help="entry files or folders (default: the board's)")
    build.add_argument(
        "--from-results",
        type=Path,
        nargs="+",
        metavar="RESULTS_JSON",
        help="build from kvp-gym evaluate / evaluate-e2e results.json files instead (e.g. make demo's)",
    )
    build.set_defaults(handler=_build)


def _add_submit(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit",
        help="run a benchmark's standard evaluation of a policy and write a leaderboard entry",
        description="Run the standard evaluation (trace level on the prepared trace set, then end to end with the "
        "evicting cache) and write a valid entry. Several --policy write one entry each into --out (a folder). Under "
        "torchrun (torchrun --nproc_per_node N -m kvp_gym.cli submit ...) the processes split the work and process 0 "
        "writes the entries.",
    )
    submit.add_argument("--benchmark", default="bench-v0", help="benchmark id or .toml path (default bench-v0)")
    _model_option(submit, "the model whose part to run (needed where the benchmark covers several)")
    submit.add_argument("--policy", action="append", help="scorer spec NAME or NAME:param=value;... (repeatable)")
    submit.add_argument(
        "--policy-file",
        action="append",
        metavar="FILE.py:FACTORY",
        help="a policy without a package: FACTORY(**params) in FILE.py returns the scorer (FILE.py:FACTORY[:param="
        "value;...], repeatable; pinned by its SHA-256; validate runs the file's code)",
    )
    submit.add_argument("--checkpoint", type=Path, help="a checkpoint file for the policy (pinned by its SHA-256)")
    add_out(submit, required=True, help="the entry file (a folder with several --policy)")
    submit.add_argument("--name", help="the entry's name on the board (default: the policy spec)")
    submit.add_argument("--description", help="one or two sentences (default: the scorer's docstring)")
    submit.add_argument("--authors", default="anonymous", help="comma-separated (default anonymous)")
    submit.add_argument("--url", help="paper or code")
    submit.add_argument("--trace-level-only", action="store_true", help="skip the end-to-end part (shown as pending)")
    _evaluation_options(submit)
    submit.set_defaults(handler=_submit)


def _model_option(parser: argparse.ArgumentParser, help: str) -> None:
    """--model: one model's part of a benchmark that covers several (bench-v1)."""
    parser.add_argument("--model", help=help)


def _evaluation_options(parser: argparse.ArgumentParser) -> None:
    """The options ``validate --rerun`` and ``submit`` share: where the trace set is, the work folder, the device."""
    parser.add_argument(
        "--traces", type=Path, help="the prepared trace set, as prepare's --dir (default: $KVP_GYM_CACHE/benchmarks/ID)"
    )
    parser.add_argument(
        "--work", type=Path, default=Path("runs/submit"), help="resumable parts (a model's: WORK/MODEL)"
    )
    add_device(parser)


def _work_folder(work: Path, benchmark: Benchmark) -> Path:
    """Where a part's resumable runs go: ``work``, or ``work/MODEL`` for one model of several (an end-to-end run
    folder holds one model's parts)."""
    return work / benchmark.model if benchmark.multi_model else work


def _prepare(args: argparse.Namespace) -> int:
    from kvp_gym.distributed_run import join
    from kvp_gym_leaderboard.benchmark import benchmark_parts, load_benchmark, prepare

    parts = [load_benchmark(args.benchmark, args.model)] if args.model else benchmark_parts(args.benchmark)
    processes = join()  # under torchrun every process returns the same verdict: process 0 alone prints it
    status = 0
    for benchmark in parts:
        folder = benchmark.trace_folder(args.dir)
        problems = prepare(benchmark, folder, shard=args.shard, write_manifest=args.write_manifest, processes=processes)
        status = max(status, 1 if problems else 0)
        if not processes.writes_result:
            continue
        for problem in problems:
            print(f"{benchmark.label}: {problem}", file=sys.stderr)
        if problems:
            print(f"{benchmark.label}: {len(problems)} differences from the manifest in {folder}", file=sys.stderr)
            continue
        what = "manifest written to " + str(benchmark.manifest_path) if args.write_manifest else "matches its manifest"
        print(f"{benchmark.label}: trace set in {folder} {what}")
    if not processes.writes_result:
        print(processes.leaves_result_to_process_0())
    return status


def _entry_files(given: list[Path] | None) -> list[Path]:
    from kvp_gym_leaderboard.submission import ENTRIES

    files = []
    for path in given or [ENTRIES]:  # a folder's subfolders too: bench-v1's entries lie in entries/bench-v1/MODEL/
        files += sorted(path.rglob("*.json")) if path.is_dir() else [path]
    return files


def _validate_installed_boards(files: list[Path]) -> tuple[list[Path], list[str]]:
    """Validate ``files`` board by board (an entry's benchmark and model): (the files of every board validated, their
    problems). Validating an entry loads its model's tokenizer, so a board whose model is not installed here is left
    out, named on stderr with how to install its model."""
    from kvp_gym.models import ModelNotFoundError
    from kvp_gym_leaderboard.submission import validate

    boards: dict[Any, list[Path]] = {}
    for file in files:
        try:
            named = json.loads(file.read_text())["benchmark"]
            board = (named.get("id"), named.get("model"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            board = None  # validate names what is wrong with the file
        boards.setdefault(board, []).append(file)
    kept, problems = [], []
    for board, group in boards.items():
        try:
            problems += validate(group)
        except ModelNotFoundError as err:
            print(f"left out the {' '.join(filter(None, board))} board: {err}", file=sys.stderr)
            continue
        kept += group
    return kept, problems


def _validate(args: argparse.Namespace) -> int:
    from kvp_gym_leaderboard.benchmark import benchmark_parts, load_benchmark
    from kvp_gym_leaderboard.submission import rerun, validate

    if args.model and not args.benchmark:
        raise ValueError("--model names a part of the benchmark given with --benchmark")
    files = _entry_files(args.files)
    given = None
    if args.benchmark:
        given = [load_benchmark(args.benchmark, args.model)] if args.model else benchmark_parts(args.benchmark)
    problems = validate(files, given)
    if args.rerun and not problems:
        for file in files:
            named = json.loads(file.read_text())["benchmark"]  # valid: its benchmark and model are known
            benchmark = load_benchmark(given[0].path if given else named["id"], named.get("model"))
            traces = benchmark.trace_folder(args.traces)
            work = _work_folder(args.work, benchmark) / file.stem
            problems += rerun(file, benchmark, traces, work, device=args.device)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {len(files)} file(s)", file=sys.stderr)
        return 1
    print(
        f"{len(files)} entr{'y' if len(files) == 1 else 'ies'} valid" + (", numbers reproduced" if args.rerun else "")
    )
    return 0


def _build(args: argparse.Namespace) -> int:
    from kvp_gym_leaderboard.page import build_site
    from kvp_gym_leaderboard.site import entries_from_results
    from kvp_gym_leaderboard.submission import read_entry

    if args.from_results:
        entries, title = entries_from_results(args.from_results)
    else:
        files, problems = _validate_installed_boards(_entry_files(args.entries))
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(f"{len(problems)} problem(s): nothing written to {args.out}", file=sys.stderr)
            return 1
        entries, title = [read_entry(f) for f in files], None  # checkpoints and policy files resolved
    written = build_site(entries, args.out, title=title)
    print(f"wrote {written} ({len(entries)} entries) and {args.out / 'leaderboard.md'}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from kvp_gym.distributed_run import join
    from kvp_gym.scorers import file_spec, parse_file_spec
    from kvp_gym.storage import atomic_path
    from kvp_gym_leaderboard.benchmark import load_benchmark
    from kvp_gym_leaderboard.submission import PINNED, standard_evaluation, validate

    policies = list(args.policy or [])
    for given in args.policy_file or []:
        source = parse_file_spec(f"file:{given}")  # ValueError showing the form
        if not source.path.is_file():
            raise FileNotFoundError(f"--policy-file {given}: no such file {source.path}")
        policies.append(file_spec(source.path.resolve(), source.factory, source.parameters))
    if not policies:
        raise ValueError(
            "give the policy to evaluate: --policy NAME[:param=value;...] or --policy-file FILE.py:FACTORY"
        )
    if len(policies) > 1 and args.name:
        raise ValueError("--name names one entry: give one --policy or --policy-file with it")
    if args.checkpoint is not None and not args.checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
    benchmark = load_benchmark(args.benchmark, args.model)
    traces = benchmark.trace_folder(args.traces)
    processes = join()  # under torchrun: this process's share of both evaluations; process 0 writes the entries
    entries = standard_evaluation(
        benchmark,
        policies,
        traces,
        _work_folder(args.work, benchmark),
        checkpoint=args.checkpoint.resolve() if args.checkpoint else None,
        end_to_end=not args.trace_level_only,
        device=args.device,
        processes=processes,
    )
    if entries is None:
        print(processes.leaves_result_to_process_0())
        return 0
    several = len(entries) > 1
    for spec, entry in entries.items():
        name = args.name or _default_name(spec)
        entry = {
            "name": name,
            "description": args.description or _default_description(entry["load"]),
            "authors": [a.strip() for a in args.authors.split(",") if a.strip()],
            **({"url": args.url} if args.url else {}),
            **entry,
        }
        out = args.out / f"{name.replace(':', '_').replace(';', '_').replace('=', '-')}.json" if several else args.out
        for pinned in PINNED:  # stored relative to the entry, so that the files can move together
            if pinned in entry["load"]:
                entry["load"][pinned]["path"] = os.path.relpath(entry["load"][pinned]["path"], out.parent.resolve())
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(entry, indent=1) + "\n")
            problems = validate([tmp], benchmark)
            if problems:  # a bug of ours, not the user's: keep nothing
                problems = [p.replace(str(tmp), str(out)) for p in problems]
                raise ValueError(f"{out}: the entry written is not valid:\n" + "\n".join(problems))
        print(f"wrote {out}: holistic score {entry['results']['trace_level']['holistic_score']['mean']:.3f}")
    return 0


def _default_name(spec: str) -> str:
    """An entry's name when none is given: the policy spec, or for a policy file its file name without ``.py``
    (characters a name cannot hold become ``-``; it starts with a letter or digit)."""
    from kvp_gym.scorers import FILE_PREFIX, parse_file_spec

    if not spec.startswith(FILE_PREFIX):
        return spec
    return re.sub(r"[^A-Za-z0-9_.:=,+-]", "-", parse_file_spec(spec).path.stem).lstrip("_.:=,+-")[:80] or "policy"


def _default_description(load: dict[str, Any]) -> str:
    """An entry's description when none is given: the first paragraph (500 characters at most) of the docstring of
    the scorer's module (the method and its paper) or of the policy file (read, not run)."""
    from kvp_gym.scorers import get_scorer

    source = load.get("policy_file")
    if source is not None:
        doc = ast.get_docstring(ast.parse(Path(source["path"]).read_text()))
    else:
        doc = sys.modules[type(get_scorer(load["scorer"])).__module__].__doc__
    return " ".join((doc or load["scorer"]).strip().split("\n\n")[0].split())[:500]
