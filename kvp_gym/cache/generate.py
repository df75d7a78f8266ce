"""Generation with an evicting cache: prefill -> compress -> greedy decode (optionally re-compressing as it goes).

Two prefills: :func:`prefill` reads the whole prompt, then :func:`decode` compresses a copy (the whole prompt's
keys and values exist at once); :func:`prefill_compressing` (chunked prefill, a variant of ours) reads the prompt
in chunks and cuts the cache back to the budget after each, so the cache never holds more than budget + chunk
rows per KV head. Neither projects more than the last prompt position onto the vocabulary (:func:`last_logits`).

Imports kvp_gym.cache.evicting, kvp_gym.capture, kvp_gym.kernels and kvp_gym.scorers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvp_gym.cache.evicting import CacheError, Compression, EvictingCache
from kvp_gym.capture import capture_qkv, capture_queries
from kvp_gym.kernels.attention_stats import attention_stats
from kvp_gym.scorers import Scorer, get_scorer

CHUNKED_LABEL = " (chunked prefill)"  # the label suffix of a policy's results through the chunked prefill


@dataclass
class Prefill:
    """A prompt run once through the model: the cache, the prefill queries a scorer may read, and the logits of the
    last prompt token. After :func:`prefill` the cache is full and the logits do not depend on eviction; after
    :func:`prefill_compressing` the cache is already at its budget, ``chunks`` says what each chunk's compression
    did, and the logits are those of the compressed prefill."""

    cache: EvictingCache
    queries: dict[int, torch.Tensor] | None  # layer -> [B, H_q, W, D], the last W prompt queries (None: not kept)
    logits: torch.Tensor  # [B, vocab] at the last prompt token
    prompt_length: int
    chunks: list[Compression] | None = None  # chunked prefill: one per chunk, in order; None: one-shot prefill


@dataclass
class Generation:
    """The result of :func:`generate`.

    tokens: generated token ids; text: their decoding; logits: [steps, vocab] float32 of each greedy step; kv_bytes:
    bytes of keys and values of the whole prompt (full) and after the first compression (with a chunked prefill
    the full cache never exists: its bytes are computed from the compressed cache's bytes per row); compressions:
    what each compression did (the first: the prefill's; with a chunked prefill, the whole prefill summed up);
    prefill_chunk: the chunk of a chunked prefill (the variant), None for the one-shot prefill.
    """

    tokens: list[int]
    text: str
    prompt_length: int
    kv_bytes_full: int
    kv_bytes_compressed: int
    compressions: list[Compression] = field(default_factory=list)
    logits: torch.Tensor | None = None
    prefill_chunk: int | None = None


def query_window(scorer: Scorer) -> int | None:
    """How many of the latest queries ``scorer`` reads: 0 (none), W (its ``query_window``) or None (all)."""
    if not scorer.needs_queries:
        return 0
    return getattr(scorer, "query_window", None)


def last_logits(model: PreTrainedModel, ids: torch.Tensor, cache: EvictingCache | None = None) -> torch.Tensor:
    """Run ``ids`` [B, T] through ``model`` (into ``cache``; None: without a cache) and return the next-token logits
    [B, vocab] float32 of the last position. Only that position is projected onto the vocabulary (transformers'
    ``logits_to_keep=1``, which transformers 5's llama, mistral, qwen2 and gemma3 models take), so no [B, T, vocab]
    tensor is made; a model whose forward does not take it gets the plain call."""
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(ids, cache=cache, use_cache=cache is not None, **keep_last)
    return out.logits[:, -1].float()


@torch.inference_mode()
def prefill(
    model: PreTrainedModel, ids: Sequence[int] | torch.Tensor, keep_queries: int | None = 0, **cache_args
) -> Prefill:
    """Run the prompt ``ids`` ([T] or [B, T]) into a fresh :class:`EvictingCache`, keeping the last ``keep_queries``
    prefill queries of every layer (0: none; None: all)."""
    ids = _batch(model, ids)
    cache = EvictingCache(model, **cache_args)
    with capture_queries(model, keep_queries) as captured:
        logits = last_logits(model, ids, cache)
    return Prefill(cache, dict(captured) or None, logits, ids.shape[1])


@torch.inference_mode()
def future_attention(model: PreTrainedModel, state: Prefill, future: Sequence[int]) -> dict[int, torch.Tensor]:
    """Full-attention layer -> [1, H_kv, n]: the attention the continuation ``future`` paid to each prompt token
    (what the oracle ranks by). Only the continuation runs, into a copy of the full prefilled cache: the prompt is not
    run twice (at 16k tokens the prompt pass is most of a sample's time). A sliding-window layer gets none: no
    scorer ranks its tokens."""
    attention, n = state.cache.attention, state.prompt_length
    layers = attention.global_layers
    if not future:  # the full cache answered nothing: the continuation paid no attention
        return {layer: state.logits.new_zeros(1, attention.num_kv_heads, n) for layer in layers}
    with capture_qkv(model, layers) as captured:
        last_logits(model, torch.tensor([list(future)], device=model.device), state.cache.copy())
    found = {}
    for layer, (queries, keys, _) in captured.items():  # queries [1, H_q, F, D]; keys [1, H_kv, n + F, D]
        importance = attention_stats(queries, keys, "max", attention=attention.specs[layer], out_keys=n)
        found[layer] = importance.to(state.logits.device)
    return found


def chunked_prefill_refusal(scorer: Scorer, chunk: int) -> str | None:
    """Why a chunked prefill of ``chunk`` tokens cannot serve ``scorer`` faithfully, or None when it can.

    Query-free scorers need nothing but the cached rows. A scorer with a ``query_window`` W reads the last W
    queries of each chunk (W <= chunk): the same rule as one-shot, on the chunk's own queries. A scorer that reads
    every prompt query (H2O, Expected Attention: no ``query_window``) would need the queries of tokens read in
    earlier chunks against keys they never saw; a privileged scorer (the oracle) reads the whole prompt's future
    attention. Serving either from one chunk would change the method, so they are refused."""
    name = scorer.name
    if scorer.needs_future:
        return (
            f"chunked prefill cannot serve {name!r}: it is privileged (it reads the future attention to the whole "
            "prompt, which the chunks evict before it exists); use the one-shot prefill"
        )
    window = query_window(scorer)
    if window is None:
        return (
            f"chunked prefill cannot serve {name!r}: it reads every prompt query (no query_window), but each "
            "compression sees only its chunk's queries, and rows evicted earlier never meet later queries: that "
            "would change the method; use a query-free scorer (kvp, knorm, keydiff, streaming_llm, lagkv, random), "
            "one with a query_window <= the chunk (tova, snapkv), or the one-shot prefill"
        )
    if window > chunk:
        return (
            f"chunked prefill cannot serve {name!r} with {chunk}-token chunks: it reads the last {window} queries, "
            f"more than one chunk holds; use chunks of at least {window} tokens"
        )
    return None


@torch.inference_mode()
def prefill_compressing(
    model: PreTrainedModel,
    ids: Sequence[int] | torch.Tensor,
    scorer: Scorer,
    budget: int | float,
    chunk: int,
    **cache_args,
) -> Prefill:
    """Chunked prefill (a variant of ours): read the prompt ``ids`` ([T] or [B, T]) ``chunk`` tokens at a time; after
    each chunk joins the cache, compress it back to ``budget`` with ``scorer`` (query-window scorers get the last
    W queries of that chunk). The cache never holds more than budget + chunk rows per KV head, and no query is kept
    beyond the chunk's last W. The first chunk takes the remainder (T mod chunk, or a whole chunk), so that the
    last compression, the one decoding starts from, sees a whole chunk. A ``chunk`` >= T is the one-shot path.

    ``budget``: tokens per KV head, or a fraction (float in (0, 1]) of the whole prompt, the same at every chunk.
    Returns a :class:`Prefill` whose cache is at the budget, whose ``queries`` are the last chunk's last W and whose
    ``chunks`` lists each chunk's compression. Raises :class:`CacheError` for a scorer the chunks cannot serve
    (:func:`chunked_prefill_refusal`) or a bad chunk or budget.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise CacheError(f"the prefill chunk must be a positive number of tokens, got {chunk!r}")
    refusal = chunked_prefill_refusal(scorer, chunk)
    if refusal:
        raise CacheError(refusal)
    ids = _batch(model, ids)
    total = ids.shape[1]
    if total == 0:
        raise CacheError("the prompt is empty")
    if isinstance(budget, float) and 0 < budget <= 1:  # of the whole prompt, as the one-shot compression resolves it
        budget = max(1, round(budget * total))
    window = query_window(scorer)
    cache = EvictingCache(model, **cache_args)
    chunks = []
    start = 0
    for end in range(total % chunk or chunk, total + 1, chunk):
        with capture_queries(model, window) as captured:
            logits = last_logits(model, ids[:, start:end], cache)
        queries = dict(captured) or None
        chunks.append(cache.compress(scorer, budget, queries))
        start = end
    return Prefill(cache, queries, logits, total, chunks)


def chunked_variants(
    scorers: Mapping[str, Scorer], chunk: int, strict: bool
) -> tuple[dict[str, Scorer], dict[str, str]]:
    """The chunked-prefill variant of each of ``scorers`` (by label) that ``chunk``-token chunks can serve, labelled
    ``LABEL (chunked prefill)`` (:data:`CHUNKED_LABEL`), and the refused ones' labels with the reason; with
    ``strict``, a refused one is a :class:`CacheError` instead."""
    variants, refused = {}, {}
    for label, scorer in scorers.items():
        reason = chunked_prefill_refusal(scorer, chunk)
        if reason and strict:
            raise CacheError(f"prefill chunk {chunk}: {reason}")
        if reason:
            refused[label + CHUNKED_LABEL] = reason
        else:
            variants[label + CHUNKED_LABEL] = scorer
    return variants, refused


@torch.inference_mode()
def prefill_compressing_batch(
    model: PreTrainedModel, ids: Sequence[int], scorers: Sequence[Scorer], budget: int, chunk: int, **cache_args
) -> tuple[EvictingCache, torch.Tensor]:
    """One chunked prefill of the prompt ``ids`` [T] per scorer (:func:`prefill_compressing`), as one batch to decode
    together: (the caches stacked, row i compressed by ``scorers[i]``; the next-token logits [len(scorers), vocab])."""
    states = [prefill_compressing(model, ids, scorer, budget, chunk, **cache_args) for scorer in scorers]
    return EvictingCache.stack([s.cache for s in states]), torch.cat([s.logits for s in states])


def _uncompressed_kv_bytes(cache: EvictingCache, tokens: int) -> int:
    """The KV bytes ``cache`` would hold after ``tokens`` tokens with nothing evicted (a sliding-window layer of
    window W holds its W - 1 newest at most), from each layer's bytes per cached row."""
    total = 0
    for layer in cache.layers:
        rows = tokens if layer.window is None else min(tokens, layer.window - 1)
        row_bytes = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        total += row_bytes // layer.physical_length * rows
    return total


def _batch(model: PreTrainedModel, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``ids`` as a [B, T] tensor on the model's device."""
    ids = torch.as_tensor(ids, device=model.device)
    return ids[None] if ids.dim() == 1 else ids


@torch.inference_mode()
def decode(
    model: PreTrainedModel,
    state: Prefill,
    scorer: Scorer | None,
    budget: int | float | None,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    decode_every: int | None = None,
    future_importance: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[Compression], int]:
    """Compress a copy of ``state``'s cache to ``budget`` with ``scorer`` (no compression when either is None), then
    decode greedily from it (:func:`continue_from`); ``state`` itself is left unchanged. A chunked prefill's cache
    (:func:`prefill_compressing`) is at its budget already: it is not compressed again, and the first compression
    reported sums up its chunks.

    With ``decode_every = k``, the cache is compressed back to the budget each time k tokens have been appended.
    Returns (tokens [B, steps], logits [B, steps, vocab], compressions, KV bytes after the first compression).
    """
    cache = state.cache.copy()
    compressions = []
    if state.chunks is not None:
        evicted = any(c.evicted for c in state.chunks)
        rows = cache.physical_length()
        compressions.append(Compression(state.chunks[-1].budget, state.prompt_length, rows, evicted))
    elif scorer is not None and budget is not None:
        compressions.append(cache.compress(scorer, budget, state.queries, future_importance))
    compressed_bytes = cache.kv_bytes
    recompress = None
    if decode_every is not None and scorer is not None and budget is not None:
        window = query_window(scorer)
        if window != 0 and (window is None or window > cache.recent):
            raise CacheError(
                f"decode-time eviction with {scorer.name!r}: it reads {'every' if window is None else window} queries, "
                f"but only the {cache.recent} newest tokens are sure to be cached; use a scorer with query_window <= "
                "recent"
            )

        def recompress(queries):
            return cache.compress(scorer, budget, queries)

    tokens, logits, more = continue_from(
        model,
        cache,
        state.logits,
        max_new_tokens,
        eos_token_id,
        recompress=recompress,
        every=decode_every,
        window=query_window(scorer) if recompress else 0,
        queries=state.queries,
    )
    return tokens, logits, compressions + more, compressed_bytes


@torch.inference_mode()
def continue_from(
    model: PreTrainedModel,
    cache: EvictingCache,
    logits: torch.Tensor,
    steps: int,
    eos_token_id: int | Sequence[int] | None = None,
    forced: Sequence[int] | None = None,
    recompress: Callable[[dict[int, torch.Tensor] | None], Compression] | None = None,
    every: int | None = None,
    window: int | None = 0,
    queries: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[Compression]]:
    """Greedy decoding from ``cache`` (extended in place), starting from the next-token ``logits`` [B, vocab].

    Up to ``steps`` tokens, stopping once every row has produced an end-of-sequence token (a row's tokens after
    its first one are filler: see :func:`until_eos`); or, with ``forced``, teacher-forcing those tokens (for
    perplexity: the logits are each forced token's predicted distribution). ``recompress(queries)`` is
    called every ``every`` appended tokens, with the latest ``window`` queries (rolled on from ``queries``).
    Returns (tokens [B, n], logits [B, n, vocab] float32: row i is the distribution token i was chosen from,
    the compressions made).
    """
    stops = torch.tensor(sorted({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())))
    latest = dict(queries or {})
    tokens, all_logits, compressions = [], [], []
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    steps = len(forced) if forced is not None else steps
    for step in range(steps):
        all_logits.append(logits.float())
        if forced is not None:
            token = torch.full((logits.shape[0], 1), forced[step], device=logits.device)
        else:
            token = logits.argmax(-1)[:, None]
            done |= torch.isin(token[:, 0], stops.to(token.device))
        tokens.append(token)
        if bool(done.all()) or step == steps - 1:
            break
        with capture_queries(model, window if recompress else 0) as captured:
            logits = model(token, cache=cache, use_cache=True).logits[:, -1]
        if window:
            latest = {
                k: torch.cat([latest[k], q], -2)[..., -window:, :] if k in latest else q for k, q in captured.items()
            }
        if recompress is not None and (step + 1) % every == 0:
            compressions.append(recompress(latest or None))
    return torch.cat(tokens, -1), torch.stack(all_logits, 1), compressions


def until_eos(tokens: Sequence[int], eos_token_id: int | Sequence[int] | None) -> list[int]:
    """``tokens`` up to and including the first end-of-sequence token."""
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    for i, token in enumerate(tokens):
        if token in stops:
            return list(tokens[: i + 1])
    return list(tokens)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[int],
    policy: Scorer | str | None,
    budget: int | float | None,
    max_new_tokens: int = 32,
    decode_every: int | None = None,
    sinks: int = 4,
    recent: int = 16,
    prefill_chunk: int | None = None,
) -> Generation:
    """Prefill ``prompt`` (text, tokenized as is, or token ids), compress every KV head to ``budget`` tokens with
    ``policy`` (a scorer or its registered name), then decode greedily up to ``max_new_tokens`` tokens (stopping at
    the end-of-sequence token).

    ``budget`` is absolute (int) or a fraction of the prompt (float in (0, 1]); ``None`` keeps the full cache. A
    budget at or above the prompt length evicts nothing (``compressions[0]`` says so). ``decode_every = k``
    re-compresses to the budget every k generated tokens, so memory stays bounded in long generations.
    ``sinks`` / ``recent``: tokens never evicted (the first positions, and the newest tokens). ``prefill_chunk = C``:
    the chunked prefill (:func:`prefill_compressing`, a variant of ours), which compresses to the budget after every
    C prompt tokens, so the whole prompt's cache never exists; it needs a policy and a budget.
    """
    scorer = get_scorer(policy) if isinstance(policy, str) else policy
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise CacheError("the prompt is empty")
    if prefill_chunk is None:
        state = prefill(model, ids, query_window(scorer) if scorer is not None else 0, sinks=sinks, recent=recent)
        full = state.cache.kv_bytes
    elif scorer is None or budget is None:
        raise CacheError("a chunked prefill compresses as it reads: it needs a policy and a budget")
    else:
        state = prefill_compressing(model, ids, scorer, budget, prefill_chunk, sinks=sinks, recent=recent)
        full = _uncompressed_kv_bytes(state.cache, len(ids))
    tokens, logits, compressions, compressed = decode(
        model, state, scorer, budget, max_new_tokens, model.generation_config.eos_token_id, decode_every
    )
    generated = until_eos(tokens[0].tolist(), model.generation_config.eos_token_id)
    return Generation(
        tokens=generated,
        text=tokenizer.decode(generated, skip_special_tokens=True),
        prompt_length=len(ids),
        kv_bytes_full=full,
        kv_bytes_compressed=compressed,
        compressions=compressions,
        logits=logits[0],
        prefill_chunk=prefill_chunk,
    )
