"""Types of the compiled PCB loop (``_fastpcb.c``); addresses are ``tensor.data_ptr()``s, codes
the dtype codes of ``terge.kernels.cpu.DTYPE_CODES``."""

from collections.abc import Sequence

def configure(exp: int, tanh: int, mode: int, threads: int, /) -> None: ...
def balance(values: int, n: int, out: int, /) -> None: ...
def bounds(values: int, n: int, out: int, /) -> None: ...
def sample(
    base: int,
    base_code: int,
    total: int,
    models: Sequence[int],
    codes: Sequence[int],
    lows: Sequence[float],
    highs: Sequence[float],
    runs: int,
    keys: int,
    /,
) -> bool: ...
def scan(
    base: int,
    base_code: int,
    m: int,
    models: Sequence[int],
    codes: Sequence[int],
    lows: Sequence[float],
    highs: Sequence[float],
    los: Sequence[int],
    his: Sequence[int],
    cap: int,
    collected: int,
    stride: int,
    /,
) -> list[tuple[int, int, int, int, int, int]] | None: ...
def merge(
    out: int,
    out_code: int,
    base: int,
    base_code: int,
    m: int,
    models: Sequence[int],
    codes: Sequence[int],
    lows: Sequence[float],
    highs: Sequence[float],
    floors: Sequence[float],
    gaps: Sequence[float],
    scale: float,
    /,
) -> bool: ...
