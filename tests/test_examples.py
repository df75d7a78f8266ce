"""examples/: the single-file REINFORCE trains on KVEvict-v0 and prints its row beside the baselines."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

EXAMPLE = Path(__file__).parents[1] / "examples" / "reinforce.py"


def test_reinforce_example_trains_and_reports_beside_the_baselines(tiny_trace, capsys):
    spec = importlib.util.spec_from_file_location("reinforce_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    record = example.main(
        ["--traces", str(tiny_trace), "--steps", "3", "--episodes", "2", "--rankings", "2", "--eval-split", "val"]
    )
    out = capsys.readouterr().out
    mine = "reinforce (examples/reinforce.py)"
    assert list(record["policies"]) == [mine, *example.BASELINES]
    assert record["protocol"]["name"] == "paper" and record["split"] == "val"
    assert 0 < record["policies"][mine]["holistic_score"]["mean"] <= 1
    assert mine in out and "streaming_llm" in out and "tova" in out


def test_reinforce_example_trains_for_its_time_budget_and_says_what_comes_next(tiny_trace, capsys):
    spec = importlib.util.spec_from_file_location("reinforce_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--traces", str(tiny_trace), "--minutes", "0.05", "--episodes", "2", "--rankings", "2"])
    captured = capsys.readouterr()
    # The bar counts the 3 s of the budget (not the 10,000 --steps), so its estimate is the training time left.
    assert re.search(r"REINFORCE: 100%\|.*\| 3/3 s \[.*updates", captured.err)
    updates = int(re.search(r"^trained: (\d+) updates in 0\.\d min", captured.out, re.MULTILINE)[1])
    assert 1 <= updates < 10_000
    announced = captured.out.index("evaluating the policy and 7 baselines on the val split")
    assert announced < captured.out.index("evaluated in ") < captured.out.index("\npolicy ")  # before the table
