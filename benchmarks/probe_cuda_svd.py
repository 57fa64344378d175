"""cuSOLVER's SVD drivers for the subspace methods (Iso-C, TSV-M, Iso-CTS), on a CUDA machine.

    PYTHONPATH=src python benchmarks/probe_cuda_svd.py

For GPT-2's matrix shapes in float64: each driver's time, reconstruction error, the singular
vectors' distance from orthonormal and the singular values against the CPU's; then the three
methods on one layer's matrices and the embedding with torch's default driver and with
``gesvdj`` (and how far apart their results are). Results are in README.md ("Merge methods on
the GPU"). Needs a CUDA device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from terge.methods import resolve

DRIVERS = [None, "gesvdj", "gesvda", "gesvd"]
SHAPES = [(50257, 768), (768, 2304), (768, 768), (768, 3072), (3072, 768)]
METHODS = ["iso_c", "tsv_m", "iso_cts"]


def best_of(call: Callable[[], object], repeat: int = 3) -> float:
    """The fastest of ``repeat`` synchronised calls after a warm-up, in seconds."""
    call()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def probe_drivers(device: torch.device, generator: torch.Generator) -> None:
    for shape in SHAPES[:3]:
        a = torch.randn(*shape, device=device, dtype=torch.float64, generator=generator) * 0.01
        expected = torch.linalg.svdvals(a.cpu())
        for driver in DRIVERS:
            try:
                seconds = best_of(lambda a=a, d=driver: torch.linalg.svd(a, False, driver=d))
                u, s, vh = torch.linalg.svd(a, full_matrices=False, driver=driver)
            except RuntimeError as error:
                print(f"svd {shape} driver={driver}: {str(error)[:100]}", flush=True)
                continue
            eye = torch.eye(u.shape[1], device=device, dtype=u.dtype)
            rebuilt = ((u * s) @ vh - a).abs().max() / a.abs().max()
            orthonormal = (u.mT @ u - eye).abs().max()
            values = (s.cpu() - expected).abs().max() / expected.max()
            print(
                f"svd {shape} driver={driver}: {seconds * 1e3:.1f} ms, rebuilt {rebuilt:.1e},"
                f" orthonormal {orthonormal:.1e}, singular values {values:.1e}",
                flush=True,
            )
        if shape[0] != shape[1]:
            tall = a if shape[0] > shape[1] else a.mT
            print(f"qr {shape}: {best_of(lambda t=tall: torch.linalg.qr(t)) * 1e3:.1f} ms")
    a = torch.randn(768, 768, device=device, dtype=torch.float64, generator=generator)
    seconds = best_of(lambda: torch.linalg.eigh(a @ a.mT))
    print(f"eigh of a 768 x 768 Gram matrix: {seconds * 1e3:.1f} ms")


def probe_methods(device: torch.device, generator: torch.Generator) -> None:
    bases = {s: torch.randn(*s, device=device, generator=generator) for s in SHAPES}
    thetas = {
        s: [bases[s] + 0.01 * torch.randn(*s, device=device, generator=generator) for _ in "ab"]
        for s in SHAPES
    }
    plain = torch.linalg.svd
    results: dict[tuple[str | None, str], list[torch.Tensor]] = {}
    try:
        for driver in [None, "gesvdj"]:
            if driver is not None:
                torch.linalg.svd = lambda a, *args, d=driver, **kw: plain(a, *args, driver=d, **kw)
            for name in METHODS:
                method = resolve(name)
                start = time.perf_counter()
                merged = [
                    method([t.double() for t in thetas[s]], [0.5, 0.5], bases[s].double())
                    for s in SHAPES
                ]
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                results[driver, name] = [m.cpu() for m in merged]
                print(f"{name} driver={driver}: {seconds:.2f} s for one layer + wte", flush=True)
    finally:
        torch.linalg.svd = plain
    for name in METHODS:
        pairs = zip(results[None, name], results["gesvdj", name], strict=True)
        apart = max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)
        print(f"{name}: gesvdj against the default, largest relative difference {apart:.1e}")


def main() -> None:
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    probe_drivers(device, generator)
    probe_methods(device, generator)


if __name__ == "__main__":
    main()
