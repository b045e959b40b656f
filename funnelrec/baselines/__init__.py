"""Non-neural recommenders: candidate sources for serving and baselines for evaluation.

Every model here is fitted on a training interaction table only (columns user_id, item_id,
ts: a pyarrow table or a mapping of numpy arrays; ids are dataset ids, 1..N) and answers
in two ways:

    score(histories)          -> [B, N + 1] float32 scores over every item id, column 0
                                 (padding) -inf: full-corpus evaluation
    top_k(history, k, exclude) -> (item ids [<= k], scores): a candidate source at serving

Histories are each user's watched item ids, oldest first (0 = padding, ignored): a list
of arrays or a `Jagged` (flat values + [B + 1] offsets).

The models:
- `Popularity`: (time-windowed, time-decayed) watch counts up to a reference time, the
  same ranking for everyone; with `fresh_half_life_s` the "fresh and popular now" source,
  which boosts recently uploaded items (formula in the class docstring).
- `CoWatch`: asymmetric item-to-item counts, i -> j when j is watched within the next few
  watches after i, normalised into P(j follows | i), top-N neighbours per item; a user is
  scored from their last watch (the serving source) or their last few (a baseline).
- `ItemKNN`: cosine similarity of items' user sets, top-N neighbours per item (100, as in
  the peer ItemKNN that benchmarks/real_data.py compares with), a user's score is the sum
  over their history's neighbours.
- `BPR`, `ALS`: matrix factorisation through the `implicit` library's CPU models.

Each saves to a directory (`baseline.json` with a format version + NPY arrays, written
atomically, no pickle) and `load_baseline(path)` reads any of them back.

    pop = Popularity(window_s=7 * 86400).fit(train, num_items=n)
    covisit = CoWatch(next_n=5, neighbours=100).fit(train, num_items=n)
    ids, scores = covisit.top_k(history=[12, 7, 40], k=100, exclude=[12, 7, 40])
    covisit.save(out / "cowatch"); load_baseline(out / "cowatch").score([[12, 7, 40]])

The modules:
- `data.py`: `Interactions`, `Jagged` (and `Histories`), the inputs of every model;
- `base.py`: `Baseline`, the shared interface, and the saved directory's format;
- `popularity.py`: `Popularity` and `upload_times`;
- `neighbours.py`: `CoWatch`, `ItemKNN` and `top_n_per_row`;
- `factorisation.py`: `BPR`, `ALS`.

This file holds `load_baseline`, which maps a saved `kind` to its class, and re-exports
the public names, so `from funnelrec.baselines import CoWatch` works as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from funnelrec.baselines.base import FORMAT_VERSION, META, Baseline
from funnelrec.baselines.data import Histories, Interactions, Jagged
from funnelrec.baselines.factorisation import ALS, BPR, MFConfig
from funnelrec.baselines.neighbours import (
    CoWatch,
    CoWatchConfig,
    ItemKNN,
    ItemKNNConfig,
    top_n_per_row,
)
from funnelrec.baselines.popularity import Popularity, PopularityConfig, upload_times
from funnelrec.errors import ArtifactError

__all__ = [
    "ALS",
    "BPR",
    "FORMAT_VERSION",
    "META",
    "Baseline",
    "CoWatch",
    "CoWatchConfig",
    "Histories",
    "Interactions",
    "ItemKNN",
    "ItemKNNConfig",
    "Jagged",
    "MFConfig",
    "Popularity",
    "PopularityConfig",
    "load_baseline",
    "top_n_per_row",
    "upload_times",
]

_KINDS: dict[str, type[Baseline]] = {c.kind: c for c in (Popularity, CoWatch, ItemKNN, BPR, ALS)}


def load_baseline(path: Path | str) -> Baseline:
    """Read any model written by `Baseline.save` (no pickle: JSON + NPY)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not a saved baseline (no {META})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable {META} ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: baseline format version {meta.get('format_version')}, "
            f"this funnelrec reads {FORMAT_VERSION}"
        )
    cls = _KINDS.get(meta.get("kind", ""))
    if cls is None:
        raise ArtifactError(f"{path}: unknown baseline kind {meta.get('kind')!r}")
    try:
        model = cls.from_config(dict(meta["config"]))
        model.num_items = int(meta["num_items"])
        model.fit_seconds = float(meta.get("fit_seconds", 0.0))
        arrays = {
            name: np.load(path / fname, allow_pickle=False)
            for name, fname in dict(meta["arrays"]).items()
        }
        model._set_arrays(arrays, meta)
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise ArtifactError(f"{path}: broken baseline ({type(e).__name__}: {e})") from None
    model._fitted = True
    return model
