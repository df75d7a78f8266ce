"""The "first hour" tour: the README's commands, run in README order in one fresh shell exactly as written, on
tiny settings, so that a README command that stops working fails (``make tour``; tests/test_first_hour.py runs it
in the suite).

Which blocks run: every ```bash block of README.md carries a marker on the line right before its fence:
``<!-- tour -->`` (it runs) or ``<!-- tour: skip (why) -->`` (it does not, and says why). A bash block without a
marker is an error, so a new README command cannot escape the tour; so is a marker without a bash block after it.

How they run: the blocks' commands (a command is a line, with its backslash continuations, or the lines a loop
spans) go into one ``bash -euo pipefail`` script, run once in a scratch folder (the checkout stays clean: every
output lands there, and ``KVP_GYM_CACHE`` points into it) with the caller's environment minus any virtual
environment (no venv ``bin`` folder on PATH, no VIRTUAL_ENV, no PYTHONPATH, no KVP_GYM_* setting): ``kvp-gym``
exists only once the README's own ``source .venv/bin/activate`` has run. The first failing command stops the
shell; the report names it, its README line and its exit status, and every command's time.

What changes: only the text that ``REWRITES`` matches, each rule with its reason (tiny-random instead of
SmolLM2-135M, two samples instead of 32, a tiny benchmark instead of bench-v0, ...). A rule that matches nothing
is an error, so the table cannot go stale silently. ``STAND_INS`` lists what the scratch folder holds before the
first command: what the README assumes exists at that point (``make demo``'s traces/demo, a prompt file, your own
policy file and its weights) or what bench-v0 has and a tiny benchmark needs (a manifest). ``--help`` prints both
tables.

    python tests/first_hour.py [--readme README.md] [--work DIR] [--json RECORD.json] [--timeout SECONDS]

Exit status 0 when every command ran, 1 when one failed (or the tour timed out), 2 when the README or the
rewrite table is inconsistent. Imports only the standard library at module level; torch, kvp_gym (collect,
traces), kvp_gym_leaderboard.benchmark and examples/reinforce.py while preparing the stand-ins, kvp_gym.storage
to write the record.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tiny_benchmark import benchmark_toml

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```\s*(\S*)")
RUN_MARKER = re.compile(r"^<!-- tour -->$")
SKIP_MARKER = re.compile(r"^<!-- tour: skip \((?P<why>.+)\) -->$")
ANY_MARKER = re.compile(r"^<!--\s*tour\b")
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
TINY_BENCHMARK = "tiny/tiny-v0.toml"


@dataclass(frozen=True)
class Rewrite:
    """One entry of the tiny-settings table: ``pattern`` (a regular expression) becomes ``replacement``."""

    pattern: str
    replacement: str
    why: str


REWRITES = (
    Rewrite(r"--model smollm2-135m\b", "--model tiny-random", "a 2-layer random Llama: seconds, nothing to convert"),
    Rewrite(r"--samples 32\b", "--samples 2", "collect: two samples"),
    Rewrite(r"--samples 256\b", "--samples 4", "the sharded collection: one sample per shard"),
    Rewrite(r"--samples 12\b", "--samples 1", "evaluate-e2e: one prompt per task"),
    Rewrite(r"--future 64\b", "--future 4", "four continuation tokens"),
    Rewrite(r"--minutes 3\b", "--minutes 0.05", "examples/reinforce.py: 3 s of training"),
    Rewrite(
        r"(--versus |--policy |--policies )kvp(?![\w:])",
        r"\1tova",
        "the shipped KVP agents are SmolLM2-135M's (30 layers, 3 KV heads): tiny-random has 2 and 2",
    ),
    Rewrite(
        r"traces/kvp2/(?:train|val-1024)-\*\.h5",
        "traces/demo/*.h5",
        "traces/kvp2 come from make kvp2-train-traces, a long collection: the demo stand-in has train and val samples",
    ),
    Rewrite(r"--preset demo\b", "--preset demo --steps 2", "kvp-gym train: two steps instead of 200"),
    Rewrite(r"\bbench-v0\b", TINY_BENCHMARK, "a tiny-random benchmark (one 600-token file per task, 2 samples)"),
    Rewrite(
        r"(leaderboard validate my-entry\.json)",
        rf"\1 --benchmark {TINY_BENCHMARK}",
        "an entry names its benchmark by id, and only bench-v0's id is known: the tiny one is given by path",
    ),
)

STAND_INS = """\
.venv, examples/          links to the checkout's (the README activates .venv and runs examples/reinforce.py)
traces/demo/*.h5          what `make demo` links there: niah_single and essay, here 4 tiny-random samples each
                          of 600 tokens (2 train, 1 val, 1 test)
tiny/tiny-v0.toml         the stand-in for bench-v0 (TINY_TOML) with its manifest, written from a set prepared
                          in tiny/manifest-set (bench-v0's manifest is committed)
prompt.txt                the prompt a user brings to `kvp-gym generate`
my_policy.py, weights.pt  the policy file and weights a user brings to `kvp-gym submit --policy-file`: the
                          TokenPolicy of examples/reinforce.py behind EnvPolicyScorer, freshly initialised"""

TINY_TOML = benchmark_toml(
    "tiny-v0",
    "tiny-random: the first-hour tour's stand-in for bench-v0",
    {"contexts": [600], "future": 4},
    {"context": 600, "samples": 1},
)

PROMPT = (
    "Read the notes below, then answer the question at the end.\n\n"
    + "The archive keeps its ledgers in the north room; the key is kept by the night clerk. " * 6
    + "The access code for the north room is 4817. "
    + "Visitors sign the book at the desk and leave their coats in the hall. " * 6
    + "\n\nWhat is the access code for the north room?"
)

MY_POLICY = '''"""My policy (the tour's stand-in): examples/reinforce.py's TokenPolicy behind EnvPolicyScorer."""

import importlib.util
from pathlib import Path

import gymnasium as gym
import torch

import kvp_gym  # noqa: F401  (registers KVEvict-v0)
from kvp_gym.envs.scorer import EnvPolicyScorer
from kvp_gym_leaderboard.benchmark import load_benchmark

HERE = Path(__file__).parent


def make_scorer(checkpoint):
    spec = importlib.util.spec_from_file_location("reinforce_example", HERE / "examples" / "reinforce.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    benchmark = load_benchmark(HERE / "tiny" / "tiny-v0.toml")
    traces = [benchmark.default_folder() / name for _, _, name in benchmark.trace_files()]
    config = {"traces": traces, "split": "test", "sinks": 4, "recent": 16, "max_tokens": 1024}
    env = gym.make("KVEvict-v0", config=config)
    policy = example.TokenPolicy(env.observation_space["key"].shape[-1])
    policy.load_state_dict(torch.load(checkpoint))
    return EnvPolicyScorer(policy.eval(), env, name="mine")
'''


class TourError(Exception):
    """The README's markers or blocks, or the rewrite table, are inconsistent (the message names README lines)."""


@dataclass
class Command:
    """One command of a tour block: its README line, its text as written and as run, and how it went."""

    line: int
    text: str
    run: str = ""
    status: int | None = None  # exit status; None: did not run
    seconds: float | None = None


@dataclass
class Block:
    """One bash block: the README line of its opening fence, its marker, and its commands."""

    line: int
    runs: bool
    why: str = ""
    commands: list[Command] = field(default_factory=list)


def read_blocks(readme: str, name: str = "README.md") -> list[Block]:
    """Every bash block of ``readme`` (Markdown text) with its marker and commands, in order; TourError for a bash
    block without a marker, a malformed or stray marker, or an unterminated block."""
    lines = readme.splitlines()
    blocks: list[Block] = []
    markers_used: set[int] = set()
    number = 0
    while number < len(lines):
        fence = FENCE.match(lines[number])
        if not fence:
            number += 1
            continue
        end = next((i for i in range(number + 1, len(lines)) if lines[i].startswith("```")), None)
        if end is None:
            raise TourError(f"{name}:{number + 1}: a code block that never ends")
        if fence.group(1) in SHELL_LANGUAGES:
            marker = lines[number - 1] if number else ""
            skip = SKIP_MARKER.match(marker)
            if ANY_MARKER.match(marker) and not (RUN_MARKER.match(marker) or skip):
                raise TourError(
                    f"{name}:{number}: {marker!r} is not a tour marker (expected '<!-- tour -->' or "
                    "'<!-- tour: skip (why) -->', the reason in parentheses)"
                )
            if not (RUN_MARKER.match(marker) or skip):
                raise TourError(
                    f"{name}:{number + 1}: a bash block without a tour marker: put '<!-- tour -->' or "
                    f"'<!-- tour: skip (why) -->' on the line before its fence (line {number})"
                )
            markers_used.add(number - 1)
            block = Block(line=number + 1, runs=skip is None, why=skip.group("why") if skip else "")
            if block.runs:
                block.commands = split_commands(lines[number + 1 : end], number + 2, name)
                if not block.commands:
                    raise TourError(f"{name}:{number + 1}: a tour block without a command")
            blocks.append(block)
        number = end + 1
    for index, text in enumerate(lines):
        if ANY_MARKER.match(text) and index not in markers_used:
            raise TourError(
                f"{name}:{index + 1}: {text!r} is not a tour marker right before a ```bash fence (expected "
                "'<!-- tour -->' or '<!-- tour: skip (why) -->')"
            )
    return blocks


def split_commands(lines: list[str], first: int, name: str) -> list[Command]:
    """The commands of a block's ``lines`` (the first one at README line ``first``): blank and comment lines are
    skipped, backslash continuations joined, and lines gathered until bash parses them whole (a loop spans
    several)."""
    commands: list[Command] = []
    pending: list[str] = []
    start = first
    for offset, text in enumerate(lines):
        if not pending and (not text.strip() or text.lstrip().startswith("#")):
            continue
        if not pending:
            start = first + offset
        pending.append(text)
        joined = "\n".join(pending)
        if joined.endswith("\\") or not _parses(joined):
            continue
        commands.append(Command(line=start, text=joined))
        pending = []
    if pending:
        raise TourError(f"{name}:{start}: this command never ends (bash cannot parse it): {pending[0]!r}")
    return commands


def _parses(text: str) -> bool:
    return subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True).returncode == 0


def apply_rewrites(blocks: list[Block], rewrites: tuple[Rewrite, ...] = REWRITES) -> None:
    """Set each tour command's ``run`` text from the rewrite table; TourError naming each rule that matched
    nothing (the README changed under it)."""
    uses = dict.fromkeys(range(len(rewrites)), 0)
    for command in (c for b in blocks if b.runs for c in b.commands):
        command.run = command.text
        for index, rule in enumerate(rewrites):
            command.run, count = re.subn(rule.pattern, rule.replacement, command.run)
            uses[index] += count
    stale = [rewrites[i] for i, count in uses.items() if count == 0]
    if stale:
        raise TourError(
            "rewrites that match no tour command (the README changed: update REWRITES in tests/first_hour.py): "
            + "; ".join(f"{rule.pattern!r} ({rule.why})" for rule in stale)
        )


def fresh_environment(cache: Path) -> dict[str, str]:
    """The caller's environment as a new login would have it: no virtual environment on PATH or active, no
    PYTHONPATH or PYTHONHOME, no KVP_GYM_* setting; the user cache in ``cache``."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP") and not key.startswith("KVP_GYM_")
    }
    folders = environment.get("PATH", os.defpath).split(os.pathsep)
    environment["PATH"] = os.pathsep.join(f for f in folders if f and not (Path(f).parent / "pyvenv.cfg").exists())
    environment["KVP_GYM_CACHE"] = str(cache)
    return environment


def shell_script(blocks: list[Block], status: Path, name: str) -> str:
    """The bash script of the tour: a check that the shell is fresh, then every command between two time stamps
    written to ``status`` ("begin I T", "end I T", and "exit S" when the shell ends)."""
    lines = [
        f"exec 3>>{shlex.quote(str(status))}",
        "trap 'echo \"exit $?\" >&3' EXIT",
        "if command -v kvp-gym > /dev/null; then",
        '    echo "first hour: kvp-gym is on PATH before the README activates .venv ($(command -v kvp-gym)): '
        'not a fresh shell" >&2',
        "    exit 90",
        "fi",
    ]
    commands = [c for b in blocks if b.runs for c in b.commands]
    for index, command in enumerate(commands):
        header = f"\n== [{index + 1}/{len(commands)}] {name}:{command.line}\n$ {command.run}"
        lines += [
            f"printf '%s\\n' {shlex.quote(header)} >&2",
            f'echo "begin {index} $EPOCHREALTIME" >&3',
            command.run,
            f'echo "end {index} $EPOCHREALTIME" >&3',
        ]
    return "\n".join(lines) + "\n"


def prepare_stand_ins(work: Path) -> None:
    """Fill the scratch folder ``work`` with ``STAND_INS``: links to the checkout's .venv and examples/, tiny-random
    demo traces, the tiny benchmark and its manifest, a prompt, a policy file and its weights."""
    import torch

    from kvp_gym.collect import CollectConfig, collect
    from kvp_gym.traces import open_traces
    from kvp_gym_leaderboard.benchmark import load_benchmark, prepare

    link_checkout(work)
    for task in ("niah_single", "essay"):
        config = CollectConfig(
            model="tiny-random", task=task, samples=4, context=600, future=4, splits=(0.5, 0.25, 0.25)
        )
        collect(config, work / "traces" / "demo" / f"{task}.h5", progress=False)
    toml = work / TINY_BENCHMARK
    toml.parent.mkdir(parents=True)
    toml.write_text(TINY_TOML)
    problems = prepare(load_benchmark(toml), toml.parent / "manifest-set", write_manifest=True, progress=False)
    if problems:
        raise RuntimeError(f"the tiny benchmark's manifest: {problems}")
    (work / "prompt.txt").write_text(PROMPT)
    (work / "my_policy.py").write_text(MY_POLICY)
    with open_traces(work / "traces" / "demo" / "essay.h5") as trace:
        head_dim = trace.header.geometry.head_dim
    torch.save(_reinforce_example().TokenPolicy(head_dim).state_dict(), work / "weights.pt")


def link_checkout(work: Path) -> None:
    """``work/.venv`` and ``work/examples``: links to the checkout's (the README uses them by these paths)."""
    for name in (".venv", "examples"):
        (work / name).symlink_to(ROOT / name, target_is_directory=True)


def _reinforce_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reinforce_example", ROOT / "examples" / "reinforce.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def run_shell(blocks: list[Block], work: Path, name: str, timeout: float) -> tuple[int | None, float]:
    """Run the tour's commands in one fresh ``bash -euo pipefail`` in ``work``, filling each command's status
    and seconds; returns (the shell's exit status, None if it timed out; its seconds)."""
    status = work / ".tour-status"
    script = work / ".tour.sh"
    script.write_text(shell_script(blocks, status, name))
    started = time.time()  # the clock of bash's $EPOCHREALTIME
    shell = subprocess.Popen(
        ["bash", "-euo", "pipefail", str(script)],
        cwd=work,
        env=fresh_environment(work / "cache"),
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # the tour's own process group: a timeout stops its background jobs too
    )
    try:
        exit_status: int | None = shell.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
        exit_status = None
    ended = time.time()
    commands = [c for b in blocks if b.runs for c in b.commands]
    begun: dict[int, float] = {}
    for record in status.read_text().splitlines() if status.exists() else []:
        what, *values = record.split()
        if what == "begin":
            begun[int(values[0])] = float(values[1])
        elif what == "end":
            command = commands[int(values[0])]
            command.status, command.seconds = 0, float(values[1]) - begun[int(values[0])]
    unfinished = [i for i in begun if commands[i].status is None]
    if unfinished:
        command = commands[unfinished[0]]
        command.status = -signal.SIGKILL if exit_status is None else exit_status
        command.seconds = ended - begun[unfinished[0]]
    return exit_status, ended - started


def tour(
    readme: Path,
    work: Path,
    timeout: float,
    rewrites: tuple[Rewrite, ...] = REWRITES,
    stand_ins: Callable[[Path], None] = prepare_stand_ins,
) -> dict:
    """Run the tour of ``readme`` in the scratch folder ``work`` (``stand_ins(work)`` fills it first); returns its
    record (blocks, commands, times, the failed command if any). TourError before anything runs if the markers or
    the rewrite table are inconsistent."""
    name = readme.name
    blocks = read_blocks(readme.read_text(), name)
    apply_rewrites(blocks, rewrites)
    started = time.perf_counter()
    stand_ins(work)
    setup_seconds = time.perf_counter() - started
    exit_status, seconds = run_shell(blocks, work, name, timeout)
    commands = [c for b in blocks if b.runs for c in b.commands]
    failed = next((c for c in commands if c.status not in (0, None)), None)
    if failed is None and exit_status != 0:  # the shell itself stopped (the freshness check, a timeout)
        failed = Command(line=0, text="(the shell, before or between the README's commands)", status=exit_status)
    return {
        "readme": str(readme),
        "work": str(work),
        "setup_seconds": setup_seconds,
        "seconds": seconds,
        "timed_out": exit_status is None,
        "rewrites": [vars(rule) for rule in rewrites],
        "blocks": [
            {"line": b.line, "runs": b.runs, "why": b.why, "commands": [vars(c) for c in b.commands]} for b in blocks
        ],
        "failed": vars(failed) if failed else None,
    }


def report(record: dict) -> str:
    """The tour's summary: one line per command (time, exit status, README line, the command as run)."""
    name = Path(record["readme"]).name
    blocks = record["blocks"]
    commands = [c for b in blocks if b["runs"] for c in b["commands"]]
    lines = [
        f"first hour: {sum(b['runs'] for b in blocks)} blocks of {name} ({len(commands)} commands), "
        f"{sum(not b['runs'] for b in blocks)} skipped; stand-ins {record['setup_seconds']:.1f} s, commands "
        f"{record['seconds']:.1f} s"
    ]
    for command in commands:
        seconds = "" if command["seconds"] is None else f"{command['seconds']:7.1f} s"
        outcome = {None: "not run", 0: "ok"}.get(command["status"], f"exit {command['status']}")
        first_line = command["run"].splitlines()[0] + (" ..." if "\n" in command["run"] else "")
        lines.append(f"{seconds:>9}  {outcome:8} {name}:{command['line']:<4} {first_line}")
    failed = record["failed"]
    if failed:
        where = f"{name}:{failed['line']}" if failed["line"] else "the shell"
        why = "timed out" if record["timed_out"] else f"exited with status {failed['status']}"
        lines.append(f"FAILED: {where} {why}: {failed['run'] or failed['text']}")
        lines.append(f"(the commands after it did not run; the scratch folder is kept: {record['work']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    rules = "\n".join(f"  {rule.pattern}  ->  {rule.replacement}  ({rule.why})" for rule in REWRITES)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"rewrites (tiny settings):\n{rules}\n\nstand-ins (in the scratch folder):\n{STAND_INS}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="default: the checkout's README.md")
    parser.add_argument("--work", type=Path, help="the scratch folder (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the tour's record here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for all commands (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder even when every command ran")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="kvp-gym-tour-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        print(f"first hour: {work} is not empty", file=sys.stderr)
        return 2
    try:
        record = tour(args.readme.resolve(), work.resolve(), args.timeout)
    except TourError as err:
        print(f"first hour: {err}", file=sys.stderr)
        return 2
    print(report(record))
    if args.json:
        from kvp_gym.storage import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
    if record["failed"]:
        return 1
    if not (args.keep or args.work):
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
