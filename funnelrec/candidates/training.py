"""A training run of the candidate model: `CandidateTrainingConfig` (TOML + key=value
overrides) and `fit_candidates`, which trains on a features directory and writes the
artifact."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from funnelrec.candidates.artifacts import (
    check_extends,
    features_meta,
    load_candidate_model,
    read_candidate_config,
    save_candidate_artifact,
)
from funnelrec.candidates.content import model_content
from funnelrec.candidates.model import CandidateConfig, CandidateInputs, CandidateModel
from funnelrec.config import load_config
from funnelrec.data.dataset import AtomicDirectory
from funnelrec.errors import FunnelrecError
from funnelrec.features.batch import CandidateBatch
from funnelrec.training.loop import (
    TrainConfig,
    TrainResult,
    load_grown_state,
    load_optimizer_state,
    loader_epochs,
    seed_everything,
    train,
)

if TYPE_CHECKING:
    from funnelrec.features import Features
    from funnelrec.training.distributed import Distributed


# When batch_size is left unset, it is chosen from the number of training examples: the
# power of two nearest to examples / AUTO_STEPS_PER_EPOCH, within [AUTO_BATCH_MIN,
# AUTO_BATCH_MAX]. Large data sets get the loop's usual batch; small ones
# smaller batches, so that an epoch (one validation) still holds enough steps to learn from
# and early stopping sees the model improve in small increments.
AUTO_BATCH_MIN = 64
AUTO_BATCH_MAX = 1024
AUTO_STEPS_PER_EPOCH = 32


def auto_batch_size(num_examples: int) -> int:
    """The batch size chosen for `num_examples` training examples (see AUTO_BATCH_MAX)."""
    target = max(num_examples, 1) / AUTO_STEPS_PER_EPOCH
    size = 2 ** max(0, round(math.log2(max(target, 1.0))))
    return min(AUTO_BATCH_MAX, max(AUTO_BATCH_MIN, size))


@dataclass(frozen=True)
class CandidateTrainConfig(TrainConfig):
    """`TrainConfig` with the candidate stage's defaults: train until validation Recall@K
    stops improving, and a batch size chosen from the data unless set.

    batch_size: examples per step; None = `auto_batch_size(training examples)`, resolved by
                `fit_candidates` (the artifact's config.json records the value used) [None]
    epochs:     the most passes over the training examples; early stopping usually ends
                training well before [50]
    patience:   epoch-end evaluations without a better validation Recall@K before stopping
                (the best epoch's weights are kept: restore_best) [3]
    lr:         TrainConfig's [1e-3]: Adam's step size suits every batch size chosen above
    """

    batch_size: int | None = None  # type: ignore[assignment]
    epochs: int = 50
    patience: int = 3

    def __post_init__(self) -> None:
        self.resolved(AUTO_BATCH_MAX)  # TrainConfig's checks, on the resolved values

    def resolved(self, num_examples: int) -> TrainConfig:
        """The plain TrainConfig that trains: batch_size chosen from `num_examples` when
        unset."""
        values = asdict(self)
        if self.batch_size is None:
            values["batch_size"] = auto_batch_size(num_examples)
        return TrainConfig(**values)


@dataclass(frozen=True)
class CandidateTrainingConfig:
    """One training run of the candidate model: the model, the loop, and validation.

    model:          CandidateConfig ([model] in TOML, `model.dim=64` or just `dim=64`)
    train:          CandidateTrainConfig ([train] in TOML, `train.lr=0.01` or `lr=0.01`):
                    by default up to 50 epochs, stopping after 3 without a better
                    validation Recall@K, with a batch size chosen from the data
    valid_k:        K of the validation Recall@K (seen items excluded) that early stopping
                    watches [100]
    valid_examples: validation examples scored per evaluation (None = all) [20000]
    proposal_memory: a warm start's label frequencies, the base of the sampling proposal
                    Q and of its logQ correction: 0 recounts them from the new features'
                    training labels; m > 0 mixes in the previous model's, m x old + (1 - m)
                    x new, an exponential moving average over updates (the per-update
                    form of the streaming estimate of Yi et al. 2019) [0]
    """

    model: CandidateConfig = field(default_factory=CandidateConfig)
    train: CandidateTrainConfig = field(default_factory=CandidateTrainConfig)
    valid_k: int = 100
    valid_examples: int | None = 20_000
    proposal_memory: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.proposal_memory < 1.0:
            raise FunnelrecError(f"proposal_memory must be in [0, 1), got {self.proposal_memory}")


def load_training_config(
    path: Path | str | None = None, overrides: Sequence[str] = ()
) -> CandidateTrainingConfig:
    """Defaults, then a TOML file (sections [model] and [train]), then key=value overrides,
    by `config.load_config`'s rules: a key of either section may leave the section out
    (`dim=64`, `lr=0.01`), since the two share no field names."""
    return load_config(CandidateTrainingConfig, path, overrides)


def checkpoint_path(out: Path | str) -> Path:
    """Where training toward artifact `out` checkpoints: `<out>.checkpoint.pt` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.checkpoint.pt"


def fit_candidates(
    feat: Path | str | Features,
    out: Path | str,
    config: CandidateTrainingConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    dist: Distributed | None = None,
    warm_start: Path | str | None = None,
    checkpoints: bool = True,
) -> TrainResult:
    """Train a candidate model on a features directory and write artifact `out`.

    warm_start: a previous artifact to start from, trained on features that `feat`
    extends (`funnelrec features build --update-from`): the model is built with its model
    config at the new vocabulary sizes, every weight copied from it (tables keep their
    old rows, new rows are initialised as a fresh model's), and the proposal's label
    frequencies recounted from `feat` (or mixed: `proposal_memory`). The optimizers
    continue from the previous run's state (`artifacts.OPTIMIZER_FILE`: Adam's moments of
    the old rows and parameters, zero for new rows; fresh for an artifact without one).
    Checkpoints and resume work as for a fresh run.

    Checkpoints go to `checkpoint_path(out)` (removed once the artifact is written); with
    `resume`, training continues from there. `checkpoints=False` writes none: for a caller
    that reruns an interrupted training from its start anyway (`funnelrec update`), they
    would be written only to be removed. The artifact is built in a temporary
    directory and renamed into place.

    dist: this process's place in a data-parallel run (`distributed.setup`, under
    torchrun): each rank reads its share of the training row groups and of the validation
    examples, and only rank 0 writes checkpoints and the artifact. None: one process.
    """
    import itertools

    from funnelrec.candidates.metrics import (
        ModelScorer,
        SequentialSeen,
        evaluate_retrieval,
        query_batch,
    )
    from funnelrec.features import Features
    from funnelrec.features.loader import candidate_loader, seen_items
    from funnelrec.training.distributed import Distributed, local_batch_size

    cfg = config or CandidateTrainingConfig()
    dist = dist or Distributed()
    if resume and not checkpoints:
        raise FunnelrecError("resume continues from a checkpoint: it needs checkpoints")
    feats = feat if isinstance(feat, Features) else Features.open(feat)
    out = Path(out)
    ckpt = checkpoint_path(out)
    if out.exists() and not force:
        raise FunnelrecError(f"{out} already exists (use --force to overwrite)")
    if ckpt.exists() and not resume and not force:
        raise FunnelrecError(
            f"{ckpt} is left from an interrupted run: pass --resume to continue it "
            "or --force to start over"
        )
    # what trains: the config's values, with those it leaves to the data chosen from it
    tcfg = (
        cfg.train.resolved(feats.num_examples("candidates", "train"))
        if isinstance(cfg.train, CandidateTrainConfig)
        else cfg.train
    )
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    inputs = CandidateInputs.from_features(feats)
    counts = torch.as_tensor(np.array(feats.item_label_counts(), dtype=np.float64))
    model_config, warm = cfg.model, None
    if warm_start is not None:
        # read before seeding: building the previous model draws from the RNG
        warm = _WarmStart.open(warm_start, feats, cfg)
        model_config = warm.model.config
        counts = warm.label_counts(counts, cfg.proposal_memory)
    content_inputs, content_rows, content_t_end = model_content(
        model_config.item_content, feats, item_age=model_config.ages_items
    )
    seed_everything(tcfg.seed)
    model = CandidateModel(
        model_config,
        inputs,
        label_counts=counts,
        content_inputs=content_inputs,
        content_rows=content_rows,
        content_t_end=content_t_end,
    )
    warm_meta = warm.apply(model, cfg.proposal_memory) if warm is not None else None
    loader = candidate_loader(
        feats,
        "train",
        batch_size=local_batch_size(tcfg.batch_size, dist),
        shuffle=True,
        seed=tcfg.seed,
        num_workers=tcfg.num_workers,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    evaluate = None
    if feats.num_examples("candidates", "valid") > 0:
        # the examples `metrics.evaluate_split(limit=valid_examples)` scores, their batches
        # shared out over the ranks in contiguous runs; Recall@K is then the mean over all
        total = feats.num_examples("candidates", "valid")
        if cfg.valid_examples is not None:
            total = min(total, cfg.valid_examples)
        vbs = min(query_batch(len(feats.vocab("item"))), max(total, 1))
        n_batches = math.ceil(total / vbs)
        # whole batches are scored: the last one may run past valid_examples
        flat, offsets = seen_items(feats, "valid", limit=n_batches * vbs)
        share = math.ceil(n_batches / dist.world_size)
        first = min(n_batches, dist.rank * share)
        last = min(n_batches, first + share)
        valid = candidate_loader(feats, "valid", batch_size=vbs)
        device = torch.device(tcfg.device)
        num_items = len(feats.vocab("item")) - 1

        class OnDevice(ModelScorer):
            """Batches go to the model's device (a GPU), scores come back to the CPU,
            where the metrics' exclusion masks are."""

            def queries(self, batch: CandidateBatch) -> Tensor:
                return super().queries(batch.to(device))

            def scores(self, queries: Tensor) -> Tensor:
                return super().scores(queries).cpu()

        def evaluate(m: nn.Module) -> float:
            seen = SequentialSeen(flat, offsets)
            seen.cursor = first * vbs
            report = evaluate_retrieval(
                {"model": OnDevice(m)},
                itertools.islice(iter(valid), first, last),
                num_items=num_items,
                ks=(cfg.valid_k,),
                seen=seen,
            )
            recall = report.metrics["model"][f"recall@{cfg.valid_k}"]
            if not dist.enabled:
                return recall
            hits = recall * report.queries if report.queries else 0.0
            hits, queries = dist.all_reduce_sums([hits, report.queries])
            return hits / queries

    fmeta = features_meta(feats, model_config.item_content)
    result = train(
        model,
        loader_epochs(loader),
        tcfg,
        steps_per_epoch=len(loader),
        checkpoint=ckpt if checkpoints else None,
        resume=resume,
        optimizer_state=warm.optimizer_state if warm is not None else None,
        evaluate=evaluate,
        meta={
            "model": asdict(model_config),
            "features": fmeta,
            "valid_k": cfg.valid_k,
            **({"warm_start": warm_meta} if warm_meta is not None else {}),
        },
        progress=progress,
        description="train candidates",
        dist=dist,
    )
    meta = {
        **fmeta,
        "train": asdict(tcfg),
        "valid_k": cfg.valid_k,
        "valid_examples": cfg.valid_examples,
        **({"warm_start": warm_meta} if warm_meta is not None else {}),
        "training": {
            "steps": result.steps,
            "epochs": result.epochs,
            "examples": result.examples,
            "seconds": round(result.seconds, 3),
            "examples_per_s": round(result.examples_per_s, 1),
            "final_loss": result.loss,
            f"best_valid_recall@{cfg.valid_k}": result.best_metric,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "valid_history": result.history,
            "processes": result.world_size,
            "comm_bytes_per_step": round(result.comm_bytes_per_step),
        },
    }
    if dist.is_main:
        target = AtomicDirectory(out, force=force)
        try:
            save_candidate_artifact(
                model,
                target.tmp,
                item_ids=feats.vocab("item").values,
                meta=meta,
                features=feats,
                optimizer_state=result.optimizer_state,
            )
            target.commit()
        except BaseException:
            target.abort()
            raise
        ckpt.unlink(missing_ok=True)
    dist.barrier()  # the other ranks return once the artifact is in place
    return result


@dataclass(eq=False)
class _WarmStart:
    """The previous artifact a warm start continues from, checked against the new
    features."""

    path: Path
    meta: dict[str, Any]
    model: CandidateModel
    # the previous run's optimizer state ({} for an artifact without one): its moments
    # continue, grown with the tables, instead of restarting at zero
    optimizer_state: dict[str, Tensor]

    @classmethod
    def open(cls, art: Path | str, feats: Features, cfg: CandidateTrainingConfig) -> _WarmStart:
        art = Path(art)
        meta = read_candidate_config(art)
        check_extends(meta, feats, art)
        model = load_candidate_model(art)
        if cfg.model != CandidateConfig() and cfg.model != model.config:
            old, new = asdict(model.config), asdict(cfg.model)
            diff = ", ".join(f"{k}={new[k]!r} (was {old[k]!r})" for k in new if new[k] != old[k])
            raise FunnelrecError(
                f"a warm start keeps the model config of {art}; this run sets {diff}"
            )
        return cls(art, meta, model, load_optimizer_state(art))

    def label_counts(self, counts: Tensor, memory: float) -> Tensor:
        """The new training label counts, with the previous model's label frequencies
        mixed in at weight `memory` (items it did not know count 0 there)."""
        if memory == 0.0:
            return counts
        old = torch.zeros_like(counts, dtype=torch.float64)
        p_old = self.model.softmax.log_p_label.to(torch.float64).exp()
        old[: p_old.shape[0]] = p_old
        total = float(counts.sum())
        p_new = counts.to(torch.float64) / max(total, 1.0)
        return total * ((1.0 - memory) * p_new + memory * old)

    def apply(self, model: CandidateModel, memory: float) -> dict[str, Any]:
        """Copy the previous weights into `model`; what the artifact records about it."""
        # the sampler's buffers follow the new label counts, the item content the new
        # features' table, both built with the model
        grown = load_grown_state(
            model,
            self.model.state_dict(),
            skip=lambda name: name.startswith(("softmax.", "content_rows.")),
            where=self.path,
        )
        return {
            "artifact": str(self.path),
            "data": self.meta.get("data", {}),
            "vocab": self.meta.get("vocab", {}),
            "grown": {k: list(v) for k, v in grown.items()},
            "proposal": "recounted" if memory == 0.0 else f"mixed, memory {memory}",
            "optimizer_state": "continued" if self.optimizer_state else "fresh",
        }
