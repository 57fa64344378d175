"""README.md stays true to the code: its method table is the registry's."""

from pathlib import Path

import terge

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_method_table_in_readme_is_generated_from_the_registry():
    assert terge.methods.readme_table().strip() in README


def test_readme_names_both_commands():
    assert "python -m terge.examples.soup" in README
    assert 'pip install -e ".[test]" && python -m pytest -q' in README


def test_ci_runs_exactly_the_readme_test_command():
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text(encoding="utf-8")
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert command in README and command in ci
