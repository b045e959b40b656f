"""A small dataset whose items carry content, written by the tests: four topics, each with
its own channel, title words and ten items (uploaded one every UPLOAD_EVERY seconds) that
ten users of that topic watch once uploaded, the newest most (each upload doubles the
odds against the one before); and two items of two of the topics that nobody watched
(outside any item vocabulary fitted on it), uploaded before the last watch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from funnelrec.data.dataset import DatasetWriter

TOPICS = ("cats", "dogs", "cars", "cooking")
WORDS = {
    "cats": ("kitten", "purr", "meow", "whisker", "tabby"),
    "dogs": ("puppy", "bark", "fetch", "leash", "beagle"),
    "cars": ("engine", "wheel", "drift", "garage", "turbo"),
    "cooking": ("recipe", "oven", "pasta", "spice", "bake"),
}
PER_TOPIC = 10  # watched items per topic: ids 1..40, topic t owns 10 t + 1 .. 10 t + 10
USERS_PER_TOPIC = 10
LAST_WATCH = 100_000
UPLOAD_EVERY = 8_000  # the k-th item of each topic is uploaded at k x UPLOAD_EVERY
# never watched: (item id, topic, upload ts)
NEW_ITEMS = ((41, "cats", 80_000), (42, "cars", 50_000))


def title(topic: str, k: int) -> str:
    words = WORDS[topic]
    return f"{topic} {words[k % 5]} {words[(k + 2) % 5]}"


def topic_of_user(user_id: int) -> str:
    return TOPICS[(user_id - 1) // USERS_PER_TOPIC]


def write_content_world(path: Path, seed: int = 0, *, until: int | None = None) -> Path:
    """The dataset at `path`; with `until`, only what happened before that time (the
    watches before it, the items uploaded before it): an earlier version of the same."""
    rng = np.random.default_rng(seed)
    n_watched = len(TOPICS) * PER_TOPIC
    items = {
        "item_id": list(range(1, n_watched + 1)),
        "upload_ts": [UPLOAD_EVERY * (i % PER_TOPIC) for i in range(n_watched)],
        "duration_s": [float(60 + 30 * (i % 7)) for i in range(n_watched)],
        "channel_id": [1 + i // PER_TOPIC for i in range(n_watched)],
        "topic": [TOPICS[i // PER_TOPIC] for i in range(n_watched)],
        "title": [title(TOPICS[i // PER_TOPIC], i % PER_TOPIC) for i in range(n_watched)],
    }
    for item_id, topic, upload in NEW_ITEMS:
        items["item_id"].append(item_id)
        items["upload_ts"].append(upload)
        items["duration_s"].append(120.0)
        items["channel_id"].append(1 + TOPICS.index(topic))
        items["topic"].append(topic)
        items["title"].append(title(topic, 1))
    users, watched, times = [], [], []
    n_users = len(TOPICS) * USERS_PER_TOPIC
    for user in range(1, n_users + 1):
        t = TOPICS.index(topic_of_user(user))
        n = int(rng.integers(12, 18))
        ts = np.sort(rng.integers(1_000, LAST_WATCH, n))
        uploaded = np.minimum(ts // UPLOAD_EVERY + 1, PER_TOPIC)  # items out by then
        # the k-th of m uploaded items with probability 2^k / (2^m - 1): the newest most
        k = np.floor(np.log2(1 + rng.random(n) * (2.0**uploaded - 1))).astype(np.int64)
        own = 1 + t * PER_TOPIC + np.minimum(k, uploaded - 1)
        users += [user] * n
        watched += own.tolist()
        times += ts.tolist()
    times[int(np.argmax(times))] = LAST_WATCH
    if until is not None:
        keep = [i for i, t in enumerate(times) if t < until]
        users, watched, times = ([v[i] for i in keep] for v in (users, watched, times))
        kept = [i for i, t in enumerate(items["upload_ts"]) if t < until]
        items = {k: [v[i] for i in kept] for k, v in items.items()}
    with DatasetWriter(path, source="test") as w:
        w.write("users", pa.table({"user_id": list(range(1, n_users + 1))}))
        w.write(
            "items",
            pa.table(
                {
                    "item_id": items["item_id"],
                    "upload_ts": items["upload_ts"],
                    "duration_s": pa.array(items["duration_s"], pa.float32()),
                    "channel_id": items["channel_id"],
                    "topic": items["topic"],
                    "title": items["title"],
                }
            ),
        )
        w.write(
            "watches",
            pa.table(
                {
                    "user_id": users,
                    "item_id": watched,
                    "ts": times,
                    "watch_time_s": pa.nulls(len(users), pa.float32()),
                    "source": pa.nulls(len(users), pa.string()),
                }
            ),
        )
    return path


def content_world_features(root: Path) -> Path:
    """The content world written to `root / "d"` and its features built (leave-last-out)
    into `root / "f"`; returns `root`."""
    from funnelrec.features.build import build_features

    write_content_world(root / "d")
    build_features(root / "d", root / "f", split="last", progress=False)
    return root
