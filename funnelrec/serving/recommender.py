"""The funnel end to end for one request: user -> candidates -> ranking -> response.

The two-stage funnel of Covington et al. 2016, section 2.

    rec = Recommender.load(ART)                     # an artifact from `funnelrec package`
    rec.seed_state(store)                           # once: the data's latest user state
    resp = rec.recommend(RecommendRequest(user_id=7, k=10), store.context(7))
    resp.items[0].item_id, resp.items[0].expected_watch_time, resp.items[0].sources
    resp.timings_ms                                 # per stage, and "total"

A request goes through these stages (the keys of `Response.timings_ms`):

context     the user's events and demographics at request time. History and queries come
            from the live store's context, or from the request itself (an explicit
            context: the request's lists replace the stored ones). Demographics: the
            request's fields, else the user's stored ones from the data set. Request
            time: the end of the data's window ("now" of the packaged models: the latest
            timestamp in the data), or the user's latest event when live events are later,
            plus one second (features count events strictly before the request, as in
            training). Explicit histories and queries have no times: they are taken as
            done in order, `explicit_gap_s` apart, ending just before the request.
candidates_deep     the candidate model's user vector (example age 0, paper 3.3) searched
            in the ANN index over item embeddings: the main source, `deep_k` items
            (with a content model, also over the vectors of the items added while
            serving, `add_items`: docs/serving.md, "A live catalogue")
candidates_fresh    "fresh and popular now": recent watch counts boosted for new uploads
candidates_cowatch  "co-watched with the last watch": items watched right after it
merge       union of the sources' items; each keeps every source that nominated it and
            that source's score (the scores are not comparable across sources: ranking
            is what makes them comparable, paper section 2)
features    the ranking features of every candidate, the training code's formulas computed
            directly over the candidate set and tested equal to it (`features.serving`):
            churn (times already shown), time since the user last watched the topic, the
            user's watches of the channel, item age, duration, ...
ranking     the ranker's expected watch time exp(logit) (paper 4.2), the request's shared
            inputs computed once (`serving.inference`); best first, already watched items
            dropped when `exclude_watched`, the top k returned
total       the whole request

Unknown users never get an error: with demographics the deep model still runs (empty
history), and with nothing at all only the fresh-and-popular source nominates.

Artifact layout (written by `package.package`; every part is checked against the others
when loading, a mismatch raises ArtifactError):

    ART/manifest.json               format version, data fingerprint, the artifact's own
                                    fingerprint, versions, parts, sizes of every file
    ART/features/                   features.json + transforms/ (no example shards)
    ART/candidates/                 candidate model, item embeddings, index/ (ANN)
    ART/ranker/                     ranking model
    ART/sources/fresh, cowatch/     the other candidate sources, fitted on the training split
    ART/items.parquet               item metadata + each item's watch count in the data
    ART/users.parquet               users' demographics
    ART/state/{watches,searches,impressions}.parquet   the live store's seed: each user's
                                    last watches and queries, impression counts
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from funnelrec import __version__
from funnelrec.ann.index import ItemIndex, SearchOptions
from funnelrec.baselines import CoWatch, Popularity, load_baseline
from funnelrec.baselines.base import in_sorted, top_k_by_score
from funnelrec.candidates import INDEX_DIR as CANDIDATE_INDEX_DIR
from funnelrec.candidates import WEIGHTS_FILE as CANDIDATE_WEIGHTS
from funnelrec.candidates import (
    CandidateInputs,
    check_features,
    load_candidate_model,
    load_item_embeddings,
    read_candidate_config,
)
from funnelrec.config import from_dict
from funnelrec.data.dataset import file_sha256
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import Demographics, Features
from funnelrec.features.batch import CandidateBatch
from funnelrec.features.config import COWATCH_SOURCE, DEEP_SOURCE, FRESH_SOURCE
from funnelrec.features.serving import (
    GrowingColumns,
    RankingFeaturizer,
    ServingItems,
    UserEvents,
)
from funnelrec.ranking.model import WEIGHTS_FILE as RANKER_WEIGHTS
from funnelrec.ranking.model import (
    RankingFeatureSpec,
    RankingModel,
    load_ranker,
    read_ranker_config,
)
from funnelrec.serving.inference import RequestRanker, RequestUserTower
from funnelrec.serving.memory import map_embedding_tables
from funnelrec.serving.state import AddedItem, UserContext, UserStateStore

__all__ = [
    "Demographics",
    "RecommendRequest",
    "RecommendedItem",
    "Recommender",
    "Response",
    "ServingConfig",
]

ARTIFACT_FORMAT_VERSION = 1
ARTIFACT_KIND = "funnelrec-recommender"
MANIFEST = "manifest.json"
FEATURES_DIR = "features"
CANDIDATES_DIR = "candidates"
INDEX_DIR = f"{CANDIDATES_DIR}/{CANDIDATE_INDEX_DIR}"
RANKER_DIR = "ranker"
FRESH_DIR = "sources/fresh"
COWATCH_DIR = "sources/cowatch"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
STATE_DIR = "state"
STATE_TABLES = ("watches", "searches", "impressions")

# Candidate source names, as they appear in responses and timings. When the ranker was
# trained with the nominating source as a feature, an item nominated by several sources
# is presented as coming from the first of them in this order.
DEEP, COWATCH, FRESH = DEEP_SOURCE, COWATCH_SOURCE, FRESH_SOURCE
SOURCES = (DEEP, COWATCH, FRESH)


@dataclass(frozen=True)
class ServingConfig:
    """How many candidates each source nominates, and the explicit-context clock.

    deep_k:         items from the ANN search (the paper's "a few hundred", section 2) [300]
    fresh_k:        items from "fresh and popular now" [50]
    cowatch_k:      items from "co-watched with the last watch" [50]
    explicit_gap_s: seconds between the watches (queries) of an explicit history [60]
    index:          how the ANN index is searched (`ann.index.SearchOptions`: the scan
                    kernel, huge pages)
    A source is asked for at least k items when it is the only one.
    """

    deep_k: int = 300
    fresh_k: int = 50
    cowatch_k: int = 50
    explicit_gap_s: int = 60
    index: SearchOptions = field(default_factory=SearchOptions)

    def __post_init__(self) -> None:
        for name in ("deep_k", "fresh_k", "cowatch_k"):
            if getattr(self, name) < 0:
                raise FunnelrecError(f"serving config: {name} must be >= 0")
        if self.explicit_gap_s < 1:
            raise FunnelrecError("serving config: explicit_gap_s must be >= 1")


@dataclass(frozen=True)
class RecommendRequest:
    """One recommendation request: a user id and/or an explicit context.

    history: dataset item ids, oldest first (replaces the stored history when given)
    queries: search queries, oldest first (replace the stored ones when given)
    demographics: override the user's stored demographics field by field
    k: items to return; exclude_watched: leave out items in the user's history
    exclude: dataset item ids never to return, in place of the history's when given (an
             offline evaluation keeps a re-watched target retrievable this way)
    """

    user_id: int | None = None
    history: list[int] | None = None
    queries: list[str] | None = None
    demographics: Demographics | None = None
    k: int = 10
    exclude_watched: bool = True
    exclude: list[int] | None = None


@dataclass(frozen=True)
class RecommendedItem:
    """item_id: dataset item id; expected_watch_time: seconds (exp(score) x unit);
    score: the ranker's logit; sources: source name -> that source's own score."""

    item_id: int
    expected_watch_time: float
    score: float
    sources: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "expected_watch_time": _finite(self.expected_watch_time),
            "score": _finite(self.score),
            "sources": {k: _finite(v) for k, v in self.sources.items()},
        }


@dataclass(frozen=True)
class Response:
    """Items best first, milliseconds per stage, and what the request was built from.

    info: user_id, known_user, history / queries used (counts), demographics
    ("request", "stored", "request+stored" or "none"), request_ts, candidates per source,
    ranked (distinct candidates the ranker scored).
    """

    items: list[RecommendedItem]
    timings_ms: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": [it.to_dict() for it in self.items],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            **self.info,
        }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass(frozen=True)
class _Live:
    """The catalogue a request is served from, swapped whole when items are added:
    per-item columns, the featurizer over them, the fresh source, and the added items'
    content vectors ([M] item ids, ascending, [M, d] float32; none for an id-only model)."""

    items: ServingItems
    featurizer: RankingFeaturizer
    fresh: Popularity
    added_ids: np.ndarray
    added_vecs: np.ndarray


@dataclass(frozen=True)
class _Context:
    events: UserEvents
    demographics: Demographics | None
    demographics_from: str
    known_user: bool
    ts: int

    @property
    def has_signal(self) -> bool:
        if self.events.history or self.events.queries:
            return True
        d = self.demographics
        return d is not None and any(v is not None for v in asdict(d).values())


class Recommender:
    """A loaded artifact: the whole funnel, ready to answer `recommend` (thread-safe).

    Attributes: path, manifest, fingerprint (the artifact's identity: changes with any
    part), data_fingerprint (the training data's), version (funnelrec version that built
    it), now (the request time: the end of the data's window), config (ServingConfig),
    mapped_bytes (the models' embedding tables read from the artifact's files, which the
    processes serving it share: `serving.memory`).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], config: ServingConfig) -> None:
        self.path = path
        self.manifest = manifest
        self.config = config
        self.fingerprint = str(manifest["fingerprint"])
        self.data_fingerprint = str(manifest["data"]["fingerprint"])
        self.data_lineage = [str(x) for x in manifest["data"].get("lineage") or []]
        self.version = str(manifest["funnelrec_version"])
        self.now = int(manifest["data"]["now"])
        self._load_parts()

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, art: Path | str, *, config: ServingConfig | None = None) -> Recommender:
        """Open artifact `art`; raises ArtifactError when it is broken or its parts disagree.

        config: the serving knobs (default: those packaged in the manifest).
        """
        path = Path(art)
        manifest = read_manifest(path)
        try:
            cfg = config or from_dict(ServingConfig, manifest.get("serving", {}))
        except FunnelrecError as e:
            raise ArtifactError(f"{path}: broken artifact (serving config: {e})") from None
        try:
            return cls(path, manifest, cfg)
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, OSError, pa.ArrowException) as e:
            raise ArtifactError(f"{path}: broken artifact ({type(e).__name__}: {e})") from None

    def _load_parts(self) -> None:
        path, fp = self.path, self.data_fingerprint
        feats = Features.open(path / FEATURES_DIR)
        if feats.fingerprint != fp:
            raise ArtifactError(
                f"{path / FEATURES_DIR}: features of data {feats.fingerprint}, "
                f"the artifact is of data {fp}"
            )
        self.features = feats

        cand_dir = path / CANDIDATES_DIR
        cand_meta = read_candidate_config(cand_dir)
        check_features(cand_meta, feats, cand_dir)
        self.candidate_model = load_candidate_model(cand_dir)
        if self.candidate_model.inputs != CandidateInputs.from_features(feats):
            raise ArtifactError(f"{cand_dir}: its input sizes differ from the features'")
        # The embedding tables (most of both models' bytes) read from the files' pages,
        # which every process serving this artifact shares (`serving.memory`).
        self.mapped_bytes = map_embedding_tables(self.candidate_model, cand_dir / CANDIDATE_WEIGHTS)
        self._user_tower = RequestUserTower(self.candidate_model)
        emb, item_ids = load_item_embeddings(cand_dir)
        self.index = ItemIndex.load(
            path / INDEX_DIR,
            expected_dim=int(emb.shape[1]),
            expected_item_ids=item_ids.numpy(),
            options=self.config.index,
        )

        rank_dir = path / RANKER_DIR
        rank_meta = read_ranker_config(rank_dir)
        if rank_meta.get("data", {}).get("fingerprint") != fp:
            raise ArtifactError(
                f"{rank_dir} was trained on data {rank_meta.get('data', {}).get('fingerprint')}, "
                f"the artifact is of data {fp}"
            )
        spec = RankingFeatureSpec.from_dict(feats.ranking_spec).to_dict()
        if rank_meta.get("spec") != spec:
            raise ArtifactError(f"{rank_dir}: its feature spec differs from the features'")
        self.ranker = load_ranker(rank_dir)
        self.mapped_bytes += map_embedding_tables(self.ranker, rank_dir / RANKER_WEIGHTS)
        self._request_ranker = RequestRanker(self.ranker)

        items = pq.read_table(path / ITEMS_FILE)
        self.items = ServingItems.from_table(items)
        self._items_table = items.drop_columns(["watches"])
        self._metadata = frozenset(self._items_table.column_names)
        self._item_row = np.full(self.items.num_items + 1, -1, dtype=np.int64)
        self._item_row[np.asarray(items.column("item_id").to_numpy())] = np.arange(items.num_rows)
        n = self.items.num_items
        if int(item_ids.max()) > n or not self.items.known[item_ids.numpy()].all():
            raise ArtifactError(f"{cand_dir}: its item embeddings name items not in {ITEMS_FILE}")

        fresh = load_baseline(path / FRESH_DIR)
        cowatch = load_baseline(path / COWATCH_DIR)
        if not isinstance(fresh, Popularity) or fresh.cfg.fresh_half_life_s is None:
            raise ArtifactError(f"{path / FRESH_DIR}: not a fresh-and-popular source")
        if not isinstance(cowatch, CoWatch):
            raise ArtifactError(f"{path / COWATCH_DIR}: not a co-watch source")
        for name, model in ((FRESH_DIR, fresh), (COWATCH_DIR, cowatch)):
            if model.num_items != n:
                raise ArtifactError(
                    f"{path / name}: fitted for {model.num_items} items, the corpus has {n}"
                )
        self.fresh, self.cowatch = fresh, cowatch

        users = pq.read_table(path / USERS_FILE)
        ids = np.asarray(users.column("user_id").to_numpy(), dtype=np.int64)
        # Whole columns, each one array: a request reads a user's five values from them
        # (a one-row slice of the table per request was an order of magnitude slower).
        self._users = {
            name: users.column(name).combine_chunks()
            for name in ("age", "gender", "region", "device", "logged_in")
            if name in users.column_names
        }
        self._user_row = np.full(int(ids.max()) + 1 if ids.size else 1, -1, dtype=np.int64)
        self._user_row[ids] = np.arange(len(ids))
        self.featurizer = RankingFeaturizer(feats, self.items)
        # The catalogue as packaged, which the items added while serving extend.
        self._base_items = items
        raw = items.column("raw_id") if "raw_id" in items.column_names else items["item_id"]
        self._raw_item = {
            str(r): int(i)
            for r, i in zip(raw.to_pylist(), items["item_id"].to_pylist(), strict=True)
            if r is not None
        }
        channels = items.column("channel_id") if "channel_id" in items.column_names else None
        self.channels = frozenset(
            int(c)
            for c in (channels.unique().to_pylist() if channels is not None else [])
            if c is not None
        )
        self.added: dict[int, AddedItem] = {}
        self.added_through = 0  # the largest stored item id `add_items` was given
        self._packaged_through = self.items.num_items
        # Room for the added items' fresh scores and content vectors (`add_items`).
        self._growth = GrowingColumns()
        self._growth.add("fresh", self.fresh.scores_[: self.fresh.num_items + 1])
        self._growth.add("added_ids", np.zeros(0, np.int64))
        self._growth.add("added_vecs", np.zeros((0, self.index.dim), np.float32))
        dim = self.index.dim
        self._live = _Live(
            self.items, self.featurizer, self.fresh, np.zeros(0, np.int64),
            np.zeros((0, dim), np.float32),
        )  # fmt: skip

    def with_ranker(self, ranker: RankingModel) -> Recommender:
        """The same funnel (sources, candidates, features, catalogue) ranked by `ranker`
        (a loaded ranking model of the same feature spec): an A/B twin. The request path
        ranks with the `RequestRanker` built from it, so both are replaced together."""
        twin = copy.copy(self)
        # Its own lookups of the added items, which `add_items` grows in place.
        twin.added, twin._raw_item = dict(self.added), dict(self._raw_item)
        twin.ranker = ranker
        twin._request_ranker = RequestRanker(ranker)
        return twin

    # ---------------------------------------------------------------- added items

    @property
    def retrieves_added_items(self) -> bool:
        """Whether the deep source can return an added item: only a content model gives
        an item no one has watched a vector (docs/candidates.md, "Item content tower")."""
        return self.candidate_model.content is not None

    def retrievable(self, item_id: int) -> bool:
        """Whether the deep source can return item `item_id` (packaged: it is in the index;
        added: `retrieves_added_items`)."""
        if item_id in self.added or item_id > self._packaged_through:  # added (or being)
            return self.retrieves_added_items
        return bool(np.isin(item_id, self.index.item_ids))

    def catalogue_item(self, raw_id: str) -> AddedItem | None:
        """The item of external id `raw_id`, packaged or added (None: no such item)."""
        item_id = self._raw_item.get(raw_id)
        if item_id is None:
            return None
        if item_id in self.added:
            return self.added[item_id]
        meta = self.item_metadata(item_id) or {}
        return AddedItem(
            item_id, raw_id, int(meta.get("channel_id") or 0), meta.get("topic"),
            str(meta.get("title") or ""), int(meta.get("upload_ts") or 0),
            float(meta.get("duration_s") or 0.0),
        )  # fmt: skip

    def add_items(self, new: list[AddedItem]) -> None:
        """Add items to the served catalogue (already stored: `UserStateStore.add_item`).

        From the swap of one reference on, the fresh source can nominate them (fresh
        popularity with no watches: the prior times the boost of an upload at its age,
        age 0 for one after the packaged `now`), the ranker scores them (out-of-vocabulary
        `rank_item`, their channel, topic, age and duration) and, with a content model,
        the deep source retrieves them: their content vectors are searched exactly beside
        the packaged index (the ANN index, built or memory-mapped, is not changed). Items
        already in the catalogue (by external id), or whose id the packaged catalogue
        uses, are skipped: an artifact built after the daily merge of the added items
        (`funnelrec data append --live-items`) serves them from its own index, once, and
        the store's rows of them are left as they are. Costs time in the new items alone
        (amortised): the per-item columns grow in place (`ServingItems.extended`).
        `added_through` is raised last, so a reader that sees it has the items too.
        """
        n0 = self._packaged_through
        through = max([self.added_through, *(it.item_id for it in new)])
        new = sorted(
            (
                it for it in new
                if it.item_id not in self.added and it.item_id > n0
                and it.raw_id not in self._raw_item
            ),
            key=lambda it: it.item_id,
        )  # fmt: skip
        if not new:
            self.added_through = through
            return
        base = self._base_items
        extra = pa.table(
            {
                "item_id": pa.array([it.item_id for it in new], pa.int64()),
                "upload_ts": [it.upload_ts for it in new],
                "duration_s": [it.duration_s for it in new],
                "channel_id": [it.channel_id for it in new],
                "topic": pa.array([it.topic for it in new], pa.string()),
                "title": [it.title for it in new],
                "raw_id": [it.raw_id for it in new],
            }
        )
        extra = extra.select([c for c in base.column_names if c in extra.column_names])
        extra = extra.cast(base.select(extra.column_names).schema)
        items = self.items.extended(extra)
        featurizer = self.featurizer.with_items(items)
        cfg = self.fresh.cfg
        assert cfg.fresh_half_life_s is not None  # checked when loading
        scores = np.full(items.num_items - self.fresh.num_items, -np.inf, dtype=np.float32)
        for it in new:
            age = max(float(self.fresh.now - it.upload_ts), 0.0)
            boost = 1 + cfg.fresh_boost * 0.5 ** (age / cfg.fresh_half_life_s)
            scores[it.item_id - self.fresh.num_items - 1] = cfg.fresh_prior * boost
        fresh = self.fresh.with_more_items(self._growth.append("fresh", scores))
        live = self._live
        ids, vecs = live.added_ids, live.added_vecs
        if self.retrieves_added_items:
            content = self.features.encode_item_content(extra)
            with torch.no_grad():
                v = self.candidate_model.content_embeddings(content.content()).cpu().numpy()
            got = np.asarray(content.item_id, dtype=np.int64)
            # Ascending, which `_search_added` relies on: `new` is by id, above every id added.
            assert bool(np.all(np.diff(got) > 0)) and (not len(ids) or got[0] > ids[-1])
            ids = self._growth.append("added_ids", got)
            vecs = self._growth.append("added_vecs", v.astype(np.float32))
        # Readers in other threads: the metadata first, then what makes the new items
        # known (`has_item`, requests), then `added_through` (`ServiceState.sync_items`).
        # In place: a copy would cost O(added items) per call; readers only look ids up.
        self.added.update((it.item_id, it) for it in new)
        self._raw_item.update({it.raw_id: it.item_id for it in new})
        self.channels = self.channels | {it.channel_id for it in new}
        self._live = _Live(items, featurizer, fresh, ids, vecs)
        self.items, self.featurizer, self.fresh = items, featurizer, fresh
        self.added_through = through

    def _search_added(
        self, live: _Live, u: np.ndarray, k: int, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The added items' exact top `k` by dot product with the user vector u [d]."""
        ids, scores = live.added_ids, live.added_vecs @ np.asarray(u, np.float32).reshape(-1)
        if exclude is None or not len(exclude):
            return top_k_by_score(ids, scores, k)
        # The few excluded ids looked up in the added ones (ascending: added in id order),
        # not each added id in the exclusions; dot products are finite, so -inf marks them.
        excluded = exclude[in_sorted(exclude, ids)]
        scores[np.searchsorted(ids, excluded)] = -np.inf
        ids, scores = top_k_by_score(ids, scores, k)
        keep = scores > -np.inf
        return ids[keep], scores[keep]

    # ---------------------------------------------------------------- lookups

    def has_item(self, item_id: int) -> bool:
        """Whether `item_id` (a dataset item id) is in the corpus."""
        return 0 < item_id <= self.items.num_items and bool(self.items.known[item_id])

    def _known_items(self, ids: np.ndarray) -> np.ndarray:
        """[n] bool `has_item` of each of `ids` [n] int64."""
        n = self.items.num_items
        return (ids > 0) & (ids <= n) & self.items.known[np.clip(ids, 0, n)]

    def item_metadata(self, item_id: int) -> dict[str, Any] | None:
        """item_id, raw_id, title, topic, channel_id, upload_ts, duration_s ... where known."""
        if not self.has_item(item_id):
            return None
        added = self.added.get(item_id)
        if added is not None:
            meta = {
                "item_id": added.item_id, "raw_id": added.raw_id, "title": added.title,
                "topic": added.topic, "channel_id": added.channel_id,
                "upload_ts": added.upload_ts, "duration_s": added.duration_s,
            }  # fmt: skip
            return {k: v for k, v in meta.items() if v is not None and k in self._metadata}
        row = self._items_table.slice(int(self._item_row[item_id]), 1).to_pylist()[0]
        return {k: v for k, v in row.items() if v is not None}

    def user_demographics(self, user_id: int) -> Demographics | None:
        """The user's demographics in the data set (None: an unknown user)."""
        if not 0 < user_id < len(self._user_row) or self._user_row[user_id] < 0:
            return None
        at = int(self._user_row[user_id])
        row = {name: column[at].as_py() for name, column in self._users.items()}
        age = row.get("age")
        return Demographics(
            age=None if age is None or math.isnan(age) else float(age),
            gender=row.get("gender"),
            region=row.get("region"),
            device=row.get("device"),
            logged_in=row.get("logged_in"),
        )

    # ---------------------------------------------------------------- live state

    def seed_state(self, store: UserStateStore) -> None:
        """Seed the live store with the packaged latest state (once per data set).

        A no-op when the store was seeded from the same data; ArtifactError when it holds
        another data set's state.
        """
        seed_store(self.path, self.data_fingerprint, store)

    def check_compatible_state(self, store: UserStateStore) -> None:
        """Raise ArtifactError when `store` was seeded from other data than this artifact's
        or a version it extends (`funnelrec data append`: the store's live events since
        then are the appended period's, as the service saw them)."""
        seeded = store.meta("seeded_from")
        if seeded is not None and seeded not in (self.data_fingerprint, *self.data_lineage):
            raise ArtifactError(
                f"{store.path}: the live state was seeded from data {seeded}, the artifact "
                f"{self.path} is of data {self.data_fingerprint}"
            )

    # ---------------------------------------------------------------- serving

    def user_vector(
        self, req: RecommendRequest, ctx: UserContext | None = None
    ) -> np.ndarray | None:
        """The deep source's query for a request: the candidate model's user vector, [d]
        float32, whose dot product with an item's vector is the item's deep score (None:
        the request has nothing to compute it from, and the deep source is not asked)."""
        user = self._context(req, ctx)
        if not user.has_signal:
            return None
        return self._user_tower.user_vector(self._candidate_input(user))

    def _candidate_input(self, user: _Context) -> CandidateBatch:
        return self.features.candidate_batch(
            [list(user.events.history)], [list(user.events.queries)], [user.demographics]
        )

    def recommend(self, req: RecommendRequest, ctx: UserContext | None = None) -> Response:
        """The top `req.k` items for a request (see the module docstring for the stages).

        ctx: the user's live state (`UserStateStore.context`), None for none.
        Raises FunnelrecError for an invalid request (k < 1, unknown item ids in history).
        """
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        if req.k < 1:
            raise FunnelrecError(f"k: must be at least 1, got {req.k}")
        t = time.perf_counter()
        live = self._live  # one catalogue for the whole request (items may be added)
        user = self._context(req, ctx)
        history = np.asarray(user.events.history, dtype=np.int64)
        if req.exclude is not None:
            watched: np.ndarray | None = np.unique(np.asarray(req.exclude, dtype=np.int64))
        else:
            watched = np.unique(history) if req.exclude_watched else None
        # The candidate model's input (also the user's region and device vocabulary ids,
        # which the ranker reads too): the same transforms as the training examples'.
        cand_batch = self._candidate_input(user)
        region, device = int(cand_batch.region[0]), int(cand_batch.device[0])
        timings["context"] = _ms(t)
        nominated: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        t = time.perf_counter()
        if user.has_signal and self.config.deep_k > 0:
            u = self._user_tower.user_vector(cand_batch)
            k_deep = min(max(self.config.deep_k, req.k), self.index.count)
            ids, scores = self.index.search(u, k_deep, exclude=watched)
            keep = ids >= 0
            ids, scores = ids[keep], scores[keep]
            if len(live.added_ids):
                more, more_scores = self._search_added(live, u, k_deep, watched)
                ids, scores = np.concatenate([ids, more]), np.concatenate([scores, more_scores])
                order = np.lexsort((ids, -scores))[:k_deep]
                ids, scores = ids[order], scores[order]
            nominated[DEEP] = (ids, scores)
        timings["candidates_deep"] = _ms(t)

        t = time.perf_counter()
        k_fresh = self.config.fresh_k if DEEP in nominated else max(self.config.fresh_k, req.k)
        if k_fresh > 0:
            nominated[FRESH] = live.fresh.top_k(history, k_fresh, exclude=watched)
        timings["candidates_fresh"] = _ms(t)

        t = time.perf_counter()
        if history.size and self.config.cowatch_k > 0:
            # Added items have no co-watch row: the packaged ones are asked about.
            n = self.cowatch.num_items
            packaged = history[history <= n]
            if packaged.size:
                excl = watched[watched <= n] if watched is not None else None
                nominated[COWATCH] = self.cowatch.top_k(
                    packaged, self.config.cowatch_k, exclude=excl
                )
        timings["candidates_cowatch"] = _ms(t)

        t = time.perf_counter()
        present = [s for s in SOURCES if s in nominated]
        all_ids = np.concatenate([nominated[s][0] for s in present] or [np.zeros(0, np.int64)])
        all_scores = np.concatenate(
            [np.asarray(nominated[s][1], np.float64) for s in present] or [np.zeros(0)]
        )
        all_src = np.repeat(np.arange(len(present)), [len(nominated[s][0]) for s in present])
        if watched is not None:
            keep = ~in_sorted(all_ids, watched)
            all_ids, all_scores, all_src = all_ids[keep], all_scores[keep], all_src[keep]
        # First nomination of each item, in SOURCES order: its primary source and score.
        _, first = np.unique(all_ids, return_index=True)
        first = np.sort(first)
        cand = all_ids[first].astype(np.int64)
        primary = np.asarray(present, dtype=object)[all_src[first]].tolist()
        timings["merge"] = _ms(t)

        items: list[RecommendedItem] = []
        t = time.perf_counter()
        features = None
        if len(cand):
            features = live.featurizer.request(
                user.events,
                cand,
                user.ts,
                region=region,
                device=device,
                sources=primary,
                scores=all_scores[first],
            )
        timings["features"] = _ms(t)

        t = time.perf_counter()
        if features is not None:
            logit = self._request_ranker.request_logits(features)
            # calibrated seconds (the ranker's validation factor): the order is exp(logit)'s
            ewt = self.ranker.seconds_from_logits(logit)
            order = np.lexsort((cand, -ewt))[: req.k]  # ties: smaller item id first
            top = cand[order]
            # Every nomination of the returned items, in SOURCES order: their sources' scores.
            sources: dict[int, dict[str, float]] = {item: {} for item in top.tolist()}
            hit = np.flatnonzero(in_sorted(all_ids, np.sort(top)))
            for item, src, score in zip(
                all_ids[hit].tolist(), all_src[hit].tolist(), all_scores[hit].tolist(), strict=True
            ):
                sources[item][present[src]] = score
            for item, e, lg in zip(
                top.tolist(), ewt[order].tolist(), logit[order].tolist(), strict=True
            ):
                items.append(RecommendedItem(item, e, lg, sources[item]))
        timings["ranking"] = _ms(t)
        timings["total"] = _ms(t_start)
        info = {
            "user_id": req.user_id,
            "known_user": user.known_user,
            "history": len(user.events.history),
            "queries": len(user.events.queries),
            "demographics": user.demographics_from,
            "request_ts": user.ts,
            "candidates": {s: len(nominated[s][0]) for s in SOURCES if s in nominated},
            "ranked": len(cand),
        }
        return Response(items=items, timings_ms=timings, info=info)

    def _context(self, req: RecommendRequest, ctx: UserContext | None) -> _Context:
        gap = self.config.explicit_gap_s
        if req.history is not None:
            for i, x in enumerate(req.history):
                if not self.has_item(int(x)):
                    raise FunnelrecError(f"history[{i}]: unknown item id {x}")
        history: list[int] = []
        history_ts: list[int] = []
        if req.history is None and ctx is not None:
            # Stored events were validated when they arrived; an item the corpus lacks
            # (state of another model) is left out rather than failing the request.
            if len(ctx.history) != len(ctx.history_ts):
                raise ValueError("the live state's history and its times differ in length")
            ok = self._known_items(np.asarray(ctx.history, dtype=np.int64))
            if ok.all():
                history, history_ts = list(ctx.history), list(ctx.history_ts)
            else:
                keep = np.flatnonzero(ok).tolist()
                history = [ctx.history[j] for j in keep]
                history_ts = [ctx.history_ts[j] for j in keep]
        queries: list[str] = []
        queries_ts: list[int] = []
        if req.queries is None and ctx is not None:
            queries, queries_ts = list(ctx.queries), list(ctx.queries_ts)
        latest = max([self.now, *history_ts, *queries_ts])
        if ctx is not None and ctx.last_ts is not None:
            latest = max(latest, ctx.last_ts)
        ts = latest + 1
        if req.history is not None:
            history = [int(x) for x in req.history]
            history_ts = [ts - gap * (len(history) - j) for j in range(len(history))]
        if req.queries is not None:
            queries = [str(q) for q in req.queries]
            queries_ts = [ts - gap * (len(queries) - j) for j in range(len(queries))]

        stored = self.user_demographics(req.user_id) if req.user_id is not None else None
        given = req.demographics
        demo: Demographics | None
        if given is not None and any(v is not None for v in asdict(given).values()):
            changes = {k: v for k, v in asdict(given).items() if v is not None}
            demo = replace(stored, **changes) if stored is not None else given
            demo_from = "request+stored" if stored is not None else "request"
        else:
            demo, demo_from = stored, "stored" if stored is not None else "none"
        known = stored is not None or (ctx is not None and bool(ctx.history or ctx.queries))
        # Times shown and when last shown: the churn features (paper 4.1), exact as in training.
        shown = dict(ctx.shown) if ctx is not None else {}
        shown_ts = dict(ctx.shown_ts) if ctx is not None else {}
        events = UserEvents(history, history_ts, queries, queries_ts, shown, shown_ts)
        return _Context(events, demo, demo_from, known, ts)


def seed_store(art: Path, data_fingerprint: str, store: UserStateStore) -> None:
    """Seed `store` with the state packaged in artifact `art` of data `data_fingerprint`
    (`Recommender.seed_state`, without loading the models; the manifest has the data's
    fingerprint: `read_manifest(art)["data"]["fingerprint"]`)."""
    seeded = store.meta("seeded_from")
    if seeded == data_fingerprint:
        return
    lineage = json.loads((Path(art) / MANIFEST).read_text())["data"].get("lineage") or []
    if seeded in lineage:
        return  # a version this artifact's data extends: its live state carries on
    if seeded is not None:
        raise ArtifactError(
            f"{store.path}: the live state was seeded from data {seeded}, the artifact "
            f"{art} is of data {data_fingerprint}"
        )
    state = Path(art) / STATE_DIR
    tables = {name: pq.read_table(state / f"{name}.parquet") for name in STATE_TABLES}
    store.seed(
        tables["watches"], tables["searches"], tables["impressions"], fingerprint=data_fingerprint
    )


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def read_manifest(path: Path) -> dict[str, Any]:
    """manifest.json of an artifact, checked for kind, format version and its files."""
    file = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such artifact directory")
    try:
        manifest: dict[str, Any] = json.loads(file.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{path}: not a recommender artifact (no {MANIFEST}; build one with "
            "`funnelrec package`)"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{file}: unreadable ({e})") from None
    if manifest.get("kind") != ARTIFACT_KIND:
        raise ArtifactError(f"{file}: not a recommender artifact (kind {manifest.get('kind')!r})")
    if manifest.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{file}: artifact format version {manifest.get('format_version')}, this "
            f"funnelrec {__version__} reads {ARTIFACT_FORMAT_VERSION}"
        )
    files = dict(manifest.get("files", {}))
    for rel, size in files.items():
        p = path / rel
        if not p.is_file():
            raise ArtifactError(f"{path}: {rel} is missing")
        if p.stat().st_size != size:
            raise ArtifactError(
                f"{path}: {rel} has {p.stat().st_size} bytes, the manifest says {size} "
                "(a part was replaced after packaging)"
            )
    # Sizes miss a part damaged or replaced in place; the content hashes do not. An artifact
    # packaged before the manifest listed them is checked against its fingerprint, a hash
    # of the same hashes (it cannot name the file).
    hashes = dict(manifest.get("sha256", {}))
    if not hashes and files:
        found = {rel: file_sha256(path / rel) for rel in files}
        data_fp = str(manifest.get("data", {}).get("fingerprint"))
        if artifact_fingerprint(found, data_fp) != manifest.get("fingerprint"):
            raise ArtifactError(
                f"{path}: its files do not match the manifest's fingerprint (a part was "
                "damaged or replaced after packaging)"
            )
        return manifest
    if set(hashes) != set(files):
        raise ArtifactError(f"{file}: the content hashes do not list the same files as sizes")
    for rel in sorted(files):
        if file_sha256(path / rel) != hashes[rel]:
            raise ArtifactError(
                f"{path}: {rel} does not match its content hash in the manifest "
                "(damaged or replaced after packaging)"
            )
    return manifest


def artifact_fingerprint(hashes: dict[str, str], data_fingerprint: str) -> str:
    """A short hash of every file's content hash and the data fingerprint: the artifact's
    id. hashes: relative path -> hex SHA-256."""
    h = hashlib.sha256(data_fingerprint.encode())
    for rel in sorted(hashes):
        h.update(rel.encode())
        h.update(bytes.fromhex(hashes[rel]))
    return h.hexdigest()[:16]
