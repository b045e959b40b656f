"""Training examples for both stages, built from canonical tables with leak-free splits.

    build_features(DATA, FEAT, split="last", config=FeaturesConfig())   # funnelrec.features.build
    feats = Features.open(FEAT)          # vocabularies, normalisers, specs, counts
    feats.candidate_batch([[12, 7]], [["funny cats"]], [Demographics(age=31)])  # serving

Layout of a features directory (written atomically: built under a temporary name, renamed):

    FEAT/features.json                       format version, data fingerprint, split and its
                                             boundaries, config, counts, OOV rates, specs
    FEAT/transforms/<vocab>.parquet          item, token, region, device, gender,
                                             rank_item, channel, topic (see `vocab`)
    FEAT/transforms/candidates_dense.json    quantile normaliser of the user's age
    FEAT/transforms/ranking_dense.json       quantile normaliser of the ranking features
    FEAT/transforms/item_label_counts.parquet  training label count per item vocabulary id
    FEAT/transforms/item_content.parquet     every catalogue item's content (channel, topic,
                                             title tokens, duration, age) for the candidate
                                             model's content tower, with its vocabularies
                                             content_channel, content_topic, title_token
                                             (`content.py`; absent in older directories)
    FEAT/candidates/{train,valid,test}/part-NNNNN.parquet
    FEAT/ranking/{train,valid,test}/part-NNNNN.parquet   one row per impression (when the
                                             data has impressions)
    FEAT/ranking/{train,valid,test}/requests.parquet     the bags of each request

Candidate-generation examples (Covington et al. 2016, sections 3.2-3.4). For a label watch
of user u at time t (every watch, whatever its source):
- history: item ids of the last `history_n` watches before it (watch order: ts, then row
  order), OOV ids left out of the bag;
- search: tokens (unigrams + bigrams) of the last `search_n` queries with ts < t, a bag;
- region, device: vocabulary ids; dense: see `CANDIDATE_DENSE` (`config.py`);
- example_age: (t_max - t) / (t_max - t_min) over the training watches' time range, in
  [0, 1]; 0 for validation and test examples, which stand for serving time;
- label: the item's vocabulary id. A training example whose label fell out of a truncated
  vocabulary is dropped (counted in the manifest); held-out ones keep label 0 (a miss).
Training labels: at most `cap` per user (None: all), sampled with `seed` from the user's
training watches. `labels="random"` is the ablation of section 3.4: the label is a random
training watch and the history the `history_n` training watches around it (both sides).
Held-out examples: leave-last-out gives one validation (second-to-last watch) and one test
(last watch) example per user, history = everything before the target (for the test target
that includes the validation watch). The time split takes up to `eval_cap` watches per user
from each held-out window, history = everything before each.
Valid/test shards also carry `seen`: the distinct item vocabulary ids the user watched
before the target (for "exclude already watched" in evaluation; see `loader.seen_items`).

Ranking examples (section 4.1), one per impression, when the data has impressions:
- categorical: item (impression item), seed (the last watch before the request), both in
  the `rank_item` vocabulary (fitted on clicked training impressions), channel, topic,
  region, device;
- bags: history (last `history_n` watched items, `rank_item` vocabulary), search tokens;
  the same for every impression of a request, so stored once per request in
  requests.parquet; an impression row points at its request by `request_index`;
- continuous (raw in the shards, quantile-normalised by the loader into x, x^2, sqrt(x) and
  missing flags): see `RANKING_CONTINUOUS`;
- label = clicked, watch_time = seconds watched; request_id and user_id are kept.
Every feature uses events strictly before the impression's ts, computed with sorting and
searchsorted (`splits.TimeIndex`), never a Python loop per impression.

Fitted on the training part only: every vocabulary, both normalisers, the item counts that
the candidate model's negative sampler uses, and example_age's time range. The item
content's vocabularies and scaling: on the items known at the training window's end
(uploaded by then, or watched in it).

The package, in the order the data flows (`build.py` runs it over the data):

- `config.py`: `FeaturesConfig`, the format's version and file names, the feature columns;
- `vocab.py`, `normalize.py`, `tokenize.py`: the fitted transforms;
- `content.py`: the item content table (`fit_item_content`, `ContentTable`);
- `splits.py`: leave-last-out and time splits, and the time index of every feature;
- `tables.py`: the dataset's users and items by id, the events sorted by (user, ts);
- `vectorised.py`: bags as flat ids + offsets (`gather_ranges`, `drop_zeros`), sampling;
- `transforms.py`: `UserEncoder`, demographics -> region, device and dense columns;
- `candidate_examples.py`: candidate-generation examples;
- `ranking_examples.py`: ranking examples and the bags of their requests;
- `build.py`, `fit.py`, `write.py`, `finish.py`: `build_features`; `partition.py` and
  `blocked.py`: large data built in blocks of users, resumably;
- `reader.py`: `Features`, an opened features directory, and serving-time batches;
- `batch.py`, `loader.py`: the batch types (and `ItemContent`) and shards -> batches;
- `serving.py`: the ranking features at serving time, from live state.

This file only re-exports the public names.
"""

from __future__ import annotations

from funnelrec.features.config import (
    CANDIDATE_DENSE,
    CANDIDATE_SCORE,
    CANDIDATE_SOURCE,
    FORMAT_VERSION,
    MANIFEST,
    RANKING_CONTINUOUS,
    REQUESTS,
    SHARD_OPTIONS,
    FeaturesConfig,
)
from funnelrec.features.reader import Demographics, Features
from funnelrec.features.transforms import UserEncoder
from funnelrec.features.vectorised import drop_zeros, gather_ranges

__all__ = [
    "CANDIDATE_DENSE",
    "CANDIDATE_SCORE",
    "CANDIDATE_SOURCE",
    "FORMAT_VERSION",
    "MANIFEST",
    "RANKING_CONTINUOUS",
    "REQUESTS",
    "SHARD_OPTIONS",
    "Demographics",
    "Features",
    "FeaturesConfig",
    "UserEncoder",
    "drop_zeros",
    "gather_ranges",
]
