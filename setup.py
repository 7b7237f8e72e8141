"""The per-token kernels in C (routelog/_native.c), built at install time; everything else
about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "routelog._native",
            sources=["routelog/_native.c"],
            # an undeclared function is an error, not a symbol missing at import time; no
            # fused multiply-adds, which some CPU levels have and others not: every level
            # computes the same bits (routelog/_native.c)
            extra_compile_args=[
                "-O3",
                "-fopenmp-simd",
                "-ffp-contract=off",
                "-Werror=implicit-function-declaration",
            ],
        )
    ]
)
