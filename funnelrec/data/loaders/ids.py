"""Dense ids: raw ids of one space -> 1..N (`dense_ids`), metadata rows placed at their
dense ids, and the check that a users/items file lists each id once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.data.loaders.reading import Parsed


def dense_ids(*columns: pa.Array) -> tuple[pa.Array, list[np.ndarray]]:
    """Map raw ids (text) of one id space to dense ids 1..N.

    Returns the raw ids in dense order (raw id of dense id i at position i - 1) and, for
    each input column, its dense ids as an int64 array. The order is sorted raw ids:
    numeric when all are integers, else lexicographic.
    """
    uniques = pc.unique(pa.chunked_array(list(columns), type=pa.string()))
    try:
        as_int = pc.cast(uniques, pa.int64()).to_numpy()
        order = np.argsort(as_int, kind="stable")
        if np.unique(as_int).size < as_int.size:  # "7" and "07": break the tie by text
            order = np.lexsort((np.asarray(uniques.to_pylist(), dtype=object), as_int))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        order = pc.sort_indices(uniques).to_numpy()
    raw = uniques.take(pa.array(order))
    dense = [
        pc.index_in(col, value_set=raw).to_numpy(zero_copy_only=False).astype(np.int64) + 1
        for col in columns
    ]
    return raw, dense


def _attach(n: int, dense: np.ndarray, columns: dict[str, pa.Array | None]) -> dict[str, pa.Array]:
    """Place per-row metadata at dense positions 1..n; ids without a row get nulls."""
    pos = np.full(n, -1, dtype=np.int64)
    pos[dense - 1] = np.arange(dense.size)
    idx = pa.array(pos, mask=pos < 0)
    return {k: v.take(idx) for k, v in columns.items() if v is not None}


def _check_unique(parsed: Parsed, column: str, ids: pa.Array) -> None:
    """A users/items file lists each id once: name the repeated row and the first one."""
    values = ids.to_numpy(zero_copy_only=False)
    _, first = np.unique(values, return_index=True)
    repeated = np.ones(values.size, dtype=bool)
    repeated[first] = False
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        earlier = int(np.flatnonzero(values == values[row])[0])
        raise parsed.error(
            f"duplicate id {values[row]!r} (first on line {parsed.line(earlier)})", column, row
        )
