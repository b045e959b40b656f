"""Rolling next-day evaluation: a model never updated, one updated every day with
`funnelrec update` (warm starts) and one retrained from scratch every day, each with the
id-only candidate model of the paper and with the item content tower, each scored on the
next day's watches of a simulated world fed in as a user's own logs.

    .venv/bin/python benchmarks/rolling.py                          # small world, days 22-27
    .venv/bin/python benchmarks/rolling.py --arms frozen,incremental --days 21:22-24
    .venv/bin/python benchmarks/rolling.py --world tiny --days 21:22-23 --work /tmp/rt \
        --out /tmp/rolling-tiny.json
    # the content arms (and the id-only ones they are compared with) added to a result,
    # its other arms kept as they are
    .venv/bin/python benchmarks/rolling.py \
        --arms frozen,incremental,frozen_content,incremental_content \
        --merge-into benchmarks/results/rolling.json

Data: the world (`--world`, `--seed`) is simulated once, and each of its days written under
WORK/logs as a service's logs would be: a folder of Parquet files per day (watches,
impressions, searches, and the users and items first seen that day, under the simulator's
raw ids). `funnelrec data import events` brings in the first days (`--days 21:22-27`: days
1-21), and `funnelrec data append` each later one, exactly as a user's logs. (The events
mapping has no columns for the logging policy's candidate source and score: the
impressions come without them, as the simulated world's features leave them out anyway.)

Days 1-21 are trained once (leave-last-out features; the training settings of `TRAINING`,
the demo's on the small world, or `--candidates` / `--ranker`) and packaged; the content
tower's days 1-21 model is the same candidate training plus `--content` (by default
`item_content=true`), packaged with the same features and ranker (the features always hold
the items' content, and the ranker does not read the candidate model). Then, for each day
D of 22-27, every arm takes in day D and is scored on day D + 1:

    frozen       never updated
    incremental  `funnelrec update` (`pipeline.update`): append -> features update ->
                 warm starts of both stages -> index -> package, with the update's
                 default settings (`--update KEY=VALUE` overrides them)
    full         `data append`, then features, both stages and the package built from
                 scratch with the settings days 1-21 were trained with
    X_content    arm X from the content tower's days 1-21 model (a warm start keeps the
                 model config, so `incremental_content` stays a content model; `full_content`
                 retrains with `--content` added; it is not run by default, being the
                 costliest)

The id-only arms run first each day, as they did before the content arms existed, and
every arm has its own copy of the dataset and its own run directories, so adding arms
moves none of their figures.

An update's cost is the wall and CPU seconds of that work, CPU being this process's and
any children's (`time.process_time` and `RUSAGE_CHILDREN`); torch runs `--threads` threads.

Scoring day D + 1: every user who watched something that day is one query made at the start
of the day, from the live state a server would hold (each user's last watches and queries
and their impression counts, seeded from the dataset through day D: `UserStateStore`), the
same for every arm; the targets are the distinct items the user watched that day. Items
the user watched before are excluded from every ranking, except the targets (a re-watch
stays retrievable, the protocol of `candidates.metrics`).
  recall@100       the candidate model alone: exact scores over every item it can
                   represent, i.e. what its export (hence the index) holds: the item
                   vocabulary, and with the content tower also the catalogue items outside
                   it, scored by their content alone (`target_ranks`, `RetrievalMetrics`);
                   a target it cannot represent is a miss
  fresh_recall@100 recall@100 of the targets uploaded in the `FRESH_DAYS` days before the
                   query (the items table's `upload_ts` in [start of D + 1 - 2 days, start
                   of D + 1)), over the queries with at least one such target, from the
                   same rankings
  cold_recall@100  likewise of the targets outside the arm's item vocabulary (no id
                   embedding: never watched in its training data, or uploaded since);
                   the id-only model cannot represent them, so its figure is 0
  funnel HR@10     the packaged funnel (`Recommender.recommend`: deep, co-watch and fresh
                   candidates ranked by the ranker), its top 100 scored by `list_ranks`
  unrepresentable  the share of day D + 1's watches whose item the candidate model cannot
                   represent (outside its export)
The models of days 1-21 are also scored on day 22 (`start`, and `start_content` for the
content tower: every arm's first point).

The age of what is recommended, in the spirit of Fig. 4 of Covington et al. 2016 (section
3.3, example age): each query's top `AGE_K` items of the candidate model (every item the
user watched before excluded, as a server would; exact scores) and the queries' targets
(the distinct items each user actually watched that day) are counted by the item's age
since upload at the query time, in the bins of `AGE_EDGES`, summed over all scored days.

Goals: `incremental` reaches >= 0.97 x `full`'s mean recall@100 at <= 1/10 of its mean
update CPU seconds; `incremental_content` reaches >= 2 x `incremental`'s mean fresh-item
recall@100, a mean cold-item recall@100 above 0, and >= 0.99 x its mean recall@100 (the
same for `full_content` against `full`; none for the frozen arms, which know no item
uploaded after their training window); the figure
shows the frozen arm's decay. Writes benchmarks/results/rolling.json (after every day,
`complete` false until the end), benchmarks/results/rolling.png and
benchmarks/results/rolling_age.png.

`--merge-into RESULT`: the arms of RESULT that this run does not run are kept as they are
(each arm records the date and code of the run that measured it under `run`), the ones it
runs are replaced, and what RESULT's own run recorded is kept under `merged.previous`. The
settings that decide the figures (world, seed, days, training and update settings, users
scored, split) must be RESULT's; the output is RESULT itself unless `--out` says otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.table import Table

from funnelrec.candidates import fit_candidates, load_item_embeddings, load_training_config
from funnelrec.candidates.metrics import (
    ModelScorer,
    RetrievalMetrics,
    exclusion_mask,
    list_ranks,
    target_ranks,
    tie_keys,
)
from funnelrec.config import load_config
from funnelrec.data.append import append_events
from funnelrec.data.dataset import Dataset
from funnelrec.data.loaders import import_events
from funnelrec.features import FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.pipeline import DEMO, load_update_config, update
from funnelrec.ranking.training import load_ranker_train_config, train_ranker
from funnelrec.serving.package import package
from funnelrec.serving.recommender import CANDIDATES_DIR, Recommender, RecommendRequest
from funnelrec.serving.state import UserContext, UserStateStore
from funnelrec.simulate import generate, preset_config
from funnelrec.simulate.truth import World

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "rolling.json"
ID_ARMS = ("frozen", "incremental", "full")
CONTENT = "_content"  # the suffix of an arm with the item content tower
ARMS = (*ID_ARMS, *(f"{a}{CONTENT}" for a in ID_ARMS))
# full_content retrains both stages every day, as full does: opt-in
DEFAULT_ARMS = ("frozen", "incremental", "full", f"frozen{CONTENT}", f"incremental{CONTENT}")
DAY = 86_400
CANDIDATE_KS = (10, 50, 100)
FUNNEL_KS = (10, 100)  # the funnel is asked for max(FUNNEL_KS) items
RECALL_GOAL = 0.97  # incremental's mean recall@100 over full's, at least
CPU_GOAL = 0.1  # incremental's mean update CPU seconds over full's, at most
USERS_PER_BATCH = 256  # queries scored against the whole vocabulary at once

# The content tower's goals against the id-only arm it extends (issue of the content
# tower: fresh items retrievable before their first watch)
FRESH_GOAL = 2.0  # mean fresh-item recall@100 over the id-only arm's, at least
OVERALL_GOAL = 0.99  # mean recall@100 over the id-only arm's, at least
SUBSET_K = 100  # the cut-off of the fresh- and cold-item recall
FRESH_DAYS = 2  # a target is fresh when uploaded in the days before the query

# The item ages of the figure after Covington et al. 2016, Fig. 4 (days since upload at
# the query time): bins [0, 1), [1, 2), ... [28, inf), after one for the items uploaded
# during the scored day (a watch of the data only: no model can know them at its start)
# and before one for the items without an upload time.
AGE_K = 100  # each query's top AGE_K items of the candidate model
AGE_EDGES = (0, 1, 2, 3, 5, 7, 14, 28)
AGE_LABELS = (
    "uploaded that day",
    *(f"{a}-{b}" for a, b in itertools.pairwise(AGE_EDGES)),
    f"{AGE_EDGES[-1]}+",
    "no upload time",
)
NO_UPLOAD = np.iinfo(np.int64).min

# The settings a result's figures depend on: a run merged into it must have the same.
MERGE_SETTINGS = (
    "world", "seed", "train_days", "days", "features", "candidates", "ranker", "update",
    "eval_users", "split",
)  # fmt: skip

# The training settings of the days 1-21 models, which the full arm repeats every day
# (candidate model, ranker). The small world's are the demo's models (`pipeline.DEMO`),
# the candidate model trained until its validation recall@100 stops improving instead of
# the demo's two epochs: a retrain from scratch that has not converged would lose to a warm
# start for want of passes, not of freshness. The tiny world's are sized for a test.
TRAINING: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "small": (
        (*DEMO.candidates.overrides, "epochs=10", "patience=1"),  # the later value wins
        DEMO.ranker.overrides,
    ),
    "tiny": (
        ("dim=16", "num_negatives=256", "batch_size=256", "epochs=2", "patience=0"),
        ("model.tower=32", "train.batch_size=256", "train.epochs=1"),
    ),
}

# The incremental arm's `UpdateConfig` overrides per world: none, the update's own
# defaults run (`funnelrec update` as a user's first run would; they were chosen on the
# warm starts' validation metrics, docs/freshness.md "One command"). `--update KEY=VALUE`
# overrides them.
TUNED_UPDATE: dict[str, tuple[str, ...]] = {}

# The logs' tables, their source columns, and the mapping that imports them (the same
# columns for every day: `data append` reads a day with the mapping kept by the import).
LOG_TABLES = ("watches", "impressions", "searches", "users", "items")
MAPPING = """\
[watches]
path = [{watches}]
user = "user"
item = "video"
time = "ts"
watch_time = "watch_time_s"
source = "source"

[impressions]
path = [{impressions}]
user = "user"
item = "video"
time = "ts"
clicked = "clicked"
watch_time = "watch_time_s"
request = "request"
position = "position"

[searches]
path = [{searches}]
user = "user"
time = "ts"
query = "query"

[users]
path = [{users}]
user = "user"
age = "age"
gender = "gender"
region = "region"
device = "device"
logged_in = "logged_in"

[items]
path = [{items}]
item = "video"
channel = "channel"
topic = "topic"
title = "title"
upload_time = "upload_ts"
duration = "duration_s"
"""


@dataclass(frozen=True)
class Settings:
    """What a run does; every field is recorded in the results.

    train_days: days 1..train_days are imported and trained on; days: the days taken in one
    at a time, each scored on the day after; features, candidates, ranker: overrides of the
    from-scratch training (days 1-21 and the full arm); update: `UpdateConfig` overrides of
    the incremental arm; eval_users: score only the first N active users of a day (None:
    all of them); split: the features' split, leave-last-out, so that all but each user's
    last two watches train (those two validate and test) and the day an update takes in
    is training data (a time split holds the latest watches out, the new day's among them);
    content: the candidate overrides added for the content tower's from-scratch training.
    """

    world: str
    seed: int
    train_days: int
    days: tuple[int, ...]
    arms: tuple[str, ...]
    features: tuple[str, ...]
    candidates: tuple[str, ...]
    ranker: tuple[str, ...]
    update: tuple[str, ...]
    threads: int
    eval_users: int | None = None
    split: Literal["last", "time"] = "last"
    content: tuple[str, ...] = ("item_content=true",)


@dataclass
class Cost:
    """Wall and CPU seconds of a piece of work (CPU: this process's and its children's)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)  # wall seconds per step


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@contextmanager
def measured() -> Iterator[Cost]:
    cost = Cost()
    wall, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    try:
        yield cost
    finally:
        cost.wall_s = time.perf_counter() - wall
        cost.cpu_s = time.process_time() - cpu + _children_cpu() - children


class Log:
    """Progress lines with the run's elapsed time."""

    def __init__(self, console: Console) -> None:
        self.console, self.started = console, time.perf_counter()

    def __call__(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.console.print(f"[dim]{elapsed / 60:6.1f} min[/dim]  {message}", highlight=False)


# --------------------------------------------------------------------------- the logs


def raw_ids(ds: Dataset, space: str) -> pa.Array:
    """The raw id of dense ids 1..N of a space, at position id - 1."""
    m = ds.id_map(space).sort_by("id")
    ids = np.asarray(m.column("id").to_numpy(), dtype=np.int64)
    if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
        raise ValueError(f"{ds.path}: the {space} ids do not run 1..N")
    return m.column("raw_id").combine_chunks()


def day_of(ts: np.ndarray, start: int, days: int) -> np.ndarray:
    """[n] the day (1..days) of each timestamp; before the window: day 1."""
    return np.clip((np.asarray(ts, dtype=np.int64) - start) // DAY + 1, 1, days)


def export_days(world: Path, logs: Path, start: int, days: int) -> dict[str, int]:
    """Write the world's tables as a service's daily logs: LOGS/day-NN/<table>.parquet.

    Events go to the day of their time, in time order; users to the day of their first
    event (day 1 for users without any); items to the day of their upload (day 1 for those
    uploaded before the window). A day's table with no rows has no file. Ids are the
    world's raw ids. Returns the rows written per table.
    """
    ds = Dataset.open(world)
    user, item = raw_ids(ds, "user"), raw_ids(ds, "item")
    channel = raw_ids(ds, "channel")
    w = ds.table("watches")
    i = ds.table("impressions")
    s = ds.table("searches")
    tables = {
        "watches": pa.table(
            {
                "user": user.take(pc.subtract(w["user_id"], 1)),
                "video": item.take(pc.subtract(w["item_id"], 1)),
                "ts": w["ts"],
                "watch_time_s": w["watch_time_s"],
                "source": w["source"],
            }
        ),
        "impressions": pa.table(
            {
                "request": i["request_id"],
                "user": user.take(pc.subtract(i["user_id"], 1)),
                "video": item.take(pc.subtract(i["item_id"], 1)),
                "ts": i["ts"],
                "position": i["position"],
                "clicked": i["clicked"],
                "watch_time_s": i["watch_time_s"],
            }
        ),
        "searches": pa.table(
            {"user": user.take(pc.subtract(s["user_id"], 1)), "ts": s["ts"], "query": s["query"]}
        ),
    }
    day = {name: day_of(t["ts"].to_numpy(), start, days) for name, t in tables.items()}

    users = ds.table("users")
    first = np.full(len(user) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    for t in (w, i, s):
        np.minimum.at(first, t["user_id"].to_numpy(), t["ts"].to_numpy())
    uid = np.asarray(users["user_id"].to_numpy(), dtype=np.int64)
    seen = first[uid] < np.iinfo(np.int64).max
    day["users"] = np.where(seen, day_of(np.where(seen, first[uid], start), start, days), 1)
    tables["users"] = pa.table(
        {
            "user": user.take(pc.subtract(users["user_id"], 1)),
            **{c: users[c] for c in ("age", "gender", "region", "device", "logged_in")},
        }
    )
    items = ds.table("items")
    day["items"] = day_of(items["upload_ts"].to_numpy(), start, days)
    tables["items"] = pa.table(
        {
            "video": item.take(pc.subtract(items["item_id"], 1)),
            "channel": channel.take(pc.subtract(items["channel_id"], 1)),
            **{c: items[c] for c in ("topic", "title", "upload_ts", "duration_s")},
        }
    )

    rows: dict[str, int] = {}
    for name, t in tables.items():
        # by day, then time (lexsort is stable: equal times keep the table's order)
        keys = (t["ts"].to_numpy(), day[name]) if "ts" in t.column_names else (day[name],)
        order = np.lexsort(keys)
        t, d = t.take(pa.array(order)), day[name][order]
        bounds = np.searchsorted(d, np.arange(1, days + 2))
        for k in range(1, days + 1):
            lo, hi = bounds[k - 1], bounds[k]
            if hi > lo:
                folder = logs / f"day-{k:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                pq.write_table(t.slice(lo, hi - lo), folder / f"{name}.parquet")
        rows[name] = t.num_rows
    return rows


def day_logs(logs: Path, day: int) -> dict[str, list[str]]:
    """The files of one day's logs, by table (absolute paths), for `data append`."""
    folder = logs / f"day-{day:02d}"
    return {
        name: [str(folder / f"{name}.parquet")]
        for name in LOG_TABLES
        if (folder / f"{name}.parquet").is_file()
    }


def write_mapping(logs: Path, days: int) -> Path:
    """The import mapping of days 1..days (paths relative to LOGS)."""
    paths = {
        name: ", ".join(
            f'"day-{k:02d}/{name}.parquet"'
            for k in range(1, days + 1)
            if (logs / f"day-{k:02d}" / f"{name}.parquet").is_file()
        )
        for name in LOG_TABLES
    }
    path = logs / f"import-days-1-{days}.toml"
    path.write_text(MAPPING.format(**paths))
    return path


# --------------------------------------------------------------------------- training


@contextmanager
def step(cost: Cost, name: str) -> Iterator[None]:
    """Record the wall seconds of one step of an update in `cost.steps`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        cost.steps[name] = time.perf_counter() - started


def is_content(arm: str) -> bool:
    return arm.endswith(CONTENT)


def kind_of(arm: str) -> str:
    """frozen, incremental or full: how the arm takes a day in."""
    return arm.removesuffix(CONTENT)


def candidate_overrides(s: Settings, content: bool) -> list[str]:
    """The from-scratch candidate training of the id-only or the content arms."""
    return [*s.candidates, *(s.content if content else ())]


def train_from_scratch(
    data: Path, out: Path, s: Settings, cost: Cost, *, content: bool = False
) -> None:
    """Features, candidate model, ranker and package of DATA, built anew into the run
    directory OUT (the layout `funnelrec update` continues from), with the settings of
    days 1-21 (content: with the content tower)."""
    fc = load_config(FeaturesConfig, None, list(s.features))
    with step(cost, "features"):
        build_features(data, out / "features", split=s.split, config=fc, force=True, progress=False)
    with step(cost, "candidates"):
        cand = load_training_config(None, candidate_overrides(s, content))
        fit_candidates(out / "features", out / "candidates", cand, force=True, progress=False)
    with step(cost, "ranker"):
        rank = load_ranker_train_config(None, list(s.ranker))
        train_ranker(out / "features", out / "ranker", rank, force=True, progress=False)
    with step(cost, "artifact"):  # the ANN index is built here
        package(
            out / "features",
            out / "candidates",
            out / "ranker",
            out / "artifact",
            data=data,
            force=True,
            progress=False,
        )


def base_run(s: Settings, logs: Path, work: Path, log: Log) -> tuple[Path, dict[str, Any]]:
    """Days 1..train_days imported and trained on: WORK/base (dataset in base/data).
    Reused when a previous run made it with the same settings (remove it to retrain after
    the code has changed)."""
    base = work / "base"
    key = {
        "world": s.world,
        "seed": s.seed,
        "train_days": s.train_days,
        "split": s.split,
        "features": list(s.features),
        "candidates": list(s.candidates),
        "ranker": list(s.ranker),
    }
    stamp = base / "stamp.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        log(f"days 1-{s.train_days}: trained models found in {base}, reused")
        return base, {**json.loads(stamp.read_text())["cost"], "reused": True}
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    mapping = write_mapping(logs, s.train_days)
    with measured() as imported:
        import_events(mapping, base / "data")
    n = Dataset.open(base / "data").manifest.row_counts
    log(
        f"imported days 1-{s.train_days}: {n['watches']:,} watches, {n['users']:,} users, "
        f"{n['items']:,} items ({imported.wall_s:.1f} s)"
    )
    with measured() as trained:
        train_from_scratch(base / "data", base, s, trained)
    log(f"days 1-{s.train_days} trained: {trained.wall_s:.0f} s wall, {trained.cpu_s:.0f} s CPU")
    cost = {
        "import_wall_s": imported.wall_s,
        "train_wall_s": trained.wall_s,
        "train_cpu_s": trained.cpu_s,
        "steps_wall_s": trained.steps,
    }
    stamp.write_text(json.dumps({"key": key, "cost": cost}, indent=2) + "\n")
    return base, {**cost, "reused": False}


def base_content_run(s: Settings, base: Path, log: Log) -> tuple[Path, dict[str, Any]]:
    """The content tower's days 1..train_days model: WORK/base-content, a run directory
    with BASE's features and ranker (copied) and a candidate model trained with the content
    overrides, packaged. Reused when made from the same BASE with the same settings."""
    out = base.parent / "base-content"
    key = {
        "base": json.loads((base / "stamp.json").read_text()),
        "candidates": candidate_overrides(s, True),
    }
    stamp = out / "stamp.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        log(f"days 1-{s.train_days}, content tower: trained model found in {out}, reused")
        return out, {**json.loads(stamp.read_text())["cost"], "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for part in ("features", "ranker"):
        shutil.copytree(base / part, out / part)
    with measured() as trained:
        with step(trained, "candidates"):
            cand = load_training_config(None, candidate_overrides(s, True))
            fit_candidates(out / "features", out / "candidates", cand, force=True, progress=False)
        with step(trained, "artifact"):
            package(
                out / "features",
                out / "candidates",
                out / "ranker",
                out / "artifact",
                data=base / "data",
                force=True,
                progress=False,
            )
    log(
        f"days 1-{s.train_days}, content tower trained: {trained.wall_s:.0f} s wall, "
        f"{trained.cpu_s:.0f} s CPU"
    )
    cost = {
        "train_wall_s": trained.wall_s,
        "train_cpu_s": trained.cpu_s,
        "steps_wall_s": trained.steps,
    }
    stamp.write_text(json.dumps({"key": key, "cost": cost}, indent=2) + "\n")
    return out, {**cost, "reused": False}


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class NextDay:
    """The queries of one scored day, one per user who watched something that day.

    users [Q] (sorted dataset ids); contexts [Q] their live state at the start of the day;
    watched [Q] the distinct items each watched before the day; targets [Q] the distinct
    items each watched that day; items [W] the item of every watch of the day (all users);
    start: the time of the queries (the day's first second); upload [I + 1] the upload
    time of each dataset item id (the items table's `upload_ts`; NO_UPLOAD: none).
    """

    day: int
    users: np.ndarray
    contexts: list[UserContext]
    watched: list[np.ndarray]
    targets: list[np.ndarray]
    items: np.ndarray
    counts: dict[str, int]
    start: int
    upload: np.ndarray

    def fresh(self, items: np.ndarray) -> np.ndarray:
        """[...] bool: each dataset item id uploaded in the FRESH_DAYS days before the
        queries (ids <= 0: False)."""
        ts = self.upload[np.clip(items, 0, None)]
        return (items > 0) & (ts >= self.start - FRESH_DAYS * DAY) & (ts < self.start)

    def age_counts(self, items: np.ndarray) -> np.ndarray:
        """[len(AGE_LABELS)] how many of the dataset item ids `items` fall in each age bin."""
        ts = self.upload[items]
        known = ts != NO_UPLOAD
        age = (self.start - ts[known]) / DAY
        bins = np.searchsorted(np.asarray(AGE_EDGES, dtype=np.float64), age, side="right")
        counts = np.bincount(bins, minlength=len(AGE_EDGES) + 1)
        return np.append(counts, np.count_nonzero(~known)).astype(np.int64)


def distinct_items(users: np.ndarray, user: np.ndarray, item: np.ndarray) -> list[np.ndarray]:
    """The distinct items of each of `users` (sorted) among the (user, item) pairs."""
    order = np.lexsort((item, user))
    u, i = user[order], item[order]
    lo, hi = np.searchsorted(u, users, "left"), np.searchsorted(u, users, "right")
    return [np.unique(i[a:b]) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]


def next_day(
    ref: Path, logs: Path, day: int, start: int, state: Path, limit: int | None
) -> NextDay:
    """Append day `day` to the reference dataset REF (which holds the days before it) and
    return its queries: the live state before the day (a `UserStateStore` seeded from REF
    as it was) and the day's watches."""
    ds = Dataset.open(ref)
    users_before, items_before = ds.num_rows("users"), ds.num_rows("items")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    store = UserStateStore(state)
    store.seed_from_dataset(ds)
    append_events(ref, day_logs(logs, day))
    w = Dataset.open(ref).table("watches", ["user_id", "item_id", "ts"])
    user = np.asarray(w["user_id"].to_numpy(), dtype=np.int64)
    item = np.asarray(w["item_id"].to_numpy(), dtype=np.int64)
    ts = np.asarray(w["ts"].to_numpy(), dtype=np.int64)
    today = ts >= start + (day - 1) * DAY
    users = np.unique(user[today])
    active = len(users)
    if limit is not None:
        users = users[:limit]
    mine = np.isin(user, users)
    targets = distinct_items(users, user[today & mine], item[today & mine])
    watched = distinct_items(users, user[~today & mine], item[~today & mine])
    contexts = [store.context(int(u)) for u in users]
    store.close()
    items = Dataset.open(ref).table("items", ["item_id", "upload_ts"])
    ids = np.asarray(items["item_id"].to_numpy(), dtype=np.int64)
    upload = np.full(max(int(ids.max(initial=0)), int(item.max(initial=0))) + 1, NO_UPLOAD)
    upload[ids] = np.asarray(pc.fill_null(items["upload_ts"], NO_UPLOAD).to_numpy(), dtype=np.int64)
    first = start + (day - 1) * DAY
    counts = {
        "active_users": active,
        "queries": len(users),
        "targets": sum(len(t) for t in targets),
        "watches": int(today.sum()),
        "new_users": int((users > users_before).sum()),
        "watches_of_new_items": int((item[today] > items_before).sum()),
    }
    return NextDay(day, users, contexts, watched, targets, item[today], counts, first, upload)


@dataclass(frozen=True)
class Corpus:
    """What a packaged candidate model ranks: the columns of its scores. Columns 1..N are
    its item vocabulary's ids, as `ModelScorer.scores` gives them; an item-content model's
    export adds the catalogue items outside the vocabulary as columns N + 1..M, scored by
    their content vectors `cold` [M - N, d]. item_ids [M + 1] the dataset item id of each
    column (column 0: padding, never ranked); column [I + 1] the column of each dataset
    item id (0: the model cannot represent it)."""

    vocab_items: int
    item_ids: np.ndarray
    column: np.ndarray
    cold: torch.Tensor

    @classmethod
    def of(cls, rec: Recommender) -> Corpus:
        emb, ids = load_item_embeddings(rec.path / CANDIDATES_DIR)
        item_ids = np.concatenate([[0], ids.numpy().astype(np.int64)])
        n = len(rec.features.vocab("item")) - 1
        # the export's first N rows are the vocabulary's (ids 1..N), which the scorer's
        # columns are: checked, since a content-only column is placed after them
        if not np.array_equal(
            rec.features.vocab("item").lookup(item_ids[1 : n + 1]), np.arange(1, n + 1)
        ):
            raise RuntimeError(f"{rec.path}: the export's first items are not its vocabulary")
        column = np.zeros(int(item_ids.max()) + 1, dtype=np.int64)
        column[item_ids[1:]] = np.arange(1, len(item_ids))
        return cls(n, item_ids, column, emb[n:].to(torch.float32))

    @property
    def num_columns(self) -> int:
        """M + 1."""
        return len(self.item_ids)

    def lookup(self, items: np.ndarray) -> np.ndarray:
        """The column of each dataset item id (0: not representable, or not an id)."""
        items = np.asarray(items, dtype=np.int64)
        inside = (items > 0) & (items < len(self.column))
        return np.where(inside, self.column[np.where(inside, items, 0)], 0)


def score(rec: Recommender, nd: NextDay) -> dict[str, Any]:
    """The candidate model's and the funnel's metrics on the day's queries (module
    docstring), the share of the day's watches the model cannot represent, and how many
    of its top AGE_K items fall in each age bin (`top_age_counts`)."""
    started = time.perf_counter()
    vocab = rec.features.vocab("item")
    corpus = Corpus.of(rec)
    n1 = corpus.num_columns
    scorer, keys = ModelScorer(rec.candidate_model), tie_keys(n1)
    cand, funnel = RetrievalMetrics(CANDIDATE_KS), RetrievalMetrics(FUNNEL_KS)
    subsets = {name: RetrievalMetrics((SUBSET_K,)) for name in ("fresh", "cold")}
    counted = dict.fromkeys(
        ("fresh_targets", "fresh_queries", "cold_targets", "cold_queries", "cold_representable"),
        0,
    )
    ages = np.zeros(len(AGE_LABELS), dtype=np.int64)
    k = max(FUNNEL_KS)
    sizes = np.array([len(t) for t in nd.targets], dtype=np.int64)
    order = np.argsort(sizes, kind="stable")  # a batch's target slots are about as many
    for lo in range(0, len(order), USERS_PER_BATCH):
        rows = order[lo : lo + USERS_PER_BATCH]
        ctxs = [nd.contexts[r] for r in rows]
        # the deep source's input, as `Recommender.recommend` builds it for the same context
        batch = rec.features.candidate_batch(
            [[i for i in c.history if rec.has_item(i)] for c in ctxs],
            [c.queries for c in ctxs],
            [rec.user_demographics(int(nd.users[r])) for r in rows],
        )
        users = scorer.queries(batch)
        scores = scorer.scores(users).float()
        if len(corpus.cold):  # the catalogue outside the vocabulary, by content alone
            scores = torch.cat([scores, users.float() @ corpus.cold.T], dim=1)
        targets = np.full((len(rows), int(sizes[rows].max())), -1, dtype=np.int64)
        for j, r in enumerate(rows):
            targets[j, : sizes[r]] = nd.targets[r]
        columns = np.where(targets > 0, corpus.lookup(targets), -1)  # 0: not representable
        seen = [corpus.lookup(nd.watched[r]) for r in rows]
        starts = np.cumsum([0] + [len(x) for x in seen[:-1]])
        exclude = exclusion_mask(
            torch.from_numpy(np.concatenate(seen)), torch.from_numpy(starts), n1
        )
        n_rel = torch.from_numpy(sizes[rows].astype(np.float64))
        ranks = target_ranks(scores, torch.from_numpy(columns), exclude, keys)
        cand.update(ranks, n_rel)
        # the same ranks, of the fresh and the cold targets only
        cold = (targets > 0) & (vocab.lookup(targets.ravel()).reshape(targets.shape) == 0)
        for name, mask in (("fresh", nd.fresh(targets)), ("cold", cold)):
            m = torch.from_numpy(mask)
            n = m.sum(1)
            has = n > 0
            subsets[name].update(torch.where(m, ranks, math.inf)[has], n[has].to(torch.float64))
            counted[f"{name}_targets"] += int(n.sum())
            counted[f"{name}_queries"] += int(has.sum())
        counted["cold_representable"] += int((cold & (columns > 0)).sum())
        # the top AGE_K with everything watched before left out, re-watches too: a server
        # does not know which of them the user will watch again
        top = scores.masked_fill(exclude, -math.inf)
        top[:, 0] = -math.inf
        values, cols = torch.topk(top, min(AGE_K, n1 - 1), dim=1)
        ages += nd.age_counts(corpus.item_ids[cols[values.isfinite()].numpy()])
        lists = np.zeros((len(rows), k), dtype=np.int64)
        for j, r in enumerate(rows):
            # the items watched before but the targets; those the corpus lacks (a model
            # older than them) could not be returned anyway, and a request may not name them
            before = nd.watched[r]
            before = before[~np.isin(before, nd.targets[r])]
            known = [int(i) for i in before if rec.has_item(int(i))]
            request = RecommendRequest(user_id=int(nd.users[r]), k=k, exclude=known)
            got = [it.item_id for it in rec.recommend(request, nd.contexts[r]).items]
            lists[j, : len(got)] = got
        funnel.update(list_ranks(torch.from_numpy(lists), torch.from_numpy(targets)), n_rel)
    c, f = cand.compute(), funnel.compute()
    key = f"recall@{SUBSET_K}"
    return {
        "recall@100": c["recall@100"],
        "recall@10": c["recall@10"],
        "recall@50": c["recall@50"],
        "ndcg@10": c["ndcg@10"],
        "funnel_hr@10": f["hr@10"],
        "funnel_recall@10": f["recall@10"],
        "funnel_ndcg@10": f["ndcg@10"],
        "funnel_recall@100": f["recall@100"],
        "unrepresentable": float((corpus.lookup(nd.items) == 0).mean()),
        "vocabulary_items": corpus.vocab_items,
        "content_only_items": len(corpus.cold),
        f"fresh_{key}": subsets["fresh"].compute()[key],
        f"cold_{key}": subsets["cold"].compute()[key],
        **counted,
        "top_age_counts": ages.tolist(),
        "score_s": time.perf_counter() - started,
    }


def to_world_ids(world: Path, ref: Path, space: str) -> np.ndarray:
    """[N + 1] the simulated world's dense id of each of the reference dataset's ids (which
    its import of the logs gave; matched by raw id), 0 for none."""
    m = Dataset.open(world).id_map(space)
    ref_raw = raw_ids(Dataset.open(ref), space)
    pos = pc.fill_null(pc.index_in(ref_raw, value_set=m.column("raw_id").combine_chunks()), -1)
    p = np.asarray(pos.to_numpy(zero_copy_only=False), dtype=np.int64)
    world_ids = np.asarray(m.column("id").to_numpy(), dtype=np.int64)
    out = np.zeros(len(p) + 1, dtype=np.int64)
    out[1:] = np.where(p >= 0, world_ids[np.clip(p, 0, None)], 0)
    return out


def truth_score(truth: World, world: Path, ref: Path, nd: NextDay) -> dict[str, Any]:
    """The simulator's own ranking on the day's queries, the reference a model is measured
    against: each user's top SUBSET_K items by the truth's watch rate at the query time
    (`World.oracle_top_k`: the true interests, tastes, appeal and freshness of that
    moment; items watched before left out but the targets, as for the arms), scored as
    the arms are (recall@100 and fresh-item recall@100); and the same ranking among the
    fresh items alone (all SUBSET_K places given to items uploaded in the FRESH_DAYS days
    before: how much of the fresh targets even the truth reaches with every place)."""
    started = time.perf_counter()
    items, users = to_world_ids(world, ref, "item"), to_world_ids(world, ref, "user")
    back = np.zeros(truth.n_items + 1, dtype=np.int64)
    back[items[items > 0]] = np.flatnonzero(items > 0)
    every = np.arange(1, len(items), dtype=np.int64)
    not_fresh = items[every[~nd.fresh(every)]]
    sizes = np.array([len(t) for t in nd.targets], dtype=np.int64)
    metrics = {name: RetrievalMetrics((SUBSET_K,)) for name in ("all", "fresh", "fresh_only")}
    fresh_places = 0
    for lo in range(0, len(nd.users), USERS_PER_BATCH):
        rows = np.arange(lo, min(lo + USERS_PER_BATCH, len(nd.users)))
        targets = np.full((len(rows), int(sizes[rows].max())), -1, dtype=np.int64)
        for j, r in enumerate(rows):
            targets[j, : sizes[r]] = nd.targets[r]
        excluded = [items[np.setdiff1d(nd.watched[r], nd.targets[r])] for r in rows]
        mask = torch.from_numpy(nd.fresh(targets))
        n_fresh = mask.sum(1)
        has = n_fresh > 0
        for name, exclude in (
            ("all", excluded),
            ("fresh_only", [np.concatenate([x, not_fresh]) for x in excluded]),
        ):
            top = truth.oracle_top_k(users[nd.users[rows]], nd.start, SUBSET_K, exclude=exclude)
            lists = torch.from_numpy(back[top])
            ranks = list_ranks(lists, torch.from_numpy(targets))
            if name == "all":
                metrics["all"].update(ranks, torch.from_numpy(sizes[rows].astype(np.float64)))
                fresh_places += int(nd.fresh(back[top]).sum())
                key = "fresh"
            else:
                key = "fresh_only"
            metrics[key].update(
                torch.where(mask, ranks, math.inf)[has], n_fresh[has].to(torch.float64)
            )
    got = {name: m.compute()[f"recall@{SUBSET_K}"] for name, m in metrics.items()}
    return {
        "day": nd.day,
        f"recall@{SUBSET_K}": got["all"],
        f"fresh_recall@{SUBSET_K}": got["fresh"],
        f"fresh_only_fresh_recall@{SUBSET_K}": got["fresh_only"],
        "fresh_share_of_top": fresh_places / max(len(nd.users) * SUBSET_K, 1),
        "queries": len(nd.users),
        "score_s": time.perf_counter() - started,
    }


def truth_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The truth's rows and their means."""
    keys = (
        f"recall@{SUBSET_K}",
        f"fresh_recall@{SUBSET_K}",
        f"fresh_only_fresh_recall@{SUBSET_K}",
        "fresh_share_of_top",
    )
    return {
        "what": truth_score.__doc__ and " ".join(truth_score.__doc__.split()),
        "days": rows,
        **{f"{k}_mean": float(np.mean([r[k] for r in rows])) for k in keys if rows},
    }


def same_ids(data: Path, ref: Path) -> None:
    """Refuse an arm's dataset whose user or item ids are not those of the reference
    dataset (both are made by the same import and appends in the same order)."""
    a, b = Dataset.open(data), Dataset.open(ref)
    for space in ("user", "item"):
        mine, theirs = raw_ids(a, space), raw_ids(b, space)
        if not theirs.slice(0, len(mine)).equals(mine):
            raise RuntimeError(f"{data}: its {space} ids differ from those of {ref}")


# --------------------------------------------------------------------------- results


def arm_summary(rows: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """An arm's rows and their means (every row has every figure; the fresh and cold
    recall are averaged over the days that had such targets), and `run`: when and at
    which code the arm was measured."""

    def mean(key: str) -> float:
        values = [r[key] for r in rows if not math.isnan(r[key])]
        return float(np.mean(values)) if values else math.nan

    return {
        "days": rows,
        "recall@100_mean": mean("recall@100"),
        "funnel_hr@10_mean": mean("funnel_hr@10"),
        "unrepresentable_mean": mean("unrepresentable"),
        "update_cpu_s_mean": mean("update_cpu_s"),
        "update_wall_s_mean": mean("update_wall_s"),
        f"fresh_recall@{SUBSET_K}_mean": mean(f"fresh_recall@{SUBSET_K}"),
        f"cold_recall@{SUBSET_K}_mean": mean(f"cold_recall@{SUBSET_K}"),
        "fresh_targets": sum(r["fresh_targets"] for r in rows),
        "cold_targets": sum(r["cold_targets"] for r in rows),
        "run": run,
    }


def goals(arms: dict[str, dict[str, Any]], truth: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each goal's ratio and whether it is met (None: an arm it needs was not run)."""
    out: dict[str, Any] = {}
    inc, full = arms.get("incremental"), arms.get("full")
    if inc and full and inc["days"] and full["days"]:
        recall = inc["recall@100_mean"] / full["recall@100_mean"]
        cpu = inc["update_cpu_s_mean"] / full["update_cpu_s_mean"]
        out["recall@100"] = {
            "ratio": recall,
            "goal": f">= {RECALL_GOAL}",
            "what": "incremental's mean recall@100 / full's",
            "met": bool(recall >= RECALL_GOAL),
        }
        out["update_cpu"] = {
            "ratio": cpu,
            "goal": f"<= {CPU_GOAL}",
            "what": "incremental's mean update CPU seconds / full's",
            "met": bool(cpu <= CPU_GOAL),
        }
    out.update(content_goals(arms, truth))
    frozen = arms.get("frozen")
    if frozen and frozen["days"]:
        first, last = frozen["days"][0], frozen["days"][-1]
        out["frozen_decay"] = {
            "what": "the frozen model's recall@100 and funnel HR@10, first and last day scored",
            "recall@100": [first["recall@100"], last["recall@100"]],
            "funnel_hr@10": [first["funnel_hr@10"], last["funnel_hr@10"]],
            "shown_in": "rolling.png",
        }
    return out


def content_goals(
    arms: dict[str, dict[str, Any]], truth: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The content tower's goals, each updated content arm against the id-only arm it
    extends: fresh-item recall (a ratio), cold-item recall (a value) and overall recall (a
    ratio). Not the frozen arms': a model never updated knows no item uploaded since.
    With `truth` (`truth_summary`), the fresh goal also gives the ratios the simulator's
    own rankings reach against the same id-only arm: what the goal asks, next to what
    the truth attains."""
    out: dict[str, Any] = {}
    fresh, cold = f"fresh_recall@{SUBSET_K}_mean", f"cold_recall@{SUBSET_K}_mean"
    for base in ("incremental", "full"):
        mine, theirs = arms.get(f"{base}{CONTENT}"), arms.get(base)
        if not (mine and theirs and mine["days"] and theirs["days"]):
            continue
        name = f"{base}{CONTENT}"
        if fresh not in theirs:
            out[name] = {
                "met": None,
                "what": f"{base} was measured before the fresh- and cold-item recall "
                f"were: run it again beside {name}",
            }
            continue
        f_ratio = mine[fresh] / theirs[fresh] if theirs[fresh] > 0 else None
        overall = mine["recall@100_mean"] / theirs["recall@100_mean"]
        out[f"{name}:fresh_recall@{SUBSET_K}"] = {
            "ratio": f_ratio,
            "values": [mine[fresh], theirs[fresh]],
            "goal": f">= {FRESH_GOAL}",
            "what": f"{name}'s mean fresh-item recall@{SUBSET_K} / {base}'s (items uploaded "
            f"in the {FRESH_DAYS} days before the query)",
            # with none of the fresh targets retrieved by the id-only model, any is 2x it
            "met": bool(mine[fresh] > 0 if f_ratio is None else f_ratio >= FRESH_GOAL),
        }
        if truth and truth.get("days") and theirs[fresh] > 0:
            t_all, t_only = truth[fresh], truth[f"fresh_only_{fresh}"]
            out[f"{name}:fresh_recall@{SUBSET_K}"]["truth"] = {
                "values": [t_all, t_only],
                "ratios": [t_all / theirs[fresh], t_only / theirs[fresh]],
                "what": f"the truth's mean fresh-item recall@{SUBSET_K} with its own ranking "
                f"of every item, then with all {SUBSET_K} places given to fresh items, and "
                f"each over {base}'s (the `truth` entry)",
            }
        out[f"{name}:cold_recall@{SUBSET_K}"] = {
            "value": mine[cold],
            "values": [mine[cold], theirs[cold]],
            "goal": "> 0",
            "what": f"{name}'s mean cold-item recall@{SUBSET_K} (items outside its "
            f"vocabulary; {base}'s beside it, 0 by construction)",
            "met": bool(mine[cold] > 0),
        }
        out[f"{name}:recall@100"] = {
            "ratio": overall,
            "values": [mine["recall@100_mean"], theirs["recall@100_mean"]],
            "goal": f">= {OVERALL_GOAL}",
            "what": f"{name}'s mean recall@100 / {base}'s",
            "met": bool(overall >= OVERALL_GOAL),
        }
    return out


def age_shares(
    data: np.ndarray, arms: dict[str, dict[str, Any]], kept: dict[str, Any]
) -> dict[str, Any]:
    """The Fig. 4-style table: per age bin, the counts and shares of the scored days'
    targets (`data`) and of each arm's top AGE_K (summed over its rows), beside the series
    `kept` from a result merged into."""

    def series(counts: np.ndarray) -> dict[str, Any]:
        total = int(counts.sum())
        return {
            "counts": counts.tolist(),
            "shares": (counts / total).tolist() if total else [math.nan] * len(counts),
        }

    out = {"data": series(data)} if data.sum() else {}
    for name, arm in arms.items():
        if arm["days"] and "top_age_counts" in arm["days"][0]:
            out[name] = series(np.sum([r["top_age_counts"] for r in arm["days"]], axis=0))
        elif name in kept:
            out[name] = kept[name]
    return {
        "what": f"share of each arm's top {AGE_K} items of the candidate model (exact scores, "
        "everything the user watched before left out) and of the queries' targets (the "
        "distinct items each user watched on the scored day: `data`) by the item's age "
        "since upload at the query time, the start of the scored day; summed over all "
        "scored days",
        "k": AGE_K,
        "bins_days": list(AGE_LABELS),
        "series": out,
    }


def load_average() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"1m": one, "5m": five, "15m": fifteen}


def code_version() -> dict[str, Any]:
    """The commit the run's code is at, and whether the tree had changes beside it."""

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"head": git("rev-parse", "--short", "HEAD"), "uncommitted_changes": bool(status)}


def tuning_summary(paths: Sequence[Path]) -> dict[str, Any] | None:
    """What runs on validation days (results of this script) measured for each incremental
    setting, beside the full arm found among them."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if not runs:
        return None
    full = next((r["arms"]["full"] for r in runs if "full" in r["arms"]), None)
    rows = []
    for r in runs:
        inc = r["arms"].get("incremental")
        if not inc:
            continue
        row = {
            "update": r["settings"]["update"],
            **{k: inc[k] for k in ("recall@100_mean", "funnel_hr@10_mean", "update_cpu_s_mean")},
        }
        if full is not None:
            row["recall@100_ratio"] = inc["recall@100_mean"] / full["recall@100_mean"]
            row["update_cpu_ratio"] = inc["update_cpu_s_mean"] / full["update_cpu_s_mean"]
        rows.append(row)
    first = runs[0]["settings"]
    return {
        "train_days": first["train_days"],
        "days": first["days"],
        "eval_users": first["eval_users"],
        "full": None
        if full is None
        else {k: full[k] for k in ("recall@100_mean", "funnel_hr@10_mean", "update_cpu_s_mean")},
        "incremental": rows,
    }


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def print_table(console: Console, result: dict[str, Any]) -> None:
    table = Table(title=f"rolling next-day evaluation, {result['settings']['world']} world")
    # per arm and day taken in: the day scored, the candidate model's recall@100 (all,
    # fresh and cold targets), the funnel's HR@10, the unrepresentable share and the
    # update's wall and CPU seconds
    fresh, cold = f"fresh_recall@{SUBSET_K}", f"cold_recall@{SUBSET_K}"
    cols = ("arm", "day", "scored", "R@100", "fresh", "cold", "HR@10", "unrepr.", "wall s", "CPU s")
    for col in cols:
        table.add_column(col, justify="left" if col == "arm" else "right")

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for name in ("start", "start_content"):
        start = result.get(name)
        if start:
            table.add_row(
                name, str(start["day"]), str(start["eval_day"]), num(start["recall@100"]),
                num(start.get(fresh)), num(start.get(cold)), num(start["funnel_hr@10"]),
                f"{start['unrepresentable']:.2%}", "-", "-",
            )  # fmt: skip
    for name, arm in result["arms"].items():
        for r in arm["days"]:
            table.add_row(
                name, str(r["day"]), str(r["eval_day"]), num(r["recall@100"]),
                num(r.get(fresh)), num(r.get(cold)), num(r["funnel_hr@10"]),
                f"{r['unrepresentable']:.2%}", f"{r['update_wall_s']:.1f}",
                f"{r['update_cpu_s']:.1f}",
            )  # fmt: skip
        if arm["days"]:
            table.add_row(
                f"[bold]{name}", "mean", "", num(arm["recall@100_mean"]),
                num(arm.get(f"{fresh}_mean")), num(arm.get(f"{cold}_mean")),
                num(arm["funnel_hr@10_mean"]), f"{arm['unrepresentable_mean']:.2%}",
                f"{arm['update_wall_s_mean']:.1f}", f"{arm['update_cpu_s_mean']:.1f}",
            )  # fmt: skip
    console.print(table)
    for name, g in result["goals"].items():
        verdict = {True: "met", False: "not met", None: "not measured"}[g.get("met")]
        if g.get("ratio") is not None:
            console.print(f"{name}: {g['what']} = {g['ratio']:.3f} (goal {g['goal']}: {verdict})")
        elif "value" in g:
            console.print(f"{name}: {g['what']} = {g['value']:.4f} (goal {g['goal']}: {verdict})")
        elif "met" in g:
            console.print(f"{name}: {g['what']} ({verdict})")


def figure(result: dict[str, Any], path: Path) -> None:
    """recall@100 and funnel HR@10 by scored day, one line per arm, from the start point
    (the content tower's own for the content arms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in zip(
        axes, ("recall@100", "funnel_hr@10"), ("candidate model recall@100", "funnel HR@10"),
        strict=True,
    ):  # fmt: skip
        for name, arm in result["arms"].items():
            start = result.get("start_content" if is_content(name) else "start")
            first = [start] if start else []
            days = [r["eval_day"] for r in [*first, *arm["days"]]]
            values = [r[key] for r in [*first, *arm["days"]]]
            # an arm and its content twin share a colour, the twin dashed
            ax.plot(
                days, values, marker="o", label=name, color=f"C{ID_ARMS.index(kind_of(name))}",
                linestyle="--" if is_content(name) else "-",
            )  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("day scored (the updated models have taken in every day before it)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    s = result["settings"]
    fig.suptitle(
        f"Rolling next-day evaluation, {s['world']} world (seed {s['seed']}): trained on days "
        f"1-{s['train_days']}, then one day at a time"
    )
    save_figure(fig, path)


def age_figure_path(figure_path: Path) -> Path:
    """The age figure beside the other: rolling.png -> rolling_age.png."""
    return figure_path.with_name(f"{figure_path.stem}_age{figure_path.suffix}")


# The series of the age figure: the data and the incremental arms (the model a service
# would serve), id-only and with the content tower
AGE_SERIES = ("data", "incremental", f"incremental{CONTENT}")


def age_figure(result: dict[str, Any], path: Path) -> None:
    """After Fig. 4 of Covington et al. 2016 (section 3.3): the share of the candidate
    model's top AGE_K items in each bin of age since upload, for the incremental arms, and
    of the items actually watched, over all scored days (`age_shares`). Without the
    incremental arms, every arm is shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ages = result["age_shares"]
    shown = [n for n in AGE_SERIES if n in ages["series"]]
    if shown == ["data"] or not shown:
        shown = list(ages["series"])
    labels = {"data": "data: next-day watches"}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    x = np.arange(len(ages["bins_days"]))
    width = 0.8 / max(len(shown), 1)
    for n, name in enumerate(shown):
        ax.bar(
            x + (n - (len(shown) - 1) / 2) * width,
            ages["series"][name]["shares"],
            width,
            label=labels.get(name, f"{name}: top {ages['k']} of the candidate model"),
        )
    ax.set_xticks(x, ages["bins_days"], rotation=20)
    ax.set_xlabel(
        "item age since upload at the query time (start of the scored day), days "
        "(bins of unequal width)"
    )
    ax.set_ylabel("share")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    s = result["settings"]
    days = result["arms"] and next(iter(result["arms"].values()))["days"]
    scored = f"days {days[0]['eval_day']}-{days[-1]['eval_day']}" if days else "no day"
    ax.set_title(
        f"Recommendations and watches by item age, {s['world']} world (seed {s['seed']}), "
        f"{scored} scored"
    )
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Save to a temporary file beside `path`, then rename it into place."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# --------------------------------------------------------------------------- the run


def parse_days(text: str) -> tuple[int, tuple[int, ...]]:
    """'21:22-27' -> (21, (22, ..., 27)): train on days 1-21, then take in 22..27."""
    train, sep, rest = text.partition(":")
    first, dash, last = rest.partition("-")
    try:
        t, a, b = int(train), int(first), int(last if dash else first)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--days: expected TRAIN:FIRST-LAST, got '{text}'"
        ) from None
    if not sep or t < 2 or a != t + 1 or b < a:
        raise argparse.ArgumentTypeError(
            f"--days: expected TRAIN:FIRST-LAST with FIRST = TRAIN + 1, got '{text}'"
        )
    return t, tuple(range(a, b + 1))


def run(
    s: Settings,
    work: Path,
    out: Path,
    figure_path: Path,
    console: Console,
    tuning: Sequence[Path] = (),
    merge_into: Path | None = None,
) -> dict[str, Any]:
    """The whole benchmark (module docstring); returns the results as written to OUT.
    tuning: results of validation-day runs, summarised under `tuning`; merge_into: a
    result whose other arms are kept (`merge_base`)."""
    previous = None
    if merge_into is not None:
        previous = merge_base(merge_into, s)
        previous["merged_into"] = str(merge_into)
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _run(s, work, out, figure_path, console, tuning, previous)
    finally:
        torch.set_num_threads(threads)


def merge_base(path: Path, s: Settings) -> dict[str, Any]:
    """The result at PATH, checked to be one this run's arms can join: a rolling result
    whose settings that decide the figures (MERGE_SETTINGS, and the content overrides when
    it has content arms that are kept) are this run's."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--merge-into {path}: cannot read it as JSON ({e})") from None
    if not isinstance(old, dict) or old.get("benchmark") != "rolling" or "arms" not in old:
        raise SystemExit(f"--merge-into {path}: not a result of benchmarks/rolling.py")
    mine = json.loads(json.dumps(asdict(s)))
    keys = list(MERGE_SETTINGS)
    if all(a in s.arms for a in old["arms"] if kind_of(a) == "incremental"):
        keys.remove("update")  # only the incremental arms read it, and they are all re-run
    if any(is_content(a) and a not in s.arms for a in old["arms"]):
        keys.append("content")
    differ = [k for k in keys if old["settings"].get(k) != mine[k]]
    if differ:
        shown = "; ".join(f"{k}: {old['settings'].get(k)} there, {mine[k]} here" for k in differ)
        raise SystemExit(f"--merge-into {path}: its settings differ from this run's ({shown})")
    return dict(old)


RUN_KEYS = ("date", "code", "code_after")  # an arm's `run`: when and at which code it ran


def previous_run(old: dict[str, Any]) -> dict[str, Any]:
    """What a result merged into recorded of its own run (its arms' figures excepted)."""
    keys = (
        *RUN_KEYS, "wall_s", "machine", "load_average_before", "load_average_after", "base",
        "base_content", "start", "start_content", "complete",
    )  # fmt: skip
    return {
        **{k: old[k] for k in keys if k in old},
        "arms": list(old["settings"]["arms"]),
        "threads": old["settings"].get("threads"),
    }


def _run(
    s: Settings,
    work: Path,
    out: Path,
    figure_path: Path,
    console: Console,
    tuning: Sequence[Path],
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    log = Log(console)
    started = time.perf_counter()
    sim = preset_config(s.world)
    if max(s.days) + 1 > sim.days:
        raise SystemExit(
            f"--days: the {s.world} world has {sim.days} days, day {max(s.days) + 1} is scored"
        )
    world, logs = work / "world", work / "logs"
    marker = logs / "exported.json"
    key = {"world": s.world, "seed": s.seed, "days": sim.days}
    if not (marker.is_file() and json.loads(marker.read_text()).get("key") == key):
        shutil.rmtree(logs, ignore_errors=True)
        if not (world / "manifest.json").is_file() or json.loads(
            (world / "manifest.json").read_text()
        )["extra"]["simulator"] != {"preset": s.world, "seed": s.seed, "truth": "truth"}:
            generate(sim, seed=s.seed, out=world, preset=s.world, force=True, progress=False)
        rows = export_days(world, logs, sim.window_start, sim.days)
        marker.write_text(json.dumps({"key": key, "rows": rows}) + "\n")
        log(f"{s.world} world (seed {s.seed}) written as {sim.days} days of logs in {logs}")
    base, base_cost = base_run(s, logs, work, log)
    bases = {a: base for a in s.arms}
    base_content_cost = None
    if any(is_content(a) for a in s.arms):
        content_base, base_content_cost = base_content_run(s, base, log)
        bases.update({a: content_base for a in s.arms if is_content(a)})

    # Each arm's dataset is its own copy of days 1-21, appended by its own updates; the
    # reference dataset (the same appends, a day ahead) gives the queries.
    arms_dir = work / "arms"
    shutil.rmtree(arms_dir, ignore_errors=True)
    data = {a: arms_dir / a / "data" for a in s.arms if kind_of(a) != "frozen"}
    for path in [*data.values(), arms_dir / "reference"]:
        shutil.copytree(base / "data", path)
    ref, state = arms_dir / "reference", arms_dir / "state.db"
    current = dict(bases)
    update_cfg = load_update_config(None, ["progress=false", *s.update])
    quiet = Console(quiet=True)

    code = code_version()
    result: dict[str, Any] = {
        "benchmark": "rolling",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": s.threads,
        },
        "code": code,
        "load_average_before": load_average(),
        "settings": {
            **asdict(s),
            "from_scratch_training": {
                "features": list(s.features),
                "candidates": list(s.candidates),
                "ranker": list(s.ranker),
                "content_candidates": candidate_overrides(s, True),
            },
            "incremental_update": asdict(update_cfg),
            "candidate_ks": list(CANDIDATE_KS),
            "funnel_k": max(FUNNEL_KS),
            "fresh_days": FRESH_DAYS,
            "age_k": AGE_K,
        },
        "protocol": {
            "queries": "every user who watched something on the scored day, one query at the "
            "start of the day from the live state seeded from the dataset through the day "
            "before (UserStateStore), the same for every arm",
            "targets": "the distinct items the user watched on the scored day",
            "exclusion": "items the user watched before the scored day are excluded from "
            "every ranking, except the targets",
            "recall@100": "candidate model alone, exact scores over every item it can "
            "represent (its export: the item vocabulary, and for a content model also the "
            "catalogue items outside it, by their content alone); targets outside it are "
            "misses",
            f"fresh_recall@{SUBSET_K}": f"recall@{SUBSET_K} of the targets uploaded in the "
            f"{FRESH_DAYS} days before the query (items table upload_ts in [query time - "
            f"{FRESH_DAYS} days, query time)), from the same rankings, averaged over the "
            "queries with at least one such target; fresh_targets counts them",
            f"cold_recall@{SUBSET_K}": "likewise of the targets outside the arm's item "
            "vocabulary (0 for an id-only model by construction); cold_representable counts "
            "those the model can represent",
            "funnel_hr@10": "the packaged Recommender's top 10 (deep, co-watch and fresh "
            "candidates ranked by the ranker)",
            "unrepresentable": "share of the scored day's watches whose item the candidate "
            "model cannot represent (outside its export)",
            "top_age_counts": f"the candidate model's top {AGE_K} items per query (exact "
            "scores, everything watched before left out) by age since upload at the query "
            "time, in the bins of age_shares",
            "update_cost": "wall and CPU seconds of taking in one day (CPU: this process "
            "and its children); the frozen arm's is 0",
            "truth": "the simulator's own ranking of the same queries (truth_score): each "
            "user's top 100 by the true watch rate at the query time, scored as the arms; "
            "and among the fresh items only",
        },
        "base": base_cost,
        "base_content": base_content_cost,
        "tuning": tuning_summary(tuning),
        "complete": False,
    }
    kept: dict[str, Any] = {}
    if previous is not None:
        kept = {
            a: {**arm, "run": arm.get("run") or {k: previous.get(k) for k in RUN_KEYS}}
            for a, arm in previous["arms"].items()
            if a not in s.arms
        }
        result["merged"] = {
            "into": previous["merged_into"],
            "kept_arms": list(kept),
            "replaced_arms": {
                a: {"recall@100_mean_before": previous["arms"][a].get("recall@100_mean")}
                for a in s.arms
                if a in previous["arms"]
            },
            "previous": [*previous.get("merged", {}).get("previous", []), previous_run(previous)],
        }
        if result["tuning"] is None:
            result["tuning"] = previous.get("tuning")
    kept_ages = (previous or {}).get("age_shares", {}).get("series", {})
    arms: dict[str, list[dict[str, Any]]] = {a: [] for a in s.arms}
    data_ages = np.zeros(len(AGE_LABELS), dtype=np.int64)
    truth = World.load(world)
    truth_rows: list[dict[str, Any]] = []
    run_of = {"date": result["date"], "code": code}

    def save() -> None:
        mine = {a: arm_summary(rows, run_of) for a, rows in arms.items()}
        result["arms"] = {a: mine.get(a) or kept[a] for a in ARMS if a in mine or a in kept}
        result["truth"] = truth_summary(truth_rows)
        result["goals"] = goals(result["arms"], result["truth"])
        result["age_shares"] = age_shares(data_ages, result["arms"], kept_ages)
        result["wall_s"] = time.perf_counter() - started
        result["load_average_after"] = load_average()
        write_json(out, result)

    nd = next_day(ref, logs, s.train_days + 1, sim.window_start, state, s.eval_users)
    starts = {"start": base} if any(not is_content(a) for a in s.arms) or not s.arms else {}
    if any(is_content(a) for a in s.arms):
        starts["start_content"] = bases[next(a for a in s.arms if is_content(a))]
    for name, path in starts.items():
        row = score(Recommender.load(path / "artifact"), nd)
        result[name] = {"day": s.train_days, "eval_day": nd.day, **row, **nd.counts}
        log(
            f"{name}: days 1-{s.train_days} models on day {nd.day} ({nd.counts['queries']:,} "
            f"users): recall@100 {row['recall@100']:.4f}, funnel HR@10 {row['funnel_hr@10']:.4f}"
        )
    if previous is not None:  # the start point of kept arms of the other kind
        for name in ("start", "start_content"):
            if name not in result and name in previous:
                result[name] = previous[name]
    for day in s.days:
        costs: dict[str, Cost] = {a: Cost() for a in s.arms if kind_of(a) == "frozen"}
        # the id-only arms first, in the order they ran before the content arms existed
        for a in sorted(s.arms, key=lambda a: (is_content(a), ARMS.index(a))):
            target = arms_dir / a / f"day-{day}"
            if kind_of(a) == "incremental":
                with measured() as cost:
                    res = update(
                        data[a], current[a], target, day_logs(logs, day), config=update_cfg,
                        console=quiet,
                    )  # fmt: skip
                cost.steps = dict(res.seconds)
            elif kind_of(a) == "full":
                with measured() as cost:
                    with step(cost, "append"):
                        append_events(data[a], day_logs(logs, day))
                    train_from_scratch(data[a], target, s, cost, content=is_content(a))
            else:
                continue
            costs[a], current[a] = cost, target
            log(f"day {day}: {a} took it in, {cost.wall_s:.1f} s wall, {cost.cpu_s:.1f} s CPU")
        nd = next_day(ref, logs, day + 1, sim.window_start, state, s.eval_users)
        data_ages += nd.age_counts(np.concatenate(nd.targets))
        truth_rows.append(truth_score(truth, world, ref, nd))
        t = truth_rows[-1]
        log(
            f"day {nd.day}, the truth's ranking: recall@100 {t['recall@100']:.4f}, fresh "
            f"{t['fresh_recall@100']:.4f}; fresh items only: fresh "
            f"{t['fresh_only_fresh_recall@100']:.4f}"
        )
        for a in s.arms:
            if kind_of(a) != "frozen":
                same_ids(data[a], ref)
            row = score(Recommender.load(current[a] / "artifact"), nd)
            c = costs[a]
            arms[a].append(
                {
                    "day": day,
                    "eval_day": nd.day,
                    **row,
                    "update_wall_s": c.wall_s,
                    "update_cpu_s": c.cpu_s,
                    "update_steps_wall_s": c.steps,
                    "load_1m": os.getloadavg()[0],
                    **nd.counts,
                }
            )
            log(
                f"day {nd.day} scored, {a}: recall@100 {row['recall@100']:.4f}, "
                f"fresh {row[f'fresh_recall@{SUBSET_K}']:.4f}, "
                f"cold {row[f'cold_recall@{SUBSET_K}']:.4f}, "
                f"funnel HR@10 {row['funnel_hr@10']:.4f}, "
                f"unrepresentable {row['unrepresentable']:.2%}"
            )
        for a in data:  # only the latest day's run is needed from here on
            for old in (arms_dir / a).glob("day-*"):
                if old != current[a]:
                    shutil.rmtree(old)
        save()
        figure(result, figure_path)
        age_figure(result, age_figure_path(figure_path))
    result["complete"] = True
    # the tree is shared: a change of code during the run shows here
    result["code_after"] = run_of["code_after"] = code_version()
    save()
    print_table(console, result)
    log(f"wrote {out}, {figure_path} and {age_figure_path(figure_path)}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", default="small", help="simulator preset [small]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--days",
        type=parse_days,
        default=parse_days("21:22-27"),
        help="TRAIN:FIRST-LAST: train on days 1..TRAIN, then take in FIRST..LAST one at a "
        "time, each scored on the day after [21:22-27]",
    )
    p.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"among {', '.join(ARMS)} [{','.join(DEFAULT_ARMS)}]",
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/funnelrec-rolling"))
    p.add_argument("--out", type=Path, default=None, help="[--merge-into, or rolling.json]")
    p.add_argument(
        "--merge-into",
        type=Path,
        default=None,
        help="a result of this script: its arms that this run does not run are kept",
    )
    p.add_argument(
        "--content",
        nargs="*",
        default=None,
        help="candidate overrides of the content arms' from-scratch training [item_content=true]",
    )
    p.add_argument("--figure", type=Path, default=None, help="[--out with .png]")
    p.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    p.add_argument("--features", nargs="*", default=[], help="FeaturesConfig overrides")
    p.add_argument("--candidates", nargs="*", default=None, help="from-scratch candidate model")
    p.add_argument("--ranker", nargs="*", default=None, help="from-scratch ranker")
    p.add_argument(
        "--update",
        nargs="*",
        default=None,
        help="the incremental arm's UpdateConfig overrides [TUNED_UPDATE of the world; "
        "none given: the update's defaults]",
    )
    p.add_argument(
        "--tuning",
        nargs="*",
        type=Path,
        default=[],
        help="results of validation-day runs the incremental settings were chosen on, "
        "summarised into the results",
    )
    p.add_argument("--eval-users", type=int, default=None, help="score the first N users a day")
    args = p.parse_args(argv)
    out = args.out or args.merge_into or RESULTS
    if args.merge_into is not None and not args.merge_into.is_file():
        p.error(f"--merge-into {args.merge_into}: no such file")
    arms = tuple(a for a in ARMS if a in args.arms.split(","))
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown or not arms:
        p.error(f"--arms: expected some of {', '.join(ARMS)}, got '{args.arms}'")
    if args.world not in TRAINING and (args.candidates is None or args.ranker is None):
        p.error(
            f"--world {args.world}: give --candidates and --ranker (known: {', '.join(TRAINING)})"
        )
    cand, rank = TRAINING.get(args.world, ((), ()))
    train_days, days = args.days
    s = Settings(
        world=args.world,
        seed=args.seed,
        train_days=train_days,
        days=days,
        arms=arms,
        features=tuple(args.features),
        candidates=tuple(cand if args.candidates is None else args.candidates),
        ranker=tuple(rank if args.ranker is None else args.ranker),
        update=tuple(TUNED_UPDATE.get(args.world, ()) if args.update is None else args.update),
        threads=args.threads,
        eval_users=args.eval_users,
        content=tuple(Settings.content if args.content is None else args.content),
    )
    figure_path = args.figure or out.with_suffix(".png")
    # the results table has ten columns: wider than the 80 a console without a terminal gets
    console = Console(width=max(Console().width, 132))
    return run(
        s, args.work, out, figure_path, console, tuning=args.tuning, merge_into=args.merge_into
    )


if __name__ == "__main__":
    main()
