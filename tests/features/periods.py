"""A tiny dataset of two periods, written by the tests: day 1 imported, day 2 appended
(new users and new items among known ones), with watches, searches, users and
impressions, for the features update and the warm starts built on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from funnelrec.data.append import append_events
from funnelrec.data.loaders import import_events

MAPPING = """\
[watches]
path = "day-1/watches.csv"
user = "user"
item = "video"
time = "ts"
watch_time = "secs"

[searches]
path = "day-1/searches.csv"
user = "user"
time = "ts"
query = "q"

[users]
path = "day-1/users.csv"
user = "id"
age = "age"
region = "region"

[impressions]
path = "day-1/impressions.csv"
user = "user"
item = "video"
time = "ts"
clicked = "click"
watch_time = "secs"
request = "req"
"""
DAY = 86_400
WORDS = ("cats", "dogs", "music", "news", "cars", "cooking", "games", "maths")


def _day(
    rng: np.random.Generator, day: int, users: list[str], items: list[str], ages: tuple[int, int]
) -> dict[str, str]:
    """One day of logs: each user watches a few items (popular ones more often), searches
    once and is shown pages of four items, one of them clicked."""
    t0 = day * DAY
    weights = 1.0 / np.arange(1, len(items) + 1)
    weights /= weights.sum()
    watches, searches = ["user,video,ts,secs"], ["user,ts,q"]
    pages, people = ["user,video,ts,click,secs,req"], ["id,age,region"]
    req = day * 10_000
    for u, user in enumerate(users):
        t = t0 + 60 * u
        people.append(f"{user},{rng.integers(*ages)},{('north', 'south', 'east')[u % 3]}")
        searches.append(f"{user},{t},{rng.choice(WORDS)} {rng.choice(WORDS)}")
        for k in range(int(rng.integers(4, 8))):
            t += 600
            shown = rng.choice(items, size=4, replace=False, p=weights)
            req += 1
            for j, item in enumerate(shown):
                click = int(j == k % 4)
                secs = int(rng.integers(10, 300)) if click else 0
                pages.append(f"{user},{item},{t},{click},{secs},{req}")
            watches.append(f"{user},{shown[k % 4]},{t},{int(rng.integers(10, 300))}")
    return {
        f"day-{day}/watches.csv": "\n".join(watches) + "\n",
        f"day-{day}/searches.csv": "\n".join(searches) + "\n",
        f"day-{day}/users.csv": "\n".join(people) + "\n",
        f"day-{day}/impressions.csv": "\n".join(pages) + "\n",
    }


def write_periods(root: Path, seed: int = 0) -> tuple[Path, dict[str, list[str]]]:
    """Day 1 imported into `root / "ds"`; returns it and day 2's logs, not yet appended
    (paths relative to `root`, which `append_events` needs as the working directory)."""
    rng = np.random.default_rng(seed)
    users = [f"u{i:02d}" for i in range(24)]
    items = [f"v{i:02d}" for i in range(30)]
    files = {**_day(rng, 1, users, items, (18, 40))}
    # day 2: the same users and items, plus new users and items that rank high, and
    # older users than before (the age normaliser's drift)
    new_items = [f"w{i:02d}" for i in range(10)]
    files.update(_day(rng, 2, users + [f"n{i:02d}" for i in range(8)], new_items + items, (35, 70)))
    for name, text in {**files, "map.toml": MAPPING}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    import_events(root / "map.toml", root / "ds")
    day2 = {t: [f"day-2/{t}.csv"] for t in ("watches", "searches", "users", "impressions")}
    return root / "ds", day2


def append_day_2(root: Path, day2: dict[str, list[str]]) -> None:
    """Append day 2 to `root / "ds"` (the logs' paths are relative to `root`)."""
    import os

    here = Path.cwd()
    os.chdir(root)
    try:
        append_events(root / "ds", day2)
    finally:
        os.chdir(here)
