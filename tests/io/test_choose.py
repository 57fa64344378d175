"""Choosing checkpoints from a run (terge.io.choose): the last N and the best N, from runs
written by Lightning and by the Hugging Face Trainer, and layouts built by hand."""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle

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
    assert repr(chosen) == (f"Chosen({list(chosen)!r}, rule='last 2 by name (natural order)')")
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
        ({"last": 2, "mode": "min"}, r"metric= and mode= rank the best checkpoints; pass best=N"),
        ({"best": 2, "mode": "up"}, r"`mode` must be 'min' or 'max'; got 'up'"),
        ({"last": 0}, r"`last` must be a number of checkpoints \(an int >= 1\); got 0"),
        ({"best": True}, r"`best` must be a number of checkpoints"),
        ({"last": 2.0}, r"`last` must be a number of checkpoints \(an int >= 1\); got 2.0"),
        ({"best": 1, "metric": ""}, r"`metric` must be a metric's name"),
        ({"best": 1, "metric": 3}, r"`metric` must be a metric's name such as 'val_loss'; got 3"),
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
    with pytest.raises(CheckpointError, match=r"a folder or a list of paths; got bytes"):
        choose(os.fsencode(tmp_path), last=1)  # type: ignore[arg-type]


def test_names_without_numbers_cannot_be_ordered(tmp_path):
    save_file(small(1), tmp_path / "ckpt1.safetensors")
    save_file(small(2), tmp_path / "final.safetensors")
    save_file(small(3), tmp_path / "best.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"cannot order 'best.safetensors', 'final.safetensors': no trainer record of a step or epoch .* and "
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


# --- candidates, records and values built by hand -------------------------------------------------


def saved(path, step: int, **entries) -> None:
    torch.save({"model": small(step), "step": step, **entries}, path)


def trainer_checkpoint(run, step: int, log: list[dict], **state) -> None:
    """A Trainer's checkpoint-N/ as choose() reads it: its trainer_state.json."""
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    record = {"global_step": step, "log_history": log, **state}
    (folder / "trainer_state.json").write_text(json.dumps(record))


def names(chosen) -> list[str]:
    return [os.path.basename(p) for p in chosen]


def test_a_runs_files_are_its_checkpoints_alone(tmp_path):
    """Every checkpoint suffix (.bin included) counts; a trainer's optimizer.pt, Lightning's
    last.ckpt and last-v1.ckpt copies and other files do not, in a folder or a glob."""
    saved(tmp_path / "step_1.bin", 1)
    saved(tmp_path / "step_2.pt", 2)
    saved(tmp_path / "last.ckpt", 2)
    saved(tmp_path / "last-v1.ckpt", 2)
    torch.save({"state": {}, "param_groups": []}, tmp_path / "optimizer.pt")
    (tmp_path / "notes.txt").write_text("lr 1e-3")
    for source in (tmp_path, f"{tmp_path}/*"):
        chosen = choose(source, last=5)
        assert names(chosen) == ["step_2.pt", "step_1.bin"]
        assert [value for _, value in chosen.candidates] == [1, 2]


def test_a_lone_last_ckpt_is_kept_and_a_file_is_its_own_candidate(tmp_path):
    """last.ckpt is left out only where other candidates remain; a path to a file is that file,
    even with glob characters in its name."""
    saved(tmp_path / "last.ckpt", 7)
    assert names(choose(tmp_path, last=1)) == ["last.ckpt"]
    saved(tmp_path / "epoch[3].pt", 3)
    assert list(choose(tmp_path / "epoch[3].pt", last=1)) == [os.fspath(tmp_path / "epoch[3].pt")]


def test_a_file_named_twice_counts_once_as_first_named(tmp_path):
    """A link to a candidate is that candidate: counted once, under the path given first."""
    saved(tmp_path / "a1.pt", 1)
    saved(tmp_path / "a2.pt", 2)
    (tmp_path / "link.pt").symlink_to(tmp_path / "a2.pt")
    chosen = choose([tmp_path / "a2.pt", tmp_path / "link.pt", tmp_path / "a1.pt"], last=5)
    assert list(chosen) == [os.fspath(tmp_path / "a2.pt"), os.fspath(tmp_path / "a1.pt")]
    assert len(chosen.candidates) == 2


def test_a_trainer_output_folder_is_its_checkpoint_folders(tmp_path):
    """The Trainer's output folder also holds the final model.safetensors and may hold other
    folders: its candidates are its checkpoint-N/ folders alone."""
    for step in (2, 4):
        trainer_checkpoint(tmp_path, step, [])
    save_file(small(9), tmp_path / "model.safetensors")
    (tmp_path / "checkpoint-4.bak").mkdir()
    chosen = choose(tmp_path, last=5)
    assert names(chosen) == ["checkpoint-4", "checkpoint-2"]
    assert chosen.rule == "last 5 by global_step"


def test_a_trainer_state_without_global_step_orders_by_its_epoch(tmp_path):
    """A trainer_state.json without global_step still records its epoch: that orders."""
    for step, epoch in ((2, 2.0), (10, 1.0)):
        trainer_checkpoint(tmp_path, step, [])
        state = tmp_path / f"checkpoint-{step}" / "trainer_state.json"
        state.write_text(json.dumps({"epoch": epoch, "log_history": []}))
    chosen = choose(tmp_path, last=1)
    assert (chosen.rule, names(chosen)) == ("last 1 by epoch", ["checkpoint-2"])


def test_the_evaluation_must_be_at_the_checkpoints_step(tmp_path):
    """Evaluated every 3 steps, saved every 2: checkpoint-4 has no evaluation of its own (the
    one at step 3 is of other weights); checkpoint-6 has two, and the later counts."""
    evals = [{"step": 3, "eval_loss": 0.5}, {"step": 6, "eval_loss": 0.7}]
    evals.append({"step": 6, "eval_loss": 0.9})
    trainer_checkpoint(tmp_path, 4, evals[:1])
    trainer_checkpoint(tmp_path, 6, evals)
    with pytest.raises(CheckpointError, match=r"checkpoint-4 records no value of 'loss'"):
        choose(tmp_path, best=1, metric="loss")
    assert choose([tmp_path / "checkpoint-6"], best=1, metric="loss").candidates == (
        (os.fspath(tmp_path / "checkpoint-6"), 0.9),
    )


def test_the_trainer_state_beats_the_name(tmp_path):
    """A folder whose name says eval_loss=... but whose trainer_state.json logged another value
    at its step: the record wins."""
    folders = []
    for step, named, logged in ((2, 0.1, 0.8), (4, 0.9, 0.3)):
        trainer_checkpoint(tmp_path, step, [{"step": step, "eval_loss": logged}])
        folders.append(tmp_path / f"run-{step}-eval_loss={named}")
        (tmp_path / f"checkpoint-{step}").rename(folders[-1])
    chosen = choose(folders, best=1, metric="eval_loss")
    assert names(chosen) == ["run-4-eval_loss=0.9"]
    assert chosen.rule == "best 1 by eval_loss (min, from trainer_state.json)"


def test_an_unreadable_trainer_state_is_an_error(tmp_path):
    """A broken or non-object trainer_state.json is named, never a raw JSON error."""
    trainer_checkpoint(tmp_path, 2, [])
    state = tmp_path / "checkpoint-2" / "trainer_state.json"
    state.write_text("{")
    with pytest.raises(CheckpointError, match=r"cannot read .*trainer_state.json: "):
        choose(tmp_path, last=1)
    state.write_text("[]")
    with pytest.raises(CheckpointError, match=r"trainer_state.json is not a JSON object; it is no"):
        choose(tmp_path, last=1)


def _lightning_ckpt(path, step: int, monitors: dict[str, tuple[str, dict]], version=True):
    """A .ckpt as Lightning writes it, with a ModelCheckpoint state per monitored metric."""
    callbacks = {
        f"ModelCheckpoint{{'monitor': '{metric}', 'mode': '{mode}'}}": {
            "monitor": metric,
            "best_k_models": {f"/elsewhere/{n}": torch.tensor(v) for n, v in scores.items()},
        }
        for metric, (mode, scores) in monitors.items()
    }
    callbacks["EarlyStopping{'monitor': 'val_acc', 'mode': 'max'}"] = {"wait_count": 0}
    record = {"global_step": step, "state_dict": small(step), "callbacks": callbacks}
    if version:
        record["pytorch-lightning_version"] = "2.5.0"
    torch.save(record, path)


def test_the_model_checkpoint_s_own_mode_ranks(tmp_path):
    """A ModelCheckpoint(monitor='val_acc', mode='max') ranks by its mode: no mode to pass,
    though the name does not end in loss. A .pt without Lightning's version is no Lightning
    checkpoint: its callbacks are not read."""
    accuracy = {"epoch=1.ckpt": 0.5, "epoch=2.ckpt": 0.75, "epoch=3.ckpt": 0.625}
    for step in (1, 2, 3):
        _lightning_ckpt(tmp_path / f"epoch={step}.ckpt", step, {"val_acc": ("max", accuracy)})
    chosen = choose(tmp_path, best=2)
    assert names(chosen) == ["epoch=2.ckpt", "epoch=3.ckpt"]
    assert chosen.rule == "best 2 by val_acc (max, from ModelCheckpoint)"
    plain = tmp_path / "plain"
    plain.mkdir()
    _lightning_ckpt(plain / "epoch=1.pt", 1, {"val_acc": ("max", accuracy)}, version=False)
    with pytest.raises(
        CheckpointError, match=r"best= needs the metric to rank by: pass metric=.*'\.$"
    ):
        choose(plain, best=1)


def test_several_monitors_need_the_metric_named(tmp_path):
    """Two ModelCheckpoints: none is taken silently; the error lists what they monitor."""
    scores = {"val_loss": ("min", {"epoch=1.ckpt": 0.5}), "val_acc": ("max", {"epoch=1.ckpt": 0.7})}
    _lightning_ckpt(tmp_path / "epoch=1.ckpt", 1, scores)
    with pytest.raises(
        CheckpointError,
        match=r"pass metric= \(--metric\), e.g. metric='eval_loss'; the checkpoints monitor "
        r"val_acc, val_loss\.$",
    ):
        choose(tmp_path, best=1)
    assert choose(tmp_path, best=1, metric="val_acc").candidates[0][1] == pytest.approx(0.7)


def test_values_in_names(tmp_path):
    """metric=VALUE in a name: signed, with an exponent; a value from a checkpoint's own numbers
    beside values from names names both sources; `loss` is not the end of `val_loss`."""
    for value in ("-1.5", "2.5e-03", "-3e-02"):
        save_file(small(1), tmp_path / f"run-reward={value}.safetensors")
    chosen = choose(tmp_path, best=3, metric="reward", mode="max")
    assert [v for _, v in chosen.candidates] == [2.5e-03, -3e-02, -1.5]
    saved(tmp_path / "run-final.pt", 9, reward=1.0)
    mixed = choose(tmp_path, best=1, metric="reward", mode="max")
    assert names(mixed) == ["run-final.pt"]
    assert mixed.rule == "best 1 by reward (max, from checkpoint and name)"
    lightning = tmp_path / "lightning"
    lightning.mkdir()
    save_file(small(1), lightning / "epoch=1-val_loss=0.5.safetensors")
    with pytest.raises(
        CheckpointError, match=r"val_loss=0.5.safetensors records no value of 'loss'"
    ):
        choose(lightning, best=1, metric="loss")


def test_ties_go_by_natural_name_order(tmp_path):
    """Equal records (b9 and b10 at one step, with one loss): b10 is the later by name, b9 the
    first; not the order of the listing, where b10 comes first."""
    for name in ("b9.pt", "b10.pt"):
        saved(tmp_path / name, 5, val_loss=0.5)
    assert names(choose(tmp_path, last=1)) == ["b10.pt"]
    assert names(choose(tmp_path, best=1, metric="val_loss")) == ["b9.pt"]


def test_a_record_not_every_candidate_has_orders_nothing(tmp_path):
    """A step that one candidate lacks cannot order them all: the names do."""
    saved(tmp_path / "a1.pt", 5)
    save_file(small(2), tmp_path / "a2.safetensors")
    chosen = choose(tmp_path, last=1)
    assert (chosen.rule, names(chosen)) == ("last 1 by name (natural order)", ["a2.safetensors"])


def test_fairseq_records_its_last_update_and_top_level_numbers_beat_extra_state(tmp_path):
    """The last optimizer_history entry is the latest update count; a top-level val_loss wins
    over extra_state's."""
    for name, history, extra, top in (("x1.pt", [10, 900], 5.0, 0.1), ("x2.pt", [500], 0.2, 0.3)):
        torch.save(
            {
                "model": small(1),
                "optimizer_history": [{"num_updates": n} for n in history],
                "extra_state": {"val_loss": extra},
                "val_loss": top,
            },
            tmp_path / name,
        )
    assert names(choose(tmp_path, last=1)) == ["x1.pt"]
    assert dict(choose(tmp_path, last=1).candidates) == {
        os.fspath(tmp_path / "x1.pt"): 900,
        os.fspath(tmp_path / "x2.pt"): 500,
    }
    assert names(choose(tmp_path, best=1, metric="val_loss")) == ["x1.pt"]


def test_non_numbers_are_no_values(tmp_path):
    """A NaN (a diverged loss) is no value to rank by: the error names the checkpoint; a flag
    (True) is no step."""
    saved(tmp_path / "d1.pt", 1, val_loss=0.5, finished=True)
    saved(tmp_path / "d2.pt", 2, val_loss=float("nan"), finished=False)
    with pytest.raises(CheckpointError, match=r"d2.pt records no value of 'val_loss'"):
        choose(tmp_path, best=1, metric="val_loss")
    with pytest.raises(CheckpointError, match=r"d1.pt records no value of 'finished'"):
        choose(tmp_path, best=1, metric="finished", mode="max")


def test_only_a_name_ending_in_loss_is_lower_is_better(tmp_path):
    """The Trainer's rule: loss_scale does not end in loss, so its mode must be given."""
    saved(tmp_path / "s1.pt", 1, loss_scale=128.0)
    with pytest.raises(CheckpointError, match=r"is a higher 'loss_scale' better or a lower one"):
        choose(tmp_path, best=1, metric="loss_scale")


def test_unreadable_torch_checkpoints_say_why(tmp_path):
    """fairseq's args (an argparse.Namespace) are refused by weights-only loading: the error
    says how to allow them; a corrupt file is named as such."""
    saved(tmp_path / "c1.pt", 1, args=argparse.Namespace(lr=1.0))
    with pytest.raises(
        CheckpointError,
        match=r"c1.pt: torch.load\(weights_only=True\) refuses to unpickle argparse.Namespace",
    ):
        choose(tmp_path, last=1)
    (tmp_path / "c1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        CheckpointError,
        match=r"c1.pt: torch.load\(weights_only=True\) cannot read it \(UnpicklingError\); the "
        r"file is truncated or corrupt",
    ):
        choose(tmp_path, last=1)


def test_a_legacy_torch_file_is_read(tmp_path):
    """torch.save's pre-1.6 format is no zip: it cannot be memory-mapped, but it is read."""
    for step in (1, 2):
        torch.save(
            {"model": small(step), "step": step},
            tmp_path / f"old{step}.pt",
            _use_new_zipfile_serialization=False,
        )
    assert names(choose(tmp_path, last=1)) == ["old2.pt"]


def test_safetensors_candidates_are_never_unpickled(tmp_path, monkeypatch):
    """A safetensors file holds no trainer record: it is not handed to torch.load (which reads
    all its data, and before torch 2.x cannot read it at all)."""
    for step in (1, 2):
        save_file(small(step), tmp_path / f"s{step}.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", refuse)
    assert names(choose(tmp_path, last=1)) == ["s2.safetensors"]


def test_chosen_copies_and_pickles_whole(tmp_path):
    """A Chosen (a tuple with a rule) survives deepcopy and pickle, rule and candidates too."""
    for step in (1, 2):
        save_file(small(step), tmp_path / f"p{step}.safetensors")
    chosen = choose(tmp_path, last=1)
    for again in (copy.deepcopy(chosen), pickle.loads(pickle.dumps(chosen))):
        assert again == chosen and type(again) is type(chosen)
        assert again.record() == chosen.record()


def test_a_positive_or_capital_exponent_in_a_name_is_read(tmp_path):
    """Python writes {ppl:.2e} as 1.00e+05 and {x:.1E} as 2.0E-03: both are the whole value."""
    for value in ("1.00e+05", "2.0E-03", "3e+02"):
        save_file(small(1), tmp_path / f"epoch-ppl={value}.safetensors")
    chosen = choose(tmp_path, best=3, metric="ppl", mode="min")
    assert [v for _, v in chosen.candidates] == [2.0e-03, 3e02, 1.0e05]
