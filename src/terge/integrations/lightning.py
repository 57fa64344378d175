"""A Lightning callback that keeps a :class:`terge.Average` of the ``LightningModule``.

::

    from terge.integrations.lightning import AverageCallback

    trainer = lightning.Trainer(callbacks=[AverageCallback(decay=0.999)])
    trainer.fit(module)                          # EMA after every optimizer step
    trainer.fit(module, ckpt_path="last.ckpt")   # resumes the average exactly

The average folds the module in after each optimizer step (gradient accumulation counts once);
validation runs with the averaged weights swapped in; the average is saved in the checkpoint's
callback state and restored from it; at the end of ``fit`` the averaged weights are copied into
the module (``copy_at_end=False`` leaves the trained weights). Importing this module imports
``lightning``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ..averaging import Average

__all__ = ["AverageCallback"]


class AverageCallback(Callback):
    """Keeps ``self.average``, a :class:`terge.Average` of the module being fitted.

    ``kind`` and ``settings`` go to :class:`terge.Average` (``decay``, ``warmup``, ``start_at``
    and ``every`` in optimizer steps, ``buffers``, ``shadow_dtype``, ``device``);
    ``evaluate_with_average`` swaps the averaged weights in for validation; ``copy_at_end``
    leaves them in the module when ``fit`` ends.
    """

    def __init__(
        self,
        kind: str = "ema",
        *,
        evaluate_with_average: bool = True,
        copy_at_end: bool = True,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.settings = settings
        self.evaluate_with_average = evaluate_with_average
        self.copy_at_end = copy_at_end
        self.average: Average | None = None
        self._last_step = -1
        self._restored: dict[str, Any] | None = None
        self._swap: contextlib.ExitStack | None = None

    @property
    def state_key(self) -> str:
        return f"terge.AverageCallback[{self.kind}]"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Make the average once the module is built (and, on resume, restore it)."""
        if stage == "fit" and self.average is None:
            self.average = Average(pl_module, self.kind, **self.settings)
            if self._restored is not None:
                self._load(self._restored)
                self._restored = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fold only once ``global_step`` moves past the step this fit starts at: with gradient
        accumulation the micro-batches before the first optimizer step (``global_step`` still 0,
        or the resumed step) must not fold the untrained (or already folded) weights in."""
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Fold the module in once per optimizer step (not per accumulated micro-batch)."""
        if self.average is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        self.average.update(pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate_with_average and self.average is not None and self.average.count:
            self._swap = contextlib.ExitStack()
            self._swap.enter_context(self.average.swapped_into(pl_module))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._swap is not None:
            self._swap.close()
            self._swap = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.copy_at_end and self.average is not None and self.average.count:
            self.average.copy_to(pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The callback's part of a Lightning checkpoint: the average and the last step."""
        if self.average is None:
            return {}
        return {"average": self.average.state_dict(), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the average from a checkpoint (kept until ``setup`` makes the average)."""
        if not state_dict:
            return
        if self.average is None:
            self._restored = state_dict
        else:
            self._load(state_dict)

    def _load(self, state: dict[str, Any]) -> None:
        assert self.average is not None
        with torch.no_grad():
            self.average.load_state_dict(state["average"])
        self._last_step = int(state["last_step"])
