"""`funnelrec evaluate ...`: offline metrics of a trained stage on held-out examples.

funnelrec evaluate candidates /tmp/cand --features /tmp/small-feat
funnelrec evaluate candidates /tmp/cand --split valid --k 10,100
funnelrec evaluate candidates /tmp/cand --ann        # + the ANN index of /tmp/cand/index
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from funnelrec.ann.index import ItemIndex
from funnelrec.candidates import (
    INDEX_DIR,
    check_features,
    load_candidate_model,
    load_item_embeddings,
    read_candidate_config,
)
from funnelrec.candidates.metrics import (
    KS,
    SEEN_INCLUDED,
    IndexRetriever,
    ModelScorer,
    PopularityScorer,
    Retriever,
    Scorer,
    evaluate_split,
    protocol,
)
from funnelrec.data.dataset import write_json_atomic
from funnelrec.errors import FunnelrecError
from funnelrec.features import Features

ANN = "model_ann"  # metrics of the model's top-K through its ANN index

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
    ann: bool = typer.Option(
        False,
        "--ann",
        help="Also retrieve through the ANN index (ART/index, from `funnelrec index build`) "
        "and show its metrics beside the exact ones.",
    ),
    index: Path | None = typer.Option(
        None, "--index", help="The ANN index directory to use (implies --ann; default ART/index)."
    ),
    device: str = typer.Option(
        "cpu", "--device", help="Where the model scores: cpu or cuda (ranking stays on the CPU)."
    ),
) -> None:
    """Recall, HR, NDCG, MAP at K and MRR by exact full-corpus scoring, beside popularity
    (and with --ann, the same metrics of the model's top K through its ANN index)."""

    ks = _ks(k)
    meta = read_candidate_config(art)
    feats = Features.open(features or meta["data"]["features"])
    check_features(meta, feats, art)
    model = load_candidate_model(art)
    window = feats.manifest["split"]["train_time_range"]
    time_range = (int(window[0]), int(window[1])) if age_at_target else None
    model_scorer = ModelScorer(model, time_range, device=_device(device))
    scorers: dict[str, Scorer] = {
        "model": model_scorer,
        "popularity": PopularityScorer(feats.item_counts()),
    }
    retrievers: dict[str, Retriever] = {}
    ann_meta: dict[str, Any] | None = None
    if ann or index is not None:
        retriever = _ann_retriever(art, index, model_scorer)
        retrievers[ANN] = retriever
        ann_meta = _ann_protocol(retriever, ks)
    report = evaluate_split(
        scorers,
        feats,
        split,
        ks=ks,
        batch_size=batch_size,
        progress=True,
        retrievers=retrievers,
    )
    proto = protocol(feats, split, ks, report)
    proto["scoring"] = {
        "model": "exact: every item scored by dot product (full-corpus ranking)",
        "popularity": "exact: every item by training watch count",
    }
    if ann_meta is not None:
        proto["scoring"][ANN] = "approximate: the model's top K through its ANN index"
        proto["ann"] = ann_meta
    if age_at_target:
        proto["example_age"] = "of each target's time in the training window, >= 0"
    result: dict[str, Any] = {**report.metrics, "protocol": proto}
    path = out or Path(art) / ("metrics.json" if split == "test" else f"metrics-{split}.json")
    write_json_atomic(path, result)
    _print(report.metrics, ks, split, report.queries, ann_meta)
    console.print(f"wrote {path}")


def _device(name: str) -> torch.device:
    """`name` as a torch device, refused when it is not one or its GPU is not there."""
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise FunnelrecError(f"--device: '{name}' is not a device (cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FunnelrecError(f"--device {name}: no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FunnelrecError(
                f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif dev.type != "cpu":
        raise FunnelrecError(f"--device {name}: use cpu or cuda")
    return dev


def _ann_retriever(art: Path, index_dir: Path | None, scorer: ModelScorer) -> IndexRetriever:
    """The ANN index of `art` (refused unless it matches the model's embeddings and ids)."""

    emb, item_ids = load_item_embeddings(art)
    ids = item_ids.numpy().astype(np.int64, copy=False)
    path = index_dir if index_dir is not None else Path(art) / INDEX_DIR
    loaded = ItemIndex.load(path, expected_dim=int(emb.shape[1]), expected_item_ids=ids)
    return IndexRetriever(scorer, loaded, ids)


def _ann_protocol(retriever: IndexRetriever, ks: tuple[int, ...]) -> dict[str, Any]:
    """What metrics.json says about the ANN rows: the index, and how they were scored."""
    meta = retriever.index.metadata()
    return {
        "index": {n: meta[n] for n in ("kind", "params", "count", "dim", "recall")},
        "retrieval": f"the top {max(ks)} items of the index for each user vector; seen items "
        "excluded in the search itself (as at serving), except the target",
        "ranks": f"a target's place in that list; absent = a miss at every K, and mrr is cut "
        f"at {max(ks)} (0 for a target outside the list)",
    }


def _print(
    metrics: dict[str, dict[str, float]],
    ks: tuple[int, ...],
    split: str,
    n: int,
    ann_meta: dict[str, Any] | None = None,
) -> None:
    names = ["model", *([ANN] if ann_meta is not None else []), "popularity"]
    cols = names + [c + SEEN_INCLUDED for c in names]
    title = (
        f"candidate retrieval, {split} split, {n:,} next watches "
        "(seen items excluded unless marked 'seen incl.')"
    )
    labels = {"model": "model", ANN: "model ANN", "popularity": "popularity"}
    if ann_meta is not None:
        idx = ann_meta["index"]
        knobs = ((idx.get("recall") or {}).get("search_params")) or {}
        knob = ", ".join(f"{name}={v}" for name, v in knobs.items())
        title += (
            f"\nmodel (exact) = every item scored; model ANN = top {max(ks)} of the "
            f"{idx['kind']} index" + (f" ({knob})" if knob else "")
        )
        labels["model"] = "model (exact)"
    table = Table(title=title)
    table.add_column("metric")
    for c in cols:
        base = c.removesuffix(SEEN_INCLUDED)
        suffix = " (seen incl.)" if c != base else ""
        table.add_column(labels[base] + suffix, justify="right")
    names_ = [f"{m}@{k}" for m in ("recall", "hr", "ndcg", "map") for k in sorted(set(ks))]
    for name in [*names_, "mrr"]:
        table.add_row(name, *(f"{metrics[c][name]:.4f}" for c in cols))
    console.print(table)
