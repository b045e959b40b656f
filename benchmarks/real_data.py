"""The whole funnel, each source it mixes, the baselines and SASRec on real data
(MovieLens-100k, Amazon Beauty), beside the peers' figures.

    .venv/bin/python benchmarks/real_data.py                      # both data sets, all models
    .venv/bin/python benchmarks/real_data.py --datasets ml-100k --seeds 0,1,2 --merge
    .venv/bin/python benchmarks/real_data.py --datasets beauty \
        --models funnel,funnelrec,cowatch-last5 --seeds 0,1,2 --merge

Protocol (the one the peers' figures in PEERS were measured with): each user's interactions
in time order (ties in file order); users with fewer than 3 dropped; the last interaction is
the test target, the one before it validation, the rest training; every model fitted on
training data only; full ranking over all items, the user's training and validation items
excluded from the ranking (never the target); one target per user, so HR@K = Recall@K;
ties broken at random with a fixed seed (one random order of the items, `metrics.tie_keys`).
History at test time: 'train' = training items only; '+val' = training items plus the
validation item. Exclusion is the same in both.

Data: MovieLens-100k is fetched with `funnelrec.data.fetch` into --ml100k when that directory
does not exist (GroupLens, else the recbole 1.2.1 wheel from the package index); Beauty is
imported from amazon-beauty/beauty.txt of the shared data folder, `../shared/data/` beside
the checkout (or --beauty), into --work. A data set that cannot be had is not run, with a
line naming the path looked for and how to get it, repeated at the end.
Writes benchmarks/results/real_data.json and prints a table beside the peers' numbers.

Models: the funnel (`funnel`: deep, co-watch and popular candidates ranked by the ranking
network, `funnelrec.ranking.sequence`; docs/evaluation.md, "The funnel on sequence data"),
its deep candidate model alone (`funnelrec`, scored at example age 0 as served), co-watch,
popularity, ItemKNN, BPR, ALS and SASRec with full cross-entropy (`sasrec`,
benchmarks/sasrec.py). `--seeds 0,1,2` runs every model with a training seed once per
seed and records the mean, standard deviation, min and max; `--merge` keeps the models of
an earlier run that this one does not re-run, each marked with that run's date.

It says what it does as it goes: the data set, each model's fit, and the progress of
funnelrec's own feature build and training and of every evaluation (`funnelrec.progress`:
a live bar on a terminal, plain lines with rate and ETA in a log); --no-progress: the
per-model lines only.

Adding a model: write `def my_model(data: Split) -> ModelRun` that fits on
`data.train` and returns a score function per history setting (`ScoreFn`: user ids [b]
and their histories -> [b, N + 1] scores), and add it to MODELS. `evaluate` is shared.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from funnelrec import __version__
from funnelrec.baselines import ALS, BPR, CoWatch, ItemKNN, Jagged, Popularity
from funnelrec.candidates.metrics import RetrievalMetrics, exclusion_mask, target_ranks, tie_keys
from funnelrec.data.dataset import Dataset, write_json_atomic
from funnelrec.errors import FunnelrecError
from funnelrec.progress import progress_bar
from funnelrec.ranking.sequence_fit import SequenceSplit, read_sequence_split

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
BEAUTY = "amazon-beauty/beauty.txt"  # in the shared data folder
SEED = 0
MIN_INTERACTIONS = 3
KS = (10, 50)
SCORE_BUDGET = 1 << 24  # (query, item) scores held at once
SETTINGS = ("train", "+val")
PROTOCOL = (
    "leave-last-out per user in time order (users with < 3 interactions dropped); test = "
    "last, validation = the one before, training = the rest; models fitted on training "
    "only; full ranking over all items with the user's training and validation items "
    "excluded (never the target); HR@K = Recall@K (one target per user); ties broken at "
    f"random with seed {SEED}; history 'train' = training items, '+val' = training items + "
    "the validation item"
)

# The peers' figures (other libraries' models, measured under the same protocol on the same
# kind of machine), for side-by-side printing.
PEERS: dict[str, dict[str, dict[str, float]]] = {
    "ml-100k": {
        "most-popular": {"train hr@10": 0.0859, "train ndcg@10": 0.0445, "train hr@50": 0.1983},
        "itemknn": {
            "train hr@10": 0.0965, "train ndcg@10": 0.0517, "train hr@50": 0.2672,
            "+val hr@10": 0.1018, "+val ndcg@10": 0.0545,
        },
        "bpr": {"train hr@10": 0.1357, "train ndcg@10": 0.0707, "train hr@50": 0.3277},
        "als": {
            "train hr@10": 0.1262, "train ndcg@10": 0.0657, "train hr@50": 0.3521,
            "+val hr@10": 0.1421, "+val ndcg@10": 0.0714,
        },
        "youtubednn tuned (torch-rechub)": {
            "train hr@10": 0.1718, "train ndcg@10": 0.0906, "train hr@50": 0.4093,
            "+val hr@10": 0.1707, "+val ndcg@10": 0.0891,
        },
        # another implementation on this protocol and kind of machine (../shared/BENCHMARKS.md)
        "sasrec full cross-entropy (measured elsewhere)": {
            "+val hr@10": 0.2238, "+val ndcg@10": 0.1139,
        },
    },
    "beauty": {
        "most-popular": {"train hr@10": 0.0078, "train ndcg@10": 0.0035, "train hr@50": 0.0215},
        "itemknn": {
            "train hr@10": 0.0182, "train ndcg@10": 0.0097, "train hr@50": 0.0434,
            "+val hr@10": 0.0250, "+val ndcg@10": 0.0139,
        },
        "bpr": {"train hr@10": 0.0090, "train ndcg@10": 0.0046, "train hr@50": 0.0280},
        "als": {
            "train hr@10": 0.0175, "train ndcg@10": 0.0090, "train hr@50": 0.0474,
            "+val hr@10": 0.0201, "+val ndcg@10": 0.0107,
        },
        "youtubednn tuned (torch-rechub)": {
            "train hr@10": 0.0248, "train ndcg@10": 0.0125, "train hr@50": 0.0635,
            "+val hr@10": 0.0242, "+val ndcg@10": 0.0120,
        },
        # Klenitskiy & Vasilev, RecSys 2023: this file, full ranking, seen items filtered,
        # GPU-trained
        "sasrec full cross-entropy (published)": {"+val hr@10": 0.0533, "+val ndcg@10": 0.0327},
    },
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# The split


# The protocol's cut is the product's own (`funnelrec.ranking.sequence_fit`): the funnel
# model and every other model see the same training, validation and test watches.
Split = SequenceSplit


def load_split(name: str, path: Path) -> Split:
    """Read a funnelrec dataset's watches and cut them by the protocol."""
    return read_sequence_split(path, name=name, min_interactions=MIN_INTERACTIONS)


def _rows(j: Jagged, lo: int, hi: int) -> Jagged:
    a, b = int(j.offsets[lo]), int(j.offsets[hi])
    return Jagged(j.values[a:b], j.offsets[lo : hi + 1] - a)


# ---------------------------------------------------------------------------------------
# The shared evaluation

ScoreFn = Callable[[np.ndarray, Jagged], np.ndarray]  # users [b], histories -> [b, N + 1]


@dataclass
class ModelRun:
    """A fitted model: a score function per history setting it supports."""

    name: str
    fit_seconds: float
    scores: dict[str, ScoreFn]
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # more to record in the results


def evaluate(
    score: ScoreFn,
    data: Split,
    setting: str,
    progress: Progress | None = None,
    name: str = "",
) -> dict[str, float]:
    """HR / NDCG / Recall @ KS of one score function on every evaluated user (`name`: the
    model's, for the progress bar)."""
    n1 = data.num_items + 1
    keys = tie_keys(n1, SEED)
    acc = RetrievalMetrics(KS)
    q = data.users.size
    rows = max(1, SCORE_BUDGET // n1)
    what = " ".join(x for x in (data.name, name, setting) if x)
    task = progress.add_task(what, total=q) if progress else None
    for lo in range(0, q, rows):
        hi = min(q, lo + rows)
        s = torch.from_numpy(
            np.ascontiguousarray(score(data.users[lo:hi], _rows(data.history[setting], lo, hi)))
        )
        if s.shape != (hi - lo, n1):
            raise FunnelrecError(f"scores of shape {tuple(s.shape)}, expected {(hi - lo, n1)}")
        seen = _rows(data.seen, lo, hi)
        exclude = exclusion_mask(
            torch.from_numpy(seen.values), torch.from_numpy(seen.offsets[:-1]), n1
        )
        target = torch.from_numpy(data.target[lo:hi]).reshape(-1, 1)
        acc.update(target_ranks(s.float(), target, exclude, keys), torch.ones(hi - lo))
        if progress is not None and task is not None:
            progress.advance(task, hi - lo)
    m = acc.compute()
    return {k: m[k] for k in (f"{x}@{k}" for x in ("hr", "ndcg", "recall") for k in KS)}


# ---------------------------------------------------------------------------------------
# The models: one function each, fitted on data.train only


def most_popular(data: Split) -> ModelRun:
    m = Popularity().fit(data.train, data.num_items)
    return ModelRun("most popular", m.fit_seconds, {"train": lambda u, h: m.score(h)})


RECENT_WINDOW_S = 7 * 86400


def recent_popular(data: Split) -> ModelRun:
    """Counts of training watches in the 7 days before each test request (the target's
    time): "popular now", as the serving source sees it. Needs real timestamps."""
    if data.synthetic_timestamps:
        raise FunnelrecError("timestamps are synthetic (positions): no time window")
    started = time.perf_counter()
    m = Popularity(window_s=RECENT_WINDOW_S)
    # one fit per distinct request time, strictly before the target
    nows, which = np.unique(data.target_ts - 1, return_inverse=True)
    table = np.stack([m.fit(data.train, data.num_items, now=int(t)).scores_ for t in nows])

    def score(users: np.ndarray, h: Jagged) -> np.ndarray:
        return table[which[np.searchsorted(data.users, users)]]

    return ModelRun(
        "popular last 7 days",
        time.perf_counter() - started,
        {"train": score},
        note=f"one fit per request time ({nows.size} fits)",
    )


def _cowatch(data: Split, last_n: int, name: str) -> ModelRun:
    m = CoWatch(next_n=5, neighbours=100, last_n=last_n).fit(data.train, data.num_items)
    return ModelRun(
        name,
        m.fit_seconds,
        {"train": lambda u, h: m.score(h), "+val": lambda u, h: m.score(h)},
    )


def cowatch_last(data: Split) -> ModelRun:
    return _cowatch(data, 1, "co-watch, last watch")


def cowatch_last5(data: Split) -> ModelRun:
    return _cowatch(data, 5, "co-watch, last 5 watches")


def itemknn(data: Split) -> ModelRun:
    m = ItemKNN(neighbours=100).fit(data.train, data.num_items)
    return ModelRun(
        "itemknn",
        m.fit_seconds,
        {"train": lambda u, h: m.score(h), "+val": lambda u, h: m.score(h)},
    )


def bpr(data: Split) -> ModelRun:
    m = BPR(factors=64, threads=1, seed=TRAIN_SEED).fit(data.train, data.num_items)
    # BPR has no fold-in: only the learned vectors of training users ('train' history).
    return ModelRun("bpr", m.fit_seconds, {"train": lambda u, h: m.score(h, users=u)})


def als(data: Split) -> ModelRun:
    m = ALS(factors=64, threads=2, seed=TRAIN_SEED).fit(data.train, data.num_items)
    return ModelRun(
        "als",
        m.fit_seconds,
        # 'train': the learned user vectors; '+val': a fold-in of the longer history
        {"train": lambda u, h: m.score(h, users=u), "+val": lambda u, h: m.score(h)},
    )


# funnelrec's own candidate model: features built from the same dataset with the same
# leave-last-out cut (min 3 watches; test = last, validation = the one before), trained on
# the training examples only (validation Recall@10 picks the epoch), and scored by exact
# dot products over every item. Set by main() from --funnelrec-config / overrides.
FUNNELREC_CONFIGS = {"ml-100k": "candidates-ml100k.toml", "beauty": "candidates-beauty.toml"}
FUNNELREC_OVERRIDES: list[str] = []
FUNNELREC_FEATURE_OVERRIDES: list[str] = []
WORK = Path("/tmp/funnelrec-bench")
PROGRESS = True  # funnelrec's feature build and training show their progress
# Example age of the request: 0 as served (Covington et al. 2016, section 3.3), unless
# --age-at-target scores at the target's own time (an advantage no peer gets).
AGE_AT_REQUEST = False
# The training seed of the models that have one (--seeds runs each of them per seed; the
# evaluation's tie-break stays SEED).
TRAIN_SEED = SEED
SEEDED = ("bpr", "als", "funnelrec", "funnel", "sasrec")


def funnelrec(data: Split) -> ModelRun:
    from funnelrec.candidates import fit_candidates, load_candidate_model, load_training_config
    from funnelrec.config import load_config
    from funnelrec.features import Demographics, Features, FeaturesConfig
    from funnelrec.features.build import build_features

    fcfg = load_config(FeaturesConfig, None, ["cap=none", *FUNNELREC_FEATURE_OVERRIDES])
    tag = hashlib.sha1(" ".join(FUNNELREC_FEATURE_OVERRIDES).encode()).hexdigest()[:8]
    feat_dir = WORK / f"{data.name}-features-{tag}-{os.getpid()}"
    art = WORK / f"{data.name}-candidates-{os.getpid()}"
    for d in (feat_dir, art):  # per process (runs may go side by side), removed at exit
        atexit.register(shutil.rmtree, d, ignore_errors=True)
    build_features(data.path, feat_dir, split="last", config=fcfg, force=True, progress=PROGRESS)
    feats = Features.open(feat_dir)
    config = load_training_config(
        REPO / "configs" / FUNNELREC_CONFIGS[data.name],
        [f"train.seed={TRAIN_SEED}", *FUNNELREC_OVERRIDES],
    )
    # torch imports its compiler stack the first time an optimizer is built (seconds:
    # docs/candidates.md, "Real data"): a library import, not training, so it happens
    # before the clock starts
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    started, cpu = time.perf_counter(), time.process_time()
    fit_candidates(feats, art, config, force=True, progress=PROGRESS)
    fit_s, fit_cpu = time.perf_counter() - started, time.process_time() - cpu
    model = load_candidate_model(art)
    emb, item_ids = load_item_embeddings_of(art)
    t_min, t_max = (int(x) for x in feats.manifest["split"]["train_time_range"])
    users = Dataset.open(data.path).table("users").to_pylist()
    by_user = {int(r["user_id"]): r for r in users}

    def demographics(u: int) -> Demographics | None:
        r = by_user.get(u)
        if r is None:
            return None
        age = r.get("age")
        return Demographics(
            age=None if age is None or age != age else float(age),
            gender=r.get("gender"),
            region=r.get("region"),
            device=r.get("device"),
            logged_in=r.get("logged_in"),
        )

    def score(u: np.ndarray, h: Jagged) -> np.ndarray:
        hist = [h.values[h.offsets[i] : h.offsets[i + 1]].tolist() for i in range(u.size)]
        batch = feats.candidate_batch(
            hist, demographics=[demographics(int(x)) for x in u], user_ids=u.tolist()
        )
        with torch.no_grad():
            if AGE_AT_REQUEST:
                # the request's "now" is the target's time (known when asking, the target
                # itself is not): example age (t_max - now) / span, clamped at 0 as served
                now = data.target_ts[np.searchsorted(data.users, u)]
                age = torch.from_numpy((t_max - now) / max(t_max - t_min, 1)).clamp(min=0)
                q = model.user_vector(batch, age.float())
            else:
                q = model(batch)
            s = (q @ emb.T).numpy()
        out = np.full((u.size, data.num_items + 1), -1e30, dtype=np.float32)
        out[:, item_ids] = s  # items never in training keep the lowest score
        return out

    return ModelRun(
        "funnelrec candidates",
        fit_s,
        {"train": score, "+val": score},
        note=f"config {FUNNELREC_CONFIGS[data.name]} {' '.join(FUNNELREC_OVERRIDES)}; "
        f"fit {fit_cpu:.1f} s CPU",
    )


def load_item_embeddings_of(art: Path) -> tuple[torch.Tensor, np.ndarray]:
    from funnelrec.candidates import load_item_embeddings

    emb, ids = load_item_embeddings(art)
    return emb, ids.numpy()


# The whole funnel, fitted by the product (`funnelrec.ranking.sequence_fit`, the code of
# `funnelrec train funnel`): the deep candidate model, co-watch and popularity nominate,
# the ranking network orders; its pages are staged at each user's last training moments
# with every source fitted on the training watches before them (docs/evaluation.md).
# Scored at example age 0, as served, through the funnel loaded back from its artifact.
FUNNEL_FIT: dict[str, Any] = {}  # SequenceFitConfig fields set on the command line
FUNNEL_OVERRIDES: list[str] = []


def _print_epoch(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda r: print(
        f"{name}: funnel epoch {r['epoch']}: loss {r['loss']:.4f} valid "
        f"HR@10 {r['valid hr@10']:.4f} NDCG@10 {r['valid ndcg@10']:.4f} "
        f"pool {r['valid pool_hit']:.3f} ({r['seconds']:.1f} s)",
        flush=True,
    )


def funnel(data: Split) -> ModelRun:
    from funnelrec.candidates import load_training_config
    from funnelrec.config import load_config
    from funnelrec.ranking.sequence import Requests, SequenceFunnelConfig
    from funnelrec.ranking.sequence_fit import SequenceFitConfig, fit_sequence_funnel

    cfg = load_config(SequenceFunnelConfig, None, [f"seed={TRAIN_SEED}", *FUNNEL_OVERRIDES])
    fit_cfg = SequenceFitConfig(**FUNNEL_FIT)
    deep = load_training_config(
        REPO / "configs" / FUNNELREC_CONFIGS[data.name],
        [f"train.seed={TRAIN_SEED}", *FUNNELREC_OVERRIDES],
    )
    art = WORK / f"{data.name}-funnel-{os.getpid()}"
    atexit.register(shutil.rmtree, art, ignore_errors=True)
    started, cpu = time.perf_counter(), time.process_time()
    f = fit_sequence_funnel(
        data, art, funnel=cfg, deep=deep, fit=fit_cfg,
        feature_overrides=FUNNELREC_FEATURE_OVERRIDES, force=True, progress=PROGRESS,
        on_epoch=_print_epoch(data.name),
    )  # fmt: skip
    fit_s, fit_cpu = time.perf_counter() - started, time.process_time() - cpu

    def score(u: np.ndarray, h: Jagged) -> np.ndarray:
        since = None
        if not data.synthetic_timestamps:
            rows = np.searchsorted(data.users, u)
            since = (data.target_ts[rows] - data.valid_ts[rows]).astype(float)
        ids, _ = f.recommend(Requests(u, h, since), max(KS))
        out = np.full((u.size, data.num_items + 1), -1e30, dtype=np.float32)
        r = np.repeat(np.arange(u.size), ids.shape[1])
        ok = ids.ravel() > 0
        # the served order as scores: K - place, above every item not served
        out[r[ok], ids.ravel()[ok]] = (ids.shape[1] - np.tile(np.arange(ids.shape[1]), u.size))[ok]
        return out

    d = f.describe()
    return ModelRun(
        "funnelrec funnel",
        fit_s,
        {"+val": score},
        note=f"deep model {FUNNELREC_CONFIGS[data.name]}; sources "
        f"deep {cfg.deep_k} + co-watch {cfg.cowatch_k} + popular {cfg.popular_k}; pages "
        f"{d['pages']} of {d['requests']} moments; ranker best epoch {d['best_epoch']} of "
        f"{d['epochs']}; {fit_cfg}; fit {fit_cpu:.1f} s CPU",
        extra={"funnel": {k: v for k, v in d.items() if k != "history"},
               "funnel_epochs": d["history"]},
    )  # fmt: skip


# SASRec with full cross-entropy (benchmarks/sasrec.py): the sequential peer, trained here
# on the same split, machine and evaluator. SASREC_MAX_SECONDS bounds its training (it
# then keeps its best epoch so far and says it stopped on time); SASREC_OVERRIDES are
# key=value settings of its SASRecConfig.
SASREC_MAX_SECONDS: float | None = None
SASREC_OVERRIDES: list[str] = []


def sasrec(data: Split) -> ModelRun:
    from sasrec import SASRecConfig, fit_sasrec

    from funnelrec.config import load_config

    va = data.history["+val"]
    valid_target = va.values[va.offsets[1:] - 1]
    run = fit_sasrec(
        data.history["train"],
        data.num_items,
        data.history["train"],
        valid_target,
        load_config(
            SASRecConfig,
            None,
            [f"max_seconds={SASREC_MAX_SECONDS}", f"seed={TRAIN_SEED}", *SASREC_OVERRIDES],
        ),
        on_epoch=lambda r: print(
            f"{data.name}: sasrec epoch {r['epoch']}: loss {r['loss']:.4f} valid NDCG@10 "
            f"{r['valid ndcg@10']:.4f} HR@10 {r['valid hr@10']:.4f} ({r['seconds']:.1f} s)",
            flush=True,
        ),
    )

    def score(u: np.ndarray, h: Jagged) -> np.ndarray:
        return run.score(h)

    stop = "stopped on time" if run.stopped_on_time else "stopped by validation"
    return ModelRun(
        "sasrec (full cross-entropy)",
        run.fit_seconds,
        {"train": score, "+val": score},
        note=f"best epoch {run.best_epoch} of {run.epochs_run}, {stop}",
        extra={"sasrec_epochs": run.history, "stopped_on_time": run.stopped_on_time},
    )


MODELS: dict[str, Callable[[Split], ModelRun]] = {
    "most-popular": most_popular,
    "recent-popular": recent_popular,
    "cowatch-last": cowatch_last,
    "cowatch-last5": cowatch_last5,
    "itemknn": itemknn,
    "bpr": bpr,
    "als": als,
    "funnelrec": funnelrec,
    "funnel": funnel,
    "sasrec": sasrec,
}


# ---------------------------------------------------------------------------------------
# Data sets


class MissingData(FunnelrecError):
    """A data set's files are not where they were looked for."""


def shared_data(relative: str) -> Path:
    """`relative` in the shared data folder, `../shared/data/` beside the checkout (its
    README says what is there and where it comes from)."""
    return REPO.parent / "shared" / "data" / relative


def ml100k_dataset(path: Path, console: Console) -> Path:
    if not (path / "manifest.json").exists():
        from funnelrec.data.fetch import fetch_movielens_100k

        console.print(f"ml-100k: fetching MovieLens-100k into {escape(str(path))}")
        try:
            fetch_movielens_100k(
                path, force=path.exists(), on_status=lambda m: console.print(escape(m))
            )
        except FunnelrecError as e:
            raise MissingData(
                f"{path}: MovieLens-100k could not be fetched ({e}). Get it: the GroupLens "
                f"ml-100k.zip or the recbole 1.2.1 wheel (see ../shared/data/README.md), "
                f"imported with `funnelrec data import movielens ml-100k.zip --out DIR`, "
                f"then pass --ml100k DIR"
            ) from e
    return path


def beauty_dataset(src: Path, path: Path, console: Console) -> Path:
    if not (path / "manifest.json").exists():
        if not src.exists():
            raise MissingData(
                f"{src} not found. Get it: the BERT4Rec authors' Amazon Beauty file "
                f"(`user item` a line, in time order per user) at {BEAUTY} of the shared "
                f"data folder `../shared/data/` beside the checkout (see its README.md), "
                f"or pass --beauty PATH"
            )
        from funnelrec.data.loaders import import_sequence

        console.print(f"beauty: importing {escape(str(src))} into {escape(str(path))}")
        import_sequence(src, path, force=path.exists())
    return path


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def run_model(data: Split, key: str, console: Console) -> dict[str, Any]:
    """Fit one model (at TRAIN_SEED) and evaluate it in every history setting it has."""
    # CPU seconds of the whole process (every thread) beside the wall time: on a shared
    # machine the wall time of one model swings with what else runs, its CPU time much less
    cpu = time.process_time()
    run = MODELS[key](data)
    fit_cpu = time.process_time() - cpu
    console.print(
        f"{data.name}: {key}: fitted in {run.fit_seconds:.1f} s ({fit_cpu:.1f} s CPU); "
        f"evaluating {', '.join(s for s in SETTINGS if s in run.scores)} on "
        f"{data.users.size:,} users"
    )
    res: dict[str, Any] = {
        "name": run.name,
        "fit_s": round(run.fit_seconds, 3),
        "fit_cpu_s": round(fit_cpu, 3),
    }
    if run.note:
        res["note"] = run.note
    res.update(run.extra)
    with progress_bar("users", enabled=PROGRESS, console=console, transient=True) as bar:
        for setting in SETTINGS:
            if setting in run.scores:
                t0 = time.perf_counter()
                res[setting] = evaluate(run.scores[setting], data, setting, bar, run.name)
                res[f"{setting} eval_s"] = round(time.perf_counter() - t0, 2)
    return res


def over_seeds(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One model's runs at several seeds: the mean of every figure, its standard
    deviation ('<setting> std'), min and max, and each seed's run under 'seeds'."""
    out = {k: v for k, v in runs[0].items() if k not in SETTINGS}
    out["fit_s"] = round(float(np.mean([r["fit_s"] for r in runs])), 3)
    if all("fit_cpu_s" in r for r in runs):
        out["fit_cpu_s"] = round(float(np.mean([r["fit_cpu_s"] for r in runs])), 3)
    for setting in SETTINGS:
        if setting not in runs[0]:
            continue
        keys = runs[0][setting].keys()
        vals = {k: np.array([r[setting][k] for r in runs]) for k in keys}
        out[setting] = {k: float(v.mean()) for k, v in vals.items()}
        out[f"{setting} std"] = {k: float(v.std(ddof=1)) for k, v in vals.items()}
        out[f"{setting} min"] = {k: float(v.min()) for k, v in vals.items()}
        out[f"{setting} max"] = {k: float(v.max()) for k, v in vals.items()}
    out["seeds"] = {str(s): r for s, r in zip(seeds, runs, strict=True)}
    return out


def _seed_list(text: str, flag: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: seeds are comma-separated integers, got {text!r}") from None
    if not seeds:
        raise SystemExit(f"{flag}: no seed given")
    return seeds


def run_dataset(
    data: Split,
    models: list[str],
    console: Console,
    seeds: list[int] | None = None,
    on_model: Callable[[dict[str, Any]], None] | None = None,
    seeds_of: dict[str, list[int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every model of `models` on `data` (per seed where it has one: `seeds_of[model]`
    where given, else `seeds`); `on_model` gets the results so far after each model (a
    long run keeps what it finished)."""
    global TRAIN_SEED
    seeds = seeds or [SEED]
    seeds_of = seeds_of or {}
    out: dict[str, dict[str, Any]] = {}
    for i, key in enumerate(models, 1):
        runs = []
        todo = seeds_of.get(key, seeds) if key in SEEDED else seeds[:1]
        try:
            for seed in todo:
                TRAIN_SEED = seed
                at = f" (seed {seed})" if len(todo) > 1 else ""
                console.print(f"{data.name}: model {i}/{len(models)}: {key}{at}: fitting")
                runs.append(run_model(data, key, console))
        except FunnelrecError as e:
            console.print(f"[yellow]{data.name}: {key} skipped: {escape(str(e))}")
            out[key] = {"skipped": str(e)}
            continue
        finally:
            TRAIN_SEED = SEED
        res = runs[0] if len(runs) == 1 else over_seeds(runs, todo)
        out[key] = res
        if on_model is not None:
            on_model(out)
        tr, va = res.get("train", {}), res.get("+val", {})
        spread = ""
        if "+val std" in res:
            std = res["+val std"]["hr@10"]
            spread = f" (+val over seeds {', '.join(map(str, todo))}: std {std:.4f})"
        console.print(
            f"{data.name}: {res['name']}: HR@10 {_fmt(tr.get('hr@10'))} / {_fmt(va.get('hr@10'))} "
            f"(train / +val){spread}, fit {res['fit_s']:.1f} s"
        )
    return out


def print_table(name: str, stats: dict[str, Any], results: dict[str, Any], c: Console) -> None:
    t = Table(
        title=f"{name}: {stats['users']:,} users, {stats['items']:,} items, "
        f"{stats['interactions']:,} interactions"
    )
    for col in (
        "model", "HR@10 train", "NDCG@10 train", "HR@50 train", "HR@10 +val",
        "NDCG@10 +val", "HR@50 +val", "fit s", "peer HR@10 train / +val",
    ):  # fmt: skip
        t.add_column(col, justify="left" if col == "model" else "right")
    peers = PEERS.get(name, {})
    for key, res in results.items():
        if "skipped" in res:
            t.add_row(key, *["-"] * 7, f"skipped: {res['skipped']}")
            continue
        tr, va = res.get("train", {}), res.get("+val", {})
        peer = peers.get(key, {})
        t.add_row(
            res["name"],
            _fmt(tr.get("hr@10")),
            _fmt(tr.get("ndcg@10")),
            _fmt(tr.get("hr@50")),
            _fmt(va.get("hr@10")),
            _fmt(va.get("ndcg@10")),
            _fmt(va.get("hr@50")),
            f"{res['fit_s']:.1f}",
            f"{_fmt(peer.get('train hr@10'))} / {_fmt(peer.get('+val hr@10'))}" if peer else "",
        )
    for key, peer in peers.items():
        if key not in results:
            t.add_row(
                f"[dim]peer: {key}",
                _fmt(peer.get("train hr@10")),
                _fmt(peer.get("train ndcg@10")),
                _fmt(peer.get("train hr@50")),
                _fmt(peer.get("+val hr@10")),
                _fmt(peer.get("+val ndcg@10")),
                "-",
                "",
                "",
            )
    c.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="ml-100k,beauty", help="comma-separated")
    p.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS)
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/funnelrec-bench"))
    p.add_argument("--ml100k", type=Path, default=None, help="dataset dir (default WORK/ml-100k)")
    p.add_argument(
        "--beauty",
        type=Path,
        default=None,
        help=f"Beauty's beauty.txt (default: {BEAUTY} of the nearest shared/data folder, "
        "../shared/data/ beside the checkout)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "real_data.json")
    p.add_argument(
        "--funnelrec-overrides", default="", help="space-separated key=value for its training"
    )
    p.add_argument(
        "--funnel-overrides", default="", help="space-separated key=value for the funnel"
    )
    p.add_argument(
        "--funnel-valid-n",
        type=int,
        default=1,
        help="the funnel's pages: training interactions per user held out from its "
        "sources, minus one",
    )
    p.add_argument(
        "--seeds",
        default="0",
        help="comma-separated training seeds: each model with a seed ("
        + ", ".join(SEEDED)
        + ") runs once per seed and reports the mean, standard deviation, min and max",
    )
    p.add_argument(
        "--seeds-of",
        action="append",
        default=[],
        metavar="MODEL=SEEDS",
        help="one model's own training seeds, e.g. sasrec=0 (a model that takes hours "
        "runs once while the others run per --seeds); repeatable",
    )
    p.add_argument(
        "--age-at-target",
        action="store_true",
        help="score funnelrec's candidate model at example age (t_max - target time), "
        "not 0 as served",
    )
    p.add_argument(
        "--sasrec-max-seconds",
        type=float,
        default=None,
        help="bound SASRec's training (it keeps its best epoch so far); default: none",
    )
    p.add_argument(
        "--sasrec-overrides",
        default="",
        help="space-separated key=value for SASRec (SASRecConfig in benchmarks/sasrec.py)",
    )
    refit_deep = p.add_mutually_exclusive_group()
    refit_deep.add_argument(
        "--funnel-refit-deep",
        dest="funnel_refit_deep",
        action="store_const",
        const=True,
        help="serve the funnel with a deep model retrained on all training interactions "
        "(default: where the pages' moments are more than a tenth of them)",
    )
    refit_deep.add_argument(
        "--no-funnel-refit-deep",
        dest="funnel_refit_deep",
        action="store_const",
        const=False,
        help="serve the funnel with the pages' deep model",
    )
    p.add_argument(
        "--no-funnel-refit",
        action="store_true",
        help="serve the funnel with the pages' co-watch and popularity, not ones refitted "
        "on all training interactions",
    )
    p.add_argument(
        "--feature-overrides", default="", help="space-separated key=value for its features"
    )
    p.add_argument(
        "--merge", action="store_true", help="keep results in --out of data sets and models not run"
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress of the feature build, training and evaluation (the lines per model stay)",
    )
    args = p.parse_args(argv)
    global WORK, PROGRESS, SASREC_MAX_SECONDS
    global AGE_AT_REQUEST
    WORK = args.work
    PROGRESS = not args.no_progress
    FUNNELREC_OVERRIDES.extend(args.funnelrec_overrides.split())
    FUNNELREC_FEATURE_OVERRIDES.extend(args.feature_overrides.split())
    FUNNEL_OVERRIDES.extend(args.funnel_overrides.split())
    FUNNEL_FIT.update(
        page_moments=args.funnel_valid_n + 1,
        refit=not args.no_funnel_refit,
        refit_deep=args.funnel_refit_deep,
    )
    SASREC_MAX_SECONDS = args.sasrec_max_seconds
    SASREC_OVERRIDES.extend(args.sasrec_overrides.split())
    AGE_AT_REQUEST = args.age_at_target
    seeds = _seed_list(args.seeds, "--seeds")
    seeds_of: dict[str, list[int]] = {}
    for item in args.seeds_of:
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in SEEDED:
            p.error(
                f"--seeds-of {item!r}: expected MODEL=SEEDS with MODEL one of {', '.join(SEEDED)}"
            )
        seeds_of[key.strip()] = _seed_list(value, f"--seeds-of {key.strip()}")
    console = Console(width=None if sys.stdout.isatty() else 150)
    torch.set_num_threads(2)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        console.print(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
        return 2
    console.print(f"[bold]Protocol:[/] {PROTOCOL}")

    report: dict[str, Any] = {
        "benchmark": "real_data",
        "protocol": PROTOCOL,
        "seed": SEED,
        "train_seeds": seeds,
        **({"train_seeds_of": seeds_of} if seeds_of else {}),
        "date": time.strftime("%Y-%m-%d"),
        "ks": list(KS),
        "funnelrec_version": __version__,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "torch_threads": torch.get_num_threads(),
        "peers_source": "the peers' published figures on this protocol (PEERS in "
        "benchmarks/real_data.py)",
        "datasets": {},
    }
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    not_run: list[str] = []
    for n, name in enumerate(names, 1):
        console.print(f"[bold]data set {n}/{len(names)}: {name}")
        try:
            if name == "ml-100k":
                path = ml100k_dataset(args.ml100k or args.work / "ml-100k", console)
            elif name == "beauty":
                path = beauty_dataset(
                    args.beauty or shared_data(BEAUTY), args.work / "beauty", console
                )
            else:
                raise FunnelrecError(f"unknown data set {name!r} (ml-100k, beauty)")
        except FunnelrecError as e:
            # loud: a data set missing changes what the results file holds
            console.print(f"[bold red]{name}: NOT RUN: {escape(str(e))}")
            report["datasets"][name] = {"skipped": str(e)}
            not_run.append(f"{name}: {e}")
            continue
        console.print(f"{name}: reading {escape(str(path))}")
        data = load_split(name, path)
        console.print(f"{name}: {data.stats}")
        partial = args.out.with_suffix(".partial.json")

        def keep(results: dict[str, Any], name: str = name, to: Path = partial) -> None:
            write_json_atomic(to, {**report, "datasets": {name: {"models": results}}})

        results = run_dataset(data, models, console, seeds, on_model=keep, seeds_of=seeds_of)
        report["datasets"][name] = {
            "path": str(path),
            "stats": data.stats,
            "models": results,
            "peers": PEERS.get(name, {}),
        }
        print_table(name, data.stats, results, console)
    if args.merge and args.out.exists():
        # keep the other data sets' results of an earlier run (one data set re-run)
        # and, within a data set, the models not re-run
        before = json.loads(args.out.read_text())
        earlier = before.get("datasets", {})
        # the date of the run that measured them (files of before dates had none)
        version = before.get("date", "an earlier run")
        for name, res in report["datasets"].items():
            old = earlier.get(name, {})
            if "models" in res and "models" in old:
                kept = {
                    k: {**m, "earlier_run": m.get("earlier_run", version)}
                    for k, m in old["models"].items()
                    if k not in res["models"]
                }
                res["models"] = {**kept, **res["models"]}
        carried = {
            name: {
                **ds,
                "models": {
                    k: {**m, "earlier_run": m.get("earlier_run", version)}
                    for k, m in ds.get("models", {}).items()
                },
            }
            for name, ds in earlier.items()
            if name not in report["datasets"]
        }
        report["datasets"] = {**carried, **report["datasets"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    console.print(f"wrote {escape(str(args.out))}")
    for line in not_run:
        console.print(f"[bold red]NOT RUN: {escape(line)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
