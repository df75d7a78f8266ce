"""The command line's building blocks, defined once: the argparse value types (layer lists, shards, budgets, ...)
and the option groups several commands share (--model, --seed, --out, --shard, --device, --policies, --text,
--bootstrap, --traces). The kvp_gym commands use them, and so do the commands of other packages (agents' ``train``,
the leaderboard's): where one option's help or default differs between commands, the helper takes it as a parameter
so that every command keeps its own.

Imports only the standard library (``kvp-gym --help`` builds every parser and must stay fast)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:i (under torchrun, cuda is the process's own GPU)"


# Value types. Each raises argparse.ArgumentTypeError with a message naming what was expected: argparse prints it as
# "argument --x: <message>".


def layer_ids(text: str) -> tuple[int, ...]:
    """'0-29' or '0,3,10-12' -> layer ids."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            layers += range(int(low), int(high or low) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers like '0-29' or '0,3,10-12', got {text!r}") from None
    return tuple(layers)


def layer_ids_or_global(text: str) -> tuple[int, ...] | str:
    """'global' (a hybrid model's full-attention layers) or layer ids as :func:`layer_ids` reads them."""
    return text if text == "global" else layer_ids(text)


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N: this process's share of work split N ways."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shard as i/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard i/N needs 0 <= i < N, got {text!r}")
    return index, count


def float_list(text: str) -> tuple[float, ...]:
    """'0.7,0.15,0.15' -> (0.7, 0.15, 0.15)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    """'64,128,256' -> (64, 128, 256)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def integer(text: str) -> int:
    """An integer, with the same style of message as the other types."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def budget(text: str) -> int | float:
    """'128' (tokens, >= 1) or '0.25' (a fraction of the prompt, in (0, 1]): checked here, before a model loads."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of tokens or a fraction, got {text!r}") from None
    if isinstance(value, int) and value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens, got {text!r}")
    if isinstance(value, float) and not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of the prompt in (0, 1], got {text!r}")
    return value


def comma_list(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']."""
    return text.split(",")


# Shared options. `help=None` is argparse's own default (the option is listed without a description).


def add_model(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """--model: a model name, folder or hub id (default smollm2-135m)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=help)


def add_seed(
    parser: argparse.ArgumentParser, help: str | None = None, type: Callable[[str], Any] = non_negative_int
) -> None:
    """--seed (default 0)."""
    parser.add_argument("--seed", type=type, default=0, help=help)


def add_out(
    parser: argparse.ArgumentParser,
    help: str | None = None,
    *,
    required: bool = False,
    default: Any = None,
    type: Callable[[str], Any] = Path,
) -> None:
    """--out: the file or folder a command writes."""
    parser.add_argument("--out", type=type, required=required, default=default, help=help)


def add_trace_files(
    parser: argparse.ArgumentParser, help: str | None = None, type: Callable[[str], Any] = Path
) -> None:
    """--traces FILE [FILE ...] (required): the trace files to read."""
    parser.add_argument("--traces", type=type, nargs="+", required=True, help=help)


def add_shard(parser: argparse.ArgumentParser, help: str) -> None:
    """--shard i/N (default 0/1, everything): this process's share of the work."""
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help=help)


def add_device(parser: argparse.ArgumentParser) -> None:
    """--device auto|cpu|cuda (default auto)."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_policies(parser: argparse.ArgumentParser, help: str) -> None:
    """--policies: 'all' (default) or comma-separated scorer specs."""
    parser.add_argument("--policies", default="all", help=help)


def add_text_pool(parser: argparse.ArgumentParser, default: str, help: str) -> None:
    """--text: the pool of essays and words prompts draw from (all, train, heldout, val or test)."""
    parser.add_argument("--text", default=default, help=help)


def add_bootstrap(parser: argparse.ArgumentParser, help: str) -> None:
    """--bootstrap: resamples for the bootstrap intervals (default 1000)."""
    parser.add_argument("--bootstrap", type=positive_int, default=1000, help=help)


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    """The positional OUT INPUTS... of the merge commands."""
    parser.add_argument("out", type=Path)
    parser.add_argument("inputs", type=Path, nargs="+")
