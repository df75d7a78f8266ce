"""Heuristic KV-cache eviction scorers, one file per method, registered in the ``kvp_gym.scorers`` entry points.

| name | file | needs queries | score (higher = keep) | reference |
|---|---|---|---|---|
| ``random`` | random.py | no | uniform noise from a seed | |
| ``streaming_llm`` | streaming_llm.py | no | 4 sink tokens, then recency | StreamingLLMPress |
| ``knorm`` | knorm.py | no | -‖k_i‖ | KnormPress |
| ``keydiff`` | keydiff.py | no | -cos(k_i, mean normalised key) | KeyDiffPress |
| ``lagkv`` | lagkv.py | no | rank in its partition of the lag-normalised K/V spread | LagKVPress |
| ``tova`` | tova.py | yes | attention of the last prompt query, mean over the layer's heads | TOVAPress |
| ``snapkv`` | snapkv.py | yes | pooled attention of the last 64 prompt queries | SnapKVPress |
| ``h2o`` | h2o.py | yes | accumulated attention / number of queries that saw the token | ObservedAttentionPress |
| ``expected_attention`` | expected_attention.py | yes | closed-form attention of Gaussian future queries x ‖v‖ | ExpectedAttentionPress |
| ``oracle`` | oracle.py | future | the true future importance (privileged upper bound) | |

References are NVIDIA kvpress's presses. Variants of ours, run by ``--policies all`` and labelled as such:
``tova:heads=group`` (the KV head's own GQA group only), ``h2o:recent=16`` (a protected window of recent tokens).
A method's own protected tokens are ranked inside by its own evidence, never by position (``common.keep_first``).
"""
