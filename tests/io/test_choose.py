"""Choosing checkpoints from a run (terge.io.choose): the last N and the best N, from runs
written by Lightning and by the Hugging Face Trainer, and layouts built by hand."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import terge
from terge.audit import diff_lineages, summary
from terge.errors import CheckpointError
from terge.io.choose import choose, natural_key

from helpers import lightning_run, trainer_run


def small(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 2), float(seed)), "b": torch.full((2,), float(seed))}


# --- Lightning, written by Lightning ------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_folder(tmp_path_factory):
    pytest.importorskip("lightning", reason="Lightning checkpoints are written by Lightning")
    folder = tmp_path_factory.mktemp("lightning")
    lightning_run(folder, epochs=11, top_k=-1, save_last=True)
    return folder


def _val_loss(path: str) -> float:
    return float(path.rsplit("val_loss=", 1)[1].removesuffix(".ckpt"))


def test_last_n_of_a_lightning_run(lightning_folder):
    chosen = choose(lightning_folder, last=3)
    names = [os.path.basename(p) for p in chosen]
    assert names == [
        "epoch=10-step=11-val_loss=" + names[0].split("val_loss=")[1],
        *names[1:],
    ]
    assert [n.split("-")[0] for n in names] == ["epoch=10", "epoch=9", "epoch=8"]
    assert chosen.rule == "last 3 by global_step"
    assert [value for _, value in chosen.candidates] == list(range(1, 12))  # last.ckpt left out
    assert chosen.source == os.fspath(lightning_folder)


def test_best_n_of_a_lightning_run_from_its_model_checkpoint_state(lightning_folder):
    chosen = choose(f"{lightning_folder}/*.ckpt", best=3)  # the one monitor: val_loss, min
    files = list(lightning_folder.glob("epoch=*.ckpt"))
    expected = sorted(files, key=lambda p: _val_loss(os.fspath(p)))[:3]
    assert [os.path.basename(p) for p in chosen] == [p.name for p in expected]
    assert chosen.rule == "best 3 by val_loss (min, from ModelCheckpoint)"
    state = torch.load(lightning_folder / "last.ckpt", weights_only=True)["callbacks"]
    (record,) = [v for k, v in state.items() if k.startswith("ModelCheckpoint")]
    recorded = {os.path.basename(k): float(v) for k, v in record["best_k_models"].items()}
    assert {os.path.basename(p): v for p, v in chosen.candidates} == recorded
    assert set(chosen) != set(choose(lightning_folder, last=3))  # the run's loss went up and down
    maxed = choose(lightning_folder, best=1, metric="val_loss", mode="max")
    assert _val_loss(maxed[0]) == max(_val_loss(os.fspath(p)) for p in files)


def test_best_n_kept_by_save_top_k(tmp_path):
    """With save_top_k, Lightning deletes the others: the best of what is left, by its record."""
    pytest.importorskip("lightning", reason="Lightning checkpoints are written by Lightning")
    lightning_run(tmp_path, epochs=6, top_k=3, save_last=True)
    kept = sorted(tmp_path.glob("epoch=*.ckpt"))
    assert len(kept) == 3
    chosen = choose(tmp_path, best=2)
    assert [os.path.basename(p) for p in chosen] == [
        p.name for p in sorted(kept, key=lambda p: _val_loss(os.fspath(p)))[:2]
    ]


def test_merging_the_chosen_records_why(lightning_folder, tmp_path):
    chosen = choose(lightning_folder, last=3)
    merged, lineage = terge.merge(chosen, lineage=True)
    assert lineage.chosen == chosen.record()
    assert lineage.chosen["chosen"] == list(chosen)
    assert lineage.chosen["rule"] == "last 3 by global_step"
    assert [m.path.split("::")[0] for m in lineage.models] == list(chosen)
    states = [torch.load(p, weights_only=True)["state_dict"] for p in chosen]
    mean = sum(s["model.0.weight"].double() for s in states) / 3
    assert torch.equal(merged["0.weight"], mean.float())
    assert torch.equal(merged["1.num_batches_tracked"], states[0]["model.1.num_batches_tracked"])
    terge.save_lineage(lineage, tmp_path / "l.json")
    text = (tmp_path / "l.json").read_text()
    assert '"rule": "last 3 by global_step"' in text
    loaded = terge.load_lineage(tmp_path / "l.json")
    assert loaded == lineage and loaded.chosen == lineage.chosen
    assert "chosen: last 3 by global_step, of 11 candidates in" in summary(loaded)
    _, other = terge.merge(choose(lightning_folder, last=2), lineage=True)
    changes = diff_lineages(lineage, other).changes
    assert any(line.startswith("~ chosen: last 3 by global_step of ") for line in changes)
    _, plain = terge.merge(list(chosen), lineage=True)  # a plain list: nothing chosen
    assert plain.chosen is None and '"chosen"' not in json.dumps(
        terge.lineage.lineage_to_json(plain)
    )


# --- Hugging Face Trainer, written by the Trainer -------------------------------------------------


@pytest.fixture(scope="module")
def trainer_folder(tmp_path_factory):
    pytest.importorskip("accelerate", reason="the Trainer needs accelerate")
    pytest.importorskip("transformers", reason="Trainer checkpoints are written by the Trainer")
    folder = tmp_path_factory.mktemp("hf")
    trainer_run(folder, steps=6, save_steps=2)
    return folder


def test_last_n_of_a_trainer_run(trainer_folder):
    chosen = choose(f"{trainer_folder}/checkpoint-*", last=2)
    assert [os.path.basename(p) for p in chosen] == ["checkpoint-6", "checkpoint-4"]
    assert chosen.rule == "last 2 by global_step"
    assert choose(trainer_folder, last=2) == chosen  # the run's folder: its checkpoint-N/


def test_best_n_of_a_trainer_run(trainer_folder):
    state = json.loads((trainer_folder / "checkpoint-6" / "trainer_state.json").read_text())
    evals = {e["step"]: e["eval_loss"] for e in state["log_history"] if "eval_loss" in e}
    assert sorted(evals) == [2, 4, 6]
    for metric in ("loss", "eval_loss"):  # 'loss' means eval_loss, as for metric_for_best_model
        chosen = choose(trainer_folder, best=2, metric=metric)
        ranked = sorted(evals, key=evals.get)
        assert [os.path.basename(p) for p in chosen] == [f"checkpoint-{s}" for s in ranked[:2]]
        assert dict(chosen.candidates) == {
            os.fspath(trainer_folder / f"checkpoint-{s}"): evals[s] for s in evals
        }
        assert chosen.rule == f"best 2 by {metric} (min, from trainer_state.json)"
    with pytest.raises(
        CheckpointError,
        match=r"is a higher 'runtime' better or a lower one\? Pass mode='max' or mode='min'",
    ):
        choose(trainer_folder, best=2, metric="runtime")
    with pytest.raises(CheckpointError, match=r"checkpoint-2 records no value of 'bleu'"):
        choose(trainer_folder, best=2, metric="bleu", mode="max")


def test_trainer_checkpoints_read_as_their_model(trainer_folder):
    """A checkpoint-N folder is its model.safetensors: optimizer.pt, scheduler.pt, rng_state.pth
    and training_args.bin are left alone."""
    folder = trainer_folder / "checkpoint-6"
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"} <= {
        p.name for p in folder.iterdir()
    }
    with terge.open_checkpoint(folder) as reader:
        assert [p.name for p in reader.files] == ["model.safetensors"]
    chosen = choose(trainer_folder, last=3)
    merged = terge.merge(chosen)
    weights = [terge.load(p) for p in chosen]
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(merged[name], (sum(w[name].double() for w in weights) / 3).float())


# --- layouts built by hand ------------------------------------------------------------------------


def test_natural_order_of_names(tmp_path):
    for epoch in (1, 9, 10, 2):
        save_file(small(epoch), tmp_path / f"epoch={epoch}.safetensors")
    chosen = choose(tmp_path, last=2)
    assert [os.path.basename(p) for p in chosen] == ["epoch=10.safetensors", "epoch=9.safetensors"]
    assert chosen.rule == "last 2 by name (natural order)"
    assert [v for _, v in chosen.candidates] == [None] * 4
    assert sorted(["epoch=10", "epoch=9", "epoch=1"], key=natural_key) == [
        "epoch=1",
        "epoch=9",
        "epoch=10",
    ]
    assert len(choose(tmp_path, last=10)) == 4  # fewer than asked for: all of them


def test_generic_and_fairseq_records(tmp_path):
    """The trainer's record beats the name: `step`, then fairseq's num_updates."""
    for step, name in ((300, "a.pt"), (100, "b.pt"), (200, "c.pt")):
        torch.save({"model": small(step), "step": step, "epoch": 1}, tmp_path / name)
    chosen = choose(tmp_path, last=2)
    assert [os.path.basename(p) for p in chosen] == ["a.pt", "c.pt"]
    assert chosen.rule == "last 2 by step"
    fairseq = tmp_path / "fairseq"
    fairseq.mkdir()
    for updates, name in ((5000, "checkpoint_2_5000.pt"), (800, "checkpoint_1_800.pt")):
        torch.save(
            {
                "model": small(updates),
                "optimizer_history": [{"num_updates": updates}],
                "extra_state": {"val_loss": 1000 / updates},
            },
            fairseq / name,
        )
    assert choose(fairseq, last=1).rule == "last 1 by num_updates"
    assert os.path.basename(choose(fairseq, last=1)[0]) == "checkpoint_2_5000.pt"
    best = choose(fairseq, best=1, metric="val_loss")
    assert os.path.basename(best[0]) == "checkpoint_2_5000.pt"
    assert best.rule == "best 1 by val_loss (min, from checkpoint)"


def test_timm_metric(tmp_path):
    for epoch, metric in ((1, 70.0), (2, 75.5), (3, 72.0)):
        torch.save(
            {"epoch": epoch, "state_dict": small(epoch), "metric": metric},
            tmp_path / f"checkpoint-{epoch}.pth",
        )
    chosen = choose(tmp_path, best=2, metric="metric", mode="max")
    assert [os.path.basename(p) for p in chosen] == ["checkpoint-2.pth", "checkpoint-3.pth"]
    assert choose(tmp_path, last=1).rule == "last 1 by epoch"


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"choose\(\) takes one of last=N and best=N"),
        ({"last": 2, "best": 2}, r"choose\(\) takes one of last=N and best=N"),
        ({"last": 2, "metric": "x"}, r"metric= and mode= rank the best checkpoints; pass best=N"),
        ({"best": 2, "mode": "up"}, r"`mode` must be 'min' or 'max'; got 'up'"),
        ({"last": 0}, r"`last` must be a number of checkpoints \(an int >= 1\); got 0"),
        ({"best": True}, r"`best` must be a number of checkpoints"),
        ({"best": 1, "metric": ""}, r"`metric` must be a metric's name"),
    ],
)
def test_argument_errors(tmp_path, kwargs, message):
    save_file(small(1), tmp_path / "a1.safetensors")
    with pytest.raises(CheckpointError, match=message):
        choose(tmp_path, **kwargs)


def test_nothing_to_choose_from(tmp_path):
    with pytest.raises(CheckpointError, match=r"names no checkpoint: no file or folder matches"):
        choose(f"{tmp_path}/run-*", last=2)
    with pytest.raises(CheckpointError, match=r"does not exist; choose among existing paths"):
        choose([tmp_path / "nope.pt"], last=1)
    with pytest.raises(CheckpointError, match=r"choose\(\) takes a glob"):
        choose(3, last=1)  # type: ignore[arg-type]


def test_names_without_numbers_cannot_be_ordered(tmp_path):
    save_file(small(1), tmp_path / "ckpt1.safetensors")
    save_file(small(2), tmp_path / "final.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"cannot order 'final.safetensors': no trainer record of a step or epoch .* and "
        r"no number in the name; leave it out",
    ):
        choose(tmp_path, last=1)


def test_best_needs_a_metric(tmp_path):
    save_file(small(1), tmp_path / "ckpt1.safetensors")
    with pytest.raises(CheckpointError, match=r"best= needs the metric to rank by: pass metric="):
        choose(tmp_path, best=1)
    with pytest.raises(
        CheckpointError,
        match=r"ckpt1.safetensors records no value of 'val_loss' \(not in a ModelCheckpoint's "
        r"best_k_models, trainer_state.json's log_history at its step, its name as "
        r"val_loss=VALUE, nor its top-level numbers: none\)",
    ):
        choose(tmp_path, best=1, metric="val_loss")


def test_a_runs_folder_as_a_model_says_to_choose(tmp_path):
    for step in (1, 2):
        torch.save({"model": small(step), "step": step}, tmp_path / f"epoch={step}.ckpt")
    with pytest.raises(
        CheckpointError,
        match=r"holds no tensor files .* it holds epoch=1.ckpt, epoch=2.ckpt\); it is a run's "
        r"folder of checkpoints: merge some of them with terge.choose\(folder, last=N\)",
    ):
        terge.open_checkpoint(tmp_path)
    assert len(choose(tmp_path, last=2)) == 2


def test_a_plain_state_dict_has_no_record(tmp_path):
    """A state dict's own scalar tensors (a parameter named `step`) are no trainer record: the
    names order it."""
    for step, name in ((5, "m_2.pt"), (1, "m_10.pt")):
        torch.save({"w": torch.ones(2), "step": torch.tensor(step)}, tmp_path / name)
    chosen = choose(tmp_path, last=1)
    assert chosen.rule == "last 1 by name (natural order)"
    assert os.path.basename(chosen[0]) == "m_10.pt"
