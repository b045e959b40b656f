"""The MovieLens loader: ml-100k, ml-1m, ml-latest and RecBole layouts, found by their file
names; ratings become watches, demographics and movie metadata the users and items tables.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from funnelrec.data.dataset import DatasetWriter
from funnelrec.data.loaders.ids import _attach, _check_unique, dense_ids
from funnelrec.data.loaders.reading import Parsed, RawFile, read_delimited
from funnelrec.data.loaders.result import ImportResult, _check_target, _ids_table, _watches
from funnelrec.errors import DataError

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
