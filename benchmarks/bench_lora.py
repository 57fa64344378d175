"""LoRA out benchmark: extracting an adapter from two checkpoints on disk, against its floors.

Run from the repository root::

    python benchmarks/bench_lora.py            # GPT-2 small shapes (124M parameters, ~1 min)
    python benchmarks/bench_lora.py --quick    # tiny shapes, smoke test

Inputs (made once under ``benchmarks/.cache/lora/``): a GPT-2-small-shaped base checkpoint
(:func:`_common.build_gpt2`, random fp32 weights, one ``model.safetensors`` of 475 MiB) and a
"fine-tuned" one whose 48 projection weights (``h.*.attn.c_attn``, ``c_proj``, ``mlp.c_fc``,
``c_proj``; stored ``out x in`` as ``nn.Linear``) moved by full-rank noise, everything else equal.

Every case is a fresh process (``python -c``), timed from spawn to exit, its peak ``RssAnon``
(resident memory not backed by a file, so memory-mapped checkpoint pages do not count) sampled
every ~5 ms from ``/proc/<pid>/status``:

- ``extract_lora``: ``terge.extract_lora(tuned, base, out, rank=R)`` (files read lazily, every
  changed weight factored by a float64 SVD, the adapter written atomically);
- ``SVDs alone``: the same 48 differences read from the same files and factored by
  ``terge.lowrank.factor`` (the float64 thin SVD), freed memory returned after each as
  ``extract_lora`` does, nothing written (the arithmetic floor);
- ``plain copy``: ``terge.load`` of the fine-tuned checkpoint and ``terge.save`` of it (reading
  and writing every tensor once, in memory).

Printed as a markdown table; the figures in notes/loraout-README.md come from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    CACHE_DIR,
    GPT2_SMALL,
    GPT2_TINY,
    SRC_DIR,
    build_gpt2,
    fmt_mib,
    fmt_seconds,
    machine_info,
    markdown_table,
)

EXTRACT = """
import terge, sys
terge.extract_lora(sys.argv[1], sys.argv[2], sys.argv[3], rank=int(sys.argv[4]), overwrite=True)
"""

SVDS = """
import sys, torch, terge
from terge.lowrank import factor
from terge.lora import give_back_memory
tuned, base = terge.open_checkpoint(sys.argv[1]), terge.open_checkpoint(sys.argv[2])
for name in base.names():
    if len(base.info(name).shape) == 2 and name.startswith("h."):
        factor(tuned.view(name).double() - base.view(name).double(), rank=int(sys.argv[4]))
        give_back_memory()
"""

COPY = """
import sys, terge
terge.save(terge.load(sys.argv[1]), sys.argv[3], overwrite=True)
"""


def make_inputs(folder: Path, quick: bool) -> tuple[Path, Path]:
    base_path, tuned_path = folder / "base", folder / "tuned"
    if (base_path / "model.safetensors").exists() and (tuned_path / "model.safetensors").exists():
        return tuned_path, base_path
    sys.path.insert(0, str(SRC_DIR))
    import terge

    model = build_gpt2(GPT2_TINY if quick else GPT2_SMALL, seed=0)
    terge.save(model, base_path, overwrite=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and name.startswith("h."):
                parameter.add_(torch.randn(parameter.shape, generator=generator), alpha=1e-3)
    terge.save(model, tuned_path, overwrite=True)
    return tuned_path, base_path


def run_case(code: str, argv: list[str], threads: int | None) -> tuple[float, float]:
    """Seconds from spawn to exit and the peak RssAnon (MiB) of ``python -c code argv``."""
    environment = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code, *argv], env=environment)
    peak = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"case failed with exit code {process.returncode}")
    return seconds, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--rank", type=int, default=16, help="the adapter's rank (default 16)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the best counts")
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for every case (default: torch's own); 1 keeps LAPACK's threads "
        "from spinning against each other on a busy machine",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()

    folder = CACHE_DIR / ("lora-quick" if args.quick else "lora")
    tuned, base = make_inputs(folder, args.quick)
    out = folder / "out"
    size = (tuned / "model.safetensors").stat().st_size / 2**20
    cases = {"extract_lora": EXTRACT, "SVDs alone": SVDS, "plain copy": COPY}
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in cases}
    for _ in range(args.repeat):  # interleaved, so that a busy spell hits every case alike
        for label, code in cases.items():
            shutil.rmtree(out, ignore_errors=True)
            argv = [str(tuned), str(base), str(out), str(args.rank)]
            runs[label].append(run_case(code, argv, args.threads))
    results = {
        label: {"seconds": min(r[0] for r in got), "rss_anon_mib": max(r[1] for r in got)}
        for label, got in runs.items()
    }
    rows = [
        [label, fmt_seconds(r["seconds"]), fmt_mib(r["rss_anon_mib"])]
        for label, r in results.items()
    ]
    print(
        f"checkpoint: {size:.0f} MiB per model, rank {args.rank}, best of {args.repeat}, "
        f"OMP_NUM_THREADS={args.threads or 'default'}\n"
    )
    print(markdown_table(["case", "time (spawn to exit)", "peak RssAnon"], rows))
    print(f"\nmachine: {machine_info()}")
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "rank": args.rank}, indent=2))


if __name__ == "__main__":
    main()
