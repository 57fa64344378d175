"""Reading ahead of a merge: the next tensors' bytes asked of the disk while this one computes.

A merge from checkpoints larger than memory reads every input once, through memory maps. Left to
page faults, the disk sees small reads scattered over three or more files and two threads, and
the merge waits on each one: measured at 2.4x to 6.8x the time of ``cat``-ing the inputs. Asking
the kernel for each coming tensor's whole byte range (``posix_fadvise(WILLNEED)``, which queues
the reads and returns) lets the disk stream while the CPU computes, so the merge runs at the
disk's pace. A background thread does the asking, because queueing the reads can block once the
disk's queue is full, and the compute thread must not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from types import TracebackType

WINDOW = 512 << 20
"""Bytes asked for ahead of the tensor being computed (at least the next tensor's, whatever its
size): enough to keep a disk busy for a while, a small share of any machine's page cache."""


class Readahead:
    """Calls ``jobs[i]()`` (each starts reading one step's inputs and returns the bytes it asked
    for) ahead of the consumer, in order: the job right after the consumer's always, later ones
    while less than ``window`` bytes are asked for and not yet consumed; jobs the consumer has
    passed are skipped. Tell it where the consumer is with :meth:`reached`.

    Only a hint to the kernel: a job that fails or a thread that lags changes nothing but speed.
    """

    def __init__(self, jobs: Sequence[Callable[[], int]], window: int = WINDOW) -> None:
        self._jobs = list(jobs)
        self._window = window
        self._sizes: list[int] = []  # bytes asked for by each job done so far
        self._consumer = 0  # the job whose inputs are being computed now
        self._closed = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        if len(self._jobs) > 1:
            self._thread = threading.Thread(target=self._run, name="terge-readahead", daemon=True)
            self._thread.start()

    def reached(self, index: int) -> None:
        """The consumer is about to read job ``index``'s inputs: the window moves on."""
        with self._changed:
            self._consumer = index
            self._changed.notify()

    def close(self) -> None:
        """Stop asking; waits for the thread (a job in progress finishes first)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Readahead:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _ahead(self) -> int:
        """Bytes asked for and not yet consumed (the consumer's own job counts as consumed)."""
        return sum(self._sizes[self._consumer + 1 :])

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed and not self._due():
                    self._changed.wait()
                if self._closed:
                    return
                following = len(self._sizes)
                if following < self._consumer:  # already read by the consumer: too late
                    self._sizes.append(0)
                    continue
                job = self._jobs[following]
            try:
                size = job()
            except Exception:  # a hint only: the consumer reads what it needs anyway
                size = 0
            with self._changed:
                self._sizes.append(size)

    def _due(self) -> bool:
        """Whether the next job should run now: there is one, and it is the one right after the
        consumer's (always read ahead by one) or the window has room."""
        following = len(self._sizes)
        if following >= len(self._jobs):
            return False
        if following <= self._consumer + 1:
            return True
        return self._ahead() < self._window
