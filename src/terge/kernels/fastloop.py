"""The linear merge as a compiled CPU loop: ``_fastloop.c`` driven over threads.

It computes exactly what :func:`terge.kernels.reference.reference_combine` does (products
rounded on their own, never a fused multiply-add; one division; one rounding), in one pass over
memory. Built at install where a C compiler is present; otherwise the reference runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cpu import DTYPE_CODES, plain, reference_forced, split

try:
    from . import _fastloop
except ImportError:  # not compiled (no C compiler at install): the reference loop does the work
    _fastloop = None  # type: ignore[assignment]

MAX_INPUTS = 64
"""Most inputs one call takes (a merge of more models runs the reference loop)."""


def available() -> bool:
    """Whether the compiled loop is built and not switched off by ``TERGE_KERNELS=torch``."""
    return _fastloop is not None and not reference_forced()


def supports(destination: torch.Tensor, flats: Sequence[torch.Tensor]) -> bool:
    """Whether the compiled loop can compute this: plain CPU tensors, few enough inputs."""
    return (
        available()
        and len(flats) <= MAX_INPUTS
        and plain(destination)
        and all(plain(f) for f in flats)
    )


def combine(
    target: torch.Tensor,
    flats: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    divisor: float | None,
) -> None:
    """The compiled loop over ``target``, its range split into one piece per thread."""
    out_code, out_size = DTYPE_CODES[target.dtype], target.element_size()
    codes = [DTYPE_CODES[f.dtype] for f in flats]
    sizes = [f.element_size() for f in flats]
    pointers = [f.data_ptr() for f in flats]
    weights = [float(c) for c in coefficients]
    divide = None if divisor is None or divisor == 1 else float(divisor)

    def part(start: int, stop: int) -> None:
        _fastloop.combine(
            target.data_ptr() + start * out_size,
            out_code,
            stop - start,
            [p + start * s for p, s in zip(pointers, sizes)],
            codes,
            weights,
            divide,
        )

    split(target.numel(), part)
