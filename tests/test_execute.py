"""execute.py: where results are written (destinations), the walk over the plan, and run_step."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from terge import methods
from terge.errors import MethodResultError
from terge.execute import destinations, execute, run_step
from terge.io import save
from terge.kernels import ChunkBuffers
from terge.plan import Step, derive_seed
from terge.sources import FileSource, ModuleSource, Source, StateDictSource

from helpers import Tied, count_calls, plan_for


def tied_sources(buffers: bool = False) -> tuple[list[Tied], list[ModuleSource]]:
    """Three tied models and their sources."""
    torch.manual_seed(0)
    models = [Tied() for _ in range(3)]
    return models, [ModuleSource(m, buffers) for m in models]


def every_tensor(obj) -> list[torch.Tensor]:
    """Every tensor of a module (buffers too) or a state dict."""
    if isinstance(obj, torch.nn.Module):
        return list(obj.state_dict(keep_vars=True).values())
    return [v for v in obj.values() if isinstance(v, torch.Tensor)]


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors live in the same storage (so writing one changes the other)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# --------------------------------------------------------------------------------------------
# destinations
# --------------------------------------------------------------------------------------------


def test_in_place_a_module_is_returned_itself_with_its_own_tensors_as_destinations():
    models, sources = tied_sources()
    plan = plan_for(sources)
    result, outputs = destinations(sources[0], plan, inplace=True)
    assert result is models[0]
    assert sorted(outputs) == ["embed.weight", "norm.bias", "norm.weight"]  # head: an alias
    own = dict(models[0].named_parameters())
    assert all(outputs[name] is own[name] for name in outputs)


def test_in_place_a_state_dict_is_returned_itself():
    states = [OrderedDict(w=torch.zeros(2), n=torch.tensor([1])) for _ in range(2)]
    sources = [StateDictSource(s) for s in states]
    result, outputs = destinations(sources[0], plan_for(sources), inplace=True)
    assert result is states[0]
    assert outputs["w"] is states[0]["w"]


def test_a_copied_module_shares_no_memory_with_any_input_and_keeps_its_ties():
    models, sources = tied_sources(buffers=False)
    plan = plan_for(sources)
    result, outputs = destinations(sources[0], plan, inplace=False)
    assert isinstance(result, Tied) and result is not models[0]
    for mine in every_tensor(result):
        for model in models:
            for theirs in every_tensor(model):
                assert not shares_memory(mine, theirs)
    assert result.head.weight is result.embed.weight  # still one tensor under two names
    assert outputs["embed.weight"] is result.embed.weight
    assert isinstance(result.embed.weight, torch.nn.Parameter)
    # what is not merged (the BatchNorm buffers here) is copied with its values
    for name, buffer in models[0].named_buffers():
        assert torch.equal(result.get_buffer(name), buffer)


def test_a_copied_state_dict_keeps_its_type_metadata_ties_and_other_values():
    shared = torch.ones(2)
    states = []
    for i in range(2):
        state = OrderedDict(w=shared if i == 0 else torch.zeros(2), n=torch.tensor([i]))
        state["alias"] = state["w"]
        state["note"] = {"list": [i]}
        state._metadata = {"": {"version": 1}}
        states.append(state)
    sources = [StateDictSource(s) for s in states]
    result, outputs = destinations(sources[0], plan_for(sources), inplace=False)
    assert type(result) is OrderedDict
    assert list(result) == ["w", "n", "alias", "note"]
    assert result["alias"] is result["w"] is outputs["w"]
    assert not shares_memory(result["w"], shared)
    assert torch.equal(result["n"], states[0]["n"]) and result["n"] is not states[0]["n"]
    assert result["note"] == {"list": [0]} and result["note"] is not states[0]["note"]
    assert result._metadata == {"": {"version": 1}}
    assert result._metadata is not states[0]._metadata


def test_a_checkpoint_base_gives_fresh_tensors_to_merge_and_views_of_the_rest(tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"m{i}")
        save(
            {"w": torch.full((2,), float(i)), "solo" if i == 0 else "other": torch.ones(1)},
            paths[-1],
        )
    sources = [FileSource(p) for p in paths]
    plan = plan_for(sources)
    result, outputs = destinations(sources[0], plan, inplace=False)
    assert sorted(result) == ["solo", "w"]
    assert result["w"] is outputs["w"] and list(outputs) == ["w"]
    assert torch.equal(result["solo"], torch.ones(1))
    result["solo"].fill_(5)  # a private copy-on-write map: the file keeps its value
    assert torch.equal(FileSource(paths[0]).get("solo"), torch.ones(1))
    for source in sources:
        source.close()


# --------------------------------------------------------------------------------------------
# execute and run_step
# --------------------------------------------------------------------------------------------


class Recorder:
    """A StepHook that records the order of events."""

    def __init__(self, events: list) -> None:
        self.events = events

    def before(self, step: Step) -> None:
        self.events.append(("before", step.name))

    def after(self, step: Step, written: torch.Tensor) -> None:
        self.events.append(("after", step.name, written.tolist()))


def test_execute_asks_for_each_destination_only_when_its_step_runs():
    states = [{"a": torch.full((2,), float(i)), "b": torch.full((1,), 2.0 * i)} for i in range(3)]
    sources = [StateDictSource(s) for s in states]
    plan = plan_for(sources)
    events: list = []
    made: dict[str, torch.Tensor] = {}

    def destination(name: str) -> torch.Tensor:
        events.append(("destination", name))
        made[name] = torch.empty(states[0][name].shape)
        return made[name]

    execute(plan.steps, sources, sources[0], destination, torch.float64, False, Recorder(events))
    assert events == [
        ("before", "a"),
        ("destination", "a"),
        ("after", "a", [1.0, 1.0]),
        ("before", "b"),
        ("destination", "b"),
        ("after", "b", [2.0]),
    ]
    assert all(torch.equal(s["a"], torch.full((2,), float(i))) for i, s in enumerate(states))


def one_step(method, weights, contributors=(0, 1, 2), *, uses_base=False, seed=None, **extra):
    """A step for the tensor "w", built by hand."""
    return Step(
        name="w",
        method=method,
        contributors=contributors,
        weights=weights,
        uses_base=uses_base,
        seed=seed,
        **extra,
    )


def sources_of(*values: float, dtype=torch.float32) -> list[Source]:
    """One state dict per value, each holding "w": four copies of it."""
    return [StateDictSource({"w": torch.full((4,), v, dtype=dtype)}) for v in values]


def test_run_step_streams_the_weighted_sum_and_divides_once():
    sources = sources_of(1.0, 2.0, 4.0)
    step = one_step(
        methods.arithmetic(), (1 / 6, 2 / 6, 3 / 6), coefficients=(1.0, 2.0, 3.0), divisor=6.0
    )
    out = torch.empty(4)
    run_step(step, sources, sources[0], out, ChunkBuffers(torch.float64))
    # (1 + 4 + 12) / 6 = 17/6, rounded once to float32
    assert torch.equal(out, torch.full((4,), 17 / 6, dtype=torch.float64).float())


def test_run_step_rounds_once_into_a_half_precision_destination():
    """1 + 2^-8 + 2^-40, the mean of two float64 tensors, rounds up to 1 + 2^-7 in bfloat16
    (through float32 it would land on the half-way point and round down to 1)."""
    sources = sources_of(1 + 2**-8, 1 + 2**-8 + 2**-39, dtype=torch.float64)
    step = one_step(methods.arithmetic(), (0.5, 0.5), (0, 1), coefficients=(1.0, 1.0), divisor=2.0)
    out = torch.empty(4, dtype=torch.bfloat16)
    run_step(step, sources, sources[0], out, ChunkBuffers(torch.float64))
    assert out.tolist() == [1 + 2**-7] * 4


def test_run_step_computes_task_vectors_from_the_base():
    sources = sources_of(1.0, 3.0, 5.0)
    step = one_step(methods.task_arithmetic(), (0.25, 0.75), (1, 2), uses_base=True)
    for dtype in (torch.float64, torch.float32):  # the compiled path and the reference path
        out = torch.empty(4)
        run_step(step, sources, sources[0], out, ChunkBuffers(dtype))
        assert out.tolist() == [1 + 0.25 * 2 + 0.75 * 4] * 4  # 4.5, exact


def test_run_step_gives_a_random_method_the_parameters_own_seed():
    seen: list = []

    def spy(tensors, weights, base, seed):
        seen.append(seed)
        return tensors[0]

    method = methods.Method("spy", spy, random=True)
    sources = sources_of(1.0, 2.0)
    out = torch.empty(4)
    run_step(
        one_step(method, (0.5, 0.5), (0, 1), seed=3),
        sources,
        sources[0],
        out,
        ChunkBuffers(torch.float64),
    )
    assert seen == [derive_seed(3, "w")]
    assert out.tolist() == [1.0] * 4


def test_run_step_refuses_a_result_of_the_wrong_shape_naming_method_and_parameter():
    method = methods.custom(lambda tensors, weights, base: tensors[0][:2], name="halve")
    sources = sources_of(1.0, 2.0)
    out = torch.zeros(4)
    with pytest.raises(
        MethodResultError,
        match=r"'halve' returned \(2,\) for the parameter 'w', which has shape \(4,\)",
    ):
        run_step(
            one_step(method, (0.5, 0.5), (0, 1)),
            sources,
            sources[0],
            out,
            ChunkBuffers(torch.float64),
        )
    with pytest.raises(MethodResultError, match=r"'none' returned NoneType"):
        run_step(
            one_step(methods.custom(lambda t, w, b: None, name="none"), (0.5, 0.5), (0, 1)),
            sources,
            sources[0],
            out,
            ChunkBuffers(torch.float64),
        )
    assert out.tolist() == [0.0] * 4  # nothing written


@pytest.mark.parametrize(
    "name",
    ["magmax", "consensus", "nearswap", "della", "della_linear", "nuslerp_rows", "stock_rows"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_methods_run_by_chunks_with_the_whole_tensors_bits(name, dtype, monkeypatch):
    """A built-in element-wise method runs over chunks of the flattened tensors, a row-wise one
    (DELLA: ranks within rows, draws keyed by whole-tensor index; NuSLERP vector by vector
    and Model Stock filter-wise, along the last dimension) over blocks of whole rows
    (memory of a few chunks, not a float64 copy of every model): the same bits as on the whole
    tensors, awkward values included, in place or not. (magmax, consensus and nearswap run in
    the compiled loops where those apply: TERGE_KERNELS=torch gives the chunks to this test;
    tests/test_fast_elementwise.py holds the loops to the same bits.)"""
    import terge
    from terge import execute as execute_module

    monkeypatch.setenv("TERGE_KERNELS", "torch")

    generator = torch.Generator().manual_seed(3)
    count = 2 if name in ("nearswap", "nuslerp_rows") else 4
    tensors = [torch.randn(61, 109, generator=generator) for _ in range(count)]
    tensors[1][0, :5] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40, -float("inf")])
    models = [{"w": t.to(dtype)} for t in tensors]
    method = {
        "nuslerp_rows": methods.nuslerp(flatten=False),
        "stock_rows": methods.model_stock(filter_wise=True),
    }.get(name) or getattr(methods, name)()
    if method.into is not None:  # DELLA's compiled loop would run: the torch code is tested here
        monkeypatch.setenv("TERGE_KERNELS", "torch")
    whole = terge.merge(models, method=method, weights=list(range(1, count + 1)), seed=0)["w"]
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    calls: list[int] = []
    original = execute_module._run_chunks
    monkeypatch.setattr(execute_module, "ELEMENTWISE_CHUNK", 1000)  # 7 chunks, a short last one
    monkeypatch.setattr(
        execute_module, "_run_chunks", lambda *a: (calls.append(1), original(*a))[1]
    )
    chunked = terge.merge(models, method=method, weights=list(range(1, count + 1)), seed=0)["w"]
    in_place = [dict(m) for m in models]
    in_place[0] = {"w": models[0]["w"].clone()}
    terge.merge(in_place, method=method, weights=list(range(1, count + 1)), seed=0, inplace=True)
    module = torch.nn.Module()  # a Parameter that requires grad, written in place
    module.w = torch.nn.Parameter(models[0]["w"].clone())
    terge.merge(
        [module, *models[1:]],
        method=method,
        weights=list(range(1, count + 1)),
        seed=0,
        inplace=True,
    )
    assert calls == [1, 1, 1]  # the chunked path ran
    assert module.w.requires_grad and torch.equal(module.w.detach().view(bits), whole.view(bits))
    assert torch.equal(chunked.view(bits), whole.view(bits))
    assert torch.equal(in_place[0]["w"].view(bits), whole.view(bits))


def test_a_ctrl_c_during_a_chunked_in_place_merge_lets_every_chunk_finish(
    monkeypatch, python_sigint
):
    """In place, a SIGINT that arrives between two chunks of an element-wise method is held:
    every chunk is written (the tensor is the whole merge, not half of it), then the
    KeyboardInterrupt surfaces. (TERGE_KERNELS=torch: magmax in chunks, not the compiled loop.)"""
    import signal

    import terge
    from terge import execute as execute_module

    monkeypatch.setenv("TERGE_KERNELS", "torch")
    monkeypatch.setattr(execute_module, "ELEMENTWISE_CHUNK", 1000)
    generator = torch.Generator().manual_seed(5)
    models = [{"w": torch.randn(40, 100, generator=generator)} for _ in range(3)]
    expected = terge.merge(models, method="magmax")["w"]
    calls = []
    original = execute_module._called

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the first chunk was written
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(execute_module, "_called", interrupted)
    target = [{"w": models[0]["w"].clone()}, *models[1:]]
    with pytest.raises(KeyboardInterrupt):
        terge.merge(target, method="magmax", inplace=True)
    assert len(calls) == 4  # every chunk ran
    assert torch.equal(target[0]["w"], expected)


# --- small steps held back and computed together --------------------------------------------------


def many_small_models(count: int = 70) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(11)
    return [
        {
            f"t{i}": torch.randn(3 + 7 * i, generator=generator).to(
                torch.bfloat16 if i % 2 else torch.float32
            )
            for i in range(count)
        }
        for _ in range(3)
    ]


@pytest.mark.parametrize("inplace", [False, True])
def test_small_cpu_steps_are_computed_many_to_one_call_with_the_same_bits(monkeypatch, inplace):
    """A merge in memory holds its small linear steps and computes them in one compiled call per
    dtype group, not one per tensor; a step that cannot join (TIES) runs once everything held
    before it is written; a user's method (computed ahead) needs no flush. The bits equal the
    plain-torch reference's."""
    import re

    import terge
    from terge.kernels import fastloop

    if not fastloop.available():
        pytest.skip("the compiled loop is not built")
    models = many_small_models()
    method = {"t40": "ties", "t41": lambda tensors, weights, base: tensors[1].clone()}
    method[re.compile(r"t\d+")] = "arithmetic"
    # t10-t19 weighed apart: steps join a call only with the same coefficients
    weights = {re.compile(r"^t1\d$"): [1.0, 1.0, 1.0], re.compile(".*"): [0.2, 0.3, 0.5]}
    with monkeypatch.context() as reference:
        reference.setenv("TERGE_KERNELS", "torch")
        expected = terge.merge(models, method=method, weights=weights)
    calls = count_calls(monkeypatch, fastloop, "combine", "combine_many")
    target = [{k: v.clone() for k, v in m.items()} for m in models] if inplace else models
    merged = terge.merge(target, method=method, weights=weights, inplace=inplace)
    # (float32 or bfloat16) x (two weightings) before t40, float32 and bfloat16 at the end
    assert calls == {"combine": 0, "combine_many": 6}
    for name, value in expected.items():
        assert torch.equal(merged[name], value), name
    if inplace:
        assert merged is target[0]


def test_cpu_steps_from_the_size_limit_run_alone(monkeypatch):
    import terge
    from terge import execute as execute_module
    from terge.kernels import fastloop

    if not fastloop.available():
        pytest.skip("the compiled loop is not built")
    monkeypatch.setattr(execute_module._HeldSteps, "CPU_ALONE", 200)  # t29 and up: 206+
    models = many_small_models()
    expected = terge.merge(models, weights=[0.2, 0.3, 0.5])
    calls = count_calls(monkeypatch, fastloop, "combine", "combine_many")
    merged = terge.merge(models, weights=[0.2, 0.3, 0.5])
    assert calls == {"combine": 41, "combine_many": 2}  # t29-t69 alone; t0-t28 in two groups
    assert all(torch.equal(merged[k], v) for k, v in expected.items())


def test_a_merge_written_to_files_holds_no_step(monkeypatch, tmp_path):
    """Written to files, each destination is a view of a shard's memory map that may be closed
    once its tensors are written: no step waits for a later call."""
    import terge
    from terge.io import load
    from terge.kernels import fastloop

    models = many_small_models()
    expected = terge.merge(models)
    calls = count_calls(monkeypatch, fastloop, "combine_many")
    terge.merge(models, out=tmp_path / "merged", max_shard_size="2KB")
    assert calls == {"combine_many": 0}
    written = load(tmp_path / "merged")
    assert all(torch.equal(written[k], v) for k, v in expected.items())


def test_a_step_reading_what_a_held_step_writes_waits_for_it(monkeypatch):
    """One tensor shared by two models under different names (model 1's 't2' is the base's
    't1'): merged in place, 't2' reads 't1' as merged, as when the steps run one by one. The
    steps sit in different calls (weighed apart), so without the wait 't2' would be computed
    first and read 't1' unmerged."""
    import re

    import terge

    def models():
        shared = torch.arange(4.0)
        base = {"t0": torch.ones(4), "t1": shared, "t2": torch.full((4,), 2.0)}
        other = {"t0": torch.zeros(4), "t1": torch.full((4,), 8.0), "t2": shared}
        return [base, other]

    weights = {re.compile("t1"): [1.0, 3.0], re.compile(".*"): [1.0, 1.0]}
    with monkeypatch.context() as reference:
        reference.setenv("TERGE_KERNELS", "torch")  # one step after the other
        expected = terge.merge(models(), weights=weights, inplace=True)
    assert torch.equal(expected["t2"], (2.0 + (torch.arange(4.0) + 24.0) / 4) / 2)
    merged = terge.merge(models(), weights=weights, inplace=True)
    for name, value in expected.items():
        assert torch.equal(merged[name], value), name


def test_a_step_writing_what_a_held_step_reads_waits_for_it():
    """The other way round: 't2' reads the base's 't1' through model 1 and is held; 't1',
    merged in place after it, must wait until 't2' has read it, as one by one. 't0' starts
    't1''s group of held steps before 't2''s, so the groups' order alone would run 't1' first."""
    import re

    import terge

    def models():
        shared = torch.arange(4.0)
        base = {"t0": torch.ones(4), "t2": torch.full((4,), 2.0), "t1": shared}
        other = {"t0": torch.zeros(4), "t2": shared, "t1": torch.full((4,), 8.0)}
        return [base, other]

    weights = {re.compile("t[01]"): [1.0, 3.0], re.compile(".*"): [1.0, 1.0]}
    merged = terge.merge(models(), weights=weights, inplace=True)
    assert torch.equal(merged["t2"], (2.0 + torch.arange(4.0)) / 2)  # 't1' as it was
    assert torch.equal(merged["t1"], (torch.arange(4.0) + 24.0) / 4)


def test_a_ctrl_c_during_an_in_place_merge_with_held_steps_loses_none_of_them(
    monkeypatch, python_sigint
):
    """A SIGINT that arrives while steps are held (here: when the TIES step between them runs)
    is held until every write is done: the steps held before it and those after are all
    written, then the KeyboardInterrupt surfaces. Nothing held is dropped."""
    import re
    import signal

    import terge
    from terge import execute as execute_module

    method = {"t40": "ties", re.compile(r"t\d+"): "arithmetic"}
    expected = terge.merge(many_small_models(), method=method)
    original = execute_module.run_step

    def interrupted(step, *args, **kwargs):
        if step.name == "t40":
            signal.raise_signal(signal.SIGINT)
        return original(step, *args, **kwargs)

    monkeypatch.setattr(execute_module, "run_step", interrupted)
    calls = count_calls(monkeypatch, execute_module.fastloop, "combine_many")
    target = many_small_models()
    with pytest.raises(KeyboardInterrupt):
        terge.merge(target, method=method, inplace=True)
    assert calls["combine_many"] == 4  # held steps were computed, before t40 and at the end
    for name, value in expected.items():
        assert torch.equal(target[0][name], value), name
    import gc

    assert gc.isenabled()  # paused during the merge, resumed as the interrupt left it


# --- what a copy keeps, and what it must not share -------------------------------------------------


def test_a_checkpoint_bases_tensors_left_alone_are_read_into_memory(tmp_path):
    """The result's tensors that are not merged are the base's values read into memory, not a
    view of its file: the file rewritten in place afterwards (as saving the result over its own
    input does) leaves them as they were."""
    for i in range(2):
        save(
            {"w": torch.full((2,), float(i)), "solo" if i == 0 else "o": torch.ones(1)},
            tmp_path / f"m{i}",
        )
    sources = [FileSource(tmp_path / f"m{i}") for i in range(2)]
    result, _ = destinations(sources[0], plan_for(sources), inplace=False)
    file = tmp_path / "m0" / "model.safetensors"
    with open(file, "r+b") as handle:  # every tensor's bytes zeroed, the file's size kept
        handle.seek(file.stat().st_size - 12)
        handle.write(bytes(12))
    assert torch.equal(FileSource(tmp_path / "m0").get("solo"), torch.zeros(1))  # rewritten
    assert torch.equal(result["solo"], torch.ones(1))
    for source in sources:
        source.close()


def test_a_copied_module_keeps_frozen_parameters_frozen_and_views_shared():
    """Parameters that do not require grad stay so in the copy; two Parameter objects viewing
    the same memory (``b`` made from ``a.data``) still share one fresh tensor, each keeping its
    own requires_grad."""

    def model(value: float) -> torch.nn.Module:
        module = torch.nn.Module()
        module.a = torch.nn.Parameter(torch.full((3,), value))
        module.b = torch.nn.Parameter(module.a.data, requires_grad=False)
        module.frozen = torch.nn.Parameter(torch.full((2,), value), requires_grad=False)
        return module

    models = [model(1.0), model(3.0)]
    import terge

    merged = terge.merge(models)
    assert merged.a.requires_grad and not merged.b.requires_grad
    assert not merged.frozen.requires_grad
    assert shares_memory(merged.a, merged.b)
    assert torch.equal(merged.b, torch.full((3,), 2.0))
    assert torch.equal(merged.frozen, torch.full((2,), 2.0))


def test_a_copied_state_dict_keeps_the_strides_of_what_it_does_not_merge():
    transposed = torch.arange(6).view(2, 3).t()  # an integer tensor: copied, not merged
    states = [{"w": torch.full((2,), float(i)), "n": transposed} for i in range(2)]
    sources = [StateDictSource(s) for s in states]
    result, _ = destinations(sources[0], plan_for(sources), inplace=False)
    assert torch.equal(result["n"], transposed) and not shares_memory(result["n"], transposed)
    assert result["n"].stride() == transposed.stride()


def test_a_hook_sees_each_step_written_when_small_steps_may_be_held():
    """With ``hold`` (a merge in memory) and a hook (digests), no step is held back: the hook's
    ``after`` reads each result once it is written."""
    states = [{"a": torch.full((2,), float(i)), "b": torch.full((1,), 2.0 * i)} for i in range(3)]
    sources = [StateDictSource(s) for s in states]
    made = {name: torch.full(states[0][name].shape, -1.0) for name in ("a", "b")}
    events: list = []
    plan = plan_for(sources)
    execute(
        plan.steps,
        sources,
        sources[0],
        made.__getitem__,
        torch.float64,
        False,
        Recorder(events),
        hold=True,
    )
    assert events == [
        ("before", "a"),
        ("after", "a", [1.0, 1.0]),
        ("before", "b"),
        ("after", "b", [2.0]),
    ]


# --- a failure while writing in place says what is merged already ---------------------------------


def six_tensors() -> list[dict[str, torch.Tensor]]:
    return [{f"t{i}": torch.full((3,), float(m + i)) for i in range(6)} for m in range(2)]


def fail_at(monkeypatch, name: str) -> None:
    """Make the step that computes ``name`` raise, as a kernel running out of memory would."""
    from terge import execute as execute_module

    original = execute_module.run_step

    def failing(step, *args, **kwargs):
        if step.name == name:
            raise RuntimeError("out of memory")
        return original(step, *args, **kwargs)

    monkeypatch.setattr(execute_module, "run_step", failing)


@pytest.mark.parametrize(
    ("name", "state"),
    [
        (
            "t0",
            "at 't0' (tensor 1 of 6); 't0' may be partly written, and the 5 after it are untouched",
        ),
        (
            "t4",
            "at 't4' (tensor 5 of 6); the 4 before it ('t0', 't1', 't2', 't3') may hold merged "
            "values, 't4' may be partly written, and the 1 after it are untouched",
        ),
        (
            "t5",
            "at 't5' (tensor 6 of 6); the 5 before it ('t0', 't1', 't2', ..., 't4') may hold "
            "merged values, 't5' may be partly written, and the 0 after it are untouched",
        ),
    ],
)
def test_an_in_place_merge_that_fails_midway_notes_what_may_be_merged(monkeypatch, name, state):
    import terge

    fail_at(monkeypatch, name)
    with pytest.raises(RuntimeError, match="out of memory") as info:
        terge.merge(six_tensors(), method="ties", inplace=True)
    assert info.value.__notes__ == [
        f"terge: the in-place merge stopped {state}. The base is partly merged: reload it, or "
        "merge with inplace=False where a failure must leave it as it was."
    ]


def test_a_failure_writing_the_held_steps_at_the_end_notes_that_any_may_be_merged(monkeypatch):
    import terge
    from terge.kernels import fastloop

    if not fastloop.available():
        pytest.skip("the compiled loop is not built")

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(fastloop, "combine_many", failing)
    with pytest.raises(RuntimeError, match="out of memory") as info:
        terge.merge(six_tensors(), inplace=True)
    assert info.value.__notes__ == [
        "terge: the in-place merge stopped while writing the small tensors it held to the end; "
        "any of the 6 may hold merged values. The base is partly merged: reload it, or merge "
        "with inplace=False where a failure must leave it as it was."
    ]


def test_a_merge_into_a_copy_that_fails_adds_no_note(monkeypatch):
    import terge

    fail_at(monkeypatch, "t4")
    with pytest.raises(RuntimeError, match="out of memory") as info:
        terge.merge(six_tensors(), method="ties")
    assert not hasattr(info.value, "__notes__")


def test_an_in_place_merge_tells_autograd_the_parameters_changed():
    """The compiled loops write through raw pointers: the merge bumps each tensor's version, so
    a graph that saved a parameter refuses ``backward()`` instead of using the merged values."""
    import terge

    models = [torch.nn.Linear(3, 2) for _ in range(2)]
    loss = (models[0].weight * models[0].weight).sum()  # saves the weight for backward
    terge.merge(models, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_more_models_than_one_compiled_call_takes_are_merged_step_by_step():
    """The compiled loop reads at most ``fastloop.MAX_INPUTS`` inputs per call: a merge of more
    models is not held for it, and still gives the mean."""
    import terge
    from terge.kernels import fastloop

    count = fastloop.MAX_INPUTS + 1
    merged = terge.merge([{"w": torch.full((3,), float(i))} for i in range(count)])
    assert torch.equal(merged["w"], torch.full((3,), (count - 1) / 2))


def test_a_user_s_method_that_raises_leaves_an_in_place_merge_unwritten():
    """A user's own method runs before anything is written in place: where it raises for the
    second tensor, the first (a built-in's) is not half-merged into the base."""
    import terge
    from terge.errors import MethodError

    base = {"a": torch.ones(3), "b": torch.ones(3)}
    other = {"a": torch.zeros(3), "b": torch.zeros(3)}

    def bad(tensors, weights, base):
        raise RuntimeError("boom")

    with pytest.raises(
        MethodError,
        match=r"^the merge method '\S*bad' raised RuntimeError: boom while merging the parameter "
        r"'b' of models \[0, 1\] with the base \(the original error is chained as its cause\)\.$",
    ):
        terge.merge([base, other], method={"a": "arithmetic", "b": bad}, inplace=True)
    assert torch.equal(base["a"], torch.ones(3)) and torch.equal(base["b"], torch.ones(3))


def test_an_in_place_merge_puts_the_ctrl_c_handler_back(python_sigint):
    """Ctrl-C is held only while the base is written: afterwards the caller's handler is the
    one installed again (else every later Ctrl-C would be swallowed), with and without one."""
    import signal

    import terge

    def mine(signum, frame):
        raise KeyboardInterrupt

    for handler in (signal.default_int_handler, mine, signal.SIG_IGN):
        signal.signal(signal.SIGINT, handler)
        terge.merge([{"w": torch.ones(3)}, {"w": torch.zeros(3)}], inplace=True)
        assert signal.getsignal(signal.SIGINT) is handler


def test_a_ctrl_c_held_under_the_default_action_still_ends_the_process(tmp_path):
    """With SIGINT's default action (no Python handler), a Ctrl-C held while the base is
    written is delivered afterwards: the process ends of it, as it would have without terge."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "held.py"
    script.write_text(
        "import signal, torch, terge\n"
        "from terge import execute\n"
        "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
        "original = execute.run_step\n"
        "def interrupted(step, *args, **kwargs):\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    return original(step, *args, **kwargs)\n"
        "execute.run_step = interrupted\n"
        "models = [{'w': torch.ones(3)}, {'w': torch.zeros(3)}]\n"
        "terge.merge(models, method='ties', inplace=True)  # run_step inside the hold\n"
        "print('the Ctrl-C was lost')\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -signal.SIGINT, (done.returncode, done.stdout, done.stderr)
    assert "lost" not in done.stdout


@pytest.mark.parametrize("method", ["ties", "magmax", "breadcrumbs_ties"])
def test_float32_accumulation_never_takes_the_float64_compiled_loops(method, monkeypatch):
    """The compiled task-vector loops compute in float64: with dtype=float32 the float32
    reference runs (the same as with the loops switched off), not the loops' other bits."""
    import terge

    generator = torch.Generator().manual_seed(3)
    models = [{"w": torch.randn(64, 64, generator=generator)} for _ in range(4)]
    got = terge.merge(models, method=method, dtype=torch.float32, seed=0)["w"]
    in_float64 = terge.merge(models, method=method, seed=0)["w"]
    assert not torch.equal(got, in_float64)  # the accumulations differ on these values
    monkeypatch.setenv("TERGE_KERNELS", "torch")
    assert torch.equal(got, terge.merge(models, method=method, dtype=torch.float32, seed=0)["w"])


def test_a_built_in_method_s_own_error_is_not_wrapped_as_a_user_s():
    """A built-in method's refusal while merging (three per-model densities for two
    contributors) surfaces as itself, with its message, not as a MethodError about 'the merge
    method ... raised'."""
    import terge
    from terge.errors import MethodError, MethodNotApplicableError

    generator = torch.Generator().manual_seed(0)
    models = [{"w": torch.randn(4, 4, generator=generator)} for _ in range(3)]
    method = terge.methods.della(density=[0.5, 0.5, 0.5], epsilon=0.1)
    with pytest.raises(MethodNotApplicableError) as raised:
        terge.merge(models, base=0, method=method, seed=1)
    assert not isinstance(raised.value, MethodError)
    assert str(raised.value).startswith("della: density has 3 per-model values, but 2 models")


def test_a_user_s_method_returning_complex_numbers_is_refused_naming_it():
    import terge
    from terge.errors import MethodResultError

    def complex_mean(tensors, weights, base):
        return torch.complex(tensors[0], tensors[0])

    with pytest.raises(
        MethodResultError,
        match=r"^the merge method '\S*complex_mean' returned a torch.complex(64|128) tensor for "
        r"the parameter 'w'; a method must return real numbers\.$",
    ):
        terge.merge([{"w": torch.ones(3)}, {"w": torch.zeros(3)}], method=complex_mean)
