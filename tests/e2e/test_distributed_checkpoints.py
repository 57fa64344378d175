"""Distributed checkpoints end to end: FSDP2 models on 2 gloo processes save their training state
with ``torch.distributed.checkpoint`` (model and optimizer, in three layouts), this process merges
them without a process group, bit for bit as the unsharded models would merge, reading only the
model's chunks; the soup is written with ``out_format="dcp"`` and the 2 processes load it back
into an FSDP2 model with ``dcp.load`` and run it.

One job does every distributed step: it saves, waits for this process to write the soup, then
loads it; each rank saves what it saw for the tests below.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch

import terge
from terge.io.distributed import DistributedCheckpoint

WORLD = 2
TIMEOUT = 240  # seconds for the whole job; a hang (a missed collective) fails rather than blocks
TOKENS = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
LAYOUTS = ("tutorial", "plain", "torchtitan")
"""How each checkpoint is saved: ``{"model": get_model_state_dict, "optimizer":
get_optimizer_state_dict, "step"}``; ``{"model": model.state_dict(), "optim":
optimizer.state_dict()}``; the model's tensors at the top level beside ``optimizer``,
``lr_scheduler`` and ``train_state`` (torchtitan)."""

distributed_ok = torch.distributed.is_available() and torch.distributed.is_gloo_available()
pytestmark = pytest.mark.skipif(not distributed_ok, reason="needs torch.distributed with gloo")


class TinyLM(torch.nn.Module):
    """Embedding, two blocks, norm, head; the vocabulary (11) shards unevenly (6 + 5 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 16)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
            for _ in range(2)
        )
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 11)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(self.norm(hidden)).clone()


def family(n: int = 3) -> list[TinyLM]:
    """``n`` fine-tunes of one model (the same in every process)."""
    torch.manual_seed(0)
    base = TinyLM()
    models = []
    for i in range(n):
        model = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        models.append(model)
    return models


# --- the job each rank runs -----------------------------------------------------------------------


def _fsdp2(model: torch.nn.Module, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _training_state(model: torch.nn.Module, layout: str, step: int) -> dict:
    """What a training script saves after a step: the model and its AdamW state. The step's
    learning rate is 0, so the optimizer has state and the weights are still the family's."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    model(torch.tensor(TOKENS)).sum().backward()
    optimizer.step()
    if layout == "tutorial":
        return {
            "model": get_model_state_dict(model),
            "optimizer": get_optimizer_state_dict(model, optimizer),
            "step": step,
        }
    if layout == "plain":
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}
    return {
        **get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
        "lr_scheduler": {"last_epoch": step},
        "train_state": {"step": step},
    }


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.1)


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
        )
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        root = Path(folder)
        sharded = [_fsdp2(model, mesh) for model in family()]
        for step, (model, layout) in enumerate(zip(sharded, LAYOUTS)):
            state = _training_state(model, layout, step)
            dcp.save(state, checkpoint_id=str(root / f"step-{step}"))
        try:  # sharded models in memory: refused on every rank alike, before anything is written
            terge.merge(sharded, out=root / "never", out_format="dcp")
            refusal = ""
        except terge.ShardingError as error:
            refusal = str(error)
        torch.distributed.barrier()
        if rank == 0:
            (root / "saved").touch()
        _wait_for(root / "soup.ready")  # this test's process merges meanwhile

        torch.manual_seed(1234)  # other weights than the soup's, so loading must change them
        resumed = _fsdp2(TinyLM(), mesh)
        state = {"model": get_model_state_dict(resumed)}
        dcp.load(state, checkpoint_id=str(root / "soup"))
        set_model_state_dict(resumed, state["model"])
        with torch.no_grad():
            logits = resumed(torch.tensor(TOKENS))
        full = get_model_state_dict(
            resumed, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        torch.save({"logits": logits, "full": full, "refusal": refusal}, root / f"rank{rank}.pt")
        torch.distributed.barrier()  # no rank tears gloo down while another still uses it
    finally:
        torch.distributed.destroy_process_group()


def _count_reads(monkeypatch) -> list[tuple[str, str, tuple[int, ...]]]:
    """Record every chunk read by any distributed checkpoint: (folder name, key, offsets)."""
    reads: list[tuple[str, str, tuple[int, ...]]] = []
    read = DistributedCheckpoint._read_chunk

    def counted(self, tensor, chunk, *args):
        reads.append((self.path.name, tensor.key, chunk.offsets))
        return read(self, tensor, chunk, *args)

    monkeypatch.setattr(DistributedCheckpoint, "_read_chunk", counted)
    return reads


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the job; write the soup when the checkpoints are saved. The folder, the chunks read
    while writing the soup, and each rank's results.

    A worker killed by a signal inside torch's gloo setup ("terminate called without an active
    exception", seen once in 2026-11-27's CI on an idle machine, not reproduced in the next 10
    runs) gets the job run once more, in a fresh folder on a fresh port; a second death fails.
    """
    import torch.multiprocessing as mp

    try:
        return _run_job(tmp_path_factory)
    except mp.ProcessExitedException as error:
        if error.signal_name is None:
            raise
        warnings.warn(f"the distributed job died ({error}); running it once more", stacklevel=1)
        return _run_job(tmp_path_factory)


def _run_job(tmp_path_factory):
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("dcp")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(
        _worker, args=(port, str(folder)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT

    def wait(done) -> None:
        while not done():
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the distributed job did not finish within {TIMEOUT} s")

    wait(lambda: (folder / "saved").exists() or context.join(timeout=0.2))
    assert not torch.distributed.is_initialized()  # this process has no process group
    with pytest.MonkeyPatch.context() as patch:
        reads = _count_reads(patch)
        terge.merge([folder / f"step-{i}" for i in range(3)], out=folder / "soup", out_format="dcp")
    (folder / "soup.ready").touch()
    wait(lambda: context.join(timeout=1))
    results = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return folder, reads, results


def _paths(folder: Path) -> list[Path]:
    return [folder / f"step-{i}" for i in range(3)]


# --- reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["arithmetic", "ties", "dare_ties"])
def test_fsdp2_checkpoints_merge_as_the_unsharded_models(job, method):
    folder, _, _ = job
    merged, lineage = terge.merge(_paths(folder), method=method, seed=0, lineage=True)
    expected = terge.merge([m.state_dict() for m in family()], method=method, seed=0)
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    assert [record.path for record in lineage.models] == [os.fspath(p) for p in _paths(folder)]


def test_each_layout_gives_the_model_alone(job):
    folder, _, _ = job
    names = list(family()[0].state_dict())
    for path, entry in zip(_paths(folder), ("model", "model", "")):
        with terge.io.open_checkpoint(path) as reader:
            assert (reader.entry, reader.names()) == (entry, names)


def test_only_the_models_chunks_are_read_once_each(job, monkeypatch):
    folder, reads, _ = job
    names = list(family()[0].state_dict())
    keys = {entry + name for entry in ("model.", "") for name in names}
    # every tensor is sharded in two on dim 0, 2 chunks: each chunk of each checkpoint read once
    assert len(reads) == len(set(reads)) == 2 * 3 * len(names)
    assert {key for _, key, _ in reads} == keys  # the optimizer's, scheduler's, ... never

    counted = _count_reads(monkeypatch)
    terge.merge(_paths(folder), included=re.compile(r"^blocks\.1\.0\."))
    others = [(key, offsets) for name, key, offsets in counted if name != "step-0"]
    assert len(others) == len(set(others)) == 2 * 2 * 2  # two checkpoints, two tensors, 2 chunks
    assert all(re.fullmatch(r"(model\.)?blocks\.1\.0\.(weight|bias)", key) for key, _ in others)
    base = [read for read in counted if read[0] == "step-0"]  # the result holds all of it
    assert len(base) == len(set(base)) == len(reads) // 3


# --- writing and resuming -------------------------------------------------------------------------


def test_the_soup_loads_into_an_fsdp2_model_bit_for_bit(job):
    _, _, results = job
    expected = terge.merge([m.state_dict() for m in family()])
    full = results[0]["full"]  # gathered on rank 0
    assert full.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(full[name], tensor), name


def test_the_resumed_fsdp2_model_runs_as_the_unsharded_soup(job):
    _, _, results = job
    soup = TinyLM()
    soup.load_state_dict(terge.merge([m.state_dict() for m in family()]))
    with torch.no_grad():
        expected = soup(torch.tensor(TOKENS))
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank]["logits"], expected, rtol=1e-6, atol=1e-6)


def test_the_soup_keeps_the_bases_entry_and_its_lineage(job):
    folder, _, _ = job
    soup = folder / "soup"
    assert sorted(p.name for p in soup.iterdir()) == [
        ".metadata",
        "README.md",
        "__0_0.distcp",
        "lineage.json",
    ]
    with terge.io.open_checkpoint(soup) as reader:
        assert reader.entry == "model"  # the base (step-0) saved its model under "model"
    lineage = terge.load_lineage(soup)
    assert [record.path for record in lineage.models] == [os.fspath(p) for p in _paths(folder)]


def test_sharded_models_in_memory_are_refused_naming_the_way(job):
    folder, _, results = job
    for rank in range(WORLD):
        assert results[rank]["refusal"].startswith(
            "out_format='dcp' writes a merge computed on one process, but these models are "
            "sharded (DTensors): merge them in place (inplace=True) on every rank and save the "
            "model with torch.distributed.checkpoint.save"
        )
    assert not (folder / "never").exists()
