"""The last step of a build: sum the blocks' results, fit the ranking normaliser on
their samples, write the last transforms, and return the manifest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from funnelrec import __version__
from funnelrec.data.dataset import Dataset
from funnelrec.features import (
    CANDIDATE_SCORE,
    FORMAT_VERSION,
    RANKING_CONTINUOUS,
    FeaturesConfig,
)
from funnelrec.features.content import CONTENT_FILE, ContentFit, content_spec
from funnelrec.features.fit import _Transforms
from funnelrec.features.normalize import QuantileNormalizer
from funnelrec.features.splits import PART_NAMES, Split
from funnelrec.features.vocab import Vocabulary
from funnelrec.features.write import _BlockResult

_NormalizerChoice = Callable[[QuantileNormalizer, dict[str, np.ndarray]], QuantileNormalizer]


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def _finish(
    root: Path,
    ds: Dataset,
    sp_meta: dict[str, Any],
    cfg: FeaturesConfig,
    tf: _Transforms,
    results: list[_BlockResult],
    rank_columns: list[str],
    has_searches: bool,
    timing: dict[str, Any],
    ranking_normalizer: _NormalizerChoice | None = None,
    content: ContentFit | None = None,
) -> dict[str, Any]:
    """Sum the blocks' results; write the last transforms; return the manifest.

    ranking_normalizer: (freshly fitted normaliser, the values it was fitted on) -> the one
    to use (a features update keeps the previous one). content: the item content table
    and its vocabularies (`content.fit_item_content`), written beside the rest."""
    tdir = root / "transforms"
    tdir.mkdir(exist_ok=True)
    sums: dict[str, float] = {}
    for res in results:
        for k, v in res.sums.items():
            sums[k] = sums.get(k, 0.0) + v
    counts: dict[str, dict[str, int]] = {"candidates": {}, "ranking": {}}
    for stage in counts:
        for part_name in PART_NAMES:
            # a block without impressions has no ranking counts: it wrote none
            n = [r.counts[stage].get(part_name) for r in results]
            if any(x is not None for x in n):
                counts[stage][part_name] = int(sum(x for x in n if x is not None))
    oov: dict[str, dict[str, dict[str, float]]] = {"candidates": {}, "ranking": {}}
    for part_name in PART_NAMES:
        c = f"candidates.{part_name}."
        oov["candidates"][part_name] = {
            "label": _ratio(sums[c + "label_oov"], sums[c + "labels"]),
            "history": _ratio(sums[c + "history_oov"], sums[c + "history_ids"]),
            "search": _ratio(sums[c + "search_oov"], sums[c + "search_ids"]),
        }
    dropped = int(sums["train_dropped_oov"])
    if dropped:
        oov["candidates"]["train"]["label"] = dropped / (dropped + counts["candidates"]["train"])
    label_counts = np.sum([r.label_counts for r in results], axis=0)
    tf.enc.normalizer.save(tdir / "candidates_dense.json")
    pq.write_table(
        pa.table({"id": np.arange(len(tf.item), dtype=np.int64), "count": label_counts}),
        tdir / "item_label_counts.parquet",
    )
    vocabs = tf.vocabs()

    def space(name: str) -> dict[str, Any]:
        v = vocabs[name]
        return {"name": name, "vocab_size": len(v), "dim": cfg.dim(v)}

    candidate_spec = {
        "id_spaces": [space(n) for n in ("item", "token", "region", "device")],
        "categorical": [["region", "region"], ["device", "device"]],
        "bags": [["history", "item"], ["search", "token"]],
        "dense_columns": tf.enc.dense_columns,
        "label": "item",
    }
    ranking: dict[str, Any]
    if not rank_columns:
        ranking = {
            "available": False,
            "reason": "the dataset has no impressions table: `funnelrec features "
            "impressions` makes one from retrieved candidates",
        }
    elif tf.rank is None:
        ranking = {"available": False, "reason": "ranking=false in the features config"}
    else:
        ranking = _ranking_spec(
            root, cfg, tf, vocabs, results, rank_columns, has_searches, ranking_normalizer
        )
        for part_name in PART_NAMES:
            r = f"ranking.{part_name}."
            oov["ranking"][part_name] = {
                "item": _ratio(sums[r + "item_oov"], sums[r + "items"]),
                "history": _ratio(sums[r + "history_oov"], sums[r + "history_ids"]),
            }
    item_content: dict[str, Any] | None = None
    if content is not None:
        vocabs.update(content.vocabs)
        content.table.save(tdir / CONTENT_FILE)
        item_content = content_spec(content)
    for name, vocab in vocabs.items():
        vocab.save(tdir / f"{name}.parquet")
    for stage, key in (("candidates", "candidate"), ("ranking", "ranking")):
        seconds = sums.get(f"seconds.{stage}", 0.0)
        rows = sum(counts[stage].values())
        timing[f"{key}_examples_per_s"] = rows / seconds if seconds and rows else None
    return {
        "format_version": FORMAT_VERSION,
        "created_by": f"funnelrec {__version__}",
        "data": {"path": ds.uri, "fingerprint": ds.fingerprint()},
        "split": {**sp_meta, "train_time_range": [tf.t_min, tf.t_max]},
        "config": asdict(cfg),
        "counts": counts,
        "dropped_train_examples_oov_label": dropped,
        "oov": oov,
        "vocabularies": {
            name: {"size": len(v), "dim": cfg.dim(v), "file": f"transforms/{name}.parquet"}
            for name, v in vocabs.items()
        },
        "candidates": candidate_spec,
        "ranking": ranking,
        **({"item_content": item_content} if item_content is not None else {}),
        "timing": timing,
    }


def _ranking_spec(
    root: Path,
    cfg: FeaturesConfig,
    tf: _Transforms,
    vocabs: dict[str, Vocabulary],
    results: list[_BlockResult],
    rank_columns: list[str],
    has_searches: bool,
    choose: _NormalizerChoice | None = None,
) -> dict[str, Any]:
    """Fit the ranking normaliser on the blocks' samples; the ranking feature spec."""
    assert tf.rank is not None
    raw_names = list(RANKING_CONTINUOUS) + (
        [CANDIDATE_SCORE] if CANDIDATE_SCORE in rank_columns else []
    )
    fit_data = {
        k: np.concatenate([r.samples[k] for r in results if k in r.samples] or [np.zeros(0)])
        for k in raw_names
    }
    normalizer = QuantileNormalizer.fit(
        fit_data,
        n_quantiles=cfg.n_quantiles,
        powers=True,
        nullable=[
            k for k in raw_names if k.endswith("_ago_s") or k in ("item_age_s", "duration_s")
        ],
        max_values=cfg.quantile_sample,
        seed=cfg.seed,
    )
    if choose is not None:
        normalizer = choose(normalizer, fit_data)
    normalizer.save(root / "transforms" / "ranking_dense.json")

    def space(v: Vocabulary) -> dict[str, Any]:
        return {"name": v.name, "vocab_size": len(v), "dim": cfg.dim(v)}

    rv = tf.rank
    spaces = [space(rv.item)]
    categorical = [["item", "rank_item"], ["seed", "rank_item"]]
    for v in (rv.channel, rv.topic):
        if v is not None:
            spaces.append(space(v))
            categorical.append([v.name, v.name])
    if rv.source is not None:
        spaces.append(space(rv.source))
        categorical.append(["source", "source"])
    for name in ("region", "device"):
        spaces.append(space(vocabs[name]))
        categorical.append([name, name])
    bags = [["history", "rank_item"]]
    if has_searches:
        spaces.append(space(vocabs["token"]))
        bags.append(["search", "token"])
    spec = {
        "id_spaces": spaces,
        "categorical": categorical,
        "bags": bags,
        "dense_columns": normalizer.output_columns,
        "power_columns": normalizer.power_columns,
    }
    return {"available": True, "spec": spec, "raw_continuous": raw_names}


def _split_meta(kind: str, cfg: FeaturesConfig, sp: Split, held_out_users: int) -> dict[str, Any]:
    return {
        "kind": kind,
        "t1": sp.t1,
        "t2": sp.t2,
        "min_watches": cfg.min_watches if kind == "last" else None,
        "valid_n": cfg.valid_n if kind == "last" else None,
        "held_out_users": held_out_users if kind == "last" else None,
    }
