"""The linear merge as a compiled CPU loop: ``_fastloop.c`` driven over threads.

It computes exactly what :func:`terge.kernels.reference.reference_combine` does (products
rounded on their own, never a fused multiply-add; one division; one rounding), in one pass over
memory. Built at install where a C compiler is present; otherwise the reference runs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

from .cpu import DTYPE_CODES, PER_THREAD, plain, reference_forced, run, split

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


def partition(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Ranges of tensor indices with about equal elements, one per thread (a single range when
    the tensors together are too small to be worth another thread)."""
    total = sum(lengths)
    workers = min(torch.get_num_threads(), max(1, total // PER_THREAD), max(1, len(lengths)))
    if workers == 1:
        return [(0, len(lengths))]
    parts: list[tuple[int, int]] = []
    start = seen = 0
    for index, length in enumerate(lengths):
        # The share ends inside this tensor: cut before or after it, whichever leaves the range
        # nearer its share (ResNet-50 split after its crossing tensor: 14.6M against 11.0M
        # elements; before it, 12.5M against 13.1M).
        while len(parts) < workers - 1 and (seen + length) * workers >= total * (len(parts) + 1):
            target = total * (len(parts) + 1) / workers
            if target - seen < seen + length - target and index > start:
                parts.append((start, index))
                start = index
            else:
                parts.append((start, index + 1))
                start = index + 1
                break
        seen += length
    parts.append((start, len(lengths)))
    return [part for part in parts if part[0] < part[1]]


def combine_many(
    out_code: int,
    outs: Sequence[int],
    lengths: Sequence[int],
    codes: Sequence[int],
    inputs: Sequence[Sequence[int]],
    coefficients: Sequence[float],
    divisor: float | None,
    parts: Sequence[tuple[int, int]] | None = None,
) -> None:
    """The compiled loop over many tensors at once, given as addresses (``data_ptr()``) and
    lengths: ``outs[j] = (sum_i coefficients[i] * inputs[i][j]) / divisor``, each tensor exactly
    as :func:`combine` computes it, without a Python call per tensor.

    ``parts`` (from :func:`partition`) splits the tensors between threads; the caller checks
    that every address is a plain CPU tensor of its code (:func:`terge.kernels.cpu.plain`).
    """
    weights = [float(c) for c in coefficients]
    divide = None if divisor is None or divisor == 1 else float(divisor)
    if parts is None:
        parts = partition(lengths)

    def part(start: int, stop: int) -> None:
        _fastloop.combine_many(
            out_code,
            outs[start:stop],
            lengths[start:stop],
            codes,
            [addresses[start:stop] for addresses in inputs],
            weights,
            divide,
        )

    if len(parts) == 1 and parts[0] == (0, len(outs)):
        _fastloop.combine_many(out_code, outs, lengths, codes, inputs, weights, divide)
        return
    if getattr(_fastloop, "SHARED_WORK", 0):
        # As many threads as parts, claiming 256K-element pieces in order from one counter: they
        # stay balanced whatever the caches hold (a fixed split by elements left one thread
        # waiting on the other when their tensors were not equally cached).
        counter = torch.zeros(1, dtype=torch.int64)
        if len(parts) <= torch.get_num_threads() and openmp_team():
            # torch's own OpenMP threads, in one call (see openmp_team)
            _fastloop.combine_many(
                out_code, outs, lengths, codes, inputs, weights, divide, counter.data_ptr(),
                len(parts),
            )  # fmt: skip
            return
        shared = functools.partial(
            _fastloop.combine_many,
            out_code,
            outs,
            lengths,
            codes,
            inputs,
            weights,
            divide,
            counter.data_ptr(),
        )
        run([shared] * len(parts))
        return
    run([functools.partial(part, start, stop) for start, stop in parts])


_team_pid: int | None = None
_team = False


def openmp_team() -> bool:
    """Whether :func:`combine_many`'s threads are torch's own OpenMP threads (Linux, a torch
    built with OpenMP, ``TERGE_OPENMP`` not ``0``): right after one of torch's parallel loops
    (an optimizer step) those threads spin waiting for more work on the cores that threads of
    terge's own would need, and an EMA update waited for its second thread (a transformer's
    1,281 tensors right after a torch op: a median of 6.2-6.5 ms against 4.3-4.4 ms 5 ms
    later). Found once per process (a forked child asks again, and uses threads of its own)."""
    global _team_pid, _team
    if os.environ.get("TERGE_OPENMP", "") == "0" or not available():
        return False
    pid = os.getpid()
    if _team_pid != pid:
        _team_pid = pid
        _team = _parent_team_ok(pid) and any(_fastloop.join_team(path) for path in _loaded_openmp())
    return _team


_first_pid = os.getpid()


def _parent_team_ok(pid: int) -> bool:
    """Only the process that imported terge joins the team: an OpenMP runtime is not promised
    to work in a forked child of a process that used its threads."""
    return pid == _first_pid


def _loaded_openmp() -> list[str]:
    """Paths of the OpenMP runtimes loaded in this process, from ``/proc/self/maps`` (none
    elsewhere), in the order :func:`openmp_paths` gives."""
    try:
        with open("/proc/self/maps") as maps:
            return openmp_paths(maps.read().splitlines())
    except OSError:
        return []


def openmp_paths(maps: list[str]) -> list[str]:
    """The OpenMP runtimes among the mapped files of ``/proc/self/maps`` lines: GNU's libgomp
    first (the one torch's Linux wheels use), then Intel's libiomp5; each path once."""
    paths = {line.split(maxsplit=5)[-1] for line in maps if line.count(" ") >= 5}
    found = [p for p in paths if "/libgomp" in p or "/libiomp5" in p]
    return sorted(found, key=lambda p: ("/libgomp" not in p, p))
