"""Types of the compiled DELLA loop (``_fastrank.c``); addresses are ``tensor.data_ptr()``s,
codes the dtype codes of ``terge.kernels.cpu.DTYPE_CODES``."""

from collections.abc import Sequence

def della(
    out: int,
    out_code: int,
    base: int,
    base_code: int,
    rows: int,
    width: int,
    first: int,
    models: Sequence[int],
    codes: Sequence[int],
    weights: Sequence[float],
    keys: Sequence[int],
    density: float,
    low: float,
    two_eps: float,
    scale: float,
    consensus: bool,
    /,
) -> None: ...
def prune(
    out: int,
    base: int,
    base_code: int,
    model: int,
    model_code: int,
    rows: int,
    width: int,
    first: int,
    key: int,
    density: float,
    low: float,
    two_eps: float,
    divide: bool,
    /,
) -> None: ...
def rank(keys: int, n: int, ranks: int, /) -> None: ...
