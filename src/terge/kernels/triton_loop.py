"""The fused loop on CUDA GPUs, written in Triton.

The plain-torch loop (:func:`terge.kernels.reference.reference_combine`) makes about ten passes
over each chunk on a GPU: every input is widened into a float64 buffer, multiplied, added, and the
sum is narrowed again, each a separate kernel reading and writing global memory. This kernel does
the same arithmetic in one pass with the float64 accumulator in registers, so a merge moves only the
bytes it must: each input read once, the output written once.

The arithmetic is the reference's operation for operation: ``acc = x_0 * c_0``, then
``acc = acc + (x_i * c_i)`` in model order with the product rounded on its own (the kernel is
compiled with floating-point contraction off, so never a fused multiply-add), then ``acc / d``
when a divisor is given, rounded once into the destination's dtype; bfloat16 and float16 go
through float32 rounded *to odd*, which makes the second rounding exact (see
:func:`terge.kernels.reference.store_rounded`). The GPU tests check the two loops agree bit for bit.

Triton is imported only when a CUDA tensor is merged; without it the reference loop runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

MAX_INPUTS = 8
"""Most inputs one launch takes (a merge of more models runs the reference loop)."""

BLOCK = 4096
"""Elements per program: 16 per thread with 8 warps, enough independent loads in flight to
keep HBM busy."""

# The weights are annotated float64: Triton would otherwise pass a Python float as float32.

_WARPS = 8
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _term(pointer, weight, offsets, mask, ONE: tl.constexpr):
    value = tl.load(pointer + offsets, mask=mask).to(tl.float64)
    if not ONE:  # x * 1 is x: a multiplication the float64 units need not do
        value = value * weight
    return value


@triton.jit
def _combine_kernel(
    out_pointer,
    n,
    x0,
    x1,
    x2,
    x3,
    x4,
    x5,
    x6,
    x7,
    w0: tl.float64,
    w1: tl.float64,
    w2: tl.float64,
    w3: tl.float64,
    w4: tl.float64,
    w5: tl.float64,
    w6: tl.float64,
    w7: tl.float64,
    divisor: tl.float64,
    INPUTS: tl.constexpr,
    ONES: tl.constexpr,
    DIVIDE: tl.constexpr,
    TO_ODD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    acc = _term(x0, w0, offsets, mask, (ONES & 1) != 0)
    if INPUTS > 1:
        acc += _term(x1, w1, offsets, mask, (ONES & 2) != 0)
    if INPUTS > 2:
        acc += _term(x2, w2, offsets, mask, (ONES & 4) != 0)
    if INPUTS > 3:
        acc += _term(x3, w3, offsets, mask, (ONES & 8) != 0)
    if INPUTS > 4:
        acc += _term(x4, w4, offsets, mask, (ONES & 16) != 0)
    if INPUTS > 5:
        acc += _term(x5, w5, offsets, mask, (ONES & 32) != 0)
    if INPUTS > 6:
        acc += _term(x6, w6, offsets, mask, (ONES & 64) != 0)
    if INPUTS > 7:
        acc += _term(x7, w7, offsets, mask, (ONES & 128) != 0)
    if DIVIDE:
        acc = acc / divisor
    if TO_ODD:
        # float32 rounded to odd: where rounding to nearest was inexact and left the last bit
        # even, step one unit towards the exact value (the bit pattern's magnitude +-1).
        narrow = acc.to(tl.float32)
        back = narrow.to(tl.float64)
        bits = narrow.to(tl.int32, bitcast=True)
        step = tl.where(tl.abs(acc) > tl.abs(back), 1, -1)
        bits = tl.where((back != acc) & ((bits & 1) == 0), bits + step, bits)
        narrow = bits.to(tl.float32, bitcast=True)
        rounded = narrow.to(out_pointer.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(out_pointer + offsets, rounded, mask=mask)
    else:
        tl.store(out_pointer + offsets, acc.to(out_pointer.dtype.element_ty), mask=mask)


def supports(destination: torch.Tensor, sources: Sequence[torch.Tensor]) -> bool:
    """Whether one launch can compute this: contiguous float tensors on the destination's GPU."""
    if not 1 <= len(sources) <= MAX_INPUTS:
        return False
    device = destination.device
    return all(
        t.device == device
        and t.dtype in _DTYPES
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
        and t.numel() == destination.numel()
        for t in (destination, *sources)
    )


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device``: Triton launches on the current CUDA device."""
    if device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        return torch.cuda.device(device)
    return contextlib.nullcontext()  # already current (or the CPU interpreter, in tests)


def combine(
    destination: torch.Tensor,
    sources: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    divisor: float | None = None,
) -> None:
    """``destination = (sum_i coefficients[i] * sources[i]) / divisor``, accumulated in float64.

    ``destination`` may be one of the sources (each element is read before it is written, by
    the same thread). Check :func:`supports` first.
    """
    n = destination.numel()
    if n == 0:
        return
    pointers = list(sources) + [sources[0]] * (MAX_INPUTS - len(sources))
    weights = [float(c) for c in coefficients] + [0.0] * (MAX_INPUTS - len(coefficients))
    divide = divisor is not None and divisor != 1
    with _on(destination.device):
        _combine_kernel[(triton.cdiv(n, BLOCK),)](
            destination,
            n,
            *pointers,
            *weights,
            float(divisor) if divide else 1.0,
            INPUTS=len(sources),
            ONES=sum(1 << i for i, w in enumerate(weights) if w == 1),
            DIVIDE=divide,
            TO_ODD=destination.dtype in (torch.bfloat16, torch.float16),
            BLOCK=BLOCK,
            num_warps=_WARPS,
            enable_fp_fusion=False,
        )
