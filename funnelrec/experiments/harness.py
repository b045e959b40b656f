"""The experiment harness: one simulated world, cached features and models, the
convergence rule every arm trains under, parallel arms, provenance.

    h = Harness(ExperimentOptions(preset="small-v2", seeds=3, out=Path("runs/experiments")))
    feats = h.features("time")                          # built once, shared
    art = h.candidates(feats, ["depth=3"], seed=0)      # trained once per settings
    h.parallel(fn, jobs)                                # fn(h, *job), budget.workers at once

Layout under OUT (the experiments share everything under `_shared/`):

    OUT/_shared/data-<preset>-s<world seed>/   the simulated world, with its truth/
    OUT/_shared/features-<split>-<hash>/       features of that world (split + overrides)
    OUT/_shared/models/cand-<hash>/            candidate models (+ .json: training summary)
    OUT/_shared/models/rank-<hash>/            rankers (+ .json: summary and test metrics)
    OUT/_shared/cache/<name>-<hash>.json       other cached results (evaluations, baselines)
    OUT/<experiment>/metrics.json              the experiment's document (see `report`)
    OUT/<experiment>/run.json                  provenance: command, versions, data, timing
    OUT/<experiment>/*.png                     its figures

Everything cached is keyed by a hash of all that shapes it (world, features config,
model and training config, seed, budget), so re-running an experiment skips what is done
and a changed setting recomputes only what it touches, like `pipeline.run`'s stages.

Every arm of every experiment trains to convergence under one rule (`convergence`): the
product's own early stopping (`training.loop.train`: evaluate every N steps, stop after
`patience` evaluations without a better validation metric, keep the best weights), with
the same settings from the `Budget` for every arm, and every arm is trained with each of
the training seeds. `parallel` trains the arms of an experiment in `budget.workers`
processes (one torch thread each: the models are small, and two processes use two cores
better than one process with two threads); a run's result does not depend on which
process trained it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console

from funnelrec import __version__
from funnelrec.config import apply_overrides
from funnelrec.data.dataset import Dataset, write_json_atomic
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.experiments.report import git_commit, write_figures
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features

DOC_FORMAT_VERSION = 1
DOC_KIND = "funnelrec-experiment"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
SHARED = "_shared"


@dataclass(frozen=True)
class Budget:
    """Compute per arm of an experiment, and the convergence rule every arm trains under.

    Training (the same rule for every arm of every experiment: `Harness.convergence`):
    patience:         evaluations on the validation split without a better metric before
                      a run stops; the best evaluated weights are kept
    cand_eval_every:  candidate-model steps between evaluations (validation Recall@100 of
                      `valid_examples` validation examples, seen items excluded)
    cand_max_steps:   the most candidate-model steps (a bound for runs that keep improving)
    rank_eval_every:  ranker steps between evaluations (validation weighted per-user loss
                      of about `valid_impressions` impressions, whole users)
    rank_max_steps:   the most ranker steps
    valid_examples:   validation examples scored per candidate-model evaluation
    valid_impressions: validation impressions scored per ranker evaluation (None = all)

    Models:
    cand_batch:       candidate-model examples per step
    cand_dim:         d, the user vector / item embedding width (paper: 256)
    cand_token_dim:   search token embedding width (the token table is the largest)
    cand_negatives:   sampled negatives per batch of the default model
    cand_lr:          learning rate (AdamW)
    rank_batch, rank_lr: ranker training

    Evaluation:
    eval_examples:    held-out next watches scored per candidate model: a random sample of
                      the test split, the same for every model (None = all); the
                      example-age experiment samples as many requests of the validation
                      period (its protocol says why)
    funnel_users:     users whose held-out watches the funnel and its sources serve in the
                      baselines experiment (the first ones of the test split)
    ab_users:         users served by every policy in the simulated A/B test
    ab_k:             slate size of the A/B test
    mf_iterations:    BPR epochs (ALS: at most 15 sweeps)

    Grids and machine:
    negatives:        the grid of the `negatives` experiment
    depths:           the grid of the `depth-features` experiment
    rank_table:       the rows of the `ranking-table` experiment: "all" of Table 1, or
                      "depth": one width per depth (none, 256, 512->256, 1024->512->256)
                      and the two ablations
    threads:          torch threads per process
    workers:          processes training arms at once (1: all in this process)
    """

    patience: int = 2
    cand_eval_every: int = 150
    cand_max_steps: int = 4500
    rank_eval_every: int = 250
    rank_max_steps: int = 4500
    valid_examples: int = 5000
    valid_impressions: int | None = 200_000
    cand_batch: int = 1024
    cand_dim: int = 64
    cand_token_dim: int = 16
    cand_negatives: int = 1024
    cand_lr: float = 0.005
    rank_batch: int = 1024
    rank_lr: float = 0.001
    eval_examples: int | None = 5000
    funnel_users: int = 500
    ab_users: int = 600
    ab_k: int = 10
    mf_iterations: int = 20
    negatives: tuple[int, ...] = (64, 1024, 4096)
    depths: tuple[int, ...] = (0, 1, 2, 3, 4)
    rank_table: Literal["all", "depth"] = "all"
    threads: int = 1
    workers: int = 1

    def __post_init__(self) -> None:
        for name in (
            "cand_max_steps",
            "cand_eval_every",
            "rank_max_steps",
            "rank_eval_every",
            "cand_batch",
            "cand_dim",
            "rank_batch",
            "patience",
            "valid_examples",
            "funnel_users",
        ):
            if getattr(self, name) < 1:
                raise FunnelrecError(f"budget: {name} must be >= 1")
        if self.ab_users < 1 or self.ab_k < 1 or self.threads < 1 or self.workers < 1:
            raise FunnelrecError("budget: ab_users, ab_k, threads and workers must be >= 1")
        if self.eval_examples is not None and self.eval_examples < 1:
            raise FunnelrecError("budget: eval_examples must be >= 1 or none")
        if self.valid_impressions is not None and self.valid_impressions < 1:
            raise FunnelrecError("budget: valid_impressions must be >= 1 or none")
        if not self.negatives or not self.depths:
            raise FunnelrecError("budget: negatives and depths need at least one value")


# Budgets per preset. small: sized so that `funnelrec experiment paper` (three seeds)
# trains every arm to convergence within two hours on two cores: two worker processes of
# one torch thread each (the models are small enough that a second thread in one process
# gains little), the negatives grid cut to three sizes and Table 1 to one width per depth.
# Validation is sized to its cost: a candidate model's 5,000 examples take a fraction of
# the training between two evaluations, and their sampling noise is below the run's own
# fluctuation from one evaluation to the next; a ranker's 200,000 impressions (most of
# the small world's validation split) keep its noisier loss from ending a run early. The
# test samples are large enough for the paired intervals to resolve small differences.
# docs/results.md records the run.
BUDGETS: dict[str, Budget] = {
    "tiny": Budget(
        cand_eval_every=10,
        cand_max_steps=400,
        rank_eval_every=10,
        rank_max_steps=400,
        valid_examples=300,
        valid_impressions=None,
        cand_batch=256,
        cand_dim=16,
        cand_token_dim=8,
        cand_negatives=128,
        cand_lr=0.01,
        rank_batch=512,
        eval_examples=300,
        funnel_users=60,
        ab_users=40,
        mf_iterations=5,
        negatives=(16, 128),
        depths=(0, 2),
    ),
    "small": Budget(rank_table="depth", workers=2),
    "medium": Budget(
        cand_max_steps=20_000,
        rank_max_steps=20_000,
        cand_eval_every=1000,
        rank_eval_every=1000,
        valid_examples=20_000,
        eval_examples=20_000,
        funnel_users=2000,
        ab_users=5000,
        workers=2,
    ),
}
# A "-v2" world (users who change, docs/simulator.md) is the same size as its base
# preset, so it gets the same budget.
BUDGETS.update({f"{name}-v2": budget for name, budget in list(BUDGETS.items())})


@dataclass(frozen=True)
class ExperimentOptions:
    """What `funnelrec experiment NAME` was asked for.

    preset:     simulated world (simulate.PRESETS) and default budget (BUDGETS)
    seeds:      training seeds per arm (0..seeds-1); the world, features and evaluation
                examples stay fixed, so arms are compared seed by seed
    out:        root directory of experiments and their shared cache
    world_seed: seed of the simulated world
    budget:     `key=value` overrides of the preset's Budget, e.g. patience=5
    progress:   progress bars
    """

    preset: str = "small-v2"
    seeds: int = 3
    out: Path = Path("runs/experiments")
    world_seed: int = 0
    budget: tuple[str, ...] = ()
    progress: bool = True

    def __post_init__(self) -> None:
        if self.preset not in BUDGETS:
            raise FunnelrecError(
                f"unknown preset '{self.preset}' (expected one of {', '.join(BUDGETS)})"
            )
        if self.seeds < 1:
            raise FunnelrecError(f"--seeds must be >= 1, got {self.seeds}")


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-able object (keys sorted): the identity of cached work."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def environment() -> dict[str, Any]:
    """Versions and machine, for provenance records."""
    return {
        "funnelrec": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.system()}",
    }


Job = tuple[Callable[..., Any], Sequence[Any]]
"""(fn, args) for `Harness.parallel`: fn(harness, *args) computes and caches something."""


@dataclass
class Timer:
    """Wall and process CPU seconds since construction."""

    wall0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=time.process_time)

    def seconds(self) -> dict[str, float]:
        return {
            "wall_s": round(time.perf_counter() - self.wall0, 2),
            "cpu_s": round(time.process_time() - self.cpu0, 2),
        }


class Harness:
    """Shared state of experiments run under one output directory (see the module doc)."""

    def __init__(self, options: ExperimentOptions, console: Console | None = None) -> None:
        self.options = options
        self.console = console or Console()
        self.root = Path(options.out)
        self.shared = self.root / SHARED
        self.budget = apply_overrides(BUDGETS[options.preset], list(options.budget))
        self.seeds = list(range(options.seeds))
        self.progress = options.progress

    # ------------------------------------------------------------------ the world

    @property
    def data_dir(self) -> Path:
        o = self.options
        return self.shared / f"data-{o.preset}-s{o.world_seed}"

    def data(self) -> Path:
        """The simulated world (generated once; `simulate.generate` writes atomically)."""
        from funnelrec.simulate import generate, preset_config

        path = self.data_dir
        if not (path / "manifest.json").exists():
            self.console.print(f"[bold]simulating the {self.options.preset} world[/] -> {path}")
            generate(
                preset_config(self.options.preset),
                self.options.world_seed,
                path,
                preset=self.options.preset,
                force=True,
                progress=self.progress,
            )
        return path

    def data_info(self) -> dict[str, Any]:
        ds = Dataset.open(self.data())
        return {
            "path": str(self.data_dir),
            "preset": self.options.preset,
            "world_seed": self.options.world_seed,
            "fingerprint": ds.fingerprint(),
            "rows": dict(ds.manifest.row_counts),
        }

    def features(self, split: Literal["last", "time"], overrides: Sequence[str] = ()) -> Features:
        """Features of the world with `split` and FeaturesConfig overrides (built once).
        The impressions' candidate source and score are not features unless an override
        says `candidate_columns=true`."""
        data = self.data()
        # The simulator logs its logging policy's sources, not the ones the Recommender
        # serves: as features they cost served watch time (docs/simulator.md).
        cfg = apply_overrides(FeaturesConfig(candidate_columns=False), list(overrides))
        key = stable_hash({"data": str(data), "split": split, "config": asdict(cfg)})
        path = self.shared / f"features-{split}-{key}"
        if not (path / "features.json").exists():
            shown = " ".join(overrides) or "defaults"
            self.console.print(f"[bold]features[/] split={split} ({shown}) -> {path}")
            build_features(data, path, split=split, config=cfg, force=True, progress=self.progress)
        return Features.open(path)

    # ------------------------------------------------------------------ caching

    def cached(self, name: str, key: Any, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """compute() once per key; the result is kept as JSON in _shared/cache/."""
        file = self.shared / "cache" / f"{name}-{stable_hash(key)}.json"
        if file.exists():
            try:
                stored: dict[str, Any] = json.loads(file.read_text())
                if stored.get("key") == json.loads(json.dumps(key, default=str)):
                    return dict(stored["value"])
            except (OSError, json.JSONDecodeError, KeyError):
                pass  # unreadable: compute again
        timer = Timer()
        value = compute()
        value = {**value, "seconds": timer.seconds()}
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(file, {"key": key, "value": value})
        return value

    # ------------------------------------------------------------------ candidate models

    def convergence(self, stage: Literal["candidates", "ranker"]) -> list[str]:
        """The convergence rule as training-config overrides: the same for every arm of
        every experiment (only the stage's metric and step sizes differ).

        Train until the validation metric has not improved for `patience` evaluations in
        a row, evaluating every `*_eval_every` steps, at most `*_max_steps` steps, and keep
        the best evaluated weights. The metric is the product's own early-stopping metric
        on the features' validation split (the period after the training window, or each
        user's watch before the test one), never on the test examples the experiments
        score: Recall@100 of the candidate model (`candidates.training`), the weighted
        per-user loss of the ranker (`ranking.training`)."""
        b = self.budget
        if stage == "candidates":
            return [
                f"max_steps={b.cand_max_steps}",
                f"eval_every={b.cand_eval_every}",
                f"patience={b.patience}",
                "restore_best=true",
                "epochs=1000000",  # a bound only: max_steps and patience end the run
                "valid_k=100",
                f"valid_examples={b.valid_examples}",
            ]
        return [
            f"train.max_steps={b.rank_max_steps}",
            f"train.eval_every={b.rank_eval_every}",
            f"train.patience={b.patience}",
            "train.restore_best=true",
            "train.epochs=1000000",
            "validate=true",
            f"valid_impressions={'none' if b.valid_impressions is None else b.valid_impressions}",
        ]

    def candidate_overrides(self, overrides: Sequence[str], seed: int) -> list[str]:
        """The budget's candidate settings and the convergence rule, then `overrides`
        (CandidateTrainingConfig keys)."""
        b = self.budget
        return [
            f"dim={b.cand_dim}",
            f"token_dim={b.cand_token_dim}",
            "depth=2",
            f"num_negatives={b.cand_negatives}",
            f"batch_size={b.cand_batch}",
            f"lr={b.cand_lr}",
            *self.convergence("candidates"),
            "checkpoint_every=0",
            "checkpoint_every_s=0",
            f"threads={b.threads}",
            f"seed={seed}",
            *overrides,
        ]

    def _candidate_key(
        self, feats: Features, overrides: Sequence[str], seed: int
    ) -> tuple[Any, dict[str, Any], Path]:
        """(training config, cache key, artifact path) of a candidate model."""
        from funnelrec.candidates import load_training_config

        cfg = load_training_config(None, self.candidate_overrides(overrides, seed))
        key = {"features": feats.path.name, "config": asdict(cfg)}
        return cfg, key, self.shared / "models" / f"cand-{stable_hash(key)}"

    def candidate_trained(self, feats: Features, overrides: Sequence[str], seed: int) -> bool:
        """Whether `candidate_run` would find the model done."""
        return _trained(self._candidate_key(feats, overrides, seed)[2])

    def candidates(self, feats: Features, overrides: Sequence[str] = (), seed: int = 0) -> Path:
        """A candidate model trained on `feats` with the budget + overrides (trained once)."""
        return Path(self.candidate_run(feats, overrides, seed)["artifact"])

    def candidate_run(
        self, feats: Features, overrides: Sequence[str] = (), seed: int = 0
    ) -> dict[str, Any]:
        """Train (or find) a candidate model; returns its training summary and path."""
        from funnelrec.candidates import fit_candidates

        cfg, key, art = self._candidate_key(feats, overrides, seed)
        summary_file = art.with_suffix(".json")
        if _trained(art):
            return dict(json.loads(summary_file.read_text()))
        self.console.print(f"[dim]train candidates {' '.join(overrides) or '(base)'} seed={seed}")
        timer = Timer()
        result = fit_candidates(feats, art, cfg, force=True, progress=self.progress)
        summary = {
            "artifact": str(art),
            "key": key,
            "steps": result.steps,
            "examples": result.examples,
            "examples_per_s": result.examples_per_s,
            "final_loss": result.loss,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
            "valid_history": result.history,
            **timer.seconds(),
        }
        write_json_atomic(summary_file, summary)
        return summary

    # ------------------------------------------------------------------ rankers

    def _ranker_key(
        self, feats: Features, overrides: Sequence[str], seed: int
    ) -> tuple[Any, dict[str, Any], Path]:
        """(training config, cache key, artifact path) of a ranker."""
        from funnelrec.ranking.training import load_ranker_train_config

        b = self.budget
        base = [
            f"train.batch_size={b.rank_batch}",
            f"train.lr={b.rank_lr}",
            *self.convergence("ranker"),
            "train.checkpoint_every=0",
            "train.checkpoint_every_s=0",
            f"train.threads={b.threads}",
            f"train.seed={seed}",
        ]
        cfg = load_ranker_train_config(None, [*base, *overrides])
        key = {"features": feats.path.name, "config": asdict(cfg)}
        return cfg, key, self.shared / "models" / f"rank-{stable_hash(key)}"

    def ranker_trained(self, feats: Features, overrides: Sequence[str], seed: int) -> bool:
        """Whether `ranker_run` would find the ranker done."""
        return _trained(self._ranker_key(feats, overrides, seed)[2])

    def ranker_run(
        self, feats: Features, overrides: Sequence[str] = (), seed: int = 0
    ) -> dict[str, Any]:
        """Train (or find) a ranker and its test-split metrics (`evaluate_ranker`)."""
        from funnelrec.ranking.training import evaluate_ranker, train_ranker

        cfg, key, art = self._ranker_key(feats, overrides, seed)
        summary_file = art.with_suffix(".json")
        if _trained(art):
            return dict(json.loads(summary_file.read_text()))
        self.console.print(f"[dim]train ranker {' '.join(overrides)} seed={seed}")
        timer = Timer()
        training = train_ranker(feats.path, art, cfg, force=True, progress=self.progress)
        train_s = timer.seconds()
        metrics = evaluate_ranker(
            art, feats.path, split="test", out=art / "eval-test.json", show=False
        )
        summary = {
            "artifact": str(art),
            "key": key,
            "training": training,
            "train_seconds": train_s,
            "test": metrics,
            "test_users": ranker_user_losses(art, feats),
            **timer.seconds(),
        }
        write_json_atomic(summary_file, summary)
        return summary

    def funnel(self, feats: Features, cand: str, ranker: str) -> Path:
        """The packaged funnel (`funnelrec package`) of a candidate model and a ranker
        trained on `feats` (built once)."""
        from funnelrec.serving.package import package

        out = self.shared / "models" / f"funnel-{stable_hash([cand, ranker])}"
        if not (out / "manifest.json").exists():
            package(feats.path, cand, ranker, out, data=self.data(), force=True,
                    progress=self.progress)  # fmt: skip
        return out

    # ------------------------------------------------------------------ parallel arms

    def parallel(self, jobs: Sequence[Job]) -> None:
        """Run every job (fn, args) as fn(harness, *args), `budget.workers` processes at a
        time, for what it leaves in the cache: an experiment then makes the same calls in
        order and finds every result done. fn must be a module-level function and args
        plain values (paths, not open Features); jobs must not share cached work (two
        would compute it at once); the first jobs start first (put the longest there).
        One worker (or one job): in this process."""
        todo = list(dict.fromkeys((fn, _frozen(args)) for fn, args in jobs))
        workers = min(self.budget.workers, len(todo))
        if workers <= 1:
            for fn, args in todo:
                fn(self, *_thawed(args))
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.data()  # shared inputs exist before the workers start
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_worker_init, initargs=(self.options,)
        ) as pool:
            futures = [pool.submit(_worker_run, fn, _thawed(args)) for fn, args in todo]
            for future in futures:
                future.result()

    # ------------------------------------------------------------------ documents

    def experiment_dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def settings(self) -> dict[str, Any]:
        o = self.options
        return {
            "preset": o.preset,
            "seeds": o.seeds,
            "world_seed": o.world_seed,
            "budget": asdict(self.budget),
            "budget_overrides": list(o.budget),
        }

    def finish(self, name: str, doc: dict[str, Any], timer: Timer) -> Path:
        """Write OUT/NAME/metrics.json (+ run.json, figures, README.md); returns the dir.

        doc: the experiment's document: title, claim, protocol, tables, figures, verdict,
        results (see `report` for the shape it renders)."""
        out = self.experiment_dir(name)
        full = {
            "format_version": DOC_FORMAT_VERSION,
            "kind": DOC_KIND,
            "experiment": name,
            **doc,
            "settings": self.settings(),
        }
        write_figures(full, out)
        write_json_atomic(out / METRICS_FILE, full)
        budget = "".join(f" {b}" for b in self.options.budget)
        run = {
            "format_version": DOC_FORMAT_VERSION,
            "command": f"funnelrec experiment {name} --preset {self.options.preset} "
            f"--seeds {self.options.seeds} --out {self.root}{budget}",
            "argv": sys.argv,
            "experiment": name,
            "settings": self.settings(),
            "data": self.data_info(),
            "environment": environment(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": timer.seconds(),
        }
        write_json_atomic(out / RUN_FILE, run)
        return out


def _trained(art: Path) -> bool:
    """A model artifact and its summary beside it are both written (the summary last)."""
    return (art / "config.json").exists() and art.with_suffix(".json").exists()


_WORKER: Harness | None = None


def _worker_init(options: ExperimentOptions) -> None:
    global _WORKER
    _WORKER = Harness(replace(options, progress=False), Console())
    torch.set_num_threads(_WORKER.budget.threads)


def _worker_run(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    assert _WORKER is not None
    fn(_WORKER, *args)


def _frozen(args: Sequence[Any]) -> tuple[Any, ...]:
    """Arguments as a hashable tuple (lists become tuples), to drop repeated jobs."""
    return tuple(tuple(a) if isinstance(a, list) else a for a in args)


def _thawed(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(list(a) if isinstance(a, tuple) else a for a in args)


def ranker_user_losses(art: Path, feats: Features) -> dict[str, list[float]]:
    """Each test user's part of the ranker's weighted per-user loss: for the users with a
    clicked x unclicked pair on a test page, the mispredicted and the total watch time of
    their pairs (`ranking.metrics.weighted_per_user_loss` is sum(wrong) / sum(total)), so
    that two rankers' losses can be compared user by user."""
    from funnelrec.ranking.metrics import pair_counts
    from funnelrec.ranking.model import load_ranker
    from funnelrec.ranking.training import score_split

    p = score_split(load_ranker(art), feats, "test", show=False)
    c = pair_counts(p.logit, p.label, p.user_id, p.request_id)
    t = np.where(np.asarray(p.label) > 0.5, np.asarray(p.watch_time, dtype=np.float64), 0.0)
    users, inv = np.unique(np.asarray(p.user_id, dtype=np.int64), return_inverse=True)
    total = np.bincount(inv, t * c.negatives, len(users))
    wrong = np.bincount(inv, t * (c.higher + 0.5 * c.ties), len(users))
    keep = total > 0
    return {
        "user_id": users[keep].tolist(),
        "wrong": wrong[keep].tolist(),
        "total": total[keep].tolist(),
    }


def read_doc(path: Path) -> dict[str, Any]:
    """An experiment's metrics.json, checked for kind and format version."""
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from None
    if doc.get("kind") != DOC_KIND or doc.get("format_version") != DOC_FORMAT_VERSION:
        raise ArtifactError(f"{path}: not a funnelrec experiment document (format 1)")
    return doc
