"""The README's main job: the built-in soup example runs and reports a merge."""

from terge.examples import soup


def test_soup_example_prints_losses_and_lineage(capsys):
    soup.main(["--models", "2", "--steps", "20"])
    out = capsys.readouterr().out
    assert "a soup of 2 fine-tuned models" in out
    assert "uniform soup       held-out loss" in out
    assert "0.weight   arithmetic, [(0, 0.5000), (1, 0.5000)]" in out
    assert '{"3.weight": "excluded"}' in out
