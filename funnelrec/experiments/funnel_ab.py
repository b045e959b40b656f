"""`funnelrec experiment funnel-ab`: a simulated A/B test of served slates.

The simulator's user model (`truth.World`) stands in for live users: every policy serves
a slate of k items to the same sample of users at the same moment (right after the data's
window, each user's state seeded from the data as in serving), and the truth scores each
slate: the exact expected watch time and click probability of every impression, and one
sampled response (`World.sample_response`) as an A/B test would observe it.

Policies:
    most popular              training watch counts (the same list for everyone)
    fresh & popular now       the serving source: recent counts, new uploads boosted
    candidate generation only the deep model's top k by dot product (ANN index)
    funnel, WLR ranker        `Recommender`: deep + fresh + co-watch candidates ranked by
                              the watch-time weighted logistic regression ranker
    funnel, CTR ranker        the same funnel and candidates, ranked by a CTR ranker
    oracle                    the truth's own top k by expected watch time (a ceiling)
Items the user already watched (the live store's history) are excluded everywhere.
Beside the online outcomes: each policy's offline metric, to show where they disagree.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from funnelrec.baselines import Popularity
from funnelrec.candidates.metrics import PopularityScorer
from funnelrec.data.dataset import Dataset
from funnelrec.errors import ArtifactError
from funnelrec.experiments.common import (
    ArmSpec,
    arm_jobs,
    candidate_arm,
    ci_text,
    heldout_sample,
    pm,
    seeds_note,
    time_features,
    yerr,
)
from funnelrec.experiments.evaluation import (
    Interval,
    example_ranks,
    mean_interval,
    mean_sd,
    paired_interval,
    summary,
)
from funnelrec.experiments.harness import Harness, Timer
from funnelrec.experiments.ranking_table import CTR, WLR_BEST, ranker_jobs
from funnelrec.experiments.verdict import Check, checks_table, verdict
from funnelrec.features import Features
from funnelrec.ranking.model import load_ranker, read_ranker_config
from funnelrec.serving.package import training_watches
from funnelrec.serving.recommender import Recommender, RecommendRequest
from funnelrec.serving.state import UserStateStore
from funnelrec.simulate.truth import World

NAME = "funnel-ab"
POLICIES = (
    "most popular",
    "fresh & popular now",
    "candidate generation only",
    "funnel, WLR ranker",
    "funnel, CTR ranker",
    "oracle (truth)",
)
FUNNELS = ("funnel, WLR ranker", "funnel, CTR ranker")


def replay(
    h: Harness,
    rec: Recommender,
    rec_ctr: Recommender,
    pop: Popularity,
    users: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """Serve every policy's slate to `users`; score the slates with the truth."""
    k = h.budget.ab_k
    world = World.load(h.data())
    slates = {p: np.zeros((len(users), k), dtype=np.int64) for p in POLICIES}
    ts = np.zeros(len(users), dtype=np.int64)
    shown: list[dict[int, int]] = []
    watched_all: list[np.ndarray] = []
    latency: dict[str, list[float]] = {p: [] for p in FUNNELS}
    with tempfile.TemporaryDirectory(prefix="funnelrec-ab-") as tmp:
        store = UserStateStore(Path(tmp) / "state.db")
        try:
            rec.seed_state(store)
            for row, user in enumerate(users.tolist()):
                ctx = store.context(user)
                hist = np.asarray(ctx.history, dtype=np.int64)
                watched = np.unique(hist)
                watched_all.append(watched)
                shown.append(dict(ctx.shown))
                for name, r in zip(FUNNELS, (rec, rec_ctr), strict=True):
                    resp = r.recommend(RecommendRequest(user_id=user, k=k), ctx)
                    served = [it.item_id for it in resp.items]
                    slates[name][row, : len(served)] = served
                    latency[name].append(resp.timings_ms["total"])
                    ts[row] = int(resp.info["request_ts"])
                ids, _ = pop.top_k(hist, k, exclude=watched)
                slates["most popular"][row, : len(ids)] = ids
                ids, _ = rec.fresh.top_k(hist, k, exclude=watched)
                slates["fresh & popular now"][row, : len(ids)] = ids
                batch = rec.features.candidate_batch(
                    [list(ctx.history)], [list(ctx.queries)], [rec.user_demographics(user)]
                )
                with torch.no_grad():
                    u = rec.candidate_model(batch).float().numpy()
                ids, _ = rec.index.search(u[0], k, exclude=watched)
                ids = ids[ids > 0]
                slates["candidate generation only"][row, : len(ids)] = ids
        finally:
            store.close()
    slates["oracle (truth)"] = world.oracle_top_k(
        users, ts, k, exclude=watched_all, by="expected_watch_time"
    )
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"policies": {}, "request_ms": latency}
    for policy, slate in slates.items():
        rows, cols = np.nonzero(slate > 0)
        items = slate[rows, cols]
        times = np.array([shown[r].get(int(i), 0) for r, i in zip(rows, items, strict=True)])
        u, t = users[rows], ts[rows]
        p_click = world.click_probability(u, items, t, times)
        e_watch = world.expected_watch_time(u, items, t, times)
        clicked, watch = world.sample_response(u, items, t, times, rng=rng)
        per_user = {
            "expected_watch_s": np.bincount(rows, e_watch, len(users)),
            "expected_ctr": np.bincount(rows, p_click, len(users)),
            "sampled_watch_s": np.bincount(rows, watch.astype(np.float64), len(users)),
            "sampled_ctr": np.bincount(rows, clicked.astype(np.float64), len(users)),
        }
        n = np.maximum(np.bincount(rows, minlength=len(users)), 1)
        res: dict[str, Any] = {"impressions": int(items.size), "per_user": {}}
        for key, total in per_user.items():
            values = total / n  # per impression, per user (users weigh equally)
            res[key] = float(values.mean())
            res["per_user"][key] = values.tolist()
        res["distinct_items"] = int(np.unique(items).size)
        out["policies"][policy] = res
    return out


def _logged_reference(h: Harness, t2: int) -> dict[str, float]:
    """The logging policy's observed CTR and watch time in the test period (reference)."""
    t = Dataset.open(h.data()).table("impressions", ["ts", "clicked", "watch_time_s"])
    keep = np.asarray(t.column("ts").to_numpy()) >= t2
    clicked = np.asarray(t.column("clicked").to_numpy(zero_copy_only=False), dtype=np.float64)
    watch = np.asarray(t.column("watch_time_s").to_numpy(zero_copy_only=False), dtype=np.float64)
    return {
        "ctr": float(clicked[keep].mean()) if keep.any() else float("nan"),
        "watch_s": float(np.nan_to_num(watch[keep]).mean()) if keep.any() else float("nan"),
        "impressions": int(keep.sum()),
    }


def run(h: Harness) -> dict[str, Any]:
    timer = Timer()
    feats = time_features(h)
    ds = Dataset.open(h.data())
    train = training_watches(ds, feats)
    pop = Popularity().fit(train, num_items=int(ds.manifest.row_counts["items"]))
    pop_offline = _popularity_offline(h, feats)
    users_all = np.unique(np.asarray(train.column("user_id").to_numpy(), dtype=np.int64))
    # the same users for every seed: outcomes are paired by user and seed
    users = np.sort(
        np.random.default_rng(0).choice(
            users_all, min(h.budget.ab_users, users_all.size), replace=False
        )
    )
    h.parallel(
        [
            *ranker_jobs(h, feats, [WLR_BEST[1], CTR[1]]),
            *arm_jobs(h, [ArmSpec(feats, (), seed) for seed in h.seeds]),
        ]
    )
    per_seed = [_seed_arm(h, feats, pop, pop_offline, users, seed) for seed in h.seeds]
    logged = _logged_reference(h, int(feats.manifest["split"]["t2"]))
    n_users = min(h.budget.ab_users, users_all.size)
    doc = _document(h, per_seed, pop_offline, logged, n_users)
    h.finish(NAME, doc, timer)
    return doc


def _popularity_offline(h: Harness, feats: Features) -> dict[str, Any]:
    """Most popular's offline metrics on the held-out sample (cached)."""
    sample = heldout_sample(h, feats)
    return h.cached(
        "ab-pop-offline",
        {"features": feats.path.name, "n": len(sample.positions)},
        lambda: summary(
            example_ranks({"p": PopularityScorer(feats.item_counts())}, feats, sample).ranks["p"]
        ),
    )


def _seed_arm(
    h: Harness,
    feats: Features,
    pop: Popularity,
    pop_offline: dict[str, Any],
    users: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """One seed's models (candidate model, WLR and CTR rankers), the replay of every
    policy to the users (cached), and each policy's offline metric."""
    cand = candidate_arm(h, feats, [], seed)
    wlr = h.ranker_run(feats, WLR_BEST[1], seed)
    ctr = h.ranker_run(feats, CTR[1], seed)
    result = h.cached(
        "ab-replay-paired-v2",  # v2: the CTR twin ranks with its own model
        {
            "cand": cand["artifact"],
            "wlr": wlr["artifact"],
            "ctr": ctr["artifact"],
            "users": len(users),
            "k": h.budget.ab_k,
            "seed": seed,
        },
        lambda: _replay_funnels(h, feats, cand, wlr, ctr, pop, users, seed),
    )
    offline = {
        "most popular": ("recall@10 (next watch)", pop_offline["recall@10"]),
        "fresh & popular now": ("", None),
        "candidate generation only": ("recall@10 (next watch)", cand["metrics"]["recall@10"]),
        "funnel, WLR ranker": (
            "weighted per-user loss",
            wlr["test"]["model"]["weighted_per_user_loss"],
        ),
        "funnel, CTR ranker": (
            "weighted per-user loss",
            ctr["test"]["model"]["weighted_per_user_loss"],
        ),
        "oracle (truth)": ("", None),
    }
    ranker_auc = {
        "funnel, WLR ranker": wlr["test"]["model"]["auc"],
        "funnel, CTR ranker": ctr["test"]["model"]["auc"],
    }
    return {"replay": result, "offline": offline, "ranker_auc": ranker_auc}


def _replay_funnels(
    h: Harness,
    feats: Features,
    cand: dict[str, Any],
    wlr: dict[str, Any],
    ctr: dict[str, Any],
    pop: Popularity,
    users: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """`replay` with the funnel packaged from `cand` and `wlr`, and its twin ranked by
    `ctr`."""
    art = h.funnel(feats, cand["artifact"], wlr["artifact"])
    rec = Recommender.load(art)
    spec = read_ranker_config(ctr["artifact"]).get("spec")
    if spec != read_ranker_config(wlr["artifact"]).get("spec"):
        raise ArtifactError(f"{ctr['artifact']}: its feature spec differs from the WLR's")
    rec_ctr = rec.with_ranker(load_ranker(ctr["artifact"]))
    return replay(h, rec, rec_ctr, pop, users, seed)


def _per_user(per_seed: list[dict[str, Any]], policy: str, key: str) -> np.ndarray:
    """[seeds, users]: each user's outcome `key` (per impression) under `policy`."""
    return np.array([s["replay"]["policies"][policy]["per_user"][key] for s in per_seed])


def _interval(per_seed: list[dict[str, Any]], policy: str, key: str) -> Interval:
    return mean_interval(_per_user(per_seed, policy, key))


def _table_rows(per_seed: list[dict[str, Any]], logged: dict[str, float]) -> list[list[str]]:
    """Each policy's offline metric beside its online outcomes, then the logging policy's
    observed ones."""
    first = per_seed[0]
    rows = []
    for p in POLICIES:
        metric, _value = first["offline"][p]
        vals = [s["offline"][p][1] for s in per_seed if s["offline"][p][1] is not None]
        aucs = [s["ranker_auc"][p] for s in per_seed if p in s["ranker_auc"]]
        rows.append(
            [
                p,
                metric,
                pm(*mean_sd(vals)) if vals else "",
                pm(*mean_sd(aucs)) if aucs else "",
                ci_text(_interval(per_seed, p, "expected_watch_s"), digits=1),
                ci_text(_interval(per_seed, p, "expected_ctr")),
                f"{_interval(per_seed, p, 'sampled_watch_s').mean:.1f}",
                f"{_interval(per_seed, p, 'sampled_ctr').mean:.4f}",
                f"{first['replay']['policies'][p]['distinct_items']:,}",
            ]
        )
    rows.append(["logging policy (observed, test period)", "", "", "", "", "",
                 f"{logged['watch_s']:.1f}", f"{logged['ctr']:.4f}", ""])  # fmt: skip
    return rows


def _disagreements(
    per_seed: list[dict[str, Any]], pop_offline: dict[str, Any], w: dict[str, float]
) -> list[str]:
    """Where an offline metric orders two policies differently from expected watch time
    (`w`, per impression)."""
    wlr_l = float(np.mean([s["offline"]["funnel, WLR ranker"][1] for s in per_seed]))
    ctr_l = float(np.mean([s["offline"]["funnel, CTR ranker"][1] for s in per_seed]))
    disagreements = []
    if (ctr_l < wlr_l) != (w["funnel, CTR ranker"] > w["funnel, WLR ranker"]):
        disagreements.append(
            "the rankers' offline loss and their online watch time disagree on which is better"
        )
    cand_r = float(np.mean([s["offline"]["candidate generation only"][1] for s in per_seed]))
    if (cand_r > pop_offline["recall@10"]) != (w["candidate generation only"] > w["most popular"]):
        disagreements.append(
            "next-watch recall ranks candidate generation and popularity differently from "
            "online watch time"
        )
    auc = {p: float(np.mean([s["ranker_auc"][p] for s in per_seed])) for p in FUNNELS}
    if (auc["funnel, CTR ranker"] > auc["funnel, WLR ranker"]) != (
        w["funnel, CTR ranker"] > w["funnel, WLR ranker"]
    ):
        better = "CTR" if auc["funnel, CTR ranker"] > auc["funnel, WLR ranker"] else "WLR"
        disagreements.append(
            f"click AUC prefers the {better} ranker (CTR {auc['funnel, CTR ranker']:.3f}, WLR "
            f"{auc['funnel, WLR ranker']:.3f}), expected watch time per impression the other"
        )
    return disagreements


def _checks(per_seed: list[dict[str, Any]]) -> list[Check]:
    """Ranking by predicted watch time beats ranking by CTR on watch time, and the ranker
    adds to candidate generation alone (per user and seed)."""
    key, metric = "expected_watch_s", "expected watch s per impression"

    def diff(a: str, b: str) -> Interval:
        return paired_interval(_per_user(per_seed, a, key), _per_user(per_seed, b, key))

    return [
        Check("ranking by predicted watch time beats ranking by CTR", "WLR funnel - CTR funnel",
              ">", diff("funnel, WLR ranker", "funnel, CTR ranker"), metric, digits=1,
              unit="s"),
        Check("the ranker adds to candidate generation", "WLR funnel - candidates alone", ">",
              diff("funnel, WLR ranker", "candidate generation only"), metric, digits=1,
              unit="s"),
    ]  # fmt: skip


def _figures(per_seed: list[dict[str, Any]], c: dict[str, float]) -> list[dict[str, Any]]:
    """Watch time and CTR by policy, and the funnels' request latency."""
    watch = [_interval(per_seed, p, "expected_watch_s") for p in POLICIES]
    return [
        {
            "name": "ab_watch_time",
            "kind": "bar",
            "title": "expected watch time per impression (truth; 95% CI over users and seeds)",
            "categories": list(POLICIES),
            "ylabel": "seconds per impression",
            "series": [{"label": "expected", "y": [iv.mean for iv in watch], "yerr": yerr(watch)}],
        },
        {
            "name": "ab_ctr",
            "kind": "bar",
            "title": "expected click-through rate (truth)",
            "categories": list(POLICIES),
            "ylabel": "CTR",
            "series": [{"label": "expected", "y": [c[p] for p in POLICIES]}],
        },
        {
            "name": "ab_latency",
            "kind": "hist",
            "title": "funnel request latency (Recommender.recommend, in process)",
            "xlabel": "milliseconds",
            "ylabel": "requests",
            "series": [
                {"label": k, "values": v} for k, v in per_seed[0]["replay"]["request_ms"].items()
            ],
        },
    ]


def _document(
    h: Harness,
    per_seed: list[dict[str, Any]],
    pop_offline: dict[str, Any],
    logged: dict[str, float],
    n_users: int,
) -> dict[str, Any]:
    w = {p: _interval(per_seed, p, "expected_watch_s").mean for p in POLICIES}
    c = {p: _interval(per_seed, p, "expected_ctr").mean for p in POLICIES}
    disagreements = _disagreements(per_seed, pop_offline, w)
    checks = _checks(per_seed)
    ctr_vs_wlr = c["funnel, CTR ranker"] / max(c["funnel, WLR ranker"], 1e-9) - 1
    text = (
        f"Expected watch time per impression: funnel with the WLR ranker "
        f"{w['funnel, WLR ranker']:.1f} s, with the CTR ranker {w['funnel, CTR ranker']:.1f} s "
        f"(the CTR ranker's click rate is {100 * ctr_vs_wlr:+.1f}% relative to WLR), "
        f"candidate generation alone {w['candidate generation only']:.1f} s, most popular "
        f"{w['most popular']:.1f} s, the truth's oracle {w['oracle (truth)']:.1f} s. "
        + (
            "Where offline and online disagree: " + "; ".join(disagreements) + "."
            if disagreements
            else "Offline metrics and simulated online outcomes agree on the orderings here."
        )
    )
    return {
        "title": "Funnel A/B: simulated online outcomes of served slates",
        "claim": "Ranking by predicted watch time (weighted logistic regression) beats ranking "
        "by click-through rate on watch time, and the final judge is an online test whose "
        "outcome offline metrics do not always predict.",
        "protocol": f"{h.options.preset} world; models trained on the time split's training "
        f"window (the default candidate model; rankers {WLR_BEST[0]} with watch-time weights "
        "and with unit weights, each trained to convergence), packaged with `funnelrec "
        f"package`; {n_users} users sampled at random (the same for every seed), each served "
        f"k = {h.budget.ab_k} items by every policy at the same time (just after the data's "
        "window), items they watched excluded; outcomes from the simulator's user model: "
        "exact expected watch time and click probability per impression (position effects "
        "are not modelled), and one sampled response; per-user means, users weighted "
        "equally; the logging policy row is its observed outcome on the test period's own "
        f"impressions (other users and times: a reference only); {seeds_note(h)}.",
        "tables": [
            checks_table(checks),
            {
                "title": "offline metric beside simulated online outcomes (per impression; "
                "expected outcomes: mean over users and seeds [95% CI])",
                "columns": [
                    "policy",
                    "offline metric",
                    "offline",
                    "offline click AUC",
                    "expected watch s",
                    "expected CTR",
                    "sampled watch s",
                    "sampled CTR",
                    "distinct items",
                ],
                "rows": _table_rows(per_seed, logged),
            },
        ],
        "figures": _figures(per_seed, c),
        "verdict": verdict(checks, text),
        "results": {
            "policies": {
                p: {
                    k: _interval(per_seed, p, k).to_list()
                    for k in ("expected_watch_s", "expected_ctr")
                }
                for p in POLICIES
            },
            "logged_policy": logged,
            "popularity_offline": pop_offline,
            "disagreements": disagreements,
        },
    }
