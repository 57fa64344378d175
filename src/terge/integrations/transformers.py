"""A Hugging Face ``TrainerCallback`` that keeps a :class:`terge.Average` of the model.

::

    from terge.integrations.transformers import AverageCallback

    trainer = transformers.Trainer(model, args, train_dataset=data,
                                   callbacks=[AverageCallback(decay=0.999)])
    trainer.train()                                   # EMA after every optimizer step
    trainer.train(resume_from_checkpoint=True)        # resumes the average exactly

The average folds the model in after each optimizer step (``on_step_end``, after gradient
accumulation); each ``checkpoint-N/`` folder gets the average's state beside the weights
(``terge_average.pt``, written by the main process), and a resumed run reads it back from the
checkpoint it resumes from; when training ends the averaged weights are copied into the model
(``copy_at_end=False`` leaves the trained ones), so ``trainer.save_model()`` saves the average.
Importing this module imports ``transformers``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..averaging import Average
from ..errors import AveragingError

__all__ = ["FILENAME", "AverageCallback"]

FILENAME = "terge_average.pt"
"""The average's file in each ``checkpoint-N/`` folder."""

_CHECKPOINT_PREFIX = "checkpoint"
"""transformers' ``PREFIX_CHECKPOINT_DIR``: checkpoints are ``<output_dir>/checkpoint-<step>``."""


class AverageCallback(TrainerCallback):
    """Keeps ``self.average``, a :class:`terge.Average` of the model being trained.

    ``kind`` and ``settings`` go to :class:`terge.Average` (``decay``, ``warmup``, ``start_at``
    and ``every`` in optimizer steps, ``buffers``, ``shadow_dtype``, ``device``).
    """

    def __init__(self, kind: str = "ema", *, copy_at_end: bool = True, **settings: Any) -> None:
        self.kind = kind
        self.settings = settings
        self.copy_at_end = copy_at_end
        self.average: Average | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Make the average; when the run resumes (``state.global_step > 0``), restore it from
        the checkpoint being resumed."""
        if model is None:
            raise AveragingError("the Trainer passed no model to AverageCallback.on_train_begin.")
        self.average = Average(model, self.kind, **self.settings)
        if state.global_step > 0:
            folder = Path(args.output_dir or ".") / f"{_CHECKPOINT_PREFIX}-{state.global_step}"
            path = folder / FILENAME
            if path.is_file():
                self.average.load_state_dict(torch.load(path, weights_only=True))
            else:
                warnings.warn(
                    f"resuming at step {state.global_step}, but {path} does not exist (the run "
                    "was saved without AverageCallback?): the average starts afresh from the "
                    "resumed weights.",
                    stacklevel=2,
                )

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        """Fold the model in after an optimizer step."""
        if self.average is not None and model is not None:
            self.average.update(model)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write the average's state into the checkpoint folder just saved."""
        if self.average is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir or ".") / f"{_CHECKPOINT_PREFIX}-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{FILENAME}.{os.getpid()}"
        torch.save(self.average.state_dict(), temporary)
        os.replace(temporary, folder / FILENAME)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        average = self.average
        if self.copy_at_end and average is not None and average.count and model is not None:
            average.copy_to(model)
