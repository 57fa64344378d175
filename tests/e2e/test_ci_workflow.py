"""README's GitHub Actions workflow, run here as far as a local run can: every `run:` command
of it through the `terge` CLI on tiny models, with the exit codes CI would see."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from terge import cli
from terge.io import save

pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
HEADING = "#### CI gates"


def section() -> str:
    """README's CI gates section (up to the next heading of its level or higher)."""
    start = README.find(HEADING)
    if start < 0:
        pytest.skip("README has no 'CI gates' section yet")
    end = re.search(r"\n#{2,4} ", README[start + len(HEADING) :])  # "# " is a comment in a block
    return README[start : start + len(HEADING) + (end.start() if end else len(README))]


def block(language: str) -> str:
    found = re.findall(rf"```{language}\n(.*?)```", section(), flags=re.S)
    assert len(found) == 1, f"the CI gates section must hold one {language} block"
    return found[0]


def run_commands() -> list[str]:
    """The workflow's `run:` commands, in order."""
    return [m.strip() for m in re.findall(r"^\s*(?:- )?run: (.+)$", block("yaml"), flags=re.M)]


def run(capsys, command: str, folder: Path) -> int:
    """One `run:` line: `terge ...` through the CLI, stdout into `> FILE` when redirected."""
    words = shlex.split(command)
    target = None
    if ">" in words:
        at = words.index(">")
        words, target = words[:at], words[at + 1]
    assert words[0] == "terge", command
    code = cli.main(words[1:])
    out = capsys.readouterr().out
    if target is not None:
        (folder / target).write_text(out, encoding="utf-8")
    return code


def checkpoint(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(16, 8, generator=generator)}
    for i in range(2):
        for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"):
            state[f"model.layers.{i}.{part}.weight"] = torch.randn(8, 8, generator=generator)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(8, generator=generator)
    state["lm_head.weight"] = torch.randn(16, 8, generator=generator)
    return state


@pytest.fixture
def repository(tmp_path, monkeypatch) -> Path:
    """A repository as the workflow checks it out: three models, the policy, a golden lineage
    (the lineage of a reviewed merge of the same inputs)."""
    monkeypatch.chdir(tmp_path)
    for seed, name in enumerate(["base", "math", "code"]):
        save(checkpoint(seed), tmp_path / name)
    (tmp_path / "merge-policy.toml").write_text(block("toml"), encoding="utf-8")
    merge = next(c for c in run_commands() if c.startswith("terge merge "))
    assert cli.main(shlex.split(merge.replace("new.json", "golden.json"))[1:]) == 0
    shutil.rmtree(tmp_path / "merged")
    return tmp_path


def cases(path: Path) -> dict[str, list[str]]:
    """Each test case of a JUnit file, with its failures' texts."""
    suite = ET.parse(path).getroot()[0]
    return {case.get("name"): [f.text for f in case.findall("failure")] for case in suite}


def test_the_workflow_passes_on_the_reviewed_inputs(capsys, repository):
    commands = run_commands()
    assert [c.split()[:3] for c in commands] == [
        ["pip", "install", "terge"],
        ["terge", "merge", "base"],
        ["terge", "lineage", "check"],
        ["terge", "lineage", "diff"],
        ["terge", "lineage", "verify"],
    ]
    for command in commands[1:]:
        assert run(capsys, command, repository) == 0, command
    for report in ("check.xml", "diff.xml", "verify.xml"):
        found = cases(repository / report)
        assert "model.layers.1.mlp.up_proj.weight" in found  # every tensor a test case
        assert not any(found.values()), (report, found)


def test_a_changed_input_fails_diff_naming_the_file(capsys, repository):
    changed = checkpoint(1)
    changed["model.layers.0.mlp.up_proj.weight"][0, 0] += 1
    save(changed, repository / "math", overwrite=True)
    codes = [run(capsys, command, repository) for command in run_commands()[1:]]
    assert codes == [0, 0, 1, 0]  # merge, check, diff, verify
    found = cases(repository / "diff.xml")
    assert any("~ models[1]: file model.safetensors changed" in f for f in found["(lineage)"])
    assert found["model.layers.0.mlp.up_proj.weight"]
    assert not found["model.layers.1.mlp.up_proj.weight"]


def test_a_broken_policy_fails_check_naming_each_violation(capsys, repository):
    policy = repository / "merge-policy.toml"
    policy.write_text(policy.read_text().replace("density = [0.2, 0.5]", "density = [0.5, 0.9]"))
    codes = [run(capsys, command, repository) for command in run_commands()[1:]]
    assert codes == [0, 1, 0, 0]
    found = cases(repository / "check.xml")
    failing = sorted(name for name, failures in found.items() if failures)
    assert len(failing) == 12  # every tensor, merged by ties at density 0.3
    assert found[failing[0]] == ["[range] the setting density is 0.3, outside [0.5, 0.9]"]
