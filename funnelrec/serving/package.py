"""`funnelrec package`: everything serving needs, checked to agree, in one artifact directory.

    funnelrec package --features FEAT --candidates CAND --ranker RANKER --out ART
                      [--data DIR] [--config package.toml] [--force] [serving.deep_k=500 ...]

    package(FEAT, CAND, RANKER, ART)                       # the same from Python
    rec = Recommender.load(ART)

What goes in (layout: see `recommender`):
- the features' transforms (vocabularies, normalisers, features.json; no example shards);
- the candidate model and its item embeddings, and an ANN index: the candidate artifact's
  own (CAND/index, checked against the embeddings) or, when it has none, one built here
  (`ann.default_kind` by corpus size; approximate kinds are tuned to recall@100 >= 0.95
  on the validation split's user vectors);
- the ranker;
- the other candidate sources, fitted on the TRAINING part of the features' split only:
  "fresh and popular now" (`baselines.Popularity` with a freshness boost, reference time
  = the end of the data) and "co-watched with the last watch" (`baselines.CoWatch`);
- item metadata with each item's watch count in the data (`item_prior_watches` at
  serving), users' demographics, and the live store's seed: each user's last `state_n`
  watches and queries and their impression counts with the time last shown.

Every part must come from the same data (fingerprints) and fit the same vocabularies;
anything else is refused with an ArtifactError naming the part. The directory is built
under a temporary name, loaded once with `Recommender.load` as a final check, and only
then renamed into place.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funnelrec import __version__
from funnelrec.ann.index import ItemIndex
from funnelrec.baselines import CoWatch, CoWatchConfig, Popularity, PopularityConfig, upload_times
from funnelrec.candidates import INDEX_DIR as CANDIDATE_INDEX_DIR
from funnelrec.candidates import (
    check_features,
    load_item_embeddings,
    read_candidate_config,
    split_user_vectors,
)
from funnelrec.config import load_config
from funnelrec.data.dataset import AtomicDirectory, Dataset, file_sha256, write_json_atomic
from funnelrec.errors import ArtifactError, DataError, FunnelrecError
from funnelrec.features import Features
from funnelrec.features.splits import TRAIN, leave_last_out, time_split, user_offsets
from funnelrec.progress import progress_bar
from funnelrec.ranking.model import RankingFeatureSpec, read_ranker_config
from funnelrec.serving.recommender import (
    ARTIFACT_FORMAT_VERSION,
    ARTIFACT_KIND,
    CANDIDATES_DIR,
    COWATCH_DIR,
    FEATURES_DIR,
    FRESH_DIR,
    INDEX_DIR,
    ITEMS_FILE,
    MANIFEST,
    RANKER_DIR,
    STATE_DIR,
    USERS_FILE,
    Recommender,
    ServingConfig,
    artifact_fingerprint,
)
from funnelrec.serving.state import _last_n_per_user

DAY = 86_400
CANDIDATE_FILES = ("config.json", "model.safetensors", "item_embeddings.safetensors")
RANKER_FILES = ("config.json", "model.safetensors")


def _fresh_default() -> PopularityConfig:
    # "Popular now": a week of watches, each day's weighing half the next day's; an upload
    # a day old has its count x 2.5, a new one x 4 (the simulator's fresh window is 48 h).
    return PopularityConfig(
        window_s=7 * DAY, half_life_s=1.0 * DAY, fresh_half_life_s=1.0 * DAY, fresh_boost=3.0
    )


@dataclass(frozen=True)
class PackageConfig:
    """What `package` fits and records besides the trained models.

    serving:        the candidate counts per source (recommender.ServingConfig), kept in
                    the manifest as the artifact's defaults
    fresh:          the "fresh and popular now" source (baselines.PopularityConfig)
    cowatch:        the "co-watched with the last watch" source (baselines.CoWatchConfig;
                    last_n = 1: scored from the last watch only)
    state_n:        watches and queries per user in the live store's seed [50, the paper's
                    history length: Covington et al. 2016, section 3.2]
    index_target_recall: an index built here is tuned to this recall@100 (approximate
                    kinds; exact needs none)
    index_queries:  validation user vectors used for that tuning
    """

    serving: ServingConfig = field(default_factory=ServingConfig)
    fresh: PopularityConfig = field(default_factory=_fresh_default)
    cowatch: CoWatchConfig = field(default_factory=CoWatchConfig)
    state_n: int = 50
    index_target_recall: float = 0.95
    index_queries: int = 2000

    def __post_init__(self) -> None:
        if self.state_n < 1:
            raise FunnelrecError(f"package config: state_n must be >= 1, got {self.state_n}")
        if self.fresh.fresh_half_life_s is None:
            raise FunnelrecError("package config: fresh.fresh_half_life_s must be set")


def load_package_config(
    path: Path | str | None = None, overrides: Sequence[str] = ()
) -> PackageConfig:
    """Defaults, then a TOML file ([serving], [fresh], [cowatch] sections), then overrides
    such as `serving.deep_k=500` or `cowatch.neighbours=50`."""
    return load_config(PackageConfig, path, overrides)


def package(
    features: Path | str,
    candidates: Path | str,
    ranker: Path | str,
    out: Path | str,
    *,
    data: Path | str | None = None,
    config: PackageConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the serving artifact `out` from trained parts (see the module docstring).

    features:   the features both models were trained on; data: its dataset (default: the
    path recorded in the features). Returns `out`.
    """
    cfg = config or PackageConfig()
    feat_dir, cand_dir, rank_dir = Path(features), Path(candidates), Path(ranker)
    feats = Features.open(feat_dir)
    ds = Dataset.open(Path(data) if data is not None else Path(feats.manifest["data"]["path"]))
    feats.check_dataset(ds)
    fp = feats.fingerprint
    if not feats.has_ranking:
        raise ArtifactError(
            f"{feat_dir}: no ranking examples ({feats.manifest['ranking'].get('reason')}), "
            "so no ranker can have been trained on these features"
        )
    cand_meta = read_candidate_config(cand_dir)
    check_features(cand_meta, feats, cand_dir)
    rank_meta = read_ranker_config(rank_dir)
    rank_fp = rank_meta.get("data", {}).get("fingerprint")
    if rank_fp != fp:
        raise ArtifactError(
            f"{rank_dir} was trained on data with fingerprint {rank_fp}, {feat_dir} was built "
            f"from {fp}"
        )
    if rank_meta.get("spec") != RankingFeatureSpec.from_dict(feats.ranking_spec).to_dict():
        raise ArtifactError(f"{rank_dir}: its feature spec differs from that of {feat_dir}")
    now = ds.manifest.time_range.get("max_ts")
    if now is None:
        raise DataError(f"{ds.path}: the dataset records no time range")

    steps = [
        "features",
        "candidate model",
        "ANN index",
        "ranker",
        "candidate sources",
        "items and users",
        "live state seed",
        "check",
    ]
    bar = progress_bar(None, enabled=progress)
    target = AtomicDirectory(Path(out), force=force)
    root = target.tmp
    try:
        with bar:
            task = bar.add_task(f"package: {steps[0]}", total=len(steps))

            def done(i: int) -> None:
                step = steps[min(i + 1, len(steps) - 1)]
                bar.update(task, advance=1, description=f"package: {step}")

            feats.copy_serving_part(root / FEATURES_DIR)
            done(0)
            (root / CANDIDATES_DIR).mkdir()
            for name in CANDIDATE_FILES:
                shutil.copy2(cand_dir / name, root / CANDIDATES_DIR / name)
            done(1)
            index_meta = _index(cand_dir, feat_dir, root / INDEX_DIR, cfg)
            done(2)
            (root / RANKER_DIR).mkdir()
            for name in RANKER_FILES:
                shutil.copy2(rank_dir / name, root / RANKER_DIR / name)
            done(3)
            items = ds.table("items")
            n_items = int(pc.max(items.column("item_id")).as_py())
            train = training_watches(ds, feats)
            if train.num_rows and int(pc.max(train.column("item_id")).as_py()) > n_items:
                raise DataError(f"{ds.path}: watches name item ids missing from the items table")
            sources = _fit_sources(train, items, n_items, int(now), root, cfg)
            done(4)
            counts = _items_and_users(ds, items, n_items, root)
            done(5)
            counts.update(_state(ds, root / STATE_DIR, cfg.state_n))
            done(6)

            files = _files(root)
            hashes = {rel: file_sha256(root / rel) for rel in files}
            manifest = {
                "format_version": ARTIFACT_FORMAT_VERSION,
                "kind": ARTIFACT_KIND,
                "funnelrec_version": __version__,
                "created_by": f"funnelrec {__version__}",
                "fingerprint": artifact_fingerprint(hashes, fp),
                "data": {
                    "fingerprint": fp,
                    # the data versions this one extends by appended periods, oldest first
                    "lineage": [
                        str(p["extends"])
                        for p in ds.manifest.extra.get("periods") or []
                        if p.get("extends")
                    ],
                    "path": str(ds.path),
                    "source": ds.manifest.source,
                    "now": int(now),
                    "time_range": ds.manifest.time_range,
                },
                "features": {"path": str(feat_dir), "split": feats.split},
                "candidates": {
                    "path": str(cand_dir),
                    "dim": cand_meta.get("dim"),
                    "num_items": cand_meta.get("num_items"),
                    "model": cand_meta.get("model"),
                    "index": index_meta,
                },
                "ranker": {"path": str(rank_dir), "config": rank_meta.get("config")},
                "sources": sources,
                "serving": asdict(cfg.serving),
                "package_config": asdict(cfg),
                "counts": counts,
                "files": files,
                "sha256": hashes,
            }
            write_json_atomic(root / MANIFEST, manifest)
            Recommender.load(root)  # the final check: every part loads and agrees
            done(7)
        target.commit()
    except BaseException:
        target.abort()
        raise
    return Path(out)


# --------------------------------------------------------------------------- parts


def _index(cand_dir: Path, feat_dir: Path, dst: Path, cfg: PackageConfig) -> dict[str, Any]:
    emb, item_ids = load_item_embeddings(cand_dir)
    ids = item_ids.numpy()
    own = cand_dir / CANDIDATE_INDEX_DIR
    if own.exists():
        index = ItemIndex.load(own, expected_dim=int(emb.shape[1]), expected_item_ids=ids)
        shutil.copytree(own, dst)
        return {**index.metadata(), "built_by": "candidates artifact"}
    index = ItemIndex.build(emb.numpy(), ids)
    if index.kind != "exact" and cfg.index_target_recall > 0:
        uv = split_user_vectors(cand_dir, feat_dir, "valid", limit=20 * cfg.index_queries)
        q = uv.vectors.numpy()
        if len(q) > cfg.index_queries:
            rng = np.random.default_rng(0)
            q = q[np.sort(rng.choice(len(q), cfg.index_queries, replace=False))]
        if len(q):
            index.tune(
                q,
                k=min(100, index.count),
                target_recall=cfg.index_target_recall,
                query_source=f"{feat_dir} valid user vectors",
            )
    index.save(dst)
    return {**index.metadata(), "built_by": "package"}


def training_watches(ds: Dataset, feats: Features) -> pa.Table:
    """The watches of the training part of the features' split (user_id, item_id, ts),
    sorted by user then time: what the other candidate sources may be fitted on."""
    w = ds.table("watches", ["user_id", "item_id", "ts"])
    user = np.asarray(w.column("user_id").to_numpy(), dtype=np.int64)
    item = np.asarray(w.column("item_id").to_numpy(), dtype=np.int64)
    ts = np.asarray(w.column("ts").to_numpy(), dtype=np.int64)
    order = np.lexsort((ts, user))  # stable: the features' order of equal (user, ts)
    user, item, ts = user[order], item[order], ts[order]
    start = user_offsets(user)
    split = feats.manifest["split"]
    if split["kind"] == "last":
        # features written before valid_n existed held out one validation watch
        valid_n = int(split.get("valid_n") or 1)
        sp = leave_last_out(start, ts, min_watches=int(split["min_watches"]), valid_n=valid_n)
    else:
        sp = time_split(start, ts, int(split["t1"]), int(split["t2"]))
    keep = sp.part_of_watches(len(ts)) == TRAIN
    return pa.table({"user_id": user[keep], "item_id": item[keep], "ts": ts[keep]})


def _fit_sources(
    train: pa.Table, items: pa.Table, n_items: int, now: int, root: Path, cfg: PackageConfig
) -> dict[str, Any]:
    f = cfg.fresh
    if "upload_ts" in items.column_names:
        upload = upload_times(items, n_items)
    else:
        upload = np.full(n_items + 1, np.nan)  # no upload times: no freshness boost
    fresh = Popularity(
        f.window_s,
        f.half_life_s,
        fresh_half_life_s=f.fresh_half_life_s,
        fresh_boost=f.fresh_boost,
        fresh_prior=f.fresh_prior,
    ).fit(train, n_items, now=now, upload_ts=upload)
    c = cfg.cowatch
    cowatch = CoWatch(
        c.next_n,
        c.window_s,
        c.neighbours,
        target_power=c.target_power,
        last_n=c.last_n,
        last_decay=c.last_decay,
    ).fit(train, n_items)
    fresh.save(root / FRESH_DIR)
    cowatch.save(root / COWATCH_DIR)
    return {
        "fitted_on": f"training part of the split ({train.num_rows} watches)",
        "fresh": {**asdict(f), "now": now},
        "cowatch": asdict(c),
    }


def _items_and_users(ds: Dataset, items: pa.Table, n_items: int, root: Path) -> dict[str, int]:
    ids = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
    watched = np.asarray(ds.table("watches", ["item_id"]).column("item_id").to_numpy())
    counts = np.bincount(watched, minlength=n_items + 1)
    out = items.append_column("watches", pa.array(counts[ids], type=pa.int64()))
    if "item" in ds.manifest.id_maps:
        m = ds.id_map("item")
        raw = np.full(n_items + 1, None, dtype=object)
        mid = np.asarray(m.column("id").to_numpy(), dtype=np.int64)
        ok = mid <= n_items
        raw[mid[ok]] = np.asarray(m.column("raw_id").to_pylist(), dtype=object)[ok]
        out = out.append_column("raw_id", pa.array(raw[ids].tolist(), type=pa.string()))
    pq.write_table(out, root / ITEMS_FILE, compression="zstd")
    users = ds.table("users")
    pq.write_table(users, root / USERS_FILE, compression="zstd")
    return {"items": items.num_rows, "users": users.num_rows}


def _state(ds: Dataset, dst: Path, n: int) -> dict[str, int]:
    """Each user's last n watches and queries, and every (user, item) impression count
    with the time last shown: the live store's seed (`Recommender.seed_state`)."""
    dst.mkdir(parents=True)
    cols = ["user_id", "item_id", "ts"] + (
        ["watch_time_s"] if "watch_time_s" in ds.columns("watches") else []
    )
    watches = _last_n_per_user(ds.table("watches", cols), n)
    if "watch_time_s" not in watches.column_names:
        watches = watches.append_column("watch_time_s", pa.nulls(watches.num_rows, pa.float32()))
    pq.write_table(watches, dst / "watches.parquet", compression="zstd")
    if ds.has("searches"):
        searches = _last_n_per_user(ds.table("searches", ["user_id", "ts", "query"]), n)
    else:
        searches = pa.table(
            {
                "user_id": pa.array([], pa.int64()),
                "ts": pa.array([], pa.int64()),
                "query": pa.array([], pa.string()),
            }
        )
    pq.write_table(searches, dst / "searches.parquet", compression="zstd")
    if ds.has("impressions"):
        impressions = impression_counts(ds.table("impressions", ["user_id", "item_id", "ts"]))
    else:
        impressions = IMPRESSION_COUNTS_SCHEMA.empty_table()
    pq.write_table(impressions, dst / "impressions.parquet", compression="zstd")
    return {
        "state_watches": watches.num_rows,
        "state_searches": searches.num_rows,
        "state_impression_pairs": impressions.num_rows,
    }


IMPRESSION_COUNTS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("shown", pa.int64()),
        ("last_ts", pa.int64()),
    ]
)


def impression_counts(impressions: pa.Table) -> pa.Table:
    """Every (user, item) pair of `impressions` (user_id, item_id, ts) with how often it
    was shown and when last, sorted by user then item.

    One sort of a combined key, which costs less CPU than Arrow's hash group-by followed
    by a sort of its result: the daily update packages every day, over every impression
    of the dataset."""
    user = np.asarray(impressions.column("user_id").to_numpy(), dtype=np.int64)
    item = np.asarray(impressions.column("item_id").to_numpy(), dtype=np.int64)
    ts = np.asarray(impressions.column("ts").to_numpy(), dtype=np.int64)
    if not len(user):
        return IMPRESSION_COUNTS_SCHEMA.empty_table()
    if min(int(user.min()), int(item.min())) < 0:
        raise DataError("impressions: negative user or item ids")
    width = int(item.max()) + 1
    if int(user.max()) >= np.iinfo(np.int64).max // width:  # the key would overflow
        order = np.lexsort((item, user))
    else:
        order = np.argsort(user * width + item, kind="stable")
    user, item, ts = user[order], item[order], ts[order]
    new_pair = np.ones(len(user), dtype=bool)
    new_pair[1:] = (user[1:] != user[:-1]) | (item[1:] != item[:-1])
    start = np.flatnonzero(new_pair)
    return pa.table(
        [
            user[start],
            item[start],
            np.diff(np.append(start, len(user))).astype(np.int64),
            np.maximum.reduceat(ts, start),
        ],
        schema=IMPRESSION_COUNTS_SCHEMA,
    )


def _files(root: Path) -> dict[str, int]:
    """Every file of the artifact (but the manifest) -> its size in bytes."""
    return {
        p.relative_to(root).as_posix(): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
