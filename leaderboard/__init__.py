"""The kvp-gym leaderboard: standard benchmarks, validated submissions, and the board (a static site).

- :mod:`.benchmark`: frozen benchmark definitions (leaderboard/benchmarks/*.toml), their trace sets and manifests;
- :mod:`.submission`: the standard evaluation of a policy into a submission entry, and its validation;
- :mod:`.site`: the board: a static HTML page, its plots and a Markdown table;
- :mod:`.cli`: ``kvp-gym leaderboard prepare|validate|build`` and ``kvp-gym submit``.

Installed as ``kvp_gym_leaderboard``; it builds on kvp_gym, the baselines and the agents, and nothing imports it.
"""
