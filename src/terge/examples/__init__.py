"""Runnable examples: ``python -m terge.examples.soup``."""
