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
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_INPUTS = 8
"""Most inputs one launch takes (a merge of more models runs the reference loop)."""

BLOCK = 4096
"""Elements per program: 16 per thread with 8 warps, enough independent loads in flight to
keep HBM busy."""

# The weights are annotated float64: Triton would otherwise pass a Python float as float32.

BLOCK_MANY = 2048
"""Elements per program of the many-tensor launch: smaller than :data:`BLOCK`, since a small
tensor leaves the rest of its last block idle."""

_WARPS = 8
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_TRITON_TYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


@triton.jit
def _term(pointer, weight, offsets, mask, ONE: tl.constexpr):
    value = tl.load(pointer + offsets, mask=mask).to(tl.float64)
    if not ONE:  # x * 1 is x: a multiplication the float64 units need not do
        value = value * weight
    return value


@triton.jit
def _accumulate(
    x0, x1, x2, x3, x4, x5, x6, x7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    divisor, offsets, mask,
    INPUTS: tl.constexpr, ONES: tl.constexpr, DIVIDE: tl.constexpr,
):  # fmt: skip
    """``(x_0 w_0 + x_1 w_1 + ...) / divisor`` in float64, each product rounded on its own."""
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
    return acc


@triton.jit
def _store(out_pointer, acc, offsets, mask, TO_ODD: tl.constexpr):
    """``acc`` rounded once into the destination's dtype."""
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
    acc = _accumulate(
        x0, x1, x2, x3, x4, x5, x6, x7, w0, w1, w2, w3, w4, w5, w6, w7,
        divisor, offsets, mask, INPUTS, ONES, DIVIDE,
    )  # fmt: skip
    _store(out_pointer, acc, offsets, mask, TO_ODD)


@triton.jit
def _address(table, row, count, t, TYPE: tl.constexpr):
    """Entry ``row * count + t`` of an int64 table of addresses, as a pointer to ``TYPE``."""
    return tl.load(table + row * count + t).to(tl.pointer_type(TYPE))


@triton.jit
def _combine_many_kernel(
    out_table,
    in_table,
    lengths,
    block_tensor,
    block_start,
    count,
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
    OUT: tl.constexpr,
    IN0: tl.constexpr,
    IN1: tl.constexpr,
    IN2: tl.constexpr,
    IN3: tl.constexpr,
    IN4: tl.constexpr,
    IN5: tl.constexpr,
    IN6: tl.constexpr,
    IN7: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """:func:`_combine_kernel` over many tensors in one launch: program ``p`` computes the
    ``BLOCK`` elements from ``block_start[p]`` of tensor ``block_tensor[p]``, whose addresses
    are in the tables (``in_table`` holds input ``i`` of tensor ``t`` at ``i * count + t``)."""
    program = tl.program_id(0)
    t = tl.load(block_tensor + program).to(tl.int64)
    offsets = tl.load(block_start + program) + tl.arange(0, BLOCK)
    mask = offsets < tl.load(lengths + t)
    acc = _accumulate(
        _address(in_table, 0, count, t, IN0),
        _address(in_table, 1 if INPUTS > 1 else 0, count, t, IN1),
        _address(in_table, 2 if INPUTS > 2 else 0, count, t, IN2),
        _address(in_table, 3 if INPUTS > 3 else 0, count, t, IN3),
        _address(in_table, 4 if INPUTS > 4 else 0, count, t, IN4),
        _address(in_table, 5 if INPUTS > 5 else 0, count, t, IN5),
        _address(in_table, 6 if INPUTS > 6 else 0, count, t, IN6),
        _address(in_table, 7 if INPUTS > 7 else 0, count, t, IN7),
        w0, w1, w2, w3, w4, w5, w6, w7,
        divisor, offsets, mask, INPUTS, ONES, DIVIDE,
    )  # fmt: skip
    _store(_address(out_table, 0, count, t, OUT), acc, offsets, mask, TO_ODD)


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
            float(divisor) if divide and divisor is not None else 1.0,
            INPUTS=len(sources),
            ONES=sum(1 << i for i, w in enumerate(weights) if w == 1),
            DIVIDE=divide,
            TO_ODD=destination.dtype in (torch.bfloat16, torch.float16),
            BLOCK=BLOCK,
            num_warps=_WARPS,
            enable_fp_fusion=False,
        )


@dataclass(frozen=True)
class Batch:
    """The launch tables of :func:`combine_many`: every tensor's addresses and length, and the
    tensor and first element of each program's block, on the GPU. Valid while the tensors it
    was made from keep their storage (the caller holds them and checks)."""

    device: torch.device
    out_dtype: torch.dtype
    in_dtypes: tuple[torch.dtype, ...]
    count: int
    programs: int
    out_table: torch.Tensor
    in_table: torch.Tensor
    lengths: torch.Tensor
    block_tensor: torch.Tensor
    block_start: torch.Tensor


def batchable(destination: torch.Tensor, sources: Sequence[torch.Tensor]) -> bool:
    """Whether ``destination`` and ``sources`` can join a :class:`Batch` (:func:`supports`,
    and not empty)."""
    return destination.numel() > 0 and supports(destination, sources)


def batch(destinations: Sequence[torch.Tensor], sources: Sequence[Sequence[torch.Tensor]]) -> Batch:
    """The tables for computing every ``destinations[t]`` from ``sources[t]`` (the same number
    of inputs each) in one launch. The destinations share a dtype, and input ``i`` of every
    tensor shares one; each tensor passes :func:`batchable`."""
    count = len(destinations)
    if count == 0 or len(sources) != count:
        raise ValueError(f"a batch needs one list of sources per destination ({count})")
    device = destinations[0].device
    out_dtype = destinations[0].dtype
    in_dtypes = tuple(s.dtype for s in sources[0])
    for destination, inputs in zip(destinations, sources, strict=True):
        if not batchable(destination, inputs):
            raise ValueError("every tensor of a batch must be one the Triton loop supports")
        if (
            destination.device != device
            or destination.dtype != out_dtype
            or tuple(s.dtype for s in inputs) != in_dtypes
        ):
            raise ValueError("a batch's tensors must share a device, and dtypes input by input")
    lengths = [d.numel() for d in destinations]
    blocks = [triton.cdiv(n, BLOCK_MANY) for n in lengths]
    addresses = [d.data_ptr() for d in destinations] + [
        inputs[i].data_ptr() for i in range(len(in_dtypes)) for inputs in sources
    ]
    table = _on_device(torch.tensor(addresses + lengths + blocks, dtype=torch.int64), device)
    programs = sum(blocks)
    counts = table[(2 + len(in_dtypes)) * count :]
    block_tensor = torch.repeat_interleave(
        torch.arange(count, dtype=torch.int32, device=device), counts, output_size=programs
    )
    first_block = torch.cumsum(counts, 0) - counts
    index = torch.arange(programs, dtype=torch.int64, device=device)
    block_start = (index - first_block[block_tensor]) * BLOCK_MANY
    return Batch(
        device=device,
        out_dtype=out_dtype,
        in_dtypes=in_dtypes,
        count=count,
        programs=programs,
        out_table=table[:count],
        in_table=table[count : (1 + len(in_dtypes)) * count],
        lengths=table[(1 + len(in_dtypes)) * count : (2 + len(in_dtypes)) * count],
        block_tensor=block_tensor,
        block_start=block_start,
    )


def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``table`` copied to ``device`` without waiting for the GPU: a copy from pageable memory
    synchronises the stream (the CPU would wait for every kernel queued before it, serialising
    a merge's Python with its kernels), one from pinned memory is queued like a kernel. The
    pinned buffer may be dropped at once: torch's pinned-memory cache keeps it until the copy
    is done."""
    if device.type != "cuda":  # Triton's CPU interpreter, in the tests
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def combine_many(
    tables: Batch, coefficients: Sequence[float], divisor: float | None = None
) -> None:
    """:func:`combine` for every tensor of ``tables`` in one launch, with the same
    coefficients and divisor: the same bits as one :func:`combine` per tensor."""
    inputs = len(tables.in_dtypes)
    if len(coefficients) != inputs:
        raise ValueError(f"{len(coefficients)} coefficients for {inputs} inputs")
    if tables.programs == 0:
        return
    weights = [float(c) for c in coefficients] + [0.0] * (MAX_INPUTS - inputs)
    types = [_TRITON_TYPES[d] for d in tables.in_dtypes] + [tl.float32] * (MAX_INPUTS - inputs)
    divide = divisor is not None and divisor != 1
    with _on(tables.device):
        _combine_many_kernel[(tables.programs,)](
            tables.out_table,
            tables.in_table,
            tables.lengths,
            tables.block_tensor,
            tables.block_start,
            tables.count,
            *weights,
            float(divisor) if divide and divisor is not None else 1.0,
            INPUTS=inputs,
            ONES=sum(1 << i for i, w in enumerate(weights[:inputs]) if w == 1),
            DIVIDE=divide,
            TO_ODD=tables.out_dtype in (torch.bfloat16, torch.float16),
            OUT=_TRITON_TYPES[tables.out_dtype],
            IN0=types[0],
            IN1=types[1],
            IN2=types[2],
            IN3=types[3],
            IN4=types[4],
            IN5=types[5],
            IN6=types[6],
            IN7=types[7],
            BLOCK=BLOCK_MANY,
            num_warps=_WARPS,
            enable_fp_fusion=False,
        )
