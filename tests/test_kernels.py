"""kvp_gym.kernels: the torch paths against the dense definitions, every Triton kernel against its torch path.

Without a GPU the Triton kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py before
anything imports Triton: it is read when a kernel is decorated), on small shapes that still cross block edges
(the interpreter uses 32-row blocks). The interpreter computes bfloat16 dot products wrongly, so bfloat16 runs
only on a GPU (the test says so when skipped); float16 and float32 run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from kvp_gym.attention import AttentionSpec
from kvp_gym.kernels import choose, triton_available, use_backend
from kvp_gym.kernels.attention_stats import attention_stats
from kvp_gym.kernels.compaction import gather_rows
from kvp_gym.utility import attention_received, future_importance

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install -e '.[test]')")
# Tolerances of the Triton kernels against the torch path: both accumulate in float32 from the same input values
# (float16 products are exact in float32), so they differ by summation order only.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def dense_stats(q, k, reduce, query_valid, key_valid, spec, offset):
    """The definition, from the whole attention matrix [B, Hq, T, S]."""
    batch, q_heads, num_queries, _ = q.shape
    kv_heads, num_keys = k.shape[1], k.shape[2]
    logits = spec.logits(q.float(), k.float().repeat_interleave(q_heads // kv_heads, 1).transpose(-1, -2))
    hidden = spec.hidden(torch.arange(num_queries) + offset, torch.arange(num_keys)) | ~key_valid[:, None, None, :]
    probs = logits.masked_fill(hidden, float("-inf")).softmax(-1).nan_to_num(0.0) * query_valid[:, None, :, None]
    if reduce == "none":
        return probs.sum(2)
    grouped = probs.view(batch, kv_heads, q_heads // kv_heads, num_queries, num_keys)
    return (grouped.amax(2) if reduce == "max" else grouped.mean(2)).sum(2)


def ragged(batch: int, num_queries: int, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """query_valid, key_valid [B, T], [B, S]: row 0 full; row 1 padded at the end and counting a query range with a
    hole; row 2 (if any) with its first 40 keys invalid, so that its first query block sees no valid key."""
    query_valid = torch.ones(batch, num_queries, dtype=torch.bool)
    key_valid = torch.ones(batch, num_keys, dtype=torch.bool)
    if batch > 1:
        key_valid[1, num_keys - 11 :] = False
        query_valid[1, :5] = query_valid[1, num_queries - 11 :] = query_valid[1, 30:33] = False
    if batch > 2:
        key_valid[2, :40] = False
    return query_valid, key_valid


@pytest.mark.parametrize("reduce", ["max", "mean", "none"])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_torch_path_equals_the_dense_definition(reduce, group):
    torch.manual_seed(group)
    q, k = torch.randn(3, 2 * group, 50, 8) * 2, torch.randn(3, 2, 60, 8) * 2
    query_valid, key_valid = ragged(3, 50, 60)
    for spec in (AttentionSpec.standard(8), AttentionSpec(scale=0.2, sliding_window=9, softcap=3.0)):
        expected = dense_stats(q, k, reduce, query_valid, key_valid, spec, offset=10)
        with use_backend("torch"):
            got = attention_stats(q, k, reduce, query_valid, key_valid, spec, chunk=7)
            torch.testing.assert_close(got, expected)
            head = attention_stats(q, k, reduce, query_valid, key_valid, spec, query_offset=4, out_keys=30, chunk=64)
        torch.testing.assert_close(head, dense_stats(q, k, reduce, query_valid, key_valid, spec, offset=4)[..., :30])


def test_torch_path_inside_and_outside_inference_mode():
    """The torch path reuses a buffer per thread: one made under torch.inference_mode must not be written to
    outside it (an error torch raises), as when an end-to-end run and an evaluation share a process."""
    q, k = torch.randn(1, 3, 40, 8), torch.randn(1, 1, 50, 8)
    with use_backend("torch"):
        with torch.inference_mode():
            inside = attention_stats(q, k, "max")
        outside = attention_stats(q, k, "max")
        with torch.inference_mode():
            assert torch.equal(attention_stats(q, k, "max"), outside)
    assert torch.equal(inside, outside)


@pytest.mark.parametrize("reduce", ["max", "mean", "none"])
@pytest.mark.parametrize(
    "logit_scale, fast",
    [(1.0, True), (40.0, False), (-40.0, False)],
    ids=["moderate", "overflowing", "underflowing"],
)
def test_torch_path_without_and_with_the_maximum_subtracted(reduce, logit_scale, fast):
    """The torch path skips the row maximum when every row's sum of exp2 is finite and >= 2^-64, and computes a
    chunk again with it subtracted otherwise: row maxima up to 259 (log2 units: 2^259 overflows float32) or rows
    whose logits all lie between -242 and -49 (2^-150 underflows to 0) give the same result."""
    from kvp_gym.kernels.attention_stats import attention_stats_torch_with_path

    torch.manual_seed(5)
    q, k = torch.randn(2, 6, 40, 8), torch.randn(2, 2, 50, 8)
    if logit_scale > 0:
        q = q * logit_scale
    else:  # every logit negative: keys about (1, ..., 1), queries negative
        k = k.sign() * 0.01 + 1.0
        q = q.abs() * logit_scale
    query_valid, key_valid = ragged(2, 40, 50)
    spec = AttentionSpec.standard(8)
    expected = dense_stats(q, k, reduce, query_valid, key_valid, spec, offset=10)
    got, took_fast_path = attention_stats_torch_with_path(q, k, reduce, query_valid, key_valid, spec, None, None, 16)
    assert took_fast_path == fast
    torch.testing.assert_close(got, expected)
    assert torch.isfinite(got).all()


@needs_triton
@pytest.mark.parametrize(
    "reduce, group, dtype",
    [
        ("max", 3, torch.float32),
        ("max", 4, torch.float16),
        ("mean", 3, torch.float16),
        ("mean", 1, torch.float32),
        ("none", 4, torch.float32),
        ("none", 1, torch.float16),
    ],
)
def test_triton_attention_stats_equals_the_torch_path(reduce, group, dtype):
    """Ragged lengths, GQA groups, causal edges inside and across blocks; float16 and float32."""
    torch.manual_seed(group)
    q = (torch.randn(3, group, 70, 16) * 1.5).to(dtype)
    k = (torch.randn(3, 1, 70, 16) * 1.5).to(dtype)
    query_valid, key_valid = ragged(3, 70, 70)
    arguments = (q, k, reduce, query_valid, key_valid)
    with use_backend("torch"):
        expected = attention_stats(*arguments)
    with use_backend("triton"):
        got = attention_stats(*(a.to(DEVICE) for a in arguments[:2]), reduce, *(a.to(DEVICE) for a in arguments[3:]))
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCE)
    assert (expected[2, :, :40] == 0).all() and expected[2].sum() > 0  # the invalid keys receive nothing


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_window_softcap_scale_and_offset(dtype):
    """The sliding window and soft-cap of AttentionSpec, and queries that are the newest T of S tokens."""
    torch.manual_seed(5)
    q, k = (torch.randn(1, 4, 40, 16) * 3).to(dtype), (torch.randn(1, 2, 75, 16) * 3).to(dtype)
    spec = AttentionSpec(scale=0.3, sliding_window=21, softcap=4.0)
    with use_backend("torch"):
        expected = attention_stats(q, k, "max", attention=spec, out_keys=70)
    with use_backend("triton"):
        got = attention_stats(q.to(DEVICE), k.to(DEVICE), "max", attention=spec, out_keys=70)
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCE)
    assert (expected[..., : 75 - 40 - 20] == 0).all() and (expected[..., 75 - 40 - 20 :] > 0).all()  # the window


@needs_triton
def test_utility_functions_on_the_triton_backend():
    """future_importance (batched splits and lengths) and attention_received (padding, window) agree."""
    torch.manual_seed(6)
    q, k = torch.randn(2, 3, 66, 16), torch.randn(2, 66, 16)
    split, length = torch.tensor([33, 40]), torch.tensor([66, 50])
    mask = torch.arange(66) < torch.tensor([[66], [47]])
    results = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            results[backend] = (
                future_importance(q, k, split, length),
                attention_received(q, k, mask, window=20),
            )
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, expected, **TOLERANCE)


@needs_triton
@pytest.mark.skipif(DEVICE.type != "cuda", reason="the Triton interpreter computes bfloat16 dot products wrongly")
def test_triton_attention_stats_in_bfloat16():
    torch.manual_seed(7)
    q, k = torch.randn(2, 8, 300, 64, dtype=torch.bfloat16), torch.randn(2, 2, 300, 64, dtype=torch.bfloat16)
    with use_backend("torch"):
        expected = attention_stats(q.cpu(), k.cpu(), "max")
    with use_backend("triton"):
        got = attention_stats(q.to(DEVICE), k.to(DEVICE), "max")
    torch.testing.assert_close(got.cpu(), expected, **TOLERANCE)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_non_finite_inputs_are_refused(backend):
    q, k = torch.randn(1, 1, 20, 16), torch.randn(1, 1, 20, 16)
    q[0, 0, 7, 3] = float("nan")
    with use_backend(backend), pytest.raises(ValueError, match="NaN or infinity"):
        attention_stats(q.to(DEVICE), k.to(DEVICE), "max")


def test_bad_arguments_are_refused():
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8)
    cases = [
        ((q[0], k, "max"), {}, "queries: expected a 4-D"),
        ((q.long(), k, "max"), {}, "queries: expected float16"),
        ((q, torch.randn(2, 3, 10, 8), "max"), {}, "keys: expected"),
        ((q, k.half(), "max"), {}, "keys: expected torch.float32"),
        ((q, k, "sum"), {}, "reduce: expected"),
        ((q, k, "max"), {"query_valid": torch.ones(2, 9, dtype=torch.bool)}, "query_valid: expected a bool"),
        ((q, k, "max"), {"key_valid": torch.ones(2, 10)}, "key_valid: expected a bool"),
        ((q, k, "max"), {"query_offset": 1}, "query_offset: expected"),
        ((q, k, "max"), {"out_keys": 11}, "out_keys: expected"),
        ((q, k, "max"), {"chunk": 0}, "chunk: expected"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            attention_stats(*args, **kwargs)
    keys, values = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 6)
    with pytest.raises(ValueError, match=r"rows: expected row indices in \[0, 10\)"):
        gather_rows(keys, values, torch.tensor([[[0, 10]] * 2]))
    with pytest.raises(ValueError, match="rows: expected an int64"):
        gather_rows(keys, values, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="values: expected"):
        gather_rows(keys, values[:, :1], torch.zeros(1, 2, 3, dtype=torch.long))


def test_the_backend_switch(monkeypatch):
    assert choose(torch.device("cpu")) == "torch"
    with use_backend("torch"):
        assert choose(torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        use_backend("cuda").__enter__()
    monkeypatch.setattr("kvp_gym.kernels.triton_available", lambda: False)
    assert choose(torch.device("cuda")) == "torch"
    with use_backend("triton"), pytest.raises(RuntimeError, match="triton is not installed"):
        choose(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, pytest.param(torch.bfloat16, id="bfloat16")])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gather_rows_copies_the_kept_rows(backend, dtype):
    """Per-head rows of keys and values (different head dims, a non-contiguous input) into contiguous tensors."""
    torch.manual_seed(8)
    keys = torch.randn(2, 3, 16, 50).to(dtype).transpose(-1, -2)  # [2, 3, 50, 16], not contiguous
    values = torch.randn(2, 3, 50, 24).to(dtype)
    rows = torch.rand(2, 3, 50).argsort(-1)[..., :37].sort(-1).values
    with use_backend(backend):
        got_keys, got_values = gather_rows(keys.to(DEVICE), values.to(DEVICE), rows.to(DEVICE))
    for got, source in ((got_keys, keys), (got_values, values)):
        assert got.is_contiguous() and got.dtype == dtype
        expected = torch.stack([torch.stack([source[b, h, rows[b, h]] for h in range(3)]) for b in range(2)])
        assert torch.equal(got.cpu(), expected)
