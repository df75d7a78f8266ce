"""The KVP ablation options (issue 25): pre-RoPE keys (--key-frame), position features (--ages, --index), their
record in the checkpoint, and the shipped checkpoints reading as before (post-RoPE keys, age and index tables)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from kvp_gym.attention import Rotary
from kvp_gym.cli import main
from kvp_gym.evaluation.selection import layer_view
from kvp_gym.importance import ImportanceStore
from kvp_gym.scorers import HeadView, ScorerError, score
from kvp_gym.traces import open_traces
from kvp_gym_agents import config as train_config
from kvp_gym_agents import train as kvp_train
from kvp_gym_agents.checkpoint import SHIPPED, KVPScorer, merge_checkpoints, read_checkpoint, save_checkpoint
from kvp_gym_agents.data import Episodes, StreamingPool, model_inputs
from kvp_gym_agents.kvp import (
    AGE_FEATURES,
    INDEX_FEATURES,
    KEY_FRAMES,
    OPTION_DEFAULTS,
    KVPNetwork,
    age_bucket,
    agent_keys,
    relative_age,
)
from kvp_gym_agents.train import evaluate_heads, train

SHIPPED_V1 = SHIPPED["smollm2-135m"].with_name("smollm2-135m-v1.safetensors")
SHIPPED_V2 = SHIPPED["smollm2-135m"].with_name("smollm2-135m-v2.safetensors")


def rotate(keys: torch.Tensor, positions: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Apply RoPE (the model's rotate-half convention): pre-RoPE keys [..., n, D] at positions [..., n]."""
    cos, sin = rotary.cos_sin(positions)
    half = keys.shape[-1] // 2
    return keys * cos + torch.cat([-keys[..., half:], keys[..., :half]], -1) * sin


def perturbed(network: KVPNetwork, seed: int = 0) -> KVPNetwork:
    """``network`` with every parameter moved off its initialisation (LayerNorm affines off identity), so that
    every branch matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    return network.eval()


def reference_scores(network: KVPNetwork, h: int, keys, values, positions, ages) -> torch.Tensor:
    """Head h's scores computed literally from the architecture and its options (no folding, no gathered tables):
    keys, values [n, D] (already in the network's key frame), positions, ages [n] -> [n]."""
    p = dict(network.named_parameters())

    def linear(name, x):
        return x @ p[f"{name}.weight"][h] + p[f"{name}.bias"][h]

    def norm(name, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], p[f"{name}.weight"][h], p[f"{name}.bias"][h])

    parts = [norm("key_norm", linear("key", keys.float())), norm("value_norm", linear("value", values.float()))]
    if network.index == "table":
        parts.append(norm("index_norm", p["index_table"][h][positions.clamp(max=network.buckets - 1)]))
    if network.ages in ("table", "log"):
        rows = p["age_table"].shape[1]
        parts.append(norm("age_norm", p["age_table"][h][age_bucket(ages, network.buckets, network.max_age, rows)]))
    elif network.ages == "relative":
        fraction = ages.float() / (positions[-1] + 1)  # the newest token is the last one here
        parts.append(norm("age_norm", linear("age_projection", fraction[:, None])))
    x = torch.nn.functional.silu(norm("norm1", linear("hidden1", torch.cat(parts, -1))))
    x = torch.nn.functional.silu(norm("norm2", linear("hidden2", x)))
    return linear("out", x)[:, 0]


def test_command_line_choices_are_the_networks():
    """agents/config.py repeats the choices (it may not import torch): they must stay the network's."""
    assert train_config.CHOICES["key_frame"] == KEY_FRAMES
    assert train_config.CHOICES["ages"] == AGE_FEATURES
    assert train_config.CHOICES["index"] == INDEX_FEATURES
    defaults = train_config.TrainConfig()
    assert {k: getattr(defaults, k) for k in OPTION_DEFAULTS} == OPTION_DEFAULTS
    assert {k: KVPNetwork(1, 4, 4, 2, 2, 4).config()[k] for k in OPTION_DEFAULTS} == OPTION_DEFAULTS


@pytest.mark.parametrize("ages", AGE_FEATURES)
@pytest.mark.parametrize("index", INDEX_FEATURES)
def test_every_variant_computes_its_architecture(ages, index):
    torch.manual_seed(0)
    network = perturbed(
        KVPNetwork(heads=2, head_dim=8, width=16, position_dim=4, buckets=8, max_age=64, ages=ages, index=index)
    )
    n = 12
    keys, values = torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
    positions = (torch.arange(n) * 40).expand(2, 2, n)  # ages up to 440: past max_age, where "log" differs
    ages_ = positions[..., -1:] - positions
    together = network(keys, values, positions, ages_)
    for h in range(2):
        for b in range(2):
            expected = reference_scores(network, h, keys[h, b], values[h, b], positions[h, b], ages_[h, b])
            torch.testing.assert_close(together[h, b], expected, rtol=1e-4, atol=1e-5)
    if ages == "log":  # the ages past max_age (64) have rows of their own, beyond the capped table's last
        rows = age_bucket(ages_[0, 0], 8, 64, network.age_table.shape[1])
        assert rows.max() > 7 and len(rows.unique()) > len(age_bucket(ages_[0, 0], 8, 64).unique())
    if ages == "relative":
        torch.testing.assert_close(relative_age(ages_, positions)[0, 0], ages_[0, 0] / (positions[0, 0, -1] + 1.0))


def test_pre_rope_keys_per_row():
    """A trainer's chunk mixes layers: each row is un-rotated with its own layer's RoPE."""
    first, second = Rotary.default(16, 10_000.0), Rotary.default(16, 1_000_000.0)
    positions = torch.arange(50, 80)
    keys = torch.randn(3, 2, 30, 16)
    mixed = agent_keys(keys, positions, "pre", [first, second, first])
    for row, rotary in enumerate([first, second, first]):
        torch.testing.assert_close(mixed[row], rotary.unrotate(keys[row], positions))
    assert agent_keys(keys, positions, "post", None) is keys
    with pytest.raises(ValueError, match="need the layer's RoPE"):
        agent_keys(keys, positions, "pre", [first, None, first])


def checkpoint_pair(tmp_path, buckets: int = 8) -> tuple[str, str, KVPNetwork]:
    """The same weights saved as a pre-RoPE and as a post-RoPE agent for heads (0, 0), (0, 1)."""
    torch.manual_seed(1)
    pre = perturbed(KVPNetwork(2, 16, width=16, position_dim=4, buckets=buckets, max_age=512, key_frame="pre"))
    post = KVPNetwork(**{**pre.config(), "key_frame": "post"})
    post.load_state_dict(pre.state_dict())
    paths = []
    for name, network in (("pre", pre), ("post", post)):
        record = {"model": "any", "geometry": {"head_dim": 16}, "validation": {"score": 0.5, "per_head": [0.5, 0.5]}}
        paths.append(str(save_checkpoint(tmp_path / f"{name}.safetensors", network, [(0, 0), (0, 1)], record)))
    return paths[0], paths[1], pre


def test_pre_rope_agent_scores_the_same_keys_at_shifted_positions(tmp_path):
    """The same pre-RoPE keys placed at positions p and p + s (rotated there by RoPE) score the same with a pre-RoPE
    agent; with the same weights reading post-RoPE keys, they do not."""
    pre_path, post_path, _ = checkpoint_pair(tmp_path)
    rotary = Rotary.default(16, 10_000.0)
    n, shift = 40, 1_000
    content = torch.randn(2, n, 16)  # pre-RoPE keys of two heads
    values = torch.randn(2, n, 16)

    def view(start: int) -> HeadView:
        positions = torch.arange(start, start + n).expand(2, n)  # >= buckets - 1: the same index row at both
        return HeadView(
            keys=rotate(content, positions, rotary),
            values=values,
            positions=positions,
            mask=torch.ones(2, n, dtype=torch.bool),
            layer=torch.zeros(2, dtype=torch.long),
            kv_head=torch.arange(2),
            rotary=rotary,
        )

    near, far = view(100), view(100 + shift)
    pre = KVPScorer(pre_path)
    torch.testing.assert_close(score(pre, near), score(pre, far), atol=1e-5, rtol=1e-5)
    post = KVPScorer(post_path)
    assert (score(post, near) - score(post, far)).abs().max() > 1e-2  # post-RoPE keys move with the position
    # The pre-RoPE agent scores what the network gives the un-rotated keys (the content itself).
    network, _ = read_checkpoint(pre_path)
    positions = near.positions[:, None]
    direct = network(content[:, None], values[:, None], positions, positions[..., -1:] - positions)[:, 0]
    torch.testing.assert_close(score(pre, far), direct, atol=1e-5, rtol=1e-5)


def test_pre_rope_agents_refuse_a_view_without_rope(tmp_path):
    pre_path, post_path, _ = checkpoint_pair(tmp_path)
    keys = torch.randn(2, 10, 16)
    view = HeadView(
        keys,
        keys,
        torch.arange(10).expand(2, 10),
        torch.ones(2, 10, dtype=torch.bool),
        layer=torch.zeros(2, dtype=torch.long),
        kv_head=torch.arange(2),
    )
    with pytest.raises(ScorerError, match=r"pre\.safetensors: the agents read pre-RoPE keys .* the view has none"):
        score(KVPScorer(pre_path), view)
    score(KVPScorer(post_path), view)  # post-RoPE agents need no RoPE
    with pytest.raises(ValueError, match=r"network settings \['key_frame'\] differ"):
        merge_checkpoints([pre_path, post_path], tmp_path / "merged.safetensors")


@pytest.mark.parametrize("path", [SHIPPED["smollm2-135m"], SHIPPED_V2, SHIPPED_V1], ids=["shipped", "v2", "v1"])
def test_shipped_agents_read_as_post_rope_with_tables(path):
    """The SmolLM2 agents read post-RoPE keys with age and index tables: v1 and v2, written before the options
    existed, record none (the defaults apply), the shipped ones record them. Their scores are the architecture's
    on the raw keys, even when the view carries a RoPE (which a pre-RoPE agent would use)."""
    network, metadata = read_checkpoint(path)
    recorded = {key: metadata["network"][key] for key in ("key_frame", "ages", "index") if key in metadata["network"]}
    assert recorded == (
        {"key_frame": "post", "ages": "table", "index": "table"} if path == SHIPPED["smollm2-135m"] else {}
    )
    assert (network.key_frame, network.ages, network.index) == ("post", "table", "table")
    torch.manual_seed(0)
    n = 200
    keys, values = torch.randn(2, n, 64), torch.randn(2, n, 64)
    positions = (torch.arange(n) * 23).expand(2, n)  # ages past the table's cap too
    view = HeadView(
        keys,
        values,
        positions,
        torch.ones(2, n, dtype=torch.bool),
        layer=torch.tensor([3, 29]),
        kv_head=torch.tensor([2, 0]),
        rotary=Rotary.default(64, 100_000.0),
    )
    scores = score(KVPScorer(str(path)), view)
    rows = [metadata["heads"].index([3, 2]), metadata["heads"].index([29, 0])]
    for i, h in enumerate(rows):
        expected = reference_scores(network, h, keys[i], values[i], positions[i], positions[i, -1] - positions[i])
        torch.testing.assert_close(scores[i], expected, rtol=1e-4, atol=1e-4)


VARIANTS = {  # ages -> (key frame, index): every age variant, both key frames, both index options
    "table": ("pre", "table"),
    "none": ("post", "none"),
    "relative": ("pre", "table"),
    "log": ("post", "table"),
}


@pytest.fixture(scope="module")
def variants(tiny_trace, tmp_path_factory) -> dict[str, dict]:
    """Two training steps of each --ages variant (tiny-random, 2 heads): ages -> the run's summary, with
    ``key_frames``: the frame of the keys of every batch the run's loop and validation gave the network."""
    with open_traces(tiny_trace) as trace:
        rotary = trace.header.rotary_of(0)
        assert rotary is not None and trace.header.rotary_of(1) == rotary  # so every row un-rotates alike
    runs = {}
    for ages, (key_frame, index) in VARIANTS.items():
        frames = []

        def spy(batch, device, key_frame="post", rotaries=(), frames=frames):
            """The trainer's model_inputs, noting whether the keys it returns are the stored or un-rotated ones."""
            inputs = model_inputs(batch, device, key_frame, rotaries)
            stored, positions = batch[0].to(device), inputs[2]
            unrotated = rotary.unrotate(stored, positions)
            frames.append(
                "post" if torch.equal(inputs[0], stored) else "pre" if torch.equal(inputs[0], unrotated) else "?"
            )
            return inputs

        out = tmp_path_factory.mktemp(f"kvp-{ages}")
        settings = train_config.TrainConfig(
            traces=[str(tiny_trace)],
            out=str(out),
            heads="0:1,1:0",
            steps=2,
            batch=4,
            rankings=2,
            width=16,
            position_dim=4,
            buckets=8,
            lr=1e-2,
            warmup=1,
            eval_every=2,
            random_splits=0,
            ages=ages,
            key_frame=key_frame,
            index=index,
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kvp_train, "model_inputs", spy)
            runs[ages] = {**train(settings, progress=False), "key_frames": frames}
    return runs


def test_a_run_resumes_only_with_its_options(variants, tiny_trace):
    """A run's OUT/last.pt carries its options: resuming it with others is an error (key_frame alone changes no
    weight shape, so the weights would load silently)."""
    out = str(Path(variants["log"]["checkpoint"]).parent)  # trained with key_frame post
    settings = dict(traces=[str(tiny_trace)], out=out, heads="0:1,1:0", steps=3, batch=4, width=16, position_dim=4,
                    buckets=8, warmup=1, eval_every=3, random_splits=0, ages="log")  # fmt: skip
    with pytest.raises(ValueError, match=r"last\.pt: the run there used other network options .*'key_frame'"):
        train(train_config.TrainConfig(**settings, key_frame="pre"), progress=False)


@pytest.mark.parametrize("ages", list(VARIANTS))
def test_variant_checkpoints_round_trip(variants, tiny_trace, ages):
    """The options are in the checkpoint; the reloaded agents score the validation split as the trainer did, and
    the scorer (as evaluation runs it) gives the trainer's scores on the same episode."""
    key_frame, index = VARIANTS[ages]
    path = variants[ages]["checkpoint"]
    network, metadata = read_checkpoint(path)
    assert (network.ages, network.index, network.key_frame) == (ages, index, key_frame)
    # 2 training steps and 1 validation pass, every batch in the agents' frame (layers 0 and 1 share one RoPE).
    assert variants[ages]["key_frames"] == [key_frame] * 3
    options = {"ages": ages, "index": index, "key_frame": key_frame}
    assert {k: metadata["network"][k] for k in options} == options == {k: metadata["training"][k] for k in options}
    files = [open_traces(tiny_trace)]
    try:
        store = ImportanceStore(files[0])
        heads = [tuple(h) for h in metadata["heads"]]
        val = Episodes(files, "val", 0, 16, np.random.default_rng(0))
        pool = StreamingPool(files, [store], val, heads)
        per_head = evaluate_heads(network, pool)
        assert per_head.tolist() == pytest.approx(metadata["validation"]["per_head"], abs=1e-6)
        # Scorer (evaluation's view of one layer) against the trainer's inputs, episode 0 of the val split.
        (layer, head), row = heads[1], 1
        batch = pool.batch(torch.tensor([[0]]), torch.tensor([row]))
        keys, values, positions, ages_, valid, _ = model_inputs(
            batch, torch.device("cpu"), key_frame, [pool.rotaries[row]]
        )
        trained = network(keys, values, positions, ages_, torch.tensor([row]))[0, 0][valid[0, 0]]
        _, info = val.samples[0]
        view, _, _ = layer_view(files[0], store, info, layer, files[0].header.geometry.num_kv_heads)
        one = {
            f: getattr(view, f)[head : head + 1] for f in ("keys", "values", "positions", "mask", "layer", "kv_head")
        }
        scored = score(KVPScorer(path), dataclasses.replace(view, queries=None, **one))[0]
        torch.testing.assert_close(scored, trained, atol=1e-5, rtol=1e-5)
    finally:
        files[0].close()


def test_train_command_line_options(capsys, monkeypatch, tiny_trace, tmp_path):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    for option in ("--key-frame {post,pre}", "--ages {table,none,relative,log}", "--index {table,none}"):
        assert option in shown
    assert max(map(len, shown.splitlines())) < 80
    for option, bad in (("--ages", "cubic"), ("--key-frame", "middle"), ("--index", "log")):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--traces", str(tiny_trace), "--out", str(tmp_path), option, bad])
        assert exit_.value.code == 2
        assert f"argument {option}: invalid choice: '{bad}'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"ages must be one of \('table', 'none', 'relative', 'log'\), got 'cubic'"):
        train(train_config.TrainConfig(traces=[str(tiny_trace)], out=str(tmp_path), ages="cubic"), progress=False)
