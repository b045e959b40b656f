"""Adding items to a served 1M-item index while clients request recommendations.

    .venv/bin/python benchmarks/live_items.py --artifact runs/small-content/artifact
    .venv/bin/python benchmarks/live_items.py --world tiny --items 100 --clients 2 \
        --index-items 2000 --quiet-seconds 3 --sample-every 10 --out /tmp/live.json

The goal (a live catalogue, after Covington et al. 2016, section 3: fresh content is what
the service must surface first): while 10,000 items are added through POST /v1/items to a
service whose deep source searches a 1M-vector index and 8 clients ask for
recommendations, (a) the p99 of /v1/recommend stays within 1.5x of its p99 without
additions, with no errors, and (b) an added item is retrievable within 1 s of its
acknowledgement.

How:
1. The artifact: a content model (`item_content=true`, docs/candidates.md, "Item content
   tower"), either given (--artifact, copied into --work) or trained here on the tiny
   world (--world tiny: `build_tiny_artifact`, then a content candidate model packaged
   with its ranker), cached under --work.
2. Its index grown to --index-items vectors as benchmarks/serving.py --index-1m grows it
   (`build_1m_index`: the model's real item vectors plus noisy copies, ivfpq_fs unless
   told, cached under --work; `tune_1m`: recall@100 >= 0.95), whose rows answer distinct
   real items ("spread", `answers`).
3. `funnelrec serve ART --workers N` as the CLI runs it (`run_workers`, a fresh state
   database), with one change: each worker's deep source searches the grown index. The
   workers are forked from a forkserver that imports this module first (added to
   `serving.workers.PRELOAD`), and this module, imported with FUNNELREC_LIVE_ITEMS_INDEX
   set, makes `Recommender` load the grown index after its own (`_serve_grown_index`).
   Each worker says so in the server log, which is checked.
4. Phase "quiet": C closed-loop clients (benchmarks/serving.py `_load`: plain HTTP/1.1,
   one keep-alive connection each) for --quiet-seconds. Phase "adding": the same clients,
   on the same users, for as long as one more client (a process of its own, `--adder`;
   the standard library's http.client, one keep-alive connection per stream) takes to
   POST --items new items in --streams streams (each item acknowledged before its
   stream's next; the rate is recorded), as fast as they are acknowledged or, with
   --rate R, item i sent no sooner than i / R seconds after the first. Both
   phases run in chunks of --chunk-seconds, so that the adding phase ends when the adding
   does; the quiet one is chunked alike.
5. Retrievable: every --sample-every-th item added is a copy of the content (channel,
   topic, title, upload time, duration) of a packaged item. A new item's vector is its
   content vector alone, so the copy's vector, and its deep score for a user, can be
   computed beforehand, as the service will compute them (`Recommender` loaded here,
   its content tower, and `Recommender.user_vector` from the state the service seeds).
   Before the phases, probe pairs are found: a user and an item whose copy's deep score
   would place it in the top three quarters of the user's deep candidates as the
   service answers them (POST /v1/recommend, k=1000: every candidate comes back, with
   the sources that nominated it and their scores), each item once. Right after the copy
   is acknowledged, the adder asks for that user's recommendations (k=1000, each poll on
   a new connection, so on whichever worker the kernel gives it) until the copy is among
   the candidates the deep source nominated: acknowledgement-to-retrievable is the time
   from reading the POST's answer to reading that recommend answer. The other items get
   channel and topic (of one packaged item), title, upload time and duration (each of
   another) drawn from the catalogue's real values.

The machine's load average and its busiest other processes are recorded before and after
(other jobs may share the cores). Writes --out (benchmarks/results/live_items.json).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
INDEX_ENV = "FUNNELREC_LIVE_ITEMS_INDEX"  # JSON [index dir, answers mode]: the grown index
GROWN_LOG = "live_items: deep source over"
GOAL_ITEMS, GOAL_CLIENTS, GOAL_P99_RATIO, GOAL_RETRIEVABLE_S = 10_000, 8, 1.5, 1.0
FIELDS = ("channel_id", "topic", "title", "upload_ts", "duration_s")


def _sibling(name: str) -> ModuleType:
    """benchmarks/<name>.py, loaded once by path (benchmarks/ is a folder of scripts)."""
    key = f"funnelrec_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


bench = _sibling("serving")


# --------------------------------------------------------------------------- serving


class GrownIndex:
    """The deep source over the grown index (`serving.CollapsedIndex`), with what the
    recommender reads of an index besides `search` and `count`."""

    def __init__(self, index: Any, answer: np.ndarray) -> None:
        self.collapsed = bench.CollapsedIndex(index, answer)
        self.dim = int(index.dim)
        self.item_ids = np.unique(answer)

    @property
    def count(self) -> int:
        return int(self.collapsed.count)

    def search(self, queries: Any, k: int, exclude: Any = None) -> tuple[np.ndarray, np.ndarray]:
        out: tuple[np.ndarray, np.ndarray] = self.collapsed.search(queries, k, exclude)
        return out


def _serve_grown_index() -> None:
    """With INDEX_ENV set, every `Recommender` loaded in this process searches the grown
    index in place of its packaged one. Called when this module is imported, which the
    forkserver of `run_workers` does before it forks the workers (see `serve`)."""
    spec = os.environ.get(INDEX_ENV)
    if not spec:
        return
    from funnelrec.ann.index import ItemIndex
    from funnelrec.candidates import load_item_embeddings
    from funnelrec.serving.recommender import Recommender

    index_dir, mode = json.loads(spec)
    packaged_load = Recommender._load_parts

    def _load_parts(self: Recommender) -> None:
        packaged_load(self)
        index = ItemIndex.load(index_dir)  # with its tuned knob (`tune_1m`)
        _, real_ids = load_item_embeddings(self.path / "candidates")
        copies = index.count // len(real_ids) - 1
        answer = bench.answers(real_ids.numpy().astype(np.int64), copies, mode)
        self.index = GrownIndex(index, answer)  # type: ignore[assignment]
        print(
            f"{GROWN_LOG} {index.count} vectors ({mode}) in process {os.getpid()}",
            file=sys.stderr,
            flush=True,
        )

    Recommender._load_parts = _load_parts  # type: ignore[method-assign]


_serve_grown_index()


def serve(art: Path, port: int, state: Path, workers: int) -> None:
    """`funnelrec serve ART --port P --state S --workers N` (`run_workers`, what the CLI
    calls), its workers forked from a forkserver that imports this module first."""
    import funnelrec.serving.workers as workers_mod

    # The forkserver is started with this process's sys.path, which holds this folder.
    workers_mod.PRELOAD = (*workers_mod.PRELOAD, Path(__file__).stem)
    workers_mod.run_workers(art, workers=workers, port=port, state_path=state)


# --------------------------------------------------------------------------- the artifact


def tiny_artifact(work: Path, seed: int) -> Path:
    """A content model on the tiny world with `build_tiny_artifact`'s ranker, packaged
    (cached: WORK/tiny/art-content)."""
    from funnelrec.candidates import fit_candidates, load_training_config
    from funnelrec.pipeline import build_tiny_artifact
    from funnelrec.serving.package import package

    root = work / "tiny"
    art = root / "art-content"
    if (art / "manifest.json").is_file():
        return art
    if root.exists():
        shutil.rmtree(root)
    build_tiny_artifact(root, seed=seed, steps=100)
    cfg = load_training_config(
        None,
        [
            "dim=16",
            "num_negatives=256",
            "batch_size=256",
            "max_steps=100",
            "patience=0",
            "valid_examples=200",
            f"seed={seed}",
            "threads=1",
            "item_content=true",
        ],
    )
    fit_candidates(root / "feat", root / "cand-content", cfg, progress=False)
    tmp = root / ".art-content.tmp"
    package(root / "feat", root / "cand-content", root / "ranker", tmp, progress=False)
    tmp.rename(art)
    return art


def copied_artifact(src: Path, work: Path) -> Path:
    """`src` copied into WORK/artifact (once per fingerprint): a run must not see an
    artifact that another job rewrites, and the copy is the one served."""
    src_fp = json.loads((src / "manifest.json").read_text())["fingerprint"]
    art = work / "artifact"
    if (art / "manifest.json").is_file():
        if json.loads((art / "manifest.json").read_text())["fingerprint"] == src_fp:
            return art
        shutil.rmtree(art)
    tmp = work / ".artifact.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("state.db*"))
    tmp.rename(art)
    return art


def check_content_model(art: Path) -> None:
    cfg = json.loads((art / "candidates" / "config.json").read_text())
    if not cfg.get("content_inputs"):
        raise SystemExit(
            f"{art}: its candidate model has no item content tower (item_content=true): "
            "an added item would have no vector to retrieve it by"
        )


# --------------------------------------------------------------------------- the items


def find_probes(
    url: str, art: Path, users: list[int], want: int, state: Path
) -> list[dict[str, Any]]:
    """Up to `want` (item, user) pairs, distinct packaged items, each one whose copy (its
    content, added as a new item: the content vector alone, which the served model
    computes here as the service will) has a deep score for its user (the user vector,
    computed here by the served model from the state the service seeds) inside the top
    three quarters of the user's deep candidates as the service answers them: the copy
    is then among those candidates exactly when the deep source can retrieve it. Best
    placed first."""
    import httpx
    import pyarrow.compute as pc
    import torch

    from funnelrec.serving.recommender import Recommender, RecommendRequest
    from funnelrec.serving.state import UserStateStore

    rec = Recommender.load(art)
    store = UserStateStore(state)
    rec.seed_state(store)
    catalogue = pq.read_table(art / "items.parquet")
    catalogue = catalogue.select(
        [c for c in ("item_id", *FIELDS) if c in catalogue.column_names]
    ).filter(pc.is_valid(catalogue["title"]))
    content = rec.features.encode_item_content(catalogue)
    with torch.no_grad():
        vectors = rec.candidate_model.content_embeddings(content.content()).float().numpy()
    items = np.asarray(content.item_id, dtype=np.int64)
    deep_k = rec.config.deep_k
    best: dict[int, dict[str, Any]] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for user in users:
            r = client.post("/v1/recommend", json={"user_id": user, "k": 1000})
            r.raise_for_status()
            deep = sorted(
                (it["sources"]["deep"] for it in r.json()["items"] if "deep" in it["sources"]),
                reverse=True,
            )
            u = rec.user_vector(RecommendRequest(user_id=user, k=10), store.context(user))
            if len(deep) < deep_k or u is None:
                continue  # no full candidate list to place an item in
            threshold = deep[(3 * deep_k) // 4]
            scores = vectors @ u
            # the user's best item not yet a probe: as many distinct originals as users
            for j in np.argsort(-scores)[:50].tolist():
                score, item = float(scores[j]), int(items[j])
                if score <= threshold:
                    break
                if item not in best:
                    rank = sum(1 for d in deep if d > score)
                    best[item] = {"item": item, "user": user, "deep_rank": rank, "score": score}
                    break
            if len(best) >= want:
                break
    store.close()
    return sorted(best.values(), key=lambda p: (p["deep_rank"], p["item"]))[:want]


def new_items(
    art: Path, n: int, every: int, probes: list[dict[str, Any]], seed: int, tag: str
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """`n` POST /v1/items bodies (unique external ids) and the sampled ones (body index ->
    the probe whose content it copies)."""
    items = pq.read_table(art / "items.parquet", columns=["item_id", *FIELDS]).to_pydict()
    row_of = {int(i): r for r, i in enumerate(items["item_id"])}
    rng = np.random.default_rng(seed)
    rows = len(items["item_id"])
    bodies, samples = [], {}
    for i in range(n):
        if probes and i % every == 0:
            probe = probes[(i // every) % len(probes)]
            src = row_of[probe["item"]]
            body = {f: items[f][src] for f in FIELDS}
            samples[i] = probe
        else:
            a, b, c, d = (int(x) for x in rng.integers(0, rows, 4))
            body = {
                "channel_id": items["channel_id"][a],
                "topic": items["topic"][a],
                "title": items["title"][b],
                "upload_ts": items["upload_ts"][c],
                "duration_s": items["duration_s"][d],
            }
        bodies.append({"item_id": f"live-{tag}-{i}", **body})
    return bodies, samples


# --------------------------------------------------------------------------- the adder


def adder(spec_file: Path, out_file: Path) -> None:
    """The adding client (a process of its own): `streams` threads, each POSTing its share
    of the spec's bodies one after the other; after a sampled one, it polls the probe
    user's recommendations until the item is among the deep candidates (or
    `poll_timeout_s`). Waits for a line on stdin first."""
    from concurrent.futures import ThreadPoolExecutor

    spec = json.loads(spec_file.read_text())
    streams = int(spec["streams"])
    print("ready", flush=True)
    sys.stdin.readline()
    cpu0, start = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        parts = list(pool.map(lambda s: _add_stream(spec, s, streams, start), range(streams)))
    elapsed = time.perf_counter() - start
    ack_ms = [x for p in parts for x in p["ack_ms"]]
    errors = [x for p in parts for x in p["errors"]]
    flagged = sorted(x for p in parts for x in p["not_retrievable"])
    out = {
        "streams": streams,
        "seconds": elapsed,
        "added": len(ack_ms),
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:10],
        "items_per_s": len(ack_ms) / elapsed,
        "ack_ms": bench._pct(ack_ms) if ack_ms else {},
        # answers saying `retrievable: false` (body indices, the first 20)
        "answers_not_retrievable": len(flagged),
        "answers_not_retrievable_first": flagged[:20],
        "client_cpu_s": time.process_time() - cpu0,
        "samples": sorted((s for p in parts for s in p["samples"]), key=lambda s: s["index"]),
    }
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    tmp.write_text(json.dumps(out) + "\n")
    tmp.replace(out_file)


def _post_json(conn: Any, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    """POST `body` as JSON on an `http.client` connection: (status, response body)."""
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def _add_stream(spec: dict[str, Any], stream: int, streams: int, start: float) -> dict[str, Any]:
    """One stream of the adder: bodies stream, stream + streams, ... (with a rate, body i
    no sooner than i / rate seconds after `start`), on one keep-alive connection. The
    standard library's client, as lean as the recommending clients': the adder shares
    the cores with the service it measures."""
    import http.client
    from urllib.parse import urlsplit

    url, bodies = spec["url"], spec["bodies"]
    host = urlsplit(url)
    samples = {int(k): v for k, v in spec["samples"].items()}
    ack_ms: list[float] = []
    errors: list[str] = []
    not_retrievable: list[int] = []
    measured: list[dict[str, Any]] = []
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    try:
        for i in range(stream, len(bodies), streams):
            if spec.get("rate"):
                time.sleep(max(0.0, start + i / spec["rate"] - time.perf_counter()))
            t = time.perf_counter()
            try:
                status, raw = _post_json(conn, "/v1/items", bodies[i])
            except (OSError, http.client.HTTPException) as e:
                errors.append(type(e).__name__)
                conn.close()  # the next request opens a new connection
                continue
            acked = time.perf_counter()
            answer = json.loads(raw) if status == 200 else {}
            if status != 200 or not answer.get("created"):
                errors.append(f"HTTP {status}: {raw[:200].decode(errors='replace')}")
                continue
            ack_ms.append((acked - t) * 1000.0)
            if not answer["retrievable"]:
                not_retrievable.append(i)
            if i in samples:
                got = _poll(url, answer["item_id"], samples[i], acked, spec)
                measured.append({"index": i, **got})
    finally:
        conn.close()
    return {
        "ack_ms": ack_ms,
        "errors": errors,
        "not_retrievable": not_retrievable,
        "samples": measured,
    }


def _poll(
    url: str, item: int, probe: dict[str, Any], acked: float, spec: dict[str, Any]
) -> dict[str, Any]:
    import http.client
    from urllib.parse import urlsplit

    host = urlsplit(url)
    polls = 0
    body = {"user_id": probe["user"], "k": 1000}
    while time.perf_counter() - acked < spec["poll_timeout_s"]:
        polls += 1
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
        try:  # a new connection each poll: on whichever worker the kernel gives it
            status, raw = _post_json(conn, "/v1/recommend", body)
        finally:
            conn.close()
        got = time.perf_counter()
        found = [
            it["sources"]["deep"]
            for it in (json.loads(raw)["items"] if status == 200 else [])
            if it["item_id"] == item and "deep" in it["sources"]
        ]
        if found:
            return {
                "item_id": item,
                "copy_of": probe["item"],
                "user": probe["user"],
                "polls": polls,
                "ack_to_retrievable_s": got - acked,
                # the service's deep score of the copy, less the one the probe expected
                "score_error": found[0] - probe["score"],
            }
    return {
        "item_id": item,
        "copy_of": probe["item"],
        "user": probe["user"],
        "polls": polls,
        "ack_to_retrievable_s": None,
    }


# --------------------------------------------------------------------------- the phases


def phase(
    server: Any, users: list[int], clients: int, k: int, chunk_s: float, done: Any
) -> dict[str, Any]:
    """The clients in chunks of `chunk_s` until `done(elapsed)`: latencies of all chunks,
    errors, and where the CPU went (the server, this client, everything else)."""
    usage = bench.Usage(server)
    lat: list[float] = []
    errors: list[str] = []
    chunks: list[list[float]] = []  # [seconds from the start, requests, p50, p99] per chunk
    start = time.perf_counter()
    while True:
        got, errs, _ = asyncio.run(bench._load(server.port, users, clients, chunk_s, k))
        lat += got
        errors += errs
        if got:
            p50, p99 = np.percentile(got, [50, 99])
            at = time.perf_counter() - start
            chunks.append([round(at, 1), len(got), round(float(p50), 2), round(float(p99), 2)])
        if done(time.perf_counter() - start):
            break
    elapsed = time.perf_counter() - start
    figures, _, client_cpu = usage.report(lat, errors, elapsed)
    return {
        **figures,
        "clients": clients,
        "client_cores_busy": client_cpu / elapsed,
        "chunks": {"columns": ["end_s", "requests", "p50_ms", "p99_ms"], "rows": chunks},
    }


def retrievable_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    secs = [s["ack_to_retrievable_s"] for s in samples if s["ack_to_retrievable_s"] is not None]
    out: dict[str, Any] = {
        "measured": (
            "for every sampled item (a copy of the content of a packaged item, whose "
            "content vector is computed beforehand), the time from reading the POST /v1/items "
            "answer to reading the first POST /v1/recommend answer (k=1000, the probe "
            "user, for whom the item's deep score places it in the top three quarters of "
            "the deep candidates, each poll on a new connection) that holds the item among "
            "the candidates the deep source nominated"
        ),
        "samples": len(samples),
        "found": len(secs),
        "first_poll_share": (
            sum(1 for s in samples if s["ack_to_retrievable_s"] is not None and s["polls"] == 1)
            / max(1, len(samples))
        ),
    }
    errors = [abs(s["score_error"]) for s in samples if "score_error" in s]
    if errors:
        out["max_abs_score_error"] = max(errors)  # the probe's score against the service's
    if secs:
        v = np.asarray(secs)
        out.update(
            p50_s=float(np.percentile(v, 50)),
            p99_s=float(np.percentile(v, 99)),
            max_s=float(v.max()),
            share_within_1s=float(np.sum(v <= GOAL_RETRIEVABLE_S)) / len(samples),
        )
    else:
        out["share_within_1s"] = 0.0
    return out


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from funnelrec import __version__
    from funnelrec.experiments.report import git_commit

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "benchmark": "live_items",
        "command": " ".join(["benchmarks/live_items.py", *args.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": bench._cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "code": {"commit": git_commit(), "funnelrec": __version__},
        "load_average_at_start": os.getloadavg(),
        "busiest_other_processes_at_start": bench._others({os.getpid()}),
        "uptime_at_start": _uptime(),
    }
    if args.artifact is not None:
        art = copied_artifact(args.artifact.resolve(), work)
        origin = f"{args.artifact.resolve()} (copied)"
    else:
        art = tiny_artifact(work, args.seed)
        origin = "trained here on the tiny world (tiny_artifact)"
    check_content_model(art)
    manifest = json.loads((art / "manifest.json").read_text())
    results["artifact"] = {
        "path": str(art),
        "origin": origin,
        "note": args.note,
        "fingerprint": manifest["fingerprint"],
        "counts": manifest.get("counts", {}),
        "serving": manifest.get("serving", {}),
    }
    grow = argparse.Namespace(
        index_items=args.index_items,
        noise=0.3,
        seed=args.seed,
        index_kind=args.index_kind,
        hnsw_m=32,
        ef_construction=100,
        build_threads=args.build_threads,
        tune_queries=args.tune_queries,
    )
    cache = work / f"index_{args.index_items}_{args.index_kind}"
    results["settings"] = {
        "workers": args.workers,
        "clients": args.clients,
        "k": args.k,
        "items": args.items,
        "adding": f"{args.streams} stream(s), each acknowledging an item before its next"
        + (f", at most {args.rate:g} items/s in all" if args.rate else ""),
        "sample_every": args.sample_every,
        "quiet_seconds": args.quiet_seconds,
        "chunk_seconds": args.chunk_seconds,
        "warmup_seconds": args.warmup_seconds,
        "poll_timeout_s": args.poll_timeout,
        "torch_threads": args.torch_threads,
        "answers": "spread",
        "seed": args.seed,
    }
    tag = f"{int(started)}"
    with tempfile.TemporaryDirectory(prefix="funnelrec-live-") as tmp_dir:
        tmp = Path(tmp_dir)
        state = tmp / "state.db"
        formation = bench.build_1m_index(art / "candidates", cache, grow)
        formation.update(bench.tune_1m(art, cache, tmp / "tune-state.db", grow))
        results["index"] = formation
        _write(args.out, results)

        port = bench._free_port()
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            str(art),
            str(port),
            str(state),
            str(args.workers),
        ]
        env = bench._server_env(args.torch_threads)
        env[INDEX_ENV] = json.dumps([str(cache / "index"), "spread"])
        log = tmp / "server.log"
        with bench.Server(cmd, port, log, env, args.workers) as server:
            grown = log.read_text().count(GROWN_LOG)
            if grown < args.workers:
                raise RuntimeError(
                    f"{grown} of {args.workers} workers search the grown index:\n{server._tail()}"
                )
            results["server"] = {
                "runs": f"funnelrec serve ART --port {port} --state (fresh) --workers "
                f"{args.workers} (`run_workers`), each worker's deep source over the grown "
                "index",
                "ready_s": server.ready_s,
                "workers_on_grown_index": grown,
            }
            users = bench._users(art, 5000, args.seed + 7)
            want = -(-args.items // args.sample_every)
            probes = find_probes(
                server.url,
                art,
                bench._users(art, args.probe_users, args.seed + 11),
                want,
                tmp / "probe-state.db",
            )
            if not probes:
                raise RuntimeError("no packaged item outside the vocabulary is a deep candidate")
            results["probes"] = {
                "distinct_items": len(probes),
                "users_tried_at_most": args.probe_users,
                "deep_rank_max": max(p["deep_rank"] for p in probes),
            }
            bodies, samples = new_items(art, args.items, args.sample_every, probes, args.seed, tag)
            spec = {
                "url": server.url,
                "bodies": bodies,
                "streams": args.streams,
                "rate": args.rate,
                "samples": {str(i): p for i, p in samples.items()},
                "poll_timeout_s": args.poll_timeout,
            }
            (tmp / "adder.json").write_text(json.dumps(spec))

            asyncio.run(bench._load(port, users, args.clients, args.warmup_seconds, args.k))
            results["quiet"] = phase(
                server,
                users,
                args.clients,
                args.k,
                args.chunk_seconds,
                lambda s: s >= args.quiet_seconds,
            )
            _write(args.out, results)

            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--adder",
                    str(tmp / "adder.json"),
                    str(tmp / "added.json"),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None and proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                proc.kill()
                raise RuntimeError("the adding client did not start")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            adding = phase(
                server,
                users,
                args.clients,
                args.k,
                args.chunk_seconds,
                lambda s: proc.poll() is not None,
            )
            if proc.wait() != 0:
                raise RuntimeError(f"the adding client failed ({proc.returncode})")
            added = json.loads((tmp / "added.json").read_text())
            samples_out = added.pop("samples")
            results["adding"] = {**adding, "adder": added}
            results["retrievable"] = retrievable_summary(samples_out)
            results["retrievable"]["per_sample"] = samples_out
            results["server"]["memory_mib"] = bench._memory_mib(server.proc.pid)
    results["goals"] = goals(results, args)
    results["load_average_at_end"] = os.getloadavg()
    results["busiest_other_processes_at_end"] = bench._others({os.getpid()})
    results["uptime_at_end"] = _uptime()
    results["wall_s"] = time.time() - started
    _write(args.out, results)
    return results


def goals(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    quiet, adding = results["quiet"]["latency_ms"], results["adding"]["latency_ms"]
    ratio = adding["p99_ms"] / quiet["p99_ms"] if quiet and adding else None
    errors = results["quiet"]["errors"] + results["adding"]["errors"]
    errors += results["adding"]["adder"]["errors"]
    share = results["retrievable"]["share_within_1s"]
    at_scale = (
        args.items >= GOAL_ITEMS
        and args.clients == GOAL_CLIENTS
        and results["index"]["vectors"] >= 1_000_000
    )
    return {
        "at_goal_scale": at_scale,
        "p99_ratio": ratio,
        "p99_ratio_goal": GOAL_P99_RATIO,
        "p99_met": ratio is not None and ratio <= GOAL_P99_RATIO,
        "errors": errors,
        "errors_met": errors == 0,
        "retrievable_within_1s_share": share,
        "retrievable_goal_s": GOAL_RETRIEVABLE_S,
        "retrievable_met": share == 1.0,
    }


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)


def _print(results: dict[str, Any]) -> None:
    q, a, r, g = results["quiet"], results["adding"], results["retrievable"], results["goals"]
    for name, p in (("quiet", q), ("adding", a)):
        lm = p["latency_ms"]
        print(
            f"{name:7s} {p['seconds']:7.1f} s {p['completed']:7d} requests "
            f"{p['throughput_rps']:6.1f} req/s  p50 {lm.get('p50_ms', float('nan')):6.1f} ms  "
            f"p99 {lm.get('p99_ms', float('nan')):6.1f} ms  errors {p['errors']}"
        )
    ad = a["adder"]
    print(
        f"added {ad['added']} items in {ad['seconds']:.1f} s ({ad['items_per_s']:.1f}/s), "
        f"ack p50 {ad['ack_ms'].get('p50_ms', float('nan')):.1f} ms, errors {ad['errors']}"
    )
    print(
        f"retrievable: {r['found']}/{r['samples']} found, p50 {r.get('p50_s', float('nan')):.3f} s"
        f" p99 {r.get('p99_s', float('nan')):.3f} s max {r.get('max_s', float('nan')):.3f} s, "
        f"within 1 s {r['share_within_1s']:.2%}"
    )
    print(f"goals: {json.dumps(g)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="a content-model artifact to serve (copied into --work); "
        "default: train one on the tiny world",
    )
    ap.add_argument(
        "--world",
        choices=("tiny",),
        default="tiny",
        help="world to train on when no --artifact [tiny]",
    )
    ap.add_argument("--work", type=Path, default=Path("runs/live_items"), help="cache folder")
    ap.add_argument("--items", type=int, default=GOAL_ITEMS, help="items to add [10000]")
    ap.add_argument("--streams", type=int, default=1, help="concurrent adding streams [1]")
    ap.add_argument(
        "--rate", type=float, default=None, help="items per second at most [as acknowledged]"
    )
    ap.add_argument("--sample-every", type=int, default=100, help="retrievability sample [100]")
    ap.add_argument("--clients", type=int, default=GOAL_CLIENTS, help="recommend clients [8]")
    ap.add_argument("--workers", type=int, default=2, help="server worker processes [2]")
    ap.add_argument("--k", type=int, default=10, help="items per recommend response [10]")
    ap.add_argument("--quiet-seconds", type=float, default=60, help="quiet phase length [60]")
    ap.add_argument("--chunk-seconds", type=float, default=2, help="load chunk length [2]")
    ap.add_argument("--warmup-seconds", type=float, default=5, help="load before phases [5]")
    ap.add_argument("--poll-timeout", type=float, default=10, help="give up polling after [10]")
    ap.add_argument("--probe-users", type=int, default=300, help="users tried for probes [300]")
    ap.add_argument("--index-items", type=int, default=1_000_000, help="grown index size [1M]")
    ap.add_argument("--index-kind", default="ivfpq_fs", choices=("ivfpq_fs", "hnsw"))
    ap.add_argument("--build-threads", type=int, default=1, help="index build threads [1]")
    ap.add_argument("--tune-queries", type=int, default=300, help="index tuning users [300]")
    ap.add_argument("--torch-threads", type=int, default=1, help="server model threads [1]")
    ap.add_argument("--note", default="", help="what the artifact is (kept in the JSON)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "live_items.json")
    ap.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--adder", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.serve:
        art, port, state, workers = args.serve
        serve(Path(art), int(port), Path(state), int(workers))
        return 0
    if args.adder:
        adder(*args.adder)
        return 0
    for name in ("items", "streams", "sample_every", "clients", "workers", "index_items"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    _print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
