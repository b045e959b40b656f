"""`funnelrec evaluate funnel`: the packaged funnel as served, beside its sources, on
held-out next watches (the work is in `funnelrec.serving.evaluation`; docs/evaluation.md).

funnelrec evaluate funnel /tmp/art --limit 500
funnelrec evaluate funnel /tmp/art --split valid --k 10,100
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from funnelrec.cli import sequence
from funnelrec.cli.evaluate import _ks
from funnelrec.ranking.sequence_fit import is_sequence_funnel
from funnelrec.serving.evaluation import FunnelReport, evaluate_funnel

console = Console()


def evaluate_command(
    art: Path = typer.Argument(..., help="Recommender artifact (`funnelrec package` or `run`)."),
    split: str = typer.Option("test", "--split", help="Held-out split: test or valid."),
    k: str = typer.Option("10,20,50", "--k", help="Cut-offs, comma-separated."),
    limit: int | None = typer.Option(
        None, "--limit", help="Only the first N users of the split (all their examples)."
    ),
    features: Path | None = typer.Option(
        None,
        "--features",
        "-f",
        help="Features directory holding the split's examples (default: the one packaged).",
    ),
    data: Path | None = typer.Option(
        None, "--data", help="Dataset of those features (default: the one they record)."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Metrics file (default ART/funnel_metrics.json; ART/funnel_metrics-valid.json).",
    ),
) -> None:
    """The whole funnel as served (sources, then the ranker) on held-out next watches.

    HR, NDCG, recall at K and MRR, beside each candidate source's own top K
    (docs/evaluation.md). A sequence funnel (`funnelrec train funnel`) is scored on its
    dataset's held-out last watches (`--data`: another dataset of the same ids)."""
    if is_sequence_funnel(art):
        sequence.evaluate_command(art, split, _ks(k), limit, data, out)
        return
    report = evaluate_funnel(
        art, split, ks=_ks(k), limit=limit, features=features, data=data, progress=True
    )
    name = "funnel_metrics.json" if split == "test" else f"funnel_metrics-{split}.json"
    path = report.save(out or Path(art) / name)
    _print_funnel(report)
    console.print(f"wrote {path}")


FUNNEL_LABELS = {
    "funnel": "funnel (ranked)",
    "deep": "deep (ANN order)",
    "cowatch": "co-watch",
    "fresh": "fresh & popular",
}
SOURCE_LABELS = {"deep": "deep", "cowatch": "co-watch", "fresh": "fresh & popular"}


def _print_funnel(report: FunnelReport) -> None:
    """The metrics of every list side by side, then who nominated the funnel's hits."""
    c = report.counts
    table = Table(
        title=f"the whole funnel, {report.split} split: {c['requests']:,} requests of "
        f"{c['users']:,} users (watched items excluded but the target)",
        caption="recall@K = hr@K (one target per request); every metric in the JSON",
    )
    table.add_column("metric")
    for name in report.metrics:
        table.add_column(FUNNEL_LABELS.get(name, name), justify="right")
    rows = [f"{m}@{k}" for k in report.ks for m in ("hr", "ndcg")] + ["mrr"]
    for row in rows:
        table.add_row(row, *(f"{report.metrics[n][row]:.4f}" for n in report.metrics))
    console.print(table)

    hits = Table(title="the funnel's hits: share nominated by each source (several may)")
    hits.add_column("K", justify="right")
    hits.add_column("hits", justify="right")
    sources = list(report.hit_sources[0]["nominated_by"]) if report.hit_sources else []
    for s in sources:
        hits.add_column(SOURCE_LABELS.get(s, s), justify="right")
    for h in report.hit_sources:
        shares = (f"{h['nominated_by'][s]:.1%}" for s in sources)
        hits.add_row(str(h["k"]), f"{h['hits']:,}", *shares)
    console.print(hits)
    pool, t = report.pool, report.timing
    console.print(
        f"candidate pool: {pool['mean_candidates']:.0f} candidates per request held the target "
        f"for {pool['hit_rate']:.1%} of requests (the most any ranking of them can reach)\n"
        f"targets: {c['rewatch_targets']:,} re-watches, {c['oov_targets']:,} new to the "
        f"candidate model's vocabulary\n"
        f"{c['requests']:,} requests in {t['seconds']:.1f} s "
        f"({1000 * t['seconds'] / max(c['requests'], 1):.1f} ms each, "
        f"the funnel's own {t['funnel_ms_mean']:.1f} ms)"
    )
