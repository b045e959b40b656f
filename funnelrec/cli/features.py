"""`funnelrec features ...`: fit transforms and build training examples; describe them.

funnelrec features build --data /tmp/small --split last --out /tmp/small-feat
funnelrec features build --data /tmp/small --split time --out /tmp/f cap=none labels=random
funnelrec features build --data /tmp/small --update-from /tmp/small-feat --out /tmp/feat-2
funnelrec features build --data /shared/large --out /shared/feat --engine dask --cluster tcp://HOST:8786
funnelrec features describe /tmp/small-feat
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from funnelrec.cli.data import CLUSTER, EngineKind
from funnelrec.config import load_config
from funnelrec.engines import DaskEngine, Engine
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features
from funnelrec.features.update import FeaturesUpdate

app = typer.Typer(
    help="Fit vocabularies and normalisers, build training examples for both stages.",
    no_args_is_help=True,
)
console = Console()


class SplitKind(StrEnum):
    last = "last"
    time = "time"


@app.command("build")
def build(
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="Dataset directory (canonical tables): a path or a URI (file://, s3://, gs://, "
        "any fsspec scheme).",
    ),
    split: SplitKind | None = typer.Option(
        None,
        "--split",
        help="last: leave-last-out per user; time: global time split (default: last, or "
        "that of --update-from).",
    ),
    out: str = typer.Option(
        ...,
        "--out",
        "-o",
        help="Features directory to create: a path or a URI (file://, s3://, gs://, any "
        "fsspec scheme).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing features directory."),
    workers: int = typer.Option(
        1,
        "--workers",
        help="Processes building blocks of users side by side (data over block_events "
        "events only; each holds one block in memory). Local engine only.",
    ),
    engine: EngineKind = typer.Option(
        EngineKind.local,
        "--engine",
        help="Where blocks of users are built (data over block_events events): local "
        "(this machine, --workers processes) or dask (the tasks of a Dask cluster).",
    ),
    cluster: str | None = CLUSTER,
    update_from: Path | None = typer.Option(
        None,
        "--update-from",
        help="Extend these features (of the dataset before its last append) instead of "
        "fitting anew: old vocabulary ids kept, new ones appended, normalisers kept; their "
        "config is the default.",
    ),
    refit_normalizers: bool = typer.Option(
        False, "--refit-normalizers", help="With --update-from: refit the quantile normalisers."
    ),
    since: int | None = typer.Option(
        None,
        "--since",
        help="With --update-from: training examples from this ts on are new (default: the "
        "start of the dataset's last period).",
    ),
    replay: float = typer.Option(
        0.1, "--replay", help="With --update-from: share of older training examples kept."
    ),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="FeaturesConfig overrides, e.g. cap=none."
    ),
) -> None:
    """Fit transforms on the training split and write example shards for both stages."""
    config = load_config(FeaturesConfig, None, overrides or [])
    runner: Engine | None = None
    if engine is EngineKind.dask:
        if workers != 1:
            raise typer.BadParameter("--workers is for --engine local; a cluster has its own")
        runner = DaskEngine(cluster)
    elif cluster is not None:
        raise typer.BadParameter("--cluster goes with --engine dask")
    update = None
    if update_from is not None:
        base = Features.open(update_from)
        # the base's config, with what the overrides change
        default = FeaturesConfig()
        changed = {
            k: getattr(config, k)
            for k in FeaturesConfig.__dataclass_fields__
            if getattr(config, k) != getattr(default, k)
        }
        config = dataclasses.replace(base.config, **changed)
        split = split or SplitKind(base.split)
        update = FeaturesUpdate(
            update_from, refit_normalizers=refit_normalizers, since=since, replay=replay
        )
    elif refit_normalizers or since is not None:
        raise typer.BadParameter("--refit-normalizers and --since go with --update-from")
    built = build_features(
        data,
        out,
        split=(split or SplitKind.last).value,
        config=config,
        force=force,
        workers=workers,
        update=update,
        engine=runner,
    )
    feats = Features.open(built)
    _describe(feats)
    if update is not None:
        _describe_update(feats.manifest["update"])


def _describe_update(u: dict[str, Any]) -> None:
    """What a features update kept, added and found drifting."""
    ext = u["extends"]
    since = "every example" if u["since"] is None else f"from {_when(u['since'])}"
    console.print(
        f"update of {ext['path']} (fingerprint {ext['fingerprint']}): training examples "
        f"{since}: {u['train_examples']['new']:,} new + {u['train_examples']['replayed']:,} "
        f"replayed (replay {u['replay']}); normalisers {u['normalizers']}"
    )
    growth = Table(title="vocabularies extended (old ids kept)", show_header=True)
    for col in ("vocabulary", "old size", "new size", "added"):
        growth.add_column(col, justify="right" if col != "vocabulary" else "left")
    for name, g in u.get("vocab_growth", {}).items():
        growth.add_row(name, f"{g['old']:,}", f"{g['new']:,}", f"{g['new'] - g['old']:,}")
    console.print(growth)
    drift = Table(title="normaliser drift: new training data on the old maps", show_header=True)
    for col in ("stage", "column", "KS", "p10", "p50", "p90", "beyond range", "missing"):
        drift.add_column(col, justify="left" if col in ("stage", "column") else "right")
    for stage, columns in u.get("drift", {}).items():
        for name, d in columns.items():
            beyond = d.get("below_range", 0.0) + d.get("above_range", 0.0)
            drift.add_row(
                stage,
                name,
                *(_num(d.get(k)) for k in ("ks", "p10", "p50", "p90")),
                _pct(beyond if "ks" in d and "p50" in d else None),
                _pct(d.get("missing")),
            )
    console.print(drift)


def _num(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}"


@app.command("describe")
def describe(feat: str = typer.Argument(..., help="Features directory: a path or a URI.")) -> None:
    """Vocabulary sizes, OOV rates per split, example counts, the per-user cap in effect."""
    _describe(Features.open(feat))


def _pct(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}%"


def _when(ts: int | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M") + f" ({ts})"


def _describe(f: Features) -> None:
    m = f.manifest
    cfg = f.config
    sp = m["split"]
    console.print(f"[bold]{f.uri}[/]  data {m['data']['path']} (fingerprint {f.fingerprint})")
    if sp["kind"] == "last":
        console.print(
            f"split: leave-last-out (users with >= {sp['min_watches']} watches hold out "
            f"their last two: {sp['held_out_users']:,} users)"
        )
    else:
        console.print(f"split: time, t1 = {_when(sp['t1'])}, t2 = {_when(sp['t2'])}")
    cap = "none (all watches)" if cfg.cap is None else f"{cfg.cap} per user"
    line = f"training labels: {cfg.labels}-watch, cap {cap}"
    if sp["kind"] == "time":
        line += f"; held-out cap {'none' if cfg.eval_cap is None else cfg.eval_cap} per user"
    console.print(line + f"; history {cfg.history_n}, queries {cfg.search_n}, seed {cfg.seed}")

    counts = Table(title="examples", show_header=True)
    counts.add_column("stage")
    for part in ("train", "valid", "test"):
        counts.add_column(part, justify="right")
    for stage in ("candidates", "ranking"):
        if stage == "ranking" and not f.has_ranking:
            counts.add_row(stage, "-", "-", "-")
            continue
        counts.add_row(
            stage, *(f"{f.num_examples(stage, p):,}" for p in ("train", "valid", "test"))
        )
    console.print(counts)
    if not f.has_ranking:
        console.print(f"ranking: {m['ranking'].get('reason')}")

    vocabs = Table(title="vocabularies (fitted on the training split)", show_header=True)
    vocabs.add_column("vocabulary")
    vocabs.add_column("size (incl. OOV 0)", justify="right")
    vocabs.add_column("embedding dim", justify="right")
    for name, v in m["vocabularies"].items():
        vocabs.add_row(name, f"{v['size']:,}", str(v["dim"]))
    console.print(vocabs)

    oov = Table(title="out-of-vocabulary rates", show_header=True)
    oov.add_column("stage")
    oov.add_column("feature")
    oov.add_column("vocabulary")
    for part in ("train", "valid", "test"):
        oov.add_column(part, justify="right")
    features = {
        "candidates": [("label", "item"), ("history", "item"), ("search", "token")],
        "ranking": [("item", "rank_item"), ("history", "rank_item")],
    }
    for stage, rows in features.items():
        rates = m["oov"].get(stage, {})
        if not rates:
            continue
        for feature, vocab in rows:
            oov.add_row(
                stage,
                feature,
                vocab,
                *(_pct(rates.get(p, {}).get(feature)) for p in ("train", "valid", "test")),
            )
    console.print(oov)
    dropped = m.get("dropped_train_examples_oov_label", 0)
    if dropped:
        console.print(f"{dropped:,} training examples dropped: label outside the item vocabulary")
