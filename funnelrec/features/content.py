"""Item content: what is known about an item at upload, for the candidate model's content
tower (docs/candidates.md, "Item content tower"; Yi et al. 2019).

Every catalogue item (every row of the dataset's items table, watched or not) gets:

    channel        content_channel vocabulary id (0: unknown, or a channel not fitted)
    topic          content_topic vocabulary id
    title          a bag of title_token vocabulary ids: the title's lower-cased unigrams
                   and bigrams (`tokenize.py`, as search queries), tokens not fitted left out
    dense          CONTENT_DENSE: log1p(duration_s) and log1p(age in days at the training
                   window's end), each standardised, and a missing flag for each

Leak-free: the three vocabularies, and the dense columns' means and deviations, are
fitted on the items *known at the end of the training window* only: those uploaded by
then (upload_ts <= t_end) and those in the item vocabulary (watched in training). An item
uploaded later adds no vocabulary entry; its content is still encoded with the fitted
vocabularies (what a fresh upload looks like to a model trained on the window). Channels
and topics keep the features' `min_count`; title tokens `title_min_count` (a token on
one title only would just be another item id) and at most `max_title_tokens`.

The dense age is measured at the training window's end, t_end (not at each example's
time): an item then has one vector, the one the index holds, and serving's example age 0
stands for that same moment. Items uploaded after t_end count as age 0 (brand new). The
raw upload time is kept too (`upload_ts`, NaN unknown): the candidate model's item-age
term (`CandidateConfig.item_age`) measures each item's age at each training example's
own time from it.

Written by the features build as FEAT/transforms/item_content.parquet, one row per item
(item_id, its item vocabulary id or 0, channel, topic, the title's ids as a list, the dense
columns, upload_ts) with t_end and the dense scaling in the file's metadata, beside the vocabularies
(FEAT/transforms/content_channel.parquet, ...). A features update extends the previous
vocabularies (old ids keep their values) and keeps the previous dense scaling unless it
refits the normalisers; the table itself is rebuilt over the grown catalogue.

    fit = fit_item_content(ds.table("items"), item_vocab, t_end, config)
    table = feats.item_content()        # ContentTable
    table.vocab_rows(len(item_vocab))   # ItemContent indexed by item vocabulary id
    table.outside_vocab()               # (ItemContent, dataset item ids) of the others
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from funnelrec.errors import ArtifactError
from funnelrec.features.batch import ItemContent
from funnelrec.features.tokenize import tokenize_array
from funnelrec.features.vectorised import drop_zeros
from funnelrec.features.vocab import Vocabulary, write_table_atomic

if TYPE_CHECKING:
    from funnelrec.features.config import FeaturesConfig

FORMAT_VERSION = 2
# Version 1 tables have no upload_ts column: they read with every upload time unknown
# (`ContentTable.has_upload_ts` False), and a model with the item-age term refuses them.
READS_VERSIONS = (1, 2)
CONTENT_FILE = "item_content.parquet"  # under FEAT/transforms/
# The content vocabularies: the item columns they are fitted on
CONTENT_VOCABS = {"channel": "content_channel", "topic": "content_topic", "title": "title_token"}
CONTENT_DENSE = ("duration", "duration_missing", "age", "age_missing")
DAY_S = 86_400.0
# The dense columns' scaling: deviations of the log values are floored at MIN_STD (a
# catalogue whose known items are all about as old would otherwise blow up the ages of
# newer ones) and the standardised values clipped to +-CLIP, so that a value far outside
# the known items' range cannot swamp an item's vector.
MIN_STD = 0.25
CLIP = 4.0
_META_KEY = b"funnelrec.item_content"


@dataclass(eq=False)
class ContentTable:
    """The content of R catalogue items, ordered by dataset item id.

    item_id:       [R] int64 dataset item ids (ascending)
    item:          [R] int64 item vocabulary id (0: outside the vocabulary)
    channel, topic: [R] int64 content vocabulary ids (0: unknown)
    title, title_offsets: [T] int64 title token ids, [R + 1] int64 offsets into them
    dense:         [R, len(CONTENT_DENSE)] float32
    t_end:         the training window's end (the ages' reference time)
    scale:         {"duration": [mean, std], "age": [mean, std]} of the log values
    upload_ts:     [R] float64 upload time in seconds (NaN: unknown)
    has_upload_ts: False for a table written before upload times were kept
    """

    item_id: np.ndarray
    item: np.ndarray
    channel: np.ndarray
    topic: np.ndarray
    title: np.ndarray
    title_offsets: np.ndarray
    dense: np.ndarray
    t_end: int
    scale: dict[str, list[float]]
    upload_ts: np.ndarray
    has_upload_ts: bool = True

    def __len__(self) -> int:
        return len(self.item_id)

    def content(self, rows: np.ndarray | None = None) -> ItemContent:
        """The content of table rows `rows` (all when None) as tensors; a row of -1 is an
        empty one (no ids, zero dense inputs)."""
        sel = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        have = sel >= 0
        if len(self) == 0:
            have = np.zeros(len(sel), dtype=bool)
        safe = np.where(have, sel, 0) if len(self) else np.zeros(0, np.int64)

        def take(values: np.ndarray) -> np.ndarray:
            out = np.zeros((len(sel), *values.shape[1:]), dtype=values.dtype)
            out[have] = values[safe[have]]
            return out

        # unknown: -inf, not NaN, which a loaded model's buffers may not hold
        upload = np.full(len(sel), -np.inf)
        upload[have] = self.upload_ts[safe[have]]
        upload[np.isnan(upload)] = -np.inf
        starts = take(self.title_offsets[:-1])
        lengths = take(np.diff(self.title_offsets))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        idx = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
        return ItemContent(
            channel=torch.from_numpy(take(self.channel).astype(np.int64)),
            topic=torch.from_numpy(take(self.topic).astype(np.int64)),
            title=torch.from_numpy(self.title[idx].astype(np.int64)),
            title_offsets=torch.from_numpy(offsets[:-1]),
            dense=torch.from_numpy(take(self.dense).astype(np.float32)),
            upload_ts=torch.from_numpy(upload),
        )

    def vocab_rows(self, item_vocab_size: int) -> ItemContent:
        """Content indexed by item vocabulary id 0..N (`item_vocab_size` = N + 1): row 0,
        and any id without a table row, is empty."""
        row_of = np.full(item_vocab_size, -1, dtype=np.int64)
        inside = (self.item > 0) & (self.item < item_vocab_size)
        row_of[self.item[inside]] = np.flatnonzero(inside)
        return self.content(row_of)

    def outside_vocab(self) -> tuple[ItemContent, np.ndarray]:
        """(content, dataset item ids) of the items outside the item vocabulary."""
        rows = np.flatnonzero(self.item == 0)
        return self.content(rows), self.item_id[rows]

    def save(self, path: Path | str) -> None:
        path = Path(path)
        title = pa.ListArray.from_arrays(
            pa.array(self.title_offsets, type=pa.int64()).cast(pa.int32()),
            pa.array(self.title, type=pa.int32()),
        )
        cols: dict[str, Any] = {
            "item_id": pa.array(self.item_id, type=pa.int64()),
            "item": pa.array(self.item, type=pa.int32()),
            "channel": pa.array(self.channel, type=pa.int32()),
            "topic": pa.array(self.topic, type=pa.int32()),
            "title": title,
        }
        for j, name in enumerate(CONTENT_DENSE):
            cols[name] = pa.array(self.dense[:, j], type=pa.float32())
        cols["upload_ts"] = pa.array(self.upload_ts, type=pa.float64())
        meta = {"format_version": FORMAT_VERSION, "t_end": self.t_end, "scale": self.scale}
        table = pa.table(cols).replace_schema_metadata({_META_KEY: json.dumps(meta)})
        write_table_atomic(table, path)

    @classmethod
    def load(cls, path: Path | str) -> ContentTable:
        path = Path(path)
        try:
            t = pq.read_table(path)
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as e:
            raise ArtifactError(f"{path}: cannot read the item content table ({e})") from None
        raw = (t.schema.metadata or {}).get(_META_KEY)
        meta = json.loads(raw) if raw is not None else {}
        version = meta.get("format_version")
        if version not in READS_VERSIONS:
            raise ArtifactError(
                f"{path}: item content format version {version}, this funnelrec reads "
                f"{', '.join(map(str, READS_VERSIONS))}"
            )
        title = t.column("title").combine_chunks()
        offsets = np.asarray(title.offsets.to_numpy(), dtype=np.int64)
        flat = np.asarray(title.values.to_numpy(), dtype=np.int64)
        flat, offsets = flat[offsets[0] : offsets[-1]], offsets - offsets[0]

        def ints(name: str) -> np.ndarray:
            return np.asarray(t.column(name).to_numpy(), dtype=np.int64)

        dense = np.stack(
            [np.asarray(t.column(c).to_numpy(), dtype=np.float32) for c in CONTENT_DENSE], axis=1
        ).reshape(t.num_rows, len(CONTENT_DENSE))
        return cls(
            item_id=ints("item_id"),
            item=ints("item"),
            channel=ints("channel"),
            topic=ints("topic"),
            title=flat,
            title_offsets=offsets,
            dense=dense,
            t_end=int(meta["t_end"]),
            scale={k: [float(x) for x in v] for k, v in meta["scale"].items()},
            upload_ts=(
                np.asarray(t.column("upload_ts").to_numpy(), dtype=np.float64)
                if "upload_ts" in t.column_names
                else np.full(t.num_rows, np.nan)
            ),
            has_upload_ts="upload_ts" in t.column_names,
        )


@dataclass(eq=False)
class ContentFit:
    """What a build writes: the content vocabularies (by vocabulary name) and the table."""

    vocabs: dict[str, Vocabulary]
    table: ContentTable
    known_items: int = 0


def fit_item_content(
    items: pa.Table,
    item_vocab: Vocabulary,
    t_end: int,
    cfg: FeaturesConfig,
    *,
    previous: ContentFit | None = None,
    keep_scale: bool = True,
) -> ContentFit:
    """Fit the content vocabularies and scaling on the items known at `t_end`, and encode
    every row of `items` (the dataset's items table) with them.

    previous: the content of the features an update extends: its vocabularies are
    extended (old ids keep their values) and, with `keep_scale`, its dense scaling kept."""
    items = items.sort_by("item_id")
    ids = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
    upload = _floats(items, "upload_ts")
    with np.errstate(invalid="ignore"):
        known = (item_vocab.lookup(ids) > 0) | (upload <= t_end)
    raw = _raw_columns(items)

    def fit(name: str, values: pa.Array, min_count: int, max_size: int | None) -> Vocabulary:
        if previous is None or name not in previous.vocabs:
            return Vocabulary.fit(name, values, max_size=max_size, min_count=min_count)
        seen = Vocabulary.fit(name, values)
        return previous.vocabs[name].extend(seen, max_new=max_size, min_count=min_count)

    mask = pa.array(known)
    channel, topic, title = (CONTENT_VOCABS[k] for k in ("channel", "topic", "title"))
    tokens, tok_off = tokenize_array(raw["title"])
    vocabs = {
        channel: fit(channel, raw["channel"].filter(mask), cfg.min_count, None),
        topic: fit(topic, raw["topic"].filter(mask), cfg.min_count, None),
        title: fit(
            title, _once_per_item(tokens, tok_off, known), cfg.title_min_count, cfg.max_title_tokens
        ),
    }
    if previous is not None and keep_scale:
        scale = previous.table.scale
    else:
        with np.errstate(invalid="ignore"):
            duration = np.log1p(_floats(items, "duration_s"))
        scale = {
            "duration": _mean_std(duration[known]),
            "age": _mean_std(_log_age(upload, t_end)[known]),
        }
    table = encode_items(items, vocabs, item_vocab, t_end, scale)
    return ContentFit(vocabs=vocabs, table=table, known_items=int(known.sum()))


def _once_per_item(tokens: pa.Array, offsets: np.ndarray, keep: np.ndarray) -> pa.Array:
    """The tokens of the items `keep` [R] (bags: flat `tokens`, `offsets` [R + 1]), each
    token once per item: counted, they are the number of titles holding it."""
    owner = np.repeat(np.arange(len(keep), dtype=np.int64), np.diff(offsets))
    sel = keep[owner]
    if not sel.any():
        return pa.array([], type=pa.string())
    enc = pc.dictionary_encode(tokens.filter(pa.array(sel)))
    code = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    pair = owner[sel] * len(enc.dictionary) + code
    _, first = np.unique(pair, return_index=True)
    return enc.dictionary.take(pa.array(code[np.sort(first)]))


def encode_items(
    items: pa.Table,
    vocabs: dict[str, Vocabulary],
    item_vocab: Vocabulary,
    t_end: int,
    scale: dict[str, list[float]],
) -> ContentTable:
    """The content table of `items` (item_id and any content columns) with fitted
    vocabularies and scaling: the build's table, and what a newly uploaded item is
    encoded with at serving."""
    items = items.sort_by("item_id")
    ids = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
    raw = _raw_columns(items)
    tokens, tok_off = tokenize_array(raw["title"])
    title = vocabs[CONTENT_VOCABS["title"]].lookup(tokens).astype(np.int64)
    title, tok_off = drop_zeros(title, tok_off)
    duration = np.log1p(_floats(items, "duration_s"))
    age = _log_age(_floats(items, "upload_ts"), t_end)
    dense = np.zeros((len(ids), len(CONTENT_DENSE)), dtype=np.float32)
    for j, (x, key) in enumerate(((duration, "duration"), (age, "age"))):
        mean, std = scale[key]
        missing = np.isnan(x)
        z = np.clip((np.nan_to_num(x) - mean) / std, -CLIP, CLIP)
        dense[:, 2 * j] = np.where(missing, 0.0, z)
        dense[:, 2 * j + 1] = missing
    return ContentTable(
        item_id=ids,
        item=item_vocab.lookup(ids).astype(np.int64),
        channel=vocabs[CONTENT_VOCABS["channel"]].lookup(raw["channel"]).astype(np.int64),
        topic=vocabs[CONTENT_VOCABS["topic"]].lookup(raw["topic"]).astype(np.int64),
        title=title,
        title_offsets=np.asarray(tok_off, dtype=np.int64),
        dense=dense,
        t_end=int(t_end),
        scale=scale,
        upload_ts=_floats(items, "upload_ts"),
    )


def content_spec(fit: ContentFit) -> dict[str, Any]:
    """The manifest's `item_content` entry: the file, vocabularies, dense columns, counts."""
    return {
        "file": f"transforms/{CONTENT_FILE}",
        "vocabularies": dict(CONTENT_VOCABS),
        "dense_columns": list(CONTENT_DENSE),
        "items": len(fit.table),
        "known_items": fit.known_items,
        "outside_vocabulary": int((fit.table.item == 0).sum()),
        "t_end": fit.table.t_end,
    }


def _raw_columns(items: pa.Table) -> dict[str, pa.Array]:
    """channel (int64), topic and title (string) of each row; null where absent."""
    n = items.num_rows

    def col(name: str, type_: pa.DataType) -> pa.Array:
        if name not in items.column_names:
            return pa.nulls(n, type_)
        return items.column(name).combine_chunks().cast(type_)

    return {
        "channel": col("channel_id", pa.int64()),
        "topic": col("topic", pa.string()),
        "title": col("title", pa.string()),
    }


def _floats(items: pa.Table, name: str) -> np.ndarray:
    if name not in items.column_names:
        return np.full(items.num_rows, np.nan)
    col = items.column(name).cast(pa.float64())
    return np.asarray(pc.fill_null(col, np.nan).to_numpy(), dtype=np.float64)


def _log_age(upload: np.ndarray, t_end: int) -> np.ndarray:
    """log1p of the days from upload to t_end (0 for later uploads; NaN unknown)."""
    with np.errstate(invalid="ignore"):
        return np.log1p(np.maximum(t_end - upload, 0.0) / DAY_S)


def _mean_std(x: np.ndarray) -> list[float]:
    """Mean and deviation of log values, the deviation at least MIN_STD."""
    x = x[~np.isnan(x)]
    if x.size == 0:
        return [0.0, 1.0]
    return [float(x.mean()), max(float(x.std()), MIN_STD)]
