"""Distributed file merges: ``merge(paths, out=..., distributed=True)`` and ``terge merge`` on 2 and
3 gloo processes on the CPU, each rank writing its own shards, against one process's output, byte
for byte; a failure on one rank (or on rank 0 before anything is written) leaves nothing.

One job is spawned per world size: it runs every scenario, and each rank saves what it saw (the
path returned, the error raised, the lineage) for the tests below to check.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import terge
from terge.audit import verify_lineage
from terge.cli.commands import main
from terge.io.writing import shard_owners
from terge.lineage import lineage_text
from terge.sources import FileSource

TIMEOUT = 300  # seconds for a whole job; a hang (a missed collective) fails rather than blocks
SHARD = "3KiB"  # several shards per rank: 12 tensors of 1 to 3 KiB

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def _models(folder: Path) -> list[str]:
    """Three checkpoint folders of eight tensors (float32 and bfloat16, one integer buffer), the
    base with a config.json naming its dtype."""
    paths = []
    for i in range(3):
        generator = torch.Generator().manual_seed(i)
        state = {
            f"layers.{k}.weight": torch.randn(16, 16 + 16 * (k % 3), generator=generator)
            for k in range(10)
        }
        state["embed.weight"] = torch.randn(40, 16, generator=generator).to(torch.bfloat16)
        state["position_ids"] = torch.arange(32)
        path = folder / f"model{i}"
        terge.save(state, path, max_shard_size="8KB")
        (path / "config.json").write_text('{"torch_dtype": "float32"}\n')
        paths.append(str(path))
    return paths


def _dcp_models(folder: Path, models: list[str]) -> list[str]:
    """The same three models as distributed checkpoints (``dcp.save({"model": ...})``, as a
    training loop saves them), written here in one process."""
    import warnings

    import torch.distributed.checkpoint as dcp

    paths = []
    for i, model in enumerate(models):
        path = folder / f"dcp{i}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is unavailable ... single process"
            dcp.save({"model": terge.load(model)}, checkpoint_id=str(path), no_dist=True)
        paths.append(str(path))
    return paths


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


SCENARIOS = {
    "arithmetic": {"method": "arithmetic", "weights": [1, 2, 3]},
    "ties": {"method": "ties", "digests": True, "out_dtype": "bfloat16"},
    "dare_ties": {"method": "dare_ties", "seed": 5},
    "model_stock": {"method": "model_stock"},
}


def _failing(rank: int):
    """A custom method that fails on ``rank`` alone (a bad tensor on one node, a full disk)."""

    def method(tensors, weights, base):
        if torch.distributed.get_rank() == rank:
            raise RuntimeError(f"injected failure on rank {rank}")
        return sum(t * w for t, w in zip(tensors, weights, strict=True))

    return method


def _said(call) -> str:
    try:
        call()
    except terge.TergeError as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _worker(
    rank: int, world: int, port: int, folder: str, models: list[str], dcps: list[str]
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank)
    )
    torch.set_num_threads(1)  # several processes on two cores
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    root = Path(folder)
    results: dict = {"read": set()}
    get = FileSource.get

    def recorded(source, name):  # which tensors this rank reads
        results["read"].add(name)
        return get(source, name)

    FileSource.get = recorded
    try:
        for name, options in SCENARIOS.items():
            out, lineage = terge.merge(
                models,
                out=root / f"dist-{name}",
                max_shard_size=SHARD,
                lineage=True,
                distributed=True,
                **({"seed": 0} | options),
            )
            results[name] = {"out": str(out), "lineage": lineage_text(lineage)}
            if name == "arithmetic":
                results["read"], read = set(), results["read"]
                results[name]["read"] = read
        _, drawn = terge.merge(
            models,
            method="dare_linear",
            out=root / "dist-drawn",
            max_shard_size=SHARD,
            lineage=True,
            distributed=True,
        )
        results["drawn_seed"] = next(iter(drawn.values())).settings["seed"]
        _, written = terge.merge(  # a distributed checkpoint out: each rank its data files
            models,
            method="ties",
            out=root / "dist-dcp-out",
            out_format="dcp",
            max_shard_size=SHARD,
            seed=0,
            digests=True,
            lineage=True,
            distributed=True,
        )
        results["dcp_out"] = lineage_text(written)
        results["dcp_failure"] = _said(
            lambda: terge.merge(
                models,
                method=_failing(world - 1),
                out=root / "dist-dcp-failed",
                out_format="dcp",
                distributed=True,
            )
        )
        terge.merge(  # distributed-checkpoint inputs: each rank stitches the tensors it needs
            dcps,
            method="ties",
            out=root / "dist-dcp",
            max_shard_size=SHARD,
            seed=0,
            distributed=True,
        )
        terge.merge(models, out=root / "dist-one-shard", seed=0, distributed=True)
        for failing in (world - 1, 0):  # a rank that only writes, and the one that commits
            results[f"failure{failing}"] = _said(
                lambda failing=failing: terge.merge(
                    models,
                    method=_failing(failing),
                    out=root / "dist-failed",
                    max_shard_size=SHARD,
                    distributed=True,
                )
            )
        unseen = [*models[:2], str(root / "not-on-this-node")] if rank == world - 1 else models
        results["unseen"] = _said(
            lambda: terge.merge(unseen, out=root / "dist-unseen", distributed=True)
        )
        results["exists"] = _said(
            lambda: terge.merge(
                models, out=root / "dist-arithmetic", max_shard_size=SHARD, distributed=True
            )
        )
        results["cli"] = main(
            [
                "merge",
                *models,
                "-o",
                str(root / "dist-cli"),
                "--method",
                "ties",
                "--seed",
                "3",
                "-q",
                "--max-shard-size",
                SHARD,
            ]
        )
        torch.save(results, root / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def job(request, tmp_path_factory):
    """Run the job on 2 and 3 processes; each rank's results, the world size, the folder, the
    input paths."""
    import torch.multiprocessing as mp

    world = request.param
    folder = tmp_path_factory.mktemp(f"files-{world}")
    models = _models(folder)
    dcps = _dcp_models(folder, models)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(
        _worker,
        args=(world, port, str(folder), models, dcps),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the distributed job did not finish within {TIMEOUT} s")
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return SimpleNamespace(results=results, world=world, folder=folder, models=models, dcps=dcps)


@needs_gloo
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_file_is_one_process_s_byte_for_byte(job, name, tmp_path):
    results, world, folder, models = job.results, job.world, job.folder, job.models
    options = {"seed": 0} | SCENARIOS[name]
    single = terge.merge(models, out=tmp_path / "single", max_shard_size=SHARD, **options)
    written = _files(folder / f"dist-{name}")
    assert written == _files(single)
    shards = [n for n in written if n.endswith(".safetensors")]
    assert len(shards) > world  # every rank wrote a shard of its own, one rank several
    assert {r[name]["out"] for r in results} == {str(folder / f"dist-{name}")}
    assert len({r[name]["lineage"] for r in results}) == 1  # every rank returns the same lineage
    assert results[0][name]["lineage"] == (folder / f"dist-{name}" / "lineage.json").read_text()


@needs_gloo
def test_each_rank_reads_only_the_tensors_of_its_own_shards(job):
    results, world, folder = job.results, job.world, job.folder
    out = folder / "dist-arithmetic"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    groups = [[name for name in index if index[name] == file] for file in files]
    with terge.open_checkpoint(out) as reader:
        layout = {name: reader.info(name) for name in index}
    owners = shard_owners(groups, layout, world)
    for rank in range(world):
        mine = {name for group, owner in zip(groups, owners, strict=True) if owner == rank
                for name in group}  # fmt: skip
        assert results[rank]["arithmetic"]["read"] == mine
        assert mine


@needs_gloo
def test_digests_are_gathered_from_every_rank(job):
    folder = job.folder
    lineage = terge.load_lineage(folder / "dist-ties" / "lineage.json")
    assert lineage.digests.keys() == set(lineage)  # every merged tensor, whichever rank wrote it
    assert verify_lineage(lineage, folder / "dist-ties") == []


@needs_gloo
def test_a_drawn_seed_is_rank_0_s_on_every_rank(job, tmp_path):
    results, folder, models = job.results, job.folder, job.models
    seeds = {r["drawn_seed"] for r in results}
    assert len(seeds) == 1
    single = terge.merge(
        models,
        method="dare_linear",
        out=tmp_path / "single",
        max_shard_size=SHARD,
        seed=seeds.pop(),
    )
    assert _files(folder / "dist-drawn") == _files(single)


@needs_gloo
def test_ranks_without_a_shard_wait_for_the_one_that_writes_it(job, tmp_path):
    folder, models = job.folder, job.models
    single = terge.merge(models, out=tmp_path / "single", seed=0)
    written = _files(folder / "dist-one-shard")
    assert "model.safetensors" in written
    assert written == _files(single)


@needs_gloo
@pytest.mark.parametrize("failing", ["last", "first"])
def test_a_failure_on_one_rank_fails_every_rank_and_leaves_nothing(job, failing):
    results, world, folder = job.results, job.world, job.folder
    failed = world - 1 if failing == "last" else 0
    said = [r[f"failure{failed}"] for r in results]
    assert said[failed].startswith("MethodError:")
    assert f"injected failure on rank {failed}" in said[failed]
    for rank in set(range(world)) - {failed}:
        assert said[rank].startswith("CheckpointError:"), said[rank]
        assert f"rank {failed} of {world} failed (MethodError:" in said[rank]
        assert "nothing was written" in said[rank]
    assert not (folder / "dist-failed").exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left


@needs_gloo
def test_an_input_one_rank_cannot_open_stops_every_rank_before_anything_is_written(job):
    results, world, folder = job.results, job.world, job.folder
    said = [r["unseen"] for r in results]
    assert "not-on-this-node" in said[-1]
    for rank in range(world - 1):
        assert said[rank].startswith(f"CheckpointError: rank {world - 1} of {world} failed ("), said
    assert not (folder / "dist-unseen").exists()


@needs_gloo
def test_a_refusal_on_rank_0_before_writing_stops_every_rank(job):
    results, world = job.results, job.world
    assert results[0]["exists"].startswith("CheckpointError:")
    assert "already exists" in results[0]["exists"]
    for rank in range(1, world):
        assert "rank 0 could not start writing" in results[rank]["exists"]
        assert "already exists" in results[rank]["exists"]


@needs_gloo
def test_terge_merge_under_torchrun_splits_the_shards_too(job, tmp_path):
    results, world, folder, models = job.results, job.world, job.folder, job.models
    assert [r["cli"] for r in results] == [0] * world
    single = tmp_path / "single"
    assert (
        main(
            [
                "merge",
                *models,
                "-o",
                str(single),
                "--method",
                "ties",
                "--seed",
                "3",
                "-q",
                "--max-shard-size",
                SHARD,
            ]
        )
        == 0
    )
    distributed, alone = _files(folder / "dist-cli"), _files(single)
    # the model cards differ only in the command shown: each names its own -o folder
    card = distributed.pop("README.md").decode()
    assert alone.pop("README.md").decode() == card.replace(str(folder / "dist-cli"), str(single))
    assert distributed == alone
    index = json.loads((single / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= world


@needs_gloo
def test_distributed_checkpoint_inputs_merge_as_on_one_process(job, tmp_path):
    """Distributed-checkpoint inputs (as FSDP2 training saves them): every rank reads the
    tensors of its own shards, chunks stitched, and the files are one process's, byte for byte;
    the tensors are those of the same merge of the safetensors copies."""
    folder, dcps = job.folder, job.dcps
    single = terge.merge(dcps, method="ties", out=tmp_path / "single", max_shard_size=SHARD, seed=0)
    assert _files(folder / "dist-dcp") == _files(single)
    again = terge.merge(
        job.models, method="ties", out=tmp_path / "files", max_shard_size=SHARD, seed=0
    )
    from_files = terge.load(again)
    merged = terge.load(folder / "dist-dcp")
    assert merged.keys() == from_files.keys()
    assert all(torch.equal(merged[k], from_files[k]) for k in merged)


@needs_gloo
def test_a_distributed_checkpoint_written_by_every_rank_loads_as_one_process_s(job, tmp_path):
    """out_format="dcp" with distributed=True: every rank appends its own tensors to its own data
    files, rank 0 writes .metadata with every rank's records; torch's dcp.load reads the same
    tensors as from one process's checkpoint, the lineage (digests gathered) is the same bytes,
    and a failure on one rank leaves nothing."""
    import warnings

    import torch.distributed.checkpoint as dcp

    results, world, folder, models = job.results, job.world, job.folder, job.models
    out = folder / "dist-dcp-out"
    single = terge.merge(
        models,
        method="ties",
        out=tmp_path / "single",
        out_format="dcp",
        max_shard_size=SHARD,
        seed=0,
        digests=True,
    )
    data = sorted(p.name for p in out.iterdir() if p.name.endswith(".distcp"))
    assert {name.split("_")[2] for name in data} == {str(r) for r in range(world)}  # every rank's
    assert (out / "lineage.json").read_bytes() == (single / "lineage.json").read_bytes()
    assert {r["dcp_out"] for r in results} == {(out / "lineage.json").read_text()}
    assert verify_lineage(terge.load_lineage(out / "lineage.json"), out) == []
    expected = terge.load(single)
    state = {name: torch.empty_like(tensor) for name, tensor in expected.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is unavailable ... single process"
        dcp.load(state, checkpoint_id=str(out), no_dist=True)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert all(
        "injected failure" in r["dcp_failure"] or "failed" in r["dcp_failure"] for r in results
    )
    assert not (folder / "dist-dcp-failed").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".dist-dcp")]  # no leftovers
