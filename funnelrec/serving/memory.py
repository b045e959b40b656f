"""What a served artifact costs in memory: embedding tables shared between processes through
the file they were loaded from, and memory freed while loading handed back.

    model = load_ranker(ART / "ranker")
    mapped = map_embedding_tables(model, ART / "ranker" / "model.safetensors")  # bytes
    release_unused_memory()                    # after a load: what the allocators keep

The embedding tables are most of a model's bytes (the token and item tables: a row per
vocabulary entry), and a served model only reads them. Loaded the usual way, each process
holds a copy of its own; mapped, every process that serves the same artifact (the workers
of `funnelrec serve --workers N`, `serving.workers`) reads the one copy of the file's pages
in the OS page cache.

A table is mapped only where the file holds exactly what was loaded (same name, dtype,
shape and values, compared once here), at an offset its dtype can be read from; anything
else keeps its loaded copy. The mapping is private copy-on-write (numpy's mode "c"): a
write to a table, which serving never does, would copy that page for the writing process
and leave the file alone.

Loading frees much of what it allocates (the models' first copies, the files' decoded
columns), but the allocators keep freed memory for later: C's malloc (glibc) and Arrow's
pool. `release_unused_memory` hands it back to the system, once per load.
"""

from __future__ import annotations

import ctypes
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from funnelrec.errors import ArtifactError

# safetensors dtype names -> NumPy dtypes (little-endian, as the format stores them)
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}


def map_embedding_tables(model: nn.Module, weights: Path | str) -> int:
    """Point the weight of every `nn.Embedding` / `nn.EmbeddingBag` of `model` at its rows in
    the safetensors file `weights` (the file `model` was loaded from); returns the bytes
    now mapped. Modules made from the model's tables before this call keep their copies,
    so call it right after loading."""
    path = Path(weights)
    header, start = _header(path)
    names = {id(p): name for name, p in model.named_parameters()}
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
    data = np.memmap(path, dtype=np.uint8, mode="c")
    mapped = 0
    for weight in tables:
        entry = header.get(names.get(id(weight), ""))
        view = _view(data, entry, start) if isinstance(entry, dict) else None
        if view is None:
            continue
        table = torch.from_numpy(view)
        if table.dtype != weight.dtype or table.shape != weight.shape:
            continue
        if not torch.equal(table, weight.detach()):
            continue
        weight.data = table
        mapped += view.nbytes
    return mapped


def release_unused_memory() -> None:
    """Hand the memory the allocators hold free back to the system: Arrow's pool, then C's
    heap (glibc `malloc_trim`; elsewhere nothing). Costs a walk of the free lists."""
    pa.default_memory_pool().release_unused()
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return  # not glibc
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _header(path: Path) -> tuple[dict[str, object], int]:
    """The safetensors header (tensor name -> dtype, shape, data_offsets) and where the
    data begins in the file."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: unreadable safetensors header (not an object)")
    return header, 8 + size


def _view(data: np.ndarray, entry: dict[str, object], start: int) -> np.ndarray | None:
    """The tensor `entry` describes, as a view of the mapped file; None when its dtype is
    not one mapped here, its extent does not fit the file or its offset is misaligned."""
    dtype = _DTYPES.get(str(entry.get("dtype")))
    offsets, shape = entry.get("data_offsets"), entry.get("shape")
    if dtype is None or not isinstance(offsets, list) or not isinstance(shape, list):
        return None
    lo, hi = start + int(offsets[0]), start + int(offsets[1])
    itemsize = np.dtype(dtype).itemsize
    count = int(np.prod(shape, dtype=np.int64))
    if lo % itemsize or hi - lo != count * itemsize or hi > len(data):
        return None
    return data[lo:hi].view(dtype).reshape([int(n) for n in shape])
