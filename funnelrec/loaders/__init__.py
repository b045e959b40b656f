"""Raw logs -> canonical event tables: the MovieLens, KuaiRand and sequence loaders.

    funnelrec data import movielens  DIR|ZIP  --out DATASET   # ml-100k, ml-1m, ml-latest, RecBole
    funnelrec data import kuairand   FILE|DIR --out DATASET   # KuaiRand log rows = impressions
    funnelrec data import sequence   FILE     --out DATASET   # `user item` per line (SASRec)

Every loader reads the whole input first (pyarrow.csv, every column as text), converts and
checks it column by column with vectorised kernels, maps raw ids to dense ids and only then
opens a `DatasetWriter`, so bad input never touches the output directory. Errors name the
file, the column and the physical line of the first offending row.

Dense ids: the raw ids of a space are sorted, numerically when every one of them is an
integer and as text otherwise, and numbered from 1 in that order (0 stays padding). The
order does not depend on the order of rows, so the same data always gives the same ids,
and integer ids that are already 1..N keep their value. See docs/data.md for each mapping.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from funnelrec.dataset import Dataset, DatasetWriter
from funnelrec.errors import DataError

# ---------------------------------------------------------------------------------------
# Reading raw files


@dataclass(frozen=True)
class RawFile:
    """One input file: on disk, or a member of a zip archive (a MovieLens zip, a wheel)."""

    path: Path
    member: str | None = None

    @property
    def name(self) -> str:
        """How error messages name the file: a path, or `archive.zip!member`."""
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def read(self, size: int = -1) -> bytes:
        """The file's bytes (the first `size` of them when `size` >= 0)."""
        try:
            if self.member is None:
                with self.path.open("rb") as f:
                    return f.read(size)
            with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
                return f.read(size)
        except OSError as e:
            reason = (e.strerror or str(e)).lower()
        except zipfile.BadZipFile:
            reason = "not a zip archive"
        except KeyError:
            reason = "no such member in the archive"
        raise DataError(f"cannot read ({reason})", path=self.name)


def _physical_line(data: bytes, nonblank: int) -> int:
    """The 1-based line number of the `nonblank`-th non-empty line (pyarrow skips blanks)."""
    seen = 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip(b"\r"):
            seen += 1
            if seen == nonblank:
                return number
    return nonblank


@dataclass
class Parsed:
    """A raw file read into a table of text columns, with what is needed to name lines."""

    raw: RawFile
    data: bytes
    table: pa.Table
    header_lines: int

    def line(self, index: int) -> int:
        """Physical line of data row `index` (0-based)."""
        return _physical_line(self.data, self.header_lines + index + 1)

    def error(self, message: str, column: str | None, index: int | None) -> DataError:
        row = None if index is None else self.line(index)
        where = f"{self.raw.name}, line {row}" if row is not None else self.raw.name
        return DataError(message, path=where, column=column)

    def renamed(self, names: dict[str, str]) -> Parsed:
        """The same file with columns renamed (`names`: old -> new; others kept)."""
        new = [names.get(n, n) for n in self.table.column_names]
        return Parsed(self.raw, self.data, self.table.rename_columns(new), self.header_lines)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def text(self, column: str, *, required: bool = True) -> pa.Array:
        """A text column; empty values are an error when `required`, else null."""
        col = self.table.column(column).combine_chunks()
        empty = pc.equal(pc.utf8_trim_whitespace(col), "")
        if required:
            bad = _first(empty)
            if bad is not None:
                raise self.error("missing value", column, bad)
            return col
        return pc.if_else(empty, pa.scalar(None, pa.string()), col)

    def numbers(
        self,
        column: str,
        kind: pa.DataType,
        *,
        required: bool = True,
        minimum: float | None = None,
        what: str = "a number",
    ) -> pa.Array:
        """A column converted to `kind` (int64 or float64), checked against `minimum`."""
        col = self.text(column, required=required)
        try:
            out = pc.cast(col, kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            failing = _first_failing_cast(col, kind)
            raise self.error(f"{col[failing].as_py()!r} is not {what}", column, failing) from None
        if pa.types.is_floating(kind):
            bad = _first(pc.invert(pc.is_finite(out)))
            if bad is not None:
                raise self.error(f"{col[bad].as_py()!r} is not {what}", column, bad)
        if minimum is not None:
            bad = _first(pc.less(out, minimum))
            if bad is not None:
                raise self.error(f"value {col[bad].as_py()} is below {minimum:g}", column, bad)
        return out

    def timestamps(self, column: str) -> pa.Array:
        """Integer (or integral float, as RecBole writes them) epoch values as int64."""
        try:
            return self.numbers(column, pa.int64(), what="a timestamp")
        except DataError:
            floats = self.numbers(column, pa.float64(), what="a timestamp")
            return pc.cast(pc.floor(floats), pa.int64())


def _first(mask: pa.Array | pa.ChunkedArray) -> int | None:
    hits = np.flatnonzero(pc.fill_null(mask, False).to_numpy(zero_copy_only=False))
    return int(hits[0]) if hits.size else None


def _first_failing_cast(col: pa.Array, kind: pa.DataType) -> int:
    """Index of the first value that does not convert: whole blocks first, then one by one."""
    block = 1 << 16
    for start in range(0, len(col), block):
        part = col.slice(start, block)
        try:
            pc.cast(part, kind)
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        for i in range(len(part)):
            try:
                pc.cast(part.slice(i, 1), kind)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return start + i
    return 0


def _text_bytes(raw: RawFile) -> bytes:
    """The file's bytes as UTF-8: MovieLens 100k/1m metadata is Latin-1, so transcode it."""
    data = raw.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        data = data.decode("latin-1").encode("utf-8")
    return data


def read_delimited(
    raw: RawFile,
    *,
    delimiter: str,
    names: Sequence[str] | None = None,
    required: Sequence[str] = (),
    optional: Sequence[str] = (),
    header_name: Callable[[str], str] = lambda s: s,
    separator: bytes | None = None,
    quoted: bool = False,
) -> Parsed:
    """Read a delimited text file; every column comes back as text.

    Without `names` the first line is a header: its names (after `header_name`) must
    include every `required` one and nothing outside `required` + `optional`. With `names`
    the file has no header and every line must have exactly that many fields. `separator`
    is a multi-byte separator (MovieLens 1M's `::`) replaced by `delimiter` before parsing.
    """
    data = _text_bytes(raw)
    if separator is not None:
        data = data.replace(separator, delimiter.encode())
    if not data.strip():
        raise DataError("file is empty", path=raw.name)
    header_lines = 0
    if names is None:
        first = data.split(b"\n", 1)[0].decode().lstrip("\ufeff").strip("\r")
        names = [header_name(h.strip().strip('"')) for h in first.split(delimiter)]
        missing = [n for n in required if n not in names]
        if missing:
            raise DataError(
                f"missing column(s) {', '.join(missing)} (header has {', '.join(names)})",
                path=f"{raw.name}, line 1",
                column=missing[0],
            )
        allowed = set(required) | set(optional)
        extra = [n for n in names if n not in allowed]
        if extra:
            raise DataError(
                f"unexpected column (expected {', '.join([*required, *optional])})",
                path=f"{raw.name}, line 1",
                column=extra[0],
            )
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise DataError("column appears twice", path=f"{raw.name}, line 1", column=dup)
        header_lines = 1
    names = list(names)

    bad_rows: list[tuple[int, int | None]] = []

    def on_invalid(row: Any) -> str:
        bad_rows.append((row.actual_columns, row.number))
        return "error"

    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(
                column_names=names, skip_rows=header_lines, use_threads=False
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                quote_char='"' if quoted else False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as e:
        if bad_rows:
            actual, number = bad_rows[0]
            line = _physical_line(data, number) if number is not None else None
            where = f"{raw.name}, line {line}" if line is not None else raw.name
            column = names[actual] if actual < len(names) else None
            raise DataError(
                f"{actual} field(s), expected {len(names)} ({', '.join(names)})",
                path=where,
                column=column,
            ) from None
        raise DataError(f"cannot parse ({e})", path=raw.name) from None
    if table.num_rows == 0:
        raise DataError("file has no data rows", path=raw.name)
    return Parsed(raw, data, table, header_lines)


# ---------------------------------------------------------------------------------------
# Dense ids


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


# ---------------------------------------------------------------------------------------
# The result of an import


@dataclass(frozen=True)
class ImportResult:
    """What an import wrote: read back from the committed manifest."""

    path: Path
    source: str
    row_counts: dict[str, int]
    time_range: dict[str, int | None]
    synthetic_timestamps: bool
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, path: Path, started: float) -> ImportResult:
        m = Dataset.open(path).manifest
        return cls(
            path=Path(path),
            source=m.source,
            row_counts=dict(m.row_counts),
            time_range=dict(m.time_range),
            synthetic_timestamps=m.synthetic_timestamps,
            seconds=time.perf_counter() - started,
            extra=dict(m.extra),
        )


def _check_target(out: Path, force: bool) -> None:
    # Fail before the (possibly long) read; DatasetWriter checks again before writing.
    if Path(out).exists() and not force:
        raise DataError(f"{out} already exists (use --force to overwrite)")


def _watches(
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
    watch_time: pa.Array | None,
) -> pa.Table:
    """A watches table sorted by (user_id, ts); ties keep the input order."""
    order = np.lexsort((ts, user))
    wt = (
        pa.nulls(user.size, pa.float32())
        if watch_time is None
        else pc.cast(watch_time, pa.float32()).take(pa.array(order))
    )
    return pa.table(
        {
            "user_id": user[order],
            "item_id": item[order],
            "ts": ts[order],
            "watch_time_s": wt,
            "source": pa.nulls(user.size, pa.string()),
        }
    )


def _ids_table(column: str, n: int, **cols: pa.Array) -> pa.Table:
    return pa.table({column: np.arange(1, n + 1, dtype=np.int64), **cols})


# ---------------------------------------------------------------------------------------
# sequence: `user item` per line


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


# ---------------------------------------------------------------------------------------
# KuaiRand: each log row is an impression

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


# ---------------------------------------------------------------------------------------
# MovieLens

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


@dataclass(frozen=True)
class MovielensFiles:
    """The files of one MovieLens release; `variant` names the layout."""

    variant: str  # "ml-100k", "ml-1m", "ml-latest" or "recbole"
    ratings: RawFile
    users: RawFile | None
    items: RawFile | None


def find_movielens_files(src: Path, within: str = "") -> MovielensFiles:
    """Detect the MovieLens variant of a directory or a zip by its file names.

    In a zip, only members under `within` are considered, at any depth.
    """
    src = Path(src)
    if src.is_dir():
        found = {p.name: RawFile(p) for p in src.iterdir() if p.is_file()}
    elif src.is_file() and zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            members = [n for n in z.namelist() if n.startswith(within) and not n.endswith("/")]
        found = {}
        for m in members:
            found.setdefault(m.rsplit("/", 1)[-1], RawFile(src, m))
    elif src.exists():
        raise DataError("not a directory or a zip archive", path=src)
    else:
        raise DataError("cannot read (no such file or directory)", path=src)

    def pick(variant: str, ratings: str, users: str | None, items: str | None) -> MovielensFiles:
        return MovielensFiles(
            variant,
            found[ratings],
            found.get(users) if users else None,
            found.get(items) if items else None,
        )

    if "u.data" in found:
        return pick("ml-100k", "u.data", "u.user", "u.item")
    if "ratings.dat" in found:
        return pick("ml-1m", "ratings.dat", "users.dat", "movies.dat")
    if "ratings.csv" in found:
        return pick("ml-latest", "ratings.csv", None, "movies.csv")
    inter = sorted(n for n in found if n.endswith(".inter"))
    if len(inter) == 1:
        stem = inter[0][: -len(".inter")]
        return pick("recbole", inter[0], f"{stem}.user", f"{stem}.item")
    if len(inter) > 1:
        raise DataError(f"several RecBole .inter files ({', '.join(inter)})", path=src)
    raise DataError(
        "no MovieLens ratings found (expected u.data, ratings.dat, ratings.csv or *.inter)",
        path=src,
    )


def _recbole_name(header: str) -> str:
    return header.split(":", 1)[0]  # RecBole headers carry a type: `user_id:token`


def _read_ratings(files: MovielensFiles) -> Parsed:
    raw = files.ratings
    if files.variant == "ml-100k":
        return read_delimited(raw, delimiter="\t", names=["user", "item", "rating", "ts"])
    if files.variant == "ml-1m":
        return read_delimited(
            raw, delimiter="\x1f", separator=b"::", names=["user", "item", "rating", "ts"]
        )
    if files.variant == "ml-latest":
        p = read_delimited(
            raw, delimiter=",", required=("userId", "movieId", "rating", "timestamp")
        )
        return p.renamed({"userId": "user", "movieId": "item", "timestamp": "ts"})
    p = read_delimited(
        raw,
        delimiter="\t",
        required=("user_id", "item_id", "timestamp"),
        optional=("rating",),
        header_name=_recbole_name,
    )
    return p.renamed({"user_id": "user", "item_id": "item", "timestamp": "ts"})


def _region_from_zip(zips: pa.Array) -> pa.Array:
    """US ZIP codes start with the national area digit (0 = north-east ... 9 = west);
    that digit is the region, `us-0` .. `us-9`. Codes that do not start with a digit
    (Canadian postal codes in ml-100k) are `other`; empty ones null."""
    first = pc.utf8_slice_codeunits(pc.utf8_trim_whitespace(zips), 0, 1)
    digit = pc.match_substring_regex(first, r"^[0-9]$")
    return pc.if_else(digit, pc.binary_join_element_wise("us-", first, ""), "other")


def _read_users(files: MovielensFiles) -> tuple[pa.Array, dict[str, pa.Array | None]] | None:
    raw = files.users
    if raw is None:
        return None
    if files.variant == "ml-100k":
        p = read_delimited(raw, delimiter="|", names=["user", "age", "gender", "occupation", "zip"])
    elif files.variant == "ml-1m":
        p = read_delimited(
            raw,
            delimiter="\x1f",
            separator=b"::",
            names=["user", "gender", "age", "occupation", "zip"],
        )
    else:
        p = read_delimited(
            raw,
            delimiter="\t",
            required=("user_id",),
            optional=("age", "gender", "occupation", "zip_code"),
            header_name=_recbole_name,
        )
        p = p.renamed({"user_id": "user", "zip_code": "zip"})
    names = p.table.column_names
    ids = p.text("user")
    _check_unique(p, "user", ids)
    cols: dict[str, pa.Array | None] = {
        # ml-1m stores an age bracket code (1 = under 18, 18 = 18-24, ...): kept as is.
        "age": (
            pc.cast(p.numbers("age", pa.float64(), required=False, minimum=0), pa.float32())
            if "age" in names
            else None
        ),
        "gender": p.text("gender", required=False) if "gender" in names else None,
        "region": _region_from_zip(p.text("zip", required=False)) if "zip" in names else None,
    }
    return ids, cols


def _year_start(years: pa.Array) -> pa.Array:
    """UTC seconds of 1 January of each (text) year; null where it is not a year."""
    y = pc.if_else(pc.match_substring_regex(years, r"^\d{4}$"), years, pa.scalar(None, pa.string()))
    return pc.cast(
        pc.strptime(
            pc.binary_join_element_wise(y, "-01-01", ""),
            format="%Y-%m-%d",
            unit="s",
            error_is_null=True,
        ),
        pa.int64(),
    )


def _title_year(titles: pa.Array) -> pa.Array:
    """The year in a MovieLens title, `Toy Story (1995)`, as text (null where absent)."""
    return pc.struct_field(pc.extract_regex(titles, r"\((?P<year>\d{4})\)\s*$"), [0])


def _first_genre(genres: pa.Array, sep: str) -> pa.Array:
    first = pc.list_element(pc.split_pattern(genres, sep), 0)
    return pc.if_else(
        pc.or_(pc.equal(first, ""), pc.equal(first, "(no genres listed)")),
        pa.scalar(None, pa.string()),
        first,
    )


def _read_items(files: MovielensFiles) -> tuple[pa.Array, dict[str, pa.Array | None]] | None:
    raw = files.items
    if raw is None:
        return None
    if files.variant == "ml-100k":
        names = ["item", "title", "release", "video_release", "imdb_url", *ML100K_GENRES]
        p = read_delimited(raw, delimiter="|", names=names)
        flags = np.stack(
            [p.numbers(g, pa.int64(), minimum=0, what="0 or 1").to_numpy() for g in ML100K_GENRES],
            axis=1,
        )
        has = flags.any(axis=1)
        topic = pa.array(
            np.asarray(ML100K_GENRES, dtype=object)[flags.argmax(axis=1)],
            pa.string(),
            mask=~has,
        )
        release = p.text("release", required=False)
        upload = pc.cast(
            pc.strptime(release, format="%d-%b-%Y", unit="s", error_is_null=True), pa.int64()
        )
        title = p.text("title", required=False)
    elif files.variant in ("ml-1m", "ml-latest"):
        if files.variant == "ml-1m":
            p = read_delimited(
                raw, delimiter="\x1f", separator=b"::", names=["item", "title", "genres"]
            )
        else:
            p = read_delimited(
                raw, delimiter=",", required=("movieId", "title", "genres"), quoted=True
            )
            p = p.renamed({"movieId": "item"})
        title = p.text("title", required=False)
        upload = _year_start(pc.fill_null(_title_year(title), ""))
        topic = _first_genre(p.text("genres"), "|")
    else:
        p = read_delimited(
            raw,
            delimiter="\t",
            required=("item_id",),
            optional=("movie_title", "release_year", "class", "genre"),
            header_name=_recbole_name,
        )
        names = p.table.column_names
        title = p.text("movie_title", required=False) if "movie_title" in names else None
        upload = _year_start(p.text("release_year")) if "release_year" in names else None
        genre_col = "class" if "class" in names else ("genre" if "genre" in names else None)
        topic = _first_genre(p.text(genre_col), " ") if genre_col else None
        p = p.renamed({"item_id": "item"})
    ids = p.text("item")
    _check_unique(p, "item", ids)
    return ids, {"upload_ts": upload, "topic": topic, "title": title}


def import_movielens(
    src: Path,
    out: Path,
    *,
    force: bool = False,
    within: str = "",
    extra: dict[str, Any] | None = None,
) -> ImportResult:
    """Import a MovieLens release (a directory or a zip): every rating becomes a watch at
    its timestamp with unknown watch time and source; demographics go to `users`, titles,
    release dates and first genres to `items`. The rating value itself is dropped.
    """
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    _check_target(out, force)
    files = find_movielens_files(src, within)
    ratings = _read_ratings(files)
    users = ratings.text("user")
    items = ratings.text("item")
    if "rating" in ratings.table.column_names:
        ratings.numbers("rating", pa.float64(), what="a rating")  # checked, then dropped
    ts = ratings.timestamps("ts").to_numpy()
    user_meta = _read_users(files)
    item_meta = _read_items(files)

    user_raw, (user, *user_rows) = dense_ids(users, *([user_meta[0]] if user_meta else []))
    item_raw, (item, *item_rows) = dense_ids(items, *([item_meta[0]] if item_meta else []))
    user_cols = _attach(len(user_raw), user_rows[0], user_meta[1]) if user_meta else {}
    item_cols = _attach(len(item_raw), item_rows[0], item_meta[1]) if item_meta else {}

    info = {
        "loader": "movielens",
        "variant": files.variant,
        "files": [f.name for f in (files.ratings, files.users, files.items) if f is not None],
        **(extra or {}),
    }
    with DatasetWriter(out, source="movielens", force=force, extra=info) as w:
        w.write("users", _ids_table("user_id", len(user_raw), **user_cols))
        w.write("items", _ids_table("item_id", len(item_raw), **item_cols))
        w.write("watches", _watches(user, item, ts, None))
        w.add_id_map("user", user_raw)
        w.add_id_map("item", item_raw)
    return ImportResult.of(out, started)
