"""The experiment harness: one simulated world, cached features and models, provenance.

    h = Harness(ExperimentOptions(preset="small", seeds=2, out=Path("runs/experiments")))
    feats = h.features("time")                          # built once, shared
    art = h.candidates(feats, ["depth=3"], seed=0)      # trained once per settings
    ranks = h.candidate_ranks(art, feats)               # held-out ranks, cached

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
Every arm of an experiment gets the same `Budget` (steps, batch, evaluation sample):
the comparisons are at equal compute, which is stated in each experiment's protocol.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
    """Compute per arm of an experiment (every arm of one experiment gets the same).

    cand_steps:     candidate-model training steps of cand_batch examples
    cand_dim:       d, the user vector / item embedding width (paper: 256)
    cand_token_dim: search token embedding width (the token table is the largest)
    cand_negatives: sampled negatives per batch of the default model
    cand_lr:        learning rate (AdamW), high because the step budgets are short
    rank_steps, rank_batch, rank_lr: ranker training
    eval_examples:  held-out next watches scored per candidate model: a random sample of
                    the test split, the same for every model (None = all)
    ab_users:       users served by every policy in the simulated A/B test
    ab_k:           slate size of the A/B test
    mf_iterations:  BPR epochs (ALS: at most 15 sweeps)
    negatives:      the grid of the `negatives` experiment
    depths:         the grid of the `depth-features` experiment
    threads:        torch threads
    """

    cand_steps: int = 100
    cand_batch: int = 1024
    cand_dim: int = 64
    cand_token_dim: int = 16
    cand_negatives: int = 1024
    cand_lr: float = 0.005
    rank_steps: int = 70
    rank_batch: int = 1024
    rank_lr: float = 0.001
    eval_examples: int | None = 3000
    ab_users: int = 600
    ab_k: int = 10
    mf_iterations: int = 20
    negatives: tuple[int, ...] = (64, 256, 1024, 4096, 8192)
    depths: tuple[int, ...] = (0, 1, 2, 3, 4)
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("cand_steps", "cand_batch", "cand_dim", "rank_steps", "rank_batch"):
            if getattr(self, name) < 1:
                raise FunnelrecError(f"budget: {name} must be >= 1")
        if self.ab_users < 1 or self.ab_k < 1 or self.threads < 1:
            raise FunnelrecError("budget: ab_users, ab_k and threads must be >= 1")
        if self.eval_examples is not None and self.eval_examples < 1:
            raise FunnelrecError("budget: eval_examples must be >= 1 or none")
        if not self.negatives or not self.depths:
            raise FunnelrecError("budget: negatives and depths need at least one value")


# Budgets per preset. small: sized so that `funnelrec experiment paper` (34 candidate
# models, 9 rankers, 4 baselines, the A/B replay) stays well inside 30 minutes on two
# idle cores (measured: docs/results.md). Each candidate model sees 400 x 1,024 examples,
# about one epoch of the capped examples, and each ranker 250 x 1,024 impressions (a tenth
# of an epoch): short of convergence, which every verdict takes into account.
BUDGETS: dict[str, Budget] = {
    "tiny": Budget(
        cand_steps=20,
        cand_batch=256,
        cand_dim=16,
        cand_token_dim=8,
        cand_negatives=128,
        cand_lr=0.01,
        rank_steps=10,
        rank_batch=512,
        eval_examples=300,
        ab_users=40,
        mf_iterations=5,
        negatives=(16, 128),
        depths=(0, 2),
        threads=1,
    ),
    "small": Budget(cand_steps=400, rank_steps=250),
    "medium": Budget(cand_steps=1000, rank_steps=1000, eval_examples=20_000, ab_users=5000),
}
# A "-v2" world (users whose interests drift, docs/simulator.md) is the same size as its
# base preset, so it gets the same budget.
BUDGETS.update({f"{name}-v2": budget for name, budget in list(BUDGETS.items())})


@dataclass(frozen=True)
class ExperimentOptions:
    """What `funnelrec experiment NAME` was asked for.

    preset:     simulated world (simulate.PRESETS) and default budget (BUDGETS)
    seeds:      training seeds per arm (0..seeds-1); the world and features stay fixed
    out:        root directory of experiments and their shared cache
    world_seed: seed of the simulated world
    budget:     `key=value` overrides of the preset's Budget, e.g. cand_steps=40
    progress:   progress bars
    """

    preset: str = "small"
    seeds: int = 1
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

    def candidate_overrides(self, overrides: Sequence[str], seed: int) -> list[str]:
        """The budget's candidate settings, then `overrides` (CandidateTrainingConfig keys)."""
        b = self.budget
        # epochs is only a bound: max_steps ends training, so no epoch-end validation runs
        # unless an epoch is shorter than the budget (tiny data); then the best epoch is kept.
        return [
            f"dim={b.cand_dim}",
            f"token_dim={b.cand_token_dim}",
            "depth=2",
            f"num_negatives={b.cand_negatives}",
            f"batch_size={b.cand_batch}",
            f"lr={b.cand_lr}",
            f"max_steps={b.cand_steps}",
            "epochs=1000",
            "patience=0",
            "checkpoint_every=0",
            f"threads={b.threads}",
            f"seed={seed}",
            f"valid_examples={b.eval_examples or 20_000}",
            *overrides,
        ]

    def candidates(self, feats: Features, overrides: Sequence[str] = (), seed: int = 0) -> Path:
        """A candidate model trained on `feats` with the budget + overrides (trained once)."""
        return Path(self.candidate_run(feats, overrides, seed)["artifact"])

    def candidate_run(
        self, feats: Features, overrides: Sequence[str] = (), seed: int = 0
    ) -> dict[str, Any]:
        """Train (or find) a candidate model; returns its training summary and path."""
        from funnelrec.candidates import fit_candidates, load_training_config

        cfg = load_training_config(None, self.candidate_overrides(overrides, seed))
        key = {"features": feats.path.name, "config": asdict(cfg)}
        h = stable_hash(key)
        art = self.shared / "models" / f"cand-{h}"
        summary_file = art.with_suffix(".json")
        if (art / "config.json").exists() and summary_file.exists():
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
            **timer.seconds(),
        }
        write_json_atomic(summary_file, summary)
        return summary

    # ------------------------------------------------------------------ rankers

    def ranker_run(
        self, feats: Features, overrides: Sequence[str] = (), seed: int = 0
    ) -> dict[str, Any]:
        """Train (or find) a ranker and its test-split metrics (`evaluate_ranker`)."""
        from funnelrec.ranking.training import (
            evaluate_ranker,
            load_ranker_train_config,
            train_ranker,
        )

        b = self.budget
        base = [
            f"train.max_steps={b.rank_steps}",
            "train.epochs=1000",
            f"train.batch_size={b.rank_batch}",
            f"train.lr={b.rank_lr}",
            "train.checkpoint_every=0",
            f"train.threads={b.threads}",
            f"train.seed={seed}",
            # validation would score the whole validation split; at a fixed step budget
            # there is no epoch to choose
            "validate=false",
        ]
        cfg = load_ranker_train_config(None, [*base, *overrides])
        key = {"features": feats.path.name, "config": asdict(cfg)}
        art = self.shared / "models" / f"rank-{stable_hash(key)}"
        summary_file = art.with_suffix(".json")
        if (art / "config.json").exists() and summary_file.exists():
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
            **timer.seconds(),
        }
        write_json_atomic(summary_file, summary)
        return summary

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
        seeds_flag = f" --seeds {self.options.seeds}" if self.options.seeds != 1 else ""
        budget = "".join(f" {b}" for b in self.options.budget)
        run = {
            "format_version": DOC_FORMAT_VERSION,
            "command": f"funnelrec experiment {name} --preset {self.options.preset}"
            f"{seeds_flag} --out {self.root}{budget}",
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


def read_doc(path: Path) -> dict[str, Any]:
    """An experiment's metrics.json, checked for kind and format version."""
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from None
    if doc.get("kind") != DOC_KIND or doc.get("format_version") != DOC_FORMAT_VERSION:
        raise ArtifactError(f"{path}: not a funnelrec experiment document (format 1)")
    return doc
