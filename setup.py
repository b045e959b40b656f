"""The optional C kernels (loaded with ctypes by funnelrec/kernels/native.py); everything
else about the package is in pyproject.toml.

    funnelrec/ann/_fastscan.c         ivfpq_fs searches (funnelrec/ann/fastscan.py)
    funnelrec/kernels/_rowsoftmax.c   the sampled softmax's element-wise pass (kernels/softmax.py)
    funnelrec/kernels/_rowsum.c       row sums for embedding gradients and bags (kernels/rowsum.py)

`optional=True`: where no C compiler is at hand the install still succeeds, and the
callers fall back to FAISS and torch.
"""

import os

from setuptools import Extension, setup

FLAGS = [] if os.name == "nt" else ["-O3"]
LEVELS = "funnelrec/kernels"  # _levels.h: the instruction-set choice every kernel shares

setup(
    ext_modules=[
        Extension(
            f"funnelrec.{package}.{name}",
            [f"funnelrec/{package}/{name}.c"],
            include_dirs=[LEVELS],
            depends=[f"{LEVELS}/_levels.h"],
            extra_compile_args=FLAGS,
            optional=True,
        )
        for package, name in (
            ("ann", "_fastscan"),
            ("kernels", "_rowsoftmax"),
            ("kernels", "_rowsum"),
        )
    ]
)
