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

Policy specs, the way commands and result records name a configured scorer: ``name`` or
``name:param=value;param=value`` (:func:`from_spec`); :func:`resolve_policies` turns ``"all"``, a list of specs
and scorer objects, or a mapping from label to either into labelled scorers, and :func:`label_of` names an object.

A policy file needs no package: ``file:PATH:FACTORY`` (or ``file:PATH:FACTORY:param=value;...``) imports the
Python file PATH as a module and calls ``FACTORY(**params)``, which returns any scorer (an ``EnvPolicyScorer``
around a trained torch policy, say). The scorer comes back as a :class:`FileScorer`, which lists the file (and a
``checkpoint`` parameter) in ``files``, so that runs record their SHA-256 and notice a changed file. Loading a
policy file runs its code, as installing a scorer package does.

Imports only kvp_gym.attention and kvp_gym.storage.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, is_dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
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

    The tensors live on one device, any (the evicting cache gives its own: a scorer computes there and returns its
    scores there, without copying to the host); layer and kv_head, small ids the caller makes, are host tensors.
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
    """A scorer's parameters (its dataclass fields; for a policy file's scorer, its factory's), for result records."""
    if isinstance(scorer, FileScorer):
        return dict(scorer.source.parameters)
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


# --- policy specs ---------------------------------------------------------------------------------------------------

PolicySpec = str | Scorer


def from_spec(spec: str) -> Scorer:
    """The scorer a spec names: ``name`` or ``name:param=value;param=value`` (values read as true/false, an int, a
    float, else text), or a policy file, ``file:PATH:FACTORY[:param=value;...]`` (:func:`load_policy_file`). An
    unknown name is a ValueError listing the available ones."""
    if spec.startswith(FILE_PREFIX):
        source = parse_file_spec(spec)
        return load_policy_file(source.path, source.factory, **source.parameters)
    name, _, arguments = spec.partition(":")
    if name not in available_scorers():
        raise ValueError(f"unknown policies [{name!r}]; available: {', '.join(available_scorers())}")
    return get_scorer(name, **_spec_parameters(spec, arguments))


def _spec_parameters(spec: str, arguments: str) -> dict[str, bool | int | float | str]:
    """``param=value;param=value`` (the part of ``spec`` after its name) as a dict of values (:func:`_number`)."""
    try:
        params = dict(pair.split("=", 1) for pair in arguments.split(";") if pair)
    except ValueError:
        raise ValueError(f"policy {spec!r}: parameters must be written name:param=value;param=value") from None
    return {k: _number(v) for k, v in params.items()}


def with_parameters(spec: str, **params: Any) -> str:
    """``spec`` with ``params`` added to its parameters: ``knorm`` -> ``knorm:checkpoint=x``, ``kvp:a=1`` ->
    ``kvp:a=1;checkpoint=x``, ``file:p.py:make`` -> ``file:p.py:make:checkpoint=x``."""
    added = ";".join(f"{key}={value}" for key, value in params.items())
    source = parse_file_spec(spec) if spec.startswith(FILE_PREFIX) else None
    has_arguments = bool(source.parameters) if source is not None else ":" in spec
    return f"{spec}{';' if has_arguments else ':'}{added}" if added else spec


def _number(text: str) -> bool | int | float | str:
    """A spec parameter's value: true/false (any case), an int, a float, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def resolve_policies(
    policies: str | Sequence[PolicySpec] | Mapping[str, PolicySpec],
) -> tuple[dict[str, Scorer], dict[str, str], set[str]]:
    """Scorers from ``'all'``, a list of specs (``name`` / ``name:param=value;...``) and scorer objects (anything
    meeting the scorer contract, :class:`Scorer`), or a mapping from label to either.

    Returns (scorers by label, skipped labels with their reason, the labels that are declared variants). A spec's
    label is the spec as written; an object's is :func:`label_of` (unless the mapping gives one). With ``'all'``:
    every registered scorer with its defaults plus the variants it declares; one that cannot be built is skipped
    with its reason instead of failing the run. An unknown name is a ValueError listing the available ones; the
    same label twice is an error.
    """
    if isinstance(policies, str):
        if policies != "all":
            raise ValueError(f"policies must be 'all', a list of specs or scorers, or a mapping; got {policies!r}")
        return _every_registered_scorer()
    given = policies.items() if isinstance(policies, Mapping) else ((None, p) for p in policies)
    scorers = {}
    for label, policy in given:
        if isinstance(policy, str):
            scorer, label = from_spec(policy), label or policy
        elif isinstance(policy, Scorer):
            scorer, label = policy, label or label_of(policy)
        else:
            raise ValueError(
                f"policy {policy!r}: expected a spec string or an object with name, needs_queries, needs_future "
                "and score(view) (the scorer contract)"
            )
        if label in scorers:
            raise ValueError(f"policy {label!r} is given twice")
        scorers[label] = scorer
    if not scorers:
        raise ValueError("no policies given")
    return scorers, {}, set()


def _every_registered_scorer() -> tuple[dict[str, Scorer], dict[str, str], set[str]]:
    """``'all'``: every registered scorer with its defaults, then the variants it declares (``name:spec``); one that
    cannot be built is skipped with its reason."""
    scorers, skipped, variants = {}, {}, set()
    for name in available_scorers():
        try:
            scorers[name] = get_scorer(name)
        except ScorerError as err:
            skipped[name] = str(err)
            continue
        for spec in getattr(type(scorers[name]), "variants", ()):
            label = f"{name}:{spec}"
            scorers[label] = from_spec(label)
            variants.add(label)
    return scorers, skipped, variants


def label_of(scorer: Scorer) -> str:
    """``name``, or ``name:param=value;...`` with the parameters that differ from the scorer's defaults."""
    changed = []
    if is_dataclass(scorer):
        for f in fields(scorer):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            value = getattr(scorer, f.name)
            if default is MISSING or (_plain(value) and value != default):
                changed.append(f"{f.name}={value}")
    return f"{scorer.name}:{';'.join(changed)}" if changed else scorer.name


def _plain(value: Any) -> bool:
    """A parameter value that reads well in a label (not a tensor, module or long container)."""
    return isinstance(value, bool | int | float | str) or value is None


# --- policy files ---------------------------------------------------------------------------------------------------

FILE_PREFIX = "file:"
_FILE_SPEC = re.compile(rf"{FILE_PREFIX}(?P<path>.+?\.py):(?P<factory>[A-Za-z_]\w*)(?::(?P<arguments>.*))?")


@dataclass(frozen=True)
class PolicyFile:
    """A policy file spec taken apart: the Python file, the name of its factory function and the factory's
    parameters (``file:PATH:FACTORY:param=value;...``)."""

    path: Path
    factory: str
    parameters: dict[str, Any]


def parse_file_spec(spec: str) -> PolicyFile:
    """``file:PATH:FACTORY`` or ``file:PATH:FACTORY:param=value;...`` taken apart; ValueError showing the form."""
    found = _FILE_SPEC.fullmatch(spec)
    if found is None:
        raise ValueError(
            f"policy {spec!r}: a policy file is written file:PATH.py:FACTORY or file:PATH.py:FACTORY:param=value;..."
            " (e.g. file:my_policy.py:make_scorer)"
        )
    arguments = found["arguments"] or ""
    return PolicyFile(Path(found["path"]), found["factory"], _spec_parameters(spec, arguments))


def file_spec(path: str | Path, factory: str, parameters: Mapping[str, Any] | None = None) -> str:
    """The spec of a policy file's scorer: ``file:PATH:FACTORY``, with ``:param=value;...`` when given."""
    spec = f"{FILE_PREFIX}{path}:{factory}"
    return with_parameters(spec, **parameters) if parameters else spec


class FileScorer:
    """The scorer a policy file's factory made, with where it came from.

    It is that scorer to every caller (``name``, ``needs_queries``, ``needs_future``, ``score`` and any optional
    attribute, ``scope``, ``query_window``, ``check_geometry``, are the scorer's), and its ``files`` add the policy
    file and a ``checkpoint`` parameter to the scorer's own, so that :func:`scorer_files` pins them.

    Attributes: scorer (what the factory returned), source (:class:`PolicyFile`), module (the file, imported).
    """

    def __init__(self, scorer: Scorer, source: PolicyFile, module: ModuleType):
        self.scorer, self.source, self.module = scorer, source, module
        self.name, self.needs_queries, self.needs_future = scorer.name, scorer.needs_queries, scorer.needs_future

    @property
    def files(self) -> tuple[str, ...]:
        """The policy file, the scorer's own files, and the ``checkpoint`` parameter's file if given."""
        checkpoint = self.source.parameters.get("checkpoint")
        paths = [self.source.path, *getattr(self.scorer, "files", ()), *([checkpoint] if checkpoint else [])]
        return tuple(dict.fromkeys(str(path) for path in paths))

    def score(self, view: HeadView) -> torch.Tensor:
        """The scorer's [B..., n] scores of ``view``."""
        return self.scorer.score(view)

    def __getattr__(self, name: str) -> Any:  # only for attributes not set above: the scorer's optional ones
        if name in ("scorer", "source", "module"):  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.scorer, name)


def load_policy_file(path: str | Path, factory: str, **params: Any) -> FileScorer:
    """Import the Python file ``path`` as a module (its code runs, as a scorer package's does when installed) and
    return the scorer ``factory(**params)`` makes, as a :class:`FileScorer`.

    ScorerError naming the file for: no such file, an import that fails, no function ``factory`` (listing the
    functions it defines), parameters the factory does not take, a factory that fails, and a returned object that
    is not a scorer (name, needs_queries, needs_future, score(view))."""
    path = Path(path)
    where = f"policy file {path}"
    if not path.is_file():
        raise ScorerError(f"{where}: no such file")
    module = _import_file(path, where)
    make = getattr(module, factory, None)
    if not callable(make):
        defined = [n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__]
        listed = f"; it defines {', '.join(defined)}" if defined else "; it defines no function"
        raise ScorerError(f"{where} has no function {factory!r}{listed}")
    try:
        inspect.signature(make).bind(**params)
    except TypeError as err:
        given = ", ".join(sorted(params)) or "no parameters"
        raise ScorerError(f"{where}: {factory}() cannot be called with {given}: {err}") from None
    try:
        scorer = make(**params)
    except Exception as err:  # the file's own code: say where it failed, keep its traceback as the cause
        raise ScorerError(f"{where}: {factory}() raised {type(err).__name__}: {err}") from err
    if not isinstance(scorer, Scorer):
        raise ScorerError(
            f"{where}: {factory}() returned {type(scorer).__name__}, not a scorer: expected an object with name, "
            "needs_queries, needs_future and score(view) (kvp_gym.scorers.Scorer), e.g. an EnvPolicyScorer"
        )
    return FileScorer(scorer, PolicyFile(path, factory, dict(params)), module)


def _import_file(path: Path, where: str) -> ModuleType:
    """The Python file ``path``, imported afresh under a name of its own (registered in sys.modules, where
    dataclasses and pickle look a class's module up); ScorerError when its code fails."""
    name = "kvp_gym_policy_file_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ScorerError(f"{where}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ScorerError(f"{where}: importing it raised {type(err).__name__}: {err}") from err
    return module
