"""`funnelrec evaluate ...`: offline metrics of a trained stage on held-out examples.

funnelrec evaluate candidates /tmp/cand --features /tmp/small-feat
funnelrec evaluate candidates /tmp/cand --split valid --k 10,100
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from funnelrec.candidates import check_features, load_candidate_model, read_candidate_config
from funnelrec.dataset import write_json_atomic
from funnelrec.errors import FunnelrecError
from funnelrec.metrics import (
    KS,
    SEEN_INCLUDED,
    ModelScorer,
    PopularityScorer,
    Scorer,
    evaluate_split,
    protocol,
)

app = typer.Typer(help="Offline evaluation of trained models.", no_args_is_help=True)
console = Console()


@app.callback()
def _group() -> None:
    """Offline evaluation of trained models on held-out examples."""


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise FunnelrecError(f"--k must be comma-separated integers, got '{text}'") from None
    if not ks or min(ks) < 1:
        raise FunnelrecError(f"--k must be positive integers, got '{text}'")
    return ks


@app.command("candidates")
def candidates(
    art: Path = typer.Argument(..., help="Candidate model artifact directory."),
    features: Path | None = typer.Option(
        None, "--features", "-f", help="Features directory (default: the one trained on)."
    ),
    split: str = typer.Option("test", "--split", help="Held-out split: test or valid."),
    k: str = typer.Option(",".join(map(str, KS)), "--k", help="Cut-offs, comma-separated."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Queries scored at once."),
    age_at_target: bool = typer.Option(
        False,
        "--age-at-target",
        help="Feed the example age of each target's time instead of serving's 0.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Metrics file (default ART/metrics.json; ART/metrics-valid.json)."
    ),
) -> None:
    """Recall, HR, NDCG, MAP at K and MRR by exact full-corpus scoring, beside popularity."""
    from funnelrec.examples import Features

    ks = _ks(k)
    meta = read_candidate_config(art)
    feats = Features.open(features or meta["data"]["features"])
    check_features(meta, feats, art)
    model = load_candidate_model(art)
    window = feats.manifest["split"]["train_time_range"]
    time_range = (int(window[0]), int(window[1])) if age_at_target else None
    scorers: dict[str, Scorer] = {
        "model": ModelScorer(model, time_range),
        "popularity": PopularityScorer(feats.item_counts()),
    }
    report = evaluate_split(scorers, feats, split, ks=ks, batch_size=batch_size, progress=True)
    proto = protocol(feats, split, ks, report)
    if age_at_target:
        proto["example_age"] = "of each target's time in the training window, >= 0"
    result: dict[str, Any] = {**report.metrics, "protocol": proto}
    path = out or Path(art) / ("metrics.json" if split == "test" else f"metrics-{split}.json")
    write_json_atomic(path, result)
    _print(report.metrics, ks, split, report.queries)
    console.print(f"wrote {path}")


def _print(metrics: dict[str, dict[str, float]], ks: tuple[int, ...], split: str, n: int) -> None:
    cols = ["model", "popularity", "model" + SEEN_INCLUDED, "popularity" + SEEN_INCLUDED]
    table = Table(
        title=f"candidate retrieval, {split} split, {n:,} next watches "
        "(seen items excluded unless marked 'seen incl.')"
    )
    table.add_column("metric")
    for c in cols:
        table.add_column(c.replace(SEEN_INCLUDED, " (seen incl.)"), justify="right")
    names = [f"{m}@{k}" for m in ("recall", "hr", "ndcg", "map") for k in sorted(set(ks))]
    for name in [*names, "mrr"]:
        table.add_row(name, *(f"{metrics[c][name]:.4f}" for c in cols))
    console.print(table)
