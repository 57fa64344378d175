"""SLERP's and Model Stock's dot products (``terge.kernels.statistics``): the compiled loop
(``_faststatistics``), the plain-torch reference and a plain-Python reading of the documented
order, bit for bit, on every dtype, special values, sizes around the chunks, and any threads."""

from __future__ import annotations

import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import terge
from terge import methods
from terge.kernels import cpu, statistics

CHUNK, LANES = statistics.CHUNK, statistics.LANES
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
REFERENCE_RUN = os.environ.get("TERGE_KERNELS", "").lower() == "torch"
CPU = torch.device("cpu")

needs_loop = pytest.mark.skipif(
    statistics._faststatistics is None,
    reason="terge.kernels._faststatistics is not built (pip install -e .)",
)


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    """Both paths in every run: the compiled one through dot_products, the reference directly."""
    monkeypatch.setenv("TERGE_KERNELS", "auto")


def test_the_compiled_statistics_are_built():
    """The README's install builds them; only an explicit TERGE_KERNELS=torch run may lack them."""
    if REFERENCE_RUN:
        pytest.skip("TERGE_KERNELS=torch selects the reference")
    assert statistics.available()


def bits(values: list[float]) -> list[bytes]:
    """Each float's bytes, every NaN alike (a NaN's payload is not part of the promise)."""
    return [b"nan" if v != v else struct.pack("<d", v) for v in values]


def awkward(numel: int, seed: int, kind: int) -> torch.Tensor:
    """Float64 values over many scales (so the order of the sums shows), with signed zeros,
    subnormals and, for kind 2, infinities and NaNs."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator, dtype=torch.float64)
    values *= torch.exp2(torch.randint(-30, 30, (numel,), generator=generator).double())
    if kind == 0:
        return values
    specials = [0.0, -0.0, 1e-310, -5e-324, 2.0**-140]
    if kind == 2:
        specials += [float("inf"), -float("inf"), float("nan")]
    picks = torch.randint(0, max(numel, 1), (min(numel, 6),), generator=generator)
    values[picks] = torch.tensor(specials, dtype=torch.float64)[
        torch.arange(picks.numel()) % len(specials)
    ]
    return values


def reference(tensors, base, pairs) -> list[float]:
    flats = [t.reshape(-1) for t in tensors]
    origin = None if base is None else base.reshape(-1)
    return statistics.totals(statistics.reference_chunk_sums(flats, origin, pairs, CPU))


def spec(tensors, base, pairs) -> list[float]:
    """The order as the module's docstring states it, in plain Python floats: the oracle."""
    xs = [[float(v) for v in t.reshape(-1).double()] for t in tensors]
    if base is not None:
        b = [float(v) for v in base.reshape(-1).double()]
        xs = [[v - w for v, w in zip(x, b, strict=True)] for x in xs]
    n = len(xs[0])
    padded = -(-n // CHUNK) * CHUNK
    xs = [x + [0.0] * (padded - n) for x in xs]
    sums = []
    for i, j in pairs:
        total = 0.0
        for start in range(0, padded, CHUNK):
            rows = [
                [xs[i][start + r * LANES + k] * xs[j][start + r * LANES + k] for k in range(LANES)]
                for r in range(CHUNK // LANES)
            ]
            while len(rows) > 1:
                rows = [
                    [a + b for a, b in zip(rows[k], rows[k + 1])] for k in range(0, len(rows), 2)
                ]
            lanes = rows[0]
            while len(lanes) > 1:
                lanes = [lanes[k] + lanes[k + 1] for k in range(0, len(lanes), 2)]
            total = total + lanes[0]
        sums.append(total)
    return sums


SIZES = [0, 1, 7, 255, 256, 257, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 300, 3 * CHUNK - 5]
PAIRS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=6)


@needs_loop
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numel=st.one_of(st.sampled_from(SIZES), st.integers(0, 3 * CHUNK)),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=4, max_size=4),
    with_base=st.booleans(),
    pairs=PAIRS,
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 2),
)
def test_compiled_equals_the_reference_bit_for_bit(numel, dtypes, with_base, pairs, seed, kind):
    tensors = [awkward(numel, seed + i, kind).to(dtypes[i]) for i in range(3)]
    base = awkward(numel, seed + 3, kind).to(dtypes[3]) if with_base else None
    assert statistics.compiled(tensors, base, pairs)
    got = statistics.dot_products(tensors, base, pairs)
    assert bits(got) == bits(reference(tensors, base, pairs))


@needs_loop
@pytest.mark.parametrize("numel", [1, 300, CHUNK + 1000])
@pytest.mark.parametrize("with_base", [False, True])
def test_both_paths_follow_the_documented_order(numel, with_base):
    """An independent reading of the order, where another order gives other bits."""
    tensors = [awkward(numel, 10 + i, 1).to(torch.float32) for i in range(2)]
    base = awkward(numel, 20, 1).to(torch.bfloat16) if with_base else None
    pairs = [(0, 0), (1, 1), (0, 1)]
    expected = bits(spec(tensors, base, pairs))
    assert bits(statistics.dot_products(tensors, base, pairs)) == expected
    assert bits(reference(tensors, base, pairs)) == expected
    if numel > 1000:  # the order matters here: a left-to-right sum gives other bits
        flat = [t.double() - (0 if base is None else base.double()) for t in tensors]
        plain = [0.0, 0.0, 0.0]
        for q, (i, j) in enumerate(pairs):
            for product in (flat[i] * flat[j]).tolist():
                plain[q] += product
        assert bits(plain) != expected


def test_special_values_propagate():
    x = torch.zeros(1000, dtype=torch.float32)
    assert bits(statistics.dot_products([x, x], None, [(0, 0), (0, 1)])) == bits([0.0, 0.0])
    y = x.clone()
    y[5] = float("inf")
    got = statistics.dot_products([y, x], None, [(0, 0), (0, 1), (1, 1)])
    assert got[0] == float("inf") and got[1] != got[1] and got[2] == 0.0  # inf * 0 is NaN
    y[7] = float("nan")
    assert (
        statistics.dot_products([y], None, [(0, 0)])[0]
        != statistics.dot_products([y], None, [(0, 0)])[0]
    )
    assert statistics.dot_products([torch.empty(0)], None, [(0, 0)]) == [0.0]
    tiny = torch.full((10,), 1e-200, dtype=torch.float64)
    assert statistics.dot_products([tiny], None, [(0, 0)]) == [0.0]  # underflows, exactly


@needs_loop
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    numel=st.integers(1, 12 * CHUNK),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    threads=st.integers(2, 5),
)
def test_the_same_bits_whatever_the_threads(numel, dtype, seed, threads):
    tensors = [awkward(numel, seed + i, 1).to(dtype) for i in range(3)]
    pairs = methods._gram_pairs(2)
    one = statistics.dot_products(tensors[:2], tensors[2], pairs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "PER_THREAD", 1000)
        patch.setattr(torch, "get_num_threads", lambda: threads)
        assert len(cpu.ranges(numel)) > 1 or numel < 2000
        many = statistics.dot_products(tensors[:2], tensors[2], pairs)
    assert bits(many) == bits(one)


def test_any_layout_and_the_forced_reference_give_the_same_bits(monkeypatch):
    a = awkward(300 * 200, 1, 1).reshape(300, 200)
    b = awkward(300 * 200, 2, 1).reshape(300, 200)
    transposed = a.t()  # not contiguous
    got = statistics.dot_products([transposed, b.t()], None, [(0, 1)])
    expected = statistics.dot_products(
        [transposed.contiguous(), b.t().contiguous()], None, [(0, 1)]
    )
    assert bits(got) == bits(expected)
    monkeypatch.setenv("TERGE_KERNELS", "torch")
    assert not statistics.compiled([a.reshape(-1)], None, [(0, 0)])
    assert bits(statistics.dot_products([transposed, b.t()], None, [(0, 1)])) == bits(expected)


@needs_loop
def test_the_loop_refuses_bad_arguments():
    loop = statistics._faststatistics
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="unknown dtype code 9"):
        loop.chunks(0, 0, 10, 0, 1, [x.data_ptr()], [9], [(0, 0)], 0)
    with pytest.raises(ValueError, match="a pair names an input out of range"):
        loop.chunks(0, 0, 10, 0, 1, [x.data_ptr()], [1], [(0, 1)], 0)
    with pytest.raises(ValueError, match="between 1 and 4096 pairs"):
        loop.chunks(0, 0, 10, 0, 1, [x.data_ptr()], [1], [], 0)
    with pytest.raises(ValueError, match="chunks out of range"):
        loop.chunks(0, 0, 10, 1, 2, [x.data_ptr()], [1], [(0, 0)], 0)
    with pytest.raises(ValueError, match="chunks out of range"):  # past the last chunk
        loop.chunks(0, 0, 10, 0, 2, [x.data_ptr()], [1], [(0, 0)], 0)
    with pytest.raises(ValueError, match="between 1 and 64 inputs"):
        loop.chunks(0, 0, 10, 0, 1, [], [], [(0, 0)], 0)


@needs_loop
@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_merge_takes_the_compiled_path(method, monkeypatch):
    """merge() of CPU models computes the angles in the loop, never in the torch reference."""

    def refuse(*_, **__):
        raise AssertionError("the reference ran")

    torch.manual_seed(0)
    models = [torch.nn.Linear(300, 300) for _ in range(3 if method == "model_stock" else 2)]
    compiled = terge.merge(models, method=method, dtype=torch.float64)
    monkeypatch.setattr(statistics, "reference_chunk_sums", refuse)
    assert terge.merge(models, method=method) is not None
    monkeypatch.setenv("TERGE_KERNELS", "torch")
    with pytest.raises(AssertionError, match="the reference ran"):
        terge.merge(models, method=method)
    monkeypatch.undo()
    monkeypatch.setenv("TERGE_KERNELS", "torch")
    forced = terge.merge(models, method=method, dtype=torch.float64)
    for name, tensor in compiled.state_dict().items():
        assert torch.equal(tensor.view(torch.uint8), forced.state_dict()[name].view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_tensors_give_the_cpu_bits(dtype):
    """The reference's folds are element-wise IEEE operations: the same bits on a GPU."""
    tensors = [awkward(3 * CHUNK + 77, 30 + i, 2).to(dtype) for i in range(3)]
    pairs = methods._gram_pairs(2)
    on_cpu = statistics.dot_products(tensors[:2], tensors[2], pairs)
    on_gpu = statistics.dot_products([t.cuda() for t in tensors[:2]], tensors[2].cuda(), pairs)
    assert bits(on_gpu) == bits(on_cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("group", [CHUNK, 7 * CHUNK, 1 << 25])
def test_gpu_groups_of_any_size_give_the_cpu_bits(group, monkeypatch):
    """A GPU folds many chunks of every pair at once: one chunk a group, a few, or all of them,
    the sums are the CPU's bits."""
    tensors = [awkward(9 * CHUNK + 5, 60 + i, 2) for i in range(4)]
    pairs = methods._gram_pairs(3)
    on_cpu = statistics.dot_products(tensors[:3], tensors[3], pairs)
    monkeypatch.setattr(statistics, "GROUP_ENTRIES_CUDA", group)
    on_gpu = statistics.dot_products([t.cuda() for t in tensors[:3]], tensors[3].cuda(), pairs)
    assert bits(on_gpu) == bits(on_cpu)


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_verify_of_a_merge_summed_in_another_order_says_why_and_how(method, tmp_path, monkeypatch):
    """A lineage written by a build that summed the angle differently (simulated: a dot product
    off in its last places) fails bit-for-bit verify with the reason and the remedy, and passes
    with the tolerance the message suggests."""
    from terge.audit import verify_lineage
    from terge.io import save

    generator = torch.Generator().manual_seed(0)
    folders = []
    for name in "abc":
        save({"w": torch.randn(64, 32, generator=generator, dtype=torch.float64)}, tmp_path / name)
        folders.append(tmp_path / name)
    models = folders[:2] if method == "slerp" else folders
    real = methods._dot_products

    def another_order(*args, **kwargs):  # the last pair's sum off as another order can be
        sums = real(*args, **kwargs)  # (cancelling products: many of its ulps)
        sums[-1] *= 1 + 1e-12
        return sums

    with monkeypatch.context() as patch:
        patch.setattr(methods, "_dot_products", another_order)
        terge.merge(models, method=method, out=tmp_path / "m", out_dtype=torch.float64)
    lineage = terge.load_lineage(tmp_path / "m" / "lineage.json")
    problems = verify_lineage(lineage, tmp_path / "m")
    assert problems and all("summed in a fixed order since terge 0.2.0" in p for _, p in problems)
    assert all("--rtol" in p for _, p in problems)
    assert verify_lineage(lineage, tmp_path / "m", rtol=1e-9) == []
    terge.merge(models, method=method, out=tmp_path / "n", out_dtype=torch.float64)
    assert verify_lineage(terge.load_lineage(tmp_path / "n" / "lineage.json"), tmp_path / "n") == []


@pytest.mark.parametrize("origin", [False, True])
def test_the_reference_gives_the_same_bits_a_chunk_at_a_time(origin, monkeypatch):
    tensors = [awkward(5 * CHUNK + 9, 40 + i, 2).to(torch.bfloat16) for i in range(4)]
    base = tensors.pop() if origin else None
    pairs = methods._gram_pairs(3)
    together = reference(tensors, base, pairs)
    assert bits(together) == bits(statistics.dot_products(tensors, base, pairs))
    monkeypatch.setattr(statistics, "GROUP_ENTRIES", CHUNK)  # one chunk per step
    assert bits(reference(tensors, base, pairs)) == bits(together)
    monkeypatch.setattr(statistics, "GROUP_ENTRIES", 3 * CHUNK * 16)  # three chunks, the last short
    assert bits(reference(tensors, base, pairs)) == bits(together)
