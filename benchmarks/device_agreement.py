"""Compare two evaluate-e2e runs of the same settings on two devices (``make gpu-check``: CPU and CUDA).

    python benchmarks/device_agreement.py runs/gpu-check/e2e-cpu runs/gpu-check/e2e-cuda

Prints, per policy and budget: how many task prompts got the same greedy output on both devices, the accuracy on
each, and the largest relative difference of an essay's perplexity; then the full cache's. Greedy decoding in
another float arithmetic (a GPU's reductions, TF32, fused kernels) can flip a near-tied token, so a few differing
outputs are expected; accuracies should agree within that. Exits 1 if the runs' settings differ (not the same
experiment), 0 otherwise: the numbers are for reading, not a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvp_gym.evaluation.end_to_end import read_parts
from kvp_gym.evaluation.report import FULL_CACHE
from kvp_gym.evaluation.run_folder import read_settings, settings_differences


def compare(first: Path, second: Path) -> list[str]:
    """The table's lines (header first) comparing the run folders ``first`` and ``second``."""
    a_parts, b_parts = read_parts(first), read_parts(second)
    prompts = [key for key in a_parts if key[0] != "essay"]
    essays = [key for key in a_parts if key[0] == "essay"]
    labels = list(next(iter(a_parts.values()))["policies"])
    budgets = list(next(iter(a_parts.values()))["policies"][labels[0]]["budgets"])
    lines = [
        f"{'policy':24s} {'budget':>6s} {'same output':>12s} {'accuracy A':>10s} {'accuracy B':>10s} {'ppl rel':>8s}"
    ]
    rows = [(FULL_CACHE, None)] + [(label, budget) for label in labels for budget in budgets]
    for label, budget in rows:
        a = {key: _result(a_parts[key], label, budget) for key in a_parts}
        b = {key: _result(b_parts[key], label, budget) for key in b_parts}
        same = sum(a[k]["output"] == b[k]["output"] for k in prompts)
        accuracy = [sum(run[k]["score"] for k in prompts) / max(1, len(prompts)) for run in (a, b)]
        ppl = [abs(a[k]["perplexity"] / b[k]["perplexity"] - 1) for k in essays]
        lines.append(
            f"{label:24s} {budget or '-':>6s} {f'{same}/{len(prompts)}':>12s} {accuracy[0]:10.3f} {accuracy[1]:10.3f} "
            f"{max(ppl, default=0.0):8.1e}"
        )
    return lines


def _result(part: dict, label: str, budget: str | None) -> dict:
    """One sample's result for ``label`` at ``budget`` (None: the full cache's)."""
    return part[FULL_CACHE] if budget is None else part["policies"][label]["budgets"][budget]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path, help="an evaluate-e2e output folder (e.g. the CPU run)")
    parser.add_argument("second", type=Path, help="the same settings on another device")
    args = parser.parse_args(argv)
    changed = settings_differences(read_settings(args.first), read_settings(args.second))
    if changed:
        print(f"not the same experiment: {'; '.join(changed)}", file=sys.stderr)
        return 1
    print(f"A = {args.first}, B = {args.second}")
    print("\n".join(compare(args.first, args.second)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
