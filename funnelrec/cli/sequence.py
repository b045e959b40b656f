"""`funnelrec train funnel` and `funnelrec evaluate funnel` on a sequence funnel: the whole
funnel fitted on a dataset of watches alone (MovieLens, Amazon reviews, a shop's orders),
the work in `funnelrec.ranking.sequence_fit` (docs/evaluation.md, "The funnel on
sequence data").

funnelrec train funnel --data /tmp/ml --out /tmp/ml-funnel \
    --deep-config configs/candidates-ml100k.toml deep_k=100
funnelrec evaluate funnel /tmp/ml-funnel              # HR@K, NDCG@K of each user's last watch
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from funnelrec.candidates import load_training_config
from funnelrec.config import load_config
from funnelrec.ranking.sequence import SequenceFunnelConfig
from funnelrec.ranking.sequence_fit import (
    SequenceFitConfig,
    SequenceReport,
    evaluate_sequence_funnel,
    fit_sequence_funnel,
    load_sequence_funnel,
    read_sequence_meta,
    read_sequence_split,
    save_report,
)

console = Console()


def train_command(
    data: Path = typer.Option(..., "--data", "-d", help="Dataset directory (its watches)."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to create."),
    deep_config: Path | None = typer.Option(
        None,
        "--deep-config",
        help=escape("The deep candidate model's TOML config ([model] and [train] sections)."),
    ),
    page_moments: int = typer.Option(
        2, "--page-moments", help="The ranker's pages: each user's last N training watches."
    ),
    refit_deep: bool | None = typer.Option(
        None,
        "--refit-deep/--no-refit-deep",
        help="Serve with a deep model retrained on every training watch (it trains twice), "
        "or with the pages' deep model (default: retrain where the pages' moments are more "
        "than a tenth of the training watches).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact."),
    overrides: list[str] = typer.Argument(
        None,
        metavar="[KEY=VALUE]...",
        help="The funnel's settings (SequenceFunnelConfig), e.g. deep_k=100 tower=256-128.",
    ),
) -> None:
    """The whole funnel on a dataset of watches: sources fitted, pages staged, ranker
    trained, the artifact written (each user's last watch held out for the test, the one
    before for validation)."""
    cfg = load_config(SequenceFunnelConfig, None, overrides or [])
    fit = SequenceFitConfig(page_moments=page_moments, refit_deep=refit_deep)
    deep = load_training_config(deep_config)
    split = read_sequence_split(data)
    console.print(f"{split.name}: {split.stats}")

    def epoch(r: dict[str, Any]) -> None:
        console.print(
            f"ranker epoch {r['epoch']}: loss {r['loss']:.4f}, valid HR@10 "
            f"{r['valid hr@10']:.4f} NDCG@10 {r['valid ndcg@10']:.4f} ({r['seconds']:.1f} s)"
        )

    f = fit_sequence_funnel(
        split, out, funnel=cfg, deep=deep, fit=fit, force=force, progress=True, on_epoch=epoch
    )
    d = f.describe()
    t = d.get("timings", {})
    console.print(
        f"ranker best epoch {d['best_epoch']} of {d['epochs']}, valid NDCG@10 "
        f"{d['best_valid_ndcg@10']:.4f}; {d['pages']:,} pages; "
        + ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in t.items())
    )
    console.print(f"wrote {out}")


def evaluate_command(
    art: Path,
    split: str,
    ks: Sequence[int],
    limit: int | None,
    data: Path | None,
    out: Path | None,
) -> None:
    """`evaluate funnel` on a sequence funnel artifact (the CLI dispatches here)."""
    meta = read_sequence_meta(art)
    f = load_sequence_funnel(art)
    cut = read_sequence_split(data or Path(meta["dataset"]["path"]))
    report = evaluate_sequence_funnel(f, cut, which=split, ks=ks, limit=limit)
    name = "funnel_metrics.json" if split == "test" else f"funnel_metrics-{split}.json"
    path = save_report(report, out or Path(art).parent / f"{Path(art).name}-{name}")
    _print(report)
    console.print(f"wrote {path}")


def _print(report: SequenceReport) -> None:
    table = Table(
        title=f"the sequence funnel, {report.split} split: {report.users:,} users "
        "(one held-out watch each; the history's items never served)"
    )
    table.add_column("metric")
    table.add_column("funnel", justify="right")
    for k, v in report.metrics.items():
        table.add_row(k, f"{v:.4f}")
    console.print(table)
    console.print(f"{report.users:,} users in {report.seconds:.1f} s")
