"""Distributed-checkpoint benchmark: merging three FSDP2-style training checkpoints
(``torch.distributed.checkpoint`` folders holding model and AdamW state, written by 2 ranks) with
terge, against the same models as safetensors, against what users do without terge, and against
the disk.

Run from the repository root::

    python benchmarks/bench_dcp.py            # ~100M parameters (400 MB of weights, 1.2 GB per
                                              # checkpoint with the optimizer state; ~5 GB of disk)
    python benchmarks/bench_dcp.py --quick    # tiny, smoke test

Inputs (made once under ``benchmarks/.cache/dcp/``): three Llama-shaped models (8 blocks, hidden
768, MLP 2048, key/value 256, vocabulary 32,000: 99.6M fp32 parameters) with random weights, each
saved twice: as a DCP folder laid out as 2 FSDP2 ranks write it (``{"model": ..., "optimizer":
...}``; every tensor split in two on dim 0, rank r's chunks as ``torch.save`` records in
``__r_0.distcp``, torch's own ``Metadata`` in ``.metadata``; written here chunk by chunk rather
than by a 2-process job, which gives the same files), with AdamW's ``exp_avg`` and ``exp_avg_sq``
beside the model; and as one ``model.safetensors``.

Cases, each a fresh Python process (imports, ``torch.distributed.checkpoint``'s included, excluded
from the time, which is the merge alone; inputs evicted from the page cache first, so they are
read from disk):

- terge, DCP -> safetensors: ``terge.merge(dcp_folders, out=OUT)``;
- terge, DCP -> DCP: ``terge.merge(dcp_folders, out=OUT, out_format="dcp")``;
- terge, safetensors -> safetensors: ``terge.merge(safetensors_files, out=OUT)`` (reference);
- without terge: ``dcp.load`` of each model whole into memory (``allow_partial_load``, no process
  group), ``torch.stack(...).mean(0)`` per tensor, ``dcp.save`` of the mean (what one writes by
  hand today; its float32 mean is not exact);
- disk floor: read the model's records of the three DCP folders, write one model's bytes, fsync.

Memory is the peak ``RssAnon`` of the process (resident memory not backed by files: mapped pages
of the inputs and outputs do not count), sampled every ~5 ms. Times on a shared machine are noisy:
compare the ratios, measured in one run. terge's outputs are checked bit for bit against each other.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from _common import CACHE_DIR, MIB, SRC_DIR, machine_info, markdown_table
from bench_files import evict, run_sampled

DCP_DIR = CACHE_DIR / "dcp"
WORLD = 2


def shapes(quick: bool) -> dict[str, tuple[int, ...]]:
    """A Llama-shaped model's tensors (names as ``LlamaShaped`` in _common)."""
    layers, vocab, hidden, mlp, kv = (2, 1000, 64, 128, 32) if quick else (8, 32000, 768, 2048, 256)
    found = {"embed.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"layers.{i}."
        found |= {p + "q.weight": (hidden, hidden), p + "k.weight": (kv, hidden)}
        found |= {p + "v.weight": (kv, hidden), p + "o.weight": (hidden, hidden)}
        found |= {p + "gate.weight": (mlp, hidden), p + "up.weight": (mlp, hidden)}
        found |= {p + "down.weight": (hidden, mlp), p + "norm1": (hidden,), p + "norm2": (hidden,)}
    return found | {"norm": (hidden,), "head.weight": (vocab, hidden)}


def _rows(size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s rows of ``size`` under FSDP2's Shard(0): ceil-divided, the last short."""
    per = math.ceil(size / WORLD)
    begin = min(size, rank * per)
    return begin, min(size, begin + per) - begin


def write_dcp(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` (flat keys) as 2 ranks write them with ``dcp.save``: rank r's dim-0 chunks in
    ``__r_0.distcp``, torch's ``Metadata`` in ``.metadata``."""
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    folder.mkdir(parents=True)
    storage, entries = {}, {}
    files = [open(folder / f"__{rank}_0.distcp", "wb") for rank in range(WORLD)]  # noqa: SIM115
    try:
        for key, tensor in tensors.items():
            chunks = []
            for rank, file in enumerate(files):
                if tensor.dim() == 0:  # a step counter: rank 0 saves it whole
                    if rank:
                        continue
                    offsets, piece = torch.Size([]), tensor
                else:
                    begin, rows = _rows(tensor.shape[0], rank)
                    if rows == 0:
                        continue
                    offsets = torch.Size([begin] + [0] * (tensor.dim() - 1))
                    piece = tensor.narrow(0, begin, rows).clone()
                start = file.tell()
                torch.save(piece, file)
                where = _StorageInfo(f"__{rank}_0.distcp", start, file.tell() - start)
                storage[md.MetadataIndex(key, offsets, index=0)] = where
                chunks.append(md.ChunkStorageMetadata(offsets, piece.shape))
            properties = md.TensorProperties(dtype=tensor.dtype)
            entries[key] = md.TensorStorageMetadata(properties, tensor.shape, chunks)
    finally:
        for file in files:
            file.close()
    planner = {key: tuple(key.split(".", 1)) for key in entries}
    metadata = md.Metadata(entries, planner_data=planner, storage_data=storage, version="1.0.0")
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def make_inputs(quick: bool) -> list[tuple[Path, Path]]:
    """The three models, each as (DCP folder, safetensors file); made once, then reused."""
    from safetensors.torch import save_file

    root = DCP_DIR / ("quick" if quick else "full")
    pairs = []
    for seed in range(3):
        dcp, single = root / f"dcp-{seed}", root / f"st-{seed}" / "model.safetensors"
        pairs.append((dcp, single))
        if (root / f"done-{seed}").exists():
            continue
        print(f"  making checkpoint {seed} in {root} ...", file=sys.stderr, flush=True)
        shutil.rmtree(dcp, ignore_errors=True)
        generator = torch.Generator().manual_seed(seed)
        model = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes(quick).items()}
        state = {f"model.{n}": t for n, t in model.items()}
        for name, tensor in model.items():  # AdamW's state, as get_optimizer_state_dict keys it
            state[f"optimizer.state.{name}.exp_avg"] = torch.randn_like(tensor) * 1e-3
            state[f"optimizer.state.{name}.exp_avg_sq"] = torch.rand_like(tensor) * 1e-6
            state[f"optimizer.state.{name}.step"] = torch.tensor(100.0)
        write_dcp(dcp, state)
        single.parent.mkdir(parents=True, exist_ok=True)
        save_file(model, single)
        os.sync()
        (root / f"done-{seed}").touch()
    return pairs


TERGE = """
import sys, time, terge
import torch.distributed.checkpoint  # imported by the first distributed checkpoint opened
inputs, out, fmt = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
start = time.perf_counter()
terge.merge(inputs, out=out, out_format=fmt, overwrite=True)
print("@@", time.perf_counter() - start)
"""

BY_HAND = """
import sys, time, warnings, torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
warnings.simplefilter("ignore")
inputs, out = sys.argv[1:-1], sys.argv[-1]
start = time.perf_counter()
models = []
for path in inputs:
    metadata = dcp.FileSystemReader(path).read_metadata()
    model = {k[6:]: torch.empty(v.size, dtype=v.properties.dtype)
             for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    dcp.load({"model": model}, checkpoint_id=path,
             planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    models.append(model)
mean = {name: torch.stack([m[name] for m in models]).mean(0) for name in models[0]}
dcp.save({"model": mean}, checkpoint_id=out, no_dist=True)
print("@@", time.perf_counter() - start)
"""

FLOOR = """
import os, pickle, sys, time
import torch.distributed.checkpoint  # what unpickling the metadata imports
inputs, out = sys.argv[1:-1], sys.argv[-1]
start = time.perf_counter()
buffer = bytearray(1 << 20)
written = 0
os.makedirs(out)
with open(os.path.join(out, "copy"), "wb") as target:
    for number, path in enumerate(inputs):
        with open(os.path.join(path, ".metadata"), "rb") as file:
            metadata = pickle.load(file)
        handles = {}
        for index, where in metadata.storage_data.items():
            if not index.fqn.startswith("model."):
                continue
            name = where.relative_path
            if name not in handles:
                handles[name] = os.open(os.path.join(path, name), os.O_RDONLY)
            offset, left = where.offset, where.length
            while left:
                view = memoryview(buffer)[: min(left, len(buffer))]
                got = os.preadv(handles[name], [view], offset)
                if number == 0:
                    target.write(memoryview(buffer)[:got])
                offset, left = offset + got, left - got
        for fd in handles.values():
            os.close(fd)
    target.flush()
    os.fsync(target.fileno())
print("@@", time.perf_counter() - start)
"""


def run(name: str, script: str, args: list[str], inputs: list[Path], out: Path) -> dict[str, Any]:
    """One case in a fresh process from cold inputs: merge time, peak RssAnon, whole-run time."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    evict([f for path in inputs for f in (path.rglob("*") if path.is_dir() else [path])])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    result = run_sampled([sys.executable, "-c", script, *args], env)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.output_tail}")
    lines = result.output_tail.splitlines()
    seconds = float(next(line for line in lines if line.startswith("@@"))[3:])
    print(f"  {name}: {seconds:.2f} s, RssAnon {result.anon_peak_mib:.0f} MiB", file=sys.stderr)
    return {"case": name, "seconds": seconds, "anon_mib": result.anon_peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a smoke test")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    pairs = make_inputs(args.quick)
    dcps, singles = [p for p, _ in pairs], [s for _, s in pairs]
    model_bytes = sum(math.prod(s) * 4 for s in shapes(args.quick).values())
    work = Path(tempfile.mkdtemp(prefix="bench-dcp-", dir=DCP_DIR))
    try:
        d = [str(p) for p in dcps]
        s = [str(p) for p in singles]
        cases = [
            ("disk floor (read 3 models' records, write 1)", FLOOR, d, [], dcps, "f"),
            ("terge: DCP -> safetensors", TERGE, d, ["safetensors"], dcps, "a"),
            ("terge: DCP -> DCP", TERGE, d, ["dcp"], dcps, "b"),
            ("terge: safetensors -> safetensors", TERGE, s, ["safetensors"], singles, "c"),
            ("dcp.load whole + stack().mean() + dcp.save", BY_HAND, d, [], dcps, "e"),
        ]
        rows = [
            run(name, script, [*paths, str(work / out), *extra], inputs, work / out)
            for name, script, paths, extra, inputs, out in cases
        ]
        sys.path.insert(0, str(SRC_DIR))
        import terge

        reference = terge.load(work / "c")
        exact = all(
            all(torch.equal(terge.load(work / w)[n], t) for n, t in reference.items()) for w in "ab"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    floor, reference_row = rows[0]["seconds"], rows[3]
    table = [
        [
            row["case"],
            f"{row['seconds']:.2f}",
            f"{row['seconds'] / floor:.2f}x",
            f"{row['seconds'] / reference_row['seconds']:.2f}x",
            f"{row['anon_mib']:.0f}",
            f"{row['anon_mib'] - rows[0]['anon_mib']:.0f}",
        ]
        for row in rows
    ]
    params = model_bytes // 4
    print(
        f"\n## Merging 3 distributed checkpoints ({params / 1e6:.1f}M fp32 parameters, "
        f"{model_bytes / MIB:.0f} MiB of weights each, 3x that with the AdamW state)\n"
    )
    print(
        markdown_table(
            [
                "case",
                "merge s",
                "vs disk floor",
                "vs terge on safetensors",
                "peak RssAnon MiB",
                "above the floor's (imports) MiB",
            ],
            table,
        )
    )
    print(f"\nterge's DCP-in outputs equal its safetensors-in output bit for bit: {exact}")
    print(f"\n{machine_info()}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "exact": exact}, indent=2) + "\n")


if __name__ == "__main__":
    main()
