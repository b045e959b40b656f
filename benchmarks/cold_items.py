"""MovieLens-100k with a cold-item split: can the candidate model retrieve items nobody
rated in its training period? The item content tower (`item_content = true`,
docs/candidates.md) against the id-only model of Covington et al. 2016, section 3.

    .venv/bin/python benchmarks/cold_items.py                        # 3 seeds, both arms
    .venv/bin/python benchmarks/cold_items.py --arms id-only,content,content-id-dropout
    .venv/bin/python benchmarks/cold_items.py --seeds 0 --arms content --out /tmp/c.json

Protocol (one cut in time, the same for every arm and seed):
  cut T         the time by which `--cut` (90%) of the ratings have happened: the
                `--cut` quantile of the rating times (numpy "higher": a rating's time)
  training      the ratings before T; the catalogue (items table: title, first genre as
                topic, release date as upload time) is every item, rated or not
  cold items    the items whose first rating is at or after T: nobody rated them in the
                training period, so no id vocabulary fitted on it holds them
  queries       one per user with a rating at or after T, made at T: the history is the
                user's ratings before T in time order (ties in file order), the
                demographics those of the users table, example age 0 (as served,
                section 3.3). "cold": the users who rated a cold item after T, targets
                the distinct cold items they rated then ("cold_with_history": those of
                them who rated something before T); "all": every user who rated
                anything after T, targets every distinct item they rated then
  scoring       exact dot products over every catalogue item the model can represent:
                the id-only model's export is its vocabulary (items rated in training),
                so a cold target is a miss by construction; the content tower's export
                is every catalogue item (a cold item by its content alone). The user's
                items rated before T are excluded from the ranking, never a target (a
                rating is never repeated in MovieLens anyway); ties broken at random with
                a fixed seed (`metrics.tie_keys`). HR@K: at least one target in the top K;
                recall@K: the share of the targets there (`metrics.RetrievalMetrics`)
  training      the project's MovieLens-100k settings (configs/candidates-ml100k.toml),
                the two arms differing only in `item_content`. Nothing is tuned on the
                test period: the epoch is chosen as the defaults choose it (early
                stopping on validation Recall@K) with the last `--valid-frac` (10%) of
                the training ratings by time held out (features `--split time`, t1 = that
                cut, t2 = T), then the model is refitted on every rating before T for
                that many epochs (features with t1 = T: nothing held out).
                `--arms content-id-dropout` adds the tower's `id_dropout=0.5`
                (supplementary: not a default, not chosen by validation)
  references    without a model, in the JSON's "references": "chance" (under "split"),
                a uniformly random order; "newest_first", the catalogue by release date,
                newest first (ties at random), the same for every user: cold items are
                new releases, so this prior is the one to read the cold figures against

`--seeds 0,1,2` trains each arm once per seed and records the mean, standard deviation
(ddof 1), min and max of every figure, and each seed's own run. Writes
benchmarks/results/cold_items.json after every seed (`complete` false until the end),
with the machine, the code's commit, the load average and `--also-running` (what else the
machine was doing), and prints a table.

Data: a funnelrec dataset of MovieLens-100k (`--data`, default WORK/ml-100k), fetched
with `funnelrec.data.fetch` when missing (GroupLens, else the recbole 1.2.1 wheel from the
package index); where it cannot be had the benchmark says so and stops without a result.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from funnelrec.candidates import (
    fit_candidates,
    load_candidate_model,
    load_item_embeddings,
    load_training_config,
)
from funnelrec.candidates.artifacts import read_candidate_config
from funnelrec.candidates.metrics import RetrievalMetrics, exclusion_mask, target_ranks, tie_keys
from funnelrec.config import load_config
from funnelrec.data.dataset import Dataset, DatasetWriter, write_json_atomic
from funnelrec.errors import FunnelrecError
from funnelrec.features import Demographics, Features, FeaturesConfig
from funnelrec.features.build import build_features

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "cold_items.json"
CONFIG = ROOT / "configs" / "candidates-ml100k.toml"
# The arms: candidate config overrides. The benchmark's two (DEFAULT_ARMS) differ only in
# the content tower; `content-id-dropout` is a supplementary one with the tower's
# documented option of scoring training rows by their content alone (docs/candidates.md),
# which trains the content vectors the way cold items are scored; `content-no-age` the
# tower without its item-age term (`item_age=false`), to show what the term does.
ARMS: dict[str, tuple[str, ...]] = {
    "id-only": (),
    "content": ("item_content=true",),
    "content-id-dropout": ("item_content=true", "id_dropout=0.5"),
    "content-no-age": ("item_content=true", "item_age=false"),
}
DEFAULT_ARMS = ("id-only", "content")
KS = (10, 50)
PARTS = ("cold", "cold_with_history", "all")  # the query sets (see the protocol)
TIE_SEED = 0  # the evaluation's tie-break, fixed whatever the training seed
QUERY_BATCH = 256
# The features the ML-100k config was written for (its header): every watch an example.
FEATURE_DEFAULTS = ("cap=none",)


# ---------------------------------------------------------------------------------------
# The split


@dataclass(frozen=True)
class Queries:
    """One query per user at the cut: users [Q] (ascending), their histories (dataset item
    ids rated before the cut, oldest first) and targets (distinct dataset item ids)."""

    users: np.ndarray
    histories: list[np.ndarray]
    targets: list[np.ndarray]

    def __len__(self) -> int:
        return int(self.users.size)

    def subset(self, keep: np.ndarray) -> Queries:
        """The queries where `keep` [Q] bool is true."""
        rows = np.flatnonzero(keep)
        return Queries(
            self.users[rows],
            [self.histories[r] for r in rows],
            [self.targets[r] for r in rows],
        )


@dataclass(frozen=True)
class ColdSplit:
    """The cut of one dataset. t_cut: T; t_valid: the epoch-choice cut inside the training
    period; cold: [C] dataset ids of the items first rated at or after T."""

    num_items: int
    t_cut: int
    t_valid: int
    train_ratings: int
    test_ratings: int
    cold: np.ndarray
    cold_test_ratings: int
    queries: dict[str, Queries]  # PARTS

    def describe(self) -> dict[str, Any]:
        def utc(t: int) -> str:
            return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")

        q = self.queries
        return {
            "t_cut": self.t_cut,
            "t_cut_utc": utc(self.t_cut),
            "t_valid": self.t_valid,
            "t_valid_utc": utc(self.t_valid),
            "catalogue_items": self.num_items,
            "training_ratings": self.train_ratings,
            "test_ratings": self.test_ratings,
            "cold_items": int(self.cold.size),
            "cold_test_ratings": self.cold_test_ratings,
            "queries": {k: len(v) for k, v in q.items()},
            "targets": {k: int(sum(t.size for t in v.targets)) for k, v in q.items()},
            "queries_without_history": {
                k: int(sum(h.size == 0 for h in v.histories)) for k, v in q.items()
            },
            "chance": {k: chance(v, self.num_items) for k, v in q.items()},
        }


def chance(queries: Queries, num_items: int) -> dict[str, float]:
    """The expected HR / recall @ KS of a uniformly random order of the whole catalogue
    (the items rated before the cut excluded): the floor a model that represents every
    item must clear. With n items ranked and t targets, HR@K = 1 - C(n - t, K) / C(n, K)
    and recall@K = K / n."""
    out: dict[str, float] = {}
    for k in KS:
        hr, rec = [], []
        for h, t in zip(queries.histories, queries.targets, strict=True):
            n = num_items - np.setdiff1d(h, t).size
            i = np.arange(min(k, n))
            hr.append(1.0 - float(np.prod((n - t.size - i) / (n - i))) if n > k else 1.0)
            rec.append(min(1.0, k / n))
        out[f"hr@{k}"] = float(np.mean(hr)) if hr else 0.0
        out[f"recall@{k}"] = float(np.mean(rec)) if rec else 0.0
    return out


def cold_split(ds: Dataset, cut: float = 0.9, valid_frac: float = 0.1) -> ColdSplit:
    """Cut `ds`'s ratings at the `cut` quantile of their times (see the module's protocol)."""
    if not 0.0 < cut < 1.0:
        raise FunnelrecError(f"--cut must be in (0, 1), got {cut}")
    if not 0.0 < valid_frac < 1.0:
        raise FunnelrecError(f"--valid-frac must be in (0, 1), got {valid_frac}")
    w = ds.table("watches", ["user_id", "item_id", "ts"])
    if w.num_rows == 0:
        raise FunnelrecError(f"{ds.path}: no ratings")
    user = np.asarray(w.column("user_id").to_numpy(), dtype=np.int64)
    item = np.asarray(w.column("item_id").to_numpy(), dtype=np.int64)
    ts = np.asarray(w.column("ts").to_numpy(), dtype=np.int64)
    num_items = int(ds.num_rows("items"))
    t_cut = int(np.quantile(ts, cut, method="higher"))
    before = ts < t_cut
    if not before.any() or before.all():
        raise FunnelrecError(f"cut {cut}: no ratings on one side of t={t_cut}")
    t_valid = int(np.quantile(ts[before], 1.0 - valid_frac, method="higher"))
    if not (ts[before] < t_valid).any():
        raise FunnelrecError(f"--valid-frac {valid_frac}: nothing left to train on")
    first = np.full(num_items + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, item, ts)
    is_cold = first >= t_cut
    is_cold[0] = False
    is_cold &= first < np.iinfo(np.int64).max  # never rated: neither cold nor warm
    cold = np.flatnonzero(is_cold)

    order = np.lexsort((np.arange(ts.size), ts, user))  # by user, time, file order
    user, item, ts, before = user[order], item[order], ts[order], before[order]

    def queries(keep: np.ndarray) -> Queries:
        """Users with a test rating in `keep` [n] bool, their targets among those."""
        sel = ~before & keep
        users = np.unique(user[sel])
        hist_users, hist_items = user[before], item[before]
        lo = np.searchsorted(hist_users, users, side="left")
        hi = np.searchsorted(hist_users, users, side="right")
        t_users, t_items = user[sel], item[sel]
        tlo = np.searchsorted(t_users, users, side="left")
        thi = np.searchsorted(t_users, users, side="right")
        return Queries(
            users=users,
            histories=[hist_items[a:b] for a, b in zip(lo, hi, strict=True)],
            targets=[np.unique(t_items[a:b]) for a, b in zip(tlo, thi, strict=True)],
        )

    cold_q = queries(is_cold[item])
    return ColdSplit(
        num_items=num_items,
        t_cut=t_cut,
        t_valid=t_valid,
        train_ratings=int(before.sum()),
        test_ratings=int((~before).sum()),
        cold=cold,
        cold_test_ratings=int((~before & is_cold[item]).sum()),
        queries={
            "cold": cold_q,
            "cold_with_history": cold_q.subset(np.array([h.size > 0 for h in cold_q.histories])),
            "all": queries(np.ones(ts.size, dtype=bool)),
        },
    )


def write_training_data(ds: Dataset, out: Path, t_cut: int) -> Path:
    """A copy of `ds` with only the ratings before `t_cut`: the users and items tables
    (the whole catalogue, cold items included) and the id maps as they are."""
    watches = ds.table("watches")
    keep = pc.less(watches.column("ts"), pa.scalar(t_cut, pa.int64()))
    with DatasetWriter(
        out,
        source=ds.manifest.source,
        force=True,
        extra={**ds.manifest.extra, "ratings_before": t_cut, "cut_from": str(ds.path)},
    ) as w:
        for name in ("users", "items"):
            w.write(name, ds.table(name))
        w.write("watches", watches.filter(keep))
        for space in ds.manifest.id_maps:
            w.add_id_map(space, ds.id_map(space).sort_by("id").column("raw_id"))
    return out


# ---------------------------------------------------------------------------------------
# Training: choose the epoch on validation inside the training period, then refit


@dataclass(frozen=True)
class Builds:
    """The two features builds of the training data: `select` holds out the validation
    ratings (the epoch choice), `final` trains on every rating before the cut."""

    select: Features
    final: Features


def build_both(train_data: Path, work: Path, split: ColdSplit, overrides: Sequence[str]) -> Builds:
    """Both features builds of the training data (`--split time`, t1 and t2 set)."""
    built = []
    for name, t1, t2 in (
        ("select", split.t_valid, split.t_cut),
        ("final", split.t_cut, split.t_cut + 1),  # no rating is at or after the cut
    ):
        cfg = load_config(
            FeaturesConfig, None, [*FEATURE_DEFAULTS, *overrides, f"t1={t1}", f"t2={t2}"]
        )
        out = work / f"features-{name}"
        build_features(train_data, out, split="time", config=cfg, force=True, progress=False)
        built.append(Features.open(out))
    if built[1].num_examples("candidates", "valid") != 0:
        raise FunnelrecError("the refit's features hold out ratings: the cut is wrong")
    return Builds(*built)


def best_epoch(art: Path) -> int:
    """The epoch whose weights early stopping kept (1-based), from the artifact's record."""
    t = read_candidate_config(art)["training"]
    per_epoch = max(1, int(t["steps"]) // max(1, int(t["epochs"])))
    return max(1, round(int(t["best_step"]) / per_epoch))


def train_arm(
    feats: Builds, work: Path, arm: str, seed: int, config: Path, overrides: Sequence[str]
) -> tuple[Path, dict[str, Any]]:
    """Fit one arm at one seed: early stopping on `select`, a refit on `final`."""
    base = [*ARMS[arm], *overrides, f"train.seed={seed}"]
    select_art, final_art = work / f"{arm}-{seed}-select", work / f"{arm}-{seed}-final"
    cpu, wall = time.process_time(), time.perf_counter()
    fit_candidates(
        feats.select, select_art, load_training_config(config, base), force=True, progress=False
    )
    epoch = best_epoch(select_art)
    meta = read_candidate_config(select_art)["training"]
    fit_candidates(
        feats.final,
        final_art,
        load_training_config(config, [*base, f"train.epochs={epoch}", "train.patience=0"]),
        force=True,
        progress=False,
    )
    shutil.rmtree(select_art, ignore_errors=True)
    return final_art, {
        "epochs_run_for_choice": int(meta["epochs"]),
        "best_epoch": epoch,
        "valid_history": meta["valid_history"],
        "fit_wall_s": round(time.perf_counter() - wall, 2),
        "fit_cpu_s": round(time.process_time() - cpu, 2),
    }


# ---------------------------------------------------------------------------------------
# Scoring


def demographics_of(ds: Dataset) -> dict[int, Demographics]:
    out = {}
    for r in ds.table("users").to_pylist():
        age = r.get("age")
        out[int(r["user_id"])] = Demographics(
            age=None if age is None or age != age else float(age),
            gender=r.get("gender"),
            region=r.get("region"),
            device=r.get("device"),
            logged_in=r.get("logged_in"),
        )
    return out


# users [b] and their histories -> [b, num_items + 1] scores by dataset item id
ScoreFn = Callable[[np.ndarray, list[np.ndarray]], torch.Tensor]


def evaluate(
    score: ScoreFn, queries: Queries, num_items: int, representable: np.ndarray
) -> dict[str, float]:
    """HR / recall @ KS of `score` on `queries`, ranking the items `representable`
    [num_items + 1] bool only: a target outside them is a miss, whatever its score."""
    n1 = num_items + 1
    keys = tie_keys(n1, TIE_SEED)
    acc = RetrievalMetrics(KS)
    width = max((t.size for t in queries.targets), default=1)
    outside = torch.from_numpy(~representable)
    for lo in range(0, len(queries), QUERY_BATCH):
        hi = min(len(queries), lo + QUERY_BATCH)
        histories = queries.histories[lo:hi]
        s = score(queries.users[lo:hi], histories)
        target = torch.full((hi - lo, width), -1, dtype=torch.int64)
        for r, t in enumerate(queries.targets[lo:hi]):
            target[r, : t.size] = torch.from_numpy(t)
        flat = np.concatenate([*histories, np.zeros(0, np.int64)])
        offsets = np.concatenate([[0], np.cumsum([h.size for h in histories])])
        exclude = exclusion_mask(torch.from_numpy(flat), torch.from_numpy(offsets[:-1]), n1)
        ranks = target_ranks(s, target, exclude | outside[None, :], keys)
        ranks[outside[target.clamp(min=0)]] = torch.inf  # targets are never excluded
        acc.update(ranks, torch.tensor([t.size for t in queries.targets[lo:hi]]))
    m = acc.compute()
    metrics = {f"{x}@{k}": m[f"{x}@{k}"] for x in ("hr", "recall") for k in KS}
    metrics["representable_targets"] = float(
        np.mean([representable[t].mean() for t in queries.targets]) if len(queries) else 0.0
    )
    return metrics


def score_queries(
    feats: Features,
    art: Path,
    queries: Queries,
    num_items: int,
    demographics: dict[int, Demographics],
) -> dict[str, float]:
    """The candidate model of `art` on `queries`: exact scores over its exported items."""
    model = load_candidate_model(art)
    emb, ids = load_item_embeddings(art)
    representable = np.zeros(num_items + 1, dtype=bool)
    representable[ids.numpy()] = True

    def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        batch = feats.candidate_batch(
            [h.tolist() for h in histories],
            demographics=[demographics.get(int(u)) for u in users],
            user_ids=users.tolist(),
        )
        s = torch.full((users.size, num_items + 1), -torch.inf)
        with torch.no_grad():
            s[:, ids] = model(batch) @ emb.T
        return s

    return evaluate(score, queries, num_items, representable)


def newest_first(ds: Dataset, queries: Queries, num_items: int) -> dict[str, float]:
    """A reference without a model: the whole catalogue by release date, newest first
    (ties at random), the same for every user. What a prior on recent releases alone
    retrieves, to read the content tower's cold figures against."""
    items = ds.table("items").sort_by("item_id")
    released = np.full(num_items + 1, -np.inf, dtype=np.float32)
    if "upload_ts" in items.column_names:
        ts = pc.fill_null(items.column("upload_ts").cast(pa.float64()), -np.inf).to_numpy()
        released[np.asarray(items.column("item_id").to_numpy())] = ts
    representable = np.ones(num_items + 1, dtype=bool)
    representable[0] = False

    def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(released).expand(users.size, -1).contiguous()

    return evaluate(score, queries, num_items, representable)


# ---------------------------------------------------------------------------------------
# The run


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _rolling() -> ModuleType:
    """benchmarks/rolling.py, loaded by path (benchmarks/ is a folder of scripts), for the
    run records every benchmark here keeps: `load_average`, `code_version`."""
    key = "funnelrec_bench_rolling"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / "rolling.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def load_average() -> dict[str, float]:
    return dict(_rolling().load_average())


def code_version() -> dict[str, Any]:
    return dict(_rolling().code_version())


def over_seeds(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean, standard deviation (ddof 1; 0 for one seed), min and max of every figure of
    `runs` (one per seed) for each of PARTS, and the runs themselves under "seeds"."""
    out: dict[str, Any] = {}
    for part in PARTS:
        keys = next(iter(runs.values()))[part].keys()
        vals = {k: np.array([r[part][k] for r in runs.values()]) for k in keys}
        out[part] = {k: float(v.mean()) for k, v in vals.items()}
        out[f"{part} std"] = {
            k: float(v.std(ddof=1)) if v.size > 1 else 0.0 for k, v in vals.items()
        }
        out[f"{part} min"] = {k: float(v.min()) for k, v in vals.items()}
        out[f"{part} max"] = {k: float(v.max()) for k, v in vals.items()}
    out["seeds"] = {str(s): r for s, r in runs.items()}
    return out


PROTOCOL = {
    "cut": "T = the --cut quantile of the rating times; training = ratings before T",
    "cold_items": "items whose first rating is at or after T",
    "queries": "one per user with a rating at or after T, made at T with the user's "
    "ratings before T as history (time order, ties in file order), the users table's "
    "demographics, example age 0; 'cold': users who rated a cold item after T, targets the "
    "distinct cold items they rated then ('cold_with_history': those of them with a "
    "rating before T); 'all': users who rated anything after T, targets "
    "every distinct item they rated then",
    "scoring": "exact dot products over every item the model exports (id-only: its "
    "vocabulary, items rated before T; content tower: every catalogue item), items rated "
    "before T excluded (never a target); a target the model cannot represent is a miss; "
    f"ties broken at random with seed {TIE_SEED}; hr@K: a target in the top K, recall@K: "
    "the share of the targets in the top K, each averaged over queries",
    "training": "configs/candidates-ml100k.toml, the arms differing only in item_content; "
    "epoch chosen by early stopping on validation Recall@K with the last --valid-frac of "
    "the training ratings by time held out, then a refit on every rating before T for "
    "that many epochs; nothing tuned on the test period; content-id-dropout "
    "(supplementary) adds id_dropout=0.5",
    "references": "chance (split.chance): the expected figures of a uniformly random order; "
    "newest_first: the catalogue by release date, newest first, ties at random, the same "
    "for every user",
}


def run(
    data: Path,
    work: Path,
    out: Path,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    arms: Sequence[str] = DEFAULT_ARMS,
    cut: float = 0.9,
    valid_frac: float = 0.1,
    config: Path = CONFIG,
    overrides: Sequence[str] = (),
    feature_overrides: Sequence[str] = (),
    also_running: str = "",
    console: Console | None = None,
) -> dict[str, Any]:
    """The benchmark on the dataset at `data`; writes `out` after every seed."""
    console = console or Console(stderr=True)
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise FunnelrecError(f"--arms: unknown {unknown or 'none given'}; known {list(ARMS)}")
    started = time.perf_counter()
    ds = Dataset.open(data)
    split = cold_split(ds, cut, valid_frac)
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"cut: {split.describe()}")
    train_data = write_training_data(ds, work / "training-data", split.t_cut)
    feats = build_both(train_data, work, split, feature_overrides)
    demographics = demographics_of(ds)
    result: dict[str, Any] = {
        "benchmark": "cold_items",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "code": code_version(),
        "load_average_before": load_average(),
        "also_running": also_running,
        "settings": {
            "data": str(data),
            "source": ds.manifest.source,
            "cut": cut,
            "valid_frac": valid_frac,
            "seeds": list(seeds),
            "arms": {a: list(ARMS[a]) for a in arms},
            "config": str(Path(config).resolve().relative_to(ROOT))
            if Path(config).resolve().is_relative_to(ROOT)
            else str(config),
            "overrides": list(overrides),
            "features": [*FEATURE_DEFAULTS, *feature_overrides],
            "ks": list(KS),
            "tie_seed": TIE_SEED,
        },
        "protocol": PROTOCOL,
        "split": split.describe(),
        "references": {
            "newest_first": {
                p: newest_first(ds, q, split.num_items) for p, q in split.queries.items()
            }
        },
        "arms": {},
        "complete": False,
    }
    runs: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in arms}
    for seed in seeds:
        for arm in arms:
            art, fit = train_arm(feats, work, arm, seed, config, overrides)
            row: dict[str, Any] = dict(fit)
            for part, q in split.queries.items():
                row[part] = score_queries(feats.final, art, q, split.num_items, demographics)
            row["exported_items"] = int(load_item_embeddings(art)[1].numel())
            runs[arm][seed] = row
            console.print(
                f"seed {seed} {arm}: cold HR@50 {row['cold']['hr@50']:.4f} recall@50 "
                f"{row['cold']['recall@50']:.4f}; all HR@50 {row['all']['hr@50']:.4f} "
                f"(best epoch {fit['best_epoch']}, {fit['fit_wall_s']:.0f} s)"
            )
            shutil.rmtree(art, ignore_errors=True)
        result["arms"] = {a: over_seeds(r) for a, r in runs.items() if r}
        result["load_average_after"] = load_average()
        result["wall_s"] = round(time.perf_counter() - started, 1)
        write_json_atomic(out, result)
    result["complete"] = True
    write_json_atomic(out, result)
    return result


def print_table(console: Console, result: dict[str, Any]) -> None:
    n = len(result["settings"]["seeds"])
    table = Table(title=f"ML-100k cold items: mean ± std over {n} seed(s)")
    cols = [(p, m) for p in PARTS for m in ("hr@50", "recall@50")]
    table.add_column("arm")
    for p, m in cols:
        table.add_column(f"{p} {m}", justify="right")
    for name, arm in result["arms"].items():
        cells = [f"{arm[p][m]:.4f} ± {arm[f'{p} std'][m]:.4f}" for p, m in cols]
        table.add_row(name, *cells)
    console.print(table)


def ml100k(path: Path, console: Console) -> Path | None:
    """The MovieLens-100k dataset at `path`, fetched when missing; None (with a message
    saying how to get it) when it cannot be had."""
    if (path / "manifest.json").exists():
        return path
    from funnelrec.data.fetch import fetch_movielens_100k

    console.print(f"fetching MovieLens-100k into {escape(str(path))}")
    try:
        fetch_movielens_100k(path, force=path.exists(), on_status=lambda m: console.print(m))
    except FunnelrecError as e:
        console.print(
            f"[yellow]skipped[/]: MovieLens-100k could not be fetched into {escape(str(path))} "
            f"({escape(str(e))}). Get the GroupLens ml-100k.zip or the recbole 1.2.1 wheel "
            "(../shared/data/README.md), import it with `funnelrec data import movielens "
            "ml-100k.zip --out DIR` and pass --data DIR"
        )
        return None
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--data", type=Path, default=None, help="dataset (default WORK/ml-100k)")
    p.add_argument("--work", type=Path, default=Path("/tmp/funnelrec-bench"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"of {', '.join(ARMS)}")
    p.add_argument("--cut", type=float, default=0.9, help="quantile of the rating times")
    p.add_argument("--valid-frac", type=float, default=0.1, help="of the training ratings")
    p.add_argument("--config", type=Path, default=CONFIG, help="candidate training config")
    p.add_argument("--candidates", nargs="*", default=[], help="KEY=VALUE config overrides")
    p.add_argument("--features", nargs="*", default=[], help="KEY=VALUE features overrides")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--also-running", default="", help="what else the machine was doing")
    args = p.parse_args(argv)
    console = Console(stderr=True)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    if not seeds:
        p.error("--seeds: none given")
    torch.set_num_threads(args.threads)
    data = args.data or ml100k(args.work / "ml-100k", console)
    if data is None:
        return None
    work = args.work / f"cold-items-{os.getpid()}"
    try:
        result = run(
            data,
            work,
            args.out,
            seeds=seeds,
            arms=[a.strip() for a in args.arms.split(",") if a.strip()],
            cut=args.cut,
            valid_frac=args.valid_frac,
            config=args.config,
            overrides=args.candidates,
            feature_overrides=args.features,
            also_running=args.also_running,
            console=console,
        )
    except FunnelrecError as e:
        console.print(f"[red]error[/]: {escape(str(e))}")
        sys.exit(2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(Console(), result)
    console.print(f"wrote {escape(str(args.out))}")
    return result


if __name__ == "__main__":
    main()
