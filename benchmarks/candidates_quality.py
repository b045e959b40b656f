"""Retrieval quality of the candidate model on a simulated world, beside popularity and
the world's own ground truth.

    .venv/bin/python benchmarks/candidates_quality.py                      # small world
    .venv/bin/python benchmarks/candidates_quality.py --preset tiny --config \
        configs/candidates-tiny.toml
    .venv/bin/python benchmarks/candidates_quality.py epochs=2            # config overrides

Simulates the world and builds leave-last-out features under --work (reused when they
exist), trains with the config (default configs/candidates-small.toml) and scores the
test split's next watches (seen items excluded, never the target). The oracle is the
simulator's truth, `World.oracle_top_k(by="watch_rate")`: the items the user was likeliest
to watch in a session at that time. The target: the model's Recall@100 >= 0.8 x
the oracle's. The model is scored with serving's example age 0 ("model") and with the
example age of each target's time ("model_age_at_target"; leave-last-out targets are
spread over the window, the oracle knows their time). Targets outside the training item
vocabulary are left out of all (the model cannot retrieve them; their share is reported).

Prints a table and writes benchmarks/results/candidates_quality.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from funnelrec.candidates import fit_candidates, load_candidate_model, load_training_config
from funnelrec.candidates.metrics import ModelScorer, PopularityScorer, Scorer, evaluate_split
from funnelrec.config import load_config
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.loader import read_examples
from funnelrec.simulate import generate, preset_config
from funnelrec.simulate.truth import World

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "candidates_quality.json"
KS = (10, 50, 100)


def oracle_recall(feats: Features, data: Path, ks: tuple[int, ...]) -> dict[str, Any]:
    """Recall@K of the truth's top-K on the test split's in-vocabulary targets."""
    world = World.load(data)
    t = read_examples(feats, "candidates", "test", ["user_id", "ts", "label", "seen"])
    label = np.asarray(t.column("label").to_numpy(), dtype=np.int64)
    keep = label > 0
    values = feats.vocab("item").values
    target = values[label[keep] - 1]
    users = np.asarray(t.column("user_id").to_numpy(), dtype=np.int64)[keep]
    ts = np.asarray(t.column("ts").to_numpy(), dtype=np.int64)[keep]
    seen = [values[np.asarray(s, dtype=np.int64) - 1] for s, k in zip(
        t.column("seen").to_pylist(), keep, strict=True) if k]  # fmt: skip
    exclude = [s[s != tgt] for s, tgt in zip(seen, target, strict=True)]  # never the target
    top = world.oracle_top_k(users, ts, max(ks), exclude=exclude)
    return {f"recall@{k}": float((top[:, :k] == target[:, None]).any(1).mean()) for k in ks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/funnelrec-candidates-quality"))
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "candidates-small.toml")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--features",
        default="",
        help="space-separated feature overrides, key=value (e.g. 'history_n=20')",
    )
    p.add_argument("overrides", nargs="*", help="training config overrides, key=value")
    args = p.parse_args()
    console = Console()
    data = args.work / f"{args.preset}-{args.seed}"
    feature_overrides = args.features.split()
    tag = "-".join(o.replace("=", "") for o in feature_overrides)
    feat = args.work / f"{args.preset}-{args.seed}-feat{'-' + tag if tag else ''}"
    if not data.exists():
        generate(preset_config(args.preset), seed=args.seed, out=data)
    if not feat.exists():
        fcfg = load_config(FeaturesConfig, None, feature_overrides)
        build_features(data, feat, split="last", config=fcfg)
    feats = Features.open(feat)
    cfg = load_training_config(args.config, args.overrides)
    art = args.work / f"{args.preset}-{args.seed}-cand"
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    result = fit_candidates(feats, art, cfg, force=True)
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    model = load_candidate_model(art)
    window = feats.manifest["split"]["train_time_range"]
    scorers: dict[str, Scorer] = {
        "model": ModelScorer(model),  # example age 0, as at serving
        "model_age_at_target": ModelScorer(model, (int(window[0]), int(window[1]))),
        "popularity": PopularityScorer(feats.item_counts()),
    }
    report = evaluate_split(scorers, feats, "test", ks=KS, progress=True)
    # OOV targets are misses for the model and popularity: recall over in-vocabulary
    # targets (the oracle's denominator) is recall over all of them / the in-vocab share
    oov = report.oov_targets / max(report.queries, 1)
    in_vocab = 1.0 - oov
    rows: dict[str, dict[str, float]] = {
        name: {f"recall@{k}": report.metrics[name][f"recall@{k}"] / in_vocab for k in KS}
        for name in scorers
    }
    rows["oracle"] = oracle_recall(feats, data, KS)
    res = {
        "benchmark": "candidates_quality",
        "world": {"preset": args.preset, "seed": args.seed},
        "feature_overrides": feature_overrides,
        "config": json.loads(json.dumps(cfg, default=lambda o: o.__dict__)),
        "training": {
            "steps": result.steps,
            "epochs": result.epochs,
            "wall_s": train_s,
            "cpu_s": train_cpu,
            "best_valid": result.best_metric,
            "stopped_early": result.stopped_early,
        },
        "test_queries": report.queries,
        "oov_target_share": oov,
        "recall_in_vocabulary_targets": rows,
        "model_over_oracle_recall@100": rows["model"]["recall@100"] / rows["oracle"]["recall@100"],
        "model_age_at_target_over_oracle_recall@100": rows["model_age_at_target"]["recall@100"]
        / rows["oracle"]["recall@100"],
        "model_metrics_all_targets": report.metrics["model"],
        "popularity_metrics_all_targets": report.metrics["popularity"],
        "machine": {"cpu": platform.machine(), "torch": torch.__version__},
    }
    table = Table(title=f"next-watch retrieval, {args.preset} world, test split (seen excluded)")
    table.add_column("scorer")
    for k in KS:
        table.add_column(f"recall@{k}", justify="right")
    for name, row in rows.items():
        table.add_row(name, *(f"{row[f'recall@{k}']:.4f}" for k in KS))
    console.print(table)
    console.print(
        f"model / oracle recall@100 = {res['model_over_oracle_recall@100']:.2f} "
        f"(age at target: {res['model_age_at_target_over_oracle_recall@100']:.2f}; goal >= 0.8); "
        f"{result.steps:,} steps in {train_s:,.0f} s wall ({train_cpu:,.0f} s CPU); "
        f"OOV targets {100 * oov:.1f}%"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
