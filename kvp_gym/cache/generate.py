"""Generation with an evicting cache: prefill -> compress -> greedy decode (optionally re-compressing as it goes).

Imports kvp_gym.cache.evicting, kvp_gym.capture and kvp_gym.scorers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvp_gym.cache.evicting import CacheError, Compression, EvictingCache
from kvp_gym.capture import capture_queries
from kvp_gym.scorers import Scorer, get_scorer


@dataclass
class Prefill:
    """A prompt run once through the model: the full cache, the prefill queries a scorer may read, and the logits
    of the last prompt token (the first generated token does not depend on eviction)."""

    cache: EvictingCache
    queries: dict[int, torch.Tensor] | None  # layer -> [B, H_q, W, D], the last W prompt queries (None: not kept)
    logits: torch.Tensor  # [B, vocab] at the last prompt token
    prompt_length: int


@dataclass
class Generation:
    """The result of :func:`generate`.

    tokens: generated token ids; text: their decoding; logits: [steps, vocab] float32 of each greedy step; kv_bytes:
    bytes of keys and values after prefill (full) and after the first compression; compressions: what each
    compression did.
    """

    tokens: list[int]
    text: str
    prompt_length: int
    kv_bytes_full: int
    kv_bytes_compressed: int
    compressions: list[Compression] = field(default_factory=list)
    logits: torch.Tensor | None = None


def query_window(scorer: Scorer) -> int | None:
    """How many of the latest queries ``scorer`` reads: 0 (none), W (its ``query_window``) or None (all)."""
    if not scorer.needs_queries:
        return 0
    return getattr(scorer, "query_window", None)


@torch.inference_mode()
def prefill(
    model: PreTrainedModel, ids: Sequence[int] | torch.Tensor, keep_queries: int | None = 0, **cache_args
) -> Prefill:
    """Run the prompt ``ids`` ([T] or [B, T]) into a fresh :class:`EvictingCache`, keeping the last ``keep_queries``
    prefill queries of every layer (0: none; None: all)."""
    ids = torch.as_tensor(ids, device=model.device)
    ids = ids[None] if ids.dim() == 1 else ids
    cache = EvictingCache(model, **cache_args)
    with capture_queries(model, keep_queries) as captured:
        out = model(ids, cache=cache, use_cache=True)
    queries = dict(captured) or None
    return Prefill(cache, queries, out.logits[:, -1].float(), ids.shape[1])


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
    decode greedily from it (:func:`continue_from`); ``state`` itself is left unchanged.

    With ``decode_every = k``, the cache is compressed back to the budget each time k tokens have been appended.
    Returns (tokens [B, steps], logits [B, steps, vocab], compressions, KV bytes after the first compression).
    """
    cache = state.cache.copy()
    compressions = []
    if scorer is not None and budget is not None:
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
) -> Generation:
    """Prefill ``prompt`` (text, tokenized as is, or token ids), compress every KV head to ``budget`` tokens with
    ``policy`` (a scorer or its registered name), then decode greedily up to ``max_new_tokens`` tokens (stopping at
    the end-of-sequence token).

    ``budget`` is absolute (int) or a fraction of the prompt (float in (0, 1]); ``None`` keeps the full cache. A
    budget at or above the prompt length evicts nothing (``compressions[0]`` says so). ``decode_every = k``
    re-compresses to the budget every k generated tokens, so memory stays bounded in long generations.
    ``sinks`` / ``recent``: tokens never evicted (the first positions, and the newest tokens).
    """
    scorer = get_scorer(policy) if isinstance(policy, str) else policy
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise CacheError("the prompt is empty")
    state = prefill(model, ids, query_window(scorer) if scorer is not None else 0, sinks=sinks, recent=recent)
    full = state.cache.kv_bytes
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
    )
