"""Benchmark: time and peak memory of every stage of the funnel, per world size.

    .venv/bin/python benchmarks/scale.py --presets small medium
    .venv/bin/python benchmarks/scale.py --presets large --workers 2      # hours; resumable

For each preset the stages run one after another in ROOT/<preset>/ (default runs/scale),
each as a child process of its own, the way a user runs them:

    simulate   funnelrec simulate --preset P
    features   funnelrec features build --split time cap=10 rank_cap=8 ... (FEATURES_SETTINGS)
    candidates funnelrec train candidates --config configs/candidates-scale.toml  (one epoch)
    index      funnelrec index build (the package's default kind for the corpus size)
    ranker     funnelrec train ranker --config configs/ranker-scale.toml  (one epoch)

Each stage's wall time, CPU time (user + system, its children included) and peak memory
are recorded: `os.wait4`'s peak RSS (the largest single process) and the peak sum of
resident memory over the stage's process tree (sampled each second: worker processes
side by side add up), in
benchmarks/results/scale.json as soon as the stage ends. A stage already recorded with
the same settings is skipped, so an interrupted run picks up at the stage it was in: the
feature build resumes at its first unwritten block, training from its checkpoint
(--resume); the record then lists each part's time.

The growth exponent of a stage is the least-squares slope of log(wall time) against
log(events) (watches + searches + impressions) over the presets measured: 1 is linear;
the same of CPU time too (fairer when other work shared the machine).
The memory bound it checks: the large preset's peak RSS of every stage <= 16 GiB (one
machine, bounded memory: docs/scale.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from funnelrec.experiments.report import git_commit  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "scale.json"
STAGES = ("simulate", "features", "candidates", "index", "ranker")
# Fixed examples per user (the paper's remedy against heavy users) bound an epoch: at most
# 10 candidate examples and 8 ranking pages per user, for every preset alike.
FEATURES_SETTINGS = ["cap=10", "rank_cap=8", "block_events=20000000"]
CANDIDATES_CONFIG = REPO / "configs" / "candidates-scale.toml"
RANKER_CONFIG = REPO / "configs" / "ranker-scale.toml"
MEMORY_BOUND_GIB = 16.0


def _funnelrec() -> list[str]:
    exe = Path(sys.executable).with_name("funnelrec")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "funnelrec"]


def commands(preset: str, root: Path, workers: int) -> dict[str, list[str]]:
    d = root / preset
    fr = _funnelrec()
    return {
        "simulate": [*fr, "simulate", "--preset", preset, "--seed", "0", "--out", str(d / "data")],
        "features": [
            *fr, "features", "build", "--data", str(d / "data"), "--split", "time",
            "--out", str(d / "features"), "--workers", str(workers), *FEATURES_SETTINGS,
        ],
        "candidates": [
            *fr, "train", "candidates", "-f", str(d / "features"), "-o", str(d / "candidates"),
            "--config", str(CANDIDATES_CONFIG),
        ],
        "index": [*fr, "index", "build", str(d / "candidates"), "-f", str(d / "features")],
        "ranker": [
            *fr, "train", "ranker", "-f", str(d / "features"), "-o", str(d / "ranker"),
            "--config", str(RANKER_CONFIG),
        ],
    }  # fmt: skip


def settings_key(stage: str, cmd: list[str]) -> str:
    """What makes a stage's result: its command without paths, and its config file."""
    text = " ".join(a for a in cmd[1:] if "/" not in a)
    for cfg in (CANDIDATES_CONFIG, RANKER_CONFIG):
        if str(cfg) in cmd:
            text += "\n" + cfg.read_text()
    return text


def _resumable(stage: str, root: Path, preset: str) -> bool:
    d = root / preset
    if stage == "features":
        return (d / ".features.partial" / "progress.json").exists()
    if stage in ("candidates", "ranker"):
        return (d / f"{stage}.checkpoint.pt").exists()
    return False


def _tree_rss(root: int) -> int:
    """Resident bytes of process `root` and all its descendants, from /proc."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parent[int(d.name)] = int(fields[1])
            rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, todo = {root}, [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in tree]
        tree.update(kids)
        todo += kids
    return sum(rss.get(p, 0) for p in tree)


class _TreeSampler(threading.Thread):
    """The largest sum of resident memory over a process tree, sampled every second: the
    machine's peak while several worker processes run side by side (wait4 gives the
    largest single process)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.peak = max(self.peak, _tree_rss(self.pid))


def _tail(path: Path, size: int = 2000) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def run_stage(cmd: list[str], log: Path) -> tuple[dict[str, Any], bool]:
    """Run one command as a child: its wall and CPU seconds and peak RSS (wait4), and
    whether it was interrupted (Ctrl-C: the child checkpoints and exits)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    interrupted = False
    with log.open("a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        sampler = _TreeSampler(proc.pid)
        sampler.start()
        while True:
            try:
                _, status, usage = os.wait4(proc.pid, 0)
                break
            except KeyboardInterrupt:
                interrupted = True  # the child got the SIGINT too; wait for its checkpoint
        wall = time.perf_counter() - t0
        sampler.stop.set()
    code = os.waitstatus_to_exitcode(status)
    # Ctrl-C in the terminal reaches both; a SIGINT sent to the stage alone ends it the
    # same way, and it says so last in its log.
    interrupted = interrupted or (code != 0 and "interrupted at step" in _tail(log))
    if code != 0 and not interrupted:
        raise SystemExit(f"stage failed (exit {code}): {shlex.join(cmd)}; see {log}")
    part = {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # KiB on Linux: the largest process
        "peak_tree_rss_gib": sampler.peak / 2**30,  # all its processes together (sampled)
    }
    return part, interrupted


def _counts(root: Path, preset: str) -> dict[str, int]:
    d = root / preset
    out: dict[str, int] = {}
    manifest = d / "data" / "manifest.json"
    if manifest.exists():
        rows = json.loads(manifest.read_text())["row_counts"]
        out.update({k: int(v) for k, v in rows.items()})
        out["events"] = sum(int(rows.get(k, 0)) for k in ("watches", "searches", "impressions"))
    feats = d / "features" / "features.json"
    if feats.exists():
        counts = json.loads(feats.read_text())["counts"]
        out["candidate_train_examples"] = int(counts["candidates"]["train"])
        out["ranking_train_examples"] = int(counts["ranking"].get("train", 0))
    return out


def growth(results: dict[str, Any], measure: str = "wall_s") -> dict[str, float | None]:
    """Per stage: slope of log(time) vs log(events) over the presets measured."""
    out: dict[str, float | None] = {}
    for stage in STAGES:
        pts = [
            (math.log(r["counts"]["events"]), math.log(r["stages"][stage][measure]))
            for r in results.values()
            if stage in r.get("stages", {})
            and r["stages"][stage].get(measure)  # None: not recorded (see the stage's note)
            and r.get("counts", {}).get("events")
        ]
        if len(pts) < 2:
            out[stage] = None
            continue
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        out[stage] = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None
    return out


def load() -> dict[str, Any]:
    if RESULTS.exists():
        return dict(json.loads(RESULTS.read_text()))
    return {"benchmark": "scale", "presets": {}}


def save(report: dict[str, Any], preset: str | None = None) -> None:
    """Write the report; with `preset`, only that preset's entry replaces the one on disk
    (another run of this script may be recording another preset meanwhile)."""
    if preset is not None:
        on_disk = load()
        on_disk["presets"][preset] = report["presets"][preset]
        on_disk["date"] = report.get("date")
        report = on_disk
    report["growth_exponent_wall_vs_events"] = growth(report["presets"])
    report["growth_exponent_cpu_vs_events"] = growth(report["presets"], "cpu_s")
    report["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}"
    )
    report["memory_bound_gib"] = MEMORY_BOUND_GIB
    large = report["presets"].get("large", {}).get("stages", {})
    report["large_within_bound"] = (
        all(
            max(s["peak_rss_gib"], s.get("peak_tree_rss_gib", 0)) <= MEMORY_BOUND_GIB
            for s in large.values()
        )
        if set(large) == set(STAGES)
        else None
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(RESULTS)


def show(report: dict[str, Any]) -> None:
    table = Table(title="funnelrec scale: wall time / peak RSS per stage")
    table.add_column("preset")
    table.add_column("events", justify="right")
    for stage in STAGES:
        table.add_column(stage, justify="right")
    for preset, r in report["presets"].items():
        cells = []
        for stage in STAGES:
            s = r.get("stages", {}).get(stage)
            peak = max(s["peak_rss_gib"], s.get("peak_tree_rss_gib", 0)) if s else 0
            cells.append(f"{s['wall_s']:,.0f} s / {peak:.2f} GiB" if s else "-")
        table.add_row(preset, f"{r.get('counts', {}).get('events', 0):,}", *cells)
    exps = report.get("growth_exponent_wall_vs_events", {})
    table.add_row("exponent", "", *[f"{exps[s]:.2f}" if exps.get(s) else "-" for s in STAGES])
    Console(width=180).print(table)


def main() -> None:
    global RESULTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["small", "medium"])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "scale")
    ap.add_argument("--workers", type=int, default=1, help="feature build processes")
    ap.add_argument("--redo", action="store_true", help="run stages already recorded again")
    ap.add_argument("--results", type=Path, help="the JSON to update (default: RESULTS)")
    args = ap.parse_args()
    if args.results:
        RESULTS = args.results

    report = load()
    for preset in args.presets:
        cmds = commands(preset, args.root, args.workers)
        entry = report["presets"].setdefault(preset, {"stages": {}})
        for stage in STAGES:
            if stage not in args.stages:
                continue
            cmd = cmds[stage]
            key = settings_key(stage, cmd)
            done = entry["stages"].get(stage)
            if done and done.get("settings") == key and not args.redo:
                print(f"{preset} {stage}: recorded, skipped")
                continue
            resume = _resumable(stage, args.root, preset) and not args.redo
            parts = list(entry.get("partial", {}).get(stage, [])) if resume else []
            run_cmd = [*cmd, "--resume" if resume and stage != "features" else "--force"]
            if stage == "features" and resume:
                run_cmd = [*cmd, "--force"]  # the build resumes its unfinished blocks itself
            print(f"{preset} {stage}: {'resuming' if resume else 'running'} ...", flush=True)
            part, interrupted = run_stage(run_cmd, args.root / preset / "logs" / f"{stage}.log")
            parts.append(part)
            if interrupted:
                entry.setdefault("partial", {})[stage] = parts
                save(report, preset)
                raise SystemExit("interrupted: run the same command again to resume")
            entry.setdefault("partial", {}).pop(stage, None)
            entry["stages"][stage] = {
                "wall_s": sum(p["wall_s"] for p in parts),
                "cpu_s": sum(p["cpu_s"] for p in parts),
                "peak_rss_gib": max(p["peak_rss_gib"] for p in parts),
                "peak_tree_rss_gib": max(p["peak_tree_rss_gib"] for p in parts),
                "parts": parts if len(parts) > 1 else None,
                "settings": key,
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "commit": git_commit(REPO),
                "load_average_1m_after": os.getloadavg()[0],
            }
            entry["counts"] = _counts(args.root, preset)
            report["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            save(report, preset)
    report = load()
    show(report)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
