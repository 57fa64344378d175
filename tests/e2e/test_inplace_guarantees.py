"""In-place merges are all or nothing against a user's method and interrupts: such a failure
leaves the base bit for bit as it was; what the kernels cannot take is decided while planning;
writes bump autograd's versions. terge's own kernels failing while they write (out of memory)
are not covered: the error is noted with what may be merged and what is untouched."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import terge
from terge.errors import MergeArgumentError, MethodError, MethodResultError

TENSORS = 16


def _models(count: int = 3) -> list[torch.nn.Sequential]:
    """Small models of 16 tensors (8 linear layers' weights and biases)."""
    torch.manual_seed(0)
    return [torch.nn.Sequential(*(torch.nn.Linear(3, 3) for _ in range(8))) for _ in range(count)]


def _record(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, torch.dtype, bytes]]:
    """Each parameter: its name, the object itself, its dtype and its raw bytes."""
    return [
        (name, p, p.dtype, p.detach().contiguous().view(torch.uint8).numpy().tobytes())
        for name, p in model.named_parameters()
    ]


def _assert_unchanged(model: torch.nn.Module, before: list) -> None:
    after = _record(model)
    assert [name for name, *_ in after] == [name for name, *_ in before]
    for (name, p, dtype, raw), (_, p0, dtype0, raw0) in zip(after, before):
        assert p is p0, name
        assert dtype == dtype0, name
        assert raw == raw0, f"{name} was modified"


def _failing_at(k: int, error: BaseException | None = None, shape: bool = False):
    """A user's method that merges like the mean, but raises (or returns a wrong shape) at its
    k-th call."""
    calls = []

    def method(tensors, weights, base):
        calls.append(1)
        if len(calls) == k + 1:
            if shape:
                return torch.zeros(7)
            raise error if error is not None else ValueError("boom")
        return sum(w * t for w, t in zip(weights, tensors))

    return method


@pytest.mark.parametrize("k", range(TENSORS))
def test_a_method_raising_at_any_tensor_leaves_the_base_bit_identical(k):
    models = _models()
    before = _record(models[0])
    with pytest.raises(MethodError, match=r"raised ValueError: boom while merging") as raised:
        terge.merge(models, method=_failing_at(k), inplace=True)
    assert isinstance(raised.value.__cause__, ValueError)
    _assert_unchanged(models[0], before)


@pytest.mark.parametrize("k", range(TENSORS))
def test_a_wrong_shape_at_any_tensor_leaves_the_base_bit_identical(k):
    models = _models()
    before = _record(models[0])
    with pytest.raises(MethodResultError, match=r"returned \(7,\)"):
        terge.merge(models, method=_failing_at(k, shape=True), inplace=True)
    _assert_unchanged(models[0], before)


@pytest.mark.parametrize("k", [0, 3, 7])
def test_a_keyboard_interrupt_from_a_method_is_not_wrapped_and_nothing_is_written(k):
    models = _models()
    before = _record(models[0])
    with pytest.raises(KeyboardInterrupt):
        terge.merge(models, method=_failing_at(k, KeyboardInterrupt()), inplace=True)
    _assert_unchanged(models[0], before)


@pytest.mark.parametrize("k", [0, 2, 7])
def test_built_in_tensors_are_not_written_before_a_users_method_fails(k):
    """Biases by a user's method, weights by the built-in mean: the weights come first in the
    model, yet none is written when a bias fails."""
    models = _models()
    before = _record(models[0])
    methods = {re.compile(r"bias$"): _failing_at(k), re.compile(".*"): "arithmetic"}
    with pytest.raises(MethodError):
        terge.merge(models, method=methods, inplace=True)
    _assert_unchanged(models[0], before)


def test_method_error_names_the_tensor_the_method_and_the_models():
    def exploding(tensors, weights, base):
        raise ZeroDivisionError("no way")

    models = [{"a.w": torch.ones(2)}, {"a.w": torch.ones(2)}, {"a.w": torch.ones(2)}]
    with pytest.raises(MethodError) as raised:
        terge.merge(models, method=exploding)
    message = str(raised.value)
    assert "exploding'" in message and "'a.w'" in message and "[0, 1, 2]" in message
    assert "ZeroDivisionError: no way" in message
    assert isinstance(raised.value.__cause__, ZeroDivisionError)
    assert isinstance(raised.value, terge.TergeError) and terge.MethodError is MethodError
    assert "MethodError" in terge.__all__


def test_the_methods_result_is_written_and_every_tensor_merged_when_nothing_fails():
    models = _models()
    expected = terge.merge(models, method=_failing_at(10**9))
    merged = terge.merge(models, method=_failing_at(10**9), inplace=True)
    assert merged is models[0]
    for name, p in merged.named_parameters():
        assert torch.equal(p, expected.get_parameter(name))


# --- SIGINT, in a subprocess --------------------------------------------------------------------

_SCRIPT = """
import json, os, signal, sys
import torch, terge

# Python's own handler, even where the suite runs in the background (SIGINT ignored, inherited)
signal.signal(signal.SIGINT, signal.default_int_handler)

def models():
    torch.manual_seed(0)
    return [torch.nn.Sequential(*(torch.nn.Linear(3, 3) for _ in range(8))) for _ in range(3)]

def raw(model):
    return [p.detach().view(torch.uint8).numpy().tobytes() for p in model.parameters()]

expected = raw(terge.merge(models()))
results = []
for k in range(16):
    group = models()
    params = list(group[0].parameters())
    before = raw(group[0])
    mode = sys.argv[1]
    kwargs = {}
    if mode == "method":  # the interrupt arrives while a user's method computes tensor k
        calls = []
        def method(tensors, weights, base):
            calls.append(1)
            if len(calls) == k + 1:
                os.kill(os.getpid(), signal.SIGINT)
            return sum(w * t for w, t in zip(weights, tensors))
        kwargs["method"] = method
    else:  # the interrupt arrives while tensor k is being written (the bar's update)
        import terge.execute
        class Bar:
            def __init__(self, **_):
                self.count = 0
            def __enter__(self):
                return self
            def __exit__(self, *_):
                pass
            def update(self, n):
                if self.count == k:
                    os.kill(os.getpid(), signal.SIGINT)
                self.count += n
        terge.execute.tqdm = Bar
        kwargs["progress"] = True
    try:
        terge.merge(group, inplace=True, **kwargs)
        outcome = "returned"
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    after = raw(group[0])
    state = "unchanged" if after == before else "merged" if after == expected else "partial"
    same = all(p is q for p, q in zip(params, group[0].parameters()))
    handler = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    results.append([outcome, state, same, handler])
print(json.dumps(results))
"""


def _run(mode: str) -> list[list]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sigint_while_a_users_method_computes_leaves_the_base_bit_identical():
    results = _run("method")
    assert results == [["KeyboardInterrupt", "unchanged", True, True]] * TENSORS


def test_sigint_while_writing_finishes_the_writes_then_surfaces():
    """Held while the base is written: the merge completes, never half done, and the
    KeyboardInterrupt is raised after the last write; the previous handler is back."""
    results = _run("write")
    assert results == [["KeyboardInterrupt", "merged", True, True]] * TENSORS


# --- decided while planning ---------------------------------------------------------------------


def _sixteen(special: torch.Tensor, at: int = 4) -> list[dict[str, torch.Tensor]]:
    """Three state dicts of 16 tensors; model 1's tensor ``at`` is ``special``."""
    torch.manual_seed(0)
    models = [{f"t{i}": torch.randn(4) for i in range(TENSORS)} for _ in range(3)]
    models[1][f"t{at}"] = special
    return models


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():  # deprecated in recent torch, still accepted
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)


def _raw(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in state.items()}


@pytest.mark.parametrize(
    ("special", "reason"),
    [
        (torch.ones(4).to(torch.float8_e4m3fn), "unsupported floating dtype"),
        (torch.ones(4).to_sparse(), "not a dense tensor"),
        (torch.ones(4, dtype=torch.complex64), "not floating point"),
        (torch.tensor([10, 20, 30, 40]), "not floating point"),
        (torch.ones(4, dtype=torch.bool), "not floating point"),
        (_quantized(), "not floating point"),
    ],
    ids=["float8", "sparse", "complex", "int", "bool", "quantized"],
)
def test_a_tensor_the_kernels_cannot_read_does_not_contribute(special, reason):
    models = _sixteen(special)
    expected = {k: (models[0][k] + models[2][k]) / 2 for k in models[0]}
    base = models[0]
    objects = dict(base)
    merged, lineage = terge.merge(models, inplace=True, lineage=True)
    assert merged is base and all(base[k] is objects[k] for k in base)
    assert torch.equal(base["t4"], expected["t4"])  # the mean of the two others
    assert lineage["t4"][1] == [(0, 0.5), (2, 0.5)]
    assert lineage.dropped == {"t4": {1: reason}}
    assert [i for i, _ in lineage["t5"][1]] == [0, 1, 2]


def test_with_one_model_left_the_tensor_is_left_alone_with_a_reason():
    """The issue's example: an integer tensor is never averaged into a float base."""
    models = [{"w": torch.zeros(4)}, {"w": torch.tensor([10, 20, 30, 40])}]
    with pytest.warns(terge.NoParametersToMergeWarning):
        merged, lineage = terge.merge(models, lineage=True)
    assert torch.equal(merged["w"], torch.zeros(4))
    assert lineage.skipped == {"w": "other models' tensors not mergeable"}
    assert lineage.dropped == {"w": {1: "not floating point"}}


@pytest.mark.parametrize(
    "base_tensor",
    [torch.ones(4).to(torch.float8_e4m3fn), torch.ones(4).to_sparse()],
    ids=["float8", "sparse"],
)
@pytest.mark.parametrize("inplace", [True, False])
def test_a_base_tensor_no_kernel_writes_is_left_alone(base_tensor, inplace):
    models = _sixteen(torch.randn(4))
    models[0]["t4"] = base_tensor
    before = base_tensor.to_dense().to(torch.float32) if base_tensor.is_sparse else None
    merged, lineage = terge.merge(models, inplace=inplace, lineage=True)
    assert merged["t4"] is base_tensor or not inplace
    reason = "not a dense tensor" if base_tensor.is_sparse else "unsupported floating dtype"
    assert lineage.skipped["t4"] == reason
    assert "t4" not in lineage and len(lineage) == TENSORS - 1
    if before is not None:
        assert torch.equal(merged["t4"].to_dense(), before)


def test_an_expanded_base_tensor_is_refused_in_place_before_anything_is_written():
    models = _sixteen(torch.randn(4), at=4)
    models[0]["t9"] = torch.ones(1).expand(4)
    before = _raw(models[0])
    with pytest.raises(MergeArgumentError, match=r"'t9': it is an expanded view"):
        terge.merge(models, inplace=True)
    assert _raw(models[0]) == before
    merged = terge.merge(models)  # copied, it merges
    mean = (1 + models[1]["t9"].double() + models[2]["t9"].double()) / 3
    assert torch.equal(merged["t9"], mean.float())


def test_an_expanded_base_tensor_is_refused_before_an_earlier_tensor_is_written():
    """As above, with TIES, which writes each tensor at its turn: the mean holds small tensors
    to the end, so above nothing would be written even if the view were refused only when its
    turn came. Here the tensors before it would already be merged."""
    models = _sixteen(torch.randn(4), at=4)
    models[0]["t9"] = torch.ones(1).expand(4)
    before = _raw(models[0])
    with pytest.raises(MergeArgumentError, match=r"'t9': it is an expanded view"):
        terge.merge(models, method="ties", inplace=True)
    assert _raw(models[0]) == before
    models[0]["t9"] = models[0]["t9"].clone()  # its own memory: the same merge changes t0..t8
    terge.merge(models, method="ties", inplace=True)
    after = _raw(models[0])
    assert all(after[f"t{i}"] != before[f"t{i}"] for i in range(9))


def test_partly_overlapping_base_views_are_refused_in_place():
    storage = torch.zeros(15)
    base = {"a": storage[0:10], "b": storage[5:15]}
    other = {"a": torch.ones(10), "b": torch.ones(10)}
    with pytest.raises(MergeArgumentError, match=r"'a' and 'b': they are different views"):
        terge.merge([base, other], inplace=True)
    assert torch.equal(storage, torch.zeros(15))
    merged = terge.merge([base, other])  # copied, each is merged from the inputs
    assert torch.equal(merged["a"], torch.full((10,), 0.5))
    assert torch.equal(merged["b"], torch.full((10,), 0.5))


def test_overlapping_views_are_refused_before_the_first_is_written():
    """As above, merged by TIES, which writes each tensor at its turn (the mean holds small
    tensors to the end, so above 'a' would stay unwritten even if the views were refused only
    when the turn of 'b' came)."""
    storage = torch.zeros(15)
    base = {"a": storage[0:10], "b": storage[5:15]}
    others = [{"a": torch.ones(10), "b": torch.ones(10)}] * 2
    with pytest.raises(MergeArgumentError, match=r"'a' and 'b': they are different views"):
        terge.merge([base, *others], method="ties", inplace=True)
    assert torch.equal(storage, torch.zeros(15))
    apart = {"a": torch.zeros(10), "b": torch.zeros(10)}  # the same merge, views apart: written
    terge.merge([apart, *others], method="ties", inplace=True)
    assert not torch.equal(apart["a"], torch.zeros(10))


def test_a_merged_view_overlapping_a_tensor_left_alone_is_refused_in_place():
    storage = torch.zeros(15)
    base = {"a": storage[0:10], "b": storage[5:15].long()}
    base["c"] = storage[8:12]
    with pytest.raises(MergeArgumentError, match=r"'a' and 'c'"):
        terge.merge([base, {"a": torch.ones(10)}], inplace=True)


def test_tied_views_stay_tied_in_place():
    shared = torch.zeros(6)
    base = {"a": shared, "b": shared, "c": torch.zeros(3)}
    others = [{"a": torch.full((6,), 3.0), "c": torch.ones(3)}] * 2
    merged, lineage = terge.merge([base, *others], inplace=True, lineage=True)
    assert merged["a"] is shared and merged["b"] is shared
    assert torch.equal(shared, torch.full((6,), 2.0))
    assert lineage.tied == {"b": "a"}


# --- autograd's version counter -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["arithmetic", "ties", "task_arithmetic", "slerp"])
def test_writing_in_place_bumps_the_version_as_copy_does(method):
    w = torch.nn.Parameter(torch.ones(4))
    x = torch.randn(4, requires_grad=True)
    loss = (x * w).sum()
    version = w._version
    others = [{"w": torch.zeros(4)}] if method == "slerp" else [{"w": torch.zeros(4)}] * 2
    terge.merge([{"w": w}, *others], method=method, inplace=True, seed=0)
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_issues_example_raises_in_backward():
    w = torch.nn.Parameter(torch.ones(4))
    x = torch.randn(4, requires_grad=True)
    loss = (x * w).sum()
    terge.merge([{"w": w}, {"w": torch.zeros(4)}], inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- flags --------------------------------------------------------------------------------------

FLAGS = ["inplace", "lineage", "progress", "normalize", "buffers", "digests", "dry_run"]


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("value", ["no", 1, 0, None, "False"])
def test_flags_take_booleans_only(flag, value):
    models = [{"w": torch.ones(2)}, {"w": torch.zeros(2)}]
    before = _raw(models[0])
    with pytest.raises(MergeArgumentError, match=rf"^`{flag}` must be True or False; got "):
        terge.merge(models, **{flag: value})
    assert _raw(models[0]) == before


@pytest.mark.parametrize("flag", [f for f in FLAGS if f != "inplace"])
@pytest.mark.parametrize("value", ["no", 1])
def test_a_bad_flag_is_refused_before_an_in_place_merge_writes(flag, value):
    """The test above merges into a copy, so its base could not change anyway: here the merge
    is in place and would change the base (the mean of ones and zeros), and a bad flag must
    stop it before the first write."""
    models = [{"w": torch.ones(2)}, {"w": torch.zeros(2)}]
    before = _raw(models[0])
    with pytest.raises(MergeArgumentError, match=rf"^`{flag}` must be True or False; got "):
        terge.merge(models, inplace=True, **{flag: value})
    assert _raw(models[0]) == before
    assert not torch.equal(terge.merge(models, inplace=True)["w"], torch.ones(2))  # it would


def test_the_issues_flag_message():
    with pytest.raises(
        MergeArgumentError, match=r"^`normalize` must be True or False; got 'no'\.$"
    ):
        terge.merge([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], normalize="no")


def test_numpy_bools_are_bools():
    numpy = pytest.importorskip("numpy")
    models = [{"w": torch.ones(2)}, {"w": torch.ones(2)}]
    merged = terge.merge(models, weights=[1, 1], normalize=numpy.bool_(False))
    assert torch.equal(merged["w"], torch.full((2,), 2.0))
    merged, lineage = terge.merge(models, lineage=numpy.bool_(True), inplace=numpy.bool_(True))
    assert merged is models[0] and lineage["w"][0] == "arithmetic"


# --- weights that overflow ----------------------------------------------------------------------


def test_weights_whose_sum_overflows_are_refused():
    models = [{"w": torch.ones(2)}, {"w": torch.ones(2)}, {"w": torch.ones(2)}]
    before = _raw(models[0])
    with pytest.raises(MergeArgumentError, match=r"parameter 'w'.* sum to inf in torch\.float64"):
        terge.merge(models, weights=[1e308, 1.5e308, 1], inplace=True)
    assert _raw(models[0]) == before


def test_float32_accumulation_overflows_sooner():
    models = [{"w": torch.ones(2)}, {"w": torch.ones(2)}]
    with pytest.raises(MergeArgumentError, match=r"sum to inf in torch\.float32"):
        terge.merge(models, weights=[2e38, 3e38], dtype=torch.float32)
    merged = terge.merge(models, weights=[2e38, 3e38])  # float64 holds the sum
    assert torch.equal(merged["w"], torch.ones(2))


def test_weights_whose_normalised_values_overflow_are_refused():
    models = [{"w": torch.ones(2)}] * 3
    with pytest.raises(MergeArgumentError, match=r"normalise to \[inf, -inf, 1\.0\]"):
        terge.merge(models, weights=[1e300, -1e300, 1e-300])


def test_interleaved_views_share_no_element_and_merge_in_place():
    storage = torch.zeros(4, 4)
    base = {"even": storage[:, 0::2], "odd": storage[:, 1::2]}
    others = [{"even": torch.ones(4, 2), "odd": torch.full((4, 2), 3.0)}]
    merged = terge.merge([base, *others], inplace=True)
    assert merged["even"]._base is storage and merged["odd"]._base is storage
    assert torch.equal(storage[:, 0::2], torch.full((4, 2), 0.5))
    assert torch.equal(storage[:, 1::2], torch.full((4, 2), 1.5))


def test_digests_of_an_atomic_merge_with_a_users_method():
    models = _models()
    copies = _models()

    def mean(tensors, weights, base):
        return sum(w * t for w, t in zip(weights, tensors))

    _, in_place = terge.merge(models, method=mean, inplace=True, lineage=True, digests=True)
    _, copied = terge.merge(copies, method=mean, lineage=True, digests=True)
    assert in_place.digests == copied.digests and len(in_place.digests) == TENSORS


def test_a_method_that_cannot_apply_is_refused_before_an_earlier_tensor_is_written():
    """Slerp takes exactly two models: with three, the tensor that asks for it is refused while
    planning, so the tensors before it are not written either. The earlier tensors are merged
    by TIES, which writes each at its turn (the mean would hold these small tensors to the end,
    and leave them unwritten whenever the check came), and the inapplicable tensor comes last:
    were the check made only at its turn, the earlier ones would already be merged."""
    models = _wide_models()
    before = _record(models[0])
    assert [name for name, *_ in before][-1] == "3.bias"
    methods = {re.compile(r"^3\.bias$"): "slerp", re.compile(".*"): "ties"}
    with pytest.raises(
        terge.MethodNotApplicableError, match=r"'slerp' needs exactly 2 contributing models"
    ):
        terge.merge(models, method=methods, inplace=True)
    _assert_unchanged(models[0], before)
    methods[re.compile(r"^3\.bias$")] = "arithmetic"  # let finish, the merge changes them all
    terge.merge(models, method=methods, inplace=True)
    assert all(raw != raw0 for (*_, raw), (*_, raw0) in zip(_record(models[0]), before))


def test_a_method_built_by_hand_is_a_users_method():
    def broken(tensors, weights, base):
        raise KeyError("missing")

    models = _models()
    before = _record(models[0])
    method = terge.methods.Method("mine", broken)
    with pytest.raises(MethodError, match=r"'mine' raised KeyError: 'missing' while merging"):
        terge.merge(models, method=method, inplace=True)
    _assert_unchanged(models[0], before)


def test_dropped_models_are_saved_loaded_compared_and_diffed(tmp_path):
    """lineage.dropped is part of the lineage file: it round-trips, counts in equality, and
    `terge lineage diff` names a change in it."""
    from terge.audit import diff_lineages

    models = [{"w": torch.zeros(4)}, {"w": torch.ones(4)}, {"w": torch.tensor([1, 2, 3, 4])}]
    _, lineage = terge.merge(models, lineage=True)
    assert lineage.dropped == {"w": {2: "not floating point"}}
    terge.save_lineage(lineage, tmp_path / "l.json")
    assert '"dropped": {\n    "w": [[2, "not floating point"]]' in (tmp_path / "l.json").read_text()
    loaded = terge.load_lineage(tmp_path / "l.json")
    assert loaded.dropped == lineage.dropped and loaded == lineage
    loaded.dropped = {}
    assert loaded != lineage
    assert diff_lineages(lineage, loaded).changes == [
        "- w: no longer dropped (was {2: 'not floating point'})"
    ]


def test_a_malformed_dropped_record_is_named(tmp_path):
    models = [{"w": torch.zeros(4)}, {"w": torch.ones(4)}, {"w": torch.tensor([1, 2, 3, 4])}]
    _, lineage = terge.merge(models, lineage=True)
    terge.save_lineage(lineage, tmp_path / "l.json")
    text = (tmp_path / "l.json").read_text().replace('[[2, "not floating point"]]', "[[2, 7]]")
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(terge.LineageError, match=r'dropped\["w"\]\[0\]\[1\]'):
        terge.load_lineage(tmp_path / "bad.json")


def test_a_statistics_method_failing_at_a_later_tensor_leaves_the_base_whole():
    """fisher and regmean check their statistics per tensor while merging; in place they are
    computed before the first write, so a missing statistic at the last tensor changes nothing."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)) for _ in range(2)]
    before = {k: v.clone() for k, v in models[0].state_dict().items()}
    full = {"0.weight": torch.ones(3, 3), "0.bias": torch.ones(3), "1.weight": torch.ones(3, 3)}
    partial = {"0.weight": torch.ones(3, 3), "0.bias": torch.ones(3)}
    with pytest.raises(terge.MethodNotApplicableError, match=r"'1\.weight' has Fisher diagonals"):
        terge.merge(models, method=terge.methods.fisher(fishers=[full, partial]), inplace=True)
    assert all(torch.equal(before[k], v) for k, v in models[0].state_dict().items())


# --- a built-in kernel failing while it writes (out of memory) -----------------------------------


def _wide_models(count: int = 3) -> list[torch.nn.Sequential]:
    """Models of 8 tensors (16 x 16 weights and 16-entry biases) large enough that PCB, TIES
    and the mean change every tensor of the base (the 3 x 3 layers above keep none of PCB's
    scores at its default ratio, so PCB would leave the base as it was even when it succeeds)."""
    torch.manual_seed(0)
    return [torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(4))) for _ in range(count)]


def _failing_kernel(monkeypatch, module, name: str, k: int) -> list[int]:
    """Make ``module.name`` (a compiled loop's entry point) raise MemoryError at its k-th call."""
    real = getattr(module, name)
    calls: list[int] = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == k + 1:
            raise MemoryError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return calls


def _failing_entry(
    monkeypatch, module, entry: str, k: int, compiled: str = "_fastmethods"
) -> list[int]:
    """Replace ``module.<compiled>`` (the compiled module as that module sees it) by a proxy
    whose ``entry`` raises MemoryError at its k-th call; every other name is the real one's."""
    real = getattr(module, compiled)
    calls: list[int] = []

    class Failing:
        def __getattr__(self, name):
            attribute = getattr(real, name)
            if name != entry:
                return attribute

            def failing(*args):
                calls.append(1)
                if len(calls) == k + 1:
                    raise MemoryError("injected")
                return attribute(*args)

            return failing

    monkeypatch.setattr(module, compiled, Failing())
    return calls


def _assert_partly_written_as_noted(models, before, method, raised) -> int:
    """The note names the tensor that failed; every tensor after it (in the model's order, the
    merge's) is bit for bit as it was, and every Parameter is the same object with its dtype.
    Returns how many tensors came before the failing one."""
    (note,) = getattr(raised.value, "__notes__", [])
    found = re.search(r"stopped at '([^']+)' \(tensor (\d+) of (\d+)\)", note)
    assert found, note
    names = [name for name, *_ in before]
    failed, position = found[1], int(found[2]) - 1
    assert names.index(failed) == position and int(found[3]) == len(names)
    assert f"the {len(names) - position - 1} after it are untouched" in note
    assert "inplace=False" in note
    after = _record(models[0])
    for (name, p, dtype, raw), (_, p0, dtype0, raw0) in zip(after, before, strict=True):
        assert p is p0 and dtype == dtype0, name
        if names.index(name) > position:
            assert raw == raw0, f"{name}, after the failure, was modified"
    return position


@pytest.mark.parametrize("method", ["pcb", "ties", "arithmetic", "multislerp", "karcher"])
def test_the_wide_models_merge_changes_every_tensor(method):
    """What makes the tests below able to fail: each of their merges, let finish, changes
    every tensor of the base."""
    models = _wide_models()
    before = _record(models[0])
    terge.merge(models, method=method, inplace=True)
    for (name, *_, raw), (_, *_, raw0) in zip(_record(models[0]), before, strict=True):
        assert raw != raw0, f"{name} was not changed by {method}"


@pytest.mark.parametrize("k", [0, 3, 6])
@pytest.mark.parametrize("path", ["compiled", "reference"])
def test_out_of_memory_in_a_built_in_methods_step_is_noted_and_leaves_the_rest_untouched(
    path, k, monkeypatch
):
    """PCB counts each tensor's balances (compiled loop) or selects its quantiles (reference)
    in compiled calls that allocate before anything is written: a MemoryError there, at its
    k-th call, reaches the caller as itself, with a note naming the tensor it stopped at. The
    tensors after it are untouched; those before it were merged (so in place is not all or
    nothing for terge's own kernels running out of memory, as README says)."""
    from terge.kernels import fastelementwise, fastmethods, fastpcb

    if not fastmethods.available():
        pytest.skip("the compiled loops are not built, or TERGE_KERNELS=torch")
    if path == "compiled":
        if not fastpcb.available():
            pytest.skip("the compiled PCB loop does not run on this build")
        calls = _failing_entry(monkeypatch, fastpcb, "scan", k, compiled="_fastpcb")
    else:
        monkeypatch.setattr(fastpcb, "available", lambda: False)
        calls = _failing_entry(monkeypatch, fastelementwise, "order_statistic", 7 * k)
    models = _wide_models()
    before = _record(models[0])
    with pytest.raises(MemoryError, match="injected") as raised:
        terge.merge(models, method="pcb", inplace=True)
    position = _assert_partly_written_as_noted(models, before, "pcb", raised)
    changed = [raw != raw0 for (*_, raw), (*_, raw0) in zip(_record(models[0]), before)]
    assert changed == [i < position for i in range(len(before))]  # PCB stores whole results
    if path == "compiled":  # one scan per tensor
        assert position == k and len(calls) == k + 1
    else:  # several selections per tensor
        assert (position == 0) == (k == 0) and len(calls) == 7 * k + 1


@pytest.mark.parametrize("k", [0, 3, 6])
def test_out_of_memory_in_a_compiled_loop_writing_in_place_is_noted(k, monkeypatch):
    """TIES' compiled merge writes the base as it goes: a MemoryError from its k-th call (one
    per thread's range of a tensor) is raised as itself, noted, the rest untouched."""
    from terge.kernels import fastmethods

    if not fastmethods.available():
        pytest.skip("the compiled loops are not built, or TERGE_KERNELS=torch")
    _failing_kernel(monkeypatch, fastmethods._fastmethods, "merge", k)
    models = _wide_models()
    before = _record(models[0])
    with pytest.raises(MemoryError, match="injected") as raised:
        terge.merge(models, method="ties", inplace=True)
    assert _assert_partly_written_as_noted(models, before, "ties", raised) == k


@pytest.mark.parametrize("entry", ["small_thresholds", "scan_keys", "kth_pairs", "kth_many"])
@pytest.mark.parametrize("k", [0, 2, 3])
def test_out_of_memory_finding_a_tensors_thresholds_is_noted(entry, k, monkeypatch):
    """TIES' thresholds come from compiled calls that allocate (a small tensor's in one call;
    a larger one's samples, key pass and selection): a MemoryError from the k-th, found before
    that tensor is written, leaves it and every tensor after it as they were."""
    from terge.kernels import fastmethods

    if not fastmethods.available():
        pytest.skip("the compiled loops are not built, or TERGE_KERNELS=torch")
    if entry != "small_thresholds":  # the 16 x 16 weights sampled, as a large tensor's are
        monkeypatch.setattr(fastmethods, "_SAMPLED", 100)
    calls = _failing_entry(monkeypatch, fastmethods, entry, k)
    models = _wide_models()
    before = _record(models[0])
    with pytest.raises(MemoryError, match="injected") as raised:
        terge.merge(models, method="ties", inplace=True)
    position = _assert_partly_written_as_noted(models, before, "ties", raised)
    changed = [raw != raw0 for (*_, raw), (*_, raw0) in zip(_record(models[0]), before)]
    assert changed == [i < position for i in range(len(before))]  # the failing one untouched
    assert calls and len(calls) == k + 1


def test_out_of_memory_while_writing_in_place_still_bumps_the_versions(monkeypatch):
    """README: after a built-in kernel's error while writing, the Parameter objects stay the
    same and their versions are bumped, so a graph that saved the partly merged tensors
    raises in backward() instead of using them."""
    from terge.kernels import fastmethods

    if not fastmethods.available():
        pytest.skip("the compiled loops are not built, or TERGE_KERNELS=torch")
    _failing_kernel(monkeypatch, fastmethods._fastmethods, "merge", 3)
    models = _wide_models()
    parameters = list(models[0].parameters())
    versions = [p._version for p in parameters]
    x = torch.randn(16, requires_grad=True)
    loss = (models[0][0].weight @ x).sum()  # saves the first weight, which is merged
    with pytest.raises(MemoryError, match="injected"):
        terge.merge(models, method="ties", inplace=True)
    assert all(p is q for p, q in zip(models[0].parameters(), parameters, strict=True))
    assert all(p._version > v for p, v in zip(parameters, versions, strict=True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_out_of_memory_writing_the_held_small_tensors_is_noted(monkeypatch):
    """The mean's small tensors are held and computed together at the end: a failure there
    says that any tensor may hold merged values."""
    from terge.kernels import fastloop

    if not fastloop.available():
        pytest.skip("the compiled loops are not built, or TERGE_KERNELS=torch")
    _failing_kernel(monkeypatch, fastloop, "combine_many", 0)
    models = _wide_models()
    with pytest.raises(MemoryError, match="injected") as raised:
        terge.merge(models, method="arithmetic", inplace=True)
    (note,) = raised.value.__notes__
    assert "while writing the small tensors it held to the end; any of the 8 may" in note


def test_a_failure_merging_into_a_copy_has_no_note(monkeypatch):
    """Not in place, the caller never sees the half-made copy: nothing to warn of."""
    from terge.kernels import fastmethods

    if not fastmethods.available():
        pytest.skip("the compiled loops are not built, or TERGE_KERNELS=torch")
    _failing_kernel(monkeypatch, fastmethods._fastmethods, "merge", 3)
    with pytest.raises(MemoryError, match="injected") as raised:
        terge.merge(_wide_models(), method="ties")
    assert not getattr(raised.value, "__notes__", [])


@pytest.mark.parametrize("k", [0, 3, 7])
@pytest.mark.parametrize("method", ["multislerp", "karcher"])
def test_out_of_memory_in_a_streamed_methods_dot_products_is_noted(method, k, monkeypatch):
    """Multi-SLERP and Karcher take each tensor's dot products (one compiled call for these
    small tensors) before they write it: a MemoryError there, at the k-th tensor, reaches the
    caller with a note naming that tensor; the ones after it are untouched, those before it
    merged."""
    from terge.kernels import statistics

    if not statistics.available():
        pytest.skip("the compiled loops are not built, or TERGE_KERNELS=torch")
    calls = _failing_entry(monkeypatch, statistics, "chunks", k, compiled="_faststatistics")
    models = _wide_models()
    before = _record(models[0])
    with pytest.raises(MemoryError, match="injected") as raised:
        terge.merge(models, method=method, inplace=True)
    position = _assert_partly_written_as_noted(models, before, method, raised)
    changed = [raw != raw0 for (*_, raw), (*_, raw0) in zip(_record(models[0]), before)]
    assert changed == [i < position for i in range(len(before))]
    assert position == k and len(calls) == k + 1
