"""The reference loop: weighted sums in plain torch ops, accumulated in a wide dtype, rounded once.

Linear methods stream through cache-sized chunks: for each chunk, the accumulator (``dtype``,
float64 by default) takes ``w_0 x_0``, then ``+= (w_i x_i)`` in model order (the product rounded,
then the sum: never a fused multiply-add), is divided by the divisor, and is rounded once into the
destination's dtype. Nothing N-wide is ever stacked; the only extra memory is the chunk buffers.
It runs anywhere (any device, any accumulation dtype); the compiled and GPU loops must equal it
bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK_ELEMENTS = 1 << 16
"""Elements per chunk on the CPU: 512 KiB of float64, small enough to stay in L2 across the N
passes."""

ACCELERATOR_CHUNK_ELEMENTS = 1 << 24
"""Elements per chunk elsewhere (GPUs): 128 MiB of float64, so each chunk's few kernel launches
are amortised over enough memory traffic to keep the device busy."""

_HALF_TYPES = (torch.float16, torch.bfloat16)


class ChunkBuffers:
    """Per-device scratch buffers, allocated once per ``merge()`` call."""

    def __init__(
        self,
        dtype: torch.dtype,
        chunk: int = CHUNK_ELEMENTS,
        accelerator_chunk: int = ACCELERATOR_CHUNK_ELEMENTS,
    ) -> None:
        self.dtype = dtype
        self.chunk = chunk
        self.accelerator_chunk = accelerator_chunk
        self._buffers: dict[tuple[torch.device, torch.dtype, str], torch.Tensor] = {}

    def size(self, device: torch.device) -> int:
        """Chunk length on ``device``: cache-sized on the CPU, launch-amortising elsewhere."""
        return self.chunk if device.type == "cpu" else self.accelerator_chunk

    def get(self, device: torch.device, dtype: torch.dtype, role: str = "") -> torch.Tensor:
        """The buffer for ``role`` (buffers of different roles never share memory)."""
        key = (device, dtype, role)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(self.size(device), dtype=dtype, device=device)
        return buffer


def store_rounded(destination: torch.Tensor, value: torch.Tensor, scratch: torch.Tensor) -> None:
    """Write ``value`` into ``destination`` rounded once to the nearest (ties to even).

    torch converts float64 to float16/bfloat16 through float32, which rounds twice and is wrong
    whenever the float32 step lands on a half-way point. Rounding to float32 *to odd* first makes
    the second rounding exact (float32 keeps more than two extra bits), so the result is the
    correctly rounded value. ``scratch`` is a float32 buffer at least as long as ``value``.
    """
    if destination.dtype not in _HALF_TYPES or value.dtype != torch.float64:
        destination.copy_(value)
        return
    rounded = scratch[: value.numel()].view_as(value)
    rounded.copy_(value)
    back = rounded.to(torch.float64)
    needs_odd = (back != value) & ((rounded.view(torch.int32) & 1) == 0)
    if bool(needs_odd.any()):
        toward = torch.where(value > back, torch.inf, -torch.inf).to(torch.float32)
        rounded[needs_odd] = torch.nextafter(rounded[needs_odd], toward[needs_odd])
    destination.copy_(rounded)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a tensor (a contiguous copy only when no view exists)."""
    return tensor.reshape(-1)


def reference_combine(
    destination: torch.Tensor,
    sources: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    buffers: ChunkBuffers,
    divisor: float | None = None,
) -> None:
    """``destination = (sum_i coefficients[i] * sources[i]) / divisor`` in ``buffers.dtype``,
    in plain torch ops over chunks: the definition the compiled and GPU loops must equal.

    Sources may have any floating dtype and live on any device: each chunk is brought to the
    destination's device as it is read. ``destination`` may itself be one of the sources.
    """
    device = destination.device
    if destination.is_contiguous():
        target = destination.view(-1)
        write_back = None
    else:  # e.g. a transposed view: accumulate into a contiguous copy, then copy it back.
        write_back = destination
        target = torch.empty(destination.numel(), dtype=destination.dtype, device=device)
    flats = [_flat(s) for s in sources]
    accumulator = buffers.get(device, buffers.dtype)
    product = (
        buffers.get(device, buffers.dtype, "product")
        if any(c != 1 for c in coefficients[1:])
        else None
    )
    scratch = buffers.get(device, torch.float32) if destination.dtype in _HALF_TYPES else None
    chunk = buffers.size(device)
    first, rest = coefficients[0], list(zip(flats[1:], coefficients[1:]))
    total = target.numel()
    divide = divisor is not None and divisor != 1
    by: float | torch.Tensor = 1.0 if divisor is None else divisor
    if divide and device.type != "cpu":
        # torch divides a GPU tensor by a Python number as a product with its reciprocal, which
        # is not always the quotient; a divisor on the device is divided by exactly, as on the CPU.
        by = torch.tensor(by, dtype=buffers.dtype, device=device)
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        acc = accumulator[: stop - start]
        acc.copy_(flats[0][start:stop])
        if first != 1:
            acc.mul_(first)
        for flat, coefficient in rest:
            piece = flat[start:stop]
            if piece.device != device:
                piece = piece.to(device)
            if coefficient == 1:
                acc.add_(piece)
            else:  # the product rounded on its own, as the compiled loop does (never an FMA)
                assert product is not None  # allocated above for coefficients other than 1
                acc.add_(product[: stop - start].copy_(piece).mul_(coefficient))
        if scratch is not None:
            if divide:
                acc.div_(by)
            store_rounded(target[start:stop], acc, scratch)
        elif divide:  # divides in the accumulator's dtype and rounds once on the way out
            torch.div(acc, by, out=target[start:stop])
        else:
            target[start:stop].copy_(acc)
    if write_back is not None:
        write_back.copy_(target.view(write_back.shape))


def store_whole(destination: torch.Tensor, value: torch.Tensor, buffers: ChunkBuffers) -> None:
    """Write a whole-tensor method's result (in the accumulation dtype) into ``destination``."""
    value = value.to(destination.device)
    if destination.dtype in _HALF_TYPES and value.dtype == torch.float64:
        flat_value = value.reshape(-1)
        scratch = buffers.get(destination.device, torch.float32)
        target = destination.view(-1) if destination.is_contiguous() else None
        out = (
            target if target is not None else torch.empty_like(flat_value, dtype=destination.dtype)
        )
        chunk = buffers.size(destination.device)
        for start in range(0, flat_value.numel(), chunk):
            stop = min(start + chunk, flat_value.numel())
            store_rounded(out[start:stop], flat_value[start:stop], scratch)
        if target is None:
            destination.copy_(out.view(destination.shape))
    else:
        destination.copy_(value.view(destination.shape))
