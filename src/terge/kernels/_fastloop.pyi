"""Types of the compiled linear loop (``_fastloop.c``); addresses are ``tensor.data_ptr()``s."""

from collections.abc import Sequence

SHARED_WORK: int
PIECE: int
AHEAD: int
HINTED: int

def combine(
    out: int,
    out_code: int,
    n: int,
    inputs: Sequence[int],
    codes: Sequence[int],
    coefficients: Sequence[float],
    divisor: float | None,
    /,
) -> None: ...
def combine_many(
    out_code: int,
    outs: Sequence[int],
    ns: Sequence[int],
    codes: Sequence[int],
    inputs: Sequence[Sequence[int]],
    coefficients: Sequence[float],
    divisor: float | None,
    counter: int | None = None,
    team: int = 0,
    /,
) -> None: ...
def join_team(path: str, /) -> bool: ...
