"""The paper's Table 1 on a simulated world: weighted per-user loss of the ranking towers,
the two ablations (no x^2 / sqrt(x); unit weights = a CTR model), clickbait in the top 10,
calibration, and a smoke run on the real KuaiRand sample.

    funnelrec simulate --preset medium --seed 0 --out runs/medium/data     # or funnelrec run
    funnelrec features build --data runs/medium/data --split time --out runs/medium/features
    .venv/bin/python benchmarks/ranking_table.py --features runs/medium/features --steps 300
    .venv/bin/python benchmarks/ranking_table.py --features FEAT --rows none,1024-512-256,ctr
    .venv/bin/python benchmarks/ranking_table.py --kuairand-only            # the smoke run only

Every row trains from configs/ranker.toml with its one change (`ROW_OVERRIDES`), the same
step budget (--steps batches of the config's 1024 impressions, one shuffled pass order) and
the same seed; nothing else differs. After training, the calibration factor is fitted on the
first --valid-impressions validation impressions (whole users; `train_ranker`), and the row
is scored on the first --test-impressions test impressions (whole users; `evaluate_ranker`):
weighted per-user loss, AUC, GAUC, the share of high-clickbait items (top decile of the
world's latent clickbait) among each user's top 10, and mean predicted / observed watch time
per impression, raw (exp(logit)) and calibrated (c * exp(logit)), overall and by decile. The
random order and the simulator's oracle (order by true expected watch time) are scored on
the same impressions.

Artifacts go to --work/<row>; --reuse keeps an artifact trained with the same settings and
only re-scores it. KuaiRand (--kuairand DIR, default ../shared/data/kuairand-sample; skipped
with a message where it is missing): imported, time-split features, the 1024->512->256 ranker
with watch-time weights and with unit weights, --kuairand-epochs epochs with the best epoch
by validation, scored on the whole test split. The sample keeps only rows with an explicit
like or hate, so nearly every page holds one impression: its pairs are few, a smoke figure.

Prints Markdown tables and writes benchmarks/results/ranking_table.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from funnelrec.data.loaders import import_kuairand
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features
from funnelrec.features.build import build_features
from funnelrec.ranking.model import tower_name
from funnelrec.ranking.training import (
    RankerTrainConfig,
    evaluate_ranker,
    load_ranker_train_config,
    train_ranker,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ranking_table.json"
CONFIGS = ROOT / "configs"
# Table 1's rows, then the two ablations of the deepest tower; the paper's figures (%).
ROWS: dict[str, float | None] = {
    "none": 41.6,
    "256": 36.9,
    "512": 36.7,
    "1024": 35.8,
    "512-256": 35.2,
    "1024-512": 34.7,
    "1024-512-256": 34.6,
    "no-powers": 34.8,  # "+0.2%"
    "ctr": 38.7,  # "+4.1%"
}
DEEPEST = "1024-512-256"
CALIBRATION_TARGET = 0.10  # |calibrated mean / observed mean - 1| <= 10%

console = Console()


# What each row changes in configs/ranker.toml (the deepest tower, watch-time weighted).
ROW_OVERRIDES: dict[str, list[str]] = {
    **{tower: [f"model.tower={tower}"] for tower in list(ROWS)[:7]},
    "no-powers": ["model.power_features=false"],
    "ctr": ["model.objective=ctr"],
}


def row_config(
    row: str, steps: int | None, seed: int, valid_impressions: int | None, extra: list[str]
) -> RankerTrainConfig:
    """configs/ranker.toml with the row's change, the benchmark's step budget and seed."""
    overrides = [*ROW_OVERRIDES[row], f"train.seed={seed}", *extra]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    if valid_impressions is not None:
        overrides.append(f"valid_impressions={valid_impressions}")
    return load_ranker_train_config(CONFIGS / "ranker.toml", overrides)


def trained_with(art: Path, cfg: RankerTrainConfig, feats: Features) -> bool:
    """Whether artifact `art` was trained on `feats` with exactly `cfg` (for --reuse)."""
    try:
        meta = json.loads((art / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(
        meta.get("data", {}).get("fingerprint") == feats.fingerprint
        and meta.get("config") == cfg.model.to_dict()
        and meta.get("train_config") == json.loads(json.dumps(asdict(cfg.train)))
        and meta.get("calibration", {}).get("impressions", 0) > 0
    )


def train_and_score(
    feats: Features,
    art: Path,
    cfg: RankerTrainConfig,
    *,
    reuse: bool,
    test_impressions: int | None,
) -> dict[str, Any]:
    """Train (unless reusable), score the test split; one JSON-able record."""
    t0 = time.perf_counter()
    if reuse and trained_with(art, cfg, feats):
        console.print(f"  reusing {art}")
    else:
        train_ranker(feats.path, art, cfg, force=True)
    wall = time.perf_counter() - t0
    meta = json.loads((art / "config.json").read_text())
    t1 = time.perf_counter()
    metrics = evaluate_ranker(art, feats.path, split="test", limit=test_impressions, show=True)
    eval_s = time.perf_counter() - t1
    m, training = metrics["model"], meta["training"]
    train_rows = feats.num_examples("ranking", "train")
    cb = metrics.get("clickbait", {})
    return {
        "tower": tower_name(cfg.model.tower),
        "objective": cfg.model.objective,
        "power_features": cfg.model.power_features,
        "steps": training["steps"],
        "examples": training["examples"],
        "epoch_fraction": training["examples"] / max(train_rows, 1),
        "train_examples_per_s": training["examples_per_s"],
        "train_wall_s": round(training["seconds"], 1),
        "wall_s_this_run": round(wall, 1),
        "eval_s": round(eval_s, 1),
        "valid_weighted_per_user_loss": training["valid"],
        "weighted_per_user_loss": m["weighted_per_user_loss"],
        "auc": m["auc"],
        "gauc": m["gauc"],
        "log_loss": m["log_loss"],
        "weighted_log_loss": m["weighted_log_loss"],
        "clickbait_top10_share": cb.get("model_top_k_share"),
        "calibration_factor": m["calibration"]["factor"],
        "calibration_fit": meta["calibration"],
        "ratio_raw": m["calibration_raw"]["ratio"],
        "ratio_calibrated": m["calibration"]["ratio"],
        "deciles_raw": [d["ratio"] for d in m["calibration_raw"]["deciles"]],
        "deciles_calibrated": [d["ratio"] for d in m["calibration"]["deciles"]],
        "calibration": m["calibration"],
        "calibration_raw": m["calibration_raw"],
        "impressions": m["impressions"],
        "clicks": m["clicks"],
        "pages": m["pages"],
        "pairs": m["pairs"],
        "random_weighted_per_user_loss": metrics["random"]["weighted_per_user_loss"],
        "oracle": metrics.get("oracle"),
        "clickbait": cb or None,
    }


def pct(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.{digits}f}%"


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    """Table 1 analogue as Markdown."""
    base = rows.get(DEEPEST, {}).get("weighted_per_user_loss")
    lines = [
        "| row | tower | weights | x^2, sqrt(x) | weighted per-user loss | vs 1024->512->256 "
        "| paper | AUC | GAUC | high-clickbait in top 10 | pred/obs raw | pred/obs calibrated "
        "| c | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        delta = (
            f"{100 * (r['weighted_per_user_loss'] - base):+.2f}"
            if base is not None and name != DEEPEST
            else ""
        )
        paper = ROWS.get(name)
        weights = "watch time" if r["objective"] == "watch_time" else "unit"
        lines.append(
            f"| {name} | {r['tower']} | {weights}"
            f" | {'yes' if r['power_features'] else 'no'} | {pct(r['weighted_per_user_loss'])} "
            f"| {delta} | {'' if paper is None else f'{paper:.1f}%'} | {r['auc']:.4f} "
            f"| {r['gauc']:.4f} | {pct(r['clickbait_top10_share'], 1)} | {r['ratio_raw']:.3f} "
            f"| {r['ratio_calibrated']:.3f} | {r['calibration_factor']:.3f} "
            f"| {r['train_wall_s']:.0f} |"
        )
    return "\n".join(lines)


def decile_table(rows: dict[str, dict[str, Any]]) -> str:
    """Calibration by decile of prediction (test), raw and calibrated, per row."""
    head = "| row | " + " | ".join(f"d{i}" for i in range(1, 11)) + " |"
    lines = [head, "|---|" + "---|" * 10]
    for name, r in rows.items():
        for kind in ("raw", "calibrated"):
            ratios = r[f"deciles_{kind}"]
            lines.append(f"| {name} {kind} | " + " | ".join(f"{x:.3g}" for x in ratios) + " |")
    return "\n".join(lines)


def goals(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The benchmark's four targets, checked on what was measured (None where a row is
    absent): the deepest tower beats no tower on weighted per-user loss; the CTR objective
    has a worse loss and more high-clickbait items in its top 10s; dropping x^2 and sqrt(x)
    is no better; calibrated watch-time predictions are within 10% of observed."""
    loss = {k: r["weighted_per_user_loss"] for k, r in rows.items()}
    out: dict[str, Any] = {}
    if "none" in loss and DEEPEST in loss:
        out["deeper_is_better"] = loss[DEEPEST] < loss["none"]
    if "ctr" in rows and DEEPEST in rows:
        out["ctr_worse_loss"] = loss["ctr"] > loss[DEEPEST]
        a, b = rows["ctr"]["clickbait_top10_share"], rows[DEEPEST]["clickbait_top10_share"]
        out["ctr_more_clickbait"] = None if a is None or b is None else a > b
    if "no-powers" in loss and DEEPEST in loss:
        out["no_powers_not_better"] = loss["no-powers"] >= loss[DEEPEST]
        out["no_powers_minus_deepest"] = loss["no-powers"] - loss[DEEPEST]
    wt = [k for k, r in rows.items() if r["objective"] == "watch_time"]
    if wt:
        out["calibrated_within_10pct"] = {
            k: abs(rows[k]["ratio_calibrated"] - 1) <= CALIBRATION_TARGET for k in wt
        }
        out["raw_within_10pct"] = {
            k: abs(rows[k]["ratio_raw"] - 1) <= CALIBRATION_TARGET for k in wt
        }
    return out


def kuairand(src: Path, work: Path, epochs: int, seed: int, reuse: bool) -> dict[str, Any]:
    """Import the KuaiRand sample, build time-split features, train and score two rankers."""
    data, feat = work / "kuairand-data", work / "kuairand-feat"
    if not (reuse and data.exists()):
        import_kuairand(src, data, force=True)
    if not (reuse and feat.exists()):
        build_features(data, feat, split="time", force=True)
    feats = Features.open(feat)
    out: dict[str, Any] = {
        "source": str(src),
        "impressions": {s: feats.num_examples("ranking", s) for s in ("train", "valid", "test")},
        "epochs": epochs,
        "rows": {},
    }
    for row in (DEEPEST, "ctr"):
        cfg = row_config(row, None, seed, None, [f"train.epochs={epochs}"])
        console.rule(f"KuaiRand: ranker {row}")
        out["rows"][row] = train_and_score(
            feats, work / f"kuairand-{row}", cfg, reuse=reuse, test_impressions=None
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--features", type=Path, help="time-split features of a simulated world")
    p.add_argument("--steps", type=int, default=300, help="training steps of every row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    p.add_argument("--valid-impressions", type=int, default=200_000)
    p.add_argument("--test-impressions", type=int, default=400_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/funnelrec-ranking-table"))
    p.add_argument("--reuse", action="store_true", help="keep artifacts trained alike")
    p.add_argument(
        "--kuairand", type=Path, default=ROOT.parent / "shared" / "data" / "kuairand-sample"
    )
    p.add_argument("--kuairand-epochs", type=int, default=5)
    p.add_argument("--no-kuairand", action="store_true")
    p.add_argument("--kuairand-only", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()

    res: dict[str, Any] = {"benchmark": "ranking_table"}
    if args.out.exists():  # keep the other section when only one is re-run
        res = json.loads(args.out.read_text())
    res["machine"] = {
        "cpu": platform.machine(),
        "cores": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if not args.kuairand_only:
        if args.features is None:
            raise SystemExit("--features FEAT is required (or --kuairand-only)")
        feats = Features.open(args.features)
        if feats.split != "time":
            raise SystemExit(f"{feats.path}: leave-last-out features; build with --split time")
        names = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in names if r not in ROWS]
        if unknown:
            raise SystemExit(f"unknown rows {unknown} (known: {', '.join(ROWS)})")
        rows: dict[str, dict[str, Any]] = {}
        for name in names:
            console.rule(f"ranker {name}")
            cfg = row_config(name, args.steps, args.seed, args.valid_impressions, [])
            rows[name] = train_and_score(
                feats,
                args.work / name,
                cfg,
                reuse=args.reuse,
                test_impressions=args.test_impressions,
            )
            r = rows[name]
            console.print(
                f"  {name}: loss {pct(r['weighted_per_user_loss'])}, AUC {r['auc']:.4f}, "
                f"clickbait top 10 {pct(r['clickbait_top10_share'], 1)}, pred/obs raw "
                f"{r['ratio_raw']:.3f} calibrated {r['ratio_calibrated']:.3f}, "
                f"train {r['train_wall_s']:.0f} s ({r['train_examples_per_s']:,.0f} ex/s), "
                f"eval {r['eval_s']:.0f} s"
            )
        first = next(iter(rows.values()))
        res["world"] = {
            "features": str(feats.path),
            "data": feats.manifest["data"],
            "train_impressions": feats.num_examples("ranking", "train"),
            "test_impressions_in_split": feats.num_examples("ranking", "test"),
        }
        res["protocol"] = {
            "steps": args.steps,
            "batch_size": 1024,
            "seed": args.seed,
            "epoch_fraction": first["epoch_fraction"],
            "valid_impressions": args.valid_impressions,
            "test_impressions": first["impressions"],
            "test_pages": first["pages"],
            "test_pairs": first["pairs"],
            "clickbait": (first["clickbait"] or {}).get("definition"),
        }
        res["reference"] = {
            "random_weighted_per_user_loss": first["random_weighted_per_user_loss"],
            "oracle": first["oracle"],
            "shown_clickbait_share": (first["clickbait"] or {}).get("shown_share"),
            "oracle_clickbait_top10_share": (first["clickbait"] or {}).get("oracle_top_k_share"),
        }
        res["rows"] = rows
        res["goals"] = goals(rows)
    if not args.no_kuairand:
        if (args.kuairand / "kuairand_sample.tsv").exists():
            res["kuairand"] = kuairand(
                args.kuairand / "kuairand_sample.tsv",
                args.work,
                args.kuairand_epochs,
                args.seed,
                args.reuse,
            )
        else:
            console.print(f"[yellow]skipping KuaiRand:[/] {args.kuairand} is missing")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    if "rows" in res:
        ref = res["reference"]
        oracle = ref["oracle"] or {}
        console.print(
            f"\nTable 1 analogue: {res['protocol']['steps']} steps x 1024 "
            f"({100 * res['protocol']['epoch_fraction']:.2f}% of an epoch), seed "
            f"{res['protocol']['seed']}, test: {res['protocol']['test_impressions']:,} "
            f"impressions, {res['protocol']['test_pairs']:,} pairs. Random order "
            f"{pct(ref['random_weighted_per_user_loss'])}, oracle "
            f"{pct(oracle.get('weighted_per_user_loss'))}; high-clickbait share of all shown "
            f"{pct(ref['shown_clickbait_share'], 1)}, oracle's top 10 "
            f"{pct(ref['oracle_clickbait_top10_share'], 1)}.\n"
        )
        print(markdown_table(res["rows"]))
        print("\nCalibration, predicted / observed by decile of prediction (test):\n")
        print(decile_table(res["rows"]))
        print("\ngoals:", json.dumps(res["goals"]))
    if "kuairand" in res:
        kr = res["kuairand"]
        print(f"\nKuaiRand sample ({kr['impressions']}, {kr['epochs']} epochs):\n")
        print("| ranker | weighted per-user loss | random | AUC | GAUC | pairs | pred/obs raw "
              "| pred/obs calibrated |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for name, r in kr["rows"].items():
            print(
                f"| {name} ({r['objective']}) | {pct(r['weighted_per_user_loss'])} "
                f"| {pct(r['random_weighted_per_user_loss'])} | {r['auc']:.4f} "
                f"| {r['gauc']:.4f} | {r['pairs']:,} | {r['ratio_raw']:.3f} "
                f"| {r['ratio_calibrated']:.3f} |"
            )
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except FunnelrecError as e:
        raise SystemExit(f"error: {e}") from None
