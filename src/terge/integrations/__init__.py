"""terge's running average (:class:`terge.Average`) as callbacks of training frameworks.

- :mod:`terge.integrations.lightning`: :class:`~terge.integrations.lightning.AverageCallback`
  for Lightning's ``Trainer.fit``;
- :mod:`terge.integrations.transformers`:
  :class:`~terge.integrations.transformers.AverageCallback` for Hugging Face's
  ``Trainer.train``.

Each module imports its framework when it is imported itself, never before: ``import terge``
needs neither.
"""
