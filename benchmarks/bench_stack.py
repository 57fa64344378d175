"""Stacking benchmark: ``terge stack`` on GPT-2 checkpoints against a plain copy of the bytes.

Run from the repository root::

    python benchmarks/bench_stack.py                    # GPT-2 small (a minute or two)
    python benchmarks/bench_stack.py --quick            # tiny checkpoints, smoke test

Inputs are ``bench_files.py``'s GPT-2 small checkpoints (124M parameters, 475 MiB of float32 in 3
safetensors shards, made once under ``benchmarks/.cache/files/``). Two cases, each a whole command
in a fresh process (start-up included), inputs evicted from the page cache before every run
(unless ``--warm``), best of ``--repeat``:

- depth up-scaling, 12 blocks -> 18: ``terge stack A:0:9 A:3:12 -o OUT``;
- a frankenmerge with a merged middle: ``terge stack A:0:4 A:4:8+B:4:8 B:8:12 -o OUT`` (blocks 4-7
  the float64 mean of A's and B's, rounded once).

The floor for each is a shell command that reads every input shard (``cat`` to /dev/null) and
writes as many bytes as terge's output holds (``cp`` of A's shards, topped up with ``head -c``
from them, or cut to size), then ``sync``\\ s them, as terge's writer fsyncs before its rename.
Memory: the peak ``RssAnon`` of the process tree (memory-mapped checkpoint pages do not count).
Exactness: the DUS output is compared with the blocks copied by hand from A, bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from _common import (
    MIB,
    command_line,
    fmt_mib,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    markdown_table,
    source_revision,
)
from bench_files import (
    FILES_DIR,
    SMALL,
    SMALL_QUICK,
    checkpoint,
    evict,
    folder_bytes,
    load_folder,
    rel,
    run_case,
    shard_files,
    terge_env,
)

OUT_DIR = FILES_DIR / "stack-out"
_API_SCRIPT = """
import json, sys, time
import terge
from terge.cli.stacking import parse_slice
*slices, out = sys.argv[1:]
started = time.perf_counter()
terge.stack([parse_slice(s) for s in slices], out=out, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def run_api(slices: list[str], inputs: list[Path], out: Path, args: argparse.Namespace) -> float:
    """``terge.stack(out=...)`` timed inside a Python that has imported terge: start-up excluded,
    inputs cold as for the command."""
    times = []
    for _ in range(args.repeat):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        if not args.warm:
            evict([f for folder in inputs for f in shard_files(folder)])
        done = subprocess.run(
            [sys.executable, "-c", _API_SCRIPT, *slices, rel(out)],
            env=terge_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        times.append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
        print(f"    in Python: {times[-1]:.2f} s", file=sys.stderr, flush=True)
    return min(times)


QUICK = dataclasses.replace(SMALL_QUICK, n_layer=4)


def floor_command(inputs: list[Path], out: Path, size: int) -> list[str]:
    """Read every input shard, write ``size`` bytes (copies of A's shards, topped up or cut)."""
    reads = " ".join(shlex.quote(rel(folder)) + "/*.safetensors" for folder in inputs)
    shards = shard_files(inputs[0])
    have = sum(f.stat().st_size for f in shards)
    o = shlex.quote(rel(out))
    first = shlex.quote(rel(shards[0]))
    if size >= have:
        copies = " ".join(shlex.quote(rel(f)) for f in shards)
        write = f"cp {copies} {o}/ && head -c {size - have} {first} > {o}/extra"
    else:
        write = f"cat {' '.join(shlex.quote(rel(f)) for f in shards)} | head -c {size} > {o}/all"
    return ["sh", "-c", f"cat {reads} > /dev/null && mkdir {o} && {write} && sync {o}/*"]


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    config = QUICK if args.quick else SMALL
    tag = "stack-quick" if args.quick else "small"
    a = checkpoint(config, 0, FILES_DIR / f"{tag}-0")
    b = checkpoint(config, 1, FILES_DIR / f"{tag}-1")
    n = config.n_layer
    skip, third = n // 4, n // 3  # GPT-2 small: 0:9 + 3:12 (18 blocks); 0:4, 4:8 merged, 8:12
    cases = {
        f"depth up-scaling {n} -> {2 * (n - skip)} blocks": [
            f"{rel(a)}:0:{n - skip}",
            f"{rel(a)}:{skip}:{n}",
        ],
        f"frankenmerge, blocks {third}-{2 * third - 1} merged": [
            f"{rel(a)}:0:{third}",
            f"{rel(a)}:{third}:{2 * third}+{rel(b)}:{third}:{2 * third}",
            f"{rel(b)}:{2 * third}:{n}",
        ],
    }
    results: dict[str, Any] = {}
    for (name, slices), inputs in zip(cases.items(), ([a], [a, b])):
        out = OUT_DIR / name.split()[0].rstrip(",")
        cmd = [sys.executable, "-m", "terge", "stack", *slices, "-o", rel(out)]
        terge = run_case(
            f"terge ({name})", [*cmd, "--overwrite", "--quiet"], terge_env(), inputs, out, args
        )
        size = folder_bytes(out) if "error" not in terge else 0
        if "error" not in terge:
            terge["api_seconds"] = run_api(slices, inputs, out, args)
        exact = None
        if "error" not in terge and name.startswith("depth"):
            exact = check_dus(a, out, n - skip, skip, n)
        floor_out = OUT_DIR / (out.name + "-floor")
        floor = run_case(
            f"floor ({name})", floor_command(inputs, floor_out, size), {}, inputs, floor_out, args
        )
        shutil.rmtree(floor_out, ignore_errors=True)
        results[name] = {"terge": terge, "floor": floor, "bytes": size, "bit_exact": exact}
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    return {
        "model": config.label,
        "parameters": config.parameters,
        "input_bytes": folder_bytes(a),
        "results": results,
        "machine": machine_info(),
        "revision": source_revision(),
        "command": command_line(),
    }


def check_dus(a: Path, out: Path, stop: int, start: int, n: int) -> bool:
    """Whether the DUS output is A's blocks 0..stop-1 then start..n-1, and A's other tensors."""
    source, written = load_folder(a), load_folder(out)
    order = [*range(stop), *range(start, n)]
    expected = {k: v for k, v in source.items() if ".h." not in k}
    for i, j in enumerate(order):
        for name, tensor in source.items():
            if name.startswith(f"transformer.h.{j}."):
                expected[name.replace(f".h.{j}.", f".h.{i}.", 1)] = tensor
    return expected.keys() == written.keys() and all(
        torch.equal(expected[k], written[k]) for k in expected
    )


def report(data: dict[str, Any]) -> str:
    rows = []
    for name, result in data["results"].items():
        terge, floor = result["terge"], result["floor"]
        if "error" in terge:
            rows.append([name, terge["error"], "", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                f"{result['bytes'] / MIB:.0f} MiB",
                fmt_seconds(terge["seconds"]),
                fmt_seconds(terge.get("api_seconds")),
                fmt_seconds(floor.get("seconds")),
                fmt_ratio(terge["seconds"] / floor["seconds"] if floor.get("seconds") else None),
                fmt_mib(terge["anon_peak_mib"]),
            ]
        )
    lines = [
        f"# terge stack: {data['model']} ({data['parameters'] / 1e6:.0f}M parameters, "
        f"{data['input_bytes'] / MIB:.0f} MiB per input)",
        "",
        markdown_table(
            [
                "case",
                "written",
                "terge stack (s)",
                "terge.stack() in Python (s)",
                "copy floor (s)",
                "command / floor",
                "RssAnon peak (MiB)",
            ],
            rows,
        ),
        "",
    ]
    for name, result in data["results"].items():
        if result["bit_exact"] is not None:
            verdict = "PASS" if result["bit_exact"] else "FAIL"
            lines.append(f"- {verdict}: {name} equals A's blocks copied by hand, bit for bit")
    machine = ", ".join(f"{k} {v}" for k, v in data["machine"].items())
    lines.append(f"\n`{data['command']}` at {data['revision']}; {machine}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (best of)")
    parser.add_argument("--quick", action="store_true", help="tiny checkpoints (smoke test)")
    parser.add_argument("--warm", action="store_true", help="keep inputs in the page cache")
    args = parser.parse_args(argv)
    args.repeat = max(args.repeat, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    print(report(run_benchmark(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
