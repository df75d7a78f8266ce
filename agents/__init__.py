"""Learned eviction scorers: the KVP per-head network (kvp.py), its checkpoints (checkpoint.py), its RLOO trainer
(train.py: the loop; data.py: episodes, pools, prefetch; learner.py: network, optimiser, resume state;
distributed.py: torchrun processes; settings and command line in config.py) and Stable-Baselines3 recipes (sb3.py).

Installed as ``kvp_gym_agents``. ``kvp_gym_agents.load``, ``.KVPScorer`` and ``.save_checkpoint`` come from
checkpoint.py, imported on first use (it loads torch; ``kvp-gym --help`` imports this package to find the ``train``
command). Imports nothing when loaded.
"""

__all__ = ["KVPScorer", "load", "save_checkpoint"]


def __getattr__(name: str):
    if name in __all__:
        from kvp_gym_agents import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'kvp_gym_agents' has no attribute {name!r}")
