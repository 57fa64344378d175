"""What DELLA cannot go below (the one operation its definition needs on every entry), what PCB
no longer pays, timed alone and set against ``arithmetic`` in the same process.

Run from the repository root::

    python benchmarks/bench_floors.py              # GPT-2 small x 3 (a minute or two)
    python benchmarks/bench_floors.py --quick      # tiny models, smoke test

``bench_methods.py`` times every method against ``arithmetic``; for two of them the ratio stays
far above 3x, and this script measures why, on the same models (three GPT-2-small-shaped fp32
modules, base ``models[0]``, so two task vectors ``tau_i = theta_i - base``):

- **DELLA** keeps entry ``j`` of a row with a probability set by its *rank* by magnitude in the
  row, and divides the kept entries by that probability, so each kept entry needs its exact
  rank: ranking every row is a sort of every row. The floor is numpy's row sort
  (``numpy.sort(keys, axis=1)``; on AVX-512 machines Intel's x86-simd-sort, the fastest sort we
  know of) of the task vectors' magnitude bit patterns, alone: the keys are computed before the
  clock starts, and the rows are split between as many threads as torch uses.
- **PCB** scores every entry of every task vector with an ``exp`` (intra-balancing) and a
  ``tanh`` (inter-balancing) in float64, the bits of which are torch's. Timed alone:
  ``torch.exp_`` and ``torch.tanh_`` on float64 copies of the task vectors (torch's own
  threads). It was PCB's floor until its compiled loop learned to screen: a balance provably
  below the threshold it is compared with is never computed, so about a tenth of these calls
  are made. PCB reads the inputs three times (the clipping bounds, the balances' counts, the
  merge): three read floors are what it cannot go below.
- the read floor: one read of the base and the models (``torch.sum`` of each tensor). A method
  that must find exact thresholds before it merges (TIES, breadcrumbs, SCE) reads them at least
  twice.

``arithmetic`` (``terge.merge(models, method="arithmetic", inplace=True)``, the base restored
before each call) and the floors are timed in turns, best of ``--repeat``; DELLA and PCB
themselves too (PCB once: it takes seconds). Needs numpy for the DELLA floor (it comes with the
test extra's dependencies); without it that row says so. The script always exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from _common import (
    GPT2_SMALL,
    GPT2_TINY,
    build_models,
    command_line,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    markdown_table,
    num_parameters,
    source_revision,
)


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows DELLA ranks within (as ``terge.families.elementwise._rows``)."""
    return tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    import terge

    machine = machine_info()
    config = GPT2_TINY if args.quick else GPT2_SMALL
    models = build_models(3, config)
    base = models[0]
    pristine = [p.detach().clone() for p in base.parameters()]
    names = [name for name, _ in base.named_parameters()]
    others = [dict(m.named_parameters()) for m in models[1:]]
    with torch.no_grad():
        deltas = [
            [(other[name].double() - saved.double()) for name, saved in zip(names, pristine)]
            for other in others
        ]

    def restore() -> None:
        with torch.no_grad():
            for parameter, saved in zip(base.parameters(), pristine, strict=True):
                parameter.copy_(saved)

    def arithmetic() -> float:
        restore()
        return _timed(lambda: terge.merge(models, method="arithmetic", inplace=True))

    def method(name: str) -> float:
        restore()
        return _timed(lambda: terge.merge(models, method=name, seed=0, inplace=True))

    threads = torch.get_num_threads()
    try:
        import numpy as np
    except ImportError:  # the DELLA floor needs numpy's sort
        np = None
    keys = []
    if np is not None:  # magnitude bit patterns, as terge ranks them (no NaN in these models)
        for model_deltas in deltas:
            for delta in model_deltas:
                rows = _rows(delta.abs())
                keys.append(rows.contiguous().view(torch.int64).numpy())

    def sort_floor() -> float:
        # each array's rows cut into as many parts as torch has threads, sorted in a pool of
        # that many (numpy lets go of the GIL while it sorts)
        copies = [k.copy() for k in keys]  # sorted in place below: fresh each time
        parts = [part for rows in copies for part in np.array_split(rows, threads)]
        with ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            list(pool.map(lambda part: part.sort(axis=1), parts))
            return time.perf_counter() - start

    def exp_tanh_floor() -> float:
        copies = [[d.clone() for d in model_deltas] for model_deltas in deltas]
        start = time.perf_counter()
        for model_deltas in copies:
            for delta in model_deltas:
                delta.exp_()
        for model_deltas in copies:
            for delta in model_deltas:
                delta.tanh_()
        return time.perf_counter() - start

    def read_floor() -> float:
        tensors = [p for m in models for p in m.parameters()]
        return _timed(lambda: [t.sum() for t in tensors])

    cases: dict[str, Callable[[], float]] = {
        "arithmetic": arithmetic,
        "read floor": read_floor,
        "della": lambda: method("della"),
        "della floor": sort_floor if np is not None else (lambda: float("nan")),
        "pcb floor": exp_tanh_floor,
    }
    timings: dict[str, list[float]] = {name: [] for name in cases}
    arithmetic()  # warm-up
    for _ in range(args.repeat):
        for name, case in cases.items():
            print(f"  {name} ...", file=sys.stderr, flush=True)
            timings[name].append(case())
    print("  pcb ...", file=sys.stderr, flush=True)
    timings["pcb"] = [method("pcb")]
    return {
        "machine": machine,
        "command": command_line(),
        "revision": source_revision(),
        "parameters": num_parameters(config),
        "threads": threads,
        "numpy": None if np is None else np.__version__,
        "repeat": args.repeat,
        "seconds": {name: min(values) for name, values in timings.items()},
    }


def report(data: dict[str, Any]) -> str:
    seconds = data["seconds"]
    reference = seconds["arithmetic"]
    described = {
        "arithmetic": "`terge.merge(method='arithmetic')`: the reference",
        "read floor": "one read of the base and the models (`torch.sum` of each tensor)",
        "della": "`terge.merge(method='della')`",
        "della floor": (
            "numpy's row sort of the task vectors' magnitude bits alone, on "
            f"{data['threads']} threads (numpy {data['numpy']})"
            if data["numpy"]
            else "not measured: numpy is not installed"
        ),
        "pcb": "`terge.merge(method='pcb')` (one call)",
        "pcb floor": (
            "`exp_` and `tanh_` of the float64 task vectors alone (torch's threads): every one, "
            "which PCB's screen now avoids for about nine in ten"
        ),
    }
    order = ["arithmetic", "read floor", "della", "della floor", "pcb", "pcb floor"]
    rows = [
        [
            name,
            described[name],
            fmt_seconds(seconds[name]),
            fmt_ratio(seconds[name] / reference if seconds[name] == seconds[name] else None),
        ]
        for name in order
    ]
    m = data["machine"]
    return "\n".join(
        [
            f"# terge method floors — {m['date']}",
            "",
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, torch {m['torch']} "
            f"({data['threads']} threads); load average before the run: {m['load_average']}. "
            f"Command: `{data['command']}`; terge at {data['revision']}. Three GPT-2-shaped fp32 "
            f"models ({data['parameters'] / 1e6:.1f}M parameters each), base models[0]; best of "
            f"{data['repeat']}, the cases in turns.",
            "",
            markdown_table(["case", "what is timed", "time (s)", "relative to arithmetic"], rows),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="turns (best of)")
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    args = parser.parse_args(argv)
    args.repeat = max(args.repeat, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    print(report(run(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
