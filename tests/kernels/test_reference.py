"""The reference loops (``terge.kernels``): one rounding into half types, chunking, empty tensors."""

from fractions import Fraction

import pytest
import torch

from terge.kernels import ChunkBuffers, linear_combine, store_rounded, store_whole

from helpers import nearest


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_rounded_rounds_once(dtype):
    # 1 + 2^-8 + 2^-40 lies just above the bf16 half-way point 1 + 2^-8: it must round up.
    # torch's own float64 -> bf16 conversion goes through float32, lands on the half-way point
    # and rounds to even (down): the double rounding this kernel exists to avoid.
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    value = torch.tensor(
        [1 + ulp + 2**-40, 1 + ulp - 2**-40, -(1 + ulp + 2**-40), 1 + ulp], dtype=torch.float64
    )
    out = torch.empty(4, dtype=dtype)
    store_rounded(out, value, torch.empty(4))
    assert out.tolist() == [1 + 2 * ulp, 1.0, -(1 + 2 * ulp), 1.0]
    assert value.to(dtype)[0].item() == 1.0  # the double rounding really exists in torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_store_rounded_matches_exact_rounding_on_random_values(dtype):
    torch.manual_seed(0)
    value = torch.randn(2000, dtype=torch.float64) * 3
    out = torch.empty(2000, dtype=dtype)
    store_rounded(out, value, torch.empty(2000))
    for i in range(0, 2000, 13):
        assert out[i].item() == nearest(Fraction(value[i].item()), dtype).item()


def test_store_rounded_keeps_specials():
    value = torch.tensor(
        [float("inf"), -float("inf"), float("nan"), 0.0, -0.0], dtype=torch.float64
    )
    out = torch.empty(5, dtype=torch.bfloat16)
    store_rounded(out, value, torch.empty(5))
    assert out[0].item() == float("inf") and out[1].item() == -float("inf")
    assert out[2].isnan()
    assert torch.equal(out[3:].view(torch.int16), torch.tensor([0, -32768], dtype=torch.int16))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 16])
def test_linear_combine_is_independent_of_the_chunk_size(chunk):
    torch.manual_seed(0)
    sources = [torch.randn(1000) for _ in range(3)]
    reference = torch.empty(1000)
    linear_combine(reference, sources, [1.0, 2.0, 3.0], ChunkBuffers(torch.float64), 6.0)
    out = torch.empty(1000)
    linear_combine(out, sources, [1.0, 2.0, 3.0], ChunkBuffers(torch.float64, chunk), 6.0)
    assert torch.equal(out, reference)
    expected = (sources[0].double() + 2 * sources[1].double() + 3 * sources[2].double()) / 6
    assert torch.equal(out, expected.float())


def test_linear_combine_writes_through_non_contiguous_destinations():
    torch.manual_seed(0)
    sources = [torch.randn(4, 6).t() for _ in range(2)]
    destination = torch.zeros(4, 6).t()  # a transposed view, not contiguous
    linear_combine(destination, sources, [0.5, 0.5], ChunkBuffers(torch.float64))
    assert torch.equal(destination, ((sources[0].double() + sources[1].double()) / 2).float())


def test_linear_combine_accepts_mixed_source_dtypes_and_destination_among_sources():
    torch.manual_seed(0)
    destination = torch.randn(100)
    half = torch.randn(100).half()
    expected = ((destination.double() + half.double()) / 2).float()
    linear_combine(destination, [destination, half], [1.0, 1.0], ChunkBuffers(torch.float64), 2.0)
    assert torch.equal(destination, expected)


class CountingBuffers(ChunkBuffers):
    """ChunkBuffers that record every scratch buffer asked for."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__(dtype)
        self.asked: list[tuple[torch.device, torch.dtype, str]] = []

    def get(self, device: torch.device, dtype: torch.dtype, role: str = "") -> torch.Tensor:
        self.asked.append((device, dtype, role))
        return super().get(device, dtype, role)


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_linear_combine_ignores_empty_tensors(monkeypatch, kernels):
    """An empty tensor is done before anything is allocated or read, in every loop."""
    monkeypatch.setenv("TERGE_KERNELS", kernels)
    destination = torch.empty(0, 3)
    sources = [torch.empty(0, 3, dtype=torch.float16), torch.empty(0, 3, dtype=torch.float64)]
    buffers = CountingBuffers(torch.float64)
    assert linear_combine(destination, sources, [1.0, 2.0], buffers, 3.0) is None
    assert buffers.asked == []
    assert destination.shape == (0, 3) and destination.dtype == torch.float32


def test_store_whole_rounds_once_into_half_types():
    value = torch.tensor([[1 + 2**-8 + 2**-40]], dtype=torch.float64)
    out = torch.empty(1, 1, dtype=torch.bfloat16)
    store_whole(out, value, ChunkBuffers(torch.float64))
    assert out.item() == 1 + 2**-7
    wide = torch.empty(1, 1)
    store_whole(wide, value, ChunkBuffers(torch.float64))
    assert wide.item() == torch.tensor(1 + 2**-8 + 2**-40).float().item()
