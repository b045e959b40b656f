"""The whole funnel in one command: `funnelrec run CONFIG`; and its daily update,
`funnelrec update` (`update`: append -> features update -> warm starts -> index -> package,
docs/freshness.md).

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.markup import escape

from funnelrec.ann.index import ItemIndex
from funnelrec.candidates import (
    INDEX_DIR,
    CandidateTrainingConfig,
    fit_candidates,
    load_candidate_model,
    load_item_embeddings,
    load_training_config,
    split_user_vectors,
)
from funnelrec.candidates.metrics import ModelScorer, PopularityScorer, evaluate_split
from funnelrec.candidates.training import CandidateTrainConfig
from funnelrec.config import load_config
from funnelrec.data import loaders
from funnelrec.data.append import append_events, parse_new_logs
from funnelrec.data.dataset import MANIFEST, Dataset, write_json_atomic
from funnelrec.data.loaders.mapping import COLUMN_KEYS
from funnelrec.errors import ArtifactError, FunnelrecError
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.update import FeaturesUpdate
from funnelrec.ranking.training import (
    RANKER_TRAIN_DEFAULTS,
    RankerTrainConfig,
    evaluate_ranker,
    load_ranker_train_config,
    train_ranker,
)
from funnelrec.serving.package import PackageConfig, package
from funnelrec.serving.state import read_live_items, reserve_live_item_ids
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
    result = RunResult(out=out, ran=[], skipped=[], seconds={}, metrics={})
    stage = _Stages(out, console, result.ran, result.skipped, result.seconds)

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


class _Stages:
    """Runs the stages of a run directory `out`, each at most once per settings.

    A stage's stamp (`out/stamps/NAME.json`) holds the hash of its settings and of the
    stamps of the stages it reads, and what its body reported; a stage whose output
    exists and whose stamp matches is skipped. The stamp is removed before the body runs
    and written after it, so an interrupted stage runs again.
    """

    def __init__(
        self,
        out: Path,
        console: Console,
        ran: list[str],
        skipped: list[str],
        seconds: dict[str, float],
    ) -> None:
        self.out, self.console = out, console
        self.ran, self.skipped, self.seconds = ran, skipped, seconds
        self.keys: dict[str, str] = {}
        # what each stage reported, and its seconds when it ran (also for skipped ones)
        self.reports: dict[str, dict[str, Any]] = {}
        self.stamped_seconds: dict[str, float] = {}
        (out / "stamps").mkdir(parents=True, exist_ok=True)

    def __call__(
        self,
        name: str,
        settings: Any,
        reads: list[str],
        body: Callable[[Path], dict[str, Any] | None],
        target: Path | None = None,
    ) -> None:
        target = target or self.out / name
        key = _hash({"settings": settings, "reads": {r: self.keys[r] for r in reads}})
        stamp_file = self.out / "stamps" / f"{name}.json"
        self.keys[name] = key
        stamp = json.loads(stamp_file.read_text()) if stamp_file.exists() else {}
        if target.exists() and stamp.get("key") == key:
            self.skipped.append(name)
            self.stamped_seconds[name] = float(stamp.get("seconds", 0.0))
            self.reports[name] = stamp.get("report") or {}
            self.console.print(f"[dim]{name}: up to date, skipped[/dim]")
            return
        self.console.rule(f"[bold]{name}")
        t0 = time.perf_counter()
        stamp_file.unlink(missing_ok=True)  # the output is not current until the stage ends
        report = body(target) or {}
        seconds = time.perf_counter() - t0
        self.seconds[name] = self.stamped_seconds[name] = seconds
        self.ran.append(name)
        self.reports[name] = report
        self.console.print(f"{name}: {seconds:.1f} s")
        write_json_atomic(stamp_file, {"key": key, "seconds": seconds, "report": report})


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

    tc = update_candidates_config(cfg.candidates)
    fit_candidates(out / "features", target, tc, force=True, progress=cfg.progress)


def _index(cfg: RunConfig, out: Path, target: Path) -> None:
    _build_index(out / "candidates", out / "features", cfg.index, target, progress=cfg.progress)


def _build_index(
    candidates: Path, features: Path, settings: IndexStage, target: Path, *, progress: bool
) -> None:
    """An ANN index over the item embeddings; its recall is measured against exact search
    on real user vectors of the validation split and tuned to the target."""

    emb_t, ids_t = load_item_embeddings(candidates)
    emb = np.ascontiguousarray(emb_t.numpy(), dtype=np.float32)
    queries = split_user_vectors(candidates, features, "valid", limit=2000).vectors.numpy()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    kind = settings.kind or None
    index = ItemIndex.build(emb, ids_t.numpy(), kind, progress=progress)  # type: ignore[arg-type]
    if len(queries) and index.kind != "exact":
        index.tune(queries, 100, settings.target_recall, embeddings=emb, query_source="valid")
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


def _package(out: Path, target: Path, *, data: Path | None = None) -> None:

    package(
        features=out / "features",
        candidates=out / "candidates",
        ranker=out / "ranker",
        data=data or out / "data",
        out=target,
        force=True,
        progress=False,
    )


# --------------------------------------------------------------------------- daily update


# What a warm start trains by default, under its TOML file and overrides (`UpdateConfig`
# candidates and ranker): a day's worth of news, not a run to convergence. Chosen on the
# warm starts' own validation metrics (docs/freshness.md, "One command"). The candidate
# model: three passes over the new day and the replayed share, in batches of the loop's
# usual 1024 (the fresh run's rule of about 32 steps per epoch gives a day's examples
# small batches, each paying for its sampled negatives); its validation recall@100 was
# that of three passes over ten times the replay. Validation scores a quarter of the examples
# a fresh run does: three full evaluations would cost about as much as the training.
# The ranker: one pass, its validation loss moved within its noise whatever it trained.
UPDATE_CANDIDATES = CandidateTrainingConfig(
    train=CandidateTrainConfig(epochs=3, patience=0, batch_size=1024), valid_examples=5_000
)
UPDATE_RANKER = RankerTrainConfig(train=replace(RANKER_TRAIN_DEFAULTS, epochs=1))


@dataclass(frozen=True)
class UpdateConfig:
    """A daily update (`update`): the settings of its steps; every field has a default.

    replay, refit_normalizers, since: the features update's (`FeaturesUpdate`); replay is
        the share of older training examples the warm starts see beside the new period's
        [0.01, chosen with UPDATE_CANDIDATES]
    allow_late: the append's: accept (and count) events older than the dataset's end
    candidates, ranker: the warm starts' training settings (a TOML file and overrides, as
        `funnelrec train ... --config`), applied over the update's own defaults
        (`UPDATE_CANDIDATES`, `UPDATE_RANKER`: three and one epochs); the model configs
        are the previous artifacts'
    index: the index built over the new item embeddings
    """

    replay: float = 0.01
    refit_normalizers: bool = False
    since: int | None = None
    allow_late: bool = False
    candidates: StageSettings = field(default_factory=StageSettings)
    index: IndexStage = field(default_factory=IndexStage)
    ranker: StageSettings = field(default_factory=StageSettings)
    progress: bool = True


# The steps of an update, in order, and the parts of the previous run it continues from.
UPDATE_STEPS = ("append", "features", "candidates", "index", "ranker", "artifact")
PREVIOUS_PARTS = ("features", "candidates", "ranker")
UPDATE_REPORT = "update.json"


def load_update_config(
    path: Path | str | None, overrides: Sequence[str] | None = None
) -> UpdateConfig:
    cfg = load_config(UpdateConfig, path, list(overrides or []))
    if path is None:
        return cfg
    base = Path(path).resolve().parent

    def fix(s: StageSettings) -> StageSettings:
        if s.config and not Path(s.config).is_absolute():
            return StageSettings(str(base / s.config), s.overrides)
        return s

    return replace(cfg, candidates=fix(cfg.candidates), ranker=fix(cfg.ranker))


def split_update_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line arguments -> (new logs, config overrides).

    `TABLE=PATH` (TABLE a table of the logs: watches, impressions, ...) and a bare PATH
    are logs; any other `KEY=VALUE` is an override. A watches file whose name holds "="
    is given as `watches=PATH`.
    """
    logs, overrides = [], []
    for arg in args:
        key, sep, _ = arg.partition("=")
        if sep and key not in COLUMN_KEYS:
            overrides.append(arg)
        else:
            logs.append(arg)
    return logs, overrides


@dataclass
class UpdateResult:
    """What an update ran and skipped, each step's seconds (a skipped step's from when it
    ran) and the report written to OUT/update.json."""

    out: Path
    ran: list[str]
    skipped: list[str]
    seconds: dict[str, float]
    report: dict[str, Any]

    @property
    def artifact(self) -> Path:
        return self.out / "artifact"


def check_previous(previous: Path | str) -> Path:
    """The previous day's run (or update) directory, checked to hold what an update
    continues from."""
    prev = Path(previous)
    if not prev.is_dir():
        raise FunnelrecError(f"{prev}: no such directory (the previous day's run or update)")
    missing = [p for p in PREVIOUS_PARTS if not (prev / p).is_dir()]
    if missing:
        raise FunnelrecError(
            f"{prev}: no {', '.join(f'{p}/' for p in missing)}: an update continues from a "
            f"`funnelrec run` or `funnelrec update` directory holding "
            f"{', '.join(f'{p}/' for p in PREVIOUS_PARTS)}"
        )
    return prev


def update(
    dataset: Path | str,
    previous: Path | str,
    out: Path | str,
    new_logs: Sequence[str] | dict[str, list[str]] | None = None,
    *,
    mapping: Path | str | None = None,
    config: UpdateConfig | None = None,
    console: Console | None = None,
    live_items: Path | str | None = None,
) -> UpdateResult:
    """The daily update of a served funnel, every step not yet done:

        append NEW_LOGS to DATASET -> update PREVIOUS/features -> warm-start the candidate
        model and the ranker from PREVIOUS's -> index -> package OUT/artifact

    `previous` is yesterday's run or update directory, `out` today's (its layout is that
    of `run`, so tomorrow's update continues from it). No `new_logs` nor `mapping`: the
    dataset has been appended already. `live_items`: a server's state database, whose
    items added through POST /v1/items the append merges into the catalogue (with no
    logs, they are the appended period). Steps are stamped as `run`'s stages are: re-running
    an interrupted update does only what is left. The artifact is built aside and renamed
    into place, so a server reloading it only ever sees a complete one.
    Writes OUT/update.json: the steps and their seconds, what the append added, how the
    vocabularies grew, the training examples and the normalisers' drift.
    """
    cfg = config or UpdateConfig()
    console = console or Console()
    ds_path, prev, out = Path(dataset), check_previous(previous), Path(out)
    if out.resolve() == prev.resolve():
        raise FunnelrecError(f"{out}: an update writes a new directory beside {prev}")
    if not (ds_path / MANIFEST).is_file():
        raise FunnelrecError(f"{ds_path}: no dataset there ({MANIFEST} missing)")
    result = UpdateResult(out=out, ran=[], skipped=[], seconds={}, report={})
    stage = _Stages(out, console, result.ran, result.skipped, result.seconds)
    logs = parse_new_logs(new_logs) if isinstance(new_logs, Sequence) else new_logs

    if logs or mapping is not None or live_items is not None:
        append = {
            "logs": logs,
            "mapping": Path(mapping).read_text() if mapping is not None else None,
            "allow_late": cfg.allow_late,
            # only when given: the stamps of updates without live items stay valid
            **({"live_items": str(Path(live_items).resolve())} if live_items is not None else {}),
        }
        stage(
            "append",
            append,
            [],
            lambda t: _append(t, logs, mapping, cfg, live_items, console),
            target=ds_path,
        )
    else:
        stage.keys["append"] = ""
        console.print("[dim]append: no new logs given, the dataset as it is[/dim]")

    features = {
        "data": Dataset.open(ds_path).fingerprint(),
        "base": Features.open(prev / "features").fingerprint,
        **{k: getattr(cfg, k) for k in ("replay", "refit_normalizers", "since")},
    }
    stage("features", features, ["append"], lambda t: _update_features(ds_path, prev, cfg, t))
    # the defaults are part of the settings: a change of them retrains
    warm = {
        "previous": str((prev / "candidates").resolve()),
        "defaults": asdict(UPDATE_CANDIDATES),
    }
    stage(
        "candidates",
        {**_settings(cfg.candidates), **warm},
        ["features"],
        lambda t: _warm_candidates(out, prev, cfg, t),
    )
    stage(
        "index",
        asdict(cfg.index),
        ["candidates"],
        lambda t: _build_index(
            out / "candidates", out / "features", cfg.index, t, progress=cfg.progress
        ),
        target=out / "candidates" / INDEX_DIR,
    )
    warm = {"previous": str((prev / "ranker").resolve()), "defaults": asdict(UPDATE_RANKER)}
    stage(
        "ranker",
        {**_settings(cfg.ranker), **warm},
        ["features"],
        lambda t: _warm_ranker(out, prev, cfg, t),
    )
    stage("artifact", {}, ["index", "ranker"], lambda t: _package(out, t, data=ds_path))

    result.report = _update_report(ds_path, prev, out, stage)
    write_json_atomic(out / UPDATE_REPORT, result.report)
    result.seconds = dict(stage.stamped_seconds)
    return result


def _append(
    target: Path,
    logs: dict[str, list[str]] | None,
    mapping: Path | str | None,
    cfg: UpdateConfig,
    live_items: Path | str | None,
    console: Console,
) -> dict[str, Any]:
    appended = append_events(
        target,
        logs,
        mapping=mapping,
        allow_late=cfg.allow_late,
        live_items=read_live_items(live_items) if live_items is not None else None,
    )
    if live_items is not None:
        try:
            reserve_live_item_ids(live_items, appended.row_counts["items"])
        except ArtifactError as e:
            # The merge is in the dataset: failing the step now would append the logs
            # again when the update is run again.
            console.print(f"[yellow]warning:[/yellow] {escape(str(e))}")
    return {"period": appended.period, "row_counts": appended.row_counts}


def _update_features(ds: Path, prev: Path, cfg: UpdateConfig, target: Path) -> dict[str, Any]:
    base = Features.open(prev / "features")
    data = Dataset.open(ds)
    if data.fingerprint() == base.fingerprint:
        raise FunnelrecError(
            f"{ds} has not changed since {base.path} was built from it: give the new "
            "period's logs (or append them first with `funnelrec data append`)"
        )
    build_features(
        data,
        target,
        split=base.split,  # type: ignore[arg-type]
        force=True,
        progress=cfg.progress,
        update=FeaturesUpdate(
            base.path, refit_normalizers=cfg.refit_normalizers, since=cfg.since, replay=cfg.replay
        ),
    )
    return dict(Features.open(target).manifest.get("update") or {})


def update_candidates_config(s: StageSettings) -> CandidateTrainingConfig:
    """The candidate warm start's training config: `UPDATE_CANDIDATES`, then the stage's
    TOML file, then its overrides."""
    return load_config(
        CandidateTrainingConfig, s.config or None, list(s.overrides), defaults=UPDATE_CANDIDATES
    )


def update_ranker_config(s: StageSettings) -> RankerTrainConfig:
    """The ranker warm start's training config: `UPDATE_RANKER`, then the stage's TOML
    file, then its overrides."""
    return load_config(
        RankerTrainConfig, s.config or None, list(s.overrides), defaults=UPDATE_RANKER
    )


def _warm_candidates(out: Path, prev: Path, cfg: UpdateConfig, target: Path) -> None:
    tc = update_candidates_config(cfg.candidates)
    fit_candidates(
        out / "features",
        target,
        tc,
        force=True,
        progress=cfg.progress,
        warm_start=prev / "candidates",
        # an interrupted step reruns from its start (force): a checkpoint would go unread
        checkpoints=False,
    )


def _warm_ranker(out: Path, prev: Path, cfg: UpdateConfig, target: Path) -> None:
    rc = update_ranker_config(cfg.ranker)
    train_ranker(
        out / "features",
        target,
        rc,
        force=True,
        progress=cfg.progress,
        warm_start=prev / "ranker",
        checkpoints=False,  # as for the candidate model
    )


def _update_report(ds: Path, prev: Path, out: Path, stage: _Stages) -> dict[str, Any]:
    appended = stage.reports.get("append", {})
    features = stage.reports.get("features", {})
    period = appended.get("period", {})
    return {
        "dataset": str(ds),
        "previous": str(prev),
        "out": str(out),
        "artifact": str(out / "artifact"),
        "steps": [
            {
                "name": name,
                "status": "ran" if name in stage.ran else "skipped",
                "seconds": round(stage.stamped_seconds[name], 3),
            }
            for name in UPDATE_STEPS
            if name in stage.stamped_seconds
        ],
        "counts": {
            "new_rows": period.get("rows", {}),
            "new_ids": period.get("new_ids", {}),
            "rejected": period.get("rejected", {}),
            "live_items": period.get("live_items", {}),
            "vocab_growth": features.get("vocab_growth", {}),
            "train_examples": features.get("train_examples", {}),
        },
        "drift": features.get("drift", {}),
    }


def reload_server(
    url: str, artifact: Path | str, *, token: str | None = None, timeout: float = 120.0
) -> dict[str, Any]:
    """POST /admin/reload to the server at `url`, naming `artifact`; the server's answer.

    The server loads only artifacts inside its `--artifacts-root` (by default the
    directory of the artifact it started with), from loopback or with its admin token.
    Raises FunnelrecError when it refuses; it keeps serving the old model then.
    """
    import urllib.error
    import urllib.request

    body = json.dumps({"path": str(Path(artifact).resolve())}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/admin/reload",
        data=body,
        headers={
            "content-type": "application/json",
            **({"authorization": f"Bearer {token}"} if token else {}),
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", "")
        except ValueError:
            message = ""
        raise FunnelrecError(f"{url}: reload refused ({e.code}): {message or e.reason}") from None
    except urllib.error.URLError as e:
        raise FunnelrecError(f"{url}: cannot reach the server: {e.reason}") from None


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
