"""Merge-method benchmark: every method of ``terge.methods.REGISTRY`` on GPT-2-small-shaped models.

Run from the repository root::

    python benchmarks/bench_methods.py             # full run (GPT-2 small x 3, a few minutes)
    python benchmarks/bench_methods.py --quick     # tiny models, smoke test
    python benchmarks/bench_methods.py --repeat 5 --json results.json

Each method runs in its own fresh subprocess (this checkout's ``src/`` on ``PYTHONPATH``) so that
its peak memory is clean. There it merges GPT-2-small-shaped fp32 modules (124M parameters each,
built by ``_common.build_models``) with ``terge.merge(models, method=NAME, seed=0, inplace=True)``,
base ``models[0]``:

- three models for every method (so the task-vector methods and ``model_stock`` get two task
  vectors), except ``slerp`` and ``nuslerp``, which take exactly two models, and ``nearswap``,
  one model and the base;
- one untimed warm-up call, then ``--repeat`` measured calls; the base's weights are restored from
  a pristine copy before every call (outside the timing), so each call merges the same inputs
  (an in-place merge otherwise moves the base towards the others call after call);
- time is the best of the measured calls; extra peak memory is ``VmHWM`` during the call minus
  ``VmRSS`` just before it (``_common.measure``), the worst of the measured calls;
- with ``--paired``, ``arithmetic`` on the same models is timed right after each call of the
  method, in the same process, and the report adds that ratio (best against best): the drift of
  a shared machine between processes cancels out;
- the report says whether the compiled CPU loops were built and used
  (``terge.kernels._fastloop`` for the linear methods, ``terge.kernels._fastmethods`` for the
  task-vector ones; ``TERGE_KERNELS=torch`` measures the plain-torch reference instead).

The script always exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _common import (
    GPT2_SMALL,
    GPT2_TINY,
    MIB,
    SRC_DIR,
    Measurement,
    build_models,
    command_line,
    emit_result,
    fmt_mib,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    markdown_table,
    measure,
    num_parameters,
    run_worker,
    source_revision,
)

MODELS_FOR = {"slerp": 2, "nuslerp": 2, "nearswap": 2}
"""Number of models per method when not the default three (slerp and nuslerp merge exactly two,
nearswap one model into the base)."""
DEFAULT_MODELS = 3
WORKER_TIMEOUT_S = 3600


# --------------------------------------------------------------------------------------------------
# Worker (runs in a fresh subprocess)
# --------------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import terge

    where = Path(terge.__file__).resolve()
    if SRC_DIR.resolve() not in where.parents:
        raise RuntimeError(f"imported terge from {where}, expected it under {SRC_DIR}")
    config = GPT2_TINY if args.quick else GPT2_SMALL
    name = args.method.partition(":")[0]
    n_models = MODELS_FOR.get(name, DEFAULT_MODELS)
    method: Any = args.method
    if ":" in method:  # a configured method, as the command line's --method takes it
        from terge.cli.recipe import parse_method

        method = parse_method(args.method, "--methods")
    device = torch.device(args.device)
    models = [model.to(device) for model in build_models(n_models, config)]
    base = models[0]
    pristine = [p.detach().clone() for p in base.parameters()]

    def restore() -> None:
        with torch.no_grad():
            for parameter, saved in zip(base.parameters(), pristine, strict=True):
                parameter.copy_(saved)

    def call() -> Any:
        return terge.merge(models, method=method, seed=0, inplace=True)

    def arithmetic() -> Any:
        return terge.merge(models, method="arithmetic", inplace=True)

    timer = measure if device.type == "cpu" else measure_on_gpu
    restore()
    call()  # warm-up
    if args.paired:
        restore()
        arithmetic()
    runs, paired = [], []
    for _ in range(args.repeat):
        restore()
        runs.append(timer(call))
        if args.paired:  # the same models, right after: the machine's drift cancels out
            restore()
            paired.append(timer(arithmetic).seconds)
    peaks = [r.extra_peak_mib for r in runs if r.extra_peak_mib is not None]
    from terge.kernels import fastloop, fastmethods

    return {
        "method": args.method,
        "device": str(device),
        "models": n_models,
        "compiled": {
            "linear": fastloop.available(),
            "task_vectors": fastmethods.available(),
        },
        "seconds": min(r.seconds for r in runs),
        "paired_arithmetic_seconds": min(paired) if paired else None,
        "all_seconds": [r.seconds for r in runs],
        "extra_peak_mib": max(peaks) if peaks else None,
        "terge_version": terge.__version__,
    }


def measure_on_gpu(fn: Callable[[], Any]) -> Measurement:
    """Time one call of ``fn`` on the GPU (bracketed by ``synchronize``) and the GPU memory it
    allocated beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    extra = (torch.cuda.max_memory_allocated() - before) / MIB
    del result
    return Measurement(seconds, extra)


def run_as_worker(args: argparse.Namespace) -> int:
    try:
        result = worker(args)
    except Exception as error:
        result = {"error": f"{type(error).__name__}: {error}"[:300]}
    emit_result(result)
    return 0


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def method_names() -> list[str]:
    sys.path.insert(0, str(SRC_DIR))
    try:
        from terge.methods import REGISTRY
    finally:
        sys.path.remove(str(SRC_DIR))
    return list(REGISTRY)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info()  # before the cases run, so the load average is other processes'
    config = GPT2_TINY if args.quick else GPT2_SMALL
    names = args.methods or method_names()
    results = {}
    for name in names:
        argv = ["--worker", "--method", name, "--repeat", str(args.repeat), "--device", args.device]
        if args.quick:
            argv.append("--quick")
        if args.paired:
            argv.append("--paired")
        print(f"  running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(Path(__file__).resolve(), argv, [SRC_DIR], timeout=args.timeout)
        result = results[name]
        shown = result.get("error") or f"{fmt_seconds(result['seconds'])} s"
        print(f"    {shown}", file=sys.stderr, flush=True)
    return {
        "machine": machine,
        "command": command_line(),
        "revision": source_revision(),
        "model": {
            "config": config.__dict__,
            "parameters": num_parameters(config),
            "mib": num_parameters(config) * 4 / MIB,
        },
        "repeat": args.repeat,
        "device": args.device,
        "results": results,
    }


def report(data: dict[str, Any]) -> str:
    results = data["results"]
    paired = any(r.get("paired_arithmetic_seconds") for r in results.values())
    reference = results.get("arithmetic", {}).get("seconds")
    rows = []
    errors = []
    for name, result in results.items():
        if "error" in result:
            errors.append(f"- {name}: {result['error']}")
            rows.append([f"`{name}`", "—", "error", "—", "—"])
            continue
        relative = None if reference is None else result["seconds"] / reference
        pair = result.get("paired_arithmetic_seconds")
        rows.append(
            [
                f"`{name}`",
                str(result["models"])
                + (
                    f" (exactly {MODELS_FOR[name.partition(':')[0]]})"
                    if name.partition(":")[0] in MODELS_FOR
                    else ""
                ),
                fmt_seconds(result["seconds"]),
                fmt_ratio(relative),
                *([fmt_ratio(None if not pair else result["seconds"] / pair)] if paired else []),
                fmt_mib(result.get("extra_peak_mib")),
            ]
        )
    m = data["machine"]
    model = data["model"]
    compiled = next((r["compiled"] for r in results.values() if "compiled" in r), None)
    loops = (
        "unknown"
        if compiled is None
        else ", ".join(f"{kind}: {'yes' if on else 'no'}" for kind, on in compiled.items())
    )
    lines = [
        f"# terge merge-method benchmark — {m['date']}",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, "
        f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads); "
        f"load average before the run: {m['load_average']}. Command: `{data['command']}`"
        f"; terge at {data['revision']}.",
        "",
        f"`terge.merge(models, method=NAME, seed=0, inplace=True)` on GPT-2-shaped fp32 models "
        f"({model['parameters'] / 1e6:.1f}M parameters, {model['mib']:.0f} MiB each), base "
        f"models[0]; best of {data['repeat']} after 1 warm-up, each method in a fresh subprocess; "
        + (
            f"on the GPU ({m.get('gpu') or data['device']}), each time bracketed by "
            "`torch.cuda.synchronize()`; extra peak memory = GPU memory allocated during the call "
            "beyond what was allocated before it (worst call). "
            if data.get("device", "cpu") != "cpu"
            else "extra peak memory = VmHWM during the call minus VmRSS before it (worst call). "
        )
        + f"Compiled CPU loops used: {loops}."
        + (
            " Paired: in each method's process, `arithmetic` on the same models timed right "
            "after each call of the method (best against best), so the machine's drift between "
            "processes cancels out."
            if paired
            else ""
        ),
        "",
        markdown_table(
            [
                "method",
                "models",
                "time (s)",
                "relative to arithmetic",
                *(["relative to arithmetic, paired"] if paired else []),
                "extra peak memory (MiB)",
            ],
            rows,
        ),
    ]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per method (best of)")
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--timeout",
        type=float,
        default=WORKER_TIMEOUT_S,
        help=f"seconds one method may take, its model building included (default "
        f"{WORKER_TIMEOUT_S}); past it the method's row says so and the next one runs",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the models live (default cpu; with 'cuda' the time brackets the GPU's work "
        "and the extra memory is GPU memory allocated beyond what was before the call)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="only these methods (default: all registered); a method may carry settings as the "
        "command line's --method does, e.g. 'della:rescale=l1,elect=weighted'",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="also time arithmetic on the same models in each method's process, alternating "
        "with the method call by call, and report that ratio (drift between processes cancels)",
    )
    # Internal: run one method (in a subprocess started by the driver).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeat = max(args.repeat, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_as_worker(args)
    data = run_benchmark(args)
    print(report(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
