"""DELLA as mergekit defines it: terge's translation against mergekit's own computation.

Run from the repository root::

    python benchmarks/bench_mergekit_della.py             # GPT-2 small x 3 (about 2 minutes)
    python benchmarks/bench_mergekit_della.py --quick     # tiny models
    python benchmarks/bench_mergekit_della.py --mergekit PATH   # where mergekit is installed

Three GPT-2-small-shaped fp32 modules (``_common.build_models``), base ``models[0]``, the other
two merged with equal weights, density 0.5, mergekit's epsilon 0.15 and its ``rescale: true``:

- ``arithmetic``: ``terge.merge`` of the three, the reference the ratios are taken against;
- ``terge della`` / ``della_linear``: ``terge.merge`` with the settings ``terge.from_mergekit``
  gives a mergekit ``della`` config (``rescale="l1"``, ``elect="weighted"``,
  ``disjoint_mean=False`` where ``normalize`` is false; float64 accumulation, exact);
- ``terge della (paper's)``: ``terge.merge(method="della")``, the compiled loop;
- ``mergekit della`` / ``della_linear`` (where mergekit is importable): mergekit's own per-tensor
  computation on the same tensors, in float32 as it computes fp32 models on the CPU
  (``sparsify(..., della_magprune, rescale_norm=l1)`` per task vector, then its ``get_mask``
  consensus and disjoint mean), its I/O left out.

Best of ``--repeat`` calls after one warm-up; the script always exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from _common import GPT2_SMALL, GPT2_TINY, SRC_DIR, build_models, machine_info, markdown_table

sys.path.insert(0, str(SRC_DIR))

import terge
from terge.methods import della, della_linear


def best(call: Callable[[], Any], repeat: int, setup: Callable[[], Any] = lambda: None) -> float:
    """The best time of ``repeat`` calls after one warm-up, ``setup`` run (untimed) before each."""
    setup()
    call()
    times = []
    for _ in range(repeat):
        setup()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def mergekit_della(params: list[dict[str, torch.Tensor]], linear: bool) -> None:
    """mergekit's GeneralizedTaskArithmeticMerge.merge_group for DELLA, tensor by tensor."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    with torch.no_grad():
        for name, base in params[0].items():
            deltas = torch.stack(
                [
                    sparsify(
                        p[name] - base,
                        density=0.5,
                        method=SparsificationMethod.della_magprune,
                        rescale_norm=RescaleNorm.l1,
                        epsilon=0.15,
                    )
                    for p in params[1:]
                ]
            )
            weights = torch.ones(len(params) - 1, dtype=deltas.dtype)
            while weights.dim() < deltas.dim():
                weights = weights.unsqueeze(-1)
            deltas = deltas * weights
            if linear:
                mixed = deltas.sum(0)
            else:
                mask = get_mask(deltas, method="sum", mask_dtype=base.dtype)
                mixed = (deltas * mask).sum(0)
                divisor = (weights * mask).sum(0)
                divisor[divisor == 0] = 1
                mixed /= divisor
            _ = base + mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--mergekit", metavar="PATH", help="a folder to import mergekit from")
    args = parser.parse_args()
    if args.mergekit:
        sys.path.insert(1, args.mergekit)
    models = build_models(3, GPT2_TINY if args.quick else GPT2_SMALL)
    base = models[0]
    pristine = [p.detach().clone() for p in base.parameters()]

    def restore() -> None:  # each call merges the same inputs (untimed)
        with torch.no_grad():
            for parameter, saved in zip(base.parameters(), pristine, strict=True):
                parameter.copy_(saved)

    def merged(method: Any) -> Callable[[], Any]:
        return lambda: terge.merge(models, method=method, seed=0, inplace=True, normalize=False)

    mergekit_options = {"density": 0.5, "epsilon": 0.15, "rescale": "l1"}
    cases = {
        "arithmetic": merged("arithmetic"),
        "terge della, mergekit's definition": merged(
            della(**mergekit_options, elect="weighted", disjoint_mean=True)
        ),
        "terge della_linear, mergekit's definition": merged(della_linear(**mergekit_options)),
        "terge della, the paper's (compiled loop)": merged("della"),
    }
    times = {label: best(call, args.repeat, restore) for label, call in cases.items()}
    try:
        import mergekit  # noqa: F401
    except ImportError:
        print("(mergekit is not importable: its rows are left out)", file=sys.stderr)
    else:
        params = [{n: p.detach() for n, p in model.named_parameters()} for model in models]
        for linear in (False, True):
            label = f"mergekit {'della_linear' if linear else 'della'} (float32, compute only)"
            times[label] = best(lambda linear=linear: mergekit_della(params, linear), args.repeat)
    machine = machine_info()
    print(
        f"{machine['date']}: {machine['nproc']} CPUs ({machine['cpu']}), torch "
        f"{machine['torch']} ({machine['torch_threads']} threads), load average "
        f"{machine['load_average']}; best of {args.repeat} after one warm-up.\n"
    )
    rows = [
        [label, f"{seconds:.3f}", f"{seconds / times['arithmetic']:.1f}x"]
        for label, seconds in times.items()
    ]
    print(markdown_table(["case", "time (s)", "relative to arithmetic"], rows))


if __name__ == "__main__":
    main()
