"""`funnelrec experiment example-age` (the paper's Fig. 3, Covington et al. 2016, section
3.3): does the example-age input let the model learn how an item's popularity changes with
its age?

Two candidate models differ only in the example-age input. For a random sample of
held-out requests of the validation period (the days right after the training window, so
that items uploaded just before its end are still fresh), the model's softmax over the
item vocabulary (example age 0, as at serving) is summed by the age of each item at the
request's time, in days since upload: the model's predicted share of recommendations by
item age. Beside it, the empirical share: every watch of the validation period by the
watched item's age at that time (renormalised over the items a model trained on the window
can know, i.e. those in its vocabulary; brand-new uploads after training are out of reach
of both and reported).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from funnelrec.candidates import load_candidate_model
from funnelrec.data.dataset import Dataset
from funnelrec.experiments.common import (
    ArmSpec,
    candidate_arm,
    cell,
    ci_text,
    convergence_note,
    seeds_note,
    time_features,
    train_arms,
)
from funnelrec.experiments.evaluation import (
    ExampleSample,
    Interval,
    bootstrap_draws,
    mean_interval,
    paired_interval,
    sample_batches,
)
from funnelrec.experiments.harness import Harness, Timer
from funnelrec.experiments.verdict import Check, checks_table, verdict
from funnelrec.features import Features

NAME = "example-age"
DAY = 86_400
FRESH_DAYS = 3  # "fresh": uploaded less than this many days before the request
ARMS = {"with example age": "use_example_age=true", "without": "use_example_age=false"}


def _upload_by_vocab(h: Harness, feats: Features) -> np.ndarray:
    """[N] upload time of vocabulary items 1..N (NaN: unknown)."""
    t = Dataset.open(h.data()).table("items", ["item_id", "upload_ts"])
    ids = np.asarray(t.column("item_id").to_numpy(), dtype=np.int64)
    up = np.full(int(ids.max()) + 1, np.nan)
    up[ids] = np.asarray(t.column("upload_ts").to_numpy(zero_copy_only=False), dtype=np.float64)
    return up[np.asarray(feats.vocab("item").values, dtype=np.int64)]


def _buckets(age_s: np.ndarray, window_start_age: np.ndarray, n_days: int) -> np.ndarray:
    """Bucket of each age: day 0..n_days-1 for items uploaded in the window, n_days for
    items uploaded before it (or unknown), n_days + 1 for not yet uploaded."""
    days = np.floor(age_s / DAY)
    out = np.where(age_s > window_start_age, n_days, np.clip(days, 0, n_days - 1))
    out = np.where(np.isnan(age_s), n_days, out)
    return np.where(age_s < 0, n_days + 1, out).astype(np.int64)


def predicted_shares(
    art: str, feats: Features, sample: ExampleSample, upload: np.ndarray, t0: int, n_days: int
) -> np.ndarray:
    """[n, n_days + 2]: each sampled request's softmax mass per age bucket."""
    model = load_candidate_model(art)
    parts: list[np.ndarray] = []
    with torch.no_grad():
        items = model.item_embeddings()[1:]
        for batch, _, _ in sample_batches(feats, sample):
            p = torch.softmax(model(batch) @ items.T, dim=1).double()  # [b, N]
            ts = batch.ts.numpy().astype(np.float64)
            age = ts[:, None] - upload[None, :]
            b = torch.from_numpy(_buckets(age, (ts - t0)[:, None], n_days))
            shares = torch.zeros(len(batch), n_days + 2, dtype=torch.float64)
            parts.append(shares.scatter_add_(1, b, p).numpy())
    return np.concatenate(parts) if parts else np.zeros((0, n_days + 2))


def empirical_shares(
    h: Harness, feats: Features, upload: np.ndarray, t0: int, n_days: int
) -> dict[str, Any]:
    """Share of the validation period's watches per age bucket, over watches of vocabulary
    items (and the share of watches the vocabulary cannot hold)."""
    t1, t2 = int(feats.manifest["split"]["t1"]), int(feats.manifest["split"]["t2"])
    w = Dataset.open(h.data()).table("watches", ["item_id", "ts"])
    item = np.asarray(w.column("item_id").to_numpy(), dtype=np.int64)
    ts = np.asarray(w.column("ts").to_numpy(), dtype=np.int64)
    keep = (ts >= t1) & (ts < t2)
    item, ts = item[keep], ts[keep]
    values = np.asarray(feats.vocab("item").values, dtype=np.int64)
    vocab_of = np.zeros(max(int(values.max()), int(item.max())) + 1, dtype=np.int64)
    vocab_of[values] = np.arange(1, values.size + 1)
    v = vocab_of[item]
    in_vocab = v > 0
    age = ts[in_vocab] - upload[v[in_vocab] - 1]
    b = _buckets(age.astype(np.float64), (ts[in_vocab] - t0).astype(np.float64), n_days)
    shares = np.bincount(b, minlength=n_days + 2) / max(int(in_vocab.sum()), 1)
    return {"shares": shares.tolist(), "oov_share": float(1.0 - in_vocab.mean())}


def run(h: Harness) -> dict[str, Any]:
    timer = Timer()
    feats = time_features(h)
    sample = ExampleSample.draw(feats, "valid", h.budget.eval_examples, seed=0)
    upload = _upload_by_vocab(h, feats)
    t0 = int(feats.manifest["split"]["train_time_range"][0])
    t_last = int(Dataset.open(h.data()).manifest.time_range.get("max_ts") or t0 + DAY)
    n_days = max(1, int(np.ceil((t_last - t0) / DAY)))
    empirical = h.cached(
        "age-empirical",
        {"features": feats.path.name, "period": "valid", "t0": t0, "n_days": n_days},
        lambda: empirical_shares(h, feats, upload, t0, n_days),
    )
    train_arms(h, [ArmSpec(feats, [flag], seed) for flag in ARMS.values() for seed in h.seeds])
    arms = {
        label: [_arm(h, feats, flag, seed, sample, upload, t0, n_days) for seed in h.seeds]
        for label, flag in ARMS.items()
    }
    doc = _document(h, arms, empirical, n_days, len(sample.positions))
    h.finish(NAME, doc, timer)
    return doc


def _arm(
    h: Harness,
    feats: Features,
    flag: str,
    seed: int,
    sample: ExampleSample,
    upload: np.ndarray,
    t0: int,
    n_days: int,
) -> dict[str, Any]:
    """One model, with each request's predicted shares by item age (cached)."""
    arm = candidate_arm(h, feats, [flag], seed)
    shares = h.cached(
        "age-shares-per-request",
        {
            "model": arm["artifact"],
            "split": sample.split,
            "n": len(sample.positions),
            "n_days": n_days,
        },
        lambda: {
            "shares": predicted_shares(arm["artifact"], feats, sample, upload, t0, n_days).tolist()
        },
    )
    return {**arm, "shares": np.asarray(shares["shares"], dtype=np.float64)}


def _fresh(runs: list[dict[str, Any]]) -> np.ndarray:
    """[seeds, requests]: each request's predicted mass on items under FRESH_DAYS old."""
    return np.stack([r["shares"][:, :FRESH_DAYS].sum(1) for r in runs])


def _l1(shares: np.ndarray, emp: np.ndarray) -> np.ndarray:
    """L1 distance of shares [..., buckets] to the empirical shares."""
    return np.abs(shares - emp).sum(-1)


def l1_interval(
    a: list[dict[str, Any]], b: list[dict[str, Any]], emp: np.ndarray, seed: int = 0
) -> Interval:
    """The L1 distance to the empirical age shares of arm a minus arm b, with its paired
    bootstrap interval: a draw resamples requests and seeds as `paired_interval` does and
    takes each seed's mean shares over the drawn requests."""
    sa = np.stack([r["shares"] for r in a])  # [S, N, B]
    sb = np.stack([r["shares"] for r in b])
    s, n, _ = sa.shape
    mean = float(_l1(sa.mean(1), emp).mean() - _l1(sb.mean(1), emp).mean())
    out = []
    for weights, picks in bootstrap_draws(s, n, seed=seed):
        rows = np.arange(len(picks))[:, None]
        da = np.stack([_l1(weights @ sa[i] / n, emp) for i in range(s)], axis=1)  # [d, S]
        db = np.stack([_l1(weights @ sb[i] / n, emp) for i in range(s)], axis=1)
        out.append(da[rows, picks].mean(1) - db[rows, picks].mean(1))
    lo, hi = np.quantile(np.concatenate(out), [0.025, 0.975])
    return Interval(mean, float(lo), float(hi), s, n)


def _table(
    arms: dict[str, list[dict[str, Any]]], emp: np.ndarray, n_days: int
) -> tuple[list[list[str]], list[dict[str, Any]], dict[str, Any]]:
    """The table's rows, the figure's series and the summary of each arm."""
    days = list(range(n_days))
    series = [
        {"label": "empirical (validation-period watches)", "x": days, "y": emp[:n_days].tolist()}
    ]
    rows = []
    summary: dict[str, Any] = {}
    for label, runs in arms.items():
        shares = np.mean([r["shares"].mean(0) for r in runs], axis=0)
        series.append({"label": f"model, {label}", "x": days, "y": shares[:n_days].tolist()})
        fresh = mean_interval(_fresh(runs))
        l1 = float(np.mean([_l1(r["shares"].mean(0), emp) for r in runs]))
        mp = cell(runs, "map@100")
        rec = cell(runs, "recall@100")
        rows.append(
            [label, ci_text(fresh), f"{shares[n_days]:.4f}", f"{l1:.4f}", ci_text(mp), ci_text(rec)]
        )
        summary[label] = {
            "fresh_share": fresh.to_list(),
            "l1_to_empirical": l1,
            "map@100": mp.to_list(),
            "shares": shares.tolist(),
        }
    emp_fresh = float(emp[:FRESH_DAYS].sum())
    rows.append(["empirical", f"{emp_fresh:.4f}", f"{emp[n_days]:.4f}", "0", "", ""])
    return rows, series, summary


def _checks(arms: dict[str, list[dict[str, Any]]], emp: np.ndarray) -> list[Check]:
    """With example age, the model puts more of its mass on fresh items, and its age
    distribution is closer to the data's."""
    w, wo = arms["with example age"], arms["without"]
    return [
        Check(
            f"example age raises the share of items under {FRESH_DAYS} days old",
            "with - without",
            ">",
            paired_interval(_fresh(w), _fresh(wo)),
            f"share of softmax mass < {FRESH_DAYS} days",
        ),
        Check(
            "example age brings the age distribution closer to the data's",
            "with - without",
            "<",
            l1_interval(w, wo, emp),
            "L1 distance to the empirical shares",
        ),
    ]


def _document(
    h: Harness,
    arms: dict[str, list[dict[str, Any]]],
    empirical: dict[str, Any],
    n_days: int,
    n_requests: int,
) -> dict[str, Any]:
    emp = np.asarray(empirical["shares"])
    rows, series, summary = _table(arms, emp, n_days)
    checks = _checks(arms, emp)
    w, wo = summary["with example age"], summary["without"]
    text = (
        f"Share of recommendation mass on items uploaded < {FRESH_DAYS} days before the "
        f"request: {w['fresh_share'][0]:.3f} with example age, {wo['fresh_share'][0]:.3f} "
        f"without, {float(emp[:FRESH_DAYS].sum()):.3f} in the validation period's watches. "
        f"{100 * empirical['oov_share']:.1f}% of validation-period watches are of items no "
        "model trained on the window can know (uploaded after it or never watched in it)."
    )
    runs = [a for runs in arms.values() for a in runs]
    return {
        "title": "Example age (Fig. 3): predicted share of recommendations by item age",
        "claim": "Without the example-age feature the model predicts roughly the average "
        "popularity over the training window; with it (set to 0 at serving) the model "
        "captures the time-dependent popularity of fresh items.",
        "protocol": f"{h.options.preset} world, time split; {n_requests} requests "
        "of the validation period (right after the training window, where items uploaded "
        "at its end are still fresh) sampled at random; the model's softmax over all "
        "vocabulary items (example age 0) summed by the item's age in days at the request, "
        "per request; empirical: all validation-period watches by the watched item's age, "
        "over items in the vocabulary; the validation split also decides when training "
        "stops (by Recall@100, not by these shares); map@100 and recall@100 on the test "
        f"sample; {seeds_note(h)}; {convergence_note(h, runs)}.",
        "tables": [
            checks_table(checks),
            {
                "title": "age of what is recommended vs what is watched (mean over seeds [95% CI])",
                "columns": [
                    "",
                    f"share < {FRESH_DAYS} days old",
                    "share uploaded before the window",
                    "L1 to empirical",
                    "map@100",
                    "recall@100",
                ],
                "rows": rows,
            },
        ],
        "figures": [
            {
                "name": "example_age",
                "kind": "line",
                "title": "share of recommendations (model) and of watches (data) by item age",
                "xlabel": "days since upload at the request",
                "ylabel": "share",
                "series": series,
            }
        ],
        "verdict": verdict(checks, text),
        "results": {"n_days": n_days, "empirical": empirical, "summary": summary},
    }
