"""The optional C kernel of ivfpq_fs searches (funnelrec/_fastscan.c, read by
funnelrec/fastscan.py); everything else about the package is in pyproject.toml.

`optional=True`: where no C compiler is at hand the install still succeeds, and
ItemIndex then searches through FAISS alone.
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "funnelrec._fastscan",
            sources=["funnelrec/_fastscan.c"],
            extra_compile_args=[] if os.name == "nt" else ["-O3"],
            optional=True,
        )
    ]
)
