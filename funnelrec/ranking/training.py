"""Training and evaluating the ranking network (Covington et al. 2016, section 4).

    cfg = load_ranker_train_config(Path("configs/ranker-scale.toml"), ["model.tower=1024-512-256"])
    train_ranker(FEAT, ART, cfg)                  # ART/config.json + ART/model.safetensors
    evaluate_ranker(ART, FEAT, split="test")      # ART/metrics.json

Training reads the ranking examples of FEAT, starts the output bias at the best constant
(`model.base_log_odds` over the training impressions), trains with the shared loop
(`funnelrec.training.loop.train`: progress, checkpoints to ART.checkpoint.pt, resume,
determinism), keeps the epoch with the lowest weighted per-user loss on the validation
split (by default stopping `patience` epochs after it: `RANKER_TRAIN_DEFAULTS`), fits the
calibration factor on the validation split (`model.fit_calibration`), and writes the
artifact atomically.

Evaluation scores a split and writes metrics.json: the model's weighted per-user loss,
AUC, GAUC, log losses and calibration, raw and calibrated (`metrics.ranking_metrics`), a
random order for reference, and, on simulated data (the features' dataset has truth/), the
oracle's order by true expected watch time and the share of high-clickbait items in each
user's top 10. A split without a single click has nothing to measure and is refused with
the reason (leave-last-out features: use `--split time`).

`funnelrec train ranker` and `funnelrec evaluate ranker` (funnelrec/cli/rank.py) are thin
wrappers over these functions.
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
from rich.console import Console

from funnelrec.candidates.artifacts import vocab_digest
from funnelrec.config import load_config
from funnelrec.data.dataset import AtomicDirectory, write_json_atomic
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import Features
from funnelrec.features.batch import RankingBatch
from funnelrec.features.loader import ranking_loader, read_examples
from funnelrec.progress import progress_bar
from funnelrec.ranking import metrics as rank_metrics
from funnelrec.ranking.model import (
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
from funnelrec.simulate.truth import TRUTH_DIR, World
from funnelrec.training.distributed import Distributed, local_batch_size
from funnelrec.training.loop import (
    TrainConfig,
    TrainResult,
    load_grown_state,
    load_optimizer_state,
    loader_epochs,
    save_optimizer_state,
    seed_everything,
    train,
)

console = Console()

METRICS_FORMAT_VERSION = 1
# "High clickbait" for the top-10 share: the world's top decile of latent clickbait.
CLICKBAIT_QUANTILE = 0.9
RANDOM_DRAWS = 10


# The [train] section of a ranker run that sets nothing (RankerTrainConfig says why these).
RANKER_TRAIN_DEFAULTS = TrainConfig(
    grad_clip=0.0, batch_size=1024, lr=1e-3, epochs=20, patience=2, restore_best=True
)


@dataclass(frozen=True)
class RankerTrainConfig:
    """Everything `funnelrec train ranker` reads from --config and key=value overrides.

    model:           the network and objective ([model] section; see RankingConfig)
    train:           the shared loop's settings ([train] section; see TrainConfig), with the
                     ranker's defaults (`RANKER_TRAIN_DEFAULTS`), chosen so that a run with
                     no config trains until validation stops improving:
                     - epochs = 20, patience = 2: up to 20 passes, stopping after two epochs
                       without a better validation loss, the best epoch's weights kept
                       (restore_best). The maximum is a bound, not a plan: early stopping
                       ends a run well before it (the default tower overfits a small world
                       within a few epochs), and on a world whose epoch takes hours
                       `train.max_steps` bounds a run better. A patience of one would stop
                       at the first noisy epoch of a small validation split; each further
                       epoch of patience costs one more pass after the best.
                     - batch_size = 1024, lr = 1e-3, whatever the data's size: smaller
                       batches did not rank better on small worlds and cost more time per
                       impression on the CPU (docs/ranking.md has the figures), so the
                       batch is not chosen from the data as the candidate stage's is.
                     - grad_clip = 0: with positives weighted by watch time in seconds
                       every batch's gradient norm is far above any fixed threshold, and
                       clipping would re-weight batches by how much watch time they hold.
                     Without validation (validate = false, or no validation impressions)
                     nothing stops the run early: it trains the whole `epochs`.
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
    train: TrainConfig = field(default_factory=lambda: RANKER_TRAIN_DEFAULTS)
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
    """Defaults, then the TOML file, then `key=value` overrides, by `config.load_config`'s
    rules (`model.tower=1024-512-256`, `train.epochs=3`). A [train] section that sets lr
    alone keeps RankerTrainConfig's own train defaults (grad_clip = 0, up to 20 epochs
    with patience 2: `RANKER_TRAIN_DEFAULTS`)."""
    return load_config(RankerTrainConfig, path, overrides)


def checkpoint_path(out: Path) -> Path:
    """Where a training run into `out` checkpoints (beside it: the artifact is atomic)."""
    return out.with_name(out.name + ".checkpoint.pt")


def _features_meta(feats: Features) -> dict[str, Any]:
    rank_item = feats.vocab("rank_item")
    spaces = [s["name"] for s in feats.ranking_spec["id_spaces"]]
    return {
        "data": {"fingerprint": feats.fingerprint, "features": str(feats.path)},
        "split": feats.split,
        "rank_item_vocab": len(rank_item),
        # which value each id of every table names: what a warm start checks
        "vocab_digests": {name: vocab_digest(feats.vocab(name).values) for name in spaces},
    }


def _warm_start(
    art: Path, spec: RankingFeatureSpec, feats: Features, config: RankingConfig
) -> RankingModel:
    """The previous ranker at `art`, checked to be one the features `feats` (of spec
    `spec`) extend: the same features and widths, every table at least as large, its
    first ids naming the same values (where the artifact recorded their digests)."""
    meta = read_ranker_config(art)
    old = load_ranker(art)
    if config != RankingConfig() and config != old.config:
        raise FunnelrecError(f"a warm start keeps the model config of {art}; leave [model] unset")
    same = ("categorical", "bags", "dense_columns", "power_columns")
    for key in same:
        if getattr(old.spec, key) != getattr(spec, key):
            raise ArtifactError(
                f"{art}: its {key.replace('_', ' ')} differ from those of {feats.path}; a warm "
                "start needs features built with `funnelrec features build --update-from`"
            )
    digests = meta.get("vocab_digests") or {}
    for before in old.spec.id_spaces:
        try:
            now = spec.space(before.name)
        except KeyError:
            raise ArtifactError(f"{art}: {feats.path} has no id space '{before.name}'") from None
        if now.dim != before.dim or now.vocab_size < before.vocab_size:
            raise ArtifactError(
                f"{art}: id space '{before.name}' is {before.vocab_size} x {before.dim} there, "
                f"{now.vocab_size} x {now.dim} in {feats.path}; a warm start needs tables that "
                "only gain rows (`funnelrec features build --update-from`)"
            )
        values = feats.vocab(before.name).values[: before.vocab_size - 1]
        digest = digests.get(before.name)
        if digest is not None and vocab_digest(values) != digest:
            raise ArtifactError(
                f"{art}: the {before.name} vocabulary of {feats.path} does not extend the one "
                "the ranker was trained on (its ids name other values)"
            )
    return old


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
    warm_start: Path | str | None = None,
    checkpoints: bool = True,
) -> dict[str, Any]:
    """Train a ranker on FEAT's ranking examples and write the artifact `out`.

    warm_start: a previous ranker artifact to start from, trained on features that FEAT
    extends (`funnelrec features build --update-from`): its model config, every weight
    (tables keep their old rows; new rows are initialised as a fresh model's) and its
    output bias (`init_bias` is then not applied); the optimizers continue from its saved
    state (`loop.OPTIMIZER_FILE`, grown with the tables; fresh for an artifact without
    one), and the calibration is fitted anew after training.

    checkpoints: write them (to `checkpoint_path(out)`, removed with the artifact written)
    so that `resume` can continue; False: none, for a caller that reruns an interrupted
    training from its start anyway (`funnelrec update`).

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
    if resume and not checkpoints:
        raise FunnelrecError("resume continues from a checkpoint: it needs checkpoints")
    feats = Features.open(features)
    spec = RankingFeatureSpec.from_dict(feats.ranking_spec)
    if out.exists() and not force:  # every rank fails early, not rank 0 alone
        raise FunnelrecError(f"{out} already exists (use --force to overwrite)")
    # rank 0 alone builds (and on failure removes) the artifact
    target = AtomicDirectory(out, force=force) if dist.is_main else None
    summary: dict[str, Any] | None = None
    try:
        previous = None
        if warm_start is not None:
            # read before seeding: building the previous model draws from the RNG
            previous = _warm_start(Path(warm_start), spec, feats, cfg.model)
        seed_everything(cfg.train.seed)
        model = RankingModel(spec, previous.config if previous is not None else cfg.model)
        warm_meta, optimizer_state = None, None
        if previous is not None and warm_start is not None:
            grown = load_grown_state(model, previous.state_dict(), where=warm_start)
            optimizer_state = load_optimizer_state(warm_start)
            warm_meta = {
                "artifact": str(warm_start),
                "grown": {k: list(v) for k, v in grown.items()},
                "optimizer_state": "continued" if optimizer_state else "fresh",
            }
        elif cfg.init_bias:
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

        validated: list[float] = []  # this call's validation losses, for the progress lines
        # the predictions of this call's latest validation: the final scoring below reuses
        # them when they are of the saved weights
        latest: list[RankingPredictions] = []

        def validation(m: torch.nn.Module) -> float:
            assert isinstance(m, RankingModel)
            # Data-parallel: rank 0 alone scores the split (the per-user metric needs whole
            # pages, and `valid_impressions` cuts at a user boundary of the whole split) and
            # the all-reduce hands its figure to the other ranks, which the loop requires to
            # agree; they wait in it meanwhile. The split is small next to training.
            loss = 0.0
            if dist.is_main:
                latest[:] = [score_valid(m)]
                loss = validation_loss(latest[0])
            if progress and dist.is_main:
                _report_validation(validated, loss, metric_name, cfg.train.patience)
            return dist.all_reduce_sums([-loss])[0]  # maximised

        meta = {
            "model": model.metadata(),
            "features": _features_meta(feats),
            "init_bias": cfg.init_bias,
            "validate": has_valid,
            **({"warm_start": warm_meta} if warm_meta is not None else {}),
        }
        result: TrainResult = train(
            model,
            loader_epochs(loader),
            cfg.train,
            steps_per_epoch=len(loader.shards),
            checkpoint=checkpoint_path(out) if checkpoints else None,
            resume=resume,
            evaluate=validation if has_valid else None,
            meta=meta,
            progress=progress,
            description=f"ranker {tower_name(cfg.model.tower)} {cfg.model.objective}",
            dist=dist,
            optimizer_state=optimizer_state,
        )
        if target is not None:  # rank 0 finishes alone (the replicas are equal)
            # One scoring of the validation split with the saved weights gives both the
            # summary's validation figure and the calibration.
            has_valid_rows = feats.num_examples("ranking", "valid") > 0
            final = None
            if (has_valid or cfg.calibrate) and has_valid_rows:
                final = (
                    latest[0]
                    if latest and _scored_saved_weights(result, cfg.train.restore_best)
                    else score_valid(model)
                )
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
                    **({"warm_start": warm_meta} if warm_meta is not None else {}),
                    "training": summary,
                },
            )
            save_optimizer_state(target.tmp, result.optimizer_state)
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


def _scored_saved_weights(result: TrainResult, restore_best: bool) -> bool:
    """Whether the latest validation of a run (one made by this call) scored the weights
    it ends with: it came after the last step, and those are the weights kept (the best,
    or no best restored)."""
    if not result.history or result.history[-1][0] != result.steps:
        return False
    return not restore_best or result.best_step == result.steps


def _report_validation(losses: list[float], loss: float, metric: str, patience: int) -> None:
    """One line per validation, beside the training bar's (in a log as well): the loss, the
    best so far and how many validations since it count toward `patience` (the loop's rule:
    a loss counts as better only when strictly lower)."""
    best = min(losses, default=math.inf)
    losses.append(loss)
    line = f"validation {len(losses)}: {metric.replace('_', ' ')} {loss:.4f}"
    if loss < best:
        line += " (best so far)"
    else:
        at = losses.index(best) + 1
        line += f" (best {best:.4f} at validation {at}; {len(losses) - at} since then"
        line += f", patience {patience})" if patience else ")"
    console.print(line, markup=False, highlight=False, soft_wrap=True)


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


def with_overrides(cfg: RankerTrainConfig, **model: Any) -> RankerTrainConfig:
    """`cfg` with some RankingConfig fields replaced (for experiment scripts)."""
    return replace(cfg, model=replace(cfg.model, **model))
