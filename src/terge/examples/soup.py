"""A model soup in a few seconds, with nothing to download.

Three copies of one small network start from the same weights and are fine-tuned on different
samples of a synthetic regression task; terge averages them (uniformly, then greedily weighted)
and prints each model's held-out loss, the soup's, and the lineage of the merge.

Run it with ``python -m terge.examples.soup``.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import terge


def make_task(seed: int, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of a fixed nonlinear function, sampled with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 8, generator=generator)
    targets = torch.sin(inputs @ torch.linspace(-1, 1, 8)).unsqueeze(1) + 0.1 * inputs[:, :1]
    return inputs, targets


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the shared start every ingredient is fine-tuned from
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.LayerNorm(32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 1),
    )


def fine_tune(model: torch.nn.Module, seed: int, steps: int) -> torch.nn.Module:
    inputs, targets = make_task(seed, 256)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    return model


def loss(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(data[0]), data[1]).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3, help="how many fine-tuned ingredients")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps per model")
    args = parser.parse_args(argv)

    start = make_model()
    held_out = make_task(seed=1234, samples=2048)
    ingredients = [fine_tune(copy.deepcopy(start), seed, args.steps) for seed in range(args.models)]
    losses = [loss(m, held_out) for m in ingredients]

    print(f"terge {terge.__version__}: a soup of {args.models} fine-tuned models\n")
    print(f"  shared start       held-out loss {loss(start, held_out):.4f}")
    for i, value in enumerate(losses):
        print(f"  ingredient {i}       held-out loss {value:.4f}")

    soup, lineage = terge.merge(ingredients, lineage=True)
    print(f"  uniform soup       held-out loss {loss(soup, held_out):.4f}")

    # Weight the better ingredients more: inverse loss, normalised per parameter by terge.
    weights = [1 / value for value in losses]
    weighted_soup = terge.merge(ingredients, weights=weights)
    print(f"  weighted soup      held-out loss {loss(weighted_soup, held_out):.4f}")

    # Keep the first ingredient's output layer, average the rest.
    partial, partial_lineage = terge.merge(ingredients, excluded="3.weight", lineage=True)
    print(f"  soup without head  held-out loss {loss(partial, held_out):.4f}\n")

    print("lineage of the uniform soup (parameter: method, [(model, weight), ...]):")
    for name, (method, contributions) in lineage.items():
        shares = ", ".join(f"({i}, {w:.4f})" for i, w in contributions)
        print(f"  {name:<10} {method}, [{shares}]")
    print("\nleft alone in the partial soup:", json.dumps(partial_lineage.skipped))


if __name__ == "__main__":
    main()
