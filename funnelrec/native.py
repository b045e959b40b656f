"""The package's optional C kernels (built at install by setup.py), loaded with ctypes.

Each is an extension module whose init only makes it importable: its functions take
plain pointers and numbers, so ctypes calls them (and lets go of the GIL meanwhile).
Where one was not built (no C compiler at install) `load` gives None, and its caller
falls back to FAISS or torch.
"""

from __future__ import annotations

import ctypes
import importlib

# What each kernel's `*_level()` returns, by number: the instruction set it runs.
LEVELS = ("portable C", "AVX2", "AVX-512")


def load(module: str) -> ctypes.CDLL | None:
    """The shared library of the extension `module` (e.g. "funnelrec._fastscan"), or None."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return None
    path = getattr(found, "__file__", None)
    return ctypes.CDLL(path) if path else None
