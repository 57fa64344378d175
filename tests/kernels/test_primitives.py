"""The exact primitives under the task-vector methods, and sharded merges emulated in one process.

The k-th largest magnitude (radix selection) against ``torch.kthvalue``; DARE's counter-based draw
against a pure-Python reference; a shard's global indices against slicing; and every method run
shard by shard (threads standing in for ranks, summing through a barrier) against the whole.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from terge import methods
from terge.kernels.primitives import (
    DRAW_CHUNK,
    GPU_CHUNK,
    chunk_for,
    counter_uniform,
    draw_key,
    kth_largest_by_topk,
    kth_largest_magnitude,
    kth_largest_magnitude_bits,
    magnitude_bits,
    mix64,
    radix_kth_largest_bits,
)
from terge.sharding import Layout

# --- the k-th largest magnitude -------------------------------------------------------------------


def reference_kth(values: torch.Tensor, k: int) -> float:
    flat = values.reshape(-1).abs()
    return torch.kthvalue(flat, flat.numel() - k + 1).values.item()


# Few distinct values, so that ties, zeros and signed zeros are common.
_entries = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, -2.5, 1e-300, 5e-324, 3.0, 1e300])


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.one_of(_entries, st.floats(allow_nan=False)), min_size=1, max_size=60),
    data=st.data(),
    chunk=st.sampled_from([1, 3, 7, 1 << 20]),
)
def test_radix_selection_is_kthvalue(values, data, chunk):
    tensor = torch.tensor(values, dtype=torch.float64)
    n = tensor.numel()
    for k in {1, n, data.draw(st.integers(1, n))}:
        expected = reference_kth(tensor, k)
        bits = radix_kth_largest_bits(tensor, k, chunk=chunk)
        assert torch.tensor([bits]).view(torch.float64).item() == expected
        assert kth_largest_magnitude_bits(tensor, k) == bits  # the unsharded path agrees
        assert kth_largest_by_topk(magnitude_bits(tensor), k) == bits  # the GPU's path too
        assert kth_largest_magnitude(tensor, k) == expected


@settings(max_examples=100, deadline=None)
@given(
    bits=st.lists(st.integers(0, 40), min_size=1, max_size=50),
    data=st.data(),
)
def test_topk_on_the_shorter_side_is_kthvalue(bits, data):
    """Either side of ``topk`` (the k largest when k <= n - k + 1, else the n - k + 1 smallest)
    finds the k-th largest, ties and both ends included: what a GPU runs for TIES' threshold."""
    tensor = torch.tensor(bits, dtype=torch.int64)
    n = tensor.numel()
    for k in {1, n, (n + 1) // 2, (n + 2) // 2, data.draw(st.integers(1, n))}:
        assert kth_largest_by_topk(tensor, k) == int(torch.kthvalue(tensor, n - k + 1).values)


def test_chunks_are_cache_sized_on_the_cpu_and_large_elsewhere():
    assert chunk_for(torch.device("cpu"), DRAW_CHUNK) == DRAW_CHUNK
    assert chunk_for(torch.device("meta"), DRAW_CHUNK) == GPU_CHUNK
    assert chunk_for(torch.device("meta"), 2 * GPU_CHUNK) == 2 * GPU_CHUNK


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_radix_selection_in_narrower_floats(dtype):
    tensor = torch.randn(500, generator=torch.Generator().manual_seed(0)).to(dtype)
    tensor[:50] = 0
    tensor[50:60] = tensor[60]  # ties
    for k in (1, 2, 55, 250, 451, 499, 500):
        expected = reference_kth(tensor, k)
        assert kth_largest_magnitude(tensor, k) == expected
        assert kth_largest_magnitude(tensor, k, reduce=lambda h: h) == expected  # the radix


def test_nan_counts_as_the_largest_magnitude():
    tensor = torch.tensor([1.0, float("nan"), -float("inf"), 2.0], dtype=torch.float64)
    assert math.isnan(kth_largest_magnitude(tensor, 1))
    assert kth_largest_magnitude(tensor, 2) == math.inf
    assert radix_kth_largest_bits(tensor, 3) == kth_largest_magnitude_bits(tensor, 3)


def test_magnitude_bits_order_like_magnitudes_and_leave_the_input_alone():
    values = torch.tensor([-3.0, -0.0, 0.0, 2.0, -1e-310, math.inf], dtype=torch.float64)
    copy = values.clone()
    bits = magnitude_bits(values)
    assert torch.equal(values.view(torch.int64), copy.view(torch.int64))  # signs intact
    assert bits[1] == bits[2] == 0
    assert torch.equal(bits.argsort(stable=True), values.abs().argsort(stable=True))


@pytest.mark.parametrize("k", [0, 4])
def test_k_out_of_range_is_an_error(k):
    tensor = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="is not between 1 and the number of elements"):
        kth_largest_magnitude_bits(tensor, k)
    with pytest.raises(ValueError, match="is not between 1 and the number of elements"):
        radix_kth_largest_bits(tensor, k)


# --- the counter-based draw -----------------------------------------------------------------------

M = 2**64
G = 0x9E3779B97F4A7C15


def reference_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M
    return z ^ (z >> 31)


def reference_uniform(seed: int, position: int, j: int) -> float:
    key = reference_mix((seed + position * G) % M)
    return (reference_mix((key + (j + 1) * G) % M) >> 11) * 2**-53


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 - 1])
@pytest.mark.parametrize("position", [0, 1, 7])
def test_the_draw_is_the_specified_splitmix64(seed, position):
    indices = [*range(200), 2**31 - 1, 2**31, 2**40 + 3, 2**53 - 1, 10**12]
    indices += [
        int(j)
        for j in torch.randint(0, 2**62, (100,), generator=torch.Generator().manual_seed(seed % 97))
    ]
    draw = counter_uniform(draw_key(seed, position), torch.tensor(indices, dtype=torch.int64))
    assert draw.dtype == torch.float64
    assert draw.tolist() == [reference_uniform(seed, position, j) for j in indices]
    assert mix64(seed + position * G) == reference_mix((seed + position * G) % M)


def test_draws_are_uniform_and_independent_of_the_chunking():
    key = draw_key(3, 0)
    n = 3 * DRAW_CHUNK + 5
    whole = counter_uniform(key, torch.arange(n))
    pieces = torch.cat(
        [counter_uniform(key, torch.arange(s, min(s + 1000, n))) for s in range(0, n, 1000)]
    )
    assert torch.equal(whole, pieces)
    assert whole.min() >= 0 and whole.max() < 1
    assert abs(whole.mean().item() - 0.5) < 5 / math.sqrt(12 * n)


# --- a shard's place in the whole -----------------------------------------------------------------


def blocks(
    shape: tuple[int, ...], splits: tuple[int, ...]
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offset, local shape) of each block when dim d is cut in splits[d] torch.chunk pieces."""
    per_dim = []
    for size, parts in zip(shape, splits, strict=True):
        pieces, start = [], 0
        for chunk in torch.arange(size).chunk(parts):
            pieces.append((start, chunk.numel()))
            start += chunk.numel()
        while len(pieces) < parts:  # torch.chunk may give fewer: the rest are empty
            pieces.append((size, 0))
        per_dim.append(pieces)
    result = [((), ())]
    for pieces in per_dim:
        result = [((*o, start), (*s, count)) for o, s in result for start, count in pieces]
    return result


@pytest.mark.parametrize(
    ("shape", "splits"),
    [
        ((7, 9), (3, 1)),
        ((7, 9), (1, 2)),
        ((7, 9), (2, 4)),
        ((3, 4, 5), (1, 2, 2)),
        ((13,), (2,)),
        ((5, 3), (8, 1)),
    ],
)
def test_a_blocks_indices_are_its_slice_of_the_whole(shape, splits):
    whole = torch.arange(math.prod(shape)).reshape(shape)
    for offset, local in blocks(shape, splits):
        layout = Layout(shape, local, offset)
        expected = whole[
            tuple(slice(o, o + s) for o, s in zip(offset, local, strict=True))
        ].reshape(-1)
        assert torch.equal(layout.indices(0, expected.numel(), "cpu"), expected)
        if expected.numel() > 2:
            assert torch.equal(layout.indices(1, expected.numel() - 1, "cpu"), expected[1:-1])


def test_a_whole_layout():
    layout = Layout.whole((4, 5))
    assert not layout.sharded
    assert layout.numel == 20
    assert torch.equal(layout.indices(3, 9, "cpu"), torch.arange(3, 9))
    assert Layout.whole(()).numel == 1


# --- every method, shard by shard, in one process -------------------------------------------------


class Exchange:
    """What ``all_reduce(SUM)`` does across ranks, across threads: each thread's tensor is summed
    in rank order and every thread gets the total."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks)
        self.slots: list[Any] = [None] * ranks

    def sum(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return tensor.copy_(total)


@dataclasses.dataclass(frozen=True)
class ThreadLayout(Layout):
    exchange: Any = None
    rank: int = 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.exchange.sum(self.rank, tensor)


def sharded_call(method, thetas, weights, base, splits, seed):
    """Run ``method`` on every block of the tensors (one thread per block) and reassemble."""
    shape = tuple(thetas[0].shape)
    parts = blocks(shape, splits)
    exchange = Exchange(len(parts))
    result = torch.empty(shape, dtype=torch.float64)
    errors = []

    def run(rank, offset, local):
        index = tuple(slice(o, o + s) for o, s in zip(offset, local, strict=True))
        layout = ThreadLayout(shape, local, offset, ("threads",), exchange, rank)
        try:
            local_base = None if base is None else base[index].contiguous()
            merged = method(
                [t[index].contiguous() for t in thetas], weights, local_base, seed, layout
            )
            result[index] = merged
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)
            exchange.barrier.abort()

    threads = [threading.Thread(target=run, args=(r, *part)) for r, part in enumerate(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return result


SPLITS = [(3, 1), (1, 2), (2, 2), (4, 3)]
EXACT = [
    methods.task_arithmetic(scale=0.7),
    methods.ties(density=0.3),
    methods.ties(density=0.05),
    methods.dare_linear(density=0.4),
    methods.dare_ties(density=0.6),
    methods.breadcrumbs(density=0.4, gamma=0.1),
    methods.breadcrumbs(density=0.3, gamma=0),
]


def family(n: int, seed: int = 0, shape=(7, 9)):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    thetas = [base + torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(n)]
    return thetas, base


@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("method", EXACT, ids=lambda m: f"{m.name}-{dict(m.settings)}")
def test_shard_by_shard_is_exactly_the_whole(method, splits):
    thetas, base = family(3)
    weights = [0.5, 0.3, 0.2]
    whole = method(thetas, weights, base, 99)
    assert torch.equal(sharded_call(method, thetas, weights, base, splits, 99), whole)


def test_ties_with_many_equal_magnitudes_shard_by_shard():
    # Ties at the threshold: every tied entry is kept, in every shard alike.
    base = torch.zeros(6, 8, dtype=torch.float64)
    thetas = [
        torch.randint(-2, 3, (6, 8), generator=torch.Generator().manual_seed(i)).double()
        for i in range(3)
    ]
    method = methods.ties(density=0.3)
    whole = method(thetas, [1 / 3] * 3, base)
    assert torch.equal(sharded_call(method, thetas, [1 / 3] * 3, base, (2, 2), None), whole)


@pytest.mark.parametrize("splits", SPLITS)
def test_slerp_and_model_stock_shard_by_shard_match_to_rounding(splits):
    thetas, base = family(3, seed=1)
    shared = torch.randn(
        base.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    thetas = [t + shared for t in thetas]  # positive cosines, so model_stock's t is not clamped
    # The angle and cosines come from dot products summed over the shards: the whole tensor's up
    # to float64 rounding, hence the tight tolerance instead of equality.
    slerp = methods.slerp()
    whole = slerp(thetas[:2], [0.3, 0.7], None)
    torch.testing.assert_close(
        sharded_call(slerp, thetas[:2], [0.3, 0.7], None, splits, None),
        whole,
        rtol=1e-12,
        atol=1e-14,
    )
    stock = methods.model_stock()
    whole = stock(thetas, [1 / 3] * 3, base)
    torch.testing.assert_close(
        sharded_call(stock, thetas, [1 / 3] * 3, base, splits, None), whole, rtol=1e-12, atol=1e-14
    )
