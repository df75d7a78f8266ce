"""The kvp-gym leaderboard: standard benchmarks, validated submissions, and the board (a static site).

- :mod:`.definition`: frozen benchmark definitions (leaderboard/benchmarks/*.toml), one part per model they cover;
- :mod:`.benchmark`: each part's trace set and the manifest that pins it;
- :mod:`.submission`: the standard evaluation of a policy into a submission entry, and its validation;
  :mod:`.policy`: an entry's kind and labels; :mod:`.records`: its raw records and the numbers they give;
- :mod:`.site`, :mod:`.page`, :mod:`.plots`: the boards (one per benchmark and model): a static HTML page, its plots
  and a Markdown table;
- :mod:`.cli`: ``kvp-gym leaderboard prepare|validate|build`` and ``kvp-gym submit``.

Installed as ``kvp_gym_leaderboard``; it builds on kvp_gym, the baselines and the agents, and nothing imports it.
"""
