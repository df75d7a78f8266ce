"""The scorer contract: the one interface every eviction policy meets.

A scorer looks at a :class:`HeadView` of one or many KV heads and returns one score per cached token, higher =
keep. The environment, ``kvp-gym evaluate`` and the evicting cache call scorers the same way. Scorers are found by
name through the ``kvp_gym.scorers`` entry-point group, so ``kvp_gym`` never imports the packages that define
them (``baselines``, ``agents``) and a third-party package can add its own::

    [project.entry-points."kvp_gym.scorers"]
    my_method = "my_package.module:MyScorer"

A scorer class is a dataclass whose fields are its parameters; it declares ``needs_queries`` (it reads the
prefill queries) and ``needs_future`` (privileged: it reads the true future importance; only the oracle). Two
optional class attributes: ``scope = "layer"`` for a scorer that pools evidence over every KV head of a layer (its
views must hold exactly one layer's KV heads along the last batch dimension, in order; default ``"head"``), and
``variants``, parameter specs (``"heads=group"``) that ``kvp-gym evaluate --policies all`` also runs, labelled
``name:spec`` (variants of ours beside the published method). A scorer that reads only the last W prefill queries
says so with ``query_window = W`` (TOVA: 1, SnapKV: its window): the evicting cache then keeps only those, and the
rows of ``view.queries`` before them are zeros. Without it, a query-reading scorer gets every prefill query.
A scorer whose scores depend on files (a learned scorer's checkpoint) lists their paths in ``files``: runs that
resume or merge finished parts record each file's SHA-256 (:func:`scorer_files`) and refuse a file that changed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from kvp_gym.attention import AttentionSpec, Rotary
from kvp_gym.storage import file_sha256

ENTRY_POINT_GROUP = "kvp_gym.scorers"


@dataclass(frozen=True)
class HeadView:
    """What a scorer may see of B KV heads' caches (B = any leading batch shape, n = cached tokens).

    keys, values: [B..., n, D] post-RoPE (any float dtype). positions: [B..., n] int64, each token's position.
    mask: [B..., n] bool, True for real tokens (False = padding, whose scores are ignored).
    queries: [B..., G, n, D] the prefill queries of each head's GQA group at the cached positions, or None when
    the caller does not allow them. future_importance: [B..., n] float32, the true future attention; only given
    to scorers that declare ``needs_future`` (the oracle). layer, kv_head: [B...] int64, which layer and KV head
    each view is (per-head learned scorers need them; None when unknown). attention: the layer's attention
    semantics (scale, sliding window, soft-cap) for scorers that compute attention; None = standard (full causal,
    1/sqrt(D)). rotary: the model's RoPE, for scorers that reason about future query positions; None when unknown.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    queries: torch.Tensor | None = None
    future_importance: torch.Tensor | None = None
    layer: torch.Tensor | None = None
    kv_head: torch.Tensor | None = None
    attention: AttentionSpec | None = None
    rotary: Rotary | None = None

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[-2]


@runtime_checkable
class Scorer(Protocol):
    """score(view) -> [B..., n] float scores, higher = keep.

    A scorer trained for one model may also define ``check_geometry(model, head_dim, num_layers, num_kv_heads)``,
    raising ScorerError when used with another: callers that know the model call it before scoring.
    """

    name: ClassVar[str]
    needs_queries: ClassVar[bool]
    needs_future: ClassVar[bool]

    def score(self, view: HeadView) -> torch.Tensor: ...


class ScorerError(ValueError):
    """An unknown scorer name, bad parameters, or a view that lacks what the scorer needs."""


def available_scorers() -> list[str]:
    """Names registered in the ``kvp_gym.scorers`` entry-point group, sorted."""
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def get_scorer(name: str, **params: Any) -> Scorer:
    """Instantiate the scorer registered as ``name`` with ``params``; errors list what is available."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        raise ScorerError(f"unknown scorer {name!r}; available: {', '.join(available_scorers()) or 'none installed'}")
    cls = found[0].load()
    try:
        return cls(**params)
    except TypeError as err:
        known = [f.name for f in fields(cls)] if is_dataclass(cls) else []
        raise ScorerError(f"bad parameters for scorer {name!r}: {err}; its parameters: {known}") from None


def scorer_files(scorer: Scorer) -> dict[str, str]:
    """The files ``scorer`` reads (its optional ``files``: paths), as {path: SHA-256 hex}; {} for most scorers."""
    return {str(path): file_sha256(path) for path in getattr(scorer, "files", ())}


def model_mismatches(scorers: dict[str, Scorer], model: str, geometry: Any) -> dict[str, str]:
    """The scorers (by label) trained for another model than ``model`` (their optional ``check_geometry``), with the
    reason. ``geometry``: anything with ``head_dim``, ``num_layers`` and ``num_kv_heads`` (a ModelGeometry)."""
    found = {}
    for label, scorer in scorers.items():
        check = getattr(scorer, "check_geometry", None)
        try:
            if check is not None:
                check(model, geometry.head_dim, geometry.num_layers, geometry.num_kv_heads)
        except ScorerError as err:
            found[label] = str(err)
    return found


def parameters(scorer: Scorer) -> dict[str, Any]:
    """A scorer's parameters (its dataclass fields), for result records."""
    return {f.name: getattr(scorer, f.name) for f in fields(scorer)} if is_dataclass(scorer) else {}


def score(scorer: Scorer, view: HeadView) -> torch.Tensor:
    """Call ``scorer`` on ``view`` after checking it has what the scorer needs; padding gets -inf."""
    if scorer.needs_queries and view.queries is None:
        raise ScorerError(f"scorer {scorer.name!r} needs the prefill queries, but this view has none")
    if scorer.needs_future and view.future_importance is None:
        raise ScorerError(f"scorer {scorer.name!r} needs the future importance (privileged), but this view has none")
    if getattr(scorer, "scope", "head") == "layer" and not _holds_one_layer(view):
        raise ScorerError(
            f"scorer {scorer.name!r} pools over a layer's KV heads: its view must hold every KV head of one layer "
            "along the last batch dimension (kv_head = 0..H-1), as the evaluation and the evicting cache build them"
        )
    scores = scorer.score(view).float()
    if scores.shape != view.mask.shape:
        raise ScorerError(
            f"scorer {scorer.name!r} returned shape {list(scores.shape)}, expected {list(view.mask.shape)}"
        )
    return scores.masked_fill(~view.mask, float("-inf"))


def _holds_one_layer(view: HeadView) -> bool:
    if view.kv_head is None or view.layer is None or view.mask.dim() < 2:
        return False
    heads = view.mask.shape[-2]
    in_order = torch.arange(heads).expand(view.kv_head.shape)
    return bool((view.kv_head == in_order).all() and (view.layer == view.layer[..., :1]).all())
