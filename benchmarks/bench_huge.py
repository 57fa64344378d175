"""Merges larger than memory: three checkpoints of ``--size`` GB each (9 by default, for a 24 GB
machine), merged from disk by every method, against the disk floor, with peak anonymous memory.

Run from the repository root::

    python benchmarks/bench_huge.py --size 0.2 --methods arithmetic ties   # seconds
    python benchmarks/bench_huge.py                     # 3 x 9 GB: ~27 GB of inputs + 9 GB output
    python benchmarks/bench_huge.py --methods arithmetic ties --clean

Inputs (made once, kept under ``benchmarks/.cache/huge/`` and reused; ``--clean`` removes them at
the end): Llama-shaped bfloat16 checkpoints (hidden 4096, MLP 11008, 2 GB shards; narrower below
2 GB) written shard by shard with terge's own :class:`terge.io.StreamingShardWriter`, so making
them never holds more than one tensor. Each tensor is a slice of a 128 MiB random pool of its model
(different pools, different offsets per tensor): random-looking data made at memory speed.

Cases, each a whole ``python -m terge merge A B C -o OUT --method M --seed 0`` in a fresh process,
inputs evicted from the page cache first (they do not fit in it anyway at 9 GB):

- every method terge names (SLERP interpolates two models: it reads A and B only);
- the disk floor: ``cat`` of the three inputs to ``/dev/null``, ``cp`` of one model, ``sync``
  (what any merge must at least do: read every input once, write one model, flush it).

Memory is the peak ``RssAnon`` of the process tree sampled every 5 ms (pages of memory-mapped
checkpoints and the page cache do not count: they are the kernel's to reclaim) and ``VmHWM``.
The machine is shared: compare ratios measured in the same run, and read the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from _common import (
    CACHE_DIR,
    MIB,
    SRC_DIR,
    command_line,
    fmt_mib,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    markdown_table,
    source_revision,
)
from bench_files import evict, floor_command, rel, run_sampled, shard_files, terge_env

sys.path.insert(0, str(SRC_DIR))
from terge.io import StreamingShardWriter, TensorInfo
from terge.methods import REGISTRY

HUGE_DIR = CACHE_DIR / "huge"
GB = 10**9
POOL_ELEMENTS = 64 << 20  # 128 MiB of bfloat16 per model
SHARD = "2GB"


def shapes(size_gb: float) -> dict[str, tuple[int, ...]]:
    """Llama-shaped tensor names and shapes adding up to about ``size_gb`` GB in bfloat16."""
    hidden, mlp, vocab = (4096, 11008, 32000) if size_gb >= 2 else (1024, 2752, 8000)
    layer = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (hidden, hidden),
        "self_attn.v_proj.weight": (hidden, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (mlp, hidden),
        "mlp.up_proj.weight": (mlp, hidden),
        "mlp.down_proj.weight": (hidden, mlp),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    ends = 2 * vocab * hidden + hidden
    per_layer = sum(math.prod(s) for s in layer.values())
    layers = max(1, round((size_gb * GB / 2 - ends) / per_layer))
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        names.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    names["model.norm.weight"] = (hidden,)
    names["lm_head.weight"] = (vocab, hidden)
    return names


def make_checkpoint(size_gb: float, seed: int, folder: Path) -> Path:
    """The checkpoint for ``size_gb`` and ``seed``, written once, tensor by tensor, and reused."""
    layout = {n: TensorInfo(torch.Size(s), torch.bfloat16) for n, s in shapes(size_gb).items()}
    spec = {"size_gb": size_gb, "seed": seed, "tensors": len(layout), "format": 1}
    marker = folder / "bench_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    print(f"  making {rel(folder)} ...", file=sys.stderr, flush=True)
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_ELEMENTS, generator=generator).mul_(0.02).to(torch.bfloat16)
    config = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}
    with StreamingShardWriter(folder, layout, max_shard_size=SHARD) as writer:
        for number, name in enumerate(layout):
            flat = writer.destination(name).view(-1)
            start = (number * 7919 + seed * 104729) % POOL_ELEMENTS
            done = 0
            while done < flat.numel():
                piece = min(flat.numel() - done, POOL_ELEMENTS - start)
                flat[done : done + piece].copy_(pool[start : start + piece])
                done, start = done + piece, 0
        writer.write_text("config.json", json.dumps(config) + "\n")
        writer.write_text("bench_spec.json", json.dumps(spec) + "\n")
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in shard_files(folder))


def run(cmd: list[str], env: dict[str, str], inputs: list[Path], out: Path) -> dict[str, Any]:
    """One cold run of ``cmd`` (no output folder, inputs evicted), sampled for memory."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    evict([f for folder in inputs for f in shard_files(folder)])
    result = run_sampled(cmd, env)
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}: {result.output_tail.strip()[-400:]}"}
    print(
        f"    {result.seconds:.2f} s, RssAnon peak {result.anon_peak_mib:.0f} MiB",
        file=sys.stderr,
        flush=True,
    )
    return {
        "seconds": result.seconds,
        "anon_peak_mib": result.anon_peak_mib,
        "hwm_mib": result.hwm_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=9.0, help="GB per checkpoint (default 9)")
    parser.add_argument("--methods", nargs="+", default=list(REGISTRY), choices=list(REGISTRY))
    parser.add_argument("--clean", action="store_true", help="remove the inputs at the end")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the floor and every method this many times, in turn, and keep each case's best "
        "(a cloud disk's throughput drifts: each round measures its own floor)",
    )
    args = parser.parse_args()

    HUGE_DIR.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(HUGE_DIR).free
    cached = all((HUGE_DIR / f"{args.size:g}GB-{s}" / "bench_spec.json").exists() for s in range(3))
    needed = (1 if cached else 4) * args.size * GB * 1.05  # the inputs, one output at a time
    if free < needed:
        sys.exit(f"needs about {needed / GB:.1f} GB of free disk; {free / GB:.1f} GB free")
    inputs = [make_checkpoint(args.size, s, HUGE_DIR / f"{args.size:g}GB-{s}") for s in range(3)]
    out = HUGE_DIR / "out"
    machine = machine_info()
    results: dict[str, Any] = {}
    every: dict[str, list[dict[str, Any]]] = {}
    for round_number in range(args.rounds):
        print(f"  round {round_number + 1}: the disk floor", file=sys.stderr, flush=True)
        every.setdefault("floor", []).append(
            run(floor_command(inputs, out), dict(os.environ), inputs, out)
        )
        for method in args.methods:
            used = inputs[:2] if method == "slerp" else inputs
            cmd = [sys.executable, "-m", "terge", "merge", *map(rel, used), "-o", rel(out)]
            cmd += ["--method", method, "--seed", "0", "--overwrite", "--quiet"]
            print(f"  round {round_number + 1}: {method}", file=sys.stderr, flush=True)
            every.setdefault(method, []).append(run(cmd, terge_env(), used, out))
    for key, runs in every.items():
        timed = [r for r in runs if "seconds" in r]
        results[key] = min(timed, key=lambda r: r["seconds"]) if timed else runs[0]
        if len(timed) > 1:
            results[key] = {**results[key], "all_seconds": [r["seconds"] for r in timed]}
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.clean:
        shutil.rmtree(HUGE_DIR, ignore_errors=True)

    floor = results["floor"].get("seconds")
    rows = []
    for key, result in results.items():
        label = "disk floor (cat 3 inputs, cp 1, sync)" if key == "floor" else f"terge {key}"
        if key == "slerp":
            label += " (reads 2 inputs)"
        if "error" in result:
            rows.append([label, result["error"][:80], "", "", ""])
            continue
        ratio = None if not floor else result["seconds"] / floor
        rows.append(
            [
                label,
                fmt_seconds(result["seconds"]),
                fmt_ratio(ratio),
                fmt_mib(result["anon_peak_mib"]),
                fmt_mib(result["hwm_mib"]),
            ]
        )
    size = folder_bytes(inputs[0]) / MIB if not args.clean else args.size * GB / MIB
    print(f"## bench_huge: 3 checkpoints of {size:,.0f} MiB (bfloat16), merged from disk\n")
    print(f"`{command_line()}` at {source_revision()}; {machine['cpu']}, {machine['nproc']} ")
    print(
        f"cores, {machine['memory_gib']} GiB memory; load average before "
        f"{machine['load_average']}, after {machine['load_average_after']}.\n"
    )
    if args.rounds > 1:
        print(f"Best of {args.rounds} rounds; every round ran the floor first, then each method.\n")
    headers = ["case", "seconds", "vs disk floor", "peak RssAnon MiB", "VmHWM MiB"]
    print(markdown_table(headers, rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
