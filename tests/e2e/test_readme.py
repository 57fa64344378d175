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


def _quickstart() -> str:
    """The Quickstart's code block, as a reader would paste it."""
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_quickstart_runs_when_pasted(capsys):
    """Every name the Quickstart uses is defined in it, and what it prints is what its comments
    say."""
    exec(compile(_quickstart(), "README.md#quickstart", "exec"), {"__name__": "quickstart"})
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "LineageEntry('ties', [(1, 0.5), (2, 0.5)], settings={'density': 0.3, 'scale': 1.0})",
        "{'density': 0.3, 'scale': 1.0}",
        "{'embed.weight': 'shape mismatch'}",
    ]


def test_the_development_section_names_a_measured_suite_time():
    development = README.split("## Development", 1)[1]
    assert "TESTTIME" not in development  # the placeholder is replaced by a measured figure
