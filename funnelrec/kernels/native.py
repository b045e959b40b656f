"""The package's optional C kernels (built at install by setup.py), loaded with ctypes.

Each is an extension module whose init only makes it importable: its functions take
plain pointers and numbers, so ctypes calls them (and lets go of the GIL meanwhile).
Where one was not built (no C compiler at install) `load` gives None, and its caller
falls back to FAISS or torch.
"""

from __future__ import annotations

import ctypes
import importlib
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

# What each kernel's `*_level()` returns, by number: the instruction set it runs.
LEVELS = ("portable C", "AVX2", "AVX-512")


def load(module: str) -> ctypes.CDLL | None:
    """The shared library of the extension `module` (e.g. "funnelrec.ann._fastscan"), or None."""
    try:
        found = importlib.import_module(module)
    except ImportError:
        return None
    path = getattr(found, "__file__", None)
    return ctypes.CDLL(path) if path else None


# rows split over torch's threads (ctypes lets go of the GIL): (pool, its size), made on use
_POOL: tuple[ThreadPoolExecutor, int] | None = None


def split_rows(run: Callable[[int, int], None], rows: int, *, min_rows: int = 64) -> None:
    """run(lo, hi) over [0, rows) in torch.get_num_threads() contiguous parts at once (one
    call in this thread where there is one thread or fewer than `min_rows` rows)."""
    global _POOL
    threads = torch.get_num_threads()
    if threads <= 1 or rows < min_rows:
        run(0, rows)
        return
    if _POOL is None or _POOL[1] < threads:
        _POOL = (ThreadPoolExecutor(threads, thread_name_prefix="funnelrec-native"), threads)
    bounds = [rows * t // threads for t in range(threads + 1)]
    for f in [_POOL[0].submit(run, lo, hi) for lo, hi in itertools.pairwise(bounds)]:
        f.result()
