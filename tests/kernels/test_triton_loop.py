"""The Triton loop (``terge.kernels.triton_loop``, CUDA GPUs) against the plain-torch reference, bit for bit.

On a machine with a CUDA GPU and Triton every test here runs on the GPU; the GPU results are also
checked against the CPU's, so a merge gives the same bits wherever it runs. Without a GPU, one
test runs the kernel in Triton's CPU interpreter when Triton is installed (a smoke test of its
logic: the interpreter's own bfloat16 rounding is not IEEE's, so bfloat16 outputs are left to
the GPU).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import terge
from terge import kernels

from helpers import FLOAT_DTYPES as DTYPES
from helpers import awkward, count_calls, same_bits

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and Triton"
)


def combine(destination, sources, coefficients, divisor, *, reference):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TERGE_KERNELS", "torch" if reference else "auto")
        assert (kernels.gpu_loop() is None) is reference
        kernels.linear_combine(
            destination, sources, coefficients, kernels.ChunkBuffers(torch.float64), divisor
        )


def coefficients_for(count: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return [
        float(c) if i % 3 else 1.0 for i, c in enumerate(torch.randn(count, generator=generator))
    ]


def check_against_references(dtypes, out_dtype, numel, seed, divisor, inplace=False):
    """The Triton loop equals the reference on the GPU and on the CPU; ``inplace`` writes into
    the first source (as a merge into the base model does)."""
    sources = [awkward(numel, dtype, seed + i).cuda() for i, dtype in enumerate(dtypes)]
    coefficients = coefficients_for(len(sources), seed)
    if inplace:
        sources[0] = sources[0].to(out_dtype)
    expected = torch.empty(numel, dtype=out_dtype, device="cuda")
    combine(expected, sources, coefficients, divisor, reference=True)
    on_cpu = torch.empty(numel, dtype=out_dtype)
    combine(on_cpu, [s.cpu() for s in sources], coefficients, divisor, reference=True)
    got = sources[0] if inplace else torch.empty(numel, dtype=out_dtype, device="cuda")
    combine(got, sources, coefficients, divisor, reference=False)
    assert same_bits(got, expected), (dtypes, out_dtype, numel, divisor)
    assert same_bits(got.cpu(), on_cpu), "the GPU and the CPU disagree"


@needs_gpu
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", DTYPES)
def test_every_dtype_pair_equals_the_reference(in_dtype, out_dtype):
    check_against_references([in_dtype] * 3, out_dtype, 70_001, seed=1, divisor=3.0)


@needs_gpu
@settings(max_examples=25, deadline=None)
@given(
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=8),
    out_dtype=st.sampled_from(DTYPES),
    numel=st.sampled_from([1, 7, 4095, 4096, 4097, 100_003]),
    seed=st.integers(0, 2**16),
    divisor=st.sampled_from([None, 1.0, 0.7, -2.5]),
    inplace=st.booleans(),
)
def test_equals_the_reference_bit_for_bit(dtypes, out_dtype, numel, seed, divisor, inplace):
    check_against_references(dtypes, out_dtype, numel, seed, divisor, inplace)


def check_many_against_one_by_one(sizes, dtypes, out_dtype, seed, divisor, inplace, device):
    """One :func:`triton_loop.combine_many` launch over tensors of ``sizes`` gives each tensor
    the bits of the reference for that tensor alone."""
    from terge.kernels import reference, triton_loop

    sources = [
        [awkward(n, dtype, seed + 31 * t + i).to(device) for i, dtype in enumerate(dtypes)]
        for t, n in enumerate(sizes)
    ]
    coefficients = coefficients_for(len(dtypes), seed)
    if inplace:
        for inputs in sources:
            inputs[0] = inputs[0].to(out_dtype)
    expected = []
    for inputs in sources:
        want = torch.empty(inputs[0].numel(), dtype=out_dtype, device=device)
        reference.reference_combine(
            want, inputs, coefficients, kernels.ChunkBuffers(torch.float64), divisor
        )
        expected.append(want)
    outputs = (
        [inputs[0] for inputs in sources]
        if inplace
        else [torch.empty(n, dtype=out_dtype, device=device) for n in sizes]
    )
    tables = triton_loop.batch(outputs, sources)
    assert tables.programs == sum(-(-n // triton_loop.BLOCK_MANY) for n in sizes)
    triton_loop.combine_many(tables, coefficients, divisor)
    for t, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        assert same_bits(got, want), (t, sizes[t], dtypes, out_dtype, divisor)


@needs_gpu
@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([1, 3, 64, 2047, 2048, 2049, 10_001]), min_size=1, max_size=9),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=8),
    out_dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    divisor=st.sampled_from([None, 1.0, 0.7, -2.5]),
    inplace=st.booleans(),
)
def test_one_launch_over_many_tensors_equals_one_by_one(
    sizes, dtypes, out_dtype, seed, divisor, inplace
):
    """Every tensor of a many-tensor launch gets exactly its own result: a block read from the
    wrong tensor, past its end or with the wrong dtype would change bits."""
    check_many_against_one_by_one(sizes, dtypes, out_dtype, seed, divisor, inplace, "cuda")


@needs_gpu
def test_a_batch_refuses_tensors_it_cannot_launch_together():
    from terge.kernels import triton_loop

    a = torch.zeros(10, device="cuda")
    with pytest.raises(ValueError, match="share a device, and dtypes"):
        triton_loop.batch([a, a.double()], [[a], [a]])
    with pytest.raises(ValueError, match="one the Triton loop supports"):
        triton_loop.batch([a], [[torch.zeros(11, device="cuda")]])
    with pytest.raises(ValueError, match="one list of sources per destination"):
        triton_loop.batch([a, a], [[a]])
    tables = triton_loop.batch([a], [[a, a]])
    with pytest.raises(ValueError, match="1 coefficients for 2 inputs"):
        triton_loop.combine_many(tables, [1.0])


@needs_gpu
def test_halfway_cases_round_once_to_nearest_even():
    """float64 values half-way between two bfloat16/float16 neighbours, nudged by less than
    float32 can hold: rounding through float32 to nearest would round twice and go wrong."""
    for dtype in (torch.bfloat16, torch.float16):
        low = torch.randn(10_000, dtype=torch.float64).to(dtype).double()
        up = torch.nextafter(low.to(dtype), torch.tensor(float("inf"), dtype=dtype)).double()
        halfway = (low + up) / 2
        for nudge in (2.0**-40, -(2.0**-40)):
            values = (halfway * (1 + nudge)).cuda()
            got = torch.empty_like(values, dtype=dtype)
            combine(got, [values], [1.0], None, reference=False)
            expected = torch.empty(values.numel(), dtype=dtype)
            combine(expected, [values.cpu()], [1.0], None, reference=True)
            assert same_bits(got.cpu(), expected)


@needs_gpu
def test_more_inputs_than_one_launch_takes_use_the_reference(monkeypatch):
    monkeypatch.setenv("TERGE_KERNELS", "auto")  # the Triton loop on, even in a reference-only run
    sources = [torch.randn(1000, device="cuda") for _ in range(9)]
    got = torch.empty(1000, device="cuda")
    calls = []
    loop = kernels.gpu_loop()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "combine", lambda *a, **k: calls.append(a))
        kernels.linear_combine(got, sources, [1.0] * 9, kernels.ChunkBuffers(torch.float64))
    assert calls == []
    expected = torch.empty(1000, device="cuda")
    combine(expected, sources, [1.0] * 9, None, reference=True)
    assert torch.equal(got, expected)


def count_launches(patch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the Triton loop's launches, one tensor (``combine``) and many (``combine_many``)."""
    return count_calls(patch, kernels.gpu_loop(), "combine", "combine_many")


@needs_gpu
def test_merge_of_gpu_models_uses_the_triton_loop_and_equals_the_cpu_merge(monkeypatch):
    monkeypatch.setenv("TERGE_KERNELS", "auto")  # the Triton loop on, even in a reference-only run
    torch.manual_seed(0)
    models = [
        {"a": torch.randn(300, 77).bfloat16(), "b": torch.randn(5000), "c": torch.randn(3).half()}
        for _ in range(3)
    ]
    on_cpu = terge.merge(models, weights=[0.2, 0.3, 0.5])
    gpu_models = [{k: v.cuda() for k, v in m.items()} for m in models]
    launches = count_launches(monkeypatch)
    merged = terge.merge(gpu_models, weights=[0.2, 0.3, 0.5], inplace=True)
    assert launches == {"combine": 0, "combine_many": 3}  # one per dtype
    assert merged is gpu_models[0]
    for name, value in on_cpu.items():
        assert torch.equal(merged[name].cpu(), value), name


@needs_gpu
def test_a_gpu_merge_launches_its_tensors_together_in_order(monkeypatch):
    """70 same-dtype tensors take 3 launches (at most 32 steps each), not 70; a step that
    cannot join (TIES, a user's method) runs after everything held before it is launched, so
    an in-place merge still equals the CPU's bit for bit."""
    monkeypatch.setenv("TERGE_KERNELS", "auto")
    torch.manual_seed(1)
    models = [{f"t{i}": torch.randn(3 + 50 * i) for i in range(70)} for _ in range(3)]
    method = {"t40": "ties", "t41": lambda tensors, weights, base: tensors[1].clone()}
    method[re.compile(r"t\d+")] = "arithmetic"
    on_cpu = terge.merge(models, method=method, weights=[0.2, 0.3, 0.5])
    gpu_models = [{k: v.cuda() for k, v in m.items()} for m in models]
    launches = count_launches(monkeypatch)
    merged = terge.merge(gpu_models, method=method, weights=[0.2, 0.3, 0.5], inplace=True)
    assert launches == {"combine": 0, "combine_many": 3}  # t0-t31, t32-t39, t42-t69
    for name, value in on_cpu.items():
        assert torch.equal(merged[name].cpu(), value), name

    from terge.execute import _HeldSteps

    monkeypatch.setattr(_HeldSteps, "ALONE", 1000)  # t20 and up (1,003 elements) launch alone
    gpu_models = [{k: v.cuda() for k, v in m.items()} for m in models]
    launches.update(combine=0, combine_many=0)
    merged = terge.merge(gpu_models, method=method, weights=[0.2, 0.3, 0.5], inplace=True)
    assert launches == {"combine": 48, "combine_many": 1}  # t20-t69 but t40, t41; t0-t19
    for name, value in on_cpu.items():
        assert torch.equal(merged[name].cpu(), value), name


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests above run the real kernel")
def test_kernel_logic_in_the_triton_interpreter():
    """The kernel's arithmetic (float64 accumulation, no FMA, round to odd into float16) run by
    Triton's CPU interpreter against the reference, for the outputs whose rounding it models."""
    script = textwrap.dedent(
        """
        import torch
        from terge import kernels
        from terge.kernels import triton_loop
        from helpers import awkward, same_bits

        for out_dtype in (torch.float64, torch.float32, torch.float16):
            for dtypes in ([torch.float32] * 3, [torch.bfloat16, torch.float64, torch.float16]):
                sources = [awkward(9_000, d, i) for i, d in enumerate(dtypes)]
                coefficients = [1.0, 0.3, -1.7]
                got = torch.empty(9_000, dtype=out_dtype)
                triton_loop.combine(got, sources, coefficients, 0.7)
                expected = torch.empty(9_000, dtype=out_dtype)
                kernels.linear_combine(
                    expected, sources, coefficients, kernels.ChunkBuffers(torch.float64), 0.7
                )
                assert same_bits(got, expected), (out_dtype, dtypes)
        from test_triton_loop import check_many_against_one_by_one

        for out_dtype in (torch.float64, torch.float32, torch.float16):
            for dtypes in ([torch.float32] * 2, [torch.bfloat16, torch.float64, torch.float16]):
                for inplace in (False, True):
                    check_many_against_one_by_one(
                        [1, 5, 2047, 2048, 2049, 4500], dtypes, out_dtype, 7, 0.7, inplace, "cpu"
                    )
        print("ok")
        """
    )
    tests = Path(__file__).resolve().parents[1]  # tests/, where helpers.py is
    environment = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "TERGE_KERNELS": "torch",  # the reference for `expected`; triton_loop is called directly
        "PYTHONPATH": os.pathsep.join(
            [str(tests.parent / "src"), str(tests), str(Path(__file__).resolve().parent)]
            + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
