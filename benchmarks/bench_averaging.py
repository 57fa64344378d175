"""The running average's update (``terge.Average.update``) against what users run instead.

Run from the repository root::

    python benchmarks/bench_averaging.py            # full run (~1-2 minutes on 2 cores)
    python benchmarks/bench_averaging.py --quick    # smaller models, smoke test
    python benchmarks/bench_averaging.py --repeat 15 --json results.json

In one process, the cases side by side (each repeat times terge and the alternatives, in an
order that rotates, so all see the same machine load); times are the best of ``--repeat`` after
two warm-up calls. Before every timed call the caches are emptied (twice the last-level cache
written), as a training step between two updates does; ``--warm`` leaves them as the previous
call left them. With ``--device cuda`` the same cases run on the GPU:

- ResNet-50-shaped CNN (built from torch layers: 25.6M parameters, 161 parameter tensors, 106
  float and 53 integer BatchNorm buffers), float32, EMA with buffers averaged: ``update()``
  against ``torch._foreach_lerp_`` over the same float tensors (what
  ``torch.optim.swa_utils.get_ema_multi_avg_fn`` and timm's ``ModelEmaV3`` run), and against
  that plus ``torch._foreach_copy_`` of the integer buffers (timm's whole update, less its
  ``state_dict()`` walk);
- a transformer of many small tensors (``--layers`` blocks of 16 tensors, hidden 64): the same;
- the issue's example, 5,000 tensors of 64 floats: microseconds per tensor; and ``merge()`` in
  place of three such models against the foreach ops of their mean (``_foreach_add_`` twice,
  ``_foreach_div_``);
- GPT-2 small (124M float32 parameters): ``update()`` against the copy limit, ``dst.copy_(src)``
  moving the same bytes (an EMA update reads the shadow and the model and writes the shadow:
  3 model sizes; the copy reads 1.5 and writes 1.5), and against ``_foreach_lerp_``.

Targets (issue 15): ``update()`` no slower than ``_foreach_lerp_`` on the CNN and on the
transformer; within 1.3x of the copy limit on GPT-2 small. The machine is shared and timings are
noisy: compare the ratios, which are measured side by side. The script always exits 0.
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
from torch import nn

from _common import (
    GPT2_SMALL,
    GPT2_TINY,
    build_gpt2,
    command_line,
    fmt_ratio,
    machine_info,
    markdown_table,
    source_revision,
)

sys.path.insert(0, str(__import__("_common").SRC_DIR))
import terge

CNN_MAX_VS_LERP = 1.0
TRANSFORMER_MAX_VS_LERP = 1.0
GPT2_MAX_VS_COPY = 1.3


# --- models ---------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        out = 4 * width
        self.conv1 = nn.Conv2d(inputs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inputs, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or inputs != out
            else None
        )


class ResNet50(nn.Module):
    """torchvision's resnet50 layout (no forward needed): 25.6M parameters."""

    def __init__(self, base: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        layers, inputs = [], base
        for i, blocks in enumerate([3, 4, 6, 3]):
            width = base * 2**i
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(inputs, width, 2 if b == 0 and i > 0 else 1))
                inputs = 4 * width
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(inputs, 1000)


class SmallBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.o = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)


class SmallTransformer(nn.Module):
    def __init__(self, layers: int, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, hidden)
        self.blocks = nn.ModuleList(SmallBlock(hidden) for _ in range(layers))


class ManyTensors(nn.Module):
    def __init__(self, count: int, size: int) -> None:
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(size)) for _ in range(count))


# --- timing ---------------------------------------------------------------------------------------


def synchronize() -> None:
    """Wait for the GPU's queued work (a no-op without CUDA), so that timings bracket it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def cache_bytes(device: torch.device) -> int:
    """The size of the last cache level in front of ``device``'s memory: the CPU's largest cache
    (from sysfs; 64 MiB when unknown) or the GPU's L2."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=64 << 20)


class Evictor:
    """Writes a buffer twice the size of the last cache level, so that the next call finds
    none of its data cached: in a training loop the forward and backward passes run between
    two updates of the average, and every case then starts from the same (cold) state."""

    def __init__(self, device: torch.device) -> None:
        self.buffer = torch.empty(2 * cache_bytes(device) // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.fill_(1.0)
        self.buffer.add_(1.0)


def side_by_side(
    calls: dict[str, Callable[[], Any]], repeat: int, evict: Callable[[], None] | None = None
) -> dict[str, float]:
    """Best time of each call, the calls interleaved in every repeat (after two warm-ups), their
    order rotated from one repeat to the next. With ``evict`` (an :class:`Evictor`), the caches
    are emptied before every timed call. Without it each call leaves its own data in the caches:
    a call's time then depends on what ran before it (``lerp`` right after ``lerp`` + copy finds
    its buffers cached; this machine's 300 MiB cache holds a whole ResNet-50 and its average).
    On a GPU every call is bracketed by ``torch.cuda.synchronize()``."""
    for _ in range(2):
        for call in calls.values():
            call()
    best = dict.fromkeys(calls, float("inf"))
    names = list(calls)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if evict is not None:
                evict()
            synchronize()
            start = time.perf_counter()
            calls[name]()
            synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def ema_case(
    model: nn.Module, repeat: int, evict: Callable[[], None] | None = None
) -> dict[str, Any]:
    """``Average.update`` against ``_foreach_lerp_`` (and ``+ _foreach_copy_`` of the integer
    buffers) over the same tensors."""
    average = terge.Average(model, decay=0.999)
    state = model.state_dict()
    floats = [v for v in state.values() if v.is_floating_point()]
    integers = [v for v in state.values() if not v.is_floating_point()]
    ema_floats = [v.clone() for v in floats]
    ema_integers = [v.clone() for v in integers]

    def lerp() -> None:
        torch._foreach_lerp_(ema_floats, floats, 0.001)

    def timm() -> None:
        torch._foreach_lerp_(ema_floats, floats, 0.001)
        if integers:
            torch._foreach_copy_(ema_integers, integers)

    times = side_by_side(
        {"terge": lambda: average.update(model), "lerp": lerp, "lerp+copy": timm}, repeat, evict
    )
    return {
        "tensors": len(state),
        "float_tensors": len(floats),
        "parameters": sum(p.numel() for p in model.parameters()),
        **times,
    }


def copy_limit_case(
    model: nn.Module, repeat: int, evict: Callable[[], None] | None = None
) -> dict[str, Any]:
    """GPT-2 small: ``update()``, ``_foreach_lerp_`` and a copy moving the same bytes."""
    numel = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    source = torch.empty(3 * numel // 2, device=device).fill_(1.0)
    target = torch.empty(3 * numel // 2, device=device).fill_(0.0)
    average = terge.Average(model, decay=0.999)
    params = [p.detach() for p in model.parameters()]
    shadow = [p.clone() for p in params]
    times = side_by_side(
        {
            "terge": lambda: average.update(model),
            "copy": lambda: target.copy_(source),
            "lerp": lambda: torch._foreach_lerp_(shadow, params, 0.001),
        },
        repeat,
        evict,
    )
    return {"parameters": numel, "tensors": len(params), "bytes": 3 * numel * 4, **times}


def merge_case(
    count: int,
    size: int,
    repeat: int,
    device: torch.device,
    evict: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """``merge()`` in place of three models of ``count`` tensors of ``size`` floats against the
    foreach ops a user would write for their mean (``(a + b + c) / 3`` in float32)."""
    models = [ManyTensors(count, size).to(device) for _ in range(3)]
    tensors = [[p.detach() for p in m.parameters()] for m in models]

    def foreach() -> None:
        torch._foreach_add_(tensors[0], tensors[1])
        torch._foreach_add_(tensors[0], tensors[2])
        torch._foreach_div_(tensors[0], 3.0)

    times = side_by_side(
        {"terge": lambda: terge.merge(models, inplace=True), "foreach": foreach}, repeat, evict
    )
    return {"tensors": count, "parameters": count * size, **times}


# --- report ---------------------------------------------------------------------------------------


def verdict(ratio: float, limit: float) -> str:
    return "PASS" if ratio <= limit else "FAIL"


def small_rows(
    results: dict[str, Any], threads: int, layers: int, gpu: bool = False
) -> list[list[str]]:
    """Table rows of the ``update()`` against ``_foreach_lerp_`` cases timed on ``threads``."""
    rows = []
    for key, label, limit in [
        ("cnn", "ResNet-50-shaped CNN, EMA (buffers averaged)", CNN_MAX_VS_LERP),
        ("transformer", f"transformer, {layers} blocks of 16 small tensors", 1.0),
        ("many", "5,000 tensors of 64 floats", 1.0),
    ]:
        r = results[f"{key}@{threads}"]
        ratio = r["terge"] / r["lerp"]
        rows.append(
            [
                f"{label}, " + ("GPU" if gpu else f"{threads} thread{'s' if threads > 1 else ''}"),
                f"{r['tensors']} ({r['float_tensors']} float)",
                f"{r['parameters'] / 1e6:.1f}M",
                f"{r['terge'] * 1e3:.2f} ms ({r['terge'] * 1e6 / r['tensors']:.2f} us/tensor)",
                f"{r['lerp'] * 1e3:.2f} ms",
                f"{r['lerp+copy'] * 1e3:.2f} ms",
                fmt_ratio(ratio),
                f"<= {limit:.1f}x vs lerp: {verdict(ratio, limit)}"
                if key != "many"
                else "(the issue's example)",
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models, smoke test")
    parser.add_argument("--repeat", type=int, default=9, help="timed calls per case")
    parser.add_argument("--layers", type=int, default=80, help="blocks of the small transformer")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the models and averages live (default cpu; 'cuda' times the GPU loop, "
        "on the GPU's own threads only)",
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="leave the caches as the previous call left them (default: empty them before every "
        "timed call, as a training step between two updates does)",
    )
    args = parser.parse_args()
    repeat = 3 if args.quick else args.repeat
    device = torch.device(args.device)
    evict = None if args.warm else Evictor(device)

    print("building models ...", file=sys.stderr, flush=True)
    cnn = ResNet50(base=16 if args.quick else 64).to(device)
    small = SmallTransformer(args.layers).to(device)
    many = ManyTensors(5000, 64).to(device)
    gpt2 = build_gpt2(GPT2_TINY if args.quick else GPT2_SMALL).to(device)

    results: dict[str, Any] = {
        "machine": machine_info(),
        "caches": "warm" if evict is None else "emptied before every timed call",
        "revision": source_revision(),
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
    }
    threads = torch.get_num_threads()
    rows = []
    for count in sorted({threads, 1} if device.type == "cpu" else {threads}, reverse=True):
        print(f"timing on {count} thread(s) ...", file=sys.stderr, flush=True)
        torch.set_num_threads(count)
        for key, model in [("cnn", cnn), ("transformer", small), ("many", many)]:
            results[f"{key}@{count}"] = ema_case(model, repeat, evict)
        rows += small_rows(results, count, args.layers, gpu=device.type == "cuda")
    torch.set_num_threads(threads)
    results["merge"] = merge_case(5000, 64, repeat, device, evict)
    m = results["merge"]
    rows.append(
        [
            "merge() of three such models, in place",
            str(m["tensors"]),
            f"{m['parameters'] / 1e6:.1f}M",
            f"{m['terge'] * 1e3:.2f} ms ({m['terge'] * 1e6 / m['tensors']:.2f} us/tensor)",
            "—",
            f"foreach mean {m['foreach'] * 1e3:.2f} ms",
            f"{fmt_ratio(m['terge'] / m['foreach'])} of foreach",
            "(the issue's example: 39 us/tensor)",
        ]
    )
    results["gpt2"] = copy_limit_case(gpt2, repeat, evict)
    g = results["gpt2"]
    ratio = g["terge"] / g["copy"]
    rows.append(
        [
            "GPT-2 small, EMA",
            str(g["tensors"]),
            f"{g['parameters'] / 1e6:.1f}M",
            f"{g['terge'] * 1e3:.1f} ms ({g['bytes'] / g['terge'] / 1e9:.1f} GB/s)",
            f"{g['lerp'] * 1e3:.1f} ms",
            f"copy limit {g['copy'] * 1e3:.1f} ms",
            f"{fmt_ratio(ratio)} of copy, {fmt_ratio(g['terge'] / g['lerp'])} of lerp",
            f"<= {GPT2_MAX_VS_COPY}x copy: {verdict(ratio, GPT2_MAX_VS_COPY)}",
        ]
    )
    headers = [
        "case",
        "tensors",
        "params",
        "terge update()",
        "_foreach_lerp_",
        "lerp + int copy / copy",
        "terge / lerp",
        "target",
    ]
    machine = results["machine"]
    print(f"\n`{command_line()}` at {results['revision']}, on {results['device']}")
    print(
        f"{machine['cpu']}, {machine['nproc']} cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads), load {machine['load_average']}; "
        + (
            "caches left warm by the previous call (--warm)\n"
            if evict is None
            else f"caches emptied before every timed call ({cache_bytes(device) >> 20} MiB "
            "last-level cache, twice that written)\n"
        )
    )
    print(markdown_table(headers, rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
