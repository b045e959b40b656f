"""The optional C kernels (loaded with ctypes by funnelrec/native.py); everything else
about the package is in pyproject.toml.

    funnelrec/_fastscan.c     ivfpq_fs searches (funnelrec/fastscan.py)
    funnelrec/_rowsoftmax.c   the sampled softmax's element-wise pass (funnelrec/softmax.py)
    funnelrec/_rowsum.c       row sums for embedding gradients and bags (funnelrec/rowsum.py)

`optional=True`: where no C compiler is at hand the install still succeeds, and the
callers fall back to FAISS and torch.
"""

import os

from setuptools import Extension, setup

FLAGS = [] if os.name == "nt" else ["-O3"]

setup(
    ext_modules=[
        Extension(
            f"funnelrec.{name}",
            [f"funnelrec/{name}.c"],
            depends=["funnelrec/_levels.h"],
            extra_compile_args=FLAGS,
            optional=True,
        )
        for name in ("_fastscan", "_rowsoftmax", "_rowsum")
    ]
)
