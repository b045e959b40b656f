"""Rolling next-day evaluation: a model never updated, one updated every day with
`funnelrec update` (warm starts) and one retrained from scratch every day, each scored on
the next day's watches of a simulated world fed in as a user's own logs.

    .venv/bin/python benchmarks/rolling.py                          # small world, days 22-27
    .venv/bin/python benchmarks/rolling.py --arms frozen,incremental --days 21:22-24
    .venv/bin/python benchmarks/rolling.py --world tiny --days 21:22-23 --work /tmp/rt \
        --out /tmp/rolling-tiny.json

Data: the world (`--world`, `--seed`) is simulated once, and each of its days written under
WORK/logs as a service's logs would be: a folder of Parquet files per day (watches,
impressions, searches, and the users and items first seen that day, under the simulator's
raw ids). `funnelrec data import events` brings in the first days (`--days 21:22-27`: days
1-21), and `funnelrec data append` each later one, exactly as a user's logs. (The events
mapping has no columns for the logging policy's candidate source and score: the
impressions come without them, as the simulated world's features leave them out anyway.)

Days 1-21 are trained once (leave-last-out features; the training settings of `TRAINING`,
the demo's on the small world, or `--candidates` / `--ranker`) and packaged. Then, for each
day D of 22-27, every arm takes in day D and is scored on day D + 1:

    frozen       never updated
    incremental  `funnelrec update` (`pipeline.update`): append -> features update ->
                 warm starts of both stages -> index -> package, with the update's
                 default settings (`--update KEY=VALUE` overrides them)
    full         `data append`, then features, both stages and the package built from
                 scratch with the settings days 1-21 were trained with

An update's cost is the wall and CPU seconds of that work, CPU being this process's and
any children's (`time.process_time` and `RUSAGE_CHILDREN`); torch runs `--threads` threads.

Scoring day D + 1: every user who watched something that day is one query made at the start
of the day, from the live state a server would hold (each user's last watches and queries
and their impression counts, seeded from the dataset through day D: `UserStateStore`), the
same for every arm; the targets are the distinct items the user watched that day. Items
the user watched before are excluded from every ranking, except the targets (a re-watch
stays retrievable, the protocol of `candidates.metrics`).
  recall@100       the candidate model alone: exact scores over its whole item vocabulary
                   (`target_ranks`, `RetrievalMetrics`); a target outside the vocabulary
                   is a miss
  funnel HR@10     the packaged funnel (`Recommender.recommend`: deep, co-watch and fresh
                   candidates ranked by the ranker), its top 100 scored by `list_ranks`
  unrepresentable  the share of day D + 1's watches whose item is outside the candidate
                   model's item vocabulary
The models of days 1-21 are also scored on day 22 (`start`, every arm's first point).

Goals: `incremental` reaches >= 0.97 x `full`'s mean recall@100 at <= 1/10 of its mean
update CPU seconds; the figure shows the frozen arm's decay. Writes
benchmarks/results/rolling.json (after every day, `complete` false until the end) and
benchmarks/results/rolling.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
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

from funnelrec.candidates import fit_candidates, load_training_config
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
from funnelrec.serving.recommender import Recommender, RecommendRequest
from funnelrec.serving.state import UserContext, UserStateStore
from funnelrec.simulate import generate, preset_config

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "rolling.json"
ARMS = ("frozen", "incremental", "full")
DAY = 86_400
CANDIDATE_KS = (10, 50, 100)
FUNNEL_KS = (10, 100)  # the funnel is asked for max(FUNNEL_KS) items
RECALL_GOAL = 0.97  # incremental's mean recall@100 over full's, at least
CPU_GOAL = 0.1  # incremental's mean update CPU seconds over full's, at most
USERS_PER_BATCH = 256  # queries scored against the whole vocabulary at once

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

# The incremental arm's `UpdateConfig` overrides on the small world: the update's defaults
# (up to 50 candidate and 20 ranker epochs, each stopped by validation) cost far more than
# the goal allows, so these were chosen on validation days instead (days 1-14 trained,
# days 15-16 taken in, scored on days 16-17; docs/freshness.md has the settings tried):
# the fewest candidate epochs whose recall@100 kept to the goal against the full arm's.
# `--update` with no values runs the defaults.
TUNED_UPDATE: dict[str, tuple[str, ...]] = {
    "small": ("candidates.overrides=epochs=3,patience=0", "ranker.overrides=train.epochs=1"),
}

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
    is training data (a time split holds the latest watches out, the new day's among them).
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


def train_from_scratch(data: Path, out: Path, s: Settings, cost: Cost) -> None:
    """Features, candidate model, ranker and package of DATA, built anew into the run
    directory OUT (the layout `funnelrec update` continues from), with the settings of
    days 1-21."""
    fc = load_config(FeaturesConfig, None, list(s.features))
    with step(cost, "features"):
        build_features(data, out / "features", split=s.split, config=fc, force=True, progress=False)
    with step(cost, "candidates"):
        cand = load_training_config(None, list(s.candidates))
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


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class NextDay:
    """The queries of one scored day, one per user who watched something that day.

    users [Q] (sorted dataset ids); contexts [Q] their live state at the start of the day;
    watched [Q] the distinct items each watched before the day; targets [Q] the distinct
    items each watched that day; items [W] the item of every watch of the day (all users).
    """

    day: int
    users: np.ndarray
    contexts: list[UserContext]
    watched: list[np.ndarray]
    targets: list[np.ndarray]
    items: np.ndarray
    counts: dict[str, int]


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
    counts = {
        "active_users": active,
        "queries": len(users),
        "targets": sum(len(t) for t in targets),
        "watches": int(today.sum()),
        "new_users": int((users > users_before).sum()),
        "watches_of_new_items": int((item[today] > items_before).sum()),
    }
    return NextDay(day, users, contexts, watched, targets, item[today], counts)


def score(rec: Recommender, nd: NextDay) -> dict[str, Any]:
    """The candidate model's and the funnel's metrics on the day's queries (module
    docstring), and the share of the day's watches the model cannot represent."""
    started = time.perf_counter()
    vocab = rec.features.vocab("item")
    n1 = len(vocab)
    scorer, keys = ModelScorer(rec.candidate_model), tie_keys(n1)
    cand, funnel = RetrievalMetrics(CANDIDATE_KS), RetrievalMetrics(FUNNEL_KS)
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
        scores = scorer.scores(scorer.queries(batch)).float()
        targets = np.full((len(rows), int(sizes[rows].max())), -1, dtype=np.int64)
        for j, r in enumerate(rows):
            targets[j, : sizes[r]] = nd.targets[r]
        in_vocab = vocab.lookup(targets.ravel()).reshape(targets.shape).astype(np.int64)
        vocab_targets = np.where(targets > 0, in_vocab, -1)  # 0: outside the vocabulary
        seen = [vocab.lookup(nd.watched[r]).astype(np.int64) for r in rows]
        starts = np.cumsum([0] + [len(x) for x in seen[:-1]])
        exclude = exclusion_mask(
            torch.from_numpy(np.concatenate(seen)), torch.from_numpy(starts), n1
        )
        n_rel = torch.from_numpy(sizes[rows].astype(np.float64))
        cand.update(target_ranks(scores, torch.from_numpy(vocab_targets), exclude, keys), n_rel)
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
    return {
        "recall@100": c["recall@100"],
        "recall@10": c["recall@10"],
        "recall@50": c["recall@50"],
        "ndcg@10": c["ndcg@10"],
        "funnel_hr@10": f["hr@10"],
        "funnel_recall@10": f["recall@10"],
        "funnel_ndcg@10": f["ndcg@10"],
        "funnel_recall@100": f["recall@100"],
        "unrepresentable": float((vocab.lookup(nd.items) == 0).mean()),
        "vocabulary_items": n1 - 1,
        "score_s": time.perf_counter() - started,
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


def arm_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An arm's rows and their means (NaN-free: every row has every figure)."""

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows])) if rows else math.nan

    return {
        "days": rows,
        "recall@100_mean": mean("recall@100"),
        "funnel_hr@10_mean": mean("funnel_hr@10"),
        "unrepresentable_mean": mean("unrepresentable"),
        "update_cpu_s_mean": mean("update_cpu_s"),
        "update_wall_s_mean": mean("update_wall_s"),
    }


def goals(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
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
    # per arm and day taken in: the day scored, the candidate model's recall@100, the
    # funnel's HR@10, the unrepresentable share and the update's wall and CPU seconds
    for col in ("arm", "day", "scored", "R@100", "HR@10", "unrepr.", "wall s", "CPU s"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    start = result.get("start")
    if start:
        table.add_row(
            "start", str(start["day"]), str(start["eval_day"]), f"{start['recall@100']:.4f}",
            f"{start['funnel_hr@10']:.4f}", f"{start['unrepresentable']:.2%}", "-", "-",
        )  # fmt: skip
    for name, arm in result["arms"].items():
        for r in arm["days"]:
            table.add_row(
                name, str(r["day"]), str(r["eval_day"]), f"{r['recall@100']:.4f}",
                f"{r['funnel_hr@10']:.4f}", f"{r['unrepresentable']:.2%}",
                f"{r['update_wall_s']:.1f}", f"{r['update_cpu_s']:.1f}",
            )  # fmt: skip
        if arm["days"]:
            table.add_row(
                f"[bold]{name}", "mean", "", f"{arm['recall@100_mean']:.4f}",
                f"{arm['funnel_hr@10_mean']:.4f}", f"{arm['unrepresentable_mean']:.2%}",
                f"{arm['update_wall_s_mean']:.1f}", f"{arm['update_cpu_s_mean']:.1f}",
            )  # fmt: skip
    console.print(table)
    for name, g in result["goals"].items():
        if "ratio" in g:
            verdict = "met" if g["met"] else "not met"
            console.print(f"{name}: {g['what']} = {g['ratio']:.3f} (goal {g['goal']}: {verdict})")


def figure(result: dict[str, Any], path: Path) -> None:
    """recall@100 and funnel HR@10 by scored day, one line per arm, from the start point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    start = result["start"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in zip(
        axes, ("recall@100", "funnel_hr@10"), ("candidate model recall@100", "funnel HR@10"),
        strict=True,
    ):  # fmt: skip
        for name, arm in result["arms"].items():
            days = [start["eval_day"]] + [r["eval_day"] for r in arm["days"]]
            values = [start[key]] + [r[key] for r in arm["days"]]
            ax.plot(days, values, marker="o", label=name)
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
    fig.tight_layout()
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
) -> dict[str, Any]:
    """The whole benchmark (module docstring); returns the results as written to OUT.
    tuning: results of validation-day runs, summarised under `tuning`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return _run(s, work, out, figure_path, console, tuning)
    finally:
        torch.set_num_threads(threads)


def _run(
    s: Settings, work: Path, out: Path, figure_path: Path, console: Console, tuning: Sequence[Path]
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

    # Each arm's dataset is its own copy of days 1-21, appended by its own updates; the
    # reference dataset (the same appends, a day ahead) gives the queries.
    arms_dir = work / "arms"
    shutil.rmtree(arms_dir, ignore_errors=True)
    data = {a: arms_dir / a / "data" for a in s.arms if a != "frozen"}
    for path in [*data.values(), arms_dir / "reference"]:
        shutil.copytree(base / "data", path)
    ref, state = arms_dir / "reference", arms_dir / "state.db"
    current = {a: base for a in s.arms}
    update_cfg = load_update_config(None, ["progress=false", *s.update])
    quiet = Console(quiet=True)

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
        "code": code_version(),
        "load_average_before": load_average(),
        "settings": {
            **asdict(s),
            "from_scratch_training": {
                "features": list(s.features),
                "candidates": list(s.candidates),
                "ranker": list(s.ranker),
            },
            "incremental_update": asdict(update_cfg),
            "candidate_ks": list(CANDIDATE_KS),
            "funnel_k": max(FUNNEL_KS),
        },
        "protocol": {
            "queries": "every user who watched something on the scored day, one query at the "
            "start of the day from the live state seeded from the dataset through the day "
            "before (UserStateStore), the same for every arm",
            "targets": "the distinct items the user watched on the scored day",
            "exclusion": "items the user watched before the scored day are excluded from "
            "every ranking, except the targets",
            "recall@100": "candidate model alone, exact scores over its item vocabulary; "
            "targets outside it are misses",
            "funnel_hr@10": "the packaged Recommender's top 10 (deep, co-watch and fresh "
            "candidates ranked by the ranker)",
            "unrepresentable": "share of the scored day's watches whose item is outside the "
            "candidate model's item vocabulary",
            "update_cost": "wall and CPU seconds of taking in one day (CPU: this process "
            "and its children); the frozen arm's is 0",
        },
        "base": base_cost,
        "tuning": tuning_summary(tuning),
        "complete": False,
    }
    arms: dict[str, list[dict[str, Any]]] = {a: [] for a in s.arms}

    def save() -> None:
        result["arms"] = {a: arm_summary(rows) for a, rows in arms.items()}
        result["goals"] = goals(result["arms"])
        result["wall_s"] = time.perf_counter() - started
        result["load_average_after"] = load_average()
        write_json(out, result)

    nd = next_day(ref, logs, s.train_days + 1, sim.window_start, state, s.eval_users)
    start = score(Recommender.load(base / "artifact"), nd)
    result["start"] = {"day": s.train_days, "eval_day": nd.day, **start, **nd.counts}
    log(
        f"start: days 1-{s.train_days} models on day {nd.day} ({nd.counts['queries']:,} "
        f"users): recall@100 {start['recall@100']:.4f}, funnel HR@10 {start['funnel_hr@10']:.4f}"
    )
    for day in s.days:
        costs: dict[str, Cost] = {"frozen": Cost()}
        if "incremental" in s.arms:
            target = arms_dir / "incremental" / f"day-{day}"
            with measured() as cost:
                res = update(
                    data["incremental"],
                    current["incremental"],
                    target,
                    day_logs(logs, day),
                    config=update_cfg,
                    console=quiet,
                )
            cost.steps = dict(res.seconds)
            costs["incremental"], current["incremental"] = cost, target
        if "full" in s.arms:
            target = arms_dir / "full" / f"day-{day}"
            with measured() as cost:
                with step(cost, "append"):
                    append_events(data["full"], day_logs(logs, day))
                train_from_scratch(data["full"], target, s, cost)
            costs["full"], current["full"] = cost, target
        for a, c in costs.items():
            if a in s.arms and a != "frozen":
                log(f"day {day}: {a} took it in, {c.wall_s:.1f} s wall, {c.cpu_s:.1f} s CPU")
        nd = next_day(ref, logs, day + 1, sim.window_start, state, s.eval_users)
        for a in s.arms:
            if a != "frozen":
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
                f"day {nd.day} scored, {a}: recall@100 {row['recall@100']:.4f}, funnel HR@10 "
                f"{row['funnel_hr@10']:.4f}, unrepresentable {row['unrepresentable']:.2%}"
            )
        for a in ("incremental", "full"):  # only the latest day's run is needed from here on
            for old in (arms_dir / a).glob("day-*"):
                if a in current and old != current[a]:
                    shutil.rmtree(old)
        save()
        figure(result, figure_path)
    result["complete"] = True
    # the tree is shared: a change of code during the run shows here
    result["code_after"] = code_version()
    save()
    print_table(console, result)
    log(f"wrote {out} and {figure_path}")
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
    p.add_argument("--arms", default=",".join(ARMS), help=f"among {', '.join(ARMS)}")
    p.add_argument("--work", type=Path, default=Path("/tmp/funnelrec-rolling"))
    p.add_argument("--out", type=Path, default=RESULTS)
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
    )
    figure_path = args.figure or args.out.with_suffix(".png")
    return run(s, args.work, args.out, figure_path, Console(), tuning=args.tuning)


if __name__ == "__main__":
    main()
