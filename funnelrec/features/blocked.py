"""The build over blocks of users (`funnelrec.features.partition`): resumable, on an engine.

Three passes: partition the events by blocks of users, count each block and fit the
transforms on the sum (`funnelrec.features.fit`), write each block's examples
(`funnelrec.features.write`). The per-block work of the last two runs on an engine
(`funnelrec.engines`: this process, local worker processes, or a Dask cluster): a
worker gets a `_BlockJob` (paths and settings only) and runs `_count_block_job` or
`_write_block_job`; both are top-level functions so that spawned processes and Dask
workers can import them. The partition, the fit on the summed counts, the progress record
and the last step run in this process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from rich.progress import Progress

from funnelrec.data.dataset import Dataset, write_json_atomic
from funnelrec.engines import Engine, check_visible
from funnelrec.errors import DataError
from funnelrec.features import FORMAT_VERSION, MANIFEST, FeaturesConfig
from funnelrec.features.content import fit_item_content
from funnelrec.features.finish import _finish
from funnelrec.features.fit import (
    _count_block,
    _Counts,
    _fit_transforms,
    _load_transforms,
    _split,
    _time_bounds,
)
from funnelrec.features.partition import BlockPlan, BlockTables, CountIndex, partition, plan_blocks
from funnelrec.features.splits import PART_NAMES
from funnelrec.features.tables import _Items, _Log, _read_items, _read_log, _read_users, _Users
from funnelrec.features.write import _Bars, _BlockOut, _BlockResult, _write_block
from funnelrec.progress import progress_bar


@dataclass(frozen=True)
class _BlockJob:
    """One block's work, sent to a worker process: paths and settings only."""

    data: Path
    work: Path
    split_kind: str
    cfg: FeaturesConfig
    block: int
    part: dict[str, Any]
    fit: dict[str, Any] | None
    run: str  # this build's id: what a long-lived worker cached for another build is not used

    @property
    def blocks(self) -> Path:
        return self.work / "_blocks"


# What a worker reads once and keeps for its next blocks: users, items, transforms, the
# popularity index (memory-mapped: the workers of a machine share its pages).
_JOB_CACHE: dict[str, Any] = {}


def _forget_jobs() -> None:
    """Drop what this process cached for blocks (a Dask worker lives on after a build)."""
    _JOB_CACHE.clear()


def _job_inputs(job: _BlockJob) -> tuple[_Users, _Items]:
    key = f"users:{job.work}:{job.run}"
    if key not in _JOB_CACHE:
        _JOB_CACHE.clear()
        ds = Dataset.open(job.data)
        _JOB_CACHE[key] = (
            _read_users(ds, job.part["n_users"]),
            _read_items(ds, job.part["n_items"]),
        )
    users, items = _JOB_CACHE[key]
    return users, items


def _job_log(job: _BlockJob) -> _Log:
    users, items = _job_inputs(job)
    return _read_log(
        BlockTables(job.blocks, job.block),
        users=users,
        items=items,
        candidate_columns=job.cfg.candidate_columns,
    )


def _count_block_job(job: _BlockJob) -> _Counts:
    log = _job_log(job)
    bounds = tuple(job.part["bounds"]) if job.part["bounds"] else None
    sp = _split(log, job.split_kind, job.cfg, bounds, whole=False)
    acc = _Counts()
    _count_block(log, sp, job.cfg, acc, [job.cfg.seed, 2, job.block])
    return acc


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def _write_block_job(
    job: _BlockJob, progress: Callable[[str, int], Callable[[int], None]] = _no_progress
) -> int:
    """Write block `job.block`'s examples and save its results; returns the block."""
    fit, b, cfg, work = job.fit, job.block, job.cfg, job.work
    assert fit is not None
    users, _ = _job_inputs(job)
    key = f"fit:{work}:{job.run}"
    if key not in _JOB_CACHE:
        by_item = CountIndex.load(job.blocks / "item_index.npy", job.part["lo"], job.part["span"])
        _JOB_CACHE[key] = (_load_transforms(work, fit, users), by_item)
    tf, by_item = _JOB_CACHE[key]
    _clear_block(work, b)
    log = _job_log(job)
    sp = _split(log, job.split_kind, cfg, fit["bounds"], whole=False)
    offsets = np.cumsum([[0, 0, 0], *fit["requests"]], axis=0)
    total_rank = max(sum(fit["rank_train_rows"]), 1)
    out = _BlockOut(
        root=work,
        prefix=f"part-b{b:04d}-",
        requests=f"requests-b{b:04d}.parquet",
        request_offset={p: int(offsets[b][i]) for i, p in enumerate(PART_NAMES)}
        if fit["requests"]
        else {},
        quantile_quota=math.ceil(cfg.quantile_sample * fit["rank_train_rows"][b] / total_rank)
        if fit["rank_train_rows"]
        else 0,
        seed=[cfg.seed, 0, b],
        rank_seed=[cfg.seed, 1, b],
        cap_seed=[cfg.seed, 2, b],
        progress=progress,
    )
    res = _write_block(log, sp, tf, by_item, cfg, out)
    del log
    _save_result(job.blocks, b, res)
    return b


class _BlockedBuild:
    """The build over blocks of users (see `funnelrec.features.partition`), resumable.

    It works in `.<out>.partial` beside `out`. `progress.json` there records the data's
    fingerprint and the config (a mismatch starts over), whether the partition and the fit
    are done, and which blocks are written; each block's results are kept in `_blocks/`.
    A block interrupted half-way is written again from its start, on any engine.
    """

    def __init__(
        self,
        ds: Dataset,
        out: Path,
        split_kind: str,
        cfg: FeaturesConfig,
        progress: bool,
        n_events: int,
        engine: Engine,
    ) -> None:
        self.ds, self.out, self.split_kind, self.cfg = ds, out, split_kind, cfg
        self.engine = engine
        self.show = progress
        self.n_events = n_events
        # absolute: a Dask worker's working directory is not this process's
        self.work = out.resolve().parent / f".{out.name}.partial"
        self.blocks = self.work / "_blocks"
        self.key = {
            "format_version": FORMAT_VERSION,
            "fingerprint": ds.fingerprint(),
            "split": split_kind,
            "config": asdict(cfg),
        }

    # ---- progress record
    def _load_state(self) -> dict[str, Any]:
        file = self.work / "progress.json"
        if file.exists():
            try:
                state = json.loads(file.read_text())
            except (OSError, json.JSONDecodeError):
                state = {}
            if state.get("key") == json.loads(json.dumps(self.key)):
                state["resumed"] = True
                if self.show:
                    done = len(state.get("blocks_done", []))
                    print(f"resuming the build in {self.work} ({done} blocks written)")
                return dict(state)
            if self.show:
                print(f"{self.work}: an unfinished build of other data or config; starting over")
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        state = {"key": self.key, "blocks_done": [], "run": uuid.uuid4().hex}
        self._save_state(state)
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.work / "progress.json", state)

    def run(self, *, force: bool) -> Path:
        # the engine first: a cluster that cannot be reached fails before the partition
        with self.engine:
            return self._run(force=force)

    def _run(self, *, force: bool) -> Path:
        t_start = time.perf_counter()
        state = self._load_state()
        self.run_id = str(state.setdefault("run", uuid.uuid4().hex))
        # before the partition pass, which may take long, not after
        check_visible(self.engine, [self.ds.path.resolve(), self.work])
        users_t = self.ds.table("users", columns=["user_id"]).column("user_id")
        n_users_table = int(pc.max(users_t).as_py() or 0) if len(users_t) else 0
        with progress_bar("examples", enabled=self.show) as bar:
            if "partition" not in state:
                state["partition"] = self._partition(bar, n_users_table)
                self._save_state(state)
            part = state["partition"]
            plan = BlockPlan(edges=np.asarray(part["edges"], dtype=np.int64))
            users = _read_users(self.ds, part["n_users"])
            if "fit" not in state:
                state["fit"] = self._fit(bar, plan, users, part)
                self._save_state(state)
            fit = state["fit"]
            tf = _load_transforms(self.work, fit, users)
            done = set(state["blocks_done"])
            blocks_task = bar.add_task("blocks written", total=plan.n_blocks, unit="blocks")
            bar.update(blocks_task, completed=len(done))
            todo = [b for b in range(plan.n_blocks) if b not in done]
            bars = _Bars(bar, reuse=True)

            def finished(b: int, _: object = None) -> None:
                state["blocks_done"] = sorted({*state["blocks_done"], b})
                self._save_state(state)
                bar.update(blocks_task, advance=1)

            jobs = [self._job(b, part, fit) for b in todo]
            if self.engine.in_process:  # a block's own progress can be drawn
                for job in jobs:
                    bars.prefix = f"block {job.block + 1}/{plan.n_blocks}: "
                    finished(_write_block_job(job, bars))
            else:
                self.engine.map_blocks(_write_block_job, jobs, finished)
            self.engine.everywhere(_forget_jobs)
        results = [self._load_result(b) for b in range(plan.n_blocks)]
        sp_meta = {
            "kind": self.split_kind,
            "t1": fit["bounds"][0] if fit["bounds"] else None,
            "t2": fit["bounds"][1] if fit["bounds"] else None,
            "min_watches": self.cfg.min_watches if self.split_kind == "last" else None,
            "valid_n": self.cfg.valid_n if self.split_kind == "last" else None,
            "held_out_users": fit["held_out_users"] if self.split_kind == "last" else None,
        }
        timing = {
            "total_s": time.perf_counter() - t_start,
            "blocks": plan.n_blocks,
            "resumed": bool(state.get("resumed")),
        }
        for name in tf.vocabs():  # _finish writes them all again, with the rest
            (self.work / "transforms" / f"{name}.parquet").unlink(missing_ok=True)
        manifest = _finish(
            self.work,
            self.ds,
            sp_meta,
            self.cfg,
            tf,
            results,
            fit["rank_columns"],
            self.ds.has("searches") and self.ds.num_rows("searches") > 0,
            timing,
            content=fit_item_content(self.ds.table("items"), tf.item, tf.t_max, self.cfg),
        )
        if manifest["ranking"].get("available"):
            manifest["ranking"]["impressions"] = "dataset"
        shutil.rmtree(self.blocks)
        (self.work / "progress.json").unlink()
        write_json_atomic(self.work / MANIFEST, manifest)
        _replace_dir(self.work, self.out, force=force)
        return self.out

    # ---- stages
    def _partition(self, bar: Progress, n_users_table: int) -> dict[str, Any]:
        shutil.rmtree(self.blocks, ignore_errors=True)
        plan = plan_blocks(
            n_events=self.n_events, n_users=n_users_table, block_events=self.cfg.block_events
        )
        task = bar.add_task("partition by user", total=self.n_events, unit="events")

        def on_rows(n: int) -> None:
            bar.advance(task, n)

        summary = partition(self.ds, self.blocks, plan, on_rows=on_rows)
        bounds = _time_bounds(summary.watch_ts, self.cfg) if self.split_kind == "time" else None
        index = CountIndex.build(summary.watch_item, summary.watch_ts, consume=True)
        index.save(self.blocks / "item_index.npy")
        return {
            "edges": plan.edges.tolist(),
            "n_users": max(summary.n_users, n_users_table),
            "n_items": summary.n_items,
            "lo": index.lo,
            "span": index.span,
            "bounds": bounds,
            "rows": summary.rows,
        }

    def _job(self, b: int, part: dict[str, Any], fit: dict[str, Any] | None) -> _BlockJob:
        return _BlockJob(
            data=self.ds.path.resolve(),
            work=self.work,
            split_kind=self.split_kind,
            cfg=self.cfg,
            block=b,
            part=part,
            fit=fit,
            run=self.run_id,
        )

    def _fit(
        self, bar: Progress, plan: BlockPlan, users: _Users, part: dict[str, Any]
    ) -> dict[str, Any]:
        task = bar.add_task("fit transforms (blocks)", total=plan.n_blocks, unit="blocks")
        parts: dict[int, _Counts] = {}

        def finished(b: int, counts: _Counts) -> None:
            parts[b] = counts
            bar.update(task, advance=1)

        jobs = [self._job(b, part, None) for b in range(plan.n_blocks)]
        self.engine.map_blocks(_count_block_job, jobs, finished)
        self.engine.everywhere(_forget_jobs)
        acc = _Counts.merge([parts[b] for b in range(plan.n_blocks)])
        ranking = bool(acc.rank_columns) and self.cfg.ranking
        tf = _fit_transforms(acc, users, self.cfg, ranking=ranking)
        tdir = self.work / "transforms"
        tdir.mkdir(exist_ok=True)
        for name, v in tf.vocabs().items():
            v.save(tdir / f"{name}.parquet")
        tf.enc.normalizer.save(tdir / "candidates_dense.json")
        return {
            "bounds": part["bounds"],
            "t_min": tf.t_min,
            "t_max": tf.t_max,
            "held_out_users": acc.held_out_users,
            "rank_columns": acc.rank_columns,
            "rank_train_rows": acc.rank_train_rows,
            "requests": acc.requests,
            "vocabs": sorted(tf.vocabs()),
            "ranking": ranking,
        }

    def _load_result(self, b: int) -> _BlockResult:
        folder = self.blocks / "results"
        meta = json.loads((folder / f"b{b:04d}.json").read_text())
        with np.load(folder / f"b{b:04d}.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return _BlockResult(
            counts=meta["counts"],
            sums=meta["sums"],
            label_counts=arrays.pop("label_counts"),
            samples={k.removeprefix("sample."): a for k, a in arrays.items()},
        )


def _clear_block(work: Path, b: int) -> None:
    """Remove what an interrupted run of block b may have left."""
    for stage in ("candidates", "ranking"):
        for part_name in PART_NAMES:
            folder = work / stage / part_name
            for p in folder.glob(f"part-b{b:04d}-*.parquet"):
                p.unlink()
            (folder / f"requests-b{b:04d}.parquet").unlink(missing_ok=True)


def _save_result(blocks: Path, b: int, res: _BlockResult) -> None:
    folder = blocks / "results"
    folder.mkdir(exist_ok=True)
    arrays = {f"sample.{k}": v for k, v in res.samples.items()}
    arrays["label_counts"] = res.label_counts
    tmp = folder / f"b{b:04d}.tmp.npz"
    np.savez(tmp, **arrays)  # type: ignore[arg-type]
    tmp.replace(folder / f"b{b:04d}.npz")
    write_json_atomic(folder / f"b{b:04d}.json", res.to_json())


def _replace_dir(src: Path, target: Path, *, force: bool) -> None:
    """Rename a finished directory into place (replacing `target` only with force)."""
    if target.exists():
        if not force:
            raise DataError(f"{target} already exists (use --force to overwrite)")
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)
