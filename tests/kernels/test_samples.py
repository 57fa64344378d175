"""The samples that place the thresholds' brackets (``_fastmethods.sample``, ``kth_many``): drawn
in runs of 16 from every thread alike, and their order statistics exact; and a small tensor's
thresholds in one call (``small_thresholds``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from terge.kernels import fastmethods

from helpers import count_calls, fast, reference, same_bits

needs_loops = pytest.mark.skipif(
    fastmethods._fastmethods is None,
    reason="terge.kernels._fastmethods is not built (pip install -e .)",
)


def draw(base, tensors, m, start=0, stop=-1, out=None):
    out = torch.zeros(len(tensors) * m, dtype=torch.int64) if out is None else out
    fastmethods._fastmethods.sample(
        base.data_ptr(),
        1,
        base.numel(),
        [t.data_ptr() for t in tensors],
        [1] * len(tensors),
        m,
        out.data_ptr(),
        False,
        start,
        stop,
    )
    return out


@needs_loops
@pytest.mark.parametrize("n", [100_003, 4096, 1 << 20])
def test_samples_are_runs_of_16_entries_of_each_task_vector(n):
    """Every sample is a magnitude of the task vector, in runs of 16 adjacent entries, each
    run inside its stratum and, where the stratum has room, starting on a multiple of 16."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(n, generator=generator)
    tensors = [base + torch.randn(n, generator=generator) for _ in range(2)]
    m = 4096
    out = draw(base, tensors, m)
    magnitudes = [(t.double() - base.double()).abs().view(torch.int64) for t in tensors]
    for i, magnitude in enumerate(magnitudes):
        row = out[i * m : (i + 1) * m].view(-1, 16)
        for r, values in enumerate(row.tolist()):
            start = magnitude.tolist().index(values[0]) if r < 3 else None
            if start is not None:  # the first runs located exactly
                assert magnitude[start : start + 16].tolist() == values
                assert n * r // (m // 16) <= start <= n * (r + 1) // (m // 16) - 16
                assert start % 16 == 0 or n // (m // 16) < 32


@needs_loops
def test_threads_taking_shares_of_the_runs_draw_the_same_samples():
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(300_000, generator=generator)
    tensors = [base + torch.randn(300_000, generator=generator) for _ in range(3)]
    m = 1 << 14
    whole = draw(base, tensors, m)
    parts = torch.zeros_like(whole)
    runs = m // 16
    for start, stop in [(0, 100), (100, 101), (101, runs // 2), (runs // 2, runs)]:
        draw(base, tensors, m, start, stop, parts)
    assert torch.equal(whole, parts)


@needs_loops
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_brackets_samples_do_not_depend_on_the_threads(threads, monkeypatch):
    """The thresholds, hence the bits, with the samples drawn by 1, 2 or 3 threads."""
    monkeypatch.setenv("TERGE_KERNELS", "auto")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    calls = count_calls(monkeypatch, fastmethods._fastmethods, "sample")
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(8_500_000, generator=generator)
    tensors = [base + torch.randn(8_500_000, generator=generator) for _ in range(2)]
    method = fastmethods_method()
    expected = reference(method, torch.float32, base, tensors, [1.0, 1.0], None)
    assert same_bits(fast(method, torch.float32, base, tensors, [1.0, 1.0], None, False), expected)
    assert calls["sample"] == threads  # 8.5M entries: 20,826 samples, 16K and more drawn in threads


def fastmethods_method():
    from terge import methods

    return methods.breadcrumbs(density=0.2, gamma=0.05)


@needs_loops
@pytest.mark.parametrize(
    ("m", "start", "stop", "message"),
    [
        (24, 0, -1, r"sample: n >= m, m a multiple of 16"),
        (8, 0, -1, r"sample: n >= m, m a multiple of 16"),
        (1 << 20, 0, -1, r"sample: n >= m, m a multiple of 16"),
        (32, 1, 0, r"sample: runs 0 <= start <= stop <= m / 16"),
        (32, -2, 1, r"sample: runs 0 <= start <= stop <= m / 16"),
        (32, 0, 3, r"sample: runs 0 <= start <= stop <= m / 16"),
    ],
)
def test_sample_refuses_bad_counts_and_runs(m, start, stop, message):
    base = torch.zeros(1000)
    with pytest.raises(ValueError, match=message):
        draw(base, [base], m, start, stop, out=torch.zeros(64, dtype=torch.int64))


VALUES = st.lists(
    st.one_of(st.integers(0, 2**63 - 1), st.sampled_from([0, 1, 2**52, 2**62, 2**63 - 1])),
    min_size=1,
    max_size=3000,
)


@needs_loops
@settings(max_examples=300, deadline=None)
@given(values=VALUES, ks=st.lists(st.integers(1, 3000), min_size=0, max_size=16))
def test_kth_many_gives_each_order_statistic_and_its_ties(values, ks):
    ks = [min(k, len(values)) for k in ks]
    tensor = torch.tensor(values, dtype=torch.int64)
    got = fastmethods._fastmethods.kth_many(tensor.data_ptr(), len(values), ks)
    assert sorted(tensor.tolist()) == sorted(values)  # permuted at most
    ordered = sorted(values, reverse=True)
    assert got == [(ordered[k - 1], values.count(ordered[k - 1])) for k in ks]


@needs_loops
@pytest.mark.parametrize(
    ("ks", "message"),
    [
        ([0], r"k = 0 is not between 1 and 5"),
        ([6], r"k = 6 is not between 1 and 5"),
        ([1] * 17, "kth_many: at most 16 ranks"),
    ],
)
def test_kth_many_refuses_bad_ranks(ks, message):
    tensor = torch.arange(5)
    with pytest.raises(ValueError, match=message):
        fastmethods._fastmethods.kth_many(tensor.data_ptr(), 5, ks)


def small(base, tensors, ranks, scratch=None):
    scratch = torch.zeros(base.numel(), dtype=torch.int64) if scratch is None else scratch
    codes = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
    return fastmethods._fastmethods.small_thresholds(
        base.data_ptr(),
        codes[base.dtype],
        base.numel(),
        [t.data_ptr() for t in tensors],
        [codes[t.dtype] for t in tensors],
        ranks,
        scratch.data_ptr(),
    )


@needs_loops
@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 3000),
    dtypes=st.lists(
        st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
        min_size=2,
        max_size=4,
    ),
    seed=st.integers(0, 2**16),
    ranks=st.lists(st.lists(st.integers(1, 3000), max_size=3), min_size=3, max_size=3),
)
def test_small_thresholds_are_each_task_vectors_order_statistics(n, dtypes, seed, ranks):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=generator)
    tensors = [(base + torch.randn(n, generator=generator)).to(d) for d in dtypes[1:]]
    base = base.to(dtypes[0])
    ranks = [[min(k, n) for k in r] for r in ranks[: len(tensors)]]
    got = small(base, tensors, ranks)
    for tensor, asked, found in zip(tensors, ranks, got, strict=True):
        magnitudes = (tensor.double() - base.double()).abs().view(torch.int64).tolist()
        ordered = sorted(magnitudes, reverse=True)
        assert found == [(ordered[k - 1], magnitudes.count(ordered[k - 1])) for k in asked]


@needs_loops
@pytest.mark.parametrize(
    ("ranks", "n", "message"),
    [
        ([[1]], 4, "small_thresholds: one list of ranks a model, n >= 1"),
        ([[1], [1], [1]], 4, "small_thresholds: one list of ranks a model, n >= 1"),
        ([[1], [1]], 0, "small_thresholds: one list of ranks a model, n >= 1"),
        ([[1], [5]], 4, r"k = 5 is not between 1 and 4"),
        ([[0], [1]], 4, r"k = 0 is not between 1 and 4"),
        ([[1] * 17, [1]], 4, "kth_many: at most 16 ranks"),
    ],
)
def test_small_thresholds_refuses_bad_ranks(ranks, n, message):
    base, scratch = torch.zeros(4), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        fastmethods._fastmethods.small_thresholds(
            base.data_ptr(), 1, n, [base.data_ptr()] * 2, [1, 1], ranks, scratch.data_ptr()
        )


@needs_loops
def test_a_small_tensor_takes_one_call(monkeypatch):
    monkeypatch.setenv("TERGE_KERNELS", "auto")
    calls = count_calls(monkeypatch, fastmethods._fastmethods, "small_thresholds", "scan")
    generator = torch.Generator().manual_seed(4)
    base = torch.randn(3000, generator=generator)
    tensors = [base + torch.randn(3000, generator=generator) for _ in range(3)]
    method = fastmethods_method()
    expected = reference(method, torch.float32, base, tensors, [1.0, 0.5, 0.25], None)
    got = fast(method, torch.float32, base, tensors, [1.0, 0.5, 0.25], None, False)
    assert same_bits(got, expected)
    assert calls == {"small_thresholds": 1, "scan": 0}
