"""Sharded parameters (DTensors, as FSDP2's ``fully_shard`` makes them): merged where they live.

A parameter whose tensors are DTensors in every model is merged shard by shard: each rank
combines its local shards in place, and a method that needs a whole-tensor statistic (TIES'
threshold, SLERP's angle, Model Stock's cosines) sums its partial statistics over the device mesh
with ``all_reduce``. A :class:`Layout` tells a method where its local tensors lie in the whole
parameter and how to sum over the other shards. ``torch.distributed`` is imported only when a
DTensor is met.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from .errors import ShardingError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def is_dtensor(tensor: Any) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (a sharded tensor)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not isinstance(tensor, torch.Tensor):
        return False
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view of its storage, so writes land in the parameter), or the
    tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@dataclass(frozen=True)
class Sharding:
    """How a DTensor is laid out: its device mesh and its placements on each mesh dimension."""

    mesh: Any
    placements: tuple[Any, ...]

    def __str__(self) -> str:
        return f"{self.placements!r} on {self.mesh!r}"


def sharding_of(tensor: torch.Tensor) -> Sharding | None:
    """A DTensor's mesh and placements; ``None`` for a plain tensor."""
    if not is_dtensor(tensor):
        return None
    return Sharding(tensor.device_mesh, tuple(tensor.placements))


@dataclass(frozen=True)
class Layout:
    """Where a method's local tensors lie in the whole parameter, and how to sum over the shards.

    ``shape`` is the whole parameter's, ``local_shape`` and ``offset`` the local block's size and
    its first element's coordinates in the whole; ``groups`` are the process groups of the mesh
    dimensions that shard the tensor (none when it is whole or only replicated).
    """

    shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    offset: tuple[int, ...]
    groups: tuple[Any, ...] = ()

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Layout:
        """The layout of an unsharded tensor: the local tensor is the whole."""
        shape = tuple(shape)
        return cls(shape, shape, (0,) * len(shape))

    @property
    def sharded(self) -> bool:
        """Whether other ranks hold other parts of the tensor (so statistics need summing)."""
        return bool(self.groups)

    @property
    def numel(self) -> int:
        """Elements of the whole parameter."""
        return math.prod(self.shape)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every shard of the parameter, in place (``all_reduce(SUM)`` over
        each sharding mesh dimension in turn); the tensor itself when the parameter is whole."""
        if self.groups:
            import torch.distributed as dist

            for group in self.groups:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    def indices(self, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
        """The whole parameter's row-major flat indices (int64) of the local tensor's row-major
        flat elements ``start`` to ``stop``."""
        local_flat = torch.arange(start, stop, dtype=torch.int64, device=device)
        if self.local_shape[1:] == self.shape[1:]:  # whole rows: one contiguous run
            first = self.offset[0] * math.prod(self.shape[1:]) if self.shape else 0
            return local_flat.add_(first)
        result = torch.zeros_like(local_flat)
        local_stride = global_stride = 1
        for size, whole, offset in reversed(
            list(zip(self.local_shape, self.shape, self.offset, strict=True))
        ):
            coordinate = (local_flat // local_stride) % size
            result += (coordinate + offset) * global_stride
            local_stride *= size
            global_stride *= whole
        return result


def layout_of(tensor: torch.Tensor) -> Layout:
    """A tensor's :class:`Layout`: whole for a plain tensor, the local block for a DTensor."""
    sharding = sharding_of(tensor)
    if sharding is None:
        return Layout.whole(tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = sharding.mesh, sharding.placements
    local_shape, offset = compute_local_shape_and_global_offset(tensor.shape, mesh, placements)
    groups = tuple(mesh.get_group(dim) for dim, p in enumerate(placements) if p.is_shard())
    return Layout(tuple(tensor.shape), tuple(local_shape), tuple(offset), groups)


def rank() -> int:
    """This process's rank in the default process group (0 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def mesh_all_ok(ok: bool, mesh: Any, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank of ``mesh`` (a MIN ``all_reduce`` over each mesh
    dimension), so that one rank's failure stops all of them rather than leaving them waiting."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=device)
    for dim in range(mesh.ndim):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
    return bool(flag.item())


# --- checks, while the plan is built --------------------------------------------------------------


def _check_placements(name: str, where: str, sharding: Sharding) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for placement in sharding.placements:
        if type(placement) is not Shard and not isinstance(placement, Replicate):
            raise ShardingError(
                f"the parameter '{name}' has the placement {placement!r} in {where}; terge merges "
                "DTensors placed with Shard(dim) and Replicate() only (Partial holds partial "
                "sums, a strided shard interleaved slices). Redistribute it first "
                "(tensor.redistribute(mesh, [Shard(0)])), or exclude the parameter."
            )


def check_sharding(name: str, tensors: Sequence[tuple[str, Any]], method: Any) -> bool:
    """Check that a parameter's tensors (``(where, Entry)`` pairs, the base first) are all plain
    or all DTensors alike, and that ``method`` can run on shards; return whether it is sharded."""
    shardings = [(where, entry.sharding) for where, entry in tensors]
    sharded = [(where, s) for where, s in shardings if s is not None]
    if not sharded:
        return False
    if len(sharded) != len(shardings):
        (dwhere, dsharding), pwhere = sharded[0], next(w for w, s in shardings if s is None)
        raise ShardingError(
            f"the parameter '{name}' is a DTensor ({dsharding}) in {dwhere} but a plain tensor in "
            f"{pwhere}; terge merges sharded parameters shard by shard and never gathers them "
            f"silently. Shard {pwhere} the same way (fully_shard or distribute_tensor on the same "
            "mesh with the same placements), or gather the DTensors yourself (.full_tensor()) to "
            "merge whole tensors."
        )
    first_where, first = sharded[0]
    _check_placements(name, first_where, first)
    for where, sharding in sharded[1:]:
        if sharding.placements != first.placements or sharding.mesh != first.mesh:
            raise ShardingError(
                f"the parameter '{name}' is sharded as {first} in {first_where} but as "
                f"{sharding} in {where}; merging shard by shard needs every model's tensor on "
                "the same device mesh with the same placements. Shard the models alike (the same "
                "fully_shard or distribute_tensor calls), or redistribute one "
                "(tensor.redistribute(mesh, placements))."
            )
    if not (method.streaming or method.layout_aware or method.elementwise):
        raise ShardingError(
            f"the merge method {method.name!r} cannot be applied to the sharded parameter "
            f"'{name}': it would see only each rank's local shard. If it is element-wise (each "
            "entry of its result depends only on the same entry of its inputs), pass "
            "terge.methods.custom(function, elementwise=True); otherwise gather the DTensors "
            "(.full_tensor()) and merge whole tensors."
        )
    return True
