"""`funnelrec report RUN_DIR`: metrics JSON -> one Markdown file and one HTML page, with figures.

    funnelrec report runs/experiments      # after `funnelrec experiment paper`
    funnelrec report runs/demo             # after `funnelrec run` or `funnelrec demo`

What it reads under RUN_DIR (directories whose name starts with "_" or "." are caches and
are skipped):
- experiment documents (`NAME/metrics.json` of `funnelrec experiment`): their claim,
  protocol, tables, figures and verdict, as the experiment wrote them;
- pipeline evaluations (`evaluation/metrics.json` of `funnelrec run`): retrieval metrics per
  scorer with a recall@K curve; the ranker's metrics with its calibration curve;
- ranker evaluations (`funnelrec evaluate ranker`): the ranking part alone;
- any other `metrics.json` / `*metrics*.json`: its numbers as a table.
Latency samples anywhere in a file (a `latency_ms` list, or a mapping of such lists)
become histograms. Provenance (command, version, commit, seeds, data fingerprint,
config) comes from the `run.json` an experiment writes beside its document, or, for a
pipeline run, from its stamps, data manifest and model configs.

Writes RUN_DIR/report.md (figures as PNG files in RUN_DIR/report_figures/) and
RUN_DIR/report.html (the same content with the figures embedded: one self-contained
file). Both are written to temporary names and renamed; the figure directory is built
aside and swapped in.

A figure spec (what experiment documents hold under "figures"):
    {"name": "depth", "kind": "line" | "bar" | "hist", "title": ..., "xlabel": ...,
     "ylabel": ..., "logx": false, "xticks": [labels] (categorical x),
     "series": [{"label": ..., "x": [...], "y": [...], "yerr": [...]}]     # line
     "categories": [...], "series": [{"label": ..., "y": [...], "yerr": [...]}]  # bar
     "series": [{"label": ..., "values": [...]}]                            # hist
     "hlines": [{"y": 0.5, "label": "random"}]}
A table spec: {"title": ..., "columns": [...], "rows": [[...], ...], "note": ...}.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from funnelrec import __version__
from funnelrec.data.dataset import AtomicDirectory
from funnelrec.errors import FunnelrecError

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES_DIR = "report_figures"
# The order of the paper's experiments in a report; others follow by path.
EXPERIMENT_ORDER = (
    "paper",
    "baselines",
    "depth-features",
    "example-age",
    "labels",
    "ranking-table",
    "examples-per-user",
    "negatives",
    "funnel-ab",
)
MAX_GENERIC_ROWS = 80


@dataclass
class Section:
    """One part of a report: what a metrics file says, ready to render."""

    title: str
    source: Path
    claim: str | None = None
    protocol: str | None = None
    verdict: dict[str, Any] | None = None
    tables: list[dict[str, Any]] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    order: int = len(EXPERIMENT_ORDER)


# --------------------------------------------------------------------------- discovery


def find_metrics(root: Path) -> list[Path]:
    """Metrics JSON files under `root`, skipping cache directories ("_*", ".*")."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(("_", ".")))
        for name in sorted(filenames):
            if name.endswith(".json") and "metrics" in name and not name.startswith("."):
                out.append(Path(dirpath) / name)
    return out


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise FunnelrecError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise FunnelrecError(f"{path}: not valid JSON ({e})") from None


def collect(root: Path) -> list[Section]:
    """Every section the metrics files under `root` give, in report order."""
    root = Path(root)
    if not root.exists():
        raise FunnelrecError(f"{root}: no such directory")
    if not root.is_dir():
        raise FunnelrecError(f"{root}: not a directory (give a run or experiment directory)")
    files = find_metrics(root)
    if not files:
        raise FunnelrecError(
            f"{root}: no metrics JSON found (expected NAME/metrics.json from `funnelrec "
            "experiment` or evaluation/metrics.json from `funnelrec run`)"
        )
    sections: list[Section] = []
    for path in files:
        data = _load_json(path)
        if not isinstance(data, dict):
            raise FunnelrecError(f"{path}: expected a JSON object of metrics")
        sections.extend(_sections_of(path, data, root))
    sections.sort(key=lambda s: (s.order, str(s.source)))
    return sections


def _sections_of(path: Path, data: dict[str, Any], root: Path) -> list[Section]:
    rel = _rel(path, root)
    if data.get("kind") == "funnelrec-experiment":
        return [_experiment_section(path, rel, data)]
    if "candidates" in data and isinstance(data["candidates"], dict):
        return _pipeline_sections(path, rel, data)
    if isinstance(data.get("model"), dict) and "weighted_per_user_loss" in data["model"]:
        s = Section(title=f"Ranker evaluation ({rel})", source=rel)
        _ranking_parts(s, data)
        s.provenance = _ranker_provenance(path.parent)
        return [s]
    s = Section(title=f"Metrics ({rel})", source=rel)
    rows = [[k, _fmt(v)] for k, v in _numbers(data)][:MAX_GENERIC_ROWS]
    if rows:
        s.tables.append({"title": "numbers in the file", "columns": ["key", "value"], "rows": rows})
    s.figures.extend(_latency_figures(data, stem=_stem(rel)))
    run = path.parent / "run.json"
    if run.exists():
        s.provenance = dict(_load_json(run))
    return [s]


def _rel(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return path


def _stem(rel: Path) -> str:
    text = str(rel.with_suffix("")).replace(os.sep, "-")
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


# --------------------------------------------------------------------------- adapters


def _experiment_section(path: Path, rel: Path, doc: dict[str, Any]) -> Section:
    name = str(doc.get("experiment", rel.parent.name))
    s = Section(
        title=str(doc.get("title", name)),
        source=rel,
        claim=doc.get("claim"),
        protocol=doc.get("protocol"),
        verdict=doc.get("verdict"),
        tables=list(doc.get("tables", [])),
        notes=list(doc.get("notes", [])),
        order=EXPERIMENT_ORDER.index(name) if name in EXPERIMENT_ORDER else len(EXPERIMENT_ORDER),
    )
    stem = _stem(rel.parent) or name
    for i, fig in enumerate(doc.get("figures", [])):
        s.figures.append({**fig, "name": f"{stem}-{fig.get('name', i)}"})
    s.figures.extend(_latency_figures(doc.get("results", {}), stem=stem))
    run = path.parent / "run.json"
    if run.exists():
        s.provenance = dict(_load_json(run))
    return s


def _pipeline_sections(path: Path, rel: Path, m: dict[str, Any]) -> list[Section]:
    run_dir = path.parent.parent
    stem = _stem(rel.parent)
    cand: dict[str, dict[str, float]] = m["candidates"]
    proto = m.get("candidates_protocol", {})
    s = Section(
        title=f"Candidate generation ({rel})",
        source=rel,
        protocol=(
            f"{proto.get('split', 'test')} split, {proto.get('examples', 'all')} held-out next "
            "watches; every item of the training vocabulary scored exactly; rows without a "
            "suffix exclude the items the user watched before (never the target), "
            "'_seen_included' rows exclude nothing; ties broken by a fixed random order"
        ),
    )
    families = ("recall", "ndcg", "map")
    metric_names = sorted(
        {k for v in cand.values() for k in v},
        key=lambda k: (families.index(k.split("@")[0]) if k.split("@")[0] in families else 9,
                       _k_of(k)),
    )  # fmt: skip
    shown = [k for k in metric_names if k.split("@")[0] in families]
    shown += ["mrr"] if "mrr" in metric_names else []
    s.tables.append(
        {
            "title": "retrieval metrics (held-out next watch)",
            "columns": ["scorer", *shown],
            "rows": [[name, *(_fmt(v.get(k)) for k in shown)] for name, v in cand.items()],
        }
    )
    curve_ks = sorted({_k_of(k) for k in metric_names if k.startswith("recall@")})
    if curve_ks:
        s.figures.append(
            {
                "name": f"{stem}-recall",
                "kind": "line",
                "title": "recall@K of the held-out next watch",
                "xlabel": "K",
                "ylabel": "recall@K",
                "logx": True,
                "series": [
                    {"label": name, "x": curve_ks, "y": [v.get(f"recall@{k}") for k in curve_ks]}
                    for name, v in cand.items()
                ],
            }
        )
    s.provenance = _pipeline_provenance(run_dir)
    out = [s]
    ranking = m.get("ranking")
    if isinstance(ranking, dict) and isinstance(ranking.get("model"), dict):
        r = Section(title=f"Ranking ({rel})", source=rel, provenance=s.provenance)
        _ranking_parts(r, ranking, stem=f"{stem}-ranker")
        out.append(r)
    s.figures.extend(_latency_figures(m, stem=stem))
    return out


def _k_of(name: str) -> int:
    _, _, k = name.partition("@")
    return int(k) if k.isdigit() else 0


def _ranking_parts(s: Section, r: dict[str, Any], stem: str = "ranker") -> None:
    m = r["model"]
    pr = r.get("protocol", {})
    s.protocol = (
        f"{pr.get('split', 'test')} split of the {pr.get('split_kind', '?')} split; "
        f"tower {pr.get('tower', '?')}, objective {pr.get('objective', '?')}; "
        f"pairs: {pr.get('pairs', 'clicked x unclicked impressions of one page')}"
    )
    oracle = r.get("oracle", {})
    rows = [
        [
            "weighted per-user loss",
            _fmt(m.get("weighted_per_user_loss")),
            _fmt(r.get("random", {}).get("weighted_per_user_loss")),
            _fmt(oracle.get("weighted_per_user_loss")),
        ],
        ["AUC (clicks)", _fmt(m.get("auc")), "0.5", _fmt(oracle.get("auc"))],
        ["GAUC (per user)", _fmt(m.get("gauc")), "", ""],
        ["log loss (clicks)", _fmt(m.get("log_loss")), "", ""],
        ["weighted log loss", _fmt(m.get("weighted_log_loss")), "", ""],
    ]
    cb = r.get("clickbait")
    if isinstance(cb, dict):
        rows.append(
            [
                f"high-clickbait share of top {cb.get('top_k')}",
                _fmt(cb.get("model_top_k_share")),
                _fmt(cb.get("shown_share")),
                _fmt(cb.get("oracle_top_k_share")),
            ]
        )
    s.tables.append(
        {
            "title": "ranker metrics",
            "columns": ["metric", "model", "random order", "oracle (truth)"],
            "rows": rows,
            "note": f"{m.get('impressions', '?')} impressions, {m.get('clicks', '?')} clicks, "
            f"{m.get('pages', '?')} pages, {m.get('pairs', '?')} pairs",
        }
    )
    cal = m.get("calibration", {})
    deciles = cal.get("deciles") if isinstance(cal, dict) else None
    if deciles:
        s.figures.append(
            {
                "name": f"{stem}-calibration",
                "kind": "line",
                "title": "calibration: predicted vs observed watch time per impression",
                "xlabel": "decile of predicted watch time",
                "ylabel": "seconds per impression",
                "series": [
                    {
                        "label": "predicted",
                        "x": list(range(1, len(deciles) + 1)),
                        "y": [d.get("mean_predicted") for d in deciles],
                    },
                    {
                        "label": "observed",
                        "x": list(range(1, len(deciles) + 1)),
                        "y": [d.get("mean_observed") for d in deciles],
                    },
                ],
            }
        )


def _latency_figures(data: Any, stem: str) -> list[dict[str, Any]]:
    figs: list[dict[str, Any]] = []
    for path, value in _walk(data):
        if not path or path[-1] not in ("latency_ms", "latencies_ms"):
            continue
        series = []
        if isinstance(value, list) and value and all(_is_num(x) for x in value):
            series.append({"label": ".".join(path[:-1]) or "latency", "values": value})
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, list) and v and all(_is_num(x) for x in v):
                    series.append({"label": str(k), "values": v})
        if series:
            figs.append(
                {
                    "name": f"{stem}-latency-{len(figs)}",
                    "kind": "hist",
                    "title": "latency " + (".".join(path[:-1]) or ""),
                    "xlabel": "milliseconds",
                    "ylabel": "requests",
                    "series": series,
                }
            )
    return figs


def _walk(data: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, data
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _walk(v, (*path, str(k)))


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _numbers(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _numbers(v, f"{prefix}.{k}" if prefix else str(k))
    elif _is_num(data):
        yield prefix, data


# --------------------------------------------------------------------------- provenance


def _pipeline_provenance(run_dir: Path) -> dict[str, Any]:
    """What a `funnelrec run` directory records about how its numbers were made."""
    p: dict[str, Any] = {"run_dir": str(run_dir)}
    stamps = run_dir / "stamps"
    if stamps.is_dir():
        p["stage_seconds"] = {
            f.stem: round(float(_load_json(f).get("seconds", 0.0)), 1)
            for f in sorted(stamps.glob("*.json"))
        }
    manifest = run_dir / "data" / "manifest.json"
    if manifest.exists():
        from funnelrec.data.dataset import Dataset

        ds = Dataset.open(run_dir / "data")
        p["data"] = {
            "fingerprint": ds.fingerprint(),
            "created_by": ds.manifest.created_by,
            "source": ds.manifest.source,
            "simulator": ds.manifest.extra.get("simulator"),
            "rows": ds.manifest.row_counts,
        }
    cand = run_dir / "candidates" / "config.json"
    if cand.exists():
        c = _load_json(cand)
        p["funnelrec"] = c.get("created_by")
        p["candidates"] = {"model": c.get("model"), "train": c.get("train")}
    p.update(_ranker_provenance(run_dir / "ranker"))
    return p


def _ranker_provenance(art: Path) -> dict[str, Any]:
    cfg = art / "config.json"
    if not cfg.exists():
        return {}
    c = _load_json(cfg)
    return {
        "ranker": {
            "created_by": c.get("created_by"),
            "model": c.get("model"),
            "train": c.get("train_config"),
            "data": c.get("data"),
        }
    }


def _provenance_rows(p: Mapping[str, Any]) -> list[list[str]]:
    """The lines of provenance a reader needs to trace a number to its command."""
    rows: list[list[str]] = []
    env = p.get("environment", {})
    settings = p.get("settings", {})
    data = p.get("data", {})
    for label, value in (
        ("command", p.get("command")),
        ("funnelrec", env.get("funnelrec") or p.get("funnelrec")),
        ("commit", env.get("commit")),
        ("seeds", settings.get("seeds")),
        (
            "world",
            f"{settings.get('preset')} seed {settings.get('world_seed')}" if settings else None,
        ),
        ("data fingerprint", data.get("fingerprint") if isinstance(data, dict) else None),
        ("run directory", p.get("run_dir")),
        ("machine", env.get("machine")),
        ("torch", env.get("torch")),
        ("finished", p.get("finished")),
        ("seconds", json.dumps(p.get("seconds")) if p.get("seconds") else None),
        ("stage seconds", json.dumps(p.get("stage_seconds")) if p.get("stage_seconds") else None),
    ):
        if value not in (None, "", "None seed None"):
            rows.append([label, str(value)])
    return rows


def _provenance_config(p: Mapping[str, Any]) -> str | None:
    keep = {k: p[k] for k in ("settings", "candidates", "ranker") if k in p}
    return json.dumps(keep, indent=1, sort_keys=True, default=str) if keep else None


# --------------------------------------------------------------------------- figures


def render_figure(spec: Mapping[str, Any], path: Path) -> None:
    """Draw one figure spec (see the module docstring) into a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = spec.get("kind", "line")
    long_labels = kind == "bar" and max(map(len, map(str, spec.get("categories", [""])))) > 12
    fig, ax = plt.subplots(figsize=(6.4, 4.6 if long_labels else 4.0), dpi=110)
    try:
        series = list(spec.get("series", []))
        if kind == "line":
            for s in series:
                x = [math.nan if v is None else v for v in s.get("x", [])]
                y = [math.nan if v is None else v for v in s.get("y", [])]
                yerr = s.get("yerr")
                if yerr is not None and _any_nonzero(yerr):
                    ax.errorbar(x, y, yerr=yerr, marker="o", ms=4, capsize=3, label=s.get("label"))
                else:
                    ax.plot(x, y, marker="o", ms=4, label=s.get("label"), ls=s.get("ls", "-"))
            if spec.get("xticks"):
                ticks = spec["xticks"]
                xs = series[0].get("x", list(range(len(ticks)))) if series else []
                ax.set_xticks(xs[: len(ticks)], ticks[: len(xs)])
            if spec.get("logx"):
                ax.set_xscale("log")
            xs_all = [v for s in series for v in s.get("x", [])]
            if xs_all and all(isinstance(v, int) for v in xs_all) and not spec.get("logx"):
                from matplotlib.ticker import MaxNLocator

                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        elif kind == "bar":
            cats = [str(c) for c in spec.get("categories", [])]
            n = max(len(series), 1)
            width = 0.8 / n
            for i, s in enumerate(series):
                xs = [j + (i - (n - 1) / 2) * width for j in range(len(cats))]
                y = [math.nan if v is None else v for v in s.get("y", [])]
                yerr = s.get("yerr")
                if yerr is not None and not any(_any_nonzero(e) for e in yerr):
                    yerr = None  # one seed: no spread to draw
                ax.bar(xs, y, width=width, yerr=yerr, capsize=3, label=s.get("label"))
            ax.set_xticks(list(range(len(cats))), cats, rotation=30 if len(cats) > 5 else 0)
            if len(cats) > 5:
                for t in ax.get_xticklabels():
                    t.set_horizontalalignment("right")
            lims = spec.get("ylim")
            if lims:
                ax.set_ylim(*lims)
        elif kind == "hist":
            for s in series:
                values = [v for v in s.get("values", []) if v is not None and math.isfinite(v)]
                if values:
                    ax.hist(values, bins=spec.get("bins", 40), alpha=0.6, label=s.get("label"))
        else:
            raise FunnelrecError(f"figure '{spec.get('name')}': unknown kind '{kind}'")
        for h in spec.get("hlines", []):
            ax.axhline(h["y"], ls="--", lw=1, color=h.get("color", "grey"), label=h.get("label"))
        if spec.get("logy"):
            ax.set_yscale("log")
        ax.set_title(str(spec.get("title", "")), fontsize=10)
        ax.set_xlabel(str(spec.get("xlabel", "")))
        ax.set_ylabel(str(spec.get("ylabel", "")))
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def _any_nonzero(e: Any) -> bool:
    if isinstance(e, list | tuple):
        return any(_any_nonzero(x) for x in e)
    return e is not None and e != 0 and not (isinstance(e, float) and math.isnan(e))


def git_commit(repo: Path | None = None) -> str | None:
    """The checkout's commit (short hash, '+dirty' with local changes), None if unknown."""
    root = repo or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def write_figures(doc: dict[str, Any], out: Path) -> list[Path]:
    """Render an experiment document's figures into `out` (NAME.png each, atomically);
    sets each spec's "file" to its PNG's name."""
    written = []
    for i, spec in enumerate(doc.get("figures", [])):
        name = str(spec.get("name", f"figure-{i}"))
        target = Path(out) / f"{name}.png"
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            render_figure(spec, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        spec["file"] = target.name
        written.append(target)
    return written


# --------------------------------------------------------------------------- rendering


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _cell(v: Any) -> str:
    return v if isinstance(v, str) else _fmt(v)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _decided(v: Mapping[str, Any]) -> str:
    """The suffix ' (decided)' or ' (not decided: 1 of 3 unclear)' of a verdict with checks."""
    checks = v.get("checks")
    if not isinstance(checks, list) or not checks:
        return ""
    unclear = sum(c.get("holds") == "unclear" for c in checks)
    return " (decided)" if not unclear else f" (not decided: {unclear} of {len(checks)} unclear)"


def _verdict_line(v: Mapping[str, Any]) -> str:
    holds = str(v.get("holds", "?"))
    return f"**{holds}**{_decided(v)}: {v.get('text', '')}"


def _md_table(t: Mapping[str, Any]) -> list[str]:
    cols = [str(c) for c in t.get("columns", [])]
    lines = []
    if t.get("title"):
        lines += [f"*{t['title']}*", ""]
    lines.append("| " + " | ".join(_md_escape(c) for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for row in t.get("rows", []):
        lines.append("| " + " | ".join(_md_escape(_cell(c)) for c in row) + " |")
    if t.get("note"):
        lines += ["", f"{t['note']}"]
    return [*lines, ""]


def _header(
    root: Path, sections: list[Section], report_commit: str | None = None
) -> dict[str, str]:
    commits = {
        str(s.provenance.get("environment", {}).get("commit"))
        for s in sections
        if s.provenance.get("environment", {}).get("commit")
    }
    return {
        "title": f"funnelrec report: {root}",
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "report_commit": report_commit or git_commit() or "unknown",
        "run_commits": ", ".join(sorted(commits)) or "not recorded",
    }


def render_markdown(
    root: Path,
    sections: list[Section],
    figures: dict[int, str],
    *,
    title: str | None = None,
    preamble: Sequence[str] = (),
    report_commit: str | None = None,
) -> str:
    """The report as Markdown; `figures` maps id(spec) to the PNG path relative to the
    Markdown file. title (default "funnelrec report: ROOT") and preamble (lines after the
    generation line): a document's own, e.g. docs/results.md's; report_commit: the
    checkout's commit as the report began (default: now)."""
    h = _header(root, sections, report_commit)
    lines = [
        f"# {title or h['title']}",
        "",
        f"Generated {h['generated']} by funnelrec {h['version']} (commit {h['report_commit']});"
        f" the numbers come from commit(s) {h['run_commits']}.",
        "",
        *preamble,
    ]
    for s in sections:
        lines += [f"## {s.title}", "", f"Source: `{s.source}`", ""]
        if s.claim:
            lines += [f"**Paper:** {s.claim}", ""]
        if s.verdict:
            lines += [f"**Verdict:** {_verdict_line(s.verdict)}", ""]
        if s.protocol:
            lines += [f"**Protocol:** {s.protocol}", ""]
        for t in s.tables:
            lines += _md_table(t)
        for fig in s.figures:
            if id(fig) in figures:
                lines += [f"![{fig.get('title', '')}]({figures[id(fig)]})", ""]
        for note in s.notes:
            lines += [f"- {note}"]
        if s.notes:
            lines.append("")
        prov = _provenance_rows(s.provenance)
        if prov:
            lines += _md_table({"title": "provenance", "columns": ["", ""], "rows": prov})
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px;text-align:right}td:first-child,th:first-child{text-align:left}
caption{text-align:left;font-style:italic;margin-bottom:3px}img{max-width:100%}
.verdict{background:#f4f7ff;border-left:4px solid #4466cc;padding:.4em .8em}
details{margin:.5em 0 2em}pre{font-size:11px;background:#f6f6f6;padding:.5em;overflow:auto}
"""


def _html_table(t: Mapping[str, Any]) -> str:
    cap = f"<caption>{html.escape(str(t['title']))}</caption>" if t.get("title") else ""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.get("columns", []))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>"
        for row in t.get("rows", [])
    )
    note = f"<p><small>{html.escape(str(t['note']))}</small></p>" if t.get("note") else ""
    return f"<table>{cap}<tr>{head}</tr>{body}</table>{note}"


def render_html(
    root: Path,
    sections: list[Section],
    images: dict[int, bytes],
    report_commit: str | None = None,
) -> str:
    """The report as one HTML page; `images` maps id(spec) to PNG bytes (embedded)."""
    h = _header(root, sections, report_commit)
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(h['title'])}</title>"
        f"<style>{_CSS}</style></head><body><h1>{e(h['title'])}</h1>",
        f"<p>Generated {e(h['generated'])} by funnelrec {e(h['version'])} (commit "
        f"{e(h['report_commit'])}); the numbers come from commit(s) {e(h['run_commits'])}.</p>",
        "<ul>"
        + "".join(f"<li><a href='#s{i}'>{e(s.title)}</a></li>" for i, s in enumerate(sections))
        + "</ul>",
    ]
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{e(s.title)}</h2><p><small>source: {e(str(s.source))}"
                     "</small></p>")  # fmt: skip
        if s.claim:
            parts.append(f"<p><b>Paper:</b> {e(s.claim)}</p>")
        if s.verdict:
            v = s.verdict
            parts.append(
                f"<p class='verdict'><b>Verdict: {e(str(v.get('holds', '?')))}"
                f"{e(_decided(v))}</b>. "
                f"{e(str(v.get('text', '')))}</p>"
            )
        if s.protocol:
            parts.append(f"<p><b>Protocol:</b> {e(s.protocol)}</p>")
        parts.extend(_html_table(t) for t in s.tables)
        for fig in s.figures:
            if id(fig) in images:
                b64 = base64.b64encode(images[id(fig)]).decode()
                parts.append(
                    f"<figure><img alt='{e(str(fig.get('title', '')))}' "
                    f"src='data:image/png;base64,{b64}'></figure>"
                )
        if s.notes:
            parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in s.notes) + "</ul>")
        prov = _provenance_rows(s.provenance)
        if prov:
            cfg = _provenance_config(s.provenance)
            parts.append(
                "<details><summary>provenance</summary>"
                + _html_table({"columns": ["", ""], "rows": prov})
                + (f"<pre>{e(cfg)}</pre>" if cfg else "")
                + "</details>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Report:
    """What `write_report` wrote (html: None for a project document)."""

    markdown: Path
    html: Path | None
    figures: list[Path]
    sections: int


def write_report(
    run_dir: Path | str,
    out: Path | str | None = None,
    *,
    doc: Path | str | None = None,
    preface: str | None = None,
) -> Report:
    """Collect the metrics under `run_dir` and write report.md, report.html and figures
    into `out` (default: run_dir).

    doc: write a project document instead (docs/results.md): the Markdown at `doc`, its
    figures in the directory of the same name without the suffix (docs/results/), under
    the results' title and the commands that regenerate it; no HTML page.
    preface: Markdown about this run that its documents cannot say (how it was run, what
    shared the machine), placed before the first section of the Markdown."""
    root = Path(run_dir)
    # before anything is written: a document's own figures would make the checkout dirty
    commit = git_commit()
    extra = [*preface.strip().splitlines(), ""] if preface and preface.strip() else []
    sections = collect(root)
    if doc is not None:
        md = Path(doc)
        fig_target, html_page = md.with_suffix(""), None
    else:
        dest = Path(out) if out is not None else root
        md, fig_target, html_page = dest / REPORT_MD, dest / FIGURES_DIR, dest / REPORT_HTML
    md.parent.mkdir(parents=True, exist_ok=True)
    figdir = AtomicDirectory(fig_target, force=True)
    paths: dict[int, str] = {}
    images: dict[int, bytes] = {}
    written: list[Path] = []
    try:
        used: set[str] = set()
        for s in sections:
            for fig in s.figures:
                name = _stem(Path(str(fig.get("name", "figure"))))
                while name in used:
                    name += "-x"
                used.add(name)
                file = figdir.tmp / f"{name}.png"
                render_figure(fig, file)
                images[id(fig)] = file.read_bytes()
                paths[id(fig)] = f"{fig_target.name}/{name}.png"
                written.append(fig_target / f"{name}.png")
        figdir.commit()
    except BaseException:
        figdir.abort()
        raise
    if doc is not None:
        preamble = [*_doc_preamble(md), *extra]
        text = render_markdown(
            root, sections, paths, title=DOC_TITLE, preamble=preamble, report_commit=commit
        )
    else:
        text = render_markdown(root, sections, paths, preamble=extra, report_commit=commit)
    _write_text_atomic(md, text)
    if html_page is not None:
        _write_text_atomic(html_page, render_html(root, sections, images, commit))
    return Report(markdown=md, html=html_page, figures=written, sections=len(sections))


DOC_TITLE = "Results: the paper's experiments on the simulated world"


def _doc_preamble(md: Path) -> list[str]:
    """What a results document says before the report: how to regenerate it."""
    return [
        "Every number below comes from the experiments' own documents, regenerated by:",
        "",
        "    funnelrec experiment paper --out runs/experiments   # every experiment, small-v2",
        f"    funnelrec report runs/experiments --doc {md}",
        "",
        "The summary's protocol says how every experiment is run (seeds, the convergence "
        "rule, the paired intervals and the verdict rule); each experiment's section gives "
        "the paper's claim, its checks with their intervals, its protocol, tables, figures "
        "and provenance.",
        "",
    ]
