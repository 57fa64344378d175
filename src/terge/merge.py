"""``merge()``: sources → plan → execute."""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import BaseIndexError, MergeArgumentError, NoParametersToMergeWarning
from .execute import destinations, execute
from .plan import build_plan, check_seed
from .sources import Source, as_source


def merge(
    models: Sequence[torch.nn.Module | Mapping[str, torch.Tensor]],
    base: torch.nn.Module | Mapping[str, torch.Tensor] | int = 0,
    method: Any = "arithmetic",
    weights: Any = None,
    included: Any = None,
    excluded: Any = None,
    inplace: bool = False,
    dtype: torch.dtype = torch.float64,
    lineage: bool = False,
    progress: bool = False,
    *,
    normalize: bool = True,
    buffers: bool = False,
    seed: int | None = None,
) -> Any:
    """Merge PyTorch models (modules or state dicts) that share parameters by name and shape.

    Every tensor of ``base`` that at least two of ``models`` hold with the same name and shape is
    replaced by the merge of theirs: by default the weighted mean, accumulated in ``dtype`` and
    rounded once into the tensor's own dtype. Everything is validated before any tensor is touched.

    Args:
        models: the models to merge, ``nn.Module``s and state dicts mixed freely.
        base: the model whose tensors are the defaults and, with ``inplace=True``, are written
            into: an index into ``models`` (default ``0``) or a separate module or state dict.
        method: a method name (``'arithmetic'``), a method from ``terge.methods``, a callable
            ``f(tensors, weights, base) -> tensor``, or a map of patterns to those
            (first match wins; a merged parameter that matches nothing is an error).
        weights: relative weights, one per model, or a map of patterns to such lists (first match
            wins; unmatched parameters weigh models equally). Normalised per parameter over the
            models that hold it, unless ``normalize=False``.
        included: a pattern or list of patterns: only matching parameters are merged. A ``str``
            matches a name exactly; a compiled ``re``/``regex`` pattern matches with ``search``.
        excluded: patterns of parameters not to merge, applied after ``included``.
        inplace: write into ``base``'s own tensors (Parameter objects keep their identity);
            otherwise ``base`` is copied once and no input is modified.
        dtype: the floating-point dtype the merge accumulates in.
        lineage: also return a ``Lineage``: ``{name: (method, [(model_index, weight), ...])}``,
            with the tensors left alone and why in ``.skipped``.
        progress: show a tqdm progress bar over the parameters actually merged.
        normalize: divide each parameter's weights by their sum (``False`` uses them as given,
            so ``weights=[1, 1, -1]`` writes ``a + b - c``).
        buffers: merge floating-point buffers of modules (BatchNorm statistics) too; integer
            buffers are kept from the base. State dicts have no buffers: all their tensors count.
        seed: seeds random methods per parameter name, so results never depend on what else is
            merged; ``None`` draws a seed, recorded in the lineage.

    Returns:
        The merged model (the base itself when ``inplace``; a state dict when the base is one),
        or ``(model, lineage)`` when ``lineage=True``.

    Example:
        >>> import torch, terge
        >>> models = [torch.nn.Linear(4, 2) for _ in range(3)]
        >>> soup, lineage = terge.merge(models, weights=[1, 1, 2], lineage=True)
        >>> lineage['bias']
        ('arithmetic', [(0, 0.25), (1, 0.25), (2, 0.5)])
    """
    sources, base_index, base_source = _sources(models, base, buffers)
    seed = check_seed(seed)
    plan = build_plan(
        sources,
        base_source,
        base_index,
        method=method,
        weights=weights,
        included=included,
        excluded=excluded,
        dtype=dtype,
        normalize=normalize,
        seed=secrets.randbits(63) if seed is None else seed,
    )
    result, outputs = destinations(base_source, plan, inplace)
    execute(plan, sources, base_source, outputs, dtype, progress)
    if not plan.steps:
        warnings.warn(
            "Of all the models and desired parameters passed to `merge()`, none of them share "
            "any mergeable parameters with the same name and shape. This means that the models "
            "are either of totally different architectures, are of different sizes, have only "
            "unnamed parameters, or that whatever parameters they share were not included in "
            "your desired merge parameters. Returning the base model as it is.",
            NoParametersToMergeWarning,
            stacklevel=2,
        )
    return (result, plan.lineage()) if lineage else result


def _sources(models: Any, base: Any, buffers: bool) -> tuple[list[Source], int | None, Source]:
    """Wrap every model, and find the base among them (an index) or wrap it separately."""
    if isinstance(models, (torch.nn.Module, Mapping)) and not isinstance(
        models, (torch.nn.ModuleList, torch.nn.Sequential)
    ):
        raise MergeArgumentError(
            f"`models` must be a list of models; got a single {type(models).__name__}. "
            "Wrap it in a list: merge([model_a, model_b])."
        )
    if isinstance(models, (str, bytes)) or not isinstance(
        models, (Sequence, torch.nn.ModuleList, torch.nn.Sequential)
    ):
        raise MergeArgumentError(
            f"`models` must be a list of models (nn.Module or state dict); got "
            f"{type(models).__name__}."
        )
    models = list(models)
    if not models:
        raise MergeArgumentError("`models` is empty; pass at least one model to merge.")
    sources = [as_source(m, buffers, f"models[{i}]") for i, m in enumerate(models)]
    if isinstance(base, bool) or not isinstance(base, (int, torch.nn.Module, Mapping)):
        raise MergeArgumentError(
            f"`base` must be an index into `models` or a model (nn.Module or state dict); got "
            f"{base!r}."
        )
    if isinstance(base, int):
        if not -len(models) <= base < len(models):
            raise BaseIndexError(
                f"`base` is {base}, but there are only {len(models)} models; pass an index from "
                f"{-len(models)} to {len(models) - 1}, or a model."
            )
        index = base % len(models)
        return sources, index, sources[index]
    for index, model in enumerate(models):
        if model is base:
            return sources, index, sources[index]
    return sources, None, as_source(base, buffers, "base")
