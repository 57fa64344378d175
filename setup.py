"""Build the optional fused CPU loop; everything else is declared in pyproject.toml.

``terge._fastloop`` is compiled where a C compiler is present. Where it cannot be built the
install still succeeds (``optional=True``) and terge runs the same arithmetic in plain torch ops,
equal bit for bit and about 3x slower. ``-ffp-contract=off`` keeps the compiler from fusing a
multiply and an add into one rounding, which would change results.
"""

import sys

from setuptools import Extension, setup

flags = ["/O2", "/fp:precise"] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension(
            "terge._fastloop",
            sources=["src/terge/_fastloop.c"],
            extra_compile_args=flags,
            optional=True,
        )
    ]
)
