"""digests.py: DigestRecorder hashes each step's inputs before it runs and its output after."""

from __future__ import annotations

import hashlib

import torch

from terge.digests import DigestRecorder, tensor_digest
from terge.execute import execute
from terge.lineage import TensorDigests
from terge.plan import build_plan
from terge.sources import StateDictSource


def sha(tensor: torch.Tensor) -> str:
    """The SHA-256 of a float32 tensor's little-endian bytes, computed independently."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def run(states, base=0, method="arithmetic", inplace=False):
    """A plan and its execution with a DigestRecorder; the recorder and the results."""
    sources = [StateDictSource(s) for s in states]
    base_index = base if isinstance(base, int) else None
    base_source = sources[base] if isinstance(base, int) else StateDictSource(base)
    plan = build_plan(
        sources,
        base_source,
        base_index,
        method=method,
        weights=None,
        included=None,
        excluded=None,
        dtype=torch.float64,
        normalize=True,
        seed=0,
    )
    recorder = DigestRecorder(sources, base_source, base_index)
    results = {s.name: (base_source.get(s.name) if inplace else torch.empty(2)) for s in plan.steps}
    execute(plan.steps, sources, base_source, results.__getitem__, torch.float64, False, recorder)
    return recorder, results


def test_each_merged_tensor_gets_the_digests_of_its_inputs_and_of_what_was_written():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]
    recorder, results = run(states)
    assert torch.equal(results["w"], torch.tensor([2.0, 3.0]))
    assert recorder.digests == {
        "w": TensorDigests(
            sha(torch.tensor([2.0, 3.0])),
            {0: sha(states[0]["w"]), 1: sha(states[1]["w"])},
            None,
        )
    }
    assert tensor_digest(results["w"]) == sha(torch.tensor([2.0, 3.0]))


def test_in_place_the_base_is_hashed_as_it_was_before_the_step_wrote_into_it():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]
    before = sha(states[0]["w"])
    recorder, results = run(states, inplace=True)
    assert results["w"] is states[0]["w"] and states[0]["w"].tolist() == [2.0, 3.0]
    assert recorder.digests["w"].models[0] == before
    assert recorder.digests["w"].output == sha(torch.tensor([2.0, 3.0])) != before


def test_a_task_vector_merge_records_the_base_it_read():
    states = [{"w": torch.full((2,), float(i))} for i in range(3)]
    recorder, _ = run(states, method="task_arithmetic")
    # the base (model 0) is no contributor but was read: recorded under its index
    assert recorder.digests["w"].models == {i: sha(states[i]["w"]) for i in range(3)}
    assert recorder.digests["w"].base is None
    separate = {"w": torch.full((2,), 9.0)}
    recorder, _ = run(states, base=separate, method="task_arithmetic")
    assert recorder.digests["w"].models == {i: sha(states[i]["w"]) for i in range(3)}
    assert recorder.digests["w"].base == sha(separate["w"])


def test_a_file_digest_is_the_sha256_of_the_whole_file_read_in_chunks(tmp_path, monkeypatch):
    import terge.digests

    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 1000 + b"tail"
    path.write_bytes(data)
    reads = []
    real_open = open

    class Spy:
        def __init__(self, file):
            self.file = file

        def read(self, size):
            reads.append(size)
            return self.file.read(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(
        terge.digests, "open", lambda p, mode: Spy(real_open(p, mode)), raising=False
    )
    assert terge.digests.file_digest(path, chunk=1000) == hashlib.sha256(data).hexdigest()
    assert set(reads) == {1000} and len(reads) == len(data) // 1000 + 2  # streamed, then EOF


def test_source_files_names_each_shard_relative_to_the_folder(tmp_path):
    from terge.digests import source_files
    from terge.io import save
    from terge.sources import FileSource

    states = {f"t{i}": torch.full((64,), float(i)) for i in range(4)}
    save(states, tmp_path / "m", max_shard_size=600)
    source = FileSource(tmp_path / "m")
    try:
        files = source_files(source)
    finally:
        source.close()
    assert files is not None and len(files) >= 2
    for name, digest in files.items():
        assert digest == hashlib.sha256((tmp_path / "m" / name).read_bytes()).hexdigest()
    assert source_files(StateDictSource(states)) is None


def test_source_files_names_a_single_file_checkpoint_by_its_name(tmp_path):
    from safetensors.torch import save_file

    from terge.digests import source_files
    from terge.sources import FileSource

    save_file({"w": torch.ones(3)}, tmp_path / "one.safetensors")
    source = FileSource(tmp_path / "one.safetensors")
    try:
        files = source_files(source)
    finally:
        source.close()
    digest = hashlib.sha256((tmp_path / "one.safetensors").read_bytes()).hexdigest()
    assert files == {"one.safetensors": digest}
