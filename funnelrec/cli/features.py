"""`funnelrec features ...`: fit transforms and build training examples; describe them.

funnelrec features build --data /tmp/small --split last --out /tmp/small-feat
funnelrec features build --data /tmp/small --split time --out /tmp/f cap=none labels=random
funnelrec features describe /tmp/small-feat
"""

from __future__ import annotations

import datetime as dt
import math
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from funnelrec.config import load_config
from funnelrec.features import Features, FeaturesConfig
from funnelrec.features.build import build_features

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
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory (canonical tables)."),
    split: SplitKind = typer.Option(
        SplitKind.last, "--split", help="last: leave-last-out per user; time: global time split."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Features directory to create."),
    force: bool = typer.Option(False, "--force", help="Replace an existing features directory."),
    workers: int = typer.Option(
        1,
        "--workers",
        help="Processes building blocks of users side by side (data over block_events "
        "events only; each holds one block in memory).",
    ),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="FeaturesConfig overrides, e.g. cap=none."
    ),
) -> None:
    """Fit transforms on the training split and write example shards for both stages."""
    config = load_config(FeaturesConfig, None, overrides or [])
    build_features(data, out, split=split.value, config=config, force=force, workers=workers)
    _describe(Features.open(out))


@app.command("describe")
def describe(feat: Path = typer.Argument(..., help="Features directory.")) -> None:
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
    console.print(f"[bold]{f.path}[/]  data {m['data']['path']} (fingerprint {f.fingerprint})")
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
