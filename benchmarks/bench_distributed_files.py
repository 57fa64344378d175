"""A distributed file merge on 1, 2 and 3 processes (``torchrun ... -m terge merge``), against the
cost model: the bytes each rank reads and writes, and the disk's measured bandwidths.

Run from the repository root::

    python benchmarks/bench_distributed_files.py --size 0.1     # seconds
    python benchmarks/bench_distributed_files.py                # 3 x 1 GB inputs, 200 MB shards

Inputs: three ``--size`` GB bfloat16 checkpoints made by ``bench_huge.py`` (cached under
``benchmarks/.cache/huge/``). Each case is the README's recipe on one node::

    torchrun --nproc-per-node N -m terge merge A B C -o OUT --seed 0 --max-shard-size 200MB

with the inputs evicted from the page cache first. Every output is hashed and compared with the
one-process output: the files must be the same bytes.

The cost model: rank ``r`` reads ``R_r`` bytes (every input's copy of each tensor of its shards)
and writes ``W_r`` (its shards). Where every rank has its own disk bandwidth (separate nodes on a
parallel filesystem), a merge takes ``max_r (R_r / B_read + W_r / B_write)`` plus start-up;
where the ranks share one disk (this machine), ``sum_r R_r / B_read + sum_r W_r / B_write``: more
processes cannot beat one disk. ``B_read`` and ``B_write`` are measured in the same run (``cat``
of the inputs, ``cp`` of one model and ``sync``); start-up is ``terge merge --help``'s time, and
N processes on C < N cores start in N / C times that (each imports torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    MIB,
    SRC_DIR,
    command_line,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    markdown_table,
    source_revision,
)
from bench_files import evict, rel, shard_files, terge_env
from bench_huge import HUGE_DIR, make_checkpoint

sys.path.insert(0, str(SRC_DIR))
from terge.io import open_checkpoint
from terge.io.writing import shard_owners

SHARD = "200MB"


def per_rank_bytes(output: Path, inputs: int, world: int) -> list[tuple[int, int]]:
    """``(read, written)`` bytes of each rank: every input's copy of each tensor it writes, the
    shards laid out and shared out as the merge did (from the output's own header and index)."""
    index = json.loads((output / "model.safetensors.index.json").read_text())["weight_map"]
    with open_checkpoint(output) as reader:
        layout = {name: reader.info(name) for name in index}
    files = sorted(set(index.values()))
    groups = [[name for name in layout if index[name] == file] for file in files]
    owners = shard_owners(groups, layout, world)
    totals = [(0, 0)] * world
    for group, owner in zip(groups, owners, strict=True):
        size = sum(layout[name].nbytes for name in group)
        read, written = totals[owner]
        totals[owner] = (read + inputs * size, written + size)
    return totals


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-600:]}")
    return time.perf_counter() - start


def cold(inputs: list[Path], out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    evict([f for folder in inputs for f in shard_files(folder)])


def digest(folder: Path) -> str:
    hashed = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        hashed.update(path.name.encode())
        with open(path, "rb") as file:
            while chunk := file.read(1 << 24):
                hashed.update(chunk)
    return hashed.hexdigest()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=1.0, help="GB per checkpoint (default 1)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max-shard-size", default=SHARD)
    args = parser.parse_args()

    inputs = [make_checkpoint(args.size, s, HUGE_DIR / f"{args.size:g}GB-{s}") for s in range(3)]
    out = HUGE_DIR / "out-distributed"
    env = terge_env()
    machine = machine_info()
    cores = os.cpu_count() or 1
    model_bytes = sum(f.stat().st_size for f in shard_files(inputs[0]))

    cold(inputs, out)  # the disk's bandwidths, in this run
    read_s = timed(["sh", "-c", f"cat {' '.join(f'{rel(p)}/*.safetensors' for p in inputs)}"
                    " > /dev/null"], dict(os.environ))  # fmt: skip
    out.mkdir()
    write_s = timed(["sh", "-c", f"cp {rel(inputs[0])}/*.safetensors {rel(out)}/ && sync"],
                    dict(os.environ))  # fmt: skip
    shutil.rmtree(out)
    b_read, b_write = 3 * model_bytes / read_s, model_bytes / write_s
    startup = timed([sys.executable, "-m", "terge", "merge", "--help"], env)

    rows, reference = [], None
    for world in args.processes:
        merge = ["-m", "terge", "merge", *map(rel, inputs), "-o", rel(out), "--seed", "0", "-q"]
        merge += ["--max-shard-size", args.max_shard_size]
        if world == 1:
            cmd = [sys.executable, *merge]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
            cmd += ["--master-port", str(free_port()), *merge]
        cold(inputs, out)
        print(f"  {world} process(es) ...", file=sys.stderr, flush=True)
        seconds = timed(cmd, env)
        same = digest(out)
        reference = reference or same
        totals = per_rank_bytes(out, len(inputs), world)
        shutil.rmtree(out)
        start = startup * max(1.0, world / cores)  # every process imports torch
        shared = start + sum(r for r, _ in totals) / b_read + sum(w for _, w in totals) / b_write
        own = startup + max(r / b_read + w / b_write for r, w in totals)
        rows.append(
            [
                world,
                fmt_seconds(seconds),
                " / ".join(f"{r / MIB:,.0f}" for r, _ in totals),
                " / ".join(f"{w / MIB:,.0f}" for _, w in totals),
                fmt_seconds(shared),
                fmt_ratio(seconds / shared),
                fmt_seconds(own),
                "yes" if same == reference else "NO",
            ]
        )
    print(
        f"## bench_distributed_files: 3 x {model_bytes / MIB:,.0f} MiB, shards of "
        f"{args.max_shard_size}\n\n`{command_line()}` at {source_revision()}; {machine['cpu']}, "
        f"{cores} cores; load average {machine['load_average']}; measured B_read "
        f"{b_read / MIB:,.0f} MiB/s, B_write {b_write / MIB:,.0f} MiB/s, start-up {startup:.1f} s "
        "(one process; N processes on fewer cores start in N / cores times that).\n"
    )
    headers = [
        "processes",
        "seconds",
        "MiB read per rank",
        "MiB written per rank",
        "model: one disk, these cores (s)",
        "measured / model",
        "model: a disk and node per rank (s)",
        "same bytes as 1 process",
    ]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
