"""Building and validating the plan: for every tensor, merge it how, or leave it alone why.

All of ``merge()``'s validation happens here, so a bad call fails before a single tensor is
modified. The lineage map is the plan, recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from . import lineage as reasons
from .errors import (
    MergeArgumentError,
    MetaTensorError,
    MethodNotApplicableError,
    NoMergeMethodFoundForParameterError,
    ParameterModelWeightsSumToZeroError,
    VocabularyError,
)
from .layers import layer_index
from .layerwise import ByLayer, count_layers
from .lineage import Lineage, LineageEntry
from .methods import REGISTRY, Method, resolve
from .patterns import PatternMap, PatternSet, pattern_repr, selected
from .sharding import check_sharding
from .sources import Entry, Source
from .vocabulary import OutputVocabulary, row_ranges


@dataclass(frozen=True, eq=False)
class RowGroup:
    """Rows of a vocabulary tensor held by the same models: merged together, or copied from the
    one model holding them (``copied``)."""

    models: tuple[int, ...]
    out_rows: torch.Tensor
    """The output rows (int64), ascending."""
    rows: tuple[torch.Tensor, ...]
    """Per model of ``models``, its row for each output row."""
    base_rows: torch.Tensor | None
    """The base's row for each output row, for a method that reads the base."""
    weights: tuple[float, ...]
    coefficients: tuple[float, ...]
    divisor: float | None
    copied: bool = False

    def record(self) -> dict[str, Any]:
        """The group as the lineage records it: who, with which weights, which rows."""
        data: dict[str, Any] = {
            "models": list(self.models),
            "weights": list(self.weights),
            "rows": row_ranges(self.out_rows),
        }
        if self.copied:
            data["copied"] = True
        return data


@dataclass(frozen=True, eq=False)
class RowTable:
    """How a vocabulary tensor's output rows are made: its row count and its row groups."""

    rows: int
    groups: tuple[RowGroup, ...]


@dataclass(frozen=True)
class Step:
    """One tensor to write: its name in the base, the method, who contributes and how much."""

    name: str
    method: Method
    contributors: tuple[int, ...]
    weights: tuple[float, ...]
    uses_base: bool
    seed: int | None = None
    aliases: tuple[str, ...] = ()
    coefficients: tuple[float, ...] = ()
    """The weights as given (before normalising), for the streaming kernel."""
    divisor: float | None = None
    """Their sum when normalising: the kernel divides once at the end, which keeps equal and
    integer weights exact (``(a + b + c) / 3`` rather than ``a/3 + b/3 + c/3``)."""

    @property
    def method_weights(self) -> tuple[float, ...]:
        """The weights the method is given: as given (the coefficients) to a method where only
        their ratios matter, when normalising by a positive sum; else the normalised ones."""
        if self.method_divides or (
            self.method.ratios and self.divisor is not None and self.divisor > 0
        ):
            return self.coefficients
        return self.weights

    @property
    def method_divides(self) -> bool:
        """Whether the method divides its weighted sum by :attr:`divisor` itself (see
        ``Method.divides``): normalising by a positive sum."""
        return self.method.divides and self.divisor is not None and self.divisor > 0

    @property
    def method_divisor(self) -> float | None:
        """The ``divisor=`` a method that divides is given (``None``: weights as given)."""
        return self.divisor if self.method_divides else None

    sharded: bool = False
    """The tensors are DTensors, merged shard by shard (not recorded: the lineage is the same)."""

    rows: RowTable | None = None
    """A vocabulary tensor aligned by token: its row groups (recorded in
    ``Lineage.vocabulary``); ``None`` for every other tensor."""

    def lineage_entry(self) -> LineageEntry:
        """The step as recorded: enough to recompute it bit for bit (see ``terge.audit``)."""
        settings = dict(self.method.settings)
        if self.method.random:
            settings["seed"] = self.seed
        # computed from the weights as given
        given = self.method.streaming or self.method.ratios or self.method.divides
        return LineageEntry(
            self.method.name,
            list(zip(self.contributors, self.weights)),
            settings,
            coefficients=self.coefficients if given else None,
            divisor=self.divisor if given else None,
            custom=not is_registered(self.method),
        )


def reads_base(method: Method) -> bool:
    """Whether a step of ``method`` reads the base's tensor: one rule for planning a merge and
    for recomputing it (``terge lineage verify``). A user's own method always receives it (a
    task-vector method of one's own needs it); a built-in one only where it declares so."""
    return method.task_vectors or method.needs_base or not method.builtin


def step_from_entry(name: str, entry: LineageEntry, method: Method) -> Step:
    """The step a lineage entry records (the inverse of :meth:`Step.lineage_entry`), given the
    method its name and settings configure: how ``terge lineage verify`` recomputes a tensor.

    Without recorded coefficients (a lineage written by hand), the weights are the coefficients.
    """
    weights = tuple(float(weight) for _, weight in entry[1])
    coefficients = getattr(entry, "coefficients", None)
    divisor = getattr(entry, "divisor", None)
    settings = getattr(entry, "settings", {})
    return Step(
        name=name,
        method=method,
        contributors=tuple(index for index, _ in entry[1]),
        weights=weights,
        uses_base=reads_base(method),
        seed=settings.get("seed") if method.random else None,
        coefficients=weights if coefficients is None else tuple(map(float, coefficients)),
        divisor=None if divisor is None else float(divisor),
    )


@dataclass(frozen=True)
class Plan:
    """Everything ``merge()`` will do, decided before it does any of it."""

    steps: tuple[Step, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)
    tied: Mapping[str, str] = field(default_factory=dict)
    unused: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    dropped: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    """Tensors that some model holds (same name and shape) but does not contribute to, by model
    index, with the reason (its tensor is not floating point, say)."""
    vocabulary: OutputVocabulary | None = None
    """The output vocabulary tensors were aligned to (``merge(..., vocabulary=...)``)."""
    normalize: bool = True
    """Whether weights were normalised (a vocabulary record says so: its row groups'
    renormalised weights depend on it)."""
    rows_differ: tuple[str, ...] = ()
    """Tensors skipped as a shape mismatch whose shapes differ only in their rows (embeddings
    of vocabularies that differ), with no ``vocabulary`` asked: ``merge()`` warns."""

    @property
    def sharded(self) -> bool:
        """Whether any tensor is merged shard by shard (DTensors)."""
        return any(step.sharded for step in self.steps)

    def lineage(self, **record: Any) -> Lineage:
        """The plan as a ``Lineage``; ``record`` sets its other attributes (models, dtypes...)."""
        lineage = Lineage(
            {step.name: step.lineage_entry() for step in self.steps},
            self.skipped,
            self.tied,
            {name: list(models) for name, models in self.unused.items()},
            **record,
        )
        lineage.dropped = {name: dict(models) for name, models in self.dropped.items()}
        if self.vocabulary is not None:
            lineage.vocabulary = self.vocabulary_record()
        return lineage

    def vocabulary_record(self) -> dict[str, Any] | None:
        """What the lineage records of the vocabulary: its source, row count, the tokens a
        union added (by model), and per aligned tensor its row groups."""
        vocabulary = self.vocabulary
        if vocabulary is None:
            return None
        added: dict[str, int] = {}
        for index, _ in vocabulary.added:
            added[str(index)] = added.get(str(index), 0) + 1
        return {
            "source": vocabulary.source,
            "rows": vocabulary.rows,
            "normalize": self.normalize,
            "added": added,
            "tensors": {
                step.name: [group.record() for group in step.rows.groups]
                for step in self.steps
                if step.rows is not None
            },
        }


@functools.cache
def _registered_function(name: str) -> Any:
    info = REGISTRY.get(name)
    if info is None:
        return None
    try:
        return _function_key(info.factory().function)
    except TypeError:  # a factory that needs per-model statistics: a run that cannot be redone
        return None


def _function_key(function: Any) -> Any:
    """What identifies a method's function: a ``partial``'s function and keywords, or itself."""
    if isinstance(function, functools.partial):
        return (function.func, tuple(sorted(function.keywords.items())))
    return function


def is_registered(method: Method) -> bool:
    """Whether ``method`` is the registry's method of its name (else a user's own function):
    what its factory makes from the method's settings (a factory may pick another function for
    some settings, as DELLA's for mergekit's options), else from its defaults."""
    info = REGISTRY.get(method.name)
    if info is not None and method.settings:
        try:
            rebuilt = info.factory(**method.settings)
        except (TypeError, ValueError):  # settings the factory does not take back as they are
            pass
        else:
            return _function_key(rebuilt.function) == _function_key(method.function)
    key = _registered_function(method.name)
    return key is not None and key == _function_key(method.function)


WeightVector = torch.Tensor | tuple[Any, ...]
"""A ``dtype`` tensor, or (with ``by_layer`` entries) the entries, resolved per parameter."""


def _weight_vector(value: Any, count: int, dtype: torch.dtype, argument: str) -> WeightVector:
    """One weight per model as a ``dtype`` tensor (or per-layer entries), or a clear error."""
    if isinstance(value, Sequence) and any(isinstance(v, ByLayer) for v in value):
        if len(value) != count:
            raise MergeArgumentError(
                f"`{argument}` has {len(value)} weights but there are {count} models; give "
                "exactly one weight per model, in the order of `models`."
            )
        for v in value:
            if not isinstance(v, ByLayer):
                _weight_vector([v] * count, count, dtype, argument)
        return tuple(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Tensor)):
        raise MergeArgumentError(
            f"`{argument}` must be a list of numbers, one per model; got {type(value).__name__}."
        )
    try:
        vector = torch.as_tensor(
            value.detach().cpu() if isinstance(value, torch.Tensor) else list(value), dtype=dtype
        )
    except (TypeError, ValueError, RuntimeError) as error:
        raise MergeArgumentError(
            f"`{argument}` must be a list of numbers, one per model; {error}."
        ) from None
    if vector.dim() != 1 or vector.numel() != count:
        length = vector.numel() if vector.dim() == 1 else f"shape {tuple(vector.shape)}"
        raise MergeArgumentError(
            f"`{argument}` has {length} weights but there are {count} models; give exactly one "
            "weight per model, in the order of `models`."
        )
    if not bool(torch.isfinite(vector).all()):
        raise MergeArgumentError(
            f"`{argument}` holds a weight that is not finite ({vector.tolist()}); weights must be "
            "finite numbers."
        )
    return vector


class _Weights:
    """Per-name weight vectors: one list, or a first-match-wins map with equal weights elsewhere."""

    def __init__(self, weights: Any, count: int, dtype: torch.dtype, layers: int) -> None:
        self.dtype = dtype
        self.layers = layers
        self.uniform = torch.ones(count, dtype=dtype)
        self.map: PatternMap[WeightVector] | None = None
        self.default: WeightVector = self.uniform
        if isinstance(weights, Mapping):
            self.map = PatternMap(
                {
                    key: _weight_vector(value, count, dtype, f"weights[{pattern_repr(key)}]")
                    for key, value in weights.items()
                },
                "weights",
            )
        elif weights is not None:
            self.default = _weight_vector(weights, count, dtype, "weights")
        held = [self.uniform, self.default, *(self.map.values() if self.map else ())]
        self._held = {id(v) for v in held if isinstance(v, torch.Tensor)}

    def key(self, vector: torch.Tensor) -> Hashable:
        """A key equal for equal vectors: the object for the ones held here (alive throughout
        the plan), the exact bits for the ones made per layer (so -0.0 is not 0.0)."""
        if id(vector) in self._held:
            return id(vector)
        return vector.numpy().tobytes()

    def __call__(self, name: str) -> torch.Tensor:
        vector = self.default
        if self.map is not None:
            found = self.map.match(name)
            vector = self.uniform if found is None else found[1]
        if isinstance(vector, torch.Tensor):
            return vector
        layer = layer_index(name)
        values = [v.at(layer, self.layers) if isinstance(v, ByLayer) else v for v in vector]
        resolved = torch.tensor(values, dtype=self.dtype)
        if not bool(torch.isfinite(resolved).all()):  # finite in float64, not in this dtype
            raise MergeArgumentError(
                f"the weights of '{name}' hold a weight that is not finite in {self.dtype} "
                f"({resolved.tolist()}, from {values}); weights must be finite numbers in the "
                "accumulation dtype: scale them down, or pass a wider `dtype`."
            )
        return resolved


class _Methods:
    """Per-name methods: one method, or a first-match-wins map (no match is an error)."""

    def __init__(self, method: Any) -> None:
        self.map: PatternMap[Method] | None = None
        if isinstance(method, Mapping):
            self.map = PatternMap(
                {
                    key: resolve(value, f"method[{pattern_repr(key)}]")
                    for key, value in method.items()
                },
                "method",
            )
            self.single: Method | None = None
        else:
            self.single = resolve(method)

    def find(self, name: str) -> Method | None:
        if self.map is None:
            return self.single
        found = self.map.match(name)
        return None if found is None else found[1]

    def __call__(self, name: str) -> Method:
        method = self.find(name)
        if method is None:
            raise NoMergeMethodFoundForParameterError(
                f"The map of parameter names to merge methods provided to `merge()` did not "
                f"contain a matching merge method for the parameter '{name}'. Either exclude that "
                "parameter via the `included` or `excluded` arguments, or assign it a merge "
                "method (a catch-all `re.compile(r'.*')` at the end of the map does that)."
            )
        return method


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the user's seed and a tensor's name, independent of any other tensor."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_dtype(dtype: Any) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MergeArgumentError(
            f"`dtype` must be a floating-point torch.dtype to accumulate in (torch.float64 by "
            f"default, or torch.float32); got {dtype!r}."
        )


_Weighing = tuple[tuple[float, ...], tuple[float, ...], float | None]
"""A step's weights (normalised if asked), its loop coefficients and divisor."""


def _weigh(name: str, vector: torch.Tensor, contributors: list[int], normalize: bool) -> _Weighing:
    coefficients = tuple(vector.tolist())
    divisor = None
    if normalize and len(set(coefficients)) == 1 and coefficients[0] != 0:
        # Equal weights, however written (1/3 is inexact): sum with 1s, divide by the count.
        coefficients, divisor = (1.0,) * len(coefficients), float(len(coefficients))
    if normalize:
        total = vector.sum()
        if total == 0:
            raise ParameterModelWeightsSumToZeroError(
                f"The model weights for the parameter '{name}' that were passed to `merge()` "
                f"sum to 0 (models {contributors} have weights {vector.tolist()}), so they "
                "cannot be normalised. Either ensure that the weights never sum to 0, exclude "
                "the parameter via the `included` or `excluded` arguments, or pass "
                "`normalize=False` to use the weights as given."
            )
        normalised = vector / total
        if not (bool(torch.isfinite(total)) and bool(torch.isfinite(normalised).all())):
            raise MergeArgumentError(
                f"The model weights for the parameter '{name}' that were passed to `merge()` "
                f"(models {contributors} have weights {vector.tolist()}) sum to "
                f"{total.item()!r} in {vector.dtype}, so they normalise to "
                f"{normalised.tolist()}; the sum and the normalised weights must be finite in "
                "the accumulation dtype. Scale the weights down (only their ratios matter when "
                "normalising), or pass a wider `dtype`."
            )
        vector = normalised
        divisor = total.item() if divisor is None else divisor
    return tuple(vector.tolist()), coefficients, divisor


def build_plan(
    sources: Sequence[Source],
    base: Source,
    base_index: int | None,
    *,
    method: Any,
    weights: Any,
    included: Any,
    excluded: Any,
    dtype: torch.dtype,
    normalize: bool,
    seed: int | None,
    inplace: bool = False,
    vocabulary: OutputVocabulary | None = None,
    vocabulary_tensors: Any = None,
) -> Plan:
    """Decide every tensor's fate, raising before anything is touched if the call is bad.

    Every tensor accepted is one the kernels can read (each contributor) and write (the base's):
    a dtype they compute in exactly, dense memory, and, ``inplace``, memory of its own (no
    expanded or partly overlapping views), so that no built-in step can fail once writing began.
    """
    _check_dtype(dtype)
    included_set = PatternSet(included, "included")
    excluded_set = PatternSet(excluded, "excluded")
    layers = count_layers(base.entries)
    weight_of = _Weights(weights, len(sources), dtype, layers)
    method_of = _Methods(method)

    steps: list[Step] = []
    skipped: dict[str, str] = {}
    tied: dict[str, str] = {}
    first_name_of_view: dict[Any, str] = {}
    step_index: dict[str, int] = {}
    weighings: dict[tuple[Hashable, tuple[int, ...]], _Weighing] = {}
    unusual = base.unusual or any(source.unusual for source in sources)
    odd_of = [_odd_entries(source) for source in sources]  # names the kernels cannot take
    base_odd = odd_of[base_index] if base_index is not None else _odd_entries(base)
    odd_models = [i for i, odd in enumerate(odd_of) if odd]
    dropped: dict[str, dict[int, str]] = {}
    rows_differ: list[str] = []
    aligned = _Aligned(vocabulary, vocabulary_tensors, base_index, unusual)

    for name in base.others:
        skipped[name] = reasons.NOT_A_TENSOR
    for name, floating in base.buffers.items():  # an integer one is never merged anyway
        skipped[name] = reasons.BUFFER if floating else reasons.NOT_FLOATING

    for name, entry in base.entries.items():
        canonical = first_name_of_view.setdefault(entry.key, name)
        if canonical != name:
            tied[name] = canonical
            skipped[name] = reasons.TIED
            if canonical in step_index:
                i = step_index[canonical]
                steps[i] = _with_alias(steps[i], name)
            continue
        if aligned.holds(name, entry):
            if not selected(name, included_set, excluded_set):
                aligned.check_excluded(name, entry)
                skipped[name] = reasons.EXCLUDED
                continue
            assert base_index is not None  # merge() refuses a separate base with a vocabulary
            step_index[name] = len(steps)
            steps.append(
                aligned.step(
                    name, entry, sources, base_index, method_of, weight_of, normalize, seed, layers
                )
            )
            if _kept_as_is(steps[-1], base_index):
                del steps[-1], step_index[name]
                skipped[name] = reasons.ONE_MODEL
            continue
        if not selected(name, included_set, excluded_set):
            skipped[name] = reasons.EXCLUDED
            continue
        holders = [i for i, source in enumerate(sources) if source.holds(name, entry.shape)]
        step_method = _method_for(name, holders, base_index, method_of)
        if step_method is None:
            resized = any(name in s.entries and not s.holds(name, entry.shape) for s in sources)
            skipped[name] = reasons.SHAPE_MISMATCH if resized else reasons.ONE_MODEL
            if resized and vocabulary is None and _rows_differ(name, entry, sources):
                rows_differ.append(name)
            continue
        if not entry.is_floating:
            skipped[name] = reasons.NOT_FLOATING
            continue
        if base_odd and name in base_odd:  # float8, sparse: no kernel writes it exactly
            skipped[name] = base_odd[name]
            continue
        if odd_models:  # a model whose tensor the kernels cannot read does not contribute
            drops = {i: odd_of[i][name] for i in odd_models if i in holders and name in odd_of[i]}
            if drops:
                dropped[name] = drops
                holders = [i for i in holders if i not in drops]
                step_method = _method_for(name, holders, base_index, method_of)
                if step_method is None:
                    skipped[name] = reasons.OTHERS_NOT_MERGEABLE
                    continue
        step_method = _for_layer(step_method, name, layers)
        contributors = [i for i in holders if not (step_method.task_vectors and i == base_index)]
        _check_applicable(step_method, name, contributors)
        sharded = False
        if unusual:  # some tensor is on the meta device or sharded: check this parameter's
            _check_not_meta(name, entry, [(i, sources[i].entries[name]) for i in holders])
            sharded = check_sharding(
                name,
                [("the base", entry)]
                + [(f"models[{i}]", sources[i].entries[name]) for i in holders],
                step_method,
            )
        vector = weight_of(name)
        key = (weight_of.key(vector), tuple(contributors))
        weighing = weighings.get(key)
        if weighing is None:  # the torch arithmetic once per distinct weights (not per tensor)
            weighing = weighings[key] = _weigh(name, vector[contributors], contributors, normalize)
        weights_of_step, coefficients, divisor = weighing
        step_index[name] = len(steps)
        steps.append(
            Step(
                name=name,
                method=step_method,
                contributors=tuple(contributors),
                weights=weights_of_step,
                uses_base=reads_base(step_method),
                seed=seed if step_method.random else None,
                coefficients=coefficients,
                divisor=divisor,
                sharded=sharded,
            )
        )
    if inplace:
        _check_own_memory(base, step_index)
    return Plan(
        tuple(steps),
        skipped,
        tied,
        _unused(sources, base),
        dropped,
        vocabulary if aligned.active else None,
        normalize,
        tuple(rows_differ),
    )


def _kept_as_is(step: Step, base_index: int) -> bool:
    """Whether a row step only copies the base's rows where they are (nobody else holds it)."""
    assert step.rows is not None
    return (
        all(
            group.copied
            and group.models == (base_index,)
            and torch.equal(group.rows[0], group.out_rows)
            for group in step.rows.groups
        )
        and sum(group.out_rows.numel() for group in step.rows.groups) == step.rows.rows
    )


def _rows_differ(name: str, entry: Entry, sources: Sequence[Source]) -> bool:
    """Whether the other models' tensors of ``name`` differ from the base's only in their rows:
    a matrix whose rows are tokens, of vocabularies that differ."""
    shapes = [s.entries[name].shape for s in sources if name in s.entries]
    return len(entry.shape) == 2 and all(
        len(shape) == 2 and shape[1:] == entry.shape[1:] for shape in shapes
    )


class _Aligned:
    """Which tensors are vocabulary tensors, aligned by token, and their row steps."""

    def __init__(
        self,
        vocabulary: OutputVocabulary | None,
        patterns: Any,
        base_index: int | None,
        unusual: bool,
    ) -> None:
        self.vocabulary = vocabulary
        self.active = vocabulary is not None and not vocabulary.identity
        self.patterns = PatternSet(patterns, "vocabulary_tensors") if patterns is not None else None
        if self.active and unusual:
            raise VocabularyError(
                "vocabulary= aligns whole tensors in memory or on disk, but some tensor is "
                "sharded (DTensor) or on the meta device; merge unsharded checkpoints (paths)."
            )
        self.base_rows = (
            vocabulary.model_rows[base_index]
            if vocabulary is not None and base_index is not None
            else 0
        )

    def holds(self, name: str, entry: Entry) -> bool:
        """Whether ``name`` is a vocabulary tensor: matched by ``vocabulary_tensors``, or by
        default a matrix with one row per token of the base (``vocab_size`` rows)."""
        if not self.active:
            return False
        if self.patterns is None:
            return len(entry.shape) == 2 and entry.shape[0] == self.base_rows
        if not selected(name, self.patterns, PatternSet(None, "excluded")):
            return False
        if len(entry.shape) < 1 or entry.shape[0] != self.base_rows:
            raise VocabularyError(
                f"`vocabulary_tensors` selects the base's tensor '{name}', of shape "
                f"{tuple(entry.shape)}, but the base's vocabulary tensors have {self.base_rows} "
                "rows (config.json's vocab_size, else its tokenizer's size); select only "
                "tensors with one row per token."
            )
        return True

    def check_excluded(self, name: str, entry: Entry) -> None:
        """An excluded vocabulary tensor is kept as the base has it: only while its rows stay."""
        assert self.vocabulary is not None
        if entry.shape[0] != self.vocabulary.rows:
            raise VocabularyError(
                f"the vocabulary tensor '{name}' is excluded, so it would be kept as the base has "
                f"it ({entry.shape[0]} rows), but the output vocabulary has "
                f"{self.vocabulary.rows} rows; include it, or use vocabulary='base'."
            )

    def step(
        self,
        name: str,
        entry: Entry,
        sources: Sequence[Source],
        base_index: int,
        method_of: _Methods,
        weight_of: _Weights,
        normalize: bool,
        seed: int | None,
        layers: int,
    ) -> Step:
        """The row step of a vocabulary tensor (see :func:`aligned_step`)."""
        assert self.vocabulary is not None
        return aligned_step(
            name,
            entry,
            sources,
            base_index,
            self.vocabulary,
            lambda: _for_layer(method_of(name), name, layers),
            weight_of(name),
            normalize,
            seed,
        )


def aligned_step(
    name: str,
    entry: Entry,
    sources: Sequence[Source],
    base_index: int,
    vocabulary: OutputVocabulary,
    method_for: Callable[[], Method],
    vector: torch.Tensor,
    normalize: bool,
    seed: int | None,
) -> Step:
    """The row step of a vocabulary tensor: rows grouped by the models holding them, each
    group merged over them with weights (``vector``, one per model) renormalised, a row one
    model holds copied. ``method_for`` gives the method where two models or more hold it
    (also how ``terge lineage verify`` rebuilds the step)."""
    if not entry.is_floating:
        raise VocabularyError(
            f"the vocabulary tensor '{name}' is {entry.dtype}, not floating point; exclude "
            "it with vocabulary_tensors=[...] patterns that do not select it."
        )
    holders = [
        i
        for i, source in enumerate(sources)
        if (other := source.entries.get(name)) is not None
        and other.is_floating
        and len(other.shape) == len(entry.shape)
        and other.shape[1:] == entry.shape[1:]
        and other.shape[0] == vocabulary.model_rows[i]
    ]
    method = method_for() if len(holders) >= 2 else None
    task = method is not None and method.task_vectors
    everyone = [i for i in holders if not (task and i == base_index)]
    tables = {}
    for i in holders:
        table = vocabulary.index[i]
        tables[i] = torch.where(table < sources[i].entries[name].shape[0], table, -1)
    code = torch.zeros(vocabulary.rows, dtype=torch.int64)
    for bit, i in enumerate(holders):
        code |= (tables[i] >= 0).to(torch.int64) << bit
    values, inverse = torch.unique(code, return_inverse=True)
    groups = []
    for number, value in enumerate(values.tolist()):
        out_rows = torch.nonzero(inverse == number).flatten()
        held = [i for bit, i in enumerate(holders) if value >> bit & 1]
        if not held:
            raise VocabularyError(
                f"{out_rows.numel()} rows of the output's '{name}' (first: row "
                f"{out_rows[0].item()}) are tokens that no model holding '{name}' has: the "
                "models that have those tokens lack that tensor (an untied LM head?). Use "
                "vocabulary='base', or give those models the tensor."
            )
        if len(held) == 1 or method is None:
            only = held[0]
            groups.append(
                RowGroup(
                    (only,),
                    out_rows,
                    (tables[only][out_rows],),
                    None,
                    (1.0,),
                    (1.0,),
                    None,
                    True,
                )
            )
            continue
        contributors = [i for i in held if i in everyone]
        base_rows = None
        if reads_base(method):
            if base_index not in held:
                raise VocabularyError(
                    f"the method {method.name!r} reads the base's row of every token, but "
                    f"{out_rows.numel()} rows of '{name}' (first: row {out_rows[0].item()}) "
                    "are tokens the base lacks; give the vocabulary tensors "
                    "method='arithmetic' with a method map, or use vocabulary='base'."
                )
            base_rows = tables[base_index][out_rows]
        _check_applicable(method, name, contributors)
        weights, coefficients, divisor = _weigh(name, vector[contributors], contributors, normalize)
        rows = tuple(tables[i][out_rows] for i in contributors)
        groups.append(
            RowGroup(tuple(contributors), out_rows, rows, base_rows, weights, coefficients, divisor)
        )
    if method is None:  # held by the base alone: its rows, moved where the vocabulary says
        method = resolve("arithmetic")
    weights, coefficients, divisor = _weigh(name, vector[everyone], everyone, normalize)
    return Step(
        name=name,
        method=method,
        contributors=tuple(everyone),
        weights=weights,
        uses_base=reads_base(method),
        seed=seed if method.random else None,
        coefficients=coefficients,
        divisor=divisor,
        rows=RowTable(vocabulary.rows, tuple(groups)),
    )


KERNEL_DTYPES = frozenset((torch.float64, torch.float32, torch.float16, torch.bfloat16))
"""The floating dtypes every kernel reads and writes exactly (rounding once)."""


def _key(entry: Entry) -> tuple[Any, ...]:
    """An entry's key as :func:`terge.sources.view_key` builds it: ``(device, address, shape,
    strides, dtype)`` for plain storage, ``("object", id)`` or ``("file", name)`` otherwise."""
    return cast("tuple[Any, ...]", entry.key)


def _odd_entries(source: Source) -> dict[str, str]:
    """The names of ``source``'s tensors that the kernels cannot take, with the reason.

    One pass over the entries' dtypes and keys; only a tensor whose key is its identity (no
    plain storage: sparse, meta, empty or a subclass) is looked at itself.
    """
    odd: dict[str, str] = {}
    for name, entry in source.entries.items():
        if entry.dtype in KERNEL_DTYPES and _key(entry)[0] != "object":
            continue
        if not entry.dtype.is_floating_point:
            odd[name] = reasons.NOT_FLOATING
        elif entry.dtype not in KERNEL_DTYPES:
            odd[name] = reasons.UNSUPPORTED_DTYPE
        elif not entry.is_meta and source.get(name).layout != torch.strided:
            odd[name] = reasons.NOT_DENSE
    return odd


def _check_own_memory(base: Source, merged: Mapping[str, int]) -> None:
    """In place, every merged tensor of the base must own its memory: an expanded view (two
    elements at one address) cannot hold the merge, and two different views that share memory
    would each be merged from the other's merged values (or change a tensor left alone).
    Tied names (one view, two names) share a key and are fine. Read off the entries' keys (no
    tensor is touched): one sweep over the tensors' address ranges, sorted."""
    extents = sorted(
        (key[1], name, key) for name, entry in base.entries.items() if len(key := _key(entry)) == 5
    )  # plain storage only (not meta, empty, sharded or a file's); names are unique
    reach = -1
    active: list[tuple[int, str, tuple[Any, ...], int]] = []
    for start, name, key in extents:
        _, _, shape, stride, dtype = key
        covered = 1  # elements from the first to the last
        for size, step in zip(shape, stride):
            covered += (size - 1) * step
        if name in merged and covered < math.prod(shape):
            raise MergeArgumentError(
                f"inplace=True cannot write the merge into the base's tensor '{name}': it is an "
                f"expanded view (strides {stride} for shape {tuple(shape)}), whose elements share "
                "memory; pass inplace=False, give the tensor its own memory (.clone()), or "
                "exclude it."
            )
        end = start + covered * dtype.itemsize
        if start >= reach:  # past every range so far: the usual case, nothing overlaps
            active, reach = [(end, name, key, start)], end
            continue
        active = [other for other in active if other[0] > start]
        for _, other, other_key, _ in active:
            if (name in merged or other in merged) and _share_memory(key, other_key):
                first, second = sorted((other, name))
                raise MergeArgumentError(
                    f"inplace=True cannot merge into the base's tensors '{first}' and "
                    f"'{second}': they are different views of the same memory, so writing one "
                    "changes the other; pass inplace=False, give each its own memory "
                    "(.clone()), or exclude them (tied weights, one view under two names, are "
                    "fine)."
                )
        active.append((end, name, key, start))
        reach = max(reach, end)


_EXACT_CHECK = 1 << 24
"""Most elements two interleaved views may span for their shared elements to be listed (more
are taken to share memory)."""


def _share_memory(a: Any, b: Any) -> bool:
    """Whether two different views whose address ranges overlap share an element (views that
    interleave, such as a matrix's even and odd columns, do not)."""
    if a[0] != b[0] or a == b:  # another device, or the same view (tied)
        return False
    size = a[4].itemsize
    if b[4].itemsize != size or (a[1] - b[1]) % size:
        return True
    first = min(a[1], b[1])
    extent = max(a[1] + _span(a) * size, b[1] + _span(b) * size)
    count = (extent - first) // size
    if count > _EXACT_CHECK:
        return True
    grid = torch.arange(count)
    elements = [
        grid.as_strided(key[2], key[3], (key[1] - first) // size).reshape(-1) for key in (a, b)
    ]
    return bool(torch.isin(elements[0], elements[1]).any())


def _span(key: Any) -> int:
    return 1 + sum((size - 1) * step for size, step in zip(key[2], key[3]))


def _unused(sources: Sequence[Source], base: Source) -> dict[str, tuple[int, ...]]:
    """Names other models hold that the base lacks: recorded, since they cannot be merged."""
    known = set(base.entries) | set(base.others) | set(base.buffers)
    unused: dict[str, list[int]] = {}
    for index, source in enumerate(sources):
        if source is not base:
            for name in source.entries:
                if name not in known:
                    unused.setdefault(name, []).append(index)
    return {name: tuple(models) for name, models in unused.items()}


def _method_for(
    name: str, holders: list[int], base_index: int | None, method_of: _Methods
) -> Method | None:
    """The method for a tensor held by at least two models, else ``None`` (left alone).

    As in terge 0.1.1, a method map is consulted (and must match) only for tensors held by two or
    more models; a separate base counts as a holder for a method that reads it.
    """
    if len(holders) >= 2:
        return method_of(name)
    if len(holders) == 1 and base_index is None:
        method = method_of.find(name)
        if method is not None and reads_base(method):  # a user's own method too
            return method
    return None


def _for_layer(method: Method, name: str, layers: int) -> Method:
    """The method with any ``by_layer`` settings resolved for this parameter's block."""
    if not any(isinstance(v, ByLayer) for v in method.settings.values()):
        return method
    layer = layer_index(name)
    settings = {
        key: value.at(layer, layers) if isinstance(value, ByLayer) else value
        for key, value in method.settings.items()
    }
    return dataclasses.replace(method, settings=settings)


def _with_alias(step: Step, alias: str) -> Step:
    return dataclasses.replace(step, aliases=(*step.aliases, alias))


def _check_applicable(method: Method, name: str, contributors: list[int]) -> None:
    count = len(contributors)
    if count < method.min_models or (method.max_models is not None and count > method.max_models):
        if method.max_models is None:
            wanted = f"at least {method.min_models}"
        elif method.max_models == method.min_models:
            wanted = f"exactly {method.min_models}"
        else:
            wanted = f"between {method.min_models} and {method.max_models}"
        raise MethodNotApplicableError(
            f"the merge method {method.name!r} needs {wanted} contributing models, but the "
            f"parameter '{name}' has {count} (models {contributors}). Give that parameter another "
            "method with a method map, or exclude it."
        )


def _check_not_meta(name: str, base: Any, holders: list[tuple[int, Any]]) -> None:
    if base.is_meta:
        raise MetaTensorError(
            f"the base's tensor '{name}' is on the meta device and holds no data; load real "
            "weights into it (e.g. with load_state_dict(..., assign=True)) or exclude it."
        )
    for index, entry in holders:
        if entry.is_meta:
            raise MetaTensorError(
                f"models[{index}]'s tensor '{name}' is on the meta device and holds no data; "
                "load real weights into it or exclude it."
            )


def check_seed(seed: Any) -> int | None:
    """``seed`` must be an int (or None, meaning a fresh one is drawn and recorded)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeArgumentError(f"`seed` must be an int or None; got {seed!r}.")
    return seed
