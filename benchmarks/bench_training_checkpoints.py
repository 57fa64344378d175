"""Training-checkpoint benchmark: averaging the last 5 of a run's checkpoints from disk.

Run from the repository root::

    python benchmarks/bench_training_checkpoints.py            # ~100M parameters (~12 GB of disk)
    python benchmarks/bench_training_checkpoints.py --quick    # tiny model, smoke test

Inputs (made once under ``benchmarks/.cache/training/`` and reused): ``--count`` (6) checkpoints
of one GPT-2-shaped model (``--layers`` 10 of width 768: ~100M fp32 parameters, ~390 MiB),
each written twice:

- as Lightning writes them, ``epoch=E-step=S.ckpt`` with ``torch.save``: ``state_dict`` (names
  prefixed ``model.``), Adam's ``optimizer_states`` (``exp_avg`` and ``exp_avg_sq``: twice the
  model), ``epoch``, ``global_step``, ``pytorch-lightning_version``, ``callbacks``, ``loops``;
- as plain safetensors files of the model alone, ``step=S.safetensors``.

Every case is a whole command in a fresh process, timed from spawn to exit, with the inputs
evicted from the page cache first (``posix_fadvise(DONTNEED)``), so each reads from disk; memory
is the peak ``RssAnon`` of the process (resident memory not backed by a file: the pages of a
memory-mapped checkpoint are page cache, which the kernel reclaims, and do not count) and, for
reference, ``VmHWM`` (all resident memory). Cases:

- terge, .ckpt: ``terge.merge(terge.choose(folder, last=5), out=OUT)``, which reads each
  checkpoint's ``state_dict`` through a memory map (the optimizer's bytes are never read) and
  streams the float64 mean into safetensors shards;
- terge, safetensors: the same over the plain safetensors files (what other file merges cost);
- start-up only: importing torch and terge, the floor under every case;
- torch.load + average: what ``avg_checkpoints.py`` scripts do (timm's and fairseq's): load each
  whole checkpoint, add its ``state_dict`` into a float64 sum, divide, ``save_file`` the result.

The machine is shared: compare the ratios of one run, not times across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from _common import (
    CACHE_DIR,
    MIB,
    SRC_DIR,
    GPT2Config,
    build_gpt2,
    fmt_mib,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    markdown_table,
)
from bench_files import Run, evict, run_sampled

LAST = 5

TERGE_CASE = """
import sys, terge
chosen = terge.choose(sys.argv[1], last={last})
terge.merge(chosen, out=sys.argv[2], overwrite=True)
"""

STARTUP_CASE = """
import sys, torch, safetensors, terge
"""

TORCH_CASE = """
import sys, glob, torch
from safetensors.torch import save_file
paths = sorted(glob.glob(sys.argv[1] + "/*.ckpt"), key=lambda p: int(p.rsplit("step=", 1)[1][:-5]))
total = None
for path in paths[-{last}:]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    if total is None:
        total = {{k: v.to(torch.float64) for k, v in state.items()}}
    else:
        for k, v in state.items():
            total[k] += v
    del state
average = {{k.removeprefix("model."): (v / {last}).to(torch.float32) for k, v in total.items()}}
save_file(average, sys.argv[2] + ".safetensors")
"""


def make_inputs(config: GPT2Config, count: int, folder: Path) -> tuple[Path, Path, int]:
    """The run's checkpoints, as Lightning .ckpt files and as plain safetensors (made once)."""
    ckpts, plain = folder / "ckpt", folder / "safetensors"
    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"count": count, **vars(config)}:
        return ckpts, plain, int((folder / "params").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    ckpts.mkdir(parents=True)
    plain.mkdir()
    params = 0
    for i in range(count):
        model = build_gpt2(config, seed=i).state_dict()
        params = sum(t.numel() for t in model.values())
        step = (i + 1) * 1000
        torch.save(
            {
                "epoch": i,
                "global_step": step,
                "pytorch-lightning_version": "2.6.0",
                "state_dict": {f"model.{k}": v for k, v in model.items()},
                "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": i}}}},
                "callbacks": {},
                "optimizer_states": [
                    {
                        "state": {
                            j: {
                                "step": torch.tensor(float(step)),
                                "exp_avg": v * 0.1,
                                "exp_avg_sq": v * v,
                            }
                            for j, v in enumerate(model.values())
                        },
                        "param_groups": [{"lr": 1e-3, "params": list(range(len(model)))}],
                    }
                ],
                "lr_schedulers": [],
            },
            ckpts / f"epoch={i}-step={step}.ckpt",
        )
        save_file(model, plain / f"step={step}.safetensors")
        del model
    (folder / "params").write_text(str(params))
    done.write_text(json.dumps({"count": count, **vars(config)}))
    return ckpts, plain, params


def run_case(code: str, source: Path, out: Path, inputs: list[Path]) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    out.with_suffix(".safetensors").unlink(missing_ok=True)
    evict(inputs)
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    run = run_sampled([sys.executable, "-c", code, str(source), str(out)], env)
    if run.returncode != 0:
        raise SystemExit(f"case failed:\n{run.output_tail}")
    return run


def bytes_of(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    config = (
        GPT2Config(vocab_size=8192, n_positions=256, n_embd=256, n_layer=2)
        if args.quick
        else GPT2Config(n_layer=args.layers)
    )
    folder = CACHE_DIR / "training" / ("quick" if args.quick else f"l{args.layers}")
    ckpts, plain, params = make_inputs(config, args.count, folder)
    out = folder / "out"
    ckpt_files, plain_files = sorted(ckpts.iterdir()), sorted(plain.iterdir())
    cases = {
        "start-up only (import torch, terge)": (STARTUP_CASE, plain, plain_files),
        "terge, Lightning .ckpt": (TERGE_CASE.format(last=LAST), ckpts, ckpt_files),
        "terge, plain safetensors": (TERGE_CASE.format(last=LAST), plain, plain_files),
        "torch.load + float64 sum": (TORCH_CASE.format(last=LAST), ckpts, ckpt_files),
    }
    results: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeat):
        for name, (code, source, inputs) in cases.items():
            run = run_case(code, source, out, inputs)
            best = results.setdefault(name, {"seconds": run.seconds, "anon": 0.0, "hwm": 0.0})
            best["seconds"] = min(best["seconds"], run.seconds)
            best["anon"] = max(best["anon"], run.anon_peak_mib)
            best["hwm"] = max(best["hwm"], run.hwm_mib)
    model_mib = params * 4 / MIB
    ckpt_mib = bytes_of(ckpt_files) / len(ckpt_files) / MIB
    base = results["terge, plain safetensors"]
    rows = [
        [
            name,
            fmt_seconds(r["seconds"]),
            fmt_mib(r["anon"]),
            fmt_mib(r["hwm"]),
            fmt_ratio(r["anon"] / model_mib),
            fmt_ratio(r["seconds"] / base["seconds"]),
            fmt_ratio(r["anon"] / base["anon"]),
        ]
        for name, r in results.items()
    ]
    info = machine_info()
    print(f"# Averaging the last {LAST} of {args.count} checkpoints from disk\n")
    print(
        f"{params / 1e6:.0f}M fp32 parameters ({model_mib:.0f} MiB of model per checkpoint; a "
        f".ckpt with Adam's state is {ckpt_mib:.0f} MiB). Machine: {info.get('cpu')}, "
        f"{info.get('nproc', '?')} CPUs (load average {info.get('load_average')}), torch "
        f"{torch.__version__}. Best time and worst peak of "
        f"{args.repeat} runs, each a fresh process reading from disk (inputs evicted). Shared "
        "machine: compare ratios within this run.\n"
    )
    print(
        markdown_table(
            [
                "case",
                "time",
                "peak RssAnon",
                "peak VmHWM",
                "RssAnon / model",
                "time vs safetensors",
                "RssAnon vs safetensors",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
