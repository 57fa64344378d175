"""Types of the compiled task-vector loops (``_fastmethods.c``); addresses are
``tensor.data_ptr()``s, codes the dtype codes of ``terge.kernels.cpu.DTYPE_CODES``."""

from collections.abc import Sequence

Query = tuple[int, int, int, int, int, int, int, bool]
"""(model, lo, hi, top, shift, out, cap, ends); model -1: SCE's variance over every model"""

def scan(
    base: int,
    base_code: int,
    n: int,
    models: Sequence[int],
    codes: Sequence[int],
    queries: Sequence[Query],
    /,
) -> list[tuple[int, int, int, int]]: ...
def sample(
    base: int,
    base_code: int,
    n: int,
    models: Sequence[int],
    codes: Sequence[int],
    m: int,
    out: int,
    of_variance: bool = False,
    start: int = 0,
    stop: int = -1,
    /,
) -> None: ...
def kth_largest(
    values: int, segments: Sequence[tuple[int, int]], k: int, lo: int, hi: int, /
) -> tuple[int, int]: ...

KeyQuery = tuple[int, int, int, int, int]
"""(model, lo, hi, out, cap): a key bracket [lo, hi) and room for cap pairs at out"""

def scan_keys(
    base: int,
    base_code: int,
    n: int,
    models: Sequence[int],
    codes: Sequence[int],
    queries: Sequence[KeyQuery],
    /,
) -> list[tuple[int, int]] | None: ...
def key_bounds(lo: int, hi: int, /) -> tuple[int, int]: ...
def kth_pairs(
    address: int, segments: Sequence[tuple[int, int]], cap: int, k: int, scratch: int, /
) -> int: ...
def kth_many(values: int, n: int, ks: Sequence[int], /) -> list[tuple[int, int]]: ...
def small_thresholds(
    base: int,
    base_code: int,
    n: int,
    models: Sequence[int],
    codes: Sequence[int],
    ranks: Sequence[Sequence[int]],
    scratch: int,
    /,
) -> list[list[tuple[int, int]]]: ...
def merge(
    out: int,
    out_code: int,
    base: int,
    base_code: int,
    n: int,
    first: int,
    models: Sequence[int],
    codes: Sequence[int],
    weights: Sequence[float],
    sparsify: int,
    lows: Sequence[int],
    highs: Sequence[int],
    keys: Sequence[int],
    density: float,
    below: int,
    consensus: int,
    scale: float,
    multiply: bool,
    divisor: float,
    /,
) -> None: ...
def elementwise(
    kind: int,
    out: int,
    out_code: int,
    base: int,
    base_code: int,
    n: int,
    models: Sequence[int],
    codes: Sequence[int],
    weights: Sequence[float],
    scale: float,
    mask_lambda: float,
    t: float,
    votes: int,
    select: bool,
    threshold: int,
    /,
) -> None: ...
def square_sums(
    base: int,
    base_code: int,
    n: int,
    models: Sequence[int],
    codes: Sequence[int],
    select: bool,
    threshold: int,
    out: int,
    /,
) -> tuple[int, int]: ...
def round_sums(
    tables: int, parts: int, models: int, least: int, most: int, /
) -> list[float] | None: ...
def order_statistic(values: int, n: int, index: int, /) -> float | None: ...
