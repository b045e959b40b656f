"""The sequence loader: `user item` per line (SASRec, BERT4Rec), synthetic timestamps."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from funnelrec.data.dataset import DatasetWriter
from funnelrec.data.loaders.ids import dense_ids
from funnelrec.data.loaders.reading import RawFile, read_delimited
from funnelrec.data.loaders.result import ImportResult, _check_target, _ids_table, _watches


def import_sequence(src: Path, out: Path, *, force: bool = False) -> ImportResult:
    """Import a SASRec/BERT4Rec sequence file: one `user item` pair a line, in time order
    per user. Timestamps are synthetic: the 0-based position of the watch in its user's
    sequence; the manifest says `synthetic_timestamps: true`.
    """
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    _check_target(out, force)
    raw = RawFile(src)
    delimiter = "\t" if b"\t" in raw.read(65536).split(b"\n", 1)[0] else " "
    parsed = read_delimited(raw, delimiter=delimiter, names=["user", "item"])
    users = parsed.text("user")
    items = parsed.text("item")
    user_raw, (user,) = dense_ids(users)
    item_raw, (item,) = dense_ids(items)

    # Position of each line within its user's sequence, in file order.
    order = np.argsort(user, kind="stable")
    sorted_user = user[order]
    starts = np.flatnonzero(np.r_[True, sorted_user[1:] != sorted_user[:-1]])
    lengths = np.diff(np.r_[starts, sorted_user.size])
    position = np.empty(user.size, dtype=np.int64)
    position[order] = np.arange(user.size) - np.repeat(starts, lengths)

    extra = {"loader": "sequence", "files": [raw.name], "timestamps": "position in sequence"}
    with DatasetWriter(
        out, source="sequence", force=force, synthetic_timestamps=True, extra=extra
    ) as w:
        w.write("users", _ids_table("user_id", len(user_raw)))
        w.write("items", _ids_table("item_id", len(item_raw)))
        w.write("watches", _watches(user, item, position, None))
        w.add_id_map("user", user_raw)
        w.add_id_map("item", item_raw)
    return ImportResult.of(out, started)
