"""The hot loops, and which one runs.

Every linear merge is ``destination = (sum_i c_i x_i) / d``, accumulated in a wide dtype and
rounded once. :mod:`.reference` computes it in plain torch ops anywhere; on the CPU with float64
accumulation the compiled loop (:mod:`.fastloop`, built at install) does the same arithmetic in
one pass split between the cores; on CUDA GPUs the Triton kernel (:mod:`.triton_loop`, imported
on first use) does. :mod:`.fastmethods` is the compiled task-vector loop, :mod:`.statistics`
SLERP's and Model Stock's dot products (compiled on the CPU, in an order of terge's own),
:mod:`.primitives` the exact selection and random draws shared with sharded tensors, and
:mod:`.cpu` what the compiled loops share. The tests check every loop against the reference
bit for bit; setting the environment variable ``TERGE_KERNELS=torch`` forces the reference
everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from . import fastloop, primitives
from .cpu import reference_forced
from .reference import ChunkBuffers, reference_combine, store_rounded, store_whole

__all__ = [
    "ChunkBuffers",
    "combine_whole",
    "gpu_loop",
    "linear_combine",
    "store_rounded",
    "store_whole",
]

_triton_loop: ModuleType | bool | None = None
"""``.triton_loop`` once imported, ``False`` where Triton is missing or broken."""


def gpu_loop() -> ModuleType | None:
    """The Triton loop module, imported on first use (a CPU-only merge never pays for it), or
    ``None`` where Triton is not installed or ``TERGE_KERNELS=torch`` forces the reference."""
    global _triton_loop
    if reference_forced():
        return None
    if _triton_loop is None:
        try:
            from . import triton_loop
        except Exception:  # no Triton, or one that does not load: the reference loop works
            _triton_loop = False
        else:
            _triton_loop = triton_loop
    return _triton_loop if isinstance(_triton_loop, ModuleType) else None


def linear_combine(
    destination: torch.Tensor,
    sources: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    buffers: ChunkBuffers,
    divisor: float | None = None,
) -> None:
    """``destination = (sum_i coefficients[i] * sources[i]) / divisor`` in ``buffers.dtype``,
    by the fastest loop that applies (all give the same bits).

    Sources may have any floating dtype and live on any device. ``destination`` may itself be
    one of the sources.
    """
    if destination.numel() == 0:
        return
    if buffers.dtype == torch.float64:
        flats = [s.reshape(-1) for s in sources]
        if destination.is_cuda:
            loop = gpu_loop()
            if loop is not None and loop.supports(destination, flats):
                loop.combine(destination.view(-1), flats, coefficients, divisor)
                return
        elif fastloop.supports(destination, flats):
            fastloop.combine(destination, flats, coefficients, divisor)
            return
    reference_combine(destination, sources, coefficients, buffers, divisor)


def combine_whole(
    tensors: Sequence[torch.Tensor], coefficients: Sequence[float], divisor: float | None = None
) -> torch.Tensor:
    """``(sum_i c_i x_i) / divisor`` of whole tensors in the linear loops' arithmetic (each
    product rounded, summed in order, divided once): how a method's reference computes what its
    streamed form writes with :func:`linear_combine`, so that both give the same bits."""
    result = tensors[0].clone()
    if coefficients[0] != 1:
        result.mul_(coefficients[0])
    for tensor, coefficient in zip(tensors[1:], coefficients[1:], strict=True):
        result.add_(tensor if coefficient == 1 else tensor * coefficient)
    if divisor is not None and divisor != 1:
        result = primitives.divide(result, divisor)
    return result
