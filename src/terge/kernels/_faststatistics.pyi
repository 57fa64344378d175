"""Types of the compiled dot-product loop (``_faststatistics.c``); addresses are
``tensor.data_ptr()``s, codes the dtype codes of ``terge.kernels.cpu.DTYPE_CODES``."""

from collections.abc import Sequence

def chunks(
    base: int,
    base_code: int,
    n: int,
    first: int,
    last: int,
    inputs: Sequence[int],
    codes: Sequence[int],
    pairs: Sequence[tuple[int, int]],
    out: int,
    /,
) -> None: ...
def total(sums: int, count: int, npairs: int, /) -> list[float]: ...
