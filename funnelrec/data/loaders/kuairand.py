"""The KuaiRand loader: each log row is an impression, clicked rows also watches; in a
release directory, the video features fill the items table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.data.dataset import DatasetWriter
from funnelrec.data.loaders.ids import _attach, _check_unique, dense_ids
from funnelrec.data.loaders.reading import RawFile, _first, read_delimited
from funnelrec.data.loaders.result import ImportResult, _check_target, _ids_table, _watches
from funnelrec.errors import DataError

KUAIRAND_REQUIRED = ("user_id", "video_id", "time_ms", "is_click", "play_time_ms")
# The other columns of the published KuaiRand logs (and of the filtered sample), accepted
# and not used.
KUAIRAND_OPTIONAL = (
    "date", "hourmin", "duration_ms", "is_like", "is_follow", "is_comment", "is_forward",
    "is_hate", "long_view", "profile_stay_time", "comment_stay_time", "is_profile_enter",
    "is_rand", "tab", "label", "timestamp",
)  # fmt: skip
KUAIRAND_VIDEO_COLUMNS = (
    "video_id", "author_id", "video_type", "upload_dt", "upload_type", "visible_status",
    "video_duration", "server_width", "server_height", "music_id", "music_type", "tag",
)  # fmt: skip


def _sniff_delimiter(raw: RawFile) -> str:
    first = raw.read(65536).split(b"\n", 1)[0]
    return "\t" if b"\t" in first else ","


def _kuairand_files(src: Path) -> tuple[list[RawFile], RawFile | None]:
    """A log file, or a KuaiRand release directory: `log_*.csv` + `video_features_basic*`."""
    if src.is_file():
        return [RawFile(src)], None
    if not src.is_dir():
        raise DataError("cannot read (no such file or directory)", path=src)
    logs = sorted(p for p in src.iterdir() if p.name.startswith("log") and p.is_file())
    if not logs:
        raise DataError("no KuaiRand log files (log*.csv) in the directory", path=src)
    videos = sorted(src.glob("video_features_basic*"))
    return [RawFile(p) for p in logs], (RawFile(videos[0]) if videos else None)


def import_kuairand(src: Path, out: Path, *, force: bool = False) -> ImportResult:
    """Import KuaiRand logs: every row an impression; clicked rows also watches.

    A request (one page of results) is the set of rows of one user with the same
    `time_ms`: KuaiRand logs every video of a delivered batch with the time it was
    served. Position is the row's order within its request; ts = time_ms // 1000;
    watch_time_s = play_time_ms / 1000 on clicked rows (0 on the others, as the canonical
    impressions table requires). duration_ms > 0 fills items.duration_s. In a release
    directory, video_features_basic gives channel (author_id), upload time, duration and
    topic (first tag).
    """
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    _check_target(out, force)
    logs, videos = _kuairand_files(src)

    parts: dict[str, list[Any]] = {k: [] for k in ("user", "video", "ms", "click", "play", "dur")}
    for raw in logs:
        delimiter = _sniff_delimiter(raw)
        p = read_delimited(
            raw,
            delimiter=delimiter,
            quoted=delimiter == ",",
            required=KUAIRAND_REQUIRED,
            optional=KUAIRAND_OPTIONAL,
        )
        parts["user"].append(p.text("user_id"))
        parts["video"].append(p.text("video_id"))
        parts["ms"].append(p.numbers("time_ms", pa.int64(), what="a timestamp in ms"))
        click = p.numbers("is_click", pa.int64(), minimum=0, what="0 or 1")
        bad = _first(pc.greater(click, 1))
        if bad is not None:
            raise p.error(f"{click[bad].as_py()} is not 0 or 1", "is_click", bad)
        parts["click"].append(click)
        parts["play"].append(
            p.numbers("play_time_ms", pa.float64(), minimum=0, what="a watch time in ms")
        )
        parts["dur"].append(
            p.numbers("duration_ms", pa.float64(), minimum=0, what="a duration in ms")
            if "duration_ms" in p.table.column_names
            else pa.nulls(p.num_rows, pa.float64())
        )
    col = {k: pa.chunked_array(v).combine_chunks() for k, v in parts.items()}

    video_meta = _read_kuairand_videos(videos) if videos is not None else None
    user_raw, (user,) = dense_ids(col["user"])
    item_raw, (item,) = dense_ids(col["video"])
    ms = col["ms"].to_numpy()
    clicked = col["click"].to_numpy().astype(bool)
    play_s = col["play"].to_numpy(zero_copy_only=False) / 1000.0
    ts = ms // 1000

    # Requests: (user, time_ms) groups, numbered in (user, time) order; position = the
    # row's order inside its group (stable sort keeps file order for ties).
    order = np.lexsort((ms, user))
    key_user, key_ms = user[order], ms[order]
    new = np.r_[True, (key_user[1:] != key_user[:-1]) | (key_ms[1:] != key_ms[:-1])]
    request = np.cumsum(new)
    starts = np.flatnonzero(new)
    position = np.arange(order.size) - np.repeat(starts, np.diff(np.r_[starts, order.size]))
    impressions = pa.table(
        {
            "request_id": request.astype(np.int64),
            "user_id": key_user,
            "item_id": item[order],
            "ts": ts[order],
            "position": position.astype(np.int32),
            "clicked": clicked[order],
            "watch_time_s": np.where(clicked, play_s, 0.0)[order].astype(np.float32),
        }
    )
    watches = _watches(
        user[clicked], item[clicked], ts[clicked], pa.array(play_s[clicked].astype(np.float32))
    )

    # Item duration: the largest logged duration_ms > 0 (0 means unknown in KuaiRand).
    dur = np.nan_to_num(col["dur"].to_numpy(zero_copy_only=False), nan=0.0)
    best = np.zeros(len(item_raw) + 1)
    np.maximum.at(best, item, dur)
    duration = best[1:] / 1000.0
    item_cols: dict[str, pa.Array] = {}
    channel_raw: pa.Array | None = None
    if video_meta is not None:
        item_cols, channel_raw, meta_duration = _kuairand_item_meta(video_meta, item_raw)
        duration = np.where(duration > 0, duration, meta_duration)
    item_cols = {
        "duration_s": pa.array(duration.astype(np.float32), mask=~(duration > 0)),
        **item_cols,
    }

    extra = {
        "loader": "kuairand",
        "files": [r.name for r in logs] + ([videos.name] if videos else []),
        "request": "rows of one user with the same time_ms",
    }
    with DatasetWriter(out, source="kuairand", force=force, extra=extra) as w:
        w.write("users", _ids_table("user_id", len(user_raw)))
        w.write("items", _ids_table("item_id", len(item_raw), **item_cols))
        w.write("watches", watches)
        w.write("impressions", impressions)
        w.add_id_map("user", user_raw)
        w.add_id_map("item", item_raw)
        if channel_raw is not None:
            w.add_id_map("channel", channel_raw)
    return ImportResult.of(out, started)


def _read_kuairand_videos(raw: RawFile) -> dict[str, pa.Array | None]:
    delimiter = _sniff_delimiter(raw)
    p = read_delimited(
        raw,
        delimiter=delimiter,
        quoted=delimiter == ",",  # tags are quoted lists: "28,11"
        required=("video_id",),
        optional=KUAIRAND_VIDEO_COLUMNS,
    )
    video = p.text("video_id")
    _check_unique(p, "video_id", video)
    names = p.table.column_names
    upload = None
    if "upload_dt" in names:
        dates = p.text("upload_dt", required=False)
        upload = pc.cast(
            pc.strptime(dates, format="%Y-%m-%d", unit="s", error_is_null=True), pa.int64()
        )
    return {
        "video_id": video,
        "author_id": p.text("author_id", required=False) if "author_id" in names else None,
        "upload_ts": upload,
        "video_duration": (
            p.numbers("video_duration", pa.float64(), required=False, minimum=0)
            if "video_duration" in names
            else None
        ),
        # Tags are comma-separated category ids; the first one is the topic.
        "topic": (
            pc.list_element(pc.split_pattern(p.text("tag", required=False), ","), 0)
            if "tag" in names
            else None
        ),
    }


def _kuairand_item_meta(
    meta: dict[str, pa.Array | None], item_raw: pa.Array
) -> tuple[dict[str, pa.Array], pa.Array | None, np.ndarray]:
    """Video features joined onto the logged items (videos never logged are left out)."""
    video = meta["video_id"]
    assert video is not None
    known = pc.is_in(video, value_set=item_raw)
    dense = pc.index_in(video, value_set=item_raw).filter(known).to_numpy().astype(np.int64) + 1
    kept = {k: v.filter(known) for k, v in meta.items() if v is not None and k != "video_id"}
    cols: dict[str, pa.Array] = {}
    channel_raw = None
    if "author_id" in kept:
        channel_raw, (channel,) = dense_ids(kept["author_id"].drop_null())
        valid = pc.is_valid(kept["author_id"]).to_numpy(zero_copy_only=False)
        full = np.zeros(valid.size, dtype=np.int64)
        full[valid] = channel
        kept["channel_id"] = pa.array(full, mask=~valid)
        del kept["author_id"]
    attached = _attach(len(item_raw), dense, kept)
    meta_duration = np.zeros(len(item_raw))
    if "video_duration" in attached:
        meta_duration = (
            np.nan_to_num(attached.pop("video_duration").to_numpy(zero_copy_only=False), nan=0.0)
            / 1000.0
        )
    for name in ("upload_ts", "channel_id", "topic"):
        if name in attached:
            cols[name] = attached[name]
    return cols, channel_raw, meta_duration
