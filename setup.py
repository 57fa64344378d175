"""Build the optional compiled CPU loops; everything else is declared in pyproject.toml.

``terge.kernels._fastloop`` (the linear merges), ``terge.kernels._fastmethods`` (the task-vector
methods, and the element-wise ones: MagMax, TALL-mask consensus, NearSwap, SCE),
``terge.kernels._faststatistics`` (SLERP's and Model Stock's dot products) and
``terge.kernels._fastrank`` (DELLA's per-row ranking and merge) and ``terge.kernels._fastpcb``
(PCB's scores and merge) are
compiled where a C compiler is present. Where they cannot be built the install still succeeds
(``optional=True``) and terge runs the same arithmetic in plain torch ops, equal bit for bit and
slower. ``-ffp-contract=off`` keeps the compiler from fusing a multiply and an add into one
rounding, which would change results.
"""

import sys

from setuptools import Extension, setup

flags = ["/O2", "/fp:precise"] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]


def extension(name: str) -> Extension:
    return Extension(
        f"terge.kernels.{name}",
        sources=[f"src/terge/kernels/{name}.c"],
        depends=[f"src/terge/kernels/{h}" for h in ("_convert.h", "_loops.h", "_args.h")],
        extra_compile_args=flags,
        optional=True,
    )


setup(
    ext_modules=[
        extension("_fastloop"),
        extension("_fastmethods"),
        extension("_faststatistics"),
        extension("_fastrank"),
        extension("_fastpcb"),
    ]
)
