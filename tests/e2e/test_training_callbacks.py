"""The running average's callbacks in the real trainers: Lightning's ``Trainer.fit`` and
transformers' ``Trainer.train``, on tiny models on the CPU. Each callback's average equals a
:class:`terge.Average` fed the same weights by hand, and a run stopped at a checkpoint and
resumed from it ends with the same average, bit for bit, as a run that never stopped."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import terge

from helpers import same_bits

# --- Lightning ------------------------------------------------------------------------------------


def lightning_module(seed: int = 0):
    """A tiny regression LightningModule (Linear, BatchNorm, Linear), SGD with momentum."""
    pl = pytest.importorskip("lightning.pytorch", reason="needs lightning (pip install lightning)")

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
            self.snapshots: list[dict[str, torch.Tensor]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val", nn.functional.mse_loss(self.net(x), y))

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.snapshots.append(copy.deepcopy(self.state_dict()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return pl, Tiny()


def loader():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=generator)
    y = x.sum(1, keepdim=True)
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)  # 4 steps an epoch


def lightning_trainer(pl, folder, max_steps, callbacks):
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=folder,
        callbacks=callbacks,
    )


def test_lightning_callback_averages_each_optimizer_step(tmp_path):
    pl, module = lightning_module()
    from terge.integrations.lightning import AverageCallback

    callback = AverageCallback(decay=0.8, warmup="tf", copy_at_end=False)
    start = copy.deepcopy(module.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lightning_trainer(pl, tmp_path, 6, [callback]).fit(module, loader(), loader())
    assert len(module.snapshots) == 6
    holder = copy.deepcopy(module)
    holder.load_state_dict(start)
    by_hand = terge.Average(holder, decay=0.8, warmup="tf")
    for snapshot in module.snapshots:
        holder.load_state_dict(snapshot)
        by_hand.update(holder)
    got, want = callback.average.averaged_state_dict(), by_hand.averaged_state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert same_bits(got[name], want[name]), name
    # copy_at_end=False: the module keeps its trained weights
    assert same_bits(module.net[0].weight, module.snapshots[-1]["net.0.weight"])


def test_lightning_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """8 steps straight vs 4 steps, a checkpoint (the callback's state in it), then fit(ckpt_path)
    on a new module and trainer: the same average and the same model, bit for bit; at the end the
    average is copied into the module."""
    from terge.integrations.lightning import AverageCallback

    settings = {"decay": 0.9, "shadow_dtype": torch.float64}
    pl, straight = lightning_module()
    whole = AverageCallback(**settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lightning_trainer(pl, tmp_path / "a", 8, [whole]).fit(straight, loader(), loader())

        _, first = lightning_module()
        lightning_trainer(pl, tmp_path / "b", 4, [AverageCallback(**settings)]).fit(
            first, loader(), loader()
        )
        (checkpoint,) = (tmp_path / "b").rglob("*.ckpt")
        saved = torch.load(checkpoint, weights_only=False)
        assert any(key.startswith("terge.AverageCallback") for key in saved["callbacks"])

        _, resumed = lightning_module(seed=123)  # other initial weights: the checkpoint's win
        again = AverageCallback(**settings)
        lightning_trainer(pl, tmp_path / "b", 8, [again]).fit(
            resumed, loader(), loader(), ckpt_path=checkpoint
        )
    assert (again.average.step, again.average.count) == (8, 8)
    want, got = whole.average.state_dict()["shadow"], again.average.state_dict()["shadow"]
    for name in want:
        assert same_bits(got[name], want[name]), name
    for name, value in straight.state_dict().items():
        assert same_bits(resumed.state_dict()[name], value), name
    # copy_at_end: the module holds the average (rounded once into its float32)
    for name, value in whole.average.averaged_state_dict().items():
        assert same_bits(straight.state_dict()[name], value), name


# --- transformers ---------------------------------------------------------------------------------


def tiny_gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=32,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return transformers, transformers.GPT2LMHeadModel(config)


def train(transformers, model, folder, max_steps, callback, resume=None):
    data = [
        {"input_ids": (torch.arange(8) * (i + 1)) % 32, "labels": (torch.arange(8) * (i + 1)) % 32}
        for i in range(4)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(folder),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        save_strategy="steps",
        save_steps=4,
        report_to=[],
        disable_tqdm=True,
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        learning_rate=1e-2,
        lr_scheduler_type="constant",  # the same schedule whatever max_steps is
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_transformers_callback_saves_beside_checkpoints_and_resumes_exactly(tmp_path):
    """A tied-embedding GPT-2 trained 8 steps straight, and 4 steps + resume_from_checkpoint:
    the average (saved as checkpoint-4/terge_average.pt) and the final weights agree bit for bit;
    with copy_at_end the model ends holding the average."""
    from terge.integrations.transformers import FILENAME, AverageCallback

    transformers, straight = tiny_gpt2()
    whole = AverageCallback(decay=0.9, warmup="power", shadow_dtype=torch.float64)
    train(transformers, straight, tmp_path / "a", 8, whole)
    assert (tmp_path / "a" / "checkpoint-4" / FILENAME).is_file()
    assert (whole.average.step, whole.average.count) == (8, 8)
    weights = whole.average.averaged_state_dict()
    assert weights["lm_head.weight"] is weights["transformer.wte.weight"]  # tied, one average
    for name, value in straight.state_dict().items():
        assert same_bits(value, weights[name]), name

    _, first = tiny_gpt2()
    train(
        transformers,
        first,
        tmp_path / "b",
        4,
        AverageCallback(decay=0.9, warmup="power", shadow_dtype=torch.float64),
    )
    _, resumed = tiny_gpt2(seed=7)
    again = AverageCallback(decay=0.9, warmup="power", shadow_dtype=torch.float64)
    train(
        transformers, resumed, tmp_path / "b", 8, again, resume=str(tmp_path / "b" / "checkpoint-4")
    )
    assert (again.average.step, again.average.count) == (8, 8)
    want, got = whole.average.state_dict()["shadow"], again.average.state_dict()["shadow"]
    for name in want:
        assert same_bits(got[name], want[name]), name
    for name, value in straight.state_dict().items():
        assert same_bits(resumed.state_dict()[name], value), name


def test_transformers_resume_without_a_saved_average_warns(tmp_path):
    from terge.integrations.transformers import FILENAME, AverageCallback

    transformers, model = tiny_gpt2()
    train(transformers, model, tmp_path, 4, AverageCallback())
    (tmp_path / "checkpoint-4" / FILENAME).unlink()
    _, model = tiny_gpt2()
    with pytest.warns(UserWarning, match=r"checkpoint-4/terge_average\.pt does not exist"):
        train(transformers, model, tmp_path, 5, AverageCallback(), resume=True)
