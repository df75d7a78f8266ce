"""The ``kvp-gym`` command line. ``kvp-gym --help`` lists the commands; each has its own ``--help``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from importlib.metadata import entry_points
from pathlib import Path

from kvp_gym.version import __version__

_EXAMPLES = """examples:
  kvp-gym collect --model smollm2-135m --task niah_single --samples 32 --context 1024 --future 64 --out traces/niah.h5
  kvp-gym traces info traces/niah.h5
  kvp-gym evaluate --traces traces/demo/niah_single.h5 --policies all --split test --out runs/eval
  kvp-gym tasks eval --tasks niah_single,essay --context 1024 --samples 8
  kvp-gym generate --model smollm2-135m --policy kvp --budget 128 --prompt-file prompt.txt --chat
  kvp-gym evaluate-e2e --tasks niah_single,niah_multikey --budgets 64,128,256 --samples 40 --out runs/e2e
"""


def _layers(text: str) -> tuple[int, ...]:
    """'0-29' or '0,3,10-12' -> layer ids."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            layers += range(int(low), int(high or low) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers like '0-29' or '0,3,10-12', got {text!r}") from None
    return tuple(layers)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shard as i/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard i/N needs 0 <= i < N, got {text!r}")
    return index, count


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _budget(text: str) -> int | float:
    """'128' (tokens) or '0.25' (a fraction of the prompt)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or a fraction, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvp-gym",
        description="Trace collection, environments and benchmarks for KV-cache eviction.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvp-gym {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    collect = commands.add_parser(
        "collect",
        help="record post-RoPE q/k/v traces of a model on a task",
        description="Build task prompts, continue each greedily, record q/k/v of every "
        "chosen layer into an HDF5 trace file (docs/trace-format.md).",
    )
    collect.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-random, a folder or a hub id")
    collect.add_argument("--task", default="niah_single", help="a task name (kvp-gym tasks list)")
    collect.add_argument("--samples", type=_positive, default=32, help="number of samples (default 32)")
    collect.add_argument("--context", type=_positive, default=1024, help="prompt length in tokens (default 1024)")
    collect.add_argument("--future", type=_positive, default=64, help="greedy continuation tokens (default 64)")
    collect.add_argument("--out", type=Path, required=True, help="the trace file to write")
    collect.add_argument("--seed", type=_non_negative, default=0)
    collect.add_argument("--layers", type=_layers, default=None, help="layers to record, e.g. 0-29 (default all)")
    collect.add_argument("--splits", type=_floats, default=(0.7, 0.15, 0.15), help="train,val,test fractions")
    collect.add_argument(
        "--text",
        default="all",
        help="essays and words to draw from: all (default), or train / heldout, which are disjoint (training vs "
        "held-out sets); val and test halve heldout (validation vs final test sets)",
    )
    collect.add_argument("--shard", type=parse_shard, default=(0, 1), help="collect every N-th sample from i: i/N")
    collect.add_argument(
        "--allow-download",
        action="store_true",
        help="let the Hugging Face hub client download a model that is not cached (off: kvp-gym works offline)",
    )
    state = collect.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="keep the samples already written and add the rest")
    state.add_argument("--overwrite", action="store_true", help="discard an existing file or interrupted run")

    traces = commands.add_parser("traces", help="inspect, verify, merge and upgrade trace files")
    traces_commands = traces.add_subparsers(dest="traces_command", required=True, metavar="ACTION")
    info = traces_commands.add_parser("info", help="print a summary of a trace file (metadata verified, not tensors)")
    info.add_argument("path", type=Path)
    check = traces_commands.add_parser(
        "check",
        help="verify the whole file: seal, metadata, every tensor's checksum and values; report every problem",
    )
    check.add_argument("path", type=Path)
    merge = traces_commands.add_parser("merge", help="join trace files (e.g. shards) into one")
    merge.add_argument("out", type=Path)
    merge.add_argument("inputs", type=Path, nargs="+")
    upgrade = traces_commands.add_parser(
        "upgrade", help="rewrite a trace file in the current format (version 1 -> 2: adds checksums)"
    )
    default = traces_commands.add_parser(
        "default",
        help="the default trace set (shared by the no-config environments and `make demo`): collect it if missing, "
        "print its files",
    )
    default.add_argument("--model", default="smollm2-135m")
    default.add_argument(
        "--link", type=Path, help="also make this path a symbolic link to the set's folder (e.g. traces/demo)"
    )
    upgrade.add_argument("input", type=Path)
    upgrade.add_argument("out", type=Path, help="the new file (may be the input itself: it is replaced atomically)")

    evaluate = commands.add_parser(
        "evaluate",
        help="score eviction policies on a trace split (holistic score, retained attention, plots)",
        description="Run every policy on every (sample, layer, KV head) of a split at the prompt boundary; "
        "write DIR/results.json and PNG plots; print a table.",
    )
    evaluate.add_argument("--traces", type=Path, nargs="+", required=True, help="trace files of one model")
    evaluate.add_argument(
        "--policies",
        default="all",
        help="'all' (every registered scorer with its defaults, plus the variants it declares) or comma-separated "
        "scorer specs: name or name:param=value;param=value "
        "(e.g. snapkv:window=32,kvp:checkpoint=runs/kvp/agents.safetensors)",
    )
    evaluate.add_argument("--split", default="test", help="train, val, test or all (default test)")
    evaluate.add_argument("--out", type=Path, required=True, help="folder for results.json and the plots")
    evaluate.add_argument("--seed", type=_non_negative, default=0, help="bootstrap seed")
    evaluate.add_argument(
        "--bootstrap", type=_positive, default=1000, help="bootstrap resamples for the intervals (default 1000)"
    )
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
    evaluate.add_argument("--layers", type=_layers, help="evaluate only these layers, e.g. 10 or 0-3,10 (default all)")
    evaluate.add_argument("--heads", type=_ints, help="evaluate only these KV heads, e.g. 0,1 (default all)")
    evaluate.add_argument(
        "--max-samples", type=_positive, help="evaluate only the first N samples of the split (default all)"
    )
    evaluate.add_argument(
        "--add-to",
        type=Path,
        help="an earlier run (folder or results.json) on the same traces, split, protocol and seed: evaluate only "
        "--policies and write them together with its policies (baselines once, new agents against them later)",
    )

    tasks = commands.add_parser("tasks", help="list the tasks, or measure a model's full-cache accuracy on them")
    tasks_commands = tasks.add_subparsers(dest="tasks_command", required=True, metavar="ACTION")
    tasks_commands.add_parser("list", help="list the tasks")
    accuracy = tasks_commands.add_parser("eval", help="full-cache accuracy (perplexity for free text)")
    accuracy.add_argument("--model", default="smollm2-135m")
    accuracy.add_argument("--tasks", default="all", help="'all' or comma-separated task names")
    accuracy.add_argument("--context", type=_ints, default=(1024,), help="context lengths, e.g. 1024,2048")
    accuracy.add_argument("--samples", type=_positive, default=8, help="samples per task and context (default 8)")
    accuracy.add_argument("--seed", type=_non_negative, default=0)
    accuracy.add_argument("--out", type=Path, help="also write the results as JSON here")
    generate = commands.add_parser(
        "generate",
        help="answer a prompt with an evicting cache and show the memory it frees",
        description="Prefill the prompt, compress every KV head to --budget tokens with --policy (4 sink + 16 recent "
        "tokens always kept), decode greedily; print the answer and the KV cache's bytes before and after.",
    )
    generate.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-random or a model folder")
    generate.add_argument("--policy", default="kvp", help="a scorer spec: name or name:param=value;... (default kvp)")
    generate.add_argument(
        "--budget", type=_budget, required=True, help="tokens kept per KV head (e.g. 128) or a fraction (e.g. 0.25)"
    )
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", type=Path, help="a text file holding the prompt")
    source.add_argument("--prompt", help="the prompt text")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--max-new-tokens", type=_positive, default=64)
    generate.add_argument(
        "--decode-every", type=_positive, help="re-compress to the budget every N generated tokens (bounded memory)"
    )
    generate.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")

    e2e = commands.add_parser(
        "evaluate-e2e",
        help="task accuracy and perplexity with an evicting cache, per policy and budget",
        description="Prefill each sample once, decode with the full cache, then with every policy at every budget; "
        "write DIR/results.json, plots and a table. Resumable (finished samples are kept in DIR/parts); --shard i/N "
        "splits the samples between machines, joined by `kvp-gym evaluate-e2e-merge`.",
    )
    e2e.add_argument("--model", default="smollm2-135m")
    e2e.add_argument("--tasks", default="niah_single,niah_multikey", help="comma-separated task names")
    e2e.add_argument("--context", type=_positive, default=1024, help="prompt tokens (default 1024)")
    e2e.add_argument("--budgets", type=_ints, default=(64, 128, 256), help="tokens per KV head (default 64,128,256)")
    e2e.add_argument("--policies", default="all", help="'all' or comma-separated scorer specs")
    e2e.add_argument("--samples", type=_non_negative, default=40, help="samples per task (default 40)")
    e2e.add_argument("--essays", type=_non_negative, default=8, help="held-out essays for perplexity (default 8)")
    e2e.add_argument("--continuation", type=_positive, default=64, help="essay tokens scored for perplexity")
    e2e.add_argument("--text", default="heldout", help="text pool: heldout (default), train, val, test or all")
    e2e.add_argument("--seed", type=int, default=0)
    e2e.add_argument("--out", type=Path, required=True)
    e2e.add_argument(
        "--shard", type=parse_shard, default=(0, 1), help="i/N: evaluate samples i, i+N, ... (default 0/1)"
    )
    e2e.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
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
    table.add_argument("--labels", type=lambda text: text.split(","), help="row labels (default: the folder names)")
    table.add_argument("--bootstrap", type=_positive, default=1000, help="bootstrap resamples (default 1000)")
    table.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    merge_e2e = commands.add_parser(
        "evaluate-e2e-merge", help="join the folders of sharded evaluate-e2e runs and write the summary"
    )
    merge_e2e.add_argument("out", type=Path)
    merge_e2e.add_argument("inputs", type=Path, nargs="+")

    # Commands from other packages (agents' `train`), found by entry point: kvp_gym imports none of them.
    for command in entry_points(group="kvp_gym.commands"):
        command.load()(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    from kvp_gym.cache import CacheError
    from kvp_gym.capture import CaptureError
    from kvp_gym.models import ModelNotFoundError
    from kvp_gym.traces import TraceFormatError

    try:
        handler = (
            getattr(args, "handler", None)
            or {
                "collect": _collect,
                "traces": _traces,
                "evaluate": _evaluate,
                "tasks": _tasks,
                "generate": _generate,
                "evaluate-e2e": _evaluate_e2e,
                "evaluate-e2e-merge": _merge_e2e,
                "evaluate-table": _evaluate_table,
            }[args.command]
        )
        return handler(args)
    except (
        TraceFormatError,
        ModelNotFoundError,
        CaptureError,
        CacheError,
        FileExistsError,
        FileNotFoundError,
        ValueError,
    ) as err:
        print(f"kvp-gym: error: {err}", file=sys.stderr)
        return 2
    except KeyError as err:  # unknown task names and the like: the message lists what exists
        print(f"kvp-gym: error: {err.args[0]}", file=sys.stderr)
        return 2


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"kvp-gym: warning: {message}", file=sys.stderr)


def _collect(args: argparse.Namespace) -> int:
    from kvp_gym.collect import CollectConfig, collect

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
    )
    print(summary)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from kvp_gym.evaluate import evaluate, format_table, merge_results, write_results

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
    )
    if base:
        record = merge_results(base, record, args.versus)
    written = write_results(record, args.out)
    print(format_table(record))
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
    from kvp_gym.evaluate import versus_table
    from kvp_gym.storage import atomic_path

    labels = args.labels or [(run if run.is_dir() else run.parent).name for run in args.runs]
    if len(labels) != len(args.runs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    records = {label: _read_results(run) for label, run in zip(labels, args.runs, strict=True)}
    table = versus_table(records, args.versus, resamples=args.bootstrap)
    print(table)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table + "\n")
    return 0


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


def describe(trace) -> str:
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


def _generate(args: argparse.Namespace) -> int:
    from kvp_gym import models
    from kvp_gym.cache import generate
    from kvp_gym.device import resolve_device
    from kvp_gym.evaluate import _from_spec
    from kvp_gym.scorers import ScorerError, model_mismatches

    scorer = _from_spec(args.policy)
    prompt = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    model, tokenizer = models.load(args.model)
    model.to(resolve_device(args.device))
    for reason in model_mismatches({args.policy: scorer}, args.model, models.geometry(model)).values():
        raise ScorerError(reason)
    if args.chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    out = generate(
        model,
        tokenizer,
        prompt,
        scorer,
        args.budget,
        max_new_tokens=args.max_new_tokens,
        decode_every=args.decode_every,
    )
    print(out.text)
    print(
        f"prompt {out.prompt_length} tokens; KV cache {out.kv_bytes_full / 2**20:.2f} MiB after prefill, "
        f"{out.kv_bytes_compressed / 2**20:.2f} MiB after compression "
        f"({out.kv_bytes_compressed / out.kv_bytes_full:.1%}); {out.compressions[0]}"
        + (f"; {len(out.compressions) - 1} decode-time compressions" if len(out.compressions) > 1 else ""),
        file=sys.stderr,
    )
    return 0


def _evaluate_e2e(args: argparse.Namespace) -> int:
    from kvp_gym.cache.e2e import E2EConfig, format_table, run

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
    )
    record = run(config, args.out, shard=args.shard, device=args.device)
    if record is None:
        print(
            f"shard {args.shard[0]}/{args.shard[1]} done in {args.out}; join the shards with kvp-gym evaluate-e2e-merge"
        )
        return 0
    print(format_table(record))
    for label, reason in record["skipped"].items():
        print(f"skipped {label}: {reason}")
    print(f"wrote {args.out / 'results.json'} and plots")
    return 0


def _merge_e2e(args: argparse.Namespace) -> int:
    from kvp_gym.cache.e2e import format_table, merge

    print(format_table(merge(args.out, args.inputs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
