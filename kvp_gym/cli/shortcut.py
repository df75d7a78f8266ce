"""``kvp-gym evaluate-shortcut``: the share of a token class (digits) in each policy's top-k tokens against the
oracle's and the base rate, on traces without needles (essays): a shortcut control.

Imports kvp_gym.cli.options at module level; kvp_gym.evaluation.token_classes only when the command runs."""

from __future__ import annotations

import argparse

from kvp_gym.cli.options import add_bootstrap, add_out, add_seed, add_trace_files, comma_list, positive_int

# Printed as written: lines under 80 columns.
_EXAMPLES = """\
examples:
  kvp-gym evaluate-shortcut --traces traces/demo/essay.h5 --split all \\
      --policies kvp,oracle,tova --top 64 --token-class digits --out runs/digits"""


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``evaluate-shortcut``."""
    command = commands.add_parser(
        "evaluate-shortcut",
        help="share of a token class (digits) in each policy's top-k tokens, against the oracle's and the base rate",
        description="For every (sample, layer, KV head) at the prompt boundary, the share of a\n"
        "token class among a policy's top-k prompt tokens (the protocol's protected\n"
        "sink and recent tokens left out, for every policy), against the class's base\n"
        "rate among the same tokens; 95% bootstrap intervals over samples; the ratio to\n"
        "the oracle's share (paired). Prints a Markdown table; --out writes\n"
        "DIR/results.json.\n\n" + _EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_trace_files(command, help="trace files of one model (typically essays: no needles)")
    command.add_argument(
        "--policies",
        type=comma_list,
        required=True,
        help="comma-separated scorer specs, NAME or NAME:param=value;... (include oracle for the ratio)",
    )
    command.add_argument("--top", type=positive_int, default=64, help="tokens in each head's top (default 64)")
    command.add_argument("--token-class", default="digits", help="the token class: digits (default)")
    command.add_argument("--split", default="val", help="train, val, test or all (default val)")
    command.add_argument(
        "--protocol",
        default="paper",
        choices=("paper", "raw"),
        help="paper (default): the 4 sink and 16 recent prompt tokens are left out of the top and of the base "
        "rate; raw: every prompt token is a candidate",
    )
    command.add_argument("--max-samples", type=positive_int, help="only the first N samples of the split")
    add_seed(command, help="bootstrap seed")
    add_bootstrap(command, help="bootstrap resamples for the intervals (default 1000)")
    add_out(command, help="folder for results.json (default: print only)")
    command.set_defaults(handler=_evaluate_shortcut)


def _evaluate_shortcut(args: argparse.Namespace) -> int:
    from kvp_gym.evaluation.token_classes import shares_table, token_class_shares, write_shares

    record = token_class_shares(
        args.traces,
        args.policies,
        token_class=args.token_class,
        top=args.top,
        split=args.split,
        protocol=args.protocol,
        seed=args.seed,
        bootstrap=args.bootstrap,
        max_samples=args.max_samples,
    )
    print(shares_table(record))
    print(f"{len(record['samples'])} samples ({record['split']}), protocol {record['protocol']['name']}")
    if args.out:
        print(f"wrote {write_shares(record, args.out)}")
    return 0
