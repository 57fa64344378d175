"""Core benchmark: terge.merge() vs terge 0.1.1 vs the machine's memory-bandwidth limit.

Run from the repository root::

    python benchmarks/bench_core.py            # full run (GPT-2 small x 3, ~1-3 minutes)
    python benchmarks/bench_core.py --quick    # tiny models, smoke test
    python benchmarks/bench_core.py --repeat 5 --json results.json

Three GPT-2-small-shaped modules (124M fp32 parameters each) are merged with the default
arithmetic mean. Every case runs in its own fresh subprocess so its peak memory is clean:

- copy limit: ``dst.copy_(src)`` where src and dst each hold two models' worth of bytes, i.e. the
  same memory traffic as a merge of three models into one (read 3, write 1);
- terge 0.1.1 (installed from PyPI into ``benchmarks/.cache/terge011``, on PYTHONPATH alone) and
  this checkout's terge (``src/`` on PYTHONPATH), each in place and as a copy;
- this checkout's terge in place on its first call in a process (no warm-up; the compiled loop's
  import and thread start-up included);
- this checkout's terge in place with ``TERGE_KERNELS=torch`` (the plain-torch reference loop);
- first touch: writing one model's worth of freshly allocated memory, the page-fault cost that any
  copy pays on top of the merge itself (the operating system zeroes every new page).

Times are the best of ``--repeat`` calls after one warm-up call; extra peak memory is ``VmHWM``
(reset through ``/proc/self/clear_refs``) minus ``VmRSS`` just before the call, so a returned copy
counts; freed heap memory is handed back to the OS (``malloc_trim``) before each measured call.

A correctness line reports the fraction of elements of a bf16 merge of three random bf16 tensors
that differ from the correctly rounded mean: ``(x1 + x2 + x3) / 3`` in float64 (the sum is
exact, the division correctly rounded and never near a bf16 tie unless exactly on one) cast to bf16.
About 0.8% of such means are exact ties, so this also checks round-half-to-even. Target checks
are printed as PASS/FAIL; the script always exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _common import (
    GPT2_SMALL,
    GPT2_TINY,
    MIB,
    SRC_DIR,
    TERGE_011_DIR,
    best_of,
    build_models,
    command_line,
    emit_result,
    fmt_mib,
    fmt_ratio,
    fmt_seconds,
    install_terge_011,
    machine_info,
    markdown_table,
    measure,
    num_parameters,
    run_worker,
)

BF16_NUMEL = 1 << 20
BF16_NUMEL_QUICK = 1 << 16

# Targets (issue 2, then issue 8).
FIRST_CALL_MAX_VS_COPY_LIMIT = 1.5
WARM_MAX_VS_COPY_LIMIT = 1.25
COPY_MAX_VS_INPLACE = 1.5
INPLACE_MIN_SPEEDUP = 10.0
INPLACE_MAX_VS_COPY_LIMIT = 4.0
INPLACE_MAX_EXTRA_MIB = 64.0
COPY_MIN_SPEEDUP = 6.0
COPY_MAX_EXTRA_OVER_MODEL_MIB = 64.0

VERSIONS = {"0.1.1": TERGE_011_DIR, "dev": SRC_DIR}


# --------------------------------------------------------------------------------------------------
# Workers (each runs in a fresh subprocess)
# --------------------------------------------------------------------------------------------------


def _import_terge(expect_dir: str) -> Any:
    import terge

    where = Path(terge.__file__ or next(iter(terge.__path__))).resolve()
    if Path(expect_dir).resolve() not in where.parents:
        raise RuntimeError(f"imported terge from {where}, expected it under {expect_dir}")
    return terge


def _compiled_loop(terge: Any) -> bool:
    """Whether this terge runs its compiled CPU loop (False for versions without one)."""
    kernels = getattr(terge, "kernels", None)
    fastloop = getattr(kernels, "fastloop", None)
    if fastloop is not None:
        return bool(fastloop.available())
    return bool(getattr(kernels, "fast_loop_available", bool)())


def _terge_info(terge: Any) -> dict[str, Any]:
    version = getattr(terge, "__version__", None)
    if version is None:  # terge 0.1.1 has no __version__, but its dist-info is on PYTHONPATH
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version = importlib.metadata.version("terge")
    return {"terge_file": terge.__file__ or next(iter(terge.__path__)), "terge_version": version}


def worker_copy(args: argparse.Namespace) -> dict[str, Any]:
    config = GPT2_TINY if args.quick else GPT2_SMALL
    numel = 2 * num_parameters(config)  # two models' worth: reads 2 + writes 2 = a 3-into-1 merge
    src = torch.empty(numel).fill_(1.0)
    dst = torch.empty(numel).fill_(0.0)  # touch every page up front

    def call() -> None:
        dst.copy_(src)

    result = best_of(call, repeat=args.repeat)
    result["bytes_moved"] = 2 * numel * src.element_size()
    return result


def worker_touch(args: argparse.Namespace) -> dict[str, Any]:
    config = GPT2_TINY if args.quick else GPT2_SMALL
    numel = num_parameters(config)

    def call() -> None:
        torch.empty(numel).fill_(0.0)  # fresh pages each time: freed memory goes back to the OS

    return best_of(call, repeat=args.repeat)


def worker_merge(args: argparse.Namespace) -> dict[str, Any]:
    if args.reference:
        os.environ["TERGE_KERNELS"] = "torch"
    config = GPT2_TINY if args.quick else GPT2_SMALL
    models = build_models(3, config)
    started = time.perf_counter()
    terge = _import_terge(args.expect)
    import_seconds = time.perf_counter() - started

    def call() -> Any:
        return terge.merge(models, inplace=args.inplace)

    if args.cold:
        first = measure(call)
        result = {
            "seconds": first.seconds,
            "all_seconds": [first.seconds],
            "extra_peak_mib": first.extra_peak_mib,
        }
    else:
        result = best_of(call, repeat=args.repeat)
    result["model_mib"] = sum(p.numel() * p.element_size() for p in models[0].parameters()) / MIB
    result["import_seconds"] = import_seconds
    result["fast_loop"] = _compiled_loop(terge)
    result.update(_terge_info(terge))
    return result


class _Holder(nn.Module):
    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(tensor, requires_grad=False)


def worker_bf16(args: argparse.Namespace) -> dict[str, Any]:
    terge = _import_terge(args.expect)
    numel = BF16_NUMEL_QUICK if args.quick else BF16_NUMEL
    generator = torch.Generator().manual_seed(1234)
    xs = [torch.randn(numel, generator=generator).to(torch.bfloat16) for _ in range(3)]
    expected = (sum(x.double() for x in xs) / 3).to(torch.bfloat16)

    def wrong_elements(weights: list[float] | None) -> tuple[int, str]:
        merged = terge.merge([_Holder(x.clone()) for x in xs], weights=weights)
        got = merged.weight.detach()
        return int((got.to(torch.bfloat16) != expected).sum().item()), str(got.dtype)

    wrong, dtype = wrong_elements([1 / 3] * 3)
    wrong_default, _ = wrong_elements(None)  # for diagnosis: equal weights left implicit
    return {
        "numel": numel,
        "dtype": dtype,
        "wrong": wrong,
        "wrong_fraction": wrong / numel,
        "wrong_default_weights": wrong_default,
        "wrong_fraction_default_weights": wrong_default / numel,
        **_terge_info(terge),
    }


WORKERS = {"copy": worker_copy, "touch": worker_touch, "merge": worker_merge, "bf16": worker_bf16}


def run_as_worker(args: argparse.Namespace) -> int:
    try:
        result = WORKERS[args.worker](args)
    except Exception as error:
        result = {"error": f"{type(error).__name__}: {error}"[:300]}
    emit_result(result)
    return 0


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def spawn(worker: str, version: str | None, args: argparse.Namespace, *extra: str) -> dict:
    argv = ["--worker", worker, "--repeat", str(args.repeat), *extra]
    if args.quick:
        argv.append("--quick")
    pythonpath: list[Path] = []
    if version is not None:
        pythonpath = [VERSIONS[version]]
        argv += ["--expect", str(VERSIONS[version])]
    label = " ".join([worker, version or "", *extra]).strip()
    print(f"  running {label} ...", file=sys.stderr, flush=True)
    return run_worker(Path(__file__).resolve(), argv, pythonpath)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def _check(name: str, ok: bool | None, measured: str) -> dict[str, Any]:
    status = "PASS" if ok else "FAIL"
    return {"target": name, "status": status, "measured": measured}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    machine = machine_info()  # before the cases run, so the load average is other processes'
    install_terge_011()
    config = GPT2_TINY if args.quick else GPT2_SMALL
    results = {
        "copy limit": spawn("copy", None, args),
        "terge 0.1.1 in place": spawn("merge", "0.1.1", args, "--inplace"),
        "terge in place (warm)": spawn("merge", "dev", args, "--inplace"),
        "terge in place (first call)": spawn("merge", "dev", args, "--inplace", "--cold"),
        "terge in place, reference loop": spawn("merge", "dev", args, "--inplace", "--reference"),
        "terge 0.1.1 copy": spawn("merge", "0.1.1", args),
        "terge copy": spawn("merge", "dev", args),
        "first touch of one model": spawn("touch", None, args),
    }
    bf16 = {"terge 0.1.1": spawn("bf16", "0.1.1", args), "terge": spawn("bf16", "dev", args)}
    return {
        "machine": machine,
        "command": command_line(),
        "model": {
            "config": config.__dict__,
            "parameters": num_parameters(config),
            "mib": num_parameters(config) * 4 / MIB,
        },
        "repeat": args.repeat,
        "results": results,
        "bf16": bf16,
    }


def report(data: dict[str, Any]) -> str:
    results = data["results"]
    copy_s = results["copy limit"].get("seconds")
    baseline = {
        "copy limit": None,
        "terge 0.1.1 in place": "terge 0.1.1 in place",
        "terge in place (warm)": "terge 0.1.1 in place",
        "terge in place (first call)": "terge 0.1.1 in place",
        "terge in place, reference loop": "terge 0.1.1 in place",
        "terge 0.1.1 copy": "terge 0.1.1 copy",
        "terge copy": "terge 0.1.1 copy",
        "first touch of one model": None,
    }
    rows = []
    errors = []
    for case, result in results.items():
        if "error" in result:
            errors.append(f"- {case}: {result['error']}")
            rows.append([case, "error", "—", "—", "—"])
            continue
        base = baseline[case]
        base_s = results[base].get("seconds") if base else None
        if base is None:
            vs_base = "—"
        elif base == case:
            vs_base = "baseline"
        else:
            vs_base = fmt_ratio(_ratio(base_s, result["seconds"]), "x faster")
        rows.append(
            [
                case,
                fmt_seconds(result["seconds"]),
                vs_base,
                fmt_ratio(_ratio(result["seconds"], copy_s)),
                fmt_mib(result.get("extra_peak_mib")),
            ]
        )

    m = data["machine"]
    model = data["model"]
    lines = [
        f"# terge core benchmark — {m['date']}",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, "
        f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads); "
        f"load average before the run: {m['load_average']}. Command: `{data['command']}`",
        "",
        f"Merging 3 GPT-2-shaped fp32 models ({model['parameters'] / 1e6:.1f}M parameters, "
        f"{model['mib']:.0f} MiB each), arithmetic mean; best of {data['repeat']} after 1 warm-up "
        "(first call: no warm-up); each case in a fresh subprocess.",
        "",
        markdown_table(
            ["case", "time (s)", "vs terge 0.1.1", "vs copy limit", "extra peak memory (MiB)"],
            rows,
        ),
        *(["", "Errors:", *errors] if errors else []),
        "",
        "bf16 correctness (3 random bf16 tensors merged with weights=[1/3, 1/3, 1/3]; share of "
        "elements differing from the correctly rounded mean):",
    ]
    for name, result in data["bf16"].items():
        if "error" in result:
            lines.append(f"- {name}: error: {result['error']}")
        else:
            lines.append(
                f"- {name}: {100 * result['wrong_fraction']:.1f}% wrong "
                f"({result['wrong']:,} of {result['numel']:,}; result dtype {result['dtype']}); "
                f"with the default weights=None: "
                f"{100 * result['wrong_fraction_default_weights']:.1f}% wrong"
            )

    lines += ["", "Targets:"]
    for check in data["checks"]:
        lines.append(f"- {check['status']}: {check['target']} (measured: {check['measured']})")
    return "\n".join(lines)


def checks(data: dict[str, Any]) -> list[dict[str, Any]]:
    r = data["results"]

    def get(case: str, key: str = "seconds") -> float | None:
        return r[case].get(key)

    out = []
    inplace, old_inplace = get("terge in place (warm)"), get("terge 0.1.1 in place")
    first = get("terge in place (first call)")
    limit = get("copy limit")
    for label, seconds, bound in (
        ("first call in a fresh process", first, FIRST_CALL_MAX_VS_COPY_LIMIT),
        ("warm", inplace, WARM_MAX_VS_COPY_LIMIT),
    ):
        ratio = _ratio(seconds, limit)
        out.append(
            _check(
                f"in place, {label}, ≤{bound:g}x copy limit",
                ratio is not None and ratio <= bound,
                fmt_ratio(ratio),
            )
        )
    copy_ratio = _ratio(get("terge copy"), inplace)
    touch = get("first touch of one model")
    out.append(
        _check(
            f"copy ≤{COPY_MAX_VS_INPLACE:g}x in place",
            copy_ratio is not None and copy_ratio <= COPY_MAX_VS_INPLACE,
            f"{fmt_ratio(copy_ratio)}; the first touch of one model's fresh memory alone takes "
            f"{fmt_ratio(_ratio(touch, inplace))} the in-place time",
        )
    )
    copy, old_copy = get("terge copy"), get("terge 0.1.1 copy")
    limit = get("copy limit")
    model_mib = data["model"]["mib"]

    speedup = _ratio(old_inplace, inplace)
    out.append(
        _check(
            f"in place ≥{INPLACE_MIN_SPEEDUP:g}x faster than terge 0.1.1 in place",
            speedup is not None and speedup >= INPLACE_MIN_SPEEDUP,
            fmt_ratio(speedup),
        )
    )
    vs_limit = _ratio(inplace, limit)
    out.append(
        _check(
            f"in place ≤{INPLACE_MAX_VS_COPY_LIMIT:g}x copy limit",
            vs_limit is not None and vs_limit <= INPLACE_MAX_VS_COPY_LIMIT,
            fmt_ratio(vs_limit),
        )
    )
    peak = get("terge in place (warm)", "extra_peak_mib")
    out.append(
        _check(
            f"in place extra peak ≤ {INPLACE_MAX_EXTRA_MIB:g} MiB",
            peak is not None and peak <= INPLACE_MAX_EXTRA_MIB,
            f"{fmt_mib(peak)} MiB",
        )
    )
    speedup = _ratio(old_copy, copy)
    out.append(
        _check(
            f"copy ≥{COPY_MIN_SPEEDUP:g}x faster than terge 0.1.1 copy",
            speedup is not None and speedup >= COPY_MIN_SPEEDUP,
            fmt_ratio(speedup),
        )
    )
    peak = get("terge copy", "extra_peak_mib")
    limit_mib = model_mib + COPY_MAX_EXTRA_OVER_MODEL_MIB
    out.append(
        _check(
            f"copy extra peak ≤ one model ({model_mib:.0f} MiB) + "
            f"{COPY_MAX_EXTRA_OVER_MODEL_MIB:g} MiB = {limit_mib:.0f} MiB",
            peak is not None and peak <= limit_mib,
            f"{fmt_mib(peak)} MiB",
        )
    )
    wrong = data["bf16"]["terge"].get("wrong_fraction")
    out.append(
        _check(
            "bf16 merge correctly rounded: 0% wrong",
            wrong == 0,
            "—" if wrong is None else f"{100 * wrong:.1f}% wrong",
        )
    )
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per case (best of)")
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    # Internal: run one case (in a subprocess started by the driver).
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--expect", help=argparse.SUPPRESS)
    parser.add_argument("--inplace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeat = max(args.repeat, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_as_worker(args)
    data = run_benchmark(args)
    data["checks"] = checks(data)
    print(report(data))
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
