"""What examples are built from and written as: `FeaturesConfig`, the features
format's version and file names, and the names of both stages' feature columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from funnelrec.errors import FunnelrecError
from funnelrec.features.vocab import Vocabulary, embedding_dim

FORMAT_VERSION = 1
MANIFEST = "features.json"
REQUESTS = "requests.parquet"  # per split: the query-side bags of each ranking request
# Example shards: zstd without dictionary pages or statistics writes faster than Arrow's
# defaults and is no larger, as ids and floats rarely repeat within a page (docs/features.md,
# "On disk").
SHARD_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": False,
    "write_statistics": False,
}

# Candidate dense columns, in order, for the user columns the data has:
#   age, age_missing            age quantile-normalised to [0, 1) (training users), flag
#   logged_in, logged_in_missing  1.0 / 0.0, flag
#   gender=<v> ..., gender_missing  one-hot over the gender vocabulary, flag
CANDIDATE_DENSE = ("age", "logged_in", "gender")

# Ranking continuous features (raw values; NaN = missing), all from events before ts. Those
# marked "paper" are the ones Covington et al. 2016, section 4.1 names among the strongest:
RANKING_CONTINUOUS = (
    "user_prior_watches",  # watches of the user so far
    "user_last_watch_ago_s",  # seconds since the user's last watch
    "channel_watches",  # the user's watches from the item's channel (paper)
    "channel_last_watch_ago_s",  # seconds since the user last watched this channel
    "topic_watches",  # the user's watches of the item's topic
    "topic_last_watch_ago_s",  # seconds since the user last watched this topic (paper)
    "item_watched_before",  # times the user already watched this item
    "item_shown_before",  # times the item was already shown to the user (churn, paper)
    "item_last_shown_ago_s",  # seconds since it was last shown to the user
    "item_prior_watches",  # the item's watches by everyone so far (popularity)
    "item_age_s",  # seconds since upload
    "duration_s",  # the item's duration
)
# Optional impression columns (from a candidate generator) that become features when present.
CANDIDATE_SCORE, CANDIDATE_SOURCE = "cand_score", "cand_source"
# The values of `cand_source` the Recommender serves and the pages from retrieved
# candidates log: the candidate model through the ANN index, co-watch, fresh and popular.
DEEP_SOURCE, COWATCH_SOURCE, FRESH_SOURCE = "deep", "cowatch", "fresh"


@dataclass(frozen=True)
class FeaturesConfig:
    """How examples are built. Every default is the paper's choice unless said otherwise.

    history_n:      last N watched items in a history bag [paper: 50]
    search_n:       last N queries whose tokens form the search bag [paper: 50]
    cap:            training examples per user, sampled from their watches (None = all)
    rank_cap:       training ranking requests (pages, with all their impressions) per user,
                    sampled (None = all); held-out requests are all kept
    eval_cap:       time split: held-out examples per user and window (None = all)
    labels:         "next" (predict the next watch, the paper) or "random" (ablation)
    seed:           sampling of capped examples and the shuffle of training rows
    min_watches:    leave-last-out: users with fewer watches hold nothing out
    valid_n:        leave-last-out: validation watches per user before the test one (at
                    least one training watch is kept)
    valid_frac, test_frac: time split: share of watches after t1 / t2 when t1, t2 unset
    t1, t2:         time split boundaries (timestamps); None = from the fractions
    max_items, max_tokens, max_rank_items: vocabulary truncation (top N; None = all seen)
    min_count:      drop vocabulary values seen fewer times in training
    title_min_count, max_title_tokens: the item content's title tokens (`content.py`):
                    kept when on at least this many known items' titles (a token of one
                    title would only be another item id) [2], the most frequent N [all]
    n_quantiles:    knots of the quantile normalisers [~1,000]
    quantile_sample: normalisers are fitted on at most this many training values
    ranking:        build ranking examples when the data has impressions
    candidate_columns: use the impressions' cand_source / cand_score as ranking features
                    when they carry them; false: ignore them, e.g. when the logging
                    policy's sources are not the ones served
    emb_scale, emb_min, emb_max: embedding width rule (see `vocab.embedding_dim`)
    dims:           per-vocabulary width overrides, e.g. "item=64,topic=8"
    chunk_rows:     examples built at once (bounds memory)
    rows_per_shard: rows per Parquet file
    row_group_rows: rows per Parquet row group (the loader's unit of reading and shuffling)
    block_events:   data with more events (watches + searches + impressions) is built in
                    blocks of users of about this many events each: bounds memory (see
                    `funnelrec.features.partition`; docs/scale.md has a block's memory per
                    million events)
    """

    history_n: int = 50
    search_n: int = 50
    cap: int | None = 30
    rank_cap: int | None = None
    eval_cap: int | None = 30
    labels: Literal["next", "random"] = "next"
    seed: int = 0
    min_watches: int = 3
    valid_n: int = 1
    valid_frac: float = 0.1
    test_frac: float = 0.1
    t1: int | None = None
    t2: int | None = None
    max_items: int | None = None
    max_tokens: int | None = None
    max_rank_items: int | None = None
    min_count: int = 1
    title_min_count: int = 2
    max_title_tokens: int | None = None
    n_quantiles: int = 1000
    quantile_sample: int = 1_000_000
    ranking: bool = True
    candidate_columns: bool = True
    emb_scale: float = 1.6
    emb_min: int = 4
    emb_max: int = 64
    dims: str = ""
    chunk_rows: int = 200_000
    rows_per_shard: int = 2_000_000
    row_group_rows: int = 65_536
    block_events: int = 50_000_000

    def __post_init__(self) -> None:
        for name in (
            "valid_n",
            "history_n",
            "search_n",
            "chunk_rows",
            "rows_per_shard",
            "row_group_rows",
            "block_events",
        ):
            if getattr(self, name) < 1:
                raise FunnelrecError(f"features config: {name} must be >= 1")
        for name in ("cap", "eval_cap", "rank_cap"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FunnelrecError(f"features config: {name} must be >= 1 or none, got {v}")
        if self.labels not in ("next", "random"):
            raise FunnelrecError(
                f"features config: labels must be next or random, got {self.labels}"
            )
        self.dim_overrides()  # validate early

    def dim_overrides(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in self.dims.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit() or int(value) < 1:
                raise FunnelrecError(
                    f"features config: dims entry '{part}' is not of the form name=width"
                )
            out[name.strip()] = int(value)
        return out

    def dim(self, vocab: Vocabulary) -> int:
        override = self.dim_overrides().get(vocab.name)
        if override is not None:
            return override
        return embedding_dim(
            len(vocab), scale=self.emb_scale, minimum=self.emb_min, maximum=self.emb_max
        )
