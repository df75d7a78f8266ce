"""examples/: the single-file REINFORCE trains on KVEvict-v0 and prints its row beside the baselines."""

from __future__ import annotations

import importlib.util
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
