"""The whole funnel's quality offline: a packaged `Recommender` on held-out next watches.

`funnelrec evaluate candidates` scores the candidate model alone and `evaluate ranker` the
ranker on logged pages; neither says what a user gets, which is the candidate sources'
union ordered by the ranking network (Covington et al. 2016, section 2). Here every
held-out example of a features split is one request to `Recommender.recommend`, and the
served list is scored against the example's target by the retrieval metrics of
`funnelrec.candidates.metrics` (`list_ranks` + `RetrievalMetrics`: recall, HR, NDCG, MAP at
K and MRR, cut at max K), beside each candidate source's own top K for the same request.

    report = evaluate_funnel(ART, "test", ks=(10, 20, 50), limit=200, progress=True)
    report.metrics["funnel"]["ndcg@10"], report.metrics["deep"]["ndcg@10"]
    report.save(ART / "funnel_metrics.json")

Protocol (docs/evaluation.md):
- examples: the held-out candidate examples of the split, read from the example shards of
  the features directory the artifact was packaged from (its own copy, ART/features, holds
  the transforms only): user, time and target of each, in the shards' order; `limit` keeps
  the first N users and all their examples. Their shards must be of the artifact's data and
  split (fingerprint, split and example counts are checked).
- request: the user's id (stored demographics) and, as the request's explicit context,
  every watch the user made before the target (in the features' order: by time, ties in
  the table's row order) and every search strictly before its time, raw from the dataset
  the features were built from (the examples' bags hold vocabulary ids with unknown items
  dropped and search tokens, not what a request carries). An explicit context has no
  times: the recommender takes it as done just before the end of the data's window
  (`ServingConfig.explicit_gap_s` apart), and no impressions (the churn features are 0).
- exclusion: the items watched before the target are never returned, except the target
  itself (a re-watch stays retrievable), as in `candidates.metrics`: the request's
  `exclude` list, which every source and the merge honour as they do the history.
- lists scored, the top max K of each: `funnel` (the served ranking), `deep` (the deep
  candidates in ANN order, i.e. without the ranker), `cowatch` and `fresh` (those sources'
  own orders), each with the same exclusion. Plus the candidate pool: whether the target
  was nominated at all by a source at its serving depth (the most any ranking of these
  candidates can reach), and which sources nominated each of the funnel's hits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from funnelrec import __version__
from funnelrec.candidates.metrics import RetrievalMetrics, list_ranks
from funnelrec.data.dataset import Dataset, write_json_atomic
from funnelrec.errors import ArtifactError, DataError, FunnelrecError
from funnelrec.features import MANIFEST as FEATURES_MANIFEST
from funnelrec.features import Demographics, Features
from funnelrec.features.loader import read_examples
from funnelrec.features.splits import PART_NAMES
from funnelrec.progress import progress_bar
from funnelrec.serving.recommender import (
    COWATCH,
    DEEP,
    FEATURES_DIR,
    FRESH,
    MANIFEST,
    SOURCES,
    Recommender,
    RecommendRequest,
)

FORMAT_VERSION = 1
KIND = "funnelrec-funnel-metrics"
KS: tuple[int, ...] = (10, 20, 50)
FUNNEL = "funnel"
LISTS = (FUNNEL, *SOURCES)  # the ranked lists scored, in the table's column order

# Requests whose user vectors are computed and searched in one batch (the deep list).
CHUNK = 256


@dataclass(frozen=True)
class HeldOut:
    """The held-out examples evaluated, one request each, in the shards' order.

    user_id, ts, target: [Q] int64 (target: the dataset item id of the next watch)
    in_vocab: [Q] bool, the target is in the candidate model's item vocabulary
    """

    user_id: np.ndarray
    ts: np.ndarray
    target: np.ndarray
    in_vocab: np.ndarray

    def __len__(self) -> int:
        return len(self.user_id)


@dataclass(frozen=True)
class Context:
    """One request's explicit context: dataset item ids and query strings, oldest first."""

    history: list[int]
    queries: list[str]


@dataclass(frozen=True)
class Served:
    """One request's outcome, for `evaluate_funnel(on_request=...)`.

    lists: list name (LISTS) -> dataset item ids scored, best first (at most max K)
    rewatch: the target is among the watched items; in_pool: some source nominated it at
    its serving depth; sources: the sources that nominated the target in the funnel's
    list (empty when it is not there)
    """

    user_id: int
    ts: int
    target: int
    context: Context
    rewatch: bool
    lists: dict[str, np.ndarray]
    in_pool: bool
    sources: list[str]


@dataclass
class FunnelReport:
    """The result of `evaluate_funnel` (`to_dict` is the JSON file's content).

    metrics: list name (LISTS) -> metric name (`RetrievalMetrics.names`) -> mean
    hit_sources: per K, the funnel's hits and the share of them each source nominated
    pool: the share of targets among the candidates and the mean candidates per request
    counts: requests, users, re-watch / out-of-vocabulary / unknown targets, empty histories
    timing: wall seconds, requests per second, the funnel's own mean milliseconds
    """

    split: str
    ks: tuple[int, ...]
    metrics: dict[str, dict[str, float]]
    hit_sources: list[dict[str, Any]]
    pool: dict[str, float]
    counts: dict[str, int]
    timing: dict[str, float]
    protocol: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "funnelrec_version": __version__,
            **asdict(self),
            "ks": list(self.ks),
        }

    def save(self, path: Path | str) -> Path:
        """Write the report as JSON (atomically); returns the path."""
        write_json_atomic(Path(path), self.to_dict())
        return Path(path)


# --------------------------------------------------------------------------- inputs


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Distinct cut-offs, ascending; FunnelrecError unless all are positive."""
    if not ks or any(int(k) < 1 for k in ks):
        raise FunnelrecError(f"metric cut-offs must be positive integers, got {list(ks)}")
    return tuple(sorted({int(k) for k in ks}))


def open_artifact(art: Path | str) -> Recommender:
    """`Recommender.load`, after a clear refusal of an artifact without its features copy."""
    path = Path(art)
    if (path / MANIFEST).is_file() and not (path / FEATURES_DIR / FEATURES_MANIFEST).is_file():
        raise ArtifactError(
            f"{path}: the artifact has no features copy ({FEATURES_DIR}/{FEATURES_MANIFEST}); "
            "repackage it with `funnelrec package`"
        )
    return Recommender.load(path)


def example_features(rec: Recommender, split: str, features: Path | str | None = None) -> Features:
    """The features directory whose `split` example shards belong to the artifact.

    features: that directory (default: ART/features when it holds shards, else the
    directory the artifact was packaged from). Refused unless it is of the artifact's data
    and split, and the split exists and has examples.
    """
    if split not in PART_NAMES or split == "train":
        raise FunnelrecError(f"split must be valid or test (held-out examples), got '{split}'")
    own = rec.features
    if features is not None:
        path = Path(features)
    elif (own.path / "candidates" / split).is_dir():
        path = own.path
    else:
        recorded = str(rec.manifest.get("features", {}).get("path") or "")
        path = Path(recorded)
        if not recorded or not (path / FEATURES_MANIFEST).is_file():
            raise ArtifactError(
                f"{rec.path}: its features copy holds no example shards and the features "
                f"directory it was packaged from ({recorded or 'not recorded'}) is not there; "
                "pass the features directory (--features)"
            )
    feats = Features.open(path)
    if feats.fingerprint != rec.data_fingerprint:
        raise ArtifactError(
            f"{path}: features of data {feats.fingerprint}, the artifact {rec.path} is of "
            f"data {rec.data_fingerprint}"
        )
    if feats.manifest["split"] != own.manifest["split"] or feats.manifest.get(
        "counts"
    ) != own.manifest.get("counts"):
        raise ArtifactError(
            f"{path}: not the features build the artifact {rec.path} was packaged from "
            "(another split or other examples): its held-out examples may be training ones"
        )
    if feats.num_examples("candidates", split) == 0:
        raise FunnelrecError(f"{path}: the {split} split has no held-out examples")
    folder = path / "candidates" / split
    if not folder.is_dir() or not any(folder.glob("part-*.parquet")):
        raise ArtifactError(f"{folder}: the {split} split's example shards are missing")
    return feats


def held_out(feats: Features, split: str, limit: int | None = None) -> HeldOut:
    """The split's held-out examples; `limit`: the first `limit` users' examples only."""
    if limit is not None and limit < 1:
        raise FunnelrecError(f"limit must be at least 1 user, got {limit}")
    t = read_examples(feats, "candidates", split, ["user_id", "ts", "item_id", "label"])
    user = np.asarray(t.column("user_id").to_numpy(), dtype=np.int64)
    keep = np.ones(len(user), dtype=bool)
    if limit is not None:
        _, first = np.unique(user, return_index=True)
        keep = np.isin(user, user[np.sort(first)[:limit]])
    if not keep.any():
        raise FunnelrecError(f"{feats.path}: the {split} split has no held-out examples")
    return HeldOut(
        user_id=user[keep],
        ts=np.asarray(t.column("ts").to_numpy(), dtype=np.int64)[keep],
        target=np.asarray(t.column("item_id").to_numpy(), dtype=np.int64)[keep],
        in_vocab=np.asarray(t.column("label").to_numpy(), dtype=np.int64)[keep] > 0,
    )


class UserLog:
    """The examples' users' watches and searches, sorted by (user, ts) with ties in the
    table's row order (the features' order), to cut each user's past at a target."""

    def __init__(self, ds: Dataset, users: np.ndarray) -> None:
        value_set = pa.array(np.unique(users))
        w = ds.table("watches", ["user_id", "item_id", "ts"])
        w = w.filter(pc.is_in(w.column("user_id"), value_set=value_set))
        user = np.asarray(w.column("user_id").to_numpy(), dtype=np.int64)
        ts = np.asarray(w.column("ts").to_numpy(), dtype=np.int64)
        order = np.lexsort((ts, user))  # stable: equal (user, ts) keep the table's order
        self.w_user, self.w_ts = user[order], ts[order]
        self.w_item = np.asarray(w.column("item_id").to_numpy(), dtype=np.int64)[order]
        self.s_user = self.s_ts = np.zeros(0, dtype=np.int64)
        self.s_query: list[str] = []
        if ds.has("searches"):
            s = ds.table("searches", ["user_id", "ts", "query"])
            s = s.filter(pc.is_in(s.column("user_id"), value_set=value_set))
            su = np.asarray(s.column("user_id").to_numpy(), dtype=np.int64)
            st = np.asarray(s.column("ts").to_numpy(), dtype=np.int64)
            order = np.lexsort((st, su))
            self.s_user, self.s_ts = su[order], st[order]
            queries = s.column("query").to_pylist()
            self.s_query = [str(queries[i] or "") for i in order]

    def before(self, user: int, ts: int, target: int) -> Context:
        """The user's watches before the target watch (user, ts, target) and searches
        strictly before ts. DataError when the dataset has no such watch."""
        lo, hi = np.searchsorted(self.w_user, [user, user + 1])
        a, b = lo + np.searchsorted(self.w_ts[lo:hi], [ts, ts + 1])
        at = np.flatnonzero(self.w_item[a:b] == target)
        if not at.size:
            raise DataError(
                f"the held-out watch of item {target} by user {user} at {ts} is not in the "
                "dataset's watches: the features were not built from this dataset"
            )
        history = self.w_item[lo : a + int(at[0])].tolist()
        s_lo, s_hi = np.searchsorted(self.s_user, [user, user + 1])
        s_end = s_lo + int(np.searchsorted(self.s_ts[s_lo:s_hi], ts))
        return Context(history, self.s_query[s_lo:s_end])


def open_dataset(feats: Features, data: Path | str | None = None) -> Dataset:
    """The dataset the features were built from (or `data`), checked by fingerprint."""
    path = Path(data) if data is not None else Path(feats.manifest["data"]["path"])
    if not path.is_dir():
        raise ArtifactError(
            f"{path}: the dataset the features were built from is not there (the requests' "
            "histories are read from it); pass it (--data)"
        )
    ds = Dataset.open(path)
    feats.check_dataset(ds)
    return ds


# --------------------------------------------------------------------------- evaluation


def evaluate_funnel(
    art: Path | str | Recommender,
    split: str = "test",
    *,
    ks: Sequence[int] = KS,
    limit: int | None = None,
    features: Path | str | None = None,
    data: Path | str | None = None,
    progress: bool = False,
    threads: int | None = 1,
    on_request: Callable[[Served], None] | None = None,
) -> FunnelReport:
    """Score the packaged funnel and each of its sources on a held-out split.

    art: the artifact directory (or a loaded Recommender); limit: the first N users;
    features, data: where the split's example shards and the raw events are (default:
    recorded in the artifact and the features). threads: torch threads while evaluating
    (process-wide, restored after; None: leave as is): a request is one small batch, which
    more threads only make wait on each other. on_request: called with each request's
    outcome (`Served`), e.g. to look at the misses. See the module docstring for the protocol.
    """
    ks = check_ks(ks)
    rec = art if isinstance(art, Recommender) else open_artifact(art)
    feats = example_features(rec, split, features)
    examples = held_out(feats, split, limit)
    log = UserLog(open_dataset(feats, data), examples.user_id)
    run = _Run(rec, ks, on_request)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    bar = progress_bar("requests", enabled=progress, transient=True)
    try:
        with bar:
            task = bar.add_task(f"funnel {split}", total=len(examples))
            for lo in range(0, len(examples), CHUNK):
                hi = min(len(examples), lo + CHUNK)
                users, ts, targets = (
                    examples.user_id[lo:hi],
                    examples.ts[lo:hi],
                    examples.target[lo:hi],
                )
                ctxs = [
                    log.before(int(u), int(t), int(i))
                    for u, t, i in zip(users, ts, targets, strict=True)
                ]
                run.chunk(users, ts, targets, ctxs)
                bar.advance(task, hi - lo)
    finally:
        torch.set_num_threads(before)
    seconds = time.perf_counter() - started
    q = len(examples)
    counts = {
        "requests": q,
        "users": len(np.unique(examples.user_id)),
        "rewatch_targets": run.rewatch,
        "oov_targets": int((~examples.in_vocab).sum()),
        "unknown_targets": run.unknown,
        "empty_history": run.empty_history,
    }
    return FunnelReport(
        split=split,
        ks=ks,
        metrics={name: acc.compute() for name, acc in run.acc.items()},
        hit_sources=run.hit_sources(),
        pool={"hit_rate": run.pool_hits / q, "mean_candidates": run.candidates / q},
        counts=counts,
        timing={
            "seconds": seconds,
            "requests_per_s": q / max(seconds, 1e-9),
            "funnel_ms_mean": run.funnel_ms / q,
        },
        protocol=protocol(rec, ks),
        source={
            "artifact": str(rec.path),
            "artifact_fingerprint": rec.fingerprint,
            "data_fingerprint": rec.data_fingerprint,
            "features": str(feats.path),
            "split_kind": feats.split,
        },
    )


class _Run:
    """Accumulates the metrics of every list over the requests, chunk by chunk."""

    def __init__(
        self,
        rec: Recommender,
        ks: tuple[int, ...],
        on_request: Callable[[Served], None] | None = None,
    ) -> None:
        self.rec, self.ks, self.k = rec, ks, max(ks)
        self.on_request = on_request
        self.acc = {name: RetrievalMetrics(ks) for name in LISTS}
        self.hits = np.zeros(len(ks), dtype=np.int64)  # the funnel's hits at each K
        self.hit_by = {s: np.zeros(len(ks), dtype=np.int64) for s in SOURCES}
        self.pool_hits = self.candidates = self.rewatch = self.unknown = self.empty_history = 0
        self.funnel_ms = 0.0

    def chunk(
        self, users: np.ndarray, ts: np.ndarray, targets: np.ndarray, ctxs: list[Context]
    ) -> None:
        """Serve and score one chunk of requests (users, ts, targets [q], contexts)."""
        rec, k, q = self.rec, self.k, len(ctxs)
        cfg = rec.config
        demos = [rec.user_demographics(int(u)) for u in users]
        watched = [np.unique(np.asarray(c.history, dtype=np.int64)) for c in ctxs]
        rewatch = [bool(np.isin(t, w)) for t, w in zip(targets.tolist(), watched, strict=True)]
        # the items each request must not return: the watched ones but the target
        excl = [w[w != t] for w, t in zip(watched, targets.tolist(), strict=True)]
        deep = self._deep(ctxs, demos, excl, k)
        lists = {name: np.zeros((q, k), dtype=np.int64) for name in LISTS}
        for row, (ctx, target) in enumerate(zip(ctxs, targets.tolist(), strict=True)):
            history = np.asarray(ctx.history, dtype=np.int64)
            self.rewatch += rewatch[row]
            self.unknown += not rec.has_item(target)
            self.empty_history += not ctx.history
            served, sources = self._served(int(users[row]), ctx, excl[row])
            lists[FUNNEL][row, : len(served)] = served
            # Each source's own list, and the depth it nominates at in `Recommender.recommend`
            # for a request of k items (0: not at all): the candidate pool.
            own: dict[str, tuple[np.ndarray, int]] = {}
            deep_ids = deep[row]
            deep_on = deep_ids is not None and cfg.deep_k > 0
            if deep_ids is not None:
                k_deep = min(max(cfg.deep_k, k), rec.index.count) if deep_on else 0
                own[DEEP] = (deep_ids, k_deep)
            k_fresh = cfg.fresh_k if deep_on else max(cfg.fresh_k, k)
            own[FRESH] = (rec.fresh.top_k(history, max(k, k_fresh), exclude=excl[row])[0], k_fresh)
            if history.size:
                ids = rec.cowatch.top_k(history, max(k, cfg.cowatch_k), exclude=excl[row])[0]
                own[COWATCH] = (ids, cfg.cowatch_k)
            for name, (ids, _) in own.items():
                lists[name][row, : min(k, len(ids))] = ids[:k]
            in_pool = any(target in ids[:depth] for ids, depth in own.values())
            self.pool_hits += in_pool
            by: list[str] = []
            if target in served:
                place = served.index(target)
                by = sources[place]
                hit = np.asarray(self.ks) > place
                self.hits += hit
                for s in by:
                    self.hit_by[s] += hit
            if self.on_request is not None:
                got = {n: lists[n][row][lists[n][row] > 0] for n in LISTS}
                self.on_request(
                    Served(
                        int(users[row]), int(ts[row]), target, ctx, rewatch[row], got, in_pool, by
                    )
                )
        tgt = torch.from_numpy(np.asarray(targets, dtype=np.int64).reshape(q, 1))
        ones = torch.ones(q)
        for name in LISTS:
            self.acc[name].update(list_ranks(torch.from_numpy(lists[name]), tgt), ones)

    def _served(
        self, user: int, ctx: Context, excl: np.ndarray
    ) -> tuple[list[int], list[list[str]]]:
        """The funnel's top k: (item ids, each one's nominating sources)."""
        req = RecommendRequest(
            user_id=user,
            history=ctx.history,
            queries=ctx.queries,
            k=self.k,
            exclude=excl.tolist(),
        )
        resp = self.rec.recommend(req)
        self.funnel_ms += resp.timings_ms["total"]
        self.candidates += int(resp.info["ranked"])
        items = resp.items[: self.k]
        return [it.item_id for it in items], [list(it.sources) for it in items]

    def _deep(
        self,
        ctxs: list[Context],
        demos: list[Demographics | None],
        excl: list[np.ndarray],
        req_k: int,
    ) -> list[np.ndarray | None]:
        """Each request's deep candidates in ANN order, as deep as the cut-off or the
        serving depth for a request of `req_k` items needs; None where serving would run
        no deep model for lack of any signal (no history, queries or demographics)."""
        rec = self.rec
        signal = [
            bool(c.history or c.queries)
            or (d is not None and any(v is not None for v in asdict(d).values()))
            for c, d in zip(ctxs, demos, strict=True)
        ]
        out: list[np.ndarray | None] = [None] * len(ctxs)
        rows = [i for i, s in enumerate(signal) if s]
        if not rows:
            return out
        batch = rec.features.candidate_batch(
            [ctxs[i].history for i in rows],
            [ctxs[i].queries for i in rows],
            [demos[i] for i in rows],
        )
        with torch.no_grad():
            u = rec.candidate_model(batch).float().numpy()
        depth = min(max(self.k, rec.config.deep_k, req_k), rec.index.count)
        ids, _ = rec.index.search(u, depth, exclude=[excl[i] for i in rows])
        for j, i in enumerate(rows):
            out[i] = ids[j][ids[j] >= 0]
        return out

    def hit_sources(self) -> list[dict[str, Any]]:
        """Per K: the funnel's hits and the share of them each source nominated (an item
        nominated by several sources counts for each)."""
        return [
            {
                "k": k,
                "hits": int(self.hits[i]),
                "nominated_by": {
                    s: float(self.hit_by[s][i] / self.hits[i]) if self.hits[i] else 0.0
                    for s in SOURCES
                },
            }
            for i, k in enumerate(self.ks)
        ]


def protocol(rec: Recommender, ks: tuple[int, ...]) -> dict[str, Any]:
    """What the metrics file says about how the lists were built and scored."""
    cfg = rec.config
    return {
        "targets": "the held-out next watch of each example of the split (one per request)",
        "request": "the user's id (stored demographics) with an explicit context: every watch "
        "before the target and every search before its time, from the dataset; request time "
        "the end of the data's window, the explicit events spaced "
        f"{cfg.explicit_gap_s} s apart before it; no impressions",
        "exclusion": "items watched before the target are never returned, except the target "
        "itself (the request's exclude list, honoured by every source and the merge)",
        "lists": {
            FUNNEL: "Recommender.recommend: the sources' union ordered by the ranker",
            DEEP: "the candidate model's user vector searched in the ANN index (ANN order)",
            COWATCH: "co-watched with the last watch, in its own score order",
            FRESH: "fresh and popular now, in its own score order",
        },
        "serving": {"deep_k": cfg.deep_k, "cowatch_k": cfg.cowatch_k, "fresh_k": cfg.fresh_k},
        "ks": list(ks),
        "metrics": "funnelrec.candidates.metrics: ranks are places in each top "
        f"{max(ks)} list (absent: a miss at every K; mrr cut at {max(ks)})",
        "pool": "hit_rate: the target is among the candidates the sources nominate at their "
        "serving depths (the most any ranking of them can reach); mean_candidates: distinct "
        "candidates the ranker scored per request",
    }
