"""merge()'s types as a type checker sees them, checked by mypy with src/ (pyproject's
``[tool.mypy] files``), never run: each ``assert_type`` must hold, and each call marked
``# type: ignore[...]`` must be refused (``warn_unused_ignores`` fails the check if one is
accepted)."""

import re
from pathlib import Path
from typing import Any

import regex
import torch
from typing_extensions import assert_type

import terge
from terge.types import Methods, Model, Patterns, Weights

models: list[Model] = [torch.nn.Linear(2, 2), {"w": torch.zeros(2)}, "a.safetensors", Path("b")]

# --- what each call returns ---
assert_type(terge.merge(models), Any)
assert_type(terge.merge(models, lineage=False), Any)
assert_type(terge.merge(models, lineage=True), tuple[Any, terge.Lineage])
assert_type(terge.merge(models, dry_run=True), terge.Lineage)
assert_type(terge.merge(models, lineage=True, dry_run=True), terge.Lineage)
assert_type(
    terge.merge(models, 0, "ties", [1, 2], None, None, False, torch.float64, True),
    tuple[Any, terge.Lineage],
)
flag = bool(len(models))
assert_type(terge.merge(models, lineage=flag), Any | tuple[Any, terge.Lineage] | terge.Lineage)

# --- what each argument takes ---
terge.merge(models, method=terge.methods.ties(density=0.3))
terge.merge(models, method={"w": "arithmetic", re.compile("b"): terge.methods.slerp()})
terge.merge(models, method=lambda tensors, weights, base: tensors[0])
terge.merge(models, weights=[1, 2.5, terge.by_layer([0, 1]), 3])
terge.merge(models, weights={regex.compile("mlp"): [1, 2, 3, 4]})
terge.merge(models, weights=torch.ones(4))
terge.merge(models, included="w", excluded=[re.compile("b"), regex.compile("c"), "d"])
terge.merge(torch.nn.ModuleList([torch.nn.Linear(2, 2)]), base=torch.nn.Linear(2, 2))
names: dict[str, list[float]] = {"w": [1.0, 2.0]}
terge.merge(models, weights=names)
method: Methods = "arithmetic"
weights: Weights = [1, 1]
patterns: Patterns = ["a", re.compile("b")]
terge.merge(
    [terge.checkpoint("a.ckpt", entry="state_dict"), "b.ckpt"], base=terge.checkpoint("c.pt")
)
terge.merge(terge.choose("runs/checkpoint-*", last=5), out="avg")
terge.merge([terge.adapter("lora-a", base=torch.nn.Linear(2, 2)), "lora-b"], base="base")
terge.merge(["lora-a"], base=terge.adapter("lora-b", base={"w": torch.zeros(2)}))

# --- what they refuse ---
terge.merge(models, method=3)  # type: ignore[call-overload]
terge.merge(models, weights="1,2")  # type: ignore[arg-type]
terge.merge(models, weights=[[1, 2]])  # type: ignore[list-item]
terge.merge(models, method=lambda tensors: tensors[0])  # type: ignore[arg-type]
terge.merge(models, out=3)  # type: ignore[call-overload]
terge.merge(models, nonsense=True)  # type: ignore[call-overload]
terge.merge(models, 0, "ties", None, None, None, False, torch.float64, True, False, True)  # type: ignore[call-overload]
terge.merge(models[0])  # type: ignore[arg-type]

# --- LoRA out ---
assert_type(terge.merge(models, out="o", out_format="lora", lora_rank=8), Any)
assert_type(terge.merge(models, out="o", out_format="lora", lora_rank={re.compile("."): 8}), Any)
assert_type(terge.merge(models, out="o", out_format="lora", lora_energy=0.9), Any)
assert_type(terge.extract_lora(models[0], models[1], "o", rank=8), terge.LoraAdapter)
assert_type(terge.extract_lora("a", "b", Path("o"), energy=0.9).max_error, float)
terge.merge(models, out="o", out_format="lora", lora_rank="8")  # type: ignore[call-overload]
terge.extract_lora("a", "b", "o", rank="8")  # type: ignore[arg-type]
