"""terge.inspect: task-vector statistics against values computed directly, in closed form."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import terge
from terge import inspection
from terge.errors import MergeArgumentError
from terge.inspection import OTHER, block_of, inspect, tensor_kind


def _models(seed: int = 0, count: int = 3):
    """A base and ``count`` models with two blocks, an embedding, a norm and an int tensor."""
    generator = torch.Generator().manual_seed(seed)

    def model():
        return {
            "model.embed_tokens.weight": torch.randn(10, 4, generator=generator),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=generator),
            "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=generator),
            "model.layers.1.self_attn.q_proj.weight": torch.randn(4, 4, generator=generator),
            "model.layers.1.input_layernorm.weight": torch.randn(4, generator=generator),
            "model.norm.weight": torch.randn(4, generator=generator),
            "steps": torch.tensor([1, 2]),
        }

    return model(), [model() for _ in range(count)]


def _direct(base, models, names, density):
    """Norms, cosines, sign-conflict rates and TIES' kept shares computed the plain way."""
    taus = [
        torch.cat([(m[n].double() - base[n].double()).reshape(-1) for n in names]) for m in models
    ]
    per_tensor = [[(m[n].double() - base[n].double()).reshape(-1) for n in names] for m in models]
    numel = taus[0].numel()
    norms = [float(t.norm()) for t in taus]
    cos = {}
    conflicts = {}
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            cos[i, j] = float(taus[i] @ taus[j]) / (norms[i] * norms[j])
            conflicts[i, j] = (
                float(((taus[i] > 0) & (taus[j] < 0) | (taus[i] < 0) & (taus[j] > 0)).sum()) / numel
            )
    kept = [0] * len(models)
    for k, _ in enumerate(names):  # TIES per tensor: trim, elect, agree
        trimmed = []
        for i in range(len(models)):
            tau = per_tensor[i][k]
            keep = max(1, int(density * tau.numel()))
            threshold = (
                tau.abs().sort(descending=True).values[keep - 1] if keep < tau.numel() else 0
            )
            trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))
        elected = torch.sign(sum(trimmed))
        for i, t in enumerate(trimmed):
            kept[i] += int(((torch.sign(t) == elected) & (t != 0)).sum())
    return norms, cos, conflicts, [k / numel for k in kept]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_statistics_match_values_computed_directly(density):
    base, models = _models()
    report = inspect(models, base=base, density=density)
    floating = [n for n in base if n != "steps"]
    assert list(report.tensors) == floating
    assert report.left_out == {"steps": "not floating point"}
    for group, names in [("all", floating), (0, [n for n in floating if ".layers.0." in n])]:
        sums = report.total() if group == "all" else report.groups("block")[group]
        norms, cos, conflicts, kept = _direct(base, models, names, density)
        assert sums.norms() == pytest.approx(norms, rel=1e-12)
        for (i, j), value in cos.items():
            assert sums.cosine(i, j) == pytest.approx(value, rel=1e-12)
            assert sums.conflict_rate(i, j) == conflicts[i, j]
        assert [sums.ties_share(i) for i in range(3)] == pytest.approx(kept, abs=0)


def test_closed_form_on_hand_made_task_vectors():
    base = {"layers.0.mlp.weight": torch.zeros(4)}
    a = {"layers.0.mlp.weight": torch.tensor([1.0, 2.0, -3.0, 0.0])}
    b = {"layers.0.mlp.weight": torch.tensor([-1.0, 2.0, 3.0, 4.0])}
    report = inspect([a, b], base=base, density=0.5)
    sums = report.total()
    assert sums.norms() == [math.sqrt(14), math.sqrt(30)]
    assert sums.cosine(0, 1) == (-1 + 4 - 9) / math.sqrt(14 * 30)
    assert sums.conflict_rate(0, 1) == 2 / 4  # entries 0 and 2 disagree; entry 3 is a zero
    # density 0.5 keeps 2 per model: a keeps {2, -3}, b keeps {3, 4}; the elected signs
    # (sum of kept) are [0, +, 0, +]: a's 2 agrees, b's 4 agrees
    assert [sums.ties_share(i) for i in range(2)] == [1 / 4, 1 / 4]
    record = report.to_json()
    assert record["total"]["dare_kept"] == 0.5
    assert record["total"]["dare_rescale"] == 2.0
    assert record["pairs"] == ["0-1"]


def test_a_zero_task_vector_has_no_cosine():
    base = {"w": torch.ones(3)}
    report = inspect([{"w": torch.ones(3)}, {"w": torch.zeros(3)}], base=base)
    assert report.total().cosine(0, 1) is None
    assert report.to_json()["total"]["cosine"] == {"0-1": None}


def test_chunks_do_not_change_the_numbers(monkeypatch):
    base, models = _models(seed=3)
    whole = inspect(models, base=base, density=0.3).to_json()
    monkeypatch.setattr(inspection, "CHUNK", 5)  # many chunks per tensor, ragged last one
    chunked = inspect(models, base=base, density=0.3).to_json()
    assert chunked["blocks"].keys() == whole["blocks"].keys()
    for block, stats in whole["blocks"].items():
        assert chunked["blocks"][block]["norms"] == pytest.approx(stats["norms"], rel=1e-12)
        assert chunked["blocks"][block]["sign_conflicts"] == stats["sign_conflicts"]
        assert chunked["blocks"][block]["ties_kept"] == stats["ties_kept"]


def _saved(folder, states) -> list:
    """Each state dict saved as its own safetensors file; their paths."""
    paths = [folder / f"m{i}.safetensors" for i in range(len(states))]
    for state, path in zip(states, paths, strict=True):
        save_file(state, path)
    return paths


def test_one_tensor_at_a_time_from_files(tmp_path, monkeypatch):
    base, models = _models(seed=1)
    paths = _saved(tmp_path, [base, *models])
    in_memory = inspect(models, base=base).to_json()
    measured = []
    original = inspection.measure

    def spy(base_tensor, tensors, density):
        measured.append(base_tensor.numel())
        return original(base_tensor, tensors, density)

    monkeypatch.setattr(inspection, "measure", spy)
    from_files = terge.inspect([str(p) for p in paths], base=0)  # base by index: not measured
    assert from_files.models == [str(p) for p in paths[1:]]
    assert len(measured) == 6  # one call per tensor, each handed one tensor per model
    assert from_files.to_json()["blocks"] == in_memory["blocks"]


def test_groups_by_block_and_kind():
    base, models = _models()
    report = inspect(models, base=base)
    assert list(report.groups("block")) == [0, 1, OTHER]
    assert list(report.groups("kind")) == ["attn.q", "embed", "mlp", "norm"]
    assert report.groups("block")[1].tensors == 2
    labels, rows = report.matrix("cosine")
    assert labels == [0, 1, OTHER] and [len(r) for r in rows] == [3, 3, 3]
    table = report.table()
    assert "cos01" in table and "conf12" in table and "ties2" in table
    with pytest.raises(MergeArgumentError, match="`by` must be 'block' or 'kind'"):
        report.groups("layer")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.3.self_attn.q_proj.weight", "attn.q"),
        ("model.layers.3.self_attn.k_proj.bias", "attn.k"),
        ("model.layers.3.self_attn.v_proj.weight", "attn.v"),
        ("model.layers.3.self_attn.o_proj.weight", "attn.o"),
        ("transformer.h.0.attn.c_attn.weight", "attn.qkv"),
        ("bert.encoder.layer.0.attention.output.dense.weight", "attn.o"),
        ("bert.encoder.layer.0.intermediate.dense.weight", "other"),
        ("model.layers.3.mlp.gate_proj.weight", "mlp"),
        ("transformer.h.0.mlp.c_proj.weight", "mlp"),
        ("model.layers.3.post_attention_layernorm.weight", "norm"),
        ("transformer.h.0.ln_1.bias", "norm"),
        ("model.embed_tokens.weight", "embed"),
        ("lm_head.weight", "head"),
    ],
)
def test_tensor_kinds(name, kind):
    assert tensor_kind(name) == kind


def test_blocks():
    assert block_of("model.layers.12.mlp.up_proj.weight") == 12
    assert block_of("lm_head.weight") == OTHER


def test_bad_arguments():
    base, models = _models()
    with pytest.raises(MergeArgumentError, match=r"`density` must be a number in \(0, 1\]"):
        inspect(models, base=base, density=0)
    with pytest.raises(MergeArgumentError, match="at least one model besides the base"):
        inspect([base], base=0)
    with pytest.raises(MergeArgumentError, match="`base` is 5"):
        inspect(models, base=5)
    with pytest.raises(MergeArgumentError, match="non-empty list"):
        inspect(base)


def test_tensors_the_base_lacks_are_left_out_with_why():
    base, models = _models()
    models[1]["extra.weight"] = torch.ones(2)
    models[2]["extra.weight"] = torch.ones(2)
    models[2]["skipped.weight"] = torch.ones(2)
    report = inspect(models, base=base, excluded="skipped.weight")
    assert report.left_out == {
        "steps": "not floating point",
        "extra.weight": "the base lacks it (model 1 has it)",
    }
    assert "extra.weight" not in report.tensors
    assert "  extra.weight: the base lacks it (model 1 has it)\n" in report.table()


@pytest.mark.parametrize("where", ["model", "base"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_task_vector_with_nan_or_inf_is_left_out_not_measured(where, bad):
    base, models = _models()
    name = "model.layers.0.mlp.up_proj.weight"
    clean = inspect(models, base=base)
    (models[1] if where == "model" else base)[name][2, :2] = bad
    report = inspect(models, base=base)
    first = 1 if where == "model" else 0  # a bad base spoils every model's task vector
    assert report.left_out[name] == f"model {first}'s task vector has 2 NaN or infinite entries"
    assert name not in report.tensors
    assert report.to_json()["blocks"]["1"] == clean.to_json()["blocks"]["1"]  # others untouched
    assert all(math.isfinite(v) for v in report.total().norms())
    json.dumps(report.to_json(), allow_nan=False)  # what `terge inspect --format json` writes
    assert f"  {name}: model {first}'s task vector has 2 NaN" in report.table()


def test_sums_that_overflow_are_null_in_json_not_nan():
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    huge = {"w": torch.full((2,), 1e200, dtype=torch.float64)}
    report = inspect([huge, {"w": torch.ones(2, dtype=torch.float64)}], base=base)
    total = report.to_json()["total"]
    assert total["norms"] == [None, math.sqrt(2)]
    assert total["cosine"] == {"0-1": None}
    json.dumps(report.to_json(), allow_nan=False)


def test_the_table_names_the_first_tensors_left_out(monkeypatch):
    base, models = _models()
    for m in models:
        m["extra.weight"] = torch.ones(2)
    monkeypatch.setattr(inspection, "LISTED", 1)
    table = inspect(models, base=base).table()
    assert "left out: 2 tensors\n  steps: not floating point\n" in table
    assert "  ... and 1 more (--format json lists all)\n" in table
    assert "extra.weight" not in table


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.0.feed_forward.w9.weight", "mlp"),  # by the module above the last
        ("encoder.layer.1.ffn.lin9.weight", "mlp"),
        ("model.layers.0.experts.proj.weight", "other"),
    ],
)
def test_tensor_kinds_from_the_modules_above(name, kind):
    assert tensor_kind(name) == kind


def test_empty_sums_and_undefined_cosines_in_the_heatmap():
    empty = inspection.Sums(2)
    assert (empty.conflict_rate(0, 1), empty.ties_share(0)) == (0.0, 0.0)
    report = inspect([{"w": torch.ones(3)}, {"w": torch.zeros(3)}], base={"w": torch.ones(3)})
    labels, rows = report.matrix("cosine")
    assert labels == [OTHER] and math.isnan(rows[0][0])  # a zero task vector: no cosine
    with pytest.raises(MergeArgumentError, match="`metric` must be 'cosine' or 'conflicts'"):
        report.matrix("cos")


def test_blocks_are_listed_by_number_then_other():
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(2) for i in range(12)}
    base["lm_head.weight"] = torch.zeros(2)
    models = [{n: torch.ones(2) for n in base}, {n: -torch.ones(2) for n in base}]
    report = inspect(models, base=base)
    assert list(report.groups("block")) == [*range(12), OTHER]  # 2 before 10
    assert list(report.to_json()["blocks"]) == [*map(str, range(12)), OTHER]


def test_the_json_lists_what_was_left_out():
    base, models = _models()
    assert inspect(models, base=base).to_json()["left_out"] == {"steps": "not floating point"}


def test_a_model_of_another_shape_is_named():
    base, models = _models()
    models[1]["model.norm.weight"] = torch.zeros(5)
    assert inspect(models, base=base).left_out["model.norm.weight"] == "model 1 has shape (5,)"


@pytest.mark.parametrize("density", [True, "0.5", None])
def test_density_must_be_a_number(density):
    base, models = _models()
    with pytest.raises(MergeArgumentError, match=r"`density` must be a number in \(0, 1\]"):
        inspect(models, base=base, density=density)


def test_a_base_by_negative_index_and_not_by_bool():
    base, models = _models()
    by_index = inspect([*models, base], base=-1)
    assert by_index.to_json()["blocks"] == inspect(models, base=base).to_json()["blocks"]
    with pytest.raises(MergeArgumentError, match="the base is a bool"):
        inspect(models, base=True)


def test_checkpoint_files_are_closed_after_inspecting(tmp_path, monkeypatch):
    from terge.sources import FileSource

    base, models = _models(seed=2)
    paths = _saved(tmp_path, [base, *models])
    closed = []
    original = FileSource.close
    monkeypatch.setattr(FileSource, "close", lambda self: closed.append(self) or original(self))
    inspect([str(p) for p in paths], base=0)
    assert len(closed) == 4


def test_a_model_holding_integers_where_the_base_has_floats_is_named():
    base, models = _models()
    models[0]["model.norm.weight"] = torch.zeros(4, dtype=torch.int64)
    assert inspect(models, base=base).left_out["model.norm.weight"] == (
        "model 0's is not floating point"
    )


def test_the_table_lists_exactly_listed_names_without_a_more_line(monkeypatch):
    base, models = _models()
    for m in models:
        m["extra.weight"] = torch.ones(2)
    monkeypatch.setattr(inspection, "LISTED", 2)
    table = inspect(models, base=base).table()
    assert "  extra.weight: the base lacks it (model 0 has it)\n" in table
    assert "more (--format json lists all)" not in table


def test_sums_keep_and_add_their_non_finite_counts():
    sums = inspection.Sums(2, non_finite=[1, 0])
    assert sums.non_finite == [1, 0]
    sums.add(inspection.Sums(2, non_finite=[2, 3]))
    assert sums.non_finite == [3, 3]
