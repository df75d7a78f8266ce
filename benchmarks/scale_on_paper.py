"""Scale on paper: how the evicting cache's costs grow with the prompt,
measured on a model here, and predicted for Llama-3.1-8B and Gemma 3 at 32k
and 128k tokens by written-out formulas (docs/cache.md, "Scale on paper").

Measured (SmolLM2-135M by default, at each of --contexts prompt tokens):
  - the plain prefill (keeping no query; fastest of 2, after a warm-up
    prefill that keeps every query);
  - each policy's compression (scoring, selection, compaction of every
    layer; median of --repeats), with the queries the policy reads;
  - the decode step at the full cache and at each of --budgets
    (alternating, medians of --steps after warm-up rounds);
  - KV bytes; at the first context, each scorer's matmul FLOPs as torch's
    FlopCounterMode counts them, against the formulas.
Checked: prefill FLOP/s at every context, each policy's growth exponent
and measured / FLOP-model ratio, the decode step against a + b x cached.
Predicted (extrapolated: no GPU, none of those models ran): KV bytes,
compression FLOPs / prefill FLOPs (also times the factor measured here),
and the speed-up of a memory-bound decode step, (weights + KV) / bandwidth.

  python benchmarks/scale_on_paper.py [--quick] [--contexts 1024,2048]
  python benchmarks/scale_on_paper.py --predict-only [--out FILE]
  python benchmarks/scale_on_paper.py --device cuda --clock wall

Measurements go to --out (JSON, written atomically after each context); a
rerun with the same settings measures only the contexts missing there. By
default one torch thread and its CPU time (--threads 1 --clock cpu), as in
benchmarks/cache.py: blind to the time other processes hold the cores. On
a GPU, --clock wall (timings synchronise with the device).

Imports kvp_gym.models, kvp_gym.cache, kvp_gym.scorers and kvp_gym.storage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedModel

from kvp_gym import models
from kvp_gym.cache import prefill
from kvp_gym.cache.generate import query_window
from kvp_gym.scorers import from_spec
from kvp_gym.storage import atomic_path

POLICIES = "kvp,knorm,streaming_llm,tova,snapkv,h2o,expected_attention"
QUERY_CHUNK = 128  # queries per step of the torch attention statistics (kvp_gym.utility.attention_received)
SNAPKV_WINDOW, KVP_BUCKETS = 64, 64  # SnapKV's default window; KVP's position-table rows (agents/kvp.py)
PAPER_KVP = (256, 32)  # the KVP paper's network: width, position_dim (agents/config.py TrainConfig defaults)
H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
H100_BF16_FLOPS = 989e12  # dense bf16 tensor-core FLOP/s, H100 SXM


@dataclass(frozen=True)
class Geometry:
    """What the cost model needs of a decoder. ``local_layers`` of the ``layers`` are sliding-window layers: a query
    sees itself and the ``window`` - 1 tokens before it, and the cache holds at most those W - 1 (Gemma 3: 5 of
    every 6 layers); the others attend to the whole prompt."""

    name: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int  # gated MLP: three hidden x intermediate matrices
    vocab: int
    tied: bool  # the output projection is the embedding table
    dtype_bytes: int
    local_layers: int = 0
    window: int = 0
    source: str = ""

    @property
    def global_layers(self) -> int:
        return self.layers - self.local_layers

    @property
    def group(self) -> int:
        return self.query_heads // self.kv_heads

    @property
    def block_params(self) -> int:
        """Parameters of the transformer blocks (norms left out): attention projections and the gated MLP."""
        attention = 2 * self.hidden * self.query_heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    @property
    def params(self) -> int:
        return self.block_params + self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def weights_per_step(self) -> int:
        """Weights one decode step reads: every block, and the output projection (one embedding row is
        negligible)."""
        return self.block_params + self.vocab * self.hidden

    @property
    def weight_bytes_per_step(self) -> int:
        return self.weights_per_step * self.dtype_bytes


TARGETS = (
    Geometry(
        "Llama-3.1-8B", 32, 32, 8, 128, 4096, 14336, 128256, False, 2,
        source="config.json of meta-llama/Llama-3.1-8B (copy: huggingface.co/NbAiLab/nb-llama-3.1-8B)",
    ),
    Geometry(
        "Gemma 3 270M", 18, 4, 1, 256, 640, 2048, 262144, True, 2, local_layers=15, window=512,
        source="the config kvp_gym.models converts from the gemma3-270m GGUF (max_position_embeddings 32768)",
    ),
    Geometry(
        "Gemma 3 4B", 34, 8, 4, 256, 2560, 10240, 262144, True, 2, local_layers=29, window=1024,
        source="google-deepmind/gemma, gemma/transformer.py, gemma3_4b (128k: huggingface.co/blog/gemma3)",
    ),
    Geometry(
        "Gemma 3 12B", 48, 16, 8, 256, 3840, 15360, 262144, True, 2, local_layers=40, window=1024,
        source="google-deepmind/gemma, gemma/transformer.py, gemma3_12b (128k: huggingface.co/blog/gemma3)",
    ),
)  # fmt: skip
CONTEXTS = {"Gemma 3 270M": (32768,)}  # its longest context; the others at 32k and 128k


def geometry_of(model: PreTrainedModel, name: str) -> Geometry:
    """The :class:`Geometry` of a loaded transformers decoder (its sliding layers from ``config.layer_types``)."""
    config = model.config.get_text_config()
    shape = models.geometry(model)
    local = sum(kind == "sliding_attention" for kind in getattr(config, "layer_types", None) or ())
    return Geometry(
        name, shape.num_layers, shape.num_query_heads, shape.num_kv_heads, shape.head_dim, config.hidden_size,
        config.intermediate_size, config.vocab_size, bool(config.tie_word_embeddings),
        next(model.parameters()).element_size(), local, shape.sliding_window if local else 0, "measured here",
    )  # fmt: skip


# The cost model. Token counts n; FLOPs of a whole model. Matrix multiplies are counted exactly as the torch paths
# run them (checked against FlopCounterMode); elementwise work is an estimate of the operations per element read.


def attention_pairs(n: int, window: int = 0) -> int:
    """Causal query-key pairs of an n-token prompt; with a sliding ``window``, each query sees at most that many."""
    if not window or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def chunked_pairs(n: int, chunk: int = QUERY_CHUNK) -> int:
    """Pairs the torch attention statistics compute over all n queries: each chunk of queries against every key up
    to its last query (about n^2 / 2 + n * chunk / 2)."""
    return sum(min(chunk, n - start) * min(start + chunk, n) for start in range(0, n, chunk))


def kv_bytes(g: Geometry, n: int, budget: int | None = None) -> int:
    """Bytes of keys and values: 2 x kv_heads x head_dim x dtype bytes per cached token and layer; global layers
    cache min(n, budget) tokens, sliding layers min(n, window - 1, budget) (docs/cache.md, "Hybrid models")."""
    per_token_layer = 2 * g.kv_heads * g.head_dim * g.dtype_bytes
    kept = min(n, budget or n)
    return per_token_layer * (g.global_layers * kept + g.local_layers * min(kept, (g.window or n + 1) - 1))


def query_bytes(g: Geometry, n: int) -> int:
    """Bytes of every prefill query of the global layers: what H2O and Expected Attention keep until they score."""
    return g.global_layers * g.query_heads * g.head_dim * g.dtype_bytes * n


def prefill_flops(g: Geometry, n: int) -> int:
    """2 x block params x n (weights) + 4 x head_dim per query head and causal pair (q.k and p.v) + the output
    projection at the last position; about 2 x params x n + 2 x layers x H_q x head_dim x n^2 without windows."""
    pairs = g.global_layers * attention_pairs(n) + g.local_layers * attention_pairs(n, g.window)
    return 2 * g.block_params * n + 4 * g.head_dim * g.query_heads * pairs + 2 * g.vocab * g.hidden


def scorer_flops(policy: str, g: Geometry, n: int, kvp: tuple[int, int] = PAPER_KVP) -> tuple[int, int]:
    """(matmul FLOPs, estimated elementwise operations) of one compression's scoring, over every KV head of the
    global layers (sliding layers keep their newest rows unscored). ``kvp``: the KVP network's (width,
    position_dim). Per KV head, with G query heads per KV head and D = head_dim:

    knorm: 2Dn + n elementwise; streaming_llm: 4n; tova (the last query): G(2D + 2)n matmul, 4Gn elementwise;
    snapkv (window w): G(2D + 2)wn, 4Gwn + 10n; h2o (every query): G(2D + 2)P, 4GP with P the chunked pairs;
    expected_attention: G(4nD^2 + 4D^3 + 2D^2) (covariance, keys.Sigma.keys, the rotation), G(11Dn + 10n) + 2Dn;
    kvp (width W, position_dim p): (4DW + 6W^2 + 2W)n + 4W^2 + 4 x 64 p W, 34Wn (LayerNorms, SiLU, adds)."""
    d, group, heads = g.head_dim, g.group, g.global_layers * g.kv_heads
    if policy == "knorm":
        per_head = (0, 2 * d * n + n)
    elif policy == "streaming_llm":
        per_head = (0, 4 * n)
    elif policy == "tova":
        per_head = (group * (2 * d + 2) * n, 4 * group * n)
    elif policy == "snapkv":
        per_head = (group * (2 * d + 2) * SNAPKV_WINDOW * n, 4 * group * SNAPKV_WINDOW * n + 10 * n)
    elif policy == "h2o":
        pairs = chunked_pairs(n)
        per_head = (group * (2 * d + 2) * pairs, 4 * group * pairs)
    elif policy == "expected_attention":
        per_head = (group * (4 * n * d * d + 4 * d**3 + 2 * d * d), group * (11 * d * n + 10 * n) + 2 * d * n)
    elif policy == "kvp":
        width, position = kvp
        matmul = (4 * d * width + 6 * width * width + 2 * width) * n + 4 * width * width
        per_head = (matmul + 4 * KVP_BUCKETS * position * width, 34 * width * n)
    else:
        raise ValueError(f"no FLOP formula for policy {policy!r}; known: {POLICIES}")
    return per_head[0] * heads, per_head[1] * heads


def decode_step_seconds(g: Geometry, cached: int, bandwidth: float) -> float:
    """A memory-bound decode step of one sequence: the weights and the cached KV read once, at ``bandwidth``."""
    return (g.weight_bytes_per_step + kv_bytes(g, cached)) / bandwidth


# Measurement.


def prompt_ids(model: PreTrainedModel, n: int) -> list[int]:
    """n random token ids (fixed seed), avoiding the first 100 (special tokens)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, models.geometry(model).vocab_size, (n,), generator=generator).tolist()


def kept_queries(queries: dict[int, torch.Tensor] | None, window: int | None) -> dict[int, torch.Tensor] | None:
    """What a prefill keeping ``window`` queries (0: none; None: all) would have captured, from one that kept all."""
    if window == 0 or queries is None:
        return None
    return queries if window is None else {layer: q[..., -window:, :].contiguous() for layer, q in queries.items()}


def alternating_medians(
    calls: list[Callable[[], None]], repeats: int, warmup: int, clock: Callable[[], float]
) -> list[float]:
    """Median seconds of each callable, timed in turn ``repeats`` times after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, bucket in zip(calls, times, strict=True):
            start = clock()
            call()
            bucket.append(clock() - start)
    return [statistics.median(bucket) for bucket in times]


def device_clock(clock: Callable[[], float], device: torch.device) -> Callable[[], float]:
    """``clock``, reading only after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type != "cuda":
        return clock

    def synchronized() -> float:
        torch.cuda.synchronize(device)
        return clock()

    return synchronized


def measure_context(model: PreTrainedModel, n: int, scorers: dict, args: argparse.Namespace, count_flops: bool) -> dict:
    """Every measurement at an n-token prompt (see the module docstring); prints a line as each one finishes."""
    clock = device_clock(time.thread_time if args.clock == "cpu" else time.perf_counter, model.device)
    ids = prompt_ids(model, n)
    state = prefill(model, ids, None)  # the warm-up, keeping every query for the policies that read them
    times = []
    for _ in range(2):
        tick = clock()
        prefill(model, ids, 0)
        times.append(clock() - tick)
    found = {"prefill_s": min(times), "kv_bytes": state.cache.kv_bytes, "compress_s": {}, "counted_flops": {}}
    say(f"n={n}: prefill {found['prefill_s']:.2f} s (fastest of 2), KV {found['kv_bytes'] / 2**20:.1f} MiB")
    for spec, scorer in scorers.items():
        queries = kept_queries(state.queries, query_window(scorer))
        seconds = []
        for _ in range(args.repeats):
            cache = state.cache.copy()
            tick = clock()
            cache.compress(scorer, args.budgets[0], queries)
            seconds.append(clock() - tick)
        found["compress_s"][spec] = statistics.median(seconds)
        if count_flops:
            with FlopCounterMode(display=False) as counter:
                state.cache.copy().compress(scorer, args.budgets[0], queries)
            found["counted_flops"][spec] = counter.get_total_flops()
        share = found["compress_s"][spec] / found["prefill_s"]
        say(f"n={n}: compress {spec} {found['compress_s'][spec] * 1e3:.1f} ms ({share:.2%} of prefill)")
    caches = {"full": state.cache}
    for budget in (b for b in args.budgets if b < n):
        caches[str(budget)] = state.cache.copy()
        caches[str(budget)].compress(from_spec("knorm"), budget)  # the step time depends on the length only
    token = torch.tensor([[int(state.logits.argmax())]], device=model.device)

    def step(cache) -> Callable[[], None]:
        def run() -> None:  # on a shallow copy: the appended row never reaches the measured cache
            model(token, cache=cache.copy(), use_cache=True)

        return run

    with torch.inference_mode():
        medians = alternating_medians([step(c) for c in caches.values()], args.steps, 2, clock)
    found["decode"] = [
        {"cache": label, "cached": cache.physical_length(), "kv_bytes": cache.kv_bytes, "step_s": seconds}
        for (label, cache), seconds in zip(caches.items(), medians, strict=True)
    ]
    steps = ", ".join(f"{row['cached']} tokens {row['step_s'] * 1e3:.1f} ms" for row in found["decode"])
    say(f"n={n}: decode step (median of {args.steps}) {steps}")
    return found


def say(line: str) -> None:
    print(line, flush=True)


def measure(args: argparse.Namespace, saved: dict) -> dict:
    """Measure the contexts missing from ``saved`` (same settings), writing the file after each. Sets torch's
    threads to ``args.threads``."""
    torch.set_num_threads(args.threads)
    model, _ = models.load(args.model)
    model.to(args.device)
    scorers = {}
    probe = prefill(model, prompt_ids(model, 2 * args.budgets[0]), None)  # does each policy serve this model?
    for spec in args.policies:
        scorer = from_spec(spec)
        check = getattr(scorer, "check_geometry", None)
        shape = models.geometry(model)
        try:
            if check:  # the shipped KVP agents fit SmolLM2 only
                check(args.model, shape.head_dim, shape.num_layers, shape.num_kv_heads)
            with torch.no_grad():
                probe.cache.copy().compress(scorer, args.budgets[0], kept_queries(probe.queries, query_window(scorer)))
        except ValueError as err:  # ScorerError, CacheError: e.g. Expected Attention without one RoPE per model
            say(f"skipped {spec}: {err}")
            continue
        scorers[spec] = scorer
    settings = {key: getattr(args, key) for key in ("model", "threads", "clock", "repeats", "steps", "budgets")}
    settings["policies"] = list(scorers)
    if saved.get("settings") != settings:
        saved = {"settings": settings, "contexts": {}}
    saved["geometry"] = asdict(geometry_of(model, args.model))
    saved["counted_params"] = sum(p.numel() for p in model.parameters())
    if "kvp" in scorers:
        network = scorers["kvp"].metadata["network"]
        saved["kvp_network"] = [network["width"], network["position_dim"]]
    for index, n in enumerate(args.contexts):
        if str(n) in saved["contexts"]:
            say(f"n={n}: measured before, in {args.out}")
            continue
        load = os.getloadavg()
        with torch.no_grad():
            found = measure_context(model, n, scorers, args, count_flops=index == 0)
        found["load"] = [load, os.getloadavg()]
        saved["contexts"][str(n)] = found
        write(args.out, saved)
    return saved


def write(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


# Fits, checks and predictions.


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x: the growth exponent."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0]) if len(xs) > 1 else math.nan


def growth_fit(xs: list[int], ys: list[float], quadratic: bool) -> tuple[float, float, float]:
    """Non-negative least squares of y = c0 + c1 x (+ c2 x^2 when ``quadratic``): a fixed cost, a cost per token,
    a cost per pair of tokens. The best fit among the subsets of those terms whose coefficients all come out >= 0."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    basis = np.stack([np.ones_like(x), x, x * x], 1)
    best, best_error = (0.0, 0.0, 0.0), math.inf
    subsets = ([0], [1], [0, 1]) + (([2], [0, 2], [1, 2], [0, 1, 2]) if quadratic else ())
    for terms in subsets:
        if len(terms) > len(xs):
            continue
        coefficients = np.linalg.lstsq(basis[:, terms], y, rcond=None)[0]
        error = float(((basis[:, terms] @ coefficients - y) ** 2).sum())
        if (coefficients >= 0).all() and error < best_error:
            found = dict(zip(terms, coefficients.tolist(), strict=True))
            best, best_error = (found.get(0, 0.0), found.get(1, 0.0), found.get(2, 0.0)), error
    return best


def total(pair: tuple[int, int]) -> int:
    return pair[0] + pair[1]


def table(header: list[str], rows: list[list[str]]) -> None:
    """Print a markdown table."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def percent(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x * 100:.1e}%" if x < 1e-5 else f"{x:.3%}" if x < 0.01 else f"{x:.2%}" if x < 1 else f"{x:.0%}"


def report(saved: dict, args: argparse.Namespace) -> None:
    """Print the measured scaling, the checks of the cost model, and the predictions (markdown tables)."""
    here = Geometry(**saved["geometry"])
    settings = saved["settings"]
    contexts = sorted(int(n) for n in saved["contexts"])
    rows = [saved["contexts"][str(n)] for n in contexts]
    kvp_here = tuple(saved.get("kvp_network", PAPER_KVP))
    print(f"\n## Measured: {here.name} on this CPU ({settings['clock']} clock, {settings['threads']} thread)")
    loads = ", ".join(f"{n}: {r['load'][0][0]:.1f}-{r['load'][1][0]:.1f}" for n, r in zip(contexts, rows, strict=True))
    print(f"load (1-minute average, before - after each context) {loads}")
    print(f"parameters: counted {saved['counted_params']:,}, by formula {here.params:,} (norms left out)")
    exact = all(r["kv_bytes"] == kv_bytes(here, n) for n, r in zip(contexts, rows, strict=True))
    print(f"KV bytes by the formula: {'exact at every context' if exact else 'DIFFERS'}")
    prefill = [r["prefill_s"] for r in rows]
    rates = [prefill_flops(here, n) / s / 1e9 for n, s in zip(contexts, prefill, strict=True)]
    lines = [
        ["prefill (s)", *(f"{s:.2f}" for s in prefill), f"{loglog_slope(contexts, prefill):.2f}", ""],
        ["prefill GFLOP/s (FLOP model / time)", *(f"{r:.1f}" for r in rates), "", ""],
    ]
    fits = {}
    for spec in settings["policies"]:
        seconds = [r["compress_s"][spec] for r in rows]
        longest = contexts[-1]  # the FLOP model says whether the cost has a term in n^2
        quadratic = total(scorer_flops(spec, here, 2 * longest, kvp_here)) > 2.5 * total(
            scorer_flops(spec, here, longest, kvp_here)
        )
        fits[spec] = growth_fit(contexts, seconds, quadratic)
        c0, c1, c2 = fits[spec]
        fitted = f"{c0 * 1e3:.1f} ms + {c1 * 1e6:.2f} us n" + (f" + {c2 * 1e9:.3f} ns n^2" if quadratic else "")
        exponent = f"{loglog_slope(contexts, seconds):.2f}"
        lines.append([f"compress {spec} (ms)", *(f"{s * 1e3:.1f}" for s in seconds), exponent, fitted])
    table(["prompt tokens", *map(str, contexts), "exponent", "fit (the FLOP model's terms, non-negative)"], lines)

    print(
        "\nCompression / prefill: measured; by the FLOP model; the factor measured / FLOP model; and the factor of "
        "the growing part (the fit less its fixed cost), which the predictions use at the longest prompt"
    )
    lines, factors = [], {}
    for spec in settings["policies"]:
        cells = []
        for n, r in zip(contexts, rows, strict=True):
            measured = r["compress_s"][spec] / r["prefill_s"]
            flop_ratio = total(scorer_flops(spec, here, n, kvp_here)) / prefill_flops(here, n)
            c0, c1, c2 = fits[spec]
            factors[spec] = (c1 * n + c2 * n * n) / r["prefill_s"] / flop_ratio
            cells.append(
                f"{percent(measured)}, {percent(flop_ratio)}, {measured / flop_ratio:.1f}x, {factors[spec]:.1f}x"
            )
        lines.append([spec, *cells])
    table(["policy", *(f"{n}: measured, FLOPs, factor, growing" for n in contexts)], lines)
    counted = rows[0].get("counted_flops", {})
    if counted:
        print(f"\nMatmul FLOPs of one compression at {contexts[0]} tokens, FlopCounterMode / formula:")
        for spec, flops in counted.items():
            print(f"  {spec}: {flops:,} / {scorer_flops(spec, here, contexts[0], kvp_here)[0]:,}")
    decode_report(here, contexts, rows)
    predict(factors, kvp_here, args, contexts[-1])


def decode_report(here: Geometry, contexts: list[int], rows: list[dict]) -> None:
    """Fit step = a + b x cached tokens over every measured decode step; compare b / a with two cost models."""
    points = [(d["cached"], d["step_s"]) for r in rows for d in r["decode"]]
    cached, seconds = np.array([p[0] for p in points], float), np.array([p[1] for p in points])
    b, a = np.polyfit(cached, seconds, 1)
    fitted = a + b * cached
    r2 = 1 - ((seconds - fitted) ** 2).sum() / ((seconds - seconds.mean()) ** 2).sum()
    worst = float(np.abs(seconds / fitted - 1).max())
    compute = 4 * here.global_layers * here.query_heads * here.head_dim / (2 * here.weights_per_step)
    memory = (kv_bytes(here, 2 * here.window + 2) - kv_bytes(here, 2 * here.window + 1)) / here.weight_bytes_per_step
    print(
        f"\nDecode step = a + b x cached tokens, fitted to {len(points)} steps: a = {a * 1e3:.1f} ms, b = "
        f"{b * 1e6:.2f} us/token, R^2 = {r2:.4f}, largest deviation {worst:.1%}.\nb / a = {b / a:.2e} per token; "
        f"compute-bound model (attention FLOPs per cached token / weight FLOPs) {compute:.2e}; memory-bound model "
        f"(KV bytes per cached token / weight bytes) {memory:.2e}"
    )
    lines = []
    for n, r in zip(contexts, rows, strict=True):
        full = r["decode"][0]["step_s"]
        cells = [f"{d['step_s'] * 1e3:.1f} ms at {d['cached']} ({full / d['step_s']:.2f}x)" for d in r["decode"][1:]]
        lines.append([str(n), f"{full * 1e3:.1f} ms", "; ".join(cells) or "-"])
    table(["prompt tokens", "full cache step", "compressed step (speed-up)"], lines)


def predict(factors: dict, kvp_here: tuple, args: argparse.Namespace, measured_at: int) -> None:
    """The prediction tables for :data:`TARGETS`."""
    budgets, bandwidth = args.prediction_budgets, args.bandwidth
    print("\n## Predicted (extrapolated: not measured)")
    for g in TARGETS:
        print(
            f"- {g.name}: {g.layers} layers ({g.global_layers} global), {g.query_heads} query / {g.kv_heads} KV "
            f"heads, head_dim {g.head_dim}, window {g.window or '-'}, {g.params / 1e9:.2f}B parameters by formula; "
            f"{g.source}"
        )
    cases = [(g, n) for g in TARGETS for n in CONTEXTS.get(g.name, (32768, 131072))]
    lines = []
    for g, n in cases:
        full = kv_bytes(g, n)
        cells = [f"{kv_bytes(g, n, b) / 2**30:.2f} GiB ({kv_bytes(g, n, b) / full:.1%})" for b in budgets]
        lines.append(
            [g.name, f"{n // 1024}k", f"{full / 2**30:.2f} GiB", *cells, f"{query_bytes(g, n) / 2**30:.2f} GiB"]
        )
    header = ["model", "context", "full KV", *(f"KV at {b // 1024}k" for b in budgets), "all prefill queries"]
    table(header, lines)

    print(
        f"\nCompression / prefill: FLOP model / FLOP model x the growing part's factor measured here at {measured_at} "
        f"tokens (kvp: width {kvp_here[0]}, position_dim {kvp_here[1]}; kvp paper: width {PAPER_KVP[0]}, "
        f"position_dim {PAPER_KVP[1]}, with kvp's factor)"
    )
    lines = []
    for g, n in cases:
        base = prefill_flops(g, n)
        cells = []
        for spec, kvp in [*((spec, kvp_here) for spec in factors), ("kvp", PAPER_KVP)]:
            ratio = total(scorer_flops(spec, g, n, kvp)) / base
            cells.append(f"{percent(ratio)} / {percent(ratio * factors.get(spec, math.nan))}")
        lines.append([g.name, f"{n // 1024}k", *cells])
    table(["model", "context", *factors, "kvp paper"], lines)

    print(
        f"\nOn a GPU: prefill at {args.mfu:.0%} of {args.peak_flops / 1e12:.0f} TFLOP/s; a query-free scorer reads "
        f"the keys at least once, at {bandwidth / 1e12:.2f} TB/s (a floor, whatever its FLOPs)"
    )
    lines = []
    for g, n in cases:
        seconds = prefill_flops(g, n) / (args.peak_flops * args.mfu)
        keys = kv_bytes(g, n) / 2 / bandwidth
        lines.append([g.name, f"{n // 1024}k", f"{seconds:.2f} s", f"{keys * 1e3:.2f} ms ({percent(keys / seconds)})"])
    table(["model", "context", "prefill", "reading the keys (/ prefill)"], lines)

    print(f"\nDecode step, memory-bound at {bandwidth / 1e12:.2f} TB/s, one sequence: (weights + KV) / bandwidth")
    lines = []
    for g, n in cases:
        full = decode_step_seconds(g, n, bandwidth)
        cells = []
        for b in budgets:
            step = (g.weight_bytes_per_step + kv_bytes(g, n, b)) / bandwidth
            cells.append(f"{step * 1e3:.2f} ms ({full / step:.2f}x)")
        weights = f"{g.weight_bytes_per_step / 2**30:.1f} GiB"
        lines.append([g.name, f"{n // 1024}k", weights, f"{full * 1e3:.2f} ms", *cells])
    table(["model", "context", "weights read", "full cache", *(f"{b // 1024}k budget" for b in budgets)], lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the measured model (default smollm2-135m)")
    parser.add_argument(
        "--contexts", default="1024,2048,4096,8192", help="prompt lengths to measure (default %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="measure 1024 and 2048 tokens only")
    parser.add_argument("--policies", default=POLICIES, help=f"comma-separated (default {POLICIES})")
    parser.add_argument("--budgets", default="256,1024", help="decode-step budgets; the first also compresses")
    parser.add_argument("--repeats", type=int, default=3, help="compressions timed per policy (median)")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per cache (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="thread CPU time or wall-clock")
    parser.add_argument("--device", default="cpu", help="the measured model's device (default cpu)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs/scale-on-paper.json"), help="measurements (JSON; default %(default)s)"
    )
    parser.add_argument("--fresh", action="store_true", help="measure every context again")
    parser.add_argument("--predict-only", action="store_true", help="report from --out without measuring")
    parser.add_argument("--bandwidth", type=float, default=H100_BANDWIDTH, help="bytes/s (default H100 HBM3)")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_FLOPS, help="FLOP/s (default H100 bf16)")
    parser.add_argument("--mfu", type=float, default=0.5, help="fraction of --peak-flops prefill reaches")
    parser.add_argument("--prediction-budgets", default="2048,4096,8192", help="tokens per KV head to predict at")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu times the calling thread only: it needs --threads 1")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error(f"--clock cpu times the host thread, not the work on {args.device}: use --clock wall")
    args.contexts = [1024, 2048] if args.quick else [int(n) for n in args.contexts.split(",")]
    args.policies = args.policies.split(",")
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.prediction_budgets = [int(b) for b in args.prediction_budgets.split(",")]
    saved = {} if args.fresh or not args.out.exists() else json.loads(args.out.read_text())
    if args.predict_only:
        if not saved:
            parser.error(f"--predict-only needs measurements in {args.out}: run without it first")
    else:
        saved = measure(args, saved)
    report(saved, args)


if __name__ == "__main__":
    main()
