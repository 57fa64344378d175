"""The one place terge's version is written; the build reads it (``pyproject.toml``: dynamic)."""

__version__ = "0.2.0.dev0"
