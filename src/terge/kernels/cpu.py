"""What the compiled CPU loops share: which tensors they take, and how work is split into threads.

Both compiled loops (``_fastloop.c`` for linear merges, ``_fastmethods.c`` for the task-vector
methods) read and write raw memory in one of four float dtypes, so a tensor qualifies only when
it is a plain dense CPU tensor of such a dtype. A tensor is split into one contiguous range per
thread, each starting on a cache-line boundary; the first range runs in the calling thread.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
"""dtype codes understood by the compiled loops (``_convert.h``)."""

PER_THREAD = 1 << 18
"""Fewest elements worth handing to another thread (smaller tensors run in the caller's)."""
ALIGN = 64
"""Thread ranges start on multiples of this many elements, so no cache line is shared."""

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


def reference_forced() -> bool:
    """Whether ``TERGE_KERNELS=torch`` asks for the plain-torch reference everywhere."""
    return os.environ.get("TERGE_KERNELS", "").lower() == "torch"


def threads() -> ThreadPoolExecutor:
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


def plain(tensor: torch.Tensor) -> bool:
    """Whether the compiled loops can read or write ``tensor`` as raw memory."""
    # the cheapest tests first (a merge asks this of every input of every small step)
    return (
        (type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter)
        and tensor.is_cpu
        and tensor.dtype in DTYPE_CODES
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
    )


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share memory other than element for element (the loops read each
    element of the inputs before writing the same element of the destination, nothing more)."""
    if a.data_ptr() == b.data_ptr() and a.element_size() == b.element_size():
        return False
    a_end = a.data_ptr() + a.numel() * a.element_size()
    b_end = b.data_ptr() + b.numel() * b.element_size()
    return a.data_ptr() < b_end and b.data_ptr() < a_end


def ranges(total: int) -> list[tuple[int, int]]:
    """One range of ``total`` elements per thread (a single range for small tensors)."""
    workers = min(torch.get_num_threads(), max(1, total // PER_THREAD))
    if workers == 1:
        return [(0, total)]
    step = -(-total // workers // ALIGN) * ALIGN
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def run(parts: Sequence[Callable[[], T]]) -> list[T]:
    """Call each of ``parts``, the first in this thread and the others in the worker threads."""
    if len(parts) <= 1:
        return [part() for part in parts]
    futures = [threads().submit(part) for part in parts[1:]]
    first = parts[0]()
    return [first, *(future.result() for future in futures)]


def split(total: int, part: Callable[[int, int], object]) -> None:
    """Call ``part(start, stop)`` for each thread's range of ``total`` elements."""
    run([functools.partial(part, start, stop) for start, stop in ranges(total)])
