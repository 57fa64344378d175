"""The chunked hot loop: weighted sums accumulated in a wide dtype, rounded once.

Linear methods stream through cache-sized chunks: for each chunk, the accumulator (``dtype``,
float64 by default) takes ``w_0 x_0``, then ``+= w_i x_i`` in model order, and is rounded once into
the destination's dtype. Nothing N-wide is ever stacked; the only extra memory is the chunk buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CHUNK_ELEMENTS = 1 << 16
"""Elements per chunk: 512 KiB of float64, small enough to stay in L2 across the N passes."""

_HALF_TYPES = (torch.float16, torch.bfloat16)


class ChunkBuffers:
    """Per-device scratch buffers, allocated once per ``merge()`` call."""

    def __init__(self, dtype: torch.dtype, chunk: int = CHUNK_ELEMENTS) -> None:
        self.dtype = dtype
        self.chunk = chunk
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(self.chunk, dtype=dtype, device=device)
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


def linear_combine(
    destination: torch.Tensor,
    sources: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    buffers: ChunkBuffers,
    divisor: float | None = None,
) -> None:
    """``destination = (sum_i coefficients[i] * sources[i]) / divisor`` in ``buffers.dtype``.

    Sources may have any floating dtype and live on any device: each chunk is brought to the
    destination's device as it is read. ``destination`` may itself be one of the sources.
    """
    if destination.numel() == 0:
        return
    device = destination.device
    if destination.is_contiguous():
        target = destination.view(-1)
        write_back = None
    else:  # e.g. a transposed view: accumulate into a contiguous copy, then copy it back.
        write_back = destination
        target = torch.empty(destination.numel(), dtype=destination.dtype, device=device)
    flats = [_flat(s) for s in sources]
    accumulator = buffers.get(device, buffers.dtype)
    scratch = buffers.get(device, torch.float32) if destination.dtype in _HALF_TYPES else None
    chunk = buffers.chunk
    first, rest = coefficients[0], list(zip(flats[1:], coefficients[1:]))
    total = target.numel()
    divide = divisor is not None and divisor != 1
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
            acc.add_(piece, alpha=coefficient)
        if scratch is not None:
            if divide:
                acc.div_(divisor)
            store_rounded(target[start:stop], acc, scratch)
        elif divide:  # divides in the accumulator's dtype and rounds once on the way out
            torch.div(acc, divisor, out=target[start:stop])
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
        for start in range(0, flat_value.numel(), buffers.chunk):
            stop = min(start + buffers.chunk, flat_value.numel())
            store_rounded(out[start:stop], flat_value[start:stop], scratch)
        if target is None:
            destination.copy_(out.view(destination.shape))
    else:
        destination.copy_(value.view(destination.shape))
