"""terge.Average: a running EMA / equal-weight average, against torch's AveragedModel, timm's
EMA formulas and its own float64 definition; resume, swap, BatchNorm, tied weights, errors.

Tolerances. Against our own definition (``decay * avg + (1 - decay) * x`` or
``(n * avg + x) / (n + 1)``, each product and sum rounded in float64, then rounded once into the
shadow's dtype) the average is equal bit for bit. Against AveragedModel and timm, which compute
the same recurrence as ``avg + w * (x - avg)`` (``torch.lerp``), a float64 run agrees within
float64 rounding: each step rounds a few times at 2**-53 relative, and 200 steps of values of
order 1 stay far below ``rtol = atol = 1e-12`` (we see about 1e-13 at worst).
"""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import terge
from terge import AveragingError
from terge.kernels import cpu

from helpers import Tied, same_bits

TOLERANCE = {"rtol": 1e-12, "atol": 1e-12}


class Net(nn.Module):
    """Linear layers with BatchNorm (float and integer buffers) and a LayerNorm."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(torch.relu(self.bn(self.fc1(x)))))


def train_step(model: nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """A stand-in for an optimizer step: move every parameter, run a batch (BN statistics)."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype) * scale)
        model.train()
        width = model.fc1.in_features if hasattr(model, "fc1") else 8
        model(torch.randn(16, width, generator=generator, dtype=torch.float64).to(dtype))


def float_names(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


# --- the definition, bit for bit ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ema", "equal"])
def test_update_is_the_float64_recurrence_rounded_once(kind, dtype):
    """For every tensor and step: the float64 value of the recurrence on the stored shadow and
    model values, rounded once into the shadow's dtype; integer buffers copied."""
    generator = torch.Generator().manual_seed(0)
    model = Net().to(dtype)
    average = terge.Average(model, kind, decay=0.9)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(40):
        train_step(model, generator)
        assert average.update(model)
        for name, value in model.state_dict().items():
            if not value.is_floating_point():
                expected[name] = value.clone()
                continue
            x, avg = value.double(), expected[name].double()
            if n == 0:
                exact = x
            elif kind == "ema":
                exact = avg * 0.9 + x * (1.0 - 0.9)
            else:
                exact = (avg * n + x) / (n + 1)
            rounded = torch.empty_like(value)
            terge.kernels.store_whole(rounded, exact, terge.kernels.ChunkBuffers(torch.float64))
            expected[name] = rounded
    got = average.averaged_state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        assert same_bits(got[name], expected[name]), name
    assert (average.step, average.count) == (40, 40)


def test_the_compiled_batches_equal_the_reference_loop(monkeypatch):
    """Batched small tensors (compiled), large ones (threaded) and TERGE_KERNELS=torch agree."""
    monkeypatch.setattr(cpu, "PER_THREAD", 64)  # fc weights (64 elements) go alone, split
    runs = {}
    for mode in ("auto", "torch"):
        monkeypatch.setenv("TERGE_KERNELS", mode)
        generator = torch.Generator().manual_seed(1)
        torch.manual_seed(1)
        model = Net()
        average = terge.Average(model, decay=0.8, shadow_dtype=torch.float64)
        for _ in range(10):
            train_step(model, generator)
            average.update(model)
        if mode == "auto":
            assert average._plan is not None and average._plan.batched and average._plan.single
        else:
            assert average._plan is not None and not average._plan.batched
        runs[mode] = average.state_dict()["shadow"]
    for name in runs["auto"]:
        assert same_bits(runs["auto"][name], runs["torch"][name]), name


# --- the oracles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["equal", "ema"])
def test_equals_torch_averaged_model_buffers_included(kind):
    """AveragedModel(use_buffers=True): SWA by default, EMA through get_ema_multi_avg_fn."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    generator = torch.Generator().manual_seed(2)
    model = Net().double()
    average = terge.Average(model, kind, decay=0.99)
    options = {} if kind == "equal" else {"multi_avg_fn": get_ema_multi_avg_fn(0.99)}
    oracle = AveragedModel(model, use_buffers=True, **options)
    for _ in range(200):
        train_step(model, generator)
        average.update(model)
        oracle.update_parameters(model)
    got, want = average.averaged_state_dict(), oracle.module.state_dict()
    for name in float_names(model):  # AveragedModel averages num_batches_tracked; we copy it
        torch.testing.assert_close(got[name], want[name], **TOLERANCE)
    assert got["bn.num_batches_tracked"] == model.bn.num_batches_tracked


def timm_decay(step: int, decay: float, after: int, warmup: bool, gamma: float, power: float):
    """timm.utils.model_ema.ModelEmaV3.get_decay, as written there."""
    step = max(0, step - after - 1)
    if step <= 0:
        return 0.0
    if warmup:
        return max(min(1 - (1 + step / gamma) ** -power, decay), 0.0)
    return decay


@pytest.mark.parametrize(("warmup", "after"), [(False, 0), (True, 0), (True, 7)])
def test_equals_timm_model_ema_v3(warmup, after):
    """ModelEmaV3.update(model, step) with step counted from 1, buffers lerped, ints copied:
    start_at=update_after_step, warmup="power" (timm's gamma and power) give the same average."""
    generator = torch.Generator().manual_seed(3)
    model = Net().double()
    average = terge.Average(
        model,
        decay=0.995,
        warmup="power" if warmup else None,
        warmup_gamma=2.0,
        warmup_power=0.75,
        start_at=after,
    )
    timm = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(1, 151):
        train_step(model, generator)
        average.update(model)
        decay = timm_decay(step, 0.995, after, warmup, 2.0, 0.75)
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                timm[name].lerp_(value, 1.0 - decay)
            else:
                timm[name].copy_(value)
    got = average.averaged_state_dict()
    for name in timm:
        torch.testing.assert_close(got[name], timm[name], **TOLERANCE)


def test_warmups_and_min_decay():
    model = nn.Linear(2, 2)
    power = terge.Average(model, decay=0.999, warmup="power", warmup_power=2 / 3)
    assert power.decay_at(0) == 0.0
    assert power.decay_at(1) == 1 - 2 ** (-2 / 3)
    assert power.decay_at(10**9) == 0.999
    tf = terge.Average(model, decay=0.99, warmup="tf", min_decay=0.2)
    assert tf.decay_at(1) == 0.2  # 2/11 raised to min_decay
    assert tf.decay_at(5) == 6 / 15
    assert tf.decay_at(10**6) == 0.99
    assert terge.Average(model, decay=0.9).decay_at(1) == 0.9


def test_start_at_and_every():
    """Steps before start_at and between every-th steps change nothing; the first counted one
    copies the model; the counters say what happened."""
    model = nn.Linear(3, 3)
    average = terge.Average(model, "equal", start_at=3, every=2)
    seen = []
    for step in range(9):
        with torch.no_grad():
            model.weight.fill_(float(step))
        seen.append(average.update(model))
    assert seen == [False, False, False, True, False, True, False, True, False]
    assert (average.step, average.count) == (9, 3)
    assert torch.equal(average.averaged_state_dict()["weight"], torch.full((3, 3), 5.0))


# --- precision, ties, where the average lives ------------------------------------------------------


def test_a_float32_shadow_keeps_what_a_bfloat16_average_loses():
    """decay 0.999 on a bfloat16 model: each update moves the average by 1e-3 of the gap, less
    than half of bfloat16's last bit, so a bfloat16 shadow never moves; a float32 one does."""
    model = nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    low = terge.Average(model, decay=0.999)
    high = terge.Average(model, decay=0.999, shadow_dtype=torch.float32)
    low.update(model)
    high.update(model)
    with torch.no_grad():
        model.weight.fill_(1.5)
    for _ in range(100):
        low.update(model)
        high.update(model)
    assert torch.equal(low.state_dict()["shadow"]["weight"], torch.ones(4, 4, dtype=torch.bfloat16))
    shadow = high.state_dict()["shadow"]["weight"]
    assert shadow.dtype == torch.float32
    expected = 1.5 - 0.5 * 0.999**100
    assert abs(shadow[0, 0].item() - expected) < 1e-6
    assert high.averaged_state_dict()["weight"].dtype == torch.bfloat16


def test_tied_weights_stay_tied():
    model = Tied()
    average = terge.Average(model, decay=0.5)
    generator = torch.Generator().manual_seed(4)
    for _ in range(5):
        with torch.no_grad():
            model.embed.weight.add_(torch.randn(model.embed.weight.shape, generator=generator))
        average.update(model)
    assert "head.weight" not in average.state_dict()["shadow"]  # one shadow for both names
    weights = average.averaged_state_dict()
    assert weights["head.weight"] is weights["embed.weight"]
    with average.swapped_into(model):
        assert model.head.weight is model.embed.weight
        assert torch.equal(model.embed.weight, weights["embed.weight"])


def test_swapped_into_evaluates_the_average_and_gives_the_weights_back():
    generator = torch.Generator().manual_seed(5)
    model = Net()
    average = terge.Average(model, decay=0.7)
    for _ in range(5):
        train_step(model, generator)
        average.update(model)
    before = copy.deepcopy(model.state_dict())
    with average.swapped_into(model) as inside:
        assert inside is model
        for name, value in average.averaged_state_dict().items():
            assert same_bits(model.state_dict()[name], value), name
    for name, value in model.state_dict().items():
        assert same_bits(value, before[name]), name
    with pytest.raises(ZeroDivisionError), average.swapped_into(model):
        raise ZeroDivisionError
    for name, value in model.state_dict().items():
        assert same_bits(value, before[name]), name


def test_copy_to_writes_the_average_into_a_fresh_model():
    model = Net()
    average = terge.Average(model)
    train_step(model, torch.Generator().manual_seed(6))
    average.update(model)
    fresh = Net()
    average.copy_to(fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_update_bn_recomputes_the_statistics_of_the_averaged_weights():
    """buffers="copy" with update_bn: the average's BatchNorm statistics are those
    torch.optim.swa_utils.update_bn finds for the averaged weights; the model is untouched."""
    from torch.optim.swa_utils import update_bn

    generator = torch.Generator().manual_seed(7)
    model = Net()
    average = terge.Average(model, decay=0.8, buffers="copy")
    for _ in range(6):
        train_step(model, generator)
        average.update(model)
    batches = [torch.randn(16, 8, generator=generator) for _ in range(4)]
    before = copy.deepcopy(model.state_dict())
    average.update_bn(batches, model)
    for name, value in model.state_dict().items():
        assert same_bits(value, before[name]), name
    oracle = Net()
    oracle.load_state_dict(average.averaged_state_dict())
    update_bn(batches, oracle)
    got = average.averaged_state_dict()
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(got[name], oracle.state_dict()[name]), name


def test_buffers_copy_mode_copies_statistics():
    generator = torch.Generator().manual_seed(8)
    model = Net()
    average = terge.Average(model, decay=0.9, buffers="copy")
    for _ in range(3):
        train_step(model, generator)
        average.update(model)
    got = average.averaged_state_dict()
    assert torch.equal(got["bn.running_var"], model.bn.running_var)
    assert not torch.equal(got["fc1.weight"], model.fc1.weight)


def test_a_tensor_replaced_under_the_same_name_is_read_afresh():
    """The cached plan is keyed on the model tensors' addresses: new storage (``.data``
    assigned) and new Parameters (the attribute set again) are read, not the old ones."""
    model = nn.Linear(4, 4)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    average = terge.Average(model, "equal")
    average.update(model)
    average.update(model)
    model.weight.data = torch.full((4, 4), 3.0)
    model.bias = nn.Parameter(torch.full((4,), 5.0))
    average.update(model)
    got = average.averaged_state_dict()
    assert torch.equal(got["weight"], ((2 * w0.double() + 3.0) / 3).float())
    assert torch.equal(got["bias"], ((2 * b0.double() + 5.0) / 3).float())


def test_copied_buffers_follow_the_model_in_place_and_when_replaced():
    """Integer buffers are copied through the cached plan: changed in place (as BatchNorm counts
    its batches), given new storage (``.data``) or replaced by a new tensor, the average holds
    the model's current value after every update."""
    model = nn.BatchNorm1d(3)
    average = terge.Average(model, decay=0.5)
    average.update(model)
    model.num_batches_tracked.add_(4)
    average.update(model)
    assert average.averaged_state_dict()["num_batches_tracked"].item() == 4
    model.num_batches_tracked.data = torch.tensor(9)
    average.update(model)
    assert average.averaged_state_dict()["num_batches_tracked"].item() == 9
    model._buffers["num_batches_tracked"] = torch.tensor(11)
    average.update(model)
    assert average.averaged_state_dict()["num_batches_tracked"].item() == 11
    model.num_batches_tracked.add_(1)
    average.update(model)
    assert average.averaged_state_dict()["num_batches_tracked"].item() == 12


def test_another_model_of_the_same_architecture_can_be_passed():
    """update() takes the model it is given (a fresh copy after a restart, say)."""
    model = nn.Linear(2, 2)
    average = terge.Average(model, "equal")
    other = nn.Linear(2, 2)
    average.update(other)
    assert torch.equal(average.averaged_state_dict()["weight"], other.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_gpu_model_with_its_average_on_the_gpu_or_the_cpu(device):
    """The fused GPU loop on the GPU; kept on the CPU (timm's device='cpu') the model is read
    across. Both equal the CPU run bit for bit."""
    generator = torch.Generator().manual_seed(9)
    model = Net()
    gpu_model = copy.deepcopy(model).cuda()
    cpu_average = terge.Average(model, decay=0.9)
    gpu_average = terge.Average(gpu_model, decay=0.9, device=device)
    for _ in range(10):
        train_step(model, generator)
        gpu_model.load_state_dict(model.state_dict())
        cpu_average.update(model)
        gpu_average.update(gpu_model)
    want = cpu_average.state_dict()["shadow"]
    got = gpu_average.state_dict()["shadow"]
    for name in want:
        assert got[name].device.type == ("cpu" if device else "cuda")
        assert same_bits(got[name].cpu(), want[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["ema", "equal"])
def test_a_gpu_average_takes_one_launch_per_dtype_pair_and_equals_the_cpu(kind, monkeypatch):
    """A GPU model's tensors are averaged in one Triton launch per dtype pair, not one per
    tensor (tens of microseconds each); every bit equals the CPU's average, buffers included."""
    monkeypatch.setenv("TERGE_KERNELS", "auto")  # the Triton loop on, even in a reference-only run
    from terge import kernels

    loop = kernels.gpu_loop()
    if loop is None:
        pytest.skip("needs Triton")
    generator = torch.Generator().manual_seed(4)
    model = Net()
    model.fc2.to(torch.bfloat16)  # a second dtype pair: (float32 shadow, bfloat16 model)
    gpu_model = copy.deepcopy(model).cuda()
    settings = {"shadow_dtype": torch.float32, "buffers": "average"}
    cpu_average = terge.Average(model, kind, **settings)
    gpu_average = terge.Average(gpu_model, kind, **settings)
    launches = {"many": 0, "one": 0}
    many, one = loop.combine_many, loop.combine
    monkeypatch.setattr(
        loop,
        "combine_many",
        lambda *a, **k: launches.update(many=launches["many"] + 1) or many(*a, **k),
    )
    monkeypatch.setattr(
        loop, "combine", lambda *a, **k: launches.update(one=launches["one"] + 1) or one(*a, **k)
    )
    for step in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype) * 0.1)
            model.bn.running_mean.add_(torch.randn(8, generator=generator))
        gpu_model.load_state_dict(model.state_dict())
        cpu_average.update(model)
        gpu_average.update(gpu_model)
        assert launches == {"many": 2 * (step + 1), "one": 0}, step
    want = cpu_average.state_dict()["shadow"]
    got = gpu_average.state_dict()["shadow"]
    assert set(got) == set(want)
    for name in want:
        assert got[name].device.type == "cuda"
        assert same_bits(got[name].cpu(), want[name]), name


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ema", "equal"])
def test_a_resumed_average_equals_an_uninterrupted_one_bit_for_bit(kind, tmp_path):
    """Stop after 17 steps, save (torch.save, loaded with weights_only=True), build a new
    Average on a new model, load, go on: every bit of the result, and the counters, agree."""
    settings = {"decay": 0.97, "warmup": "power", "start_at": 3, "every": 2}
    model = Net()
    start = copy.deepcopy(model.state_dict())
    steps = range(100, 140)  # seeds of each step's changes

    straight = terge.Average(model, kind, **settings)
    for seed in steps:
        train_step(model, torch.Generator().manual_seed(seed))
        straight.update(model)

    model = Net()
    model.load_state_dict(start)
    first = terge.Average(model, kind, **settings)
    for seed in steps[:17]:
        train_step(model, torch.Generator().manual_seed(seed))
        first.update(model)
    torch.save({"model": model.state_dict(), "ema": first.state_dict()}, tmp_path / "ckpt.pt")
    del first, model

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = Net()
    resumed = terge.Average(model, kind, decay=0.5)  # the saved settings win
    model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["ema"])
    assert (resumed.step, resumed.count, resumed.decay) == (17, 7, 0.97)
    for seed in steps[17:]:
        train_step(model, torch.Generator().manual_seed(seed))
        resumed.update(model)
    assert (resumed.step, resumed.count) == (straight.step, straight.count)
    want, got = straight.state_dict()["shadow"], resumed.state_dict()["shadow"]
    for name in want:
        assert same_bits(got[name], want[name]), name


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "swa"}, "kind='swa' is not one of"),
        ({"decay": 1.5}, "decay=1.5 must be a number between 0 and 1"),
        ({"decay": math.nan}, "decay=nan must be"),
        ({"warmup": "linear"}, "warmup='linear' must be one of"),
        ({"warmup_gamma": 0}, "warmup_gamma=0 must be positive"),
        ({"warmup_power": -1}, "warmup_power=-1 must be positive"),
        ({"min_decay": 2}, "min_decay=2 must be between 0 and 1"),
        ({"start_at": -1}, "start_at=-1 must be a step number"),
        ({"every": 0}, "every=0 must be a whole number"),
        ({"every": 1.5}, "every=1.5 must be a whole number"),
        ({"buffers": "recompute"}, "buffers='recompute' is not one of"),
        ({"shadow_dtype": torch.int32}, "shadow_dtype=torch.int32 is not a floating"),
    ],
)
def test_bad_settings_are_refused(options, message):
    with pytest.raises(AveragingError, match=message):
        terge.Average(nn.Linear(2, 2), **options)


def test_what_is_not_a_model_or_holds_nothing_is_refused():
    with pytest.raises(AveragingError, match=r"needs the torch\.nn\.Module that trains, got dict"):
        terge.Average({"w": torch.zeros(2)})  # type: ignore[arg-type]
    with pytest.raises(AveragingError, match="has no parameters or persistent buffers"):
        terge.Average(nn.ReLU())
    with torch.device("meta"):
        meta = nn.Linear(2, 2)
    with pytest.raises(AveragingError, match="'weight' is on the meta device"):
        terge.Average(meta)


def test_a_model_that_does_not_fit_is_refused_before_anything_changes():
    model = nn.Linear(3, 3)
    average = terge.Average(model, "equal")
    before = copy.deepcopy(average.state_dict())
    with pytest.raises(AveragingError, match=r"missing \['bias'\]"):
        average.update(nn.Linear(3, 3, bias=False))
    with pytest.raises(AveragingError, match=r"'weight' has shape \(4, 3\)"):
        average.update(nn.Linear(3, 4))
    assert average.step == 0
    for name, value in average.state_dict()["shadow"].items():
        assert same_bits(value, before["shadow"][name])


def test_load_state_dict_refuses_other_averages():
    model = nn.Linear(3, 3)
    average = terge.Average(model)
    with pytest.raises(AveragingError, match=r"has format None, not 'terge\.Average/1'"):
        average.load_state_dict({"shadow": {}})
    with pytest.raises(AveragingError, match="kind='equal' but this one kind='ema'"):
        average.load_state_dict(terge.Average(model, "equal").state_dict())
    with pytest.raises(AveragingError, match="buffers='copy' but this one buffers='average'"):
        average.load_state_dict(terge.Average(model, buffers="copy").state_dict())
    with pytest.raises(AveragingError, match=r"missing \['bias'\]"):
        average.load_state_dict(terge.Average(nn.Linear(3, 3, bias=False)).state_dict())
    with pytest.raises(AveragingError, match=r"'weight' has shape \(4, 3\)"):
        average.load_state_dict(terge.Average(nn.Linear(3, 4)).state_dict())


def test_errors_are_value_errors_of_the_terge_family():
    assert issubclass(AveragingError, terge.TergeError)
    assert issubclass(AveragingError, ValueError)


# --- FSDP2: shard by shard, no gather --------------------------------------------------------------

WORLD = 2


def _fsdp2_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 6))
        sharded = copy.deepcopy(plain)
        fully_shard(sharded, mesh=mesh)
        averages = [terge.Average(m, decay=0.9, warmup="tf") for m in (plain, sharded)]
        for step in range(12):
            generator = torch.Generator().manual_seed(step)
            with torch.no_grad():
                for p, q in zip(plain.parameters(), sharded.parameters()):
                    p.add_(torch.randn(p.shape, generator=generator))
                    q.copy_(torch.distributed.tensor.distribute_tensor(p, mesh, q.placements))
            for average, model in zip(averages, (plain, sharded)):
                average.update(model)
        shadow = averages[1].state_dict()["shadow"]
        weights = averages[1].averaged_state_dict()
        gathered = {name: value.full_tensor() for name, value in weights.items()}
        result = {
            "dtensors": all(
                type(v).__name__ == "DTensor" for v in [*shadow.values(), *weights.values()]
            ),
            "local_shapes": {n: tuple(v.to_local().shape) for n, v in shadow.items()},
            "whole": averages[0].averaged_state_dict(),
            "gathered": gathered,
        }
        with averages[1].swapped_into(sharded):
            result["swapped"] = {n: p.full_tensor() for n, p in sharded.named_parameters()}
        # resume: each rank saves its own state (DTensors) and loads it into a new Average
        torch.save(averages[1].state_dict(), Path(folder) / f"average{rank}.pt")
        resumed = terge.Average(sharded, decay=0.5)
        resumed.load_state_dict(torch.load(Path(folder) / f"average{rank}.pt", weights_only=True))
        with torch.no_grad():
            for p in sharded.parameters():
                p.mul_(0.5)
        for average in (averages[1], resumed):
            average.update(sharded)
        result["resumed"] = all(
            torch.equal(a.to_local(), b.to_local())
            for a, b in zip(
                averages[1].state_dict()["shadow"].values(),
                resumed.state_dict()["shadow"].values(),
            )
        )
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)
def test_an_fsdp2_model_is_averaged_shard_by_shard_as_its_whole_copy(tmp_path):
    """Two gloo processes: each keeps only its shards of the average (DTensors like the
    model's), and the gathered average equals the unsharded model's average bit for bit; each
    rank's saved state (torch.save, weights_only=True) resumes it exactly."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(
        _fsdp2_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the FSDP2 job did not finish in time")
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["dtensors"]
        assert result["resumed"]
        assert result["local_shapes"]["0.weight"] == (8, 8)  # half of (16, 8) on each rank
        for name, whole in result["whole"].items():
            assert same_bits(result["gathered"][name], whole), name
            assert same_bits(result["swapped"][name], whole), name


def test_a_cpu_average_never_asks_for_the_gpu_loop(monkeypatch):
    """Triton (a large import) is looked for only when a model's tensor is on a GPU."""
    from terge import averaging

    asked = []
    monkeypatch.setattr(averaging, "gpu_loop", lambda: asked.append(1))
    model = Net()
    average = terge.Average(model, decay=0.9)
    for _ in range(3):
        average.update(model)
    assert asked == []


# --- more of what is refused, and the edges of what is accepted -----------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"decay": "0.9"}, "decay='0.9' must be a number between 0 and 1"),
        ({"start_at": 1.5}, "start_at=1.5 must be a step number, 0 or more"),
        ({"every": True}, "every=True must be a whole number, 1 or more"),
        ({"shadow_dtype": "float32"}, "shadow_dtype='float32' is not a floating torch dtype"),
    ],
)
def test_settings_of_the_wrong_type_are_refused(options, message):
    with pytest.raises(AveragingError, match=message):
        terge.Average(nn.Linear(2, 2), **options)


def test_the_ends_of_each_range_are_accepted():
    model = nn.Linear(2, 2)
    for options in ({"decay": 0.0}, {"decay": 1.0, "min_decay": 1.0}, {"start_at": 0}):
        terge.Average(model, **options)


def test_without_warmup_the_decay_is_kept_at_or_above_min_decay_and_the_first_copies():
    model = nn.Linear(2, 2)
    assert terge.Average(model, decay=0.9).decay_at(0) == 0.0
    assert terge.Average(model, decay=0.5, min_decay=0.7).decay_at(3) == 0.7


def test_repr_names_the_kind_and_counters():
    model = nn.Linear(2, 2)
    average = terge.Average(model, "equal")
    average.update(model)
    assert repr(average) == "Average(equal, equal weights, step=1, count=1, 2 tensors)"
    assert (
        repr(terge.Average(model, decay=0.5))
        == "Average(ema, decay=0.5, step=0, count=0, 2 tensors)"
    )


def test_non_persistent_buffers_are_not_averaged():
    model = nn.Linear(2, 2)
    model.register_buffer("scratch", torch.ones(2), persistent=False)
    average = terge.Average(model)
    assert set(average.state_dict()["shadow"]) == {"weight", "bias"}
    assert set(average.averaged_state_dict()) == {"weight", "bias"}


def test_a_model_with_tensors_the_average_lacks_is_refused_naming_them():
    model = nn.Linear(2, 2, bias=False)
    average = terge.Average(model)
    with pytest.raises(AveragingError, match=r"missing \[\], not in the average \['bias'\]"):
        average.update(nn.Linear(2, 2))
    many = terge.Average(nn.Sequential(*[nn.Linear(2, 2) for _ in range(3)]))
    with pytest.raises(
        AveragingError,
        match=r"missing \['0\.weight', '0\.bias', '1\.weight', '1\.bias', '2\.weight'\] \.\.\., "
        r"not in the average \['weight', 'bias'\]\.",
    ):
        many.update(nn.Linear(2, 2))
    five = terge.Average(
        nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2, bias=False))
    )
    with pytest.raises(AveragingError, match=r"'2\.weight'\], not in the average"):
        five.update(nn.Linear(2, 2))


def test_a_tensor_removed_or_made_integer_after_binding_is_refused_before_anything_changes():
    model = nn.BatchNorm1d(3)
    average = terge.Average(model, "equal")
    average.update(model)
    before = copy.deepcopy(average.state_dict())
    model._buffers["running_mean"] = torch.zeros(3, dtype=torch.long)
    with pytest.raises(AveragingError, match=r"'running_mean' is now torch\.int64"):
        average.update(model)
    model.running_mean = None
    with pytest.raises(AveragingError, match=r"'running_mean' was removed \(set to None\)"):
        average.update(model)
    assert (average.step, average.count) == (1, 1)
    for name, value in average.state_dict()["shadow"].items():
        assert same_bits(value, before["shadow"][name]), name


def test_copy_to_checks_every_tensor_before_writing_any():
    model = nn.Linear(3, 3)
    average = terge.Average(model)
    weight = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(7.0)
    model.bias.data = torch.zeros(5)  # the model it is bound to, changed after binding
    with pytest.raises(AveragingError, match=r"'bias' has shape \(5,\)"):
        average.copy_to(model)
    assert torch.equal(model.weight, torch.full((3, 3), 7.0))
    assert not torch.equal(weight, model.weight)


def test_a_saved_float64_shadow_is_rounded_once_into_a_bfloat16_one():
    """1 + 2^-8 + 2^-40 rounds to 1 + 2^-7 in bfloat16 (through float32 it would land on the
    half-way point and round down to 1)."""
    model = nn.Linear(2, 2, bias=False).to(torch.bfloat16)
    state = terge.Average(model, shadow_dtype=torch.float64).state_dict()
    state["shadow"]["weight"].fill_(1 + 2**-8 + 2**-40)
    average = terge.Average(model)
    average.load_state_dict(state)
    assert average.state_dict()["shadow"]["weight"].tolist() == [[1 + 2**-7] * 2] * 2


def test_a_complex_tensor_is_refused_naming_it():
    """The kernels sum real numbers: a complex parameter is refused when the Average is made
    (it crashed in the first update that averaged, and shadow_dtype dropped its imaginary
    part); a complex buffer copied (buffers="copy") is kept as it is."""
    model = nn.Linear(2, 2)
    model.phase = nn.Parameter(torch.tensor([1 + 2j, 3j]))
    for options in ({}, {"shadow_dtype": torch.float32}):
        with pytest.raises(AveragingError, match=r"'phase' is torch\.complex64; Average averages"):
            terge.Average(model, **options)
    model = nn.Linear(2, 2)
    model.register_buffer("phase", torch.tensor([1 + 2j, 3j]))
    average = terge.Average(model, buffers="copy", shadow_dtype=torch.float64)
    model.phase.mul_(2)
    average.update(model)
    assert torch.equal(average.averaged_state_dict()["phase"], torch.tensor([2 + 4j, 6j]))


def _saved(**changes):
    model = nn.Linear(2, 2)
    average = terge.Average(model, "equal")
    average.update(model)
    state = average.state_dict()
    state["shadow"] = {k: v + 100 for k, v in state["shadow"].items()}
    state["settings"] = dict(state["settings"])
    for key, value in changes.items():
        if key in state["settings"]:
            state["settings"][key] = value
        elif value is None:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": None}, r"the saved average is kind=None but this one kind='equal'"),
        ({"shadow": [1, 2]}, r"the saved average's shadow is list, not a mapping of tensors"),
        ({"shadow": {"weight": [[0.0] * 2] * 2, "bias": torch.zeros(2)}}, r"'weight' is list"),
        ({"step": None}, r"valid settings: step=None and count=1 must be whole numbers"),
        ({"count": 2}, r"step=1 and count=2 must be whole numbers, count at most step"),
        ({"every": 0}, r"valid settings: every=0 must be a whole number, 1 or more\. Pass what"),
        ({"decay": 5.0}, r"valid settings: decay=5\.0 must be a number between 0 and 1"),
    ],
)
def test_a_malformed_saved_state_is_refused_before_anything_changes(changes, message):
    """load_state_dict checks the whole state (the counters, the settings it takes, the
    shadow's tensors) before it writes anything: a broken one raises a clear error, not a
    KeyError after the shadow was overwritten or a ZeroDivisionError in the next update."""
    model = nn.Linear(2, 2)
    average = terge.Average(model, "equal")
    before = copy.deepcopy(average.state_dict())
    with pytest.raises(AveragingError, match=message):
        average.load_state_dict(_saved(**changes))
    assert (average.step, average.count, average.every) == (0, 0, 1)
    for name, value in average.state_dict()["shadow"].items():
        assert same_bits(value, before["shadow"][name]), name
