"""Writing a PEFT LoRA adapter folder atomically: ``adapter_model.safetensors`` and
``adapter_config.json``, as ``PeftModel.save_pretrained`` writes them (``terge.io.adapters``
reads them).

The factors of a LoRA adapter are small (``r * (in + out)`` numbers per module), so they are
buffered and written as one file when the folder is committed, which is what PEFT loads (it reads
no sharded adapters). The commit, the refusal of an existing output or of one inside an input, and
the cleanup after a failure or a kill are :class:`terge.io.ShardedWriter`'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .adapters import CONFIG_NAME, PREFIX, WEIGHT_NAMES
from .reading import PathLike
from .writing import ShardedWriter

ADAPTER_WEIGHTS = WEIGHT_NAMES[0]
ADAPTER_CONFIG = CONFIG_NAME
PEFT_PREFIX = PREFIX
"""What ``PeftModel`` puts before a module's name in an adapter's tensor names."""


def lora_names(module: str, embedding: bool) -> tuple[str, str]:
    """The names PEFT gives the ``A`` and ``B`` factors of ``module`` in an adapter file."""
    if embedding:
        return (
            f"{PEFT_PREFIX}{module}.lora_embedding_A",
            f"{PEFT_PREFIX}{module}.lora_embedding_B",
        )
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def lora_bias_name(module: str) -> str:
    """The name of ``lora_B``'s bias (PEFT's ``lora_bias=True``): a module's bias difference."""
    return f"{PEFT_PREFIX}{module}.lora_B.bias"


def saved_name(tensor: str) -> str:
    """The name of a tensor of a module in ``modules_to_save`` in an adapter file."""
    return f"{PEFT_PREFIX}{tensor}"


def adapter_config(
    *,
    ranks: Mapping[str, int],
    fan_in_fan_out: bool,
    modules_to_save: Sequence[str],
    lora_bias: bool,
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> dict[str, Any]:
    """A LoRA ``adapter_config.json`` whose scaling is 1 for every module (``lora_alpha == r``).

    ``r`` is the most common rank (the smallest among ties); every module of another rank is in
    ``rank_pattern`` and ``alpha_pattern`` under its full name, escaped (PEFT matches those keys
    as regular expressions against the end of a module's name).
    """
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    r = min(counts, key=lambda rank: (-counts[rank], rank)) if counts else 8
    pattern = {re.escape(m): rank for m, rank in sorted(ranks.items()) if rank != r}
    return {
        "alpha_pattern": dict(pattern),
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": r,
        "lora_bias": lora_bias,
        "lora_dropout": 0.0,
        "modules_to_save": sorted(modules_to_save) or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": pattern,
        "target_modules": sorted(ranks),
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": False,
    }


class AdapterWriter(ShardedWriter):
    """A :class:`ShardedWriter` that writes ``adapter_model.safetensors`` (one file, whatever
    its size) instead of ``model*.safetensors``, plus ``adapter_config.json``.

    ::

        with AdapterWriter("adapter", inputs=[base_path]) as writer:
            writer.add("base_model.model.fc.lora_A.weight", A)
            writer.write_config(config)
    """

    def __init__(
        self,
        path: PathLike,
        *,
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
        inputs: Iterable[PathLike] = (),
    ) -> None:
        # never flushed part-way: every factor is kept until the commit writes the one file
        super().__init__(
            path, max_shard_size=2**62, overwrite=overwrite, metadata=metadata, inputs=inputs
        )

    def __enter__(self) -> AdapterWriter:
        super().__enter__()
        return self

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write ``adapter_config.json`` into the output (it appears with the weights)."""
        self.write_text(ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _finish_weights(self, tmp: Path) -> list[str]:
        save_file(self._buffer, tmp / ADAPTER_WEIGHTS, metadata=self.metadata)
        self._buffer = {}
        return [ADAPTER_WEIGHTS]
