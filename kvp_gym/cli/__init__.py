"""The ``kvp-gym`` command line. ``kvp-gym --help`` lists the commands; each has its own ``--help``.

Each command registers its own sub-parser beside its handler (kvp_gym.cli.collect, .traces, .evaluate, .tasks,
.generate, .e2e, .shortcut: ``add_command(commands)`` sets ``handler``); the shared value types and options live in
kvp_gym.cli.options. Other packages add their commands (agents' ``train``, the leaderboard's) through the
``kvp_gym.commands`` entry points, so that kvp_gym imports none of them.

Imports kvp_gym.version and the kvp_gym.cli modules at module level (nothing heavy: ``kvp-gym --help`` stays fast);
the error types of kvp_gym.cache, .capture, .models and .traces only where a command imported them."""

from __future__ import annotations

import argparse
import sys
import warnings
from importlib.metadata import entry_points

from kvp_gym.cli import collect, e2e, evaluate, generate, shortcut, tasks, traces
from kvp_gym.cli.options import parse_shard
from kvp_gym.cli.traces import describe
from kvp_gym.version import __version__

__all__ = ["build_parser", "describe", "main", "parse_shard"]

# Printed as written: lines under 80 characters, so that a terminal of 80 columns wraps none of them mid-word.
_EXAMPLES = """examples:
  kvp-gym collect --model smollm2-135m --task niah_single --samples 32 \\
      --context 1024 --future 64 --out traces/niah.h5
  kvp-gym traces info traces/niah.h5
  kvp-gym evaluate --traces traces/demo/niah_single.h5 --policies all \\
      --split test --out runs/eval
  kvp-gym tasks eval --tasks niah_single,essay --context 1024 --samples 8
  kvp-gym generate --model smollm2-135m --policy kvp --budget 128 \\
      --prompt-file prompt.txt --chat
  kvp-gym evaluate-e2e --tasks niah_single,niah_multikey --budgets 64,128,256 \\
      --samples 40 --out runs/e2e
"""

# In the order `kvp-gym --help` lists them.
_COMMANDS = (
    collect.add_command,
    traces.add_command,
    evaluate.add_command,
    tasks.add_command,
    generate.add_command,
    e2e.add_command,
    evaluate.add_table_command,
    e2e.add_merge_command,
    e2e.add_versus_command,
    shortcut.add_command,
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command: kvp_gym's own, then those of the ``kvp_gym.commands`` entry points."""
    parser = argparse.ArgumentParser(
        prog="kvp-gym",
        description="Trace collection, environments and benchmarks for KV-cache eviction.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvp-gym {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(commands)
    # Commands from other packages (agents' `train`), found by entry point: kvp_gym imports none of them.
    for command in entry_points(group="kvp_gym.commands"):
        command.load()(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command (``argv``: the arguments after ``kvp-gym``, default sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        return args.handler(args)
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"kvp-gym: error: {err}", file=sys.stderr)
        return 2
    except KeyError as err:  # unknown task names and the like: the message lists what exists
        print(f"kvp-gym: error: {err.args[0]}", file=sys.stderr)
        return 2


# The errors a command reports in one line (bad input, a missing model, ...), by module: each is looked up only if
# its module was imported (an error of a module can only come from it), so no command pays for importing
# transformers just to name the errors it cannot raise.
_USER_ERRORS = {
    "kvp_gym.traces": "TraceFormatError",
    "kvp_gym.models": "ModelNotFoundError",
    "kvp_gym.capture": "CaptureError",
    "kvp_gym.cache": "CacheError",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[module], name) for module, name in _USER_ERRORS.items() if module in sys.modules]
    return (FileExistsError, FileNotFoundError, ValueError, *loaded)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"kvp-gym: warning: {message}", file=sys.stderr)
