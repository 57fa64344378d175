"""Reading ahead: a merge from files asks the disk for the coming tensors' bytes while it
computes, within a window, in order, as a hint that can never change a result or fail a merge."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import terge
import terge.execute
from terge.io import CheckpointReader
from terge.io.readahead import Readahead

from helpers import same_bits

needs_fadvise = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the read-ahead thread did not get there"
        time.sleep(0.002)


class Jobs:
    """Jobs that record when they ran, each 'reading' ``size`` bytes."""

    def __init__(self, sizes):
        self.sizes = sizes
        self.ran: list[int] = []
        self.lock = threading.Lock()

    def job(self, index):
        def run():
            with self.lock:
                self.ran.append(index)
            if self.sizes[index] < 0:
                raise OSError("the file vanished")
            return self.sizes[index]

        return run

    def all(self):
        return [self.job(i) for i in range(len(self.sizes))]


def test_it_reads_ahead_in_order_while_less_than_the_window_is_ahead():
    jobs = Jobs([100, 100, 100, 100, 500, 100, 100])

    def settled(count):
        wait_for(lambda: len(jobs.ran) >= count)
        time.sleep(0.05)  # room for a wrong extra job to run
        return list(jobs.ran)

    with Readahead(jobs.all(), window=250) as readahead:
        assert settled(4) == [0, 1, 2, 3]  # 1 to 3 are 300 bytes ahead of job 0: it stops
        readahead.reached(1)  # 200 ahead: one more, however large
        assert settled(5) == [0, 1, 2, 3, 4]
        readahead.reached(3)  # job 4's 500 bytes are still ahead
        assert settled(5) == [0, 1, 2, 3, 4]
        readahead.reached(4)  # the next job is always asked for
        assert settled(7) == [0, 1, 2, 3, 4, 5, 6]


def test_jobs_the_consumer_has_passed_are_skipped():
    jobs = Jobs([10] * 6)
    with Readahead(jobs.all(), window=5) as readahead:
        wait_for(lambda: len(jobs.ran) >= 2)
        readahead.reached(4)
        wait_for(lambda: len(jobs.ran) >= 4)
    assert jobs.ran == [0, 1, 4, 5]


def test_a_failing_job_is_only_a_missed_hint_and_close_stops_the_thread():
    jobs = Jobs([-1, 10, 10])
    readahead = Readahead(jobs.all(), window=1 << 20)
    wait_for(lambda: len(jobs.ran) == 3)
    readahead.close()
    assert not any(t.name == "terge-readahead" and t.is_alive() for t in threading.enumerate())
    assert readahead._sizes == [0, 10, 10]


def test_one_job_or_none_starts_no_thread():
    before = threading.active_count()
    with Readahead([lambda: 1]):
        assert threading.active_count() == before


@needs_fadvise
def test_a_reader_asks_for_a_safetensors_tensors_exact_bytes(tmp_path, monkeypatch):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7, dtype=torch.float64), "c": torch.ones(0)}
    save_file(tensors, tmp_path / "m.safetensors")
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(
        os,
        "posix_fadvise",
        lambda fd, off, n, how: advised.append((off, n, how)) or real(fd, off, n, how),
    )
    size = (tmp_path / "m.safetensors").stat().st_size
    with CheckpointReader(tmp_path / "m.safetensors") as reader:
        assert reader.prefetch("a") == 60
        assert reader.prefetch("b") == 56
        assert reader.prefetch("c") == 0  # nothing to read
        assert reader.prefetch("no such tensor") == 0
        a_view = reader.view("a")
    assert reader.prefetch("a") == 0  # closed: nothing asked
    assert [n for _, n, _ in advised] == [60, 56]
    assert all(how == os.POSIX_FADV_WILLNEED for _, _, how in advised)
    assert all(off > 0 and off + n <= size for off, n, _ in advised)
    raw = (tmp_path / "m.safetensors").read_bytes()
    offset_a = advised[0][0]
    assert raw[offset_a : offset_a + 60] == a_view.numpy().tobytes()


def test_a_torch_file_asks_for_nothing(tmp_path):
    torch.save({"a": torch.randn(4)}, tmp_path / "m.pt")
    with CheckpointReader(tmp_path / "m.pt") as reader:
        assert reader.prefetch("a") == 0


@needs_fadvise
def test_a_merge_from_files_reads_every_input_ahead_and_writes_the_same_bits(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    names = [f"layer{i}.weight" for i in range(6)]
    paths = []
    for m in range(3):
        state = {n: torch.randn(64, 32, generator=generator) for n in names}
        save_file(state, tmp_path / f"m{m}.safetensors")
        paths.append(tmp_path / f"m{m}.safetensors")
    expected = terge.merge([load_file(p) for p in paths], progress=False)  # in memory

    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(
        os, "posix_fadvise", lambda fd, off, n, how: advised.append(n) or real(fd, off, n, how)
    )
    run_step = terge.execute.run_step

    def slow_step(*args, **kwargs):  # a step that takes time, as a large tensor's does
        time.sleep(0.02)
        return run_step(*args, **kwargs)

    monkeypatch.setattr(terge.execute, "run_step", slow_step)
    terge.merge(paths, progress=False, out=tmp_path / "out")
    assert len(advised) == 3 * len(names)  # every tensor of every input, once
    assert set(advised) == {64 * 32 * 4}
    written = load_file(tmp_path / "out" / "model.safetensors")
    for name in names:
        assert same_bits(written[name], expected[name])


def test_in_memory_merges_start_no_read_ahead_thread(monkeypatch):
    started = []
    real_start = threading.Thread.start

    def start(self):
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    models = [torch.nn.Linear(4, 4) for _ in range(3)]
    terge.merge(models, progress=False)
    assert "terge-readahead" not in started


def stopped(readahead: Readahead, jobs: Jobs) -> list[int]:
    """The jobs run once the thread is closed, checking that it would run no more: either a
    wrong extra job ran before ``close``, or the thread would have run it next."""
    readahead.close()
    assert not readahead._due()
    return jobs.ran


def test_jobs_are_asked_for_while_less_than_the_window_is_ahead_not_when_it_is_reached():
    jobs = Jobs([100] * 4)
    readahead = Readahead(jobs.all(), window=200)
    wait_for(lambda: len(jobs.ran) >= 3)  # jobs 1 and 2: 100 bytes ahead, less than 200
    assert stopped(readahead, jobs) == [0, 1, 2]  # with job 2, 200 bytes ahead: no more


def test_the_next_job_is_asked_for_even_with_no_window():
    jobs = Jobs([10] * 4)
    readahead = Readahead(jobs.all(), window=0)
    wait_for(lambda: len(jobs.ran) >= 2)
    readahead.reached(1)
    wait_for(lambda: len(jobs.ran) >= 3)
    assert stopped(readahead, jobs) == [0, 1, 2]


def test_two_jobs_start_a_thread_that_reads_the_second_ahead():
    jobs = Jobs([10, 10])
    with Readahead(jobs.all(), window=0) as readahead:
        assert readahead._thread is not None
        wait_for(lambda: len(jobs.ran) == 2)
    assert jobs.ran == [0, 1]


def test_the_default_window_is_half_a_gibibyte():
    jobs = Jobs([1, 300 << 20, 300 << 20, 1])
    readahead = Readahead(jobs.all())
    wait_for(lambda: len(jobs.ran) >= 3)  # 300 MiB ahead, less than 512 MiB
    assert stopped(readahead, jobs) == [0, 1, 2]  # 600 MiB ahead: no more


def test_the_thread_waits_quietly_past_the_last_job_until_closed(monkeypatch):
    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    jobs = Jobs([10] * 3)
    readahead = Readahead(jobs.all(), window=1 << 20)
    wait_for(lambda: len(jobs.ran) == 3)
    readahead.reached(2)
    assert stopped(readahead, jobs) == [0, 1, 2]
    assert crashed == []
