"""Fuzzing the trace reader: seeded mutants of a valid trace file, each run through every command that reads traces.

``tests/test_fuzz.py`` runs a small set in the suite; ``make fuzz`` runs hundreds::

    python tests/fuzz_traces.py --mutants 300 --source FILE [--timeout 30] [--seed 0]

A mutant is a copy of the source file damaged at the byte level (flipped bytes, a truncation, a zeroed block,
zeroed bytes in the HDF5 heap that holds string attributes) or edited with h5py (an attribute of the wrong type or
out of range, a duplicated or linked sample, an unknown group, a NaN in a tensor, ...). With ``--reseal``, edits
that break the format are also applied to a version-2 file and its integrity record recomputed, so that the
strict validation, not the checksums, has to refuse them.

Each mutant goes through ``kvp-gym traces check``, ``kvp-gym traces info``, ``kvp-gym evaluate`` and
``gym.make("KVEvict-v0") + reset + step``, each in a forked child with a timeout, and each outcome is one of:

- ``error``: a clean refusal (a ``kvp-gym: error`` message or a problem report; a TraceFormatError or ValueError
  from the environment);
- ``traceback``: any other exception;
- ``hang``: no answer within the timeout;
- ``accepted``: the command succeeded on a corrupt file with an output that differs from the original's (for
  ``traces check``, whose output is a verdict: it called the file OK although its content differs);
- ``unaffected``: it succeeded with the original's output.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

COMMANDS = ("traces check", "traces info", "evaluate", "KVEvict-v0")
OUTCOMES = ("error", "traceback", "hang", "accepted", "unaffected")


@dataclass(frozen=True)
class Mutant:
    path: Path
    kind: str  # "flip1", "truncate", "structured:answers-int", ...


# -- byte-level damage ----------------------------------------------------------------------------------------------
def _flip(count: int) -> Callable[[bytearray, random.Random], bytearray]:
    def mutate(data: bytearray, rng: random.Random) -> bytearray:
        for at in rng.sample(range(len(data)), count):
            data[at] ^= rng.randrange(1, 256)
        return data

    return mutate


def _truncate(data: bytearray, rng: random.Random) -> bytearray:
    return data[: rng.randrange(0, len(data))]


def _zero_block(data: bytearray, rng: random.Random) -> bytearray:
    at = rng.randrange(0, len(data) - 512)
    data[at : at + 512] = bytes(512)
    return data


def _zero_heap(data: bytearray, rng: random.Random) -> bytearray:
    """Zero 512 bytes inside the global heap (variable-length strings: the file's JSON attributes live there)."""
    heaps = [i for i in range(len(data)) if data.startswith(b"GCOL", i)] or [rng.randrange(0, len(data) - 600)]
    at = rng.choice(heaps) + rng.randrange(16, 64)
    data[at : at + 512] = bytes(512)
    return data


BYTE_MUTATIONS = {
    "flip1": _flip(1),
    "flip10": _flip(10),
    "flip1000": _flip(1000),
    "truncate": _truncate,
    "zero512": _zero_block,
    "zero-heap": _zero_heap,
}


# -- structured edits (h5py) ----------------------------------------------------------------------------------------
def _samples(h5: h5py.File) -> list[str]:
    return sorted(h5["samples"])


def _sample(h5: h5py.File, rng: random.Random) -> h5py.Group:
    return h5["samples"][rng.choice(_samples(h5))]


def _set_sample_attr(name: str, value) -> Callable:
    def edit(h5: h5py.File, rng: random.Random) -> None:
        _sample(h5, rng).attrs[name] = value

    return edit


def _set_file_attr(name: str, value) -> Callable:
    def edit(h5: h5py.File, rng: random.Random) -> None:
        h5.attrs[name] = value

    return edit


def _delete_attr(name: str, on_sample: bool) -> Callable:
    def edit(h5: h5py.File, rng: random.Random) -> None:
        del (_sample(h5, rng) if on_sample else h5).attrs[name]

    return edit


def _replace_dataset(make: Callable[[np.ndarray, h5py.File], np.ndarray], tensor: str) -> Callable:
    """Replace one dataset of a sample (``tokens`` / ``needle_spans``, or a layer's tensor) by ``make(old)``."""

    def edit(h5: h5py.File, rng: random.Random) -> None:
        group = _sample(h5, rng)
        if tensor in ("queries", "keys", "values"):
            group = group["layers"][rng.choice(sorted(group["layers"]))]
        old = group[tensor][()]
        del group[tensor]
        group.create_dataset(tensor, data=make(old, h5))

    return edit


def _write_into(tensor: str, value: float) -> Callable:
    """An in-place write through HDF5 (HDF5 recomputes any chunk checksum): one tensor element set to ``value``."""

    def edit(h5: h5py.File, rng: random.Random) -> None:
        group = _sample(h5, rng)["layers"]
        data = group[rng.choice(sorted(group))][tensor]
        index = tuple(rng.randrange(n) for n in data.shape)
        data[index] = value

    return edit


def _duplicate(kind: str) -> Callable:
    def edit(h5: h5py.File, rng: random.Random) -> None:
        source = rng.choice(_samples(h5))
        task, digest, index = source.rsplit("-", 2)
        new = f"{task}-{digest}-{int(index) + 100:06d}"
        samples = h5["samples"]
        if kind == "copy":
            h5.copy(samples[source], samples, name=new)
        elif kind == "copy-renumbered":
            h5.copy(samples[source], samples, name=new)
            samples[new].attrs["index"] = int(index) + 100
        elif kind == "hard":
            samples[new] = samples[source]
        elif kind == "soft":
            samples[new] = h5py.SoftLink(f"/samples/{source}")
        elif kind == "external":
            samples[new] = h5py.ExternalLink("elsewhere.h5", "/samples/x")
        elif kind == "dangling":
            samples[new] = h5py.SoftLink("/nowhere")

    return edit


def _extra(where: str) -> Callable:
    def edit(h5: h5py.File, rng: random.Random) -> None:
        if where == "root-group":
            h5.create_group("extra")
        elif where == "sample-dataset":
            _sample(h5, rng).create_dataset("extra", data=np.zeros(3))
        elif where == "layer-group":
            _sample(h5, rng)["layers"].create_group("7")
        elif where == "root-attr":
            h5.attrs["extra"] = 1
        elif where == "sample-attr":
            _sample(h5, rng).attrs["extra"] = "x"

    return edit


def _delete(what: str) -> Callable:
    def edit(h5: h5py.File, rng: random.Random) -> None:
        group = _sample(h5, rng)
        if what == "sample":
            del h5["samples"][group.name.rsplit("/", 1)[1]]
        elif what == "layer":
            del group["layers"][sorted(group["layers"])[-1]]
        elif what == "keys":
            del group["layers"][sorted(group["layers"])[0]]["keys"]
        else:
            del group[what]

    return edit


def _attention(edit_json: Callable[[dict], object]) -> Callable:
    def edit(h5: h5py.File, rng: random.Random) -> None:
        h5.attrs["attention"] = json.dumps(edit_json(json.loads(h5.attrs["attention"])))

    return edit


def _spec(field: str, value) -> Callable[[dict], dict]:
    def change(data: dict) -> dict:
        data["layers"][0][field] = value
        return data

    return change


# name -> (edit, breaks the format). Edits that keep the file well-formed (a deleted sample, a changed value) are
# only detectable by checksums; the others must also be refused by validation alone (--reseal).
STRUCTURED: dict[str, tuple[Callable, bool]] = {
    "answers-not-json": (_set_sample_attr("answers", "not json"), True),
    "answers-int": (_set_sample_attr("answers", "5"), True),
    "answers-string": (_set_sample_attr("answers", '"abc"'), True),
    "answers-list-of-ints": (_set_sample_attr("answers", "[1, 2]"), True),
    "answers-bytes-array": (_set_sample_attr("answers", np.array([1, 2])), True),
    "metadata-list": (_set_sample_attr("metadata", "[]"), True),
    "metadata-nan-score": (_set_sample_attr("metadata", '{"full_cache_score": NaN}'), True),
    "metadata-string-score": (_set_sample_attr("metadata", '{"full_cache_score": "x"}'), True),
    "metadata-score-range": (_set_sample_attr("metadata", '{"full_cache_score": 7}'), True),
    "collection-dict": (_set_file_attr("collection", '{"a": 1}'), True),
    "collection-ints": (_set_file_attr("collection", "[1, 2]"), True),
    "kv-map-uncovered": (_set_file_attr("kv_head_of_query", np.array([0, 0, 0, 0], np.int32)), True),
    "kv-map-range": (_set_file_attr("kv_head_of_query", np.array([0, 0, 1, 2], np.int32)), True),
    "kv-map-length": (_set_file_attr("kv_head_of_query", np.array([0, 1], np.int32)), True),
    "layers-duplicate": (_set_file_attr("layers", np.array([0, 0], np.int32)), True),
    "layers-unsorted": (_set_file_attr("layers", np.array([1, 0], np.int32)), True),
    "layers-range": (_set_file_attr("layers", np.array([0, 5], np.int32)), True),
    "layers-empty": (_set_file_attr("layers", np.array([], np.int32)), True),
    "layers-float": (_set_file_attr("layers", np.array([0.0, 1.0])), True),
    "num-layers-zero": (_set_file_attr("num_layers", 0), True),
    "num-kv-heads-zero": (_set_file_attr("num_kv_heads", 0), True),
    "num-query-heads-3": (_set_file_attr("num_query_heads", 3), True),
    "head-dim-zero": (_set_file_attr("head_dim", 0), True),
    "vocab-small": (_set_file_attr("vocab_size", 10), True),
    "vocab-negative": (_set_file_attr("vocab_size", -1), True),
    "sliding-window-negative": (_set_file_attr("sliding_window", -4), True),
    "format-version-3": (_set_file_attr("format_version", 3), True),
    "format-version-string": (_set_file_attr("format_version", "1"), True),
    "dtype-float32": (_set_file_attr("dtype", "float32"), True),
    "model-int": (_set_file_attr("model", 5), True),
    "model-empty": (_set_file_attr("model", ""), True),
    "rope-not-json": (_set_file_attr("rope", "{"), True),
    "attention-not-json": (_set_file_attr("attention", "nope"), True),
    "attention-layer-count": (_attention(lambda d: {**d, "layers": d["layers"][:1]}), True),
    "attention-negative-scale": (_attention(_spec("scale", -1.0)), True),
    "attention-window-negative": (_attention(_spec("sliding_window", -3)), True),
    "attention-softcap-nan": (_attention(_spec("softcap", float("nan"))), True),
    "prompt-length-zero": (_set_sample_attr("prompt_length", 0), True),
    "prompt-length-beyond": (_set_sample_attr("prompt_length", 10**6), True),
    "prompt-length-string": (_set_sample_attr("prompt_length", "12"), True),
    "prompt-length-float": (_set_sample_attr("prompt_length", 12.5), True),
    "split-unknown": (_set_sample_attr("split", "bogus"), True),
    "index-negative": (_set_sample_attr("index", -1), True),
    "index-string": (_set_sample_attr("index", "3"), True),
    "task-int": (_set_sample_attr("task", 5), True),
    "task-empty": (_set_sample_attr("task", ""), True),
    "future-source-unknown": (_set_sample_attr("future_source", "psychic"), True),
    "tokens-out-of-vocab": (_replace_dataset(lambda old, h5: old + int(h5.attrs["vocab_size"]), "tokens"), True),
    "tokens-negative": (_replace_dataset(lambda old, h5: old - 10**6, "tokens"), True),
    "tokens-float": (_replace_dataset(lambda old, h5: old.astype(np.float32), "tokens"), True),
    "tokens-2d": (_replace_dataset(lambda old, h5: old[None], "tokens"), True),
    "tokens-shorter": (_replace_dataset(lambda old, h5: old[:-1], "tokens"), True),
    "spans-beyond-prompt": (_replace_dataset(lambda old, h5: np.array([[0, 10**6]], np.int32), "needle_spans"), True),
    "spans-negative": (_replace_dataset(lambda old, h5: np.array([[-3, 2]], np.int32), "needle_spans"), True),
    "spans-three-columns": (_replace_dataset(lambda old, h5: np.zeros((1, 3), np.int32), "needle_spans"), True),
    "keys-float32": (_replace_dataset(lambda old, h5: old.astype(np.float32), "keys"), True),
    "keys-shape": (_replace_dataset(lambda old, h5: old[:, :-1], "keys"), True),
    "queries-nan": (_write_into("queries", float("nan")), True),
    "keys-inf": (_write_into("keys", float("inf")), True),
    "values-changed": (_write_into("values", 3.0), False),
    "sample-copy": (_duplicate("copy"), True),
    "sample-copy-renumbered": (_duplicate("copy-renumbered"), True),
    "sample-hard-link": (_duplicate("hard"), True),
    "sample-soft-link": (_duplicate("soft"), True),
    "sample-external-link": (_duplicate("external"), True),
    "sample-dangling-link": (_duplicate("dangling"), True),
    "extra-root-group": (_extra("root-group"), True),
    "extra-sample-dataset": (_extra("sample-dataset"), True),
    "extra-layer-group": (_extra("layer-group"), True),
    "extra-root-attr": (_extra("root-attr"), True),
    "extra-sample-attr": (_extra("sample-attr"), True),
    "missing-format-version": (_delete_attr("format_version", on_sample=False), True),
    "missing-model": (_delete_attr("model", on_sample=False), True),
    "missing-answers": (_delete_attr("answers", on_sample=True), True),
    "missing-split": (_delete_attr("split", on_sample=True), True),
    "missing-tokens": (_delete("tokens"), True),
    "missing-spans": (_delete("needle_spans"), True),
    "missing-layer": (_delete("layer"), True),
    "missing-keys": (_delete("keys"), True),
    "missing-sample": (_delete("sample"), False),
}


def make_mutants(
    source: Path,
    folder: Path,
    count: int,
    seed: int = 0,
    reseal: bool = False,
    byte_share: float = 0.45,
    breaking_only: bool = False,
) -> list[Mutant]:
    """``count`` mutants of ``source`` in ``folder``: a ``byte_share`` of byte-level damage, the rest structured
    edits (cycled through in a seeded order; ``breaking_only``: only those that break the format). With
    ``reseal`` (structured edits that break the format only), ``source`` must be a version-2 file, and its seal is
    recomputed after each edit."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    original = bytes(source.read_bytes())
    byte_count = 0 if reseal else round(count * byte_share)
    structured = [name for name, (_, breaks) in STRUCTURED.items() if breaks or not (reseal or breaking_only)]
    rng.shuffle(structured)
    mutants = []
    for i in range(count):
        path = folder / f"mutant-{i:04d}.h5"
        if i < byte_count:
            kind = list(BYTE_MUTATIONS)[i % len(BYTE_MUTATIONS)]
            damaged = original
            while damaged == original:  # zeroing bytes that were zero already is no damage
                damaged = bytes(BYTE_MUTATIONS[kind](bytearray(original), rng))
            path.write_bytes(damaged)
        else:
            kind = structured[(i - byte_count) % len(structured)]
            path.write_bytes(original)
            with h5py.File(path, "r+") as h5:
                STRUCTURED[kind][0](h5, rng)
            if reseal:
                from kvp_gym.traces.seal import seal_file

                seal_file(path)
            kind = f"structured:{kind}"
        mutants.append(Mutant(path, kind))
    return mutants


# -- running the commands -------------------------------------------------------------------------------------------
def _cli(argv: list[str], path: Path) -> tuple[bool, str]:
    """Run the kvp-gym CLI in this process: (succeeded, normalised stdout)."""
    from kvp_gym.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    # The file's own name and size differ between mutants; timings between runs.
    lines = [
        line.replace(str(path), "TRACE")
        for line in out.getvalue().splitlines()
        if not line.lstrip().startswith(("size:", "wrote ")) and " s in all" not in line
    ]
    return code == 0, "\n".join(lines)


def _check(path: Path) -> tuple[bool, str]:
    ok, _ = _cli(["traces", "check", str(path)], path)
    return ok, "OK"


def _info(path: Path) -> tuple[bool, str]:
    return _cli(["traces", "info", str(path)], path)


def _evaluate(path: Path) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory() as out:
        argv = ["evaluate", "--traces", str(path), "--policies", "streaming_llm,h2o,tova", "--split", "all"]
        return _cli([*argv, "--out", out, "--bootstrap", "20"], path)


def _env(path: Path) -> tuple[bool, str]:
    import gymnasium as gym

    import kvp_gym  # noqa: F401  (registers the environments)
    from kvp_gym.traces import TraceFormatError

    try:
        env = gym.make("KVEvict-v0", config={"traces": str(path), "split": "train"})
        observation, _ = env.reset(seed=0)
        action = np.linspace(1, -1, env.action_space.shape[0], dtype=np.float32)
        _, reward, *_ = env.step(action)
    except (TraceFormatError, ValueError):
        return False, ""
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(observation[k]).tobytes() for k in sorted(observation)))
    return True, f"{digest.hexdigest()} {reward:.6f}"


def content_digest(path: Path) -> str:
    """Hash of everything h5py reads in the file: every link, attribute and dataset ("unreadable" if it fails)."""
    digest = hashlib.sha256()
    try:
        with h5py.File(path, "r") as h5:
            digest.update(repr(sorted((k, repr(v)) for k, v in h5.attrs.items())).encode())

            def visit(name, link):
                digest.update(f"{name}:{type(link).__name__}".encode())
                if isinstance(link, h5py.HardLink):
                    node = h5[name]
                    digest.update(repr(sorted((k, repr(v)) for k, v in node.attrs.items())).encode())
                    if isinstance(node, h5py.Dataset):
                        digest.update(f"{node.dtype}{node.shape}".encode() + node[()].tobytes())

            h5.visititems_links(visit)
    except Exception:
        return "unreadable"
    return digest.hexdigest()


RUNNERS: dict[str, Callable[[Path], tuple[bool, str]]] = {
    "traces check": _check,
    "traces info": _info,
    "evaluate": _evaluate,
    "KVEvict-v0": _env,
    "content": lambda path: (True, content_digest(path)),
}


def _child(connection, runner: str, path: Path) -> None:
    import torch

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP thread pool
    try:
        connection.send(("done", *RUNNERS[runner](path)))
    except BaseException as err:  # noqa: BLE001  (any escaping exception is the finding)
        connection.send(("traceback", False, f"{type(err).__name__}: {err}"))


def run(runner: str, path: Path, timeout: float) -> tuple[str, bool, str]:
    """Run one command on one file in a forked child: (status, succeeded, output); status "hang" on timeout."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, runner, path))
    process.start()
    send.close()
    if receive.poll(timeout):
        try:
            answer = receive.recv()
        except EOFError:
            answer = ("traceback", False, f"child died with exit code {process.exitcode}")
    else:
        answer = ("hang", False, "")
    process.kill()
    process.join()
    if answer[0] == "done" and process.exitcode not in (0, -9) and not answer[1]:
        answer = ("traceback", False, f"child died with exit code {process.exitcode}")
    return answer


def preload() -> None:
    """Import everything the commands use once, so that forked children start warm."""
    import gymnasium  # noqa: F401

    import kvp_gym.cache  # noqa: F401  (the CLI's error types: importing them loads transformers)
    import kvp_gym.cli
    import kvp_gym.envs.evict  # noqa: F401
    import kvp_gym.evaluation.trace_level  # noqa: F401

    for name in ("streaming_llm", "h2o", "tova"):
        __import__(f"kvp_gym_baselines.{name}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    kvp_gym.cli.build_parser()  # loads the commands of other packages (entry points)


def classify(mutants: list[Mutant], source: Path, timeout: float) -> list[dict]:
    """Every (mutant, command) outcome, as dicts with keys mutant, kind, command, outcome, detail."""
    reference = {name: run(name, source, timeout) for name in (*COMMANDS, "content")}
    for name, (status, ok, detail) in reference.items():
        if status != "done" or not ok:
            raise RuntimeError(f"the source file fails {name}: {status} {detail}")
    rows = []
    for mutant in mutants:
        corrupt = run("content", mutant.path, timeout)[2] != reference["content"][2]
        for command in COMMANDS:
            status, ok, detail = run(command, mutant.path, timeout)
            if status != "done":
                outcome = status
            elif not ok:
                outcome = "error"
            elif command == "traces check":
                outcome = "accepted" if corrupt else "unaffected"
            else:
                outcome = "unaffected" if detail == reference[command][2] else "accepted"
            rows.append(
                dict(mutant=mutant.path.name, kind=mutant.kind, command=command, outcome=outcome, detail=detail)
            )
    return rows


def table(rows: list[dict]) -> str:
    """The outcome counts per command, as a Markdown table."""
    counts = Counter((r["command"], r["outcome"]) for r in rows)
    lines = ["| command | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 1) + "|"]
    for command in COMMANDS:
        lines.append(f"| {command} | " + " | ".join(str(counts[command, o]) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="a valid trace file to mutate")
    parser.add_argument("--mutants", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per command before it counts as a hang")
    parser.add_argument("--reseal", action="store_true", help="recompute the integrity record after each edit")
    parser.add_argument("--out", type=Path, help="write every outcome here as JSON")
    parser.add_argument(
        "--probe-seconds", type=float, help="deadline for reading a version-1 file's metadata (default: the reader's)"
    )
    args = parser.parse_args(argv)
    if args.probe_seconds:
        from kvp_gym.traces import seal

        seal.UNSEALED_PROBE_SECONDS = args.probe_seconds
    preload()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        mutants = make_mutants(args.source, Path(folder), args.mutants, args.seed, args.reseal)
        rows = classify(mutants, args.source, args.timeout)
    print(f"{len(mutants)} mutants of {args.source}, {time.perf_counter() - start:.0f} s")
    print(table(rows))
    bad = [r for r in rows if r["outcome"] in ("traceback", "hang", "accepted")]
    for row in bad:
        print(f"{row['outcome']}: {row['command']} on {row['mutant']} ({row['kind']}): {row['detail'][:200]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
