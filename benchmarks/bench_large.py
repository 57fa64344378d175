"""Large-model benchmark: arithmetic in place on three ~1.1B-parameter fp32 models (~13 GB).

Run from the repository root (needs about 14 GB of free memory; takes a few minutes, most of it
filling the models with random numbers)::

    python benchmarks/bench_large.py
    python benchmarks/bench_large.py --quick      # 8 layers instead of 22, smoke test
    python benchmarks/bench_large.py --dtype bfloat16   # the models in bfloat16 (~6.6 GB)

The models have TinyLlama-1.1B's shapes (vocabulary 32000, hidden 2048, 22 layers, MLP 5632,
4 key/value heads, untied head). The copy limit is measured in the same process on the same
tensors: every parameter of model 2 copied into model 1 and of model 1 into model 0, which reads
two models and writes two, the same bytes as reading three and writing one. Copies and merges
alternate, best of ``--repeat`` each; the merge is ``terge.merge(models, inplace=True)``, so its
inputs are the copies' outputs (the values do not change the time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import terge
from _common import LlamaShaped, command_line, machine_info

TARGET = 1.2


def build(layers: int, seed: int, dtype: torch.dtype) -> LlamaShaped:
    with torch.device("meta"):
        model = LlamaShaped(layers, vocab=32000, hidden=2048, mlp=5632, kv=256)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.05, 0.05, generator=generator)
    return model


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 layers (~0.5B parameters)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="the models'"
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    machine = machine_info()
    layers = 8 if args.quick else 22
    models = [build(layers, seed, dtype) for seed in range(3)]
    parameters = sum(p.numel() for p in models[0].parameters())
    triples = list(zip(*(list(m.parameters()) for m in models)))

    def copy() -> None:
        for p0, p1, p2 in triples:
            p1.data.copy_(p2.data)
            p0.data.copy_(p1.data)

    def merge() -> None:
        terge.merge(models, inplace=True)

    first = best(merge, 1)  # the first call in this process
    copy_times, merge_times = [], []
    for _ in range(max(1, args.repeat)):
        copy_times.append(best(copy, 1))
        merge_times.append(best(merge, 1))
    limit, merged = min(copy_times), min(merge_times)
    gib = parameters * itemsize / 2**30
    ratio = merged / limit
    print(f"# terge large-model benchmark — {machine['date']}")
    print()
    print(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory_gib']} GiB RAM, "
        f"torch {machine['torch']}; compiled loop: {terge.kernels.fastloop.available()}. "
        f"Command: `{command_line()}`"
    )
    print()
    print(
        f"3 {args.dtype} models of {parameters / 1e9:.2f}B parameters ({gib:.1f} GiB each, "
        f"{3 * gib:.1f} GiB of inputs), arithmetic mean in place, best of {args.repeat}:"
    )
    print()
    print("| case | time (s) | vs copy limit | effective bandwidth (GB/s) |")
    print("|---|---|---|---|")
    moved = 4 * parameters * itemsize / 1e9  # read 3 models, write 1
    for label, seconds in (
        ("copy limit (same bytes)", limit),
        ("terge in place, first call", first),
        ("terge in place", merged),
    ):
        print(f"| {label} | {seconds:.3f} | {seconds / limit:.2f}x | {moved / seconds:.1f} |")
    print()
    status = "PASS" if ratio <= TARGET else "FAIL"
    print(f"- {status}: in place ≤{TARGET:g}x the copy limit (measured: {ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
