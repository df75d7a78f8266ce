"""``EvictingCache``: a transformers cache whose layers physically shrink to a budget chosen by any scorer.

Each layer holds keys and values [B, H_kv, L, D] and the true position of every row [B, H_kv, L] (rows stay in
position order). Compression scores every row with a scorer (:mod:`kvp_gym.scorers`), keeps the protected rows
(the first ``sinks`` positions and the ``recent`` newest tokens) and the best-scored others up to ``budget`` per
KV head, and gathers them into new, smaller tensors: the old ones are released, so the memory is really freed.
Every KV head keeps the same number of rows (tensors stay rectangular) but its own selection.

Hybrid models (Gemma 3: sliding-window and full-attention layers): a budget compresses the full-attention layers
as above; a sliding-window layer of window W holds at most its W - 1 newest tokens at any time (the ones the next
query sees) and, when the budget is below that, its ``budget`` newest: the same rows for every scorer, since its
rows must stay one contiguous run of the newest positions for transformers' sliding-window mask.

Compression runs on the cache's own device (scoring, selection and compaction: no copy to the host), through the
kernels of :mod:`kvp_gym.kernels` where a scorer computes attention statistics (Triton on CUDA, torch elsewhere).

Tokens that arrive later are appended with their true positions: ``get_seq_length`` reports the number of tokens
seen (so transformers gives new tokens their true RoPE positions), and ``get_mask_sizes`` shifts the causal mask
so that a shorter cache still masks correctly.

Imports kvp_gym.attention, kvp_gym.capture, kvp_gym.kernels and kvp_gym.scorers (the contract, never a concrete
scorer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from kvp_gym.attention import AttentionSpec, Rotary
from kvp_gym.capture import probe_attention
from kvp_gym.kernels.compaction import gather_rows
from kvp_gym.scorers import HeadView, Scorer, ScorerError, score

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "gemma3_text")
DEFAULT_SINKS, DEFAULT_RECENT = 4, 16  # the KVP paper's inference protocol


class CacheError(ValueError):
    """A model, budget or scorer the evicting cache cannot serve; the message says what is supported."""


class EvictingLayer(DynamicLayer):
    """One layer: keys, values [B, H, L, D] and ``positions`` [B, H, L] (int64, each row's true position).

    A sliding-window layer (``window`` W) holds at most the W - 1 newest tokens, the ones the next query can still
    see: each forward pass attends over those and its own tokens, then the older rows are dropped. Its rows are
    always the newest tokens, in one contiguous run of positions, which is what transformers' sliding-window mask
    (computed from row indices and an offset) assumes.
    """

    is_croppable = False

    def __init__(self, window: int | None = None):
        super().__init__()
        self.window = window
        self.is_sliding = window is not None  # transformers builds one mask for its sliding layers, one for the rest
        self.positions: torch.Tensor | None = None
        self.seen = 0  # tokens that went through this layer, evicted or not

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch, heads, count, _ = key_states.shape
        new = torch.arange(self.seen, self.seen + count, device=key_states.device).expand(batch, heads, count)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.positions = new.clone()
        else:
            self.positions = torch.cat([self.positions, new], dim=-1)
        self.seen += count
        keys, values = super().update(key_states, value_states)
        if self.window is not None and self.physical_length > self.window - 1:
            self.keep_newest(self.window - 1)  # this pass attends over all of them; later queries cannot see these
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the mask: the L cached rows sit just before the queries (all older)."""
        physical = self.physical_length
        return physical + query_length, self.seen - physical

    @property
    def physical_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def keep_newest(self, count: int) -> None:
        """Keep the ``count`` newest rows of every head (new tensors; the rows stay contiguous)."""
        self.keys, self.values = self.keys[..., -count:, :].clone(), self.values[..., -count:, :].clone()
        self.positions = self.positions[..., -count:].clone()

    def keep(self, rows: torch.Tensor) -> None:
        """Keep ``rows`` [B, H, b] (ascending per head) of every head: new contiguous tensors replace the old."""
        self.keys, self.values = gather_rows(self.keys, self.values, rows, rows_in_range=True)  # rows of a sort
        self.positions = self.positions.gather(-1, rows)

    def reset(self) -> None:
        super().reset()
        self.positions, self.seen = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise CacheError("an evicting cache cannot be cropped (assisted decoding and beam search are not supported)")


@dataclass(frozen=True)
class ModelAttention:
    """What the cache needs to know about the model's attention: per-layer semantics and RoPE, the GQA map."""

    specs: tuple[AttentionSpec, ...]
    rotaries: tuple[Rotary | None, ...]
    num_query_heads: int
    num_kv_heads: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelAttention:
        config = model.config.get_text_config()
        family = getattr(config, "model_type", "?")
        if family not in SUPPORTED_FAMILIES:
            raise CacheError(
                f"the evicting cache supports the {', '.join(SUPPORTED_FAMILIES)} model families, not {family!r}"
            )
        specs, rotaries = probe_attention(model)
        windows = {spec.sliding_window for spec in specs if spec.sliding_window}
        if len(windows) > 1:  # transformers builds one mask for every sliding layer
            raise CacheError(f"the sliding-window layers use several windows {sorted(windows)}: one is supported")
        if all(spec.sliding_window for spec in specs):
            raise CacheError(
                "every layer uses a sliding window: the evicting cache compresses full-attention layers (a sliding "
                "layer keeps its newest tokens), so a budget would leave no choice to the scorer"
            )
        return cls(specs, rotaries, config.num_attention_heads, config.num_key_value_heads)

    @property
    def global_layers(self) -> list[int]:
        """The full-attention layers (the ones a budget compresses with a scorer)."""
        return [i for i, spec in enumerate(self.specs) if not spec.sliding_window]

    def group_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """[B, H_q, T, D] -> [B, H_kv, G, T, D]: each KV head's GQA group (query head h uses KV head h // G)."""
        b, _, t, d = queries.shape
        return queries.reshape(b, self.num_kv_heads, self.num_query_heads // self.num_kv_heads, t, d)


@dataclass(frozen=True)
class Compression:
    """What one compression did: budget per KV head, rows before (per head, mean over layers) and after, and
    whether anything was evicted (a budget at or above the cache length keeps everything)."""

    budget: int
    rows_before: int
    rows_after: int
    evicted: bool

    def __str__(self) -> str:
        if not self.evicted:
            return f"budget {self.budget} >= {self.rows_before} cached tokens: nothing evicted"
        return f"kept {self.rows_after} of {self.rows_before} tokens per KV head"


class EvictingCache(Cache):
    """A transformers cache for one model whose layers can be compressed to a budget by any scorer.

    ``cache = EvictingCache(model)``; ``model(ids, cache=cache)`` fills it; ``cache.compress(scorer, budget)``
    shrinks every layer; later forward passes append with true positions. ``compress`` again at any time
    (decode-time eviction). Supported: :data:`SUPPORTED_FAMILIES` (full-attention layers, and sliding-window
    layers beside them: see the module), batch size 1 or several equal-length rows (no left padding).

    Args:
        model: the model the cache serves.
        sinks, recent: protected tokens: positions < ``sinks`` and the ``recent`` newest tokens are never evicted.
    """

    def __init__(self, model: PreTrainedModel, sinks: int = DEFAULT_SINKS, recent: int = DEFAULT_RECENT):
        if sinks < 0 or recent < 0:
            raise CacheError(f"sinks and recent must be >= 0, got {sinks}, {recent}")
        self.attention = ModelAttention.of(model)
        self.sinks, self.recent = sinks, recent
        super().__init__(layers=[EvictingLayer(spec.sliding_window or None) for spec in self.attention.specs])

    def copy(self) -> EvictingCache:
        """A cache with the same contents; compressing or extending either leaves the other as it was (tensors are
        replaced, never written in place)."""
        twin = object.__new__(EvictingCache)
        twin.__dict__.update(self.__dict__)
        twin.layers = []
        for layer in self.layers:
            clone = EvictingLayer()
            clone.__dict__.update(layer.__dict__)
            twin.layers.append(clone)
        return twin

    @classmethod
    def stack(cls, caches: list[EvictingCache]) -> EvictingCache:
        """One cache whose batch rows are ``caches`` (same model, same tokens seen and rows per layer), to decode
        several compressions of one prompt in one batch."""
        first = caches[0]
        for other in caches[1:]:
            if [layer.keys.shape[-2] for layer in other.layers] != [layer.keys.shape[-2] for layer in first.layers]:
                raise CacheError("caches stacked into a batch must hold the same number of rows in every layer")
        stacked = first.copy()
        for index, layer in enumerate(stacked.layers):
            parts = [c.layers[index] for c in caches]
            layer.keys = torch.cat([p.keys for p in parts])
            layer.values = torch.cat([p.values for p in parts])
            layer.positions = torch.cat([p.positions for p in parts])
        return stacked

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds: keys, values and positions of every layer."""
        return self._bytes("keys", "values", "positions")

    @property
    def kv_bytes(self) -> int:
        """Bytes of the keys and values alone."""
        return self._bytes("keys", "values")

    def _bytes(self, *names: str) -> int:
        tensors = (getattr(layer, name) for layer in self.layers if layer.is_initialized for name in names)
        return sum(t.numel() * t.element_size() for t in tensors)

    def physical_length(self, layer: int | None = None) -> int:
        """Rows cached per KV head in ``layer`` (after eviction, smaller than :meth:`get_seq_length`); default: the
        first full-attention layer (every full-attention layer holds as many)."""
        return self.layers[self.attention.global_layers[0] if layer is None else layer].physical_length

    def resolve_budget(self, budget: int | float) -> int:
        """Rows per KV head for ``budget``: an int is absolute; a float in (0, 1] is a fraction of the tokens seen
        so far (the prompt, at the first compression)."""
        if isinstance(budget, bool) or not isinstance(budget, int | float):
            raise CacheError(f"budget must be a number of tokens or a fraction of the prompt, got {budget!r}")
        if isinstance(budget, float):
            if not 0 < budget <= 1:
                raise CacheError(f"a fractional budget must lie in (0, 1], got {budget}")
            budget = max(1, round(budget * self.get_seq_length()))
        if budget <= 0:
            raise CacheError(f"budget must be positive, got {budget}")
        protected = min(self.sinks, self.get_seq_length()) + self.recent
        if budget < protected:
            raise CacheError(
                f"budget {budget} is below the {protected} protected tokens ({self.sinks} sinks + {self.recent} "
                "recent); lower sinks/recent or raise the budget"
            )
        return budget

    def compress(
        self,
        scorer: Scorer,
        budget: int | float,
        queries: dict[int, torch.Tensor] | None = None,
        future_importance: dict[int, torch.Tensor] | None = None,
    ) -> Compression:
        """Shrink every layer to ``budget`` rows per KV head, keeping the protected rows and the best-scored others:
        :meth:`score` then :meth:`keep_top`.

        Args:
            scorer: any scorer of the scorer contract.
            budget: tokens per KV head (int) or a fraction of the tokens seen (float in (0, 1]).
            queries: layer -> the latest post-RoPE queries [B, H_q, W, D] of the tokens at the end of the cache, for
                a scorer that ``needs_queries`` (:func:`kvp_gym.capture.capture_queries` during the forward pass).
            future_importance: layer -> [B, H_kv, L] importance of every cached row, for a privileged scorer (the
                oracle); only such scorers receive it.

        Raises:
            CacheError: a bad budget, or a scorer that needs what was not given.
        """
        unchanged = self._keeps_everything(budget)
        return unchanged or self.keep_top(self.score(scorer, queries, future_importance), budget)

    def score(
        self,
        scorer: Scorer,
        queries: dict[int, torch.Tensor] | None = None,
        future_importance: dict[int, torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """Every full-attention layer's scores [B, H_kv, L] of ``scorer`` (arguments as in :meth:`compress`), e.g. to
        keep the top of one scoring at several budgets; None for a sliding-window layer (it keeps its newest rows)."""
        if scorer.needs_queries and queries is None:
            raise CacheError(f"scorer {scorer.name!r} needs the prefill queries, but none were captured for this cache")
        if scorer.needs_future and future_importance is None:
            raise CacheError(f"scorer {scorer.name!r} needs the future importance (privileged), which was not given")
        found = []
        for index, layer in enumerate(self.layers):
            if layer.window is not None:
                found.append(None)
                continue
            try:
                found.append(score(scorer, self._view(index, layer, scorer, queries, future_importance)))
            except ScorerError as err:
                raise CacheError(f"layer {index}: {err}") from None
        return found

    def keep_top(self, scores: list[torch.Tensor | None], budget: int | float) -> Compression:
        """Keep, in every full-attention layer and KV head, the protected rows and the best-scored others up to
        ``budget`` rows (ties: the earlier row); in a sliding-window layer, its ``budget`` newest rows. ``scores``:
        one [B, H_kv, L] tensor per layer (None for sliding-window layers), for the rows cached now."""
        unchanged = self._keeps_everything(budget)
        if unchanged:
            return unchanged
        rows, before = self.resolve_budget(budget), self.physical_length()
        for layer, layer_scores in zip(self.layers, scores, strict=True):
            if layer.window is not None:  # its rows stay the newest ones, contiguous, as the sliding mask needs
                if layer.physical_length > rows:
                    layer.keep_newest(rows)
                continue
            protected = (layer.positions < self.sinks) | (layer.positions >= layer.seen - self.recent)
            ranked = layer_scores.to(protected.device).masked_fill(protected, float("inf"))
            ranking = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
            layer.keep(ranking[..., :rows].sort(-1).values)
        return Compression(rows, before, self.physical_length(), evicted=True)

    def _keeps_everything(self, budget: int | float) -> Compression | None:
        """The no-op Compression when ``budget`` (validated) is at or above the cached rows, else None."""
        rows, length = self.resolve_budget(budget), self.physical_length()
        return Compression(rows, length, length, evicted=False) if rows >= length else None

    def _view(self, index: int, layer: EvictingLayer, scorer: Scorer, queries, future_importance) -> HeadView:
        """The view of every KV head of layer ``index``, on the cache's own device: nothing is copied to the host
        (only the layer and head ids, which the cache makes, are host tensors)."""
        batch, heads, length, _ = layer.keys.shape
        device = layer.keys.device
        view = HeadView(
            keys=layer.keys,
            values=layer.values,
            positions=layer.positions,
            mask=torch.ones(batch, heads, length, dtype=torch.bool, device=device),
            layer=torch.full((batch, heads), index),
            kv_head=torch.arange(heads).expand(batch, heads),
            attention=self.attention.specs[index],
            rotary=self.attention.rotaries[index],
        )
        if scorer.needs_queries:
            latest = self.attention.group_queries(queries[index].to(device))  # [B, H, G, W, D]: the last W rows
            window = latest.shape[-2]
            if window > length or (window < length and getattr(scorer, "query_window", None) is None):
                raise CacheError(
                    f"scorer {scorer.name!r} reads every prefill query, but the cache holds {window} queries for "
                    f"{length} cached tokens (after an eviction, only scorers with a query_window <= recent can "
                    "re-score)"
                )
            aligned = latest.new_zeros(*latest.shape[:-2], length, latest.shape[-1])
            aligned[..., length - window :, :] = latest
            view = dataclasses.replace(view, queries=aligned)
        if scorer.needs_future:
            view = dataclasses.replace(view, future_importance=future_importance[index].to(device))
        return view
