"""Impressions for data that has none, synthesised from the candidate model's retrievals.

MovieLens, Amazon and other sequence files log what users watched (rated, bought), never
what they were shown, so there is nothing to train a ranker on (ranking learns from
impressions: shown, clicked or not, watched for how long; Covington et al. 2016, section
4). Here the funnel is staged instead: for every candidate-generation example of the
features (a user at the time t of one of their watches, with only the history before t),
the trained candidate model retrieves its top k items, and those become one page
(request) of impressions at time t:

- the item the user actually watched at t is the click (a positive), with the watch's
  `watch_time_s` as its watch time, or 1 second when the data has none (then the ranker's
  weights are all 1 and it learns which candidate is watched next);
- the other retrieved items are shown-but-not-watched negatives (watch time 0);
- a moment whose watched item is not among the top k gets no page. Putting the watch on
  the page anyway would make the click the one item the candidate model did not retrieve,
  and every feature that follows retrieval would give it away: "times already shown" most
  of all (the negatives are the same top k that earlier pages showed again and again, the
  inserted click was rarely shown), but also popularity and age (the model favours popular,
  older items). A ranker trained on such pages learns to find the odd one out, which no
  served page has. Positions are retrieval ranks (not a ranking feature).

The result is a new dataset: every table of the source (users, items, watches, searches,
id maps) plus this `impressions` table, so `funnelrec features build` then builds ranking
examples from it like from logged impressions, with the same split kind.

Caveats, by construction: training examples' pages come from a model that was trained on
those very watches, so their watches are retrieved (and get a page) more often than
held-out ones; only the moments the candidate model got right have pages, so a weak model
or a small k leaves few; and "times already shown" counts earlier synthetic pages, not
real exposure.

    impressions_from_candidates(DATA, FEAT, CAND_ART, OUT, k=20)
    funnelrec features build --data OUT --split last --out FEAT2
    funnelrec train ranker --features FEAT2 --out RANKER
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from funnelrec.ann.index import ItemIndex
from funnelrec.candidates import (
    check_features,
    load_candidate_model,
    load_item_embeddings,
    read_candidate_config,
)
from funnelrec.data.dataset import Dataset, DatasetWriter
from funnelrec.errors import FunnelrecError
from funnelrec.features import CANDIDATE_SCORE, CANDIDATE_SOURCE, Features
from funnelrec.features.config import DEEP_SOURCE
from funnelrec.features.loader import candidate_loader
from funnelrec.progress import progress_bar

COPIED_TABLES = ("users", "items", "watches", "searches")
PAGES_PER_CHUNK = 100_000  # pages validated and written at once (bounds memory)


def _match_watches(
    ds: Dataset, user: np.ndarray, ts: np.ndarray, item: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The watch behind each example: (dataset item id [E], watch time s [E]).

    item [E]: the example's label as a dataset item id, or 0 when its label was out of
    vocabulary; then the first watch of that user at that ts (lowest item id) stands in.
    Watch time is 1.0 where the data has none.
    """
    cols = ["user_id", "ts", "item_id"]
    has_time = "watch_time_s" in ds.columns("watches")
    w = ds.table("watches", cols + (["watch_time_s"] if has_time else []))
    if not has_time:
        w = w.append_column("watch_time_s", pa.array(np.ones(w.num_rows, dtype=np.float32)))
    w = w.set_column(
        w.schema.get_field_index("watch_time_s"),
        "watch_time_s",
        pc.fill_null(w.column("watch_time_s").cast(pa.float32()), 1.0),
    )
    exact = w.group_by(cols).aggregate([("watch_time_s", "max")])
    first = w.group_by(["user_id", "ts"]).aggregate([("item_id", "min")])
    ex = pa.table(
        {
            "ex": np.arange(len(user), dtype=np.int64),
            "user_id": user.astype(np.int64),
            "ts": ts.astype(np.int64),
            "item_id": item.astype(np.int64),
        }
    )
    # OOV labels: take the (first) item watched at that moment
    ex = ex.join(first, ["user_id", "ts"], join_type="left outer")
    chosen = pc.if_else(
        pc.equal(ex.column("item_id"), 0), ex.column("item_id_min"), ex.column("item_id")
    )
    ex = pa.table(
        {
            "ex": ex.column("ex"),
            "user_id": ex.column("user_id"),
            "ts": ex.column("ts"),
            "item_id": chosen,
        }
    )
    ex = ex.join(exact, cols, join_type="left outer").sort_by("ex")
    item_out = np.asarray(pc.fill_null(ex.column("item_id"), 0).to_numpy(), dtype=np.int64)
    time_out = np.asarray(
        pc.fill_null(ex.column("watch_time_s_max"), np.nan).to_numpy(), dtype=np.float32
    )
    return item_out, time_out


def impressions_from_candidates(
    data: Path | str,
    features: Path | str,
    candidates: Path | str,
    out: Path | str,
    *,
    k: int = 20,
    splits: Sequence[str] = ("train", "valid", "test"),
    batch_size: int = 4096,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write dataset `out`: `data` plus impressions retrieved by the candidate model.

    features:   the features `candidates` was trained on (built from `data`); their
                candidate examples of `splits` are the points in time that get a page
                (those whose watch the candidate model retrieves)
    candidates: a candidate-model artifact (`funnelrec.candidates`)
    k:          impressions per page (the top k of an exact or HNSW search, `ann`)
    Returns `out`.
    """
    if k < 2:
        raise FunnelrecError(f"impressions from candidates: k must be >= 2, got {k}")
    ds = Dataset.open(data)
    if ds.has("impressions"):
        raise FunnelrecError(
            f"{ds.path} already has impressions: build ranking examples from them directly"
        )
    feats = Features.open(features)
    feats.check_dataset(ds)
    check_features(read_candidate_config(candidates), feats, candidates)
    model = load_candidate_model(candidates)
    emb, item_ids = load_item_embeddings(candidates)
    index = ItemIndex.build(emb.numpy(), item_ids.numpy())
    vocab = feats.vocab("item")

    shown: list[np.ndarray] = []
    shown_scores: list[np.ndarray] = []
    users: list[np.ndarray] = []
    times: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    total = sum(feats.num_examples("candidates", s) for s in splits)
    bar = progress_bar("examples", enabled=progress)
    with bar, torch.no_grad():
        task = bar.add_task("pages from candidates", total=total)
        for split in splits:
            for batch in candidate_loader(feats, split, batch_size=batch_size):
                retrieved, scores = index.search(model(batch).float().numpy(), k)  # best first
                shown.append(retrieved.astype(np.int64))
                shown_scores.append(scores.astype(np.float64))
                label = batch.label.numpy()
                label_item = np.zeros(len(label), dtype=np.int64)
                known = label > 0
                label_item[known] = vocab.decode(label[known])
                labels.append(label_item)
                users.append(batch.user_id.numpy())
                times.append(batch.ts.numpy())
                bar.advance(task, len(batch))
    if not shown:
        raise FunnelrecError(f"{feats.path}: no candidate examples in splits {', '.join(splits)}")
    user, ts = np.concatenate(users), np.concatenate(times)
    item, watch_time = _match_watches(ds, user, ts, np.concatenate(labels))
    retrieved, scores = np.concatenate(shown), np.concatenate(shown_scores)
    # examples whose watch was found (all, in consistent data) and retrieved: the others
    # have no page (see the module's docstring)
    found = item > 0
    ok = np.flatnonzero(found & _retrieved(retrieved, item))
    if len(ok) == 0:
        raise FunnelrecError(
            f"no watch of {feats.path}'s examples is in the candidate model's top {k}: "
            "no page to write (train the candidate model further or raise k)"
        )

    extra = {
        "impressions_from_candidates": {
            "source_fingerprint": ds.fingerprint(),
            "features": str(feats.path),
            "candidates": str(candidates),
            "k": k,
            "splits": list(splits),
            "examples": len(item),
            "pages": len(ok),
            "watch_not_found": int((~found).sum()),
        }
    }
    with DatasetWriter(
        Path(out), source=f"{ds.manifest.source}+candidates", force=force, extra=extra
    ) as writer:
        for name in COPIED_TABLES:
            if ds.has(name):
                for rb in ds.batches(name):
                    writer.write(name, pa.Table.from_batches([rb]))
        for space in ds.manifest.id_maps:
            writer.add_id_map(space, ds.id_map(space).sort_by("id").column("raw_id"))
        for lo in range(0, len(ok), PAGES_PER_CHUNK):
            sel = ok[lo : lo + PAGES_PER_CHUNK]
            writer.write(
                "impressions",
                _pages(
                    retrieved[sel],
                    item[sel],
                    watch_time[sel],
                    user[sel],
                    ts[sel],
                    lo + 1,
                    scores=scores[sel],
                ),
            )
    return Path(out)


def _retrieved(retrieved: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Whether each example's watched item [B] is among its retrieved items [B, k]."""
    return np.asarray((retrieved == item[:, None]).any(axis=1))


def _pages(
    retrieved: np.ndarray,
    item: np.ndarray,
    watch_time: np.ndarray,
    user: np.ndarray,
    ts: np.ndarray,
    first_request: int,
    *,
    scores: np.ndarray | None = None,
) -> pa.Table:
    """Impressions rows of B pages: retrieved [B, k] with each page's watched item clicked.

    Every watched item must be among its page's retrieved items (`_retrieved`); slots the
    index could not fill (id -1) are dropped. `scores` [B, k]: the retrieval's scores,
    logged as `cand_score` beside `cand_source` "deep", as a served page logs them (the
    Recommender hands the ranker the same two for every candidate).
    """
    b, k = retrieved.shape
    if not _retrieved(retrieved, item).all():
        raise ValueError("a page's watched item is not among its retrieved items")
    clicked = retrieved == item[:, None]
    t = np.where(np.isnan(watch_time), 1.0, watch_time).astype(np.float32)
    keep = (retrieved > 0).ravel()
    return pa.table(
        {
            "request_id": np.repeat(np.arange(first_request, first_request + b), k)[keep],
            "user_id": np.repeat(user.astype(np.int64), k)[keep],
            "item_id": retrieved.ravel().astype(np.int64)[keep],
            "ts": np.repeat(ts.astype(np.int64), k)[keep],
            "position": np.tile(np.arange(k, dtype=np.int32), b)[keep],
            "clicked": clicked.ravel()[keep],
            "watch_time_s": np.where(clicked, t[:, None], 0.0).astype(np.float32).ravel()[keep],
            **(
                {
                    CANDIDATE_SOURCE: pa.array([DEEP_SOURCE] * int(keep.sum()), type=pa.string()),
                    CANDIDATE_SCORE: scores.astype(np.float64).ravel()[keep],
                }
                if scores is not None
                else {}
            ),
        }
    )
