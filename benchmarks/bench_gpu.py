"""GPU benchmark: arithmetic in place on three bf16 Llama-2-7B-shaped models on one CUDA GPU.

Run from the repository root on a machine with a CUDA GPU and about 45 GB of free GPU memory::

    python benchmarks/bench_gpu.py                 # 3 x 6.7B bf16 models (40 GB of inputs)
    python benchmarks/bench_gpu.py --layers 4      # smaller, smoke test
    python benchmarks/bench_gpu.py --json results.json

The models have Llama-2-7B's shapes (vocabulary 32000, hidden 4096, 32 layers, MLP 11008, untied
head), filled with random numbers on the GPU. Measured in the same process:

- the GPU's copy bandwidth: one 4 GiB ``copy_`` between two device tensors, bytes read plus
  bytes written, best of ten (the issue's yardstick);
- the same bytes copied tensor by tensor (model 2 into model 1, model 1 into model 0: two
  models read and two written, the bytes a merge of three moves), so per-launch costs count too;
- ``terge.merge(models, inplace=True)``: its first call in the process (Triton's compilation
  included), then the best of ``--repeat``; its bandwidth counts three models read and one
  written;
- where that time goes: the Triton kernel launched directly over the same tensors, one launch
  per tensor and one launch for all of them (as ``merge()`` batches a GPU merge's tensors),
  and the merge with its launches skipped (terge's own Python: sources, plan, dispatch);
- the same with ``TERGE_KERNELS=torch`` (the reference loop of chunked torch ops);
- terge 0.1.1, when its folder is given with ``--terge-011`` (``pip install --no-deps --target
  DIR terge==0.1.1``; ``_common.install_terge_011`` does this on a machine with PyPI).

``--profile`` also prints torch.profiler's table for one warm merge. Every timing brackets the
work with ``torch.cuda.synchronize()``. The script exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import terge
from _common import LlamaShaped, command_line, machine_info, markdown_table

TARGET = 0.80
"""The merge's bandwidth must reach this share of the copy bandwidth."""


def build(layers: int, seed: int, device: torch.device) -> nn.Module:
    with torch.device("meta"):
        model = LlamaShaped(layers, vocab=32000, hidden=4096, mlp=11008, kv=4096)
        model = model.to(torch.bfloat16)
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    return model


def timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def best(fn: Callable[[], Any], repeat: int) -> float:
    return min(timed(fn) for _ in range(max(1, repeat)))


def copy_bandwidth(device: torch.device, gib: int = 4) -> float:
    """Bytes read plus written per second by one large device-to-device copy, best of ten."""
    source = torch.empty(gib << 29, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    moved = 2 * source.numel() * source.element_size()
    target.copy_(source)
    seconds = best(lambda: target.copy_(source), 10)
    return moved / seconds


def load_terge_011(folder: Path) -> Any:
    """terge 0.1.1 imported from its install folder as ``terge011`` (beside this checkout's)."""
    spec = importlib.util.spec_from_file_location(
        "terge011", folder / "terge" / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["terge011"] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="transformer blocks (default 32)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--terge-011", type=Path, help="folder holding terge 0.1.1")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler's table of one warm merge (CPU and CUDA time per op), "
        "to see what the Python between kernels waits for",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA device: nothing to measure.")
        return 0
    device = torch.device("cuda")
    machine = machine_info()
    machine["gpu"] = torch.cuda.get_device_name(device)
    loop = terge.kernels.gpu_loop()
    machine["triton"] = getattr(sys.modules.get("triton"), "__version__", None)

    bandwidth = copy_bandwidth(device)
    models = [build(args.layers, seed, device) for seed in range(3)]
    parameters = sum(p.numel() for p in models[0].parameters())
    model_bytes = parameters * 2
    moved = 4 * model_bytes  # read three models, write one
    triples = list(zip(*(list(m.parameters()) for m in models)))

    def copy_same_bytes() -> None:
        for p0, p1, p2 in triples:
            p1.data.copy_(p2.data)
            p0.data.copy_(p1.data)

    def merge() -> None:
        terge.merge(models, inplace=True)

    rows: list[dict[str, Any]] = []

    def record(case: str, seconds: float) -> None:
        rows.append(
            {
                "case": case,
                "seconds": seconds,
                "bandwidth_gbs": moved / seconds / 1e9,
                "share_of_copy": moved / seconds / bandwidth,
            }
        )

    first = timed(merge)
    copy_tensorwise = best(copy_same_bytes, args.repeat)
    warm = best(merge, args.repeat)
    record("copy of the same bytes, tensor by tensor", copy_tensorwise)
    record("terge in place, first call (Triton compiles)", first)
    record("terge in place", warm)
    if loop is not None:  # where the time goes: the kernels alone, and terge's Python alone
        flats = [[p.data.view(-1) for p in triple] for triple in triples]
        record(
            "Triton kernels alone, tensor by tensor",
            best(lambda: [loop.combine(f[0], f, (1.0, 1.0, 1.0), 3.0) for f in flats], args.repeat),
        )
        tables = loop.batch([f[0] for f in flats], flats)
        record(
            "Triton kernel alone, every tensor in one launch",
            best(lambda: loop.combine_many(tables, (1.0, 1.0, 1.0), 3.0), args.repeat),
        )
        launch, launch_many = loop.combine, loop.combine_many
        loop.combine = loop.combine_many = lambda *_: None
        try:
            record("terge in place, kernels skipped (Python only)", best(merge, args.repeat))
        finally:
            loop.combine, loop.combine_many = launch, launch_many
    os.environ["TERGE_KERNELS"] = "torch"
    try:
        record("terge in place, reference torch loop", best(merge, min(args.repeat, 2)))
    finally:
        del os.environ["TERGE_KERNELS"]
    if args.terge_011 is not None:
        old = load_terge_011(args.terge_011)
        record("terge 0.1.1 in place", best(lambda: old.merge(models, inplace=True), 1))

    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            timed(merge)
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

    share = moved / warm / bandwidth
    status = "PASS" if share >= TARGET else "FAIL"
    print(f"# terge GPU benchmark — {machine['date']}")
    print()
    print(
        f"GPU: {machine['gpu']}; torch {machine['torch']}, Triton {machine['triton']}, "
        f"Triton loop: {loop is not None}. Command: `{command_line()}`"
    )
    print()
    print(
        f"3 bf16 models of {parameters / 1e9:.2f}B parameters ({model_bytes / 2**30:.1f} GiB "
        f"each), arithmetic mean in place, best of {args.repeat}. Copy bandwidth (one 4 GiB "
        f"device copy, read + written): **{bandwidth / 1e9:.0f} GB/s**."
    )
    print()
    print(
        markdown_table(
            ["case", "time (s)", "bandwidth (GB/s)", "share of copy bandwidth"],
            [
                [
                    r["case"],
                    f"{r['seconds']:.4f}",
                    f"{r['bandwidth_gbs']:.0f}",
                    f"{100 * r['share_of_copy']:.0f}%",
                ]
                for r in rows
            ],
        )
    )
    print()
    print(f"- {status}: in place ≥{TARGET:.0%} of the copy bandwidth (measured: {share:.0%})")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "parameters": parameters,
                    "copy_bandwidth_gbs": bandwidth / 1e9,
                    "rows": rows,
                    "share": share,
                    "pass": share >= TARGET,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
