"""Heuristic KV-cache eviction scorers, one file per method, registered in the ``kvp_gym.scorers`` entry points.

| name | file | needs queries | score (higher = keep) |
|---|---|---|---|
| ``random`` | random.py | no | uniform noise from a seed |
| ``streaming_llm`` | streaming_llm.py | no | 4 sink tokens, then recency |
| ``knorm`` | knorm.py | no | -‖k_i‖ |
| ``keydiff`` | keydiff.py | no | -cos(k_i, mean normalised key) |
| ``lagkv`` | lagkv.py | no | per-partition std of lag-normalised K and V |
| ``tova`` | tova.py | yes | attention of the last prompt query |
| ``snapkv`` | snapkv.py | yes | pooled attention of the last 64 prompt queries |
| ``h2o`` | h2o.py | yes | accumulated attention, normalised, plus a recent window |
| ``oracle`` | oracle.py | future | the true future importance (privileged upper bound) |
"""

from baselines.common import KEEP

__all__ = ["KEEP"]
