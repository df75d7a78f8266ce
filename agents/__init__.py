"""Learned eviction scorers: the KVP per-head network (kvp.py), its checkpoints (checkpoint.py), its RLOO trainer
(train.py) and Stable-Baselines3 recipes (sb3.py)."""

from agents.checkpoint import KVPScorer, load, save_checkpoint

__all__ = ["KVPScorer", "load", "save_checkpoint"]
