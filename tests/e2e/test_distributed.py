"""Sharded and wrapped models: FSDP2 (DTensor) models merged where they live, on 2 CPU processes
with gloo, against the same merge of unsharded copies; DDP and torch.compile prefixes; name_map.

The 2-process job is spawned once for the module: it runs every sharded scenario, and each rank
saves what it saw (mismatching names, error messages, lineages) for the tests below to check.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import terge
from terge import MergeArgumentError, ShardingError

WORLD = 2
TIMEOUT = 240  # seconds for the whole job; a hang (a missed collective) fails rather than blocks
TOKENS = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]

distributed_ok = torch.distributed.is_available() and torch.distributed.is_gloo_available()


# --- the models -----------------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    """A small transformer: embedding, two encoder blocks, final norm, head. The vocabulary (11)
    does not divide by 2, so the embedding and head are sharded unevenly (6 + 5 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 16)
        block = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, 2, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 11)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(tokens)))).clone()


def family(n: int = 3, tied: bool = False) -> list[TinyLM]:
    """A base and ``n`` fine-tunes of it (the same on every rank); ``tied``: the head is the
    embedding, as in many LMs."""
    torch.manual_seed(0)
    base = TinyLM()
    if tied:
        base.head.weight = base.embed.weight
    models = [base]
    for i in range(n):
        model = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
        models.append(model)
    return models


# --- the job each rank runs -----------------------------------------------------------------------


def _fsdp2(model: torch.nn.Module, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _mismatches(sharded: dict, plain: dict, exact: bool = True) -> list[str]:
    """Names whose gathered sharded tensor is not the plain one (bit for bit, or to 1e-12)."""
    bad = []
    for name, tensor in sharded.items():
        whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        expected = plain[name]
        if exact:
            same = torch.equal(whole, expected)
        else:  # slerp, model_stock: dot products summed shard by shard, float64 rounding apart
            same = torch.allclose(whole, expected, rtol=1e-12, atol=1e-15)
        if not same:
            bad.append(name)
    return bad


def _error(call) -> str:
    try:
        call()
    except terge.TergeError as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _fsdp2_scenarios(mesh, out: Path, rank: int) -> dict:
    from terge.lineage import lineage_text

    results = {}
    for method in ("arithmetic", "ties", "dare_ties"):
        plain = family()
        sharded = [_fsdp2(copy.deepcopy(m), mesh) for m in plain]
        before = {n: (p, p.to_local().data_ptr()) for n, p in sharded[0].named_parameters()}
        _, plain_lineage = terge.merge(
            plain[1:], base=plain[0], method=method, inplace=True, seed=7, lineage=True
        )
        returned, lineage = terge.merge(
            sharded[1:], base=sharded[0], method=method, inplace=True, seed=7, lineage=True
        )
        after = dict(sharded[0].named_parameters())
        tokens = torch.tensor(TOKENS)
        results[method] = {
            "mismatches": _mismatches(after, dict(plain[0].named_parameters())),
            "returned_base": returned is sharded[0],
            "same_storage": all(
                after[n] is p and after[n].to_local().data_ptr() == ptr
                for n, (p, ptr) in before.items()
            ),
            "all_dtensors": all(hasattr(p, "full_tensor") for p in after.values()),
            # FSDP2's own all-gather (the forward) sees what was written into the shards.
            "forward_equal": torch.equal(sharded[0](tokens), plain[0](tokens)),
            "lineage_equal": lineage == plain_lineage,
            "lineage_text": lineage_text(lineage),
            "merged": len(lineage),
        }

    # out=: merged shard by shard, gathered tensor by tensor, written by rank 0 only.
    import terge.output as output

    opened = []

    class CountingWriter(output.StreamingShardWriter):
        def __init__(self, *args, **kwargs):
            opened.append(rank)
            super().__init__(*args, **kwargs)

    output.StreamingShardWriter = CountingWriter
    plain = family(tied=True)  # written once, under its first name
    sharded = [_fsdp2(copy.deepcopy(m), mesh) for m in plain]
    options = {"method": "ties", "seed": 3, "out_dtype": "bfloat16", "excluded": "norm.weight"}
    path, lineage = terge.merge(
        sharded[1:], base=sharded[0], out=out / "sharded", lineage=True, **options
    )
    output.StreamingShardWriter = CountingWriter.__mro__[1]
    if rank == 0:
        terge.merge(plain[1:], base=plain[0], out=out / "plain", **options)
    results["out"] = {
        "path": str(path),
        "writers": opened,
        "lineage_text": lineage_text(lineage),
        "unchanged": not _mismatches(
            dict(sharded[0].named_parameters()), dict(plain[0].named_parameters())
        ),
    }

    # A copy is refused for an FSDP2 module (it cannot be deep-copied); its state dict works.
    plain = family()
    sharded = [_fsdp2(copy.deepcopy(m), mesh) for m in plain]
    results["copy_module"] = _error(
        lambda: terge.merge(sharded[1:], base=sharded[0], method="ties")
    )
    merged_state = terge.merge(
        [m.state_dict() for m in sharded[1:]], base=sharded[0].state_dict(), method="ties"
    )
    expected = terge.merge(plain[1:], base=plain[0], method="ties").state_dict()
    results["copy_state_dict"] = _mismatches(merged_state, expected)

    # Refusals, before anything is written.
    results["seed_none"] = _error(
        lambda: terge.merge(sharded[1:], base=sharded[0], method="dare_linear", inplace=True)
    )
    results["digests"] = _error(
        lambda: terge.merge(
            sharded[1:], base=sharded[0], inplace=True, seed=0, digests=True, lineage=True
        )
    )
    results["mixed"] = _error(
        lambda: terge.merge([sharded[1], plain[2]], base=sharded[0], inplace=True)
    )
    results["untouched_after_errors"] = not _mismatches(
        dict(sharded[0].named_parameters()), dict(plain[0].named_parameters())
    )
    return results


def _dtensor_scenarios(mesh) -> dict:
    """Hand-made DTensors: Shard(1), uneven Shard(0) and Replicate placements, every method."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    generator = torch.Generator().manual_seed(5)
    shapes = {"w": (7, 9), "v": (13,), "s": (4, 6)}
    placements = {"w": [Shard(1)], "v": [Shard(0)], "s": [Replicate()]}
    base = {
        k: torch.randn(shape, generator=generator, dtype=torch.float64)
        for k, shape in shapes.items()
    }
    thetas = [
        {
            k: v + torch.randn(v.shape, generator=generator, dtype=torch.float64)
            for k, v in base.items()
        }
        for _ in range(3)
    ]

    def sharded(state: dict) -> dict:
        return {k: distribute_tensor(v.clone(), mesh, placements[k]) for k, v in state.items()}

    results = {}
    cases = {
        "task_arithmetic": ("task_arithmetic", True),
        "ties": (terge.methods.ties(density=0.3), True),
        "dare_linear": (terge.methods.dare_linear(density=0.4), True),
        "dare_ties": ("dare_ties", True),
        "breadcrumbs": (terge.methods.breadcrumbs(density=0.5, gamma=0.2), True),
        "model_stock": ("model_stock", False),
    }
    for label, (method, exact) in cases.items():
        expected = terge.merge(thetas, base=base, method=method, seed=11)
        merged = terge.merge(
            [sharded(t) for t in thetas], base=sharded(base), method=method, seed=11
        )
        results[label] = _mismatches(merged, expected, exact)
    expected = terge.merge(thetas[:2], method="slerp", weights=[0.3, 0.7])
    merged = terge.merge([sharded(t) for t in thetas[:2]], method="slerp", weights=[0.3, 0.7])
    results["slerp"] = _mismatches(merged, expected, exact=False)

    newer = {  # the newer methods: element-wise ones exactly, statistics to rounding
        "breadcrumbs_ties": (terge.methods.breadcrumbs_ties(density=0.5, gamma=0.2), True),
        "magmax": ("magmax", True),
        "consensus": ("consensus", True),
        "sce": (terge.methods.sce(select_topk=0.5), False),
        "multislerp": (terge.methods.multislerp(task_vectors=True), False),
        "karcher": (terge.methods.karcher(task_vectors=True), False),
    }
    for label, (method, exact) in newer.items():
        expected = terge.merge(thetas, base=base, method=method)
        merged = terge.merge([sharded(t) for t in thetas], base=sharded(base), method=method)
        results[label] = _mismatches(merged, expected, exact)
    expected = terge.merge(thetas[:1], base=base, method="nearswap")
    merged = terge.merge([sharded(thetas[0])], base=sharded(base), method="nearswap")
    results["nearswap"] = _mismatches(merged, expected)
    expected = terge.merge(thetas[:2], method="nuslerp", weights=[0.3, 0.7])
    merged = terge.merge([sharded(t) for t in thetas[:2]], method="nuslerp", weights=[0.3, 0.7])
    results["nuslerp"] = _mismatches(merged, expected, exact=False)
    for name in ("della", "pcb", "tsv_m"):
        results[f"refused_{name}"] = _error(
            lambda name=name: terge.merge(
                [sharded(t) for t in thetas], base=sharded(base), method=name, seed=1
            )
        )

    def median(tensors, weights, base):
        return torch.stack(tensors).median(dim=0).values

    expected = terge.merge(thetas, method=median)
    merged = terge.merge(
        [sharded(t) for t in thetas], method=terge.methods.custom(median, elementwise=True)
    )
    results["elementwise_custom"] = _mismatches(merged, expected)
    results["custom"] = _error(lambda: terge.merge([sharded(t) for t in thetas], method=median))

    other = dict(sharded(thetas[1]))
    other["w"] = distribute_tensor(thetas[1]["w"].clone(), mesh, [Shard(0)])
    results["placements"] = _error(lambda: terge.merge([sharded(thetas[0]), other]))
    return results


def _ddp_scenario() -> dict:
    """A real DDP wrapper as the base, merged in place with unwrapped models."""
    plain = family()
    wrapped = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(plain[1]))
    returned, lineage = terge.merge([wrapped, *plain[2:]], inplace=True, lineage=True)
    expected, expected_lineage = terge.merge(plain[1:], lineage=True)
    return {
        "returned_wrapper": returned is wrapped,
        "mismatches": _mismatches(
            dict(wrapped.module.named_parameters()), dict(expected.named_parameters())
        ),
        "lineage_equal": dict(lineage) == dict(expected_lineage),
        "prefixed": [name for name in lineage if name.startswith("module.")],
    }


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on two cores
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        results = {
            "fsdp2": _fsdp2_scenarios(mesh, Path(folder), rank),
            "dtensor": _dtensor_scenarios(mesh),
            "ddp": _ddp_scenario(),
        }
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the 2-process job once; the results of each rank, and the folder it wrote into."""
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("distributed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(
        _worker, args=(port, str(folder)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the distributed job did not finish within {TIMEOUT} s")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], folder


needs_gloo = pytest.mark.skipif(not distributed_ok, reason="needs torch.distributed with gloo")


# --- FSDP2 ----------------------------------------------------------------------------------------


@needs_gloo
@pytest.mark.parametrize("method", ["arithmetic", "ties", "dare_ties"])
def test_fsdp2_models_merge_in_place_exactly_as_unsharded_copies(job, method):
    for results in job[0]:
        seen = results["fsdp2"][method]
        assert seen["mismatches"] == []  # bit for bit, every parameter, gathered
        assert seen["merged"] == 29  # every parameter of TinyLM
        assert seen["returned_base"]
        assert seen["same_storage"]  # the same Parameters, written in their own shards
        assert seen["all_dtensors"]
        assert seen["forward_equal"]


@needs_gloo
@pytest.mark.parametrize("method", ["arithmetic", "ties", "dare_ties"])
def test_the_lineage_is_the_unsharded_one_on_every_rank(job, method):
    texts = {results["fsdp2"][method]["lineage_text"] for results in job[0]}
    assert len(texts) == 1
    assert all(results["fsdp2"][method]["lineage_equal"] for results in job[0])


@needs_gloo
def test_only_rank_0_writes_and_the_files_are_the_unsharded_ones(job):
    from safetensors.torch import load_file

    ranks, folder = job
    assert [r["fsdp2"]["out"]["writers"] for r in ranks] == [[0], []]
    assert {r["fsdp2"]["out"]["path"] for r in ranks} == {str(folder / "sharded")}
    assert all(r["fsdp2"]["out"]["unchanged"] for r in ranks)  # out= never writes into the base
    written = load_file(folder / "sharded" / "model.safetensors")
    expected = load_file(folder / "plain" / "model.safetensors")
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert written["embed.weight"].dtype == torch.bfloat16
    assert "head.weight" not in written  # tied to embed.weight: written once
    lineage_file = (folder / "sharded" / "lineage.json").read_text()
    assert lineage_file == (folder / "plain" / "lineage.json").read_text()
    assert {r["fsdp2"]["out"]["lineage_text"] for r in ranks} == {lineage_file}


@needs_gloo
def test_an_fsdp2_module_is_not_copied_but_its_state_dict_is(job):
    for results in job[0]:
        seen = results["fsdp2"]
        assert seen["copy_module"].startswith("MergeArgumentError: the base module holds DTensors")
        assert "inplace=True" in seen["copy_module"]
        assert seen["copy_state_dict"] == []


@needs_gloo
def test_sharded_refusals_name_the_fix_and_touch_nothing(job):
    seen = job[0][0]["fsdp2"]
    assert seen["seed_none"] == (
        "ShardingError: the parameter 'embed.weight' of a sharded merge is merged with the "
        "random method 'dare_linear', but seed=None would draw a different seed on each rank; "
        "pass seed=<int>, the same on every rank (it is recorded in the lineage)."
    )
    assert seen["digests"].startswith("ShardingError: digests=True hashes whole tensors")
    assert re.fullmatch(
        r"ShardingError: the parameter 'embed.weight' is a DTensor \(\(Shard\(dim=0\),\) on "
        r"DeviceMesh\(.*\)\) in the base but a plain tensor in models\[1\]; terge merges "
        r"sharded parameters shard by shard and never gathers them silently\. .*",
        seen["mixed"],
    )
    assert seen["untouched_after_errors"]


# --- hand-made DTensors ---------------------------------------------------------------------------


@needs_gloo
@pytest.mark.parametrize(
    "method",
    ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "elementwise_custom"],
)
def test_dtensors_of_any_placement_merge_exactly(job, method):
    # Shard(1), an uneven Shard(0) and Replicate: bit for bit the unsharded merge.
    for results in job[0]:
        assert results["dtensor"][method] == []


@needs_gloo
@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_angles_and_cosines_over_shards_match_to_rounding(job, method):
    # Dot products summed over shards: the whole tensor's up to float64 rounding (rtol 1e-12).
    for results in job[0]:
        assert results["dtensor"][method] == []


@needs_gloo
@pytest.mark.parametrize("method", ["breadcrumbs_ties", "magmax", "consensus", "nearswap"])
def test_the_newer_element_wise_methods_merge_shards_exactly(job, method):
    for results in job[0]:
        assert results["dtensor"][method] == []


@needs_gloo
@pytest.mark.parametrize("method", ["sce", "multislerp", "karcher", "nuslerp"])
def test_the_newer_methods_statistics_over_shards_match_to_rounding(job, method):
    for results in job[0]:
        assert results["dtensor"][method] == []


@needs_gloo
@pytest.mark.parametrize("method", ["della", "pcb", "tsv_m"])
def test_methods_that_need_whole_rows_or_matrices_refuse_shards(job, method):
    message = job[0][0]["dtensor"][f"refused_{method}"]
    assert message.startswith(
        f"ShardingError: the merge method {method!r} cannot be applied to the sharded parameter"
    )
    assert "gather the DTensors" in message


@needs_gloo
def test_placements_that_differ_are_an_error_naming_both(job):
    message = job[0][0]["dtensor"]["placements"]
    mesh = "DeviceMesh((2,), 'cpu', stride=(1,))"
    assert message == (
        f"ShardingError: the parameter 'w' is sharded as (Shard(dim=1),) on {mesh} in the base "
        f"but as (Shard(dim=0),) on {mesh} in models[1]; merging shard by shard needs every "
        "model's tensor on the same device mesh with the same placements. Shard the models alike "
        "(the same fully_shard or distribute_tensor calls), or redistribute one "
        "(tensor.redistribute(mesh, placements))."
    )


@needs_gloo
def test_a_custom_method_on_shards_must_be_declared_elementwise(job):
    message = job[0][0]["dtensor"]["custom"]
    assert message.startswith("ShardingError: the merge method '")
    assert "cannot be applied to the sharded parameter 'w'" in message
    assert "terge.methods.custom(function, elementwise=True)" in message


# --- wrappers -------------------------------------------------------------------------------------


@needs_gloo
def test_a_ddp_base_merges_in_place_under_its_inner_names(job):
    for results in job[0]:
        seen = results["ddp"]
        assert seen["returned_wrapper"]
        assert seen["mismatches"] == []
        assert seen["lineage_equal"]
        assert seen["prefixed"] == []


class Wrapper(torch.nn.Module):
    """Stands in for DDP: the model under ``module.``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.module = inner


# torch.compile's first use imports torch.jit's deprecated script_method: torch's, not ours.
no_jit_warning = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


@no_jit_warning
def test_torch_compile_and_ddp_prefixes_do_not_stop_names_from_matching():
    plain = family()
    compiled = torch.compile(copy.deepcopy(plain[1]))  # compilation is lazy: nothing compiles
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    ddp_state = {f"module.{k}": v for k, v in plain[2].state_dict().items()}
    nested = {f"module._orig_mod.{k}": v for k, v in plain[3].state_dict().items()}
    merged, lineage = terge.merge([compiled, ddp_state, nested], lineage=True)
    expected, expected_lineage = terge.merge(plain[1:], lineage=True)
    assert dict(lineage) == dict(expected_lineage)
    assert lineage.unused == {}
    assert isinstance(merged, TinyLM)  # a copy of the compiled module, without its wrapper
    for name, tensor in expected.state_dict().items():
        assert torch.equal(merged.state_dict()[name], tensor), name


@no_jit_warning
def test_a_wrapped_base_in_place_is_returned_as_given():
    plain = family()
    wrapped = torch.compile(copy.deepcopy(plain[1]))
    before = dict(wrapped.named_parameters())
    returned = terge.merge([wrapped, *plain[2:]], inplace=True)
    expected = terge.merge(plain[1:])
    assert returned is wrapped
    assert all(before[n] is p for n, p in wrapped.named_parameters())
    for name, tensor in expected.named_parameters():
        assert torch.equal(wrapped.get_parameter(f"_orig_mod.{name}"), tensor)


def test_a_state_dict_base_keeps_its_own_names():
    plain = family(2)
    ddp_state = OrderedDict((f"module.{k}", v) for k, v in plain[1].state_dict().items())
    merged = terge.merge([ddp_state, plain[2]])
    assert list(merged) == list(ddp_state)
    expected = terge.merge([plain[1], plain[2]]).state_dict()
    assert all(torch.equal(merged[f"module.{k}"], v) for k, v in expected.items())


def test_name_map_maps_other_wrappers_and_the_lineage_uses_it():
    plain = family(2)
    checkpointed = {
        k.replace("blocks.layers.", "blocks.layers._checkpoint_wrapped_module."): v
        for k, v in plain[2].state_dict().items()
    }
    without = terge.merge([plain[1], checkpointed], dry_run=True)
    assert "blocks.layers._checkpoint_wrapped_module.0.linear1.weight" in without.unused

    def name_map(name: str) -> str:
        return name.replace("_checkpoint_wrapped_module.", "")

    merged, lineage = terge.merge([plain[1], checkpointed], name_map=name_map, lineage=True)
    expected, expected_lineage = terge.merge(plain[1:], lineage=True)
    assert dict(lineage) == dict(expected_lineage)
    assert lineage.unused == {}
    for name, tensor in expected.named_parameters():
        assert torch.equal(merged.get_parameter(name), tensor)


@no_jit_warning
def test_a_folder_written_with_out_uses_the_canonical_names(tmp_path):
    from safetensors.torch import load_file

    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    terge.merge(
        [torch.compile(a), {"module.weight": b.weight, "module.bias": b.bias}],
        out=tmp_path / "plain",
    )
    assert set(load_file(tmp_path / "plain" / "model.safetensors")) == {"weight", "bias"}
    terge.merge(
        [torch.compile(a), b], out=tmp_path / "mapped", name_map=lambda name: f"model.{name}"
    )
    assert set(load_file(tmp_path / "mapped" / "model.safetensors")) == {
        "model.weight",
        "model.bias",
    }
    assert set(terge.load_lineage(tmp_path / "mapped")) == {"model.weight", "model.bias"}


def test_name_map_renames_every_model_into_the_lineage():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    lineage = terge.merge([a, b], name_map=lambda name: f"model.{name}", dry_run=True)
    assert set(lineage) == {"model.weight", "model.bias"}


def test_two_names_mapping_to_one_is_an_error_naming_both():
    state = {"module.weight": torch.ones(2), "weight": torch.zeros(2)}
    message = (
        "models[1] has two tensors, 'module.weight' and 'weight', that both map to the name "
        "'weight' once wrapper prefixes ('module.', '_orig_mod.') are stripped and `name_map` is "
        "applied; pass a name_map that keeps them apart, or drop one of them."
    )
    with pytest.raises(MergeArgumentError, match=f"^{re.escape(message)}$"):
        terge.merge([{"weight": torch.ones(2)}, state])
    with pytest.raises(MergeArgumentError, match=r"both map to the name 'x'"):
        terge.merge([{"a": torch.ones(2), "b": torch.ones(2)}] * 2, name_map=lambda name: "x")


@pytest.mark.parametrize(
    ("name_map", "message"),
    [
        ("module.", r"^`name_map` must be a function from a tensor's name to its canonical name"),
        (lambda name: None, r"^`name_map` returned None for the name 'weight' \(from 'weight'\)"),
        (lambda name: 1 / 0, r"^`name_map` raised ZeroDivisionError: division by zero for the"),
    ],
)
def test_a_bad_name_map_is_a_clear_error(name_map, message):
    with pytest.raises(MergeArgumentError, match=message):
        terge.merge([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], name_map=name_map)


# --- the plan's checks, without processes --------------------------------------------------------


def entry(sharding):
    from terge.sources import Entry

    return Entry("w", torch.Size([4]), torch.float32, torch.device("cpu"), "w", sharding)


@needs_gloo
def test_placements_other_than_shard_and_replicate_are_refused():
    from torch.distributed.tensor import Partial, Shard

    from terge.sharding import Sharding, check_sharding

    tensors = [("the base", entry(Sharding("mesh", (Partial(),))))]
    with pytest.raises(
        ShardingError,
        match=r"^the parameter 'w' has the placement Partial\(.*\) in the base; terge merges DTensors placed with Shard\(dim\) and Replicate\(\) only",
    ):
        check_sharding("w", tensors, terge.methods.arithmetic())
    same = Sharding("mesh", (Shard(0),))
    assert check_sharding(
        "w", [("the base", entry(same)), ("models[1]", entry(same))], terge.methods.ties()
    )
    assert not check_sharding("w", [("the base", entry(None))], terge.methods.ties())


@needs_gloo
def test_meshes_that_differ_are_refused_too():
    from torch.distributed.tensor import Shard

    from terge.sharding import Sharding, check_sharding

    tensors = [
        ("the base", entry(Sharding("mesh A", (Shard(0),)))),
        ("models[2]", entry(Sharding("mesh B", (Shard(0),)))),
    ]
    with pytest.raises(
        ShardingError,
        match=r"^the parameter 'w' is sharded as \(Shard\(dim=0\),\) on 'mesh A' in the base but as \(Shard\(dim=0\),\) on 'mesh B' in models\[2\]",
    ):
        check_sharding("w", tensors, terge.methods.arithmetic())


def test_sharding_error_is_a_merge_argument_error():
    assert issubclass(ShardingError, MergeArgumentError)
    assert issubclass(ShardingError, ValueError)
