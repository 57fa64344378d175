"""Helpers shared by several test modules (importable as ``helpers``: pyproject puts tests/ on
the path), so that no test module imports another."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch

# --------------------------------------------------------------------------------------------
# Models and state dicts
# --------------------------------------------------------------------------------------------


class Tied(torch.nn.Module):
    """An embedding tied to its output head, plus BatchNorm buffers, like a tiny LM."""

    def __init__(self, vocab: int = 11, width: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.norm = torch.nn.BatchNorm1d(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight


def states(count: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Small state dicts with a float32, a bfloat16 and an integer tensor, like a lineage's."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "layers.0.weight": torch.randn(4, 3, generator=generator),
            "layers.1.weight": torch.randn(3, 3, generator=generator).to(torch.bfloat16),
            "norm.bias": torch.randn(3, generator=generator),
            "steps": torch.tensor([i]),
        }
        for i in range(count)
    ]


def snapshot(model: torch.nn.Module | dict) -> dict[str, torch.Tensor]:
    """A deep copy of every tensor, to prove later that nothing was modified."""
    items = model.state_dict(keep_vars=True) if isinstance(model, torch.nn.Module) else model
    return {k: v.detach().clone() for k, v in items.items()}


def assert_unchanged(model: torch.nn.Module | dict, before: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``model`` still equals its ``snapshot``."""
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name


# --------------------------------------------------------------------------------------------
# Checkpoint tensors
# --------------------------------------------------------------------------------------------

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def make(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4), seed: int = 0) -> torch.Tensor:
    """A reproducible random tensor of any dtype a checkpoint holds."""
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return torch.randint(0, 100, shape, generator=generator, dtype=torch.int64).to(dtype)


def tensors(count: int = 4, numel: int = 256) -> dict[str, torch.Tensor]:
    """``count`` float32 tensors of ``numel * 4`` bytes each."""
    return {f"layers.{i}.weight": make(torch.float32, (numel,), seed=i) for i in range(count)}


def assert_same(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], ordered: bool = False
) -> None:
    """Same names (in the same order when ``ordered``), dtypes and values."""
    assert (list(actual) if ordered else sorted(actual)) == (
        list(expected) if ordered else sorted(expected)
    )
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype
        assert torch.equal(actual[name], tensor), name


def listing(folder) -> list[str]:
    """The names in a folder, sorted."""
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------
# Bits and rounding
# --------------------------------------------------------------------------------------------

FLOAT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def awkward(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values of every magnitude, with zeros, infinities, NaNs and subnormals mixed in."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator, dtype=torch.float64)
    values *= torch.exp2(torch.randint(-30, 30, (numel,), generator=generator).double())
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-8])
    picks = torch.randint(0, numel, (min(numel, 7),), generator=generator)
    values[picks] = specials[: picks.numel()].double()
    return values.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that NaNs need only be NaN in the same places."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(
        a[~nan].view(torch.uint8), b[~nan].view(torch.uint8)
    )


def nearest(value: Fraction, dtype: torch.dtype) -> torch.Tensor:
    """The correctly rounded (ties to even) ``dtype`` value of an exact rational, by search."""
    guess = torch.tensor(float(value), dtype=torch.float64).to(dtype)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    candidates = [(guess.view(bits) + d).view(dtype) for d in (-2, -1, 0, 1, 2)]

    def key(c: torch.Tensor):
        return (abs(Fraction(c.item()) - value), int(c.view(bits).item()) & 1)

    return min(candidates, key=key)


def plan_for(sources: list, **options):
    """The default plan (equal-weighted mean, base 0) over ``sources``; ``options`` override."""
    from terge.plan import build_plan

    settings = {
        "method": "arithmetic",
        "weights": None,
        "included": None,
        "excluded": None,
        "dtype": torch.float64,
        "normalize": True,
        "seed": 0,
        **options,
    }
    return build_plan(sources, sources[0], 0, **settings)


def lineage_validator():
    """A jsonschema validator of the shipped lineage schema, or ``None`` without jsonschema."""
    try:
        import jsonschema
    except ImportError:
        return None
    from terge.lineage import lineage_schema

    schema = lineage_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# --------------------------------------------------------------------------------------------
# Training runs written by the real libraries (imported here only, tests importorskip first)
# --------------------------------------------------------------------------------------------


def lightning_run(
    folder, epochs: int = 4, top_k: int = -1, save_last: bool = False, callbacks=(), **hparams
):
    """Train a tiny LightningModule (its network as ``self.model``, so every name starts with
    ``model.``) for ``epochs`` one-batch epochs on the CPU, with a ``ModelCheckpoint`` watching
    ``val_loss`` (mode min, ``save_top_k=top_k``) writing ``epoch=E-step=S-val_loss=V.ckpt``
    into ``folder``; ``callbacks`` are added. Returns the LightningModule's network."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Lit(L.LightningModule):
        def __init__(self, **kwargs) -> None:
            super().__init__()
            if kwargs:
                self.save_hyperparameters()
            self.model = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1)
            )

        def training_step(self, batch, index):
            x, y = batch
            return torch.nn.functional.mse_loss(self.model(x), y)

        def validation_step(self, batch, index):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.model(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    checkpoints = ModelCheckpoint(
        dirpath=folder,
        filename="{epoch}-{step}-{val_loss:.4f}",
        monitor="val_loss",
        mode="min",
        save_top_k=top_k,
        save_last=save_last,
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[checkpoints, *callbacks],
    )
    module = Lit(**hparams)
    trainer.fit(module, loader, loader)
    return module.model


def trainer_run(folder, steps: int = 6, save_steps: int = 2):
    """Train a tiny GPT-2 (built from a config) with the Hugging Face ``Trainer`` for ``steps``
    steps, evaluating and saving every ``save_steps`` into ``folder/checkpoint-N/``."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, index):
            ids = (torch.arange(8) + index) % 16
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
    arguments = TrainingArguments(
        output_dir=str(folder),
        max_steps=steps,
        save_steps=save_steps,
        eval_strategy="steps",
        eval_steps=save_steps,
        logging_steps=1,
        per_device_train_batch_size=2,
        learning_rate=0.05,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=GPT2LMHeadModel(config),
        args=arguments,
        train_dataset=Tokens(),
        eval_dataset=Tokens(),
    )
    trainer.train()
    return trainer.model


# --- inputs for the compiled task-vector loops (tests/kernels/test_fastmethods.py, test_fast_elementwise.py)


def awkward_with_ties(numel: int, seed: int, kind: int) -> torch.Tensor:
    """Float64 values with zeros, signed zeros, infinities, NaNs, subnormals and many ties."""
    generator = torch.Generator().manual_seed(seed)
    if kind == 0:  # few distinct values: ties at any threshold
        values = torch.randint(-3, 4, (numel,), generator=generator).double() * 0.25
    else:
        values = torch.randn(numel, generator=generator, dtype=torch.float64)
        values *= torch.exp2(torch.randint(-20, 5, (numel,), generator=generator).double())
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-310, -5e-324], dtype=torch.float64
    )
    picks = torch.randint(0, numel, (min(numel, kind * 3),), generator=generator)
    values[picks] = specials[torch.arange(picks.numel()) % specials.numel()]
    return values


def near_base(numel: int, dtypes: list[torch.dtype], seed: int, kind: int) -> list[torch.Tensor]:
    """A base and models near it (so that task vectors are small and share values)."""
    base = awkward_with_ties(numel, seed, kind)
    tensors = [base.to(dtypes[0])]
    for i, dtype in enumerate(dtypes[1:], start=1):
        delta = awkward_with_ties(numel, seed + i, kind) * 0.125
        keep = torch.rand(numel, generator=torch.Generator().manual_seed(seed - i)) < 0.7
        tensors.append(torch.where(keep, base + delta, base).to(dtype))
    return tensors


def count_calls(monkeypatch: Any, module: Any, *names: str) -> dict[str, int]:
    """Count the calls of ``module``'s functions ``names`` (each still called), e.g. which loop
    a merge reached and how often."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(module, name)

        def counted(*args: Any, name: str = name, original: Any = original, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


def reference(
    method: Any,
    destination_dtype: torch.dtype,
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    seed: int | None,
    divisor: float | None = None,
) -> torch.Tensor:
    """What execute.run_step computes for a task-vector method without the compiled loops."""
    from terge import kernels

    result = method([t.double() for t in tensors], weights, base.double(), seed, divisor=divisor)
    out = torch.empty(base.shape, dtype=destination_dtype)
    kernels.store_whole(out, result, kernels.ChunkBuffers(torch.float64))
    return out


def fast(
    method: Any,
    destination_dtype: torch.dtype,
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    seed: int | None,
    inplace: bool,
    divisor: float | None = None,
) -> torch.Tensor:
    """The same through the method's compiled loops (which must take it)."""
    if inplace:
        destination = base = base.clone()
    else:
        destination = torch.empty(base.shape, dtype=destination_dtype)
    assert method.merge_into(destination, tensors, weights, base, seed, divisor=divisor)
    return destination


def streamed(method: Any, destination_dtype, tensors, weights, base, inplace=False):
    """What run_step writes through the method's ``into`` (the streamed passes)."""
    from terge.kernels import ChunkBuffers

    if inplace:
        destination = base if base is not None else tensors[0]
    else:
        destination = torch.empty(tensors[0].shape, dtype=destination_dtype)
    assert method.merge_into(
        destination, tensors, weights, base, scratch=ChunkBuffers(torch.float64)
    )
    return destination


def whole(method: Any, destination_dtype, tensors, weights, base):
    """What run_step writes through the whole-tensor float64 reference."""
    from terge.kernels import ChunkBuffers, store_whole

    result = method([t.double() for t in tensors], weights, None if base is None else base.double())
    out = torch.empty(tensors[0].shape, dtype=destination_dtype)
    store_whole(out, result, ChunkBuffers(torch.float64))
    return out
