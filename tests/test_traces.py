"""Trace format v2: round trip, one-head reads, the seal and the checksums, version-1 files, and a clear
TraceFormatError for every kind of bad file."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kvp_gym.traces import (
    ModelGeometry,
    SampleInfo,
    TraceFormatError,
    TraceFormatWarning,
    TraceHeader,
    merge_traces,
    open_traces,
    write_traces,
)
from kvp_gym.traces.seal import seal_file

V1_FILE = Path(__file__).parent / "data" / "trace-v1.h5"  # written by kvp-gym 0.1.0 (format version 1)

GEOMETRY = ModelGeometry(
    num_layers=3,
    num_query_heads=6,
    num_kv_heads=2,
    head_dim=8,
    kv_head_of_query=(0, 0, 0, 1, 1, 1),
    rope='{"rope_theta": 10000.0}',
    sliding_window=0,
    vocab_size=100,
)
HEADER = TraceHeader(
    model="synthetic", geometry=GEOMETRY, layers=(0, 2), collection=({"task": "x"},), kvp_gym_version="test"
)


def _sample(name: str, num_tokens: int, rng: np.random.Generator, split: str = "train"):
    info = SampleInfo(
        name=name,
        index=int(name[-1]),
        task="x",
        split=split,
        prompt_length=num_tokens - 3,
        tokens=rng.integers(0, 100, num_tokens, dtype=np.int32),
        answers=("42",),
        needle_spans=np.array([[2, 5]], np.int32),
        metadata={"depth": 0.5},
    )
    tensors = {
        layer: [rng.standard_normal((h, num_tokens, 8)).astype(np.float32) for h in (6, 2, 2)]
        for layer in HEADER.layers
    }
    return info, tensors


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(0)
    samples = [_sample("s0", 20, rng), _sample("s1", 13, rng, split="test")]
    path = tmp_path / "t.h5"
    write_traces(path, HEADER, samples)
    return path, samples


def test_round_trip(written):
    path, samples = written
    with open_traces(path) as trace:
        assert trace.header == HEADER
        assert [s.name for s in trace.split("train")] == ["s0"] and [s.name for s in trace.split("test")] == ["s1"]
        for info, tensors in samples:
            got = trace.samples[info.name]
            assert got.prompt_length == info.prompt_length and got.answers == info.answers
            assert got.metadata == info.metadata and got.future_source == "greedy"
            np.testing.assert_array_equal(got.tokens, info.tokens)
            np.testing.assert_array_equal(got.needle_spans, info.needle_spans)
            for layer in HEADER.layers:
                queries, keys, values = (np.asarray(t, np.float16) for t in tensors[layer])
                for kv_head in range(2):
                    head = trace.head(info.name, layer, kv_head)
                    group = [h for h in range(6) if GEOMETRY.kv_head_of_query[h] == kv_head]
                    assert head.queries.dtype == torch.float16 and head.queries.shape == (
                        3,
                        info.num_tokens,
                        8,
                    )
                    np.testing.assert_array_equal(head.queries.numpy(), queries[group])
                    np.testing.assert_array_equal(head.keys.numpy(), keys[kv_head])
                    np.testing.assert_array_equal(head.values.numpy(), values[kv_head])
                    assert head.prompt_length == info.prompt_length
                    assert torch.equal(head.positions, torch.arange(info.num_tokens))
        assert list(trace.check()) == []


def test_one_head_is_one_chunk(written):
    """Chunks are (1, S, D): reading one KV head touches only that head's chunk."""
    path, _ = written
    with h5py.File(path) as h5:
        for tensor in ("queries", "keys", "values"):
            dataset = h5[f"samples/s0/layers/0/{tensor}"]
            assert dataset.chunks == (1, 20, 8) and dataset.compression is None


def test_non_contiguous_gqa_groups(tmp_path):
    """A GQA mapping whose groups interleave (h % H_kv) reads the right query heads."""
    geometry = ModelGeometry(**{**GEOMETRY.__dict__, "kv_head_of_query": (0, 1, 0, 1, 0, 1)})
    header = TraceHeader(**{**HEADER.__dict__, "geometry": geometry})
    info, tensors = _sample("s0", 10, np.random.default_rng(1))
    write_traces(tmp_path / "t.h5", header, [(info, tensors)])
    with open_traces(tmp_path / "t.h5") as trace:
        head = trace.head("s0", 2, 1)
    np.testing.assert_array_equal(head.queries.numpy(), np.asarray(tensors[2][0], np.float16)[[1, 3, 5]])


def test_writer_rejects_bad_tensors(tmp_path):
    info, tensors = _sample("s0", 10, np.random.default_rng(2))
    tensors[0][1] = tensors[0][1][:, :9]
    with pytest.raises(ValueError, match=r"layer 0 keys: expected \[heads, 10, 8\]"):
        write_traces(tmp_path / "bad.h5", HEADER, [(info, tensors)])
    info, tensors = _sample("s0", 10, np.random.default_rng(2))
    tensors[2][2][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_traces(tmp_path / "bad.h5", HEADER, [(info, tensors)])
    assert not (tmp_path / "bad.h5").exists()  # nothing half-written under the final name
    assert list(tmp_path.iterdir()) == []


def _edit(path, action, reseal=True):
    """Edit a file with h5py; ``reseal`` recomputes the seal, as a writer that broke the format would, so that
    validation alone has to refuse the result."""
    with h5py.File(path, "r+") as h5:
        action(h5)
    if reseal:
        seal_file(path)


CORRUPTIONS = {
    "missing attribute": (lambda h5: h5.attrs.__delitem__("head_dim"), "/@head_dim", "missing attribute"),
    "unknown version": (
        lambda h5: h5.attrs.__setitem__("format_version", 7),
        "/@format_version",
        "unknown format version 7",
    ),
    "missing dataset": (
        lambda h5: h5.__delitem__("samples/s1/layers/2/values"),
        "samples/s1/layers/2/values",
        "missing dataset",
    ),
    "wrong shape": (
        lambda h5: (
            h5.__delitem__("samples/s0/layers/0/keys"),
            h5.create_dataset("samples/s0/layers/0/keys", data=np.zeros((2, 19, 8), np.float16)),
        ),
        "samples/s0/layers/0/keys",
        r"expected float16 \[2, 20, 8\].*found float16 \[2, 19, 8\]",
    ),
    "wrong dtype": (
        lambda h5: (
            h5.__delitem__("samples/s0/layers/0/keys"),
            h5.create_dataset("samples/s0/layers/0/keys", data=np.zeros((2, 20, 8), np.float32)),
        ),
        "samples/s0/layers/0/keys",
        "found float32",
    ),
    "bad split": (
        lambda h5: h5["samples/s0"].attrs.__setitem__("split", "holdout"),
        "samples/s0/@split",
        "expected one of",
    ),
    "prompt too long": (
        lambda h5: h5["samples/s0"].attrs.__setitem__("prompt_length", 21),
        "samples/s0/@prompt_length",
        "0 < prompt_length <= 20",
    ),
    "bad gqa map": (
        lambda h5: h5.attrs.__setitem__("kv_head_of_query", [0, 0, 0, 1, 1, 2]),
        "/@kv_head_of_query",
        "KV head ids",
    ),
    "bad json": (
        lambda h5: h5["samples/s1"].attrs.__setitem__("answers", "[oops"),
        "samples/s1/@answers",
        "invalid JSON",
    ),
    "missing samples": (lambda h5: h5.__delitem__("samples"), "samples", "missing group"),
    "attention not json": (lambda h5: h5.attrs.__setitem__("attention", "{"), "/@attention", "invalid JSON"),
    "attention layers missing": (
        lambda h5: h5.attrs.__setitem__("attention", '{"layers": [], "rotary": null}'),
        "/@attention",
        "expected 3 layer specs, found 0",
    ),
    "attention negative window": (
        lambda h5: h5.attrs.__setitem__(
            "attention",
            '{"layers": [{"scale": 0.3, "sliding_window": -2, "softcap": 0}, '
            '{"scale": 0.3, "sliding_window": 0, "softcap": 0}, {"scale": 0.3, "sliding_window": 0, "softcap": 0}]}',
        ),
        "/@attention",
        "sliding_window >= 0",
    ),
    "answers not a list": (
        lambda h5: h5["samples/s0"].attrs.__setitem__("answers", "5"),
        "samples/s0/@answers",
        "JSON list",
    ),
    "answers not strings": (
        lambda h5: h5["samples/s0"].attrs.__setitem__("answers", "[1, 2]"),
        "samples/s0/@answers",
        "list of strings",
    ),
    "metadata not an object": (
        lambda h5: h5["samples/s0"].attrs.__setitem__("metadata", "[]"),
        "samples/s0/@metadata",
        "JSON object",
    ),
    "NaN full-cache score": (
        lambda h5: h5["samples/s0"].attrs.__setitem__("metadata", '{"full_cache_score": NaN}'),
        "samples/s0/@metadata",
        r"full_cache_score must be a number in \[0, 1\]",
    ),
    "collection of non-objects": (lambda h5: h5.attrs.__setitem__("collection", "[1]"), "/@collection", "objects"),
    "KV head without query heads": (
        lambda h5: h5.attrs.__setitem__("kv_head_of_query", [0, 0, 0, 0, 0, 0]),
        "/@kv_head_of_query",
        r"KV heads \[1\] have no query head",
    ),
    "duplicate layers": (lambda h5: h5.attrs.__setitem__("layers", [0, 0]), "/@layers", "unique layer ids"),
    "unsorted layers": (lambda h5: h5.attrs.__setitem__("layers", [2, 0]), "/@layers", "ascending order"),
    "tokens outside the vocabulary": (
        lambda h5: h5["samples/s0/tokens"].__setitem__(3, 100),
        "samples/s0/tokens",
        r"token ids must lie in \[0, 100\)",
    ),
    "unknown group": (lambda h5: h5.create_group("extra"), "extra", "unknown member"),
    "unknown attribute": (lambda h5: h5["samples/s1"].attrs.__setitem__("note", 1), "samples/s1/@note", "unknown"),
    "copied sample": (lambda h5: h5.copy(h5["samples/s0"], h5["samples"], name="s9"), "samples/s9", "a copy of"),
    "hard link": (lambda h5: h5["samples"].__setitem__("s9", h5["samples/s0"]), "samples/s0", "2 hard links"),
    "soft link": (
        lambda h5: h5["samples"].__setitem__("s9", h5py.SoftLink("/samples/s0")),
        "samples/s9",
        "a soft link; trace files hold no links",
    ),
    "external link": (
        lambda h5: h5["samples"].__setitem__("s9", h5py.ExternalLink("other.h5", "/samples/s0")),
        "samples/s9",
        "an external link",
    ),
    "dataset without checksums": (
        lambda h5: (
            h5.__delitem__("samples/s0/tokens"),
            h5.create_dataset("samples/s0/tokens", data=np.ones(20, np.int32)),
        ),
        "samples/s0/tokens",
        "Fletcher-32",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_open_names_file_field_and_expectation(written, case):
    path, _ = written
    action, where, message = CORRUPTIONS[case]
    _edit(path, action)
    with pytest.raises(TraceFormatError, match=message) as caught:
        open_traces(path)
    assert caught.value.file == str(path) and caught.value.where == where
    assert str(path) in str(caught.value)


def test_attention_semantics_round_trip_and_older_files_read_as_standard(tmp_path, written):
    from kvp_gym.attention import AttentionSpec, Rotary

    header = dataclasses.replace(
        HEADER,
        attention=(AttentionSpec(0.25), AttentionSpec(0.25, sliding_window=8), AttentionSpec(0.1, softcap=50.0)),
        rotary=Rotary.default(8, 10000.0),
    )
    rng = np.random.default_rng(1)
    write_traces(tmp_path / "a.h5", header, [_sample("s0", 12, rng)])
    with open_traces(tmp_path / "a.h5") as trace:
        assert trace.header == header and trace.header.attention_of(1).sliding_window == 8
    with pytest.raises(TraceFormatError, match="attention"):
        merge_traces(tmp_path / "m.h5", [written[0], tmp_path / "a.h5"])
    # One RoPE per layer (Gemma 3: other bases for local and global layers) is written as a list, a shared one as
    # one object, as files have always held it.
    per_layer = dataclasses.replace(header, rotary=(Rotary.default(8, 1e4), None, Rotary.default(8, 1e6)))
    write_traces(tmp_path / "p.h5", per_layer, [_sample("s0", 12, rng)])
    with open_traces(tmp_path / "p.h5") as trace:
        assert trace.header == per_layer and trace.header.rotary_of(2) == Rotary.default(8, 1e6)
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "p.h5") as p:
        assert isinstance(json.loads(a.attrs["attention"])["rotary"], dict)
        assert [r and r["inv_freq"][1] for r in json.loads(p.attrs["attention"])["rotary"]] == pytest.approx(
            [1e4**-0.25, None, 1e6**-0.25]
        )
    _edit(
        tmp_path / "p.h5",
        lambda h5: h5.attrs.__setitem__(
            "attention", json.dumps({**json.loads(h5.attrs["attention"]), "rotary": [None]})
        ),
    )
    with pytest.raises(TraceFormatError, match="expected 3 layer rotaries, found 1"):
        open_traces(tmp_path / "p.h5")


def test_version_1_files_read_with_a_warning_and_upgrade_to_the_same_content(tmp_path):
    with pytest.warns(TraceFormatWarning, match="version 1 has no checksums.*traces upgrade"):
        old = open_traces(V1_FILE)
    upgraded = tmp_path / "v2.h5"
    with pytest.warns(TraceFormatWarning):
        merge_traces(upgraded, [V1_FILE])  # what `kvp-gym traces upgrade` runs
    with old, open_traces(upgraded) as new:
        assert not old.sealed and new.sealed and new.header.format_version == 2 and old.header.format_version == 1
        assert new.header == dataclasses.replace(old.header, format_version=2)
        assert list(new.samples) == list(old.samples) and list(new.check()) == []
        for name, info in old.samples.items():
            assert dataclasses.asdict(new.samples[name]).keys() == dataclasses.asdict(info).keys()
            np.testing.assert_array_equal(new.samples[name].tokens, info.tokens)
            assert new.samples[name].metadata == info.metadata and new.samples[name].answers == info.answers
            for layer in old.header.layers:
                for a, b in zip(old.tensors(name)[layer], new.tensors(name)[layer], strict=True):
                    np.testing.assert_array_equal(a, b)


def test_version_1_files_written_before_attention_was_recorded(tmp_path):
    """They read as standard attention with RoPE from the recorded theta; from a sliding-window model, refused."""
    from kvp_gym.attention import AttentionSpec, Rotary

    path = tmp_path / "old.h5"
    shutil.copy(V1_FILE, path)
    _edit(path, lambda h5: h5.attrs.__delitem__("attention"), reseal=False)
    with pytest.warns(TraceFormatWarning), open_traces(path) as trace:
        assert trace.header.attention == (AttentionSpec.standard(16),) * 2
        assert trace.header.rotary == (Rotary.default(16, 10000.0),) * 2
    _edit(path, lambda h5: h5.attrs.__setitem__("sliding_window", 16), reseal=False)
    with pytest.raises(TraceFormatError, match="does not record which layers slide"):
        open_traces(path)


def test_version_1_metadata_that_hangs_the_hdf5_library_is_refused(tmp_path, monkeypatch):
    """Zeroed bytes in the heap of string attributes make HDF5 loop forever; the probe's deadline refuses it."""
    from kvp_gym.traces import seal

    data = bytearray(V1_FILE.read_bytes())
    heap = data.index(b"GCOL")
    data[heap + 16 : heap + 16 + 512] = bytes(512)
    path = tmp_path / "hangs.h5"
    path.write_bytes(bytes(data))
    monkeypatch.setattr(seal, "UNSEALED_PROBE_SECONDS", 3.0)
    with pytest.raises(TraceFormatError, match="did not finish reading the metadata in 3 s"):
        open_traces(path)


def test_edits_after_sealing_are_refused(written):
    """An attribute changed in place (same size), and a new group (the file grows): both break the seal."""
    path, _ = written
    _edit(path, lambda h5: h5["samples/s0"].attrs.__setitem__("split", "test!"), reseal=False)
    with pytest.raises(TraceFormatError, match="sealed"):
        open_traces(path)


@pytest.mark.parametrize("where", ["user block", "metadata", "tensor", "seal"])
def test_a_flipped_byte_anywhere_is_refused(written, tmp_path, where):
    path, _ = written
    data = bytearray(path.read_bytes())
    seal_offset = json.loads(data[len(b"kvp-gym trace seal\n") : data.index(b"\n", 20)])["seal_offset"]
    with h5py.File(path) as h5:
        chunk = h5["samples/s1/layers/2/keys"].id.get_chunk_info(1)
    at = {
        "user block": 40,
        "metadata": 600,
        "tensor": chunk.byte_offset + 10,
        "seal": seal_offset + 30,
    }[where]
    data[at] ^= 0x10
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(bytes(data))
    if where != "tensor":
        with pytest.raises(TraceFormatError, match="damaged|differ from what the file was sealed"):
            open_traces(damaged)
        return
    with open_traces(damaged) as trace:  # chunks are verified when read
        trace.head("s1", 2, 0)
        with pytest.raises(TraceFormatError, match="checksum mismatch") as caught:
            trace.head("s1", 2, 1)
        assert caught.value.where == "samples/s1/layers/2/keys"
        assert [p.where for p in trace.check()] == ["/", "samples/s1/layers/2/keys"]


def test_nan_is_reported_on_read_and_by_check(written):
    path, _ = written
    _edit(path, lambda h5: h5["samples/s1/layers/2/queries"].__setitem__((4, 0, 0), np.inf))
    with open_traces(path) as trace:
        trace.head("s1", 2, 0)  # kv head 0's group (query heads 0-2) is clean
        with pytest.raises(TraceFormatError, match="NaN or Inf") as caught:
            trace.head("s1", 2, 1)
        assert caught.value.where == "samples/s1/layers/2/queries"
        problems = list(trace.check())
    assert [p.where for p in problems] == ["samples/s1/layers/2/queries"]


@pytest.mark.parametrize("keep", [0.98, 0.5, 0.02])
def test_truncated_file(written, tmp_path, keep):
    path, _ = written
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: int(len(data) * keep)])

    def read_everything():
        with open_traces(cut) as trace:
            list(trace.check())

    with pytest.raises(TraceFormatError, match="truncated or corrupt") as caught:
        read_everything()
    assert caught.value.file == str(cut)


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(TraceFormatError, match=r"junk.h5: /: not a readable HDF5 file"):
        open_traces(junk)
    with pytest.raises(TraceFormatError, match="no such file"):
        open_traces(tmp_path / "absent.h5")


def test_merge_joins_and_refuses_collisions_and_mismatches(written, tmp_path):
    path, samples = written
    rng = np.random.default_rng(5)
    other = tmp_path / "other.h5"
    write_traces(other, HEADER, [_sample("s2", 9, rng)])
    merged = tmp_path / "merged.h5"
    merge_traces(merged, [other, path])
    with open_traces(merged) as trace:
        assert list(trace.samples) == ["s0", "s1", "s2"]
        np.testing.assert_array_equal(trace.head("s2", 0, 0).keys.numpy(), trace.head("s2", 0, 0).keys.numpy())
    with pytest.raises(TraceFormatError, match="sample also present in"):
        merge_traces(tmp_path / "dup.h5", [path, merged])
    mismatched = tmp_path / "mismatched.h5"
    shutil.copy(other, mismatched)
    _edit(mismatched, lambda h5: h5.attrs.__setitem__("model", "another-model"))
    with pytest.raises(TraceFormatError, match="cannot merge.*model differs"):
        merge_traces(tmp_path / "bad.h5", [path, mismatched])
    assert not (tmp_path / "dup.h5").exists() and not (tmp_path / "bad.h5").exists()
