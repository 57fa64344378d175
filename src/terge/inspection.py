"""Seeing a merge before it is made: the task vectors, tensor by tensor, per block and kind.

``terge.inspect(models, base=...)`` (and ``terge inspect``) reads every tensor the base and all
the models share (same name, shape, floating dtype), one at a time, and measures the task
vectors ``tau_i = model_i - base``: their norms, their pairwise cosine similarities, how often
two disagree in sign, and how much of each TIES would keep at a density (the entries kept by the
magnitude trim *and* agreeing with the elected sign). Memory stays at about one tensor: the
sums are taken a chunk at a time; only TIES' threshold needs one model's whole ``|tau|``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import MergeArgumentError
from .layers import layer_index
from .patterns import PatternSet, selected
from .sources import FileSource, Source, as_source

CHUNK = 1 << 20
"""Entries summed at a time (n models x 8 MiB of float64)."""
LISTED = 20
"""Tensors left out that the text table names (JSON lists them all)."""
OTHER = "other"
"""The block of tensors outside the transformer blocks (embeddings, head, final norm)."""

_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn.qkv", ("qkv", "c_attn", "query_key_value", "in_proj", "wqkv", "qkv_proj")),
    ("attn.q", ("q_proj", "query", "q", "wq", "q_lin")),
    ("attn.k", ("k_proj", "key", "k", "wk", "k_lin")),
    ("attn.v", ("v_proj", "value", "v", "wv", "v_lin")),
    ("attn.o", ("o_proj", "out_proj", "wo", "out_lin", "dense")),
    (
        "mlp",
        (
            "gate_proj",
            "up_proj",
            "down_proj",
            "fc1",
            "fc2",
            "c_fc",
            "w1",
            "w2",
            "w3",
            "dense_h_to_4h",
            "dense_4h_to_h",
            "gate_up_proj",
            "lin1",
            "lin2",
        ),
    ),
    (
        "embed",
        (
            "embed_tokens",
            "wte",
            "wpe",
            "word_embeddings",
            "position_embeddings",
            "embed_positions",
            "embeddings",
            "tok_embeddings",
        ),
    ),
    ("head", ("lm_head", "head", "classifier", "score", "output")),
)
_PARAMETER_NAMES = {"weight", "bias", "scale", "shift"}


def tensor_kind(name: str) -> str:
    """The kind of a tensor from its name's last components: ``attn.q``, ``attn.k``,
    ``attn.v``, ``attn.o`` (``attn.qkv`` fused), ``mlp``, ``norm``, ``embed``, ``head`` or
    ``other``; ``model.layers.0.self_attn.q_proj.weight`` is ``attn.q``."""
    parts = [p.lower() for p in name.split(".")]
    if parts and parts[-1] in _PARAMETER_NAMES:
        parts = parts[:-1]
    if not parts:
        return "other"
    last = parts[-1]
    if "norm" in last or last.startswith("ln") or last in ("layernorm", "rmsnorm"):
        return "norm"
    for kind, words in _KINDS:
        if last in words:
            if kind == "attn.o" and last == "dense" and not any("att" in p for p in parts):
                continue
            return kind
    if any("mlp" in p or "ffn" in p or "feed_forward" in p for p in parts):
        return "mlp"
    return "other"


def block_of(name: str) -> int | str:
    """The block a tensor belongs to (``terge.layers.layer_index``), or :data:`OTHER`."""
    index = layer_index(name)
    return OTHER if index is None else index


@dataclass
class Sums:
    """What a group of tensors' statistics are made of: sums over their entries."""

    count: int
    numel: int = 0
    squares: list[float] = field(default_factory=list)
    dots: list[list[float]] = field(default_factory=list)
    conflicts: list[list[int]] = field(default_factory=list)
    ties_kept: list[int] = field(default_factory=list)
    tensors: int = 0
    non_finite: list[int] = field(default_factory=list)
    """Each model's task-vector entries that are NaN or infinite (a tensor with any is left
    out of the report: its sums would be NaN)."""

    def __post_init__(self) -> None:
        n = self.count
        self.squares = self.squares or [0.0] * n
        self.dots = self.dots or [[0.0] * n for _ in range(n)]
        self.conflicts = self.conflicts or [[0] * n for _ in range(n)]
        self.ties_kept = self.ties_kept or [0] * n
        self.non_finite = self.non_finite or [0] * n

    def add(self, other: Sums) -> None:
        n = self.count
        self.numel += other.numel
        self.tensors += other.tensors
        for i in range(n):
            self.squares[i] += other.squares[i]
            self.ties_kept[i] += other.ties_kept[i]
            self.non_finite[i] += other.non_finite[i]
            for j in range(n):
                self.dots[i][j] += other.dots[i][j]
                self.conflicts[i][j] += other.conflicts[i][j]

    def norms(self) -> list[float]:
        """Each model's task-vector norm (Frobenius, over the group)."""
        return [math.sqrt(s) for s in self.squares]

    def cosine(self, i: int, j: int) -> float | None:
        """The cosine similarity of models ``i`` and ``j``'s task vectors (``None``: one is 0,
        or their sums overflowed float64)."""
        scale = math.sqrt(self.squares[i]) * math.sqrt(self.squares[j])
        if scale == 0 or not math.isfinite(scale) or not math.isfinite(self.dots[i][j]):
            return None
        return self.dots[i][j] / scale

    def conflict_rate(self, i: int, j: int) -> float:
        """The share of entries where ``i`` and ``j``'s task vectors have opposite signs."""
        return self.conflicts[i][j] / self.numel if self.numel else 0.0

    def ties_share(self, i: int) -> float:
        """The share of model ``i``'s entries TIES would keep (trimmed and agreeing)."""
        return self.ties_kept[i] / self.numel if self.numel else 0.0


def _pairs(count: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(count) for j in range(i + 1, count)]


@dataclass
class Inspection:
    """The report of :func:`inspect`: per tensor sums, grouped by block and by kind.

    ``models`` labels the models whose task vectors were measured (the base excluded);
    ``density`` is the density TIES and DARE were judged at; ``tensors`` maps each measured
    tensor to its :class:`Sums`; ``left_out`` the tensors not measured, with why: not shared by
    all (same name, shape, floating dtype), or a task vector with NaN or infinite entries.
    """

    models: list[str]
    density: float
    tensors: dict[str, Sums]
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The model pairs ``(i, j)``, ``i < j``, in the order tables and heatmaps list them."""
        return _pairs(len(self.models))

    def groups(self, by: str = "block") -> dict[Any, Sums]:
        """The sums per block (``by="block"``: ints in order, then ``"other"``) or per kind."""
        if by not in ("block", "kind"):
            raise MergeArgumentError(f"`by` must be 'block' or 'kind'; got {by!r}.")
        key = block_of if by == "block" else tensor_kind
        groups: dict[Any, Sums] = {}
        for name, sums in self.tensors.items():
            groups.setdefault(key(name), Sums(len(self.models))).add(sums)
        return dict(sorted(groups.items(), key=lambda item: _order(item[0])))

    def total(self) -> Sums:
        """The sums over every measured tensor."""
        total = Sums(len(self.models))
        for sums in self.tensors.values():
            total.add(sums)
        return total

    def matrix(self, metric: str = "cosine") -> tuple[list[Any], list[list[float]]]:
        """Blocks x pairs of ``metric`` (``"cosine"`` or ``"conflicts"``): the heatmap's
        numbers, with the block labels; a cosine that is undefined (a zero task vector) is NaN."""
        if metric not in ("cosine", "conflicts"):
            raise MergeArgumentError(f"`metric` must be 'cosine' or 'conflicts'; got {metric!r}.")
        groups = self.groups("block")
        rows = []
        for sums in groups.values():
            if metric == "cosine":
                values = [sums.cosine(i, j) for i, j in self.pairs]
                rows.append([math.nan if v is None else v for v in values])
            else:
                rows.append([sums.conflict_rate(i, j) for i, j in self.pairs])
        return list(groups), rows

    def group_json(self, sums: Sums) -> dict[str, Any]:
        """One group's statistics as JSON (every number finite or ``null``)."""
        return {
            "tensors": sums.tensors,
            "numel": sums.numel,
            "norms": [_finite(v) for v in sums.norms()],
            "cosine": {f"{i}-{j}": _finite(sums.cosine(i, j)) for i, j in self.pairs},
            "sign_conflicts": {f"{i}-{j}": sums.conflict_rate(i, j) for i, j in self.pairs},
            "ties_kept": [sums.ties_share(i) for i in range(len(self.models))],
            "dare_kept": self.density,
            "dare_rescale": 1 / self.density,
        }

    def to_json(self) -> dict[str, Any]:
        """The whole report as a JSON-ready dict: per block, per kind, and over all."""
        return {
            "models": list(self.models),
            "density": self.density,
            "pairs": [f"{i}-{j}" for i, j in self.pairs],
            "total": self.group_json(self.total()),
            "blocks": {str(k): self.group_json(v) for k, v in self.groups("block").items()},
            "kinds": {str(k): self.group_json(v) for k, v in self.groups("kind").items()},
            "left_out": dict(self.left_out),
        }

    def table(self) -> str:
        """The report as text tables for a terminal: per block, then per kind."""
        lines = [f"models: {', '.join(f'{i}: {m}' for i, m in enumerate(self.models))}"]
        lines.append(
            f"TIES keeps (density {self.density:g}): the share of entries kept by the trim and "
            f"agreeing with the elected sign; DARE keeps {self.density:.0%} on average, "
            f"rescaled by {1 / self.density:.3g}"
        )
        for by in ("block", "kind"):
            lines.append("")
            lines += self._table(by)
        if self.left_out:
            lines.append("")
            lines.append(f"left out: {len(self.left_out)} tensors")
            shown = list(self.left_out.items())[:LISTED]
            lines += [f"  {name}: {why}" for name, why in shown]
            if len(self.left_out) > LISTED:
                lines.append(
                    f"  ... and {len(self.left_out) - LISTED} more (--format json lists all)"
                )
        return "\n".join(lines) + "\n"

    def _table(self, by: str) -> list[str]:
        n = len(self.models)
        header = [by, "tensors"]
        header += [f"|tau{i}|" for i in range(n)]
        header += [f"cos{i}{j}" for i, j in self.pairs]
        header += [f"conf{i}{j}" for i, j in self.pairs]
        header += [f"ties{i}" for i in range(n)]
        rows = [header]
        groups = {**self.groups(by), "all": self.total()}
        for label, sums in groups.items():
            row = [str(label), str(sums.tensors)]
            row += [f"{v:.4g}" for v in sums.norms()]
            row += [_number(sums.cosine(i, j)) for i, j in self.pairs]
            row += [f"{sums.conflict_rate(i, j):.1%}" for i, j in self.pairs]
            row += [f"{sums.ties_share(i):.1%}" for i in range(n)]
            rows.append(row)
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        return [
            "  ".join(
                cell.rjust(w) if c else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(row, widths))
            )
            for row in rows
        ]


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a sum that overflowed is ``null``, as an undefined cosine."""
    return value if value is not None and math.isfinite(value) else None


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _order(key: Any) -> tuple[int, Any]:
    return (0, key) if isinstance(key, int) else (1, str(key))


def inspect(
    models: Sequence[Any],
    base: Any = 0,
    *,
    density: float = 0.2,
    included: Any = None,
    excluded: Any = None,
) -> Inspection:
    """Measure the task vectors of ``models`` over ``base``, one tensor at a time.

    ``models`` are modules, state dicts or checkpoint paths (read lazily); ``base`` an index
    into them (that model is the base and is not measured) or a separate model. ``density`` is
    where TIES and DARE are judged. ``included``/``excluded`` select tensors as in ``merge()``.
    Returns an :class:`Inspection` (``.table()``, ``.to_json()``, ``.groups()``).
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise MergeArgumentError(f"`density` must be a number in (0, 1]; got {density!r}.")
    if isinstance(models, (str, os.PathLike, Mapping, torch.nn.Module)) or not models:
        raise MergeArgumentError("`models` must be a non-empty list of models.")
    with contextlib.ExitStack() as opened:
        sources = [_open(m, f"models[{i}]", opened) for i, m in enumerate(models)]
        labels = [_label(m, f"models[{i}]") for i, m in enumerate(models)]
        if isinstance(base, int) and not isinstance(base, bool):
            if not -len(sources) <= base < len(sources):
                raise MergeArgumentError(
                    f"`base` is {base}, but there are {len(sources)} models; give an index or "
                    "a model."
                )
            base_source = sources.pop(base)
            labels.pop(base)
        else:
            base_source = _open(base, "the base", opened)
        if not sources:
            raise MergeArgumentError("`inspect` needs at least one model besides the base.")
        include = PatternSet(included, "included")
        exclude = PatternSet(excluded, "excluded")
        tensors: dict[str, Sums] = {}
        left_out: dict[str, str] = {}
        for name, entry in base_source.entries.items():
            if not selected(name, include, exclude):
                continue
            why = _why_not(name, entry, sources)
            if why is not None:
                left_out[name] = why
                continue
            sums = measure(base_source.get(name), [s.get(name) for s in sources], float(density))
            bad = next(((i, c) for i, c in enumerate(sums.non_finite) if c), None)
            if bad is not None:
                left_out[name] = (
                    f"model {bad[0]}'s task vector has {bad[1]} NaN or infinite entries"
                )
                continue
            tensors[name] = sums
        for i, source in enumerate(sources):  # what the base lacks is not silently dropped
            for name in source.entries:
                lacked = name not in base_source.entries and name not in left_out
                if lacked and selected(name, include, exclude):
                    left_out[name] = f"the base lacks it (model {i} has it)"
    return Inspection(labels, float(density), tensors, left_out)


def _open(model: Any, where: str, opened: contextlib.ExitStack) -> Source:
    source = as_source(model, False, where)
    if isinstance(source, FileSource):
        opened.callback(source.close)
    return source


def _label(model: Any, where: str) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else where


def _why_not(name: str, entry: Any, sources: Sequence[Source]) -> str | None:
    if not entry.dtype.is_floating_point:
        return "not floating point"
    for i, source in enumerate(sources):
        other = source.entries.get(name)
        if other is None:
            return f"model {i} lacks it"
        if other.shape != entry.shape:
            return f"model {i} has shape {tuple(other.shape)}"
        if not other.dtype.is_floating_point:
            return f"model {i}'s is not floating point"
    return None


def _chunks(tensor: torch.Tensor, base: torch.Tensor) -> Iterator[torch.Tensor]:
    """``tensor - base`` in float64, :data:`CHUNK` entries at a time."""
    flat, flat_base = tensor.detach().reshape(-1), base.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        end = start + CHUNK
        yield flat[start:end].to(torch.float64) - flat_base[start:end].to(torch.float64)


def ties_threshold(tensor: torch.Tensor, base: torch.Tensor, density: float) -> float:
    """TIES' trim threshold of one task vector: its ``k``-th largest magnitude,
    ``k = max(1, int(density * numel))`` (0 when ``k`` keeps every entry)."""
    n = tensor.numel()
    k = max(1, int(density * n))
    if k >= n:
        return 0.0
    magnitudes = torch.empty(n, dtype=torch.float64)
    for start, chunk in zip(range(0, n, CHUNK), _chunks(tensor, base)):
        magnitudes[start : start + chunk.numel()] = chunk.abs()
    return float(torch.kthvalue(magnitudes, n - k + 1).values)


def measure(base: torch.Tensor, models: Sequence[torch.Tensor], density: float) -> Sums:
    """The sums of one tensor's task vectors: squares, dots, sign conflicts, TIES' kept."""
    count = len(models)
    sums = Sums(count, numel=base.numel(), tensors=1)
    thresholds = torch.tensor(
        [ties_threshold(m, base, density) for m in models], dtype=torch.float64
    )
    squares = torch.zeros(count, dtype=torch.float64)
    dots = torch.zeros(count, count, dtype=torch.float64)
    conflicts = torch.zeros(count, count, dtype=torch.int64)
    kept = torch.zeros(count, dtype=torch.int64)
    non_finite = torch.zeros(count, dtype=torch.int64)
    with torch.no_grad():
        for chunks in zip(*(_chunks(m, base) for m in models)):
            tau = torch.stack(chunks)
            squares += (tau * tau).sum(1)
            dots += tau @ tau.T
            signs = torch.sign(tau)
            conflicts += ((signs.unsqueeze(1) * signs.unsqueeze(0)) < 0).sum(-1)
            trimmed = torch.where(tau.abs() >= thresholds.unsqueeze(1), tau, 0.0)
            elected = torch.sign(trimmed.sum(0))
            agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
            kept += agree.sum(1)
            non_finite += (~torch.isfinite(tau)).sum(1)
    sums.squares = squares.tolist()
    sums.dots = dots.tolist()
    sums.conflicts = conflicts.tolist()
    sums.ties_kept = kept.tolist()
    sums.non_finite = non_finite.tolist()
    return sums
