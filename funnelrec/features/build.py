"""Building a features directory: fit the transforms, write both stages' examples.

    build_features(DATA, FEAT, split="last", config=FeaturesConfig())

Small data is read whole and built as one block. Data of more than `block_events` events
is cut into blocks of users (`partition.py`) and built in three passes (partition, fit,
write), resumably, with the per-block work on an engine (`engines.py`: this process,
`--workers` local processes, or a Dask cluster). What an example holds, and how each
feature is computed, is the rest of `funnelrec.features`; this module runs those functions
over the data and writes the directory that `reader.Features` reads:

- `fit.py`: the split, the training part's counts and the transforms fitted from them;
- `write.py`: one block's example shards of both stages;
- `finish.py`: the blocks' results summed, the ranking normaliser, the manifest;
- `blocked.py`: the build over blocks of users, resumable, on an engine;
- `engines.py`: where the per-block work runs (local processes or a Dask cluster).

This file holds `build_features` and the in-memory build (the whole dataset as one block).

`data` and `out` may be URIs of any filesystem (`funnelrec.filesystems`: `s3://`, `gs://`,
any fsspec scheme). A local `out` is built in a hidden folder beside it and renamed into
place. An object store has no atomic rename: the build is made in a local staging folder
(in the temporary directory, named after `out`, so that an interrupted build in blocks
resumes there), then uploaded with its manifest last; `Features.open` refuses a folder
without its manifest, so readers never see a half-uploaded build.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from funnelrec.data.dataset import AtomicDirectory, Dataset, write_json_atomic
from funnelrec.engines import Engine, LocalEngine, local_path
from funnelrec.errors import DataError, FunnelrecError
from funnelrec.features import MANIFEST, REQUESTS, FeaturesConfig
from funnelrec.features.blocked import _BlockedBuild
from funnelrec.features.content import CONTENT_VOCABS, ContentFit, fit_item_content
from funnelrec.features.finish import _finish, _split_meta
from funnelrec.features.fit import _count_block, _Counts, _fit_transforms, _split, _time_bounds
from funnelrec.features.partition import EVENT_TABLES, CountIndex
from funnelrec.features.reader import Features
from funnelrec.features.splits import TRAIN
from funnelrec.features.tables import _read_log
from funnelrec.features.update import (
    FeaturesUpdate,
    extend_transforms,
    pinned_config,
    ranking_normalizer,
)
from funnelrec.features.write import _Bars, _BlockOut, _write_block
from funnelrec.filesystems import require_empty, resolve, upload_tree
from funnelrec.progress import progress_bar


def build_features(
    data: Path | str | Dataset,
    out: Path | str,
    *,
    split: Literal["last", "time"] = "last",
    config: FeaturesConfig | None = None,
    force: bool = False,
    progress: bool = True,
    impressions: pa.Table | None = None,
    workers: int = 1,
    update: FeaturesUpdate | None = None,
    engine: Engine | None = None,
) -> Path | str:
    """Fit transforms on the training part of `data` and write example shards to `out`.

    `impressions` replaces the dataset's impressions table as the source of ranking
    examples, e.g. slates of retrieved candidates for data that has none
    (`funnelrec.ranking.pages`). It has
    the canonical impression columns and may add `cand_score` (float, the candidate
    generator's score: a continuous feature) and `cand_source` (string, which generator
    nominated the item: a categorical feature with its own vocabulary "source").

    Data with more than `config.block_events` events is built in blocks of users (see
    `partition.py`), in a folder beside `out` that a later call with the same data and config
    resumes after an interruption. `workers` processes build blocks side by side
    (each holds one block in memory; the examples are the same for any number).
    `engine`: where the blocks are built instead (`engines.DaskEngine`: a Dask cluster);
    the examples are the same on every engine. Data of at most `block_events` events is
    one block, built in this process on any engine. `data` and `out`: local paths or
    URIs of any filesystem (see the module docstring); returns `out` (a URI as given).

    `update`: extend the features at `update.base` instead of fitting anew, for a model
    to continue training from them (`update.py`: vocabularies extended, embedding widths
    pinned, normalisers kept with their drift reported, the new period's examples plus a
    replay sample of older ones). `config` None: the config of `update.base`.
    """
    ds = data if isinstance(data, Dataset) else Dataset.open(data)
    if split not in ("last", "time"):
        raise FunnelrecError(f"split must be 'last' or 'time', got '{split}'")
    if engine is not None and workers != 1:
        raise FunnelrecError(
            f"workers={workers} is for the local engine; the {engine.name} engine's "
            "workers are its cluster's"
        )
    dest = resolve(out)
    if update is not None and _same_place(update.base, dest.uri):
        raise FunnelrecError(f"{dest.uri}: a features update writes a new directory")
    args = (split, config, progress, impressions, workers, update, engine)
    if dest.is_local:
        return _build_here(ds, local_path(out), *args, force=force)
    require_empty(dest, force=force, marker=MANIFEST)
    staging = _staging_folder(dest.uri)
    _build_here(ds, staging, *args, force=True)
    upload_tree(staging, dest, marker=MANIFEST)
    shutil.rmtree(staging.parent, ignore_errors=True)
    return dest.uri


def _same_place(a: Path | str, b: Path | str) -> bool:
    la, lb = resolve(a), resolve(b)
    if la.is_local and lb.is_local:
        return la.local.resolve() == lb.local.resolve()
    return la.uri.rstrip("/") == lb.uri.rstrip("/")


def _staging_folder(uri: str) -> Path:
    """Where a build for `uri` on another filesystem is made before its upload: the same
    folder for the same `uri`, so that an interrupted build in blocks resumes."""
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"funnelrec-staging-{key}" / "features"


def _build_here(
    ds: Dataset,
    out: Path,
    split: Literal["last", "time"],
    config: FeaturesConfig | None,
    progress: bool,
    impressions: pa.Table | None,
    workers: int,
    update: FeaturesUpdate | None,
    engine: Engine | None,
    *,
    force: bool,
) -> Path:
    """The build into the local folder `out`."""
    cfg = config or FeaturesConfig()
    n_events = sum(ds.num_rows(name) for name in EVENT_TABLES if ds.has(name))
    base = None
    if update is not None:
        base = update.open_base()
        if base.split != split:
            raise FunnelrecError(
                f"{base.path} was built with --split {base.split}; update it with the same"
            )
        cfg = pinned_config(config or base.config, base)
        if impressions is None and n_events > cfg.block_events:
            raise FunnelrecError(
                f"{ds.path}: a features update builds in memory, and the data has "
                f"{n_events:,} events, more than block_events={cfg.block_events:,}"
            )
    if impressions is None and n_events > cfg.block_events:
        if out.exists() and not force:
            raise DataError(f"{out} already exists (use --force to overwrite)")
        engine = engine or LocalEngine(workers)
        return _BlockedBuild(ds, out, split, cfg, progress, n_events, engine).run(force=force)
    if engine is not None and engine.name != "local" and progress:
        why = (
            "given impressions are built in memory"
            if impressions is not None
            else f"{n_events:,} events, at most block_events={cfg.block_events:,}"
        )
        print(f"built as one block in this process, not on the {engine.name} engine: {why}")
    target = AtomicDirectory(out, force=force)
    try:
        manifest = _build_in_memory(ds, target.tmp, split, cfg, progress, impressions, update, base)
        write_json_atomic(target.tmp / MANIFEST, manifest)
        target.commit()
    except BaseException:
        target.abort()
        raise
    return out


def _build_in_memory(
    ds: Dataset,
    root: Path,
    split_kind: str,
    cfg: FeaturesConfig,
    progress: bool,
    impressions: pa.Table | None,
    update: FeaturesUpdate | None = None,
    base: Features | None = None,
) -> dict[str, Any]:
    """The whole dataset as one block."""
    t_start = time.perf_counter()
    log = _read_log(ds, impressions, candidate_columns=cfg.candidate_columns)
    bounds = _time_bounds(log.w_ts, cfg) if split_kind == "time" else None
    sp = _split(log, split_kind, cfg, bounds, whole=True)
    if not (sp.part_of_watches(len(log.w_ts)) == TRAIN).any():
        raise DataError(f"{ds.path}: the training part of the split has no watches")
    acc = _Counts()
    _count_block(log, sp, cfg, acc, cfg.seed + 2)
    tf = _fit_transforms(acc, log.users, cfg, ranking=log.imp is not None and cfg.ranking)
    since = None
    if update is not None:
        assert base is not None
        tf = extend_transforms(tf, acc, log.users, cfg, update, base)
        since = update.resolve_since(ds)
    by_item = CountIndex.build(log.w_item, log.w_ts)
    with progress_bar("examples", enabled=progress) as bar:
        out = _BlockOut(
            root=root,
            prefix="part-",
            requests=REQUESTS,
            request_offset={},
            quantile_quota=cfg.quantile_sample,
            seed=cfg.seed,
            rank_seed=cfg.seed + 1,
            cap_seed=cfg.seed + 2,
            progress=_Bars(bar, reuse=False),
            train_since=since,
            replay=update.replay if update is not None else 1.0,
        )
        res = _write_block(log, sp, tf, by_item, cfg, out)
    content = fit_item_content(
        ds.table("items"),
        tf.item,
        tf.t_max,
        cfg,
        previous=_previous_content(base),
        keep_scale=update is not None and not update.refit_normalizers,
    )
    if update is not None and base is not None:
        growth = update.report.setdefault("vocab_growth", {})
        old_vocabs = base.manifest["vocabularies"]
        for name, v in content.vocabs.items():
            if name in old_vocabs:
                growth[name] = {"old": int(old_vocabs[name]["size"]), "new": len(v)}
    timing = {"total_s": time.perf_counter() - t_start, "blocks": 1}
    manifest = _finish(
        root,
        ds,
        _split_meta(split_kind, cfg, sp, acc.held_out_users),
        cfg,
        tf,
        [res],
        acc.rank_columns if log.imp is not None else [],
        bool(log.s_user.size),
        timing,
        ranking_normalizer=(
            None
            if update is None or base is None
            else lambda fresh, data: ranking_normalizer(fresh, data, update, base)
        ),
        content=content,
    )
    if manifest["ranking"].get("available"):
        manifest["ranking"]["impressions"] = "given" if impressions is not None else "dataset"
    if update is not None and base is not None:
        manifest["update"] = {
            "extends": {"path": str(base.path), "fingerprint": base.fingerprint},
            "normalizers": "refitted" if update.refit_normalizers else "kept",
            "since": since,
            "replay": update.replay,
            "train_examples": {
                "new": int(res.sums.get("train_new", manifest["counts"]["candidates"]["train"])),
                "replayed": int(res.sums.get("train_replayed", 0)),
            },
            **update.report,
        }
    return manifest


def _previous_content(base: Features | None) -> ContentFit | None:
    """The item content of the features an update extends (None: none, or no update)."""
    if base is None or not base.has_item_content:
        return None
    names = [n for n in CONTENT_VOCABS.values() if n in base.manifest["vocabularies"]]
    return ContentFit({n: base.vocab(n) for n in names}, base.item_content())
