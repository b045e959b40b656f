"""The sequence funnel (`funnelrec.ranking.sequence`) fitted on a dataset of watches, kept
as a verified artifact, and scored on the dataset's held-out next watches.

The cut is leave-last-out per user in time order: each user's last watch is the test, the
one before it validation, the rest training (users with fewer than three watches are left
out). Everything is fitted on training watches; validation picks the ranker's epoch.

No source may have seen a page's next item: a source fitted on the very watches that
become the pages' positives has seen each (history, next item) pair, and a ranker trained
on such pages learns to trust it far more than it deserves on new requests. So the pages
are staged at each user's last `page_moments` training watches, with every source fitted
on the training watches before them: the deep candidate model on features of a dataset of
the training watches whose own leave-last-out cut holds those moments out (its validation
is the first of them), co-watch and popularity on the same watches. Validation and later
requests are served by co-watch and popularity refitted on every training watch (`refit`),
as a product retrains its sources on the latest data, and by the deep model retrained on
them where the pages' moments were a good part of the training watches (`refit_deep`).

    split = read_sequence_split("data/ml-100k")
    funnel = fit_sequence_funnel(split, "art/funnel", deep=load_training_config(toml))
    funnel = load_sequence_funnel("art/funnel")            # hashes verified
    report = evaluate_sequence_funnel(funnel, split)       # HR@K, NDCG@K on the test watches
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from funnelrec import __version__
from funnelrec.baselines import CoWatch, Interactions, Jagged, load_baseline
from funnelrec.candidates import (
    CandidateTrainingConfig,
    fit_candidates,
    load_candidate_model,
    load_item_embeddings,
)
from funnelrec.config import load_config
from funnelrec.data.dataset import (
    AtomicDirectory,
    Dataset,
    DatasetWriter,
    file_sha256,
    read_artifact_meta,
    write_json_atomic,
)
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.normalize import QuantileNormalizer
from funnelrec.features.splits import leave_last_out, user_offsets
from funnelrec.ranking.sequence import Requests, SequenceFunnel, SequenceFunnelConfig, Sources

FORMAT_VERSION = 1
KIND = "sequence-funnel"
META = "funnel.json"
MIN_INTERACTIONS = 3


# ---------------------------------------------------------------------------------------
# The cut


@dataclass
class SequenceSplit:
    """A dataset's watches cut leave-last-out. Q evaluated users, N items (ids 1..N).

    train:        training watches of every kept user (sorted by user, then time)
    users:        [Q] dataset user ids evaluated (those with a held-out watch)
    history:      'train' -> Jagged [Q] training items, oldest first; '+val' -> the same
                  and the validation item
    seen:         Jagged [Q] training + validation items
    target:       [Q] the test item; target_ts [Q] its time
    train_rows:   rows of the dataset's watches table that are training watches
    valid_ts:     [Q] time of the validation item
    """

    name: str
    path: Path
    num_items: int
    train: Interactions
    users: np.ndarray
    history: dict[str, Jagged]
    seen: Jagged
    target: np.ndarray
    target_ts: np.ndarray
    synthetic_timestamps: bool
    train_rows: np.ndarray
    valid_ts: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def valid_target(self) -> np.ndarray:
        """[Q] the validation item (the last of the '+val' history)."""
        va = self.history["+val"]
        return va.values[va.offsets[1:] - 1]

    def last_ts(self, setting: str) -> np.ndarray:
        """[Q] time of each user's last item of history `setting` ('train' or '+val')."""
        if setting == "+val":
            return self.valid_ts
        start = user_offsets(self.train.user)
        return self.train.ts[start[self.users + 1] - 1]

    def requests(self, setting: str, at: np.ndarray | None = None) -> Requests:
        """The evaluated users' requests with history `setting`, made at times `at` [Q]
        (the seconds since the last item are known only where the data has real times)."""
        since = None
        if not self.synthetic_timestamps and at is not None:
            since = (np.asarray(at) - self.last_ts(setting)).astype(np.float64)
        return Requests(self.users, self.history[setting], since)


def jagged_ranges(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Jagged:
    """Rows values[lo[q]:hi[q]] as a Jagged, without a Python loop."""
    lengths = hi - lo
    offsets = np.zeros(lo.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    idx = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - lo, lengths)
    return Jagged(values[idx], offsets)


def read_sequence_split(
    path: Path | str, *, name: str | None = None, min_interactions: int = MIN_INTERACTIONS
) -> SequenceSplit:
    """Read a funnelrec dataset's watches and cut them leave-last-out (see the module)."""
    path = Path(path)
    ds = Dataset.open(path)
    t = ds.table("watches", columns=["user_id", "item_id", "ts"])
    user = t.column("user_id").to_numpy().astype(np.int64)
    item = t.column("item_id").to_numpy().astype(np.int64)
    ts = t.column("ts").to_numpy().astype(np.int64)
    if user.size == 0:
        raise FunnelrecError(f"{path}: the watches table is empty")
    order = np.lexsort((ts, user))  # stable: ties keep the table's order
    user, item, ts = user[order], item[order], ts[order]
    counts = np.bincount(user)
    keep = counts[user] >= min_interactions
    if not keep.any():
        raise FunnelrecError(f"{path}: no user has {min_interactions} watches or more")
    user, item, ts = user[keep], item[keep], ts[keep]
    table_row = order[keep]
    num_items = max(ds.num_rows("items"), int(item.max()))

    start = user_offsets(user)
    sp = leave_last_out(start, ts, min_watches=min_interactions)
    users = np.flatnonzero(sp.valid_end > sp.train_end)
    lo, tr_end, va_end = sp.user_start[users], sp.train_end[users], sp.valid_end[users]
    part = sp.part_of_watches(user.size)
    train = Interactions(user[part == 0], item[part == 0], ts[part == 0])
    target = item[va_end]
    in_train = np.zeros(num_items + 1, dtype=bool)
    in_train[train.item] = True
    stats = {
        "users": int(users.size),
        "items": num_items,
        "interactions": int(user.size),
        "train_interactions": len(train),
        "targets_never_in_training": int((~in_train[target]).sum()),
        "dropped_users": int(((counts > 0) & (counts < min_interactions)).sum()),
    }
    return SequenceSplit(
        name=name or path.name,
        path=path,
        num_items=num_items,
        train=train,
        users=users.astype(np.int64),
        history={
            "train": jagged_ranges(item, lo, tr_end),
            "+val": jagged_ranges(item, lo, va_end),
        },
        seen=jagged_ranges(item, lo, va_end),
        target=target,
        target_ts=ts[va_end],
        synthetic_timestamps=bool(ds.manifest.synthetic_timestamps),
        train_rows=table_row[part == 0],
        valid_ts=ts[tr_end],
        stats=stats,
    )


def item_topics(path: Path | str, num_items: int) -> np.ndarray | None:
    """[N + 1] a code per item's category (MovieLens: its genre; 0: none), or None when the
    dataset's items have no `topic` column."""
    ds = Dataset.open(path)
    if "topic" not in ds.columns("items"):
        return None
    t = ds.table("items", ["item_id", "topic"])
    names = t.column("topic").to_pylist()
    code = {x: i + 1 for i, x in enumerate(sorted({x for x in names if x}))}
    out = np.zeros(num_items + 1, dtype=np.int64)
    out[t.column("item_id").to_numpy()] = [code.get(x, 0) if x else 0 for x in names]
    return out


# ---------------------------------------------------------------------------------------
# Fitting


@dataclass(frozen=True)
class SequenceFitConfig:
    """How the funnel's sources and pages are made (the ranker: `SequenceFunnelConfig`).

    page_moments: the pages are staged at each user's last `page_moments` training
                  watches (fewer for short histories: one stays training), and the
                  sources of the pages are fitted on the watches before them
    refit:        serve with co-watch and popularity refitted on every training watch
    refit_deep:   and (with `refit` and a deep source) with the deep model retrained on
                  them, a second training of the costliest source. None (the default):
                  retrain where the pages' moments hold more than `refit_share` of the
                  training watches, so that the pages' deep model missed a good part of
                  the data (Amazon Beauty, a few watches per user), not where it missed
                  a sliver (MovieLens, a hundred per user); docs/evaluation.md
    """

    page_moments: int = 2
    refit: bool = True
    refit_deep: bool | None = None
    refit_share: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.refit_share <= 1:
            raise FunnelrecError(
                f"sequence funnel: refit_share must be in [0, 1], got {self.refit_share}"
            )
        if self.page_moments < 2:
            raise FunnelrecError(
                f"sequence funnel: page_moments must be >= 2 (the first is the deep model's "
                f"validation), got {self.page_moments}"
            )


def fit_sequence_funnel(
    split: SequenceSplit,
    out: Path | str,
    *,
    funnel: SequenceFunnelConfig | None = None,
    deep: CandidateTrainingConfig | None = None,
    fit: SequenceFitConfig | None = None,
    feature_overrides: Sequence[str] = (),
    force: bool = False,
    progress: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> SequenceFunnel:
    """Fit the funnel on `split`'s training watches (see the module) and write it to the
    artifact directory `out` (built under a temporary name, renamed when complete); the
    funnel is returned as loaded back from `out`, its hashes verified."""
    funnel_cfg = funnel or SequenceFunnelConfig()
    fit_cfg = fit or SequenceFitConfig()
    # deep_k = 0: co-watch and popularity alone, and no candidate model to train
    with_deep = funnel_cfg.deep_k > 0
    page_req, page_next, before = _pages(split, fit_cfg.page_moments)
    held_share = len(page_req) / max(len(split.train), 1)
    wanted = fit_cfg.refit_deep
    if wanted is None:
        wanted = held_share > fit_cfg.refit_share
    refit_deep = fit_cfg.refit and wanted and with_deep
    out = Path(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        return now

    art = AtomicDirectory(out, force=force)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        t = time.perf_counter()
        deep_users: Any = None
        deep_items: np.ndarray | None = None
        if with_deep:
            inner = _training_dataset(split, work / "data")
            fcfg = load_config(
                FeaturesConfig,
                None,
                ["cap=none", f"valid_n={fit_cfg.page_moments - 1}",
                 f"min_watches={MIN_INTERACTIONS}", *feature_overrides],
            )  # fmt: skip
            build_features(inner, work / "features", split="last", config=fcfg, force=True,
                           progress=progress)  # fmt: skip
            t = lap("features_s", t)
            # the pages' deep model is served too unless a retrained one replaces it
            home = work if refit_deep else art.tmp
            fit_candidates(Features.open(work / "features"), home / "deep", deep,
                           force=True, progress=progress)  # fmt: skip
            Features.open(work / "features").copy_serving_part(home / "deep-features")
            t = lap("deep_s", t)
            deep_users, deep_items = _deep_source(
                home / "deep-features", home / "deep", split.num_items
            )

        topic = item_topics(split.path, split.num_items)

        def sources(train: Interactions, users: Any, items: np.ndarray | None) -> Sources:
            co = CoWatch(next_n=5, neighbours=100, last_n=5).fit(train, split.num_items)
            pop = np.bincount(train.item, minlength=split.num_items + 1).astype(float)
            return Sources(split.num_items, co, pop, users, items, topic=topic)

        page_sources = sources(before, deep_users, deep_items)
        serve_users, serve_items = deep_users, deep_items
        if refit_deep:
            full = work / "features-all"
            build_features(split.path, full, split="last",
                           config=load_config(FeaturesConfig, None,
                                              ["cap=none", *feature_overrides]),
                           force=True, progress=progress)  # fmt: skip
            fit_candidates(Features.open(full), art.tmp / "deep", deep, force=True,
                           progress=progress)  # fmt: skip
            Features.open(full).copy_serving_part(art.tmp / "deep-features")
            serve_users, serve_items = _deep_source(
                art.tmp / "deep-features", art.tmp / "deep", split.num_items
            )
            t = lap("deep_refit_s", t)
        serve = sources(split.train, serve_users, serve_items) if fit_cfg.refit else page_sources

        f = SequenceFunnel(page_sources, funnel_cfg)
        valid = split.requests("train", split.valid_ts)
        staged = f.stage(page_req, page_next, valid, split.valid_target, valid_sources=serve,
                         progress=progress)  # fmt: skip
        t = lap("pages_s", t)
        f.fit_staged(staged, on_epoch=on_epoch)
        lap("ranker_s", t)
        f.summary["fit_config"] = asdict(fit_cfg)
        f.summary["deep_retrained"] = refit_deep
        f.summary["page_moment_share"] = round(held_share, 4)
        f.summary["timings"] = {**timings, "total_s": round(time.perf_counter() - started, 3)}
        _save(f, art.tmp, split)
        art.commit()
    except BaseException:
        art.abort()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loaded = load_sequence_funnel(out)
    loaded.summary["history"] = f.summary.get("history", [])
    return loaded


def _training_dataset(split: SequenceSplit, out: Path) -> Path:
    """A funnelrec dataset of `split`'s training watches only (users, items, id maps and
    the training rows of the watches table)."""
    ds = Dataset.open(split.path)
    rows = np.sort(split.train_rows)
    with DatasetWriter(
        out, source=f"{ds.manifest.source}+training-part", force=True,
        synthetic_timestamps=bool(ds.manifest.synthetic_timestamps),
    ) as w:  # fmt: skip
        for name in ("users", "items"):
            if ds.has(name):
                w.write(name, ds.table(name))
        w.write("watches", ds.table("watches").take(pa.array(rows)))
        for space in ds.manifest.id_maps:
            w.add_id_map(space, ds.id_map(space).sort_by("id").column("raw_id"))
    return out


def _pages(split: SequenceSplit, moments: int) -> tuple[Requests, np.ndarray, Interactions]:
    """The pages' requests (each user's last `moments` training watches, fewer for short
    histories: one stays training; users with fewer than three training watches have
    none), their next items, and the training watches before them."""
    tr = split.train
    start = user_offsets(tr.user)
    n_user = np.diff(start)[tr.user]
    back = np.arange(tr.user.size) - start[tr.user] - n_user + 1  # 0 = the last
    held = np.minimum(moments - 1, n_user - 2) + 1
    moment = (n_user >= MIN_INTERACTIONS) & (back > -held)
    before = Interactions(tr.user[~moment], tr.item[~moment], tr.ts[~moment])
    pos = np.flatnonzero(moment)
    lo = start[tr.user[pos]]
    since = None if split.synthetic_timestamps else (tr.ts[pos] - tr.ts[pos - 1]).astype(float)
    req = Requests(tr.user[pos], jagged_ranges(tr.item, lo, pos), since)
    return req, tr.item[pos], before


def _deep_source(feat_dir: Path, art: Path, num_items: int) -> tuple[Any, np.ndarray]:
    """The candidate model of `art` as a deep source: (user vectors at example age 0 from
    a history, as served, and item vectors [N + 1, d], 0 for items it does not know)."""
    feats = Features.open(feat_dir)
    model = load_candidate_model(art)
    model.eval()
    emb, ids = load_item_embeddings(art)
    items = np.zeros((num_items + 1, emb.shape[1]), dtype=np.float32)
    items[ids.numpy()] = emb.numpy()

    def users(u: np.ndarray, h: Jagged) -> np.ndarray:
        hist = [h.values[h.offsets[i] : h.offsets[i + 1]].tolist() for i in range(u.size)]
        with torch.no_grad():
            return model(feats.candidate_batch(hist)).float().numpy()

    return users, items


# ---------------------------------------------------------------------------------------
# The artifact


def _save(f: SequenceFunnel, root: Path, split: SequenceSplit) -> None:
    assert f.model is not None and f.normalizer is not None
    src = f.sources
    save_file(
        {k: v.contiguous() for k, v in f.model.state_dict().items()},
        str(root / "ranker.safetensors"),
    )
    arrays = {"popularity": torch.from_numpy(np.ascontiguousarray(src.popularity))}
    if src.topic is not None:
        arrays["topic"] = torch.from_numpy(np.ascontiguousarray(src.topic))
    save_file(arrays, str(root / "sources.safetensors"))
    src.cowatch.save(root / "cowatch")
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != META
    )
    summary = {k: v for k, v in f.summary.items() if k != "history"}
    write_json_atomic(
        root / META,
        {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "created_by": f"funnelrec {__version__}",
            "config": asdict(f.config),
            "num_items": src.num_items,
            "deep": src.deep_users is not None,
            "times": f.times,
            "feature_names": f.feature_names(),
            "normalizer": f.normalizer.to_dict(),
            "dataset": {"path": str(split.path.resolve()), "name": split.name, **split.stats},
            "summary": summary,
            "sha256": {rel: file_sha256(root / rel) for rel in files},
        },
    )


def is_sequence_funnel(path: Path | str) -> bool:
    """Whether `path` holds a sequence funnel artifact (by its metadata's kind)."""
    try:
        return json.loads((Path(path) / META).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def read_sequence_meta(path: Path | str) -> dict[str, Any]:
    """The artifact's metadata, refused unless it is a sequence funnel of this format."""
    return read_artifact_meta(path, META, KIND, FORMAT_VERSION, "sequence funnel")


def load_sequence_funnel(path: Path | str) -> SequenceFunnel:
    """Read a funnel written by `fit_sequence_funnel`, every file's sha256 checked against
    the metadata and the ranker's weights checked finite."""
    path = Path(path)
    meta = read_sequence_meta(path)
    hashes = meta.get("sha256")
    if not isinstance(hashes, dict) or not hashes:
        raise ArtifactError(f"{path / META}: no content hashes")
    found = sorted(
        str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != META
    )
    if found != sorted(hashes):
        extra, missing = set(found) - set(hashes), set(hashes) - set(found)
        raise ArtifactError(
            f"{path}: files differ from the metadata (missing: {sorted(missing)[:5]}, "
            f"unexpected: {sorted(extra)[:5]})"
        )
    for rel, digest in hashes.items():
        if file_sha256(path / rel) != digest:
            raise ArtifactError(f"{path / rel}: content does not match its sha256 in {META}")
    try:
        config = SequenceFunnelConfig(**meta["config"])
        n = int(meta["num_items"])
        arrays = load_file(str(path / "sources.safetensors"))
        state = load_file(str(path / "ranker.safetensors"))
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise ArtifactError(f"{path}: malformed sequence funnel ({e!r})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise ArtifactError(f"{path / 'ranker.safetensors'}: non-finite weights in {bad[:3]}")
    cowatch = load_baseline(path / "cowatch")
    if not isinstance(cowatch, CoWatch):
        raise ArtifactError(f"{path / 'cowatch'}: not a co-watch model")
    users, items = (
        _deep_source(path / "deep-features", path / "deep", n) if meta.get("deep") else (None, None)
    )
    topic = arrays.get("topic")
    sources = Sources(
        n, cowatch, arrays["popularity"].numpy(), users, items,
        topic=None if topic is None else topic.numpy(),
    )  # fmt: skip
    f = SequenceFunnel(sources, config)
    f.times = bool(meta["times"])
    f.normalizer = QuantileNormalizer.from_dict(meta["normalizer"], where=path / META)
    if f.feature_names() != meta["feature_names"]:
        raise ArtifactError(f"{path / META}: feature names do not match this funnelrec's")
    model = f.new_model()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ArtifactError(
            f"{path / 'ranker.safetensors'}: does not fit the network ({e})"
        ) from None
    model.eval()
    f.model = model
    f.summary = dict(meta.get("summary", {}))
    return f


# ---------------------------------------------------------------------------------------
# Evaluation


@dataclass
class SequenceReport:
    """The funnel's HR@K and NDCG@K on one held-out watch per user."""

    split: str
    users: int
    metrics: dict[str, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_sequence_funnel(
    f: SequenceFunnel,
    split: SequenceSplit,
    *,
    which: str = "test",
    ks: Sequence[int] = (10, 50),
    limit: int | None = None,
) -> SequenceReport:
    """Serve each evaluated user (history: training and, for the test, validation items;
    made at the held-out watch's time) and score where the held-out item lands in the
    funnel's list: HR@K (one target per user, so also recall@K) and NDCG@K. The pools
    leave out the history's items, and a held-out item the user watched before counts as a
    miss (it is never served)."""
    if which not in ("test", "valid"):
        raise FunnelrecError(f"split must be test or valid, got {which!r}")
    if not ks or min(ks) < 1:
        raise FunnelrecError(f"cut-offs must be >= 1, got {list(ks)}")
    started = time.perf_counter()
    if which == "test":
        req, target = split.requests("+val", split.target_ts), split.target
    else:
        req, target = split.requests("train", split.valid_ts), split.valid_target
    if limit is not None:
        idx = np.arange(min(limit, len(req)))
        req, target = req.subset(idx), target[idx]
    ids, _ = f.recommend(req, max(ks))
    hit = ids == target[:, None]
    place = np.where(hit.any(axis=1), hit.argmax(axis=1), np.iinfo(np.int64).max)
    metrics: dict[str, float] = {}
    for k in sorted(set(ks)):
        inside = place < k
        metrics[f"hr@{k}"] = float(inside.mean())
        gain = np.where(inside, 1.0 / np.log2(np.minimum(place, k) + 2.0), 0.0)
        metrics[f"ndcg@{k}"] = float(gain.mean())
    return SequenceReport(which, int(target.size), metrics, time.perf_counter() - started)


def save_report(report: SequenceReport, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report.to_dict())
    return path


__all__ = [
    "FORMAT_VERSION",
    "SequenceFitConfig",
    "SequenceReport",
    "SequenceSplit",
    "evaluate_sequence_funnel",
    "fit_sequence_funnel",
    "is_sequence_funnel",
    "item_topics",
    "jagged_ranges",
    "load_sequence_funnel",
    "read_sequence_meta",
    "read_sequence_split",
    "save_report",
]
