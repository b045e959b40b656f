"""`funnelrec train ranker` and `funnelrec evaluate ranker`: stage 2 of the funnel (SPEC 3).

    funnelrec train ranker --features FEAT --out ART [--config configs/ranker-1024-512-256.toml]
                           [--resume] [--force] [model.objective=ctr train.epochs=3 ...]
    funnelrec evaluate ranker ART --features FEAT [--split test] [--out ART/metrics.json]

Training reads the ranking examples of FEAT (issue 4), starts the output bias at the best
constant (`ranking.base_log_odds` over the training impressions), trains with the shared
loop (`train.train`: progress, checkpoints to ART.checkpoint.pt, --resume, determinism),
keeps the epoch with the lowest weighted per-user loss on the validation split, fits the
calibration factor on the validation split (`ranking.fit_calibration`), and writes
ART/config.json + ART/model.safetensors atomically.

Evaluation scores a split and writes metrics.json: the model's weighted per-user loss,
AUC, GAUC, log losses and calibration, raw and calibrated (`rank_metrics.ranking_metrics`),
a random order for reference, and, on simulated data (the features' dataset has truth/),
the oracle's order by true expected watch time and the share of high-clickbait items in
each user's top 10. A split without a single click has nothing to measure and is refused
with the reason (leave-last-out features: use `--split time`).

Both are plain functions (`train_ranker`, `evaluate_ranker`) with thin Typer wrappers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import typer
from rich.console import Console
from rich.table import Table

from funnelrec import distributed, rank_metrics
from funnelrec.batch import RankingBatch
from funnelrec.config import from_dict, read_toml
from funnelrec.dataset import AtomicDirectory, write_json_atomic
from funnelrec.distributed import Distributed, local_batch_size
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.examples import Features
from funnelrec.loader import ranking_loader, read_examples
from funnelrec.progress import progress_bar
from funnelrec.ranking import (
    TOWER_PRESETS,
    Calibration,
    RankingConfig,
    RankingFeatureSpec,
    RankingModel,
    RankingPredictions,
    base_log_odds,
    fit_calibration,
    load_ranker,
    predict,
    read_ranker_config,
    save_ranker_artifact,
    tower_name,
)
from funnelrec.train import TrainConfig, TrainResult, loader_epochs, seed_everything, train
from funnelrec.truth import TRUTH_DIR, World

console = Console()

METRICS_FORMAT_VERSION = 1
# "High clickbait" for the top-10 share: the world's top decile of latent clickbait.
CLICKBAIT_QUANTILE = 0.9
RANDOM_DRAWS = 10


@dataclass(frozen=True)
class RankerTrainConfig:
    """Everything `funnelrec train ranker` reads from --config and key=value overrides.

    model:           the network and objective ([model] section; see RankingConfig)
    train:           the shared loop's settings ([train] section; see TrainConfig). The
                     ranker's defaults differ from TrainConfig's in one place: grad_clip = 0,
                     because with positives weighted by watch time in seconds every batch's
                     gradient norm is far above any fixed threshold, and clipping would
                     re-weight batches by how much watch time they happen to hold.
    eval_batch_size: impressions per batch when scoring the validation split
    validate:        score the validation split after every epoch (weighted per-user loss)
                     and keep the best epoch (train.patience > 0 also stops early)
    init_bias:       start the output bias at the best constant logit of the training data
    calibrate:       after training, fit the factor c on the validation split so that mean
                     c * exp(logit) * unit = mean observed watch time per impression (one
                     pass over the split, also with validate = false); False = c = 1
    valid_impressions: score only the first ~N validation impressions, whole users in the
                     split's user order, for the best epoch and the calibration; None = all
                     (a medium world's validation split holds millions)
    """

    model: RankingConfig = field(default_factory=RankingConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(grad_clip=0.0, batch_size=1024, epochs=2)
    )
    eval_batch_size: int = 8192
    validate: bool = True
    init_bias: bool = True
    calibrate: bool = True
    valid_impressions: int | None = None

    def __post_init__(self) -> None:
        if self.valid_impressions is not None and self.valid_impressions < 1:
            raise FunnelrecError(
                f"valid_impressions must be >= 1 (or none), got {self.valid_impressions}"
            )


def load_ranker_train_config(
    path: Path | str | None = None, overrides: Sequence[str] = ()
) -> RankerTrainConfig:
    """Defaults, then the TOML file, then `key=value` overrides (dotted: model.tower=512,256).

    Sections start from RankerTrainConfig's own defaults (not the section class's), so a
    [train] section that sets lr alone keeps grad_clip = 0. `model.tower=none` (or any
    name in ranking.TOWER_PRESETS, e.g. 1024-512-256) selects a preset.
    """
    values: dict[str, Any] = _as_tree(asdict(RankerTrainConfig()))
    if path is not None:
        _merge(values, read_toml(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise FunnelrecError(f"override '{item}' is not of the form key=value")
        if key.split(".")[-1] == "tower" and raw in TOWER_PRESETS:
            raw = ",".join(str(w) for w in TOWER_PRESETS[raw])
        node = values
        parts = key.split(".")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise FunnelrecError(f"config key '{k}' is not a section")
        node[parts[-1]] = raw
    return from_dict(RankerTrainConfig, values)


def _as_tree(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _as_tree(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> None:
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def checkpoint_path(out: Path) -> Path:
    """Where a training run into `out` checkpoints (beside it: the artifact is atomic)."""
    return out.with_name(out.name + ".checkpoint.pt")


def _features_meta(feats: Features) -> dict[str, Any]:
    rank_item = feats.vocab("rank_item")
    return {
        "data": {"fingerprint": feats.fingerprint, "features": str(feats.path)},
        "split": feats.split,
        "rank_item_vocab": len(rank_item),
    }


def _check_features(meta: Mapping[str, Any], feats: Features, art: Path) -> None:
    want = meta.get("data", {}).get("fingerprint")
    if want != feats.fingerprint:
        raise ArtifactError(
            f"{art} was trained on data with fingerprint {want}, {feats.path} was built from "
            f"{feats.fingerprint}"
        )
    spec = RankingFeatureSpec.from_dict(feats.ranking_spec)
    if meta.get("spec") != spec.to_dict():
        raise ArtifactError(f"{art}: its feature spec differs from that of {feats.path}")


def score_split(
    model: RankingModel,
    feats: Features,
    split: str,
    batch_size: int = 8192,
    show: bool = True,
    limit: int | None = None,
) -> RankingPredictions:
    """The model's logits for the impressions of a split, in shard order.

    limit: stop after about this many impressions, at a user boundary. Valid and test
    shards are sorted by user, so this is every page of the split's first users; a user
    larger than a whole batch past the limit may be cut (train shards are not sorted).
    """
    total = feats.num_examples("ranking", split)
    loader: Iterable[RankingBatch] = ranking_loader(feats, split, batch_size=batch_size)
    if limit is not None and limit < total:
        # One batch past the limit, so that the first user boundary after it is in hand.
        loader = _first_examples(loader, limit + batch_size)
        total = min(total, limit + batch_size)
    if not show:
        p = predict(model, loader)
    else:
        with progress_bar("examples", console=console, transient=True) as bar:
            task = bar.add_task(f"scoring {split}", total=total)
            p = predict(model, loader, progress=lambda n: bar.advance(task, n))
    if limit is None or len(p) <= limit:
        return p
    starts = np.flatnonzero(p.user_id[1:] != p.user_id[:-1]) + 1  # where a new user begins
    after = starts[starts >= limit]
    cut = int(after[0]) if len(after) else (int(starts[-1]) if len(starts) else len(p))
    return RankingPredictions(
        **{k: getattr(p, k)[:cut] for k in RankingPredictions.__dataclass_fields__}
    )


def _first_examples(batches: Iterable[RankingBatch], n: int) -> Iterator[RankingBatch]:
    """Batches until at least `n` examples have been yielded."""
    seen = 0
    for batch in batches:
        if seen >= n:
            return
        yield batch
        seen += len(batch)


def train_ranker(
    features: Path | str,
    out: Path | str,
    config: RankerTrainConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    dist: Distributed | None = None,
) -> dict[str, Any]:
    """Train a ranker on FEAT's ranking examples and write the artifact `out`.

    Returns the summary stored in ART/config.json under "training" (steps, examples/s,
    best validation weighted per-user loss, ...), on every rank.

    dist: this process's place in a data-parallel run (`distributed.setup`, under
    torchrun): each rank reads its share of the training row groups, `batch_size` stays
    the batch of one step over all ranks, and rank 0 alone scores the validation split,
    fits the calibration and writes the artifact. None: one process.
    """
    cfg = config or RankerTrainConfig()
    dist = dist or Distributed()
    out = Path(out)
    feats = Features.open(features)
    spec = RankingFeatureSpec.from_dict(feats.ranking_spec)
    if out.exists() and not force:  # every rank fails early, not rank 0 alone
        raise FunnelrecError(f"{out} already exists (use --force to overwrite)")
    # rank 0 alone builds (and on failure removes) the artifact
    target = AtomicDirectory(out, force=force) if dist.is_main else None
    summary: dict[str, Any] | None = None
    try:
        seed_everything(cfg.train.seed)
        model = RankingModel(spec, cfg.model)
        if cfg.init_bias:
            t = read_examples(feats, "ranking", "train", ["label", "watch_time"])
            bias = base_log_odds(
                torch.from_numpy(np.array(t.column("label").to_numpy(), dtype=np.float32)),
                torch.from_numpy(np.array(t.column("watch_time").to_numpy(), dtype=np.float32)),
                cfg.model,
            )
            model.set_output_bias(bias)
        loader = ranking_loader(
            feats,
            "train",
            batch_size=local_batch_size(cfg.train.batch_size, dist),
            shuffle=True,
            seed=cfg.train.seed,
            num_workers=cfg.train.num_workers,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        has_valid = cfg.validate and feats.num_examples("ranking", "valid") > 0

        # Early stopping / best epoch by the paper's metric on the validation split; a
        # split without any page holding both a click and a non-click cannot give it, and
        # then the held-out training objective stands in.
        metric_name = "weighted_per_user_loss"
        if has_valid:
            v = read_examples(
                feats,
                "ranking",
                "valid",
                ["label", "watch_time", "user_id", "request_id"],
                limit=cfg.valid_impressions,  # the part validation scores (about)
            )
            cols = [
                v.column(c).to_numpy() for c in ("label", "watch_time", "user_id", "request_id")
            ]
            if math.isnan(rank_metrics.weighted_per_user_loss(np.zeros(v.num_rows), *cols)):
                metric_name = "weighted_log_loss"

        def validation_loss(p: RankingPredictions) -> float:
            if metric_name == "weighted_per_user_loss":
                loss = rank_metrics.weighted_per_user_loss(
                    p.logit, p.label, p.watch_time, p.user_id, p.request_id
                )
            else:
                loss = rank_metrics.weighted_logistic_loss(
                    p.logit,
                    p.label,
                    p.watch_time,
                    watch_time_unit=cfg.model.watch_time_unit,
                    clicks_as_negatives=cfg.model.clicks_as_negatives,
                )
            return loss

        def score_valid(m: RankingModel) -> RankingPredictions:
            return score_split(
                m,
                feats,
                "valid",
                cfg.eval_batch_size,
                show=progress and dist.is_main,
                limit=cfg.valid_impressions,
            )

        def validation(m: torch.nn.Module) -> float:
            assert isinstance(m, RankingModel)
            # Data-parallel: rank 0 alone scores the split (the per-user metric needs whole
            # pages, and `valid_impressions` cuts at a user boundary of the whole split) and
            # the all-reduce hands its figure to the other ranks, which the loop requires to
            # agree; they wait in it meanwhile. The split is small next to training.
            value = -validation_loss(score_valid(m)) if dist.is_main else 0.0  # maximised
            return dist.all_reduce_sums([value])[0]

        meta = {
            "model": model.metadata(),
            "features": _features_meta(feats),
            "init_bias": cfg.init_bias,
            "validate": has_valid,
        }
        result: TrainResult = train(
            model,
            loader_epochs(loader),
            cfg.train,
            steps_per_epoch=len(loader.shards),
            checkpoint=checkpoint_path(out),
            resume=resume,
            evaluate=validation if has_valid else None,
            meta=meta,
            progress=progress,
            description=f"ranker {tower_name(cfg.model.tower)} {cfg.model.objective}",
            dist=dist,
        )
        if target is not None:  # rank 0 finishes alone (the replicas are equal)
            # One scoring of the validation split with the saved weights gives both the
            # summary's validation figure and the calibration.
            has_valid_rows = feats.num_examples("ranking", "valid") > 0
            final = score_valid(model) if (has_valid or cfg.calibrate) and has_valid_rows else None
            if not cfg.calibrate:
                model.calibration = Calibration(note="not fitted: calibrate = false")
            elif final is None:
                model.calibration = Calibration(note="not fitted: no validation split")
            else:
                model.calibration = fit_calibration(
                    final.logit, final.watch_time, watch_time_unit=cfg.model.watch_time_unit
                )
            summary = {
                "steps": result.steps,
                "epochs": result.epochs,
                "examples": result.examples,
                "seconds": round(result.seconds, 3),
                "examples_per_s": round(result.examples_per_s, 1),
                "final_train_loss": result.loss,
                "best_step": result.best_step,
                "stopped_early": result.stopped_early,
                "validation_metric": metric_name if has_valid else None,
                "history": [[s, -m] for s, m in result.history],
                # of the saved weights (the best evaluated epoch's, or the last step's)
                "valid": validation_loss(final) if has_valid and final is not None else None,
                "calibration_factor": model.calibration.factor,
                "processes": result.world_size,
            }
            save_ranker_artifact(
                model,
                target.tmp,
                meta={
                    **_features_meta(feats),
                    "train_config": asdict(cfg.train),
                    "eval_batch_size": cfg.eval_batch_size,
                    "training": summary,
                },
            )
            target.commit()
    except BaseException:
        if target is not None:
            target.abort()
        raise
    if dist.is_main:
        checkpoint_path(out).unlink(missing_ok=True)
    # rank 0's summary for every rank; also the barrier: the others return once the
    # artifact is in place
    summary = dist.all_gather_objects(summary)[0]
    assert summary is not None
    return summary


def _truth_items(data: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(item_id [I], clickbait [I]) of a simulated dataset's truth, or None if not simulated."""
    file = data / TRUTH_DIR / "items.parquet"
    if not file.exists():
        return None
    t = pq.read_table(file, columns=["item_id", "clickbait"])
    return (
        np.asarray(t.column("item_id").to_numpy(), dtype=np.int64),
        np.asarray(t.column("clickbait").to_numpy(), dtype=np.float64),
    )


def _check_has_clicks(feats: Features, split: str) -> None:
    """Refuse a split without any click: every ranking metric would be undefined (NaN)."""
    if split not in ("train", "valid", "test"):
        raise FunnelrecError(f"unknown split '{split}' (train, valid or test)")
    rows = read_examples(feats, "ranking", split, ["label"])
    if rows.num_rows and np.asarray(rows.column("label").to_numpy()).max() > 0.5:
        return
    if not rows.num_rows:
        raise FunnelrecError(f"{feats.path}: the ranking {split} split has no impressions")
    if feats.split == "last":
        raise FunnelrecError(
            f"{feats.path}: the ranking {split} split has no clicked impression: with "
            "leave-last-out features it holds only the impressions after each user's held-out "
            "last watch, so none can be clicked; rebuild the features with `funnelrec features "
            "build --split time`"
        )
    raise FunnelrecError(
        f"{feats.path}: the ranking {split} split has no clicked impression, nothing to measure"
    )


def evaluate_ranker(
    art: Path | str,
    features: Path | str,
    *,
    split: str = "test",
    out: Path | str | None = None,
    data: Path | str | None = None,
    top_k: int = 10,
    seed: int = 0,
    show: bool = True,
    limit: int | None = None,
) -> dict[str, Any]:
    """Score a split with the ranker of `art` and write metrics.json (default ART/metrics.json).

    data: the dataset the features were built from (default: the path the features
    recorded); when it is simulated, the oracle and the clickbait shares are added.
    limit: score about this many impressions only: every page of the split's first users
    (`score_split`); None = the whole split.
    Returns what was written: {"model": {...}, "random": {...}, ["oracle": {...},]
    ["clickbait": {...},] "protocol": {...}}.
    """
    art = Path(art)
    feats = Features.open(features)
    _check_has_clicks(feats, split)
    meta = read_ranker_config(art)
    _check_features(meta, feats, art)
    model = load_ranker(art)
    cfg = model.config
    p = score_split(
        model, feats, split, int(meta.get("eval_batch_size", 8192)), show=show, limit=limit
    )
    args = (p.label, p.watch_time, p.user_id, p.request_id)
    result: dict[str, Any] = {
        "format_version": METRICS_FORMAT_VERSION,
        "model": rank_metrics.ranking_metrics(
            p.logit,
            *args,
            watch_time_unit=cfg.watch_time_unit,
            clicks_as_negatives=cfg.clicks_as_negatives,
            calibration_factor=model.calibration.factor,
        ),
    }
    # A random order's expected loss is 0.5; one draw on a small split is noisy, so the
    # reference is the mean of RANDOM_DRAWS seeded draws.
    rng = np.random.default_rng(seed)
    draws = [
        rank_metrics.weighted_per_user_loss(rng.random(len(p)), *args) for _ in range(RANDOM_DRAWS)
    ]
    result["random"] = {"weighted_per_user_loss": float(np.mean(draws)), "draws": RANDOM_DRAWS}

    data_path = Path(data) if data is not None else Path(feats.manifest["data"]["path"])
    truth = _truth_items(data_path) if data_path.exists() else None
    if truth is not None and len(p):
        rows = read_examples(feats, "ranking", split, ["item_id", "ts", "item_shown_before"])
        rows = rows.slice(0, len(p))  # the scored prefix (shard order, as the loader reads)
        item = np.asarray(rows.column("item_id").to_numpy(), dtype=np.int64)
        world = World.load(data_path)
        oracle = world.expected_watch_time(
            p.user_id,
            item,
            np.asarray(rows.column("ts").to_numpy(), dtype=np.int64),
            np.nan_to_num(np.asarray(rows.column("item_shown_before").to_numpy())),
        )
        result["oracle"] = {
            "weighted_per_user_loss": rank_metrics.weighted_per_user_loss(oracle, *args),
            "auc": rank_metrics.auc(oracle, p.label),
        }
        ids, clickbait = truth
        by_id = np.zeros(int(ids.max()) + 1)
        by_id[ids] = clickbait
        threshold = float(np.quantile(clickbait, CLICKBAIT_QUANTILE))
        high = by_id[item] >= threshold
        result["clickbait"] = {
            "definition": f"item clickbait >= the world's {CLICKBAIT_QUANTILE:.0%} quantile "
            f"({threshold:.3f}); share among each user's top {top_k} impressions of the split",
            "top_k": top_k,
            "model_top_k_share": rank_metrics.top_k_share(p.logit, p.user_id, high, top_k),
            "oracle_top_k_share": rank_metrics.top_k_share(oracle, p.user_id, high, top_k),
            "shown_share": float(high.mean()),
        }
    result["protocol"] = {
        "artifact": str(art),
        "features": str(feats.path),
        "data_fingerprint": feats.fingerprint,
        "split_kind": feats.split,
        "split": split,
        "impressions_scored": len(p),
        "impressions_in_split": feats.num_examples("ranking", split),
        "tower": tower_name(cfg.tower),
        "objective": cfg.objective,
        "power_features": cfg.power_features,
        "watch_time_unit": cfg.watch_time_unit,
        "pairs": "clicked x unclicked impressions of one (user_id, request_id) page; "
        "ties count half",
        "calibration": "predicted = c * exp(logit) * watch_time_unit vs observed seconds per "
        "impression, deciles of prediction; calibration_raw: the same with c = 1",
        "calibration_fit": model.calibration.to_dict(),
    }
    if math.isnan(result["model"]["weighted_per_user_loss"]):
        console.print(
            f"[yellow]warning:[/] the {split} split has no page with both a clicked and an "
            "unclicked impression; the weighted per-user loss is undefined"
        )
    write_json_atomic(Path(out) if out is not None else art / "metrics.json", result)
    return result


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}%" if pct else f"{x:.4f}"


def print_metrics(result: Mapping[str, Any]) -> None:
    """A Rich table of what `evaluate_ranker` returned."""
    m, pr = result["model"], result["protocol"]
    table = Table(title=f"ranker {pr['tower']} ({pr['objective']}) on {pr['split']}")
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("random", justify="right")
    table.add_column("oracle", justify="right")
    oracle = result.get("oracle", {})
    table.add_row(
        "weighted per-user loss",
        _fmt(m["weighted_per_user_loss"], pct=True),
        _fmt(result["random"]["weighted_per_user_loss"], pct=True),
        _fmt(oracle.get("weighted_per_user_loss"), pct=True),
    )
    table.add_row("AUC", _fmt(m["auc"]), "0.5", _fmt(oracle.get("auc")))
    table.add_row("GAUC (per user)", _fmt(m["gauc"]), "", "")
    table.add_row("log loss (clicks)", _fmt(m["log_loss"]), "", "")
    table.add_row("weighted log loss", _fmt(m["weighted_log_loss"]), "", "")
    cal, raw = m["calibration"], m["calibration_raw"]
    table.add_row(
        "mean predicted / observed s",
        f"{cal['mean_predicted']:.1f} / {cal['mean_observed']:.1f} (x{cal['ratio']:.3f})",
        "",
        "",
    )
    table.add_row(
        "  uncalibrated exp(logit)",
        f"{raw['mean_predicted']:.1f} / {raw['mean_observed']:.1f} (x{raw['ratio']:.3f})",
        "",
        "",
    )
    cb = result.get("clickbait")
    if cb is not None:
        table.add_row(
            f"high-clickbait share, top {cb['top_k']}",
            _fmt(cb["model_top_k_share"], pct=True),
            _fmt(cb["shown_share"], pct=True),
            _fmt(cb["oracle_top_k_share"], pct=True),
        )
    table.caption = (
        f"{m['impressions']:,} impressions, {m['clicks']:,} clicks, {m['pages']:,} pages, "
        f"{m['pairs']:,} pairs; random column for clickbait = share among all shown"
    )
    console.print(table)
    fit = pr.get("calibration_fit", {})
    how = (
        f"fitted on {fit['impressions']:,} {fit['fitted_on']} impressions"
        if fit.get("fitted_on")
        else fit.get("note", "")
    )
    deciles = Table(
        title=f"calibration by decile of predicted watch time (c = {cal['factor']:.4f}, {how})"
    )
    for col in ("decile", "impressions", "mean predicted s", "mean observed s", "ratio", "raw"):
        deciles.add_column(col, justify="right")
    for i, (row, r) in enumerate(zip(cal["deciles"], raw["deciles"], strict=True), 1):
        deciles.add_row(
            str(i),
            f"{row['count']:,}",
            f"{row['mean_predicted']:.1f}",
            f"{row['mean_observed']:.1f}",
            _fmt(row["ratio"]),
            _fmt(r["ratio"]),
        )
    console.print(deciles)


# --------------------------------------------------------------------------- Typer commands


def train_command(
    features: Path = typer.Option(..., "--features", "-f", help="Features directory (issue 4)."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to create."),
    config: Path | None = typer.Option(None, "--config", "-c", help="TOML config file."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT.checkpoint.pt."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact."),
    device: str | None = typer.Option(
        None, "--device", help="cpu or cuda (the same as the override train.device=...)."
    ),
    nproc: int = typer.Option(
        1,
        "--nproc",
        help="Train data-parallel in N processes on this machine (runs torchrun); "
        "train.batch_size stays the batch of one step over all of them.",
    ),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Overrides, e.g. model.tower=512,256 train.epochs=3"
    ),
) -> None:
    """Train the ranking network (watch-time weighted logistic regression) on FEAT."""
    overrides = [*(overrides or []), *([f"train.device={device}"] if device else [])]
    cfg = load_ranker_train_config(config, overrides)  # a bad config fails here, once
    summary = distributed.train_here_or_launch(
        "ranker",
        lambda dist: train_ranker(features, out, cfg, resume=resume, force=force, dist=dist),
        device=cfg.train.device,
        features=features,
        out=out,
        config=config,
        overrides=overrides,
        nproc=nproc,
        resume=resume,
        force=force,
    )
    if summary is None:
        return
    valid = summary["valid"]
    console.print(
        f"ranker {tower_name(cfg.model.tower)} ({cfg.model.objective}) -> {out}: "
        f"{summary['steps']:,} steps"
        + (f" on {summary['processes']} processes" if summary["processes"] > 1 else "")
        + f", {summary['examples_per_s']:,.0f} ex/s"
        + (
            f", valid {summary['validation_metric'].replace('_', ' ')} {valid:.4f}"
            if valid is not None
            else ""
        )
    )


def evaluate_command(
    art: Path = typer.Argument(..., help="Ranker artifact directory."),
    features: Path = typer.Option(..., "--features", "-f", help="Features directory."),
    split: str = typer.Option("test", "--split", help="train, valid or test."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Default: ART/metrics.json."),
    data: Path | None = typer.Option(
        None, "--data", help="Dataset of FEAT (default: the path FEAT recorded); truth if any."
    ),
    top_k: int = typer.Option(10, "--top-k", help="K of the clickbait top-K share."),
    limit: int | None = typer.Option(
        None, "--limit", help="Score only ~N impressions: all pages of the split's first users."
    ),
) -> None:
    """Weighted per-user loss, AUC, GAUC, log loss and calibration of a ranker."""
    result = evaluate_ranker(
        art, features, split=split, out=out, data=data, top_k=top_k, limit=limit
    )
    print_metrics(result)
    console.print(f"wrote {out or Path(art) / 'metrics.json'}")


def with_overrides(cfg: RankerTrainConfig, **model: Any) -> RankerTrainConfig:
    """`cfg` with some RankingConfig fields replaced (for experiment scripts)."""
    return replace(cfg, model=replace(cfg.model, **model))


def impressions_command(
    data: Path = typer.Option(..., "--data", "-d", help="Dataset without impressions."),
    features: Path = typer.Option(..., "--features", "-f", help="Its features (issue 4)."),
    candidates: Path = typer.Option(..., "--candidates", help="Candidate-model artifact."),
    out: Path = typer.Option(..., "--out", "-o", help="New dataset: DATA + impressions."),
    k: int = typer.Option(20, "-k", help="Impressions per page (retrieved top k)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing dataset."),
) -> None:
    """Synthesise impressions from the candidate model's retrievals (data without any)."""
    from funnelrec.ranking_from_candidates import impressions_from_candidates

    impressions_from_candidates(data, features, candidates, out, k=k, force=force)
    console.print(f"wrote {out}; next: funnelrec features build --data {out} --out FEAT")
