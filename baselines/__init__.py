"""Heuristic KV-cache eviction scorers, one file per method, registered in the ``kvp_gym.scorers`` entry points.

| name | needs queries | score (higher = keep) | reference (kvpress press) |
|---|---|---|---|
| ``random`` | no | uniform noise from a seed | |
| ``streaming_llm`` | no | 4 sink tokens, then recency | StreamingLLMPress |
| ``knorm`` | no | -‖k_i‖ | KnormPress |
| ``keydiff`` | no | -cos(k_i, mean normalised key) | KeyDiffPress |
| ``lagkv`` | no | rank in its partition of the lag-normalised K/V spread | LagKVPress |
| ``tova`` | yes | attention of the last prompt query, mean over the layer's heads | TOVAPress |
| ``snapkv`` | yes | pooled attention of the last 64 prompt queries | SnapKVPress |
| ``h2o`` | yes | accumulated attention / number of queries that saw the token | ObservedAttentionPress |
| ``expected_attention`` | yes | closed-form attention of Gaussian future queries x ‖v‖ | ExpectedAttentionPress |
| ``oracle`` | future | the true future importance (privileged upper bound) | |

One file per method, named after it; the reference is NVIDIA kvpress's press. Variants of ours, run by
``--policies all`` and labelled as such:
``tova:heads=group`` (the KV head's own GQA group only), ``h2o:recent=16`` (a protected window of recent tokens).
A method's own protected tokens are ranked inside by its own evidence, never by position (``common.keep_first``).

Each baseline imports kvp_gym.scorers (the contract), kvp_gym.utility or kvp_gym.attention where its formula needs
them, and common.py; never the agents or the leaderboard.
"""
