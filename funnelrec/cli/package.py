"""`funnelrec package`: bundle trained parts into one serving artifact (see
`funnelrec.serving.package`).

funnelrec package --features FEAT --candidates CAND --ranker RANKER --out ART
funnelrec package -f FEAT -c CAND -r RANKER -o ART --data DIR --force serving.deep_k=500
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from funnelrec.serving.package import load_package_config, package
from funnelrec.serving.recommender import read_manifest

console = Console()


def package_command(
    features: Path = typer.Option(..., "--features", "-f", help="Features directory."),
    candidates: Path = typer.Option(
        ..., "--candidates", "-c", help="Candidate model artifact (from `train candidates`)."
    ),
    ranker: Path = typer.Option(..., "--ranker", "-r", help="Ranker artifact (`train ranker`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to create."),
    data: Path | None = typer.Option(
        None, "--data", "-d", help="Dataset directory (default: the one the features name)."
    ),
    config: Path | None = typer.Option(
        None, "--config", help=escape("TOML ([serving], [fresh], [cowatch] sections, state_n).")
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact."),
    overrides: list[str] = typer.Argument(
        None, metavar="[KEY=VALUE]...", help="Overrides, e.g. serving.deep_k=500."
    ),
) -> None:
    """Bundle features, both models, the ANN index, the other candidate sources, item and
    user tables and the live state's seed into one checked artifact for `funnelrec serve`."""
    cfg = load_package_config(config, overrides or [])
    package(features, candidates, ranker, out, data=data, config=cfg, force=force)
    m = read_manifest(out)
    index = m["candidates"]["index"]
    recall = (index.get("recall") or {}).get("recall")
    console.print(
        f"wrote {out}: {m['counts']['items']:,} items, {m['counts']['users']:,} users, "
        f"index {index['kind']}"
        + (f" (recall@{index['recall']['k']} {recall:.3f})" if recall is not None else "")
        + f", fingerprint {m['fingerprint']}"
    )
    console.print(f"serve it with: funnelrec serve {out}")
