"""Merges weighted by statistics of each model's own data: Fisher merging and RegMean, and the
hooks that compute those statistics from a model and its batches.

The statistics are passed per model, keyed by parameter name: Fisher diagonals (one tensor of the
parameter's shape) for any parameter, Gram matrices ``X^T X`` of a linear layer's inputs (``in x
in``) for its ``weight``. A parameter without them takes the weighted mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import MethodNotApplicableError

__all__ = ["fisher_diagonals", "fisher_merge", "gram_matrices", "regmean_merge"]

Statistics = Sequence[Mapping[str, torch.Tensor]]
"""One mapping per model (in the order of ``models``), parameter name to statistic."""


def _weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_i w_i theta_i``, each product rounded before it is added."""
    total = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights, strict=True):
        total.add_(tensor * weight)
    return total


def _gathered(
    method: str,
    kind: str,
    statistics: Statistics,
    name: str | None,
    contributors: Sequence[int],
    like: torch.Tensor,
    shape: tuple[int, ...],
) -> list[torch.Tensor] | None:
    """Each contributor's statistic for ``name`` (float64, on ``like``'s device); ``None`` when
    no model has one; an error when only some do, or one has the wrong shape."""
    if name is None:
        raise MethodNotApplicableError(
            f"{method}: needs the parameter's name to find its {kind} (terge.merge passes it)."
        )
    found = [statistics[i].get(name) if i < len(statistics) else None for i in contributors]
    if all(s is None for s in found):
        return None
    missing = [i for i, s in zip(contributors, found, strict=True) if s is None]
    if missing:
        raise MethodNotApplicableError(
            f"{method}: the parameter '{name}' has {kind} for some models but not for models "
            f"{missing}; give every contributing model's {kind} for it, or none (then it is "
            "averaged)."
        )
    for index, statistic in zip(contributors, found, strict=True):
        if tuple(statistic.shape) != shape:  # type: ignore[union-attr]
            raise MethodNotApplicableError(
                f"{method}: models[{index}]'s {kind} for '{name}' has shape "
                f"{tuple(statistic.shape)}, expected {shape}."  # type: ignore[union-attr]
            )
    return [s.detach().to(device=like.device, dtype=like.dtype) for s in found]  # type: ignore[union-attr]


def fisher_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    name: str | None = None,
    contributors: Sequence[int] | None = None,
    fishers: Statistics,
    epsilon: float,
) -> torch.Tensor:
    """Fisher merging (https://arxiv.org/abs/2111.09832): each entry the mean of the models'
    entries weighted by their Fisher information, ``sum_i w_i (F_i + epsilon) theta_i / sum_i w_i
    (F_i + epsilon)`` (the weighted mean where that denominator is 0); a parameter without
    Fisher diagonals takes the weighted mean ``sum_i w_i theta_i``."""
    contributors = range(len(tensors)) if contributors is None else contributors
    shape = tuple(tensors[0].shape)
    found = _gathered("fisher", "Fisher diagonals", fishers, name, contributors, tensors[0], shape)
    mean = _weighted_mean(tensors, weights)
    if found is None:
        return mean
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for theta, fisher, weight in zip(tensors, found, weights, strict=True):
        importance = (fisher + epsilon).mul_(weight)
        numerator.add_(importance * theta)
        denominator.add_(importance)
    return torch.where(denominator != 0, numerator / denominator, mean)


def _reduced(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's regularised Gram matrix: off-diagonal entries times ``alpha``."""
    diagonal = torch.diagonal(gram).clone()
    return (gram * alpha).diagonal_scatter(diagonal)


def regmean_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    name: str | None = None,
    contributors: Sequence[int] | None = None,
    grams: Statistics,
    alpha: float,
) -> torch.Tensor:
    """RegMean (https://arxiv.org/abs/2212.09849): the linear layer weight ``W`` (``out x in``)
    that best reproduces every model's outputs on its own inputs, ``W^T = (sum_i w_i G_i)^-1
    sum_i w_i G_i W_i^T``, ``G_i`` the Gram matrix ``X_i^T X_i`` of model ``i``'s inputs with its
    off-diagonal entries times ``alpha`` (equal weights: the paper's formula); solved in the
    tensors' dtype with ``torch.linalg.solve``. A parameter without Gram matrices takes the
    weighted mean ``sum_i w_i theta_i``."""
    contributors = range(len(tensors)) if contributors is None else contributors
    theta = tensors[0]
    if theta.dim() != 2:
        found = None
        if any(i < len(grams) and name in grams[i] for i in contributors):
            raise MethodNotApplicableError(
                f"regmean: the parameter '{name}' has Gram matrices but is not a 2-D weight "
                f"(shape {tuple(theta.shape)}); Gram matrices go with a linear layer's weight."
            )
    else:
        shape = (theta.shape[1], theta.shape[1])
        found = _gathered("regmean", "Gram matrices", grams, name, contributors, theta, shape)
    if found is None:
        return _weighted_mean(tensors, weights)
    total = torch.zeros_like(found[0])
    target = torch.zeros_like(theta.T)
    for weight_matrix, gram, weight in zip(tensors, found, weights, strict=True):
        reduced = _reduced(gram, alpha).mul_(weight)
        total.add_(reduced)
        target.add_(reduced @ weight_matrix.T)
    solution, info = torch.linalg.solve_ex(total, target)
    if int(info) != 0 or not torch.isfinite(solution).all():
        raise MethodNotApplicableError(
            f"regmean: the summed Gram matrices of '{name}' are singular (an input feature no "
            "model's data ever activates); give regmean a smaller alpha, more data, or give "
            "that parameter another method with a method map."
        )
    return solution.T.contiguous()


# --- computing the statistics ---------------------------------------------------------------------


def fisher_diagonals(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss: Callable[[torch.nn.Module, Any], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The empirical Fisher information's diagonal of every parameter that requires a gradient:
    the mean over ``batches`` of the squared gradient of ``loss(model, batch)`` (a scalar, the
    negative log-likelihood), in float64 on the CPU. Batches of one example give the paper's
    per-example Fisher; sampling the labels from the model's own predictions, its true Fisher.
    The model's gradients are left as they were."""
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.grad for n, p in parameters.items()}
    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in parameters.items()}
    count = 0
    try:
        for batch in batches:
            for p in parameters.values():
                p.grad = None
            loss(model, batch).backward()
            for n, p in parameters.items():
                if p.grad is not None:
                    sums[n] += p.grad.detach().to(device="cpu", dtype=torch.float64).square()
            count += 1
    finally:
        for n, p in parameters.items():
            p.grad = saved[n]
    if count == 0:
        raise ValueError("fisher_diagonals: the batches were empty; give at least one batch.")
    return {n: s / count for n, s in sums.items()}


def gram_matrices(
    model: torch.nn.Module,
    batches: Iterable[Any],
    forward: Callable[[torch.nn.Module, Any], Any] | None = None,
) -> dict[str, torch.Tensor]:
    """RegMean's statistics: for every ``torch.nn.Linear`` in ``model``, ``X^T X`` of its inputs
    over all ``batches`` (every leading dimension flattened into rows), in float64 on the CPU,
    keyed by the layer's weight's name (``"encoder.fc.weight"``). ``forward(model, batch)`` runs
    the model (default ``model(batch)``), without gradients; hooks are removed afterwards."""
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(key: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            gram = (x.T @ x).cpu()
            sums[key] = gram if key not in sums else sums[key].add_(gram)

        return record

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = f"{module_name}.weight" if module_name else "weight"
            handles.append(module.register_forward_pre_hook(hook(key)))
    try:
        with torch.no_grad():
            for batch in batches:
                if forward is None:
                    model(batch)
                else:
                    forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return sums
