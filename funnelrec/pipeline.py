"""The whole funnel in one command: `funnelrec run CONFIG`.

    data (simulate or import) -> features -> train candidates -> index -> train ranker
    -> evaluate -> package

Every stage writes one directory inside the run directory (the index inside the
candidate artifact) and a stamp (`stamps/NAME.json`)
holding the hash of its own settings and of the stamps of the stages it reads. A stage
whose output exists and whose stamp matches is skipped, so re-running a config after an
interruption, or after changing only the ranker's settings, redoes only what changed.

    # configs/demo.toml
    out = "runs/demo"
    [data]
    preset = "small"
    [ranker]
    overrides = ["train.max_steps=400"]
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console

from funnelrec.ann.index import ItemIndex
from funnelrec.candidates import (
    INDEX_DIR,
    fit_candidates,
    load_candidate_model,
    load_item_embeddings,
    load_training_config,
    split_user_vectors,
)
from funnelrec.candidates.metrics import ModelScorer, PopularityScorer, evaluate_split
from funnelrec.config import load_config
from funnelrec.data import loaders
from funnelrec.data.dataset import write_json_atomic
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.ranking.training import evaluate_ranker, load_ranker_train_config, train_ranker
from funnelrec.serving.package import PackageConfig, package
from funnelrec.simulate import generate, preset_config


@dataclass(frozen=True)
class DataStage:
    """source: "simulate" (preset, seed, overrides) or "import" (format, src)."""

    source: Literal["simulate", "import"] = "simulate"
    preset: str = "small"
    seed: int = 0
    overrides: tuple[str, ...] = ()
    format: str = ""  # import: movielens, kuairand or sequence
    src: str = ""


@dataclass(frozen=True)
class StageSettings:
    """A stage's TOML config file (optional, relative to the run config) and overrides."""

    config: str = ""
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeatureStage:
    """split "time" (default) gives the ranker held-out pages with clicks; "last" is the
    leave-last-out protocol of the candidate benchmarks, whose ranking test split has
    no clicks (nothing shown after a user's last watch was watched)."""

    split: Literal["last", "time"] = "time"
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class IndexStage:
    kind: str = ""  # "" = chosen by corpus size (exact, or hnsw for large corpora)
    target_recall: float = 0.95


@dataclass(frozen=True)
class RunConfig:
    """A whole run; every field has a default, so an empty file runs the small world."""

    out: str = "runs/default"
    data: DataStage = field(default_factory=DataStage)
    features: FeatureStage = field(default_factory=FeatureStage)
    candidates: StageSettings = field(default_factory=StageSettings)
    index: IndexStage = field(default_factory=IndexStage)
    ranker: StageSettings = field(default_factory=StageSettings)
    # Score only the first N held-out next watches of the candidate test split (None: all).
    evaluate_examples: int | None = None
    progress: bool = True


# The demo: the small world, models sized to finish the whole run in a few minutes on
# two cores. The candidate model is the paper's depth-2 tower at d = 64.
DEMO = RunConfig(
    out="runs/demo",
    data=DataStage(preset="small"),
    features=FeatureStage(split="time"),
    candidates=StageSettings(
        overrides=("dim=64", "depth=2", "num_negatives=2048", "epochs=2", "patience=1")
    ),
    ranker=StageSettings(
        overrides=("model.tower=512,256", "train.epochs=1", "train.max_steps=600")
    ),
    evaluate_examples=20_000,
)


def load_run_config(path: Path | str | None, overrides: list[str] | None = None) -> RunConfig:
    cfg = load_config(RunConfig, path, overrides or [])
    if path is not None:
        # Stage config files are relative to the run config's directory.
        base = Path(path).resolve().parent
        cfg = _resolve_paths(cfg, base)
    return cfg


def _resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    def fix(s: StageSettings) -> StageSettings:
        if s.config and not Path(s.config).is_absolute():
            return StageSettings(str(base / s.config), s.overrides)
        return s

    return RunConfig(
        out=cfg.out,
        data=cfg.data,
        features=cfg.features,
        candidates=fix(cfg.candidates),
        index=cfg.index,
        ranker=fix(cfg.ranker),
        evaluate_examples=cfg.evaluate_examples,
        progress=cfg.progress,
    )


@dataclass
class RunResult:
    out: Path
    ran: list[str]
    skipped: list[str]
    seconds: dict[str, float]
    metrics: dict[str, Any]

    @property
    def artifact(self) -> Path:
        return self.out / "artifact"


def run(cfg: RunConfig, *, console: Console | None = None) -> RunResult:
    """Run every stage of `cfg` that is not up to date; returns what ran and the metrics."""
    console = console or Console()
    out = Path(cfg.out)
    (out / "stamps").mkdir(parents=True, exist_ok=True)
    result = RunResult(out=out, ran=[], skipped=[], seconds={}, metrics={})
    stamps: dict[str, str] = {}

    def stage(
        name: str,
        settings: Any,
        reads: list[str],
        body: Callable[[Path], None],
        target: Path | None = None,
    ) -> None:
        target = target or out / name
        key = _hash({"settings": settings, "reads": {r: stamps[r] for r in reads}})
        stamp_file = out / "stamps" / f"{name}.json"
        stamps[name] = key
        current = target.exists() and stamp_file.exists()
        if current and json.loads(stamp_file.read_text()).get("key") == key:
            result.skipped.append(name)
            console.print(f"[dim]{name}: up to date, skipped[/dim]")
            return
        console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        stamp_file.unlink(missing_ok=True)  # the output is not current until the stage ends
        body(target)
        seconds = time.perf_counter() - t0
        result.seconds[name] = seconds
        result.ran.append(name)
        write_json_atomic(stamp_file, {"key": key, "seconds": seconds})

    stage("data", asdict(cfg.data), [], lambda t: _data(cfg, t))
    features = {**asdict(cfg.features), "overrides": _features_overrides(cfg)}
    stage("features", features, ["data"], lambda t: _features(cfg, out, t))
    stage("candidates", _settings(cfg.candidates), ["features"], lambda t: _candidates(cfg, out, t))
    # The index lives inside the candidate artifact (as `funnelrec index build` puts it).
    stage(
        "index",
        asdict(cfg.index),
        ["candidates"],
        lambda t: _index(cfg, out, t),
        target=out / "candidates" / INDEX_DIR,
    )
    stage("ranker", _settings(cfg.ranker), ["features"], lambda t: _ranker(cfg, out, t))
    stage(
        "evaluation",
        {"examples": cfg.evaluate_examples},
        ["index", "ranker"],
        lambda t: _evaluate(out, t, cfg.evaluate_examples),
    )
    stage("artifact", {}, ["index", "ranker"], lambda t: _package(out, t))
    result.metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    return result


def _settings(s: StageSettings) -> dict[str, Any]:
    text = Path(s.config).read_text() if s.config else ""
    return {"config": text, "overrides": list(s.overrides)}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data(cfg: RunConfig, target: Path) -> None:
    d = cfg.data
    if d.source == "simulate":
        sim = preset_config(d.preset, list(d.overrides))
        generate(sim, d.seed, target, preset=d.preset, force=True, progress=cfg.progress)
        return

    importers = {
        "movielens": loaders.import_movielens,
        "kuairand": loaders.import_kuairand,
        "sequence": loaders.import_sequence,
    }
    if d.format not in importers:
        raise FunnelrecError(
            f"data.format '{d.format}': expected one of {', '.join(importers)} for source=import"
        )
    if not d.src:
        raise FunnelrecError("data.src: the file or directory to import is not set")
    importers[d.format](Path(d.src), target, force=True)


def _features_overrides(cfg: RunConfig) -> list[str]:
    """The FeaturesConfig overrides of the run: the stage's own, after the simulated
    world's default."""
    # The simulator logs its logging policy's candidate sources, not the ones the
    # Recommender serves: as features they cost served watch time (docs/simulator.md).
    world = ["candidate_columns=false"] if cfg.data.source == "simulate" else []
    return [*world, *cfg.features.overrides]


def _features(cfg: RunConfig, out: Path, target: Path) -> None:

    fc = load_config(FeaturesConfig, None, _features_overrides(cfg))
    build_features(
        out / "data", target, split=cfg.features.split, config=fc, force=True, progress=cfg.progress
    )


def _candidates(cfg: RunConfig, out: Path, target: Path) -> None:

    s = cfg.candidates
    tc = load_training_config(s.config or None, list(s.overrides))
    fit_candidates(out / "features", target, tc, force=True, progress=cfg.progress)


def _index(cfg: RunConfig, out: Path, target: Path) -> None:
    """An ANN index over the item embeddings; its recall is measured against exact search
    on real user vectors of the validation split and tuned to the target."""

    emb_t, ids_t = load_item_embeddings(out / "candidates")
    emb = np.ascontiguousarray(emb_t.numpy(), dtype=np.float32)
    queries = split_user_vectors(
        out / "candidates", out / "features", "valid", limit=2000
    ).vectors.numpy()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    kind = cfg.index.kind or None
    index = ItemIndex.build(emb, ids_t.numpy(), kind, progress=cfg.progress)  # type: ignore[arg-type]
    if len(queries) and index.kind != "exact":
        index.tune(queries, 100, cfg.index.target_recall, embeddings=emb, query_source="valid")
    elif len(queries):
        index.recall_vs_exact(queries, 100, embeddings=emb, query_source="valid")
    index.save(target, force=True)


def _ranker(cfg: RunConfig, out: Path, target: Path) -> None:

    s = cfg.ranker
    rc = load_ranker_train_config(s.config or None, list(s.overrides))
    train_ranker(out / "features", target, rc, force=True, progress=cfg.progress)


def _evaluate(out: Path, target: Path, limit: int | None) -> None:

    target.mkdir(parents=True, exist_ok=True)
    feats = Features.open(out / "features")
    report = evaluate_split(
        {
            "model": ModelScorer(load_candidate_model(out / "candidates")),
            "popularity": PopularityScorer(feats.item_counts()),
        },
        feats,
        "test",
        ks=(10, 50, 100),
        limit=limit,
    )
    ranking = evaluate_ranker(
        out / "ranker", out / "features", out=target / "ranker.json", show=False
    )
    metrics = {
        "candidates": report.metrics,
        "candidates_protocol": {"split": "test", "examples": report.queries},
        "ranking": ranking,
    }
    write_json_atomic(target / "metrics.json", metrics)


def _package(out: Path, target: Path) -> None:

    package(
        features=out / "features",
        candidates=out / "candidates",
        ranker=out / "ranker",
        data=out / "data",
        out=target,
        force=True,
        progress=False,
    )


# --------------------------------------------------------------------------- tiny world


def build_tiny_artifact(
    root: Path | str,
    *,
    seed: int = 0,
    steps: int = 100,
    simulate: Sequence[str] = (),
    config: PackageConfig | None = None,
    threads: int | None = 1,
) -> Path:
    """Run the real pipeline on the tiny simulated world and package it; returns ROOT/art.

    Writes ROOT/data (simulate, preset "tiny" with `simulate` overrides), ROOT/feat
    (leave-last-out), ROOT/cand (candidate model, dim 16, `steps` steps), ROOT/ranker (a
    32-wide ranker, `steps` steps) and ROOT/art. `threads`: torch threads while training
    (process-wide; 1 is fastest for these tiny models on a busy machine). Quick enough to
    be a test fixture for everything that serves (docs/simulator.md, "Presets"), not a
    model worth serving.
    """
    root = Path(root)
    generate(preset_config("tiny", list(simulate)), seed=seed, out=root / "data", progress=False)
    build_features(
        root / "data",
        root / "feat",
        split="last",
        # The logging policy's sources are not the served ones (docs/simulator.md).
        config=FeaturesConfig(n_quantiles=100, seed=seed, candidate_columns=False),
        progress=False,
    )
    cand_cfg = load_training_config(
        None,
        [
            "dim=16",
            "num_negatives=256",
            "batch_size=256",
            f"max_steps={steps}",
            "patience=0",
            "valid_examples=200",
            f"seed={seed}",
            *([f"threads={threads}"] if threads else []),
        ],
    )
    fit_candidates(root / "feat", root / "cand", cand_cfg, progress=False)
    rank_cfg = load_ranker_train_config(
        None,
        [
            "model.tower=32",
            "train.batch_size=256",
            f"train.max_steps={steps}",
            f"train.seed={seed}",
            "validate=false",
            *([f"train.threads={threads}"] if threads else []),
        ],
    )
    train_ranker(root / "feat", root / "ranker", rank_cfg, progress=False)
    return package(
        root / "feat", root / "cand", root / "ranker", root / "art", config=config, progress=False
    )
