"""A seeded simulator of a YouTube-like video platform that keeps its ground truth.

    funnelrec simulate --preset small --seed 0 --out data/small [key=value ...]

    from funnelrec.simulate import preset_config, generate
    result = generate(preset_config("tiny", ["days=7"]), seed=0, out=Path("tiny"))

It writes the canonical tables of `schema` (users, items, watches, searches, impressions,
plus id maps) through `DatasetWriter`, and the latent world to DIR/truth/ (see `truth`).

The world: topics with their own token vocabularies; channels on one or two topics;
items with an upload time (some before the window, the rest spread over every hour of
it), a log-normal duration by topic, latent quality and clickbait (independent), a
heavy-tailed appeal and, for a share of them, a series and an episode number. Users have
demographics, an interest mixture over topics drawn around a prior that depends on them,
a taste vector, and a heavy-tailed activity.

Users can also differ and change (off in the presets, on in their "-v2" variants): a
focus correlated with activity (focused users keep to fewer topics and binge series),
interests that drift day by day, and a move from popular to niche items with experience
(`dynamics`). Every event reads the user as they are at its time, and so does the truth.

Each simulated day a user has Poisson(activity x sessions_per_day) sessions, each one of:
  home      the logging policy shows a slate mixing popular, fresh and noisily
            personalised items; each is clicked with the truth's click probability
            (times already shown included) and watched for duration x completion;
  search    a topic from the user's interests, a query of 1-3 of its tokens, and watches
            of the topic's items picked by the user's own choice (popularity x taste);
  external  a watch of a globally popular (fresh) item, with no impression.
A session's last watch may continue into "related" watches: the next episode of a series
far more often than the previous one, otherwise an item of the same topic, leaning to
the less popular (popular -> niche).

Each slot of a home slate draws its item from one of the logging policy's sources, and
the impression logs which one as `cand_source` (names in `POLICY_SOURCES`) and that
source's score as `cand_score`: the probability that one draw of the source picks the
item for this user at that time (every draw is random, so this is what it picks by):
  popular   share policy_popular of the slots: an item by its popularity w_i(t) = appeal
            x freshness among all items; score w_i(t) / sum of all w(t);
  fresh     share policy_fresh: uniformly among the items uploaded in the last
            fresh_window_hours; score 1 / the number of those items;
  topic     the rest, personalised: a topic from the user's interests (uniformly with
            probability policy_noise, policy_noise_logged_out for logged-out users),
            then an item by popularity within it; score ((1 - noise) x interest in the
            item's topic + noise / T) x w_i(t) / the topic's sum of w(t).
A fresh or topic slot that finds no item (none uploaded yet) takes a popular draw and is
logged as popular. These are the truth's terms of `World.watch_rate`. The names are the
logging policy's, not the Recommender's candidate sources ("deep", "cowatch", "fresh"):
a ranker trained on them knows only "fresh" among the served names (docs/simulator.md).

Generation streams over blocks of users (each block runs the whole window, so a user's
history is complete in one place and "times shown" is exact), so memory depends on
`block_user_days` and not on the number of events. Each block has its own random stream
derived from the seed: the same seed and config give byte-identical tables (on one CPU:
numpy's vectorised exp and log may differ in the last bits on another). Events in
the tables are ordered by user_id, then time.

The modules:
- `config.py`: `SimConfig` with its checks, `PRESETS` and `preset_config`;
- `world.py`: `build_world`, the latent world of a seed, and the demographics it draws;
- `dynamics.py`: `UserDynamics`, the users' state at a time (drifted interests, niche);
- `events.py`: the block simulator, one block of users' sessions as watches, searches
  and impressions;
- `tables.py`: the canonical users and items tables, id and token strings.

This file holds `generate`, which streams the blocks into a `DatasetWriter`, and
re-exports the public names, so `from funnelrec.simulate import generate` works as before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from funnelrec.config import apply_overrides
from funnelrec.data.dataset import DatasetWriter
from funnelrec.progress import progress_bar
from funnelrec.simulate.config import PRESETS, SimConfig, preset_config
from funnelrec.simulate.events import (
    DIURNAL,
    EXTERNAL,
    HOME,
    POLICY_FRESH,
    POLICY_POPULAR,
    POLICY_SOURCES,
    POLICY_TOPIC,
    RELATED,
    SEARCH,
    SOURCES,
    _BlockSimulator,
    _Watches,
)
from funnelrec.simulate.tables import _ids, _join_tokens, items_table, users_table
from funnelrec.simulate.world import (
    AGE_BINS,
    AGE_P,
    DEVICE_P,
    DEVICES,
    GENDERS,
    REGION_P,
    REGIONS,
    TOPIC_NAMES,
    build_world,
)

__all__ = [
    "AGE_BINS",
    "AGE_P",
    "DEVICES",
    "DEVICE_P",
    "DIURNAL",
    "EXTERNAL",
    "GENDERS",
    "HOME",
    "POLICY_FRESH",
    "POLICY_POPULAR",
    "POLICY_SOURCES",
    "POLICY_TOPIC",
    "PRESETS",
    "REGIONS",
    "REGION_P",
    "RELATED",
    "SEARCH",
    "SOURCES",
    "TOPIC_NAMES",
    "SimConfig",
    "SimResult",
    "apply_overrides",
    "build_world",
    "generate",
    "items_table",
    "preset_config",
    "users_table",
]


@dataclass(frozen=True)
class SimResult:
    """What `generate` wrote: the dataset path, row counts per table, seconds taken."""

    path: Path
    counts: dict[str, int]
    seconds: float


def _blocks(n_users: int, per_block: int) -> Iterator[tuple[int, int, int]]:
    for b, lo in enumerate(range(0, n_users, per_block)):
        yield b, lo, min(n_users, lo + per_block)


def generate(
    config: SimConfig,
    seed: int,
    out: Path | str,
    *,
    preset: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> SimResult:
    """Simulate a world and write it as a dataset (tables + id maps + truth/) at `out`."""
    t0 = time.perf_counter()
    world = build_world(config, seed, preset)
    words = pa.array([t for v in world.vocab for t in v] + world.generic_tokens)
    extra = {"simulator": {"preset": preset, "seed": seed, "truth": "truth"}}
    n_blocks = math.ceil(config.n_users / config.users_per_block)
    with DatasetWriter(Path(out), source="simulate", force=force, extra=extra) as writer:
        writer.write("users", users_table(world))
        writer.write("items", items_table(world, np.random.default_rng([seed, 2])))
        writer.add_id_map("user", _ids("u", world.n_users))
        writer.add_id_map("item", _ids("v", world.n_items))
        writer.add_id_map("channel", _ids("c", len(world.channels["primary_topic"])))
        world.save(writer.subdir("truth"))
        n_req = 0
        n_watch = 0
        bar = progress_bar(
            None,
            enabled=progress,
            fields="blocks · {task.fields[watches]:,} watches · {task.fields[rate]}",
        )
        with bar:
            task = bar.add_task("simulate", total=n_blocks, watches=0, rate="")
            for b, lo, hi in _blocks(config.n_users, config.users_per_block):
                rng = np.random.default_rng([seed, 1, b])
                ev = _BlockSimulator(world, config, rng).run(lo, hi)
                wt: _Watches = ev["watches"]
                writer.write(
                    "watches",
                    pa.table(
                        {
                            "user_id": wt.user + 1,
                            "item_id": wt.item + 1,
                            "ts": wt.ts,
                            "watch_time_s": wt.watch_time,
                            "source": pa.DictionaryArray.from_arrays(
                                pa.array(wt.source), pa.array(SOURCES)
                            ).cast(pa.string()),
                        }
                    ),
                )
                s = ev["searches"]
                writer.write(
                    "searches",
                    pa.table(
                        {
                            "user_id": s["user"] + 1,
                            "ts": s["ts"],
                            "query": _join_tokens(words, s["tokens"]),
                        }
                    ),
                )
                im = ev["impressions"]
                writer.write(
                    "impressions",
                    pa.table(
                        {
                            "request_id": im["req"] + n_req + 1,
                            "user_id": im["user"] + 1,
                            "item_id": im["item"] + 1,
                            "ts": im["ts"],
                            "position": im["position"].astype(np.int32),
                            "clicked": im["clicked"],
                            "watch_time_s": im["watch_time"],
                            # the logging policy's nominating source and its score
                            "cand_source": pa.DictionaryArray.from_arrays(
                                pa.array(im["source"]), pa.array(POLICY_SOURCES)
                            ).cast(pa.string()),
                            "cand_score": pa.array(im["score"], type=pa.float64()),
                        }
                    ),
                )
                n_req += im["n_requests"]
                n_watch += wt.user.size
                rate = n_watch / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=1, watches=n_watch, rate=f"{rate:,.0f}/s")
    counts = dict(writer.manifest.row_counts)
    return SimResult(path=Path(out), counts=counts, seconds=time.perf_counter() - t0)
