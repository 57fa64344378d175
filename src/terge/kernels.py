"""The hot loop: weighted sums accumulated in a wide dtype, rounded once.

Linear methods stream through cache-sized chunks: for each chunk, the accumulator (``dtype``,
float64 by default) takes ``w_0 x_0``, then ``+= (w_i x_i)`` in model order (the product rounded,
then the sum: never a fused multiply-add), is divided by the divisor, and is rounded once into the
destination's dtype. Nothing N-wide is ever stacked; the only extra memory is the chunk buffers.

Two implementations compute exactly that. The plain-torch loop below is the reference and runs
anywhere (any device, any accumulation dtype). On the CPU with float64 accumulation, the compiled
loop in ``_fastloop.c`` does the same arithmetic in one fused pass over memory, split between the
cores, when it was built at install; on CUDA GPUs, the Triton kernel in ``triton_loop.py`` does,
when Triton is installed (it comes with PyTorch's CUDA builds). The tests check each agrees with
the reference bit for bit. Setting the environment variable ``TERGE_KERNELS=torch`` forces the
reference.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

try:
    from . import _fastloop
except ImportError:  # not compiled (no C compiler at install): the reference loop does the work
    _fastloop = None  # type: ignore[assignment]

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


_CODES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
"""dtype codes understood by ``_fastloop.combine``."""

_MAX_FUSED_INPUTS = 64
_PER_THREAD = 1 << 18
"""Fewest elements worth handing to another thread (smaller tensors run in the caller's)."""
_ALIGN = 64
"""Thread ranges start on multiples of this many elements, so no cache line is shared."""


def _reference_forced() -> bool:
    return os.environ.get("TERGE_KERNELS", "").lower() == "torch"


def fast_loop_available() -> bool:
    """Whether the compiled loop is built and not switched off by ``TERGE_KERNELS=torch``."""
    return _fastloop is not None and not _reference_forced()


_triton_loop: Any = None
"""``terge.triton_loop`` once imported, ``False`` where Triton is missing or broken."""


def gpu_loop() -> Any:
    """The Triton loop module, imported on first use (a CPU-only merge never pays for it), or
    ``None`` where Triton is not installed or ``TERGE_KERNELS=torch`` forces the reference."""
    global _triton_loop
    if _reference_forced():
        return None
    if _triton_loop is None:
        try:
            from . import triton_loop
        except Exception:  # no Triton, or one that does not load: the reference loop works
            _triton_loop = False
        else:
            _triton_loop = triton_loop
    return _triton_loop or None


_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    """The worker threads, started on first use and again in a forked child (which inherits the
    pool object but not its threads: submitting to it would wait forever)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(
                max_workers=max(1, torch.get_num_threads()), thread_name_prefix="terge"
            )
            _pool_pid = os.getpid()
        return _pool


def _plain(tensor: torch.Tensor) -> bool:
    return (
        tensor.device.type == "cpu"
        and tensor.dtype in _CODES
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
        and (type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter)
    )


def _fused(
    target: torch.Tensor,
    flats: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    divisor: float | None,
) -> None:
    """The compiled loop over ``target``, its range split into one piece per thread."""
    total = target.numel()
    out_code, out_size = _CODES[target.dtype], target.element_size()
    codes = [_CODES[f.dtype] for f in flats]
    sizes = [f.element_size() for f in flats]
    pointers = [f.data_ptr() for f in flats]
    weights = [float(c) for c in coefficients]
    divide = None if divisor is None or divisor == 1 else float(divisor)
    workers = min(torch.get_num_threads(), max(1, total // _PER_THREAD))

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

    if workers == 1:
        part(0, total)
        return
    step = -(-total // workers // _ALIGN) * _ALIGN
    bounds = [(start, min(start + step, total)) for start in range(0, total, step)]
    pool = _threads()
    futures = [pool.submit(part, start, stop) for start, stop in bounds[1:]]
    part(*bounds[0])
    for future in futures:
        future.result()


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
    if destination.is_cuda and buffers.dtype == torch.float64:
        loop = gpu_loop()
        flats = [_flat(s) for s in sources]
        if loop is not None and loop.supports(destination, flats):
            loop.combine(destination.view(-1), flats, coefficients, divisor)
            return
    if (
        buffers.dtype == torch.float64
        and fast_loop_available()
        and len(sources) <= _MAX_FUSED_INPUTS
    ):
        flats = [_flat(s) for s in sources]
        if _plain(destination) and all(_plain(f) for f in flats):
            _fused(destination, flats, coefficients, divisor)
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
    if divide and device.type != "cpu":
        # torch divides a GPU tensor by a Python number as a product with its reciprocal, which
        # is not always the quotient; a divisor on the device is divided by exactly, as on the CPU.
        divisor = torch.tensor(divisor, dtype=buffers.dtype, device=device)
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
                acc.add_(product[: stop - start].copy_(piece).mul_(coefficient))
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
        chunk = buffers.size(destination.device)
        for start in range(0, flat_value.numel(), chunk):
            stop = min(start + chunk, flat_value.numel())
            store_rounded(out[start:stop], flat_value[start:stop], scratch)
        if target is None:
            destination.copy_(out.view(destination.shape))
    else:
        destination.copy_(value.view(destination.shape))
